// Vocabulary family (ops that read logits [N, V]): token_logprobs (+ entropy),
// kl_divergence, sparse_logprobs and sparse_kl, forward and backward. Python launchers:
// rlkernels/cuda/vocab.py. The math is stated in rlkernels/reference/vocab.py; this file states
// how it is streamed.
//
// Layout of every kernel: one block per row (grid = N), so a row's result never depends on N
// (batch invariance, determinism without atomics). Columns are grouped in chunks of 16 bytes
// (kVec = 16 / sizeof(T) columns); chunk c belongs to thread c % blockDim.x, which visits its
// chunks in increasing order; the last, partial chunk is padded with -inf. That assignment
// depends only on V and blockDim, never on the row's address, so a row gives the same bits
// wherever it sits in the batch. A 16-byte aligned row loads each chunk with one 16-byte load;
// any other row (odd V, a slice) loads the same chunk element by element, all kVec loads
// issued before the chunk is used. Row offsets are 64-bit; a row stride is any int64.
//
// Saved per-row statistics, [N, 3] in the accumulation type (same as the other backends):
//   (m = max z, log s = log1p(rest), a row sum backward needs)
// with z = logits * (1 / T), rest = sum exp(z - m) over every column but one arg-max.
//
// Hot loop (forward, issue 18): per chunk the running state (m, s, n) of the thread is
// rebased at most once (a branch taken only when the chunk holds a new maximum), then each
// column costs one subtract, one multiply, one ex2 and three adds:
//   m = max of the raw logits seen (not scaled: max z = m / T for T > 0),
//   s = sum over the columns below m of 2^((x - m) * log2(e) / T)  (= exp(z - max z)),
//   n = number of columns equal to m  (each weighs exactly 1),
// so rest = s + (n - 1) is formed without subtracting anything: log s = log1p(rest) and
// 1 - p_max = rest / (1 + rest) keep their digits on peaked rows, as before.
//
// Accuracy of ex2.approx.ftz.f32 (fp32 / fp16 / bf16 logits; fp64 keeps exp()): the PTX ISA
// bounds its relative error by 2^-22 (about 2 ulp, the bound CUDA documents for expf too),
// and the argument (x - m) * (log2(e) / T) is exact up to one rounding of a product of a small
// number (x - m is exact for T = 1 in bf16 / fp16). Every term of a sum therefore carries a
// relative error <= ~2.5e-7, the sum too, so log s is off by <= ~2.5e-7 absolute and
// sum p (z - m) (entropy) by <= 2.5e-7 * |sum p (z - m)| (<= ~3e-6 at V = 262144): inside
// SPEC's 1e-5 for every per-token output. ftz flushes terms below 2^-126 of the row maximum
// (z more than 87 below it), which cannot move a sum that holds the maximum's 1. Backward
// forms p = 2^((z - m) log2(e) - log2(s)) with the same bound: <= 2.5e-7 relative, below the
// 2 eps(fp32) of SPEC's gradient tolerance for fp32 gradients (the worst case, p near its
// max, has log s near 0, so the rounding of log2(s) adds nothing), far below it for bf16/fp16.
#include "common.cuh"
#include "rlkernels.h"

#include <cfloat>
#include <type_traits>

namespace rlk {
namespace {

constexpr int kMaxThreads = 512;
// Threads per block (one row): 512, 256 for fp64 logits, whose kernels need more than the 64
// registers ptxas grants a 512-thread block (the inline double exp spilled at 512). A function
// of the dtype only, so a row's reduction order still depends on V alone.
template <class T>
constexpr int max_threads() {
  return sizeof(T) == 8 ? 256 : kMaxThreads;
}

// m shifted by 0 when a row is all -inf: its probabilities are 0, its log-probs -inf (not NaN).
template <class A>
__device__ __forceinline__ A shift_of(A m) {
  return m == neg_inf<A>() ? A(0) : m;
}

// ------------------------------------------------------------------ fast exponential, units
// uexp(x) = 2^x for fp32 accumulation (x in log2 units), exp(x) for fp64 (natural units).
// kUnit<A> = log(base) turns a sum of x-weighted terms back into natural units; the scale
// passed to the kernels is log2(e) / T for fp32 and 1 / T for fp64 (scale_of, host side).
__device__ __forceinline__ float uexp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double uexp(double x) { return exp(x); }
// log2 for the JSD's log m (fp32 only): lg2.approx.ftz.f32, absolute error about 2^-22
__device__ __forceinline__ float ulog2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
template <class A> struct Unit { static constexpr double ln_base = 0.6931471805599453; };
template <> struct Unit<double> { static constexpr double ln_base = 1.0; };
inline double scale_of(int dtype, double inv_t) {
  return dtype == static_cast<int>(DType::kFloat64) ? inv_t : inv_t * 1.4426950408889634;
}
template <class A> __device__ __forceinline__ A lowest() { return -FLT_MAX; }
template <> __device__ __forceinline__ double lowest<double>() { return -DBL_MAX; }
// max that ignores NaN (fmaxf / fmax): NaN logits reach the outputs through the sums instead
__device__ __forceinline__ float vmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double vmax(double a, double b) { return fmax(a, b); }
struct MaxOp {
  template <class A> __device__ __forceinline__ A operator()(A a, A b) const { return vmax(a, b); }
};

// ------------------------------------------------------------------------- chunk streaming

template <class T>
struct Chunk {
  static constexpr int N = VecWidth<T>::value;
  using A = acc_t<T>;
  A v[N];
};

template <class T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

// Chunk c of a row (c < V / kVec) as stored: 16 bytes as four 32-bit words (one 16-byte
// load when the row is aligned), or kVec elements loaded one by one (all issued before any
// is used).
template <bool kAligned, class T>
struct Raw {
  using type = uint4;
};
template <class T>
struct Raw<false, T> {
  using type = Pack<T, Chunk<T>::N>;
};

template <bool kAligned, class T>
__device__ __forceinline__ typename Raw<kAligned, T>::type load_raw(const T* row, int c) {
  constexpr int N = Chunk<T>::N;
  if constexpr (kAligned) {
    return reinterpret_cast<const uint4*>(row)[c];
  } else {
    Pack<T, N> p;
#pragma unroll
    for (int k = 0; k < N; ++k) p.v[k] = row[c * N + k];
    return p;
  }
}

// Stored chunk -> accumulation type.
template <class T>
__device__ __forceinline__ void unpack(const uint4& q, Chunk<T>& ch) {
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    // bf16 -> fp32 is a 16-bit shift: one integer op per column
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      ch.v[2 * i] = __uint_as_float(w[i] << 16);
      ch.v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  } else if constexpr (std::is_same_v<T, __half>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      ch.v[2 * i] = f.x;
      ch.v[2 * i + 1] = f.y;
    }
  } else if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) ch.v[i] = __uint_as_float(w[i]);
  } else {
    ch.v[0] = __hiloint2double(static_cast<int>(w[1]), static_cast<int>(w[0]));
    ch.v[1] = __hiloint2double(static_cast<int>(w[3]), static_cast<int>(w[2]));
  }
}
template <class T>
__device__ __forceinline__ void unpack(const Pack<T, Chunk<T>::N>& p, Chunk<T>& ch) {
#pragma unroll
  for (int k = 0; k < Chunk<T>::N; ++k) ch.v[k] = to_acc(p.v[k]);
}

