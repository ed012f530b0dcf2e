"""Reference kernels of the policy-loss ops (log-probs in), and of ``grpo_loss``.

The per-token loss and its aggregation are written once, as plain differentiable PyTorch
(:func:`per_token_loss`, :func:`aggregate`); backward recomputes them and asks autograd for
the gradient. Policy tensors are ``[B, T]``, so this costs nothing worth saving, and it keeps
the ground truth a direct transcription of the formulas.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .._fused import fused_forward, row_grads
from .._policy_options import METRICS, PolicyOptions
from . import compute_dtype
from . import vocab as _vocab

Tensor = torch.Tensor

# grpo_loss (the one op of this family with maps) takes logits [B, T, V] as given (its
# vocabulary kernels take the public shapes): rlkernels.ops._table skips its map and the
# gradient's reshape; logits [N, V] stay accepted
ND_ROWS = True

__all__ = ["METRICS"]  # re-exported: the order of the metric vector


# ------------------------------------------------------------------------------ KL penalty

def kl_penalty_forward(logp: Tensor, ref_logp: Tensor, estimator: str,
                       clamp_lo: Optional[float], clamp_hi: Optional[float]) -> Tensor:
    """The ``kl_penalty`` op: :func:`kl_estimate` in the output dtype (fp32, fp64 if either
    input is fp64), clamped to ``[clamp_lo, clamp_hi]`` when they are given."""
    value = kl_estimate(logp.to(_kl_dtype(logp, ref_logp)), ref_logp, estimator)
    if clamp_lo is not None:
        value = torch.clamp(value, clamp_lo, clamp_hi)
    return value


def _kl_dtype(logp: Tensor, ref_logp: Tensor) -> torch.dtype:
    return compute_dtype(torch.promote_types(logp.dtype, ref_logp.dtype))


def kl_penalty_backward(grad: Tensor, logp: Tensor, ref_logp: Tensor, estimator: str,
                        clamp_lo: Optional[float], clamp_hi: Optional[float]
                        ) -> Tuple[Tensor, Tensor]:
    """``(d/d logp, d/d ref_logp)`` of :func:`kl_penalty_forward`; like ``torch.clamp``, no
    gradient where the clamp is active."""
    cdt = _kl_dtype(logp, ref_logp)
    lp, ref = logp.to(cdt), ref_logp.to(cdt)
    g = grad * kl_estimate_grad(lp, ref, estimator)
    if clamp_lo is not None:
        unclamped = kl_estimate(lp, ref, estimator)
        g = torch.where((unclamped >= clamp_lo) & (unclamped <= clamp_hi), g,
                        torch.zeros_like(g))
    return g, -g


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Elementwise estimators of ``KL(pi || ref)`` from sampled-token log-probs,
    ``d = logp - ref_logp``: k1 ``d``, abs ``|d|``, k2 ``d^2/2``, k3 ``exp(-d) + d - 1``
    ("k3+" has the value of k3)."""
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "abs":
        return d.abs()
    if estimator == "k2":
        return 0.5 * d * d
    return torch.expm1(-d) + d  # k3, low_var_kl, k3+: exp(-d) - 1 + d without cancellation


