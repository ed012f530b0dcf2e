"""Loading rlkernels._C (the compiled `cuda` backend) and saying why it is unavailable.

Importing this module never raises: a missing, broken or stale extension, or a machine without
a usable GPU, is reported by `cuda_status()` as a human-readable reason.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType

NOT_BUILT = (
    "rlkernels._C was not built (no nvcc found at install time, or RLKERNELS_BUILD_CUDA=0); "
    "reinstall with nvcc on PATH"
)
NO_GPU = "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"


def _fmt_cuda(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    """(module, "ok") or (None, reason)."""
    try:
        spec = importlib.util.find_spec("rlkernels._C")
    except Exception as exc:  # broken parent package, odd import hooks
        return None, f"rlkernels._C failed to import: {type(exc).__name__}: {exc}"
    if spec is None:
        return None, NOT_BUILT
    try:
        module = importlib.import_module("rlkernels._C")
    except Exception as exc:  # ImportError (missing symbol, wrong Python ABI), OSError, ...
        return None, f"rlkernels._C failed to import: {type(exc).__name__}: {exc}"
    try:
        from rlkernels._version import __version__

        built = module.version()
    except Exception as exc:
        return None, f"rlkernels._C failed to import: {type(exc).__name__}: {exc}"
    if built != __version__:
        return None, (
            f"rlkernels._C is stale: built from rlkernels {built}, the package is {__version__}; "
            "reinstall (pip install -e . rebuilds it)"
        )
    return module, "ok"


def load_extension() -> ModuleType | None:
    """The imported `rlkernels._C` module, or None when it is missing, broken or stale.

    None says nothing about GPUs; `cuda_status()` says why the backend cannot run.
    """
    return _load()[0]


@functools.cache
def cuda_status() -> str:
    """"ok" when the `cuda` backend can run here, else the reason it cannot (cached).

    "ok" needs: rlkernels._C imports (and matches the package version), torch sees a CUDA GPU,
    torch is a CUDA (not ROCm) build, and the extension's own CUDA runtime sees a device
    (it does not when the driver is older than the runtime _C was built with).
    """
    module, reason = _load()
    if module is None:
        return reason
    try:
        import torch

        available = torch.cuda.is_available()
    except Exception as exc:
        return f"torch.cuda.is_available() failed: {type(exc).__name__}: {exc}"
    if not available:
        return NO_GPU
    if getattr(torch.version, "hip", None):
        return "rlkernels._C is CUDA-only; this torch is a ROCm build"
    try:
        count = module.device_count()
        runtime = module.cuda_runtime_version()
        driver = module.cuda_driver_version()
    except Exception as exc:
        return f"rlkernels._C failed to query devices: {type(exc).__name__}: {exc}"
    if count == 0:
        driver_text = f"supports CUDA {_fmt_cuda(driver)}" if driver else "was not found"
        return (
            f"rlkernels._C (CUDA runtime {_fmt_cuda(runtime)}) sees no GPU although torch does: "
            f"the driver {driver_text}; update the driver or rebuild _C with an older CUDA "
            "toolkit"
        )
    return "ok"


def extension_info() -> dict:
    """Build facts of rlkernels._C for `rlkernels info` (empty dict when it is not loaded)."""
    module = load_extension()
    if module is None:
        return {}
    try:
        return {
            "version": module.version(),
            "cuda_runtime": _fmt_cuda(module.cuda_runtime_version()),
            "cuda_driver": _fmt_cuda(module.cuda_driver_version()),
            "cuda_archs": module.cuda_archs(),
            "nvcc": module.nvcc_version(),
            "device_count": module.device_count(),
            "path": getattr(module, "__file__", None),
        }
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
