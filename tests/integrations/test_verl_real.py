"""rlkernels.integrations.verl against the REAL verl functions (skipped where verl is absent,
e.g. in CI). Tested with verl 0.9.1 (CPU, no flash-attn: verl's logprobs use its torch path)."""
import warnings

import numpy as np
import pytest
import torch

vtf = pytest.importorskip("verl.utils.torch_functional",
                          reason="verl (and its import-time deps: ray, tensordict, ...) not installed")
vca = pytest.importorskip("verl.trainer.ppo.core_algos",
                          reason="verl (and its import-time deps: ray, tensordict, ...) not installed")
OmegaConf = pytest.importorskip("omegaconf", reason="omegaconf (a verl dependency) not installed").OmegaConf

from rlkernels.integrations import verl as rv  # noqa: E402

# the originals, captured before any patch()
V = {n: getattr(vtf, n) for n in ("logprobs_from_logits", "entropy_from_logits")}
V.update({n: getattr(vca, n) for n in (
    "kl_penalty", "agg_loss", "compute_policy_loss", "compute_policy_loss_vanilla",
    "compute_policy_loss_cispo", "compute_gae_advantage_return",
    "compute_grpo_outcome_advantage", "compute_rloo_outcome_advantage")})


def _verl_norm_seq_mean() -> bool:
    """Whether the installed verl's "seq-mean-token-sum-norm" averages over sequences (>= 0.9),
    probed from its behaviour: two sequences of one token of loss 1 give 1, earlier verl 2."""
    v = V["agg_loss"](torch.ones(2, 1), torch.ones(2, 1), "seq-mean-token-sum-norm")
    return abs(float(v) - 1.0) < 1e-6


NORM_SEQ_MEAN = _verl_norm_seq_mean()
MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
         "seq-mean-token-sum-norm"]


@pytest.fixture(autouse=True)
def _unpatch():
    yield
    rv.unpatch()


def close(got, want, atol=1e-6, rtol=1e-5):
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True)
    return (got.double() - want.double()).abs().nan_to_num().max().item()


# ---------------------------------------------------------------- torch_functional
def test_logprobs_from_logits():
    if getattr(vtf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False):
        pytest.skip("flash-attn present: verl would use its cross-entropy kernel")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 101, generator=g) * 4
    labels = torch.randint(0, 101, (3, 7), generator=g)
    got, want = rv.logprobs_from_logits(logits, labels), V["logprobs_from_logits"](logits, labels)
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    close(got, want, atol=1e-5)
    # 2-D logits, and the gradient
    x = logits[0].clone().requires_grad_(True)
    y = logits[0].clone().requires_grad_(True)
    a, b = rv.logprobs_from_logits(x, labels[0]), V["logprobs_from_logits"](y, labels[0])
    close(a, b, atol=1e-5)
    a.sum().backward()
    b.sum().backward()
    close(x.grad, y.grad, atol=1e-6)


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 257, generator=g) * 3
    got, want = rv.entropy_from_logits(logits), V["entropy_from_logits"](logits)
    assert got.dtype == want.dtype
    close(got, want, atol=1e-5)
    peaked = torch.full((2, 9), -1e4)
    peaked[:, 3] = 0  # a point mass: entropy 0
    close(rv.entropy_from_logits(peaked), V["entropy_from_logits"](peaked), atol=1e-6)


# ---------------------------------------------------------------- kl_penalty
@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3",
                                  "k1+", "abs+", "k2+", "mse+", "k3+", "low_var_kl+"])
def test_kl_penalty(name):
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(4, 9, generator=g) * 3
    ref = torch.randn(4, 9, generator=g) * 3
    # |d| > 20 on both sides (the [-20, 20] clamp), the [-10, 10] output clamp, d = 0
    lp[0, :5] = torch.tensor([30.0, -30.0, 5.0, -8.0, 1.5])
    ref[0, :5] = torch.tensor([0.0, 0.0, 10.0, -8.0 - 14.0, 1.5])
    x, y = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    got, want = rv.kl_penalty(x, ref, name), V["kl_penalty"](y, ref, name)
    assert got.dtype == want.dtype
    close(got, want, atol=1e-5)
    got.sum().backward()
    want.sum().backward()
    close(x.grad, y.grad, atol=1e-5)


def test_kl_penalty_unknown_and_full():
    for name in ("bogus", "full"):
        with pytest.raises(NotImplementedError):
            V["kl_penalty"](torch.zeros(2), torch.zeros(2), name)
        with pytest.raises(NotImplementedError):
            rv.kl_penalty(torch.zeros(2), torch.zeros(2), name)


