"""Tests of the advantage ops (SPEC 3.2): group_advantages, masked_whiten, gae,
discounted_returns.

Every expected value comes from a naive formula written here with Python loops in fp64 (or
numpy), never from the reference backend. Rewards are drawn on a grid of multiples of 1/8 or
1/64: they are exact in every dtype we test, so fp32 results differ from the fp64 formulas only
by fp32 accumulation (checked at atol=rtol=1e-5, SPEC section 5).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlkernels import _checks
from rlkernels.ops.advantage import discounted_returns, gae, group_advantages, masked_whiten

METHODS = ("grpo", "dr_grpo", "rloo", "batch_std")
# The backends implementing group_advantages. tests/conftest.py will provide a `backend`
# fixture over every available backend; until then the torch reference is the only one.
BACKENDS = ["torch"]
TOL = dict(atol=1e-5, rtol=1e-5)


# ============================================================================ naive formulas

def naive_group_advantages(rewards, ids, method, eps=1e-6, unbiased=True):
    """fp64 advantages with Python loops: one group at a time, straight from SPEC 3.2."""
    r = [float(x) for x in rewards]
    ids = [int(i) for i in ids]
    members = {}
    for i, g in enumerate(ids):
        members.setdefault(g, []).append(i)

    def std(xs):
        n = len(xs)
        mu = sum(xs) / n
        return math.sqrt(sum((x - mu) ** 2 for x in xs) / ((n - 1) if unbiased else n))

    batch_std = std(r) if len(r) > 1 else 0.0
    out = [0.0] * len(r)
    for idx in members.values():
        xs = [r[i] for i in idx]
        n = len(xs)
        if n == 1:
            out[idx[0]] = xs[0] - xs[0]  # 0, or NaN for a NaN reward
            continue
        mu = sum(xs) / n
        for i in idx:
            if method == "grpo":
                out[i] = (r[i] - mu) / (std(xs) + eps)
            elif method == "dr_grpo":
                out[i] = r[i] - mu
            elif method == "rloo":
                out[i] = r[i] - (sum(xs) - r[i]) / (n - 1)
            else:
                out[i] = (r[i] - mu) / (batch_std + eps)
    return torch.tensor(out, dtype=torch.float64)


def naive_gae(rewards, values, mask, gamma, lam):
    """Per sequence, walk back over the valid positions only (masked ones are transparent)."""
    batch, steps = rewards.shape
    adv = torch.zeros(batch, steps, dtype=torch.float64)
    ret = torch.zeros(batch, steps, dtype=torch.float64)
    for b in range(batch):
        next_value, last = 0.0, 0.0
        for t in reversed(range(steps)):
            if not mask[b, t]:
                continue
            r, v = float(rewards[b, t]), float(values[b, t])
            last = r + gamma * next_value - v + gamma * lam * last
            next_value = v
            adv[b, t] = last
            ret[b, t] = last + v
    return adv, ret


def naive_returns(rewards, mask, gamma):
    batch, steps = rewards.shape
    out = torch.zeros(batch, steps, dtype=torch.float64)
    for b in range(batch):
        g = 0.0
        for t in reversed(range(steps)):
            if mask[b, t]:
                g = float(rewards[b, t]) + gamma * g
                out[b, t] = g
    return out


def grid_rewards(n, *, seed=0, denom=64, dtype=torch.float32):
    """Rewards exactly representable in bf16/fp16/fp32: multiples of 1/denom in [-4, 4]."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(-4 * denom, 4 * denom + 1, (n,), generator=gen) / denom).to(dtype)


def contiguous_ids(batch, group_size):
    return torch.arange(batch) // group_size


def mixed_ids(seed=0):
    """Groups of sizes 1, 2, 3, 5, 8, 1 under arbitrary (negative, large, unsorted) ids,
    shuffled: the layout of a stratified or deduplicated batch."""
    ids = [-7] + [3] * 2 + [1000] * 3 + [-2] * 5 + [42] * 8 + [0]
    random.Random(seed).shuffle(ids)
    return torch.tensor(ids, dtype=torch.int64)


def _nan_equal(a, b):
    return torch.equal(torch.isnan(a), torch.isnan(b))


