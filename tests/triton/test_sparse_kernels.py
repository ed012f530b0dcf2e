"""The Triton kernels of ``sparse_logprobs`` and ``sparse_kl`` against the ``torch`` reference.

The launchers of ``rlkernels/triton/sparse.py`` are called directly (the same arguments as
``rlkernels.reference.sparse.sparse_*``) and compared with the reference functions evaluated in
fp64 on the same input values (SPEC section 5):

* per-token outputs (log-probs, tail, KL, the row statistics): ``atol = rtol = 1e-5`` for
  fp32/bf16 logits, ``1e-12`` for fp64 logits (both sides compute in fp64 there);
* gradients: ``|g - g_ref| <= 2 eps(dtype) max|g_ref| + 1e-7``, plus for fp32 logits the
  floor of fp32 arithmetic the other vocabulary tests use (``_naive.fp32_floor``:
  ``eps(fp32) (max|z| + log V) upstream / T``). Why the floor: ``z = x / T`` and ``z - m`` are
  rounded in fp32 to ``eps |z|``, which is a relative error of every ``p``; with logits of
  magnitude 20-40 (the peaked rows) or ``T = 0.7`` that exceeds ``2 eps max|g|`` for any fp32
  implementation, including the reference run in fp32. The cases built to show the exact
  rewrites of the cancelling differences (``1 - p`` on a peak, ``q - p`` outside the ids) use
  the bare SPEC bound (``spec_only``), on rows where ``z - m`` is exact.

Shapes are small (interpreter): V=7 (one partial block), V=1000 with 256-column blocks (four
blocks, the last partial), V=2999 with the default 1024 (three blocks, odd V). GPU-only cases
(``@pytest.mark.gpu``) cover V=151936 at N=16384 (N*V > 2^31).
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import _naive as naive  # noqa: E402  (tests/ on sys.path: conftest)
from _naive import bit_equal, fp32_floor, make_indices, make_logits, make_targets  # noqa: E402
from rlkernels.reference import sparse as ref  # noqa: E402

if not torch.cuda.is_available():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from rlkernels.triton import sparse as sp  # noqa: E402

# where() evaluates both branches: the interpreter's numpy warns about the unused 0 * inf
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NEG_INF = float("-inf")

# (V, K, block_v, T): each for a reason
SHAPES = [
    (7, 4, None, 1.0),      # V < BLOCK_V: one partial block
    (1000, 20, 256, 0.7),   # several blocks, the last partial; T = 0.7
    (2999, 20, None, 1.0),  # the default block, odd V
]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# every dtype on every shape, but fp64 (exact inputs, tight tolerance) only on the two small
# ones: the interpreter is slow
CASES = [pytest.param(d, s, id=f"{str(d).split('.')[-1]}-V{s[0]}")
         for d in DTYPES for s in SHAPES if not (d == torch.float64 and s[0] > 1000)]
CASES.append(pytest.param(torch.float16, SHAPES[1], id="float16-V1000"))


# ================================================================================= helpers

def _cdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _assert_values(out, expect, dtype, what):
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.dtype == _cdt(dtype), f"{what}: dtype {out.dtype}"
    assert out.shape == expect.shape, f"{what}: shape {tuple(out.shape)}"
    torch.testing.assert_close(out.double().cpu(), expect.double().cpu(), atol=tol, rtol=tol,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _assert_stats(stats, expect, dtype, what):
    """``(m, log s, 0)`` per row (-inf and NaN must match exactly)."""
    _assert_values(stats, expect, dtype, f"{what} stats")
    assert (stats[:, 2] == 0).all()


def _assert_grad(g, g_ref, dtype, x, temperature, upstream, what, spec_only=False):
    assert g.dtype == dtype and g.shape == g_ref.shape, f"{what}: {g.dtype} {tuple(g.shape)}"
    g64, r64 = g.double().cpu(), g_ref.double().cpu()
    assert torch.isfinite(r64).all(), f"{what}: non-finite reference gradient"
    assert torch.isfinite(g64).all(), f"{what}: non-finite gradient"
    m = float(r64.abs().max()) if r64.numel() else 0.0
    if dtype == torch.float64:
        tol = 64 * torch.finfo(torch.float64).eps * (m + 1.0)
    else:
        tol = 2 * torch.finfo(dtype).eps * m + 1e-7
        if dtype == torch.float32 and not spec_only:
            tol += fp32_floor(x, temperature=temperature, upstream=upstream)
    err = float((g64 - r64).abs().max()) if g64.numel() else 0.0
    assert err <= tol, f"{what}: max |g - g_ref| = {err:.3e} > {tol:.3e} ({dtype})"


def _weights(shape, seed, dtype, nan_where=None):
    """Random upstream gradients; NaN at ``nan_where`` (slots that must never be read)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if nan_where is not None:
        w = torch.where(nan_where.cpu(), float("nan"), w)
    return w.to(DEV)


