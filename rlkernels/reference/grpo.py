"""Reference kernel of ``grpo_loss(..., grad_in_forward=True)``'s backward: the gradient
formed in the forward (rlkernels/_fused.py ``fused_forward_gif``) times the upstream scalar.

The forward of that form is the composition of the existing kernels (it lives in
rlkernels/_fused.py, shared by every backend); the only new kernel is this scaling."""

from __future__ import annotations

import torch

from . import compute_dtype, row_chunks

Tensor = torch.Tensor


def grpo_loss_gif_scale_(grad: Tensor, g: Tensor) -> None:
    """``grad *= g`` in place, row chunk by row chunk, the product taken in the compute dtype
    (fp32, fp64 for fp64) and rounded once to the gradient's dtype, as the default backward
    rounds ``g * (d loss / d logits for 1)``. ``g == 1`` leaves ``grad`` bit-identical."""
    if grad.numel() == 0:
        return
    cdt = compute_dtype(grad.dtype)
    scale = g.reshape(()).to(device=grad.device, dtype=cdt)
    flat = grad.view(-1, grad.shape[-1]) if grad.dim() != 2 else grad
    for rows in row_chunks(flat.shape[0], flat.shape[1]):
        block = flat[rows]
        block.copy_(block.to(cdt) * scale)
