"""Vocabulary (tensor) parallelism (SPEC section 3.5, issue #9) on CPU with gloo.

2 and 3 processes hold unequal contiguous shards of a 37-column vocabulary; ``token_logprobs``
(with and without the entropy) and ``entropy`` with ``process_group`` must give, on every rank,
the values of the unsharded op on the concatenated logits, and every rank's gradient shard must
be the matching slice of the unsharded gradient (SPEC section 5 tolerances; fp64 to 1e-10).
Rows: normal, peaked (also on the token), flat, scattered -inf columns, a row whose whole
shard is -inf, a row of only -inf, a max tied across shards, padding, tokens in every shard
a token whose logit is -inf and a NaN. Backward must not communicate (collectives are patched to
raise during backward), and a naive autograd through ``all_reduce`` is shown to be wrong.

The same workers check ``kl_divergence`` (every kind, both gradients, an ignored row),
``grpo_loss`` (entropy and KL terms, in-place backward) and the lm_head ops
``linear_token_logprobs`` / ``linear_grpo_loss`` (weight and bias shards, ``-inf`` bias
columns): values and gradients against the unsharded op; the lm_head backward runs exactly one
all_reduce (the sum of ``d hidden``), none when ``hidden`` needs no gradient.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

import rlkernels

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with gloo is not available on this platform")

V = 37
SPLITS = {2: [20, 17], 3: [13, 11, 13]}
N_ROWS = 12


# ----------------------------------------------------------------------------- test data

def _logits(dtype: torch.dtype, sizes) -> torch.Tensor:
    """``[2, 6, V]`` logits (identical on every rank) with the rows the module doc lists."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_ROWS, V, generator=g, dtype=torch.float64) * 2.0
    s0 = sizes[0]
    x[1, s0 + 2] += 35.0                       # peaked in shard 1 (token elsewhere)
    x[2] = 0.0                                 # flat
    x[3, ::5] = -math.inf                      # scattered -inf columns
    x[4, :s0] = -math.inf                      # the whole shard 0 is -inf; max elsewhere
    x[5, V - 1] += 30.0                        # peaked on its token, in the last shard
    x[6, 4] = -math.inf                        # the token's logit is -inf
    x[7] = -math.inf                           # a row of only -inf
    x[8, 3] = x[8, V - 3] = x[8].max() + 5.0   # the max tied across two shards
    x[9, s0:] = -math.inf                      # only shard 0 is finite
    x[10, 1] += 25.0                           # peaked in shard 0
    x[11, 5] = math.nan                        # NaN propagates to its row only
    return x.to(dtype).view(2, 6, V)


def _tokens(sizes) -> torch.Tensor:
    s0, s1 = sizes[0], sizes[0] + sizes[1]
    tok = [3, s0 + 1, V - 2, 7, s0 + 3, V - 1, 4, 0, s1 - 1, -100, 1, s0]
    return torch.tensor(tok, dtype=torch.int64).view(2, 6)


def _tols(dtype):
    if dtype == torch.float64:
        return dict(atol=1e-10, rtol=1e-10), 1e-10
    return dict(atol=1e-5, rtol=1e-5), None


