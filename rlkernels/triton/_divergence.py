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
  Alpha sums ONE gap per column (as csrc/vocab.cu): ``u - r = -u (base^t - 1)``, ``t = c
  (log v - log u)``, around ``u = p`` (``c = 1 - a``) when ``a >= 1/2``, around ``u = q``
  (``c = a``) otherwise (the ``U_IS_P`` constexpr), ``D = sum (u - r) / (a (1 - a))``; in
  fp32 in log2 units (``ex2``) with a degree-7 polynomial for ``|t| <= 1``. Only each
  loop's last block is masked; bf16 on a GPU unpacks in two integer instructions.
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

from ._common import (const_hl, expm1, lane_merge, lane_step, load_bf16_f32, load_pair_stats,
                      log1p, mul_hl, row_offset, split, zero_grad_rows)

Tensor = torch.Tensor
# KIND: rlkernels/_codes.py KL_KINDS, alpha 3, tv 4 (the launchers of triton/vocab.py map it)


# 2^t - 1 = t Q(t) for |t| <= 1 (fp32, log2 units): Q of degree 6, its coefficients fitted
# to the relative error of (2^t - 1) / t on [-1, 1] (weighted least squares on Chebyshev
# nodes, then rounded to fp32): <= 1.5e-7 relative with fp32 Horner, the floor of the ex2
# beside it, in 7 instructions where the degree-11 Taylor form of csrc/vocab.cu takes 11.
_Q0 = tl.constexpr(0.6931471824645996)
_Q1 = tl.constexpr(0.2402266412973404)
_Q2 = tl.constexpr(0.05550402030348778)
_Q3 = tl.constexpr(0.00961698591709137)
_Q4 = tl.constexpr(0.0013335339026525617)
_Q5 = tl.constexpr(0.00015634509327355772)
_Q6 = tl.constexpr(1.5252492630679626e-05)


@triton.jit
def _exp2m1_small(t):
    """``2^t - 1`` for ``|t| <= 1`` (fp32; no cancellation, no call, no branch): ``t Q(t)``
    by Horner. Larger ``t`` give garbage that the caller does not select."""
    q = _Q6 * t + _Q5
    q = q * t + _Q4
    q = q * t + _Q3
    q = q * t + _Q2
    q = q * t + _Q1
    q = q * t + _Q0
    return q * t


@triton.jit
def _exp_u(x, IS_FP64: tl.constexpr):
    """``base^x`` in the kernels' log unit: log2 in fp32 (one MUFU ``ex2``), natural in fp64."""
    if IS_FP64:
        return tl.exp(x)
    else:
        return tl.exp2(x)


@triton.jit
def _expm1_u(t, IS_FP64: tl.constexpr):
    """``base^t - 1`` accurate to a few ulps for any ``t <= 100`` (the callers clamp):
    fp32 (log2 units) :func:`_exp2m1_small` for ``|t| <= 1``, ``2^t - 1`` beyond (at most
    1 bit lost: ``2^t >= 2`` or ``<= 1/2``); fp64 (natural units) ``_common.expm1``."""
    if IS_FP64:
        return expm1(t, True)
    else:
        return tl.where(tl.abs(t) <= 1.0, _exp2m1_small(t), tl.exp2(t) - 1.0)


@triton.jit
def _row_consts(m, ls, IS_FP64: tl.constexpr):
    """``(m, -log s)`` in the units of :func:`_logu`; a row of only ``-inf`` (``m = -inf``) is
    shifted by 0, as the reference does (log-probs ``-inf``, not NaN)."""
    m = tl.where(m == float("-inf"), 0.0, m)
    if IS_FP64:
        return m, -ls
    else:
        return m, -(ls * 1.4426950408889634)


@triton.jit
def _logu(x, inv_t_hi, inv_t_lo, m, nls, IS_FP64: tl.constexpr):
    """``log p`` in log units (log2 in fp32, natural in fp64) from the raw logit: ``z = x / T``
    rounded as the statistics' ``m = max z`` was, so the arg-max column's ``z - m`` is exactly
    0 and the heavy columns carry one rounding of their own ``log p`` (folding ``x log2(e) / T
    - (m + log s) log2(e)`` into one fma would shift every ``log p`` by up to half an ulp of
    ``|m| log2 e``: a common relative error ``eps |m|`` of every ``p``, which alpha's ``S = 1 -
    a (1-a) D`` near ``a = 1`` amplifies); fp32: ``(z - m) log2(e) - log2(s)`` in one fma."""
    if IS_FP64:
        return (mul_hl(x, inv_t_hi, inv_t_lo, IS_FP64) - m) + nls
    else:
        return tl.fma(x * inv_t_hi - m, 1.4426950408889634, nls)


