"""Reference kernels of the vocabulary ops (logits in), readable and row-chunked.

Every function takes 2-d ``[N, V]`` logits (the public layer flattens leading dims) and works
on row chunks of about ``CHUNK_ELEMENTS`` logits, in fp32 (fp64 for fp64 inputs). With
``z = logits / T``, ``lse = logsumexp(z)`` and ``p = softmax(z)``:

* log-prob of token ``y``:      ``z_y - lse``;          d/dz = ``onehot(y) - p``
* entropy:                      ``lse - sum(p z)``;     d/dz = ``-p (z - sum(p z))``
* every gradient w.r.t. logits carries the ``1/T`` factor and has the dtype of the logits.

Terms ``p * x`` are taken as 0 where ``p == 0`` so that ``-inf`` columns (masked vocabulary)
contribute nothing instead of ``0 * -inf = nan``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import compute_dtype, row_chunks

Tensor = torch.Tensor


def _scaled(logits: Tensor, rows: slice, temperature: float) -> Tensor:
    """``logits[rows] / T`` in the compute dtype (a chunk-sized temporary)."""
    z = logits[rows].to(compute_dtype(logits.dtype))
    return z / temperature if temperature != 1.0 else z


def _xlogy0(p: Tensor, x: Tensor) -> Tensor:
    """``p * x`` with the convention ``0 * anything = 0``."""
    return torch.where(p > 0, p * x, torch.zeros((), dtype=p.dtype, device=p.device))


def _softmax_stats(z: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row ``lse`` and ``sum(p z)`` computed on max-shifted logits for accuracy.

    ``lse - sum(p z) = log(sum exp(z - m)) - sum(p (z - m))``: shifting by the row max ``m``
    keeps the entropy exact on peaked rows, where ``lse`` and ``sum(p z)`` nearly cancel.
    """
    m = z.amax(dim=-1, keepdim=True)
    zs = z - m
    lse_s = torch.logsumexp(zs, dim=-1, keepdim=True)
    p = torch.exp(zs - lse_s)
    entropy = lse_s[:, 0] - _xlogy0(p, zs).sum(-1)
    return (lse_s + m)[:, 0], entropy


# --------------------------------------------------------------------- token log-probs / entropy

def token_logprobs_forward(logits: Tensor, tokens: Optional[Tensor], temperature: float,
                           ignore_index: int, with_entropy: bool
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp [N], entropy [N], lse [N])``.

    ``tokens=None`` computes entropy only (``logp`` is all zeros). Rows whose token equals
    ``ignore_index`` get 0 for both outputs; ``entropy`` is all zeros unless ``with_entropy``.
    """
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    logp = logits.new_zeros(n, dtype=cdt)
    ent = logits.new_zeros(n, dtype=cdt)
    lse = logits.new_empty(n, dtype=cdt)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        if with_entropy:
            lse[rows], ent[rows] = _softmax_stats(z)
        else:
            lse[rows] = torch.logsumexp(z, dim=-1)
        if tokens is not None:
            tok = tokens[rows].long()
            valid = tok != ignore_index
            z_tok = z.gather(1, torch.where(valid, tok, 0)[:, None])[:, 0]
            logp[rows] = torch.where(valid, z_tok - lse[rows], 0.0)
            if with_entropy:
                ent[rows] = torch.where(valid, ent[rows], 0.0)
    return logp, ent, lse


def _token_logprobs_grad_chunk(z: Tensor, tok: Optional[Tensor], lse: Tensor,
                               g_logp: Optional[Tensor], g_ent: Optional[Tensor]) -> Tensor:
    """``d loss / d z`` for one chunk (without the ``1/T`` factor)."""
    p = torch.exp(z - lse[:, None])
    grad = torch.zeros_like(z)
    if g_logp is not None:
        grad -= g_logp[:, None] * p
        grad.scatter_add_(1, tok[:, None], g_logp[:, None])
    if g_ent is not None:
        sum_pz = _xlogy0(p, z).sum(-1, keepdim=True)
        grad -= g_ent[:, None] * _xlogy0(p, z - sum_pz)
    return grad


def token_logprobs_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                            logits: Tensor, tokens: Optional[Tensor], lse: Tensor,
                            temperature: float, ignore_index: int,
                            out: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. ``logits`` (``out`` may be ``logits`` itself, for in-place backward).

    ``g (onehot(y) - p) - g_H p (z - sum(p z))``, times ``1/T``; rows whose token is
    ``ignore_index`` receive exactly 0.
    """
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    grad = torch.empty_like(logits) if out is None else out
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        tok = g_lp = g_h = None
        if tokens is not None:
            tok = tokens[rows].long()
            valid = tok != ignore_index
            tok = torch.where(valid, tok, 0)
        if grad_logp is not None:
            g_lp = grad_logp[rows].to(cdt)
            g_lp = torch.where(valid, g_lp, 0.0) if tokens is not None else g_lp
        if grad_entropy is not None:
            g_h = grad_entropy[rows].to(cdt)
            g_h = torch.where(valid, g_h, 0.0) if tokens is not None else g_h
        g = _token_logprobs_grad_chunk(z, tok, lse[rows], g_lp, g_h)
        grad[rows] = g / temperature if temperature != 1.0 else g
    return grad


