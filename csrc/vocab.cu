// Vocabulary family (ops that read logits [N, V]): token_logprobs (+ entropy) and
// kl_divergence, forward and backward. Python launchers: rlkernels/cuda/vocab.py. The math is
// stated in rlkernels/reference/vocab.py; this file states how it is streamed, with the row
// helpers of logits.cuh (whose header describes the layout, the saved statistics and the hot
// loop). sparse_logprobs and sparse_kl are in sparse.cu.
#include <type_traits>

#include "logits.cuh"
#include "rlkernels.h"

namespace rlk {
namespace {

// ============================================================== token_logprobs / entropy

// Forward, one block per row:
//   stats = (m, log s, sum p (z - m) or 0),  logp = (x_y - m_x) / T - log s,
//   entropy = log s - sum p (z - m)   (= lse - sum p z, both terms >= 0: exact when peaked),
// with sum p (z - m) = s1 ln(base) / (s + n). Rows whose token is ignore_index are not read:
// outputs 0, stats 0 (backward never reads them). A token outside [0, V) reads nothing and
// gives NaN (only reachable with debug checks off).
template <class T, bool kWithEnt, bool kHasTok>
__global__ void __launch_bounds__(max_threads<T>())
    token_logprobs_fwd_kernel(const T* __restrict__ x, int64_t stride_x,
                              const int64_t* __restrict__ tok, int64_t stride_tok,
                              acc_t<T>* __restrict__ logp, acc_t<T>* __restrict__ ent,
                              acc_t<T>* __restrict__ stats, int64_t V, acc_t<T> inv_t,
                              acc_t<T> scale, int64_t ignore_index) {
  using A = acc_t<T>;
  __shared__ Run<A> scratch[32];
  const int64_t row = blockIdx.x;
  int64_t y = 0;
  if (kHasTok) {
    y = tok[row * stride_tok];
    if (y == ignore_index) {  // uniform over the block: returning before any barrier is safe
      if (threadIdx.x == 0) {
        logp[row] = A(0);
        ent[row] = A(0);
        stats[row * 3] = A(0);
        stats[row * 3 + 1] = A(0);
        stats[row * 3 + 2] = A(0);
      }
      return;
    }
  }
  const T* xr = x + row * stride_x;
  // the token's logit, loaded early (its latency hides under the row)
  const A x_y = (kHasTok && y >= 0 && y < V) ? to_acc(xr[y]) : quiet_nan<A>();
  const Run<A> r = row_run<kWithEnt>(xr, V, scale, scratch);
  if (threadIdx.x != 0) return;
  const A log_s = d_log1p(run_rest(r));
  stats[row * 3] = r.m * inv_t;  // = max z (rounding is monotonic)
  stats[row * 3 + 1] = log_s;
  if (kWithEnt) {
    const A sum_pzs = r.m == neg_inf<A>() ? A(0) : r.s1 * A(Unit<A>::ln_base) / (r.s + r.n);
    stats[row * 3 + 2] = sum_pzs;
    ent[row] = log_s - sum_pzs;
  } else {
    stats[row * 3 + 2] = A(0);
    ent[row] = A(0);
  }
  logp[row] = kHasTok ? (x_y - shift_of(r.m)) * inv_t - log_s : A(0);
}

// Backward, one block per row, gradient in the logits' dtype (out may be x: in place):
//   d/dz_j = -g p_j  (j != y),   -g expm1(log p_y)  (j = y: g (1 - p_y) without cancellation)
//            - g_H xmul0(p_j, (z_j - m) - sum p (z - m)),      all times 1/T,
// p_j = exp((z_j - m) - log s) from the saved stats. The loop writes -g p_j everywhere; the
// thread that owns the token's chunk then rewrites the token's column (same thread, program
// order: no barrier). Padding rows, and rows whose upstream gradients are all exactly 0, get
// exactly 0 without reading the logits (so a NaN logit in such a row gives 0, not NaN: the
// gradient of a term that does not enter the loss). A token outside [0, V) (vocabulary
// parallelism: another rank's column) gives no one-hot term. kHasGlp needs tokens.
template <class T, bool kHasGlp, bool kHasGh>
__global__ void __launch_bounds__(max_threads<T>())
    token_logprobs_bwd_kernel(const acc_t<T>* glp, int64_t stride_glp, const acc_t<T>* gh,
                              int64_t stride_gh, const T* x, int64_t stride_x,
                              const int64_t* tok, int64_t stride_tok, bool has_tok,
                              const acc_t<T>* stats, int64_t stride_s0, int64_t stride_s1,
                              T* out, int64_t stride_out, int64_t V, acc_t<T> inv_t,
                              int64_t ignore_index) {
  using A = acc_t<T>;
  constexpr int N = Chunk<T>::N;
  const int64_t row = blockIdx.x;
  T* orow = out + row * stride_out;
  const int64_t y = has_tok ? tok[row * stride_tok] : int64_t(-1);
  const A g_lp = kHasGlp ? glp[row * stride_glp] * inv_t : A(0);
  const A g_h = kHasGh ? gh[row * stride_gh] * inv_t : A(0);
  if ((has_tok && y == ignore_index) || (g_lp == A(0) && g_h == A(0))) {
    zero_row(orow, static_cast<int>(V));
    return;
  }
  const T* xr = x + row * stride_x;
  const ProbOf<A> po = prob_of(inv_t, shift_of(stats[row * stride_s0]),
                               stats[row * stride_s0 + stride_s1]);
  const A log_s = stats[row * stride_s0 + stride_s1];
  const A sum_pzs = stats[row * stride_s0 + 2 * stride_s1];
  const bool y_in = y >= 0 && y < V;
  // the token's column, from x read before any thread writes (in place: barrier below)
  A g_y = A(0);
  if (y_in && static_cast<int64_t>(threadIdx.x) == (y / N) % blockDim.x) {
    const A zs = po.zs(to_acc(xr[y]));
    g_y = kHasGlp ? -g_lp * d_expm1(zs - log_s) : A(0);
    if (kHasGh) g_y -= g_h * xmul0(po.p(zs), zs - sum_pzs);
  }
  __syncthreads();
  const bool ao = aligned16(orow);
  const A ng = -g_lp;
  for_each_chunk(xr, static_cast<int>(V), [&](int c, const Chunk<T>& ch) {
    A g[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A zs = po.zs(ch.v[k]);
      const A p = po.p(zs);
      g[k] = kHasGlp ? ng * p : A(0);
      // -inf column: p = 0 and zs clamped finite, so 0 (not NaN)
      if (kHasGh) g[k] = fma(-g_h * p, vmax(zs, lowest<A>()) - sum_pzs, g[k]);
    }
    store_chunk(orow, c, static_cast<int>(V), ao, g);
  });
  if (y_in && static_cast<int64_t>(threadIdx.x) == (y / N) % blockDim.x)
    orow[y] = from_acc<T>(g_y);
}

// ============================================================================= kl_divergence

// kind: rlk::KlKind (rlkernels.h).

template <class A>
__device__ __forceinline__ A logaddexp(A a, A b) {
  const A mx = a > b ? a : b;
  const A mn = a > b ? b : a;
  return mx + d_log1p(d_exp(mn - shift_of(mx)));  // both -inf: -inf + log1p(0) = -inf
}

struct JsdConst {
  double beta, omb, log_beta, log_omb;  // beta, 1 - beta, log beta, log(1 - beta)
};

// The KL terms of one column from log p and log q: p, q and the products p a_p, q a_q
// (a = d KL / d log r of the reference's _kl_terms; 0 * anything = 0).
template <int kKind, class A>
__device__ __forceinline__ void kl_column(A logp, A logq, A beta, A omb, A lb, A l1b, A& pa,
                                          A& qa, A& p, A& q) {
  p = d_exp(logp);
  q = d_exp(logq);
  if (kKind == kReverse) {
    pa = xmul0(p, logp - logq);
    qa = A(0);
  } else if (kKind == kForward) {
    pa = A(0);
    qa = xmul0(q, logq - logp);
  } else {
    const A logm = logaddexp(logp + lb, logq + l1b);
    pa = xmul0(p, beta * (logp - logm));
    qa = xmul0(q, omb * (logq - logm));
  }
}

// expm1(x) for |x| <= 1 in fp32 without a libdevice call: the degree-10 Taylor polynomial
// (truncation |x|^11 / 11! <= 2.5e-8, relative <= 4e-8 since |expm1(x)| >= 0.63 |x| there; ten
// fma / mul in Horner form, a few ulp of rounding). fp64 keeps the accurate expm1.
__device__ __forceinline__ float expm1_small(float x) {
  float p = 2.5052108e-08f;             // 1 / 11!
  p = fmaf(p, x, 2.7557319e-07f);       // 1 / 10!
  p = fmaf(p, x, 2.7557319e-06f);       // 1 / 9!
  p = fmaf(p, x, 2.4801587e-05f);       // 1 / 8!
  p = fmaf(p, x, 1.9841270e-04f);       // 1 / 7!
  p = fmaf(p, x, 1.3888889e-03f);       // 1 / 6!
  p = fmaf(p, x, 8.3333333e-03f);       // 1 / 5!
  p = fmaf(p, x, 4.1666667e-02f);       // 1 / 4!
  p = fmaf(p, x, 1.6666667e-01f);       // 1 / 3!
  p = fmaf(p, x, 0.5f);
  return fmaf(p * x, x, x);             // x + x^2 (1/2 + x / 6 + ...)
}
__device__ __forceinline__ double expm1_small(double x) { return expm1(x); }

// expm1(x) for |x| <= 1 in fp32 for alpha's backward (alpha_side): x + x^2 P(x) with P the
// degree-7 polynomial of least maximal relative error of expm1 on [-1, 1] (Lawson-weighted fit;
// 1.1e-9 in exact arithmetic, 1.2e-7 (~2 ulp) with fp32 Horner, the Taylor form's 1.0e-7) in
// nine fma / mul instead of the Taylor form's eleven: the backward with the ref gradient runs
// two per column pair on its common path (p ~ q). fp64 keeps the accurate expm1.
__device__ __forceinline__ float expm1_fit(float x) {
  float p = 2.7570527e-06f;
  p = fmaf(p, x, 2.5412162e-05f);
  p = fmaf(p, x, 1.9847693e-04f);
  p = fmaf(p, x, 1.3884470e-03f);
  p = fmaf(p, x, 8.3332826e-03f);
  p = fmaf(p, x, 4.1666783e-02f);
  p = fmaf(p, x, 1.6666667e-01f);
  p = fmaf(p, x, 0.5f);
  return fmaf(p * x, x, x);
}
__device__ __forceinline__ double expm1_fit(double x) { return expm1(x); }

// alpha's column term without cancellation: f (1 - e^x) = f - r with f = base^lf, o =
// base^lo (uexp units: log2 for fp32, natural for fp64), x = c (lo - lf) in those units
// (natural: xn), c in (0, 1), r = f^(1-c) o^c. While |xn| <= 1, -f expm1(xn) (expm1_small:
// no cancellation); beyond, f - base^(lf + x) directly (r > e f or r < f / e: at most
// log2(e / (e - 1)) ~ 0.7 bits lost to the subtraction, and lf + x = (1-c) lf + c lo <= 0
// never overflows where expm1 would, f tiny and xn huge). Both sides are computed and one
// selected (no divergent branch, no libdevice call in the loop). f = 0 gives 0 (lo - lf is
// +inf or NaN there).
template <class A>
__device__ __forceinline__ A f_minus_r(A lf, A lo, A c) {
  const A f = uexp(lf);
  const A x = c * (lo - lf);
  const A xn = x * A(Unit<A>::ln_base);
  const A v = fabs(xn) <= A(1) ? -f * expm1_small(xn) : f - uexp(lf + x);
  return f == A(0) ? A(0) : v;
}

// One side of alpha's backward column, g ((f - r) / c - c' D f) (p: c = 1 - a, c' = a; q: c = a,
// c' = 1 - a), with f its probability, r = p^a q^(1-a) (shared by both sides), x = c (lo - lf)
// in natural units (r = f e^x) and the row constants gi = g / c, gd = g c' D. While |x| <= 1,
// f - r = -f expm1(x) (expm1_fit, no cancellation), so the column is f (-expm1(x) gi - gd);
// beyond, (f - r) gi - gd f directly (at most log2(e / (e - 1)) ~ 0.7 bits lost to f - r).
// A branch, not a select: p ~ q (|x| <= 1) is the common column, the polynomial its cost.
// No f == 0 test: f = 0 has x = +-inf or NaN (-inf - -inf), so the direct side, with r = 0
// too (a -inf in r's exponent) unless f merely underflowed, where -r gi is the right value.
template <class A>
__device__ __forceinline__ A alpha_side(A f, A r, A x, A gi, A gd) {
  return fabs(x) <= A(1) ? f * fma(expm1_fit(x), -gi, -gd) : fma(f - r, gi, -gd * f);
}

// alpha's backward on a near-reference column, fp32: |d| ln 2 max(a, 1 - a) <= 1 (d = log2 q -
// log2 p), so both sides' x = h d (h = (1 - a) ln 2 for p, -a ln 2 for q) lie in expm1_fit's
// [-1, 1], and a side's value f (-gi expm1(x) - gd) is f times one polynomial in d whose
// coefficients are the row's: e_k = -gi fit_k h^k (e_1 = -gi h = -+g ln 2 exactly as written),
// e_0 = -gd. Eight fma and the multiply by f per side: no x, no r (no third ex2), no branch
// per side; the column takes one branch (near / not) for both sides, and a chunk of only near
// columns one branch for the chunk. A near column takes this form in every chunk (the result
// of a column never depends on its neighbours).
struct AlphaNear {
  float e[9];  // e[0] = -gd, e[k] = -gi fit_k h^k
};
__device__ __forceinline__ AlphaNear alpha_near_coef(float lead, float gd, float h) {
  // expm1(x) ~ x + x^2 P(x), P of degree 6 of least maximal relative error on [-1, 1]
  // (Lawson fit as expm1_fit's: 2.4e-8 in exact arithmetic, 1.4e-7 with fp32 Horner where
  // expm1_fit's degree 7 gives 1.2e-7; one fma less per side)
  constexpr float fit[8] = {1.0f, 0.50000006f, 0.16666715f, 0.04166626f, 0.00833031f,
                            0.0013895507f, 0.00020370283f, 2.4760298e-05f};
  AlphaNear c;
  c.e[0] = -gd;
  float t = lead;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    c.e[k + 1] = fit[k] * t;
    t *= h;
  }
  return c;
}
__device__ __forceinline__ float alpha_near(float d, const AlphaNear& c) {
  float v = c.e[8];
#pragma unroll
  for (int k = 7; k >= 0; --k) v = fmaf(v, d, c.e[k]);
  return v;
}

// Both gaps of a column, p - r and q - r (0 where a factor is 0), for the fp64 backward with
// the ref gradient only: it keeps the earlier form (this, unscaled constants, g applied last),
// since alpha_side with the g-folded constants took its sm_90a spill from 4 B to 64 B.
__device__ __forceinline__ void alpha_gaps(double p, double q, double r, double d, double oma,
                                           double a, double& gp, double& gq) {
  const double xp = oma * d, xq = -a * d;
  const double vp = fabs(xp) <= 1.0 ? -p * expm1(xp) : p - r;
  const double vq = fabs(xq) <= 1.0 ? -q * expm1(xq) : q - r;
  gp = p == 0.0 ? 0.0 : vp;
  gq = q == 0.0 ? 0.0 : vq;
}

// Forward, one block per row pair.
// reverse / forward: ONE pass. With r the distribution in front (p for reverse, q for
// forward) and o the other,
//   KL(r || o) = sum r (z_r - z_o) - (m_r - m_o) - log s_r + log s_o,
// where sum r (z_r - z_o) = a / (s_r + n_r) / T, a = sum 2^u_r (x_r - x_o) rescaled online
// with r's state (the companion sum of Run). Written as (a / S_r - (m_r - m_o)) / T +
// (log s_o - log s_r): every term is small when the two rows are close, and p = q gives 0
// exactly. A column where r is 0 (x_r = -inf) adds 0 (x_r - x_o clamped finite); where o is
// 0 and r is not, +inf (KL = inf, as the reference).
// jsd: two passes (log m = logaddexp(log p + log beta, log q + log(1 - beta)) needs both
// normalizers, so no online form exists): the statistics of both rows, then
//   beta sum p (log p - log m) + (1 - beta) sum q (log q - log m).
// alpha (a = c.beta in (0, 1)) and tv: two passes as jsd (every column term needs both
// normalizers: the sign of p - q for tv; for alpha the one-pass form, an online logsumexp of
// a z + (1 - a) w, gives S = sum p^a q^(1-a) and D = (1 - S) / (a (1 - a)), which loses all
// digits as a -> 0 or 1, where 1 - S = O(a (1 - a))). The second pass sums, per column,
//   alpha: f_minus_r(log p, log q, 1 - a) = p - r   (a >= 1/2: p in front)
//          f_minus_r(log q, log p, a)     = q - r   (a <  1/2: q in front),   r = p^a q^(1-a),
//          D = sum / (a (1 - a))  (sum (p - r) = sum (q - r) = 1 - S; the front distribution
//          is the one whose exponent 1 - c is near 1, so each term is O(c) like the sum and
//          the error is ~eps sum f |log o - log f| / max(a, 1 - a), not eps / (a (1 - a)));
//   tv:    0.5 |p - q|, and the sums 0.5 p s, -0.5 q s (s = sign(p - q), 0 where p == q
//          as computed) that the backward needs.
// Saves stats_p = (m_p, log s_p, sum p a_p) and stats_q alike (the row sums the one-pass
// backward needs: KL itself on r's side, 0 on the other for reverse / forward; alpha: D and
// 0; tv: 0.5 sum p s and -0.5 sum q s, which add over vocabulary shards), so kl =
// stats_p[2] + stats_q[2] for every kind (tv's kl is summed from |p - q| directly: the same
// value without the cancellation of the two O(1) sums). ignore_mask rows: 0, not read.
template <class T, int kKind>
__global__ void __launch_bounds__(max_threads<T>())
    kl_fwd_kernel(const T* __restrict__ x, int64_t stride_x, const T* __restrict__ y,
                  int64_t stride_y, const uint8_t* __restrict__ mask, int64_t stride_mask,
                  acc_t<T>* __restrict__ kl, acc_t<T>* __restrict__ sp,
                  acc_t<T>* __restrict__ sq, int64_t V, acc_t<T> inv_t, acc_t<T> scale,
                  JsdConst c) {
  using A = acc_t<T>;
  constexpr int N = Chunk<T>::N;
  __shared__ Run<A> scratch[32];
  __shared__ A sum_scratch[32];
  const int64_t row = blockIdx.x;
  if (mask != nullptr && mask[row * stride_mask] != 0) {
    if (threadIdx.x == 0) {
      kl[row] = A(0);
      for (int k = 0; k < 3; ++k) sp[row * 3 + k] = sq[row * 3 + k] = A(0);
    }
    return;
  }
  const T* xr = x + row * stride_x;
  const T* yr = y + row * stride_y;
  constexpr bool kP = kKind == kReverse;  // p carries the companion sum
  constexpr bool kQ = kKind == kForward;
  Run<A> rp = run_empty<A>(), rq = run_empty<A>();
  for_each_chunk2(xr, yr, static_cast<int>(V), [&](int, const Chunk<T>& a, const Chunk<T>& b) {
    A ep[N], eq[N];
    run_chunk<false, kP>(rp, a.v, scale, ep);
    run_chunk<false, kQ>(rq, b.v, scale, eq);
    if (kP || kQ) {
      A t = A(0);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A d = kP ? a.v[k] - b.v[k] : b.v[k] - a.v[k];
        t = fma(kP ? ep[k] : eq[k], vmax(d, lowest<A>()), t);
      }
      if (kP) rp.a += t;
      else rq.a += t;
    }
  });
  rp = run_block_reduce<false, kP>(rp, scale, scratch);
  rq = run_block_reduce<false, kQ>(rq, scale, scratch);
  const A ls_p = d_log1p(run_rest(rp)), ls_q = d_log1p(run_rest(rq));
  if constexpr (kKind == kReverse || kKind == kForward) {
    if (threadIdx.x != 0) return;
    const Run<A> r = kP ? rp : rq;
    const Run<A> o = kP ? rq : rp;
    const A ls_r = kP ? ls_p : ls_q, ls_o = kP ? ls_q : ls_p;
    // an all -inf front row: every r_j = 0, KL = 0 (as the two-pass form gave)
    const A v = r.m == neg_inf<A>()
                    ? A(0)
                    : (r.a / (r.s + r.n) - (r.m - shift_of(o.m))) * inv_t + (ls_o - ls_r);
    kl[row] = v;
    sp[row * 3] = rp.m * inv_t;
    sp[row * 3 + 1] = ls_p;
    sp[row * 3 + 2] = kP ? v : A(0);
    sq[row * 3] = rq.m * inv_t;
    sq[row * 3 + 1] = ls_q;
    sq[row * 3 + 2] = kQ ? v : A(0);
    return;
  }
  const A m_p = shift_of(rp.m) * inv_t, m_q = shift_of(rq.m) * inv_t;
  const A beta = A(c.beta), omb = A(c.omb), lb = A(c.log_beta), l1b = A(c.log_omb);
  A acc_p = A(0), acc_q = A(0);
  [[maybe_unused]] A acc = A(0);  // tv: sum |p - q|
  if constexpr (kKind == kTv) {
    const ProbOf<A> pp = prob_of(inv_t, m_p, ls_p), pq = prob_of(inv_t, m_q, ls_q);
    for_each_chunk2(xr, yr, static_cast<int>(V), [&](int, const Chunk<T>& a, const Chunk<T>& b) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A p = pp.p(pp.zs(a.v[k])), q = pq.p(pq.zs(b.v[k]));
        const A sg = A(p > q) - A(p < q);
        acc = acc + fabs(p - q);  // a -inf column: the other's mass
        acc_p = fma(p, sg, acc_p);
        acc_q = fma(q, sg, acc_q);
      }
    });
    acc = block_sum(acc, sum_scratch) * A(0.5);
    acc_p *= A(0.5);
    acc_q *= A(-0.5);
  } else if constexpr (kKind == kAlpha) {
    const ProbOf<A> pp = prob_of(inv_t, m_p, ls_p), pq = prob_of(inv_t, m_q, ls_q);
    const bool p_front = c.beta >= 0.5;  // uniform over the grid
    const A cf = p_front ? omb : beta;
    for_each_chunk2(xr, yr, static_cast<int>(V), [&](int, const Chunk<T>& a, const Chunk<T>& b) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A lp = fma(pp.zs(a.v[k]), pp.unit, -pp.lsu);
        const A lq = fma(pq.zs(b.v[k]), pq.unit, -pq.lsu);
        acc_p += f_minus_r(p_front ? lp : lq, p_front ? lq : lp, cf);
      }
    });
    acc_p *= A(1.0 / (c.beta * c.omb));
  } else if constexpr (std::is_same_v<A, float>) {
    // log2 units: l = log2 p, log2 m = lg2(beta p + (1 - beta) q); the sums
    // sum p (log2 p - log2 m) are scaled by beta ln 2 (and (1 - beta) ln 2) at the end. A
    // column with p = 0 adds 0 (the difference is clamped finite, NaN included).
    const ProbOf<A> pp = prob_of(inv_t, m_p, ls_p), pq = prob_of(inv_t, m_q, ls_q);
    for_each_chunk2(xr, yr, static_cast<int>(V), [&](int, const Chunk<T>& a, const Chunk<T>& b) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A lp = fma(pp.zs(a.v[k]), pp.unit, -pp.lsu);
        const A lq = fma(pq.zs(b.v[k]), pq.unit, -pq.lsu);
        const A p = uexp(lp), q = uexp(lq);
        const A lm = ulog2(fma(beta, p, omb * q));
        acc_p = fma(p, vmax(lp - lm, lowest<A>()), acc_p);
        acc_q = fma(q, vmax(lq - lm, lowest<A>()), acc_q);
      }
    });
    acc_p *= beta * A(Unit<A>::ln_base);
    acc_q *= omb * A(Unit<A>::ln_base);
  } else {
    for_each_chunk2(xr, yr, static_cast<int>(V), [&](int, const Chunk<T>& a, const Chunk<T>& b) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        A pa, qa, p, q;
        kl_column<kKind>((a.v[k] * inv_t - m_p) - ls_p, (b.v[k] * inv_t - m_q) - ls_q, beta,
                         omb, lb, l1b, pa, qa, p, q);
        acc_p += pa;
        acc_q += qa;
      }
    });
  }
  acc_p = block_sum(acc_p, sum_scratch);
  acc_q = block_sum(acc_q, sum_scratch);
  if (threadIdx.x == 0) {
    kl[row] = kKind == kTv ? acc : acc_p + acc_q;
    sp[row * 3] = rp.m * inv_t;
    sp[row * 3 + 1] = ls_p;
    sp[row * 3 + 2] = acc_p;
    sq[row * 3] = rq.m * inv_t;
    sq[row * 3 + 1] = ls_q;
    sq[row * 3 + 2] = acc_q;
  }
}

