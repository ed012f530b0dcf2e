"""Triton kernels of the vocabulary ops: ``token_logprobs`` (with entropy) and
``kl_divergence``. Same launcher signatures, outputs and row statistics as
:mod:`rlkernels.reference.vocab`, which states the math; this file states how it is streamed.

Layout of every kernel: one program per row (``grid = (N,)``, so a row's result never depends
on ``N``: batch invariance and determinism without atomics), looping over the vocabulary in
``BLOCK_V`` columns (a power of two, :func:`._common.block_v`); columns past ``V`` load as
``-inf``; row offsets are int64.

* ``token_logprobs`` forward: ONE pass over the row. An online softmax keeps the running max
  ``m``, ``rest`` (every column but one arg-max, :func:`._common.online_block`) and, with the
  entropy, ``S1 = sum exp(z - m) (z - m)``. It saves ``stats = (m, log1p(rest), S1 / (1 +
  rest))`` (the last is ``sum p (z - m)``, 0 without the entropy), and reads the token's logit
  directly. Backward: ONE pass, reading the row and writing the gradient once (in place when
  ``out`` is ``logits``).
* ``kl_divergence`` forward: TWO passes over the row pair (``logits``, ``ref_logits``): the
  first computes the statistics of both rows, the second the KL sums, which need ``log p =
  (z - m) - log s`` and so the complete first pass (a one-pass form that rescales ``sum p (z -
  w)`` online would lose digits to cancellation, and none exists for the JSD). It saves
  ``stats_p[:, 2] = sum p a_p`` and ``stats_q[:, 2] = sum q a_q`` as the reference does, so
  backward is ONE pass over the pair. ``kl_divergence_partial_forward`` runs the second pass
  only, on statistics it is given (vocabulary parallelism: the all-shard ones).

Rows whose token is ``ignore_index`` (or whose ``ignore_mask`` is True) are not read at all:
their outputs are 0, their saved statistics are 0 (backward never reads them), and backward
writes exactly-zero gradient rows without reading the logits (so ``-inf`` / NaN there is
harmless).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (block_v, compute_dtype, const_hl, device_guard, expm1, log1p,
                      logaddexp, mul_hl, num_warps, online_block, row_stride, split,
                      tl_compute_dtype, unit_stride, xmul0)

Tensor = torch.Tensor

_KINDS = {"reverse": 0, "forward": 1, "jsd": 2}


# ================================================================== token_logprobs / entropy

@triton.jit
def _token_logprobs_fwd_kernel(
        x_ptr, stride_x, tok_ptr, stride_tok, logp_ptr, ent_ptr, stats_ptr,
        V, inv_t_hi, inv_t_lo, ignore_index,
        HAS_TOKENS: tl.constexpr, WITH_ENTROPY: tl.constexpr, IS_FP64: tl.constexpr,
        CDT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if HAS_TOKENS:
        tok = tl.load(tok_ptr + row * stride_tok).to(tl.int64)
        skip = tok == ignore_index
    else:
        tok = 0
        skip = False
    zero = tl.zeros([], CDT)
    if skip:
        # padding: 0 outputs, and statistics that backward never reads
        tl.store(logp_ptr + row, zero)
        tl.store(ent_ptr + row, zero)
        tl.store(stats_ptr + row * 3, zero)
        tl.store(stats_ptr + row * 3 + 1, zero)
        tl.store(stats_ptr + row * 3 + 2, zero)
    else:
        base = x_ptr + row * stride_x
        offs = tl.arange(0, BLOCK_V)
        m = tl.full([], float("-inf"), CDT)
        rest = tl.zeros([], CDT)
        s1 = tl.zeros([], CDT)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(CDT)
            z = mul_hl(x, inv_t_hi, inv_t_lo, IS_FP64)
            m, rest, s1 = online_block(z, offs, m, rest, s1, WITH_ENTROPY)
        log_s = log1p(rest, IS_FP64)
        tl.store(stats_ptr + row * 3, m)
        tl.store(stats_ptr + row * 3 + 1, log_s)
        if WITH_ENTROPY:
            # sum p (z - m) = S1 / S0 with S0 = 1 + rest; S1 <= 0, so H = log s - S1 / S0
            # adds two non-negative terms (exact on peaked rows)
            sum_pzs = s1 / (1.0 + rest)
            tl.store(stats_ptr + row * 3 + 2, sum_pzs)
            tl.store(ent_ptr + row, log_s - sum_pzs)
        else:
            tl.store(stats_ptr + row * 3 + 2, zero)
            tl.store(ent_ptr + row, zero)
        if HAS_TOKENS:
            # the token's logit, read directly (an out-of-range id reads nothing: NaN)
            inside = (tok >= 0) & (tok < V)
            x_y = tl.load(base + tok, mask=inside, other=float("nan")).to(CDT)
            z_y = mul_hl(x_y, inv_t_hi, inv_t_lo, IS_FP64)
            # a row of only -inf has m = -inf: shift by 0 so its token gets -inf, not NaN
            m_shift = tl.where(m == float("-inf"), zero, m)
            tl.store(logp_ptr + row, (z_y - m_shift) - log_s)
        else:
            tl.store(logp_ptr + row, zero)


@triton.jit
def _token_logprobs_bwd_kernel(
        glp_ptr, stride_glp, gh_ptr, stride_gh, x_ptr, stride_x, tok_ptr, stride_tok,
        stats_ptr, stride_s0, stride_s1, out_ptr, stride_out,
        V, inv_t_hi, inv_t_lo, ignore_index,
        HAS_TOKENS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr,
        IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if HAS_TOKENS:
        tok = tl.load(tok_ptr + row * stride_tok).to(tl.int64)
        skip = tok == ignore_index
    else:
        tok = -1
        skip = False
    base = x_ptr + row * stride_x
    obase = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK_V)
    if skip:
        # padding: an exactly-zero gradient row, the logits are not read
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            tl.store(obase + cols, tl.zeros([BLOCK_V], CDT).to(out_ptr.dtype.element_ty),
                     mask=cols < V)
    else:
        zero = tl.zeros([], CDT)
        m = tl.load(stats_ptr + row * stride_s0).to(CDT)
        m = tl.where(m == float("-inf"), zero, m)  # a row of only -inf: p = 0, not NaN
        log_s = tl.load(stats_ptr + row * stride_s0 + stride_s1).to(CDT)
        sum_pzs = tl.load(stats_ptr + row * stride_s0 + 2 * stride_s1).to(CDT)
        g_lp = zero
        g_h = zero
        tok_grad = zero
        if HAS_GLP:
            g_lp = mul_hl(tl.load(glp_ptr + row * stride_glp).to(CDT), inv_t_hi, inv_t_lo,
                          IS_FP64)
            # read the token's logit before any block of the row is overwritten (in place)
            inside = (tok >= 0) & (tok < V)
            x_y = tl.load(base + tok, mask=inside, other=float("nan")).to(CDT)
            logp_y = (mul_hl(x_y, inv_t_hi, inv_t_lo, IS_FP64) - m) - log_s
            # g (1 - p_y) = -g expm1(log p_y): exact where the row is peaked on its token
            tok_grad = -g_lp * expm1(logp_y, IS_FP64)
        if HAS_GH:
            g_h = mul_hl(tl.load(gh_ptr + row * stride_gh).to(CDT), inv_t_hi, inv_t_lo,
                         IS_FP64)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inb = cols < V
            x = tl.load(base + cols, mask=inb, other=float("-inf")).to(CDT)
            zs = mul_hl(x, inv_t_hi, inv_t_lo, IS_FP64) - m
            p = tl.exp(zs - log_s)
            g = tl.zeros([BLOCK_V], CDT)
            if HAS_GLP:
                g = tl.where(cols == tok, tok_grad, -g_lp * p)
            if HAS_GH:
                # d H / d z = -p (z - sum p z), on max-shifted logits
                g = g - g_h * xmul0(p, zs - sum_pzs)
            tl.store(obase + cols, g.to(out_ptr.dtype.element_ty), mask=inb)


def token_logprobs_forward(logits: Tensor, tokens: Optional[Tensor], temperature: float,
                           ignore_index: int, with_entropy: bool
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp [N], entropy [N], stats [N, 3])`` like the reference (fp32, fp64 for
    fp64 logits). ``tokens=None``: entropy only, every row computed, ``logp`` all 0. Padding
    rows: 0 outputs, ``stats`` row 0 (never read)."""
    n, vocab = logits.shape
    x = unit_stride(logits)
    cdt = compute_dtype(x.dtype)
    logp = x.new_empty(n, dtype=cdt)
    ent = x.new_empty(n, dtype=cdt)
    stats = x.new_empty(n, 3, dtype=cdt)
    if n == 0:
        return logp, ent, stats
    hi, lo = split(1.0 / temperature)
    block = block_v(vocab, x.dtype)
    has_tokens = tokens is not None
    tok = tokens if has_tokens else logp  # a dummy pointer, never read
    with device_guard(x):
        _token_logprobs_fwd_kernel[(n,)](
            x, row_stride(x), tok, tok.stride(0) if has_tokens else 0, logp, ent, stats,
            vocab, hi, lo, int(ignore_index),
            HAS_TOKENS=has_tokens, WITH_ENTROPY=bool(with_entropy),
            IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt), BLOCK_V=block,
            num_warps=num_warps(block))
    return logp, ent, stats


