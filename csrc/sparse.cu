// Sparse vocabulary ops (logits [N, V] at K given ids per row): sparse_logprobs and sparse_kl,
// forward and backward. Python launchers: rlkernels/cuda/sparse.py. The math is stated in
// rlkernels/reference/sparse.py; the row streaming and statistics are those of logits.cuh
// (shared with vocab.cu).
#include "logits.cuh"
#include "rlkernels.h"

namespace rlk {
namespace {

// ============================================================== sparse_logprobs / sparse_kl
//
// One block per row, z = x / T, row statistics (m, log s) of the whole row (Run, logits.cuh).
// Modes:
//   kFull:    logp_k = (z_k - m) - log s                        (full-vocabulary log-probs)
//   kSupport: logp_k = (z_k - m_K) - log1p(rest_K)              (softmax over the valid slots)
//   kKl:      kl = sum_k t_k (log t_k - logp_k) [+ t_tail (log t_tail - tail)],
//             t_k = exp(target_k), t_tail = max(1 - sum t_k, 0), 0 when the ids cover V
// Slot k is valid iff its id is >= 0 (-1: unused slot, output -inf); a valid id >= V (only
// reachable with debug checks off) reads as a -inf logit and is a member of no column.
// tail = log of the full-vocabulary mass outside the row's distinct valid ids, from its own
// running state over those columns (so: its own maximum, never log(1 - sum): exact on peaked
// rows), formed in the same pass as the row's state st (one read of the row):
//   * a chunk without member columns (nearly all of them) adds the chunk sums st just formed
//     (relative to st.m): as they are while the row maximum is an outside column (so.m ==
//     st.m), times conv = base^((st.m - so.m) scale) while the outside maximum lies at most
//     kSparseFar (log2 units; natural for fp64) below st.m ("near": the outside sum is then
//     >= base^-kSparseFar of st's maximum, so the terms ex2.approx flushes below 2^-126 of it
//     do not matter), and folded into so against so's own maximum otherwise (a rare branch:
//     rows whose ids hold all but < 2^-64 of a thread's mass);
//   * a chunk holding a member folds its outside columns into so against so's own maximum;
//   * a new row maximum in a chunk without members is an outside column: so moves to it.
// No second pass (until 3f96e24 rows whose outside lay 2^100 below the maximum read the row
// again).
// Membership (forward): a bitmap of the ids in shared memory, kSparseSegCols columns at a
// time: one segment covers V <= 262144 (kSeg = false, the launcher's choice for such V). A
// larger V is one launch per segment (kSeg = true): each launch builds its segment's bitmap
// and streams those columns only, and the row's reduced states (st, so, the distinct-id
// count) go from launch to launch in a [n] SparseCarry buffer, merged in segment order
// (deterministic); the last launch writes the outputs. No loop around the chunk loop in
// either kernel (a segment loop inside the kernel held the bitmap rebuild, two barriers and
// the id loads on every trip: 0.71 - 0.84 in sass_report).
// Backward: a dense pass writes every column's non-member gradient; after a barrier, the
// first slot of each run of equal ids in the row's sorted ids (sorted by the launcher, stable,
// so duplicate ids sum in slot order: deterministic) overwrites its column with the member
// gradient. Every value comes from one thread in a fixed order: no atomics.
// Slots: padded, row r's K slots are ids [r, 0 .. K) (strides si0, si1), its
// log-probs out [r, k], targets / gradients / log-probs of the backward [r, k]; or CSR (kCsr,
// vLLM's form): row r's slots are the flat positions offs[r] .. offs[r + 1] of the [nnz]
// arrays (ids at stride si1, targets st1, grad_logp sg1, logp sl1; out and the sorted ids /
// slots contiguous), absolute positions, so a view offs[r0 .. r0 + n] of a larger CSR
// describes rows r0 .. r0 + n - 1 and writes only their positions. A template flag: the
// padded kernels' machine code is that of before CSR.

// mode: rlk::SparseMode (rlkernels.h).
constexpr int kSparseWords = 8192;                   // 32 KiB of bitmap
constexpr int64_t kSparseSegCols = 32 * kSparseWords;
constexpr int32_t kSparseSentinel = 0x7fffffff;      // sorted id of an unused / bad slot
constexpr float kSparseFar = 64.0f;                  // "near" outside maximum (see above)

// One row's state between the launches of its segments (kSeg): st, so and the distinct ids
// (kl) of the segments so far. The launcher's buffer has 64 bytes per row.
template <class A>
struct SparseCarry {
  A m, s, n, om, os, on;
  long long distinct;
};
static_assert(sizeof(SparseCarry<double>) <= 64, "rlkernels/cuda/sparse.py allocates 64 B/row");

// A CSR row's slots: (first position, count, its ids). The offsets are read where used, each
// time (a volatile load: not hoisted, not merged), so that they are not live across the
// stream (kept there, the fp64 kernels spilled in the chunk loop).
struct SlotRange {
  int64_t kb, K;
  const int64_t* ir;
};

__device__ __forceinline__ int64_t load_offset(const int64_t* p) {
  int64_t v;
  asm volatile("ld.global.nc.s64 %0, [%1];" : "=l"(v) : "l"(p));
  return v;
}

template <bool kCsr>
__device__ __forceinline__ SlotRange slot_range(const int64_t* offs, int64_t row,
                                                const int64_t* idx, int64_t si0, int64_t si1,
                                                int64_t k_pad) {
  if constexpr (kCsr) {
    const int64_t kb = load_offset(offs + row);
    return {kb, load_offset(offs + row + 1) - kb, idx + kb * si1};
  } else {
    return {0, k_pad, idx + row * si0};
  }
}

template <class A>
__device__ __forceinline__ A log_tail_of(const Run<A>& out, A row_m, A inv_t, A log_s) {
  // log(sum over the outside columns of e^{z - m}) - log s, the outside state relative to its
  // own maximum out.m (raw logits; row_m: the row's); -inf when no outside column is finite
  if (out.m == neg_inf<A>()) return neg_inf<A>();
  const A log_out = out.n >= A(1) ? d_log1p(out.s + (out.n - A(1))) : d_log(out.s);
  return (out.m - row_m) * inv_t + log_out - log_s;
}

template <class T, int kMode, bool kTail, bool kSeg, bool kCsr>
__global__ void __launch_bounds__(max_threads<T>())
    sparse_fwd_kernel(const T* __restrict__ x, int64_t stride_x, int64_t V,
                      const int64_t* __restrict__ idx, int64_t si0, int64_t si1, int64_t k_pad,
                      const acc_t<T>* __restrict__ tgt, int64_t st0, int64_t st1,
                      acc_t<T>* __restrict__ out, int64_t so0, acc_t<T>* __restrict__ tail,
                      acc_t<T>* __restrict__ stats, acc_t<T> inv_t, acc_t<T> scale,
                      SparseCarry<acc_t<T>>* __restrict__ carry, int64_t seg0, int64_t seg_len,
                      bool seg_last, const int64_t* __restrict__ offs) {
  // carry, seg0, seg_len, seg_last: kSeg only (this launch's columns [seg0, seg0 + seg_len));
  // offs: kCsr only (Slots, in the header)
  using A = acc_t<T>;
  constexpr int N = Chunk<T>::N;
  __shared__ SoftmaxState<A> scratch[32];
  __shared__ Run<A> run_scratch[32];
  __shared__ A sum_scratch[32];
  __shared__ long long count_scratch[32];
  __shared__ uint32_t bits[kTail ? kSparseWords : 1];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * stride_x;
  // the row's slots (Slots, in the header): padded here (the machine code of before CSR),
  // CSR read again where used (slot_range)
  const SlotRange pad = slot_range<false>(offs, row, idx, si0, si1, k_pad);
  auto slots = [&]() { return kCsr ? slot_range<kCsr>(offs, row, idx, si0, si1, k_pad) : pad; };
  Run<A> st = run_empty<A>(), so = run_empty<A>();  // so: the outside columns, own maximum
  long long distinct = 0;
  // how a chunk without members adds its sums (cs, relative to st.m) to so, refreshed
  // whenever st.m or so.m moves (rare branches): s += t conv + n nconv, n += n ntr with
  //   tracking (so.m == st.m):  conv = 1, nconv = 0, ntr = 1 (exact: fma(t, 1, s) = s + t)
  //   near (see the header):    conv = nconv = base^((st.m - so.m) scale), ntr = 0
  //   far:                      conv = 0 (the chunk goes to so's own maximum instead)
  A conv = A(1), nconv = A(0), ntr = A(1);
  auto refresh = [&]() {
    const bool track = so.m == st.m;
    const bool near = so.m != neg_inf<A>() && (so.m - st.m) * scale >= A(-kSparseFar);
    conv = track ? A(1) : near ? uexp((st.m - so.m) * scale) : A(0);
    nconv = track ? A(0) : conv;
    ntr = track ? A(1) : A(0);
  };
  // a segment is a multiple of 32 columns: a chunk's kVec bits lie in one bitmap word
  auto member_bits = [&](int c) {
    const int j0 = c * N;
    return (bits[j0 >> 5] >> (j0 & 31)) & ((1u << N) - 1u);
  };
  // the bitmap of the ids in [s0, s0 + len), then the chunk loop over those columns
  auto segment = [&](int64_t s0, int64_t len) {
    const int words = static_cast<int>((len + 31) / 32);
    for (int w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0u;
    __syncthreads();
    const SlotRange sl = slots();
    for (int64_t k = threadIdx.x; k < sl.K; k += blockDim.x) {
      const int64_t id = sl.ir[k * si1] - s0;
      if (id >= 0 && id < len) atomicOr(&bits[id >> 5], 1u << (id & 31));  // integer OR
    }
    __syncthreads();
    for_each_chunk<false>(xr + s0, static_cast<int>(len), [&](int c, const Chunk<T>& ch) {
      const A m_old = st.m;
      A e[N];
      const ChunkSum<A> cs = run_chunk<false, false>(st, ch.v, scale, e);
      const uint32_t member = member_bits(c);
      if (__builtin_expect(member == 0u, 1)) {
        if (__builtin_expect(st.m == m_old && conv > A(0), 1)) {
          so.s = fma(cs.t, conv, so.s);
          so.s = fma(cs.n, nconv, so.s);
          so.n = fma(cs.n, ntr, so.n);
        } else if (st.m != m_old) {
          // a new row maximum, an outside column (no member here): so moves to it
          so.s = so.m == neg_inf<A>() ? so.s * A(0)  // 0, or NaN from a NaN column
                                      : (so.s + so.n) * uexp((so.m - st.m) * scale);
          so.n = cs.n;
          so.s += cs.t;
          so.m = st.m;
          refresh();
        } else {  // far: the outside far below the row maximum (or none yet), own maximum
          run_chunk<false, false>(so, ch.v, scale, e);
          refresh();
        }
      } else {
        // a chunk holding ids: its outside columns against so's own maximum
        A v[N];
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = ((member >> k) & 1u) ? neg_inf<A>() : ch.v[k];
        run_chunk<false, false>(so, v, scale, e);
        refresh();
      }
    });
    if (kMode == kSparseKl) {  // after the chunk loop: nothing of it stays live across
      long long c = 0;
      for (int w = threadIdx.x; w < words; w += blockDim.x) c += __popc(bits[w]);
      distinct += block_sum(c, count_scratch);
    }
  };
  if constexpr (!kTail) {
    for_each_chunk(xr, static_cast<int>(V), [&](int, const Chunk<T>& ch) {
      A e[N];
      run_chunk<false, false>(st, ch.v, scale, e);
    });
  } else if constexpr (kSeg) {
    segment(seg0, seg_len);  // one segment per launch (see the header)
  } else {
    segment(0, V);  // V <= kSparseSegCols: one bitmap, no loop around the chunk loop
  }
  st = run_block_reduce<false, false>(st, scale, run_scratch);
  if (kTail) so = run_block_reduce<false, false>(so, scale, run_scratch);
  const SlotRange sl = slots();
  const int64_t K = sl.K;
  const int64_t* ir = sl.ir;
  auto out_at = [&](int64_t k) -> int64_t {  // log-prob k of the row: [n, K] or [nnz]
    if constexpr (kCsr) return sl.kb + k;
    else return row * so0 + k;
  };
  auto tgt_at = [&](int64_t k) -> A {
    if constexpr (kCsr) return tgt[(sl.kb + k) * st1];
    else return tgt[row * st0 + k * st1];
  };
  if constexpr (kSeg) {
    // the earlier segments' states first, then this one's (a fixed order). A launch before
    // the last only hands the merged state on, from thread 0 (the only reader of carry then:
    // no thread reads it after it is overwritten); the last reads it in every thread.
    if (!seg_last && threadIdx.x != 0) return;
    SparseCarry<A>* cr = carry + row;
    if (seg0 > 0) {
      const SparseCarry<A> c = *cr;
      st = run_merge<false, false>(Run<A>{c.m, c.s, c.n, A(0), A(0)}, st, scale);
      so = run_merge<false, false>(Run<A>{c.om, c.os, c.on, A(0), A(0)}, so, scale);
      distinct += c.distinct;
    }
    if (!seg_last) {
      *cr = SparseCarry<A>{st.m, st.s, st.n, so.m, so.s, so.n, distinct};
      return;
    }
  }
  const A mref = shift_of(st.m);                 // raw logits
  const A log_s = d_log1p(run_rest(st));
  const A tail_v = kTail ? log_tail_of(so, st.m, inv_t, log_s) : A(0);
  if (threadIdx.x == 0) {
    stats[row * 3] = st.m * inv_t;
    stats[row * 3 + 1] = log_s;
    stats[row * 3 + 2] = A(0);
    tail[row] = tail_v;
  }
  // (z_id - m) - log s, z - m formed from the raw logits; an id >= V reads nothing: -inf
  auto lp_at = [&](int64_t id) {
    return id < V ? (to_acc(xr[id]) - mref) * inv_t - log_s : neg_inf<A>();
  };
  auto z_at = [&](int64_t id) {
    return id < V ? to_acc(xr[id]) * inv_t : neg_inf<A>();
  };
  if (kMode == kSparseFull) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t id = ir[k * si1];
      out[out_at(k)] = id >= 0 ? lp_at(id) : neg_inf<A>();
    }
  } else if (kMode == kSparseSupport) {
    SoftmaxState<A> sk = softmax_empty<A>();
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t id = ir[k * si1];
      if (id >= 0) softmax_add<false>(sk, z_at(id));
    }
    sk = softmax_block_reduce<false>(sk, scratch);
    // log1p(rest): 1 - s_k of a peaked support keeps its digits (backward uses expm1 of it)
    const A mk = shift_of(sk.m), log_sk = d_log1p(sk.rest);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t id = ir[k * si1];
      out[out_at(k)] = id >= 0 ? (z_at(id) - mk) - log_sk : neg_inf<A>();
    }
  } else {
    A acc = A(0), mass = A(0);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t id = ir[k * si1];
      if (id < 0) continue;  // an unused slot's target is never read (it may be NaN)
      const A t_log = tgt_at(k);
      const A t = d_exp(t_log);
      acc += xmul0(t, t_log - lp_at(id));
      mass += t;
    }
    acc = block_sum(acc, sum_scratch);
    mass = block_sum(mass, sum_scratch);
    if (threadIdx.x == 0) {
      if (kTail) {
        A t_tail = A(1) - mass;
        t_tail = t_tail < A(0) ? A(0) : t_tail;  // keeps NaN
        if (distinct >= V) t_tail = A(0);        // no column outside the ids: no tail bucket
        acc += xmul0(t_tail, d_log(t_tail) - tail_v);
      }
      out[row] = acc;
    }
  }
}

