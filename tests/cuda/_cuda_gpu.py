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
