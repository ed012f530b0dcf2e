"""Triton kernels of ``kl_divergence`` kinds ``"alpha"`` and ``"tv"`` (issue 21): the
f-divergences beyond KL / JSD. Same launcher functions and signatures as
:mod:`rlkernels.triton.vocab` (which routes these kinds here), same outputs and saved
statistics as :mod:`rlkernels.reference.vocab` (``_fdiv_terms`` states the math;
docs/math.md, "f-divergences: alpha and total variation (issue 21)").

Layout: one program per row pair (``grid = (N,)``: batch invariance, no atomics).

* Forward: TWO passes over the pair. Pass 1 keeps per-lane online softmax statistics of both
  rows (:func:`._common.lane_step`, merged once per row by :func:`._common.lane_merge`);
  pass 2 sums the per-column terms from ``log p`` and ``log q``, which need both normalizers:
  tv's sign of ``p - q`` cannot be known before them, and alpha's one-pass form
  ``-expm1(lse(a z + (1-a) w) - a lse(z) - (1-a) lse(w)) / (a (1-a))`` loses the digits of
  the small exponent to the rounding of the three ``lse`` (docs/math.md). The terms are
  accumulated per lane and reduced once per row. ``kl_divergence_partial_forward`` runs
  pass 2 only, on the statistics it is given (vocabulary parallelism: the all-shard ones).
* Saved ``stats[:, 2]``: alpha ``(D, 0)``; tv ``(0.5 sum p s, -0.5 sum q s)``, ``s =
  sign(p - q)`` (their sum is ``D``, and each is what one gradient needs).
* Backward: ONE pass over the pair (the row sums it needs are saved).

Rows with ``ignore_mask`` True are not read: kl 0, stats 0, exactly-zero gradients.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._codes import KL_KINDS
from ._common import (LOG2E, block_v, compute_dtype, const_hl, device_guard, expm1, fast_bf16,
                      lane_merge, lane_step, load_bf16_f32, log1p, mul_hl, n_rows, num_warps,
                      row_layout, row_offset, split, tl_compute_dtype, unit_stride)

Tensor = torch.Tensor

_KINDS = KL_KINDS  # rlkernels/_codes.py: alpha 3, tv 4 (the KIND constexpr)


@triton.jit
def _logs(z, w, m_p, ls_p, m_q, ls_q):
    """``log p``, ``log q`` of a block from the row statistics; a row of only ``-inf``
    (``m = -inf``) is shifted by 0, as the reference does (log-probs ``-inf``, not NaN)."""
    m_p = tl.where(m_p == float("-inf"), 0.0, m_p)
    m_q = tl.where(m_q == float("-inf"), 0.0, m_q)
    return (z - m_p) - ls_p, (w - m_q) - ls_q


@triton.jit
def _pow_gap(u, logu, logv, c, IS_FP64: tl.constexpr):
    """``u^(1-c) v^c - u = u expm1(c (log v - log u))`` for ``c <= 1/2`` (the forward's
    terms; the reference's ``_pow_gap`` without its second branch, one ``exp``): ``u > 0``
    bounds the exponent (``log u >= -104`` in fp32, ``-745`` in fp64, so ``c (log v - log u)
    <= 52``, ``373``: no overflow); where ``u`` underflows to 0 the gap is ``u^(1-c) v^c <=
    sqrt(u v) < 1e-22``, taken as 0, which also covers ``u = v = 0`` (exponent NaN) and ``u =
    0 < v`` (``0 * inf``). ``v = 0 < u``: ``expm1(-inf) = -1``, the gap is ``-u``."""
    return tl.where(u == 0.0, 0.0, u * expm1(c * (logv - logu), IS_FP64))


@triton.jit
def _pow_gap_r(u, logu, logv, c, r, IS_FP64: tl.constexpr):
    """``r - u`` with ``r = u^(1-c) v^c`` given, any ``c`` in ``(0, 1)`` (the backward's two
    gaps share ``r``): ``u expm1(c (log v - log u))`` while that exponent is ``<= 1``, the
    plain difference above (no cancellation: ``r > e u``; for ``c > 1/2`` a subnormal ``u``
    could overflow ``expm1``), as the reference's ``_pow_gap``."""
    e = c * (logv - logu)
    small = e <= 1.0
    return tl.where(small, u * expm1(tl.where(small, e, 0.0), IS_FP64), r - u)


@triton.jit
def _alpha_term(p, logp, q, logq, a, b, P_FORM, IS_FP64: tl.constexpr):
    """``a p + (1-a) q - p^a q^(1-a) >= 0`` (``b = 1 - a``; the row sum over ``a b`` is
    ``D``), the expm1 form around ``p`` when ``P_FORM`` (``a >= 1/2``), around ``q``
    otherwise: the small weight is the exponent's factor."""
    u = tl.where(P_FORM, p, q)
    v = tl.where(P_FORM, q, p)
    lu = tl.where(P_FORM, logp, logq)
    lv = tl.where(P_FORM, logq, logp)
    c = tl.where(P_FORM, b, a)     # the weight of v in the geometric mean, <= 1/2
    return c * (v - u) - _pow_gap(u, lu, lv, c, IS_FP64)


@triton.jit
def _sign(p, q):
    return tl.where(p > q, 1.0, tl.where(p < q, -1.0, 0.0))


@triton.jit
def _fdiv_fwd_kernel(
        x_ptr, inner_x, stride_x, stride_x1, y_ptr, inner_y, stride_y, stride_y1,
        mask_ptr, stride_mask, kl_ptr, sp_ptr, sq_ptr, gp_ptr, gq_ptr,
        V, inv_t_hi, inv_t_lo, c_hi, c_lo, a_hi, a_lo, b_hi, b_lo,
        KIND: tl.constexpr, HAS_MASK: tl.constexpr, GIVEN_STATS: tl.constexpr,
        IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK_V: tl.constexpr,
        FAST_BF16: tl.constexpr = False):
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
        v_full = V - V % BLOCK_V
        if GIVEN_STATS:
            # vocabulary parallelism: the all-shard (max, log s) of both rows are given
            m_p = tl.load(gp_ptr + row * 3).to(CDT)
            ls_p = tl.load(gp_ptr + row * 3 + 1).to(CDT)
            m_q = tl.load(gq_ptr + row * 3).to(CDT)
            ls_q = tl.load(gq_ptr + row * 3 + 1).to(CDT)
        else:
            # pass 1: per-lane (max, rest) of both rows (_common.lane_step), merged once
            c = const_hl(zero, c_hi, c_lo, IS_FP64)  # log2(e) / T
            mp = tl.full([BLOCK_V], -1.0e30, CDT)
            rp = tl.zeros([BLOCK_V], CDT)
            mq = tl.full([BLOCK_V], -1.0e30, CDT)
            rq = tl.zeros([BLOCK_V], CDT)
            for start in range(0, v_full, BLOCK_V):
                if FAST_BF16:
                    x = load_bf16_f32(xbase + start + offs, True)
                    y = load_bf16_f32(ybase + start + offs, True)
                else:
                    x = tl.load(xbase + start + offs).to(CDT)
                    y = tl.load(ybase + start + offs).to(CDT)
                mp, rp, _ = lane_step(x, mp, rp, rp, c, False, IS_FP64)
                mq, rq, _ = lane_step(y, mq, rq, rq, c, False, IS_FP64)
            if v_full < V:
                cols = v_full + offs
                inb = cols < V
                x = tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT)
                y = tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT)
                mp, rp, _ = lane_step(x, mp, rp, rp, c, False, IS_FP64)
                mq, rq, _ = lane_step(y, mq, rq, rq, c, False, IS_FP64)
            big_p, rest_p, _ = lane_merge(mp, rp, rp, offs, c, BLOCK_V, False, IS_FP64)
            big_q, rest_q, _ = lane_merge(mq, rq, rq, offs, c, BLOCK_V, False, IS_FP64)
            m_p = mul_hl(big_p, inv_t_hi, inv_t_lo, IS_FP64)  # max z, rounded as every z is
            m_q = mul_hl(big_q, inv_t_hi, inv_t_lo, IS_FP64)
            ls_p = log1p(rest_p, IS_FP64)
            ls_q = log1p(rest_q, IS_FP64)
        # pass 2: the per-column terms, per lane, from log p and log q
        a = const_hl(zero, a_hi, a_lo, IS_FP64)
        b = const_hl(zero, b_hi, b_lo, IS_FP64)
        p_form = a >= 0.5
        acc1 = tl.zeros([BLOCK_V], CDT)   # alpha: AM-GM gaps; tv: |p - q|
        acc2 = tl.zeros([BLOCK_V], CDT)   # tv: p s
        acc3 = tl.zeros([BLOCK_V], CDT)   # tv: q s
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inb = cols < V
            z = mul_hl(tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT),
                       inv_t_hi, inv_t_lo, IS_FP64)
            w = mul_hl(tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT),
                       inv_t_hi, inv_t_lo, IS_FP64)
            logp, logq = _logs(z, w, m_p, ls_p, m_q, ls_q)
            p = tl.exp(logp)
            q = tl.exp(logq)
            if KIND == 3:
                acc1 += _alpha_term(p, logp, q, logq, a, b, p_form, IS_FP64)
            else:
                s = _sign(p, q)
                acc1 += tl.abs(p - q)
                acc2 += p * s
                acc3 += q * s
        if KIND == 3:
            kl = tl.sum(acc1, 0) / (a * b)
            sum_p = kl
            sum_q = zero
        else:
            kl = 0.5 * tl.sum(acc1, 0)
            sum_p = 0.5 * tl.sum(acc2, 0)
            sum_q = -0.5 * tl.sum(acc3, 0)
        tl.store(kl_ptr + row, kl)
        tl.store(sp_ptr + row * 3, m_p)
        tl.store(sp_ptr + row * 3 + 1, ls_p)
        tl.store(sp_ptr + row * 3 + 2, sum_p)
        tl.store(sq_ptr + row * 3, m_q)
        tl.store(sq_ptr + row * 3 + 1, ls_q)
        tl.store(sq_ptr + row * 3 + 2, sum_q)


