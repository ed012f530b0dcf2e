// Host-side API of rlkernels._C: plain C++ declarations (no CUDA headers), so bindings.cpp
// compiles with the host compiler alone. Pointers and streams travel as std::uintptr_t.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace rlk {

// ---- runtime.cu: build and runtime information -------------------------------------------
std::string version();        // package version the extension was built from ("0.1.0")
int cuda_runtime_version();   // CUDA runtime linked in (static), e.g. 13000 for 13.0
int cuda_driver_version();    // CUDA version the installed driver supports; 0 without a driver
int device_count();           // CUDA devices usable by this runtime; 0 (no exception) if none
std::string cuda_archs();     // CMAKE_CUDA_ARCHITECTURES of the build, e.g. "80,90a"
std::string nvcc_version();   // version of the nvcc that compiled the kernels

// ---- tensor views -------------------------------------------------------------------------
// A device tensor reaches a launcher as its address (0 = absent, where noted) and its strides
// in elements. bindings.cpp exports both as Python classes with these field names.
// Rows: rows of unit column stride (logits [n, vocab], a gradient [n, vocab]) or a vector
// [n] (rows of one element): row i starts at ptr + i * stride.
struct Rows {
  std::uintptr_t ptr = 0;
  int64_t stride = 0;
};
// Matrix: any [rows, cols] view; element (i, j) at ptr + i * stride0 + j * stride1.
struct Matrix {
  std::uintptr_t ptr = 0;
  int64_t stride0 = 0, stride1 = 0;
};

// ---- option codes --------------------------------------------------------------------------
// The integer each string option reaches the kernels as. Same numbers as rlkernels/_codes.py
// (the Triton kernels use that table); bindings.cpp exports these as rlkernels._C.CODES and
// tests/cuda/test_codes.py checks that the two agree.

// Storage dtype of the tensors a kernel reads.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
// kl_divergence: KL(p || q), KL(q || p), generalized Jensen-Shannon with weight beta, the
// alpha-divergence (alpha passed as beta, in (0, 1)), total variation.
enum KlKind : int { kReverse = 0, kForward = 1, kJsd = 2, kAlpha = 3, kTv = 4 };
// sparse_logprobs normalize="full" / "support", and sparse_kl.
enum SparseMode : int { kSparseFull = 0, kSparseSupport = 1, kSparseKl = 2 };
// policy_loss options.
// "luspo" is an alias of ppo (Python side only).
enum PolicyLoss : int {
  kPpo = 0, kCispo = 1, kReinforce = 2, kSapo = 3, kGmpo = 4, kClipCov = 5, kKlCov = 6,
  kDppoTv = 7, kDppoKl = 8, kDro = 9, kVespo = 10
};
enum RatioLevel : int { kTokenLevel = 0, kSequenceLevel = 1 };
enum Agg : int {
  kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3
};
// "low_var_kl" is an alias of k3 (Python side only). k3+ has the value of k3 and the gradient
// of k2, so it needs its own code wherever a gradient is computed. k3_is / k3_is_sg: r * k3
// (policy_loss; the ratio differentiable / detached).
enum KlEstimator : int {
  kKlK1 = 0, kKlAbs = 1, kKlK2 = 2, kKlK3 = 3, kKlK3Plus = 4, kKlK3Is = 5, kKlK3IsSg = 6
};
// group_advantages(method=...).
enum AdvantageMethod : int {
  kGrpo = 0, kDrGrpo = 1, kRloo = 2, kBatchStd = 3, kOpo = 4, kGpg = 5, kGrpoPassk = 6,
  kRppBaseline = 7, kGdpo = 8
};

// rollout_correction(level=..., mode=..., reject=...). A reject code is a bit position of
// the `reject` mask the kernel takes.
enum RolloutLevel : int { kRolloutToken = 0, kRolloutSequence = 1, kRolloutGeometric = 2 };
enum RolloutMode : int { kRolloutTruncate = 0, kRolloutMask = 1 };
enum RolloutReject : int {
  kRejectTokenK1 = 0, kRejectTokenK2 = 1, kRejectTokenK3 = 2,
  kRejectSeqSumK1 = 3, kRejectSeqSumK2 = 4, kRejectSeqSumK3 = 5,
  kRejectSeqMeanK1 = 6, kRejectSeqMeanK2 = 7, kRejectSeqMeanK3 = 8,
  kRejectSeqMaxK2 = 9, kRejectSeqMaxK3 = 10, kRejectOpsm = 11
};

