"""Triton kernels of ``rollout_correction``; they follow :mod:`rlkernels.reference.rollout`
formula by formula (read that file first).

Two launches, no host synchronisation. The first has one program per row tile (``ROWS``
whole rows, ``T`` in chunks of ``BLOCK_T``; tiles shrink down to one row until there are at
least ``_MIN_PROGRAMS`` of them) and reads each row twice: first its statistics (token count,
sums of the log-ratio, clamped log-ratio, k2, k3, maxima of k2, k3), which give the
sequence-level weights and the sequence rejection tests; then the per-token weights and keep
flags, which it writes, and the tile's partial sums of the metrics (``N_PARTIALS`` values
per program, in the compute dtype). The second launch, one program, adds the partials in
program order (blocks of ``_PB`` lanes, then a tree sum of the block: a fixed order, so the
metrics are deterministic without atomics) and divides.

Level, mode and the set of rejection criteria are ``tl.constexpr`` (codes of
rlkernels/_codes.py; the criteria as a bit mask); every float (weight bounds, log-ratio
clamp, one bound pair per criterion) is a runtime fp64 argument rounded to the compute dtype
in the kernel, as torch rounds a Python scalar: a new threshold compiles nothing.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _codes
from ..reference.rollout import METRICS, N_NUMS, compute_dtype
from ._common import device_guard
# tl.exp is ex2.approx on GPUs; the policy kernels' _exp takes libdevice's accurate exp there
from .policy import _exp

Tensor = torch.Tensor

_LEVELS = _codes.ROLLOUT_LEVELS
_MODES = _codes.ROLLOUT_MODES
_REJECTS = _codes.ROLLOUT_REJECTS

_TILE = 512
_MIN_BLOCK_T = 16
_MIN_PROGRAMS = 8
_NUM_WARPS = 4
# partials per program (see the stores of _rollout_kernel) and the lanes that add them
N_PARTIALS = 17
_NK = 32
_PB = 128
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _maxn(a, b):
    # NaN-propagating maximum (torch.amax): a NaN statistic at a valid position stays NaN
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp(x, lim):
    # clamp(x, -lim, lim) that keeps NaN (torch.clamp does; tl.minimum / tl.maximum do not)
    return tl.where(x < -lim, -lim, tl.where(x > lim, lim, x))


@triton.jit
def _rowmax(x):
    # NaN-propagating maximum over axis 1 (tl.max drops NaN)
    nan = tl.max(tl.where(x != x, 1, 0), axis=1) > 0
    return tl.where(nan, float("nan"), tl.max(x, axis=1))


@triton.jit
def _max1(m):
    # the NaN-propagating maximum of a [ROWS] vector
    nan = tl.max(tl.where(m != m, 1, 0), axis=0) > 0
    return tl.where(nan, float("nan"), tl.max(m, axis=0))


@triton.jit
def _rollout_kernel(
        old_ptr, roll_ptr, m_ptr, adv_ptr, w_ptr, keep_ptr, part_ptr, B, T,
        old_sb, old_st, roll_sb, roll_st, m_sb, m_st, adv_sb, adv_st,
        lo_f: tl.float64, hi_f: tl.float64, clamp_f: tl.float64,
        tk1_lo: tl.float64, tk1_hi: tl.float64, tk2_hi: tl.float64, tk3_hi: tl.float64,
        ss1_lo: tl.float64, ss1_hi: tl.float64, ss2_hi: tl.float64, ss3_hi: tl.float64,
        sm1_lo: tl.float64, sm1_hi: tl.float64, sm2_hi: tl.float64, sm3_hi: tl.float64,
        sx2_hi: tl.float64, sx3_hi: tl.float64, opsm_hi: tl.float64,
        CDT: tl.constexpr, LEVEL: tl.constexpr, MODE: tl.constexpr, REJ: tl.constexpr,
        IEEE_DIV: tl.constexpr, LIBDEVICE_EXP: tl.constexpr, ROWS: tl.constexpr,
        BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * ROWS + tl.arange(0, ROWS)
    rin = r < B
    r64 = r.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_T)[None, :]
    zero = tl.zeros([], CDT)
    lo = tl.full([], lo_f, CDT)
    hi = tl.full([], hi_f, CDT)
    lim = tl.full([], clamp_f, CDT)
    ninf = float("-inf")

    # ---- pass 1: the row statistics (per-row vectors: each chunk is reduced along T in
    # its own fixed tree, then added in chunk order; the order depends on T only)
    a_n = tl.zeros([ROWS], CDT)    # valid tokens
    a_m = tl.zeros([ROWS], CDT)    # sum m
    a_lr = tl.zeros([ROWS], CDT)   # sum m lr
    a_lrc = tl.zeros([ROWS], CDT)  # sum m lr_c
    a_k2 = tl.zeros([ROWS], CDT)
    a_k3 = tl.zeros([ROWS], CDT)
    x_k2 = tl.full([ROWS], ninf, CDT)
    x_k3 = tl.full([ROWS], ninf, CDT)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols
        inb = rin[:, None] & (t < T)
        t64 = t.to(tl.int64)
        m = tl.load(m_ptr + r64 * m_sb + t64 * m_st, mask=inb, other=0).to(CDT)
        valid = inb & (m != 0)
        old = tl.load(old_ptr + r64 * old_sb + t64 * old_st, mask=valid, other=0).to(CDT)
        roll = tl.load(roll_ptr + r64 * roll_sb + t64 * roll_st, mask=valid, other=0).to(CDT)
        lr = tl.where(valid, old - roll, zero)
        lrc = _clamp(lr, lim)
        k2 = 0.5 * lrc * lrc
        k3 = _exp(lrc, LIBDEVICE_EXP) - 1.0 - lrc
        a_n += tl.sum(tl.where(valid, 1.0, zero), axis=1)
        a_m += tl.sum(tl.where(valid, m, zero), axis=1)
        a_lr += tl.sum(tl.where(valid, m * lr, zero), axis=1)
        a_lrc += tl.sum(tl.where(valid, m * lrc, zero), axis=1)
        a_k2 += tl.sum(tl.where(valid, m * k2, zero), axis=1)
        a_k3 += tl.sum(tl.where(valid, m * k3, zero), axis=1)
        x_k2 = _maxn(x_k2, _rowmax(tl.where(valid, k2, ninf)))
        x_k3 = _maxn(x_k3, _rowmax(tl.where(valid, k3, ninf)))
    nonempty = a_n > 0
    cnt = a_m
    cnt_safe = tl.where(nonempty, tl.maximum(cnt, 1e-30), 1.0)
    s_lr = a_lr
    s_lrc = a_lrc
    s_k2 = a_k2
    s_k3 = a_k3
    mean_lr = tl.where(nonempty, tl.fdiv(s_lr, cnt_safe, ieee_rounding=IEEE_DIV), zero)
    mean_k1 = tl.where(nonempty, tl.fdiv(-s_lrc, cnt_safe, ieee_rounding=IEEE_DIV), zero)
    if LEVEL == 1:
        row_logw = _clamp(s_lr, lim)
    else:
        row_logw = _clamp(mean_lr, lim)
    # the sequence-level rejection tests
    row_pass = rin
    if (REJ >> 3) & 1:
        row_pass = row_pass & (-s_lrc >= tl.full([], ss1_lo, CDT)) \
            & (-s_lrc <= tl.full([], ss1_hi, CDT))
    if (REJ >> 4) & 1:
        row_pass = row_pass & (s_k2 <= tl.full([], ss2_hi, CDT))
    if (REJ >> 5) & 1:
        row_pass = row_pass & (s_k3 <= tl.full([], ss3_hi, CDT))
    if (REJ >> 6) & 1:
        row_pass = row_pass & (mean_k1 >= tl.full([], sm1_lo, CDT)) \
            & (mean_k1 <= tl.full([], sm1_hi, CDT))
    if (REJ >> 7) & 1:
        mk2 = tl.where(nonempty, tl.fdiv(s_k2, cnt_safe, ieee_rounding=IEEE_DIV), zero)
        row_pass = row_pass & (mk2 <= tl.full([], sm2_hi, CDT))
    if (REJ >> 8) & 1:
        mk3 = tl.where(nonempty, tl.fdiv(s_k3, cnt_safe, ieee_rounding=IEEE_DIV), zero)
        row_pass = row_pass & (mk3 <= tl.full([], sm3_hi, CDT))
    if (REJ >> 9) & 1:
        xk2 = tl.where(nonempty, x_k2, zero)
        row_pass = row_pass & (xk2 <= tl.full([], sx2_hi, CDT))
    if (REJ >> 10) & 1:
        xk3 = tl.where(nonempty, x_k3, zero)
        row_pass = row_pass & (xk3 <= tl.full([], sx3_hi, CDT))
    opsm_low_kl = mean_k1 <= tl.full([], opsm_hi, CDT)

    # ---- pass 2: weights, keep flags and the metrics' partial sums
    p_m = tl.zeros([ROWS], CDT)
    p_k1 = tl.zeros([ROWS], CDT)
    p_k3 = tl.zeros([ROWS], CDT)
    p_d = tl.zeros([ROWS], CDT)
    x_d = tl.full([ROWS], ninf, CDT)
    p_chi = tl.zeros([ROWS], CDT)
    p_w = tl.zeros([ROWS], CDT)
    x_w = tl.full([ROWS], ninf, CDT)
    n_w = tl.full([ROWS], ninf, CDT)  # max of -w
    p_w2 = tl.zeros([ROWS], CDT)
    p_hi = tl.zeros([ROWS], CDT)
    p_lo = tl.zeros([ROWS], CDT)
    p_rej = tl.zeros([ROWS], CDT)
    x_rej = tl.zeros([ROWS], CDT)  # 1 where a valid token was rejected
    for t0 in range(0, T, BLOCK_T):
        t = t0 + cols
        inb = rin[:, None] & (t < T)
        t64 = t.to(tl.int64)
        m = tl.load(m_ptr + r64 * m_sb + t64 * m_st, mask=inb, other=0).to(CDT)
        valid = inb & (m != 0)
        old = tl.load(old_ptr + r64 * old_sb + t64 * old_st, mask=valid, other=0).to(CDT)
        roll = tl.load(roll_ptr + r64 * roll_sb + t64 * roll_st, mask=valid, other=0).to(CDT)
        lr = tl.where(valid, old - roll, zero)
        lrc = _clamp(lr, lim)
        if LEVEL == 0:
            logw = lrc
        else:
            logw = row_logw[:, None] + zero * lrc
        raw = _exp(logw, LIBDEVICE_EXP)
        above = raw > hi
        below = raw < lo
        if MODE == 0:
            w = tl.where(above, hi, tl.where(below, lo, raw))
        else:
            w = tl.where((raw >= lo) & (raw <= hi), raw, zero)
        w = tl.where(valid, w, zero)
        passed = row_pass[:, None] & (t >= 0)
        if (REJ >> 0) & 1:
            passed = passed & (-lrc >= tl.full([], tk1_lo, CDT)) \
                & (-lrc <= tl.full([], tk1_hi, CDT))
        if (REJ >> 1) & 1:
            passed = passed & (0.5 * lrc * lrc <= tl.full([], tk2_hi, CDT))
        if (REJ >> 2) & 1:
            tk3 = _exp(lrc, LIBDEVICE_EXP) - 1.0 - lrc
            passed = passed & (tk3 <= tl.full([], tk3_hi, CDT))
        if (REJ >> 11) & 1:
            adv = tl.load(adv_ptr + r64 * adv_sb + t64 * adv_st, mask=inb, other=0).to(CDT)
            passed = passed & ((adv >= 0) | opsm_low_kl[:, None])
        keep = valid & passed
        wp = w_ptr + r64 * T + t64
        tl.store(wp, w, mask=inb)
        tl.store(keep_ptr + r64 * T + t64, keep.to(tl.int8), mask=inb)
        e = _exp(lr, LIBDEVICE_EXP)
        p_m += tl.sum(tl.where(valid, m, zero), axis=1)
        p_k1 += tl.sum(tl.where(valid, -m * lr, zero), axis=1)
        p_k3 += tl.sum(tl.where(valid, m * (e - lr - 1.0), zero), axis=1)
        p_d += tl.sum(tl.where(valid, m * tl.abs(lr), zero), axis=1)
        x_d = _maxn(x_d, _rowmax(tl.where(valid, tl.abs(lr), ninf)))
        p_chi += tl.sum(tl.where(valid, m * (_exp(2.0 * lrc, LIBDEVICE_EXP) - 1.0), zero), axis=1)
        p_w += tl.sum(tl.where(valid, m * w, zero), axis=1)
        x_w = _maxn(x_w, _rowmax(tl.where(valid, w, ninf)))
        n_w = _maxn(n_w, _rowmax(tl.where(valid, -w, ninf)))
        p_w2 += tl.sum(tl.where(valid, m * w * w, zero), axis=1)
        p_hi += tl.sum(tl.where(valid & above, m, zero), axis=1)
        p_lo += tl.sum(tl.where(valid & below, m, zero), axis=1)
        rejected = valid & (passed == 0)
        p_rej += tl.sum(tl.where(rejected, m, zero), axis=1)
        x_rej = tl.maximum(x_rej, tl.max(tl.where(rejected, 1.0, zero), axis=1))
    row_rej = (x_rej > 0) & nonempty
    slc = _clamp(s_lr, lim)
    chi_seq = tl.where(nonempty, _exp(2.0 * slc, LIBDEVICE_EXP) - 1.0, zero)
    base = part_ptr + pid
    P = tl.num_programs(0)
    tl.store(base + 0 * P, tl.sum(p_m, axis=0))
    tl.store(base + 1 * P, tl.sum(p_k1, axis=0))
    tl.store(base + 2 * P, tl.sum(p_k3, axis=0))
    tl.store(base + 3 * P, tl.sum(p_d, axis=0))
    tl.store(base + 4 * P, _max1(x_d))
    tl.store(base + 5 * P, tl.sum(p_chi, axis=0))
    tl.store(base + 6 * P, tl.sum(tl.where(nonempty, 1.0, zero), axis=0))
    tl.store(base + 7 * P, tl.sum(chi_seq, axis=0))
    tl.store(base + 8 * P, tl.sum(tl.where(nonempty, -mean_lr, zero), axis=0))
    tl.store(base + 9 * P, tl.sum(p_w, axis=0))
    tl.store(base + 10 * P, _max1(x_w))
    tl.store(base + 11 * P, _max1(n_w))
    tl.store(base + 12 * P, tl.sum(p_w2, axis=0))
    tl.store(base + 13 * P, tl.sum(p_hi, axis=0))
    tl.store(base + 14 * P, tl.sum(p_lo, axis=0))
    tl.store(base + 15 * P, tl.sum(p_rej, axis=0))
    tl.store(base + 16 * P, tl.sum(tl.where(row_rej, 1.0, zero), axis=0))


@triton.jit
def _pick(v, k: tl.constexpr, NK: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, NK) == k, v, 0.0))


@triton.jit
def _rollout_finish_kernel(part_ptr, met_ptr, P, CDT: tl.constexpr, IEEE_DIV: tl.constexpr,
                           NK: tl.constexpr, PB: tl.constexpr):
    """Stage 2, one program: the metrics from the partials ``[N_PARTIALS, P]``, added in
    program order (blocks of ``PB`` lanes)."""
    k = tl.arange(0, NK)[:, None]
    acc = tl.zeros([NK, PB], CDT)
    top = tl.full([NK, PB], float("-inf"), CDT)
    for p0 in range(0, P, PB):
        p = p0 + tl.arange(0, PB)[None, :]
        inb = (k < 17) & (p < P)
        x = tl.load(part_ptr + k * P + p, mask=inb, other=0).to(CDT)
        acc += x
        top = _maxn(top, tl.where(inb, x, float("-inf")))
    sums = tl.sum(acc, axis=1)
    maxes = _rowmax(top)
    zero = tl.zeros([], CDT)
    s0 = _pick(sums, 0, NK)
    tok = s0 > 0
    den = tl.where(tok, tl.maximum(s0, 1e-30), 1.0)
    nseq = _pick(sums, 6, NK)
    sden = tl.where(nseq > 0, nseq, 1.0)
    s1 = _pick(sums, 9, NK)
    s2 = _pick(sums, 12, NK)
    ess_den = s0 * s2
    ess = tl.where(ess_den > 0, tl.fdiv(s1 * s1, tl.where(ess_den > 0, ess_den, 1.0),
                                        ieee_rounding=IEEE_DIV), zero)
    tl.store(met_ptr + 0, tl.where(tok, tl.fdiv(_pick(sums, 1, NK), den,
                                                ieee_rounding=IEEE_DIV), zero).to(tl.float32))
    tl.store(met_ptr + 1, tl.where(tok, tl.fdiv(_pick(sums, 2, NK), den,
                                                ieee_rounding=IEEE_DIV), zero).to(tl.float32))
    tl.store(met_ptr + 2, tl.where(tok, tl.fdiv(_pick(sums, 3, NK), den,
                                                ieee_rounding=IEEE_DIV), zero).to(tl.float32))
    tl.store(met_ptr + 3, tl.where(tok, _pick(maxes, 4, NK), zero).to(tl.float32))
    tl.store(met_ptr + 4, tl.where(tok, tl.fdiv(_pick(sums, 5, NK), den,
                                                ieee_rounding=IEEE_DIV), zero).to(tl.float32))
    tl.store(met_ptr + 5, tl.fdiv(_pick(sums, 7, NK), sden,
                                  ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 6, tl.fdiv(_pick(sums, 8, NK), sden,
                                  ieee_rounding=IEEE_DIV).to(tl.float32))
    tl.store(met_ptr + 7, tl.where(tok, tl.fdiv(s1, den, ieee_rounding=IEEE_DIV),
                                   zero).to(tl.float32))
    tl.store(met_ptr + 8, tl.where(tok, _pick(maxes, 10, NK), zero).to(tl.float32))
    tl.store(met_ptr + 9, tl.where(tok, -_pick(maxes, 11, NK), zero).to(tl.float32))
    tl.store(met_ptr + 10, ess.to(tl.float32))
    tl.store(met_ptr + 11, tl.where(tok, tl.fdiv(_pick(sums, 13, NK), den,
                                                 ieee_rounding=IEEE_DIV), zero).to(tl.float32))
    tl.store(met_ptr + 12, tl.where(tok, tl.fdiv(_pick(sums, 14, NK), den,
                                                 ieee_rounding=IEEE_DIV), zero).to(tl.float32))
    tl.store(met_ptr + 13, tl.where(tok, tl.fdiv(_pick(sums, 15, NK), den,
                                                 ieee_rounding=IEEE_DIV), zero).to(tl.float32))
    tl.store(met_ptr + 14, tl.fdiv(_pick(sums, 16, NK), sden,
                                   ieee_rounding=IEEE_DIV).to(tl.float32))


# ================================================================================ launchers

def _blocks(b: int, t: int, cdt: torch.dtype = torch.float32) -> Tuple[int, int]:
    """``(ROWS, BLOCK_T)`` as the policy kernels: a function of ``(B, T)`` (and the compute
    dtype: fp64 tiles are half as large, so that the ~20 tile accumulators stay in registers
    without spills on sm_90), and a row's own sums are reduced over ``BLOCK_T`` lanes, which
    depends on ``T`` only (a row's weights and keep flags do not depend on the other rows:
    batch invariance)."""
    tile = _TILE if cdt == torch.float32 else _TILE // 2
    block_t = min(max(triton.next_power_of_2(max(t, 1)), _MIN_BLOCK_T), tile)
    rows = max(tile // block_t, 1)
    while rows > 1 and triton.cdiv(b, rows) < _MIN_PROGRAMS:
        rows //= 2
    return rows, block_t


def _reject_scalars(nums) -> Tuple[float, ...]:
    """The bounds the kernel reads, from ``nums`` (code c: ``nums[3 + 2c], nums[4 + 2c]``)."""
    def lo(name):
        return float(nums[3 + 2 * _REJECTS[name]])

    def hi(name):
        return float(nums[4 + 2 * _REJECTS[name]])

    return (lo("token_k1"), hi("token_k1"), hi("token_k2"), hi("token_k3"),
            lo("seq_sum_k1"), hi("seq_sum_k1"), hi("seq_sum_k2"), hi("seq_sum_k3"),
            lo("seq_mean_k1"), hi("seq_mean_k1"), hi("seq_mean_k2"), hi("seq_mean_k3"),
            hi("seq_max_k2"), hi("seq_max_k3"), hi("opsm"))


def _reject_mask(reject: str) -> int:
    bits = 0
    for name in reject.split(","):
        if name:
            bits |= 1 << _REJECTS[name]
    return bits


def _mask_view(mask: Tensor) -> Tensor:
    # bool masks are read as uint8 (same bytes); other dtypes as they are
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def rollout_correction_forward(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor,
                               advantages: Optional[Tensor], level: str, mode: str,
                               reject: str, nums) -> Tuple[Tensor, Tensor, Tensor]:
    """``(weights [B, T], keep [B, T] bool, metrics [len(METRICS)] fp32)`` as the reference;
    two launches."""
    if len(nums) != N_NUMS:
        raise ValueError(f"nums: expected {N_NUMS} values, got {len(nums)}")
    b, t = old_logp.shape
    cdt = compute_dtype(old_logp, rollout_logp)
    dev = old_logp.device
    weights = torch.empty((b, t), dtype=cdt, device=dev)
    keep = torch.empty((b, t), dtype=torch.bool, device=dev)
    metrics = torch.empty(len(METRICS), dtype=torch.float32, device=dev)
    if b == 0 or t == 0:
        weights.zero_(), keep.zero_(), metrics.zero_()
        return weights, keep, metrics
    rows, block_t = _blocks(b, t, cdt)
    p = triton.cdiv(b, rows)
    part = torch.empty((N_PARTIALS, p), dtype=cdt, device=dev)
    bits = _reject_mask(reject)
    if bits >> _REJECTS["opsm"] & 1:
        adv = advantages
        adv_s = (adv.stride(0), 0) if adv.dim() == 1 else (adv.stride(0), adv.stride(1))
    else:
        adv, adv_s = old_logp, (0, 0)
    m = _mask_view(mask)
    ieee = cdt == torch.float32
    with device_guard(old_logp):
        _rollout_kernel[(p,)](
            old_logp, rollout_logp, m, adv, weights, keep.view(torch.int8), part, b, t,
            old_logp.stride(0), old_logp.stride(1), rollout_logp.stride(0),
            rollout_logp.stride(1), m.stride(0), m.stride(1), *adv_s,
            float(nums[0]), float(nums[1]), float(nums[2]), *_reject_scalars(nums),
            CDT=_TL_DTYPES[cdt], LEVEL=_LEVELS[level], MODE=_MODES[mode], REJ=bits,
            IEEE_DIV=ieee, LIBDEVICE_EXP=dev.type != "cpu", ROWS=rows, BLOCK_T=block_t,
            num_warps=_NUM_WARPS)
        _rollout_finish_kernel[(1,)](part, metrics, p, CDT=_TL_DTYPES[cdt], IEEE_DIV=ieee,
                                     NK=_NK, PB=min(triton.next_power_of_2(p), _PB),
                                     num_warps=4)
    return weights, keep, metrics


__all__ = ["rollout_correction_forward", "N_PARTIALS"]
