"""Who runs each op: rlkernels backends, naive torch, torch.compile of naive torch, and peers.

A provider's ``build(op)`` returns ``fn(inputs, shape)`` (the forward; the runner adds the
backward) or raises :class:`Skip` with the reason it cannot run here. Peers are imported
lazily, each inside ``try``: a peer that is not installed, fails to import, or has a different
signature is recorded as ``skipped: <reason>``, never vendored, never fatal.

Output conventions (so the runner can check values against ``torch-naive``): per-token ops
return the per-token tensor (or a tuple whose first element is the log-probs), loss ops
return a 0-dim loss.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

Fn = Callable[[dict, dict], object]


class Skip(Exception):
    """The provider cannot run this op here; the message says why."""


@dataclass
class Provider:
    name: str
    kind: str                      # "rlkernels" | "baseline" | "peer"
    build: Callable[[str], Fn]     # op -> fn(inputs, shape); raises Skip
    note: str = ""


def _import(module: str, attr: Optional[str] = None):
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything
        raise Skip(f"{module} not importable ({type(exc).__name__}: {str(exc)[:120]})")
    if attr is None:
        return mod
    try:
        return getattr(mod, attr)
    except AttributeError:
        raise Skip(f"{module}.{attr} not found (version {getattr(mod, '__version__', '?')})")


# ---- naive torch (what a trainer writes by hand), fp32 math like the SPEC ----------------

def naive_token_logprobs(logits, tokens):
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def naive_entropy(logits):
    z = logits.float()
    p = torch.softmax(z, -1)
    return torch.logsumexp(z, -1) - (p * z).sum(-1)


def naive_token_logprobs_entropy(logits, tokens):
    lp = torch.log_softmax(logits.float(), -1)
    return lp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)


def naive_kl_reverse(logits, ref_logits):
    lp = torch.log_softmax(logits.float(), -1)
    lq = torch.log_softmax(ref_logits.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def naive_policy_loss(logp, old_logp, advantages, mask, clip=0.2):
    ratio = torch.exp(logp - old_logp)
    a = advantages.unsqueeze(-1) if advantages.dim() == logp.dim() - 1 else advantages
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def naive_group_advantages(rewards, group_size, eps=1e-6):
    r = rewards.view(-1, group_size)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1)


def naive_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """The loop trainers run (TRL's PPO trainer, verl): T steps of [B] tensors."""
    m = mask.to(rewards.dtype)
    nextvalues = lastgae = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        cand = delta + gamma * lam * lastgae
        nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgae = cand * m[:, t] + (1 - m[:, t]) * lastgae
        out.append(lastgae)
    adv = torch.stack(out[::-1], dim=1) * m  # rlkernels' outputs are 0 at masked positions
    return adv, (adv + values) * m


NAIVE: Dict[str, Fn] = {
    "token_logprobs": lambda d, s: naive_token_logprobs(d["logits"], d["tokens"]),
    "token_logprobs_entropy": lambda d, s: naive_token_logprobs_entropy(d["logits"],
                                                                        d["tokens"]),
    "entropy": lambda d, s: naive_entropy(d["logits"]),
    "kl_divergence": lambda d, s: naive_kl_reverse(d["logits"], d["ref_logits"]),
    "sparse_logprobs": lambda d, s: torch.log_softmax(d["logits"].float(), -1).gather(
        -1, d["indices"]),
    "grpo_loss": lambda d, s: naive_policy_loss(
        naive_token_logprobs(d["logits"], d["tokens"]), d["old_logp"], d["advantages"],
        d["mask"]),
    "policy_loss": lambda d, s: naive_policy_loss(d["logp"], d["old_logp"], d["advantages"],
                                                  d["mask"]),
    "group_advantages": lambda d, s: naive_group_advantages(d["rewards"], s["G"]),
    "gae": lambda d, s: naive_gae(d["rewards"], d["values"], d["mask"]),
    "linear_token_logprobs": lambda d, s: naive_token_logprobs(d["hidden"] @ d["weight"].T,
                                                               d["tokens"]),
    "linear_grpo_loss": lambda d, s: naive_policy_loss(
        naive_token_logprobs(d["hidden"] @ d["weight"].T, d["tokens"]), d["old_logp"],
        d["advantages"], d["mask"]),
}
# grpo_loss(grad_in_forward=True) computes the same loss: the same baseline
NAIVE["grpo_loss_gif"] = NAIVE["grpo_loss"]
NAIVE["linear_grpo_loss_gif"] = NAIVE["linear_grpo_loss"]


def _naive(op: str) -> Fn:
    return NAIVE[op]


_COMPILED: Dict[str, Fn] = {}


def _compiled(op: str) -> Fn:
    if not hasattr(torch, "compile"):
        raise Skip("torch.compile not in this torch")
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(NAIVE[op])
    return _COMPILED[op]


# ---- rlkernels backends -----------------------------------------------------------------

def _rlkernels_fn(op: str, backend: str) -> Fn:
    import rlkernels as rk
    b = backend
    table: Dict[str, Fn] = {
        "token_logprobs": lambda d, s: rk.token_logprobs(d["logits"], d["tokens"], backend=b),
        "token_logprobs_entropy": lambda d, s: rk.token_logprobs(
            d["logits"], d["tokens"], return_entropy=True, backend=b),
        "entropy": lambda d, s: rk.entropy(d["logits"], backend=b),
        "kl_divergence": lambda d, s: rk.kl_divergence(d["logits"], d["ref_logits"],
                                                       kind="reverse", backend=b),
        "sparse_logprobs": lambda d, s: rk.sparse_logprobs(d["logits"], d["indices"],
                                                           backend=b),
        "grpo_loss": lambda d, s: rk.grpo_loss(d["logits"], d["tokens"], d["old_logp"],
                                               d["advantages"], d["mask"], backend=b)[0],
        "grpo_loss_gif": lambda d, s: rk.grpo_loss(d["logits"], d["tokens"], d["old_logp"],
                                                   d["advantages"], d["mask"], backend=b,
                                                   grad_in_forward=True)[0],
        "policy_loss": lambda d, s: rk.policy_loss(d["logp"], d["old_logp"], d["advantages"],
                                                   d["mask"], backend=b)[0],
        "group_advantages": lambda d, s: rk.group_advantages(d["rewards"], group_size=s["G"],
                                                             backend=b),
        "gae": lambda d, s: rk.gae(d["rewards"], d["values"], d["mask"], gamma=1.0, lam=0.95,
                                   backend=b),
        "linear_token_logprobs": lambda d, s: rk.linear_token_logprobs(
            d["hidden"], d["weight"], d["tokens"], backend=b),
        "linear_grpo_loss": lambda d, s: rk.linear_grpo_loss(
            d["hidden"], d["weight"], d["tokens"], d["old_logp"], d["advantages"], d["mask"],
            backend=b)[0],
        "linear_grpo_loss_gif": lambda d, s: rk.linear_grpo_loss(
            d["hidden"], d["weight"], d["tokens"], d["old_logp"], d["advantages"], d["mask"],
            backend=b, grad_in_forward=True)[0],
    }
    return table[op]


def _rlkernels(backend: str, linear_path: Optional[str] = None) -> Callable[[str], Fn]:
    """``linear_path`` ("triton" / "cublas"): which implementation the triton backend's
    linear ops run (the private ``path`` option of ``rlkernels.ops.linear``; ``None``: the
    default, ``"auto"``, which is cuBLAS on GPUs)."""
    def build(op: str) -> Fn:
        from rlkernels import backends
        from .cases import OPS
        status = backends.available_backends()[backend]
        if status != "ok":
            raise Skip(status)
        spec = OPS[op]
        if not backends.implements(backend, spec.backend_op):
            raise Skip(f"backend {backend!r} has no {spec.backend_op} kernels yet")
        if linear_path is None or spec.family != "linear":
            if linear_path == "cublas":
                raise Skip("only the linear ops have a cuBLAS path")
            return _rlkernels_fn(op, backend)
        from rlkernels.ops import linear

        if op == "linear_token_logprobs":
            return lambda d, s: linear._linear_token_logprobs(
                d["hidden"], d["weight"], d["tokens"], None, 1.0, -100, False, None, backend,
                None, linear_path)
        gif = op == "linear_grpo_loss_gif"
        return lambda d, s: linear.linear_grpo_loss(
            d["hidden"], d["weight"], d["tokens"], d["old_logp"], d["advantages"], d["mask"],
            backend=backend, _path=linear_path, grad_in_forward=gif)[0]
    return build


# ---- peers ------------------------------------------------------------------------------

def _trl(op: str) -> Fn:
    utils = _import("trl.trainer.utils")
    sls = getattr(utils, "selective_log_softmax", None)
    efl = getattr(utils, "entropy_from_logits", None)
    if op == "token_logprobs" and sls:
        return lambda d, s: sls(d["logits"], d["tokens"])
    if op == "entropy" and efl:
        return lambda d, s: efl(d["logits"])
    if op == "token_logprobs_entropy" and sls and efl:
        return lambda d, s: (sls(d["logits"], d["tokens"]), efl(d["logits"]))
    if op == "grpo_loss" and sls:
        return lambda d, s: naive_policy_loss(sls(d["logits"], d["tokens"]), d["old_logp"],
                                              d["advantages"], d["mask"])
    raise Skip(f"trl has no function for {op}")


def _verl(op: str) -> Fn:
    tf = _import("verl.utils.torch_functional")
    lfl = getattr(tf, "logprobs_from_logits", None)
    efl = getattr(tf, "entropy_from_logits", None)
    # inplace_backward=False: keep the shared inputs intact for the providers after this one
    if op == "token_logprobs" and lfl:
        return lambda d, s: lfl(d["logits"], d["tokens"], inplace_backward=False)
    if op == "entropy" and efl:
        return lambda d, s: efl(d["logits"])
    if op == "token_logprobs_entropy" and lfl and efl:
        return lambda d, s: (lfl(d["logits"], d["tokens"], inplace_backward=False),
                             efl(d["logits"]))
    if op == "grpo_loss" and lfl:
        return lambda d, s: naive_policy_loss(
            lfl(d["logits"].flatten(0, 1), d["tokens"].flatten(), inplace_backward=False
                ).view_as(d["old_logp"]), d["old_logp"], d["advantages"], d["mask"])
    if op == "gae":
        gae = getattr(_import("verl.trainer.ppo.core_algos"), "compute_gae_advantage_return",
                      None)
        if gae:
            return lambda d, s: gae(d["rewards"], d["values"], d["mask"].to(d["rewards"].dtype),
                                    1.0, 0.95)
    raise Skip(f"verl has no function for {op}")


def _flash_attn(op: str) -> Fn:
    ce = _import("flash_attn.ops.triton.cross_entropy", "cross_entropy_loss")

    def logp(logits, tokens):
        out = ce(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                 inplace_backward=False)
        return (-(out[0] if isinstance(out, tuple) else out)).view(tokens.shape)
    if op == "token_logprobs":
        return lambda d, s: logp(d["logits"], d["tokens"])
    if op == "grpo_loss":
        return lambda d, s: naive_policy_loss(logp(d["logits"], d["tokens"]), d["old_logp"],
                                              d["advantages"], d["mask"])
    raise Skip(f"flash-attn has no function for {op}")


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _liger(op: str) -> Fn:
    if op == "token_logprobs":
        f = _import("liger_kernel.ops.grpo_loss", "fused_selective_log_softmax")
        # Liger's layout: logits [B, L+1, V], ids [B, L] -> the last row is not scored
        return lambda d, s: f(d["logits"].unsqueeze(0), d["tokens"][None, 1:], 1.0)
    if op == "grpo_loss":
        f = _import("liger_kernel.transformers.grpo_loss", "triton_grpo_loss")

        def run(d, s):
            m = d["mask"][:, :-1]
            out = _first(f(d["logits"], d["old_logp"][:, :-1], None, d["tokens"][:, 1:],
                           d["advantages"], m, temperature=1.0, beta=0.0, eps_low=0.2,
                           eps_high=0.2, inplace=False))
            if out.dim() == 0:
                return out
            mf = m.to(out.dtype)
            return (out * mf).sum() / mf.sum().clamp(min=1)
        return run
    if op == "kl_divergence":
        cls = _import("liger_kernel.ops.kl_div", "LigerKLDivLossFunction")

        def run(d, s):  # KL(p || q) as torch.nn.KLDivLoss(input=log q, target=log p)
            lp = torch.log_softmax(d["logits"].float(), -1)
            lq = torch.log_softmax(d["ref_logits"].float(), -1)
            return cls.apply(lq, lp, "none", True, 1e-10).sum(-1)
        return run
    if op == "linear_grpo_loss":
        cls = _import("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
        try:
            loss_fn = cls(beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.2)
        except Exception as exc:
            raise Skip(f"LigerFusedLinearGRPOLoss(...) failed: {exc}")
        return lambda d, s: _first(loss_fn(d["hidden"], d["weight"], d["tokens"],
                                           d["mask"].long(), d["advantages"],
                                           old_per_token_logps=d["old_logp"]))
    raise Skip(f"liger-kernel has no function for {op}")


def _liger_jsd(op: str) -> Fn:
    if op != "kl_divergence":
        raise Skip(f"liger JSD is not {op}")
    cls = _import("liger_kernel.ops.jsd", "LigerJSDFunction")

    def run(d, s):  # generalized JSD on log-probs (beta=0.5): same bytes, different math
        lp = torch.log_softmax(d["logits"].float(), -1)
        lq = torch.log_softmax(d["ref_logits"].float(), -1)
        return cls.apply(lp, lq, None, 0.5, -100)
    return run


def _cce(op: str) -> Fn:
    lce = _import("cut_cross_entropy", "linear_cross_entropy")

    def logp(hidden, weight, tokens):
        return -lce(hidden, weight, tokens, reduction="none")
    if op == "linear_token_logprobs":
        return lambda d, s: logp(d["hidden"], d["weight"], d["tokens"])
    if op == "linear_grpo_loss":
        return lambda d, s: naive_policy_loss(logp(d["hidden"], d["weight"], d["tokens"]),
                                              d["old_logp"], d["advantages"], d["mask"])
    raise Skip(f"cut-cross-entropy has no function for {op}")


def _wrap(fn: Callable[[str], Fn]) -> Callable[[str], Fn]:
    def build(op: str) -> Fn:
        return fn(op)
    return build


PROVIDERS: List[Provider] = [
    Provider("rlkernels-torch", "rlkernels", _rlkernels("torch")),
    Provider("rlkernels-triton", "rlkernels", _rlkernels("triton", "triton")),
    Provider("rlkernels-triton-cublas", "rlkernels", _rlkernels("triton", "cublas"),
             "linear ops: the cuBLAS path (GEMMs through torch.mm on fixed-size row chunks, "
             "the triton vocabulary kernels on each chunk)"),
    Provider("rlkernels-cuda", "rlkernels", _rlkernels("cuda")),
    Provider("torch-naive", "baseline", _wrap(_naive),
             "log_softmax(fp32) + gather; entropy from softmax; [N, V] intermediates"),
    Provider("torch-compile", "baseline", _wrap(_compiled), "torch.compile of torch-naive"),
    Provider("trl", "peer", _trl, "trl.trainer.utils.selective_log_softmax / "
             "entropy_from_logits (+ torch-naive loss for grpo_loss)"),
    Provider("verl", "peer", _verl, "verl.utils.torch_functional.logprobs_from_logits "
             "(inplace_backward=False) / entropy_from_logits"),
    Provider("flash-attn", "peer", _flash_attn,
             "flash_attn.ops.triton.cross_entropy.cross_entropy_loss (log-prob = -loss)"),
    Provider("liger", "peer", _liger, "fused_selective_log_softmax (forward only, N-1 rows), "
             "triton_grpo_loss, LigerKLDivLossFunction on log-probs, "
             "LigerFusedLinearGRPOLoss"),
    Provider("liger-jsd", "peer", _liger_jsd, "LigerJSDFunction(beta=0.5) on log-probs"),
    Provider("cce", "peer", _cce, "cut_cross_entropy.linear_cross_entropy (log-prob = -loss)"),
]
BY_NAME = {p.name: p for p in PROVIDERS}


def providers(names: Optional[List[str]] = None, peers: bool = True) -> List[Provider]:
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise ValueError(f"providers: unknown {unknown}; expected some of "
                             f"{', '.join(BY_NAME)}")
        return [BY_NAME[n] for n in names]
    return [p for p in PROVIDERS if peers or p.kind != "peer"]
