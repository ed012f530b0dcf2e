"""The cuda kernels of kl_divergence kind="alpha" and kind="tv" (csrc/vocab.cu, issue 21).

On a GPU: values and gradients (both inputs) against the torch reference in fp64 (SPEC
section 5) for every low-precision dtype, odd and realistic V, ``T != 1``, peaked / flat /
masked rows, ``-inf`` columns in one row only and in both, ``ignore_mask`` rows, alpha near
both limits (where ``1 - sum p^a q^(1-a)`` cancels: the kernels sum ``p - r`` or ``q - r``
per column with expm1), the saved statistics' layout (``kl = stats_p[:, 2] + stats_q[:, 2]``,
tv's two half sums), fp64 logits to 1e-9, determinism and batch invariance, strided views.

On any machine: the launchers hand the kernels the shared kind codes (rlkernels/_codes.py)
and alpha in the ``beta`` argument, with the binding's parameter names (a recording stand-in
for rlkernels._C, as tests/cuda/test_launcher_calls.py), and the C++ side declares the codes.
"""

from __future__ import annotations

import contextlib
import math
import os
import re

import pytest
import torch

import rlkernels
import rlkernels.reference.vocab as rv
from _cuda_gpu import cpu_expect, gpu_cuda
from _naive import (LOW_DTYPES, assert_grad_close, assert_values_close, bit_equal,
                    fp32_floor, make_logits)
from rlkernels import _codes
from rlkernels.cuda import load_extension
from rlkernels.cuda import vocab as cv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEG_INF = -math.inf
# both limits (1e-6 and 1 - 1e-6: 1 - S is ~1e-6 D there), the switch of the column form at
# 0.5, and inside
ALPHAS = [1e-6, 1e-3, 0.3, 0.5, 0.7, 0.999, 1.0 - 1e-6]
CASES = [("alpha", a) for a in ALPHAS] + [("tv", None)]
CASE_IDS = [f"alpha{a}" for a in ALPHAS] + ["tv"]


def _pair(n, vocab, dtype, seed, device="cuda"):
    """Mixed rows (normal, peaked, flat, masked) for p, normal rows for q, then -inf columns
    in q only (p > 0 = q there), in p only, and in both; never a row's argmax."""
    x = make_logits(n, vocab, torch.float64, seed=seed)
    y = make_logits(n, vocab, torch.float64, kind="normal", seed=seed + 1)
    if vocab > 3:
        g = torch.Generator().manual_seed(seed + 2)
        keep = torch.zeros(n, vocab, dtype=torch.bool)
        keep[torch.arange(n), x.argmax(-1)] = True
        keep[torch.arange(n), y.argmax(-1)] = True
        u = torch.rand(n, vocab, generator=g)
        y = y.masked_fill((u < 0.1) & ~keep, NEG_INF)
        x = x.masked_fill((u > 0.9) & ~keep, NEG_INF)
        both = (u > 0.45) & (u < 0.5) & ~keep
        x, y = x.masked_fill(both, NEG_INF), y.masked_fill(both, NEG_INF)
    return x.to(dtype).to(device), y.to(dtype).to(device)


def _weights(n, seed, device):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).float().to(device)


def _public(x, y, kind, alpha, backend, **kw):
    return rlkernels.kl_divergence(x, y, kind=kind, alpha=alpha, backend=backend, **kw)


def _check(x, y, kind, alpha, temperature, mask, what):
    dtype = x.dtype
    xc, yc = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    kl = _public(xc, yc, kind, alpha, "cuda", temperature=temperature, ignore_mask=mask)
    x64, y64 = x.double().requires_grad_(True), y.double().requires_grad_(True)
    kl64 = _public(x64, y64, kind, alpha, "torch", temperature=temperature, ignore_mask=mask)
    assert kl.dtype == torch.float32
    assert_values_close(kl, kl64, what=f"{what} value")
    if mask is not None:
        assert (kl[mask] == 0).all()
    w = _weights(x.shape[0], 3, x.device)
    gx, gy = torch.autograd.grad((kl * w).sum(), (xc, yc))
    gx64, gy64 = torch.autograd.grad((kl64 * w.double()).sum(), (x64, y64))
    # the fp32 floor of tests/_naive.py is relative to gradient terms of size p |w| / T;
    # alpha's terms are (p - r) / (1 - a) and a D p (q alike), of size p |w| (1 + D) / T, and
    # every p carries the relative rounding eps (max|z| + log V) of its exponent (a relative
    # error of D too): the same floor at that size (tv: D <= 1)
    w_max = float(w.abs().max())
    d_max = float(kl64.detach().abs().max()) if kl64.numel() else 0.0
    floor = fp32_floor(x, y, temperature=temperature, upstream=w_max * (2.0 + d_max))
    assert_grad_close(gx, gx64, dtype, floor, what=f"{what} grad logits")
    assert_grad_close(gy, gy64, dtype, floor, what=f"{what} grad ref_logits")
    if mask is not None:
        assert (gx[mask] == 0).all() and (gy[mask] == 0).all()


