"""Helpers shared by the public op modules: flattening, backend dispatch, fake tensors."""

from __future__ import annotations

import torch

from .. import _checks, backends

Tensor = torch.Tensor


def rows(x: Tensor) -> Tensor:
    """``[..., V] -> [N, V]``: a view when the leading dims merge, else one copy."""
    return x.reshape(-1, x.shape[-1])


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-token outputs are fp32, or fp64 for fp64 inputs (SPEC section 1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def call(backend: str, family: str, fn: str, *args):
    """Run kernel ``fn`` of ``family`` on the resolved ``backend``."""
    return backends.kernel(backend, family, fn)(*args)


def check_tokens_for(name: str, tokens, logits_name: str, logits: Tensor) -> Tensor:
    """``tokens`` has the leading shape of ``logits`` and an integer dtype."""
    _checks.indices(name, tokens)
    _checks.shape(name, tokens, logits.shape[:-1], f"the leading dims of {logits_name}")
    _checks.same_device(logits_name, logits, **{name: tokens})
    return tokens

