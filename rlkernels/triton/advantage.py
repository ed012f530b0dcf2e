"""Triton kernel of ``group_advantages`` (rewards in). See
:mod:`rlkernels.reference.advantage` for the formulas; this file follows them step by step
(two-pass variance, ``r - r`` for a group of one member, the ``unbiased`` denominators).

One kernel launch; each program owns group "slots" ``pid, pid + P, ...``:

* contiguous groups (``group_size = S``): slot ``g`` is ``rewards[g S : (g + 1) S]``;
* arbitrary ids (``group_index``): the launcher sorts the ids (``torch.sort(stable=True)``:
  an integer sort, exact, members keep their order) and finds where each run of equal ids
  starts (``torch.searchsorted`` over the run numbers): no host synchronisation and no
  data-dependent shape. Slot ``g`` is the ``g``-th run of the sorted order, read through the
  permutation; there are at most ``B`` runs, so there are ``B`` slots and those past the last
  run are empty. Results are written back through the permutation.

A group's sums are block sums over chunks of ``_BLOCK`` members taken in the members' order
(their order in ``rewards``), the chunks added in order. The chunking is a constant and both
paths load the same values into the same lanes, so they give bit-identical results for the
same grouping, and a group's result does not depend on the other groups in the call. No
float atomics: deterministic. ``batch_std`` needs the std of the whole batch: each program
computes it once (two passes over the batch), so that method runs at most one program per SM
(one on the CPU) instead of one per group.

Float hyper-parameters (``eps``, ``gamma``, ``gamma * lam``) are runtime kernel arguments
annotated ``tl.float64`` (a plain Python float would reach the kernel as fp32 and be rounded
before an fp64 computation), rounded to the compute dtype in the kernel as PyTorch rounds a
Python scalar: a new value compiles nothing.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _codes
from ._common import device_guard

Tensor = torch.Tensor

_METHODS = _codes.ADVANTAGE_METHODS  # rlkernels/_codes.py
_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
_BLOCK = 128  # group members per step (fixed: the same sums in both paths, any group size)
_BATCH_BLOCK = 1024  # elements per step of the batch_std passes
_CPU_PROGRAMS = 1  # batch_std programs on the CPU (tests raise it to exercise the striding)


@triton.jit
def _sqrt(x, CDT: tl.constexpr):
    """IEEE square root: fp32 ``tl.sqrt`` is ``sqrt.approx.ftz.f32`` on NVIDIA GPUs,
    ``tl.sqrt_rn`` is fp32 only, fp64 ``tl.sqrt`` is ``sqrt.rn.f64``."""
    if CDT == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _group_advantages_kernel(x_ptr, x_stride, perm_ptr, starts_ptr, out_ptr, B, S, n_slots,
                             eps_f: tl.float64, CDT: tl.constexpr, INDEXED: tl.constexpr,
                             METHOD: tl.constexpr, UNBIASED: tl.constexpr,
                             IEEE_DIV: tl.constexpr, BLOCK: tl.constexpr,
                             BATCH_BLOCK: tl.constexpr):
    # Hot loops are written inline: the interpreter (CPU tests) pays ~1 ms per call of a
    # @triton.jit helper. Divisions are IEEE: tl.fdiv(ieee_rounding=IEEE_DIV) for fp32
    # (Triton's fp32 "/" is the approximate div.full.f32), "/" for fp64 (div.rn.f64).
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    eps = tl.full([], eps_f, CDT)
    if METHOD == 3:
        # the std of the whole batch, two passes (mean first), once per program
        acc = tl.zeros([BATCH_BLOCK], CDT)
        for i0 in range(0, B, BATCH_BLOCK):
            offs = i0 + tl.arange(0, BATCH_BLOCK)
            acc += tl.load(x_ptr + offs.to(tl.int64) * x_stride, mask=offs < B, other=0).to(CDT)
        mean_b = tl.fdiv(tl.sum(acc), tl.zeros([], CDT) + B, ieee_rounding=IEEE_DIV)
        acc = tl.zeros([BATCH_BLOCK], CDT)
        for i0 in range(0, B, BATCH_BLOCK):
            offs = i0 + tl.arange(0, BATCH_BLOCK)
            v = tl.load(x_ptr + offs.to(tl.int64) * x_stride, mask=offs < B, other=0).to(CDT)
            dev_b = tl.where(offs < B, v - mean_b, 0.0)
            acc += dev_b * dev_b
        denom_b = tl.zeros([], CDT) + B
        if UNBIASED:
            denom_b = denom_b - 1.0
        batch_std = _sqrt(tl.fdiv(tl.sum(acc), tl.maximum(denom_b, 1.0), ieee_rounding=IEEE_DIV),
                          CDT)
    for g in range(pid, n_slots, n_prog):
        # the slot's members are positions [start, end) of the group order
        if INDEXED:
            start = tl.load(starts_ptr + g)
            end = tl.load(starts_ptr + g + 1)
        else:
            start = (tl.zeros([], tl.int64) + g) * S
            end = start + S
        if end > start:
            n = (end - start).to(CDT)
            n_others = tl.maximum(n - 1.0, 1.0)  # n - 1; singletons are overwritten below
            # group sums: a block sum per chunk of BLOCK members, the chunks in order
            total = tl.zeros([], CDT)
            for c0 in range(start, end, BLOCK):
                offs = c0 + tl.arange(0, BLOCK)
                inb = offs < end
                if INDEXED:
                    src = tl.load(perm_ptr + offs, mask=inb, other=0)
                else:
                    src = offs
                total += tl.sum(tl.load(x_ptr + src * x_stride, mask=inb, other=0).to(CDT))
            mean = tl.fdiv(total, n, ieee_rounding=IEEE_DIV)
            if METHOD == 0:  # two-pass variance
                ss = tl.zeros([], CDT)
                for c0 in range(start, end, BLOCK):
                    offs = c0 + tl.arange(0, BLOCK)
                    inb = offs < end
                    if INDEXED:
                        src = tl.load(perm_ptr + offs, mask=inb, other=0)
                    else:
                        src = offs
                    v = tl.load(x_ptr + src * x_stride, mask=inb, other=0).to(CDT)
                    dev = tl.where(inb, v - mean, 0.0)
                    ss += tl.sum(dev * dev)
                if UNBIASED:
                    std = _sqrt(tl.fdiv(ss, n_others, ieee_rounding=IEEE_DIV), CDT)
                else:
                    std = _sqrt(tl.fdiv(ss, n, ieee_rounding=IEEE_DIV), CDT)
                scale = std + eps
            elif METHOD == 3:
                scale = batch_std + eps
            for c0 in range(start, end, BLOCK):
                offs = c0 + tl.arange(0, BLOCK)
                inb = offs < end
                if INDEXED:
                    src = tl.load(perm_ptr + offs, mask=inb, other=0)
                else:
                    src = offs
                v = tl.load(x_ptr + src * x_stride, mask=inb, other=0).to(CDT)
                if METHOD == 2:  # rloo: minus the mean of the other members
                    adv = v - tl.fdiv(total - v, n_others, ieee_rounding=IEEE_DIV)
                elif METHOD == 1:  # dr_grpo
                    adv = v - mean
                else:  # grpo, batch_std
                    adv = tl.fdiv(v - mean, scale, ieee_rounding=IEEE_DIV)
                # a group of one member has no baseline: r - r (0, or NaN for a NaN reward)
                tl.store(out_ptr + src, tl.where(n > 1.0, adv, v - v), mask=inb)


@lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(slots: int, method: str, x: Tensor) -> int:
    """One program per group slot; with ``batch_std`` every program first reads the whole
    batch, so then at most one program per SM (each loops over its slots), and one on the
    CPU (the interpreter runs programs one after the other)."""
    if method != "batch_std":
        return slots
    return min(slots, _num_sms(x.device.index or 0) if x.is_cuda else _CPU_PROGRAMS)


def group_advantages_forward(rewards: Tensor, group_index: Optional[Tensor], group_size: int,
                             method: str, eps: float, unbiased: bool) -> Tensor:
    """Advantages ``[B]`` (fp32, fp64 for fp64 rewards); one kernel launch (plus an integer
    sort and search of the ids when ``group_index`` is given)."""
    cdt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    x = rewards.reshape(-1)
    b = x.numel()
    out = torch.empty(b, dtype=cdt, device=x.device)
    if b == 0:
        return out
    if group_index is None:
        slots, perm, starts, indexed = b // group_size, x, x, False
    else:
        ids = group_index.reshape(-1)
        sorted_ids, perm = torch.sort(ids, stable=True)
        new_run = torch.ones(b, dtype=torch.int64, device=x.device)
        new_run[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
        run = torch.cumsum(new_run, 0) - 1  # run number of each sorted position
        # starts[g] = first sorted position of run g; B for every g past the last run
        starts = torch.searchsorted(run, torch.arange(b + 1, device=x.device))
        slots, indexed = b, True
    with device_guard(x):
        _group_advantages_kernel[(_programs(slots, method, x),)](
            x, x.stride(0), perm, starts, out, b, group_size, slots, float(eps),
            CDT=_TL_DTYPES[cdt], INDEXED=indexed, METHOD=_METHODS[method],
            UNBIASED=bool(unbiased), IEEE_DIV=cdt == torch.float32, BLOCK=_BLOCK,
            BATCH_BLOCK=min(_BATCH_BLOCK, triton.next_power_of_2(b)), num_warps=4)
    return out


# ===================================================================== GAE, discounted returns
#
# Both are reverse scans over T with masked positions transparent. Each step is an affine map
# of a small state, applied at the valid positions (the identity at masked ones), so a chunk
# of BLOCK_T steps composes with ``tl.associative_scan`` instead of T dependent steps; the
# state is carried from one chunk to the next (one program per row, chunks from the end of
# the row). Columns are loaded in reverse (lane i holds time ``t_end - i``) so the scan is a
# forward scan whose combine is "apply the earlier lane's map first": the well-defined
# ordering of ``tl.associative_scan`` (no ``reverse=True``).
#
# GAE state ``(nextvalue, lastgae)``; a valid step ``t``:
#     nextvalue' = v_t
#     lastgae'   = gamma * nextvalue + gamma lam * lastgae + (r_t - v_t)
# A composite of such steps keeps the shape ``nv' = k ? c1 : nv`` (``k``: a valid step was
# applied), ``lg' = m21 nv + m22 lg + c2`` (a masked step: ``k = 0, m22 = 1``, the rest 0);
# composing ``e`` after ``p`` is written out in _gae_combine.
# The selects (instead of multiplying by a 0/1 factor) keep an infinite value where the
# sequential reference keeps it, instead of turning ``0 * inf`` into NaN.

@triton.jit
def _gae_combine(k_p, c1_p, m21_p, m22_p, c2_p, k_e, c1_e, m21_e, m22_e, c2_e):
    """``e o p`` for maps ``nv' = k ? c1 : nv``, ``lg' = m21 nv + m22 lg + c2``:
    ``lg'' = m21_e nv' + m22_e lg' + c2_e`` with ``nv' = k_p ? c1_p : nv``, ``lg'`` of p."""
    k = k_p | k_e
    c1 = tl.where(k_e, c1_e, c1_p)
    # the nv coefficient of e reaches p's output: through c1_p when p had a valid step
    m21 = tl.where(k_p, m22_e * m21_p, m21_e + m22_e * m21_p)
    c2 = tl.where(k_p, m21_e * c1_p, 0.0) + m22_e * c2_p + c2_e
    return k, c1, m21, m22_e * m22_p, c2


@triton.jit
def _gae_kernel(r_ptr, r_s0, r_s1, v_ptr, v_s0, v_s1, m_ptr, m_s0, m_s1, adv_ptr, ret_ptr,
                T, gamma_f: tl.float64, gamma_lam_f: tl.float64, CDT: tl.constexpr,
                BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_T)
    gamma = tl.full([], gamma_f, CDT)
    gamma_lam = tl.full([], gamma_lam_f, CDT)
    nv = tl.zeros([], CDT)  # state after the already processed (later) chunks
    lg = tl.zeros([], CDT)
    for c in range(0, tl.cdiv(T, BLOCK_T)):
        t = (T - 1 - c * BLOCK_T - lanes).to(tl.int64)  # lane i: time t_end - i
        inb = t >= 0
        r = tl.load(r_ptr + row * r_s0 + t * r_s1, mask=inb, other=0).to(CDT)
        v = tl.load(v_ptr + row * v_s0 + t * v_s1, mask=inb, other=0).to(CDT)
        ok = (tl.load(m_ptr + row * m_s0 + t * m_s1, mask=inb, other=0) != 0) & inb
        zero = tl.zeros([BLOCK_T], CDT)
        k, c1, m21, m22, c2 = tl.associative_scan(
            (ok, tl.where(ok, v, zero), tl.where(ok, zero + gamma, zero),
             tl.where(ok, zero + gamma_lam, zero + 1.0), tl.where(ok, r - v, zero)),
            0, _gae_combine)
        nv_t = tl.where(k, c1, nv)
        lg_t = tl.where(k, m21 * nv + m22 * lg + c2, lg)
        adv = tl.where(ok, lg_t, zero)
        tl.store(adv_ptr + row * T + t, adv, mask=inb)
        tl.store(ret_ptr + row * T + t, tl.where(ok, adv + v, zero), mask=inb)
        # the last lane holds the composite of the whole chunk: the carry
        last = lanes == BLOCK_T - 1
        nv = tl.sum(tl.where(last, nv_t, zero), 0)
        lg = tl.sum(tl.where(last, lg_t, zero), 0)


@triton.jit
def _returns_combine(a_p, b_p, a_e, b_e):
    """``e o p`` for maps ``G' = a G + b``."""
    return a_e * a_p, a_e * b_p + b_e


