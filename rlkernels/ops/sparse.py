"""Sparse vocabulary ops: log-probabilities and KL at ``K`` given vocabulary ids per row
(a teacher's top-k support, a sampler's top-k / top-p support), with the tail bucket, and
the support of a top-k / top-p sampler.

Declared in the op table like the dense vocabulary ops (:mod:`rlkernels.ops.vocab`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .. import _checks
from ..reference import sparse as _ref
from ..reference import as_rows
from ._common import check_indices_for, rows, rows_for
from ._table import Backward, Op
from .vocab import _alpha_kind, row_outputs

Tensor = torch.Tensor
_FAMILY = "sparse"

_NORMALIZE = ("full", "support")


# ==================================================================== CSR supports (issue 21)

def _check_csr(x_name: str, x: Tensor, indices, offsets, vocab: int) -> Tensor:
    """A CSR support as vLLM returns it: ``indices [nnz]`` (int32/int64, ids in ``[0, vocab)``
    or -1) and ``offsets [N + 1]`` (int32/int64), ``N`` the rows of ``x`` (every leading dim
    flattened); row ``r``'s ids are ``indices[offsets[r]:offsets[r + 1]]``. Shapes, dtypes
    and devices without a host sync; the values (``offsets[0] == 0``, non-decreasing,
    ``offsets[-1] == nnz``, the ids' range) where :func:`rlkernels._checks.data_checks`
    allows (debug mode, plain CPU tensors). Returns ``offsets``."""
    _checks.indices("indices", indices)
    if indices.dim() != 1:
        raise ValueError(f"indices: expected a 1-d tensor [nnz] of ids with offsets= (a CSR "
                         f"support), got shape {tuple(indices.shape)}")
    _checks.tensor("offsets", offsets, dtypes=_checks.INDEX_DTYPES)
    n = x.numel() // x.shape[-1] if x.shape[-1] else math.prod(x.shape[:-1])
    if offsets.dim() != 1 or offsets.shape[0] != n + 1:
        raise ValueError(f"offsets: expected shape ({n + 1},) (N + 1 row offsets, N = {n} rows "
                         f"of {x_name}), got {tuple(offsets.shape)}")
    _checks.same_device(x_name, x, indices=indices, offsets=offsets)
    if _checks.data_checks(offsets):
        first, last = offsets[0], offsets[-1]
        if bool(first != 0):
            raise ValueError(f"offsets: expected offsets[0] == 0, got {int(first)}")
        step = offsets[1:] < offsets[:-1]
        if bool(step.any()):
            r = int(step.nonzero()[0, 0])
            raise ValueError(f"offsets: expected non-decreasing offsets, got offsets[{r}] = "
                             f"{int(offsets[r])} > offsets[{r + 1}] = {int(offsets[r + 1])}")
        if bool(last != indices.shape[0]):
            raise ValueError(f"offsets: expected offsets[-1] == nnz = {indices.shape[0]} (the "
                             f"length of indices), got {int(last)}")
    if indices.numel() and _checks.data_checks(indices):
        bad = (indices < -1) | (indices >= vocab)
        if bool(bad.any()):
            raise ValueError(f"indices: expected ids in [0, {vocab}) or -1 for an unused slot, "
                             f"got {indices[bad][0].item()}")
    return offsets


# ========================================================================== sparse_logprobs

SPARSE_LOGPROBS = Op(
    "sparse_logprobs(Tensor logits, Tensor indices, float temperature, str normalize, "
    "bool with_tail, str backend, Tensor? offsets=None) -> (logp, tail, stats)",
    _FAMILY,
    fake=lambda a: (a.logits.new_empty(a.indices.shape, dtype=row_outputs(a.logits, 0)[0].dtype),
                    *row_outputs(a.logits, 0, 3)),
    differentiable=("logits",), nondiff=("stats",),
    saved=("logits", "indices", "logp", "tail", "stats", "offsets"),
    grad_if={"tail": lambda a: a.with_tail},
    backward=Backward(("grad_logp", "grad_tail", "logits", "indices", "logp", "tail", "stats",
                       "temperature", "normalize", "offsets"), grads=("logits",)))


def _support(x_name: str, x: Tensor, indices, offsets, vocab: int) -> Tensor:
    """The checked ids as ``[N, K]`` rows (padded) or ``[nnz]`` (CSR)."""
    _check_support(x_name, x, indices, offsets, vocab)
    return indices if offsets is not None else as_rows(indices)


def _check_support(x_name: str, x: Tensor, indices, offsets, vocab: int) -> None:
    if offsets is None:
        check_indices_for(x_name, x, indices, vocab)
    else:
        _check_csr(x_name, x, indices, offsets, vocab)


def sparse_logprobs(logits: Tensor, indices: Tensor, *, offsets: Optional[Tensor] = None,
                    temperature: float = 1.0, normalize: str = "full",
                    return_tail: bool = False,
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

    **CSR support** (as vLLM returns a sampler's kept set): with ``offsets [N + 1]``
    (int32/int64, ``N = logits.numel() // V``, every leading dim flattened), ``indices`` is
    ``[nnz]``, row ``r``'s ids being ``indices[offsets[r]:offsets[r + 1]]`` (rows of any
    length, 0 included; ``-1`` is still an unused slot); the log-probs come back ``[nnz]``
    at the ids' positions, the tail ``[...]``. A row without ids has a tail of 0 (all its
    mass is outside). ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == nnz`` are
    checked in debug mode (:func:`rlkernels.set_debug`) and on CPU tensors.
    """
    _checks.logits("logits", logits)
    _check_support("logits", logits, indices, offsets, logits.shape[-1])
    t = _checks.positive("temperature", temperature)
    _checks.choice("normalize", normalize, _NORMALIZE)
    _checks.flag("return_tail", return_tail)
    name = SPARSE_LOGPROBS.resolve(backend, logits)
    # the [N, V] rows and the outputs' shapes are taken inside the op (maps and views: no
    # view node in the eager graph; logp and tail, saved for backward, stay autograd views)
    logp, tail, _ = SPARSE_LOGPROBS(logits, indices, t, normalize, return_tail, name, offsets,
                                    maps=_rows_map(name, offsets, 1),
                                    views=_views(logits, indices.shape, return_tail))
    return (logp, tail) if return_tail else logp


def _rows_map(name: str, offsets, *per_slot: int):
    """The maps of the op call: the logits' rows, and ``[..., K] -> [N, K]`` for the inputs
    at positions ``per_slot`` of a padded support (a CSR support is ``[nnz]`` already)."""
    rows_map = (0, lambda z: rows_for(z, name, _FAMILY))
    if offsets is not None:
        return (rows_map,)
    return (rows_map,) + tuple((i, as_rows) for i in per_slot)


def _views(x: Tensor, logp_shape, with_tail: bool):
    """The ``views`` of the sparse log-probs' outputs for ``[..., V]`` logits (or ``[...,
    H]`` hidden states) ``x``: ``logp`` (and ``tail``) in their public shapes; none for
    ``[N, V]`` rows (the kernel's shapes already)."""
    if x.dim() == 2:
        return None
    logp = ((0, logp_shape),)
    return logp + ((1, x.shape[:-1]),) if with_tail else logp


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
    "bool with_tail, str backend, Tensor? offsets=None) -> (kl, s_tail, stats)",
    _FAMILY,
    fake=lambda a: row_outputs(a.logits, 0, 0, 3),
    differentiable=("logits",), nondiff=("s_tail", "stats"),
    saved=("logits", "indices", "target_logprobs", "s_tail", "stats", "offsets"),
    backward=Backward(("grad_kl", "logits", "indices", "target_logprobs", "s_tail", "stats",
                       "temperature", "with_tail", "offsets"), grads=("logits",)))


