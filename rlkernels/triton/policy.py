"""Triton kernels of the policy-loss ops (log-probs in), and of ``grpo_loss``.

They follow :mod:`rlkernels.reference.policy` formula by formula; read that file first.

``policy_loss_forward`` is two launches. The first has one program per row tile (``ROWS``
whole rows, ``T`` in chunks of ``BLOCK_T``; tiles shrink down to one row until there are at
least ``_MIN_PROGRAMS`` of them) and writes the tile's partial sums in the compute dtype
(fp32, fp64 for fp64 ``logp``): the numerator of ``aggregate`` (per-sequence token means
first for ``seq-mean-token-mean``), the token and non-empty-sequence counts and the masked
sums of every metric (and the masked max of the ratio). With ``ratio_level="sequence"``
(GSPO) each row is read twice: first the masked mean of the clamped log-ratio of each
sequence, then the per-token terms. The second launch, one program, adds the partials in
program order (blocks of ``_PB`` lanes, then a tree sum of the block: a fixed order, so the
result is deterministic without float atomics) and divides by the denominator.

``policy_loss_backward`` has one program per row tile too. When it needs row statistics
(the GSPO log-ratio, the token count of each sequence for ``seq-mean-token-mean``) or a
count over the whole batch for the denominator (``token-mean``, ``seq-mean-*`` without
``normalizer``), a first launch computes them per tile with the forward's own reductions
(``_seq_stats``: the same bits), and every program of the second adds the tiles' counts in
the same fixed order. The gradient is the analytic one of ``_policy_grad`` /
``aggregate_weights``: ties of max/min split the gradient half/half, ``d log r / d logp`` is
1 inside the clamp range (inclusive) and always 1 for the GSPO straight-through, masked
tokens get exactly 0.

Modes and flags reach the kernels as ``tl.constexpr``; the float hyper-parameters
(``clip_low``/``clip_high`` bounds, ``dual_clip``, ``delta``, ``kl_coef``, ``entropy_coef``,
``log_ratio_clamp``) are runtime fp64 arguments (annotated ``tl.float64``, so that Triton
passes all 53 bits whatever the compute dtype) rounded to the compute dtype in the kernel,
exactly like PyTorch rounds a Python scalar against an fp32 tensor: a schedule of
coefficients (KL or entropy annealing, adaptive clipping) compiles nothing new. A zero
coefficient drops its term through a runtime select (the reference skips it: ``0 * inf``
would be NaN). Absent optional tensors are replaced by a dummy pointer behind a constexpr
flag.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .. import _codes
from .._fused import fused_forward, row_grads
from .._policy_options import PolicyOptions

Tensor = torch.Tensor

# grpo_loss (the one op of this family with maps) takes logits [B, T, V] as given (its
# vocabulary kernels take the public shapes): rlkernels.ops._table skips its map and the
# gradient's reshape; logits [N, V] stay accepted
ND_ROWS = True

N_METRICS = 9  # rlkernels.reference.policy.METRICS
# Option codes (rlkernels/_codes.py); k3+ (4) has the value of k3 and the gradient of k2.
_LOSSES = _codes.POLICY_LOSSES
_AGGS = _codes.AGGS
_KLS = _codes.KL_ESTIMATORS

# Elements of one tile. A tile is ROWS whole rows when T is short, one chunk of a row
# otherwise; 1024 keeps the ~10 tile accumulators of the forward in registers.
_TILE = 1024
_MIN_BLOCK_T = 16
# Row tiles are made smaller (down to one row) until there are at least this many programs.
_MIN_PROGRAMS = 8
# Forward partials per program (see _policy_fwd_kernel's stores) and the lanes that add them.
N_PARTIALS = 13
_PB = 128


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
def _exp(x, LIBDEVICE_EXP: tl.constexpr):
    if LIBDEVICE_EXP:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _log(x, LIBDEVICE_EXP: tl.constexpr):
    if LIBDEVICE_EXP:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def _dppo_valid(lp, old, a, lo, hi, LOSS: tl.constexpr, LIBDEVICE_EXP: tl.constexpr):
    """DPPO's trust region (reference ``_dppo_valid``): ``lo``, ``hi`` are the divergence
    thresholds ``clip_low``, ``clip_high``; ``1 - p`` is ``-expm1(logp)``."""
    p = _exp(lp, LIBDEVICE_EXP)
    p_old = _exp(old, LIBDEVICE_EXP)
    if LOSS == 7:  # dppo_tv
        valid = tl.where(a > 0, p - p_old <= hi, p - p_old >= -lo)
    else:  # dppo_kl
        q_old = -_expm1(old)
        q = -_expm1(lp)
        binary_kl = p_old * (old - lp) + q_old * _log((q_old + 1e-8) / (q + 1e-8),
                                                       LIBDEVICE_EXP)
        valid = tl.where(a > 0, (binary_kl <= hi) | (p <= p_old),
                         (binary_kl <= lo) | (p >= p_old))
    return valid


@triton.jit
def _row_value(lp_ptr, old_ptr, adv_ptr, m_ptr, w_ptr, r64, rin, T, lp_sb, lp_st, old_sb,
               old_st, adv_sb, adv_st, m_sb, m_st, w_sb, w_st, lim, lo, hi,
               CDT: tl.constexpr, LOSS: tl.constexpr, HAS_W: tl.constexpr, ROWS: tl.constexpr,
               BLOCK_T: tl.constexpr, IEEE_DIV: tl.constexpr, LIBDEVICE_EXP: tl.constexpr):
    """Per row of a tile, the sequence value of gmpo (``LOSS == 4``: ``-mean_m(A)
    exp(mean_m(c)) W``, 0 for an empty row) or vespo (``LOSS == 10``: the clamped log of the
    sequence weight ``log w``); reference ``_gmpo_factor`` / ``_vespo_phi``."""
    acc_c = tl.zeros([ROWS, BLOCK_T], CDT)
    acc_x = tl.zeros([ROWS, BLOCK_T], CDT)
    acc_a = tl.zeros([ROWS, BLOCK_T], CDT)
    acc_w = tl.zeros([ROWS, BLOCK_T], CDT)
    log_lo = tl.full([], -18.420680743952367, tl.float64).to(CDT)  # log(1e-8), TRL's clamp
    for c0 in range(0, T, BLOCK_T):
        cols = c0 + tl.arange(0, BLOCK_T)
        c64 = cols.to(tl.int64)[None, :]
        inb = rin & (cols < T)[None, :]
        m = tl.load(m_ptr + r64 * m_sb + c64 * m_st, mask=inb, other=0).to(CDT)
        lp = tl.load(lp_ptr + r64 * lp_sb + c64 * lp_st, mask=inb, other=0).to(CDT)
        old = tl.load(old_ptr + r64 * old_sb + c64 * old_st, mask=inb, other=0).to(CDT)
        log_r = tl.maximum(lp - old, -lim, propagate_nan=tl.PropagateNan.ALL)
        log_r = tl.minimum(log_r, lim, propagate_nan=tl.PropagateNan.ALL)
        if LOSS == 4:
            a = tl.load(adv_ptr + r64 * adv_sb + c64 * adv_st, mask=inb, other=0).to(CDT)
            x = tl.where(a > 0, tl.minimum(log_r, hi, propagate_nan=tl.PropagateNan.ALL),
                         tl.where(a < 0, tl.maximum(log_r, -lo,
                                                    propagate_nan=tl.PropagateNan.ALL), 0.0))
            acc_a += tl.where(m != 0, a * m, 0.0)
            if HAS_W:
                w = tl.load(w_ptr + r64 * w_sb + c64 * w_st, mask=inb, other=1).to(CDT)
                acc_w += tl.where(m != 0, _log(w + 1e-10, LIBDEVICE_EXP) * m, 0.0)
        else:
            x = log_r
            if HAS_W:
                w = tl.load(w_ptr + r64 * w_sb + c64 * w_st, mask=inb, other=1).to(CDT)
                lw = tl.maximum(_log(w, LIBDEVICE_EXP), log_lo,
                                propagate_nan=tl.PropagateNan.ALL)
                lw = tl.minimum(lw, 20.0, propagate_nan=tl.PropagateNan.ALL)
                acc_w += tl.where(m != 0, lw * m, 0.0)
        acc_x += tl.where(m != 0, x * m, 0.0)
        acc_c += m
    count = tl.sum(acc_c, axis=1)
    sx = tl.sum(acc_x, axis=1)
    sw = tl.sum(acc_w, axis=1)
    if LOSS == 4:
        nonzero = tl.where(count > 0, count, 1.0)
        mean_a = tl.fdiv(tl.sum(acc_a, axis=1), nonzero, ieee_rounding=IEEE_DIV)
        value = -mean_a * _exp(tl.fdiv(sx, nonzero, ieee_rounding=IEEE_DIV), LIBDEVICE_EXP)
        if HAS_W:
            value = value * _exp(tl.fdiv(sw, nonzero, ieee_rounding=IEEE_DIV), LIBDEVICE_EXP)
        value = tl.where(count > 0, value, 0.0)
    else:
        value = tl.maximum(sx + sw, log_lo, propagate_nan=tl.PropagateNan.ALL)
        value = tl.minimum(value, 20.0, propagate_nan=tl.PropagateNan.ALL)
    return value


@triton.jit
def _vespo_phi(log_w, a, k_pos, k_neg, lam_pos, lam_neg, LIBDEVICE_EXP: tl.constexpr):
    """TRL's gamma weight ``exp(lam + k log w - lam w)``; 0 where it is not finite."""
    k = tl.where(a >= 0, k_pos, k_neg)
    lam = tl.where(a >= 0, lam_pos, lam_neg)
    phi = _exp(lam + k * log_w - lam * _exp(log_w, LIBDEVICE_EXP), LIBDEVICE_EXP)
    return tl.where(tl.abs(phi) < float("inf"), phi, 0.0)


