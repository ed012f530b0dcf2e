"""Triton kernels of the vocabulary ops: ``token_logprobs`` (with entropy) and
``kl_divergence``. Same launcher signatures, outputs and row statistics as
:mod:`rlkernels.reference.vocab`, which states the math; this file states how it is streamed.

Layout of every kernel: one program per row (``grid = (N,)``, so a row's result never depends
on ``N``: batch invariance and determinism without atomics), looping over the vocabulary in
``BLOCK_V`` columns (a power of two, :func:`._common.block_v`); columns past ``V`` load as
``-inf``; row offsets are int64.

* ``token_logprobs`` forward: ONE pass over the row with per-lane online statistics
  (:func:`._common.lane_step`: each element of the block keeps its own running max, ``rest``
  and, with the entropy, ``S1``; no block reduction inside the loop; one ``ex2`` per
  element with ``log2(e) / T`` folded into one multiply) merged once per row
  (:func:`._common.lane_merge`). It saves ``stats = (m, log1p(rest), S1 / (1 + rest))``
  (the last is ``sum p (z - m)``, 0 without the entropy), and reads the token's logit
  directly. Backward: ONE pass, reading the row and writing the gradient once (in place when
  ``out`` is ``logits``).
* ``kl_divergence`` forward, reverse and forward KL: ONE pass over the row pair
  (``KL(a || b) = sum a (z_a - z_b) - lse_a + lse_b`` with the first sum rescaled online like
  the softmax sums; docs/math.md). JSD: TWO passes, the first for the statistics of both rows
  (per lane), the second for the terms, which need ``log p`` and ``log q`` normalized (no
  one-pass form exists: docs/math.md). The saved ``stats_p[:, 2] = sum p a_p`` and
  ``stats_q[:, 2] = sum q a_q`` are the reference's, so backward is ONE pass over the pair.
  ``kl_divergence_partial_forward`` runs the second pass only, on statistics it is given
  (vocabulary parallelism: the all-shard ones).
* Rows: ``[N, V]`` with any row stride, or ``[A, B, V]`` views (``logits[:, :-1]``) read
  through two strides (:func:`._common.row_layout`), never copied.

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

from .._codes import KL_KINDS
from ._common import (LOG2E, block_v, compute_dtype, const_hl, device_guard, exp2_, expm1,
                      fast_bf16, lane_merge, lane_step, lane_step2, lg2_1p, load_bf16_f32,
                      floor_f, load_floor_f32, log1p,
                      load_pair_stats, logaddexp, mul_hl, n_rows, num_warps, per_row,
                      row_layout, row_offset, rows3, split, tl_compute_dtype, unit_stride,
                      xmul0, zero_grad_rows)

Tensor = torch.Tensor

_KINDS = KL_KINDS  # rlkernels/_codes.py: the KIND constexpr the kernels branch on

# The launchers read [A, B, V] logits through two row strides (_common.row_layout): the op
# layer hands them logits[:, :-1] as a view, not a copy.
STRIDED_ROWS = True
# the eager ops' kernels take the public shapes (logits [..., V], per-row tensors [...]) and
# return outputs in them: rlkernels.ops._table makes no view or reshape of its own
ND_ROWS = True


# ================================================================== token_logprobs / entropy

@triton.jit
def _token_logprobs_fwd_kernel(
        x_ptr, inner_x, stride_x, stride_x1, tok_ptr, stride_tok, logp_ptr, ent_ptr, stats_ptr,
        V, inv_t_hi, inv_t_lo, c_hi, c_lo, ignore_index,
        HAS_TOKENS: tl.constexpr, WITH_ENTROPY: tl.constexpr, IS_FP64: tl.constexpr,
        CDT: tl.constexpr, BLOCK_V: tl.constexpr, FAST_BF16: tl.constexpr = False):
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
        base = x_ptr + row_offset(row, inner_x, stride_x, stride_x1)
        c = const_hl(zero, c_hi, c_lo, IS_FP64)  # log2(e) / T
        # per-lane statistics: no block reduction inside the loop; two columns per lane and
        # step (_common.lane_step2: one rescale of the sums per pair), columns j and
        # j + BLOCK_V / 2 of the block (with or without the entropy: the same bits of lse)
        HALF: tl.constexpr = BLOCK_V // 2
        lanes = tl.arange(0, HALF)
        m = tl.full([HALF], -1.0e30, CDT)
        r = tl.zeros([HALF], CDT)
        t = tl.zeros([HALF], CDT)
        # full blocks without a mask, then the partial last block (masked: -inf past V)
        v_full = V - V % BLOCK_V
        for start in range(0, v_full, BLOCK_V):
            if FAST_BF16:
                x1 = load_bf16_f32(base + start + lanes, True)
                x2 = load_bf16_f32(base + start + HALF + lanes, True)
            else:
                x1 = tl.load(base + start + lanes).to(CDT)
                x2 = tl.load(base + start + HALF + lanes).to(CDT)
            m, r, t = lane_step2(x1, x2, m, r, t, c, WITH_ENTROPY, IS_FP64)
        if v_full < V:
            c1 = v_full + lanes
            c2 = c1 + HALF
            x1 = tl.load(base + c1, mask=c1 < V, other=float("-inf")).to(CDT)
            x2 = tl.load(base + c2, mask=c2 < V, other=float("-inf")).to(CDT)
            m, r, t = lane_step2(x1, x2, m, r, t, c, WITH_ENTROPY, IS_FP64)
        mx, rest, s1 = lane_merge(m, r, t, lanes, c, HALF, WITH_ENTROPY, IS_FP64)
        m = mul_hl(mx, inv_t_hi, inv_t_lo, IS_FP64)  # max z, rounded as every z is
        log_s = log1p(rest, IS_FP64)
        tl.store(stats_ptr + row * 3, m)
        tl.store(stats_ptr + row * 3 + 1, log_s)
        if WITH_ENTROPY:
            # sum p (z - m) = ln 2 S1 / S0 with S0 = 1 + rest (S1 in log2 units); S1 <= 0,
            # so H = log s - S1 / S0 adds two non-negative terms (exact on peaked rows)
            sum_pzs = s1 / (1.0 + rest) * tl.full([], 0.6931471805599453, CDT)
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
        glp_ptr, stride_glp, gh_ptr, stride_gh, x_ptr, inner_x, stride_x, stride_x1,
        tok_ptr, stride_tok, stats_ptr, stride_s0, stride_s1,
        out_ptr, inner_out, stride_out, stride_out1,
        V, inv_t_hi, inv_t_lo, ignore_index,
        HAS_TOKENS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr,
        IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    skip = row < 0
    if HAS_TOKENS:
        tok = tl.load(tok_ptr + row * stride_tok).to(tl.int64)
        skip = tok == ignore_index
    else:
        tok = -1
    if HAS_GLP or HAS_GH:
        # upstream gradients all exactly 0 (a masked position of a loss): the gradient row
        # is exactly 0 and the logits are not read (they may hold anything)
        up_zero = row >= 0
        if HAS_GLP:
            up_zero = up_zero & (tl.load(glp_ptr + row * stride_glp) == 0)
        if HAS_GH:
            up_zero = up_zero & (tl.load(gh_ptr + row * stride_gh) == 0)
        skip = skip | up_zero
    base = x_ptr + row_offset(row, inner_x, stride_x, stride_x1)
    obase = out_ptr + row_offset(row, inner_out, stride_out, stride_out1)
    offs = tl.arange(0, BLOCK_V)
    if skip:
        # padding or zero upstream: an exactly-zero gradient row, the logits are not read
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
        # full blocks without a mask, then the partial last block
        v_full = V - V % BLOCK_V
        for start in range(0, v_full, BLOCK_V):
            cols = start + offs
            x = tl.load(base + cols).to(CDT)
            g = _tok_grad(x, cols, tok, tok_grad, g_lp, g_h, m, log_s, sum_pzs, inv_t_hi,
                          inv_t_lo, HAS_GLP, HAS_GH, IS_FP64, CDT)
            tl.store(obase + cols, g.to(out_ptr.dtype.element_ty))
        if v_full < V:
            cols = v_full + offs
            inb = cols < V
            x = tl.load(base + cols, mask=inb, other=float("-inf")).to(CDT)
            g = _tok_grad(x, cols, tok, tok_grad, g_lp, g_h, m, log_s, sum_pzs, inv_t_hi,
                          inv_t_lo, HAS_GLP, HAS_GH, IS_FP64, CDT)
            tl.store(obase + cols, g.to(out_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _tok_grad(x, cols, tok, tok_grad, g_lp, g_h, m, log_s, sum_pzs, inv_t_hi, inv_t_lo,
              HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr, IS_FP64: tl.constexpr,
              CDT: tl.constexpr):
    """The gradient of one block of a row: ``g_lp (onehot - p) - g_h p (z - sum p z)``
    (the token's own column from the exact ``tok_grad``)."""
    zs = mul_hl(x, inv_t_hi, inv_t_lo, IS_FP64) - m
    p = tl.exp(zs - log_s)
    g = tl.zeros(x.shape, CDT)
    if HAS_GLP:
        g = tl.where(cols == tok, tok_grad, -g_lp * p)
    if HAS_GH:
        # d H / d z = -p (z - sum p z), on max-shifted logits
        g = g - g_h * xmul0(p, zs - sum_pzs)
    return g


def token_logprobs_forward(logits: Tensor, tokens: Optional[Tensor], temperature: float,
                           ignore_index: int, with_entropy: bool
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(logp [...], entropy [...], stats [..., 3])`` for ``logits [..., V]`` and
    ``tokens [...]``, like the reference (fp32, fp64 for fp64 logits). ``tokens=None``:
    entropy only, every row computed, ``logp`` all 0. Padding rows: 0 outputs, ``stats`` row
    0 (never read)."""
    vocab, n, lead = logits.shape[-1], n_rows(logits), logits.shape[:-1]
    x = unit_stride(rows3(logits))
    cdt = compute_dtype(x.dtype)
    logp = x.new_empty(lead, dtype=cdt)
    ent = x.new_empty(lead, dtype=cdt)
    stats = x.new_empty((*lead, 3), dtype=cdt)
    if n == 0:
        return logp, ent, stats
    hi, lo = split(1.0 / temperature)
    block = block_v(vocab, x.dtype)
    has_tokens = tokens is not None
    tok, tok_stride = per_row(tokens) if has_tokens else (logp, 0)  # logp: a dummy pointer
    with device_guard(x):
        _token_logprobs_fwd_kernel[(n,)](
            x, *row_layout(x), tok, tok_stride, logp, ent, stats,
            vocab, hi, lo, *split(LOG2E / temperature), int(ignore_index),
            HAS_TOKENS=has_tokens, WITH_ENTROPY=bool(with_entropy),
            IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt), BLOCK_V=block,
            FAST_BF16=fast_bf16(x), num_warps=num_warps(block))
    return logp, ent, stats


def token_logprobs_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                            logits: Tensor, tokens: Optional[Tensor], stats: Tensor,
                            temperature: float, ignore_index: int,
                            out: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. ``logits`` in its dtype: ``(g (onehot(y) - p) - g_H p (z - sum p z))
    / T``, exactly 0 on padding rows and on rows whose given upstream gradients are all
    exactly 0 (masked positions of a loss): those rows are not read, so NaN / inf there does
    not leak into the gradient. ``out`` may be ``logits`` itself (in-place backward: each
    program reads a block of its row before it writes it). Shapes as the forward's; the
    gradient has the shape of ``logits``."""
    vocab, n = logits.shape[-1], n_rows(logits)
    x = unit_stride(rows3(logits))
    cdt = compute_dtype(x.dtype)
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n == 0:
        return out
    dst = _dst(out, x)
    has_tokens = tokens is not None
    has_glp = grad_logp is not None and has_tokens
    has_gh = grad_entropy is not None
    hi, lo = split(1.0 / temperature)
    block = block_v(vocab, x.dtype)
    none = (stats, 0)  # a dummy pointer, never read
    glp = per_row(grad_logp) if has_glp else none
    gh = per_row(grad_entropy) if has_gh else none
    tok = per_row(tokens) if has_tokens else none
    st, st_row = per_row(stats, 1)
    with device_guard(x):
        _token_logprobs_bwd_kernel[(n,)](
            *glp, *gh, x, *row_layout(x), *tok, st, st_row, st.stride(-1),
            dst, *row_layout(dst), vocab, hi, lo, int(ignore_index),
            HAS_TOKENS=has_tokens, HAS_GLP=has_glp, HAS_GH=has_gh,
            IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt), BLOCK_V=block,
            num_warps=num_warps(block))
    if dst.data_ptr() != out.data_ptr():
        out.copy_(dst.view(out.shape))
    return out


def _dst(out: Tensor, x: Tensor) -> Tensor:
    """Where a backward kernel writes the gradient ``out`` (``x``: the rows it reads): the
    rows of ``out`` in place when they have unit stride and merge to at most 3-D, else a
    contiguous temporary (the caller copies it into ``out``)."""
    dst = rows3(out)
    if dst.data_ptr() == out.data_ptr() and (dst.stride(-1) == 1 or x.shape[-1] == 1):
        return dst
    return torch.empty(x.shape, dtype=out.dtype, device=out.device)


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
def _two_sum(a, b):
    """``a + b`` as ``(hi, lo)``: ``hi`` the rounded sum, ``lo`` its rounding error (Knuth's
    TwoSum, any magnitudes); non-finite sums give ``lo = 0``."""
    hi = a + b
    bb = hi - a
    lo = (a - (hi - bb)) + (b - bb)
    return hi, tl.where(tl.abs(hi) < float("inf"), lo, 0.0)


@triton.jit
def _kl_offset(kl, m_a, m_b, dls):
    """``kl + (m_a - m_b) + dls`` as an unrounded pair ``(hi, lo)``; a row of only ``-inf``
    is shifted by 0 (as :func:`_kl_logs`)."""
    m_a = tl.where(m_a == float("-inf"), 0.0, m_a)
    m_b = tl.where(m_b == float("-inf"), 0.0, m_b)
    h1, l1 = _two_sum(kl, dls)
    h2, l2 = _two_sum(h1, m_a - m_b)
    return h2, l1 + l2


@triton.jit
def _jsd_a(logp, logq, beta, omb, lb, l1b, IS_FP64: tl.constexpr):
    """``a_p = beta (log p - log m)``, ``a_q = (1 - beta) (log q - log m)`` with
    ``log m = logaddexp(log p + log beta, log q + log(1 - beta))``."""
    logm = logaddexp(logp + lb, logq + l1b, IS_FP64)
    return beta * (logp - logm), omb * (logq - logm)


@triton.jit
def _jsd_cols(x, y, m_p, m_q, lp2, lq2, inv_t, k, PTX: tl.constexpr, pc=1.0,
              FOLD: tl.constexpr = False):
    """The JSD terms of a block (fp32; ``x``, ``y`` raw logits floored at about -1e30, ``m``
    the saved max of ``z = x / T`` (0 for a row of only ``-inf``), ``lp2 = log2 s_p``,
    ``k = log2 beta - log2 (1 - beta) + lq2 - lp2``): returns ``p``, ``q``, ``a = D - S``
    and ``S`` in log2 units with ``D = log2(beta p) - log2((1 - beta) q)`` and ``S =
    log2(1 + 2^D) = max(D, 0) + log2(1 + 2^-|D|)``, so that ``log2 p - log2 m = a - log2
    beta`` and ``log2 q - log2 m = -S - log2(1 - beta)`` (docs/math.md). Four MUFU per
    column of the pair (``ex2`` for ``p``, ``q``, ``2^-|D|``; one ``lg2`` of an argument in
    ``[1, 2]``) and no series; ``p ~ q`` loses nothing: ``D`` is formed from the difference
    of the two rows' shifted logits and ``S`` is smooth in it (equal rows give the same
    ``a``, ``S`` in every column, so their terms cancel against the row sums); at beta = 0
    or 1, ``|D| >= ~1000`` makes ``2^-|D| = 0``: the terms are exactly 0. ``FOLD``: ``S`` is
    returned as ``S + log2 pc`` (:func:`_lg2_pc`, same cost)."""
    ux = x * inv_t - m_p
    uy = y * inv_t - m_q
    p = tl.exp2(ux * 1.4426950408889634 - lp2)
    q = tl.exp2(uy * 1.4426950408889634 - lq2)
    d = (ux - uy) * 1.4426950408889634 + k
    if FOLD:
        s = tl.maximum(d, 0.0) + _lg2_pc(tl.exp2(-tl.abs(d)), pc, PTX)
    else:
        s = tl.maximum(d, 0.0) + lg2_1p(tl.exp2(-tl.abs(d)), PTX)
    return p, q, d - s, s


@triton.jit
def _lg2_pc(v, pc, PTX: tl.constexpr):
    """``log2(pc (1 + v)) = log2(1 + v) + log2 pc`` for ``0 <= v <= 1``, ``1/2 <= pc <= 1``:
    one ``fma`` where :func:`_common.lg2_1p` adds 1 (its argument lies in ``[1/2, 2]``; with
    ``PTX`` one ``lg2.approx.ftz``, the interpreter ``tl.log2``): a constant ``log2 pc`` per
    column at no cost (:func:`_jsd_pass2` with ``SUM_PQ``)."""
    u = v * pc + pc
    if PTX:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [u],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(u)


@triton.jit
def _jsd_acc(acc_p, acc_q, p, q, a, s, kd, FOLD: tl.constexpr, C_ON_P: tl.constexpr):
    """Add a block's JSD terms: ``p a`` and ``q S``; with ``FOLD`` (:func:`_jsd_pass2`'s
    ``SUM_PQ``) the terms of the KL parts themselves, ``p (a - log2 beta)`` and ``q (S + log2(1
    - beta))``: ``s = S + log2 pc`` comes with one of them (``pc = beta`` when ``C_ON_P``,
    else ``1 - beta``) and the other needs ``kd = log2 beta - log2(1 - beta)`` once."""
    if FOLD:
        if C_ON_P:
            acc_p += p * a
            acc_q += q * (s - kd)
        else:
            acc_p += p * (a - kd)
            acc_q += q * s
    else:
        acc_p += p * a
        acc_q += q * s
    return acc_p, acc_q


@triton.jit
def _jsd_pass2_loop(xbase, ybase, offs, V, mp, mq, lp2, lq2, inv_t, k, kd, pc,
                    SUM_PQ: tl.constexpr, FAST_BF16: tl.constexpr, PTX: tl.constexpr,
                    BLOCK_V: tl.constexpr, C_ON_P: tl.constexpr):
    """The stream of :func:`_jsd_pass2`: per-lane sums of its terms (:func:`_jsd_acc`)."""
    acc_p = tl.zeros([BLOCK_V], tl.float32)
    acc_q = tl.zeros([BLOCK_V], tl.float32)
    v_full = V - V % BLOCK_V
    for start in range(0, v_full, BLOCK_V):
        x = load_floor_f32(xbase + start + offs, FAST_BF16, tl.float32)
        y = load_floor_f32(ybase + start + offs, FAST_BF16, tl.float32)
        p, q, a, s = _jsd_cols(x, y, mp, mq, lp2, lq2, inv_t, k, PTX, pc, SUM_PQ)
        acc_p, acc_q = _jsd_acc(acc_p, acc_q, p, q, a, s, kd, SUM_PQ, C_ON_P)
    if v_full < V:
        cols = v_full + offs
        inb = cols < V
        x = floor_f(tl.load(xbase + cols, mask=inb, other=float("-inf")).to(tl.float32))
        y = floor_f(tl.load(ybase + cols, mask=inb, other=float("-inf")).to(tl.float32))
        p, q, a, s = _jsd_cols(x, y, mp, mq, lp2, lq2, inv_t, k, PTX, pc, SUM_PQ)
        acc_p, acc_q = _jsd_acc(acc_p, acc_q, p, q, a, s, kd, SUM_PQ, C_ON_P)
    return acc_p, acc_q


@triton.jit
def _jsd_pass2(xbase, ybase, offs, V, m_p, ls_p, m_q, ls_q, inv_t, kd,
               SUM_PQ: tl.constexpr, FAST_BF16: tl.constexpr, PTX: tl.constexpr,
               BLOCK_V: tl.constexpr, beta=0.5, omb=0.5):
    """The second pass of the fp32 JSD forward: per-lane sums of ``p a``, ``q S``
    (:func:`_jsd_cols`), reduced once per row. Full blocks load without a mask; ``-inf``
    columns are floored (``load_floor_f32``): their ``p`` or ``q`` is 0 and their terms
    exactly 0. ``SUM_PQ`` (a shard of the row, whose ``sum p``, ``sum q`` are not 1): the
    constants ``-log2 beta`` and ``log2(1 - beta)`` go into the terms (:func:`_jsd_acc`:
    ``log2 pc`` through the ``lg2``, ``pc = beta`` when beta >= 1/2, else ``1 - beta``, so
    that its argument stays in ``[1/2, 2]``), one instruction per column pair where summing
    ``p`` and ``q`` took two: returns ``sum p (a - log2 beta)``, ``sum q (S + log2(1 -
    beta))``. The side is a runtime choice between two copies of the loop (beta is a runtime
    argument: no compile per beta)."""
    mp = tl.where(m_p == float("-inf"), 0.0, m_p)  # a row of only -inf: shifted by 0
    mq = tl.where(m_q == float("-inf"), 0.0, m_q)
    lp2 = ls_p * 1.4426950408889634
    lq2 = ls_q * 1.4426950408889634
    k = kd + (lq2 - lp2)
    if SUM_PQ:
        if beta >= 0.5:
            acc_p, acc_q = _jsd_pass2_loop(xbase, ybase, offs, V, mp, mq, lp2, lq2, inv_t, k,
                                           kd, beta, SUM_PQ, FAST_BF16, PTX, BLOCK_V, True)
        else:
            acc_p, acc_q = _jsd_pass2_loop(xbase, ybase, offs, V, mp, mq, lp2, lq2, inv_t, k,
                                           kd, omb, SUM_PQ, FAST_BF16, PTX, BLOCK_V, False)
    else:
        acc_p, acc_q = _jsd_pass2_loop(xbase, ybase, offs, V, mp, mq, lp2, lq2, inv_t, k, kd,
                                       1.0, SUM_PQ, FAST_BF16, PTX, BLOCK_V, False)
    return tl.sum(acc_p, 0), tl.sum(acc_q, 0)


@triton.jit
def _kl_load_pair(pa, pb, HALF: tl.constexpr, FAST: tl.constexpr, CDT: tl.constexpr,
                  F16: tl.constexpr = False, PTX: tl.constexpr = False):
    """Columns ``j`` and ``j + HALF`` of rows ``a`` (``pa``) and ``b`` (``pb``), floored
    (``floor_f``), ordered by ``x_a``: ``(x_a max, x_a min, x_b of the max's column, x_b of
    the other)`` (ties: ``j`` first). With ``FAST`` (bf16 on a GPU) on packed words, per
    two words of each row: four ``max.NaN.bf16x2`` floors, one ``set.ge`` mask, a packed
    max and min of ``a`` and two ``lop3`` selects of ``b``, then the unpacks; otherwise with
    fp32 selects. A NaN ``x_a`` lands in both slots (packed ``max.NaN`` / ``min.NaN``) or
    in one of them (the failed ``>=``); either way it reaches ``r_a``. With ``F16`` (fp16 on
    fp16 inputs) **no floor** (fp16 cannot hold -1e30, and a floor per unpacked value would
    cost one instruction each): ``-inf`` stays ``-inf``, and :func:`_kl_lane_step2` with
    ``FLOOR_D`` floors the two differences instead (2 per pair of columns where these were
    4); with ``PTX`` (a GPU) the order on packed ``f16x2`` words as for bf16, then one
    ``cvt.f32.f16`` per value; the interpreter (CPU tests) orders in fp32, unfloored, the
    same values."""
    if F16 and not PTX:
        xa1 = tl.load(pa).to(CDT)
        xa2 = tl.load(pa + HALF).to(CDT)
        xb1 = tl.load(pb).to(CDT)
        xb2 = tl.load(pb + HALF).to(CDT)
        first = xa1 >= xa2
        # a NaN x_a lands in one slot (the failed >=) where the packed max.NaN / min.NaN
        # put it in both: it reaches r_a either way
        return (tl.where(first, xa1, xa2), tl.where(first, xa2, xa1),
                tl.where(first, xb1, xb2), tl.where(first, xb2, xb1))
    elif F16:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 k, t;\n .reg .b16 l, h;\n"
            "set.ge.u32.f16x2 k, $8, $9;\n"
            "max.NaN.f16x2 t, $8, $9;\n mov.b32 {l, h}, t;\n"
            "cvt.f32.f16 $0, l;\n cvt.f32.f16 $1, h;\n"
            "min.NaN.f16x2 t, $8, $9;\n mov.b32 {l, h}, t;\n"
            "cvt.f32.f16 $2, l;\n cvt.f32.f16 $3, h;\n"
            "lop3.b32 t, $10, $11, k, 0xE4;\n mov.b32 {l, h}, t;\n"
            "cvt.f32.f16 $4, l;\n cvt.f32.f16 $5, h;\n"
            "lop3.b32 t, $10, $11, k, 0xD8;\n mov.b32 {l, h}, t;\n"
            "cvt.f32.f16 $6, l;\n cvt.f32.f16 $7, h;\n"
            "}", "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
            [tl.load(pa), tl.load(pa + HALF), tl.load(pb), tl.load(pb + HALF)],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=2)
    elif FAST:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 f, a1, a2, b1, b2, k, t;\n"
            "mov.b32 f, 0xF14AF14A;\n"
            "max.NaN.bf16x2 a1, $8, f;\n max.NaN.bf16x2 a2, $9, f;\n"
            "max.NaN.bf16x2 b1, $10, f;\n max.NaN.bf16x2 b2, $11, f;\n"
            "set.ge.u32.bf16x2 k, a1, a2;\n"
            "max.NaN.bf16x2 t, a1, a2;\n shl.b32 $0, t, 16;\n and.b32 $1, t, 0xffff0000;\n"
            "min.NaN.bf16x2 t, a1, a2;\n shl.b32 $2, t, 16;\n and.b32 $3, t, 0xffff0000;\n"
            "lop3.b32 t, b1, b2, k, 0xE4;\n shl.b32 $4, t, 16;\n and.b32 $5, t, 0xffff0000;\n"
            "lop3.b32 t, b1, b2, k, 0xD8;\n shl.b32 $6, t, 16;\n and.b32 $7, t, 0xffff0000;\n"
            "}", "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r",
            [tl.load(pa), tl.load(pa + HALF), tl.load(pb), tl.load(pb + HALF)],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=2)
    else:
        xa1 = floor_f(tl.load(pa).to(CDT))
        xa2 = floor_f(tl.load(pa + HALF).to(CDT))
        xb1 = floor_f(tl.load(pb).to(CDT))
        xb2 = floor_f(tl.load(pb + HALF).to(CDT))
        first = xa1 >= xa2
        return (tl.where(first, xa1, xa2), tl.where(first, xa2, xa1),
                tl.where(first, xb1, xb2), tl.where(first, xb2, xb1))


