"""``grpo_loss(..., grad_in_forward=True)`` (issue 22): the forward forms ``d loss / d logits``
for an upstream gradient of 1, the backward only scales it by the upstream scalar and reads no
logits.

Reference: the default path (``grad_in_forward=False``) of the same backend on the same
inputs, whose gradient tests/ops/test_grpo.py checks against the naive fp64 formula; in fp64
the two agree to a few ulps (the upstream scalar enters one product earlier or later), in
fp32 / bf16 within SPEC 5's gradient bound (one extra rounding of the product by the scalar),
and both against the fp64 reference.

Shapes: B=3, T=5 and an odd vocabulary (V=37: no multiple of any block size; V=7 for the
gradcheck-sized cases), rows with padding tokens (-100, one masked and one left unmasked on
purpose: its gradient row must still be exactly 0), masked tokens, a peaked row (one logit 30
above the rest, on the sampled token and elsewhere) and a ``-inf`` column.
"""

from __future__ import annotations

import pytest
import torch

import _policy_naive as naive  # tests/ is on sys.path (tests/conftest.py)
from rlkernels import backends, grpo_loss
from rlkernels.ops._table import OPS, GradInForward, Op

F64 = torch.float64
DEV = naive.DEVICE


@pytest.fixture(autouse=True)
def _needs_grpo_loss(request):
    if "backend" in request.fixturenames:
        naive.needs(request.getfixturevalue("backend"), "policy", "grpo_loss")


def _inputs(B=3, T=5, V=37, *, seed=0, adv="B"):
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(B, T, V, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    tokens[0, 2] = -100                   # padding, masked
    tokens[1, 4] = -100                   # padding, left unmasked on purpose
    logits[2, 1, tokens[2, 1]] += 30.0    # peaked row, on the sampled token
    logits[2, 3, 5] += 30.0               # peaked row, elsewhere
    logits[1, 1, (tokens[1, 1] + 1) % V] = float("-inf")  # masked vocabulary column
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    mask[0, 2], mask[1, 4], mask[2, 2] = False, True, False  # [2, 2]: a masked real token
    lp = torch.log_softmax(logits, -1).gather(-1, tokens.clamp(min=0)[..., None])[..., 0]
    old = torch.where(tokens == -100, 0.0, lp + 0.3 * torch.randn(B, T, generator=g,
                                                                   dtype=F64))
    advantages = torch.randn((B,) if adv == "B" else (B, T), generator=g, dtype=F64)
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=F64)
    isw = 0.5 + torch.rand(B, T, generator=g, dtype=F64)
    out = dict(logits=logits, tokens=tokens, old_logp=old, advantages=advantages, mask=mask,
               ref_logp=ref, is_weights=isw)
    return {k: v.to(DEV) for k, v in out.items()}


CASES = {
    "ppo": dict(),
    "ppo-dual-delta-isw": dict(clip_high=0.28, dual_clip=2.0, delta=1.5, is_weights="isw"),
    "cispo": dict(loss="cispo", clip_high=0.28),
    "reinforce": dict(loss="reinforce", agg="seq-mean-token-sum"),
    "gspo": dict(ratio_level="sequence", clip_low=0.03, clip_high=0.04,
                 agg="seq-mean-token-mean"),
    "gspo-entropy": dict(ratio_level="sequence", entropy_coef=0.02, ref_logp="ref",
                         kl_coef=0.05),
    "kl-entropy": dict(ref_logp="ref", kl_coef=0.1, kl_estimator="k3", entropy_coef=0.01,
                       agg="seq-mean-token-sum-norm"),
    "normalizer-temperature": dict(normalizer=20, temperature=0.7, entropy_coef=0.05,
                                   ref_logp="ref", kl_coef=0.05, kl_estimator="k3+"),
}
SCALES = (1.0, 0.37, 0.0, -1.7)


def _kw(inp, case):
    kw = dict(CASES[case])
    if kw.get("is_weights") == "isw":
        kw["is_weights"] = inp["is_weights"]
    if kw.get("ref_logp") == "ref":
        kw["ref_logp"] = inp["ref_logp"]
    return kw


