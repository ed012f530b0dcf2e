"""Rollout correction (SPEC 6): importance weights and rejection for the mismatch between the
log-probs the rollout engine reported (vLLM / SGLang, often bf16) and the trainer's, with the
mismatch metrics. One op, ``rollout_correction``, declared in the op table
(:mod:`rlkernels.ops._table`); it has no gradient (its outputs are constants of the loss).

The options map onto verl's ``RolloutCorrectionConfig`` (``rollout_is``,
``rollout_is_threshold``, ``rollout_rs``, ``rollout_rs_threshold``) and TRL's
``vllm_importance_sampling_mode`` / ``_clip_max`` / ``_clip_min`` and
``off_policy_mask_threshold``; docs/math.md ("Rollout correction") gives the formulas, the
sources and the mapping.

:func:`_apply` is the private entry point for the policy losses (``policy_loss(rollout_logp=
...)``): it folds the weights into ``is_weights`` and the keep mask into ``mask``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import _checks, _codes
from ..reference.rollout import METRICS, N_NUMS, compute_dtype
from ._table import Op

Tensor = torch.Tensor
_FAMILY = "rollout"

LEVELS = tuple(_codes.ROLLOUT_LEVELS)
MODES = tuple(_codes.ROLLOUT_MODES)
REJECTS = tuple(_codes.ROLLOUT_REJECTS)

_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                *_checks.FLOAT_DTYPES)

Threshold = Union[float, Tuple[float, float], str]


# ============================================================================== the options

@dataclass(frozen=True)
class RolloutOptions:
    """The validated options of :func:`rollout_correction`, as the op receives them:
    ``level``, ``mode``, ``reject`` (the canonical criteria joined by commas, in code
    order, ``""`` for none) and ``nums`` (``(lo, hi, log_ratio_clamp)`` then a ``(lo, hi)``
    pair per reject code: ``-inf, inf`` for an unused one; k1 criteria in log space)."""

    level: str
    mode: str
    reject: str
    nums: Tuple[float, ...]

    @property
    def needs_advantages(self) -> bool:
        return "opsm" in self.reject.split(",")


def _bound(name: str, value, allow_zero: bool) -> Optional[float]:
    if value is None:
        return None
    return _checks.positive(name, value, allow_zero=allow_zero)


def _criteria(reject) -> Tuple[str, ...]:
    """``reject`` as a tuple of canonical names (verl's comma string or a sequence;
    duplicates removed, order kept)."""
    if reject is None:
        return ()
    if isinstance(reject, str):
        parts = [p.strip() for p in reject.split(",") if p.strip()]
    elif isinstance(reject, (list, tuple)) and all(isinstance(p, str) for p in reject):
        parts = [p.strip() for p in reject]
    else:
        raise TypeError(f"reject: expected None, a string (comma-separated criteria) or a "
                        f"sequence of strings, got {reject!r}")
    if not parts:
        raise ValueError(f"reject: expected at least one criterion of "
                         f"{', '.join(map(repr, REJECTS))}, got {reject!r}")
    out = []
    for p in parts:
        _checks.choice("reject", p, REJECTS)
        if p not in out:
            out.append(p)
    return tuple(out)


def _spec_bounds(criterion: str, spec) -> Tuple[float, float]:
    """One criterion's ``(lo, hi)`` for the kernels, from a threshold ``spec`` (verl's
    ``rollout_rs_threshold`` semantics): k1 criteria take ratio bounds ``(lo, hi)`` or one
    number ``hi`` (``lo = 1 / hi``), compared in log space; k2 / k3 criteria one upper bound;
    ``opsm`` one number, the KL bound ``delta`` (any finite value)."""
    arg = f"reject_threshold[{criterion!r}]"
    if isinstance(spec, str):  # verl's string form: "hi" or "lo_hi"
        text = spec.strip()
        try:
            spec = (tuple(float(x) for x in text.split("_", 1)) if "_" in text
                    else float(text))
        except ValueError:
            raise ValueError(f"{arg}: expected a number, a pair (lo, hi) or verl's 'lo_hi' "
                             f"string, got {text!r}") from None
    if criterion == "opsm":
        if isinstance(spec, (tuple, list)):
            raise ValueError(f"{arg}: expected one number (the KL bound delta), got {spec!r}")
        return -math.inf, _checks.number(arg, spec)
    pair = isinstance(spec, (tuple, list))
    if criterion.endswith("k1"):
        if pair:
            if len(spec) != 2:
                raise ValueError(f"{arg}: expected a pair (lo, hi) of ratio bounds, got "
                                 f"{spec!r}")
            lo, hi = (_checks.positive(arg, v) for v in spec)
        else:
            hi = _checks.positive(arg, spec)
            lo = 1.0 / hi
        if lo > hi:
            raise ValueError(f"{arg}: expected lo <= hi, got ({lo}, {hi})")
        return math.log(lo), math.log(hi)
    if pair:
        raise ValueError(f"{arg}: expected one upper bound (k2 / k3 criteria have no lower "
                         f"bound), got {spec!r}")
    return -math.inf, _checks.positive(arg, spec)


def _reject_bounds(criteria: Tuple[str, ...], reject_threshold) -> Dict[str, Tuple[float, float]]:
    if not criteria:
        if reject_threshold is not None:
            raise ValueError(f"reject_threshold: expected None without reject criteria, got "
                             f"{reject_threshold!r}")
        return {}
    if reject_threshold is None:
        raise ValueError(f"reject_threshold: expected a threshold for reject={','.join(criteria)}"
                         f" (a number, a pair, verl's string or a dict per criterion), got None")
    if isinstance(reject_threshold, Mapping):
        missing = [c for c in criteria if c not in reject_threshold]
        extra = [k for k in reject_threshold if k not in criteria]
        if missing or extra:
            raise ValueError(f"reject_threshold: expected one entry per criterion "
                             f"{list(criteria)}, got keys {list(reject_threshold)}")
        specs = [reject_threshold[c] for c in criteria]
    elif isinstance(reject_threshold, str) and "," in reject_threshold:
        specs = [s.strip() for s in reject_threshold.split(",") if s.strip()]
        if len(specs) == 1:
            specs = specs * len(criteria)
        if len(specs) != len(criteria):
            raise ValueError(f"reject_threshold: expected one threshold shared by all criteria "
                             f"or {len(criteria)} (one per criterion), got {len(specs)}")
    else:
        specs = [reject_threshold] * len(criteria)
    return {c: _spec_bounds(c, s) for c, s in zip(criteria, specs)}


def _options(level: str = "token", mode: str = "truncate",
             threshold_high: Optional[float] = 2.0, threshold_low: Optional[float] = None,
             reject=None, reject_threshold=None,
             log_ratio_clamp: float = 20.0) -> RolloutOptions:
    """Validate the keyword options of :func:`rollout_correction` into
    :class:`RolloutOptions` (errors name the argument, the expected and the received)."""
    _checks.choice("level", level, LEVELS)
    _checks.choice("mode", mode, MODES)
    hi = _bound("threshold_high", threshold_high, allow_zero=False)
    lo = _bound("threshold_low", threshold_low, allow_zero=True)
    if hi is None and lo is None:
        raise ValueError("threshold_high, threshold_low: expected at least one bound on the "
                         "importance weight, got None for both")
    if hi is not None and lo is not None and lo > hi:
        raise ValueError(f"threshold_low: expected a value <= threshold_high={hi}, got {lo}")
    clamp = _checks.positive("log_ratio_clamp", log_ratio_clamp)
    criteria = _criteria(reject)
    bounds = _reject_bounds(criteria, reject_threshold)
    nums = [0.0 if lo is None else lo, math.inf if hi is None else hi, clamp]
    for name in REJECTS:  # in code order
        nums += list(bounds.get(name, (-math.inf, math.inf)))
    assert len(nums) == N_NUMS
    ordered = ",".join(n for n in REJECTS if n in bounds)
    return RolloutOptions(level, mode, ordered, tuple(nums))


# =================================================================================== the op

def _fake(a):
    cdt = compute_dtype(a.old_logp, a.rollout_logp)
    shape = a.old_logp.shape
    return (a.old_logp.new_empty(shape, dtype=cdt), a.old_logp.new_empty(shape, dtype=torch.bool),
            a.old_logp.new_empty(len(METRICS), dtype=torch.float32))


ROLLOUT_CORRECTION = Op(
    "rollout_correction(Tensor old_logp, Tensor rollout_logp, Tensor mask, Tensor? "
    "advantages, str level, str mode, str reject, float[] nums, str backend) -> (weights, "
    "keep, metrics)",
    _FAMILY, fake=_fake, eager=True)


def _check_inputs(old_logp, rollout_logp, mask, advantages, o: RolloutOptions) -> None:
    _checks.tensor("old_logp", old_logp, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    _checks.tensor("rollout_logp", rollout_logp, dtypes=_checks.FLOAT_DTYPES)
    _checks.shape("rollout_logp", rollout_logp, old_logp.shape, "the shape of old_logp")
    _checks.tensor("mask", mask, dtypes=_MASK_DTYPES)
    _checks.shape("mask", mask, old_logp.shape, "the shape of old_logp")
    _checks.same_device("old_logp", old_logp, rollout_logp=rollout_logp, mask=mask,
                        advantages=advantages)
    if o.needs_advantages:
        if advantages is None:
            raise ValueError("advantages: expected a [B] or [B, T] tensor with "
                             "reject='opsm' (it keeps sequences with A >= 0), got None")
    elif advantages is not None:
        raise ValueError(f"advantages: expected None unless reject includes 'opsm', got a "
                         f"tensor of shape {tuple(advantages.shape)}")
    if advantages is not None:
        _checks.tensor("advantages", advantages, dtypes=_checks.FLOAT_DTYPES)
        b, t = old_logp.shape
        if tuple(advantages.shape) not in ((b,), (b, t)):
            raise ValueError(f"advantages: expected shape ({b},) or ({b}, {t}) (one value per "
                             f"sequence or per token), got {tuple(advantages.shape)}")


def _run(old_logp, rollout_logp, mask, advantages, o: RolloutOptions, backend):
    name = ROLLOUT_CORRECTION.resolve(backend, old_logp)
    weights, keep, metrics = ROLLOUT_CORRECTION(old_logp, rollout_logp, mask, advantages,
                                                o.level, o.mode, o.reject, list(o.nums), name)
    return weights, keep, dict(zip(METRICS, metrics.unbind(0)))


def rollout_correction(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *,
                       level: str = "token", mode: str = "truncate",
                       threshold_high: Optional[float] = 2.0,
                       threshold_low: Optional[float] = None,
                       reject: Union[None, str, Sequence[str]] = None,
                       reject_threshold=None, advantages: Optional[Tensor] = None,
                       log_ratio_clamp: float = 20.0, backend: Optional[str] = None
                       ) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """Importance weights and rejection mask correcting the rollout / trainer mismatch.

    ``old_logp`` are the trainer's log-probs of the sampled tokens (verl's ``old_log_prob``,
    TRL's ``old_per_token_logps``), ``rollout_logp`` the rollout engine's (verl's
    ``rollout_log_prob``, TRL's ``sampling_per_token_logps``). With ``m`` the mask (bool / int:
    0 or 1; a float mask acts as a weight in every sum), ``valid = m != 0``,
    ``lr = old_logp - rollout_logp`` and ``C = log_ratio_clamp`` (verl's ``SAFETY_BOUND``):

    **Importance weight** ``raw = exp(clamp(x, -C, C))`` with, per ``level``:
    ``"token"`` ``x = lr`` (per token); ``"sequence"`` ``x = sum_t m lr`` (the product of
    the token ratios, one weight per sequence); ``"geometric"`` ``x = sum_t m lr / sum_t m``
    (the geometric mean of the token ratios). Then, per ``mode`` with
    ``lo = threshold_low or 0`` and ``hi = threshold_high or inf``: ``"truncate"``
    ``w = clamp(raw, lo, hi)`` (TIS; TRL's ``*_truncate``, verl's single threshold);
    ``"mask"`` ``w = raw`` inside ``[lo, hi]``, 0 outside (IcePop / MIS: TRL's ``*_mask``,
    verl's ``"lo_hi"`` threshold; NaN is outside). ``weights`` is ``w`` at valid positions and
    exactly 0 elsewhere.

    **Rejection** ``reject``: verl's ``rollout_rs`` criteria (comma-separated or a sequence;
    every criterion must pass) plus ``"opsm"``. On ``lr_c = clamp(lr, -C, C)``:
    ``k1 = -lr_c``, ``k2 = lr_c^2 / 2``, ``k3 = exp(lr_c) - 1 - lr_c``; ``token_kX`` tests each
    token, ``seq_sum_kX`` / ``seq_mean_kX`` / ``seq_max_kX`` the (weighted) sum / mean / max
    over the sequence's valid tokens (a whole sequence passes or fails). ``reject_threshold``
    (verl's ``rollout_rs_threshold``): a spec shared by every criterion, verl's comma string,
    or a dict ``{criterion: spec}``; a spec is a number, a pair or verl's ``"lo_hi"``
    string. k1 criteria pass when ``log(lo) <= stat <= log(hi)`` (ratio bounds; one number
    ``hi`` means ``lo = 1/hi``); k2 / k3 when ``stat <= hi``. ``"opsm"`` (DeepSeek-V3.2's
    off-policy sequence masking, TRL's ``off_policy_mask_threshold=delta``) keeps a token
    when its advantage is ``>= 0`` or the sequence mean of ``k1`` is ``<= delta``; it needs
    ``advantages`` (``[B]`` or ``[B, T]``). TRL measures that KL against the *current*
    log-probs: pass ``logp.detach()`` as ``old_logp`` when they differ (more than one
    update per batch). A NaN statistic fails its test. ``keep = valid & passed``; the
    weights are not zeroed by rejection (verl keeps the two apart: apply both).

    **Metrics** (0-dim fp32 tensors, no host sync; means over valid tokens weighted by
    ``m``, or over non-empty sequences; 0 when there is none; values at masked positions
    never reach them): ``k1`` ``mean(-lr)`` (KL(rollout || trainer), verl's ``kl``),
    ``k3`` ``mean(exp(lr) - lr - 1)`` (verl's ``k3_kl``), ``abs_diff_mean`` /
    ``abs_diff_max`` of ``|lr|`` (TRL's ``sampling_logp_difference``), ``chi2_token``
    ``mean(exp(2 lr_c)) - 1``, ``chi2_seq`` the sequence mean of
    ``exp(2 clamp(sum m lr, -C, C)) - 1``, ``log_ppl_diff`` the sequence mean of
    ``mean rollout_logp - mean old_logp``, ``weight_mean`` / ``weight_max`` /
    ``weight_min`` of ``weights``, ``ess`` ``mean(w)^2 / mean(w^2)`` (verl's effective sample
    size), ``frac_high`` / ``frac_low`` (``raw > hi`` / ``raw < lo``: truncated or masked),
    ``rejected_frac`` (valid tokens rejected) and ``rejected_seq_frac`` (non-empty sequences
    with a rejected token).

    Args:
        old_logp, rollout_logp: ``[B, T]`` float (bf16 / fp16 / fp32 / fp64).
        mask: ``[B, T]`` bool, integer or float.
        level: ``"token"``, ``"sequence"`` or ``"geometric"``.
        mode: ``"truncate"`` or ``"mask"``.
        threshold_high: ``> 0`` or None (no upper bound). threshold_low: ``>= 0`` or None.
            At least one of them; ``threshold_low <= threshold_high``.
        reject, reject_threshold: see above (None: no rejection).
        advantages: ``[B]`` or ``[B, T]``, only with ``"opsm"``.
        log_ratio_clamp: ``C > 0``.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"auto"`` or None.

    Returns:
        ``(weights, keep, metrics)``: ``weights [B, T]`` fp32 (fp64 when an input is fp64),
        ``keep [B, T]`` bool, ``metrics`` a dict of 0-dim fp32 tensors. No gradient: the
        inputs are detached.
    """
    o = _options(level, mode, threshold_high, threshold_low, reject, reject_threshold,
                 log_ratio_clamp)
    _check_inputs(old_logp, rollout_logp, mask, advantages, o)
    return _run(old_logp, rollout_logp, mask, advantages, o, backend)


def _apply(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor,
           is_weights: Optional[Tensor], options: Union[RolloutOptions, Mapping],
           advantages: Optional[Tensor] = None, backend: Optional[str] = None
           ) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """For the policy losses: ``(is_weights', mask', metrics)`` with ``is_weights' = w``
    (times the given ``is_weights``) and ``mask' = mask`` where kept, 0 where rejected (the
    mask's dtype; a float mask keeps its values). ``options``: a :class:`RolloutOptions`
    or the keyword options of :func:`rollout_correction` as a dict. ``advantages`` is
    passed only when the options ask for ``"opsm"``."""
    o = options if isinstance(options, RolloutOptions) else _options(**dict(options))
    adv = advantages if o.needs_advantages else None
    _check_inputs(old_logp, rollout_logp, mask, adv, o)
    weights, keep, metrics = _run(old_logp, rollout_logp, mask, adv, o, backend)
    if is_weights is not None:
        weights = weights * is_weights
    if o.reject:
        mask = mask & keep if mask.dtype == torch.bool else mask * keep.to(mask.dtype)
    return weights, mask, metrics
