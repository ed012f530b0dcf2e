"""Triton kernels of the policy-loss ops (log-probs in), and of ``grpo_loss``.

They follow :mod:`rlkernels.reference.policy` formula by formula; read that file first.

``policy_loss_forward`` is one launch of one program. It walks the ``[B, T]`` tensors in
tiles of ``ROWS x BLOCK_T`` (a few whole rows at a time, ``T`` in chunks) and accumulates in
the compute dtype (fp32, fp64 for fp64 ``logp``) the per-sequence masked sums the aggregation
needs and the masked sums of every metric; the loss is divided by the denominator of
``aggregate`` at the end. With ``ratio_level="sequence"`` (GSPO) each row tile is read twice:
first the masked mean of the clamped log-ratio of each sequence, then the per-token terms.
One program means a fixed summation order (deterministic, no float atomics) and no second
launch for a cross-program reduction.

``policy_loss_backward`` is one launch of ``P`` programs, each owning the row tiles
``pid, pid + P, ...``: a token's gradient only needs its own sequence (GSPO mean, token
count) and the global denominator of ``aggregate``. When the denominator is a count of the
whole batch (``token-mean``, ``seq-mean-*`` without ``normalizer``) every program counts it
from the mask itself: a read of the mask per program instead of a second launch. The
gradient is the analytic one of ``_policy_grad`` / ``aggregate_weights``: ties of max/min
split the gradient half/half, ``d log r / d logp`` is 1 inside the clamp range (inclusive)
and always 1 for the GSPO straight-through, masked tokens get exactly 0.

Options reach the kernels as ``tl.constexpr`` (modes, flags and the float hyper-parameters,
which are rounded to the compute dtype inside the kernel exactly like PyTorch rounds a
Python scalar against an fp32 tensor), never as runtime Python floats. Absent optional
tensors are replaced by a dummy pointer behind a constexpr flag.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._fused import fused_forward, row_grads
from .._policy_options import PolicyOptions

Tensor = torch.Tensor

N_METRICS = 9  # rlkernels.reference.policy.METRICS
_LOSSES = {"ppo": 0, "cispo": 1, "reinforce": 2}
_AGGS = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2,
         "seq-mean-token-sum-norm": 3}
# k3+ has the value of k3 and the gradient of k2
_KLS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3, "low_var_kl": 3, "k3+": 4}

# Elements of one tile. A tile is ROWS whole rows when T is short, one chunk of a row
# otherwise; 1024 keeps the ~10 tile accumulators of the forward in registers.
_TILE = 1024
_MIN_BLOCK_T = 16
# Backward programs on the CPU (the interpreter runs them one after the other, and each one
# re-counts the denominator); on a GPU one per SM. Tests raise it to exercise the striding.
_CPU_PROGRAMS = 1


# ================================================================================ device code
#
# The hot loops are written out inline rather than through small @triton.jit helpers: the
# interpreter (TRITON_INTERPRET=1, the CPU tests) pays about a millisecond per helper call.
# Numerics on the GPU (checked in the PTX of an sm_90 build): Triton's fp32 "/" is the
# approximate div.full.f32 and tl.exp is ex2.approx.f32 (a relative error that grows with
# |x|), so divisions go through tl.fdiv(..., ieee_rounding=IEEE_DIV) (IEEE_DIV: fp32 compute;
# fp64 "/" is already div.rn.f64, and the precise fp64 intrinsic does not exist), and the
# ratio exp(log r) through libdevice's expf when LIBDEVICE_EXP (any GPU; the interpreter has
# no libdevice and numpy's exp is accurate). The symmetric clamp of the log-ratio is written
# as maximum + minimum: tl.clamp(x, -c, c) becomes an fp32-only intrinsic (xorsign.abs) that
# fails to build for fp64.

@triton.jit
def _expm1(x):
    """``exp(x) - 1`` without cancellation near 0 (Kahan: ``(u - 1) x / log(u)``, exact
    when ``u = exp(x)`` rounds to 1); plain ``u - 1`` away from 0."""
    small = tl.abs(x) < 0.5
    u = tl.exp(x)
    us = tl.where(small, u, 2.0)  # keeps the unused lanes of the quotient finite
    kahan = tl.where(us == 1.0, x, (us - 1.0) * x / tl.log(tl.where(us == 1.0, 2.0, us)))
    return tl.where(small, kahan, u - 1.0)


@triton.jit
def _kl_value(d, KL: tl.constexpr):
    """``kl_penalty_forward`` of ``d = logp - ref_logp``."""
    if KL == 0:
        v = d
    elif KL == 1:
        v = tl.abs(d)
    elif KL == 2:
        v = 0.5 * d * d
    else:  # k3, low_var_kl, k3+
        v = _expm1(-d) + d
    return v


@triton.jit
def _kl_grad(d, KL: tl.constexpr):
    """``kl_penalty_grad``: d penalty / d logp (k3+ is straight-through: k2's)."""
    if KL == 0:
        g = tl.full(d.shape, 1.0, d.dtype)
    elif KL == 1:  # torch.sign
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, tl.where(d == d, 0.0, d)))
    elif KL == 3:
        g = -_expm1(-d)
    else:  # k2, k3+
        g = d
    return g


