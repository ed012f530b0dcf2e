// Policy-loss family (ops on per-token log-probs): kernels and launchers.
// Python launchers: rlkernels/cuda/policy.py. Formulas: rlkernels/reference/policy.py.
#include "common.cuh"
#include "policy_math.cuh"
#include "rlkernels.h"

namespace rlk {
namespace {

// ================================================================================ policy_loss
//
// Three steps, each deterministic (fixed reduction trees, no atomics) and batch invariant (a
// row's partial sums do not depend on the other rows):
//   forward:  policy_rows_kernel (one block per sequence: its masked sums) ->
//             policy_finalize_kernel (one block: fixed-order sums over the rows -> loss,
//             metrics);
//   backward: policy_seq_kernel (one block per sequence: token count, GSPO log-ratio) ->
//             policy_denom_kernel (one block: the denominator of the aggregation) ->
//             policy_grad_kernel (elementwise gradients).
// Inputs arrive in the compute dtype A (fp32, fp64 for fp64 logp; the launcher converts),
// with (row, column) strides; advantages [B] come with a column stride of 0.

constexpr int kRowThreads = 256;
constexpr int kFinalThreads = 1024;
constexpr int kPartials = 12;  // per-row sums, see policy_rows_kernel

// Field order of the per-row partials (fwd) and of the metrics (reference/policy.py METRICS).
enum Partial : int {
  kPLoss = 0, kPTokens, kPHigh, kPLow, kPDual, kPAkl, kPRatio, kPKl, kPEnt, kPRmax, kPRnan,
  kPSel
};

// Element (b, t) of a [B, T] view whose address is p (the view's ptr, cast once).
template <class A>
__device__ __forceinline__ A at(const A* p, int64_t b, int64_t t, const Matrix& v) {
  return p[b * v.stride0 + t * v.stride1];
}

// Sum of m * clamp(logp - old, +-clamp) over the unmasked tokens (m != 0; a select, so that
// NaN at a masked position stays out) and of m over a row, block-wide (every thread gets
// them). The GSPO sequence log-ratio is their quotient (0 for a row without valid token).
template <class A>
__device__ void row_log_ratio(const PolicyTensors& pt, const PolicyParams& pp, int64_t b,
                              bool with_log_r, A* scratch, A& seq, A& count) {
  const A* lp = reinterpret_cast<const A*>(pt.logp.ptr);
  const A* old = reinterpret_cast<const A*>(pt.old_logp.ptr);
  const A* mk = reinterpret_cast<const A*>(pt.mask.ptr);
  const A lim = A(pp.log_ratio_clamp);
  A s = A(0), c = A(0);
  for (int64_t t = threadIdx.x; t < pt.T; t += blockDim.x) {
    const A m = at(mk, b, t, pt.mask);
    if (with_log_r) {
      const A d = at(lp, b, t, pt.logp) - at(old, b, t, pt.old_logp);
      s += m != A(0) ? clamp_nan(d, -lim, lim) * m : A(0);
    }
    c += m;
  }
  s = block_sum(s, scratch);
  count = block_sum(c, scratch);
  seq = count > A(0) ? s / count : A(0);
}

// TRL's clamp of the VESPO sequence log-weight and of log is_weights: [log(1e-8), 20].
constexpr double kVespoLogLo = -18.420680743952367;
constexpr double kVespoLogHi = 20.0;

// Per sequence b, block-wide: gmpo's sequence loss -mean_m(A) exp(mean_m(c)) W (c the
// log-ratio clipped on the side of sign(A): min(log r, hi) where A > 0, max(log r, -lo) where
// A < 0, else 0; W the masked geometric mean of is_weights + 1e-10; 0 for an empty row), or
// vespo's log w = clamp(sum_m log r + sum_m clamp(log is_weights), log 1e-8, 20)
// (reference/policy.py _gmpo_factor / _vespo_phi).
template <class A>
__device__ A row_value(const PolicyTensors& pt, const PolicyParams& pp, int64_t b, A* scratch) {
  const A* lp = reinterpret_cast<const A*>(pt.logp.ptr);
  const A* old = reinterpret_cast<const A*>(pt.old_logp.ptr);
  const A* adv = reinterpret_cast<const A*>(pt.adv.ptr);
  const A* mk = reinterpret_cast<const A*>(pt.mask.ptr);
  const A* isw = reinterpret_cast<const A*>(pt.is_weights.ptr);
  const A lim = A(pp.log_ratio_clamp), lo = A(pp.lo), hi = A(pp.hi);
  const A log_lo = A(kVespoLogLo), log_hi = A(kVespoLogHi);
  const bool gmpo = pp.loss == kGmpo;
  A c = A(0), sx = A(0), sa = A(0), sw = A(0);
  for (int64_t t = threadIdx.x; t < pt.T; t += blockDim.x) {
    const A m = at(mk, b, t, pt.mask);
    const A log_r = clamp_nan(at(lp, b, t, pt.logp) - at(old, b, t, pt.old_logp), -lim, lim);
    A x = log_r;
    if (gmpo) {
      const A a = at(adv, b, t, pt.adv);
      x = a > A(0) ? min_nan(log_r, hi) : (a < A(0) ? max_nan(log_r, -lo) : A(0));
      sa += m != A(0) ? a * m : A(0);
      if (pp.has_w) {
        sw += m != A(0) ? d_log(at(isw, b, t, pt.is_weights) + A(1e-10)) * m : A(0);
      }
    } else if (pp.has_w) {
      const A lw = clamp_nan(d_log(at(isw, b, t, pt.is_weights)), log_lo, log_hi);
      sw += m != A(0) ? lw * m : A(0);
    }
    sx += m != A(0) ? x * m : A(0);
    c += m;
  }
  c = block_sum(c, scratch);
  sx = block_sum(sx, scratch);
  sa = block_sum(sa, scratch);
  sw = block_sum(sw, scratch);
  if (!gmpo) return clamp_nan(sx + sw, log_lo, log_hi);
  const A nz = c > A(0) ? c : A(1);
  A v = -(sa / nz) * d_exp(sx / nz);
  if (pp.has_w) v = v * d_exp(sw / nz);
  return c > A(0) ? v : A(0);
}

// VESPO's gamma weight exp(lam + k log w - lam w), (k, lam) by the sign of A; 0 if not finite.
template <class A>
__device__ __forceinline__ A vespo_phi(A log_w, A a, const PolicyParams& pp) {
  const bool pos = a >= A(0);
  const A k = A(pos ? pp.pos_a : pp.neg_a), lam = A(pos ? pp.pos_b : pp.neg_b);
  const A phi = d_exp(lam + k * log_w - lam * d_exp(log_w));
  return isfinite(phi) ? phi : A(0);
}

// DPPO's trust region (reference/policy.py _dppo_valid): lo, hi = clip_low, clip_high.
template <class A>
__device__ __forceinline__ bool dppo_valid(A l, A o, A a, A lo, A hi, int loss) {
  const A p = d_exp(l), p_old = d_exp(o);
  if (loss == kDppoTv) return a > A(0) ? (p - p_old <= hi) : (p - p_old >= -lo);
  const A q_old = -d_expm1(o), q = -d_expm1(l);
  const A bkl = p_old * (o - l) + q_old * d_log((q_old + A(1e-8)) / (q + A(1e-8)));
  return a > A(0) ? (bkl <= hi || p <= p_old) : (bkl <= lo || p >= p_old);
}

// SAPO's gate (4 / tau) sigmoid(tau (r - 1)) and its derivative 4 s (1 - s) w.r.t. r.
template <class A>
__device__ __forceinline__ void sapo_gate(A r, A a, const PolicyParams& pp, A& gate, A& dgate) {
  const A tau = A(a > A(0) ? pp.pos_a : pp.neg_a);
  const A s = A(1) / (A(1) + d_exp(-tau * (r - A(1))));
  gate = A(4) / (tau * (A(1) + d_exp(-tau * (r - A(1)))));
  dgate = A(4) * s * (A(1) - s);
}

// Forward partials of sequence b (reference/policy.py per_token_loss + aggregate +
// metrics_vector), with L the per-token loss:
//   log r = clamp(logp - old, +-c) (GSPO: the sequence's masked mean of it), r = exp(log r)
//   ppo:       pg = max(-A min(r, delta), -A clip(r, lo, hi)); where A < 0 with dual clip c:
//              min(pg, -c A)
//   cispo:     pg = -clip(r, lo, hi) A logp (lo = 0 for TRL's form);   reinforce: pg = -A logp
//   sapo:      pg = -(4 / tau) sigmoid(tau (r - 1)) A;   gmpo: pg = the row's value (row_value)
//   clip_cov:  ppo's pg, 0 where selected;   kl_cov: pg = -A r + coef |log r| where selected
//   dppo:      pg = -A min(r, coef) logp inside the trust region, else 0
//   dro:       pg = -A logp + coef / 2 (log r)^2;   vespo: pg = -phi(log w) A logp
//   L = pg w (not gmpo / vespo: w is in their row value) + kl_coef kl(logp - ref)
//       (k3_is, k3_is_sg: r k3) - ent_coef H
// partials[b] = (sum where(m != 0, L m), sum m, sum high m, sum low m, sum dual m,
//                sum -log r m, sum r m, sum kl m, sum H m, max over m > 0 of r, any NaN r,
//                sum selected m).
// Every masked sum selects (m != 0 ? x m : 0) rather than multiplying: NaN or inf at a masked
// position (NaN * 0 is NaN) must not reach the loss or a metric.
template <class A>
__global__ void __launch_bounds__(kRowThreads)
    policy_rows_kernel(PolicyTensors pt, PolicyParams pp, A* __restrict__ partials) {
  __shared__ A scratch[32];
  const int64_t b = blockIdx.x;
  const A* lp = reinterpret_cast<const A*>(pt.logp.ptr);
  const A* old = reinterpret_cast<const A*>(pt.old_logp.ptr);
  const A* adv = reinterpret_cast<const A*>(pt.adv.ptr);
  const A* mk = reinterpret_cast<const A*>(pt.mask.ptr);
  const A* ref = reinterpret_cast<const A*>(pt.ref_logp.ptr);
  const A* ent = reinterpret_cast<const A*>(pt.entropy.ptr);
  const A* isw = reinterpret_cast<const A*>(pt.is_weights.ptr);
  const A* sel = reinterpret_cast<const A*>(pt.select.ptr);
  const A lo = A(pp.lo), hi = A(pp.hi), lim = A(pp.log_ratio_clamp);
  const A neg_dual = A(-pp.dual_clip), delta = A(pp.delta);
  const A kl_coef = A(pp.kl_coef), ent_coef = A(pp.entropy_coef), coef = A(pp.coef);
  const bool selects = pp.loss == kClipCov || pp.loss == kKlCov;
  const bool row_weighted = pp.loss == kGmpo || pp.loss == kVespo;
  A seq = A(0), count_unused = A(0), row_val = A(0);
  if (pp.seq) row_log_ratio<A>(pt, pp, b, true, scratch, seq, count_unused);
  if (row_weighted) row_val = row_value<A>(pt, pp, b, scratch);
  A acc[kPartials];
#pragma unroll
  for (int k = 0; k < kPartials; ++k) acc[k] = A(0);
  for (int64_t t = threadIdx.x; t < pt.T; t += blockDim.x) {
    const A l = at(lp, b, t, pt.logp);
    const A a = at(adv, b, t, pt.adv);
    const A m = at(mk, b, t, pt.mask);
    const A log_r = pp.seq ? seq
                           : clamp_nan(l - at(old, b, t, pt.old_logp), -lim, lim);
    const A r = d_exp(log_r);
    bool high = false, low = false, dual = false;
    const bool selected = selects && at(sel, b, t, pt.select) != A(0);
    A pg;
    if (pp.loss == kPpo || pp.loss == kClipCov) {
      const A unclipped = pp.has_delta ? min_nan(r, delta) : r;
      pg = max_nan(-a * unclipped, -a * clamp_nan(r, lo, hi));
      high = a > A(0) && r > hi;
      low = a < A(0) && r < lo;
      if (pp.has_dual) {
        const A bound = neg_dual * a;
        dual = a < A(0) && pg > bound;
        if (a < A(0)) pg = min_nan(pg, bound);
      }
      if (selected) pg = A(0);
    } else if (pp.loss == kCispo) {  // lo = 0 unless the ratio is also clamped below
      pg = -clamp_nan(r, lo, hi) * a * l;
      high = r > hi;
      low = r < lo;
    } else if (pp.loss == kSapo) {
      A gate, dgate;
      sapo_gate(r, a, pp, gate, dgate);
      pg = -gate * a;
    } else if (pp.loss == kGmpo) {  // lo, hi: the log-ratio bounds clip_low, clip_high
      pg = row_val;
      high = a > A(0) && log_r > hi;
      low = a < A(0) && log_r < -lo;
    } else if (pp.loss == kKlCov) {
      const A abs_log_r = log_r < A(0) ? -log_r : log_r;
      pg = -a * r + (selected ? coef * abs_log_r : A(0));
    } else if (pp.loss == kDppoTv || pp.loss == kDppoKl) {
      const bool valid = dppo_valid(l, at(old, b, t, pt.old_logp), a, lo, hi, pp.loss);
      pg = valid ? -a * min_nan(r, coef) * l : A(0);
      high = a > A(0) && !valid;
      low = a <= A(0) && !valid;
      dual = valid && r > coef;
    } else if (pp.loss == kDro) {
      pg = -a * l + A(0.5) * coef * log_r * log_r;
    } else if (pp.loss == kVespo) {
      pg = -vespo_phi(row_val, a, pp) * a * l;
    } else {  // reinforce
      pg = -a * l;
    }
    if (pp.has_w && !row_weighted) pg = pg * at(isw, b, t, pt.is_weights);
    A loss = pg;
    if (pp.has_ref) {
      A kl = kl_value_rt(l - at(ref, b, t, pt.ref_logp), pp.kl_estimator);
      if (pp.kl_estimator == kKlK3Is || pp.kl_estimator == kKlK3IsSg) kl = kl * r;
      if (pp.use_kl) loss = loss + kl_coef * kl;
      acc[kPKl] += m != A(0) ? kl * m : A(0);
    }
    if (pp.has_ent) {
      const A h = at(ent, b, t, pt.entropy);
      if (pp.use_ent) loss = loss - ent_coef * h;
      acc[kPEnt] += m != A(0) ? h * m : A(0);
    }
    acc[kPLoss] += m != A(0) ? loss * m : A(0);
    acc[kPTokens] += m;
    acc[kPHigh] += A(high) * m;
    acc[kPLow] += A(low) * m;
    acc[kPDual] += A(dual) * m;
    acc[kPSel] += A(selected) * m;
    acc[kPAkl] += m != A(0) ? -log_r * m : A(0);
    acc[kPRatio] += m != A(0) ? r * m : A(0);
    const A active_r = m > A(0) ? r : A(0);
    acc[kPRmax] = acc[kPRmax] > active_r ? acc[kPRmax] : active_r;  // NaN tracked apart
    if (active_r != active_r) acc[kPRnan] = A(1);
  }
  A* out = partials + b * kPartials;
  for (int k = 0; k < kPartials; ++k) {
    A v;
    if (k == kPRmax) {
      v = block_reduce(acc[k], [](A x, A y) { return x > y ? x : y; }, A(0), scratch);
    } else if (k == kPRnan) {
      v = block_reduce(acc[k], [](A x, A y) { return x > y ? x : y; }, A(0), scratch);
    } else {
      v = block_sum(acc[k], scratch);
    }
    if (threadIdx.x == 0) out[k] = v;
  }
}

// Sums the row partials in a fixed order and writes
//   loss = total / denom, total = sum_b row_loss (seq-mean-token-mean: sum over non-empty
//   rows of row_loss / row_tokens); denom = normalizer, or sum m (token-mean), or the number
//   of non-empty rows (seq-mean-*), or T (seq-mean-token-sum-norm); 0 counts as 1;
//   metrics[9] (fp32) = masked sums / max(sum m, 1e-30), ratio_max, NaN if any active r is;
//   clipfrac counts the selected tokens too.
template <class A>
__global__ void __launch_bounds__(kFinalThreads)
    policy_finalize_kernel(const A* __restrict__ partials, int64_t B, int64_t T, int agg,
                           const A* __restrict__ normalizer, A* __restrict__ loss,
                           float* __restrict__ metrics) {
  __shared__ A scratch[32];
  A total = A(0), tokens = A(0), nonempty = A(0), rmax = A(0), rnan = A(0), sel = A(0);
  A sums[7] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0)};  // high low dual akl r kl ent
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    const A* p = partials + b * kPartials;
    const A n = p[kPTokens];
    total += agg == kSeqMeanTokenMean ? (n > A(0) ? p[kPLoss] / n : A(0)) : p[kPLoss];
    tokens += n;
    nonempty += n > A(0) ? A(1) : A(0);
    for (int k = 0; k < 7; ++k) sums[k] += p[kPHigh + k];
    rmax = rmax > p[kPRmax] ? rmax : p[kPRmax];
    rnan = rnan > p[kPRnan] ? rnan : p[kPRnan];
    sel += p[kPSel];
  }
  auto mx = [](A x, A y) { return x > y ? x : y; };
  total = block_sum(total, scratch);
  tokens = block_sum(tokens, scratch);
  nonempty = block_sum(nonempty, scratch);
  for (int k = 0; k < 7; ++k) sums[k] = block_sum(sums[k], scratch);
  rmax = block_reduce(rmax, mx, A(0), scratch);
  rnan = block_reduce(rnan, mx, A(0), scratch);
  sel = block_sum(sel, scratch);
  if (threadIdx.x != 0) return;
  A denom;
  if (normalizer != nullptr) denom = *normalizer;
  else if (agg == kTokenMean) denom = tokens;
  else if (agg == kSeqMeanTokenSumNorm) denom = A(T);
  else denom = nonempty;
  denom = denom > A(0) ? denom : A(1);
  *loss = total / denom;
  const A count = tokens > A(1e-30) ? tokens : A(1e-30);
  const A high = sums[0], low = sums[1];
  // clipfrac: also the covariance-selected tokens of clip_cov / kl_cov (disjoint)
  metrics[0] = static_cast<float>((high + low + sel) / count);
  metrics[1] = static_cast<float>(high / count);
  metrics[2] = static_cast<float>(low / count);
  for (int k = 2; k < 5; ++k) metrics[k + 1] = static_cast<float>(sums[k] / count);  // dual akl r
  metrics[6] = rnan != A(0) ? NAN : static_cast<float>(rmax);
  metrics[7] = static_cast<float>(sums[5] / count);  // kl
  metrics[8] = static_cast<float>(sums[6] / count);  // entropy
}