def _grad(inp, backend, scale, *, dtype=F64, gif, **kw):
    """(loss, metrics, d (scale * loss) / d logits) on the CPU."""
    x = inp["logits"].detach().to(dtype).clone().requires_grad_(True)
    loss, metrics = grpo_loss(x, inp["tokens"], inp["old_logp"], inp["advantages"],
                              inp["mask"], backend=backend, grad_in_forward=gif, **kw)
    (g,) = torch.autograd.grad(loss * scale, x)
    return loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}, g.cpu()


def _same_outputs(a, b):
    assert torch.equal(a[0], b[0])  # the forward is the same kernels: bit-identical
    assert set(a[1]) == set(b[1]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


@pytest.mark.parametrize("case", list(CASES))
def test_gif_matches_default_fp64(backend, case):
    """Every upstream scalar (1, 0.37, 0, negative): the same loss and metrics bit for bit,
    the gradient to a few fp64 ulps, exactly zero rows at padding (masked or not) and at
    masked tokens."""
    inp = _inputs(seed=len(case), adv="BT" if "gspo" in case else "B")
    kw = _kw(inp, case)
    pad = (inp["tokens"] == -100).cpu()
    masked = (~inp["mask"]).cpu()
    for scale in SCALES:
        ref = _grad(inp, backend, scale, gif=False, **kw)
        got = _grad(inp, backend, scale, gif=True, **kw)
        _same_outputs(got, ref)
        torch.testing.assert_close(got[2], ref[2], atol=1e-15, rtol=1e-13)
        assert (got[2][pad] == 0).all() and (got[2][masked] == 0).all()
        if scale == 0.0:
            assert (got[2] == 0).all()
        if scale == 1.0:
            assert torch.equal(got[2], ref[2])  # 1 is not applied: the same bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["ppo", "cispo", "reinforce", "gspo-entropy", "kl-entropy"])
def test_gif_low_precision(backend, dtype, case):
    """SPEC 5: with fp32 / bf16 logits the gradient is within 2 eps(dtype) max|g| + 1e-7 of
    the default path, and no further from the fp64 result (the same, exactly representable,
    values) than the default path is plus one rounding (the product by the scalar), for
    scalars 1, 0.37 and negative; the loss and metrics equal the default path's."""
    inp = _inputs(seed=40 + len(case))
    inp["logits"] = inp["logits"].to(dtype).double()  # values representable in dtype
    for k in ("old_logp", "ref_logp", "advantages", "is_weights"):
        inp[k] = inp[k].float()
    kw = _kw(inp, case)
    for scale in (1.0, 0.37, -1.7):
        ref = _grad(inp, backend, scale, dtype=dtype, gif=False, **kw)
        got = _grad(inp, backend, scale, dtype=dtype, gif=True, **kw)
        exact = _grad(inp, backend, scale, dtype=F64, gif=False, **kw)
        assert got[2].dtype == dtype
        _same_outputs(got, ref)
        naive.grad_bound(got[2], ref[2])
        # against fp64: no further than the default path is, plus the one extra rounding
        err = (got[2].double() - exact[2]).abs().max().item()
        err_default = (ref[2].double() - exact[2]).abs().max().item()
        assert err <= err_default + torch.finfo(dtype).eps * exact[2].abs().max().item()
        assert (got[2][(inp["tokens"] == -100).cpu()] == 0).all()


@pytest.mark.parametrize("case", ["ppo", "gspo-entropy", "kl-entropy"])
def test_gif_backward_reads_no_logits(backend, case):
    """Overwrite the logits with NaN between forward and backward: the gif gradient is still
    exactly the default path's on clean logits; the default path, which reads them in its
    backward, gives NaN (so this test can tell the two apart)."""
    inp = _inputs(seed=7)
    kw = _kw(inp, case)
    ref = _grad(inp, backend, 0.37, gif=False, **kw)
    results = {}
    for gif in (False, True):
        x = inp["logits"].detach().clone().requires_grad_(True)
        loss, _ = grpo_loss(x, inp["tokens"], inp["old_logp"], inp["advantages"],
                            inp["mask"], backend=backend, grad_in_forward=gif, **kw)
        x.data.fill_(float("nan"))  # behind autograd's back: no version-counter error
        (results[gif],) = torch.autograd.grad(loss * 0.37, x)
    torch.testing.assert_close(results[True].cpu(), ref[2], atol=1e-15, rtol=1e-13)
    assert torch.isnan(results[False]).any()


@pytest.mark.parametrize("case", ["ppo", "gspo", "kl-entropy"])
def test_gif_inplace_backward(backend, case):
    """``inplace_backward=True``: the forward writes d loss / d logits (for 1) into the
    logits' storage; backward scales it there and hands it to autograd."""
    inp = _inputs(seed=9)
    kw = _kw(inp, case)
    for scale in (1.0, -0.37):
        ref_1 = _grad(inp, backend, 1.0, gif=False, **kw)
        ref = _grad(inp, backend, scale, gif=False, **kw)
        leaf = inp["logits"].detach().clone().requires_grad_(True)
        x = leaf * 1.0
        ptr = x.data_ptr()
        loss, metrics = grpo_loss(x, inp["tokens"], inp["old_logp"], inp["advantages"],
                                  inp["mask"], backend=backend, grad_in_forward=True,
                                  inplace_backward=True, **kw)
        _same_outputs((loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}), ref)
        torch.testing.assert_close(x.detach().cpu(), ref_1[2], atol=1e-15, rtol=1e-13)
        (loss * scale).backward()
        assert x.data_ptr() == ptr
        torch.testing.assert_close(leaf.grad.cpu(), ref[2], atol=1e-15, rtol=1e-13)