// The last, partial chunk (columns >= V read as -inf).
template <class T>
__device__ __forceinline__ void load_tail(const T* row, int c, int V, Chunk<T>& ch) {
  constexpr int N = Chunk<T>::N;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const int j = c * N + k;
    ch.v[k] = j < V ? to_acc(row[j]) : neg_inf<acc_t<T>>();
  }
}

// f(c, chunk) for this thread's chunks of a row, in increasing c (the tail chunk last). The
// loop is compiled twice, for an aligned row and for any other, and loads the thread's next
// chunk before f works on the current one (two loads in flight per thread). In place (f
// writes chunk c of the same row) is safe: chunk c + blockDim.x belongs to this thread too
// and is read before it is written. V < 2^31 (launchers check). kPrefetch = false: one load
// at a time (the sparse tail loop, whose body is longer: fewer instructions per chunk).
template <bool kPrefetch = true, class T, class F>
__device__ __forceinline__ void for_each_chunk(const T* row, int V, F&& f) {
  constexpr int N = Chunk<T>::N;
  const int full = V / N;
  int c = threadIdx.x;
  auto loop = [&](auto aligned) {
    constexpr bool kAl = decltype(aligned)::value;
    if constexpr (sizeof(T) == 8 || !kPrefetch) {  // fp64: registers; not a bandwidth path
      for (; c < full; c += blockDim.x) {
        Chunk<T> ch;
        unpack(load_raw<kAl>(row, c), ch);
        f(c, ch);
      }
      return;
    }
    if (c >= full) return;
    typename Raw<kAl, T>::type nxt = load_raw<kAl>(row, c);
    while (true) {
      const typename Raw<kAl, T>::type cur = nxt;
      const int cn = c + static_cast<int>(blockDim.x);
      if (cn < full) nxt = load_raw<kAl>(row, cn);
      Chunk<T> ch;
      unpack(cur, ch);
      f(c, ch);
      c = cn;
      if (c >= full) break;
    }
  };
  if (aligned16(row)) loop(std::true_type{});
  else loop(std::false_type{});
  if (c == full && full * N < V) {
    Chunk<T> ch;
    load_tail(row, c, V, ch);
    f(c, ch);
  }
}

// Same over a pair of rows (x, y), both loaded before f (and both prefetched).
template <class T, class F>
__device__ __forceinline__ void for_each_chunk2(const T* x, const T* y, int V, F&& f) {
  constexpr int N = Chunk<T>::N;
  const int full = V / N;
  int c = threadIdx.x;
  auto loop = [&](auto aligned) {
    constexpr bool kAl = decltype(aligned)::value;
    if constexpr (sizeof(T) == 8) {  // fp64: no prefetch (registers; not a bandwidth path)
      for (; c < full; c += blockDim.x) {
        Chunk<T> a, b;
        unpack(load_raw<kAl>(x, c), a);
        unpack(load_raw<kAl>(y, c), b);
        f(c, a, b);
      }
      return;
    }
    if (c >= full) return;
    typename Raw<kAl, T>::type nx = load_raw<kAl>(x, c), ny = load_raw<kAl>(y, c);
    while (true) {
      const typename Raw<kAl, T>::type cx = nx, cy = ny;
      const int cn = c + static_cast<int>(blockDim.x);
      if (cn < full) {
        nx = load_raw<kAl>(x, cn);
        ny = load_raw<kAl>(y, cn);
      }
      Chunk<T> a, b;
      unpack(cx, a);
      unpack(cy, b);
      f(c, a, b);
      c = cn;
      if (c >= full) break;
    }
  };
  if (aligned16(x) && aligned16(y)) loop(std::true_type{});
  else loop(std::false_type{});
  if (c == full && full * N < V) {
    Chunk<T> a, b;
    load_tail(x, c, V, a);
    load_tail(y, c, V, b);
    f(c, a, b);
  }
}

// Store chunk c of an output row: one 16-byte store when aligned, else element by element;
// columns >= V are not written.
template <class T>
__device__ __forceinline__ void store_chunk(T* row, int c, int V, bool aligned,
                                            const acc_t<T> (&g)[Chunk<T>::N]) {
  constexpr int N = Chunk<T>::N;
  if (aligned && (c + 1) * N <= V) {
    Pack<T, N> p;
#pragma unroll
    for (int k = 0; k < N; ++k) p.v[k] = from_acc<T>(g[k]);
    reinterpret_cast<Pack<T, N>*>(row)[c] = p;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (c * N + k < V) row[c * N + k] = from_acc<T>(g[k]);
  }
}

// Every column of an output row set to 0 (padding rows, rows with a zero upstream gradient);
// nothing is read.
template <class T>
__device__ __forceinline__ void zero_row(T* row, int V) {
  constexpr int N = Chunk<T>::N;
  const bool al = aligned16(row);
  acc_t<T> z[N];
#pragma unroll
  for (int k = 0; k < N; ++k) z[k] = acc_t<T>(0);
  const int chunks = (V - 1) / N + 1;  // V >= 1; no int overflow near 2^31
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) store_chunk(row, c, V, al, z);
}

// ------------------------------------------------------------------- running row statistics
// Run: the online state of a set of columns (see the header): m (raw logits), s, n, and
//   s1 = sum over every column of 2^u u, u = (x - m) * scale (0 at the maximum; -inf columns
//        count 0), for the entropy (sum p (z - m) = s1 * ln(base) / (s + n));
//   a  = a companion sum rescaled with s (kl_divergence: sum 2^u (x_p - x_q)).
// While m = -inf (only -inf columns so far) s = s1 = a = 0 and n counts those columns.

template <class A>
struct Run {
  A m, s, n, s1, a;
};

template <class A>
__device__ __forceinline__ Run<A> run_empty() {
  return {neg_inf<A>(), A(0), A(0), A(0), A(0)};
}

// Move the state to a larger maximum nm: the columns at the old maximum become ordinary.
template <bool kS1, bool kA, class A>
__device__ __forceinline__ void run_rebase(Run<A>& r, A nm, A scale) {
  if (r.m == neg_inf<A>()) {
    // only -inf (weight 0) and NaN columns so far: s, s1, a are 0 or NaN; keep the NaN
    r.s *= A(0);
    if (kS1) r.s1 *= A(0);
    if (kA) r.a *= A(0);
  } else {
    const A d = (r.m - nm) * scale;
    const A f = uexp(d);
    const A all = r.s + r.n;
    if (kS1) r.s1 = f * (r.s1 + d * all);
    if (kA) r.a *= f;
    r.s = all * f;
  }
  r.n = A(0);
  r.m = nm;
}