@triton.jit
def _kl_lane_step2(xm, xn, bm, bn, m_a, r_a, acc, o, dmax, m_b, r_b, c,
                   IS_FP64: tl.constexpr, FLOOR_D: tl.constexpr = False):
    """One step of the one-pass KL over two columns per lane (``j``, ``j + HALF``): per-lane
    (max, rest) of both rows (``_common.lane_step``) and ``acc = sum 2^{(x_a - m_a) c} (d -
    o)`` over the weighting row ``a``, ``d = x_a - x_b``, ``o`` the lane's ``d`` at its
    running arg-max of ``x_a`` (so the arg-max's own term is exactly 0: a peaked row keeps
    the digits of its small KL), re-referenced and rescaled whenever ``a``'s running max
    moves, the same form as the entropy sum of lane_step: ``acc' = acc s + (d - o) (new ?
    -r' : e)``. The two columns come ordered by ``x_a`` (:func:`_kl_load_pair`: ``xm >=
    xn``, ``bm``, ``bn`` their ``x_b``); the one of larger ``x_a`` goes first, with the rescale;
    the other is never above the new max: ``r += e_n``, ``acc += (d_n - o) e_n``, no rescale
    (one rescale per pair, as ``_common.lane_step2``, which takes row ``b``). The inputs are
    floored (``floor_f``: a ``-inf`` column of ``a`` has weight 0 and adds exactly 0);
    ``dmax`` tracks the largest ``d``: a column with ``x_b = -inf`` under a finite ``x_a``
    makes it ``>= 1e29`` (the KL is ``inf``). ``FLOOR_D`` (the fp16 path of
    :func:`_kl_load_pair`, inputs not floored): the differences are floored instead, with the
    GPU's NaN-dropping max: ``x_a = -inf`` gives ``d = -inf`` (or NaN when ``x_b = -inf``
    too), both become -2e30, weight exactly 0, term 0, as with floored inputs; and ``dmax``
    is not tracked: ``x_b = -inf`` under a finite ``x_a`` gives ``d = +inf``, which makes
    ``acc`` inf or NaN for good (``inf e``, ``inf 0``, then ``acc s`` keeps it), while with
    finite fp16 inputs ``|d| <= 131008`` and ``acc`` stays finite: the caller flags a
    non-finite ``acc`` (NaN inputs give a NaN KL either way, through ``r_a`` / ``r_b``).
    The lane steps take ``-inf`` as they are (``m`` starts finite)."""
    dm = xm - bm
    dn = xn - bn
    if FLOOR_D:
        dm = tl.maximum(dm, -2.0e30)
        dn = tl.maximum(dn, -2.0e30)
    else:
        dmax = tl.maximum(dmax, tl.maximum(dm, dn))
    d = (xm - m_a) * c
    new = d > 0.0
    e = exp2_(-tl.abs(d), IS_FP64)
    s = tl.where(new, e, 1.0)
    r_a = r_a * s + e
    acc = acc * s + (dm - o) * tl.where(new, -r_a, e)
    o = tl.where(new, dm, o)
    m_a = tl.maximum(m_a, xm)
    en = exp2_((xn - m_a) * c, IS_FP64)
    r_a = r_a + en
    acc = acc + (dn - o) * en
    m_b, r_b, _ = lane_step2(bm, bn, m_b, r_b, r_b, c, False, IS_FP64)
    return m_a, r_a, acc, o, dmax, m_b, r_b


