"""Kernel-level tests of the triton ``group_advantages`` kernel
(``rlkernels.triton.advantage``) against the reference function
(``rlkernels.reference.advantage.group_advantages_forward``); ``tests/ops/test_advantage.py``
checks the public op on the torch backend against naive formulas.

Both ways of grouping are covered for every method: contiguous groups, and ``group_index``
ids (permuted, uneven group sizes, singletons, negative / large ids, int32 and int64, NaN
rewards), plus the properties the kernel promises: the two paths bit-identical for the same
grouping, a group's result independent of the other groups, two runs bit-identical.

Shapes: B=24 (6 groups of 4) for the grid; a group of 300 members, larger than the 128
members the kernel sums per step (the chunk loop); B=1500 > 1024 for the batch_std passes;
B=0 and B=1. The interpreter runs one program per group slot, so the batches stay small;
the ``gpu`` tests cover 8192 rewards and CUDA-graph capture.
"""

from __future__ import annotations

import random

import pytest
import torch

import rlkernels
from rlkernels.reference import advantage as ref

if rlkernels.available_backends()["triton"] != "ok":
    pytest.skip(f"triton backend unavailable: {rlkernels.available_backends()['triton']}",
                allow_module_level=True)

from rlkernels.triton import advantage as ta  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
METHODS = ("grpo", "dr_grpo", "rloo", "batch_std")


def rewards_of(n, *, seed=0, dtype=torch.float32, device=DEV):
    """Random rewards, not on a grid: sums round, so the summation order shows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device)


def mixed_ids(seed=0, device=DEV):
    """Groups of 1, 2, 3, 5, 8 and 1 members under unsorted negative / large ids, shuffled."""
    ids = [-7] + [3] * 2 + [10 ** 12] * 3 + [-2] * 5 + [42] * 8 + [0]
    random.Random(seed).shuffle(ids)
    return torch.tensor(ids, dtype=torch.int64, device=device)


def both(rewards, group_index, group_size, method, eps=1e-6, unbiased=True):
    got = ta.group_advantages_forward(rewards, group_index, group_size, method, eps, unbiased)
    want = ref.group_advantages_forward(rewards, group_index, group_size, method, eps,
                                        unbiased)
    return got, want


def assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-12 if got.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)


def bit_equal(a, b):
    view = {4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(view), b.view(view))


# ================================================================================ contiguous

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_contiguous_matches_reference(method, unbiased, dtype):
    # 6 groups of 4; group 2 has identical rewards (std 0: exactly 0 with grpo)
    x = rewards_of(24, seed=1, dtype=dtype)
    x[8:12] = 0.5
    got, want = both(x, None, 4, method, unbiased=unbiased)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, want)
    assert (got[8:12] == 0).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [1, 300])
def test_contiguous_singletons_and_long_groups(method, size):
    """Groups of one member (r - r = 0 for every method) and a group of 300 members, summed
    in 3 chunks of 128 (the last partial)."""
    x = rewards_of(2 * size, seed=2, dtype=torch.float64)
    got, want = both(x, None, size, method)
    assert_close(got, want)
    if size == 1:
        assert (got == 0).all()


# ============================================================================= group_index

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_matches_reference(method, unbiased, index_dtype):
    ids = mixed_ids(seed=3)
    if index_dtype == torch.int32:  # the same grouping under other (int32) labels
        ids = (ids % 997 - 500).to(torch.int32)
        assert ids.unique().numel() == 6
    x = rewards_of(ids.numel(), seed=4)
    got, want = both(x, ids, 0, method, unbiased=unbiased)
    assert_close(got, want)
    for gid in ids.unique():
        members = ids == gid
        if members.sum() == 1:
            assert (got[members] == 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_index_long_group_and_large_batch(method):
    """1500 rewards (more than one 1024-element step of the batch_std passes): one group of
    300 members spread over the batch, 100 groups of 12 interleaved with it."""
    g = torch.Generator().manual_seed(5)
    ids = torch.cat([torch.full((300,), -1), torch.arange(1200) // 12])
    ids = ids[torch.randperm(1500, generator=g)].to(DEV)
    x = rewards_of(1500, seed=6)
    got, want = both(x, ids, 0, method)
    assert_close(got, want)


@pytest.mark.parametrize("method", METHODS)
def test_nan_rewards(method):
    """A NaN reward poisons its own group only (every group with batch_std, whose batch std
    is NaN); a NaN in a singleton group is NaN (r - r), not 0."""
    x = rewards_of(12, seed=7)
    x[5] = float("nan")
    x[11] = float("nan")
    ids = torch.tensor([2, 2, 2, 2, 5, 5, 5, 5, -1, -1, -1, 9], device=DEV)
    for group_index, size in ((ids, 0), (None, 4)):
        got, want = both(x, group_index, size, method)
        assert_close(got, want)
        assert torch.isnan(got[4:8]).all() and torch.isnan(got[11])
        if method != "batch_std":
            assert not torch.isnan(got[:4]).any()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paths_bit_identical(method, dtype):
    """The same grouping through group_size and through any relabeling of group_index
    (sorted or not, negative, int32) gives the same bits; so does a permuted layout for the
    members of each group taken in the same order."""
    x = rewards_of(40, seed=8, dtype=dtype)  # 5 groups of 8
    contiguous = ta.group_advantages_forward(x, None, 8, method, 1e-6, True)
    ids = torch.arange(40, device=DEV) // 8
    for relabel in (ids, ids.to(torch.int32), 1000 - 37 * ids, ids - 4, (ids * 7919) % 5):
        out = ta.group_advantages_forward(x, relabel, 0, method, 1e-6, True)
        assert bit_equal(out, contiguous)
    # interleave the groups (each group's members keep their relative order)
    order = torch.arange(40, device=DEV).view(5, 8).t().reshape(-1)
    out = ta.group_advantages_forward(x[order], ids[order], 0, method, 1e-6, True)
    assert bit_equal(out, contiguous[order])
    # and twice the same call: the same bits
    again = ta.group_advantages_forward(x[order], ids[order], 0, method, 1e-6, True)
    assert bit_equal(again, out)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "rloo"])
def test_batch_invariance(method):
    """A group's advantages do not depend on the other groups of the call (both paths)."""
    group = rewards_of(8, seed=9)
    alone = ta.group_advantages_forward(group, None, 8, method, 1e-6, True)
    batch = torch.cat([rewards_of(16, seed=10), group, rewards_of(8, seed=11)])
    out = ta.group_advantages_forward(batch, None, 8, method, 1e-6, True)
    assert bit_equal(out[16:24], alone)
    ids = torch.tensor([4, -3] * 8 + [7] * 8 + [0] * 8, device=DEV)
    out = ta.group_advantages_forward(batch, ids, 0, method, 1e-6, True)
    assert bit_equal(out[16:24], alone)


