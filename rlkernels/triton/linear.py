"""Triton kernels of the fused lm_head ops (hidden states in): ``linear_token_logprobs`` and
``linear_grpo_loss``. Same launcher signatures, outputs and row statistics as
:mod:`rlkernels.reference.linear` (which states the math); no ``[N, V]`` buffer: the forward
holds one tile of logits, the backward one vocabulary slice of ``d z`` (at most 256 MiB).

Logits ``z = (hidden @ weight^T + bias) / T`` are formed tile by tile: a ``[BLOCK_N, BLOCK_V]``
tile is ``tl.dot`` of ``BLOCK_H`` chunks of ``hidden`` rows and ``weight`` rows accumulated in
fp32 (fp64 for fp64 inputs; fp32 operands as 3xTF32 on the GPU: :func:`_head_precision`),
bias added, times ``1/T`` (the ``hi``/``lo`` split of :mod:`._common`); columns past ``V``
are ``-inf``, H tails are loaded as 0. Offsets are int64. Block sizes depend only on ``H``,
``V``, the dtype, the head precision and the device, never on ``N``: a row's results do not
depend on the batch (SPEC 1), and no kernel uses atomics (bit-identical reruns).

* Forward (:func:`_fwd_kernel`): one program per (block of ``BLOCK_N`` rows, vocabulary
  split of 16384 columns on a GPU), the split index fastest in a 1-d grid, looping over its
  split in ``BLOCK_V`` tiles (one flattened loop over (tile, ``H`` chunk)); each tile is
  folded in two halves of ``BLOCK_V / 2`` columns (:func:`_fwd_fold`), per row the
  online ``(m, rest, S1)`` update of :func:`._common.online_block` (along axis 1 of the
  2-d half), running max from ``-inf``, ``rest`` over every column but
  ONE arg-max, and the token's logit picked when its column falls in the half. With several
  splits (a function of V only) :func:`_fwd_merge_kernel` merges them in split order. Saves
  ``stats = (m, log1p(rest), sum p (z - m))``.
* Backward (:func:`linear_token_logprobs_backward`), per vocabulary slice of ``span`` columns
  (sized so that the slice's ``d z [N, span]`` takes at most 256 MiB), three launches, each
  program owning what it writes (deterministic, no float atomics):

  - :func:`_dz_kernel`: recomputes the logit tiles of the slice (the forward's GEMM) and
    writes ``d z`` from the saved ``stats``: bf16 for bf16 inputs (so that both GEMMs below
    run on bf16 tensor cores, the rounding autograd applies to materialized bf16 logits),
    fp32 for fp32 / fp16 inputs (fp16 would flush the ~1e-9 entries of a loss averaged over
    many tokens), fp64 for fp64; with a bias, fp32 column sums per row block;
  - :func:`_gemm_kernel` twice: ``d hidden += d z @ W[slice]`` (an fp32 ``[N, H]``
    accumulator across slices; the last slice writes ``grad_hidden`` in its dtype) and
    ``d weight[slice] = d z^T @ hidden`` (complete over every row in one K loop, written
    in the weight's dtype: no ``[V, H]`` fp32 buffer).

  Peak extra memory at N=16384, H=3584, V=151936 bf16: 256 MiB (``d z``) + 224 MiB
  (``d hidden`` accumulator), under the 1 GiB target. Slices split the ``d hidden`` GEMM's
  K at multiples of its block, so the bits do not depend on the slice width (hence on N).
  Row blocks whose rows are all padding run no dot in any kernel (SPEC 6).

* The cuBLAS path (``path="cublas"``, what ``"auto"`` takes on CUDA tensors): the GEMMs
  through ``torch.mm`` on fixed-size row chunks (the last one zero-padded, so every call has
  the same shape and cuBLAS the same algorithm: batch invariant by construction), the
  vocabulary kernels on each chunk of fp32 logits; see :func:`_cublas_forward` and
  :func:`_cublas_backward`. The private TRL head (``MAP`` / ``EXTRAS``) runs the triton path.
* ``head_precision`` (:func:`_head_precision`): the GEMMs' operand precision, ``None`` (the
  inputs' own), ``"bf16"``, ``"tf32"`` or ``"fp32"``; accumulation in fp32 always.

  ``d z = (g_lp (onehot - p) - g_H p ((z - m) - sum p (z - m))) / T``; the token column uses
  ``-g_lp expm1(log p_y)`` (exact on peaked rows). Padding rows (``tokens == ignore_index``):
  0 outputs, 0 statistics, and their hidden rows are never loaded (NaN there is harmless),
  so they contribute exactly 0 to every gradient.

The private ``linear_token_stats`` kernels (TRL's fused lm_head, see
:func:`rlkernels.ops.linear._linear_token_stats`) are the same kernels with two constexpr
options the public path compiles without: ``MAP`` (:func:`_head_map`: ``logit_scale`` and a soft
cap applied to each logit tile before ``1/T``; backward multiplies ``d z`` by the map's
derivative in :func:`_dz_kernel`) and ``EXTRAS`` (per row, ``rest2`` = the ``rest`` of
``exp(2 (z - m))``, the sum of ``z`` and the first arg-max, merged across splits like ``rest``;
stored as ``extra = (log sum p^2, mean z, is_top1)``).

dtypes: fp32 / bf16 / fp16 inputs compute in fp32 (bf16 / fp16 operands go to ``tl.dot``
natively on a GPU, whose products are exact in fp32; the backward GEMMs take ``d z`` rounded
to bf16 for bf16 inputs, see above); fp64 inputs compute in fp64 throughout (``tl.dot`` on
fp64).

Block sizes, the forward's split width and the triton against the cuBLAS path: measurements
and what is left to tune in benchmarks/NOTES.md.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _cublas_head as _head
from .. import _rows
from ..reference import as_flat, as_rows, grad_in_shape, head_outputs
from .._fused import fused_forward, row_grads
from .._policy_options import PolicyOptions
from ._common import (compute_dtype, const_hl, device_guard, expm1, log1p, mul_hl,
                      online_block, split, tl_compute_dtype, xmul0)
from .policy import policy_loss_backward, policy_loss_forward

Tensor = torch.Tensor

# linear_token_logprobs and linear_grpo_loss take the public shapes (hidden [..., H], tokens
# [...]; per-token outputs [...], d hidden in hidden's shape): rlkernels.ops._table skips
# those ops' maps and views (the other ops of this family keep them)
ND_ROWS = frozenset({"linear_token_logprobs", "linear_grpo_loss"})


# ================================================================================ jit helpers

@triton.jit
def _head_map(y, fm, MAP: tl.constexpr, IS_FP64: tl.constexpr):
    """``(f(y), f'(y))`` of the pre-softmax map (``MAP`` 1: ``u = s y``; 2: then ``c tanh(u /
    c)``), ``fm = (s_hi, s_lo, c_hi, c_lo, 1/c hi, 1/c lo)`` (:func:`._common.split` pairs).
    ``tanh(x) = sign(x) (1 - e) / (1 + e)`` with ``e = exp(-2|x|)``, ``1 - e`` by ``expm1``
    (no cancellation near 0), and ``1 - tanh^2 = 4 e / (1 + e)^2`` (none near saturation)."""
    u = mul_hl(y, fm[0], fm[1], IS_FP64)
    d = const_hl(u, fm[0], fm[1], IS_FP64)
    if MAP == 2:
        x = mul_hl(u, fm[4], fm[5], IS_FP64)
        em1 = expm1(-2.0 * tl.abs(x), IS_FP64)
        e = em1 + 1.0
        t = tl.where(x < 0, em1, -em1) / (2.0 + em1)
        u = mul_hl(t, fm[2], fm[3], IS_FP64)
        d = d * (4.0 * e / ((1.0 + e) * (1.0 + e)))
    return u, d


@triton.jit
def _to_bf16(x):
    """``x`` rounded to bf16, to nearest even as torch rounds; fp64 goes through fp32 first,
    as torch's conversion does. The rounding is done on the bits (then the cast is exact):
    Triton 3.9's interpreter rounds fp32 -> bf16 casts wrongly even with
    ``fp_downcast_rounding="rtne"`` (-1.2167 -> -1.2109), and the tests run there."""
    if x.dtype != tl.bfloat16:
        f = x.to(tl.float32)
        bits = f.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        f = tl.where(f != f, f, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        x = f.to(tl.bfloat16)
    return x


@triton.jit
def _store_value(x, ptr):
    """``x`` converted for a store through ``ptr``: to bf16 by :func:`_to_bf16` (nearest even
    from any float, in the interpreter too), else by a plain cast."""
    if ptr.dtype.element_ty == tl.bfloat16:
        return _to_bf16(x)
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _tf32_split(x):
    """``(hi, lo)`` of fp32 ``x``: ``hi`` = ``x`` rounded to TF32 (11 significant bits, to
    nearest on the bits), ``lo`` = ``x - hi`` (exact) rounded the same way; ``x = hi + lo +
    d`` with ``|d| <= 2^-22 |x|``. Both are TF32 values, so a TF32 tensor core (which ignores
    the 13 low mantissa bits) multiplies them exactly. Infinite ``x`` gives ``lo`` NaN (and
    a NaN logit, where an fp32 dot gives inf or NaN); NaN stays NaN."""
    hi = ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    r = x - hi
    lo = ((r.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _mma(a, b, acc, DOT_PREC: tl.constexpr, CDT: tl.constexpr):
    """``acc + a @ b`` by ``tl.dot`` with ``input_precision=DOT_PREC``, except ``"tf32x3"``,
    written out here (:func:`_head_precision` states its error): ``a_lo b_hi + a_hi b_lo +
    a_hi b_hi`` (:func:`_tf32_split`), three TF32 dots into the one accumulator (Triton's own
    "tf32x3" sums the small products in a second accumulator: +64 registers at 128 x 128,
    which spilled). GPU only (:func:`_dot_prec`)."""
    if DOT_PREC == "tf32x3":
        a_hi, a_lo = _tf32_split(a.to(tl.float32))
        b_hi, b_lo = _tf32_split(b.to(tl.float32))
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32", out_dtype=CDT)
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32", out_dtype=CDT)
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32", out_dtype=CDT)
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC, out_dtype=CDT)
    return acc


@triton.jit
def _dot_tile(h_ptr, stride_h, w_ptr, stride_w, rows, row_ok, cols, col_ok, H,
              UPCAST: tl.constexpr, CDT: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ROUND: tl.constexpr,
              DOT_PREC: tl.constexpr):
    """``h[rows] @ w[cols]^T`` as a ``[BLOCK_N, BLOCK_V]`` tile in ``CDT``, ``BLOCK_H`` chunks
    of ``H`` from 0 up (rows with ``row_ok`` False and columns with ``col_ok`` False load 0).
    ``ROUND`` / ``DOT_PREC``: the head precision (:func:`_head_precision`): operands rounded
    to bf16 (1) or fp32 (2) before the dot, and ``tl.dot``'s ``input_precision``; ``UPCAST``:
    operands converted to ``CDT`` (:func:`_upcast`). ``H`` may be 0 (a block of padding rows:
    no dot at all)."""
    offs_h = tl.arange(0, BLOCK_H)
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_V], CDT)
    for k in range(0, H, BLOCK_H):
        h, w = _operands(h_ptr, stride_h, w_ptr, stride_w, r64, row_ok, c64, col_ok,
                         k + offs_h, H, UPCAST, CDT, ROUND)
        acc = _mma(h, tl.trans(w), acc, DOT_PREC, CDT)
    return acc


@triton.jit
def _operands(h_ptr, stride_h, w_ptr, stride_w, r64, row_ok, c64, col_ok, ks, H,
              UPCAST: tl.constexpr, CDT: tl.constexpr, ROUND: tl.constexpr):
    """The ``tl.dot`` operands of one ``H`` chunk ``ks``: ``h[r64, ks]`` and ``w[c64, ks]``
    (0 where ``row_ok`` / ``col_ok`` is False or ``ks >= H``), rounded per ``ROUND`` and
    converted per ``UPCAST`` (:func:`_dot_tile`)."""
    km = ks < H
    h = tl.load(h_ptr + r64[:, None] * stride_h + ks[None, :],
                mask=row_ok[:, None] & km[None, :], other=0.0)
    w = tl.load(w_ptr + c64[:, None] * stride_w + ks[None, :],
                mask=col_ok[:, None] & km[None, :], other=0.0)
    if ROUND == 1:
        h = _to_bf16(h)
        w = _to_bf16(w)
    if ROUND == 2:
        h = h.to(tl.float32)
        w = w.to(tl.float32)
    if UPCAST:
        h = h.to(CDT)
        w = w.to(CDT)
    return h, w


@triton.jit
def _row_grad_inputs(glp_ptr, gh_ptr, tok_ptr, stats_ptr, stride_s0, stride_s1, rows, row_in,
                     ignore_index, inv_t_hi, inv_t_lo, HAS_GLP: tl.constexpr,
                     HAS_GH: tl.constexpr, IS_FP64: tl.constexpr, CDT: tl.constexpr):
    """Per-row inputs of ``d z``: token, live flag, ``m`` (``-inf`` -> 0), ``log s``,
    ``sum p (z - m)``, ``g_lp / T`` and ``g_H / T`` (0 on padding rows)."""
    r64 = rows.to(tl.int64)
    tok = tl.load(tok_ptr + r64, mask=row_in, other=ignore_index).to(tl.int64)
    live = row_in & (tok != ignore_index)
    m = tl.load(stats_ptr + r64 * stride_s0, mask=live, other=0.0).to(CDT)
    m = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.load(stats_ptr + r64 * stride_s0 + stride_s1, mask=live, other=0.0).to(CDT)
    sum_pzs = tl.load(stats_ptr + r64 * stride_s0 + 2 * stride_s1, mask=live,
                      other=0.0).to(CDT)
    g_lp = tl.zeros(m.shape, CDT)
    g_h = tl.zeros(m.shape, CDT)
    if HAS_GLP:
        g_lp = mul_hl(tl.load(glp_ptr + r64, mask=live, other=0.0).to(CDT), inv_t_hi,
                      inv_t_lo, IS_FP64)
    if HAS_GH:
        g_h = mul_hl(tl.load(gh_ptr + r64, mask=live, other=0.0).to(CDT), inv_t_hi,
                     inv_t_lo, IS_FP64)
    return tok, live, m, log_s, sum_pzs, g_lp, g_h


@triton.jit
def _dz_tile(z, cols, col_ok, tok, live, m, log_s, sum_pzs, g_lp, g_h,
             HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr, IS_FP64: tl.constexpr):
    """``d z`` of a logit tile (already times ``1/T`` through ``g_lp``, ``g_h``); exactly 0
    on padding rows and tail columns."""
    zs = z - m[:, None]
    lp = zs - log_s[:, None]
    p = tl.exp(lp)
    g = tl.zeros(z.shape, z.dtype)
    if HAS_GLP:
        is_tok = cols[None, :] == tok[:, None]
        # the token's log-prob, if its column is in this tile: -g expm1(log p_y) there
        lp_y = tl.sum(tl.where(is_tok, lp, 0.0), 1)
        tok_grad = -g_lp * expm1(lp_y, IS_FP64)
        g = tl.where(is_tok, tok_grad[:, None], -g_lp[:, None] * p)
    if HAS_GH:
        g = g - g_h[:, None] * xmul0(p, zs - sum_pzs[:, None])
    return tl.where(live[:, None] & col_ok[None, :], g, 0.0)


# ==================================================================================== kernels

@triton.jit
def _fwd_finish(rows, row_in, live, m, rest, s1, z_y, rest2, zsum, hit, V, logp_ptr, ent_ptr,
                stats_ptr, extra_ptr, WITH_ENTROPY: tl.constexpr, EXTRAS: tl.constexpr,
                IS_FP64: tl.constexpr, CDT: tl.constexpr):
    """Store a row block's log-prob, entropy and ``stats = (m, log1p(rest), sum p (z - m))``
    from its running ``(m, rest, S1)`` and token logit (0 everywhere on padding rows);
    ``EXTRAS``: ``extra = (log sum p^2, mean z, token is the first arg-max)`` from ``rest2``,
    the row sum ``zsum`` and ``hit``, with ``sum p^2 = (1 + rest2) / (1 + rest)^2``."""
    r64 = rows.to(tl.int64)
    log_s = log1p(rest, IS_FP64)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    logp = (z_y - m_shift) - log_s
    zero = tl.zeros(m.shape, CDT)
    if WITH_ENTROPY:
        # sum p (z - m) = S1 / S0, S0 = 1 + rest; H = log s - S1 / S0 (two terms >= 0)
        sum_pzs = s1 / (1.0 + rest)
        ent = log_s - sum_pzs
    else:
        sum_pzs = zero
        ent = zero
    tl.store(logp_ptr + r64, tl.where(live, logp, zero), mask=row_in)
    tl.store(ent_ptr + r64, tl.where(live, ent, zero), mask=row_in)
    tl.store(stats_ptr + r64 * 3, tl.where(live, m, zero), mask=row_in)
    tl.store(stats_ptr + r64 * 3 + 1, tl.where(live, log_s, zero), mask=row_in)
    tl.store(stats_ptr + r64 * 3 + 2, tl.where(live, sum_pzs, zero), mask=row_in)
    if EXTRAS:
        log_sum_sq = log1p(rest2, IS_FP64) - 2.0 * log_s
        tl.store(extra_ptr + r64 * 3, tl.where(live, log_sum_sq, zero), mask=row_in)
        tl.store(extra_ptr + r64 * 3 + 1, tl.where(live, zsum / V, zero), mask=row_in)
        tl.store(extra_ptr + r64 * 3 + 2, tl.where(live, hit, zero), mask=row_in)


@triton.jit
def _fwd_fold(y, b_ptr, c0, v_hi, tcol, m, rest, s1, z_y, rest2, zsum, amax, inv_t_hi,
              inv_t_lo, fm, HAS_BIAS: tl.constexpr, MAP: tl.constexpr,
              WITH_ENTROPY: tl.constexpr, EXTRAS: tl.constexpr, IS_FP64: tl.constexpr,
              WIDTH: tl.constexpr, INTERP: tl.constexpr):
    """Fold the product tile ``y = h @ w^T`` of the ``WIDTH`` columns ``[c0, c0 + WIDTH)``
    into the running ``(m, rest, S1, z_y)`` (and ``(rest2, zsum, amax)`` with ``EXTRAS``): bias,
    map and ``1/T`` applied here, columns at or past ``v_hi`` ``-inf``; ``tcol`` is the
    token's column minus ``c0`` (int32; out of ``[0, WIDTH)`` when not in these columns).
    ``INTERP`` (the interpreter): NaN logits enter the softmax update as ``+inf`` (numpy's
    arg-max raises on an all-NaN half; the outputs are NaN all the same)."""
    offs = tl.arange(0, WIDTH)
    cols = c0 + offs
    col_ok = cols < v_hi
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(y.dtype)[None, :]
    if MAP != 0:
        y, _ = _head_map(y, fm, MAP, IS_FP64)
    z = tl.where(col_ok[None, :], mul_hl(y, inv_t_hi, inv_t_lo, IS_FP64), float("-inf"))
    zu = z
    if INTERP:
        zu = tl.where(z != z, float("inf"), z)
    m, rest, s1, rest2, is_new, bi = online_block(zu, offs[None, :], m, rest, s1, rest2, 1,
                                                  WITH_ENTROPY, EXTRAS)
    if EXTRAS:  # the column of the row's first max: a later block takes over only with a
        amax = tl.where(is_new, c0 + bi, amax)  # strictly larger max
        # a -inf column makes the mean -inf, as the mean of the logits is
        zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), 1)
    # the token's logit, when its column is here (exactly one block has it)
    z_y += tl.sum(tl.where(offs[None, :] == tcol[:, None], z, 0.0), 1)
    return m, rest, s1, z_y, rest2, zsum, amax


@triton.jit
def _fwd_kernel(h_ptr, stride_h, w_ptr, stride_w, b_ptr, tok_ptr, logp_ptr, ent_ptr, stats_ptr,
                extra_ptr, part_ptr, N, V, H, split_cols, splits, inv_t_hi, inv_t_lo,
                ignore_index, s_hi, s_lo, c_hi, c_lo, ic_hi, ic_lo,
                HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, MAP: tl.constexpr,
                EXTRAS: tl.constexpr, UPCAST: tl.constexpr, IS_FP64: tl.constexpr,
                CDT: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, ROUND: tl.constexpr = 0,
                DOT_PREC: tl.constexpr = "ieee", INTERP: tl.constexpr = False,
                QUARTERS: tl.constexpr = False):
    """Program ``pid``: rows ``i * BLOCK_N + [0, BLOCK_N)`` over vocabulary split ``j``
    (columns ``[j * split_cols, (j + 1) * split_cols)``), ``i, j = divmod(pid, splits)``: the
    split index runs fastest, so that the programs resident together share a few ``hidden``
    row blocks (kept in L2) and walk each split's ``weight`` tiles together. Without ``SPLIT``
    (one split) it stores the outputs; with ``SPLIT`` the split's ``(m, rest, S1, z_y)`` (and
    with ``EXTRAS`` ``(rest2, zsum, hit)``) go to ``part [4 or 7, splits, N]`` for
    :func:`_fwd_merge_kernel`. ``MAP`` and ``s_hi .. ic_lo``: the pre-softmax map
    (:func:`_head_map`); ``EXTRAS``: the statistics of ``extra`` (:func:`_fwd_finish`).
    Each ``[BLOCK_N, BLOCK_V]`` product tile is folded in two halves of ``BLOCK_V / 2``
    columns (:func:`_fwd_fold`, in column order): half the epilogue's live registers, so
    that a 128-wide wgmma tile does not spill; ``QUARTERS`` (the extra statistics or the soft
    cap, :func:`_fold_quarters`): four quarters of ``BLOCK_V / 4``. A block whose rows are
    all padding runs no tile (its outputs are the 0 of padding)."""
    pid = tl.program_id(0) // splits
    sid = tl.program_id(0) % splits
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    r64 = rows.to(tl.int64)
    tok = tl.load(tok_ptr + r64, mask=row_in, other=ignore_index).to(tl.int64)
    live = row_in & (tok != ignore_index)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_N], float("-inf"), CDT)
    rest = tl.zeros([BLOCK_N], CDT)
    s1 = tl.zeros([BLOCK_N], CDT)
    z_y = tl.zeros([BLOCK_N], CDT)
    rest2 = tl.zeros([BLOCK_N], CDT)
    zsum = tl.zeros([BLOCK_N], CDT)
    amax = tl.full([BLOCK_N], -1, tl.int32)
    fm = (s_hi, s_lo, c_hi, c_lo, ic_hi, ic_lo)
    v_lo = sid * split_cols
    v_hi = tl.minimum(V, v_lo + split_cols)
    # the token's column relative to the split (int32: a split is < 2**31 columns)
    tcol = tl.where(live, tok - v_lo, -1).to(tl.int32)
    # padding rows cost no GEMM work (SPEC 6): an all-padding block loops over no tile
    v_end = tl.where(tl.max(live.to(tl.int32), 0) > 0, v_hi, v_lo)
    HALF: tl.constexpr = BLOCK_V // 2
    # one flattened (tile, H chunk) loop: the pipeliner issues the next tile's first chunks
    # before this tile's epilogue runs (no drain and refill per tile)
    n_k = tl.maximum(tl.cdiv(H, BLOCK_H), 1)  # H = 0: one chunk of zeros
    n_it = tl.cdiv(v_end - v_lo, BLOCK_V) * n_k
    offs_h = tl.arange(0, BLOCK_H)
    acc = tl.zeros([BLOCK_N, BLOCK_V], CDT)
    for it in range(0, n_it):
        kk = it % n_k
        start = v_lo + (it // n_k) * BLOCK_V
        cols = start + offs
        h, w = _operands(h_ptr, stride_h, w_ptr, stride_w, r64, live, cols.to(tl.int64),
                         cols < v_hi, kk * BLOCK_H + offs_h, H, UPCAST, CDT, ROUND)
        acc = _mma(h, tl.trans(w), acc, DOT_PREC, CDT)
        if kk == n_k - 1:  # the tile is complete: fold its two column halves, in order
            y_a, y_b = tl.split(tl.permute(tl.reshape(acc, [BLOCK_N, 2, HALF]), (0, 2, 1)))
            t = tcol - (start - v_lo)
            if QUARTERS:  # each half in two quarters, the same relabelling again
                Q: tl.constexpr = HALF // 2
                y_0, y_1 = tl.split(tl.permute(tl.reshape(y_a, [BLOCK_N, 2, Q]), (0, 2, 1)))
                m, rest, s1, z_y, rest2, zsum, amax = _fwd_fold(
                    y_0, b_ptr, start, v_hi, t, m, rest, s1, z_y, rest2, zsum, amax, inv_t_hi,
                    inv_t_lo, fm, HAS_BIAS, MAP, WITH_ENTROPY, EXTRAS, IS_FP64, Q, INTERP)
                m, rest, s1, z_y, rest2, zsum, amax = _fwd_fold(
                    y_1, b_ptr, start + Q, v_hi, t - Q, m, rest, s1, z_y, rest2, zsum, amax,
                    inv_t_hi, inv_t_lo, fm, HAS_BIAS, MAP, WITH_ENTROPY, EXTRAS, IS_FP64, Q,
                    INTERP)
                y_2, y_3 = tl.split(tl.permute(tl.reshape(y_b, [BLOCK_N, 2, Q]), (0, 2, 1)))
                m, rest, s1, z_y, rest2, zsum, amax = _fwd_fold(
                    y_2, b_ptr, start + HALF, v_hi, t - HALF, m, rest, s1, z_y, rest2, zsum,
                    amax, inv_t_hi, inv_t_lo, fm, HAS_BIAS, MAP, WITH_ENTROPY, EXTRAS, IS_FP64,
                    Q, INTERP)
                m, rest, s1, z_y, rest2, zsum, amax = _fwd_fold(
                    y_3, b_ptr, start + HALF + Q, v_hi, t - HALF - Q, m, rest, s1, z_y, rest2,
                    zsum, amax, inv_t_hi, inv_t_lo, fm, HAS_BIAS, MAP, WITH_ENTROPY, EXTRAS,
                    IS_FP64, Q, INTERP)
            else:
                m, rest, s1, z_y, rest2, zsum, amax = _fwd_fold(
                    y_a, b_ptr, start, v_hi, t, m, rest, s1, z_y, rest2, zsum, amax, inv_t_hi,
                    inv_t_lo, fm, HAS_BIAS, MAP, WITH_ENTROPY, EXTRAS, IS_FP64, HALF, INTERP)
                m, rest, s1, z_y, rest2, zsum, amax = _fwd_fold(
                    y_b, b_ptr, start + HALF, v_hi, t - HALF, m, rest, s1, z_y, rest2, zsum,
                    amax, inv_t_hi, inv_t_lo, fm, HAS_BIAS, MAP, WITH_ENTROPY, EXTRAS, IS_FP64,
                    HALF, INTERP)
            acc = tl.zeros([BLOCK_N, BLOCK_V], CDT)
    hit = (amax.to(tl.int64) == tok).to(CDT)
    if SPLIT:
        base = part_ptr + sid.to(tl.int64) * N + r64
        plane = splits.to(tl.int64) * N
        tl.store(base, m, mask=row_in)
        tl.store(base + plane, rest, mask=row_in)
        tl.store(base + 2 * plane, s1, mask=row_in)
        tl.store(base + 3 * plane, z_y, mask=row_in)
        if EXTRAS:
            tl.store(base + 4 * plane, rest2, mask=row_in)
            tl.store(base + 5 * plane, zsum, mask=row_in)
            tl.store(base + 6 * plane, hit, mask=row_in)
    else:
        _fwd_finish(rows, row_in, live, m, rest, s1, z_y, rest2, zsum, hit, V, logp_ptr,
                    ent_ptr, stats_ptr, extra_ptr, WITH_ENTROPY, EXTRAS, IS_FP64, CDT)


@triton.jit
def _fwd_merge_kernel(part_ptr, tok_ptr, logp_ptr, ent_ptr, stats_ptr, extra_ptr, N, V,
                      splits, ignore_index, WITH_ENTROPY: tl.constexpr, EXTRAS: tl.constexpr,
                      IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK: tl.constexpr):
    """Merge the per-split ``(m_s, rest_s, S1_s, z_y_s)`` of ``BLOCK`` rows, splits in order
    (deterministic): ``M = max m_s``; the owner is the first split at ``M`` (its arg-max is
    the column left out of ``REST``); ``REST = rest_owner + sum_others e_s (1 + rest_s)``,
    ``S1 = sum_s e_s (S1_s + (m_s - M)(1 + rest_s))`` with ``e_s = exp(m_s - M)``, splits of
    only ``-inf`` adding 0; ``z_y = sum_s z_y_s`` (one split holds the token). ``EXTRAS``:
    ``REST2`` as ``REST`` with ``e_s^2`` and ``rest2_s``, ``zsum = sum_s zsum_s`` and ``hit``
    the owner's (the row's first arg-max is its owner's first arg-max)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < N
    r64 = rows.to(tl.int64)
    tok = tl.load(tok_ptr + r64, mask=row_in, other=ignore_index)
    live = row_in & (tok != ignore_index)
    n64 = tl.zeros([BLOCK], tl.int64) + N  # 64-bit offsets: splits * N may pass 2**31
    plane = n64 * splits
    big_m = tl.full([BLOCK], float("-inf"), CDT)
    owner = tl.zeros([BLOCK], tl.int32)
    for sid in range(0, splits):
        m_s = tl.load(part_ptr + sid * n64 + r64, mask=row_in, other=float("-inf"))
        owner = tl.where(m_s > big_m, sid, owner)
        big_m = tl.maximum(big_m, m_s)
    shift = tl.where(big_m == float("-inf"), 0.0, big_m)
    rest = tl.zeros([BLOCK], CDT)
    s1 = tl.zeros([BLOCK], CDT)
    z_y = tl.zeros([BLOCK], CDT)
    rest2 = tl.zeros([BLOCK], CDT)
    zsum = tl.zeros([BLOCK], CDT)
    hit = tl.zeros([BLOCK], CDT)
    for sid in range(0, splits):
        base = part_ptr + sid * n64 + r64
        m_s = tl.load(base, mask=row_in, other=float("-inf"))
        rest_s = tl.load(base + plane, mask=row_in, other=0.0)
        ok = m_s != float("-inf")
        d = tl.where(ok, m_s - shift, 0.0)
        e = tl.where(ok, tl.exp(d), 0.0)
        rest += tl.where(owner == sid, rest_s, e * (1.0 + rest_s))
        if WITH_ENTROPY:
            s1 += e * (tl.load(base + 2 * plane, mask=row_in, other=0.0) + d * (1.0 + rest_s))
        z_y += tl.load(base + 3 * plane, mask=row_in, other=0.0)
        if EXTRAS:
            rest2_s = tl.load(base + 4 * plane, mask=row_in, other=0.0)
            rest2 += tl.where(owner == sid, rest2_s, e * e * (1.0 + rest2_s))
            zsum += tl.load(base + 5 * plane, mask=row_in, other=0.0)
            hit = tl.where(owner == sid, tl.load(base + 6 * plane, mask=row_in, other=0.0), hit)
    _fwd_finish(rows, row_in, live, big_m, rest, s1, z_y, rest2, zsum, hit, V, logp_ptr,
                ent_ptr, stats_ptr, extra_ptr, WITH_ENTROPY, EXTRAS, IS_FP64, CDT)


