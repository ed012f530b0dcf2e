// Rollout-correction family: rollout_correction (importance weights, keep mask and mismatch
// metrics from the trainer's and the rollout engine's log-probs). Python launcher:
// rlkernels/cuda/rollout.py. Formulas: rlkernels/reference/rollout.py.
#include <string>
#include <vector>

#include "common.cuh"
#include "rlkernels.h"

namespace rlk {
namespace {

// Two launches, deterministic (fixed reduction trees, no atomics), batch invariant (a row's
// weights, keep flags and partial sums do not depend on the other rows):
//   rollout_rows_kernel:     one block per sequence; pass 1 reduces the row statistics, pass
//                            2 writes weights / keep and reduces the row's metric partials;
//   rollout_finalize_kernel: one block, fixed-order sums over the rows -> the metrics.
// Inputs arrive in the compute dtype A (fp32, fp64 when a log-prob input is fp64; the
// launcher converts), with (row, column) strides; advantages [B] have a column stride of 0.

constexpr int kRowThreads = 256;
constexpr int kFinalThreads = 1024;
constexpr int kRejects = 12;  // RolloutReject codes

// Per-row partials (the order of rlkernels/triton/rollout.py's partials).
enum RolloutPartial : int {
  kRpM = 0, kRpK1, kRpK3, kRpAbs, kRpAbsMax, kRpChi, kRpSeq, kRpChiSeq, kRpLppl, kRpW,
  kRpWMax, kRpWNegMax, kRpW2, kRpHigh, kRpLow, kRpRej, kRpRejSeq, kRpCount
};
constexpr int kMetrics = 15;  // reference/rollout.py METRICS

template <class A>
struct RolloutArgs {
  const A* old;
  const A* roll;
  const A* mask;
  const A* adv;
  int64_t old_s0, old_s1, roll_s0, roll_s1, mask_s0, mask_s1, adv_s0, adv_s1;
  int64_t B, T;
  int level, mode, reject;
  A lo, hi, clamp;
  A rlo[kRejects], rhi[kRejects];
};

// NaN-propagating max (torch.amax).
template <class A> __device__ __forceinline__ A max_nan(A a, A b) {
  return (a > b || a != a) ? a : b;
}

struct MaxNanOp {
  template <class T> __device__ __forceinline__ T operator()(T a, T b) const {
    return max_nan(a, b);
  }
};

template <class A> __device__ __forceinline__ A clampv(A x, A c) {
  return x < -c ? -c : (x > c ? c : x);
}

template <class A> __device__ __forceinline__ bool has(const RolloutArgs<A>& a, int code) {
  return (a.reject >> code) & 1;
}

template <class A> __device__ __forceinline__ bool within(A x, const RolloutArgs<A>& a, int c) {
  return x >= a.rlo[c] && x <= a.rhi[c];
}

template <class A>
__global__ void __launch_bounds__(kRowThreads)
    rollout_rows_kernel(const RolloutArgs<A> a, A* __restrict__ weights,
                        uint8_t* __restrict__ keep, A* __restrict__ partials) {
  __shared__ A scratch[32];
  const int64_t b = blockIdx.x;
  const A* old = a.old + b * a.old_s0;
  const A* roll = a.roll + b * a.roll_s0;
  const A* mk = a.mask + b * a.mask_s0;
  const A zero = A(0), ninf = neg_inf<A>();

  // ---- pass 1: the row statistics
  A n = zero, cnt = zero, s_lr = zero, s_lrc = zero, s_k2 = zero, s_k3 = zero;
  A x_k2 = ninf, x_k3 = ninf;
  for (int64_t t = threadIdx.x; t < a.T; t += blockDim.x) {
    const A m = mk[t * a.mask_s1];
    if (m == zero) continue;
    const A lr = old[t * a.old_s1] - roll[t * a.roll_s1];
    const A lrc = clampv(lr, a.clamp);
    const A k2 = A(0.5) * lrc * lrc;
    const A k3 = d_exp(lrc) - A(1) - lrc;
    n += A(1);
    cnt += m;
    s_lr += m * lr;
    s_lrc += m * lrc;
    s_k2 += m * k2;
    s_k3 += m * k3;
    x_k2 = max_nan(x_k2, k2);
    x_k3 = max_nan(x_k3, k3);
  }
  n = block_sum(n, scratch);
  cnt = block_sum(cnt, scratch);
  s_lr = block_sum(s_lr, scratch);
  s_lrc = block_sum(s_lrc, scratch);
  s_k2 = block_sum(s_k2, scratch);
  s_k3 = block_sum(s_k3, scratch);
  x_k2 = block_reduce(x_k2, MaxNanOp{}, ninf, scratch);
  x_k3 = block_reduce(x_k3, MaxNanOp{}, ninf, scratch);
  const bool nonempty = n > zero;
  const A cnt_safe = nonempty ? (cnt > A(1e-30) ? cnt : A(1e-30)) : A(1);
  const A mean_lr = nonempty ? s_lr / cnt_safe : zero;
  const A mean_k1 = nonempty ? -s_lrc / cnt_safe : zero;
  const A row_logw = a.level == kRolloutSequence ? clampv(s_lr, a.clamp)
                                                 : clampv(mean_lr, a.clamp);
  bool row_pass = true;
  if (has(a, kRejectSeqSumK1)) row_pass &= within(-s_lrc, a, kRejectSeqSumK1);
  if (has(a, kRejectSeqSumK2)) row_pass &= within(s_k2, a, kRejectSeqSumK2);
  if (has(a, kRejectSeqSumK3)) row_pass &= within(s_k3, a, kRejectSeqSumK3);
  if (has(a, kRejectSeqMeanK1)) row_pass &= within(mean_k1, a, kRejectSeqMeanK1);
  if (has(a, kRejectSeqMeanK2))
    row_pass &= within(nonempty ? s_k2 / cnt_safe : zero, a, kRejectSeqMeanK2);
  if (has(a, kRejectSeqMeanK3))
    row_pass &= within(nonempty ? s_k3 / cnt_safe : zero, a, kRejectSeqMeanK3);
  if (has(a, kRejectSeqMaxK2)) row_pass &= within(nonempty ? x_k2 : zero, a, kRejectSeqMaxK2);
  if (has(a, kRejectSeqMaxK3)) row_pass &= within(nonempty ? x_k3 : zero, a, kRejectSeqMaxK3);
  const bool opsm_low_kl = mean_k1 <= a.rhi[kRejectOpsm];

  // ---- pass 2: weights, keep flags, the row's metric partials
  A p[kRpCount];
#pragma unroll
  for (int k = 0; k < kRpCount; ++k) p[k] = zero;
  p[kRpAbsMax] = p[kRpWMax] = p[kRpWNegMax] = ninf;
  A rej_any = zero;
  A* wrow = weights + b * a.T;
  uint8_t* krow = keep + b * a.T;
  for (int64_t t = threadIdx.x; t < a.T; t += blockDim.x) {
    const A m = mk[t * a.mask_s1];
    if (m == zero) {
      wrow[t] = zero;
      krow[t] = 0;
      continue;
    }
    const A lr = old[t * a.old_s1] - roll[t * a.roll_s1];
    const A lrc = clampv(lr, a.clamp);
    const A raw = d_exp(a.level == kRolloutToken ? lrc : row_logw);
    const bool above = raw > a.hi, below = raw < a.lo;
    A w;
    if (a.mode == kRolloutTruncate) {
      w = above ? a.hi : (below ? a.lo : raw);
    } else {
      w = (raw >= a.lo && raw <= a.hi) ? raw : zero;
    }
    bool passed = row_pass;
    if (has(a, kRejectTokenK1)) passed &= within(-lrc, a, kRejectTokenK1);
    if (has(a, kRejectTokenK2)) passed &= within(A(0.5) * lrc * lrc, a, kRejectTokenK2);
    if (has(a, kRejectTokenK3)) passed &= within(d_exp(lrc) - A(1) - lrc, a, kRejectTokenK3);
    if (has(a, kRejectOpsm)) {
      const A adv = a.adv[b * a.adv_s0 + t * a.adv_s1];
      passed &= (adv >= zero) || opsm_low_kl;
    }
    wrow[t] = w;
    krow[t] = passed ? 1 : 0;
    const A d = lr < zero ? -lr : lr;
    p[kRpM] += m;
    p[kRpK1] += -m * lr;
    p[kRpK3] += m * (d_exp(lr) - lr - A(1));
    p[kRpAbs] += m * d;
    p[kRpAbsMax] = max_nan(p[kRpAbsMax], d);
    p[kRpChi] += m * (d_exp(A(2) * lrc) - A(1));
    p[kRpW] += m * w;
    p[kRpWMax] = max_nan(p[kRpWMax], w);
    p[kRpWNegMax] = max_nan(p[kRpWNegMax], -w);
    p[kRpW2] += m * w * w;
    if (above) p[kRpHigh] += m;
    if (below) p[kRpLow] += m;
    if (!passed) {
      p[kRpRej] += m;
      rej_any = A(1);
    }
  }
#pragma unroll
  for (int k = 0; k < kRpCount; ++k) {
    if (k == kRpSeq || k == kRpChiSeq || k == kRpLppl || k == kRpRejSeq) continue;
    const bool is_max = k == kRpAbsMax || k == kRpWMax || k == kRpWNegMax;
    p[k] = is_max ? block_reduce(p[k], MaxNanOp{}, ninf, scratch) : block_sum(p[k], scratch);
  }
  rej_any = block_reduce(rej_any, MaxNanOp{}, zero, scratch);
  if (threadIdx.x == 0) {
    A* out = partials + b * kRpCount;
#pragma unroll
    for (int k = 0; k < kRpCount; ++k) out[k] = p[k];
    out[kRpSeq] = nonempty ? A(1) : zero;
    out[kRpChiSeq] = nonempty ? d_exp(A(2) * clampv(s_lr, a.clamp)) - A(1) : zero;
    out[kRpLppl] = nonempty ? -mean_lr : zero;
    out[kRpRejSeq] = (nonempty && rej_any > zero) ? A(1) : zero;
  }
}

template <class A>
__global__ void __launch_bounds__(kFinalThreads)
    rollout_finalize_kernel(const A* __restrict__ partials, int64_t B,
                            float* __restrict__ metrics) {
  __shared__ A scratch[32];
  const A zero = A(0), ninf = neg_inf<A>();
  A v[kRpCount];
#pragma unroll
  for (int k = 0; k < kRpCount; ++k) v[k] = zero;
  v[kRpAbsMax] = v[kRpWMax] = v[kRpWNegMax] = ninf;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const A* p = partials + b * kRpCount;
#pragma unroll
    for (int k = 0; k < kRpCount; ++k) {
      const bool is_max = k == kRpAbsMax || k == kRpWMax || k == kRpWNegMax;
      v[k] = is_max ? max_nan(v[k], p[k]) : v[k] + p[k];
    }
  }
#pragma unroll
  for (int k = 0; k < kRpCount; ++k) {
    const bool is_max = k == kRpAbsMax || k == kRpWMax || k == kRpWNegMax;
    v[k] = is_max ? block_reduce(v[k], MaxNanOp{}, ninf, scratch) : block_sum(v[k], scratch);
  }
  if (threadIdx.x != 0) return;
  const A s0 = v[kRpM];
  const bool tok = s0 > zero;
  const A den = tok ? (s0 > A(1e-30) ? s0 : A(1e-30)) : A(1);
  const A nseq = v[kRpSeq];
  const A sden = nseq > zero ? nseq : A(1);
  const A ess_den = s0 * v[kRpW2];
  const A out[kMetrics] = {
      tok ? v[kRpK1] / den : zero,
      tok ? v[kRpK3] / den : zero,
      tok ? v[kRpAbs] / den : zero,
      tok ? v[kRpAbsMax] : zero,
      tok ? v[kRpChi] / den : zero,
      v[kRpChiSeq] / sden,
      v[kRpLppl] / sden,
      tok ? v[kRpW] / den : zero,
      tok ? v[kRpWMax] : zero,
      tok ? -v[kRpWNegMax] : zero,
      ess_den > zero ? v[kRpW] * v[kRpW] / ess_den : zero,
      tok ? v[kRpHigh] / den : zero,
      tok ? v[kRpLow] / den : zero,
      tok ? v[kRpRej] / den : zero,
      v[kRpRejSeq] / sden,
  };
#pragma unroll
  for (int k = 0; k < kMetrics; ++k) metrics[k] = static_cast<float>(out[k]);
}

}  // namespace

