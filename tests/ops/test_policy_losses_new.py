"""Tests of the policy losses of issue 21 (SPEC 6): ``loss="sapo" | "gmpo" | "clip_cov" |
"kl_cov" | "dppo_tv" | "dppo_kl" | "dro" | "vespo" | "luspo"`` and
``kl_estimator="k3_is" | "k3_is_sg"`` of ``policy_loss`` (and one of them through
``grpo_loss``).

Expected values and gradients come from ``tests/_policy_naive.py`` ``new_policy_loss``, a
transcription of the peers' code (verl 0.9.1 core_algos, TRL 1.16 grpo_trainer) in plain
fp64 autograd with Python-loop aggregations, never from ``rlkernels.reference``. The losses
whose gradient is the true derivative are also checked with ``torch.autograd.gradcheck``
(dppo, vespo and k3_is_sg hold a stop-gradient: finite differences see the value only).

Shapes are tiny ([B, T] policy tensors have no vocabulary): B=4, T=7 (T odd) unless a test
needs more; the Triton backend runs under the interpreter on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlkernels
from rlkernels import grpo_loss, policy_loss

import _policy_naive as naive  # tests/ is on sys.path (tests/conftest.py)

F64 = torch.float64
DEV = naive.DEVICE


@pytest.fixture(autouse=True)
def _needs_policy_loss(request):
    if "backend" in request.fixturenames:
        naive.needs(request.getfixturevalue("backend"), "policy", "policy_loss")


def make_inputs(B=4, T=7, *, seed=0, adv="B", mask="bool", spread=0.4, empty_row=False):
    """Random fp64 policy inputs (as tests/ops/test_policy.py): log-ratios ~ N(0, spread),
    advantages of both signs, about a quarter of the positions masked, ref / entropy /
    is_weights; old log-probs in (-3, -0.05) so that the probabilities of dppo's trust region
    spread over (0.05, 0.95)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3.0 - 0.05
    # log-probs stay below 0 (dppo_kl takes log(1 - p))
    logp = (old + spread * torch.randn(B, T, generator=g, dtype=F64)).clamp(max=-0.01)
    advantages = torch.randn((B,) if adv == "B" else (B, T), generator=g, dtype=F64)
    keep = torch.rand(B, T, generator=g, dtype=F64) > 0.25
    keep[:, 0] = True
    if mask == "bool":
        m = keep
    else:
        m = torch.where(keep, 0.1 + torch.rand(B, T, generator=g, dtype=F64), 0.0)
    if empty_row:
        m = m.clone()
        m[1] = 0
    out = dict(logp=logp, old_logp=old, advantages=advantages, mask=m,
               ref_logp=old + 0.3 * torch.randn(B, T, generator=g, dtype=F64),
               entropy=2.0 * torch.rand(B, T, generator=g, dtype=F64),
               is_weights=0.25 + 1.5 * torch.rand(B, T, generator=g, dtype=F64))
    return {k: v.to(DEV) for k, v in out.items()}


def run(fn, inp, *, use_ref=False, use_entropy=False, use_isw=False, **kw):
    """``(loss, metrics, [d logp, d entropy])`` of ``fn`` (policy_loss or the naive one) on
    the inputs, with an upstream gradient of 1.7; everything returned on the CPU."""
    lp = inp["logp"].clone().requires_grad_(True)
    ent = inp["entropy"].clone().requires_grad_(True) if use_entropy else None
    loss, metrics = fn(lp, inp["old_logp"], inp["advantages"], inp["mask"],
                       ref_logp=inp["ref_logp"] if use_ref else None, entropy=ent,
                       is_weights=inp["is_weights"] if use_isw else None, **kw)
    wrt = [lp] + ([ent] if ent is not None else [])
    grads = torch.autograd.grad(1.7 * loss, wrt, allow_unused=True)
    grads = [(torch.zeros_like(w) if g is None else g).cpu() for g, w in zip(grads, wrt)]
    return loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}, grads