# ========================================================================= group_advantages

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_advantages_contiguous_matches_naive(backend, method, unbiased, dtype):
    # 6 groups of 4 (prompts x completions); group 2 has identical rewards (std 0).
    rewards = grid_rewards(24, seed=1, dtype=dtype)
    rewards[8:12] = 0.5
    out = group_advantages(rewards, group_size=4, method=method, unbiased=unbiased,
                           backend=backend)
    assert out.dtype == dtype and out.shape == (24,)
    ref = naive_group_advantages(rewards, contiguous_ids(24, 4), method, unbiased=unbiased)
    tol = TOL if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.double(), ref, **tol)
    assert torch.equal(out[8:12], torch.zeros(4, dtype=dtype))  # std 0 -> 0 / (0 + eps) = 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_group_advantages_index_matches_naive(backend, method, unbiased, index_dtype):
    ids = mixed_ids(seed=3).to(index_dtype)
    rewards = grid_rewards(ids.numel(), seed=4)
    out = group_advantages(rewards, group_index=ids, method=method, unbiased=unbiased,
                           backend=backend)
    ref = naive_group_advantages(rewards, ids, method, unbiased=unbiased)
    torch.testing.assert_close(out.double(), ref, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_group_advantages_eps_and_zero_eps(backend, method):
    # eps enters the denominators of grpo / batch_std only; eps=0 is allowed.
    rewards = grid_rewards(12, seed=5, dtype=torch.float64)
    for eps in (0.0, 0.3):
        out = group_advantages(rewards, group_size=3, method=method, eps=eps, backend=backend)
        ref = naive_group_advantages(rewards, contiguous_ids(12, 3), method, eps=eps)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_singleton_groups_are_exactly_zero(backend, method):
    rewards = grid_rewards(5, seed=6)
    for kwargs in (dict(group_size=1), dict(group_index=torch.tensor([9, -1, 4, 2, 7]))):
        out = group_advantages(rewards, method=method, backend=backend, **kwargs)
        assert torch.equal(out, torch.zeros(5))
    # B == 1: batch_std has no batch spread either
    out = group_advantages(rewards[:1], group_size=1, method=method, backend=backend)
    assert torch.equal(out, torch.zeros(1))
    # singletons mixed with larger groups
    ids = mixed_ids(seed=7)
    out = group_advantages(grid_rewards(ids.numel(), seed=8), group_index=ids, method=method,
                           backend=backend)
    single = (ids == -7) | (ids == 0)
    assert torch.equal(out[single], torch.zeros(2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_identical_rewards_give_zero(backend, method):
    # binary rewards where a whole group succeeded or failed: no learning signal, exactly 0
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    out = group_advantages(rewards, group_size=4, method=method, backend=backend)
    assert torch.equal(out[:8], torch.zeros(8))
    assert (out[8:] != 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_nan_propagates_to_its_group_only(backend, method):
    rewards = grid_rewards(12, seed=9)
    rewards[5] = float("nan")  # group 1 of the contiguous layout [4:8]
    ids = torch.tensor([2, 2, 2, 2, 5, 5, 5, 5, -1, -1, -1, -1])
    ref = naive_group_advantages(rewards, ids, method)
    for kwargs in (dict(group_size=4), dict(group_index=ids)):
        out = group_advantages(rewards, method=method, backend=backend, **kwargs)
        if method == "batch_std":
            assert torch.isnan(out).all()  # the shared batch std is NaN
        else:
            assert torch.isnan(out[4:8]).all()
            assert not torch.isnan(out[:4]).any() and not torch.isnan(out[8:]).any()
        assert _nan_equal(out.double(), ref)
        torch.testing.assert_close(out.double(), ref, equal_nan=True, **TOL)
    # a NaN in a singleton group is NaN (r - r), not a silent 0
    out = group_advantages(torch.tensor([1.0, float("nan")]), group_size=1, method=method,
                           backend=backend)
    assert out[0] == 0 and torch.isnan(out[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_empty_batch(backend, method):
    for dtype, out_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.float64, torch.float64)):
        rewards = torch.empty(0, dtype=dtype)
        for kwargs in (dict(group_size=4), dict(group_index=torch.empty(0, dtype=torch.int64))):
            out = group_advantages(rewards, method=method, backend=backend, **kwargs)
            assert out.shape == (0,) and out.dtype == out_dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_fp32(backend, dtype):
    # multiples of 1/8 in [-4, 4] are exact in bf16 and fp16
    rewards = grid_rewards(16, seed=10, denom=8, dtype=dtype)
    out = group_advantages(rewards, group_size=4, backend=backend)
    assert out.dtype == torch.float32
    assert torch.equal(out, group_advantages(rewards.float(), group_size=4, backend=backend))
    ref = naive_group_advantages(rewards, contiguous_ids(16, 4), "grpo")
    torch.testing.assert_close(out.double(), ref, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_contiguous_and_index_paths_agree(backend, method):
    rewards = grid_rewards(64, seed=11)  # 8 groups of 8
    contiguous = group_advantages(rewards, group_size=8, method=method, backend=backend)
    ids = contiguous_ids(64, 8)
    # same grouping, same member order: bit-identical, whatever the id values
    for relabel in (ids, ids.to(torch.int32), 1000 - 37 * ids, ids - 4):
        out = group_advantages(rewards, group_index=relabel, method=method, backend=backend)
        assert torch.equal(out, contiguous)
    # rows permuted together with their ids: the same advantages, permuted
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(12))
    out = group_advantages(rewards[perm], group_index=ids[perm], method=method,
                           backend=backend)
    torch.testing.assert_close(out, contiguous[perm], atol=1e-6, rtol=1e-6)
    # binary rewards sum exactly in any order: then even permuted results are bit-identical
    binary = (rewards > 0).float()
    ref = group_advantages(binary, group_size=8, method=method, backend=backend)
    out = group_advantages(binary[perm], group_index=ids[perm], method=method, backend=backend)
    assert torch.equal(out, ref[perm])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_batch_invariance(backend, method):
    # a group's advantages do not depend on the other groups of the call
    group = grid_rewards(8, seed=13)
    alone = group_advantages(group, group_size=8, method=method, backend=backend)
    others = grid_rewards(40, seed=14)
    batch = torch.cat([group, others])
    out = group_advantages(batch, group_size=8, method=method, backend=backend)
    assert torch.equal(out[:8], alone)
    # index path: the group's members interleaved (in their order) with 5 other groups
    slots = torch.randperm(48, generator=torch.Generator().manual_seed(15))[:8].sort().values
    others_at = torch.ones(48, dtype=torch.bool)
    others_at[slots] = False
    mixed = torch.empty(48)
    mixed[slots], mixed[others_at] = group, others
    ids = torch.arange(48) % 5 - 2
    ids[slots] = 3
    out = group_advantages(mixed, group_index=ids, method=method, backend=backend)
    assert torch.equal(out[slots], alone)
    alone_idx = group_advantages(group, group_index=torch.full((8,), 3), method=method,
                                 backend=backend)
    assert torch.equal(alone_idx, alone)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_deterministic(backend, method):
    # a realistic batch: 512 prompts x 16 completions, grouped by shuffled prompt ids
    rewards = torch.randn(8192, generator=torch.Generator().manual_seed(16))
    ids = torch.arange(8192) // 16
    ids = ids[torch.randperm(8192, generator=torch.Generator().manual_seed(17))]
    a = group_advantages(rewards, group_index=ids, method=method, backend=backend)
    b = group_advantages(rewards, group_index=ids, method=method, backend=backend)
    assert torch.equal(a, b)
    c = group_advantages(rewards, group_size=16, method=method, backend=backend)
    d = group_advantages(rewards, group_size=16, method=method, backend=backend)
    assert torch.equal(c, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_differentiable(backend):
    rewards = torch.randn(8, requires_grad=True)
    out = group_advantages(rewards, group_size=4, backend=backend)
    assert not out.requires_grad


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(groups=st.integers(1, 8), size=st.integers(1, 8), method=st.sampled_from(METHODS),
       unbiased=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_group_advantages_random(groups, size, method, unbiased, seed, data):
    """Random layouts: contiguous path == index path (bit-identical) == naive fp64 formulas,
    and an arbitrary index grouping (random ids, random group sizes) against the naive."""
    batch = groups * size
    rewards = grid_rewards(batch, seed=seed, denom=8)
    ids = contiguous_ids(batch, size)
    contiguous = group_advantages(rewards, group_size=size, method=method, unbiased=unbiased,
                                  backend="torch")
    indexed = group_advantages(rewards, group_index=ids * 3 - 5, method=method,
                               unbiased=unbiased, backend="torch")
    assert torch.equal(contiguous, indexed)
    ref = naive_group_advantages(rewards, ids, method, unbiased=unbiased)
    torch.testing.assert_close(contiguous.double(), ref, **TOL)

    free_ids = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=batch,
                                               max_size=batch)), dtype=torch.int64)
    out = group_advantages(rewards, group_index=free_ids, method=method, unbiased=unbiased,
                           backend="torch")
    ref = naive_group_advantages(rewards, free_ids, method, unbiased=unbiased)
    torch.testing.assert_close(out.double(), ref, **TOL)


# ------------------------------------------------------------------- torch integration

def test_opcheck():
    op = torch.ops.rlkernels.group_advantages.default
    rewards = grid_rewards(12, seed=18)
    ids = torch.tensor([4, 4, -1, 0, 4, 0, 0, 9, -1, -1, 4, 0])
    samples = [
        (rewards, None, 4, "grpo", 1e-6, True),
        (rewards, None, 3, "rloo", 1e-6, False),
        (rewards.double(), ids, 0, "dr_grpo", 0.0, True),
        (rewards.bfloat16(), ids.int(), 0, "batch_std", 1e-6, True),
    ]
    for args in samples:
        # mask, reward_weights, norm_by_std, whiten_eps: tests/ops/test_advantage_estimators.py
        torch.library.opcheck(op, args + (None, None, True, 1e-8, "torch"))


def test_torch_compile_fullgraph():
    def step(rewards, values, mask):
        adv = group_advantages(rewards, group_size=4, backend="torch")
        return adv, masked_whiten(values, mask)

    rewards = grid_rewards(8, seed=19)
    values = torch.randn(3, 5, generator=torch.Generator().manual_seed(20))
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(21)) > 0.3
    # aot_eager: Dynamo (fullgraph: no graph break), fake tensors and AOT autograd exactly as
    # Inductor would see them, without Inductor's C++ code generation (~25 s on 2 cores).
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(rewards, values, mask), step(rewards, values, mask)):
        torch.testing.assert_close(got, want)


# ============================================================================ masked_whiten

def numpy_whiten(values, mask, shift_mean=True, eps=1e-8, unbiased=True):
    v = values.double().numpy()
    w = mask.double().numpy()
    sel = v[w != 0]
    ww = w[w != 0]
    mean = (ww * sel).sum() / ww.sum()
    var = (ww * (sel - mean) ** 2).sum() / (ww.sum() - (1 if unbiased else 0))
    out = (v - mean) / np.sqrt(var + eps)
    return torch.from_numpy(out if shift_mean else out + mean)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_masked_whiten_matches_numpy(backend, shift_mean, unbiased, mask_dtype):
    gen = torch.Generator().manual_seed(22)
    values = torch.randn(4, 9, generator=gen) * 3 + 1
    mask = torch.rand(4, 9, generator=gen) > 0.4
    mask[1] = False  # an all-masked row: the statistics are global
    out = masked_whiten(values, mask.to(mask_dtype), shift_mean=shift_mean, unbiased=unbiased,
                        backend=backend)
    assert out.dtype == torch.float32 and out.shape == values.shape
    ref = numpy_whiten(values, mask, shift_mean=shift_mean, unbiased=unbiased)
    torch.testing.assert_close(out.double(), ref, **TOL)
    # the masked statistics: mean 0 / variance 1 over the selected elements (shift_mean)
    if shift_mean:
        sel = out[mask].double()
        assert abs(sel.mean().item()) < 1e-5
        assert abs(sel.var(unbiased=unbiased).item() - 1) < 1e-4


def test_masked_whiten_float_weights_and_masked_nan(backend):
    gen = torch.Generator().manual_seed(23)
    values = torch.randn(30, generator=gen, dtype=torch.float64)
    weights = torch.rand(30, generator=gen, dtype=torch.float64)
    weights[::3] = 0
    out = masked_whiten(values, weights, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, numpy_whiten(values, weights), atol=1e-12, rtol=1e-12)
    # garbage at masked positions stays there: it does not enter the statistics
    dirty = values.clone()
    dirty[0] = float("nan")
    out2 = masked_whiten(dirty, weights, backend=backend)
    assert torch.isnan(out2[0]) and torch.equal(out2[1:], out[1:])


def test_masked_whiten_degenerate_counts_are_finite(backend):
    values = torch.tensor([1.0, 2.0, 3.0])
    out = masked_whiten(values, torch.zeros(3, dtype=torch.bool), backend=backend)  # 0, 0
    torch.testing.assert_close(out, values / math.sqrt(1e-8))
    out = masked_whiten(values, torch.tensor([False, True, False]), backend=backend)  # 2, 0
    torch.testing.assert_close(out, (values - 2) / math.sqrt(1e-8))
    assert out[1] == 0
    assert masked_whiten(torch.zeros(0, 3), torch.zeros(0, 3), backend=backend).shape == (0, 3)


def test_masked_whiten_gradient(backend):
    gen = torch.Generator().manual_seed(24)
    values = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 4, generator=gen) > 0.3
    weights = torch.rand(3, 4, generator=gen, dtype=torch.float64) * mask / 8  # sum < 1
    for shift_mean in (True, False):
        for unbiased in (True, False):
            for m in (mask, weights, torch.zeros_like(mask), mask & (torch.arange(4) == 1)):
                assert torch.autograd.gradcheck(
                    lambda v: masked_whiten(v, m, shift_mean=shift_mean, eps=1e-6,
                                            unbiased=unbiased, backend=backend), (values,))
    v32 = values.detach().float().requires_grad_()
    masked_whiten(v32, mask, backend=backend).sum().backward()
    assert v32.grad.dtype == torch.float32
    vb = values.detach().bfloat16().requires_grad_()
    masked_whiten(vb, mask, backend=backend).sum().backward()
    assert vb.grad.dtype == torch.bfloat16


