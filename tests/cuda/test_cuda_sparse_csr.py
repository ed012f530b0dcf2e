"""CSR supports in the cuda sparse kernels (csrc/sparse.cu ``kCsr``; issue 21) on a GPU:
``offsets [N + 1]`` with flat ids ``[nnz]`` against the fp64 torch reference with the same
``offsets``, and against the padded cuda call on the same supports (bit for bit: the same
kernels but for where a row's slots are read and written). Rows of every length (0 too),
-1 slots, duplicates, ids >= V not reached (debug checks are the ops' job), odd V, int32
offsets, a view ``offsets[r0:r0 + n + 1]`` of a larger CSR (absolute positions, other rows'
positions untouched), V above one bitmap segment (kSeg with kCsr). GPU-only: skipped here
(the launchers' CPU half: tests/cuda/test_cuda_sparse_launch.py)."""

import pytest
import torch

from _cuda_gpu import gpu_cuda
from rlkernels.reference import sparse as ref

NEG_INF = float("-inf")


def _support(n, vocab, device, seed=3):
    """``(x [n, vocab] fp64, offsets int64 [n + 1], ids [nnz], padded [n, K_max])``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    lens = torch.randint(0, 9, (n,), generator=g)
    lens[1] = 0                                   # an empty row
    lens[2] = 12                                  # the longest row
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)])
    nnz = int(offsets[-1])
    ids = torch.randint(0, vocab, (nnz,), generator=g)
    ids[offsets[0]] = -1 if lens[0] > 0 else 0    # an unused slot
    a = int(offsets[2])
    ids[a:a + 3] = ids[a]                         # duplicates
    ids[a + 3] = vocab - 1                        # the last column
    x[3, :] = -40.0                               # ids holding ~all the mass
    pad = torch.full((n, int(lens.max())), -1, dtype=torch.int64)
    for r in range(n):
        pad[r, :lens[r]] = ids[offsets[r]:offsets[r + 1]]
    x[4, ids[offsets[4]:offsets[5]].clamp_min(0)] = 9.0  # a peak on ids
    return x.to(device), offsets.to(device), ids.to(device), pad.to(device)


def _scatter_pad(values, offsets, k):
    """``[nnz]`` -> ``[n, k]`` padded with -inf (for the comparison with the padded call)."""
    n = offsets.shape[0] - 1
    out = torch.full((n, k), NEG_INF, dtype=values.dtype, device=values.device)
    for r in range(n):
        a, b = int(offsets[r]), int(offsets[r + 1])
        out[r, :b - a] = values[a:b]
    return out


def _close(out, expect, what):
    torch.testing.assert_close(out.double().cpu(), expect.double().cpu(), atol=1e-5, rtol=1e-5,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _grad_close(out, expect, dtype, what):
    eps = torch.finfo(dtype).eps
    tol = 2 * eps * expect.abs().max().item() + 1e-7
    torch.testing.assert_close(out.double().cpu(), expect.double().cpu(), atol=tol, rtol=0,
                               msg=lambda m: f"{what}: {m}")


@gpu_cuda
@pytest.mark.parametrize("vocab", [1031, 151936, 2 * 262144 + 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_csr_logprobs(dtype, vocab):
    from rlkernels.cuda import sparse as cs
    n = 7
    x64, offsets, ids, pad = _support(n, vocab, "cuda")
    x = x64.to(dtype)
    xr = x.double()
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    for temperature in (1.0, 0.7):
        for normalize in ("full", "support"):
            for with_tail in (False, True):
                what = f"{dtype} V={vocab} T={temperature} {normalize} tail={with_tail}"
                lp, tail, stats = cs.sparse_logprobs_forward(x, ids, temperature, normalize,
                                                             with_tail, offsets)
                assert lp.shape == ids.shape, what
                lp_r, tail_r, stats_r = ref.sparse_logprobs_forward(
                    xr, ids, temperature, normalize, with_tail, offsets)
                _close(lp, lp_r, f"{what} logp")
                _close(tail, tail_r, f"{what} tail")
                _close(stats[:, :2], stats_r[:, :2], f"{what} stats")
                # the padded call on the same supports: the same bits
                lp_p, tail_p, stats_p = cs.sparse_logprobs_forward(x, pad, temperature,
                                                                   normalize, with_tail)
                assert torch.equal(_scatter_pad(lp, offsets, pad.shape[1]), lp_p), what
                assert torch.equal(tail, tail_p) and torch.equal(stats, stats_p), what
                g = torch.randn(ids.shape, dtype=cdt, device="cuda")
                g_t = torch.randn(n, dtype=cdt, device="cuda") if with_tail else None
                grad = cs.sparse_logprobs_backward(g, g_t, x, ids, lp, tail, stats,
                                                   temperature, normalize, offsets)
                grad_r = ref.sparse_logprobs_backward(g.double(), None if g_t is None else
                                                      g_t.double(), xr, ids, lp_r, tail_r,
                                                      stats_r, temperature, normalize, offsets)
                _grad_close(grad, grad_r, dtype, f"{what} grad")
                g_pad = _scatter_pad(g, offsets, pad.shape[1]).nan_to_num(neginf=0.0)
                grad_p = cs.sparse_logprobs_backward(g_pad, g_t, x, pad, lp_p, tail_p, stats_p,
                                                     temperature, normalize)
                assert torch.equal(grad, grad_p), f"{what} grad vs padded"


@gpu_cuda
@pytest.mark.parametrize("vocab", [1031, 2 * 262144 + 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_csr_kl(dtype, vocab):
    from rlkernels.cuda import sparse as cs
    n = 7
    x64, offsets, ids, pad = _support(n, vocab, "cuda", seed=4)
    x = x64.to(dtype)
    xr = x.double()
    target = torch.randn(ids.shape, dtype=torch.float64, device="cuda") - 3.0
    for with_tail in (False, True):
        what = f"{dtype} V={vocab} tail={with_tail}"
        kl, s_tail, stats = cs.sparse_kl_forward(x, ids, target.float(), 0.8, with_tail,
                                                 offsets)
        kl_r, s_tail_r, stats_r = ref.sparse_kl_forward(xr, ids, target, 0.8, with_tail,
                                                        offsets)
        _close(kl, kl_r, f"{what} kl")
        _close(s_tail, s_tail_r, f"{what} tail")
        t_pad = _scatter_pad(target.float(), offsets, pad.shape[1])
        kl_p, s_tail_p, stats_p = cs.sparse_kl_forward(x, pad, t_pad, 0.8, with_tail)
        assert torch.equal(kl, kl_p) and torch.equal(s_tail, s_tail_p), what
        g = torch.randn(n, dtype=torch.float32, device="cuda")
        grad = cs.sparse_kl_backward(g, x, ids, target.float(), s_tail, stats, 0.8, with_tail,
                                     offsets)
        grad_r = ref.sparse_kl_backward(g.double(), xr, ids, target, s_tail_r, stats_r, 0.8,
                                        with_tail, offsets)
        _grad_close(grad, grad_r, dtype, f"{what} grad")
        grad_p = cs.sparse_kl_backward(g, x, pad, t_pad, s_tail_p, stats_p, 0.8, with_tail)
        assert torch.equal(grad, grad_p), f"{what} grad vs padded"


@gpu_cuda
def test_csr_view_and_int32():
    """A view ``offsets[r0:r0 + m + 1]`` with the rows ``x[r0:r0 + m]``: those rows'
    positions equal the whole call's, the others keep -inf (forward) and the backward reads
    only its rows' slots; int32 offsets / ids give the same bits."""
    from rlkernels.cuda import sparse as cs
    n, vocab = 7, 1031
    x64, offsets, ids, _ = _support(n, vocab, "cuda", seed=5)
    x = x64.float()
    lp, tail, stats = cs.sparse_logprobs_forward(x, ids, 1.0, "full", True, offsets)
    r0, m = 2, 3
    view = offsets[r0:r0 + m + 1]
    lp_v, tail_v, stats_v = cs.sparse_logprobs_forward(x[r0:r0 + m], ids, 1.0, "full", True,
                                                       view)
    a, b = int(view[0]), int(view[-1])
    assert torch.equal(lp_v[a:b], lp[a:b])
    assert torch.isneginf(lp_v[:a]).all() and torch.isneginf(lp_v[b:]).all()
    assert torch.equal(tail_v, tail[r0:r0 + m]) and torch.equal(stats_v, stats[r0:r0 + m])
    g = torch.randn(ids.shape, device="cuda")
    g_t = torch.randn(n, device="cuda")
    grad = cs.sparse_logprobs_backward(g, g_t, x, ids, lp, tail, stats, 1.0, "full", offsets)
    g_out = g.clone()
    g_out[:a] = float("nan")  # other rows' slots: never read
    g_out[b:] = float("nan")
    grad_v = cs.sparse_logprobs_backward(g_out, g_t[r0:r0 + m], x[r0:r0 + m], ids, lp, tail_v,
                                         stats_v, 1.0, "full", view)
    assert torch.equal(grad_v, grad[r0:r0 + m])
    lp32, _, _ = cs.sparse_logprobs_forward(x, ids.int(), 1.0, "full", True, offsets.int())
    assert torch.equal(lp32, lp)
