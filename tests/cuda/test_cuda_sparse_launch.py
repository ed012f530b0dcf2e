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


def test_csr_views(rec):
    """CSR (issue 21): flat ids / targets / grad_logp / logp reach the kernels as [nnz]
    views (stride1 = their stride, no copy for int64), offsets as int64, k = nnz; the
    backward's sorted ids and row slots are [nnz] int32; a padded call passes offsets 0."""
    from rlkernels.cuda import sparse as cs
    n, vocab = 4, 37
    x = torch.zeros(n, vocab)
    offsets = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    ids = torch.tensor([3, -1, 8, 8, 1, 36, 0, 0], dtype=torch.int64)[:6]
    lp, tail, stats = cs.sparse_logprobs_forward(x, ids, 1.0, "support", True, offsets)
    kw = rec.last("sparse_forward")
    assert kw["offsets"] != 0 and kw["k"] == 6 and kw["n"] == n
    assert kw["indices"].ptr == ids.data_ptr() and kw["indices"].stride1 == 1
    assert lp.shape == (6,) and kw["out"].ptr == lp.data_ptr()
    assert torch.isneginf(lp).all()  # untouched positions stay -inf (the recorder ran nothing)
    strided = torch.randn(12)[::2]
    cs.sparse_kl_forward(x, ids, strided, 1.0, True, offsets)
    kw = rec.last("sparse_forward")
    assert kw["target"].stride1 == 2 and kw["target"].ptr == strided.data_ptr()
    g = torch.randn(6)
    cs.sparse_logprobs_backward(g, torch.ones(n), x, ids, lp, tail, stats, 1.0, "support",
                                offsets)
    kw = rec.last("sparse_backward")
    assert kw["offsets"] != 0 and kw["k"] == 6
    assert kw["slot_values"].ptr == g.data_ptr() and kw["logp"].ptr == lp.data_ptr()
    cs.sparse_logprobs_forward(x, torch.zeros(n, 3, dtype=torch.int64), 1.0, "full", False)
    assert rec.last("sparse_forward")["offsets"] == 0


def test_csr_sorted_slots():
    """The backward's per-row sort of a flat CSR array (one device sort by (row, id)): each
    row's range holds its ids sorted (stable; -1 and >= V last as the sentinel) and their
    slots within the row, as the padded sort gives; a view of offsets sorts its rows alike."""
    from rlkernels.cuda import sparse as cs
    g = torch.Generator().manual_seed(0)
    vocab = 50
    lens = torch.tensor([3, 0, 5, 1, 4, 0, 2])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    ids = torch.randint(-1, vocab + 3, (int(offsets[-1]),), generator=g)
    ids[3:6] = 7  # duplicates in row 2
    sid, slot = cs._sorted_ids_csr(ids, offsets, vocab)
    assert sid.dtype == slot.dtype == torch.int32
    for r in range(len(lens)):
        a, b = int(offsets[r]), int(offsets[r + 1])
        s, p = cs._sorted_ids(ids[a:b][None], vocab)
        assert torch.equal(sid[a:b], s[0]) and torch.equal(slot[a:b], p[0]), r
    sid_v, slot_v = cs._sorted_ids_csr(ids, offsets[2:6], vocab)
    a, b = int(offsets[2]), int(offsets[5])
    assert torch.equal(sid_v[a:b], sid[a:b]) and torch.equal(slot_v[a:b], slot[a:b])


def test_csr_shape_errors(rec):
    from rlkernels.cuda import sparse as cs
    x = torch.zeros(4, 37)
    ids = torch.zeros(6, dtype=torch.int64)
    with pytest.raises(AssertionError, match="offsets"):  # cpu_expect: the name first
        cs.sparse_logprobs_forward(x, ids, 1.0, "full", True, torch.tensor([0, 2, 6]))
    with pytest.raises(AssertionError, match="indices"):
        cs.sparse_logprobs_forward(x, ids.view(2, 3), 1.0, "full", True,
                                   torch.tensor([0, 2, 2, 5, 6]))
