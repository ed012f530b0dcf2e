"""Step 3 of benchmarks/gpu_check.sh: every public op x {triton, cuda} against the fp64 reference.

    python benchmarks/gpu_parity.py --out OUT/parity.csv [--dry] [--only SUBSTRING]

One realistic shape per op plus the SPEC section 5 edge cases, one CSV line per (case,
backend, dtype), appended and flushed as soon as it is known, so a run cut at any point keeps
every line before the cut:

* realistic: vocabulary ops at N=4096, V=151936 bf16 (grpo_loss B=4 x T=1024); policy and
  advantage ops at B=512, T=4096 (group_advantages B=16384); linear ops at N=2048, H=3584,
  V=151936 bf16;
* ``token_logprobs`` at N=16384, V=151936 bf16 (N*V > 2**31, the reference taken 1024 rows
  at a time);
* edges: odd V (7 and 50257 in fp32, 1031 and 129920 in bf16) at N=64. Every logits tensor
  cycles its rows through random, peaked (one logit +30), flat and ``-inf``-column rows, with
  every 5th token padding (-100).

The reference is the ``torch`` backend on the same input values in fp64. Outputs pass within
``atol = rtol = 1e-5`` (SPEC section 5); the gradient of a random projection of k outputs
within ``2 k eps(dtype) max|g_ref| + 1e-7`` (SPEC's ``2 eps`` per output: autograd sums the k
gradients, and where they cancel the sum keeps their rounding). The linear ops' logits are
themselves an fp32 GEMM of H terms (the reference's are fp64), so at H=3584 their outputs get
``1e-4`` and their gradients ``4 k eps(dtype) max|g_ref|`` (the triton backward rounds ``d z``
to bf16 for bf16 inputs, README); every row reports the measured errors either way.
``kl_penalty`` has no ``backend=``: it is checked once, torch on the device;
``sampling_support`` (no ``backend=`` either) gets a ``skipped`` line. A backend that is
unavailable, or lacks an op, gives a ``skipped`` line with the reason.

``--dry`` (the CPU rehearsal): the same cases at tiny shapes on CPU, triton through the
interpreter (``TRITON_INTERPRET=1``), cuda lines skipped. Exit status 1 when any line is FAIL
or error.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

COLUMNS = ["case", "op", "dispatch", "backend", "dtype", "shape", "status", "out_abs",
           "out_rel", "grad_err", "grad_tol", "seconds", "note"]
BACKENDS = ("triton", "cuda")

import torch  # noqa: E402  (after the docstring constants, before rlkernels)

Tensor = torch.Tensor


# ---- inputs -------------------------------------------------------------------------------

def make_logits(n: int, v: int, dtype, device, seed: int) -> Tensor:
    """Rows by ``i % 4``: random (scale 2), peaked (one logit +30), flat, ``-inf`` at every
    third column (1, 4, 7, ...)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, v, generator=g, device=device).mul_(2.0)
    rows = torch.arange(1, n, 4, device=device)
    x[rows, (7 * rows) % v] += 30.0
    x[2::4] = 0.5
    if v > 2:
        x[3::4, 1::3] = -math.inf
    return x.to(dtype)


def make_tokens(n: int, v: int, device, seed: int, pad_every: int = 5) -> Tensor:
    """Ids off the ``-inf`` columns of :func:`make_logits` (finite gradients), every
    ``pad_every``-th one padding (-100)."""
    g = torch.Generator(device=device).manual_seed(seed)
    tok = torch.randint(0, v, (n,), generator=g, device=device)
    if v > 2:
        bad = (torch.arange(n, device=device) % 4 == 3) & (tok % 3 == 1)
        tok = torch.where(bad, tok - 1, tok)
    tok[::pad_every] = -100
    return tok


def rand(shape, device, seed: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device).mul_(scale).add_(shift)


def project(outputs: List[Tensor], seed: int) -> Tensor:
    """A random linear functional of the finite part of the outputs (same weights for the
    fp64 reference: drawn in fp64, cast to each output's dtype)."""
    total = 0.0
    for i, out in enumerate(outputs):
        g = torch.Generator(device=out.device).manual_seed(seed + i)
        w = torch.randn(out.shape, generator=g, device=out.device,
                        dtype=torch.float64).to(out.dtype)
        total = total + torch.where(torch.isfinite(out), out * w, 0.0).sum()
    return total


