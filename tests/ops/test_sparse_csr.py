"""CSR supports of the sparse ops (issue 21): ``sparse_logprobs``, ``sparse_kl`` and
``linear_sparse_logprobs`` with ``offsets [N + 1]`` and flat ids ``[nnz]``, as vLLM returns a
sampler's kept set.

Checked: the CSR call against the padded call on the same supports (rows padded with -1 to
the longest), and against the fp64 torch reference of the CSR call (SPEC 5 tolerances), on
ragged rows (length 0 included), -1 slots inside a segment, peaked / flat / -inf-masked rows,
an odd V and ``[B, T, V]`` logits; rows without ids; the backend functions on a view of a
larger CSR (absolute positions); the linear head in chunks; the reference's row chunks; bad
inputs and the debug-mode value checks; opcheck and ``torch.compile(fullgraph=True)``.
"""

import math

import pytest
import torch

import rlkernels as rk
import _policy_naive as naive
from _naive import assert_values_close, make_logits

F64 = torch.float64
B, T, V = 2, 5, 37  # 10 rows, an odd vocabulary


def _support(n=B * T, vocab=V, seed=0, lengths=None):
    """Ragged distinct ids per row (lengths cycle through 0, 1, 4, 7, V-1 ... unless given),
    one -1 slot inside row 2's segment; as CSR ``(ids, offsets)`` and padded ``[n, K_max]``."""
    g = torch.Generator().manual_seed(seed + 1)
    if lengths is None:
        cycle = [3, 0, 4, 7, 1, vocab - 1, 5, 2, 6, 4]
        lengths = [cycle[r % len(cycle)] for r in range(n)]
    rows = [torch.randperm(vocab, generator=g)[:m] for m in lengths]
    if n > 2 and lengths[2] > 1:
        rows[2][1] = -1  # an unused slot inside a CSR segment
    ids = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)
    offsets = torch.zeros(n + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    k = max(max(lengths, default=0), 1)
    padded = torch.full((n, k), -1, dtype=torch.int64)
    for r, row in enumerate(rows):
        padded[r, :len(row)] = row
    return ids, offsets, padded


def _logits(dtype, lead=(B, T), vocab=V, seed=0):
    n = math.prod(lead)
    return make_logits(n, vocab, F64, seed=seed).view(*lead, vocab).to(dtype)


def _targets(ids, seed=0):
    """Teacher log-probs at the ids (a normalized distribution over V, gathered); -1 slots
    get NaN, which must never be read."""
    g = torch.Generator().manual_seed(seed + 5)
    teacher = torch.log_softmax(2.0 * torch.randn(V, generator=g, dtype=F64), -1)
    return torch.where(ids >= 0, teacher[ids.clamp_min(0)], float("nan"))


def _to_padded(flat, offsets, padded):
    """A ``[nnz]`` output of the CSR call laid out as the padded call's ``[N, K]``."""
    out = torch.full(padded.shape, float("-inf"), dtype=flat.dtype)
    for r in range(padded.shape[0]):
        s, e = int(offsets[r]), int(offsets[r + 1])
        out[r, :e - s] = flat[s:e]
    return out


def _grad(fn, x, *ups):
    x = x.detach().requires_grad_(True)
    outs = fn(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((torch.where(torch.isfinite(o), o, 0.0) * u.to(o.dtype)).sum()
               for o, u in zip(outs, ups))
    (g,) = torch.autograd.grad(loss, x)
    return tuple(o.detach() for o in outs), g


# ================================================================ CSR = padded, same supports

@pytest.mark.parametrize("normalize", ["full", "support"])
def test_sparse_logprobs_csr_matches_padded(backend, normalize):
    x = _logits(torch.float32)
    ids, off, padded = _support()
    g = torch.Generator().manual_seed(3)
    g_lp, g_tail = torch.randn(ids.shape, generator=g), torch.randn(B, T, generator=g)
    kw = dict(temperature=0.8, normalize=normalize, return_tail=True, backend=backend)
    (lp, tail), gx = _grad(lambda z: rk.sparse_logprobs(z, ids, offsets=off, **kw), x,
                           g_lp, g_tail)
    (lp_p, tail_p), gx_p = _grad(
        lambda z: rk.sparse_logprobs(z, padded.view(B, T, -1), **kw), x,
        _to_padded(g_lp, off, padded).nan_to_num(0.0, 0.0, 0.0).view(B, T, -1), g_tail)
    assert lp.shape == ids.shape and tail.shape == (B, T)
    assert_values_close(_to_padded(lp, off, padded), lp_p.view(B * T, -1), what="logp")
    assert_values_close(tail, tail_p, what="tail")
    naive.grad_bound(gx, gx_p)


@pytest.mark.parametrize("kind, with_tail", [("forward", True), ("forward", False),
                                             ("reverse", True), ("tv", False)])
def test_sparse_kl_csr_matches_padded(backend, kind, with_tail):
    x = _logits(torch.float32)
    ids, off, padded = _support()
    tgt = _targets(ids)
    tgt_p = _to_padded(tgt, off, padded).view(B, T, -1)
    up = torch.randn(B, T, generator=torch.Generator().manual_seed(4))
    kw = dict(kind=kind, temperature=0.9, tail=with_tail, backend=backend)
    (kl,), gx = _grad(lambda z: rk.sparse_kl(z, ids, tgt, offsets=off, **kw), x, up)
    (kl_p,), gx_p = _grad(lambda z: rk.sparse_kl(z, padded.view(B, T, -1), tgt_p, **kw), x, up)
    assert kl.shape == (B, T)
    assert_values_close(kl, kl_p, what=f"sparse_kl {kind}")
    naive.grad_bound(gx, gx_p)


# ============================================================== CSR vs the fp64 reference

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", ["full", "support"])
def test_sparse_logprobs_csr_vs_fp64(backend, dtype, normalize):
    x = _logits(dtype)
    ids, off, _ = _support()
    ids32, off32 = ids.int(), off.int()  # int32 CSR, as vLLM may hand it over
    g = torch.Generator().manual_seed(5)
    g_lp, g_tail = torch.randn(ids.shape, generator=g), torch.randn(B, T, generator=g)
    kw = dict(temperature=1.3, normalize=normalize, return_tail=True)
    out, gx = _grad(lambda z: rk.sparse_logprobs(z, ids32, offsets=off32, backend=backend,
                                                 **kw), x, g_lp, g_tail)
    ref, g_ref = _grad(lambda z: rk.sparse_logprobs(z, ids, offsets=off, backend="torch",
                                                    **kw), x.double(), g_lp, g_tail)
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32
        assert_values_close(o, r)
    assert gx.dtype == dtype
    naive.grad_bound(gx, g_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_kl_csr_vs_fp64(backend, dtype):
    x = _logits(dtype)
    ids, off, _ = _support()
    tgt = _targets(ids).float()
    up = torch.randn(B, T, generator=torch.Generator().manual_seed(6))
    (kl,), gx = _grad(lambda z: rk.sparse_kl(z, ids, tgt, offsets=off, backend=backend), x, up)
    (ref,), g_ref = _grad(lambda z: rk.sparse_kl(z, ids, tgt, offsets=off, backend="torch"),
                          x.double(), up)
    assert_values_close(kl, ref)
    # SPEC 5's bound plus the fp32 rounding of t_k = exp(target) (t_k <= 1) times the upstream
    # gradient, which the fp64 reference does not have (the padded call has the same error)
    eps = torch.finfo(torch.float32).eps
    tol = 2 * torch.finfo(dtype).eps * g_ref.abs().max().item() + eps * up.abs().max().item()
    assert (gx.double() - g_ref).abs().max().item() <= tol + 1e-7


# ======================================================================== rows without ids

def test_rows_without_ids(backend):
    """Length-0 rows: "full" has no log-probs there and a tail of log 1 = 0, "support" has no
    outputs; the forward KL is 0 (one bucket, the tail, holding everything on both sides);
    their logits get no gradient."""
    x = _logits(torch.float32, lead=(4,))
    ids, off, _ = _support(n=4, lengths=[0, 3, 0, 2])
    empty = torch.tensor([True, False, True, False])
    up = torch.ones(ids.shape)
    (lp, tail), gx = _grad(lambda z: rk.sparse_logprobs(z, ids, offsets=off, return_tail=True,
                                                        backend=backend), x, up, torch.ones(4))
    assert lp.shape == (5,)
    assert torch.equal(tail[empty], torch.zeros(2))
    assert (tail[~empty] < 0).all()
    assert torch.equal(gx[empty], torch.zeros(2, V))
    (lp_s,), gs = _grad(lambda z: rk.sparse_logprobs(z, ids, offsets=off, normalize="support",
                                                     backend=backend), x, up)
    assert torch.equal(gs[empty], torch.zeros(2, V))
    # every row of length 0: no ids at all
    none = torch.zeros(0, dtype=torch.int64)
    lp0, tail0 = rk.sparse_logprobs(x, none, offsets=torch.zeros(5, dtype=torch.int64),
                                    return_tail=True, backend=backend)
    assert lp0.shape == (0,) and torch.equal(tail0, torch.zeros(4))
    kl0 = rk.sparse_kl(x, none, torch.zeros(0), offsets=torch.zeros(5, dtype=torch.int64),
                       backend=backend)
    assert torch.equal(kl0, torch.zeros(4))


# ======================================================= backend functions: absolute positions

@pytest.mark.parametrize("normalize", ["full", "support"])
def test_offsets_view_writes_its_rows_at_absolute_positions(backend, normalize):
    """A view ``offsets[r0:r1 + 1]`` of a larger CSR with the whole flat ids describes rows
    r0 .. r1: the backend functions read and write at the same absolute positions (the
    linear head's chunks rely on it), and the backward's gradient is that of those rows."""
    kern = rk.backends.kernel(backend, "sparse", "sparse_logprobs_forward")
    kern_b = rk.backends.kernel(backend, "sparse", "sparse_logprobs_backward")
    x = _logits(torch.float32, lead=(B * T,))
    ids, off, _ = _support()
    lp_all, tail_all, st_all = kern(x, ids, 1.0, normalize, True, off)
    r0, r1 = 3, 8
    lp, tail, st = kern(x[r0:r1], ids, 1.0, normalize, True, off[r0:r1 + 1])
    s, e = int(off[r0]), int(off[r1])
    assert torch.equal(lp[s:e], lp_all[s:e])
    assert torch.equal(tail, tail_all[r0:r1]) and torch.equal(st, st_all[r0:r1])
    g = torch.randn(ids.shape, generator=torch.Generator().manual_seed(7))
    gt = torch.randn(B * T, generator=torch.Generator().manual_seed(8))
    grad_all = kern_b(g, gt, x, ids, lp_all, tail_all, st_all, 1.0, normalize, off)
    grad = kern_b(g, gt[r0:r1], x[r0:r1], ids, lp_all, tail_all[r0:r1], st_all[r0:r1], 1.0,
                  normalize, off[r0:r1 + 1])
    assert torch.equal(grad, grad_all[r0:r1])


def test_reference_row_chunks(monkeypatch):
    """The torch reference walks the rows in chunks (CHUNK_ELEMENTS): a CSR call over many
    chunks gives the one-chunk bits."""
    import rlkernels.reference as ref

    x = _logits(F64)
    ids, off, _ = _support()
    tgt = _targets(ids)
    one = _grad(lambda z: rk.sparse_logprobs(z, ids, offsets=off, normalize="support",
                                             return_tail=True, backend="torch"),
                x, torch.ones(ids.shape), torch.ones(B, T))
    kl_one = rk.sparse_kl(x, ids, tgt, offsets=off, backend="torch")
    monkeypatch.setattr(ref, "CHUNK_ELEMENTS", 3 * V)  # 3 rows a chunk
    many = _grad(lambda z: rk.sparse_logprobs(z, ids, offsets=off, normalize="support",
                                              return_tail=True, backend="torch"),
                 x, torch.ones(ids.shape), torch.ones(B, T))
    for a, b in zip(one[0] + (one[1],), many[0] + (many[1],)):
        assert torch.equal(a, b)
    assert torch.equal(kl_one, rk.sparse_kl(x, ids, tgt, offsets=off, backend="torch"))


# ================================================================= linear_sparse_logprobs

def _head(dtype, h=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, h, generator=g).to(dtype)
    weight = (torch.randn(V, h, generator=g) / 3).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    return hidden, weight, bias


def _head_run(fn, hidden, weight, bias, ups):
    params = [t.detach().requires_grad_(True) for t in (hidden, weight, bias)]
    lp, tail = fn(*params)
    loss = (torch.where(torch.isfinite(lp), lp, 0.0) * ups[0]).sum() + (tail * ups[1]).sum()
    return (lp.detach(), tail.detach()), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("normalize", ["full", "support"])
def test_linear_sparse_csr_matches_padded_and_fp64(backend, normalize):
    hidden, weight, bias = _head(torch.float32)
    ids, off, padded = _support()
    g = torch.Generator().manual_seed(9)
    ups = (torch.randn(ids.shape, generator=g), torch.randn(B, T, generator=g))
    kw = dict(temperature=0.7, normalize=normalize, return_tail=True)
    out, grads = _head_run(lambda h, w, b: rk.linear_sparse_logprobs(
        h, w, ids, offsets=off, bias=b, backend=backend, **kw), hidden, weight, bias, ups)
    ups_p = (_to_padded(ups[0], off, padded).nan_to_num(0.0, 0.0, 0.0).view(B, T, -1), ups[1])
    out_p, grads_p = _head_run(lambda h, w, b: rk.linear_sparse_logprobs(
        h, w, padded.view(B, T, -1), bias=b, backend=backend, **kw), hidden, weight, bias,
        ups_p)
    ref, grads_ref = _head_run(lambda h, w, b: rk.linear_sparse_logprobs(
        h, w, ids, offsets=off, bias=b, backend="torch", **kw), hidden.double(),
        weight.double(), bias.double(), ups)
    assert out[0].shape == ids.shape and out[1].shape == (B, T)
    assert_values_close(_to_padded(out[0], off, padded), out_p[0].view(B * T, -1))
    assert_values_close(out[1], out_p[1])
    for o, r in zip(out, ref):
        assert_values_close(o, r)
    for gc, gp, gr in zip(grads, grads_p, grads_ref):
        torch.testing.assert_close(gc, gp, atol=1e-6, rtol=1e-5)
        tol = 20 * torch.finfo(torch.float32).eps * gr.abs().max().item() + 1e-7  # H-term GEMM
        assert (gc.double() - gr).abs().max().item() <= tol


@pytest.mark.parametrize("with_tail", [False, True])
def test_linear_sparse_csr_chunked_equals_unchunked(with_tail):
    """The triton head in chunks of 3 rows (each chunk passes its view of offsets and the
    whole flat ids / log-probs) against one chunk: values and gradients."""
    from rlkernels.triton import linear as tlin

    hidden, weight, bias = _head(torch.float32)
    hidden = hidden.view(B * T, -1)
    ids, off, _ = _support()
    one = tlin.linear_sparse_logprobs_forward(hidden, weight, bias, ids, 0.9, "full",
                                              with_tail, off)
    three = tlin.linear_sparse_logprobs_forward(hidden, weight, bias, ids, 0.9, "full",
                                                with_tail, off, chunk_rows=3)
    for a, b in zip(one, three):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, equal_nan=True)
    g = torch.Generator().manual_seed(10)
    g_lp = torch.randn(ids.shape, generator=g)
    g_tail = torch.randn(B * T, generator=g) if with_tail else None
    d_one = tlin.linear_sparse_logprobs_backward(g_lp, g_tail, hidden, weight, bias, ids,
                                                 *one, 0.9, "support", off)
    d_three = tlin.linear_sparse_logprobs_backward(g_lp, g_tail, hidden, weight, bias, ids,
                                                   *one, 0.9, "support", off, chunk_rows=3)
    for a, b in zip(d_one, d_three):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ============================================================================ bad inputs

def _x_ids():
    ids, off, _ = _support()
    return _logits(torch.float32), ids, off


@pytest.mark.parametrize("call, error, message", [
    (lambda x, i, o: rk.sparse_logprobs(x, i, offsets=o.float()), TypeError,
     r"offsets: expected dtype in \(torch.int32, torch.int64\)|offsets: expected"),
    (lambda x, i, o: rk.sparse_logprobs(x, i, offsets=o[:-1]), ValueError,
     r"offsets: expected shape \(11,\) \(N \+ 1 row offsets, N = 10 rows of logits\), "
     r"got \(10,\)"),
    (lambda x, i, o: rk.sparse_logprobs(x, i, offsets=o.view(1, -1)), ValueError,
     r"offsets: expected shape \(11,\)"),
    (lambda x, i, o: rk.sparse_logprobs(x, i.view(1, -1), offsets=o), ValueError,
     r"indices: expected a 1-d tensor \[nnz\] of ids with offsets="),
    (lambda x, i, o: rk.sparse_logprobs(x, i.float(), offsets=o), TypeError, r"indices"),
    (lambda x, i, o: rk.sparse_logprobs(x, i.clamp(max=V - 1) + 1, offsets=o), ValueError,
     r"indices: expected ids in \[0, 37\) or -1"),
    (lambda x, i, o: rk.sparse_kl(x, i, torch.zeros(3), offsets=o), ValueError,
     r"target_logprobs: expected shape"),
    (lambda x, i, o: rk.sparse_kl(x, i, torch.zeros(i.shape), offsets=o[1:]), ValueError,
     r"offsets: expected shape \(11,\)"),
    (lambda x, i, o: rk.linear_sparse_logprobs(torch.zeros(B, T, 4), torch.zeros(V, 4), i,
                                               offsets=o[:5]), ValueError,
     r"offsets: expected shape \(11,\) \(N \+ 1 row offsets, N = 10 rows of hidden\)"),
])
def test_bad_inputs_name_the_argument(call, error, message):
    x, ids, off = _x_ids()
    with pytest.raises(error, match=message):
        call(x, ids, off)


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("mutate, message", [
    (lambda o: o.clone().index_fill_(0, torch.tensor([4]), 0),
     r"offsets: expected non-decreasing offsets, got offsets\[3\] = \d+ > offsets\[4\] = 0"),
    (lambda o: torch.cat([o[:-1], o[-1:] - 1]),
     r"offsets: expected offsets\[-1\] == nnz = \d+ \(the length of indices\), got \d+"),
    (lambda o: o + 1, r"offsets: expected offsets\[0\] == 0, got 1"),
])
def test_offsets_values_are_checked(debug, mutate, message):
    """The value checks run on plain CPU tensors (no device to wait for) and, in debug mode,
    everywhere (rlkernels.set_debug)."""
    x, ids, off = _x_ids()
    before = rk._checks.debug_enabled()
    rk.set_debug(debug)
    try:
        with pytest.raises(ValueError, match=message):
            rk.sparse_logprobs(x, ids, offsets=mutate(off))
        with pytest.raises(ValueError, match=message):
            rk.sparse_kl(x, ids, _targets(ids), offsets=mutate(off))
    finally:
        rk.set_debug(before)


# ================================================================== torch integration

def test_opcheck_csr():
    x = _logits(torch.float32, lead=(6,)).requires_grad_(True)
    ids, off, _ = _support(n=6)
    torch.library.opcheck(torch.ops.rlkernels.sparse_logprobs.default,
                          (x, ids, 0.9, "full", True, "torch", off))
    torch.library.opcheck(torch.ops.rlkernels.sparse_kl.default,
                          (x, ids, _targets(ids).float(), 0.9, True, "torch", off))


def test_compile_fullgraph_csr(backend):
    x = _logits(torch.float32, lead=(6,))
    ids, off, _ = _support(n=6)

    def step(z):
        lp, tail = rk.sparse_logprobs(z, ids, offsets=off, return_tail=True, backend=backend)
        return torch.where(torch.isfinite(lp), lp, 0.0).sum() + tail.sum()

    eager_x = x.clone().requires_grad_(True)
    want = step(eager_x)
    (g_want,) = torch.autograd.grad(want, eager_x)
    comp_x = x.clone().requires_grad_(True)
    got = torch.compile(step, fullgraph=True)(comp_x)
    (g_got,) = torch.autograd.grad(got, comp_x)
    assert torch.equal(got, want) and torch.equal(g_got, g_want)