def _upstream(*ws):
    total = 0.0
    for w in ws:
        a = torch.nan_to_num(w.double().abs(), nan=0.0)
        a = a.sum(-1) if a.dim() == 2 else a
        total += float(a.max()) if a.numel() else 0.0
    return total


def check_logprobs(x, idx, temperature, normalize, with_tail, block_v=None, what="",
                   spec_only=False, g=None, gt=None):
    """Forward values and backward gradients of the launchers vs the fp64 reference; returns
    the launchers' outputs."""
    dtype = x.dtype
    cdt = _cdt(dtype)
    what = f"{what} {dtype} {normalize} tail={with_tail} T={temperature}"
    lp, tail, stats = sp.sparse_logprobs_forward(x, idx, temperature, normalize, with_tail,
                                                 block_v=block_v)
    x64 = x.double()
    lp_r, tail_r, stats_r = ref.sparse_logprobs_forward(x64, idx, temperature, normalize,
                                                        with_tail)
    _assert_values(lp, lp_r, dtype, f"{what} logp")
    _assert_values(tail, tail_r, dtype, f"{what} tail")
    _assert_stats(stats, stats_r, dtype, what)
    assert (lp[idx < 0] == NEG_INF).all(), "unused slots give -inf"

    if g is None:
        g = _weights(idx.shape, 7, cdt, nan_where=idx < 0)  # NaN at unused slots: not read
    if gt is None and with_tail:
        gt = _weights(idx.shape[:1], 8, cdt)
    gt = gt if with_tail else None
    grad = sp.sparse_logprobs_backward(g, gt, x, idx, lp, tail, stats, temperature, normalize,
                                       block_v=block_v)
    grad_r = ref.sparse_logprobs_backward(g.double(), None if gt is None else gt.double(), x64,
                                          idx, lp_r, tail_r, stats_r, temperature, normalize)
    up = _upstream(torch.where(idx >= 0, g, 0.0)) + (0.0 if gt is None else _upstream(gt))
    _assert_grad(grad, grad_r, dtype, x, temperature, up, f"{what} grad", spec_only)
    return lp, tail, stats, grad


def check_kl(x, idx, target, temperature, with_tail, block_v=None, what="", g=None):
    dtype = x.dtype
    cdt = _cdt(dtype)
    what = f"{what} {dtype} kl tail={with_tail} T={temperature}"
    kl, s_tail, stats = sp.sparse_kl_forward(x, idx, target, temperature, with_tail,
                                             block_v=block_v)
    x64 = x.double()
    kl_r, s_tail_r, stats_r = ref.sparse_kl_forward(x64, idx, target, temperature, with_tail)
    _assert_values(kl, kl_r, dtype, f"{what} kl")
    _assert_values(s_tail, s_tail_r, dtype, f"{what} s_tail")
    _assert_stats(stats, stats_r, dtype, what)
    if g is None:
        g = _weights(idx.shape[:1], 9, cdt)
    grad = sp.sparse_kl_backward(g, x, idx, target, s_tail, stats, temperature, with_tail,
                                 block_v=block_v)
    grad_r = ref.sparse_kl_backward(g.double(), x64, idx, target, s_tail_r, stats_r,
                                    temperature, with_tail)
    _assert_grad(grad, grad_r, dtype, x, temperature, _upstream(g), f"{what} grad")
    return kl, s_tail, stats, grad


def _logits(n, vocab, dtype, seed, **kw):
    return make_logits(n, vocab, dtype, seed=seed, device=DEV, **kw)


# ============================================================================ main sweeps

@pytest.mark.parametrize("normalize", ["full", "support"])
@pytest.mark.parametrize("dtype, shape", CASES)
def test_sparse_logprobs_matches_reference(dtype, shape, normalize):
    """Mixed rows (normal, peaked +20..40, flat, a third of the columns -inf), every other row
    with a -1 slot; with and without the tail on the same inputs."""
    vocab, k, block_v, temperature = shape
    x = _logits(4, vocab, dtype, seed=vocab)
    idx = make_indices(x, k, seed=vocab)
    for with_tail in (True, False):
        check_logprobs(x, idx, temperature, normalize, with_tail, block_v, what=f"V={vocab}")


