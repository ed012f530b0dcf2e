"""``rlkernels verify``: every op on every available backend against the fp64 reference.

Each case builds its inputs from a fixed seed in the tested dtype, runs the op and the
gradient of a random projection of its outputs, and compares with the ``torch`` backend on
the same values in fp64 (SPEC section 5): outputs within ``atol = rtol = 1e-5``; gradients
within ``2 eps(dtype) max|g_ref| + 1e-7`` (``(2 + H) eps`` for the linear ops, whose logits
are an fp32 GEMM of ``H`` terms). Inputs cover peaked and flat rows, ``-inf``
columns, padding tokens and odd vocabulary sizes.

Each backend runs its cases on the GPU when torch sees one (``torch`` on CPU), and is reported
as checked (passed / failed rows) or skipped with the reason it is unavailable. Without a GPU,
:func:`check_triton_interpreted` checks ``triton`` through the Triton interpreter in a
subprocess (``rlkernels verify --interpret``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from . import backends

Tensor = torch.Tensor


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    out_err: float
    out_rel: float
    grad_err: float
    ok: bool
    note: str = ""


def _logits(n: int, vocab: int, dtype: torch.dtype, seed: int) -> Tensor:
    """Rows cycling through: random, peaked (one logit +30), flat, with -inf columns."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * 2.0
    for i in range(n):
        kind = i % 4
        if kind == 1:
            x[i, (7 * i) % vocab] += 30.0
        elif kind == 2:
            x[i] = 0.5
        elif kind == 3 and vocab > 2:
            x[i, 1::3] = -math.inf
    return x.to(dtype)


def _tokens(logits: Tensor, seed: int, pad_every: int = 5) -> Tensor:
    """Ids that avoid -inf columns (so gradients stay finite), with some padding (-100)."""
    n, vocab = logits.shape
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(0, vocab, (n,), generator=g)
    finite = torch.isfinite(logits.float())
    for i in range(n):
        if not finite[i, tok[i]]:
            tok[i] = int(finite[i].nonzero()[0])
    tok[::pad_every] = -100
    return tok


