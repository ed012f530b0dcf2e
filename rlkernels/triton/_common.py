"""Shared pieces of the triton backend: launch helpers (block sizes, dtypes, strides, device
guard, fp32 hyper-parameters) and small ``@triton.jit`` math helpers.

Numerics conventions shared by every kernel (SPEC section 1, DESIGN section 4):

* math in fp32, or fp64 for fp64 logits (``IS_FP64`` constexpr, compute dtype ``CDT`` from
  :func:`compute_dtype`, the torch backend's one definition);
* float hyper-parameters (``1/T``, ``beta`` and its logs, ``logit_scale``, ``softcap``) reach
  the kernels as runtime fp32 scalars: a float ``c`` travels as the pair ``hi = fp32(c)``,
  ``lo = fp32(c - hi)`` (:func:`split`; :func:`mul_hl`, :func:`const_hl` in the kernels), so
  that fp64 kernels see ``c`` to ~48 bits while fp32 kernels use ``hi`` only; never as a
  Python float that Inductor could turn into an fp64 kernel argument, never as a
  ``tl.constexpr`` (those hold flags, modes, dtypes and block sizes only: a new temperature
  compiles nothing, tests/triton/test_hyper_params.py);
* the online softmax is written once, in two forms: :func:`online_block` (a block reduction
  per step: 1-d row blocks, 2-d tiles of the lm_head) and :func:`lane_step` /
  :func:`lane_merge` (per-lane statistics merged once per row: the streaming loops);
* row offsets are int64 (``row.to(tl.int64) * stride``): ``N * V > 2**31`` works;
* ``log1p`` / ``expm1`` are written here (series near 0, the plain formula elsewhere) rather
  than taken from libdevice: the interpreter has no libdevice, and the series do not depend on
  how accurate the GPU's ``log`` is near 1 (which decides the precision of ``1 - p_max`` on
  peaked rows).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import triton
import triton.language as tl

# the one definition of the compute dtype (fp64 for fp64 inputs, else fp32; SPEC section 1),
# re-exported for the triton modules
from ..reference import compute_dtype, rows

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}

# Largest vocabulary block one program handles per loop step (a power of two). 4096 fp32
# values are 16 per thread at 8 warps; the tests shrink it to get many blocks per row.
BLOCK_V_MAX = 4096
# Smallest block: keeps tl.arange ranges comfortably above degenerate sizes (V = 1, 7, ...).
BLOCK_V_MIN = 16


def block_v(vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """``min(next_pow2(V), BLOCK_V_MAX)`` (at least ``BLOCK_V_MIN``); a quarter of that for
    fp64, whose values take two registers each (the fp64 JSD kernels spill at 4096)."""
    cap = BLOCK_V_MAX if dtype != torch.float64 else max(BLOCK_V_MAX // 4, BLOCK_V_MIN)
    return max(BLOCK_V_MIN, min(triton.next_power_of_2(max(vocab, 1)), cap))


def num_warps(block: int) -> int:
    """Warps for a one-row-per-program kernel streaming ``block`` columns per step."""
    if block <= 512:
        return 2
    if block <= 1024:
        return 4
    if block <= 4096:
        return 8
    return 16


def tl_compute_dtype(dtype: torch.dtype):
    """The ``tl`` dtype of :func:`compute_dtype` (the torch backend's rule, imported above)."""
    return _TL_DTYPE[compute_dtype(dtype)]


def split(value: float) -> Tuple[float, float]:
    """``value`` as two fp32 numbers ``(hi, lo)`` with ``hi + lo ~ value`` to ~48 bits.

    Infinite values give ``(value, 0.0)``. Both are Python floats that are exactly
    representable in fp32, so the kernel sees the same numbers natively and in the
    interpreter.
    """
    hi = float(np.float32(value))
    if not np.isfinite(hi):
        return hi, 0.0
    return hi, float(np.float32(value - hi))


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x [N, V]`` with stride 1 along ``V`` (a copy only when it is not); rows may keep any
    stride."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def n_rows(x: torch.Tensor) -> int:
    """Rows of ``x [..., V]`` (the product of its leading dims)."""
    n = 1
    for d in x.shape[:-1]:
        n *= d
    return n


def row_layout(x: torch.Tensor) -> Tuple[int, int, int]:
    """``(inner, stride_outer, stride_inner)`` of ``x [N, V]`` or ``[A, B, V]``: row ``r``
    starts ``(r // inner) * stride_outer + (r % inner) * stride_inner`` elements after
    ``x``'s pointer (:func:`row_offset`). A ``[B, T - 1, V]`` slice of ``[B, T, V]`` logits
    (``logits[:, :-1]``) is read in place this way, with no copy. ``inner == 1`` for 2-D
    ``x``: Triton specializes an int argument equal to 1 as a constant, so a 2-D row costs
    one multiply, as before."""
    if x.dim() == 3:
        b, s0, s1 = x.shape[1], x.stride(0), x.stride(1)
        if s0 == b * s1 or x.shape[0] <= 1:
            return 1, s1, 0  # the rows merge (contiguous [B, T, V]): the 2-D form
        if b == 1:
            return 1, s0, 0
        return max(b, 1), s0, s1
    return 1, row_stride(x), 0


def rows3(x: torch.Tensor) -> torch.Tensor:
    """``x [..., V]`` as rows :func:`row_layout` reads: ``x`` itself up to 3-D, else
    ``rows(x, strided=True)`` (a view when the leading dims merge into one or two)."""
    return x if x.dim() <= 3 else rows(x, strided=True)


def per_row(t: torch.Tensor, trailing: int = 0) -> Tuple[torch.Tensor, int]:
    """``(t, stride)`` for a per-row tensor ``t [..., *C]`` (``trailing`` = ``len(C)``): row
    ``r`` starts ``r * stride`` elements after ``t``'s pointer. The leading dims are read
    in place when their strides merge into one (any contiguous tensor, and an expanded
    upstream gradient: stride 0); else ``t`` is copied to a contiguous one."""
    shape, strides = t.shape, t.stride()
    stride = expect = None
    for i in range(len(shape) - trailing - 1, -1, -1):
        d = shape[i]
        if d == 1:
            continue
        if stride is None:
            stride = strides[i]
            expect = stride * d
        elif strides[i] != expect:
            t = t.reshape(-1, *shape[len(shape) - trailing:])
            return t, t.stride(0)
        else:
            expect *= d
    return t, 0 if stride is None else stride


def row_stride(x: torch.Tensor) -> int:
    """Stride between rows of ``x [N, V]`` (any value when ``N <= 1``)."""
    return x.stride(0) if x.dim() == 2 else 0


def fast_bf16(x: torch.Tensor) -> bool:
    """Whether a kernel may unpack ``x``'s bf16 values with :func:`load_bf16_f32`'s inline PTX:
    bf16 on a GPU (the interpreter, on CPU tensors, runs no PTX)."""
    return x.dtype == torch.bfloat16 and x.is_cuda


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device). On CPU (the
    interpreter runs the kernels with numpy), silence numpy's floating-point warnings: the
    kernels compute values like ``0 * -inf`` in lanes that a ``where`` then discards."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return np.errstate(invalid="ignore", divide="ignore", over="ignore")


