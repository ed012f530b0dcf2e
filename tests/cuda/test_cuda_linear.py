"""The cuda backend's fused lm_head (rlkernels/cuda/linear.py: cuBLAS GEMMs, the cuda vocab /
sparse kernels and csrc/linear.cu's ``d z`` of a slice) on a GPU, against the torch backend
in fp64: values within SPEC's 1e-5, gradients within ``(2 + H) eps max|g|`` (the logits are
an fp32 GEMM of H terms), every head precision, bias, ``rows=``, ignore_index rows, several
chunks and vocabulary slices, batch invariance bit for bit, and ``linear_dz`` alone on
peaked / flat / -inf rows, odd widths, misaligned rows and every ``d z`` dtype. GPU-only:
skipped here (the loops run on CPU in tests/cuda/test_cuda_linear_loops.py)."""

import pytest
import torch

import rlkernels as rk
from _cuda_gpu import gpu_cuda
from rlkernels.cuda import linear as cl
from rlkernels.ops import linear as ops_linear
from rlkernels.reference import vocab as ref_vocab

DEV = "cuda"
F64 = torch.float64


def _inputs(n, v, h, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) / h ** 0.5
    w[5] *= 10  # peaked rows
    b = torch.randn(v, generator=g) * 0.5 if bias else None
    tok = torch.randint(0, v, (n,), generator=g)
    tok[[1, n // 2]] = -100
    hid[1] = float("nan")  # a padding row's hidden state is never used
    to = lambda x: None if x is None else x.to(DEV, dtype)  # noqa: E731
    return to(hid), to(w), to(b), tok.to(DEV)


def _leaf(x):
    return None if x is None else x.detach().clone().requires_grad_(True)


def _run(backend, hid, w, b, tok, hp=None, rows=None):
    h, ww, bb = _leaf(hid.nan_to_num(0.0) if backend == "torch" else hid), _leaf(w), _leaf(b)
    if backend == "torch":
        h, ww = _leaf(h.detach().to(F64)), _leaf(w.to(F64))
        bb = _leaf(None if b is None else b.to(F64))
    lp, ent = rk.linear_token_logprobs(h, ww, tok, bias=bb, return_entropy=True,
                                       head_precision=hp if backend != "torch" else None,
                                       rows=rows, backend=backend)
    g = torch.Generator(device=lp.device).manual_seed(1)
    c1 = torch.randn(lp.shape, generator=g, device=lp.device, dtype=lp.dtype)
    c2 = torch.randn(lp.shape, generator=g, device=lp.device, dtype=lp.dtype)
    ((lp * c1).sum() + (ent * c2).sum()).backward()
    return lp, ent, [x.grad for x in (h, ww, bb) if x is not None]


def _eps(dtype, hp):
    if hp == "bf16" or (hp is None and dtype == torch.bfloat16):
        return 2.0 ** -8  # d z (and the operands) rounded to bf16
    if hp == "tf32":
        return 2.0 ** -11
    if dtype in (torch.float16, torch.bfloat16):
        return torch.finfo(dtype).eps  # the gradients' own rounding
    return torch.finfo(torch.float32).eps


@gpu_cuda
@pytest.mark.parametrize("dtype,hp", [(torch.float32, None), (torch.float32, "tf32"),
                                      (torch.float32, "bf16"), (torch.bfloat16, None),
                                      (torch.bfloat16, "fp32"), (torch.float16, None),
                                      (torch.float64, None)])
@pytest.mark.parametrize("bias", [False, True])
def test_token_logprobs_against_fp64(dtype, hp, bias):
    n, v, h = 37, 1031, 64  # odd V: misaligned rows of the logits chunk
    hid, w, b, tok = _inputs(n, v, h, dtype, bias)
    lp, ent, grads = _run("cuda", hid, w, b, tok, hp)
    r_lp, r_ent, r_grads = _run("torch", hid, w, b, tok)
    # the forward's operands: exact but for a bf16 / tf32 head on wider inputs
    vtol = 1e-5 if hp not in ("bf16", "tf32") or dtype == torch.bfloat16 else 3e-2
    torch.testing.assert_close(lp.double(), r_lp, atol=vtol, rtol=vtol)
    torch.testing.assert_close(ent.double(), r_ent, atol=vtol, rtol=vtol)
    assert (lp[1] == 0) and (ent[1] == 0)
    for got, want in zip(grads, r_grads):
        assert got.dtype == dtype and torch.isfinite(got).all()
        tol = (2 + h) * _eps(dtype, hp) * want.abs().max().item() + 1e-7
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
    assert not grads[0][1].any()


@gpu_cuda
def test_rows_and_several_chunks_and_slices():
    n, v, h = 70, 3001, 32
    hid, w, b, tok = _inputs(n, v, h, torch.float32, True, seed=3)
    sel = torch.tensor([0, 2, 3, 17, 40, 41, 69], device=DEV)
    lp, ent, grads = _run("cuda", hid, w, b, tok, rows=sel)
    r_lp, r_ent, r_grads = _run("torch", hid, w, b, tok, rows=sel)
    torch.testing.assert_close(lp.double(), r_lp, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, r_grads):
        tol = (2 + h) * 2 ** -23 * want.abs().max().item() + 1e-7
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)
    # the backend functions with small chunks, slices and d z groups: the same results
    lp1, _, st = cl.linear_token_logprobs_forward(hid, w, b, tok, 0.8, -100, True)
    lp2, _, st2 = cl.linear_token_logprobs_forward(hid, w, b, tok, 0.8, -100, True,
                                                   chunk_rows=16)
    torch.testing.assert_close(lp1, lp2, atol=1e-6, rtol=1e-6)
    glp, gh = torch.randn(n, device=DEV), torch.randn(n, device=DEV)
    one = cl.linear_token_logprobs_backward(glp, gh, hid, w, b, tok, st, 0.8, -100)
    many = cl.linear_token_logprobs_backward(glp, gh, hid, w, b, tok, st, 0.8, -100,
                                             chunk_rows=16, slice_cols=520,
                                             dz_bytes=4 * 520 * 32)
    for x, y in zip(one, many):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


@gpu_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance_bit_exact(dtype):
    n, v, h = 45, 2053, 64
    hid, w, b, tok = _inputs(n, v, h, dtype, True, seed=4)
    glp = torch.randn(n, device=DEV)

    def run(hh, tt, gg):
        lp, _, st = cl.linear_token_logprobs_forward(hh, w, b, tt, 1.0, -100, True,
                                                     chunk_rows=32)
        gr = cl.linear_token_logprobs_backward(gg, gg, hh, w, b, tt, st, 1.0, -100,
                                               chunk_rows=32)
        return lp, gr[0]

    lp, dh = run(hid, tok, glp)
    lp2, dh2 = run(hid, tok, glp)
    assert torch.equal(lp, lp2) and torch.equal(dh, dh2)
    for r in (0, 20, 44):
        one_lp, one_dh = run(hid[r:r + 1], tok[r:r + 1], glp[r:r + 1])
        assert torch.equal(one_lp[0], lp[r]) and torch.equal(one_dh[0], dh[r])


@gpu_cuda
def test_path_triton_is_refused():
    hid, w, b, tok = _inputs(4, 33, 8, torch.float32, False)
    with pytest.raises(ValueError, match=r"^path: "):
        ops_linear._linear_token_logprobs(hid, w, tok, None, 1.0, -100, False, None, "cuda",
                                             None, "triton")


@gpu_cuda
@pytest.mark.parametrize("gif", [False, True])
def test_grpo_loss_against_torch(gif):
    bsz, t, v, h = 3, 9, 1001, 32
    hid, w, b, tok = _inputs(bsz * t, v, h, torch.float32, True, seed=6)
    hid = hid.nan_to_num(0.0).view(bsz, t, h)
    tok = tok.view(bsz, t)
    old = torch.randn(bsz, t, device=DEV) - 7
    adv = torch.randn(bsz, device=DEV)
    mask = (tok != -100).float()
    out = {}
    for backend in ("cuda", "torch"):
        h_, w_, b_ = _leaf(hid), _leaf(w), _leaf(b)
        loss, _ = rk.linear_grpo_loss(h_, w_, tok, old, adv, mask, bias=b_, entropy_coef=0.01,
                                      grad_in_forward=gif and backend == "cuda",
                                      backend=backend)
        (2.5 * loss).backward()
        out[backend] = (loss, h_.grad, w_.grad, b_.grad)
    for got, want in zip(out["cuda"], out["torch"]):
        tol = (2 + h) * 2 ** -23 * want.abs().max().item() + 1e-7
        torch.testing.assert_close(got, want, atol=max(tol, 1e-6), rtol=1e-5)


@gpu_cuda
@pytest.mark.parametrize("normalize", ["full", "support"])
def test_sparse_against_torch(normalize):
    n, v, h, k = 21, 1537, 32, 5
    hid, w, b, _ = _inputs(n, v, h, torch.float32, True, seed=7)
    hid = hid.nan_to_num(0.0)
    idx = torch.randint(0, v, (n, k), device=DEV)
    idx[3, 2:] = -1
    res = {}
    for backend in ("cuda", "torch"):
        h_, w_, b_ = _leaf(hid), _leaf(w), _leaf(b)
        lp, tail = rk.linear_sparse_logprobs(h_, w_, idx, bias=b_, normalize=normalize,
                                             return_tail=True, temperature=0.9,
                                             backend=backend)
        c = torch.randn(lp.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(2))
        (torch.where(idx >= 0, lp, 0.0) * c).sum().add(tail.sum()).backward()
        res[backend] = (lp, tail, h_.grad, w_.grad, b_.grad)
    for got, want in zip(res["cuda"], res["torch"]):
        tol = (2 + h) * 2 ** -23 * want.nan_to_num(0.0, neginf=0.0).abs().max().item() + 1e-6
        torch.testing.assert_close(got, want, atol=tol, rtol=1e-5)


# ---------------------------------------------------------------- csrc/linear.cu on its own

def _dz_reference(y, glp, gh, tok, stats, v0, t):
    """d z of the slice from the fp64 reference backward on the slice's columns (a token
    outside the slice: no one-hot term)."""
    cnt = y.shape[1]
    valid = tok != -100
    inside = (tok >= v0) & (tok < v0 + cnt)
    local = torch.where(valid, torch.where(inside, tok - v0, cnt), -100)
    return ref_vocab.token_logprobs_backward(
        None if glp is None else glp.to(F64), None if gh is None else gh.to(F64), y.to(F64),
        local, stats.to(F64), t, -100)


@gpu_cuda
@pytest.mark.parametrize("cdt,dzt", [(torch.float32, torch.bfloat16),
                                     (torch.float32, torch.float32),
                                     (torch.float64, torch.float64),
                                     (torch.float64, torch.float32),
                                     (torch.float64, torch.bfloat16)])
@pytest.mark.parametrize("width,v0", [(1024, 0), (1021, 8192), (7, 3)])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("pad", [0, 3])
def test_linear_dz_kernel(cdt, dzt, width, v0, entropy, pad):
    n, vocab, t = 70, 9300, 0.7
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(n, vocab, generator=g, dtype=F64) * 3
    logits[0, 9] = 60.0                 # peaked (the token: expm1 branch)
    logits[2] = 0.0                     # flat
    logits[3, ::7] = float("-inf")      # -inf columns
    tok = torch.randint(0, vocab, (n,), generator=g)
    tok[0], tok[4], tok[5] = 9, -100, v0 + 1
    logits[4] = float("nan")            # a padding row: never read into d z
    _, _, stats = ref_vocab.token_logprobs_forward(logits.nan_to_num(0.0), tok, t, -100, True)
    glp = torch.randn(n, generator=g, dtype=F64)
    gh = torch.randn(n, generator=g, dtype=F64) if entropy else None
    glp[6] = 0.0
    if gh is not None:
        gh[6] = 0.0
    logits[6, v0] = float("nan")        # zero gradients: exact zeros despite the NaN
    dev = lambda x: None if x is None else x.to(DEV)  # noqa: E731
    # pad 0: 16-byte aligned rows where the width allows (the vector loop); 3: misaligned
    y = torch.empty(n, width + pad, dtype=cdt, device=DEV)[:, :width]
    y.copy_(logits[:, v0:v0 + width])
    dz = torch.full((n, width + pad), 7.0, dtype=dzt, device=DEV)[:, :width]
    dbp = torch.full((3, width), 7.0, dtype=cdt, device=DEV)
    st = dev(stats).to(cdt)
    glp_d, gh_d = dev(glp).to(cdt), None if gh is None else dev(gh).to(cdt)
    n_live = 66
    cl._dz_slice(y, glp_d, gh_d, dev(tok), st, dz, dbp, n_live, v0, t, -100)
    # the reference on the kernel's own inputs (logits, stats and gradients in cdt)
    want = _dz_reference(y[:n_live].cpu(), glp_d[:n_live].cpu(),
                         None if gh is None else gh_d[:n_live].cpu(), tok[:n_live],
                         st[:n_live].cpu(), v0, t)
    want[6] = 0.0  # zero gradients: the kernel's exact zeros (the reference: 0 * NaN)
    got = dz[:n_live].double().cpu()
    eps = 2.0 ** -8 if dzt == torch.bfloat16 else torch.finfo(dzt).eps * 4
    tol = 2 * eps * want.abs().max().item() + 1e-7
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert not got[4].any() and not got[6].any()
    assert (dz[n_live:] == 7.0).all()  # rows past n_live: not written
    bs = cl._DZ_BLOCK_ROWS
    for blk in range(3):
        part = want[blk * bs:(blk + 1) * bs].sum(0)
        torch.testing.assert_close(dbp[blk].double().cpu(), part,
                                   atol=2 * eps * bs * want.abs().max().item() + 1e-6, rtol=0)


@gpu_cuda
def test_sparse_csr_against_torch():
    """A CSR support (vLLM's ids + offsets) through the cuda lm_head: the chunks pass offsets
    views with absolute positions to the cuda sparse kernels."""
    n, v, h = 19, 1031, 32
    hid, w, b, _ = _inputs(n, v, h, torch.float32, True, seed=8)
    hid = hid.nan_to_num(0.0)
    g = torch.Generator().manual_seed(9)
    counts = torch.randint(0, 6, (n,), generator=g)
    ids = torch.cat([torch.randperm(v, generator=g)[:c] for c in counts.tolist()]).to(DEV)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(DEV)
    res = {}
    for backend in ("cuda", "torch"):
        h_, w_, b_ = _leaf(hid), _leaf(w), _leaf(b)
        lp, tail = rk.linear_sparse_logprobs(h_, w_, ids, offsets=offsets, bias=b_,
                                             return_tail=True, backend=backend)
        c = torch.randn(lp.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(3))
        ((lp * c).sum() + tail.sum()).backward()
        res[backend] = (lp, tail, h_.grad, w_.grad, b_.grad)
    for got, want in zip(res["cuda"], res["torch"]):
        tol = (2 + h) * 2 ** -23 * want.abs().max().item() + 1e-6
        torch.testing.assert_close(got, want, atol=tol, rtol=1e-5)
