"""Kernel-level tests of the triton policy-loss kernels (``rlkernels.triton.policy``) against
the reference functions (``rlkernels.reference.policy``), for what the generic backend tests
of ``tests/ops`` do not reach: every option combination, ties at the clip boundaries, the
tiling of ``[B, T]``, strides and mixed dtypes, determinism.

On CPU the kernels run in the Triton interpreter, where each launch costs tens of
milliseconds: cases are tiny and the option grid is covered by cycling the secondary options
through the 24 (loss, ratio level, agg) combinations rather than by a full product. Shapes:

* B=4, T=7: the default case (T odd, one tile of whole rows);
* ``_TILE`` shrunk to 16 (fixture ``small_tiles``): T=37 is streamed in 3 chunks of 16 (the
  last partial), one row per tile; B=7, T=5 with ``_TILE`` 64 gives row tiles of 4 rows, the
  last one partial;
* T=1 (Triton specializes an int argument equal to 1), B=1, and empty shapes.

fp64 inputs are compared at ``atol=1e-12`` (the kernels compute in fp64 there), metrics
(fp32 outputs) at 1e-6. The ``gpu`` tests (skipped without CUDA) cover 512 x 4096 tokens and
CUDA-graph capture.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import rlkernels
from rlkernels._policy_options import PolicyOptions
from rlkernels.reference import policy as ref

if rlkernels.available_backends()["triton"] != "ok":
    pytest.skip(f"triton backend unavailable: {rlkernels.available_backends()['triton']}",
                allow_module_level=True)

from rlkernels.triton import policy as tp  # noqa: E402

F64 = torch.float64
HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
LOSSES = ("ppo", "cispo", "reinforce")
RATIO_LEVELS = ("token", "sequence")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl", "k3+")


# ================================================================================== helpers

def make_inputs(B=4, T=7, *, seed=0, adv="B", mask="bool", spread=0.4, dtype=F64, device=DEV):
    """Random policy inputs (log-ratios ~ N(0, spread): clipping at 0.2 is active on a good
    share of tokens; advantages of both signs; about a quarter of the positions masked)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3.0 - 0.05
    logp = old + spread * torch.randn(B, T, generator=g, dtype=F64)
    advantages = torch.randn((B,) if adv == "B" else (B, T), generator=g, dtype=F64)
    keep = torch.rand(B, T, generator=g, dtype=F64) > 0.25
    if mask == "bool":
        m = keep
    elif mask == "int":
        m = keep.to(torch.int64)
    else:  # float weights in (0.1, 1.1), 0 where masked
        m = torch.where(keep, 0.1 + torch.rand(B, T, generator=g, dtype=F64), 0.0)
    out = dict(logp=logp, old_logp=old, advantages=advantages, mask=m,
               ref_logp=old + 0.3 * torch.randn(B, T, generator=g, dtype=F64),
               entropy=2.0 * torch.rand(B, T, generator=g, dtype=F64),
               is_weights=0.25 + 1.5 * torch.rand(B, T, generator=g, dtype=F64))
    return {k: (v.to(dtype) if v.is_floating_point() and k != "mask" else v).to(device)
            for k, v in out.items()}


def run(module, inp, o, *, normalizer=None, use_ref=True, use_entropy=True, use_isw=False,
        grad=1.7):
    """``(loss, metrics, grad_logp, grad_entropy)`` of one backend's kernel functions."""
    args = (inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], normalizer,
            inp["ref_logp"] if use_ref else None, inp["entropy"] if use_entropy else None,
            inp["is_weights"] if use_isw else None, o)
    loss, metrics = module.policy_loss_forward(*args)
    if not isinstance(grad, torch.Tensor):
        grad = torch.tensor(grad, dtype=loss.dtype, device=loss.device)
    g_lp, g_ent = module.policy_loss_backward(grad, *args)
    return loss, metrics, g_lp, g_ent


