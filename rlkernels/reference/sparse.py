"""Reference kernels of the sparse vocabulary ops: ``sparse_logprobs`` and ``sparse_kl``
(log-probs and KL at K given ids per row, with the tail bucket), and ``sampling_support``
(the ids a top-k / top-p sampler can emit).

Same conventions as :mod:`rlkernels.reference.vocab` (row chunks, ``z = logits / T``, the
saved row statistics ``(m, log s, .)``, ``0 log 0 = 0``), whose row helpers they share.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import as_flat, as_rows, compute_dtype, grad_in_shape, leading, row_chunks
from .vocab import (_max_and_log_rest, _row_lse, _row_stats, _row_sum, _scaled, _shifted,
                    _xlogy0)

Tensor = torch.Tensor

# the eager ops' kernels take the public shapes (logits [..., V], indices / targets [..., K]
# or CSR [nnz]) and return outputs in them: rlkernels.ops._table skips its maps and views
ND_ROWS = True


# --------------------------------------------------------------------------- sparse log-probs

def _ids(indices: Tensor, rows: slice) -> Tuple[Tensor, Tensor]:
    """The chunk's ids as int64 with unused slots (-1) sent to column 0, and their mask."""
    idx = indices[rows].long()
    valid = idx >= 0
    return torch.where(valid, idx, 0), valid


def _membership(z: Tensor, idx: Tensor, valid: Tensor) -> Tensor:
    """Bool ``[rows, V]``: column j is one of the row's valid ids (duplicates allowed)."""
    member = torch.zeros(z.shape, dtype=torch.int8, device=z.device)
    # amax, not a plain scatter: an unused slot (-1, sent to column 0) must not erase a
    # valid id 0 that another slot of the same row wrote.
    member.scatter_reduce_(1, idx, valid.to(torch.int8), reduce="amax")
    return member.bool()


def _log_tail(z: Tensor, member: Tensor, stats: Tensor) -> Tensor:
    """log of the probability mass outside the ids: ``logsumexp(z[not member]) - lse``."""
    zs, log_s = _shifted(z, stats)
    m_out, log_s_out = _max_and_log_rest(zs.masked_fill(member, -math.inf))
    return (m_out + log_s_out - log_s)[:, 0]