# ----------------------------------------------------------------------------- jit helpers

@triton.jit
def row_offset(row, inner, stride_outer, stride_inner):
    """Element offset of row ``row`` (int64) in the layout of :func:`row_layout`."""
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def zero_grad_rows(gxbase, gybase, V, NEED_W: tl.constexpr, CDT: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    """Zeros over the ``V`` columns of a row's ``d x`` (and ``d y`` with ``NEED_W``): the
    gradient of an ignored row of the two-input (KL / f-divergence) backward kernels, written
    without reading the row."""
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inb = cols < V
        tl.store(gxbase + cols, tl.zeros([BLOCK_V], CDT).to(gxbase.dtype.element_ty),
                 mask=inb)
        if NEED_W:
            tl.store(gybase + cols, tl.zeros([BLOCK_V], CDT).to(gybase.dtype.element_ty),
                     mask=inb)


@triton.jit
def load_pair_stats(row, sp_ptr, stride_sp0, stride_sp1, sq_ptr, stride_sq0, stride_sq1,
                    CDT: tl.constexpr):
    """A row's saved statistics of both inputs, ``(m_p, log s_p, sum_p, m_q, log s_q,
    sum_q)`` (columns 0, 1, 2 of ``stats_p`` / ``stats_q``), in the compute dtype."""
    p = sp_ptr + row * stride_sp0
    q = sq_ptr + row * stride_sq0
    return (tl.load(p).to(CDT), tl.load(p + stride_sp1).to(CDT),
            tl.load(p + 2 * stride_sp1).to(CDT), tl.load(q).to(CDT),
            tl.load(q + stride_sq1).to(CDT), tl.load(q + 2 * stride_sq1).to(CDT))


@triton.jit
def mul_hl(x, hi, lo, IS_FP64: tl.constexpr):
    """``x * c`` for ``c = hi + lo`` (see :func:`split`); fp32 kernels use ``hi`` only.
    Non-finite ``x`` skips the ``lo`` term (``inf * 0`` would be NaN)."""
    r = x * hi
    if IS_FP64:
        r = r + tl.where(tl.abs(x) < float("inf"), x * lo, 0.0)
    return r


@triton.jit
def const_hl(like, hi, lo, IS_FP64: tl.constexpr):
    """The scalar ``hi + lo`` in the dtype of ``like`` (fp64 kernels add ``lo``)."""
    r = tl.zeros([], like.dtype) + hi
    if IS_FP64:
        r = r + lo
    return r


@triton.jit
def log1p(x, IS_FP64: tl.constexpr):
    """``log(1 + x)`` for ``x >= 0`` (fine for ``x > -0.2``), accurate to a few ulps.

    ``|x| <= 1/4``: ``2 atanh(s)``, ``s = x / (2 + x)``, by its odd series in ``s`` (``s^2 <=
    1/81``: 4 terms for fp32, 9 for fp64); above: ``log(u)`` with ``u = 1 + x`` corrected for
    the rounding of ``u``.
    """
    small = tl.abs(x) <= 0.25
    s = x / (2.0 + x)
    s2 = s * s
    if IS_FP64:
        acc = tl.zeros_like(s2) + 1.0 / 19.0
        for k in tl.static_range(8, -1, -1):
            acc = acc * s2 + 1.0 / (2 * k + 1)
    else:
        acc = tl.zeros_like(s2) + 1.0 / 9.0
        for k in tl.static_range(3, -1, -1):
            acc = acc * s2 + 1.0 / (2 * k + 1)
    series = 2.0 * s * acc
    u = tl.where(small, 1.0, 1.0 + x)
    direct = tl.log(u) - tl.where(u < float("inf"), ((u - 1.0) - x) / u, 0.0)
    return tl.where(small, series, direct)


@triton.jit
def expm1(x, IS_FP64: tl.constexpr):
    """``exp(x) - 1``, accurate to a few ulps: Taylor series in Horner form for ``|x| <=
    1/2`` (9 terms for fp32, 16 for fp64), ``exp(x) - 1`` (no cancellation) beyond."""
    small = tl.abs(x) <= 0.5
    xs = tl.where(small, x, 0.0)
    acc = tl.zeros_like(xs) + 1.0
    if IS_FP64:
        for k in tl.static_range(16, 1, -1):
            acc = 1.0 + acc * xs * (1.0 / k)
    else:
        for k in tl.static_range(9, 1, -1):
            acc = 1.0 + acc * xs * (1.0 / k)
    return tl.where(small, xs * acc, tl.exp(x) - 1.0)


@triton.jit
def logaddexp(a, b, IS_FP64: tl.constexpr):
    """``log(exp(a) + exp(b))``; ``-inf`` when both are ``-inf``."""
    mx = tl.maximum(a, b)
    mn = tl.minimum(a, b)
    mx_ref = tl.where(mx == float("-inf"), 0.0, mx)
    return mx + log1p(tl.exp(mn - mx_ref), IS_FP64)


@triton.jit
def xmul0(p, x):
    """``p * x`` with ``0 * anything = 0`` (``-inf`` columns contribute nothing); a NaN ``p``
    stays NaN."""
    return tl.where(p == 0.0, 0.0, p * x)


@triton.jit
def online_block(z, offs, m, rest, s1, rest2, AXIS: tl.constexpr, WITH_S1: tl.constexpr,
                 WITH_SQ: tl.constexpr):
    """Fold one block ``z`` into the running softmax statistics, reducing along ``AXIS``: a
    1-d block of one row (``AXIS = 0``; ``m``, ``rest``, ``s1``, ``rest2`` are scalars) or a
    2-d tile of rows (``z [BLOCK_N, BLOCK_V]``, ``AXIS = 1``; the statistics are
    ``[BLOCK_N]``). ``offs`` holds the block's column indices, broadcastable against ``z``
    (``offs[None, :]`` for a tile). Returns ``(m, rest, s1, rest2, is_new, bi)``.

    ``m`` is the running max (from ``-inf``), ``rest`` the sum of ``exp(z - m)`` over every
    column seen but ONE arg-max (so that ``log s = log1p(rest)`` keeps ``1 - p_max`` exact),
    ``s1 = sum exp(z - m) (z - m)`` over every column (entropy; only when ``WITH_S1``),
    ``rest2`` the ``rest`` of ``exp(2 (z - m))`` (``sum p^2``; only when ``WITH_SQ``). When the
    block holds a new max ``bm > m`` (``is_new``), the old arg-max becomes an ordinary column
    (``+ exp(m - bm)``) and the block's first arg-max (index ``bi`` in the block) is left out
    of the block sum; otherwise every column of the block counts (ties with ``m`` count 1
    each). Nothing is ever subtracted. ``exp(-inf - -inf)`` is avoided by shifting with 0
    while the max is still ``-inf``; NaN logits propagate through the sums.
    """
    # the block max and its first index, in one reduction
    bm, bi = tl.max(z, AXIS, return_indices=True, return_indices_tie_break_left=True)
    m_new = tl.maximum(m, bm)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - m_ref)  # 1 when the max did not change, 0 while m = -inf
    zs = z - tl.expand_dims(m_ref, AXIS)
    e = tl.exp(zs)
    is_new = bm > m
    if WITH_S1:
        # sum e (z - m) moves with the max: exp(m - m')(S1 + (m - m') S0), S0 = 1 + rest
        d = tl.where(m == float("-inf"), 0.0, m - m_ref)
        s1 = scale * (s1 + d * (1.0 + rest)) + tl.sum(xmul0(e, zs), AXIS)
    skip_col = tl.where(is_new, bi, -1)  # the column left out of the block sum, if any
    skip = offs == tl.expand_dims(skip_col, AXIS)
    rest = (rest * scale + tl.where(is_new, scale, 0.0) + tl.sum(tl.where(skip, 0.0, e), AXIS))
    if WITH_SQ:
        scale2 = scale * scale
        rest2 = (rest2 * scale2 + tl.where(is_new, scale2, 0.0)
                 + tl.sum(tl.where(skip, 0.0, e * e), AXIS))
    return m_new, rest, s1, rest2, is_new, bi