@triton.jit
def _kl_pass1(xbase, ybase, offs, V, c, IS_FP64: tl.constexpr, CDT: tl.constexpr,
              BLOCK_V: tl.constexpr):
    """Per-lane (max, rest) of both rows of a pair (the first pass of the two-pass JSD)."""
    m_p = tl.full([BLOCK_V], -1.0e30, CDT)
    r_p = tl.zeros([BLOCK_V], CDT)
    m_q = tl.full([BLOCK_V], -1.0e30, CDT)
    r_q = tl.zeros([BLOCK_V], CDT)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        x = tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT)
        y = tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT)
        m_p, r_p, _ = lane_step(x, m_p, r_p, r_p, c, False, IS_FP64)
        m_q, r_q, _ = lane_step(y, m_q, r_q, r_q, c, False, IS_FP64)
    return m_p, r_p, m_q, r_q


@triton.jit
def _kl_fwd_kernel(
        x_ptr, inner_x, stride_x, stride_x1, y_ptr, inner_y, stride_y, stride_y1,
        mask_ptr, stride_mask, kl_ptr, sp_ptr, sq_ptr,
        gp_ptr, gq_ptr,
        V, inv_t_hi, inv_t_lo, c_hi, c_lo, beta_hi, beta_lo, omb_hi, omb_lo, lb_hi, lb_lo,
        l1b_hi, l1b_lo, jk_hi, jk_lo, jb_hi, jb_lo, jo_hi, jo_lo,
        KIND: tl.constexpr, HAS_MASK: tl.constexpr, GIVEN_STATS: tl.constexpr,
        ONE_PASS: tl.constexpr, IS_FP64: tl.constexpr, CDT: tl.constexpr,
        BLOCK_V: tl.constexpr, FAST_BF16: tl.constexpr = False, PTX: tl.constexpr = False,
        PAIR_BLOCKS: tl.constexpr = False, FAST_F16: tl.constexpr = False):
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
        xbase = x_ptr + row_offset(row, inner_x, stride_x, stride_x1)
        ybase = y_ptr + row_offset(row, inner_y, stride_y, stride_y1)
        offs = tl.arange(0, BLOCK_V)
        c = const_hl(zero, c_hi, c_lo, IS_FP64)  # log2(e) / T
        if ONE_PASS:
            # reverse / forward KL in one pass over the pair (docs/math.md): with p the
            # weighting row a (q for "forward") and b the other,
            #   KL = sum p ((z_a - z_b) - (M_a - M_b) / T) - (log s_a - log s_b),
            # the first sum accumulated per lane relative to the lane's own reference
            # difference and rescaled with a's running max (_kl_lane_step2), merged once
            if KIND == 0:
                abase = xbase
                bbase = ybase
            else:
                abase = ybase
                bbase = xbase
            # two columns per lane and step (_kl_lane_step2): j and j + HALF
            HALF: tl.constexpr = BLOCK_V // 2
            lanes = tl.arange(0, HALF)
            m_a = tl.full([HALF], -1.0e30, CDT)
            r_a = tl.zeros([HALF], CDT)
            m_b = tl.full([HALF], -1.0e30, CDT)
            r_b = tl.zeros([HALF], CDT)
            acc = tl.zeros([HALF], CDT)
            o = tl.zeros([HALF], CDT)
            dmax = tl.full([HALF], -3.0e38, CDT)
            v_full = V - V % BLOCK_V
            # the pointers advance (no per-block 64-bit offset products)
            pa = abase + lanes
            pb = bbase + lanes
            if PAIR_BLOCKS:
                # 16-bit inputs: two blocks per iteration (the loop's own instructions,
                # pointer increments, compare and branch, count once per 2 BLOCK_V columns;
                # fp32 inputs would spill at the 128 registers of 8 warps)
                v_two = V - V % (2 * BLOCK_V)
                for _ in range(0, v_two, 2 * BLOCK_V):
                    xm, xn, bm, bn = _kl_load_pair(pa, pb, HALF, FAST_BF16, CDT, FAST_F16, PTX)
                    xm2, xn2, bm2, bn2 = _kl_load_pair(pa + BLOCK_V, pb + BLOCK_V, HALF,
                                                       FAST_BF16, CDT, FAST_F16, PTX)
                    m_a, r_a, acc, o, dmax, m_b, r_b = _kl_lane_step2(
                        xm, xn, bm, bn, m_a, r_a, acc, o, dmax, m_b, r_b, c, IS_FP64,
                        FAST_F16)
                    m_a, r_a, acc, o, dmax, m_b, r_b = _kl_lane_step2(
                        xm2, xn2, bm2, bn2, m_a, r_a, acc, o, dmax, m_b, r_b, c, IS_FP64,
                        FAST_F16)
                    pa += 2 * BLOCK_V
                    pb += 2 * BLOCK_V
                if v_two < v_full:  # an odd number of full blocks: the last one
                    xm, xn, bm, bn = _kl_load_pair(pa, pb, HALF, FAST_BF16, CDT, FAST_F16, PTX)
                    m_a, r_a, acc, o, dmax, m_b, r_b = _kl_lane_step2(
                        xm, xn, bm, bn, m_a, r_a, acc, o, dmax, m_b, r_b, c, IS_FP64,
                        FAST_F16)
            else:
                for _ in range(0, v_full, BLOCK_V):
                    xm, xn, bm, bn = _kl_load_pair(pa, pb, HALF, FAST_BF16, CDT, FAST_F16, PTX)
                    m_a, r_a, acc, o, dmax, m_b, r_b = _kl_lane_step2(
                        xm, xn, bm, bn, m_a, r_a, acc, o, dmax, m_b, r_b, c, IS_FP64,
                        FAST_F16)
                    pa += BLOCK_V
                    pb += BLOCK_V
            if v_full < V:
                c1 = v_full + lanes
                c2 = c1 + HALF
                xa1 = floor_f(tl.load(abase + c1, mask=c1 < V, other=float("-inf")).to(CDT))
                xa2 = floor_f(tl.load(abase + c2, mask=c2 < V, other=float("-inf")).to(CDT))
                xb1 = floor_f(tl.load(bbase + c1, mask=c1 < V, other=float("-inf")).to(CDT))
                xb2 = floor_f(tl.load(bbase + c2, mask=c2 < V, other=float("-inf")).to(CDT))
                first = xa1 >= xa2
                m_a, r_a, acc, o, dmax, m_b, r_b = _kl_lane_step2(
                    tl.where(first, xa1, xa2), tl.where(first, xa2, xa1),
                    tl.where(first, xb1, xb2), tl.where(first, xb2, xb1),
                    m_a, r_a, acc, o, dmax, m_b, r_b, c, IS_FP64)
            if FAST_F16:
                # the fp16 loop does not track dmax: a d = +inf left acc non-finite
                # (_kl_lane_step2, FLOOR_D)
                dmax = tl.where(tl.abs(acc) < float("inf"), dmax, 3.0e38)
            big_a, rest_a, _ = lane_merge(m_a, r_a, r_a, lanes, c, HALF, False, IS_FP64)
            big_b, rest_b, _ = lane_merge(m_b, r_b, r_b, lanes, c, HALF, False, IS_FP64)
            # a row of only -inf is shifted by 0 (as _kl_logs does)
            sa = tl.where(big_a == float("-inf"), zero, big_a)
            sb = tl.where(big_b == float("-inf"), zero, big_b)
            # the row's reference o* = d at a's arg-max (the first lane holding it): a lane's
            # sum_j w_j (d_j - o*) = acc + W (o - o*), W = r + 1 its weight, moved to the row
            # max by sc (0 for a lane with no finite column); the arg-max adds exactly 0
            top = tl.max(m_a, 0)
            first = tl.min(tl.where(m_a == top, lanes, HALF), 0)
            o_top = tl.sum(tl.where(lanes == first, o, 0.0), 0)
            sc = exp2_((m_a - top) * c, IS_FP64)
            a_sum = tl.sum(sc * (acc + (r_a + 1.0) * (o - o_top)), 0)
            ls_a = log1p(rest_a, IS_FP64)
            ls_b = log1p(rest_b, IS_FP64)
            # KL = (sum p (d - o*) + (o* - (M_a - M_b))) / T - (log s_a - log s_b)
            off = mul_hl(o_top - (sa - sb), inv_t_hi, inv_t_lo, IS_FP64) - (ls_a - ls_b)
            # sum p ((x_a - M_a) - (x_b - M_b)) / T - log s_a + log s_b; a row of only -inf is
            # shifted by 0 (as _kl_logs does)
            sa = tl.where(big_a == float("-inf"), zero, big_a)
            sb = tl.where(big_b == float("-inf"), zero, big_b)
            kl = mul_hl(a_sum / (1.0 + rest_a), inv_t_hi, inv_t_lo, IS_FP64) + off
            # a column with p > 0 and q = 0: inf (NaN logits still give NaN through log s)
            kl = tl.where(tl.max(dmax, 0) >= 1.0e29, float("inf") + (ls_a + ls_b) * 0.0, kl)
            # p = 0 everywhere: no terms (kl * 0, not 0: a row of only NaN has no finite max
            # either, and keeps its NaN)
            kl = tl.where(big_a == float("-inf"), kl * 0.0, kl)
            m_a = mul_hl(big_a, inv_t_hi, inv_t_lo, IS_FP64)
            m_b = mul_hl(big_b, inv_t_hi, inv_t_lo, IS_FP64)
            tl.store(kl_ptr + row, kl)
            if KIND == 0:
                tl.store(sp_ptr + row * 3, m_a)
                tl.store(sp_ptr + row * 3 + 1, ls_a)
                tl.store(sp_ptr + row * 3 + 2, kl)
                tl.store(sq_ptr + row * 3, m_b)
                tl.store(sq_ptr + row * 3 + 1, ls_b)
                tl.store(sq_ptr + row * 3 + 2, zero)
            else:
                tl.store(sp_ptr + row * 3, m_b)
                tl.store(sp_ptr + row * 3 + 1, ls_b)
                tl.store(sp_ptr + row * 3 + 2, zero)
                tl.store(sq_ptr + row * 3, m_a)
                tl.store(sq_ptr + row * 3 + 1, ls_a)
                tl.store(sq_ptr + row * 3 + 2, kl)
        else:
            if GIVEN_STATS:
                # vocabulary parallelism: the all-shard (max, log s) of both rows are given
                m_p = tl.load(gp_ptr + row * 3).to(CDT)
                ls_p = tl.load(gp_ptr + row * 3 + 1).to(CDT)
                m_q = tl.load(gq_ptr + row * 3).to(CDT)
                ls_q = tl.load(gq_ptr + row * 3 + 1).to(CDT)
            else:
                # pass 1: (max, log1p rest) of both rows, per lane (_common.lane_step)
                m_p, r_p, m_q, r_q = _kl_pass1(xbase, ybase, offs, V, c, IS_FP64, CDT, BLOCK_V)
                m_p, rest_p, _ = lane_merge(m_p, r_p, r_p, offs, c, BLOCK_V, False, IS_FP64)
                m_q, rest_q, _ = lane_merge(m_q, r_q, r_q, offs, c, BLOCK_V, False, IS_FP64)
                m_p = mul_hl(m_p, inv_t_hi, inv_t_lo, IS_FP64)  # max z, rounded as every z is
                m_q = mul_hl(m_q, inv_t_hi, inv_t_lo, IS_FP64)
                ls_p = log1p(rest_p, IS_FP64)
                ls_q = log1p(rest_q, IS_FP64)
            # pass 2: the KL sums, from log p and log q (needs the whole of pass 1)
            beta = const_hl(zero, beta_hi, beta_lo, IS_FP64)
            omb = const_hl(zero, omb_hi, omb_lo, IS_FP64)
            lb = const_hl(zero, lb_hi, lb_lo, IS_FP64)
            l1b = const_hl(zero, l1b_hi, l1b_lo, IS_FP64)
            acc_p = zero
            acc_q = zero
            if (KIND == 2) & (IS_FP64 == 0):
                # fp32 JSD (_jsd_cols): sum p a_p = beta ln2 sum p a - beta log(beta) sum p,
                # sum q a_q = -(1 - beta) ln2 sum q S - (1 - beta) log(1 - beta) sum q; the
                # sums of p and q are 1 on a whole row (0 on a row of only -inf); a shard's
                # part (GIVEN_STATS) takes the constants into its terms (_jsd_pass2)
                t_p, t_q = _jsd_pass2(xbase, ybase, offs, V, m_p, ls_p, m_q, ls_q, inv_t_hi,
                                      jk_hi, GIVEN_STATS, FAST_BF16, PTX, BLOCK_V, beta, omb)
                if GIVEN_STATS:
                    acc_p = beta * (0.6931471805599453 * t_p)
                    acc_q = -omb * (0.6931471805599453 * t_q)
                else:
                    n_p = tl.where(m_p == float("-inf"), 0.0, 1.0)
                    n_q = tl.where(m_q == float("-inf"), 0.0, 1.0)
                    acc_p = beta * (0.6931471805599453 * t_p) - jb_hi * n_p
                    acc_q = -omb * (0.6931471805599453 * t_q) - jo_hi * n_q
            else:
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
        g_ptr, stride_g, x_ptr, inner_x, stride_x, stride_x1, y_ptr, inner_y, stride_y,
        stride_y1, mask_ptr, stride_mask,
        sp_ptr, stride_sp0, stride_sp1, sq_ptr, stride_sq0, stride_sq1,
        gx_ptr, stride_gx, gy_ptr, stride_gy,
        V, inv_t_hi, inv_t_lo, beta_hi, beta_lo, omb_hi, omb_lo, lb_hi, lb_lo, l1b_hi, l1b_lo,
        jk_hi, jk_lo, jb_hi, jb_lo, jo_hi, jo_lo,
        KIND: tl.constexpr, HAS_MASK: tl.constexpr, NEED_W: tl.constexpr,
        IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK_V: tl.constexpr,
        FAST_BF16: tl.constexpr = False, PTX: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:
        skip = tl.load(mask_ptr + row * stride_mask) != 0
    else:
        skip = False
    gxbase = gx_ptr + row * stride_gx
    gybase = gy_ptr + row * stride_gy
    offs = tl.arange(0, BLOCK_V)
    if skip:
        zero_grad_rows(gxbase, gybase, V, NEED_W, CDT, BLOCK_V)
    else:
        xbase = x_ptr + row_offset(row, inner_x, stride_x, stride_x1)
        ybase = y_ptr + row_offset(row, inner_y, stride_y, stride_y1)
        zero = tl.zeros([], CDT)
        g = mul_hl(tl.load(g_ptr + row * stride_g).to(CDT), inv_t_hi, inv_t_lo, IS_FP64)
        m_p, ls_p, sum_p, m_q, ls_q, sum_q = load_pair_stats(
            row, sp_ptr, stride_sp0, stride_sp1, sq_ptr, stride_sq0, stride_sq1, CDT)
        beta = const_hl(zero, beta_hi, beta_lo, IS_FP64)
        omb = const_hl(zero, omb_hi, omb_lo, IS_FP64)
        lb = const_hl(zero, lb_hi, lb_lo, IS_FP64)
        l1b = const_hl(zero, l1b_hi, l1b_lo, IS_FP64)
        # reverse / forward KL: a - KL = (z - w) - Y with Y = KL + (M_p - M_q) + (log s_p -
        # log s_q) = sum p (z - w) (its mirror for forward KL), Y as an unrounded pair
        # hi + lo: no log s in the per-column term, and at a column holding both maxima
        # z - w and M_p - M_q round alike (docs/math.md)
        y_p, y_p_lo = _kl_offset(sum_p, m_p, m_q, ls_p - ls_q)
        y_q, y_q_lo = _kl_offset(sum_q, m_q, m_p, ls_q - ls_p)
        if (KIND == 2) & (IS_FP64 == 0):
            # fp32 JSD (_jsd_cols): a_p - sum p a_p = beta ln2 a - (beta log beta + sum p a_p),
            # a_q - sum q a_q = -(1 - beta) ln2 S - ((1 - beta) log(1 - beta) + sum q a_q),
            # the upstream gradient g / T folded into the two coefficients
            mp = tl.where(m_p == float("-inf"), 0.0, m_p)
            mq = tl.where(m_q == float("-inf"), 0.0, m_q)
            lp2 = ls_p * 1.4426950408889634
            lq2 = ls_q * 1.4426950408889634
            k = jk_hi + (lq2 - lp2)
            cp = g * beta * 0.6931471805599453
            kp = g * (jb_hi + sum_p)
            cq = g * omb * 0.6931471805599453
            kq = g * (jo_hi + sum_q)
            v_full = V - V % BLOCK_V
            for start in range(0, v_full, BLOCK_V):
                x = load_floor_f32(xbase + start + offs, FAST_BF16, CDT)
                y = load_floor_f32(ybase + start + offs, FAST_BF16, CDT)
                p, q, a, s = _jsd_cols(x, y, mp, mq, lp2, lq2, inv_t_hi, k, PTX)
                tl.store(gxbase + start + offs, (p * (cp * a - kp)).to(gx_ptr.dtype.element_ty))
                if NEED_W:
                    tl.store(gybase + start + offs,
                             (-q * (cq * s + kq)).to(gy_ptr.dtype.element_ty))
            if v_full < V:
                cols = v_full + offs
                inb = cols < V
                x = floor_f(tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT))
                y = floor_f(tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT))
                p, q, a, s = _jsd_cols(x, y, mp, mq, lp2, lq2, inv_t_hi, k, PTX)
                tl.store(gxbase + cols, (p * (cp * a - kp)).to(gx_ptr.dtype.element_ty),
                         mask=inb)
                if NEED_W:
                    tl.store(gybase + cols, (-q * (cq * s + kq)).to(gy_ptr.dtype.element_ty),
                             mask=inb)
        else:
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                inb = cols < V
                x = tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT)
                y = tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT)
                z = mul_hl(x, inv_t_hi, inv_t_lo, IS_FP64)
                w = mul_hl(y, inv_t_hi, inv_t_lo, IS_FP64)
                logp, logq = _kl_logs(z, w, m_p, ls_p, m_q, ls_q)
                p = tl.exp(logp)
                q = tl.exp(logq)
                # r (a - sum r a), the sum saved by forward
                if KIND == 0:
                    d_z = xmul0(p, ((z - w) - y_p) - y_p_lo)
                    d_w = q - p
                elif KIND == 1:
                    d_z = p - q
                    d_w = xmul0(q, ((w - z) - y_q) - y_q_lo)
                else:
                    a_p, a_q = _jsd_a(logp, logq, beta, omb, lb, l1b, IS_FP64)
                    d_z = xmul0(p, a_p) - p * sum_p
                    d_w = xmul0(q, a_q) - q * sum_q
                tl.store(gxbase + cols, (g * d_z).to(gx_ptr.dtype.element_ty), mask=inb)
                if NEED_W:
                    tl.store(gybase + cols, (g * d_w).to(gy_ptr.dtype.element_ty), mask=inb)


