// Host-side API of rlkernels._C: plain C++ declarations (no CUDA headers), so bindings.cpp
// compiles with the host compiler alone. Pointers and streams travel as std::uintptr_t.
#pragma once

#include <cstdint>
#include <string>

namespace rlk {

// ---- runtime.cu: build and runtime information -------------------------------------------
std::string version();        // package version the extension was built from ("0.1.0")
int cuda_runtime_version();   // CUDA runtime linked in (static), e.g. 13000 for 13.0
int cuda_driver_version();    // CUDA version the installed driver supports; 0 without a driver
int device_count();           // CUDA devices usable by this runtime; 0 (no exception) if none
std::string cuda_archs();     // CMAKE_CUDA_ARCHITECTURES of the build, e.g. "80,90a"
std::string nvcc_version();   // version of the nvcc that compiled the kernels

// ---- policy.cu: ops on per-token log-probs -----------------------------------------------
// Estimator codes of kl_penalty_forward.
enum KlEstimator : int { kKlK1 = 0, kKlAbs = 1, kKlK2 = 2, kKlK3 = 3 };

// out[i] = kl(logp[i] - ref_logp[i]) for i < n, optionally clamped to [clamp_lo, clamp_hi].
// logp, ref_logp, out: contiguous device buffers of n elements of `dtype` (0 = fp32,
// 3 = fp64). Runs asynchronously on `stream` on the current device.
void kl_penalty_forward(std::uintptr_t logp, std::uintptr_t ref_logp, std::uintptr_t out,
                        int64_t n, int dtype, int estimator, bool clamp, double clamp_lo,
                        double clamp_hi, std::uintptr_t stream);

}  // namespace rlk