def kl_estimate_grad(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """``d penalty / d logp`` (the gradient w.r.t. ``ref_logp`` is its negative).
    "k3+" is straight-through: the value of k3 with the gradient of k2."""
    d = logp - ref_logp
    if estimator == "k1":
        return torch.ones_like(d)
    if estimator == "abs":
        return torch.sign(d)
    if estimator in ("k2", "k3+"):
        return d
    return -torch.expm1(-d)  # 1 - exp(-d); k3_is / k3_is_sg: times the ratio (the caller)


def kl_penalty_value(logp: Tensor, ref_logp: Tensor, estimator: str,
                     ratio: Optional[Tensor] = None) -> Tensor:
    """Differentiable ``kl_penalty`` in plain autograd (for the policy-loss formulas);
    ``"k3_is"`` is ``ratio * k3`` (TRL's ``use_bias_correction_kl``: the ratio keeps its
    gradient), ``"k3_is_sg"`` ``sg(ratio) * k3``."""
    value = kl_estimate(logp, ref_logp, estimator)
    if estimator == "k3_is":
        value = ratio * value
    elif estimator == "k3_is_sg":
        value = ratio.detach() * value
    if estimator == "k3+":
        k2 = kl_estimate(logp, ref_logp, "k2")
        value = k2 + (value - k2).detach()
    return value


# ------------------------------------------------------------------------------ policy loss

def per_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                   ref_logp: Optional[Tensor], entropy: Optional[Tensor],
                   is_weights: Optional[Tensor], o: PolicyOptions
                   ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-token loss ``[B, T]`` and the boolean/float per-token quantities of the metrics.

    ``log r = clamp(logp - old_logp, +-log_ratio_clamp)``; for ``ratio_level="sequence"``
    (GSPO) ``log r = sg(s) + logp - sg(logp)`` with ``s`` the masked mean of ``log r`` over
    the sequence. Then (docs/math.md "Policy losses" has the sources)

    * ppo, luspo: ``max(-A min(r, delta), -A clip(r, 1-clip_low, 1+clip_high))``, and where
      ``A < 0`` with ``dual_clip = c``: ``min(that, -c A)``
    * cispo:     ``-sg(clip(r, 0, 1+clip_high)) A logp`` (TRL); with ``cispo_clip_low``
      ``-sg(clip(r, 1-clip_low, 1+clip_high)) A logp`` (verl)
    * reinforce: ``-A logp``
    * sapo:      ``-(4 / tau) sigmoid(tau (r - 1)) A``, ``tau = tau_pos`` if ``A > 0`` else
      ``tau_neg``
    * gmpo:      the sequence's ``-mean(A) exp(mean(c)) W`` on each of its tokens, ``c`` the
      log-ratio clipped on the side of ``sign(A)``, ``W`` the geometric mean of is_weights
    * clip_cov:  ppo's term, 0 on the covariance-selected tokens (:func:`cov_selection`)
    * kl_cov:    ``-A r``, ``+ kl_cov_coef |log r|`` on the covariance-selected tokens
    * dppo_tv / dppo_kl: ``-A sg(min(r, C)) logp`` on the tokens inside the trust region
      (probability difference / binary KL against ``clip_low`` / ``clip_high``)
    * dro:       ``-A logp + dro_beta / 2 (log r)^2``
    * vespo:     ``-sg(phi) A logp``, ``phi`` the gamma weight of the sequence ratio

    times ``is_weights`` (gmpo and vespo fold them into their sequence weight instead),
    ``+ kl_coef kl_penalty(logp, ref_logp)`` (``k3_is``: ``r k3``), ``- entropy_coef H``.
    """
    adv = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages
    log_r = torch.clamp(logp - old_logp, -o.log_ratio_clamp, o.log_ratio_clamp)
    if o.ratio_level == "sequence":
        count = mask.sum(-1)
        seq = torch.where(count > 0, _masked(log_r, mask).sum(-1) / count, 0.0)
        log_r = seq.detach()[:, None] + logp - logp.detach()
    ratio = torch.exp(log_r)
    lo, hi = 1.0 - o.clip_low, 1.0 + o.clip_high
    r = ratio.detach()
    zeros = torch.zeros_like(r, dtype=torch.bool)
    high = low = dual = selected = zeros
    weighted = is_weights
    if o.loss in ("ppo", "luspo", "clip_cov"):
        unclipped = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
        pg = torch.maximum(-adv * unclipped, -adv * torch.clamp(ratio, lo, hi))
        high, low = (adv > 0) & (r > hi), (adv < 0) & (r < lo)
        if o.dual_clip is not None:
            bound = -o.dual_clip * adv
            dual = (adv < 0) & (pg.detach() > bound)
            pg = torch.where(adv < 0, torch.minimum(pg, bound), pg)
        if o.loss == "clip_cov":
            selected = cov_selection(logp.detach(), old_logp, advantages, mask, o)
            pg = torch.where(selected, 0.0, pg)
    elif o.loss == "cispo":
        floor = o.ratio_floor
        pg = -torch.clamp(r, floor, hi) * adv * logp
        high, low = r > hi, r < floor
    elif o.loss == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, o.tau_pos), o.tau_neg)
        pg = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
    elif o.loss == "gmpo":
        factor = _gmpo_factor(log_r, adv, mask, is_weights, o)
        clipped = _gmpo_clipped(log_r, adv, o)
        # the sequence's value on each token, with the gradient of its own token's share
        # (exact: the aggregation weights are proportional to m within a sequence)
        pg = factor * (1.0 + clipped - clipped.detach())
        high = (adv > 0) & (log_r.detach() > o.clip_high)
        low = (adv < 0) & (log_r.detach() < -o.clip_low)
        weighted = None
    elif o.loss == "kl_cov":
        selected = cov_selection(logp.detach(), old_logp, advantages, mask, o)
        pg = -adv * ratio + torch.where(selected, o.kl_cov_coef * log_r.abs(), 0.0)
    elif o.loss in ("dppo_tv", "dppo_kl"):
        valid = _dppo_valid(logp.detach(), old_logp, adv, o)
        pg = torch.where(valid, -adv * torch.clamp(r, max=o.dual_clip) * logp, 0.0)
        high, low = (adv > 0) & ~valid, (adv <= 0) & ~valid
        dual = valid & (r > o.dual_clip)
    elif o.loss == "dro":
        pg = -adv * logp + 0.5 * o.dro_beta * log_r * log_r
    elif o.loss == "vespo":
        pg = -_vespo_phi(log_r.detach(), adv, mask, is_weights, o) * adv * logp
        weighted = None
    else:
        pg = -adv * logp
    if weighted is not None:
        pg = pg * weighted
    loss = pg
    kl = None
    if ref_logp is not None:
        kl = kl_penalty_value(logp, ref_logp, o.kl_estimator, ratio)
        if o.kl_coef != 0.0:
            loss = loss + o.kl_coef * kl
    if entropy is not None and o.entropy_coef != 0.0:
        loss = loss - o.entropy_coef * entropy
    parts = {"clipfrac_high": high, "clipfrac_low": low, "dual_clipfrac": dual,
             "selected": selected, "approx_kl": -log_r.detach(), "ratio": r, "kl": kl,
             "entropy": entropy}
    return loss, parts


def _gmpo_clipped(log_r: Tensor, adv: Tensor, o: PolicyOptions) -> Tensor:
    """verl's geo_mean: ``sign(A) min(sign(A) log r, sign(A) clamp(log r, -lo, hi))``, i.e.
    ``min(log r, clip_high)`` where ``A > 0``, ``max(log r, -clip_low)`` where ``A < 0``,
    0 where ``A == 0``."""
    return torch.where(adv > 0, torch.clamp(log_r, max=o.clip_high),
                       torch.where(adv < 0, torch.clamp(log_r, min=-o.clip_low),
                                   torch.zeros_like(log_r)))


def _gmpo_factor(log_r: Tensor, adv: Tensor, mask: Tensor, is_weights: Optional[Tensor],
                 o: PolicyOptions) -> Tensor:
    """GMPO's sequence loss ``-mean_m(A) exp(mean_m(c)) W`` per row ``[B, 1]`` (0 for an
    empty row), ``W`` the masked geometric mean of ``is_weights + 1e-10`` (verl)."""
    count = mask.sum(-1, keepdim=True)
    nonzero = torch.where(count > 0, count, torch.ones_like(count))
    clipped = _gmpo_clipped(log_r.detach(), adv, o)
    mean_c = _masked(clipped, mask).sum(-1, keepdim=True) / nonzero
    mean_a = _masked(adv, mask).sum(-1, keepdim=True) / nonzero
    w = torch.ones_like(mean_c)
    if is_weights is not None:
        w = torch.exp(_masked(torch.log(is_weights + 1e-10), mask).sum(-1, keepdim=True)
                      / nonzero)
    return torch.where(count > 0, -mean_a * torch.exp(mean_c) * w, 0.0)


# TRL's clamp of the VESPO sequence log-weight (and of log is_weights): [log(1e-8), 20]
_VESPO_LOG_LO, _VESPO_LOG_HI = math.log(1e-8), 20.0


def _vespo_phi(log_r: Tensor, adv: Tensor, mask: Tensor, is_weights: Optional[Tensor],
               o: PolicyOptions) -> Tensor:
    """TRL's ``get_gamma_weights``: ``phi = exp(lam + k log w - lam w)``, ``log w`` the
    masked sum of the (clamped) log-ratios of the sequence plus that of the clamped
    ``log is_weights``, clamped to ``[log 1e-8, 20]``; ``(k, lam)`` the ``_pos`` pair where
    ``A >= 0``; non-finite ``phi`` -> 0. Constant (no gradient)."""
    total = _masked(log_r, mask).sum(-1, keepdim=True)
    if is_weights is not None:
        log_is = torch.clamp(torch.log(is_weights), _VESPO_LOG_LO, _VESPO_LOG_HI)
        total = total + _masked(log_is, mask).sum(-1, keepdim=True)
    log_w = torch.clamp(total, _VESPO_LOG_LO, _VESPO_LOG_HI)
    k_pos, k_neg, lam_pos, lam_neg, _ = o.loss_scalars
    k = torch.where(adv >= 0, torch.full_like(adv, k_pos), k_neg)
    lam = torch.where(adv >= 0, torch.full_like(adv, lam_pos), lam_neg)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.where(torch.isfinite(phi), phi, 0.0)


def _dppo_valid(logp: Tensor, old_logp: Tensor, adv: Tensor, o: PolicyOptions) -> Tensor:
    """DPPO's trust region (verl ``dppo_tv`` / ``dppo_kl``), per token: where ``A > 0``
    ``p - p_old <= clip_high`` (tv) or ``binary_kl <= clip_high or p <= p_old`` (kl); else
    ``p - p_old >= -clip_low`` (tv) or ``binary_kl <= clip_low or p >= p_old`` (kl), with
    ``p = exp(logp)`` and ``binary_kl = p_old (log p_old - log p) + (1 - p_old)
    log((1 - p_old + 1e-8) / (1 - p + 1e-8))`` (``1 - p`` as ``-expm1(logp)``)."""
    p, p_old = torch.exp(logp), torch.exp(old_logp)
    if o.loss == "dppo_tv":
        return torch.where(adv > 0, p - p_old <= o.clip_high, p - p_old >= -o.clip_low)
    binary_kl = p_old * (old_logp - logp) + (-torch.expm1(old_logp)) * torch.log(
        (-torch.expm1(old_logp) + 1e-8) / (-torch.expm1(logp) + 1e-8))
    return torch.where(adv > 0, (binary_kl <= o.clip_high) | (p <= p_old),
                       (binary_kl <= o.clip_low) | (p >= p_old))


def cov_selection(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                  o: PolicyOptions) -> Tensor:
    """The covariance-selected tokens of clip_cov / kl_cov, a bool ``[B, T]``, on the device,
    without a host synchronisation (every backend's launcher calls this between its kernel
    launches, so all backends select the same tokens).

    ``cov = (A - mean_m(A)) (logp - mean_m(logp))`` over the batch (masked means, mask
    values as weights); ``k = max(floor(ratio sum(m)), 1)`` (``clip_cov_ratio`` /
    ``kl_cov_ratio``). kl_cov selects the ``k`` unmasked tokens of largest ``cov`` (verl's
    ``topk``); clip_cov the ``k`` of largest ``cov`` among the candidates ``clip_cov_lb <
    cov < clip_cov_ub`` not already clipped by ppo's clip (verl draws them at random: here
    the selection is deterministic). Ties go to the lower flat index (a stable sort)."""
    cdt = compute_dtype(logp.dtype)
    # contiguous copies: the batch means round alike whatever the callers' layouts
    lp, old, m = (x.to(cdt).contiguous() for x in (logp, old_logp, mask))
    adv = advantages.to(cdt).contiguous()
    adv = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    valid = m != 0
    total = m.sum()
    nonzero = torch.where(total != 0, total, torch.ones_like(total))
    mean_a = _masked(adv, m).sum() / nonzero
    mean_lp = _masked(lp, m).sum() / nonzero
    cov = (adv - mean_a) * (lp - mean_lp)
    if o.loss == "clip_cov":
        log_r = torch.clamp(lp - old, -o.log_ratio_clamp, o.log_ratio_clamp)
        r = torch.exp(log_r)
        lo, hi = 1.0 - o.clip_low, 1.0 + o.clip_high
        clipped = ((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo))
        candidate = valid & ~clipped & (cov > o.clip_cov_lb) & (cov < o.clip_cov_ub)
        fraction = o.clip_cov_ratio
    else:
        candidate = valid
        fraction = o.kl_cov_ratio
    k = torch.clamp(torch.floor(total.to(torch.float64) * fraction), min=1.0)
    keys = torch.where(candidate, cov, float("-inf")).reshape(-1)
    order = torch.sort(keys, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return candidate & (rank.view_as(candidate) < k)


def _denominator(mask: Tensor, agg: str, normalizer: Optional[Tensor]) -> Tensor:
    """The divisor of ``agg`` (``normalizer`` when given); an empty one counts as 1."""
    if normalizer is not None:
        denom = normalizer.to(mask.dtype)
    elif agg == "token-mean":
        denom = mask.sum()
    elif agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        denom = (mask.sum(-1) > 0).to(mask.dtype).sum()
    else:  # seq-mean-token-sum-norm (Dr. GRPO): a constant horizon T
        denom = torch.tensor(float(mask.shape[-1]), dtype=mask.dtype, device=mask.device)
    return torch.where(denom > 0, denom, torch.ones_like(denom))


def aggregate(loss: Tensor, mask: Tensor, agg: str, normalizer: Optional[Tensor]) -> Tensor:
    """Masked aggregation of ``[B, T]`` per-token losses into a scalar (see ``policy_loss``).

    An empty denominator (no unmasked token or sequence) gives a loss of 0, not NaN.
    """
    masked = _masked(loss, mask)
    if agg == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(-1)
        total = torch.where(tokens_per_seq > 0, masked.sum(-1) / tokens_per_seq, 0.0).sum()
    else:
        total = masked.sum()
    return total / _denominator(mask, agg, normalizer)


def aggregate_weights(mask: Tensor, agg: str, normalizer: Optional[Tensor]) -> Tensor:
    """``d aggregate / d loss``, per token ``[B, T]``: ``m / denom``, and for
    ``seq-mean-token-mean`` also divided by the sequence's token count."""
    weights = mask / _denominator(mask, agg, normalizer)
    if agg == "seq-mean-token-mean":
        tokens_per_seq = mask.sum(-1, keepdim=True)
        weights = torch.where(tokens_per_seq > 0, weights / tokens_per_seq, 0.0)
    return weights


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """``m x`` where ``m != 0``, an exact 0 elsewhere: a select, not a product, so that NaN or
    inf at a masked position never reaches a sum (``NaN * 0`` is NaN)."""
    return torch.where(mask != 0, x.to(mask.dtype) * mask, 0.0)