@triton.jit
def _kl_value(d, KL: tl.constexpr):
    """``kl_penalty_forward`` of ``d = logp - ref_logp``."""
    if KL == 0:
        v = d
    elif KL == 1:
        v = tl.abs(d)
    elif KL == 2:
        v = 0.5 * d * d
    else:  # k3, low_var_kl, k3+, k3_is, k3_is_sg (times the ratio: the caller)
        v = _expm1(-d) + d
    return v


@triton.jit
def _hyper(lo_f, hi_f, clamp_f, dual_f, delta_f, kl_coef_f, ent_coef_f, CDT: tl.constexpr):
    """The runtime fp64 hyper-parameters rounded to the compute dtype, as torch does with a
    Python scalar: ``(clip lo, clip hi, log-ratio clamp, -dual clip, delta, kl_coef,
    entropy_coef)``."""
    return (tl.full([], lo_f, CDT), tl.full([], hi_f, CDT), tl.full([], clamp_f, CDT),
            -tl.full([], dual_f, CDT), tl.full([], delta_f, CDT),
            tl.full([], kl_coef_f, CDT), tl.full([], ent_coef_f, CDT))


@triton.jit
def _loss_hyper(pa_f, na_f, pb_f, nb_f, coef_f, CDT: tl.constexpr):
    """The loss-specific runtime floats (``PolicyOptions.loss_scalars``) in the compute
    dtype: ``(pos_a, neg_a, pos_b, neg_b, coef)``."""
    return (tl.full([], pa_f, CDT), tl.full([], na_f, CDT), tl.full([], pb_f, CDT),
            tl.full([], nb_f, CDT), tl.full([], coef_f, CDT))


