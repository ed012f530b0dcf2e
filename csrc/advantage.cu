// Advantage family (ops that read rewards): group_advantages, gae, discounted_returns and
// masked_whiten (forward and backward). Python launchers: rlkernels/cuda/advantage.py.
// Formulas: rlkernels/reference/advantage.py.
//
// group_advantages: one warp per group slot. Members are visited in their original order (the launcher gives
// a stable sort `perm` of the ids for arbitrary group_index, identity for contiguous groups),
// member k by lane k % 32, then a fixed shuffle tree: a group's result is deterministic, does
// not depend on the other groups in the call (except through the batch std), and is
// bit-identical in the contiguous and the group_index paths.
#include "common.cuh"
#include "rlkernels.h"

namespace rlk {
namespace {

constexpr int kWarp = 32;
constexpr int kBatchThreads = 1024;

// method: rlk::AdvantageMethod (rlkernels.h).

// Standard deviation of the whole batch, two passes (mean, then squared deviations), one
// block: sqrt(sum (x - mean)^2 / max(B - unbiased, 1)).
template <class T>
__global__ void __launch_bounds__(kBatchThreads)
    batch_std_kernel(const T* __restrict__ x, int64_t stride, int64_t b, bool unbiased,
                     acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  A s = A(0);
  for (int64_t i = threadIdx.x; i < b; i += blockDim.x) s += to_acc(x[i * stride]);
  const A mean = block_sum(s, scratch) / A(b);
  A ss = A(0);
  for (int64_t i = threadIdx.x; i < b; i += blockDim.x) {
    const A d = to_acc(x[i * stride]) - mean;
    ss += d * d;
  }
  ss = block_sum(ss, scratch);
  const int64_t denom = unbiased ? b - 1 : b;
  if (threadIdx.x == 0) *out = d_sqrt(ss / A(denom > 1 ? denom : 1));
}

// Group g's first member: starts[g] on the group_index path (sorted ids; starts[G] = B),
// else g * group_size (contiguous groups of equal size).
__device__ __forceinline__ int64_t group_start(const int64_t* __restrict__ starts,
                                               int64_t group_size, int64_t g) {
  return starts != nullptr ? starts[g] : g * group_size;
}

// For the members of slot g (sorted positions [start, end)), with n members, total = sum r,
// mean = total / n:
//   grpo:      (r - mean) / (std + eps),  std = sqrt(sum (r - mean)^2 / (n - unbiased))
//   dr_grpo:   r - mean
//   rloo:      r - (total - r) / (n - 1)
//   batch_std: (r - mean) / (batch_std + eps)
// and r - r (0, NaN for a NaN reward) for a group of one member. Output in original order.
template <class T>
__global__ void __launch_bounds__(kWarp)
    group_advantages_kernel(const T* __restrict__ x, int64_t stride,
                            const int64_t* __restrict__ perm,
                            const int64_t* __restrict__ starts, int64_t group_size,
                            acc_t<T>* __restrict__ out, int method, bool unbiased,
                            acc_t<T> eps, const acc_t<T>* __restrict__ batch_std) {
  using A = acc_t<T>;
  const int64_t g = blockIdx.x;
  const int64_t start = group_start(starts, group_size, g);
  const int64_t end = group_start(starts, group_size, g + 1);
  if (start >= end) return;  // an unused slot of the group_index path
  const int lane = threadIdx.x;
  auto src = [&](int64_t k) { return perm != nullptr ? perm[k] : k; };
  const A n = A(end - start);
  A s = A(0);
  for (int64_t k = start + lane; k < end; k += kWarp) s += to_acc(x[src(k) * stride]);
  const A total = __shfl_sync(kFullMask, warp_reduce_down(s, SumOp{}), 0);
  const A mean = total / n;
  A scale = A(1);
  if (method == kGrpo) {
    A ss = A(0);
    for (int64_t k = start + lane; k < end; k += kWarp) {
      const A d = to_acc(x[src(k) * stride]) - mean;
      ss += d * d;
    }
    ss = __shfl_sync(kFullMask, warp_reduce_down(ss, SumOp{}), 0);
    scale = d_sqrt(ss / (unbiased ? n - A(1) : n)) + eps;
  } else if (method == kBatchStd) {
    scale = *batch_std + eps;
  }
  for (int64_t k = start + lane; k < end; k += kWarp) {
    const int64_t i = src(k);
    const A r = to_acc(x[i * stride]);
    A adv;
    if (method == kRloo) adv = r - (total - r) / (n - A(1));
    else if (method == kDrGrpo) adv = r - mean;
    else adv = (r - mean) / scale;
    out[i] = n > A(1) ? adv : r - r;
  }
}


// ============================================================== gae / discounted returns
//
// Both are reverse scans over T in which a masked step is the identity:
//   discounted returns: G_t = r_t + gamma G_{t+1}                       (valid t)
//   gae:                N_t = v_t                  (value at the next valid step: nv_t = N_{t+1})
//                       L_t = delta_t + gamma lam L_{t+1},  delta_t = r_t + gamma nv_t - v_t
// Layout: one warp per row (kScanWarps rows per block), the row walked from its end in chunks
// of 32 * kScanK steps; lane l owns the kScanK consecutive steps [l kScanK, (l + 1) kScanK)
// of a chunk. Per chunk: each lane composes its steps serially, the 32 lane summaries are
// combined by a reverse inclusive shuffle scan (Hillis-Steele, log2(32) steps), the exclusive
// prefix applied to the carry from the later chunks gives each lane its starting state, and
// the lane walks its steps again to write the outputs. Why this and not one thread per row:
// B is often small (tens of rows) and T long (thousands of steps); a warp per row keeps T / 32
// dependent steps instead of T, and its loads are contiguous across the lanes.
// Summaries (the identity at masked and out-of-range steps; selects, never 0 * x, so an inf
// or NaN at a masked position stays out as in the sequential reference):
//   next-value scan: (h, val) = "a valid step exists; the value at the first one";
//                    earlier o later = h_earlier ? earlier : later;
//   affine scan:     L -> d + a L;  earlier o later = (a_e a_l, d_e + a_e d_l).
// Fixed shuffle order: deterministic, and a row's result does not depend on B.

constexpr int kScanWarps = 4;
constexpr int kScanK = 4;
constexpr int kScanChunk = 32 * kScanK;

template <class A>
struct Affine {
  A a, d;  // L -> d + a L
};

// Reverse inclusive scan over the lanes: lane l gets f_l o f_{l+1} o ... o f_31.
template <class A>
__device__ __forceinline__ Affine<A> warp_affine_rscan(Affine<A> f, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const A oa = __shfl_down_sync(kFullMask, f.a, off);
    const A od = __shfl_down_sync(kFullMask, f.d, off);
    if (lane + off < 32) {
      f.d = f.d + f.a * od;
      f.a = f.a * oa;
    }
  }
  return f;
}

// Reverse inclusive scan of (h, val): lane l gets the value at the first valid step in lanes
// l..31 (h = 0 when there is none).
template <class A>
__device__ __forceinline__ void warp_first_rscan(int& h, A& val, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int oh = __shfl_down_sync(kFullMask, h, off);
    const A ov = __shfl_down_sync(kFullMask, val, off);
    if (lane + off < 32 && !h) {
      h = oh;
      val = ov;
    }
  }
}