# --------------------------------------------------------------------------- sparse log-probs

def _membership(z: Tensor, idx: Tensor, valid: Tensor) -> Tensor:
    """Bool ``[rows, V]``: column j is one of the row's valid ids (duplicates allowed)."""
    member = torch.zeros(z.shape, dtype=torch.int8, device=z.device)
    # amax, not a plain scatter: an unused slot (-1, sent to column 0) must not erase a
    # valid id 0 that another slot of the same row wrote.
    member.scatter_reduce_(1, idx, valid.to(torch.int8), reduce="amax")
    return member.bool()


def _log_tail(z: Tensor, member: Tensor, lse: Tensor) -> Tensor:
    """log of the probability mass outside the ids: ``logsumexp(z[not member]) - lse``."""
    outside = z.masked_fill(member, -math.inf)
    return torch.logsumexp(outside, dim=-1) - lse


def sparse_logprobs_forward(logits: Tensor, indices: Tensor, temperature: float,
                            normalize: str, with_tail: bool
                            ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp [N, K], tail [N], lse [N])``.

    ``normalize="full"``: ``z_k - lse``; ``"support"``: ``z_k - logsumexp_{valid k} z_k``.
    Slots with id -1 give ``-inf``. ``tail`` (only when ``with_tail``) is the log of the
    full-vocabulary probability mass outside the valid ids, whatever ``normalize`` is.
    """
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    logp = logits.new_empty(indices.shape, dtype=cdt)
    tail = logits.new_zeros(n, dtype=cdt)
    lse = logits.new_empty(n, dtype=cdt)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        idx = indices[rows].long()
        valid = idx >= 0
        idx = torch.where(valid, idx, 0)
        lse[rows] = torch.logsumexp(z, dim=-1)
        z_k = z.gather(1, idx).masked_fill(~valid, -math.inf)
        if normalize == "full":
            norm = lse[rows]
        else:
            norm = torch.logsumexp(z_k, dim=-1)
        logp[rows] = torch.where(valid, z_k - norm[:, None], -math.inf)
        if with_tail:
            tail[rows] = _log_tail(z, _membership(z, idx, valid), lse[rows])
    return logp, tail, lse


def sparse_logprobs_backward(grad_logp: Tensor, grad_tail: Optional[Tensor], logits: Tensor,
                             indices: Tensor, logp: Tensor, tail: Tensor, lse: Tensor,
                             temperature: float, normalize: str) -> Tensor:
    """Gradient w.r.t. ``logits``.

    full:    ``scatter(g_k) - p sum_k g_k``
    support: ``scatter(g_k - s_k sum_k g_k)`` with ``s_k = exp(logp_k)`` (support softmax)
    tail:    ``g_tail (1[j outside] q_j - p_j)``, ``q = softmax over the columns outside``.
    """
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    grad = torch.empty_like(logits)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        idx = indices[rows].long()
        valid = idx >= 0
        idx = torch.where(valid, idx, 0)
        g_k = torch.where(valid, grad_logp[rows].to(cdt), 0.0)
        p = torch.exp(z - lse[rows, None])
        g = torch.zeros_like(z)
        if normalize == "full":
            g -= p * g_k.sum(-1, keepdim=True)
        else:
            s_k = torch.exp(logp[rows])  # 0 on unused slots
            g_k = g_k - s_k * g_k.sum(-1, keepdim=True)
        g.scatter_add_(1, idx, g_k)
        if grad_tail is not None:
            g_t = grad_tail[rows].to(cdt)[:, None]
            outside = ~_membership(z, idx, valid) & (z > -math.inf)
            q = torch.where(outside, torch.exp(z - lse[rows, None] - tail[rows, None]), 0.0)
            g += g_t * (q - p)
        grad[rows] = g / temperature if temperature != 1.0 else g
    return grad


# -------------------------------------------------------------------------------- sparse KL

def sparse_kl_forward(logits: Tensor, indices: Tensor, target_logprobs: Tensor,
                      temperature: float, with_tail: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(kl [N], student log tail [N], lse [N])``.

    ``sum_k t_k (log t_k - log s_k) [+ t_tail (log t_tail - log s_tail)]`` with
    ``t_tail = max(1 - sum_k t_k, 0)``, ``s_tail`` the student mass outside the ids, and
    ``0 log 0 = 0``.
    """
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    kl = logits.new_empty(n, dtype=cdt)
    s_tail = logits.new_zeros(n, dtype=cdt)
    lse = logits.new_empty(n, dtype=cdt)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        idx = indices[rows].long()
        valid = idx >= 0
        idx = torch.where(valid, idx, 0)
        lse[rows] = torch.logsumexp(z, dim=-1)
        t_log = target_logprobs[rows].to(cdt)
        t = torch.where(valid, torch.exp(t_log), 0.0)
        s_log = z.gather(1, idx) - lse[rows, None]
        value = _xlogy0(t, t_log - s_log).sum(-1)
        if with_tail:
            s_tail[rows] = _log_tail(z, _membership(z, idx, valid), lse[rows])
            t_tail = (1.0 - t.sum(-1)).clamp_min(0.0)
            value = value + _xlogy0(t_tail, torch.log(t_tail) - s_tail[rows])
        kl[rows] = value
    return kl, s_tail, lse