@triton.jit
def _seq_stats(lp_ptr, old_ptr, m_ptr, r64, rin, T, lp_sb, lp_st, old_sb, old_st,
               m_sb, m_st, lim, CDT: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_T: tl.constexpr, WITH_LOG_RATIO: tl.constexpr, IEEE_DIV: tl.constexpr):
    """Per row of a tile: the token count ``sum(m)`` and, with ``WITH_LOG_RATIO`` (GSPO),
    the masked mean of the clamped log-ratio (0 for a row without valid token)."""
    acc_s = tl.zeros([ROWS, BLOCK_T], CDT)
    acc_c = tl.zeros([ROWS, BLOCK_T], CDT)
    for c0 in range(0, T, BLOCK_T):
        cols = c0 + tl.arange(0, BLOCK_T)
        c64 = cols.to(tl.int64)[None, :]
        inb = rin & (cols < T)[None, :]
        m = tl.load(m_ptr + r64 * m_sb + c64 * m_st, mask=inb, other=0).to(CDT)
        if WITH_LOG_RATIO:
            lp = tl.load(lp_ptr + r64 * lp_sb + c64 * lp_st, mask=inb, other=0).to(CDT)
            old = tl.load(old_ptr + r64 * old_sb + c64 * old_st, mask=inb, other=0).to(CDT)
            log_r = tl.maximum(lp - old, -lim, propagate_nan=tl.PropagateNan.ALL)
            log_r = tl.minimum(log_r, lim, propagate_nan=tl.PropagateNan.ALL)
            acc_s += tl.where(m != 0, log_r * m, 0.0)
        acc_c += m
    count = tl.sum(acc_c, axis=1)
    nonzero = tl.where(count > 0, count, 1.0)
    mean = tl.fdiv(tl.sum(acc_s, axis=1), nonzero, ieee_rounding=IEEE_DIV)
    seq = tl.where(count > 0, mean, 0.0)
    return seq, count


