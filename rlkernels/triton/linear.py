"""Triton kernels of the fused lm_head ops (hidden states in): ``linear_token_logprobs`` and
``linear_grpo_loss``. Same launcher signatures, outputs and row statistics as
:mod:`rlkernels.reference.linear` (which states the math); no buffer of more than one tile of
logits ever exists.

Logits ``z = (hidden @ weight^T + bias) / T`` are formed tile by tile: a ``[BLOCK_N, BLOCK_V]``
tile is ``tl.dot`` of ``BLOCK_H`` chunks of ``hidden`` rows and ``weight`` rows accumulated in
fp32 (fp64 for fp64 inputs; ``input_precision="ieee"``: no TF32), bias added, times ``1/T``
(the ``hi``/``lo`` split of :mod:`._common`); columns past ``V`` are ``-inf``, H tails are
loaded as 0. Offsets are int64. Block sizes depend only on ``H``, ``V``, the dtype and the
device, never on ``N``: a row's results do not depend on the batch (SPEC 1), and no kernel
uses atomics (bit-identical reruns).

* Forward (:func:`_fwd_kernel`): one program per block of ``BLOCK_N`` rows, looping over the
  vocabulary in ``BLOCK_V`` tiles; per row the online ``(m, rest, S1)`` update of
  :func:`._common.online_block` (here along axis 1 of a 2-d tile, :func:`_online_tile`),
  running max from ``-inf``, ``rest`` over every column but ONE arg-max, and the token's logit
  picked when its column falls in the tile. Saves ``stats = (m, log1p(rest), sum p (z - m))``.
* Backward, two kernels, each owning what it writes (deterministic, no float atomics):

  - :func:`_bwd_hidden_kernel`: one program per row block; for each vocabulary tile it
    recomputes the logit tile, forms ``d z`` in registers from the saved ``stats``, and adds
    ``d z @ W_tile`` to its rows of an fp32 ``d hidden`` accumulator (``grad_hidden`` itself
    for fp32 / fp64 inputs, else an fp32 ``[N, H]`` scratch, cast at the end);
  - :func:`_bwd_weight_kernel`: one program per vocabulary tile; for each row block it
    recomputes the logit tile and ``d z``, adds ``d z^T @ h_block`` to its rows of an fp32
    ``d weight`` accumulator and keeps ``sum_rows d z`` (``d bias``) in registers. For fp32 /
    fp64 weights the accumulator is ``grad_weight`` itself; for bf16 / fp16 it is an fp32
    scratch covering at most ``_SCRATCH_ELEMENTS`` (256 MiB) of ``[V, H]`` at a time: the
    launcher walks the vocabulary in slices of that many columns, casting each slice into
    ``grad_weight`` (peak extra memory at N=16384, H=3584, V=151936 bf16: ~235 MiB for ``d
    hidden`` + <= 256 MiB for the ``d weight`` slice, well under 1 GiB).

  ``d z = (g_lp (onehot - p) - g_H p ((z - m) - sum p (z - m))) / T``; the token column uses
  ``-g_lp expm1(log p_y)`` (exact on peaked rows). Padding rows (``tokens == ignore_index``):
  0 outputs, 0 statistics, and their hidden rows are never loaded (NaN there is harmless),
  so they contribute exactly 0 to every gradient.

dtypes: fp32 / bf16 / fp16 inputs compute in fp32 (bf16 / fp16 operands go to ``tl.dot``
natively on a GPU, whose products are exact in fp32); fp64 inputs compute in fp64 throughout
(``tl.dot`` on fp64).

Not measured yet (needs a GPU, see the NOTE at the end of the file): block sizes, the
vocabulary-split forward grid, and the alternative backward "chunked ``d z`` + cuBLAS GEMMs".
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._fused import fused_forward, row_grads
from .._policy_options import PolicyOptions
from ._common import (compute_dtype, device_guard, expm1, log1p, mul_hl, split,
                      tl_compute_dtype, xmul0)
from .policy import policy_loss_backward, policy_loss_forward

Tensor = torch.Tensor

# fp32 elements of the d weight scratch (bf16 / fp16 weights) per launch: 256 MiB.
_SCRATCH_ELEMENTS = 1 << 26


# ================================================================================ jit helpers

@triton.jit
def _logits_tile(h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_ok, cols, col_ok, H,
                 inv_t_hi, inv_t_lo, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                 IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """``z = (h[rows] @ w[cols]^T + b[cols]) / T`` as a ``[BLOCK_N, BLOCK_V]`` tile in ``CDT``;
    ``-inf`` in columns past ``V``. Rows with ``row_ok`` False load hidden as 0."""
    offs_h = tl.arange(0, BLOCK_H)
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_V], CDT)
    for k in range(0, H, BLOCK_H):
        ks = k + offs_h
        km = ks < H
        h = tl.load(h_ptr + r64[:, None] * stride_h + ks[None, :],
                    mask=row_ok[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + c64[:, None] * stride_w + ks[None, :],
                    mask=col_ok[:, None] & km[None, :], other=0.0)
        if UPCAST:
            h = h.to(CDT)
            w = w.to(CDT)
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee", out_dtype=CDT)
    if HAS_BIAS:
        b = tl.load(b_ptr + c64, mask=col_ok, other=0.0).to(CDT)
        acc = acc + b[None, :]
    z = mul_hl(acc, inv_t_hi, inv_t_lo, IS_FP64)
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _online_tile(z, offs, m, rest, s1, WITH_S1: tl.constexpr):
    """:func:`._common.online_block` for every row of a 2-d tile ``z [BLOCK_N, BLOCK_V]``
    (``m``, ``rest``, ``s1`` are ``[BLOCK_N]``): fold the tile into the running max, the sum
    of ``exp(z - m)`` over every column but ONE arg-max, and ``sum exp(z - m) (z - m)``."""
    bm, bi = tl.max(z, 1, return_indices=True, return_indices_tie_break_left=True)
    m_new = tl.maximum(m, bm)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    scale = tl.exp(m - m_ref)  # 1 when the max did not change, 0 while m = -inf
    zs = z - m_ref[:, None]
    e = tl.exp(zs)
    is_new = bm > m
    if WITH_S1:
        d = tl.where(m == float("-inf"), 0.0, m - m_ref)
        s1 = scale * (s1 + d * (1.0 + rest)) + tl.sum(xmul0(e, zs), 1)
    skip_col = tl.where(is_new, bi, -1)  # the column left out of the tile sum, if any
    rest = (rest * scale + tl.where(is_new, scale, 0.0)
            + tl.sum(tl.where(offs[None, :] == skip_col[:, None], 0.0, e), 1))
    return m_new, rest, s1


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
def _fwd_kernel(h_ptr, stride_h, w_ptr, stride_w, b_ptr, tok_ptr, logp_ptr, ent_ptr, stats_ptr,
                N, V, H, inv_t_hi, inv_t_lo, ignore_index,
                HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr,
                IS_FP64: tl.constexpr, CDT: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
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
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        col_ok = cols < V
        z = _logits_tile(h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, live, cols, col_ok, H,
                         inv_t_hi, inv_t_lo, HAS_BIAS, UPCAST, IS_FP64, CDT, BLOCK_N, BLOCK_V,
                         BLOCK_H)
        m, rest, s1 = _online_tile(z, offs, m, rest, s1, WITH_ENTROPY)
        # the token's logit, when its column is in this tile (exactly one tile has it)
        z_y += tl.sum(tl.where(cols[None, :] == tok[:, None], z, 0.0), 1)
    log_s = log1p(rest, IS_FP64)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    logp = (z_y - m_shift) - log_s
    zero = tl.zeros([BLOCK_N], CDT)
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


@triton.jit
def _bwd_hidden_kernel(glp_ptr, gh_ptr, h_ptr, stride_h, w_ptr, stride_w, b_ptr, tok_ptr,
                       stats_ptr, stride_s0, stride_s1, dh_ptr, stride_dh,
                       N, V, H, inv_t_hi, inv_t_lo, ignore_index,
                       HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr,
                       UPCAST: tl.constexpr, IS_FP64: tl.constexpr, CDT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """``dh[rows] += d z_tile @ W_tile`` over every vocabulary tile (``dh`` zeroed, fp32 or
    fp64); this program owns its rows of ``dh``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    r64 = rows.to(tl.int64)
    tok, live, m, log_s, sum_pzs, g_lp, g_h = _row_grad_inputs(
        glp_ptr, gh_ptr, tok_ptr, stats_ptr, stride_s0, stride_s1, rows, row_in, ignore_index,
        inv_t_hi, inv_t_lo, HAS_GLP, HAS_GH, IS_FP64, CDT)
    offs = tl.arange(0, BLOCK_V)
    offs_h = tl.arange(0, BLOCK_H)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        col_ok = cols < V
        c64 = cols.to(tl.int64)
        z = _logits_tile(h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, live, cols, col_ok, H,
                         inv_t_hi, inv_t_lo, HAS_BIAS, UPCAST, IS_FP64, CDT, BLOCK_N, BLOCK_V,
                         BLOCK_H)
        dz = _dz_tile(z, cols, col_ok, tok, live, m, log_s, sum_pzs, g_lp, g_h, HAS_GLP,
                      HAS_GH, IS_FP64)
        for k in range(0, H, BLOCK_H):
            ks = k + offs_h
            km = ks < H
            w = tl.load(w_ptr + c64[:, None] * stride_w + ks[None, :],
                        mask=col_ok[:, None] & km[None, :], other=0.0).to(CDT)
            ptrs = dh_ptr + r64[:, None] * stride_dh + ks[None, :]
            pmask = row_in[:, None] & km[None, :]
            acc = tl.load(ptrs, mask=pmask, other=0.0)
            acc = tl.dot(dz, w, acc, input_precision="ieee", out_dtype=CDT)
            tl.store(ptrs, acc, mask=pmask)