// ---- vocab.cu: ops on logits [n, vocab] ---------------------------------------------------
// Common conventions: n < 2**31 rows, 1 <= vocab < 2**31 - 1; `dtype` is the logits' code;
// per-row outputs, stats and upstream gradients are in the accumulation type (fp64 for fp64
// logits, else fp32); tokens are int64; stats outputs are contiguous [n, 3]; gradients have
// the logits' dtype. A view or pointer of 0 means "absent" where noted.

// logp[n], ent[n], stats[n, 3] = (max z, log1p(rest), sum p (z - m) or 0); z = x * inv_t.
// tokens absent: entropy only (logp written 0). with_entropy == false: ent, stats[:, 2] = 0.
void token_logprobs_forward(Rows logits, Rows tokens, std::uintptr_t logp, std::uintptr_t ent,
                            std::uintptr_t stats, int64_t n, int64_t vocab, int dtype,
                            double inv_temperature, int64_t ignore_index, bool with_entropy,
                            std::uintptr_t stream);

// out[n, vocab] (may be logits itself: an in-place backward) = d(sum g_lp logp + g_h H) /
// d logits. grad_logp / grad_entropy [n] may be absent; grad_logp needs tokens.
void token_logprobs_backward(Rows grad_logp, Rows grad_entropy, Rows logits, Rows tokens,
                             Matrix stats, Rows out, int64_t n, int64_t vocab, int dtype,
                             double inv_temperature, int64_t ignore_index,
                             std::uintptr_t stream);

// kl[n], stats_p, stats_q [n, 3] of rows p = softmax(logits), q = softmax(ref_logits) for
// kind (KlKind) with the jsd weight beta (kind alpha: beta carries alpha, in (0, 1)).
// ignore_mask: uint8 [n] (non-zero: row skipped) or absent.
void kl_divergence_forward(Rows logits, Rows ref_logits, Rows ignore_mask, std::uintptr_t kl,
                           std::uintptr_t stats_p, std::uintptr_t stats_q, int64_t n,
                           int64_t vocab, int dtype, int kind, double beta,
                           double inv_temperature, std::uintptr_t stream);

// grad_logits, grad_ref [n, vocab] from grad_kl [n] and the forward's stats; grad_ref absent:
// no gradient for ref_logits.
void kl_divergence_backward(Rows grad_kl, Rows logits, Rows ref_logits, Rows ignore_mask,
                            Matrix stats_p, Matrix stats_q, Rows grad_logits, Rows grad_ref,
                            int64_t n, int64_t vocab, int dtype, int kind, double beta,
                            double inv_temperature, std::uintptr_t stream);

// ---- sparse.cu: ops on logits [n, vocab] at k given ids per row ---------------------------
// Conventions of vocab.cu. sparse_logprobs (mode kSparseFull or kSparseSupport) and sparse_kl
// (mode kSparseKl); indices: int64 [n, k] (-1 = unused slot). Forward: out = log-probs [n, k]
// or kl [n] (out.stride ignored); tail [n] (0 unless with_tail); stats [n, 3] =
// (m, log1p(rest), 0); target: teacher log-probs [n, k] (kl only, accumulation type);
// carry: a 64-byte-per-row device workspace, needed with with_tail when vocab > 262144 (one
// launch per 262144 columns, the row states carried between them), else 0.
// offsets (0 = the padded form above): a CSR support, int64 [n + 1] (any first value: a view
// of a larger CSR), row r's ids at flat positions offsets[r] .. offsets[r + 1] of indices
// [nnz] (indices.stride1; stride0 unused, k = nnz), target [nnz] (target.stride1), out [nnz]
// contiguous at the same positions (others untouched).
void sparse_forward(Rows logits, Matrix indices, Matrix target, Rows out, std::uintptr_t tail,
                    std::uintptr_t stats, int64_t n, int64_t vocab, int64_t k, int dtype,
                    int mode, bool with_tail, double inv_temperature, std::uintptr_t carry,
                    std::uintptr_t offsets, std::uintptr_t stream);

