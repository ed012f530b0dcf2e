"""rlkernels.integrations.verl against naive re-implementations of verl's documented formulas
(written here from verl's docs/semantics, not copied), including edge cases."""
import sys
import types
from collections import defaultdict

import numpy as np
import pytest
import torch

from rlkernels.integrations import verl as rv

torch.manual_seed(0)


def _masked_mean(x, m):
    return (x * m).sum() / (m.sum() + 1e-8)


# ------------------------------------------------------------------ naive verl formulas
def naive_kl(lp, ref, name):
    straight = name.endswith("+") and name not in ("mse+", "k2+")
    base = name.rstrip("+")
    if base in ("kl", "k1"):
        f = lp - ref
    elif base == "abs":
        f = (lp - ref).abs()
    elif base in ("mse", "k2"):
        f = 0.5 * (lp - ref) ** 2
    else:
        kl = torch.clamp(ref - lp, -20, 20)
        f = torch.clamp(torch.exp(kl) - kl - 1, -10, 10)
    if straight:
        b = 0.5 * (lp - ref) ** 2
        return b - b.detach() + f.detach()
    return f


def naive_agg(L, m, mode):
    if mode == "token-mean":
        return (L * m).sum() / m.sum()
    if mode == "seq-mean-token-sum":
        s = (L * m).sum(-1)
        sm = (m.sum(-1) > 0).float()
        return (s * sm).sum() / sm.sum()
    if mode == "seq-mean-token-mean":
        c = m.sum(-1)
        s = (L * m).sum(-1) / (c + 1e-8)
        sm = (c > 0).float()
        return (s * sm).sum() / sm.sum()
    return (L * m).sum() / m.shape[-1]


def naive_ppo(old, lp, A, m, mode, cl, ch, c):
    nk = torch.clamp(lp - old, -20, 20)
    r = torch.exp(nk)
    ppo_kl = _masked_mean(-nk, m)
    l1 = -A * r
    l2 = -A * torch.clamp(r, 1 - cl, 1 + ch)
    c1 = torch.maximum(l1, l2)
    clipfrac = _masked_mean(torch.gt(l2, l1).float(), m)
    l3 = -A * c
    c2 = torch.min(l3, c1)
    lower = _masked_mean(torch.gt(c1, l3).float() * (A < 0).float(), m)
    L = torch.where(A < 0, c2, c1)
    return naive_agg(L, m, mode), clipfrac, ppo_kl, lower


def naive_grpo(rew, m, index, eps=1e-6, norm=True):
    scores = rew.sum(-1).clone()
    groups = defaultdict(list)
    for i in range(len(scores)):
        groups[index[i]].append(scores[i])
    mean, std = {}, {}
    for k, v in groups.items():
        if len(v) == 1:
            mean[k], std[k] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            t = torch.stack(v)
            mean[k], std[k] = t.mean(), t.std()
    for i in range(len(scores)):
        k = index[i]
        scores[i] = (scores[i] - mean[k]) / (std[k] + eps) if norm else scores[i] - mean[k]
    return scores.unsqueeze(-1) * m


def naive_rloo(rew, m, index):
    scores = rew.sum(-1).clone()
    groups = defaultdict(list)
    for i in range(len(scores)):
        groups[index[i]].append(scores[i])
    mean = {k: torch.stack(v).mean() for k, v in groups.items()}  # before any update
    for i in range(len(scores)):
        n = len(groups[index[i]])
        if n > 1:
            mu = mean[index[i]]
            scores[i] = scores[i] * n / (n - 1) - mu * n / (n - 1)
    return scores.unsqueeze(-1) * m


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_and_entropy(dtype):
    logits = (torch.randn(3, 5, 37) * 3).to(dtype)
    labels = torch.randint(0, 37, (3, 5))
    ref = torch.gather(logits.float().log_softmax(-1), -1, labels[..., None])[..., 0]
    out = rv.logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    labels[0, 0] = -100  # flash-attn convention: ignored label gives 0
    assert rv.logprobs_from_logits(logits, labels)[0, 0] == 0
    z = logits.float()
    h = torch.logsumexp(z, -1) - (z.softmax(-1) * z).sum(-1)
    e = rv.entropy_from_logits(logits)
    assert e.dtype == dtype
    torch.testing.assert_close(e.float(), h.to(dtype).float(), atol=1e-5, rtol=1e-2)


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
                                  "k1+", "abs+", "k2+", "k3+", "low_var_kl+"])