@triton.jit
def _load_pair(xp, yp, FAST_BF16: tl.constexpr, CDT: tl.constexpr):
    """An unmasked full block of both rows in ``CDT`` (bf16 on a GPU: the two-instruction
    unpack of ``_common.load_bf16_f32``)."""
    if FAST_BF16:
        return load_bf16_f32(xp, True), load_bf16_f32(yp, True)
    else:
        return tl.load(xp).to(CDT), tl.load(yp).to(CDT)


@triton.jit
def _alpha_fwd_col(xu, xv, inv_t_hi, inv_t_lo, m_u, nl_u, cc, ck, IS_FP64: tl.constexpr):
    """``u expm1(c (log v - log u)) = r - u`` (``<= 0`` summed; the forward's column term,
    ``D = -sum / (a (1 - a))``) for the raw logits ``xu`` of the row around which the gap is
    taken and ``xv`` of the other one: ``log u`` by :func:`_logu`, ``t = c (log v - log u) =
    (xv - xu) c / T + ck`` (``ck`` from the statistics), in log units. ``c <= 1/2`` and ``u >
    0`` bound ``t <= 75`` (fp32, ``375`` in fp64); the clamp at 100 (NaN-dropping, as a GPU
    ``min``) only catches ``u = 0`` (``xu = -inf``: ``t`` is ``+inf``, or NaN when ``xv =
    -inf`` too), whose term ``0 * finite`` is then 0. ``xv = -inf``: ``t = -inf``, the term
    is ``-u`` (``r = 0``). A NaN logit reaches the row's statistics, hence ``ck``, and the
    caller adds ``0 * ck``."""
    u = _exp_u(_logu(xu, inv_t_hi, inv_t_lo, m_u, nl_u, IS_FP64), IS_FP64)
    t = tl.minimum(tl.fma(xv - xu, cc, ck), 100.0)
    return u * _expm1_u(t, IS_FP64)


@triton.jit
def _alpha_gap(f, t, r, IS_FP64: tl.constexpr):
    """``f - r = -f (base^t - 1)`` (``t = c (log o - log f)``, ``r = f^(1-c) o^c``, any ``c`` in
    ``(0, 1)``; the backward's gaps): the polynomial while ``|t| <= 1`` (log2 units; fp64:
    natural, ``<= 1/2``), the plain difference beyond (at most 1 bit lost: ``r >= 2 f`` or
    ``<= f / 2``; and no overflow where ``f`` is tiny and ``t`` large). ``f = 0``: ``t`` is
    ``+inf`` or NaN, the difference ``0 - r = 0`` (``r`` has a ``-inf`` exponent)."""
    if IS_FP64:
        small = tl.abs(t) <= 0.5
        return tl.where(small, -f * expm1(tl.where(small, t, 0.0), True), f - r)
    else:
        return tl.where(tl.abs(t) <= 1.0, -f * _exp2m1_small(t), f - r)


@triton.jit
def _half_sign(diff):
    """``0.5 sign(diff)`` (0 where ``diff = 0``): TV's subgradient with ``sign(0) = 0``; the
    forward and the backward take it from the same bits of ``p - q``."""
    return tl.where(diff > 0.0, 0.5, tl.where(diff < 0.0, -0.5, 0.0))


@triton.jit
def _tv_fwd_cols(x, y, inv_t_hi, inv_t_lo, m_p, nl_p, m_q, nl_q, IS_FP64: tl.constexpr):
    """TV's column terms ``(|p - q|, 0.5 sign(p - q) p)`` (``-inf`` in a row: ``p = 0``)."""
    p = _exp_u(_logu(x, inv_t_hi, inv_t_lo, m_p, nl_p, IS_FP64), IS_FP64)
    q = _exp_u(_logu(y, inv_t_hi, inv_t_lo, m_q, nl_q, IS_FP64), IS_FP64)
    diff = p - q
    return tl.abs(diff), _half_sign(diff) * p