// Backward, one pass over the row pair, g = grad_kl / T:
//   reverse: dz = p (log p - log q) - p sum_p,  dw = q - p
//   forward: dz = p - q,                        dw = q (log q - log p) - q sum_q
//   jsd:     dz = p a_p - p sum_p,              dw = q a_q - q sum_q
// (r (a - sum r a), with the row sums saved by forward);
//   alpha:   dz = (p - r) / (1 - a) - a D p,   dw = (q - r) / a - (1 - a) D q
// (= (p S - r) / (1 - a) and (q S - r) / a with S = 1 - a (1 - a) D, D = stats_p[2] +
// stats_q[2]; p - r and q - r by alpha_side, so the 1 / (1 - a) and 1 / a factors multiply
// accurate differences: a -> 1 gives p (log p - log q - D), a -> 0 q (log q - log p - D));
//   tv:      dz = 0.5 p s - p sum_p,    dw = -0.5 q s - q sum_q,   s = sign(p - q)
// (sum_p = 0.5 sum p s, sum_q = -0.5 sum q s as saved by forward, whose p, q and signs are
// bit-identical to these). 16-byte stores where the output row is aligned. ignore_mask
// rows, and rows with grad_kl exactly 0, get exactly 0 unread.
template <class T, int kKind, bool kNeedW>
__global__ void __launch_bounds__(max_threads<T>())
    kl_bwd_kernel(const acc_t<T>* __restrict__ grad, int64_t stride_g, const T* __restrict__ x,
                  int64_t stride_x, const T* __restrict__ y, int64_t stride_y,
                  const uint8_t* __restrict__ mask, int64_t stride_mask,
                  const acc_t<T>* __restrict__ sp, int64_t sp0, int64_t sp1,
                  const acc_t<T>* __restrict__ sq, int64_t sq0, int64_t sq1,
                  T* __restrict__ gx, int64_t stride_gx, T* __restrict__ gy, int64_t stride_gy,
                  int64_t V, acc_t<T> inv_t, JsdConst c) {
  using A = acc_t<T>;
  constexpr int N = Chunk<T>::N;
  const int64_t row = blockIdx.x;
  T* gxr = gx + row * stride_gx;
  T* gyr = kNeedW ? gy + row * stride_gy : nullptr;
  const A g = (mask != nullptr && mask[row * stride_mask] != 0) ? A(0)
                                                                 : grad[row * stride_g] * inv_t;
  if (g == A(0)) {
    zero_row(gxr, static_cast<int>(V));
    if (kNeedW) zero_row(gyr, static_cast<int>(V));
    return;
  }
  const T* xr = x + row * stride_x;
  const T* yr = y + row * stride_y;
  const A ls_p = sp[row * sp0 + sp1], sum_p = sp[row * sp0 + 2 * sp1];
  const A ls_q = sq[row * sq0 + sq1], sum_q = sq[row * sq0 + 2 * sq1];
  const ProbOf<A> pp = prob_of(inv_t, shift_of(sp[row * sp0]), ls_p);
  const ProbOf<A> pq = prob_of(inv_t, shift_of(sq[row * sq0]), ls_q);
  const A beta = A(c.beta), omb = A(c.omb), lb = A(c.log_beta), l1b = A(c.log_omb);
  [[maybe_unused]] const A bl = beta * A(Unit<A>::ln_base), obl = omb * A(Unit<A>::ln_base);
  const bool agx = aligned16(gxr), agy = kNeedW && aligned16(gyr);
  [[maybe_unused]] const A dsum = sum_p + sum_q;  // alpha: D
  // alpha: g folded into the constants (g / a, g / (1 - a), g a D, g (1 - a) D): the column
  // writes fma(gap, g / c, -g c' D f) with no trailing g * (one mul less per output)
  [[maybe_unused]] const A ia = g * A(1.0 / c.beta), ioma = g * A(1.0 / c.omb);
  [[maybe_unused]] const A bd = g * (beta * dsum), od = g * (omb * dsum);
  [[maybe_unused]] const A omb_ln = A(c.omb * Unit<A>::ln_base);
  [[maybe_unused]] const A mb_ln = A(-c.beta * Unit<A>::ln_base);
  // alpha, fp32: the near-reference columns' polynomials (AlphaNear) and their bound on |d|
  [[maybe_unused]] AlphaNear near_p, near_q;
  [[maybe_unused]] float near_d = 0.0f;
  if constexpr (kKind == kAlpha && std::is_same_v<A, float>) {
    const float gl = g * float(Unit<A>::ln_base);
    near_p = alpha_near_coef(-gl, bd, omb_ln);
    if (kNeedW) near_q = alpha_near_coef(gl, od, mb_ln);
    near_d = float(1.0 / (fmax(c.beta, c.omb) * Unit<A>::ln_base));
  }
  for_each_chunk2(xr, yr, static_cast<int>(V), [&](int ci, const Chunk<T>& a, const Chunk<T>& b) {
    A dzs[N], dws[N];
    // alpha, fp32: a chunk whose columns are all near-reference (|d| <= near_d, the usual
    // chunk of a policy near its reference) takes one branch for the chunk and no branch
    // per column: p, q and the row polynomials (AlphaNear); any other chunk the general
    // loop below (per column near or alpha_side)
    bool near_all = false;
    [[maybe_unused]] A lps[N], lqs[N];
    if constexpr (kKind == kAlpha && std::is_same_v<A, float>) {
      near_all = true;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        lps[k] = fma(pp.zs(a.v[k]), pp.unit, -pp.lsu);
        lqs[k] = fma(pq.zs(b.v[k]), pq.unit, -pq.lsu);
        near_all &= fabsf(lqs[k] - lps[k]) <= near_d;  // false for NaN / inf d
      }
    }
    if (near_all) {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A d = lqs[k] - lps[k];
        dzs[k] = uexp(lps[k]) * alpha_near(d, near_p);
        dws[k] = kNeedW ? uexp(lqs[k]) * alpha_near(d, near_q) : A(0);
      }
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const A zp = pp.zs(a.v[k]), zq = pq.zs(b.v[k]);
        A dz, dw;
        if constexpr (kKind == kTv) {
          const A p = pp.p(zp), q = pq.p(zq);
          const A sg = A(p > q) - A(p < q);
          dz = p * fma(A(0.5), sg, -sum_p);
          dw = q * fma(A(-0.5), sg, -sum_q);
        } else if constexpr (kKind == kAlpha) {
          const A lp = fma(zp, pp.unit, -pp.lsu), lq = fma(zq, pq.unit, -pq.lsu);
          const A d = lq - lp;  // uexp units; xp = (1 - a) d ln_base, xq = -a d ln_base
          const A p = uexp(lp);
          if constexpr (std::is_same_v<A, float>) {
            // near-reference columns (the common ones when the policy is near its reference):
            // both sides by their row polynomial in d, no r; the others as alpha_side. NaN / inf
            // d (a -inf column) fails the test and takes alpha_side.
            if (fabsf(d) <= near_d) {
              dz = p * alpha_near(d, near_p);
              dw = kNeedW ? uexp(lq) * alpha_near(d, near_q) : A(0);
            } else {
              const A r = uexp(fma(beta, lp, omb * lq));
              dz = alpha_side(p, r, d * omb_ln, ioma, bd);
              dw = kNeedW ? alpha_side(uexp(lq), r, d * mb_ln, ia, od) : A(0);
            }
          } else if constexpr (kNeedW) {
            const A r = uexp(fma(beta, lp, omb * lq));
            // unscaled constants and g applied last, as before: fp64's register allocation
            const A q = uexp(lq);
            A gp, gq;
            alpha_gaps(p, q, r, d, omb, beta, gp, gq);
            dz = g * fma(gp, A(1.0 / c.omb), -beta * dsum * p);
            dw = g * fma(gq, A(1.0 / c.beta), -omb * dsum * q);
          } else {
            const A r = uexp(fma(beta, lp, omb * lq));
            dz = alpha_side(p, r, d * omb_ln, ioma, bd);
            dw = A(0);
          }
        } else if constexpr (kKind == kJsd && std::is_same_v<A, float>) {
          // as the forward's second pass, in log2 units: dz = p (beta ln2 (l_p - l_m) - sum_p)
          const A lp = fma(zp, pp.unit, -pp.lsu), lq = fma(zq, pq.unit, -pq.lsu);
          const A p = uexp(lp), q = uexp(lq);
          const A lm = ulog2(fma(beta, p, omb * q));
          dz = p * fma(bl, vmax(lp - lm, lowest<A>()), -sum_p);
          dw = q * fma(obl, vmax(lq - lm, lowest<A>()), -sum_q);
        } else if constexpr (kKind == kJsd) {
          A pa, qa, p, q;
          kl_column<kKind>(zp - ls_p, zq - ls_q, beta, omb, lb, l1b, pa, qa, p, q);
          dz = pa - p * sum_p;
          dw = qa - q * sum_q;
        } else {
          const A p = pp.p(zp), q = pq.p(zq);
          // log p - log q, finite wherever the factor in front is nonzero (else its 0 wins)
          const A lr = (zp - ls_p) - (zq - ls_q);
          if constexpr (kKind == kReverse) {
            dz = xmul0(p, lr - sum_p);
            dw = q - p;
          } else {
            dz = p - q;
            dw = xmul0(q, -lr - sum_q);
          }
        }
        dzs[k] = kKind == kAlpha ? dz : g * dz;  // alpha: g already in
        dws[k] = kKind == kAlpha ? dw : g * dw;
      }
    }
    store_chunk(gxr, ci, static_cast<int>(V), agx, dzs);
    if (kNeedW) store_chunk(gyr, ci, static_cast<int>(V), agy, dws);
  });
}

}  // namespace

