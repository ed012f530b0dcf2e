"""rollout_correction (SPEC 6, issue 21) against an independent fp64 transcription of verl's
rollout_corr_helper (compute_rollout_correction_weights, compute_rollout_rejection_mask,
compute_offpolicy_metrics) and TRL's GRPO trainer (vllm_importance_sampling_mode,
get_off_policy_mask), on the torch and triton backends (triton through the interpreter on
CPU): every level x mode, every rejection criterion, NaN at masked positions, empty
sequences, option errors, and no autograd graph on the outputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlkernels as rk
from rlkernels.ops import rollout as ro

C = 20.0  # verl's SAFETY_BOUND, the default log_ratio_clamp


# ====================================================================== the naive transcription

def _naive(old, roll, mask, *, level, mode, hi, lo, reject=(), bounds=None, adv=None):
    """Row by row in Python floats (fp64). ``bounds``: {criterion: verl-style threshold}:
    k1 ``(lo, hi)`` ratio bounds, k2 / k3 an upper bound, opsm the delta."""
    old, roll, mask = old.double().tolist(), roll.double().tolist(), mask.double().tolist()
    b_, t_ = len(old), len(old[0]) if old else 0
    hi = math.inf if hi is None else hi
    lo = 0.0 if lo is None else lo
    W = [[0.0] * t_ for _ in range(b_)]
    K = [[False] * t_ for _ in range(b_)]
    tok = dict(m=0.0, k1=0.0, k3=0.0, d=0.0, chi=0.0, w=0.0, w2=0.0, hi=0.0, lo=0.0, rej=0.0)
    dmax, wmax, wmin = [], [], []
    seqs = []  # (chi2_seq, log_ppl_diff, rejected)

    def clamp(x):
        return min(max(x, -C), C)

    for b in range(b_):
        idx = [t for t in range(t_) if mask[b][t] != 0]
        m = {t: mask[b][t] for t in idx}
        lr = {t: old[b][t] - roll[b][t] for t in idx}
        cnt = sum(m.values())
        s = sum(m[t] * lr[t] for t in idx)
        # ---- IS weights (verl compute_rollout_correction_weights; TRL's *_truncate clamp)
        raw = {}
        for t in idx:
            if level == "token":
                raw[t] = math.exp(clamp(lr[t]))
            elif level == "sequence":
                raw[t] = math.exp(clamp(s))
            else:
                raw[t] = math.exp(clamp(s / cnt))
        for t in idx:
            r = raw[t]
            if mode == "truncate":
                W[b][t] = min(max(r, lo), hi)
            else:
                W[b][t] = r if lo <= r <= hi else 0.0
        # ---- rejection (verl compute_rollout_rejection_mask; TRL get_off_policy_mask)
        lrc = {t: clamp(lr[t]) for t in idx}
        stat = {"k1": {t: -lrc[t] for t in idx},
                "k2": {t: 0.5 * lrc[t] ** 2 for t in idx},
                "k3": {t: math.exp(lrc[t]) - 1.0 - lrc[t] for t in idx}}
        passed = {t: True for t in range(t_)}
        for crit in reject:
            spec = bounds[crit]
            if crit == "opsm":
                kl = sum(m[t] * (roll[b][t] - old[b][t]) for t in idx) / max(cnt, 1.0)
                for t in range(t_):
                    a = adv[b] if adv.dim() == 1 else adv[b, t]
                    passed[t] &= bool(a >= 0) or kl <= spec
                continue
            scope, est = crit.rsplit("_", 1)
            if est == "k1":
                r_lo, r_hi = (spec if isinstance(spec, tuple) else (1.0 / spec, spec))
                r_lo, r_hi = math.log(r_lo), math.log(r_hi)
            else:
                r_lo, r_hi = -math.inf, spec
            x = stat[est]
            if scope == "token":
                for t in idx:
                    passed[t] &= r_lo <= x[t] <= r_hi
                continue
            if scope == "seq_sum":
                v = sum(m[t] * x[t] for t in idx)
            elif scope == "seq_mean":
                v = sum(m[t] * x[t] for t in idx) / cnt if idx else 0.0
            else:
                v = max(x[t] for t in idx) if idx else 0.0
            for t in range(t_):
                passed[t] &= r_lo <= v <= r_hi
        for t in idx:
            K[b][t] = passed[t]
        # ---- metrics (verl compute_offpolicy_metrics / compute_is_metrics, TRL's logging)
        for t in idx:
            w = W[b][t]
            tok["m"] += m[t]
            tok["k1"] += m[t] * -lr[t]
            tok["k3"] += m[t] * (math.exp(lr[t]) - lr[t] - 1.0)
            tok["d"] += m[t] * abs(lr[t])
            tok["chi"] += m[t] * (math.exp(2.0 * lrc[t]) - 1.0)
            tok["w"] += m[t] * w
            tok["w2"] += m[t] * w * w
            tok["hi"] += m[t] * (raw[t] > hi)
            tok["lo"] += m[t] * (raw[t] < lo)
            tok["rej"] += m[t] * (not passed[t])
            dmax.append(abs(lr[t]))
            wmax.append(w)
            wmin.append(w)
        if idx:
            seqs.append((math.exp(2.0 * clamp(s)) - 1.0,
                         sum(m[t] * roll[b][t] for t in idx) / cnt
                         - sum(m[t] * old[b][t] for t in idx) / cnt,
                         any(not passed[t] for t in idx)))
    n = tok["m"]

    def mean(key):
        return tok[key] / n if n > 0 else 0.0

    ns = len(seqs)
    metrics = {
        "k1": mean("k1"), "k3": mean("k3"), "abs_diff_mean": mean("d"),
        "abs_diff_max": max(dmax) if dmax else 0.0, "chi2_token": mean("chi"),
        "chi2_seq": sum(s[0] for s in seqs) / ns if ns else 0.0,
        "log_ppl_diff": sum(s[1] for s in seqs) / ns if ns else 0.0,
        "weight_mean": mean("w"), "weight_max": max(wmax) if wmax else 0.0,
        "weight_min": min(wmin) if wmin else 0.0,
        "ess": tok["w"] ** 2 / (n * tok["w2"]) if n * tok["w2"] > 0 else 0.0,
        "frac_high": mean("hi"), "frac_low": mean("lo"), "rejected_frac": mean("rej"),
        "rejected_seq_frac": sum(s[2] for s in seqs) / ns if ns else 0.0,
    }
    return torch.tensor(W, dtype=torch.float64), torch.tensor(K), metrics


# ============================================================================ inputs, helpers

def _inputs(b=6, t=19, seed=0, spread=0.3):
    """Trainer / rollout log-probs with a mismatch of ``spread`` nats, a ragged mask, one
    empty sequence (row 2) and NaN / inf rollout log-probs at masked positions."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    roll = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.25
    if b > 2:
        mask[2] = False
    mask[0, -3:] = False
    roll = roll.masked_fill(~mask, float("nan"))
    roll[0, -1] = -float("inf")  # masked too
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return old, roll, mask, adv


