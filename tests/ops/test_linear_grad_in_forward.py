"""``linear_grpo_loss(..., grad_in_forward=True)`` (issue 20): the forward forms ``d loss /
d hidden``, ``d weight`` and ``d bias`` for an upstream gradient of 1 (on the triton backend
with token-level losses: one walk over the row chunks, three GEMMs; elsewhere the composition
of the forward and the backward), and the backward only scales them by the upstream scalar.

Reference: the default path (``grad_in_forward=False``) of the same backend on the same inputs
(its gradients are checked against the fp64 formula by tests/ops/test_linear.py), on the
cuBLAS path (``_path="cublas"``: the same row chunks and forward kernels as the chunk loop,
so the loss and metrics are bit-identical), and the fp64 torch backend for the low
precisions and the head precisions.

Shapes: B=3, T=5, H=16, an odd vocabulary (V=37), a padding token left unmasked on purpose,
a masked real token, a peaked row (a hidden state scaled by 40).
"""

from __future__ import annotations

import pytest
import torch

import _policy_naive as naive  # tests/ is on sys.path (tests/conftest.py)
from rlkernels import linear_grpo_loss
from rlkernels._fused import one_pass
from rlkernels._policy_options import PolicyOptions
from rlkernels.ops._table import OPS, GradInForward

F64 = torch.float64
DEV = naive.DEVICE
H, V = 16, 37


@pytest.fixture(autouse=True)
def _needs_linear(request):
    if "backend" in request.fixturenames:
        naive.needs(request.getfixturevalue("backend"), "linear", "linear_grpo_loss")


def _inputs(B=3, T=5, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=F64)
    hidden[2, 1] *= 40.0                                        # a peaked row
    weight = 0.5 * torch.randn(V, H, generator=g, dtype=F64)
    bias = 0.3 * torch.randn(V, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, 2] = -100                    # padding, masked
    tokens[1, 4] = -100                    # padding, left unmasked on purpose
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    mask[0, 2], mask[1, 4], mask[2, 2] = False, True, False     # [2, 2]: a masked real token
    logits = hidden @ weight.T + bias
    lp = torch.log_softmax(logits, -1).gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
    old = torch.where(tokens == -100, 0.0, lp + 0.3 * torch.randn(B, T, generator=g,
                                                                   dtype=F64))
    out = dict(hidden=hidden, weight=weight, bias=bias, tokens=tokens, old_logp=old,
               advantages=torch.randn(B, generator=g, dtype=F64), mask=mask,
               ref_logp=old + 0.2 * torch.randn(B, T, generator=g, dtype=F64),
               is_weights=0.5 + torch.rand(B, T, generator=g, dtype=F64))
    return {k: v.to(DEV) for k, v in out.items()}


# the chunk loop's losses (token-level ratios), then two that fall back to the composition
CASES = {
    "ppo": dict(),
    "ppo-dual-delta-isw": dict(clip_high=0.28, dual_clip=2.0, delta=1.5, is_weights="isw"),
    "cispo-seqmean": dict(loss="cispo", clip_high=0.28, agg="seq-mean-token-mean"),
    "reinforce": dict(loss="reinforce", agg="seq-mean-token-sum"),
    "kl-entropy": dict(ref_logp="ref", kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
                       agg="seq-mean-token-sum-norm"),
    "normalizer-temperature": dict(normalizer=20, temperature=0.7, entropy_coef=0.05,
                                   ref_logp="ref", kl_coef=0.05, kl_estimator="k3_is"),
    "sapo": dict(loss="sapo"),
    "dppo_kl": dict(loss="dppo_kl", clip_low=0.3, clip_high=0.3),
    "dro-luspo": dict(loss="dro", dro_beta=0.1, agg="seq-mean-token-sum"),
    "gspo": dict(ratio_level="sequence", clip_low=0.03, clip_high=0.04),
    "gmpo": dict(loss="gmpo", entropy_coef=0.01),
}
SCALES = (1.0, 0.37, 0.0, -1.7)


def _kw(inp, case):
    kw = dict(CASES[case])
    for key, name in (("is_weights", "isw"), ("ref_logp", "ref")):
        if kw.get(key) == name:
            kw[key] = inp[key]
    return kw


