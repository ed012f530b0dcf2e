"""PyTorch integration and invariances of the vocabulary ops.

* ``torch.autograd.gradcheck`` in fp64 on tiny shapes (every differentiable op and option);
* ``torch.library.opcheck`` on every custom op of the family (schema, fake tensors, autograd
  registration, AOT dispatch);
* ``torch.compile(fullgraph=True)``: forward and backward equal eager;
* chunk invariance (``rlkernels.reference.CHUNK_ELEMENTS``), batch invariance (a row alone
  equals that row in a batch) and determinism, all bit for bit (SPEC section 1);
* hypothesis-driven random shapes, dtypes and temperatures, backend vs the naive formulas.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _naive as naive
import rlkernels
import rlkernels.reference
from _naive import (LOW_DTYPES, assert_grad_close, assert_values_close, bit_equal,
                    fp32_floor, make_indices, make_logits, make_targets, make_tokens, needs,
                    row_weight)

ops = torch.ops.rlkernels
# opcheck goes through torch.jit internals that warn about their own deprecation
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
KL_KINDS = ["reverse", "forward", "jsd"]


# ================================================================================ gradcheck

def _x(n, vocab, seed, *, masked_col=None):
    """Tiny fp64 logits (gradcheck perturbs them by 1e-6: -inf columns stay -inf)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g, dtype=torch.float64)
    if masked_col is not None:
        x[:, masked_col] = -math.inf
    return x.requires_grad_(True)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_gradcheck_token_logprobs(with_entropy):
    x = _x(4, 5, 0, masked_col=3)
    tok = torch.tensor([1, -100, 4, 3])  # a padding row, a target at a -inf column

    def f(x):
        out = rlkernels.token_logprobs(x, tok, temperature=0.8, return_entropy=with_entropy,
                                       backend="torch")
        lp = out[0] if with_entropy else out
        lp = torch.where(torch.isfinite(lp), lp, 0.0)  # -inf for the masked target
        return (lp, out[1]) if with_entropy else lp

    assert torch.autograd.gradcheck(f, (x,))


def test_gradcheck_entropy():
    x = _x(6, 5, 1, masked_col=0)
    assert torch.autograd.gradcheck(
        lambda x: rlkernels.entropy(x.view(2, 3, 5), temperature=1.3, backend="torch"), (x,))


@pytest.mark.parametrize("normalize", ["full", "support"])
@pytest.mark.parametrize("tail", [False, True])
def test_gradcheck_sparse_logprobs(normalize, tail):
    x = _x(3, 6, 2)
    idx = torch.tensor([[0, 2, -1], [5, 4, 3], [1, -1, -1]])
    valid = idx >= 0

    def f(x):
        out = rlkernels.sparse_logprobs(x, idx, temperature=0.9, normalize=normalize,
                                        return_tail=tail, backend="torch")
        lp = (out[0] if tail else out)[valid]  # -1 slots are -inf constants
        return (lp, out[1]) if tail else lp

    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("tail", [False, True])
def test_gradcheck_sparse_kl(tail):
    x = _x(3, 6, 3)
    idx = torch.tensor([[0, 2, -1], [5, 4, 3], [1, -1, -1]])
    target = torch.log_softmax(torch.randn(3, 6, dtype=torch.float64), -1).gather(
        1, idx.clamp_min(0))
    assert torch.autograd.gradcheck(
        lambda x: rlkernels.sparse_kl(x, idx, target, temperature=1.2, tail=tail,
                                      backend="torch"), (x,))