_SPARSE_KL_KINDS = ("forward", "reverse", "jsd", "alpha", "tv")


def sparse_kl(logits: Tensor, indices: Tensor, target_logprobs: Tensor, *,
              offsets: Optional[Tensor] = None, kind: str = "forward",
              alpha: Optional[float] = None, beta: float = 0.5, temperature: float = 1.0,
              tail: bool = True, backend: Optional[str] = None) -> Tensor:
    """A divergence between student and teacher over the teacher's top-K ids and a tail bucket.

    Buckets: the row's ``K`` slots and, with ``tail=True``, the rest of the vocabulary.
    Student ``s = softmax(logits / temperature)`` over all ``V`` columns: ``s_k`` at the
    ids, ``s_tail`` its mass outside them. Teacher ``t_k = exp(target_logprobs_k)`` (its
    full-vocabulary probabilities at the ids), ``t_tail = max(1 - sum_k t_k, 0)``. Slots with
    id ``-1`` are ignored (their target value is not read). When the ids cover every column
    there is no tail bucket: ``t_tail`` is taken as 0 (its value would only be the rounding
    of the targets, against a student tail of mass 0). Temperature applies to the student
    only. ``kind`` names the divergence as :func:`rlkernels.kl_divergence` does, with the
    student in the place of ``p`` (the model being trained) and the teacher in that of ``q``:

    * ``"forward"``: ``KL(teacher || student) = sum_b t_b (log t_b - log s_b)``
    * ``"reverse"``: ``KL(student || teacher) = sum_b s_b (log s_b - log t_b)`` (``+inf``
      when a bucket has student mass and no teacher mass, e.g. ``sum_k t_k >= 1``)
    * ``"jsd"``: ``beta KL(s || m) + (1 - beta) KL(t || m)``, ``m = beta s + (1 - beta) t``
    * ``"alpha"``: ``sum_b (a s_b + (1-a) t_b - s_b^a t_b^(1-a)) / (a (1 - a))``,
      ``a = alpha`` in ``[0, 1]`` (required for this kind, an error with the others): Amari's
      alpha-divergence, ``(1 - sum_b s_b^a t_b^(1-a)) / (a (1 - a))`` when both bucket sets
      sum to 1; ``a = 0`` is ``"forward"``, ``a = 1`` is ``"reverse"``
    * ``"tv"``: ``0.5 sum_b |s_b - t_b|``

    with ``0 log 0 = 0``. ``tail=False`` drops the tail bucket and renormalizes nothing: the
    same per-bucket terms summed over the ``K`` slots only, as ``"forward"`` has always
    done (a renormalized student would need the support softmax, a different gradient). The
    buckets then sum to less than 1 and ``"alpha"`` is the alpha-divergence of these
    positive measures (nonnegative, continuous in ``a``), whose limits ``a -> 0, 1`` are the
    generalized KLs (``"forward"`` / ``"reverse"`` plus ``sum_k (s_k - t_k)`` and minus it);
    with the tail bucket the limits are exact. docs/math.md, "sparse_kl kinds (issue 21)".

    ``"forward"`` runs its own fused kernel. The other kinds take the student's bucket
    log-probs from :func:`sparse_logprobs` (``normalize="full"``, ``return_tail=tail``: one
    pass over the logits, differentiable) and the divergence is an O(N K) function of those
    ``K + 1`` numbers per row, whose gradient flows back through sparse_logprobs' backward.

    Shapes: ``logits [..., V]``, ``indices [..., K]``, ``target_logprobs [..., K]`` float ->
    ``[...]`` fp32 (fp64 for fp64 logits). Differentiable w.r.t. ``logits`` only (the teacher
    is a constant). CSR support (:func:`sparse_logprobs`): ``offsets [N + 1]``, ``indices``
    and ``target_logprobs [nnz]``; the buckets of a row are its segment's ids and the tail
    (a row without ids: the tail bucket alone, ``t_tail = 1``, ``s_tail = 1``: 0).
    """
    _checks.logits("logits", logits)
    _check_support("logits", logits, indices, offsets, logits.shape[-1])
    _checks.tensor("target_logprobs", target_logprobs, dtypes=_checks.FLOAT_DTYPES)
    _checks.shape("target_logprobs", target_logprobs, indices.shape, "the shape of indices")
    _checks.same_device("logits", logits, target_logprobs=target_logprobs)
    _checks.choice("kind", kind, _SPARSE_KL_KINDS)
    beta = _checks.number("beta", beta, lo=0.0, hi=1.0)
    kind, weight = _alpha_kind(kind, alpha, beta)  # kl_divergence's alpha rules
    t = _checks.positive("temperature", temperature)
    _checks.flag("tail", tail)
    if kind != "forward":
        if offsets is not None:
            return _csr_bucket_kl(logits, indices, offsets, target_logprobs, kind, weight, t,
                                  tail, backend)
        return _bucket_kl(logits, indices, target_logprobs, kind, weight, t, tail, backend)
    name = SPARSE_KL.resolve(backend, logits)
    return SPARSE_KL(logits, indices, target_logprobs, t, tail, name, offsets,
                     maps=_rows_map(name, offsets, 1, 2), views=((0, logits.shape[:-1]),))[0]