void rollout_correction_forward(Matrix old_logp, Matrix rollout_logp, Matrix mask,
                                Matrix advantages, std::uintptr_t weights, std::uintptr_t keep,
                                std::uintptr_t partials, std::uintptr_t metrics, int64_t b,
                                int64_t t, int dtype, int level, int mode, int reject,
                                double lo, double hi, double log_ratio_clamp,
                                const std::vector<double>& reject_bounds,
                                std::uintptr_t stream) {
  RLK_CHECK_ARG(b >= 0 && b <= 0x7fffffffLL,
                "rollout_correction_forward: b must be in [0, 2**31), got " + std::to_string(b));
  RLK_CHECK_ARG(t >= 0, "rollout_correction_forward: t must be >= 0, got " + std::to_string(t));
  RLK_CHECK_ARG(level >= kRolloutToken && level <= kRolloutGeometric,
                "rollout_correction_forward: level must be a RolloutLevel code, got " +
                    std::to_string(level));
  RLK_CHECK_ARG(mode == kRolloutTruncate || mode == kRolloutMask,
                "rollout_correction_forward: mode must be a RolloutMode code, got " +
                    std::to_string(mode));
  RLK_CHECK_ARG(reject >= 0 && reject < (1 << kRejects),
                "rollout_correction_forward: reject must be a bit mask of RolloutReject "
                "codes, got " + std::to_string(reject));
  RLK_CHECK_ARG(reject_bounds.size() == 2 * kRejects,
                "rollout_correction_forward: reject_bounds must hold 24 values (lo, hi per "
                "RolloutReject code), got " + std::to_string(reject_bounds.size()));
  dispatch_float_double(dtype, "rollout_correction_forward", [&](auto tag) {
    using A = typename decltype(tag)::type;
    RLK_CHECK_ARG(metrics != 0, "rollout_correction_forward: null device pointer");
    const bool any = b > 0 && t > 0;
    RLK_CHECK_ARG(!any || (old_logp.ptr != 0 && rollout_logp.ptr != 0 && mask.ptr != 0 &&
                           weights != 0 && keep != 0 && partials != 0),
                  "rollout_correction_forward: null device pointer");
    RLK_CHECK_ARG(!any || !((reject >> kRejectOpsm) & 1) || advantages.ptr != 0,
                  "rollout_correction_forward: reject includes opsm but advantages is absent");
    RolloutArgs<A> a{};
    a.old = as_cptr<A>(old_logp.ptr);
    a.roll = as_cptr<A>(rollout_logp.ptr);
    a.mask = as_cptr<A>(mask.ptr);
    a.adv = as_cptr<A>(advantages.ptr);
    a.old_s0 = old_logp.stride0, a.old_s1 = old_logp.stride1;
    a.roll_s0 = rollout_logp.stride0, a.roll_s1 = rollout_logp.stride1;
    a.mask_s0 = mask.stride0, a.mask_s1 = mask.stride1;
    a.adv_s0 = advantages.stride0, a.adv_s1 = advantages.stride1;
    a.B = b, a.T = t, a.level = level, a.mode = mode, a.reject = reject;
    a.lo = static_cast<A>(lo), a.hi = static_cast<A>(hi);
    a.clamp = static_cast<A>(log_ratio_clamp);
    for (int k = 0; k < kRejects; ++k) {
      a.rlo[k] = static_cast<A>(reject_bounds[2 * k]);
      a.rhi[k] = static_cast<A>(reject_bounds[2 * k + 1]);
    }
    const cudaStream_t s = as_stream(stream);
    if (any) {
      rollout_rows_kernel<A><<<static_cast<unsigned>(b), kRowThreads, 0, s>>>(
          a, as_ptr<A>(weights), as_ptr<uint8_t>(keep), as_ptr<A>(partials));
      RLK_CHECK_LAUNCH();
    }
    // Also for an empty input: every metric 0, written on the device.
    rollout_finalize_kernel<A><<<1, kFinalThreads, 0, s>>>(
        as_cptr<A>(partials), any ? b : 0, as_ptr<float>(metrics));
    RLK_CHECK_LAUNCH();
  });
}

}  // namespace rlk
