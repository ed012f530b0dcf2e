"""Launcher for csrc/rollout.cu: ``rollout_correction`` (importance weights, keep mask and
mismatch metrics). Private API; the signature and outputs of
:func:`rlkernels.reference.rollout.rollout_correction_forward`.

The ``[B, T]`` inputs are brought to the compute dtype first (a copy only when the dtype
differs; the mask becomes its values as weights, bool -> 0/1). Two launches: one block per
sequence (row statistics, then weights / keep and the row's metric partials), then one
block that adds the rows' partials in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from rlkernels import _codes
from rlkernels.cuda._common import DTYPE_CODES, FLOAT_DTYPES, expect, extension, matrix, stream_of

Tensor = torch.Tensor

_LEVELS = _codes.ROLLOUT_LEVELS
_MODES = _codes.ROLLOUT_MODES
_REJECTS = _codes.ROLLOUT_REJECTS
N_METRICS = 15     # rlkernels.reference.rollout.METRICS
_N_PARTIALS = 17   # csrc/rollout.cu kRpCount
_N_NUMS = 3 + 2 * len(_REJECTS)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                *FLOAT_DTYPES)


def _reject_mask(reject: str) -> int:
    bits = 0
    for name in reject.split(","):
        if name:
            bits |= 1 << _REJECTS[name]
    return bits


def rollout_correction_forward(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor,
                               advantages: Optional[Tensor], level: str, mode: str,
                               reject: str, nums) -> Tuple[Tensor, Tensor, Tensor]:
    """``(weights [B, T], keep [B, T] bool, metrics [15] fp32)``."""
    C = extension()
    expect("old_logp", old_logp, FLOAT_DTYPES, ndim=2)
    b, t = old_logp.shape
    expect("rollout_logp", rollout_logp, FLOAT_DTYPES, shape=(b, t), like=old_logp)
    expect("mask", mask, _MASK_DTYPES, shape=(b, t), like=old_logp)
    nums = [float(x) for x in nums]
    if len(nums) != _N_NUMS:
        raise ValueError(f"nums: expected {_N_NUMS} values, got {len(nums)}")
    bits = _reject_mask(reject)
    cdt = torch.float64 if torch.float64 in (old_logp.dtype, rollout_logp.dtype) \
        else torch.float32
    old, roll, m = old_logp.to(cdt), rollout_logp.to(cdt), mask.to(cdt)
    adv = None
    if bits >> _REJECTS["opsm"] & 1:
        expect("advantages", advantages, FLOAT_DTYPES, like=old_logp)
        expect("advantages", advantages, FLOAT_DTYPES,
               shape=(b,) if advantages.dim() == 1 else (b, t))
        adv = advantages.to(cdt)
    weights = torch.empty((b, t), dtype=cdt, device=old.device)
    keep = torch.empty((b, t), dtype=torch.bool, device=old.device)
    metrics = torch.empty(N_METRICS, dtype=torch.float32, device=old.device)
    partials = torch.empty(max(b, 1), _N_PARTIALS, dtype=cdt, device=old.device)
    with torch.cuda.device(old.device):
        C.rollout_correction_forward(
            old_logp=matrix(C, old), rollout_logp=matrix(C, roll), mask=matrix(C, m),
            advantages=matrix(C, adv, stride1=0 if adv is not None and adv.dim() == 1
                              else None),
            weights=weights.data_ptr(), keep=keep.data_ptr(), partials=partials.data_ptr(),
            metrics=metrics.data_ptr(), b=b, t=t, dtype=DTYPE_CODES[cdt],
            level=_LEVELS[level], mode=_MODES[mode], reject=bits, lo=nums[0], hi=nums[1],
            log_ratio_clamp=nums[2], reject_bounds=nums[3:], stream=stream_of(old))
    return weights, keep, metrics


__all__ = ["rollout_correction_forward"]