def assert_match(got, want, *, atol=1e-12, rtol=1e-10, metric_tol=1e-6, equal_nan=False):
    loss, metrics, g_lp, g_ent = got
    loss_r, metrics_r, g_lp_r, g_ent_r = want
    assert loss.shape == () and loss.dtype == loss_r.dtype
    assert metrics.shape == (len(ref.METRICS),) and metrics.dtype == torch.float32
    torch.testing.assert_close(loss.cpu(), loss_r.cpu(), atol=atol, rtol=rtol,
                               equal_nan=equal_nan)
    for i, name in enumerate(ref.METRICS):
        torch.testing.assert_close(metrics[i].cpu(), metrics_r[i].cpu(), atol=metric_tol,
                                   rtol=metric_tol, equal_nan=equal_nan,
                                   msg=lambda m, name=name: f"metric {name}: {m}")
    assert g_lp.dtype == g_lp_r.dtype and g_lp.shape == g_lp_r.shape
    torch.testing.assert_close(g_lp.cpu(), g_lp_r.cpu(), atol=atol, rtol=rtol,
                               equal_nan=equal_nan)
    assert (g_ent is None) == (g_ent_r is None)
    if g_ent is not None:
        assert g_ent.dtype == g_ent_r.dtype
        torch.testing.assert_close(g_ent.cpu(), g_ent_r.cpu(), atol=atol, rtol=rtol,
                                   equal_nan=equal_nan)


def both(inp, o, **kw):
    return run(tp, inp, o, **kw), run(ref, inp, o, **kw)


def bit_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(-1).view(torch.uint8 if a.element_size() == 1 else
                        {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]),
        b.view(-1).view(torch.uint8 if b.element_size() == 1 else
                        {2: torch.int16, 4: torch.int32, 8: torch.int64}[b.element_size()]))


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 elements: a row of 37 tokens is streamed in 3 chunks, one row per tile."""
    monkeypatch.setattr(tp, "_TILE", 16)
    assert tp._blocks(3, 37) == (1, 16)


# ====================================================================== the option grid

# The 24 (loss, ratio level, agg) combinations, each twice, with the secondary options
# cycled so that every KL estimator, dual clip / delta on and off, is_weights, normalizer
# (float / int tensor), [B] / [B, T] advantages and bool / int / float masks meet every loss
# kind, ratio level and aggregation.
_GRID = []
for _i, (_loss, _level, _agg, _variant) in enumerate(
        itertools.product(LOSSES, RATIO_LEVELS, AGGS, (0, 1))):
    _GRID.append(dict(
        loss=_loss, ratio_level=_level, agg=_agg,
        kl_estimator=KL_ESTIMATORS[_i % len(KL_ESTIMATORS)],
        dual_clip=1.5 if _variant == 0 else None,
        delta=1.4 if (_i // 2) % 2 == 0 else None,
        use_isw=(_i % 3 != 0), normalizer=(None, 9.0, "int")[_i % 3],
        adv=("B", "BT")[(_i // 3) % 2], mask=("bool", "float", "int")[(_i // 2) % 3],
        entropy_coef=(0.0, 0.01, -0.3)[_i % 3], kl_coef=(0.1, 0.0)[(_i // 6) % 2]))


def _grid_id(case):
    return "-".join(str(case[k]) for k in ("loss", "ratio_level", "agg", "kl_estimator")) + \
        f"-dual{case['dual_clip']}-delta{case['delta']}"


@pytest.mark.parametrize("index", range(len(_GRID)), ids=[_grid_id(c) for c in _GRID])
def test_option_grid_matches_reference(index):
    case = dict(_GRID[index])
    inp = make_inputs(seed=index, adv=case.pop("adv"), mask=case.pop("mask"))
    use_isw = case.pop("use_isw")
    norm = case.pop("normalizer")
    if norm == "int":
        norm = torch.tensor(13, device=DEV)
    elif norm is not None:
        norm = torch.tensor(norm, dtype=F64, device=DEV)
    if case["loss"] != "ppo":
        case["dual_clip"] = case["delta"] = None
    o = PolicyOptions.from_kwargs(clip_high=0.28, **case)
    got, want = both(inp, o, normalizer=norm, use_isw=use_isw)
    assert_match(got, want)
    masked = (inp["mask"] == 0).cpu()
    assert (got[2].cpu()[masked] == 0).all() and (got[3].cpu()[masked] == 0).all()


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_estimators_large_and_tiny_differences(estimator):
    """k3 = expm1(-d) + d without cancellation: tiny d (1e-9) and large |d| (8) both match
    the reference's torch.expm1 to fp64 rounding."""
    inp = make_inputs(B=2, T=6, seed=3)
    d = torch.tensor([[1e-9, -1e-9, 3e-5, -0.4, 8.0, -8.0],
                      [0.0, 1e-300, 0.49, 0.51, -0.5, 2.0]], dtype=F64, device=DEV)
    inp["ref_logp"] = inp["logp"] - d
    inp["mask"] = torch.ones(2, 6, dtype=torch.bool, device=DEV)
    o = PolicyOptions.from_kwargs(kl_coef=0.3, kl_estimator=estimator)
    got, want = both(inp, o, use_entropy=False)
    assert_match(got, want, atol=1e-14, rtol=1e-12)
    if estimator in ("k3", "low_var_kl", "k3+"):
        assert got[1][7].item() > 0