# The one-pass reverse/forward KL forward (ONE_PASS) reads each input once. Its KL, formed as
# ``sum p (x_a - x_b) / T - (M_a - M_b) - (log s_a - log s_b)``, is not rounded like the sum
# ``sum p (log p - log q)`` of the two-pass form, so the backward does not form
# ``p (log p - log q) - p KL`` (whose accuracy relied on the two matching: verify saw 4.0e-7
# against a 2.3e-7 bound): it forms ``p ((x_a - x_b) / T - Y)`` with the same per-column
# difference the forward sums and ``Y = KL + (M_a - M_b) + (log s_a - log s_b)`` as an
# unrounded pair (docs/math.md). The two-pass form stays for JSD and the partial forward.
_KL_ONE_PASS = True

# the f-divergences beyond KL / JSD (alpha: ``beta`` carries alpha; tv) have their own
# kernels in :mod:`rlkernels.triton._divergence`, same functions and signatures as below
_FDIV_KINDS = ("alpha", "tv")


def _fdiv():
    from . import _divergence
    return _divergence


def _beta_args(beta: float):
    """``beta, 1 - beta, log beta, log(1 - beta)`` as fp32 (hi, lo) pairs."""
    omb = 1.0 - beta
    lb = math.log(beta) if beta > 0 else -math.inf
    l1b = math.log(omb) if omb > 0 else -math.inf
    return (*split(beta), *split(omb), *split(lb), *split(l1b))