@pytest.mark.parametrize("dtype, shape", CASES)
def test_sparse_kl_matches_reference(dtype, shape):
    """Random teacher; NaN targets in the -1 slots (never read)."""
    vocab, k, block_v, temperature = shape
    x = _logits(4, vocab, dtype, seed=100 + vocab)
    idx = make_indices(x, k, seed=vocab)
    target = make_targets(x, idx, seed=vocab, dtype=_cdt(dtype)).to(DEV)
    assert target[idx < 0].isnan().all()
    for with_tail in (True, False):
        check_kl(x, idx, target, temperature, with_tail, block_v, what=f"V={vocab}")


@settings(max_examples=8, deadline=None, derandomize=True)
@given(n=st.integers(1, 3), vocab=st.integers(1, 300), k=st.integers(1, 12),
       log_block=st.integers(4, 9), seed=st.integers(0, 2 ** 16),
       normalize=st.sampled_from(["full", "support"]))
def test_random_shapes_and_ids(n, vocab, k, log_block, seed, normalize):
    """Random shapes, block sizes and ids: repeated ids, -1 slots and -inf columns at random."""
    gen = torch.Generator().manual_seed(seed)
    x = _logits(n, vocab, torch.float32, seed=seed)
    idx = torch.randint(-1, vocab, (n, k), generator=gen).to(DEV)
    check_logprobs(x, idx, 0.7, normalize, True, block_v=2 ** log_block, what="random")
    target = torch.log_softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64), -1)
    target = target.gather(1, idx.cpu().clamp_min(0)).float().to(DEV)
    check_kl(x, idx, target, 1.0, True, block_v=2 ** log_block, what="random")


# ===================================================================== row and block shapes

def _block_rows(dtype):
    """V=640 in 128-column blocks (5 blocks): where the max is, and ties."""
    vocab = 640
    g = torch.Generator().manual_seed(5)
    base = torch.randn(vocab, generator=g, dtype=torch.float64)
    rows = [
        torch.linspace(-5, 5, vocab, dtype=torch.float64),   # a new max in every block
        torch.linspace(5, -5, vocab, dtype=torch.float64),   # the max in the first block
        base.clone(),
        base.clone(),
        torch.full((vocab,), 1.5, dtype=torch.float64),      # flat: ties everywhere
        base.clone(),
    ]
    rows[2][-3] = 31.0                                       # peaked, in the last block
    rows[3][5], rows[3][600] = 4.0 + 25, 4.0 + 25            # the max twice, far apart
    rows[5][[10, 200, 639]] = NEG_INF                        # -inf columns
    x = torch.stack(rows).to(dtype).to(DEV)
    idx = torch.tensor([[639, 0, 300, -1],
                        [0, 1, 2, 3],
                        [637, 5, 130, 131],
                        [5, 600, -1, -1],
                        [0, 128, 256, 639],
                        [10, 200, 639, 3]], device=DEV)      # ids at -inf columns
    return x, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_max_position_ties_and_masked_ids(dtype):
    x, idx = _block_rows(dtype)
    for normalize in ("full", "support"):
        check_logprobs(x, idx, 1.0, normalize, True, block_v=128, what="block rows")
    target = make_targets(x, idx, seed=3, dtype=_cdt(dtype)).to(DEV)
    check_kl(x, idx, target, 0.7, True, block_v=128, what="block rows")
    # the row statistics do not depend on the block size beyond rounding
    _, _, s128 = sp.sparse_logprobs_forward(x, idx, 1.0, "full", True, block_v=128)
    _, _, s1024 = sp.sparse_logprobs_forward(x, idx, 1.0, "full", True, block_v=1024)
    assert torch.equal(s128[:, 0], s1024[:, 0])
    _assert_values(s128, s1024, dtype, "block sizes")


def test_only_ids_finite():
    """The ids hold every finite column (but not every column): tail -inf; the KL tail bucket
    is then inf when the teacher puts mass outside (as in the reference), and its gradient
    finite. (A teacher mass of 1 up to rounding would make either answer right.)"""
    x = torch.full((2, 9), NEG_INF, device=DEV)
    x[:, [1, 4, 6]] = torch.tensor([0.5, -1.0, 2.0], device=DEV)
    idx = torch.tensor([[1, 4, 6], [6, 4, 1]], device=DEV)
    lp, tail, _, _ = check_logprobs(x, idx, 1.0, "full", True, what="only ids finite")
    assert (tail == NEG_INF).all()
    target = torch.log(torch.tensor([[0.2, 0.3, 0.4], [0.5, 0.25, 0.2]], device=DEV))
    kl = check_kl(x, idx, target, 1.0, True, what="only ids finite")[0]
    assert (kl == math.inf).all()


# ====================================================================== ids: -1, duplicates