# ============================================================================== boundaries

def _exp_tie(d: float) -> float:
    """``exp(d)`` where the interpreter's numpy and torch agree bit for bit, so that a clip
    bound built from it ties exactly in both backends."""
    r = torch.exp(torch.tensor(d, dtype=F64)).item()
    import numpy as np
    assert float(np.exp(np.float64(d))) == r, "pick another d"
    return r


def test_ties_at_the_clip_boundaries():
    """``r`` exactly ``1 + clip_high`` (A > 0), exactly ``1 - clip_low`` (A < 0), exactly
    the dual-clip bound (A < 0), and ``logp - old_logp`` exactly at the log-ratio clamp:
    inclusive clip ranges (gradient kept, not counted as clipped) and the half/half split
    of the dual-clip tie, as the reference."""
    up, down, far = 0.125, -0.25, 1.5
    r_up, r_down, r_far = _exp_tie(up), _exp_tie(down), _exp_tie(far)
    clip_high, clip_low = r_up - 1.0, 1.0 - r_down
    assert 1.0 + clip_high == r_up and 1.0 - clip_low == r_down
    old = torch.tensor([[-1.0] * 6], dtype=F64, device=DEV)
    log_r = torch.tensor([[up, down, far, 0.5, 0.5 + 2 ** -40, 0.0]], dtype=F64, device=DEV)
    inp = dict(logp=old + log_r, old_logp=old,
               advantages=torch.tensor([[1.0, -1.0, -2.0, 1.0, 1.0, 0.5]], dtype=F64,
                                       device=DEV),
               mask=torch.ones(1, 6, dtype=torch.bool, device=DEV),
               ref_logp=old, entropy=torch.zeros_like(old), is_weights=None)
    assert torch.equal(inp["logp"] - old, log_r)  # the log-ratios are exact
    for o in (PolicyOptions.from_kwargs(clip_low=clip_low, clip_high=clip_high,
                                        dual_clip=r_far),
              PolicyOptions.from_kwargs(clip_low=clip_low, clip_high=clip_high,
                                        dual_clip=r_far, delta=r_far)):
        got, want = both(inp, o, use_ref=False, use_entropy=False)
        assert_match(got, want)
        g = got[2][0].cpu() / (1.7 / 6)
        # token 0 (r == 1 + clip_high, A = 1): a tie of the max, both branches d = -A r
        assert g[0].item() == pytest.approx(-r_up, rel=1e-14)
        # token 1 (r == 1 - clip_low, A = -1): the same on the low side
        assert g[1].item() == pytest.approx(r_down, rel=1e-14)
        # token 2 (-A r == -c A, A = -2): the dual-clip tie, half the unclipped gradient
        assert g[2].item() == pytest.approx(0.5 * 2.0 * r_far, rel=1e-14)
        # ties are not counted as clipped (only tokens 3 and 4, r = e^0.5 > 1 + clip_high)
        assert got[1][1].item() == pytest.approx(2 / 6)
        assert got[1][2].item() == 0.0 and got[1][3].item() == 0.0
    # the log-ratio clamp: d == clamp keeps the gradient (inclusive), d past it has none
    o = PolicyOptions.from_kwargs(clip_low=0.9, clip_high=5.0, log_ratio_clamp=0.5)
    got, want = both(inp, o, use_ref=False, use_entropy=False)
    assert_match(got, want)
    assert got[2][0, 3].item() != 0.0 and got[2][0, 4].item() == 0.0


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("normalizer", [None, 4.0])
def test_all_masked(agg, normalizer):
    inp = make_inputs(seed=5)
    inp["mask"] = torch.zeros_like(inp["mask"])
    norm = None if normalizer is None else torch.tensor(normalizer, dtype=F64, device=DEV)
    o = PolicyOptions.from_kwargs(agg=agg, ratio_level="sequence", kl_coef=0.1,
                                  entropy_coef=0.2)
    got, want = both(inp, o, normalizer=norm, use_isw=True)
    assert_match(got, want)
    loss, metrics, g_lp, g_ent = got
    assert loss.item() == 0.0 and (metrics == 0).all()
    assert (g_lp == 0).all() and (g_ent == 0).all()


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("loss", ["ppo", "cispo"])
@pytest.mark.parametrize("level", RATIO_LEVELS)
def test_one_sequence_empty(agg, loss, level):
    inp = make_inputs(B=3, T=6, seed=6)
    inp["mask"][1] = False
    o = PolicyOptions.from_kwargs(loss=loss, ratio_level=level, agg=agg, clip_low=0.05)
    got, want = both(inp, o)
    assert_match(got, want)
    assert (got[2][1] == 0).all() and (got[3][1] == 0).all()
    assert torch.isfinite(got[0])


