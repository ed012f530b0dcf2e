// pybind11 module rlkernels._C: thin bindings over the launchers declared in rlkernels.h.
// Compiled by the host compiler alone (no CUDA or torch headers). Launchers release the GIL;
// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into
// RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <initializer_list>
#include <string>
#include <utility>

#include "rlkernels.h"

namespace py = pybind11;

namespace {

// ", ".join of the fields of a view, for __repr__.
template <class... F>
std::string fields(const char* type, F... f) {
  std::string out = std::string("_C.") + type + "(";
  const char* sep = "";
  ((out += sep + std::string(f.first) + "=" + std::to_string(f.second), sep = ", "), ...);
  return out + ")";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "rlkernels._C: hand-written CUDA kernels of rlkernels (the 'cuda' backend).\n\n"
      "Links only the CUDA runtime (statically): launchers take tensor views (Rows, Matrix:\n"
      "device address and strides in elements), sizes, dtype and option codes (CODES) and\n"
      "the cudaStream_t, every argument by name. Private API: use the launchers in\n"
      "rlkernels.cuda, which allocate outputs.";

  // ---- tensor views and the policy structs (rlkernels.h) ----
  py::class_<rlk::Rows>(m, "Rows",
                        "Rows of unit column stride, or a vector: row i at ptr + i * stride "
                        "(elements). ptr 0: absent.")
      .def(py::init<>())
      .def(py::init([](std::uintptr_t ptr, int64_t stride) { return rlk::Rows{ptr, stride}; }),
           py::arg("ptr"), py::arg("stride"))
      .def_readwrite("ptr", &rlk::Rows::ptr)
      .def_readwrite("stride", &rlk::Rows::stride)
      .def("__repr__", [](const rlk::Rows& v) {
        return fields("Rows", std::make_pair("ptr", v.ptr), std::make_pair("stride", v.stride));
      });
  py::class_<rlk::Matrix>(m, "Matrix",
                          "Any [rows, cols] view: (i, j) at ptr + i * stride0 + j * stride1 "
                          "(elements). ptr 0: absent.")
      .def(py::init<>())
      .def(py::init([](std::uintptr_t ptr, int64_t stride0, int64_t stride1) {
             return rlk::Matrix{ptr, stride0, stride1};
           }),
           py::arg("ptr"), py::arg("stride0"), py::arg("stride1"))
      .def_readwrite("ptr", &rlk::Matrix::ptr)
      .def_readwrite("stride0", &rlk::Matrix::stride0)
      .def_readwrite("stride1", &rlk::Matrix::stride1)
      .def("__repr__", [](const rlk::Matrix& v) {
        return fields("Matrix", std::make_pair("ptr", v.ptr),
                      std::make_pair("stride0", v.stride0), std::make_pair("stride1", v.stride1));
      });
  py::class_<rlk::PolicyTensors>(m, "PolicyTensors",
                                 "The [B, T] inputs of policy_loss (compute dtype; adv [B] "
                                 "with stride1 = 0).")
      .def(py::init<>())
      .def(py::init([](const rlk::Matrix& logp, const rlk::Matrix& old_logp,
                       const rlk::Matrix& adv, const rlk::Matrix& mask,
                       const rlk::Matrix& ref_logp, const rlk::Matrix& entropy,
                       const rlk::Matrix& is_weights, int64_t B, int64_t T) {
             return rlk::PolicyTensors{logp, old_logp, adv, mask, ref_logp, entropy,
                                       is_weights, B, T};
           }),
           py::arg("logp"), py::arg("old_logp"), py::arg("adv"), py::arg("mask"),
           py::arg("ref_logp"), py::arg("entropy"), py::arg("is_weights"), py::arg("B"),
           py::arg("T"))
      .def_readwrite("logp", &rlk::PolicyTensors::logp)
      .def_readwrite("old_logp", &rlk::PolicyTensors::old_logp)
      .def_readwrite("adv", &rlk::PolicyTensors::adv)
      .def_readwrite("mask", &rlk::PolicyTensors::mask)
      .def_readwrite("ref_logp", &rlk::PolicyTensors::ref_logp)
      .def_readwrite("entropy", &rlk::PolicyTensors::entropy)
      .def_readwrite("is_weights", &rlk::PolicyTensors::is_weights)
      .def_readwrite("B", &rlk::PolicyTensors::B)
      .def_readwrite("T", &rlk::PolicyTensors::T)
      .def_readwrite("select", &rlk::PolicyTensors::select);
  py::class_<rlk::PolicyParams>(m, "PolicyParams",
                                "policy_loss options as codes (CODES) and numbers; see "
                                "csrc/rlkernels.h.")
      .def(py::init<>())
      .def_readwrite("loss", &rlk::PolicyParams::loss)
      .def_readwrite("seq", &rlk::PolicyParams::seq)
      .def_readwrite("agg", &rlk::PolicyParams::agg)
      .def_readwrite("kl_estimator", &rlk::PolicyParams::kl_estimator)
      .def_readwrite("has_ref", &rlk::PolicyParams::has_ref)
      .def_readwrite("has_ent", &rlk::PolicyParams::has_ent)
      .def_readwrite("has_w", &rlk::PolicyParams::has_w)
      .def_readwrite("has_dual", &rlk::PolicyParams::has_dual)
      .def_readwrite("has_delta", &rlk::PolicyParams::has_delta)
      .def_readwrite("use_kl", &rlk::PolicyParams::use_kl)
      .def_readwrite("use_ent", &rlk::PolicyParams::use_ent)
      .def_readwrite("lo", &rlk::PolicyParams::lo)
      .def_readwrite("hi", &rlk::PolicyParams::hi)
      .def_readwrite("dual_clip", &rlk::PolicyParams::dual_clip)
      .def_readwrite("delta", &rlk::PolicyParams::delta)
      .def_readwrite("kl_coef", &rlk::PolicyParams::kl_coef)
      .def_readwrite("entropy_coef", &rlk::PolicyParams::entropy_coef)
      .def_readwrite("log_ratio_clamp", &rlk::PolicyParams::log_ratio_clamp)
      .def_readwrite("pos_a", &rlk::PolicyParams::pos_a)
      .def_readwrite("neg_a", &rlk::PolicyParams::neg_a)
      .def_readwrite("pos_b", &rlk::PolicyParams::pos_b)
      .def_readwrite("neg_b", &rlk::PolicyParams::neg_b)
      .def_readwrite("coef", &rlk::PolicyParams::coef);

  // Option codes (csrc/rlkernels.h), one dict per option: {table: {name: code}}. Same
  // numbers as rlkernels/_codes.py, which lists the Python-only aliases as well.
  auto table = [](std::initializer_list<std::pair<const char*, int>> entries) {
    py::dict d;
    for (const auto& e : entries) d[py::str(e.first)] = e.second;
    return d;
  };
  py::dict codes;
  codes["dtype"] = table({{"float32", static_cast<int>(rlk::DType::kFloat32)},
                          {"float16", static_cast<int>(rlk::DType::kFloat16)},
                          {"bfloat16", static_cast<int>(rlk::DType::kBFloat16)},
                          {"float64", static_cast<int>(rlk::DType::kFloat64)}});
  codes["kl_kind"] = table({{"reverse", rlk::kReverse}, {"forward", rlk::kForward},
                            {"jsd", rlk::kJsd}, {"alpha", rlk::kAlpha}, {"tv", rlk::kTv}});
  codes["sparse_mode"] = table({{"full", rlk::kSparseFull}, {"support", rlk::kSparseSupport},
                                {"kl", rlk::kSparseKl}});
  codes["policy_loss"] = table({{"ppo", rlk::kPpo}, {"cispo", rlk::kCispo},
                                {"reinforce", rlk::kReinforce}, {"sapo", rlk::kSapo},
                                {"gmpo", rlk::kGmpo}, {"clip_cov", rlk::kClipCov},
                                {"kl_cov", rlk::kKlCov}, {"dppo_tv", rlk::kDppoTv},
                                {"dppo_kl", rlk::kDppoKl}, {"dro", rlk::kDro},
                                {"vespo", rlk::kVespo}});
  codes["ratio_level"] = table({{"token", rlk::kTokenLevel}, {"sequence", rlk::kSequenceLevel}});
  codes["agg"] = table({{"token-mean", rlk::kTokenMean},
                        {"seq-mean-token-mean", rlk::kSeqMeanTokenMean},
                        {"seq-mean-token-sum", rlk::kSeqMeanTokenSum},
                        {"seq-mean-token-sum-norm", rlk::kSeqMeanTokenSumNorm}});
  codes["kl_estimator"] = table({{"k1", rlk::kKlK1}, {"abs", rlk::kKlAbs}, {"k2", rlk::kKlK2},
                                 {"k3", rlk::kKlK3}, {"k3+", rlk::kKlK3Plus},
                                 {"k3_is", rlk::kKlK3Is}, {"k3_is_sg", rlk::kKlK3IsSg}});
  codes["advantage_method"] = table({{"grpo", rlk::kGrpo}, {"dr_grpo", rlk::kDrGrpo},
                                     {"rloo", rlk::kRloo}, {"batch_std", rlk::kBatchStd},
                                     {"opo", rlk::kOpo}, {"gpg", rlk::kGpg},
                                     {"grpo_passk", rlk::kGrpoPassk},
                                     {"reinforce_plus_plus_baseline", rlk::kRppBaseline},
                                     {"gdpo", rlk::kGdpo}});
  codes["rollout_level"] = table({{"token", rlk::kRolloutToken},
                                  {"sequence", rlk::kRolloutSequence},
                                  {"geometric", rlk::kRolloutGeometric}});
  codes["rollout_mode"] = table({{"truncate", rlk::kRolloutTruncate},
                                 {"mask", rlk::kRolloutMask}});
  codes["rollout_reject"] = table({{"token_k1", rlk::kRejectTokenK1},
                                   {"token_k2", rlk::kRejectTokenK2},
                                   {"token_k3", rlk::kRejectTokenK3},
                                   {"seq_sum_k1", rlk::kRejectSeqSumK1},
                                   {"seq_sum_k2", rlk::kRejectSeqSumK2},
                                   {"seq_sum_k3", rlk::kRejectSeqSumK3},
                                   {"seq_mean_k1", rlk::kRejectSeqMeanK1},
                                   {"seq_mean_k2", rlk::kRejectSeqMeanK2},
                                   {"seq_mean_k3", rlk::kRejectSeqMeanK3},
                                   {"seq_max_k2", rlk::kRejectSeqMaxK2},
                                   {"seq_max_k3", rlk::kRejectSeqMaxK3},
                                   {"opsm", rlk::kRejectOpsm}});
  m.attr("CODES") = codes;

  m.def("version", &rlk::version,
        "version() -> str\n\nVersion of rlkernels this extension was built from (equals "
        "rlkernels.__version__ unless the build is stale).");
  m.def("cuda_runtime_version", &rlk::cuda_runtime_version,
        "cuda_runtime_version() -> int\n\nCUDA runtime version linked into the extension "
        "(statically), as 1000 * major + 10 * minor, e.g. 13000 for CUDA 13.0.");
  m.def("cuda_driver_version", &rlk::cuda_driver_version,
        "cuda_driver_version() -> int\n\nLatest CUDA version the installed driver supports "
        "(same encoding); 0 when no driver is installed.");
  m.def("device_count", &rlk::device_count, py::call_guard<py::gil_scoped_release>(),
        "device_count() -> int\n\nNumber of CUDA devices this extension's runtime can use. "
        "0, never an exception, without a driver or GPU or with a driver too old for the "
        "runtime.");
  m.def("cuda_archs", &rlk::cuda_archs,
        "cuda_archs() -> str\n\nCUDA architectures the kernels were compiled for, e.g. "
        "'80,90a'.");
  m.def("nvcc_version", &rlk::nvcc_version,
        "nvcc_version() -> str\n\nVersion of the nvcc that compiled the kernels.");

  // ---- vocab.cu ----
  m.def("token_logprobs_forward", &rlk::token_logprobs_forward, py::arg("logits"),
        py::arg("tokens"), py::arg("logp"), py::arg("ent"), py::arg("stats"), py::arg("n"),
        py::arg("vocab"), py::arg("dtype"), py::arg("inv_temperature"),
        py::arg("ignore_index"), py::arg("with_entropy"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Per-row log-prob of the token, entropy and stats (m, log1p rest, sum p (z - m)) of "
        "softmax(logits * inv_temperature); one block per row. tokens absent: entropy only. "
        "See csrc/rlkernels.h.");
  m.def("token_logprobs_backward", &rlk::token_logprobs_backward, py::arg("grad_logp"),
        py::arg("grad_entropy"), py::arg("logits"), py::arg("tokens"), py::arg("stats"),
        py::arg("out"), py::arg("n"), py::arg("vocab"), py::arg("dtype"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Gradient of token_logprobs / entropy w.r.t. the logits (out may be logits: in "
        "place). See csrc/rlkernels.h.");
  m.def("kl_divergence_forward", &rlk::kl_divergence_forward, py::arg("logits"),
        py::arg("ref_logits"), py::arg("ignore_mask"), py::arg("kl"), py::arg("stats_p"),
        py::arg("stats_q"), py::arg("n"), py::arg("vocab"), py::arg("dtype"), py::arg("kind"),
        py::arg("beta"), py::arg("inv_temperature"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Per-row KL (kind: CODES['kl_kind']) and both rows' stats. See csrc/rlkernels.h.");
  m.def("kl_divergence_backward", &rlk::kl_divergence_backward, py::arg("grad_kl"),
        py::arg("logits"), py::arg("ref_logits"), py::arg("ignore_mask"), py::arg("stats_p"),
        py::arg("stats_q"), py::arg("grad_logits"), py::arg("grad_ref"), py::arg("n"),
        py::arg("vocab"), py::arg("dtype"), py::arg("kind"), py::arg("beta"),
        py::arg("inv_temperature"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Gradients of kl_divergence w.r.t. logits and (grad_ref present) ref_logits.");

  // ---- sparse.cu ----
  m.def("sparse_forward", &rlk::sparse_forward, py::arg("logits"), py::arg("indices"),
        py::arg("target"), py::arg("out"), py::arg("tail"), py::arg("stats"), py::arg("n"),
        py::arg("vocab"), py::arg("k"), py::arg("dtype"), py::arg("mode"),
        py::arg("with_tail"), py::arg("inv_temperature"), py::arg("carry"), py::arg("offsets"),
        py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "sparse_logprobs / sparse_kl forward (mode: CODES['sparse_mode']), one block per row. "
        "See csrc/rlkernels.h.");
  m.def("sparse_backward", &rlk::sparse_backward, py::arg("logits"), py::arg("grad"),
        py::arg("indices"), py::arg("sorted_ids"), py::arg("perm"), py::arg("slot_values"),
        py::arg("logp"), py::arg("tail"), py::arg("grad_tail"), py::arg("grad_kl"),
        py::arg("stats"), py::arg("n"), py::arg("vocab"), py::arg("k"), py::arg("dtype"),
        py::arg("mode"), py::arg("with_tail"), py::arg("inv_temperature"), py::arg("offsets"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Gradient of sparse_logprobs / sparse_kl w.r.t. the logits. See csrc/rlkernels.h.");

  // ---- linear.cu ----
  m.def("linear_dz", &rlk::linear_dz, py::arg("logits"), py::arg("grad_logp"),
        py::arg("grad_entropy"), py::arg("tokens"), py::arg("stats"), py::arg("dz"),
        py::arg("bias_partials"), py::arg("n_rows"), py::arg("n_live"), py::arg("cols"),
        py::arg("v0"), py::arg("rows_per_block"), py::arg("dtype"), py::arg("dz_dtype"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "d z of one vocabulary slice of a chunk of logits (the fused lm_head's cuBLAS path) "
        "and its per-row-block bias partials. See csrc/rlkernels.h.");

  // ---- advantage.cu ----
  m.def("group_advantages_forward", &rlk::group_advantages_forward, py::arg("rewards"),
        py::arg("perm"), py::arg("starts"), py::arg("out"), py::arg("workspace"), py::arg("b"),
        py::arg("group_size"), py::arg("slots"), py::arg("dtype"), py::arg("method"),
        py::arg("unbiased"), py::arg("eps"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "GRPO-family advantages, one warp per group (method: CODES['advantage_method']). "
        "See csrc/rlkernels.h.");
  m.def("group_estimators_forward", &rlk::group_estimators_forward, py::arg("rewards"),
        py::arg("perm"), py::arg("starts"), py::arg("mask"), py::arg("weights"), py::arg("out"),
        py::arg("workspace"), py::arg("b"), py::arg("k"), py::arg("t"), py::arg("group_size"),
        py::arg("slots"), py::arg("dtype"), py::arg("method"), py::arg("unbiased"),
        py::arg("norm_by_std"), py::arg("eps"), py::arg("whiten_eps"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "verl's opo / gpg / grpo_passk / reinforce_plus_plus_baseline / gdpo advantages, one "
        "warp per group (+ the batch whitening). See csrc/rlkernels.h.");
  m.def("gae_forward", &rlk::gae_forward, py::arg("rewards"), py::arg("values"),
        py::arg("mask"), py::arg("advantages"), py::arg("returns"), py::arg("b"), py::arg("t"),
        py::arg("dtype"), py::arg("gamma"), py::arg("lam"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "GAE over [b, t]: one warp per row, a reverse scan in chunks. See csrc/rlkernels.h.");
  m.def("discounted_returns_forward", &rlk::discounted_returns_forward, py::arg("rewards"),
        py::arg("mask"), py::arg("out"), py::arg("b"), py::arg("t"), py::arg("dtype"),
        py::arg("gamma"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Discounted return-to-go over [b, t] (masked steps skipped). See csrc/rlkernels.h.");
  m.def("discounted_advantages_forward", &rlk::discounted_advantages_forward,
        py::arg("rewards"), py::arg("mask"), py::arg("baseline"), py::arg("advantages"),
        py::arg("returns"), py::arg("workspace"), py::arg("b"), py::arg("t"), py::arg("dtype"),
        py::arg("gamma"), py::arg("whiten"), py::arg("whiten_eps"), py::arg("unbiased"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Returns and advantages (G - baseline, optionally whitened over the batch) over "
        "[b, t]. See csrc/rlkernels.h.");
  m.def("masked_whiten_forward", &rlk::masked_whiten_forward, py::arg("values"),
        py::arg("mask_u8"), py::arg("mask_w"), py::arg("out"), py::arg("stats"),
        py::arg("workspace"), py::arg("n"), py::arg("blocks"), py::arg("dtype"),
        py::arg("shift_mean"), py::arg("eps"), py::arg("unbiased"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Masked whitening with whole-tensor statistics (two-stage deterministic sums); "
        "stats = (count, mean, rstd, sum w (v - mean)). See csrc/rlkernels.h.");
  m.def("masked_whiten_backward", &rlk::masked_whiten_backward, py::arg("grad_out"),
        py::arg("values"), py::arg("mask_u8"), py::arg("mask_w"), py::arg("stats"),
        py::arg("workspace"), py::arg("grad_values"), py::arg("n"), py::arg("blocks"),
        py::arg("dtype"), py::arg("shift_mean"), py::arg("unbiased"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Gradient of masked_whiten w.r.t. values from the forward's stats.");

  // ---- policy.cu: policy_loss ----
  m.def("policy_loss_forward", &rlk::policy_loss_forward, py::arg("tensors"),
        py::arg("params"), py::arg("normalizer"), py::arg("partials"), py::arg("loss"),
        py::arg("metrics"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "policy_loss forward: loss and the 9 metrics from PolicyTensors and PolicyParams.");
  m.def("policy_loss_backward", &rlk::policy_loss_backward, py::arg("tensors"),
        py::arg("params"), py::arg("normalizer"), py::arg("grad_loss"), py::arg("workspace"),
        py::arg("g_lp"), py::arg("g_ent"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "policy_loss backward: gradients w.r.t. logp and (g_ent != 0) entropy.");
  // ---- rollout.cu: rollout_correction ----
  m.def("rollout_correction_forward", &rlk::rollout_correction_forward, py::arg("old_logp"),
        py::arg("rollout_logp"), py::arg("mask"), py::arg("advantages"), py::arg("weights"),
        py::arg("keep"), py::arg("partials"), py::arg("metrics"), py::arg("b"), py::arg("t"),
        py::arg("dtype"), py::arg("level"), py::arg("mode"), py::arg("reject"), py::arg("lo"),
        py::arg("hi"), py::arg("log_ratio_clamp"), py::arg("reject_bounds"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "rollout_correction: importance weights, keep flags and the 15 mismatch metrics "
        "(level / mode: CODES['rollout_level'] / ['rollout_mode'], reject: a bit mask of "
        "CODES['rollout_reject']). See csrc/rlkernels.h.");

  // ---- grpo.cu: grpo_loss(..., grad_in_forward=True) ----
  m.def("grpo_gif_plan", &rlk::grpo_gif_plan, py::arg("vocab"), py::arg("dtype"),
        "grpo_gif_plan: the thread-block cluster size for one row (0: the one-read kernel "
        "does not run here). See csrc/rlkernels.h.");
  m.def("grpo_gif_forward", &rlk::grpo_gif_forward, py::arg("logits"), py::arg("tokens"),
        py::arg("tensors"), py::arg("params"), py::arg("stats"), py::arg("out"), py::arg("n"),
        py::arg("vocab"), py::arg("dtype"), py::arg("inv_temperature"),
        py::arg("ignore_index"), py::arg("cluster"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "grpo_loss with the gradient in the forward: logp, entropy, stats and d logits "
        "(upstream 1) from one read of each logit (sm_90 thread-block cluster).");
  m.def("grpo_gif_scale", &rlk::grpo_gif_scale, py::arg("grad"), py::arg("n"),
        py::arg("vocab"), py::arg("g"), py::arg("dtype"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "grpo_loss(grad_in_forward=True) backward: grad *= g in place (nothing when g == 1).");
}