// ------------------------------------------------------------------------------ launchers

void token_logprobs_forward(Rows logits, Rows tokens, std::uintptr_t logp, std::uintptr_t ent,
                            std::uintptr_t stats, int64_t n, int64_t vocab, int dtype,
                            double inv_temperature, int64_t ignore_index, bool with_entropy,
                            std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "token_logprobs_forward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "token_logprobs_forward: vocab must be in [1, 2**31 - 1), got " +
                                std::to_string(vocab));
  dispatch_logits(dtype, "token_logprobs_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits.ptr != 0 && logp != 0 && ent != 0 && stats != 0,
                  "token_logprobs_forward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const T* x = as_cptr<T>(logits.ptr);
    const int64_t stride_x = logits.stride, stride_tok = tokens.stride;
    const int64_t* tk = as_cptr<int64_t>(tokens.ptr);
    A* lp = as_ptr<A>(logp);
    A* en = as_ptr<A>(ent);
    A* st = as_ptr<A>(stats);
    const A it = static_cast<A>(inv_temperature);
    const A sc = static_cast<A>(scale_of(dtype, inv_temperature));
    const dim3 grid(static_cast<unsigned>(n));
    if (tokens.ptr != 0) {
      if (with_entropy)
        token_logprobs_fwd_kernel<T, true, true><<<grid, threads, 0, s>>>(
            x, stride_x, tk, stride_tok, lp, en, st, vocab, it, sc, ignore_index);
      else
        token_logprobs_fwd_kernel<T, false, true><<<grid, threads, 0, s>>>(
            x, stride_x, tk, stride_tok, lp, en, st, vocab, it, sc, ignore_index);
    } else {
      if (with_entropy)
        token_logprobs_fwd_kernel<T, true, false><<<grid, threads, 0, s>>>(
            x, stride_x, nullptr, 0, lp, en, st, vocab, it, sc, ignore_index);
      else
        token_logprobs_fwd_kernel<T, false, false><<<grid, threads, 0, s>>>(
            x, stride_x, nullptr, 0, lp, en, st, vocab, it, sc, ignore_index);
    }
    RLK_CHECK_LAUNCH();
  });
}

