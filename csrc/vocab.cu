// Vocabulary family (ops that read logits [N, V]): token_logprobs (+ entropy),
// kl_divergence, sparse_logprobs and sparse_kl, forward and backward. Python launchers: rlkernels/cuda/vocab.py. The math is
// stated in rlkernels/reference/vocab.py; this file states how it is streamed.
//
// Layout of every kernel: one block per row (grid = N), so a row's result never depends on N
// (batch invariance, determinism without atomics). Each thread owns chunks of 16 bytes of the
// row (common.cuh: for_each_col) and folds them into an online-softmax state in fp32 (fp64
// for fp64 logits); the states are merged in a fixed tree. Row offsets are 64-bit.
//
// Saved per-row statistics, [N, 3] in the accumulation type (same as the other backends):
//   (m = max z, log s = log1p(rest), a row sum backward needs)
// with z = logits * (1 / T), rest = sum exp(z - m) over every column but one arg-max.
#include "common.cuh"
#include "rlkernels.h"

namespace rlk {
namespace {

constexpr int kMaxThreads = 512;

// m shifted by 0 when a row is all -inf: its probabilities are 0, its log-probs -inf (not NaN).
template <class A>
__device__ __forceinline__ A shift_of(A m) {
  return m == neg_inf<A>() ? A(0) : m;
}

// Write f(col) (in the accumulation type) to every column of an output row, this thread's
// share; 16-byte stores when the row is aligned. Used for rows that are not read (padding).
template <class T, class F>
__device__ __forceinline__ void store_row(T* row, int64_t V, F&& f) {
  constexpr int kVec = VecWidth<T>::value;
  const int64_t full = V / kVec;
  if ((reinterpret_cast<std::uintptr_t>(row) & 15u) == 0) {
    Pack<T, kVec>* vp = reinterpret_cast<Pack<T, kVec>*>(row);
    for (int64_t c = threadIdx.x; c < full; c += blockDim.x) {
      Pack<T, kVec> p;
#pragma unroll
      for (int k = 0; k < kVec; ++k) p.v[k] = from_acc<T>(f(c * kVec + k));
      vp[c] = p;
    }
  } else {
    for (int64_t j = threadIdx.x; j < full * kVec; j += blockDim.x) row[j] = from_acc<T>(f(j));
  }
  for (int64_t j = full * kVec + threadIdx.x; j < V; j += blockDim.x) row[j] = from_acc<T>(f(j));
}

// out[col] = f(col, x[col]) for every column of a row, this thread's share. `in` and `out`
// may be the same row (in-place backward): each element is read before it is written, by
// the same thread, so no __restrict__ here.
template <class T, class F>
__device__ __forceinline__ void map_row(const T* in, T* out, int64_t V, F&& f) {
  constexpr int kVec = VecWidth<T>::value;
  const int64_t full = V / kVec;
  const bool aligned = ((reinterpret_cast<std::uintptr_t>(in) |
                         reinterpret_cast<std::uintptr_t>(out)) & 15u) == 0;
  if (aligned) {
    const Pack<T, kVec>* ip = reinterpret_cast<const Pack<T, kVec>*>(in);
    Pack<T, kVec>* op = reinterpret_cast<Pack<T, kVec>*>(out);
    for (int64_t c = threadIdx.x; c < full; c += blockDim.x) {
      const Pack<T, kVec> a = ip[c];
      Pack<T, kVec> b;
#pragma unroll
      for (int k = 0; k < kVec; ++k) b.v[k] = from_acc<T>(f(c * kVec + k, to_acc(a.v[k])));
      op[c] = b;
    }
  } else {
    for (int64_t j = threadIdx.x; j < full * kVec; j += blockDim.x)
      out[j] = from_acc<T>(f(j, to_acc(in[j])));
  }
  for (int64_t j = full * kVec + threadIdx.x; j < V; j += blockDim.x)
    out[j] = from_acc<T>(f(j, to_acc(in[j])));
}

// f(col, x[col], y[col]) for the columns of a row pair, this thread's share, in the fixed
// chunk order of for_each_col (the order matters: forward sums are taken in it).
template <class T, class F>
__device__ __forceinline__ void for_each_col2(const T* x, const T* y, int64_t V, F&& f) {
  constexpr int kVec = VecWidth<T>::value;
  const int64_t full = V / kVec;
  const bool aligned = ((reinterpret_cast<std::uintptr_t>(x) |
                         reinterpret_cast<std::uintptr_t>(y)) & 15u) == 0;
  for (int64_t c = threadIdx.x; c < full; c += blockDim.x) {
    if (aligned) {
      const Pack<T, kVec> a = reinterpret_cast<const Pack<T, kVec>*>(x)[c];
      const Pack<T, kVec> b = reinterpret_cast<const Pack<T, kVec>*>(y)[c];
#pragma unroll
      for (int k = 0; k < kVec; ++k) f(c * kVec + k, to_acc(a.v[k]), to_acc(b.v[k]));
    } else {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const int64_t j = c * kVec + k;
        f(j, to_acc(x[j]), to_acc(y[j]));
      }
    }
  }
  const int64_t tail = full * kVec;
  if (tail < V && static_cast<int64_t>(threadIdx.x) == full % blockDim.x) {
    for (int64_t j = tail; j < V; ++j) f(j, to_acc(x[j]), to_acc(y[j]));
  }
}

// ============================================================== token_logprobs / entropy

// Forward, one block per row:
//   stats = (m, log s, sum p (z - m) or 0),  logp = (z_y - m) - log s,
//   entropy = log s - sum p (z - m)   (= lse - sum p z, both terms >= 0: exact when peaked),
// with sum p (z - m) = S1 / (1 + rest), S1 = sum exp(z - m) (z - m). Rows whose token is
// ignore_index are not read: outputs 0, stats 0 (backward never reads them). A token outside
// [0, V) reads nothing and gives NaN (only reachable with debug checks off).
template <class T, bool kWithEnt, bool kHasTok>
__global__ void __launch_bounds__(kMaxThreads)
    token_logprobs_fwd_kernel(const T* __restrict__ x, int64_t stride_x,
                              const int64_t* __restrict__ tok, int64_t stride_tok,
                              acc_t<T>* __restrict__ logp, acc_t<T>* __restrict__ ent,
                              acc_t<T>* __restrict__ stats, int64_t V, acc_t<T> inv_t,
                              int64_t ignore_index) {
  using A = acc_t<T>;
  __shared__ SoftmaxState<A> scratch[32];
  const int64_t row = blockIdx.x;
  int64_t y = 0;
  if (kHasTok) {
    y = tok[row * stride_tok];
    if (y == ignore_index) {  // uniform over the block: returning before any barrier is safe
      if (threadIdx.x == 0) {
        logp[row] = A(0);
        ent[row] = A(0);
        stats[row * 3] = A(0);
        stats[row * 3 + 1] = A(0);
        stats[row * 3 + 2] = A(0);
      }
      return;
    }
  }
  const T* xr = x + row * stride_x;
  SoftmaxState<A> st = softmax_empty<A>();
  for_each_col(xr, V, [&](int64_t, A v) { softmax_add<kWithEnt>(st, v * inv_t); });
  st = softmax_block_reduce<kWithEnt>(st, scratch);
  if (threadIdx.x != 0) return;
  const A log_s = d_log1p(st.rest);
  stats[row * 3] = st.m;
  stats[row * 3 + 1] = log_s;
  if (kWithEnt) {
    const A sum_pzs = st.s1 / (A(1) + st.rest);
    stats[row * 3 + 2] = sum_pzs;
    ent[row] = log_s - sum_pzs;
  } else {
    stats[row * 3 + 2] = A(0);
    ent[row] = A(0);
  }
  if (kHasTok) {
    const A z_y = (y >= 0 && y < V) ? to_acc(xr[y]) * inv_t : quiet_nan<A>();
    logp[row] = (z_y - shift_of(st.m)) - log_s;
  } else {
    logp[row] = A(0);
  }
}

// Backward, one block per row, gradient in the logits' dtype (out may be x: in place):
//   d/dz_j = -g p_j  (j != y),   -g expm1(log p_y)  (j = y: g (1 - p_y) without cancellation)
//            - g_H xmul0(p_j, (z_j - m) - sum p (z - m)),      all times 1/T,
// p_j = exp((z_j - m) - log s) from the saved stats. Padding rows get exactly 0 and are not
// read. A token outside [0, V) (vocabulary parallelism: another rank's column) gives no
// one-hot term. kHasGlp needs tokens.
template <class T, bool kHasGlp, bool kHasGh>
__global__ void __launch_bounds__(kMaxThreads)
    token_logprobs_bwd_kernel(const acc_t<T>* glp, int64_t stride_glp, const acc_t<T>* gh,
                              int64_t stride_gh, const T* x, int64_t stride_x,
                              const int64_t* tok, int64_t stride_tok, bool has_tok,
                              const acc_t<T>* stats, int64_t stride_s0, int64_t stride_s1,
                              T* out, int64_t stride_out, int64_t V, acc_t<T> inv_t,
                              int64_t ignore_index) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  T* orow = out + row * stride_out;
  const int64_t y = has_tok ? tok[row * stride_tok] : int64_t(-1);
  if (has_tok && y == ignore_index) {
    store_row(orow, V, [](int64_t) { return A(0); });
    return;
  }
  const T* xr = x + row * stride_x;
  const A m = shift_of(stats[row * stride_s0]);
  const A log_s = stats[row * stride_s0 + stride_s1];
  const A sum_pzs = stats[row * stride_s0 + 2 * stride_s1];
  A g_lp = A(0), g_h = A(0), tok_grad = A(0);
  if (kHasGlp) {
    g_lp = glp[row * stride_glp] * inv_t;
    const A z_y = (y >= 0 && y < V) ? to_acc(xr[y]) * inv_t : quiet_nan<A>();
    tok_grad = -g_lp * d_expm1((z_y - m) - log_s);
  }
  if (kHasGh) g_h = gh[row * stride_gh] * inv_t;
  // In place: every thread has read x[y] above before any thread overwrites that column.
  __syncthreads();
  map_row(xr, orow, V, [&](int64_t j, A v) {
    const A zs = v * inv_t - m;
    const A p = d_exp(zs - log_s);
    A g = A(0);
    if (kHasGlp) g = (j == y) ? tok_grad : -g_lp * p;
    if (kHasGh) g -= g_h * xmul0(p, zs - sum_pzs);
    return g;
  });
}

