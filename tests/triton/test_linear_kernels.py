"""Kernel-level tests of the fused lm_head kernels (``rlkernels.triton.linear``) for what the
generic backend tests of ``tests/ops/test_linear.py`` do not reach: how the logits are tiled
(row blocks, vocabulary tiles, H chunks) and streamed.

Reference: :mod:`rlkernels.reference.linear` in fp64 on the same (exactly representable)
values. Outputs within ``atol = rtol = 1e-5`` (1e-12 for fp64); gradients within ``(2 + H)
eps(dtype) max|g_ref| + 1e-7`` (the bound the project uses for GEMM-derived logits, see
``tests/ops/test_linear.py::linear_grad_bound``).

On CPU the kernels run in the Triton interpreter with tiny shapes; ``blocks=(BLOCK_N,
BLOCK_V, BLOCK_H)`` forces small tiles. Shapes, each for a reason:

* H = 13, V = 37, N = 15: nothing a multiple of a block (one partial tile of everything);
* H = 40, V = 300, N = 20 with blocks (16, 64, 16): 5 vocabulary tiles (the last has 44
  columns), 3 H chunks (the last has 8), 2 row blocks (the last has 4 rows);
* designed inputs: a bias ramp putting the row max in a later vocabulary tile, one weight row
  scaled up (peaked rows, on the last tile), a bias column at -1e4, padding tokens (one
  padding row of hidden holding NaN: never read), tokens 0 and V - 1.

The ``gpu`` tests (skipped without CUDA) run N = 16384, H = 3584, V = 151936 in bf16: a few
rows against the reference, and the peak extra memory below 1 GiB.
"""

import pytest
import torch

import rlkernels

if rlkernels.available_backends()["triton"] != "ok":
    pytest.skip(f"triton backend unavailable: {rlkernels.available_backends()['triton']}",
                allow_module_level=True)

from rlkernels._policy_options import PolicyOptions  # noqa: E402
from rlkernels.reference import linear as ref  # noqa: E402
from rlkernels.triton import linear as tk  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
F64 = torch.float64
SMALL = (16, 64, 16)  # BLOCK_N, BLOCK_V, BLOCK_H
SHAPES = {"13x37": (15, 13, 37, None), "40x300": (20, 40, 300, SMALL)}