def test_gif_sliced_logits_int32_tokens(backend):
    """``logits[:, :-1]`` of a [B, T+1, V] leaf (a copy inside the op) and int32 tokens,
    with and without inplace_backward: the gradient reaches the leaf's first T positions,
    the last one gets 0."""
    inp = _inputs(seed=11)
    kw = dict(entropy_coef=0.01, temperature=0.8)
    ref = _grad(inp, backend, 0.5, gif=False, **kw)
    for inplace in (False, True):
        full = torch.cat([inp["logits"], torch.randn(3, 1, 37, dtype=F64, device=DEV)], 1)
        leaf = full.clone().requires_grad_(True)
        loss, _ = grpo_loss((leaf * 1.0)[:, :-1], inp["tokens"].int(), inp["old_logp"],
                            inp["advantages"], inp["mask"], backend=backend,
                            grad_in_forward=True, inplace_backward=inplace, **kw)
        (loss * 0.5).backward()
        torch.testing.assert_close(leaf.grad[:, :-1].cpu(), ref[2], atol=1e-15, rtol=1e-13)
        assert (leaf.grad[:, -1] == 0).all()


def test_gif_backpropagates_once(backend):
    """The backward consumes the gradient buffer (scales it in place): a second backward
    through the same graph (retain_graph=True) raises instead of returning a wrong value."""
    inp = _inputs(seed=12)
    x = inp["logits"].detach().clone().requires_grad_(True)
    loss, _ = grpo_loss(x, inp["tokens"], inp["old_logp"], inp["advantages"], inp["mask"],
                        backend=backend, grad_in_forward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="consumed by the first backward"):
        loss.backward()


def test_gif_without_grad_runs_the_plain_forward(backend):
    """No grad mode or logits that need no gradient: nothing to form, the plain op runs (no
    gradient buffer) and gives the same loss; the logits are untouched even with
    inplace_backward."""
    inp = _inputs(seed=13)
    ref = _grad(inp, backend, 1.0, gif=False)
    x = inp["logits"].detach().clone()
    for ctx in (torch.no_grad(), torch.enable_grad()):
        with ctx:
            loss, _ = grpo_loss(x, inp["tokens"], inp["old_logp"], inp["advantages"],
                                inp["mask"], backend=backend, grad_in_forward=True,
                                inplace_backward=True)
        assert torch.equal(loss.cpu(), ref[0]) and not loss.requires_grad
        assert torch.equal(x, inp["logits"])