def token_logprobs_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                            logits: Tensor, tokens: Optional[Tensor], stats: Tensor,
                            temperature: float, ignore_index: int,
                            out: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. ``logits`` in its dtype: ``(g (onehot(y) - p) - g_H p (z - sum p z))
    / T``, exactly 0 on padding rows. ``out`` may be ``logits`` itself (in-place backward:
    each program reads a block of its row before it writes it)."""
    n, vocab = logits.shape
    x = unit_stride(logits)
    cdt = compute_dtype(x.dtype)
    if out is None:
        out = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
    if n == 0:
        return out
    # the kernel writes unit-stride rows; anything else goes through a temporary
    dst = out if (out.stride(-1) == 1 or vocab == 1) else torch.empty_like(x)
    has_tokens = tokens is not None
    has_glp = grad_logp is not None and has_tokens
    has_gh = grad_entropy is not None
    hi, lo = split(1.0 / temperature)
    block = block_v(vocab, x.dtype)
    dummy = stats
    glp = grad_logp if has_glp else dummy
    gh = grad_entropy if has_gh else dummy
    tok = tokens if has_tokens else dummy
    with device_guard(x):
        _token_logprobs_bwd_kernel[(n,)](
            glp, glp.stride(0) if has_glp else 0, gh, gh.stride(0) if has_gh else 0,
            x, row_stride(x), tok, tok.stride(0) if has_tokens else 0,
            stats, stats.stride(0), stats.stride(1), dst, row_stride(dst),
            vocab, hi, lo, int(ignore_index),
            HAS_TOKENS=has_tokens, HAS_GLP=has_glp, HAS_GH=has_gh,
            IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt), BLOCK_V=block,
            num_warps=num_warps(block))
    if dst is not out:
        out.copy_(dst)
    return out


# ============================================================================= kl_divergence

@triton.jit
def _kl_logs(z, w, m_p, ls_p, m_q, ls_q):
    """``log p``, ``log q`` of a block from the saved row statistics; a row of only ``-inf``
    (``m = -inf``) is shifted by 0, as the reference does: its log-probs are ``-inf`` and
    its terms 0, not NaN."""
    m_p = tl.where(m_p == float("-inf"), 0.0, m_p)
    m_q = tl.where(m_q == float("-inf"), 0.0, m_q)
    return (z - m_p) - ls_p, (w - m_q) - ls_q


@triton.jit
def _jsd_a(logp, logq, beta, omb, lb, l1b, IS_FP64: tl.constexpr):
    """``a_p = beta (log p - log m)``, ``a_q = (1 - beta) (log q - log m)`` with
    ``log m = logaddexp(log p + log beta, log q + log(1 - beta))``."""
    logm = logaddexp(logp + lb, logq + l1b, IS_FP64)
    return beta * (logp - logm), omb * (logq - logm)


@triton.jit
def _kl_fwd_kernel(
        x_ptr, stride_x, y_ptr, stride_y, mask_ptr, stride_mask, kl_ptr, sp_ptr, sq_ptr,
        gp_ptr, gq_ptr,
        V, inv_t_hi, inv_t_lo, beta_hi, beta_lo, omb_hi, omb_lo, lb_hi, lb_lo, l1b_hi, l1b_lo,
        KIND: tl.constexpr, HAS_MASK: tl.constexpr, GIVEN_STATS: tl.constexpr,
        IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        skip = tl.load(mask_ptr + row * stride_mask) != 0
    else:
        skip = False
    zero = tl.zeros([], CDT)
    if skip:
        tl.store(kl_ptr + row, zero)
        for j in tl.static_range(3):
            tl.store(sp_ptr + row * 3 + j, zero)
            tl.store(sq_ptr + row * 3 + j, zero)
    else:
        xbase = x_ptr + row * stride_x
        ybase = y_ptr + row * stride_y
        offs = tl.arange(0, BLOCK_V)
        if GIVEN_STATS:
            # vocabulary parallelism: the all-shard (max, log s) of both rows are given
            m_p = tl.load(gp_ptr + row * 3).to(CDT)
            ls_p = tl.load(gp_ptr + row * 3 + 1).to(CDT)
            m_q = tl.load(gq_ptr + row * 3).to(CDT)
            ls_q = tl.load(gq_ptr + row * 3 + 1).to(CDT)
        else:
            # pass 1: (max, log1p rest) of both rows
            m_p = tl.full([], float("-inf"), CDT)
            m_q = tl.full([], float("-inf"), CDT)
            r_p = zero
            r_q = zero
            unused = zero
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                inb = cols < V
                z = mul_hl(tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT),
                           inv_t_hi, inv_t_lo, IS_FP64)
                w = mul_hl(tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT),
                           inv_t_hi, inv_t_lo, IS_FP64)
                m_p, r_p, unused = online_block(z, offs, m_p, r_p, unused, False)
                m_q, r_q, unused = online_block(w, offs, m_q, r_q, unused, False)
            ls_p = log1p(r_p, IS_FP64)
            ls_q = log1p(r_q, IS_FP64)
        # pass 2: the KL sums, from log p and log q (needs the whole of pass 1)
        beta = const_hl(zero, beta_hi, beta_lo, IS_FP64)
        omb = const_hl(zero, omb_hi, omb_lo, IS_FP64)
        lb = const_hl(zero, lb_hi, lb_lo, IS_FP64)
        l1b = const_hl(zero, l1b_hi, l1b_lo, IS_FP64)
        acc_p = zero
        acc_q = zero
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inb = cols < V
            z = mul_hl(tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT),
                       inv_t_hi, inv_t_lo, IS_FP64)
            w = mul_hl(tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT),
                       inv_t_hi, inv_t_lo, IS_FP64)
            logp, logq = _kl_logs(z, w, m_p, ls_p, m_q, ls_q)
            if KIND == 0:
                acc_p += tl.sum(xmul0(tl.exp(logp), logp - logq), 0)
            elif KIND == 1:
                acc_q += tl.sum(xmul0(tl.exp(logq), logq - logp), 0)
            else:
                a_p, a_q = _jsd_a(logp, logq, beta, omb, lb, l1b, IS_FP64)
                acc_p += tl.sum(xmul0(tl.exp(logp), a_p), 0)
                acc_q += tl.sum(xmul0(tl.exp(logq), a_q), 0)
        tl.store(kl_ptr + row, acc_p + acc_q)
        tl.store(sp_ptr + row * 3, m_p)
        tl.store(sp_ptr + row * 3 + 1, ls_p)
        tl.store(sp_ptr + row * 3 + 2, acc_p)
        tl.store(sq_ptr + row * 3, m_q)
        tl.store(sq_ptr + row * 3 + 1, ls_q)
        tl.store(sq_ptr + row * 3 + 2, acc_q)


@triton.jit
def _kl_bwd_kernel(
        g_ptr, stride_g, x_ptr, stride_x, y_ptr, stride_y, mask_ptr, stride_mask,
        sp_ptr, stride_sp0, stride_sp1, sq_ptr, stride_sq0, stride_sq1,
        gx_ptr, stride_gx, gy_ptr, stride_gy,
        V, inv_t_hi, inv_t_lo, beta_hi, beta_lo, omb_hi, omb_lo, lb_hi, lb_lo, l1b_hi, l1b_lo,
        KIND: tl.constexpr, HAS_MASK: tl.constexpr, NEED_W: tl.constexpr,
        IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        skip = tl.load(mask_ptr + row * stride_mask) != 0
    else:
        skip = False
    gxbase = gx_ptr + row * stride_gx
    gybase = gy_ptr + row * stride_gy
    offs = tl.arange(0, BLOCK_V)
    if skip:
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inb = cols < V
            tl.store(gxbase + cols, tl.zeros([BLOCK_V], CDT).to(gx_ptr.dtype.element_ty),
                     mask=inb)
            if NEED_W:
                tl.store(gybase + cols, tl.zeros([BLOCK_V], CDT).to(gy_ptr.dtype.element_ty),
                         mask=inb)
    else:
        xbase = x_ptr + row * stride_x
        ybase = y_ptr + row * stride_y
        zero = tl.zeros([], CDT)
        g = mul_hl(tl.load(g_ptr + row * stride_g).to(CDT), inv_t_hi, inv_t_lo, IS_FP64)
        m_p = tl.load(sp_ptr + row * stride_sp0).to(CDT)
        ls_p = tl.load(sp_ptr + row * stride_sp0 + stride_sp1).to(CDT)
        sum_p = tl.load(sp_ptr + row * stride_sp0 + 2 * stride_sp1).to(CDT)
        m_q = tl.load(sq_ptr + row * stride_sq0).to(CDT)
        ls_q = tl.load(sq_ptr + row * stride_sq0 + stride_sq1).to(CDT)
        sum_q = tl.load(sq_ptr + row * stride_sq0 + 2 * stride_sq1).to(CDT)
        beta = const_hl(zero, beta_hi, beta_lo, IS_FP64)
        omb = const_hl(zero, omb_hi, omb_lo, IS_FP64)
        lb = const_hl(zero, lb_hi, lb_lo, IS_FP64)
        l1b = const_hl(zero, l1b_hi, l1b_lo, IS_FP64)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inb = cols < V
            z = mul_hl(tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT),
                       inv_t_hi, inv_t_lo, IS_FP64)
            w = mul_hl(tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT),
                       inv_t_hi, inv_t_lo, IS_FP64)
            logp, logq = _kl_logs(z, w, m_p, ls_p, m_q, ls_q)
            p = tl.exp(logp)
            q = tl.exp(logq)
            # r (a - sum r a) = r a - r sum(r a), the sum saved by forward
            if KIND == 0:
                d_z = xmul0(p, logp - logq) - p * sum_p
                d_w = q - p
            elif KIND == 1:
                d_z = p - q
                d_w = xmul0(q, logq - logp) - q * sum_q
            else:
                a_p, a_q = _jsd_a(logp, logq, beta, omb, lb, l1b, IS_FP64)
                d_z = xmul0(p, a_p) - p * sum_p
                d_w = xmul0(q, a_q) - q * sum_q
            tl.store(gxbase + cols, (g * d_z).to(gx_ptr.dtype.element_ty), mask=inb)
            if NEED_W:
                tl.store(gybase + cols, (g * d_w).to(gy_ptr.dtype.element_ty), mask=inb)


def _beta_args(beta: float):
    """``beta, 1 - beta, log beta, log(1 - beta)`` as fp32 (hi, lo) pairs."""
    omb = 1.0 - beta
    lb = math.log(beta) if beta > 0 else -math.inf
    l1b = math.log(omb) if omb > 0 else -math.inf
    return (*split(beta), *split(omb), *split(lb), *split(l1b))


def kl_divergence_forward(logits: Tensor, ref_logits: Tensor, ignore_mask: Optional[Tensor],
                          kind: str, beta: float, temperature: float
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(kl [N], stats_p [N, 3], stats_q [N, 3])`` like the reference; the third
    columns hold ``sum p a_p`` and ``sum q a_q``. ``ignore_mask`` rows: kl 0, stats 0 (never
    read), the rows are not read."""
    return _kl_forward(logits, ref_logits, ignore_mask, None, None, kind, beta, temperature)


