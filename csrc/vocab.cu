// Vocabulary family (ops that read logits [N, V]): token_logprobs (+ entropy) and
// kl_divergence, forward and backward. Python launchers: rlkernels/cuda/vocab.py. The math is
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

}  // namespace rlk
