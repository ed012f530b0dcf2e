// Policy-loss family (ops on per-token log-probs): kernels and launchers.
// Python launchers: rlkernels/cuda/policy.py. Formulas: SPEC.md section 3.1 (kl_penalty).
#include "common.cuh"
#include "rlkernels.h"

namespace rlk {
namespace {

constexpr int kBlock = 256;

// kl value of d = logp - ref_logp for one estimator, in the accumulation type A.
template <int kEst, class A>
__device__ __forceinline__ A kl_value(A d) {
  if constexpr (kEst == kKlK1) {
    return d;
  } else if constexpr (kEst == kKlAbs) {
    return d < A(0) ? -d : d;  // keeps NaN
  } else if constexpr (kEst == kKlK2) {
    return A(0.5) * d * d;
  } else {
    // k3 = exp(-d) + d - 1 = expm1(-d) + d. expm1 avoids the cancellation of exp(-d) - 1
    // near d = 0 (where k3 ~ d^2/2 is tiny); same values at +-inf and NaN.
    return expm1(-d) + d;
  }
}

// Elementwise, grid-stride, 64-bit indices: out[i] = clamp(kl(logp[i] - ref[i]), lo, hi).
// The clamp keeps NaN and, like torch.clamp, yields hi when lo > hi.
template <class T, int kEst, bool kClamp>
__global__ void __launch_bounds__(kBlock)
    kl_penalty_forward_kernel(const T* __restrict__ logp, const T* __restrict__ ref,
                              T* __restrict__ out, int64_t n, acc_t<T> lo, acc_t<T> hi) {
  using A = acc_t<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const A d = to_acc(logp[i]) - to_acc(ref[i]);
    A v = kl_value<kEst>(d);
    if constexpr (kClamp) {
      v = v < lo ? lo : v;
      v = v > hi ? hi : v;
    }
    out[i] = from_acc<T>(v);
  }
}

template <class T, int kEst>
void launch_kl(const T* logp, const T* ref, T* out, int64_t n, bool clamp, double lo,
               double hi, cudaStream_t stream) {
  const unsigned grid = grid_for_elementwise(n, kBlock);
  using A = acc_t<T>;
  if (clamp) {
    kl_penalty_forward_kernel<T, kEst, true>
        <<<grid, kBlock, 0, stream>>>(logp, ref, out, n, static_cast<A>(lo), static_cast<A>(hi));
  } else {
    kl_penalty_forward_kernel<T, kEst, false>
        <<<grid, kBlock, 0, stream>>>(logp, ref, out, n, A(0), A(0));
  }
  RLK_CHECK_LAUNCH();
}

}  // namespace

void kl_penalty_forward(std::uintptr_t logp, std::uintptr_t ref_logp, std::uintptr_t out,
                        int64_t n, int dtype, int estimator, bool clamp, double clamp_lo,
                        double clamp_hi, std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0, "kl_penalty_forward: n must be >= 0, got " + std::to_string(n));
  RLK_CHECK_ARG(estimator >= kKlK1 && estimator <= kKlK3,
                "kl_penalty_forward: estimator code must be 0 (k1), 1 (abs), 2 (k2) or 3 (k3), "
                "got " + std::to_string(estimator));
  dispatch_float_double(dtype, "kl_penalty_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (n == 0) return;  // nothing to do; an empty grid is not a valid launch
    RLK_CHECK_ARG(logp != 0 && ref_logp != 0 && out != 0,
                  "kl_penalty_forward: null device pointer");
    const T* lp = as_cptr<T>(logp);
    const T* rp = as_cptr<T>(ref_logp);
    T* op = as_ptr<T>(out);
    const cudaStream_t s = as_stream(stream);
    switch (estimator) {
      case kKlK1: launch_kl<T, kKlK1>(lp, rp, op, n, clamp, clamp_lo, clamp_hi, s); break;
      case kKlAbs: launch_kl<T, kKlAbs>(lp, rp, op, n, clamp, clamp_lo, clamp_hi, s); break;
      case kKlK2: launch_kl<T, kKlK2>(lp, rp, op, n, clamp, clamp_lo, clamp_hi, s); break;
      default: launch_kl<T, kKlK3>(lp, rp, op, n, clamp, clamp_lo, clamp_hi, s); break;
    }
  });
}

}  // namespace rlk
