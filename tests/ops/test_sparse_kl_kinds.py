"""sparse_kl's kinds beyond "forward" (issue 21): "reverse", "jsd", "alpha", "tv" over the
teacher's K ids and the tail bucket, on every backend that runs here (the triton backend
through the interpreter, tests/conftest.py).

Values within ``atol=rtol=1e-5`` of an fp64 bucket formula written here (a Python loop over
each row's buckets, sharing no code with rlkernels), gradients w.r.t. the logits against
autograd through that formula (``2 eps(dtype) max|g_ref| + 1e-7`` + the fp32 floor), and
``torch.autograd.gradcheck`` in fp64; tail on and off, unused slots (-1, NaN targets never
read), a row of unused slots only (0, zero gradient), peaked rows, ids covering the
vocabulary, kind "forward" unchanged (the same bits through every spelling), the alpha
limits, and the argument errors.
"""

import math

import pytest
import torch

import rlkernels
import rlkernels.reference.sparse as rsp
from _naive import (LOW_DTYPES, assert_grad_close, assert_values_close, bit_equal,
                    fp32_floor, make_indices, make_logits, make_targets, needs)

KINDS = [("reverse", None), ("jsd", None), ("alpha", 0.3), ("alpha", 0.8),
         ("alpha", 1e-3), ("alpha", 0.999), ("tv", None)]
KIND_IDS = ["reverse", "jsd", "alpha0.3", "alpha0.8", "alpha1e-3", "alpha0.999", "tv"]
BETA = 0.3


def _naive(x, idx, target, kind, alpha, beta=BETA, temperature=1.0, tail=True):
    """fp64, row by row: the buckets' s and t as plain lists, then the kind's textbook
    formula (``0 log 0 = 0``); differentiable w.r.t. ``x`` through ``log_softmax``."""
    lp = torch.log_softmax(x.double() / temperature, dim=-1)
    flat_lp = lp.reshape(-1, x.shape[-1])
    flat_idx = idx.reshape(-1, idx.shape[-1])
    flat_t = target.reshape(-1, idx.shape[-1]).double()
    out = []
    for r in range(flat_lp.shape[0]):
        slots = [k for k in range(flat_idx.shape[1]) if int(flat_idx[r, k]) >= 0]
        ids = [int(flat_idx[r, k]) for k in slots]
        ls = [flat_lp[r, j] for j in ids]
        lt = [flat_t[r, k] for k in slots]
        if tail:
            outside = [j for j in range(x.shape[-1]) if j not in set(ids)]
            if outside:
                ls.append(torch.logsumexp(flat_lp[r, outside], dim=0))
                t_tail = max(1.0 - sum(math.exp(float(v)) for v in lt), 0.0)
                lt.append(torch.tensor(math.log(t_tail) if t_tail > 0 else -math.inf,
                                       dtype=torch.float64))
        if not ls:
            out.append(flat_lp.new_zeros(()))
            continue
        s, t = torch.stack(ls).exp(), torch.stack(lt).exp()

        def kl(u, v):
            return sum((ui * (ui.log() - vi.log()) for ui, vi in zip(u, v) if ui.item() > 0),
                       torch.zeros((), dtype=torch.float64))

        if kind == "reverse":
            d = kl(s, t)
        elif kind == "forward":
            d = kl(t, s)
        elif kind == "jsd":
            m = beta * s + (1 - beta) * t
            d = beta * kl(s, m) + (1 - beta) * kl(t, m)
        elif kind == "tv":
            d = 0.5 * (s - t).abs().sum()
        else:
            a = alpha
            d = (a * s + (1 - a) * t - s ** a * t ** (1 - a)).sum() / (a * (1 - a))
        out.append(torch.as_tensor(d, dtype=torch.float64))
    return torch.stack(out).reshape(x.shape[:-1])


def _inputs(n, vocab, k, dtype, seed, device, kind="mixed"):
    x = make_logits(n, vocab, torch.float64, kind=kind, seed=seed)
    idx = make_indices(x, k, seed=seed)
    if n > 2:
        idx[2] = -1  # a row of unused slots only
    target = make_targets(x, idx, seed=seed, dtype=torch.float32)
    return x.to(dtype).to(device), idx.to(device), target.to(device)


