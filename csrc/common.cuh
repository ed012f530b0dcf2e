// Shared helpers for the CUDA sources of rlkernels._C (include from .cu files only).
//
// rlkernels._C links only the CUDA runtime (no torch headers): kernels receive raw device
// pointers, element counts, a dtype code and the caller's cudaStream_t as integers. The
// Python launchers in rlkernels/cuda/ own allocation, validation and autograd.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "rlkernels.h"

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
// Dtype codes: rlk::DType of rlkernels.h (shared with Python through rlkernels/_codes.py).
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Dispatch over every storage dtype of logits (fp32, fp16, bf16, fp64).
// ---------------------------------------------------------------------------------------------

template <class F>
void dispatch_logits(int dtype, const char* op, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: f(TypeTag<float>{}); return;
    case DType::kFloat16: f(TypeTag<__half>{}); return;
    case DType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    case DType::kFloat64: f(TypeTag<double>{}); return;
    default:
      throw std::invalid_argument(std::string("rlkernels._C.") + op +
                                  ": dtype code must be 0 (float32), 1 (float16), 2 (bfloat16) "
                                  "or 3 (float64), got " + std::to_string(dtype));
  }
}

// ---------------------------------------------------------------------------------------------
// Math in the accumulation type. Overloads instead of the float/double C names so that one
// template body serves fp32 and fp64. No fast-math anywhere: these are the IEEE-accurate
// (<= 2 ulp) CUDA math functions; log1p/expm1 keep 1 - p_max exact on peaked rows.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float d_exp(float x) { return expf(x); }
__device__ __forceinline__ double d_exp(double x) { return exp(x); }
__device__ __forceinline__ float d_log(float x) { return logf(x); }
__device__ __forceinline__ double d_log(double x) { return log(x); }
__device__ __forceinline__ float d_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double d_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float d_expm1(float x) { return expm1f(x); }
__device__ __forceinline__ double d_expm1(double x) { return expm1(x); }
__device__ __forceinline__ float d_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double d_sqrt(double x) { return sqrt(x); }

template <class A> __device__ __forceinline__ A neg_inf() { return -static_cast<A>(INFINITY); }
template <class A> __device__ __forceinline__ A quiet_nan() { return static_cast<A>(NAN); }

// p * x with the convention 0 * anything = 0 (-inf columns contribute nothing to sums such as
// sum p (z - m)); a NaN p stays NaN.
template <class A> __device__ __forceinline__ A xmul0(A p, A x) { return p == A(0) ? A(0) : p * x; }

// ---------------------------------------------------------------------------------------------
// Deterministic block reductions. Every call site uses the same fixed tree (a down-shuffle in
// each warp, then warp 0 over the warps' partials), so a result never depends on timing.
// `scratch` is shared memory for at least 32 values; every thread of the block must call, and
// every thread gets the result. blockDim.x must be a multiple of 32 (all launchers ensure it).
// ---------------------------------------------------------------------------------------------

template <class T, class Op>
__device__ __forceinline__ T warp_reduce_down(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(kFullMask, v, offset));
  return v;  // valid in lane 0
}

template <class T, class Op>
__device__ T block_reduce(T v, Op op, T identity, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_reduce_down(v, op);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < warps ? scratch[lane] : identity;
    w = warp_reduce_down(w, op);
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  return scratch[0];
}

struct SumOp {
  template <class T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  return block_reduce(v, SumOp{}, T(0), scratch);
}

// ---------------------------------------------------------------------------------------------
// Online softmax state of a set of columns (DESIGN section 4, SPEC "saved row statistics"):
//   m    = max z (from -inf),
//   rest = sum exp(z - m) over every column of the set but ONE arg-max, so that
//          log s = log1p(rest) and 1 - p_max = rest / (1 + rest) stay exact on peaked rows,
//   s1   = sum exp(z - m) (z - m) over every column (for the entropy; 0 * -inf taken as 0).
// Nothing is ever subtracted. NaN logits make rest (hence every output of the row) NaN.
// ---------------------------------------------------------------------------------------------

template <class A>
struct SoftmaxState {
  A m, rest, s1;
};

template <class A>
__device__ __forceinline__ SoftmaxState<A> softmax_empty() {
  return {neg_inf<A>(), A(0), A(0)};
}

// Fold one column z into the state (in the order the caller chooses; fixed per column layout).
template <bool kWithS1, class A>
__device__ __forceinline__ void softmax_add(SoftmaxState<A>& st, A z) {
  if (z > st.m) {
    // z is the new excluded arg-max; the old one becomes an ordinary column: everything seen
    // so far (1 + rest) is rescaled by exp(m - z). While m = -inf nothing finite was seen.
    const bool empty = st.m == neg_inf<A>();
    const A sc = empty ? A(0) : d_exp(st.m - z);
    if (kWithS1) st.s1 = empty ? A(0) : sc * (st.s1 + (st.m - z) * (A(1) + st.rest));
    st.rest = empty ? A(0) : (A(1) + st.rest) * sc;
    st.m = z;
  } else if (z <= st.m) {
    const A m_ref = st.m == neg_inf<A>() ? A(0) : st.m;  // all -inf so far: exp(-inf) = 0
    const A e = d_exp(z - m_ref);
    st.rest += e;
    if (kWithS1) st.s1 += xmul0(e, z - m_ref);
  } else {  // z is NaN
    st.rest = quiet_nan<A>();
    if (kWithS1) st.s1 = quiet_nan<A>();
  }
}

