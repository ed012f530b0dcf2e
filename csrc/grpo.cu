// grpo_loss(..., grad_in_forward=True): the forward forms d loss / d logits (upstream 1) while
// the row is on chip, and the backward only scales it. Python launchers: rlkernels/cuda/grpo.py.
// Math: rlkernels/reference/vocab.py (softmax statistics, the logits gradient) and
// rlkernels/reference/policy.py (the per-token loss gradient); docs/math.md, section
// "grpo_loss: the gradient in the forward".
//
// One read of each logit (sm_90a). The three-pass path reads a row in the forward (statistics),
// again in the backward (probabilities) and writes the gradient: 2 reads + 1 write of N x V.
// Here a thread-block cluster of k CTAs (k = 2 for a 151936-column bf16 row, 4 for fp32; the
// host plans k so that a CTA's slice fits its shared memory) holds one row in distributed
// shared memory:
//   1. each CTA loads its contiguous slice of the row (16-byte chunks [c0, c1)) into its own
//      shared memory with TMA bulk copies (cp.async.bulk global -> shared, completion counted
//      on an mbarrier): the only read of the logits;
//   2. each CTA folds its slice into a running state (logits.cuh Run: max, sum, count, the
//      entropy sum) from shared memory and reduces it block-wide; the CTA whose slice holds
//      the token keeps its logit;
//   3. cluster barrier; one thread of every CTA reads the k states of the cluster from the
//      peers' shared memory (DSMEM) and merges them in rank order (the same fixed order in
//      every CTA: identical statistics, deterministic), plus the token's logit from its owner;
//      every CTA then forms logp, H, and the token's d loss / d logp and d loss / d H
//      (gif_token_grad: ppo / cispo / reinforce, is_weights, KL; the entropy term), with the
//      token's aggregation weight c = m / denom (/ n_seq) formed beforehand on the host side
//      from the mask (it does not depend on the logits);
//   4. each CTA writes d logits of its slice from shared memory with 16-byte stores:
//      (g_lp (onehot - p) - g_H p (z - sum p z)) / T, the formula and the rounding of
//      vocab.cu's token_logprobs_bwd_kernel; a cluster barrier keeps every CTA's shared
//      memory alive until its peers have read it.
// Padding rows (token == ignore_index) read nothing and write zeros; rows whose weight is 0
// (masked tokens) read their row (logp / H feed the metrics) and write zeros.
// Sequence-level ratios (GSPO) and the sm_80 build use the three-pass composition
// (rlkernels/_fused.py): grpo_gif_plan returns 0 there and the launcher falls back.
//
// grpo_gif_scale: the backward, grad *= g in the compute dtype; every block returns at once
// when g == 1 (read on the device: no host sync, no data moved).
#include <cooperative_groups.h>

#include "logits.cuh"
#include "policy_math.cuh"
#include "rlkernels.h"

namespace cg = cooperative_groups;

