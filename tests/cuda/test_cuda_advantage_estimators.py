"""The cuda backend of verl's other advantage estimators (csrc/advantage.cu
``group_estimators_forward`` and ``discounted_advantages_forward``, launchers in
rlkernels/cuda/advantage.py).

* Any machine: the launchers' argument handling against a recording stand-in for
  rlkernels._C whose parameter names are read from csrc/bindings.cpp (so the check does not
  need an extension rebuilt with the new bindings): which kernel, which method code, the
  views, strides and workspace sizes.
* GPU (``@pytest.mark.gpu``): every method against the torch reference in fp64 (fp32 /
  fp64 / bf16 rewards, contiguous groups and ids, groups larger than a warp, long mask rows),
  two runs bit-identical, CUDA-graph capture.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
from dataclasses import dataclass

import pytest
import torch

import rlkernels
from _cuda_gpu import gpu_cuda, cpu_expect
from _naive import bit_equal
from rlkernels import _codes
from rlkernels.cuda import advantage as ca

ROOT = pathlib.Path(__file__).resolve().parents[2]
CODES = _codes.ADVANTAGE_METHODS
NEW = ("opo", "gpg", "grpo_passk", "reinforce_plus_plus_baseline", "gdpo")


# ============================================================== launchers, on any machine

def _binding_params(name):
    """The py::arg names of ``m.def(name, ...)`` in csrc/bindings.cpp, in order."""
    text = (ROOT / "csrc" / "bindings.cpp").read_text()
    start = text.index(f'm.def("{name}"')
    body = text[start:text.index(";", start)]
    return re.findall(r'py::arg\("(\w+)"\)', body)


@dataclass
class _Matrix:
    ptr: int = 0
    stride0: int = 0
    stride1: int = 0


@dataclass
class _Rows:
    ptr: int = 0
    stride: int = 0


class _Recorder:
    Matrix, Rows = _Matrix, _Rows

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        params = _binding_params(name)

        def launch(*args, **kw):
            assert not args and list(kw) == params, (name, list(kw), params)
            self.calls.append((name, kw))
        return launch

    def last(self):
        return self.calls[-1]


@pytest.fixture
def rec(monkeypatch):
    r = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    for attr, value in (("extension", lambda: r), ("stream_of", lambda t: 0),
                        ("expect", cpu_expect)):
        monkeypatch.setattr(ca, attr, value)
    return r


@pytest.mark.parametrize("method", NEW)
def test_group_estimators_launcher(rec, method):
    b, t = 8, 5
    r = torch.randn(b, 3) if method == "gdpo" else torch.randn(b)
    mask = torch.rand(b, t) > 0.3
    ca.group_advantages_forward(r, None, 4, method, 1e-6, True, mask, None, True, 1e-8)
    name, kw = rec.last()
    assert name == "group_estimators_forward"
    assert (kw["method"], kw["b"], kw["t"], kw["slots"], kw["group_size"]) == (
        CODES[method], b, t, 2, 4)
    assert kw["k"] == (3 if method == "gdpo" else 1)
    assert kw["rewards"].stride0 == (3 if method == "gdpo" else 1)
    assert kw["mask"].ptr != 0 and kw["mask"].stride0 == t  # bool mask: read in place
    assert (kw["weights"] != 0) == (method == "gdpo")
    assert (kw["perm"], kw["starts"]) == (0, 0)
    ids = torch.tensor([3, 1, 3, 1, 0, 0, 0, 9])
    ca.group_advantages_forward(r, ids, 0, method, 1e-6, False, mask.int(), None, False,
                                1e-5)
    _, kw = rec.last()
    assert kw["perm"] != 0 and kw["starts"] != 0 and kw["slots"] == b
    assert (kw["unbiased"], kw["norm_by_std"], kw["whiten_eps"]) == (False, False, 1e-5)


def test_grpo_without_std_runs_as_dr_grpo(rec):
    ca.group_advantages_forward(torch.randn(8), None, 4, "grpo", 1e-6, True, None, None,
                                False, 1e-8)
    name, kw = rec.last()
    assert name == "group_advantages_forward" and kw["method"] == CODES["dr_grpo"]
    ca.group_advantages_forward(torch.randn(8), None, 4, "rloo_vectorized", 1e-6, True)
    assert rec.last()[1]["method"] == CODES["rloo"]


def test_group_estimators_launcher_rejects_components_outside_gdpo(rec):
    with pytest.raises(ValueError, match=r"rewards: expected \[B\]"):
        ca.group_advantages_forward(torch.randn(8, 2), None, 4, "opo", 1e-6, True,
                                    torch.ones(8, 3), None, True, 1e-8)


@pytest.mark.parametrize("whiten", [False, True])
def test_discounted_advantages_launcher(rec, whiten):
    b, t = 3, 6
    rew = torch.randn(t, b).t()  # column-major view: strides (1, 3)
    mask = torch.rand(b, t) > 0.3
    adv, ret = ca.discounted_advantages_forward(rew, mask.float(), torch.randn(b).double(),
                                                0.9, whiten, 1e-8, True)
    name, kw = rec.last()
    assert name == "discounted_advantages_forward"
    assert (kw["rewards"].stride0, kw["rewards"].stride1) == (1, b)
    assert kw["baseline"] != 0 and (kw["b"], kw["t"], kw["whiten"]) == (b, t, whiten)
    assert kw["advantages"] == adv.data_ptr() and kw["returns"] == ret.data_ptr()
    assert adv.shape == ret.shape == (b, t) and adv.dtype == torch.float32
    ca.discounted_advantages_forward(rew, mask, None, 1.0, whiten, 1e-8, True)
    assert rec.last()[1]["baseline"] == 0


# ================================================================================== GPU

def _rewards(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, shape, generator=g) / 4).to(dtype).cuda()


def _mask(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, t, generator=g) > 0.3
    m[1] = False  # an empty response
    return m.cuda()


def _tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5,
                                                                             atol=2e-5)


def _both(r, mask, **kw):
    got = rlkernels.group_advantages(r, mask=mask, backend="cuda", **kw)
    cpu = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    want = rlkernels.group_advantages(r.double().cpu(), mask=mask.cpu(), backend="torch", **cpu)
    return got, want


@gpu_cuda
@pytest.mark.parametrize("method", NEW)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("group_size", [1, 4, 100])  # 100: several members per lane
def test_group_estimators_match_reference(method, dtype, group_size):
    b = group_size * 6
    r = _rewards((b, 3) if method == "gdpo" else (b,), dtype, group_size)
    mask = _mask(b, 300, group_size)
    extra = dict(reward_weights=[1.0, 0.5, 2.0]) if method == "gdpo" else {}
    for norm in ((True, False) if method in ("grpo_passk", "gdpo") else (True,)):
        got, want = _both(r, mask, group_size=group_size, method=method, norm_by_std=norm,
                          **extra)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double().cpu(), want, **_tol(dtype))
    ids = (torch.arange(b) // group_size * 5 - 7)[torch.randperm(b)].cuda()
    got, want = _both(r, mask, group_index=ids, method=method, **extra)
    torch.testing.assert_close(got.double().cpu(), want, **_tol(dtype))


@gpu_cuda
@pytest.mark.parametrize("method", NEW)
def test_group_estimators_deterministic_and_capturable(method):
    b = 4096
    r = _rewards((b, 2) if method == "gdpo" else (b,), torch.float32, 7)
    mask = _mask(b, 64, 8)
    ids = (torch.arange(b, device="cuda") * 7919) % 500
    once = rlkernels.group_advantages(r, group_index=ids, method=method, mask=mask,
                                      backend="cuda")
    assert bit_equal(once, rlkernels.group_advantages(r, group_index=ids, method=method,
                                                      mask=mask, backend="cuda"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rlkernels.group_advantages(r, group_index=ids, method=method, mask=mask,
                                         backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert bit_equal(out, once)


@gpu_cuda
@pytest.mark.parametrize("shape", [(4, 1), (5, 37), (7, 1000), (300, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_discounted_advantages_match_reference(dtype, shape):
    b, t = shape
    g = torch.Generator().manual_seed(t)
    r = torch.randn(b, t, generator=g, dtype=torch.float64).to(dtype).cuda()
    base = torch.randn(b, generator=g, dtype=torch.float64).to(dtype).cuda()
    mask = _mask(b, t, t) if b > 1 else torch.ones(b, t, dtype=torch.bool, device="cuda")
    for kw in (dict(whiten=True), dict(baseline=base), dict(baseline=base, whiten=True,
                                                             unbiased=False)):
        got = rlkernels.discounted_returns(r, mask, gamma=0.99, backend="cuda", **kw)
        cpu = {k: (v.double().cpu() if isinstance(v, torch.Tensor) else v)
               for k, v in kw.items()}
        want = rlkernels.discounted_returns(r.double().cpu(), mask.cpu(), gamma=0.99,
                                            backend="torch", **cpu)
        for a, w in zip(got, want):
            torch.testing.assert_close(a.double().cpu(), w, **_tol(dtype))
        assert (got[0][~mask] == 0).all() and (got[1][~mask] == 0).all()


@gpu_cuda
def test_discounted_advantages_deterministic_and_capturable():
    g = torch.Generator().manual_seed(3)
    r = torch.randn(512, 700, generator=g).cuda()
    mask = _mask(512, 700, 4)
    once = rlkernels.discounted_returns(r, mask, gamma=0.9, whiten=True, backend="cuda")
    again = rlkernels.discounted_returns(r, mask, gamma=0.9, whiten=True, backend="cuda")
    assert all(bit_equal(a, b) for a, b in zip(once, again))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rlkernels.discounted_returns(r, mask, gamma=0.9, whiten=True, backend="cuda")
    graph.replay()
    torch.cuda.synchronize()
    assert all(bit_equal(a, b) for a, b in zip(out, once))