# =================================================================================== tiling

@pytest.mark.parametrize("level", RATIO_LEVELS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_rows_streamed_in_chunks(small_tiles, level, agg):
    """T=37 with 16-token chunks: the GSPO sequence mean and the per-sequence sums are
    accumulated over 3 chunks, the last one partial."""
    inp = make_inputs(B=3, T=37, seed=7, adv="BT")
    o = PolicyOptions.from_kwargs(ratio_level=level, agg=agg, clip_low=0.05, dual_clip=2.0,
                                  kl_coef=0.1, entropy_coef=0.01)
    assert_match(*both(inp, o, use_isw=True))


@pytest.mark.parametrize("min_programs,tiling", [(1, (4, 16)), (3, (2, 16)), (8, (1, 16))])
@pytest.mark.parametrize("agg", AGGS)
def test_partial_row_tiles(monkeypatch, min_programs, tiling, agg):
    """B=7, T=5 with ``_TILE`` 64: tiles of 4 rows (2 tiles, the last one has 3 rows), of 2
    rows when at least 3 programs are asked for (4 tiles), of one row for 8 (7 tiles); the
    forward's partials and the backward's counts are added over the tiles."""
    monkeypatch.setattr(tp, "_TILE", 64)
    monkeypatch.setattr(tp, "_MIN_PROGRAMS", min_programs)
    assert tp._blocks(7, 5) == tiling
    inp = make_inputs(B=7, T=5, seed=8)
    inp["mask"][2] = False
    o = PolicyOptions.from_kwargs(agg=agg, ratio_level="sequence", kl_coef=0.1,
                                  entropy_coef=0.01)
    assert_match(*both(inp, o))


@pytest.mark.parametrize("B,T", [(1, 1), (5, 1), (1, 9), (3, 1100), (0, 4), (3, 0)])
def test_odd_shapes(B, T):
    """T=1 (Triton specializes an int argument equal to 1), single rows, T > one tile
    (1100 = 1024 + a partial chunk), and empty batches."""
    inp = make_inputs(B=B, T=T, seed=9)
    for o in (PolicyOptions.from_kwargs(agg="seq-mean-token-mean", ratio_level="sequence",
                                        kl_coef=0.1, entropy_coef=0.01),
              PolicyOptions.from_kwargs(agg="seq-mean-token-sum-norm", dual_clip=3.0)):
        assert_match(*both(inp, o, use_isw=True))


# ============================================================================ dtypes, strides

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """fp32 compute for every non-fp64 input: the loss is fp32, gradients in the dtypes of
    logp / entropy; compared with the reference on the same (rounded) values."""
    inp = make_inputs(B=4, T=9, seed=10, dtype=dtype, adv="BT")
    o = PolicyOptions.from_kwargs(clip_high=0.28, dual_clip=2.0, kl_coef=0.1,
                                  entropy_coef=0.01, agg="seq-mean-token-mean")
    got, want = both(inp, o, use_isw=True)
    assert got[0].dtype == torch.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
    for g, g_r in zip(got[2:], want[2:]):
        tol = 2 * eps * g_r.double().abs().max().item() + 1e-7
        assert (g.double() - g_r.double()).abs().max().item() <= tol


def test_mixed_dtypes_and_strides():
    """fp32 logp with bf16 old_logp, fp64 advantages, an int64 mask, fp16 entropy and an int
    normalizer; non-contiguous views (every other column of a wider tensor, a transposed
    tensor, [B, T] advantages expanded from [B, 1] with a zero stride)."""
    base = make_inputs(B=4, T=14, seed=11, dtype=torch.float32)
    logp = base["logp"][:, ::2]
    old = base["old_logp"].t().contiguous().t()[:, 1::2].to(torch.bfloat16)
    adv = torch.randn(4, 1, dtype=F64, device=DEV).expand(4, 7)
    mask = base["mask"][:, ::2].to(torch.int64)
    inp = dict(logp=logp, old_logp=old, advantages=adv, mask=mask,
               ref_logp=base["ref_logp"].t()[:7].t(), entropy=base["entropy"][:, 3:10].half(),
               is_weights=base["is_weights"][:, ::2])
    assert not logp.is_contiguous() and adv.stride(1) == 0
    contiguous = {k: v.contiguous() for k, v in inp.items()}
    o = PolicyOptions.from_kwargs(kl_coef=0.1, entropy_coef=0.05, agg="seq-mean-token-sum")
    norm = torch.tensor(6, device=DEV)
    got = run(tp, inp, o, normalizer=norm, use_isw=True)
    assert_match(got, run(ref, inp, o, normalizer=norm, use_isw=True), atol=1e-6, rtol=1e-5)
    # strides do not change a bit of the result
    again = run(tp, contiguous, o, normalizer=norm, use_isw=True)
    for a, b in zip(got, again):
        assert bit_equal(a, b)


def test_fp64_normalizer_with_fp32_logp():
    """The normalizer is cast to the compute dtype (fp32) like the reference does."""
    inp = make_inputs(seed=12, dtype=torch.float32)
    norm = torch.tensor(1.0 / 3.0, dtype=F64, device=DEV)
    o = PolicyOptions.from_kwargs(agg="token-mean")
    got, want = both(inp, o, normalizer=norm, use_ref=False, use_entropy=False)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=2e-7)