@triton.jit
def _kl_grad(d, KL: tl.constexpr):
    """``kl_penalty_grad``: d penalty / d logp (k3+ is straight-through: k2's)."""
    if KL == 0:
        g = tl.full(d.shape, 1.0, d.dtype)
    elif KL == 1:  # torch.sign
        g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, tl.where(d == d, 0.0, d)))
    elif KL == 3 or KL == 5 or KL == 6:  # k3, k3_is, k3_is_sg (times r: the caller)
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
        lp_ptr, old_ptr, adv_ptr, m_ptr, ref_ptr, ent_ptr, w_ptr, sel_ptr, part_ptr,
        B, T, lp_sb, lp_st, old_sb, old_st, adv_sb, adv_st, m_sb, m_st, ref_sb, ref_st,
        ent_sb, ent_st, w_sb, w_st,
        lo_f: tl.float64, hi_f: tl.float64, dual_f: tl.float64, delta_f: tl.float64,
        kl_coef_f: tl.float64, ent_coef_f: tl.float64, clamp_f: tl.float64,
        pa_f: tl.float64, na_f: tl.float64, pb_f: tl.float64, nb_f: tl.float64,
        coef_f: tl.float64,
        CDT: tl.constexpr, LOSS: tl.constexpr, SEQ: tl.constexpr, AGG: tl.constexpr,
        KL: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_W: tl.constexpr,
        HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr, IEEE_DIV: tl.constexpr,
        LIBDEVICE_EXP: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Stage 1 of the forward: program ``pid`` reduces row tile ``pid`` (``ROWS`` rows, T in
    chunks of ``BLOCK_T``) into the ``N_PARTIALS`` partial sums ``part[k, pid]``."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    lo, hi, lim, neg_dual, delta, kl_coef, ent_coef = _hyper(
        lo_f, hi_f, clamp_f, dual_f, delta_f, kl_coef_f, ent_coef_f, CDT)
    pos_a, neg_a, pos_b, neg_b, coef = _loss_hyper(pa_f, na_f, pb_f, nb_f, coef_f, CDT)
    # every masked sum is where(m != 0, x * m, 0), a select, so that NaN or inf at a masked
    # position (NaN * 0 is NaN) never reaches a metric or the loss
    s_high = tl.zeros([ROWS, BLOCK_T], CDT)
    s_low = tl.zeros([ROWS, BLOCK_T], CDT)
    s_dual = tl.zeros([ROWS, BLOCK_T], CDT)
    s_akl = tl.zeros([ROWS, BLOCK_T], CDT)
    s_r = tl.zeros([ROWS, BLOCK_T], CDT)
    s_kl = tl.zeros([ROWS, BLOCK_T], CDT)
    s_ent = tl.zeros([ROWS, BLOCK_T], CDT)
    s_sel = tl.zeros([ROWS, BLOCK_T], CDT)
    r_max = tl.zeros([ROWS, BLOCK_T], CDT)
    r_nan = tl.zeros([ROWS, BLOCK_T], tl.int32)
    no_flag = tl.zeros([ROWS, BLOCK_T], tl.int1)
    rows = pid * ROWS + tl.arange(0, ROWS)
    r64 = rows.to(tl.int64)[:, None]
    rin = (rows < B)[:, None]
    if SEQ:  # GSPO: first pass over the rows, the sequence log-ratio
        seq, _ = _seq_stats(lp_ptr, old_ptr, m_ptr, r64, rin, T, lp_sb, lp_st, old_sb,
                            old_st, m_sb, m_st, lim, CDT, ROWS, BLOCK_T, True, IEEE_DIV)
        seq_log_r = seq[:, None] + tl.zeros([ROWS, BLOCK_T], CDT)
    if LOSS == 4 or LOSS == 10:  # gmpo / vespo: the sequence value, first pass over the rows
        row_val = _row_value(lp_ptr, old_ptr, adv_ptr, m_ptr, w_ptr, r64, rin, T, lp_sb,
                             lp_st, old_sb, old_st, adv_sb, adv_st, m_sb, m_st, w_sb, w_st,
                             lim, lo, hi, CDT, LOSS, HAS_W, ROWS, BLOCK_T, IEEE_DIV,
                             LIBDEVICE_EXP)
        row_val = row_val[:, None] + tl.zeros([ROWS, BLOCK_T], CDT)
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
            old = tl.load(old_ptr + r64 * old_sb + c64 * old_st, mask=inb, other=0).to(CDT)
            log_r = tl.maximum(lp - old, -lim, propagate_nan=tl.PropagateNan.ALL)
            log_r = tl.minimum(log_r, lim, propagate_nan=tl.PropagateNan.ALL)
        if LIBDEVICE_EXP:
            r = libdevice.exp(log_r)
        else:
            r = tl.exp(log_r)
        high = no_flag
        low = no_flag
        dual = no_flag
        selected = no_flag
        if LOSS == 5 or LOSS == 6:  # clip_cov / kl_cov: the launcher's selection
            selected = tl.load(sel_ptr + r64 * T + c64, mask=inb, other=0) != 0
        if LOSS == 0 or LOSS == 5:  # ppo, luspo, clip_cov
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
            if LOSS == 5:
                pg = tl.where(selected, 0.0, pg)
        elif LOSS == 1:  # cispo; lo is 0 unless cispo_clip_low (ratio_floor)
            weight = tl.clamp(r, lo, hi, propagate_nan=tl.PropagateNan.ALL)
            pg = -weight * a * lp
            high = r > hi
            low = r < lo
        elif LOSS == 3:  # sapo
            tau = tl.where(a > 0, pos_a, neg_a)
            gate = tl.fdiv(4.0, tau * (1.0 + _exp(-tau * (r - 1.0), LIBDEVICE_EXP)),
                           ieee_rounding=IEEE_DIV)
            pg = -gate * a
        elif LOSS == 4:  # gmpo: lo, hi are the log-ratio bounds clip_low, clip_high
            pg = row_val
            high = (a > 0) & (log_r > hi)
            low = (a < 0) & (log_r < -lo)
        elif LOSS == 6:  # kl_cov
            pg = -a * r + tl.where(selected, coef * tl.abs(log_r), 0.0)
        elif LOSS == 7 or LOSS == 8:  # dppo: lo, hi are the divergence thresholds
            valid = _dppo_valid(lp, old, a, lo, hi, LOSS, LIBDEVICE_EXP)
            pg = tl.where(valid, -a * tl.minimum(r, coef, propagate_nan=tl.PropagateNan.ALL)
                          * lp, 0.0)
            high = (a > 0) & (valid == 0)
            low = (a <= 0) & (valid == 0)
            dual = valid & (r > coef)
        elif LOSS == 9:  # dro
            pg = -a * lp + 0.5 * coef * log_r * log_r
        elif LOSS == 10:  # vespo (row_val = log w)
            pg = -_vespo_phi(row_val, a, pos_a, neg_a, pos_b, neg_b, LIBDEVICE_EXP) * a * lp
        else:  # reinforce
            pg = -a * lp
        if HAS_W:
            if LOSS != 4 and LOSS != 10:  # gmpo / vespo fold is_weights into row_val
                pg = pg * tl.load(w_ptr + r64 * w_sb + c64 * w_st, mask=inb,
                                  other=0).to(CDT)
        loss = pg
        if HAS_REF:
            ref = tl.load(ref_ptr + r64 * ref_sb + c64 * ref_st, mask=inb, other=0).to(CDT)
            kl = _kl_value(lp - ref, KL)
            if KL == 5 or KL == 6:  # k3_is, k3_is_sg: r k3
                kl = kl * r
            # a coefficient of 0 drops the term (as the reference: 0 * inf would be NaN);
            # a runtime select, so that a coefficient schedule compiles nothing new
            loss = tl.where(kl_coef != 0, loss + kl_coef * kl, loss)
            s_kl += tl.where(m != 0, kl * m, 0.0)
        if HAS_ENT:
            ent = tl.load(ent_ptr + r64 * ent_sb + c64 * ent_st, mask=inb, other=0).to(CDT)
            loss = tl.where(ent_coef != 0, loss - ent_coef * ent, loss)
            s_ent += tl.where(m != 0, ent * m, 0.0)
        row_loss += tl.where(m != 0, loss * m, 0.0)
        row_m += m
        s_high += high.to(CDT) * m
        s_low += low.to(CDT) * m
        s_dual += dual.to(CDT) * m
        s_sel += selected.to(CDT) * m
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
        total = tl.sum(tl.where(seq_tokens > 0, seq_mean, 0.0))
    else:
        total = tl.sum(seq_loss)
    out = part_ptr + pid
    tl.store(out + 0 * n_prog, total)
    tl.store(out + 1 * n_prog, tl.sum(seq_tokens))
    tl.store(out + 2 * n_prog, tl.sum((seq_tokens > 0).to(CDT)))
    tl.store(out + 3 * n_prog, tl.sum(s_high))
    tl.store(out + 4 * n_prog, tl.sum(s_low))
    tl.store(out + 5 * n_prog, tl.sum(s_dual))
    tl.store(out + 6 * n_prog, tl.sum(s_akl))
    tl.store(out + 7 * n_prog, tl.sum(s_r))
    tl.store(out + 8 * n_prog, tl.sum(s_kl))
    tl.store(out + 9 * n_prog, tl.sum(s_ent))
    tl.store(out + 10 * n_prog, tl.max(r_max))
    tl.store(out + 11 * n_prog, tl.max(r_nan).to(CDT))
    tl.store(out + 12 * n_prog, tl.sum(s_sel))


