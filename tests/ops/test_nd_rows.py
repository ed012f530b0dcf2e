"""Kernels that take the public shapes (``ND_ROWS``, issue 19).

A backend module that says ``ND_ROWS = True`` receives the eager ops' inputs as the user
gave them (logits ``[..., V]``, per-row tensors ``[...]``, upstream gradients in the
outputs' shapes) and returns per-row outputs ``[...]`` and gradients in the inputs' shapes:
the op layer then makes no view or reshape of its own (each ~5-10 us of host time).

Each kernel called on a layout below must equal, bit for bit, the same kernel called on the
``[N, V]`` rows (a row's result depends only on its values): contiguous ``[B, T, V]``, the
``logits[:, :-1]`` slice (rows that do not merge), 4-D (merging into one and into two row
strides), 1-D ``[V]`` with 0-d tokens, non-contiguous tokens, expanded upstream gradients
(stride 0) and the in-place backward (``out=logits``).
"""

from __future__ import annotations

import importlib

import pytest
import torch

from _naive import make_indices, make_logits, make_tokens
from rlkernels import backends

V = 11  # odd: unaligned rows


def _modules():
    out = []
    for backend in ("torch", "triton", "cuda"):
        if backends.available_backends().get(backend) != "ok":
            continue
        try:
            mod = backends._module(backend, "vocab")
        except Exception:  # pragma: no cover - an unavailable backend
            continue
        if getattr(mod, "ND_ROWS", False):
            out.append(pytest.param(mod, id=backend))
    return out


MODULES = _modules()


def _layouts():
    """name -> (logits, tokens) in public shape; tokens may be a non-contiguous view."""
    def base(*lead, seed=0):
        n = 1
        for d in lead:
            n *= d
        return make_logits(n, V, torch.float32, seed=seed).view(*lead, V)

    full = base(2, 4, seed=1)
    four = base(2, 3, 3, seed=2)
    tok_wide = make_tokens(base(2, 6, seed=3), pad_every=4)
    return {
        "3d": (base(2, 3), None),
        "slice": (full[:, :-1], None),
        "4d": (base(2, 2, 2, seed=4), None),
        "4d_slice": (four[:, :, :-1], None),
        "1d": (base(1)[0], None),
        "strided_tokens": (base(2, 3, seed=5), tok_wide[:, ::2]),
    }


LAYOUTS = _layouts()


def _case(name):
    x, tok = LAYOUTS[name]
    if tok is None:
        tok = make_tokens(x, pad_every=3)
    return x, tok


def _flat(t):
    return None if t is None else t.reshape(-1)


def _rows(x):
    return x.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("with_entropy", [False, True])
def test_token_logprobs_kernels_take_public_shapes(mod, layout, with_entropy):
    x, tok = _case(layout)
    lead = x.shape[:-1]
    out = mod.token_logprobs_forward(x, tok, 0.7, -100, with_entropy)
    ref = mod.token_logprobs_forward(_rows(x), _flat(tok), 0.7, -100, with_entropy)
    assert [o.shape for o in out] == [lead, lead, (*lead, 3)]
    for o, r in zip(out, ref):
        assert torch.equal(_rows(o) if o.dim() > len(lead) else o.reshape(-1),
                           r if r.dim() == 2 else r.reshape(-1))
    # upstream gradients in the outputs' shapes: a plain one and an expanded one (stride 0,
    # as the gradient of a sum arrives)
    g_lp = torch.linspace(-1, 1, max(tok.numel(), 1))[:tok.numel()].reshape(lead)
    g_h = torch.full((), 0.5).expand(lead) if with_entropy else None
    grad = mod.token_logprobs_backward(g_lp, g_h, x, tok, out[2], 0.7, -100)
    want = mod.token_logprobs_backward(_flat(g_lp), _flat(g_h), _rows(x), _flat(tok), ref[2],
                                       0.7, -100)
    assert grad.shape == x.shape and torch.equal(_rows(grad), want)
    # in place: the gradient lands in the logits' own storage, whatever their layout
    y = x.clone()
    if layout.endswith("slice"):  # the same non-merging layout as x
        big = torch.zeros(*x.shape[:-2], x.shape[-2] + 1, V)
        big[..., :-1, :] = x
        y = big[..., :-1, :]
    res = mod.token_logprobs_backward(g_lp, g_h, y, tok, out[2], 0.7, -100, out=y)
    assert res is y and torch.equal(_rows(y), want)


