"""The cuda backend's vocabulary kernels (csrc/vocab.cu, csrc/sparse.cu) against the torch
reference in fp64 (SPEC section 5) on a GPU: peaked, flat, -inf and padded rows, odd and
realistic V, every dtype, temperature, in-place backward, determinism, batch invariance,
CUDA-graph capture, N * V > 2**31; sparse_logprobs / sparse_kl (full, support, tail,
duplicate ids, -1 slots, V above one segment of the membership bitmap). On a machine without
GPU only the argument checks run (the rest skip).

The parametrized parity tests of tests/ops also run on backend="cuda" on a GPU (the
`backend` fixture of tests/conftest.py includes it), for every op the backend implements.
"""

import math

import pytest
import torch

import rlkernels
import rlkernels.reference.sparse
import rlkernels.reference.vocab
from _cuda_gpu import HAS_GPU, gpu_cuda
from _naive import (LOW_DTYPES, assert_grad_close, assert_values_close, bit_equal,
                    fp32_floor, make_indices, make_logits, make_targets, make_tokens,
                    row_weight)
from rlkernels.cuda import sparse as cs
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


# ==================================================================== sparse_logprobs / kl

def _sparse_grad_close(g, g_ref, dtype, x, temperature, upstream, what):
    """SPEC section 5 gradient bound (plus the fp32 floor for fp32 logits; fp64: 64 ulp)."""
    if dtype == torch.float64:
        g64, r64 = g.double().cpu(), g_ref.double().cpu()
        assert torch.isfinite(g64).all(), f"{what}: non-finite gradient"
        tol = 64 * torch.finfo(torch.float64).eps * (float(r64.abs().max()) + 1.0)
        assert float((g64 - r64).abs().max()) <= tol, what
        return
    floor = fp32_floor(x, temperature=temperature, upstream=upstream)
    assert_grad_close(g, g_ref, dtype, floor if dtype == torch.float32 else 0.0, what=what)


def _values_close(out, ref, dtype, what):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
    assert_values_close(out, ref, atol=tol, rtol=tol, what=what)


def _upstream(*ws):
    total = 0.0
    for w in ws:
        a = torch.nan_to_num(w.double().abs(), nan=0.0)
        a = a.sum(-1) if a.dim() == 2 else a
        total += float(a.max()) if a.numel() else 0.0
    return total