def _dev(*xs, device):
    return [None if x is None else x.to(device) for x in xs]


def _check(out, ref, dtype=torch.float32):
    w, k, m = out
    rw, rk_, rm = ref
    w, k = w.cpu(), k.cpu()
    tol = 1e-5 if dtype != torch.float64 else 1e-10
    torch.testing.assert_close(w.double(), rw, atol=tol, rtol=tol)
    assert torch.equal(k, rk_)
    assert set(m) == set(rm)
    for name, value in m.items():
        assert value.dim() == 0 and value.dtype == torch.float32, name
        assert math.isclose(float(value), rm[name], rel_tol=1e-5, abs_tol=1e-5), \
            (name, float(value), rm[name])


# ==================================================================================== values

@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_levels_and_modes(backend, device, level, mode):
    old, roll, mask, _ = _inputs(spread=0.15 if level == "sequence" else 0.3)
    hi, lo = (1.3, 0.8)
    o, r, msk = _dev(old.float(), roll.float(), mask, device=device)
    out = rk.rollout_correction(o, r, msk, level=level, mode=mode, threshold_high=hi,
                                threshold_low=lo, backend=backend)
    ref = _naive(old.float().double(), roll.float().double(), mask, level=level, mode=mode,
                 hi=hi, lo=lo)
    _check(out, ref)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.bool
    # masked positions: weight exactly 0, never kept (their NaN never leaks)
    assert bool((out[0].cpu()[~mask] == 0).all()) and not bool(out[1].cpu()[~mask].any())
    assert all(math.isfinite(float(v)) for v in out[2].values())


