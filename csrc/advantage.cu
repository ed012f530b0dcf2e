// Advantage family (ops that read rewards): group_advantages. Python launcher:
// rlkernels/cuda/advantage.py. Formulas: rlkernels/ops/advantage.py (group_advantages).
//
// One warp per group slot. Members are visited in their original order (the launcher gives
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

enum Method : int { kGrpo = 0, kDrGrpo = 1, kRloo = 2, kBatchStd = 3 };

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
  int64_t start, end;
  if (starts != nullptr) {
    start = starts[g];
    end = starts[g + 1];
  } else {
    start = g * group_size;
    end = start + group_size;
  }
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

}  // namespace

void group_advantages_forward(std::uintptr_t rewards, int64_t stride, std::uintptr_t perm,
                              std::uintptr_t starts, std::uintptr_t out,
                              std::uintptr_t workspace, int64_t b, int64_t group_size,
                              int64_t slots, int dtype, int method, bool unbiased, double eps,
                              std::uintptr_t stream) {
  RLK_CHECK_ARG(b >= 0, "group_advantages_forward: b must be >= 0, got " + std::to_string(b));
  RLK_CHECK_ARG(method >= 0 && method <= 3,
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
    RLK_CHECK_ARG(rewards != 0 && out != 0, "group_advantages_forward: null device pointer");
    RLK_CHECK_ARG(method != kBatchStd || workspace != 0,
                  "group_advantages_forward: batch_std needs a workspace of one element");
    const cudaStream_t s = as_stream(stream);
    const T* x = as_cptr<T>(rewards);
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

}  // namespace rlk