def test_gif_errors():
    inp = _inputs()
    args = (inp["logits"], inp["tokens"], inp["old_logp"], inp["advantages"], inp["mask"])
    with pytest.raises(TypeError, match=r"grad_in_forward: expected a bool, got int"):
        grpo_loss(*args, grad_in_forward=1)
    with pytest.raises(ValueError, match=r"policy_loss: grad_in_forward=True is not "
                                         r"supported$"):
        OPS["policy_loss"](*[None] * 11, grad_in_forward=True)
    with pytest.raises(ValueError, match=r"policy_loss: grad_in_forward=True is not "
                                         r"supported with a process group"):
        OPS["policy_loss"](*[None] * 11, group=0, grad_in_forward=True)


# ---------------------------------------------------------------- vocabulary parallelism

def _vp_worker(rank: int, world: int, store: str) -> None:
    """2 ranks, unequal shards (20 + 17 of V = 37): the gif shard gradient equals the
    default path's shard (same ranks, same shards) for scalars 0.37 and 1, with and without
    inplace_backward, and with the shard overwritten by NaN before backward; the loss and
    metrics are the default path's."""
    import os
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        lo, hi = (0, 20) if rank == 0 else (20, 37)
        inp = {k: v.cpu() for k, v in _inputs(seed=16).items()}
        for case in ("ppo", "kl-entropy", "gspo"):
            kw = _kw(inp, case)
            for scale, inplace in ((0.37, False), (1.0, True)):
                res = []
                for gif in (False, True):
                    leaf = inp["logits"][..., lo:hi].clone().requires_grad_(True)
                    x = leaf * 1.0
                    loss, metrics = grpo_loss(x, inp["tokens"], inp["old_logp"],
                                              inp["advantages"], inp["mask"],
                                              backend="torch", grad_in_forward=gif,
                                              inplace_backward=inplace,
                                              process_group=dist.group.WORLD, **kw)
                    if gif and not inplace:
                        x.data.fill_(float("nan"))  # backward reads no logits
                    (loss * scale).backward()
                    res.append((loss.detach(), metrics, leaf.grad))
                (l0, m0, g0), (l1, m1, g1) = res
                what = f"rank {rank} {case} scale={scale} inplace={inplace}"
                assert torch.equal(l0, l1), what
                assert all(torch.equal(m0[k], m1[k]) for k in m0), what
                torch.testing.assert_close(g1, g0, atol=1e-15, rtol=1e-13,
                                           msg=lambda m: f"{what}: {m}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gif_vocabulary_parallel():
    import tempfile

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory(prefix="rlkernels-gif-vp-") as tmp:
        mp.spawn(_vp_worker, args=(2, f"{tmp}/store"), nprocs=2, join=True)


def _compile_step(backend, inplace):
    inp = _inputs(seed=14)
    kw = dict(ref_logp=inp["ref_logp"].float(), kl_coef=0.1, entropy_coef=0.01,
              temperature=0.9)
    rest = (inp["tokens"], inp["old_logp"].float(), inp["advantages"].float(), inp["mask"])

    def step(leaf, gif):
        loss, metrics = grpo_loss(leaf * 1.0, *rest, backend=backend, grad_in_forward=gif,
                                  inplace_backward=inplace, **kw)
        return loss * 0.37, metrics["clipfrac"], metrics["entropy"]

    return inp["logits"].float(), step


@pytest.mark.parametrize("inplace", [False, True])
def test_gif_compile_fullgraph(backend, inplace):
    """torch.compile(fullgraph=True): no graph break, forward and backward equal eager
    (with and without inplace_backward), and equal the default path within SPEC 5."""
    logits, step = _compile_step(backend, inplace)
    results = []
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for f, gif in ((step, False), (step, True), (compiled, True)):
        leaf = logits.clone().requires_grad_(True)
        out = f(leaf, gif)
        (g,) = torch.autograd.grad(out[0], leaf)
        results.append(tuple(o.detach() for o in out) + (g,))
    default, eager, comp = results
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    naive.grad_bound(eager[-1], default[-1])


def test_gif_opcheck():
    """torch.library.opcheck of the generated gif ops (torch backend, fp32)."""
    from rlkernels._policy_options import PolicyOptions
    inp = _inputs(V=7, seed=15)
    modes, nums = PolicyOptions.from_kwargs(kl_coef=0.1, entropy_coef=0.01).encode()
    x = inp["logits"].float().reshape(15, 7).cpu()
    tensors = (inp["tokens"].cpu(), inp["old_logp"].float().cpu(),
               inp["advantages"].float().cpu(), inp["mask"].cpu(), None,
               inp["ref_logp"].float().cpu(), None, 0.8, modes, nums, "torch")
    ops = torch.ops.rlkernels
    torch.library.opcheck(ops.grpo_loss_gif.default, (x.clone(), *tensors, False))
    torch.library.opcheck(ops.grpo_loss_gif_.default, (x.clone(), *tensors, True))
    torch.library.opcheck(ops.grpo_loss_gif_scale_.default,
                          (torch.randn(15, 7), torch.tensor(0.37), "torch"))
    torch.library.opcheck(ops.grpo_loss_gif_attach.default,
                          (x.clone().requires_grad_(True), torch.tensor(1.5),
                           torch.randn(15, 7), "torch"),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_aot_dispatch_static"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gif_scale_kernel(backend, dtype):
    """``grad *= g`` in place: the product in the compute dtype (g in it, as autograd
    hands it) rounded once to the buffer's dtype (within one ulp: the triton interpreter
    rounds bf16 toward zero), bit-identical for g = 1, exactly 0 for g = 0; a column-strided
    buffer too."""
    mod = backends._module(backend, "grpo")
    torch.manual_seed(0)
    base = torch.randn(5, 37, dtype=torch.float64, device=DEV).to(dtype)
    base[1, 3] = 0.0
    cdt = torch.float64 if dtype == F64 else torch.float32
    eps = torch.finfo(dtype).eps

    def check(buf, g):
        want = base.to(cdt).double() * torch.tensor(g, dtype=cdt).double()
        assert ((buf.double() - want).abs() <= eps * want.abs()).all(), g

    for g in (1.0, 0.37, 0.0, -3.0):
        buf = base.clone()
        mod.grpo_loss_gif_scale_(buf, torch.tensor(g, dtype=cdt, device=DEV))
        check(buf, g)
        if g == 1.0:
            assert torch.equal(buf, base)
        if g == 0.0:
            assert (buf == 0).all()
    strided = base.t().clone().t()  # stride(-1) != 1
    mod.grpo_loss_gif_scale_(strided, torch.tensor(0.37, dtype=cdt, device=DEV))
    check(strided, 0.37)


def test_gif_kernels_exist():
    """The declaration's family holds the scale kernel for every backend of grpo_loss, and
    the cuda one-read forward the declaration calls."""
    import importlib

    op = OPS["grpo_loss"]
    gif = op.grad_in_forward
    assert isinstance(gif, GradInForward) and gif.family == "grpo"
    for backend in op.backends:
        try:
            mod = importlib.import_module(f"{backends._PACKAGES[backend]}.{gif.family}")
        except ImportError:  # triton not importable here
            continue
        assert callable(getattr(mod, "grpo_loss_gif_scale_", None)), backend
    cuda = importlib.import_module("rlkernels.cuda.grpo")
    assert callable(cuda.grpo_loss_gif_forward)


def test_gif_declaration_checks():
    """A GradInForward whose input is not differentiable, or whose loss is not the op's one
    differentiable output, fails when it is declared."""
    def declare(**kw):
        base = dict(signature="_test_gif_op(Tensor x, str backend) -> (y, z)", family="vocab",
                    fake=lambda a: (a.x, a.x), nondiff=("z",))
        base.update(kw)
        return Op(**base)

    fwd = lambda a, kernel, out: None  # noqa: E731
    with pytest.raises(ValueError, match=r"grad_in_forward.wrt 'x' is not a differentiable"):
        declare(grad_in_forward=GradInForward(fwd, "grpo", loss="y", wrt="x"))
    with pytest.raises(ValueError, match=r"grad_in_forward.loss 'z' must be the one output"):
        declare(differentiable=("x",), saved=("x",),
                grad_in_forward=GradInForward(fwd, "grpo", loss="z", wrt="x"))
    assert "_test_gif_op" not in OPS
