"""``rows=`` of the fused lm_head ops (issue 20, verl #7686: project the head only for the
response tokens). Only the selected rows go through the GEMMs; the others behave as padding.
Checked against the same op without ``rows`` whose unselected rows are padding tokens (and,
for the loss, masked out): equal values and gradients, on every CPU backend and path."""
import pytest
import torch

import rlkernels as rk
from rlkernels.ops import linear as _linear

F64 = torch.float64
B, T, H, V = 3, 5, 13, 37
CASES = [("torch", "auto"), ("triton", "triton"), ("triton", "cublas")]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    weight = torch.randn(V, H, generator=g, dtype=F64) * 0.5
    bias = torch.randn(V, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, 4] = -100
    rows = torch.tensor([0, 2, 3, 6, 7, 11, 14])  # flat indices into B * T
    return hidden, weight, bias, tokens, rows


def _outside(rows, n):
    keep = torch.zeros(n, dtype=torch.bool)
    keep[rows] = True
    return ~keep


def _grads(out, *xs):
    return torch.autograd.grad(out, xs)


@pytest.mark.parametrize("backend,path", CASES)
def test_token_logprobs_rows(backend, path):
    hidden, weight, bias, tokens, rows = _inputs()
    out = _outside(rows, B * T).view(B, T)
    padded = tokens.masked_fill(out, -100)
    h1, w1, b1 = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    h2, w2, b2 = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    lp, ent = _linear._linear_token_logprobs(h1, w1, tokens, b1, 0.8, -100, True, None,
                                             backend, None, path, rows)
    lp_ref, ent_ref = _linear._linear_token_logprobs(h2, w2, padded, b2, 0.8, -100, True,
                                                     None, backend, None, path)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-12, atol=1e-12)
    assert (lp[out] == 0).all() and (ent[out] == 0).all()
    g = torch.linspace(-1, 1, B * T, dtype=F64).view(B, T)
    got = _grads((lp * g).sum() + (ent * g.flip(0)).sum(), h1, w1, b1)
    want = _grads((lp_ref * g).sum() + (ent_ref * g.flip(0)).sum(), h2, w2, b2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert (got[0].view(B * T, H)[_outside(rows, B * T)] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_token_logprobs_rows(backend):
    hidden, weight, bias, tokens, rows = _inputs(1)
    lp = rk.linear_token_logprobs(hidden, weight, tokens, bias=bias, rows=rows,
                                  backend=backend)
    want = rk.linear_token_logprobs(hidden, weight,
                                    tokens.masked_fill(_outside(rows, B * T).view(B, T), -100),
                                    bias=bias, backend=backend)
    torch.testing.assert_close(lp, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grpo_loss_rows(backend):
    """Positions outside ``rows`` leave the loss and metrics as if masked: the same loss,
    metrics and gradients as the call whose mask is 0 (and tokens padding) there."""
    hidden, weight, bias, tokens, rows = _inputs(2)
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3] = False
    out = _outside(rows, B * T).view(B, T)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    kw = dict(bias=bias, backend=backend, kl_coef=0.0, entropy_coef=0.01,
              agg="seq-mean-token-mean")
    loss, m = rk.linear_grpo_loss(h1, w1, tokens, old, adv, mask, rows=rows, **kw)
    ref, m_ref = rk.linear_grpo_loss(h2, w2, tokens.masked_fill(out, -100), old, adv,
                                     mask & ~out, **kw)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for k in m_ref:
        torch.testing.assert_close(m[k], m_ref[k], rtol=1e-6, atol=1e-7)
    for a, b in zip(_grads(loss, h1, w1), _grads(ref, h2, w2)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_rows_errors():
    hidden, weight, bias, tokens, rows = _inputs()
    with pytest.raises(TypeError, match="rows: expected dtype"):
        rk.linear_token_logprobs(hidden, weight, tokens, rows=rows.int(), backend="torch")
    with pytest.raises(ValueError, match="rows: expected a 1-d tensor"):
        rk.linear_token_logprobs(hidden, weight, tokens, rows=rows.view(1, -1),
                                 backend="torch")
    rk.set_debug(True)
    try:
        with pytest.raises(ValueError, match=r"rows: expected indices in \[0, 15\)"):
            rk.linear_token_logprobs(hidden, weight, tokens, rows=torch.tensor([0, 15]),
                                     backend="torch")
        with pytest.raises(ValueError, match="rows: expected distinct indices"):
            rk.linear_token_logprobs(hidden, weight, tokens, rows=torch.tensor([2, 2]),
                                     backend="torch")
    finally:
        rk.set_debug(False)