# ------------------------------------------------------- per-lane online softmax (hot loops)
#
# The streaming loops keep the softmax statistics PER LANE (one state per element of the
# [BLOCK_V] block, carried across loop steps) and reduce across lanes once per row, after the
# loop: no block reduction (barriers, shuffles) inside the loop. A lane's state is
#   m: the max of its raw logits x (not z = x / T: the saved row max is then exactly
#      max(z) as every kernel computes z, which keeps p_max = 1 - rest exact in backward),
#   r: sum of 2^{(x - m) c} over its columns but ONE arg-max (c = log2(e) / T), so that
#      log s = log1p(rest) keeps 1 - p_max exact (nothing is ever subtracted),
#   t: sum of 2^{(x - m) c} (x - m) c over its columns (entropy; <= 0, log2 units),
# updated per element without a branch: with d = (x - m) c,
#   new = d > 0;  e = 2^{-|d|};  s = new ? e : 1
#   r' = r s + e                     (new: (r + 1) e, the old max becomes an ordinary column)
#   t' = t s + d (new ? -r' : e)     (new: e (t - d (r + 1)); otherwise t + e d)
#   m' = max(m, x)
# A lane starts at m = LANE_FLOOR (finite, so that -inf columns give e = 0 and no NaN); a
# NaN logit makes r NaN. Logits at or below LANE_FLOOR count as -inf.
LANE_FLOOR = -1.0e30
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def exp2_(x, IS_FP64: tl.constexpr):
    """``2^x``: the MUFU ``ex2`` in fp32; ``exp(x ln 2)`` in fp64."""
    if IS_FP64:
        # an fp64 constant: a bare Python float would be an fp32 one
        return tl.exp(x * tl.full([], 0.6931471805599453, tl.float64))
    else:
        return tl.exp2(x)