def _masked_mean(x: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    return _masked(x, mask).sum() / count


def metrics_vector(parts: Dict[str, Tensor], mask: Tensor) -> Tensor:
    """The ``METRICS`` as one fp32 vector: token-masked means (``ratio_max`` a masked max);
    0 when no token is unmasked, and 0 for ``kl``/``entropy`` when not given. Masked
    positions are selected away, so their values (NaN, inf) never reach a metric.
    ``clipfrac`` also counts the covariance-selected tokens of clip_cov / kl_cov (disjoint
    from the clipped ones)."""
    active = mask > 0
    count = mask.sum().clamp_min(1e-30)
    zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
    high, low = parts["clipfrac_high"], parts["clipfrac_low"]
    ratio = parts["ratio"]
    values = [
        _masked_mean(high | low | parts["selected"], mask, count),
        _masked_mean(high, mask, count),
        _masked_mean(low, mask, count),
        _masked_mean(parts["dual_clipfrac"], mask, count),
        _masked_mean(parts["approx_kl"], mask, count),
        _masked_mean(ratio, mask, count),
        torch.where(active, ratio.to(mask.dtype), zero).amax() if ratio.numel() else zero,
        _masked_mean(parts["kl"].detach(), mask, count) if parts["kl"] is not None else zero,
        _masked_mean(parts["entropy"].detach(), mask, count)
        if parts["entropy"] is not None else zero,
    ]
    return torch.stack(values).to(torch.float32)


def _prepared(logp: Tensor, others: List[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """The inputs in the compute dtype, contiguous: torch's reductions run in memory order,
    so a strided (e.g. column-major) input would round the sums differently."""
    cdt = compute_dtype(logp.dtype)
    return [None if x is None else x.to(cdt).contiguous() for x in others]


def policy_loss_forward(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                        normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                        entropy: Optional[Tensor], is_weights: Optional[Tensor],
                        o: PolicyOptions) -> Tuple[Tensor, Tensor]:
    """Returns ``(loss [], metrics [len(METRICS)])``."""
    lp, old, adv, m, ref, ent, isw = _prepared(
        logp, [logp, old_logp, advantages, mask, ref_logp, entropy, is_weights])
    loss, parts = per_token_loss(lp, old, adv, m, ref, ent, isw, o)
    return aggregate(loss, m, o.agg, normalizer), metrics_vector(parts, m)


def policy_loss_backward(grad_loss: Tensor, logp: Tensor, old_logp: Tensor,
                         advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                         ref_logp: Optional[Tensor], entropy: Optional[Tensor],
                         is_weights: Optional[Tensor], o: PolicyOptions
                         ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients of the loss w.r.t. ``logp`` and ``entropy`` (``None`` if not given).

    ``d loss / d L_t = c_t`` (:func:`aggregate_weights`), and with ``A`` the advantage, ``r``
    the ratio and ``w`` the importance weight:

    * ``d L_t / d H_t = -entropy_coef``
    * ``d L_t / d logp_t = w dpg_t + kl_coef dKL_t/dlogp_t`` where ``dpg_t`` is
      ppo: ``dpg/dr * r * dlog r/dlogp`` (``dlog r/dlogp`` is 1 inside the log-ratio clamp,
      and always 1 for the GSPO straight-through), with ``dpg/dr = -A`` on the active branch
      of the max and 0 on a clipped one (half each on an exact tie, like ``torch.maximum``),
      and 0 where the dual-clip bound is active; cispo: ``-clip(r, f, 1 + clip_high) A``
      (``f = 1 - clip_low`` with ``cispo_clip_low``, else 0);
      reinforce: ``-A``; and for the other losses the derivative of their per-token
      term (see :func:`per_token_loss`): sapo ``-A 4 s (1 - s) r dlog r`` (``s`` the
      sigmoid); gmpo the sequence value times ``dc/dlogp``; clip_cov ppo's, 0 on the
      selected tokens; kl_cov ``(-A r + kl_cov_coef sign(log r) [selected]) dlog r``; dppo
      ``-A min(r, C)`` inside the trust region; dro ``-A + dro_beta log r dlog r``; vespo
      ``-phi A``. ``k3_is`` adds ``r dlog r k3 + r (1 - exp(-d))``, ``k3_is_sg`` only the
      second term.

    Masked tokens (``c_t = 0``) receive exactly 0.
    """
    lp, old, adv, m, ref, ent, isw = _prepared(
        logp, [logp, old_logp, advantages, mask, ref_logp, entropy, is_weights])
    c = grad_loss.to(lp.dtype) * aggregate_weights(m, o.agg, normalizer)
    a = adv[:, None].expand_as(lp) if adv.dim() == 1 else adv
    log_r, dlog_r = _log_ratio(lp, old, m, o)
    g = _policy_grad(lp, old, a, adv, m, isw, log_r, dlog_r, o)
    if isw is not None and o.loss not in ("gmpo", "vespo"):
        g = g * isw
    if ref is not None and o.kl_coef != 0.0:
        g_kl = kl_estimate_grad(lp, ref, o.kl_estimator)
        if o.kl_estimator in ("k3_is", "k3_is_sg"):
            r = torch.exp(log_r)
            g_kl = r * g_kl
            if o.kl_estimator == "k3_is":
                g_kl = g_kl + r * dlog_r * kl_estimate(lp, ref, "k3")
        g = g + o.kl_coef * g_kl
    g_lp = torch.where(c != 0, c * g, 0.0)
    g_ent = None
    if entropy is not None:
        g_ent = torch.where(c != 0, -o.entropy_coef * c, 0.0).to(entropy.dtype)
    return g_lp.to(logp.dtype), g_ent


def _half_where_tied(x: Tensor, y: Tensor, if_greater: Tensor, if_less: Tensor) -> Tensor:
    """The gradient routing of ``max(x, y)``-style selections (``torch.maximum``)."""
    return torch.where(x > y, if_greater, torch.where(x < y, if_less,
                                                      0.5 * (if_greater + if_less)))


def _log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, o: PolicyOptions
               ) -> Tuple[Tensor, Tensor]:
    """``(log r, d log r / d logp)``: 1 inside the log-ratio clamp, and always 1 for the
    GSPO straight-through."""
    d = logp - old_logp
    c = o.log_ratio_clamp
    log_r = torch.clamp(d, -c, c)
    if o.ratio_level == "sequence":
        count = mask.sum(-1, keepdim=True)
        total = _masked(log_r, mask).sum(-1, keepdim=True)
        log_r = torch.where(count > 0, total / count, 0.0)
        log_r = log_r.expand_as(logp)
        dlog_r = torch.ones_like(logp)  # straight-through: sg(seq) + logp - sg(logp)
    else:
        dlog_r = ((d >= -c) & (d <= c)).to(logp.dtype)
    return log_r, dlog_r


def _policy_grad(logp: Tensor, old_logp: Tensor, adv: Tensor, advantages: Tensor,
                 mask: Tensor, is_weights: Optional[Tensor], log_r: Tensor, dlog_r: Tensor,
                 o: PolicyOptions) -> Tensor:
    """``d pg_t / d logp_t`` of the policy term (before ``is_weights``, except for gmpo and
    vespo, which fold them into their sequence weight); ``adv`` is ``[B, T]``,
    ``advantages`` as given."""
    if o.loss == "reinforce":
        return -adv
    r = torch.exp(log_r)
    hi = 1.0 + o.clip_high
    if o.loss == "cispo":
        return -torch.clamp(r, o.ratio_floor, hi) * adv
    if o.loss == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, o.tau_pos), o.tau_neg)
        s = torch.sigmoid(tau * (r - 1.0))
        return -adv * 4.0 * s * (1.0 - s) * r * dlog_r
    if o.loss == "gmpo":
        inside = ((adv > 0) & (log_r <= o.clip_high)) | ((adv < 0) & (log_r >= -o.clip_low))
        factor = _gmpo_factor(log_r, adv, mask, is_weights, o)
        return factor * inside.to(r.dtype) * dlog_r
    if o.loss == "kl_cov":
        selected = cov_selection(logp, old_logp, advantages, mask, o)
        penalty = torch.where(selected, o.kl_cov_coef * torch.sign(log_r), 0.0)
        return (-adv * r + penalty) * dlog_r
    if o.loss in ("dppo_tv", "dppo_kl"):
        valid = _dppo_valid(logp, old_logp, adv, o)
        return torch.where(valid, -adv * torch.clamp(r, max=o.dual_clip), 0.0)
    if o.loss == "dro":
        return -adv + o.dro_beta * log_r * dlog_r
    if o.loss == "vespo":
        return -_vespo_phi(log_r, adv, mask, is_weights, o) * adv
    # ppo, luspo, clip_cov
    lo = 1.0 - o.clip_low
    unclipped = r if o.delta is None else torch.clamp(r, max=o.delta)
    d_unclipped = -adv * (1.0 if o.delta is None else (r <= o.delta).to(r.dtype))
    d_clipped = -adv * ((r >= lo) & (r <= hi)).to(r.dtype)
    pg1, pg2 = -adv * unclipped, -adv * torch.clamp(r, lo, hi)
    dpg = _half_where_tied(pg1, pg2, d_unclipped, d_clipped)
    if o.dual_clip is not None:
        pg, bound = torch.maximum(pg1, pg2), -o.dual_clip * adv
        dual = _half_where_tied(pg, bound, torch.zeros_like(dpg), dpg)
        dpg = torch.where(adv < 0, dual, dpg)
    g = dpg * r * dlog_r
    if o.loss == "clip_cov":
        g = torch.where(cov_selection(logp, old_logp, advantages, mask, o), 0.0, g)
    return g


# -------------------------------------------------------------------------------- grpo loss

def grpo_loss_forward(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                      mask: Tensor, normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                      is_weights: Optional[Tensor], temperature: float, o: PolicyOptions
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``policy_loss(token_logprobs(logits, tokens), ...)``: returns
    ``(loss, metrics, logp [B, T], entropy [B, T], stats [B*T, 3])`` (``stats [B, T, 3]``
    for logits ``[B, T, V]``); the entropy is always computed (it feeds the ``entropy``
    metric) and enters the loss with ``entropy_coef``."""
    return fused_forward(
        lambda tok: _vocab.token_logprobs_forward(logits, tok, temperature, -100, True),
        policy_loss_forward, tokens, old_logp, advantages, mask, normalizer, ref_logp,
        is_weights, o)


def grpo_loss_backward(grad_loss: Tensor, logits: Tensor, tokens: Tensor, old_logp: Tensor,
                       advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                       ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                       logp: Tensor, ent: Tensor, stats: Tensor, temperature: float,
                       o: PolicyOptions, inplace: bool) -> Tensor:
    """``d loss / d logits``: the policy-loss gradients w.r.t. the per-token log-probs and
    entropies, pushed through the vocabulary backward in one pass. ``inplace`` writes the
    gradient into ``logits`` (whose values are consumed row chunk by row chunk)."""
    g_lp, g_ent = row_grads(policy_loss_backward, grad_loss, logp, ent, old_logp, advantages,
                            mask, normalizer, ref_logp, is_weights, o)
    return _vocab.token_logprobs_backward(g_lp, g_ent, logits, tokens.reshape(-1), stats,
                                          temperature, -100, out=logits if inplace else None)