# one threshold per criterion, chosen so that each rejects some but not all sequences/tokens
_REJECT_CASES = {
    "token_k1": (0.8, 1.25), "token_k2": 0.02, "token_k3": 0.02,
    "seq_sum_k1": (0.5, 2.0), "seq_sum_k2": 0.6, "seq_sum_k3": 0.6,
    "seq_mean_k1": (0.95, 1.05), "seq_mean_k2": 0.05, "seq_mean_k3": 0.05,
    "seq_max_k2": 0.2, "seq_max_k3": 0.2, "opsm": 0.0,
}


@pytest.mark.parametrize("criterion", sorted(_REJECT_CASES))
def test_each_rejection_criterion(backend, device, criterion):
    old, roll, mask, adv = _inputs(seed=1)
    spec = _REJECT_CASES[criterion]
    a = adv.to(device) if criterion == "opsm" else None
    o, r, msk = _dev(old, roll, mask, device=device)
    out = rk.rollout_correction(o, r, msk, level="token", reject=criterion,
                                reject_threshold=spec, advantages=a, backend=backend)
    ref = _naive(old, roll, mask, level="token", mode="truncate", hi=2.0, lo=None,
                 reject=(criterion,), bounds={criterion: spec}, adv=adv)
    _check(out, ref, torch.float64)
    kept, valid = int(out[1].sum()), int(mask.sum())
    assert 0 < kept < valid, (criterion, kept, valid)  # the case tests something


def test_combined_criteria_and_token_advantages(backend, device):
    """Several criteria at once (every one must pass), per-token advantages for opsm, fp32
    inputs with a float mask (weights in every sum), sequence-level IcePop."""
    old, roll, mask, _ = _inputs(b=9, t=23, seed=2, spread=0.1)
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(9, 23, generator=g, dtype=torch.float64)
    fmask = mask.double() * (0.5 + torch.rand(9, 23, generator=g, dtype=torch.float64))
    crit = ("token_k2", "seq_mean_k1", "seq_max_k3", "opsm")
    spec = {"token_k2": 0.02, "seq_mean_k1": (0.97, 1.03), "seq_max_k3": 0.05, "opsm": 0.001}
    o, r, fm, a = _dev(old.float(), roll.float(), fmask.float(), adv.float(), device=device)
    out = rk.rollout_correction(o, r, fm, level="sequence", mode="mask", threshold_high=1.5,
                                threshold_low=0.6, reject=",".join(crit),
                                reject_threshold=spec, advantages=a, backend=backend)
    ref = _naive(old.float().double(), roll.float().double(), fmask.float().double(),
                 level="sequence", mode="mask", hi=1.5, lo=0.6, reject=crit, bounds=spec,
                 adv=adv.float().double())
    _check(out, ref)


def test_verl_threshold_strings_and_trl_modes():
    """verl's string specs ('lo_hi', comma lists, one value for k1 = (1/x, x)) give the same
    result as the tuple forms; TRL's token_truncate with clip_min/clip_max and sequence_mask
    with only clip_max are ``threshold_low``/``threshold_high``."""
    old, roll, mask, _ = _inputs(seed=4)
    a = rk.rollout_correction(old, roll, mask, reject="token_k1,seq_mean_k3",
                              reject_threshold="0.8_1.25,0.04", backend="torch")
    b = rk.rollout_correction(old, roll, mask, reject=["token_k1", "seq_mean_k3"],
                              reject_threshold={"token_k1": (0.8, 1.25), "seq_mean_k3": 0.04},
                              backend="torch")
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    c = rk.rollout_correction(old, roll, mask, reject="seq_sum_k1", reject_threshold=2.0)
    d = rk.rollout_correction(old, roll, mask, reject="seq_sum_k1", reject_threshold=(0.5, 2.0))
    assert torch.equal(c[1], d[1])
    # TRL token_truncate: clamp(exp(lr), min=clip_min, max=clip_max) at the valid tokens
    w, _, _ = rk.rollout_correction(old, roll, mask, threshold_high=3.0, threshold_low=0.5)
    trl = torch.exp(old - roll).clamp(min=0.5, max=3.0)
    torch.testing.assert_close(w[mask], trl[mask])
    # TRL sequence_mask: exp(sum of the masked diffs), zero above clip_max
    w, _, _ = rk.rollout_correction(old, roll, mask, level="sequence", mode="mask",
                                    threshold_high=1.2)
    ratio = torch.exp(torch.where(mask, old - roll, 0.0).sum(-1, keepdim=True))
    trl = ratio.masked_fill(ratio > 1.2, 0.0).expand_as(w)
    torch.testing.assert_close(w[mask], trl[mask])


