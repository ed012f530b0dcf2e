"""Tests of the fused lm_head ops (SPEC 3.4): ``linear_token_logprobs`` and
``linear_grpo_loss``, which must equal ``token_logprobs`` / ``grpo_loss`` of the logits
``hidden @ weight.T + bias`` without ever materializing them.

References: the naive fp64 formulas of ``tests/_policy_naive.py`` on explicitly formed fp64
logits (plain autograd through the matmul gives the gradients w.r.t. hidden, weight and bias),
and the public logits ops on the same fp64 logits.

Shapes: H=13, V=37 (neither a multiple of any block size), hidden [B=3, T=5, H] (N=15 rows);
rows include padding tokens (-100).
"""

from __future__ import annotations

import pytest
import torch

import rlkernels
import rlkernels.reference
import _policy_naive as naive  # tests/ is on sys.path (tests/conftest.py)
from rlkernels import grpo_loss, linear_grpo_loss, linear_token_logprobs, token_logprobs

F64 = torch.float64
B, T, H, V = 3, 5, 13, 37
DEV = naive.DEVICE  # the ops run here; the fp64 references on the CPU


@pytest.fixture(autouse=True)
def _needs_linear_ops(request):
    if "backend" in request.fixturenames:
        backend = request.getfixturevalue("backend")
        naive.needs(backend, "linear", "linear_token_logprobs")
        naive.needs(backend, "linear", "linear_grpo_loss")


def make_inputs(seed=0, *, b=B, t=T, h=H, v=V, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = scale * torch.randn(b, t, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) / h ** 0.5 * 2.0
    bias = 0.5 * torch.randn(v, generator=g, dtype=F64)
    tokens = torch.randint(0, v, (b, t), generator=g)
    tokens[0, 1] = -100
    if t > 3:
        tokens[b - 1, 3] = -100
    mask = (torch.rand(b, t, generator=g) > 0.2) | (torch.arange(t) == 0)
    with torch.no_grad():
        lp, _ = naive.logprobs_entropy(hidden @ weight.T + bias, tokens)
    old = torch.where(tokens == -100, 0.0, lp + 0.3 * torch.randn(b, t, generator=g, dtype=F64))
    advantages = torch.randn(b, generator=g, dtype=F64)
    ref = old + 0.2 * torch.randn(b, t, generator=g, dtype=F64)
    return dict(hidden=hidden, weight=weight, bias=bias, tokens=tokens, old_logp=old,
                advantages=advantages, mask=mask, ref_logp=ref)


def on(device, inp):
    return {k: v.to(device) for k, v in inp.items()}


def leaves(inp, dtype, with_bias, device="cpu"):
    def leaf(x):
        return x.detach().to(device=device, dtype=dtype).clone().requires_grad_(True)
    return leaf(inp["hidden"]), leaf(inp["weight"]), leaf(inp["bias"]) if with_bias else None


def grads_of(out, params, upstream):
    params = [p for p in params if p is not None]
    return tuple(g.cpu() for g in torch.autograd.grad(out, params, upstream))


def upstreams(seed, shape):
    g = torch.Generator().manual_seed(100 + seed)
    return torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)


def linear_grad_bound(g, g_ref):
    """SPEC 5's bound for bf16 (the final rounding dominates). For fp32 the logits come from
    an fp32 GEMM of H terms rather than being exact inputs, so each gradient also carries
    about H ulp of the logits: ``(2 + H) eps max|g_ref| + 1e-7`` (the plain SPEC 5 bound
    fails by ~20%; see test_linear_grpo_loss_fp32_spec5_gradient_bound)."""
    if g.dtype != torch.float32:
        return naive.grad_bound(g, g_ref)
    tol = (2 + H) * torch.finfo(torch.float32).eps * g_ref.abs().max().item() + 1e-7
    err = (g.double() - g_ref.double()).abs().max().item()
    assert err <= tol, f"gradient error {err:.3e} > {tol:.3e}"


# ==================================================================== linear_token_logprobs