@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64], ids=str)
def test_unused_and_duplicate_ids(idx_dtype):
    x = _logits(4, 7, torch.float32, seed=21, center=True)
    idx = torch.tensor([[0, 3, 3, -1], [-1, -1, -1, -1], [6, 5, 4, 3], [2, 2, 2, 2]],
                       device=DEV, dtype=idx_dtype)
    for normalize in ("full", "support"):
        lp, tail, _, _ = check_logprobs(x, idx, 1.0, normalize, True, what="dup")
        assert lp[0, 1] == lp[0, 2] and lp[0, 3] == NEG_INF and (lp[1] == NEG_INF).all()
        assert lp[3, 0] == lp[3, 3]
        assert tail[1] == 0.0  # nothing taken out of the row
    # the tail counts a repeated id once
    torch.testing.assert_close(tail.double().cpu(), naive.log1m_sum(x.double().cpu(),
                                                                     idx.cpu()),
                               atol=1e-5, rtol=1e-5)
    target = torch.log(torch.tensor([[0.1, 0.2, 0.2, 0.5], [0.3, 0.3, 0.3, 0.1],
                                     [0.2, 0.2, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]],
                                    device=DEV))
    target[idx < 0] = float("nan")
    for with_tail in (True, False):
        check_kl(x, idx, target, 1.0, with_tail, what="dup")


def test_duplicate_ids_across_id_chunks(monkeypatch):
    """The backward rewrites the id columns from the sorted ids KF at a time: a run of one
    repeated id that spans several chunks (and ids on both sides of it) sums every slot of
    the run, whichever chunk its position is in."""
    monkeypatch.setattr(sp, "_MAX_BLOCK_K", 16)
    x = _logits(3, 200, torch.float32, seed=31, kind="normal")
    idx = torch.randint(0, 200, (3, 60), generator=torch.Generator().manual_seed(31)).to(DEV)
    idx[:, 10:45] = 17          # a run of 35 equal sorted ids: three 16-id chunks
    idx[1, 50:] = -1
    idx[2, :] = 5               # every slot the same column
    for normalize in ("full", "support"):
        check_logprobs(x, idx, 1.0, normalize, True, block_v=64, what="dup chunks")
        check_logprobs(x, idx, 1.0, normalize, False, block_v=64, what="dup chunks")
    target = make_targets(x, idx, seed=5).to(DEV)
    for with_tail in (True, False):
        check_kl(x, idx, target, 1.0, with_tail, block_v=64, what="dup chunks")


def test_int32_and_int64_indices_agree_bitwise():
    x = _logits(4, 300, torch.bfloat16, seed=22)
    idx = make_indices(x, 9, seed=1)
    target = make_targets(x, idx, seed=1).to(DEV)
    g = _weights(idx.shape, 1, torch.float32)
    gt = _weights(idx.shape[:1], 2, torch.float32)
    a, b = idx, idx.to(torch.int32)
    for normalize in ("full", "support"):
        fa = sp.sparse_logprobs_forward(x, a, 0.7, normalize, True)
        fb = sp.sparse_logprobs_forward(x, b, 0.7, normalize, True)
        assert all(bit_equal(u, v) for u, v in zip(fa, fb))
        assert bit_equal(sp.sparse_logprobs_backward(g, gt, x, a, *fa, 0.7, normalize),
                         sp.sparse_logprobs_backward(g, gt, x, b, *fb, 0.7, normalize))
    ka = sp.sparse_kl_forward(x, a, target, 0.7, True)
    kb = sp.sparse_kl_forward(x, b, target, 0.7, True)
    assert all(bit_equal(u, v) for u, v in zip(ka, kb))
    assert bit_equal(sp.sparse_kl_backward(gt, x, a, target, ka[1], ka[2], 0.7, True),
                     sp.sparse_kl_backward(gt, x, b, target, kb[1], kb[2], 0.7, True))


# ================================================================== ids covering everything

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ids_cover_every_column(dtype):
    """tail = -inf (also with a -inf column among the ids); sparse_kl's tail bucket is 0 even
    though fp32 teacher log-probs sum to 1 - 6e-8 there; gradients finite."""
    x = _logits(3, 7, dtype, seed=23)
    x[1, 4] = NEG_INF
    idx = torch.stack([torch.arange(7), torch.arange(6, -1, -1),
                       torch.tensor([0, 1, 2, 3, 4, 5, 6])]).to(DEV)
    idx = torch.cat([idx, torch.full((3, 1), -1, device=DEV)], dim=1)  # and a -1 slot
    for normalize in ("full", "support"):
        _, tail, _, _ = check_logprobs(x, idx, 1.0, normalize, True, what="cover")
        assert (tail == NEG_INF).all()
    tgt = torch.log_softmax(torch.arange(7, dtype=torch.float64) / 9, -1).float()
    if dtype == torch.float32:
        assert float(tgt.exp().sum()) < 1.0  # the rounding this case is about
    target = torch.cat([tgt, torch.tensor([float("nan")])]).expand(3, 8).contiguous()
    target = target.to(_cdt(dtype)).to(DEV)
    kl, _, _, _ = check_kl(x, idx, target, 1.0, True, what="cover")
    assert torch.isfinite(kl[[0, 2]]).all()  # row 1: teacher mass on a student -inf column
    assert kl[1] == math.inf
    kl_no_tail = sp.sparse_kl_forward(x, idx, target, 1.0, False)[0]
    assert torch.equal(kl, kl_no_tail)