@triton.jit
def _returns_kernel(r_ptr, r_s0, r_s1, m_ptr, m_s0, m_s1, out_ptr, T, gamma_f: tl.float64,
                    CDT: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_T)
    gamma = tl.full([], gamma_f, CDT)
    ret = tl.zeros([], CDT)
    for c in range(0, tl.cdiv(T, BLOCK_T)):
        t = (T - 1 - c * BLOCK_T - lanes).to(tl.int64)
        inb = t >= 0
        r = tl.load(r_ptr + row * r_s0 + t * r_s1, mask=inb, other=0).to(CDT)
        ok = (tl.load(m_ptr + row * m_s0 + t * m_s1, mask=inb, other=0) != 0) & inb
        zero = tl.zeros([BLOCK_T], CDT)
        a, b = tl.associative_scan((tl.where(ok, zero + gamma, zero + 1.0),
                                    tl.where(ok, r, zero)), 0, _returns_combine)
        g_t = a * ret + b
        tl.store(out_ptr + row * T + t, tl.where(ok, g_t, zero), mask=inb)
        ret = tl.sum(tl.where(lanes == BLOCK_T - 1, g_t, zero), 0)


_SCAN_BLOCK = 1024  # time steps per chunk (a power of two; fewer for short rows)


def _scan_block(steps: int) -> int:
    return max(16, min(_SCAN_BLOCK, triton.next_power_of_2(max(steps, 1))))