@triton.jit
def _grouped(pid, n_a, n_b, GROUP: tl.constexpr):
    """Tile ``(i, j)`` of program ``pid`` in an ``n_a x n_b`` grid, walked ``GROUP`` tiles of
    ``i`` at a time so that programs running together share operand tiles in L2."""
    width = GROUP * n_b
    first = (pid // width) * GROUP
    size = tl.minimum(n_a - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.jit
def _dz_kernel(glp_ptr, gh_ptr, h_ptr, stride_h, w_ptr, stride_w, b_ptr, tok_ptr,
               stats_ptr, stride_s0, stride_s1, dz_ptr, stride_dz, dbp_ptr, stride_dbp,
               N, H, v0, cnt, inv_t_hi, inv_t_lo, ignore_index,
               s_hi, s_lo, c_hi, c_lo, ic_hi, ic_lo, MAP: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr,
               UPCAST: tl.constexpr, IS_FP64: tl.constexpr, CDT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
               GROUP: tl.constexpr, ROUND: tl.constexpr = 0, DOT_PREC: tl.constexpr = "ieee",
               FROM_LOGITS: tl.constexpr = False):
    """``dz[:, j] = d z[:, v0 + j]`` for ``j < cnt`` (one ``[BLOCK_N, BLOCK_V]`` tile per
    program, stored in ``dz``'s dtype) and, with a bias, this row block's fp32 column sums of
    ``d z`` into row ``pid_n`` of ``dbp``. Padding rows get exact zeros. With a pre-softmax
    map (``MAP``, :func:`_head_map`) ``d z`` here is the gradient w.r.t. ``y``: times
    ``f'(y)``. A block of padding rows only: no dot (``H`` taken as 0), zeros stored.
    ``FROM_LOGITS`` (the cuBLAS path): ``h_ptr`` / ``stride_h`` is ``y [N, cnt]``, the logits
    ``h @ W[v0 : v0 + cnt]^T + b`` already formed (bias included; ``HAS_BIAS`` then only asks
    for the column sums), read instead of the GEMM."""
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(cnt, BLOCK_V),
                            GROUP)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = local < cnt
    cols = v0 + local
    tok, live, m, log_s, sum_pzs, g_lp, g_h = _row_grad_inputs(
        glp_ptr, gh_ptr, tok_ptr, stats_ptr, stride_s0, stride_s1, rows, row_in, ignore_index,
        inv_t_hi, inv_t_lo, HAS_GLP, HAS_GH, IS_FP64, CDT)
    fm = (s_hi, s_lo, c_hi, c_lo, ic_hi, ic_lo)
    if FROM_LOGITS:
        y = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h + local.to(tl.int64)[None, :],
                    mask=live[:, None] & col_ok[None, :], other=0.0).to(CDT)
        _dz_part(y, local, v0, cnt, b_ptr, rows, row_in, tok, live, m, log_s, sum_pzs, g_lp,
                 g_h, dz_ptr, stride_dz, dbp_ptr, stride_dbp, pid_n, inv_t_hi, inv_t_lo, fm,
                 False, HAS_BIAS, MAP, HAS_GLP, HAS_GH, IS_FP64)
    else:
        h_end = tl.where(tl.max(live.to(tl.int32), 0) > 0, H, 0)
        acc = _dot_tile(h_ptr, stride_h, w_ptr, stride_w, rows, live, cols, col_ok, h_end,
                        UPCAST, CDT, BLOCK_N, BLOCK_V, BLOCK_H, ROUND, DOT_PREC)
        # the epilogue on two column halves (a relabelling of the accumulator's registers, as
        # in _fwd_kernel): half the live registers, so that the soft cap's map fits at 128 x
        # 128 (the whole tile spilled 384 B there)
        HALF: tl.constexpr = BLOCK_V // 2
        y_a, y_b = tl.split(tl.permute(tl.reshape(acc, [BLOCK_N, 2, HALF]), (0, 2, 1)))
        half = tl.arange(0, HALF)
        l_a = pid_v * BLOCK_V + half
        _dz_part(y_a, l_a, v0, cnt, b_ptr, rows, row_in, tok, live, m, log_s, sum_pzs, g_lp,
                 g_h, dz_ptr, stride_dz, dbp_ptr, stride_dbp, pid_n, inv_t_hi, inv_t_lo, fm,
                 HAS_BIAS, HAS_BIAS, MAP, HAS_GLP, HAS_GH, IS_FP64)
        _dz_part(y_b, l_a + HALF, v0, cnt, b_ptr, rows, row_in, tok, live, m, log_s, sum_pzs,
                 g_lp, g_h, dz_ptr, stride_dz, dbp_ptr, stride_dbp, pid_n, inv_t_hi, inv_t_lo,
                 fm, HAS_BIAS, HAS_BIAS, MAP, HAS_GLP, HAS_GH, IS_FP64)