@pytest.mark.parametrize("layout", ["3d", "slice", "4d", "4d_slice", "1d"])
@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("kind", ["reverse", "jsd", "tv"])
def test_kl_kernels_take_public_shapes(mod, layout, kind):
    x, _ = LAYOUTS[layout]
    y = (x * 0.5 + 1.0)
    lead = x.shape[:-1]
    mask = (torch.arange(max(x.numel() // V, 1)) % 3 == 1)[:x.numel() // V].reshape(lead)
    beta = 0.3
    out = mod.kl_divergence_forward(x, y, mask, kind, beta, 1.3)
    ref = mod.kl_divergence_forward(_rows(x), _rows(y), _flat(mask), kind, beta, 1.3)
    assert [o.shape for o in out] == [lead, (*lead, 3), (*lead, 3)]
    assert torch.equal(out[0].reshape(-1), ref[0])
    assert torch.equal(_rows(out[1]), ref[1]) and torch.equal(_rows(out[2]), ref[2])
    g = torch.full((), 2.0).expand(lead)
    gz, gw = mod.kl_divergence_backward(g, x, y, mask, out[1], out[2], kind, beta, 1.3, True)
    wz, ww = mod.kl_divergence_backward(_flat(g), _rows(x), _rows(y), _flat(mask), ref[1],
                                        ref[2], kind, beta, 1.3, True)
    assert gz.shape == gw.shape == x.shape
    assert torch.equal(_rows(gz), wz) and torch.equal(_rows(gw), ww)


def test_nd_modules_found():
    """The torch backend's vocab kernels take the public shapes (so the tests above ran)."""
    assert any(p.id == "torch" for p in MODULES)
    assert importlib.import_module("rlkernels.reference.vocab").ND_ROWS is True



def _sparse_modules():
    out = []
    for p in MODULES:
        mod = backends._module(p.id, "sparse")
        if getattr(mod, "ND_ROWS", False):
            out.append(pytest.param(mod, id=p.id))
    return out


@pytest.mark.parametrize("layout", ["3d", "slice", "4d", "4d_slice", "1d"])
@pytest.mark.parametrize("mod", _sparse_modules())
@pytest.mark.parametrize("normalize", ["full", "support"])
def test_sparse_kernels_take_public_shapes(mod, layout, normalize):
    """Padded supports ``[..., K]`` (logits, ids, targets, upstream gradients in their public
    shapes) equal the ``[N, V]`` / ``[N, K]`` call bit for bit."""
    x, _ = LAYOUTS[layout]
    lead, k = x.shape[:-1], 4
    idx = make_indices(x, k)
    out = mod.sparse_logprobs_forward(x, idx, 0.9, normalize, True)
    ref = mod.sparse_logprobs_forward(_rows(x), _rows(idx), 0.9, normalize, True)
    assert [o.shape for o in out] == [(*lead, k), lead, (*lead, 3)]
    assert torch.equal(_rows(out[0]), ref[0]) and torch.equal(out[1].reshape(-1), ref[1])
    g = torch.linspace(-1, 1, idx.numel()).reshape(idx.shape)
    g_t = torch.full((), 0.25).expand(lead)
    grad = mod.sparse_logprobs_backward(g, g_t, x, idx, out[0], out[1], out[2], 0.9,
                                        normalize)
    want = mod.sparse_logprobs_backward(_rows(g), _flat(g_t), _rows(x), _rows(idx), ref[0],
                                        ref[1], ref[2], 0.9, normalize)
    assert grad.shape == x.shape and torch.equal(_rows(grad), want)
    target = torch.log_softmax(torch.linspace(0, 1, idx.numel()).reshape(idx.shape), -1)
    kl = mod.sparse_kl_forward(x, idx, target, 0.9, True)
    kl_ref = mod.sparse_kl_forward(_rows(x), _rows(idx), _rows(target), 0.9, True)
    assert [o.shape for o in kl] == [lead, lead, (*lead, 3)]
    assert torch.equal(kl[0].reshape(-1), kl_ref[0])
    g_kl = torch.full((), 1.5).expand(lead)
    gk = mod.sparse_kl_backward(g_kl, x, idx, target, kl[1], kl[2], 0.9, True)
    gk_ref = mod.sparse_kl_backward(_flat(g_kl), _rows(x), _rows(idx), _rows(target),
                                    kl_ref[1], kl_ref[2], 0.9, True)
    assert gk.shape == x.shape and torch.equal(_rows(gk), gk_ref)

# ------------------------------------------------- the public ops: ND path == mapped path

def _mapped(monkeypatch):
    """Turn the ND path off (every module's ``ND_ROWS`` read as False): the op layer maps
    the inputs to ``[N, V]`` rows and views the outputs, as for a backend without it."""
    from rlkernels.ops import _table
    monkeypatch.setattr(_table.Op, "_e_nd", lambda self, backend: False)


def _public_cases(backend):
    import rlkernels as rk
    full = make_logits(2 * 5, V, torch.float32, seed=7).view(2, 5, V)
    x = full[:, :-1]  # the TRL / verl slice: rows that do not merge
    tok = make_tokens(x, pad_every=3)
    y = make_logits(2 * 4, V, torch.float32, seed=8).view(2, 4, V)
    mask = torch.rand(2, 4, generator=torch.Generator().manual_seed(0)) < 0.8
    old = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)) - 2
    adv = torch.tensor([0.5, -1.0])
    ids = make_indices(x, 3)
    target = torch.log_softmax(torch.randn(ids.shape, generator=torch.Generator()
                                           .manual_seed(2)), -1)
    offsets = torch.arange(0, ids.numel() + 1, 3)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 16, generator=g)[:, :-1]  # [B, T, H] rows that do not merge
    weight = torch.randn(V, 16, generator=g) / 4
    bk = dict(backend=backend)
    return {
        "token_logprobs": (x, lambda z: rk.token_logprobs(z, tok, return_entropy=True,
                                                          temperature=0.8, **bk)),
        "entropy": (x, lambda z: rk.entropy(z, **bk)),
        "kl_divergence": (x, lambda z: rk.kl_divergence(z, y, ignore_mask=~mask, **bk)),
        "grpo_loss": (x, lambda z: rk.grpo_loss(z, tok, old, adv, mask, entropy_coef=0.01,
                                                **bk)),
        "sparse_logprobs": (x, lambda z: rk.sparse_logprobs(z, ids, return_tail=True,
                                                            normalize="support", **bk)),
        "sparse_kl": (x, lambda z: rk.sparse_kl(z, ids, target, tail=True, **bk)),
        "sparse_logprobs_csr": (x, lambda z: rk.sparse_logprobs(
            z, ids.reshape(-1), offsets=offsets, return_tail=True, **bk)),
        "linear_token_logprobs": (hidden, lambda h: rk.linear_token_logprobs(
            h, weight, tok, return_entropy=True, **bk)),
        "linear_grpo_loss": (hidden, lambda h: rk.linear_grpo_loss(h, weight, tok, old, adv,
                                                                   mask, **bk)),
    }


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [t for o in out for t in _tensors(o)]


