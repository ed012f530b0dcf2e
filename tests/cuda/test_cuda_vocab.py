"""The cuda backend's vocabulary kernels (csrc/vocab.cu) against the torch reference in fp64
(SPEC section 5) on a GPU: peaked, flat, -inf and padded rows, odd and realistic V, every
dtype, temperature, in-place backward, determinism, batch invariance, CUDA-graph capture,
N * V > 2**31. On a machine without GPU only the argument checks run (the rest skip).

The parametrized parity tests of tests/ops also run on backend="cuda" on a GPU (the
`backend` fixture of tests/conftest.py includes it), for every op the backend implements.
"""

import pytest
import torch

import rlkernels
import rlkernels.reference.vocab
from _cuda_gpu import HAS_GPU, gpu_cuda
from _naive import (LOW_DTYPES, assert_grad_close, assert_values_close, bit_equal,
                    fp32_floor, make_logits, make_tokens, row_weight)
from rlkernels.cuda import vocab as cv

# V, each for a reason: 1 (degenerate), 7 (below one 16-byte chunk, odd), 1031 (just above
# a power of two, odd: unaligned rows in bf16/fp16), 50257 (GPT-2, odd), 151936 (Qwen,
# a multiple of 8: every row 16-byte aligned, the vector path).
VOCABS = [1, 7, 1031, 50257, 151936]
ROWS = {1: 9, 7: 12, 1031: 12, 50257: 8, 151936: 5}


def _grads(outs, weights, x):
    loss = sum((torch.where(torch.isfinite(o), o, 0.0) * w).sum() for o, w in zip(outs, weights))
    return torch.autograd.grad(loss, x)[0]


def _weights(n, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).float().to(device)


def _check(x, tok, temperature):
    """token_logprobs + entropy on cuda vs the torch backend in fp64: values and gradients."""
    dtype = x.dtype
    xc = x.detach().clone().requires_grad_(True)
    lp, h = rlkernels.token_logprobs(xc, tok, temperature=temperature, return_entropy=True,
                                     backend="cuda")
    x64 = x.detach().double().requires_grad_(True)
    lp64, h64 = rlkernels.token_logprobs(x64, tok, temperature=temperature,
                                         return_entropy=True, backend="torch")
    assert lp.dtype == h.dtype == torch.float32
    assert_values_close(lp, lp64, what="logp")
    assert_values_close(h, h64, what="entropy")
    pad = tok == -100
    assert (lp[pad] == 0).all() and (h[pad] == 0).all()
    w = [_weights(tok.numel(), 1, x.device), _weights(tok.numel(), 2, x.device)]
    g = _grads((lp, h), w, xc)
    g64 = _grads((lp64, h64), [v.double() for v in w], x64)
    floor = fp32_floor(x, temperature=temperature, upstream=row_weight(*w))
    assert_grad_close(g, g64, dtype, floor, what="grad")
    assert (g[pad] == 0).all()


@gpu_cuda
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_token_logprobs_matches_reference(dtype, vocab, temperature):
    x = make_logits(ROWS[vocab], vocab, dtype, seed=vocab, device="cuda")
    tok = make_tokens(x, pad_every=3)
    _check(x, tok, temperature)


@gpu_cuda
@pytest.mark.parametrize("kind", ["peaked", "flat", "masked", "peaked_masked"])
def test_token_logprobs_row_kinds_fp64(kind):
    x = make_logits(6, 1031, torch.float64, kind=kind, seed=3, device="cuda")
    tok = make_tokens(x, pad_every=4)
    lp, h = rlkernels.token_logprobs(x, tok, return_entropy=True, backend="cuda")
    lp64, h64 = rlkernels.token_logprobs(x, tok, return_entropy=True, backend="torch")
    torch.testing.assert_close(lp, lp64, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h64, rtol=1e-12, atol=1e-12)


@gpu_cuda
def test_all_minus_inf_row_and_minus_inf_token():
    x = torch.randn(3, 7, device="cuda")
    x[0] = float("-inf")
    x[1, 2] = float("-inf")
    tok = torch.tensor([4, 2, 5], device="cuda")
    lp, h = rlkernels.token_logprobs(x, tok, return_entropy=True, backend="cuda")
    assert lp[0] == float("-inf") and h[0] == 0
    assert lp[1] == float("-inf")
    assert torch.isfinite(lp[2]) and torch.isfinite(h).all()


@gpu_cuda
def test_entropy_only_and_leading_dims():
    x = make_logits(12, 50257, torch.bfloat16, seed=5, device="cuda").view(3, 4, 50257)
    h = rlkernels.entropy(x, temperature=0.9, backend="cuda")
    h64 = rlkernels.entropy(x.double(), temperature=0.9, backend="torch")
    assert h.shape == (3, 4)
    assert_values_close(h, h64, what="entropy")


@gpu_cuda
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_sliced_logits_and_int32_tokens(dtype):
    # a column slice: rows with a stride != V and start addresses that are not 16-byte aligned
    full = make_logits(8, 1040, dtype, seed=7, device="cuda")
    x = full[:, 3:1034]
    tok = make_tokens(x, pad_every=5, dtype=torch.int32)
    _check(x, tok, 1.0)


