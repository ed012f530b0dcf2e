// Per-token policy-loss math shared by policy.cu (policy_loss) and grpo.cu (grpo_loss's
// one-read gradient-in-forward kernel): NaN-propagating min / max / clamp and the KL
// estimators' value and gradient. Formulas: rlkernels/reference/policy.py.
#pragma once

#include "common.cuh"
#include "rlkernels.h"

namespace rlk {

// NaN-propagating max / min / clamp (torch.maximum / torch.minimum / torch.clamp).
template <class A>
__device__ __forceinline__ A max_nan(A a, A b) { return (a > b || a != a) ? a : b; }
template <class A>
__device__ __forceinline__ A min_nan(A a, A b) { return (a < b || a != a) ? a : b; }
template <class A> __device__ __forceinline__ A clamp_nan(A x, A lo, A hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

template <class A>
__device__ __forceinline__ A kl_value_rt(A d, int est) {
  switch (est) {
    case kKlK1: return d;
    case kKlAbs: return d < A(0) ? -d : d;
    case kKlK2: return A(0.5) * d * d;
    default: return d_expm1(-d) + d;  // k3, k3+, k3_is, k3_is_sg (the value of k3)
  }
}

// d penalty / d logp; kKlK3Plus is straight-through: the gradient of k2.
template <class A>
__device__ __forceinline__ A kl_grad_rt(A d, int est) {
  switch (est) {
    case kKlK1: return A(1);
    case kKlAbs: return d > A(0) ? A(1) : (d < A(0) ? A(-1) : (d == d ? A(0) : d));
    case kKlK3:
    case kKlK3Is:
    case kKlK3IsSg: return -d_expm1(-d);  // k3_is / k3_is_sg: times r (the caller)
    default: return d;  // kKlK2, kKlK3Plus
  }
}

}  // namespace rlk