// ============================================================================= kl_divergence

enum KlKind : int { kReverse = 0, kForward = 1, kJsd = 2 };

template <class A>
__device__ __forceinline__ A logaddexp(A a, A b) {
  const A mx = a > b ? a : b;
  const A mn = a > b ? b : a;
  return mx + d_log1p(d_exp(mn - shift_of(mx)));  // both -inf: -inf + log1p(0) = -inf
}

struct JsdConst {
  double beta, omb, log_beta, log_omb;  // beta, 1 - beta, log beta, log(1 - beta)
};

// The KL terms of one column from log p and log q: p, q and the products p a_p, q a_q
// (a = d KL / d log r of the reference's _kl_terms; 0 * anything = 0).
template <int kKind, class A>
__device__ __forceinline__ void kl_column(A logp, A logq, A beta, A omb, A lb, A l1b, A& pa,
                                          A& qa, A& p, A& q) {
  p = d_exp(logp);
  q = d_exp(logq);
  if (kKind == kReverse) {
    pa = xmul0(p, logp - logq);
    qa = A(0);
  } else if (kKind == kForward) {
    pa = A(0);
    qa = xmul0(q, logq - logp);
  } else {
    const A logm = logaddexp(logp + lb, logq + l1b);
    pa = xmul0(p, beta * (logp - logm));
    qa = xmul0(q, omb * (logq - logm));
  }
}

