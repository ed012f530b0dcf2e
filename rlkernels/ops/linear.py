"""Fused lm_head ops: log-probs and the GRPO loss straight from hidden states, without ever
materializing the ``[N, V]`` logits."""

from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple, Union

import torch

from .. import _checks, backends
from .. import distributed as _dist
from .._fused import fused_forward
from .._policy_options import PolicyOptions
from ._common import call, check_tokens_for, out_dtype
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
                              with_entropy: bool, backend: str,
                              head_precision: Optional[str] = None, path: str = "auto"
                              ) -> Tuple[Tensor, Tensor, Tensor]:
    return call(backend, _FAMILY, "linear_token_logprobs_forward", hidden, weight, bias,
                tokens, temperature, ignore_index, with_entropy, head_precision, path)


@_linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, tokens, temperature, ignore_index, with_entropy, backend,
      head_precision=None, path="auto"):
    dt = out_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n, 3, dtype=dt))


@torch.library.custom_op("rlkernels::linear_token_logprobs_backward", mutates_args=())
def _linear_token_logprobs_backward_op(grad_logp: Optional[Tensor],
                                       grad_entropy: Optional[Tensor], hidden: Tensor,
                                       weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                                       stats: Tensor, temperature: float, ignore_index: int,
                                       backend: str, head_precision: Optional[str] = None,
                                       path: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    grads = call(backend, _FAMILY, "linear_token_logprobs_backward", grad_logp, grad_entropy,
                 hidden, weight, bias, tokens, stats, temperature, ignore_index, head_precision,
                 path)
    return _grads_or_empty(grads, hidden, weight, bias)


@_linear_token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, tokens, stats, temperature,
      ignore_index, backend, head_precision=None, path="auto"):
    return _fake_grads(hidden, weight, bias)


def _linear_token_logprobs_setup(ctx, inputs, output):
    (hidden, weight, bias, tokens, temperature, ignore_index, with_entropy, backend,
     head_precision, path) = inputs
    ctx.save_for_backward(hidden, weight, bias, tokens, output[2])
    ctx.args = (temperature, ignore_index, backend, head_precision, path)
    ctx.with_entropy = with_entropy
    ctx.mark_non_differentiable(output[2])


def _linear_token_logprobs_grad(ctx, grad_logp, grad_entropy, _grad_lse):
    if not any(ctx.needs_input_grad[:3]):
        return (None,) * 10
    hidden, weight, bias, tokens, stats = ctx.saved_tensors
    grads = _linear_token_logprobs_backward_op(
        grad_logp, grad_entropy if ctx.with_entropy else None, hidden, weight, bias, tokens,
        stats, *ctx.args)
    return _input_grads(ctx, grads, 2, 10)


_linear_token_logprobs_op.register_autograd(_linear_token_logprobs_grad,
                                            setup_context=_linear_token_logprobs_setup)


# vocabulary parallelism (SPEC 3.5): weight / bias are this rank's vocabulary shard and hidden
# is replicated. Forward: per-shard statistics combined by collectives
# (rlkernels.distributed). Backward: the plain backward kernels with the shard-local tokens
# and the global statistics give this rank's d weight / d bias shards and its part of d
# hidden; the one collective of backward sums d hidden over the ranks (see
# linear_token_logprobs).

@torch.library.custom_op("rlkernels::linear_token_logprobs_vp", mutates_args=())
def _linear_token_logprobs_vp_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                 tokens: Tensor, temperature: float, ignore_index: int,
                                 with_entropy: bool, group: int, backend: str,
                                 head_precision: Optional[str] = None
                                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _dist.linear_token_logprobs_forward(
        _with_precision(backend, "linear_token_logprobs_forward", head_precision), hidden,
        weight, bias, tokens, temperature, ignore_index, with_entropy, _dist.group_of(group))