def _check(backend, x, idx, target, kind, alpha, temperature, tail, what):
    dtype = x.dtype
    xl = x.detach().clone().requires_grad_(True)
    kl = rlkernels.sparse_kl(xl, idx, target, kind=kind, alpha=alpha, beta=BETA,
                             temperature=temperature, tail=tail, backend=backend)
    assert kl.shape == x.shape[:-1]
    assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    xn = x.detach().cpu().double().requires_grad_(True)
    kln = _naive(xn, idx.cpu(), target.cpu(), kind, alpha, BETA, temperature, tail)
    assert_values_close(kl, kln.detach(), what=f"{what} value")
    w = torch.randn(kl.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (g,) = torch.autograd.grad((kl * w.to(kl)).sum(), xl)
    (gn,) = torch.autograd.grad((kln * w).sum(), xn)
    # terms of the gradient are of size p |w| (1 + D) / T (alpha: (s - r) / (1 - a) and the
    # like), each p carrying fp32's relative rounding of its exponent
    d_max = float(kln.detach().abs().max()) if kln.numel() else 0.0
    floor = fp32_floor(x, temperature=temperature,
                       upstream=float(w.abs().max()) * (2.0 + d_max))
    assert_grad_close(g, gn.to(g.device), dtype, floor, what=f"{what} grad")
    return kl, g


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no_tail"])
@pytest.mark.parametrize("kind,alpha", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_values_and_grads_vs_naive(backend, device, dtype, kind, alpha, tail):
    needs(backend, "sparse_logprobs", device)
    x, idx, target = _inputs(6, 33, 4, dtype, 11, device)
    kl, g = _check(backend, x, idx, target, kind, alpha, 0.8, tail,
                   f"{backend} {dtype} {kind} a={alpha} tail={tail}")
    assert kl[2] == 0 and (g[2] == 0).all(), "a row of unused slots: identical buckets"


@pytest.mark.parametrize("kind,alpha", KINDS, ids=KIND_IDS)
def test_peaked_rows_and_odd_vocab(backend, device, kind, alpha):
    """Peaked students (s_max = 1 - tiny, the tail bucket tiny) and V = 129, K = 7."""
    needs(backend, "sparse_logprobs", device)
    x, idx, target = _inputs(4, 129, 7, torch.float32, 21, device, kind="peaked")
    _check(backend, x, idx, target, kind, alpha, 1.0, True, f"{backend} peaked {kind}")


@pytest.mark.parametrize("kind,alpha", KINDS, ids=KIND_IDS)
def test_fp64_to_1e9(backend, device, kind, alpha):
    """fp64 logits: the bucket function in fp64 matches the naive formula to 1e-9 (alpha
    near its limits is where the naive ``s^a t^(1-a)`` loses digits: 1e-7 there)."""
    needs(backend, "sparse_logprobs", device)
    x, idx, target = _inputs(5, 33, 4, torch.float64, 31, device)
    kl = rlkernels.sparse_kl(x, idx, target, kind=kind, alpha=alpha, beta=BETA, tail=True,
                             backend=backend)
    kln = _naive(x.cpu(), idx.cpu(), target.cpu(), kind, alpha)
    tol = 1e-7 if alpha in (1e-3, 0.999) else 1e-9
    assert_values_close(kl, kln, atol=tol, rtol=tol, what=f"{backend} fp64 {kind}")


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "no_tail"])
@pytest.mark.parametrize("kind,alpha", [("reverse", None), ("jsd", None), ("alpha", 0.4),
                                        ("alpha", 0.7), ("tv", None)])
