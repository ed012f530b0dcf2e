"""The cuda backend's group_advantages (csrc/advantage.cu) and policy_loss / grpo_loss
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


# --------------------------------------------------------------------------- any machine

@pytest.mark.skipif(HAS_GPU, reason="checks the CPU-tensor error")
def test_launchers_reject_cpu_tensors():
    if rlkernels.cuda.load_extension() is None:
        pytest.skip("rlkernels._C not built")
    with pytest.raises(ValueError, match="rewards: expected a CUDA tensor"):
        ca.group_advantages_forward(torch.zeros(4), None, 2, "grpo", 1e-6, True)
    from rlkernels._policy_options import PolicyOptions

    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="logp: expected a CUDA tensor"):
        cp.policy_loss_forward(x, x, x[:, 0], x, None, None, None, None, PolicyOptions())