def _check_values(got, ref, dtype, what):
    tol, _ = _tols(dtype)
    torch.testing.assert_close(got, ref, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def _check_grad(got, ref, dtype, what, whole=None, base=None):
    """SPEC 5: ``|g - g_ref| <= 2 eps(dtype) max|g_ref| + 1e-7`` (1e-10 in fp64); the max
    over ``whole`` (the unsharded gradient) when given, else over ``ref``. ``base``: the
    unsharded op of the same backend and dtype, whose own error against ``whole`` (twice it)
    is allowed where it exceeds that bound: sharding must not make a backend worse."""
    _, abs64 = _tols(dtype)
    assert got.dtype == ref.dtype and got.shape == ref.shape, what
    assert torch.equal(got.isnan(), ref.isnan()), f"{what}: NaN pattern differs"
    ok = ~ref.isnan()
    scale = ref[ok].abs().max().item() if ok.any() else 0.0
    if whole is not None:
        scale = whole[~whole.isnan()].abs().max().item()
    bound = abs64 if abs64 is not None else 2 * torch.finfo(dtype).eps * scale + 1e-7
    if base is not None:
        fin = ~whole.isnan()
        bound = max(bound, 2 * (base.double()[fin] - whole.double()[fin]).abs().max().item())
    err = (got[ok] - ref[ok]).abs().max().item() if ok.any() else 0.0
    assert err <= bound, f"{what}: max gradient error {err:.3g} > {bound:.3g}"


class _NoCollectives:
    """Make every collective raise inside the block: backward must not communicate."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
             "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "barrier")

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}

        def boom(*args, **kwargs):
            raise AssertionError("a collective was called in backward")
        for n in self.saved:
            setattr(dist, n, boom)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(dist, n, f)


# ------------------------------------------------------------------------------- workers

def _run_cases(rank: int, world: int, backend: str, dtypes) -> None:
    sizes = SPLITS[world]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    pg = dist.group.WORLD
    g = torch.Generator().manual_seed(99)
    for dtype in dtypes:
        full = _logits(dtype, sizes)
        tok = _tokens(sizes)
        g_lp = torch.randn(2, 6, generator=g, dtype=torch.float64)
        g_h = torch.randn(2, 6, generator=g, dtype=torch.float64)
        for temperature in (1.0, 0.7):
            for ent_on in (False, True):
                what = f"rank {rank}/{world} {backend} {dtype} T={temperature} entropy={ent_on}"
                # the unsharded op, on the concatenated logits
                xf = full.clone().requires_grad_(True)
                ref = rlkernels.token_logprobs(xf, tok, temperature=temperature,
                                               return_entropy=ent_on, backend=backend)
                ref = ref if ent_on else (ref,)
                # this rank's shard
                xs = full[..., lo:hi].clone().requires_grad_(True)
                out = rlkernels.token_logprobs(xs, tok, temperature=temperature,
                                               return_entropy=ent_on, backend=backend,
                                               process_group=pg)
                out = out if ent_on else (out,)
                for name, a, b in zip(("logp", "entropy"), out, ref):
                    _check_values(a, b, dtype, f"{what} {name}")
                ups = [g_lp.to(ref[0].dtype), g_h.to(ref[0].dtype)][:len(ref)]
                (grad_ref,) = torch.autograd.grad(ref, xf, ups)
                with _NoCollectives():
                    (grad,) = torch.autograd.grad(out, xs, ups)
                _check_grad(grad, grad_ref[..., lo:hi], dtype, f"{what} grad")
                # padding rows: exactly zero
                assert bool((grad[tok == -100] == 0).all()), f"{what}: padding gradient"

            # entropy(): no tokens
            xf = full.clone().requires_grad_(True)
            ref_h = rlkernels.entropy(xf, temperature=temperature, backend=backend)
            xs = full[..., lo:hi].clone().requires_grad_(True)
            h = rlkernels.entropy(xs, temperature=temperature, backend=backend,
                                  process_group=pg)
            what = f"rank {rank}/{world} {backend} {dtype} T={temperature} entropy()"
            _check_values(h, ref_h, dtype, what)
            up = g_h.to(ref_h.dtype)
            (grad_ref,) = torch.autograd.grad(ref_h, xf, up)
            with _NoCollectives():
                (grad,) = torch.autograd.grad(h, xs, up)
            _check_grad(grad, grad_ref[..., lo:hi], dtype, f"{what} grad")


class _OnlyHiddenReduce(_NoCollectives):
    """Backward of the lm_head ops: exactly ``expected`` all_reduce calls (the sum of ``d
    hidden``), and no other collective."""

    def __init__(self, expected: int):
        self.expected = expected

    def __enter__(self):
        super().__enter__()
        self.calls = 0
        real = self.saved["all_reduce"]

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        dist.all_reduce = counted

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None:
            assert self.calls == self.expected, \
                f"{self.calls} all_reduce calls in backward, expected {self.expected}"


def _shard(rank: int, world: int):
    sizes = SPLITS[world]
    lo = sum(sizes[:rank])
    return sizes, lo, lo + sizes[rank]


def _kl_cases(rank: int, world: int, backend: str, dtypes) -> None:
    """kl_divergence, every kind (alpha and tv included: their saved sums add over shards,
    and their backward needs no collective), both gradients, an ignored row, -inf columns in
    both."""
    sizes, lo, hi = _shard(rank, world)
    g = torch.Generator().manual_seed(5)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 3] = True                                   # row 9: ignored
    for dtype in dtypes:
        z = _logits(dtype, sizes)
        # -inf where z is -inf (0 log 0 columns); rows peaked where z is
        w = (z.double() * 0.5 + torch.randn(z.shape, generator=g, dtype=torch.float64))
        w = w.to(dtype)
        up = torch.randn(2, 6, generator=g, dtype=torch.float64)
        for kind, beta, alpha, temperature in (("reverse", 0.5, None, 1.0),
                                                ("forward", 0.5, None, 0.7),
                                                ("jsd", 0.3, None, 1.0),
                                                # alpha at T = 1: at T != 1 the rounding
                                                # of z = x / T reaches its gradients
                                                # amplified by 1 / (1 - a) (docs/math.md)
                                                ("alpha", 0.5, 0.3, 1.0),
                                                ("alpha", 0.5, 0.9, 1.0),
                                                ("tv", 0.5, None, 0.7)):
            what = f"rank {rank}/{world} {backend} {dtype} kl {kind} a={alpha} T={temperature}"
            # SPEC 5: the reference is the torch backend in fp64 on the same values
            zf = z.double().requires_grad_(True)
            wf = w.double().requires_grad_(True)
            ref = rlkernels.kl_divergence(zf, wf, kind=kind, beta=beta, alpha=alpha,
                                          temperature=temperature, ignore_mask=mask,
                                          backend="torch")
            zs = z[..., lo:hi].clone().requires_grad_(True)
            ws = w[..., lo:hi].clone().requires_grad_(True)
            out = rlkernels.kl_divergence(zs, ws, kind=kind, beta=beta, alpha=alpha,
                                          temperature=temperature, ignore_mask=mask,
                                          backend=backend, process_group=dist.group.WORLD)
            _check_values(out, ref.to(out.dtype), dtype, what)
            gz_ref, gw_ref = torch.autograd.grad(ref, (zf, wf), up)
            # the unsharded op of this backend (the triton kernels round a little more than
            # the SPEC bound on the peaked rows at T = 0.7)
            zb, wb = z.clone().requires_grad_(True), w.clone().requires_grad_(True)
            base = rlkernels.kl_divergence(zb, wb, kind=kind, beta=beta, alpha=alpha,
                                           temperature=temperature, ignore_mask=mask,
                                           backend=backend)
            gz_base, gw_base = torch.autograd.grad(base, (zb, wb), up.to(base.dtype))
            with _NoCollectives():
                gz, gw = torch.autograd.grad(out, (zs, ws), up.to(out.dtype))
            _check_grad(gz, gz_ref[..., lo:hi].to(dtype), dtype, f"{what} d logits", gz_ref,
                        gz_base)
            _check_grad(gw, gw_ref[..., lo:hi].to(dtype), dtype, f"{what} d ref_logits",
                        gw_ref, gw_base)
            assert bool((gz[mask] == 0).all() and (gw[mask] == 0).all()), f"{what}: ignored row"


def _policy_inputs(g, tok, logp=None):
    """``(old_logp, advantages, mask, ref_logp)``; near ``logp`` when given (ratios around 1,
    some clipped; a far ``ref_logp`` would make the k3 penalty ``exp(ref - logp)`` huge)."""
    b, t = tok.shape
    base = torch.full((b, t), -3.0, dtype=torch.float64) if logp is None else logp.double()
    old = base + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    ref_lp = base + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return old, adv, (tok != -100), ref_lp


def _grpo_cases(rank: int, world: int, backend: str, dtypes) -> None:
    """grpo_loss: loss, metrics and d logits shard (with the entropy term and a KL term)."""
    sizes, lo, hi = _shard(rank, world)
    g = torch.Generator().manual_seed(6)
    tok = _tokens(sizes)
    for dtype in dtypes:
        z = _logits(dtype, sizes)
        # finite log-probs (the loss sums every row): no NaN row, no -inf token; -inf columns
        # and whole -inf shards stay (rows 3, 4, 9)
        for row in (0, 1, 5):
            z[1, row] = torch.randn(V, generator=g).to(dtype)
        # the policy inputs in the dtype of the run; the fp64 reference reads the same values
        old, adv, mask, ref_lp = (x.to(dtype) if x.is_floating_point() else x
                                  for x in _policy_inputs(g, tok, rlkernels.token_logprobs(
                                      z.double(), tok, temperature=0.7, backend="torch")))
        for inplace, opts in ((False, dict(entropy_coef=0.01, kl_coef=0.1, ref_logp=ref_lp,
                                            temperature=0.7)),
                              (True, dict(agg="seq-mean-token-mean", clip_high=0.3,
                                          temperature=0.7))):
            what = f"rank {rank}/{world} {backend} {dtype} grpo_loss {sorted(opts)}"
            zf = z.double().requires_grad_(True)
            opts64 = {k: v.double() if torch.is_tensor(v) else v for k, v in opts.items()}
            loss_ref, m_ref = rlkernels.grpo_loss(zf, tok, old.double(), adv.double(), mask,
                                                  backend="torch", **opts64)
            (g_ref,) = torch.autograd.grad(loss_ref, zf)
            leaf = z[..., lo:hi].clone().requires_grad_(True)
            zs = leaf * 1.0 if inplace else leaf   # in-place backward overwrites a non-leaf
            loss, m = rlkernels.grpo_loss(zs, tok, old, adv, mask, backend=backend,
                                          inplace_backward=inplace,
                                          process_group=dist.group.WORLD, **opts)
            _check_values(loss, loss_ref.to(loss.dtype), dtype, f"{what} loss")
            assert m.keys() == m_ref.keys(), what
            for k in m:
                _check_values(m[k], m_ref[k], dtype, f"{what} metric {k}")
            zb = z.clone().requires_grad_(True)      # the unsharded op of this backend
            (g_base,) = torch.autograd.grad(
                rlkernels.grpo_loss(zb, tok, old, adv, mask, backend=backend, **opts)[0], zb)
            with _NoCollectives():
                (grad,) = torch.autograd.grad(loss, leaf)
            _check_grad(grad, g_ref[..., lo:hi].to(dtype), dtype, f"{what} d logits", g_ref,
                        g_base)
            assert bool((grad[tok == -100] == 0).all()), f"{what}: padding gradient"


def _linear_data(g, sizes, dtype, with_bias):
    """``hidden [2, 6, H]``, ``weight [V, H]``, ``bias [V]``: peaked rows (a large weight row
    aligned with a hidden row), ``-inf`` bias columns (masked vocabulary, one of them a
    token's), and tokens in every shard plus padding."""
    h_dim = 8
    hidden = torch.randn(2, 6, h_dim, generator=g, dtype=torch.float64)
    weight = torch.randn(V, h_dim, generator=g, dtype=torch.float64)
    weight[sizes[0] + 2] = hidden[0, 1] * 4.0                  # row 1 peaked in shard 1
    weight[V - 1] = hidden[0, 5] * 4.0                         # row 5 peaked on its token
    bias = None
    if with_bias:
        bias = torch.randn(V, generator=g, dtype=torch.float64)
        # -inf columns in every shard; one is row 7's token 0 (log-prob -inf)
        bias[[0, 9, sizes[0] + 4, V - 5]] = -math.inf
    tok = _tokens(sizes)
    return (hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), tok)


def _check_linear_grads(got, ref, whole, dtype, what, whole64=None):
    """Against the unsharded op (``ref`` its slices for this shard, ``whole`` its gradients):
    in fp32 the bound of tests/ops/test_linear.py for H-term dot products, in fp64 1e-10
    relative to the largest gradient. ``whole64``: the unsharded gradients in fp64; twice the
    unsharded op's own error against them is allowed where it exceeds that bound (``d hidden``
    sums V products whose terms cancel on peaked rows, so its rounding scales with
    ``sum |d z| |W|``, not with the largest gradient): sharding, which only reorders the sums,
    must not make the op worse than that."""
    for i, (name, a, b, c) in enumerate(zip(("d hidden", "d weight", "d bias"), got, ref,
                                            whole)):
        if b is None:
            continue
        assert a.dtype == dtype and a.shape == b.shape, f"{what} {name}"
        scale = c.abs().max().item()
        err = (a.double() - b).abs().max().item()
        if dtype == torch.float64:
            tol = 1e-10 * max(1.0, scale)
        else:
            tol = (2 + 8) * torch.finfo(dtype).eps * scale + 1e-7
            if whole64 is not None:
                fin = ~whole64[i].isnan()
                own = (c.double()[fin] - whole64[i][fin]).abs().max().item()
                tol = max(tol, 2 * own)
        assert err <= tol, f"{what} {name}: error {err:.3g} > {tol:.3g}"


def _linear_cases(rank: int, world: int, backend: str, dtypes) -> None:
    """linear_token_logprobs and linear_grpo_loss: d weight / d bias shards locally, d hidden
    the unsharded gradient on every rank by exactly one all_reduce (none without it)."""
    sizes, lo, hi = _shard(rank, world)
    g = torch.Generator().manual_seed(8)
    pg = dist.group.WORLD
    # with a bias in the first dtype, without in the second (time: these run in subprocesses)
    for dtype, with_bias in zip(dtypes, (True, False)):
        hidden, weight, bias, tok = _linear_data(g, sizes, dtype, with_bias)
        up = torch.randn(2, 2, 6, generator=g, dtype=torch.float64)
        tok_finite = tok.clone()
        tok_finite[1, 1] = 2           # the loss sums every row: no -inf log-prob there
        # values exact in the run's dtype (the fp64 reference reads the same values)
        old, adv, mask, ref_lp = (
            x.to(dtype).double() if x.is_floating_point() else x
            for x in _policy_inputs(g, tok, rlkernels.linear_token_logprobs(
                hidden.double(), weight.double(), tok_finite,
                bias=None if bias is None else bias.double(), backend="torch")))
        what = f"rank {rank}/{world} {backend} {dtype} bias={with_bias}"

        def full(f, d):
            leaves = [x.to(d).clone().requires_grad_(True) for x in (hidden, weight)]
            if bias is not None:
                leaves.append(bias.to(d).clone().requires_grad_(True))
            return leaves, f(*leaves[:2], bias=leaves[2] if bias is not None else None)

        def shard(f, with_hidden_grad=True):
            leaves = [hidden.clone().requires_grad_(with_hidden_grad),
                      weight[lo:hi].clone().requires_grad_(True)]
            if bias is not None:
                leaves.append(bias[lo:hi].clone().requires_grad_(True))
            return leaves, f(*leaves[:2], bias=leaves[2] if bias is not None else None,
                             process_group=pg)

        ops = {
            "linear_token_logprobs": (
                lambda h, w, **kw: torch.stack(rlkernels.linear_token_logprobs(
                    h, w, tok, temperature=0.7, return_entropy=True, backend=backend,
                    **kw)),
                lambda out: (out * up.to(out.dtype)).sum()),
            "linear_grpo_loss": (
                lambda h, w, **kw: rlkernels.linear_grpo_loss(
                    h, w, tok_finite, old, adv, mask, ref_logp=ref_lp, kl_coef=0.1,
                    entropy_coef=0.01, backend=backend, **kw)[0],
                lambda out: out),
        }
        for name, (f, reduce) in ops.items():
            # against the unsharded op in the same dtype: an fp32 lm_head on peaked rows
            # (logits ~30, rounded to ~2e-6) is itself far from fp64 there; what sharding
            # may change is only the order of the sums
            leaves_ref, ref_val = full(f, dtype)
            grads_ref = torch.autograd.grad(reduce(ref_val), leaves_ref)
            whole64 = None
            if dtype != torch.float64:
                leaves64, val64 = full(f, torch.float64)
                whole64 = torch.autograd.grad(reduce(val64), leaves64)
            ref_w = [grads_ref[0], grads_ref[1][lo:hi]] + \
                    ([grads_ref[2][lo:hi]] if bias is not None else [])
            leaves, out = shard(f)
            _check_values(out, ref_val.detach(), dtype, f"{what} {name}")
            with _OnlyHiddenReduce(1):
                grads = torch.autograd.grad(reduce(out), leaves)
            _check_linear_grads(grads, ref_w, grads_ref, dtype, f"{what} {name}", whole64)
            # the lm_head shard alone: no communication at all
            leaves, out = shard(f, with_hidden_grad=False)
            with _NoCollectives():
                grads = torch.autograd.grad(reduce(out), leaves[1:])
            _check_linear_grads([None] + list(grads), [None] + ref_w[1:], grads_ref,
                                dtype, f"{what} {name} (no d hidden)", whole64)


def _naive_is_wrong(rank: int, world: int) -> None:
    """Autograd through a differentiable all_reduce of the local sums double counts: its
    gradient is not the unsharded one; ours is, and its softmax part sums to 0 over shards."""
    import torch.distributed.nn.functional as dfn

    sizes = SPLITS[world]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    g = torch.Generator().manual_seed(7)
    full = torch.randn(4, V, generator=g, dtype=torch.float64)
    tok = torch.tensor([1, sizes[0] + 1, V - 1, 5])
    up = torch.ones(4, dtype=torch.float64)

    xf = full.clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(rlkernels.token_logprobs(xf, tok, backend="torch"), xf, up)

    xs = full[:, lo:hi].clone().requires_grad_(True)
    sum_exp = dfn.all_reduce(torch.exp(xs).sum(-1))
    loc = tok - lo
    mine = (loc >= 0) & (loc < hi - lo)
    z_y = dfn.all_reduce(torch.where(mine, xs.gather(1, loc.clamp(0, hi - lo - 1)[:, None])[:, 0],
                                     0.0))
    naive = z_y - torch.log(sum_exp)
    torch.testing.assert_close(naive, rlkernels.token_logprobs(full, tok, backend="torch"))
    (grad_naive,) = torch.autograd.grad(naive, xs, up)
    assert not torch.allclose(grad_naive, grad_ref[:, lo:hi], atol=1e-6), \
        "the naive autograd-through-all_reduce gradient unexpectedly matched"

    xs = full[:, lo:hi].clone().requires_grad_(True)
    lp = rlkernels.token_logprobs(xs, tok, backend="torch", process_group=dist.group.WORLD)
    (grad,) = torch.autograd.grad(lp, xs, up)
    torch.testing.assert_close(grad, grad_ref[:, lo:hi], atol=1e-12, rtol=1e-12)
    total = grad.sum(-1)
    dist.all_reduce(total)
    torch.testing.assert_close(total, torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)


def _opcheck(rank: int, world: int) -> None:
    """The custom op's schema, fake kernel and autograd registration (every rank runs the
    same sequence of calls, so the collectives inside stay matched)."""
    from rlkernels import distributed as rd

    sizes = SPLITS[world]
    lo = sum(sizes[:rank])
    x = _logits(torch.float32, sizes).view(N_ROWS, V)[:, lo:lo + sizes[rank]]
    x = torch.where(x.isnan(), 0.0, x)   # opcheck compares outputs without equal_nan
    handle = rd.register_group(dist.group.WORLD)
    op = torch.ops.rlkernels.token_logprobs_vp.default
    tok = _tokens(sizes).view(-1)
    torch.library.opcheck(op, (x.clone().requires_grad_(True), tok, 0.7, -100, True, handle,
                               "torch"))
    torch.library.opcheck(op, (x.clone().requires_grad_(True), None, 1.0, -100, True, handle,
                               "torch"))
    y = (x * 0.5).detach()
    torch.library.opcheck(torch.ops.rlkernels.kl_divergence_vp.default,
                          (x.clone().requires_grad_(True), y.requires_grad_(True), None, "jsd",
                           0.3, 0.7, handle, "torch"))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N_ROWS, 5, generator=g).requires_grad_(True)
    weight = torch.randn(sizes[rank], 5, generator=g).requires_grad_(True)
    bias = torch.randn(sizes[rank], generator=g).requires_grad_(True)
    torch.library.opcheck(torch.ops.rlkernels.linear_token_logprobs_vp.default,
                          (hidden, weight, bias, tok, 0.7, -100, True, handle, "torch"))