// Forward, one block per row pair, two passes: the statistics of both rows, then
//   reverse: KL(p||q) = sum p (log p - log q);  forward: KL(q||p) = sum q (log q - log p);
//   jsd: beta sum p (log p - log m) + (1 - beta) sum q (log q - log m),
//        log m = logaddexp(log p + log beta, log q + log(1 - beta)),
// log p = (z - m_p) - log s_p. Saves stats_p = (m_p, log s_p, sum p a_p) and stats_q alike
// (the row sums the one-pass backward needs). ignore_mask rows: 0 everywhere, not read.
template <class T, int kKind>
__global__ void __launch_bounds__(kMaxThreads)
    kl_fwd_kernel(const T* __restrict__ x, int64_t stride_x, const T* __restrict__ y,
                  int64_t stride_y, const uint8_t* __restrict__ mask, int64_t stride_mask,
                  acc_t<T>* __restrict__ kl, acc_t<T>* __restrict__ sp,
                  acc_t<T>* __restrict__ sq, int64_t V, acc_t<T> inv_t, JsdConst c) {
  using A = acc_t<T>;
  __shared__ SoftmaxState<A> scratch[32];
  __shared__ A sum_scratch[32];
  const int64_t row = blockIdx.x;
  if (mask != nullptr && mask[row * stride_mask] != 0) {
    if (threadIdx.x == 0) {
      kl[row] = A(0);
      for (int k = 0; k < 3; ++k) sp[row * 3 + k] = sq[row * 3 + k] = A(0);
    }
    return;
  }
  const T* xr = x + row * stride_x;
  const T* yr = y + row * stride_y;
  SoftmaxState<A> st_p = softmax_empty<A>(), st_q = softmax_empty<A>();
  for_each_col2(xr, yr, V, [&](int64_t, A a, A b) {
    softmax_add<false>(st_p, a * inv_t);
    softmax_add<false>(st_q, b * inv_t);
  });
  st_p = softmax_block_reduce<false>(st_p, scratch);
  st_q = softmax_block_reduce<false>(st_q, scratch);
  const A m_p = shift_of(st_p.m), ls_p = d_log1p(st_p.rest);
  const A m_q = shift_of(st_q.m), ls_q = d_log1p(st_q.rest);
  const A beta = A(c.beta), omb = A(c.omb), lb = A(c.log_beta), l1b = A(c.log_omb);
  A acc_p = A(0), acc_q = A(0);
  for_each_col2(xr, yr, V, [&](int64_t, A a, A b) {
    A pa, qa, p, q;
    kl_column<kKind>((a * inv_t - m_p) - ls_p, (b * inv_t - m_q) - ls_q, beta, omb, lb, l1b,
                     pa, qa, p, q);
    acc_p += pa;
    acc_q += qa;
  });
  acc_p = block_sum(acc_p, sum_scratch);
  acc_q = block_sum(acc_q, sum_scratch);
  if (threadIdx.x == 0) {
    kl[row] = acc_p + acc_q;
    sp[row * 3] = st_p.m;
    sp[row * 3 + 1] = ls_p;
    sp[row * 3 + 2] = acc_p;
    sq[row * 3] = st_q.m;
    sq[row * 3 + 1] = ls_q;
    sq[row * 3 + 2] = acc_q;
  }
}