# ---------------------------------------------------------------- agg_loss
def _loss_and_mask(seed=3):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(6, 8, generator=g)
    m = (torch.rand(6, 8, generator=g) > 0.4).float()
    m[2] = 0  # an empty sequence
    return L, m


@pytest.mark.parametrize("mode", MODES)
def test_agg_loss(mode):
    L, m = _loss_and_mask()
    close(rv.agg_loss(L, m, mode), V["agg_loss"](L, m, mode))
    close(rv.agg_loss(L, m.bool(), mode), V["agg_loss"](L, m.bool(), mode))
    # global batch info (data parallel) and the scale factor
    kw = dict(dp_size=4, batch_num_tokens=97, global_batch_size=21, loss_scale_factor=16)
    close(rv.agg_loss(L, m, mode, **kw), V["agg_loss"](L, m, mode, **kw))
    kw = dict(loss_scale_factor=5)
    close(rv.agg_loss(L, m, mode, **kw), V["agg_loss"](L, m, mode, **kw))


@pytest.mark.parametrize("mode", MODES)
def test_agg_loss_all_masked(mode):
    """Documented difference: an all-masked batch gives 0 where verl gives NaN (0/0)."""
    L, m = _loss_and_mask()
    z = torch.zeros_like(m)
    want = V["agg_loss"](L, z, mode)
    got = rv.agg_loss(L, z, mode)
    assert got == 0
    if mode in ("token-sum",) or (mode == "seq-mean-token-sum-norm" and not NORM_SEQ_MEAN):
        assert want == 0
    else:
        assert torch.isnan(want)


def test_agg_loss_errors():
    L, m = _loss_and_mask()
    with pytest.raises(ValueError):
        V["agg_loss"](L, m, "bogus")
    with pytest.raises(ValueError):
        rv.agg_loss(L, m, "bogus")
    for mode in ("token-mean", "seq-mean-token-mean"):  # dp_size > 1 needs the global counts
        with pytest.raises(ValueError):
            V["agg_loss"](L, m, mode, dp_size=2)
        with pytest.raises(ValueError):
            rv.agg_loss(L, m, mode, dp_size=2)


def test_norm_mode_follows_the_installed_verl_with_or_without_patch():
    """Issue 16: the version-dependent mode follows the installed verl's version, read at
    import (VERL_VERSION), whether or not patch() ran; verl_version= overrides it."""
    L, m = _loss_and_mask()
    assert rv._norm_seq_mean(None) == NORM_SEQ_MEAN
    want = V["agg_loss"](L, m, "seq-mean-token-sum-norm")
    before = rv.agg_loss(L, m, "seq-mean-token-sum-norm")
    close(before, want)
    rv.patch()
    assert torch.equal(rv.agg_loss(L, m, "seq-mean-token-sum-norm"), before)
    close(vca.agg_loss(L, m, "seq-mean-token-sum-norm"), want)
    rv.unpatch()
    assert torch.equal(rv.agg_loss(L, m, "seq-mean-token-sum-norm"), before)
    torch.testing.assert_close(rv.agg_loss(L, m, "seq-mean-token-sum-norm", verl_version="0.8"),
                               (L * m).sum() / m.shape[-1])


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", MODES)
def test_agg_loss_masked_values(mode, poison):
    """Issue 16: NaN / inf at masked positions never reach the bridge's result. verl 0.9.1
    selects them away in token-mean / token-sum (equal results); its seq-mean-* modes multiply
    by the mask first and let them through (documented difference: the bridge stays finite,
    equal to verl on the clean inputs)."""
    L, m = _loss_and_mask()
    dirty = torch.where(m != 0, L, torch.full_like(L, poison))
    got = rv.agg_loss(dirty, m, mode)
    close(got, V["agg_loss"](L, m, mode))
    want = V["agg_loss"](dirty, m, mode)
    if mode in ("token-mean", "token-sum"):
        close(got, want)
    else:
        assert not torch.isfinite(want)


# ---------------------------------------------------------------- vanilla PPO loss
def _ppo_inputs(seed=4, B=6, T=8):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g) * 0.5 - 2
    lp = old + torch.randn(B, T, generator=g) * 0.6
    lp[0, 0] = old[0, 0] + 40  # log-ratio clamp at +20
    lp[0, 1] = old[0, 1] - 40  # and -20
    lp[1, :4] = old[1, :4] + 1.5  # ratio 4.5 with A < 0: beyond the dual clip c = 3
    A = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    A[1] = -2.0
    A[4] = 0.0
    m = (torch.rand(B, T, generator=g) > 0.3).float()
    m[3] = 0  # an empty sequence
    m[1] = 1
    return old, lp, A, m