def _bucket_kl(logits: Tensor, indices: Tensor, target_logprobs: Tensor, kind: str,
               weight: float, temperature: float, tail: bool, backend: Optional[str]) -> Tensor:
    """The kinds other than ``"forward"``: the student's bucket log-probs from
    :func:`sparse_logprobs`, the teacher's from the targets, then :func:`_bucket_divergence`."""
    out = sparse_logprobs(logits, indices, temperature=temperature, normalize="full",
                          return_tail=tail, backend=backend)
    ls = out[0] if tail else out
    valid = indices >= 0
    # unused slots: -inf (t = 0), their target never read (torch.where selects, a NaN there
    # stays out)
    lt = torch.where(valid, target_logprobs.to(ls.dtype), -math.inf).detach()
    if tail:
        t_tail = (1.0 - lt.exp().sum(-1)).clamp_min(0.0)
        t_tail = torch.where(_covers(indices, logits.shape[-1]), 0.0, t_tail)
        ls = torch.cat([ls, out[1].unsqueeze(-1)], dim=-1)
        lt = torch.cat([lt, t_tail.log().unsqueeze(-1)], dim=-1)
    return _bucket_divergence(ls, lt, kind, weight)


def _csr_bucket_kl(logits: Tensor, indices: Tensor, offsets: Tensor, target_logprobs: Tensor,
                   kind: str, weight: float, temperature: float, tail: bool,
                   backend: Optional[str]) -> Tensor:
    """:func:`_bucket_kl` of a CSR support: the per-bucket terms of every position (and of
    every row's tail bucket), summed per row over its segment (``torch.segment_reduce``: one
    ordered sum per row, differentiable, no host sync)."""
    out = sparse_logprobs(logits, indices, offsets=offsets, temperature=temperature,
                          normalize="full", return_tail=tail, backend=backend)
    ls = out[0] if tail else out
    lt = torch.where(indices >= 0, target_logprobs.to(ls.dtype), -math.inf).detach()
    off = offsets.long()
    # each position as a one-bucket row: the same per-bucket terms and gradients
    value = torch.segment_reduce(_bucket_divergence(ls[:, None], lt[:, None], kind, weight),
                                 "sum", offsets=off, unsafe=True)
    if tail:
        mass = torch.segment_reduce(lt.exp(), "sum", offsets=off, unsafe=True)
        t_tail = (1.0 - mass).clamp_min(0.0)
        t_tail = torch.where(_csr_covers(indices, off, logits.shape[-1]), 0.0, t_tail)
        s_tail = out[1].reshape(-1)
        value = value + _bucket_divergence(s_tail[:, None], t_tail.log()[:, None], kind, weight)
    return value.view(logits.shape[:-1])