// Backward, one pass over the row pair, g = grad_kl / T:
//   reverse: dz = p (log p - log q) - p sum_p,  dw = q - p
//   forward: dz = p - q,                        dw = q (log q - log p) - q sum_q
//   jsd:     dz = p a_p - p sum_p,              dw = q a_q - q sum_q
// (r (a - sum r a), with the row sums saved by forward). ignore_mask rows get exactly 0.
template <class T, int kKind, bool kNeedW>
__global__ void __launch_bounds__(kMaxThreads)
    kl_bwd_kernel(const acc_t<T>* __restrict__ grad, int64_t stride_g, const T* __restrict__ x,
                  int64_t stride_x, const T* __restrict__ y, int64_t stride_y,
                  const uint8_t* __restrict__ mask, int64_t stride_mask,
                  const acc_t<T>* __restrict__ sp, int64_t sp0, int64_t sp1,
                  const acc_t<T>* __restrict__ sq, int64_t sq0, int64_t sq1,
                  T* __restrict__ gx, int64_t stride_gx, T* __restrict__ gy, int64_t stride_gy,
                  int64_t V, acc_t<T> inv_t, JsdConst c) {
  using A = acc_t<T>;
  const int64_t row = blockIdx.x;
  T* gxr = gx + row * stride_gx;
  T* gyr = kNeedW ? gy + row * stride_gy : nullptr;
  if (mask != nullptr && mask[row * stride_mask] != 0) {
    store_row(gxr, V, [](int64_t) { return A(0); });
    if (kNeedW) store_row(gyr, V, [](int64_t) { return A(0); });
    return;
  }
  const T* xr = x + row * stride_x;
  const T* yr = y + row * stride_y;
  const A g = grad[row * stride_g] * inv_t;
  const A m_p = shift_of(sp[row * sp0]), ls_p = sp[row * sp0 + sp1], sum_p = sp[row * sp0 + 2 * sp1];
  const A m_q = shift_of(sq[row * sq0]), ls_q = sq[row * sq0 + sq1], sum_q = sq[row * sq0 + 2 * sq1];
  const A beta = A(c.beta), omb = A(c.omb), lb = A(c.log_beta), l1b = A(c.log_omb);
  // Scalar stores keep this simple (x, y, gx, gy may each have their own alignment); the
  // loads follow the chunk layout of forward.
  for_each_col2(xr, yr, V, [&](int64_t j, A a, A b) {
    A pa, qa, p, q;
    kl_column<kKind>((a * inv_t - m_p) - ls_p, (b * inv_t - m_q) - ls_q, beta, omb, lb, l1b,
                     pa, qa, p, q);
    A dz, dw;
    if (kKind == kReverse) {
      dz = pa - p * sum_p;
      dw = q - p;
    } else if (kKind == kForward) {
      dz = p - q;
      dw = qa - q * sum_q;
    } else {
      dz = pa - p * sum_p;
      dw = qa - q * sum_q;
    }
    gxr[j] = from_acc<T>(g * dz);
    if (kNeedW) gyr[j] = from_acc<T>(g * dw);
  });
}

// ============================================================== sparse_logprobs / sparse_kl
//
// One block per row, z = x / T, row statistics (m, log s) of the whole row as above. Modes:
//   kFull:    logp_k = (z_k - m) - log s                        (full-vocabulary log-probs)
//   kSupport: logp_k = (z_k - m_K) - log1p(rest_K)              (softmax over the valid slots)
//   kKl:      kl = sum_k t_k (log t_k - logp_k) [+ t_tail (log t_tail - tail)],
//             t_k = exp(target_k), t_tail = max(1 - sum t_k, 0), 0 when the ids cover V
// Slot k is valid iff its id is >= 0 (-1: unused slot, output -inf); a valid id >= V (only
// reachable with debug checks off) reads as a -inf logit and is a member of no column.
// tail = log of the full-vocabulary mass outside the row's distinct valid ids, from its own
// online (max, rest) over those columns (never log(1 - sum): exact on peaked rows).
// Membership (forward): a bitmap of the ids in shared memory, kSparseSegCols columns at a
// time (one segment covers V <= 262144; a larger V re-reads the ids once per segment).
// Backward: a dense pass writes every column's non-member gradient; after a barrier, the
// first slot of each run of equal ids in the row's sorted ids (sorted by the launcher, stable,
// so duplicate ids sum in slot order: deterministic) overwrites its column with the member
// gradient. Every value comes from one thread in a fixed order: no atomics.

enum SparseMode : int { kSparseFull = 0, kSparseSupport = 1, kSparseKl = 2 };
constexpr int kSparseWords = 8192;                   // 32 KiB of bitmap
constexpr int64_t kSparseSegCols = 32 * kSparseWords;
constexpr int32_t kSparseSentinel = 0x7fffffff;      // sorted id of an unused / bad slot