# ============================================================== exact rewrites (bare SPEC)

def test_peak_on_the_only_id_meets_the_spec_bound():
    """K = 1 at the peak of a centered peaked row: d logp / dz at the peak is g (1 - p) with
    1 - p ~ 1e-10; ``g - p g`` in fp32 would be off by eps * g. Bare SPEC bound."""
    x = _logits(4, 1000, torch.float32, seed=24, kind="peaked", center=True)
    idx = x.argmax(-1, keepdim=True)
    g = torch.full(idx.shape, 4.0, device=DEV)
    _, _, _, grad = check_logprobs(x, idx, 1.0, "full", False, block_v=256, g=g,
                                   what="peak id", spec_only=True)
    assert (grad.gather(1, idx) > 0).all()  # the tiny positive 1 - p survives
    # support over a pair with s = (1 - ~1e-5, ~1e-5): g_1 - s_1 G = g_1 (1 - s_1) for g_2 = 0
    pair = x.clone()
    rows = torch.arange(4, device=DEV)
    second = (idx[:, 0] + 1) % 1000
    pair[rows, second] = torch.tensor([-11.5, -10.25, -12.75, -11.0], device=DEV)
    idx2 = torch.stack([idx[:, 0], second], dim=1)
    g2 = torch.tensor([[4.0, 0.0]], device=DEV).expand(4, 2).contiguous()
    check_logprobs(pair, idx2, 1.0, "support", False, block_v=256, g=g2, what="peak pair",
                   spec_only=True)


def test_tail_gradient_outside_a_peak_meets_the_spec_bound():
    """A peak at 0 outside the ids, five ids at -12 (mass ~3e-5), the rest near -20: on the
    outside columns the tail gradient is ``q - p = p expm1(-tail)`` ~ 3e-5 at the peak, where
    ``q - p`` from two fp32 values ~1 would be off by eps. Bare SPEC bound."""
    g = torch.Generator().manual_seed(25)
    x = torch.randn(4, 1000, generator=g, dtype=torch.float64) - 20.0
    x[:, 7] = 0.0
    idx = torch.tensor([[100, 200, 300, 400, 500]]).expand(4, 5).contiguous()
    x.scatter_(1, idx, -12.0)
    x, idx = x.float().to(DEV), idx.to(DEV)
    gt = torch.full((4,), 4.0, device=DEV)
    _, tail, _, _ = check_logprobs(x, idx, 1.0, "full", True, block_v=256, gt=gt,
                                   g=torch.zeros(idx.shape, device=DEV),
                                   what="tail near 0", spec_only=True)
    assert (tail < -1e-5).all() and (tail > -1e-4).all()


def test_outside_mass_below_the_fp32_range():
    """The ids hold the peak, the columns outside have a mass of e^-50 .. e^-133 (below the
    fp32 range of p = exp(log p)): tail finite, gradients finite (q = exp(log p - tail) <= 1
    is used on the outside columns, never p exp(-tail), which overflows)."""
    x = torch.tensor([[0.0, -40.0, -41.0], [0.0, -15.0, -30.0], [-35.0, 0.0, -36.0]],
                     device=DEV)
    idx = torch.tensor([[0], [0], [1]], device=DEV)
    for temperature in (1.0, 0.3):
        _, tail, _, _ = check_logprobs(x, idx, temperature, "full", True, what="tiny tail")
        assert torch.isfinite(tail).all() and (tail < -14).all()
        target = torch.tensor([[-1e-3], [-2e-3], [-0.5]], device=DEV)
        check_kl(x, idx, target, temperature, True, what="tiny tail")


# ====================================================================== invariance, K, N

