// pybind11 module rlkernels._C: thin bindings over the launchers declared in rlkernels.h.
// Compiled by the host compiler alone (no CUDA or torch headers). Launchers release the GIL;
// pybind11 turns std::invalid_argument into ValueError and std::runtime_error into
// RuntimeError.
#include <pybind11/pybind11.h>

#include "rlkernels.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "rlkernels._C: hand-written CUDA kernels of rlkernels (the 'cuda' backend).\n\n"
      "Links only the CUDA runtime (statically): kernels take raw device pointers, sizes, a\n"
      "dtype code and the cudaStream_t as Python ints. Private API: use the launchers in\n"
      "rlkernels.cuda, which validate tensors and allocate outputs.";

  // Dtype codes shared with Python (csrc/common.cuh: rlk::DType).
  m.attr("DTYPE_FLOAT32") = 0;
  m.attr("DTYPE_FLOAT16") = 1;
  m.attr("DTYPE_BFLOAT16") = 2;
  m.attr("DTYPE_FLOAT64") = 3;
  // kl_penalty_forward estimator codes (csrc/rlkernels.h: rlk::KlEstimator).
  m.attr("KL_K1") = static_cast<int>(rlk::kKlK1);
  m.attr("KL_ABS") = static_cast<int>(rlk::kKlAbs);
  m.attr("KL_K2") = static_cast<int>(rlk::kKlK2);
  m.attr("KL_K3") = static_cast<int>(rlk::kKlK3);

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

  m.def("kl_penalty_forward", &rlk::kl_penalty_forward, py::arg("logp"), py::arg("ref_logp"),
        py::arg("out"), py::arg("n"), py::arg("dtype"), py::arg("estimator"), py::arg("clamp"),
        py::arg("clamp_lo"), py::arg("clamp_hi"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "kl_penalty_forward(logp, ref_logp, out, n, dtype, estimator, clamp, clamp_lo, "
        "clamp_hi, stream) -> None\n\n"
        "Elementwise KL penalty on log-probs of sampled tokens, d = logp - ref_logp:\n"
        "  estimator 0 (k1): d;  1 (abs): |d|;  2 (k2): d*d/2;  3 (k3): exp(-d) + d - 1.\n"
        "If clamp is true the result is clamped to [clamp_lo, clamp_hi] (NaN kept).\n\n"
        "logp, ref_logp, out: device pointers (int) to n contiguous elements of dtype\n"
        "(0 = float32, 3 = float64; out has the same dtype). Math in the input precision.\n"
        "stream: cudaStream_t as int (0 = legacy default stream); runs asynchronously on the\n"
        "current device. Raises ValueError on bad codes, RuntimeError on CUDA errors.");
}