def _cfg(cl, ch, c, info=None):
    return OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": cl, "clip_ratio_high": ch,
                             "clip_ratio_c": c, "global_batch_info": info or {}})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clips", [(0.2, 0.2, 3.0), (0.2, 0.28, 1.5), (None, None, 10.0)])
@pytest.mark.parametrize("info", [None, dict(dp_size=2, batch_num_tokens=61, global_batch_size=11,
                                              loss_scale_factor=12)])
def test_policy_loss_vanilla(mode, clips, info):
    old, lp, A, m = _ppo_inputs()
    cfg = _cfg(*clips, info)
    x, y = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    want_loss, want_metrics = V["compute_policy_loss_vanilla"](old, y, A, m, mode, cfg)
    got = rv.compute_policy_loss_vanilla(old, x, A, m, mode, config=cfg)
    close(got[0], want_loss, atol=1e-6)
    for key, value in zip(("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"), got[1:]):
        assert value.item() == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-7), key
    got[0].backward()
    want_loss.backward()
    close(x.grad, y.grad, atol=1e-7)
    # the registry form (verl >= 0.6): (loss, metrics dict of floats)
    loss2, metrics2 = rv.compute_policy_loss_vanilla_metrics(old, lp, A, m, mode, cfg)
    close(loss2, want_loss.detach(), atol=1e-6)
    assert set(metrics2) == set(want_metrics)
    for key in want_metrics:
        assert isinstance(metrics2[key], float)
        assert metrics2[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-7)


def test_policy_loss_dual_clip_metrics_nonzero():
    old, lp, A, m = _ppo_inputs()
    _, metrics = V["compute_policy_loss_vanilla"](old, lp, A, m, "token-mean", _cfg(0.2, 0.2, 3.0))
    assert metrics["actor/pg_clipfrac_lower"] > 0 and metrics["actor/pg_clipfrac"] > 0
    _, metrics2 = rv.compute_policy_loss_vanilla_metrics(old, lp, A, m, "token-mean",
                                                         _cfg(0.2, 0.2, 3.0))
    assert metrics2 == pytest.approx(metrics, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("mode", ["token-mean", "token-sum"])
def test_policy_loss_vanilla_nan_at_masked_positions(mode):
    """Issue 16: NaN log-probs at masked positions: verl's ppo_kl stays finite and so does the
    bridge's (it used to be NaN); the loss and gradient equal verl's."""
    old, lp, A, m = _ppo_inputs()
    lp = torch.where(m != 0, lp, torch.full_like(lp, float("nan")))
    old = torch.where(m != 0, old, torch.full_like(old, float("nan")))
    cfg = _cfg(0.2, 0.28, 3.0)
    x, y = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    want, want_m = V["compute_policy_loss_vanilla"](old, y, A, m, mode, cfg)
    got, got_m = rv.compute_policy_loss_vanilla_metrics(old, x, A, m, mode, cfg)
    assert all(np.isfinite(v) for v in want_m.values())
    assert got_m == pytest.approx(want_m, rel=1e-5, abs=1e-7)
    close(got, want, atol=1e-6)
    got.backward()
    want.backward()
    close(x.grad, y.grad.nan_to_num(), atol=1e-7)  # verl's masked gradient is NaN * 0


def test_policy_loss_rollout_is_weights():
    old, lp, A, m = _ppo_inputs()
    w = torch.rand(lp.shape, generator=torch.Generator().manual_seed(5)) * 2
    cfg = _cfg(0.2, 0.28, 3.0)
    want, _ = V["compute_policy_loss_vanilla"](old, lp, A, m, "seq-mean-token-mean", cfg, w)
    got, _ = rv.compute_policy_loss_vanilla_metrics(old, lp, A, m, "seq-mean-token-mean", cfg, w)
    close(got, want, atol=1e-6)


def test_policy_loss_bad_clip_ratio_c():
    old, lp, A, m = _ppo_inputs()
    with pytest.raises(AssertionError):
        V["compute_policy_loss_vanilla"](old, lp, A, m, "token-mean", _cfg(0.2, 0.2, 1.0))
    with pytest.raises(ValueError):
        rv.compute_policy_loss_vanilla(old, lp, A, m, "token-mean", _cfg(0.2, 0.2, 1.0))


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_deprecated_signature(mode):
    old, lp, A, m = _ppo_inputs()
    kw = dict(cliprange=0.2, cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=3.0,
              loss_agg_mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = V["compute_policy_loss"](old, lp, A, m, **kw)
    got = rv.compute_policy_loss(old, lp, A, m, **kw)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        close(g, w, atol=1e-6)


# ---------------------------------------------------------------- cispo
def _actor_cfg(low, high, info=None):
    from verl.workers.config import ActorConfig
    return ActorConfig(strategy="fsdp", clip_ratio=0.2, clip_ratio_low=low, clip_ratio_high=high,
                       rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                       global_batch_info=info or {})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clips", [(0.2, 0.28), (0.5, 0.2), (1.2, 0.3)])
@pytest.mark.parametrize("info", [None, dict(dp_size=2, batch_num_tokens=61, global_batch_size=11,
                                              loss_scale_factor=12)])
def test_policy_loss_cispo(mode, clips, info):
    """Issue 16: verl's cispo clamps the ratio below at 1 - clip_ratio_low; the bridge too."""
    old, lp, A, m = _ppo_inputs()
    lp = lp.clone()
    lp[2, :4] = old[2, :4] - 1.0  # ratio 0.37: below every lower bound but the last
    cfg = _actor_cfg(*clips, info)
    x, y = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    got, got_m = rv.compute_policy_loss_cispo(old, x, A, m, mode, cfg)
    want, want_m = V["compute_policy_loss_cispo"](old, y, A, m, mode, cfg)
    close(got, want, atol=1e-6)
    assert got_m == pytest.approx(want_m, rel=1e-5, abs=1e-7)
    got.backward()
    want.backward()
    close(x.grad, y.grad, atol=1e-7)
    w = torch.rand(lp.shape, generator=torch.Generator().manual_seed(7)) * 2
    close(rv.compute_policy_loss_cispo(old, lp, A, m, mode, cfg, w)[0],
          V["compute_policy_loss_cispo"](old, lp, A, m, mode, cfg, w)[0], atol=1e-6)


# ---------------------------------------------------------------- GAE
@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.7, 0.0)])
def test_gae_advantage_return(gamma, lam):
    """Issue 16: verl carries the running advantage through masked positions (rlkernels' gae
    gives 0 there); the bridge matches verl at every position, masked ones included."""
    g = torch.Generator().manual_seed(8)
    B, T = 6, 11
    rew = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    m = (torch.rand(B, T, generator=g) > 0.3).float()
    m[0, 3:7] = 0  # observation tokens between two turns
    m[1, -4:] = 0  # padding
    m[2, :2] = 0
    got = rv.compute_gae_advantage_return(rew, values, m, gamma, lam)
    want = V["compute_gae_advantage_return"](rew, values, m, gamma, lam)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        close(a, b, atol=2e-6)
    # verl takes gamma / lam as tensors too
    close(rv.compute_gae_advantage_return(rew, values, m.bool(), torch.tensor(gamma),
                                          torch.tensor(lam))[0], want[0], atol=2e-6)


