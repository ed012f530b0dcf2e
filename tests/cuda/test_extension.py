"""rlkernels._C, the compiled CUDA extension: build facts on any machine, kernels on a GPU.

On a CPU-only machine these check that the extension imports (when it was built), reports
itself without raising, links neither torch nor the shared CUDA runtime, and that its launchers
fail with clear errors. The `gpu` tests check kl_penalty_forward against the torch formula.
"""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest
import torch

from rlkernels.cuda import cuda_status, extension_info, kl_penalty_forward, load_extension
from rlkernels.cuda._loader import NOT_BUILT

C = load_extension()
HAS_GPU = torch.cuda.is_available()

needs_ext = pytest.mark.skipif(C is None, reason=f"rlkernels._C unavailable: {cuda_status()}")
requires_gpu = pytest.mark.skipif(
    not HAS_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)


# ---------------------------------------------------------------------------------------------
# Any machine
# ---------------------------------------------------------------------------------------------


def test_status_is_ok_or_a_reason():
    status = cuda_status()
    assert isinstance(status, str) and status
    if C is None:
        assert status != "ok"
    elif not HAS_GPU:
        assert "no CUDA GPU" in status
    assert cuda_status() == status  # cached


@needs_ext
def test_extension_reports_itself():
    from rlkernels._version import __version__

    assert isinstance(C.version(), str) and C.version() == __version__
    runtime = C.cuda_runtime_version()
    assert isinstance(runtime, int) and runtime >= 11000
    assert isinstance(C.cuda_driver_version(), int)
    count = C.device_count()  # never raises, 0 without driver/GPU
    assert isinstance(count, int) and count >= 0
    if not HAS_GPU:
        assert count == 0
    assert C.cuda_archs() and C.nvcc_version()
    info = extension_info()
    assert info["version"] == __version__ and info["device_count"] == count
    # Option codes: rlkernels/_codes.py (tests/cuda/test_codes.py compares them).
    assert dict(C.CODES["dtype"]) == {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}


@needs_ext
@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd not found")
def test_links_no_torch_and_static_cudart():
    # SPEC section 2: _C links only the CUDA runtime (statically), so one build works with
    # any installed torch and does not depend on a libcudart.so being findable.
    out = subprocess.run(["ldd", C.__file__], capture_output=True, text=True, check=True).stdout
    for lib in ("libtorch", "libc10", "libcudart.so", "libpython"):
        assert lib not in out, f"{C.__file__} links {lib}:\n{out}"


@needs_ext
def test_raw_binding_validates_codes_before_any_cuda_call():
    with pytest.raises(ValueError, match="n must be >= 0"):
        C.kl_penalty_forward(0, 0, 0, -1, 0, 0, False, 0.0, 0.0, 0)
    with pytest.raises(ValueError, match="dtype must be float32"):
        C.kl_penalty_forward(0, 0, 0, 4, 2, 0, False, 0.0, 0.0, 0)
    with pytest.raises(ValueError, match="estimator code"):
        C.kl_penalty_forward(0, 0, 0, 4, 0, 7, False, 0.0, 0.0, 0)
    C.kl_penalty_forward(0, 0, 0, 0, 0, 0, False, 0.0, 0.0, 0)  # n == 0: nothing launched


@needs_ext
@pytest.mark.skipif(HAS_GPU, reason="would hand bogus pointers to a real GPU")
def test_raw_binding_without_gpu_raises_runtime_error():
    with pytest.raises(RuntimeError, match="CUDA error"):
        C.kl_penalty_forward(256, 256, 256, 4, 0, 0, False, 0.0, 0.0, 0)
    assert C.device_count() == 0  # the failure above left no error behind


def test_launcher_errors_on_cpu_tensors():
    x = torch.zeros(4)
    if C is None:
        with pytest.raises(RuntimeError, match="cuda backend is unavailable"):
            kl_penalty_forward(x, x)
        status = cuda_status()
        assert status == NOT_BUILT or "failed to import" in status or "stale" in status
        return
    with pytest.raises(ValueError, match="logp: expected a CUDA tensor"):
        kl_penalty_forward(x, x)
    with pytest.raises(TypeError, match="logp: expected a torch.Tensor"):
        kl_penalty_forward([0.0], x)


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


def _kl_reference(logp, ref, estimator, clamp):
    """The torch formula in fp64 (SPEC section 3.1)."""
    d = logp.double() - ref.double()
    if estimator == "k1":
        v = d
    elif estimator == "abs":
        v = d.abs()
    elif estimator == "k2":
        v = d * d / 2
    else:  # k3, low_var_kl: exp(-d) + d - 1, written without cancellation
        v = torch.expm1(-d) + d
    if clamp is not None:
        v = torch.clamp(v, clamp[0], clamp[1])
    return v


