"""rlkernels.integrations.verl against naive re-implementations of verl's documented formulas
(written here from verl's docs/semantics, not copied), including edge cases."""
import math
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


def naive_agg(L, m, mode, norm_seq_mean=True):
    """verl's agg_loss; "seq-mean-token-sum-norm": verl >= 0.9 (norm_seq_mean) averages the
    token sums over the non-empty sequences, then divides by T; verl <= 0.8 divides the total
    token sum by T."""
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
    assert mode == "seq-mean-token-sum-norm", mode
    if norm_seq_mean:
        s = (L * m).sum(-1)
        sm = (m.sum(-1) > 0).float()
        return (s * sm).sum() / sm.sum() / m.shape[-1]
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
    return naive_agg(L, m, mode, rv._norm_seq_mean(None)), clipfrac, ppo_kl, lower


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


@pytest.mark.parametrize("version", ["0.8.5", "0.9.1"])
@pytest.mark.parametrize("mode", MODES)
def test_agg_loss(mode, version):
    L = torch.randn(5, 7, dtype=torch.float64)
    m = (torch.rand(5, 7) > 0.4).double()
    m[2] = 0  # an empty sequence
    want = naive_agg(L, m, mode, norm_seq_mean=version >= "0.9")
    torch.testing.assert_close(rv.agg_loss(L, m, mode, verl_version=version), want)
    assert rv.agg_loss(L, torch.zeros_like(m), mode) == 0  # all-masked: 0 (verl: NaN)
    with pytest.raises(ValueError):
        rv.agg_loss(L, m, "bogus")


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", MODES + ["token-sum"])
def test_agg_loss_masked_values_never_reach_the_result(mode, poison):
    """Issue 16: NaN / inf at masked positions (of non-empty and of empty sequences) leave
    every mode's result unchanged, for 0/1, bool and weight masks."""
    g = torch.Generator().manual_seed(11)
    L = torch.randn(5, 7, generator=g, dtype=torch.float64)
    m = (torch.rand(5, 7, generator=g) > 0.4).double()
    m[2] = 0
    m[0, :2] = 0
    for mask in (m, m.bool(), m * (0.5 + torch.rand(5, 7, generator=g, dtype=torch.float64))):
        dirty = torch.where(mask != 0, L, torch.full_like(L, poison))
        for kw in ({}, dict(dp_size=2, batch_num_tokens=40, global_batch_size=8)):
            want = rv.agg_loss(L, mask, mode, **kw)
            got = rv.agg_loss(dirty, mask, mode, **kw)
            assert torch.isfinite(got) and torch.equal(got, want), (mode, got, want)


def test_agg_loss_verl_version(monkeypatch):
    """The version-dependent mode follows verl_version=, else VERL_VERSION (read once at
    import from the installed verl's metadata; the newest form without verl)."""
    L = torch.randn(4, 6, dtype=torch.float64)
    m = torch.ones(4, 6, dtype=torch.float64)
    m[1] = 0
    old = rv.agg_loss(L, m, "seq-mean-token-sum-norm", verl_version="0.8.5")
    new = rv.agg_loss(L, m, "seq-mean-token-sum-norm", verl_version="0.9.1")
    torch.testing.assert_close(old, (L * m).sum() / 6)
    torch.testing.assert_close(new, (L * m).sum() / 3 / 6)
    torch.testing.assert_close(rv.agg_loss(L, m, "seq-mean-token-sum-norm",
                                           verl_version="0.10.0.dev0"), new)
    default = new if rv._norm_seq_mean(None) else old
    torch.testing.assert_close(rv.agg_loss(L, m, "seq-mean-token-sum-norm"), default)
    import importlib.metadata
    try:
        assert rv.VERL_VERSION == importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        assert rv.VERL_VERSION is None
    for installed, want in (("0.8.2", old), ("0.9.0", new), (None, new)):
        monkeypatch.setattr(rv, "VERL_VERSION", installed)
        torch.testing.assert_close(rv.agg_loss(L, m, "seq-mean-token-sum-norm"), want)
    with pytest.raises(ValueError, match="verl_version: expected a version string"):
        rv.agg_loss(L, m, "seq-mean-token-sum-norm", verl_version="latest")


def naive_cispo(old, lp, A, m, mode, low, high):
    """verl 0.9's compute_policy_loss_cispo: -sg(clip(r, 1 - low, 1 + high)) A logp."""
    nk = torch.clamp(lp - old, -20, 20)
    r = torch.exp(nk)
    clipped = torch.clamp(r, 1 - low, 1 + high)
    L = -clipped.detach() * A * lp
    return (naive_agg(L, m, mode, rv._norm_seq_mean(None)),
            _masked_mean((r != clipped).float(), m), _masked_mean(-nk, m))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clips", [(0.2, 0.28), (None, 0.5), (1.5, 0.2)])