namespace rlk {
namespace {

// ------------------------------------------------- the per-token loss gradient (token level)
// policy_grad_kernel's token-level formula (policy.cu); the helpers are policy_math.cuh's. A
// loss added to policy.cu falls back to the three-pass path until it is added here
// (rlkernels/cuda/grpo.py ONE_READ_LOSSES).
// d L_t / d logp_t of the per-token loss (before the aggregation weight), token-level ratio.
template <class A>
__device__ A gif_token_grad(A l, A old_lp, A a, A ref, A w, const PolicyParams& pp) {
  A g;
  if (pp.loss == kReinforce) {
    g = -a;
  } else {
    const A lo = A(pp.lo), hi = A(pp.hi), lim = A(pp.log_ratio_clamp);
    const A d = l - old_lp;
    const A log_r = clamp_nan(d, -lim, lim);
    const A dlog_r = (d >= -lim && d <= lim) ? A(1) : A(0);
    const A r = d_exp(log_r);
    if (pp.loss == kCispo) {
      g = -clamp_nan(r, lo, hi) * a;
    } else {  // ppo
      const A delta = A(pp.delta);
      const A unclipped = pp.has_delta ? min_nan(r, delta) : r;
      const A d_unclipped = pp.has_delta ? -a * A(r <= delta) : -a;
      const A d_clipped = -a * A(r >= lo && r <= hi);
      const A pg1 = -a * unclipped, pg2 = -a * clamp_nan(r, lo, hi);
      A dpg = pg1 > pg2 ? d_unclipped
                        : (pg1 < pg2 ? d_clipped : A(0.5) * (d_unclipped + d_clipped));
      if (pp.has_dual && a < A(0)) {
        const A pg = max_nan(pg1, pg2), bound = A(-pp.dual_clip) * a;
        dpg = pg > bound ? A(0) : (pg < bound ? dpg : A(0.5) * (A(0) + dpg));
      }
      g = dpg * r * dlog_r;
    }
  }
  if (pp.has_w) g = g * w;
  if (pp.use_kl) g = g + A(pp.kl_coef) * kl_grad_rt(l - ref, pp.kl_estimator);
  return g;
}

template <class A>
__device__ __forceinline__ A at(const Matrix& v, int64_t b, int64_t t) {
  return reinterpret_cast<const A*>(v.ptr)[b * v.stride0 + t * v.stride1];
}
template <class A>
__device__ __forceinline__ void put(const Matrix& v, int64_t b, int64_t t, A x) {
  reinterpret_cast<A*>(v.ptr)[b * v.stride0 + t * v.stride1] = x;
}

// ------------------------------------------------------------ TMA bulk copy, mbarrier, cluster
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}
// bytes (a multiple of 16, 16-byte aligned ends) from global src to this CTA's shared dst
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, uint32_t bytes,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
      ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
constexpr uint32_t kBulkPiece = 1u << 15;  // bytes per bulk copy instruction
#endif

// Statistics a CTA publishes to its cluster (read by the peers through DSMEM).
template <class A>
struct GifPart {
  Run<A> run;
  A x_y;  // the token's logit (valid in the CTA whose slice holds it)
};

// One cluster of k CTAs per row (grid = n * k, cluster dims (k, 1, 1)); the row's slice of
// this CTA lives in the dynamic shared memory: chunks [c0, c1) of 16 bytes, slice_chunks per
// CTA. Needs V % N == 0 and 16-byte aligned rows of x and out (the launcher checks).
template <class T>
__global__ void __launch_bounds__(max_threads<T>())
    grpo_gif_cluster_kernel(const T* __restrict__ x, int64_t stride_x,
                            const int64_t* __restrict__ tok, int64_t stride_tok,
                            PolicyTensors pt, PolicyParams pp, acc_t<T>* __restrict__ stats,
                            T* __restrict__ out, int64_t stride_out, int V, int slice_chunks,
                            acc_t<T> inv_t, acc_t<T> scale, int64_t ignore_index) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using A = acc_t<T>;
  constexpr int N = Chunk<T>::N;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ Run<A> scratch[32];
  __shared__ GifPart<A> part;
  __shared__ Run<A> total;
  __shared__ A total_xy;
  __shared__ __align__(8) uint64_t bar;
  const uint4* sx = reinterpret_cast<const uint4*>(smem_raw);
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int k = static_cast<int>(cluster.num_blocks());
  const int64_t row = blockIdx.x / k;
  const int c0 = rank * slice_chunks;
  const int c1 = min(c0 + slice_chunks, V / N);
  const int nc = max(c1 - c0, 0);
  const int64_t b = row / pt.T, t = row - b * pt.T;
  T* orow = out + row * stride_out;
  const int64_t y = tok[row * stride_tok];
  if (y == ignore_index) {  // uniform over the cluster: every CTA returns, no DSMEM access
    zero_row(orow + static_cast<int64_t>(c0) * N, nc * N);
    if (rank == 0 && threadIdx.x == 0) {
      put(pt.logp, b, t, A(0));
      put(pt.entropy, b, t, A(0));
      for (int j = 0; j < 3; ++j) stats[row * 3 + j] = A(0);
    }
    return;
  }
  const T* xr = x + row * stride_x;
  // 1. the slice, once, by bulk copies (thread 0 issues them; everyone waits on the barrier)
  if (threadIdx.x == 0) {
    mbar_init(&bar, 1);
    const uint32_t bytes = static_cast<uint32_t>(nc) * 16u;
    mbar_expect_tx(&bar, bytes);
    const unsigned char* src = reinterpret_cast<const unsigned char*>(xr + int64_t(c0) * N);
    for (uint32_t off = 0; off < bytes; off += kBulkPiece)
      bulk_g2s(smem_raw + off, src + off, min(kBulkPiece, bytes - off), &bar);
  }
  __syncthreads();  // the barrier is initialized before anyone waits on it
  mbar_wait(&bar, 0);
  // 2. this slice's running state, from shared memory (16-byte loads)
  Run<A> r = run_empty<A>();
  for (int c = threadIdx.x; c < nc; c += blockDim.x) {
    Chunk<T> ch;
    unpack<T>(sx[c], ch);
    A e[N];
    run_chunk<true, false>(r, ch.v, scale, e);
  }
  r = run_block_reduce<true, false>(r, scale, scratch);
  const bool y_here = y >= int64_t(c0) * N && y < int64_t(c1) * N;
  if (threadIdx.x == 0) {
    part.run = r;
    part.x_y = y_here ? to_acc(reinterpret_cast<const T*>(smem_raw)[y - int64_t(c0) * N])
                      : A(0);
  }
  // 3. the cluster's statistics, merged in rank order by one thread of every CTA
  cluster_arrive();
  cluster_wait();
  if (threadIdx.x == 0) {
    Run<A> m = cluster.map_shared_rank(&part, 0)->run;
    for (int j = 1; j < k; ++j)
      m = run_merge<true, false>(m, cluster.map_shared_rank(&part, j)->run, scale);
    total = m;
    const bool y_in = y >= 0 && y < V;
    const int owner = y_in ? static_cast<int>((y / N) / slice_chunks) : 0;
    total_xy = y_in ? cluster.map_shared_rank(&part, owner)->x_y : quiet_nan<A>();
  }
  __syncthreads();
  cluster_arrive();  // this CTA has read its peers; their shared memory may go after the wait
  const Run<A> tot = total;
  const A x_y = total_xy;
  const A log_s = d_log1p(run_rest(tot));
  const A m_z = tot.m * inv_t;  // = max z, as the forward saves it
  const A sum_pzs = tot.m == neg_inf<A>() ? A(0)
                                          : tot.s1 * A(Unit<A>::ln_base) / (tot.s + tot.n);
  const A logp = (x_y - shift_of(tot.m)) * inv_t - log_s;
  const A weight = at<A>(pt.mask, b, t);  // c = m / denom (/ n_seq), 0 where masked
  A g_lp = A(0), g_h = A(0);
  if (weight != A(0)) {
    const A g = gif_token_grad<A>(logp, at<A>(pt.old_logp, b, t), at<A>(pt.adv, b, t),
                                  pp.has_ref ? at<A>(pt.ref_logp, b, t) : A(0),
                                  pp.has_w ? at<A>(pt.is_weights, b, t) : A(1), pp);
    g_lp = weight * g * inv_t;
    if (pp.use_ent) g_h = A(-pp.entropy_coef) * weight * inv_t;
  }
  if (rank == 0 && threadIdx.x == 0) {
    put(pt.logp, b, t, logp);
    put(pt.entropy, b, t, log_s - sum_pzs);
    stats[row * 3] = m_z;
    stats[row * 3 + 1] = log_s;
    stats[row * 3 + 2] = sum_pzs;
  }
  // 4. d logits of the slice, from shared memory, 16-byte stores
  T* oslice = orow + int64_t(c0) * N;
  if (g_lp == A(0) && g_h == A(0)) {
    zero_row(oslice, nc * N);
  } else {
    const ProbOf<A> po = prob_of(inv_t, shift_of(m_z), log_s);
    const A ng = -g_lp;
    for (int c = threadIdx.x; c < nc; c += blockDim.x) {
      Chunk<T> ch;
      unpack<T>(sx[c], ch);
      A g[N];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const A zs = po.zs(ch.v[j]);
        const A p = po.p(zs);
        g[j] = fma(-g_h * p, vmax(zs, lowest<A>()) - sum_pzs, ng * p);
      }
      reinterpret_cast<Pack<T, N>*>(oslice)[c] = [&] {
        Pack<T, N> q;
#pragma unroll
        for (int j = 0; j < N; ++j) q.v[j] = from_acc<T>(g[j]);
        return q;
      }();
    }
    // the token's column: rewritten by the thread that wrote its chunk (program order)
    if (y_here && static_cast<int>(threadIdx.x) ==
                      static_cast<int>((y / N - c0) % static_cast<int64_t>(blockDim.x))) {
      const A zs = po.zs(x_y);
      A g_y = -g_lp * d_expm1(zs - log_s);
      g_y -= g_h * xmul0(po.p(zs), zs - sum_pzs);
      orow[y] = from_acc<T>(g_y);
    }
  }
  cluster_wait();