# ---------------------------------------------------------------- outcome advantages
def _rewards(seed=6):
    g = torch.Generator().manual_seed(seed)
    B, T = 10, 5
    m = (torch.rand(B, T, generator=g) > 0.3).float()
    m[4] = 0  # an empty response
    rew = torch.zeros(B, T)
    rew[torch.arange(B), 2] = torch.randn(B, generator=g)
    index = np.array(["a", "b", "a", "c", "b", "a", "d", "d", "b", "e"], dtype=object)
    rew[6, 2] = rew[7, 2] = 0.5  # an all-equal group: std 0
    return rew, m, index  # c, e: singleton groups


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 0.1])
def test_grpo_advantage(norm, eps):
    rew, m, index = _rewards()
    want, want_ret = V["compute_grpo_outcome_advantage"](rew.clone(), m, index, epsilon=eps,
                                                          norm_adv_by_std_in_grpo=norm)
    got, got_ret = rv.compute_grpo_outcome_advantage(rew.clone(), m, index, epsilon=eps,
                                                     norm_adv_by_std_in_grpo=norm)
    close(got, want, atol=1e-6)
    close(got_ret, want_ret, atol=1e-6)
    ids = torch.tensor([ord(c) for c in index])  # integer ids in a tensor
    close(rv.compute_grpo_outcome_advantage(rew, m, ids, epsilon=eps,
                                            norm_adv_by_std_in_grpo=norm)[0],
          V["compute_grpo_outcome_advantage"](rew, m, ids.numpy(), epsilon=eps,
                                              norm_adv_by_std_in_grpo=norm)[0], atol=1e-6)


