"""Launchers for csrc/policy.cu (ops on per-token log-probs). Private API.

A launcher checks its tensors, allocates the output, and hands raw pointers, the element count,
dtype/option codes and the current CUDA stream to rlkernels._C. No autograd here: the custom ops
in rlkernels/ops/ wrap these.
"""

from __future__ import annotations

import torch

from rlkernels.cuda._loader import cuda_status, load_extension

# Estimator name -> code of _C.kl_penalty_forward (csrc/rlkernels.h). "low_var_kl" is verl's
# name for k3; "k3+" has the value of k3 (it differs from k3 only in its gradient).
KL_ESTIMATORS = {"k1": 0, "abs": 1, "k2": 2, "k3": 3, "low_var_kl": 3, "k3+": 3}

# torch dtype -> dtype code of csrc/common.cuh (rlk::DType).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _extension():
    module = load_extension()
    if module is None:
        raise RuntimeError(f"the cuda backend is unavailable: {cuda_status()}")
    return module


def _check_cuda_tensor(name: str, t: object, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(
            f"{name}: expected a CUDA tensor for the cuda backend, got device {t.device}"
        )
    if t.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {t.dtype}")
    return t


def kl_penalty_forward(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "k3",
    clamp: tuple[float | None, float | None] | None = None,
) -> torch.Tensor:
    """Elementwise KL penalty on log-probs of sampled tokens, on the GPU.

    With d = logp - ref_logp: "k1": d, "abs": |d|, "k2": d^2 / 2, "k3" (= "low_var_kl", and
    the value of "k3+"): exp(-d) + d - 1, computed as expm1(-d) + d. clamp=(lo, hi) clamps
    the result like torch.clamp (NaN kept; either bound may be None).

    logp, ref_logp: CUDA tensors of the same shape, dtype (float32 or float64) and device; any
    strides (made contiguous). Returns a new contiguous tensor of that shape and dtype, computed
    asynchronously on the current stream of the tensors' device.
    """
    C = _extension()
    _check_cuda_tensor("logp", logp, (torch.float32, torch.float64))
    _check_cuda_tensor("ref_logp", ref_logp, (torch.float32, torch.float64))
    if ref_logp.dtype != logp.dtype:
        raise TypeError(
            f"ref_logp: expected dtype {logp.dtype} (that of logp), got {ref_logp.dtype}"
        )
    if ref_logp.device != logp.device:
        raise ValueError(
            f"ref_logp: expected device {logp.device} (that of logp), got {ref_logp.device}"
        )
    if ref_logp.shape != logp.shape:
        raise ValueError(
            f"ref_logp: expected shape {tuple(logp.shape)} (that of logp), "
            f"got {tuple(ref_logp.shape)}"
        )
    if not isinstance(estimator, str) or estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator: expected one of {sorted(KL_ESTIMATORS)}, got {estimator!r}")
    if clamp is None:
        do_clamp, lo, hi = False, 0.0, 0.0
    else:
        try:
            lo_in, hi_in = clamp
        except (TypeError, ValueError):
            raise ValueError(f"clamp: expected None or a pair (lo, hi), got {clamp!r}") from None
        lo = float("-inf") if lo_in is None else float(lo_in)
        hi = float("inf") if hi_in is None else float(hi_in)
        do_clamp = True

    logp = logp.contiguous()
    ref_logp = ref_logp.contiguous()
    out = torch.empty_like(logp, memory_format=torch.contiguous_format)
    n = logp.numel()
    if n == 0:
        return out
    with torch.cuda.device(logp.device):
        stream = torch.cuda.current_stream(logp.device).cuda_stream
        C.kl_penalty_forward(
            logp.data_ptr(), ref_logp.data_ptr(), out.data_ptr(), n,
            _DTYPE_CODES[logp.dtype], KL_ESTIMATORS[estimator], do_clamp, lo, hi, stream,
        )
    return out