@triton.jit
def _bwd_weight_kernel(glp_ptr, gh_ptr, h_ptr, stride_h, w_ptr, stride_w, b_ptr, tok_ptr,
                       stats_ptr, stride_s0, stride_s1, dw_ptr, stride_dw, db_ptr,
                       N, V, H, v0, inv_t_hi, inv_t_lo, ignore_index,
                       HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GH: tl.constexpr,
                       UPCAST: tl.constexpr, IS_FP64: tl.constexpr, CDT: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """``dw[tile] += d z_tile^T @ h_block`` over every row block (``dw`` zeroed, fp32 or fp64,
    row ``j`` of ``dw`` is vocabulary column ``v0 + j``) and ``db[tile] = sum_rows d z``; this
    program owns its vocabulary tile."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_V)
    cols = v0 + pid * BLOCK_V + offs
    col_ok = cols < V
    local64 = (pid * BLOCK_V + offs).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    db = tl.zeros([BLOCK_V], CDT)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + offs_n
        row_in = rows < N
        r64 = rows.to(tl.int64)
        tok, live, m, log_s, sum_pzs, g_lp, g_h = _row_grad_inputs(
            glp_ptr, gh_ptr, tok_ptr, stats_ptr, stride_s0, stride_s1, rows, row_in,
            ignore_index, inv_t_hi, inv_t_lo, HAS_GLP, HAS_GH, IS_FP64, CDT)
        z = _logits_tile(h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, live, cols, col_ok, H,
                         inv_t_hi, inv_t_lo, HAS_BIAS, UPCAST, IS_FP64, CDT, BLOCK_N, BLOCK_V,
                         BLOCK_H)
        dz = _dz_tile(z, cols, col_ok, tok, live, m, log_s, sum_pzs, g_lp, g_h, HAS_GLP,
                      HAS_GH, IS_FP64)
        if HAS_BIAS:
            db += tl.sum(dz, 0)
        dzt = tl.trans(dz)
        for k in range(0, H, BLOCK_H):
            ks = k + offs_h
            km = ks < H
            h = tl.load(h_ptr + r64[:, None] * stride_h + ks[None, :],
                        mask=live[:, None] & km[None, :], other=0.0).to(CDT)
            ptrs = dw_ptr + local64[:, None] * stride_dw + ks[None, :]
            pmask = col_ok[:, None] & km[None, :]
            acc = tl.load(ptrs, mask=pmask, other=0.0)
            acc = tl.dot(dzt, h, acc, input_precision="ieee", out_dtype=CDT)
            tl.store(ptrs, acc, mask=pmask)
    if HAS_BIAS:
        tl.store(db_ptr + cols.to(tl.int64), db, mask=col_ok)


# ================================================================================== launchers

def _blocks(hidden: Tensor, vocab: int, dim: int) -> Tuple[int, int, int, int]:
    """``(BLOCK_N, BLOCK_V, BLOCK_H, num_warps)``: from H, V, the dtype and the device only,
    never from N (batch invariance). ``tl.dot`` needs every block >= 16."""
    def fit(n: int, cap: int) -> int:
        return max(16, min(triton.next_power_of_2(max(n, 1)), cap))

    if not hidden.is_cuda:  # the interpreter: small tiles, few Python-level steps
        return 16, fit(vocab, 64), fit(dim, 64), 4
    if hidden.dtype == torch.float64:
        return 32, fit(vocab, 64), fit(dim, 32), 4
    # untuned first guess (see the NOTE at the end of the file)
    return 64, fit(vocab, 128), fit(dim, 64), 8


def _prep(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    h = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    return h, w, b


def _rstride(x: Tensor) -> int:
    return x.stride(0) if x.shape[0] > 1 else x.shape[1]


def linear_token_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  tokens: Tensor, temperature: float, ignore_index: int,
                                  with_entropy: bool, *, blocks: Optional[Tuple] = None
                                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp [N], entropy [N], stats [N, 3])`` of ``(hidden @ weight^T + bias) / T``, like
    the reference (fp32; fp64 for fp64 inputs). Padding rows: 0 outputs and 0 stats.
    ``blocks=(BLOCK_N, BLOCK_V, BLOCK_H)`` overrides the block sizes (tests)."""
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    logp = hidden.new_empty(n, dtype=cdt)
    ent = hidden.new_empty(n, dtype=cdt)
    stats = hidden.new_empty(n, 3, dtype=cdt)
    if n == 0:
        return logp, ent, stats
    h, w, b = _prep(hidden, weight, bias)
    tok = tokens.contiguous()
    bn, bv, bh, warps = _blocks(hidden, vocab, dim)
    if blocks is not None:
        bn, bv, bh = blocks
    hi, lo = split(1.0 / temperature)
    with device_guard(h):
        _fwd_kernel[(triton.cdiv(n, bn),)](
            h, _rstride(h), w, _rstride(w), w if b is None else b, tok, logp, ent, stats,
            n, vocab, dim, hi, lo, int(ignore_index),
            HAS_BIAS=b is not None, WITH_ENTROPY=bool(with_entropy),
            UPCAST=not h.is_cuda, IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt),
            BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, num_warps=warps)
    return logp, ent, stats