@pytest.mark.parametrize("op", ["full", "support", "kl"])
def test_deterministic_and_batch_invariant(op):
    """Same inputs twice: bit-identical; a row alone: bit-identical to the row in a batch."""
    x = _logits(5, 1000, torch.bfloat16, seed=26)
    idx = make_indices(x, 12, seed=2)
    target = make_targets(x, idx, seed=2).to(DEV)
    g = _weights(idx.shape, 3, torch.float32, nan_where=idx < 0)
    gt = _weights(idx.shape[:1], 4, torch.float32)

    def run(rows):
        xs, ids = x[rows], idx[rows]
        if op == "kl":
            t = target[rows]
            fwd = sp.sparse_kl_forward(xs, ids, t, 0.7, True, block_v=256)
            grad = sp.sparse_kl_backward(gt[rows], xs, ids, t, fwd[1], fwd[2], 0.7, True,
                                         block_v=256)
        else:
            fwd = sp.sparse_logprobs_forward(xs, ids, 0.7, op, True, block_v=256)
            grad = sp.sparse_logprobs_backward(g[rows], gt[rows], xs, ids, *fwd, 0.7, op,
                                               block_v=256)
        return (*fwd, grad)

    everything = slice(None)
    first, second = run(everything), run(everything)
    assert all(bit_equal(a, b) for a, b in zip(first, second)), "not deterministic"
    for r in (0, 3):
        alone = run(slice(r, r + 1))
        assert all(bit_equal(a, b[r:r + 1]) for a, b in zip(alone, first)), f"row {r}"


def test_many_ids_span_several_id_chunks(monkeypatch):
    """K = 300 ids, a top-K support as sampling_support gives it (whole blocks of ids), read
    16 at a time (the id chunk lowered from 1024 so that the interpreter stays fast): support
    renormalization, tail and KL over several chunks."""
    monkeypatch.setattr(sp, "_MAX_BLOCK_K", 16)
    x = _logits(2, 400, torch.float32, seed=27, kind="normal")
    idx = x.argsort(-1, descending=True)[:, :300].contiguous()
    idx[1, -7:] = -1
    for normalize in ("full", "support"):
        check_logprobs(x, idx, 1.0, normalize, True, block_v=128, what="K=300")
    target = make_targets(x, idx, seed=4).to(DEV)
    check_kl(x, idx, target, 1.0, True, block_v=128, what="K=300")


def test_empty_k_and_empty_n():
    x = _logits(3, 50, torch.float32, seed=28)
    idx = torch.empty(3, 0, dtype=torch.int64, device=DEV)
    lp, tail, _, _ = check_logprobs(x, idx, 1.0, "full", True, g=torch.empty(3, 0, device=DEV),
                                    what="K=0")
    assert lp.shape == (3, 0)
    check_kl(x, idx, torch.empty(3, 0, device=DEV), 1.0, True, what="K=0")
    x0 = torch.empty(0, 50, device=DEV)
    i0 = torch.empty(0, 4, dtype=torch.int64, device=DEV)
    lp, tail, stats = sp.sparse_logprobs_forward(x0, i0, 1.0, "full", True)
    assert lp.shape == (0, 4) and tail.shape == (0,) and stats.shape == (0, 3)
    grad = sp.sparse_logprobs_backward(torch.empty(0, 4, device=DEV), None, x0, i0, lp, tail,
                                       stats, 1.0, "full")
    assert grad.shape == (0, 50)


def test_strided_inputs_and_missing_grad():
    """A row-strided logits view and an expanded (stride-0) upstream gradient give the same
    bits as contiguous copies; ``grad_logp=None`` is a zero gradient."""
    wide = _logits(4, 400, torch.bfloat16, seed=29)
    x = wide[:, :300]
    idx = make_indices(x, 6, seed=5)
    fa = sp.sparse_logprobs_forward(x, idx, 1.0, "full", True)
    fb = sp.sparse_logprobs_forward(x.contiguous(), idx, 1.0, "full", True)
    assert all(bit_equal(a, b) for a, b in zip(fa, fb))
    g = torch.ones((), device=DEV).expand(idx.shape)
    gt = torch.full((4,), 0.5, device=DEV)
    ga = sp.sparse_logprobs_backward(g, gt, x, idx, *fa, 1.0, "full")
    gb = sp.sparse_logprobs_backward(g.contiguous(), gt, x.contiguous(), idx, *fb, 1.0, "full")
    assert bit_equal(ga, gb)
    gn = sp.sparse_logprobs_backward(None, gt, x, idx, *fa, 1.0, "full")
    gz = sp.sparse_logprobs_backward(torch.zeros(idx.shape, device=DEV), gt, x, idx, *fa, 1.0,
                                     "full")
    assert bit_equal(gn, gz)