void token_logprobs_backward(Rows grad_logp, Rows grad_entropy, Rows logits, Rows tokens,
                             Matrix stats, Rows out, int64_t n, int64_t vocab, int dtype,
                             double inv_temperature, int64_t ignore_index,
                             std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "token_logprobs_backward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "token_logprobs_backward: vocab must be in [1, 2**31 - 1), got " +
                                std::to_string(vocab));
  RLK_CHECK_ARG(grad_logp.ptr == 0 || tokens.ptr != 0,
                "token_logprobs_backward: grad_logp needs tokens");
  dispatch_logits(dtype, "token_logprobs_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits.ptr != 0 && stats.ptr != 0 && out.ptr != 0,
                  "token_logprobs_backward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const A* glp = as_cptr<A>(grad_logp.ptr);
    const A* gh = as_cptr<A>(grad_entropy.ptr);
    const T* x = as_cptr<T>(logits.ptr);
    const int64_t* tk = as_cptr<int64_t>(tokens.ptr);
    const A* st = as_cptr<A>(stats.ptr);
    T* o = as_ptr<T>(out.ptr);
    const A it = static_cast<A>(inv_temperature);
    const bool has_tok = tokens.ptr != 0;
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_TLP_BWD(GLP, GH)                                                                 \
  token_logprobs_bwd_kernel<T, GLP, GH><<<grid, threads, 0, s>>>(                            \
      glp, grad_logp.stride, gh, grad_entropy.stride, x, logits.stride, tk, tokens.stride,    \
      has_tok, st, stats.stride0, stats.stride1, o, out.stride, vocab, it, ignore_index)
    if (glp != nullptr && gh != nullptr) RLK_TLP_BWD(true, true);
    else if (glp != nullptr) RLK_TLP_BWD(true, false);
    else if (gh != nullptr) RLK_TLP_BWD(false, true);
    else RLK_TLP_BWD(false, false);
#undef RLK_TLP_BWD
    RLK_CHECK_LAUNCH();
  });
}