// Fold one chunk into r. e[k] = 2^u_k (exp(u_k) for fp64), relative to the chunk's reference
// shift_of(r.m) after the rebase, are left for the caller (kl_divergence's companion sum).
template <class A>
struct ChunkSum {
  A t, n;  // the chunk's part of s and n (after the rebase)
};

template <bool kS1, bool kA, int N, class A>
__device__ __forceinline__ ChunkSum<A> run_chunk(Run<A>& r, const A (&v)[N], A scale, A (&e)[N]) {
  A cm = v[0];
#pragma unroll
  for (int k = 1; k < N; ++k) cm = vmax(cm, v[k]);
  // Two rare cases branch off the common path: a chunk with a new maximum (rebase), and one
  // holding columns equal to the maximum (the count). ptxas lays the common chunk out as the
  // fall-through of the second branch (checked in the sm_90a SASS); the rebase block stays a
  // fall-through skipped by a taken branch.
  if (__builtin_expect(cm > r.m, 0)) run_rebase<kS1, kA>(r, cm, scale);
  const A mref = shift_of(r.m);
  A t = A(0), t1 = A(0), cnt = A(0);
  if (__builtin_expect(!(cm < r.m), 0)) {
    // the chunk holds the maximum (or only -inf, or only NaN): count the columns equal to it
    A ne = A(0);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A u = (v[k] - mref) * scale;
      e[k] = uexp(u);
      const A w = v[k] != r.m ? A(1) : A(0);  // NaN: 1 (its NaN term reaches s)
      t = fma(e[k], w, t);
      ne += w;
      if (kS1) t1 = fma(e[k], vmax(u, lowest<A>()), t1);  // -inf column: 0 * (-max) = 0
    }
    cnt = A(N) - ne;
  } else {
    // the common chunk: no column at the maximum, every column adds to s
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A u = (v[k] - mref) * scale;
      e[k] = uexp(u);
      t += e[k];
      if (kS1) t1 = fma(e[k], u, t1);
    }
    if (__builtin_expect(kS1 && t1 != t1 && t == t, 0)) {
      // a -inf column gave 0 * (-inf): take it as 0 (rare: masked columns), recompute
      t1 = A(0);
#pragma unroll
      for (int k = 0; k < N; ++k) t1 = fma(e[k], vmax((v[k] - mref) * scale, lowest<A>()), t1);
    }
  }
  r.s += t;
  r.n += cnt;
  if (kS1) r.s1 += t1;
  return {t, cnt};
}

// Merge b into a (fixed order at every call site: deterministic).
template <bool kS1, bool kA, class A>
__device__ __forceinline__ Run<A> run_merge(const Run<A>& a, const Run<A>& b, A scale) {
  if (a.m == b.m) {
    return {a.m, a.s + b.s, a.n + b.n, kS1 ? a.s1 + b.s1 : A(0), kA ? a.a + b.a : A(0)};
  }
  // winner / loser picked field by field (selects; references to either state would put
  // both in local memory)
  const bool b_wins = b.m > a.m;
  Run<A> w, l;
  w.m = b_wins ? b.m : a.m;
  w.s = b_wins ? b.s : a.s;
  w.n = b_wins ? b.n : a.n;
  w.s1 = b_wins ? b.s1 : a.s1;
  w.a = b_wins ? b.a : a.a;
  l.m = b_wins ? a.m : b.m;
  l.s = b_wins ? a.s : b.s;
  l.n = b_wins ? a.n : b.n;
  l.s1 = b_wins ? a.s1 : b.s1;
  l.a = b_wins ? a.a : b.a;
  Run<A> o = w;
  if (l.m != neg_inf<A>()) {
    const A d = (l.m - w.m) * scale;
    const A f = uexp(d);
    const A all = l.s + l.n;
    o.s = w.s + all * f;
    if (kS1) o.s1 = w.s1 + f * (l.s1 + d * all);
    if (kA) o.a = w.a + f * l.a;
  } else if (l.s != l.s) {
    o.s = l.s;
  }
  return o;
}

template <class A>
__device__ __forceinline__ Run<A> run_shfl_down(const Run<A>& r, int offset) {
  return {__shfl_down_sync(kFullMask, r.m, offset), __shfl_down_sync(kFullMask, r.s, offset),
          __shfl_down_sync(kFullMask, r.n, offset), __shfl_down_sync(kFullMask, r.s1, offset),
          __shfl_down_sync(kFullMask, r.a, offset)};
}

