// pybind11 module rlkernels._C: thin bindings over the launchers declared in rlkernels.h.
// Compiled by the host compiler alone (no CUDA or torch headers). Launchers release the GIL;
// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into
// RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <initializer_list>
#include <utility>

#include "rlkernels.h"

namespace py = pybind11;

namespace {

using Ptrs7 = std::array<std::uintptr_t, 7>;
using Strides14 = std::array<int64_t, 14>;
using Modes11 = std::array<int, 11>;
using Nums7 = std::array<double, 7>;

// Python passes the policy tensors as tuples (pointers, strides) and the options as codes;
// pack them into the plain structs of rlkernels.h.
rlk::PolicyTensors policy_tensors(const Ptrs7& p, const Strides14& s, int64_t B, int64_t T) {
  return rlk::PolicyTensors{p[0], p[1], p[2], p[3], p[4], p[5], p[6],
                            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
                            s[8], s[9], s[10], s[11], s[12], s[13], B, T};
}

rlk::PolicyParams policy_params(const Modes11& m, const Nums7& x) {
  return rlk::PolicyParams{m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10],
                           x[0], x[1], x[2], x[3], x[4], x[5], x[6]};
}

void policy_loss_forward_py(const Ptrs7& ptrs, const Strides14& strides, int64_t B, int64_t T,
                            const Modes11& modes, const Nums7& nums, std::uintptr_t normalizer,
                            std::uintptr_t partials, std::uintptr_t loss,
                            std::uintptr_t metrics, int dtype, std::uintptr_t stream) {
  rlk::policy_loss_forward(policy_tensors(ptrs, strides, B, T), policy_params(modes, nums),
                           normalizer, partials, loss, metrics, dtype, stream);
}