void kl_divergence_forward(Rows logits, Rows ref_logits, Rows ignore_mask, std::uintptr_t kl,
                           std::uintptr_t stats_p, std::uintptr_t stats_q, int64_t n,
                           int64_t vocab, int dtype, int kind, double beta,
                           double inv_temperature, std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "kl_divergence_forward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "kl_divergence_forward: vocab must be in [1, 2**31 - 1), got " +
                                std::to_string(vocab));
  RLK_CHECK_ARG(kind >= 0 && kind <= 4, "kl_divergence_forward: kind code must be 0 (reverse), "
                                        "1 (forward), 2 (jsd), 3 (alpha) or 4 (tv), got " +
                                            std::to_string(kind));
  RLK_CHECK_ARG(kind != kAlpha || (beta > 0 && beta < 1),
                "kl_divergence_forward: alpha (passed as beta) must lie strictly inside (0, 1) "
                "(0 and 1 are the kinds forward and reverse), got " + std::to_string(beta));
  const JsdConst c{beta, 1.0 - beta, beta > 0 ? std::log(beta) : -INFINITY,
                   beta < 1 ? std::log(1.0 - beta) : -INFINITY};
  dispatch_logits(dtype, "kl_divergence_forward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(logits.ptr != 0 && ref_logits.ptr != 0 && kl != 0 && stats_p != 0 &&
                      stats_q != 0,
                  "kl_divergence_forward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_KL_FWD(KIND)                                                                      \
  kl_fwd_kernel<T, KIND><<<grid, threads, 0, s>>>(                                            \
      as_cptr<T>(logits.ptr), logits.stride, as_cptr<T>(ref_logits.ptr), ref_logits.stride,   \
      as_cptr<uint8_t>(ignore_mask.ptr), ignore_mask.stride, as_ptr<A>(kl), as_ptr<A>(stats_p), \
      as_ptr<A>(stats_q), vocab, static_cast<A>(inv_temperature),                           \
      static_cast<A>(scale_of(dtype, inv_temperature)), c)
    if (kind == kReverse) RLK_KL_FWD(kReverse);
    else if (kind == kForward) RLK_KL_FWD(kForward);
    else if (kind == kJsd) RLK_KL_FWD(kJsd);
    else if (kind == kAlpha) RLK_KL_FWD(kAlpha);
    else RLK_KL_FWD(kTv);
#undef RLK_KL_FWD
    RLK_CHECK_LAUNCH();
  });
}

