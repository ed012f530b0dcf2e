"""Issue 21's held-out check: every verl 0.9.1 name the issue lists, called through verl's own
registries / modules before and after ``rlkernels.integrations.verl.patch()`` on random inputs:
values and gradients within 1e-5 (fp32), and an ``rlkernels::`` op in the profile of the
patched call. A name the bridge does not serve yet is an xfail that says so (not a pass).

Needs the real verl (skipped where it is absent, e.g. in CI). A CPU environment that runs it:
a venv with ``pip install --no-deps verl==0.9.1`` plus ``ray tensordict codetiming omegaconf
hydra-core orjson`` on top of this project's environment."""
import dataclasses

import pytest
import torch
from torch.profiler import profile

vca = pytest.importorskip("verl.trainer.ppo.core_algos",
                          reason="verl (and its import-time deps: ray, tensordict, ...) not installed")
vcfg = pytest.importorskip("verl.workers.config", reason="verl's config classes not importable")

from rlkernels.integrations import verl as rv  # noqa: E402

# the names (verl 0.9.1 registries), with the ones served before it
POLICY_LOSSES = ["vanilla", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro",
                 "dppo_tv", "dppo_kl", "cispo"]
ESTIMATORS = ["gae", "grpo", "rloo", "grpo_vectorized", "rloo_vectorized",
              "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax", "gpg", "opo",
              "grpo_passk", "gdpo"]
ROLLOUT = ["compute_rollout_correction_weights", "compute_rollout_rejection_mask",
           "compute_rollout_correction_and_rejection_mask"]

# the originals, captured before any patch()
ORIG_LOSS = dict(vca.POLICY_LOSS_REGISTRY)
ORIG_ADV = {str(getattr(k, "value", k)): v for k, v in vca.ADV_ESTIMATOR_REGISTRY.items()}


@pytest.fixture(autouse=True)
def _unpatch():
    yield
    rv.unpatch()


def _patched(registry, name, orig):
    rv.patch()
    fn = {str(getattr(k, "value", k)): v for k, v in registry.items()}.get(name)
    if fn is None or fn is orig:
        pytest.xfail(f"{name}: not served by rlkernels.integrations.verl yet")
    return fn


