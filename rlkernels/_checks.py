"""Input validation shared by every public op.

Each check raises before any work starts, with a message that names the argument, what was
expected and what was received (SPEC section 1, "Errors"). Checks that need the data itself
(token ranges, NaN rewards) run in debug mode (:func:`rlkernels.set_debug`), because on a GPU
they would force a host synchronisation; the id-range checks also run, always, on plain CPU
tensors, where reading the data costs no synchronisation (:func:`data_checks`).
"""

from __future__ import annotations

import math
import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

_debug = os.environ.get("RLKERNELS_DEBUG", "0") not in ("", "0", "false", "False")
# the always-on range checks of plain CPU tensors (benchmarks/host_overhead.py turns them off
# to time the host path a GPU call takes, which never reads the data outside debug mode)
_cpu_checks = True


def set_debug(enabled: bool = True) -> None:
    """Turn data-dependent checks on or off (token ranges, NaN rewards, duplicate ids).

    On a GPU they cost a host synchronisation each, so they are off by default;
    ``RLKERNELS_DEBUG=1`` turns them on for the whole process. Token and index ranges of CPU
    tensors are checked whatever this setting (:func:`data_checks`).
    """
    global _debug
    _debug = bool(enabled)


def debug_enabled() -> bool:
    return _debug


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(name: str, x, *, dtypes: Sequence[torch.dtype] | None = None, ndim: int | None = None,
           min_ndim: int | None = None) -> torch.Tensor:
    """``x`` is a tensor with one of ``dtypes`` and the given rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {_dtype_name(x.dtype)}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(
            f"{name}: expected at least {min_ndim} dimension(s), got shape {tuple(x.shape)}")
    return x


def logits(name: str, x) -> torch.Tensor:
    """Logits ``[..., V]`` in bf16/fp16/fp32/fp64 with ``V >= 1``."""
    tensor(name, x, dtypes=FLOAT_DTYPES, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"{name}: expected a vocabulary size V >= 1 in the last dimension, "
                         f"got shape {tuple(x.shape)}")
    return x


def indices(name: str, x) -> torch.Tensor:
    return tensor(name, x, dtypes=INDEX_DTYPES)


def shape(name: str, x: torch.Tensor, expected: Sequence[int], what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} ({what}), "
                         f"got {tuple(x.shape)}")


def same_device(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of "
                             f"{ref_name}), got one on {x.device}")


def same_dtype(ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, x in others.items():
        if x is not None and x.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {_dtype_name(ref.dtype)} (the dtype of "
                            f"{ref_name}), got {_dtype_name(x.dtype)}")


def positive(name: str, value, *, allow_zero: bool = False) -> float:
    if type(value) is float and 0.0 < value < math.inf:  # the common case, at once
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value}")
    return value


def number(name: str, value, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name}: expected a number {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name}: expected a number <= {hi}, got {value}")
    return value


def integer(name: str, value, *, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if lo is not None and value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value}")
    return value


def choice(name: str, value, options: Iterable[str]) -> str:
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: expected one of {', '.join(repr(o) for o in options)}, "
                         f"got {value!r}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def data_checks(x: torch.Tensor) -> bool:
    """Whether a check that reads the values of ``x`` runs: in debug mode, and always for a
    plain CPU tensor (no device to synchronise with). Skipped for CPU tensors that cannot be
    read eagerly: while ``torch.compile`` / ``torch.export`` traces, under ``torch.func``
    transforms, and for tensor subclasses (fake tensors)."""
    if _debug:
        return True
    return (_cpu_checks and x.device.type == "cpu" and type(x) is torch.Tensor
            and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def token_range(name: str, tokens: torch.Tensor, vocab: int, ignore_index: int | None) -> None:
    """Every token is in ``[0, vocab)`` or equals ``ignore_index``; checked when
    :func:`data_checks` says so (debug mode, or CPU tensors)."""
    if tokens.numel() == 0 or not data_checks(tokens):
        return
    bad = (tokens < 0) | (tokens >= vocab)
    if ignore_index is not None:
        bad &= tokens != ignore_index
    if bool(bad.any()):
        first = tokens[bad].flatten()[0].item()
        allowed = f"[0, {vocab})" + (f" or {ignore_index}" if ignore_index is not None else "")
        raise ValueError(f"{name}: expected ids in {allowed}, got {first} "
                         f"({int(bad.sum())} id(s) out of range)")
