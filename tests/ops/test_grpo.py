"""Tests of ``grpo_loss`` (SPEC 3.4): ``policy_loss`` of the token log-probs and entropies of
the logits, fused.

Two references: the composition ``policy_loss(token_logprobs(logits, ..., return_entropy=True),
entropy=H)`` of the public ops (the fused op must agree with it to rounding), and the naive fp64
formula of ``tests/_policy_naive.py`` (``log_softmax`` + the verl/TRL-style policy loss, plain
autograd), which shares no code with ``rlkernels``.

Shapes: B=3, T=5, V=37 (a vocabulary that is not a multiple of any block size) unless noted;
rows include padding tokens (-100, some of them unmasked on purpose: their gradient rows must
still be exactly zero), a peaked row (one logit 30 above the rest) and a ``-inf`` column.
"""

from __future__ import annotations

import pytest
import torch

import rlkernels
import _policy_naive as naive  # tests/ is on sys.path (tests/conftest.py)
from rlkernels import backends, grpo_loss, policy_loss, token_logprobs

F64 = torch.float64
DEV = naive.DEVICE  # the ops run here; the naive references on the CPU


@pytest.fixture(autouse=True)
def _needs_grpo_loss(request):
    if "backend" in request.fixturenames:
        naive.needs(request.getfixturevalue("backend"), "policy", "grpo_loss")