@triton.jit
def _fdiv_bwd_kernel(
        g_ptr, stride_g, x_ptr, inner_x, stride_x, stride_x1, y_ptr, inner_y, stride_y,
        stride_y1, mask_ptr, stride_mask,
        sp_ptr, stride_sp0, stride_sp1, sq_ptr, stride_sq0, stride_sq1,
        gx_ptr, stride_gx, gy_ptr, stride_gy,
        V, inv_t_hi, inv_t_lo, a_hi, a_lo, b_hi, b_lo, ia_hi, ia_lo, ib_hi, ib_lo,
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
        xbase = x_ptr + row_offset(row, inner_x, stride_x, stride_x1)
        ybase = y_ptr + row_offset(row, inner_y, stride_y, stride_y1)
        zero = tl.zeros([], CDT)
        g = mul_hl(tl.load(g_ptr + row * stride_g).to(CDT), inv_t_hi, inv_t_lo, IS_FP64)
        m_p = tl.load(sp_ptr + row * stride_sp0).to(CDT)
        ls_p = tl.load(sp_ptr + row * stride_sp0 + stride_sp1).to(CDT)
        sum_p = tl.load(sp_ptr + row * stride_sp0 + 2 * stride_sp1).to(CDT)
        m_q = tl.load(sq_ptr + row * stride_sq0).to(CDT)
        ls_q = tl.load(sq_ptr + row * stride_sq0 + stride_sq1).to(CDT)
        sum_q = tl.load(sq_ptr + row * stride_sq0 + 2 * stride_sq1).to(CDT)
        a = const_hl(zero, a_hi, a_lo, IS_FP64)
        b = const_hl(zero, b_hi, b_lo, IS_FP64)
        # 1 / a, 1 / (1 - a): a multiply per column instead of a division (~10 instructions)
        inv_a = const_hl(zero, ia_hi, ia_lo, IS_FP64)
        inv_b = const_hl(zero, ib_hi, ib_lo, IS_FP64)
        d = sum_p + sum_q  # alpha: D (the all-shard value under vocabulary parallelism)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            inb = cols < V
            z = mul_hl(tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT),
                       inv_t_hi, inv_t_lo, IS_FP64)
            w = mul_hl(tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT),
                       inv_t_hi, inv_t_lo, IS_FP64)
            logp, logq = _logs(z, w, m_p, ls_p, m_q, ls_q)
            p = tl.exp(logp)
            q = tl.exp(logq)
            if KIND == 3:
                # (p S - r) / (1-a) = (p - r) / (1-a) - a p D, and (q S - r) / a likewise:
                # p - r by expm1 keeps the digits that the division by 1 - a (or a) exposes
                r = tl.exp(a * logp + b * logq)
                d_z = -_pow_gap_r(p, logp, logq, b, r, IS_FP64) * inv_b - a * p * d
                d_w = -_pow_gap_r(q, logq, logp, a, r, IS_FP64) * inv_a - b * q * d
            else:
                s = _sign(p, q)
                # 0.5 p (s - sum p s) and -0.5 q (s - sum q s); the saved sums are
                # 0.5 sum p s and -0.5 sum q s
                d_z = 0.5 * p * s - p * sum_p
                d_w = -0.5 * q * s - q * sum_q
            tl.store(gxbase + cols, (g * d_z).to(gx_ptr.dtype.element_ty), mask=inb)
            if NEED_W:
                tl.store(gybase + cols, (g * d_w).to(gy_ptr.dtype.element_ty), mask=inb)


