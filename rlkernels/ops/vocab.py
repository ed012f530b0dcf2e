"""Vocabulary ops: functions that read ``[..., V]`` logits.

Each differentiable op is a ``torch.library.custom_op`` in namespace ``rlkernels`` whose
forward returns its outputs plus what backward needs (the fp32 log-sum-exp of each row),
and whose backward is a second custom op that recomputes the softmax from the logits.
The concrete backend name travels as a string argument, so ``torch.compile`` sees a
constant and never breaks the graph.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _checks, backends
from .. import distributed as _dist
from ..reference import sparse as _ref_sparse
from ._common import call, check_tokens_for, out_dtype, rows

Tensor = torch.Tensor
_FAMILY = "vocab"
_SPARSE = "sparse"


def _n_rows(logits: Tensor) -> int:
    """Rows of the ``[N, V]`` or ``[A, B, V]`` logits a custom op receives (see ``rows``)."""
    n = 1
    for d in logits.shape[:-1]:
        n *= d
    return n


def _rows_for(logits: Tensor, backend: str) -> Tensor:
    """``rows(logits)``, as a two-stride ``[A, B, V]`` view instead of a copy when the
    backend's kernels read such rows (its module says ``STRIDED_ROWS = True``)."""
    return rows(logits, strided=_strided_rows(backend))


@torch.compiler.assume_constant_result
def _strided_rows(backend: str) -> bool:
    # a constant under torch.compile: Dynamo cannot trace the module import
    return bool(getattr(backends._module(backend, _FAMILY), "STRIDED_ROWS", False))


# =============================================================== token_logprobs / entropy

@torch.library.custom_op("rlkernels::token_logprobs", mutates_args=())
def _token_logprobs_op(logits: Tensor, tokens: Optional[Tensor], temperature: float,
                       ignore_index: int, with_entropy: bool, backend: str
                       ) -> Tuple[Tensor, Tensor, Tensor]:
    return call(backend, _FAMILY, "token_logprobs_forward", logits, tokens, temperature,
                ignore_index, with_entropy)


@_token_logprobs_op.register_fake
def _(logits, tokens, temperature, ignore_index, with_entropy, backend):
    n = _n_rows(logits)
    dt = out_dtype(logits.dtype)
    return (logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt),
            logits.new_empty(n, 3, dtype=dt))


@torch.library.custom_op("rlkernels::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                                logits: Tensor, tokens: Optional[Tensor], stats: Tensor,
                                temperature: float, ignore_index: int, backend: str) -> Tensor:
    return call(backend, _FAMILY, "token_logprobs_backward", grad_logp, grad_entropy, logits,
                tokens, stats, temperature, ignore_index)


@_token_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, logits, tokens, stats, temperature, ignore_index, backend):
    return torch.empty_like(logits)


def _token_logprobs_setup(ctx, inputs, output):
    logits, tokens, temperature, ignore_index, with_entropy, backend = inputs
    ctx.save_for_backward(logits, tokens, output[2])
    ctx.args = (temperature, ignore_index, with_entropy, backend)
    ctx.mark_non_differentiable(output[2])


def _token_logprobs_grad(ctx, grad_logp, grad_entropy, _grad_stats):
    logits, tokens, stats = ctx.saved_tensors
    temperature, ignore_index, with_entropy, backend = ctx.args
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    grad = _token_logprobs_backward_op(
        grad_logp if tokens is not None else None, grad_entropy if with_entropy else None,
        logits, tokens, stats, temperature, ignore_index, backend)
    return grad, None, None, None, None, None


_token_logprobs_op.register_autograd(_token_logprobs_grad, setup_context=_token_logprobs_setup)


# vocabulary parallelism (SPEC section 3.5): the forward combines the shards' row statistics
# with collectives (rlkernels.distributed); backward is the plain local backward op above, fed
# with the global statistics and the shard-local tokens: no communication.