// Backward step 1: per sequence, (token count, GSPO log-ratio or the row value of gmpo /
// vespo) -> seqstat[b, 2].
template <class A>
__global__ void __launch_bounds__(kRowThreads)
    policy_seq_kernel(PolicyTensors pt, PolicyParams pp, A* __restrict__ seqstat) {
  __shared__ A scratch[32];
  const int64_t b = blockIdx.x;
  A seq, count;
  row_log_ratio<A>(pt, pp, b, pp.seq != 0, scratch, seq, count);
  if (pp.loss == kGmpo || pp.loss == kVespo) seq = row_value<A>(pt, pp, b, scratch);
  if (threadIdx.x == 0) {
    seqstat[b * 2] = count;
    seqstat[b * 2 + 1] = seq;
  }
}

// Backward step 2: the denominator of the aggregation (as in policy_finalize_kernel).
template <class A>
__global__ void __launch_bounds__(kFinalThreads)
    policy_denom_kernel(const A* __restrict__ seqstat, int64_t B, int64_t T, int agg,
                        const A* __restrict__ normalizer, A* __restrict__ denom_out) {
  __shared__ A scratch[32];
  A tokens = A(0), nonempty = A(0);
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) {
    tokens += seqstat[b * 2];
    nonempty += seqstat[b * 2] > A(0) ? A(1) : A(0);
  }
  tokens = block_sum(tokens, scratch);
  nonempty = block_sum(nonempty, scratch);
  if (threadIdx.x != 0) return;
  A denom;
  if (normalizer != nullptr) denom = *normalizer;
  else if (agg == kTokenMean) denom = tokens;
  else if (agg == kSeqMeanTokenSumNorm) denom = A(T);
  else denom = nonempty;
  *denom_out = denom > A(0) ? denom : A(1);
}

