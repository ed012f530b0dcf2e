"""The cuda sparse forward with the tail (csrc/sparse.cu, ``sparse_fwd_kernel`` kTail) against
the fp64 reference on a GPU, row by row through the branches of its one-pass outside state
``so``: the row max outside the ids (so tracks st), the max on an id with the outside within
2^64 ("near": chunk sums times conv), far below it (so against its own maximum: the rows
that took a second pass before), an outside column tied with an id max, ids holding ~all or
~no mass (tail ~1e-30), -inf columns (an id on one), duplicate and -1 slots, a row of only
-1, odd V, T != 1, and V above one bitmap segment (kSeg: one launch per segment, the row
state carried between them; three segments with each merge case). GPU-only: skipped here."""

import pytest
import torch

from _cuda_gpu import gpu_cuda
from rlkernels.reference import sparse as ref

NEG_INF = float("-inf")


def _rows(vocab, dtype, device):
    """``(x [R, vocab], idx [R, 4])``, one row per branch (module docstring)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(11, vocab, generator=g, dtype=torch.float64)
    idx = torch.full((11, 4), -1, dtype=torch.int64)
    a, b, c = 3, vocab // 2, vocab - 2
    x[0, a] = 12.0                             # max outside the ids: tracking
    idx[0, :2] = torch.tensor([b, c])
    x[1, b] = 20.0                             # max on an id, outside ~20 below: near
    idx[1, :2] = torch.tensor([b, a])
    x[2, b] = 120.0                            # outside > 64 log2 below the id max: far
    idx[2, 0] = b
    x[3, b], x[3, c] = 15.0, 15.0              # an outside column tied with the id max
    idx[3, 0] = b
    x[4, :] = -70.0                            # ids hold all but ~1e-28
    x[4, [a, b, c]] = 0.0
    idx[4, :3] = torch.tensor([a, b, c])
    x[5, [a, b]] = -30.0                       # ids hold ~no mass
    idx[5, :2] = torch.tensor([a, b])
    x[6, ::5] = NEG_INF                        # -inf columns, an id on one
    idx[6, :3] = torch.tensor([0, 5 * (b // 5), c])  # two ids on -inf columns
    idx[7] = torch.tensor([b, b, -1, a])       # duplicates and an unused slot
    x[8, b] = 40.0                             # peak on an id, the rest far below, T < 1
    idx[8, :2] = torch.tensor([b, c])
    # row 9: every slot unused; row 10: a flat row
    x[10] = 0.0
    idx[10, :2] = torch.tensor([a, c])
    return x.to(dtype).to(device), idx.to(device)


def _close(out, expect, what):
    torch.testing.assert_close(out.double().cpu(), expect.double().cpu(), atol=1e-5, rtol=1e-5,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


@gpu_cuda
@pytest.mark.parametrize("vocab", [1031, 151936, 300007])  # odd; Qwen; above one segment
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_forward_tail_branches(dtype, vocab):
    from rlkernels.cuda import sparse as cs
    x, idx = _rows(vocab, dtype, "cuda")
    x64 = x.double()
    for temperature in (1.0, 0.7):
        for normalize in ("full", "support"):
            lp, tail, stats = cs.sparse_logprobs_forward(x, idx, temperature, normalize, True)
            lp_r, tail_r, stats_r = ref.sparse_logprobs_forward(x64, idx, temperature,
                                                                normalize, True)
            what = f"{dtype} V={vocab} T={temperature} {normalize}"
            _close(lp, lp_r, f"{what} logp")
            _close(tail, tail_r, f"{what} tail")
            _close(stats[:, :2], stats_r[:, :2], f"{what} stats")
            fin = torch.isfinite(tail_r.cpu())
            assert torch.isfinite(tail.cpu()[fin]).all(), what
        target = torch.log_softmax(torch.randn(idx.shape, dtype=torch.float64), -1).float()
        target = target.to("cuda")
        kl, s_tail, _ = cs.sparse_kl_forward(x, idx, target, temperature, True)
        kl_r, s_tail_r, _ = ref.sparse_kl_forward(x64, idx, target.double(), temperature, True)
        _close(kl, kl_r, f"{dtype} V={vocab} T={temperature} kl")
        _close(s_tail, s_tail_r, f"{dtype} V={vocab} T={temperature} kl tail")


SEG = 32 * 8192  # csrc/sparse.cu kSparseSegCols: one launch per segment above it


def _segment_rows(vocab, dtype, device):
    """``(x [R, vocab], idx [R, 5])``, V over three segments: the row state carried between
    the launches (csrc/sparse.cu SparseCarry) meets each merge case."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, vocab, generator=g, dtype=torch.float64)
    idx = torch.full((9, 5), -1, dtype=torch.int64)
    s1, s2 = SEG, 2 * SEG
    x[0, s2 + 5] = 30.0                        # the row max outside, in the last segment
    idx[0, :3] = torch.tensor([7, s1 + 3, s2 + 9])
    x[1, s1 + 1] = 120.0                       # an id max in the middle, the rest far below
    idx[1, :2] = torch.tensor([s1 + 1, 4])
    x[2, :s1] = NEG_INF                        # a first segment of -inf only (its n merges)
    idx[2, :3] = torch.tensor([0, s1, s2])
    x[3, :s2] = NEG_INF                        # only the last segment finite
    idx[3, :2] = torch.tensor([s2 + 1, 3])
    x[4, [s1 - 1, s1, s2 - 1, s2]] = 25.0      # ids on the segment edges, tied maxima
    idx[4, :4] = torch.tensor([s1 - 1, s1, s2 - 1, s2])
    x[5, [11, s1 + 11, s2 + 11]] = 14.0        # tied maxima in three segments, one an id
    idx[5, 0] = s1 + 11
    idx[6] = torch.tensor([s2 + 2, 5, s2 + 2, -1, s1 + 8])  # duplicates across launches
    x[7, :] = -70.0                            # ids in every segment hold all but ~1e-28
    x[7, [2, s1 + 2, s2 + 2]] = 0.0
    idx[7, :3] = torch.tensor([2, s1 + 2, s2 + 2])
    # row 8: every slot unused
    return x.to(dtype).to(device), idx.to(device)


