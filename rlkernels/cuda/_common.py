"""Shared helpers of the launchers in rlkernels/cuda/ (private).

Every launcher: asserts what its kernel needs to stay in bounds (``expect``: CUDA device,
dtype, shape; the user-facing validation is the public functions'); allocates outputs on the
tensors' device; launches on that device (``torch.cuda.device`` guard) and on its current
stream. Sizes and option codes are checked again in C++ (RLK_CHECK_ARG) before any launch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from rlkernels import _codes
from rlkernels.cuda._loader import cuda_status, load_extension

Tensor = torch.Tensor

# torch dtype -> dtype code of the kernels (rlkernels/_codes.py, csrc/rlkernels.h rlk::DType).
DTYPE_CODES = {getattr(torch, name): code for name, code in _codes.DTYPES.items()}
FLOAT_DTYPES = tuple(DTYPE_CODES)
INDEX_DTYPES = (torch.int32, torch.int64)


def extension():
    """rlkernels._C, or RuntimeError saying why the cuda backend is unavailable."""
    module = load_extension()
    if module is None:
        raise RuntimeError(f"the cuda backend is unavailable: {cuda_status()}")
    return module


def expect(name: str, t: object, dtypes: Tuple[torch.dtype, ...],
           shape: Optional[Tuple[int, ...]] = None, like: Optional[Tensor] = None,
           ndim: Optional[int] = None) -> Tensor:
    """The facts a kernel needs to read and write ``t`` safely: a CUDA tensor of one of
    ``dtypes`` (of ``shape``, or with ``ndim`` dims; on ``like``'s device). An internal
    precondition, cheap and briefly worded: the public functions (rlkernels/ops) validate user
    input with full messages; the launchers can also be called directly, so they keep these."""
    if (isinstance(t, torch.Tensor) and t.device.type == "cuda" and t.dtype in dtypes
            and (shape is None or tuple(t.shape) == tuple(shape))
            and (ndim is None or t.dim() == ndim)
            and (like is None or t.device == like.device)):
        return t
    got = (f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor)
           else type(t).__name__)
    want = [", ".join(str(d).replace("torch.", "") for d in dtypes)]
    if shape is not None:
        want.append(f"shape {tuple(shape)}")
    if ndim is not None:
        want.append(f"{ndim}-d")
    if like is not None:
        want.append(f"on {like.device}")
    raise ValueError(f"{name}: expected a CUDA tensor ({'; '.join(want)}), got {got}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs compute (and return per-row outputs) in fp64, everything else in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_stride(x: Tensor) -> Tensor:
    """``x [N, V]`` with stride 1 along ``V``: returned as is (any row stride, any storage
    offset: the kernels take pointer + row stride and check alignment per row); a copy only
    for a column-strided ``x`` (an N x V temporary)."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def row_stride(x: Tensor) -> int:
    return x.stride(0) if x.dim() == 2 and x.shape[0] > 1 else x.shape[-1]


def rows(C, t: Optional[Tensor]):
    """``_C.Rows`` of ``t``: a vector ``[n]`` (its stride) or rows of unit column stride
    ``[n, V]`` (:func:`row_stride`); ptr 0 for an absent tensor."""
    if t is None:
        return C.Rows()
    # (ptr, stride): positional, a third of the cost of keywords on a hot path
    return C.Rows(t.data_ptr(), t.stride(0) if t.dim() == 1 else row_stride(t))


def matrix(C, t: Optional[Tensor], stride1: Optional[int] = None):
    """``_C.Matrix`` of a 2-d ``t`` (or of a 1-d ``t`` read as ``[n, cols]`` with column
    stride ``stride1``, e.g. 0 to broadcast); ptr 0 for an absent tensor."""
    if t is None:
        return C.Matrix()
    # (ptr, stride0, stride1), positional as in rows()
    return C.Matrix(t.data_ptr(), t.stride(0), t.stride(1) if stride1 is None else stride1)


def ptr(t: Optional[Tensor]) -> int:
    """Device address, 0 for an absent tensor."""
    return 0 if t is None else t.data_ptr()


def stream_of(t: Tensor) -> int:
    """The current CUDA stream of ``t``'s device, as an integer (cudaStream_t)."""
    return torch.cuda.current_stream(t.device).cuda_stream