# log2 beta - log2 (1 - beta) when beta is 0 or 1: a finite stand-in for -inf / +inf that
# keeps the fp32 JSD's D (_jsd_cols) far enough from 0 that 2^-|D| = 0 (its terms then are
# exactly 0, as the reference's are)
_JSD_FAR = 1000.0


def _jsd_args(beta: float):
    """The fp32 JSD's constants (_jsd_cols) as (hi, lo) pairs: ``k = log2 beta - log2(1 -
    beta)`` (+-_JSD_FAR at the ends), ``beta log beta`` and ``(1 - beta) log(1 - beta)`` (0 at
    the ends)."""
    omb = 1.0 - beta
    if beta <= 0.0:
        k = -_JSD_FAR
    elif omb <= 0.0:
        k = _JSD_FAR
    else:
        k = max(-_JSD_FAR, min(_JSD_FAR, math.log2(beta) - math.log2(omb)))
    jb = beta * math.log(beta) if beta > 0 else 0.0
    jo = omb * math.log(omb) if omb > 0 else 0.0
    return (*split(k), *split(jb), *split(jo))


def kl_divergence_forward(logits: Tensor, ref_logits: Tensor, ignore_mask: Optional[Tensor],
                          kind: str, beta: float, temperature: float
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``(kl [...], stats_p [..., 3], stats_q [..., 3])`` for logits ``[..., V]``
    like the reference; the third columns hold ``sum p a_p`` and ``sum q a_q``.
    ``ignore_mask`` (``[...]``) rows: kl 0, stats 0 (never read), the rows are not read."""
    if kind in _FDIV_KINDS:
        return _fdiv().kl_divergence_forward(logits, ref_logits, ignore_mask, kind, beta,
                                             temperature)
    return _kl_forward(logits, ref_logits, ignore_mask, None, None, kind, beta, temperature)


def kl_divergence_partial_forward(logits: Tensor, ref_logits: Tensor,
                                  ignore_mask: Optional[Tensor], stats_p: Tensor,
                                  stats_q: Tensor, kind: str, beta: float, temperature: float
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`kl_divergence_forward` with ``(max, log s)`` of both rows given (columns 0, 1 of
    ``stats_p`` / ``stats_q``): only the second pass runs. Vocabulary parallelism: with the
    all-shard statistics the outputs are this shard's part of the KL sums."""
    if kind in _FDIV_KINDS:
        return _fdiv().kl_divergence_partial_forward(logits, ref_logits, ignore_mask, stats_p,
                                                     stats_q, kind, beta, temperature)
    return _kl_forward(logits, ref_logits, ignore_mask, stats_p, stats_q, kind, beta,
                       temperature)


def _kl_forward(logits, ref_logits, ignore_mask, given_p, given_q, kind, beta, temperature):
    def meta(x, y, cdt, given):
        # fp64: the two-pass form (the one-pass state, 7 fp64 arrays, spills 56 B at 255
        # registers on sm_90a; the two-pass one does not)
        one = _KL_ONE_PASS and kind != "jsd" and not given and cdt != torch.float64
        # FAST_F16: the one-pass loop's unfloored fp16 pair (_kl_load_pair: packed on a
        # GPU; the interpreter runs the same arithmetic after a plain load)
        return dict(ONE_PASS=one, PTX=x.is_cuda,
                    PAIR_BLOCKS=x.element_size() == 2 and y.element_size() == 2,
                    FAST_F16=one and x.dtype == y.dtype == torch.float16)

    return _pair_forward(_kl_fwd_kernel, logits, ref_logits, ignore_mask, given_p, given_q,
                         kind, temperature, (*_beta_args(beta), *_jsd_args(beta)), meta)


def _pair_forward(kernel, logits, ref_logits, ignore_mask, given_p, given_q, kind, temperature,
                  scalars, meta):
    """Launch a two-input row forward (``_kl_fwd_kernel``, and the f-divergences' of
    :mod:`rlkernels.triton._divergence`): ``(kl [N], stats_p [N, 3], stats_q [N, 3])``.
    ``scalars``: the kind's runtime arguments after ``LOG2E / T``; ``meta(x, y, cdt, given)``:
    the kernel's own constexprs."""
    vocab, n, lead = logits.shape[-1], n_rows(logits), logits.shape[:-1]
    x, y = unit_stride(rows3(logits)), unit_stride(rows3(ref_logits))
    cdt = compute_dtype(x.dtype)
    kl = x.new_empty(lead, dtype=cdt)
    stats_p = x.new_empty((*lead, 3), dtype=cdt)
    stats_q = x.new_empty((*lead, 3), dtype=cdt)
    if n == 0:
        return kl, stats_p, stats_q
    has_mask = ignore_mask is not None
    mask, mask_stride = per_row(ignore_mask.view(torch.uint8)) if has_mask else (kl, 0)
    given = given_p is not None
    gp = given_p.to(cdt).contiguous() if given else kl   # a dummy pointer when not given
    gq = given_q.to(cdt).contiguous() if given else kl
    block = block_v(vocab, x.dtype)
    with device_guard(x):
        kernel[(n,)](
            x, *row_layout(x), y, *row_layout(y), mask, mask_stride,
            kl, stats_p, stats_q, gp, gq, vocab, *split(1.0 / temperature),
            *split(LOG2E / temperature), *scalars, KIND=_KINDS[kind],
            HAS_MASK=has_mask, GIVEN_STATS=given, IS_FP64=cdt == torch.float64,
            CDT=tl_compute_dtype(cdt), BLOCK_V=block,
            FAST_BF16=fast_bf16(x) and y.dtype == torch.bfloat16, num_warps=num_warps(block),
            **meta(x, y, cdt, given))
    return kl, stats_p, stats_q


def kl_divergence_backward(grad_kl: Tensor, logits: Tensor, ref_logits: Tensor,
                           ignore_mask: Optional[Tensor], stats_p: Tensor, stats_q: Tensor,
                           kind: str, beta: float, temperature: float, need_ref_grad: bool
                           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``logits`` and (if ``need_ref_grad``) ``ref_logits``, in their
    dtypes, one pass over the row pair; ``ignore_mask`` rows receive exactly 0. The
    gradients are contiguous, of the inputs' shapes."""
    if kind in _FDIV_KINDS:
        return _fdiv().kl_divergence_backward(grad_kl, logits, ref_logits, ignore_mask,
                                              stats_p, stats_q, kind, beta, temperature,
                                              need_ref_grad)
    return _pair_backward(_kl_bwd_kernel, grad_kl, logits, ref_logits, ignore_mask, stats_p,
                          stats_q, kind, temperature, need_ref_grad,
                          (*_beta_args(beta), *_jsd_args(beta)),
                          lambda x: dict(PTX=x.is_cuda))


def _pair_backward(kernel, grad_kl, logits, ref_logits, ignore_mask, stats_p, stats_q, kind,
                   temperature, need_ref_grad, scalars, meta):
    """Launch a two-input row backward (``_kl_bwd_kernel``, and the f-divergences'):
    ``(d logits, d ref_logits or None)``, contiguous, in the inputs' dtypes. ``scalars``: the
    kind's runtime arguments after ``1 / T``; ``meta(x)``: the kernel's own constexprs.
    Shapes as :func:`_pair_forward`'s."""
    vocab, n = logits.shape[-1], n_rows(logits)
    x, y = unit_stride(rows3(logits)), unit_stride(rows3(ref_logits))
    cdt = compute_dtype(x.dtype)
    grad_z = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_w = (torch.empty(ref_logits.shape, dtype=ref_logits.dtype, device=ref_logits.device)
              if need_ref_grad else None)
    if n == 0:
        return grad_z, grad_w
    has_mask = ignore_mask is not None
    mask = per_row(ignore_mask.view(torch.uint8)) if has_mask else (stats_p, 0)
    sp, sq = per_row(stats_p, 1), per_row(stats_q, 1)
    gw = grad_w if need_ref_grad else grad_z  # a dummy pointer, never written
    block = block_v(vocab, x.dtype)
    with device_guard(x):
        kernel[(n,)](
            *per_row(grad_kl), x, *row_layout(x), y, *row_layout(y), *mask,
            *sp, sp[0].stride(-1), *sq, sq[0].stride(-1),
            grad_z, vocab, gw, vocab,  # both contiguous
            vocab, *split(1.0 / temperature), *scalars,
            KIND=_KINDS[kind], HAS_MASK=has_mask, NEED_W=bool(need_ref_grad),
            IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt), BLOCK_V=block,
            FAST_BF16=fast_bf16(x) and y.dtype == torch.bfloat16, num_warps=num_warps(block),
            **meta(x))
    return grad_z, grad_w


__all__ = ["token_logprobs_forward", "token_logprobs_backward", "kl_divergence_forward",
           "kl_divergence_partial_forward", "kl_divergence_backward"]