def _debug_token_range(rank: int, world: int) -> None:
    """Debug mode checks tokens against the global vocabulary: ids of other shards pass, an
    id past the last shard raises on every rank."""
    x = torch.randn(3, SPLITS[world][rank], dtype=torch.float64)
    pg = dist.group.WORLD
    rlkernels.set_debug(True)
    try:
        rlkernels.token_logprobs(x, torch.tensor([0, V - 1, -100]), process_group=pg)
        with pytest.raises(ValueError, match=rf"tokens: expected ids in \[0, {V}\) or -100, "
                                             rf"got {V}"):
            rlkernels.token_logprobs(x, torch.tensor([0, V, -100]), process_group=pg)
    finally:
        rlkernels.set_debug(False)


def _worker(rank: int, world: int, store_path: str, backend: str, dtypes) -> None:
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")   # loopback only
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world)
    try:
        _run_cases(rank, world, backend, dtypes)
        # the triton interpreter is slow: its new-op cases run in fp32 only
        new_dtypes = dtypes if backend == "torch" else (torch.float32,)
        _kl_cases(rank, world, backend, new_dtypes)
        _grpo_cases(rank, world, backend, new_dtypes)
        _linear_cases(rank, world, backend, new_dtypes)
        if backend == "torch":
            _naive_is_wrong(rank, world)
            _opcheck(rank, world)
            _debug_token_range(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world: int, backend: str, dtypes) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="rlkernels-vp-") as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_worker, args=(world, store, backend, dtypes), nprocs=world, join=True)