// kGae: out0 = advantages, out1 = returns; else out0 = discounted returns (v unused) and,
// when out1 is given, out1 = advantages G - base[row] (base may be null: 0) at valid steps,
// 0 at masked ones; with row_stats (3 * rows elements), each row's (count, mean, sum of
// squared deviations) of out1 over its valid steps (two passes over the written row), for
// batch_whiten_kernel (REINFORCE++).
// Outputs are contiguous [B, T]; inputs have any (row, step) strides. The launch bounds' 8
// blocks per SM (<= 64 registers) stop ptxas from picking 32 registers and spilling (it did
// for the fp16 gae variant with the bare bound).
template <class T, bool kGae>
__global__ void __launch_bounds__(kScanWarps * 32, 8)
    reverse_scan_kernel(const T* __restrict__ r, int64_t r_sb, int64_t r_st,
                        const T* __restrict__ v, int64_t v_sb, int64_t v_st,
                        const uint8_t* __restrict__ mask, int64_t m_sb, int64_t m_st,
                        acc_t<T>* __restrict__ out0, acc_t<T>* __restrict__ out1, int64_t rows,
                        int64_t steps, acc_t<T> gamma, acc_t<T> c,
                        const acc_t<T>* __restrict__ base = nullptr,
                        acc_t<T>* __restrict__ row_stats = nullptr) {
  using A = acc_t<T>;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kScanWarps + (threadIdx.x >> 5);
  if (row >= rows) return;  // warp-uniform: no shuffle is left half-done
  const T* rr = r + row * r_sb;
  const T* vr = kGae ? v + row * v_sb : nullptr;
  const uint8_t* mr = mask + row * m_sb;
  A* o0 = out0 + row * steps;
  A* o1 = out1 != nullptr ? out1 + row * steps : nullptr;
  const A bias = (!kGae && base != nullptr) ? base[row] : A(0);
  A carry_n = A(0);  // value at the first valid step of the later chunks (0 after the row)
  A carry_l = A(0);  // L (or G) at the first step of the later chunks
  for (int64_t chunk = (steps + kScanChunk - 1) / kScanChunk - 1; chunk >= 0; --chunk) {
    const int64_t t0 = chunk * kScanChunk + lane * kScanK;
    bool ok[kScanK];
    A rv[kScanK], vv[kScanK], d[kScanK];
#pragma unroll
    for (int k = 0; k < kScanK; ++k) {
      const int64_t t = t0 + k;
      ok[k] = t < steps && mr[t * m_st] != 0;
      rv[k] = ok[k] ? to_acc(rr[t * r_st]) : A(0);  // masked steps are never read
      vv[k] = (kGae && ok[k]) ? to_acc(vr[t * v_st]) : A(0);
    }
    if (kGae) {
      // next-value scan: the value at the first valid step after each step
      int h = 0;
      A first = A(0);
#pragma unroll
      for (int k = kScanK - 1; k >= 0; --k) {
        if (ok[k]) {
          h = 1;
          first = vv[k];
        }
      }
      warp_first_rscan(h, first, lane);
      const int eh = __shfl_down_sync(kFullMask, h, 1);
      const A ev = __shfl_down_sync(kFullMask, first, 1);
      const int h0 = __shfl_sync(kFullMask, h, 0);
      const A v0 = __shfl_sync(kFullMask, first, 0);
      A nv = (lane < 31 && eh) ? ev : carry_n;
#pragma unroll
      for (int k = kScanK - 1; k >= 0; --k) {
        d[k] = rv[k] + gamma * nv - vv[k];  // delta (used at valid steps only)
        if (ok[k]) nv = vv[k];
      }
      carry_n = h0 ? v0 : carry_n;
    } else {
#pragma unroll
      for (int k = 0; k < kScanK; ++k) d[k] = rv[k];
    }
    // affine scan: this lane's map, then the lanes' prefix, then the walk
    Affine<A> f{A(1), A(0)};
#pragma unroll
    for (int k = kScanK - 1; k >= 0; --k) {
      if (ok[k]) {
        f.d = d[k] + c * f.d;
        f.a = c * f.a;
      }
    }
    f = warp_affine_rscan(f, lane);
    const A ea = __shfl_down_sync(kFullMask, f.a, 1);
    const A ed = __shfl_down_sync(kFullMask, f.d, 1);
    const A a0 = __shfl_sync(kFullMask, f.a, 0);
    const A d0 = __shfl_sync(kFullMask, f.d, 0);
    A l = lane < 31 ? ed + ea * carry_l : carry_l;
#pragma unroll
    for (int k = kScanK - 1; k >= 0; --k) {
      const int64_t t = t0 + k;
      if (ok[k]) l = d[k] + c * l;
      if (t < steps) {
        o0[t] = ok[k] ? l : A(0);
        if (kGae) o1[t] = ok[k] ? l + vv[k] : A(0);
        else if (o1 != nullptr) o1[t] = ok[k] ? l - bias : A(0);
      }
    }
    carry_l = d0 + a0 * carry_l;
  }
  if (!kGae && row_stats != nullptr) {
    __syncwarp();  // the row's advantages written by every lane, read back by any lane
    A cnt = A(0), s = A(0);
    for (int64_t t = lane; t < steps; t += 32) {
      if (mr[t * m_st] != 0) {
        cnt += A(1);
        s += o1[t];
      }
    }
    cnt = __shfl_sync(kFullMask, warp_reduce_down(cnt, SumOp{}), 0);
    s = __shfl_sync(kFullMask, warp_reduce_down(s, SumOp{}), 0);
    const A mean = cnt > A(0) ? s / cnt : A(0);
    A q = A(0);
    for (int64_t t = lane; t < steps; t += 32) {
      if (mr[t * m_st] != 0) {
        const A dv = o1[t] - mean;
        q += dv * dv;
      }
    }
    q = warp_reduce_down(q, SumOp{});
    if (lane == 0) {
      row_stats[row] = cnt;
      row_stats[rows + row] = mean;
      row_stats[2 * rows + row] = q;
    }
  }
}