// Block-wide merge in a fixed tree; every thread gets the result. scratch: 32 states.
template <bool kS1, bool kA, class A>
__device__ Run<A> run_block_reduce(Run<A> r, A scale, Run<A>* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    r = run_merge<kS1, kA>(r, run_shfl_down(r, offset), scale);
  __syncthreads();
  if (lane == 0) scratch[warp] = r;
  __syncthreads();
  if (warp == 0) {
    Run<A> w = lane < warps ? scratch[lane] : run_empty<A>();
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      w = run_merge<kS1, kA>(w, run_shfl_down(w, offset), scale);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  return scratch[0];
}

// rest = sum exp(z - max z) over every column but one arg-max (0 for an all -inf row).
template <class A>
__device__ __forceinline__ A run_rest(const Run<A>& r) {
  return r.m == neg_inf<A>() ? A(0) : r.s + (r.n - A(1));
}

// Whole-row statistics of one row: every thread gets the merged state.
template <bool kS1, class T>
__device__ __forceinline__ Run<acc_t<T>> row_run(const T* row, int64_t V, acc_t<T> scale,
                                                 Run<acc_t<T>>* scratch) {
  using A = acc_t<T>;
  Run<A> r = run_empty<A>();
  for_each_chunk(row, static_cast<int>(V), [&](int, const Chunk<T>& ch) {
    A e[Chunk<T>::N];
    run_chunk<kS1, false>(r, ch.v, scale, e);
  });
  return run_block_reduce<kS1, false>(r, scale, scratch);
}

// p = exp((z - m) - log s) from the saved statistics, z - m = x / T - m formed first (exact
// for T = 1), then one fma into the exponent of the fast exponential.
template <class A>
struct ProbOf {
  A inv_t, m, lsu, unit;  // unit = 1 / ln(base); lsu = log s * unit
  __device__ __forceinline__ A zs(A x) const { return fma(x, inv_t, -m); }
  __device__ __forceinline__ A p(A zs_) const { return uexp(fma(zs_, unit, -lsu)); }
};
template <class A>
__device__ __forceinline__ ProbOf<A> prob_of(A inv_t, A m, A log_s) {
  const A unit = A(1.0 / Unit<A>::ln_base);
  return {inv_t, m, log_s * unit, unit};
}

// ============================================================== token_logprobs / entropy

// Forward, one block per row:
//   stats = (m, log s, sum p (z - m) or 0),  logp = (x_y - m_x) / T - log s,
//   entropy = log s - sum p (z - m)   (= lse - sum p z, both terms >= 0: exact when peaked),
// with sum p (z - m) = s1 ln(base) / (s + n). Rows whose token is ignore_index are not read:
// outputs 0, stats 0 (backward never reads them). A token outside [0, V) reads nothing and
// gives NaN (only reachable with debug checks off).
template <class T, bool kWithEnt, bool kHasTok>
__global__ void __launch_bounds__(max_threads<T>())
    token_logprobs_fwd_kernel(const T* __restrict__ x, int64_t stride_x,
                              const int64_t* __restrict__ tok, int64_t stride_tok,
                              acc_t<T>* __restrict__ logp, acc_t<T>* __restrict__ ent,
                              acc_t<T>* __restrict__ stats, int64_t V, acc_t<T> inv_t,
                              acc_t<T> scale, int64_t ignore_index) {
  using A = acc_t<T>;
  __shared__ Run<A> scratch[32];
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
  // the token's logit, loaded early (its latency hides under the row)
  const A x_y = (kHasTok && y >= 0 && y < V) ? to_acc(xr[y]) : quiet_nan<A>();
  const Run<A> r = row_run<kWithEnt>(xr, V, scale, scratch);
  if (threadIdx.x != 0) return;
  const A log_s = d_log1p(run_rest(r));
  stats[row * 3] = r.m * inv_t;  // = max z (rounding is monotonic)
  stats[row * 3 + 1] = log_s;
  if (kWithEnt) {
    const A sum_pzs = r.m == neg_inf<A>() ? A(0) : r.s1 * A(Unit<A>::ln_base) / (r.s + r.n);
    stats[row * 3 + 2] = sum_pzs;
    ent[row] = log_s - sum_pzs;
  } else {
    stats[row * 3 + 2] = A(0);
    ent[row] = A(0);
  }
  logp[row] = kHasTok ? (x_y - shift_of(r.m)) * inv_t - log_s : A(0);
}

// Backward, one block per row, gradient in the logits' dtype (out may be x: in place):
//   d/dz_j = -g p_j  (j != y),   -g expm1(log p_y)  (j = y: g (1 - p_y) without cancellation)
//            - g_H xmul0(p_j, (z_j - m) - sum p (z - m)),      all times 1/T,
// p_j = exp((z_j - m) - log s) from the saved stats. The loop writes -g p_j everywhere; the
// thread that owns the token's chunk then rewrites the token's column (same thread, program
// order: no barrier). Padding rows, and rows whose upstream gradients are all exactly 0, get
// exactly 0 without reading the logits (so a NaN logit in such a row gives 0, not NaN: the
// gradient of a term that does not enter the loss). A token outside [0, V) (vocabulary
// parallelism: another rank's column) gives no one-hot term. kHasGlp needs tokens.
template <class T, bool kHasGlp, bool kHasGh>
__global__ void __launch_bounds__(max_threads<T>())
    token_logprobs_bwd_kernel(const acc_t<T>* glp, int64_t stride_glp, const acc_t<T>* gh,
                              int64_t stride_gh, const T* x, int64_t stride_x,
                              const int64_t* tok, int64_t stride_tok, bool has_tok,
                              const acc_t<T>* stats, int64_t stride_s0, int64_t stride_s1,
                              T* out, int64_t stride_out, int64_t V, acc_t<T> inv_t,
                              int64_t ignore_index) {
  using A = acc_t<T>;
  constexpr int N = Chunk<T>::N;
  const int64_t row = blockIdx.x;
  T* orow = out + row * stride_out;
  const int64_t y = has_tok ? tok[row * stride_tok] : int64_t(-1);
  const A g_lp = kHasGlp ? glp[row * stride_glp] * inv_t : A(0);
  const A g_h = kHasGh ? gh[row * stride_gh] * inv_t : A(0);
  if ((has_tok && y == ignore_index) || (g_lp == A(0) && g_h == A(0))) {
    zero_row(orow, static_cast<int>(V));
    return;
  }
  const T* xr = x + row * stride_x;
  const ProbOf<A> po = prob_of(inv_t, shift_of(stats[row * stride_s0]),
                               stats[row * stride_s0 + stride_s1]);
  const A log_s = stats[row * stride_s0 + stride_s1];
  const A sum_pzs = stats[row * stride_s0 + 2 * stride_s1];
  const bool y_in = y >= 0 && y < V;
  // the token's column, from x read before any thread writes (in place: barrier below)
  A g_y = A(0);
  if (y_in && static_cast<int64_t>(threadIdx.x) == (y / N) % blockDim.x) {
    const A zs = po.zs(to_acc(xr[y]));
    g_y = kHasGlp ? -g_lp * d_expm1(zs - log_s) : A(0);
    if (kHasGh) g_y -= g_h * xmul0(po.p(zs), zs - sum_pzs);
  }
  __syncthreads();
  const bool ao = aligned16(orow);
  const A ng = -g_lp;
  for_each_chunk(xr, static_cast<int>(V), [&](int c, const Chunk<T>& ch) {
    A g[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A zs = po.zs(ch.v[k]);
      const A p = po.p(zs);
      g[k] = kHasGlp ? ng * p : A(0);
      // -inf column: p = 0 and zs clamped finite, so 0 (not NaN)
      if (kHasGh) g[k] = fma(-g_h * p, vmax(zs, lowest<A>()) - sum_pzs, g[k]);
    }
    store_chunk(orow, c, static_cast<int>(V), ao, g);
  });
  if (y_in && static_cast<int64_t>(threadIdx.x) == (y / N) % blockDim.x)
    orow[y] = from_acc<T>(g_y);
}

// ============================================================================= kl_divergence

// kind: rlk::KlKind (rlkernels.h).

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

// Forward, one block per row pair.
// reverse / forward: ONE pass. With r the distribution in front (p for reverse, q for
// forward) and o the other,
//   KL(r || o) = sum r (z_r - z_o) - (m_r - m_o) - log s_r + log s_o,
// where sum r (z_r - z_o) = a / (s_r + n_r) / T, a = sum 2^u_r (x_r - x_o) rescaled online
// with r's state (the companion sum of Run). Written as (a / S_r - (m_r - m_o)) / T +
// (log s_o - log s_r): every term is small when the two rows are close, and p = q gives 0
// exactly. A column where r is 0 (x_r = -inf) adds 0 (x_r - x_o clamped finite); where o is
// 0 and r is not, +inf (KL = inf, as the reference).
// jsd: two passes (log m = logaddexp(log p + log beta, log q + log(1 - beta)) needs both
// normalizers, so no online form exists): the statistics of both rows, then
//   beta sum p (log p - log m) + (1 - beta) sum q (log q - log m).
// Saves stats_p = (m_p, log s_p, sum p a_p) and stats_q alike (the row sums the one-pass
// backward needs: KL itself on r's side, 0 on the other for reverse / forward).
// ignore_mask rows: 0 everywhere, not read.
template <class T, int kKind>
__global__ void __launch_bounds__(max_threads<T>())
    kl_fwd_kernel(const T* __restrict__ x, int64_t stride_x, const T* __restrict__ y,
                  int64_t stride_y, const uint8_t* __restrict__ mask, int64_t stride_mask,
                  acc_t<T>* __restrict__ kl, acc_t<T>* __restrict__ sp,
                  acc_t<T>* __restrict__ sq, int64_t V, acc_t<T> inv_t, acc_t<T> scale,
                  JsdConst c) {
  using A = acc_t<T>;
  constexpr int N = Chunk<T>::N;
  __shared__ Run<A> scratch[32];
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
  constexpr bool kP = kKind == kReverse;  // p carries the companion sum
  constexpr bool kQ = kKind == kForward;
  Run<A> rp = run_empty<A>(), rq = run_empty<A>();
  for_each_chunk2(xr, yr, static_cast<int>(V), [&](int, const Chunk<T>& a, const Chunk<T>& b) {
    A ep[N], eq[N];
    run_chunk<false, kP>(rp, a.v, scale, ep);
    run_chunk<false, kQ>(rq, b.v, scale, eq);
    if (kP || kQ) {
      A t = A(0);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A d = kP ? a.v[k] - b.v[k] : b.v[k] - a.v[k];
        t = fma(kP ? ep[k] : eq[k], vmax(d, lowest<A>()), t);
      }
      if (kP) rp.a += t;
      else rq.a += t;
    }
  });
  rp = run_block_reduce<false, kP>(rp, scale, scratch);
  rq = run_block_reduce<false, kQ>(rq, scale, scratch);
  const A ls_p = d_log1p(run_rest(rp)), ls_q = d_log1p(run_rest(rq));
  if (kKind != kJsd) {
    if (threadIdx.x != 0) return;
    const Run<A> r = kP ? rp : rq;
    const Run<A> o = kP ? rq : rp;
    const A ls_r = kP ? ls_p : ls_q, ls_o = kP ? ls_q : ls_p;
    // an all -inf front row: every r_j = 0, KL = 0 (as the two-pass form gave)
    const A v = r.m == neg_inf<A>()
                    ? A(0)
                    : (r.a / (r.s + r.n) - (r.m - shift_of(o.m))) * inv_t + (ls_o - ls_r);
    kl[row] = v;
    sp[row * 3] = rp.m * inv_t;
    sp[row * 3 + 1] = ls_p;
    sp[row * 3 + 2] = kP ? v : A(0);
    sq[row * 3] = rq.m * inv_t;
    sq[row * 3 + 1] = ls_q;
    sq[row * 3 + 2] = kQ ? v : A(0);
    return;
  }
  const A m_p = shift_of(rp.m) * inv_t, m_q = shift_of(rq.m) * inv_t;
  const A beta = A(c.beta), omb = A(c.omb), lb = A(c.log_beta), l1b = A(c.log_omb);
  A acc_p = A(0), acc_q = A(0);
  if constexpr (std::is_same_v<A, float>) {
    // log2 units: l = log2 p, log2 m = lg2(beta p + (1 - beta) q); the sums
    // sum p (log2 p - log2 m) are scaled by beta ln 2 (and (1 - beta) ln 2) at the end. A
    // column with p = 0 adds 0 (the difference is clamped finite, NaN included).
    const ProbOf<A> pp = prob_of(inv_t, m_p, ls_p), pq = prob_of(inv_t, m_q, ls_q);
    for_each_chunk2(xr, yr, static_cast<int>(V), [&](int, const Chunk<T>& a, const Chunk<T>& b) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A lp = fma(pp.zs(a.v[k]), pp.unit, -pp.lsu);
        const A lq = fma(pq.zs(b.v[k]), pq.unit, -pq.lsu);
        const A p = uexp(lp), q = uexp(lq);
        const A lm = ulog2(fma(beta, p, omb * q));
        acc_p = fma(p, vmax(lp - lm, lowest<A>()), acc_p);
        acc_q = fma(q, vmax(lq - lm, lowest<A>()), acc_q);
      }
    });
    acc_p *= beta * A(Unit<A>::ln_base);
    acc_q *= omb * A(Unit<A>::ln_base);
  } else {
    for_each_chunk2(xr, yr, static_cast<int>(V), [&](int, const Chunk<T>& a, const Chunk<T>& b) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        A pa, qa, p, q;
        kl_column<kKind>((a.v[k] * inv_t - m_p) - ls_p, (b.v[k] * inv_t - m_q) - ls_q, beta,
                         omb, lb, l1b, pa, qa, p, q);
        acc_p += pa;
        acc_q += qa;
      }
    });
  }
  acc_p = block_sum(acc_p, sum_scratch);
  acc_q = block_sum(acc_q, sum_scratch);
  if (threadIdx.x == 0) {
    kl[row] = acc_p + acc_q;
    sp[row * 3] = rp.m * inv_t;
    sp[row * 3 + 1] = ls_p;
    sp[row * 3 + 2] = acc_p;
    sq[row * 3] = rq.m * inv_t;
    sq[row * 3 + 1] = ls_q;
    sq[row * 3 + 2] = acc_q;
  }
}