def test_empty_inputs_and_all_masked(backend, device):
    for b, t in ((0, 5), (3, 0)):
        old = torch.zeros(b, t, device=device)
        w, k, m = rk.rollout_correction(old, old, old > 0, backend=backend)
        assert w.shape == (b, t) and k.shape == (b, t)
        assert all(float(v) == 0.0 for v in m.values())
    old, roll, mask, adv = _dev(*_inputs(b=3, t=7), device=device)
    none = torch.zeros_like(mask)
    w, k, m = rk.rollout_correction(old, roll, none, reject="opsm", reject_threshold=0.1,
                                    advantages=adv[:3], backend=backend)
    assert not bool(w.any()) and not bool(k.any())
    assert all(float(v) == 0.0 for v in m.values()), m


def test_batch_invariance_and_determinism(backend, device):
    old, roll, mask, _ = _dev(*_inputs(b=12, t=33, seed=5), device=device)
    kw = dict(level="geometric", reject="seq_max_k2", reject_threshold=0.1, backend=backend)
    w, k, m = rk.rollout_correction(old.float(), roll.float(), mask, **kw)
    w2, k2, m2 = rk.rollout_correction(old.float(), roll.float(), mask, **kw)
    assert torch.equal(w, w2) and torch.equal(k, k2)
    assert all(torch.equal(m[n], m2[n]) for n in m)
    w1, k1, _ = rk.rollout_correction(old[4:5].float(), roll[4:5].float(), mask[4:5], **kw)
    assert torch.equal(w1[0], w[4]) and torch.equal(k1[0], k[4])


def test_strided_and_half_inputs():
    old, roll, mask, _ = _inputs(b=4, t=10, seed=6)
    wide = torch.zeros(4, 20, dtype=torch.float64)
    wide[:, ::2] = old
    a = rk.rollout_correction(wide[:, ::2].bfloat16(), roll.bfloat16(), mask.int(),
                              backend="torch")
    ref = _naive(old.bfloat16().double(), roll.bfloat16().double(), mask, level="token",
                 mode="truncate", hi=2.0, lo=None)
    _check(a, ref)


def test_no_autograd_graph(backend, device):
    old, roll, mask, _ = _dev(*_inputs(), device=device)
    old = old.float().requires_grad_(True)
    roll = roll.float().requires_grad_(True)
    w, k, m = rk.rollout_correction(old, roll, mask, level="sequence", backend=backend)
    assert not w.requires_grad and w.grad_fn is None and not k.requires_grad
    assert all(not v.requires_grad and v.grad_fn is None for v in m.values())


def test_compiles_without_graph_breaks():
    old, roll, mask, _ = _inputs(b=3, t=8)

    def f(o, r, msk):
        return rk.rollout_correction(o, r, msk, level="sequence", reject="seq_sum_k3",
                                     reject_threshold=0.1, backend="torch")

    out = torch.compile(f, fullgraph=True, backend="eager")(old, roll, mask)
    ref = f(old, roll, mask)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_opcheck():
    old, roll, mask, adv = _inputs(b=3, t=8)
    o = ro._options(level="geometric", reject="opsm,token_k3",
                    reject_threshold={"opsm": 0.0, "token_k3": 0.05})
    torch.library.opcheck(ro.ROLLOUT_CORRECTION.op,
                          (old, roll, mask, adv[:3], o.level, o.mode, o.reject,
                           list(o.nums), "torch"))