// ============================================================================ masked_whiten
//
// Whole-tensor statistics over n elements with weights w (a bool mask: 1 / 0; else the mask
// in the accumulation type; w == 0 takes no part, so a NaN value there never leaks):
//   c = sum w,  C1 = max(c, 1),  mean = sum w v / C1,  dev = v - mean,
//   D = max(c - 1 (unbiased) or c, 1),  var = sum w dev^2 / D,  r = 1 / sqrt(var + eps),
//   out = dev r (+ mean when not shift_mean).
// Deterministic two-stage reductions, no atomics: `blocks` (a function of n only) blocks
// accumulate grid-stride partials; each block of the next kernel re-reduces the few partials
// itself in one fixed tree (all blocks get the same bits), which saves a finalize launch.
// Partials: ws[b * 4 + 0..1] = (sum w, sum w v), ws[b * 4 + 2..3] = (sum w dev^2, sum w dev).
// stats (4 elements) = (c, mean, r, S = sum w dev): what backward needs (S is not 0 when
// 0 < c < 1, because of max(c, 1)).

constexpr int kWhitenThreads = 256;
constexpr int kWhitenFields = 4;
constexpr int kWhitenMaxBlocks = 1024;  // partials re-reduced by one block of threads

template <class A>
__device__ __forceinline__ A weight_at(const uint8_t* mb, const A* mw, int64_t i) {
  return mb != nullptr ? (mb[i] != 0 ? A(1) : A(0)) : mw[i];
}

// Sum of field f of the partials of every block, in a fixed order (every thread gets it).
template <class A>
__device__ __forceinline__ A sum_partials(const A* ws, int fields, int f, A* scratch) {
  A s = A(0);
  for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += blockDim.x) s += ws[b * fields + f];
  return block_sum(s, scratch);
}

template <class A>
__device__ __forceinline__ A clamp_min1(A x) { return x < A(1) ? A(1) : x; }  // keeps NaN

template <class T>
__global__ void __launch_bounds__(kWhitenThreads)
    whiten_sums_kernel(const T* __restrict__ v, const uint8_t* __restrict__ mb,
                       const acc_t<T>* __restrict__ mw, int64_t n, acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  A c = A(0), s = A(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A w = weight_at(mb, mw, i);
    if (w != A(0)) {
      c += w;
      s += w * to_acc(v[i]);
    }
  }
  c = block_sum(c, scratch);
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) {
    ws[blockIdx.x * kWhitenFields + 0] = c;
    ws[blockIdx.x * kWhitenFields + 1] = s;
  }
}

template <class T>
__global__ void __launch_bounds__(kWhitenThreads)
    whiten_dev_kernel(const T* __restrict__ v, const uint8_t* __restrict__ mb,
                      const acc_t<T>* __restrict__ mw, int64_t n, acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const A c = sum_partials(ws, kWhitenFields, 0, scratch);
  const A mean = sum_partials(ws, kWhitenFields, 1, scratch) / clamp_min1(c);
  A q = A(0), sd = A(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A w = weight_at(mb, mw, i);
    if (w != A(0)) {
      const A dv = to_acc(v[i]) - mean;
      q += w * dv * dv;
      sd += w * dv;
    }
  }
  q = block_sum(q, scratch);
  sd = block_sum(sd, scratch);
  // every block has read the pass-1 fields above; only fields 2..3 are written here
  if (threadIdx.x == 0) {
    ws[blockIdx.x * kWhitenFields + 2] = q;
    ws[blockIdx.x * kWhitenFields + 3] = sd;
  }
}