@torch.library.custom_op("rlkernels::token_logprobs_vp", mutates_args=())
def _token_logprobs_vp_op(logits: Tensor, tokens: Optional[Tensor], temperature: float,
                          ignore_index: int, with_entropy: bool, group: int, backend: str
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    forward = backends.kernel(backend, _FAMILY, "token_logprobs_forward")
    return _dist.token_logprobs_forward(forward, logits, tokens, temperature, ignore_index,
                                        with_entropy, _dist.group_of(group))


@_token_logprobs_vp_op.register_fake
def _(logits, tokens, temperature, ignore_index, with_entropy, group, backend):
    n = _n_rows(logits)
    dt = out_dtype(logits.dtype)
    local_tokens = logits.new_empty(n if tokens is not None else 0, dtype=torch.int64)
    return (logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt),
            logits.new_empty(n, 3, dtype=dt), local_tokens)


def _token_logprobs_vp_setup(ctx, inputs, output):
    logits, tokens, temperature, ignore_index, with_entropy, group, backend = inputs
    ctx.save_for_backward(logits, output[3] if tokens is not None else None, output[2])
    ctx.args = (temperature, ignore_index, with_entropy, backend)
    ctx.mark_non_differentiable(output[2], output[3])


def _token_logprobs_vp_grad(ctx, grad_logp, grad_entropy, _grad_stats, _grad_tokens):
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    logits, local_tokens, stats = ctx.saved_tensors
    temperature, ignore_index, with_entropy, backend = ctx.args
    grad = _token_logprobs_backward_op(
        grad_logp if local_tokens is not None else None,
        grad_entropy if with_entropy else None,
        logits, local_tokens, stats, temperature, ignore_index, backend)
    return (grad,) + (None,) * 6


_token_logprobs_vp_op.register_autograd(_token_logprobs_vp_grad,
                                        setup_context=_token_logprobs_vp_setup)


def token_logprobs(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0,
                   ignore_index: int = -100, return_entropy: bool = False,
                   backend: Optional[str] = None, process_group=None
                   ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Log-probability of each token under ``softmax(logits / temperature)``.

    ``logp[i] = z[i, y_i] - logsumexp(z[i])`` with ``z = logits / temperature``, and with
    ``return_entropy=True`` also ``H[i] = logsumexp(z[i]) - sum_j softmax(z[i])_j z[i, j]``,
    from the same pass over the logits.

    Args:
        logits: ``[..., V]`` bf16/fp16/fp32/fp64.
        tokens: ``[...]`` int32/int64 ids in ``[0, V)``, or ``ignore_index`` for padding
            (those positions give 0 for every output and an exactly-zero gradient).
        temperature: ``> 0``; gradients include the ``1/temperature`` factor.
        return_entropy: also return the entropy of each row.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, ``"auto"`` or ``None`` (process default).
        process_group: a ``torch.distributed`` ``ProcessGroup`` for vocabulary (tensor)
            parallelism: ``logits`` is then this rank's contiguous vocabulary shard (ranks in
            group order; shard sizes may differ), ``tokens`` are global ids, and every rank
            gets the outputs of the unsharded op. The forward pass runs three collectives on
            the group (shard sizes, row maxima, one all-reduce of the row sums); backward
            computes this rank's gradient shard locally, with no communication. Every rank
            must call the op with the same rows, tokens and arguments.

    Returns:
        ``logp [...]`` fp32 (fp64 for fp64 logits), or ``(logp, entropy)``. A token whose logit
        is ``-inf`` has log-prob ``-inf``. Differentiable w.r.t. ``logits`` (gradient in the
        dtype of ``logits``); memory: no ``[N, V]`` temporary besides that gradient.
    """
    _checks.logits("logits", logits)
    check_tokens_for("tokens", tokens, "logits", logits)
    t = _checks.positive("temperature", temperature)
    _checks.integer("ignore_index", ignore_index)
    _checks.flag("return_entropy", return_entropy)
    if process_group is not None:
        handle = _dist.register_group(process_group)
        if _checks.debug_enabled():
            _dist.check_global_tokens("tokens", tokens, logits.shape[-1], ignore_index,
                                      process_group)
    else:
        _checks.token_range("tokens", tokens, logits.shape[-1], ignore_index)
    name = backends.resolve(backend, _FAMILY, "token_logprobs", logits.device)
    if process_group is not None:
        logp, ent, _, _ = _token_logprobs_vp_op(rows(logits), tokens.reshape(-1), t,
                                                ignore_index, return_entropy, handle, name)
    else:
        logp, ent, _ = _token_logprobs_op(_rows_for(logits, name), tokens.reshape(-1), t,
                                          ignore_index, return_entropy, name)
    shape = tokens.shape
    if return_entropy:
        return logp.view(shape), ent.view(shape)
    return logp.view(shape)


def entropy(logits: Tensor, *, temperature: float = 1.0, backend: Optional[str] = None,
            process_group=None) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` along the last dim.

    ``H = logsumexp(z) - sum_j softmax(z)_j z_j`` with ``z = logits / temperature``
    (``-inf`` columns contribute 0). Returns ``[...]`` fp32 (fp64 for fp64 logits),
    differentiable w.r.t. ``logits``: ``dH/dz = -p (z - sum(p z))``, times ``1/T``.
    ``process_group``: vocabulary parallelism, as in :func:`token_logprobs` (``logits`` is this
    rank's shard; every rank gets the entropy of the whole vocabulary).
    """
    _checks.logits("logits", logits)
    t = _checks.positive("temperature", temperature)
    handle = _dist.register_group(process_group) if process_group is not None else None
    name = backends.resolve(backend, _FAMILY, "token_logprobs", logits.device)
    if handle is not None:
        _, ent, _, _ = _token_logprobs_vp_op(rows(logits), None, t, -100, True, handle, name)
        return ent.view(logits.shape[:-1])
    _, ent, _ = _token_logprobs_op(_rows_for(logits, name), None, t, -100, True, name)
    return ent.view(logits.shape[:-1])