// Backward. gk: grad_logp (full, support; 0 = no gradient) or the targets (kl), [N, K] with
// strides; lp: the forward's log-probs (support); sid / perm: the row's ids sorted (stable,
// unused and out-of-range ids as kSparseSentinel, last) and their slots, contiguous [N, K].
// With p = exp(lp_j), lp_j = (z_j - m) - log s, q = exp(lp_j - tail) (0 at -inf columns),
// G = sum over the valid slots of g_k, and over a column's slots (a run of sid) scat:
//   full:    member -scat expm1(lp) - p (G - scat)  [= scat - p G];     other: -p G
//            tail: member -g_t p;  other + q c_out, c_out = -g_t expm1(tail)  [= g_t (q - p)]
//   support: member scat of (-g_k expm1(lp_k) - s_k (G - g_k)) [= g_k - s_k G]; other 0;
//            tail terms as for full
//   kl:      g_kl (p coef - scat_t) (member),  g_kl (p coef - t_tail q) (other),
//            coef = sum t_k + t_tail
// all times 1/T. The rewrites keep 1 - p on a peak and q - p outside the ids exact.
template <class T, int kMode, bool kTail, bool kCsr>
__global__ void __launch_bounds__(max_threads<T>())
    sparse_bwd_kernel(const T* __restrict__ x, int64_t stride_x, T* __restrict__ grad,
                      int64_t stride_g, int64_t V, const int64_t* __restrict__ idx, int64_t si0,
                      int64_t si1, int64_t k_pad, const int32_t* __restrict__ sid,
                      const int32_t* __restrict__ perm, const acc_t<T>* __restrict__ gk,
                      int64_t sg0, int64_t sg1, const acc_t<T>* __restrict__ lp, int64_t sl0,
                      int64_t sl1, const acc_t<T>* __restrict__ tail_in,
                      const acc_t<T>* __restrict__ g_tail, const acc_t<T>* __restrict__ g_kl,
                      const acc_t<T>* __restrict__ stats, int64_t ss0, int64_t ss1,
                      acc_t<T> inv_t, const int64_t* __restrict__ offs) {
  using A = acc_t<T>;
  __shared__ A sum_scratch[32];
  __shared__ long long count_scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * stride_x;
  T* gr = grad + row * stride_g;
  // the row's slots (Slots, in the header); CSR reads them again after the dense pass
  SlotRange sl = slot_range<kCsr>(offs, row, idx, si0, si1, k_pad);
  int64_t K = sl.K;
  const int64_t* ir = sl.ir;
  const int32_t* sr = kCsr ? sid + sl.kb : sid + row * K;
  const int32_t* pr = kCsr ? perm + sl.kb : perm + row * K;
  const A* gkr = gk != nullptr ? (kCsr ? gk + sl.kb * sg1 : gk + row * sg0) : nullptr;
  auto lp_of = [&](int64_t k) -> A {
    if constexpr (kCsr) return lp[(sl.kb + k) * sl1];
    else return lp[row * sl0 + k * sl1];
  };
  auto slot_value = [&](int64_t k) {  // g_k, or t_k for kl (valid slots only)
    if (gkr == nullptr) return A(0);
    const A val = gkr[k * sg1];
    return kMode == kSparseKl ? d_exp(val) : val;
  };
  A total = A(0);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
    if (ir[k * si1] >= 0) total += slot_value(k);
  total = block_sum(total, sum_scratch);
  const A ms = shift_of(stats[row * ss0]);
  const A log_s = stats[row * ss0 + ss1];
  const A tail_v = kTail ? tail_in[row] : A(0);
  A c_out = A(0), gt = A(0), t_tail = A(0), coef = total, gkl = A(1);
  if (kMode == kSparseKl) {
    gkl = g_kl[row];
    if (kTail) {
      long long c = 0;  // distinct valid ids: the run starts of the sorted ids
      for (int64_t i = threadIdx.x; i < K; i += blockDim.x)
        c += sr[i] != kSparseSentinel && (i == 0 || sr[i - 1] != sr[i]);
      const long long distinct = block_sum(c, count_scratch);
      t_tail = A(1) - total;
      t_tail = t_tail < A(0) ? A(0) : t_tail;
      if (distinct >= V) t_tail = A(0);
      coef = total + t_tail;
    }
  } else if (kTail) {
    gt = g_tail[row];
    c_out = -gt * d_expm1(tail_v);
  }
  // p = exp(l), l = (z - m) - log s; q = exp(l - tail) (0 at -inf columns)
  const ProbOf<A> pp = prob_of(inv_t, ms, log_s);
  const ProbOf<A> pt = prob_of(inv_t, ms, log_s + tail_v);
  const bool ag = aligned16(gr);
  // Every non-member column's gradient is exactly 0 (support mode without tail always; full
  // mode when the slots' gradients sum to 0; a zero tail / kl upstream gradient): write zeros
  // without reading the row (only the member pass below reads its K columns).
  const bool dense_zero =
      kMode == kSparseKl ? gkl == A(0)
                         : (kMode == kSparseSupport || total == A(0)) && (!kTail || gt == A(0));
  if (dense_zero) {
    zero_row(gr, static_cast<int>(V));
  } else {
    for_each_chunk(xr, static_cast<int>(V), [&](int ci, const Chunk<T>& ch) {
      constexpr int N = Chunk<T>::N;
      A gv[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A zs = pp.zs(ch.v[k]);
        const A p = pp.p(zs);
        A g;
        if (kMode == kSparseKl) {
          g = p * coef;
          if (kTail) g -= t_tail * (zs == neg_inf<A>() ? A(0) : pt.p(zs));
          g *= gkl;
        } else {
          g = kMode == kSparseFull ? -p * total : A(0);
          if (kTail) g = fma(zs == neg_inf<A>() ? A(0) : pt.p(zs), c_out, g);
        }
        gv[k] = g * inv_t;
      }
      store_chunk(gr, ci, static_cast<int>(V), ag, gv);
    });
  }
  __syncthreads();  // the dense values of the member columns are written: overwrite them
  if constexpr (kCsr) {  // not kept live across the dense pass (see slot_range)
    sl = slot_range<kCsr>(offs, row, idx, si0, si1, k_pad);
    K = sl.K;
    sr = sid + sl.kb;
    pr = perm + sl.kb;
    gkr = gk != nullptr ? gk + sl.kb * sg1 : nullptr;
  }
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    const int32_t j = sr[i];
    if (j == kSparseSentinel || (i > 0 && sr[i - 1] == j)) continue;
    A scat = A(0);
    for (int64_t r = i; r < K && sr[r] == j; ++r) {
      const int64_t k = pr[r];
      A val = slot_value(k);
      if (kMode == kSparseSupport) {
        // g_k - s_k G as -g_k expm1(lp_k) - s_k (G - g_k): exact where s_k ~ 1. At most one
        // distinct id of a row has s_k > 1/2; below, s_k - 1 is expm1 to an ulp (|.| >= 1/2),
        // so the common path skips the series
        const A lpk = lp_of(k);
        const A sk = d_exp(lpk);
        const A em1 = lpk > A(-0.6931471805599453) ? d_expm1(lpk) : sk - A(1);
        val = -val * em1 - sk * (total - val);
      }
      scat += val;
    }
    const A z = to_acc(xr[j]) * inv_t;
    const A l = (z - ms) - log_s;
    const A p = d_exp(l);
    A g;
    if (kMode == kSparseKl) {
      g = (p * coef - scat) * gkl;
    } else {
      g = kMode == kSparseFull ? -scat * d_expm1(l) - p * (total - scat) : scat;
      if (kTail) g -= gt * p;
    }
    gr[j] = from_acc<T>(g * inv_t);
  }
}

}  // namespace

