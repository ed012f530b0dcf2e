"""Markers shared by the cuda-backend tests: GPU tests carry ``@pytest.mark.gpu`` (skipped
by tests/conftest.py without a GPU) and also skip, with the reason, when the cuda backend
cannot run here (extension not built, stale, driver too old)."""

import pytest
import torch

import rlkernels

HAS_GPU = torch.cuda.is_available()
STATUS = rlkernels.available_backends()["cuda"]


def gpu_cuda(fn):
    """Needs a GPU and a working rlkernels._C."""
    fn = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (torch.cuda.is_available() "
                            "is False)")(fn)
    fn = pytest.mark.skipif(HAS_GPU and STATUS != "ok",
                            reason=f"cuda backend unavailable: {STATUS}")(fn)
    return pytest.mark.gpu(fn)


def cpu_expect(name, t, dtypes, shape=None, like=None, ndim=None):
    """A stand-in for rlkernels.cuda._common.expect in the launcher tests that run without a
    GPU: the same checks on CPU tensors (dtype, shape, rank), returning the tensor."""
    assert isinstance(t, torch.Tensor) and t.dtype in dtypes, name
    assert shape is None or tuple(t.shape) == tuple(shape), (name, tuple(t.shape), shape)
    assert ndim is None or t.dim() == ndim, name
    return t
