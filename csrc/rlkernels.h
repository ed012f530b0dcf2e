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

// ---- option codes --------------------------------------------------------------------------
// The integer each string option reaches the kernels as. Same numbers as rlkernels/_codes.py
// (the Triton kernels use that table); bindings.cpp exports these as rlkernels._C.CODES and
// tests/cuda/test_codes.py checks that the two agree.

// Storage dtype of the tensors a kernel reads.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
// kl_divergence: KL(p || q), KL(q || p), generalized Jensen-Shannon with weight beta.
enum KlKind : int { kReverse = 0, kForward = 1, kJsd = 2 };
// sparse_logprobs normalize="full" / "support", and sparse_kl.
enum SparseMode : int { kSparseFull = 0, kSparseSupport = 1, kSparseKl = 2 };
// policy_loss options.
enum PolicyLoss : int { kPpo = 0, kCispo = 1, kReinforce = 2 };
enum RatioLevel : int { kTokenLevel = 0, kSequenceLevel = 1 };
enum Agg : int {
  kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3
};
// "low_var_kl" is an alias of k3 (Python side only). k3+ has the value of k3 and the gradient
// of k2, so it needs its own code wherever a gradient is computed.
enum KlEstimator : int { kKlK1 = 0, kKlAbs = 1, kKlK2 = 2, kKlK3 = 3, kKlK3Plus = 4 };
// group_advantages(method=...).
enum AdvantageMethod : int { kGrpo = 0, kDrGrpo = 1, kRloo = 2, kBatchStd = 3 };

// ---- vocab.cu: ops on logits [n, vocab] ---------------------------------------------------
// Common conventions: logits rows have unit column stride and row stride `stride_x`
// (elements); `dtype` is the logits' code (0 fp32, 1 fp16, 2 bf16, 3 fp64); per-row outputs,
// stats and upstream gradients are in the accumulation type (fp64 for fp64 logits, else
// fp32); tokens are int64; stats outputs are contiguous [n, 3]; gradients have the logits'
// dtype. A pointer of 0 means "absent" where noted.

// logp[n], ent[n], stats[n, 3] = (max z, log1p(rest), sum p (z - m) or 0); z = x * inv_t.
// tokens == 0: entropy only (logp written 0). with_entropy == false: ent and stats[:, 2] = 0.
void token_logprobs_forward(std::uintptr_t logits, int64_t stride_x, std::uintptr_t tokens,
                            int64_t stride_tok, std::uintptr_t logp, std::uintptr_t ent,
                            std::uintptr_t stats, int64_t n, int64_t vocab, int dtype,
                            double inv_temperature, int64_t ignore_index, bool with_entropy,
                            std::uintptr_t stream);

// out[n, vocab] (row stride stride_out; may equal logits for an in-place backward) =
// d(sum g_lp logp + g_h H)/d logits. grad_logp / grad_entropy may be 0 (absent);
// grad_logp needs tokens.
void token_logprobs_backward(std::uintptr_t grad_logp, int64_t stride_glp,
                             std::uintptr_t grad_entropy, int64_t stride_gh,
                             std::uintptr_t logits, int64_t stride_x, std::uintptr_t tokens,
                             int64_t stride_tok, std::uintptr_t stats, int64_t stride_s0,
                             int64_t stride_s1, std::uintptr_t out, int64_t stride_out,
                             int64_t n, int64_t vocab, int dtype, double inv_temperature,
                             int64_t ignore_index, std::uintptr_t stream);

// kind: 0 reverse KL(p||q), 1 forward KL(q||p), 2 jsd(beta). ignore_mask: uint8 [n] or 0.
void kl_divergence_forward(std::uintptr_t logits, int64_t stride_x, std::uintptr_t ref_logits,
                           int64_t stride_y, std::uintptr_t ignore_mask, int64_t stride_mask,
                           std::uintptr_t kl, std::uintptr_t stats_p, std::uintptr_t stats_q,
                           int64_t n, int64_t vocab, int dtype, int kind, double beta,
                           double inv_temperature, std::uintptr_t stream);

// grad_y == 0: no gradient for ref_logits.
void kl_divergence_backward(std::uintptr_t grad_kl, int64_t stride_g, std::uintptr_t logits,
                            int64_t stride_x, std::uintptr_t ref_logits, int64_t stride_y,
                            std::uintptr_t ignore_mask, int64_t stride_mask,
                            std::uintptr_t stats_p, int64_t sp0, int64_t sp1,
                            std::uintptr_t stats_q, int64_t sq0, int64_t sq1,
                            std::uintptr_t grad_x, int64_t stride_gx, std::uintptr_t grad_y,
                            int64_t stride_gy, int64_t n, int64_t vocab, int dtype, int kind,
                            double beta, double inv_temperature, std::uintptr_t stream);