def make(n, h, v, *, seed=0, designed=True, dtype=torch.float32):
    """fp64 tensors holding values exactly representable in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) / h ** 0.5 * 2.0
    bias = 0.5 * torch.randn(v, generator=g, dtype=F64)
    tokens = torch.randint(0, v, (n,), generator=g)
    tokens[1] = -100
    tokens[n - 2] = -100
    if designed:
        bias += torch.linspace(-3.0, 3.0, v, dtype=F64)  # the row max tends to a later tile
        weight[v - 2] *= 4.0  # peaked rows (h . w[V-2] large) on the last tile
        bias[5] = -1e4  # a column with ~0 probability
        tokens[0] = v - 1
        tokens[2] = 0
        tokens[3] = v - 2
        tokens[4] = 5
    hidden, weight, bias = (x.to(dtype).double() for x in (hidden, weight, bias))
    return hidden, weight, bias, tokens


def run_fwd(h, w, b, tok, dtype, t=1.0, ent=True, blocks=None, **kw):
    kw.setdefault("path", "triton")  # this file tests the triton kernels (auto: cuBLAS on GPUs)
    return tk.linear_token_logprobs_forward(h.to(DEV, dtype), w.to(DEV, dtype),
                                            None if b is None else b.to(DEV, dtype),
                                            tok.to(DEV), t, -100, ent, blocks=blocks, **kw)


def run_bwd(g_lp, g_h, h, w, b, tok, stats, dtype, t=1.0, blocks=None, **kw):
    cdt = F64 if dtype == F64 else torch.float32
    kw.setdefault("path", "triton")
    return tk.linear_token_logprobs_backward(
        None if g_lp is None else g_lp.to(DEV, cdt), None if g_h is None else g_h.to(DEV, cdt),
        h.to(DEV, dtype), w.to(DEV, dtype), None if b is None else b.to(DEV, dtype),
        tok.to(DEV), stats, t, -100, blocks=blocks, **kw)


def close_values(out, out_ref, live, dtype):
    tol = 1e-12 if dtype == F64 else 1e-5
    for x, r in zip(out[:2], out_ref[:2]):
        assert x.dtype == (F64 if dtype == F64 else torch.float32)
        torch.testing.assert_close(x.cpu().double(), r, atol=tol, rtol=tol)
    # stats: padding rows are 0 here (never read), arbitrary in the reference
    torch.testing.assert_close(out[2].cpu().double()[live], out_ref[2][live], atol=tol,
                               rtol=tol)
    assert (out[2].cpu()[~live] == 0).all()


def grad_bound(g, g_ref, dim):
    eps = torch.finfo(g.dtype).eps
    tol = (2 + dim) * eps * g_ref.abs().max().item() + 1e-7
    err = (g.cpu().double() - g_ref).abs().max().item()
    assert err <= tol, f"gradient error {err:.3e} > {tol:.3e} ({g.dtype})"


def upstream(n, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(n, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


# ============================================================================ values + grads

def test_designed_inputs_hit_the_cases():
    """The designed rows do what the module docstring says (pure torch, no kernel)."""
    n, dim, v, blocks = SHAPES["40x300"]
    h, w, b, tok = make(n, dim, v)
    z = h @ w.T + b
    p = torch.softmax(z, 1)
    assert (z.argmax(1) >= 2 * blocks[1]).sum() >= n // 2  # the max in a later tile
    assert (p.max(1).values > 0.999).any()  # peaked rows
    assert (z.argmax(1) == v - 2).any()  # peaked on the scaled-up weight row
    assert (p[:, 5] < 1e-300).all()  # the -1e4 bias column



CASES = [
    # (shape, dtype, with_bias, entropy, temperature, designed)
    ("13x37", torch.float32, True, True, 1.0, True),
    ("13x37", torch.float32, False, False, 0.7, False),
    ("13x37", torch.bfloat16, True, True, 0.7, True),
    ("13x37", F64, True, True, 0.7, True),
    ("40x300", torch.float32, True, True, 0.7, True),
    ("40x300", torch.float32, False, True, 1.0, True),
    ("40x300", torch.bfloat16, False, False, 1.0, True),
    ("40x300", torch.bfloat16, True, True, 1.0, False),
    ("40x300", torch.float16, True, True, 0.7, True),
]


@pytest.mark.parametrize("shape,dtype,with_bias,entropy,temperature,designed", CASES,
                         ids=lambda x: str(x).replace("torch.", ""))
def test_matches_reference(shape, dtype, with_bias, entropy, temperature, designed):
    n, dim, v, blocks = SHAPES[shape]
    h, w, b, tok = make(n, dim, v, designed=designed, dtype=dtype)
    b = b if with_bias else None
    live = tok != -100
    out = run_fwd(h, w, b, tok, dtype, temperature, entropy, blocks)
    out_ref = ref.linear_token_logprobs_forward(h, w, b, tok, temperature, -100, entropy)
    close_values(out, out_ref, live, dtype)
    assert (out[0].cpu()[~live] == 0).all() and (out[1].cpu()[~live] == 0).all()
    if not entropy:
        assert (out[1] == 0).all() and (out[2][:, 2] == 0).all()
    g_lp, g_h = upstream(n)
    grads = run_bwd(g_lp, g_h if entropy else None, h, w, b, tok, out[2], dtype, temperature,
                    blocks)
    grads_ref = ref.linear_token_logprobs_backward(g_lp, g_h if entropy else None, h, w, b,
                                                   tok, out_ref[2], temperature, -100)
    assert (grads[2] is None) == (b is None)
    for g, g_r in zip(grads, grads_ref):
        if g is None:
            continue
        assert g.dtype == dtype
        if dtype == F64:
            torch.testing.assert_close(g.cpu(), g_r, atol=1e-12, rtol=1e-10)
        else:
            grad_bound(g, g_r, dim)
    assert (grads[0].cpu()[~live] == 0).all()  # padding rows of d hidden


@pytest.mark.parametrize("split_cols", [64, 128, 1])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_vocabulary_split_forward(split_cols, dtype):
    """The forward over vocabulary splits (5 splits of 64 columns, 3 of 128 with a short last
    one; 1 rounds up to one tile per split) merged by ``_fwd_merge_kernel``: the reference's
    values, and gradients from the merged ``stats``. Columns 64-127 are ``-inf`` (a split of
    only ``-inf`` when splits are 64 wide) and one token sits there (log-prob ``-inf``); the
    designed rows put the max in a later split than the first."""
    n, dim, v, blocks = SHAPES["40x300"]
    h, w, b, tok = make(n, dim, v, seed=9, dtype=dtype)
    b[64:128] = float("-inf")
    tok[6] = 100
    live = tok != -100
    out = run_fwd(h, w, b, tok, dtype, 0.7, True, blocks, split_cols=split_cols)
    out_ref = ref.linear_token_logprobs_forward(h, w, b, tok, 0.7, -100, True)
    assert out[0][6].item() == float("-inf") and out_ref[0][6].item() == float("-inf")
    fin = torch.isfinite(out_ref[0])
    close_values([out[0].cpu()[fin], out[1].cpu()[fin], out[2]],
                 [out_ref[0][fin], out_ref[1][fin], out_ref[2]], live, dtype)
    g_lp, g_h = upstream(n, 9)
    g_lp[6] = 0.0  # d/dz of a -inf log-prob: 0 * inf
    grads = run_bwd(g_lp, g_h, h, w, b, tok, out[2], dtype, 0.7, blocks)
    grads_ref = ref.linear_token_logprobs_backward(g_lp, g_h, h, w, b, tok, out_ref[2], 0.7,
                                                   -100)
    for g, g_r in zip(grads, grads_ref):
        if dtype == F64:
            torch.testing.assert_close(g.cpu(), g_r, atol=1e-12, rtol=1e-10)
        else:
            grad_bound(g, g_r, dim)


def test_merge_kernel_propagates_nan_per_row():
    """``_fwd_merge_kernel`` on hand-made per-split statistics of the logits ``z``: a NaN
    statistic of one row (what a NaN logit gives its split) reaches that row only; the other
    rows get the reference values. (A NaN hidden state cannot be run end to end here: the
    interpreter's arg-max raises on an all-NaN row.)"""
    g = torch.Generator().manual_seed(11)
    n, v, splits = 6, 30, 3
    z = 3.0 * torch.randn(n, v, generator=g, dtype=F64)
    z[2, 10:20] = float("-inf")  # one split of only -inf in row 2
    tok = torch.randint(0, v, (n,), generator=g)
    part = torch.zeros(4, splits, n, dtype=F64)
    for s in range(splits):
        zs = z[:, s * 10:(s + 1) * 10]
        m = zs.amax(1)
        sh = torch.where(m == float("-inf"), 0.0, m)
        e = torch.exp(zs - sh[:, None])
        part[0, s] = m
        part[1, s] = e.sum(1) - (m != float("-inf")).double()  # rest: all but one arg-max
        part[2, s] = torch.where(e > 0, e * (zs - sh[:, None]), 0.0).sum(1)
        held = (tok >= s * 10) & (tok < (s + 1) * 10)
        part[3, s] = torch.where(held, z.gather(1, tok[:, None])[:, 0], 0.0)
    part[1, 1, 4] = float("nan")
    logp, ent, stats = (torch.empty(n, dtype=F64), torch.empty(n, dtype=F64),
                        torch.empty(n, 3, dtype=F64))
    args = [x.to(DEV) for x in (part, tok, logp, ent, stats)]
    with tk.device_guard(args[0]):
        tk._fwd_merge_kernel[(1,)](*args, args[4], n, v, splits, -100, WITH_ENTROPY=True,
                                   EXTRAS=False, IS_FP64=True, CDT=tk.tl.float64, BLOCK=8)
    logp, ent = args[2].cpu(), args[3].cpu()
    lsm = torch.log_softmax(z, 1)
    p = lsm.exp()
    for r in range(n):
        if r == 4:
            assert torch.isnan(logp[r]) and torch.isnan(ent[r])
            continue
        assert abs(logp[r] - lsm[r, tok[r]]) < 1e-12
        assert abs(ent[r] + torch.where(p[r] > 0, p[r] * lsm[r], 0.0).sum()) < 1e-12


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_one_upstream_gradient(which):
    """Backward with only ``grad_logp`` or only ``grad_entropy``."""
    n, dim, v, blocks = SHAPES["40x300"]
    h, w, b, tok = make(n, dim, v, seed=1)
    out = run_fwd(h, w, b, tok, torch.float32, 0.7, True, blocks)
    out_ref = ref.linear_token_logprobs_forward(h, w, b, tok, 0.7, -100, True)
    g_lp, g_h = upstream(n, 1)
    g_lp, g_h = (g_lp, None) if which == "logp" else (None, g_h)
    grads = run_bwd(g_lp, g_h, h, w, b, tok, out[2], torch.float32, 0.7, blocks)
    grads_ref = ref.linear_token_logprobs_backward(g_lp, g_h, h, w, b, tok, out_ref[2], 0.7,
                                                   -100)
    for g, g_r in zip(grads, grads_ref):
        grad_bound(g, g_r, dim)


def test_padding_rows_not_read_and_int32_tokens():
    """A padding row of hidden holding NaN changes nothing (it is never loaded); int32 ids
    give the same bits as int64."""
    n, dim, v, blocks = SHAPES["40x300"]
    h, w, b, tok = make(n, dim, v, seed=2)
    out = run_fwd(h, w, b, tok, torch.float32, 1.0, True, blocks)
    g_lp, g_h = upstream(n, 2)
    grads = run_bwd(g_lp, g_h, h, w, b, tok, out[2], torch.float32, 1.0, blocks)
    h_nan = h.clone()
    h_nan[1] = float("nan")  # tokens[1] is padding
    out_nan = run_fwd(h_nan, w, b, tok.int(), torch.float32, 1.0, True, blocks)
    grads_nan = run_bwd(g_lp, g_h, h_nan, w, b, tok.int(), out_nan[2], torch.float32, 1.0,
                        blocks)
    for x, y in zip(out + grads, out_nan + grads_nan):
        assert torch.equal(x, y)


def test_all_padding_rows():
    n, dim, v, blocks = SHAPES["13x37"]
    h, w, b, tok = make(n, dim, v)
    tok[:] = -100
    out = run_fwd(h, w, b, tok, torch.float32)
    assert all((x == 0).all() for x in out)
    g_lp, g_h = upstream(n)
    grads = run_bwd(g_lp, g_h, h, w, b, tok, out[2], torch.float32)
    assert all((g == 0).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dz_slices_bit_identical(dtype):
    """``d z`` in 64-column slices (5 slices, d hidden accumulated across them) gives the same
    bits as one slice: the slices split the d hidden GEMM's K at multiples of its block."""
    n, dim, v, blocks = SHAPES["40x300"]
    h, w, b, tok = make(n, dim, v, seed=3, dtype=dtype)
    out = run_fwd(h, w, b, tok, dtype, 1.0, True, blocks)
    g_lp, g_h = upstream(n, 3)
    one = run_bwd(g_lp, g_h, h, w, b, tok, out[2], dtype, 1.0, blocks, path="triton")
    many = run_bwd(g_lp, g_h, h, w, b, tok, out[2], dtype, 1.0, blocks, path="triton",
                   dz_bytes=64 * n * 2)
    for x, y in zip(one, many):
        assert torch.equal(x, y)


def test_dz_storage_dtype():
    """``d z`` goes between the backward kernels in bf16 for bf16 (tensor-core GEMMs, fp32's
    range), never in fp16: a loss averaged over 16k tokens on flat rows has ``d z`` ~1e-9,
    below fp16's smallest subnormal (6e-8), and ``d weight`` sums 16k of them."""
    assert tk._dz_dtype(torch.bfloat16) == torch.bfloat16
    assert tk._dz_dtype(torch.float16) == torch.float32
    assert tk._dz_dtype(torch.float32) == torch.float32
    assert tk._dz_dtype(F64) == F64


# ============================================================ determinism, batch invariance

def test_deterministic():
    n, dim, v, blocks = SHAPES["40x300"]
    h, w, b, tok = make(n, dim, v, seed=4)
    g_lp, g_h = upstream(n, 4)
    runs = []
    for _ in range(2):
        out = run_fwd(h, w, b, tok, torch.float32, 0.7, True, blocks)
        runs.append(out + run_bwd(g_lp, g_h, h, w, b, tok, out[2], torch.float32, 0.7, blocks))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_batch_invariant():
    """Each row alone gives the bits it has inside the batch (block sizes never depend on N)."""
    n, dim, v, _ = SHAPES["40x300"]
    h, w, b, tok = make(n, dim, v, seed=5)
    batch = run_fwd(h, w, b, tok, torch.float32, 0.7, True)
    for i in (0, 3, 17, n - 1):
        alone = run_fwd(h[i:i + 1], w, b, tok[i:i + 1], torch.float32, 0.7, True)
        for x, y in zip(batch, alone):
            assert torch.equal(x[i:i + 1], y)


# ========================================================================= linear_grpo_loss

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kw", [dict(), dict(loss="cispo", clip_high=0.28, entropy_coef=0.02,
                                             kl_coef=0.1, agg="seq-mean-token-sum")],
                         ids=["ppo", "cispo-kl-entropy"])