def make_inputs(B=3, T=5, V=37, *, seed=0, adv="B", scale=2.0, special_rows=True):
    """fp64 logits and policy inputs. old_logp = the current log-probs plus N(0, 0.3) noise so
    that the ratios straddle the clip range."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(B, T, V, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    if special_rows:
        tokens[0, 2] = -100           # padding, masked
        tokens[1, 4] = -100           # padding, left unmasked on purpose
        logits[2, 1, tokens[2, 1]] += 30.0   # peaked row (on the sampled token)
        logits[2, 3, 5] += 30.0              # peaked row (elsewhere)
        logits[1, 1, (tokens[1, 1] + 1) % V] = float("-inf")  # masked vocabulary column
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[:, 0] = True
    if special_rows:
        mask[0, 2] = False
        mask[1, 4] = True
    lp, _ = naive.logprobs_entropy(logits, tokens)
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=F64)).detach()
    old = torch.where(tokens == -100, torch.zeros_like(old), old)
    advantages = torch.randn((B,) if adv == "B" else (B, T), generator=g, dtype=F64)
    ref = (old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)).detach()
    isw = 0.5 + torch.rand(B, T, generator=g, dtype=F64)
    out = dict(logits=logits, tokens=tokens, old_logp=old, advantages=advantages, mask=mask,
               ref_logp=ref, is_weights=isw)
    return {k: v.to(DEV) for k, v in out.items()}


def _cpu(loss, metrics, g):
    return loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}, g.cpu()


def fused(inp, backend, dtype=F64, **kw):
    """grpo_loss on the device of the inputs; (loss, metrics, d logits) on the CPU."""
    x = inp["logits"].detach().to(dtype).clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, inp["tokens"], inp["old_logp"], inp["advantages"],
                              inp["mask"], backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return _cpu(loss, metrics, g)


def composed(inp, backend, dtype=F64, *, temperature=1.0, entropy_coef=0.0, **kw):
    x = inp["logits"].detach().to(dtype).clone().requires_grad_(True)
    vocab_backend = backend if backends.implements(backend, "vocab", "token_logprobs") \
        else "torch"
    lp, ent = token_logprobs(x, inp["tokens"], temperature=temperature, return_entropy=True,
                             backend=vocab_backend)
    loss, metrics = policy_loss(lp, inp["old_logp"], inp["advantages"], inp["mask"],
                                entropy=ent, entropy_coef=entropy_coef, backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, x)
    return _cpu(loss, metrics, g)


def reference(inp, **kw):
    """The naive fp64 formula (on the fp64 values of the inputs, on the CPU)."""
    inp = {k: v.cpu() for k, v in inp.items()}
    kw = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    x = inp["logits"].detach().double().clone().requires_grad_(True)
    loss, metrics = naive.grpo_loss(x, inp["tokens"], inp["old_logp"].double(),
                                    inp["advantages"].double(), inp["mask"], **kw)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), metrics, g


def close_metrics(m, m_ref, tol):
    assert set(m) == set(m_ref), (sorted(m), sorted(m_ref))
    for k in m:
        assert m[k].dim() == 0 and m[k].dtype == torch.float32 and not m[k].requires_grad, k
        torch.testing.assert_close(m[k].double(), m_ref[k].double(), atol=tol, rtol=tol,
                                   msg=lambda s: f"metric {k}: {s}")


CASES = {
    "ppo": dict(),
    "ppo-asym-dual": dict(clip_high=0.28, dual_clip=2.0),
    "ppo-delta-isw": dict(delta=1.5, is_weights="isw"),
    "cispo": dict(loss="cispo", clip_high=0.28),
    "cispo-clip-low": dict(loss="cispo", clip_high=0.28, cispo_clip_low=True),
    "reinforce": dict(loss="reinforce", agg="seq-mean-token-sum"),
    "gspo": dict(ratio_level="sequence", clip_low=0.03, clip_high=0.04,
                 agg="seq-mean-token-mean"),
    "kl-k3": dict(ref_logp="ref", kl_coef=0.1, kl_estimator="k3"),
    "kl-k3+": dict(ref_logp="ref", kl_coef=0.1, kl_estimator="k3+"),
    "entropy": dict(entropy_coef=0.01, agg="seq-mean-token-sum-norm"),
    "normalizer": dict(normalizer=20, agg="token-mean"),
    "temperature": dict(temperature=0.7, entropy_coef=0.05),
}


def _kw(inp, case):
    kw = dict(CASES[case])
    if kw.get("is_weights") == "isw":
        kw["is_weights"] = inp["is_weights"]
    if kw.get("ref_logp") == "ref":
        kw["ref_logp"] = inp["ref_logp"]
    return kw


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("adv", ["B", "BT"])
def test_grpo_loss_matches_composition_and_naive(backend, case, adv):
    inp = make_inputs(seed=len(case), adv=adv)
    kw = _kw(inp, case)
    loss, metrics, g = fused(inp, backend, **kw)
    loss_c, metrics_c, g_c = composed(inp, backend, **kw)
    loss_n, metrics_n, g_n = reference(inp, **kw)
    assert loss.dtype == F64 and g.dtype == F64
    torch.testing.assert_close(loss, loss_c, atol=1e-14, rtol=1e-13)
    torch.testing.assert_close(g, g_c, atol=1e-14, rtol=1e-13)
    close_metrics(metrics, metrics_c, 1e-7)
    torch.testing.assert_close(loss, loss_n, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g, g_n, atol=1e-12, rtol=1e-10)
    close_metrics(metrics, metrics_n, 1e-6)
    assert "entropy" in metrics and ("kl" in metrics) == ("ref_logp" in kw)
    pad = (inp["tokens"] == -100).cpu()
    assert (g[pad] == 0).all()  # exactly-zero gradient rows at padding, masked or not


@pytest.mark.parametrize("entropy_coef", [0.0, 0.02])
def test_grpo_entropy_coef_on_off(backend, entropy_coef):
    inp = make_inputs(seed=20)
    loss, metrics, g = fused(inp, backend, entropy_coef=entropy_coef)
    loss_n, metrics_n, g_n = reference(inp, entropy_coef=entropy_coef)
    torch.testing.assert_close(loss, loss_n, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g, g_n, atol=1e-12, rtol=1e-10)
    assert "entropy" in metrics
    close_metrics(metrics, metrics_n, 1e-6)
    loss0, _, g0 = fused(inp, backend)
    if entropy_coef == 0.0:
        assert torch.equal(loss, loss0) and torch.equal(g, g0)
    else:  # the entropy term changes both, by -coef * mean(H)
        assert not torch.equal(g, g0)
        h = metrics_n["entropy"].item()
        assert loss.item() == pytest.approx(loss0.item() - entropy_coef * h, rel=1e-10)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_grpo_temperature(backend, temperature):
    inp = make_inputs(seed=21)
    loss, metrics, g = fused(inp, backend, temperature=temperature, entropy_coef=0.01)
    loss_n, metrics_n, g_n = reference(inp, temperature=temperature, entropy_coef=0.01)
    torch.testing.assert_close(loss, loss_n, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g, g_n, atol=1e-12, rtol=1e-10)
    close_metrics(metrics, metrics_n, 1e-6)


@pytest.mark.parametrize("case", ["ppo", "kl-k3", "entropy", "temperature"])
def test_grpo_inplace_backward(backend, case):
    inp = make_inputs(seed=22)
    kw = _kw(inp, case)
    _, _, g_ref = fused(inp, backend, **kw)
    leaf = inp["logits"].detach().clone().requires_grad_(True)
    x = leaf * 1.0
    loss, _ = grpo_loss(x, inp["tokens"], inp["old_logp"], inp["advantages"], inp["mask"],
                        inplace_backward=True, backend=backend, **kw)
    ptr = x.data_ptr()
    loss.backward()
    assert torch.equal(leaf.grad.cpu(), g_ref)
    assert x.data_ptr() == ptr and torch.equal(x.detach().cpu(), g_ref)  # in the logits


@pytest.mark.parametrize("inplace", [False, True])
def test_grpo_sliced_logits_int32_tokens(backend, inplace):
    """The usual training call: ``logits[:, :-1]`` (a non-contiguous view of [B, T+1, V]) and
    int32 tokens; with inplace_backward the gradient still reaches the leaf correctly."""
    inp = make_inputs(seed=28)
    kw = dict(entropy_coef=0.01, temperature=0.8)
    _, _, g_ref = fused(inp, backend, **kw)
    full = torch.cat([inp["logits"], torch.randn(3, 1, 37, dtype=F64, device=DEV)], dim=1)
    leaf = full.clone().requires_grad_(True)
    x = leaf * 1.0
    loss, metrics = grpo_loss(x[:, :-1], inp["tokens"].int(), inp["old_logp"],
                              inp["advantages"], inp["mask"], inplace_backward=inplace,
                              backend=backend, **kw)
    loss_n, metrics_n, g_n = reference(inp, **kw)
    torch.testing.assert_close(loss.detach().cpu(), loss_n, atol=1e-12, rtol=1e-10)
    close_metrics({k: v.cpu() for k, v in metrics.items()}, metrics_n, 1e-6)
    loss.backward()
    torch.testing.assert_close(leaf.grad[:, :-1].cpu(), g_ref, atol=0, rtol=0)
    assert (leaf.grad[:, -1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["ppo", "gspo", "kl-k3", "entropy", "temperature"])
def test_grpo_low_precision_vs_fp64(backend, dtype, case):
    """SPEC 5: the same (exactly representable) logit values in fp32/bf16: loss and metrics
    within atol=rtol=1e-5 of fp64, gradient (dtype of the logits) within
    2 eps(dtype) max|g_ref| + 1e-7."""
    inp = make_inputs(seed=23)
    inp["logits"] = inp["logits"].to(dtype)
    inp["old_logp"] = inp["old_logp"].float()
    inp["ref_logp"] = inp["ref_logp"].float()
    inp["advantages"] = inp["advantages"].float()
    kw = _kw(inp, case)
    loss, metrics, g = fused(inp, backend, dtype=dtype, **kw)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    exact = {k: (v.double() if v.is_floating_point() else v) for k, v in inp.items()}
    kw_exact = _kw(exact, case)
    loss_r, metrics_r, g_r = reference(exact, **kw_exact)
    torch.testing.assert_close(loss.double(), loss_r, atol=1e-5, rtol=1e-5)
    close_metrics(metrics, metrics_r, 1e-5)
    naive.grad_bound(g, g_r)
    assert (g[(inp["tokens"] == -100).cpu()] == 0).all()


def test_grpo_gradcheck(backend):
    """True derivative (token-level PPO + k3 + entropy): finite differences in fp64."""
    inp = make_inputs(B=2, T=3, V=7, seed=24, special_rows=False)

    def f(x):
        return grpo_loss(x, inp["tokens"], inp["old_logp"], inp["advantages"], inp["mask"],
                         ref_logp=inp["ref_logp"], kl_coef=0.1, entropy_coef=0.05,
                         temperature=0.9, backend=backend)[0]

    assert torch.autograd.gradcheck(f, (inp["logits"].requires_grad_(True),))


def test_grpo_all_masked(backend):
    inp = make_inputs(seed=25)
    inp["mask"] = torch.zeros_like(inp["mask"])
    loss, metrics, g = fused(inp, backend, entropy_coef=0.1)
    assert loss.item() == 0.0 and (g == 0).all()
    assert all(v.item() == 0.0 for v in metrics.values())


@pytest.mark.parametrize("case", ["ppo-asym-dual", "cispo-clip-low", "gspo"])
def test_grpo_masked_positions_reach_no_metric(backend, case):
    """Issue 16: NaN logits in masked rows (so NaN log-probs and entropies there) and NaN at
    the masked positions of old_logp, ref_logp, [B, T] advantages and is_weights change
    neither the loss, nor a metric, nor the gradient of an unmasked row."""
    inp = make_inputs(seed=26, adv="BT")
    masked = ~inp["mask"]
    assert masked.any()
    dirty = dict(inp)
    dirty["logits"] = torch.where(masked[..., None], float("nan"), inp["logits"])
    for k in ("old_logp", "ref_logp", "advantages", "is_weights"):
        dirty[k] = torch.where(masked, float("nan"), inp[k])
    results = []
    for data in (inp, dirty):
        kw = dict(CASES[case], ref_logp=data["ref_logp"], kl_coef=0.1,
                  is_weights=data["is_weights"], entropy_coef=0.01)
        results.append(fused(data, backend, **kw))
    (loss, metrics, g), (loss_d, metrics_d, g_d) = results
    assert torch.equal(loss_d, loss)
    for k, v in metrics_d.items():
        assert torch.isfinite(v) and torch.equal(v, metrics[k]), (k, v, metrics[k])
    keep = inp["mask"].cpu()
    assert torch.equal(g_d[keep], g[keep])


def test_grpo_unknown_keyword():
    inp = make_inputs()
    with pytest.raises(TypeError, match=r"grpo_loss: unexpected keyword argument\(s\) clip_ratio"):
        grpo_loss(inp["logits"], inp["tokens"], inp["old_logp"], inp["advantages"], inp["mask"],
                  clip_ratio=0.2)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) entropy, foo"):
        grpo_loss(inp["logits"], inp["tokens"], inp["old_logp"], inp["advantages"], inp["mask"],
                  foo=1, entropy=inp["old_logp"])


def test_grpo_errors():
    inp = make_inputs()
    L, tok, old, adv, m = (inp[k] for k in ("logits", "tokens", "old_logp", "advantages", "mask"))
    with pytest.raises(ValueError, match=r"logits: expected a 3-d tensor \[B, T, V\], got "
                                         r"shape \(15, 37\)"):
        grpo_loss(L.reshape(15, 37), tok.reshape(15), old, adv, m)
    with pytest.raises(ValueError, match=r"tokens: expected shape \(3, 5\) .*got \(3, 4\)"):
        grpo_loss(L, tok[:, :4], old, adv, m)
    with pytest.raises(ValueError, match=r"old_logp: expected shape \(3, 5\) .*got \(3, 4\)"):
        grpo_loss(L, tok, old[:, :4], adv, m)
    with pytest.raises(ValueError, match=r"mask: expected shape \(3, 5\)"):
        grpo_loss(L, tok, old, adv, m[:2])
    with pytest.raises(ValueError, match=r"advantages: expected shape \(3,\) or \(3, 5\)"):
        grpo_loss(L, tok, old, adv[:2], m)
    with pytest.raises(TypeError, match=r"tokens: expected dtype in \(int32, int64\)"):
        grpo_loss(L, tok.float(), old, adv, m)
    with pytest.raises(ValueError, match=r"temperature: expected a finite number > 0, got 0.0"):
        grpo_loss(L, tok, old, adv, m, temperature=0.0)
    with pytest.raises(TypeError, match=r"inplace_backward: expected a bool, got int"):
        grpo_loss(L, tok, old, adv, m, inplace_backward=1)
    with pytest.raises(ValueError, match=r"ref_logp: expected a \[B, T\] tensor because kl_coef"):
        grpo_loss(L, tok, old, adv, m, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"clip_low: expected a number >= 0.0"):
        grpo_loss(L, tok, old, adv, m, clip_low=-1.0)
    with pytest.raises(ValueError, match=r"agg: expected one of"):
        grpo_loss(L, tok, old, adv, m, agg="sum")


def test_grpo_opcheck():
    inp = make_inputs(B=2, T=3, V=11, seed=26, special_rows=False)
    inp["tokens"][1, 2] = -100
    from rlkernels._policy_options import PolicyOptions
    for kw, norm, ref in [(dict(), None, None),
                          (dict(kl_coef=0.1, entropy_coef=0.01, agg="seq-mean-token-mean"),
                           torch.tensor(4.0), inp["ref_logp"].float())]:
        modes, nums = PolicyOptions.from_kwargs(**kw).encode()
        args = (inp["logits"].float().reshape(6, 11).requires_grad_(True), inp["tokens"],
                inp["old_logp"].float(), inp["advantages"].float(), inp["mask"], norm, ref,
                None, 0.8, modes, nums, "torch", False)
        torch.library.opcheck(torch.ops.rlkernels.grpo_loss.default, args)


def _compile_inputs():
    inp = make_inputs(seed=27)
    kw = dict(ref_logp=inp["ref_logp"].float(), kl_coef=0.1, entropy_coef=0.01,
              temperature=0.9)
    args = (inp["tokens"], inp["old_logp"].float(), inp["advantages"].float(), inp["mask"])
    return inp["logits"].float(), args, kw


def test_grpo_compile_matches_eager(backend):
    """fullgraph compile of the forward (no graph break); backward runs the compiled graph's
    backward (the custom backward op). Equal to eager."""
    logits, args, kw = _compile_inputs()

    def fwd(x):
        loss, metrics = grpo_loss(x, *args, backend=backend, **kw)
        return loss, metrics["clipfrac"], metrics["entropy"], metrics["kl"]

    results = []
    for f in (fwd, torch.compile(fwd, fullgraph=True, backend="aot_eager")):
        x = logits.clone().requires_grad_(True)
        out = f(x)
        (g,) = torch.autograd.grad(out[0], x)
        results.append(out + (g,))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_grpo_compile_with_backward_in_graph(backend):
    logits, args, kw = _compile_inputs()

    def step(x):
        loss, metrics = grpo_loss(x, *args, backend=backend, **kw)
        (g,) = torch.autograd.grad(loss, x)
        return loss.detach(), metrics["clipfrac"], g

    x = logits.clone().requires_grad_(True)
    eager = step(x)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_public_name():
    assert rlkernels.grpo_loss is grpo_loss


@pytest.mark.parametrize("entropy_coef", [0.0, 0.02])
def test_grpo_masked_rows_are_not_read_in_backward(entropy_coef):
    """Issue 18: a masked position's upstream gradients are exactly 0, so the triton backward
    writes a zero gradient row without reading its logits; NaN / inf there (garbage in a
    padded position) gives a finite loss and an exactly-zero gradient row, and every other
    row is unchanged."""
    naive.needs("triton", "policy", "grpo_loss")
    inp = make_inputs(seed=5)
    mask = inp["mask"].clone()
    mask[0, 3] = False
    mask[2, 4] = False
    inp = dict(inp, mask=mask)
    _, _, g_clean = fused(inp, "triton", entropy_coef=entropy_coef)
    dirty = inp["logits"].clone()
    dirty[0, 3] = float("nan")
    dirty[2, 4, 7] = float("inf")
    loss, _, g = fused(dict(inp, logits=dirty), "triton", entropy_coef=entropy_coef)
    assert torch.isfinite(loss)
    assert (g[0, 3] == 0).all() and (g[2, 4] == 0).all()
    keep = mask.cpu().clone()
    assert torch.equal(g[keep], g_clean[keep])