def lin_logprobs(inp, backend, dtype=F64, *, with_bias=True, temperature=1.0, entropy=True,
                 tokens=None):
    """On DEV; results on the CPU (inputs are CPU tensors)."""
    tokens = (inp["tokens"] if tokens is None else tokens).to(DEV)
    h, w, b = leaves(inp, dtype, with_bias, DEV)
    out = linear_token_logprobs(h, w, tokens, bias=b, temperature=temperature,
                                return_entropy=entropy, backend=backend)
    lp, ent = out if entropy else (out, None)
    u_lp, u_ent = upstreams(0, tokens.shape)
    outs = [lp] + ([ent] if entropy else [])
    ups = [u_lp.to(lp), u_ent.to(lp)][:len(outs)]
    grads = grads_of(outs, [h, w, b], ups)
    return lp.detach().cpu(), None if ent is None else ent.detach().cpu(), grads


def naive_logprobs(inp, *, with_bias=True, temperature=1.0, entropy=True, tokens=None,
                   via_library=False, backend="torch"):
    """fp64: explicit logits, then the naive log_softmax (or the public token_logprobs)."""
    tokens = inp["tokens"] if tokens is None else tokens
    h, w, b = leaves(inp, F64, with_bias)
    logits = h @ w.T + (b if b is not None else 0.0)
    if via_library:
        lp, ent = token_logprobs(logits, tokens, temperature=temperature, return_entropy=True,
                                 backend=backend)
    else:
        lp, ent = naive.logprobs_entropy(logits, tokens, temperature)
    u_lp, u_ent = upstreams(0, tokens.shape)
    outs = [lp] + ([ent] if entropy else [])
    ups = [u_lp] + ([u_ent] if entropy else [])
    return lp.detach(), ent.detach() if entropy else None, grads_of(outs, [h, w, b], ups)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("entropy", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_linear_token_logprobs_matches_logits(backend, with_bias, entropy, temperature):
    inp = make_inputs(1)
    lp, ent, grads = lin_logprobs(inp, backend, with_bias=with_bias, temperature=temperature,
                                  entropy=entropy)
    assert lp.shape == (B, T) and lp.dtype == F64
    for via_library in (False, True):
        lp_r, ent_r, grads_r = naive_logprobs(inp, with_bias=with_bias, entropy=entropy,
                                              temperature=temperature, via_library=via_library)
        torch.testing.assert_close(lp, lp_r, atol=1e-12, rtol=1e-10)
        if entropy:
            torch.testing.assert_close(ent, ent_r, atol=1e-12, rtol=1e-10)
        assert len(grads) == len(grads_r) == (3 if with_bias else 2)
        for g, g_r in zip(grads, grads_r):
            torch.testing.assert_close(g, g_r, atol=1e-12, rtol=1e-10)
    pad = inp["tokens"] == -100
    assert (lp[pad] == 0).all() and (grads[0][pad] == 0).all()  # padding rows of d hidden
    if entropy:
        assert (ent[pad] == 0).all()


def test_linear_token_logprobs_leading_dims(backend):
    """hidden [N, H] and [B, T, H] give the same rows; outputs take the shape of tokens."""
    inp = make_inputs(2)
    inp = on(DEV, inp)
    lp3, ent3 = linear_token_logprobs(inp["hidden"], inp["weight"], inp["tokens"],
                                      bias=inp["bias"], return_entropy=True, backend=backend)
    lp2, ent2 = linear_token_logprobs(inp["hidden"].reshape(-1, H), inp["weight"],
                                      inp["tokens"].reshape(-1), bias=inp["bias"],
                                      return_entropy=True, backend=backend)
    assert lp2.shape == (B * T,)
    assert torch.equal(lp3.reshape(-1), lp2) and torch.equal(ent3.reshape(-1), ent2)
    only = linear_token_logprobs(inp["hidden"], inp["weight"], inp["tokens"], bias=inp["bias"],
                                 backend=backend)
    assert isinstance(only, torch.Tensor) and torch.equal(only, lp3)


def test_linear_token_logprobs_gradcheck(backend):
    inp = on(DEV, make_inputs(3, b=2, t=2, h=3, v=5))

    def f(h, w, b):
        lp, ent = linear_token_logprobs(h, w, inp["tokens"], bias=b, temperature=0.8,
                                        return_entropy=True, backend=backend)
        return lp, ent

    args = [inp[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_token_logprobs_low_precision(backend, dtype, with_bias):
    """SPEC 5 against fp64 on the same (exactly representable) values (gradients: see
    ``linear_grad_bound``)."""
    inp = make_inputs(4)
    for k in ("hidden", "weight", "bias"):
        inp[k] = inp[k].to(dtype).double()
    lp, ent, grads = lin_logprobs(inp, backend, dtype, with_bias=with_bias)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert all(g.dtype == dtype for g in grads)
    lp_r, ent_r, grads_r = naive_logprobs(inp, with_bias=with_bias)
    torch.testing.assert_close(lp.double(), lp_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), ent_r, atol=1e-5, rtol=1e-5)
    for g, g_r in zip(grads, grads_r):
        linear_grad_bound(g, g_r)


# ========================================================================= linear_grpo_loss

GRPO_CASES = {
    "ppo": dict(),
    "gspo-kl": dict(ratio_level="sequence", clip_low=0.03, clip_high=0.04, ref="ref",
                    kl_coef=0.1, agg="seq-mean-token-mean"),
    "cispo-entropy": dict(loss="cispo", clip_high=0.28, entropy_coef=0.02,
                          agg="seq-mean-token-sum"),
    "temperature-normalizer": dict(temperature=0.7, normalizer=12, dual_clip=2.0),
}


def _grpo_kw(inp, case):
    kw = dict(GRPO_CASES[case])
    if kw.pop("ref", None):
        kw["ref_logp"] = inp["ref_logp"]
    return kw


def lin_grpo(inp, backend, dtype=F64, *, with_bias=True, **kw):
    """On DEV; results on the CPU (inputs are CPU tensors)."""
    h, w, b = leaves(inp, dtype, with_bias, DEV)
    d = on(DEV, {k: inp[k] for k in ("tokens", "old_logp", "advantages", "mask")})
    kw = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss, metrics = linear_grpo_loss(h, w, d["tokens"], d["old_logp"], d["advantages"],
                                     d["mask"], bias=b, backend=backend, **kw)
    grads = torch.autograd.grad(loss, [p for p in (h, w, b) if p is not None])
    return (loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()},
            tuple(g.cpu() for g in grads))


def logits_grpo(inp, *, with_bias=True, via_library=False, backend="torch", **kw):
    h, w, b = leaves(inp, F64, with_bias)
    logits = h @ w.T + (b if b is not None else 0.0)
    args = (inp["tokens"], inp["old_logp"].double(), inp["advantages"].double(), inp["mask"])
    if "ref_logp" in kw:
        kw["ref_logp"] = kw["ref_logp"].double()
    if via_library:
        loss, metrics = grpo_loss(logits, *args, backend=backend, **kw)
    else:
        loss, metrics = naive.grpo_loss(logits, *args, **kw)
    grads = torch.autograd.grad(loss, [p for p in (h, w, b) if p is not None])
    return loss.detach(), metrics, grads


def close_metrics(m, m_ref, tol):
    assert set(m) == set(m_ref), (sorted(m), sorted(m_ref))
    for k in m:
        assert m[k].dim() == 0 and m[k].dtype == torch.float32 and not m[k].requires_grad, k
        torch.testing.assert_close(m[k].double(), m_ref[k].double(), atol=tol, rtol=tol,
                                   msg=lambda s: f"metric {k}: {s}")


@pytest.mark.parametrize("case", list(GRPO_CASES))
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_grpo_loss_matches_logits(backend, case, with_bias):
    inp = make_inputs(5)
    loss, metrics, grads = lin_grpo(inp, backend, with_bias=with_bias, **_grpo_kw(inp, case))
    assert loss.dtype == F64 and "entropy" in metrics
    for via_library in (False, True):
        loss_r, metrics_r, grads_r = logits_grpo(inp, with_bias=with_bias,
                                                 via_library=via_library, **_grpo_kw(inp, case))
        torch.testing.assert_close(loss, loss_r, atol=1e-12, rtol=1e-10)
        close_metrics(metrics, metrics_r, 1e-6)
        assert len(grads) == len(grads_r)
        for g, g_r in zip(grads, grads_r):
            torch.testing.assert_close(g, g_r, atol=1e-12, rtol=1e-10)
    assert (grads[0][inp["tokens"] == -100] == 0).all()


def test_linear_grpo_loss_gradcheck(backend):
    inp = on(DEV, make_inputs(6, b=2, t=2, h=3, v=5))

    def f(h, w, b):
        return linear_grpo_loss(h, w, inp["tokens"], inp["old_logp"], inp["advantages"],
                                inp["mask"], bias=b, ref_logp=inp["ref_logp"], kl_coef=0.1,
                                entropy_coef=0.05, temperature=0.9, backend=backend)[0]

    args = [inp[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["ppo", "cispo-entropy"])
def test_linear_grpo_loss_low_precision(backend, dtype, case):
    inp = make_inputs(7)
    for k in ("hidden", "weight", "bias"):
        inp[k] = inp[k].to(dtype).double()
    for k in ("old_logp", "advantages", "ref_logp"):
        inp[k] = inp[k].float()
    loss, metrics, grads = lin_grpo(inp, backend, dtype, **_grpo_kw(inp, case))
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    loss_r, metrics_r, grads_r = logits_grpo(inp, **_grpo_kw(inp, case))
    torch.testing.assert_close(loss.double(), loss_r, atol=1e-5, rtol=1e-5)
    close_metrics(metrics, metrics_r, 1e-5)
    for g, g_r in zip(grads, grads_r):
        linear_grad_bound(g, g_r)


@pytest.mark.skipif(DEV != "cpu", reason="the failure below was measured with the CPU BLAS")
@pytest.mark.xfail(strict=True, reason=(
    "SPEC 5's gradient bound 2 eps max|g_ref| + 1e-7 is not met in fp32 by the linear ops: "
    "the logits are not exact inputs but an fp32 GEMM of H terms (plus fp32 sums over rows "
    "for d weight); here |d hidden err| = 3.0e-7 > 2.5e-7 and |d weight err| = 5.5e-7 > "
    "4.4e-7 (seed 7, cispo + entropy_coef)"))
def test_linear_grpo_loss_fp32_spec5_gradient_bound(backend):
    inp = make_inputs(7)
    for k in ("hidden", "weight", "bias"):
        inp[k] = inp[k].float().double()
    for k in ("old_logp", "advantages", "ref_logp"):
        inp[k] = inp[k].float()
    _, _, grads = lin_grpo(inp, backend, torch.float32, **_grpo_kw(inp, "cispo-entropy"))
    _, _, grads_r = logits_grpo(inp, **_grpo_kw(inp, "cispo-entropy"))
    for g, g_r in zip(grads, grads_r):
        naive.grad_bound(g, g_r)


# ======================================================================== chunk invariance

def _chunk_runs(inp, backend, dtype, monkeypatch):
    kw = dict(ref_logp=inp["ref_logp"], kl_coef=0.1, entropy_coef=0.01)

    def run():
        lp, ent, g_lp = lin_logprobs(inp, backend, dtype)
        loss, metrics, g_loss = lin_grpo(inp, backend, dtype, **kw)
        return (lp, ent, g_lp[0], loss, *metrics.values(), g_loss[0]), (*g_lp[1:], *g_loss[1:])

    default = run()  # CHUNK_ELEMENTS = 2^22: all 15 rows in one chunk
    with monkeypatch.context() as mp:
        mp.setattr(rlkernels.reference, "CHUNK_ELEMENTS", 2 * V)
        assert len(list(rlkernels.reference.row_chunks(B * T, V))) == 8
        small = run()  # 2-row chunks
    return default, small


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_chunk_invariance(backend, dtype, monkeypatch):
    """Row chunks of 2 rows (CHUNK_ELEMENTS = 2 V) vs the default single chunk: equal up to
    fp32 rounding (1e-6), NOT bit-identical (see the xfail below): the CPU GEMM forming a
    chunk's logits rounds a row differently depending on how many rows the chunk has, and
    d weight / d bias are summed chunk by chunk."""
    (rows_d, red_d), (rows_s, red_s) = _chunk_runs(make_inputs(8), backend, dtype, monkeypatch)
    for a, b in zip(rows_d + red_d, rows_s + red_s):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_linear_batch_invariance_bitwise(backend):
    """SPEC 1 batch invariance: a row alone gives bit-identical results to the same row in a
    batch (the reference pads every GEMM to one row count so the BLAS rounds alike)."""
    inp = on(DEV, make_inputs(8))
    h = inp["hidden"].float().reshape(-1, H)
    w, b, tok = inp["weight"].float(), inp["bias"].float(), inp["tokens"].reshape(-1)
    alone = torch.cat([linear_token_logprobs(h[i:i + 1], w, tok[i:i + 1], bias=b,
                                             backend=backend) for i in range(B * T)])
    together = linear_token_logprobs(h, w, tok, bias=b, backend=backend)
    assert torch.equal(alone, together)


# ===================================== _linear_token_stats (private: TRL's fused lm_head)

from rlkernels.ops.linear import _linear_token_stats  # noqa: E402


def naive_stats(h, w, b, tok, temperature, scale, softcap):
    """The five outputs on explicitly formed fp64 logits ``z = f(h W^T + b) / T``."""
    y = scale * (h @ w.T + b)
    z = (softcap * torch.tanh(y / softcap) if softcap is not None else y) / temperature
    lsm = torch.log_softmax(z, -1)
    valid = tok != -100
    safe = torch.where(valid, tok, 0)
    lp = torch.where(valid, lsm.gather(-1, safe[..., None])[..., 0], 0.0)
    ent = torch.where(valid, -(lsm.exp() * lsm).sum(-1), 0.0)
    lss = torch.where(valid, torch.logsumexp(2 * lsm, -1), 0.0)
    mean = torch.where(valid, z.mean(-1), 0.0)
    top1 = valid & (z.argmax(-1) == tok)
    return lp, ent, lss, mean, top1


@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.6, None), (1.0, 2.0), (1.7, 1.5)])
def test_linear_token_stats_matches_logits(backend, scale, softcap):
    """The private op behind TRL's fused lm_head: every output, and the gradients of the
    log-probs and entropy through the scale and soft cap, against the fp64 formulas on
    explicit logits (Gemma-like caps that saturate some logits)."""
    inp = make_inputs(21, scale=2.0)
    inp["tokens"][1, 0:3] = (scale * (inp["hidden"][1, 0:3] @ inp["weight"].T
                                      + inp["bias"])).argmax(-1)  # top-1 hits
    h, w, b = leaves(inp, F64, True, DEV)
    out = _linear_token_stats(h, w, inp["tokens"].to(DEV), bias=b, temperature=0.8,
                              return_entropy=True, logit_scale=scale, softcap=softcap,
                              extras=True, backend=backend)
    hr, wr, br = leaves(inp, F64, True)
    want = naive_stats(hr, wr, br, inp["tokens"], 0.8, scale, softcap)
    for name, x, r in zip(("logp", "entropy", "log_sum_sq", "mean", "top1"), out, want):
        assert x.shape == (B, T), name
        if name == "top1":
            assert x.dtype == torch.bool and torch.equal(x.cpu(), r), (x, r)
        else:
            assert x.dtype == F64, name
            torch.testing.assert_close(x.detach().cpu(), r.detach(), atol=1e-10, rtol=1e-10,
                                       msg=name)
    assert out[4].sum() >= 3
    assert not out[2].requires_grad and not out[3].requires_grad
    g_lp, g_h = upstreams(21, (B, T))
    got = grads_of((out[0], out[1]), (h, w, b), (g_lp.to(DEV), g_h.to(DEV)))
    ref = grads_of((want[0], want[1]), (hr, wr, br), (g_lp, g_h))
    for x, r in zip(got, ref):
        torch.testing.assert_close(x, r, atol=1e-10, rtol=1e-10)