def _alpha_args(kind: str, beta: float, inverses: bool = False):
    """``a, 1 - a`` (and with ``inverses`` ``1 / a``, ``1 / (1 - a)``) as fp32 (hi, lo) pairs
    (``beta`` carries alpha; unused for tv)."""
    a = beta if kind == "alpha" else 0.5
    args = (*split(a), *split(1.0 - a))
    return (*args, *split(1.0 / a), *split(1.0 / (1.0 - a))) if inverses else args


def kl_divergence_forward(logits: Tensor, ref_logits: Tensor, ignore_mask: Optional[Tensor],
                          kind: str, beta: float, temperature: float
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(kl [N], stats_p [N, 3], stats_q [N, 3])`` like the reference, for kinds alpha
    (``beta`` carries alpha, inside ``(0, 1)``) and tv; ``ignore_mask`` rows: kl 0, stats 0
    (never read), the rows are not read."""
    return _forward(logits, ref_logits, ignore_mask, None, None, kind, beta, temperature)


def kl_divergence_partial_forward(logits: Tensor, ref_logits: Tensor,
                                  ignore_mask: Optional[Tensor], stats_p: Tensor,
                                  stats_q: Tensor, kind: str, beta: float, temperature: float
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`kl_divergence_forward` with ``(max, log s)`` of both rows given (columns 0, 1):
    only pass 2 runs; with the all-shard statistics the third columns are this shard's part
    of the sums."""
    return _forward(logits, ref_logits, ignore_mask, stats_p, stats_q, kind, beta,
                    temperature)


def _forward(logits, ref_logits, ignore_mask, given_p, given_q, kind, beta, temperature):
    vocab, n = logits.shape[-1], n_rows(logits)
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
        _fdiv_fwd_kernel[(n,)](
            x, *row_layout(x), y, *row_layout(y), mask, mask.stride(0) if has_mask else 0,
            kl, stats_p, stats_q, gp, gq, vocab, *split(1.0 / temperature),
            *split(LOG2E / temperature), *_alpha_args(kind, beta), KIND=_KINDS[kind],
            HAS_MASK=has_mask, GIVEN_STATS=given, IS_FP64=cdt == torch.float64,
            CDT=tl_compute_dtype(cdt), BLOCK_V=block,
            FAST_BF16=fast_bf16(x) and y.dtype == torch.bfloat16, num_warps=num_warps(block))
    return kl, stats_p, stats_q


def kl_divergence_backward(grad_kl: Tensor, logits: Tensor, ref_logits: Tensor,
                           ignore_mask: Optional[Tensor], stats_p: Tensor, stats_q: Tensor,
                           kind: str, beta: float, temperature: float, need_ref_grad: bool
                           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``logits`` and (if ``need_ref_grad``) ``ref_logits``, in their dtypes,
    one pass over the row pair (formulas: the reference's ``_fdiv_terms``); ``ignore_mask``
    rows receive exactly 0. The gradients are contiguous, of the inputs' shapes."""
    vocab, n = logits.shape[-1], n_rows(logits)
    x, y = unit_stride(logits), unit_stride(ref_logits)
    cdt = compute_dtype(x.dtype)
    grad_z = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_w = (torch.empty(ref_logits.shape, dtype=ref_logits.dtype, device=ref_logits.device)
              if need_ref_grad else None)
    if n == 0:
        return grad_z, grad_w
    has_mask = ignore_mask is not None
    mask = ignore_mask.view(torch.uint8) if has_mask else stats_p
    gw = grad_w if need_ref_grad else grad_z  # a dummy pointer, never written
    block = block_v(vocab, x.dtype)
    with device_guard(x):
        _fdiv_bwd_kernel[(n,)](
            grad_kl, grad_kl.stride(0), x, *row_layout(x), y, *row_layout(y),
            mask, mask.stride(0) if has_mask else 0,
            stats_p, stats_p.stride(0), stats_p.stride(1),
            stats_q, stats_q.stride(0), stats_q.stride(1),
            grad_z, vocab, gw, vocab,  # both contiguous
            vocab, *split(1.0 / temperature), *_alpha_args(kind, beta, inverses=True),
            KIND=_KINDS[kind], HAS_MASK=has_mask, NEED_W=bool(need_ref_grad),
            IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt), BLOCK_V=block,
            num_warps=num_warps(block))
    return grad_z, grad_w


__all__ = ["kl_divergence_forward", "kl_divergence_partial_forward", "kl_divergence_backward"]