def _project(outputs: List[Tensor], seed: int) -> Tensor:
    """A random linear functional of the (finite part of the) outputs, for gradients."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for out in outputs:
        w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
        total = total + torch.where(torch.isfinite(out), out * w, 0.0).sum()
    return total


def _vocab_cases(vocab: int, n: int, dev: str = "cpu") -> Dict[str, Callable]:
    import rlkernels as rk

    def token_logprobs(dtype, backend, ref):
        x = _logits(n, vocab, dtype, 1)
        tok = _tokens(x, 2).to(dev)
        x = (x.double() if ref else x).to(dev).requires_grad_(True)
        lp, h = rk.token_logprobs(x, tok, temperature=0.9, return_entropy=True,
                                  backend=backend)
        return [lp, h], [x]

    def entropy(dtype, backend, ref):
        x = _logits(n, vocab, dtype, 3)
        x = (x.double() if ref else x).to(dev).requires_grad_(True)
        return [rk.entropy(x, backend=backend)], [x]

    def sparse_logprobs(dtype, backend, ref):
        x = _logits(n, vocab, dtype, 4)
        k = min(vocab, 5)
        idx = torch.argsort(x.float(), dim=-1, descending=True, stable=True)[:, :k].clone()
        idx[::3, -1] = -1
        idx = idx.to(dev)
        x = (x.double() if ref else x).to(dev).requires_grad_(True)
        full, tail = rk.sparse_logprobs(x, idx, return_tail=True, backend=backend)
        sup = rk.sparse_logprobs(x, idx, normalize="support", backend=backend)
        return [full, tail, sup], [x]

    def sparse_kl(dtype, backend, ref):
        x = _logits(n, vocab, dtype, 5)
        teacher = _logits(n, vocab, torch.float32, 6)
        k = min(vocab, 4)
        t_logp, idx = torch.log_softmax(teacher.float(), -1).topk(k, dim=-1)
        t_logp, idx = t_logp.to(dev), idx.to(dev)
        x = (x.double() if ref else x).to(dev).requires_grad_(True)
        return [rk.sparse_kl(x, idx, t_logp, backend=backend)], [x]

    def kl_divergence(dtype, backend, ref):
        x, y = _logits(n, vocab, dtype, 7), _logits(n, vocab, dtype, 8)
        y = torch.where(torch.isfinite(x.float()), y, x)  # -inf at the same columns
        mask = torch.zeros(n, dtype=torch.bool)
        mask[::4] = True
        if ref:
            x, y = x.double(), y.double()
        x, y, mask = x.to(dev).requires_grad_(True), y.to(dev).requires_grad_(True), mask.to(dev)
        outs = [rk.kl_divergence(x, y, kind=kind, ignore_mask=mask, backend=backend)
                for kind in ("reverse", "forward", "jsd")]
        return outs, [x, y]

    def kl_divergence_fdiv(dtype, backend, ref):
        # issue 21: alpha on both sides of 1/2 and total variation; ref_logits with
        # -inf columns of their own (alpha's p^a q^(1-a) is 0 there, tv counts p's mass)
        x, y = _logits(n, vocab, dtype, 7), _logits(n, vocab, dtype, 12)
        if vocab > 2:
            y[::2, 2::5] = -math.inf
        mask = torch.zeros(n, dtype=torch.bool)
        mask[1::4] = True
        if ref:
            x, y = x.double(), y.double()
        x, y, mask = x.to(dev).requires_grad_(True), y.to(dev).requires_grad_(True), mask.to(dev)
        # alpha at T = 1: at T != 1 the rounding of z = x / T (a relative error of every p)
        # reaches alpha's gradient amplified by 1 / (1 - a), beyond the bound here (the fp32
        # floor of tests/ops/test_kl_alpha_tv.py admits it)
        outs = [rk.kl_divergence(x, y, kind="alpha", alpha=a, ignore_mask=mask,
                                 backend=backend) for a in (0.3, 0.9)]
        outs.append(rk.kl_divergence(x, y, kind="tv", temperature=0.8, ignore_mask=mask,
                                     backend=backend))
        return outs, [x, y]

    def grpo_loss(dtype, backend, ref, gif=False):
        b, t = 2, max(n // 2, 1)
        x = _logits(b * t, vocab, dtype, 9)
        tok = _tokens(x, 10).view(b, t).to(dev)
        x = (x.double() if ref else x).view(b, t, vocab).to(dev).requires_grad_(True)
        g = torch.Generator().manual_seed(11)
        # rollout log-probs near the current ones, as in training (ratios near 1)
        with torch.no_grad():
            cur = rk.token_logprobs(x.detach().double(), tok, temperature=0.9, backend="torch")
        old = (cur + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64).to(dev)).float()
        adv = torch.randn(b, generator=g).to(dev)
        mask = tok != -100
        ref_lp = (cur - 0.1).float()
        if ref:
            old, adv, ref_lp = old.double(), adv.double(), ref_lp.double()
        loss, m = rk.grpo_loss(x, tok, old, adv, mask, ref_logp=ref_lp, kl_coef=0.05,
                               entropy_coef=0.01, temperature=0.9, backend=backend,
                               grad_in_forward=gif)
        return [loss, m["clipfrac"], m["entropy"]], [x]

    def grpo_loss_gif(dtype, backend, ref):
        # issue 22: d logits formed in the forward; the same values and gradients
        return grpo_loss(dtype, backend, ref, gif=True)

    return {"token_logprobs": token_logprobs, "entropy": entropy,
            "sparse_logprobs": sparse_logprobs, "sparse_kl": sparse_kl,
            "kl_divergence": kl_divergence, "kl_divergence alpha/tv": kl_divergence_fdiv,
            "grpo_loss": grpo_loss,
            "grpo_loss grad_in_forward": grpo_loss_gif}


def _other_cases(quick: bool, dev: str = "cpu") -> Dict[str, Callable]:
    import rlkernels as rk
    b, t, h, vocab = 4, 6, _LINEAR_H, (37 if quick else 1031)

    def policy_inputs(dtype, ref):
        g = torch.Generator().manual_seed(12)
        logp = (-torch.rand(b, t, generator=g) * 3).to(dtype)
        old = logp.float() + 0.3 * torch.randn(b, t, generator=g)
        adv = torch.randn(b, generator=g)
        ent = torch.rand(b, t, generator=g).to(dtype)
        mask = torch.rand(b, t, generator=g) > 0.2
        cast = (lambda z: z.double().to(dev)) if ref else (lambda z: z.to(dev))
        return (cast(logp).requires_grad_(True), cast(old), cast(adv), mask.to(dev),
                cast(ent).requires_grad_(True))

    def policy_loss(dtype, backend, ref):
        logp, old, adv, mask, ent = policy_inputs(dtype, ref)
        loss, m = rk.policy_loss(logp, old, adv, mask, clip_high=0.28, dual_clip=3.0,
                                 ref_logp=old - 0.05, kl_coef=0.1, entropy=ent,
                                 entropy_coef=0.01, backend=backend)
        return [loss] + list(m.values()), [logp, ent]

    def kl_penalty(dtype, backend, ref):
        logp, old, _, _, _ = policy_inputs(dtype, ref)
        return [rk.kl_penalty(logp, old, estimator=e) for e in ("k1", "k2", "k3")], [logp]

    def group_advantages(dtype, backend, ref):
        g = torch.Generator().manual_seed(13)
        r = torch.randint(0, 3, (24,), generator=g).to(dtype)
        r = (r.double() if ref else r).to(dev)
        idx = (torch.randperm(24, generator=g) % 5).to(dev)
        return [rk.group_advantages(r, group_size=4, method=m, backend=backend)
                for m in ("grpo", "rloo", "dr_grpo", "batch_std")] + \
               [rk.group_advantages(r, group_index=idx, backend=backend)], []

    def estimators(dtype, backend, ref):
        # verl's other estimators: group methods that read a response mask or the batch,
        # and discounted returns with a baseline (ReMax) or whitening (REINFORCE++)
        g = torch.Generator().manual_seed(17)
        r = torch.randint(0, 3, (24, 2), generator=g).to(dtype)
        r = (r.double() if ref else r).to(dev)
        idx = (torch.randperm(24, generator=g) % 5).to(dev)
        m = (torch.rand(24, t, generator=g) > 0.3).to(dev)
        outs = [rk.group_advantages(r[:, 0], group_index=idx, method=meth, mask=m,
                                    backend=backend)
                for meth in ("opo", "gpg", "grpo_passk", "reinforce_plus_plus_baseline")]
        outs.append(rk.group_advantages(r, group_size=4, method="gdpo", mask=m,
                                        reward_weights=[1.0, 0.5], backend=backend))
        rt = torch.randn(b, t, generator=g)
        base = torch.randn(b, generator=g)
        rt, base = ((rt.double(), base.double()) if ref else (rt, base))
        seq_m = (torch.rand(b, t, generator=g) > 0.2).to(dev)
        outs += rk.discounted_returns(rt.to(dev), seq_m, gamma=0.9, baseline=base.to(dev),
                                      whiten=True, backend=backend)
        return outs, []

    def gae(dtype, backend, ref):
        g = torch.Generator().manual_seed(14)
        r, v = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
        mask = (torch.rand(b, t, generator=g) > 0.2).to(dev)
        if ref:
            r, v = r.double(), v.double()
        r, v = r.to(dev), v.to(dev)
        adv, ret = rk.gae(r, v, mask, gamma=0.99, lam=0.95, backend=backend)
        v = v.requires_grad_(True)
        return [adv, ret, rk.discounted_returns(r, mask, gamma=0.9, backend=backend),
                rk.masked_whiten(v, mask, backend=backend)], [v]

    def linear(dtype, backend, ref):
        g = torch.Generator().manual_seed(15)
        hid = torch.randn(b, t, h, generator=g).to(dtype)
        w = (torch.randn(vocab, h, generator=g) / 4).to(dtype)
        tok = torch.randint(0, vocab, (b, t), generator=g)
        tok[0, :2] = -100
        tok = tok.to(dev)
        if ref:
            hid, w = hid.double(), w.double()
        hid, w = hid.to(dev).requires_grad_(True), w.to(dev).requires_grad_(True)
        lp, ent = rk.linear_token_logprobs(hid, w, tok, return_entropy=True, backend=backend)
        old = (lp.detach().float() + 0.1).to(lp.dtype)
        adv = torch.linspace(-1, 1, b).to(lp.dtype).to(dev)
        loss, _ = rk.linear_grpo_loss(hid, w, tok, old, adv,
                                      tok != -100, entropy_coef=0.01, backend=backend)
        return [lp, ent, loss], [hid, w]

    def linear_gif(dtype, backend, ref):
        # issue 20: d hidden / d weight / d bias formed in the forward (three GEMMs on triton)
        g = torch.Generator().manual_seed(18)
        hid = torch.randn(b, t, h, generator=g).to(dtype)
        w = (torch.randn(vocab, h, generator=g) / 4).to(dtype)
        bias = (torch.randn(vocab, generator=g) / 4).to(dtype)
        tok = torch.randint(0, vocab, (b, t), generator=g)
        tok[0, :2] = -100
        old = -torch.rand(b, t, generator=g) * 3
        ref_lp = old - 0.1
        adv = torch.linspace(-1, 1, b)
        if ref:
            hid, w, bias = hid.double(), w.double(), bias.double()
            old, ref_lp, adv = old.double(), ref_lp.double(), adv.double()
        hid, w, bias = (x.to(dev).requires_grad_(True) for x in (hid, w, bias))
        tok, old, ref_lp, adv = tok.to(dev), old.to(dev), ref_lp.to(dev), adv.to(dev)
        loss, m = rk.linear_grpo_loss(hid, w, tok, old, adv, tok != -100, bias=bias,
                                      ref_logp=ref_lp, kl_coef=0.05, entropy_coef=0.01,
                                      temperature=0.9, grad_in_forward=True, backend=backend)
        return [loss, m["entropy"]], [hid, w, bias]

    def linear_sparse(dtype, backend, ref):
        g = torch.Generator().manual_seed(16)
        hid = torch.randn(b, t, h, generator=g).to(dtype)
        w = (torch.randn(vocab, h, generator=g) / 4).to(dtype)
        idx = torch.randint(0, vocab, (b, t, 5), generator=g)
        idx[0, 0, 2:] = -1  # unused slots
        if ref:
            hid, w = hid.double(), w.double()
        hid, w = hid.to(dev).requires_grad_(True), w.to(dev).requires_grad_(True)
        idx = idx.to(dev)
        full, tail = rk.linear_sparse_logprobs(hid, w, idx, temperature=0.8, return_tail=True,
                                               backend=backend)
        support = rk.linear_sparse_logprobs(hid, w, idx, normalize="support", backend=backend)
        return [full, tail, support], [hid, w]

    def rollout_correction(dtype, backend, ref):
        # trainer vs rollout log-probs 0.3 nats apart, a ragged mask with an empty sequence,
        # NaN at masked positions; thresholds far from the data (the keep flags are exact)
        g = torch.Generator().manual_seed(17)
        old = (-torch.rand(b, t, generator=g) * 3).to(dtype)
        roll = (old.float() + 0.3 * torch.randn(b, t, generator=g)).to(dtype)
        mask = torch.rand(b, t, generator=g) > 0.2
        mask[1] = False
        roll = roll.masked_fill(~mask, float("nan"))
        adv = torch.randn(b, generator=g)
        cast = (lambda z: z.double().to(dev)) if ref else (lambda z: z.to(dev))
        old, roll, adv, mask = cast(old), cast(roll), cast(adv), mask.to(dev)
        outs = []
        for level, mode, rej, thr in (
                ("token", "truncate", "token_k2", 0.02),
                ("sequence", "mask", "seq_sum_k1,opsm", {"seq_sum_k1": (0.5, 2.0),
                                                         "opsm": 0.0}),
                ("geometric", "truncate", "seq_max_k3", 0.2)):
            w, keep, m = rk.rollout_correction(
                old, roll, mask, level=level, mode=mode, threshold_high=1.5,
                threshold_low=0.7, reject=rej, reject_threshold=thr,
                advantages=adv if "opsm" in rej else None, backend=backend)
            outs += [w, keep.to(w.dtype)] + list(m.values())
        return outs, []

    return {"policy_loss": policy_loss, "kl_penalty": kl_penalty,
            "rollout_correction": rollout_correction,
            "group_advantages": group_advantages, "gae+returns+whiten": gae,
            "advantage_estimators": estimators,
            "linear_token_logprobs+linear_grpo_loss": linear,
            "linear_grpo_loss grad_in_forward": linear_gif,
            "linear_sparse_logprobs": linear_sparse}


# The ops of the op table (rlkernels/ops/_table.py) each case exercises: a backend checks
# the case when it implements all of them (tests/test_op_table.py: every op has a case).
_DISPATCH = {"token_logprobs": ("token_logprobs",), "entropy": ("token_logprobs",),
             "sparse_logprobs": ("sparse_logprobs",), "sparse_kl": ("sparse_kl",),
             "kl_divergence": ("kl_divergence",),
             "kl_divergence alpha/tv": ("kl_divergence",), "grpo_loss": ("grpo_loss",),
             "grpo_loss grad_in_forward": ("grpo_loss",),
             "policy_loss": ("policy_loss",), "kl_penalty": ("kl_penalty",),
             "group_advantages": ("group_advantages",),
             "gae+returns+whiten": ("gae", "discounted_returns", "masked_whiten"),
             "advantage_estimators": ("group_advantages", "discounted_advantages"),
             "linear_token_logprobs+linear_grpo_loss": ("linear_token_logprobs",
                                                        "linear_grpo_loss"),
             "linear_grpo_loss grad_in_forward": ("linear_grpo_loss",),
             "linear_sparse_logprobs": ("linear_sparse_logprobs",),
             "rollout_correction": ("rollout_correction",)}


def _errors(outs: List[Tensor], refs: List[Tensor]):
    abs_err = rel_err = 0.0
    ok = True
    for o, r in zip(outs, refs):
        o, r = o.detach().double(), r.detach().double()
        same_inf = (torch.isinf(r) & (o == r)) | (torch.isnan(r) & torch.isnan(o))
        diff = torch.where(same_inf, 0.0, (o - r).abs())
        diff = torch.nan_to_num(diff, nan=math.inf)
        scale = torch.where(same_inf, 1.0, r.abs())
        if diff.numel():
            abs_err = max(abs_err, float(diff.max()))
            big = scale > 1e-3  # relative error is only meaningful away from zero
            if bool(big.any()):
                rel_err = max(rel_err, float((diff[big] / scale[big]).max()))
            ok &= bool((diff <= 1e-5 + 1e-5 * scale).all())
    return abs_err, rel_err, ok


# The gradient bound is ``factor * eps(dtype) * max|g_ref| + 1e-7``. SPEC section 5 gives
# factor 2 for exact inputs; the linear ops' logits are themselves an fp32 GEMM of H terms,
# whose rounding (up to ~H eps) the bound has to admit.
_LINEAR_H = 16
_GRAD_FACTOR = {"linear_token_logprobs+linear_grpo_loss": 2 + _LINEAR_H,
                "linear_grpo_loss grad_in_forward": 2 + _LINEAR_H,
                "linear_sparse_logprobs": 2 + _LINEAR_H}


def _grad_errors(grads: List[Tensor], refs: List[Tensor], dtype: torch.dtype,
                 factor: float = 2.0):
    worst, ok = 0.0, True
    for g, r in zip(grads, refs):
        g, r = g.double(), r.double()
        if not g.numel():
            continue
        tol = factor * torch.finfo(dtype).eps * float(r.abs().max()) + 1e-7
        err = float(torch.nan_to_num((g - r).abs(), nan=math.inf).max())
        worst = max(worst, err)
        ok &= err <= tol
    return worst, ok


def _run(case: Callable, dtype, backend: str, ref: bool):
    outs, inputs = case(dtype, backend, ref)
    grads = []
    if inputs:
        grads = torch.autograd.grad(_project(outs, 99), inputs, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return outs, grads


def check(name: str, case: Callable, backend: str, dtype: torch.dtype) -> Row:
    dname = str(dtype).replace("torch.", "")
    try:
        with warnings.catch_warnings():
            # the Triton interpreter evaluates masked-off lanes (-inf - -inf) in numpy
            warnings.simplefilter("ignore", RuntimeWarning)
            outs, grads = _run(case, dtype, backend, ref=False)
        ref_outs, ref_grads = _run(case, dtype, "torch", ref=True)
        out_err, out_rel, ok_out = _errors(outs, ref_outs)
        grad_err, ok_grad = _grad_errors(grads, ref_grads, dtype, _GRAD_FACTOR.get(name, 2.0))
        return Row(name, backend, dname, out_err, out_rel, grad_err, ok_out and ok_grad)
    except Exception as exc:  # a crash is a failure with its reason, not a traceback
        return Row(name, backend, dname, math.nan, math.nan, math.nan, False,
                   f"{type(exc).__name__}: {exc}")


def device_for(backend: str) -> str:
    """Where a backend's cases run: on the GPU for ``triton`` and ``cuda`` when torch sees one,
    else on CPU (``torch`` always runs on CPU; ``triton`` on CPU needs ``TRITON_INTERPRET=1``)."""
    return "cuda" if backend != "torch" and torch.cuda.is_available() else "cpu"


def check_backend(backend: str, quick: bool = False):
    """``(rows, uncovered)``: one row per case and dtype, and the case names this backend has
    no implementation of (they are checked on ``torch`` only)."""
    dev = device_for(backend)
    vocab_sizes = (7, 1031) if quick else (7, 1031, 50257)
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16)
    cases = {}
    for vocab in vocab_sizes:
        n = 8 if vocab < 10000 else 4
        cases.update({f"{k} V={vocab}": v for k, v in _vocab_cases(vocab, n, dev).items()})
    cases.update(_other_cases(quick, dev))
    rows: List[Row] = []
    uncovered: List[str] = []
    for name, case in cases.items():
        ops = _DISPATCH[name.split(" V=")[0]]
        if backend != "torch" and not all(backends.implements(backend, op) for op in ops):
            if name.split(" V=")[0] not in uncovered:
                uncovered.append(name.split(" V=")[0])
            continue
        for dtype in dtypes:
            rows.append(check(name, case, backend, dtype))
    return rows, uncovered


def run(backend: Optional[str] = None, quick: bool = False) -> List[Row]:
    """All rows of the verification table, for ``backend`` or every available backend."""
    status = backends.available_backends()
    names = [backend] if backend else [b for b, s in status.items() if s == "ok"]
    rows: List[Row] = []
    for b in names:
        if status.get(b) != "ok":
            rows.append(Row("*", b, "-", math.nan, math.nan, math.nan, False,
                            f"unavailable: {status.get(b)}"))
            continue
        rows += check_backend(b, quick)[0]
    return rows


def check_triton_interpreted(timeout_s: float = 600.0):
    """``(rows, uncovered)`` of the ``triton`` backend on the quick shapes, run through the
    Triton interpreter on CPU in a subprocess with ``TRITON_INTERPRET=1`` (the variable must
    be set before triton is imported, so it cannot be switched on in this process). A crash or
    timeout of the subprocess is one failed row with the reason."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-c", "from rlkernels._verify import _interpreted_child; "
           "_interpreted_child()"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        reason = f"the interpreter run took over {timeout_s:.0f} s"
    else:
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            result = json.loads(lines[-1])
            return [Row(**r) for r in result["rows"]], result["uncovered"]
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        reason = f"the interpreter run exited with {proc.returncode}: {tail}"
    return [Row("*", "triton", "-", math.nan, math.nan, math.nan, False, reason)], []


