"""rlkernels._C, the compiled CUDA extension: build facts on any machine, kernels on a GPU.

On a CPU-only machine these check that the extension imports (when it was built), reports
itself without raising, links neither torch nor the shared CUDA runtime, and that its launchers
fail with clear errors. The kernels' GPU tests are in test_cuda_vocab.py and
test_cuda_advantage_policy.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from rlkernels.cuda import cuda_status, extension_info, load_extension

C = load_extension()
HAS_GPU = torch.cuda.is_available()

needs_ext = pytest.mark.skipif(C is None, reason=f"rlkernels._C unavailable: {cuda_status()}")


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


# Keyword arguments of a raw launcher (masked_whiten_backward: the smallest signature).
_WHITEN_BWD = dict(grad_out=0, values=0, mask_u8=0, mask_w=0, stats=0, workspace=0,
                   grad_values=0, n=0, blocks=1, dtype=0, shift_mean=True, unbiased=True,
                   stream=0)


@needs_ext
def test_raw_binding_validates_codes_before_any_cuda_call():
    with pytest.raises(ValueError, match="n must be >= 0"):
        C.masked_whiten_backward(**{**_WHITEN_BWD, "n": -1})
    with pytest.raises(ValueError, match="dtype code must be"):
        C.masked_whiten_backward(**{**_WHITEN_BWD, "dtype": 7})
    with pytest.raises(ValueError, match="blocks must be in"):
        C.masked_whiten_backward(**{**_WHITEN_BWD, "blocks": 0})
    C.masked_whiten_backward(**_WHITEN_BWD)  # n == 0: nothing launched


@needs_ext
@pytest.mark.skipif(HAS_GPU, reason="would hand bogus pointers to a real GPU")
def test_raw_binding_without_gpu_raises_runtime_error():
    bogus = {k: 256 for k in ("grad_out", "values", "mask_u8", "stats", "workspace",
                              "grad_values")}
    with pytest.raises(RuntimeError, match="CUDA error"):
        C.masked_whiten_backward(**{**_WHITEN_BWD, **bogus, "n": 4})
    assert C.device_count() == 0  # the failure above left no error behind


def _binding_params(fn):
    """Parameter names of a pybind11 function, from its signature line."""
    sig = fn.__doc__.splitlines()[0]
    inner = sig[sig.index("(") + 1:sig.rindex(") ->")]
    return [p.split(":")[0].strip() for p in re.split(r",\s*(?=\w+:)", inner) if p.strip()]


@needs_ext
def test_launchers_pass_every_binding_argument_by_name():
    # Every C.<entry point>(...) call in rlkernels/cuda/*.py names each parameter of the
    # binding exactly once, and nothing else (a renamed parameter fails here, not on a GPU).
    import ast
    import pathlib

    import rlkernels.cuda

    seen = set()
    for path in pathlib.Path(rlkernels.cuda.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "C"):
                continue
            fn = getattr(C, node.func.attr, None)
            assert fn is not None, f"{path.name}: C.{node.func.attr} is not in rlkernels._C"
            if node.func.attr[0].isupper():  # a struct: Rows, Matrix, PolicyTensors, ...
                continue
            assert not node.args, f"{path.name}: C.{node.func.attr} called with positionals"
            names = [k.arg for k in node.keywords]
            assert sorted(names) == sorted(_binding_params(fn)), (path.name, node.func.attr)
            seen.add(node.func.attr)
    # every kernel entry point is called (helpers such as grpo_gif_plan may be called too)
    launch = {n for n in dir(C) if n.endswith(("_forward", "_backward"))}
    assert launch <= seen, launch - seen


@needs_ext
def test_views_and_structs_by_name():
    assert (C.Rows().ptr, C.Rows().stride) == (0, 0)
    v = C.Matrix(ptr=16, stride0=5, stride1=1)
    assert (v.ptr, v.stride0, v.stride1) == (16, 5, 1) and "stride0=5" in repr(v)
    pt = C.PolicyTensors()
    pt.adv = C.Matrix(ptr=8, stride0=1, stride1=0)
    assert pt.adv.ptr == 8 and pt.logp.ptr == 0
    params = C.PolicyParams()
    params.kl_estimator = C.CODES["kl_estimator"]["k3+"]
    assert params.kl_estimator == 4
    with pytest.raises(AttributeError):
        params.kl_estimater = 3  # a misspelled field is an error, not a new attribute
