"""Reference kernels of the vocabulary ops (logits in), readable and row-chunked.

The eager ops' kernels take the public shapes (``ND_ROWS``): logits ``[..., V]`` (``[N, V]``
too, as the custom ops pass them), per-row inputs ``[...]``, and return per-row outputs
``[...]`` and gradients in the inputs' shapes; inside, every function works on the ``[N, V]``
rows, on row chunks of about ``CHUNK_ELEMENTS`` logits, in fp32 (fp64 for fp64 inputs). With
``z = logits / T``, ``p = softmax(z)`` and the saved per-row statistics
``stats = (m, log s, sum p (z - m))`` with ``m = max(z)`` and ``s = sum exp(z - m)`` (so
``lse = m + log s``; the third column is what a one-pass backward needs besides ``p``, here
``sum p (z - m)`` for the entropy, 0 when not computed; see each op):

* log-prob of token ``y``:      ``z_y - lse``;          d/dz = ``onehot(y) - p``
* entropy:                      ``lse - sum(p z)``;     d/dz = ``-p (z - sum(p z))``
* every gradient w.r.t. logits carries the ``1/T`` factor and has the dtype of the logits.

Why ``(m, log s)`` rather than one fp32 ``lse``: ``log p = (z - m) - log s`` keeps the
precision that ``z - lse`` loses when ``|lse|`` is large (an fp32 ``lse`` of 30 is only known
to 2e-6), so backward recomputes ``p`` to within the rounding of fp32.

Terms ``p * x`` are taken as 0 where ``p == 0`` so that ``-inf`` columns (masked vocabulary)
contribute nothing instead of ``0 * -inf = nan``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import as_flat, as_rows, compute_dtype, grad_in_shape, leading, row_chunks

Tensor = torch.Tensor

# the eager ops' kernels take the public shapes: rlkernels.ops._table skips its maps and views
ND_ROWS = True


def _scaled(logits: Tensor, rows: slice, temperature: float) -> Tensor:
    """``logits[rows] / T`` in the compute dtype (a chunk-sized temporary)."""
    z = logits[rows].to(compute_dtype(logits.dtype))
    return z / temperature if temperature != 1.0 else z


def _xlogy0(p: Tensor, x: Tensor) -> Tensor:
    """``p * x`` with the convention ``0 * anything = 0`` (a NaN ``p`` stays NaN)."""
    return torch.where(p == 0, torch.zeros((), dtype=p.dtype, device=p.device), p * x)


def _row_sum(x: Tensor, keepdim: bool = False) -> Tensor:
    """Sum over the last dim of ``x [rows, L]`` in an order that does not depend on ``rows``.

    On CPU, a reduction with a single output element is split across threads (a two-pass
    reduction), so a lone row would be summed in another order than the same row inside a
    batch. Reducing a broadcast 2-row view keeps the serial per-row order (batch invariance,
    SPEC section 1); it allocates nothing.
    """
    if x.shape[0] == 1 and x.device.type == "cpu":
        return x.expand(2, *x.shape[1:]).sum(-1, keepdim=keepdim)[:1]
    return x.sum(-1, keepdim=keepdim)


def _row_lse(x: Tensor, keepdim: bool = False) -> Tensor:
    """``logsumexp`` over the last dim, batch-invariant like :func:`_row_sum`."""
    if x.shape[0] == 1 and x.device.type == "cpu":
        return torch.logsumexp(x.expand(2, *x.shape[1:]), dim=-1, keepdim=keepdim)[:1]
    return torch.logsumexp(x, dim=-1, keepdim=keepdim)


def _softmax_stats(z: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row ``stats`` and entropy, computed on max-shifted logits for accuracy.

    ``lse - sum(p z) = log(sum exp(z - m)) - sum(p (z - m))``: shifting by the row max ``m``
    keeps the entropy exact on peaked rows, where ``lse`` and ``sum(p z)`` nearly cancel.
    """
    stats = _row_stats(z)
    zs, log_s = _shifted(z, stats)
    p = torch.exp(zs - log_s)
    stats[:, 2] = _row_sum(_xlogy0(p, zs))
    return stats, log_s[:, 0] - stats[:, 2]