@triton.jit
def _partial_sums(part_ptr, P, K: tl.constexpr, CDT: tl.constexpr, NK: tl.constexpr,
                  PB: tl.constexpr):
    """Sums (and maxima) over programs of the partials ``part [K, P]`` (``NK >= K`` lanes,
    a power of two), each added in the program order in blocks of ``PB`` lanes: a fixed
    order, so every caller gets the same bits."""
    k = tl.arange(0, NK)[:, None]
    acc = tl.zeros([NK, PB], CDT)
    top = tl.zeros([NK, PB], CDT)
    for p0 in range(0, P, PB):
        p = p0 + tl.arange(0, PB)[None, :]
        x = tl.load(part_ptr + k * P + p, mask=(k < K) & (p < P), other=0).to(CDT)
        acc += x
        top = tl.maximum(top, x)
    return tl.sum(acc, axis=1), tl.max(top, axis=1)


@triton.jit
def _pick(v, k: tl.constexpr, NK: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, NK) == k, v, 0.0))


@triton.jit
def _policy_finish_kernel(part_ptr, norm_ptr, loss_ptr, met_ptr, P, T,
                          CDT: tl.constexpr, AGG: tl.constexpr, HAS_NORM: tl.constexpr,
                          IEEE_DIV: tl.constexpr, NK: tl.constexpr, PB: tl.constexpr):
    """Stage 2 of the forward, one program: the loss and the metrics from the partials."""
    sums, maxes = _partial_sums(part_ptr, P, 13, CDT, NK, PB)
    total = _pick(sums, 0, NK)
    tokens = _pick(sums, 1, NK)
    # the denominator of aggregate (its empty value counts as 1)
    if HAS_NORM:
        denom = tl.load(norm_ptr).to(CDT)
    elif AGG == 0:
        denom = tokens
    elif AGG == 3:
        denom = tl.zeros([], CDT) + T
    else:
        denom = _pick(sums, 2, NK)
    denom = tl.where(denom > 0, denom, 1.0)
    tl.store(loss_ptr, tl.fdiv(total, denom, ieee_rounding=IEEE_DIV))
    # METRICS, token-masked means in the compute dtype, stored as fp32
    count = tl.maximum(tokens, 1e-30)
    high = _pick(sums, 3, NK)
    low = _pick(sums, 4, NK)
    # clipfrac: also the covariance-selected tokens of clip_cov / kl_cov (disjoint)
    clipped = high + low + _pick(sums, 12, NK)
    tl.store(met_ptr + 0, tl.fdiv(clipped, count, ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 1, tl.fdiv(high, count, ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 2, tl.fdiv(low, count, ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 3, tl.fdiv(_pick(sums, 5, NK), count,
                                  ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 4, tl.fdiv(_pick(sums, 6, NK), count,
                                  ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 5, tl.fdiv(_pick(sums, 7, NK), count,
                                  ieee_rounding=IEEE_DIV).to(tl.float32))
    ratio_max = tl.where(_pick(maxes, 11, NK) != 0, float("nan"), _pick(maxes, 10, NK))
    tl.store(met_ptr + 6, ratio_max.to(tl.float32))
    tl.store(met_ptr + 7, tl.fdiv(_pick(sums, 8, NK), count,
                                  ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 8, tl.fdiv(_pick(sums, 9, NK), count,
                                  ieee_rounding=IEEE_DIV).to(tl.float32))


@triton.jit
def _policy_rowstat_kernel(lp_ptr, old_ptr, adv_ptr, m_ptr, w_ptr, seq_ptr, cnt_ptr,
                           part_ptr, B, T, lp_sb, lp_st, old_sb, old_st, adv_sb, adv_st,
                           m_sb, m_st, w_sb, w_st, clamp_f: tl.float64, lo_f: tl.float64,
                           hi_f: tl.float64, CDT: tl.constexpr, SEQ: tl.constexpr,
                           AGG: tl.constexpr, LOSS: tl.constexpr, HAS_W: tl.constexpr,
                           IEEE_DIV: tl.constexpr, LIBDEVICE_EXP: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_T: tl.constexpr):
    """Stage 1 of the backward: per row of tile ``pid`` its token count and (GSPO) sequence
    log-ratio, or the sequence value of gmpo / vespo (``_row_value``), the same sums as the
    forward's; ``part[pid]``, the tile's share of the denominator (tokens for token-mean,
    non-empty sequences otherwise)."""
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    lim = tl.full([], clamp_f, CDT)
    r64 = rows.to(tl.int64)[:, None]
    rin = (rows < B)[:, None]
    seq, seq_tokens = _seq_stats(lp_ptr, old_ptr, m_ptr, r64, rin, T, lp_sb, lp_st, old_sb,
                                 old_st, m_sb, m_st, lim, CDT, ROWS, BLOCK_T, SEQ, IEEE_DIV)
    if LOSS == 4 or LOSS == 10:  # token-level ratios: the seq slot holds the row value
        seq = _row_value(lp_ptr, old_ptr, adv_ptr, m_ptr, w_ptr, r64, rin, T, lp_sb, lp_st,
                         old_sb, old_st, adv_sb, adv_st, m_sb, m_st, w_sb, w_st, lim,
                         tl.full([], lo_f, CDT), tl.full([], hi_f, CDT), CDT, LOSS, HAS_W,
                         ROWS, BLOCK_T, IEEE_DIV, LIBDEVICE_EXP)
    tl.store(seq_ptr + rows, seq, mask=rows < B)
    tl.store(cnt_ptr + rows, seq_tokens, mask=rows < B)
    if AGG == 0:
        tl.store(part_ptr + pid, tl.sum(seq_tokens))
    else:
        tl.store(part_ptr + pid, tl.sum((seq_tokens > 0).to(CDT)))


@triton.jit
def _policy_bwd_kernel(
        grad_ptr, lp_ptr, old_ptr, adv_ptr, m_ptr, ref_ptr, w_ptr, sel_ptr, norm_ptr, seq_ptr,
        cnt_ptr, part_ptr, glp_ptr, gent_ptr,
        B, T, lp_sb, lp_st, old_sb, old_st, adv_sb, adv_st, m_sb, m_st, ref_sb, ref_st,
        w_sb, w_st,
        lo_f: tl.float64, hi_f: tl.float64, dual_f: tl.float64, delta_f: tl.float64,
        kl_coef_f: tl.float64, ent_coef_f: tl.float64, clamp_f: tl.float64,
        pa_f: tl.float64, na_f: tl.float64, pb_f: tl.float64, nb_f: tl.float64,
        coef_f: tl.float64,
        CDT: tl.constexpr, LOSS: tl.constexpr, SEQ: tl.constexpr, AGG: tl.constexpr,
        KL: tl.constexpr, HAS_REF: tl.constexpr, HAS_ENT: tl.constexpr, HAS_W: tl.constexpr,
        HAS_NORM: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_DELTA: tl.constexpr,
        IEEE_DIV: tl.constexpr, LIBDEVICE_EXP: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_T: tl.constexpr, PB: tl.constexpr):
    """Stage 2 of the backward: the gradients of row tile ``pid``."""
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    lo, hi, lim, neg_dual, delta, kl_coef, ent_coef = _hyper(
        lo_f, hi_f, clamp_f, dual_f, delta_f, kl_coef_f, ent_coef_f, CDT)
    neg_ent_coef = -ent_coef
    pos_a, neg_a, pos_b, neg_b, coef = _loss_hyper(pa_f, na_f, pb_f, nb_f, coef_f, CDT)

    # the denominator of aggregate (its empty value counts as 1)
    if HAS_NORM:
        denom = tl.load(norm_ptr).to(CDT)
    elif AGG == 3:
        denom = tl.zeros([], CDT) + T
    else:  # the partial counts of stage 1, added in a fixed order
        sums, _ = _partial_sums(part_ptr, n_prog, 1, CDT, 1, PB)
        denom = tl.sum(sums)
    denom = tl.where(denom > 0, denom, 1.0)
    g_loss = tl.load(grad_ptr).to(CDT)

    rows = pid * ROWS + tl.arange(0, ROWS)
    r64 = rows.to(tl.int64)[:, None]
    rin = (rows < B)[:, None]
    if SEQ:
        seq_log_r = tl.load(seq_ptr + r64, mask=rin, other=0) + tl.zeros([ROWS, BLOCK_T], CDT)
    if LOSS == 4 or LOSS == 10:  # gmpo / vespo: the sequence value of the first launch
        row_val = tl.load(seq_ptr + r64, mask=rin, other=0) + tl.zeros([ROWS, BLOCK_T], CDT)
    if AGG == 1:
        n_seq = tl.load(cnt_ptr + r64, mask=rin, other=0) + tl.zeros([ROWS, BLOCK_T], CDT)
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
        if SEQ:  # straight-through: d log r / d logp = 1
            log_r = seq_log_r
            dlog_r = tl.full([ROWS, BLOCK_T], 1.0, CDT)
        else:
            old = tl.load(old_ptr + r64 * old_sb + c64 * old_st, mask=inb, other=0).to(CDT)
            d = lp - old
            log_r = tl.maximum(d, -lim, propagate_nan=tl.PropagateNan.ALL)
            log_r = tl.minimum(log_r, lim, propagate_nan=tl.PropagateNan.ALL)
            dlog_r = ((d >= -lim) & (d <= lim)).to(CDT)
        if LIBDEVICE_EXP:
            r = libdevice.exp(log_r)
        else:
            r = tl.exp(log_r)
        if LOSS == 5 or LOSS == 6:  # clip_cov / kl_cov: the launcher's selection
            selected = tl.load(sel_ptr + r64 * T + c64, mask=inb, other=0) != 0
        if LOSS == 2:  # reinforce
            g = -a
        elif LOSS == 1:  # cispo: the clipped ratio is a constant factor of -A logp
            weight_r = tl.clamp(r, lo, hi, propagate_nan=tl.PropagateNan.ALL)
            g = -weight_r * a
        elif LOSS == 3:  # sapo: -A 4 s (1 - s) r dlog r
            tau = tl.where(a > 0, pos_a, neg_a)
            e = _exp(-tau * (r - 1.0), LIBDEVICE_EXP)
            sig = tl.fdiv(1.0, 1.0 + e, ieee_rounding=IEEE_DIV)
            g = -a * 4.0 * sig * (1.0 - sig) * r * dlog_r
        elif LOSS == 4:  # gmpo: the sequence value times d c / d logp
            inside = ((a > 0) & (log_r <= hi)) | ((a < 0) & (log_r >= -lo))
            g = row_val * inside.to(CDT) * dlog_r
        elif LOSS == 6:  # kl_cov
            sign = tl.where(log_r > 0, 1.0, tl.where(log_r < 0, -1.0, 0.0))
            g = (-a * r + tl.where(selected, coef * sign, 0.0)) * dlog_r
        elif LOSS == 7 or LOSS == 8:  # dppo
            valid = _dppo_valid(lp, old, a, lo, hi, LOSS, LIBDEVICE_EXP)
            g = tl.where(valid, -a * tl.minimum(r, coef, propagate_nan=tl.PropagateNan.ALL),
                         0.0)
        elif LOSS == 9:  # dro
            g = -a + coef * log_r * dlog_r
        elif LOSS == 10:  # vespo
            g = -_vespo_phi(row_val, a, pos_a, neg_a, pos_b, neg_b, LIBDEVICE_EXP) * a
        else:  # ppo, luspo, clip_cov
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
            if LOSS == 5:
                g = tl.where(selected, 0.0, g)
        if HAS_W:
            if LOSS != 4 and LOSS != 10:  # gmpo / vespo fold is_weights into row_val
                g = g * tl.load(w_ptr + r64 * w_sb + c64 * w_st, mask=inb, other=0).to(CDT)
        if HAS_REF:
            ref = tl.load(ref_ptr + r64 * ref_sb + c64 * ref_st, mask=inb, other=0).to(CDT)
            g_kl = _kl_grad(lp - ref, KL)
            if KL == 5 or KL == 6:  # r (1 - exp(-d)) [+ r dlog r k3 for k3_is]
                g_kl = r * g_kl
                if KL == 5:
                    g_kl = g_kl + r * dlog_r * _kl_value(lp - ref, KL)
            g = tl.where(kl_coef != 0, g + kl_coef * g_kl, g)
        out = r64 * T + c64
        tl.store(glp_ptr + out, tl.where(c != 0, c * g, 0.0), mask=inb)
        if HAS_ENT:
            tl.store(gent_ptr + out, tl.where(c != 0, neg_ent_coef * c, 0.0), mask=inb)


# =============================================================================== launchers

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def _blocks(b: int, t: int) -> Tuple[int, int]:
    """``(ROWS, BLOCK_T)``: whole rows per tile when T is short, else chunks of a row, and
    fewer rows per tile when that keeps at least ``_MIN_PROGRAMS`` row tiles (one program
    each). A row's own sums (its token count, its GSPO log-ratio, its loss) are reduced over
    ``BLOCK_T`` lanes, which depends on T only: they do not depend on the other rows of the
    call (batch invariance)."""
    block_t = min(max(triton.next_power_of_2(max(t, 1)), _MIN_BLOCK_T), _TILE)
    rows = max(_TILE // block_t, 1)
    while rows > 1 and triton.cdiv(b, rows) < _MIN_PROGRAMS:
        rows //= 2
    return rows, block_t


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _strides2d(x: Optional[Tensor]) -> Tuple[int, int]:
    return (0, 0) if x is None else (x.stride(0), x.stride(1))


def _adv_strides(advantages: Tensor) -> Tuple[int, int]:
    """``[B]`` advantages broadcast over T: a column stride of 0."""
    if advantages.dim() == 1:
        return advantages.stride(0), 0
    return advantages.stride(0), advantages.stride(1)


def _scalars(o: PolicyOptions) -> Tuple[float, ...]:
    """The float hyper-parameters, runtime fp64 kernel arguments (rounded to the compute
    dtype in the kernel): ``lo, hi, dual, delta, kl_coef, entropy_coef, clamp`` and the
    loss-specific ``pos_a, neg_a, pos_b, neg_b, coef`` (``PolicyOptions.loss_scalars``)."""
    lo, hi = o.kernel_bounds
    return (float(lo), float(hi), float(o.dual_clip or 0.0), float(o.delta or 0.0),
            float(o.kl_coef), float(o.entropy_coef), float(o.log_ratio_clamp),
            *(float(x) for x in o.loss_scalars))


def _selection(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
               o: PolicyOptions, cdt: torch.dtype) -> Tensor:
    """clip_cov / kl_cov: the covariance-selected tokens (a contiguous ``[B, T]`` 0/1 in
    the compute dtype), chosen on the device between the launches by the reference's
    :func:`~rlkernels.reference.policy.cov_selection` (a stable sort, no host
    synchronisation); a one-element dummy for the other losses."""
    if o.loss not in ("clip_cov", "kl_cov"):
        return logp
    from ..reference.policy import cov_selection

    return cov_selection(logp, old_logp, advantages, mask, o).to(cdt).contiguous()


def _mode_args(o: PolicyOptions, cdt: torch.dtype, device: torch.device) -> dict:
    """The constexprs: modes and flags only, never a float value."""
    ppo = _LOSSES[o.loss] == _LOSSES["ppo"]  # ppo and its alias luspo
    return dict(
        CDT=_TL_DTYPES[cdt], LOSS=_LOSSES[o.loss], SEQ=o.ratio_level == "sequence",
        AGG=_AGGS[o.agg], KL=_KLS[o.kl_estimator],
        HAS_DUAL=ppo and o.dual_clip is not None,
        HAS_DELTA=ppo and o.delta is not None,
        IEEE_DIV=cdt == torch.float32, LIBDEVICE_EXP=device.type != "cpu")


def _pb(p: int) -> int:
    return min(triton.next_power_of_2(max(p, 1)), _PB)


def policy_loss_forward(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                        normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                        entropy: Optional[Tensor], is_weights: Optional[Tensor],
                        o: PolicyOptions) -> Tuple[Tensor, Tensor]:
    """Returns ``(loss [], metrics [9] fp32)`` as the reference; two launches (the row tiles'
    partial sums, then one program that adds them)."""
    b, t = logp.shape
    cdt = _compute_dtype(logp.dtype)
    loss = torch.empty((), dtype=cdt, device=logp.device)
    metrics = torch.empty(N_METRICS, dtype=torch.float32, device=logp.device)
    rows, block_t = _blocks(b, t)
    p = max(triton.cdiv(b, rows), 1)
    part = torch.empty((N_PARTIALS, p), dtype=cdt, device=logp.device)
    modes = _mode_args(o, cdt, logp.device)
    with _device_guard(logp):
        sel = _selection(logp, old_logp, advantages, mask, o, cdt)
        _policy_fwd_kernel[(p,)](
            logp, old_logp, advantages, mask,
            logp if ref_logp is None else ref_logp, logp if entropy is None else entropy,
            logp if is_weights is None else is_weights, sel, part,
            b, t, *_strides2d(logp), *_strides2d(old_logp), *_adv_strides(advantages),
            *_strides2d(mask), *_strides2d(ref_logp), *_strides2d(entropy),
            *_strides2d(is_weights), *_scalars(o),
            HAS_REF=ref_logp is not None, HAS_ENT=entropy is not None,
            HAS_W=is_weights is not None, ROWS=rows, BLOCK_T=block_t, num_warps=8, **modes)
        _policy_finish_kernel[(1,)](
            part, logp if normalizer is None else normalizer, loss, metrics, p, t,
            CDT=modes["CDT"], AGG=modes["AGG"], HAS_NORM=normalizer is not None,
            IEEE_DIV=modes["IEEE_DIV"], NK=16, PB=_pb(p), num_warps=4)
    return loss, metrics


def policy_loss_backward(grad_loss: Tensor, logp: Tensor, old_logp: Tensor,
                         advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                         ref_logp: Optional[Tensor], entropy: Optional[Tensor],
                         is_weights: Optional[Tensor], o: PolicyOptions
                         ) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients w.r.t. ``logp`` (its dtype) and ``entropy`` (its dtype, ``None`` when not
    given), contiguous ``[B, T]``. One launch, two when a row statistic (GSPO log-ratio,
    per-sequence token count) or a batch count (the denominator) is needed: the first
    launch computes them per row tile, the second reads them."""
    b, t = logp.shape
    cdt = _compute_dtype(logp.dtype)
    g_lp = torch.empty((b, t), dtype=logp.dtype, device=logp.device)
    g_ent = None if entropy is None else torch.empty((b, t), dtype=entropy.dtype,
                                                     device=logp.device)
    if b * t == 0:
        return g_lp, g_ent
    rows, block_t = _blocks(b, t)
    p = triton.cdiv(b, rows)
    modes = _mode_args(o, cdt, logp.device)
    seq = cnt = part = g_lp
    scalars = _scalars(o)
    with _device_guard(logp):
        sel = _selection(logp, old_logp, advantages, mask, o, cdt)
        if modes["SEQ"] or o.loss in ("gmpo", "vespo") or \
                o.agg != "seq-mean-token-sum-norm" and (
                    normalizer is None or o.agg == "seq-mean-token-mean"):
            stats = torch.empty((2 * b + p,), dtype=cdt, device=logp.device)
            seq, cnt, part = stats[:b], stats[b:2 * b], stats[2 * b:]
            _policy_rowstat_kernel[(p,)](
                logp, old_logp, advantages, mask, logp if is_weights is None else is_weights,
                seq, cnt, part, b, t, *_strides2d(logp), *_strides2d(old_logp),
                *_adv_strides(advantages), *_strides2d(mask), *_strides2d(is_weights),
                float(o.log_ratio_clamp), scalars[0], scalars[1],
                CDT=modes["CDT"], SEQ=modes["SEQ"], AGG=modes["AGG"], LOSS=modes["LOSS"],
                HAS_W=is_weights is not None, IEEE_DIV=modes["IEEE_DIV"],
                LIBDEVICE_EXP=modes["LIBDEVICE_EXP"], ROWS=rows, BLOCK_T=block_t,
                num_warps=8)
        _policy_bwd_kernel[(p,)](
            grad_loss, logp, old_logp, advantages, mask,
            logp if ref_logp is None else ref_logp,
            logp if is_weights is None else is_weights, sel,
            logp if normalizer is None else normalizer, seq, cnt, part, g_lp,
            g_lp if g_ent is None else g_ent,
            b, t, *_strides2d(logp), *_strides2d(old_logp), *_adv_strides(advantages),
            *_strides2d(mask), *_strides2d(ref_logp), *_strides2d(is_weights), *scalars,
            HAS_REF=ref_logp is not None, HAS_ENT=entropy is not None,
            HAS_W=is_weights is not None, HAS_NORM=normalizer is not None, ROWS=rows,
            BLOCK_T=block_t, PB=_pb(p), num_warps=8, **modes)
    return g_lp, g_ent


# =============================================================================== grpo loss

def grpo_loss_forward(logits: Tensor, tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                      mask: Tensor, normalizer: Optional[Tensor], ref_logp: Optional[Tensor],
                      is_weights: Optional[Tensor], temperature: float, o: PolicyOptions
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(loss, metrics, logp [B, T], entropy [B, T], stats [B*T, 3])`` (``stats [B, T, 3]``
    for logits ``[B, T, V]``): the vocabulary kernel (log-probs and entropies in one pass
    over the logits) then the policy kernel."""
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