// Merge b into a (a keeps its excluded arg-max on ties). Not symmetric in rounding, so callers
// merge in a fixed order.
template <bool kWithS1, class A>
__device__ __forceinline__ SoftmaxState<A> softmax_merge(const SoftmaxState<A>& a,
                                                         const SoftmaxState<A>& b) {
  const bool b_wins = b.m > a.m;
  const SoftmaxState<A>& w = b_wins ? b : a;  // keeps its excluded column
  const SoftmaxState<A>& l = b_wins ? a : b;  // its excluded column becomes ordinary
  SoftmaxState<A> out;
  out.m = w.m;
  const bool l_empty = l.m == neg_inf<A>();
  // exp(l.m - w.m): 0 when l saw nothing finite; NaN when either max is NaN (propagates)
  const A sc = l_empty ? A(0) : d_exp(l.m - w.m);
  out.rest = w.rest + sc * (A(1) + l.rest);
  if (l.rest != l.rest) out.rest = l.rest;  // NaN from l's columns
  if (kWithS1) {
    const A l_s1 = l_empty ? A(0) : sc * (l.s1 + (l.m - w.m) * (A(1) + l.rest));
    out.s1 = w.s1 + l_s1;
    if (l.s1 != l.s1) out.s1 = l.s1;
  } else {
    out.s1 = A(0);
  }
  return out;
}

template <bool kWithS1, class A>
__device__ __forceinline__ SoftmaxState<A> softmax_shfl_down(const SoftmaxState<A>& s,
                                                             int offset) {
  SoftmaxState<A> o;
  o.m = __shfl_down_sync(kFullMask, s.m, offset);
  o.rest = __shfl_down_sync(kFullMask, s.rest, offset);
  o.s1 = kWithS1 ? __shfl_down_sync(kFullMask, s.s1, offset) : A(0);
  return o;
}

// Block-wide merge of the threads' states in a fixed tree; every thread gets the result.
// scratch: shared memory for 32 states.
template <bool kWithS1, class A>
__device__ SoftmaxState<A> softmax_block_reduce(SoftmaxState<A> s, SoftmaxState<A>* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    s = softmax_merge<kWithS1>(s, softmax_shfl_down<kWithS1>(s, offset));
  __syncthreads();
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  if (warp == 0) {
    SoftmaxState<A> w = lane < warps ? scratch[lane] : softmax_empty<A>();
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      w = softmax_merge<kWithS1>(w, softmax_shfl_down<kWithS1>(w, offset));
    if (lane == 0) scratch[0] = w;
  }
  __syncthreads();
  return scratch[0];
}

// ---------------------------------------------------------------------------------------------
// Row streaming with 16-byte vector loads. Columns are grouped in chunks of kVec = 16 /
// sizeof(T) consecutive columns; chunk c belongs to thread c % blockDim.x, which visits its
// columns in increasing order. That assignment depends only on V and blockDim, never on the
// row's address: a row gives the same bits whatever its position in the batch (batch
// invariance). Rows whose start is 16-byte aligned load each full chunk with one vector load;
// other rows (odd V, sliced logits) load the same chunks element by element.
// ---------------------------------------------------------------------------------------------

template <class T>
struct VecWidth { static constexpr int value = 16 / static_cast<int>(sizeof(T)); };

template <class T, int N>
struct alignas(16) Pack { T v[N]; };

// f(col, value_in_acc_type) for every column of the row, this thread's share, in order.
template <class T, class F>
__device__ __forceinline__ void for_each_col(const T* row, int64_t V, F&& f) {
  constexpr int kVec = VecWidth<T>::value;
  const bool aligned = (reinterpret_cast<std::uintptr_t>(row) & 15u) == 0;
  const int64_t full = V / kVec;  // complete chunks
  if (aligned) {
    const Pack<T, kVec>* vp = reinterpret_cast<const Pack<T, kVec>*>(row);
    for (int64_t c = threadIdx.x; c < full; c += blockDim.x) {
      const Pack<T, kVec> p = vp[c];
#pragma unroll
      for (int k = 0; k < kVec; ++k) f(c * kVec + k, to_acc(p.v[k]));
    }
  } else {
    for (int64_t c = threadIdx.x; c < full; c += blockDim.x) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) f(c * kVec + k, to_acc(row[c * kVec + k]));
    }
  }
  // the last, partial chunk (V % kVec columns) belongs to thread full % blockDim.x
  const int64_t tail = full * kVec;
  if (tail < V && static_cast<int64_t>(threadIdx.x) == full % blockDim.x) {
    for (int64_t j = tail; j < V; ++j) f(j, to_acc(row[j]));
  }
}

// Threads of a one-row-per-block kernel: enough for one chunk each, a power of two in
// [32, max_threads] (a function of V only, so a row's reduction order never depends on N).
inline int row_threads(int64_t V, int vec, int max_threads) {
  const int64_t chunks = (V + vec - 1) / vec;
  int t = 32;
  while (t < max_threads && t < chunks) t <<= 1;
  return t;
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