def test_linear_token_stats_outputs_on_request(backend):
    inp = on(DEV, make_inputs(22))
    out = _linear_token_stats(inp["hidden"], inp["weight"], inp["tokens"], backend=backend)
    assert out[0] is not None and all(x is None for x in out[1:])
    torch.testing.assert_close(out[0], linear_token_logprobs(
        inp["hidden"], inp["weight"], inp["tokens"], backend=backend))
    out = _linear_token_stats(inp["hidden"], inp["weight"], inp["tokens"], extras=True,
                              backend=backend)
    assert out[1] is None and all(x is not None for x in out[2:])


def test_linear_token_stats_gradcheck(backend):
    inp = on(DEV, make_inputs(23, b=2, t=2, h=3, v=5, scale=3.0))

    def f(h, w, b):
        return _linear_token_stats(h, w, inp["tokens"], bias=b, temperature=0.8,
                                   return_entropy=True, logit_scale=1.3, softcap=2.0,
                                   backend=backend)[:2]

    args = [inp[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
    assert torch.autograd.gradcheck(f, tuple(args))


def test_linear_token_stats_compiles():
    """``torch.compile(fullgraph=True)`` on the CPU path: same values and gradients."""
    inp = make_inputs(25)
    h, w, b = leaves(inp, torch.float32, True)

    def f(h, w, b):
        lp, ent, lss, mean, top1 = _linear_token_stats(
            h, w, inp["tokens"], bias=b, temperature=0.9, return_entropy=True,
            logit_scale=0.5, softcap=3.0, extras=True, backend="torch")
        return lp.sum() + ent.sum(), lss, mean, top1

    got, want = torch.compile(f, fullgraph=True)(h, w, b), f(h, w, b)
    for x, r in zip(got, want):
        torch.testing.assert_close(x, r)
    for x, r in zip(torch.autograd.grad(got[0], (h, w, b)),
                    torch.autograd.grad(want[0], (h, w, b))):
        torch.testing.assert_close(x, r)


def test_linear_token_stats_errors():
    inp = make_inputs(24)
    args = (inp["hidden"], inp["weight"], inp["tokens"])
    with pytest.raises(ValueError, match=r"softcap: expected None or a nonzero float \(the cap "
                                         r"c of c \* tanh\(u / c\)\), got 0.0"):
        _linear_token_stats(*args, softcap=0.0)
    with pytest.raises(ValueError, match=r"softcap: expected a finite number, got inf"):
        _linear_token_stats(*args, softcap=float("inf"))
    with pytest.raises(ValueError, match=r"logit_scale: expected a finite number, got nan"):
        _linear_token_stats(*args, logit_scale=float("nan"))
    with pytest.raises(TypeError, match=r"logit_scale: expected a float, got str"):
        _linear_token_stats(*args, logit_scale="2")
    with pytest.raises(TypeError, match=r"extras: expected a bool, got str"):
        _linear_token_stats(*args, extras="yes")
    with pytest.raises(ValueError, match=r"hidden: expected a last dimension of 13"):
        _linear_token_stats(inp["hidden"][..., :12], *args[1:])


# ========================================================================== head_precision

@pytest.mark.parametrize("prec", ["bf16", "tf32", "fp32"])
def test_head_precision_against_fp64(backend, prec):
    """``head_precision`` on the public ops (SPEC 6), fp32 inputs that bf16 does not hold
    exactly: ``"bf16"`` equals the fp64 ops on hidden / weight rounded to bf16 (log-probs
    within 1e-5, gradients within bf16's bound: ``d logits`` is rounded to bf16 too),
    ``"fp32"`` and ``"tf32"`` (fp32 off a GPU) the fp64 ops on the inputs as they are. The
    same for ``linear_grpo_loss``'s loss and gradients."""
    if prec == "tf32" and DEV == "cuda":
        pytest.skip("tf32 on a GPU rounds the operands to 10 bits: not fp32-exact")
    inp = make_inputs(3)
    tok = inp["tokens"].to(DEV)
    h, w, b = leaves(inp, torch.float32, True, DEV)
    lp, ent = linear_token_logprobs(h, w, tok, bias=b, return_entropy=True,
                                    head_precision=prec, backend=backend)
    u_lp, u_ent = upstreams(0, tok.shape)
    grads = grads_of([lp, ent], [h, w, b], [u_lp.to(lp), u_ent.to(lp)])
    ref_inp = dict(inp)
    rounding = torch.bfloat16 if prec == "bf16" else torch.float32
    for key in ("hidden", "weight"):
        ref_inp[key] = inp[key].to(rounding).double()
    ref_inp["bias"] = inp["bias"].float().double()
    lp_r, ent_r, grads_r = naive_logprobs(ref_inp)
    torch.testing.assert_close(lp.detach().cpu().double(), lp_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.detach().cpu().double(), ent_r, atol=1e-5, rtol=1e-5)
    for g, g_r in zip(grads, grads_r):
        if prec == "bf16":  # d logits rounded to bf16 before the backward GEMMs
            tol = (2 + H) * torch.finfo(torch.bfloat16).eps * g_r.abs().max().item() + 1e-7
            assert (g.double() - g_r).abs().max().item() <= tol
        else:
            linear_grad_bound(g, g_r)
    if prec == "bf16":  # the rounding happened: far from the unrounded fp64 log-probs
        lp_exact = naive_logprobs(inp)[0]
        assert (lp.detach().cpu().double() - lp_exact).abs().max() > 1e-4
    # linear_grpo_loss: the loss of the log-probs above, its gradients through the same head
    pol = {k: inp[k].to(DEV) for k in ("old_logp", "advantages", "mask")}
    h2, w2, _ = leaves(inp, torch.float32, False, DEV)
    loss, _ = linear_grpo_loss(h2, w2, tok, pol["old_logp"].float(), pol["advantages"].float(),
                               pol["mask"], head_precision=prec, backend=backend)
    h3, w3, _ = leaves(ref_inp, F64, False)
    loss_r, _ = linear_grpo_loss(h3, w3, inp["tokens"], inp["old_logp"], inp["advantages"],
                                 inp["mask"], backend="torch")
    torch.testing.assert_close(loss.detach().cpu().double(), loss_r.detach(), atol=1e-5,
                               rtol=1e-5)
    g_loss = torch.autograd.grad(loss, [h2, w2])
    g_loss_r = torch.autograd.grad(loss_r, [h3, w3])
    for g, g_r in zip(g_loss, g_loss_r):
        eps = torch.finfo(torch.bfloat16 if prec == "bf16" else torch.float32).eps
        tol = (2 + H) * eps * g_r.abs().max().item() + 1e-7
        assert (g.cpu().double() - g_r).abs().max().item() <= tol


# ================================================================================ opcheck

def test_linear_opcheck():
    inp = on(DEV, make_inputs(9, b=2, t=3, h=4, v=6))
    h = inp["hidden"].float().reshape(6, 4).requires_grad_(True)
    w = inp["weight"].float().requires_grad_(True)
    b = inp["bias"].float().requires_grad_(True)
    tokens = inp["tokens"]
    torch.library.opcheck(torch.ops.rlkernels.linear_token_logprobs.default,
                          (h, w, b, tokens.reshape(-1), 0.8, -100, True, "torch"))
    torch.library.opcheck(torch.ops.rlkernels.linear_token_logprobs.default,
                          (h, w, None, tokens.reshape(-1), 1.0, -100, False, "torch"))
    torch.library.opcheck(torch.ops.rlkernels.linear_token_logprobs.default,
                          (h, w, b, tokens.reshape(-1), 0.8, -100, True, "torch", "bf16"))
    torch.library.opcheck(torch.ops.rlkernels.linear_token_stats.default,
                          (h, w, b, tokens.reshape(-1), 0.8, -100, True, 1.3, 2.0, True,
                           "torch"))
    from rlkernels._policy_options import PolicyOptions
    modes, nums = PolicyOptions.from_kwargs(entropy_coef=0.01).encode()
    torch.library.opcheck(torch.ops.rlkernels.linear_grpo_loss.default,
                          (h, w, b, tokens, inp["old_logp"].float(),
                           inp["advantages"].float(), inp["mask"], None, None, None, 1.0,
                           modes, nums, "torch"))


# ================================================================================= errors

def test_linear_errors():
    inp = make_inputs(10)
    hd, w, bias, tok = inp["hidden"], inp["weight"], inp["bias"], inp["tokens"]
    pol = (inp["old_logp"], inp["advantages"], inp["mask"])
    for name, f in (("linear_token_logprobs", lambda *a, **k: linear_token_logprobs(*a, **k)),
                    ("linear_grpo_loss", lambda h_, w_, t_, **k: linear_grpo_loss(
                        h_, w_, t_, *pol, **k))):
        with pytest.raises(ValueError, match=r"hidden: expected a last dimension of 13 \(H of "
                                             r"weight \[V, H\]\), got shape \(3, 5, 12\)"):
            f(hd[..., :12], w, tok)
        with pytest.raises(ValueError, match=r"weight: expected a 2-d tensor, got shape "
                                             r"\(37, 13, 1\)"):
            f(hd, w[..., None], tok)
        with pytest.raises(ValueError, match=r"bias: expected shape \(37,\) .*got \(36,\)"):
            f(hd, w, tok, bias=bias[:36])
        with pytest.raises(ValueError, match=r"bias: expected shape \(37,\)"):
            f(hd, w, tok, bias=bias[None])
        with pytest.raises(TypeError, match=r"weight: expected dtype float32 \(the dtype of "
                                            r"hidden\), got float64"):
            f(hd.float(), w, tok)
        with pytest.raises(TypeError, match=r"bias: expected dtype float64 \(the dtype of "
                                            r"hidden\), got bfloat16"):
            f(hd, w, tok, bias=bias.bfloat16())
        with pytest.raises(ValueError, match=r"tokens: expected shape \(3, 5\)"):
            f(hd, w, tok[:, :4])
        with pytest.raises(ValueError, match=r"temperature: expected a finite number > 0"):
            f(hd, w, tok, temperature=-1.0)
        with pytest.raises(ValueError, match=r"head_precision: expected None or one of 'bf16', "
                                             r"'tf32', 'fp32', got 'fp16'"):
            f(hd, w, tok, head_precision="fp16")
    with pytest.raises(ValueError, match=r"hidden: expected a 3-d tensor \[B, T, H\]"):
        linear_grpo_loss(hd.reshape(15, 13), w, tok.reshape(15), *pol)
    with pytest.raises(TypeError, match=r"linear_grpo_loss: unexpected keyword argument\(s\) "
                                        r"inplace_backward"):
        linear_grpo_loss(hd, w, tok, *pol, inplace_backward=True)
    for f, args in ((linear_token_logprobs, ()), (linear_grpo_loss, pol)):
        with pytest.raises(TypeError, match=r"process_group: expected a torch.distributed "
                                            r"ProcessGroup \(or None\), got object"):
            f(hd, w, tok, *args, process_group=object())


def test_public_names():
    assert rlkernels.linear_token_logprobs is linear_token_logprobs
    assert rlkernels.linear_grpo_loss is linear_grpo_loss
