"""kl_divergence kind="alpha" and kind="tv" (issue 21) on every backend that runs here.

Values within ``atol=rtol=1e-5`` of the fp64 torch backend, which is checked against naive
fp64 formulas written here (``1 - exp(logsumexp(a log p + (1-a) log q))`` over ``a (1-a)``;
``0.5 sum |p - q|`` with autograd through ``log_softmax``), on peaked / flat / masked rows,
``-inf`` columns in one row or both, ``ignore_mask``, odd V and ``T != 1``; gradients within
``2 eps(dtype) max|g_ref| + 1e-7`` (+ the fp32 floor of tests/_naive.py); the exact limits
``a = 0, 1``; ``torch.autograd.gradcheck`` in fp64 for both inputs; the shard sums of the
partial forward (vocabulary parallelism); the argument errors. The triton backend runs through
the interpreter on CPU (tests/conftest.py).
"""

import math

import pytest
import torch

import rlkernels
from _naive import (LOW_DTYPES, assert_grad_close, assert_values_close, fp32_floor,
                    make_logits, needs, row_weight)
from rlkernels import backends

NEG_INF = -math.inf
FINE = dict(atol=1e-9, rtol=1e-9)
# a strictly inside (0, 1): close to both limits (where 1 - sum r cancels), and inside
ALPHAS = [1e-3, 0.3, 0.5, 0.999]
CASES = [("alpha", a) for a in ALPHAS] + [("tv", None)]
CASE_IDS = [f"alpha{a}" for a in ALPHAS] + ["tv"]


def _naive(x, y, kind, alpha, temperature=1.0, mask=None):
    """fp64 formulas sharing no code with rlkernels (autograd gives the gradients)."""
    logp = torch.log_softmax(x.double() / temperature, dim=-1)
    logq = torch.log_softmax(y.double() / temperature, dim=-1)
    if kind == "tv":
        out = 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    else:
        a = alpha
        log_s = torch.logsumexp(a * logp + (1.0 - a) * logq, dim=-1)
        out = -torch.expm1(log_s) / (a * (1.0 - a))
    if mask is not None:
        out = torch.where(mask, torch.zeros_like(out), out)
    return out


