"""Tests of ``kl_penalty`` and ``policy_loss`` (SPEC 3.3).

Every expected value and gradient comes from the naive fp64 formulas of
``tests/_policy_naive.py`` (verl / TRL style, plain autograd, Python loops for the masked
aggregations), never from ``rlkernels.reference``. Ops whose gradient is the true derivative
are also checked with ``torch.autograd.gradcheck``; the straight-through ones (GSPO sequence
ratios, CISPO, k3+) only against the naive autograd formula, since finite differences see the
value, not the straight-through gradient.

Shapes are tiny on purpose ([B, T] policy tensors have no vocabulary): B=4, T=7 (T odd, not a
power of two) unless a test needs something else.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlkernels
from rlkernels import kl_penalty, policy_loss

import _policy_naive as naive  # tests/ is on sys.path (tests/conftest.py)

F64 = torch.float64
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "low_var_kl", "k3+")
# Tests taking the `backend` fixture (tests/conftest.py: every backend runnable here) run the
# op on DEV (the GPU when there is one) and compare on the CPU with the naive fp64 formula.
DEV = naive.DEVICE


@pytest.fixture(autouse=True)
def _needs_policy_loss(request):
    if "backend" in request.fixturenames:
        naive.needs(request.getfixturevalue("backend"), "policy", "policy_loss")


def t64(data, **kw):
    return torch.tensor(data, dtype=F64, device=DEV, **kw)


# ================================================================================== inputs

def make_inputs(B=4, T=7, *, seed=0, adv="B", mask="bool", spread=0.4, empty_row=False,
                device=DEV):
    """Random fp64 policy inputs: log-ratios ~ N(0, spread) (so clipping at 0.2 is active on
    a good share of tokens), advantages of both signs, a bool (or float-weight) mask with
    about a quarter of the positions masked, and ref/entropy/is_weights."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3.0 - 0.05
    logp = old + spread * torch.randn(B, T, generator=g, dtype=F64)
    advantages = torch.randn((B,) if adv == "B" else (B, T), generator=g, dtype=F64)
    keep = torch.rand(B, T, generator=g, dtype=F64) > 0.25
    keep[:, 0] = True  # every sequence has a valid token unless asked otherwise
    if mask == "bool":
        m = keep
    else:  # float weights in (0.1, 1.1), 0 where masked
        m = torch.where(keep, 0.1 + torch.rand(B, T, generator=g, dtype=F64), 0.0)
    if empty_row:
        m = m.clone()
        m[1] = 0
    out = dict(
        logp=logp, old_logp=old, advantages=advantages, mask=m,
        ref_logp=old + 0.3 * torch.randn(B, T, generator=g, dtype=F64),
        entropy=2.0 * torch.rand(B, T, generator=g, dtype=F64),
        is_weights=0.25 + 1.5 * torch.rand(B, T, generator=g, dtype=F64),
    )
    return {k: v.to(device) for k, v in out.items()}


def run_both(inp, backend, *, use_ref=False, use_entropy=False, use_isw=False, **kw):
    """Loss, metrics and gradients (w.r.t. logp and entropy) of rlkernels (on the device of
    the inputs) and of the naive formula (on the CPU), with one upstream gradient; all
    results on the CPU."""
    out = {}
    for who in ("lib", "naive"):
        inp = {k: (v if who == "lib" else v.cpu()) for k, v in inp.items()}
        if isinstance(kw.get("normalizer"), torch.Tensor):
            kw["normalizer"] = kw["normalizer"].to(inp["logp"].device)
        lp = inp["logp"].clone().requires_grad_(True)
        ent = inp["entropy"].clone().requires_grad_(True) if use_entropy else None
        args = dict(ref_logp=inp["ref_logp"] if use_ref else None, entropy=ent,
                    is_weights=inp["is_weights"] if use_isw else None, **kw)
        if who == "lib":
            loss, metrics = policy_loss(lp, inp["old_logp"], inp["advantages"], inp["mask"],
                                        backend=backend, **args)
        else:
            loss, metrics = naive.policy_loss(lp, inp["old_logp"], inp["advantages"],
                                              inp["mask"], **args)
        wrt = [lp] + ([ent] if ent is not None else [])
        grads = torch.autograd.grad(1.7 * loss, wrt, allow_unused=True)
        grads = [(torch.zeros_like(w) if g is None else g).cpu() for g, w in zip(grads, wrt)]
        out[who] = (loss.cpu(), {k: v.cpu() for k, v in metrics.items()}, grads)
    return out["lib"], out["naive"]


def assert_metrics(metrics, expected, *, keys=None):
    keys = set(naive.METRIC_KEYS) if keys is None else set(keys)
    assert set(metrics) == set(expected) == keys, (sorted(metrics), sorted(expected))
    for k in keys:
        v = metrics[k]
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad, k
        torch.testing.assert_close(v.double(), expected[k].double(), atol=1e-6, rtol=1e-6,
                                   msg=lambda m: f"metric {k}: {m}")


def assert_same(lib, ref, *, with_ref=False, with_entropy=False):
    (loss, metrics, grads), (loss_n, metrics_n, grads_n) = lib, ref
    assert loss.dim() == 0 and loss.dtype == F64
    torch.testing.assert_close(loss, loss_n.detach(), atol=1e-12, rtol=1e-10)
    for g, gn in zip(grads, grads_n):
        assert g.dtype == F64
        torch.testing.assert_close(g, gn, atol=1e-12, rtol=1e-10)
    keys = set(naive.METRIC_KEYS) | ({"kl"} if with_ref else set()) \
        | ({"entropy"} if with_entropy else set())
    assert_metrics(metrics, metrics_n, keys=keys)


# ============================================================================ policy_loss

