// Shared helpers for the CUDA sources of rlkernels._C (include from .cu files only).
//
// rlkernels._C links only the CUDA runtime (no torch headers): kernels receive raw device
// pointers, element counts, a dtype code and the caller's cudaStream_t as integers. The
// Python launchers in rlkernels/cuda/ own allocation, validation and autograd.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace rlk {

// ---------------------------------------------------------------------------------------------
// Errors. pybind11 turns std::runtime_error into RuntimeError and std::invalid_argument into
// ValueError, so a failing CUDA call or a bad argument never crashes the Python process.
// ---------------------------------------------------------------------------------------------

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file,
                                          int line) {
  throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err) + " (" + expr + " at " + file + ":" +
                           std::to_string(line) + ")");
}

// Check the cudaError_t returned by a CUDA runtime call; throw with file/line on failure.
#define RLK_CUDA_CHECK(expr)                                               \
  do {                                                                     \
    const cudaError_t rlk_err_ = (expr);                                   \
    if (rlk_err_ != cudaSuccess) {                                         \
      ::rlk::throw_cuda_error(rlk_err_, #expr, __FILE__, __LINE__);        \
    }                                                                      \
  } while (0)

// Check a kernel launch (bad configuration, no kernel image for this GPU, ...).
#define RLK_CHECK_LAUNCH() RLK_CUDA_CHECK(cudaGetLastError())

// Argument check on the host, before any launch: throws ValueError in Python.
#define RLK_CHECK_ARG(cond, msg)                                                 \
  do {                                                                           \
    if (!(cond)) throw std::invalid_argument(std::string("rlkernels._C.") + (msg)); \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Dtype codes, shared with Python (rlkernels/cuda/ maps torch dtypes to these integers and
// reads them back from the module attributes DTYPE_*).
// ---------------------------------------------------------------------------------------------

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(int code) {
  switch (code) {
    case 0: return "float32";
    case 1: return "float16";
    case 2: return "bfloat16";
    case 3: return "float64";
    default: return "unknown";
  }
}

// Accumulation type: fp32 for fp32/fp16/bf16 storage, fp64 for fp64 (SPEC "math in fp32").
template <class T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <class T> using acc_t = typename AccType<T>::type;

// Storage <-> accumulation conversions (round-to-nearest-even on the way back).
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T from_acc(acc_t<T> x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---------------------------------------------------------------------------------------------
// Dispatch: call f(TypeTag<scalar_t>{}) for the storage type named by a dtype code. Use as
//   dispatch_float_double(dtype, "op", [&](auto tag) {
//     using scalar_t = typename decltype(tag)::type;
//     kernel<scalar_t><<<grid, block, 0, stream>>>(...);
//   });
// ---------------------------------------------------------------------------------------------

template <class T> struct TypeTag { using type = T; };

template <class F>
void dispatch_float_double(int dtype, const char* op, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: f(TypeTag<float>{}); return;
    case DType::kFloat64: f(TypeTag<double>{}); return;
    default:
      throw std::invalid_argument(std::string("rlkernels._C.") + op +
                                  ": dtype must be float32 (0) or float64 (3), got " +
                                  dtype_name(dtype) + " (" + std::to_string(dtype) + ")");
  }
}

template <class F>
void dispatch_floating(int dtype, const char* op, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: f(TypeTag<float>{}); return;
    case DType::kFloat16: f(TypeTag<__half>{}); return;
    case DType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::kFloat64: f(TypeTag<double>{}); return;
    default:
      throw std::invalid_argument(std::string("rlkernels._C.") + op + ": unknown dtype code " +
                                  std::to_string(dtype));
  }
}

// ---------------------------------------------------------------------------------------------
// Reductions and launch helpers.
// ---------------------------------------------------------------------------------------------

constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the 32 lanes of a warp (butterfly: every lane gets the total; the order of the
// additions is fixed, so the result is deterministic).
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

inline cudaStream_t as_stream(std::uintptr_t stream) {
  return reinterpret_cast<cudaStream_t>(stream);
}

template <class T>
inline const T* as_cptr(std::uintptr_t p) { return reinterpret_cast<const T*>(p); }
template <class T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

// Grid for a grid-stride loop over n elements (n > 0): enough blocks to fill the current
// device (a few waves), never more than needed.
inline unsigned grid_for_elementwise(int64_t n, int block) {
  int device = 0, sms = 0;
  RLK_CUDA_CHECK(cudaGetDevice(&device));
  RLK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (n + block - 1) / block;
  const int64_t cap = static_cast<int64_t>(sms) * 32;
  return static_cast<unsigned>(wanted < cap ? wanted : cap);
}

}  // namespace rlk