template <class T>
__global__ void __launch_bounds__(kWhitenThreads)
    whiten_apply_kernel(const T* __restrict__ v, int64_t n, const acc_t<T>* __restrict__ ws,
                        acc_t<T>* __restrict__ out, acc_t<T>* __restrict__ stats,
                        bool shift_mean, bool unbiased, acc_t<T> eps) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const A c = sum_partials(ws, kWhitenFields, 0, scratch);
  const A mean = sum_partials(ws, kWhitenFields, 1, scratch) / clamp_min1(c);
  const A q = sum_partials(ws, kWhitenFields, 2, scratch);
  const A sd = sum_partials(ws, kWhitenFields, 3, scratch);
  const A var = q / clamp_min1(unbiased ? c - A(1) : c);
  const A rstd = A(1) / d_sqrt(var + eps);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    stats[0] = c;
    stats[1] = mean;
    stats[2] = rstd;
    stats[3] = sd;
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A o = (to_acc(v[i]) - mean) * rstd;
    out[i] = shift_mean ? o : o + mean;
  }
}

// Backward partials: ws[b * 2 + 0..1] = (G = sum g, H = sum g dev) over every element (every
// output depends on mean and r); g == 0 contributes 0 to H even where dev is NaN.
template <class T>
__global__ void __launch_bounds__(kWhitenThreads)
    whiten_bwd_sums_kernel(const acc_t<T>* __restrict__ g, const T* __restrict__ v, int64_t n,
                           const acc_t<T>* __restrict__ stats, acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const A mean = stats[1];
  A sg = A(0), sh = A(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A gi = g[i];
    sg += gi;
    sh += xmul0(gi, to_acc(v[i]) - mean);
  }
  sg = block_sum(sg, scratch);
  sh = block_sum(sh, scratch);
  if (threadIdx.x == 0) {
    ws[blockIdx.x * 2 + 0] = sg;
    ws[blockIdx.x * 2 + 1] = sh;
  }
}

// grad_j = r g_j - w_j [ G (r - ns) / C1 + (r^3 H / D) (dev_j - S / C1) ]   (w_j != 0)
//        = r g_j                                                            (w_j == 0)
// with ns = 1 when not shift_mean (the added mean), else 0; see the launcher's docstring.
template <class T>
__global__ void __launch_bounds__(kWhitenThreads)
    whiten_bwd_apply_kernel(const acc_t<T>* __restrict__ g, const T* __restrict__ v,
                            const uint8_t* __restrict__ mb, const acc_t<T>* __restrict__ mw,
                            int64_t n, const acc_t<T>* __restrict__ stats,
                            const acc_t<T>* __restrict__ ws, T* __restrict__ grad,
                            bool shift_mean, bool unbiased) {
  using A = acc_t<T>;
  __shared__ A scratch[32];
  const A sg = sum_partials(ws, 2, 0, scratch);
  const A sh = sum_partials(ws, 2, 1, scratch);
  const A c = stats[0], mean = stats[1], rstd = stats[2], sd = stats[3];
  const A c1 = clamp_min1(c);
  const A dd = clamp_min1(unbiased ? c - A(1) : c);
  const A k_mean = sg * (shift_mean ? rstd : rstd - A(1)) / c1;
  const A k_var = rstd * rstd * rstd * sh / dd;
  const A s_mean = sd / c1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const A w = weight_at(mb, mw, i);
    A gr = rstd * g[i];
    if (w != A(0)) gr -= w * (k_mean + k_var * ((to_acc(v[i]) - mean) - s_mean));
    grad[i] = from_acc<T>(gr);
  }
}

// ================================================================ verl's other estimators
//
// group_estimators_kernel: one warp per group slot, as group_advantages_kernel, for
//   opo:       r - sum_g(L r) / sum_g(L)        (L: the response's valid tokens; a group
//                                                without any valid token: r - r)
//   gpg:       alpha (r - mean),  alpha = B / max(#non-zero rewards, 1)  (batch_alpha_kernel)
//   grpo_passk: the unique best member: (max - second max) [/ (std + eps)], others 0; a NaN
//              or inf reward makes the group NaN (+ total - total)
//   rf++ baseline: r - mean, then batch_whiten_kernel
//   gdpo:      sum_k w_k A_k (A_k: grpo [or dr_grpo] of component k), then batch_whiten_kernel
// and r - r for a group of one member (before the whitening). L is an exact integer count
// (a warp-cooperative pass over the member's mask row, members in order). The whitened
// methods write ws [3, b] = (L, advantage, 0) instead of out: the statistics of
// batch_whiten_kernel with each response weighted by its valid tokens.

constexpr int kBatchWhitenThreads = 256;
constexpr int kBatchWhitenMaxBlocks = 1024;

__device__ __forceinline__ long long warp_valid_count(const uint8_t* __restrict__ mrow,
                                                      int64_t ms1, int64_t t, int lane) {
  long long c = 0;
  for (int64_t j = lane; j < t; j += kWarp) c += mrow[j * ms1] != 0 ? 1 : 0;
  return __shfl_sync(kFullMask, warp_reduce_down(c, SumOp{}), 0);
}

// alpha of gpg: B / max(number of non-zero rewards, 1), one block (an exact count).
template <class T>
__global__ void __launch_bounds__(kBatchThreads)
    batch_alpha_kernel(const T* __restrict__ x, int64_t stride, int64_t b,
                       acc_t<T>* __restrict__ out) {
  using A = acc_t<T>;
  __shared__ long long scratch[32];
  long long c = 0;
  for (int64_t i = threadIdx.x; i < b; i += blockDim.x) c += to_acc(x[i * stride]) != A(0);
  c = block_sum(c, scratch);
  if (threadIdx.x == 0) *out = A(b) / A(c > 0 ? c : 1);
}