# ---- comparison ---------------------------------------------------------------------------

def out_errors(outs: List[Tensor], refs: List[Tensor], tol: float):
    """(max abs, max rel, ok): ``|o - r| <= tol + tol |r|``, infinities and NaN must match."""
    abs_err = rel_err = 0.0
    ok = len(outs) == len(refs)
    for o, r in zip(outs, refs):
        o, r = o.detach().double(), r.detach().double().to(o.device)
        if o.shape != r.shape:
            return math.inf, math.inf, False
        same = (torch.isinf(r) & (o == r)) | (torch.isnan(r) & torch.isnan(o))
        diff = torch.nan_to_num(torch.where(same, 0.0, (o - r).abs()), nan=math.inf)
        scale = torch.where(same, 1.0, r.abs())
        if diff.numel():
            abs_err = max(abs_err, float(diff.max()))
            big = scale > 1e-3
            if bool(big.any()):
                rel_err = max(rel_err, float((diff[big] / scale[big]).max()))
            ok &= bool((diff <= tol + tol * scale).all())
    return abs_err, rel_err, ok


def grad_errors(grads: List[Tensor], refs: List[Tensor], dtype, factor: float):
    """(max abs error, tolerance, ok) with ``tol = factor eps(dtype) max|g_ref| + 1e-7``."""
    worst, tol_max, ok = 0.0, 0.0, True
    for g, r in zip(grads, refs):
        if not g.numel():
            continue
        g, r = g.double(), r.double().to(g.device)
        tol = factor * torch.finfo(dtype).eps * float(r.abs().max()) + 1e-7
        err = float(torch.nan_to_num((g - r).abs(), nan=math.inf).max())
        worst, tol_max = max(worst, err), max(tol_max, tol)
        ok &= err <= tol
    return worst, tol_max, ok


# ---- cases --------------------------------------------------------------------------------

# run(backend, ref, device) -> (outputs, differentiable inputs); ref=True: fp64 inputs
Run = Callable[[str, bool, torch.device], Tuple[List[Tensor], List[Tensor]]]


@dataclass
class Case:
    name: str
    op: str                       # public op(s)
    dispatch: Optional[Tuple[str, str]]   # (family, op) for backends.implements; None: torch
    dtype: torch.dtype
    shape: Dict[str, int]
    run: Run
    out_tol: float = 1e-5
    grad_factor: float = 2.0
    note: str = ""
    backends: Tuple[str, ...] = BACKENDS
    tags: List[str] = field(default_factory=list)


def _cast(t: Tensor, ref: bool) -> Tensor:
    return t.double() if ref else t