@triton.jit
def lane_step(x, m, r, t, c, WITH_T: tl.constexpr, IS_FP64: tl.constexpr):
    """Fold one block of raw logits ``x`` into the per-lane state ``(m, r, t)`` (the comment
    above); ``c = log2(e) / T``."""
    d = (x - m) * c
    new = d > 0.0
    e = exp2_(-tl.abs(d), IS_FP64)
    s = tl.where(new, e, 1.0)
    r = r * s + e
    if WITH_T:
        # -inf columns: e = 0 and d = -inf; the floor keeps 0 * d = 0
        t = t * s + tl.maximum(d, -3.0e38) * tl.where(new, -r, e)
    m = tl.maximum(m, x)
    return m, r, t


@triton.jit
def lane_step2(x1, x2, m, r, t, c, WITH_T: tl.constexpr, IS_FP64: tl.constexpr):
    """:func:`lane_step` over two columns per lane: the larger one ``xm`` first (the only one
    that can move the lane's max, so one rescale ``s`` per pair), then the smaller one, which
    is never above the new max: ``r += e_n``, ``t += e_n d_n`` with no rescale."""
    # NaN-propagating: a NaN column must reach r (a plain GPU max / min would drop it)
    xm = tl.maximum(x1, x2, propagate_nan=tl.PropagateNan.ALL)
    xn = tl.minimum(x1, x2, propagate_nan=tl.PropagateNan.ALL)
    m, r, t = lane_step(xm, m, r, t, c, WITH_T, IS_FP64)
    dn = (xn - m) * c
    en = exp2_(dn, IS_FP64)
    r = r + en
    if WITH_T:
        t = t + tl.maximum(dn, -3.0e38) * en
    return m, r, t