def _log_probs(n, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    logp = -torch.rand(n, generator=g, device="cuda", dtype=torch.float64) * 12
    ref = logp + torch.randn(n, generator=g, device="cuda", dtype=torch.float64) * 0.7
    ref[::7] = logp[::7]  # d == 0 exactly
    return logp.to(dtype), ref.to(dtype)


# n = 1: a single element; 1000: not a multiple of the 256-thread block; 2**20 + 3: many
# blocks, the grid-stride loop and a ragged tail.
@pytest.mark.gpu
@requires_gpu
@needs_ext
@pytest.mark.parametrize("n", [1, 1000, 2**20 + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ["k1", "abs", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("clamp", [None, (-10.0, 10.0), (0.05, 0.3)])
def test_kl_penalty_forward_matches_torch(n, dtype, estimator, clamp):
    logp, ref = _log_probs(n, dtype, seed=n)
    out = kl_penalty_forward(logp, ref, estimator, clamp)
    assert out.dtype == dtype and out.shape == logp.shape and out.device == logp.device
    expected = _kl_reference(logp, ref, estimator, clamp)
    # fp32: SPEC section 5 tolerance against the fp64 reference; fp64: a few ulps.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out.double(), expected, **tol)


@pytest.mark.gpu
@requires_gpu
@needs_ext
def test_kl_penalty_forward_layouts_streams_and_specials():
    logp, ref = _log_probs(6 * 333, torch.float32, seed=0)
    # Shape kept, non-contiguous inputs made contiguous.
    a, b = logp.view(6, 333).t(), ref.view(6, 333).t()
    out = kl_penalty_forward(a, b, "k3")
    assert out.shape == (333, 6) and out.is_contiguous()
    torch.testing.assert_close(out.double(), _kl_reference(a, b, "k3", None), rtol=1e-5, atol=1e-5)
    # Empty input: no launch.
    empty = torch.empty(0, 5, device="cuda")
    assert kl_penalty_forward(empty, empty, "k2").shape == (0, 5)
    # A side stream: the kernel runs on the current stream.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out_side = kl_penalty_forward(logp, ref, "k2")
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out_side, kl_penalty_forward(logp, ref, "k2"), rtol=0, atol=0)
    # NaN propagates through the clamp; +-inf follow the formula; one-sided clamp.
    inf, nan = math.inf, math.nan
    lp = torch.tensor([nan, 0.0, -inf, 0.0, 3.0], device="cuda", dtype=torch.float64)
    rf = torch.tensor([0.0, nan, 0.0, -inf, 0.0], device="cuda", dtype=torch.float64)
    for est in ("k1", "abs", "k2", "k3"):
        for clamp in (None, (-10.0, 10.0), (None, 1.0), (0.5, None)):
            got = kl_penalty_forward(lp, rf, est, clamp)
            lo, hi = (None, None) if clamp is None else clamp
            want = _kl_reference(lp, rf, est, None if clamp is None else (lo, hi))
            torch.testing.assert_close(got, want, rtol=1e-14, atol=0, equal_nan=True)
    # Bit-identical across runs.
    big_a, big_b = _log_probs(2**20 + 3, torch.float32, seed=1)
    first = kl_penalty_forward(big_a, big_b, "k3")
    assert torch.equal(first, kl_penalty_forward(big_a, big_b, "k3"))


@pytest.mark.gpu
@requires_gpu
@needs_ext
def test_kl_penalty_forward_checks_arguments():
    x = torch.zeros(4, device="cuda")
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty_forward(x, x, "k4")
    with pytest.raises(ValueError, match="ref_logp: expected shape"):
        kl_penalty_forward(x, torch.zeros(5, device="cuda"))
    with pytest.raises(TypeError, match="ref_logp: expected dtype"):
        kl_penalty_forward(x, x.double())
    with pytest.raises(TypeError, match="logp: expected dtype"):
        kl_penalty_forward(x.half(), x.half())
    with pytest.raises(ValueError, match="clamp"):
        kl_penalty_forward(x, x, "k3", clamp=(1.0,))


@pytest.mark.gpu
@requires_gpu
@needs_ext
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kl_penalty_forward_on_second_device():
    logp, ref = _log_probs(1000, torch.float32, seed=3)
    logp1, ref1 = logp.to("cuda:1"), ref.to("cuda:1")
    out = kl_penalty_forward(logp1, ref1, "k3")  # current device stays cuda:0
    assert out.device == logp1.device
    torch.testing.assert_close(out.cpu(), kl_penalty_forward(logp, ref, "k3").cpu())