def test_linear_grpo_loss(dtype, kw):
    bsz, t, dim, v = 3, 5, 13, 37
    # plain random rows: a designed token at logit -1e4 has log-prob -1e4, whose fp32 ulp
    # (1e-3) alone moves the ratio exp(logp - old) by 1e-3 (the designed rows are covered
    # by test_matches_reference)
    h, w, b, tok = make(bsz * t, dim, v, seed=6, designed=False, dtype=dtype)
    tok = tok.view(bsz, t)
    g = torch.Generator().manual_seed(7)
    lp_ref = ref.linear_token_logprobs_forward(h, w, b, tok.reshape(-1), 0.8, -100, False)[0]
    old = torch.where(tok == -100, 0.0,
                      lp_ref.view(bsz, t) + 0.3 * torch.randn(bsz, t, generator=g, dtype=F64))
    old = old.float()
    adv = torch.randn(bsz, generator=g).float()
    mask = (torch.rand(bsz, t, generator=g) > 0.2) | (torch.arange(t) == 0)
    ref_logp = (old + 0.2 * torch.randn(bsz, t, generator=g)).float()
    o = PolicyOptions.from_kwargs(**kw)
    ref_in = ref_logp if o.kl_coef else None
    args = (tok, old, adv, mask, None, ref_in, None, 0.8, o)
    out = tk.linear_grpo_loss_forward(h.to(DEV, dtype), w.to(DEV, dtype), b.to(DEV, dtype),
                                      *[x.to(DEV) if isinstance(x, torch.Tensor) else x
                                        for x in args])
    out_ref = ref.linear_grpo_loss_forward(h, w, b, tok, old.double(), adv.double(), mask,
                                           None, None if ref_in is None else ref_in.double(),
                                           None, 0.8, o)
    loss, metrics = out[0].cpu(), out[1].cpu()
    torch.testing.assert_close(loss.double(), out_ref[0].double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics.double(), out_ref[1].double(), atol=1e-5, rtol=1e-5)
    grad_loss = torch.ones((), dtype=out[0].dtype, device=DEV)
    grads = tk.linear_grpo_loss_backward(
        grad_loss, h.to(DEV, dtype), w.to(DEV, dtype), b.to(DEV, dtype), tok.to(DEV),
        old.to(DEV), adv.to(DEV), mask.to(DEV), None,
        None if ref_in is None else ref_in.to(DEV), None, *out[2:], 0.8, o)
    grads_ref = ref.linear_grpo_loss_backward(
        torch.ones((), dtype=F64), h, w, b, tok, old.double(), adv.double(), mask, None,
        None if ref_in is None else ref_in.double(), None, *out_ref[2:], 0.8, o)
    for gr, g_r in zip(grads, grads_ref):
        assert gr.dtype == dtype
        grad_bound(gr, g_r, dim)
    assert (grads[0].cpu()[tok.reshape(-1) == -100] == 0).all()