// Backward: grad [n, vocab] (logits' dtype). sorted_ids / perm: int32 contiguous [n, k], each
// row's ids sorted stably (unused and out-of-range ids as 2**31 - 1) and their slots.
// slot_values [n, k]: grad_logp (full, support; absent = no log-prob gradient) or the
// targets (kl); logp: the forward's log-probs (support); tail: the forward's tail; grad_tail
// (full, support with with_tail) and grad_kl (kl): [n] in the accumulation type.
// offsets: as the forward's; then indices, slot_values, logp are [nnz] (their stride1) and
// sorted_ids / perm int32 [nnz] contiguous: each row's positions sorted (stable) by id, perm
// the slot within the row (position - offsets[r]).
void sparse_backward(Rows logits, Rows grad, Matrix indices, std::uintptr_t sorted_ids,
                     std::uintptr_t perm, Matrix slot_values, Matrix logp, std::uintptr_t tail,
                     std::uintptr_t grad_tail, std::uintptr_t grad_kl, Matrix stats, int64_t n,
                     int64_t vocab, int64_t k, int dtype, int mode, bool with_tail,
                     double inv_temperature, std::uintptr_t offsets, std::uintptr_t stream);

// ---- linear.cu: the fused lm_head ops' cuBLAS path (rlkernels/cuda/linear.py) -----------
// d z of one vocabulary slice of a chunk of logits: logits [n_rows, cols] (accumulation type,
// dtype 0 or 3: the fp32 / fp64 GEMM output, bias included, columns v0 .. v0 + cols of the
// vocabulary), tokens int64 [n_rows], stats [n_rows, 3] (token_logprobs_forward's),
// grad_logp / grad_entropy [n_rows] (accumulation type; absent = no such term). Writes
// dz [n_rows, cols] (unit column stride; dz_dtype 0 float32, 2 bfloat16, 3 float64 for
// float64 logits); rows >= n_live, padding rows (ignore_index) and rows whose gradients are
// both 0 get zeros. bias_partials (absent: none): row b = the column sums of d z over rows
// [b * rows_per_block, (b + 1) * rows_per_block), accumulation type.
void linear_dz(Rows logits, Rows grad_logp, Rows grad_entropy, Rows tokens, Matrix stats,
               Rows dz, Rows bias_partials, int64_t n_rows, int64_t n_live, int64_t cols,
               int64_t v0, int64_t rows_per_block, int dtype, int dz_dtype,
               double inv_temperature, int64_t ignore_index, std::uintptr_t stream);

// ---- advantage.cu -------------------------------------------------------------------------
// out[b] (accumulation type) = advantages of rewards [b] (any float dtype).
// Contiguous groups: perm = starts = 0, slots = b / group_size. group_index path: perm [b]
// (stable sort of the ids), starts [slots + 1] (first sorted position of each slot, b past
// the last group). method: AdvantageMethod (kBatchStd needs a workspace of one element of
// the accumulation type).
void group_advantages_forward(Rows rewards, std::uintptr_t perm, std::uintptr_t starts,
                              std::uintptr_t out, std::uintptr_t workspace, int64_t b,
                              int64_t group_size, int64_t slots, int dtype, int method,
                              bool unbiased, double eps, std::uintptr_t stream);

// verl's other group estimators, method kOpo..kGdpo: rewards [b, k] (k reward components,
// k = 1 but for kGdpo; dtype code `dtype`, any strides), mask uint8 [b, t] (non-zero = valid
// token; read by kOpo, kRppBaseline, kGdpo), weights [k] (kGdpo) and out [b] in the
// accumulation type; perm / starts / group_size / slots as for group_advantages_forward.
// workspace (accumulation type): 1 element for kGpg, 3 * b for kRppBaseline and kGdpo.
void group_estimators_forward(Matrix rewards, std::uintptr_t perm, std::uintptr_t starts,
                              Matrix mask, std::uintptr_t weights, std::uintptr_t out,
                              std::uintptr_t workspace, int64_t b, int64_t k, int64_t t,
                              int64_t group_size, int64_t slots, int dtype, int method,
                              bool unbiased, bool norm_by_std, double eps, double whiten_eps,
                              std::uintptr_t stream);

