"""Naive fp64 formulas for the policy-loss tests (SPEC 3.3 / 3.4), independent of rlkernels.

Written from SPEC.md section 3.3 in the style of verl's ``compute_policy_loss`` /
``agg_loss`` / ``kl_penalty`` and TRL's GRPO loss: plain differentiable PyTorch, so autograd
gives the naive gradients (straight-through terms with ``x - x.detach()``). Aggregations and
masked means are written with Python loops over sequences on purpose: a second opinion that
shares no code (and little structure) with ``rlkernels.reference``. Everything expects fp64
tensors; the shapes in the tests are tiny.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import pytest
import torch

from rlkernels import backends

Tensor = torch.Tensor
# Where the ops under test run (as tests/conftest.py's `device` fixture); the naive formulas
# always run on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METRIC_KEYS = ("clipfrac", "clipfrac_high", "clipfrac_low", "dual_clipfrac", "approx_kl",
               "ratio_mean", "ratio_max")


# ================================================================================ KL penalty

def kl(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """verl's ``kl_penalty``: k1 = d, abs = |d|, k2 = d^2 / 2 (mse), k3 = low_var_kl =
    ``ratio - log ratio - 1`` with ``ratio = exp(ref - logp)``; "k3+" = the value of k3 with
    the gradient of k2 (``k2 - sg(k2) + sg(k3)``)."""
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return 0.5 * d.square()
    ratio = torch.exp(ref_logp - logp)
    k3 = ratio - (ref_logp - logp) - 1.0
    if estimator in ("k3", "low_var_kl"):
        return k3
    assert estimator == "k3+", estimator
    k2 = 0.5 * d.square()
    return k2 - k2.detach() + k3.detach()


# =============================================================================== policy loss

def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Weighted mean ``sum(m x) / sum(m)`` over all tokens; 0 when ``sum(m) == 0``."""
    num = torch.zeros((), dtype=torch.float64)
    den = 0.0
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            w = float(mask[b, t])
            if w != 0.0:
                num = num + w * x[b, t].double()
                den += w
    return num / den if den > 0 else num * 0.0