void policy_loss_backward_py(const Ptrs7& ptrs, const Strides14& strides, int64_t B,
                             int64_t T, const Modes11& modes, const Nums7& nums,
                             std::uintptr_t normalizer, std::uintptr_t grad_loss,
                             std::uintptr_t workspace, std::uintptr_t g_lp,
                             std::uintptr_t g_ent, int dtype, std::uintptr_t stream) {
  rlk::policy_loss_backward(policy_tensors(ptrs, strides, B, T), policy_params(modes, nums),
                            normalizer, grad_loss, workspace, g_lp, g_ent, dtype, stream);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "rlkernels._C: hand-written CUDA kernels of rlkernels (the 'cuda' backend).\n\n"
      "Links only the CUDA runtime (statically): kernels take raw device pointers, sizes, a\n"
      "dtype code and the cudaStream_t as Python ints. Private API: use the launchers in\n"
      "rlkernels.cuda, which validate tensors and allocate outputs.";

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
                            {"jsd", rlk::kJsd}});
  codes["sparse_mode"] = table({{"full", rlk::kSparseFull}, {"support", rlk::kSparseSupport},
                                {"kl", rlk::kSparseKl}});
  codes["policy_loss"] = table({{"ppo", rlk::kPpo}, {"cispo", rlk::kCispo},
                                {"reinforce", rlk::kReinforce}});
  codes["ratio_level"] = table({{"token", rlk::kTokenLevel}, {"sequence", rlk::kSequenceLevel}});
  codes["agg"] = table({{"token-mean", rlk::kTokenMean},
                        {"seq-mean-token-mean", rlk::kSeqMeanTokenMean},
                        {"seq-mean-token-sum", rlk::kSeqMeanTokenSum},
                        {"seq-mean-token-sum-norm", rlk::kSeqMeanTokenSumNorm}});
  codes["kl_estimator"] = table({{"k1", rlk::kKlK1}, {"abs", rlk::kKlAbs}, {"k2", rlk::kKlK2},
                                 {"k3", rlk::kKlK3}, {"k3+", rlk::kKlK3Plus}});
  codes["advantage_method"] = table({{"grpo", rlk::kGrpo}, {"dr_grpo", rlk::kDrGrpo},
                                     {"rloo", rlk::kRloo}, {"batch_std", rlk::kBatchStd}});
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
        py::arg("stride_x"), py::arg("tokens"), py::arg("stride_tok"), py::arg("logp"),
        py::arg("ent"), py::arg("stats"), py::arg("n"), py::arg("vocab"), py::arg("dtype"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("with_entropy"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Per-row log-prob of the token, entropy and stats (m, log1p rest, sum p (z - m)) of "
        "softmax(logits * inv_temperature); one block per row. tokens = 0: entropy only. "
        "See csrc/rlkernels.h.");
  m.def("token_logprobs_backward", &rlk::token_logprobs_backward, py::arg("grad_logp"),
        py::arg("stride_glp"), py::arg("grad_entropy"), py::arg("stride_gh"),
        py::arg("logits"), py::arg("stride_x"), py::arg("tokens"), py::arg("stride_tok"),
        py::arg("stats"), py::arg("stride_s0"), py::arg("stride_s1"), py::arg("out"),
        py::arg("stride_out"), py::arg("n"), py::arg("vocab"), py::arg("dtype"),
        py::arg("inv_temperature"), py::arg("ignore_index"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Gradient of token_logprobs / entropy w.r.t. the logits (out may be logits: in "
        "place). See csrc/rlkernels.h.");
  m.def("kl_divergence_forward", &rlk::kl_divergence_forward, py::arg("logits"),
        py::arg("stride_x"), py::arg("ref_logits"), py::arg("stride_y"),
        py::arg("ignore_mask"), py::arg("stride_mask"), py::arg("kl"), py::arg("stats_p"),
        py::arg("stats_q"), py::arg("n"), py::arg("vocab"), py::arg("dtype"), py::arg("kind"),
        py::arg("beta"), py::arg("inv_temperature"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Per-row KL (kind 0 reverse, 1 forward, 2 jsd) and both rows' stats. See "
        "csrc/rlkernels.h.");
  m.def("kl_divergence_backward", &rlk::kl_divergence_backward, py::arg("grad_kl"),
        py::arg("stride_g"), py::arg("logits"), py::arg("stride_x"), py::arg("ref_logits"),
        py::arg("stride_y"), py::arg("ignore_mask"), py::arg("stride_mask"),
        py::arg("stats_p"), py::arg("sp0"), py::arg("sp1"), py::arg("stats_q"),
        py::arg("sq0"), py::arg("sq1"), py::arg("grad_x"), py::arg("stride_gx"),
        py::arg("grad_y"), py::arg("stride_gy"), py::arg("n"), py::arg("vocab"),
        py::arg("dtype"), py::arg("kind"), py::arg("beta"), py::arg("inv_temperature"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Gradients of kl_divergence w.r.t. logits and (grad_y != 0) ref_logits.");

  m.def("sparse_forward", &rlk::sparse_forward, py::arg("logits"), py::arg("stride_x"),
        py::arg("indices"), py::arg("si0"), py::arg("si1"), py::arg("target"), py::arg("st0"),
        py::arg("st1"), py::arg("out"), py::arg("so0"), py::arg("tail"), py::arg("stats"),
        py::arg("n"), py::arg("vocab"), py::arg("k"), py::arg("dtype"), py::arg("mode"),
        py::arg("with_tail"), py::arg("inv_temperature"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "sparse_logprobs (mode 0 full, 1 support) / sparse_kl (mode 2) forward, one block "
        "per row. See csrc/rlkernels.h.");
  m.def("sparse_backward", &rlk::sparse_backward, py::arg("logits"), py::arg("stride_x"),
        py::arg("grad"), py::arg("stride_g"), py::arg("indices"), py::arg("si0"),
        py::arg("si1"), py::arg("sorted_ids"), py::arg("perm"), py::arg("gk"), py::arg("sg0"),
        py::arg("sg1"), py::arg("lp"), py::arg("sl0"), py::arg("sl1"), py::arg("tail"),
        py::arg("grad_tail"), py::arg("grad_kl"), py::arg("stats"), py::arg("ss0"),
        py::arg("ss1"), py::arg("n"), py::arg("vocab"), py::arg("k"), py::arg("dtype"),
        py::arg("mode"), py::arg("with_tail"), py::arg("inv_temperature"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "Gradient of sparse_logprobs / sparse_kl w.r.t. the logits. See csrc/rlkernels.h.");

  // ---- advantage.cu ----
  m.def("group_advantages_forward", &rlk::group_advantages_forward, py::arg("rewards"),
        py::arg("stride"), py::arg("perm"), py::arg("starts"), py::arg("out"),
        py::arg("workspace"), py::arg("b"), py::arg("group_size"), py::arg("slots"),
        py::arg("dtype"), py::arg("method"), py::arg("unbiased"), py::arg("eps"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "GRPO-family advantages, one warp per group (method 0 grpo, 1 dr_grpo, 2 rloo, "
        "3 batch_std). See csrc/rlkernels.h.");

  m.def("gae_forward", &rlk::gae_forward, py::arg("rewards"), py::arg("r_sb"),
        py::arg("r_st"), py::arg("values"), py::arg("v_sb"), py::arg("v_st"), py::arg("mask"),
        py::arg("m_sb"), py::arg("m_st"), py::arg("advantages"), py::arg("returns"),
        py::arg("b"), py::arg("t"), py::arg("dtype"), py::arg("gamma"), py::arg("lam"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "GAE over [b, t]: one warp per row, a reverse scan in chunks. See csrc/rlkernels.h.");
  m.def("discounted_returns_forward", &rlk::discounted_returns_forward, py::arg("rewards"),
        py::arg("r_sb"), py::arg("r_st"), py::arg("mask"), py::arg("m_sb"), py::arg("m_st"),
        py::arg("out"), py::arg("b"), py::arg("t"), py::arg("dtype"), py::arg("gamma"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Discounted return-to-go over [b, t] (masked steps skipped). See csrc/rlkernels.h.");
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
  m.def("policy_loss_forward", &policy_loss_forward_py, py::arg("ptrs"), py::arg("strides"),
        py::arg("B"), py::arg("T"), py::arg("modes"), py::arg("nums"), py::arg("normalizer"),
        py::arg("partials"), py::arg("loss"), py::arg("metrics"), py::arg("dtype"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "policy_loss forward. ptrs: (logp, old_logp, adv, mask, ref_logp, entropy, "
        "is_weights); strides: their (row, column) strides; modes: (loss, seq, agg, "
        "kl_estimator, has_ref, has_ent, has_w, has_dual, has_delta, use_kl, use_ent); nums: "
        "(lo, hi, dual_clip, delta, kl_coef, entropy_coef, log_ratio_clamp).");
  m.def("policy_loss_backward", &policy_loss_backward_py, py::arg("ptrs"), py::arg("strides"),
        py::arg("B"), py::arg("T"), py::arg("modes"), py::arg("nums"), py::arg("normalizer"),
        py::arg("grad_loss"), py::arg("workspace"), py::arg("g_lp"), py::arg("g_ent"),
        py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "policy_loss backward: gradients w.r.t. logp and (g_ent != 0) entropy.");
}