# --------------------------------------------------------------------------------- tests

def _available(name: str) -> bool:
    return rlkernels.available_backends()[name] == "ok"


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_torch(world):
    _spawn(world, "torch", (torch.float32, torch.float64))


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_triton(world):
    if not _available("triton"):
        pytest.skip(f"triton: {rlkernels.available_backends()['triton']}")
    _spawn(world, "triton", (torch.float32, torch.float64))


def test_process_group_type_checked():
    x = torch.randn(3, 5)
    tok = torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match=r"process_group: expected a torch.distributed "
                                        r"ProcessGroup \(or None\), got object"):
        rlkernels.token_logprobs(x, tok, process_group=object())
    with pytest.raises(TypeError, match=r"process_group: expected a torch.distributed "
                                        r"ProcessGroup"):
        rlkernels.entropy(x, process_group="world")


def test_sentinel_token_outside_shard():
    """A token id outside ``[0, V)`` that is not ``ignore_index`` (the sentinel for "held by
    another shard") gives no one-hot term, only ``-g p``, in every backend that runs here;
    padding rows stay exactly 0."""
    from rlkernels import backends
    from rlkernels.reference import vocab as ref

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64)
    x[1, 2] = -math.inf
    stats = ref.token_logprobs_forward(x, None, 0.7, -100, True)[2]
    g_lp = torch.randn(4, generator=g, dtype=torch.float64)
    g_h = torch.randn(4, generator=g, dtype=torch.float64)
    p = torch.softmax(x / 0.7, -1)
    zs = x / 0.7 - stats[:, :1]
    ent_term = torch.where(p == 0, 0.0, p * (zs - stats[:, 2:3]))
    expect = (-g_lp[:, None] * p - g_h[:, None] * ent_term) / 0.7
    expect[3] = 0.0
    for sentinel in (9, 10):
        tok = torch.tensor([sentinel, sentinel, sentinel, -100])
        for name in ("torch", "triton"):
            if not _available(name):
                continue
            fn = backends.kernel(name, "vocab", "token_logprobs_backward")
            got = fn(g_lp, g_h, x, tok, stats, 0.7, -100)
            torch.testing.assert_close(got, expect, atol=1e-12, rtol=1e-12,
                                       msg=lambda m: f"{name}, sentinel {sentinel}: {m}")
            assert bool((got[3] == 0).all())