def _csr_covers(indices: Tensor, offsets: Tensor, vocab: int) -> Tensor:
    """Bool ``[N]``: the row's valid ids are every column (:func:`_covers` of a CSR support:
    one sort of the flat ``(row, id)`` keys, the distinct ids counted per row)."""
    n, nnz = offsets.shape[0] - 1, indices.shape[0]
    if nnz < vocab:  # no row can hold V ids (shapes only: no host sync)
        return torch.zeros(n, dtype=torch.bool, device=indices.device)
    pos = torch.arange(nnz, device=indices.device)
    row = torch.searchsorted(offsets, pos, right=True) - 1
    key = torch.sort(row * (vocab + 1) + torch.where(indices >= 0, indices.long(), vocab)).values
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    distinct = (first & (key % (vocab + 1) < vocab)).to(torch.int64)
    count = torch.zeros(n, dtype=torch.int64, device=indices.device)
    return count.index_add_(0, row, distinct) == vocab  # integers: exact in any order


def _covers(indices: Tensor, vocab: int) -> Tensor:
    """Bool ``[...]``: the row's valid ids are every column (possible only when K >= V; a
    sort of the K ids, O(K log K) per row, no host synchronisation)."""
    if indices.shape[-1] < vocab:
        return torch.zeros(indices.shape[:-1], dtype=torch.bool, device=indices.device)
    ids = indices.long().sort(dim=-1).values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]
    return ((ids >= 0) & first).sum(-1) == vocab


