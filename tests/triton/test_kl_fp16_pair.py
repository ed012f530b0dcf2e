"""The fp16 one-pass KL forward (``rlkernels.triton.vocab._kl_fwd_kernel`` with ``FAST_F16``):
fp16 pairs are loaded without the ``-2e30`` floor (fp16 cannot hold it), the two differences
are floored instead and the ``d = +inf`` flag comes from a non-finite lane sum
(``_kl_lane_step2``'s ``FLOOR_D``). On CPU the interpreter runs that arithmetic after a
plain load (the packed ``f16x2`` order and ``cvt`` of a GPU are compiled, not run, here).

Blocks of 16 columns (``BLOCK_V_MAX`` patched) so that the paired-block loop, its odd last
block and the masked tail all run: V = 50 (3 full blocks + 2 columns), V = 80 (5 full
blocks), V = 64 (4 full blocks, no tail). Finite fp16 rows give the **same bits** as the
fp32 kernel on the same values (the floors only move ``-inf`` columns, whose weights are
exactly 0 either way); ``-inf`` / NaN rows give the reference's ``inf`` / NaN.
"""

import math

import pytest
import torch

import rlkernels
from _naive import assert_values_close, bit_equal, make_logits

if rlkernels.available_backends()["triton"] != "ok":
    pytest.skip(f"triton backend unavailable: {rlkernels.available_backends()['triton']}",
                allow_module_level=True)

from rlkernels.reference import vocab as ref  # noqa: E402
from rlkernels.triton import _common  # noqa: E402
from rlkernels.triton import vocab as tv  # noqa: E402