@pytest.mark.parametrize("op", ["token_logprobs", "entropy", "kl_divergence", "grpo_loss",
                                "sparse_logprobs", "sparse_kl", "sparse_logprobs_csr",
                                "linear_token_logprobs", "linear_grpo_loss"])
@pytest.mark.parametrize("backend", [p.id for p in MODULES])
def test_public_nd_path_equals_mapped_path(op, backend, monkeypatch):
    """The same values, output shapes, gradients (in the logits' shape and layout-free), and
    the same autograd behaviour, with and without the ND path."""
    def run(nd):
        x, fn = _public_cases(backend)[op]
        leaf = x.detach().clone().requires_grad_(True)
        out = _tensors(fn(leaf))
        first = out[0]
        weight = torch.linspace(0, 1, first.numel()).view(first.shape)
        (first.float() * weight).sum().backward()
        # ND: outputs of their own, which a user may change in place (a view made in the
        # Function could not be; the metrics dict holds views of one tensor by design). A
        # saved output changed in place is caught by backward's version check
        for o in (out[:1] if op.endswith("grpo_loss") else out) if nd else ():
            assert not o._is_view()
        return [o.detach() for o in out], leaf.grad

    from rlkernels.ops import _table
    seen, nd = [], _table.Op._e_nd

    def spy(self, b):
        seen.append(nd(self, b))
        return seen[-1]

    monkeypatch.setattr(_table.Op, "_e_nd", spy)
    nd_out, nd_grad = run(True)
    assert any(seen), "the ND path was not taken"
    _mapped(monkeypatch)
    ref_out, ref_grad = run(False)
    assert [o.shape for o in nd_out] == [o.shape for o in ref_out]
    for a, b in zip(nd_out, ref_out):  # bit for bit (NaN where the KL of -inf columns is)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert nd_grad.shape == ref_grad.shape
    torch.testing.assert_close(nd_grad, ref_grad, rtol=0, atol=0, equal_nan=True)