CASES = {
    "ppo": dict(),
    "ppo-asym": dict(clip_low=0.2, clip_high=0.28),
    "ppo-dual": dict(dual_clip=1.5),
    "ppo-delta": dict(clip_high=0.28, delta=1.4),
    "ppo-dual-delta": dict(clip_high=0.28, delta=1.4, dual_clip=1.5),
    "cispo": dict(loss="cispo", clip_high=0.28),
    "cispo-clip-low": dict(loss="cispo", clip_low=0.2, clip_high=0.28, cispo_clip_low=True),
    "reinforce": dict(loss="reinforce"),
    "gspo": dict(ratio_level="sequence", clip_low=0.03, clip_high=0.04),
    "gspo-cispo": dict(ratio_level="sequence", loss="cispo", clip_high=0.04),
    "gspo-cispo-clip-low": dict(ratio_level="sequence", loss="cispo", clip_low=0.03,
                                clip_high=0.04, cispo_clip_low=True),
    "log-ratio-clamp": dict(log_ratio_clamp=0.3),
    "gspo-log-ratio-clamp": dict(ratio_level="sequence", log_ratio_clamp=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("adv", ["B", "BT"])
def test_policy_loss_matches_naive(backend, case, adv):
    inp = make_inputs(adv=adv, seed=list(CASES).index(case))
    lib, ref = run_both(inp, backend, **CASES[case])
    assert_same(lib, ref)


def test_log_ratio_clamp_is_active_and_cuts_the_gradient(backend):
    inp = make_inputs(spread=1.0)
    lib, ref = run_both(inp, backend, loss="ppo", clip_low=0.9, clip_high=5.0,
                        log_ratio_clamp=0.5)
    assert_same(lib, ref)
    clamped = (((inp["logp"] - inp["old_logp"]).abs() > 0.5) & inp["mask"]).cpu()
    assert clamped.any()
    assert (lib[2][0][clamped] == 0).all()
    assert lib[1]["ratio_max"].item() == pytest.approx(math.exp(0.5), rel=1e-6)


@pytest.mark.parametrize("case", ["ppo", "ppo-dual", "cispo", "reinforce", "gspo"])
def test_policy_loss_is_weights(backend, case):
    lib, ref = run_both(make_inputs(seed=3), backend, use_isw=True, **CASES[case])
    assert_same(lib, ref)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_policy_loss_kl_terms(backend, estimator):
    lib, ref = run_both(make_inputs(seed=4), backend, use_ref=True, kl_coef=0.1,
                        kl_estimator=estimator)
    assert_same(lib, ref, with_ref=True)


def test_policy_loss_kl_metric_without_kl_coef(backend):
    """With ref_logp but kl_coef=0 the KL is reported but does not enter the loss."""
    inp = make_inputs(seed=5)
    lib, ref = run_both(inp, backend, use_ref=True, kl_estimator="k2")
    assert_same(lib, ref, with_ref=True)
    lib0, _ = run_both(inp, backend)
    assert torch.equal(lib[0], lib0[0])
    assert lib[1]["kl"].item() > 0


@pytest.mark.parametrize("coef", [0.0, 0.01, -0.5])
def test_policy_loss_entropy_term(backend, coef):
    lib, ref = run_both(make_inputs(seed=6), backend, use_entropy=True, entropy_coef=coef)
    assert_same(lib, ref, with_entropy=True)
    if coef == 0.0:
        assert (lib[2][1] == 0).all()


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("normalizer", [None, 9, 2.5, "tensor", "int-tensor"])
@pytest.mark.parametrize("mask", ["bool", "float"])
def test_policy_loss_agg_modes(backend, agg, normalizer, mask):
    inp = make_inputs(seed=7, mask=mask)
    if normalizer == "tensor":
        normalizer = torch.tensor(11.0, dtype=F64)
    elif normalizer == "int-tensor":
        normalizer = torch.tensor(13)
    lib, ref = run_both(inp, backend, agg=agg, normalizer=normalizer, use_entropy=True,
                        entropy_coef=0.01)
    assert_same(lib, ref, with_entropy=True)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("case", ["ppo", "gspo", "cispo"])
def test_policy_loss_sequence_without_valid_token(backend, agg, case):
    inp = make_inputs(seed=8, empty_row=True)
    lib, ref = run_both(inp, backend, agg=agg, **CASES[case])
    assert_same(lib, ref)
    assert (lib[2][0][1] == 0).all()
    assert torch.isfinite(lib[0])


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("normalizer", [None, 4.0])
def test_policy_loss_all_masked(backend, agg, normalizer):
    inp = make_inputs(seed=9)
    inp["mask"] = torch.zeros_like(inp["mask"])
    lib, ref = run_both(inp, backend, agg=agg, normalizer=normalizer, use_entropy=True,
                        entropy_coef=0.1, use_ref=True, kl_coef=0.1)
    assert_same(lib, ref, with_ref=True, with_entropy=True)
    loss, metrics, grads = lib
    assert loss.item() == 0.0
    for g in grads:
        assert torch.isfinite(g).all() and (g == 0).all()
    for k, v in metrics.items():
        assert v.item() == 0.0, k


def poison_masked(inp, value):
    """A copy of ``inp`` with ``value`` at every masked position of every ``[B, T]`` input
    (``logp``, ``old_logp``, ``ref_logp``, ``entropy``, ``is_weights``, ``[B, T]``
    advantages): issue 16, masked values must not reach the loss, a gradient or a metric."""
    out = dict(inp)
    masked = inp["mask"] == 0
    for k in ("logp", "old_logp", "ref_logp", "entropy", "is_weights", "advantages"):
        if inp[k].shape == masked.shape:
            out[k] = torch.where(masked, torch.full_like(inp[k], value), inp[k])
    return out


MASKED_CASES = {
    "ppo-dual": dict(dual_clip=1.5, clip_high=0.28),
    "cispo": dict(loss="cispo", clip_high=0.28),
    "cispo-clip-low": dict(loss="cispo", clip_high=0.28, cispo_clip_low=True),
    "reinforce": dict(loss="reinforce", agg="seq-mean-token-sum"),
    "gspo": dict(ratio_level="sequence", clip_low=0.03, clip_high=0.04,
                 agg="seq-mean-token-mean"),
}


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("case", list(MASKED_CASES))
def test_masked_positions_reach_no_metric(backend, case, poison):
    """NaN / +-inf at masked positions of every [B, T] input: loss, gradients and every
    metric equal those of the same inputs with finite values there (bit for bit: a masked
    position contributes an exact 0 to every sum)."""
    inp = make_inputs(B=3, T=5, seed=21, adv="BT", empty_row=True)
    opts = dict(use_ref=True, use_entropy=True, use_isw=True, kl_coef=0.1, entropy_coef=0.01,
                **MASKED_CASES[case])
    clean, _ = run_both(inp, backend, **opts)
    dirty, _ = run_both(poison_masked(inp, poison), backend, **opts)
    assert set(dirty[1]) == set(clean[1]) == set(naive.METRIC_KEYS) | {"kl", "entropy"}
    for k, v in dirty[1].items():
        assert torch.isfinite(v), (k, v)
        assert torch.equal(v, clean[1][k]), (k, v, clean[1][k])
    assert torch.equal(dirty[0], clean[0])
    for g, g_clean in zip(dirty[2], clean[2]):
        assert torch.equal(g, g_clean)


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_float_mask_weights(backend, agg):
    """Float masks are weights: doubling every weight changes nothing for the means."""
    inp = make_inputs(seed=10, mask="float")
    lib, ref = run_both(inp, backend, agg=agg, use_ref=True, kl_coef=0.05)
    assert_same(lib, ref, with_ref=True)


def test_gspo_float_mask_weights_below_one(backend):
    inp = make_inputs(B=2, T=3, seed=11)
    inp["mask"] = torch.tensor([[0.3, 0.4, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    lib, ref = run_both(inp, backend, ratio_level="sequence", clip_low=0.5, clip_high=0.5)
    assert_same(lib, ref)


def test_gspo_straight_through_gradient(backend):
    """GSPO: the value uses exp(s) of the sequence mean s; d/d logp_t is that of
    ``sg(s) + logp - sg(logp)``: -A exp(s) / n for an unclipped token (token-mean)."""
    logp = t64([[-1.0, -2.0, -0.5]], requires_grad=True)
    old = t64([[-1.1, -1.95, -0.5]])
    adv = t64([2.0])
    mask = torch.tensor([[True, True, False]], device=DEV)
    loss, metrics = policy_loss(logp, old, adv, mask, ratio_level="sequence", clip_low=0.2,
                                backend=backend)
    s = (0.1 - 0.05) / 2
    assert loss.item() == pytest.approx(-2.0 * math.exp(s), rel=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(g, t64([[-math.exp(s), -math.exp(s), 0.0]]), atol=1e-14,
                               rtol=1e-12)
    assert metrics["approx_kl"].item() == pytest.approx(-s, rel=1e-6)
    assert metrics["ratio_max"].item() == pytest.approx(math.exp(s), rel=1e-6)


def test_dual_clip_bounds_negative_advantages(backend):
    """A < 0 and a huge ratio: PPO's loss -A r is bounded by -c A (c = dual_clip) with zero
    gradient; A > 0 and a huge ratio: the upper clip, no dual clip."""
    logp = t64([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    old = t64([[-3.0, -3.0, -0.1, 0.5]])  # r = e^3, e^3, e^0.1, e^-0.5
    adv = t64([[-1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool, device=DEV)
    loss, metrics = policy_loss(logp, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-sum",
                                backend=backend)
    (g,) = torch.autograd.grad(loss, logp)
    expected = 3.0 + (-1.2) + math.exp(0.1) + 0.8
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(g, t64([[0.0, 0.0, math.exp(0.1), 0.0]]))
    assert metrics["dual_clipfrac"].item() == pytest.approx(0.25)
    assert metrics["clipfrac_high"].item() == pytest.approx(0.25)
    assert metrics["clipfrac_low"].item() == pytest.approx(0.25)  # r = e^-0.5 < 0.8, A < 0
    assert metrics["clipfrac"].item() == pytest.approx(0.5)
    # without dual clip the first token costs e^3
    loss2, _ = policy_loss(logp, old, adv, mask, agg="seq-mean-token-sum", backend=backend)
    assert loss2.item() == pytest.approx(expected - 3.0 + math.exp(3.0), rel=1e-12)


def test_delta_caps_the_ratio(backend):
    """TRL's two-sided clip: with A < 0 the unclipped r is capped at delta."""
    logp = t64([[0.0, 0.0]], requires_grad=True)
    old = t64([[-2.0, -2.0]])  # r = e^2 = 7.39
    adv = t64([[-1.0, 1.0]])
    loss, _ = policy_loss(logp, old, adv, t64([[1.0, 1.0]]), delta=3.0, clip_high=0.28,
                          agg="seq-mean-token-sum", backend=backend)
    assert loss.item() == pytest.approx(3.0 - 1.28, rel=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    assert (g == 0).all()


def test_metric_definitions_by_hand(backend):
    """clipfrac = clipfrac_high + clipfrac_low (disjoint cases), approx_kl = mean(-log r),
    ratio_mean, ratio_max = masked max (the masked-out huge ratio is ignored)."""
    logp = t64([[0.0] * 6])
    log_r = t64([0.5, -0.5, 0.5, -0.5, 0.05, 3.0])
    old = logp - log_r
    adv = t64([[1.0, -1.0, -1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool, device=DEV)
    _, m = policy_loss(logp, old, adv, mask, backend=backend)
    # token 0: A>0, r=e^.5 > 1.2 -> high; token 1: A<0, r=e^-.5 < 0.8 -> low; 2, 3, 4: none
    assert m["clipfrac_high"].item() == pytest.approx(0.2)
    assert m["clipfrac_low"].item() == pytest.approx(0.2)
    assert m["clipfrac"].item() == pytest.approx(0.4)
    assert m["dual_clipfrac"].item() == 0.0
    assert m["approx_kl"].item() == pytest.approx(-0.05 / 5, rel=1e-6)
    r = torch.exp(log_r[:5])
    assert m["ratio_mean"].item() == pytest.approx(r.mean().item(), rel=1e-6)
    assert m["ratio_max"].item() == pytest.approx(math.exp(0.5), rel=1e-6)
    assert set(m) == set(naive.METRIC_KEYS)
    # cispo counts r > 1 + clip_high whatever the sign of A; reinforce never clips
    _, mc = policy_loss(logp, old, adv, mask, loss="cispo", backend=backend)
    assert mc["clipfrac"].item() == pytest.approx(0.4)
    assert mc["clipfrac_high"].item() == pytest.approx(0.4)
    assert mc["clipfrac_low"].item() == 0.0
    _, mr = policy_loss(logp, old, adv, mask, loss="reinforce", backend=backend)
    assert mr["clipfrac"].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_policy_loss_low_precision(backend, dtype):
    """fp32/bf16 inputs (exact in their dtype): fp32 loss within 1e-5 of fp64, gradients in
    the dtype of logp within its rounding, metrics fp32."""
    inp = make_inputs(seed=12, adv="BT")
    low = {k: v.to(dtype) for k, v in inp.items() if v.is_floating_point()}
    low["mask"] = inp["mask"]
    exact = {k: (v.double() if v.is_floating_point() else v) for k, v in low.items()}
    kw = dict(clip_high=0.28, use_ref=True, kl_coef=0.1, use_entropy=True, entropy_coef=0.01)
    lp = low["logp"].clone().requires_grad_(True)
    ent = low["entropy"].clone().requires_grad_(True)
    loss, metrics = policy_loss(lp, low["old_logp"], low["advantages"], low["mask"],
                                ref_logp=low["ref_logp"], kl_coef=0.1, entropy=ent,
                                entropy_coef=0.01, clip_high=0.28, backend=backend)
    assert loss.dtype == torch.float32
    g_lp, g_ent = torch.autograd.grad(loss, [lp, ent])
    assert g_lp.dtype == dtype and g_ent.dtype == dtype
    _, (loss_r, metrics_r, grads_r) = run_both(exact, backend, **kw)  # the naive fp64 one
    torch.testing.assert_close(loss.double().cpu(), loss_r.detach(), atol=1e-5, rtol=1e-5)
    naive.grad_bound(g_lp.cpu(), grads_r[0] * (1 / 1.7))
    naive.grad_bound(g_ent.cpu(), grads_r[1] * (1 / 1.7))
    for k, v in metrics_r.items():
        assert metrics[k].dtype == torch.float32
        torch.testing.assert_close(metrics[k].cpu().double(), v, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- micro-batching invariance

@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_micro_batching_invariance(backend, agg, ratio_level):
    """With a global normalizer the losses of two micro-batches add up to the whole batch's
    loss (and so do the gradients)."""
    inp = make_inputs(B=6, seed=13, empty_row=True)
    m = inp["mask"]
    normalizer = {"token-mean": float(m.sum()), "seq-mean-token-mean": 6.0,
                  "seq-mean-token-sum": float((m.sum(-1) > 0).sum()),
                  "seq-mean-token-sum-norm": 7.0}[agg]
    kw = dict(agg=agg, ratio_level=ratio_level, ref_logp=inp["ref_logp"], kl_coef=0.1)
    lp = inp["logp"].clone().requires_grad_(True)
    whole, _ = policy_loss(lp, inp["old_logp"], inp["advantages"], m, backend=backend,
                           normalizer=normalizer, **kw)
    (g_whole,) = torch.autograd.grad(whole, lp)
    parts, g_parts = [], []
    for rows in (slice(0, 2), slice(2, 6)):
        lp_p = inp["logp"][rows].clone().requires_grad_(True)
        kw_p = dict(kw, ref_logp=inp["ref_logp"][rows])
        loss_p, _ = policy_loss(lp_p, inp["old_logp"][rows], inp["advantages"][rows], m[rows],
                                backend=backend, normalizer=torch.tensor(normalizer, device=DEV),
                                **kw_p)
        parts.append(loss_p)
        g_parts.append(torch.autograd.grad(loss_p, lp_p)[0])
    torch.testing.assert_close(parts[0] + parts[1], whole, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(torch.cat(g_parts), g_whole, atol=1e-14, rtol=1e-12)
    if agg in ("token-mean", "seq-mean-token-sum"):  # the default normalizer is the global one
        default, _ = policy_loss(inp["logp"], inp["old_logp"], inp["advantages"], m,
                                 backend=backend, **kw)
        torch.testing.assert_close(default, whole, atol=1e-14, rtol=1e-13)


# ------------------------------------------------------------------------------ gradcheck

GRADCHECK_CASES = {
    "ppo": dict(clip_high=0.28),
    "ppo-dual-seq-mean": dict(dual_clip=1.5, agg="seq-mean-token-mean"),
    "reinforce": dict(loss="reinforce", agg="seq-mean-token-sum"),
    "kl-k1": dict(kl_coef=0.2, kl_estimator="k1"),
    "kl-k2": dict(kl_coef=0.2, kl_estimator="k2"),
    "kl-k3": dict(kl_coef=0.2, kl_estimator="k3"),
    "entropy": dict(entropy_coef=0.3, agg="seq-mean-token-sum-norm"),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_policy_loss_gradcheck(backend, case):
    inp = make_inputs(B=3, T=5, seed=14, adv="BT")
    kw = dict(GRADCHECK_CASES[case])
    ref = inp["ref_logp"] if "kl_coef" in kw else None
    lp = inp["logp"].clone().requires_grad_(True)
    ent = inp["entropy"].clone().requires_grad_(True)

    def fn(lp_, ent_):
        return policy_loss(lp_, inp["old_logp"], inp["advantages"], inp["mask"],
                           ref_logp=ref, entropy=ent_, backend=backend, **kw)[0]

    assert torch.autograd.gradcheck(fn, (lp, ent))


# ------------------------------------------------------------------------------ hypothesis

@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(B=st.integers(1, 5), T=st.integers(1, 9), seed=st.integers(0, 10_000),
       loss=st.sampled_from(["ppo", "cispo", "reinforce"]),
       ratio_level=st.sampled_from(["token", "sequence"]), agg=st.sampled_from(AGGS),
       clip_low=st.floats(0.0, 0.9), clip_extra=st.floats(0.0, 0.5),
       dual=st.sampled_from([None, 1.5, 3.0]), adv=st.sampled_from(["B", "BT"]),
       normalizer=st.sampled_from([None, 3.0]), kl_est=st.sampled_from(KL_ESTIMATORS))
def test_policy_loss_hypothesis(B, T, seed, loss, ratio_level, agg, clip_low, clip_extra, dual,
                                adv, normalizer, kl_est):
    inp = make_inputs(B, T, seed=seed, adv=adv, spread=0.5)
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    inp["mask"] = keep.to(DEV)
    lib, ref = run_both(inp, "torch", loss=loss, ratio_level=ratio_level, agg=agg,
                        clip_low=clip_low, clip_high=clip_low + clip_extra,
                        dual_clip=dual if loss == "ppo" else None, normalizer=normalizer,
                        use_ref=True, kl_coef=0.05, kl_estimator=kl_est, use_entropy=True,
                        entropy_coef=0.01)
    assert_same(lib, ref, with_ref=True, with_entropy=True)


# ================================================================================ kl_penalty

def kl_inputs(seed=0, shape=(3, 5), scale=1.0):
    g = torch.Generator().manual_seed(seed)
    ref = -3.0 * torch.rand(shape, generator=g, dtype=F64)
    logp = ref + scale * torch.randn(shape, generator=g, dtype=F64)
    return logp, ref


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_penalty_matches_naive(estimator):
    logp, ref = kl_inputs(1)
    up = torch.randn(logp.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    res = {}
    for who, f in (("lib", lambda a, b: kl_penalty(a, b, estimator=estimator)),
                   ("naive", lambda a, b: naive.kl(a, b, estimator))):
        a, b = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
        v = f(a, b)
        res[who] = (v,) + torch.autograd.grad(v, [a, b], up)
    assert res["lib"][0].dtype == F64
    for x, y in zip(res["lib"], res["naive"]):
        torch.testing.assert_close(x, y.detach(), atol=1e-13, rtol=1e-12)
    if estimator == "k3+":  # the value of k3, the gradient of k2
        d = logp - ref
        torch.testing.assert_close(res["lib"][1], up * d)
        torch.testing.assert_close(res["lib"][0], naive.kl(logp, ref, "k3"))


@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "low_var_kl"])
def test_kl_penalty_gradcheck(estimator):
    logp, ref = kl_inputs(3)
    assert torch.autograd.gradcheck(
        lambda a, b: kl_penalty(a, b, estimator=estimator),
        (logp.requires_grad_(True), ref.requires_grad_(True)))


@pytest.mark.parametrize("estimator,clamp", [("k3", (-10.0, 10.0)), ("k1", (-1.0, 0.5)),
                                             ("k3+", (0.0, 1.0)), ("abs", (0.2, 0.8))])
def test_kl_penalty_clamp(estimator, clamp):
    logp, ref = kl_inputs(4, shape=(4, 8), scale=3.0)
    a, b = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    v = kl_penalty(a, b, estimator=estimator, clamp=clamp)
    g_a, g_b = torch.autograd.grad(v.sum(), [a, b])
    a2, b2 = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
    v2 = torch.clamp(naive.kl(a2, b2, estimator), *clamp)
    n_a, n_b = torch.autograd.grad(v2.sum(), [a2, b2])
    torch.testing.assert_close(v, v2.detach(), atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(g_a, n_a, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(g_b, n_b, atol=1e-13, rtol=1e-12)
    unclamped = naive.kl(logp, ref, estimator)
    outside = (unclamped < clamp[0]) | (unclamped > clamp[1])
    assert outside.any() and (~outside).any()
    assert (g_a[outside] == 0).all() and (g_b[outside] == 0).all()
    assert (v >= clamp[0]).all() and (v <= clamp[1]).all()


@pytest.mark.parametrize("dtypes,out", [
    ((torch.bfloat16, torch.bfloat16), torch.float32),
    ((torch.float16, torch.float16), torch.float32),
    ((torch.float32, torch.float32), torch.float32),
    ((torch.bfloat16, torch.float32), torch.float32),
    ((torch.float64, torch.float64), torch.float64),
])
@pytest.mark.parametrize("estimator", ["k1", "k3", "k3+"])
def test_kl_penalty_dtypes(dtypes, out, estimator):
    logp, ref = kl_inputs(5)
    a = logp.to(dtypes[0]).requires_grad_(True)
    b = ref.to(dtypes[1]).requires_grad_(True)
    v = kl_penalty(a, b, estimator=estimator)
    assert v.dtype == out
    g_a, g_b = torch.autograd.grad(v.sum(), [a, b])
    assert g_a.dtype == a.dtype and g_b.dtype == b.dtype
    exact = naive.kl(a.detach().double(), b.detach().double(), estimator)
    torch.testing.assert_close(v.double(), exact, atol=1e-5, rtol=1e-5)


def test_kl_penalty_opcheck():
    logp, ref = kl_inputs(6)
    for args in [(logp.float().requires_grad_(True), ref.float(), "k3", None, None),
                 (logp.requires_grad_(True), ref.requires_grad_(True), "k1", -0.5, 0.5),
                 (logp.bfloat16(), ref.bfloat16(), "k3+", -10.0, 10.0)]:
        torch.library.opcheck(torch.ops.rlkernels.kl_penalty.default, args)


def test_policy_loss_opcheck():
    inp = make_inputs(B=2, T=3, seed=15)
    from rlkernels._policy_options import PolicyOptions
    modes, nums = PolicyOptions.from_kwargs(kl_coef=0.1, entropy_coef=0.01).encode()
    args = (inp["logp"].float().requires_grad_(True), inp["old_logp"].float(),
            inp["advantages"].float(), inp["mask"], torch.tensor(5.0, device=DEV),
            inp["ref_logp"].float(), inp["entropy"].float().requires_grad_(True), None, modes,
            nums, "torch")
    torch.library.opcheck(torch.ops.rlkernels.policy_loss.default, args)


def test_policy_loss_compiles(backend):
    inp = make_inputs(seed=16)

    def f(lp):
        loss, metrics = policy_loss(lp, inp["old_logp"], inp["advantages"], inp["mask"],
                                    ref_logp=inp["ref_logp"], kl_coef=0.1, backend=backend)
        return loss, metrics["clipfrac"]

    lp = inp["logp"].clone().requires_grad_(True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss_c, cf_c = compiled(lp)
    (g_c,) = torch.autograd.grad(loss_c, lp)
    loss_e, cf_e = f(lp)
    (g_e,) = torch.autograd.grad(loss_e, lp)
    assert torch.equal(loss_c, loss_e) and torch.equal(cf_c, cf_e) and torch.equal(g_c, g_e)


def test_policy_loss_compile_with_backward_in_graph(backend):
    inp = make_inputs(seed=17)

    def step(lp):
        loss, _ = policy_loss(lp, inp["old_logp"], inp["advantages"], inp["mask"],
                              backend=backend)
        (g,) = torch.autograd.grad(loss, lp)
        return loss.detach(), g

    lp = inp["logp"].clone().requires_grad_(True)
    eager = step(lp)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(lp)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ==================================================================================== errors

def _args(B=2, T=3):
    inp = make_inputs(B, T)
    return inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"]


BT = torch.zeros(2, 3, dtype=F64)
ERRORS = [
    ("logp-1d", dict(logp=torch.zeros(6, dtype=F64)), ValueError,
     r"logp: expected a 2-d tensor, got shape \(6,\)"),
    ("old_logp-shape", dict(old_logp=torch.zeros(2, 4, dtype=F64)), ValueError,
     r"old_logp: expected shape \(2, 3\) .*got \(2, 4\)"),
    ("mask-shape", dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError,
     r"mask: expected shape \(2, 3\) .*got \(3, 2\)"),
    ("ref_logp-shape", dict(ref_logp=torch.zeros(2, 2, dtype=F64)), ValueError,
     r"ref_logp: expected shape \(2, 3\)"),
    ("entropy-shape", dict(entropy=torch.zeros(1, 3, dtype=F64)), ValueError,
     r"entropy: expected shape \(2, 3\)"),
    ("is_weights-shape", dict(is_weights=torch.zeros(2, 3, 1, dtype=F64)), ValueError,
     r"is_weights: expected shape \(2, 3\)"),
    ("advantages-shape", dict(advantages=torch.zeros(3, dtype=F64)), ValueError,
     r"advantages: expected shape \(2,\) or \(2, 3\).*got \(3,\)"),
    ("advantages-3d", dict(advantages=torch.zeros(2, 3, 1, dtype=F64)), ValueError,
     r"advantages: expected shape"),
    ("loss", dict(loss="grpo"), ValueError, r"loss: expected one of 'ppo', .*got 'grpo'"),
    ("agg", dict(agg="mean"), ValueError, r"agg: expected one of .*got 'mean'"),
    ("ratio_level", dict(ratio_level="seq"), ValueError,
     r"ratio_level: expected one of 'token', 'sequence', got 'seq'"),
    ("kl_estimator", dict(kl_estimator="k4"), ValueError,
     r"kl_estimator: expected one of .*got 'k4'"),
    ("clip_low-negative", dict(clip_low=-0.1), ValueError,
     r"clip_low: expected a number >= 0.0, got -0.1"),
    ("clip_low-above-1-ppo", dict(clip_low=1.5), ValueError,
     r"clip_low: expected a number in \[0, 1\].*got 1.5"),
    ("clip_high-negative", dict(clip_high=-0.2), ValueError, r"clip_high: expected a number >= 0"),
    ("dual_clip-1", dict(dual_clip=1.0), ValueError,
     r"dual_clip: expected a number > 1.0, got 1.0"),
    ("dual_clip-0.5", dict(dual_clip=0.5), ValueError, r"dual_clip: expected a number > 1.0"),
    ("delta", dict(delta=1.2, clip_high=0.28), ValueError,
     r"delta: expected a number > 1 \+ clip_high = 1.28, got 1.2"),
    ("kl_coef-without-ref", dict(kl_coef=0.1), ValueError,
     r"ref_logp: expected a \[B, T\] tensor because kl_coef = 0.1 != 0, got None"),
    ("entropy_coef-without-entropy", dict(entropy_coef=0.01), ValueError,
     r"entropy: expected a \[B, T\] tensor because entropy_coef = 0.01 != 0, got None"),
    ("normalizer-zero", dict(normalizer=0), ValueError,
     r"normalizer: expected a finite number > 0, got 0.0"),
    ("normalizer-negative", dict(normalizer=-3.0), ValueError,
     r"normalizer: expected a finite number > 0, got -3.0"),
    ("normalizer-1d", dict(normalizer=torch.tensor([4.0])), ValueError,
     r"normalizer: expected a number or a 0-dim tensor, got a tensor of shape \(1,\)"),
    ("log_ratio_clamp-zero", dict(log_ratio_clamp=0.0), ValueError,
     r"log_ratio_clamp: expected a finite number > 0, got 0.0"),
    ("log_ratio_clamp-negative", dict(log_ratio_clamp=-1.0), ValueError,
     r"log_ratio_clamp: expected a finite number > 0"),
    ("logp-int", dict(logp=torch.zeros(2, 3, dtype=torch.int64)), TypeError,
     r"logp: expected dtype in \(bfloat16, float16, float32, float64\), got int64"),
    ("clip_low-str", dict(clip_low="0.2"), TypeError, r"clip_low: expected a float, got str"),
    ("cispo_clip_low-ppo", dict(cispo_clip_low=True), ValueError,
     r"cispo_clip_low: expected False unless loss='cispo' .*got True with loss='ppo'"),
    ("cispo_clip_low-int", dict(loss="cispo", cispo_clip_low=1), TypeError,
     r"cispo_clip_low: expected a bool, got int"),
    ("clip_low-above-1-cispo-clip-low", dict(loss="cispo", clip_low=1.5, cispo_clip_low=True),
     ValueError, r"clip_low: expected a number in \[0, 1\].*got 1.5"),
]


@pytest.mark.parametrize("name,override,exc,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_policy_loss_errors(name, override, exc, match):
    logp, old, adv, mask = _args()
    pos = dict(logp=logp, old_logp=old, advantages=adv, mask=mask)
    kw = {}
    for k, v in override.items():
        (pos if k in pos else kw)[k] = v
    with pytest.raises(exc, match=match):
        policy_loss(pos["logp"], pos["old_logp"], pos["advantages"], pos["mask"], **kw)


def test_clip_low_above_one_allowed_for_cispo():
    logp, old, adv, mask = _args()
    loss, _ = policy_loss(logp, old, adv, mask, loss="cispo", clip_low=1.5)
    assert torch.isfinite(loss)


def test_cispo_clip_low_is_verls_lower_clamp(backend):
    """Issue 16: verl's cispo clamps the ratio below at 1 - clip_low, TRL's (the default)
    does not. With ratios far below 1 - clip_low the two losses differ; the lower clamp
    shows in clipfrac_low and in the gradient (-clip(r) A, a constant factor)."""
    inp = make_inputs(seed=31, spread=1.0)
    opts = dict(loss="cispo", clip_low=0.2, clip_high=0.28)
    trl, trl_n = run_both(inp, backend, **opts)
    verl, verl_n = run_both(inp, backend, cispo_clip_low=True, **opts)
    assert_same(trl, trl_n)
    assert_same(verl, verl_n)
    r = torch.exp(inp["logp"] - inp["old_logp"]).cpu()
    low = (r < 0.8) & inp["mask"].cpu()
    assert low.any()
    assert trl[1]["clipfrac_low"].item() == 0.0
    assert verl[1]["clipfrac_low"].item() == pytest.approx(
        low.sum().item() / inp["mask"].sum().item(), rel=1e-6)
    assert abs(verl[0].item() - trl[0].item()) > 1e-3
    torch.testing.assert_close(verl[2][0][~low], trl[2][0][~low], atol=1e-15, rtol=1e-13)
    assert not torch.equal(verl[2][0][low], trl[2][0][low])


def test_grpo_divisor_of_trl_and_liger_through_normalizer(backend):
    """docs/math.md, issue 16: seq-mean-token-mean averages over the non-empty sequences
    (verl); TRL's and Liger's "grpo" average over all B sequences (an empty one counts 0):
    normalizer=B reproduces theirs."""
    inp = make_inputs(seed=32, empty_row=True)
    B = inp["logp"].shape[0]
    lp, adv, m = inp["logp"].cpu(), inp["advantages"].cpu(), inp["mask"].cpu().double()
    per_token = -adv[:, None] * lp  # reinforce: the per-token loss in closed form
    trl = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    verl = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).sum() / (m.sum(-1) > 0).sum()
    args = (inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"])
    ours, _ = policy_loss(*args, loss="reinforce", agg="seq-mean-token-mean", backend=backend)
    theirs, _ = policy_loss(*args, loss="reinforce", agg="seq-mean-token-mean", normalizer=B,
                            backend=backend)
    torch.testing.assert_close(ours.cpu(), verl, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(theirs.cpu(), trl, atol=1e-12, rtol=1e-12)
    assert abs(ours.item() - theirs.item()) > 1e-3


@pytest.mark.parametrize("agg", AGGS)
def test_entropy_bonus_is_aggregated_like_the_loss(backend, agg):
    """docs/math.md, issue 16: the entropy term enters the per-token loss, so it is aggregated
    with ``agg`` (verl's actor: ``pg_loss - coef * agg_loss(entropy)``); TRL subtracts
    ``coef *`` the masked token mean of the entropy whatever its loss type. They agree for
    token-mean; TRL's form is ``policy_loss(..., entropy_coef=0) - coef * token_mean(H)``."""
    inp = make_inputs(seed=33, empty_row=True)
    coef = 0.5
    args = (inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"])
    base, _ = policy_loss(*args, agg=agg, backend=backend)
    ent = inp["entropy"]
    with_bonus, _ = policy_loss(*args, agg=agg, entropy=ent, entropy_coef=coef, backend=backend)
    m = inp["mask"].double()
    verl_bonus = naive.aggregate(ent.cpu(), m.cpu(), agg)
    trl_bonus = (ent * m).sum() / m.sum().clamp(min=1.0)
    torch.testing.assert_close((with_bonus - base).cpu(), -coef * verl_bonus, atol=1e-12,
                               rtol=1e-10)
    if agg == "token-mean":
        torch.testing.assert_close((with_bonus - base).cpu(), -coef * trl_bonus.cpu(),
                                   atol=1e-12, rtol=1e-10)
    else:
        assert abs(verl_bonus.item() - trl_bonus.item()) > 1e-3


@pytest.mark.parametrize("clamp,match", [
    ((1.0, -1.0), r"clamp: expected lo <= hi, got \(1.0, -1.0\)"),
    ((0.0, 1.0, 2.0), r"clamp: expected None or a pair \(lo, hi\), got \(0.0, 1.0, 2.0\)"),
    ((1.0,), r"clamp: expected None or a pair \(lo, hi\)"),
    (5.0, r"clamp: expected None or a pair \(lo, hi\), got 5.0"),
])
def test_kl_penalty_clamp_errors(clamp, match):
    logp, ref = kl_inputs()
    with pytest.raises(ValueError, match=match):
        kl_penalty(logp, ref, clamp=clamp)


def test_kl_penalty_errors():
    logp, ref = kl_inputs()
    with pytest.raises(ValueError, match=r"estimator: expected one of .*got 'k5'"):
        kl_penalty(logp, ref, estimator="k5")
    with pytest.raises(ValueError, match=r"ref_logp: expected shape \(3, 5\)"):
        kl_penalty(logp, ref[:, :4])
    with pytest.raises(TypeError, match=r"logp: expected dtype in"):
        kl_penalty(logp.long(), ref)


def test_public_names():
    assert rlkernels.policy_loss is policy_loss and rlkernels.kl_penalty is kl_penalty


# ========================================================================= eager fast path

def test_eager_fast_path_skips_the_custom_op_and_matches_it(backend, monkeypatch):
    """Plain eager calls of ``policy_loss`` and ``kl_penalty`` run the backend functions
    through an ``autograd.Function`` (ops/_eager.py: the custom-op dispatcher costs several
    times the op's own host time at small shapes); under a dispatch mode (here
    ``FakeTensorMode``'s sibling, a ``TorchDispatchMode`` as ``opcheck`` / ``make_fx`` push)
    the custom op runs. Both give the same bits, forward and backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlkernels.ops import policy as ops_policy

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    calls = []
    for name, spec in (("policy_loss", ops_policy.POLICY_LOSS),
                       ("kl_penalty", ops_policy.KL_PENALTY)):
        monkeypatch.setattr(spec, "op", lambda *a, _real=spec.op, _name=name:
                            calls.append(_name) or _real(*a))
    g = torch.Generator().manual_seed(40)
    logp = (-torch.rand(3, 6, generator=g, dtype=F64)).to(DEV).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(3, 6, generator=g, dtype=F64).to(DEV)
    adv = torch.randn(3, generator=g, dtype=F64).to(DEV)
    mask = (torch.rand(3, 6, generator=g) > 0.2).to(DEV)
    ent = torch.rand(3, 6, generator=g, dtype=F64).to(DEV).requires_grad_()

    def run():
        loss, metrics = policy_loss(logp, old, adv, mask, ref_logp=old, kl_coef=0.1,
                                    entropy=ent, entropy_coef=0.01, backend=backend)
        kl = kl_penalty(logp, old, clamp=(-10.0, 10.0))
        total = loss + kl.sum()
        grads = torch.autograd.grad(total, (logp, ent))
        return (loss.detach(), *metrics.values(), kl.detach(), *grads)

    fast = run()
    assert calls == []
    with Passthrough():
        slow = run()
    assert calls == ["policy_loss", "kl_penalty"]
    for a, b in zip(fast, slow):
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_gpu_public_policy_and_grpo_loss_cuda_graph(name):
    """The public ``policy_loss`` and ``grpo_loss`` paths, forward and backward, capture into
    one CUDA graph (no host sync, no host tensor: a number ``normalizer`` is a cached device
    tensor) and a replay on new input values gives the eager results."""
    if rlkernels.available_backends()[name] != "ok":
        pytest.skip(f"{name}: {rlkernels.available_backends()[name]}")
    g = torch.Generator().manual_seed(42)
    b, t, v = 8, 64, 512

    def fresh():
        logits = torch.randn(b, t, v, generator=g)
        tokens = torch.randint(0, v, (b, t), generator=g)
        old = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
        old = old + 0.2 * torch.randn(b, t, generator=g)
        return [x.cuda() for x in (logits, tokens, old, torch.randn(b, generator=g),
                                   torch.rand(b, t, generator=g) > 0.2)]

    static = fresh()
    logits = static[0].requires_grad_()
    logp = static[2].detach().clone().requires_grad_()

    def step():
        logits_, tokens, old, adv, mask = static
        loss, metrics = policy_loss(logp, old, adv, mask, ref_logp=old, kl_coef=0.1,
                                    normalizer=512.0, backend=name)
        (g_lp,) = torch.autograd.grad(loss, logp)
        loss2, metrics2 = rlkernels.grpo_loss(logits, tokens, old, adv, mask, backend=name)
        (g_logits,) = torch.autograd.grad(loss2, logits)
        return loss, metrics["clipfrac"], g_lp, loss2, metrics2["entropy"], g_logits

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up: compiles, caches, allocator
            step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
    torch.cuda.current_stream().wait_stream(side)
    for dst, src in zip(static, fresh()):
        dst.data.copy_(src)
    logp.data.copy_(static[2] - 0.05)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(outs, step()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