template <class A>
__device__ __forceinline__ A log_tail_of(const SoftmaxState<A>& out, A ms, A log_s) {
  // (max outside - m) + log1p(rest outside) - log s; -inf when no outside column is finite
  return (out.m - ms) + d_log1p(out.rest) - log_s;
}

template <class T, int kMode, bool kTail>
__global__ void __launch_bounds__(kMaxThreads)
    sparse_fwd_kernel(const T* __restrict__ x, int64_t stride_x, int64_t V,
                      const int64_t* __restrict__ idx, int64_t si0, int64_t si1, int64_t K,
                      const acc_t<T>* __restrict__ tgt, int64_t st0, int64_t st1,
                      acc_t<T>* __restrict__ out, int64_t so0, acc_t<T>* __restrict__ tail,
                      acc_t<T>* __restrict__ stats, acc_t<T> inv_t) {
  using A = acc_t<T>;
  __shared__ SoftmaxState<A> scratch[32];
  __shared__ A sum_scratch[32];
  __shared__ long long count_scratch[32];
  __shared__ uint32_t bits[kTail ? kSparseWords : 1];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * stride_x;
  const int64_t* ir = idx + row * si0;
  SoftmaxState<A> st = softmax_empty<A>(), so = softmax_empty<A>();
  long long distinct = 0;
  if (!kTail) {
    for_each_col(xr, V, [&](int64_t, A v) { softmax_add<false>(st, v * inv_t); });
  } else {
    for (int64_t s0 = 0; s0 < V; s0 += kSparseSegCols) {
      const int64_t len = V - s0 < kSparseSegCols ? V - s0 : kSparseSegCols;
      const int words = static_cast<int>((len + 31) / 32);
      for (int w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0u;
      __syncthreads();
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
        const int64_t id = ir[k * si1] - s0;
        if (id >= 0 && id < len) atomicOr(&bits[id >> 5], 1u << (id & 31));  // integer OR
      }
      __syncthreads();
      if (kMode == kSparseKl) {
        long long c = 0;
        for (int w = threadIdx.x; w < words; w += blockDim.x) c += __popc(bits[w]);
        distinct += block_sum(c, count_scratch);
      }
      for_each_col(xr + s0, len, [&](int64_t j, A v) {
        const A z = v * inv_t;
        softmax_add<false>(st, z);
        if (!((bits[j >> 5] >> (j & 31)) & 1u)) softmax_add<false>(so, z);
      });
      __syncthreads();  // the next segment clears the bitmap
    }
  }
  st = softmax_block_reduce<false>(st, scratch);
  if (kTail) so = softmax_block_reduce<false>(so, scratch);
  const A ms = shift_of(st.m), log_s = d_log1p(st.rest);
  const A tail_v = kTail ? log_tail_of(so, ms, log_s) : A(0);
  if (threadIdx.x == 0) {
    stats[row * 3] = st.m;
    stats[row * 3 + 1] = log_s;
    stats[row * 3 + 2] = A(0);
    tail[row] = tail_v;
  }
  auto z_at = [&](int64_t id) {
    return id < V ? to_acc(xr[id]) * inv_t : neg_inf<A>();
  };
  if (kMode == kSparseFull) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t id = ir[k * si1];
      out[row * so0 + k] = id >= 0 ? (z_at(id) - ms) - log_s : neg_inf<A>();
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
      out[row * so0 + k] = id >= 0 ? (z_at(id) - mk) - log_sk : neg_inf<A>();
    }
  } else {
    A acc = A(0), mass = A(0);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t id = ir[k * si1];
      if (id < 0) continue;  // an unused slot's target is never read (it may be NaN)
      const A t_log = tgt[row * st0 + k * st1];
      const A t = d_exp(t_log);
      acc += xmul0(t, t_log - ((z_at(id) - ms) - log_s));
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
template <class T, int kMode, bool kTail>
__global__ void __launch_bounds__(kMaxThreads)
    sparse_bwd_kernel(const T* __restrict__ x, int64_t stride_x, T* __restrict__ grad,
                      int64_t stride_g, int64_t V, const int64_t* __restrict__ idx, int64_t si0,
                      int64_t si1, int64_t K, const int32_t* __restrict__ sid,
                      const int32_t* __restrict__ perm, const acc_t<T>* __restrict__ gk,
                      int64_t sg0, int64_t sg1, const acc_t<T>* __restrict__ lp, int64_t sl0,
                      int64_t sl1, const acc_t<T>* __restrict__ tail_in,
                      const acc_t<T>* __restrict__ g_tail, const acc_t<T>* __restrict__ g_kl,
                      const acc_t<T>* __restrict__ stats, int64_t ss0, int64_t ss1,
                      acc_t<T> inv_t) {
  using A = acc_t<T>;
  __shared__ A sum_scratch[32];
  __shared__ long long count_scratch[32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * stride_x;
  T* gr = grad + row * stride_g;
  const int64_t* ir = idx + row * si0;
  const int32_t* sr = sid + row * K;
  const int32_t* pr = perm + row * K;
  const A* gkr = gk != nullptr ? gk + row * sg0 : nullptr;
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
  auto q_of = [&](A z, A l) { return z == neg_inf<A>() ? A(0) : d_exp(l - tail_v); };
  map_row(xr, gr, V, [&](int64_t, A v) {
    const A z = v * inv_t;
    const A l = (z - ms) - log_s;
    const A p = d_exp(l);
    A g;
    if (kMode == kSparseKl) {
      g = p * coef;
      if (kTail) g -= t_tail * q_of(z, l);
      g *= gkl;
    } else {
      g = kMode == kSparseFull ? -p * total : A(0);
      if (kTail) g += q_of(z, l) * c_out;
    }
    return g * inv_t;
  });
  __syncthreads();  // the dense values of the member columns are written: overwrite them
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    const int32_t j = sr[i];
    if (j == kSparseSentinel || (i > 0 && sr[i - 1] == j)) continue;
    A scat = A(0);
    for (int64_t r = i; r < K && sr[r] == j; ++r) {
      const int64_t k = pr[r];
      A val = slot_value(k);
      if (kMode == kSparseSupport) {
        const A lpk = lp[row * sl0 + k * sl1];
        val = -val * d_expm1(lpk) - d_exp(lpk) * (total - val);
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

cudaStream_t checked_stream(std::uintptr_t s) { return as_stream(s); }

}  // namespace

// ------------------------------------------------------------------------------ launchers

void token_logprobs_forward(std::uintptr_t logits, int64_t stride_x, std::uintptr_t tokens,
                            int64_t stride_tok, std::uintptr_t logp, std::uintptr_t ent,
                            std::uintptr_t stats, int64_t n, int64_t vocab, int dtype,
                            double inv_temperature, int64_t ignore_index, bool with_entropy,
                            std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "token_logprobs_forward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1, "token_logprobs_forward: vocab must be >= 1, got " +
                                std::to_string(vocab));
  dispatch_logits(dtype, "token_logprobs_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits != 0 && logp != 0 && ent != 0 && stats != 0,
                  "token_logprobs_forward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, kMaxThreads);
    const cudaStream_t s = checked_stream(stream);
    const T* x = as_cptr<T>(logits);
    const int64_t* tk = as_cptr<int64_t>(tokens);
    A* lp = as_ptr<A>(logp);
    A* en = as_ptr<A>(ent);
    A* st = as_ptr<A>(stats);
    const A it = static_cast<A>(inv_temperature);
    const dim3 grid(static_cast<unsigned>(n));
    if (tokens != 0) {
      if (with_entropy)
        token_logprobs_fwd_kernel<T, true, true><<<grid, threads, 0, s>>>(
            x, stride_x, tk, stride_tok, lp, en, st, vocab, it, ignore_index);
      else
        token_logprobs_fwd_kernel<T, false, true><<<grid, threads, 0, s>>>(
            x, stride_x, tk, stride_tok, lp, en, st, vocab, it, ignore_index);
    } else {
      if (with_entropy)
        token_logprobs_fwd_kernel<T, true, false><<<grid, threads, 0, s>>>(
            x, stride_x, nullptr, 0, lp, en, st, vocab, it, ignore_index);
      else
        token_logprobs_fwd_kernel<T, false, false><<<grid, threads, 0, s>>>(
            x, stride_x, nullptr, 0, lp, en, st, vocab, it, ignore_index);
    }
    RLK_CHECK_LAUNCH();
  });
}

void token_logprobs_backward(std::uintptr_t grad_logp, int64_t stride_glp,
                             std::uintptr_t grad_entropy, int64_t stride_gh,
                             std::uintptr_t logits, int64_t stride_x, std::uintptr_t tokens,
                             int64_t stride_tok, std::uintptr_t stats, int64_t stride_s0,
                             int64_t stride_s1, std::uintptr_t out, int64_t stride_out,
                             int64_t n, int64_t vocab, int dtype, double inv_temperature,
                             int64_t ignore_index, std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "token_logprobs_backward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1, "token_logprobs_backward: vocab must be >= 1, got " +
                                std::to_string(vocab));
  RLK_CHECK_ARG(grad_logp == 0 || tokens != 0,
                "token_logprobs_backward: grad_logp needs tokens");
  dispatch_logits(dtype, "token_logprobs_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits != 0 && stats != 0 && out != 0,
                  "token_logprobs_backward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, kMaxThreads);
    const cudaStream_t s = checked_stream(stream);
    const A* glp = as_cptr<A>(grad_logp);
    const A* gh = as_cptr<A>(grad_entropy);
    const T* x = as_cptr<T>(logits);
    const int64_t* tk = as_cptr<int64_t>(tokens);
    const A* st = as_cptr<A>(stats);
    T* o = as_ptr<T>(out);
    const A it = static_cast<A>(inv_temperature);
    const bool has_tok = tokens != 0;
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_TLP_BWD(GLP, GH)                                                                 \
  token_logprobs_bwd_kernel<T, GLP, GH><<<grid, threads, 0, s>>>(                            \
      glp, stride_glp, gh, stride_gh, x, stride_x, tk, stride_tok, has_tok, st, stride_s0,    \
      stride_s1, o, stride_out, vocab, it, ignore_index)
    if (grad_logp != 0 && grad_entropy != 0) RLK_TLP_BWD(true, true);
    else if (grad_logp != 0) RLK_TLP_BWD(true, false);
    else if (grad_entropy != 0) RLK_TLP_BWD(false, true);
    else RLK_TLP_BWD(false, false);
#undef RLK_TLP_BWD
    RLK_CHECK_LAUNCH();
  });
}

