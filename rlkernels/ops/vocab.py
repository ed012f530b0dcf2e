"""Vocabulary ops: functions that read ``[..., V]`` logits (the sparse ones, at K given ids
per row, are in :mod:`rlkernels.ops.sparse`).

Each differentiable op is declared once in the op table (:mod:`rlkernels.ops._table`): its
forward returns its outputs plus what backward needs (the row statistics ``(m, log s, .)``
of each row), and its backward recomputes the softmax from the logits. The concrete backend
name travels as a string argument, so ``torch.compile`` sees a constant and never breaks the
graph.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _checks
from .. import distributed as _dist
from ..reference import as_flat
from ._common import check_tokens_for, out_dtype, rows, rows_for, valid_logits_tokens
from ._table import Backward, Op, Parallel

Tensor = torch.Tensor
_FAMILY = "vocab"


def _rows(logits: Tensor, backend: str, handle, flat: Tuple[int, ...] = ()):
    """``(x, maps)`` for the op call: the ``[N, V]`` rows of ``logits`` with a process group
    (``rows``; the per-row inputs at positions ``flat`` are then flattened by the caller);
    else ``logits`` itself and the maps that the op applies (``rows_for``, and ``[...] ->
    [N]`` for the inputs at ``flat``: inside the eager Function, so the views add no
    autograd node; none at all for a backend whose kernels take the public shapes)."""
    if handle is not None:
        return rows(logits), None
    return logits, ((0, lambda z: rows_for(z, backend, _FAMILY)),) + tuple(
        (i, as_flat) for i in flat)


def n_rows(x: Tensor) -> int:
    """Rows of the ``[N, V]`` or ``[A, B, V]`` logits a custom op receives (see ``rows``)."""
    n = 1
    for d in x.shape[:-1]:
        n *= d
    return n


def row_outputs(x: Tensor, *widths: int) -> Tuple[Tensor, ...]:
    """Empty per-row outputs of the fakes: ``[N]`` for width 0, ``[N, w]`` otherwise, in the
    outputs' dtype (fp32, fp64 for fp64 logits)."""
    n, dt = n_rows(x), out_dtype(x.dtype)
    return tuple(x.new_empty((n, w) if w else (n,), dtype=dt) for w in widths)


# =============================================================== token_logprobs / entropy

def _token_logprobs_parallel(a, kernel):
    # SPEC 3.5: the shards' row statistics combined by collectives (rlkernels.distributed);
    # backward is the local backward kernel fed with the global statistics and the
    # shard-local tokens: no communication
    return _dist.token_logprobs_forward(kernel("token_logprobs_forward"), a.logits, a.tokens,
                                        a.temperature, a.ignore_index, a.with_entropy,
                                        _dist.group_of(a.group))


TOKEN_LOGPROBS = Op(
    "token_logprobs(Tensor logits, Tensor? tokens, float temperature, int ignore_index, "
    "bool with_entropy, str backend) -> (logp, entropy, stats)",
    _FAMILY,
    fake=lambda a: row_outputs(a.logits, 0, 0, 3),
    differentiable=("logits",), nondiff=("stats",), saved=("logits", "tokens", "stats"),
    # an output the call did not ask for gets no backward work
    grad_if={"logp": "tokens", "entropy": "with_entropy"},
    backward=Backward(("grad_logp", "grad_entropy", "logits", "tokens", "stats",
                       "temperature", "ignore_index"), grads=("logits",)),
    parallel=Parallel(
        _token_logprobs_parallel, backends=("torch", "triton", "cuda"),
        extra_outputs=("local_tokens",),
        extra_fake=lambda a: (a.logits.new_empty(n_rows(a.logits) if a.tokens is not None
                                                 else 0, dtype=torch.int64),),
        save_as={"tokens": "local_tokens"}))


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
    if not valid_logits_tokens(logits, tokens):
        _checks.logits("logits", logits)
        check_tokens_for("tokens", tokens, "logits", logits)
    t = _checks.positive("temperature", temperature)
    _checks.integer("ignore_index", ignore_index)
    _checks.flag("return_entropy", return_entropy)
    handle = None
    if process_group is not None:
        handle = _dist.register_group(process_group)
        if _checks.debug_enabled():
            _dist.check_global_tokens("tokens", tokens, logits.shape[-1], ignore_index,
                                      process_group)
    else:
        _checks.token_range("tokens", tokens, logits.shape[-1], ignore_index)
    name = TOKEN_LOGPROBS.resolve(backend, logits, process_group is not None)
    x, maps = _rows(logits, name, handle, flat=(1,))
    shape = tokens.shape
    # the per-row outputs come back in the tokens' shape (views taken by the op: no view
    # node in the autograd graph on the eager path)
    views = ((0, shape), (1, shape)) if return_entropy else ((0, shape),)
    logp, ent = TOKEN_LOGPROBS(x, tokens if maps else as_flat(tokens), t, ignore_index,
                               return_entropy, name, group=handle, views=views,
                               maps=maps)[:2]
    if return_entropy:
        return logp, ent
    return logp


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
    name = TOKEN_LOGPROBS.resolve(backend, logits, handle is not None)
    x, maps = _rows(logits, name, handle)
    return TOKEN_LOGPROBS(x, None, t, -100, True, name, group=handle,
                          views=((1, logits.shape[:-1]),), maps=maps)[1]


