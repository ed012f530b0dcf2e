"""``linear_grpo_loss(..., grad_in_forward=True)``'s backward on the cuda backend: the
gradients formed in the forward (``d hidden``, ``d weight``, ``d bias``: the composition of
rlkernels/_fused.py ``fused_linear_gif`` with this backend's linear kernels, four GEMMs)
times the upstream scalar."""

from __future__ import annotations

import torch

from .grpo import grpo_loss_gif_scale_

Tensor = torch.Tensor


def linear_grpo_loss_gif_scale_(grad: Tensor, g: Tensor) -> None:
    """``grad *= g`` in place (``d hidden [N, H]``, ``d W [V, H]``, ``d b [V]``), nothing when
    ``g == 1``: the grpo_loss gif scale kernel, which takes any ``[rows, cols]`` buffer (a
    1-d one as one row)."""
    grpo_loss_gif_scale_(grad, g)