@pytest.mark.parametrize("programs", [1, 3])
def test_batch_std_strided_programs(monkeypatch, programs):
    """batch_std runs few programs, each looping over its group slots (pid, pid + P, ...)."""
    monkeypatch.setattr(ta, "_CPU_PROGRAMS", programs)
    x = rewards_of(20, seed=12)
    ids = mixed_ids(seed=13)[:20]
    for group_index, size in ((ids, 0), (None, 5)):
        got, want = both(x, group_index, size, "batch_std", unbiased=False)
        assert_close(got, want)


@pytest.mark.parametrize("programs", [2, 3])
def test_batch_passes_of_the_new_estimators_strided(monkeypatch, programs):
    """gpg's batch count and the batch whitening (group and token forms) run few programs,
    each re-reducing the whole batch in the same order: any program count gives the same
    bits as one program (the rows a program writes depend on it, the statistics do not)."""
    x = rewards_of(30, seed=40)
    ids = torch.arange(30, device=DEV) % 7
    mask = torch.rand(30, 45, generator=torch.Generator().manual_seed(41)) > 0.3
    mask = mask.to(DEV)
    rt = rewards_of(30 * 45, seed=42).view(30, 45)
    comps = torch.stack([x, rewards_of(30, seed=43)], 1)

    def run():
        outs = [ta.group_advantages_forward(x, ids, 0, m, 1e-6, True, mask, None, True, 1e-8)
                for m in ("gpg", "reinforce_plus_plus_baseline")]
        outs.append(ta.group_advantages_forward(comps, None, 5, "gdpo", 1e-6, False, mask,
                                                torch.tensor([1.0, 3.0], device=DEV), True,
                                                1e-8))
        outs += ta.discounted_advantages_forward(rt, mask, x, 0.95, True, 1e-8, True)
        return outs

    monkeypatch.setattr(ta, "_CPU_PROGRAMS", 1)
    one = run()
    monkeypatch.setattr(ta, "_CPU_PROGRAMS", programs)
    for a, b in zip(run(), one):
        assert torch.equal(a, b)
    # and the reference agrees (fp64 reference, fp32 kernels)
    want = ref.group_advantages_forward(x.double(), ids, 0, "reinforce_plus_plus_baseline",
                                        1e-6, True, mask, None, True, 1e-8)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one[1].double(), want, **tol)
    want_adv, want_ret = ref.discounted_advantages(rt.double(), mask, x.double(), 0.95, True,
                                                   1e-8, True)
    torch.testing.assert_close(one[3].double(), want_adv, **tol)
    torch.testing.assert_close(one[4].double(), want_ret, **tol)