# ============================================================================ kl_divergence

_KL_KINDS = ("reverse", "forward", "jsd", "alpha", "tv")


def _alpha_kind(kind: str, alpha, beta: float) -> Tuple[str, float]:
    """``(kind, beta)`` the kernels receive: for ``kind="alpha"`` the op's ``beta`` argument
    carries alpha, strictly inside ``(0, 1)``; its limits are the KL kinds (``a = 1``:
    ``KL(p||q)``, ``a = 0``: ``KL(q||p)``), computed by their own kernels."""
    if kind != "alpha":
        if alpha is not None:
            # a silent no-op would hide a typo (kind="jsd", alpha=... meant beta)
            raise ValueError(f"alpha: only used with kind='alpha', got alpha={alpha!r} with "
                             f"kind={kind!r}")
        return kind, beta
    if alpha is None:
        raise ValueError("alpha: kind='alpha' needs alpha, a number in [0, 1], got None")
    a = _checks.number("alpha", alpha, lo=0.0, hi=1.0)
    if a == 1.0:
        return "reverse", beta
    if a == 0.0:
        return "forward", beta
    return kind, a


def _kl_divergence_parallel(a, kernel):
    # global statistics and KL sums by collectives (rlkernels.distributed); backward is the
    # local backward kernel fed with the global statistics: no communication
    return _dist.kl_divergence_forward(
        kernel("token_logprobs_forward"), kernel("kl_divergence_partial_forward"), a.logits,
        a.ref_logits, a.ignore_mask, a.kind, a.beta, a.temperature, _dist.group_of(a.group))


KL_DIVERGENCE = Op(
    "kl_divergence(Tensor logits, Tensor ref_logits, Tensor? ignore_mask, str kind, float "
    "beta, float temperature, str backend) -> (kl, stats_p, stats_q)",
    _FAMILY,
    fake=lambda a: row_outputs(a.logits, 0, 3, 3),
    differentiable=("logits", "ref_logits"), nondiff=("stats_p", "stats_q"),
    saved=("logits", "ref_logits", "ignore_mask", "stats_p", "stats_q"),
    backward=Backward(("grad_kl", "logits", "ref_logits", "ignore_mask", "stats_p", "stats_q",
                       "kind", "beta", "temperature", "need_ref_logits"),
                      grads=("logits", "ref_logits")),
    # the cuda backend has no partial-forward kernel (the per-shard KL sums)
    parallel=Parallel(_kl_divergence_parallel, backends=("torch", "triton")))


def kl_divergence(logits: Tensor, ref_logits: Tensor, *, kind: str = "reverse",
                  beta: float = 0.5, alpha: Optional[float] = None, temperature: float = 1.0,
                  ignore_mask: Optional[Tensor] = None, backend: Optional[str] = None,
                  process_group=None) -> Tensor:
    """Row-wise KL divergence (or another f-divergence) between two logits tensors, computed
    in chunked passes over the vocabulary.

    ``p = softmax(logits / T)`` (the model being trained), ``q = softmax(ref_logits / T)``:

    * ``"reverse"``: ``KL(p || q) = sum p (log p - log q)``
    * ``"forward"``: ``KL(q || p) = sum q (log q - log p)``
    * ``"jsd"``: ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``,
      ``beta`` in ``[0, 1]``
    * ``"alpha"``: Amari's alpha-divergence ``(1 - sum p^a q^(1-a)) / (a (1 - a))`` with
      ``a = alpha`` in ``[0, 1]`` (required for this kind, an error with the others);
      ``a = 1`` is ``"reverse"``, ``a = 0`` is ``"forward"`` (the limits, computed as those
      kinds), and values near them stay accurate (docs/math.md)
    * ``"tv"``: total variation ``0.5 sum |p - q|`` (gradient: the subgradient with
      ``sign(0) = 0``)

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
    kind, beta = _alpha_kind(kind, alpha, beta)
    t = _checks.positive("temperature", temperature)
    handle = _dist.register_group(process_group) if process_group is not None else None
    mask = None
    if ignore_mask is not None:
        _checks.tensor("ignore_mask", ignore_mask, dtypes=(torch.bool,))
        _checks.shape("ignore_mask", ignore_mask, logits.shape[:-1], "the leading dims of logits")
        _checks.same_device("logits", logits, ignore_mask=ignore_mask)
        mask = ignore_mask
    name = KL_DIVERGENCE.resolve(backend, logits, handle is not None)
    if handle is not None:
        x, y, maps, mask = rows(logits), rows(ref_logits), None, as_flat(mask)
    else:
        x, y = logits, ref_logits
        maps = ((0, lambda z: rows_for(z, name, _FAMILY)),
                (1, lambda z: rows_for(z, name, _FAMILY)), (2, as_flat))
    return KL_DIVERGENCE(x, y, mask, kind, beta, t, name, group=handle,
                         views=((0, logits.shape[:-1]),), maps=maps)[0]


__all__ = ["token_logprobs", "entropy", "kl_divergence"]
