"""Policy-loss ops: ``kl_penalty``, ``policy_loss`` (log-probs in) and ``grpo_loss`` (the same
fused with the log-prob computation from logits)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from .. import _checks, backends
from .. import distributed as _dist
from .._fused import fused_forward
from .._policy_options import KL_ESTIMATORS, PolicyOptions, encoded_options
from ..reference import policy as _ref
from ._common import call, check_tokens_for, out_dtype, rows
from ._eager import eager

Tensor = torch.Tensor
_FAMILY = "policy"


# ================================================================================ kl_penalty

@torch.library.custom_op("rlkernels::kl_penalty", mutates_args=())
def _kl_penalty_op(logp: Tensor, ref_logp: Tensor, estimator: str, clamp_lo: Optional[float],
                   clamp_hi: Optional[float]) -> Tensor:
    return _kl_penalty_impl(logp, ref_logp, estimator, clamp_lo, clamp_hi)


def _kl_penalty_impl(logp, ref_logp, estimator, clamp_lo, clamp_hi) -> Tensor:
    value = _ref.kl_penalty_forward(logp.to(_kl_dtype(logp, ref_logp)), ref_logp, estimator)
    if clamp_lo is not None:
        value = torch.clamp(value, clamp_lo, clamp_hi)
    return value


def _kl_dtype(logp: Tensor, ref_logp: Tensor) -> torch.dtype:
    return out_dtype(torch.promote_types(logp.dtype, ref_logp.dtype))


@_kl_penalty_op.register_fake
def _(logp, ref_logp, estimator, clamp_lo, clamp_hi):
    return logp.new_empty(logp.shape, dtype=_kl_dtype(logp, ref_logp))


def _kl_penalty_setup(ctx, inputs, output):
    logp, ref_logp, estimator, clamp_lo, clamp_hi = inputs
    ctx.save_for_backward(logp, ref_logp, output)
    ctx.args = (estimator, clamp_lo, clamp_hi)


def _kl_penalty_grad(ctx, grad):
    logp, ref_logp, value = ctx.saved_tensors
    estimator, lo, hi = ctx.args
    g = grad * _ref.kl_penalty_grad(logp.to(value.dtype), ref_logp.to(value.dtype), estimator)
    if lo is not None:  # like torch.clamp: no gradient where the clamp is active
        unclamped = _ref.kl_penalty_forward(logp.to(value.dtype), ref_logp, estimator)
        g = torch.where((unclamped >= lo) & (unclamped <= hi), g, torch.zeros_like(g))
    g_lp = g.to(logp.dtype) if ctx.needs_input_grad[0] else None
    g_ref = (-g).to(ref_logp.dtype) if ctx.needs_input_grad[1] else None
    return g_lp, g_ref, None, None, None


_kl_penalty_op.register_autograd(_kl_penalty_grad, setup_context=_kl_penalty_setup)


class _KLPenaltyFn(torch.autograd.Function):
    """The eager fast path (see ``ops/_eager.py``): the custom op's body, setup and backward."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _kl_penalty_impl(*inputs)
        _kl_penalty_setup(ctx, inputs, output)
        return output

    backward = staticmethod(_kl_penalty_grad)


