// Linear family (the fused lm_head ops' cuBLAS path, rlkernels/cuda/linear.py): d z of one
// vocabulary slice of a chunk of logits. The GEMMs (logits = h W^T + b, d hidden = d z W,
// d W = d z^T h) run through torch.mm in the launcher; this kernel is what sits between
// them in the backward. Same formulas as token_logprobs_bwd_kernel (vocab.cu) and the triton
// _dz_kernel (FROM_LOGITS), on a [C, S] column slice instead of whole rows:
//
//   z = y / T,  zs = z - m,  p = exp(zs - log s)      (m, log s, sum p (z - m)): saved stats
//   d z_j = -g_lp p_j                                 (j != token)
//   d z_y = -g_lp expm1(zs_y - log s)                 (the token, if its column v0 + j is here:
//                                                      g (1 - p_y) without cancellation)
//          - g_H xmul0(p_j, zs_j - sum p (z - m))     (every column, with an entropy gradient)
//   all times 1/T (folded into g_lp, g_H).
//
// Rows past n_live (the zero padding of the last chunk; y not read), padding rows (token ==
// ignore_index) and rows whose upstream gradients are both exactly 0 get exact zeros (a
// select after the arithmetic, so NaN logits there are harmless and the common path has no
// branch).
// Layout: thread t of block (bx, by) owns the kVec = 16 / sizeof(D) consecutive columns
// starting at (bx * blockDim.x + t) * kVec of every row of row block by (rows_per_block rows,
// in increasing order): one 16-byte store of d z per row (16-byte loads of y, several for
// fp32 logits and a bf16 d z), no shared memory, no barrier. With a bias, each thread also
// sums its columns of d z over its row block (fixed order, in the accumulation type) and
// writes them to row by of bias_partials: the launcher sums those rows (deterministic, no
// atomics). Which thread computes which element depends only on the column and the row
// block, never on N, and an element is a function of its own row only: batch invariant.
// Offsets are 64-bit.
#include <type_traits>

#include "logits.cuh"
#include "rlkernels.h"