void kl_divergence_forward(std::uintptr_t logits, int64_t stride_x, std::uintptr_t ref_logits,
                           int64_t stride_y, std::uintptr_t ignore_mask, int64_t stride_mask,
                           std::uintptr_t kl, std::uintptr_t stats_p, std::uintptr_t stats_q,
                           int64_t n, int64_t vocab, int dtype, int kind, double beta,
                           double inv_temperature, std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "kl_divergence_forward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1, "kl_divergence_forward: vocab must be >= 1, got " +
                                std::to_string(vocab));
  RLK_CHECK_ARG(kind >= 0 && kind <= 2, "kl_divergence_forward: kind code must be 0 (reverse), "
                                        "1 (forward) or 2 (jsd), got " + std::to_string(kind));
  const JsdConst c{beta, 1.0 - beta, beta > 0 ? std::log(beta) : -INFINITY,
                   beta < 1 ? std::log(1.0 - beta) : -INFINITY};
  dispatch_logits(dtype, "kl_divergence_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits != 0 && ref_logits != 0 && kl != 0 && stats_p != 0 && stats_q != 0,
                  "kl_divergence_forward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, kMaxThreads);
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_KL_FWD(KIND)                                                                      \
  kl_fwd_kernel<T, KIND><<<grid, threads, 0, s>>>(                                            \
      as_cptr<T>(logits), stride_x, as_cptr<T>(ref_logits), stride_y,                         \
      as_cptr<uint8_t>(ignore_mask), stride_mask, as_ptr<A>(kl), as_ptr<A>(stats_p),          \
      as_ptr<A>(stats_q), vocab, static_cast<A>(inv_temperature), c)
    if (kind == kReverse) RLK_KL_FWD(kReverse);
    else if (kind == kForward) RLK_KL_FWD(kForward);
    else RLK_KL_FWD(kJsd);
#undef RLK_KL_FWD
    RLK_CHECK_LAUNCH();
  });
}