def kl_penalty(logp: Tensor, ref_logp: Tensor, *, estimator: str = "k3",
               clamp: Optional[Tuple[float, float]] = None) -> Tensor:
    """Elementwise KL penalty estimators on the log-probs of sampled tokens.

    With ``d = logp - ref_logp``: ``"k1"`` ``d``; ``"abs"`` ``|d|``; ``"k2"`` ``d^2 / 2``;
    ``"k3"`` (alias ``"low_var_kl"``) ``exp(-d) + d - 1``; ``"k3+"`` the value of k3 with the
    gradient of k2 (straight-through, an unbiased gradient of the KL). ``clamp=(lo, hi)``
    clamps the result (verl uses ``(-10, 10)`` for k3); like ``torch.clamp``, clamped
    elements get no gradient.

    Shapes: two float tensors of the same shape -> the same shape, fp32 (fp64 for fp64).
    Differentiable w.r.t. both inputs.
    """
    _checks.tensor("logp", logp, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("ref_logp", ref_logp, dtypes=_checks.FLOAT_DTYPES)
    _checks.shape("ref_logp", ref_logp, logp.shape, "the shape of logp")
    _checks.same_device("logp", logp, ref_logp=ref_logp)
    _checks.choice("estimator", estimator, KL_ESTIMATORS)
    lo = hi = None
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise ValueError(f"clamp: expected None or a pair (lo, hi), got {clamp!r}")
        lo = _checks.number("clamp[0]", clamp[0])
        hi = _checks.number("clamp[1]", clamp[1])
        if lo > hi:
            raise ValueError(f"clamp: expected lo <= hi, got ({lo}, {hi})")
    if eager(logp, ref_logp):
        return _KLPenaltyFn.apply(logp, ref_logp, estimator, lo, hi)
    return _kl_penalty_op(logp, ref_logp, estimator, lo, hi)


# =============================================================================== policy_loss

@torch.library.custom_op("rlkernels::policy_loss", mutates_args=())
def _policy_loss_op(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                    normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                    entropy: Optional[Tensor], is_weights: Optional[Tensor], modes: str,
                    nums: List[float], backend: str) -> Tuple[Tensor, Tensor]:
    return call(backend, _FAMILY, "policy_loss_forward", logp, old_logp, advantages, mask,
                normalizer, ref_logp, entropy, is_weights, PolicyOptions.decode(modes, nums))


@_policy_loss_op.register_fake
def _(logp, old_logp, advantages, mask, normalizer, ref_logp, entropy, is_weights, modes,
      nums, backend):
    return (logp.new_empty((), dtype=out_dtype(logp.dtype)),
            logp.new_empty(len(_ref.METRICS), dtype=torch.float32))


@torch.library.custom_op("rlkernels::policy_loss_backward", mutates_args=())
def _policy_loss_backward_op(grad_loss: Tensor, logp: Tensor, old_logp: Tensor,
                             advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                             ref_logp: Optional[Tensor], entropy: Optional[Tensor],
                             is_weights: Optional[Tensor], modes: str, nums: List[float],
                             backend: str) -> Tuple[Tensor, Tensor]:
    g_lp, g_ent = call(backend, _FAMILY, "policy_loss_backward", grad_loss, logp, old_logp,
                       advantages, mask, normalizer, ref_logp, entropy, is_weights,
                       PolicyOptions.decode(modes, nums))
    return g_lp, g_ent if g_ent is not None else logp.new_empty(0)


@_policy_loss_backward_op.register_fake
def _(grad_loss, logp, old_logp, advantages, mask, normalizer, ref_logp, entropy, is_weights,
      modes, nums, backend):
    return (torch.empty_like(logp),
            torch.empty_like(entropy) if entropy is not None else logp.new_empty(0))


def _policy_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.args = inputs[8:]
    ctx.mark_non_differentiable(output[1])


def _policy_loss_grad(ctx, grad_loss, _grad_metrics):
    tensors = ctx.saved_tensors
    need_lp, need_ent = ctx.needs_input_grad[0], ctx.needs_input_grad[6]
    if not (need_lp or need_ent):
        return (None,) * 11
    if eager(grad_loss, *tensors):  # e.g. not under compiled autograd
        modes, nums, backend = ctx.args
        g_lp, g_ent = call(backend, _FAMILY, "policy_loss_backward", grad_loss, *tensors,
                           PolicyOptions.decode(modes, nums))
    else:
        g_lp, g_ent = _policy_loss_backward_op(grad_loss, *tensors, *ctx.args)
    return ((g_lp if need_lp else None,) + (None,) * 5
            + (g_ent if need_ent else None,) + (None,) * 4)


_policy_loss_op.register_autograd(_policy_loss_grad, setup_context=_policy_loss_setup)


class _PolicyLossFn(torch.autograd.Function):
    """The eager fast path (see ``ops/_eager.py``): the custom op's body, setup and backward."""

    @staticmethod
    def forward(ctx, *inputs):
        *tensors, modes, nums, backend = inputs
        output = call(backend, _FAMILY, "policy_loss_forward", *tensors,
                      PolicyOptions.decode(modes, nums))
        _policy_loss_setup(ctx, inputs, output)
        return output

    backward = staticmethod(_policy_loss_grad)


_POLICY_ARGS = ("loss", "clip_low", "clip_high", "dual_clip", "delta", "ratio_level", "agg",
                "normalizer", "kl_coef", "kl_estimator", "is_weights", "log_ratio_clamp",
                "cispo_clip_low")


def _check_policy_inputs(logp: Tensor, old_logp, advantages, mask, ref_logp, entropy,
                         is_weights, normalizer) -> Optional[Tensor]:
    """Shapes, dtypes and devices of the ``[B, T]`` inputs; returns ``normalizer`` as a 0-dim
    tensor (or ``None``)."""
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
    if normalizer is None:
        return None
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


def _options(kwargs: dict, entropy_coef: float, ref_logp, has_entropy: bool):
    """``(options, modes, nums)`` (validated once per distinct setting, then memoized)."""
    opts, modes, nums = encoded_options(entropy_coef=entropy_coef, **kwargs)
    if opts.kl_coef != 0.0 and ref_logp is None:
        raise ValueError(f"ref_logp: expected a [B, T] tensor because kl_coef = "
                         f"{opts.kl_coef} != 0, got None")
    if opts.entropy_coef != 0.0 and not has_entropy:
        raise ValueError(f"entropy: expected a [B, T] tensor because entropy_coef = "
                         f"{opts.entropy_coef} != 0, got None")
    return opts, modes, nums


def _fused_policy_inputs(op: str, policy_loss_options: dict, tokens: Tensor, old_logp,
                         advantages, mask, ref_logp, entropy_coef):
    """Validate the policy part of ``grpo_loss`` / ``linear_grpo_loss``; returns
    ``(options, normalizer tensor or None, is_weights)``."""
    unknown = sorted(set(policy_loss_options) - set(_POLICY_ARGS))
    if unknown:
        raise TypeError(f"{op}: unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"expected policy_loss options among {', '.join(_POLICY_ARGS)}")
    kwargs = dict(policy_loss_options)
    is_weights = kwargs.pop("is_weights", None)
    normalizer = kwargs.pop("normalizer", None)
    _checks.tensor("old_logp", old_logp, dtypes=_checks.FLOAT_DTYPES)
    _checks.shape("old_logp", old_logp, tokens.shape, "the shape of tokens, [B, T]")
    norm = _check_policy_inputs(old_logp, old_logp, advantages, mask, ref_logp, None,
                                is_weights, normalizer)
    return _options(kwargs, entropy_coef, ref_logp, True)[0], norm, is_weights


def _metrics_dict(vector: Tensor, with_kl: bool, with_entropy: bool) -> Dict[str, Tensor]:
    # one unbind (nine views in one call) instead of nine indexing ops
    out = dict(zip(_ref.METRICS, vector.unbind(0)))
    if not with_kl:
        del out["kl"]
    if not with_entropy:
        del out["entropy"]
    return out


def _const(x: Optional[Tensor]) -> Optional[Tensor]:
    """``x`` detached (an input that gets no gradient), without a new tensor when it needs
    none."""
    return x if x is None or not x.requires_grad else x.detach()


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                loss: str = "ppo", clip_low: float = 0.2, clip_high: Optional[float] = None,
                dual_clip: Optional[float] = None, delta: Optional[float] = None,
                ratio_level: str = "token", agg: str = "token-mean", normalizer=None,
                ref_logp: Optional[Tensor] = None, kl_coef: float = 0.0,
                kl_estimator: str = "k3", entropy: Optional[Tensor] = None,
                entropy_coef: float = 0.0, is_weights: Optional[Tensor] = None,
                log_ratio_clamp: float = 20.0, cispo_clip_low: bool = False,
                backend: Optional[str] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped policy-gradient loss (PPO / GSPO / CISPO / REINFORCE) with KL and entropy terms.

    ``log r = clamp(logp - old_logp, -log_ratio_clamp, log_ratio_clamp)``;
    ``ratio_level="sequence"`` (GSPO) uses ``sg(s) + logp - sg(logp)`` per token, ``s`` the
    masked mean of ``log r`` over the sequence. Per-token policy term (``A`` = advantages,
    broadcast over T when ``[B]``):

    * ``"ppo"``: ``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)``; ``clip_high=None``
      means ``clip_low``; ``delta`` caps the unclipped ``r`` from above (two-sided clip,
      ``delta > 1 + clip_high``); ``dual_clip=c > 1`` bounds the loss by ``-c A`` where
      ``A < 0``.
    * ``"cispo"``: ``-sg(clip(r, 0, 1 + clip_high)) A logp`` (MiniMax-M1 / TRL: no lower
      bound, ``clip_low`` unused); with ``cispo_clip_low=True``
      ``-sg(clip(r, 1 - clip_low, 1 + clip_high)) A logp`` (verl's ``cispo``).
    * ``"reinforce"``: ``-A logp`` (ratios only through ``is_weights``).

    times ``is_weights`` (constant rollout-correction weights), ``+ kl_coef *
    kl_penalty(logp, ref_logp, estimator=kl_estimator)``, ``- entropy_coef * entropy``.

    ``agg`` (``m`` = mask, ``L`` = per-token loss):
    ``"token-mean"`` ``sum(m L) / (normalizer or sum m)``; ``"seq-mean-token-mean"`` the
    sum over non-empty sequences of their token means ``/ (normalizer or their number)``;
    ``"seq-mean-token-sum"`` ``sum(m L) / (normalizer or number of non-empty sequences)``;
    ``"seq-mean-token-sum-norm"`` (Dr. GRPO) ``sum(m L) / (normalizer or T)``. Pass a global
    token or sequence count as ``normalizer`` (number or 0-dim tensor) to make the loss
    invariant to micro-batching and data parallelism. An empty denominator gives 0. TRL's
    and Liger's ``"grpo"`` loss divide the token means by ``B``, empty sequences included:
    ``agg="seq-mean-token-mean", normalizer=B`` reproduces it.

    Returns ``(loss, metrics)``: a 0-dim fp32 loss (fp64 for fp64 ``logp``) and a dict of
    0-dim fp32 tensors (no host sync), token-masked means: ``clipfrac`` (the clipped term is
    active: ``A > 0 and r > 1 + clip_high`` or ``A < 0 and r < 1 - clip_low``;
    for cispo: ``r > 1 + clip_high`` or, with ``cispo_clip_low``, ``r < 1 - clip_low``,
    whatever the sign of ``A``; 0 for reinforce), ``clipfrac_high``, ``clipfrac_low``,
    ``dual_clipfrac``, ``approx_kl`` (mean of ``-log r``), ``ratio_mean``, ``ratio_max`` (a
    masked max), and ``kl`` (mean penalty, with ``ref_logp``) and ``entropy`` (with
    ``entropy``). Every metric is a masked statistic: values at masked positions (NaN, inf)
    are selected away and never reach a metric, the loss or a gradient. Gradient flows to
    ``logp`` and ``entropy``; every other input is a constant.

    The entropy term is aggregated with ``agg`` like the rest of the loss (verl's actor does
    the same); TRL adds its bonus as a plain token mean whatever the loss type. The two agree
    for ``agg="token-mean"``; see docs/math.md for TRL's and Liger's forms.

    Shapes: ``logp, old_logp, mask, ref_logp, entropy, is_weights`` ``[B, T]``;
    ``advantages`` ``[B]`` or ``[B, T]``; ``mask`` bool or float (weights).
    """
    _checks.tensor("logp", logp, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    norm = _check_policy_inputs(logp, old_logp, advantages, mask, ref_logp, entropy,
                                is_weights, normalizer)
    _, modes, nums = _options(dict(loss=loss, clip_low=clip_low, clip_high=clip_high,
                                   dual_clip=dual_clip, delta=delta, ratio_level=ratio_level,
                                   agg=agg, kl_coef=kl_coef, kl_estimator=kl_estimator,
                                   log_ratio_clamp=log_ratio_clamp,
                                   cispo_clip_low=cispo_clip_low),
                              entropy_coef, ref_logp, entropy is not None)
    name = backends.resolve(backend, _FAMILY, "policy_loss", logp.device)
    args = (logp, _const(old_logp), _const(advantages), _const(mask), norm, _const(ref_logp),
            entropy, _const(is_weights), modes, nums, name)
    if eager(*args[:8]):
        value, metrics = _PolicyLossFn.apply(*args)
    else:
        value, metrics = _policy_loss_op(*args)
    return value, _metrics_dict(metrics, ref_logp is not None, entropy is not None)


# ================================================================================= grpo_loss

@torch.library.custom_op("rlkernels::grpo_loss", mutates_args=())
def _grpo_loss_op(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                  mask: Tensor, normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                  is_weights: Optional[Tensor], temperature: float, modes: str,
                  nums: List[float], backend: str, inplace_backward: bool
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # inplace_backward only matters to backward: it is an argument so that it reaches
    # setup_context while the forward stays a pure function
    return call(backend, _FAMILY, "grpo_loss_forward", logits, tokens, old_logp, advantages,
                mask, normalizer, ref_logp, is_weights, temperature,
                PolicyOptions.decode(modes, nums))


@_grpo_loss_op.register_fake
def _(logits, tokens, old_logp, advantages, mask, normalizer, ref_logp, is_weights,
      temperature, modes, nums, backend, inplace_backward):
    dt = out_dtype(logits.dtype)
    return (logits.new_empty((), dtype=dt),
            logits.new_empty(len(_ref.METRICS), dtype=torch.float32),
            logits.new_empty(tokens.shape, dtype=dt), logits.new_empty(tokens.shape, dtype=dt),
            logits.new_empty(logits.shape[0], 3, dtype=dt))


@torch.library.custom_op("rlkernels::grpo_loss_backward", mutates_args=())
def _grpo_loss_backward_op(grad_loss: Tensor, logits: Tensor, tokens: Tensor,
                           old_logp: Tensor, advantages: Tensor, mask: Tensor,
                           normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                           is_weights: Optional[Tensor], logp: Tensor, ent: Tensor,
                           stats: Tensor, temperature: float, modes: str, nums: List[float],
                           backend: str) -> Tensor:
    return call(backend, _FAMILY, "grpo_loss_backward", grad_loss, logits, tokens, old_logp,
                advantages, mask, normalizer, ref_logp, is_weights, logp, ent, stats,
                temperature, PolicyOptions.decode(modes, nums), False)


@_grpo_loss_backward_op.register_fake
def _(grad_loss, logits, *args):
    return torch.empty_like(logits)


@torch.library.custom_op("rlkernels::grpo_loss_backward_", mutates_args=("logits",))
def _grpo_loss_backward_inplace_op(grad_loss: Tensor, logits: Tensor, tokens: Tensor,
                                   old_logp: Tensor, advantages: Tensor, mask: Tensor,
                                   normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                                   is_weights: Optional[Tensor], logp: Tensor, ent: Tensor,
                                   stats: Tensor, temperature: float, modes: str,
                                   nums: List[float], backend: str) -> None:
    call(backend, _FAMILY, "grpo_loss_backward", grad_loss, logits, tokens, old_logp,
         advantages, mask, normalizer, ref_logp, is_weights, logp, ent, stats, temperature,
         PolicyOptions.decode(modes, nums), True)


@_grpo_loss_backward_inplace_op.register_fake
def _(*args):
    return None


def _grpo_loss_setup(ctx, inputs, output):
    (logits, tokens, old_logp, advantages, mask, normalizer, ref_logp, is_weights,
     temperature, modes, nums, backend, inplace_backward) = inputs
    _, _, logp, ent, stats = output
    ctx.save_for_backward(logits, tokens, old_logp, advantages, mask, normalizer, ref_logp,
                          is_weights, logp, ent, stats)
    ctx.args = (temperature, modes, nums, backend)
    ctx.inplace = inplace_backward
    ctx.mark_non_differentiable(*output[1:])


def _grpo_loss_grad(ctx, grad_loss, *_unused):
    if not ctx.needs_input_grad[0]:
        return (None,) * 13
    saved = ctx.saved_tensors
    if ctx.inplace:
        _grpo_loss_backward_inplace_op(grad_loss, *saved, *ctx.args)
        grad = saved[0]  # the logits' storage now holds their gradient
    else:
        grad = _grpo_loss_backward_op(grad_loss, *saved, *ctx.args)
    return (grad,) + (None,) * 12


_grpo_loss_op.register_autograd(_grpo_loss_grad, setup_context=_grpo_loss_setup)


# vocabulary parallelism (SPEC 3.5): the forward is the same composition with the log-probs
# and entropies of rlkernels.distributed (collectives on the group); backward is the plain
# backward op above with the shard-local tokens and the global statistics: no communication.

@torch.library.custom_op("rlkernels::grpo_loss_vp", mutates_args=())
def _grpo_loss_vp_op(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                     mask: Tensor, normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                     is_weights: Optional[Tensor], temperature: float, modes: str,
                     nums: List[float], group: int, backend: str, inplace_backward: bool
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    vocab_forward = backends.kernel(backend, "vocab", "token_logprobs_forward")
    local = {}

    def logprobs(flat_tokens):
        logp, ent, stats, local["tokens"] = _dist.token_logprobs_forward(
            vocab_forward, logits, flat_tokens, temperature, -100, True,
            _dist.group_of(group))
        return logp, ent, stats

    out = fused_forward(logprobs, backends.kernel(backend, _FAMILY, "policy_loss_forward"),
                        tokens, old_logp, advantages, mask, normalizer, ref_logp, is_weights,
                        PolicyOptions.decode(modes, nums))
    return (*out, local["tokens"].view(tokens.shape))


@_grpo_loss_vp_op.register_fake
def _(logits, tokens, old_logp, advantages, mask, normalizer, ref_logp, is_weights,
      temperature, modes, nums, group, backend, inplace_backward):
    dt = out_dtype(logits.dtype)
    return (logits.new_empty((), dtype=dt),
            logits.new_empty(len(_ref.METRICS), dtype=torch.float32),
            logits.new_empty(tokens.shape, dtype=dt), logits.new_empty(tokens.shape, dtype=dt),
            logits.new_empty(logits.shape[0], 3, dtype=dt),
            logits.new_empty(tokens.shape, dtype=torch.int64))


def _grpo_loss_vp_setup(ctx, inputs, output):
    (logits, tokens, old_logp, advantages, mask, normalizer, ref_logp, is_weights,
     temperature, modes, nums, group, backend, inplace_backward) = inputs
    _, _, logp, ent, stats, local_tokens = output
    # the backward of the unsharded op, with the tokens in this shard's ids
    ctx.save_for_backward(logits, local_tokens, old_logp, advantages, mask, normalizer,
                          ref_logp, is_weights, logp, ent, stats)
    ctx.args = (temperature, modes, nums, backend)
    ctx.inplace = inplace_backward
    ctx.mark_non_differentiable(*output[1:])


def _grpo_loss_vp_grad(ctx, grad_loss, *_unused):
    return _grpo_loss_grad(ctx, grad_loss) + (None,)


_grpo_loss_vp_op.register_autograd(_grpo_loss_vp_grad, setup_context=_grpo_loss_vp_setup)


def grpo_loss(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
              mask: Tensor, *, temperature: float = 1.0, ref_logp: Optional[Tensor] = None,
              entropy_coef: float = 0.0, inplace_backward: bool = False,
              backend: Optional[str] = None, process_group=None, **policy_loss_options
              ) -> Tuple[Tensor, Dict[str, Tensor]]:
    """``policy_loss(token_logprobs(logits, tokens, temperature=T), ...)`` fused: one pass over
    the logits forward, one backward pass that writes ``d logits`` directly.

    ``logits [B, T, V]``, ``tokens [B, T]`` (``-100`` marks padding: log-prob 0, zero
    gradient), ``old_logp``, ``mask``, ``ref_logp`` ``[B, T]``, ``advantages`` ``[B]`` or
    ``[B, T]``. The entropy of every position is computed in the same pass: it is reported
    as ``metrics["entropy"]`` and enters the loss as ``- entropy_coef * H``.
    ``policy_loss_options`` are the keyword options of :func:`policy_loss` (``loss``,
    ``clip_low``, ``clip_high``, ``dual_clip``, ``delta``, ``ratio_level``, ``agg``,
    ``normalizer``, ``kl_coef``, ``kl_estimator``, ``is_weights``, ``log_ratio_clamp``,
    ``cispo_clip_low``).

    ``inplace_backward=True`` writes the gradient into the storage of ``logits`` instead of
    allocating a new ``[B, T, V]`` tensor: the logits are destroyed by ``backward()``, so
    they must not be used afterwards (nor be a leaf whose ``.grad`` you keep).

    ``process_group``: vocabulary parallelism (SPEC 3.5), as in :func:`token_logprobs`:
    ``logits`` is this rank's vocabulary shard, ``tokens`` are global ids, every other input
    is the same on every rank. The per-token log-probs and entropies are the unsharded ones
    (collectives in forward), so the loss and metrics are those of the unsharded op on every
    rank; backward writes this rank's shard of ``d logits`` locally, ``d logits = (d loss /
    d logp) (onehot(y) - p) - (d loss / d H) p (z - sum p z)`` (over ``T``) with the global
    softmax statistics, with no communication.

    Returns ``(loss, metrics)`` as :func:`policy_loss`.
    """
    _checks.logits("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits: expected a 3-d tensor [B, T, V], got shape "
                         f"{tuple(logits.shape)}")
    check_tokens_for("tokens", tokens, "logits", logits)
    t = _checks.positive("temperature", temperature)
    _checks.flag("inplace_backward", inplace_backward)
    handle = None
    if process_group is not None:
        handle = _dist.register_group(process_group)
        if _checks.debug_enabled():
            _dist.check_global_tokens("tokens", tokens, logits.shape[-1], -100, process_group)
    else:
        _checks.token_range("tokens", tokens, logits.shape[-1], -100)
    opts, norm, is_weights = _fused_policy_inputs("grpo_loss", policy_loss_options, tokens,
                                                  old_logp, advantages, mask, ref_logp,
                                                  entropy_coef)
    name = backends.resolve(backend, _FAMILY, "grpo_loss", logits.device)
    modes, nums = opts.encode()
    if handle is not None:
        value, metrics, _, _, _, _ = _grpo_loss_vp_op(
            rows(logits), tokens, old_logp.detach(), advantages.detach(), mask.detach(), norm,
            None if ref_logp is None else ref_logp.detach(),
            None if is_weights is None else is_weights.detach(), t, modes, nums, handle, name,
            inplace_backward)
        return value, _metrics_dict(metrics, ref_logp is not None, True)
    value, metrics, _, _, _ = _grpo_loss_op(
        rows(logits), tokens, old_logp.detach(), advantages.detach(), mask.detach(), norm,
        None if ref_logp is None else ref_logp.detach(),
        None if is_weights is None else is_weights.detach(), t, modes, nums, name,
        inplace_backward)
    return value, _metrics_dict(metrics, ref_logp is not None, True)