def test_masked_whiten_masked_nan_does_not_poison_the_gradient(backend):
    """A NaN value at a masked position whose output gets no gradient (a loss that selects
    out the masked positions) leaves every other gradient as with a finite value there."""
    gen = torch.Generator().manual_seed(32)
    values = torch.randn(40, generator=gen)
    mask = torch.rand(40, generator=gen) > 0.3
    mask[3] = False
    grads = []
    for bad in (float("nan"), 123.0):
        v = values.clone()
        v[3] = bad
        v.requires_grad_(True)
        torch.where(mask, masked_whiten(v, mask, backend=backend), 0.0).square().sum().backward()
        grads.append(v.grad)
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_masked_whiten_kernels_match_reference_at_size(backend):
    """Many blocks and programs (the partial sums cross programs), fp32 values and gradient
    against the fp64 composite reference; deterministic (bit-identical twice)."""
    gen = torch.Generator().manual_seed(28)
    values = torch.randn(5, 2000, generator=gen, dtype=torch.float64) * 2 + 0.5
    mask = torch.rand(5, 2000, generator=gen) > 0.3
    g = torch.randn(5, 2000, generator=gen, dtype=torch.float64)
    v64 = values.clone().requires_grad_()
    ref = masked_whiten(v64, mask, shift_mean=False, backend="torch")
    ref.backward(g)
    runs = []
    for _ in range(2):
        v32 = values.float().requires_grad_()
        out = masked_whiten(v32, mask, shift_mean=False, backend=backend)
        out.backward(g.float())
        runs.append((out, v32.grad))
    torch.testing.assert_close(runs[0][0].double(), ref.detach(), **TOL)
    bound = 2 * torch.finfo(torch.float32).eps * float(v64.grad.abs().max()) + 1e-7
    assert float((runs[0][1].double() - v64.grad).abs().max()) <= bound * 10
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ================================================================== gae / discounted returns