@gpu_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_sparse_forward_tail_segments(dtype):
    """V = 2 * 262144 + 37 (three launches, kSeg) against the fp64 reference; the same bits
    twice."""
    from rlkernels.cuda import sparse as cs
    vocab = 2 * SEG + 37
    x, idx = _segment_rows(vocab, dtype, "cuda")
    x64 = x.double()
    for temperature in (1.0, 0.7):
        for normalize in ("full", "support"):
            lp, tail, stats = cs.sparse_logprobs_forward(x, idx, temperature, normalize, True)
            lp_r, tail_r, stats_r = ref.sparse_logprobs_forward(x64, idx, temperature,
                                                                normalize, True)
            what = f"{dtype} T={temperature} {normalize}"
            _close(lp, lp_r, f"{what} logp")
            _close(tail, tail_r, f"{what} tail")
            _close(stats[:, :2], stats_r[:, :2], f"{what} stats")
        target = torch.log_softmax(torch.randn(idx.shape, dtype=torch.float64), -1)
        target = target.to(x.dtype if dtype == torch.float64 else torch.float32).to("cuda")
        kl, s_tail, _ = cs.sparse_kl_forward(x, idx, target, temperature, True)
        kl_r, s_tail_r, _ = ref.sparse_kl_forward(x64, idx, target.double(), temperature, True)
        _close(kl, kl_r, f"{dtype} T={temperature} kl")
        _close(s_tail, s_tail_r, f"{dtype} T={temperature} kl tail")
    # deterministic: the same bits twice
    a = cs.sparse_logprobs_forward(x, idx, 1.0, "full", True)
    b = cs.sparse_logprobs_forward(x, idx, 1.0, "full", True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