@triton.jit
def _dz_part(y, local, v0, cnt, b_ptr, rows, row_in, tok, live, m, log_s, sum_pzs, g_lp, g_h,
             dz_ptr, stride_dz, dbp_ptr, stride_dbp, pid_n, inv_t_hi, inv_t_lo, fm,
             ADD_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, MAP: tl.constexpr,
             HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr, IS_FP64: tl.constexpr):
    """``d z`` of the product columns ``local`` (slice-relative; ``y [BLOCK_N, len(local)]``,
    rows with ``live`` False already 0): bias added (``ADD_BIAS``), map, ``1/T``, columns at or
    past ``cnt`` ``-inf``, :func:`_dz_tile`, times ``f'(y)`` with a map; stored in ``dz``'s
    dtype, and with ``HAS_BIAS`` the block's column sums into row ``pid_n`` of ``dbp``."""
    col_ok = local < cnt
    cols = v0 + local
    if ADD_BIAS:
        y = y + tl.load(b_ptr + cols.to(tl.int64), mask=col_ok, other=0.0).to(y.dtype)[None, :]
    dfdy = y
    if MAP != 0:
        y, dfdy = _head_map(y, fm, MAP, IS_FP64)
    z = tl.where(col_ok[None, :], mul_hl(y, inv_t_hi, inv_t_lo, IS_FP64), float("-inf"))
    dz = _dz_tile(z, cols, col_ok, tok, live, m, log_s, sum_pzs, g_lp, g_h, HAS_GLP, HAS_GH,
                  IS_FP64)
    if MAP != 0:  # dz is 0 on padding rows and tail columns, f'(y) finite there
        dz = dz * dfdy
    l64 = local.to(tl.int64)
    tl.store(dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + l64[None, :],
             _store_value(dz, dz_ptr), mask=row_in[:, None] & col_ok[None, :])
    if HAS_BIAS:
        tl.store(dbp_ptr + pid_n.to(tl.int64) * stride_dbp + l64, tl.sum(dz, 0), mask=col_ok)