def kl_divergence_partial_forward(logits: Tensor, ref_logits: Tensor,
                                  ignore_mask: Optional[Tensor], stats_p: Tensor,
                                  stats_q: Tensor, kind: str, beta: float, temperature: float
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`kl_divergence_forward` with ``(max, log s)`` of both rows given (columns 0, 1 of
    ``stats_p`` / ``stats_q``): only the second pass runs. Vocabulary parallelism: with the
    all-shard statistics the outputs are this shard's part of the KL sums."""
    return _kl_forward(logits, ref_logits, ignore_mask, stats_p, stats_q, kind, beta,
                       temperature)


def _kl_forward(logits, ref_logits, ignore_mask, given_p, given_q, kind, beta, temperature):
    n, vocab = logits.shape
    x, y = unit_stride(logits), unit_stride(ref_logits)
    cdt = compute_dtype(x.dtype)
    kl = x.new_empty(n, dtype=cdt)
    stats_p = x.new_empty(n, 3, dtype=cdt)
    stats_q = x.new_empty(n, 3, dtype=cdt)
    if n == 0:
        return kl, stats_p, stats_q
    has_mask = ignore_mask is not None
    mask = ignore_mask.view(torch.uint8) if has_mask else kl
    given = given_p is not None
    gp = given_p.to(cdt).contiguous() if given else kl   # a dummy pointer when not given
    gq = given_q.to(cdt).contiguous() if given else kl
    block = block_v(vocab, x.dtype)
    with device_guard(x):
        _kl_fwd_kernel[(n,)](
            x, row_stride(x), y, row_stride(y), mask, mask.stride(0) if has_mask else 0,
            kl, stats_p, stats_q, gp, gq, vocab, *split(1.0 / temperature),
            *_beta_args(beta), KIND=_KINDS[kind], HAS_MASK=has_mask, GIVEN_STATS=given,
            IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt), BLOCK_V=block,
            num_warps=num_warps(block))
    return kl, stats_p, stats_q


