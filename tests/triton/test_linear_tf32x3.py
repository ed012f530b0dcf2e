"""The 3xTF32 dot of the fused lm_head (``rlkernels.triton.linear._mma`` with ``"tf32x3"``,
what fp32 operands run on a GPU) called directly from a small kernel: in the interpreter (where
the launchers themselves take "ieee" dots, ``_dot_prec``) and, given a GPU, on its TF32
tensor cores.

* ``_tf32_split``: ``hi`` and ``lo`` are TF32 values (13 low mantissa bits zero, so the tensor
  core multiplies them exactly), ``|x - hi| <= 2^-11 |x|`` and ``|x - hi - lo| <= 2^-22
  |x|``, for values over 2^+-20 of magnitude and both signs;
* the dot: ``a_lo b_hi + a_hi b_lo + a_hi b_hi`` within ``3 2^-22 + K 2^-24`` of
  ``sum |a b|`` from the fp64 product (the error model of ``_head_precision``), and far
  closer than one TF32 dot (which the split is there to beat).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlkernels.triton.linear import _mma, _tf32_split


@triton.jit
def _x3_kernel(a_ptr, b_ptr, c_ptr, hi_ptr, lo_ptr, M: tl.constexpr, N: tl.constexpr,
               K: tl.constexpr):
    rm = tl.arange(0, M)
    rn = tl.arange(0, N)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = _mma(a, b, tl.zeros([M, N], tl.float32), "tf32x3", tl.float32)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc)
    hi, lo = _tf32_split(a)
    tl.store(hi_ptr + rm[:, None] * K + rk[None, :], hi)
    tl.store(lo_ptr + rm[:, None] * K + rk[None, :], lo)


def test_tf32x3_split_and_dot():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    m, n, k = 16, 16, 64
    a = torch.randn(m, k, generator=g) * torch.exp(3 * torch.randn(m, k, generator=g))
    b = torch.randn(k, n, generator=g)
    out = [torch.empty(s, device=dev) for s in ((m, n), (m, k), (m, k))]
    _x3_kernel[(1,)](a.to(dev), b.to(dev), *out, m, n, k)
    c, hi, lo = (x.cpu() for x in out)
    for part in (hi, lo):
        assert (part.view(torch.int32) & 0x1FFF == 0).all()
    ad = a.double()
    assert ((ad - hi.double()).abs() <= 2.0 ** -11 * ad.abs()).all()
    assert ((ad - hi.double() - lo.double()).abs() <= 2.0 ** -22 * ad.abs()).all()
    assert (lo != 0).any() and (a < 0).any()
    ref = ad @ b.double()
    scale = ad.abs() @ b.double().abs()
    err = ((c.double() - ref).abs() / scale).max().item()
    assert err <= 3 * 2.0 ** -22 + k * 2.0 ** -24
    tf32_only = ((hi.double() @ b.double() - ref).abs() / scale).max().item()
    assert err < tf32_only / 100