@triton.jit
def _fdiv_fwd_kernel(
        x_ptr, inner_x, stride_x, stride_x1, y_ptr, inner_y, stride_y, stride_y1,
        mask_ptr, stride_mask, kl_ptr, sp_ptr, sq_ptr, gp_ptr, gq_ptr,
        V, inv_t_hi, inv_t_lo, c_hi, c_lo, a_hi, a_lo, b_hi, b_lo,
        KIND: tl.constexpr, HAS_MASK: tl.constexpr, GIVEN_STATS: tl.constexpr,
        IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK_V: tl.constexpr,
        FAST_BF16: tl.constexpr = False, U_IS_P: tl.constexpr = True):
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
        c = const_hl(zero, c_hi, c_lo, IS_FP64)  # log2(e) / T
        if GIVEN_STATS:
            # vocabulary parallelism: the all-shard (max, log s) of both rows are given
            m_p = tl.load(gp_ptr + row * 3).to(CDT)
            ls_p = tl.load(gp_ptr + row * 3 + 1).to(CDT)
            m_q = tl.load(gq_ptr + row * 3).to(CDT)
            ls_q = tl.load(gq_ptr + row * 3 + 1).to(CDT)
        else:
            # pass 1: per-lane (max, rest) of both rows (_common.lane_step), merged once
            mp = tl.full([BLOCK_V], -1.0e30, CDT)
            rp = tl.zeros([BLOCK_V], CDT)
            mq = tl.full([BLOCK_V], -1.0e30, CDT)
            rq = tl.zeros([BLOCK_V], CDT)
            for start in range(0, v_full, BLOCK_V):
                x, y = _load_pair(xbase + start + offs, ybase + start + offs, FAST_BF16, CDT)
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
        # pass 2: the per-column terms, per lane, in log units (log2 in fp32, natural in
        # fp64): log p by _logu from the saved (rounded) statistics, as the backward has them
        if IS_FP64:
            cu = const_hl(zero, inv_t_hi, inv_t_lo, IS_FP64)
        else:
            cu = c
        mm_p, nl_p = _row_consts(m_p, ls_p, IS_FP64)
        mm_q, nl_q = _row_consts(m_q, ls_q, IS_FP64)
        a = const_hl(zero, a_hi, a_lo, IS_FP64)
        b = const_hl(zero, b_hi, b_lo, IS_FP64)
        acc1 = tl.zeros([BLOCK_V], CDT)   # alpha: sum (r - u); tv: sum |p - q|
        acc2 = tl.zeros([BLOCK_V], CDT)   # tv: sum p sign(p - q) / 2
        if KIND == 3:
            # the gap around u (p when a >= 1/2, else q; U_IS_P is that choice, made by the
            # launcher): its exponent's weight is the small one, cw = min(a, 1 - a)
            if U_IS_P:
                cw = b
                m_u, nl_u, m_v, nl_v = mm_p, nl_p, mm_q, nl_q
            else:
                cw = a
                m_u, nl_u, m_v, nl_v = mm_q, nl_q, mm_p, nl_p
            cc = cw * cu
            # log v - log u = (xv - xu) c_u + (m_u - m_v) u + nl_v - nl_u (u = log2 e in
            # fp32): m_u - m_v as an exact hi + lo pair (two-sum), so that the one rounding
            # of this row constant is of ck's own size
            dm = m_u - m_v
            bb = dm - m_u
            dm_lo = (m_u - (dm - bb)) + (-m_v - bb)
            if IS_FP64:
                ck = cw * (dm + (dm_lo + (nl_v - nl_u)))
            else:
                ck = cw * tl.fma(dm, 1.4426950408889634,
                                 tl.fma(dm_lo, 1.4426950408889634, nl_v - nl_u))
            for start in range(0, v_full, BLOCK_V):
                x, y = _load_pair(xbase + start + offs, ybase + start + offs, FAST_BF16, CDT)
                if U_IS_P:
                    acc1 += _alpha_fwd_col(x, y, inv_t_hi, inv_t_lo, m_u, nl_u, cc, ck,
                                                   IS_FP64)
                else:
                    acc1 += _alpha_fwd_col(y, x, inv_t_hi, inv_t_lo, m_u, nl_u, cc, ck,
                                                   IS_FP64)
            if v_full < V:
                cols = v_full + offs
                inb = cols < V
                x = tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT)
                y = tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT)
                if U_IS_P:
                    acc1 += _alpha_fwd_col(x, y, inv_t_hi, inv_t_lo, m_u, nl_u, cc, ck,
                                                   IS_FP64)
                else:
                    acc1 += _alpha_fwd_col(y, x, inv_t_hi, inv_t_lo, m_u, nl_u, cc, ck,
                                                   IS_FP64)
            # sum (r - u) = -a (1 - a) D; "+ 0 * ck": a NaN logit (NaN statistics) gives NaN
            kl = -tl.sum(acc1, 0) / (a * b) + ck * 0.0
            sum_p = kl
            sum_q = zero
        else:
            for start in range(0, v_full, BLOCK_V):
                x, y = _load_pair(xbase + start + offs, ybase + start + offs, FAST_BF16, CDT)
                t1, t2 = _tv_fwd_cols(x, y, inv_t_hi, inv_t_lo, mm_p, nl_p, mm_q, nl_q,
                                      IS_FP64)
                acc1 += t1
                acc2 += t2
            if v_full < V:
                cols = v_full + offs
                inb = cols < V
                x = tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT)
                y = tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT)
                t1, t2 = _tv_fwd_cols(x, y, inv_t_hi, inv_t_lo, mm_p, nl_p, mm_q, nl_q,
                                      IS_FP64)
                acc1 += t1
                acc2 += t2
            # sum q s = sum p s - sum |p - q| (p s - q s = |p - q| per column)
            kl = 0.5 * tl.sum(acc1, 0)
            sum_p = tl.sum(acc2, 0)
            sum_q = kl - sum_p
        tl.store(kl_ptr + row, kl)
        tl.store(sp_ptr + row * 3, m_p)
        tl.store(sp_ptr + row * 3 + 1, ls_p)
        tl.store(sp_ptr + row * 3 + 2, sum_p)
        tl.store(sq_ptr + row * 3, m_q)
        tl.store(sq_ptr + row * 3 + 1, ls_q)
        tl.store(sq_ptr + row * 3 + 2, sum_q)