def _interpreted_child() -> None:
    """The subprocess of :func:`check_triton_interpreted`: one JSON line on stdout."""
    import dataclasses
    import json

    status = backends.available_backends()["triton"]
    if status != "ok":
        raise SystemExit(f"triton backend unavailable under TRITON_INTERPRET=1: {status}")
    rows, uncovered = check_backend("triton", quick=True)
    print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "uncovered": uncovered}))


def backend_line(name: str, rows: List[Row], uncovered: List[str], note: str = "") -> str:
    """``checked: N passed[, M failed]`` for one backend's rows."""
    failed = sum(not r.ok for r in rows)
    text = f"checked: {len(rows) - failed} passed" + (f", {failed} failed" if failed else "")
    if note:
        text += f" ({note})"
    if uncovered:
        text += f"; not implemented by {name}, checked on torch only: {', '.join(uncovered)}"
    return text


def format_table(rows: List[Row]) -> str:
    head = f"{'op':44} {'backend':8} {'dtype':9} {'max abs':>10} {'max rel':>10} " \
           f"{'grad err':>10}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.op:44} {r.backend:8} {r.dtype:9} {r.out_err:10.2e} {r.out_rel:10.2e} "
                     f"{r.grad_err:10.2e}  {'PASS' if r.ok else 'FAIL'} {r.note}".rstrip())
    return "\n".join(lines)