// Reverse scans over [b, t] (rewards, values: dtype code `dtype`, any (row, step) strides;
// mask: uint8, non-zero = valid, any strides). Outputs contiguous [b, t] in the accumulation
// type, exactly 0 at masked steps. gae: advantages and returns (advantages + values).
void gae_forward(Matrix rewards, Matrix values, Matrix mask, std::uintptr_t advantages,
                 std::uintptr_t returns, int64_t b, int64_t t, int dtype, double gamma,
                 double lam, std::uintptr_t stream);

void discounted_returns_forward(Matrix rewards, Matrix mask, std::uintptr_t out, int64_t b,
                                int64_t t, int dtype, double gamma, std::uintptr_t stream);

// discounted_returns with advantages (ReMax / REINFORCE++): returns as above, advantages
// [b, t] = G - baseline[row] (baseline: b elements in the accumulation type, or 0) at valid
// steps, 0 at masked ones; whiten: then whitened over the valid steps of the batch
// (workspace: 3 * b elements of the accumulation type). Two launches with whiten, else one.
void discounted_advantages_forward(Matrix rewards, Matrix mask, std::uintptr_t baseline,
                                   std::uintptr_t advantages, std::uintptr_t returns,
                                   std::uintptr_t workspace, int64_t b, int64_t t, int dtype,
                                   double gamma, bool whiten, double whiten_eps, bool unbiased,
                                   std::uintptr_t stream);

// masked_whiten over n contiguous values (dtype code `dtype`); the mask is either uint8
// (mask_u8, weights 0/1) or weights in the accumulation type (mask_w); the other pointer is 0.
// out: n elements, stats: 4 = (count, mean, rstd, sum w (v - mean)), both in the accumulation
// type; workspace: blocks * 4 elements; blocks in [1, 1024] (a function of n only, chosen
// by the caller: determinism).
void masked_whiten_forward(std::uintptr_t values, std::uintptr_t mask_u8, std::uintptr_t mask_w,
                           std::uintptr_t out, std::uintptr_t stats, std::uintptr_t workspace,
                           int64_t n, int blocks, int dtype, bool shift_mean, double eps,
                           bool unbiased, std::uintptr_t stream);

// grad_values (values' dtype) from grad_out (accumulation type, contiguous) and the forward's
// stats; workspace: blocks * 2 elements.
void masked_whiten_backward(std::uintptr_t grad_out, std::uintptr_t values,
                            std::uintptr_t mask_u8, std::uintptr_t mask_w, std::uintptr_t stats,
                            std::uintptr_t workspace, std::uintptr_t grad_values, int64_t n,
                            int blocks, int dtype, bool shift_mean, bool unbiased,
                            std::uintptr_t stream);

// ---- policy.cu: policy_loss ----------------------------------------------------------------
// Every tensor in the compute dtype (fp32, or fp64: dtype 0 or 3), [B, T] (advantages [B]:
// stride1 = 0). Absent optional tensors: ptr 0. select: the covariance-selected tokens of
// clip_cov / kl_cov (non-zero = selected; chosen by the launcher).
struct PolicyTensors {
  Matrix logp, old_logp, adv, mask, ref_logp, entropy, is_weights;
  int64_t B = 0, T = 0;
  Matrix select;
};

// loss: PolicyLoss, seq: RatioLevel, agg: Agg, kl_estimator: KlEstimator (codes above).
// lo = 1 - clip_low (0 for cispo without its lower clamp), hi = 1 + clip_high; gmpo and dppo:
// lo = clip_low, hi = clip_high (log-ratio bounds / divergence thresholds). The loss-specific
// floats (PolicyOptions.loss_scalars): sapo (pos_a, neg_a) = (tau_pos, tau_neg); vespo
// (pos_a, neg_a, pos_b, neg_b) = (k_pos, k_neg, lambda_pos, lambda_neg); coef = kl_cov_coef
// (kl_cov), dro_beta (dro), the truncation C (dppo).
struct PolicyParams {
  int loss = 0, seq = 0, agg = 0, kl_estimator = 0;
  int has_ref = 0, has_ent = 0, has_w = 0, has_dual = 0, has_delta = 0, use_kl = 0,
      use_ent = 0;
  double lo = 0, hi = 0, dual_clip = 0, delta = 0, kl_coef = 0, entropy_coef = 0,
         log_ratio_clamp = 0;
  double pos_a = 0, neg_a = 0, pos_b = 0, neg_b = 0, coef = 0;
};