void kl_divergence_backward(std::uintptr_t grad_kl, int64_t stride_g, std::uintptr_t logits,
                            int64_t stride_x, std::uintptr_t ref_logits, int64_t stride_y,
                            std::uintptr_t ignore_mask, int64_t stride_mask,
                            std::uintptr_t stats_p, int64_t sp0, int64_t sp1,
                            std::uintptr_t stats_q, int64_t sq0, int64_t sq1,
                            std::uintptr_t grad_x, int64_t stride_gx, std::uintptr_t grad_y,
                            int64_t stride_gy, int64_t n, int64_t vocab, int dtype, int kind,
                            double beta, double inv_temperature, std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "kl_divergence_backward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1, "kl_divergence_backward: vocab must be >= 1, got " +
                                std::to_string(vocab));
  RLK_CHECK_ARG(kind >= 0 && kind <= 2, "kl_divergence_backward: kind code must be 0 "
                                        "(reverse), 1 (forward) or 2 (jsd), got " +
                                            std::to_string(kind));
  const JsdConst c{beta, 1.0 - beta, beta > 0 ? std::log(beta) : -INFINITY,
                   beta < 1 ? std::log(1.0 - beta) : -INFINITY};
  dispatch_logits(dtype, "kl_divergence_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(grad_kl != 0 && logits != 0 && ref_logits != 0 && stats_p != 0 &&
                      stats_q != 0 && grad_x != 0,
                  "kl_divergence_backward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, kMaxThreads);
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_KL_BWD(KIND, NEED_W)                                                              \
  kl_bwd_kernel<T, KIND, NEED_W><<<grid, threads, 0, s>>>(                                    \
      as_cptr<A>(grad_kl), stride_g, as_cptr<T>(logits), stride_x, as_cptr<T>(ref_logits),    \
      stride_y, as_cptr<uint8_t>(ignore_mask), stride_mask, as_cptr<A>(stats_p), sp0, sp1,    \
      as_cptr<A>(stats_q), sq0, sq1, as_ptr<T>(grad_x), stride_gx, as_ptr<T>(grad_y),         \
      stride_gy, vocab, static_cast<A>(inv_temperature), c)
    const bool need_w = grad_y != 0;
    if (kind == kReverse) { if (need_w) RLK_KL_BWD(kReverse, true); else RLK_KL_BWD(kReverse, false); }
    else if (kind == kForward) { if (need_w) RLK_KL_BWD(kForward, true); else RLK_KL_BWD(kForward, false); }
    else { if (need_w) RLK_KL_BWD(kJsd, true); else RLK_KL_BWD(kJsd, false); }
#undef RLK_KL_BWD
    RLK_CHECK_LAUNCH();
  });
}