namespace rlk {
namespace {

constexpr int kDzThreads = 128;

// Storage conversions of d z: bf16 from fp64 goes through fp32 first, as torch's does.
template <class D, class A>
__device__ __forceinline__ D store_as(A x) {
  if constexpr (std::is_same_v<D, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<D>(x);
  }
}

template <class D, class A, bool kHasGh>
__global__ void __launch_bounds__(kDzThreads)
    linear_dz_bwd_kernel(const A* __restrict__ y, int64_t stride_y, const A* __restrict__ glp,
                         int64_t stride_glp, const A* __restrict__ gh, int64_t stride_gh,
                         const int64_t* __restrict__ tok, int64_t stride_tok,
                         const A* __restrict__ stats, int64_t stride_s0, int64_t stride_s1,
                         D* __restrict__ dz, int64_t stride_dz, A* __restrict__ dbp,
                         int64_t stride_dbp, int64_t n_rows, int64_t n_live, int64_t cols,
                         int64_t v0, int64_t rows_per_block, A inv_t, int64_t ignore_index) {
  constexpr int N = 16 / static_cast<int>(sizeof(D));
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * N;
  if (c0 >= cols) return;  // no barrier in this kernel: an idle thread may leave
  const bool full = c0 + N <= cols;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r_end = min(r_begin + rows_per_block, n_rows);
  A bsum[N];
#pragma unroll
  for (int k = 0; k < N; ++k) bsum[k] = A(0);
  // 16-byte accesses when every row of this thread's columns is aligned (uniform over the
  // rows: the loop is compiled twice, the vector one straight-line; fp64 logits: the
  // element-wise loop only)
  const bool vec = full && aligned16(y + c0) && aligned16(dz + c0) &&
                   (stride_y * static_cast<int64_t>(sizeof(A))) % 16 == 0 &&
                   (stride_dz * static_cast<int64_t>(sizeof(D))) % 16 == 0;
  auto rows_loop = [&](auto vec_tag) {
    constexpr bool kVec = decltype(vec_tag)::value;
    for (int64_t r = r_begin; r < r_end; ++r) {
      // rows past n_live and padding rows: t = ignore_index; their values are computed from
      // finite stand-ins and discarded by the select below (no branch on the common path)
      const bool in = r < n_live;
      const int64_t t = in ? tok[r * stride_tok] : ignore_index;
      const bool live = t != ignore_index;
      const A g_lp = (live && glp != nullptr) ? glp[r * stride_glp] * inv_t : A(0);
      const A g_h = (kHasGh && live) ? gh[r * stride_gh] * inv_t : A(0);
      // a row whose gradients are both 0 gets exact zeros, even with a NaN logit
      const bool keep = live && (g_lp != A(0) || g_h != A(0));
      const A* st = stats + r * stride_s0;
      const A log_s = live ? st[stride_s1] : A(0);
      const A sum_pzs = live ? st[2 * stride_s1] : A(0);
      const ProbOf<A> po = prob_of(inv_t, live ? shift_of(st[0]) : A(0), log_s);
      const A* yr = y + r * stride_y + c0;
      A x[N];
      if constexpr (kVec) {
        Pack<A, N> v;
        if (in) v = *reinterpret_cast<const Pack<A, N>*>(yr);
#pragma unroll
        for (int k = 0; k < N; ++k) x[k] = in ? v.v[k] : A(0);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) x[k] = (in && c0 + k < cols) ? yr[k] : neg_inf<A>();
      }
      const A ng = -g_lp;
      A g[N];
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A zs = po.zs(x[k]);
        const A p = po.p(zs);
        g[k] = ng * p;
        // -inf column: p = 0 and zs clamped finite, so 0 (not NaN)
        if (kHasGh) g[k] = fma(-g_h * p, vmax(zs, lowest<A>()) - sum_pzs, g[k]);
        g[k] = keep ? g[k] : A(0);
      }
      // the token's column, when it falls in this thread's columns (rare: once per row); its
      // logit is read again (an L1 hit) rather than kept live past the loop above
      const int64_t ty = t - v0 - c0;
      if (__builtin_expect(keep && ty >= 0 && ty < N && ty < cols - c0, 0)) {
        const A zs = po.zs(yr[ty]);
        A gy = ng * d_expm1(zs - log_s);
        if (kHasGh) gy -= g_h * xmul0(po.p(zs), zs - sum_pzs);
#pragma unroll
        for (int k = 0; k < N; ++k) g[k] = k == ty ? gy : g[k];
      }
      D* dr = dz + r * stride_dz + c0;
      if constexpr (kVec) {
        Pack<D, N> o;
#pragma unroll
        for (int k = 0; k < N; ++k) o.v[k] = store_as<D>(g[k]);
        *reinterpret_cast<Pack<D, N>*>(dr) = o;
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k)
          if (c0 + k < cols) dr[k] = store_as<D>(g[k]);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) bsum[k] += g[k];
    }
  };
  if constexpr (sizeof(A) == 8) {
    rows_loop(std::false_type{});  // fp64: one loop (registers; not a bandwidth path)
  } else {
    if (vec) rows_loop(std::true_type{});
    else rows_loop(std::false_type{});
  }
  if (dbp != nullptr) {
    A* br = dbp + static_cast<int64_t>(blockIdx.y) * stride_dbp + c0;
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (c0 + k < cols) br[k] = bsum[k];
  }
}

template <class D, class A>
void launch_dz(Rows y, Rows grad_logp, Rows grad_entropy, Rows tokens, Matrix stats, Rows dz,
               Rows bias_partials, int64_t n_rows, int64_t n_live, int64_t cols, int64_t v0,
               int64_t rows_per_block, double inv_temperature, int64_t ignore_index,
               cudaStream_t s) {
  constexpr int N = 16 / static_cast<int>(sizeof(D));
  const int64_t col_blocks = (cols + int64_t(kDzThreads) * N - 1) / (int64_t(kDzThreads) * N);
  const int64_t row_blocks = (n_rows + rows_per_block - 1) / rows_per_block;
  RLK_CHECK_ARG(row_blocks <= 65535, "linear_dz: n_rows / rows_per_block must be at most "
                "65535 row blocks, got " + std::to_string(row_blocks));
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
  const A* gl = as_cptr<A>(grad_logp.ptr);
  const A* ge = as_cptr<A>(grad_entropy.ptr);
  const A it = static_cast<A>(inv_temperature);
#define RLK_LINEAR_DZ(GH)                                                                     \
  linear_dz_bwd_kernel<D, A, GH><<<grid, kDzThreads, 0, s>>>(                                  \
      as_cptr<A>(y.ptr), y.stride, gl, grad_logp.stride, ge, grad_entropy.stride,              \
      as_cptr<int64_t>(tokens.ptr), tokens.stride, as_cptr<A>(stats.ptr), stats.stride0,       \
      stats.stride1, as_ptr<D>(dz.ptr), dz.stride, as_ptr<A>(bias_partials.ptr),               \
      bias_partials.stride, n_rows, n_live, cols, v0, rows_per_block, it, ignore_index)
  if (ge != nullptr) RLK_LINEAR_DZ(true);
  else RLK_LINEAR_DZ(false);
#undef RLK_LINEAR_DZ
  RLK_CHECK_LAUNCH();
}

}  // namespace