def test_nan_in_masked_positions():
    """A NaN at a masked position stays out of the loss and the gradients (where(m != 0));
    the metrics see it exactly as the reference's ``x * m`` does."""
    inp = make_inputs(seed=13)
    inp["mask"][0, 2] = False
    inp["logp"][0, 2] = float("nan")
    o = PolicyOptions.from_kwargs(kl_coef=0.1)
    got, want = both(inp, o, use_entropy=False)
    assert torch.isfinite(got[0]) and torch.isfinite(got[2]).all()
    assert_match(got, want, equal_nan=True)


# ============================================================================ determinism

def test_deterministic_and_row_invariant_gradients():
    """Two runs are bit-identical; with a normalizer a row's gradient does not depend on the
    other rows of the call (seq-mean-token-mean, GSPO)."""
    inp = make_inputs(B=6, T=9, seed=14, adv="BT")
    o = PolicyOptions.from_kwargs(ratio_level="sequence", agg="seq-mean-token-mean",
                                  kl_coef=0.1, entropy_coef=0.01, clip_low=0.05)
    norm = torch.tensor(6.0, dtype=F64, device=DEV)
    first = run(tp, inp, o, normalizer=norm, use_isw=True)
    second = run(tp, inp, o, normalizer=norm, use_isw=True)
    for a, b in zip(first, second):
        assert bit_equal(a, b)
    rows = {k: v[2:4] for k, v in inp.items()}
    part = run(tp, rows, o, normalizer=norm, use_isw=True)
    assert bit_equal(part[2], first[2][2:4]) and bit_equal(part[3], first[3][2:4])