def _max_and_log_rest(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(m, log s)`` with ``m = max(x)`` and ``log s = log sum exp(x - m)`` per row.

    ``s = 1 + rest`` where ``rest`` sums every column but one arg-max; ``log s =
    log1p(rest)`` keeps ``1 - p_max = -expm1(-log s)`` exact on peaked rows, where
    ``log(s)`` of an fp32 ``s ~ 1`` would round ``rest`` to a multiple of 1.2e-7.
    A row of only ``-inf`` gives ``m = -inf`` and ``log s = 0`` (an empty sum).
    """
    m = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - torch.where(m == -math.inf, 0.0, m))
    e.scatter_(1, e.argmax(dim=-1, keepdim=True), 0.0)
    return m, torch.log1p(_row_sum(e, keepdim=True))


def _row_stats(z: Tensor) -> Tensor:
    """``[rows, 3]``: the row max ``m``, ``log s = log sum exp(z - m)`` and 0 (the slot for an
    op's backward sum)."""
    m, log_s = _max_and_log_rest(z)
    return torch.cat([m, log_s, torch.zeros_like(m)], dim=-1)


def _shifted(z: Tensor, stats: Tensor) -> Tuple[Tensor, Tensor]:
    """``(z - m, log s)`` with ``log s`` as a ``[rows, 1]`` column: ``log p = zs - log s``.

    A row of only ``-inf`` (``m = -inf``) is shifted by 0: its probabilities are 0 and its
    log-probs ``-inf`` (SPEC: a ``-inf`` logit has log-prob ``-inf``), not NaN."""
    m = stats[:, :1]
    return z - torch.where(m == -math.inf, 0.0, m), stats[:, 1:2]


# --------------------------------------------------------------------- token log-probs / entropy

def token_logprobs_forward(logits: Tensor, tokens: Optional[Tensor], temperature: float,
                           ignore_index: int, with_entropy: bool
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp [...], entropy [...], stats [..., 3])`` for ``logits [..., V]`` and
    ``tokens [...]``.

    ``tokens=None`` computes entropy only (``logp`` is all zeros). Rows whose token equals
    ``ignore_index`` get 0 for both outputs; ``entropy`` is all zeros unless ``with_entropy``.
    """
    lead = logits.shape[:-1]
    logits, tokens = as_rows(logits), as_flat(tokens)
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    logp = logits.new_zeros(n, dtype=cdt)
    ent = logits.new_zeros(n, dtype=cdt)
    stats = logits.new_empty(n, 3, dtype=cdt)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        if with_entropy:
            stats[rows], ent[rows] = _softmax_stats(z)
        else:
            stats[rows] = _row_stats(z)
        if tokens is not None:
            tok = tokens[rows].long()
            valid = tok != ignore_index
            z_tok = z.gather(1, torch.where(valid, tok, 0)[:, None])
            zs_tok, log_s = _shifted(z_tok, stats[rows])
            logp[rows] = torch.where(valid, (zs_tok - log_s)[:, 0], 0.0)
            if with_entropy:
                ent[rows] = torch.where(valid, ent[rows], 0.0)
    return leading(logp, lead), leading(ent, lead), leading(stats, lead, 3)


def _token_logprobs_grad_chunk(z: Tensor, tok: Optional[Tensor], stats: Tensor,
                               g_logp: Optional[Tensor], g_ent: Optional[Tensor],
                               inside: Optional[Tensor] = None) -> Tensor:
    """``d loss / d z`` for one chunk (without the ``1/T`` factor).

    ``inside`` (bool ``[rows]``, default all True): rows whose token is one of the chunk's
    columns. Elsewhere (a vocabulary shard that does not hold the token, ``tok`` then 0)
    there is no one-hot term, only ``-g p``. The entropy term reads ``sum p (z - m)`` from
    ``stats[:, 2]`` (the forward's value, or the all-shard value under vocabulary
    parallelism)."""
    zs, log_s = _shifted(z, stats)
    p = torch.exp(zs - log_s)
    grad = torch.zeros_like(z)
    if g_logp is not None:
        grad -= g_logp[:, None] * p
        # the token's column: g (1 - p_y) = -g expm1(log p_y), not g - g p_y, which loses
        # every digit of 1 - p_y when the row is peaked on its token (p_y ~ 1)
        logp_y = zs.gather(1, tok[:, None]) - log_s
        tok_grad = -g_logp[:, None] * torch.expm1(logp_y)
        if inside is not None:
            tok_grad = torch.where(inside[:, None], tok_grad, grad.gather(1, tok[:, None]))
        grad.scatter_(1, tok[:, None], tok_grad)
    if g_ent is not None:
        # z - sum(p z) on max-shifted logits: exact where a peaked row makes both ~ max(z)
        sum_pz = stats[:, 2:3]
        grad -= g_ent[:, None] * _xlogy0(p, zs - sum_pz)
    return grad


def token_logprobs_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                            logits: Tensor, tokens: Optional[Tensor], stats: Tensor,
                            temperature: float, ignore_index: int,
                            out: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. ``logits`` (``out`` may be ``logits`` itself, for in-place backward).

    ``g (onehot(y) - p) - g_H p (z - sum(p z))``, times ``1/T``; rows whose token is
    ``ignore_index`` receive exactly 0. ``sum(p z)`` is read from ``stats[:, 2]`` (so the
    forward must have computed the entropy when ``grad_entropy`` is given). A token outside
    ``[0, V)`` that is not ``ignore_index`` (vocabulary parallelism: the token lies in another
    rank's shard, ``stats`` are the all-shard statistics) gives no one-hot term, only
    ``-g p``. Shapes as :func:`token_logprobs_forward`'s; the gradient has the shape of
    ``logits``.
    """
    shape = logits.shape
    logits, tokens, stats = as_rows(logits), as_flat(tokens), as_rows(stats)
    grad_logp, grad_entropy = as_flat(grad_logp), as_flat(grad_entropy)
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    grad = torch.empty_like(logits) if out is None else as_rows(out)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        tok = g_lp = g_h = inside = None
        if tokens is not None:
            tok = tokens[rows].long()
            valid = tok != ignore_index
            inside = valid & (tok >= 0) & (tok < vocab)
            tok = torch.where(inside, tok, 0)
        if grad_logp is not None:
            g_lp = grad_logp[rows].to(cdt)
            g_lp = torch.where(valid, g_lp, 0.0) if tokens is not None else g_lp
        if grad_entropy is not None:
            g_h = grad_entropy[rows].to(cdt)
            g_h = torch.where(valid, g_h, 0.0) if tokens is not None else g_h
        g = _token_logprobs_grad_chunk(z, tok, stats[rows], g_lp, g_h, inside)
        if tokens is not None:
            # exactly 0 on padding rows, even when their logits are -inf or NaN
            g = torch.where(valid[:, None], g, 0.0)
        grad[rows] = g / temperature if temperature != 1.0 else g
    return grad_in_shape(grad, shape, out)



# ------------------------------------------------------------------------------ KL divergence

def _kl_terms(logp: Tensor, logq: Tensor, kind: str, beta: float, need_grads: bool,
              saved: Optional[Tensor] = None):
    """Per-chunk ``(kl, dKL/dz, dKL/dw, sums)`` from ``log p = log softmax(z)``, ``log q``;
    ``sums [rows, 2]`` are the row sums a one-pass backward needs: ``sum p a_p`` and
    ``sum q a_q`` (``KL`` and 0 for reverse, 0 and ``KL`` for forward). Backward passes the
    ``sums`` saved by forward as ``saved`` (they are all-shard sums under vocabulary
    parallelism, where the chunk holds only this shard's columns).

    reverse ``KL(p||q)``: ``dz = p (log p - log q - KL)``, ``dw = q - p``
    forward ``KL(q||p)``: ``dz = p - q``,                  ``dw = q (log q - log p - KL)``
    jsd: ``beta KL(p||m) + (1-beta) KL(q||m)``: ``dz = p (a - sum(p a))`` with
    ``a = beta (log p - log m)``, and ``dw`` likewise with ``(1-beta) (log q - log m)``.
    alpha (``beta`` carries alpha) and tv: :func:`_fdiv_terms` (their ``sums`` differ).
    """
    p, q = logp.exp(), logq.exp()
    if kind in ("alpha", "tv"):
        return _fdiv_terms(logp, logq, p, q, kind, beta, need_grads, saved)
    if kind == "reverse":
        a_p = logp - logq
        kl = _row_sum(_xlogy0(p, a_p))
        sums = torch.stack([kl, torch.zeros_like(kl)], dim=-1)
        if not need_grads:
            return kl, None, None, sums
        return kl, _softmax_vjp(p, a_p, None if saved is None else saved[:, :1]), q - p, sums
    if kind == "forward":
        a_q = logq - logp
        kl = _row_sum(_xlogy0(q, a_q))
        sums = torch.stack([torch.zeros_like(kl), kl], dim=-1)
        if not need_grads:
            return kl, None, None, sums
        return kl, p - q, _softmax_vjp(q, a_q, None if saved is None else saved[:, 1:]), sums
    # m = beta p + (1 - beta) q, in log space so that tiny masses keep their precision
    logm = torch.logaddexp(logp + _log(beta), logq + _log(1.0 - beta))
    a_p, a_q = beta * (logp - logm), (1.0 - beta) * (logq - logm)
    sums = torch.stack([_row_sum(_xlogy0(p, a_p)), _row_sum(_xlogy0(q, a_q))], dim=-1)
    kl = sums[:, 0] + sums[:, 1]
    if not need_grads:
        return kl, None, None, sums
    if saved is None:
        saved = sums
    return kl, _softmax_vjp(p, a_p, saved[:, :1]), _softmax_vjp(q, a_q, saved[:, 1:]), sums


def _fdiv_terms(logp: Tensor, logq: Tensor, p: Tensor, q: Tensor, kind: str, a: float,
                need_grads: bool, saved: Optional[Tensor]):
    """:func:`_kl_terms` for the f-divergences ``kind="alpha"`` (``a`` strictly inside
    ``(0, 1)``) and ``kind="tv"`` (docs/math.md, "f-divergences: alpha and total variation").

    alpha, ``r = p^a q^(1-a)``, ``D = (1 - sum r) / (a (1 - a))``: summed per column as the
    nonnegative ``(a p + (1-a) q - r) / (a (1 - a))`` (weighted AM-GM; the row total is the
    same since ``sum p = sum q = 1``), which keeps every digit as ``a -> 0`` or ``1`` where
    ``sum (p - r)`` would cancel. ``sums = (D, 0)``; with ``S = 1 - a (1-a) D``:
    ``dz = (p S - r) / (1-a) = (p - r) / (1-a) - a p D``,
    ``dw = (q S - r) / a = (q - r) / a - (1-a) q D``.

    tv, ``s = sign(p - q)``, ``D = 0.5 sum |p - q|``: ``sums = (0.5 sum p s, -0.5 sum q s)``
    (their sum is ``D``; each is what one gradient needs, and both add over vocabulary
    shards, so the backward stays local under vocabulary parallelism):
    ``dz = 0.5 p (s - sum p s)``, ``dw = -0.5 q (s - sum q s)``.
    """
    if kind == "tv":
        s = torch.sign(p - q)
        sums = torch.stack([0.5 * _row_sum(p * s), -0.5 * _row_sum(q * s)], dim=-1)
        kl = 0.5 * _row_sum((p - q).abs())
        if not need_grads:
            return kl, None, None, sums
        if saved is None:
            saved = sums
        return kl, 0.5 * p * s - p * saved[:, :1], -0.5 * q * s - q * saved[:, 1:], sums
    b = 1.0 - a
    # the expm1 form is taken around the larger weight's distribution (u below), where the
    # small exponent b (log v - log u) keeps the digits of the AM-GM gap
    if a >= 0.5:
        t = b * (q - p) - _pow_gap(p, logp, logq, b)
    else:
        t = a * (p - q) - _pow_gap(q, logq, logp, a)
    kl = _row_sum(t) / (a * b)
    sums = torch.stack([kl, torch.zeros_like(kl)], dim=-1)
    if not need_grads:
        return kl, None, None, sums
    d = (sums if saved is None else saved).sum(-1, keepdim=True)
    d_z = -_pow_gap(p, logp, logq, b) / b - a * p * d
    d_w = -_pow_gap(q, logq, logp, a) / a - b * q * d
    return kl, d_z, d_w, sums


def _pow_gap(u: Tensor, logu: Tensor, logv: Tensor, b: float) -> Tensor:
    """``u^(1-b) v^b - u`` without cancellation: ``u expm1(b (log v - log u))`` while the
    exponent is <= 1 (small ``b`` or ``v ~ u``), the plain difference above (there
    ``u^(1-b) v^b > e u``, and ``expm1`` could overflow where ``u`` underflows). Columns where
    ``u`` is 0 give 0 (with ``v`` 0 too: ``log v - log u`` is NaN, the second branch)."""
    e = b * (logv - logu)
    r = torch.exp((1.0 - b) * logu + b * logv)
    return torch.where(e <= 1.0, u * torch.expm1(e), r - u)


def _softmax_vjp(r: Tensor, a: Tensor, sum_ra: Optional[Tensor] = None) -> Tensor:
    """``r (a - sum(r a))``: the gradient w.r.t. ``x`` of a loss with ``dL/d log r = a``
    through ``r = softmax(x)``, with ``0 * a = 0`` where ``r == 0``; ``sum_ra [rows, 1]``
    is the row sum when known (saved by forward), else it is summed here."""
    ra = _xlogy0(r, a)
    return ra - r * (_row_sum(ra, keepdim=True) if sum_ra is None else sum_ra)


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def kl_divergence_forward(logits: Tensor, ref_logits: Tensor, ignore_mask: Optional[Tensor],
                          kind: str, beta: float, temperature: float
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(kl [...], stats_p [..., 3], stats_q [..., 3])`` for logits ``[..., V]``;
    ``ignore_mask`` (``[...]``) rows give 0.

    The third columns hold ``sum p a_p`` and ``sum q a_q`` of :func:`_kl_terms` (alpha:
    ``D`` and 0; tv: ``0.5 sum p s`` and ``-0.5 sum q s``, see :func:`_fdiv_terms`): their
    sum is the divergence for every kind. ``kind="alpha"``: ``beta`` carries alpha, strictly
    inside ``(0, 1)`` (the ops layer maps 0 and 1 to ``"forward"`` and ``"reverse"``)."""
    return _kl_forward(logits, ref_logits, ignore_mask, None, None, kind, beta, temperature)


def kl_divergence_partial_forward(logits: Tensor, ref_logits: Tensor,
                                  ignore_mask: Optional[Tensor], stats_p: Tensor,
                                  stats_q: Tensor, kind: str, beta: float, temperature: float
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`kl_divergence_forward` with the softmax statistics given: ``log p = (z - M) -
    log s`` from columns 0 and 1 of ``stats_p`` (``stats_q`` for ``q``) instead of this
    tensor's own. Vocabulary parallelism: with the all-shard statistics, the outputs are this
    shard's part of the KL sums (its columns' terms), summed over shards by the caller."""
    return _kl_forward(logits, ref_logits, ignore_mask, stats_p, stats_q, kind, beta,
                       temperature)


def _kl_forward(logits, ref_logits, ignore_mask, given_p, given_q, kind, beta, temperature):
    lead = logits.shape[:-1]
    logits, ref_logits, ignore_mask = as_rows(logits), as_rows(ref_logits), as_flat(ignore_mask)
    given_p, given_q = as_rows(given_p), as_rows(given_q)
    n, vocab = logits.shape
    cdt = compute_dtype(logits.dtype)
    kl = logits.new_empty(n, dtype=cdt)
    stats_p = logits.new_empty(n, 3, dtype=cdt)
    stats_q = logits.new_empty(n, 3, dtype=cdt)
    for rows in row_chunks(n, vocab):
        z = _scaled(logits, rows, temperature)
        w = _scaled(ref_logits, rows, temperature)
        if given_p is None:
            stats_p[rows], stats_q[rows] = _row_stats(z), _row_stats(w)
        else:
            stats_p[rows], stats_q[rows] = given_p[rows].to(cdt), given_q[rows].to(cdt)
        logp, logq = _log_softmax(z, stats_p[rows]), _log_softmax(w, stats_q[rows])
        kl[rows], _, _, sums = _kl_terms(logp, logq, kind, beta, False)
        stats_p[rows, 2], stats_q[rows, 2] = sums[:, 0], sums[:, 1]
    if ignore_mask is not None:
        kl = torch.where(ignore_mask, 0.0, kl)
    return leading(kl, lead), leading(stats_p, lead, 3), leading(stats_q, lead, 3)


def _log_softmax(z: Tensor, stats: Tensor) -> Tensor:
    zs, log_s = _shifted(z, stats)
    return zs - log_s


def kl_divergence_backward(grad_kl: Tensor, logits: Tensor, ref_logits: Tensor,
                           ignore_mask: Optional[Tensor], stats_p: Tensor, stats_q: Tensor,
                           kind: str, beta: float, temperature: float, need_ref_grad: bool
                           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``logits`` and (if ``need_ref_grad``) ``ref_logits``, recomputing
    both softmaxes from the saved row statistics and reading the saved sums ``sum p a_p``,
    ``sum q a_q`` from their third columns (formulas in :func:`_kl_terms`), times ``1/T``;
    ``ignore_mask`` rows receive exactly 0. Shapes as :func:`kl_divergence_forward`'s; the
    gradients have the inputs' shapes."""
    shape, ref_shape = logits.shape, ref_logits.shape
    logits, ref_logits, ignore_mask = as_rows(logits), as_rows(ref_logits), as_flat(ignore_mask)
    stats_p, stats_q, grad_kl = as_rows(stats_p), as_rows(stats_q), as_flat(grad_kl)
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
        logp, logq = _log_softmax(z, stats_p[rows]), _log_softmax(w, stats_q[rows])
        saved = torch.stack([stats_p[rows, 2], stats_q[rows, 2]], dim=-1).to(logp.dtype)
        _, d_z, d_w, _ = _kl_terms(logp, logq, kind, beta, True, saved)
        g = g_all[rows, None] / temperature
        keep = None if ignore_mask is None else ~ignore_mask[rows, None]
        # where(): exactly 0 on ignored rows, even when their logits are -inf or NaN
        grad_z[rows] = g * d_z if keep is None else torch.where(keep, g * d_z, 0.0)
        if grad_w is not None:
            grad_w[rows] = g * d_w if keep is None else torch.where(keep, g * d_w, 0.0)
    return (grad_in_shape(grad_z, shape),
            None if grad_w is None else grad_in_shape(grad_w, ref_shape))