def multi_turn_mask():
    """[5, 12]: a full row; a two-turn row with an observation hole in the middle; leading
    prompt-like zeros plus trailing padding; an all-masked row; a single valid token."""
    m = torch.ones(5, 12, dtype=torch.bool)
    m[1, 4:7] = False
    m[2, :2] = False
    m[2, 9:] = False
    m[3] = False
    m[4] = False
    m[4, 5] = True
    return m


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gae_matches_naive(backend, gamma, lam, dtype):
    gen = torch.Generator().manual_seed(25)
    rewards = torch.randn(5, 12, generator=gen).to(dtype)
    values = torch.randn(5, 12, generator=gen).to(dtype)
    mask = multi_turn_mask()
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
    assert adv.dtype == dtype and ret.dtype == dtype and adv.shape == (5, 12)
    ref_adv, ref_ret = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv.double(), ref_adv, **TOL)
    torch.testing.assert_close(ret.double(), ref_ret, **TOL)
    zeros = torch.zeros(int((~mask).sum()), dtype=dtype)
    assert torch.equal(adv[~mask], zeros) and torch.equal(ret[~mask], zeros)


def test_gae_mask_dtypes_and_masked_garbage(backend):
    gen = torch.Generator().manual_seed(26)
    rewards = torch.randn(5, 12, generator=gen)
    values = torch.randn(5, 12, generator=gen)
    mask = multi_turn_mask()
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, backend=backend)
    for m in (mask.long(), mask.float(), mask.to(torch.uint8)):
        a, r = gae(rewards, values, m, gamma=0.9, lam=0.8, backend=backend)
        assert torch.equal(a, adv) and torch.equal(r, ret)
    dirty_r, dirty_v = rewards.clone(), values.clone()
    dirty_r[~mask] = float("nan")
    dirty_v[~mask] = float("inf")
    a, r = gae(dirty_r, dirty_v, mask, gamma=0.9, lam=0.8, backend=backend)
    assert torch.equal(a, adv) and torch.equal(r, ret)
    g = discounted_returns(rewards, mask, gamma=0.9, backend=backend)
    assert torch.equal(discounted_returns(dirty_r, mask, gamma=0.9, backend=backend), g)