def test_policy_loss_cispo(mode, clips):
    """Issue 16: the bridge's cispo clamps the ratio below at 1 - clip_ratio_low, as verl."""
    g = torch.Generator().manual_seed(12)
    B, T = 5, 8
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 2
    lp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.8
    A = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = (torch.rand(B, T, generator=g) > 0.3).double()
    m[3] = 0
    low, high = clips
    cfg = {"clip_ratio": 0.2, "clip_ratio_low": low, "clip_ratio_high": high}
    x = lp.clone().requires_grad_(True)
    y = lp.clone().requires_grad_(True)
    loss, metrics = rv.compute_policy_loss_cispo(old, x, A, m, mode, cfg)
    want, clipfrac, ppo_kl = naive_cispo(old, y, A, m, mode, 0.2 if low is None else low, high)
    # verl's masked means divide by count + 1e-8: a relative difference up to 1e-8
    torch.testing.assert_close(loss, want, atol=1e-9, rtol=1e-7)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(clipfrac.item(), rel=1e-6)
    assert metrics["actor/ppo_kl"] == pytest.approx(ppo_kl.item(), rel=1e-6)
    assert metrics["actor/pg_clipfrac_lower"] == 0.0
    loss.backward()
    want.backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-7)
    if low == 0.2:  # the lower clamp is active here: rlkernels' default (TRL's) cispo differs
        trl, _ = rv.rlkernels.policy_loss(lp, old, A, m, loss="cispo", clip_high=high,
                                          agg="token-mean")
        assert mode != "token-mean" or abs(trl.item() - loss.item()) > 1e-3
    with pytest.raises(ValueError, match="config: expected verl's actor config"):
        rv.compute_policy_loss_cispo(old, lp, A, m, mode)