// sparse_logprobs (mode 0 full, 1 support) and sparse_kl (mode 2) over logits [n, vocab] and
// ids indices int64 [n, k] (strides si0, si1; -1 = unused slot). Forward: out = log-probs
// [n, k] (row stride so0, unit column stride) or kl [n] (so0 ignored); tail [n] (0 unless
// with_tail); stats [n, 3] = (m, log1p(rest), 0); target: teacher log-probs [n, k] (kl only,
// accumulation type, strides st0, st1).
void sparse_forward(std::uintptr_t logits, int64_t stride_x, std::uintptr_t indices, int64_t si0,
                    int64_t si1, std::uintptr_t target, int64_t st0, int64_t st1,
                    std::uintptr_t out, int64_t so0, std::uintptr_t tail, std::uintptr_t stats,
                    int64_t n, int64_t vocab, int64_t k, int dtype, int mode, bool with_tail,
                    double inv_temperature, std::uintptr_t stream);

// Backward: grad [n, vocab] (logits' dtype, row stride stride_g). sorted_ids / perm: int32
// contiguous [n, k], each row's ids sorted stably (unused and out-of-range ids as 2**31 - 1)
// and their slots. gk: grad_logp (modes 0, 1; 0 = absent) or the targets (mode 2); lp: the
// forward's log-probs (mode 1); tail: the forward's tail; grad_tail (modes 0, 1 with
// with_tail) and grad_kl (mode 2): [n] in the accumulation type.
void sparse_backward(std::uintptr_t logits, int64_t stride_x, std::uintptr_t grad,
                     int64_t stride_g, std::uintptr_t indices, int64_t si0, int64_t si1,
                     std::uintptr_t sorted_ids, std::uintptr_t perm, std::uintptr_t gk,
                     int64_t sg0, int64_t sg1, std::uintptr_t lp, int64_t sl0, int64_t sl1,
                     std::uintptr_t tail, std::uintptr_t grad_tail, std::uintptr_t grad_kl,
                     std::uintptr_t stats, int64_t ss0, int64_t ss1, int64_t n, int64_t vocab,
                     int64_t k, int dtype, int mode, bool with_tail, double inv_temperature,
                     std::uintptr_t stream);

// ---- advantage.cu -------------------------------------------------------------------------
// out[b] (accumulation type) = advantages of rewards[b] (stride `stride`, any float dtype).
// Contiguous groups: perm = starts = 0, slots = b / group_size. group_index path: perm [b]
// (stable sort of the ids), starts [slots + 1] (first sorted position of each slot, b past
// the last group). method: 0 grpo, 1 dr_grpo, 2 rloo, 3 batch_std (needs a workspace of one
// element of the accumulation type).
void group_advantages_forward(std::uintptr_t rewards, int64_t stride, std::uintptr_t perm,
                              std::uintptr_t starts, std::uintptr_t out,
                              std::uintptr_t workspace, int64_t b, int64_t group_size,
                              int64_t slots, int dtype, int method, bool unbiased, double eps,
                              std::uintptr_t stream);

// Reverse scans over [b, t] (rewards, values: dtype code `dtype`, any (row, step) strides;
// mask: uint8, non-zero = valid, any strides). Outputs contiguous [b, t] in the accumulation
// type, exactly 0 at masked steps. gae: advantages and returns (advantages + values).
void gae_forward(std::uintptr_t rewards, int64_t r_sb, int64_t r_st, std::uintptr_t values,
                 int64_t v_sb, int64_t v_st, std::uintptr_t mask, int64_t m_sb, int64_t m_st,
                 std::uintptr_t advantages, std::uintptr_t returns, int64_t b, int64_t t,
                 int dtype, double gamma, double lam, std::uintptr_t stream);

void discounted_returns_forward(std::uintptr_t rewards, int64_t r_sb, int64_t r_st,
                                std::uintptr_t mask, int64_t m_sb, int64_t m_st,
                                std::uintptr_t out, int64_t b, int64_t t, int dtype,
                                double gamma, std::uintptr_t stream);

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
// Every tensor in the compute dtype (fp32, or fp64: dtype 0 or 3), [B, T] addressed as
// p[b * sb + t * st] (advantages [B]: st = 0). Absent optional tensors: pointer 0.
struct PolicyTensors {
  std::uintptr_t logp, old_logp, adv, mask, ref_logp, entropy, is_weights;
  int64_t logp_sb, logp_st, old_sb, old_st, adv_sb, adv_st, mask_sb, mask_st;
  int64_t ref_sb, ref_st, ent_sb, ent_st, w_sb, w_st;
  int64_t B, T;
};

// loss: PolicyLoss, seq: RatioLevel, agg: Agg, kl_estimator: KlEstimator (codes above).
// lo = 1 - clip_low, hi = 1 + clip_high.
struct PolicyParams {
  int loss, seq, agg, kl_estimator;
  int has_ref, has_ent, has_w, has_dual, has_delta, use_kl, use_ent;
  double lo, hi, dual_clip, delta, kl_coef, entropy_coef, log_ratio_clamp;
};

// loss (one element) and metrics (9 fp32, reference/policy.py METRICS order); partials: a
// workspace of B * 11 elements; normalizer: one element or 0.
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

}  // namespace rlk