@pytest.mark.parametrize("method", METHODS)
def test_edge_batches(method):
    for dtype, out_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float32),
                             (torch.float64, torch.float64)):
        empty = torch.empty(0, dtype=dtype, device=DEV)
        for group_index, size in ((None, 4), (torch.empty(0, dtype=torch.int64, device=DEV), 0)):
            out = ta.group_advantages_forward(empty, group_index, size, method, 1e-6, True)
            assert out.shape == (0,) and out.dtype == out_dtype
    one = rewards_of(1, seed=14)
    for group_index, size in ((None, 1), (torch.tensor([3], device=DEV), 0)):
        got, want = both(one, group_index, size, method)
        assert_close(got, want)
        assert got.item() == 0.0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # eps = 0: x / 0 and 0 / 0
@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_eps(eps):
    x = rewards_of(12, seed=15, dtype=torch.float64)
    x[:3] = 1.25  # std 0: 0 / (0 + eps) = 0 for eps > 0, NaN for eps = 0, as the reference
    for method in ("grpo", "batch_std"):
        got, want = both(x, None, 3, method, eps=eps)
        assert_close(got, want)


def test_strided_rewards():
    """Rewards read through their stride (every other element of a wider tensor)."""
    wide = rewards_of(48, seed=17)
    ids = torch.tensor([3, 1, 2] * 8, device=DEV)
    for group_index, size in ((ids, 0), (None, 6)):
        got = ta.group_advantages_forward(wide[::2], group_index, size, "grpo", 1e-6, True)
        want = ta.group_advantages_forward(wide[::2].contiguous(), group_index, size, "grpo",
                                           1e-6, True)
        assert bit_equal(got, want)


def test_through_the_public_op():
    """group_advantages(backend="triton") dispatches to this kernel."""
    x = rewards_of(16, seed=16)
    ids = torch.tensor([1, 2] * 8, device=DEV)
    for kwargs in (dict(group_size=4), dict(group_index=ids)):
        out = rlkernels.group_advantages(x, backend="triton", **kwargs)
        want = rlkernels.group_advantages(x, backend="torch", **kwargs)
        assert_close(out, want)


# ============================================================================ GPU build

_BUILD_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "benchmarks")
import sm90_compile as S
from rlkernels.triton import advantage as K

def launches(settings, dtype=torch.float32, b=2048, t=512):
    def run():
        r, gid = S.gpu(b, dtype=dtype), S.gpu(b, dtype=torch.int64)
        rt, vt = S.gpu(b, t, dtype=dtype), S.gpu(b, t, dtype=dtype)
        mt = S.gpu(b, t, dtype=torch.bool)
        for eps, gamma, lam in settings:
            for method in ("grpo", "batch_std"):
                K.group_advantages_forward(r, gid if method == "grpo" else None, 8, method,
                                           eps, True)
            # verl's other estimators: eps and whiten_eps are runtime values too
            for method in ("opo", "gpg", "grpo_passk", "reinforce_plus_plus_baseline"):
                K.group_advantages_forward(r, gid, 0, method, eps, True, mt, None, True, eps)
            K.group_advantages_forward(S.gpu(b, 3, dtype=dtype), None, 8, "gdpo", eps, True,
                                       mt, S.gpu(3, dtype=torch.float32), False, eps)
            K.discounted_advantages_forward(rt, mt, S.gpu(b, dtype=torch.float32), gamma,
                                            True, eps, True)
            K.gae_forward(rt, vt, mt, gamma, lam)
            K.discounted_returns_forward(rt, mt, gamma)
            out, st = K.masked_whiten_forward(vt, mt, True, eps, True)
            K.masked_whiten_backward(out, vt, mt, st, True, True)
    found, errors = S.capture_launches([("advantage", run)], 90)
    assert not errors, errors
    return found

