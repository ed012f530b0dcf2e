"""Reference kernel of ``linear_grpo_loss(..., grad_in_forward=True)``'s backward: the
gradients formed in the forward (``d hidden``, ``d weight``, ``d bias``: the composition of
rlkernels/_fused.py ``fused_linear_gif`` on this backend) times the upstream scalar."""

from __future__ import annotations

import torch

from .grpo import grpo_loss_gif_scale_

Tensor = torch.Tensor


def linear_grpo_loss_gif_scale_(grad: Tensor, g: Tensor) -> None:
    """``grad *= g`` in place, in the compute dtype, one rounding; ``g == 1`` leaves it
    bit-identical (:func:`rlkernels.reference.grpo.grpo_loss_gif_scale_`, which takes any
    ``[rows, cols]`` buffer and a 1-d one as one row)."""
    grpo_loss_gif_scale_(grad, g)