def gae_forward(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float):
    """``(advantages, returns)`` ``[B, T]``, as :func:`rlkernels.reference.advantage.gae`;
    one launch, one program per row."""
    cdt = torch.float64 if torch.float64 in (rewards.dtype, values.dtype) else torch.float32
    b, steps = rewards.shape
    adv = torch.empty((b, steps), dtype=cdt, device=rewards.device)
    ret = torch.empty_like(adv)
    if b == 0 or steps == 0:
        return adv, ret
    with device_guard(rewards):
        _gae_kernel[(b,)](rewards, *rewards.stride(), values, *values.stride(), mask,
                          *mask.stride(), adv, ret, steps, float(gamma), float(gamma * lam),
                          CDT=_TL_DTYPES[cdt], BLOCK_T=_scan_block(steps), num_warps=4)
    return adv, ret


def discounted_returns_forward(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """``[B, T]`` return-to-go, as :func:`rlkernels.reference.advantage.discounted_returns`;
    one launch, one program per row."""
    cdt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    b, steps = rewards.shape
    out = torch.empty((b, steps), dtype=cdt, device=rewards.device)
    if b == 0 or steps == 0:
        return out
    with device_guard(rewards):
        _returns_kernel[(b,)](rewards, *rewards.stride(), mask, *mask.stride(), out, steps,
                              float(gamma), CDT=_TL_DTYPES[cdt], BLOCK_T=_scan_block(steps),
                              num_warps=4)
    return out


# ============================================================================ masked_whiten
#
# Whole-tensor masked statistics, deterministic: each of P programs reduces a fixed strided
# set of BLOCK-element blocks into one partial; every program of the next launch adds the P
# partials in the same order (P is small), so all programs see the same bits. Forward: (1)
# partial count and sum(w v); (2) mean, partial sum(w d^2) and sum(w d) with d = v - mean (two
# passes, as the reference); (3) rstd and the output. Backward: (1) partial sum(g) and
# sum(g d); (2) the gradient. The formulas are in masked_whiten_backward's docstring.

_WHITEN_BLOCK = 1024


@triton.jit
def _whiten_sums(ws_ptr, P, PB: tl.constexpr, CDT: tl.constexpr):
    """The sums over programs of the two partials in ``ws [2, P]``."""
    offs = tl.arange(0, PB)
    a = tl.load(ws_ptr + offs, mask=offs < P, other=0).to(CDT)
    b = tl.load(ws_ptr + P + offs, mask=offs < P, other=0).to(CDT)
    return tl.sum(a, 0), tl.sum(b, 0)


@triton.jit
def _whiten_fwd_kernel(v_ptr, m_ptr, out_ptr, ws1_ptr, ws2_ptr, stats_ptr, n,
                       eps_f: tl.float64, STAGE: tl.constexpr, SHIFT: tl.constexpr,
                       UNBIASED: tl.constexpr, CDT: tl.constexpr, IEEE_DIV: tl.constexpr,
                       BLOCK: tl.constexpr, PB: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    if STAGE > 0:
        count, swv = _whiten_sums(ws1_ptr, P, PB, CDT)
        mean = tl.fdiv(swv, tl.maximum(count, 1.0), ieee_rounding=IEEE_DIV)
    if STAGE == 2:
        swdd, swd = _whiten_sums(ws2_ptr, P, PB, CDT)
        denom = count - 1.0 if UNBIASED else count
        var = tl.fdiv(swdd, tl.maximum(denom, 1.0), ieee_rounding=IEEE_DIV)
        eps = tl.full([], eps_f, CDT)
        rstd = tl.fdiv(tl.full([], 1.0, CDT), _sqrt(var + eps, CDT), ieee_rounding=IEEE_DIV)
    acc_a = tl.zeros([BLOCK], CDT)
    acc_b = tl.zeros([BLOCK], CDT)
    for start in range(pid * BLOCK, n, P * BLOCK):
        offs = start + lanes.to(tl.int64)
        inb = offs < n
        v = tl.load(v_ptr + offs, mask=inb, other=0).to(CDT)
        if STAGE == 2:
            out = (v - mean) * rstd
            if not SHIFT:
                out = out + mean
            tl.store(out_ptr + offs, out, mask=inb)
        else:
            m = tl.load(m_ptr + offs, mask=inb, other=0)
            ok = (m != 0) & inb
            w = m.to(CDT)
            if STAGE == 0:
                acc_a += tl.where(ok, w, 0.0)
                acc_b += tl.where(ok, w * v, 0.0)
            else:
                d = v - mean
                acc_a += tl.where(ok, w * d * d, 0.0)
                acc_b += tl.where(ok, w * d, 0.0)
    if STAGE == 0:
        tl.store(ws1_ptr + pid, tl.sum(acc_a, 0))
        tl.store(ws1_ptr + P + pid, tl.sum(acc_b, 0))
    elif STAGE == 1:
        tl.store(ws2_ptr + pid, tl.sum(acc_a, 0))
        tl.store(ws2_ptr + P + pid, tl.sum(acc_b, 0))
    else:
        if pid == 0:
            tl.store(stats_ptr, count)
            tl.store(stats_ptr + 1, mean)
            tl.store(stats_ptr + 2, rstd)
            tl.store(stats_ptr + 3, swd)


@triton.jit
def _whiten_bwd_kernel(g_ptr, v_ptr, m_ptr, stats_ptr, ws_ptr, grad_ptr, n,
                       STAGE: tl.constexpr, SHIFT: tl.constexpr, UNBIASED: tl.constexpr,
                       CDT: tl.constexpr, IEEE_DIV: tl.constexpr, BLOCK: tl.constexpr,
                       PB: tl.constexpr):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    count = tl.load(stats_ptr).to(CDT)
    mean = tl.load(stats_ptr + 1).to(CDT)
    rstd = tl.load(stats_ptr + 2).to(CDT)
    swd = tl.load(stats_ptr + 3).to(CDT)
    if STAGE == 1:
        sg, sgd = _whiten_sums(ws_ptr, P, PB, CDT)
        c1 = tl.maximum(count, 1.0)
        denom = tl.maximum(count - 1.0 if UNBIASED else count, 1.0)
        # d out_i / d mean summed against g: G (not SHIFT: + G); the rstd path: -rstd^3 / 2
        # times sum(g d) times d var / d v_j = (2 w_j d_j - 2 swd w_j / c1) / denom
        k_mean = sg * ((0.0 if SHIFT else 1.0) - rstd)
        k_var = -rstd * rstd * rstd * sgd
    acc_a = tl.zeros([BLOCK], CDT)
    acc_b = tl.zeros([BLOCK], CDT)
    for start in range(pid * BLOCK, n, P * BLOCK):
        offs = start + lanes.to(tl.int64)
        inb = offs < n
        g = tl.load(g_ptr + offs, mask=inb, other=0).to(CDT)
        v = tl.load(v_ptr + offs, mask=inb, other=0).to(CDT)
        d = v - mean
        if STAGE == 0:
            acc_a += g
            acc_b += tl.where(g != 0, g * d, 0.0)  # g = 0 adds 0, even for a NaN v
        else:
            m = tl.load(m_ptr + offs, mask=inb, other=0)
            ok = (m != 0) & inb
            w = m.to(CDT)
            dm = tl.where(ok, tl.fdiv(w, c1, ieee_rounding=IEEE_DIV), 0.0)
            dvar = tl.where(ok, tl.fdiv(w * d - swd * dm, denom, ieee_rounding=IEEE_DIV), 0.0)
            grad = g * rstd + dm * k_mean + dvar * k_var
            tl.store(grad_ptr + offs, grad, mask=inb)
    if STAGE == 0:
        tl.store(ws_ptr + pid, tl.sum(acc_a, 0))
        tl.store(ws_ptr + P + pid, tl.sum(acc_b, 0))


def _whiten_programs(n: int, x: Tensor) -> int:
    blocks = triton.cdiv(n, _WHITEN_BLOCK)
    limit = 2 * _num_sms(x.device.index or 0) if x.is_cuda else 4
    return max(1, min(blocks, limit))


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1).contiguous()


def masked_whiten_forward(values: Tensor, mask: Tensor, shift_mean: bool, eps: float,
                          unbiased: bool):
    """``(out, stats)``: ``out`` as :func:`rlkernels.reference.advantage.masked_whiten_forward`,
    ``stats = (count, mean, rstd, sum(w (v - mean)))`` for the backward. Three launches."""
    cdt = torch.float64 if values.dtype == torch.float64 else torch.float32
    v, m = _flat(values), _flat(mask)
    n = v.numel()
    out = torch.empty(values.shape, dtype=cdt, device=v.device)
    stats = torch.zeros(4, dtype=cdt, device=v.device)
    p = _whiten_programs(n, v)
    ws1 = torch.empty(2 * p, dtype=cdt, device=v.device)
    ws2 = torch.empty_like(ws1)
    with device_guard(v):
        for stage in range(3):
            _whiten_fwd_kernel[(p,)](
                v, m, out, ws1, ws2, stats, n, float(eps), STAGE=stage,
                SHIFT=bool(shift_mean), UNBIASED=bool(unbiased), CDT=_TL_DTYPES[cdt],
                IEEE_DIV=cdt == torch.float32, BLOCK=_WHITEN_BLOCK,
                PB=triton.next_power_of_2(p), num_warps=4)
    return out, stats


def masked_whiten_backward(grad_out: Tensor, values: Tensor, mask: Tensor, stats: Tensor,
                           shift_mean: bool, unbiased: bool) -> Tensor:
    """The gradient w.r.t. ``values`` of :func:`masked_whiten_forward`'s ``out``: the formula
    of :func:`rlkernels.reference.advantage.masked_whiten_backward`. Two launches; fp32 (fp64
    for fp64 values), the public op casts it to ``values.dtype``."""
    cdt = stats.dtype
    g, v, m = _flat(grad_out), _flat(values), _flat(mask)
    n = v.numel()
    grad = torch.empty(values.shape, dtype=cdt, device=v.device)
    p = _whiten_programs(n, v)
    ws = torch.empty(2 * p, dtype=cdt, device=v.device)
    with device_guard(v):
        for stage in range(2):
            _whiten_bwd_kernel[(p,)](
                g, v, m, stats, ws, grad, n, STAGE=stage, SHIFT=bool(shift_mean),
                UNBIASED=bool(unbiased), CDT=_TL_DTYPES[cdt], IEEE_DIV=cdt == torch.float32,
                BLOCK=_WHITEN_BLOCK, PB=triton.next_power_of_2(p), num_warps=4)
    return grad