def test_gae_nan_stays_in_its_row_and_earlier_times(backend):
    """A NaN reward at a valid position reaches the earlier valid positions of its row (the
    scan runs backwards), not the later ones and not the other rows."""
    gen = torch.Generator().manual_seed(29)
    rewards = torch.randn(3, 40, generator=gen)
    values = torch.randn(3, 40, generator=gen)
    mask = torch.ones(3, 40, dtype=torch.bool)
    rewards[1, 25] = float("nan")
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.9, backend=backend)
    assert torch.isnan(adv[1, :26]).all() and not torch.isnan(adv[1, 26:]).any()
    assert not torch.isnan(adv[0]).any() and not torch.isnan(adv[2]).any()
    out = discounted_returns(rewards, mask, gamma=0.9, backend=backend)
    assert torch.isnan(out[1, :26]).all() and not torch.isnan(out[1, 26:]).any()


@pytest.mark.parametrize("steps", [1, 15, 16, 17, 1000, 2500])
def test_gae_long_rows_and_strides(backend, steps):
    """Rows longer than one scan chunk (the state crosses chunks), lengths around the block
    sizes, non-contiguous inputs (a transposed view and a strided slice)."""
    gen = torch.Generator().manual_seed(30 + steps)
    rewards = torch.randint(-8, 9, (steps, 4), generator=gen).double().div(8).t()
    values = torch.randint(-8, 9, (4, 2 * steps), generator=gen).double().div(8)[:, ::2]
    mask = torch.rand(4, steps, generator=gen) > 0.25
    mask[0] = True
    mask[3, steps // 2:] = False  # trailing padding
    for gamma, lam in ((0.999, 0.95), (1.0, 1.0)):
        adv, ret = gae(rewards.float(), values.float(), mask, gamma=gamma, lam=lam,
                       backend=backend)
        ref_adv, ref_ret = naive_gae(rewards, values, mask, gamma, lam)
        scale = max(1.0, float(ref_adv.abs().max()))
        torch.testing.assert_close(adv.double(), ref_adv, atol=1e-5 * scale, rtol=1e-5)
        torch.testing.assert_close(ret.double(), ref_ret, atol=1e-5 * scale, rtol=1e-5)
        adv64, ret64 = gae(rewards, values, mask, gamma=gamma, lam=lam, backend=backend)
        torch.testing.assert_close(adv64, ref_adv, atol=1e-10 * scale, rtol=1e-10)
        g = discounted_returns(rewards.float(), mask, gamma=gamma, backend=backend)
        ref_g = naive_returns(rewards, mask, gamma)
        scale = max(1.0, float(ref_g.abs().max()))
        torch.testing.assert_close(g.double(), ref_g, atol=1e-5 * scale, rtol=1e-5)


def test_gae_bf16_inputs_and_mixed_dtypes(backend):
    gen = torch.Generator().manual_seed(31)
    rewards = torch.randint(-8, 9, (3, 20), generator=gen).div(8)
    values = torch.randint(-8, 9, (3, 20), generator=gen).div(8)
    mask = torch.rand(3, 20, generator=gen) > 0.3
    ref_adv, _ = naive_gae(rewards.double(), values.double(), mask, 0.95, 0.9)
    adv, _ = gae(rewards.bfloat16(), values.half(), mask, gamma=0.95, lam=0.9, backend=backend)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv.double(), ref_adv, **TOL)
    adv, _ = gae(rewards, values.double(), mask, gamma=0.95, lam=0.9, backend=backend)
    assert adv.dtype == torch.float64