void sparse_forward(std::uintptr_t logits, int64_t stride_x, std::uintptr_t indices, int64_t si0,
                    int64_t si1, std::uintptr_t target, int64_t st0, int64_t st1,
                    std::uintptr_t out, int64_t so0, std::uintptr_t tail, std::uintptr_t stats,
                    int64_t n, int64_t vocab, int64_t k, int dtype, int mode, bool with_tail,
                    double inv_temperature, std::uintptr_t stream) {
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
    RLK_CHECK_ARG(logits != 0 && (k == 0 || indices != 0) && tail != 0 && stats != 0 &&
                      (out != 0 || k == 0) && (mode != kSparseKl || target != 0 || k == 0),
                  "sparse_forward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, kMaxThreads);
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_SPARSE_FWD(MODE, TAIL)                                                             \
  sparse_fwd_kernel<T, MODE, TAIL><<<grid, threads, 0, s>>>(                                   \
      as_cptr<T>(logits), stride_x, vocab, as_cptr<int64_t>(indices), si0, si1, k,             \
      as_cptr<A>(target), st0, st1, as_ptr<A>(out), so0, as_ptr<A>(tail), as_ptr<A>(stats),    \
      static_cast<A>(inv_temperature))
    if (mode == kSparseFull) { if (with_tail) RLK_SPARSE_FWD(kSparseFull, true); else RLK_SPARSE_FWD(kSparseFull, false); }
    else if (mode == kSparseSupport) { if (with_tail) RLK_SPARSE_FWD(kSparseSupport, true); else RLK_SPARSE_FWD(kSparseSupport, false); }
    else { if (with_tail) RLK_SPARSE_FWD(kSparseKl, true); else RLK_SPARSE_FWD(kSparseKl, false); }
#undef RLK_SPARSE_FWD
    RLK_CHECK_LAUNCH();
  });
}

void sparse_backward(std::uintptr_t logits, int64_t stride_x, std::uintptr_t grad,
                     int64_t stride_g, std::uintptr_t indices, int64_t si0, int64_t si1,
                     std::uintptr_t sorted_ids, std::uintptr_t perm, std::uintptr_t gk,
                     int64_t sg0, int64_t sg1, std::uintptr_t lp, int64_t sl0, int64_t sl1,
                     std::uintptr_t tail, std::uintptr_t grad_tail, std::uintptr_t grad_kl,
                     std::uintptr_t stats, int64_t ss0, int64_t ss1, int64_t n, int64_t vocab,
                     int64_t k, int dtype, int mode, bool with_tail, double inv_temperature,
                     std::uintptr_t stream) {
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
    RLK_CHECK_ARG(logits != 0 && grad != 0 && stats != 0 &&
                      (k == 0 || (indices != 0 && sorted_ids != 0 && perm != 0)),
                  "sparse_backward: null device pointer");
    RLK_CHECK_ARG(mode != kSparseSupport || k == 0 || lp != 0,
                  "sparse_backward: support mode needs the forward's log-probs (lp)");
    RLK_CHECK_ARG(mode != kSparseKl || (grad_kl != 0 && (k == 0 || gk != 0)),
                  "sparse_backward: kl mode needs grad_kl and the targets (gk)");
    RLK_CHECK_ARG(!with_tail || (tail != 0 && (mode == kSparseKl || grad_tail != 0)),
                  "sparse_backward: with_tail needs tail (and grad_tail unless kl)");
    const int threads = row_threads(vocab, VecWidth<T>::value, kMaxThreads);
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_SPARSE_BWD(MODE, TAIL)                                                             \
  sparse_bwd_kernel<T, MODE, TAIL><<<grid, threads, 0, s>>>(                                   \
      as_cptr<T>(logits), stride_x, as_ptr<T>(grad), stride_g, vocab,                          \
      as_cptr<int64_t>(indices), si0, si1, k, as_cptr<int32_t>(sorted_ids),                    \
      as_cptr<int32_t>(perm), as_cptr<A>(gk), sg0, sg1, as_cptr<A>(lp), sl0, sl1,              \
      as_cptr<A>(tail), as_cptr<A>(grad_tail), as_cptr<A>(grad_kl), as_cptr<A>(stats), ss0,    \
      ss1, static_cast<A>(inv_temperature))
    if (mode == kSparseFull) { if (with_tail) RLK_SPARSE_BWD(kSparseFull, true); else RLK_SPARSE_BWD(kSparseFull, false); }
    else if (mode == kSparseSupport) { if (with_tail) RLK_SPARSE_BWD(kSparseSupport, true); else RLK_SPARSE_BWD(kSparseSupport, false); }
    else { if (with_tail) RLK_SPARSE_BWD(kSparseKl, true); else RLK_SPARSE_BWD(kSparseKl, false); }
#undef RLK_SPARSE_BWD
    RLK_CHECK_LAUNCH();
  });
}

}  // namespace rlk