// Backward, one pass over the row pair, g = grad_kl / T:
//   reverse: dz = p (log p - log q) - p sum_p,  dw = q - p
//   forward: dz = p - q,                        dw = q (log q - log p) - q sum_q
//   jsd:     dz = p a_p - p sum_p,              dw = q a_q - q sum_q
// (r (a - sum r a), with the row sums saved by forward). 16-byte stores where the output row
// is aligned. ignore_mask rows, and rows with grad_kl exactly 0, get exactly 0 unread.
template <class T, int kKind, bool kNeedW>
__global__ void __launch_bounds__(max_threads<T>())
    kl_bwd_kernel(const acc_t<T>* __restrict__ grad, int64_t stride_g, const T* __restrict__ x,
                  int64_t stride_x, const T* __restrict__ y, int64_t stride_y,
                  const uint8_t* __restrict__ mask, int64_t stride_mask,
                  const acc_t<T>* __restrict__ sp, int64_t sp0, int64_t sp1,
                  const acc_t<T>* __restrict__ sq, int64_t sq0, int64_t sq1,
                  T* __restrict__ gx, int64_t stride_gx, T* __restrict__ gy, int64_t stride_gy,
                  int64_t V, acc_t<T> inv_t, JsdConst c) {
  using A = acc_t<T>;
  constexpr int N = Chunk<T>::N;
  const int64_t row = blockIdx.x;
  T* gxr = gx + row * stride_gx;
  T* gyr = kNeedW ? gy + row * stride_gy : nullptr;
  const A g = (mask != nullptr && mask[row * stride_mask] != 0) ? A(0)
                                                                 : grad[row * stride_g] * inv_t;
  if (g == A(0)) {
    zero_row(gxr, static_cast<int>(V));
    if (kNeedW) zero_row(gyr, static_cast<int>(V));
    return;
  }
  const T* xr = x + row * stride_x;
  const T* yr = y + row * stride_y;
  const A ls_p = sp[row * sp0 + sp1], sum_p = sp[row * sp0 + 2 * sp1];
  const A ls_q = sq[row * sq0 + sq1], sum_q = sq[row * sq0 + 2 * sq1];
  const ProbOf<A> pp = prob_of(inv_t, shift_of(sp[row * sp0]), ls_p);
  const ProbOf<A> pq = prob_of(inv_t, shift_of(sq[row * sq0]), ls_q);
  const A beta = A(c.beta), omb = A(c.omb), lb = A(c.log_beta), l1b = A(c.log_omb);
  [[maybe_unused]] const A bl = beta * A(Unit<A>::ln_base), obl = omb * A(Unit<A>::ln_base);
  const bool agx = aligned16(gxr), agy = kNeedW && aligned16(gyr);
  for_each_chunk2(xr, yr, static_cast<int>(V), [&](int ci, const Chunk<T>& a, const Chunk<T>& b) {
    A dzs[N], dws[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A zp = pp.zs(a.v[k]), zq = pq.zs(b.v[k]);
      A dz, dw;
      if constexpr (kKind == kJsd && std::is_same_v<A, float>) {
        // as the forward's second pass, in log2 units: dz = p (beta ln2 (l_p - l_m) - sum_p)
        const A lp = fma(zp, pp.unit, -pp.lsu), lq = fma(zq, pq.unit, -pq.lsu);
        const A p = uexp(lp), q = uexp(lq);
        const A lm = ulog2(fma(beta, p, omb * q));
        dz = p * fma(bl, vmax(lp - lm, lowest<A>()), -sum_p);
        dw = q * fma(obl, vmax(lq - lm, lowest<A>()), -sum_q);
      } else if constexpr (kKind == kJsd) {
        A pa, qa, p, q;
        kl_column<kKind>(zp - ls_p, zq - ls_q, beta, omb, lb, l1b, pa, qa, p, q);
        dz = pa - p * sum_p;
        dw = qa - q * sum_q;
      } else {
        const A p = pp.p(zp), q = pq.p(zq);
        // log p - log q, finite wherever the factor in front is nonzero (else its 0 wins)
        const A lr = (zp - ls_p) - (zq - ls_q);
        if constexpr (kKind == kReverse) {
          dz = xmul0(p, lr - sum_p);
          dw = q - p;
        } else {
          dz = p - q;
          dw = xmul0(q, -lr - sum_q);
        }
      }
      dzs[k] = g * dz;
      dws[k] = g * dw;
    }
    store_chunk(gxr, ci, static_cast<int>(V), agx, dzs);
    if (kNeedW) store_chunk(gyr, ci, static_cast<int>(V), agy, dws);
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
// sums over those columns, kept next to the row's state and relative to the same running
// maximum (s_out, n_out: never log(1 - sum), exact on peaked rows; an outside set whose
// every column is more than 87 below the row maximum flushes to 0, tail -inf).
// A chunk without member columns (nearly all of them) adds its sums to both states at once.
// Membership (forward): a bitmap of the ids in shared memory, kSparseSegCols columns at a
// time (one segment covers V <= 262144; a larger V re-reads the ids once per segment).
// Backward: a dense pass writes every column's non-member gradient; after a barrier, the
// first slot of each run of equal ids in the row's sorted ids (sorted by the launcher, stable,
// so duplicate ids sum in slot order: deterministic) overwrites its column with the member
// gradient. Every value comes from one thread in a fixed order: no atomics.

// mode: rlk::SparseMode (rlkernels.h).
constexpr int kSparseWords = 8192;                   // 32 KiB of bitmap
constexpr int64_t kSparseSegCols = 32 * kSparseWords;
constexpr int32_t kSparseSentinel = 0x7fffffff;      // sorted id of an unused / bad slot

template <class A>
__device__ __forceinline__ A log_tail_of(const Run<A>& out, A log_s) {
  // log(sum over the outside columns) - log s, both relative to the row maximum;
  // -inf when no outside column is finite
  if (out.m == neg_inf<A>()) return neg_inf<A>();
  const A log_out = out.n >= A(1) ? d_log1p(out.s + (out.n - A(1))) : d_log(out.s);
  return log_out - log_s;
}

template <class T, int kMode, bool kTail>
__global__ void __launch_bounds__(max_threads<T>())
    sparse_fwd_kernel(const T* __restrict__ x, int64_t stride_x, int64_t V,
                      const int64_t* __restrict__ idx, int64_t si0, int64_t si1, int64_t K,
                      const acc_t<T>* __restrict__ tgt, int64_t st0, int64_t st1,
                      acc_t<T>* __restrict__ out, int64_t so0, acc_t<T>* __restrict__ tail,
                      acc_t<T>* __restrict__ stats, acc_t<T> inv_t, acc_t<T> scale) {
  using A = acc_t<T>;
  constexpr int N = Chunk<T>::N;
  __shared__ SoftmaxState<A> scratch[32];
  __shared__ Run<A> run_scratch[32];
  __shared__ A max_scratch[32];
  __shared__ A sum_scratch[32];
  __shared__ long long count_scratch[32];
  __shared__ uint32_t bits[kTail ? kSparseWords : 1];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * stride_x;
  const int64_t* ir = idx + row * si0;
  Run<A> st = run_empty<A>(), so = run_empty<A>();  // so: outside sums, so.m unused until merged
  long long distinct = 0;
  A omax = neg_inf<A>();  // max of the outside columns (raw), for the flush check
  // body(s0, len) once per segment of kSparseSegCols columns, with that segment's bitmap
  auto segments = [&](auto&& body) {
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
      body(s0, len, words);
      __syncthreads();  // the next segment clears the bitmap
    }
  };
  // a segment is a multiple of 32 columns: a chunk's kVec bits lie in one bitmap word
  auto member_bits = [&](int c) {
    const int j0 = c * N;
    return (bits[j0 >> 5] >> (j0 & 31)) & ((1u << N) - 1u);
  };
  if constexpr (!kTail) {
    for_each_chunk(xr, static_cast<int>(V), [&](int, const Chunk<T>& ch) {
      A e[N];
      run_chunk<false, false>(st, ch.v, scale, e);
    });
  } else {
    segments([&](int64_t s0, int64_t len, int words) {
      if (kMode == kSparseKl) {
        long long c = 0;
        for (int w = threadIdx.x; w < words; w += blockDim.x) c += __popc(bits[w]);
        distinct += block_sum(c, count_scratch);
      }
      for_each_chunk<false>(xr + s0, static_cast<int>(len), [&](int c, const Chunk<T>& ch) {
        const A m_old = st.m;
        A e[N];
        const ChunkSum<A> cs = run_chunk<false, false>(st, ch.v, scale, e);
        if (st.m != m_old) {  // st was rebased: so follows (same maximum)
          so.s = m_old == neg_inf<A>() ? so.s * A(0)  // 0, or NaN from a NaN column
                                       : (so.s + so.n) * uexp((m_old - st.m) * scale);
          so.n = A(0);
        }
        const uint32_t member = member_bits(c);
        if (member == 0u) {
          so.s += cs.t;
          so.n += cs.n;
#pragma unroll
          for (int k = 0; k < N; ++k) omax = vmax(omax, ch.v[k]);
        } else {
#pragma unroll
          for (int k = 0; k < N; ++k) {
            if ((member >> k) & 1u) continue;
            omax = vmax(omax, ch.v[k]);
            if (ch.v[k] != st.m) so.s += e[k];
            else so.n += A(1);
          }
        }
      });
    });
    so.m = st.m;
    omax = block_reduce(omax, MaxOp{}, neg_inf<A>(), max_scratch);
  }
  st = run_block_reduce<false, false>(st, scale, run_scratch);
  if (kTail) so = run_block_reduce<false, false>(so, scale, run_scratch);
  const A mref = shift_of(st.m);                 // raw logits
  const A ms = mref * inv_t, log_s = d_log1p(run_rest(st));
  A tail_v = kTail ? log_tail_of(so, log_s) : A(0);
  const bool flushed = kTail && sizeof(A) == 4 && omax != neg_inf<A>() &&
                       (omax - st.m) * scale < A(-100);
  if constexpr (kTail) if (flushed) {
    // Every outside column is over 2^100 below the row maximum, where the shared-maximum sums
    // flush (ex2.approx.ftz): a second pass (this row only, taken the same way on every
    // thread) sums the outside columns against their own maximum.
    Run<A> o2 = run_empty<A>();
    segments([&](int64_t s0, int64_t len, int) {
      for_each_chunk<false>(xr + s0, static_cast<int>(len), [&](int c, const Chunk<T>& ch) {
        const uint32_t member = member_bits(c);
        A v[N], e[N];
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = ((member >> k) & 1u) ? neg_inf<A>() : ch.v[k];
        run_chunk<false, false>(o2, v, scale, e);
      });
    });
    o2 = run_block_reduce<false, false>(o2, scale, run_scratch);
    tail_v = (o2.m - st.m) * inv_t + d_log1p(run_rest(o2)) - log_s;
  }
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
  (void)ms;
  if (kMode == kSparseFull) {
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const int64_t id = ir[k * si1];
      out[row * so0 + k] = id >= 0 ? lp_at(id) : neg_inf<A>();
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
template <class T, int kMode, bool kTail>
__global__ void __launch_bounds__(max_threads<T>())
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

void token_logprobs_forward(Rows logits, Rows tokens, std::uintptr_t logp, std::uintptr_t ent,
                            std::uintptr_t stats, int64_t n, int64_t vocab, int dtype,
                            double inv_temperature, int64_t ignore_index, bool with_entropy,
                            std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "token_logprobs_forward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "token_logprobs_forward: vocab must be in [1, 2**31 - 1), got " +
                                std::to_string(vocab));
  dispatch_logits(dtype, "token_logprobs_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits.ptr != 0 && logp != 0 && ent != 0 && stats != 0,
                  "token_logprobs_forward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const T* x = as_cptr<T>(logits.ptr);
    const int64_t stride_x = logits.stride, stride_tok = tokens.stride;
    const int64_t* tk = as_cptr<int64_t>(tokens.ptr);
    A* lp = as_ptr<A>(logp);
    A* en = as_ptr<A>(ent);
    A* st = as_ptr<A>(stats);
    const A it = static_cast<A>(inv_temperature);
    const A sc = static_cast<A>(scale_of(dtype, inv_temperature));
    const dim3 grid(static_cast<unsigned>(n));
    if (tokens.ptr != 0) {
      if (with_entropy)
        token_logprobs_fwd_kernel<T, true, true><<<grid, threads, 0, s>>>(
            x, stride_x, tk, stride_tok, lp, en, st, vocab, it, sc, ignore_index);
      else
        token_logprobs_fwd_kernel<T, false, true><<<grid, threads, 0, s>>>(
            x, stride_x, tk, stride_tok, lp, en, st, vocab, it, sc, ignore_index);
    } else {
      if (with_entropy)
        token_logprobs_fwd_kernel<T, true, false><<<grid, threads, 0, s>>>(
            x, stride_x, nullptr, 0, lp, en, st, vocab, it, sc, ignore_index);
      else
        token_logprobs_fwd_kernel<T, false, false><<<grid, threads, 0, s>>>(
            x, stride_x, nullptr, 0, lp, en, st, vocab, it, sc, ignore_index);
    }
    RLK_CHECK_LAUNCH();
  });
}

void token_logprobs_backward(Rows grad_logp, Rows grad_entropy, Rows logits, Rows tokens,
                             Matrix stats, Rows out, int64_t n, int64_t vocab, int dtype,
                             double inv_temperature, int64_t ignore_index,
                             std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "token_logprobs_backward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "token_logprobs_backward: vocab must be in [1, 2**31 - 1), got " +
                                std::to_string(vocab));
  RLK_CHECK_ARG(grad_logp.ptr == 0 || tokens.ptr != 0,
                "token_logprobs_backward: grad_logp needs tokens");
  dispatch_logits(dtype, "token_logprobs_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits.ptr != 0 && stats.ptr != 0 && out.ptr != 0,
                  "token_logprobs_backward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const A* glp = as_cptr<A>(grad_logp.ptr);
    const A* gh = as_cptr<A>(grad_entropy.ptr);
    const T* x = as_cptr<T>(logits.ptr);
    const int64_t* tk = as_cptr<int64_t>(tokens.ptr);
    const A* st = as_cptr<A>(stats.ptr);
    T* o = as_ptr<T>(out.ptr);
    const A it = static_cast<A>(inv_temperature);
    const bool has_tok = tokens.ptr != 0;
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_TLP_BWD(GLP, GH)                                                                 \
  token_logprobs_bwd_kernel<T, GLP, GH><<<grid, threads, 0, s>>>(                            \
      glp, grad_logp.stride, gh, grad_entropy.stride, x, logits.stride, tk, tokens.stride,    \
      has_tok, st, stats.stride0, stats.stride1, o, out.stride, vocab, it, ignore_index)
    if (glp != nullptr && gh != nullptr) RLK_TLP_BWD(true, true);
    else if (glp != nullptr) RLK_TLP_BWD(true, false);
    else if (gh != nullptr) RLK_TLP_BWD(false, true);
    else RLK_TLP_BWD(false, false);
#undef RLK_TLP_BWD
    RLK_CHECK_LAUNCH();
  });
}

