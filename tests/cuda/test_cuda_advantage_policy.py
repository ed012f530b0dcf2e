"""The cuda backend's group_advantages, gae, discounted_returns and masked_whiten
(csrc/advantage.cu) and policy_loss / grpo_loss
(csrc/policy.cu + the vocab kernels) against the torch reference on a GPU: every method and
option family, determinism, CUDA-graph capture. Without a GPU only the argument checks run.
"""

import random

import pytest
import torch

import rlkernels
from _cuda_gpu import HAS_GPU, gpu_cuda
from _naive import bit_equal, make_logits, make_tokens
from rlkernels.cuda import advantage as ca
from rlkernels.cuda import policy as cp

METHODS = ["grpo", "dr_grpo", "rloo", "batch_std"]


def _rewards(b, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, (b,), generator=g) / 4).to(dtype).cuda()


# ========================================================================= group_advantages

@gpu_cuda
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("group_size", [1, 4, 16, 100])  # 100: several members per lane
def test_group_advantages_contiguous(dtype, method, unbiased, group_size):
    r = _rewards(group_size * 6, dtype, seed=group_size)
    r[:group_size] = 0.5  # a group of identical rewards: std 0 -> 0
    out = rlkernels.group_advantages(r, group_size=group_size, method=method,
                                     unbiased=unbiased, backend="cuda")
    ref = rlkernels.group_advantages(r.double().cpu(), group_size=group_size, method=method,
                                     unbiased=unbiased, backend="torch")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)


@gpu_cuda
@pytest.mark.parametrize("method", METHODS)
def test_group_advantages_index_matches_contiguous_bitwise(method):
    r = _rewards(8 * 40, seed=1)
    contiguous = rlkernels.group_advantages(r, group_size=8, method=method, backend="cuda")
    ids = torch.arange(320, device="cuda") // 8
    perm = torch.randperm(320, generator=torch.Generator().manual_seed(0)).cuda()
    relabel = ids * 7 - 1000  # any values, negative included
    out = rlkernels.group_advantages(r[perm], group_index=relabel[perm].to(torch.int32),
                                     method=method, backend="cuda")
    # members keep their relative order only under a stable permutation: compare values
    torch.testing.assert_close(out, contiguous[perm], rtol=2e-6, atol=2e-6)
    same_order = rlkernels.group_advantages(r, group_index=relabel, method=method,
                                            backend="cuda")
    assert bit_equal(same_order, contiguous)


@gpu_cuda
@pytest.mark.parametrize("method", METHODS)
def test_group_advantages_mixed_groups_and_determinism(method):
    ids = [-7] + [3] * 2 + [1000] * 3 + [-2] * 5 + [42] * 8 + [0] + [5] * 70
    random.Random(0).shuffle(ids)
    gi = torch.tensor(ids, device="cuda")
    r = _rewards(len(ids), seed=2)
    r[0] = float("nan")
    out = rlkernels.group_advantages(r, group_index=gi, method=method, backend="cuda")
    ref = rlkernels.group_advantages(r.cpu().double(), group_index=gi.cpu(), method=method,
                                     backend="torch")
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-5, atol=2e-5, equal_nan=True)
    assert bit_equal(out, rlkernels.group_advantages(r, group_index=gi, method=method,
                                                     backend="cuda"))


# ================================================================ gae / discounted_returns