def test_gradcheck_fp64(kind, alpha, tail):
    """Analytic gradient (the bucket function's, through sparse_logprobs' backward) against
    finite differences, fp64, a -inf column and a -1 slot included. tv: the inputs keep every
    |s_b - t_b| away from 0 (its kink)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)
    x[1, 4] = -math.inf
    idx = torch.tensor([[0, 2, -1], [5, 4, 3], [1, -1, -1]])
    target = torch.log_softmax(torch.randn(3, 6, generator=g, dtype=torch.float64), -1)
    target = target.gather(1, idx.clamp_min(0))
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: rlkernels.sparse_kl(x, idx, target, kind=kind, alpha=alpha, beta=BETA,
                                      temperature=1.2, tail=tail, backend="torch"), (x,))


def test_forward_kind_is_todays_kernel_bit_for_bit(backend, device):
    """The default, kind="forward" and alpha=0 all run the fused kernel: the same bits as
    the reference's kernel function on torch (the op's own path), every spelling alike."""
    needs(backend, "sparse_kl", device)
    x, idx, target = _inputs(6, 33, 4, torch.float32, 41, device)
    for tail in (True, False):
        base = rlkernels.sparse_kl(x, idx, target, temperature=0.9, tail=tail, backend=backend)
        for kw in (dict(kind="forward"), dict(kind="alpha", alpha=0.0),
                   dict(kind="forward", beta=0.1)):
            other = rlkernels.sparse_kl(x, idx, target, temperature=0.9, tail=tail,
                                        backend=backend, **kw)
            assert bit_equal(base, other), kw
        if backend == "torch":
            ref = rsp.sparse_kl_forward(x.reshape(-1, 33), idx.reshape(-1, 4),
                                        target.reshape(-1, 4), 0.9, tail)[0]
            assert bit_equal(base, ref.view(base.shape))


def test_alpha_limits(backend, device):
    """alpha = 1 is kind "reverse" (same bits); alpha -> 0, 1 approach "forward" and
    "reverse" with the tail bucket (both bucket sets sum to 1)."""
    needs(backend, "sparse_logprobs", device)
    x, idx, target = _inputs(6, 33, 4, torch.float32, 51, device)
    rev = rlkernels.sparse_kl(x, idx, target, kind="reverse", backend=backend)
    assert bit_equal(rlkernels.sparse_kl(x, idx, target, kind="alpha", alpha=1.0,
                                         backend=backend), rev)
    fwd = rlkernels.sparse_kl(x, idx, target, kind="forward", backend=backend)
    finite = torch.isfinite(fwd)
    near0 = rlkernels.sparse_kl(x, idx, target, kind="alpha", alpha=1e-7, backend=backend)
    near1 = rlkernels.sparse_kl(x, idx, target, kind="alpha", alpha=1 - 1e-7, backend=backend)
    torch.testing.assert_close(near0[finite], fwd[finite], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(near1, rev, atol=1e-4, rtol=1e-4)


def test_unused_slots_are_not_read(backend, device):
    """A NaN target (and any id value) at a -1 slot changes nothing; a -1 slot anywhere in
    the row (not only at the end) is skipped."""
    needs(backend, "sparse_logprobs", device)
    x, idx, target = _inputs(4, 33, 5, torch.float32, 61, device)
    idx[0, 1] = -1
    clean = torch.where(idx >= 0, target, torch.zeros_like(target))
    dirty = torch.where(idx >= 0, target, torch.full_like(target, math.nan))
    for kind, alpha in KINDS:
        a = rlkernels.sparse_kl(x, idx, clean, kind=kind, alpha=alpha, backend=backend)
        b = rlkernels.sparse_kl(x, idx, dirty, kind=kind, alpha=alpha, backend=backend)
        assert bit_equal(a, b) and torch.isfinite(a).all(), kind


def test_ids_covering_the_vocabulary(backend, device):
    """K = V ids cover every column: no tail bucket on either side (t_tail = 0 whatever the
    rounding of sum t_k), so tail on and off agree; a teacher whose K masses sum to 1 + 1e-7
    keeps every kind finite."""
    needs(backend, "sparse_logprobs", device)
    x = make_logits(3, 7, torch.float32, kind="normal", seed=71, device=device)
    idx = torch.stack([torch.randperm(7, generator=torch.Generator().manual_seed(r))
                       for r in range(3)]).to(device)
    teacher = torch.log_softmax(torch.randn(3, 7, generator=torch.Generator().manual_seed(9),
                                            dtype=torch.float64), -1) + 1e-7
    target = teacher.gather(1, idx.cpu()).float().to(device)
    for kind, alpha in KINDS:
        on = rlkernels.sparse_kl(x, idx, target, kind=kind, alpha=alpha, backend=backend)
        off = rlkernels.sparse_kl(x, idx, target, kind=kind, alpha=alpha, tail=False,
                                  backend=backend)
        assert torch.isfinite(on).all(), kind
        torch.testing.assert_close(on, off, atol=1e-6, rtol=1e-6)


def test_reverse_is_inf_where_the_teacher_has_no_tail(backend, device):
    """KL(student || teacher) with sum_k t_k >= 1 (teacher tail 0) and a student tail > 0:
    +inf, as the definition says; the bounded kinds stay finite there."""
    needs(backend, "sparse_logprobs", device)
    x = torch.zeros(1, 9, device=device)
    idx = torch.tensor([[0, 1]], device=device)
    target = torch.log(torch.tensor([[0.5, 0.5]], device=device))
    assert rlkernels.sparse_kl(x, idx, target, kind="reverse", backend=backend).item() \
        == math.inf
    for kind, alpha in KINDS[1:]:
        assert torch.isfinite(rlkernels.sparse_kl(x, idx, target, kind=kind, alpha=alpha,
                                                  backend=backend)).all(), kind


def test_leading_dims_and_int32_ids(backend, device):
    needs(backend, "sparse_logprobs", device)
    x, idx, target = _inputs(6, 33, 4, torch.float32, 81, device)
    flat = rlkernels.sparse_kl(x, idx, target, kind="jsd", backend=backend)
    nd = rlkernels.sparse_kl(x.view(2, 3, 33), idx.view(2, 3, 4).int(),
                             target.view(2, 3, 4), kind="jsd", backend=backend)
    assert nd.shape == (2, 3) and bit_equal(nd.reshape(-1), flat)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="alpha"), r"alpha: kind='alpha' needs alpha.*got None"),
    (dict(kind="jsd", alpha=0.5), r"alpha: only used with kind='alpha'.*kind='jsd'"),
    (dict(kind="forward", alpha=0.5), r"alpha: only used with kind='alpha'"),
    (dict(kind="alpha", alpha=1.5), r"alpha.*1\.5"),
    (dict(kind="alpha", alpha=-0.1), r"alpha.*-0\.1"),
    (dict(kind="kl"), r"kind.*'kl'"),
    (dict(kind="jsd", beta=2.0), r"beta.*2\.0"),
])
def test_argument_errors(kwargs, match):
    x, idx, target = _inputs(2, 7, 3, torch.float32, 91, "cpu")
    with pytest.raises(ValueError, match=match):
        rlkernels.sparse_kl(x, idx, target, backend="torch", **kwargs)