def linear_token_logprobs_backward(grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor],
                                   hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                   tokens: Tensor, stats: Tensor, temperature: float,
                                   ignore_index: int, *, blocks: Optional[Tuple] = None,
                                   scratch_elements: int = _SCRATCH_ELEMENTS
                                   ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(d hidden, d weight, d bias or None)``, each in the dtype of its input, accumulated in
    fp32 (fp64 for fp64) without atomics. ``scratch_elements`` bounds the fp32 ``d weight``
    slice of half-precision weights (tests shrink it to force several slices)."""
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    has_glp = grad_logp is not None
    has_gh = grad_entropy is not None
    grad_b = None if bias is None else torch.empty(vocab, dtype=cdt, device=weight.device)
    if n == 0 or not (has_glp or has_gh):
        if grad_b is not None:
            grad_b.zero_()
        return (torch.zeros_like(hidden), torch.zeros_like(weight),
                None if grad_b is None else grad_b.to(bias.dtype))
    h, w, b = _prep(hidden, weight, bias)
    tok = tokens.contiguous()
    glp = grad_logp.contiguous() if has_glp else stats
    gh = grad_entropy.contiguous() if has_gh else stats
    bn, bv, bh, warps = _blocks(hidden, vocab, dim)
    if blocks is not None:
        bn, bv, bh = blocks
    hi, lo = split(1.0 / temperature)
    meta = dict(HAS_BIAS=b is not None, HAS_GLP=has_glp, HAS_GH=has_gh, UPCAST=not h.is_cuda,
                IS_FP64=cdt == torch.float64, CDT=tl_compute_dtype(cdt), BLOCK_N=bn,
                BLOCK_V=bv, BLOCK_H=bh, num_warps=warps)
    # d hidden: accumulated in place when hidden is fp32 / fp64, else in an fp32 scratch
    dh = torch.zeros((n, dim), dtype=cdt, device=hidden.device)
    # d weight: the same, one vocabulary slice of at most scratch_elements at a time
    direct_w = weight.dtype == cdt
    grad_w = (torch.zeros((vocab, dim), dtype=cdt, device=weight.device) if direct_w
              else torch.empty_like(weight, memory_format=torch.contiguous_format))
    span = vocab if direct_w else max(bv, (scratch_elements // max(dim, 1)) // bv * bv)
    scratch = None
    with device_guard(h):
        _bwd_hidden_kernel[(triton.cdiv(n, bn),)](
            glp, gh, h, _rstride(h), w, _rstride(w), w if b is None else b, tok,
            stats, stats.stride(0), stats.stride(1), dh, dim,
            n, vocab, dim, hi, lo, int(ignore_index), **meta)
        for v0 in range(0, vocab, span):
            cnt = min(span, vocab - v0)
            if direct_w:
                acc = grad_w
            else:
                if scratch is None:
                    scratch = torch.empty((min(span, vocab), dim), dtype=cdt,
                                          device=weight.device)
                acc = scratch[:cnt]
                acc.zero_()
            _bwd_weight_kernel[(triton.cdiv(cnt, bv),)](
                glp, gh, h, _rstride(h), w, _rstride(w), w if b is None else b, tok,
                stats, stats.stride(0), stats.stride(1), acc, dim,
                grad_b if grad_b is not None else dh,
                n, vocab, dim, v0, hi, lo, int(ignore_index), **meta)
            if not direct_w:
                grad_w[v0:v0 + cnt].copy_(acc)
    grad_h = dh if hidden.dtype == cdt else dh.to(hidden.dtype)
    return (grad_h, grad_w, None if grad_b is None else grad_b.to(bias.dtype))


# =========================================================================== linear_grpo_loss

def linear_grpo_loss_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                             tokens: Tensor, old_logp: Tensor, advantages: Tensor,
                             mask: Tensor, normalizer: Optional[Tensor],
                             ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                             temperature: float, o: PolicyOptions):
    """``(loss, metrics, logp [B, T], entropy [B, T], stats [B*T, 3])``: the fused lm_head
    forward kernel (log-probs and entropies) then the policy kernel."""
    return fused_forward(
        lambda tok: linear_token_logprobs_forward(hidden, weight, bias, tok, temperature, -100,
                                                  True),
        policy_loss_forward, tokens, old_logp, advantages, mask, normalizer, ref_logp,
        is_weights, o)


def linear_grpo_loss_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor,
                              bias: Optional[Tensor], tokens: Tensor, old_logp: Tensor,
                              advantages: Tensor, mask: Tensor, normalizer: Optional[Tensor],
                              ref_logp: Optional[Tensor], is_weights: Optional[Tensor],
                              logp: Tensor, ent: Tensor, stats: Tensor, temperature: float,
                              o: PolicyOptions):
    """``(d hidden, d weight, d bias or None)``: the policy kernel's gradients w.r.t. the
    log-probs (and entropies when ``entropy_coef != 0``) through the lm_head backward."""
    g_lp, g_ent = row_grads(policy_loss_backward, grad_loss, logp, ent, old_logp,
                            advantages, mask, normalizer, ref_logp, is_weights, o)
    return linear_token_logprobs_backward(g_lp, g_ent, hidden, weight, bias,
                                          tokens.reshape(-1), stats, temperature, -100)


# NOTE (GPU work left, issue #5): all of this was verified in the interpreter only.
# * Block sizes / num_warps / num_stages are an untuned guess; autotune keyed on (H, V, dtype)
#   only (never N, for batch invariance).
# * Forward: a vocabulary-split grid (row block x V split) with a deterministic merge of the
#   per-split (m, rest, S1, z_y) would fill the GPU when N / BLOCK_N is small.
# * Backward: the d z @ W and d z^T @ h products run as fp32 "ieee" dots (no tensor cores for
#   bf16 weights): measure a bf16x3 / tf32x3 split, and the alternative "chunked d z (fp32,
#   a few thousand rows) + cuBLAS GEMMs into fp32 accumulators"; keep the faster. The
#   read-modify-write of the fp32 accumulators per (row block, vocabulary tile) is memory
#   traffic that a larger BLOCK_N (or holding dz for several row blocks) would cut.