def test_gae_special_cases(backend):
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, True, False]])
    # values 0, gamma = lam = 1: advantages are the reverse cumulative sums of the rewards
    adv, ret = gae(rewards, torch.zeros(1, 4), mask, backend=backend)
    assert torch.equal(adv, torch.tensor([[1.0, 1.0, 1.0, 0.0]])) and torch.equal(ret, adv)
    # lam = 0: one-step TD errors
    values = torch.tensor([[0.5, 0.25, 0.75, 9.0]])
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0, backend=backend)
    assert torch.equal(adv, torch.tensor([[0.25 - 0.5, 0.75 - 0.25, 1.0 - 0.75, 0.0]]))
    # empty T and empty B
    for shape in ((2, 0), (0, 3)):
        adv, ret = gae(torch.zeros(shape), torch.zeros(shape), torch.zeros(shape, dtype=bool),
                       backend=backend)
        assert adv.shape == shape and ret.shape == shape
        assert discounted_returns(torch.zeros(shape), torch.zeros(shape, dtype=bool),
                                  backend=backend).shape == shape


def test_gae_not_differentiable():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_discounted_returns_matches_naive(backend, gamma):
    gen = torch.Generator().manual_seed(27)
    rewards = torch.randn(5, 12, generator=gen)
    mask = multi_turn_mask()
    out = discounted_returns(rewards, mask, gamma=gamma, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (5, 12)
    torch.testing.assert_close(out.double(), naive_returns(rewards, mask, gamma), **TOL)
    assert torch.equal(out[~mask], torch.zeros(int((~mask).sum())))
    # = the returns of gae with values 0 and lam 1
    _, ret = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0, backend=backend)
    torch.testing.assert_close(out, ret, atol=1e-6, rtol=1e-6)
    out64 = discounted_returns(rewards.double(), mask.float(), gamma=gamma, backend=backend)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, naive_returns(rewards, mask, gamma), atol=1e-12,
                               rtol=1e-12)