@triton.jit
def _gemm_kernel(a_ptr, stride_am, stride_ak, b_ptr, stride_bk, stride_bn, cin_ptr, c_ptr,
                 stride_c, tok_ptr, ignore_index, M, NC, K,
                 ACC_IN: tl.constexpr, SKIP_PADDING_K: tl.constexpr, CAST: tl.constexpr,
                 CDT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_NC: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP: tl.constexpr, SKIP_PADDING_M: tl.constexpr = False,
                 ROUND: tl.constexpr = 0, DOT_PREC: tl.constexpr = "ieee"):
    """``c = (cin if ACC_IN else 0) + a @ b`` for ``a [M, K]``, ``b [K, NC]`` (any strides),
    accumulated in ``CDT`` over ``K`` in ``BLOCK_K`` steps from 0 up (so splitting ``K`` at
    multiples of ``BLOCK_K`` across calls with ``ACC_IN`` gives the same bits), stored in
    ``c``'s dtype. ``SKIP_PADDING_K``: ``K`` indexes token rows, and the rows of ``b`` whose
    token is ``ignore_index`` are never read (read as 0: NaN hidden there is harmless).
    ``CAST``: both operands go to ``CDT`` before the dot (interpreter, fp16, mixed dtypes).
    ``SKIP_PADDING_M``: ``M`` indexes token rows whose ``a`` rows are 0 on padding; a block of
    padding rows only runs no K step (``c = cin``). ``ROUND`` / ``DOT_PREC``: as in
    :func:`_dot_tile`."""
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(NC, BLOCK_NC),
                            GROUP)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_NC + tl.arange(0, BLOCK_NC)).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < NC
    offs_k = tl.arange(0, BLOCK_K)
    c_offs = rm[:, None] * stride_c + rn[None, :]
    c_mask = m_ok[:, None] & n_ok[None, :]
    if ACC_IN:  # cin may be c itself: each program reads and writes only its own tile
        acc = tl.load(cin_ptr + c_offs, mask=c_mask, other=0.0).to(CDT)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_NC], CDT)
    k_end = K
    if SKIP_PADDING_M:
        tok_m = tl.load(tok_ptr + rm, mask=m_ok, other=ignore_index)
        k_end = tl.where(tl.max((tok_m != ignore_index).to(tl.int32), 0) > 0, K, 0)
    for k in range(0, k_end, BLOCK_K):
        ks = (k + offs_k).to(tl.int64)
        k_ok = ks < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & n_ok[None, :]
        if SKIP_PADDING_K:
            tok = tl.load(tok_ptr + ks, mask=k_ok, other=ignore_index)
            b_mask = b_mask & (tok != ignore_index)[:, None]
        b = tl.load(b_ptr + ks[:, None] * stride_bk + rn[None, :] * stride_bn, mask=b_mask,
                    other=0.0)
        if ROUND == 1:
            a = _to_bf16(a)
            b = _to_bf16(b)
        if ROUND == 2:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if CAST:
            a = a.to(CDT)
            b = b.to(CDT)
        acc = _mma(a, b, acc, DOT_PREC, CDT)
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


