"""Launcher for csrc/advantage.cu: ``group_advantages`` (same signature and output as
:mod:`rlkernels.reference.advantage`). One warp per group, members in their original order:
deterministic, and bit-identical for contiguous groups and ``group_index``.

Status: compiled, NOT yet run on a GPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import (DTYPE_CODES, FLOAT_DTYPES, INDEX_DTYPES, check_cuda_tensor, check_shape,
                      compute_dtype, extension, stream_of)

Tensor = torch.Tensor

_METHODS = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "batch_std": 3}


def group_advantages_forward(rewards: Tensor, group_index: Optional[Tensor], group_size: int,
                             method: str, eps: float, unbiased: bool) -> Tensor:
    """Advantages ``[B]`` (fp32, fp64 for fp64 rewards). ``group_index=None``: contiguous
    groups of ``group_size``; else a stable sort of the ids (torch, on the device, no host
    sync) gives each group's members in their original order."""
    C = extension()
    check_cuda_tensor("rewards", rewards, FLOAT_DTYPES, ndim=1)
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {sorted(_METHODS)}, got {method!r}")
    if not (float(eps) >= 0 and math.isfinite(float(eps))):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
    x = rewards
    b = x.shape[0]
    cdt = compute_dtype(x.dtype)
    out = torch.empty(b, dtype=cdt, device=x.device)
    if group_index is None:
        if not isinstance(group_size, int) or group_size < 1 or b % group_size:
            raise ValueError(f"group_size: expected an int >= 1 dividing B={b}, got "
                             f"{group_size!r}")
    else:
        check_cuda_tensor("group_index", group_index, INDEX_DTYPES, ndim=1, like=x)
        check_shape("group_index", group_index, (b,))
    if b == 0:
        return out
    perm = starts = None
    if group_index is None:
        slots = b // group_size
    else:
        sorted_ids, perm = torch.sort(group_index, stable=True)
        new_run = torch.ones(b, dtype=torch.int64, device=x.device)
        new_run[1:] = (sorted_ids[1:] != sorted_ids[:-1]).to(torch.int64)
        run = torch.cumsum(new_run, 0) - 1  # run number of each sorted position
        # starts[g] = first sorted position of run g; b for every g past the last run
        starts = torch.searchsorted(run, torch.arange(b + 1, device=x.device))
        perm = perm.to(torch.int64).contiguous()
        starts = starts.to(torch.int64).contiguous()
        slots = b
    workspace = torch.empty(1, dtype=cdt, device=x.device)
    with torch.cuda.device(x.device):
        C.group_advantages_forward(
            x.data_ptr(), x.stride(0), 0 if perm is None else perm.data_ptr(),
            0 if starts is None else starts.data_ptr(), out.data_ptr(), workspace.data_ptr(),
            b, group_size if group_index is None else 0, slots, DTYPE_CODES[x.dtype],
            _METHODS[method], bool(unbiased), float(eps), stream_of(x))
    return out


__all__ = ["group_advantages_forward"]