@pytest.mark.parametrize("kind,beta", [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.5),
                                       ("jsd", 0.2), ("jsd", 0.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_kl_divergence(kind, beta, masked):
    x = _x(4, 5, 4, masked_col=2 if masked else None)
    y = _x(4, 5, 5, masked_col=2 if masked else None)
    mask = torch.tensor([False, True, False, False]) if masked else None
    assert torch.autograd.gradcheck(
        lambda x, y: rlkernels.kl_divergence(x, y, kind=kind, beta=beta, temperature=0.9,
                                             ignore_mask=mask, backend="torch"), (x, y))


# ================================================================================== opcheck

def _opcheck_cases():
    """(name, op, args): valid sample arguments for every custom op of the family."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(4, 7, generator=g, requires_grad=True)
    xd = x.detach()
    y = torch.randn(4, 7, generator=g, requires_grad=True)
    tok = torch.tensor([1, 2, -100, 6])
    idx = torch.tensor([[0, 3], [6, -1], [2, 2], [-1, -1]])
    target = torch.log_softmax(torch.randn(4, 7, generator=g), -1).gather(1, idx.clamp_min(0))
    mask = torch.tensor([False, True, False, False])
    gn = torch.randn(4, generator=g)
    lp, _, lse = ops.token_logprobs(xd, tok, 0.7, -100, True, "torch")
    slp, stail, slse = ops.sparse_logprobs(xd, idx, 0.7, "support", True, "torch")
    _, s_tail, klse = ops.sparse_kl(xd, idx, target, 0.7, True, "torch")
    _, lse_p, lse_q = ops.kl_divergence(xd, y.detach(), mask, "jsd", 0.3, 0.7, "torch")
    return [
        ("token_logprobs", ops.token_logprobs.default, (x, tok, 0.7, -100, True, "torch")),
        ("token_logprobs/entropy-only", ops.token_logprobs.default,
         (x, None, 1.0, -100, True, "torch")),
        ("token_logprobs_backward", ops.token_logprobs_backward.default,
         (gn, gn, xd, tok, lse, 0.7, -100, "torch")),
        ("sparse_logprobs", ops.sparse_logprobs.default, (x, idx, 0.7, "full", True, "torch")),
        ("sparse_logprobs/support", ops.sparse_logprobs.default,
         (x, idx, 0.7, "support", False, "torch")),
        ("sparse_logprobs_backward", ops.sparse_logprobs_backward.default,
         (torch.randn(4, 2, generator=g), gn, xd, idx, slp, stail, slse, 0.7, "support",
          None, "torch")),
        ("sparse_kl", ops.sparse_kl.default, (x, idx, target, 0.7, True, "torch")),
        ("sparse_kl_backward", ops.sparse_kl_backward.default,
         (gn, xd, idx, target, s_tail, klse, 0.7, True, None, "torch")),
        ("kl_divergence", ops.kl_divergence.default,
         (x, y, mask, "jsd", 0.3, 0.7, "torch")),
        ("kl_divergence/no-mask", ops.kl_divergence.default,
         (x, y, None, "reverse", 0.5, 1.0, "torch")),
        ("kl_divergence_backward", ops.kl_divergence_backward.default,
         (gn, xd, y.detach(), mask, lse_p, lse_q, "jsd", 0.3, 0.7, True, "torch")),
        ("kl_divergence_backward/no-ref-grad", ops.kl_divergence_backward.default,
         (gn, xd, y.detach(), None, lse_p, lse_q, "forward", 0.5, 0.7, False, "torch")),
    ]


@pytest.mark.parametrize("case", range(len(_opcheck_cases())),
                         ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(case):
    _, op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ============================================================================ torch.compile

def test_compile_token_logprobs_fullgraph():
    """Inductor, fullgraph: the custom ops compile without graph breaks; the op's outputs and
    the gradient through them equal eager bit for bit (the loss around them is fused by
    inductor, so it only matches to rounding)."""
    def f(x, tok, w):
        lp, h = rlkernels.token_logprobs(x, tok, temperature=0.7, return_entropy=True,
                                         backend="torch")
        return (lp * w).sum() - 0.01 * h.sum(), lp, h

    x = make_logits(6, 129, torch.float32, seed=7).view(2, 3, 129).requires_grad_(True)
    tok = make_tokens(x, pad_every=4)
    w = torch.randn(2, 3)
    torch._dynamo.reset()
    loss_c, lp_c, h_c = torch.compile(f, fullgraph=True)(x, tok, w)
    (g_c,) = torch.autograd.grad(loss_c, x)
    loss_e, lp_e, h_e = f(x, tok, w)
    (g_e,) = torch.autograd.grad(loss_e, x)
    assert bit_equal(lp_c.detach(), lp_e.detach()) and bit_equal(h_c.detach(), h_e.detach())
    assert bit_equal(g_c, g_e)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-6)


def test_compile_other_ops_fullgraph():
    """The other custom ops under torch.compile(fullgraph=True) with the aot_eager backend
    (tracing, fake tensors and the autograd graph; no C++ compile, so it stays fast)."""
    x = make_logits(4, 33, torch.float32, kind="peaked", seed=8).requires_grad_(True)
    y = make_logits(4, 33, torch.float32, kind="normal", seed=9).requires_grad_(True)
    idx = make_indices(x, 5)
    target = make_targets(x, idx)
    mask = torch.tensor([False, False, True, False])

    def f(x, y):
        a = rlkernels.sparse_logprobs(x, idx, normalize="support", return_tail=True,
                                      backend="torch")
        b = rlkernels.sparse_kl(x, idx, target, backend="torch")
        c = rlkernels.kl_divergence(x, y, kind="jsd", beta=0.3, ignore_mask=mask,
                                    backend="torch")
        d = rlkernels.entropy(x, backend="torch")
        lp = torch.where(idx >= 0, a[0], 0.0)
        return lp.sum() + a[1].sum() + b.sum() + c.sum() + d.sum(), (a[0], a[1], b, c, d)

    torch._dynamo.reset()
    loss_c, outs_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x, y)
    g_c = torch.autograd.grad(loss_c, (x, y))
    loss_e, outs_e = f(x, y)
    g_e = torch.autograd.grad(loss_e, (x, y))
    assert all(bit_equal(a.detach(), b.detach()) for a, b in zip(outs_c, outs_e))
    assert all(bit_equal(a, b) for a, b in zip(g_c, g_e))
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-6)


# ========================================================== chunk / batch invariance, determinism

def _run_all(backend, x, y, tok, idx, target, mask, rows=None):
    """Every op on (a row subset of) the inputs: outputs and gradients, in a flat list."""
    if rows is not None:
        x, y, tok, idx, target, mask = (t[rows] for t in (x, y, tok, idx, target, mask))
    results = []
    cases = [
        ("token_logprobs", lambda x, y: rlkernels.token_logprobs(
            x, tok, temperature=0.7, return_entropy=True, backend=backend)),
        ("entropy", lambda x, y: (rlkernels.entropy(x, backend=backend),)),
        ("sparse_logprobs", lambda x, y: rlkernels.sparse_logprobs(
            x, idx, return_tail=True, backend=backend)),
        ("sparse_logprobs", lambda x, y: rlkernels.sparse_logprobs(
            x, idx, normalize="support", backend=backend)[..., None, :].unbind(-2)),
        ("sparse_kl", lambda x, y: (rlkernels.sparse_kl(x, idx, target, backend=backend),)),
    ] + [("kl_divergence", lambda x, y, k=k: (rlkernels.kl_divergence(
        x, y, kind=k, beta=0.3, ignore_mask=mask, backend=backend),)) for k in KL_KINDS]
    for op, fn in cases:
        needs(backend, "token_logprobs" if op == "entropy" else op, x.device, x.numel())
        xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        outs = fn(xl, yl)
        loss = sum(torch.where(torch.isfinite(o), o, 0.0).sum() for o in outs)
        grads = torch.autograd.grad(loss, (xl, yl), allow_unused=True)
        results += [o.detach() for o in outs] + [g for g in grads if g is not None]
    results.append(rlkernels.sampling_support(x, top_k=40, top_p=0.9))
    results.append(rlkernels.sampling_support(x, top_p=0.8))
    return results


def _inputs(vocab=50257, n=5, device="cpu"):
    # V = 50257: rows above the CPU reduction grain (32768), where a lone row would be
    # reduced by several threads; bf16 values, fp32 compute
    x = make_logits(n, vocab, torch.bfloat16, seed=10, device=device)
    y = make_logits(n, vocab, torch.bfloat16, kind="normal", seed=11, device=device)
    y = torch.where(torch.isinf(x), x, y)
    tok = make_tokens(x, pad_every=4)
    idx = make_indices(x, 12)
    mask = torch.arange(n, device=device) % 3 == 0
    return x, y, tok, idx, make_targets(x, idx), mask


@pytest.mark.parametrize("chunk", ["two_rows", "one_row"])
def test_chunk_invariance(monkeypatch, chunk):
    """The torch backend's row chunking changes nothing, bit for bit (5 rows: one chunk by
    default; 2 + 2 + 1 rows, or one row at a time, when patched)."""
    inputs = _inputs()
    default = _run_all("torch", *inputs)
    vocab = inputs[0].shape[-1]
    monkeypatch.setattr(rlkernels.reference, "CHUNK_ELEMENTS", 2 * vocab if chunk == "two_rows"
                        else 1)
    patched = _run_all("torch", *inputs)
    assert len(default) == len(patched)
    for i, (a, b) in enumerate(zip(default, patched)):
        assert bit_equal(a, b), f"result #{i} changed with the chunk size"


def test_batch_invariance(backend, device):
    """A row alone gives the same bits as the same row inside a batch."""
    inputs = _inputs(device=device)
    full = _run_all(backend, *inputs)
    for r in (0, 3, 4):
        alone = _run_all(backend, *inputs, rows=slice(r, r + 1))
        for i, (a, b) in enumerate(zip(full, alone)):
            if a.shape[-1] != b.shape[-1] and a.dtype == torch.int64:
                b = torch.nn.functional.pad(b, (0, a.shape[-1] - b.shape[-1]), value=-1)
            assert bit_equal(a[r:r + 1], b), f"row {r}, result #{i} differs alone / in batch"


def test_determinism(backend, device):
    inputs = _inputs(device=device)
    first, second = _run_all(backend, *inputs), _run_all(backend, *inputs)
    assert all(bit_equal(a, b) for a, b in zip(first, second))


# =============================================================================== hypothesis

@st.composite
def _case(draw):
    return dict(
        n=draw(st.integers(1, 5)),
        vocab=draw(st.sampled_from([1, 2, 3, 7, 16, 31, 64, 100, 129, 257, 300])),
        k=draw(st.integers(1, 8)),
        temperature=draw(st.sampled_from([0.3, 0.7, 1.0, 1.7])),
        dtype=draw(st.sampled_from(LOW_DTYPES)),
        kind=draw(st.sampled_from(["mixed", "normal", "peaked", "flat", "masked",
                                   "peaked_masked"])),
        seed=draw(st.integers(0, 2 ** 16)),
    )


_HYPO = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def _grad(outs, x, seed):
    """Gradients of ``sum(w * out)`` for random upstream ``w`` (finite outputs only), and the
    ``upstream`` magnitude for :func:`fp32_floor`."""
    g = torch.Generator().manual_seed(seed)
    loss, up = 0, 0.0
    lead = (x[0] if isinstance(x, tuple) else x).dim() - 1
    for o in outs:
        w = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype).to(o.device)
        loss = loss + (torch.where(torch.isfinite(o), o, 0.0) * w).sum()
        up += row_weight(w, per_row_dims=o.dim() - lead)
    return torch.autograd.grad(loss, x), up


@_HYPO
@given(case=_case())
def test_hypothesis_token_logprobs_vs_naive(backend, device, case):
    needs(backend, "token_logprobs", device)
    x = make_logits(case["n"], case["vocab"], case["dtype"], kind=case["kind"],
                    seed=case["seed"], device=device)
    tok = make_tokens(x, pad_every=3, seed=case["seed"])
    t = case["temperature"]
    xl, xn = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    lp, h = rlkernels.token_logprobs(xl, tok, temperature=t, return_entropy=True,
                                     backend=backend)
    lpn = naive.token_logprobs(xn, tok, t)
    hn = naive.entropy_masked(xn, tok, t)
    assert_values_close(lp, lpn.detach(), what="logp")
    assert_values_close(h, hn.detach(), what="entropy")
    (g,), up = _grad((lp, h), xl, case["seed"])
    (gn,), _ = _grad((lpn, hn), xn, case["seed"])
    floor = fp32_floor(x, temperature=t, upstream=up)
    assert_grad_close(g, gn, case["dtype"], floor, what="grad")


@_HYPO
@given(case=_case(), normalize=st.sampled_from(["full", "support"]))
def test_hypothesis_sparse_logprobs_vs_naive(backend, device, case, normalize):
    needs(backend, "sparse_logprobs", device)
    x = make_logits(case["n"], case["vocab"], case["dtype"], kind=case["kind"],
                    seed=case["seed"], device=device)
    idx = make_indices(x, case["k"], seed=case["seed"])
    t = case["temperature"]
    xl, xn = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    lp, tail = rlkernels.sparse_logprobs(xl, idx, temperature=t, normalize=normalize,
                                         return_tail=True, backend=backend)
    lpn = naive.sparse_logprobs(xn, idx, t, normalize)
    tailn = naive.log_tail(xn, idx, t)
    assert_values_close(lp, lpn.detach(), what="logp")
    assert_values_close(tail, tailn.detach(), what="tail")
    (g,), up = _grad((lp, tail), xl, case["seed"])
    (gn,), _ = _grad((lpn, tailn), xn, case["seed"])
    floor = fp32_floor(x, temperature=t, upstream=up)
    assert_grad_close(g, gn, case["dtype"], floor, what="grad")


@_HYPO
@given(case=_case(), kind=st.sampled_from(KL_KINDS), beta=st.sampled_from([0.0, 0.3, 1.0]))
def test_hypothesis_kl_divergence_vs_naive(backend, device, case, kind, beta):
    needs(backend, "kl_divergence", device)
    x = make_logits(case["n"], case["vocab"], torch.float64, kind=case["kind"],
                    seed=case["seed"])
    y = make_logits(case["n"], case["vocab"], torch.float64, kind="normal",
                    seed=case["seed"] + 1)
    y = torch.where(torch.isinf(x), x, y)  # -inf columns at the same positions
    x, y = (v.to(case["dtype"]).to(device) for v in (x, y))
    t = case["temperature"]
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    xn, yn = x.double().requires_grad_(True), y.double().requires_grad_(True)
    kl = rlkernels.kl_divergence(xl, yl, kind=kind, beta=beta, temperature=t, backend=backend)
    kln = naive.kl_divergence(xn, yn, kind, beta, t)
    assert_values_close(kl, kln.detach(), what="kl")
    (gx, gy), up = _grad([kl], (xl, yl), case["seed"])
    (gxn, gyn), _ = _grad([kln], (xn, yn), case["seed"])
    floor = fp32_floor(x, y, temperature=t, upstream=up)
    assert_grad_close(gx, gxn, case["dtype"], floor, what="grad logits")
    assert_grad_close(gy, gyn, case["dtype"], floor, what="grad ref_logits")


@_HYPO
@given(case=_case(), tail=st.booleans())
def test_hypothesis_sparse_kl_vs_naive(backend, device, case, tail):
    needs(backend, "sparse_kl", device)
    x = make_logits(case["n"], case["vocab"], case["dtype"], kind=case["kind"],
                    seed=case["seed"], device=device)
    idx = make_indices(x, case["k"], seed=case["seed"])
    target = make_targets(x, idx, seed=case["seed"])
    t = case["temperature"]
    xl, xn = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    kl = rlkernels.sparse_kl(xl, idx, target, temperature=t, tail=tail, backend=backend)
    kln = naive.sparse_kl(xn, idx, target, t, tail)
    finite = torch.isfinite(kln)  # a teacher id at a student -inf column: KL = inf
    assert torch.equal(torch.isfinite(kl), finite)
    assert_values_close(kl[finite], kln.detach()[finite], what="kl")
    if finite.all():
        (g,), up = _grad([kl], xl, case["seed"])
        (gn,), _ = _grad([kln], xn, case["seed"])
        floor = fp32_floor(x, temperature=t, upstream=up)
        assert_grad_close(g, gn, case["dtype"], floor, what="grad")