#else
  __trap();  // never launched: grpo_gif_plan returns 0 below sm_90
#endif
}

// grad *= g (one block per row), in the compute dtype, one rounding; nothing when g == 1.
template <class T>
__global__ void __launch_bounds__(256)
    grpo_gif_scale_kernel(T* __restrict__ grad, int64_t stride, int64_t V,
                          const acc_t<T>* __restrict__ g_ptr) {
  using A = acc_t<T>;
  constexpr int N = Chunk<T>::N;
  const A g = *g_ptr;
  if (g == A(1)) return;
  T* row = grad + static_cast<int64_t>(blockIdx.x) * stride;
  const int full = static_cast<int>(V / N);
  if (aligned16(row)) {
    for (int c = threadIdx.x; c < full; c += blockDim.x) {
      Pack<T, N> q = reinterpret_cast<const Pack<T, N>*>(row)[c];
#pragma unroll
      for (int j = 0; j < N; ++j) q.v[j] = from_acc<T>(to_acc(q.v[j]) * g);
      reinterpret_cast<Pack<T, N>*>(row)[c] = q;
    }
    for (int64_t j = int64_t(full) * N + threadIdx.x; j < V; j += blockDim.x)
      row[j] = from_acc<T>(to_acc(row[j]) * g);
  } else {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) row[j] = from_acc<T>(to_acc(row[j]) * g);
  }
}