# ============================================================================ on a GPU

@gpu_cuda
@pytest.mark.parametrize("kind,alpha", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("vocab", [1, 7, 1031, 50257])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_matches_reference(dtype, vocab, kind, alpha):
    n = 9
    x, y = _pair(n, vocab, dtype, seed=vocab)
    mask = torch.arange(n, device="cuda") % 4 == 1
    _check(x, y, kind, alpha, 0.8, mask, f"{kind} a={alpha} V={vocab} {dtype}")


@gpu_cuda
@pytest.mark.parametrize("kind,alpha", [("alpha", 1e-6), ("alpha", 0.5),
                                        ("alpha", 1.0 - 1e-6), ("tv", None)])
def test_realistic_vocab_bf16(kind, alpha):
    x, y = _pair(4, 151936, torch.bfloat16, seed=11)
    _check(x, y, kind, alpha, 1.0, None, f"{kind} a={alpha} V=151936")


@gpu_cuda
@pytest.mark.parametrize("kind,alpha", CASES, ids=CASE_IDS)
def test_peaked_rows_and_identical_rows(kind, alpha):
    """Peaked rows (p_max = 1 - tiny) against peaked and normal rows, and p == q: 0 and a zero
    gradient (tv: every sign is 0; alpha: p - r = 0 in every column)."""
    x = make_logits(6, 1031, torch.float32, kind="peaked", seed=5, device="cuda")
    y = torch.cat([make_logits(3, 1031, torch.float32, kind="peaked", seed=6, device="cuda"),
                   make_logits(3, 1031, torch.float32, kind="normal", seed=7, device="cuda")])
    _check(x, y, kind, alpha, 1.0, None, f"{kind} a={alpha} peaked")
    xc = x.clone().requires_grad_(True)
    kl = _public(xc, x, kind, alpha, "cuda")
    assert (kl.abs() <= 1e-6).all()
    (g,) = torch.autograd.grad(kl.sum(), xc)
    assert float(g.abs().max()) <= 1e-6


@gpu_cuda
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_DTYPES], ids=str)
def test_alpha_near_reference_rows(dtype, alpha):
    """A policy near its reference, alpha's common case: the backward's near-reference path
    (csrc/vocab.cu AlphaNear: ``|log2 q - log2 p| max(a, 1 - a) ln 2 <= 1``, one row
    polynomial in ``d`` per side, whole chunks of such columns without a per-column branch)
    against the fp64 reference: rows of only near columns (every chunk near), rows where
    every 13th column is far (|d| ~ 4 nats: the general per-column path in those chunks,
    near columns beside far ones), columns at the bound on both sides of it, and a row of
    small ``d`` (~1e-4) where the gradient is nearly ``-a D p``."""
    n, vocab = 6, 1031
    x = make_logits(n, vocab, torch.float64, kind="normal", seed=31)
    g = torch.Generator().manual_seed(32)
    y = x + 0.2 * torch.randn(n, vocab, generator=g, dtype=torch.float64)
    y[1, ::13] += 4.0
    y[2, 5::13] -= 4.0
    bound = 1.0 / max(alpha, 1.0 - alpha)  # natural units
    y[3, :40] = x[3, :40] + torch.linspace(-1.02, 1.02, 40, dtype=torch.float64) * bound
    y[4] = x[4] + 1e-4 * torch.randn(vocab, generator=g, dtype=torch.float64)
    x[5, 7] += 20.0  # peaked, near
    y[5, 7] += 19.9
    _check(x.to(dtype).cuda(), y.to(dtype).cuda(), "alpha", alpha, 1.0, None,
           f"alpha a={alpha} near-reference {dtype}")


