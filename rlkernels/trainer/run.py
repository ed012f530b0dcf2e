"""``rlkernels train``: configuration, the step loop, and ``--ops compare``.

``--ops compare`` trains two copies of the same initial model side by side, one with
:class:`~rlkernels.trainer.rl_math.TorchMath` and one with
:class:`~rlkernels.trainer.rl_math.KernelMath`, on the same rollouts (sampled by the torch
copy). Every step it records the largest difference of the old log-probs, the advantages,
and of the loss and gradient norm of every optimizer step, and fails (exit status 1) when one
exceeds :data:`COMPARE_TOLERANCE`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from . import loop
from .report import MetricsLog, Progress, peak_memory_gb, plot_curve
from .rl_math import LossOptions, make_math
from .tasks import CharTokenizer, HFTokenizer, sample_prompts

__all__ = ["TrainConfig", "train", "COMPARE_TOLERANCE"]

#: ``--ops compare`` bounds, fp32 on the same rollouts. The two paths sum in different orders
#: (fp32 rounding, ~1e-7 relative), and the two models drift apart by that much per optimizer
#: step; with AdamW at lr 1e-3 a few steps stay orders of magnitude inside these bounds, while a
#: wrong formula (a missing term, a wrong normalizer or sign) is off by 1e-2 or more.
COMPARE_TOLERANCE = {"logp": 1e-3, "advantages": 1e-4, "loss": 1e-4, "grad_norm": 1e-3}


@dataclass
class TrainConfig:
    task: str = "addition"
    digits: int = 1
    steps: int = 200
    ops: str = "kernels"               # torch | kernels | compare
    fused_head: bool = False           # linear_grpo_loss from hidden states (no logits)
    backend: Optional[str] = None      # rlkernels backend for --ops kernels (None: auto)
    model: Optional[str] = None        # local Hugging Face model folder
    arch: str = "qwen2"
    size: str = "tiny"                 # random-model preset (model.SIZES)
    hidden_size: int = 64
    layers: int = 2
    prompts: int = 16                  # prompts per step (per rank)
    group_size: int = 8
    max_new_tokens: Optional[int] = None   # default: longest answer + 2
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    ppo_epochs: int = 1
    minibatches: int = 1
    max_grad_norm: float = 1.0
    clip_low: float = 0.2
    clip_high: Optional[float] = 0.28
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    agg: str = "token-mean"
    adv_method: str = "grpo"
    seed: int = 0
    device: Optional[str] = None
    dtype: str = "float32"
    out: Optional[str] = None          # folder for metrics.jsonl and curve.png
    progress: bool = True

    def loss_options(self) -> LossOptions:
        return LossOptions(temperature=self.temperature, clip_low=self.clip_low,
                           clip_high=self.clip_high, kl_coef=self.kl_coef,
                           kl_estimator=self.kl_estimator, entropy_coef=self.entropy_coef,
                           agg=self.agg, adv_method=self.adv_method)


def _check(cfg: TrainConfig) -> None:
    if cfg.ops not in ("torch", "kernels", "compare"):
        raise ValueError(f"ops: expected torch, kernels or compare, got {cfg.ops!r}")
    for name in ("steps", "prompts", "group_size", "ppo_epochs", "minibatches", "digits"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}: expected a positive integer, got {getattr(cfg, name)}")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {cfg.dtype!r}")


def _dist_setup(device: Optional[str]):
    """``(rank, world, group, device)``; initializes ``torch.distributed`` under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world == 1:
        return 0, 1, None, dev
    import torch.distributed as dist
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist.group.WORLD, dev


def _policy(cfg: TrainConfig, device: torch.device):
    """``(model, tokenizer)``, seeded: two calls give identical weights."""
    from .model import build_tiny_model, load_model

    torch.manual_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    if cfg.model:
        model, hf_tok = load_model(cfg.model, device, dtype)
        return model, HFTokenizer(hf_tok)
    tok = CharTokenizer()
    return build_tiny_model(cfg.arch, tok.vocab_size, tok, device, cfg.hidden_size,
                            cfg.layers, dtype=dtype, size=cfg.size), tok


def _reduce_mean(values: Dict[str, float], group, world: int) -> Dict[str, float]:
    if group is None:
        return values
    import torch.distributed as dist
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return {k: float(v) / world for k, v in zip(keys, t)}


def _mean(records: List[Dict[str, float]]) -> Dict[str, float]:
    return {k: sum(r[k] for r in records) / len(records) for k in records[0]}


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    d = (a.double() - b.double()).abs()
    if mask is not None:
        d = d * mask
    return float(d.max()) if d.numel() else 0.0


