"""Triton kernels of ``sparse_logprobs`` and ``sparse_kl`` (SPEC section 3.1).

The four launchers at the bottom have exactly the signatures and outputs of the reference
functions in :mod:`rlkernels.reference.vocab` (read their docstrings for the semantics).

Design (one program per row, fixed reduction order: deterministic and batch invariant)
-------------------------------------------------------------------------------------
* **Forward**, one read of the row in ``BLOCK_V`` column blocks (4096) with per-lane online
  statistics of the raw logits (:func:`._common.lane_step`: no block reduction inside the
  loop), merged once per row into ``(m, log s)`` with ``log s = log1p(rest)``, ``rest`` the
  sum over every column but one arg-max of ``exp(z - m)``: nothing ever subtracts 1 from a
  sum, so ``1 - p_max`` keeps its digits on peaked rows. The stream never looks at the
  ids, with or without the tail (the loop of the no-tail kernel: ``lane_step`` only).
* **The tail after the stream, lane by lane** (:func:`_log_tail`). Column ``c`` is in lane
  ``c % BLOCK_V``, whose state ``(m_L, r_L)`` keeps its max column out of ``r_L``; the ids
  are sorted by ``(lane, id)`` (:func:`_lane_sorted_ids`, with a bitmap of the id lanes).
  A lane without ids is all outside, ``1 + r_L`` relative to ``m_L``. A lane with ids
  (:func:`_lane_state`, from the gathered ``(m_L, r_L)`` and the ids' logits): if no id is
  at the lane max, its outside is ``1 + (r_L - sum e_id)`` (>= 1: subtracting cannot
  cancel); if an id is the lane max, ``r_L - sum e_{other ids}``, used only when what is
  subtracted is at most half of ``r_L`` and the rest is >= 2^-60. Otherwise (a second id
  dominating the lane's other columns, an outside flushed or far below an id max, three or
  more positions in one lane) the lane is *bad*: its ``V / BLOCK_V`` columns are read
  again (strided, ids masked by a bitmap of their blocks) into their own ``(max, rest)``.
  At K = 64 and 4096 lanes a row has ~0.5 lanes with two ids (handled without re-reading)
  and ~0.003 with three; bad lanes need a peaked row whose ids hold nearly all of a lane.
  Every part is ``(m, s, h)``: a sum ``h + s`` relative to its max, ``h = 1`` when a column
  at the max is kept out (:func:`_merge_part`: nothing is subtracted), so the tail
  ``(m_out - m) + log1p(s) - log s`` (or ``log(s)`` when ``h = 0``) is the log of a sum of
  the outside columns, never ``log(1 - sum)``: the reference's ``_log_tail``. A tail mass
  of 1e-30 keeps its digits (the ids' lanes carry it, or are read again).
* **Gathered values**: ``z`` at each valid id is loaded directly (int64 addresses) after the
  row pass, ``K`` at most ``BLOCK_K`` at a time (any ``K`` works). "support" normalizes with
  the same online ``(max, log1p(rest))`` pair over the valid slots, so that ``1 - s_k`` of a
  peaked support survives into the backward.
* **Backward**, one pass over the row recomputing ``p = exp((z - m) - log s)`` that writes
  every column as if it held no id (no id match in the streaming loop), then, after a
  barrier, the id columns rewritten by the same program: each sorted position sums the slot
  terms of every position with its id (duplicates are adjacent; only id chunks whose ranges
  overlap are compared, so ``O(K)`` chunk pairs for distinct ids) and writes its column, so
  duplicates write identical values; no atomics. Cancellation-prone differences are
  rewritten exactly: ``g_c - p G = -g_c expm1(log p) - p (G - g_c)`` (a row peaked on its
  only id), ``q - p = -q expm1(tail)`` outside the ids, ``g_k - s_k G = -g_k expm1(log s_k)
  - s_k (G - g_k)`` under "support".

``log1p`` and ``expm1`` are written with ``exp``, ``log`` and series (the Triton interpreter
has no libdevice): accurate to a few ulps in fp32 and fp64.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._codes import SPARSE_MODES
from ..reference import as_rows
from ._common import (LOG2E, compute_dtype, const_hl, exp2_, lane_merge, lane_step, mul_hl,
                      n_rows, online_block, per_row, row_layout, row_offset, rows3, split,
                      tl_compute_dtype)

Tensor = torch.Tensor

# The launchers read [A, B, V] logits through two row strides (_common.row_layout), as
# triton/vocab.py's do.
STRIDED_ROWS = True
# the eager ops' kernels take the public shapes (logits [..., V], indices / targets [..., K]
# or CSR [nnz]) and return outputs in them: rlkernels.ops._table skips its maps and views
ND_ROWS = True

# Sorted-id value of an unused slot (or an id outside [0, V)): larger than any column.
_SENTINEL = 2 ** 31 - 1
_SENTINEL_C = tl.constexpr(_SENTINEL)
LOG2E_C = tl.constexpr(LOG2E)
# rlkernels/_codes.py: the MODE constexpr the kernels branch on (0 full, 1 support, 2 kl)
_MODE_FULL, _MODE_SUPPORT, _MODE_KL = (SPARSE_MODES[m] for m in ("full", "support", "kl"))


# ============================================================================ device helpers

@triton.jit
def _scaled(x_row, cols, mask, inv_t_hi, inv_t_lo, IS_FP64: tl.constexpr, CDT: tl.constexpr):
    """``z = x * (1/T)`` in the compute dtype (``1/T = hi + lo``, :func:`._common.mul_hl`);
    masked columns read as ``-inf``."""
    x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(CDT)
    return mul_hl(x, inv_t_hi, inv_t_lo, IS_FP64)


@triton.jit
def _log1p(r, NT: tl.constexpr):
    """``log(1 + r)`` for ``r >= 0``: ``2 atanh(u)``, ``u = r / (2 + r) <= 1/3``, as a series
    for ``r < 1`` (``NT`` terms), ``log(1 + r)`` above (no cancellation there)."""
    small = r < 1.0
    rs = tl.where(small, r, 0.0)
    u = rs / (rs + 2.0)
    u2 = u * u
    one = u2 * 0.0 + 1.0
    acc = one / (2 * NT + 1)
    for i in tl.static_range(NT):
        acc = acc * u2 + one / (2 * (NT - 1 - i) + 1)
    return tl.where(small, 2.0 * u * acc, tl.log(1.0 + r))


@triton.jit
def _expm1(x, ex, NT: tl.constexpr):
    """``exp(x) - 1`` given ``ex = exp(x)``: a Taylor series (``NT`` terms) for ``|x| < 1/2``,
    ``ex - 1`` elsewhere (relative error < 3 eps there)."""
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.0)
    acc = xs * 0.0 + 1.0
    for i in tl.static_range(NT - 1):
        acc = 1.0 + xs * acc / (NT - i)
    return tl.where(small, xs * acc, ex - 1.0)


@triton.jit
def _n_distinct(sid_row, K, V, BLOCK_K: tl.constexpr):
    """Number of distinct valid ids of the row (from its sorted ids): ``V`` iff they cover
    every column."""
    cnt = tl.zeros([], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        koffs = k0 + tl.arange(0, BLOCK_K)
        cur = tl.load(sid_row + koffs, mask=koffs < K, other=_SENTINEL_C)
        prev = tl.load(sid_row + koffs - 1, mask=(koffs < K) & (koffs > 0), other=-1)
        cnt += tl.sum(((cur < V) & (cur != prev)).to(tl.int32), axis=0)
    return cnt


@triton.jit
def _slot_ids(idx_row, koffs, K, V):
    """``(ids, valid, in_range)`` of slots ``koffs``: ``valid`` is ``id >= 0`` (the reference's
    rule), ``in_range`` also guards the gather address against ids past ``V``."""
    kmask = koffs < K
    ids = tl.load(idx_row + koffs, mask=kmask, other=-1).to(tl.int64)
    valid = kmask & (ids >= 0)
    return ids, valid, valid & (ids < V)


# ================================================================================== forward

@triton.jit
def _lane_state(x_row, sid_row, j, K, V, m_l, r_l, c, IS_FP64: tl.constexpr,
                CDT: tl.constexpr, BLOCK_V: tl.constexpr):
    """The outside state of the lane of each owner among the lane-sorted positions ``j``
    (ids sorted by ``(id % BLOCK_V, id)``: a lane's ids are adjacent, its first position
    owns it): ``(lane, owner, ref, s, n, bad)``, the lane's outside columns summing to
    ``(n + s) 2^((. - ref) c)`` relative to ``ref = m_L``, the lane max, with ``(m_L, r_L)``
    gathered from the per-lane state (r_L: every column of the lane but its max):

    * no id at the lane max: ``n = 1``, ``s = r_L - sum_ids e`` (the max column is outside:
      the sum is >= 1, the subtraction cannot cancel);
    * an id at the lane max: ``n = 0``, ``s = r_L - sum_{other ids} e``; ``bad`` (the lane is
      read again, ids masked) when what is subtracted exceeds half of ``r_L`` (cancellation)
      or ``s < 2^-60`` (the outside may be flushed or far below the lane max);
    * three or more positions in the lane (rare at K << BLOCK_V): ``bad``.

    ``e = 2^((x - m_L) c)`` is the id's term in ``r_L``; an empty lane (no finite column)
    gives ``n = s = 0``."""
    ids = tl.load(sid_row + j, mask=j < K, other=_SENTINEL_C)
    prev = tl.load(sid_row + j - 1, mask=(j < K) & (j > 0), other=0)
    nxt1 = tl.load(sid_row + j + 1, mask=j + 1 < K, other=_SENTINEL_C)
    nxt2 = tl.load(sid_row + j + 2, mask=j + 2 < K, other=_SENTINEL_C)
    valid = ids < V
    lane = tl.where(valid, ids % BLOCK_V, 0)
    # sentinels sort last: the position before a valid id holds a valid id
    owner = valid & ((j == 0) | ((prev % BLOCK_V) != lane))
    dist1 = (nxt1 < V) & ((nxt1 % BLOCK_V) == lane) & (nxt1 != ids)  # a second id, not a dup
    run3 = (nxt2 < V) & ((nxt2 % BLOCK_V) == lane)
    ml = tl.gather(m_l, lane, 0)
    rl = tl.gather(r_l, lane, 0)
    x0 = tl.load(x_row + ids.to(tl.int64), mask=owner, other=float("-inf")).to(CDT)
    x1 = tl.load(x_row + nxt1.to(tl.int64), mask=owner & dist1, other=float("-inf")).to(CDT)
    top0 = x0 == ml
    top1 = dist1 & (x1 == ml)
    # x <= m_L: e <= 1; a -inf column gives 0
    e0 = tl.where(top0, 0.0, exp2_((x0 - ml) * c, IS_FP64))
    e1 = tl.where(top1 | ~dist1, 0.0, exp2_((x1 - ml) * c, IS_FP64))
    ntop = top0.to(tl.int32) + top1.to(tl.int32)
    sub = e0 + e1 + tl.where(ntop == 2, 1.0, 0.0)  # two ids tied at the max: one stays out
    s = rl - sub
    s = tl.where(s < 0.0, 0.0, s)  # rounding (a NaN stays)
    n = tl.where(ntop == 0, 1.0, 0.0).to(CDT)
    empty = ml <= -1.0e30
    bad = run3 | ((ntop > 0) & ((sub > 0.5 * rl) | (s < 8.673617379884035e-19)))
    bad = owner & ~empty & bad
    n = tl.where(empty, 0.0, n)
    s = tl.where(empty, rl * 0.0, s)
    return lane, owner, ml, s, n, bad


@triton.jit
def _lanes_part(ok, ref, s, n, idx, c, IS_FP64: tl.constexpr, NOT: tl.constexpr):
    """Lanes ``ok`` with outside ``(n + s) 2^((. - ref) c)`` as one part ``(m, s, h)`` (see
    :func:`_merge_part`): the first lane at the max with ``n = 1`` keeps its max column out
    (``h = 1``); the other lanes give ``s * 0`` (a NaN stays)."""
    refc = tl.where(ok, ref, float("-inf"))
    m = tl.max(refc, 0)
    ms = tl.where(m == float("-inf"), 0.0, m)
    a = exp2_((refc - ms) * c, IS_FP64)
    first = tl.min(tl.where(ok & (n > 0.0) & (refc == m), idx, NOT), 0)
    tot = tl.sum(tl.where(ok, a * (s + tl.where(idx == first, 0.0, n)), s * 0.0), 0)
    h = tl.where(first < NOT, 1.0, 0.0).to(tot.dtype)
    return m, tot, h


@triton.jit
def _merge_part(m1, s1, h1, m2, s2, h2, c, IS_FP64: tl.constexpr):
    """Union of two parts, each summing to ``h + s`` relative to its raw max ``m`` (``h`` in
    {0, 1}: 1 when a column equal to ``m`` is kept out of ``s``, so that ``log1p(s)`` keeps
    the digits of a sum near 1); nothing is subtracted."""
    m = tl.maximum(m1, m2)
    ms = tl.where(m == float("-inf"), 0.0, m)
    a1 = exp2_((m1 - ms) * c, IS_FP64)  # a -inf part scales to 0
    a2 = exp2_((m2 - ms) * c, IS_FP64)
    tie = m1 == m2
    h = tl.where(tie, tl.maximum(h1, h2), tl.where(m1 > m2, h1, h2))
    s = tl.where(tie, s1 + s2 + (h1 + h2 - h),
                 tl.where(m1 > m2, s1 + (s2 + h2) * a2, s2 + (s1 + h1) * a1))
    return m, s, h


@triton.jit
def _log_tail(x_row, sid_row, words_row, K, V, m_l, r_l, lanes, c, m, log_s, inv_t_hi,
              inv_t_lo, IS_FP64: tl.constexpr, CDT: tl.constexpr, NT: tl.constexpr,
              BLOCK_V: tl.constexpr, KF: tl.constexpr):
    """``log(sum over the columns outside the row's ids of e^{z - m}) - log s`` from the
    per-lane states of the whole row (the stream did not look at the ids): the lanes
    without ids (``words_row``: a bitmap of the id lanes, 64 lanes a word) as they are, the
    id lanes from :func:`_lane_state`, its bad lanes read again. ``m``: the row max z (0 on
    a row of only -inf). The id lanes' parts merge slot by slot across id chunks (no block
    reduction per chunk), into one part after the chunks."""
    kl_ = tl.arange(0, KF)
    mi = tl.full([KF], float("-inf"), CDT)  # per slot: the id lanes' part (m, s, h)
    si = tl.zeros([KF], CDT)
    hi = tl.zeros([KF], CDT)
    bad_any = tl.zeros([KF], tl.int32)
    for k0 in range(0, K, KF):
        lane, owner, ref, s, n, bad = _lane_state(x_row, sid_row, k0 + kl_, K, V, m_l, r_l, c,
                                                  IS_FP64, CDT, BLOCK_V)
        use = owner & ~bad
        mi, si, hi = _merge_part(mi, si, hi, tl.where(use, ref, float("-inf")),
                                 tl.where(use, s, 0.0), tl.where(use, n, 0.0), c, IS_FP64)
        bad_any = tl.maximum(bad_any, bad.to(tl.int32))
    if tl.max(bad_any, 0) > 0:
        # the bad lanes' columns again, one block at a time, their ids masked by a bitmap
        # of the blocks that hold them (64 blocks a window)
        n_blocks = tl.cdiv(V, BLOCK_V)
        one = tl.full([KF], 1, tl.int64)
        for k0 in range(0, K, KF):
            j = k0 + kl_
            lane, owner, ref, s, n, bad = _lane_state(x_row, sid_row, j, K, V, m_l, r_l, c,
                                                      IS_FP64, CDT, BLOCK_V)
            mo = tl.full([KF], -1.0e30, CDT)
            ro = tl.zeros([KF], CDT)
            for w0 in range(0, n_blocks, 64):
                bits = tl.zeros([KF], tl.int64)
                r = tl.zeros([], tl.int32)
                live = bad
                while tl.max(live.to(tl.int32), 0) > 0:  # the lane's run of positions
                    idr = tl.load(sid_row + j + r, mask=live & (j + r < K), other=_SENTINEL_C)
                    live = live & (idr < V) & ((idr % BLOCK_V) == lane)
                    blk = idr // BLOCK_V - w0
                    inw = live & (blk >= 0) & (blk < 64)
                    bits = bits | tl.where(inw, one << tl.where(inw, blk, 0).to(tl.int64), 0)
                    r += 1
                for b in range(w0, tl.minimum(w0 + 64, n_blocks)):
                    col = lane.to(tl.int64) + b * BLOCK_V  # b * BLOCK_V < V + BLOCK_V
                    member = ((bits >> (b - w0)) & 1) != 0
                    xv = tl.load(x_row + col, mask=bad & (col < V) & ~member,
                                 other=float("-inf")).to(CDT)
                    mo, ro, _ = lane_step(xv, mo, ro, ro, c, False, IS_FP64)
            # (mo, ro): the lane's outside max and the rest; no finite column: nothing
            fin = bad & (mo > -1.0e30)
            mi, si, hi = _merge_part(mi, si, hi, tl.where(fin, mo, float("-inf")),
                                     tl.where(bad, ro, 0.0), tl.where(fin, 1.0, 0.0), c,
                                     IS_FP64)
    m2, s2, h2 = _lanes_part((mi > float("-inf")) | (si != 0.0), mi, si, hi, kl_, c, IS_FP64,
                             KF)
    # the lanes without ids, as lane_merge forms the row's rest
    wl = tl.load(words_row + lanes // 64)
    has = ((wl >> (lanes % 64).to(tl.int64)) & 1) != 0
    ok = ~has & (m_l > -1.0e30)
    m1, s1, h1 = _lanes_part(ok, m_l, r_l, tl.full([BLOCK_V], 1.0, CDT), lanes, c, IS_FP64,
                             BLOCK_V)
    mo_, so_, ho_ = _merge_part(m1, s1, h1, m2, s2, h2, c, IS_FP64)
    # the reference's _log_tail: the log of the outside sum relative to the row max, never
    # log(1 - sum); no finite outside column: -inf (a NaN stays)
    log_out = tl.where(ho_ > 0.0, _log1p(so_, NT), tl.log(so_))
    tail = (mul_hl(mo_, inv_t_hi, inv_t_lo, IS_FP64) - m) + log_out - log_s
    return tl.where(mo_ == float("-inf"), float("-inf") + so_ * 0.0, tail)


@triton.jit
def _sparse_fwd_kernel(
    x_ptr, inner_x, stride_x, stride_x1, V,
    idx_ptr, stride_idx, K, off_ptr,
    sid_ptr, words_ptr,
    tgt_ptr, stride_tgt,
    out_ptr, stride_out, tail_ptr, stats_ptr,
    inv_t_hi, inv_t_lo,
    MODE: tl.constexpr, WITH_TAIL: tl.constexpr, IS_FP64: tl.constexpr, CDT: tl.constexpr,
    NT: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, KF: tl.constexpr, NW: tl.constexpr,
    CSR: tl.constexpr,
):
    """``sid_ptr``, ``words_ptr``: the row's ids sorted by ``(id % BLOCK_V, id)`` and the
    bitmap of their lanes (:func:`_lane_sorted_ids`, ``WITH_TAIL`` only). ``CSR``: the
    row's ids (and its sorted ids, targets, log-probs) are ``[off[row], off[row + 1])`` of
    flat arrays (absolute positions); else ``K`` slots at ``row * stride``."""
    row = tl.program_id(0).to(tl.int64)
    if CSR:
        start = tl.load(off_ptr + row).to(tl.int64)
        cnt = (tl.load(off_ptr + row + 1).to(tl.int64) - start).to(tl.int32)
        idx_row = idx_ptr + start
        sid_row = sid_ptr + start
        tgt_row = tgt_ptr + start
        out_row = out_ptr + start
    else:
        cnt = K
        idx_row = idx_ptr + row * stride_idx
        sid_row = sid_ptr + row * K
        tgt_row = tgt_ptr + row * stride_tgt
        out_row = out_ptr + row * stride_out
    x_row = x_ptr + row_offset(row, inner_x, stride_x, stride_x1)
    lanes = tl.arange(0, BLOCK_V)
    # log2(e) / T, from 1/T as it reaches the kernel (in fp32: exactly the fp32 product)
    c = const_hl(tl.zeros([], CDT), inv_t_hi, inv_t_lo, IS_FP64) * tl.full([], LOG2E_C, CDT)

    # one pass over the whole row with per-lane statistics (_common.lane_step: a lane's max
    # column is kept out of its sum r), no block reduction and no id in the loop, with or
    # without the tail: the outside sums are formed after the pass from the lane states
    m_l = tl.full([BLOCK_V], -1.0e30, CDT)
    r_l = tl.zeros([BLOCK_V], CDT)
    n_blocks = tl.cdiv(V, BLOCK_V)
    for b in range(0, n_blocks):
        cols = (b * BLOCK_V + lanes).to(tl.int32)
        x = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(CDT)
        m_l, r_l, _ = lane_step(x, m_l, r_l, r_l, c, False, IS_FP64)
    mx, rest, _ = lane_merge(m_l, r_l, r_l, lanes, c, BLOCK_V, False, IS_FP64)
    m = mul_hl(mx, inv_t_hi, inv_t_lo, IS_FP64)  # max z, rounded as every z is
    log_s = _log1p(rest, NT)
    tl.store(stats_ptr + row * 3, m)
    # a row of only -inf is shifted by 0, as the reference does: -inf log-probs, not NaN
    m = tl.where(m == float("-inf"), 0.0, m)
    tl.store(stats_ptr + row * 3 + 1, log_s)
    tl.store(stats_ptr + row * 3 + 2, tl.zeros([], CDT))

    if WITH_TAIL:
        tail = _log_tail(x_row, sid_row, words_ptr + row * NW, cnt, V, m_l, r_l, lanes, c, m,
                         log_s, inv_t_hi, inv_t_lo, IS_FP64, CDT, NT, BLOCK_V, KF)
    else:
        tail = tl.zeros([], CDT)
    tl.store(tail_ptr + row, tail)

    if MODE == 0:  # full: (z_k - m) - log s
        for k0 in range(0, cnt, BLOCK_K):
            koffs = k0 + tl.arange(0, BLOCK_K)
            ids, valid, inr = _slot_ids(idx_row, koffs, cnt, V)
            zk = _scaled(x_row, ids, inr, inv_t_hi, inv_t_lo, IS_FP64, CDT)
            vals = tl.where(valid, (zk - m) - log_s, float("-inf"))
            tl.store(out_row + koffs, vals, mask=koffs < cnt)
    elif MODE == 1:  # support: z_k - logsumexp over the valid slots, as (mk, log1p(rest))
        klanes = tl.arange(0, BLOCK_K)
        mk = tl.full([], float("-inf"), CDT)
        rk = tl.zeros([], CDT)
        for k0 in range(0, cnt, BLOCK_K):
            koffs = k0 + klanes
            ids, valid, inr = _slot_ids(idx_row, koffs, cnt, V)
            zk = _scaled(x_row, ids, inr, inv_t_hi, inv_t_lo, IS_FP64, CDT)
            mk, rk, _s1, _sq, _new, _bi = online_block(zk, klanes, mk, rk, rk, rk, 0, False, False)
        # log1p: log s_k = (z_k - mk) - log1p(rest) keeps 1 - s_k exact on a peaked support
        log_sk = _log1p(rk, NT)
        for k0 in range(0, cnt, BLOCK_K):
            koffs = k0 + klanes
            ids, valid, inr = _slot_ids(idx_row, koffs, cnt, V)
            zk = _scaled(x_row, ids, inr, inv_t_hi, inv_t_lo, IS_FP64, CDT)
            vals = tl.where(valid, (zk - mk) - log_sk, float("-inf"))
            tl.store(out_row + koffs, vals, mask=koffs < cnt)
    else:  # sparse KL: sum_k t_k (log t_k - log s_k) [+ the tail bucket]
        kl = tl.zeros([], CDT)
        mass = tl.zeros([], CDT)
        for k0 in range(0, cnt, BLOCK_K):
            koffs = k0 + tl.arange(0, BLOCK_K)
            ids, valid, inr = _slot_ids(idx_row, koffs, cnt, V)
            zk = _scaled(x_row, ids, inr, inv_t_hi, inv_t_lo, IS_FP64, CDT)
            # unused slots' targets are never read (they may be NaN)
            t_log = tl.load(tgt_row + koffs, mask=valid, other=0.0).to(CDT)
            t = tl.where(valid, tl.exp(t_log), 0.0)
            s_log = (zk - m) - log_s
            kl += tl.sum(tl.where(t > 0, t * (t_log - s_log), 0.0), axis=0)
            mass += tl.sum(t, axis=0)
        if WITH_TAIL:
            t_tail = tl.maximum(1.0 - mass, 0.0)
            # ids covering every column: no tail bucket (1 - sum t is only rounding)
            t_tail = tl.where(_n_distinct(sid_row, cnt, V, BLOCK_K) >= V, 0.0, t_tail)
            kl += tl.where(t_tail > 0, t_tail * (tl.log(t_tail) - tail), 0.0)
        tl.store(out_ptr + row, kl)


# ================================================================================= backward

@triton.jit
def _sparse_bwd_kernel(
    x_ptr, inner_x, stride_x, stride_x1, V, grad_ptr, stride_grad,
    idx_ptr, stride_idx, K, off_ptr,
    sid_ptr, perm_ptr, seg_ptr, stride_seg,
    gk_ptr, stride_gk, lp_ptr, stride_lp,
    tail_ptr, gtail_ptr, gkl_ptr, stats_ptr,
    inv_t_hi, inv_t_lo,
    MODE: tl.constexpr, WITH_TAIL: tl.constexpr, IS_FP64: tl.constexpr, CDT: tl.constexpr,
    NT: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, KF: tl.constexpr, CSR: tl.constexpr,
):
    """``gk_ptr``: ``grad_logp`` (MODE 0/1) or ``target_logprobs`` (MODE 2); ``lp_ptr``: the
    forward's log-probs (MODE 1). ``WITH_TAIL``: a tail gradient (MODE 0/1) or the tail bucket
    (MODE 2). ``CSR``: the row's slots are ``[off[row], off[row + 1])`` of flat arrays, its
    sorted ids there too, their slots (``perm``) relative to ``off[row]``."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row_offset(row, inner_x, stride_x, stride_x1)
    g_row_ptr = grad_ptr + row * stride_grad
    if CSR:
        start = tl.load(off_ptr + row).to(tl.int64)
        K = (tl.load(off_ptr + row + 1).to(tl.int64) - start).to(tl.int32)
        idx_row = idx_ptr + start
        gk_row = gk_ptr + start
        sid_row = sid_ptr + start
        perm_row = perm_ptr + start
        lp_row = lp_ptr + start
    else:
        idx_row = idx_ptr + row * stride_idx
        gk_row = gk_ptr + row * stride_gk
        sid_row = sid_ptr + row * K
        perm_row = perm_ptr + row * K
        lp_row = lp_ptr + row * stride_lp
    lanes = tl.arange(0, BLOCK_V)
    m = tl.load(stats_ptr + row * 3).to(CDT)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row of only -inf: shifted by 0 (forward)
    log_s = tl.load(stats_ptr + row * 3 + 1).to(CDT)
    inv_t = const_hl(log_s, inv_t_hi, inv_t_lo, IS_FP64)  # 1/T, exactly hi + lo

    # row sums over the valid slots: G = sum g_k, or the teacher mass sum t_k
    total = tl.zeros([], CDT)
    for k0 in range(0, K, BLOCK_K):
        koffs = k0 + tl.arange(0, BLOCK_K)
        ids, valid, inr = _slot_ids(idx_row, koffs, K, V)
        v = tl.load(gk_row + koffs, mask=valid, other=0.0).to(CDT)
        if MODE == 2:
            v = tl.where(valid, tl.exp(v), 0.0)
        total += tl.sum(v, axis=0)

    # tail terms on the outside columns, with q = exp(log p - tail) <= 1 (softmax over them):
    #   sparse_logprobs: g_t (q - p) = q * c_out, c_out = -g_t expm1(tail) (q - p = q (1 - e^tail))
    #   sparse_kl:       p coef - t_tail q
    # (p expm1(-tail) would overflow where the outside mass is below e^-88 in fp32)
    tail_v = tl.zeros([], CDT)
    g_t = tl.zeros([], CDT)
    c_out = tl.zeros([], CDT)
    t_tail = tl.zeros([], CDT)
    coef = total               # KL: p * coef at every column
    g_kl = tl.zeros([], CDT)
    if WITH_TAIL:
        tail_v = tl.load(tail_ptr + row).to(CDT)
    if MODE == 2:
        g_kl = tl.load(gkl_ptr + row).to(CDT)
        if WITH_TAIL:
            t_tail = tl.maximum(1.0 - total, 0.0)
            t_tail = tl.where(_n_distinct(sid_row, K, V, BLOCK_K) >= V, 0.0, t_tail)
            coef = total + t_tail
    elif WITH_TAIL:
        g_t = tl.load(gtail_ptr + row).to(CDT)
        c_out = -g_t * _expm1(tail_v, tl.exp(tail_v), NT)

    # expm1(log p) needs its series only where |log p| < 1/2, i.e. p > 0.6: only a column
    # equal to the row max can be there (any other has p < p_max and p + p_max <= 1), and
    # its log p is exactly -log s (z - m = 0). So the series runs once per row, not per
    # column; elsewhere p - 1 is what _expm1 returns.
    em1_top = _expm1(-log_s, tl.exp(-log_s), NT)

    tail_q = tl.where(tail_v == float("-inf"), 0.0, tail_v)

    # 1. every column as if it held no id: a pure stream (no id match in the loop)
    n_blocks = tl.cdiv(V, BLOCK_V)
    for b in range(0, n_blocks):
        cols = b * BLOCK_V + lanes
        z = _scaled(x_row, cols, cols < V, inv_t_hi, inv_t_lo, IS_FP64, CDT)
        lp = (z - m) - log_s
        p = tl.exp(lp)
        if MODE == 0:
            g = -p * total
        elif MODE == 1:
            g = tl.zeros([BLOCK_V], CDT)
        else:
            g = p * coef
        if WITH_TAIL:
            # a -inf column has p = q = 0 and gets 0 either way; a -inf tail means no
            # outside column is finite, and tail_q = 0 keeps q = exp(-inf) = 0 (not NaN)
            q = tl.exp(lp - tail_q)
            if MODE == 2:
                g = g - t_tail * q
            else:
                g += q * c_out
        if MODE == 2:
            g = g * g_kl
        g = g * inv_t
        tl.store(g_row_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)

    # 2. the id columns rewritten, after a barrier (other threads of this program wrote
    # them in 1.): each sorted position computes its column's value from the sum of the
    # slot terms of every position with the same id (duplicates are adjacent: only id
    # chunks whose range overlaps are compared), so duplicates write identical bits.
    tl.debug_barrier()
    for k0 in range(0, K, KF):
        j = k0 + tl.arange(0, KF)
        cid = tl.load(sid_row + j, mask=j < K, other=_SENTINEL_C)
        real = (j < K) & (cid < V)
        c_first = tl.load(sid_row + k0)
        c_last = tl.max(tl.where(real, cid, -1), axis=0)
        S = tl.zeros([KF], CDT)
        for k1 in range(0, K, KF):
            j1 = k1 + tl.arange(0, KF)
            if tl.load(sid_row + k1) <= c_last:
                if tl.load(sid_row + tl.minimum(k1 + KF, K) - 1) >= c_first:
                    cid1 = tl.load(sid_row + j1, mask=j1 < K, other=_SENTINEL_C)
                    m1 = (j1 < K) & (cid1 < V)
                    pos = tl.load(perm_row + j1, mask=m1, other=0)  # the ids' slots
                    v = tl.load(gk_row + pos, mask=m1, other=0.0).to(CDT)
                    if MODE == 1:
                        # support: g_k - s_k G = -g_k expm1(log s_k) - s_k (G - g_k)
                        lpk = tl.load(lp_row + pos, mask=m1, other=0.0).to(CDT)
                        sk = tl.exp(lpk)
                        v = -v * _expm1(lpk, sk, NT) - sk * (total - v)
                    elif MODE == 2:
                        v = tl.exp(v)
                    v = tl.where(m1, v, 0.0)
                    eq = cid[:, None] == cid1[None, :]
                    S += tl.sum(tl.where(eq, v[None, :], 0.0), axis=1)
        z = _scaled(x_row, cid, real, inv_t_hi, inv_t_lo, IS_FP64, CDT)
        lp = (z - m) - log_s
        p = tl.exp(lp)
        if MODE == 0:
            # g_c - p G = g_c (1 - p) - p (G - g_c), 1 - p = -expm1(log p): exact on a peak
            g = -S * tl.where(z == m, em1_top, p - 1.0) - p * (total - S)
        elif MODE == 1:
            g = S
        else:
            g = p * coef - S
        if WITH_TAIL:
            if MODE != 2:
                g += -g_t * p
        if MODE == 2:
            g = g * g_kl
        g = g * inv_t
        tl.store(g_row_ptr + cid, g.to(grad_ptr.dtype.element_ty), mask=real)