def aggregate(loss: Tensor, mask: Tensor, agg: str, normalizer=None) -> Tensor:
    """verl ``agg_loss`` with an optional global ``normalizer``; empty denominators give 0."""
    B, T = loss.shape
    mask = mask.double()
    norm = None if normalizer is None else float(normalizer)
    seq_sums, seq_counts = [], []
    for b in range(B):
        seq_sums.append((loss[b] * mask[b]).sum())
        seq_counts.append(float(mask[b].sum()))
    zero = (loss * 0.0).sum()  # keeps the graph connected when nothing is valid
    total = sum(seq_sums, zero)
    nonempty = sum(1 for c in seq_counts if c > 0)
    if agg == "token-mean":
        den = sum(seq_counts) if norm is None else norm
        num = total
    elif agg == "seq-mean-token-mean":
        num = sum((s / c for s, c in zip(seq_sums, seq_counts) if c > 0), zero)
        den = nonempty if norm is None else norm
    elif agg == "seq-mean-token-sum":
        num, den = total, (nonempty if norm is None else norm)
    elif agg == "seq-mean-token-sum-norm":
        num, den = total, (T if norm is None else norm)
    else:
        raise AssertionError(agg)
    return num / den if den > 0 else num * 0.0


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                loss: str = "ppo", clip_low: float = 0.2, clip_high: Optional[float] = None,
                dual_clip: Optional[float] = None, delta: Optional[float] = None,
                ratio_level: str = "token", agg: str = "token-mean", normalizer=None,
                ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0,
                kl_estimator: str = "k3", entropy: Optional[Tensor] = None,
                entropy_coef: float = 0.0, is_weights: Optional[Tensor] = None,
                log_ratio_clamp: float = 20.0, cispo_clip_low: bool = False):
    """Returns ``(loss, metrics)`` as SPEC 3.3, in fp64; differentiable w.r.t. ``logp`` and
    ``entropy`` through plain autograd."""
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.double()
    A = advantages.double()
    if A.dim() == 1:
        A = A[:, None].expand_as(logp)
    log_r = torch.clamp(logp - old_logp, min=-log_ratio_clamp, max=log_ratio_clamp)
    if ratio_level == "sequence":  # GSPO: s_b = masked mean of log r, straight-through per token
        rows = []
        for b in range(logp.shape[0]):
            c = mask[b].sum()
            s = (log_r[b] * mask[b]).sum() / c if float(c) > 0 else log_r[b].sum() * 0.0
            rows.append(s.detach() + logp[b] - logp[b].detach())
        log_r = torch.stack(rows)
    ratio = torch.exp(log_r)
    r = ratio.detach()
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    false = torch.zeros_like(r, dtype=torch.bool)
    high = low = dual = false
    if loss == "ppo":
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)  # TRL's delta
        pg1 = -A * unclipped
        pg2 = -A * torch.clamp(ratio, lo, hi)
        pg = torch.maximum(pg1, pg2)
        high = (pg2 > pg1) & (A > 0)
        low = (pg2 > pg1) & (A < 0)
        if dual_clip is not None:
            pg3 = -A * dual_clip
            dual = (pg.detach() > pg3) & (A < 0)
            pg = torch.where(A < 0, torch.minimum(pg, pg3), pg)
    elif loss == "cispo":  # TRL: no lower bound; verl (cispo_clip_low): 1 - clip_low
        clipped = torch.clamp(r, lo, hi) if cispo_clip_low else torch.clamp(r, max=hi)
        pg = -clipped * A * logp
        high = r > hi
        low = (r < lo) if cispo_clip_low else false
    elif loss == "reinforce":
        pg = -A * logp
    else:
        raise AssertionError(loss)
    if is_weights is not None:
        pg = pg * is_weights.double()
    per_token = pg
    kl_val = None
    if ref_logp is not None:
        kl_val = kl(logp, ref_logp.double(), kl_estimator)
        per_token = per_token + kl_coef * kl_val
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
    value = aggregate(per_token, mask, agg, normalizer)

    m: Dict[str, Tensor] = {
        "clipfrac": _masked_mean((high | low).double(), mask),
        "clipfrac_high": _masked_mean(high.double(), mask),
        "clipfrac_low": _masked_mean(low.double(), mask),
        "dual_clipfrac": _masked_mean(dual.double(), mask),
        "approx_kl": _masked_mean(-log_r.detach(), mask),
        "ratio_mean": _masked_mean(r, mask),
        "ratio_max": max((float(r[b, t]) for b in range(r.shape[0]) for t in range(r.shape[1])
                          if float(mask[b, t]) > 0), default=0.0),
    }
    m["ratio_max"] = torch.tensor(m["ratio_max"], dtype=torch.float64)
    if kl_val is not None:
        m["kl"] = _masked_mean(kl_val.detach(), mask)
    if entropy is not None:
        m["entropy"] = _masked_mean(entropy.detach().double(), mask)
    return value, m


# ===================================================================== log-probs from logits

def logprobs_entropy(logits: Tensor, tokens: Tensor, temperature: float = 1.0,
                     ignore_index: int = -100):
    """``log_softmax(logits / T)`` at the tokens and ``-sum p log p`` per row (fp64, autograd);
    padding positions give 0 for both."""
    z = logits.double() / temperature
    logsm = torch.log_softmax(z, dim=-1)
    valid = tokens != ignore_index
    safe = torch.where(valid, tokens, torch.zeros_like(tokens)).long()
    lp = logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    ent = -(p * torch.where(p > 0, logsm, torch.zeros_like(logsm))).sum(-1)
    zero = torch.zeros_like(lp)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)


