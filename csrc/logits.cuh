// Streaming logits rows [N, V], shared by the vocabulary kernels (vocab.cu: token_logprobs,
// kl_divergence; sparse.cu: sparse_logprobs, sparse_kl): chunked row loads, the online row
// statistics (Run) and probabilities from the saved statistics. Include from .cu files only.
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
// Hot loop (forward): per chunk the running state (m, s, n) of the thread is
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
#pragma once

#include <cfloat>
#include <type_traits>

#include "common.cuh"

namespace rlk {


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

inline cudaStream_t checked_stream(std::uintptr_t s) { return as_stream(s); }

}  // namespace rlk