// The launch bounds' 16 blocks per SM leave <= 128 registers: with the bare bound ptxas
// picked 64 and spilled in the fp16 variant.
template <class T>
__global__ void __launch_bounds__(kWarp, 16)
    group_estimators_kernel(const T* __restrict__ x, int64_t xs0, int64_t xs1, int64_t comps,
                            const int64_t* __restrict__ perm, const int64_t* __restrict__ starts,
                            int64_t group_size, const uint8_t* __restrict__ mask, int64_t ms0,
                            int64_t ms1, int64_t t, const acc_t<T>* __restrict__ weights,
                            acc_t<T>* __restrict__ out, acc_t<T>* __restrict__ ws, int64_t b,
                            int method, bool unbiased, bool norm, acc_t<T> eps,
                            const acc_t<T>* __restrict__ alpha) {
  using A = acc_t<T>;
  const int64_t g = blockIdx.x;
  const int64_t start = group_start(starts, group_size, g);
  const int64_t end = group_start(starts, group_size, g + 1);
  if (start >= end) return;  // an unused slot of the group_index path
  const int lane = threadIdx.x;
  auto src = [&](int64_t k) { return perm != nullptr ? perm[k] : k; };
  const A n = A(end - start);
  const bool whitened = method == kRppBaseline || method == kGdpo;
  A sum_len = A(0), sum_lr = A(0);
  if (method == kOpo || whitened) {
    for (int64_t k = start; k < end; ++k) {  // members in order: a fixed summation order
      const int64_t i = src(k);
      const A len = A(warp_valid_count(mask + i * ms0, ms1, t, lane));
      if (method == kOpo) {
        sum_len += len;
        sum_lr += len * to_acc(x[i * xs0]);
      } else if (lane == 0) {
        ws[i] = len;
        ws[2 * b + i] = A(0);
      }
    }
  }
  for (int64_t c = 0; c < comps; ++c) {
    const T* xc = x + c * xs1;
    A s = A(0);
    for (int64_t k = start + lane; k < end; k += kWarp) s += to_acc(xc[src(k) * xs0]);
    const A total = __shfl_sync(kFullMask, warp_reduce_down(s, SumOp{}), 0);
    const A mean = total / n;
    A top = neg_inf<A>(), second = neg_inf<A>(), n_top = A(0);
    if (method == kGrpoPassk) {
      for (int64_t k = start + lane; k < end; k += kWarp) {
        const A r = to_acc(xc[src(k) * xs0]);
        top = r > top ? r : top;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const A o = __shfl_xor_sync(kFullMask, top, off);
        top = o > top ? o : top;
      }
      for (int64_t k = start + lane; k < end; k += kWarp) {
        const A r = to_acc(xc[src(k) * xs0]);
        if (r == top) n_top += A(1);
        else second = r > second ? r : second;
      }
      n_top = __shfl_sync(kFullMask, warp_reduce_down(n_top, SumOp{}), 0);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const A o = __shfl_xor_sync(kFullMask, second, off);
        second = o > second ? o : second;
      }
    }
    const bool divide = norm && (method == kGrpoPassk || method == kGdpo);
    A scale = A(1);
    if (divide) {  // two-pass variance
      A ss = A(0);
      for (int64_t k = start + lane; k < end; k += kWarp) {
        const A d = to_acc(xc[src(k) * xs0]) - mean;
        ss += d * d;
      }
      ss = __shfl_sync(kFullMask, warp_reduce_down(ss, SumOp{}), 0);
      scale = d_sqrt(ss / (unbiased ? n - A(1) : n)) + eps;
    }
    A gap = top - second;
    if (divide) gap = gap / scale;
    const A w = method == kGdpo ? weights[c] : A(1);
    for (int64_t k = start + lane; k < end; k += kWarp) {
      const int64_t i = src(k);
      const A r = to_acc(xc[i * xs0]);
      A adv;
      if (method == kOpo) adv = sum_len > A(0) ? r - sum_lr / sum_len : r - r;
      else if (method == kGpg) adv = *alpha * (r - mean);
      else if (method == kGrpoPassk)
        adv = ((r == top && n_top == A(1)) ? gap : A(0)) + (total - total);
      else if (divide) adv = (r - mean) / scale;
      else adv = r - mean;
      adv = n > A(1) ? adv : r - r;  // a group of one member has no baseline
      if (method == kGdpo) ws[b + i] = (c == 0 ? A(0) : ws[b + i]) + w * adv;
      else if (whitened) ws[b + i] = adv;
      else out[i] = adv;
    }
  }
}