# ================================================================================ launchers

def _series_terms(dtype: torch.dtype) -> int:
    # expm1 on |x| < 1/2: 0.5^n / n! < eps; log1p: u^2 <= 1/9 per term
    return 17 if dtype == torch.float64 else 10


# Block sizes (tuning: benchmarks/NOTES.md). The backward's streaming loop holds no id match
# since the id columns are rewritten after it: 4096 columns (16 a thread at 8 warps, 16-byte bf16
# accesses) compile for sm_90a to 48-64 registers, no spills (benchmarks/sass_report.py);
# fp64 at 1024 (4096 spilled in the sparse_kl tail kernel).
def _default_block_v(vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """Depends on ``V`` (and the dtype) only (batch invariance); fp64 takes a quarter (the
    fp64 tail kernels spill at 4096)."""
    cap = 1024 if dtype == torch.float64 else 4096
    return min(cap, triton.next_power_of_2(max(vocab, 1)))


# The forward streams with per-lane statistics and compares each column with the block's ids
# one at a time: a 4096-column block (16 columns a thread at 8 warps) costs no more registers
# than the backward's 1024, and amortizes the per-block work.
def _default_block_v_fwd(vocab: int) -> int:
    """Depends on ``V`` only (batch invariance)."""
    return min(4096, triton.next_power_of_2(max(vocab, 1)))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 1024 else 4


_MAX_BLOCK_K = 1024  # ids gathered at once; a larger K loops (tests lower it)


def _block_k(k: int) -> int:
    return min(_MAX_BLOCK_K, max(16, triton.next_power_of_2(max(k, 1))))


def _rows2d(t: Tensor) -> Tensor:
    """``t`` with unit stride along its last dim (a copy only when it has not); its rows
    may have any layout :func:`._common.row_layout` describes."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _sorted_segments(indices: Tensor, vocab: int, block_v: int
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(sorted ids int32 [N, K], their slots int32 [N, K], seg int32 [N, n_blocks + 1])``:
    unused slots (and ids outside ``[0, V)``) sort last as ``_SENTINEL``; the sorted ids of
    column block ``b`` are ``seg[:, b] .. seg[:, b + 1]``."""
    n, _ = indices.shape
    ok = (indices >= 0) & (indices < vocab)
    ids = torch.where(ok, indices, torch.full_like(indices, _SENTINEL)).to(torch.int32)
    sid, perm = torch.sort(ids, dim=1, stable=True)
    n_blocks = triton.cdiv(vocab, block_v)
    bounds = torch.arange(n_blocks + 1, device=indices.device, dtype=torch.int32) * block_v
    bounds = bounds.expand(n, n_blocks + 1).contiguous()
    seg = torch.searchsorted(sid.contiguous(), bounds, out_int32=True)
    return sid.contiguous(), perm.to(torch.int32).contiguous(), seg


_LANE_KEY = 2 ** 31  # > any id: the lane-sorted key is lane * _LANE_KEY + id
_LANE_LAST = 2 ** 62  # key of an unused slot / an id outside [0, V): sorts last


def _lane_sorted_ids(indices: Tensor, vocab: int, block_v: int) -> Tuple[Tensor, Tensor]:
    """``(sid int32 [N, K], words int64 [N, max(block_v // 64, 1)])``: the row's ids sorted
    by ``(id % block_v, id)`` (unused slots and ids outside ``[0, V)`` last, as
    ``_SENTINEL``; equal ids adjacent), and the bitmap of the lanes that hold an id (lane
    ``l``: bit ``l % 64`` of word ``l // 64``). The forward's tail reads the ids lane by lane
    of its per-lane statistics (column ``c`` is in lane ``c % block_v``). [N, K] work, and
    ``N * block_v / 8`` bytes."""
    n, _ = indices.shape
    ok = (indices >= 0) & (indices < vocab)
    ids = indices.to(torch.int64)
    key = torch.where(ok, (ids % block_v) * _LANE_KEY + ids, torch.full_like(ids, _LANE_LAST))
    key = torch.sort(key, dim=1).values
    valid = key < _LANE_LAST
    sid = torch.where(valid, key % _LANE_KEY, torch.full_like(key, _SENTINEL))
    lane = torch.where(valid, key // _LANE_KEY, torch.zeros_like(key))
    prev = torch.cat([torch.full_like(lane[:, :1], -1), lane[:, :-1]], dim=1)
    first = valid & (lane != prev)  # one bit per lane: the sum below is an OR
    bits = torch.where(first, torch.bitwise_left_shift(torch.ones_like(lane), lane % 64),
                       torch.zeros_like(lane))
    words = torch.zeros(n, max(block_v // 64, 1), dtype=torch.int64, device=indices.device)
    words.scatter_add_(1, lane // 64, bits)
    return sid.to(torch.int32).contiguous(), words


# CSR supports (issue 21): row r's ids are indices[offsets[r]:offsets[r + 1]] of a flat [nnz]
# array. The kernels read them at those absolute positions (a view offsets[r0:r0 + n + 1] of a
# larger CSR describes rows r0 .. r0 + n); the per-row preprocessing below runs on the flat
# array: a row per position (searchsorted, no host sync), then one sort of a combined
# (row, key) int64 key, which keeps every row's ids inside its own segment.

_CSR_BLOCK_K = 64  # ids a CSR row gathers at once: the row lengths are data, not looked at


def _csr_rows(offsets: Tensor, nnz: int) -> Tensor:
    """Row of each position ``0 .. nnz - 1`` (int64): -1 before ``offsets[0]``, ``N`` from
    ``offsets[-1]`` on (positions of no row, kept in place by the sorts below)."""
    pos = torch.arange(nnz, device=offsets.device, dtype=torch.int64)
    return torch.searchsorted(offsets.long(), pos, right=True) - 1


def _csr_sort(prow: Tensor, key: Tensor, span: int) -> Tuple[Tensor, Tensor]:
    """``(sorted key, order)`` of the flat positions by ``(row, key)``, ``0 <= key <= span``:
    each row's positions stay in its segment (``prow`` is non-decreasing), ties in order."""
    return torch.sort(prow * (span + 1) + key, stable=True)


def _csr_lane_sorted_ids(indices: Tensor, offsets: Tensor, vocab: int, block_v: int
                         ) -> Tuple[Tensor, Tensor]:
    """:func:`_lane_sorted_ids` of a CSR support: ``(sid int32 [nnz], words int64 [N, NW])``,
    each row's segment of ``sid`` sorted by ``(id % block_v, id)`` (unused slots last, as
    ``_SENTINEL``). The in-row key ``lane * n_blocks + block`` orders ``(lane, id)`` and is
    ``< n_blocks * block_v``, which the unused slots get."""
    n = offsets.shape[0] - 1
    prow = _csr_rows(offsets, indices.shape[0])
    n_blocks = triton.cdiv(vocab, block_v)
    span = n_blocks * block_v
    ids = indices.to(torch.int64)
    ok = (ids >= 0) & (ids < vocab)
    key = torch.where(ok, (ids % block_v) * n_blocks + ids // block_v, span)
    key = _csr_sort(prow, key, span)[0] - prow * (span + 1)
    valid = key < span
    lane = torch.where(valid, key // n_blocks, 0)
    sid = torch.where(valid, (key % n_blocks) * block_v + lane, _SENTINEL)
    prev_lane = torch.cat([lane.new_full((1,), -1), lane[:-1]])
    prev_row = torch.cat([prow.new_full((1,), -1), prow[:-1]])
    owned = (prow >= 0) & (prow < n)
    first = owned & valid & ((lane != prev_lane) | (prow != prev_row))  # one bit per lane
    nw = max(block_v // 64, 1)
    bits = torch.where(first, torch.bitwise_left_shift(torch.ones_like(lane), lane % 64), 0)
    words = torch.zeros(n * nw, dtype=torch.int64, device=indices.device)
    words.scatter_add_(0, torch.where(owned, prow * nw + lane // 64, 0), bits)  # ints: exact
    return sid.to(torch.int32), words.view(n, nw)


def _csr_sorted_segments(indices: Tensor, offsets: Tensor, vocab: int
                         ) -> Tuple[Tensor, Tensor]:
    """:func:`_sorted_segments` of a CSR support: ``(sid int32 [nnz], perm int32 [nnz])``,
    each row's segment of ``sid`` sorted by id (unused slots last as ``_SENTINEL``, a
    stable sort), ``perm`` the slot of each sorted position relative to its row's start."""
    prow = _csr_rows(offsets, indices.shape[0])
    ids = indices.to(torch.int64)
    key = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
    skey, order = _csr_sort(prow, key, vocab)
    key = skey - prow * (vocab + 1)
    sid = torch.where(key < vocab, key, _SENTINEL).to(torch.int32)
    start = offsets.long()[prow.clamp(0, offsets.shape[0] - 1)]
    return sid, (order - start).to(torch.int32)


def _forward(logits: Tensor, indices: Tensor, target: Optional[Tensor], temperature: float,
             mode: int, with_tail: bool, block_v: Optional[int],
             offsets: Optional[Tensor] = None, out: Optional[Tensor] = None,
             prep: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``offsets``: a CSR support (flat ``indices``, ``target`` and log-probs); ``out``: the
    ``[nnz]`` log-prob buffer to write into (a chunk of a larger CSR); ``prep``: the CSR
    tail's ``(sid, words)`` already formed for these rows (the linear head's chunks)."""
    vocab, n, lead = logits.shape[-1], n_rows(logits), logits.shape[:-1]
    csr = offsets is not None
    if not csr:  # [..., K] -> [N, K]
        indices, target = as_rows(indices), as_rows(target)
    k = 0 if csr else indices.shape[1]
    cdt = compute_dtype(logits.dtype)
    if out is None:
        out = logits.new_empty(lead if mode == _MODE_KL else
                               (indices.shape[0],) if csr else (*lead, k), dtype=cdt)
    tail = logits.new_zeros(lead, dtype=cdt)
    stats = logits.new_zeros((*lead, 3), dtype=cdt)
    if n == 0:
        return out, tail, stats
    block_v = block_v or _default_block_v_fwd(vocab)
    logits = _rows2d(rows3(logits))
    indices = indices.contiguous()
    if not with_tail:
        sid = words = indices  # unused
    elif prep is not None:
        sid, words = prep
    elif csr:
        sid, words = _csr_lane_sorted_ids(indices, offsets, vocab, block_v)
    else:
        sid, words = _lane_sorted_ids(indices, vocab, block_v)
    tgt = target.contiguous() if target is not None else out
    block_k = _CSR_BLOCK_K if csr else _block_k(k)
    _sparse_fwd_kernel[(n,)](
        logits, *row_layout(logits), vocab,
        indices, 1 if csr else indices.stride(0), k, offsets if csr else indices,
        sid, words,
        tgt, tgt.stride(0) if target is not None and not csr else 0,
        out, per_row(out, 1)[1] if mode != _MODE_KL and not csr else 1, tail, stats,
        *split(1.0 / temperature),
        MODE=mode, WITH_TAIL=with_tail, IS_FP64=cdt == torch.float64,
        CDT=tl_compute_dtype(cdt), NT=_series_terms(logits.dtype), BLOCK_V=block_v,
        BLOCK_K=block_k, KF=min(block_k, 64), NW=max(block_v // 64, 1), CSR=csr,
        num_warps=_num_warps(block_v))
    return out, tail, stats


def _backward(logits: Tensor, indices: Tensor, gk: Optional[Tensor], lp: Optional[Tensor],
              tail: Optional[Tensor], g_tail: Optional[Tensor], g_kl: Optional[Tensor],
              stats: Tensor, temperature: float, mode: int, with_tail: bool,
              block_v: Optional[int], offsets: Optional[Tensor] = None,
              out: Optional[Tensor] = None, prep: Optional[Tuple[Tensor, Tensor]] = None
              ) -> Tensor:
    """``offsets``: a CSR support; ``out``: the ``[N, V]`` buffer of the gradient;
    ``prep``: the CSR ``(sid, perm)`` already formed (:func:`_csr_sorted_segments`)."""
    vocab, n = logits.shape[-1], n_rows(logits)
    csr = offsets is not None
    if not csr:  # [..., K] -> [N, K]
        indices, gk, lp = as_rows(indices), as_rows(gk), as_rows(lp)
    k = 0 if csr else indices.shape[1]
    cdt = compute_dtype(logits.dtype)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) \
        if out is None else out
    if n == 0:
        return grad
    block_v = block_v or _default_block_v(vocab, logits.dtype)
    logits = _rows2d(rows3(logits))
    indices = indices.contiguous()
    if csr:
        sid, perm = _csr_sorted_segments(indices, offsets, vocab) if prep is None else prep
        seg = sid.view(1, -1)  # unused by the kernel
    else:
        sid, perm, seg = _sorted_segments(indices, vocab, block_v)
    if gk is None:  # no gradient reached the log-probs
        gk = torch.zeros(indices.shape if csr else (n, k), dtype=cdt, device=logits.device)
    gk = gk.contiguous()
    lp = gk if lp is None else lp.contiguous()
    stats = stats.contiguous()
    tail = stats if tail is None else tail.contiguous()
    g_tail = stats if g_tail is None else g_tail.contiguous()
    g_kl = stats if g_kl is None else g_kl.contiguous()
    block_k = _CSR_BLOCK_K if csr else _block_k(k)
    _sparse_bwd_kernel[(n,)](
        logits, *row_layout(logits), vocab, grad, vocab,  # grad: contiguous
        indices, 1 if csr else indices.stride(0), k, offsets if csr else indices,
        sid, perm, seg, seg.stride(0),
        gk, 1 if csr else gk.stride(0), lp, 1 if csr else lp.stride(0),
        tail, g_tail, g_kl, stats,
        *split(1.0 / temperature),
        MODE=mode, WITH_TAIL=with_tail, IS_FP64=cdt == torch.float64,
        CDT=tl_compute_dtype(cdt), NT=_series_terms(logits.dtype), BLOCK_V=block_v,
        BLOCK_K=block_k,
        KF=min(block_k, 64), CSR=csr,
        num_warps=_num_warps(block_v))
    return grad


# ------------------------------------------------------------------ the backend's functions

def sparse_logprobs_forward(logits: Tensor, indices: Tensor, temperature: float,
                            normalize: str, with_tail: bool, offsets: Optional[Tensor] = None,
                            *, block_v: Optional[int] = None, _out: Optional[Tensor] = None,
                            _prep: Optional[Tuple[Tensor, Tensor]] = None
                            ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(logp [..., K], tail [...], stats [..., 3])`` (``logp [nnz]`` with a CSR ``offsets
    [N + 1]``), as :func:`rlkernels.reference.sparse.sparse_logprobs_forward`. ``block_v``
    (a power of two) overrides the column block, for tests. Private: ``_out`` (the ``[nnz]``
    log-prob buffer a chunk of CSR rows writes into), ``_prep`` (their tail's sorted ids,
    :func:`_csr_lane_sorted_ids`)."""
    mode = _MODE_FULL if normalize == "full" else _MODE_SUPPORT
    return _forward(logits, indices, None, temperature, mode, with_tail, block_v, offsets,
                    _out, _prep)


def sparse_logprobs_backward(grad_logp: Optional[Tensor], grad_tail: Optional[Tensor],
                             logits: Tensor, indices: Tensor, logp: Tensor, tail: Tensor,
                             stats: Tensor, temperature: float, normalize: str,
                             offsets: Optional[Tensor] = None, *,
                             block_v: Optional[int] = None, _out: Optional[Tensor] = None,
                             _prep: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """Gradient w.r.t. ``logits``, as
    :func:`rlkernels.reference.sparse.sparse_logprobs_backward` (``grad_tail=None``: no tail
    term). Private: ``_out`` (the gradient's buffer), ``_prep`` (the CSR ``(sid, perm)``,
    :func:`_csr_sorted_segments`)."""
    mode = _MODE_FULL if normalize == "full" else _MODE_SUPPORT
    return _backward(logits, indices, grad_logp, logp if mode == _MODE_SUPPORT else None,
                     tail, grad_tail, None, stats, temperature, mode, grad_tail is not None,
                     block_v, offsets, _out, _prep)


def sparse_kl_forward(logits: Tensor, indices: Tensor, target_logprobs: Tensor,
                      temperature: float, with_tail: bool, offsets: Optional[Tensor] = None,
                      *, block_v: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``(kl [...], student log tail [...], stats [..., 3])``, as
    :func:`rlkernels.reference.sparse.sparse_kl_forward` (CSR: ``offsets [N + 1]``)."""
    return _forward(logits, indices, target_logprobs, temperature, _MODE_KL, with_tail,
                    block_v, offsets)


def sparse_kl_backward(grad_kl: Tensor, logits: Tensor, indices: Tensor,
                       target_logprobs: Tensor, s_tail: Tensor, stats: Tensor,
                       temperature: float, with_tail: bool,
                       offsets: Optional[Tensor] = None, *,
                       block_v: Optional[int] = None) -> Tensor:
    """Gradient w.r.t. ``logits``, as :func:`rlkernels.reference.sparse.sparse_kl_backward`
    (CSR: ``offsets [N + 1]``)."""
    return _backward(logits, indices, target_logprobs, None, s_tail, None, grad_kl, stats,
                     temperature, _MODE_KL, with_tail, block_v, offsets)
