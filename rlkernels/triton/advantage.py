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
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

_METHODS = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "batch_std": 3}
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
                             CDT: tl.constexpr, INDEXED: tl.constexpr, METHOD: tl.constexpr,
                             UNBIASED: tl.constexpr, EPS: tl.constexpr,
                             IEEE_DIV: tl.constexpr, BLOCK: tl.constexpr,
                             BATCH_BLOCK: tl.constexpr):
    # Hot loops are written inline: the interpreter (CPU tests) pays ~1 ms per call of a
    # @triton.jit helper. Divisions are IEEE: tl.fdiv(ieee_rounding=IEEE_DIV) for fp32
    # (Triton's fp32 "/" is the approximate div.full.f32), "/" for fp64 (div.rn.f64).
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    eps = tl.full([], EPS, CDT)
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
    guard = torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
    with guard:
        _group_advantages_kernel[(_programs(slots, method, x),)](
            x, x.stride(0), perm, starts, out, b, group_size, slots, CDT=_TL_DTYPES[cdt],
            INDEXED=indexed, METHOD=_METHODS[method], UNBIASED=bool(unbiased),
            EPS=float(eps), IEEE_DIV=cdt == torch.float32, BLOCK=_BLOCK,
            BATCH_BLOCK=min(_BATCH_BLOCK, triton.next_power_of_2(b)), num_warps=4)
    return out