def kl_divergence_backward(grad_kl: Tensor, logits: Tensor, ref_logits: Tensor,
                           ignore_mask: Optional[Tensor], stats_p: Tensor, stats_q: Tensor,
                           kind: str, beta: float, temperature: float, need_ref_grad: bool
                           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``logits`` and (if ``need_ref_grad``) ``ref_logits``, in their
    dtypes, one pass over the row pair; ``ignore_mask`` rows receive exactly 0."""
    n, vocab = logits.shape
    x, y = unit_stride(logits), unit_stride(ref_logits)
    cdt = compute_dtype(x.dtype)
    grad_z = torch.empty((n, vocab), dtype=logits.dtype, device=logits.device)
    grad_w = (torch.empty((n, vocab), dtype=ref_logits.dtype, device=ref_logits.device)
              if need_ref_grad else None)
    if n == 0:
        return grad_z, grad_w
    has_mask = ignore_mask is not None
    mask = ignore_mask.view(torch.uint8) if has_mask else stats_p
    gw = grad_w if need_ref_grad else grad_z  # a dummy pointer, never written
    block = block_v(vocab, x.dtype)
    with device_guard(x):
        _kl_bwd_kernel[(n,)](
            grad_kl, grad_kl.stride(0), x, row_stride(x), y, row_stride(y),
            mask, mask.stride(0) if has_mask else 0,
            stats_p, stats_p.stride(0), stats_p.stride(1),
            stats_q, stats_q.stride(0), stats_q.stride(1),
            grad_z, row_stride(grad_z), gw, row_stride(gw),
            vocab, *split(1.0 / temperature), *_beta_args(beta),
            KIND=_KINDS[kind], HAS_MASK=has_mask, NEED_W=bool(need_ref_grad),
            IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt), BLOCK_V=block,
            num_warps=num_warps(block))
    return grad_z, grad_w


# The sparse ops live in their own module (a second kernel pair with its own membership
# logic); the registry looks them up here, under the family's stem.
from ._sparse import (sparse_kl_backward, sparse_kl_forward,  # noqa: E402
                      sparse_logprobs_backward, sparse_logprobs_forward)

__all__ = ["token_logprobs_forward", "token_logprobs_backward", "kl_divergence_forward",
           "kl_divergence_partial_forward", "kl_divergence_backward",
           "sparse_logprobs_forward", "sparse_logprobs_backward", "sparse_kl_forward",
           "sparse_kl_backward"]
