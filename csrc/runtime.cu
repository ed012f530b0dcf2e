// Build and runtime information for rlkernels._C (no kernels here).
#include "common.cuh"
#include "rlkernels.h"

#ifndef RLKERNELS_VERSION
#define RLKERNELS_VERSION "unknown"
#endif
#ifndef RLKERNELS_CUDA_ARCHS
#define RLKERNELS_CUDA_ARCHS "unknown"
#endif
#ifndef RLKERNELS_NVCC_VERSION
#define RLKERNELS_NVCC_VERSION "unknown"
#endif

namespace rlk {

std::string version() { return RLKERNELS_VERSION; }

int cuda_runtime_version() {
  int v = 0;
  if (cudaRuntimeGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    v = CUDART_VERSION;
  }
  return v;
}

int cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) {
    (void)cudaGetLastError();
    v = 0;
  }
  return v;
}

int device_count() {
  // Without a driver or GPU, cudaGetDeviceCount fails (cudaErrorNoDevice,
  // cudaErrorInsufficientDriver, ...): that means "no usable device", not an error.
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // clear it so that it does not surface at the next check
    return 0;
  }
  return count;
}

std::string cuda_archs() { return RLKERNELS_CUDA_ARCHS; }

std::string nvcc_version() { return RLKERNELS_NVCC_VERSION; }

}  // namespace rlk