def sparse_logprobs_forward(logits: Tensor, indices: Tensor, temperature: float,
                            normalize: str, with_tail: bool, offsets: Optional[Tensor] = None,
                            *, _out: Optional[Tensor] = None
                            ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp [..., K], tail [...], stats [..., 3])`` for ``logits [..., V]`` and
    ``indices [..., K]`` (``logp [nnz]`` with ``offsets``: CSR ``indices [nnz]``).

    ``normalize="full"``: ``z_k - lse``; ``"support"``: ``z_k - logsumexp_{valid k} z_k``.
    Slots with id -1 give ``-inf``. ``tail`` (only when ``with_tail``) is the log of the
    full-vocabulary probability mass outside the valid ids, whatever ``normalize`` is.

    CSR (``offsets [N + 1]``, ``indices [nnz]``): row ``r``'s ids are ``indices[offsets[r]:
    offsets[r + 1]]`` (absolute positions); only those positions of ``logp`` are written
    (``_out``: the ``[nnz]`` buffer to write them into).
    """
    lead = logits.shape[:-1]
    logits = as_rows(logits)
    if offsets is not None:
        logp, tail, stats = _csr_logprobs_forward(logits, indices, offsets, temperature,
                                                  normalize, with_tail, _out)
        return logp, leading(tail, lead), leading(stats, lead, 3)
    indices = as_rows(indices)
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    logp = logits.new_empty(indices.shape, dtype=cdt)
    tail = logits.new_zeros(n, dtype=cdt)
    stats = logits.new_empty(n, 3, dtype=cdt)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        idx, valid = _ids(indices, rows)
        stats[rows] = _row_stats(z)
        z_k = z.gather(1, idx).masked_fill(~valid, -math.inf)
        if normalize == "full":
            zs_k, log_s = _shifted(z_k, stats[rows])
            values = zs_k - log_s
        else:
            values = z_k - _row_lse(z_k, keepdim=True)
        logp[rows] = torch.where(valid, values, -math.inf)
        if with_tail:
            tail[rows] = _log_tail(z, _membership(z, idx, valid), stats[rows])
    return (leading(logp, lead, indices.shape[-1]), leading(tail, lead),
            leading(stats, lead, 3))


def sparse_logprobs_backward(grad_logp: Tensor, grad_tail: Optional[Tensor], logits: Tensor,
                             indices: Tensor, logp: Tensor, tail: Tensor, stats: Tensor,
                             temperature: float, normalize: str,
                             offsets: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. ``logits``.

    full:    ``scatter(g_k) - p sum_k g_k``
    support: ``scatter(g_k - s_k sum_k g_k)`` with ``s_k = exp(logp_k)`` (support softmax)
    tail:    ``g_tail (1[j outside] q_j - p_j)``, ``q = softmax over the columns outside``.
    (the sums over ``k`` run over the row's ids: its slots, or its CSR segment)
    """
    shape = logits.shape
    logits, tail, stats = as_rows(logits), as_flat(tail), as_rows(stats)
    grad_tail = as_flat(grad_tail)
    if offsets is not None:
        return grad_in_shape(_csr_logprobs_backward(grad_logp, grad_tail, logits, indices,
                                                    logp, tail, stats, temperature,
                                                    normalize, offsets), shape)
    indices, grad_logp, logp = as_rows(indices), as_rows(grad_logp), as_rows(logp)
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    grad = torch.empty_like(logits)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        idx, valid = _ids(indices, rows)
        g_k = torch.where(valid, grad_logp[rows].to(cdt), 0.0)
        zs, log_s = _shifted(z, stats[rows])
        p = torch.exp(zs - log_s)
        g = torch.zeros_like(z)
        if normalize == "full":
            g -= p * _row_sum(g_k, keepdim=True)
        else:
            s_k = torch.exp(logp[rows])  # 0 on unused slots
            g_k = g_k - s_k * _row_sum(g_k, keepdim=True)
        g.scatter_add_(1, idx, g_k)
        if grad_tail is not None:
            g_t = grad_tail[rows].to(cdt)[:, None]
            outside = ~_membership(z, idx, valid) & (z > -math.inf)
            q = torch.where(outside, torch.exp(zs - log_s - tail[rows, None]), 0.0)
            g += g_t * (q - p)
        grad[rows] = g / temperature if temperature != 1.0 else g
    return grad_in_shape(grad, shape)


# -------------------------------------------------------------------------------- sparse KL