@triton.jit
def _fdiv_bwd_cols(x, y, inv_t_hi, inv_t_lo, m_p, nl_p, m_q, nl_q, a, b, g, ga, gb, gap, gbq,
                   KIND: tl.constexpr, NEED_W: tl.constexpr, IS_FP64: tl.constexpr):
    """One block's ``(g dD/dz, g dD/dw)`` (``dD/dw`` only with ``NEED_W``; ``g`` is the
    incoming gradient over ``T``). Alpha: ``ga = 1 / (1-a)``, ``gb = 1 / a``, ``gap = -a D``,
    ``gbq = -(1-a) D``, the gaps ``p - r``, ``q - r`` sharing ``r = base^(a log p + (1-a) log
    q)`` (0 where either factor is 0); tv: ``gap``, ``gbq`` the saved half sums ``0.5 sum p s``,
    ``-0.5 sum q s``."""
    lp = _logu(x, inv_t_hi, inv_t_lo, m_p, nl_p, IS_FP64)
    lq = _logu(y, inv_t_hi, inv_t_lo, m_q, nl_q, IS_FP64)
    p = _exp_u(lp, IS_FP64)
    q = _exp_u(lq, IS_FP64)
    if KIND == 3:
        # (p S - r) / (1-a) = (p - r) / (1-a) - a p D, and (q S - r) / a likewise
        d = lq - lp
        r = _exp_u(tl.fma(a, lp, b * lq), IS_FP64)
        # g last, and one rounding before the fma: near a = 1 with mass of p where q = 0 the
        # two terms are ~D p and cancel to p S / (1-a); every extra rounding of a term of
        # that size is an ulp of D p more in the result
        d_z = tl.fma(p, gap, _alpha_gap(p, b * d, r, IS_FP64) * ga) * g
        if NEED_W:
            d_w = tl.fma(q, gbq, _alpha_gap(q, -(a * d), r, IS_FP64) * gb) * g
        else:
            d_w = d_z
    else:
        # 0.5 p (s - sum p s) and -0.5 q (s - sum q s); the saved sums are
        # 0.5 sum p s and -0.5 sum q s
        hs = _half_sign(p - q)
        d_z = p * (hs - gap) * g
        d_w = q * (-hs - gbq) * g
    return d_z, d_w


