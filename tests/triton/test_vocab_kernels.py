"""Kernel-level tests of the triton vocabulary kernels (``rlkernels.triton.vocab``) for what the
generic backend tests of ``tests/ops`` do not reach: how a row is streamed in blocks.

On CPU the kernels run in the Triton interpreter; ``BLOCK_V_MAX`` is shrunk to 16 (fixture
``small_blocks``) so that vocabularies of a few dozen columns give many blocks per row and the
cases stay fast. Shapes, each for a reason:

* V = 7: smaller than one block (masked tail only);  V = 16: exactly one block;
* V = 17: one column past a block (a 1-column last block);  V = 50: 4 blocks, the last partial;
* designed rows: the max in a later block (rescaling the running sums), the max tied across
  blocks, a first block all ``-inf``, a peak in the middle block, padding rows holding NaN.

The ``gpu`` tests (skipped without CUDA) cover what the interpreter cannot: V = 151936 at
N = 16384 in bf16 (N * V > 2**31), CUDA-graph capture, determinism and batch invariance at
full size.
"""

import math

import pytest
import torch

import _naive as naive
import rlkernels
from _naive import assert_grad_close, assert_values_close, bit_equal, fp32_floor, make_logits

if rlkernels.available_backends()["triton"] != "ok":
    pytest.skip(f"triton backend unavailable: {rlkernels.available_backends()['triton']}",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rlkernels.reference import vocab as ref  # noqa: E402
from rlkernels.triton import _common  # noqa: E402
from rlkernels.triton import vocab as tv  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
KL_CASES = [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]
SMALL_BLOCK = 16


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 columns: a row of 50 columns is streamed in 4 blocks."""
    monkeypatch.setattr(_common, "BLOCK_V_MAX", SMALL_BLOCK)
    assert _common.block_v(50) == SMALL_BLOCK


def _designed(vocab: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """Rows built to hit the block logic (each row documented), followed by mixed rows."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    # 0: the max in the LAST block, values rising along the row: the running max changes in
    #    every block, so (max, rest, S1) are rescaled at every step
    rows.append(torch.linspace(-5.0, 5.0, vocab, dtype=torch.float64))
    # 1: peaked (+30) in the last column
    r = torch.randn(vocab, generator=g, dtype=torch.float64)
    r[-1] += 30.0
    rows.append(r)
    # 2: the max tied across blocks (columns 1, 20, 40 when they exist): exactly one of them
    #    is left out of `rest`, the others count 1 each
    r = torch.randn(vocab, generator=g, dtype=torch.float64)
    for j in (1, 20, 40):
        if j < vocab:
            r[j] = 9.0
    rows.append(r)
    # 3: the first block all -inf, the rest normal (the running max leaves -inf late)
    r = 3.0 * torch.randn(vocab, generator=g, dtype=torch.float64)
    r[:min(SMALL_BLOCK, vocab - 1)] = -math.inf
    rows.append(r)
    # 4: peaked (+25) in a middle block, with -inf columns after it
    r = torch.randn(vocab, generator=g, dtype=torch.float64)
    r[vocab // 2] += 25.0
    r[vocab // 2 + 1::3] = -math.inf
    rows.append(r)
    # 5: flat (every p = 1/V, entropy log V)
    rows.append(torch.full((vocab,), 0.75, dtype=torch.float64))
    x = torch.cat([torch.stack(rows), make_logits(4, vocab, torch.float64, seed=seed + 1)])
    return x.to(dtype)


def _tokens(x: torch.Tensor, pad=(3,)) -> torch.Tensor:
    """A finite-logit token per row: the arg-max on even rows, another finite column on odd
    ones; ``pad`` rows get -100."""
    tok = x.double().argmax(-1)
    for i in range(1, x.shape[0], 2):
        finite = torch.isfinite(x[i].double()).nonzero()[:, 0]
        tok[i] = finite[(7 * i) % finite.numel()]
    for i in pad:
        if i < x.shape[0]:
            tok[i] = -100
    return tok


def _tok_ref(x, tok, t, g_lp=None, g_h=None, with_entropy=True):
    """The fp64 reference forward (and backward when upstream gradients are given)."""
    out = ref.token_logprobs_forward(x.double(), tok, t, -100, with_entropy)
    if g_lp is None and g_h is None:
        return out, None
    g = ref.token_logprobs_backward(None if g_lp is None else g_lp.double(),
                                    None if g_h is None else g_h.double(),
                                    x.double(), tok, out[2], t, -100)
    return out, g


def _upstream(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


def _floor(x, t, *ws):
    return fp32_floor(x, temperature=t, upstream=sum(float(w.abs().max()) for w in ws))


# ================================================================== token_logprobs / entropy

@pytest.mark.parametrize("vocab", [7, 16, 17, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_blocks(small_blocks, vocab, dtype, temperature):
    """Values, saved statistics and gradients against the fp64 reference when a row spans
    several blocks (or less than one)."""
    x = _designed(vocab, dtype)
    tok = _tokens(x)
    logp, ent, stats = tv.token_logprobs_forward(x, tok, temperature, -100, True)
    (lp64, h64, st64), _ = _tok_ref(x, tok, temperature)
    assert logp.dtype == ent.dtype == stats.dtype == torch.float32
    assert_values_close(logp, lp64, what="logp")
    assert_values_close(ent, h64, what="entropy")
    valid = tok != -100
    # the statistics themselves, relative: log s of a peaked row is ~1e-12 and must keep its
    # digits (it is what makes 1 - p_max exact in backward)
    torch.testing.assert_close(stats[valid, 0].double(), st64[valid, 0], rtol=1e-6, atol=0)
    # (with T != 1, z = x / T is rounded to fp32 before it is exponentiated: a relative
    # error of rest up to eps * max|z|)
    rtol = 2e-6 if temperature == 1.0 else 3e-5
    torch.testing.assert_close(stats[valid, 1].double(), st64[valid, 1], rtol=rtol, atol=1e-30)
    torch.testing.assert_close(stats[valid, 2].double(), st64[valid, 2], rtol=1e-5, atol=1e-6)
    assert (stats[~valid] == 0).all() and (logp[~valid] == 0).all() and (ent[~valid] == 0).all()

    g_lp, g_h = _upstream(x.shape[0], 1), _upstream(x.shape[0], 2)
    grad = tv.token_logprobs_backward(g_lp, g_h, x, tok, stats, temperature, -100)
    _, g64 = _tok_ref(x, tok, temperature, g_lp, g_h)
    assert grad.dtype == dtype
    assert_grad_close(grad, g64, dtype, _floor(x, temperature, g_lp, g_h), what="grad")
    assert (grad[~valid] == 0).all()


def test_token_logprobs_peaked_fp32_within_spec(small_blocks):
    """fp32 rows peaked by 20-40 over 4 blocks, the token on the peak for half the rows: the
    gradient meets the bare SPEC bound ``2 eps max|g_ref| + 1e-7`` (no fp32 floor), which
    needs ``log s = log1p(rest)`` and ``1 - p_y = -expm1(log p_y)`` to keep every digit."""
    x = make_logits(12, 50, torch.float32, kind="peaked", seed=3)
    tok = _tokens(x, pad=())
    logp, ent, stats = tv.token_logprobs_forward(x, tok, 1.0, -100, True)
    g_lp, g_h = _upstream(12, 3), _upstream(12, 4)
    grad = tv.token_logprobs_backward(g_lp, g_h, x, tok, stats, 1.0, -100)
    (lp64, h64, _), g64 = _tok_ref(x, tok, 1.0, g_lp, g_h)
    assert_values_close(logp, lp64)
    assert_values_close(ent, h64)
    assert_grad_close(grad, g64, torch.float32, spec_only=True, what="peaked fp32 grad")
    # the token column of a row peaked on its token: g (1 - p_y), relative to its own size
    on_peak = tok == x.argmax(-1)
    rows = on_peak.nonzero()[:, 0]
    col = grad[rows, tok[rows]].double()
    col64 = g64[rows, tok[rows]]
    torch.testing.assert_close(col, col64, rtol=1e-5, atol=0)


def test_entropy_only(small_blocks):
    """tokens=None: every row computed (no padding), logp all 0, entropy and its gradient as
    the reference."""
    x = _designed(50)
    logp, ent, stats = tv.token_logprobs_forward(x, None, 0.9, -100, True)
    (_, h64, _), _ = _tok_ref(x, None, 0.9)
    assert (logp == 0).all()
    assert_values_close(ent, h64)
    g_h = _upstream(x.shape[0], 5)
    grad = tv.token_logprobs_backward(None, g_h, x, None, stats, 0.9, -100)
    _, g64 = _tok_ref(x, None, 0.9, None, g_h)
    assert_grad_close(grad, g64, torch.float32, _floor(x, 0.9, g_h))


def test_without_entropy_saves_zero(small_blocks):
    x = _designed(17)
    tok = _tokens(x)
    logp, ent, stats = tv.token_logprobs_forward(x, tok, 1.0, -100, False)
    logp_h, _, stats_h = tv.token_logprobs_forward(x, tok, 1.0, -100, True)
    assert (ent == 0).all() and (stats[:, 2] == 0).all()
    assert bit_equal(logp, logp_h) and bit_equal(stats[:, :2], stats_h[:, :2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_equals_out_of_place(small_blocks, dtype):
    """``out=logits``: every program reads a block (and the token's logit, first) before it
    overwrites it; the result equals the out-of-place gradient bit for bit, padding rows with
    NaN / -inf logits included."""
    x = _designed(50, dtype)
    tok = _tokens(x, pad=(3, 7))
    x[7] = float("nan")
    x[3] = -math.inf
    _, _, stats = tv.token_logprobs_forward(x, tok, 0.8, -100, True)
    g_lp, g_h = _upstream(x.shape[0], 6), _upstream(x.shape[0], 7)
    expect = tv.token_logprobs_backward(g_lp, g_h, x, tok, stats, 0.8, -100)
    buf = x.clone()
    got = tv.token_logprobs_backward(g_lp, g_h, buf, tok, stats, 0.8, -100, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    assert bit_equal(got, expect)
    assert (got[[3, 7]] == 0).all()


def test_strided_inputs(small_blocks):
    """Rows with a stride other than V (every other row of a bigger tensor, a column window
    of a wider one), a column-strided (transposed) input, strided tokens, a stride-0 upstream
    gradient and a column-strided ``out``: the same bits as contiguous inputs."""
    base = _designed(50)
    n, vocab = base.shape
    tok = _tokens(base)
    g_lp = _upstream(n, 8)
    g_h = _upstream(n, 9)
    lp, h, st = tv.token_logprobs_forward(base, tok, 0.7, -100, True)
    grad = tv.token_logprobs_backward(g_lp, g_h, base, tok, st, 0.7, -100)

    every_other = torch.zeros(2 * n, vocab).index_copy_(0, torch.arange(0, 2 * n, 2), base)[::2]
    window = torch.zeros(n, vocab + 9)
    window[:, 4:4 + vocab] = base
    window = window[:, 4:4 + vocab]
    transposed = base.t().contiguous().t()
    tok_strided = torch.stack([tok, tok], 1)[:, 0]
    assert every_other.stride(0) == 2 * vocab and window.stride(0) == vocab + 9
    assert transposed.stride(-1) != 1 and tok_strided.stride(0) == 2
    for x in (every_other, window, transposed):
        lp2, h2, st2 = tv.token_logprobs_forward(x, tok_strided, 0.7, -100, True)
        assert bit_equal(lp2, lp) and bit_equal(h2, h) and bit_equal(st2, st)
        g2 = tv.token_logprobs_backward(g_lp, g_h, x, tok_strided, st2, 0.7, -100)
        assert bit_equal(g2, grad)
    # a scalar upstream gradient broadcast to N (stride 0), as from loss = logp.sum()
    ones = torch.ones(()).expand(n)
    g_a = tv.token_logprobs_backward(ones, None, base, tok, st, 0.7, -100)
    g_b = tv.token_logprobs_backward(torch.ones(n), None, base, tok, st, 0.7, -100)
    assert bit_equal(g_a, g_b)
    # a column-strided out buffer goes through a temporary
    out = torch.empty(vocab, n).t()
    got = tv.token_logprobs_backward(g_lp, g_h, base, tok, st, 0.7, -100, out=out)
    assert got is out and bit_equal(out.contiguous(), grad)


def test_int32_tokens(small_blocks):
    x = _designed(50, torch.bfloat16)
    tok = _tokens(x)
    a = tv.token_logprobs_forward(x, tok, 1.0, -100, True)
    b = tv.token_logprobs_forward(x, tok.int(), 1.0, -100, True)
    assert all(bit_equal(u, v) for u, v in zip(a, b))
    g = _upstream(x.shape[0], 10)
    assert bit_equal(tv.token_logprobs_backward(g, None, x, tok, a[2], 1.0, -100),
                     tv.token_logprobs_backward(g, None, x, tok.int(), b[2], 1.0, -100))


def test_custom_ignore_index_and_out_of_range_token(small_blocks):
    """ignore_index may be any id (here 5, a valid column); an out-of-range id (possible when
    debug checks are off) reads nothing and gives NaN, not a crash."""
    x = _designed(17)
    tok = _tokens(x, pad=())
    tok[2] = 5
    tok[4] = 17
    logp, _, stats = tv.token_logprobs_forward(x, tok, 1.0, 5, True)
    assert logp[2] == 0 and torch.isnan(logp[4])
    grad = tv.token_logprobs_backward(torch.ones(x.shape[0]), None, x, tok, stats, 1.0, 5)
    assert (grad[2] == 0).all()


@pytest.mark.parametrize("which", ["logp", "entropy", "both"])
def test_zero_upstream_rows_are_not_read(small_blocks, which):
    """A row whose given upstream gradients are all exactly 0 (a masked position of a loss)
    gets an exactly-zero gradient row without being read: NaN / inf logits there do not turn
    into NaN (0 * NaN), and the other rows are unchanged (issue 18)."""
    x = _designed(50)
    tok = _tokens(x, pad=())
    x[1] = float("nan")
    x[2, 5] = float("inf")
    _, _, stats = tv.token_logprobs_forward(x, tok, 0.7, -100, True)
    g_lp = _upstream(x.shape[0], 3) if which != "entropy" else None
    g_h = _upstream(x.shape[0], 4) if which != "logp" else None
    for g in (g_lp, g_h):
        if g is not None:
            g[[1, 2]] = 0.0
    if which == "both":
        g_h[4] = 0.0  # one of two upstreams 0: the row is computed
    grad = tv.token_logprobs_backward(g_lp, g_h, x, tok, stats, 0.7, -100)
    assert (grad[[1, 2]] == 0).all()
    keep = [i for i in range(x.shape[0]) if i not in (1, 2)]
    clean = x.clone()
    clean[[1, 2]] = 0.0
    ref_grad = tv.token_logprobs_backward(g_lp, g_h, clean, tok, stats, 0.7, -100)
    assert bit_equal(grad[keep], ref_grad[keep])
    assert torch.isfinite(grad[keep]).all() and grad[4].abs().sum() > 0


def test_nan_and_all_inf_rows_stay_in_their_row(small_blocks):
    """A NaN logit makes its row's outputs NaN and nothing else; a row of only -inf (not
    padding) gives the reference's answers (entropy 0, log-prob -inf)."""
    x = _designed(50)
    tok = _tokens(x, pad=())
    clean = tv.token_logprobs_forward(x, tok, 1.0, -100, True)
    x[1, 33] = float("nan")
    x[2] = -math.inf
    logp, ent, stats = tv.token_logprobs_forward(x, tok, 1.0, -100, True)
    assert torch.isnan(logp[1]) and torch.isnan(ent[1])
    assert ent[2] == 0 and logp[2] == -math.inf and stats[2, 0] == -math.inf
    (lp64, h64, _), _ = _tok_ref(x[2:3], tok[2:3], 1.0)
    assert lp64[0] == -math.inf and h64[0] == 0
    keep = [i for i in range(x.shape[0]) if i not in (1, 2)]
    assert bit_equal(logp[keep], clean[0][keep]) and bit_equal(ent[keep], clean[1][keep])


def test_empty_batch():
    x = torch.zeros(0, 7)
    logp, ent, stats = tv.token_logprobs_forward(x, torch.zeros(0, dtype=torch.long), 1.0,
                                                 -100, True)
    assert logp.shape == ent.shape == (0,) and stats.shape == (0, 3)
    grad = tv.token_logprobs_backward(logp, ent, x, torch.zeros(0, dtype=torch.long), stats,
                                      1.0, -100)
    assert grad.shape == (0, 7)
    kl, sp, sq = tv.kl_divergence_forward(x, x, None, "jsd", 0.5, 1.0)
    assert kl.shape == (0,) and sp.shape == sq.shape == (0, 3)


# ============================================================================= kl_divergence

def _kl_pair(vocab, dtype=torch.float32, seed=0):
    """``logits`` = the designed rows, ``ref_logits`` normal rows with -inf at the same
    columns (a shared vocabulary mask)."""
    x = _designed(vocab, torch.float64, seed)
    y = make_logits(x.shape[0], vocab, torch.float64, kind="normal", seed=seed + 7)
    y = torch.where(torch.isinf(x), x, y)
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("kind,beta", KL_CASES, ids=[f"{k}-{b}" for k, b in KL_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_blocks(small_blocks, dtype, kind, beta, vocab=50):
    """Two-pass forward and one-pass backward over several blocks: values, the saved sums
    (third columns of the statistics) and both gradients against the fp64 reference."""
    x, y = _kl_pair(vocab, dtype)
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[[3, 8]] = True
    kl, sp, sq = tv.kl_divergence_forward(x, y, mask, kind, beta, 0.7)
    kl64, sp64, sq64 = ref.kl_divergence_forward(x.double(), y.double(), mask, kind, beta, 0.7)
    assert kl.dtype == torch.float32
    assert_values_close(kl, kl64, what="kl")
    keep = ~mask
    assert_values_close(sp[keep], sp64[keep], what="stats_p")
    assert_values_close(sq[keep], sq64[keep], what="stats_q")
    assert (kl[mask] == 0).all()
    g = _upstream(x.shape[0], 11)
    gz, gw = tv.kl_divergence_backward(g, x, y, mask, sp, sq, kind, beta, 0.7, True)
    gz64, gw64 = ref.kl_divergence_backward(g.double(), x.double(), y.double(), mask, sp64,
                                            sq64, kind, beta, 0.7, True)
    floor = fp32_floor(x, y, temperature=0.7, upstream=float(g.abs().max()))
    assert_grad_close(gz, gz64, dtype, floor, what="grad logits")
    assert_grad_close(gw, gw64, dtype, floor, what="grad ref_logits")
    assert (gz[mask] == 0).all() and (gw[mask] == 0).all()
    gz_only, none = tv.kl_divergence_backward(g, x, y, mask, sp, sq, kind, beta, 0.7, False)
    assert none is None and bit_equal(gz_only, gz)


def test_kl_strided_and_masked_garbage(small_blocks):
    """Strided rows give the same bits; ignored rows holding NaN / -inf are not read."""
    x, y = _kl_pair(50)
    n = x.shape[0]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[2] = True
    g = _upstream(n, 12)
    base = tv.kl_divergence_forward(x, y, mask, "jsd", 0.3, 1.0)
    gbase = tv.kl_divergence_backward(g, x, y, mask, base[1], base[2], "jsd", 0.3, 1.0, True)
    xs = torch.stack([x, torch.zeros_like(x)], 1).view(2 * n, -1)[::2]
    ys = y.t().contiguous().t()
    xs[2] = float("nan")
    mask_s = torch.stack([mask, mask], 1)[:, 0]
    got = tv.kl_divergence_forward(xs, ys, mask_s, "jsd", 0.3, 1.0)
    assert bit_equal(got[0], base[0])
    ggot = tv.kl_divergence_backward(g, xs, ys, mask_s, got[1], got[2], "jsd", 0.3, 1.0, True)
    assert bit_equal(ggot[0], gbase[0]) and bit_equal(ggot[1], gbase[1])


def test_kl_nan_propagates_to_its_row(small_blocks):
    """SPEC 1: a NaN in a row makes that row's KL NaN, the other rows unchanged."""
    x, y = _kl_pair(50)
    clean = tv.kl_divergence_forward(x, y, None, "reverse", 0.5, 1.0)[0]
    x[4, 20] = float("nan")
    kl = tv.kl_divergence_forward(x, y, None, "reverse", 0.5, 1.0)[0]
    assert torch.isnan(kl[4])
    keep = [i for i in range(x.shape[0]) if i != 4]
    assert bit_equal(kl[keep], clean[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_jsd_endpoints_exactly_zero(small_blocks, dtype, beta):
    """JSD at beta = 0 or 1 is 0 whatever the rows (m = q or m = p): the fp32 form
    (``_jsd_cols``) gives exactly 0, not a rounding residue: kl, the saved sums and both
    gradients (its ``D`` lies ~1000 from 0, so ``2^-|D| = 0``); -inf columns and the
    temperature included."""
    x, y = _kl_pair(50, dtype)
    y = y.clone()
    y[6, 3] = -math.inf  # q = 0 under a finite p (m = beta p + (1 - beta) q is still > 0)
    kl, sp, sq = tv.kl_divergence_forward(x, y, None, "jsd", beta, 0.7)
    assert (kl == 0).all() and (sp[:, 2] == 0).all() and (sq[:, 2] == 0).all()
    g = _upstream(x.shape[0], 21)
    gz, gw = tv.kl_divergence_backward(g, x, y, None, sp, sq, "jsd", beta, 0.7, True)
    assert (gz == 0).all() and (gw == 0).all()


def test_jsd_nearly_equal_rows_fp32(small_blocks):
    """p ~ q, where the JSD (~1e-7 here) is a small difference of large terms: the fp32 form
    (the difference of the rows' shifted logits formed first, docs/math.md) stays within
    1e-6 absolute (its floor is the rounding of the O(1) per-column terms, ~2e-7; SPEC allows
    1e-5) and within the SPEC gradient tolerance, at beta = 0.3 and 0.5, on designed rows
    (peaked, flat, tied, -inf columns)."""
    x, _ = _kl_pair(50, torch.float32)
    g_ = torch.Generator().manual_seed(5)
    y = (x.double() + 1e-3 * torch.randn(x.shape, generator=g_, dtype=torch.float64)).float()
    y = torch.where(torch.isinf(x), x, y)
    for beta in (0.3, 0.5):
        kl, sp, sq = tv.kl_divergence_forward(x, y, None, "jsd", beta, 0.7)
        kl64, sp64, sq64 = ref.kl_divergence_forward(x.double(), y.double(), None, "jsd",
                                                     beta, 0.7)
        assert_values_close(kl, kl64, atol=1e-6, rtol=1e-5, what=f"jsd {beta}")
        g = _upstream(x.shape[0], 22)
        gz, gw = tv.kl_divergence_backward(g, x, y, None, sp, sq, "jsd", beta, 0.7, True)
        gz64, gw64 = ref.kl_divergence_backward(g.double(), x.double(), y.double(), None,
                                                sp64, sq64, "jsd", beta, 0.7, True)
        floor = fp32_floor(x, y, temperature=0.7, upstream=float(g.abs().max()))
        assert_grad_close(gz, gz64, torch.float32, floor, what=f"jsd {beta} grad logits")
        assert_grad_close(gw, gw64, torch.float32, floor, what=f"jsd {beta} grad ref")


@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_kl_one_pass_pairs_ties_and_zero_q(small_blocks, kind):
    """The one-pass forward takes columns j and j + BLOCK_V / 2 in one lane step
    (``_kl_lane_step2``): the row max tied within a lane pair (exactly one arg-max out of
    ``rest``), the max in the second half, and a column with ``q = 0`` under a small but
    positive ``p`` (60 below the max: KL(p || q) is inf, KL(q || p) finite)."""
    x, y = _kl_pair(50, torch.float32)
    x, y = x.clone(), y.clone()
    half = SMALL_BLOCK // 2
    x[0] = torch.randn(50, generator=torch.Generator().manual_seed(3)).float()
    x[0, 17], x[0, 17 + half] = 9.0, 9.0  # a tie in one lane pair (block 1)
    x[1, 40] = x[1].max() + 3.0  # the max in the second half of block 2 (40 = 32 + 8)
    y[1, 40] = y[1, 40] - 2.0
    x[2, 5] = x[2].max() - 60.0
    y[2, 5] = -math.inf
    kl, sp, sq = tv.kl_divergence_forward(x, y, None, kind, 0.5, 1.0)
    kl64, sp64, sq64 = ref.kl_divergence_forward(x.double(), y.double(), None, kind, 0.5, 1.0)
    assert_values_close(kl, kl64, what=f"{kind} kl")
    assert_values_close(sp, sp64, what=f"{kind} stats_p")
    assert_values_close(sq, sq64, what=f"{kind} stats_q")
    assert (kl[2] == math.inf) == (kind == "reverse")
    g = _upstream(x.shape[0], 23)
    keep = torch.isfinite(kl)
    gz, gw = tv.kl_divergence_backward(g, x, y, None, sp, sq, kind, 0.5, 1.0, True)
    gz64, gw64 = ref.kl_divergence_backward(g.double(), x.double(), y.double(), None, sp64,
                                            sq64, kind, 0.5, 1.0, True)
    floor = fp32_floor(x, y, upstream=float(g.abs().max()))
    assert_grad_close(gz[keep], gz64[keep], torch.float32, floor, what=f"{kind} grad logits")
    assert_grad_close(gw[keep], gw64[keep], torch.float32, floor, what=f"{kind} grad ref")


# ======================================================== fp64, determinism, batch invariance

def test_fp64(small_blocks):
    """fp64 logits compute in fp64 (temperature and beta reach the kernel to ~48 bits):
    outputs and gradients within 1e-12 of the fp64 reference."""
    x, y = _kl_pair(50, torch.float64)
    tok = _tokens(x)
    lp, h, st = tv.token_logprobs_forward(x, tok, 0.7, -100, True)
    (lp64, h64, _), g64 = _tok_ref(x, tok, 0.7, _upstream(x.shape[0], 13, torch.float64),
                                   _upstream(x.shape[0], 14, torch.float64))
    assert lp.dtype == h.dtype == st.dtype == torch.float64
    tight = dict(atol=1e-12, rtol=1e-12)
    assert_values_close(lp, lp64, **tight)
    assert_values_close(h, h64, **tight)
    grad = tv.token_logprobs_backward(_upstream(x.shape[0], 13, torch.float64),
                                      _upstream(x.shape[0], 14, torch.float64), x, tok, st,
                                      0.7, -100)
    assert grad.dtype == torch.float64
    assert_values_close(grad, g64, **tight)
    for kind, beta in KL_CASES[:3]:  # (beta = 0, 1: test_kl_blocks)
        kl, sp, sq = tv.kl_divergence_forward(x, y, None, kind, beta, 0.7)
        kl64, sp64, sq64 = ref.kl_divergence_forward(x, y, None, kind, beta, 0.7)
        assert kl.dtype == torch.float64
        assert_values_close(kl, kl64, **tight, what=f"{kind} {beta}")
        g = _upstream(x.shape[0], 15, torch.float64)
        got = tv.kl_divergence_backward(g, x, y, None, sp, sq, kind, beta, 0.7, True)
        exp = ref.kl_divergence_backward(g, x, y, None, sp64, sq64, kind, beta, 0.7, True)
        assert_values_close(got[0], exp[0], **tight, what=f"{kind} {beta} grad")
        assert_values_close(got[1], exp[1], **tight, what=f"{kind} {beta} ref grad")


def _everything(x, y, tok, mask, g1, g2):
    """Forward outputs and gradients of every kernel (upstream gradients ``g1``, ``g2``), in
    a flat list."""
    out = list(tv.token_logprobs_forward(x, tok, 0.7, -100, True))
    out.append(tv.token_logprobs_backward(g1, g2, x, tok, out[2], 0.7, -100))
    for kind, beta in KL_CASES[:3]:
        kl, sp, sq = tv.kl_divergence_forward(x, y, mask, kind, beta, 0.7)
        out += [kl, sp, sq, *tv.kl_divergence_backward(g1, x, y, mask, sp, sq, kind, beta, 0.7,
                                                       True)]
    return out


def _check_invariance(x, y, tok, mask, rows):
    """Two runs give the same bits; each row of ``rows`` alone gives the same bits as inside
    the batch (outputs, statistics and gradient rows)."""
    n = x.shape[0]
    g1, g2 = _upstream(n, 16).to(x.device), _upstream(n, 17).to(x.device)
    first, second = (_everything(x, y, tok, mask, g1, g2) for _ in range(2))
    assert all(bit_equal(a, b) for a, b in zip(first, second)), "two runs differ"
    for r in rows:
        one = slice(r, r + 1)
        alone = _everything(x[one], y[one], tok[one], mask[one], g1[one], g2[one])
        for i, (a, b) in enumerate(zip(first, alone)):
            assert bit_equal(a[one], b), f"row {r}, result #{i} differs alone / in batch"


def test_determinism_and_batch_invariance(small_blocks):
    x, y = _kl_pair(50, torch.bfloat16)
    tok = _tokens(x)
    mask = torch.arange(x.shape[0]) % 4 == 1
    # row 1: peaked in its last block, ignored by the KL mask; row 2: the max tied across
    # blocks (a row alone takes the same path as in the batch, block by block)
    _check_invariance(x, y, tok, mask, rows=(1, 2))


def test_public_api_uses_the_kernels(small_blocks):
    """The public ops with backend="triton" route here (several blocks per row) and match the
    naive fp64 formulas, forward and backward."""
    x, y = _kl_pair(50, torch.bfloat16)
    tok = _tokens(x)
    xl = x.clone().requires_grad_(True)
    lp, h = rlkernels.token_logprobs(xl, tok, temperature=0.9, return_entropy=True,
                                     backend="triton")
    xn = x.double().requires_grad_(True)
    lpn = naive.token_logprobs(xn, tok, 0.9)
    hn = naive.entropy_masked(xn, tok, 0.9)
    assert_values_close(lp, lpn.detach())
    assert_values_close(h, hn.detach())
    (g,) = torch.autograd.grad((lp * 0.3).sum() + h.sum(), xl)
    (gn,) = torch.autograd.grad((lpn * 0.3).sum() + hn.sum(), xn)
    assert_grad_close(g, gn, torch.bfloat16, fp32_floor(x, temperature=0.9, upstream=1.3))
    yl = y.clone().requires_grad_(True)
    kl = rlkernels.kl_divergence(xl, yl, kind="jsd", beta=0.3, backend="triton")
    kln = naive.kl_divergence(xn, y.double(), "jsd", 0.3)
    assert_values_close(kl, kln.detach())


# ============================================================================== math helpers

def test_block_size_choice():
    assert _common.block_v(1) == _common.BLOCK_V_MIN
    assert _common.block_v(7) == 16 and _common.block_v(129) == 256
    assert _common.block_v(151936) == _common.BLOCK_V_MAX
    assert _common.block_v(151936, torch.float64) == _common.BLOCK_V_MAX // 4
    for v in (1, 7, 129, 4097, 50257):
        for dtype in (torch.bfloat16, torch.float64):
            b = _common.block_v(v, dtype)
            assert b & (b - 1) == 0 and b >= _common.BLOCK_V_MIN


def test_split_hyper_parameters():
    for c in (1.0, 1 / 0.7, 0.3, math.log(0.3), -math.inf):
        hi, lo = _common.split(c)
        assert float(torch.tensor(hi, dtype=torch.float32)) == hi
        assert float(torch.tensor(lo, dtype=torch.float32)) == lo
        if math.isfinite(c):
            assert abs(hi + lo - c) <= 1e-14 * abs(c)
        else:
            assert hi == c and lo == 0.0


@triton.jit
def _helpers_kernel(x_ptr, l1p_ptr, em1_ptr, lae_ptr, n, IS_FP64: tl.constexpr,
                    BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    inb = offs < n
    x = tl.load(x_ptr + offs, mask=inb, other=0.0)
    tl.store(l1p_ptr + offs, _common.log1p(tl.abs(x), IS_FP64), mask=inb)
    tl.store(em1_ptr + offs, _common.expm1(x, IS_FP64), mask=inb)
    tl.store(lae_ptr + offs, _common.logaddexp(x, -0.5 * x, IS_FP64), mask=inb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_log1p_expm1_logaddexp(dtype):
    """The jit helpers within a few ulps of torch in fp64, across their branch points."""
    x = torch.cat([torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-12, -1e-9, 0.2499, 0.25, 0.2501,
                                 -0.4999, -0.5, -0.5001, 0.5, 3.0, -3.0, -20.0, 40.0,
                                 -math.inf]),
                   torch.logspace(-8, 1, 60), -torch.logspace(-8, 1, 60)]).to(dtype).to(DEV)
    n = x.numel()
    l1p, em1, lae = (torch.empty_like(x) for _ in range(3))
    block = triton.next_power_of_2(n)
    with _common.device_guard(x):
        _helpers_kernel[(1,)](x, l1p, em1, lae, n, IS_FP64=dtype == torch.float64, BLOCK=block)
    x64 = x.double().cpu()
    eps = torch.finfo(dtype).eps
    for got, want, name in ((l1p, torch.log1p(x64.abs()), "log1p"),
                            (em1, torch.expm1(x64), "expm1"),
                            (lae, torch.logaddexp(x64, -0.5 * x64), "logaddexp")):
        got = got.double().cpu()
        finite = torch.isfinite(want)
        assert torch.equal(got[~finite], want[~finite]), name
        err = ((got - want).abs() / want.abs().clamp_min(1e-300))[finite]
        assert float(err.max()) <= 4 * eps, f"{name}: max relative error {float(err.max()):.2e}"


# ===================================================================================== GPU

def _gpu_rows_close(x, tok, logp, ent, grad, rows, g_lp, g_h, temperature):
    """Compare selected rows of a big GPU run with the fp64 reference on those rows (CPU)."""
    xr = x[rows].cpu()
    tr = tok[rows].cpu()
    (lp64, h64, st64), g64 = _tok_ref(xr, tr, temperature, g_lp[rows].cpu(), g_h[rows].cpu())
    assert_values_close(logp[rows].cpu(), lp64, what="logp rows")
    assert_values_close(ent[rows].cpu(), h64, what="entropy rows")
    floor = fp32_floor(xr, temperature=temperature,
                       upstream=float(g_lp.abs().max() + g_h.abs().max()))
    assert_grad_close(grad[rows].cpu(), g64, x.dtype, floor, what="grad rows")


@pytest.mark.gpu
def test_gpu_qwen_vocab_beyond_int32_offsets():
    """V = 151936 at N = 16384 in bf16: N * V = 2.5e9 > 2**31, so the last rows start past
    int32 offsets. Rows at both ends (and the middle) against the fp64 reference; in-place
    backward into the logits buffer gives the same bits as out-of-place."""
    n, vocab = 16384, 151936
    assert n * vocab > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (2.0 * torch.randn(n, vocab, generator=g, device="cuda")).to(torch.bfloat16)
    peaks = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    x[torch.arange(0, n, 3, device="cuda"), peaks[::3]] += 30.0
    tok = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    tok[::5] = peaks[::5]
    tok[7::11] = -100
    logp, ent, stats = tv.token_logprobs_forward(x, tok, 0.9, -100, True)
    g_lp = torch.randn(n, generator=g, device="cuda")
    g_h = torch.randn(n, generator=g, device="cuda")
    grad = tv.token_logprobs_backward(g_lp, g_h, x, tok, stats, 0.9, -100)
    rows = torch.tensor([0, 1, 2, 7, n // 2, 14134, 14135, n - 3, n - 2, n - 1])
    _gpu_rows_close(x, tok, logp, ent, grad, rows, g_lp, g_h, 0.9)
    x_rows = x[rows].clone()
    grad_rows = grad[rows].clone()
    del grad
    inplace = tv.token_logprobs_backward(g_lp, g_h, x, tok, stats, 0.9, -100, out=x)
    assert inplace.data_ptr() == x.data_ptr()
    assert bit_equal(inplace[rows], grad_rows)
    del x, inplace
    # kl_divergence at the same size: rows at both ends against the reference
    y = (2.0 * torch.randn(n, vocab, generator=g, device="cuda")).to(torch.bfloat16)
    x = torch.empty_like(y)
    x.copy_(y)
    x[rows] = x_rows
    kl, sp, sq = tv.kl_divergence_forward(x, y, None, "reverse", 0.5, 1.0)
    gk = torch.randn(n, generator=g, device="cuda")
    gz, _ = tv.kl_divergence_backward(gk, x, y, None, sp, sq, "reverse", 0.5, 1.0, False)
    kl64, sp64, sq64 = ref.kl_divergence_forward(x[rows].cpu().double(), y[rows].cpu().double(),
                                                 None, "reverse", 0.5, 1.0)
    assert_values_close(kl[rows].cpu(), kl64)
    gz64, _ = ref.kl_divergence_backward(gk[rows].cpu().double(), x[rows].cpu().double(),
                                         y[rows].cpu().double(), None, sp64, sq64, "reverse",
                                         0.5, 1.0, False)
    floor = fp32_floor(x[rows].cpu(), y[rows].cpu(), upstream=float(gk.abs().max()))
    assert_grad_close(gz[rows].cpu(), gz64, torch.bfloat16, floor)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """Forward and backward of both ops captured in one CUDA graph (no host sync, no
    allocation that changes between replays) replay to the eager bits."""
    n, vocab = 64, 151936
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (2.0 * torch.randn(n, vocab, generator=g, device="cuda")).to(torch.bfloat16)
    y = (2.0 * torch.randn(n, vocab, generator=g, device="cuda")).to(torch.bfloat16)
    tok = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    tok[::7] = -100
    gl = torch.randn(n, generator=g, device="cuda")
    mask = torch.arange(n, device="cuda") % 5 == 0

    def step():
        lp, h, st = tv.token_logprobs_forward(x, tok, 0.7, -100, True)
        gx = tv.token_logprobs_backward(gl, gl, x, tok, st, 0.7, -100)
        kl, sp, sq = tv.kl_divergence_forward(x, y, mask, "jsd", 0.3, 0.7)
        gz, gw = tv.kl_divergence_backward(gl, x, y, mask, sp, sq, "jsd", 0.3, 0.7, True)
        return lp, h, gx, kl, gz, gw

    eager = step()  # compiles the kernels outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert all(bit_equal(a, b) for a, b in zip(eager, captured))


@pytest.mark.gpu
def test_gpu_determinism_and_batch_invariance():
    """At full vocabulary on the GPU: two runs bit-identical; a row alone (N = 1) gives the
    same bits as inside a batch of 257 rows."""
    n, vocab = 257, 151936
    g = torch.Generator(device="cuda").manual_seed(2)
    x = (2.0 * torch.randn(n, vocab, generator=g, device="cuda")).to(torch.bfloat16)
    x[::4, 1000] += 30.0
    y = (2.0 * torch.randn(n, vocab, generator=g, device="cuda")).to(torch.bfloat16)
    tok = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    mask = torch.arange(n, device="cuda") % 6 == 0
    _check_invariance(x, y, tok, mask, rows=(0, 4, 130, n - 1))
