"""Fused lm_head ops: log-probs and the GRPO loss straight from hidden states, without ever
materializing the ``[N, V]`` logits."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch

from .. import _checks, backends
from .._policy_options import PolicyOptions
from ._common import call, check_tokens_for, no_process_group, out_dtype
from .policy import _fused_policy_inputs, _metrics_dict
from ..reference.policy import METRICS

Tensor = torch.Tensor
_FAMILY = "linear"


def _grads_or_empty(grads, hidden, weight, bias):
    """Custom ops cannot return ``None``: an empty tensor stands for "no bias"."""
    g_h, g_w, g_b = grads
    return g_h, g_w, g_b if g_b is not None else weight.new_empty(0)


def _fake_grads(hidden, weight, bias):
    return (torch.empty_like(hidden), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else weight.new_empty(0))


def _input_grads(ctx, grads, bias_index: int, n_inputs: int):
    """Map ``(d hidden, d weight, d bias)`` onto the op's inputs (hidden 0, weight 1)."""
    out = [None] * n_inputs
    need = ctx.needs_input_grad
    out[0] = grads[0] if need[0] else None
    out[1] = grads[1] if need[1] else None
    out[bias_index] = grads[2] if need[bias_index] else None
    return tuple(out)


# ==================================================================== linear_token_logprobs

@torch.library.custom_op("rlkernels::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                              tokens: Tensor, temperature: float, ignore_index: int,
                              with_entropy: bool, backend: str
                              ) -> Tuple[Tensor, Tensor, Tensor]:
    return call(backend, _FAMILY, "linear_token_logprobs_forward", hidden, weight, bias,
                tokens, temperature, ignore_index, with_entropy)


@_linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, tokens, temperature, ignore_index, with_entropy, backend):
    dt = out_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n, 3, dtype=dt))


@torch.library.custom_op("rlkernels::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_backward_op(grad_logp: Optional[Tensor],
                                       grad_entropy: Optional[Tensor], hidden: Tensor,
                                       weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                                       stats: Tensor, temperature: float, ignore_index: int,
                                       backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    grads = call(backend, _FAMILY, "linear_token_logprobs_backward", grad_logp, grad_entropy,
                 hidden, weight, bias, tokens, stats, temperature, ignore_index)
    return _grads_or_empty(grads, hidden, weight, bias)


@_linear_token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, tokens, stats, temperature,
      ignore_index, backend):
    return _fake_grads(hidden, weight, bias)


def _linear_token_logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, tokens, temperature, ignore_index, with_entropy, backend = inputs
    ctx.save_for_backward(hidden, weight, bias, tokens, output[2])
    ctx.args = (temperature, ignore_index, backend)
    ctx.with_entropy = with_entropy
    ctx.mark_non_differentiable(output[2])


def _linear_token_logprobs_grad(ctx, grad_logp, grad_entropy, _grad_lse):
    if not any(ctx.needs_input_grad[:3]):
        return (None,) * 8
    hidden, weight, bias, tokens, stats = ctx.saved_tensors
    grads = _linear_token_logprobs_backward_op(
        grad_logp, grad_entropy if ctx.with_entropy else None, hidden, weight, bias, tokens,
        stats, *ctx.args)
    return _input_grads(ctx, grads, 2, 8)


_linear_token_logprobs_op.register_autograd(_linear_token_logprobs_grad,
                                            setup_context=_linear_token_logprobs_setup)


def _check_linear(hidden, weight, bias) -> None:
    _checks.tensor("hidden", hidden, dtypes=_checks.FLOAT_DTYPES, min_ndim=1)
    _checks.tensor("weight", weight, dtypes=_checks.FLOAT_DTYPES, ndim=2)
    if weight.shape[0] == 0:
        raise ValueError(f"weight: expected a vocabulary size V >= 1 rows ([V, H]), got shape "
                         f"{tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden: expected a last dimension of {weight.shape[1]} (H of weight "
                         f"[V, H]), got shape {tuple(hidden.shape)}")
    _checks.same_dtype("hidden", hidden, weight=weight, bias=bias)
    _checks.same_device("hidden", hidden, weight=weight, bias=bias)
    if bias is not None:
        _checks.shape("bias", bias, (weight.shape[0],), "[V], one per row of weight")


def linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *,
                          bias: Optional[Tensor] = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False,
                          backend: Optional[str] = None, process_group=None
                          ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``token_logprobs(hidden @ weight^T + bias, tokens)`` without materializing the logits.

    ``hidden [..., H]``, ``weight [V, H]`` (the lm_head), ``bias [V]`` or ``None``, all of one
    float dtype; ``tokens [...]`` ids in ``[0, V)`` or ``ignore_index``. Same semantics,
    outputs and options as :func:`token_logprobs` (temperature, padding, entropy on request).
    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (gradients in their dtype,
    accumulated in fp32).
    """
    _check_linear(hidden, weight, bias)
    check_tokens_for("tokens", tokens, "hidden", hidden)
    t = _checks.positive("temperature", temperature)
    _checks.integer("ignore_index", ignore_index)
    _checks.flag("return_entropy", return_entropy)
    no_process_group(process_group)
    _checks.token_range("tokens", tokens, weight.shape[0], ignore_index)
    name = backends.resolve(backend, _FAMILY, "linear_token_logprobs", hidden.device)
    logp, ent, _ = _linear_token_logprobs_op(hidden.reshape(-1, hidden.shape[-1]), weight,
                                             bias, tokens.reshape(-1), t, ignore_index,
                                             return_entropy, name)
    shape = tokens.shape
    return (logp.view(shape), ent.view(shape)) if return_entropy else logp.view(shape)


# ========================================================================= linear_grpo_loss

@torch.library.custom_op("rlkernels::linear_grpo_loss", mutates_args=())
def _linear_grpo_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                         tokens: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                         normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                         is_weights: Optional[Tensor], temperature: float, modes: str,
                         nums: List[float], backend: str
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return call(backend, _FAMILY, "linear_grpo_loss_forward", hidden, weight, bias, tokens,
                old_logp, advantages, mask, normalizer, ref_logp, is_weights, temperature,
                PolicyOptions.decode(modes, nums))


@_linear_grpo_loss_op.register_fake
def _(hidden, weight, bias, tokens, *args):
    dt = out_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=dt), hidden.new_empty(len(METRICS), dtype=torch.float32),
            hidden.new_empty(tokens.shape, dtype=dt), hidden.new_empty(tokens.shape, dtype=dt),
            hidden.new_empty(hidden.shape[0], 3, dtype=dt))


@torch.library.custom_op("rlkernels::linear_grpo_loss_backward", mutates_args=())
def _linear_grpo_loss_backward_op(grad_loss: Tensor, hidden: Tensor, weight: Tensor,
                                  bias: Optional[Tensor], tokens: Tensor, old_logp: Tensor,
                                  advantages: Tensor, mask: Tensor,
                                  normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                                  is_weights: Optional[Tensor], logp: Tensor, ent: Tensor,
                                  stats: Tensor, temperature: float, modes: str,
                                  nums: List[float], backend: str
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    grads = call(backend, _FAMILY, "linear_grpo_loss_backward", grad_loss, hidden, weight,
                 bias, tokens, old_logp, advantages, mask, normalizer, ref_logp, is_weights,
                 logp, ent, stats, temperature, PolicyOptions.decode(modes, nums))
    return _grads_or_empty(grads, hidden, weight, bias)


@_linear_grpo_loss_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, *args):
    return _fake_grads(hidden, weight, bias)


def _linear_grpo_loss_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10], *output[2:])
    ctx.args = inputs[10:]
    ctx.mark_non_differentiable(*output[1:])


def _linear_grpo_loss_grad(ctx, grad_loss, *_unused):
    if not any(ctx.needs_input_grad[:3]):
        return (None,) * 14
    grads = _linear_grpo_loss_backward_op(grad_loss, *ctx.saved_tensors, *ctx.args)
    return _input_grads(ctx, grads, 2, 14)


_linear_grpo_loss_op.register_autograd(_linear_grpo_loss_grad,
                                       setup_context=_linear_grpo_loss_setup)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, tokens: Tensor, old_logp: Tensor,
                     advantages: Tensor, mask: Tensor, *, bias: Optional[Tensor] = None,
                     temperature: float = 1.0, ref_logp: Optional[Tensor] = None,
                     entropy_coef: float = 0.0, backend: Optional[str] = None,
                     **policy_loss_options) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`grpo_loss` from hidden states and the lm_head, never materializing the logits.

    ``hidden [B, T, H]``, ``weight [V, H]``, ``bias [V]`` or ``None``, ``tokens [B, T]``
    (``-100`` marks padding), the other inputs and ``policy_loss_options`` as in
    :func:`policy_loss`. The entropy is always computed (``metrics["entropy"]``) and enters
    the loss as ``- entropy_coef * H``. Returns ``(loss, metrics)``; differentiable w.r.t.
    ``hidden``, ``weight`` and ``bias``.
    """
    _check_linear(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected a 3-d tensor [B, T, H], got shape "
                         f"{tuple(hidden.shape)}")
    check_tokens_for("tokens", tokens, "hidden", hidden)
    t = _checks.positive("temperature", temperature)
    _checks.token_range("tokens", tokens, weight.shape[0], -100)
    opts, norm, is_weights = _fused_policy_inputs("linear_grpo_loss", policy_loss_options,
                                                  tokens, old_logp, advantages, mask,
                                                  ref_logp, entropy_coef)
    name = backends.resolve(backend, _FAMILY, "linear_grpo_loss", hidden.device)
    modes, nums = opts.encode()
    value, metrics, _, _, _ = _linear_grpo_loss_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens, old_logp.detach(),
        advantages.detach(), mask.detach(), norm,
        None if ref_logp is None else ref_logp.detach(),
        None if is_weights is None else is_weights.detach(), t, modes, nums, name)
    return value, _metrics_dict(metrics, ref_logp is not None, True)
