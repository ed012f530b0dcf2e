"""Peak extra memory of the fused lm_head paths (issue 20), measured on CPU against the models
of benchmarks/NOTES.md ("The fused lm_head's paths (issue 20)", "Peak memory").

What is measured: the bytes of the tensor storages created inside the call (every aten op's
outputs, seen by a ``TorchDispatchMode``; a storage counts from its creation until Python
frees it, views included; the inputs' storages do not count), at their peak and the largest
single one. The triton interpreter's numpy copies are not torch storages: they are not
counted (on a GPU the kernels allocate nothing themselves). The shape makes each model term
distinguishable (fp32, N=128 rows, H=32, V=256, chunks of C=32 rows): ``4 C V`` = ``4 V H``
= 32 KiB, ``4 N H`` = 16 KiB, ``4 C H`` = 4 KiB, and ``4 N V`` = 128 KiB, the ``[N, V]``
tensor that no path may create. Each test asserts the model's bound (an upper bound, with
``r(N) = 64 N + 1 KiB`` for the per-row vectors) and a lower bound made of the terms that
must be alive together, so that a model that is off in either direction fails.
"""

from __future__ import annotations

import os
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rlkernels._policy_options import PolicyOptions

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the triton kernels run on CPU tensors only in the interpreter",
                allow_module_level=True)
pytest.importorskip("triton")

from rlkernels.triton import _linear_gif as gif  # noqa: E402
from rlkernels.triton import linear as lin  # noqa: E402

B, T, H, V, C = 2, 64, 32, 256, 32
N = B * T
F = 4  # fp32 bytes


def _r(n: int) -> int:
    """The per-row vectors (log-probs, entropies, statistics, per-token gradients...)."""
    return 64 * n + 1024


class _LiveBytes(TorchDispatchMode):
    """The live bytes of the storages created while active: ``peak`` and ``largest``."""

    def __init__(self, *inputs):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self._seen = set()
        self._skip = {t.untyped_storage().data_ptr() for t in inputs if t is not None}

    def _free(self, key, n):
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            key, n = s.data_ptr(), s.nbytes()
            if n == 0 or key in self._seen or key in self._skip:
                continue
            self._seen.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, n)
            weakref.finalize(s, self._free, key, n)
        return out


@pytest.fixture(scope="module")
def inp():
    g = torch.Generator().manual_seed(0)
    return dict(hidden=torch.randn(N, H, generator=g),
                weight=0.1 * torch.randn(V, H, generator=g),
                tokens=torch.randint(0, V, (B, T), generator=g),
                old_logp=torch.randn(B, T, generator=g) - 5.0,
                advantages=torch.randn(B, generator=g),
                mask=torch.ones(B, T, dtype=torch.bool),
                grad_logp=1e-3 * torch.randn(N, generator=g))


def _measure(inp, fn):
    with _LiveBytes(*inp.values()) as m:
        out = fn()
    return m, out


def _no_logits(m):
    """No ``[N, V]`` tensor, nor anything near its size."""
    assert m.largest <= max(F * C * V, F * V * H, F * N * H) < F * N * V
    assert m.peak < F * N * V


@pytest.mark.parametrize("need_weight", [True, False])
def test_gif_chunk_loop(inp, need_weight):
    """grad_in_forward's chunk loop: ``4 C V`` (logits / ``d z``) ``+ 4 V H`` (the ``d W``
    accumulator, only when the weight needs a gradient) ``+ 4 N H`` (``d hidden``) ``+ 3 x
    4 C H`` (the hidden chunk, its padding select, ``d hidden`` of the chunk) ``+ r(N)``."""
    m, _ = _measure(inp, lambda: gif.linear_grpo_loss_gif_forward(
        inp["hidden"], inp["weight"], None, inp["tokens"], inp["old_logp"],
        inp["advantages"], inp["mask"], None, None, None, 1.0, PolicyOptions(), None, None,
        True, need_weight, False, chunk_rows=C))
    dw = F * V * H if need_weight else 0
    model = F * C * V + dw + F * N * H + 3 * F * C * H + _r(N)
    must = F * C * V + dw + F * N * H + 2 * F * C * H
    assert must <= m.peak <= model, (must, m.peak, model)
    _no_logits(m)


def test_cublas_forward(inp):
    """The cuBLAS path's forward: ``4 C V`` (the logits chunk) ``+ 2 x 4 C H`` (the hidden
    chunk and its padding select) ``+ r(N)``."""
    m, _ = _measure(inp, lambda: lin._cublas_forward(
        inp["hidden"], inp["weight"], None, inp["tokens"].reshape(-1), 1.0, -100, True, None,
        C))
    assert F * C * V <= m.peak <= F * C * V + 2 * F * C * H + _r(N), m.peak
    _no_logits(m)


def test_cublas_backward(inp):
    """The cuBLAS path's backward with vocabulary slices of ``S = 64`` columns and a ``d z``
    budget of one chunk (``G = C`` rows): ``4 G S`` (``d z``) ``+ 4 C S`` (the logits slice)
    ``+ 2 x 4 N H`` (the fp32 ``d hidden`` accumulator and the zero-padded hidden) ``+ 4 V H``
    (``d W``) ``+ 2 x 4 S H`` (the fp32 ``d W`` slice accumulator, N spanning several
    groups, and its GEMM's result) ``+ 4 C H`` (a ``d hidden`` GEMM's result) ``+ r(N)``."""
    s = 64
    fwd = lin._cublas_forward(inp["hidden"], inp["weight"], None, inp["tokens"].reshape(-1),
                              1.0, -100, True, None, C)
    m, _ = _measure(inp, lambda: lin._cublas_backward(
        inp["grad_logp"], None, inp["hidden"], inp["weight"], None,
        inp["tokens"].reshape(-1), fwd[2], 1.0, -100, None, C, s, F * C * s))
    model = (F * C * s + F * C * s + 2 * F * N * H + F * V * H + 2 * F * s * H + F * C * H
             + _r(N))
    must = F * C * s + 2 * F * N * H + F * V * H
    assert must <= m.peak <= model, (must, m.peak, model)
    _no_logits(m)


def test_triton_path(inp):
    """The triton kernels: the forward allocates its outputs only (one vocabulary split off
    a GPU; on a GPU ``16 x splits x N`` bytes of partial statistics more); the backward
    ``d z`` of one vocabulary slice (at most ``dz_bytes``) ``+ 4 N H`` (the fp32 ``d hidden``
    accumulator) ``+ 4 V H`` (``d W``) ``+ r(N)``."""
    tok = inp["tokens"].reshape(-1)
    m, fwd = _measure(inp, lambda: lin.linear_token_logprobs_forward(
        inp["hidden"], inp["weight"], None, tok, 1.0, -100, True, None, "triton"))
    assert m.peak <= _r(N), m.peak
    dz_bytes = F * N * 64
    m, _ = _measure(inp, lambda: lin.linear_token_logprobs_backward(
        inp["grad_logp"], None, inp["hidden"], inp["weight"], None, tok, fwd[2], 1.0, -100,
        None, "triton", dz_bytes=dz_bytes))
    must = F * N * H + F * V * H
    assert must <= m.peak <= dz_bytes + must + _r(N), (must, m.peak)
    _no_logits(m)