def grpo_loss(logits: Tensor, tokens: Tensor, old_logp, advantages, mask, *,
              temperature: float = 1.0, entropy_coef: float = 0.0, **options):
    """``policy_loss(log_softmax(logits / T)[tokens], entropy=H)`` (the fused GRPO loss)."""
    lp, ent = logprobs_entropy(logits, tokens, temperature)
    return policy_loss(lp, old_logp.double(), advantages, mask, entropy=ent,
                       entropy_coef=entropy_coef, **options)


def needs(backend: str, family: str, op: str) -> None:
    """Skip when ``backend`` has no kernels for ``op`` (of ``family``) yet."""
    if not backends.implements(backend, family, op):
        pytest.skip(f"backend {backend!r} has no {op} kernels yet")


def grad_bound(g: Tensor, g_ref: Tensor) -> None:
    """SPEC 5: ``|g - g_ref| <= 2 eps(dtype) max|g_ref| + 1e-7`` elementwise."""
    eps = torch.finfo(g.dtype).eps
    tol = 2 * eps * g_ref.abs().max().item() + 1e-7
    err = (g.double().cpu() - g_ref.double().cpu()).abs().max().item()
    assert err <= tol, f"gradient error {err:.3e} > {tol:.3e} ({g.dtype})"


# ============================================================== the losses of issue 21 (SPEC 6)
#
# Transcribed from the peers' code (verl 0.9.1 trainer/ppo/core_algos.py, TRL 1.16
# trainer/grpo_trainer.py), with the choices docs/math.md documents where rlkernels departs:
# the log-ratio clamp everywhere, exact divisions (no 1e-8 in masked means), masked positions
# selected away, a deterministic covariance selection (verl's clip_cov draws at random).

def _sorted_selection(keys, k: int):
    """Positions of the ``k`` largest keys (a list of ``(key, b, t)``), ties to the lower
    flat index: written with Python's sort, not torch's."""
    keys = sorted(keys, key=lambda x: (-x[0], x[1], x[2]))
    return {(b, t) for _, b, t in keys[:k]}


def cov_selection(logp: Tensor, A: Tensor, mask: Tensor, candidate) -> Tensor:
    """The clip_cov / kl_cov selection: ``cov = (A - mean A)(logp - mean logp)`` with masked
    (weighted) batch means, the ``max(int(ratio * sum m), 1)`` candidates of largest cov."""
    mean_a = _masked_mean(A, mask)
    mean_lp = _masked_mean(logp.detach(), mask)
    cov = (A - mean_a) * (logp.detach() - mean_lp)
    return cov, lambda ratio: _sorted_selection(
        [(float(cov[b, t]), b, t) for b in range(cov.shape[0]) for t in range(cov.shape[1])
         if float(mask[b, t]) != 0 and candidate(b, t, float(cov[b, t]))],
        max(int(ratio * float(mask.sum())), 1))