# ==================================================================================== errors

@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(level="seq"), ValueError, "level: expected one of 'token', 'sequence', 'geometric', "
                                    "got 'seq'"),
    (dict(mode="clip"), ValueError, "mode: expected one of 'truncate', 'mask', got 'clip'"),
    (dict(threshold_high=0.0), ValueError, "threshold_high: expected a finite number > 0, "
                                           "got 0.0"),
    (dict(threshold_high=None, threshold_low=None), ValueError,
     "threshold_high, threshold_low: expected at least one bound"),
    (dict(threshold_high=1.0, threshold_low=2.0), ValueError,
     "threshold_low: expected a value <= threshold_high=1.0, got 2.0"),
    (dict(threshold_high="2"), TypeError, "threshold_high: expected a float, got str"),
    (dict(log_ratio_clamp=-1.0), ValueError, "log_ratio_clamp: expected a finite number > 0"),
    (dict(reject="seq_max_k1", reject_threshold=1.0), ValueError,
     "reject: expected one of 'token_k1'.*got 'seq_max_k1'"),
    (dict(reject=3), TypeError, "reject: expected None, a string"),
    (dict(reject="token_k2"), ValueError, "reject_threshold: expected a threshold for "
                                          "reject=token_k2.*got None"),
    (dict(reject_threshold=1.0), ValueError, "reject_threshold: expected None without reject "
                                             "criteria, got 1.0"),
    (dict(reject="token_k2", reject_threshold=(0.5, 2.0)), ValueError,
     r"reject_threshold\['token_k2'\]: expected one upper bound"),
    (dict(reject="seq_sum_k1", reject_threshold=(2.0, 0.5)), ValueError,
     r"reject_threshold\['seq_sum_k1'\]: expected lo <= hi, got \(2.0, 0.5\)"),
    (dict(reject="token_k1,token_k3", reject_threshold="1.2,0.1,0.3"), ValueError,
     "reject_threshold: expected one threshold shared by all criteria or 2"),
    (dict(reject="token_k3", reject_threshold={"token_k2": 0.1}), ValueError,
     r"reject_threshold: expected one entry per criterion \['token_k3'\]"),
    (dict(reject="token_k3", reject_threshold="abc"), ValueError,
     r"reject_threshold\['token_k3'\]: expected a number, a pair"),
    (dict(reject="opsm", reject_threshold=0.1), ValueError,
     "advantages: expected a \\[B\\] or \\[B, T\\] tensor with reject='opsm'.*got None"),
    (dict(advantages=torch.zeros(2)), ValueError,
     "advantages: expected None unless reject includes 'opsm'"),
    (dict(reject="opsm", reject_threshold=0.1, advantages=torch.zeros(3)), ValueError,
     r"advantages: expected shape \(2,\) or \(2, 4\).*got \(3,\)"),
])
def test_option_errors(kwargs, exc, message):
    x = torch.zeros(2, 4)
    with pytest.raises(exc, match=message):
        rk.rollout_correction(x, x, x > -1, **kwargs)