def sparse_kl_backward(grad_kl: Tensor, logits: Tensor, indices: Tensor,
                       target_logprobs: Tensor, s_tail: Tensor, lse: Tensor,
                       temperature: float, with_tail: bool) -> Tensor:
    """Gradient w.r.t. ``logits``:
    ``g (p (sum_k t_k + t_tail) - scatter(t_k) - t_tail 1[j outside] q_j)``."""
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    grad = torch.empty_like(logits)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        idx = indices[rows].long()
        valid = idx >= 0
        idx = torch.where(valid, idx, 0)
        g_row = grad_kl[rows].to(cdt)[:, None]
        t = torch.where(valid, torch.exp(target_logprobs[rows].to(cdt)), 0.0)
        p = torch.exp(z - lse[rows, None])
        mass = t.sum(-1, keepdim=True)
        g = torch.zeros_like(z)
        g.scatter_add_(1, idx, -t)
        if with_tail:
            t_tail = (1.0 - mass).clamp_min(0.0)
            outside = ~_membership(z, idx, valid) & (z > -math.inf)
            q = torch.where(outside, torch.exp(z - lse[rows, None] - s_tail[rows, None]), 0.0)
            g -= t_tail * q
            mass = mass + t_tail
        g += p * mass
        g = g * g_row
        grad[rows] = g / temperature if temperature != 1.0 else g
    return grad


# ------------------------------------------------------------------------------ KL divergence