# ======================================================================================= gpu

def _gpu_inputs(n=16384, dim=3584, v=151936):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, dim, generator=g, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(v, dim, generator=g, device="cuda") / dim ** 0.5 * 2.0).bfloat16()
    tok = torch.randint(0, v, (n,), generator=g, device="cuda")
    tok[::97] = -100
    return h, w, tok


@pytest.mark.gpu
def test_gpu_large_rows_match_reference():
    h, w, tok = _gpu_inputs()
    out = tk.linear_token_logprobs_forward(h, w, None, tok, 1.0, -100, True)
    rows = torch.tensor([0, 1, 97, 5000, 16383], device="cuda")
    out_ref = ref.linear_token_logprobs_forward(h[rows].double(), w.double(), None, tok[rows],
                                                1.0, -100, True)
    for x, r in zip(out[:2], out_ref[:2]):
        torch.testing.assert_close(x[rows].double(), r, atol=1e-4, rtol=1e-4)
    g_lp = torch.randn(h.shape[0], device="cuda")
    g_h = torch.randn(h.shape[0], device="cuda")
    gh, gw, _ = tk.linear_token_logprobs_backward(g_lp, g_h, h, w, None, tok, out[2], 1.0, -100)
    # d hidden of a row depends on that row only
    gh_ref = ref.linear_token_logprobs_backward(g_lp[rows], g_h[rows], h[rows].float(),
                                                w.float(), None, tok[rows],
                                                out[2][rows].float(), 1.0, -100)[0]
    eps = torch.finfo(torch.bfloat16).eps
    err = (gh[rows].float() - gh_ref).abs().max().item()
    assert err <= 2 * eps * gh_ref.abs().max().item() + 1e-6
    assert torch.isfinite(gw).all()