def _profiled(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and whether an ``rlkernels::`` op ran in it."""
    with profile() as prof:
        out = fn(*args, **kwargs)
    names = {e.name for e in prof.events()}
    return out, any(n.startswith("rlkernels::") for n in names)


def _close(got, want, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(torch.as_tensor(got).double(), torch.as_tensor(want).double(),
                               atol=atol, rtol=rtol, equal_nan=True)


def _actor_config(**policy_loss):
    loss_cfg = dataclasses.replace(vcfg.PolicyLossConfig(), **policy_loss)
    return vcfg.ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                            clip_ratio_low=0.2, clip_ratio_high=0.28, policy_loss=loss_cfg)


def _policy_inputs(seed=0, b=6, t=12):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    logp = old + torch.randn(b, t, generator=g) * 0.3
    adv = torch.randn(b, t, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.25).float()
    mask[:, 0] = 1
    return old, logp, adv, mask


LOSS_CONFIG = {"dro": dict(dro_beta=0.3), "clip_cov": dict(clip_cov_ratio=0.5, clip_cov_lb=0.05),
               "kl_cov": dict(kl_cov_ratio=0.1, ppo_kl_coef=0.7)}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_policy_loss(name, mode):
    orig = ORIG_LOSS[name]
    fn = _patched(vca.POLICY_LOSS_REGISTRY, name, orig)
    old, logp, adv, mask = _policy_inputs()
    # clip_cov: verl draws its tokens at random among the candidates, rlkernels takes the
    # largest covariances: a ratio that selects every candidate makes both the same set
    cfg = _actor_config(**LOSS_CONFIG.get(name, {}))
    x = logp.clone().requires_grad_(True)
    y = logp.clone().requires_grad_(True)
    want = orig(old, y, adv, mask, loss_agg_mode=mode, config=cfg)
    (got, used) = _profiled(fn, old, x, adv, mask, loss_agg_mode=mode, config=cfg)
    assert used, f"{name}: no rlkernels:: op in the profile of the patched call"
    _close(got[0], want[0])
    for key, value in want[1].items():
        assert key in got[1], f"{name}: metric {key} missing"
        _close(got[1][key], value)
    want[0].backward()
    got[0].backward()
    _close(x.grad, y.grad)


def _adv_inputs(seed=1, b=8, t=6):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.zeros(b, t)
    mask = torch.ones(b, t)
    mask[1, 4:] = 0
    rewards[torch.arange(b), torch.tensor([5, 3] + [5] * (b - 2))] = torch.randn(b, generator=g)
    index = ["a", "a", "a", "b", "b", "b", "c", "d"]  # groups of 3, 3 and two singletons
    values = torch.randn(b, t, generator=g)
    return rewards, mask, index, values


def _algo_config(**kw):
    from verl.trainer.config import AlgoConfig
    return AlgoConfig(**kw)


def _estimator_call(name, seed=1):
    """verl's arguments for estimator ``name`` on random inputs."""
    import numpy as np
    rewards, mask, index, values = _adv_inputs(seed)
    if name == "gae":
        return (rewards, values, mask), dict(gamma=0.99, lam=0.95)
    if name == "remax":
        base = torch.randn(rewards.shape[0], generator=torch.Generator().manual_seed(seed))
        return (rewards,), dict(reward_baselines=base, response_mask=mask)
    if name == "reinforce_plus_plus":
        g = torch.Generator().manual_seed(seed)
        dense = torch.randn(rewards.shape, generator=g) * mask
        return (dense, mask), dict(config=_algo_config(gamma=0.9))
    if name == "grpo_passk":  # verl requires >= 2 members per group
        index = ["a", "a", "a", "b", "b", "b", "c", "c"]
        return (rewards, mask), dict(index=np.array(index, dtype=object),
                                     config=_algo_config())
    return (rewards, mask), dict(index=np.array(index, dtype=object))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_advantage_estimator(name):
    orig = ORIG_ADV[name]
    fn = _patched(vca.ADV_ESTIMATOR_REGISTRY, name, orig)
    args, kwargs = _estimator_call(name)
    want = orig(*args, **kwargs)
    got, used = _profiled(fn, *args, **kwargs)
    assert used, f"{name}: no rlkernels:: op in the profile of the patched call"
    for a, b in zip(got, want):
        _close(a, b)


def test_gdpo_reward_components():
    """verl's GDPO with two reward components read from ``non_tensor_batch`` and weights."""
    import numpy as np
    orig = ORIG_ADV["gdpo"]
    fn = _patched(vca.ADV_ESTIMATOR_REGISTRY, "gdpo", orig)
    rewards, mask, index, _ = _adv_inputs(4)
    b, t = mask.shape
    g = torch.Generator().manual_seed(5)
    prompts = torch.zeros(b, 3, dtype=torch.long)
    attention = torch.cat([torch.ones(b, 3), mask], dim=1).long()
    batch = {"prompts": prompts, "attention_mask": attention}
    extra = {"fmt": torch.rand(b, generator=g).numpy(), "acc": torch.rand(b, generator=g).numpy()}
    cfg = _algo_config(gdpo_reward_keys=["fmt", "acc"], gdpo_reward_weights=[0.3, 1.0])
    kwargs = dict(index=np.array(index, dtype=object), config=cfg, non_tensor_batch=extra,
                  batch=batch)
    want = orig(rewards, mask, **kwargs)
    got, used = _profiled(fn, rewards, mask, **kwargs)
    assert used
    for a, b_ in zip(got, want):
        _close(a, b_)


@pytest.mark.parametrize("name", ROLLOUT)
def test_rollout_correction(name):
    import verl.trainer.ppo.rollout_corr_helper as rch
    orig = getattr(rch, name)
    rv.patch()
    if getattr(rch, name) is orig:
        pytest.xfail(f"{name}: not served by rlkernels.integrations.verl yet")
    pytest.fail(f"{name}: bridged, but this check has no inputs for it yet")