// Whitening over the batch from per-row statistics ws [3, b] = (n_i, mean_i, M2_i), combined
// by every block in the same fixed order (all blocks get the same bits):
//   N = sum n, mean = sum n_i mean_i / max(N, 1), M2 = sum M2_i + n_i (mean_i - mean)^2,
//   var = M2 / max(N - 1 (unbiased) or N, 1), r = 1 / sqrt(var + eps);
// then, with a mask ([b, t] advantages in out, contiguous): out = valid ? (out - mean) r : 0;
// without: out[i] = (mean_i - mean) r (one advantage per response).
template <class A>
__global__ void __launch_bounds__(kBatchWhitenThreads)
    batch_whiten_kernel(const A* __restrict__ ws, int64_t b, A* __restrict__ out,
                        const uint8_t* __restrict__ mask, int64_t ms0, int64_t ms1, int64_t t,
                        bool unbiased, A eps) {
  __shared__ A scratch[32];
  A c = A(0), s = A(0);
  for (int64_t i = threadIdx.x; i < b; i += blockDim.x) {
    const A ni = ws[i];
    if (ni > A(0)) {
      c += ni;
      s += ni * ws[b + i];
    }
  }
  c = block_sum(c, scratch);
  s = block_sum(s, scratch);
  const A mean = s / clamp_min1(c);
  A q = A(0);
  for (int64_t i = threadIdx.x; i < b; i += blockDim.x) {
    const A ni = ws[i];
    if (ni > A(0)) {
      const A d = ws[b + i] - mean;
      q += ws[2 * b + i] + ni * d * d;
    }
  }
  q = block_sum(q, scratch);
  const A rstd = A(1) / d_sqrt(q / clamp_min1(unbiased ? c - A(1) : c) + eps);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (mask == nullptr) {
    for (int64_t i = first; i < b; i += stride) out[i] = (ws[b + i] - mean) * rstd;
  } else {
    for (int64_t e = first; e < b * t; e += stride) {
      const int64_t row = e / t, col = e - row * t;
      out[e] = mask[row * ms0 + col * ms1] != 0 ? (out[e] - mean) * rstd : A(0);
    }
  }
}

int batch_whiten_blocks(int64_t elements) {  // a function of the size only (determinism)
  const int64_t blocks = (elements + 2047) / 2048;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kBatchWhitenMaxBlocks
                                                 ? kBatchWhitenMaxBlocks : blocks));
}

}  // namespace

void group_advantages_forward(Rows rewards, std::uintptr_t perm, std::uintptr_t starts,
                              std::uintptr_t out, std::uintptr_t workspace, int64_t b,
                              int64_t group_size, int64_t slots, int dtype, int method,
                              bool unbiased, double eps, std::uintptr_t stream) {
  RLK_CHECK_ARG(b >= 0, "group_advantages_forward: b must be >= 0, got " + std::to_string(b));
  RLK_CHECK_ARG(method >= kGrpo && method <= kBatchStd,
                "group_advantages_forward: method code must be 0 (grpo), 1 (dr_grpo), 2 (rloo) "
                "or 3 (batch_std), got " + std::to_string(method));
  RLK_CHECK_ARG((perm == 0) == (starts == 0),
                "group_advantages_forward: perm and starts go together (group_index path)");
  RLK_CHECK_ARG(slots >= 0 && slots <= 0x7fffffffLL,
                "group_advantages_forward: slots must be in [0, 2**31), got " +
                    std::to_string(slots));
  if (perm == 0) {
    RLK_CHECK_ARG(group_size >= 1 && b % group_size == 0 && slots * group_size == b,
                  "group_advantages_forward: contiguous groups need group_size >= 1 dividing b "
                  "and slots = b / group_size");
  }
  dispatch_logits(dtype, "group_advantages_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (b == 0 || slots == 0) return;
    RLK_CHECK_ARG(rewards.ptr != 0 && out != 0,
                  "group_advantages_forward: null device pointer");
    RLK_CHECK_ARG(method != kBatchStd || workspace != 0,
                  "group_advantages_forward: batch_std needs a workspace of one element");
    const cudaStream_t s = as_stream(stream);
    const T* x = as_cptr<T>(rewards.ptr);
    const int64_t stride = rewards.stride;
    A* ws = as_ptr<A>(workspace);
    if (method == kBatchStd) {
      batch_std_kernel<T><<<1, kBatchThreads, 0, s>>>(x, stride, b, unbiased, ws);
      RLK_CHECK_LAUNCH();
    }
    group_advantages_kernel<T><<<static_cast<unsigned>(slots), kWarp, 0, s>>>(
        x, stride, as_cptr<int64_t>(perm), as_cptr<int64_t>(starts), group_size, as_ptr<A>(out),
        method, unbiased, static_cast<A>(eps), ws);
    RLK_CHECK_LAUNCH();
  });
}

void gae_forward(Matrix rewards, Matrix values, Matrix mask, std::uintptr_t advantages,
                 std::uintptr_t returns, int64_t b, int64_t t, int dtype, double gamma,
                 double lam, std::uintptr_t stream) {
  RLK_CHECK_ARG(b >= 0 && b <= 0x7fffffffLL,
                "gae_forward: b must be in [0, 2**31), got " + std::to_string(b));
  RLK_CHECK_ARG(t >= 0, "gae_forward: t must be >= 0, got " + std::to_string(t));
  dispatch_logits(dtype, "gae_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (b == 0 || t == 0) return;
    RLK_CHECK_ARG(rewards.ptr != 0 && values.ptr != 0 && mask.ptr != 0 && advantages != 0 &&
                      returns != 0,
                  "gae_forward: null device pointer");
    const unsigned grid = static_cast<unsigned>((b + kScanWarps - 1) / kScanWarps);
    reverse_scan_kernel<T, true><<<grid, kScanWarps * 32, 0, as_stream(stream)>>>(
        as_cptr<T>(rewards.ptr), rewards.stride0, rewards.stride1, as_cptr<T>(values.ptr),
        values.stride0, values.stride1, as_cptr<uint8_t>(mask.ptr), mask.stride0, mask.stride1,
        as_ptr<A>(advantages), as_ptr<A>(returns), b, t,
        static_cast<A>(gamma), static_cast<A>(gamma * lam));
    RLK_CHECK_LAUNCH();
  });
}