def _with_precision(backend: str, fn: str, head_precision: Optional[str]):
    """The backend's kernel ``fn`` with ``head_precision`` bound (for the collective
    helpers of :mod:`rlkernels.distributed`, which call it with the plain arguments)."""
    kernel = backends.kernel(backend, _FAMILY, fn)
    if head_precision is None:
        return kernel
    return functools.partial(kernel, head_precision=head_precision)


@_linear_token_logprobs_vp_op.register_fake
def _(hidden, weight, bias, tokens, temperature, ignore_index, with_entropy, group, backend,
      head_precision=None):
    dt = out_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n, 3, dtype=dt), hidden.new_empty(n, dtype=torch.int64))


@torch.library.custom_op("rlkernels::linear_token_logprobs_vp_backward", mutates_args=())
def _linear_token_logprobs_vp_backward_op(
        grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], hidden: Tensor,
        weight: Tensor, bias: Optional[Tensor], local_tokens: Tensor, stats: Tensor,
        temperature: float, ignore_index: int, group: int, reduce_hidden: bool, backend: str,
        head_precision: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    grads = call(backend, _FAMILY, "linear_token_logprobs_backward", grad_logp, grad_entropy,
                 hidden, weight, bias, local_tokens, stats, temperature, ignore_index,
                 head_precision)
    return _reduce_hidden_grad(grads, hidden, weight, bias, group, reduce_hidden)


@_linear_token_logprobs_vp_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, *args):
    return _fake_grads(hidden, weight, bias)


def _reduce_hidden_grad(grads, hidden, weight, bias, group: int, reduce_hidden: bool):
    """This rank's ``d hidden`` is the sum over its vocabulary columns only: the all-shard
    ``d hidden`` is its sum over the ranks (skipped when ``hidden`` needs no gradient)."""
    g_h, g_w, g_b = _grads_or_empty(grads, hidden, weight, bias)
    if reduce_hidden:
        g_h = _dist.all_reduce_sum(g_h.contiguous(), _dist.group_of(group))
    return g_h, g_w, g_b


def _linear_token_logprobs_vp_setup(ctx, inputs, output):
    (hidden, weight, bias, tokens, temperature, ignore_index, with_entropy, group, backend,
     head_precision) = inputs
    ctx.save_for_backward(hidden, weight, bias, output[3], output[2])
    ctx.args = (temperature, ignore_index, group)
    ctx.backend = backend
    ctx.head_precision = head_precision
    ctx.with_entropy = with_entropy
    ctx.mark_non_differentiable(output[2], output[3])


def _linear_token_logprobs_vp_grad(ctx, grad_logp, grad_entropy, _grad_stats, _grad_tokens):
    if not any(ctx.needs_input_grad[:3]):
        return (None,) * 10
    hidden, weight, bias, local_tokens, stats = ctx.saved_tensors
    grads = _linear_token_logprobs_vp_backward_op(
        grad_logp, grad_entropy if ctx.with_entropy else None, hidden, weight, bias,
        local_tokens, stats, *ctx.args, ctx.needs_input_grad[0], ctx.backend,
        ctx.head_precision)
    return _input_grads(ctx, grads, 2, 10)


_linear_token_logprobs_vp_op.register_autograd(_linear_token_logprobs_vp_grad,
                                               setup_context=_linear_token_logprobs_vp_setup)


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


HEAD_PRECISIONS = ("bf16", "tf32", "fp32")
_PATHS = ("auto", "triton", "cublas")


def _check_head_options(head_precision, path: str) -> None:
    if head_precision is not None and head_precision not in HEAD_PRECISIONS:
        raise ValueError(f"head_precision: expected None or one of "
                         f"{', '.join(map(repr, HEAD_PRECISIONS))}, got {head_precision!r}")
    if path not in _PATHS:
        raise ValueError(f"path: expected one of {', '.join(map(repr, _PATHS))}, got "
                         f"{path!r}")