void kl_divergence_forward(Rows logits, Rows ref_logits, Rows ignore_mask, std::uintptr_t kl,
                           std::uintptr_t stats_p, std::uintptr_t stats_q, int64_t n,
                           int64_t vocab, int dtype, int kind, double beta,
                           double inv_temperature, std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "kl_divergence_forward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "kl_divergence_forward: vocab must be in [1, 2**31 - 1), got " +
                                std::to_string(vocab));
  RLK_CHECK_ARG(kind >= 0 && kind <= 2, "kl_divergence_forward: kind code must be 0 (reverse), "
                                        "1 (forward) or 2 (jsd), got " + std::to_string(kind));
  const JsdConst c{beta, 1.0 - beta, beta > 0 ? std::log(beta) : -INFINITY,
                   beta < 1 ? std::log(1.0 - beta) : -INFINITY};
  dispatch_logits(dtype, "kl_divergence_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits.ptr != 0 && ref_logits.ptr != 0 && kl != 0 && stats_p != 0 &&
                      stats_q != 0,
                  "kl_divergence_forward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_KL_FWD(KIND)                                                                      \
  kl_fwd_kernel<T, KIND><<<grid, threads, 0, s>>>(                                            \
      as_cptr<T>(logits.ptr), logits.stride, as_cptr<T>(ref_logits.ptr), ref_logits.stride,   \
      as_cptr<uint8_t>(ignore_mask.ptr), ignore_mask.stride, as_ptr<A>(kl), as_ptr<A>(stats_p), \
      as_ptr<A>(stats_q), vocab, static_cast<A>(inv_temperature),                           \
      static_cast<A>(scale_of(dtype, inv_temperature)), c)
    if (kind == kReverse) RLK_KL_FWD(kReverse);
    else if (kind == kForward) RLK_KL_FWD(kForward);
    else RLK_KL_FWD(kJsd);
#undef RLK_KL_FWD
    RLK_CHECK_LAUNCH();
  });
}