# ========================================================================== sparse_logprobs

_NORMALIZE = ("full", "support")


@torch.library.custom_op("rlkernels::sparse_logprobs", mutates_args=())
def _sparse_logprobs_op(logits: Tensor, indices: Tensor, temperature: float, normalize: str,
                        with_tail: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return call(backend, _SPARSE, "sparse_logprobs_forward", logits, indices, temperature,
                normalize, with_tail)


@_sparse_logprobs_op.register_fake
def _(logits, indices, temperature, normalize, with_tail, backend):
    dt = out_dtype(logits.dtype)
    n = _n_rows(logits)
    return (logits.new_empty(indices.shape, dtype=dt), logits.new_empty(n, dtype=dt),
            logits.new_empty(n, 3, dtype=dt))


@torch.library.custom_op("rlkernels::sparse_logprobs_backward", mutates_args=())
def _sparse_logprobs_backward_op(grad_logp: Tensor, grad_tail: Optional[Tensor],
                                 logits: Tensor, indices: Tensor, logp: Tensor, tail: Tensor,
                                 stats: Tensor, temperature: float, normalize: str,
                                 backend: str) -> Tensor:
    return call(backend, _SPARSE, "sparse_logprobs_backward", grad_logp, grad_tail, logits,
                indices, logp, tail, stats, temperature, normalize)


@_sparse_logprobs_backward_op.register_fake
def _(grad_logp, grad_tail, logits, indices, logp, tail, stats, temperature, normalize, backend):
    return torch.empty_like(logits)


def _sparse_logprobs_setup(ctx, inputs, output):
    logits, indices, temperature, normalize, with_tail, backend = inputs
    logp, tail, stats = output
    ctx.save_for_backward(logits, indices, logp, tail, stats)
    ctx.args = (temperature, normalize, with_tail, backend)
    ctx.mark_non_differentiable(stats)


def _sparse_logprobs_grad(ctx, grad_logp, grad_tail, _grad_stats):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    logits, indices, logp, tail, stats = ctx.saved_tensors
    temperature, normalize, with_tail, backend = ctx.args
    grad = _sparse_logprobs_backward_op(grad_logp, grad_tail if with_tail else None, logits,
                                        indices, logp, tail, stats, temperature, normalize,
                                        backend)
    return grad, None, None, None, None, None


_sparse_logprobs_op.register_autograd(_sparse_logprobs_grad, setup_context=_sparse_logprobs_setup)


def _check_indices(logits: Tensor, indices) -> Tensor:
    _checks.indices("indices", indices)
    if indices.dim() != logits.dim():
        raise ValueError(f"indices: expected shape (*{tuple(logits.shape[:-1])}, K) (the "
                         f"leading dims of logits plus K ids), got {tuple(indices.shape)}")
    _checks.shape("indices", indices, (*logits.shape[:-1], indices.shape[-1]),
                  "the leading dims of logits plus K ids")
    _checks.same_device("logits", logits, indices=indices)
    if indices.numel() and _checks.data_checks(indices):
        vocab = logits.shape[-1]
        bad = (indices < -1) | (indices >= vocab)
        if bool(bad.any()):
            raise ValueError(f"indices: expected ids in [0, {vocab}) or -1 for an unused slot, "
                             f"got {indices[bad].flatten()[0].item()}")
    return indices


def sparse_logprobs(logits: Tensor, indices: Tensor, *, temperature: float = 1.0,
                    normalize: str = "full", return_tail: bool = False,
                    backend: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Log-probabilities at ``K`` given vocabulary ids per row.

    With ``z = logits / temperature``:

    * ``normalize="full"``: ``log softmax(z)`` over all ``V`` columns, gathered at ``indices``.
    * ``normalize="support"``: ``z_k - logsumexp_k z_k`` over the row's valid ids only
      (the log-probs a top-k / top-p rollout engine reports; see :func:`sampling_support`).

    An index of ``-1`` marks an unused slot: its output is ``-inf`` and it takes no part in the
    support. Ids of a row should be distinct (a sampler's support always is); a repeated id is
    counted once per slot by ``"support"``.

    ``return_tail=True`` also returns ``log(1 - sum of the full-vocabulary probabilities of the
    row's distinct valid ids)``, computed directly from the columns outside the ids (no
    cancellation); it is ``-inf`` when the ids cover every column with non-zero probability.
    It does not depend on ``normalize``.

    Shapes: ``logits [..., V]``, ``indices [..., K]`` int32/int64 -> ``[..., K]`` (and
    ``[...]``), fp32 (fp64 for fp64 logits). Differentiable w.r.t. ``logits``.
    """
    _checks.logits("logits", logits)
    _check_indices(logits, indices)
    t = _checks.positive("temperature", temperature)
    _checks.choice("normalize", normalize, _NORMALIZE)
    _checks.flag("return_tail", return_tail)
    name = backends.resolve(backend, _SPARSE, "sparse_logprobs", logits.device)
    k = indices.shape[-1]
    logp, tail, _ = _sparse_logprobs_op(_rows_for(logits, name), indices.reshape(-1, k), t,
                                        normalize, return_tail, name)
    logp = logp.view(indices.shape)
    return (logp, tail.view(logits.shape[:-1])) if return_tail else logp


def sampling_support(logits: Tensor, *, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, temperature: float = 1.0) -> Tensor:
    """The vocabulary ids a top-k / top-p sampler could emit, per row.

    Follows the order of vLLM and Hugging Face samplers: temperature, then top-k, then top-p
    on the distribution renormalized over the top-k. Ids are sorted by decreasing probability
    (ties by increasing id); an id is in the top-p support iff the probability of the ids
    ranked above it is ``< top_p`` (so the most likely id always is); ``top_p=1.0`` keeps every
    id. Ids with probability 0 (``-inf`` logits) are never in the support.

    Returns ``[..., K]`` int64, padded with ``-1``, ready for
    ``sparse_logprobs(..., normalize="support")``. ``K = min(top_k, V)`` when ``top_k`` is
    given; with ``top_p`` alone ``K`` is the largest support in the batch, which needs one
    host synchronisation (pass ``top_k`` too to avoid it). Not differentiable.
    """
    _checks.logits("logits", logits)
    t = _checks.positive("temperature", temperature)
    if top_k is None and top_p is None:
        raise ValueError("top_k, top_p: expected at least one of them to be set, got neither "
                         "(the support of an unrestricted sampler is the whole vocabulary)")
    if top_k is not None:
        _checks.integer("top_k", top_k, lo=1)
    if top_p is not None:
        _checks.number("top_p", top_p, lo=0.0, lo_open=True, hi=1.0)
    ids = _ref_sparse.sampling_support(rows(logits), top_k, top_p, t)
    return ids.view(*logits.shape[:-1], ids.shape[-1])


# ================================================================================ sparse_kl

@torch.library.custom_op("rlkernels::sparse_kl", mutates_args=())
def _sparse_kl_op(logits: Tensor, indices: Tensor, target_logprobs: Tensor, temperature: float,
                  with_tail: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return call(backend, _SPARSE, "sparse_kl_forward", logits, indices, target_logprobs,
                temperature, with_tail)


@_sparse_kl_op.register_fake
def _(logits, indices, target_logprobs, temperature, with_tail, backend):
    dt = out_dtype(logits.dtype)
    n = _n_rows(logits)
    return (logits.new_empty(n, dtype=dt), logits.new_empty(n, dtype=dt),
            logits.new_empty(n, 3, dtype=dt))


@torch.library.custom_op("rlkernels::sparse_kl_backward", mutates_args=())
def _sparse_kl_backward_op(grad_kl: Tensor, logits: Tensor, indices: Tensor,
                           target_logprobs: Tensor, s_tail: Tensor, stats: Tensor,
                           temperature: float, with_tail: bool, backend: str) -> Tensor:
    return call(backend, _SPARSE, "sparse_kl_backward", grad_kl, logits, indices,
                target_logprobs, s_tail, stats, temperature, with_tail)


@_sparse_kl_backward_op.register_fake
def _(grad_kl, logits, indices, target_logprobs, s_tail, stats, temperature, with_tail, backend):
    return torch.empty_like(logits)


def _sparse_kl_setup(ctx, inputs, output):
    logits, indices, target_logprobs, temperature, with_tail, backend = inputs
    ctx.save_for_backward(logits, indices, target_logprobs, output[1], output[2])
    ctx.args = (temperature, with_tail, backend)
    ctx.mark_non_differentiable(output[1], output[2])


def _sparse_kl_grad(ctx, grad_kl, _g_tail, _g_stats):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    logits, indices, target_logprobs, s_tail, stats = ctx.saved_tensors
    temperature, with_tail, backend = ctx.args
    grad = _sparse_kl_backward_op(grad_kl, logits, indices, target_logprobs, s_tail, stats,
                                  temperature, with_tail, backend)
    return grad, None, None, None, None, None


_sparse_kl_op.register_autograd(_sparse_kl_grad, setup_context=_sparse_kl_setup)


def sparse_kl(logits: Tensor, indices: Tensor, target_logprobs: Tensor, *,
              temperature: float = 1.0, tail: bool = True,
              backend: Optional[str] = None) -> Tensor:
    """KL(teacher || student) over the teacher's top-K support, with an optional tail bucket.

    ``sum_k t_k (log t_k - log s_k) [+ t_tail (log t_tail - log s_tail)]`` where
    ``t_k = exp(target_logprobs_k)`` are the teacher's full-vocabulary probabilities at
    ``indices``, ``s = softmax(logits / temperature)`` is the student over all ``V`` columns,
    ``t_tail = max(1 - sum_k t_k, 0)`` and ``s_tail`` the student mass outside the ids.
    ``0 log 0 = 0``; slots with id ``-1`` are ignored (their target value is not read).
    When the ids cover every column there is no tail bucket: ``t_tail`` is taken as 0 (its
    value would only be the rounding of the targets, against a student tail of mass 0).
    Temperature applies to the student logits only.

    Shapes: ``logits [..., V]``, ``indices [..., K]``, ``target_logprobs [..., K]`` float ->
    ``[...]`` fp32 (fp64 for fp64 logits). Differentiable w.r.t. ``logits`` only (the teacher
    is a constant).
    """
    _checks.logits("logits", logits)
    _check_indices(logits, indices)
    _checks.tensor("target_logprobs", target_logprobs, dtypes=_checks.FLOAT_DTYPES)
    _checks.shape("target_logprobs", target_logprobs, indices.shape, "the shape of indices")
    _checks.same_device("logits", logits, target_logprobs=target_logprobs)
    t = _checks.positive("temperature", temperature)
    _checks.flag("tail", tail)
    name = backends.resolve(backend, _SPARSE, "sparse_kl", logits.device)
    k = indices.shape[-1]
    kl, _, _ = _sparse_kl_op(_rows_for(logits, name), indices.reshape(-1, k),
                             target_logprobs.detach().reshape(-1, k), t, tail, name)
    return kl.view(logits.shape[:-1])


# ============================================================================ kl_divergence

_KL_KINDS = ("reverse", "forward", "jsd")


@torch.library.custom_op("rlkernels::kl_divergence", mutates_args=())
def _kl_divergence_op(logits: Tensor, ref_logits: Tensor, ignore_mask: Optional[Tensor],
                      kind: str, beta: float, temperature: float, backend: str
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    return call(backend, _FAMILY, "kl_divergence_forward", logits, ref_logits, ignore_mask,
                kind, beta, temperature)


@_kl_divergence_op.register_fake
def _(logits, ref_logits, ignore_mask, kind, beta, temperature, backend):
    dt = out_dtype(logits.dtype)
    n = _n_rows(logits)
    return (logits.new_empty(n, dtype=dt), logits.new_empty(n, 3, dtype=dt),
            logits.new_empty(n, 3, dtype=dt))


@torch.library.custom_op("rlkernels::kl_divergence_backward", mutates_args=())
def _kl_divergence_backward_op(grad_kl: Tensor, logits: Tensor, ref_logits: Tensor,
                               ignore_mask: Optional[Tensor], stats_p: Tensor, stats_q: Tensor,
                               kind: str, beta: float, temperature: float,
                               need_ref_grad: bool, backend: str) -> Tuple[Tensor, Tensor]:
    grad_z, grad_w = call(backend, _FAMILY, "kl_divergence_backward", grad_kl, logits,
                          ref_logits, ignore_mask, stats_p, stats_q, kind, beta, temperature,
                          need_ref_grad)
    # custom ops cannot return None: an empty tensor stands for "not asked for"
    return grad_z, grad_w if grad_w is not None else ref_logits.new_empty(0)


@_kl_divergence_backward_op.register_fake
def _(grad_kl, logits, ref_logits, ignore_mask, stats_p, stats_q, kind, beta, temperature,
      need_ref_grad, backend):
    return (torch.empty_like(logits),
            torch.empty_like(ref_logits) if need_ref_grad else ref_logits.new_empty(0))


def _kl_divergence_setup(ctx, inputs, output):
    logits, ref_logits, ignore_mask, kind, beta, temperature, backend = inputs
    ctx.save_for_backward(logits, ref_logits, ignore_mask, output[1], output[2])
    ctx.args = (kind, beta, temperature, backend)
    ctx.mark_non_differentiable(output[1], output[2])


def _kl_divergence_grad(ctx, grad_kl, _g1, _g2):
    need_z, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_z or need_w):
        return (None,) * 7
    logits, ref_logits, ignore_mask, stats_p, stats_q = ctx.saved_tensors
    kind, beta, temperature, backend = ctx.args
    grad_z, grad_w = _kl_divergence_backward_op(grad_kl, logits, ref_logits, ignore_mask,
                                                stats_p, stats_q, kind, beta, temperature,
                                                need_w, backend)
    return (grad_z if need_z else None, grad_w if need_w else None) + (None,) * 5


_kl_divergence_op.register_autograd(_kl_divergence_grad, setup_context=_kl_divergence_setup)


# vocabulary parallelism: global statistics and KL sums by collectives in forward
# (rlkernels.distributed.kl_divergence_forward); backward is the plain local backward op
# above, fed with the global statistics: no communication.

@torch.library.custom_op("rlkernels::kl_divergence_vp", mutates_args=())
def _kl_divergence_vp_op(logits: Tensor, ref_logits: Tensor, ignore_mask: Optional[Tensor],
                         kind: str, beta: float, temperature: float, group: int, backend: str
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    return _dist.kl_divergence_forward(
        backends.kernel(backend, _FAMILY, "token_logprobs_forward"),
        backends.kernel(backend, _FAMILY, "kl_divergence_partial_forward"),
        logits, ref_logits, ignore_mask, kind, beta, temperature, _dist.group_of(group))


@_kl_divergence_vp_op.register_fake
def _(logits, ref_logits, ignore_mask, kind, beta, temperature, group, backend):
    dt = out_dtype(logits.dtype)
    n = _n_rows(logits)
    return (logits.new_empty(n, dtype=dt), logits.new_empty(n, 3, dtype=dt),
            logits.new_empty(n, 3, dtype=dt))


def _kl_divergence_vp_setup(ctx, inputs, output):
    logits, ref_logits, ignore_mask, kind, beta, temperature, group, backend = inputs
    ctx.save_for_backward(logits, ref_logits, ignore_mask, output[1], output[2])
    ctx.args = (kind, beta, temperature, backend)
    ctx.mark_non_differentiable(output[1], output[2])


def _kl_divergence_vp_grad(ctx, grad_kl, _g1, _g2):
    return _kl_divergence_grad(ctx, grad_kl, _g1, _g2) + (None,)


_kl_divergence_vp_op.register_autograd(_kl_divergence_vp_grad,
                                       setup_context=_kl_divergence_vp_setup)


def kl_divergence(logits: Tensor, ref_logits: Tensor, *, kind: str = "reverse",
                  beta: float = 0.5, temperature: float = 1.0,
                  ignore_mask: Optional[Tensor] = None, backend: Optional[str] = None,
                  process_group=None) -> Tensor:
    """Row-wise KL divergence between two logits tensors, computed in one chunked pass.

    ``p = softmax(logits / T)`` (the model being trained), ``q = softmax(ref_logits / T)``:

    * ``"reverse"``: ``KL(p || q) = sum p (log p - log q)``
    * ``"forward"``: ``KL(q || p) = sum q (log q - log p)``
    * ``"jsd"``: ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``,
      ``beta`` in ``[0, 1]``

    with ``0 log 0 = 0`` (``-inf`` columns in both rows contribute nothing).
    ``ignore_mask`` (bool ``[...]``): ``True`` rows give 0 and an exactly-zero gradient.

    Shapes: both logits ``[..., V]`` of the same dtype -> ``[...]`` fp32 (fp64 for fp64).
    Differentiable w.r.t. both inputs (gradients in their dtype); no ``[N, V]`` temporary.

    ``process_group``: vocabulary parallelism (SPEC 3.5). ``logits`` and ``ref_logits`` are
    this rank's shard of the same vocabulary columns (ranks in group order, sizes may
    differ); every rank gets the KL of the whole vocabulary. Forward runs three collectives
    (row maxima, softmax normalizers, KL sums; the decomposition is in
    :mod:`rlkernels.distributed`); backward computes this rank's gradient shards locally
    from the saved global statistics, with no communication. Every rank must call the op
    with the same rows and arguments.
    """
    _checks.logits("logits", logits)
    _checks.logits("ref_logits", ref_logits)
    _checks.shape("ref_logits", ref_logits, logits.shape, "the shape of logits")
    _checks.same_dtype("logits", logits, ref_logits=ref_logits)
    _checks.same_device("logits", logits, ref_logits=ref_logits)
    _checks.choice("kind", kind, _KL_KINDS)
    beta = _checks.number("beta", beta, lo=0.0, hi=1.0)
    t = _checks.positive("temperature", temperature)
    handle = _dist.register_group(process_group) if process_group is not None else None
    mask = None
    if ignore_mask is not None:
        _checks.tensor("ignore_mask", ignore_mask, dtypes=(torch.bool,))
        _checks.shape("ignore_mask", ignore_mask, logits.shape[:-1], "the leading dims of logits")
        _checks.same_device("logits", logits, ignore_mask=ignore_mask)
        mask = ignore_mask.reshape(-1)
    name = backends.resolve(backend, _FAMILY, "kl_divergence", logits.device)
    if handle is not None:
        kl, _, _ = _kl_divergence_vp_op(rows(logits), rows(ref_logits), mask, kind, beta, t,
                                        handle, name)
    else:
        kl, _, _ = _kl_divergence_op(_rows_for(logits, name), _rows_for(ref_logits, name),
                                     mask, kind, beta, t, name)
    return kl.view(logits.shape[:-1])


__all__ = ["token_logprobs", "entropy", "sparse_logprobs", "sampling_support", "sparse_kl",
           "kl_divergence"]