template <class T>
int slice_limit_bytes() {
  int dev = 0, optin = 0;
  RLK_CUDA_CHECK(cudaGetDevice(&dev));
  RLK_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaFuncAttributes attr{};
  RLK_CUDA_CHECK(cudaFuncGetAttributes(&attr, grpo_gif_cluster_kernel<T>));
  // the kernel was compiled for sm_90+ (an sm_80 build's body only traps)
  if (attr.binaryVersion < 90 || attr.ptxVersion < 90) return 0;
  return optin - static_cast<int>(attr.sharedSizeBytes) - 1024;  // 1 KB: reserved per block
}

}  // namespace

int grpo_gif_plan(int64_t vocab, int dtype) {
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "grpo_gif_plan: vocab must be in [1, 2**31 - 1), got " + std::to_string(vocab));
  int major = 0, dev = 0;
  RLK_CUDA_CHECK(cudaGetDevice(&dev));
  RLK_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (major < 9) return 0;
  int cluster = 0;
  dispatch_logits(dtype, "grpo_gif_plan", [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int N = Chunk<T>::N;
    if (vocab % N != 0) return;
    const int limit = slice_limit_bytes<T>();
    const int64_t chunks = vocab / N;
    for (int k = 1; k <= 8; k *= 2) {  // 8: the portable cluster size
      if (((chunks + k - 1) / k) * 16 <= limit) {
        cluster = k;
        return;
      }
    }
  });
  return cluster;
}