if sys.argv[1] == "recompile":
    one = launches([(1e-6, 0.99, 0.95)])
    two = launches([(1e-6, 0.99, 0.95), (1e-8, 0.999, 0.9)])
    for launch in two.values():
        assert not [v for v in launch.constexprs.values() if isinstance(v, float)], launch.kernel
        # a float argument is bound as fp64 (a plain Python float would be fp32)
        assert "fp32" not in launch.signature.values(), (launch.kernel, launch.signature)
    assert set(one) == set(two), sorted(l.kernel for l in two.values())
    print("same")
else:
    found = dict(launches([(1e-6, 0.99, 0.95)]))
    found.update(launches([(1e-6, 0.99, 0.95)], torch.float64))
    for launch in found.values():
        res = S.compile_launch(launch, 90)
        assert res.ok, (res.kernel, res.config, res.error)
    print("built", len(found))
"""


def _run_build_script(tmp_path, mode):
    import os
    import pathlib
    import subprocess
    import sys
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, mode], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_kernel_builds_for_sm90(tmp_path):
    """The interpreter compiles nothing: capture the launchers' launches on GPU-like meta
    tensors (benchmarks/sm90_compile.py) and build them for sm_90 (PTX and cubin with
    Triton's bundled ptxas, no GPU needed) in a subprocess without TRITON_INTERPRET."""
    assert "built" in _run_build_script(tmp_path, "build")


def test_float_hyper_parameters_compile_nothing_new(tmp_path):
    """Two settings of ``eps``, ``gamma`` and ``lam`` bind to the same compiled kernels as
    one: the floats are runtime arguments, not constexprs."""
    assert "same" in _run_build_script(tmp_path, "recompile")


def test_fp64_hyper_parameters_keep_fp64():
    """fp64 inputs with hyper-parameters that fp32 rounding would move by ~1e-8 relative,
    against the reference at 1e-13. The interpreter keeps Python floats in double anyway;
    on a GPU build a plain float argument would be fp32, which the capture in
    ``test_float_hyper_parameters_compile_nothing_new`` rules out (fp64 in the signature)."""
    x = rewards_of(24, seed=31, dtype=torch.float64) * 0.1
    got, want = both(x, None, 4, "grpo", eps=0.1)
    torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-13)
    g = torch.Generator().manual_seed(32)
    r, v = torch.randn(3, 40, generator=g, dtype=torch.float64), torch.randn(
        3, 40, generator=g, dtype=torch.float64)
    m = torch.rand(3, 40, generator=g) > 0.2
    for got, want in zip(ta.gae_forward(r, v, m, 0.9, 0.7), ref.gae(r, v, m, 0.9, 0.7)):
        torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(ta.discounted_returns_forward(r, m, 0.9),
                               ref.discounted_returns(r, m, 0.9), atol=1e-13, rtol=1e-13)
    small = r * 1e-3  # variance ~1e-6: eps = 0.1 dominates rsqrt(var + eps)
    got, _ = ta.masked_whiten_forward(small, m, True, 0.1, True)
    want, _ = ref.masked_whiten_forward(small, m, True, 0.1, True)
    torch.testing.assert_close(got, want, atol=1e-15, rtol=1e-13)


# ================================================================================== GPU