def test_rloo_advantage():
    rew, m, index = _rewards()
    want, _ = V["compute_rloo_outcome_advantage"](rew.clone(), m, index)
    got, _ = rv.compute_rloo_outcome_advantage(rew.clone(), m, index)
    close(got, want, atol=1e-6)
    single = np.arange(4)  # every group a singleton
    close(rv.compute_rloo_outcome_advantage(rew[:4], m[:4], single)[0],
          V["compute_rloo_outcome_advantage"](rew[:4], m[:4], single)[0])


# ---------------------------------------------------------------- patch / unpatch
def test_patch_and_unpatch_real_verl():
    import sys
    fn_targets = {vtf: ("logprobs_from_logits", "entropy_from_logits"),
                  vca: ("kl_penalty", "agg_loss", "compute_policy_loss",
                        "compute_policy_loss_vanilla", "compute_policy_loss_cispo",
                        "compute_gae_advantage_return", "compute_grpo_outcome_advantage",
                        "compute_rloo_outcome_advantage")}
    # every verl.* module attribute that is one of the originals, and the registries
    refs = [(mod, key, val) for name, mod in list(sys.modules.items())
            if mod is not None and (name == "verl" or name.startswith("verl."))
            for key, val in list(vars(mod).items())
            if any(val is o for o in V.values())]
    pl = dict(vca.POLICY_LOSS_REGISTRY)
    adv = dict(vca.ADV_ESTIMATOR_REGISTRY)
    # the originals of every core_algos function the bridge serves (issue 21 added many)
    served = {id(getattr(vca, n)) for n in rv._TARGETS["verl.trainer.ppo.core_algos"]
              if hasattr(vca, n)}
    assert pl["vanilla"] is V["compute_policy_loss_vanilla"]
    assert adv["grpo"] is V["compute_grpo_outcome_advantage"]

    rv.patch()
    try:
        assert rv.is_patched()
        for mod, names in fn_targets.items():
            for n in names:
                want = getattr(rv, n)
                if n == "compute_policy_loss_vanilla" and rv._returns_metrics_dict(V[n]):
                    want = rv.compute_policy_loss_vanilla_metrics
                assert getattr(mod, n) is want, n
        for mod, key, val in refs:  # copies in other verl modules (e.g. the actor) as well
            assert getattr(mod, key) is not val, (mod.__name__, key)
        assert vca.POLICY_LOSS_REGISTRY["vanilla"] is rv.compute_policy_loss_vanilla_metrics
        assert vca.POLICY_LOSS_REGISTRY["cispo"] is rv.compute_policy_loss_cispo
        assert vca.ADV_ESTIMATOR_REGISTRY["gae"] is rv.compute_gae_advantage_return
        assert vca.ADV_ESTIMATOR_REGISTRY["grpo"] is rv.compute_grpo_outcome_advantage
        assert vca.ADV_ESTIMATOR_REGISTRY["rloo"] is rv.compute_rloo_outcome_advantage
        # verl's own lookups return the replacements and work in verl's calling convention
        old, lp, A, m = _ppo_inputs()
        loss, metrics = vca.get_policy_loss_fn("vanilla")(
            old_log_prob=old, log_prob=lp, advantages=A, response_mask=m,
            loss_agg_mode="token-mean", config=_cfg(0.2, 0.28, 3.0), rollout_is_weights=None)
        want, want_m = V["compute_policy_loss_vanilla"](old, lp, A, m, "token-mean",
                                                        _cfg(0.2, 0.28, 3.0))
        close(loss, want)
        assert metrics == pytest.approx(want_m, rel=1e-5, abs=1e-7)
        assert vca.get_adv_estimator_fn("grpo") is rv.compute_grpo_outcome_advantage
        # the entries of served functions are replaced, every other entry stays verl's
        for k in pl:
            if id(pl[k]) in served:
                assert vca.POLICY_LOSS_REGISTRY[k] is not pl[k], k
            else:
                assert vca.POLICY_LOSS_REGISTRY[k] is pl[k], k
        rv.patch()  # idempotent
    finally:
        rv.unpatch()
    assert not rv.is_patched()
    for mod, names in fn_targets.items():
        for n in names:
            assert getattr(mod, n) is V[n], n
    for mod, key, val in refs:
        assert getattr(mod, key) is val, (mod.__name__, key)
    assert vca.POLICY_LOSS_REGISTRY == pl and all(vca.POLICY_LOSS_REGISTRY[k] is pl[k] for k in pl)
    assert all(vca.ADV_ESTIMATOR_REGISTRY[k] is adv[k] for k in adv)
    assert set(vca.ADV_ESTIMATOR_REGISTRY) == set(adv)