@gpu_cuda
@pytest.mark.parametrize("kind,alpha", CASES, ids=CASE_IDS)
def test_saved_statistics_layout(kind, alpha):
    """The backend functions' outputs, column by column, against the reference's (fp64 logits:
    the fp64 kernels use the accurate exp / expm1, so 1e-9): columns 0 and 1 the row max and
    log normalizer, column 2 the divergence and 0 (alpha) or the half sums 0.5 sum p s and
    -0.5 sum q s (tv), whose sum is kl; and the backward from those statistics."""
    x, y = _pair(7, 1031, torch.float64, seed=21)
    beta = alpha if kind == "alpha" else 0.5
    mask = torch.arange(7, device="cuda") == 2
    out = cv.kl_divergence_forward(x, y, mask, kind, beta, 0.9)
    ref = rv.kl_divergence_forward(x.cpu(), y.cpu(), mask.cpu(), kind, beta, 0.9)
    fine = dict(atol=1e-9, rtol=1e-9)
    keep = ~mask  # the kernels leave an ignored row's statistics 0 (never read), not so the
    for o, r, name in zip(out, ref, ("kl", "stats_p", "stats_q")):  # reference
        assert_values_close(o[keep], r[keep.cpu()], **fine, what=f"{kind} {name}")
    kl, sp, sq = out
    assert (kl[mask] == 0).all() and (sp[mask] == 0).all() and (sq[mask] == 0).all()
    assert_values_close(sp[:, 2] + sq[:, 2], kl, **fine, what="kl = sum of column 2")
    if kind == "alpha":
        assert (sq[:, 2] == 0).all()
    g = _weights(7, 4, "cuda").double()
    gz, gw = cv.kl_divergence_backward(g, x, y, mask, sp, sq, kind, beta, 0.9, True)
    rz, rw = rv.kl_divergence_backward(g.cpu(), x.cpu(), y.cpu(), mask.cpu(), sp.cpu(),
                                       sq.cpu(), kind, beta, 0.9, True)
    assert_values_close(gz, rz, **fine, what=f"{kind} grad z")
    assert_values_close(gw, rw, **fine, what=f"{kind} grad w")
    gz1, none = cv.kl_divergence_backward(g, x, y, mask, sp, sq, kind, beta, 0.9, False)
    # without the ref gradient alpha forms r per gap (with it, once for both): rounding apart
    assert none is None and (bit_equal(gz1, gz) if kind == "tv" else
                             torch.allclose(gz1, gz, atol=1e-12, rtol=1e-12))


@gpu_cuda
@pytest.mark.parametrize("kind,alpha", [("alpha", 0.3), ("alpha", 0.8), ("tv", None)])
def test_determinism_batch_invariance_and_strided_views(kind, alpha):
    """Same bits run to run, for a row alone or in a batch, and for a slice of a wider buffer
    (misaligned rows take the element-wise loads; the chunk layout does not change)."""
    beta = alpha if kind == "alpha" else 0.5
    x, y = _pair(6, 1031, torch.bfloat16, seed=31)
    a = cv.kl_divergence_forward(x, y, None, kind, beta, 0.7)
    b = cv.kl_divergence_forward(x, y, None, kind, beta, 0.7)
    assert all(bit_equal(u, v) for u, v in zip(a, b))
    one = cv.kl_divergence_forward(x[3:4].clone(), y[3:4].clone(), None, kind, beta, 0.7)
    assert all(bit_equal(u, v[3:4]) for u, v in zip(one, a))
    wide = torch.full((6, 1040), -1.0, dtype=x.dtype, device="cuda")
    wide[:, 1:1032] = x
    sliced = cv.kl_divergence_forward(wide[:, 1:1032], y, None, kind, beta, 0.7)
    assert all(bit_equal(u, v) for u, v in zip(sliced, a))
    g = _weights(6, 5, "cuda")
    gz, gw = cv.kl_divergence_backward(g, x, y, None, a[1], a[2], kind, beta, 0.7, True)
    gz2, gw2 = cv.kl_divergence_backward(g, wide[:, 1:1032], y, None, a[1], a[2], kind, beta,
                                         0.7, True)
    assert bit_equal(gz, gz2) and bit_equal(gw, gw2)