def _run(inp, backend, scale, *, gif, dtype=F64, with_bias=True, path="cublas", **kw):
    """(loss, metrics, (d hidden, d weight, d bias)) of ``scale * loss``, on the CPU."""
    leaves = [inp[k].detach().to(dtype).clone().requires_grad_(True)
              for k in ("hidden", "weight", "bias")]
    if not with_bias:
        leaves[2] = None
    h, w, b = leaves
    loss, metrics = linear_grpo_loss(h, w, inp["tokens"], inp["old_logp"], inp["advantages"],
                                     inp["mask"], bias=b, backend=backend, grad_in_forward=gif,
                                     _path=path, **kw)
    grads = torch.autograd.grad(loss * scale, [x for x in leaves if x is not None])
    return (loss.detach().cpu(), {k: v.detach().cpu() for k, v in metrics.items()},
            tuple(g.cpu() for g in grads))


def _same_outputs(a, b):
    assert torch.equal(a[0], b[0])  # the same forward kernels, the same chunks: bit-identical
    assert set(a[1]) == set(b[1]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("case", list(CASES))
def test_gif_matches_default_fp64(backend, case):
    """Every upstream scalar (1, 0.37, 0, negative): the loss and metrics bit for bit, the
    three gradients to fp64 round-off, zero hidden rows at padding (masked or not) and at
    masked tokens, all zero for 0; the token-level cases take the chunk loop on triton."""
    inp = _inputs(seed=len(case))
    kw = _kw(inp, case)
    assert one_pass(PolicyOptions.from_kwargs(
        **{k: v for k, v in kw.items() if k not in ("is_weights", "ref_logp", "normalizer",
                                                    "temperature")})) == \
        (case not in ("gspo", "gmpo"))
    zero_rows = ((inp["tokens"] == -100) | ~inp["mask"]).cpu().reshape(-1)
    for scale in SCALES:
        ref = _run(inp, backend, scale, gif=False, **kw)
        got = _run(inp, backend, scale, gif=True, **kw)
        _same_outputs(got, ref)
        for g, g_r in zip(got[2], ref[2]):
            torch.testing.assert_close(g, g_r, atol=1e-14, rtol=1e-12)
        assert (got[2][0].reshape(-1, H)[zero_rows] == 0).all()
        if scale == 0.0:
            assert all((g == 0).all() for g in got[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["ppo", "kl-entropy", "gspo"])
def test_gif_low_precision(backend, dtype, case):
    """fp32 / bf16 inputs: the loss equals the default (cuBLAS) path's, and the gradients
    are no further from the fp64 ones (torch backend on the same, representable, values)
    than twice the default path's error (the sums run in another order) plus SPEC 5's
    ``2 eps max|g| + 1e-7`` (the product by the scalar rounded once more), for scales 1,
    0.37 and negative; the default path's error itself is within ``(2 + H) eps max|g| +
    1e-7`` times the peaked row's logit scale (tests/ops/test_linear.py's bound)."""
    inp = _inputs(seed=40 + len(case))
    for k in ("hidden", "weight", "bias"):
        inp[k] = inp[k].to(dtype).double()  # values representable in dtype
    kw = _kw(inp, case)
    eps = torch.finfo(dtype).eps
    for scale in (1.0, 0.37, -1.7):
        exact = _run(inp, "torch", scale, gif=False, **kw)
        ref = _run(inp, backend, scale, gif=False, dtype=dtype, **kw)
        got = _run(inp, backend, scale, gif=True, dtype=dtype, **kw)
        _same_outputs(got, ref)
        torch.testing.assert_close(got[0].double(), exact[0], atol=1e-5, rtol=1e-5)
        for g, g_ref, g_x in zip(got[2], ref[2], exact[2]):
            assert g.dtype == dtype
            err_ref = (g_ref.double() - g_x).abs().max().item()
            assert err_ref <= 40 * (2 + H) * eps * g_x.abs().max().item() + 1e-7
            tol = 2 * err_ref + 2 * eps * g_x.abs().max().item() + 1e-7
            assert (g.double() - g_x).abs().max().item() <= tol


@pytest.mark.parametrize("prec", ["bf16", "tf32", "fp32"])
def test_gif_head_precision_against_fp64(backend, prec):
    """``head_precision`` with grad_in_forward (fp32 inputs that bf16 does not hold): the
    loss of the fp64 torch op on hidden / weight rounded to the head precision (tf32 = fp32
    off a GPU) within 1e-5, the gradients no further from its gradients than twice the
    default path's (with the same head precision) plus ``2 eps max|g| + 1e-7``, and that
    error within ``40 (2 + H) eps max|g| + 1e-7`` (bf16's eps for "bf16": ``d z`` is
    rounded to bf16 before GEMMs 2 and 3; 40: the peaked row's logit scale); "bf16"
    visibly rounds."""
    if prec == "tf32" and DEV == "cuda":
        pytest.skip("tf32 on a GPU rounds the operands to 10 bits: not fp32-exact")
    inp = _inputs(seed=7)
    kw = dict(entropy_coef=0.02, ref_logp=inp["ref_logp"], kl_coef=0.05)
    got = _run(inp, backend, 1.0, gif=True, dtype=torch.float32, head_precision=prec, **kw)
    ref_inp = dict(inp)
    rounding = torch.bfloat16 if prec == "bf16" else torch.float32
    for key in ("hidden", "weight"):
        ref_inp[key] = inp[key].to(rounding).double()
    ref_inp["bias"] = inp["bias"].float().double()
    ref = _run(ref_inp, "torch", 1.0, gif=False, **kw)
    plain = _run(inp, backend, 1.0, gif=False, dtype=torch.float32, head_precision=prec, **kw)
    _same_outputs(got, plain)
    torch.testing.assert_close(got[0].double(), ref[0], atol=1e-5, rtol=1e-5)
    eps = torch.finfo(rounding).eps
    for g, g_p, g_r in zip(got[2], plain[2], ref[2]):
        err_plain = (g_p.double() - g_r).abs().max().item()
        assert err_plain <= 40 * (2 + H) * eps * g_r.abs().max().item() + 1e-7
        tol = 2 * err_plain + 2 * eps * g_r.abs().max().item() + 1e-7
        assert (g.double() - g_r).abs().max().item() <= tol
    if prec == "bf16":
        exact = _run(inp, "torch", 1.0, gif=False, **kw)
        assert (got[0].double() - exact[0]).abs().item() > 1e-7


def test_gif_rows_and_no_bias(backend):
    """``rows=`` (a subset of the positions, unordered) and no bias: equal to the default
    path with the same rows, zero hidden gradient outside them."""
    inp = _inputs(seed=3)
    rows = torch.tensor([7, 0, 3, 11, 12, 4, 14], device=DEV)
    outside = torch.ones(15, dtype=torch.bool)
    outside[rows.cpu()] = False
    kw = dict(rows=rows, entropy_coef=0.01)
    for scale in (1.0, -0.5):
        ref = _run(inp, backend, scale, gif=False, with_bias=False, **kw)
        got = _run(inp, backend, scale, gif=True, with_bias=False, **kw)
        _same_outputs(got, ref)
        assert len(got[2]) == 2
        for g, g_r in zip(got[2], ref[2]):
            torch.testing.assert_close(g, g_r, atol=1e-14, rtol=1e-12)
        assert (got[2][0].reshape(-1, H)[outside] == 0).all()


def test_gif_against_the_triton_kernel_path(backend):
    """The chunk loop against the default (``auto``) path, whose triton kernels form the
    logits in another order: within fp64 round-off; and ``_path="triton"`` with
    grad_in_forward takes the composition of that path."""
    inp = _inputs(seed=5)
    for path in ("auto", "triton"):
        ref = _run(inp, backend, 0.37, gif=False, path=path)
        got = _run(inp, backend, 0.37, gif=True, path=path)
        torch.testing.assert_close(got[0], ref[0], atol=1e-13, rtol=1e-12)
        for g, g_r in zip(got[2], ref[2]):
            torch.testing.assert_close(g, g_r, atol=1e-14, rtol=1e-12)


def test_gif_frozen_weight(backend):
    """Only ``hidden`` requires grad (a frozen lm_head): its gradient equals the default
    path's, nothing else is computed; nothing requires grad: the plain forward runs."""
    inp = _inputs(seed=9)
    out = []
    for gif in (False, True):
        h = inp["hidden"].clone().requires_grad_(True)
        loss, _ = linear_grpo_loss(h, inp["weight"], inp["tokens"], inp["old_logp"],
                                   inp["advantages"], inp["mask"], bias=inp["bias"],
                                   backend=backend, grad_in_forward=gif, _path="cublas")
        out.append(torch.autograd.grad(loss * 0.37, h)[0])
    torch.testing.assert_close(out[1], out[0], atol=1e-14, rtol=1e-12)
    with torch.no_grad():
        loss, _ = linear_grpo_loss(inp["hidden"], inp["weight"], inp["tokens"],
                                   inp["old_logp"], inp["advantages"], inp["mask"],
                                   backend=backend, grad_in_forward=True)
    assert not loss.requires_grad


def test_gif_batch_invariance_bitwise(backend):
    """A row's log-prob and ``d hidden`` are bit-identical alone and inside a batch (fixed
    ``normalizer``, so its per-token gradient is the same; every GEMM call has the same
    shape), fp32; two runs are bit-identical in every output."""
    inp = _inputs(seed=11)
    kw = dict(normalizer=4.0, entropy_coef=0.01)

    def run(sl):
        h = inp["hidden"][sl].float().clone().requires_grad_(True)
        w = inp["weight"].float().clone().requires_grad_(True)
        loss, m = linear_grpo_loss(h, w, inp["tokens"][sl], inp["old_logp"][sl].float(),
                                   inp["advantages"][sl].float(), inp["mask"][sl],
                                   backend=backend, grad_in_forward=True, **kw)
        return (loss.detach(), m["entropy"], *torch.autograd.grad(loss, [h, w]))

    full, again = run(slice(None)), run(slice(None))
    for a, b in zip(full, again):
        assert torch.equal(a, b)
    alone = run(slice(1, 2))
    assert torch.equal(alone[2][0], full[2][1])  # d hidden of sequence 1


def test_gif_backpropagates_once(backend):
    inp = _inputs(seed=2)
    h = inp["hidden"].clone().requires_grad_(True)
    loss, _ = linear_grpo_loss(h, inp["weight"], inp["tokens"], inp["old_logp"],
                               inp["advantages"], inp["mask"], backend=backend,
                               grad_in_forward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagating twice"):
        loss.backward()


def test_gif_errors():
    inp = _inputs(seed=1)
    args = (inp["hidden"], inp["weight"], inp["tokens"], inp["old_logp"], inp["advantages"],
            inp["mask"])
    with pytest.raises(TypeError, match="grad_in_forward"):
        linear_grpo_loss(*args, grad_in_forward=1)
    with pytest.raises(ValueError, match="grad_in_forward: expected False with a "
                                         "process_group"):
        linear_grpo_loss(*args, grad_in_forward=True, process_group=object())


def test_gif_compile_fullgraph(backend):
    """torch.compile(fullgraph=True, aot_eager): no graph break, the same outputs and
    gradients as eager."""
    inp = _inputs(seed=14)
    rest = (inp["tokens"], inp["old_logp"].float(), inp["advantages"].float(), inp["mask"])

    def step(h, w, b):
        loss, m = linear_grpo_loss(h * 1.0, w, *rest, bias=b, backend=backend,
                                   grad_in_forward=True, entropy_coef=0.01)
        return loss * 0.37, m["entropy"]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for f in (step, compiled):
        leaves = [inp[k].float().clone().requires_grad_(True)
                  for k in ("hidden", "weight", "bias")]
        out = f(*leaves)
        results.append((*[o.detach() for o in out], *torch.autograd.grad(out[0], leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_gif_declaration():
    """linear_grpo_loss declares its gif form with three wrt inputs; the family holds the
    scale kernel on each of its backends; the generated op takes need_<wrt> flags."""
    import importlib

    from rlkernels import backends

    op = OPS["linear_grpo_loss"]
    gif = op.grad_in_forward
    assert isinstance(gif, GradInForward) and gif.wrts == ("hidden", "weight", "bias")
    for backend in op.backends:
        try:
            mod = importlib.import_module(f"{backends._PACKAGES[backend]}.{gif.family}")
        except ImportError:  # triton not importable here
            continue
        assert callable(getattr(mod, "linear_grpo_loss_gif_scale_", None)), backend
    schema = str(torch.ops.rlkernels.linear_grpo_loss_gif.default._schema)
    assert "bool need_weight=True" in schema
    assert OPS["grpo_loss"].grad_in_forward.wrts == ("logits",)


def test_gif_opcheck():
    """torch.library.opcheck of the generated gif op (need flags, a gradient not needed and
    no bias: empty outputs) and of the three-input attach op (torch backend, fp32)."""
    inp = _inputs(seed=15)
    modes, nums = PolicyOptions.from_kwargs(kl_coef=0.1, entropy_coef=0.01).encode()
    h = inp["hidden"].float().reshape(-1, H).cpu()
    w, b = inp["weight"].float().cpu(), inp["bias"].float().cpu()
    rest = (inp["tokens"].cpu(), inp["old_logp"].float().cpu(),
            inp["advantages"].float().cpu(), inp["mask"].cpu(), None,
            inp["ref_logp"].float().cpu(), None, 0.8, modes, nums, "torch", None, "auto", None)
    ops = torch.ops.rlkernels
    torch.library.opcheck(ops.linear_grpo_loss_gif.default, (h, w, b, *rest, True, True, True))
    torch.library.opcheck(ops.linear_grpo_loss_gif.default,
                          (h, w, None, *rest, True, False, False))
    torch.library.opcheck(ops.linear_grpo_loss_gif_attach.default,
                          (h.clone().requires_grad_(True), w.clone().requires_grad_(True),
                           None, torch.tensor(1.5), torch.randn_like(h), torch.randn_like(w),
                           torch.empty(0), "torch"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))