void grpo_gif_forward(Rows logits, Rows tokens, const PolicyTensors& pt, const PolicyParams& pp,
                      std::uintptr_t stats, Rows out, int64_t n, int64_t vocab, int dtype,
                      double inv_temperature, int64_t ignore_index, int cluster,
                      std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL / 8 && n == pt.B * pt.T,
                "grpo_gif_forward: n must be B * T < 2**28, got n=" + std::to_string(n));
  RLK_CHECK_ARG(cluster == 1 || cluster == 2 || cluster == 4 || cluster == 8,
                "grpo_gif_forward: cluster must be 1, 2, 4 or 8, got " +
                    std::to_string(cluster));
  RLK_CHECK_ARG(pp.seq == kTokenLevel && pp.loss >= kPpo && pp.loss <= kReinforce,
                "grpo_gif_forward: token-level ppo / cispo / reinforce only");
  RLK_CHECK_ARG(!pp.has_ref || pt.ref_logp.ptr != 0, "grpo_gif_forward: has_ref without ref_logp");
  RLK_CHECK_ARG(!pp.has_w || pt.is_weights.ptr != 0,
                "grpo_gif_forward: has_w without is_weights");
  if (n == 0) return;
  RLK_CHECK_ARG(logits.ptr != 0 && tokens.ptr != 0 && out.ptr != 0 && stats != 0 &&
                    pt.logp.ptr != 0 && pt.entropy.ptr != 0 && pt.old_logp.ptr != 0 &&
                    pt.adv.ptr != 0 && pt.mask.ptr != 0,
                "grpo_gif_forward: null device pointer");
  dispatch_logits(dtype, "grpo_gif_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    constexpr int N = Chunk<T>::N;
    RLK_CHECK_ARG(vocab % N == 0 && logits.ptr % 16 == 0 && out.ptr % 16 == 0 &&
                      (logits.stride * int64_t(sizeof(T))) % 16 == 0 &&
                      (out.stride * int64_t(sizeof(T))) % 16 == 0,
                  "grpo_gif_forward: rows must be 16-byte aligned multiples of 16 bytes");
    const int chunks = static_cast<int>(vocab / N);
    const int slice_chunks = (chunks + cluster - 1) / cluster;
    const size_t smem = static_cast<size_t>(slice_chunks) * 16;
    RLK_CHECK_ARG(static_cast<int64_t>(smem) <= slice_limit_bytes<T>(),
                  "grpo_gif_forward: a slice of " + std::to_string(smem) +
                      " bytes does not fit shared memory (grpo_gif_plan)");
    auto kernel = grpo_gif_cluster_kernel<T>;
    RLK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>(n * cluster));
    cfg.blockDim = dim3(max_threads<T>());
    cfg.dynamicSmemBytes = smem;
    cfg.stream = as_stream(stream);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const A inv_t = static_cast<A>(inv_temperature);
    const A scale = static_cast<A>(scale_of(dtype, inv_temperature));
    RLK_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, as_cptr<T>(logits.ptr), logits.stride,
                                      as_cptr<int64_t>(tokens.ptr), tokens.stride, pt, pp,
                                      as_ptr<A>(stats), as_ptr<T>(out.ptr), out.stride,
                                      static_cast<int>(vocab), slice_chunks, inv_t, scale,
                                      ignore_index));
  });
}

void grpo_gif_scale(Rows grad, int64_t n, int64_t vocab, std::uintptr_t g, int dtype,
                    std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL && vocab >= 1 && vocab < 0x7fffffffLL,
                "grpo_gif_scale: n must be in [0, 2**31) and vocab in [1, 2**31 - 1)");
  if (n == 0) return;
  RLK_CHECK_ARG(grad.ptr != 0 && g != 0, "grpo_gif_scale: null device pointer");
  dispatch_logits(dtype, "grpo_gif_scale", [&](auto tag) {
    using T = typename decltype(tag)::type;
    grpo_gif_scale_kernel<T><<<static_cast<unsigned>(n), 256, 0, as_stream(stream)>>>(
        as_ptr<T>(grad.ptr), grad.stride, vocab, as_cptr<acc_t<T>>(g));
    RLK_CHECK_LAUNCH();
  });
}

}  // namespace rlk