def _bucket_divergence(ls: Tensor, lt: Tensor, kind: str, weight: float) -> Tensor:
    """``D [...]`` of the bucket distributions ``s = exp(ls)``, ``t = exp(lt)`` (``[..., B]``
    log-probs, ``-inf`` for an empty bucket), differentiable w.r.t. ``ls``: the formulas of
    :func:`sparse_kl`, per bucket ``b`` (``0 log 0 = 0``; ``r = s^a t^(1-a)``)

    ============  ==============================================  ==========================
    kind          value term                                      ``dD / d ls_b``
    ============  ==============================================  ==========================
    ``reverse``   ``s (ls - lt)``                                 ``s (ls - lt + 1)``
    ``jsd``       ``beta s (ls - lm) + (1-beta) t (lt - lm)``      ``beta s (ls - lm)``
    ``alpha``     ``(a s + (1-a) t - r) / (a (1-a))``             ``(s - r) / (1 - a)``
    ``tv``        ``0.5 |s - t|``                                 ``0.5 sign(s - t) s``
    ============  ==============================================  ==========================

    (``lm = log(beta s + (1-beta) t)``; jsd's ``d lm / d ls`` terms cancel). Every gradient
    has the factor ``s``: an empty student bucket gets exactly 0. O(N B) elementwise work.
    """
    return _BucketDivergence.apply(ls, lt, kind, weight)


def _gap(u: Tensor, lu: Tensor, lv: Tensor, c: float) -> Tensor:
    """``u - u^(1-c) v^c`` without cancellation (``c`` in ``(0, 1)``): ``-u expm1(c (lv -
    lu))`` while the exponent is ``<= 1``, the plain difference above (where ``u^(1-c) v^c >
    e u``: no cancellation, and no overflow where ``expm1`` would give inf); 0 where u = 0
    (NaN where u is NaN)."""
    e = c * (lv - lu)
    v = torch.where(e <= 1.0, -u * torch.expm1(e), u - torch.exp((1.0 - c) * lu + c * lv))
    return torch.where(u == 0, 0.0, v)  # NaN propagates


def _bucket_terms(ls: Tensor, lt: Tensor, kind: str, w: float) -> Tuple[Tensor, Tensor]:
    """Per-bucket ``(value term, dD / d ls)`` of :func:`_bucket_divergence`."""
    s, t = ls.exp(), lt.exp()
    s0 = s == 0  # an empty student bucket (not NaN: a NaN logit's row must come out NaN)
    zero = torch.zeros_like(s)
    if kind == "reverse":
        d = ls - lt  # +inf where t = 0 < s: KL = inf
        return torch.where(s0, 0.0, s * d), torch.where(s0, 0.0, s * (d + 1.0))
    if kind == "tv":
        return 0.5 * (s - t).abs(), 0.5 * torch.sign(s - t) * s
    if kind == "jsd":
        if w in (0.0, 1.0):  # m = t or s: both KLs 0 (0 KL(s || t) = 0 even where it is inf)
            return zero, zero
        # lm = log(w s + (1-w) t) around the larger bucket: log1p of a term in [-1, 0] (no
        # overflow), and lm = ls = lt exactly where the buckets are equal, so identical
        # buckets give exactly 0 whatever the CPU's exp / log rounding (the logaddexp form
        # gave 3e-8 on one AVX-512 CPU), and D ~ d^2 keeps its relative accuracy near d = 0
        d = ls - lt
        lm = torch.where(d >= 0, ls + torch.log1p((1.0 - w) * torch.expm1(-d)),
                         lt + torch.log1p(w * torch.expm1(d)))
        a_s = torch.where(s0, 0.0, s * (ls - lm))
        a_t = torch.where(t == 0, 0.0, t * (lt - lm))
        return w * a_s + (1.0 - w) * a_t, w * a_s
    # alpha, a = w in (0, 1): a s + (1-a) t - r = (s - r) + (1-a) (t - s) = (t - r) + a (s - t)
    # (the expm1 form around the distribution with the larger weight, as kl_divergence's
    # reference: each term is O(the smaller weight), like the sum)
    a, b = w, 1.0 - w
    gap_s = _gap(s, ls, lt, b)
    value = gap_s + b * (t - s) if a >= 0.5 else _gap(t, lt, ls, a) + a * (s - t)
    return value / (a * b), gap_s / b


class _BucketDivergence(torch.autograd.Function):
    """:func:`_bucket_divergence` with its explicit gradient (no NaN from ``0 * inf`` on
    empty buckets, which autograd through the value formulas would give)."""

    @staticmethod
    def forward(ctx, ls: Tensor, lt: Tensor, kind: str, weight: float) -> Tensor:
        value, grad = _bucket_terms(ls, lt, kind, weight)
        ctx.save_for_backward(grad)
        return value.sum(-1)

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return g.unsqueeze(-1) * grad, None, None, None


__all__ = ["sparse_logprobs", "sampling_support", "sparse_kl"]