void kl_divergence_backward(Rows grad_kl, Rows logits, Rows ref_logits, Rows ignore_mask,
                            Matrix stats_p, Matrix stats_q, Rows grad_logits, Rows grad_ref,
                            int64_t n, int64_t vocab, int dtype, int kind, double beta,
                            double inv_temperature, std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "kl_divergence_backward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "kl_divergence_backward: vocab must be in [1, 2**31 - 1), got " +
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
    RLK_CHECK_ARG(grad_kl.ptr != 0 && logits.ptr != 0 && ref_logits.ptr != 0 &&
                      stats_p.ptr != 0 && stats_q.ptr != 0 && grad_logits.ptr != 0,
                  "kl_divergence_backward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_KL_BWD(KIND, NEED_W)                                                              \
  kl_bwd_kernel<T, KIND, NEED_W><<<grid, threads, 0, s>>>(                                    \
      as_cptr<A>(grad_kl.ptr), grad_kl.stride, as_cptr<T>(logits.ptr), logits.stride,         \
      as_cptr<T>(ref_logits.ptr), ref_logits.stride, as_cptr<uint8_t>(ignore_mask.ptr),       \
      ignore_mask.stride, as_cptr<A>(stats_p.ptr), stats_p.stride0, stats_p.stride1,          \
      as_cptr<A>(stats_q.ptr), stats_q.stride0, stats_q.stride1, as_ptr<T>(grad_logits.ptr),  \
      grad_logits.stride, as_ptr<T>(grad_ref.ptr), grad_ref.stride, vocab,                    \
      static_cast<A>(inv_temperature), c)
    const bool need_w = grad_ref.ptr != 0;
    if (kind == kReverse) { if (need_w) RLK_KL_BWD(kReverse, true); else RLK_KL_BWD(kReverse, false); }
    else if (kind == kForward) { if (need_w) RLK_KL_BWD(kForward, true); else RLK_KL_BWD(kForward, false); }
    else { if (need_w) RLK_KL_BWD(kJsd, true); else RLK_KL_BWD(kJsd, false); }
#undef RLK_KL_BWD
    RLK_CHECK_LAUNCH();
  });
}