def _check_group_tokens(process_group, tokens: Tensor, weight: Tensor,
                        ignore_index: int) -> Optional[int]:
    """The group's handle (None without a group), and the token-range check: against the
    global vocabulary under a group (debug mode only: it needs a collective and a host
    sync), else against ``weight``."""
    if process_group is None:
        _checks.token_range("tokens", tokens, weight.shape[0], ignore_index)
        return None
    handle = _dist.register_group(process_group)
    if _checks.debug_enabled():
        _dist.check_global_tokens("tokens", tokens, weight.shape[0], ignore_index,
                                  process_group)
    return handle


def linear_token_logprobs(hidden: Tensor, weight: Tensor, tokens: Tensor, *,
                          bias: Optional[Tensor] = None, temperature: float = 1.0,
                          ignore_index: int = -100, return_entropy: bool = False,
                          head_precision: Optional[str] = None,
                          backend: Optional[str] = None, process_group=None
                          ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``token_logprobs(hidden @ weight^T + bias, tokens)`` without materializing the logits.

    ``hidden [..., H]``, ``weight [V, H]`` (the lm_head), ``bias [V]`` or ``None``, all of one
    float dtype; ``tokens [...]`` ids in ``[0, V)`` or ``ignore_index``. Same semantics,
    outputs and options as :func:`token_logprobs` (temperature, padding, entropy on request).
    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` (gradients in their dtype,
    accumulated in fp32).

    ``head_precision`` (SPEC 6): the precision of the GEMMs' operands (``hidden``,
    ``weight``, and in backward ``d logits``); accumulation is fp32 always (fp64 for fp64
    inputs). ``None`` (default): the inputs as they are (bf16 inputs: bf16 GEMMs, ``d
    logits`` rounded to bf16 for the backward GEMMs on GPUs; fp32 inputs: full fp32).
    ``"bf16"``: every operand rounded to bf16 first. ``"tf32"``: fp32 operands on TF32
    tensor cores on a GPU (10-bit mantissa); on CPU, and in the ``torch`` reference, it is
    computed as ``"fp32"``. ``"fp32"``: fp32 operands (exact for bf16 / fp16 inputs) and ``d
    logits`` kept in fp32 (the fp32 lm_head of ScaleRL / TRL #4303). Padding rows
    (``ignore_index``) cost no GEMM work in the triton kernels' all-padding row blocks.

    ``process_group``: vocabulary (tensor) parallelism (SPEC 3.5). ``weight [V_local, H]``
    and ``bias [V_local]`` are this rank's contiguous shard of the lm_head rows (ranks in
    group order, sizes may differ), ``hidden`` is the same on every rank and ``tokens`` are
    global ids. Every rank gets the outputs of the unsharded op (forward: three collectives,
    see :mod:`rlkernels.distributed`). Backward: with ``d z`` the gradient w.r.t. this
    shard's logits (computed locally from the saved global statistics), ``d weight = d z^T
    hidden`` and ``d bias = sum_rows d z`` are this rank's shards, computed without
    communication; ``d hidden = sum_ranks d z_r W_r`` spans every shard, so backward runs
    ONE ``all_reduce`` (sum) of ``d hidden`` on the group, and every rank receives the
    unsharded ``d hidden`` (the only communication in backward; none when ``hidden`` needs
    no gradient). This is the gradient of the unsharded op: do not also sum it over the
    group yourself (e.g. by feeding ``hidden`` through Megatron's
    ``copy_to_tensor_model_parallel_region``, whose backward is that same all-reduce).
    Every rank must call the op with the same rows, tokens and arguments.
    """
    _check_linear(hidden, weight, bias)
    check_tokens_for("tokens", tokens, "hidden", hidden)
    t = _checks.positive("temperature", temperature)
    _checks.integer("ignore_index", ignore_index)
    _checks.flag("return_entropy", return_entropy)
    return _linear_token_logprobs(hidden, weight, tokens, bias, t, ignore_index,
                                  return_entropy, head_precision, backend, process_group,
                                  "auto")


def _linear_token_logprobs(hidden, weight, tokens, bias, t, ignore_index, return_entropy,
                           head_precision, backend, process_group, path):
    """:func:`linear_token_logprobs` after its own checks, with the fused backends' ``path``
    (``"auto"``, ``"triton"`` or ``"cublas"``; the benchmarks compare them)."""
    _check_head_options(head_precision, path)
    handle = _check_group_tokens(process_group, tokens, weight, ignore_index)
    name = backends.resolve(backend, _FAMILY, "linear_token_logprobs", hidden.device)
    if handle is not None:
        logp, ent, _, _ = _linear_token_logprobs_vp_op(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens.reshape(-1), t,
            ignore_index, return_entropy, handle, name, head_precision)
        shape = tokens.shape
        return (logp.view(shape), ent.view(shape)) if return_entropy else logp.view(shape)
    logp, ent, _ = _linear_token_logprobs_op(hidden.reshape(-1, hidden.shape[-1]), weight,
                                             bias, tokens.reshape(-1), t, ignore_index,
                                             return_entropy, name, head_precision, path)
    shape = tokens.shape
    return (logp.view(shape), ent.view(shape)) if return_entropy else logp.view(shape)


# ==================================================== _linear_token_stats (private: the TRL head)

@torch.library.custom_op("rlkernels::linear_token_stats", mutates_args=())
def _linear_token_stats_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                           tokens: Tensor, temperature: float, ignore_index: int,
                           with_entropy: bool, logit_scale: float, softcap: Optional[float],
                           extras: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return call(backend, _FAMILY, "linear_token_stats_forward", hidden, weight, bias, tokens,
                temperature, ignore_index, with_entropy, logit_scale, softcap, extras)


@_linear_token_stats_op.register_fake
def _(hidden, weight, bias, tokens, temperature, ignore_index, with_entropy, logit_scale,
      softcap, extras, backend):
    dt = out_dtype(hidden.dtype)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=dt), hidden.new_empty(n, dtype=dt),
            hidden.new_empty(n, 3, dtype=dt), hidden.new_empty(n, 3, dtype=dt))


@torch.library.custom_op("rlkernels::linear_token_stats_backward", mutates_args=())
def _linear_token_stats_backward_op(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                                    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    tokens: Tensor, stats: Tensor, temperature: float,
                                    ignore_index: int, logit_scale: float,
                                    softcap: Optional[float], backend: str
                                    ) -> Tuple[Tensor, Tensor, Tensor]:
    grads = call(backend, _FAMILY, "linear_token_stats_backward", grad_logp, grad_entropy,
                 hidden, weight, bias, tokens, stats, temperature, ignore_index, logit_scale,
                 softcap)
    return _grads_or_empty(grads, hidden, weight, bias)


@_linear_token_stats_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, *args):
    return _fake_grads(hidden, weight, bias)


def _linear_token_stats_setup(ctx, inputs, output):
    (hidden, weight, bias, tokens, temperature, ignore_index, with_entropy, logit_scale,
     softcap, _extras, backend) = inputs
    ctx.save_for_backward(hidden, weight, bias, tokens, output[2])
    ctx.args = (temperature, ignore_index, logit_scale, softcap, backend)
    ctx.with_entropy = with_entropy
    ctx.mark_non_differentiable(output[2], output[3])


def _linear_token_stats_grad(ctx, grad_logp, grad_entropy, _grad_stats, _grad_extra):
    if not any(ctx.needs_input_grad[:3]):
        return (None,) * 11
    hidden, weight, bias, tokens, stats = ctx.saved_tensors
    grads = _linear_token_stats_backward_op(
        grad_logp, grad_entropy if ctx.with_entropy else None, hidden, weight, bias, tokens,
        stats, *ctx.args)
    return _input_grads(ctx, grads, 2, 11)


_linear_token_stats_op.register_autograd(_linear_token_stats_grad,
                                         setup_context=_linear_token_stats_setup)


def _linear_token_stats(hidden: Tensor, weight: Tensor, tokens: Tensor, *,
                        bias: Optional[Tensor] = None, temperature: float = 1.0,
                        ignore_index: int = -100, return_entropy: bool = False,
                        logit_scale: float = 1.0, softcap: Optional[float] = None,
                        extras: bool = False, backend: Optional[str] = None
                        ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                   Optional[Tensor]]:
    """:func:`linear_token_logprobs` for lm_heads with a pre-softmax map, plus the per-row
    statistics TRL's fused lm_head reports (``trl.kernels.ChunkedLogProbFunction``).

    Logits: ``y = hidden @ weight^T + bias``, ``u = logit_scale * y``, ``z = c tanh(u / c)``
    with a soft cap ``c = softcap`` (``z = u`` without), then ``z / T`` (TRL's order: scale,
    cap, temperature). Returns ``(logp, entropy, log_sum_sq_probs, mean_logits, is_top1)``,
    each ``[...]`` (fp32; fp64 for fp64 inputs; ``is_top1`` bool), ``None`` where not asked
    for (``entropy`` without ``return_entropy``, the last three without ``extras``), with
    ``p = softmax(z / T)``:

    * ``log_sum_sq_probs = log sum_j p_j^2``;
    * ``mean_logits = (1/V) sum_j z_j / T`` (over all ``V`` columns; ``-inf`` with a ``-inf``
      column);
    * ``is_top1``: the token is the arg-max of ``z``, ties going to the FIRST maximal column
      (``torch.argmax``), so a tie with an earlier column is not a top-1 hit.

    Padding rows (``tokens == ignore_index``) give 0 / False everywhere. ``logp`` and
    ``entropy`` are differentiable w.r.t. ``hidden``, ``weight``, ``bias`` (the chain rule
    through the map: ``dz/dy = logit_scale (1 - tanh(u / c)^2)``); the three extra statistics
    are not (TRL does not differentiate them either)."""
    _check_linear(hidden, weight, bias)
    check_tokens_for("tokens", tokens, "hidden", hidden)
    t = _checks.positive("temperature", temperature)
    _checks.integer("ignore_index", ignore_index)
    _checks.flag("return_entropy", return_entropy)
    _checks.flag("extras", extras)
    scale = _checks.number("logit_scale", logit_scale)
    if softcap is not None:
        softcap = _checks.number("softcap", softcap)
        if softcap == 0.0:
            raise ValueError("softcap: expected None or a nonzero float (the cap c of "
                             "c * tanh(u / c)), got 0.0")
    _checks.token_range("tokens", tokens, weight.shape[0], ignore_index)
    name = backends.resolve(backend, _FAMILY, "linear_token_stats", hidden.device)
    logp, ent, _, extra = _linear_token_stats_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens.reshape(-1), t,
        ignore_index, return_entropy, scale, softcap, extras, name)
    shape = tokens.shape
    if not extras:
        return logp.view(shape), ent.view(shape) if return_entropy else None, None, None, None
    return (logp.view(shape), ent.view(shape) if return_entropy else None,
            extra[:, 0].view(shape), extra[:, 1].view(shape), (extra[:, 2] != 0).view(shape))


# ========================================================================= linear_grpo_loss

@torch.library.custom_op("rlkernels::linear_grpo_loss", mutates_args=())
def _linear_grpo_loss_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                         tokens: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                         normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                         is_weights: Optional[Tensor], temperature: float, modes: str,
                         nums: List[float], backend: str, head_precision: Optional[str] = None,
                         path: str = "auto"
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return call(backend, _FAMILY, "linear_grpo_loss_forward", hidden, weight, bias, tokens,
                old_logp, advantages, mask, normalizer, ref_logp, is_weights, temperature,
                PolicyOptions.decode(modes, nums), head_precision, path)


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
                                  nums: List[float], backend: str,
                                  head_precision: Optional[str] = None, path: str = "auto"
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    grads = call(backend, _FAMILY, "linear_grpo_loss_backward", grad_loss, hidden, weight,
                 bias, tokens, old_logp, advantages, mask, normalizer, ref_logp, is_weights,
                 logp, ent, stats, temperature, PolicyOptions.decode(modes, nums),
                 head_precision, path)
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
        return (None,) * 16
    grads = _linear_grpo_loss_backward_op(grad_loss, *ctx.saved_tensors, *ctx.args)
    return _input_grads(ctx, grads, 2, 16)


_linear_grpo_loss_op.register_autograd(_linear_grpo_loss_grad,
                                       setup_context=_linear_grpo_loss_setup)


# vocabulary parallelism: the same composition with the log-probs of
# _linear_token_logprobs_vp_op's forward; backward as the unsharded op's, then the sum of
# d hidden over the group (as in linear_token_logprobs).

@torch.library.custom_op("rlkernels::linear_grpo_loss_vp", mutates_args=())
def _linear_grpo_loss_vp_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                            tokens: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                            normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                            is_weights: Optional[Tensor], temperature: float, modes: str,
                            nums: List[float], group: int, backend: str,
                            head_precision: Optional[str] = None
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    linear_forward = _with_precision(backend, "linear_token_logprobs_forward", head_precision)
    local = {}

    def logprobs(flat_tokens):
        logp, ent, stats, local["tokens"] = _dist.linear_token_logprobs_forward(
            linear_forward, hidden, weight, bias, flat_tokens, temperature, -100, True,
            _dist.group_of(group))
        return logp, ent, stats

    out = fused_forward(logprobs, backends.kernel(backend, "policy", "policy_loss_forward"),
                        tokens, old_logp, advantages, mask, normalizer, ref_logp, is_weights,
                        PolicyOptions.decode(modes, nums))
    return (*out, local["tokens"].view(tokens.shape))


@_linear_grpo_loss_vp_op.register_fake
def _(hidden, weight, bias, tokens, *args):
    dt = out_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=dt), hidden.new_empty(len(METRICS), dtype=torch.float32),
            hidden.new_empty(tokens.shape, dtype=dt), hidden.new_empty(tokens.shape, dtype=dt),
            hidden.new_empty(hidden.shape[0], 3, dtype=dt),
            hidden.new_empty(tokens.shape, dtype=torch.int64))


@torch.library.custom_op("rlkernels::linear_grpo_loss_vp_backward", mutates_args=())
def _linear_grpo_loss_vp_backward_op(grad_loss: Tensor, hidden: Tensor, weight: Tensor,
                                     bias: Optional[Tensor], local_tokens: Tensor,
                                     old_logp: Tensor, advantages: Tensor, mask: Tensor,
                                     normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                                     is_weights: Optional[Tensor], logp: Tensor, ent: Tensor,
                                     stats: Tensor, temperature: float, modes: str,
                                     nums: List[float], group: int, reduce_hidden: bool,
                                     backend: str, head_precision: Optional[str] = None
                                     ) -> Tuple[Tensor, Tensor, Tensor]:
    grads = call(backend, _FAMILY, "linear_grpo_loss_backward", grad_loss, hidden, weight,
                 bias, local_tokens, old_logp, advantages, mask, normalizer, ref_logp,
                 is_weights, logp, ent, stats, temperature, PolicyOptions.decode(modes, nums),
                 head_precision)
    return _reduce_hidden_grad(grads, hidden, weight, bias, group, reduce_hidden)


@_linear_grpo_loss_vp_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, *args):
    return _fake_grads(hidden, weight, bias)


def _linear_grpo_loss_vp_setup(ctx, inputs, output):
    # the shard-local tokens (output 5) replace the global ones (input 3) for backward
    ctx.save_for_backward(*inputs[:3], output[5], *inputs[4:10], *output[2:5])
    temperature, modes, nums, group, backend, head_precision = inputs[10:]
    ctx.args = (temperature, modes, nums, group)
    ctx.backend = backend
    ctx.head_precision = head_precision
    ctx.mark_non_differentiable(*output[1:])


def _linear_grpo_loss_vp_grad(ctx, grad_loss, *_unused):
    if not any(ctx.needs_input_grad[:3]):
        return (None,) * 16
    grads = _linear_grpo_loss_vp_backward_op(grad_loss, *ctx.saved_tensors, *ctx.args,
                                             ctx.needs_input_grad[0], ctx.backend,
                                             ctx.head_precision)
    return _input_grads(ctx, grads, 2, 16)


_linear_grpo_loss_vp_op.register_autograd(_linear_grpo_loss_vp_grad,
                                          setup_context=_linear_grpo_loss_vp_setup)


def linear_grpo_loss(hidden: Tensor, weight: Tensor, tokens: Tensor, old_logp: Tensor,
                     advantages: Tensor, mask: Tensor, *, bias: Optional[Tensor] = None,
                     temperature: float = 1.0, ref_logp: Optional[Tensor] = None,
                     entropy_coef: float = 0.0, head_precision: Optional[str] = None,
                     backend: Optional[str] = None, process_group=None,
                     **policy_loss_options) -> Tuple[Tensor, Dict[str, Tensor]]:
    """:func:`grpo_loss` from hidden states and the lm_head, never materializing the logits.

    ``hidden [B, T, H]``, ``weight [V, H]``, ``bias [V]`` or ``None``, ``tokens [B, T]``
    (``-100`` marks padding), the other inputs and ``policy_loss_options`` as in
    :func:`policy_loss`. The entropy is always computed (``metrics["entropy"]``) and enters
    the loss as ``- entropy_coef * H``. Returns ``(loss, metrics)``; differentiable w.r.t.
    ``hidden``, ``weight`` and ``bias``. ``head_precision``: the GEMMs' operand precision,
    as in :func:`linear_token_logprobs`.

    ``process_group``: vocabulary (tensor) parallelism, as in :func:`linear_token_logprobs`
    (``weight`` / ``bias`` are this rank's shard, every other input is the same on every
    rank): the loss and metrics are the unsharded ones on every rank; ``d weight`` and ``d
    bias`` are this rank's shards, computed locally; ``d hidden`` is the unsharded gradient
    on every rank, summed over the group by the one all-reduce of backward.
    """
    _check_linear(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected a 3-d tensor [B, T, H], got shape "
                         f"{tuple(hidden.shape)}")
    check_tokens_for("tokens", tokens, "hidden", hidden)
    t = _checks.positive("temperature", temperature)
    path = policy_loss_options.pop("_path", "auto")  # private: the benchmarks' path choice
    _check_head_options(head_precision, path)
    handle = _check_group_tokens(process_group, tokens, weight, -100)
    opts, norm, is_weights = _fused_policy_inputs("linear_grpo_loss", policy_loss_options,
                                                  tokens, old_logp, advantages, mask,
                                                  ref_logp, entropy_coef)
    name = backends.resolve(backend, _FAMILY, "linear_grpo_loss", hidden.device)
    modes, nums = opts.encode()
    if handle is not None:
        value, metrics, _, _, _, _ = _linear_grpo_loss_vp_op(
            hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens, old_logp.detach(),
            advantages.detach(), mask.detach(), norm,
            None if ref_logp is None else ref_logp.detach(),
            None if is_weights is None else is_weights.detach(), t, modes, nums, handle, name,
            head_precision)
        return value, _metrics_dict(metrics, ref_logp is not None, True)
    value, metrics, _, _, _ = _linear_grpo_loss_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens, old_logp.detach(),
        advantages.detach(), mask.detach(), norm,
        None if ref_logp is None else ref_logp.detach(),
        None if is_weights is None else is_weights.detach(), t, modes, nums, name,
        head_precision, path)
    return value, _metrics_dict(metrics, ref_logp is not None, True)
