"""Helpers shared by the public op modules: flattening rows, output dtypes, token checks."""

from __future__ import annotations

import torch

from .. import _checks, backends
from ..reference import rows  # noqa: F401  (re-exported: the ops import it from here)

Tensor = torch.Tensor


def rows_for(x: Tensor, backend: str, family: str) -> Tensor:
    """``rows(x)``, as a two-stride ``[A, B, V]`` view instead of a copy when the backend's
    kernels of ``family`` read such rows (its module says ``STRIDED_ROWS = True``)."""
    return rows(x, strided=_strided_rows(backend, family))


def _strided_rows(backend: str, family: str) -> bool:
    if torch.compiler.is_compiling():  # a trace-time constant, no global state in a trace
        return _strided_rows_uncached(backend, family)
    strided = _STRIDED.get((backend, family))
    if strided is None:
        strided = _strided_rows_uncached(backend, family)
    return strided


@torch.compiler.assume_constant_result
def _strided_rows_uncached(backend: str, family: str) -> bool:
    # a constant under torch.compile: Dynamo cannot trace the module import
    strided = _STRIDED[(backend, family)] = bool(
        getattr(backends._module(backend, family), "STRIDED_ROWS", False))
    return strided


# the backend modules' STRIDED_ROWS by (backend, family): a module attribute that does not
# change while the process runs (one dict lookup per call instead of the module lookup)
_STRIDED: dict = {}


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-token outputs are fp32, or fp64 for fp64 inputs (SPEC section 1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_FLOATS = frozenset(_checks.FLOAT_DTYPES)
_INDEX = frozenset(_checks.INDEX_DTYPES)


def valid_logits_tokens(logits, tokens) -> bool:
    """The common case of ``_checks.logits`` + :func:`check_tokens_for` in one pass (plain
    tensors, float logits ``[..., V >= 1]``, integer tokens of the leading shape, one
    device). False sends the call through those checks, which raise the first error (and
    accept tensor subclasses)."""
    if type(logits) is not Tensor or type(tokens) is not Tensor:
        return False
    shape = logits.shape
    return (logits.dtype in _FLOATS and len(shape) >= 1 and shape[-1] != 0
            and tokens.dtype in _INDEX and tokens.shape == shape[:-1]
            and tokens.device == logits.device)


def check_tokens_for(name: str, tokens, logits_name: str, logits: Tensor) -> Tensor:
    """``tokens`` has the leading shape of ``logits`` and an integer dtype."""
    _checks.indices(name, tokens)
    _checks.shape(name, tokens, logits.shape[:-1], f"the leading dims of {logits_name}")
    _checks.same_device(logits_name, logits, **{name: tokens})
    return tokens


def check_indices_for(x_name: str, x: Tensor, indices, vocab: int) -> Tensor:
    """``indices [..., K]``: the leading dims of ``x`` (logits ``[..., V]`` or hidden states
    ``[..., H]``) plus K ids in ``[0, vocab)`` or -1 (an unused slot), on ``x``'s device."""
    _checks.indices("indices", indices)
    if indices.dim() != x.dim():
        raise ValueError(f"indices: expected shape (*{tuple(x.shape[:-1])}, K) (the leading "
                         f"dims of {x_name} plus K ids), got {tuple(indices.shape)}")
    _checks.shape("indices", indices, (*x.shape[:-1], indices.shape[-1]),
                  f"the leading dims of {x_name} plus K ids")
    _checks.same_device(x_name, x, indices=indices)
    if indices.numel() and _checks.data_checks(indices):
        bad = (indices < -1) | (indices >= vocab)
        if bool(bad.any()):
            raise ValueError(f"indices: expected ids in [0, {vocab}) or -1 for an unused slot, "
                             f"got {indices[bad].flatten()[0].item()}")
    return indices