def _pair(n, vocab, dtype, seed, device):
    """Mixed rows (normal, peaked, flat, masked) and ``-inf`` columns in one row only (some
    in each) and in both."""
    x = make_logits(n, vocab, torch.float64, seed=seed)
    y = make_logits(n, vocab, torch.float64, kind="normal", seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    if vocab > 3:
        only_y = torch.rand(n, vocab, generator=g) < 0.15
        only_y[torch.arange(n), y.argmax(-1)] = False
        y = y.masked_fill(only_y, NEG_INF)
        both = torch.rand(n, vocab, generator=g) < 0.1
        both[torch.arange(n), x.argmax(-1)] = False
        both[torch.arange(n), y.argmax(-1)] = False
        x, y = x.masked_fill(both, NEG_INF), y.masked_fill(both, NEG_INF)
    return x.to(dtype).to(device), y.to(dtype).to(device)


def _kl(x, y, kind, alpha, backend, **kw):
    return rlkernels.kl_divergence(x, y, kind=kind, alpha=alpha, backend=backend, **kw)


def _check(backend, x, y, kind, alpha, temperature=1.0, mask=None, what=""):
    dtype = x.dtype
    xl, yl = (t.detach().clone().requires_grad_(True) for t in (x, y))
    kl = _kl(xl, yl, kind, alpha, backend, temperature=temperature, ignore_mask=mask)
    assert kl.shape == x.shape[:-1] and kl.dtype == torch.float32
    x64, y64 = (t.detach().double().requires_grad_(True) for t in (x, y))
    kl64 = _kl(x64, y64, kind, alpha, "torch", temperature=temperature, ignore_mask=mask)
    xn, yn = (t.detach().double().requires_grad_(True) for t in (x, y))
    kln = _naive(xn, yn, kind, alpha, temperature, mask)
    assert_values_close(kl, kl64, what=f"{what} value")
    assert_values_close(kl64, kln.detach(), **FINE, what=f"{what} fp64 value vs naive")
    assert (kl >= -1e-6).all(), "a divergence is >= 0"
    w = torch.randn(kl.shape, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64).to(x.device)
    gx, gy = torch.autograd.grad((kl * w.float()).sum(), (xl, yl))
    gx64, gy64 = torch.autograd.grad((kl64 * w).sum(), (x64, y64))
    gxn, gyn = torch.autograd.grad((kln * w).sum(), (xn, yn))
    # the fp32 floor of tests/_naive.py is relative to terms of size p |upstream| / T; the
    # alpha gradients' terms are p S / (1 - a) and grow like max|g| (near a = 1 with mass of p
    # where q = 0, S < 1): the same relative rounding of p, at their size
    top = max(float(gx64.abs().max()), float(gy64.abs().max()))
    floor = max(fp32_floor(x, y, temperature=temperature, upstream=row_weight(w)),
                fp32_floor(x, y, temperature=temperature, upstream=top * temperature))
    assert_grad_close(gx, gx64, dtype, floor, what=f"{what} grad logits")
    assert_grad_close(gy, gy64, dtype, floor, what=f"{what} grad ref_logits")
    assert_values_close(gx64, gxn, **FINE, what=f"{what} fp64 grad logits vs naive")
    assert_values_close(gy64, gyn, **FINE, what=f"{what} fp64 grad ref vs naive")
    if mask is not None:
        assert (kl[mask] == 0).all()
        assert (gx[mask] == 0).all() and (gy[mask] == 0).all()
    return kl


@pytest.mark.parametrize("kind,alpha", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("vocab", [7, 129])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_values_and_grads(backend, device, dtype, vocab, kind, alpha):
    needs(backend, "kl_divergence", device)
    x, y = _pair(8, vocab, dtype, 60 + vocab, device)
    t = 0.7 if vocab == 129 else 1.0
    _check(backend, x, y, kind, alpha, t, what=f"{dtype} V={vocab} {kind} a={alpha} T={t}")


@pytest.mark.parametrize("kind,alpha", [("alpha", 0.3), ("alpha", 0.999), ("tv", None)])
def test_odd_vocab_over_many_blocks(backend, device, kind, alpha):
    """V = 5003 (odd, 2 full blocks of 2048 then a partial one on a GPU; the interpreter
    uses the same BLOCK_V), peaked rows where p and q nearly agree."""
    needs(backend, "kl_divergence", device, 4 * 5003)
    x, y = _pair(4, 5003, torch.float32, 71, device)
    _check(backend, x, y, kind, alpha, what=f"V=5003 {kind} a={alpha}")
    x = make_logits(4, 5003, torch.float32, kind="peaked", seed=72, device=device)
    _check(backend, x, x + 0.01 * torch.randn_like(x), kind, alpha, what="nearly equal")


@pytest.mark.parametrize("kind,alpha", CASES, ids=CASE_IDS)
def test_ignore_mask(backend, device, kind, alpha):
    """ignore_mask rows give 0 and exactly-zero gradients, also with -inf / NaN logits there
    (not read); [B, T, V] inputs with a [B, T] mask."""
    needs(backend, "kl_divergence", device)
    x, y = _pair(6, 33, torch.float32, 73, device)
    mask = torch.tensor([False, True, False, False, True, False], device=device)
    _check(backend, x.view(2, 3, 33), y.view(2, 3, 33), kind, alpha, 1.0, mask.view(2, 3),
           what="ignore_mask")
    x[1] = NEG_INF
    y[4, 5] = float("nan")
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    kl = _kl(xl, yl, kind, alpha, backend, ignore_mask=mask)
    assert (kl[mask] == 0).all() and torch.isfinite(kl).all()
    kl.sum().backward()
    assert (xl.grad[mask] == 0).all() and (yl.grad[mask] == 0).all()
    assert torch.isfinite(xl.grad).all() and torch.isfinite(yl.grad).all()


def test_minus_inf_columns_by_hand(backend, device):
    """Columns -inf in one row only: alpha's p^a q^(1-a) is 0 there, tv counts the other
    row's mass; -inf in both: nothing. Two-column cases with closed forms."""
    needs(backend, "kl_divergence", device)
    x = torch.tensor([[0.0, NEG_INF, 0.0], [0.0, 0.0, NEG_INF]], device=device)
    y = torch.tensor([[0.0, 0.0, NEG_INF], [0.0, 0.0, NEG_INF]], device=device)
    # row 0: p = (1/2, 0, 1/2), q = (1/2, 1/2, 0); row 1: p = q = (1/2, 1/2, 0)
    tv = _kl(x, y, "tv", None, backend)
    assert_values_close(tv, torch.tensor([0.5, 0.0], dtype=torch.float64))
    for a in (0.3, 0.8):
        d = _kl(x, y, "alpha", a, backend)
        # sum r = 1/2 (the only column where both are > 0): D = (1 - 1/2) / (a (1 - a))
        assert_values_close(d, torch.tensor([0.5 / (a * (1 - a)), 0.0], dtype=torch.float64))


@pytest.mark.parametrize("col", [0, 40])
def test_nan_logit_gives_nan_row(backend, device, col):
    """A NaN logit in either row makes that row's divergence NaN (and only that row's), for
    alpha around p (a >= 1/2) and around q, and tv. The triton forward clamps each column's
    exponent with a NaN-dropping min; the NaN must reach the row through its statistics."""
    needs(backend, "kl_divergence", device)
    x, y = _pair(4, 129, torch.float32, 77, device)
    x[1, col] = float("nan")
    y[2, col] = float("nan")
    for kind, alpha in [("alpha", 0.3), ("alpha", 0.8), ("tv", None)]:
        kl = _kl(x, y, kind, alpha, backend)
        assert torch.isnan(kl[1]) and torch.isnan(kl[2]), (kind, alpha, kl)
        assert torch.isfinite(kl[0]) and torch.isfinite(kl[3]), (kind, alpha, kl)


def test_identical_inputs(backend, device):
    needs(backend, "kl_divergence", device)
    x = make_logits(8, 129, torch.bfloat16, seed=74, device=device)
    for kind, alpha in CASES:
        xl, yl = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        kl = _kl(xl, yl, kind, alpha, backend)
        assert kl.abs().max() <= 1e-6, (kind, alpha)
        kl.sum().backward()
        assert xl.grad.float().abs().max() <= 1e-6 and yl.grad.float().abs().max() <= 1e-6


def test_exact_limits(backend, device):
    """alpha = 1 is exactly kind="reverse", alpha = 0 exactly kind="forward" (the same
    kernels); alpha 1e-6 from either end is within O(a) of them (no lost digits there)."""
    needs(backend, "kl_divergence", device)
    x, y = _pair(8, 33, torch.float32, 75, device)
    y[4:] = torch.where(torch.isinf(x[4:]), x[4:], torch.randn_like(y[4:]))  # finite KLs
    rev = _kl(x, y, "reverse", None, backend)
    fwd = _kl(x, y, "forward", None, backend)
    assert torch.equal(_kl(x, y, "alpha", 1.0, backend), rev)
    assert torch.equal(_kl(x, y, "alpha", 0, backend), fwd)
    # -inf in one row only makes both KLs inf: compare where finite
    fin = torch.isfinite(rev) & torch.isfinite(fwd)
    assert fin.sum() >= 4
    near_rev = _kl(x, y, "alpha", 1 - 1e-6, backend)
    near_fwd = _kl(x, y, "alpha", 1e-6, backend)
    torch.testing.assert_close(near_rev[fin], rev[fin], atol=1e-5, rtol=2e-5)
    torch.testing.assert_close(near_fwd[fin], fwd[fin], atol=1e-5, rtol=2e-5)
    xl, yl = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    _kl(xl, yl, "alpha", 1.0, backend).sum().backward()
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    _kl(xr, yr, "reverse", None, backend).sum().backward()
    # bit-equal (rows of infinite KL have non-finite gradients, in both alike)
    torch.testing.assert_close(xl.grad, xr.grad, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(yl.grad, yr.grad, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("kind,alpha", [("alpha", 1e-3), ("alpha", 0.5), ("alpha", 0.999),
                                        ("tv", None)], ids=["a1e-3", "a0.5", "a0.999", "tv"])
def test_gradcheck(backend, device, kind, alpha):
    """Both inputs, fp64, T != 1, -inf in one row only and in both (away from TV's ties,
    where it is not differentiable)."""
    needs(backend, "kl_divergence", device)
    x, y = _pair(3, 7, torch.float64, 76, device)
    x = x.clone().requires_grad_(True)
    y = y.clone().requires_grad_(True)

    def f(a, b):
        return _kl(a, b, kind, alpha, backend, temperature=0.8)

    # the interpreter is slow: triton checks one random projection of the Jacobian
    assert torch.autograd.gradcheck(f, (x, y), eps=1e-6, atol=1e-6, rtol=1e-4,
                                    fast_mode=backend != "torch")


@pytest.mark.parametrize("kind,alpha", [("alpha", 0.01), ("alpha", 0.7), ("tv", None)])
def test_partial_forward_shards_add_up(backend, device, kind, alpha):
    """Vocabulary parallelism without processes: with the all-row statistics, the shards'
    partial sums (stats[:, 2] of both rows) add up to the full forward's, and the backward
    of each shard with the summed statistics is that shard of the full gradient."""
    needs(backend, "kl_divergence", device)
    b = backends._module(backend, "vocab")
    x, y = _pair(6, 41, torch.float32, 77, device)
    beta = alpha if kind == "alpha" else 0.5
    kl, sp, sq = b.kl_divergence_forward(x, y, None, kind, beta, 0.9)
    parts = [b.kl_divergence_partial_forward(x[:, s], y[:, s], None, sp, sq, kind, beta, 0.9)
             for s in (slice(0, 17), slice(17, 41))]
    s_p = sum(p[1][:, 2] for p in parts)
    s_q = sum(p[2][:, 2] for p in parts)
    torch.testing.assert_close(s_p + s_q, kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_p, sp[:, 2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_q, sq[:, 2], atol=1e-5, rtol=1e-5)
    g = torch.randn(6, generator=torch.Generator().manual_seed(8)).to(device)
    gx, gy = b.kl_divergence_backward(g, x, y, None, sp, sq, kind, beta, 0.9, True)
    for s in (slice(0, 17), slice(17, 41)):
        st_p = torch.cat([sp[:, :2], s_p[:, None]], 1)
        st_q = torch.cat([sq[:, :2], s_q[:, None]], 1)
        hx, hy = b.kl_divergence_backward(g, x[:, s].contiguous(), y[:, s].contiguous(), None,
                                          st_p, st_q, kind, beta, 0.9, True)
        torch.testing.assert_close(hx, gx[:, s], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(hy, gy[:, s], atol=1e-6, rtol=1e-5)


def test_errors():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="alpha.*None"):
        rlkernels.kl_divergence(x, x, kind="alpha")
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"alpha"):
            rlkernels.kl_divergence(x, x, kind="alpha", alpha=bad)
    with pytest.raises(ValueError, match=r"alpha.*1\.5"):
        rlkernels.kl_divergence(x, x, kind="alpha", alpha=1.5)
    with pytest.raises(TypeError, match="alpha"):
        rlkernels.kl_divergence(x, x, kind="alpha", alpha="0.5")
    for kind in ("reverse", "forward", "jsd", "tv"):
        with pytest.raises(ValueError, match=f"alpha.*{kind}"):
            rlkernels.kl_divergence(x, x, kind=kind, alpha=0.5)
    with pytest.raises(ValueError, match="kind.*'alpha'.*'tv'"):
        rlkernels.kl_divergence(x, x, kind="hellinger")