def _kl_terms(logp: Tensor, logq: Tensor, kind: str, beta: float, need_grads: bool):
    """Per-chunk ``(kl, dKL/dz, dKL/dw)`` from ``log p = log softmax(z)``, ``log q``.

    reverse ``KL(p||q)``: ``dz = p (log p - log q - KL)``, ``dw = q - p``
    forward ``KL(q||p)``: ``dz = p - q``,                  ``dw = q (log q - log p - KL)``
    jsd: ``beta KL(p||m) + (1-beta) KL(q||m)``: ``dz = p (a - sum(p a))`` with
    ``a = beta (log p - log m)``, and ``dw`` likewise with ``(1-beta) (log q - log m)``.
    """
    p, q = logp.exp(), logq.exp()
    if kind == "reverse":
        kl = _xlogy0(p, logp - logq).sum(-1)
        if not need_grads:
            return kl, None, None
        return kl, _softmax_vjp(p, logp - logq), q - p
    if kind == "forward":
        kl = _xlogy0(q, logq - logp).sum(-1)
        if not need_grads:
            return kl, None, None
        return kl, p - q, _softmax_vjp(q, logq - logp)
    # m = beta p + (1 - beta) q, in log space so that tiny masses keep their precision
    logm = torch.logaddexp(logp + _log(beta), logq + _log(1.0 - beta))
    a_p, a_q = beta * (logp - logm), (1.0 - beta) * (logq - logm)
    kl = _xlogy0(p, a_p).sum(-1) + _xlogy0(q, a_q).sum(-1)
    if not need_grads:
        return kl, None, None
    return kl, _softmax_vjp(p, a_p), _softmax_vjp(q, a_q)


def _softmax_vjp(r: Tensor, a: Tensor) -> Tensor:
    """``r (a - sum(r a))``: the gradient w.r.t. ``x`` of a loss with ``dL/d log r = a``
    through ``r = softmax(x)``, with ``0 * a = 0`` where ``r == 0``."""
    ra = _xlogy0(r, a)
    return ra - r * ra.sum(-1, keepdim=True)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def kl_divergence_forward(logits: Tensor, ref_logits: Tensor, ignore_mask: Optional[Tensor],
                          kind: str, beta: float, temperature: float
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(kl [N], lse_p [N], lse_q [N])``; rows with ``ignore_mask`` give 0."""
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    kl = logits.new_empty(n, dtype=cdt)
    lse_p = logits.new_empty(n, dtype=cdt)
    lse_q = logits.new_empty(n, dtype=cdt)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        w = _scaled(ref_logits, rows, temperature)
        lse_p[rows] = torch.logsumexp(z, dim=-1)
        lse_q[rows] = torch.logsumexp(w, dim=-1)
        logp, logq = z - lse_p[rows, None], w - lse_q[rows, None]
        kl[rows] = _kl_terms(logp, logq, kind, beta, False)[0]
    if ignore_mask is not None:
        kl = torch.where(ignore_mask, 0.0, kl)
    return kl, lse_p, lse_q


def kl_divergence_backward(grad_kl: Tensor, logits: Tensor, ref_logits: Tensor,
                           ignore_mask: Optional[Tensor], lse_p: Tensor, lse_q: Tensor,
                           kind: str, beta: float, temperature: float, need_ref_grad: bool
                           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``logits`` and (if ``need_ref_grad``) ``ref_logits``, recomputing
    both softmaxes from the saved log-sum-exps (formulas in :func:`_kl_terms`), times
    ``1/T``; ``ignore_mask`` rows receive exactly 0."""
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    g_all = grad_kl.to(cdt)
    if ignore_mask is not None:
        g_all = torch.where(ignore_mask, 0.0, g_all)
    grad_z = torch.empty_like(logits)
    grad_w = torch.empty_like(ref_logits) if need_ref_grad else None
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        w = _scaled(ref_logits, rows, temperature)
        logp, logq = z - lse_p[rows, None], w - lse_q[rows, None]
        _, d_z, d_w = _kl_terms(logp, logq, kind, beta, True)
        g = g_all[rows, None] / temperature
        grad_z[rows] = g * d_z
        if grad_w is not None:
            grad_w[rows] = g * d_w
    return grad_z, grad_w



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
        if top_p is not None:
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
