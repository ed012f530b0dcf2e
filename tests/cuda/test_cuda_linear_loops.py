"""The cuda backend's fused lm_head (rlkernels/cuda/linear.py on the chunk loops of
rlkernels/_cublas_head.py) on CPU: the chunk kernels it hands to the loops (the vocabulary
forward, csrc/linear.cu's "d z of a slice", the sparse kernels) are replaced by stand-ins
built from the reference backend, so the chunking, zero padding, vocabulary slicing, row
groups, bias partials, ``rows=`` and CSR plumbing are checked here against the fp64 reference;
and the launcher of ``linear_dz`` against a recording stand-in for rlkernels._C (when the
built extension has that entry). The kernels themselves: tests/cuda/test_cuda_linear.py (GPU).
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from rlkernels.cuda import linear as cl
from rlkernels.reference import linear as ref_linear
from rlkernels.reference import sparse as ref_sparse
from rlkernels.reference import vocab as ref_vocab


def _dz_stand_in(y, glp, gh, tok, stats, dz, dbp, n_live, v0, temperature, ignore_index):
    """csrc/linear.cu ``linear_dz`` from the reference: the whole-row backward on the slice's
    columns with the saved statistics (a token outside the slice gives no one-hot term)."""
    if n_live == 0:
        return
    cnt = y.shape[1]
    t = tok[:n_live]
    valid = t != ignore_index
    inside = (t >= v0) & (t < v0 + cnt)
    local = torch.where(valid, torch.where(inside, t - v0, cnt), ignore_index)
    g = ref_vocab.token_logprobs_backward(
        None if glp is None else glp[:n_live], None if gh is None else gh[:n_live],
        y[:n_live], local, stats[:n_live], temperature, ignore_index)
    dz[:n_live] = g.to(dz.dtype)
    if dbp is not None:
        for b, r in enumerate(range(0, n_live, cl._DZ_BLOCK_ROWS)):
            dbp[b] = g[r:r + cl._DZ_BLOCK_ROWS].sum(0)


@pytest.fixture
def cpu_kernels(monkeypatch):
    calls = {"dz": 0, "fwd": 0}

    def dz(*a):
        calls["dz"] += 1
        _dz_stand_in(*a)

    def fwd(*a):
        calls["fwd"] += 1
        return ref_vocab.token_logprobs_forward(*a)

    # (3 rows per bias partial: several partials per chunk, the last one short)
    monkeypatch.setattr(cl, "_DZ_BLOCK_ROWS", 3)
    monkeypatch.setattr(cl, "_dz_slice", dz)
    monkeypatch.setattr(cl, "_vocab_forward", fwd)
    monkeypatch.setattr(cl, "_sparse_forward_kernel", ref_sparse.sparse_logprobs_forward)
    monkeypatch.setattr(cl, "_sparse_backward_kernel", ref_sparse.sparse_logprobs_backward)
    return calls


def _inputs(n, v, h, dtype, bias, seed=0, pad=(1, 4)):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype)
    w = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    w[3] *= 8  # a peaked column
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    tok = torch.randint(0, v, (n,), generator=g)
    tok[list(pad)] = -100
    hid[pad[0]] = float("nan")  # a padding row's hidden state is never used
    return hid, w, b, tok


def _tol(x, ref, eps):
    return 2 * eps * ref.abs().max().item() + 1e-7


def _ref_grads(hid, w, b, tok, stats, glp, gh, t, hp=None):
    d = torch.float64
    return ref_linear.linear_token_logprobs_backward(
        glp.to(d), None if gh is None else gh.to(d), hid.to(d).nan_to_num(0.0), w.to(d),
        None if b is None else b.to(d), tok, stats.to(d), t, -100, hp)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("chunk,slice_cols,dz_bytes", [(8, 16, 4 * 16 * 8), (32, None, 1 << 28),
                                                       (5, 7, 4 * 7 * 10)])
def test_token_logprobs_fp32_against_fp64(cpu_kernels, bias, entropy, chunk, slice_cols,
                                          dz_bytes):
    n, v, h, t = 21, 37, 24, 0.7
    hid, w, b, tok = _inputs(n, v, h, torch.float32, bias)
    lp, ent, st = cl.linear_token_logprobs_forward(hid, w, b, tok, t, -100, True,
                                                   chunk_rows=chunk)
    r_lp, r_ent, r_st = ref_linear.linear_token_logprobs_forward(
        hid.double().nan_to_num(0.0), w.double(), None if b is None else b.double(), tok, t,
        -100, True)  # (the reference reads a padding row's hidden state: no NaN there)
    assert cpu_kernels["fwd"] == -(-n // chunk)
    torch.testing.assert_close(lp, r_lp.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, r_ent.float(), atol=1e-5, rtol=1e-5)
    assert (lp[[1, 4]] == 0).all() and (ent[[1, 4]] == 0).all()
    g = torch.Generator().manual_seed(1)
    glp = torch.randn(n, generator=g)
    gh = torch.randn(n, generator=g) if entropy else None
    gr = cl.linear_token_logprobs_backward(glp, gh, hid, w, b, tok, st, t, -100,
                                           chunk_rows=chunk, slice_cols=slice_cols,
                                           dz_bytes=dz_bytes)
    ref = _ref_grads(hid, w, b, tok, r_st, glp, gh, t)
    for got, want in zip(gr, ref):
        if want is None:
            assert got is None
            continue
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        tol = _tol(got, want, torch.finfo(torch.float32).eps) * (2 + h)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
    assert (gr[0][[1, 4]] == 0).all()  # padding rows: exact zeros despite the NaN row


@pytest.mark.parametrize("hp", [None, "bf16", "fp32", "tf32"])
def test_token_logprobs_bf16_head_precisions(cpu_kernels, hp):
    n, v, h = 13, 29, 16
    hid, w, b, tok = _inputs(n, v, h, torch.bfloat16, True)
    lp, ent, st = cl.linear_token_logprobs_forward(hid, w, b, tok, 1.0, -100, True, hp,
                                                   chunk_rows=4)
    d = torch.float64
    r_lp, r_ent, r_st = ref_linear.linear_token_logprobs_forward(
        hid.to(d).nan_to_num(0.0), w.to(d), b.to(d), tok, 1.0, -100, True)
    # bf16 operands are exact in fp32: the forward matches fp64 whatever the head precision
    torch.testing.assert_close(lp, r_lp.float(), atol=1e-5, rtol=1e-5)
    glp = torch.randn(n, generator=torch.Generator().manual_seed(2))
    gr = cl.linear_token_logprobs_backward(glp, None, hid, w, b, tok, st, 1.0, -100, hp,
                                           chunk_rows=4, slice_cols=8)
    ref = _ref_grads(hid, w, b, tok, r_st, glp, None, 1.0)
    # d z in bf16 unless the head is fp32 / tf32: relative 2^-8 per element of d z
    eps = 2.0 ** -7 if hp in (None, "bf16") else torch.finfo(torch.bfloat16).eps
    for got, want in zip(gr, ref):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double(), want, atol=_tol(got, want, eps) * 4, rtol=0)


def test_fp64_and_rows(cpu_kernels):
    n, v, h = 17, 23, 12
    hid, w, b, tok = _inputs(n, v, h, torch.float64, True)
    sel = torch.tensor([0, 3, 5, 6, 11, 16])
    lp, ent, st = cl.linear_token_logprobs_forward(hid, w, b, tok, 1.3, -100, True, rows=sel,
                                                   chunk_rows=4)
    r = ref_linear.linear_token_logprobs_forward(hid, w, b, tok, 1.3, -100, True, rows=sel)
    for got, want in zip((lp, ent, st), r):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    glp, gh = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    gr = cl.linear_token_logprobs_backward(glp, gh, hid, w, b, tok, st, 1.3, -100, rows=sel,
                                           chunk_rows=4, slice_cols=5)
    rg = ref_linear.linear_token_logprobs_backward(glp, gh, hid, w, b, tok, r[2], 1.3, -100,
                                                   rows=sel)
    for got, want in zip(gr, rg):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_batch_invariance_bit_exact(cpu_kernels):
    """A row's log-prob and d hidden are bit-identical alone and inside a batch (and the
    batch's results across two runs): every GEMM has the chunk's shape whatever N."""
    n, v, h = 19, 31, 20
    hid, w, b, tok = _inputs(n, v, h, torch.float32, True)
    glp = torch.randn(n, generator=torch.Generator().manual_seed(3))

    def run(hh, tt, gg):
        lp, _, st = cl.linear_token_logprobs_forward(hh, w, b, tt, 1.0, -100, True,
                                                     chunk_rows=8)
        gr = cl.linear_token_logprobs_backward(gg, None, hh, w, b, tt, st, 1.0, -100,
                                               chunk_rows=8, slice_cols=16)
        return lp, gr[0]

    lp, dh = run(hid, tok, glp)
    lp2, dh2 = run(hid, tok, glp)
    assert torch.equal(lp, lp2) and torch.equal(dh, dh2)
    for r in (0, 9, 18):
        one_lp, one_dh = run(hid[r:r + 1], tok[r:r + 1], glp[r:r + 1])
        assert torch.equal(one_lp[0], lp[r]) and torch.equal(one_dh[0], dh[r])


def test_path_and_empty(cpu_kernels):
    hid, w, b, tok = _inputs(6, 11, 8, torch.float32, False, pad=(1, 2))
    with pytest.raises(ValueError, match=r"^path: .*'triton'"):
        cl.linear_token_logprobs_forward(hid, w, b, tok, 1.0, -100, False, path="triton")
    with pytest.raises(ValueError, match=r"^path: "):
        cl.linear_token_logprobs_backward(None, None, hid, w, b, tok, torch.zeros(6, 3), 1.0,
                                          -100, path="triton")
    lp, ent, st = cl.linear_token_logprobs_forward(hid[:0], w, b, tok[:0], 1.0, -100, False)
    assert lp.shape == (0,) and st.shape == (0, 3)
    gh, gw, gb = cl.linear_token_logprobs_backward(None, None, hid, w, b, tok, st, 1.0, -100)
    assert not gh.any() and not gw.any() and gb is None


def test_grpo_loss_composes(cpu_kernels, monkeypatch):
    """linear_grpo_loss_forward / backward: the lm_head loops then the policy kernels (the
    reference's here, standing in for the cuda ones)."""
    from rlkernels._policy_options import PolicyOptions
    from rlkernels.reference import policy as ref_policy

    monkeypatch.setattr(cl, "policy_loss_forward", ref_policy.policy_loss_forward)
    monkeypatch.setattr(cl, "policy_loss_backward", ref_policy.policy_loss_backward)
    bsz, tt, v, h = 2, 5, 19, 8
    hid, w, b, tok = _inputs(bsz * tt, v, h, torch.float64, True)
    hid, tok = hid.nan_to_num(0.0), tok.view(bsz, tt)
    old = torch.randn(bsz, tt, dtype=torch.float64) - 3
    adv = torch.randn(bsz, dtype=torch.float64)
    mask = (tok != -100).double()
    o = PolicyOptions(entropy_coef=0.01)
    args = (hid, w, b, tok, old, adv, mask, None, None, None, 1.0, o)
    out = cl.linear_grpo_loss_forward(*args)
    r = ref_linear.linear_grpo_loss_forward(*args)
    torch.testing.assert_close(out[0], r[0], atol=1e-12, rtol=1e-12)
    one = torch.ones((), dtype=torch.float64)
    gr = cl.linear_grpo_loss_backward(one, *args[:10], *out[2:], 1.0, o)
    rg = ref_linear.linear_grpo_loss_backward(one, *args[:10], *r[2:], 1.0, o)
    for got, want in zip(gr, rg):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("normalize", ["full", "support"])
def test_sparse_padded_and_csr(cpu_kernels, normalize):
    """linear_sparse_logprobs on padded ids against the reference, and the CSR support
    (offsets) against the same ids padded: same values at the ids' positions, same grads."""
    n, v, h = 11, 27, 10
    hid, w, b, _ = _inputs(n, v, h, torch.float64, True, pad=(0, 0))
    hid[0] = torch.randn(h, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    counts = torch.tensor([3, 1, 4, 2, 3, 0, 4, 1, 2, 3, 4])
    k = int(counts.max())
    idx = torch.full((n, k), -1, dtype=torch.int64)
    for r, c in enumerate(counts.tolist()):
        idx[r, :c] = torch.randperm(v, generator=g)[:c]
    lp, tail, st = cl.linear_sparse_logprobs_forward(hid, w, b, idx, 0.9, normalize, True,
                                                     chunk_rows=4)
    r_lp, r_tail, r_st = ref_linear.linear_sparse_logprobs_forward(hid, w, b, idx, 0.9,
                                                                   normalize, True)
    torch.testing.assert_close(lp, r_lp, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tail, r_tail, atol=1e-12, rtol=1e-12)
    glp = torch.randn(n, k, dtype=torch.float64, generator=g).masked_fill(idx < 0, 0)
    gt = torch.randn(n, dtype=torch.float64, generator=g)
    gr = cl.linear_sparse_logprobs_backward(glp, gt, hid, w, b, idx, lp, tail, st, 0.9,
                                            normalize, chunk_rows=4)
    rg = ref_linear.linear_sparse_logprobs_backward(glp, gt, hid, w, b, idx, r_lp, r_tail, r_st,
                                                    0.9, normalize)
    for got, want in zip(gr, rg):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    # CSR: the same supports as ids + offsets
    keep = idx >= 0
    ids = idx[keep]
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    c_lp, c_tail, c_st = cl.linear_sparse_logprobs_forward(hid, w, b, ids, 0.9, normalize,
                                                           True, offsets=offsets, chunk_rows=4)
    assert c_lp.shape == ids.shape
    torch.testing.assert_close(c_lp, lp[keep], atol=0, rtol=0)
    torch.testing.assert_close(c_tail, tail, atol=0, rtol=0)
    c_gr = cl.linear_sparse_logprobs_backward(glp[keep], gt, hid, w, b, ids, c_lp, c_tail, c_st,
                                              0.9, normalize, offsets=offsets, chunk_rows=4)
    for got, want in zip(c_gr, gr):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------- the launcher of csrc/linear.cu

def _params(fn):
    sig = fn.__doc__.splitlines()[0]
    inner = sig[sig.index("(") + 1:sig.rindex(") ->")]
    return [p.split(":")[0].strip() for p in re.split(r",\s*(?=\w+:)", inner) if p.strip()]


def test_linear_dz_launcher(monkeypatch):
    """The launcher hands linear_dz the slice's views: pointers with their row strides, the
    chunk's first row, the slice's first column, the dtype codes."""
    from rlkernels.cuda import load_extension

    from _cuda_gpu import cpu_expect

    rc = load_extension()
    if rc is None or not hasattr(rc, "linear_dz"):
        pytest.skip("rlkernels._C not built, or built before csrc/linear.cu")
    calls = []

    class Rec:
        Rows, Matrix = rc.Rows, rc.Matrix

        def linear_dz(self, **kw):
            assert sorted(kw) == sorted(_params(rc.linear_dz))
            calls.append(kw)

    monkeypatch.setattr(cl, "extension", lambda: Rec())
    monkeypatch.setattr(cl, "expect", cpu_expect)
    monkeypatch.setattr(cl, "stream_of", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    y = torch.randn(8, 40)[:, :30]
    dz = torch.empty(8, 40, dtype=torch.bfloat16)[:, :30]
    st = torch.randn(20, 3)
    tok = torch.arange(20)
    dbp = torch.zeros(4, 40)[:1, :30]
    cl._dz_slice(y, torch.randn(20)[4:], None, tok[4:], st[4:], dz, dbp, 6, 64, 0.5, -100)
    kw = calls[-1]
    assert (kw["logits"].ptr, kw["logits"].stride) == (y.data_ptr(), 40)
    assert kw["grad_entropy"].ptr == 0 and kw["tokens"].ptr == tok[4:].data_ptr()
    assert (kw["stats"].stride0, kw["stats"].stride1) == (3, 1)
    assert (kw["dz"].stride, kw["n_rows"], kw["n_live"], kw["cols"], kw["v0"]) == (40, 6, 6,
                                                                                  30, 64)
    assert kw["rows_per_block"] == cl._DZ_BLOCK_ROWS and kw["inv_temperature"] == 2.0
    assert (kw["dtype"], kw["dz_dtype"]) == (rc.CODES["dtype"]["float32"],
                                             rc.CODES["dtype"]["bfloat16"])
    cl._dz_slice(y, None, None, tok, st, dz, None, 0, 0, 1.0, -100)
    assert len(calls) == 1  # nothing live: no launch


# ------------------------------------------ the triton kernels through the same chunk loops

def test_triton_cublas_path_runs_on_the_shared_loops():
    """The triton backend's cuBLAS path runs on rlkernels/_cublas_head.py's loops: with the
    triton vocabulary forward and ``_dz_kernel`` (``FROM_LOGITS``) passed in as the chunk
    kernels (interpreter here), the loops give what rlkernels/triton/linear.py
    ``_cublas_forward`` / ``_cublas_backward`` return: the same bits for the log-probs,
    statistics, d hidden and d weight; d bias of both checked against fp64."""
    pytest.importorskip("triton")
    from rlkernels import _cublas_head as head
    from rlkernels.triton import linear as tlin
    from rlkernels.triton import vocab as tvocab
    from rlkernels.triton._common import split, tl_compute_dtype

    bn, bv = 16, 16  # the triton path's d z tile on CPU

    def triton_dz(y, glp, gh, tok, stats, dz, dbp, n_live, v0, temperature, ignore_index):
        if n_live == 0:
            return
        hi, lo = split(1.0 / temperature)
        cnt = y.shape[1]
        meta = dict(HAS_BIAS=dbp is not None, HAS_GLP=glp is not None,
                    HAS_GH=gh is not None, UPCAST=False, IS_FP64=y.dtype == torch.float64,
                    CDT=tl_compute_dtype(y.dtype), BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=16,
                    GROUP=8, FROM_LOGITS=True, num_warps=4)
        tlin._dz_kernel[(-(-n_live // bn) * -(-cnt // bv),)](
            stats if glp is None else glp, stats if gh is None else gh, y, y.stride(0), y, 0,
            y, tok, stats, stats.stride(0), stats.stride(1), dz, dz.stride(0),
            dz if dbp is None else dbp, 0 if dbp is None else dbp.stride(0), n_live, 0, v0,
            cnt, hi, lo, int(ignore_index), *tlin._map_args(1.0, None)[1], MAP=0, **meta)

    n, v, h = 20, 37, 16
    hid, w, b, tok = _inputs(n, v, h, torch.bfloat16, True)
    fwd = head.token_forward(hid, w, b, tok, 0.8, -100, True, None, 8,
                             vocab_forward=tvocab.token_logprobs_forward)
    own = tlin._cublas_forward(hid, w, b, tok, 0.8, -100, True, None, 8)
    for x, y in zip(fwd, own):
        assert torch.equal(x, y)
    glp = torch.randn(n, generator=torch.Generator().manual_seed(7))
    gr = head.token_backward(glp, glp, hid, w, b, tok, fwd[2], 0.8, -100, None, 8, 16,
                             2 * 16 * 8, dz_kernel=triton_dz, dz_block_rows=bn)
    own = tlin._cublas_backward(glp, glp, hid, w, b, tok, fwd[2], 0.8, -100, None, 8, 16,
                                2 * 16 * 8)
    assert torch.equal(gr[0], own[0]) and torch.equal(gr[1], own[1])
    # d bias against fp64: C = 8 is not a multiple of the d z tile's 16 rows, where the
    # triton path's partials, indexed r0 // 16 before it ran on these loops, overlapped
    # (their partials are per chunk here)
    d = torch.float64
    ref = ref_linear.linear_token_logprobs_backward(
        glp.to(d), glp.to(d), hid.to(d).nan_to_num(0.0), w.to(d), b.to(d), tok,
        fwd[2].to(d), 0.8, -100)[2]
    for got in (gr[2], own[2]):
        torch.testing.assert_close(got.to(d), ref, atol=_tol(got, ref, 2.0 ** -8) * 4, rtol=0)