@gpu_cuda
def test_alpha_limits_approach_the_kl_kinds():
    """alpha = 1 - 1e-7 and 1e-7 are within 1e-5 (+ O(alpha) of the true gap) of reverse and
    forward KL computed by their own kernels: no 0 / 0 near the limits."""
    x, y = _pair(6, 1031, torch.float32, seed=41)
    # the same -inf columns in both rows: both KLs finite
    y = torch.where(torch.isinf(y) & ~torch.isinf(x), torch.zeros_like(y), y)
    x = torch.where(torch.isinf(x) & ~torch.isinf(y), torch.zeros_like(x), x)
    rev = _public(x, y, "reverse", None, "cuda")
    fwd = _public(x, y, "forward", None, "cuda")
    near1 = _public(x, y, "alpha", 1.0 - 1e-7, "cuda")
    near0 = _public(x, y, "alpha", 1e-7, "cuda")
    torch.testing.assert_close(near1, rev, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(near0, fwd, atol=2e-5, rtol=1e-4)


@gpu_cuda
def test_bad_alpha_reaches_no_kernel():
    x = torch.zeros(2, 5, device="cuda")
    for bad in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises((ValueError, RuntimeError), match="alpha"):
            cv.kl_divergence_forward(x, x, None, "alpha", bad, 1.0)


# ======================================================================== on any machine

RC = load_extension()


def _params(fn):
    sig = fn.__doc__.splitlines()[0]
    inner = sig[sig.index("(") + 1:sig.rindex(") ->")]
    return [p.split(":")[0].strip() for p in re.split(r",\s*(?=\w+:)", inner) if p.strip()]


class _Recorder:
    """rlkernels._C whose kl launchers record their keyword arguments (checked against the
    binding's parameter names) instead of launching."""

    def __init__(self):
        self.calls = []
        for name in ("Rows", "Matrix"):
            setattr(self, name, getattr(RC, name))

    def __getattr__(self, name):
        real = getattr(RC, name)

        def launch(*args, **kw):
            assert not args and sorted(kw) == sorted(_params(real)), name
            self.calls.append((name, kw))
        return launch

    def last(self, name):
        return [kw for n, kw in self.calls if n == name][-1]


@pytest.fixture
def rec(monkeypatch):
    if RC is None:
        pytest.skip("rlkernels._C not built (the recorder uses its Rows / Matrix classes)")
    r = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(cv, "extension", lambda: r)
    monkeypatch.setattr(cv, "stream_of", lambda t: 0)
    monkeypatch.setattr(cv, "expect", cpu_expect)
    return r


@pytest.mark.parametrize("kind,beta", [("alpha", 0.25), ("alpha", 0.75), ("tv", 0.5)])
def test_launchers_pass_kind_code_and_alpha(rec, kind, beta):
    n, v = 4, 37
    x = torch.randn(n, v)
    mask = torch.tensor([False, True, False, False])
    kl, sp, sq = cv.kl_divergence_forward(x, x + 1, mask, kind, beta, 0.5)
    assert kl.shape == (n,) and sp.shape == sq.shape == (n, 3)
    kw = rec.last("kl_divergence_forward")
    assert kw["kind"] == _codes.KL_KINDS[kind] == {"alpha": 3, "tv": 4}[kind]
    assert kw["beta"] == beta and kw["inv_temperature"] == 2.0
    assert kw["ignore_mask"].ptr == mask.data_ptr() and kw["n"] == n and kw["vocab"] == v
    gz, gw = cv.kl_divergence_backward(torch.ones(n), x, x + 1, None, sp, sq, kind, beta, 0.5,
                                       True)
    assert gz.shape == gw.shape == (n, v)
    kw = rec.last("kl_divergence_backward")
    assert kw["kind"] == _codes.KL_KINDS[kind] and kw["beta"] == beta
    assert kw["grad_ref"].ptr == gw.data_ptr() and kw["stats_p"].stride0 == 3
    _, none = cv.kl_divergence_backward(torch.ones(n), x, x + 1, None, sp, sq, kind, beta, 0.5,
                                        False)
    assert none is None and rec.last("kl_divergence_backward")["grad_ref"].ptr == 0


def test_cpp_side_declares_and_dispatches_the_kinds():
    """csrc/rlkernels.h declares kAlpha = 3, kTv = 4 (the Python codes), bindings.cpp exports
    them, and both vocab.cu launchers accept codes up to 4 and instantiate both kernels."""
    with open(os.path.join(ROOT, "csrc", "rlkernels.h")) as f:
        header = f.read()
    assert re.search(r"enum KlKind : int \{[^}]*kAlpha = 3, kTv = 4 \}", header)
    with open(os.path.join(ROOT, "csrc", "bindings.cpp")) as f:
        bindings = f.read()
    assert '{"alpha", rlk::kAlpha}, {"tv", rlk::kTv}' in bindings
    with open(os.path.join(ROOT, "csrc", "vocab.cu")) as f:
        src = f.read()
    for launcher in ("RLK_KL_FWD", "RLK_KL_BWD_W"):
        for kind in ("kAlpha", "kTv"):
            assert f"{launcher}({kind})" in src, (launcher, kind)
    assert src.count("kind >= 0 && kind <= 4") == 2


@pytest.mark.skipif(RC is None, reason="rlkernels._C not built")
def test_built_extension_codes_when_rebuilt():
    """Once rlkernels._C is rebuilt from this source its CODES carry the two kinds (an older
    build lacks them: skipped, it predates the kernels)."""
    codes = dict(RC.CODES["kl_kind"])
    if "alpha" not in codes:
        pytest.skip("rlkernels._C predates kinds alpha / tv (rebuild to check)")
    assert codes == _codes.KL_KINDS
