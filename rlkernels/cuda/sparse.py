"""Launchers for csrc/sparse.cu: ``sparse_logprobs`` and ``sparse_kl``
(K given ids per row, with the tail bucket).

Supports come padded (``indices [N, K]``, -1 = unused slot) or as CSR (``offsets [N + 1]``,
``indices [nnz]``: row ``r``'s ids are ``indices[offsets[r]:offsets[r + 1]]``, vLLM's form;
per-slot inputs and outputs ``[nnz]`` at the same positions). The kernels read CSR natively
(``kCsr``: row ``r`` at ``indices + offsets[r]``), so ``offsets`` may be a view of a larger
CSR (``offsets[r0:r0 + n + 1]``, absolute positions): only those rows' positions are written.
No host sync: the backward's per-row sort is one device sort of the flat array.

Same signatures, outputs and saved row statistics as :mod:`rlkernels.reference.sparse`
(which states the math) and :mod:`rlkernels.triton.sparse`. Logits reach the kernels as in
:mod:`rlkernels.cuda.vocab` (pointer and row stride, no copy for unit column stride).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _codes
from ._common import (DTYPE_CODES, FLOAT_DTYPES, INDEX_DTYPES, compute_dtype, expect, extension,
                      matrix, ptr, rows, stream_of, unit_stride)
from .vocab import _logits, _row_vector

Tensor = torch.Tensor


_MODES = {name: _codes.SPARSE_MODES[name] for name in ("full", "support")}  # sparse_logprobs
_MODE_KL = _codes.SPARSE_MODES["kl"]  # sparse_kl
_SENTINEL = 2 ** 31 - 1  # csrc/sparse.cu kSparseSentinel: the sorted id of an unused slot
_SEG_COLS = 32 * 8192  # csrc/sparse.cu kSparseSegCols: the columns of one id bitmap


def _indices(indices: Tensor, n: int, like: Tensor, offsets: Optional[Tensor] = None
             ) -> Tuple[Tensor, int, Optional[Tensor]]:
    """``(ids int64, K, offsets int64 or None)``: padded ``[n, K]``, or CSR (``K`` = nnz)."""
    if offsets is not None:
        expect("indices", indices, INDEX_DTYPES, ndim=1, like=like)
        expect("offsets", offsets, INDEX_DTYPES, shape=(n + 1,), like=like)
        # the kernels read int64 (a copy of N + 1 values only for int32)
        return indices.to(torch.int64), indices.shape[0], offsets.to(torch.int64).contiguous()
    expect("indices", indices, INDEX_DTYPES, ndim=2, like=like)
    k = indices.shape[1]
    expect("indices", indices, INDEX_DTYPES, shape=(n, k))
    return indices.to(torch.int64), k, None  # the kernels read int64 ids


def _slots(C, t: Optional[Tensor]):
    """``_C.Matrix`` of a per-slot tensor: ``[n, K]``, or ``[nnz]`` (CSR: its stride as
    stride1, which the kernels use)."""
    return matrix(C, t, t.stride(0) if t is not None and t.dim() == 1 else None)


def _rows_k(name: str, t: Optional[Tensor], n: int, k: int, cdt: torch.dtype,
            like: Tensor, csr: bool = False) -> Optional[Tensor]:
    """An ``[n, K]`` (CSR: ``[nnz]``, ``k`` = nnz) float tensor (any strides) in the math
    dtype, or None."""
    if t is None:
        return None
    expect(name, t, FLOAT_DTYPES, shape=(k,) if csr else (n, k), like=like)
    return t.to(cdt)


def _sorted_ids(indices: Tensor, vocab: int) -> Tuple[Tensor, Tensor]:
    """Each row's ids sorted (stable: duplicates keep their slot order) with unused and
    out-of-range ids last as ``_SENTINEL``, and their slots; int32 ``[N, K]`` contiguous."""
    ok = (indices >= 0) & (indices < vocab)
    ids = torch.where(ok, indices, torch.full_like(indices, _SENTINEL)).to(torch.int32)
    sid, perm = torch.sort(ids, dim=1, stable=True)
    return sid.contiguous(), perm.to(torch.int32).contiguous()


def _sorted_ids_csr(indices: Tensor, offsets: Tensor, vocab: int) -> Tuple[Tensor, Tensor]:
    """CSR form of :func:`_sorted_ids`, int32 ``[nnz]``: each row's positions sorted (stable)
    by id, and the slot within the row of each (position - ``offsets[r]``). One sort of the
    flat array by ``(row, id)``: a row keeps its range of positions, so its sorted ids lie
    where its ids do. Rows from ``offsets`` by ``searchsorted`` (positions outside
    ``offsets[0] .. offsets[-1]``, a view's other rows, sort before / after and are unused).
    """
    nnz, n = indices.shape[0], offsets.shape[0] - 1
    pos = torch.arange(nnz, dtype=torch.int64, device=indices.device)
    prow = torch.searchsorted(offsets, pos, right=True) - 1  # -1 .. n
    ok = (indices >= 0) & (indices < vocab)
    ids = torch.where(ok, indices, torch.full_like(indices, _SENTINEL))
    _, order = torch.sort((prow + 1) * 2 ** 31 + ids, stable=True)
    slot = order - offsets[prow.clamp(0, n - 1)]
    slot = torch.where((prow >= 0) & (prow < n), slot, torch.zeros_like(slot))
    return ids[order].to(torch.int32).contiguous(), slot.to(torch.int32).contiguous()


def _sparse_forward(logits: Tensor, indices: Tensor, target: Optional[Tensor],
                    temperature: float, mode: int, with_tail: bool,
                    offsets: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    C = extension()
    n, vocab = _logits("logits", logits)
    x = unit_stride(logits)
    cdt = compute_dtype(x.dtype)
    idx, k, offs = _indices(indices, n, x, offsets)
    csr = offs is not None
    tgt = _rows_k("target_logprobs", target, n, k, cdt, x, csr)
    if mode == _MODE_KL:
        out = torch.empty(n, dtype=cdt, device=x.device)
    elif csr:  # [nnz]: the positions of other rows (a view of a larger CSR) stay -inf
        out = torch.full((k,), float("-inf"), dtype=cdt, device=x.device)
    else:
        out = torch.empty((n, k), dtype=cdt, device=x.device)
    tail = torch.zeros(n, dtype=cdt, device=x.device)
    stats = torch.empty(n, 3, dtype=cdt, device=x.device)
    if n == 0:
        return out, tail, stats
    # the tail above one bitmap segment: one launch per segment, each row's state carried
    # between them (64 bytes per row, csrc/sparse.cu SparseCarry)
    carry = (torch.empty(n, 8, dtype=torch.float64, device=x.device)
             if with_tail and vocab > _SEG_COLS else None)
    with torch.cuda.device(x.device):
        C.sparse_forward(logits=rows(C, x), indices=_slots(C, idx), target=_slots(C, tgt),
                         out=rows(C, out), tail=tail.data_ptr(), stats=stats.data_ptr(), n=n,
                         vocab=vocab, k=k, dtype=DTYPE_CODES[x.dtype], mode=mode,
                         with_tail=bool(with_tail), inv_temperature=1.0 / temperature,
                         carry=ptr(carry), offsets=ptr(offs), stream=stream_of(x))
    return out, tail, stats


def _sparse_backward(logits: Tensor, indices: Tensor, gk: Optional[Tensor],
                     lp: Optional[Tensor], tail: Optional[Tensor], g_tail: Optional[Tensor],
                     g_kl: Optional[Tensor], stats: Tensor, temperature: float, mode: int,
                     with_tail: bool, offsets: Optional[Tensor] = None) -> Tensor:
    C = extension()
    n, vocab = _logits("logits", logits)
    x = unit_stride(logits)
    cdt = compute_dtype(x.dtype)
    idx, k, offs = _indices(indices, n, x, offsets)
    csr = offs is not None
    expect("stats", stats, (cdt,), shape=(n, 3), like=x)
    names = ("target_logprobs" if mode == _MODE_KL else "grad_logp", "logp")
    gk = _rows_k(names[0], gk, n, k, cdt, x, csr)
    lp = _rows_k(names[1], lp, n, k, cdt, x, csr)
    tail = _row_vector("tail", tail, n, cdt, x)
    g_tail = _row_vector("grad_tail", g_tail, n, cdt, x)
    g_kl = _row_vector("grad_kl", g_kl, n, cdt, x)
    grad = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    sid, perm = _sorted_ids_csr(idx, offs, vocab) if csr else _sorted_ids(idx, vocab)
    with torch.cuda.device(x.device):
        C.sparse_backward(logits=rows(C, x), grad=rows(C, grad), indices=_slots(C, idx),
                          sorted_ids=sid.data_ptr(), perm=perm.data_ptr(),
                          slot_values=_slots(C, gk), logp=_slots(C, lp), tail=ptr(tail),
                          grad_tail=ptr(g_tail), grad_kl=ptr(g_kl), stats=matrix(C, stats), n=n,
                          vocab=vocab, k=k, dtype=DTYPE_CODES[x.dtype], mode=mode,
                          with_tail=bool(with_tail), inv_temperature=1.0 / temperature,
                          offsets=ptr(offs), stream=stream_of(x))
    return grad


def sparse_logprobs_forward(logits: Tensor, indices: Tensor, temperature: float,
                            normalize: str, with_tail: bool, offsets: Optional[Tensor] = None
                            ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp [N, K] (CSR: [nnz]), tail [N], stats [N, 3])``, as
    :func:`rlkernels.reference.sparse.sparse_logprobs_forward`: ``"full"``: ``(z_k - m) -
    log s``; ``"support"``: ``z_k - logsumexp`` over the valid slots; -1 slots give ``-inf``;
    ``tail`` (``with_tail``) = log of the mass outside the distinct valid ids, from those
    columns' own log-sum-exp (0 otherwise). One block per row, one read of the row (16-byte
    loads), membership from a shared-memory bitmap of the ids. fp32 (fp64 for fp64 logits).
    ``offsets [N + 1]``: a CSR support (module docstring), ``indices`` and ``logp`` ``[nnz]``.
    """
    return _sparse_forward(logits, indices, None, temperature, _MODES[normalize], with_tail,
                           offsets)


def sparse_logprobs_backward(grad_logp: Optional[Tensor], grad_tail: Optional[Tensor],
                             logits: Tensor, indices: Tensor, logp: Tensor, tail: Tensor,
                             stats: Tensor, temperature: float, normalize: str,
                             offsets: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. ``logits`` (its dtype), as
    :func:`rlkernels.reference.sparse.sparse_logprobs_backward`: full ``scatter(g_k) - p sum g``;
    support ``scatter(g_k - s_k sum g)``; tail ``g_tail (1[outside] q - p)``; times ``1/T``.
    ``grad_logp=None``: no log-prob gradient; ``grad_tail=None``: no tail term. Duplicate ids
    sum their slots (stable sort: deterministic). One dense pass over the row, then the
    member columns are overwritten by the first slot of their id. CSR (``offsets``):
    ``grad_logp``, ``indices``, ``logp`` ``[nnz]``.
    """
    mode = _MODES[normalize]
    return _sparse_backward(logits, indices, grad_logp, logp if normalize == "support" else None,
                            tail if grad_tail is not None else None, grad_tail, None, stats,
                            temperature, mode, grad_tail is not None, offsets)


def sparse_kl_forward(logits: Tensor, indices: Tensor, target_logprobs: Tensor,
                      temperature: float, with_tail: bool, offsets: Optional[Tensor] = None
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(kl [N], student log tail [N], stats [N, 3])``, as
    :func:`rlkernels.reference.sparse.sparse_kl_forward`: ``sum_k t_k (log t_k - log s_k)``
    ``[+ t_tail (log t_tail - s_tail)]``, ``t_tail = max(1 - sum t_k, 0)`` (0 when the ids
    cover every column), ``0 log 0 = 0``; unused slots' targets are never read. CSR
    (``offsets``): ``indices`` and ``target_logprobs`` ``[nnz]``.
    """
    return _sparse_forward(logits, indices, target_logprobs, temperature, _MODE_KL, with_tail,
                           offsets)


def sparse_kl_backward(grad_kl: Tensor, logits: Tensor, indices: Tensor,
                       target_logprobs: Tensor, s_tail: Tensor, stats: Tensor,
                       temperature: float, with_tail: bool,
                       offsets: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. ``logits``, as :func:`rlkernels.reference.sparse.sparse_kl_backward`:
    ``g (p (sum t_k + t_tail) - scatter(t_k) - t_tail 1[outside] q) / T``.
    """
    return _sparse_backward(logits, indices, target_logprobs, None,
                            s_tail if with_tail else None, None, grad_kl, stats, temperature,
                            _MODE_KL, with_tail, offsets)


__all__ = ["sparse_logprobs_forward", "sparse_logprobs_backward", "sparse_kl_forward",
           "sparse_kl_backward"]
