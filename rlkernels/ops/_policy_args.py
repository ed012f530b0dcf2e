"""Validation shared by the policy-loss ops (``policy_loss``, ``grpo_loss``,
``linear_grpo_loss``): the ``[B, T]`` inputs, the options, the normalizer, and the metrics
dict built from the kernels' metric vector."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from .. import _checks
from .._policy_options import LOSS_OPTIONS, METRICS, _remember, encoded_options

Tensor = torch.Tensor

POLICY_ARGS = ("loss", "clip_low", "clip_high", "dual_clip", "delta", "ratio_level", "agg",
                "normalizer", "kl_coef", "kl_estimator", "is_weights", "log_ratio_clamp",
                "cispo_clip_low", "rollout_logp", "rollout_options") + tuple(
                    name for name, _, _ in LOSS_OPTIONS)

_POLICY_ARG_SET = frozenset(POLICY_ARGS)

# the keyword options of rollout_correction that rollout_options= may hold
ROLLOUT_OPTIONS = ("level", "mode", "threshold_high", "threshold_low", "reject",
                   "reject_threshold", "log_ratio_clamp")


_FLOATS = frozenset(_checks.FLOAT_DTYPES)


def _valid(logp: Tensor, old_logp, advantages, mask, ref_logp, entropy, is_weights) -> bool:
    """The common case of :func:`check_policy_inputs` in one pass (plain tensors of the
    right dtypes, shapes and device). False sends the call through the checks one by one,
    which raise the error of the first bad argument (and accept tensor subclasses)."""
    return _valid_at(logp.shape, logp.device, old_logp, advantages, mask, ref_logp, entropy,
                     is_weights)


def _valid_at(shape, dev, old_logp, advantages, mask, ref_logp, entropy, is_weights) -> bool:
    """:func:`_valid` for ``logp`` of ``shape`` on ``dev`` (``None`` inputs are absent)."""
    for x in (old_logp, ref_logp, entropy, is_weights):
        if x is not None and (type(x) is not Tensor or x.dtype not in _FLOATS
                              or x.shape != shape or x.device != dev):
            return False
    if (type(advantages) is not Tensor or advantages.dtype not in _FLOATS
            or advantages.device != dev):
        return False
    a = advantages.shape
    if a != shape and (len(a) != 1 or a[0] != shape[0]):
        return False
    return (type(mask) is Tensor and mask.shape == shape and mask.device == dev
            and not mask.dtype.is_complex)


def check_policy_inputs(logp: Tensor, old_logp, advantages, mask, ref_logp, entropy,
                         is_weights, normalizer) -> Optional[Tensor]:
    """Shapes, dtypes and devices of the ``[B, T]`` inputs; returns ``normalizer`` as a 0-dim
    tensor (or ``None``)."""
    if not _valid(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights):
        _check_tensors(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights)
    if normalizer is None:
        return None
    return _normalizer(logp, normalizer)


def _check_tensors(logp: Tensor, old_logp, advantages, mask, ref_logp, entropy,
                   is_weights) -> None:
    b_t = tuple(logp.shape)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy),
                    ("is_weights", is_weights)):
        if x is not None:
            _checks.tensor(name, x, dtypes=_checks.FLOAT_DTYPES)
            _checks.shape(name, x, b_t, "the shape of logp, [B, T]")
    _checks.tensor("advantages", advantages, dtypes=_checks.FLOAT_DTYPES)
    if tuple(advantages.shape) not in (b_t, b_t[:1]):
        raise ValueError(f"advantages: expected shape {b_t[:1]} or {b_t} ([B] or [B, T] "
                         f"for logp of shape {b_t}), got {tuple(advantages.shape)}")
    _checks.tensor("mask", mask)
    if mask.dtype.is_complex:
        raise TypeError(f"mask: expected a bool, integer or float tensor, got {mask.dtype}")
    _checks.shape("mask", mask, b_t, "the shape of logp, [B, T]")
    _checks.same_device("logp", logp, old_logp=old_logp, advantages=advantages, mask=mask,
                        ref_logp=ref_logp, entropy=entropy, is_weights=is_weights)


def _normalizer(logp: Tensor, normalizer) -> Tensor:
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0 or not normalizer.is_floating_point() and \
                normalizer.dtype not in _checks.INDEX_DTYPES:
            raise ValueError(f"normalizer: expected a number or a 0-dim tensor, got a tensor "
                             f"of shape {tuple(normalizer.shape)} and dtype {normalizer.dtype}")
        _checks.same_device("logp", logp, normalizer=normalizer)
        return normalizer.detach()
    value = _checks.positive("normalizer", normalizer)
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    if torch.compiler.is_compiling():  # a graph constant; no global state in a trace
        return torch.tensor(value, dtype=dtype, device=logp.device)
    key = (value, dtype, logp.device)
    norm = _NORMALIZERS.get(key)
    if norm is None:
        if len(_NORMALIZERS) >= 256:
            _NORMALIZERS.clear()
        norm = _NORMALIZERS[key] = torch.tensor(value, dtype=dtype, device=logp.device)
    return norm


# 0-dim tensors of the number normalizers seen, by (value, dtype, device): the kernels only
# read them, and a repeated value then costs no host-to-device copy (and a CUDA graph that
# captured the call keeps reading the same tensor)
_NORMALIZERS: Dict[tuple, Tensor] = {}


# the positional form of the policy options (:func:`policy_options`): these names in order
POLICY_OPTION_NAMES = ("loss", "clip_low", "clip_high", "dual_clip", "delta", "ratio_level",
                       "agg", "kl_coef", "kl_estimator", "log_ratio_clamp", "cispo_clip_low",
                       "entropy_coef") + tuple(name for name, _, _ in LOSS_OPTIONS)
_LOSS_OPTION_NAMES = frozenset(name for name, _, _ in LOSS_OPTIONS)
# (values, their types) -> (options, modes, nums); see _policy_options._ENCODED
_POSITIONAL: Dict[tuple, tuple] = {}


def policy_options(values: tuple, ref_logp, has_entropy: bool):
    """:func:`options` from the values of :data:`POLICY_OPTION_NAMES` in order (a loss
    option that is None is not given): one tuple as the memo key, no keyword dict per
    call. Keyed on the type and value of each (so ``True`` and ``1`` stay apart)."""
    try:
        key = values + tuple(map(type, values))
        hit = _POSITIONAL.get(key)
    except TypeError:  # an unhashable value: validated afresh (and rejected there)
        key = hit = None
    if hit is None:
        kwargs = {n: v for n, v in zip(POLICY_OPTION_NAMES, values)
                  if v is not None or n not in _LOSS_OPTION_NAMES}
        hit = encoded_options(**kwargs)
        if key is not None:
            _remember(_POSITIONAL, key, hit)
    opts = hit[0]
    if opts.kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp: expected a [B, T] tensor because kl_coef = "
                         f"{opts.kl_coef} != 0, got None")
    if opts.entropy_coef != 0.0 and not has_entropy:
        raise ValueError(f"entropy: expected a [B, T] tensor because entropy_coef = "
                         f"{opts.entropy_coef} != 0, got None")
    return hit


# the policy_loss options that are not PolicyOptions fields (tensors, the rollout correction)
_TENSOR_ARGS = frozenset(("is_weights", "normalizer", "rollout_logp", "rollout_options"))


def fused_policy_inputs(op: str, policy_loss_options: dict, tokens: Tensor, old_logp,
                         advantages, mask, ref_logp, entropy_coef, backend=None):
    """Validate the policy part of ``grpo_loss`` / ``linear_grpo_loss``; returns
    ``(options, modes, nums, normalizer tensor or None, is_weights, mask, rollout metrics or
    None)`` with the rollout correction applied (:func:`rollout_inputs`)."""
    kwargs = policy_loss_options
    is_weights = normalizer = rollout_logp = rollout_options = None
    if kwargs:
        if not _POLICY_ARG_SET.issuperset(kwargs):
            unknown = sorted(set(kwargs) - _POLICY_ARG_SET)
            raise TypeError(f"{op}: unexpected keyword argument(s) {', '.join(unknown)}; "
                            f"expected policy_loss options among {', '.join(POLICY_ARGS)}")
        if not _TENSOR_ARGS.isdisjoint(kwargs):
            kwargs = dict(kwargs)
            is_weights = kwargs.pop("is_weights", None)
            normalizer = kwargs.pop("normalizer", None)
            rollout_logp = kwargs.pop("rollout_logp", None)
            rollout_options = kwargs.pop("rollout_options", None)
    if not (type(old_logp) is Tensor and old_logp.dtype in _FLOATS
            and old_logp.shape == tokens.shape
            and _valid_at(tokens.shape, old_logp.device, None, advantages, mask, ref_logp,
                          None, is_weights)):
        # one check at a time: the error names the first bad argument
        _checks.tensor("old_logp", old_logp, dtypes=_checks.FLOAT_DTYPES)
        _checks.shape("old_logp", old_logp, tokens.shape, "the shape of tokens, [B, T]")
        _check_tensors(old_logp, old_logp, advantages, mask, ref_logp, None, is_weights)
    norm = None if normalizer is None else _normalizer(old_logp, normalizer)
    opts, modes, nums = encoded_options(entropy_coef=entropy_coef, **kwargs)
    if opts.kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp: expected a [B, T] tensor because kl_coef = "
                         f"{opts.kl_coef} != 0, got None")
    if rollout_logp is None and rollout_options is None:
        return opts, modes, nums, norm, is_weights, mask, None
    mask, is_weights, metrics = rollout_inputs(rollout_logp, rollout_options, old_logp, mask,
                                               advantages, is_weights, backend)
    return opts, modes, nums, norm, is_weights, mask, metrics


def rollout_inputs(rollout_logp: Optional[Tensor], rollout_options, old_logp: Tensor,
                   mask: Tensor, advantages: Tensor, is_weights: Optional[Tensor],
                   backend: Optional[str]):
    """The rollout correction of the policy losses (SPEC 6): ``(mask, is_weights,
    metrics)``, unchanged (and no metrics) without ``rollout_logp``; else the weights of
    :func:`rlkernels.rollout_correction` (``rollout_options``: its keyword options, its
    defaults when ``None``) between ``old_logp`` (the trainer's log-probs at rollout time)
    and ``rollout_logp`` times ``is_weights``, the mask with rejected tokens removed, and its
    metrics under ``"rollout/<name>"``."""
    if rollout_logp is None:
        if rollout_options is not None:
            raise ValueError(f"rollout_options: expected None without rollout_logp (they are "
                             f"the options of the correction rollout_logp enables), got "
                             f"{rollout_options!r}")
        return mask, is_weights, {}
    options = {} if rollout_options is None else rollout_options
    if not isinstance(options, Mapping):
        raise TypeError(f"rollout_options: expected None or a dict of rollout_correction's "
                        f"keyword options, got {type(options).__name__}")
    unknown = sorted(set(options) - set(ROLLOUT_OPTIONS))
    if unknown:
        raise TypeError(f"rollout_options: unexpected key(s) {', '.join(map(repr, unknown))}; "
                        f"expected among {', '.join(ROLLOUT_OPTIONS)}")
    from . import rollout as _rollout  # (a sibling op module; imported when first used)
    weights, mask, metrics = _rollout._apply(old_logp, rollout_logp, mask, is_weights,
                                             options, advantages, backend)
    return mask, weights, {f"rollout/{k}": v for k, v in metrics.items()}


def metrics_dict(vector: Tensor, with_kl: bool, with_entropy: bool) -> Dict[str, Tensor]:
    """The metrics dict of the kernels' metric vector (:data:`METRICS` order), "kl" and
    "entropy" only when present: 0-d views of the vector, made with one ``unbind``. In plain
    eager mode the views are made below autograd's view tracking (~0.5 us each less): the
    vector is not differentiable, not saved for backward and not returned, so the metrics
    are tensors of their own (each its own version counter), which lets a user change one in
    place as before; traced or transformed calls unbind plainly."""
    if type(vector) is Tensor and not (_is_compiling() or _transforms_active()):
        with _BelowViews():
            (clipfrac, high, low, dual, approx_kl, ratio_mean, ratio_max, kl,
             entropy) = vector.unbind(0)
    else:
        (clipfrac, high, low, dual, approx_kl, ratio_mean, ratio_max, kl,
         entropy) = vector.unbind(0)
    # a dict display, not dict(zip(...)): ~4 k instructions less per call
    out = {"clipfrac": clipfrac, "clipfrac_high": high, "clipfrac_low": low,
           "dual_clipfrac": dual, "approx_kl": approx_kl, "ratio_mean": ratio_mean,
           "ratio_max": ratio_max}
    if with_kl:
        out["kl"] = kl
    if with_entropy:
        out["entropy"] = entropy
    return out


# the literal keys of metrics_dict, in the kernels' order
assert METRICS == ("clipfrac", "clipfrac_high", "clipfrac_low", "dual_clipfrac", "approx_kl",
                   "ratio_mean", "ratio_max", "kl", "entropy")
_BelowViews = torch._C._AutoDispatchBelowADInplaceOrView
_is_compiling = torch.compiler.is_compiling
_transforms_active = torch._C._are_functorch_transforms_active