void sparse_forward(Rows logits, Matrix indices, Matrix target, Rows out, std::uintptr_t tail,
                    std::uintptr_t stats, int64_t n, int64_t vocab, int64_t k, int dtype,
                    int mode, bool with_tail, double inv_temperature, std::uintptr_t stream) {
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
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_SPARSE_FWD(MODE, TAIL)                                                             \
  sparse_fwd_kernel<T, MODE, TAIL><<<grid, threads, 0, s>>>(                                   \
      as_cptr<T>(logits.ptr), logits.stride, vocab, as_cptr<int64_t>(indices.ptr),             \
      indices.stride0, indices.stride1, k, as_cptr<A>(target.ptr), target.stride0,             \
      target.stride1, as_ptr<A>(out.ptr), out.stride, as_ptr<A>(tail), as_ptr<A>(stats),       \
      static_cast<A>(inv_temperature), static_cast<A>(scale_of(dtype, inv_temperature)))
    if (mode == kSparseFull) { if (with_tail) RLK_SPARSE_FWD(kSparseFull, true); else RLK_SPARSE_FWD(kSparseFull, false); }
    else if (mode == kSparseSupport) { if (with_tail) RLK_SPARSE_FWD(kSparseSupport, true); else RLK_SPARSE_FWD(kSparseSupport, false); }
    else { if (with_tail) RLK_SPARSE_FWD(kSparseKl, true); else RLK_SPARSE_FWD(kSparseKl, false); }
#undef RLK_SPARSE_FWD
    RLK_CHECK_LAUNCH();
  });
}

void sparse_backward(Rows logits, Rows grad, Matrix indices, std::uintptr_t sorted_ids,
                     std::uintptr_t perm, Matrix slot_values, Matrix logp, std::uintptr_t tail,
                     std::uintptr_t grad_tail, std::uintptr_t grad_kl, Matrix stats, int64_t n,
                     int64_t vocab, int64_t k, int dtype, int mode, bool with_tail,
                     double inv_temperature, std::uintptr_t stream) {
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
#define RLK_SPARSE_BWD(MODE, TAIL)                                                             \
  sparse_bwd_kernel<T, MODE, TAIL><<<grid, threads, 0, s>>>(                                   \
      as_cptr<T>(logits.ptr), logits.stride, as_ptr<T>(grad.ptr), grad.stride, vocab,          \
      as_cptr<int64_t>(indices.ptr), indices.stride0, indices.stride1, k,                      \
      as_cptr<int32_t>(sorted_ids), as_cptr<int32_t>(perm), as_cptr<A>(slot_values.ptr),       \
      slot_values.stride0, slot_values.stride1, as_cptr<A>(logp.ptr), logp.stride0,            \
      logp.stride1, as_cptr<A>(tail), as_cptr<A>(grad_tail), as_cptr<A>(grad_kl),             \
      as_cptr<A>(stats.ptr), stats.stride0, stats.stride1, static_cast<A>(inv_temperature))
    if (mode == kSparseFull) { if (with_tail) RLK_SPARSE_BWD(kSparseFull, true); else RLK_SPARSE_BWD(kSparseFull, false); }
    else if (mode == kSparseSupport) { if (with_tail) RLK_SPARSE_BWD(kSparseSupport, true); else RLK_SPARSE_BWD(kSparseSupport, false); }
    else { if (with_tail) RLK_SPARSE_BWD(kSparseKl, true); else RLK_SPARSE_BWD(kSparseKl, false); }
#undef RLK_SPARSE_BWD
    RLK_CHECK_LAUNCH();
  });
}

}  // namespace rlk
