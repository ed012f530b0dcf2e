"""``rollout_logp=`` / ``rollout_options=`` of the policy losses (SPEC 6): the loss equals the
same loss given ``rollout_correction``'s weights as ``is_weights`` (times the caller's) and its
kept tokens as the mask, with its metrics as ``"rollout/<name>"``; every policy op passes it
through."""
import pytest
import torch

import rlkernels as rk

B, T, V, H = 4, 7, 13, 6
OPTIONS = [None,
           dict(level="sequence", mode="mask", threshold_low=0.2, threshold_high=5.0),
           dict(level="geometric", threshold_high=1.5, reject="seq_max_k2",
                reject_threshold=0.2),
           dict(level="token", reject="opsm", reject_threshold=0.02)]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout = old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, 1] = False
    is_w = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    return old, logp, rollout, adv, mask, is_w


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("opts", range(len(OPTIONS)))
def test_policy_loss_rollout(backend, opts):
    old, logp, rollout, adv, mask, is_w = _inputs()
    ro = OPTIONS[opts]
    x = logp.clone().requires_grad_(True)
    y = logp.clone().requires_grad_(True)
    kw = dict(loss="ppo", clip_high=0.28, is_weights=is_w, backend=backend)
    loss, m = rk.policy_loss(x, old, adv, mask, rollout_logp=rollout, rollout_options=ro, **kw)
    opsm = (ro or {}).get("reject") == "opsm"
    w, keep, rm = rk.rollout_correction(old, rollout, mask, backend=backend,
                                        advantages=adv if opsm else None, **(ro or {}))
    assert 0 < int((mask & keep).sum()) < int(mask.sum()) or not (ro or {}).get("reject")
    kw["is_weights"] = w * is_w
    want, m_want = rk.policy_loss(y, old, adv, mask & keep, **kw)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for k, v in m_want.items():
        torch.testing.assert_close(m[k], v)
    for k, v in rm.items():
        torch.testing.assert_close(m[f"rollout/{k}"], v)
    g, = torch.autograd.grad(loss, x)
    g_want, = torch.autograd.grad(want, y)
    torch.testing.assert_close(g, g_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_losses_pass_rollout_through(backend):
    old, _, rollout, adv, mask, _ = _inputs(1)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    ro = OPTIONS[2]
    w, keep, rm = rk.rollout_correction(old, rollout, mask, backend=backend, **ro)
    loss, m = rk.grpo_loss(logits, tokens, old, adv, mask, rollout_logp=rollout,
                           rollout_options=ro, backend=backend)
    want, _ = rk.grpo_loss(logits, tokens, old, adv, mask & keep, is_weights=w,
                           backend=backend)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m["rollout/weight_mean"], rm["weight_mean"])
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    loss, m = rk.linear_grpo_loss(hidden, weight, tokens, old, adv, mask, rollout_logp=rollout,
                                  rollout_options=ro, backend=backend)
    want, _ = rk.linear_grpo_loss(hidden, weight, tokens, old, adv, mask & keep, is_weights=w,
                                  backend=backend)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert "rollout/k1" in m


def test_rollout_errors():
    old, logp, rollout, adv, mask, _ = _inputs()
    with pytest.raises(TypeError, match="rollout_options: unexpected key"):
        rk.policy_loss(logp, old, adv, mask, rollout_logp=rollout,
                       rollout_options={"lvl": "token"})
    with pytest.raises(TypeError, match="rollout_options: expected None or a dict"):
        rk.policy_loss(logp, old, adv, mask, rollout_logp=rollout, rollout_options="token")
    with pytest.raises(ValueError, match="rollout_options: expected None without"):
        rk.policy_loss(logp, old, adv, mask, rollout_options={})
    with pytest.raises(ValueError, match="level"):
        rk.policy_loss(logp, old, adv, mask, rollout_logp=rollout,
                       rollout_options={"level": "tokens"})
    with pytest.raises(ValueError):  # the rollout log-probs' shape
        rk.policy_loss(logp, old, adv, mask, rollout_logp=rollout[:, :3])
