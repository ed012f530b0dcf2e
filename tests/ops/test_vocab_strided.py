"""Strided logits reach the kernels without a copy (issue 18).

``logits[:, :-1]`` of ``[B, T, V]`` logits (how TRL and verl call the ops: the last position
predicts nothing) cannot be viewed as ``[N, V]``; ``reshape`` would copy all ``N x V``
values. The triton launchers read such rows through two strides, so the op layer passes the
view. A spy on the kernels' first argument proves it: the pointer the kernel receives is
the caller's storage. Values and gradients equal those of the contiguous copy bit for bit
(a row's result depends only on its values).

Shapes: ``B=2, T=5`` (4 rows kept per sequence, so the two-level row index wraps), ``V=7``
(odd: unaligned rows) and ``V=40`` with ``logits[..., :V]`` of a wider tensor.
"""

from __future__ import annotations

import pytest
import torch

import rlkernels
from rlkernels.ops._common import rows

triton_vocab = pytest.importorskip("rlkernels.triton.vocab")


class _Spy:
    """Stands in for a ``@triton.jit`` kernel: records the data pointers of the tensor
    arguments of every launch, then launches the real kernel."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.seen.append({a.data_ptr() for a in args if isinstance(a, torch.Tensor)})
            return launch(*args, **kwargs)
        return run


@pytest.fixture
def spied(monkeypatch):
    """``{kernel name: [pointers of each launch]}`` of the vocabulary kernels launched."""
    from rlkernels.triton import sparse as _sparse
    seen = {}
    for module, name in ((triton_vocab, "_token_logprobs_fwd_kernel"),
                         (triton_vocab, "_token_logprobs_bwd_kernel"),
                         (triton_vocab, "_kl_fwd_kernel"), (triton_vocab, "_kl_bwd_kernel"),
                         (_sparse, "_sparse_fwd_kernel"), (_sparse, "_sparse_bwd_kernel")):
        seen[name] = []
        monkeypatch.setattr(module, name, _Spy(getattr(module, name), seen[name]))
    return seen


def _sliced(b, t, vocab, seed, wide=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(b, t, vocab + wide, generator=g) * 3
    full[0, 1, 2] = 30.0  # a peaked row
    return full, full[:, :-1, :vocab]


def test_rows_views_instead_of_copying():
    full = torch.randn(2, 5, 7)
    x = full[:, :-1]
    assert rows(x).shape == (8, 7) and rows(x).data_ptr() != full.data_ptr()  # a copy
    r = rows(x, strided=True)
    assert r.shape == (2, 4, 7) and r.data_ptr() == full.data_ptr()
    assert rows(full, strided=True).shape == (10, 7)  # mergeable: still [N, V]
    y = torch.randn(3, 2, 5, 7)[:, :, :-1]  # leading dims merge into two
    assert rows(y, strided=True).shape == (6, 4, 7)
    z = torch.randn(3, 4, 5, 7)[:, :-1, :-1]  # three non-mergeable leading dims: a copy
    assert rows(z, strided=True).shape == (36, 7)
    assert torch.equal(rows(z, strided=True), z.reshape(-1, 7))


@pytest.mark.parametrize("vocab, wide", [(7, 0), (40, 3)])
def test_token_logprobs_reads_sliced_logits_in_place(spied, vocab, wide):
    full, x = _sliced(2, 5, vocab, 0, wide)
    tok = torch.randint(0, vocab, (2, 4), generator=torch.Generator().manual_seed(1))
    tok[1, 2] = -100
    leaf = full.clone().requires_grad_(True)
    view = leaf[:, :-1, :vocab]
    lp, h = rlkernels.token_logprobs(view, tok, return_entropy=True, backend="triton",
                                     temperature=0.7)
    (lp.sum() + 0.5 * h.sum()).backward()
    for name in ("_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel"):
        assert len(spied[name]) == 1 and leaf.data_ptr() in spied[name][0]
    ref = x.contiguous().clone().requires_grad_(True)
    lp2, h2 = rlkernels.token_logprobs(ref, tok, return_entropy=True, backend="triton",
                                       temperature=0.7)
    (lp2.sum() + 0.5 * h2.sum()).backward()
    assert torch.equal(lp, lp2) and torch.equal(h, h2)
    assert torch.equal(leaf.grad[:, :-1, :vocab], ref.grad)
    assert not leaf.grad[:, -1].any() and not leaf.grad[..., vocab:].any()


def test_entropy_reads_sliced_logits_in_place(spied):
    full, x = _sliced(2, 5, 7, 2)
    h = rlkernels.entropy(x, backend="triton")
    assert full.data_ptr() in spied["_token_logprobs_fwd_kernel"][0]
    assert torch.equal(h, rlkernels.entropy(x.contiguous(), backend="triton"))


@pytest.mark.parametrize("kind", ["reverse", "jsd"])
def test_kl_divergence_reads_sliced_logits_in_place(spied, kind):
    full, _ = _sliced(2, 5, 7, 3)
    leaf = full.clone().requires_grad_(True)
    ref = torch.randn(2, 4, 7)  # contiguous: a plain [N, V] view next to a sliced one
    kl = rlkernels.kl_divergence(leaf[:, :-1], ref, kind=kind, backend="triton")
    kl.sum().backward()
    for name in ("_kl_fwd_kernel", "_kl_bwd_kernel"):
        assert len(spied[name]) == 1 and leaf.data_ptr() in spied[name][0]
    x = leaf.detach()[:, :-1].contiguous().requires_grad_(True)
    kl2 = rlkernels.kl_divergence(x, ref, kind=kind, backend="triton")
    kl2.sum().backward()
    assert torch.equal(kl, kl2)
    assert torch.equal(leaf.grad[:, :-1], x.grad)


def test_sparse_ops_read_sliced_logits_in_place(spied):
    full, _ = _sliced(2, 5, 7, 4)
    leaf = full.clone().requires_grad_(True)
    idx = torch.tensor([[[0, 3], [1, -1], [6, 2], [5, 4]]] * 2)
    lp, tail = rlkernels.sparse_logprobs(leaf[:, :-1], idx, return_tail=True,
                                         backend="triton")
    (lp.clamp_min(-50).sum() + tail.sum()).backward()
    for name in ("_sparse_fwd_kernel", "_sparse_bwd_kernel"):
        assert len(spied[name]) == 1 and leaf.data_ptr() in spied[name][0]
    x = leaf.detach()[:, :-1].contiguous().requires_grad_(True)
    lp2, tail2 = rlkernels.sparse_logprobs(x, idx, return_tail=True, backend="triton")
    (lp2.clamp_min(-50).sum() + tail2.sum()).backward()
    assert torch.equal(lp, lp2) and torch.equal(tail, tail2)
    assert torch.equal(leaf.grad[:, :-1], x.grad)
    tgt = torch.log_softmax(torch.randn(2, 4, 2), -1)
    kl = rlkernels.sparse_kl(leaf.detach()[:, :-1], idx.clamp_min(0), tgt, backend="triton")
    assert leaf.data_ptr() in spied["_sparse_fwd_kernel"][-1]
    assert torch.equal(kl, rlkernels.sparse_kl(x.detach(), idx.clamp_min(0), tgt,
                                               backend="triton"))