// ------------------------------------------------------------------------------ launchers

void sparse_forward(Rows logits, Matrix indices, Matrix target, Rows out, std::uintptr_t tail,
                    std::uintptr_t stats, int64_t n, int64_t vocab, int64_t k, int dtype,
                    int mode, bool with_tail, double inv_temperature, std::uintptr_t carry,
                    std::uintptr_t offsets, std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "sparse_forward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "sparse_forward: vocab must be in [1, 2**31 - 1), got " + std::to_string(vocab));
  RLK_CHECK_ARG(k >= 0, "sparse_forward: k must be >= 0, got " + std::to_string(k));
  RLK_CHECK_ARG(mode >= 0 && mode <= 2, "sparse_forward: mode code must be 0 (full), "
                                        "1 (support) or 2 (kl), got " + std::to_string(mode));
  dispatch_logits(dtype, "sparse_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits.ptr != 0 && (k == 0 || indices.ptr != 0) && tail != 0 && stats != 0 &&
                      (out.ptr != 0 || k == 0) &&
                      (mode != kSparseKl || target.ptr != 0 || k == 0),
                  "sparse_forward: null device pointer");
    RLK_CHECK_ARG(!with_tail || vocab <= kSparseSegCols || carry != 0,
                  "sparse_forward: with_tail and vocab > " + std::to_string(kSparseSegCols) +
                      " need carry (a 64-byte-per-row workspace), got a null pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
    int64_t s0 = 0, seg_len = vocab;  // the launch's columns (kSeg: one segment)
    auto launch = [&](auto csr) {     // csr: std::bool_constant, kCsr (offsets != 0)
#define RLK_SPARSE_FWD(MODE, TAIL, SEG)                                                        \
  sparse_fwd_kernel<T, MODE, TAIL, SEG, decltype(csr)::value><<<grid, threads, 0, s>>>(       \
      as_cptr<T>(logits.ptr), logits.stride, vocab, as_cptr<int64_t>(indices.ptr),             \
      indices.stride0, indices.stride1, k, as_cptr<A>(target.ptr), target.stride0,             \
      target.stride1, as_ptr<A>(out.ptr), out.stride, as_ptr<A>(tail), as_ptr<A>(stats),       \
      static_cast<A>(inv_temperature), static_cast<A>(scale_of(dtype, inv_temperature)),      \
      as_ptr<SparseCarry<A>>(carry), s0, seg_len, s0 + seg_len == vocab,                      \
      as_cptr<int64_t>(offsets))
    // the tail kernels: one bitmap segment, or one launch per segment (V > kSparseSegCols;
    // the row states go from launch to launch in carry, on the same stream)
#define RLK_SPARSE_FWD_TAIL(MODE)                                                              \
  if (!with_tail) { RLK_SPARSE_FWD(MODE, false, false); }                                     \
  else if (vocab <= kSparseSegCols) { RLK_SPARSE_FWD(MODE, true, false); }                    \
  else {                                                                                       \
    for (s0 = 0; s0 < vocab; s0 += kSparseSegCols) {                                           \
      seg_len = vocab - s0 < kSparseSegCols ? vocab - s0 : kSparseSegCols;                     \
      RLK_SPARSE_FWD(MODE, true, true);                                                        \
    }                                                                                          \
  }
      if (mode == kSparseFull) { RLK_SPARSE_FWD_TAIL(kSparseFull); }
      else if (mode == kSparseSupport) { RLK_SPARSE_FWD_TAIL(kSparseSupport); }
      else { RLK_SPARSE_FWD_TAIL(kSparseKl); }
#undef RLK_SPARSE_FWD_TAIL
#undef RLK_SPARSE_FWD
    };
    if (offsets != 0) launch(std::true_type{});
    else launch(std::false_type{});
    RLK_CHECK_LAUNCH();
  });
}