def new_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                    loss: str, clip_low: float = 0.2, clip_high: Optional[float] = None,
                    dual_clip: Optional[float] = None, delta: Optional[float] = None,
                    ratio_level: str = "token", agg: Optional[str] = None, normalizer=None,
                    ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0,
                    kl_estimator: str = "k3", entropy: Optional[Tensor] = None,
                    entropy_coef: float = 0.0, is_weights: Optional[Tensor] = None,
                    log_ratio_clamp: float = 20.0, tau_pos=1.0, tau_neg=1.05,
                    clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0, kl_cov_ratio=2e-4,
                    kl_cov_coef=0.1, dro_beta=None, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                    vespo_k_neg=3.0, vespo_lambda_neg=2.0):
    """``(loss, metrics)`` of the new losses (and of ppo with ``kl_estimator="k3_is"`` /
    ``"k3_is_sg"``), fp64, plain autograd."""
    clip_high = clip_low if clip_high is None else clip_high
    if agg is None:
        agg = {"sapo": "seq-mean-token-mean", "gmpo": "seq-mean-token-mean",
               "luspo": "seq-mean-token-sum"}.get(loss, "token-mean")
    mask = mask.double()
    A = advantages.double()
    if A.dim() == 1:
        A = A[:, None].expand_as(logp)
    B, T = logp.shape
    negative_approx_kl = torch.clamp(logp - old_logp, min=-log_ratio_clamp,
                                     max=log_ratio_clamp)
    if ratio_level == "sequence":  # TRL's importance_sampling_level="sequence"
        rows = []
        for b in range(B):
            c = mask[b].sum()
            s = (negative_approx_kl[b] * mask[b]).sum() / c if float(c) > 0 else \
                negative_approx_kl[b].sum() * 0.0
            rows.append(s.detach() + logp[b] - logp[b].detach())
        negative_approx_kl = torch.stack(rows)
    ratio = torch.exp(negative_approx_kl)
    r = ratio.detach()
    false = torch.zeros_like(r, dtype=torch.bool)
    high = low = dual = selected = false
    w = None if is_weights is None else is_weights.double()
    if loss in ("luspo", "clip_cov"):  # TRL's grpo branch / verl's clip_cov
        coef_1 = ratio if delta is None else torch.clamp(ratio, max=delta)
        coef_2 = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        pg_losses1, pg_losses2 = -A * coef_1, -A * coef_2
        pg = torch.maximum(pg_losses1, pg_losses2)
        high = (r > 1 + clip_high) & (A > 0)
        low = (r < 1 - clip_low) & (A < 0)
        if dual_clip is not None:
            pg3 = -A * dual_clip
            dual = (pg.detach() > pg3) & (A < 0)
            pg = torch.where(A < 0, torch.minimum(pg, pg3), pg)
        if loss == "clip_cov":
            clip_by_origin = (pg_losses2 > pg_losses1).detach()
            _, pick = cov_selection(logp, A, mask, lambda b, t, c: (
                not bool(clip_by_origin[b, t]) and clip_cov_lb < c < clip_cov_ub))
            corr = torch.ones_like(r)
            chosen = pick(clip_cov_ratio)
            for b, t in chosen:
                corr[b, t] = 0.0
            selected = corr == 0
            pg = pg * corr
    elif loss == "sapo":  # verl compute_policy_loss_sapo
        taus = torch.where(A > 0, torch.full_like(A, tau_pos), torch.full_like(A, tau_neg))
        gates = torch.sigmoid(taus * (ratio - 1.0)) * (4.0 / taus)
        pg = -gates * A
    elif loss == "gmpo":  # verl compute_policy_loss_geo_mean (no 1e-8 in the means)
        sgn = torch.sign(A)
        clamped = torch.clamp(negative_approx_kl, -clip_low, clip_high)
        kl_min = sgn * torch.min(sgn * negative_approx_kl, sgn * clamped)
        seq = []
        for b in range(B):
            n = mask[b].sum()
            if float(n) == 0:
                seq.append(logp[b].sum() * 0.0)
                continue
            ratio_b = torch.exp((kl_min[b] * mask[b]).sum() / n)
            adv_b = (A[b] * mask[b]).sum() / n
            val = -adv_b * ratio_b
            if w is not None:
                val = val * torch.exp((torch.log(w[b] + 1e-10) * mask[b]).sum() / n)
            seq.append(val)
        pg = torch.stack(seq)[:, None].expand(B, T)
        w = None  # folded into the sequence weight
        high = (A > 0) & (negative_approx_kl.detach() > clip_high)
        low = (A < 0) & (negative_approx_kl.detach() < -clip_low)
    elif loss == "kl_cov":  # verl compute_policy_loss_kl_cov (deterministic top-k)
        _, pick = cov_selection(logp, A, mask, lambda b, t, c: True)
        chosen = pick(kl_cov_ratio)
        pg = -A * ratio
        extra = torch.zeros_like(pg)
        for b, t in chosen:
            extra[b, t] = 1.0
        selected = extra == 1.0
        pg = pg + extra * kl_cov_coef * negative_approx_kl.abs()
    elif loss in ("dppo_tv", "dppo_kl"):  # verl compute_policy_loss_dppo_*
        C = 20.0 if dual_clip is None else dual_clip
        truncated_ratio = torch.clamp(ratio, max=C).detach()
        prob, old_prob = torch.exp(logp.detach()), torch.exp(old_logp)
        if loss == "dppo_tv":
            valid_pos = (prob - old_prob) <= clip_high
            valid_neg = (prob - old_prob) >= -clip_low
        else:
            binary_kl = old_prob * (old_logp - logp.detach()) + (1 - old_prob) * torch.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            valid_pos = (binary_kl <= clip_high) | (prob <= old_prob)
            valid_neg = (binary_kl <= clip_low) | (prob >= old_prob)
        valid = torch.where(A > 0, valid_pos, valid_neg)
        pg = -A * truncated_ratio * logp * valid.double()
        high, low = (A > 0) & ~valid, (A <= 0) & ~valid
        dual = (r > C) & valid
    elif loss == "dro":  # verl compute_policy_loss_dro
        pg = -(logp * A - 0.5 * dro_beta * negative_approx_kl.square())
    elif loss == "vespo":  # TRL get_gamma_weights
        lower = math.log(1e-8)
        seq_log_ratio = (negative_approx_kl.detach() * mask).sum(-1, keepdim=True)
        if w is not None:
            log_is = torch.clamp(torch.log(w), lower, 20.0)
            seq_log_ratio = seq_log_ratio + (log_is * mask).sum(-1, keepdim=True)
        log_w_seq = torch.clamp(seq_log_ratio, lower, 20.0)
        w_seq = torch.exp(log_w_seq)
        k = torch.where(A >= 0, vespo_k_pos, vespo_k_neg)
        lam = torch.where(A >= 0, torch.full_like(A, vespo_lambda_pos),
                          torch.full_like(A, vespo_lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w_seq - lam * w_seq).nan_to_num(nan=0.0, posinf=0.0,
                                                                       neginf=0.0)
        pg = -phi * A * logp
        w = None
    else:
        assert loss == "ppo", loss
        coef_2 = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
        pg = -torch.min(ratio * A, coef_2 * A)
        high = (r > 1 + clip_high) & (A > 0)
        low = (r < 1 - clip_low) & (A < 0)
    if w is not None:
        pg = pg * w
    per_token = pg
    kl_val = None
    if ref_logp is not None:
        if kl_estimator in ("k3_is", "k3_is_sg"):  # TRL use_bias_correction_kl
            ref = ref_logp.double()
            per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
            kl_val = per_token_kl * (ratio if kl_estimator == "k3_is" else ratio.detach())
        else:
            kl_val = kl(logp, ref_logp.double(), kl_estimator)
        per_token = per_token + kl_coef * kl_val
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
    # masked positions are selected away (NaN there must not reach the sums)
    per_token = torch.where(mask != 0, per_token, torch.zeros_like(per_token))
    value = aggregate(per_token, mask, agg, normalizer)
    rr = torch.where(mask != 0, r, torch.zeros_like(r))
    m: Dict[str, Tensor] = {
        "clipfrac": _masked_mean((high | low | selected).double(), mask),
        "clipfrac_high": _masked_mean(high.double(), mask),
        "clipfrac_low": _masked_mean(low.double(), mask),
        "dual_clipfrac": _masked_mean(dual.double(), mask),
        "approx_kl": _masked_mean(-negative_approx_kl.detach(), mask),
        "ratio_mean": _masked_mean(r, mask),
        "ratio_max": torch.tensor(max((float(rr[b, t]) for b in range(B) for t in range(T)
                                       if float(mask[b, t]) > 0), default=0.0),
                                  dtype=torch.float64),
    }
    if kl_val is not None:
        m["kl"] = _masked_mean(kl_val.detach(), mask)
    if entropy is not None:
        m["entropy"] = _masked_mean(entropy.detach().double(), mask)
    return value, m