// Backward step 3, per token (reference/policy.py policy_loss_backward / _policy_grad):
//   c = g_loss m / denom (seq-mean-token-mean: also / the row's token count, 0 if none)
//   reinforce: g = -A;  cispo: g = -clip(r, lo, hi) A (lo = 0 for TRL's form);
//   ppo: g = dpg r dlog_r, dpg = -A on the active branch of the max (the unclipped one capped
//        by delta: 0 above delta; the clipped one: 0 outside [lo, hi]), half each on a tie;
//        with dual clip where A < 0: 0 where the bound is active, half on a tie;
//        dlog_r = 1 inside the log-ratio clamp (inclusive) and for GSPO, else 0
//   sapo: g = -A 4 s (1 - s) r dlog_r;  gmpo: g = row value [inside the clip] dlog_r;
//   clip_cov: ppo's g, 0 where selected;  kl_cov: g = (-A r + coef sign(log r) [selected])
//   dlog_r;  dppo: g = -A min(r, coef) inside the trust region;  dro: g = -A + coef log r
//   dlog_r;  vespo: g = -phi A;
//   g = g w (not gmpo / vespo) + kl_coef dkl/dlogp (k3_is: r dlog_r k3 + r (1 - exp(-d)),
//   k3_is_sg: the second term);  g_lp = c != 0 ? c g : 0;  g_ent = c != 0 ? -ent_coef c : 0.
template <class A>
__global__ void __launch_bounds__(kRowThreads)
    policy_grad_kernel(PolicyTensors pt, PolicyParams pp, const A* __restrict__ grad_loss,
                       const A* __restrict__ seqstat, const A* __restrict__ denom_ptr,
                       A* __restrict__ g_lp, A* __restrict__ g_ent) {
  const A* lp = reinterpret_cast<const A*>(pt.logp.ptr);
  const A* old = reinterpret_cast<const A*>(pt.old_logp.ptr);
  const A* adv = reinterpret_cast<const A*>(pt.adv.ptr);
  const A* mk = reinterpret_cast<const A*>(pt.mask.ptr);
  const A* ref = reinterpret_cast<const A*>(pt.ref_logp.ptr);
  const A* isw = reinterpret_cast<const A*>(pt.is_weights.ptr);
  const A* sel = reinterpret_cast<const A*>(pt.select.ptr);
  const A lo = A(pp.lo), hi = A(pp.hi), lim = A(pp.log_ratio_clamp);
  const A neg_dual = A(-pp.dual_clip), delta = A(pp.delta);
  const A kl_coef = A(pp.kl_coef), neg_ent_coef = A(-pp.entropy_coef), coef = A(pp.coef);
  const bool selects = pp.loss == kClipCov || pp.loss == kKlCov;
  const bool row_weighted = pp.loss == kGmpo || pp.loss == kVespo;
  const A denom = *denom_ptr;
  const A g_loss = *grad_loss;
  const int64_t n = pt.B * pt.T;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int64_t b = i / pt.T, t = i - b * pt.T;
    const A m = at(mk, b, t, pt.mask);
    A weight = m / denom;
    if (pp.agg == kSeqMeanTokenMean) {
      const A n_seq = seqstat[b * 2];
      weight = n_seq > A(0) ? weight / n_seq : A(0);
    }
    const A c = g_loss * weight;
    const A l = at(lp, b, t, pt.logp);
    const A a = at(adv, b, t, pt.adv);
    A log_r, dlog_r;
    if (pp.seq) {
      log_r = seqstat[b * 2 + 1];
      dlog_r = A(1);  // straight-through: sg(seq) + logp - sg(logp)
    } else {
      const A d = l - at(old, b, t, pt.old_logp);
      log_r = clamp_nan(d, -lim, lim);
      dlog_r = (d >= -lim && d <= lim) ? A(1) : A(0);
    }
    const A r = d_exp(log_r);
    const bool selected = selects && at(sel, b, t, pt.select) != A(0);
    A g;
    if (pp.loss == kReinforce) {
      g = -a;
    } else if (pp.loss == kCispo) {
      g = -clamp_nan(r, lo, hi) * a;
    } else if (pp.loss == kSapo) {
      A gate, dgate;
      sapo_gate(r, a, pp, gate, dgate);
      g = -a * dgate * r * dlog_r;
    } else if (pp.loss == kGmpo) {  // the row value times d c / d logp
      const bool inside = (a > A(0) && log_r <= hi) || (a < A(0) && log_r >= -lo);
      g = seqstat[b * 2 + 1] * A(inside) * dlog_r;
    } else if (pp.loss == kKlCov) {
      const A sign = log_r > A(0) ? A(1) : (log_r < A(0) ? A(-1) : A(0));
      g = (-a * r + (selected ? coef * sign : A(0))) * dlog_r;
    } else if (pp.loss == kDppoTv || pp.loss == kDppoKl) {
      const bool valid = dppo_valid(l, at(old, b, t, pt.old_logp), a, lo, hi, pp.loss);
      g = valid ? -a * min_nan(r, coef) : A(0);
    } else if (pp.loss == kDro) {
      g = -a + coef * log_r * dlog_r;
    } else if (pp.loss == kVespo) {
      g = -vespo_phi(seqstat[b * 2 + 1], a, pp) * a;
    } else {  // ppo, clip_cov
      const A unclipped = pp.has_delta ? min_nan(r, delta) : r;
      const A d_unclipped = pp.has_delta ? -a * A(r <= delta) : -a;
      const A d_clipped = -a * A(r >= lo && r <= hi);
      const A pg1 = -a * unclipped, pg2 = -a * clamp_nan(r, lo, hi);
      A dpg = pg1 > pg2 ? d_unclipped
                        : (pg1 < pg2 ? d_clipped : A(0.5) * (d_unclipped + d_clipped));
      if (pp.has_dual && a < A(0)) {
        const A pg = max_nan(pg1, pg2), bound = neg_dual * a;
        dpg = pg > bound ? A(0) : (pg < bound ? dpg : A(0.5) * (A(0) + dpg));
      }
      g = dpg * r * dlog_r;
      if (selected) g = A(0);
    }
    if (pp.has_w && !row_weighted) g = g * at(isw, b, t, pt.is_weights);
    if (pp.use_kl) {
      const A d_ref = l - at(ref, b, t, pt.ref_logp);
      A g_kl = kl_grad_rt(d_ref, pp.kl_estimator);
      if (pp.kl_estimator == kKlK3Is || pp.kl_estimator == kKlK3IsSg) {
        g_kl = r * g_kl;
        if (pp.kl_estimator == kKlK3Is) g_kl = g_kl + r * dlog_r * kl_value_rt(d_ref, kKlK3);
      }
      g = g + kl_coef * g_kl;
    }
    g_lp[i] = c != A(0) ? c * g : A(0);
    if (g_ent != nullptr) g_ent[i] = c != A(0) ? neg_ent_coef * c : A(0);
  }
}