def test_kl_penalty(name):
    lp = torch.randn(4, 9, dtype=torch.float64) * 3
    ref = torch.randn(4, 9, dtype=torch.float64) * 3
    lp[0, :4] = torch.tensor([30.0, -30.0, -float("inf"), 5.0])  # |d| > 20, infinite, clamp 10
    ref[0, :4] = torch.tensor([0.0, 0.0, 0.0, 25.0 - 20.0 + 5.0])
    lp.requires_grad_(True)
    lp2 = lp.detach().clone().requires_grad_(True)
    got = rv.kl_penalty(lp, ref, name)
    want = naive_kl(lp2, ref, name)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, equal_nan=True)
    fin = torch.isfinite(lp.detach())
    got.masked_fill(~fin, 0).sum().backward()
    want.masked_fill(~fin, 0).sum().backward()
    torch.testing.assert_close(lp.grad[fin], lp2.grad[fin], atol=1e-10, rtol=1e-10)


def test_kl_penalty_unknown():
    with pytest.raises(NotImplementedError):
        rv.kl_penalty(torch.zeros(2), torch.zeros(2), "bogus")


MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("mode", MODES)
def test_agg_loss(mode):
    L = torch.randn(5, 7, dtype=torch.float64)
    m = (torch.rand(5, 7) > 0.4).double()
    m[2] = 0  # an empty sequence
    torch.testing.assert_close(rv.agg_loss(L, m, mode), naive_agg(L, m, mode))
    assert rv.agg_loss(L, torch.zeros_like(m), mode) == 0  # all-masked: 0 (verl: NaN)
    with pytest.raises(ValueError):
        rv.agg_loss(L, m, "bogus")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clips", [(0.2, 0.2, 3.0), (0.2, 0.28, 2.0)])
def test_policy_loss_vanilla(mode, clips):
    cl, ch, c = clips
    B, T = 6, 8
    old = torch.randn(B, T, dtype=torch.float64) * 0.5 - 2
    lp = (old + torch.randn(B, T, dtype=torch.float64) * 0.6).requires_grad_(True)
    lp[0, 0].data.fill_(old[0, 0] + 40)  # log-ratio clamp at 20
    A = torch.randn(B, 1, dtype=torch.float64).expand(B, T).contiguous()
    m = (torch.rand(B, T) > 0.3).double()
    m[3] = 0  # empty sequence
    cfg = {"clip_ratio": 0.2, "clip_ratio_low": cl, "clip_ratio_high": ch, "clip_ratio_c": c}
    got = rv.compute_policy_loss_vanilla(old, lp, A, m, mode, config=cfg)
    lp2 = lp.detach().clone().requires_grad_(True)
    want = naive_ppo(old, lp2, A, m, mode, cl, ch, c)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-7, rtol=1e-6)
    got[0].backward()
    want[0].backward()
    torch.testing.assert_close(lp.grad, lp2.grad, atol=1e-9, rtol=1e-7)
    kw = rv.compute_policy_loss_vanilla(old, lp.detach(), A, m, mode, clip_ratio=0.2,
                                        clip_ratio_low=cl, clip_ratio_high=ch, clip_ratio_c=c)
    old_sig = rv.compute_policy_loss(old, lp.detach(), A, m, cliprange=0.2, cliprange_low=cl,
                                     cliprange_high=ch, clip_ratio_c=c, loss_agg_mode=mode)
    for a, b, w in zip(kw, old_sig, want):
        torch.testing.assert_close(a.double(), w.double(), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(b.double(), w.double(), atol=1e-7, rtol=1e-6)
    with pytest.raises(ValueError):
        rv.compute_policy_loss_vanilla(old, lp, A, m, mode, clip_ratio_c=1.0)


def _rewards():
    B, T = 9, 5
    m = (torch.rand(B, T) > 0.3).float()
    m[4] = 0  # empty response
    rew = torch.zeros(B, T)
    rew[torch.arange(B), 2] = torch.randn(B)
    index = np.array(["a", "b", "a", "c", "b", "a", "d", "d", "b"], dtype=object)  # c: singleton
    return rew, m, index


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_advantage(norm):
    rew, m, index = _rewards()
    adv, ret = rv.compute_grpo_outcome_advantage(rew, m, index, norm_adv_by_std_in_grpo=norm)
    want = naive_grpo(rew, m, index, norm=norm)
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=1e-5)
    assert ret is adv or torch.equal(ret, adv)
    assert (adv[4] == 0).all()
    # all-equal group -> 0; integer ids in a tensor work as well
    rew2 = torch.ones(4, 3)
    a2, _ = rv.compute_grpo_outcome_advantage(rew2, torch.ones(4, 3), torch.tensor([7, 7, 9, 9]))
    assert (a2 == 0).all()