SMALL_BLOCK = 16


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 columns (pairs of blocks per loop iteration: 32 columns)."""
    monkeypatch.setattr(_common, "BLOCK_V_MAX", SMALL_BLOCK)
    assert _common.block_v(50) == SMALL_BLOCK


def _pair(vocab, seed):
    """fp16 rows: normal, peaked (+12 at a column of the first block pair, so that the
    lane's reference ``o`` is set early), flat, a rising row (the max moves every block),
    and rows with -inf columns in both rows at the same places (p = q = 0 there)."""
    x = make_logits(8, vocab, torch.float64, kind="normal", seed=seed)
    y = make_logits(8, vocab, torch.float64, kind="normal", seed=seed + 1)
    x[1, 5] += 12.0
    y[1, 5] += 11.5
    x[2] = 0.25
    x[3] = torch.linspace(-6.0, 6.0, vocab, dtype=torch.float64)
    y[3] = torch.linspace(-5.0, 5.5, vocab, dtype=torch.float64)
    for r, cols in ((4, [0, 9, 17, 33, vocab - 1]), (5, list(range(0, vocab, 3)))):
        x[r, cols] = -math.inf
        y[r, cols] = -math.inf
    x[6, : vocab - 1] = -math.inf  # p lives in the last column only (the masked tail)
    y[6, : vocab // 2] = -math.inf
    return x.half(), y.half()


@pytest.mark.parametrize("vocab", [50, 64, 80])
@pytest.mark.parametrize("kind", ["reverse", "forward"])
def test_fp16_pair_same_bits_as_fp32(small_blocks, kind, vocab):
    """fp16 inputs (unfloored loads, floored differences, no dmax) against the fp32 kernel
    on the same values (floored loads, dmax): the same kl and statistics, bit for bit; and
    within SPEC of the fp64 reference."""
    x, y = _pair(vocab, seed=vocab)
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[7] = True
    got = tv.kl_divergence_forward(x, y, mask, kind, 0.5, 0.7)
    base = tv.kl_divergence_forward(x.float(), y.float(), mask, kind, 0.5, 0.7)
    for a, b in zip(got, base):
        assert bit_equal(a, b)
    kl64, sp64, sq64 = ref.kl_divergence_forward(x.double(), y.double(), mask, kind, 0.5, 0.7)
    assert_values_close(got[0], kl64, what=f"{kind} kl")
    keep = ~mask  # an ignored row's statistics are 0, never read
    assert_values_close(got[1][keep], sp64[keep], what=f"{kind} stats_p")
    assert_values_close(got[2][keep], sq64[keep], what=f"{kind} stats_q")
    assert (got[0][mask] == 0).all()


@pytest.mark.parametrize("vocab", [50, 80])
def test_fp16_pair_zero_q_flags_inf(small_blocks, vocab):
    """q = 0 under p > 0 makes KL(p || q) inf wherever the column lies (first block pair,
    the odd last block, the masked tail), even when the column's weight underflows in fp32
    (x 120 below the row max) and when the column is the lane's running arg-max; columns
    where both rows are -inf add nothing; p = 0 under q > 0 leaves KL(p || q) finite."""
    x, y = _pair(vocab, seed=3)
    x, y = x.clone(), y.clone()
    x[0, 2] = x[0].max() - 120.0  # weight 0 in fp32, p > 0 mathematically
    y[0, 2] = -math.inf
    y[1, 5] = -math.inf  # the peak of row 1 (its lane's arg-max)
    y[2, 40] = -math.inf  # the odd last block at V = 50 (columns 32-47), block 2 at V = 80
    y[3, vocab - 1] = -math.inf  # the masked tail at V = 50
    x[4, 20] = -math.inf  # p = 0, q > 0: KL(p || q) finite, KL(q || p) inf
    x[6, vocab - 1] = 1.0
    for kind in ("reverse", "forward"):
        kl, sp, sq = tv.kl_divergence_forward(x, y, None, kind, 0.5, 1.0)
        kl64, sp64, sq64 = ref.kl_divergence_forward(x.double(), y.double(), None, kind, 0.5,
                                                     1.0)
        assert bit_equal(torch.isinf(kl), torch.isinf(kl64)), (kind, kl, kl64)
        want_inf = [0, 1, 2, 3] if kind == "reverse" else [4]
        assert torch.isinf(kl[want_inf]).all() and (kl[want_inf] > 0).all()
        fin = torch.isfinite(kl64)
        assert_values_close(kl[fin], kl64[fin], what=f"{kind} kl")
        assert_values_close(sp, sp64, what=f"{kind} stats_p (max, log s)")
        assert_values_close(sq, sq64, what=f"{kind} stats_q (max, log s)")


def test_fp16_pair_empty_and_nan_rows(small_blocks, vocab=50):
    """A row of only -inf in both inputs: KL 0 (as the reference); a NaN in either row (in
    the paired loop or the tail): that row's KL is NaN, the other rows keep their bits."""
    x, y = _pair(vocab, seed=9)
    x, y = x.clone(), y.clone()
    x[2] = -math.inf
    y[2] = -math.inf
    clean = tv.kl_divergence_forward(x, y, None, "reverse", 0.5, 1.0)[0]
    kl64 = ref.kl_divergence_forward(x.double(), y.double(), None, "reverse", 0.5, 1.0)[0]
    assert clean[2] == 0 and kl64[2] == 0
    x[0, 7] = float("nan")
    y[1, 30] = float("nan")
    y[3, vocab - 1] = float("nan")
    x[5, 3] = float("nan")  # a column that is -inf in y (row 5: every third column)
    for kind in ("reverse", "forward"):
        kl = tv.kl_divergence_forward(x, y, None, kind, 0.5, 1.0)[0]
        assert torch.isnan(kl[[0, 1, 3, 5]]).all(), (kind, kl)
        keep = [2, 4, 6, 7]
        base = tv.kl_divergence_forward(x[keep], y[keep], None, kind, 0.5, 1.0)[0]
        assert bit_equal(kl[keep], base)
        if kind == "reverse":
            assert bit_equal(kl[keep], clean[keep])


def test_fp16_pair_launch_flag(small_blocks):
    """The launcher turns the fp16 pair path on for fp16 / fp16 one-pass launches only (a
    test of the path above would pass vacuously if it did not)."""
    flags = []
    orig = tv._pair_forward

    def spy(kernel, logits, ref_logits, ignore_mask, given_p, *rest):
        meta = rest[-1]
        flags.append(meta(logits, ref_logits, torch.float32, given_p is not None)["FAST_F16"])
        return orig(kernel, logits, ref_logits, ignore_mask, given_p, *rest)

    x, y = _pair(50, seed=1)
    try:
        tv._pair_forward = spy
        tv.kl_divergence_forward(x, y, None, "reverse", 0.5, 1.0)
        tv.kl_divergence_forward(x, y, None, "forward", 0.5, 1.0)
        tv.kl_divergence_forward(x.float(), y.float(), None, "reverse", 0.5, 1.0)
        tv.kl_divergence_forward(x, y.bfloat16(), None, "reverse", 0.5, 1.0)
        tv.kl_divergence_forward(x, y, None, "jsd", 0.5, 1.0)
    finally:
        tv._pair_forward = orig
    assert flags == [True, True, False, False, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_jsd_partial_forward_folds_constants(small_blocks, dtype, beta, vocab=50):
    """The partial (vocabulary-parallel) JSD forward puts ``-log2 beta`` / ``log2(1 - beta)``
    into its terms (``_jsd_pass2`` with ``SUM_PQ``: ``log2 beta`` through the ``lg2`` when
    beta >= 1/2, else ``log2(1 - beta)``) instead of summing p and q: two shards' parts add up
    to the full forward's kl and saved sums and match the fp64 reference; at beta = 0 or 1
    every part is exactly 0."""
    x, y = _pair(vocab, seed=21)
    x, y = x.to(dtype), y.to(dtype)
    # row 6 (p in one column where q > 0, q = 0 on half the row): the fp64 reference gives
    # NaN at beta = 1 (its 0 log 0), the kernels 0; compared on the other rows
    x, y = x[:6], y[:6]
    kl, sp, sq = tv.kl_divergence_forward(x, y, None, "jsd", beta, 0.7)
    kl64, sp64, sq64 = ref.kl_divergence_forward(x.double(), y.double(), None, "jsd", beta, 0.7)
    assert_values_close(kl, kl64, what="jsd kl")
    parts = [tv.kl_divergence_partial_forward(x[:, s].contiguous(), y[:, s].contiguous(), None,
                                              sp, sq, "jsd", beta, 0.7)
             for s in (slice(0, 21), slice(21, vocab))]
    s_p = sum(p[1][:, 2] for p in parts)
    s_q = sum(p[2][:, 2] for p in parts)
    assert_values_close(s_p + s_q, kl64, what="shards' kl")
    assert_values_close(s_p, sp64[:, 2], what="shards' sum p a_p")
    assert_values_close(s_q, sq64[:, 2], what="shards' sum q a_q")
    if beta in (0.0, 1.0):
        for p in parts:
            assert (p[0] == 0).all() and (p[1][:, 2] == 0).all() and (p[2][:, 2] == 0).all()
