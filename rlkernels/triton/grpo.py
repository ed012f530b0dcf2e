"""Triton kernel of ``grpo_loss(..., grad_in_forward=True)``'s backward: the gradient formed
in the forward (rlkernels/_fused.py ``fused_forward_gif``, the composition of this backend's
vocabulary and policy kernels) times the upstream scalar.

Triton has no thread-block clusters nor distributed shared memory, so the one-read forward
of the cuda backend (csrc/grpo.cu) is not expressed here: holding a 151936-column row on chip
takes more shared memory than one SM has."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import compute_dtype, device_guard, tl_compute_dtype

Tensor = torch.Tensor

_BLOCK = 2048


@triton.jit
def _gif_scale_kernel(grad, g, n_blocks, vocab, stride_row, CDT: tl.constexpr,
                      BLOCK: tl.constexpr):
    """``grad[row, block] *= g`` in the compute dtype, one rounding; every lane is masked
    off where ``g == 1`` (read on device: no host sync), so that case moves no data."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_blocks
    offs = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(g).to(CDT)
    keep = offs < tl.where(scale != 1.0, vocab, 0)
    ptr = grad + row * stride_row + offs
    x = tl.load(ptr, mask=keep, other=0.0).to(CDT)
    tl.store(ptr, (x * scale).to(grad.dtype.element_ty), mask=keep)


def grpo_loss_gif_scale_(grad: Tensor, g: Tensor) -> None:
    """``grad *= g`` in place (``grad [N, V]`` with unit column stride; anything else goes
    through a temporary), the product in fp32 (fp64 for fp64) rounded once; nothing moves
    when ``g == 1``."""
    if grad.numel() == 0:
        return
    cdt = compute_dtype(grad.dtype)
    x = grad if grad.dim() == 2 else grad.view(-1, grad.shape[-1])
    dst = x if x.stride(-1) == 1 else x.contiguous()
    scale = g.reshape(1).to(device=grad.device, dtype=cdt)
    n, vocab = dst.shape
    n_blocks = triton.cdiv(vocab, _BLOCK)
    with device_guard(dst):
        _gif_scale_kernel[(n * n_blocks,)](dst, scale, n_blocks, vocab, dst.stride(0),
                                           CDT=tl_compute_dtype(cdt), BLOCK=_BLOCK,
                                           num_warps=4)
    if dst is not x:
        x.copy_(dst)