void check_policy(const PolicyTensors& pt, const PolicyParams& pp, const char* op) {
  const std::string name(op);
  RLK_CHECK_ARG(pt.B >= 0 && pt.T >= 0 && pt.B <= 0x7fffffffLL,
                name + ": B must be in [0, 2**31) and T >= 0, got B=" + std::to_string(pt.B) +
                    ", T=" + std::to_string(pt.T));
  RLK_CHECK_ARG(pp.loss >= kPpo && pp.loss <= kVespo,
                name + ": loss code must be in [0, 10] (ppo ... vespo), got " +
                    std::to_string(pp.loss));
  RLK_CHECK_ARG(pp.seq == kTokenLevel || pp.seq == kSequenceLevel,
                name + ": seq (ratio level) code must be 0 (token) or 1 (sequence), got " +
                    std::to_string(pp.seq));
  RLK_CHECK_ARG(pp.agg >= kTokenMean && pp.agg <= kSeqMeanTokenSumNorm,
                name + ": agg code must be in [0, 3], got " + std::to_string(pp.agg));
  RLK_CHECK_ARG(pp.kl_estimator >= kKlK1 && pp.kl_estimator <= kKlK3IsSg,
                name + ": kl_estimator code must be in [0, 6], got " +
                    std::to_string(pp.kl_estimator));
  RLK_CHECK_ARG(pt.logp.ptr != 0 && pt.old_logp.ptr != 0 && pt.adv.ptr != 0 &&
                    pt.mask.ptr != 0,
                name + ": null device pointer");
  RLK_CHECK_ARG(!pp.has_ref || pt.ref_logp.ptr != 0, name + ": has_ref without ref_logp");
  RLK_CHECK_ARG(!pp.has_ent || pt.entropy.ptr != 0, name + ": has_ent without entropy");
  RLK_CHECK_ARG(!pp.has_w || pt.is_weights.ptr != 0, name + ": has_w without is_weights");
  RLK_CHECK_ARG((pp.loss != kClipCov && pp.loss != kKlCov) || pt.select.ptr != 0,
                name + ": clip_cov / kl_cov without the selected tokens (select)");
  RLK_CHECK_ARG(!pp.use_kl || pp.has_ref, name + ": use_kl needs ref_logp");
  RLK_CHECK_ARG(!pp.use_ent || pp.has_ent, name + ": use_ent needs entropy");
}

}  // namespace