void kl_divergence_backward(Rows grad_kl, Rows logits, Rows ref_logits, Rows ignore_mask,
                            Matrix stats_p, Matrix stats_q, Rows grad_logits, Rows grad_ref,
                            int64_t n, int64_t vocab, int dtype, int kind, double beta,
                            double inv_temperature, std::uintptr_t stream) {
  RLK_CHECK_ARG(n >= 0 && n <= 0x7fffffffLL,
                "kl_divergence_backward: n must be in [0, 2**31), got " + std::to_string(n));
  RLK_CHECK_ARG(vocab >= 1 && vocab < 0x7fffffffLL,
                "kl_divergence_backward: vocab must be in [1, 2**31 - 1), got " +
                                std::to_string(vocab));
  RLK_CHECK_ARG(kind >= 0 && kind <= 4, "kl_divergence_backward: kind code must be 0 "
                                        "(reverse), 1 (forward), 2 (jsd), 3 (alpha) or 4 (tv), "
                                        "got " + std::to_string(kind));
  RLK_CHECK_ARG(kind != kAlpha || (beta > 0 && beta < 1),
                "kl_divergence_backward: alpha (passed as beta) must lie strictly inside (0, 1) "
                "(0 and 1 are the kinds forward and reverse), got " + std::to_string(beta));
  const JsdConst c{beta, 1.0 - beta, beta > 0 ? std::log(beta) : -INFINITY,
                   beta < 1 ? std::log(1.0 - beta) : -INFINITY};
  dispatch_logits(dtype, "kl_divergence_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    if (n == 0) return;
    RLK_CHECK_ARG(grad_kl.ptr != 0 && logits.ptr != 0 && ref_logits.ptr != 0 &&
                      stats_p.ptr != 0 && stats_q.ptr != 0 && grad_logits.ptr != 0,
                  "kl_divergence_backward: null device pointer");
    const int threads = row_threads(vocab, VecWidth<T>::value, max_threads<T>());
    const cudaStream_t s = checked_stream(stream);
    const dim3 grid(static_cast<unsigned>(n));
#define RLK_KL_BWD(KIND, NEED_W)                                                              \
  kl_bwd_kernel<T, KIND, NEED_W><<<grid, threads, 0, s>>>(                                    \
      as_cptr<A>(grad_kl.ptr), grad_kl.stride, as_cptr<T>(logits.ptr), logits.stride,         \
      as_cptr<T>(ref_logits.ptr), ref_logits.stride, as_cptr<uint8_t>(ignore_mask.ptr),       \
      ignore_mask.stride, as_cptr<A>(stats_p.ptr), stats_p.stride0, stats_p.stride1,          \
      as_cptr<A>(stats_q.ptr), stats_q.stride0, stats_q.stride1, as_ptr<T>(grad_logits.ptr),  \
      grad_logits.stride, as_ptr<T>(grad_ref.ptr), grad_ref.stride, vocab,                    \
      static_cast<A>(inv_temperature), c)
    const bool need_w = grad_ref.ptr != 0;
#define RLK_KL_BWD_W(KIND)                                                                    \
  do {                                                                                        \
    if (need_w) RLK_KL_BWD(KIND, true);                                                       \
    else RLK_KL_BWD(KIND, false);                                                             \
  } while (0)
    if (kind == kReverse) RLK_KL_BWD_W(kReverse);
    else if (kind == kForward) RLK_KL_BWD_W(kForward);
    else if (kind == kJsd) RLK_KL_BWD_W(kJsd);
    else if (kind == kAlpha) RLK_KL_BWD_W(kAlpha);
    else RLK_KL_BWD_W(kTv);
#undef RLK_KL_BWD_W
#undef RLK_KL_BWD
    RLK_CHECK_LAUNCH();
  });
}

}  // namespace rlk
