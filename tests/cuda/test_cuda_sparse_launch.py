"""The Python half of the cuda sparse launchers (rlkernels/cuda/sparse.py) on CPU tensors,
against a stand-in for rlkernels._C that records the keyword arguments of each call and
checks them against the parameter names in csrc/bindings.cpp (the source, so a launcher and
a binding that disagree fail here even while the built _C is older than csrc). Needs the
built extension for its Rows / Matrix classes."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch

from _cuda_gpu import cpu_expect
from rlkernels.cuda import load_extension

RC = load_extension()
pytestmark = pytest.mark.skipif(RC is None, reason="rlkernels._C not built")
BINDINGS = Path(__file__).resolve().parents[2] / "csrc" / "bindings.cpp"
SEG = 32 * 8192  # csrc/sparse.cu kSparseSegCols


def _binding_params(name: str):
    """The py::arg names of ``m.def(name, ...)`` in csrc/bindings.cpp."""
    text = BINDINGS.read_text()
    start = text.index(f'm.def("{name}"')
    return re.findall(r'py::arg\("(\w+)"\)', text[start:text.index(");", start)])


class _Recorder:
    def __init__(self):
        self.calls = []
        for name in ("Rows", "Matrix", "CODES"):
            setattr(self, name, getattr(RC, name))

    def __getattr__(self, name):
        params = _binding_params(name)

        def launch(*args, **kw):
            assert not args and sorted(kw) == sorted(params), (name, sorted(kw), params)
            self.calls.append((name, kw))
        return launch

    def last(self, name):
        return [kw for n, kw in self.calls if n == name][-1]


@pytest.fixture
def rec(monkeypatch):
    from rlkernels.cuda import sparse, vocab

    r = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    for attr, value in (("extension", lambda: r), ("stream_of", lambda t: 0),
                        ("expect", cpu_expect)):
        monkeypatch.setattr(sparse, attr, value)
    monkeypatch.setattr(vocab, "expect", cpu_expect)  # the logits / row-vector checks
    return r


@pytest.mark.parametrize("vocab", [37, SEG, SEG + 1])
def test_forward_carry(rec, vocab):
    """The per-segment launches' carry buffer: given exactly when the tail is asked for and V
    is above one bitmap segment (csrc/sparse.cu checks it is not null then)."""
    from rlkernels.cuda import sparse as cs
    n, k = 3, 4
    x = torch.zeros(n, vocab)
    idx = torch.randint(0, vocab, (n, k))
    for with_tail in (False, True):
        cs.sparse_logprobs_forward(x, idx, 1.0, "full", with_tail)
        kw = rec.last("sparse_forward")
        assert (kw["carry"] != 0) == (with_tail and vocab > SEG), (vocab, with_tail)
        assert kw["vocab"] == vocab and kw["with_tail"] == with_tail
        cs.sparse_kl_forward(x, idx, torch.randn(n, k), 1.0, with_tail)
        kw = rec.last("sparse_forward")
        assert (kw["carry"] != 0) == (with_tail and vocab > SEG), (vocab, with_tail)


def test_segment_constant_matches_csrc():
    from rlkernels.cuda import sparse as cs
    src = (BINDINGS.parent / "sparse.cu").read_text()
    words = int(re.search(r"constexpr int kSparseWords = (\d+);", src).group(1))
    assert 32 * words == cs._SEG_COLS == SEG