void policy_loss_forward(const PolicyTensors& pt, const PolicyParams& pp,
                         std::uintptr_t normalizer, std::uintptr_t partials,
                         std::uintptr_t loss, std::uintptr_t metrics, int dtype,
                         std::uintptr_t stream) {
  check_policy(pt, pp, "policy_loss_forward");
  dispatch_float_double(dtype, "policy_loss_forward", [&](auto tag) {
    using A = typename decltype(tag)::type;
    RLK_CHECK_ARG(loss != 0 && metrics != 0 && (pt.B == 0 || partials != 0),
                  "policy_loss_forward: null device pointer");
    const cudaStream_t s = as_stream(stream);
    if (pt.B > 0) {
      policy_rows_kernel<A><<<static_cast<unsigned>(pt.B), kRowThreads, 0, s>>>(
          pt, pp, as_ptr<A>(partials));
      RLK_CHECK_LAUNCH();
    }
    // Also for B == 0: the loss is 0 and the metrics 0, written on the device.
    policy_finalize_kernel<A><<<1, kFinalThreads, 0, s>>>(
        as_cptr<A>(partials), pt.B, pt.T, pp.agg, as_cptr<A>(normalizer), as_ptr<A>(loss),
        as_ptr<float>(metrics));
    RLK_CHECK_LAUNCH();
  });
}

