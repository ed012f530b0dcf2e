"""Shared fixtures: the ``backend`` and ``device`` fixtures, the ``gpu`` marker, state reset.

``TRITON_INTERPRET=1`` must be in the environment before anything imports triton, so it is
set here first, before rlkernels is imported (DESIGN section 5): without a GPU the ``triton``
backend then runs its kernels in the interpreter, on CPU tensors.
"""

import os
import sys
import tempfile

# A private Inductor cache per test session: a cache left by an older checkout on the same
# machine could hold graphs compiled against other fake shapes of the custom ops.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="rlkernels-inductor-"))

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/ on sys.path for the shared helpers (tests/_naive.py), whatever --import-mode is
_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import pytest  # noqa: E402

import rlkernels  # noqa: E402
from rlkernels import backends  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _runnable_here(name: str) -> bool:
    """Available (``"ok"``) and able to run on this machine's tensors: ``torch`` always,
    ``triton`` natively on a GPU or through the interpreter on CPU, ``cuda`` only on a GPU."""
    if rlkernels.available_backends()[name] != "ok":
        return False
    if name == "cuda":
        return HAS_CUDA
    return True


RUNNABLE_BACKENDS = [name for name in backends.BACKENDS if _runnable_here(name)]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped otherwise)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    status = ", ".join(f"{k}={v}" for k, v in rlkernels.available_backends().items())
    return [f"rlkernels backends: {status}", f"test device: {DEVICE}, "
            f"torch threads: {torch.get_num_threads()}"]


@pytest.fixture(params=RUNNABLE_BACKENDS)
def backend(request) -> str:
    """Every backend that can run here; the test id is the backend name."""
    return request.param


@pytest.fixture
def device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    return DEVICE


@pytest.fixture(autouse=True)
def _reset_rlkernels_state():
    """Each test starts and ends with the default backend and debug mode off."""
    yield
    rlkernels.set_backend(None)
    rlkernels.set_debug(False)