def test_row_of_only_minus_inf_matches_the_reference():
    """A row of only -inf (m = -inf) is shifted by 0 as the reference does: -inf log-probs
    and tail (not -inf - -inf = NaN), the reference's gradients, and the other rows intact."""
    x = make_logits(3, 50, torch.float32, seed=41)
    x[1] = -math.inf
    x[2, ::2] = -math.inf
    idx = torch.tensor([[3, 17, 40, -1], [0, 5, 9, 49], [1, 2, 3, 30]])
    tgt = torch.log_softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(43)), -1)
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(44))
    gt = torch.randn(3, generator=torch.Generator().manual_seed(45))
    for normalize in ("full", "support"):
        got = sp.sparse_logprobs_forward(x, idx, 1.0, normalize, True)
        want = ref.sparse_logprobs_forward(x, idx, 1.0, normalize, True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, equal_nan=True)
        gg = sp.sparse_logprobs_backward(g, gt, x, idx, *got, 1.0, normalize)
        gw = ref.sparse_logprobs_backward(g, gt, x, idx, *want, 1.0, normalize)
        torch.testing.assert_close(gg, gw, equal_nan=True)
    got = sp.sparse_kl_forward(x, idx, tgt, 1.0, True)
    want = ref.sparse_kl_forward(x, idx, tgt, 1.0, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)
    torch.testing.assert_close(sp.sparse_kl_backward(gt, x, idx, tgt, got[1], got[2], 1.0, True),
                               ref.sparse_kl_backward(gt, x, idx, tgt, want[1], want[2], 1.0,
                                                      True), equal_nan=True)


def test_nan_stays_in_its_row():
    x = _logits(3, 100, torch.float32, seed=30)
    idx = make_indices(x, 5, seed=6, unused=False)
    clean = sp.sparse_logprobs_forward(x, idx, 1.0, "full", True)
    x[1, 17] = float("nan")
    dirty = sp.sparse_logprobs_forward(x, idx, 1.0, "full", True)
    assert dirty[0][1].isnan().all() and dirty[1][1].isnan()
    for a, b in zip(clean, dirty):
        assert bit_equal(a[[0, 2]], b[[0, 2]])


# ==================================================================================== GPU