# =================================================================================== errors

R8 = torch.zeros(8)
IDS8 = torch.zeros(8, dtype=torch.int64)
M23 = torch.ones(2, 3, dtype=torch.bool)
F23 = torch.zeros(2, 3)

ERRORS = [
    # group_advantages
    (lambda: group_advantages([1.0, 2.0], group_size=1), TypeError,
     r"rewards: expected a torch.Tensor, got list"),
    (lambda: group_advantages(torch.zeros(8, dtype=torch.int64), group_size=4), TypeError,
     r"rewards: expected dtype in \(bfloat16, float16, float32, float64\), got int64"),
    (lambda: group_advantages(torch.zeros(2, 4), group_size=4), ValueError,
     r"rewards: expected a 1-d tensor, got shape \(2, 4\)"),
    (lambda: group_advantages(R8, group_size=4, group_index=IDS8), ValueError,
     r"group_size, group_index: expected exactly one of them .* got both"),
    (lambda: group_advantages(R8), ValueError,
     r"group_size, group_index: expected exactly one of them .* got neither"),
    (lambda: group_advantages(R8, group_size=0), ValueError,
     r"group_size: expected an int >= 1, got 0"),
    (lambda: group_advantages(R8, group_size=4.0), TypeError,
     r"group_size: expected an int, got float"),
    (lambda: group_advantages(R8, group_size=3), ValueError,
     r"group_size: expected a divisor of the batch size B=8 .* got 3"),
    (lambda: group_advantages(R8, group_index=torch.zeros(8)), TypeError,
     r"group_index: expected dtype in \(int32, int64\), got float32"),
    (lambda: group_advantages(R8, group_index=IDS8[:5]), ValueError,
     r"group_index: expected shape \(8,\) \(one group id per reward\), got \(5,\)"),
    (lambda: group_advantages(R8, group_index=IDS8.to("meta")), ValueError,
     r"group_index: expected a tensor on cpu \(the device of rewards\), got one on meta"),
    (lambda: group_advantages(R8, group_size=4, method="ppo"), ValueError,
     r"method: expected one of 'grpo', 'dr_grpo', 'rloo', 'batch_std', .*'gdpo', "
     r"'grpo_vectorized', 'rloo_vectorized', got 'ppo'"),
    (lambda: group_advantages(R8, group_size=4, eps=-1e-3), ValueError,
     r"eps: expected a finite number >= 0, got -0.001"),
    (lambda: group_advantages(R8, group_size=4, eps=float("inf")), ValueError,
     r"eps: expected a finite number >= 0, got inf"),
    (lambda: group_advantages(R8, group_size=4, unbiased=1), TypeError,
     r"unbiased: expected a bool, got int"),
    (lambda: group_advantages(R8, group_size=4, backend="jax"), ValueError,
     r"backend: expected one of 'torch', 'triton', 'cuda', 'auto', got 'jax'"),
    # masked_whiten
    (lambda: masked_whiten(torch.ones(2, 3, dtype=torch.int64), M23), TypeError,
     r"values: expected dtype in \(bfloat16, float16, float32, float64\), got int64"),
    (lambda: masked_whiten(F23, M23[:, :2]), ValueError,
     r"mask: expected shape \(2, 3\) \(the shape of values\), got \(2, 2\)"),
    (lambda: masked_whiten(F23, torch.ones(2, 3, dtype=torch.complex64)), TypeError,
     r"mask: expected dtype in \(bool, .*\), got complex64"),
    (lambda: masked_whiten(F23, M23.to("meta")), ValueError,
     r"mask: expected a tensor on cpu \(the device of values\), got one on meta"),
    (lambda: masked_whiten(F23, M23, eps=-1.0), ValueError,
     r"eps: expected a finite number >= 0, got -1.0"),
    (lambda: masked_whiten(F23, M23, shift_mean=None), TypeError,
     r"shift_mean: expected a bool, got NoneType"),
    (lambda: masked_whiten(F23, M23, unbiased="yes"), TypeError,
     r"unbiased: expected a bool, got str"),
    # gae
    (lambda: gae(torch.zeros(6), torch.zeros(6), torch.ones(6)), ValueError,
     r"rewards: expected a 2-d tensor, got shape \(6,\)"),
    (lambda: gae(F23, torch.zeros(3, 2), M23), ValueError,
     r"values: expected shape \(2, 3\) \(the shape of rewards, \[B, T\]\), got \(3, 2\)"),
    (lambda: gae(F23, F23.long(), M23), TypeError,
     r"values: expected dtype in \(bfloat16, float16, float32, float64\), got int64"),
    (lambda: gae(F23, F23.to("meta"), M23), ValueError,
     r"values: expected a tensor on cpu \(the device of rewards\), got one on meta"),
    (lambda: gae(F23, F23, M23[0]), ValueError,
     r"mask: expected shape \(2, 3\) \(the shape of rewards\), got \(3,\)"),
    (lambda: gae(F23, F23, M23, gamma=1.5), ValueError,
     r"gamma: expected a number <= 1.0, got 1.5"),
    (lambda: gae(F23, F23, M23, lam=-0.1), ValueError,
     r"lam: expected a number >= 0.0, got -0.1"),
    (lambda: gae(F23, F23, M23, lam=float("nan")), ValueError,
     r"lam: expected a finite number, got nan"),
    # discounted_returns
    (lambda: discounted_returns(torch.zeros(2, 3, 4), torch.ones(2, 3, 4)), ValueError,
     r"rewards: expected a 2-d tensor, got shape \(2, 3, 4\)"),
    (lambda: discounted_returns(F23.long(), M23), TypeError,
     r"rewards: expected dtype in \(bfloat16, float16, float32, float64\), got int64"),
    (lambda: discounted_returns(F23, M23.T), ValueError,
     r"mask: expected shape \(2, 3\) \(the shape of rewards\), got \(3, 2\)"),
    (lambda: discounted_returns(F23, M23, gamma=-0.5), ValueError,
     r"gamma: expected a number >= 0.0, got -0.5"),
    (lambda: discounted_returns(F23, M23, gamma="0.9"), TypeError,
     r"gamma: expected a float, got str"),
]