def _slot_grads(idx, seed, cdt):
    """Random upstream gradients of the slots, NaN at unused slots (never read)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(idx.shape, generator=g, dtype=torch.float64).to(cdt).to(idx.device)
    return torch.where(idx >= 0, w, float("nan"))


def _check_sparse_logprobs(x, idx, temperature, normalize, with_tail, what=""):
    dtype = x.dtype
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    what = f"{what} {dtype} {normalize} tail={with_tail}"
    lp, tail, stats = cs.sparse_logprobs_forward(x, idx, temperature, normalize, with_tail)
    x64 = x.double()
    lp_r, tail_r, stats_r = rlkernels.reference.sparse.sparse_logprobs_forward(
        x64, idx, temperature, normalize, with_tail)
    _values_close(lp, lp_r, dtype, f"{what} logp")
    _values_close(tail, tail_r, dtype, f"{what} tail")
    _values_close(stats, stats_r, dtype, f"{what} stats")
    assert (lp[idx < 0] == float("-inf")).all()
    g = _slot_grads(idx, 7, cdt)
    gt = _weights(x.shape[0], 8, x.device).to(cdt) if with_tail else None
    grad = cs.sparse_logprobs_backward(g, gt, x, idx, lp, tail, stats, temperature, normalize)
    grad_r = rlkernels.reference.sparse.sparse_logprobs_backward(
        torch.where(idx >= 0, g, 0.0).double(), None if gt is None else gt.double(), x64, idx,
        lp_r, tail_r, stats_r, temperature, normalize)
    up = _upstream(torch.where(idx >= 0, g, 0.0)) + (0.0 if gt is None else _upstream(gt))
    _sparse_grad_close(grad, grad_r, dtype, x, temperature, up, f"{what} grad")
    return lp, tail, stats, grad


def _check_sparse_kl(x, idx, target, temperature, with_tail, what=""):
    dtype = x.dtype
    what = f"{what} {dtype} kl tail={with_tail}"
    kl, s_tail, stats = cs.sparse_kl_forward(x, idx, target, temperature, with_tail)
    x64 = x.double()
    kl_r, s_tail_r, stats_r = rlkernels.reference.sparse.sparse_kl_forward(
        x64, idx, target.double(), temperature, with_tail)
    _values_close(kl, kl_r, dtype, f"{what} kl")
    _values_close(s_tail, s_tail_r, dtype, f"{what} s_tail")
    g = _weights(x.shape[0], 9, x.device).to(kl.dtype)
    grad = cs.sparse_kl_backward(g, x, idx, target, s_tail, stats, temperature, with_tail)
    grad_r = rlkernels.reference.sparse.sparse_kl_backward(
        g.double(), x64, idx, target.double(), s_tail_r, stats_r, temperature, with_tail)
    _sparse_grad_close(grad, grad_r, dtype, x, temperature, _upstream(g), f"{what} grad")
    return kl, s_tail, stats, grad


# V: 7 (below one 16-byte chunk), 50257 (odd: unaligned rows in bf16), 151936 (aligned, the
# vector path), 300007 (> 262144 columns: two segments of the membership bitmap).
SPARSE_VOCABS = [7, 50257, 151936, 300007]
SPARSE_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


@gpu_cuda
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("normalize", ["full", "support"])
@pytest.mark.parametrize("vocab", SPARSE_VOCABS)
@pytest.mark.parametrize("dtype", SPARSE_DTYPES, ids=str)
def test_sparse_logprobs_matches_reference(dtype, vocab, normalize, temperature):
    # mixed rows: normal, peaked (+20..40), flat, a third of the columns -inf; every other
    # row ends in a -1 slot (padding)
    x = make_logits(6, vocab, dtype, seed=vocab, device="cuda")
    idx = make_indices(x, 20, seed=vocab)
    for with_tail in (True, False):
        _check_sparse_logprobs(x, idx, temperature, normalize, with_tail, what=f"V={vocab}")


@gpu_cuda
@pytest.mark.parametrize("vocab", SPARSE_VOCABS)
@pytest.mark.parametrize("dtype", SPARSE_DTYPES, ids=str)
def test_sparse_kl_matches_reference(dtype, vocab):
    x = make_logits(6, vocab, dtype, seed=100 + vocab, device="cuda")
    idx = make_indices(x, 20, seed=vocab)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    target = make_targets(x.cpu(), idx.cpu(), seed=vocab, dtype=cdt).cuda()
    assert target[idx < 0].isnan().all()  # unused slots' targets are never read
    for with_tail in (True, False):
        _check_sparse_kl(x, idx, target, 0.8, with_tail, what=f"V={vocab}")


@gpu_cuda
@pytest.mark.parametrize("dtype", SPARSE_DTYPES, ids=str)
def test_sparse_duplicates_full_cover_and_edge_ids(dtype):
    """Duplicate ids (the reference sums their slots), ids covering every column (tail -inf,
    no KL tail bucket), an all -1 row, K = 1, and a peaked row whose only id is the peak."""
    x = make_logits(5, 7, dtype, kind="peaked", seed=3, device="cuda")
    idx = torch.tensor([[3, 1, 3, -1, 1, 6, 0],
                        [0, 1, 2, 3, 4, 5, 6],
                        [-1, -1, -1, -1, -1, -1, -1],
                        [5, 5, 5, 5, 5, 5, 5],
                        [int(x[4].float().argmax())] + [-1] * 6], device="cuda")
    for normalize in ("full", "support"):
        for with_tail in (True, False):
            _check_sparse_logprobs(x, idx, 1.0, normalize, with_tail, what="edge")
            _check_sparse_logprobs(x, idx[:, :1].contiguous(), 1.0, normalize, with_tail,
                                   what="K=1")
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), -1).to(cdt).cuda()
    target = torch.where(idx >= 0, t.gather(1, idx.clamp_min(0)), float("nan"))
    for with_tail in (True, False):
        _check_sparse_kl(x, idx, target, 1.0, with_tail, what="edge")


@gpu_cuda
def test_sparse_strided_inputs_and_int32_ids():
    full = make_logits(6, 1040, torch.bfloat16, seed=5, device="cuda")
    x = full[:, 3:1034]  # row stride != V, rows not 16-byte aligned
    idx = make_indices(x, 33, seed=5, dtype=torch.int32)
    idx_t = idx.t().contiguous().t()  # column-major ids: other strides, same values
    a = _check_sparse_logprobs(x, idx_t, 0.9, "support", True, what="strided")
    b = cs.sparse_logprobs_forward(x.contiguous(), idx.long(), 0.9, "support", True)
    assert all(bit_equal(u, v) for u, v in zip(a[:3], b))


@gpu_cuda
def test_sparse_determinism_and_batch_invariance():
    x = make_logits(9, 50257, torch.bfloat16, seed=11, device="cuda")
    idx = make_indices(x, 64, seed=11)
    target = make_targets(x.cpu(), idx.cpu(), seed=11).cuda()
    a = cs.sparse_logprobs_forward(x, idx, 0.7, "full", True)
    b = cs.sparse_logprobs_forward(x, idx, 0.7, "full", True)
    assert all(bit_equal(u, v) for u, v in zip(a, b))
    g = _slot_grads(idx, 1, torch.float32)
    gt = torch.randn(9, device="cuda")
    ga = cs.sparse_logprobs_backward(g, gt, x, idx, *a, 0.7, "full")
    assert bit_equal(ga, cs.sparse_logprobs_backward(g, gt, x, idx, *a, 0.7, "full"))
    k1 = cs.sparse_kl_forward(x, idx, target, 0.7, True)
    assert all(bit_equal(u, v) for u, v in zip(k1, cs.sparse_kl_forward(x, idx, target, 0.7,
                                                                        True)))
    for r in (0, 4, 8):
        alone = cs.sparse_logprobs_forward(x[r:r + 1].clone(), idx[r:r + 1], 0.7, "full", True)
        assert all(bit_equal(full[r:r + 1], one) for full, one in zip(a, alone)), r


@gpu_cuda
def test_sparse_through_public_op():
    x = make_logits(8, 1031, torch.float32, seed=2, device="cuda").view(2, 4, 1031)
    idx = make_indices(x, 16, seed=2)
    xc = x.clone().requires_grad_(True)
    lp, tail = rlkernels.sparse_logprobs(xc, idx, normalize="support", return_tail=True,
                                         backend="cuda")
    x64 = x.double().requires_grad_(True)
    lp64, tail64 = rlkernels.sparse_logprobs(x64, idx, normalize="support", return_tail=True,
                                             backend="torch")
    assert_values_close(lp, lp64, what="logp")
    assert_values_close(tail, tail64, what="tail")
    w = torch.randn(idx.shape, device="cuda")
    loss = (torch.where(idx >= 0, lp, 0.0) * w).sum() + tail.sum()
    loss64 = (torch.where(idx >= 0, lp64, 0.0) * w.double()).sum() + tail64.sum()
    (g,) = torch.autograd.grad(loss, xc)
    (g64,) = torch.autograd.grad(loss64, x64)
    floor = fp32_floor(x, upstream=_upstream(w.view(-1, 16)) + 1.0)
    assert_grad_close(g, g64, torch.float32, floor, what="grad")


# ==================================== issue 18: hot loops (ex2, chunk-level rescale), strides

def _three_views(dtype, n, vocab, seed, kind="mixed"):
    """The same logits as (contiguous, a row-strided view at a storage offset that breaks
    16-byte alignment, a column-strided view). The strided view is logits[:, 3:3 + V] of a
    wider buffer whose other columns are NaN: any read outside the view poisons the result.
    The column-strided one (a transpose of a transpose) is copied by the launchers."""
    base = make_logits(n, vocab, dtype, kind=kind, seed=seed, device="cuda")
    wide = torch.full((n, vocab + 11), float("nan"), dtype=dtype, device="cuda")
    wide[:, 3:3 + vocab] = base
    sliced = wide[:, 3:3 + vocab]
    col = base.t().contiguous().t()
    assert sliced.stride() == (vocab + 11, 1) and col.stride(0) == 1
    return base, sliced, col


def _all_bit_equal(a, b):
    return all(bit_equal(u, v) for u, v in zip(a, b))


@gpu_cuda
@pytest.mark.parametrize("vocab", [7, 1031, 50257, 151936])
@pytest.mark.parametrize("dtype", LOW_DTYPES + (torch.float64,), ids=str)
def test_strided_views_give_the_same_bits(dtype, vocab):
    # The chunk layout depends on V and the block size only, never on the address, so a
    # row-strided, misaligned view must give bit-identical outputs and gradients, without a
    # copy (the NaN columns around the view would show up) and without reading past its rows.
    n = 6
    base, sliced, col = _three_views(dtype, n, vocab, seed=vocab)
    tok = make_tokens(base, pad_every=4)
    ref = cv.token_logprobs_forward(base, tok, 0.8, -100, True)
    for x in (sliced, col):
        out = cv.token_logprobs_forward(x, tok, 0.8, -100, True)
        assert _all_bit_equal(out, ref)
        g = cv.token_logprobs_backward(out[0] + 1, out[1] - 1, x, tok, out[2], 0.8, -100)
        assert bit_equal(g, cv.token_logprobs_backward(ref[0] + 1, ref[1] - 1, base, tok,
                                                       ref[2], 0.8, -100))
    y = make_logits(n, vocab, dtype, kind="normal", seed=vocab + 1, device="cuda")
    y = torch.where(torch.isinf(base), base, y)
    for kind in ("reverse", "forward", "jsd"):
        kref = cv.kl_divergence_forward(base, y, None, kind, 0.3, 0.9)
        kv = cv.kl_divergence_forward(sliced, y, None, kind, 0.3, 0.9)
        assert _all_bit_equal(kv, kref), kind
        gk = torch.linspace(-1, 1, n, device="cuda", dtype=kv[0].dtype)
        assert _all_bit_equal(
            cv.kl_divergence_backward(gk, sliced, y, None, kv[1], kv[2], kind, 0.3, 0.9, True),
            cv.kl_divergence_backward(gk, base, y, None, kref[1], kref[2], kind, 0.3, 0.9,
                                      True)), kind
    if vocab >= 7:
        idx = make_indices(base, 5, seed=vocab)
        for normalize in ("full", "support"):
            a = cs.sparse_logprobs_forward(base, idx, 0.8, normalize, True)
            b = cs.sparse_logprobs_forward(sliced, idx, 0.8, normalize, True)
            assert _all_bit_equal(a, b), normalize


@gpu_cuda
def test_row_slice_through_the_public_op():
    # logits[:, :-1] (a slice along T) reaches the kernels as a row stride, no copy needed
    x = make_logits(3 * 9, 1031, torch.bfloat16, seed=4, device="cuda").view(3, 9, 1031)
    tok = make_tokens(x.view(-1, 1031), pad_every=5).view(3, 9)
    a = rlkernels.token_logprobs(x[:, :-1], tok[:, 1:], return_entropy=True, backend="cuda")
    b = rlkernels.token_logprobs(x[:, :-1].contiguous(), tok[:, 1:].contiguous(),
                                 return_entropy=True, backend="cuda")
    assert _all_bit_equal(a, b)


@gpu_cuda
@pytest.mark.parametrize("kind", ["masked", "peaked_masked", "flat", "peaked"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_row_kinds_low_precision(dtype, kind):
    # -inf columns (the entropy sum's 0 * -inf case), ties at the maximum (flat rows: every
    # column counts as the maximum), peaked rows (1 - p_max exact), in every storage dtype
    x = make_logits(6, 50257, dtype, kind=kind, seed=21, device="cuda")
    tok = make_tokens(x, pad_every=4)
    _check(x, tok, 1.0)
    _check(x, tok, 0.6)


@gpu_cuda
def test_ties_at_the_maximum_and_peaked_exactness():
    vocab = 1031
    gen = torch.Generator().manual_seed(31)
    x = 3.0 * torch.randn(4, vocab, dtype=torch.float64, generator=gen)
    x[0, [5, 77, 900, 1030]] = 20.0          # four-way tie at the maximum
    x[1] = 0.0                                # every column tied
    x[2, 17] = 40.0 + x[2].max()              # peaked: 1 - p_max ~ 1e-15 relative to 1
    x[3, 3] = 25.0 + x[3].max()
    x32 = x.float().cuda()
    tok = torch.tensor([77, 500, 17, 3], device="cuda")
    lp, h, stats = cv.token_logprobs_forward(x32, tok, 1.0, -100, True)
    lp64, h64, _ = rlkernels.reference.vocab.token_logprobs_forward(x32.double(), tok, 1.0,
                                                                    -100, True)
    assert_values_close(lp, lp64, what="logp")
    assert_values_close(h, h64, what="entropy")
    # peaked rows: logp of the peak, 1 - p_peak and the entropy are ~1e-17; exact means
    # relatively exact. The fp64 reference rounds lse = m + log(1 + 1e-17) to m, so the exact
    # values are formed here from rest = sum_{j != peak} exp(z_j - z_peak) (no cancellation).
    g = cv.token_logprobs_backward(torch.ones(4, device="cuda"), None, x32, tok, stats, 1.0,
                                   -100)
    z = x32.double().cpu()
    for r in (2, 3):
        y = int(tok[r])
        d = z[r] - z[r, y]
        e = torch.exp(d)
        e[y] = 0.0
        rest = float(e.sum())
        lp_exact = -math.log1p(rest)
        h_exact = math.log1p(rest) + float((e * -d).sum()) / (1.0 + rest)
        g_exact = rest / (1.0 + rest)  # d logp_y / d z_y = 1 - p_y
        assert abs(float(lp[r]) / lp_exact - 1) < 1e-4, (r, float(lp[r]), lp_exact)
        assert abs(float(h[r]) / h_exact - 1) < 1e-4, (r, float(h[r]), h_exact)
        assert abs(float(g[r, y]) / g_exact - 1) < 1e-4, (r, float(g[r, y]), g_exact)


@gpu_cuda
def test_zero_upstream_rows_are_not_read():
    # a row whose upstream gradient is exactly 0 gets exactly 0 without reading its logits:
    # NaN logits there give 0, not NaN; the other rows are unchanged
    x = make_logits(6, 1031, torch.bfloat16, seed=6, device="cuda")
    tok = make_tokens(x)
    lp, h, stats = cv.token_logprobs_forward(x, tok, 1.0, -100, True)
    g_lp, g_h = torch.randn_like(lp), torch.randn_like(h)
    g_lp[[1, 4]] = 0.0
    g_h[[1, 4]] = 0.0
    ref = cv.token_logprobs_backward(g_lp, g_h, x, tok, stats, 1.0, -100)
    xn = x.clone()
    xn[[1, 4]] = float("nan")
    g = cv.token_logprobs_backward(g_lp, g_h, xn, tok, stats, 1.0, -100)
    assert (g[[1, 4]] == 0).all() and bit_equal(g, ref)
    y = make_logits(6, 1031, torch.bfloat16, kind="normal", seed=7, device="cuda")
    kl, sp, sq = cv.kl_divergence_forward(x, y, None, "reverse", 0.5, 1.0)
    gk = torch.ones_like(kl)
    gk[2] = 0.0
    ref = cv.kl_divergence_backward(gk, x, y, None, sp, sq, "reverse", 0.5, 1.0, True)
    got = cv.kl_divergence_backward(gk, xn.index_fill(0, torch.tensor([2], device="cuda"),
                                                      float("nan")), y, None, sp, sq,
                                    "reverse", 0.5, 1.0, True)
    assert (got[0][2] == 0).all() and (got[1][2] == 0).all()
    keep = [0, 3, 5]
    assert bit_equal(got[0][keep], ref[0][keep]) and bit_equal(got[1][keep], ref[1][keep])


@gpu_cuda
def test_out_of_range_token_reads_nothing():
    # with debug checks off the launchers take any id: outside [0, V) the row's log-prob is
    # NaN (forward) / it has no one-hot term (backward), nothing outside the row is read
    x = make_logits(4, 1031, torch.float32, seed=8, device="cuda")
    tok = torch.tensor([5, 1031, -7, 2**40], device="cuda")
    lp, h, stats = cv.token_logprobs_forward(x, tok, 1.0, -100, True)
    assert torch.isfinite(lp[0]) and torch.isnan(lp[1:]).all() and torch.isfinite(h).all()
    g = cv.token_logprobs_backward(torch.ones(4, device="cuda"), None, x, tok, stats, 1.0,
                                   -100)
    p = torch.softmax(x.double(), -1)
    torch.testing.assert_close(g[1:].double(), -p[1:], rtol=1e-5, atol=1e-7)


@gpu_cuda
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_kl_one_pass_exact_cases(dtype):
    x = make_logits(6, 50257, dtype, seed=12, device="cuda")
    for kind in ("reverse", "forward"):
        kl, _, _ = cv.kl_divergence_forward(x, x.clone(), None, kind, 0.5, 0.7)
        # p == q: the one-pass form has no O(1) residue (terms cancel pairwise)
        assert float(kl.abs().max()) <= 1e-6, (kind, kl)
    y = x.clone()
    y[0, int(x[0].float().argmax())] = float("-inf")  # q = 0 where p > 0: KL(p || q) = inf
    kl, _, _ = cv.kl_divergence_forward(x, y, None, "reverse", 0.5, 1.0)
    assert kl[0] == float("inf") and torch.isfinite(kl[1:]).all()


@gpu_cuda
def test_sparse_tail_far_below_the_maximum():
    # every column outside the ids 120 below the maximum (beyond fp32's exp2 range relative to
    # it): the kernel's second pass for such rows gives the reference's tail, not -inf
    vocab = 50257
    gen = torch.Generator().manual_seed(32)
    x = torch.randn(3, vocab, dtype=torch.float64, generator=gen) - 120.0
    idx = torch.tensor([[0, 1, 2, 3], [10, 20, 30, -1], [5, 6, 7, 8]])
    for r in range(3):
        ids = idx[r][idx[r] >= 0]
        x[r, ids] = torch.randn(len(ids), dtype=torch.float64, generator=gen)
    x32, idx = x.float().cuda(), idx.cuda()
    for normalize in ("full", "support"):
        _check_sparse_logprobs(x32, idx, 1.0, normalize, True, what="far tail")
    t = torch.log_softmax(x32.double(), -1).gather(1, idx.clamp_min(0)).float()
    t = torch.where(idx >= 0, t, float("nan"))
    _check_sparse_kl(x32, idx, t, 1.0, True, what="far tail")


@gpu_cuda
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_nan_in_a_leading_chunk_reaches_the_row(dtype):
    # a thread's first chunk all NaN, its later chunks finite (a new maximum rebases the
    # running state): the NaN must survive the rebase; other rows stay finite
    x = make_logits(3, 50257, dtype, kind="normal", seed=14, device="cuda")
    x[1, :16] = float("nan")
    tok = torch.tensor([5, 700, 9], device="cuda")
    lp, h, _ = cv.token_logprobs_forward(x, tok, 1.0, -100, True)
    assert torch.isnan(lp[1]) and torch.isnan(h[1])
    assert torch.isfinite(lp[[0, 2]]).all() and torch.isfinite(h[[0, 2]]).all()
    y = make_logits(3, 50257, dtype, kind="normal", seed=15, device="cuda")
    for kind in ("reverse", "forward", "jsd"):
        kl, _, _ = cv.kl_divergence_forward(x, y, None, kind, 0.5, 1.0)
        assert torch.isnan(kl[1]) and torch.isfinite(kl[[0, 2]]).all(), kind
    idx = make_indices(x, 8, seed=14, unused=False)
    lp_s, tail, _ = cs.sparse_logprobs_forward(x, idx, 1.0, "full", True)
    assert torch.isnan(tail[1]) and torch.isnan(lp_s[1]).all()
    assert torch.isfinite(tail[[0, 2]]).all()


@gpu_cuda
def test_kl_more_than_2_31_elements():
    n, vocab = 14200, 151936  # N * V = 2.16e9 > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with >= 24 GiB")
    x = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    kl, _, _ = cv.kl_divergence_forward(x, y, None, "reverse", 0.5, 1.0)
    rows = torch.tensor([0, n // 2, n - 1], device="cuda")
    kl64 = rlkernels.kl_divergence(x[rows].double(), y[rows].double(), backend="torch")
    torch.testing.assert_close(kl[rows].double(), kl64, rtol=1e-5, atol=1e-5)


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
    with pytest.raises(ValueError, match="logits: expected a CUDA tensor .*got list"):
        cv.token_logprobs_forward([1.0], tok, 1.0, -100, False)
    idx = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="logits: expected a CUDA tensor"):
        cs.sparse_logprobs_forward(x, idx, 1.0, "full", False)
    with pytest.raises(ValueError, match="logits: expected a CUDA tensor"):
        cs.sparse_kl_forward(x, idx, torch.zeros(2, 3), 1.0, True)


def test_backend_cuda_on_cpu_tensors_raises():
    with pytest.raises(RuntimeError, match="cuda"):
        rlkernels.token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.int64),
                                 backend="cuda")