void policy_loss_backward(const PolicyTensors& pt, const PolicyParams& pp,
                          std::uintptr_t normalizer, std::uintptr_t grad_loss,
                          std::uintptr_t workspace, std::uintptr_t g_lp, std::uintptr_t g_ent,
                          int dtype, std::uintptr_t stream) {
  check_policy(pt, pp, "policy_loss_backward");
  dispatch_float_double(dtype, "policy_loss_backward", [&](auto tag) {
    using A = typename decltype(tag)::type;
    if (pt.B * pt.T == 0) return;
    RLK_CHECK_ARG(grad_loss != 0 && workspace != 0 && g_lp != 0,
                  "policy_loss_backward: null device pointer");
    const cudaStream_t s = as_stream(stream);
    // workspace: [B, 2] per-sequence (count, log-ratio), then the denominator
    A* seqstat = as_ptr<A>(workspace);
    A* denom = seqstat + 2 * pt.B;
    policy_seq_kernel<A><<<static_cast<unsigned>(pt.B), kRowThreads, 0, s>>>(pt, pp, seqstat);
    RLK_CHECK_LAUNCH();
    policy_denom_kernel<A><<<1, kFinalThreads, 0, s>>>(seqstat, pt.B, pt.T, pp.agg,
                                                       as_cptr<A>(normalizer), denom);
    RLK_CHECK_LAUNCH();
    const unsigned grid = grid_for_elementwise(pt.B * pt.T, kRowThreads);
    policy_grad_kernel<A><<<grid, kRowThreads, 0, s>>>(pt, pp, as_cptr<A>(grad_loss), seqstat,
                                                       denom, as_ptr<A>(g_lp),
                                                       as_ptr<A>(g_ent));
    RLK_CHECK_LAUNCH();
  });
}

}  // namespace rlk