def naive_gae(rew, values, m, gamma, lam):
    """verl 0.9's compute_gae_advantage_return (a loop over T that carries nextvalues and
    lastgaelam through masked positions), then verl's masked_whiten."""
    nextvalues, lastgaelam, out = 0.0, 0.0, []
    for t in reversed(range(rew.shape[-1])):
        delta = rew[:, t] + gamma * nextvalues - values[:, t]
        new = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = new * m[:, t] + (1 - m[:, t]) * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], dim=1)
    returns = adv + values
    mean = (adv * m).sum() / (m.sum() + 1e-8)
    var = ((adv - mean) ** 2 * m).sum() / (m.sum() + 1e-8) * m.sum() / (m.sum() - 1)
    return (adv - mean) * torch.rsqrt(var + 1e-8), returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_advantage_return(gamma, lam):
    """Issue 16: verl's GAE carries the running advantage through masked positions (rlkernels'
    gae outputs 0 there); the bridge follows verl at every position."""
    g = torch.Generator().manual_seed(13)
    B, T = 4, 9
    rew = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = (torch.rand(B, T, generator=g) > 0.35).double()
    m[0, 3:6] = 0  # observation tokens between two turns
    m[1, -3:] = 0  # padding at the end: 0 after the last valid position
    m[2, 0] = 0
    adv, ret = rv.compute_gae_advantage_return(rew, values, m, gamma, lam)
    want_adv, want_ret = naive_gae(rew, values, m, gamma, lam)
    assert adv.dtype == ret.dtype == torch.float64
    # verl's masked_whiten divides by count + 1e-8: a relative difference up to 1e-8
    torch.testing.assert_close(adv, want_adv, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(ret, want_ret, atol=1e-12, rtol=1e-10)
    raw, _ = rv.rlkernels.gae(rew, values, m, gamma=gamma, lam=lam)
    assert (raw[m == 0] == 0).all() and (want_ret[m == 0] != values[m == 0]).any()
    # values and rewards at masked positions never reach a valid position
    dirty_v = torch.where(m != 0, values, float("nan"))
    dirty_r = torch.where(m != 0, rew, float("inf"))
    adv2, ret2 = rv.compute_gae_advantage_return(dirty_r, dirty_v, m, gamma, lam)
    valid = m != 0
    torch.testing.assert_close(adv2[valid], adv[valid], atol=0, rtol=0)
    torch.testing.assert_close(ret2[valid], ret[valid], atol=0, rtol=0)
    f32 = rv.compute_gae_advantage_return(rew.float(), values.float(), m.bool(), gamma, lam)
    assert f32[0].dtype == torch.float32
    torch.testing.assert_close(f32[0].double(), want_adv, atol=2e-5, rtol=2e-5)


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


def test_vectorized_advantages():
    """verl's grpo_vectorized equals grpo (fp32); rloo_vectorized gives singletons 0."""
    rew, m, index = _rewards()
    for norm in (True, False):
        adv, ret = rv.compute_grpo_vectorized_outcome_advantage(rew, m, index,
                                                                norm_adv_by_std_in_grpo=norm)
        torch.testing.assert_close(adv, naive_grpo(rew, m, index, norm=norm), atol=1e-6,
                                   rtol=1e-5)
    adv, _ = rv.compute_rloo_vectorized_outcome_advantage(rew, m, index)
    want = naive_rloo(rew, m, index)
    single = torch.tensor([list(index).count(k) == 1 for k in index])
    want[single] = 0
    assert single.any()
    torch.testing.assert_close(adv, want, atol=1e-6, rtol=1e-5)


def _groups(index):
    groups = defaultdict(list)
    for i, k in enumerate(index):
        groups[k].append(i)
    return groups


def _whiten(x, m):
    """verl's masked_whiten (Bessel-corrected variance, eps 1e-8)."""
    n = m.sum()
    mean = (x * m).sum() / n
    var = ((x - mean) ** 2 * m).sum() / n * n / (n - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def naive_estimator(name, rew, m, index):
    """verl 0.9.1's outcome estimators, from their documented formulas (singleton groups:
    mean 0, std 1, as verl)."""
    scores = rew.sum(-1)
    out = torch.zeros_like(scores)
    lengths = m.sum(-1)
    for members in _groups(index).values():
        s = scores[members]
        one = len(members) == 1
        if name == "opo":
            base = 0.0 if one else (lengths[members] * s).sum() / lengths[members].sum()
            out[members] = s - base
        elif name in ("gpg", "rpp_baseline"):
            out[members] = s - (0.0 if one else s.mean())
        elif name == "grpo_passk":
            top = torch.topk(s, 2)
            out[members[top.indices[0]]] = (top.values[0] - top.values[1]) / (s.std() + 1e-6)
    if name == "gpg":
        out = out * len(scores) / max(int(torch.count_nonzero(scores)), 1)
    tok = out.unsqueeze(-1) * m
    return _whiten(tok, m) * m if name == "rpp_baseline" else tok


@pytest.mark.parametrize("name", ["opo", "gpg", "grpo_passk", "rpp_baseline"])
def test_outcome_estimators(name):
    rew, m, index = _rewards()
    if name == "grpo_passk":  # verl requires >= 2 members per group
        index = np.array(["a", "b", "a", "b", "b", "a", "d", "d", "b"], dtype=object)
        adv, _ = rv.compute_grpo_passk_outcome_advantage(rew, m, index, config={})
    else:
        fn = {"opo": rv.compute_opo_outcome_advantage, "gpg": rv.compute_gpg_outcome_advantage,
              "rpp_baseline": rv.compute_reinforce_plus_plus_baseline_outcome_advantage}[name]
        adv, _ = fn(rew, m, index)
    torch.testing.assert_close(adv, naive_estimator(name, rew, m, index), atol=1e-5, rtol=1e-5)
    if name == "grpo_passk":
        with pytest.raises(ValueError, match="at least 2 samples per group"):
            rv.compute_grpo_passk_outcome_advantage(rew, m, _rewards()[2], config={})


def test_token_estimators():
    """remax (verl: reverse cumsum of the masked rewards minus the baseline at valid
    positions) and reinforce_plus_plus (discounted returns, whitened), gdpo without
    components (= whitened GRPO)."""
    g = torch.Generator().manual_seed(21)
    rew, m, index = _rewards()
    dense = torch.randn(rew.shape, generator=g) * m
    base = torch.randn(rew.shape[0], generator=g)
    adv, ret = rv.compute_remax_outcome_advantage(dense, base, m)
    want_ret = (dense * m).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(ret, want_ret, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adv, want_ret - base.unsqueeze(-1) * m, atol=1e-5, rtol=1e-5)
    adv, ret = rv.compute_reinforce_plus_plus_outcome_advantage(dense, m, config={"gamma": 0.9})
    run, rets = torch.zeros(rew.shape[0]), torch.zeros_like(dense)
    for t in reversed(range(dense.shape[1])):
        new = dense[:, t] + 0.9 * run
        rets[:, t] = new * m[:, t]
        run = new * m[:, t] + run * (1 - m[:, t])
    torch.testing.assert_close(ret, rets, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adv, _whiten(rets, m) * m, atol=1e-5, rtol=1e-5)
    adv, _ = rv.compute_gdpo_outcome_advantage(rew, m, index)
    torch.testing.assert_close(adv, _whiten(naive_grpo(rew, m, index), m) * m, atol=1e-5,
                               rtol=1e-5)


def naive_gspo(old, lp, A, m, mode, low, high):
    """verl's compute_policy_loss_gspo: the sequence-level ratio sg(s) logp / sg(logp)."""
    seq = ((lp - old) * m).sum(-1) / m.sum(-1).clamp(min=1)
    log_r = torch.clamp(lp - lp.detach() + seq.detach().unsqueeze(-1), max=10.0)
    r = torch.exp(log_r)
    l1, l2 = -A * r, -A * torch.clamp(r, 1 - low, 1 + high)
    L = torch.maximum(l1, l2)
    return (naive_agg(L, m, mode, rv._norm_seq_mean(None)),
            _masked_mean(torch.gt(l2, l1).float(), m), _masked_mean(old - lp, m))


@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_gspo_and_gpg(mode):
    g = torch.Generator().manual_seed(13)
    B, T = 5, 8
    old = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5 - 2
    lp = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    A = torch.randn(B, T, generator=g, dtype=torch.float64)
    m = (torch.rand(B, T, generator=g) > 0.3).double()
    m[3] = 0
    cfg = {"clip_ratio": 0.2, "clip_ratio_low": 0.1, "clip_ratio_high": 0.15}
    x, y = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    loss, metrics = rv.compute_policy_loss_gspo(old, x, A, m, mode, cfg)
    want, clipfrac, ppo_kl = naive_gspo(old, y, A, m, mode, 0.1, 0.15)
    torch.testing.assert_close(loss, want, atol=1e-9, rtol=1e-7)
    assert clipfrac > 0 and metrics["actor/pg_clipfrac"] == pytest.approx(clipfrac.item(),
                                                                           rel=1e-6)
    assert metrics["actor/ppo_kl"] == pytest.approx(ppo_kl.item(), rel=1e-6)
    loss.backward()
    want.backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-7)
    x.grad = None
    loss, metrics = rv.compute_policy_loss_gpg(old, x, A, m, mode, cfg)
    want = naive_agg(-A * lp, m, mode, rv._norm_seq_mean(None))
    torch.testing.assert_close(loss, want, atol=1e-9, rtol=1e-7)
    assert metrics == {}
    for fn in (rv.compute_policy_loss_gspo, rv.compute_policy_loss_gpg):
        with pytest.raises(ValueError, match="config: expected verl's actor config"):
            fn(old, lp, A, m, mode)


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
    ca.compute_policy_loss_cispo = f_cispo = (lambda *a, **k: None)
    ca.compute_gae_advantage_return = f_gae = (lambda *a, **k: None)
    ca.POLICY_LOSS_REGISTRY = {"vanilla": f_pl, "cispo": f_cispo}
    ca.ADV_ESTIMATOR_REGISTRY = {"grpo": ca.compute_grpo_outcome_advantage, "gae": f_gae}
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
    L = torch.randn(3, 4, dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    before = [rv.agg_loss(L, m, mode) for mode in MODES]
    rv.patch()
    try:
        # issue 16: results never depend on whether patch() ran
        assert all(torch.equal(rv.agg_loss(L, m, mode), b) for mode, b in zip(MODES, before))
        assert ca.POLICY_LOSS_REGISTRY["cispo"] is rv.compute_policy_loss_cispo
        assert ca.ADV_ESTIMATOR_REGISTRY["gae"] is rv.compute_gae_advantage_return
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
    assert ca.POLICY_LOSS_REGISTRY["cispo"] is f_cispo and ca.ADV_ESTIMATOR_REGISTRY["gae"] is f_gae
    assert not rv.is_patched()
    assert all(torch.equal(rv.agg_loss(L, m, mode), b) for mode, b in zip(MODES, before))


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


# verl's metric keys per registry loss (verl 0.9.1); the values are checked against the real
# verl in tests/integrations/test_verl_heldout.py (needs verl installed)
_LOSS_METRICS = {
    "sapo": {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"},
    "clip_cov": {"actor/pg_clipfrac", "actor/ppo_kl"},
    "kl_cov": {"actor/ppo_kl"},
    "geo_mean": {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"},
    "dro": {"actor/ppo_kl"},
    "dppo_tv": {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"},
    "dppo_kl": {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"},
}


@pytest.mark.parametrize("name", sorted(_LOSS_METRICS))
def test_registry_losses_run(name):
    """Each bridged registry loss runs on the rlkernels op with verl's config layout
    (``policy_loss`` sub-config), returns verl's metric keys as floats and a gradient; a
    missing config (or dro_beta) raises as verl's does."""
    g = torch.Generator().manual_seed(31)
    old = -torch.rand(4, 6, generator=g) * 2
    lp = (old + torch.randn(4, 6, generator=g) * 0.2).requires_grad_(True)
    A = torch.randn(4, 6, generator=g)
    m = torch.ones(4, 6)
    cfg = {"clip_ratio": 0.2, "clip_ratio_c": 3.0, "tau_pos": 1.0, "tau_neg": 1.05,
           "policy_loss": {"dro_beta": 0.1, "clip_cov_ratio": 0.3, "kl_cov_ratio": 0.2}}
    fn = getattr(rv, f"compute_policy_loss_{name}")
    loss, metrics = fn(old, lp, A, m, "token-mean", cfg)
    assert set(metrics) == _LOSS_METRICS[name]
    assert all(isinstance(v, float) for v in metrics.values())
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        fn(old, lp, A, m, "token-mean", None if name != "dro" else {"policy_loss": {}})


# ------------------------------------------------------------------ rollout correction
# naive transcriptions of verl 0.9.1's rollout_corr_helper (values vs the real verl in
# tests/integrations/test_verl_heldout.py)

def _mm(x, m, axis=None):
    s = torch.where(m.bool(), x, 0.0) * m
    return (s.sum() if axis is None else s.sum(axis)) / \
        ((m.sum() if axis is None else m.sum(axis)) + 1e-8)


def _msum(x, m, axis):
    return (torch.where(m.bool(), x, 0.0) * m).sum(axis)


def naive_is(lr, m, level, upper, lower=None, bn=False):
    if level == "token":
        lfm, raw = lr, torch.exp(lr.clamp(-20, 20))
    else:
        lfm = _msum(lr, m, -1)[:, None]
        raw = torch.exp(lfm.clamp(-20, 20)).expand_as(lr)
    raw = raw * m
    w = raw.clamp(max=upper) if lower is None else \
        torch.where((raw >= lower) & (raw <= upper), raw, torch.zeros_like(raw))
    lo = 1.0 / upper if lower is None else lower
    M = {}
    mb = m.bool()
    if level == "sequence":
        M["rollout_is_max"] = math.exp(min(lfm.max().item(), 20))
        M["rollout_is_min"] = math.exp(lfm.min().item())
        M["rollout_is_mean"] = _mm(w, m).item()
        M["rollout_is_ratio_fraction_high"] = (lfm > math.log(upper)).float().mean().item()
        M["rollout_is_ratio_fraction_low"] = (lfm < math.log(lo)).float().mean().item()
    else:
        M["rollout_is_mean"] = _mm(w, m).item()
        M["rollout_is_ratio_fraction_high"] = _mm((raw > upper).float(), m).item()
        M["rollout_is_ratio_fraction_low"] = _mm((raw < lo).float(), m).item()
        M["rollout_is_max"] = w[mb].max().item()
        M["rollout_is_min"] = w[mb].min().item()
    c = w.clamp(0, upper)
    M["rollout_is_std"] = math.sqrt(max(_mm(c * c, m).item() - _mm(c, m).item() ** 2, 0))
    M["rollout_is_eff_sample_size"] = 1 / _mm((c / (_mm(c, m) + 1e-8)) ** 2, m).item()
    sw = _mm(w, m, -1)
    M.update(rollout_is_seq_mean=sw.mean().item(), rollout_is_seq_std=sw.std().item(),
             rollout_is_seq_max=sw.max().item(), rollout_is_seq_min=sw.min().item(),
             rollout_is_seq_max_deviation=(sw - 1).abs().max().item())
    rs = _mm(raw, m, -1)
    M["rollout_is_seq_fraction_high"] = (rs > upper).float().mean().item()
    M["rollout_is_seq_fraction_low"] = (rs < lo).float().mean().item()
    if lower is not None:
        M["rollout_is_oob_ratio"] = _mm(((raw < lower) | (raw > upper)).float(), m).item()
    if bn:
        if level == "token":
            mean = _mm(w, m)
        else:
            sm = (m.sum(-1) > 0).float()
            mean = (_mm(w, m, -1) * sm).sum() / sm.sum()
        w = w / mean
        M["rollout_is_batch_norm_factor"] = mean.item()
    return w, M


def naive_rs(lr, m, opts):
    """opts: [(name, lower or None, upper)] -> (mask, metrics)."""
    lc = lr.clamp(-20, 20)
    k = {"k1": -lc, "k2": 0.5 * lc ** 2, "k3": torch.exp(lc) - 1 - lc}
    mb, sv = m.bool(), m.sum(-1) > 0
    keep_all = torch.ones_like(lr)
    M = {}
    for name, lower, upper in opts:
        scope, est = name.rsplit("_", 1)
        x = k[est]
        k1 = est == "k1"
        hi, lo = (math.log(upper), math.log(lower)) if k1 else (upper, 0.0)
        if scope == "token":
            stat, seq = x, _mm(x, m, -1)
        else:
            seq = {"seq_sum": lambda: _msum(x, m, -1), "seq_mean": lambda: _mm(x, m, -1),
                   "seq_max": lambda: torch.stack([x[i][mb[i]].max() if mb[i].any()
                                                   else torch.tensor(0.0)
                                                   for i in range(len(x))])}[scope]()
            stat = seq[:, None].expand_as(lr)
        keep = ((stat >= lo) & (stat <= hi)) if k1 else stat <= hi
        keep_all = keep_all * keep.float()
        v = seq[sv]
        p = f"rollout_rs_{name}"
        M[f"{p}_mean"] = _mm(stat, m).item()
        if scope != "token":
            M[f"{p}_max"], M[f"{p}_min"] = v.max().item(), v.min().item()
            M[f"{p}_fraction_high"] = (v > hi).float().mean().item()
            M[f"{p}_fraction_low"] = (v < lo).float().mean().item() if k1 else 0.0
        else:
            M[f"{p}_max"], M[f"{p}_min"] = stat[mb].max().item(), stat[mb].min().item()
            M[f"{p}_fraction_high"] = _mm((stat > hi).float(), m).item()
            M[f"{p}_fraction_low"] = _mm((stat < lo).float(), m).item() if k1 else 0.0
        c = stat.clamp(lo, hi)
        M[f"{p}_std"] = math.sqrt(max(_mm(c * c, m).item() - _mm(c, m).item() ** 2, 0))
        M.update({f"{p}_seq_mean": v.mean().item(),
                  f"{p}_seq_std": v.std().item() if len(v) > 1 else 0.0,
                  f"{p}_seq_max": v.max().item(), f"{p}_seq_min": v.min().item(),
                  f"{p}_seq_max_deviation": v.abs().max().item(),
                  f"{p}_seq_fraction_high": (v > hi).float().mean().item()})
        if k1:
            M[f"{p}_seq_fraction_low"] = (v < lo).float().mean().item()
        M[f"{p}_masked_fraction"] = _mm(1 - keep.float(), m).item()
        rej = (~keep & mb).any(-1)
        M[f"{p}_seq_masked_fraction"] = rej[sv].float().mean().item()
    M["rollout_rs_masked_fraction"] = _mm(1 - keep_all, m).item()
    M["rollout_rs_seq_masked_fraction"] = ((keep_all < 0.5) & mb).any(-1).float().mean().item()
    return (m * keep_all).to(m.dtype), M


def naive_offpolicy(old, roll, m):
    mo, mr = _mm(old, m, -1), _mm(roll, m, -1)
    lr = old - roll
    d = mr - mo
    return {"training_ppl": torch.exp(-mo).mean().item(), "training_log_ppl": (-mo).mean().item(),
            "kl": _mm(roll - old, m).item(), "k3_kl": _mm(torch.exp(lr) - lr - 1, m).item(),
            "rollout_ppl": torch.exp(-mr).mean().item(), "rollout_log_ppl": (-mr).mean().item(),
            "log_ppl_diff": d.mean().item(), "log_ppl_abs_diff": d.abs().mean().item(),
            "log_ppl_diff_max": d.max().item(), "log_ppl_diff_min": d.min().item(),
            "ppl_ratio": torch.exp(d).mean().item(),
            "chi2_token": _mm(torch.exp(2 * lr.clamp(-20, 20)), m).item() - 1,
            "chi2_seq": torch.exp(2 * _msum(lr, m, -1).clamp(-20, 20)).mean().item() - 1}


def _rc_inputs(seed=3, b=6, t=8):
    g = torch.Generator().manual_seed(seed)
    roll = -torch.rand(b, t, generator=g) * 3
    old = roll + torch.randn(b, t, generator=g) * 0.3
    m = (torch.rand(b, t, generator=g) > 0.3).float()
    m[:, 0] = 1
    m[1] = 0                 # an empty row
    m[2] = 0
    m[2, 3] = 1              # one valid token
    old = torch.where(m.bool(), old, torch.full_like(old, 40.0))  # must not matter
    return old, roll, m


def _metrics_close(got, want):
    assert list(got) == list(want)
    for k, v in want.items():
        assert isinstance(got[k], float), k
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-5), k


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("thr,upper,lower", [(2.0, 2.0, None), ("1.3", 1.3, None),
                                             ("0.6_1.8", 1.8, 0.6)])
@pytest.mark.parametrize("bn", [False, True])
def test_rollout_correction_weights_naive(level, thr, upper, lower, bn):
    old, roll, m = _rc_inputs()
    lr = old - roll
    w, metrics = rv.compute_rollout_correction_weights(lr, m, level, thr, bn)
    nw, nm = naive_is(lr, m, level, upper, lower, bn)
    torch.testing.assert_close(w, nw, atol=1e-5, rtol=1e-5)
    assert (w[m == 0] == 0).all()
    _metrics_close(metrics, nm)


@pytest.mark.parametrize("rs,thr,opts", [
    ("token_k1", 1.5, [("token_k1", 1 / 1.5, 1.5)]),
    ("seq_mean_k3", "0.02", [("seq_mean_k3", None, 0.02)]),
    ("seq_max_k2", 0.1, [("seq_max_k2", None, 0.1)]),
    ("seq_sum_k1, token_k2,seq_sum_k1", "0.6_1.4,0.05",
     [("seq_sum_k1", 0.6, 1.4), ("token_k2", None, 0.05)]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_rollout_rejection_mask_naive(rs, thr, opts, dtype):
    old, roll, m = _rc_inputs(seed=5)
    lr = old - roll
    m = m.to(dtype)
    mask, metrics = rv.compute_rollout_rejection_mask(lr, m, rs, thr)
    nmask, nm = naive_rs(lr, m.float(), opts)
    assert mask.dtype == dtype and torch.equal(mask, nmask.to(dtype))
    _metrics_close(metrics, nm)
    empty = rv.compute_rollout_rejection_mask(lr[:0], m[:0], rs, thr)
    assert empty[1] == {} and empty[0].shape == (0, m.shape[1])


def test_rollout_correction_and_rejection_mask_naive(monkeypatch):
    """The unified call: one op for weights and mask, verl's prefixed metrics, the weights in
    a DataProto (a stand-in verl.protocol here)."""
    class DataProto:
        def __init__(self, batch):
            self.batch = batch

        @classmethod
        def from_dict(cls, tensors):
            return cls(dict(tensors))

    proto = types.ModuleType("verl.protocol")
    proto.DataProto = DataProto
    monkeypatch.setitem(sys.modules, "verl.protocol", proto)
    old, roll, m = _rc_inputs(seed=9)
    lr = old - roll
    data, mask, metrics = rv.compute_rollout_correction_and_rejection_mask(
        old, roll, m, rollout_is="token", rollout_is_threshold="0.5_2",
        rollout_rs="seq_mean_k2", rollout_rs_threshold=0.03)
    nw, nis = naive_is(lr, m, "token", 2.0, 0.5)
    nmask, nrs = naive_rs(lr, m, [("seq_mean_k2", None, 0.03)])
    torch.testing.assert_close(data.batch["rollout_is_weights"], nw, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, nmask)
    want = {f"rollout_corr/{k}": v for d in (nis, nrs, naive_offpolicy(old, roll, m))
            for k, v in d.items()}
    _metrics_close(metrics, want)
    data, mask, metrics = rv.compute_rollout_correction_and_rejection_mask(old, roll, m)
    assert data is None and torch.equal(mask, m) and mask is not m
    _metrics_close(metrics, {f"rollout_corr/{k}": v
                             for k, v in naive_offpolicy(old, roll, m).items()})
    off = rv.compute_rollout_corr_metrics_from_logprobs(old, roll, m)
    assert off == metrics
    assert list(rv.compute_offpolicy_metrics(old, None, m)) == ["training_ppl",
                                                                "training_log_ppl"]


@pytest.mark.parametrize("fn,kw,exc", [
    ("weights", dict(rollout_is="geometric"), ValueError),
    ("weights", dict(rollout_is_threshold=True), TypeError),
    ("weights", dict(rollout_is_threshold=[2.0]), TypeError),
    ("weights", dict(rollout_is_threshold=""), ValueError),
    ("weights", dict(rollout_is_threshold="2_x"), ValueError),
    ("weights", dict(rollout_is_threshold="0_2"), ValueError),
    ("weights", dict(rollout_is_threshold="3_2"), ValueError),
    ("reject", dict(rollout_rs=None, rollout_rs_threshold=1.0), ValueError),
    ("reject", dict(rollout_rs="token_k1"), ValueError),
    ("reject", dict(rollout_rs="opsm", rollout_rs_threshold=1.0), ValueError),
    ("reject", dict(rollout_rs="seq_max_k1", rollout_rs_threshold=1.0), ValueError),
    ("reject", dict(rollout_rs=",", rollout_rs_threshold=1.0), ValueError),
    ("reject", dict(rollout_rs="token_k2", rollout_rs_threshold=[1.0]), TypeError),
    ("reject", dict(rollout_rs="token_k2,token_k3", rollout_rs_threshold="1,2,3"), ValueError),
    ("reject", dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_1"), ValueError),
    ("reject", dict(rollout_rs="token_k1", rollout_rs_threshold="2_1"), ValueError),
    ("reject", dict(rollout_rs="token_k1", rollout_rs_threshold=0), ZeroDivisionError),
    ("both", dict(rollout_rs="token_k1"), ValueError),
    ("both", dict(rollout_is="tok"), ValueError),
])
def test_rollout_correction_errors(fn, kw, exc):
    """verl's exception types for bad options (verl's k1 threshold 0 divides by zero)."""
    old, roll, m = _rc_inputs()
    if fn == "both":
        call = lambda: rv.compute_rollout_correction_and_rejection_mask(old, roll, m, **kw)  # noqa
    else:
        f = rv.compute_rollout_correction_weights if fn == "weights" else \
            rv.compute_rollout_rejection_mask
        call = lambda: f(old - roll, m, **kw)  # noqa: E731
    with pytest.raises(exc):
        call()


def test_rollout_correction_no_valid_token_and_shapes():
    old, roll, m = _rc_inputs()
    z = torch.zeros_like(m)
    with pytest.raises(ValueError, match="at least one valid token"):
        rv.compute_rollout_correction_weights(old - roll, z)
    with pytest.raises(ValueError, match="at least one valid token"):
        rv.compute_rollout_rejection_mask(old - roll, z, "token_k2", 1.0)
    with pytest.raises(ValueError, match="at least one valid token"):
        rv.compute_rollout_correction_and_rejection_mask(old, roll, z)
    with pytest.raises(AssertionError):
        rv.compute_offpolicy_metrics(old, roll, z)
    with pytest.raises(ValueError, match="does not match"):
        rv.compute_rollout_correction_and_rejection_mask(old, roll[:, :-1], m)
    with pytest.raises(ValueError, match="does not match"):
        rv.compute_rollout_correction_and_rejection_mask(old, roll, m[:, :-1])


def test_rollout_correction_infinite_thresholds():
    """verl accepts "inf": no truncation / no bound (the op gets the largest float)."""
    old, roll, m = _rc_inputs(seed=4)
    lr = old - roll
    w, _ = rv.compute_rollout_correction_weights(lr, m, "token", "inf")
    torch.testing.assert_close(w, naive_is(lr, m, "token", math.inf)[0])
    mask, _ = rv.compute_rollout_rejection_mask(lr, m, "token_k2,seq_sum_k1", "inf,0.5_inf")
    torch.testing.assert_close(mask, naive_rs(lr, m, [("token_k2", None, math.inf),
                                                      ("seq_sum_k1", 0.5, math.inf)])[0])


def test_patch_rollout_module_with_a_stand_in_verl(monkeypatch):
    """patch() swaps rollout_corr_helper's functions, and the references other verl modules
    imported by name; a verl without the module (verl < 0.6) is patched without it."""
    def make(name):
        return types.ModuleType(name)

    names = ["verl", "verl.utils", "verl.utils.torch_functional", "verl.trainer",
             "verl.trainer.ppo", "verl.trainer.ppo.core_algos"]
    mods = {n: make(n) for n in names}
    mods["verl.trainer.ppo"].__path__ = []  # a package: submodules are looked up
    mods["verl.utils.torch_functional"].logprobs_from_logits = lambda *a, **k: None
    for n, v in mods.items():
        monkeypatch.setitem(sys.modules, n, v)
    monkeypatch.delitem(sys.modules, "verl.trainer.ppo.rollout_corr_helper", raising=False)
    rv.patch()  # no rollout_corr_helper: skipped
    try:
        assert rv.is_patched()
    finally:
        rv.unpatch()
    rch = make("verl.trainer.ppo.rollout_corr_helper")
    fns = {n: (lambda *a, **k: None) for n in rv._TARGETS["verl.trainer.ppo.rollout_corr_helper"]}
    for n, f in fns.items():
        setattr(rch, n, f)
    user = make("verl.trainer.ppo.ray_trainer")
    user.compute_rollout_correction_and_rejection_mask = \
        fns["compute_rollout_correction_and_rejection_mask"]
    monkeypatch.setitem(sys.modules, rch.__name__, rch)
    monkeypatch.setitem(sys.modules, user.__name__, user)
    rv.patch()
    try:
        for n in fns:
            assert getattr(rch, n) is getattr(rv, n)
        assert user.compute_rollout_correction_and_rejection_mask is \
            rv.compute_rollout_correction_and_rejection_mask
    finally:
        rv.unpatch()
    for n, f in fns.items():
        assert getattr(rch, n) is f
    assert user.compute_rollout_correction_and_rejection_mask is \
        fns["compute_rollout_correction_and_rejection_mask"]