@pytest.mark.gpu
def test_gpu_peak_memory_under_1gib():
    h, w, tok = _gpu_inputs()
    g_lp = torch.randn(h.shape[0], device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = tk.linear_token_logprobs_forward(h, w, None, tok, 1.0, -100, True)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2 ** 30
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = tk.linear_token_logprobs_backward(g_lp, None, h, w, None, tok, out[2], 1.0, -100)
    torch.cuda.synchronize()
    outputs = sum(g.numel() * g.element_size() for g in grads if g is not None)
    assert torch.cuda.max_memory_allocated() - base - outputs < 2 ** 30


@pytest.mark.gpu
def test_gpu_deterministic_and_batch_invariant():
    h, w, tok = _gpu_inputs(n=4096)
    a = tk.linear_token_logprobs_forward(h, w, None, tok, 1.0, -100, True)
    b = tk.linear_token_logprobs_forward(h, w, None, tok, 1.0, -100, True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for i in (0, 1234, 4095):
        alone = tk.linear_token_logprobs_forward(h[i:i + 1], w, None, tok[i:i + 1], 1.0, -100,
                                                 True)
        assert all(torch.equal(x[i:i + 1], y) for x, y in zip(a, alone))


def test_unknown_path_and_head_precision_named_in_error():
    n, dim, v, blocks = SHAPES["13x37"]
    h, w, b, tok = make(n, dim, v)
    out = run_fwd(h, w, b, tok, torch.float32)
    g_lp, _ = upstream(n)
    with pytest.raises(ValueError, match=r"path: expected one of \('auto', 'triton', "
                                         r"'cublas'\), got 'cutlass'"):
        run_bwd(g_lp, None, h, w, b, tok, out[2], torch.float32, path="cutlass")
    with pytest.raises(ValueError, match=r"head_precision: expected None or one of "
                                         r"\('bf16', 'tf32', 'fp32'\), got 'fp8'"):
        run_fwd(h, w, b, tok, torch.float32, head_precision="fp8")


# ============================================== pre-softmax map + extra statistics (the TRL head)

def check_extras(extra, extra_ref, z_ref, live, dtype):
    """``extra = (log sum p^2, mean z, is_top1)`` against the reference; ``is_top1`` only on
    rows whose top two logits differ by more than the compute dtype's rounding (a closer pair
    is a tie in fp32, and ties go to the first column)."""
    tol = 1e-12 if dtype == F64 else 1e-5
    x = extra.cpu().double()
    torch.testing.assert_close(x[:, :2], extra_ref[:, :2], atol=tol, rtol=tol)
    top2 = z_ref.topk(2, 1).values
    clear = live & (top2[:, 0] - top2[:, 1] > 1e-4 * top2[:, 0].abs().clamp(min=1))
    assert torch.equal(x[clear, 2], extra_ref[clear, 2])
    assert set(x[:, 2].tolist()) <= {0.0, 1.0}
    assert (x[~live] == 0).all()


MAP_CASES = [
    # (shape, dtype, logit_scale, softcap, split_cols)
    ("13x37", torch.float32, 1.0, None, None),  # extras only
    ("13x37", F64, 0.7, 2.5, None),  # Gemma-like soft cap, fp64 exactness of the map
    ("40x300", torch.float32, 1.3, 3.0, None),  # 5 vocabulary tiles
    ("40x300", torch.float32, 0.5, None, 64),  # scale only, 5 splits merged
    ("40x300", F64, 1.3, 3.0, 64),
]


@pytest.mark.parametrize("shape,dtype,scale,softcap,split_cols", MAP_CASES,
                         ids=lambda x: str(x).replace("torch.", ""))
def test_stats_map_and_extras_match_reference(shape, dtype, scale, softcap, split_cols):
    """``linear_token_stats_forward`` / ``_backward`` with a pre-softmax map and the extra
    statistics against the fp64 reference: values (``log sum p^2``, mean logit, arg-max hit)
    with and without vocabulary splits, and gradients chained through the map."""
    n, dim, v, blocks = SHAPES[shape]
    h, w, b, tok = make(n, dim, v, seed=3, dtype=dtype)
    z_ref = ref._head_map(h @ w.T + b, scale, softcap)[0] / 0.7
    tok[5:8] = z_ref[5:8].argmax(1)  # rows whose token is the top-1
    live = tok != -100
    out = tk.linear_token_stats_forward(h.to(DEV, dtype), w.to(DEV, dtype), b.to(DEV, dtype),
                                        tok.to(DEV), 0.7, -100, True, scale, softcap, True,
                                        blocks=blocks, split_cols=split_cols)
    out_ref = ref.linear_token_stats_forward(h, w, b, tok, 0.7, -100, True, scale, softcap,
                                             True)
    close_values(out, out_ref, live, dtype)
    check_extras(out[3], out_ref[3], z_ref, live, dtype)
    assert (out_ref[3][5:8, 2] == 1).all()
    g_lp, g_h = upstream(n, 3)
    grads = tk.linear_token_stats_backward(
        g_lp.to(DEV, out[0].dtype), g_h.to(DEV, out[0].dtype), h.to(DEV, dtype),
        w.to(DEV, dtype), b.to(DEV, dtype), tok.to(DEV), out[2], 0.7, -100, scale, softcap,
        blocks=blocks)
    grads_ref = ref.linear_token_stats_backward(g_lp, g_h, h, w, b, tok, out_ref[2], 0.7, -100,
                                                scale, softcap)
    for g, g_r in zip(grads, grads_ref):
        if dtype == F64:
            torch.testing.assert_close(g.cpu(), g_r, atol=1e-12, rtol=1e-10)
        else:
            grad_bound(g, g_r, dim)


@pytest.mark.parametrize("split_cols", [None, 64])
def test_is_top1_ties_go_to_the_first_column(split_cols):
    """Weight row 200 duplicates row 10 (different vocabulary tiles, and splits when 64 wide):
    a row peaked on them has its arg-max at 10, so token 10 is a top-1 hit and token 200 is
    not; likewise the -inf split (64-127 when 64 wide) must not own the row."""
    n, dim, v, blocks = SHAPES["40x300"]
    h, w, b, tok = make(n, dim, v, seed=5, designed=False)
    b[64:128] = float("-inf")
    # small integers: h[0] . w[10] is exact in any GEMM, so columns 10 and 200 tie exactly
    w[10] = w[200] = torch.randint(-2, 3, (dim,), generator=torch.Generator().manual_seed(5))
    b[10] = b[200] = 0.5
    h[0] = h[3] = w[10]
    tok[0], tok[3] = 10, 200
    extra = tk.linear_token_stats_forward(h.to(DEV, torch.float32), w.to(DEV, torch.float32),
                                          b.to(DEV, torch.float32), tok.to(DEV), 1.0, -100,
                                          False, 1.0, None, True, blocks=blocks,
                                          split_cols=split_cols)[3].cpu()
    extra_ref = ref.linear_token_stats_forward(h, w, b, tok, 1.0, -100, False, 1.0, None,
                                               True)[3]
    assert extra[0, 2] == 1.0 and extra[3, 2] == 0.0
    assert extra_ref[0, 2] == 1.0 and extra_ref[3, 2] == 0.0
    assert (extra[tok != -100, 1] == float("-inf")).all()  # the mean of a row with -inf


def test_default_path_has_no_map_or_extras():
    """The public forward compiles the kernels without the map and the extra statistics
    (``MAP=0``, ``EXTRAS=False``), so the default path does no extra work."""
    seen = []
    orig = tk._fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.append((kw["MAP"], kw["EXTRAS"]))
                return orig[grid](*a, **kw)
            return launch
    n, dim, v, blocks = SHAPES["13x37"]
    h, w, b, tok = make(n, dim, v)
    tk._fwd_kernel = Spy()
    try:
        run_fwd(h, w, b, tok, torch.float32, 1.0, True, blocks)
    finally:
        tk._fwd_kernel = orig
    assert seen == [(0, False)]