def vocab_cases(n: int, v: int, dtype, label: str) -> List[Case]:
    import rlkernels as rk
    s = {"N": n, "V": v}

    def token_logprobs(b, ref, dev):
        x = _cast(make_logits(n, v, dtype, dev, 1), ref).requires_grad_(True)
        lp, h = rk.token_logprobs(x, make_tokens(n, v, dev, 2), temperature=0.9,
                                  return_entropy=True, backend=b)
        return [lp, h], [x]

    def entropy(b, ref, dev):
        x = _cast(make_logits(n, v, dtype, dev, 3), ref).requires_grad_(True)
        return [rk.entropy(x, temperature=1.1, backend=b)], [x]

    def sparse_logprobs(b, ref, dev):
        x0 = make_logits(n, v, dtype, dev, 4)
        k = min(v, 64)
        idx = torch.argsort(x0.float(), dim=-1, descending=True, stable=True)[:, :k].clone()
        idx[::3, -1] = -1  # unused slots
        x = _cast(x0, ref).requires_grad_(True)
        full, tail = rk.sparse_logprobs(x, idx, return_tail=True, backend=b)
        sup = rk.sparse_logprobs(x, idx, normalize="support", backend=b)
        return [full, tail, sup], [x]

    def sparse_kl(b, ref, dev):
        x = _cast(make_logits(n, v, dtype, dev, 5), ref).requires_grad_(True)
        teacher = make_logits(n, v, torch.float32, dev, 6)
        t_logp, idx = torch.log_softmax(teacher, -1).topk(min(v, 64), dim=-1)
        return [rk.sparse_kl(x, idx, _cast(t_logp, ref), backend=b)], [x]

    def kl_divergence(b, ref, dev):
        x0, y0 = make_logits(n, v, dtype, dev, 7), make_logits(n, v, dtype, dev, 8)
        y0 = torch.where(torch.isfinite(x0.float()), y0, x0)  # -inf at the same columns
        mask = torch.zeros(n, dtype=torch.bool, device=dev)
        mask[::4] = True
        x = _cast(x0, ref).requires_grad_(True)
        y = _cast(y0, ref).requires_grad_(True)
        return [rk.kl_divergence(x, y, kind=kd, ignore_mask=mask, backend=b)
                for kd in ("reverse", "forward", "jsd")], [x, y]

    def grpo_loss(b, ref, dev, gif=False):
        bb = 4 if n >= 4 else 1
        t = n // bb
        x0 = make_logits(bb * t, v, dtype, dev, 9)
        tok = make_tokens(bb * t, v, dev, 10).view(bb, t)
        with torch.no_grad():
            cur = rk.token_logprobs(x0.double(), tok.view(-1), temperature=0.9,
                                    backend="torch").view(bb, t)
        # rollout log-probs near the current ones, as in training (ratios near 1)
        old = (cur + 0.2 * rand((bb, t), dev, 11).double()).float()
        adv = rand((bb,), dev, 12)
        ref_lp = (cur - 0.1).float()
        x = _cast(x0, ref).view(bb, t, v).requires_grad_(True)
        loss, m = rk.grpo_loss(x, tok, _cast(old, ref), _cast(adv, ref), tok != -100,
                               ref_logp=_cast(ref_lp, ref), kl_coef=0.05, entropy_coef=0.01,
                               temperature=0.9, backend=b, grad_in_forward=gif)
        return [loss, m["clipfrac"], m["entropy"]], [x]

    def grpo_loss_gif(b, ref, dev):
        # issue 22: the same loss with d logits formed in the forward (cuda: one read)
        return grpo_loss(b, ref, dev, gif=True)

    fam = "vocab"
    return [
        Case(f"token_logprobs+entropy {label}", "token_logprobs", (fam, "token_logprobs"),
             dtype, s, token_logprobs),
        Case(f"entropy {label}", "entropy", (fam, "token_logprobs"), dtype, s, entropy),
        Case(f"sparse_logprobs {label}", "sparse_logprobs", (fam, "sparse_logprobs"), dtype,
             {**s, "K": min(v, 64)}, sparse_logprobs),
        Case(f"sparse_kl {label}", "sparse_kl", (fam, "sparse_kl"), dtype,
             {**s, "K": min(v, 64)}, sparse_kl),
        Case(f"kl_divergence {label}", "kl_divergence", (fam, "kl_divergence"), dtype, s,
             kl_divergence),
        Case(f"grpo_loss {label}", "grpo_loss", ("policy", "grpo_loss"), dtype,
             {"B": 4 if n >= 4 else 1, "T": n // (4 if n >= 4 else 1), "V": v}, grpo_loss),
        Case(f"grpo_loss grad_in_forward {label}", "grpo_loss", ("policy", "grpo_loss"),
             dtype, {"B": 4 if n >= 4 else 1, "T": n // (4 if n >= 4 else 1), "V": v},
             grpo_loss_gif),
    ]


def policy_cases(bsz: int, t: int, adv_b: int) -> List[Case]:
    import rlkernels as rk
    s = {"B": bsz, "T": t}

    def inputs(dev, ref):
        old = rand((bsz, t), dev, 20, 0.5, -2.0)
        logp = old + rand((bsz, t), dev, 21, 0.3)
        mask = rand((bsz, t), dev, 22) > -0.8
        mask[0] = False  # an empty sequence
        return (_cast(logp, ref).requires_grad_(True), _cast(old, ref),
                _cast(rand((bsz,), dev, 23), ref), mask,
                _cast(torch.rand(bsz, t, device=dev,
                                 generator=torch.Generator(device=dev).manual_seed(24)),
                      ref).requires_grad_(True))

    def policy_loss(b, ref, dev):
        logp, old, adv, mask, ent = inputs(dev, ref)
        outs = []
        for kw in (dict(clip_high=0.28, dual_clip=3.0, ref_logp=old - 0.05, kl_coef=0.1,
                        entropy=ent, entropy_coef=0.01),
                   dict(agg="seq-mean-token-mean", ratio_level="sequence"),
                   dict(loss="cispo", clip_high=0.28, agg="seq-mean-token-sum-norm"),
                   # issue 21's losses (a few; tests/ops/test_policy_losses_new.py has all)
                   dict(loss="sapo"), dict(loss="gmpo"), dict(loss="dppo_kl", dual_clip=3.0),
                   dict(loss="dro", dro_beta=0.1), dict(loss="vespo"),
                   dict(ref_logp=old - 0.05, kl_coef=0.1, kl_estimator="k3_is")):
            loss, m = rk.policy_loss(logp, old, adv, mask, backend=b, **kw)
            outs += [loss] + [m[k] for k in sorted(m)]
        return outs, [logp, ent]

    def kl_penalty(b, ref, dev):
        logp, old, _, _, _ = inputs(dev, ref)
        return [rk.kl_penalty(logp, old, estimator=e) for e in ("k1", "abs", "k2", "k3")] + \
               [rk.kl_penalty(logp, old, estimator="k3", clamp=(-10.0, 10.0))], [logp]

    def group_advantages(b, ref, dev):
        g = torch.Generator(device=dev).manual_seed(25)
        r = _cast(torch.randint(0, 3, (adv_b,), generator=g, device=dev).float(), ref)
        idx = torch.randperm(adv_b, generator=g, device=dev) % max(1, adv_b // 7)
        tm = torch.rand(adv_b, 48, generator=g, device=dev) > 0.3  # response tokens
        comps = _cast(torch.randint(0, 3, (adv_b, 3), generator=g, device=dev).float(), ref)
        return [rk.group_advantages(r, group_size=16, method=m, backend=b)
                for m in ("grpo", "rloo", "dr_grpo", "batch_std", "gpg", "grpo_passk")] + \
               [rk.group_advantages(r, group_size=16, method=m, mask=tm, backend=b)
                for m in ("opo", "reinforce_plus_plus_baseline")] + \
               [rk.group_advantages(comps, group_size=16, method="gdpo", mask=tm,
                                    reward_weights=[1.0, 0.5, 2.0], backend=b),
                rk.group_advantages(r, group_index=idx, backend=b)], []

    def gae(b, ref, dev):
        r, v = _cast(rand((bsz, t), dev, 26), ref), _cast(rand((bsz, t), dev, 27), ref)
        mask = rand((bsz, t), dev, 28) > -0.8
        adv, ret = rk.gae(r, v, mask, gamma=0.99, lam=0.95, backend=b)
        return [adv, ret], []

    def discounted_returns(b, ref, dev):
        r = _cast(rand((bsz, t), dev, 29), ref)
        mask = rand((bsz, t), dev, 30) > -0.8
        base = _cast(rand((bsz,), dev, 37), ref)
        return [rk.discounted_returns(r, mask, gamma=0.9, backend=b),
                *rk.discounted_returns(r, mask, gamma=1.0, baseline=base, backend=b),
                *rk.discounted_returns(r, mask, gamma=0.9, whiten=True, backend=b)], []

    def masked_whiten(b, ref, dev):
        v = _cast(rand((bsz, t), dev, 31, 2.0, 1.0), ref).requires_grad_(True)
        mask = rand((bsz, t), dev, 32) > -0.8
        return [rk.masked_whiten(v, mask, backend=b),
                rk.masked_whiten(v, mask, shift_mean=False, backend=b)], [v]

    def rollout_correction(b, ref, dev):
        # keep flags are compared exactly: only sequence-level tests decide them here (a
        # per-token test on ~10^6 tokens has tokens within fp32 rounding of its threshold)
        old = rand((bsz, t), dev, 33, 0.5, -2.0)
        mask = rand((bsz, t), dev, 35) > -0.8
        mask[0] = False  # an empty sequence
        adv = _cast(rand((bsz,), dev, 36), ref)
        outs = []
        for spread, kw in (
                (0.3, dict(level="token", threshold_high=2.0, threshold_low=0.5,
                           reject="seq_max_k2", reject_threshold=0.55)),
                (0.01, dict(level="sequence", mode="mask", threshold_high=2.0,
                            threshold_low=0.5, reject="seq_mean_k1,opsm",
                            reject_threshold={"seq_mean_k1": (0.9998, 1.0002), "opsm": 0.0},
                            advantages=adv)),
                (0.3, dict(level="geometric", threshold_high=1.5, threshold_low=0.7))):
            roll = (old + rand((bsz, t), dev, 34, spread)).masked_fill(~mask, float("nan"))
            w, keep, m = rk.rollout_correction(_cast(old, ref), _cast(roll, ref), mask,
                                               backend=b, **kw)
            outs += [w, keep.to(w.dtype)] + [m[k] for k in sorted(m)]
        return outs, []

    f32 = torch.float32
    return [
        Case("rollout_correction", "rollout_correction", ("rollout", "rollout_correction"),
             f32, s, rollout_correction,
             note="token TIS + seq_max_k2, sequence MIS + seq_mean_k1 + opsm, geometric TIS"),
        Case("policy_loss", "policy_loss", ("policy", "policy_loss"), f32, s, policy_loss,
             note="ppo dual-clip+kl+entropy, GSPO seq-mean, cispo, sapo, gmpo, dppo_kl, "
                  "dro, vespo, k3_is"),
        Case("kl_penalty", "kl_penalty", None, f32, s, kl_penalty, backends=("torch",),
             note="no backend= argument: torch on the device"),
        Case("group_advantages", "group_advantages", ("advantage", "group_advantages"), f32,
             {"B": adv_b, "G": 16}, group_advantages),
        Case("gae", "gae", ("advantage", "gae"), f32, s, gae),
        Case("discounted_returns", "discounted_returns", ("advantage", "discounted_returns"),
             f32, s, discounted_returns),
        Case("masked_whiten", "masked_whiten", ("advantage", "masked_whiten"), f32, s,
             masked_whiten),
    ]


def linear_cases(n: int, h: int, v: int, dtype) -> List[Case]:
    import rlkernels as rk
    s = {"N": n, "H": h, "V": v}

    def linear(b, ref, dev):
        hid = _cast(rand((n, h), dev, 40).to(dtype), ref).requires_grad_(True)
        w = _cast(rand((v, h), dev, 41, h ** -0.5 * 2).to(dtype), ref).requires_grad_(True)
        tok = make_tokens(n, v, dev, 42)
        lp, ent = rk.linear_token_logprobs(hid, w, tok, return_entropy=True, backend=b)
        bb = 2 if n % 2 == 0 else 1
        old = (lp.detach().double() + 0.1 * rand((n,), dev, 43).double()).to(lp.dtype)
        loss, _ = rk.linear_grpo_loss(hid.view(bb, n // bb, h), w, tok.view(bb, n // bb),
                                      old.view(bb, n // bb),
                                      torch.linspace(-1, 1, bb, device=dev).to(lp.dtype),
                                      (tok != -100).view(bb, n // bb), entropy_coef=0.01,
                                      backend=b)
        return [lp, ent, loss], [hid, w]

    def linear_sparse(b, ref, dev):
        hid = _cast(rand((n, h), dev, 44).to(dtype), ref).requires_grad_(True)
        w = _cast(rand((v, h), dev, 45, h ** -0.5 * 2).to(dtype), ref).requires_grad_(True)
        k = min(v, 8)
        # k distinct ids per row (a sampler's support), spread over the vocabulary
        start = torch.randint(0, v, (n, 1), generator=torch.Generator().manual_seed(46))
        idx = ((start + torch.arange(k) * max(v // k, 1)) % v).to(dev)
        idx[::5, -1] = -1  # unused slots
        full, tail = rk.linear_sparse_logprobs(hid, w, idx, return_tail=True, backend=b)
        sup = rk.linear_sparse_logprobs(hid, w, idx, normalize="support", backend=b)
        return [full, tail, sup], [hid, w]

    big_h = h >= 256
    tol = dict(out_tol=1e-4 if big_h else 1e-5, grad_factor=4.0 if big_h else 2.0 + h,
               note="fp32 GEMM of H terms: outputs 1e-4, grads 4k eps" if big_h else
               "grads (2 + H) eps as rlkernels verify")
    return [Case("linear_token_logprobs+linear_grpo_loss", "linear_token_logprobs",
                 ("linear", "linear_token_logprobs"), dtype, s, linear, **tol),
            Case("linear_sparse_logprobs", "linear_sparse_logprobs",
                 ("linear", "linear_sparse_logprobs"), dtype, s, linear_sparse, **tol)]


def sampling_support_case() -> Case:
    return Case("sampling_support", "sampling_support", None, torch.float32, {}, None,
                backends=())


def big_case(n: int, v: int, chunk: int) -> Case:
    case = Case("token_logprobs N*V>2^31", "token_logprobs", ("vocab", "token_logprobs"),
                torch.bfloat16, {"N": n, "V": v}, None,
                note=f"N*V = {n * v} ({'>' if n * v > 2**31 else '<='} 2^31); "
                     f"reference {chunk} rows at a time")
    case.tags.append(f"chunk={chunk}")
    return case


def all_cases(dry: bool) -> List[Case]:
    bf16, f32 = torch.bfloat16, torch.float32
    if dry:
        cases = vocab_cases(8, 1031, bf16, "N=8,V=1031") + vocab_cases(8, 7, f32, "N=8,V=7")
        cases += policy_cases(4, 64, 64)
        cases += linear_cases(8, 16, 37, f32)
        cases += [big_case(8, 37, 3), sampling_support_case()]
        return cases
    # realistic shapes first, then N*V > 2^31, then the odd vocabularies (a cut keeps the
    # most informative lines)
    cases = vocab_cases(4096, 151936, bf16, "N=4096,V=151936")
    cases += policy_cases(512, 4096, 16384)
    cases += linear_cases(2048, 3584, 151936, bf16)
    cases += [big_case(16384, 151936, 1024), sampling_support_case()]
    for v, dt in ((7, f32), (1031, bf16), (50257, f32), (129920, bf16)):
        cases += vocab_cases(64, v, dt, f"N=64,V={v}")
    return cases


# ---- running ------------------------------------------------------------------------------

def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _evaluate(run: Run, backend: str, ref: bool, device):
    """(outputs, gradients of their projection, k = how many outputs carry a gradient)."""
    outs, inputs = run(backend, ref, device)
    grads: List[Tensor] = []
    k = sum(1 for o in outs if o.requires_grad)
    if inputs:
        grads = list(torch.autograd.grad(project(outs, 99), inputs, allow_unused=True))
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
    return [o.detach() for o in outs], grads, max(1, k)


def _check_big(case: Case, backend: str, device) -> dict:
    import rlkernels as rk
    n, v = case.shape["N"], case.shape["V"]
    chunk = int(case.tags[0].split("=")[1])
    x = make_logits(n, v, case.dtype, device, 50)
    tok = make_tokens(n, v, device, 51)
    xg = x.requires_grad_(True)
    lp, h = rk.token_logprobs(xg, tok, return_entropy=True, backend=backend)
    w = [torch.randn(n, generator=torch.Generator(device=device).manual_seed(52 + i),
                     device=device, dtype=torch.float64).float() for i in range(2)]
    loss = sum(torch.where(torch.isfinite(o), o * wi, 0.0).sum() for o, wi in zip((lp, h), w))
    (grad,) = torch.autograd.grad(loss, [xg])
    lp, h = lp.detach(), h.detach()
    abs_err = rel_err = g_err = g_ref_max = 0.0
    ok = True
    for i in range(0, n, chunk):
        sl = slice(i, min(n, i + chunk))
        xr = x.detach()[sl].double().requires_grad_(True)
        lpr, hr = rk.token_logprobs(xr, tok[sl], return_entropy=True, backend="torch")
        lr = sum(torch.where(torch.isfinite(o), o * wi[sl].double(), 0.0).sum()
                 for o, wi in zip((lpr, hr), w))
        (gr,) = torch.autograd.grad(lr, [xr])
        a, r, o = out_errors([lp[sl], h[sl]], [lpr, hr], 1e-5)
        abs_err, rel_err, ok = max(abs_err, a), max(rel_err, r), ok and o
        g_err = max(g_err, float(torch.nan_to_num((grad[sl].double() - gr).abs(),
                                                  nan=math.inf).max()))
        g_ref_max = max(g_ref_max, float(gr.abs().max()))
        del xr, lpr, hr, gr
    tol = 2 * 2 * torch.finfo(case.dtype).eps * g_ref_max + 1e-7  # k = 2 outputs
    return {"out_abs": abs_err, "out_rel": rel_err, "grad_err": g_err, "grad_tol": tol,
            "status": "PASS" if ok and g_err <= tol else "FAIL"}


class Writer:
    def __init__(self, path: str):
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.f = open(path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=COLUMNS)
        if new:
            self.w.writeheader()
            self.f.flush()

    def row(self, **kw):
        self.w.writerow({k: kw.get(k, "") for k in COLUMNS})
        self.f.flush()
        os.fsync(self.f.fileno())


def _fmt(x) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def run_cases(cases: List[Case], out: str, device, log=print) -> Tuple[int, int, int]:
    """Write one line per (case, backend); returns (passed, failed, skipped)."""
    from rlkernels import backends
    status = backends.available_backends()
    w = Writer(out)
    counts = {"PASS": 0, "FAIL": 0, "skipped": 0}
    for case in cases:
        dname = str(case.dtype).replace("torch.", "")
        shape = ",".join(f"{k}={v}" for k, v in case.shape.items())
        dispatch = "/".join(case.dispatch) if case.dispatch else ""
        base = dict(case=case.name, op=case.op, dispatch=dispatch, dtype=dname, shape=shape)
        if not case.backends:
            w.row(**base, backend="-", status="skipped: no backend= argument (sampling, "
                  "torch only; covered by the CPU tests)")
            counts["skipped"] += 1
            continue
        runnable = []
        for b in case.backends:
            why = None
            if status.get(b) != "ok":
                why = status.get(b)
            elif b == "cuda" and device.type != "cuda":
                why = "needs CUDA tensors (dry run on CPU)"
            elif case.dispatch and b != "torch" and not backends.implements(b, *case.dispatch):
                why = f"backend {b!r} has no {case.dispatch[1]} kernels"
            if why:
                w.row(**base, backend=b, status=f"skipped: {why}")
                counts["skipped"] += 1
                log(f"{case.name:44} {b:7} {dname:9} skipped: {why}")
            else:
                runnable.append(b)
        if not runnable:
            continue
        ref = None
        if case.run is not None:
            try:
                ref = _evaluate(case.run, "torch", True, device)
            except Exception as exc:
                for b in runnable:
                    w.row(**base, backend=b, status="error", note=f"reference: {_short(exc)}")
                    counts["FAIL"] += 1
                log(f"{case.name:44} reference failed: {_short(exc)}")
                continue
        for b in runnable:
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    # the Triton interpreter evaluates masked-off lanes (-inf - -inf) in numpy
                    warnings.simplefilter("ignore", RuntimeWarning)
                    if case.run is None:
                        res = _check_big(case, b, device)
                    else:
                        outs, grads, k = _evaluate(case.run, b, False, device)
                        a, r, ok_o = out_errors(outs, ref[0], case.out_tol)
                        ge, gt, ok_g = grad_errors(grads, ref[1], case.dtype,
                                                   case.grad_factor * k)
                        res = {"out_abs": a, "out_rel": r, "grad_err": ge if grads else "",
                               "grad_tol": gt if grads else "",
                               "status": "PASS" if ok_o and ok_g else "FAIL"}
                        del outs, grads
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except Exception as exc:
                res = {"status": "error", "note": _short(exc)}
                if os.environ.get("GPU_PARITY_TRACEBACK"):
                    traceback.print_exc()
            res.setdefault("note", case.note)
            dt = time.perf_counter() - t0
            w.row(**base, backend=b, seconds=f"{dt:.2f}", **{k: _fmt(v) for k, v in res.items()})
            counts["PASS" if res["status"] == "PASS" else "FAIL"] += 1
            log(f"{case.name:44} {b:7} {dname:9} {res['status']:5} "
                f"out {_fmt(res.get('out_abs', ''))} grad {_fmt(res.get('grad_err', ''))} "
                f"({dt:.1f} s) {res.get('note', '')}")
        del ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return counts["PASS"], counts["FAIL"], counts["skipped"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="CSV to append to")
    ap.add_argument("--dry", action="store_true", help="tiny shapes on CPU (rehearsal)")
    ap.add_argument("--only", help="run only the cases whose name contains this")
    args = ap.parse_args(argv)
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    cases = [c for c in all_cases(args.dry) if not args.only or args.only in c.name]
    t0 = time.perf_counter()
    passed, failed, skipped = run_cases(cases, args.out, device,
                                        log=lambda s: print(s, flush=True))
    print(f"NOTE: {passed} pass, {failed} fail/error, {skipped} skipped "
          f"({time.perf_counter() - t0:.0f} s, {device.type})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
