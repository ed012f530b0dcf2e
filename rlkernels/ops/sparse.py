"""Sparse vocabulary ops: log-probabilities and KL at ``K`` given vocabulary ids per row
(a teacher's top-k support, a sampler's top-k / top-p support), with the tail bucket, and
the support of a top-k / top-p sampler.

Declared in the op table like the dense vocabulary ops (:mod:`rlkernels.ops.vocab`).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _checks
from ..reference import sparse as _ref
from ._common import check_indices_for, rows, rows_for
from ._table import Backward, Op
from .vocab import row_outputs

Tensor = torch.Tensor
_FAMILY = "sparse"

_NORMALIZE = ("full", "support")


# ========================================================================== sparse_logprobs

SPARSE_LOGPROBS = Op(
    "sparse_logprobs(Tensor logits, Tensor indices, float temperature, str normalize, "
    "bool with_tail, str backend) -> (logp, tail, stats)",
    _FAMILY,
    fake=lambda a: (a.logits.new_empty(a.indices.shape, dtype=row_outputs(a.logits, 0)[0].dtype),
                    *row_outputs(a.logits, 0, 3)),
    differentiable=("logits",), nondiff=("stats",),
    saved=("logits", "indices", "logp", "tail", "stats"),
    grad_if={"tail": lambda a: a.with_tail},
    backward=Backward(("grad_logp", "grad_tail", "logits", "indices", "logp", "tail", "stats",
                       "temperature", "normalize"), grads=("logits",)))


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
    check_indices_for("logits", logits, indices, logits.shape[-1])
    t = _checks.positive("temperature", temperature)
    _checks.choice("normalize", normalize, _NORMALIZE)
    _checks.flag("return_tail", return_tail)
    name = SPARSE_LOGPROBS.resolve(backend, logits.device)
    k = indices.shape[-1]
    logp, tail, _ = SPARSE_LOGPROBS(rows_for(logits, name, _FAMILY), indices.reshape(-1, k), t,
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
    ids = _ref.sampling_support(rows(logits), top_k, top_p, t)
    return ids.view(*logits.shape[:-1], ids.shape[-1])


# ================================================================================ sparse_kl

SPARSE_KL = Op(
    "sparse_kl(Tensor logits, Tensor indices, Tensor target_logprobs, float temperature, "
    "bool with_tail, str backend) -> (kl, s_tail, stats)",
    _FAMILY,
    fake=lambda a: row_outputs(a.logits, 0, 0, 3),
    differentiable=("logits",), nondiff=("s_tail", "stats"),
    saved=("logits", "indices", "target_logprobs", "s_tail", "stats"),
    backward=Backward(("grad_kl", "logits", "indices", "target_logprobs", "s_tail", "stats",
                       "temperature", "with_tail"), grads=("logits",)))


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
    check_indices_for("logits", logits, indices, logits.shape[-1])
    _checks.tensor("target_logprobs", target_logprobs, dtypes=_checks.FLOAT_DTYPES)
    _checks.shape("target_logprobs", target_logprobs, indices.shape, "the shape of indices")
    _checks.same_device("logits", logits, target_logprobs=target_logprobs)
    t = _checks.positive("temperature", temperature)
    _checks.flag("tail", tail)
    name = SPARSE_KL.resolve(backend, logits.device)
    k = indices.shape[-1]
    kl = SPARSE_KL(rows_for(logits, name, _FAMILY), indices.reshape(-1, k),
                   target_logprobs.reshape(-1, k), t, tail, name)[0]
    return kl.view(logits.shape[:-1])


__all__ = ["sparse_logprobs", "sampling_support", "sparse_kl"]