def _scan_inputs(b, t, dtype, seed=0, quarters=False):
    """rewards, values [B, T] and a mask with gaps (multi-turn: tool tokens masked), an
    all-masked row, a row masked at its end (padding) and one at its start."""
    g = torch.Generator().manual_seed(seed)
    if quarters:  # multiples of 1/4: sums of a few thousand of them are exact in fp32
        r = torch.randint(-8, 9, (b, t), generator=g).double() / 4
        v = torch.randint(-8, 9, (b, t), generator=g).double() / 4
    else:
        r = torch.randn(b, t, generator=g, dtype=torch.float64)
        v = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = torch.rand(b, t, generator=g) > 0.25
    if b > 1:
        mask[1] = False
    if b > 2:
        mask[2, t // 2:] = False
    if b > 3:
        mask[3, : t // 3] = False
    return r.to(dtype).cuda(), v.to(dtype).cuda(), mask.cuda()


def _scan_tol(dtype):
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5,
                                                                             atol=1e-5)


@gpu_cuda
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
@pytest.mark.parametrize("shape", [(4, 1), (5, 37), (6, 128), (7, 1000)])  # T=1; T < one
# chunk of 128 steps; exactly one chunk; several chunks and a partial one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gae_and_returns_match_reference(dtype, shape, gamma, lam):
    from rlkernels.reference import advantage as ref

    r, v, mask = _scan_inputs(*shape, dtype, seed=shape[1], quarters=gamma == 1.0)
    adv, ret = ca.gae_forward(r, v, mask, gamma, lam)
    adv_r, ret_r = ref.gae(r.double().cpu(), v.double().cpu(), mask.cpu(), gamma, lam)
    assert adv.dtype == ret.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(adv.double().cpu(), adv_r, **_scan_tol(dtype))
    torch.testing.assert_close(ret.double().cpu(), ret_r, **_scan_tol(dtype))
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    g = ca.discounted_returns_forward(r, mask, gamma)
    g_r = ref.discounted_returns(r.double().cpu(), mask.cpu(), gamma)
    torch.testing.assert_close(g.double().cpu(), g_r, **_scan_tol(dtype))
    assert (g[~mask] == 0).all()


@gpu_cuda
def test_gae_masks_strides_and_nan():
    from rlkernels.reference import advantage as ref

    r, v, mask = _scan_inputs(6, 300, torch.float32, seed=3)
    # NaN and inf at masked positions must not leak (masked steps are never read)
    r = torch.where(mask, r, float("nan"))
    v = torch.where(mask, v, float("inf"))
    # non-contiguous inputs: transposed storage, a column slice; int and float masks
    r_nc = r.t().contiguous().t()
    v_nc = torch.cat([v, torch.zeros_like(v)], dim=1)[:, :300]
    for m in (mask, mask.to(torch.int64), mask.to(torch.float32) * 0.5,
              mask.t().contiguous().t()):
        adv, ret = ca.gae_forward(r_nc, v_nc, m, 0.99, 0.95)
        adv_r, ret_r = ref.gae(r.double().cpu(), v.double().cpu(), mask.cpu(), 0.99, 0.95)
        torch.testing.assert_close(adv.double().cpu(), adv_r, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ret.double().cpu(), ret_r, rtol=1e-5, atol=1e-5)
    # mixed dtypes: fp64 values make the outputs fp64
    adv64, _ = ca.gae_forward(r, v.double(), mask, 0.99, 0.95)
    assert adv64.dtype == torch.float64
    # a NaN at a valid position propagates backwards only (as the sequential reference)
    r2 = torch.where(mask, r, 0.0)
    r2[0, 150] = float("nan")
    mask[0, 150] = True
    adv, _ = ca.gae_forward(r2, torch.where(mask, v, 0.0), mask, 1.0, 1.0)
    assert adv[0, :151][mask[0, :151]].isnan().all()
    assert not adv[0, 151:].isnan().any()


@gpu_cuda
def test_gae_large_deterministic_batch_invariant():
    from rlkernels.reference import advantage as ref

    r, v, mask = _scan_inputs(1024, 4096, torch.float32, seed=5)  # 4M steps
    a1, t1 = ca.gae_forward(r, v, mask, 0.99, 0.95)
    a2, t2 = ca.gae_forward(r, v, mask, 0.99, 0.95)
    assert bit_equal(a1, a2) and bit_equal(t1, t2)
    rows = [0, 1, 2, 3, 517, 1023]
    adv_r, _ = ref.gae(r[rows].double().cpu(), v[rows].double().cpu(), mask[rows].cpu(), 0.99,
                       0.95)
    torch.testing.assert_close(a1[rows].double().cpu(), adv_r, rtol=1e-5, atol=1e-5)
    one, _ = ca.gae_forward(r[517:518].clone(), v[517:518].clone(), mask[517:518].clone(),
                            0.99, 0.95)
    assert bit_equal(one, a1[517:518])
    g1 = ca.discounted_returns_forward(r, mask, 0.99)
    assert bit_equal(g1, ca.discounted_returns_forward(r, mask, 0.99))


@gpu_cuda
def test_scans_empty_shapes():
    for b, t in ((0, 5), (3, 0)):
        r = torch.zeros(b, t, device="cuda")
        adv, ret = ca.gae_forward(r, r, r != 0, 0.9, 0.9)
        assert adv.shape == ret.shape == (b, t)
        assert ca.discounted_returns_forward(r, r != 0, 0.9).shape == (b, t)


# ============================================================================ masked_whiten

def _whiten_case(kind, n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64) * 3 + 1
    keep = torch.rand(n, generator=g) > 0.3
    if kind == "bool":
        m = keep
    elif kind == "int":
        m = keep.to(torch.int64)
    elif kind == "float":
        m = torch.rand(n, generator=g, dtype=torch.float64) * 2 * keep
    elif kind == "tiny":  # float weights summing to less than 1: max(c, 1) matters
        m = torch.rand(n, generator=g, dtype=torch.float64) * (0.5 / n) * keep
    elif kind == "all_masked":
        m = torch.zeros(n, dtype=torch.bool)
    else:  # one valid element
        m = torch.zeros(n, dtype=torch.bool)
        m[n // 2] = True
    return v, m


@gpu_cuda
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("kind", ["bool", "int", "float", "tiny", "all_masked", "one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_masked_whiten_matches_autograd_reference(dtype, kind, shift_mean, unbiased):
    from rlkernels.reference import advantage as ref

    v64, m = _whiten_case(kind, seed=len(kind))
    v64 = v64.view(10, 100)  # any shape: treated as flat
    m = m.view(10, 100)
    v = v64.to(dtype).cuda()
    mc = m.cuda() if m.dtype != torch.float64 else m.to(dtype).cuda()
    out, stats = ca.masked_whiten_forward(v, mc, shift_mean, 1e-8, unbiased)
    x = v.double().cpu().requires_grad_(True)
    out_r, stats_r = ref.masked_whiten_forward(x, mc.cpu(), shift_mean, 1e-8, unbiased)
    tol = _scan_tol(dtype)
    torch.testing.assert_close(out.double().cpu(), out_r.detach(), **tol)
    torch.testing.assert_close(stats.double().cpu(), stats_r.detach(),
                               rtol=tol["rtol"], atol=max(tol["atol"], 1e-6))
    g = torch.randn(10, 100, dtype=torch.float64)
    (g_r,) = torch.autograd.grad(out_r, x, g)
    grad = ca.masked_whiten_backward(g.to(out.dtype).cuda(), v, mc, stats, shift_mean,
                                     unbiased)
    assert grad.dtype == dtype
    scale = float(g_r.abs().max())
    torch.testing.assert_close(grad.double().cpu(), g_r,
                               rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))


@gpu_cuda
def test_masked_whiten_nan_outside_mask_large_and_deterministic():
    from rlkernels.reference import advantage as ref

    n = 3_000_000  # many blocks: the two-stage sums
    g = torch.Generator().manual_seed(1)
    v = (torch.randn(n, generator=g) * 2 + 0.5).cuda()
    m = (torch.rand(n, generator=g) > 0.5).cuda()
    v = torch.where(m, v, float("nan"))  # NaN where masked: must not leak into the stats
    out, stats = ca.masked_whiten_forward(v, m, True, 1e-8, True)
    assert torch.isfinite(stats).all() and torch.isfinite(out[m]).all()
    out2, stats2 = ca.masked_whiten_forward(v, m, True, 1e-8, True)
    assert bit_equal(out, out2) and bit_equal(stats, stats2)
    out_r, stats_r = ref.masked_whiten_forward(v.double(), m, True, 1e-8, True)
    torch.testing.assert_close(out[m].double(), out_r[m], rtol=1e-5, atol=1e-5)
    go = torch.where(m, torch.randn(n, device="cuda"), 0.0)  # the usual masked loss
    grad = ca.masked_whiten_backward(go, v, m, stats, True, True)
    assert torch.isfinite(grad[m]).all() and (grad[~m] == 0).all()
    assert bit_equal(grad, ca.masked_whiten_backward(go, v, m, stats, True, True))


@gpu_cuda
def test_masked_whiten_empty():
    v = torch.zeros(0, 3, device="cuda")
    out, stats = ca.masked_whiten_forward(v, v != 0, True, 1e-8, True)
    assert out.shape == (0, 3)
    torch.testing.assert_close(stats.cpu(), torch.tensor([0.0, 0.0, 1e4, 0.0]))
    assert ca.masked_whiten_backward(v, v, v != 0, stats, True, True).shape == (0, 3)


# ============================================================================== policy_loss

def _policy_inputs(b=4, t=37, seed=0, adv_2d=False):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, t if adv_2d else 1, generator=g, dtype=torch.float64)
    adv = adv if adv_2d else adv[:, 0]
    mask = torch.rand(b, t, generator=g) > 0.2
    mask[-1] = False  # an empty sequence
    ref = logp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ent = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    w = torch.rand(b, t, generator=g, dtype=torch.float64) + 0.5
    return [v.cuda() for v in (logp, old, adv, mask, ref, ent, w)]


OPTION_SETS = [
    dict(),
    dict(clip_high=0.28, dual_clip=3.0),
    dict(delta=1.5, agg="seq-mean-token-mean"),
    dict(ratio_level="sequence", agg="seq-mean-token-sum"),
    dict(loss="cispo", clip_high=0.3, agg="seq-mean-token-sum-norm"),
    dict(loss="reinforce", normalizer=40.0),
    dict(kl_coef=0.1, kl_estimator="k3"),
    dict(kl_coef=0.05, kl_estimator="k3+", entropy_coef=0.01),
    dict(kl_coef=0.05, kl_estimator="abs", is_weights=True),
]


@gpu_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adv_2d", [False, True])
@pytest.mark.parametrize("opts", OPTION_SETS, ids=str)
def test_policy_loss_matches_reference(opts, adv_2d, dtype):
    logp, old, adv, mask, ref, ent, w = _policy_inputs(adv_2d=adv_2d)
    kw = dict(opts)
    if kw.pop("is_weights", False):
        kw["is_weights"] = w
    if "kl_coef" in kw:
        kw["ref_logp"] = ref
    results = []
    for backend, dev, dt in (("cuda", "cuda", dtype), ("torch", "cpu", torch.float64)):
        lp = logp.to(dev, dt).requires_grad_(True)
        en = ent.to(dev, dt).requires_grad_(True)
        kws = {k: (v.to(dev, dt) if torch.is_tensor(v) else v) for k, v in kw.items()}
        loss, metrics = rlkernels.policy_loss(lp, old.to(dev, dt), adv.to(dev, dt),
                                              mask.to(dev), entropy=en, backend=backend, **kws)
        g_lp, g_en = torch.autograd.grad(loss, (lp, en))
        results.append((loss, metrics, g_lp, g_en))
    (l_c, m_c, g_c, e_c), (l_r, m_r, g_r, e_r) = results
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12,
                                                                         atol=1e-12)
    torch.testing.assert_close(l_c.double().cpu(), l_r, **tol)
    for k in m_r:
        torch.testing.assert_close(m_c[k].double().cpu(), m_r[k].double(), rtol=1e-5,
                                   atol=1e-6, msg=k)
    torch.testing.assert_close(g_c.double().cpu(), g_r, **tol)
    torch.testing.assert_close(e_c.double().cpu(), e_r, **tol)


@gpu_cuda
def test_policy_loss_deterministic_and_graph_capturable():
    from rlkernels._policy_options import PolicyOptions

    logp, old, adv, mask, ref, ent, w = [v.float() if v.is_floating_point() else v
                                         for v in _policy_inputs(b=64, t=1000)]
    o = PolicyOptions.from_kwargs(clip_high=0.28, kl_coef=0.1, entropy_coef=0.01)
    a = cp.policy_loss_forward(logp, old, adv, mask, None, ref, ent, None, o)
    b = cp.policy_loss_forward(logp, old, adv, mask, None, ref, ent, None, o)
    assert bit_equal(a[0], b[0]) and bit_equal(a[1], b[1])
    gl = torch.ones((), device="cuda")
    ga = cp.policy_loss_backward(gl, logp, old, adv, mask, None, ref, ent, None, o)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        cp.policy_loss_forward(logp, old, adv, mask, None, ref, ent, None, o)
        cp.policy_loss_backward(gl, logp, old, adv, mask, None, ref, ent, None, o)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        c = cp.policy_loss_forward(logp, old, adv, mask, None, ref, ent, None, o)
        gc = cp.policy_loss_backward(gl, logp, old, adv, mask, None, ref, ent, None, o)
    graph.replay()
    torch.cuda.synchronize()
    assert bit_equal(c[0], a[0]) and bit_equal(c[1], a[1])
    assert bit_equal(gc[0], ga[0]) and bit_equal(gc[1], ga[1])


@gpu_cuda
@pytest.mark.parametrize("inplace", [False, True])
def test_grpo_loss_matches_composition(inplace):
    b, t, v = 3, 9, 1031
    x = make_logits(b * t, v, torch.bfloat16, seed=4, device="cuda").view(b, t, v)
    tok = make_tokens(x, pad_every=5)
    mask = tok != -100
    old = rlkernels.token_logprobs(x.float(), tok, backend="torch").cuda() + 0.1
    adv = torch.tensor([1.0, -0.5, 2.0], device="cuda")
    kw = dict(clip_high=0.28, entropy_coef=0.01)
    xc = x.clone().requires_grad_(True)
    loss_c, met_c = rlkernels.grpo_loss(xc, tok, old, adv, mask, temperature=0.9,
                                        backend="cuda", **kw)
    (g_c,) = torch.autograd.grad(loss_c, xc)
    x64 = x.double().requires_grad_(True)
    loss_r, met_r = rlkernels.grpo_loss(x64, tok, old.double(), adv.double(), mask,
                                        temperature=0.9, backend="torch", **kw)
    (g_r,) = torch.autograd.grad(loss_r, x64)
    torch.testing.assert_close(loss_c.double(), loss_r, rtol=1e-5, atol=1e-6)
    for k in met_r:
        torch.testing.assert_close(met_c[k].double(), met_r[k].double(), rtol=1e-5, atol=1e-6)
    tol = 2 * torch.finfo(torch.bfloat16).eps * float(g_r.abs().max()) + 1e-7
    assert float((g_c.double() - g_r).abs().max()) <= tol
    if inplace:
        xi = x.clone().requires_grad_(True)
        y = xi * 1  # a non-leaf whose storage the in-place backward may overwrite
        loss_i, _ = rlkernels.grpo_loss(y, tok, old, adv, mask, temperature=0.9,
                                        inplace_backward=True, backend="cuda", **kw)
        loss_i.backward()
        assert float((xi.grad.double() - g_r).abs().max()) <= tol


@gpu_cuda
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("opts", [dict(dual_clip=1.5), dict(loss="cispo", clip_high=0.28),
                                  dict(loss="cispo", cispo_clip_low=True),
                                  dict(ratio_level="sequence", agg="seq-mean-token-mean")],
                         ids=str)
def test_policy_and_grpo_masked_positions_reach_no_metric(opts, poison):
    """Issue 16: NaN / +-inf at masked positions of every [B, T] input (and NaN logits in
    masked rows of grpo_loss) change neither the loss, nor a gradient, nor a metric."""
    logp, old, adv, mask, ref, ent, w = _policy_inputs(adv_2d=True)
    mask[0, :3] = False
    masked = ~mask

    def dirty(x):
        return torch.where(masked, torch.full_like(x, poison), x)

    kw = dict(opts, kl_coef=0.1, entropy_coef=0.01)
    out = []
    for inputs in ((logp, old, adv, ref, ent, w), tuple(map(dirty, (logp, old, adv, ref, ent,
                                                                     w)))):
        lp, o, a, r, e, iw = inputs
        lp = lp.clone().requires_grad_(True)
        e = e.clone().requires_grad_(True)
        loss, metrics = rlkernels.policy_loss(lp, o, a, mask, ref_logp=r, entropy=e,
                                              is_weights=iw, backend="cuda", **kw)
        out.append((loss, metrics, *torch.autograd.grad(loss, (lp, e))))
    (l0, m0, g0, e0), (l1, m1, g1, e1) = out
    assert bit_equal(l0, l1) and bit_equal(g0, g1) and bit_equal(e0, e1)
    for k in m0:
        assert torch.isfinite(m1[k]) and bit_equal(m0[k], m1[k]), k
    # the fused path: NaN logits in masked rows, poisoned old/ref/advantages/is_weights
    b, t = mask.shape
    x = make_logits(b * t, 97, torch.float32, seed=5, device="cuda").view(b, t, 97)
    tok = make_tokens(x, pad_every=0)
    res = []
    for xs, (o, a, r, iw) in ((x, (old, adv, ref, w)),
                              (torch.where(masked[..., None], float("nan"), x),
                               tuple(map(dirty, (old, adv, ref, w))))):
        xs = xs.clone().requires_grad_(True)
        loss, metrics = rlkernels.grpo_loss(xs, tok, o, a, mask, ref_logp=r, is_weights=iw,
                                            backend="cuda", **kw)
        res.append((loss, metrics, torch.autograd.grad(loss, xs)[0]))
    (l0, m0, g0), (l1, m1, g1) = res
    assert bit_equal(l0, l1)
    for k in m0:
        assert torch.isfinite(m1[k]) and bit_equal(m0[k], m1[k]), k
    assert bit_equal(g0[mask], g1[mask])


# --------------------------------------------------------------------------- any machine

@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-tensor error")
def test_launchers_reject_cpu_tensors():
    if rlkernels.cuda.load_extension() is None:
        pytest.skip("rlkernels._C not built")
    with pytest.raises(ValueError, match="rewards: expected a CUDA tensor"):
        ca.group_advantages_forward(torch.zeros(4), None, 2, "grpo", 1e-6, True)
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="rewards: expected a CUDA tensor"):
        ca.gae_forward(r, r, r != 0, 0.99, 0.95)
    with pytest.raises(ValueError, match="rewards: expected a CUDA tensor"):
        ca.discounted_returns_forward(r, r != 0, 0.99)
    with pytest.raises(ValueError, match="values: expected a CUDA tensor"):
        ca.masked_whiten_forward(r, r != 0, True, 1e-8, True)
    from rlkernels._policy_options import PolicyOptions

    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="logp: expected a CUDA tensor"):
        cp.policy_loss_forward(x, x, x[:, 0], x, None, None, None, None, PolicyOptions())
