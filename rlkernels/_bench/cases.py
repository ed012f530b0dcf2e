"""Ops, their inputs, their minimal bytes / FLOPs, and the shape grids.

Every op has a ``make(shape, device, dtype, gen)`` that returns a dict of input tensors (the
differentiable ones listed in ``grad``), ``min_bytes(shape, mode, b)`` (``b`` = bytes per
logit / hidden element) and ``flops(shape, mode)``.

Minimal-bytes conventions (each input read once, each output written once, per pass):

* vocabulary ops, forward: read ``N*V*b`` logits (+ tokens/indices, small) and write the
  fp32 per-token outputs;
* forward+backward: the forward reads the logits, the backward reads them again and writes
  the gradient once (``3*N*V*b``), as two separate autograd passes must;
* ``kl_divergence`` reads two logits tensors (``ref_logits`` has no gradient: ``5*N*V*b``);
* policy / advantage ops: every ``[B, T]`` fp32 input read once per pass, bool mask 1 byte;
* linear ops: ``2*N*H*V`` FLOPs per GEMM, one forward, three forward+backward (the floor
  ignores the recomputation of the logits that a memory-flat backward does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch

MODES = ("fwd", "fwd+bwd")
K_SPARSE = 64


@dataclass
class OpSpec:
    name: str
    family: str                     # benchmark script group: vocab, policy, advantage, linear
    backend_op: str                 # the op of the op table (rlkernels/ops/_table.py) it runs
    make: Callable                  # (shape, device, dtype, gen) -> dict of tensors
    grad: Tuple[str, ...]           # inputs that receive gradients in fwd+bwd
    min_bytes: Callable             # (shape, mode, b) -> bytes
    flops: Callable = lambda s, m: 0
    full: List[Dict[str, int]] = field(default_factory=list)
    quick: List[Dict[str, int]] = field(default_factory=list)
    modes: Tuple[str, ...] = MODES
    note: str = ""


def shape_label(shape: Dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def _n(s):
    return s["B"] * s["T"] if "B" in s else s["N"]


def _logits(s, device, dtype, gen, scale=2.0):
    return (torch.randn(_n(s), s["V"], generator=gen, device=device, dtype=torch.float32)
            .mul_(scale).to(dtype))


def _tokens(n, v, device, gen):
    return torch.randint(0, v, (n,), generator=gen, device=device)


def _rand(shape, device, gen, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=gen, device=device).mul_(scale).add_(shift)


def _mask(shape, device, gen, p=0.9):
    return torch.rand(shape, generator=gen, device=device) < p


# ---- vocabulary ops ---------------------------------------------------------------------

def _make_logits_tokens(s, device, dtype, gen):
    return {"logits": _logits(s, device, dtype, gen), "tokens": _tokens(_n(s), s["V"], device, gen)}


def _make_logits(s, device, dtype, gen):
    return {"logits": _logits(s, device, dtype, gen)}


def _make_kl(s, device, dtype, gen):
    return {"logits": _logits(s, device, dtype, gen), "ref_logits": _logits(s, device, dtype, gen)}


def _make_sparse(s, device, dtype, gen):
    n = _n(s)
    return {"logits": _logits(s, device, dtype, gen),
            "indices": torch.randint(0, s["V"], (n, min(K_SPARSE, s["V"])), generator=gen,
                                     device=device)}


def _vocab_bytes(n_tensors_fwd: int, per_row_fwd: int, grads: int = 1):
    def f(s, mode, b):
        nv = _n(s) * s["V"] * b
        small = _n(s) * per_row_fwd
        if mode == "fwd":
            return n_tensors_fwd * nv + small
        # forward reads, backward reads again and writes the gradient(s)
        return 2 * n_tensors_fwd * nv + grads * nv + 2 * small
    return f


VOCAB_FULL = [{"N": n, "V": v} for n in (4096, 16384, 32768) for v in (32000, 128256, 151936)]
VOCAB_QUICK = [{"N": 64, "V": 1000}, {"N": 96, "V": 1531}]

# ---- policy / advantage ops -------------------------------------------------------------

def _make_policy(s, device, dtype, gen):
    shape = (s["B"], s["T"])
    old = _rand(shape, device, gen, 0.5, -2.0)
    return {"logp": (old + _rand(shape, device, gen, 0.1)), "old_logp": old,
            "advantages": _rand((s["B"],), device, gen), "mask": _mask(shape, device, gen)}


def _policy_bytes(s, mode, b):
    bt = s["B"] * s["T"]
    fwd = bt * (4 + 4 + 1) + s["B"] * 4
    return fwd if mode == "fwd" else 2 * fwd + bt * 4


def _make_grpo(s, device, dtype, gen):
    bt = (s["B"], s["T"])
    logits = _logits(s, device, dtype, gen).view(s["B"], s["T"], s["V"])
    tokens = _tokens(s["B"] * s["T"], s["V"], device, gen).view(bt)
    return {"logits": logits, "tokens": tokens, "old_logp": _rand(bt, device, gen, 0.5, -8.0),
            "advantages": _rand((s["B"],), device, gen), "mask": _mask(bt, device, gen)}


def _grpo_bytes(s, mode, b):
    nv = _n(s) * s["V"] * b
    small = _n(s) * (8 + 4 + 1) + s["B"] * 4
    return nv + small if mode == "fwd" else 3 * nv + 2 * small


def _grpo_gif_bytes(s, mode, b):
    """grad_in_forward: the forward reads the logits and writes ``d logits`` (the one-read
    CUDA kernel; the other backends read the logits twice); the backward reads nothing more
    for an upstream gradient of 1."""
    nv = _n(s) * s["V"] * b
    small = _n(s) * (8 + 4 + 1) + s["B"] * 4
    return 2 * nv + small


def _make_adv(s, device, dtype, gen):
    return {"rewards": _rand((s["B"],), device, gen)}


def _make_gae(s, device, dtype, gen):
    shape = (s["B"], s["T"])
    return {"rewards": _rand(shape, device, gen), "values": _rand(shape, device, gen),
            "mask": _mask(shape, device, gen)}


POLICY_FULL = [{"B": 128, "T": 4096}, {"B": 512, "T": 4096}, {"B": 1024, "T": 8192}]
POLICY_QUICK = [{"B": 4, "T": 64}]
GRPO_FULL = [{"B": n // 1024, "T": 1024, "V": v} for n in (4096, 16384, 32768)
             for v in (32000, 128256, 151936)]
GRPO_QUICK = [{"B": 2, "T": 32, "V": 1000}]
ADV_FULL = [{"B": 512, "G": 16}, {"B": 16384, "G": 16}, {"B": 1048576, "G": 16}]
ADV_QUICK = [{"B": 64, "G": 8}]

# ---- linear ops -------------------------------------------------------------------------

def _make_linear(s, device, dtype, gen):
    h = s["H"]
    return {"hidden": _rand((s["N"], h), device, gen).to(dtype),
            "weight": _rand((s["V"], h), device, gen, h ** -0.5).to(dtype),
            "tokens": _tokens(s["N"], s["V"], device, gen)}


def _make_linear_grpo(s, device, dtype, gen):
    d = _make_linear(s, device, dtype, gen)
    # one sequence of N tokens per row of 1024 (B x T = N)
    b, t = max(1, s["N"] // 1024), min(1024, s["N"])
    d["hidden"] = d["hidden"].view(b, t, s["H"])
    d["tokens"] = d["tokens"].view(b, t)
    d.update(old_logp=_rand((b, t), device, gen, 0.5, -8.0),
             advantages=_rand((b,), device, gen), mask=_mask((b, t), device, gen))
    return d


def _linear_bytes(s, mode, b):
    ins = (s["N"] * s["H"] + s["V"] * s["H"]) * b + s["N"] * 8
    return ins if mode == "fwd" else 2 * ins + (s["N"] * s["H"] + s["V"] * s["H"]) * b


def _linear_flops(s, mode):
    one = 2 * s["N"] * s["H"] * s["V"]
    return one if mode == "fwd" else 3 * one


# (H, V) of real models: Qwen2.5-1.5B/3B, Qwen2.5-7B, Llama-3-8B, Llama-2-7B
LINEAR_HV = [(2048, 151936), (3584, 151936), (4096, 128256), (4096, 32000)]
LINEAR_FULL = [{"N": n, "H": h, "V": v} for n in (4096, 16384) for h, v in LINEAR_HV]
LINEAR_QUICK = [{"N": 32, "H": 64, "V": 1000}]


OPS: Dict[str, OpSpec] = {o.name: o for o in [
    OpSpec("token_logprobs", "vocab", "token_logprobs", _make_logits_tokens,
           ("logits",), _vocab_bytes(1, 8 + 4), full=VOCAB_FULL, quick=VOCAB_QUICK),
    OpSpec("token_logprobs_entropy", "vocab", "token_logprobs", _make_logits_tokens,
           ("logits",), _vocab_bytes(1, 8 + 8), full=VOCAB_FULL, quick=VOCAB_QUICK,
           note="token_logprobs(..., return_entropy=True)"),
    OpSpec("entropy", "vocab", "token_logprobs", _make_logits, ("logits",),
           _vocab_bytes(1, 4), full=VOCAB_FULL, quick=VOCAB_QUICK),
    OpSpec("kl_divergence", "vocab", "kl_divergence", _make_kl, ("logits",),
           _vocab_bytes(2, 4), full=VOCAB_FULL, quick=VOCAB_QUICK, note="kind='reverse'"),
    OpSpec("sparse_logprobs", "vocab", "sparse_logprobs", _make_sparse, ("logits",),
           _vocab_bytes(1, K_SPARSE * (8 + 4)), full=VOCAB_FULL, quick=VOCAB_QUICK,
           note=f"K={K_SPARSE}, normalize='full'"),
    OpSpec("grpo_loss", "policy", "grpo_loss", _make_grpo, ("logits",), _grpo_bytes,
           full=GRPO_FULL, quick=GRPO_QUICK, note="PPO clip 0.2, token-mean"),
    OpSpec("grpo_loss_gif", "policy", "grpo_loss", _make_grpo, ("logits",), _grpo_gif_bytes,
           full=GRPO_FULL, quick=GRPO_QUICK,
           note="grpo_loss(grad_in_forward=True): d logits formed in the forward (issue 22)"),
    OpSpec("policy_loss", "policy", "policy_loss", _make_policy, ("logp",),
           _policy_bytes, full=POLICY_FULL, quick=POLICY_QUICK, note="PPO clip 0.2, token-mean"),
    OpSpec("group_advantages", "advantage", "group_advantages", _make_adv, (),
           lambda s, m, b: 8 * s["B"], full=ADV_FULL, quick=ADV_QUICK, modes=("fwd",),
           note="method='grpo', contiguous groups of G"),
    OpSpec("gae", "advantage", "gae", _make_gae, (),
           lambda s, m, b: s["B"] * s["T"] * (4 + 4 + 1 + 4 + 4), full=POLICY_FULL,
           quick=POLICY_QUICK, modes=("fwd",),
           note="gamma 1, lam 0.95; (advantages, returns); verl's function also whitens "
                "the advantages (its err column compares whitened values)"),
    OpSpec("linear_token_logprobs", "linear", "linear_token_logprobs", _make_linear,
           ("hidden", "weight"), _linear_bytes, _linear_flops, full=LINEAR_FULL,
           quick=LINEAR_QUICK),
    OpSpec("linear_grpo_loss", "linear", "linear_grpo_loss", _make_linear_grpo,
           ("hidden", "weight"), _linear_bytes, _linear_flops, full=LINEAR_FULL,
           quick=LINEAR_QUICK, note="PPO clip 0.2, token-mean, B x 1024 tokens"),
    OpSpec("linear_grpo_loss_gif", "linear", "linear_grpo_loss", _make_linear_grpo,
           ("hidden", "weight"), _linear_bytes, _linear_flops, full=LINEAR_FULL,
           quick=LINEAR_QUICK,
           note="linear_grpo_loss(grad_in_forward=True): 3 GEMMs, d hidden / d weight formed "
                "in the forward (issue 20)"),
]}

FAMILIES = {f: [o for o in OPS if OPS[o].family == f]
            for f in ("vocab", "policy", "advantage", "linear")}


def shapes(op: str, quick: bool) -> List[Dict[str, int]]:
    spec = OPS[op]
    return spec.quick if quick else spec.full