def test_input_errors():
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"rollout_logp: expected shape \(2, 4\) \(the shape "
                                         r"of old_logp\), got \(2, 3\)"):
        rk.rollout_correction(x, torch.zeros(2, 3), x > 0)
    with pytest.raises(TypeError, match="old_logp: expected dtype in .*got int64"):
        rk.rollout_correction(x.long(), x, x > 0)
    with pytest.raises(ValueError, match=r"old_logp: expected a 2-d tensor, got shape \(8,\)"):
        rk.rollout_correction(x.view(-1), x.view(-1), x.view(-1) > 0)
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 4\)"):
        rk.rollout_correction(x, x, torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask: expected dtype in .*got complex64"):
        rk.rollout_correction(x, x, x.to(torch.complex64))


# ======================================================================== the policy helper

def test_apply_folds_weights_and_keep_into_the_loss_inputs():
    old, roll, mask, adv = _inputs(seed=7)
    opts = dict(level="token", threshold_high=1.5, reject="seq_mean_k3,opsm",
                reject_threshold={"seq_mean_k3": 0.04, "opsm": 0.0})
    w, keep, m = rk.rollout_correction(old, roll, mask, advantages=adv, **opts)
    base = torch.full_like(old, 0.5)
    w2, mask2, m2 = ro._apply(old, roll, mask, base, opts, advantages=adv)
    assert torch.equal(w2, w * 0.5) and torch.equal(mask2, mask & keep)
    assert mask2.dtype == torch.bool
    fmask = mask.double() * 2.0
    _, fmask2, _ = ro._apply(old, roll, fmask, None, ro._options(**opts), advantages=adv)
    assert torch.equal(fmask2, torch.where(keep, fmask, 0.0))
    # advantages are ignored (not an error) when no criterion needs them
    w3, mask3, _ = ro._apply(old, roll, mask, None, dict(level="sequence"), advantages=adv)
    assert torch.equal(mask3, mask) and not bool(w3[~mask].any())


def test_nan_at_a_valid_position_stays_in_its_row(backend, device):
    """A NaN log-prob at a *valid* position is data (SPEC 1: NaN propagates to its row): its
    row's sequence statistics are NaN, so its sequence tests fail (rejected), its weights are
    NaN (truncate) or 0 (mask); the other rows are untouched; every backend agrees with the
    reference."""
    old, roll, mask, _ = _dev(*_inputs(seed=8), device=device)
    roll = roll.clone()
    roll[3, 1] = float("nan")
    mask = mask.clone()
    mask[3, 1] = True
    kw = dict(level="sequence", reject="seq_max_k2", reject_threshold=0.5)
    w, k, m = rk.rollout_correction(old, roll, mask, backend=backend, **kw)
    rw, rk_, rm = rk.rollout_correction(old.cpu(), roll.cpu(), mask.cpu(), backend="torch",
                                        **kw)
    torch.testing.assert_close(w.cpu(), rw, equal_nan=True)
    assert torch.equal(k.cpu(), rk_) and not bool(k[3].any())
    assert bool(torch.isnan(w[3][mask[3]]).all())
    others = torch.ones(w.shape[0], dtype=torch.bool)
    others[3] = False
    assert bool(torch.isfinite(w[others.to(device)]).all())
    assert math.isnan(float(m["weight_mean"])) and math.isnan(float(rm["weight_mean"]))


# random shapes, options and data: torch and triton against the naive transcription. Block
# edges: T around the triton tile widths (16, 32, ...), B around its row-tile heights.
_SPECS = {"token_k1": (0.7, 1.4), "token_k2": 0.05, "token_k3": 0.05,
          "seq_sum_k1": (0.3, 3.0), "seq_sum_k2": 0.5, "seq_sum_k3": 0.5,
          "seq_mean_k1": (0.9, 1.1), "seq_mean_k2": 0.05, "seq_mean_k3": 0.05,
          "seq_max_k2": 0.3, "seq_max_k3": 0.3, "opsm": 0.02}


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 19), t=st.integers(1, 40), seed=st.integers(0, 2**16),
       level=st.sampled_from(["token", "sequence", "geometric"]),
       mode=st.sampled_from(["truncate", "mask"]),
       crit=st.lists(st.sampled_from(sorted(_SPECS)), max_size=3, unique=True),
       bounds=st.sampled_from([(2.0, None), (1.5, 0.7), (None, 0.5)]))
def test_random_parity(backend, device, b, t, seed, level, mode, crit, bounds):
    old, roll, mask, adv = _inputs(b, t, seed=seed, spread=0.05 if level == "sequence" else 0.3)
    spec = {c: _SPECS[c] for c in crit}
    a = adv if "opsm" in crit else None
    o, r, msk, aa = _dev(old, roll, mask, a, device=device)
    out = rk.rollout_correction(o, r, msk, level=level, mode=mode, threshold_high=bounds[0],
                                threshold_low=bounds[1], reject=crit or None,
                                reject_threshold=spec or None, advantages=aa, backend=backend)
    ref = _naive(old, roll, mask, level=level, mode=mode, hi=bounds[0], lo=bounds[1],
                 reject=tuple(crit), bounds=spec, adv=adv)
    _check(out, ref, torch.float64)