void discounted_returns_forward(Matrix rewards, Matrix mask, std::uintptr_t out, int64_t b,
                                int64_t t, int dtype, double gamma, std::uintptr_t stream) {
  RLK_CHECK_ARG(b >= 0 && b <= 0x7fffffffLL,
                "discounted_returns_forward: b must be in [0, 2**31), got " + std::to_string(b));
  RLK_CHECK_ARG(t >= 0, "discounted_returns_forward: t must be >= 0, got " + std::to_string(t));
  dispatch_logits(dtype, "discounted_returns_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (b == 0 || t == 0) return;
    RLK_CHECK_ARG(rewards.ptr != 0 && mask.ptr != 0 && out != 0,
                  "discounted_returns_forward: null device pointer");
    const unsigned grid = static_cast<unsigned>((b + kScanWarps - 1) / kScanWarps);
    reverse_scan_kernel<T, false><<<grid, kScanWarps * 32, 0, as_stream(stream)>>>(
        as_cptr<T>(rewards.ptr), rewards.stride0, rewards.stride1, nullptr, 0, 0,
        as_cptr<uint8_t>(mask.ptr), mask.stride0, mask.stride1, as_ptr<A>(out), nullptr, b, t,
        static_cast<A>(gamma), static_cast<A>(gamma));
    RLK_CHECK_LAUNCH();
  });
}

namespace {
void check_whiten_args(const char* op, int64_t n, int blocks, std::uintptr_t mask_u8,
                       std::uintptr_t mask_w) {
  RLK_CHECK_ARG(n >= 0, std::string(op) + ": n must be >= 0, got " + std::to_string(n));
  RLK_CHECK_ARG(blocks >= 1 && blocks <= kWhitenMaxBlocks,
                std::string(op) + ": blocks must be in [1, " + std::to_string(kWhitenMaxBlocks) +
                    "], got " + std::to_string(blocks));
  RLK_CHECK_ARG(n == 0 || (mask_u8 == 0) != (mask_w == 0),
                std::string(op) + ": exactly one of mask_u8 and mask_w must be given");
}
}  // namespace

void masked_whiten_forward(std::uintptr_t values, std::uintptr_t mask_u8, std::uintptr_t mask_w,
                           std::uintptr_t out, std::uintptr_t stats, std::uintptr_t workspace,
                           int64_t n, int blocks, int dtype, bool shift_mean, double eps,
                           bool unbiased, std::uintptr_t stream) {
  check_whiten_args("masked_whiten_forward", n, blocks, mask_u8, mask_w);
  dispatch_logits(dtype, "masked_whiten_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    RLK_CHECK_ARG(stats != 0 && workspace != 0 && (n == 0 || (values != 0 && out != 0)),
                  "masked_whiten_forward: null device pointer");
    const cudaStream_t s = as_stream(stream);
    const T* v = as_cptr<T>(values);
    const uint8_t* mb = as_cptr<uint8_t>(mask_u8);
    const A* mw = as_cptr<A>(mask_w);
    A* ws = as_ptr<A>(workspace);
    // n == 0 still runs (one block, empty loops): stats = (0, 0, 1 / sqrt(eps), 0)
    whiten_sums_kernel<T><<<blocks, kWhitenThreads, 0, s>>>(v, mb, mw, n, ws);
    RLK_CHECK_LAUNCH();
    whiten_dev_kernel<T><<<blocks, kWhitenThreads, 0, s>>>(v, mb, mw, n, ws);
    RLK_CHECK_LAUNCH();
    whiten_apply_kernel<T><<<blocks, kWhitenThreads, 0, s>>>(
        v, n, ws, as_ptr<A>(out), as_ptr<A>(stats), shift_mean, unbiased, static_cast<A>(eps));
    RLK_CHECK_LAUNCH();
  });
}

void masked_whiten_backward(std::uintptr_t grad_out, std::uintptr_t values,
                            std::uintptr_t mask_u8, std::uintptr_t mask_w, std::uintptr_t stats,
                            std::uintptr_t workspace, std::uintptr_t grad_values, int64_t n,
                            int blocks, int dtype, bool shift_mean, bool unbiased,
                            std::uintptr_t stream) {
  check_whiten_args("masked_whiten_backward", n, blocks, mask_u8, mask_w);
  dispatch_logits(dtype, "masked_whiten_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(grad_out != 0 && values != 0 && stats != 0 && workspace != 0 &&
                      grad_values != 0,
                  "masked_whiten_backward: null device pointer");
    const cudaStream_t s = as_stream(stream);
    const A* g = as_cptr<A>(grad_out);
    const T* v = as_cptr<T>(values);
    const A* st = as_cptr<A>(stats);
    A* ws = as_ptr<A>(workspace);
    whiten_bwd_sums_kernel<T><<<blocks, kWhitenThreads, 0, s>>>(g, v, n, st, ws);
    RLK_CHECK_LAUNCH();
    whiten_bwd_apply_kernel<T><<<blocks, kWhitenThreads, 0, s>>>(
        g, v, as_cptr<uint8_t>(mask_u8), as_cptr<A>(mask_w), n, st, ws, as_ptr<T>(grad_values),
        shift_mean, unbiased);
    RLK_CHECK_LAUNCH();
  });
}

