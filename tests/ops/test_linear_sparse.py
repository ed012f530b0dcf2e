"""linear_sparse_logprobs: sparse_logprobs of ``hidden @ weight^T + bias`` without logits.

Checked against sparse_logprobs on the materialized logits (the fp64 torch backend is the
oracle of both), its bad inputs (each message names the argument), and opcheck of its op.
"""

import pytest
import torch

import rlkernels as rk
import _policy_naive as naive
from _naive import assert_values_close

F64 = torch.float64


def _inputs(dtype, n_lead=(3, 4), h=16, vocab=37, k=6, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n_lead, h, generator=g).to(dtype)
    weight = (torch.randn(vocab, h, generator=g) / 3).to(dtype)
    b = torch.randn(vocab, generator=g).to(dtype) if bias else None
    # distinct ids per row (a sampler's support), some unused slots (-1)
    idx = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(
        torch.Size(n_lead).numel())]).view(*n_lead, k)
    idx.view(-1, k)[0, k // 2:] = -1
    return hidden, weight, b, idx


def _run(fn, hidden, weight, bias, idx, upstream, **kw):
    hidden = hidden.detach().requires_grad_(True)
    weight = weight.detach().requires_grad_(True)
    params = [hidden, weight]
    if bias is not None:
        bias = bias.detach().requires_grad_(True)
        params.append(bias)
    logp, tail = fn(hidden, weight, bias, idx, **kw)
    g_lp, g_tail = upstream
    loss = (torch.where(idx >= 0, logp, 0.0) * g_lp).sum() + (tail * g_tail).sum()
    return (logp.detach(), tail.detach()), torch.autograd.grad(loss, params)


def _grad_bound(g, g_ref, h: int):
    """SPEC 5's bound for bf16; fp32 gradients also carry about H ulp of the logits, which
    come from an fp32 GEMM of H terms (as tests/ops/test_linear.py's linear_grad_bound)."""
    if g.dtype != torch.float32:
        return naive.grad_bound(g, g_ref)
    tol = (2 + h) * torch.finfo(torch.float32).eps * g_ref.abs().max().item() + 1e-7
    err = (g.double() - g_ref.double()).abs().max().item()
    assert err <= tol, f"gradient error {err:.3e} > {tol:.3e}"


def _fused(hidden, weight, bias, idx, **kw):
    return rk.linear_sparse_logprobs(hidden, weight, idx, bias=bias, return_tail=True, **kw)


def _materialized(hidden, weight, bias, idx, **kw):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    return rk.sparse_logprobs(z, idx, return_tail=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", ["full", "support"])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_sparse_logprobs_of_the_logits(backend, dtype, normalize, bias):
    if not rk.backends.implements(backend, "linear_sparse_logprobs"):
        pytest.skip(f"backend {backend!r} has no linear_sparse_logprobs kernels")
    hidden, weight, b, idx = _inputs(dtype, bias=bias)
    g = torch.Generator().manual_seed(1)
    upstream = (torch.randn(idx.shape, generator=g), torch.randn(idx.shape[:-1], generator=g))
    kw = dict(temperature=0.7, normalize=normalize)
    out, grads = _run(_fused, hidden, weight, b, idx, upstream, backend=backend, **kw)
    ref_out, ref_grads = _run(_materialized, hidden.double(), weight.double(),
                              None if b is None else b.double(), idx,
                              [u.double() for u in upstream], backend="torch", **kw)
    for got, want in zip(out, ref_out):
        assert got.dtype == torch.float32
        assert_values_close(got, want)
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        _grad_bound(got, want, hidden.shape[-1])


def test_fp64_is_exact_against_materialized_logits():
    hidden, weight, b, idx = _inputs(F64, seed=3)
    upstream = (torch.randn(idx.shape, dtype=F64), torch.randn(idx.shape[:-1], dtype=F64))
    out, grads = _run(_fused, hidden, weight, b, idx, upstream, normalize="support")
    ref_out, ref_grads = _run(_materialized, hidden, weight, b, idx, upstream,
                              normalize="support")
    for got, want in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_unused_slots_are_minus_inf_with_zero_gradient():
    hidden, weight, b, idx = _inputs(torch.float32)
    hidden.requires_grad_(True)
    logp = rk.linear_sparse_logprobs(hidden, weight, idx, bias=b)
    assert torch.isneginf(logp[idx < 0]).all() and torch.isfinite(logp[idx >= 0]).all()
    (g,) = torch.autograd.grad(torch.where(idx >= 0, logp, 0.0).sum(), hidden)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("call, error, message", [
    (lambda h, w, i: rk.linear_sparse_logprobs(h, w, i[..., 0]), ValueError,
     r"indices: expected shape \(\*\(3, 4\), K\) \(the leading dims of hidden"),
    (lambda h, w, i: rk.linear_sparse_logprobs(h, w, i.float()), TypeError, r"indices"),
    (lambda h, w, i: rk.linear_sparse_logprobs(h, w, i.clamp(max=36) + 1), ValueError,
     r"indices: expected ids in \[0, 37\) or -1"),
    (lambda h, w, i: rk.linear_sparse_logprobs(h, w, i, normalize="top"), ValueError,
     r"normalize: expected one of 'full', 'support', got 'top'"),
    (lambda h, w, i: rk.linear_sparse_logprobs(h, w, i, temperature=0.0), ValueError,
     r"temperature"),
    (lambda h, w, i: rk.linear_sparse_logprobs(h, w[:, :5], i), ValueError,
     r"hidden: expected a last dimension of 5"),
])
def test_bad_inputs_name_the_argument(call, error, message):
    hidden, weight, _, idx = _inputs(torch.float32)
    with pytest.raises(error, match=message):
        call(hidden, weight, idx)


def test_opcheck():
    hidden, weight, b, idx = _inputs(torch.float32, n_lead=(5,), k=4)
    args = (hidden.requires_grad_(True), weight.requires_grad_(True), b, idx, 0.9, "full",
            True, "torch")
    torch.library.opcheck(torch.ops.rlkernels.linear_sparse_logprobs.default, args)