def test_rloo_advantage():
    rew, m, index = _rewards()
    adv, _ = rv.compute_rloo_outcome_advantage(rew, m, index)
    torch.testing.assert_close(adv, naive_rloo(rew, m, index), atol=1e-6, rtol=1e-5)


def test_patch_with_a_stand_in_verl(monkeypatch):
    """verl is not installable here: build stand-in modules with its layout and registries and
    check that patch() swaps every reference and unpatch() restores them exactly."""
    def f_lp(logits, labels, inplace_backward=True):
        return None

    def f_pl(*a, **k):
        return None

    tf = types.ModuleType("verl.utils.torch_functional")
    tf.logprobs_from_logits = f_lp
    tf.entropy_from_logits = lambda logits: None
    ca = types.ModuleType("verl.trainer.ppo.core_algos")
    for n in ("kl_penalty", "agg_loss", "compute_grpo_outcome_advantage",
              "compute_rloo_outcome_advantage"):
        setattr(ca, n, (lambda *a, **k: None))
    ca.compute_policy_loss_vanilla = f_pl
    ca.POLICY_LOSS_REGISTRY = {"vanilla": f_pl}
    ca.ADV_ESTIMATOR_REGISTRY = {"grpo": ca.compute_grpo_outcome_advantage}
    user = types.ModuleType("verl.workers.actor")
    user.logprobs_from_logits = f_lp
    mods = {"verl": types.ModuleType("verl"), "verl.utils": types.ModuleType("verl.utils"),
            "verl.trainer": types.ModuleType("verl.trainer"),
            "verl.trainer.ppo": types.ModuleType("verl.trainer.ppo"),
            "verl.utils.torch_functional": tf, "verl.trainer.ppo.core_algos": ca,
            "verl.workers.actor": user}
    for k, v in mods.items():
        monkeypatch.setitem(sys.modules, k, v)
    grpo = ca.compute_grpo_outcome_advantage
    rv.patch()
    try:
        assert tf.logprobs_from_logits is rv.logprobs_from_logits
        assert user.logprobs_from_logits is rv.logprobs_from_logits
        assert ca.POLICY_LOSS_REGISTRY["vanilla"] is rv.compute_policy_loss_vanilla
        assert ca.ADV_ESTIMATOR_REGISTRY["grpo"] is rv.compute_grpo_outcome_advantage
        assert ca.kl_penalty is rv.kl_penalty and rv.is_patched()
    finally:
        rv.unpatch()
    assert tf.logprobs_from_logits is f_lp and user.logprobs_from_logits is f_lp
    assert ca.POLICY_LOSS_REGISTRY["vanilla"] is f_pl
    assert ca.ADV_ESTIMATOR_REGISTRY["grpo"] is grpo and ca.compute_grpo_outcome_advantage is grpo
    assert not rv.is_patched()


def test_patch_without_verl():
    if "verl" in sys.modules:
        pytest.skip("verl importable")
    try:
        import verl  # noqa: F401
        pytest.skip("verl importable")
    except ImportError:
        pass
    with pytest.raises(ImportError):
        rv.patch()