# ================================================================================== launchers

def _blocks(hidden: Tensor, vocab: int, dim: int, dz: bool = False,
            prec: Optional["_Prec"] = None, extras: bool = False
            ) -> Tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_V, BLOCK_H, num_warps)`` of the forward (``dz``: of
    :func:`_dz_kernel`): from H, V, the dtype, the head precision ``prec``, ``extras`` and the
    device only, never from N (batch invariance). ``tl.dot`` needs every block >= 16.

    On sm_90a (``tests/triton/linear_sm90_check.py``, ptxas / cuobjdump of the compiled
    kernels, every configuration the launchers pick) the forward and :func:`_dz_kernel` take
    128 x 128 tiles on 8 warps for every dtype, head precision, bias, entropy gradient, map and
    ``EXTRAS`` (``dz`` and ``extras`` no longer change the tiles): two warpgroups stacked along
    the rows (layout ``[8, 1]``: each row's reductions stay inside a warp), each issuing
    ``HGMMA.64x128x16`` (``64x128x8`` for TF32 and 3xTF32 operands), no spill. What makes the
    epilogues fit next to a 128-wide accumulator: the forward folds each tile in two 64-column
    halves (four 32-column quarters with ``EXTRAS`` or the soft cap, :func:`_fold_quarters`),
    ``_dz_kernel`` forms ``d z`` per half (:func:`_dz_part`); whole-tile epilogues spilled
    (255 registers + 20 B forward, + 384 B ``d z`` with the soft cap). ``H`` chunks: 64 for
    bf16 / fp16 operands, 32 for operands rounded to bf16 in registers (fp16 / fp32 inputs on
    a ``"bf16"`` head; 64 spilled 12 B) and for TF32, 16 for fp32 "tf32x3" dots (32 spilled
    8 B in the forward with the entropy)."""
    def fit(n: int, cap: int) -> int:
        return max(16, min(triton.next_power_of_2(max(n, 1)), cap))

    if not hidden.is_cuda:  # the interpreter: small tiles, few Python-level steps
        return 16, fit(vocab, 64), fit(dim, 64), 4
    if hidden.dtype == torch.float64:
        return 32, fit(vocab, 64), fit(dim, 32), 4
    # free of register spills (tests/triton/test_linear_sm90.py; tuning: benchmarks/NOTES.md)
    rounds = prec is not None and prec.round != 0  # operands rounded in registers
    if hidden.dtype == torch.float32:  # bf16-rounded, TF32 or 3xTF32 tensor cores
        x3 = prec is not None and prec.fwd_dot == "tf32x3"
        return 128, fit(vocab, 128), fit(dim, 16 if x3 else 32), 8
    # 16-bit inputs; rounded operands (fp16 on a bf16 head) take H chunks of 32 like fp32
    # (64 spills 12 B in the forward with a bias and the entropy)
    return 128, fit(vocab, 128), fit(dim, 32 if rounds else 64), 8


def _fold_quarters(extras: bool, mode: int) -> bool:
    """:func:`_fwd_kernel` folds each tile in quarters instead of halves with the ``EXTRAS``
    statistics or the soft cap (``MAP`` 2): their epilogue spilled on halves at 128 x 128
    (8-44 B, 255 registers; ``tests/triton/linear_sm90_check.py``)."""
    return bool(extras) or mode == 2


def _upcast(h: Tensor, prec: _Prec) -> bool:
    """Operands go to the compute dtype before ``tl.dot``: always in the interpreter (numpy
    dots), and for fp64 inputs whose operands were rounded to bf16 / fp32."""
    return (not h.is_cuda) or (prec.round != 0 and h.dtype == torch.float64)


def _prep(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    h = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    return h, w, b


def _rstride(x: Tensor) -> int:
    return x.stride(0) if x.shape[0] > 1 else x.shape[1]


# the forward splits the vocabulary into pieces of this many columns (GPU): with V=151936 ten
# programs per row block, so that a few thousand rows already fill the GPU; a function of V
# only, never of N (batch invariance)
_SPLIT_COLS = 16384


HEAD_PRECISIONS = _head.HEAD_PRECISIONS
# how a head precision reaches the kernels: ROUND (operands rounded to bf16: 1, to fp32: 2,
# kept: 0), the forward dot's input_precision, the dtype d z is stored in (shared with the
# cuBLAS path, which reads only ROUND and the d z dtype)
_Prec = _head.Prec


def _head_precision(dtype: torch.dtype, head_precision: Optional[str]) -> _Prec:
    """``None``: the inputs' own precision (bf16 / fp16 operands as they are, fp32 operands
    as for ``"fp32"``, fp64 in fp64; ``d z`` in :func:`_dz_dtype`). ``"bf16"``: every GEMM
    operand (``hidden``, ``weight``, ``d z``) rounded to bf16. ``"tf32"``: fp32 operands on
    TF32 tensor cores (a no-op in the interpreter, whose dots are exact fp32: "tf32" = "fp32"
    on CPU). ``"fp32"``: fp32 operands; bf16 / fp16 inputs are exact in fp32, so their
    forward dot keeps its operands (exact products, fp32 accumulation) and only ``d z``
    changes (fp32 instead of bf16). Accumulation is fp32 (fp64 for fp64 inputs) always.

    Every dot of two fp32 operands (fp32 inputs with ``None`` / ``"fp32"``; the backward
    GEMMs of ``d z`` in fp32 against bf16 / fp16 operands converted to fp32) runs as
    ``tl.dot(..., input_precision="tf32x3")`` on a GPU: three TF32 wgmmas (tensor cores, not
    the FMA units). Error model: each operand ``x = x_hi + x_lo + d`` with ``x_hi =
    tf32(x)``, ``x_lo = tf32(x - x_hi)``, ``|d| <= 2^-22 |x|`` (TF32 keeps 11 significant
    bits); ``a b`` is formed as ``a_hi b_hi + a_hi b_lo + a_lo b_hi``, each product exact in
    fp32, dropping ``a_lo b_lo`` and the two ``d`` terms: ``|error| <= 3 * 2^-22 |a b|``
    (~7e-7, vs 2^-24 = 6e-8 for an fp32 FMA), summed in fp32 on the tensor cores. Over ``H``
    products that adds at most ``7e-7 sum_k |h_k w_k|`` to a logit, below fp32
    accumulation's own ``H 2^-24 sum_k |h_k w_k|`` bound at ``H >= 12``: fp32-level accuracy
    (SPEC 5's 1e-5 against fp64). bf16 / fp16 operands converted to fp32 have ``x_lo = 0``
    (exact in TF32). The interpreter runs "ieee" dots instead (:func:`_dot_prec`), so the
    ops' CPU tests against fp64 cannot tell "tf32x3" from "ieee";
    ``tests/triton/test_linear_tf32x3.py`` checks :func:`_mma` itself against the model."""
    fp32_dot = "tf32x3" if dtype == torch.float32 else "ieee"  # fp32 operands' dot
    if head_precision is None:
        return _Prec(0, fp32_dot, _dz_dtype(dtype))
    if head_precision not in HEAD_PRECISIONS:
        raise ValueError(f"head_precision: expected None or one of {HEAD_PRECISIONS}, got "
                         f"{head_precision!r}")
    if head_precision == "bf16":
        return _Prec(0 if dtype == torch.bfloat16 else 1, "ieee", torch.bfloat16)
    fwd_dot = "tf32" if head_precision == "tf32" and dtype == torch.float32 else fp32_dot
    return _Prec(2 if dtype == torch.float64 else 0, fwd_dot, torch.float32)


def _map_args(logit_scale: float, softcap: Optional[float]):
    """``(MAP, (s_hi, s_lo, c_hi, c_lo, 1/c hi, 1/c lo))`` of :func:`_head_map`: ``MAP`` 0 (no
    map: the default path compiles without it), 1 (scale) or 2 (scale and soft cap). The
    values are runtime arguments (no recompilation per value)."""
    mode = 0 if softcap is None and logit_scale == 1.0 else (1 if softcap is None else 2)
    cap = 1.0 if softcap is None else float(softcap)
    return mode, (*split(float(logit_scale)), *split(cap), *split(1.0 / cap))


def linear_token_stats_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                               tokens: Tensor, temperature: float, ignore_index: int,
                               with_entropy: bool, logit_scale: float, softcap: Optional[float],
                               extras: bool, *, blocks: Optional[Tuple] = None,
                               split_cols: Optional[int] = None
                               ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_forward` with ``extra`` all zeros unless ``extras`` (a custom op's outputs are
    distinct tensors)."""
    logp, ent, stats, extra = _forward(hidden, weight, bias, tokens, temperature, ignore_index,
                                       with_entropy, logit_scale, softcap, extras, blocks,
                                       split_cols)
    return logp, ent, stats, torch.zeros_like(stats) if extra is None else extra


def _forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
             temperature: float, ignore_index: int, with_entropy: bool, logit_scale: float,
             softcap: Optional[float], extras: bool, blocks: Optional[Tuple],
             split_cols: Optional[int], head_precision: Optional[str] = None
             ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(logp [N], entropy [N], stats [N, 3], extra [N, 3])`` of ``f(hidden @ weight^T +
    bias) / T``, like :func:`rlkernels.reference.linear.linear_token_stats_forward` (fp32;
    fp64 for fp64 inputs; ``f`` is :func:`_head_map`; ``extra`` is ``None`` unless ``extras``).
    Padding rows: 0 outputs and 0 stats. ``blocks=(BLOCK_N, BLOCK_V, BLOCK_H)`` overrides the
    block sizes and ``split_cols`` the vocabulary split (tests; rounded up to a multiple of
    ``BLOCK_V``). With more than one split, each (row block, split) program writes its
    running statistics to an fp32 ``[4, splits, N]`` buffer (``[7, ...]`` with ``extras``)
    that :func:`_fwd_merge_kernel` merges. ``head_precision``: :func:`_head_precision`."""
    n, dim = hidden.shape
    prec = _head_precision(hidden.dtype, head_precision)
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    logp = hidden.new_empty(n, dtype=cdt)
    ent = hidden.new_empty(n, dtype=cdt)
    stats = hidden.new_empty(n, 3, dtype=cdt)
    extra = hidden.new_empty(n, 3, dtype=cdt) if extras else None
    if n == 0:
        return logp, ent, stats, extra
    h, w, b = _prep(hidden, weight, bias)
    tok = tokens.contiguous()
    bn, bv, bh, warps = _blocks(hidden, vocab, dim, prec=prec, extras=extras)
    if blocks is not None:
        bn, bv, bh = blocks
    if split_cols is None:
        split_cols = _SPLIT_COLS if hidden.is_cuda else vocab
    split_cols = triton.cdiv(max(1, min(split_cols, vocab)), bv) * bv
    splits = triton.cdiv(vocab, split_cols)
    part = (hidden.new_empty((7 if extras else 4, splits, n), dtype=cdt) if splits > 1
            else logp)
    hi, lo = split(1.0 / temperature)
    mode, fm = _map_args(logit_scale, softcap)
    flags = dict(WITH_ENTROPY=bool(with_entropy), EXTRAS=bool(extras),
                 IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt))
    with device_guard(h):
        _fwd_kernel[(triton.cdiv(n, bn) * splits,)](
            h, _rstride(h), w, _rstride(w), w if b is None else b, tok, logp, ent, stats,
            stats if extra is None else extra, part, n, vocab, dim, split_cols, splits, hi, lo,
            int(ignore_index), *fm,
            HAS_BIAS=b is not None, MAP=mode, UPCAST=_upcast(h, prec), SPLIT=splits > 1,
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, ROUND=prec.round,
            DOT_PREC=_dot_prec(prec.fwd_dot, h), INTERP=not h.is_cuda,
            QUARTERS=_fold_quarters(extras, mode), num_warps=warps, **flags)
        if splits > 1:
            block = 256 if h.is_cuda else 16
            _fwd_merge_kernel[(triton.cdiv(n, block),)](
                part, tok, logp, ent, stats, stats if extra is None else extra, n, vocab,
                splits, int(ignore_index),
                BLOCK=block, num_warps=4, **flags)
    return logp, ent, stats, extra


def linear_token_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  tokens: Tensor, temperature: float, ignore_index: int,
                                  with_entropy: bool, head_precision: Optional[str] = None,
                                  path: str = "auto", rows: Optional[Tensor] = None, *,
                                  blocks: Optional[Tuple] = None,
                                  split_cols: Optional[int] = None,
                                  chunk_rows: Optional[int] = None
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp [N], entropy [N], stats [N, 3])`` of ``(hidden @ weight^T + bias) / T``, like
    the reference (fp32; fp64 for fp64 inputs). ``head_precision``: :func:`_head_precision`.
    ``path`` (:func:`_resolve_path`): ``"triton"`` is :func:`linear_token_stats_forward`
    without a map or the extra statistics; ``"cublas"`` is :func:`_cublas_forward`
    (``chunk_rows`` overrides its row chunk). ``rows``: only those rows are computed, the
    others are padding (:mod:`rlkernels._rows`), on either path. ``hidden [..., H]`` and
    ``tokens [...]`` give outputs ``[...]`` (the ``[N, H]`` rows' call, viewed)."""
    if hidden.dim() != 2:
        return head_outputs(linear_token_logprobs_forward(
            as_rows(hidden), weight, bias, as_flat(tokens), temperature, ignore_index,
            with_entropy, head_precision, path, rows, blocks=blocks, split_cols=split_cols,
            chunk_rows=chunk_rows), hidden.shape[:-1])
    if rows is not None:
        _check_rows(rows, hidden)
        return _rows.forward(
            lambda h, tok: linear_token_logprobs_forward(
                h, weight, bias, tok, temperature, ignore_index, with_entropy, head_precision,
                path, blocks=blocks, split_cols=split_cols, chunk_rows=chunk_rows),
            rows, hidden, tokens)
    if _resolve_path(path, hidden) == "cublas":
        return _cublas_forward(hidden, weight, bias, tokens, temperature, ignore_index,
                               with_entropy, head_precision, chunk_rows)
    return _forward(hidden, weight, bias, tokens, temperature, ignore_index, with_entropy, 1.0,
                    None, False, blocks, split_cols, head_precision)[:3]


_dz_dtype = _head.dz_dtype


def _gemm_blocks(hidden: Tensor, cast: bool) -> Tuple[int, int, int, int, int]:
    """``(BLOCK_M, BLOCK_NC, BLOCK_K, num_warps, num_stages)`` of the two backward GEMMs; from
    the dtype, the head precision's operand conversions (``cast``) and the device only (batch
    invariance)."""
    if not hidden.is_cuda:  # the interpreter: several tiles with tails at the tests' shapes
        return 16, 16, 16, 4, 1
    if hidden.dtype == torch.float64:
        return 32, 32, 16, 4, 2
    # free of spills in benchmarks/sm90_compile.py (tuning: benchmarks/NOTES.md)
    if hidden.dtype == torch.bfloat16 and not cast:  # bf16 tensor cores
        return 128, 128, 64, 8, 3
    return 128, 128, 32, 8, 3


def _bwd_gemms(dz: Tensor, cnt: int, w_slice: Tensor, h: Tensor, tok: Tensor,
               ignore_index: int, dh_in: Optional[Tensor], dh_out: Tensor, dw_out: Tensor,
               gb: Tuple[int, int, int, int, int], kmeta: dict) -> None:
    """``dh_out = (dh_in or 0) + dz[:, :cnt] @ w_slice`` and ``dw_out = dz[:, :cnt]^T @ h``
    (padding rows of ``h`` never read; row blocks of padding only run no K step), with
    :func:`_gemm_kernel` (``kmeta``: its ``CAST`` / ``ROUND`` / ``DOT_PREC``)."""
    n, dim = h.shape
    bm, bnc, bk, warps, stages = gb
    cdt = compute_dtype(h.dtype)
    meta = dict(CDT=tl_compute_dtype(cdt), BLOCK_M=bm, BLOCK_NC=bnc, BLOCK_K=bk,
                GROUP=8, num_warps=warps, num_stages=stages, **kmeta)
    cols_h = triton.cdiv(dim, bnc)
    _gemm_kernel[(triton.cdiv(n, bm) * cols_h,)](
        dz, dz.stride(0), 1, w_slice, _rstride(w_slice), 1,
        dh_out if dh_in is None else dh_in, dh_out, dim, tok, int(ignore_index), n, dim, cnt,
        ACC_IN=dh_in is not None, SKIP_PADDING_K=False, SKIP_PADDING_M=True, **meta)
    _gemm_kernel[(triton.cdiv(cnt, bm) * cols_h,)](
        dz, 1, dz.stride(0), h, _rstride(h), 1, dw_out, dw_out, dim, tok, int(ignore_index),
        cnt, dim, n, ACC_IN=False, SKIP_PADDING_K=True, **meta)


def _gemm_kmeta(h: Tensor, dzt: torch.dtype, prec: _Prec, head_precision: Optional[str]):
    """``CAST`` / ``ROUND`` / ``DOT_PREC`` of the backward GEMMs for ``d z`` in ``dzt``."""
    fp64 = h.dtype == torch.float64
    both_bf16 = prec.round == 1 or (dzt == h.dtype == torch.bfloat16)
    cast = (not h.is_cuda) or fp64 or (not both_bf16 and dzt != h.dtype)
    fp32_dot = not fp64 and not both_bf16
    dot = ("tf32" if head_precision == "tf32" else "tf32x3") if fp32_dot else "ieee"
    return dict(CAST=cast, ROUND=prec.round, DOT_PREC=_dot_prec(dot, h))


def _dot_prec(dot: str, h: Tensor) -> str:
    """The kernels' ``DOT_PREC``: ``"tf32x3"`` (:func:`_mma`) on a GPU only. The interpreter
    takes ``"ieee"`` (one exact fp32 numpy dot): its three split dots made a row's bits
    depend on its position in the row block (numpy's BLAS rounds rows unlike by position),
    breaking the CPU batch-invariance test; so the CPU tests cannot see the split's error."""
    return "ieee" if dot == "tf32x3" and not h.is_cuda else dot


# d z is materialized one vocabulary slice [N, span] at a time, at most this many bytes
_DZ_BYTES = _head.DZ_BYTES


def linear_token_logprobs_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                                   hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   tokens: Tensor, stats: Tensor, temperature: float,
                                   ignore_index: int, head_precision: Optional[str] = None,
                                   path: str = "auto", rows: Optional[Tensor] = None, *,
                                   blocks: Optional[Tuple] = None,
                                   dz_bytes: int = _DZ_BYTES, logit_scale: float = 1.0,
                                   softcap: Optional[float] = None,
                                   chunk_rows: Optional[int] = None,
                                   slice_cols: Optional[int] = None
                                   ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(d hidden, d weight, d bias or None)``, each in the dtype of its input, accumulated in
    fp32 (fp64 for fp64) without atomics. ``logit_scale`` / ``softcap``: the pre-softmax map
    of :func:`_head_map` (``d y = d z f'(y)``, formed in :func:`_dz_kernel`). ``path``
    ``"cublas"``: :func:`_cublas_backward` (``chunk_rows``, ``slice_cols``, ``rows``: its
    options); ``"triton"``:

    Per vocabulary slice of ``span`` columns (a multiple of every K block, sized so that the
    slice of ``d z`` takes at most ``dz_bytes``): :func:`_dz_kernel` writes ``d z [N, span]``
    (in :func:`_dz_dtype`, or the head precision's), then ``d hidden += d z @ W[slice]`` (an
    fp32 ``[N, H]`` accumulator across slices; the last slice writes ``grad_hidden`` in its
    dtype) and ``d weight[slice] = d z^T @ hidden`` (complete over all rows in one GEMM,
    written in the weight's dtype: no ``[V, H]`` fp32 buffer). ``d bias`` sums fp32
    per-row-block partials. Peak extra memory at N=16384, H=3584, V=151936 bf16: 256 MiB of
    ``d z`` + 224 MiB of ``d hidden`` accumulator + 8 MiB of bias partials. ``hidden [...,
    H]`` (tokens, upstream gradients ``[...]``, stats ``[..., 3]``): the ``[N, H]`` rows'
    call, ``d hidden`` in hidden's shape."""
    if hidden.dim() != 2:
        gh, gw, gb = linear_token_logprobs_backward(
            as_flat(grad_logp), as_flat(grad_entropy), as_rows(hidden), weight, bias,
            as_flat(tokens), as_rows(stats), temperature, ignore_index, head_precision, path,
            rows, blocks=blocks, dz_bytes=dz_bytes, logit_scale=logit_scale, softcap=softcap,
            chunk_rows=chunk_rows, slice_cols=slice_cols)
        return grad_in_shape(gh, hidden.shape), gw, gb
    if rows is not None:
        _check_rows(rows, hidden)
        return _rows.backward(
            lambda glp, gh, h, tok, st: linear_token_logprobs_backward(
                glp, gh, h, weight, bias, tok, st, temperature, ignore_index, head_precision,
                path, blocks=blocks, dz_bytes=dz_bytes, logit_scale=logit_scale,
                softcap=softcap, chunk_rows=chunk_rows, slice_cols=slice_cols),
            rows, grad_logp, grad_entropy, hidden, tokens, stats)
    if _resolve_path(path, hidden) == "cublas" and logit_scale == 1.0 and softcap is None:
        return _cublas_backward(grad_logp, grad_entropy, hidden, weight, bias, tokens, stats,
                                temperature, ignore_index, head_precision, chunk_rows,
                                slice_cols, dz_bytes)
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    prec = _head_precision(hidden.dtype, head_precision)
    has_glp = grad_logp is not None
    has_gh = grad_entropy is not None
    if n == 0 or not (has_glp or has_gh):
        return (torch.zeros_like(hidden), torch.zeros_like(weight),
                None if bias is None else torch.zeros_like(bias))
    h, w, b = _prep(hidden, weight, bias)
    tok = tokens.contiguous()
    glp = grad_logp.contiguous() if has_glp else stats
    gh = grad_entropy.contiguous() if has_gh else stats
    bn, bv, bh, warps = _blocks(hidden, vocab, dim, dz=True, prec=prec)
    if blocks is not None:
        bn, bv, bh = blocks
    dzt = prec.dz_dtype
    kmeta = _gemm_kmeta(h, dzt, prec, head_precision)
    gb = _gemm_blocks(hidden, kmeta["CAST"] and h.is_cuda)
    hi, lo = split(1.0 / temperature)
    mode, fm = _map_args(logit_scale, softcap)
    # slices split K of the d hidden GEMM at multiples of its BLOCK_K: same bits for any span
    step = max(bv, gb[2])
    span = max(step, dz_bytes // (dzt.itemsize * n) // step * step)
    span = min(span, triton.cdiv(vocab, step) * step)
    n_slices = triton.cdiv(vocab, span)
    row_blocks = triton.cdiv(n, bn)
    dz = torch.empty((n, span), dtype=dzt, device=hidden.device)
    dbp = (torch.empty((row_blocks, span), dtype=cdt, device=hidden.device)
           if b is not None else None)
    grad_h = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
    grad_b = None if b is None else torch.empty(vocab, dtype=cdt, device=weight.device)
    # d hidden accumulates in grad_h itself for fp32 / fp64, else in an fp32 buffer
    dh_acc = grad_h if (hidden.dtype == cdt or n_slices == 1) else torch.empty(
        (n, dim), dtype=cdt, device=hidden.device)
    meta = dict(HAS_BIAS=b is not None, HAS_GLP=has_glp, HAS_GH=has_gh,
                UPCAST=_upcast(h, prec), IS_FP64=cdt == torch.float64,
                CDT=tl_compute_dtype(cdt), BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, GROUP=8,
                ROUND=prec.round, DOT_PREC=_dot_prec(prec.fwd_dot, h), num_warps=warps)
    with device_guard(h):
        for i, v0 in enumerate(range(0, vocab, span)):
            cnt = min(span, vocab - v0)
            _dz_kernel[(row_blocks * triton.cdiv(cnt, bv),)](
                glp, gh, h, _rstride(h), w, _rstride(w), w if b is None else b, tok,
                stats, stats.stride(0), stats.stride(1), dz, span,
                dz if dbp is None else dbp, span, n, dim, v0, cnt, hi, lo, int(ignore_index),
                *fm, MAP=mode, **meta)
            if dim > 0:
                dh_out = grad_h if i == n_slices - 1 else dh_acc
                _bwd_gemms(dz, cnt, w[v0:v0 + cnt], h, tok, ignore_index,
                           None if i == 0 else dh_acc, dh_out, grad_w[v0:v0 + cnt], gb, kmeta)
            if grad_b is not None:
                torch.sum(dbp[:, :cnt], 0, out=grad_b[v0:v0 + cnt])
    return (grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype))


def linear_token_stats_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                                hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                tokens: Tensor, stats: Tensor, temperature: float,
                                ignore_index: int, logit_scale: float, softcap: Optional[float],
                                **kw) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The backward of :func:`linear_token_stats_forward` (the triton path):
    :func:`linear_token_logprobs_backward` through the map (``kw``: its test options)."""
    return linear_token_logprobs_backward(grad_logp, grad_entropy, hidden, weight, bias, tokens,
                                          stats, temperature, ignore_index, None, "triton",
                                          logit_scale=logit_scale, softcap=softcap, **kw)


# ====================================================================== the cuBLAS path

PATHS = ("auto", "triton", "cublas")


def _resolve_path(path: str, hidden: Tensor) -> str:
    """``"auto"``: ``"cublas"`` on CUDA tensors (its GEMMs are the ones known to run near the
    tensor-core rate; the two paths compared: benchmarks/NOTES.md), ``"triton"``
    elsewhere (the interpreter)."""
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if path == "auto":
        # (is_available: benchmarks/sm90_compile.py captures launches on meta tensors posing
        # as CUDA ones on a machine without CUDA; it compiles the triton path's kernels)
        return "cublas" if hidden.is_cuda and torch.cuda.is_available() else "triton"
    return path


# the cuBLAS path's chunk plumbing (chunk size, TF32 context, GEMM helper, operand rounding)
# is backend-neutral: rlkernels/_cublas_head.py, shared with the cuda backend
_CHUNK_ALIGN = _head.CHUNK_ALIGN
_MAX_CHUNK = _head.MAX_CHUNK
_chunk_rows = _head.chunk_rows
_tf32 = _head.tf32
_mm = _head.mm
_round_operand = _head.round_operand


def _cublas_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                    temperature: float, ignore_index: int, with_entropy: bool,
                    head_precision: Optional[str], chunk_rows: Optional[int]
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward with the GEMM through ``torch.mm`` (cuBLAS on a GPU):
    :func:`rlkernels._cublas_head.token_forward` (fixed-size zero-padded row chunks: batch
    invariant by construction) with :func:`rlkernels.triton.vocab.token_logprobs_forward` on
    each chunk of logits."""
    from . import vocab as _vocab  # the vocabulary kernels run on each chunk of logits

    return _head.token_forward(hidden, weight, bias, tokens, temperature, ignore_index,
                               with_entropy, head_precision, chunk_rows,
                               vocab_forward=_vocab.token_logprobs_forward)


def _check_rows(rows: Tensor, hidden: Tensor) -> None:
    if not isinstance(rows, Tensor) or rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"rows: expected a 1-d int64 tensor of row indices, got "
                         f"{rows.dtype if isinstance(rows, Tensor) else type(rows).__name__} "
                         f"{tuple(rows.shape) if isinstance(rows, Tensor) else ''}")
    if rows.device != hidden.device:
        raise ValueError(f"rows: expected a tensor on {hidden.device} (hidden's device), got "
                         f"{rows.device}")


def _cublas_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                     hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                     stats: Tensor, temperature: float, ignore_index: int,
                     head_precision: Optional[str], chunk_rows: Optional[int],
                     slice_cols: Optional[int], dz_bytes: int
                     ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """The backward with its three GEMMs through ``torch.mm`` (cuBLAS on a GPU):
    :func:`rlkernels._cublas_head.token_backward` (vocabulary slices, row groups, fixed-size
    chunks; its docstring states the memory) with :func:`_dz_kernel` (``FROM_LOGITS``)
    forming ``d z`` of each chunk's slice in the head precision's dtype."""
    # (the tile and warps from hidden's device, not the chunk buffers': sm90_compile poses
    # its inputs as CUDA tensors, and the buffers the loops allocate are not)
    bn, bv, warps = (16, 16, 4) if not hidden.is_cuda else (64, 128, 8)
    fm = _map_args(1.0, None)[1]

    def dz_slice(y, glp, gh, tok, st, dz, dbp, n_live, v0, temp, ignore):
        if n_live == 0:
            return
        hi, lo = split(1.0 / temp)
        cdt = y.dtype
        cnt = y.shape[1]
        _dz_kernel[(triton.cdiv(n_live, bn) * triton.cdiv(cnt, bv),)](
            st if glp is None else glp, st if gh is None else gh, y, y.stride(0), y, 0, y,
            tok, st, st.stride(0), st.stride(1), dz, dz.stride(0),
            dz if dbp is None else dbp, 0 if dbp is None else dbp.stride(0), n_live, 0, v0,
            cnt, hi, lo, int(ignore), *fm, MAP=0, HAS_BIAS=dbp is not None,
            HAS_GLP=glp is not None, HAS_GH=gh is not None, UPCAST=False,
            IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt), BLOCK_N=bn, BLOCK_V=bv,
            BLOCK_H=16, GROUP=8, FROM_LOGITS=True, num_warps=warps)

    with device_guard(hidden):
        return _head.token_backward(grad_logp, grad_entropy, hidden, weight, bias, tokens,
                                    stats, temperature, ignore_index, head_precision,
                                    chunk_rows, slice_cols, dz_bytes, dz_kernel=dz_slice,
                                    dz_block_rows=bn)