def sparse_kl_forward(logits: Tensor, indices: Tensor, target_logprobs: Tensor,
                      temperature: float, with_tail: bool, offsets: Optional[Tensor] = None
                      ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(kl [...], student log tail [...], stats [..., 3])`` for ``logits [...,
    V]``, ``indices`` and ``target_logprobs [..., K]``.

    ``sum_k t_k (log t_k - log s_k) [+ t_tail (log t_tail - log s_tail)]`` with
    ``t_tail = max(1 - sum_k t_k, 0)``, ``s_tail`` the student mass outside the ids, and
    ``0 log 0 = 0``. CSR: ``offsets [N + 1]``, ``indices`` and ``target_logprobs [nnz]``.
    """
    lead = logits.shape[:-1]
    logits = as_rows(logits)
    if offsets is None:
        indices, target_logprobs = as_rows(indices), as_rows(target_logprobs)
        out = _padded_kl_forward(logits, indices, target_logprobs, temperature, with_tail)
    else:
        out = _csr_kl_forward(logits, indices, target_logprobs, temperature, with_tail,
                              offsets)
    kl, s_tail, stats = out
    return leading(kl, lead), leading(s_tail, lead), leading(stats, lead, 3)


def _padded_kl_forward(logits: Tensor, indices: Tensor, target_logprobs: Tensor,
                       temperature: float, with_tail: bool) -> Tuple[Tensor, Tensor, Tensor]:
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    kl = logits.new_empty(n, dtype=cdt)
    s_tail = logits.new_zeros(n, dtype=cdt)
    stats = logits.new_empty(n, 3, dtype=cdt)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        idx, valid = _ids(indices, rows)
        stats[rows] = _row_stats(z)
        t_log = target_logprobs[rows].to(cdt)
        t = torch.where(valid, torch.exp(t_log), 0.0)
        zs_k, log_s = _shifted(z.gather(1, idx), stats[rows])
        s_log = zs_k - log_s
        value = _row_sum(_xlogy0(t, t_log - s_log))
        if with_tail:
            member = _membership(z, idx, valid)
            s_tail[rows] = _log_tail(z, member, stats[rows])
            t_tail = (1.0 - _row_sum(t)).clamp_min(0.0)
            # ids covering every column: the tail bucket is empty and 1 - sum t_k is only the
            # rounding of the targets (it would meet s_tail = -inf and give inf)
            t_tail = torch.where(member.all(-1), 0.0, t_tail)
            value = value + _xlogy0(t_tail, torch.log(t_tail) - s_tail[rows])
        kl[rows] = value
    return kl, s_tail, stats


def sparse_kl_backward(grad_kl: Tensor, logits: Tensor, indices: Tensor,
                       target_logprobs: Tensor, s_tail: Tensor, stats: Tensor,
                       temperature: float, with_tail: bool,
                       offsets: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. ``logits``:
    ``g (p (sum_k t_k + t_tail) - scatter(t_k) - t_tail 1[j outside] q_j)``."""
    shape = logits.shape
    logits, grad_kl, s_tail = as_rows(logits), as_flat(grad_kl), as_flat(s_tail)
    stats = as_rows(stats)
    if offsets is not None:
        return grad_in_shape(_csr_kl_backward(grad_kl, logits, indices, target_logprobs,
                                              s_tail, stats, temperature, with_tail, offsets),
                             shape)
    indices, target_logprobs = as_rows(indices), as_rows(target_logprobs)
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    grad = torch.empty_like(logits)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        idx, valid = _ids(indices, rows)
        g_row = grad_kl[rows].to(cdt)[:, None]
        t = torch.where(valid, torch.exp(target_logprobs[rows].to(cdt)), 0.0)
        zs, log_s = _shifted(z, stats[rows])
        p = torch.exp(zs - log_s)
        mass = _row_sum(t, keepdim=True)
        g = torch.zeros_like(z)
        g.scatter_add_(1, idx, -t)
        if with_tail:
            member = _membership(z, idx, valid)
            t_tail = (1.0 - mass).clamp_min(0.0)
            t_tail = torch.where(member.all(-1, keepdim=True), 0.0, t_tail)  # as in forward
            outside = ~member & (z > -math.inf)
            q = torch.where(outside, torch.exp(zs - log_s - s_tail[rows, None]), 0.0)
            g -= t_tail * q
            mass = mass + t_tail
        g += p * mass
        g = g * g_row
        grad[rows] = g / temperature if temperature != 1.0 else g
    return grad_in_shape(grad, shape)


# ------------------------------------------------------------------------------ CSR supports
#
# Row r's ids are indices[offsets[r]:offsets[r + 1]] of a flat [nnz] array (vLLM's form).
# Every position gets its row from offsets (one searchsorted, no host sync); per-row sums are
# segment sums over offsets (torch.segment_reduce: one ordered sum per row, deterministic on
# every device), the membership bitmap a scatter at (row, id). Each row chunk looks at every
# position and keeps those of its rows (O(nnz) per chunk: a reference, not a kernel).
# Positions outside offsets[0] .. offsets[-1] belong to no row: their outputs are left as they
# are (a view of a larger CSR describes a chunk of rows).

def _csr_rows(offsets: Tensor, nnz: int) -> Tensor:
    """Row of each position ``0 .. nnz - 1``: ``r`` with ``offsets[r] <= p < offsets[r + 1]``
    (-1 before ``offsets[0]``, ``N`` from ``offsets[-1]`` on)."""
    pos = torch.arange(nnz, device=offsets.device, dtype=torch.int64)
    return torch.searchsorted(offsets.long(), pos, right=True) - 1


def _csr_chunk(indices: Tensor, prow: Tensor, rows: slice
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(local row, id, valid, in chunk)`` per position for the row chunk ``rows``: ids
    of unused slots (-1) and of positions outside the chunk are sent to column 0 of local
    row 0, with ``valid`` False."""
    inc = (prow >= rows.start) & (prow < rows.stop)
    lr = torch.where(inc, prow - rows.start, 0)
    idx = indices.long()
    valid = inc & (idx >= 0)
    return lr, torch.where(valid, idx, 0), valid, inc


def _seg_sum(x: Tensor, valid: Tensor, offsets: Tensor, rows: slice) -> Tensor:
    """Per row of the chunk ``rows``, the sum of ``x`` over its valid positions."""
    x = torch.where(valid, x, 0.0)
    return torch.segment_reduce(x, "sum", offsets=offsets, unsafe=True)[rows]


def _csr_membership(z: Tensor, lr: Tensor, idx: Tensor, valid: Tensor) -> Tensor:
    """Bool ``[rows, V]`` as :func:`_membership`, from the chunk's CSR positions."""
    member = torch.zeros(z.numel(), dtype=torch.int8, device=z.device)
    member.scatter_reduce_(0, lr * z.shape[1] + idx, valid.to(torch.int8), reduce="amax")
    return member.view(z.shape).bool()


def _csr_logprobs_forward(logits: Tensor, indices: Tensor, offsets: Tensor,
                          temperature: float, normalize: str, with_tail: bool,
                          out: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    logp = logits.new_full(indices.shape, -math.inf, dtype=cdt) if out is None else out
    tail = logits.new_zeros(n, dtype=cdt)
    stats = logits.new_empty(n, 3, dtype=cdt)
    prow = _csr_rows(offsets, indices.shape[0])
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        lr, idx, valid, inc = _csr_chunk(indices, prow, rows)
        st = stats[rows] = _row_stats(z)
        z_k = z[lr, idx].masked_fill(~valid, -math.inf)
        if normalize == "full":
            zs_k, log_s = _shifted(z_k[:, None], st[lr])  # per position: its row's (m, log s)
            values = (zs_k - log_s)[:, 0]
        else:  # logsumexp over the row's valid ids: the segment max, then a segment sum
            mk = torch.segment_reduce(z_k, "max", offsets=offsets, unsafe=True)[rows]
            mk = torch.where(mk == -math.inf, 0.0, mk)
            lse = mk + torch.log(_seg_sum(torch.exp(z_k - mk[lr]), valid, offsets, rows))
            values = z_k - lse[lr]
        logp.copy_(torch.where(inc, torch.where(valid, values, -math.inf), logp))
        if with_tail:
            tail[rows] = _log_tail(z, _csr_membership(z, lr, idx, valid), st)
    return logp, tail, stats


def _csr_logprobs_backward(grad_logp: Tensor, grad_tail: Optional[Tensor], logits: Tensor,
                           indices: Tensor, logp: Tensor, tail: Tensor, stats: Tensor,
                           temperature: float, normalize: str, offsets: Tensor) -> Tensor:
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    grad = torch.empty_like(logits)
    prow = _csr_rows(offsets, indices.shape[0])
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        lr, idx, valid, _ = _csr_chunk(indices, prow, rows)
        g_k = torch.where(valid, grad_logp.to(cdt), 0.0)
        zs, log_s = _shifted(z, stats[rows])
        p = torch.exp(zs - log_s)
        g = torch.zeros_like(z)
        total = _seg_sum(g_k, valid, offsets, rows)
        if normalize == "full":
            g -= p * total[:, None]
        else:
            s_k = torch.where(valid, torch.exp(logp.to(cdt)), 0.0)
            g_k = g_k - s_k * total[lr]
        g.view(-1).index_add_(0, lr * vocab + idx, torch.where(valid, g_k, 0.0))
        if grad_tail is not None:
            g_t = grad_tail[rows].to(cdt)[:, None]
            outside = ~_csr_membership(z, lr, idx, valid) & (z > -math.inf)
            q = torch.where(outside, torch.exp(zs - log_s - tail[rows, None]), 0.0)
            g += g_t * (q - p)
        grad[rows] = g / temperature if temperature != 1.0 else g
    return grad


def _csr_kl_forward(logits: Tensor, indices: Tensor, target_logprobs: Tensor,
                    temperature: float, with_tail: bool, offsets: Tensor
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    kl = logits.new_empty(n, dtype=cdt)
    s_tail = logits.new_zeros(n, dtype=cdt)
    stats = logits.new_empty(n, 3, dtype=cdt)
    prow = _csr_rows(offsets, indices.shape[0])
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        lr, idx, valid, _ = _csr_chunk(indices, prow, rows)
        st = stats[rows] = _row_stats(z)
        t_log = target_logprobs.to(cdt)
        t = torch.where(valid, torch.exp(t_log), 0.0)
        zs_k, log_s = _shifted(z[lr, idx][:, None], st[lr])
        s_log = (zs_k - log_s)[:, 0]
        value = _seg_sum(_xlogy0(t, t_log - s_log), valid, offsets, rows)
        if with_tail:
            member = _csr_membership(z, lr, idx, valid)
            s_tail[rows] = _log_tail(z, member, st)
            t_tail = (1.0 - _seg_sum(t, valid, offsets, rows)).clamp_min(0.0)
            t_tail = torch.where(member.all(-1), 0.0, t_tail)  # as the padded form
            value = value + _xlogy0(t_tail, torch.log(t_tail) - s_tail[rows])
        kl[rows] = value
    return kl, s_tail, stats


def _csr_kl_backward(grad_kl: Tensor, logits: Tensor, indices: Tensor,
                     target_logprobs: Tensor, s_tail: Tensor, stats: Tensor,
                     temperature: float, with_tail: bool, offsets: Tensor) -> Tensor:
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    grad = torch.empty_like(logits)
    prow = _csr_rows(offsets, indices.shape[0])
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        lr, idx, valid, _ = _csr_chunk(indices, prow, rows)
        g_row = grad_kl[rows].to(cdt)[:, None]
        t = torch.where(valid, torch.exp(target_logprobs.to(cdt)), 0.0)
        zs, log_s = _shifted(z, stats[rows])
        p = torch.exp(zs - log_s)
        mass = _seg_sum(t, valid, offsets, rows)[:, None]
        g = torch.zeros_like(z)
        g.view(-1).index_add_(0, lr * vocab + idx, -t)
        if with_tail:
            member = _csr_membership(z, lr, idx, valid)
            t_tail = (1.0 - mass).clamp_min(0.0)
            t_tail = torch.where(member.all(-1, keepdim=True), 0.0, t_tail)
            outside = ~member & (z > -math.inf)
            q = torch.where(outside, torch.exp(zs - log_s - s_tail[rows, None]), 0.0)
            g -= t_tail * q
            mass = mass + t_tail
        g += p * mass
        g = g * g_row
        grad[rows] = g / temperature if temperature != 1.0 else g
    return grad


# ------------------------------------------------------------------------- sampling support

def sampling_support(logits: Tensor, top_k: Optional[int], top_p: Optional[float],
                     temperature: float) -> Tensor:
    """Ids a top-k then top-p sampler can emit, ``[N, K]`` int64 padded with -1.

    Ranked by decreasing ``z`` (ties: increasing id, a stable sort); an id survives top-p iff
    the renormalized probability mass ranked above it is ``< top_p``.
    """
    n, vocab = logits.shape
    width = vocab if top_k is None else min(top_k, vocab)
    chunks = []
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        vals, order = torch.sort(z, dim=-1, descending=True, stable=True)
        vals, order = vals[:, :width], order[:, :width]
        keep = vals > -math.inf
        # top_p = 1 keeps every id of non-zero probability (every finite logit), as vLLM and
        # HF do; the fp32 running sum below can reach 1.0 early on peaked rows and would drop
        # ids of tiny but non-zero probability
        if top_p is not None and top_p < 1.0:
            probs = torch.softmax(vals, dim=-1)
            mass_above = torch.cumsum(probs, dim=-1) - probs
            keep &= mass_above < top_p
        ids = torch.where(keep, order, -1)
        if top_k is None:
            # top-p alone: keep only the widest support of the chunk (a host sync, documented),
            # so that no [N, V] id tensor is ever held
            ids = ids[:, :max(int(keep.sum(-1).max()), 1)]
        chunks.append(ids)
    width = max((c.shape[1] for c in chunks), default=1) if top_k is None else width
    out = torch.full((n, width), -1, dtype=torch.int64, device=logits.device)
    start = 0
    for c in chunks:
        out[start:start + c.shape[0], :c.shape[1]] = c
        start += c.shape[0]
    return out