def _qwen_batch(n, vocab, seed):
    """bf16 logits built on the GPU: normal rows, every 4th peaked (+30), every 5th with
    -inf columns; ids: the row's top 48 plus 15 random ids and a -1 slot."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = (3.0 * torch.randn(n, vocab, generator=gen, device="cuda")).to(torch.bfloat16)
    x[::4, 1234] += 30.0
    x[::5, 50000:60000] = NEG_INF
    top = x[:, :100000].topk(48, dim=-1).indices  # any fixed rule; exact ties do not matter
    rand = torch.randint(0, vocab, (n, 15), generator=gen, device="cuda")
    idx = torch.cat([top, rand, torch.full((n, 1), -1, device="cuda")], dim=1)
    return x, idx


_GPU_ROWS = [0, 1, 4, 5, 8191, 16380, 16383]  # peaked, masked, and the last rows (N*V > 2^31)


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", ["full", "support"])
def test_gpu_qwen_vocab_large_batch_logprobs(normalize):
    n, vocab = 16384, 151936
    x, idx = _qwen_batch(n, vocab, seed=1)
    g = torch.randn(idx.shape, device="cuda")
    gt = torch.randn(n, device="cuda")
    lp, tail, stats = sp.sparse_logprobs_forward(x, idx, 0.7, normalize, True)
    grad = sp.sparse_logprobs_backward(g, gt, x, idx, lp, tail, stats, 0.7, normalize)
    rows = torch.tensor(_GPU_ROWS, device="cuda")
    x64 = x[rows].double()
    lp_r, tail_r, stats_r = ref.sparse_logprobs_forward(x64, idx[rows], 0.7, normalize, True)
    _assert_values(lp[rows], lp_r, torch.bfloat16, "qwen logp")
    _assert_values(tail[rows], tail_r, torch.bfloat16, "qwen tail")
    grad_r = ref.sparse_logprobs_backward(g[rows].double(), gt[rows].double(), x64, idx[rows],
                                          lp_r, tail_r, stats_r, 0.7, normalize)
    _assert_grad(grad[rows], grad_r, torch.bfloat16, x[rows], 0.7, 1.0, "qwen grad")


@pytest.mark.gpu
def test_gpu_qwen_vocab_large_batch_kl():
    n, vocab = 16384, 151936
    x, idx = _qwen_batch(n, vocab, seed=2)
    teacher = torch.log_softmax(torch.randn(n, 64, device="cuda"), -1) - 0.01  # some tail
    target = torch.where(idx >= 0, teacher, float("nan"))
    g = torch.randn(n, device="cuda")
    kl, s_tail, stats = sp.sparse_kl_forward(x, idx, target, 1.0, True)
    grad = sp.sparse_kl_backward(g, x, idx, target, s_tail, stats, 1.0, True)
    rows = torch.tensor(_GPU_ROWS, device="cuda")
    x64 = x[rows].double()
    kl_r, s_tail_r, stats_r = ref.sparse_kl_forward(x64, idx[rows], target[rows], 1.0, True)
    _assert_values(kl[rows], kl_r, torch.bfloat16, "qwen kl")
    _assert_values(s_tail[rows], s_tail_r, torch.bfloat16, "qwen s_tail")
    grad_r = ref.sparse_kl_backward(g[rows].double(), x64, idx[rows], target[rows], s_tail_r,
                                    stats_r, 1.0, True)
    _assert_grad(grad[rows], grad_r, torch.bfloat16, x[rows], 1.0, 1.0, "qwen kl grad")


@pytest.mark.gpu
def test_gpu_deterministic_and_batch_invariant():
    x, idx = _qwen_batch(512, 151936, seed=3)
    g = torch.randn(idx.shape, device="cuda")
    gt = torch.randn(512, device="cuda")

    def run(rows):
        fwd = sp.sparse_logprobs_forward(x[rows], idx[rows], 1.0, "full", True)
        return (*fwd, sp.sparse_logprobs_backward(g[rows], gt[rows], x[rows], idx[rows], *fwd,
                                                  1.0, "full"))

    a, b = run(slice(None)), run(slice(None))
    assert all(bit_equal(u, v) for u, v in zip(a, b))
    alone = run(slice(7, 8))
    assert all(bit_equal(u, v[7:8]) for u, v in zip(alone, a))


# ========================================================= the tail from the lane states

def _lane_rows(dtype):
    """Rows at V = 160 for ``block_v = 16`` (column c in lane c % 16), each built to take one
    branch of the lane-wise tail (sparse._lane_state): ``(x [R, 160], idx [R, 4])``."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(10, 160, generator=g, dtype=torch.float64)
    idx = torch.full((10, 4), -1, dtype=torch.int64)
    x[0, 3], x[0, 19] = 60.0, 40.0          # two ids in lane 3, the second dominates: re-read
    idx[0, :2] = torch.tensor([19, 3])
    x[1, [3, 19, 35]] = torch.tensor([30.0, 29.0, 28.0], dtype=torch.float64)  # 3 ids: re-read
    idx[1, :3] = torch.tensor([35, 3, 19])
    x[2, 5] = 100.0                          # the lane's rest is ~e^-100: below 2^-60
    idx[2, 0] = 5
    x[3, [0, 1, 2, 3]] = 0.0                 # ids hold all but ~1e-28 of the mass
    x[3, 4:] = -70.0
    idx[3] = torch.tensor([0, 1, 2, 3])
    x[4, [7, 40, 90]] = -30.0                # ids hold almost no mass
    idx[4, :3] = torch.tensor([7, 40, 90])
    x[5, 10::16] = NEG_INF                   # lane 10 all -inf, an id on it; -inf elsewhere
    x[5, 100:104] = NEG_INF
    idx[5, :3] = torch.tensor([26, 101, 7])
    x[6, [9, 25]] = 20.0                     # two ids tied at the max of lane 9, a dup
    idx[6] = torch.tensor([25, 9, 25, 41])
    x[8, 12], x[8, 28] = 50.0, 49.0          # a second id just below the max, duplicated
    idx[8] = torch.tensor([28, 12, 28, 28])
    x[9, 64] = 90.0                          # peak on an id, the rest of the row far below
    x[9, 65:] -= 60.0
    idx[9, :2] = torch.tensor([64, 80])
    # row 7: every slot unused
    return x.to(dtype).to(DEV), idx.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_tail_from_lane_states(dtype):
    """The forward's tail from the per-lane states: lanes with two / three ids, an id at the
    lane max with the rest of the lane below 2^-60 (read again), ids holding ~all or ~no
    mass, -inf columns (an id on one), tied and duplicated ids, a row of unused slots, at
    T = 1 and 0.6; the tail stays finite and within tolerance where the fp64 reference is."""
    x, idx = _lane_rows(dtype)
    target = torch.log_softmax(torch.randn(idx.shape, generator=torch.Generator().manual_seed(3),
                                           dtype=torch.float64), -1).to(_cdt(dtype)).to(DEV)
    for temperature in (1.0, 0.6):
        for normalize in ("full", "support"):
            _, tail, _, _ = check_logprobs(x, idx, temperature, normalize, True, block_v=16,
                                           what="lanes")
            _, tail_r, _ = ref.sparse_logprobs_forward(x.double(), idx, temperature, normalize,
                                                       True)
            fin = torch.isfinite(tail_r)
            assert torch.isfinite(tail[fin]).all(), "finite reference tail, finite tail"
            assert tail[3] < -50  # ~1e-28 of the mass stays, not 0
        check_kl(x, idx, target, temperature, True, block_v=16, what="lanes")