# =========================================================================== linear_grpo_loss

def linear_grpo_loss_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                             tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                             mask: Tensor, normalizer: Optional[Tensor],
                             ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                             temperature: float, o: PolicyOptions,
                             head_precision: Optional[str] = None, path: str = "auto",
                             rows: Optional[Tensor] = None):
    """``(loss, metrics, logp [B, T], entropy [B, T], stats [B*T, 3])``: the fused lm_head
    forward (log-probs and entropies) then the policy kernel."""
    return fused_forward(
        lambda tok: linear_token_logprobs_forward(hidden, weight, bias, tok, temperature, -100,
                                                  True, head_precision, path, rows=rows),
        policy_loss_forward, tokens, old_logp, advantages, mask, normalizer, ref_logp,
        is_weights, o)


def linear_grpo_loss_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor,
                              bias: Optional[Tensor], tokens: Tensor, old_logp: Tensor,
                              advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                              ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                              logp: Tensor, ent: Tensor, stats: Tensor, temperature: float,
                              o: PolicyOptions, head_precision: Optional[str] = None,
                              path: str = "auto", rows: Optional[Tensor] = None):
    """``(d hidden, d weight, d bias or None)``: the policy kernel's gradients w.r.t. the
    log-probs (and entropies when ``entropy_coef != 0``) through the lm_head backward."""
    g_lp, g_ent = row_grads(policy_loss_backward, grad_loss, logp, ent, old_logp,
                            advantages, mask, normalizer, ref_logp, is_weights, o)
    return linear_token_logprobs_backward(g_lp, g_ent, hidden, weight, bias,
                                          tokens.reshape(-1), stats, temperature, -100,
                                          head_precision, path, rows=rows)