// loss (one element) and metrics (9 fp32, reference/policy.py METRICS order); partials: a
// workspace of B * 12 elements; normalizer: one element or 0.
void policy_loss_forward(const PolicyTensors& pt, const PolicyParams& pp,
                         std::uintptr_t normalizer, std::uintptr_t partials,
                         std::uintptr_t loss, std::uintptr_t metrics, int dtype,
                         std::uintptr_t stream);

// g_lp, g_ent (0 = not wanted): contiguous [B, T]; grad_loss: one element; workspace:
// 2 * B + 1 elements.
void policy_loss_backward(const PolicyTensors& pt, const PolicyParams& pp,
                          std::uintptr_t normalizer, std::uintptr_t grad_loss,
                          std::uintptr_t workspace, std::uintptr_t g_lp, std::uintptr_t g_ent,
                          int dtype, std::uintptr_t stream);

// ---- rollout.cu: rollout_correction -------------------------------------------------------
// old_logp, rollout_logp, mask (weights; 0 = masked), advantages ([B]: stride1 = 0; absent
// unless reject has kRejectOpsm): [b, t] views in the compute dtype (fp32, or fp64: dtype 0
// or 3). Outputs: weights [b, t] contiguous (compute dtype), keep [b, t] contiguous uint8
// (bool), metrics 15 fp32 (reference/rollout.py METRICS order); partials: a workspace of
// b * 17 elements. level: RolloutLevel, mode: RolloutMode, reject: bit mask of RolloutReject
// codes; lo / hi: weight bounds (0 / inf for none); reject_bounds: (lo, hi) per RolloutReject
// code, 24 values (k1 criteria in log space).
void rollout_correction_forward(Matrix old_logp, Matrix rollout_logp, Matrix mask,
                                Matrix advantages, std::uintptr_t weights, std::uintptr_t keep,
                                std::uintptr_t partials, std::uintptr_t metrics, int64_t b,
                                int64_t t, int dtype, int level, int mode, int reject,
                                double lo, double hi, double log_ratio_clamp,
                                const std::vector<double>& reject_bounds,
                                std::uintptr_t stream);

// ---- grpo.cu: grpo_loss(..., grad_in_forward=True) ----------------------------------------
// The cluster size k (1, 2, 4 or 8) with which one row of `vocab` logits of dtype code
// `dtype` fits the distributed shared memory of a thread-block cluster on the current device,
// or 0 where the one-read kernel does not run (below sm_90, an extension built without
// sm_90, vocab * sizeof(T) not a multiple of 16, a row longer than 8 slices).
int grpo_gif_plan(int64_t vocab, int dtype);
// One read of each logit: logp and entropy (into tensors.logp / tensors.entropy, [B, T]),
// stats [n, 3] (as token_logprobs_forward) and out [n, vocab] = d loss / d logits for an
// upstream gradient of 1 (out may be logits: in place). tensors.mask holds each token's
// aggregation weight (m / denom, / n_seq for seq-mean-token-mean), not the mask; params:
// token-level ppo / cispo / reinforce. Rows 16-byte aligned, vocab * sizeof(T) % 16 == 0,
// n = B * T, cluster from grpo_gif_plan.
void grpo_gif_forward(Rows logits, Rows tokens, const PolicyTensors& tensors,
                      const PolicyParams& params, std::uintptr_t stats, Rows out, int64_t n,
                      int64_t vocab, int dtype, double inv_temperature, int64_t ignore_index,
                      int cluster, std::uintptr_t stream);
// grad [n, vocab] *= g (one element in the accumulation type); nothing when g == 1.
void grpo_gif_scale(Rows grad, int64_t n, int64_t vocab, std::uintptr_t g, int dtype,
                    std::uintptr_t stream);

}  // namespace rlk
