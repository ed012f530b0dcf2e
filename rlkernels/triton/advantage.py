"""Triton kernels of the advantage ops (rewards in). See
:mod:`rlkernels.reference.advantage` for the formulas; this file follows them step by step
(two-pass variance, ``r - r`` for a group of one member, the ``unbiased`` denominators).
verl's estimators run in the same group kernel (``METHOD`` codes 4-8: the response lengths
are counted from the mask there); ``reinforce_plus_plus_baseline`` / ``gdpo`` and
``discounted_returns(whiten=True)`` end with ``_batch_whiten_kernel`` (a second launch).

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
_BATCH_BLOCK = 1024  # elements per step of the batch_std / gpg / whitening passes
_LEN_BLOCK_T = 32  # mask columns per step when counting a response's valid tokens
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
def _members(perm_ptr, c0, end, BLOCK: tl.constexpr, INDEXED: tl.constexpr):
    """``(src, inb)``: the rows of a group's members ``c0 + [0, BLOCK)`` (through the sorting
    permutation ``perm`` with ``INDEXED``, else contiguous) and which of them exist
    (``< end``, the group's end)."""
    offs = c0 + tl.arange(0, BLOCK)
    inb = offs < end
    if INDEXED:
        src = tl.load(perm_ptr + offs, mask=inb, other=0)
    else:
        src = offs
    return src, inb


@triton.jit
def _group_advantages_kernel(x_ptr, x_stride, x_col, perm_ptr, starts_ptr, out_ptr, ws_ptr,
                             m_ptr, m_s0, m_s1, T, w_ptr, K, B, S, n_slots,
                             eps_f: tl.float64, CDT: tl.constexpr, INDEXED: tl.constexpr,
                             METHOD: tl.constexpr, UNBIASED: tl.constexpr,
                             NORM: tl.constexpr, IEEE_DIV: tl.constexpr, BLOCK: tl.constexpr,
                             BLOCK_T: tl.constexpr, BATCH_BLOCK: tl.constexpr):
    # Hot loops are written inline: the interpreter (CPU tests) pays ~1 ms per call of a
    # @triton.jit helper. Divisions are IEEE: tl.fdiv(ieee_rounding=IEEE_DIV) for fp32
    # (Triton's fp32 "/" is the approximate div.full.f32), "/" for fp64 (div.rn.f64).
    # METHOD: _codes.ADVANTAGE_METHODS. The whitened methods (7, 8) write the pre-whitening
    # advantage and the response's valid tokens into ws [3, B] (valid tokens, advantage,
    # 0) for _batch_whiten_kernel.
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
    if METHOD == 5:
        # gpg: alpha = B / max(number of non-zero rewards, 1), once per program (exact count)
        cnt = tl.zeros([BATCH_BLOCK], tl.int32)
        for i0 in range(0, B, BATCH_BLOCK):
            offs = i0 + tl.arange(0, BATCH_BLOCK)
            v = tl.load(x_ptr + offs.to(tl.int64) * x_stride, mask=offs < B, other=0).to(CDT)
            cnt += (v != 0).to(tl.int32)
        alpha = tl.fdiv(tl.zeros([], CDT) + B, tl.maximum(tl.sum(cnt), 1).to(CDT),
                        ieee_rounding=IEEE_DIV)
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
            if METHOD == 4 or METHOD >= 7:
                # valid tokens of each member's response (an exact integer count), kept in
                # ws[B + i]; opo sums them (and L r) over the group
                sum_len = tl.zeros([], CDT)
                sum_lr = tl.zeros([], CDT)
                for c0 in range(start, end, BLOCK):
                    src, inb = _members(perm_ptr, c0, end, BLOCK, INDEXED)
                    cnt_t = tl.zeros([BLOCK], tl.int32)
                    for t0 in range(0, T, BLOCK_T):
                        tt = t0 + tl.arange(0, BLOCK_T)
                        mv = tl.load(m_ptr + src[:, None] * m_s0 + tt[None, :].to(tl.int64) * m_s1,
                                     mask=inb[:, None] & (tt[None, :] < T), other=0)
                        cnt_t += tl.sum((mv != 0).to(tl.int32), 1)
                    lens = cnt_t.to(CDT)
                    if METHOD == 4:
                        v = tl.load(x_ptr + src * x_stride, mask=inb, other=0).to(CDT)
                        sum_len += tl.sum(lens)
                        sum_lr += tl.sum(tl.where(inb, lens * v, 0.0))
                    else:
                        tl.store(ws_ptr + src, lens, mask=inb)
            # component loop: K components for gdpo, one otherwise
            for k in range(0, K):
                xk_ptr = x_ptr + k * x_col
                # group sums: a block sum per chunk of BLOCK members, the chunks in order
                total = tl.zeros([], CDT)
                for c0 in range(start, end, BLOCK):
                    src, inb = _members(perm_ptr, c0, end, BLOCK, INDEXED)
                    total += tl.sum(tl.load(xk_ptr + src * x_stride, mask=inb, other=0).to(CDT))
                mean = tl.fdiv(total, n, ieee_rounding=IEEE_DIV)
                if METHOD == 6:
                    # grpo_passk: the best reward, how many members have it, the second best
                    top = tl.full([], float("-inf"), CDT)
                    for c0 in range(start, end, BLOCK):
                        src, inb = _members(perm_ptr, c0, end, BLOCK, INDEXED)
                        v = tl.load(xk_ptr + src * x_stride, mask=inb, other=float("-inf"))
                        top = tl.maximum(top, tl.max(v.to(CDT)))
                    n_top = tl.zeros([], tl.int32)
                    second = tl.full([], float("-inf"), CDT)
                    for c0 in range(start, end, BLOCK):
                        src, inb = _members(perm_ptr, c0, end, BLOCK, INDEXED)
                        v = tl.load(xk_ptr + src * x_stride, mask=inb, other=0).to(CDT)
                        is_top = inb & (v == top)
                        n_top += tl.sum(is_top.to(tl.int32))
                        second = tl.maximum(second, tl.max(tl.where(is_top | (inb == 0),
                                                                    float("-inf"), v)))
                    gap = top - second
                if (METHOD == 0 or METHOD == 6 or METHOD == 8) and NORM:
                    # two-pass variance
                    ss = tl.zeros([], CDT)
                    for c0 in range(start, end, BLOCK):
                        src, inb = _members(perm_ptr, c0, end, BLOCK, INDEXED)
                        v = tl.load(xk_ptr + src * x_stride, mask=inb, other=0).to(CDT)
                        dev = tl.where(inb, v - mean, 0.0)
                        ss += tl.sum(dev * dev)
                    if UNBIASED:
                        std = _sqrt(tl.fdiv(ss, n_others, ieee_rounding=IEEE_DIV), CDT)
                    else:
                        std = _sqrt(tl.fdiv(ss, n, ieee_rounding=IEEE_DIV), CDT)
                    scale = std + eps
                elif METHOD == 3:
                    scale = batch_std + eps
                if METHOD == 6 and NORM:
                    gap = tl.fdiv(gap, scale, ieee_rounding=IEEE_DIV)
                if METHOD == 4:
                    base = tl.fdiv(sum_lr, sum_len, ieee_rounding=IEEE_DIV)
                if METHOD == 8:
                    wk = tl.load(w_ptr + k).to(CDT)
                for c0 in range(start, end, BLOCK):
                    src, inb = _members(perm_ptr, c0, end, BLOCK, INDEXED)
                    v = tl.load(xk_ptr + src * x_stride, mask=inb, other=0).to(CDT)
                    if METHOD == 2:  # rloo: minus the mean of the other members
                        adv = v - tl.fdiv(total - v, n_others, ieee_rounding=IEEE_DIV)
                    elif METHOD == 1 or METHOD == 7:  # dr_grpo, rf++ baseline (pre-whitening)
                        adv = v - mean
                    elif METHOD == 4:  # opo: no valid token in the group -> no baseline
                        adv = tl.where(sum_len > 0, v - base, v - v)
                    elif METHOD == 5:  # gpg
                        adv = alpha * (v - mean)
                    elif METHOD == 6:  # grpo_passk; a NaN / inf reward: the group is NaN
                        adv = tl.where((v == top) & (n_top == 1), gap, 0.0) + (total - total)
                    elif (METHOD == 0 or METHOD == 8) and not NORM:
                        adv = v - mean
                    else:  # grpo, batch_std, gdpo's component
                        adv = tl.fdiv(v - mean, scale, ieee_rounding=IEEE_DIV)
                    # a group of one member has no baseline: r - r (0, or NaN for a NaN reward)
                    adv = tl.where(n > 1.0, adv, v - v)
                    if METHOD == 8:  # ws starts at 0: 0 + w_0 A_0 + w_1 A_1 + ...
                        acc = tl.load(ws_ptr + B + src, mask=inb, other=0) + wk * adv
                        tl.store(ws_ptr + B + src, acc, mask=inb)
                    elif METHOD == 7:
                        tl.store(ws_ptr + B + src, adv, mask=inb)
                    else:
                        tl.store(out_ptr + src, adv, mask=inb)


@triton.jit
def _batch_whiten_kernel(ws_ptr, out_ptr, m_ptr, m_s0, m_s1, B, T, eps_f: tl.float64,
                         TOKENS: tl.constexpr, UNBIASED: tl.constexpr, CDT: tl.constexpr,
                         IEEE_DIV: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    """Whitening over the batch from per-row statistics ``ws [3, B] = (n_i, mean_i, M2_i)``
    (``n_i`` valid tokens, their mean and sum of squared deviations; a row's advantage
    broadcast over its tokens has ``M2_i = 0``), combined in a fixed order by every program
    (the same bits everywhere): ``N = sum n``, ``mean = sum n_i mean_i / max(N, 1)``,
    ``M2 = sum M2_i + n_i (mean_i - mean)^2`` (Chan et al.), ``var = M2 / max(N - 1, 1)``
    (``max(N, 1)`` when not ``UNBIASED``). Then each program rewrites its rows: ``TOKENS``:
    ``out[i, t] = valid ? (out[i, t] - mean) rstd : 0``; else ``out[i] = (mean_i - mean)
    rstd``."""
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    acc_n = tl.zeros([BLOCK], CDT)
    acc_s = tl.zeros([BLOCK], CDT)
    for i0 in range(0, B, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        inb = offs < B
        cnt = tl.load(ws_ptr + offs, mask=inb, other=0)
        mu = tl.load(ws_ptr + B + offs, mask=inb, other=0)
        acc_n += cnt
        acc_s += tl.where(cnt > 0, cnt * mu, 0.0)
    total_n = tl.sum(acc_n)
    mean = tl.fdiv(tl.sum(acc_s), tl.maximum(total_n, 1.0), ieee_rounding=IEEE_DIV)
    acc_q = tl.zeros([BLOCK], CDT)
    for i0 in range(0, B, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        inb = offs < B
        cnt = tl.load(ws_ptr + offs, mask=inb, other=0)
        d = tl.load(ws_ptr + B + offs, mask=inb, other=0) - mean
        m2 = tl.load(ws_ptr + 2 * B + offs, mask=inb, other=0)
        acc_q += tl.where(cnt > 0, m2 + cnt * d * d, 0.0)
    if UNBIASED:
        denom = tl.maximum(total_n - 1.0, 1.0)
    else:
        denom = tl.maximum(total_n, 1.0)
    var = tl.fdiv(tl.sum(acc_q), denom, ieee_rounding=IEEE_DIV)
    rstd = tl.fdiv(tl.full([], 1.0, CDT), _sqrt(var + tl.full([], eps_f, CDT), CDT),
                   ieee_rounding=IEEE_DIV)
    if TOKENS:
        for row in range(pid, B, P):
            r64 = (tl.zeros([], tl.int64) + row)
            for t0 in range(0, T, BLOCK_T):
                tt = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
                inb = tt < T
                ok = (tl.load(m_ptr + r64 * m_s0 + tt * m_s1, mask=inb, other=0) != 0) & inb
                a = tl.load(out_ptr + r64 * T + tt, mask=inb, other=0)
                tl.store(out_ptr + r64 * T + tt, tl.where(ok, (a - mean) * rstd, 0.0), mask=inb)
    else:
        for i0 in range(pid * BLOCK, B, P * BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            inb = offs < B
            mu = tl.load(ws_ptr + B + offs, mask=inb, other=0)
            tl.store(out_ptr + offs, (mu - mean) * rstd, mask=inb)


@lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(slots: int, method: str, x: Tensor) -> int:
    """One program per group slot; with ``batch_std`` and ``gpg`` every program first reads
    the whole batch, so then at most one program per SM (each loops over its slots), and one
    on the CPU (the interpreter runs programs one after the other)."""
    if method not in ("batch_std", "gpg"):
        return slots
    return min(slots, _num_sms(x.device.index or 0) if x.is_cuda else _CPU_PROGRAMS)


def _whiten_grid(rows: int, x: Tensor) -> int:
    """Programs of _batch_whiten_kernel: each re-reduces the whole batch's statistics."""
    return max(1, min(rows, _num_sms(x.device.index or 0) if x.is_cuda else _CPU_PROGRAMS))


_WHITENED = ("reinforce_plus_plus_baseline", "gdpo")


def group_advantages_forward(rewards: Tensor, group_index: Optional[Tensor], group_size: int,
                             method: str, eps: float, unbiased: bool,
                             mask: Optional[Tensor] = None,
                             reward_weights: Optional[Tensor] = None, norm_by_std: bool = True,
                             whiten_eps: float = 1e-8) -> Tensor:
    """Advantages ``[B]`` (fp32, fp64 for fp64 rewards); one kernel launch (plus an integer
    sort and search of the ids when ``group_index`` is given; plus the batch whitening for
    ``reinforce_plus_plus_baseline`` and ``gdpo``)."""
    cdt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    x = rewards if rewards.dim() == 2 else rewards.reshape(-1, 1)
    b, k = x.shape
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
    whitened = method in _WHITENED
    ws = torch.zeros(3 * b if whitened else 1, dtype=cdt, device=x.device)
    m = mask if mask is not None else x
    steps = mask.shape[1] if mask is not None else 0
    w = reward_weights if reward_weights is not None else torch.ones(k, dtype=cdt,
                                                                     device=x.device)
    if method != "gdpo":
        k = 1
    with device_guard(x):
        _group_advantages_kernel[(_programs(slots, method, x),)](
            x, x.stride(0), x.stride(1), perm, starts, out, ws, m,
            m.stride(0), m.stride(1), steps, w, k, b, group_size, slots, float(eps),
            CDT=_TL_DTYPES[cdt], INDEXED=indexed, METHOD=_METHODS[method],
            UNBIASED=bool(unbiased), NORM=bool(norm_by_std), IEEE_DIV=cdt == torch.float32,
            BLOCK=_BLOCK, BLOCK_T=_LEN_BLOCK_T,
            BATCH_BLOCK=min(_BATCH_BLOCK, triton.next_power_of_2(b)), num_warps=4)
        if whitened:
            _batch_whiten_kernel[(_whiten_grid(b, x),)](
                ws, out, ws, 0, 0, b, 0, float(whiten_eps), TOKENS=False,
                UNBIASED=bool(unbiased), CDT=_TL_DTYPES[cdt], IEEE_DIV=cdt == torch.float32,
                BLOCK=min(_BATCH_BLOCK, triton.next_power_of_2(b)), BLOCK_T=16, num_warps=4)
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
def _returns_kernel(r_ptr, r_s0, r_s1, m_ptr, m_s0, m_s1, out_ptr, adv_ptr, base_ptr, base_s,
                    ws_ptr, B, T, gamma_f: tl.float64, CDT: tl.constexpr, ADV: tl.constexpr,
                    HAS_BASE: tl.constexpr, WHITEN: tl.constexpr, IEEE_DIV: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    # ADV: also write a = G - baseline (0 at masked steps); WHITEN: and the row's statistics
    # of a over its valid steps, ws [3, B] = (count, mean, M2), chunk by chunk merged with
    # Chan et al.'s update (each chunk's own statistics are two-pass), for
    # _batch_whiten_kernel.
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_T)
    gamma = tl.full([], gamma_f, CDT)
    ret = tl.zeros([], CDT)
    if HAS_BASE:
        base = tl.load(base_ptr + row * base_s).to(CDT)
    if WHITEN:
        cnt = tl.zeros([], CDT)
        mean = tl.zeros([], CDT)
        m2 = tl.zeros([], CDT)
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
        if ADV:
            if HAS_BASE:
                adv = tl.where(ok, g_t - base, zero)
            else:
                adv = tl.where(ok, g_t, zero)
            tl.store(adv_ptr + row * T + t, adv, mask=inb)
            if WHITEN:
                n_c = tl.sum(ok.to(CDT), 0)
                mean_c = tl.fdiv(tl.sum(adv, 0), tl.maximum(n_c, 1.0), ieee_rounding=IEEE_DIV)
                d_c = tl.where(ok, adv - mean_c, zero)
                m2_c = tl.sum(d_c * d_c, 0)
                n_new = cnt + n_c
                delta = mean_c - mean
                frac = tl.fdiv(n_c, tl.maximum(n_new, 1.0), ieee_rounding=IEEE_DIV)
                mean = mean + delta * frac
                m2 = m2 + m2_c + delta * delta * cnt * frac
                cnt = n_new
        ret = tl.sum(tl.where(lanes == BLOCK_T - 1, g_t, zero), 0)
    if WHITEN:
        tl.store(ws_ptr + row, cnt)
        tl.store(ws_ptr + B + row, mean)
        tl.store(ws_ptr + 2 * B + row, m2)


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
        _returns_kernel[(b,)](rewards, *rewards.stride(), mask, *mask.stride(), out, out, out,
                              0, out, b, steps, float(gamma), CDT=_TL_DTYPES[cdt], ADV=False,
                              HAS_BASE=False, WHITEN=False, IEEE_DIV=False,
                              BLOCK_T=_scan_block(steps), num_warps=4)
    return out


def discounted_advantages_forward(rewards: Tensor, mask: Tensor, baseline: Optional[Tensor],
                                  gamma: float, whiten: bool, whiten_eps: float,
                                  unbiased: bool):
    """``(advantages, returns)`` ``[B, T]``, as
    :func:`rlkernels.reference.advantage.discounted_advantages`: one launch (the scan writes
    both), two with ``whiten`` (then _batch_whiten_kernel rescales the advantages)."""
    cdt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    b, steps = rewards.shape
    out = torch.empty((b, steps), dtype=cdt, device=rewards.device)
    adv = torch.empty_like(out)
    if b == 0 or steps == 0:
        return adv, out
    ws = torch.empty(3 * b if whiten else 1, dtype=cdt, device=rewards.device)
    base = baseline if baseline is not None else out
    with device_guard(rewards):
        _returns_kernel[(b,)](rewards, *rewards.stride(), mask, *mask.stride(), out, adv, base,
                              base.stride(0), ws, b, steps, float(gamma), CDT=_TL_DTYPES[cdt],
                              ADV=True, HAS_BASE=baseline is not None, WHITEN=bool(whiten),
                              IEEE_DIV=cdt == torch.float32, BLOCK_T=_scan_block(steps),
                              num_warps=4)
        if whiten:
            _batch_whiten_kernel[(_whiten_grid(b, rewards),)](
                ws, adv, mask, mask.stride(0), mask.stride(1), b, steps, float(whiten_eps),
                TOKENS=True, UNBIASED=bool(unbiased), CDT=_TL_DTYPES[cdt],
                IEEE_DIV=cdt == torch.float32, BLOCK=min(_BATCH_BLOCK, triton.next_power_of_2(b)),
                BLOCK_T=_scan_block(steps), num_warps=4)
    return adv, out


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