def train(cfg: TrainConfig) -> Dict:
    """Run ``cfg.steps`` GRPO steps. Returns ``{"records": [...], "ok": bool, "out": dir}``;
    ``ok`` is False when ``--ops compare`` exceeded :data:`COMPARE_TOLERANCE`."""
    _check(cfg)
    rank, world, group, device = _dist_setup(cfg.device)
    model, tok = _policy(cfg, device)
    max_new = cfg.max_new_tokens or (
        max(len(a) for _, a in sample_prompts(cfg.task, 256, loop.seeded_rng(cfg.seed, 99),
                                              cfg.digits)) + 2)
    opts = cfg.loss_options()
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef else None
    paths = ["torch", "kernels"] if cfg.ops == "compare" else [cfg.ops]
    models = {paths[0]: model}
    if len(paths) == 2:
        models["kernels"] = copy.deepcopy(model)
    maths = {p: make_math(p, cfg.fused_head, cfg.backend) for p in paths}
    optims = {p: torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
              for p, m in models.items()}
    rng = loop.seeded_rng(cfg.seed, rank)
    torch.manual_seed(cfg.seed + 7919 * rank)
    out = cfg.out if rank == 0 else None
    log = MetricsLog(os.path.join(out, "metrics.jsonl") if out else None)
    bar = Progress(cfg.steps, enabled=cfg.progress and rank == 0)
    ok = True
    for step in range(cfg.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        pairs = sample_prompts(cfg.task, cfg.prompts, rng, cfg.digits)
        gen = models[paths[0]].eval()
        batch, _ = loop.rollout(gen, tok, pairs, cfg.group_size, max_new_tokens=max_new,
                                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        rollout_s = time.perf_counter() - start
        results = {}
        for p in paths:
            m = models[p].train()
            adv = maths[p].advantages(batch.rewards, cfg.group_size, opts)
            old, ref = loop.old_and_ref_logprobs(maths[p], m, ref_model, batch, opts)
            steps = loop.policy_update(maths[p], m, optims[p], batch, adv, old, ref, opts,
                                       ppo_epochs=cfg.ppo_epochs, minibatches=cfg.minibatches,
                                       max_grad_norm=cfg.max_grad_norm, horizon=max_new,
                                       group=group)
            results[p] = (adv, old, steps)
        elapsed = time.perf_counter() - start
        records = results[paths[0]][2]
        stats = _reduce_mean({**_mean(records),
                              "reward": float(batch.rewards.mean()),
                              "completion_len": float(batch.mask.sum(-1).float().mean())},
                             group, world)
        stats["loss"] *= world  # ranks hold parts of one sum: the mean times world is the sum
        n_tokens = int(batch.attention_mask.sum()) * world * (1 + cfg.ppo_epochs)
        record = {"step": step, **stats, "tokens_per_s": n_tokens / elapsed,
                  "peak_mem_gb": peak_memory_gb(device), "time_s": elapsed,
                  "rollout_s": rollout_s, "update_s": elapsed - rollout_s}
        if cfg.ops == "compare":
            diffs = _compare(results, batch.mask)
            record.update(diffs)
            ok &= all(diffs[f"diff_{k}"] <= tol for k, tol in COMPARE_TOLERANCE.items())
        log.write(record)
        bar.update(step, record)
    bar.close()
    curve = None
    if out and log.records:
        title = (f"rlkernels train --task {cfg.task} --ops {cfg.ops}"
                 f"{' --fused-head' if cfg.fused_head else ''} ({cfg.prompts}x{cfg.group_size}"
                 f" samples/step, world {world})")
        curve = plot_curve(log.records, os.path.join(out, "curve.png"), title)
    return {"records": log.records, "ok": ok, "out": out, "curve": curve, "rank": rank,
            "config": dataclasses.asdict(cfg)}


def _compare(results, mask) -> Dict[str, float]:
    (adv_t, old_t, steps_t), (adv_k, old_k, steps_k) = results["torch"], results["kernels"]
    diffs = {"diff_logp": _max_diff(old_t, old_k, mask.double()),
             "diff_advantages": _max_diff(adv_t, adv_k)}
    for key in ("loss", "grad_norm"):
        a = torch.tensor([s[key] for s in steps_t], dtype=torch.float64)
        b = torch.tensor([s[key] for s in steps_k], dtype=torch.float64)
        # relative to the size of the value (a gradient norm is not bounded)
        diffs[f"diff_{key}"] = float(((a - b).abs() / a.abs().clamp_min(1.0)).max())
    return diffs