# ===================================================================== linear_sparse_logprobs

def linear_sparse_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   indices: Tensor, temperature: float, normalize: str,
                                   with_tail: bool, offsets: Optional[Tensor] = None, *,
                                   chunk_rows: Optional[int] = None
                                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp [N, K], tail [N], stats [N, 3])`` of ``sparse_logprobs`` on the logits
    ``hidden @ weight^T + bias``: per chunk of rows (fp32 ``[C, V]`` logits, <= 512 MiB,
    :func:`rlkernels._cublas_head.logit_chunks`), the triton sparse kernels of
    :mod:`rlkernels.triton.sparse`.
    CSR (``offsets [N + 1]``, ``logp [nnz]``): a chunk of rows ``r0 .. r0 + cnt`` passes
    ``offsets[r0:r0 + cnt + 1]`` and the whole ``indices`` / ``logp`` (absolute positions:
    no host sync for the chunk's bounds); the tail's sorted ids are formed once for all rows."""
    from . import sparse as _sparse  # the sparse kernels run on each chunk of logits

    n = hidden.shape[0]
    cdt = compute_dtype(hidden.dtype)
    outs = (hidden.new_empty(indices.shape, dtype=cdt), hidden.new_empty(n, dtype=cdt),
            hidden.new_empty(n, 3, dtype=cdt))
    csr = offsets is not None
    if csr and with_tail and n:
        sid, words = _sparse._csr_lane_sorted_ids(indices, offsets, weight.shape[0],
                                                  _sparse._default_block_v_fwd(weight.shape[0]))
    for r0, cnt, _, y in _head.logit_chunks(hidden, weight, bias, chunk_rows):
        if csr:
            chunk = _sparse.sparse_logprobs_forward(
                y[:cnt], indices, temperature, normalize, with_tail, offsets[r0:r0 + cnt + 1],
                _out=outs[0], _prep=(sid, words[r0:r0 + cnt]) if with_tail else None)
        else:
            chunk = _sparse.sparse_logprobs_forward(y[:cnt], indices[r0:r0 + cnt],
                                                    temperature, normalize, with_tail)
        for out, value in zip(outs[csr:], chunk[csr:]):
            out[r0:r0 + cnt] = value
    return outs


def linear_sparse_logprobs_backward(grad_logp: Tensor, grad_tail: Optional[Tensor],
                                    hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                    indices: Tensor, logp: Tensor, tail: Tensor, stats: Tensor,
                                    temperature: float, normalize: str,
                                    offsets: Optional[Tensor] = None, *,
                                    chunk_rows: Optional[int] = None
                                    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(d hidden, d weight, d bias or None)``: per chunk, the logits again, ``d z`` from
    the triton sparse backward kernel (fp32 ``[C, V]``), then ``d hidden = d z W``, ``d W +=
    d z^T h``, ``d b += sum d z`` through ``torch.mm`` in fp32 (``d z`` is not rounded to the
    inputs' precision; every GEMM has the same shape whatever N). CSR: as the forward (the
    sorted ids formed once, a chunk passes its view of ``offsets``)."""
    from . import sparse as _sparse

    prep = None
    if offsets is not None and hidden.shape[0]:
        prep = _sparse._csr_sorted_segments(indices, offsets, weight.shape[0])

    n, dim = hidden.shape
    cdt = compute_dtype(hidden.dtype)
    grad_h = hidden.new_empty(n, dim, dtype=cdt)
    grad_w = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
    grad_b = None if bias is None else torch.zeros(weight.shape[0], dtype=cdt,
                                                   device=weight.device)
    dz = None
    for r0, cnt, hbuf, y in _head.logit_chunks(hidden, weight, bias, chunk_rows):
        rows = slice(r0, r0 + cnt)
        if dz is None:
            dz = torch.zeros_like(y)
        g_tail = None if grad_tail is None else grad_tail[rows]
        if prep is not None:
            dz[:cnt] = _sparse.sparse_logprobs_backward(
                grad_logp, g_tail, y[:cnt], indices, logp, tail[rows], stats[rows],
                temperature, normalize, offsets[r0:r0 + cnt + 1], _prep=prep)
        else:
            dz[:cnt] = _sparse.sparse_logprobs_backward(
                grad_logp[rows], g_tail, y[:cnt], indices[rows], logp[rows], tail[rows],
                stats[rows], temperature, normalize)
        dz[cnt:] = 0
        grad_h[rows] = _mm(dz, weight, cdt)[:cnt]
        grad_w += _mm(dz.t(), hbuf, cdt)
        if grad_b is not None:
            grad_b += dz.sum(0)
    return (grad_h.to(hidden.dtype), grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype))