void linear_dz(Rows logits, Rows grad_logp, Rows grad_entropy, Rows tokens, Matrix stats,
               Rows dz, Rows bias_partials, int64_t n_rows, int64_t n_live, int64_t cols,
               int64_t v0, int64_t rows_per_block, int dtype, int dz_dtype,
               double inv_temperature, int64_t ignore_index, std::uintptr_t stream) {
  RLK_CHECK_ARG(n_rows >= 0 && n_rows <= 0x7fffffffLL,
                "linear_dz: n_rows must be in [0, 2**31), got " + std::to_string(n_rows));
  RLK_CHECK_ARG(n_live >= 0 && n_live <= n_rows, "linear_dz: n_live must be in [0, n_rows = " +
                std::to_string(n_rows) + "], got " + std::to_string(n_live));
  RLK_CHECK_ARG(cols >= 0 && cols < 0x7fffffffLL,
                "linear_dz: cols must be in [0, 2**31 - 1), got " + std::to_string(cols));
  RLK_CHECK_ARG(rows_per_block >= 1 && rows_per_block <= 4096,
                "linear_dz: rows_per_block must be in [1, 4096], got " +
                    std::to_string(rows_per_block));
  RLK_CHECK_ARG(dtype == static_cast<int>(DType::kFloat32) ||
                    dtype == static_cast<int>(DType::kFloat64),
                "linear_dz: the logits' dtype code must be 0 (float32) or 3 (float64), got " +
                    std::to_string(dtype));
  const bool fp64 = dtype == static_cast<int>(DType::kFloat64);
  RLK_CHECK_ARG(dz_dtype == static_cast<int>(DType::kFloat32) ||
                    dz_dtype == static_cast<int>(DType::kBFloat16) ||
                    (fp64 && dz_dtype == static_cast<int>(DType::kFloat64)),
                "linear_dz: dz_dtype code must be 0 (float32), 2 (bfloat16) or, for float64 "
                "logits, 3 (float64), got " + std::to_string(dz_dtype));
  if (n_rows == 0 || cols == 0) return;
  RLK_CHECK_ARG(dz.ptr != 0 && (n_live == 0 || (logits.ptr != 0 && tokens.ptr != 0 &&
                                                stats.ptr != 0)),
                "linear_dz: null device pointer");
  const cudaStream_t s = checked_stream(stream);
  auto run = [&](auto dtag, auto atag) {
    using D = typename decltype(dtag)::type;
    using A = typename decltype(atag)::type;
    launch_dz<D, A>(logits, grad_logp, grad_entropy, tokens, stats, dz, bias_partials, n_rows,
                    n_live, cols, v0, rows_per_block, inv_temperature, ignore_index, s);
  };
  const bool bf16 = dz_dtype == static_cast<int>(DType::kBFloat16);
  const bool f32 = dz_dtype == static_cast<int>(DType::kFloat32);
  if (!fp64) {
    if (bf16) run(TypeTag<__nv_bfloat16>{}, TypeTag<float>{});
    else run(TypeTag<float>{}, TypeTag<float>{});
  } else {
    if (bf16) run(TypeTag<__nv_bfloat16>{}, TypeTag<double>{});
    else if (f32) run(TypeTag<float>{}, TypeTag<double>{});
    else run(TypeTag<double>{}, TypeTag<double>{});
  }
}

}  // namespace rlk