void sparse_backward(Rows logits, Rows grad, Matrix indices, std::uintptr_t sorted_ids,
                     std::uintptr_t perm, Matrix slot_values, Matrix logp, std::uintptr_t tail,
                     std::uintptr_t grad_tail, std::uintptr_t grad_kl, Matrix stats, int64_t n,
                     int64_t vocab, int64_t k, int dtype, int mode, bool with_tail,
                     double inv_temperature, std::uintptr_t offsets, std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "sparse_backward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "sparse_backward: vocab must be in [1, 2**31 - 1), got " + std::to_string(vocab));
  RLK_CHECK_ARG(k >= 0, "sparse_backward: k must be >= 0, got " + std::to_string(k));
  RLK_CHECK_ARG(mode >= 0 && mode <= 2, "sparse_backward: mode code must be 0 (full), "
                                        "1 (support) or 2 (kl), got " + std::to_string(mode));
  dispatch_logits(dtype, "sparse_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits.ptr != 0 && grad.ptr != 0 && stats.ptr != 0 &&
                      (k == 0 || (indices.ptr != 0 && sorted_ids != 0 && perm != 0)),
                  "sparse_backward: null device pointer");
    RLK_CHECK_ARG(mode != kSparseSupport || k == 0 || logp.ptr != 0,
                  "sparse_backward: support mode needs the forward's log-probs (logp)");
    RLK_CHECK_ARG(mode != kSparseKl || (grad_kl != 0 && (k == 0 || slot_values.ptr != 0)),
                  "sparse_backward: kl mode needs grad_kl and the targets (slot_values)");
    RLK_CHECK_ARG(!with_tail || (tail != 0 && (mode == kSparseKl || grad_tail != 0)),
                  "sparse_backward: with_tail needs tail (and grad_tail unless kl)");
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
    auto launch = [&](auto csr) {  // csr: std::bool_constant, kCsr (offsets != 0)
#define RLK_SPARSE_BWD(MODE, TAIL)                                                             \
  sparse_bwd_kernel<T, MODE, TAIL, decltype(csr)::value><<<grid, threads, 0, s>>>(            \
      as_cptr<T>(logits.ptr), logits.stride, as_ptr<T>(grad.ptr), grad.stride, vocab,          \
      as_cptr<int64_t>(indices.ptr), indices.stride0, indices.stride1, k,                      \
      as_cptr<int32_t>(sorted_ids), as_cptr<int32_t>(perm), as_cptr<A>(slot_values.ptr),       \
      slot_values.stride0, slot_values.stride1, as_cptr<A>(logp.ptr), logp.stride0,            \
      logp.stride1, as_cptr<A>(tail), as_cptr<A>(grad_tail), as_cptr<A>(grad_kl),             \
      as_cptr<A>(stats.ptr), stats.stride0, stats.stride1, static_cast<A>(inv_temperature),      \
      as_cptr<int64_t>(offsets))
      if (mode == kSparseFull) {
        if (with_tail) RLK_SPARSE_BWD(kSparseFull, true);
        else RLK_SPARSE_BWD(kSparseFull, false);
      } else if (mode == kSparseSupport) {
        if (with_tail) RLK_SPARSE_BWD(kSparseSupport, true);
        else RLK_SPARSE_BWD(kSparseSupport, false);
      } else {
        if (with_tail) RLK_SPARSE_BWD(kSparseKl, true);
        else RLK_SPARSE_BWD(kSparseKl, false);
      }
#undef RLK_SPARSE_BWD
    };
    if (offsets != 0) launch(std::true_type{});
    else launch(std::false_type{});
    RLK_CHECK_LAUNCH();
  });
}

}  // namespace rlk