@triton.jit
def _policy_fwd_kernel(
        lp_ptr, old_ptr, adv_ptr, m_ptr, ref_ptr, ent_ptr, w_ptr, norm_ptr, loss_ptr, met_ptr,
        B, T, lp_sb, lp_st, old_sb, old_st, adv_sb, adv_st, m_sb, m_st, ref_sb, ref_st,
        ent_sb, ent_st, w_sb, w_st,
        CDT: tl.constexpr, LOSS: tl.constexpr, SEQ: tl.constexpr, AGG: tl.constexpr,
        KL: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_W: tl.constexpr,
        HAS_NORM: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr,
        USE_KL: tl.constexpr, USE_ENT: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
        DUAL: tl.constexpr, DELTA: tl.constexpr, KL_COEF: tl.constexpr,
        ENT_COEF: tl.constexpr, CLAMP: tl.constexpr, IEEE_DIV: tl.constexpr,
        LIBDEVICE_EXP: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    # hyper-parameters rounded to the compute dtype, as torch does with a Python scalar
    lo = tl.full([], LO, CDT)
    hi = tl.full([], HI, CDT)
    lim = tl.full([], CLAMP, CDT)
    neg_dual = tl.full([], -DUAL, CDT)
    delta = tl.full([], DELTA, CDT)
    kl_coef = tl.full([], KL_COEF, CDT)
    ent_coef = tl.full([], ENT_COEF, CDT)
    # masked metric sums over all tiles, and the masked max of the ratio; every masked sum is
    # where(m != 0, x * m, 0), a select, so that NaN or inf at a masked position (NaN * 0 is
    # NaN) never reaches a metric or the loss
    s_high = tl.zeros([ROWS, BLOCK_T], CDT)
    s_low = tl.zeros([ROWS, BLOCK_T], CDT)
    s_dual = tl.zeros([ROWS, BLOCK_T], CDT)
    s_akl = tl.zeros([ROWS, BLOCK_T], CDT)
    s_r = tl.zeros([ROWS, BLOCK_T], CDT)
    s_kl = tl.zeros([ROWS, BLOCK_T], CDT)
    s_ent = tl.zeros([ROWS, BLOCK_T], CDT)
    r_max = tl.zeros([ROWS, BLOCK_T], CDT)
    r_nan = tl.zeros([ROWS, BLOCK_T], tl.int32)
    no_flag = tl.zeros([ROWS, BLOCK_T], tl.int1)
    total = tl.zeros([], CDT)      # the numerator of aggregate
    tokens = tl.zeros([], CDT)     # sum(m)
    nonempty = tl.zeros([], CDT)   # sequences with sum(m) > 0
    for r0 in range(0, B, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        r64 = rows.to(tl.int64)[:, None]
        rin = (rows < B)[:, None]
        if SEQ:  # GSPO: first pass over the rows, the sequence log-ratio
            seq, _ = _seq_stats(lp_ptr, old_ptr, m_ptr, r64, rin, T, lp_sb, lp_st, old_sb,
                                old_st, m_sb, m_st, lim, CDT, ROWS, BLOCK_T, True, IEEE_DIV)
            seq_log_r = seq[:, None] + tl.zeros([ROWS, BLOCK_T], CDT)
        row_loss = tl.zeros([ROWS, BLOCK_T], CDT)
        row_m = tl.zeros([ROWS, BLOCK_T], CDT)
        for c0 in range(0, T, BLOCK_T):
            cols = c0 + tl.arange(0, BLOCK_T)
            c64 = cols.to(tl.int64)[None, :]
            inb = rin & (cols < T)[None, :]
            lp = tl.load(lp_ptr + r64 * lp_sb + c64 * lp_st, mask=inb, other=0).to(CDT)
            a = tl.load(adv_ptr + r64 * adv_sb + c64 * adv_st, mask=inb, other=0).to(CDT)
            m = tl.load(m_ptr + r64 * m_sb + c64 * m_st, mask=inb, other=0).to(CDT)
            if SEQ:
                log_r = seq_log_r
            else:
                old = tl.load(old_ptr + r64 * old_sb + c64 * old_st, mask=inb,
                              other=0).to(CDT)
                log_r = tl.maximum(lp - old, -lim, propagate_nan=tl.PropagateNan.ALL)
                log_r = tl.minimum(log_r, lim, propagate_nan=tl.PropagateNan.ALL)
            if LIBDEVICE_EXP:
                r = libdevice.exp(log_r)
            else:
                r = tl.exp(log_r)
            high = no_flag
            low = no_flag
            dual = no_flag
            if LOSS == 0:  # ppo
                if HAS_DELTA:
                    unclipped = tl.minimum(r, delta, propagate_nan=tl.PropagateNan.ALL)
                else:
                    unclipped = r
                clipped = tl.clamp(r, lo, hi, propagate_nan=tl.PropagateNan.ALL)
                pg = tl.maximum(-a * unclipped, -a * clipped, propagate_nan=tl.PropagateNan.ALL)
                high = (a > 0) & (r > hi)
                low = (a < 0) & (r < lo)
                if HAS_DUAL:
                    bound = neg_dual * a
                    dual = (a < 0) & (pg > bound)
                    bounded = tl.minimum(pg, bound, propagate_nan=tl.PropagateNan.ALL)
                    pg = tl.where(a < 0, bounded, pg)
            elif LOSS == 1:  # cispo; lo is 0 unless cispo_clip_low (ratio_floor)
                weight = tl.clamp(r, lo, hi, propagate_nan=tl.PropagateNan.ALL)
                pg = -weight * a * lp
                high = r > hi
                low = r < lo
            else:  # reinforce
                pg = -a * lp
            if HAS_W:
                pg = pg * tl.load(w_ptr + r64 * w_sb + c64 * w_st, mask=inb, other=0).to(CDT)
            loss = pg
            if HAS_REF:
                ref = tl.load(ref_ptr + r64 * ref_sb + c64 * ref_st, mask=inb,
                              other=0).to(CDT)
                kl = _kl_value(lp - ref, KL)
                if USE_KL:
                    loss = loss + kl_coef * kl
                s_kl += tl.where(m != 0, kl * m, 0.0)
            if HAS_ENT:
                ent = tl.load(ent_ptr + r64 * ent_sb + c64 * ent_st, mask=inb,
                              other=0).to(CDT)
                if USE_ENT:
                    loss = loss - ent_coef * ent
                s_ent += tl.where(m != 0, ent * m, 0.0)
            row_loss += tl.where(m != 0, loss * m, 0.0)
            row_m += m
            s_high += high.to(CDT) * m
            s_low += low.to(CDT) * m
            s_dual += dual.to(CDT) * m
            s_akl += tl.where(m != 0, -log_r * m, 0.0)
            s_r += tl.where(m != 0, r * m, 0.0)
            active_r = tl.where(m > 0, r, 0.0)
            r_max = tl.maximum(r_max, active_r)
            r_nan = r_nan | (active_r != active_r).to(tl.int32)
        seq_loss = tl.sum(row_loss, axis=1)
        seq_tokens = tl.sum(row_m, axis=1)
        if AGG == 1:  # seq-mean-token-mean: the token means of the non-empty sequences
            nonzero = tl.where(seq_tokens > 0, seq_tokens, 1.0)
            seq_mean = tl.fdiv(seq_loss, nonzero, ieee_rounding=IEEE_DIV)
            total += tl.sum(tl.where(seq_tokens > 0, seq_mean, 0.0))
        else:
            total += tl.sum(seq_loss)
        tokens += tl.sum(seq_tokens)
        nonempty += tl.sum((seq_tokens > 0).to(CDT))

    # the denominator of aggregate (its empty value counts as 1)
    if HAS_NORM:
        denom = tl.load(norm_ptr).to(CDT)
    elif AGG == 0:
        denom = tokens
    elif AGG == 3:
        denom = tl.zeros([], CDT) + T
    else:
        denom = nonempty
    denom = tl.where(denom > 0, denom, 1.0)
    tl.store(loss_ptr, tl.fdiv(total, denom, ieee_rounding=IEEE_DIV))

    # METRICS, token-masked means in the compute dtype, stored as fp32
    count = tl.maximum(tokens, 1e-30)
    high_sum = tl.sum(s_high)
    low_sum = tl.sum(s_low)
    sums = (high_sum + low_sum, high_sum, low_sum, tl.sum(s_dual),
            tl.sum(s_akl), tl.sum(s_r))
    tl.store(met_ptr + 0, tl.fdiv(sums[0], count, ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 1, tl.fdiv(sums[1], count, ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 2, tl.fdiv(sums[2], count, ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 3, tl.fdiv(sums[3], count, ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 4, tl.fdiv(sums[4], count, ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 5, tl.fdiv(sums[5], count, ieee_rounding=IEEE_DIV).to(tl.float32))
    ratio_max = tl.max(r_max)
    ratio_max = tl.where(tl.max(r_nan) != 0, float("nan"), ratio_max)
    tl.store(met_ptr + 6, ratio_max.to(tl.float32))
    kl_sum = tl.sum(s_kl)
    tl.store(met_ptr + 7, tl.fdiv(kl_sum, count, ieee_rounding=IEEE_DIV).to(tl.float32))
    ent_sum = tl.sum(s_ent)
    tl.store(met_ptr + 8, tl.fdiv(ent_sum, count, ieee_rounding=IEEE_DIV).to(tl.float32))


@triton.jit
def _policy_bwd_kernel(
        grad_ptr, lp_ptr, old_ptr, adv_ptr, m_ptr, ref_ptr, w_ptr, norm_ptr, glp_ptr, gent_ptr,
        B, T, lp_sb, lp_st, old_sb, old_st, adv_sb, adv_st, m_sb, m_st, ref_sb, ref_st,
        w_sb, w_st,
        CDT: tl.constexpr, LOSS: tl.constexpr, SEQ: tl.constexpr, AGG: tl.constexpr,
        KL: tl.constexpr, HAS_ENT: tl.constexpr, HAS_W: tl.constexpr,
        HAS_NORM: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr,
        USE_KL: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, DUAL: tl.constexpr,
        DELTA: tl.constexpr, KL_COEF: tl.constexpr, ENT_COEF: tl.constexpr,
        CLAMP: tl.constexpr, IEEE_DIV: tl.constexpr, LIBDEVICE_EXP: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    lo = tl.full([], LO, CDT)
    hi = tl.full([], HI, CDT)
    lim = tl.full([], CLAMP, CDT)
    neg_dual = tl.full([], -DUAL, CDT)
    delta = tl.full([], DELTA, CDT)
    kl_coef = tl.full([], KL_COEF, CDT)
    neg_ent_coef = tl.full([], -ENT_COEF, CDT)

    # the denominator of aggregate (its empty value counts as 1)
    if HAS_NORM:
        denom = tl.load(norm_ptr).to(CDT)
    elif AGG == 3:
        denom = tl.zeros([], CDT) + T
    else:  # a count over the whole batch: every program reads the mask for it
        acc = tl.zeros([ROWS], CDT)
        for r0 in range(0, B, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            _, seq_tokens = _seq_stats(lp_ptr, old_ptr, m_ptr, rows.to(tl.int64)[:, None],
                                       (rows < B)[:, None], T, lp_sb, lp_st, old_sb, old_st,
                                       m_sb, m_st, lim, CDT, ROWS, BLOCK_T, False, IEEE_DIV)
            if AGG == 0:
                acc += seq_tokens
            else:
                acc += (seq_tokens > 0).to(CDT)
        denom = tl.sum(acc)
    denom = tl.where(denom > 0, denom, 1.0)
    g_loss = tl.load(grad_ptr).to(CDT)

    for r0 in range(pid * ROWS, B, n_prog * ROWS):
        rows = r0 + tl.arange(0, ROWS)
        r64 = rows.to(tl.int64)[:, None]
        rin = (rows < B)[:, None]
        if SEQ or AGG == 1:  # the row's token count and (GSPO) sequence log-ratio
            seq, seq_tokens = _seq_stats(lp_ptr, old_ptr, m_ptr, r64, rin, T, lp_sb, lp_st,
                                         old_sb, old_st, m_sb, m_st, lim, CDT, ROWS, BLOCK_T,
                                         SEQ, IEEE_DIV)
            seq_log_r = seq[:, None] + tl.zeros([ROWS, BLOCK_T], CDT)
            n_seq = seq_tokens[:, None] + tl.zeros([ROWS, BLOCK_T], CDT)
        for c0 in range(0, T, BLOCK_T):
            cols = c0 + tl.arange(0, BLOCK_T)
            c64 = cols.to(tl.int64)[None, :]
            inb = rin & (cols < T)[None, :]
            m = tl.load(m_ptr + r64 * m_sb + c64 * m_st, mask=inb, other=0).to(CDT)
            # c = upstream gradient * aggregate_weights
            weight = tl.fdiv(m, denom, ieee_rounding=IEEE_DIV)
            if AGG == 1:
                nonzero = tl.where(n_seq > 0, n_seq, 1.0)
                weight = tl.where(n_seq > 0, tl.fdiv(weight, nonzero, ieee_rounding=IEEE_DIV), 0.0)
            c = g_loss * weight
            lp = tl.load(lp_ptr + r64 * lp_sb + c64 * lp_st, mask=inb, other=0).to(CDT)
            a = tl.load(adv_ptr + r64 * adv_sb + c64 * adv_st, mask=inb, other=0).to(CDT)
            # d pg / d logp, as _policy_grad
            if LOSS == 2:  # reinforce
                g = -a
            else:
                if SEQ:  # straight-through: d log r / d logp = 1
                    log_r = seq_log_r
                    dlog_r = tl.full([ROWS, BLOCK_T], 1.0, CDT)
                else:
                    old = tl.load(old_ptr + r64 * old_sb + c64 * old_st, mask=inb,
                                  other=0).to(CDT)
                    d = lp - old
                    log_r = tl.maximum(d, -lim, propagate_nan=tl.PropagateNan.ALL)
                    log_r = tl.minimum(log_r, lim, propagate_nan=tl.PropagateNan.ALL)
                    dlog_r = ((d >= -lim) & (d <= lim)).to(CDT)
                if LIBDEVICE_EXP:
                    r = libdevice.exp(log_r)
                else:
                    r = tl.exp(log_r)
                if LOSS == 1:  # cispo: the clipped ratio is a constant factor of -A logp
                    weight_r = tl.clamp(r, lo, hi, propagate_nan=tl.PropagateNan.ALL)
                    g = -weight_r * a
                else:  # ppo
                    if HAS_DELTA:
                        unclipped = tl.minimum(r, delta, propagate_nan=tl.PropagateNan.ALL)
                        d_unclipped = -a * (r <= delta).to(CDT)
                    else:
                        unclipped = r
                        d_unclipped = -a
                    d_clipped = -a * ((r >= lo) & (r <= hi)).to(CDT)
                    pg1 = -a * unclipped
                    pg2 = -a * tl.clamp(r, lo, hi, propagate_nan=tl.PropagateNan.ALL)
                    # the branch of the max that is active; half each on a tie
                    dpg = tl.where(pg1 > pg2, d_unclipped,
                                   tl.where(pg1 < pg2, d_clipped,
                                            0.5 * (d_unclipped + d_clipped)))
                    if HAS_DUAL:  # min(pg, bound) where A < 0: 0 when the bound is active
                        pg = tl.maximum(pg1, pg2, propagate_nan=tl.PropagateNan.ALL)
                        bound = neg_dual * a
                        dual = tl.where(pg > bound, 0.0,
                                        tl.where(pg < bound, dpg, 0.5 * (0.0 + dpg)))
                        dpg = tl.where(a < 0, dual, dpg)
                    g = dpg * r * dlog_r
            if HAS_W:
                g = g * tl.load(w_ptr + r64 * w_sb + c64 * w_st, mask=inb, other=0).to(CDT)
            if USE_KL:
                ref = tl.load(ref_ptr + r64 * ref_sb + c64 * ref_st, mask=inb,
                              other=0).to(CDT)
                g = g + kl_coef * _kl_grad(lp - ref, KL)
            out = r64 * T + c64
            tl.store(glp_ptr + out, tl.where(c != 0, c * g, 0.0), mask=inb)
            if HAS_ENT:
                tl.store(gent_ptr + out, tl.where(c != 0, neg_ent_coef * c, 0.0), mask=inb)


# =============================================================================== launchers

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _blocks(b: int, t: int) -> Tuple[int, int]:
    """``(ROWS, BLOCK_T)``: whole rows per tile when T is short, else chunks of a row. The
    tile depends on T only, not on B: a row's sums (its token count, its GSPO log-ratio)
    are then reduced the same way whatever the other rows of the call (batch invariance)."""
    block_t = min(max(triton.next_power_of_2(max(t, 1)), _MIN_BLOCK_T), _TILE)
    return max(_TILE // block_t, 1), block_t


@lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _strides2d(x: Optional[Tensor]) -> Tuple[int, int]:
    return (0, 0) if x is None else (x.stride(0), x.stride(1))


def _adv_strides(advantages: Tensor) -> Tuple[int, int]:
    """``[B]`` advantages broadcast over T: a column stride of 0."""
    if advantages.dim() == 1:
        return advantages.stride(0), 0
    return advantages.stride(0), advantages.stride(1)


def _mode_args(o: PolicyOptions, cdt: torch.dtype, device: torch.device) -> dict:
    return dict(
        CDT=_TL_DTYPES[cdt], LOSS=_LOSSES[o.loss], SEQ=o.ratio_level == "sequence",
        AGG=_AGGS[o.agg], KL=_KLS[o.kl_estimator],
        HAS_DUAL=o.loss == "ppo" and o.dual_clip is not None,
        HAS_DELTA=o.loss == "ppo" and o.delta is not None,
        LO=float(o.ratio_floor), HI=float(1.0 + o.clip_high),
        DUAL=float(o.dual_clip or 0.0), DELTA=float(o.delta or 0.0),
        KL_COEF=float(o.kl_coef), ENT_COEF=float(o.entropy_coef),
        CLAMP=float(o.log_ratio_clamp), IEEE_DIV=cdt == torch.float32,
        LIBDEVICE_EXP=device.type != "cpu")


def policy_loss_forward(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                        normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                        entropy: Optional[Tensor], is_weights: Optional[Tensor],
                        o: PolicyOptions) -> Tuple[Tensor, Tensor]:
    """Returns ``(loss [], metrics [9] fp32)`` as the reference; one kernel launch."""
    b, t = logp.shape
    cdt = _compute_dtype(logp.dtype)
    loss = torch.empty((), dtype=cdt, device=logp.device)
    metrics = torch.empty(N_METRICS, dtype=torch.float32, device=logp.device)
    rows, block_t = _blocks(b, t)
    with _device_guard(logp):
        _policy_fwd_kernel[(1,)](
            logp, old_logp, advantages, mask,
            logp if ref_logp is None else ref_logp, logp if entropy is None else entropy,
            logp if is_weights is None else is_weights,
            logp if normalizer is None else normalizer, loss, metrics,
            b, t, *_strides2d(logp), *_strides2d(old_logp), *_adv_strides(advantages),
            *_strides2d(mask), *_strides2d(ref_logp), *_strides2d(entropy),
            *_strides2d(is_weights),
            HAS_REF=ref_logp is not None, HAS_ENT=entropy is not None,
            HAS_W=is_weights is not None, HAS_NORM=normalizer is not None,
            USE_KL=ref_logp is not None and o.kl_coef != 0.0,
            USE_ENT=entropy is not None and o.entropy_coef != 0.0,
            ROWS=rows, BLOCK_T=block_t, num_warps=8, **_mode_args(o, cdt, logp.device))
    return loss, metrics


def policy_loss_backward(grad_loss: Tensor, logp: Tensor, old_logp: Tensor,
                         advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                         ref_logp: Optional[Tensor], entropy: Optional[Tensor],
                         is_weights: Optional[Tensor], o: PolicyOptions
                         ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``logp`` (its dtype) and ``entropy`` (its dtype, ``None`` when not
    given), contiguous ``[B, T]``; one kernel launch."""
    b, t = logp.shape
    cdt = _compute_dtype(logp.dtype)
    g_lp = torch.empty((b, t), dtype=logp.dtype, device=logp.device)
    g_ent = None if entropy is None else torch.empty((b, t), dtype=entropy.dtype,
                                                     device=logp.device)
    if b * t == 0:
        return g_lp, g_ent
    rows, block_t = _blocks(b, t)
    n_tiles = triton.cdiv(b, rows)
    programs = min(n_tiles, _num_sms(logp.device.index or 0) if logp.is_cuda
                   else _CPU_PROGRAMS)
    with _device_guard(logp):
        _policy_bwd_kernel[(programs,)](
            grad_loss, logp, old_logp, advantages, mask,
            logp if ref_logp is None else ref_logp,
            logp if is_weights is None else is_weights,
            logp if normalizer is None else normalizer, g_lp,
            g_lp if g_ent is None else g_ent,
            b, t, *_strides2d(logp), *_strides2d(old_logp), *_adv_strides(advantages),
            *_strides2d(mask), *_strides2d(ref_logp), *_strides2d(is_weights),
            HAS_ENT=entropy is not None, HAS_W=is_weights is not None,
            HAS_NORM=normalizer is not None,
            USE_KL=ref_logp is not None and o.kl_coef != 0.0,
            ROWS=rows, BLOCK_T=block_t, num_warps=8, **_mode_args(o, cdt, logp.device))
    return g_lp, g_ent


# =============================================================================== grpo loss

def grpo_loss_forward(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                      mask: Tensor, normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                      is_weights: Optional[Tensor], temperature: float, o: PolicyOptions
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metrics, logp [B, T], entropy [B, T], stats [B*T, 3])``: the vocabulary
    kernel (log-probs and entropies in one pass over the logits) then the policy kernel."""
    from .vocab import token_logprobs_forward

    return fused_forward(
        lambda tok: token_logprobs_forward(logits, tok, temperature, -100, True),
        policy_loss_forward, tokens, old_logp, advantages, mask, normalizer, ref_logp,
        is_weights, o)


def grpo_loss_backward(grad_loss: Tensor, logits: Tensor, tokens: Tensor, old_logp: Tensor,
                       advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                       ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                       logp: Tensor, ent: Tensor, stats: Tensor, temperature: float,
                       o: PolicyOptions, inplace: bool) -> Tensor:
    """``d loss / d logits``: the policy kernel's gradients w.r.t. the log-probs (and the
    entropies when ``entropy_coef != 0``), pushed through the vocabulary backward kernel in
    one pass; ``inplace`` writes them into ``logits``."""
    from .vocab import token_logprobs_backward

    g_lp, g_ent = row_grads(policy_loss_backward, grad_loss, logp, ent, old_logp, advantages,
                            mask, normalizer, ref_logp, is_weights, o)
    return token_logprobs_backward(g_lp, g_ent, logits, tokens.reshape(-1), stats, temperature,
                                   -100, out=logits if inplace else None)