@pytest.mark.parametrize("fn,exc,match", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


@pytest.fixture
def debug_mode():
    previous = _checks.debug_enabled()
    _checks.set_debug(True)
    yield
    _checks.set_debug(previous)


def test_nan_rewards_raise_in_debug_mode(debug_mode):
    rewards = torch.tensor([0.0, 1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"rewards: expected no NaN values, got 1 NaN "
                                         r"value\(s\) \(first at index 2\)"):
        group_advantages(rewards, group_size=2)
    # finite rewards pass, and the check costs nothing when off
    group_advantages(torch.ones(4), group_size=2)


# ========================================================================= eager fast path

def test_eager_fast_path_skips_the_custom_ops_and_matches_them(backend, device, monkeypatch):
    """Plain eager calls run the backend functions directly (ops/_eager.py); under a
    ``TorchDispatchMode`` (what ``opcheck`` / ``make_fx`` push) the custom ops run. Same bits,
    forward and ``masked_whiten``'s backward; no gradient reaches the rewards either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlkernels.ops import advantage as ops_adv

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    calls = []
    for spec in (ops_adv.GROUP_ADVANTAGES, ops_adv.MASKED_WHITEN, ops_adv.GAE,
                 ops_adv.DISCOUNTED_RETURNS):
        monkeypatch.setattr(spec, "op", lambda *a, _real=spec.op, _name=spec.name:
                            calls.append(_name) or _real(*a))
    g = torch.Generator().manual_seed(41)
    rewards = torch.randn(4, 7, generator=g).to(device).requires_grad_()
    values = torch.randn(4, 7, generator=g).to(device).requires_grad_()
    mask = (torch.rand(4, 7, generator=g) > 0.3).to(device)

    def run():
        ga = group_advantages(rewards.sum(1), group_size=2, backend=backend)
        adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, backend=backend)
        dr = discounted_returns(rewards, mask, gamma=0.9, backend=backend)
        w = masked_whiten(values, mask, backend=backend)
        (grad,) = torch.autograd.grad(w.square().sum(), values)
        assert not (ga.requires_grad or adv.requires_grad or dr.requires_grad)
        return ga, adv, ret, dr, w.detach(), grad

    fast = run()
    assert calls == []
    with Passthrough():
        slow = run()
    assert sorted(calls) == ["discounted_returns", "gae", "group_advantages", "masked_whiten"]
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