@triton.jit
def _fdiv_bwd_kernel(
        g_ptr, stride_g, x_ptr, inner_x, stride_x, stride_x1, y_ptr, inner_y, stride_y,
        stride_y1, mask_ptr, stride_mask,
        sp_ptr, stride_sp0, stride_sp1, sq_ptr, stride_sq0, stride_sq1,
        gx_ptr, stride_gx, gy_ptr, stride_gy,
        V, inv_t_hi, inv_t_lo, a_hi, a_lo, b_hi, b_lo, ia_hi, ia_lo, ib_hi, ib_lo,
        KIND: tl.constexpr, HAS_MASK: tl.constexpr, NEED_W: tl.constexpr,
        IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK_V: tl.constexpr,
        FAST_BF16: tl.constexpr = False):
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
        # log p by _logu in log units (as the forward's pass 2, bit for bit)
        mm_p, nl_p = _row_consts(m_p, ls_p, IS_FP64)
        mm_q, nl_q = _row_consts(m_q, ls_q, IS_FP64)
        a = const_hl(zero, a_hi, a_lo, IS_FP64)
        b = const_hl(zero, b_hi, b_lo, IS_FP64)
        if KIND == 3:
            d = sum_p + sum_q  # D (the all-shard value under vocabulary parallelism)
            # 1 / (1 - a), 1 / a: multiplies per column instead of divisions
            ga = const_hl(zero, ib_hi, ib_lo, IS_FP64)
            gb = const_hl(zero, ia_hi, ia_lo, IS_FP64)
            gap = -(a * d)
            gbq = -(b * d)
        else:
            ga = zero
            gb = zero
            gap = sum_p
            gbq = sum_q
        v_full = V - V % BLOCK_V
        for start in range(0, v_full, BLOCK_V):
            x, y = _load_pair(xbase + start + offs, ybase + start + offs, FAST_BF16, CDT)
            d_z, d_w = _fdiv_bwd_cols(x, y, inv_t_hi, inv_t_lo, mm_p, nl_p, mm_q, nl_q, a, b, g,
                                      ga, gb, gap, gbq, KIND, NEED_W, IS_FP64)
            tl.store(gxbase + start + offs, d_z.to(gx_ptr.dtype.element_ty))
            if NEED_W:
                tl.store(gybase + start + offs, d_w.to(gy_ptr.dtype.element_ty))
        if v_full < V:
            cols = v_full + offs
            inb = cols < V
            x = tl.load(xbase + cols, mask=inb, other=float("-inf")).to(CDT)
            y = tl.load(ybase + cols, mask=inb, other=float("-inf")).to(CDT)
            d_z, d_w = _fdiv_bwd_cols(x, y, inv_t_hi, inv_t_lo, mm_p, nl_p, mm_q, nl_q, a, b, g,
                                      ga, gb, gap, gbq, KIND, NEED_W, IS_FP64)
            tl.store(gxbase + cols, d_z.to(gx_ptr.dtype.element_ty), mask=inb)
            if NEED_W:
                tl.store(gybase + cols, d_w.to(gy_ptr.dtype.element_ty), mask=inb)


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
    from .vocab import _pair_forward  # (vocab imports this module lazily: no cycle at import)
    return _pair_forward(_fdiv_fwd_kernel, logits, ref_logits, ignore_mask, given_p, given_q,
                         kind, temperature, _alpha_args(kind, beta),
                         lambda x, y, cdt, given: dict(U_IS_P=kind != "alpha" or beta >= 0.5))


def kl_divergence_backward(grad_kl: Tensor, logits: Tensor, ref_logits: Tensor,
                           ignore_mask: Optional[Tensor], stats_p: Tensor, stats_q: Tensor,
                           kind: str, beta: float, temperature: float, need_ref_grad: bool
                           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``logits`` and (if ``need_ref_grad``) ``ref_logits``, in their dtypes,
    one pass over the row pair (formulas: the reference's ``_fdiv_terms``); ``ignore_mask``
    rows receive exactly 0. The gradients are contiguous, of the inputs' shapes."""
    from .vocab import _pair_backward
    return _pair_backward(_fdiv_bwd_kernel, grad_kl, logits, ref_logits, ignore_mask, stats_p,
                          stats_q, kind, temperature, need_ref_grad,
                          _alpha_args(kind, beta, inverses=True), lambda x: {})


__all__ = ["kl_divergence_forward", "kl_divergence_partial_forward", "kl_divergence_backward"]