def test_through_the_public_op():
    """policy_loss(backend="triton") runs these kernels and matches backend="torch"."""
    inp = make_inputs(seed=15)
    res = {}
    for backend in ("triton", "torch"):
        lp = inp["logp"].clone().requires_grad_(True)
        loss, metrics = rlkernels.policy_loss(lp, inp["old_logp"], inp["advantages"],
                                              inp["mask"], ref_logp=inp["ref_logp"],
                                              kl_coef=0.1, dual_clip=2.0, backend=backend)
        (g,) = torch.autograd.grad(loss, lp)
        res[backend] = (loss, torch.stack(list(metrics.values())), g)
    for a, b in zip(res["triton"], res["torch"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-6)


# ============================================================================ GPU build

# The interpreter does not compile anything: these capture the launches of the real launchers
# on GPU-like meta tensors (benchmarks/sm90_compile.py, in a subprocess without
# TRITON_INTERPRET) and build them for sm_90 (TTIR -> PTX -> cubin with Triton's bundled
# ptxas, no GPU needed). The build caught two fp64-only failures the CPU tests cannot see
# (tl.fdiv's precise fp64 division, tl.clamp(x, -c, c)'s fp32-only xorsign intrinsic).
_BUILD_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "benchmarks")
import sm90_compile as S
from rlkernels._policy_options import PolicyOptions as O
from rlkernels.triton import policy as K

def launches(options, dtype, b=512, t=4096):
    def run():
        lp, old, ref, ent, w = (S.gpu(b, t, dtype=dtype) for _ in range(5))
        adv, mask = S.gpu(b, dtype=dtype), S.gpu(b, t, dtype=torch.bool)
        for o in options:
            args = (lp, old, adv, mask, None, ref, ent, w, o)
            loss, _ = K.policy_loss_forward(*args)
            K.policy_loss_backward(loss, *args)
    found, errors = S.capture_launches([("policy", run)], 90)
    assert not errors, errors
    return found

MODE = sys.argv[1]
if MODE == "recompile":
    # two settings that differ only in float hyper-parameters: the same compiled kernels
    base = dict(dual_clip=3.0, delta=1.5, kl_estimator="k3", agg="seq-mean-token-mean")
    one = launches([O.from_kwargs(clip_low=0.2, kl_coef=0.0, entropy_coef=0.0, **base)],
                   torch.float32)
    two = launches([O.from_kwargs(clip_low=0.2, kl_coef=0.0, entropy_coef=0.0, **base),
                    O.from_kwargs(clip_low=0.1, clip_high=0.28, kl_coef=0.05,
                                  entropy_coef=0.01, log_ratio_clamp=10.0,
                                  **dict(base, dual_clip=2.5, delta=1.8))], torch.float32)
    print("variants", len(one), len(two))
    for launch in two.values():
        floats = [v for v in launch.constexprs.values() if isinstance(v, float)]
        assert not floats, (launch.kernel, floats)
        # a float argument is bound as fp64 (a plain Python float would be fp32)
        assert "fp32" not in launch.signature.values(), (launch.kernel, launch.signature)
    assert set(one) == set(two), sorted(l.kernel for l in two.values())
    print("same")
else:
    found = {}
    for dtype, kw in ((torch.float32, dict(ratio_level="sequence", agg="seq-mean-token-mean",
                                           dual_clip=2.0, delta=1.5)),
                      (torch.float64, dict(loss="cispo", kl_estimator="abs")),
                      (torch.float64, dict(ratio_level="sequence", agg="seq-mean-token-sum",
                                           dual_clip=2.0))):
        found.update(launches([O.from_kwargs(kl_coef=0.1, entropy_coef=0.01, **kw)], dtype))
    for launch in found.values():
        res = S.compile_launch(launch, 90)
        assert res.ok and not res.flags, (res.kernel, res.config, res.error, res.flags)
    print("built", len(found))