@triton.jit
def load_bf16_f32(ptrs, FAST: tl.constexpr):
    """``tl.load(ptrs).to(float32)`` of bf16 values; with ``FAST`` (compiled, not under the
    interpreter) each 32-bit word of two bf16 unpacks in two integer instructions (``shl 16``,
    ``and 0xffff0000``: bf16 -> fp32 is exact, NaN / inf bits included), where the plain
    conversion spends three (a ``PRMT`` and a shift for the high half)."""
    x = tl.load(ptrs)
    if FAST:
        return tl.inline_asm_elementwise(
            "{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
            dtype=tl.float32, is_pure=True, pack=2)
    else:
        return x.to(tl.float32)


@triton.jit
def floor_f(x):
    """``max(x, -2e30)``, NaN kept: a ``-inf`` logit becomes a finite value below
    ``LANE_FLOOR`` (the lane helpers give it weight 0 and count it as ``-inf``), so that a
    difference of two floored columns is finite."""
    return tl.maximum(x, -2.0e30, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def load_floor_f32(ptrs, FAST: tl.constexpr, CDT: tl.constexpr):
    """:func:`floor_f` of ``tl.load(ptrs)`` in ``CDT``. With ``FAST`` (bf16 on a GPU,
    compiled, not under the interpreter) the floor is one packed ``max.NaN.bf16x2`` per 32-bit
    word of two bf16, at bf16 ``0xF14A`` = -1.00026e30 (also below ``LANE_FLOOR``), before
    :func:`load_bf16_f32`'s two-instruction unpack: half an instruction per column."""
    x = tl.load(ptrs)
    if FAST:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 f, t; mov.b32 f, 0xF14AF14A; max.NaN.bf16x2 t, $2, f; "
            "shl.b32 $0, t, 16; and.b32 $1, t, 0xffff0000; }", "=r,=r,r", [x],
            dtype=tl.float32, is_pure=True, pack=2)
    else:
        return floor_f(x.to(CDT))


@triton.jit
def lg2_1p(v, PTX: tl.constexpr):
    """``log2(1 + v)`` for ``0 <= v <= 1`` (fp32): its argument lies in ``[1, 2]``, so with
    ``PTX`` (compiled for a GPU) it is one ``lg2.approx.ftz`` (no subnormal fix-up; absolute
    error about 2^-22); the interpreter takes ``tl.log2``."""
    u = 1.0 + v
    if PTX:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [u],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.log2(u)


@triton.jit
def lane_merge(m, r, t, lanes, c, BLOCK: tl.constexpr, WITH_T: tl.constexpr,
               IS_FP64: tl.constexpr):
    """The row's ``(max raw logit, rest, T)`` from the per-lane states, ``rest`` as in
    :func:`online_block` (every column but one arg-max: the first lane holding the max keeps
    its arg-max out, every other lane's arg-max becomes ordinary), ``T = sum 2^{(x - M) c}
    (x - M) c`` (log2 units, <= 0). A row with no column above ``LANE_FLOOR`` (all ``-inf``)
    gives ``(-inf, 0, 0)``; a row of only NaN ``(-inf, NaN, NaN)``."""
    big = tl.max(m, 0)
    first = tl.min(tl.where(m == big, lanes, BLOCK), 0)
    dm = (m - big) * c
    sc = exp2_(dm, IS_FP64)  # 0 for lanes that saw no finite column
    rest = tl.sum(r * sc + tl.where(lanes == first, 0.0, sc), 0)
    tt = rest * 0.0
    if WITH_T:
        # a lane's terms move to the row max: sc (t + dm (r + 1))
        tt = tl.sum(tl.where(sc == 0.0, 0.0, sc * (t + dm * (r + 1.0))), 0)
    empty = big <= -1.0e30
    big = tl.where(empty, float("-inf"), big)
    # "* 0" and not 0: a row of only NaN also leaves every lane at the floor (max ignores
    # NaN), but its r is NaN, and that NaN must reach the row's outputs
    rest = tl.where(empty, rest * 0.0, rest)
    tt = tl.where(empty, tt * 0.0, tt)
    return big, rest, tt
