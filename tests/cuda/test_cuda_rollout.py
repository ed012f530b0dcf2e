"""The cuda backend's rollout_correction (csrc/rollout.cu + rlkernels/cuda/rollout.py).

Without a GPU: the launcher's Python half runs on CPU tensors against a recording stand-in
for rlkernels._C whose parameter names are read from csrc/bindings.cpp (so it needs no
rebuilt extension): the views, codes, bit mask and bounds it hands the kernel.
On a GPU: parity with the torch reference in fp64 for every level x mode and rejection
criterion, NaN and masked positions, float masks, strided inputs, long rows, determinism,
batch invariance and CUDA-graph capture.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import pytest
import torch

import rlkernels as rk
from _cuda_gpu import gpu_cuda, cpu_expect
from rlkernels import _codes
from rlkernels.cuda import rollout as cr
from rlkernels.ops import rollout as ro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ============================================================== the launcher, without a GPU

def _binding_params(name: str):
    """The py::arg names of ``m.def(name, ...)`` in csrc/bindings.cpp, in order."""
    with open(os.path.join(ROOT, "csrc", "bindings.cpp")) as f:
        text = f.read()
    start = text.index(f'm.def("{name}"')
    body = text[start:text.index(");", start)]
    return re.findall(r'py::arg\("(\w+)"\)', body)


class _View:
    def __init__(self, ptr=0, stride0=0, stride1=0):
        self.ptr, self.stride0, self.stride1 = ptr, stride0, stride1


class _Recorder:
    Matrix = _View

    def __init__(self):
        self.calls = []
        self.params = _binding_params("rollout_correction_forward")

    def rollout_correction_forward(self, *args, **kw):
        assert not args and list(kw) == self.params, (sorted(kw), self.params)
        self.calls.append(kw)


@pytest.fixture
def rec(monkeypatch):
    r = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(cr, "extension", lambda: r)
    monkeypatch.setattr(cr, "stream_of", lambda t: 0)
    monkeypatch.setattr(cr, "expect", cpu_expect)
    return r


def test_binding_matches_the_header():
    """bindings.cpp names every parameter of the declaration in rlkernels.h, in order."""
    with open(os.path.join(ROOT, "csrc", "rlkernels.h")) as f:
        text = f.read()
    start = text.index("void rollout_correction_forward(")
    decl = text[start:text.index(");", start)]
    names = [re.split(r"[\s&*]+", p.strip())[-1]
             for p in decl[decl.index("(") + 1:].split(",")]
    assert names == _binding_params("rollout_correction_forward")


def test_launcher_arguments(rec):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 8, generator=g)
    roll = torch.randn(3, 16, generator=g, dtype=torch.float64)[:, ::2]  # strided, fp64
    mask = torch.rand(3, 8, generator=g) > 0.3
    adv = torch.randn(3, generator=g)
    o = ro._options(level="geometric", mode="mask", threshold_high=1.5, threshold_low=0.5,
                    reject="opsm,seq_sum_k1", reject_threshold={"opsm": 0.1,
                                                                "seq_sum_k1": (0.5, 2.0)})
    w, keep, metrics = cr.rollout_correction_forward(old, roll, mask, adv, o.level, o.mode,
                                                     o.reject, o.nums)
    kw = rec.calls[-1]
    # fp64 when either log-prob input is fp64: every view in the compute dtype
    assert kw["dtype"] == _codes.DTYPES["float64"] and w.dtype == torch.float64
    assert keep.dtype == torch.bool and keep.shape == (3, 8) and metrics.shape == (15,)
    assert (kw["b"], kw["t"]) == (3, 8)
    assert kw["level"] == _codes.ROLLOUT_LEVELS["geometric"]
    assert kw["mode"] == _codes.ROLLOUT_MODES["mask"]
    assert kw["reject"] == (1 << _codes.ROLLOUT_REJECTS["opsm"]) | \
        (1 << _codes.ROLLOUT_REJECTS["seq_sum_k1"])
    assert (kw["lo"], kw["hi"], kw["log_ratio_clamp"]) == (0.5, 1.5, 20.0)
    bounds = kw["reject_bounds"]
    assert len(bounds) == 24
    c = _codes.ROLLOUT_REJECTS["seq_sum_k1"]
    assert bounds[2 * c:2 * c + 2] == [math.log(0.5), math.log(2.0)]
    c = _codes.ROLLOUT_REJECTS["opsm"]
    assert bounds[2 * c:2 * c + 2] == [-math.inf, 0.1]
    assert bounds[0:2] == [-math.inf, math.inf]  # token_k1 unused
    assert kw["advantages"].stride1 == 0 and kw["advantages"].ptr != 0  # [B]: broadcast
    assert kw["mask"].ptr != 0 and kw["mask"].stride0 == 8
    assert kw["weights"] == w.data_ptr() and kw["keep"] == keep.data_ptr()
    # no opsm: no advantages view; [B, T] advantages keep their column stride
    o2 = ro._options(reject="opsm", reject_threshold=0.0)
    cr.rollout_correction_forward(old, old, mask.float(), torch.randn(3, 8), o2.level,
                                  o2.mode, o2.reject, o2.nums)
    assert rec.calls[-1]["advantages"].stride1 == 1
    assert rec.calls[-1]["dtype"] == _codes.DTYPES["float32"]
    o3 = ro._options()
    cr.rollout_correction_forward(old, old, mask, None, o3.level, o3.mode, o3.reject, o3.nums)
    assert rec.calls[-1]["advantages"].ptr == 0 and rec.calls[-1]["reject"] == 0
    with pytest.raises(ValueError, match="nums: expected 27 values, got 3"):
        cr.rollout_correction_forward(old, old, mask, None, "token", "truncate", "", [1, 2, 3])


def test_launcher_empty_batch(rec):
    x = torch.zeros(0, 5)
    w, keep, m = cr.rollout_correction_forward(x, x, x > 0, None, "token", "truncate", "",
                                               ro._options().nums)
    assert w.shape == (0, 5) and keep.shape == (0, 5) and rec.calls[-1]["b"] == 0


# ========================================================================= GPU parity

def _inputs(b, t, seed=0, spread=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    roll = old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.25
    if b > 2:
        mask[2] = False
    roll = roll.masked_fill(~mask, float("nan"))
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return old.to(dtype), roll.to(dtype), mask, adv.to(dtype)


def _compare(kw, old, roll, mask, adv=None, tol=2e-5):
    out = rk.rollout_correction(old.cuda(), roll.cuda(), mask.cuda(),
                                advantages=None if adv is None else adv.cuda(), backend="cuda",
                                **kw)
    ref = rk.rollout_correction(old.double(), roll.double(), mask,
                                advantages=None if adv is None else adv.double(),
                                backend="torch", **kw)
    torch.testing.assert_close(out[0].double().cpu(), ref[0], rtol=tol, atol=tol,
                               equal_nan=True)
    assert torch.equal(out[1].cpu(), ref[1])
    mtol = max(tol, 1e-6)  # fp32 metrics rounded from differently ordered sums
    for name in ref[2]:
        torch.testing.assert_close(out[2][name].cpu(), ref[2][name], rtol=mtol, atol=mtol,
                                   equal_nan=True, msg=name)
    return out


@gpu_cuda
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_levels_and_modes(level, mode, dtype):
    old, roll, mask, _ = _inputs(16, 300, spread=0.02 if level == "sequence" else 0.3,
                                 dtype=dtype)
    out = _compare(dict(level=level, mode=mode, threshold_high=1.3, threshold_low=0.8),
                   old, roll, mask, tol=1e-10 if dtype == torch.float64 else 2e-5)
    assert bool((out[0][~mask.cuda()] == 0).all())


_REJECT = {"token_k1": (0.8, 1.25), "token_k2": 0.02, "token_k3": 0.02,
           "seq_sum_k1": (0.2, 5.0), "seq_sum_k2": 6.0, "seq_sum_k3": 6.0,
           "seq_mean_k1": (0.98, 1.02), "seq_mean_k2": 0.045, "seq_mean_k3": 0.045,
           "seq_max_k2": 0.35, "seq_max_k3": 0.35, "opsm": 0.0}


@gpu_cuda
@pytest.mark.parametrize("criterion", sorted(_REJECT))
def test_each_criterion(criterion):
    old, roll, mask, adv = _inputs(64, 129, seed=1, dtype=torch.float64)
    a = adv if criterion == "opsm" else None
    _compare(dict(reject=criterion, reject_threshold=_REJECT[criterion]), old, roll, mask, a,
             tol=1e-10)


@gpu_cuda
def test_combined_float_mask_token_advantages_strided():
    old, roll, mask, _ = _inputs(33, 70, seed=2)
    g = torch.Generator().manual_seed(3)
    fmask = mask.float() * (0.5 + torch.rand(33, 70, generator=g))
    adv = torch.randn(33, 70, generator=g)
    wide = torch.zeros(33, 140)
    wide[:, ::2] = old
    kw = dict(level="sequence", mode="mask", threshold_high=50.0, threshold_low=0.02,
              reject="token_k2,seq_mean_k1,seq_max_k3,opsm",
              reject_threshold={"token_k2": 0.1, "seq_mean_k1": (0.9, 1.1),
                                "seq_max_k3": 0.5, "opsm": 0.001})
    out = rk.rollout_correction(wide.cuda()[:, ::2], roll.cuda(), fmask.cuda(),
                                advantages=adv.cuda(), backend="cuda", **kw)
    ref = rk.rollout_correction(old.double(), roll.double(), fmask.double(),
                                advantages=adv.double(), backend="torch", **kw)
    torch.testing.assert_close(out[0].double().cpu(), ref[0], rtol=2e-5, atol=2e-5)
    assert torch.equal(out[1].cpu(), ref[1])


@gpu_cuda
def test_nan_valid_position_empty_and_long_rows():
    old, roll, mask, _ = _inputs(5, 20000, seed=4)  # many tokens per thread
    roll[3, 100] = float("nan")
    mask[3, 100] = True
    _compare(dict(level="geometric", reject="seq_max_k2", reject_threshold=0.5), old, roll,
             mask)
    for b, t in ((0, 7), (4, 0)):
        w, k, m = rk.rollout_correction(torch.zeros(b, t, device="cuda"),
                                        torch.zeros(b, t, device="cuda"),
                                        torch.zeros(b, t, dtype=torch.bool, device="cuda"),
                                        backend="cuda")
        assert w.shape == (b, t) and all(float(v) == 0.0 for v in m.values())


@gpu_cuda
def test_determinism_batch_invariance_and_graph_capture():
    old, roll, mask, adv = (x.cuda() for x in _inputs(257, 65, seed=5))
    kw = dict(level="sequence", reject="seq_sum_k3,opsm",
              reject_threshold={"seq_sum_k3": 3.0, "opsm": 0.0}, advantages=adv,
              backend="cuda")
    a = rk.rollout_correction(old, roll, mask, **kw)
    b = rk.rollout_correction(old, roll, mask, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])
    kw1 = dict(kw, advantages=adv[7:8])
    one = rk.rollout_correction(old[7:8], roll[7:8], mask[7:8], **kw1)
    assert torch.equal(one[0][0], a[0][7]) and torch.equal(one[1][0], a[1][7])
    rk.rollout_correction(old, roll, mask, **kw)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        c = rk.rollout_correction(old, roll, mask, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(c[0], a[0]) and torch.equal(c[1], a[1])
    assert all(torch.equal(c[2][n], a[2][n]) for n in a[2])