@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_gpu_large_and_deterministic(method):
    """512 prompts x 16 completions, grouped by shuffled prompt ids and contiguously."""
    x = rewards_of(8192, seed=20, device="cuda")
    ids = (torch.arange(8192) // 16)[torch.randperm(8192,
                                                    generator=torch.Generator().manual_seed(21))]
    ids = ids.cuda()
    for group_index, size in ((ids, 0), (None, 16)):
        got = ta.group_advantages_forward(x, group_index, size, method, 1e-6, True)
        want = ref.group_advantages_forward(x.double(), group_index, size, method, 1e-6, True)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        again = ta.group_advantages_forward(x, group_index, size, method, 1e-6, True)
        assert bit_equal(got, again)
    contiguous = ta.group_advantages_forward(x, None, 16, method, 1e-6, True)
    relabeled = ta.group_advantages_forward(x, torch.arange(8192, device="cuda") // 16 - 7, 0,
                                            method, 1e-6, True)
    assert bit_equal(contiguous, relabeled)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """The index path (sort, search, kernel) captured in a CUDA graph: no host sync."""
    x = rewards_of(8192, seed=22, device="cuda")
    ids = (torch.arange(8192, device="cuda") * 7919) % 600
    ta.group_advantages_forward(x, ids, 0, "grpo", 1e-6, True)  # compile before capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ta.group_advantages_forward(x, ids, 0, "grpo", 1e-6, True)
    torch.cuda.current_stream().wait_stream(stream)
    x.copy_(rewards_of(8192, seed=23, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert bit_equal(out, ta.group_advantages_forward(x, ids, 0, "grpo", 1e-6, True))


# ========================================================== gae, returns, masked_whiten (GPU)
# The CPU parity of these kernels runs in tests/ops/test_advantage.py (the ``backend``
# fixture includes triton through the interpreter).

def _sequences(b, t, seed, device):
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(-8, 9, (b, t), generator=g).double().div(8)
    v = torch.randint(-8, 9, (b, t), generator=g).double().div(8)
    m = torch.rand(b, t, generator=g) > 0.2
    m[:, t - t // 5:] = False  # trailing padding
    return r.to(device), v.to(device), m.to(device)


@pytest.mark.gpu
def test_gpu_gae_returns_whiten_large_and_deterministic():
    """512 x 4096 (several scan chunks per row) against the fp64 reference; two runs give the
    same bits; a row alone gives the bits it has inside the batch."""
    r, v, m = _sequences(512, 4096, 24, "cuda")
    adv, ret = ta.gae_forward(r.float(), v.float(), m, 0.999, 0.95)
    adv64, ret64 = ref.gae_forward(r, v, m, 0.999, 0.95)
    scale = float(adv64.abs().max())
    torch.testing.assert_close(adv.double(), adv64, atol=1e-5 * scale, rtol=1e-5)
    torch.testing.assert_close(ret.double(), ret64, atol=1e-5 * scale, rtol=1e-5)
    again = ta.gae_forward(r.float(), v.float(), m, 0.999, 0.95)
    assert bit_equal(adv, again[0]) and bit_equal(ret, again[1])
    alone = ta.gae_forward(r[300:301].float(), v[300:301].float(), m[300:301], 0.999, 0.95)
    assert bit_equal(alone[0], adv[300:301])
    g = ta.discounted_returns_forward(r.float(), m, 0.99)
    g64 = ref.discounted_returns_forward(r, m, 0.99)
    torch.testing.assert_close(g.double(), g64, atol=1e-5 * float(g64.abs().max()), rtol=1e-5)
    out, stats = ta.masked_whiten_forward(adv, m, True, 1e-8, True)
    out64, _ = ref.masked_whiten_forward(adv.double(), m, True, 1e-8, True)
    torch.testing.assert_close(out.double(), out64, atol=1e-5, rtol=1e-5)
    assert bit_equal(out, ta.masked_whiten_forward(adv, m, True, 1e-8, True)[0])


@pytest.mark.gpu
def test_gpu_gae_whiten_cuda_graph_capture():
    r, v, m = _sequences(64, 700, 25, "cuda")
    r, v = r.float(), v.float()

    def step():
        adv, _ = ta.gae_forward(r, v, m, 0.99, 0.95)
        out, stats = ta.masked_whiten_forward(adv, m, True, 1e-8, True)
        return adv, out, ta.masked_whiten_backward(out, adv, m, stats, True, True)

    eager = step()  # compiles the kernels outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    assert all(bit_equal(a, b) for a, b in zip(eager, captured))