void group_estimators_forward(Matrix rewards, std::uintptr_t perm, std::uintptr_t starts,
                              Matrix mask, std::uintptr_t weights, std::uintptr_t out,
                              std::uintptr_t workspace, int64_t b, int64_t k, int64_t t,
                              int64_t group_size, int64_t slots, int dtype, int method,
                              bool unbiased, bool norm_by_std, double eps, double whiten_eps,
                              std::uintptr_t stream) {
  RLK_CHECK_ARG(b >= 0, "group_estimators_forward: b must be >= 0, got " + std::to_string(b));
  RLK_CHECK_ARG(method >= kOpo && method <= kGdpo,
                "group_estimators_forward: method code must be 4 (opo), 5 (gpg), 6 (grpo_passk), "
                "7 (reinforce_plus_plus_baseline) or 8 (gdpo), got " + std::to_string(method));
  RLK_CHECK_ARG(k >= 1 && (k == 1 || method == kGdpo),
                "group_estimators_forward: k (reward components) must be 1, or >= 1 for gdpo, "
                "got " + std::to_string(k));
  RLK_CHECK_ARG(t >= 0, "group_estimators_forward: t must be >= 0, got " + std::to_string(t));
  RLK_CHECK_ARG((perm == 0) == (starts == 0),
                "group_estimators_forward: perm and starts go together (group_index path)");
  RLK_CHECK_ARG(slots >= 0 && slots <= 0x7fffffffLL,
                "group_estimators_forward: slots must be in [0, 2**31), got " +
                    std::to_string(slots));
  if (perm == 0) {
    RLK_CHECK_ARG(group_size >= 1 && b % group_size == 0 && slots * group_size == b,
                  "group_estimators_forward: contiguous groups need group_size >= 1 dividing b "
                  "and slots = b / group_size");
  }
  const bool whitened = method == kRppBaseline || method == kGdpo;
  dispatch_logits(dtype, "group_estimators_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (b == 0 || slots == 0) return;
    RLK_CHECK_ARG(rewards.ptr != 0 && out != 0, "group_estimators_forward: null device pointer");
    RLK_CHECK_ARG((method != kOpo && !whitened) || mask.ptr != 0,
                  "group_estimators_forward: opo, reinforce_plus_plus_baseline and gdpo read the "
                  "mask (uint8 [b, t])");
    RLK_CHECK_ARG(method != kGdpo || weights != 0,
                  "group_estimators_forward: gdpo needs the k component weights");
    RLK_CHECK_ARG((method != kGpg && !whitened) || workspace != 0,
                  "group_estimators_forward: gpg needs a workspace of 1 element, the whitened "
                  "methods one of 3 * b elements (accumulation type)");
    const cudaStream_t s = as_stream(stream);
    const T* x = as_cptr<T>(rewards.ptr);
    A* ws = as_ptr<A>(workspace);
    if (method == kGpg) {
      batch_alpha_kernel<T><<<1, kBatchThreads, 0, s>>>(x, rewards.stride0, b, ws);
      RLK_CHECK_LAUNCH();
    }
    group_estimators_kernel<T><<<static_cast<unsigned>(slots), kWarp, 0, s>>>(
        x, rewards.stride0, rewards.stride1, k, as_cptr<int64_t>(perm), as_cptr<int64_t>(starts),
        group_size, as_cptr<uint8_t>(mask.ptr), mask.stride0, mask.stride1, t,
        as_cptr<A>(weights), as_ptr<A>(out), whitened ? ws : nullptr, b, method, unbiased,
        norm_by_std, static_cast<A>(eps), method == kGpg ? ws : nullptr);
    RLK_CHECK_LAUNCH();
    if (whitened) {
      batch_whiten_kernel<A><<<batch_whiten_blocks(b), kBatchWhitenThreads, 0, s>>>(
          ws, b, as_ptr<A>(out), nullptr, 0, 0, 0, unbiased, static_cast<A>(whiten_eps));
      RLK_CHECK_LAUNCH();
    }
  });
}

void discounted_advantages_forward(Matrix rewards, Matrix mask, std::uintptr_t baseline,
                                   std::uintptr_t advantages, std::uintptr_t returns,
                                   std::uintptr_t workspace, int64_t b, int64_t t, int dtype,
                                   double gamma, bool whiten, double whiten_eps, bool unbiased,
                                   std::uintptr_t stream) {
  RLK_CHECK_ARG(b >= 0 && b <= 0x7fffffffLL,
                "discounted_advantages_forward: b must be in [0, 2**31), got " +
                    std::to_string(b));
  RLK_CHECK_ARG(t >= 0,
                "discounted_advantages_forward: t must be >= 0, got " + std::to_string(t));
  dispatch_logits(dtype, "discounted_advantages_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (b == 0 || t == 0) return;
    RLK_CHECK_ARG(rewards.ptr != 0 && mask.ptr != 0 && advantages != 0 && returns != 0 &&
                      (!whiten || workspace != 0),
                  "discounted_advantages_forward: null device pointer (whiten needs a "
                  "workspace of 3 * b elements)");
    const cudaStream_t s = as_stream(stream);
    const unsigned grid = static_cast<unsigned>((b + kScanWarps - 1) / kScanWarps);
    A* ws = whiten ? as_ptr<A>(workspace) : nullptr;
    reverse_scan_kernel<T, false><<<grid, kScanWarps * 32, 0, s>>>(
        as_cptr<T>(rewards.ptr), rewards.stride0, rewards.stride1, nullptr, 0, 0,
        as_cptr<uint8_t>(mask.ptr), mask.stride0, mask.stride1, as_ptr<A>(returns),
        as_ptr<A>(advantages), b, t, static_cast<A>(gamma), static_cast<A>(gamma),
        as_cptr<A>(baseline), ws);
    RLK_CHECK_LAUNCH();
    if (whiten) {
      batch_whiten_kernel<A><<<batch_whiten_blocks(b * t), kBatchWhitenThreads, 0, s>>>(
          ws, b, as_ptr<A>(advantages), as_cptr<uint8_t>(mask.ptr), mask.stride0, mask.stride1,
          t, unbiased, static_cast<A>(whiten_eps));
      RLK_CHECK_LAUNCH();
    }
  });
}

}  // namespace rlk