@gpu_cuda
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_inplace_backward_matches(dtype):
    x = make_logits(6, 1031, dtype, seed=9, device="cuda")
    tok = make_tokens(x, pad_every=3)
    lp, h, stats = cv.token_logprobs_forward(x, tok, 0.8, -100, True)
    g_lp, g_h = torch.randn_like(lp), torch.randn_like(h)
    ref = cv.token_logprobs_backward(g_lp, g_h, x, tok, stats, 0.8, -100)
    buf = x.clone()
    out = cv.token_logprobs_backward(g_lp, g_h, buf, tok, stats, 0.8, -100, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert bit_equal(out, ref)


@gpu_cuda
def test_determinism_and_batch_invariance():
    x = make_logits(9, 50257, torch.bfloat16, seed=11, device="cuda")
    tok = make_tokens(x, pad_every=4)
    a = cv.token_logprobs_forward(x, tok, 0.7, -100, True)
    b = cv.token_logprobs_forward(x, tok, 0.7, -100, True)
    assert all(bit_equal(u, v) for u, v in zip(a, b))
    ga = cv.token_logprobs_backward(a[0], a[1], x, tok, a[2], 0.7, -100)
    gb = cv.token_logprobs_backward(a[0], a[1], x, tok, a[2], 0.7, -100)
    assert bit_equal(ga, gb)
    for r in (0, 3, 8):  # alone: another start address (alignment) than inside the batch
        alone = cv.token_logprobs_forward(x[r:r + 1].clone(), tok[r:r + 1], 0.7, -100, True)
        for full, one in zip(a, alone):
            assert bit_equal(full[r:r + 1], one), f"row {r} differs alone / in the batch"


@gpu_cuda
def test_cuda_graph_capture():
    x = make_logits(16, 1031, torch.bfloat16, seed=13, device="cuda")
    tok = make_tokens(x, pad_every=3)
    eager = cv.token_logprobs_forward(x, tok, 1.0, -100, True)
    g_lp = torch.randn(16, device="cuda")
    eager_g = cv.token_logprobs_backward(g_lp, None, x, tok, eager[2], 1.0, -100)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (allocator) outside the capture
        cv.token_logprobs_forward(x, tok, 1.0, -100, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cv.token_logprobs_forward(x, tok, 1.0, -100, True)
        grad = cv.token_logprobs_backward(g_lp, None, x, tok, out[2], 1.0, -100)
    graph.replay()
    torch.cuda.synchronize()
    assert all(bit_equal(u, v) for u, v in zip(out, eager))
    assert bit_equal(grad, eager_g)


@gpu_cuda
def test_more_than_2_31_elements():
    # N * V = 16384 * 151936 > 2**31: 64-bit offsets (5 GB of bf16 logits)
    n, vocab = 16384, 151936
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with >= 24 GiB")
    x = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    tok = torch.randint(0, vocab, (n,), device="cuda")
    lp, h, stats = cv.token_logprobs_forward(x, tok, 1.0, -100, True)
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    lp64, h64, _ = rlkernels.reference.vocab.token_logprobs_forward(
        x[rows].double(), tok[rows], 1.0, -100, True)
    torch.testing.assert_close(lp[rows].double(), lp64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h[rows].double(), h64, rtol=1e-5, atol=1e-5)
    g = cv.token_logprobs_backward(torch.ones(n, device="cuda"), None, x, tok, stats, 1.0,
                                   -100, out=x)
    last = g[n - 1].float()
    assert torch.isfinite(last).all() and abs(float(last.sum())) < 1e-2  # rows sum to ~0


@gpu_cuda
@pytest.mark.parametrize("kind,beta", [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.3),
                                       ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("vocab", [7, 1031, 50257])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_kl_divergence_matches_reference(dtype, vocab, kind, beta):
    n = 8
    x = make_logits(n, vocab, dtype, seed=vocab, device="cuda")
    y = make_logits(n, vocab, dtype, kind="normal", seed=vocab + 1, device="cuda")
    y = torch.where(torch.isinf(x), x, y)
    mask = torch.arange(n, device="cuda") % 3 == 1
    xc, yc = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    kl = rlkernels.kl_divergence(xc, yc, kind=kind, beta=beta, temperature=0.8,
                                 ignore_mask=mask, backend="cuda")
    x64, y64 = x.double().requires_grad_(True), y.double().requires_grad_(True)
    kl64 = rlkernels.kl_divergence(x64, y64, kind=kind, beta=beta, temperature=0.8,
                                   ignore_mask=mask, backend="torch")
    assert_values_close(kl, kl64, what="kl")
    assert (kl[mask] == 0).all()
    w = _weights(n, 3, "cuda")
    gx, gy = torch.autograd.grad((kl * w).sum(), (xc, yc))
    gx64, gy64 = torch.autograd.grad((kl64 * w.double()).sum(), (x64, y64))
    floor = fp32_floor(x, y, temperature=0.8, upstream=float(w.abs().max()))
    assert_grad_close(gx, gx64, dtype, floor, what="grad logits")
    assert_grad_close(gy, gy64, dtype, floor, what="grad ref_logits")
    assert (gx[mask] == 0).all() and (gy[mask] == 0).all()


# --------------------------------------------------------------------------- any machine

@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-tensor error")
def test_launchers_reject_cpu_tensors():
    x = torch.zeros(2, 5)
    tok = torch.zeros(2, dtype=torch.int64)
    if rlkernels.cuda.load_extension() is None:
        with pytest.raises(RuntimeError, match="cuda backend is unavailable"):
            cv.token_logprobs_forward(x, tok, 1.0, -100, False)
        return
    with pytest.raises(ValueError, match="logits: expected a CUDA tensor"):
        cv.token_logprobs_forward(x, tok, 1.0, -100, False)
    with pytest.raises(ValueError, match="logits: expected a CUDA tensor"):
        cv.kl_divergence_forward(x, x, None, "reverse", 0.5, 1.0)
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor"):
        cv.token_logprobs_forward([1.0], tok, 1.0, -100, False)


def test_backend_cuda_on_cpu_tensors_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        rlkernels.token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64),
                                 backend="cuda")