"""


def _run_build_script(tmp_path, mode):
    import os
    import pathlib
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, mode], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_kernels_build_for_sm90(tmp_path):
    """Every policy kernel compiles for sm_90 at 512 x 4096, fp32 and fp64, without spills."""
    assert "built" in _run_build_script(tmp_path, "build")


def test_float_hyper_parameters_compile_nothing_new(tmp_path):
    """Launches of two settings that differ only in ``clip_low``, ``clip_high``,
    ``dual_clip``, ``delta``, ``kl_coef``, ``entropy_coef`` and ``log_ratio_clamp`` bind to
    the same compiled kernels (the same signature, constexprs and attributes) as one
    setting: no float reaches a kernel as a constexpr, and no flag depends on a value."""
    assert "same" in _run_build_script(tmp_path, "recompile")


def test_many_programs(monkeypatch):
    """At B=64, T=512 every policy kernel runs on at least 8 programs (row tiles of 2 rows,
    32 programs), except the one program that adds the forward's partials."""
    grids = {}

    def spy(kernel):
        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    grids.setdefault(kernel.__name__ if hasattr(kernel, "__name__")
                                     else kernel.fn.__name__, []).append(grid)
                    return kernel[grid](*args, **kwargs)
                return launch
        return Spy()

    for name in ("_policy_fwd_kernel", "_policy_finish_kernel", "_policy_rowstat_kernel",
                 "_policy_bwd_kernel"):
        monkeypatch.setattr(tp, name, spy(getattr(tp, name)))
    inp = make_inputs(B=64, T=512, seed=30, dtype=torch.float32)
    o = PolicyOptions.from_kwargs(ratio_level="sequence", agg="seq-mean-token-mean")
    args = tuple(inp[k] for k in ("logp", "old_logp", "advantages", "mask"))
    loss, _ = tp.policy_loss_forward(*args, None, None, None, None, o)
    tp.policy_loss_backward(torch.ones_like(loss), *args, None, None, None, None, o)
    assert set(grids) == {"_policy_fwd_kernel", "_policy_finish_kernel",
                          "_policy_rowstat_kernel", "_policy_bwd_kernel"}
    for name, launched in grids.items():
        want = 1 if name == "_policy_finish_kernel" else 32
        assert launched == [(want,)], (name, launched)


# ================================================================================== GPU

def _gpu_inputs(dtype=torch.float32):
    # 512 sequences x 4096 tokens, a realistic RL batch; ragged lengths (right padding)
    inp = make_inputs(B=512, T=4096, seed=20, dtype=dtype, adv="B", device="cuda")
    lengths = torch.randint(1, 4097, (512,), generator=torch.Generator().manual_seed(21))
    inp["mask"] = (torch.arange(4096)[None, :] < lengths[:, None]).cuda()
    inp["mask"][7] = False  # an empty sequence
    return inp


@pytest.mark.gpu
@pytest.mark.parametrize("level", RATIO_LEVELS)
@pytest.mark.parametrize("agg", AGGS)
def test_gpu_large_matches_reference(level, agg):
    inp = _gpu_inputs()
    o = PolicyOptions.from_kwargs(ratio_level=level, agg=agg, clip_high=0.28, dual_clip=3.0,
                                  kl_coef=0.05, entropy_coef=0.01,
                                  clip_low=0.2 if level == "token" else 0.003)
    got = run(tp, inp, o, use_isw=True)
    exact = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    want = run(ref, exact, o, use_isw=True)
    # fp32 sums over 2M tokens: a reduction, compared at 1e-4 relative
    torch.testing.assert_close(got[0].double(), want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1].double(), want[1].double(), atol=1e-5, rtol=1e-4)
    for g, g_r in zip(got[2:], want[2:]):
        tol = 1e-5 * g_r.abs().max().item() + 1e-9
        assert (g.double() - g_r).abs().max().item() <= tol
    again = run(tp, inp, o, use_isw=True)
    for a, b in zip(got, again):
        assert bit_equal(a, b)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """Forward and backward captured in one CUDA graph (no host sync, no allocation that
    depends on data) and replayed on new values."""
    inp = _gpu_inputs()
    o = PolicyOptions.from_kwargs(ratio_level="sequence", agg="seq-mean-token-mean",
                                  kl_coef=0.05, entropy_coef=0.01, clip_low=0.003)
    norm = torch.tensor(512.0, device="cuda")
    static = {k: v.clone() for k, v in inp.items()}
    grad = torch.tensor(1.7, device="cuda")
    run(tp, static, o, normalizer=norm, use_isw=True, grad=grad)  # compile before capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(tp, static, o, normalizer=norm, use_isw=True, grad=grad)
    torch.cuda.current_stream().wait_stream(stream)
    new = make_inputs(B=512, T=4096, seed=22, device="cuda", dtype=torch.float32)
    for k in ("logp", "old_logp", "ref_logp", "entropy", "is_weights"):
        static[k].copy_(new[k])
    graph.replay()
    torch.cuda.synchronize()
    eager = run(tp, static, o, normalizer=norm, use_isw=True, grad=grad)
    for a, b in zip(out, eager):
        assert bit_equal(a, b)
    assert math.isfinite(out[0].item())