def check(lib, ref, *, tol=1e-10):
    (loss, metrics, grads), (loss_n, metrics_n, grads_n) = lib, ref
    assert loss.dim() == 0 and loss.dtype == F64
    torch.testing.assert_close(loss, loss_n, atol=1e-12, rtol=tol)
    for g, gn in zip(grads, grads_n):
        assert g.dtype == F64
        torch.testing.assert_close(g, gn, atol=1e-12, rtol=tol)
    assert set(metrics) == set(metrics_n), (sorted(metrics), sorted(metrics_n))
    for k, v in metrics.items():
        assert v.dim() == 0 and v.dtype == torch.float32 and not v.requires_grad, k
        torch.testing.assert_close(v.double(), metrics_n[k].double(), atol=1e-6, rtol=1e-6,
                                   msg=lambda m: f"metric {k}: {m}")


def both(backend, inp, **kw):
    lib = run(lambda *a, **k: policy_loss(*a, backend=backend, **k), inp, **kw)
    cpu = {k: v.cpu() for k, v in inp.items()}
    return lib, run(naive.new_policy_loss, cpu, **kw)


# ============================================================================ every loss

# (id, options, input variant): each loss with its options moved off the defaults where
# that changes the answer on these inputs, with [B] and [B, T] advantages, bool and float
# masks, an empty sequence, is_weights, and the KL / entropy terms.
CASES = [
    ("sapo", dict(loss="sapo"), {}),
    ("sapo-taus-isw-ent", dict(loss="sapo", tau_pos=0.7, tau_neg=2.5, use_isw=True,
                               use_entropy=True, entropy_coef=0.03), dict(adv="BT")),
    ("sapo-gspo-tokenmean", dict(loss="sapo", ratio_level="sequence", agg="token-mean"),
     dict(mask="float")),
    ("gmpo", dict(loss="gmpo", normalizer=4.0), {}),
    ("gmpo-advBT-isw-empty", dict(loss="gmpo", clip_low=0.1, clip_high=0.3, use_isw=True),
     dict(adv="BT", empty_row=True)),
    ("gmpo-tokenmean-float", dict(loss="gmpo", agg="token-mean", use_isw=True),
     dict(mask="float")),
    ("clip_cov", dict(loss="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=-1.0,
                      clip_cov_ub=2.0), {}),
    ("clip_cov-defaults-advBT", dict(loss="clip_cov"), dict(adv="BT", spread=2.0)),
    ("clip_cov-float-isw-kl", dict(loss="clip_cov", clip_cov_ratio=0.5, clip_cov_lb=-3.0,
                                   use_isw=True, use_ref=True, kl_coef=0.1),
     dict(mask="float", empty_row=True)),
    ("kl_cov", dict(loss="kl_cov", kl_cov_ratio=0.2), {}),
    ("kl_cov-defaults", dict(loss="kl_cov"), dict(adv="BT")),
    ("kl_cov-coef-float-seqsum", dict(loss="kl_cov", kl_cov_ratio=0.4, kl_cov_coef=1.5,
                                      agg="seq-mean-token-sum"), dict(mask="float")),
    ("dppo_tv", dict(loss="dppo_tv", clip_low=0.05, clip_high=0.08), {}),
    ("dppo_tv-trunc-isw", dict(loss="dppo_tv", clip_low=0.1, clip_high=0.02, dual_clip=1.2,
                               use_isw=True), dict(adv="BT", spread=0.8)),
    ("dppo_kl", dict(loss="dppo_kl", clip_low=0.01, clip_high=0.02), {}),
    ("dppo_kl-trunc-float", dict(loss="dppo_kl", clip_low=0.005, clip_high=0.05,
                                 dual_clip=1.5), dict(mask="float", spread=0.8)),
    ("dro", dict(loss="dro", dro_beta=0.3), {}),
    ("dro-advBT-isw-ent", dict(loss="dro", dro_beta=2.0, use_isw=True, use_entropy=True,
                               entropy_coef=0.01, agg="seq-mean-token-mean"),
     dict(adv="BT", empty_row=True)),
    ("vespo", dict(loss="vespo"), {}),
    ("vespo-isw-params", dict(loss="vespo", use_isw=True, vespo_k_pos=1.5,
                              vespo_lambda_pos=2.0, vespo_k_neg=2.5,
                              vespo_lambda_neg=1.0), dict(adv="BT", spread=0.1)),
    ("vespo-float-empty", dict(loss="vespo", normalizer=20.0),
     dict(mask="float", empty_row=True, spread=0.05)),
    ("luspo-gspo", dict(loss="luspo", ratio_level="sequence", clip_low=0.03,
                        clip_high=0.04), {}),
    ("luspo-delta-dual-B", dict(loss="luspo", delta=1.5, dual_clip=2.0, normalizer=4.0),
     dict(spread=0.8)),
    ("k3_is", dict(loss="ppo", use_ref=True, kl_coef=0.2, kl_estimator="k3_is"), {}),
    ("k3_is-gspo-float", dict(loss="ppo", use_ref=True, kl_coef=0.5, kl_estimator="k3_is",
                              ratio_level="sequence"), dict(mask="float")),
    ("k3_is_sg", dict(loss="ppo", use_ref=True, kl_coef=0.2, kl_estimator="k3_is_sg",
                      agg="seq-mean-token-mean"), dict(adv="BT")),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_naive(backend, case):
    _, options, variant = case
    inp = make_inputs(seed=len(case[0]), **variant)
    check(*both(backend, inp, **options))


def test_selection_is_active():
    """The cases above exercise what they claim: clip_cov selects tokens (and keeps ppo's
    clip), kl_cov penalizes some, dppo's trust region cuts some, vespo's phi is not ~1."""
    inp = make_inputs(seed=len("clip_cov"))
    _, m = policy_loss(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"],
                       loss="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=-1.0, clip_cov_ub=2.0)
    selected = m["clipfrac"] - m["clipfrac_high"] - m["clipfrac_low"]
    assert float(selected) > 0 and float(m["clipfrac_high"] + m["clipfrac_low"]) > 0
    inp = make_inputs(seed=len("dppo_tv"))
    _, m = policy_loss(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"],
                       loss="dppo_tv", clip_low=0.05, clip_high=0.08)
    assert 0 < float(m["clipfrac"]) < 1
    inp = make_inputs(seed=len("dppo_kl-trunc-float"), mask="float", spread=0.8)
    _, m = policy_loss(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"],
                       loss="dppo_kl", clip_low=0.005, clip_high=0.05, dual_clip=1.5)
    assert 0 < float(m["clipfrac"]) < 1 and float(m["dual_clipfrac"]) > 0


_LOSS_OPTIONS = {
    "sapo": dict(tau_pos=0.9, tau_neg=1.7), "gmpo": {}, "luspo": {},
    "clip_cov": dict(clip_cov_ratio=0.25, clip_cov_lb=-2.0, clip_cov_ub=3.0),
    "kl_cov": dict(kl_cov_ratio=0.25, kl_cov_coef=0.3), "dppo_tv": {}, "dppo_kl": {},
    "dro": dict(dro_beta=0.4), "vespo": {},
}


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(B=st.integers(1, 5), T=st.integers(1, 9), seed=st.integers(0, 10_000),
       loss=st.sampled_from(sorted(_LOSS_OPTIONS)),
       agg=st.sampled_from(["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                            "seq-mean-token-sum-norm", None]),
       clip_low=st.floats(0.0, 0.5), clip_high=st.floats(0.0, 0.5),
       adv=st.sampled_from(["B", "BT"]), isw=st.booleans(),
       kl_est=st.sampled_from(["k3", "k3_is", "k3_is_sg"]))
def test_hypothesis_torch_vs_naive(B, T, seed, loss, agg, clip_low, clip_high, adv, isw,
                                   kl_est):
    """Random shapes (empty rows included), clip ranges and options against the naive
    formulas (torch backend; the triton backend runs the fixed cases above). clip_cov /
    kl_cov take [B, T] advantages: with [B] ones and B = 1, ``A - mean(A)`` is rounding
    noise and the top-k picks among numerically tied covariances, which two correct sums
    (the library's, the naive loop's) order differently."""
    if loss in ("clip_cov", "kl_cov"):
        adv = "BT"
    inp = make_inputs(B, T, seed=seed, adv=adv, spread=0.5)
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) > 0.3
    inp["mask"] = keep.to(DEV)
    check(*both("torch", inp, loss=loss, agg=agg, clip_low=clip_low, clip_high=clip_high,
                use_isw=isw, use_ref=True, kl_coef=0.05, kl_estimator=kl_est,
                use_entropy=True, entropy_coef=0.01, **_LOSS_OPTIONS[loss]))


# ====================================================================== gradients, exact

@pytest.mark.parametrize("options", [
    dict(loss="sapo", tau_pos=0.7, tau_neg=2.0), dict(loss="gmpo"),
    dict(loss="gmpo", agg="token-mean", use_isw=True),
    dict(loss="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=-1.0, clip_cov_ub=2.0),
    dict(loss="kl_cov", kl_cov_ratio=0.3, kl_cov_coef=0.7), dict(loss="dro", dro_beta=0.5),
    dict(loss="luspo", ratio_level="token"),
    dict(loss="ppo", use_ref=True, kl_coef=0.3, kl_estimator="k3_is"),
], ids=lambda o: "-".join(str(v) for v in o.values()))
def test_gradcheck(options):
    """The true derivative (torch backend, fp64): finite differences of the loss. The
    selections of clip_cov / kl_cov are piecewise constant and stay put under eps = 1e-6."""
    opts = dict(options)
    inp = make_inputs(seed=3, adv="BT")
    extra = {}
    if opts.pop("use_isw", False):
        extra["is_weights"] = inp["is_weights"]
    if opts.pop("use_ref", False):
        extra["ref_logp"] = inp["ref_logp"]
    lp = inp["logp"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: policy_loss(x, inp["old_logp"], inp["advantages"], inp["mask"],
                              backend="torch", **opts, **extra)[0], (lp,), eps=1e-6,
        atol=1e-7)


# ============================================================ masked positions stay masked

@pytest.mark.parametrize("loss,options", [
    ("sapo", {}), ("gmpo", dict(use_isw=True)),
    ("clip_cov", dict(clip_cov_ratio=0.3, clip_cov_lb=-1.0)), ("kl_cov", dict(kl_cov_ratio=0.3)),
    ("dppo_tv", dict(clip_low=0.05, clip_high=0.08)), ("dppo_kl", dict(clip_low=0.01)),
    ("dro", dict(dro_beta=0.3)), ("vespo", dict(use_isw=True)), ("luspo", {}),
    ("ppo", dict(use_ref=True, kl_coef=0.1, kl_estimator="k3_is")),
])
def test_masked_nan_does_not_leak(backend, loss, options):
    """NaN / inf in every input at masked positions: the loss, every metric and the
    gradients equal those of the clean inputs (the naive formula on them); masked positions
    get an exact 0 gradient."""
    inp = make_inputs(seed=11, adv="BT", empty_row=True)
    clean = {k: v.cpu() for k, v in inp.items()}
    off = ~inp["mask"]
    poisoned = dict(inp)
    for name, value in (("logp", float("nan")), ("old_logp", float("inf")),
                        ("advantages", float("nan")), ("ref_logp", float("nan")),
                        ("is_weights", float("nan")), ("entropy", float("nan"))):
        poisoned[name] = torch.where(off, value, inp[name])
    kw = dict(loss=loss, use_entropy=True, entropy_coef=0.01, **options)
    lib = run(lambda *a, **k: policy_loss(*a, backend=backend, **k), poisoned, **kw)
    check(lib, run(naive.new_policy_loss, clean, **kw))
    assert (lib[2][0][off.cpu()] == 0).all()
    assert all(torch.isfinite(v) for v in lib[1].values())


# ====================================================================== grpo_loss reaches them

@pytest.mark.parametrize("options", [
    dict(loss="sapo", tau_neg=2.0, kl_coef=0.1, kl_estimator="k3_is"),
    dict(loss="kl_cov", kl_cov_ratio=0.3),
], ids=["sapo-k3_is", "kl_cov"])
def test_grpo_loss(backend, options):
    """``grpo_loss(**policy_loss_options)`` passes the new options through to the same
    policy kernels: loss, metrics and d logits against the naive log-softmax + loss."""
    g = torch.Generator().manual_seed(5)
    B, T, V = 3, 4, 11
    logits = torch.randn(B, T, V, generator=g, dtype=F64) * 2.0
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[2, 3] = -100
    mask = tokens != -100
    lsm = torch.log_softmax(logits, -1)
    lp0 = lsm.gather(-1, tokens.clamp_min(0)[..., None])[..., 0]
    old = lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=F64)
    ref = lp0 + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, generator=g, dtype=F64)
    out = {}
    for who in ("lib", "naive"):
        x = logits.clone().requires_grad_(True)
        if who == "lib":
            loss, m = grpo_loss(x.to(DEV), tokens.to(DEV), old.to(DEV), adv.to(DEV),
                                mask.to(DEV), ref_logp=ref.to(DEV), entropy_coef=0.01,
                                backend=backend, **options)
        else:
            lp, ent = naive.logprobs_entropy(x, tokens)
            loss, m = naive.new_policy_loss(lp, old, adv, mask, ref_logp=ref, entropy=ent,
                                            entropy_coef=0.01, **options)
        grad, = torch.autograd.grad(loss, x)
        out[who] = (loss.detach().cpu(), {k: v.cpu() for k, v in m.items()}, [grad.cpu()])
    check(out["lib"], out["naive"], tol=1e-9)


def test_luspo_default_agg_and_trl_normalizer():
    """``agg=None``: luspo sums each sequence's tokens (TRL: ``(L m).sum(-1).mean()``, which
    ``normalizer=B`` reproduces with an empty sequence too); sapo and gmpo take the
    sequence mean of token means; ppo stays token-mean."""
    inp = make_inputs(seed=2, empty_row=True)
    args = (inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"])
    luspo, _ = policy_loss(*args, loss="luspo", ratio_level="sequence", normalizer=4)
    ppo, _ = policy_loss(*args, ratio_level="sequence", agg="seq-mean-token-sum",
                         normalizer=4)
    assert torch.equal(luspo, ppo)
    # TRL's luspo, written out
    log_r = inp["logp"] - inp["old_logp"]
    m = inp["mask"].double()
    seq = (log_r * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    coef_1 = torch.exp(seq)[:, None]
    a = inp["advantages"][:, None]
    per_token = -torch.min(coef_1 * a, torch.clamp(coef_1, 0.8, 1.2) * a)
    torch.testing.assert_close(luspo, (per_token * m).sum(-1).mean(), rtol=1e-12, atol=0)
    for loss, agg, extra in (("sapo", "seq-mean-token-mean", {}),
                             ("gmpo", "seq-mean-token-mean", {}),
                             ("dro", "token-mean", dict(dro_beta=0.1))):
        a1, _ = policy_loss(*args, loss=loss, **extra)
        a2, _ = policy_loss(*args, loss=loss, agg=agg, **extra)
        assert torch.equal(a1, a2), loss


def test_cov_selection_ties_and_count():
    """Ties of the covariance go to the lower flat index; ``k = max(floor(ratio sum m), 1)``
    tokens; only unmasked tokens are chosen. Equal advantages within rows and equal log-probs
    make many covariances equal."""
    B, T = 2, 6
    logp = torch.tensor([[-1.0, -2.0, -1.0, -2.0, -1.0, -2.0]] * B, dtype=F64)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 0] = False
    from rlkernels._policy_options import PolicyOptions
    from rlkernels.reference.policy import cov_selection
    # cov > 0 at (0, 2), (0, 4) (0.595 each) and at (1, 1), (1, 3), (1, 5) (0.413 each);
    # k = floor(ratio * 11) (11 unmasked tokens), at least 1
    for ratio, expect in ((0.2, [(0, 2), (0, 4)]), (0.01, [(0, 2)]),
                          (0.3, [(0, 2), (0, 4), (1, 1)]), (0.4, [(0, 2), (0, 4), (1, 1),
                                                                 (1, 3)])):
        o = PolicyOptions.from_kwargs(loss="kl_cov", kl_cov_ratio=ratio)
        sel = cov_selection(logp, logp, adv, mask, o)
        assert sorted(map(tuple, sel.nonzero().tolist())) == expect, (ratio, sel)


# ======================================================================== option errors

ERRORS = [
    (dict(loss="dro"), ValueError, "dro_beta: expected a number > 0 with loss='dro'"),
    (dict(loss="dro", dro_beta=-1.0), ValueError, "dro_beta: expected a finite number > 0, "
                                                   "got -1.0"),
    (dict(loss="ppo", tau_pos=1.0), ValueError,
     "tau_pos: expected None unless loss='sapo' (it is an option of sapo), got 1.0 with "
     "loss='ppo'"),
    (dict(loss="sapo", tau_neg=0.0), ValueError, "tau_neg: expected a finite number > 0, "
                                                  "got 0.0"),
    (dict(loss="sapo", tau_pos="1"), TypeError, "tau_pos: expected a float, got str"),
    (dict(loss="clip_cov", clip_cov_ratio=1.5), ValueError,
     "clip_cov_ratio: expected a fraction of the tokens in (0, 1], got 1.5"),
    (dict(loss="clip_cov", clip_cov_lb=2.0, clip_cov_ub=1.0), ValueError,
     "clip_cov_ub: expected a number > clip_cov_lb = 2.0, got 1.0"),
    (dict(loss="kl_cov", kl_cov_ratio=0.0), ValueError,
     "kl_cov_ratio: expected a finite number > 0, got 0.0"),
    (dict(loss="kl_cov", kl_cov_coef=float("nan")), ValueError,
     "kl_cov_coef: expected a finite number, got nan"),
    (dict(loss="vespo", vespo_lambda_neg=-2.0), ValueError,
     "vespo_lambda_neg: expected a finite number > 0, got -2.0"),
    (dict(loss="gmpo", vespo_k_pos=1.0), ValueError,
     "vespo_k_pos: expected None unless loss='vespo'"),
    (dict(loss="gmpo", ratio_level="sequence"), ValueError,
     "ratio_level: expected 'token' with loss='gmpo' (it defines its own ratio), got "
     "'sequence'"),
    (dict(loss="vespo", ratio_level="sequence"), ValueError,
     "ratio_level: expected 'token' with loss='vespo'"),
    (dict(loss="sapo", dual_clip=3.0), ValueError,
     "dual_clip: expected None with loss='sapo'"),
    (dict(loss="clip_cov", delta=2.0), ValueError, "delta: expected None with loss='clip_cov'"),
    (dict(loss="clip_cov", clip_low=1.5), ValueError,
     "clip_low: expected a number in [0, 1]"),
    (dict(loss="grpo"), ValueError, "loss: expected one of 'ppo', 'cispo', 'reinforce', "
                                    "'sapo', 'gmpo', 'clip_cov', 'kl_cov', 'dppo_tv', "
                                    "'dppo_kl', 'dro', 'vespo', 'luspo', got 'grpo'"),
    (dict(kl_estimator="k3_iw", kl_coef=0.1), ValueError, "kl_estimator: expected one of "),
]


@pytest.mark.parametrize("kw,exc,msg", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_option_errors(kw, exc, msg):
    inp = make_inputs()
    with pytest.raises(exc) as info:
        policy_loss(inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"],
                    ref_logp=inp["ref_logp"], **kw)
    assert msg in str(info.value), str(info.value)


def test_option_errors_through_grpo_loss():
    logits = torch.randn(2, 3, 5, dtype=F64)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="tau_pos: expected None unless loss='sapo'"):
        grpo_loss(logits, tokens, x, x[:, 0], x > -1, tau_pos=2.0)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        grpo_loss(logits, tokens, x, x[:, 0], x > -1, loss="sapo", tau=2.0)


def test_kl_penalty_rejects_the_ratio_estimators():
    """``kl_penalty`` has no ratio: the importance-weighted estimators are policy_loss's."""
    x = torch.zeros(3, dtype=F64)
    with pytest.raises(ValueError, match="estimator: expected one of 'k1', 'abs', 'k2', 'k3', "
                                         "'low_var_kl', 'k3\\+', got 'k3_is'"):
        rlkernels.kl_penalty(x, x, estimator="k3_is")


# ============================================================================ on the GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("loss", ["clip_cov", "kl_cov"])
def test_selection_has_no_host_sync(backend, loss):
    """The covariance selection runs on the device: no synchronisation with the host in
    forward or backward (CUDA's sync debug mode raises on one)."""
    inp = make_inputs(B=8, T=64, seed=1)
    lp = inp["logp"].clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        value, _ = policy_loss(lp, inp["old_logp"], inp["advantages"], inp["mask"], loss=loss,
                               backend=backend)
        value.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(lp.grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("loss,options", [
    ("sapo", dict(tau_neg=2.0)), ("gmpo", dict(use_isw=True)), ("clip_cov", {}),
    ("kl_cov", dict(kl_cov_ratio=1e-3)), ("dppo_tv", dict(clip_low=0.05, clip_high=0.05)),
    ("dppo_kl", dict(clip_low=0.01, clip_high=0.02, dual_clip=2.0)),
    ("dro", dict(dro_beta=0.3)), ("vespo", dict(use_isw=True)),
    ("luspo", dict(ratio_level="sequence")),
    ("ppo", dict(use_ref=True, kl_coef=0.1, kl_estimator="k3_is")),
])
def test_gpu_fp32_parity_and_determinism(backend, loss, options):
    """fp32 inputs of a realistic [B, T] (T not a multiple of any block) on the GPU against
    the torch reference in fp64 on the same values (SPEC 5: 1e-5; gradients within the fp32
    rounding bound), and two runs bit-identical."""
    if backend == "torch":
        pytest.skip("the reference itself")
    opts = dict(options, loss=loss)
    inp = make_inputs(B=64, T=333, seed=7, adv="BT", spread=0.3)
    inp = {k: v.float().cuda() for k, v in inp.items()}
    kw = dict(use_isw=opts.pop("use_isw", False), use_ref=opts.pop("use_ref", False),
              use_entropy=True, entropy_coef=0.01, **opts)
    lib = run(lambda *a, **k: policy_loss(*a, backend=backend, **k), inp, **kw)
    again = run(lambda *a, **k: policy_loss(*a, backend=backend, **k), inp, **kw)
    assert torch.equal(lib[0], again[0]) and torch.equal(lib[2][0], again[2][0])
    ref = run(lambda *a, **k: policy_loss(*a, backend="torch", **k),
              {k: v.double() for k, v in inp.items()}, **kw)
    torch.testing.assert_close(lib[0].double(), ref[0], atol=1e-5, rtol=1e-5)
    for k, v in lib[1].items():
        torch.testing.assert_close(v.double(), ref[1][k].double(), atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(lib[2], ref[2]):
        naive.grad_bound(g, g_ref)


def test_cuda_launcher_passes_the_new_options(monkeypatch):
    """rlkernels/cuda/policy.py on CPU tensors against a recording stand-in for
    rlkernels._C (its real structs): the loss / estimator codes, the loss floats, the bounds
    of gmpo / dppo and the covariance selection reach PolicyParams / PolicyTensors. Needs an
    extension built from this csrc/ (PolicyTensors.select)."""
    import contextlib

    from rlkernels._policy_options import PolicyOptions
    from rlkernels.cuda import load_extension
    from rlkernels.cuda import policy as cp

    real = load_extension()
    if real is None or not hasattr(real.PolicyTensors(), "select"):
        pytest.skip("rlkernels._C not built from this csrc/ (no PolicyTensors.select)")
    calls = []

    class Recorder:
        Matrix, PolicyTensors, PolicyParams = real.Matrix, real.PolicyTensors, real.PolicyParams

        def __getattr__(self, name):
            return lambda **kw: calls.append((name, kw))

    rec = Recorder()
    monkeypatch.setattr(cp, "_extension", lambda: rec)
    monkeypatch.setattr(cp, "stream_of", lambda t: 0)
    monkeypatch.setattr(cp, "expect", lambda *a, **k: None)
    monkeypatch.setattr(cp, "_PARAMS", {})
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    inp = make_inputs(seed=4)
    args = (inp["logp"], inp["old_logp"], inp["advantages"], inp["mask"], None, None, None,
            None)
    codes = real.CODES
    for kw, check in (
            (dict(loss="sapo", tau_pos=0.5, tau_neg=2.0),
             lambda pp, pt: (pp.pos_a, pp.neg_a, pt.select.ptr) == (0.5, 2.0, 0)),
            (dict(loss="gmpo", clip_low=0.1, clip_high=0.3),
             lambda pp, pt: (pp.lo, pp.hi) == (0.1, 0.3)),
            (dict(loss="dppo_kl", clip_low=0.01, clip_high=0.02),
             lambda pp, pt: (pp.lo, pp.hi, pp.coef, pp.has_dual) == (0.01, 0.02, 20.0, 0)),
            (dict(loss="vespo", vespo_lambda_neg=1e-6),
             lambda pp, pt: (pp.pos_a, pp.neg_a, pp.pos_b, pp.neg_b) == (2.0, 3.0, 3.0, 1e-4)),
            (dict(loss="dro", dro_beta=0.7), lambda pp, pt: pp.coef == 0.7),
            (dict(loss="luspo", dual_clip=3.0),
             lambda pp, pt: (pp.loss, pp.has_dual) == (codes["policy_loss"]["ppo"], 1)),
            (dict(loss="kl_cov", kl_cov_ratio=0.3, kl_cov_coef=0.4),
             lambda pp, pt: pp.coef == 0.4 and pt.select.ptr != 0 and pt.select.stride0 == 7),
            (dict(loss="clip_cov", kl_coef=0.1, kl_estimator="k3_is"),
             lambda pp, pt: pt.select.ptr != 0
             and pp.kl_estimator == codes["kl_estimator"]["k3_is"])):
        o = PolicyOptions.from_kwargs(**kw)
        cp.policy_loss_forward(*args, o)
        fwd = calls[-1][1]
        cp.policy_loss_backward(torch.ones((), dtype=F64), *args, o)
        bwd = calls[-1][1]
        for name, call in (("policy_loss_forward", fwd), ("policy_loss_backward", bwd)):
            pp, pt = call["params"], call["tensors"]
            assert pp.loss == codes["policy_loss"][o.loss if o.loss != "luspo" else "ppo"]
            assert check(pp, pt), (name, kw)


# ================================================================== torch.compile, opcheck

@pytest.mark.parametrize("options", [
    dict(loss="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=-1.0, ref=True, kl_coef=0.1,
         kl_estimator="k3_is"),
    dict(loss="sapo", tau_neg=2.0), dict(loss="gmpo"),
], ids=["clip_cov-k3_is", "sapo", "gmpo"])
def test_compiles_fullgraph(backend, options):
    """The new options travel through the custom op under ``torch.compile(fullgraph=True)``
    (the covariance selection included: no graph break, no host read) with the eager bits."""
    opts = dict(options)
    inp = make_inputs(seed=21)
    extra = {"ref_logp": inp["ref_logp"]} if opts.pop("ref", False) else {}

    def f(lp):
        loss, metrics = policy_loss(lp, inp["old_logp"], inp["advantages"], inp["mask"],
                                    backend=backend, **opts, **extra)
        return loss, metrics["clipfrac"]

    lp = inp["logp"].clone().requires_grad_(True)
    loss_c, cf_c = torch.compile(f, fullgraph=True, backend="aot_eager")(lp)
    (g_c,) = torch.autograd.grad(loss_c, lp)
    loss_e, cf_e = f(lp)
    (g_e,) = torch.autograd.grad(loss_e, lp)
    assert torch.equal(loss_c, loss_e) and torch.equal(cf_c, cf_e) and torch.equal(g_c, g_e)


@pytest.mark.parametrize("kw", [dict(loss="kl_cov", kl_cov_ratio=0.3),
                                dict(loss="vespo", vespo_k_neg=2.0),
                                dict(loss="dppo_kl", clip_low=0.01, kl_coef=0.1,
                                     kl_estimator="k3_is_sg")],
                         ids=["kl_cov", "vespo", "dppo_kl-k3_is_sg"])
def test_opcheck(kw):
    from rlkernels._policy_options import PolicyOptions

    inp = make_inputs(seed=22)
    modes, nums = PolicyOptions.from_kwargs(entropy_coef=0.01, **kw).encode()
    args = (inp["logp"].float().requires_grad_(True), inp["old_logp"].float(),
            inp["advantages"].float(), inp["mask"], None, inp["ref_logp"].float(),
            inp["entropy"].float().requires_grad_(True), inp["is_weights"].float(), modes,
            nums, "torch")
    torch.library.opcheck(torch.ops.rlkernels.policy_loss.default, args)
