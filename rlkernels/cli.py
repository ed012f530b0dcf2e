"""The ``rlkernels`` command line: ``info``, ``verify``, ``bench``, ``train`` (SPEC section 4).

``train`` runs the reference GRPO trainer (:mod:`rlkernels.trainer`).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import List, Optional


def _info(_args) -> int:
    import torch

    import rlkernels
    from rlkernels import backends

    print(f"rlkernels {rlkernels.__version__}")
    print(f"python    {platform.python_version()} ({sys.executable})")
    print(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    try:
        import triton
        print(f"triton    {triton.__version__}")
    except Exception:
        print("triton    not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device {i}  {torch.cuda.get_device_name(i)}")
    else:
        print("devices   CPU only (torch.cuda.is_available() is False)")
    print(f"default backend: {backends.get_backend()}")
    print("backends:")
    for name, status in rlkernels.available_backends().items():
        print(f"  {name:7} {status}")
    return 0


def _verify(args) -> int:
    from rlkernels import _verify as verify

    if args.backend:
        status = __import__("rlkernels").available_backends().get(args.backend)
        if status != "ok":
            print(f"backend {args.backend!r} is not available: {status}", file=sys.stderr)
            return 1
    start = time.perf_counter()
    rows = verify.run(backend=args.backend, quick=args.quick)
    print(verify.format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed "
          f"({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


def _bench(args) -> int:
    from rlkernels._bench import run_bench

    run_bench(args.op, peers=args.peers, out=args.out, quick=args.quick,
              providers=[p for p in (args.providers or "").split(",") if p] or None,
              modes=[m for m in args.modes.split(",") if m], budget_s=args.budget_s,
              plots=not args.no_plots, log=lambda line: print(line, flush=True))
    return 0


def _train(args) -> int:
    import dataclasses
    import json
    import os

    from rlkernels.trainer import COMPARE_TOLERANCE, TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    if cfg.out is None:
        cfg.out = os.path.join("runs", f"{cfg.task}-{cfg.ops}")
    result = train(cfg)
    if result["rank"] != 0:  # under torchrun, rank 0 reports
        return 0 if result["ok"] else 1
    if result["out"]:
        with open(os.path.join(result["out"], "config.json"), "w") as f:
            json.dump(result["config"], f, indent=2)
        print(f"metrics: {os.path.join(result['out'], 'metrics.jsonl')}"
              + (f" | curve: {result['curve']}" if result["curve"] else
                 " | curve: skipped (matplotlib is not installed: pip install matplotlib)"))
    records = result["records"]
    if records:
        k = max(1, len(records) // 10)
        first = sum(r["reward"] for r in records[:k]) / k
        last = sum(r["reward"] for r in records[-k:]) / k
        print(f"mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    if cfg.ops == "compare":
        worst = {key: max(r[f"diff_{key}"] for r in records) for key in COMPARE_TOLERANCE}
        print("compare (max over steps, tolerance): " + ", ".join(
            f"{key} {worst[key]:.2e} ({COMPARE_TOLERANCE[key]:.0e})" for key in worst))
        print("compare: PASS" if result["ok"] else "compare: FAIL (beyond tolerance)")
    return 0 if result["ok"] else 1


def _add_train_parser(sub) -> None:
    from rlkernels.trainer import TrainConfig
    from rlkernels.trainer.tasks import TASKS

    d = TrainConfig()
    p = sub.add_parser("train", help="the reference GRPO trainer on a built-in tiny model/task",
                       description="GRPO on a task with a verifiable reward, the RL math done "
                       "by rlkernels (--ops kernels), by plain PyTorch (--ops torch), or both "
                       "on the same rollouts (--ops compare, exit 1 if they disagree).")
    p.add_argument("--task", choices=sorted(TASKS), help=f"default {d.task}")
    p.add_argument("--steps", type=int, help=f"GRPO steps (default {d.steps})")
    p.add_argument("--ops", choices=("torch", "kernels", "compare"),
                   help=f"who does the RL math (default {d.ops})")
    p.add_argument("--fused-head", action="store_true", default=None,
                   help="kernels: linear_grpo_loss from hidden states, no logits")
    p.add_argument("--backend", choices=("torch", "triton", "cuda", "auto"),
                   help="rlkernels backend (default auto)")
    p.add_argument("--model", metavar="PATH", help="a local Hugging Face model folder "
                   "(default: a tiny random model with a character tokenizer)")
    p.add_argument("--arch", choices=("qwen2", "llama"), help="tiny model architecture")
    p.add_argument("--size", choices=("tiny", "qwen2.5-0.5b"), help="random model preset: "
                   "tiny (default) or the shape of Qwen2.5-0.5B with its 151936-token "
                   "vocabulary (for memory and step-time measurements)")
    p.add_argument("--hidden-size", type=int, help=f"tiny model width (default "
                   f"{d.hidden_size})")
    p.add_argument("--layers", type=int, help=f"tiny model depth (default {d.layers})")
    p.add_argument("--digits", type=int, help="addition: digits per operand (default 1)")
    p.add_argument("--prompts", type=int, help=f"prompts per step (default {d.prompts})")
    p.add_argument("--group-size", type=int, help=f"samples per prompt (default "
                   f"{d.group_size})")
    p.add_argument("--max-new-tokens", type=int, help="default: longest answer + 2")
    p.add_argument("--temperature", type=float, help="sampling and log-prob temperature")
    p.add_argument("--top-k", type=int, help="sampler top-k (default off)")
    p.add_argument("--top-p", type=float, help="sampler top-p (default 1.0, off)")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default {d.lr})")
    p.add_argument("--ppo-epochs", type=int, help="passes over each rollout (default 1)")
    p.add_argument("--minibatches", type=int, help="optimizer steps per pass (default 1)")
    p.add_argument("--clip-low", type=float, help=f"default {d.clip_low}")
    p.add_argument("--clip-high", type=float, help=f"default {d.clip_high}")
    p.add_argument("--kl-coef", type=float, help=f"KL to the initial model (default "
                   f"{d.kl_coef})")
    p.add_argument("--kl-estimator", choices=("k1", "k2", "k3"), help="default k3")
    p.add_argument("--entropy-coef", type=float, help=f"default {d.entropy_coef}")
    p.add_argument("--agg", choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                     "seq-mean-token-sum-norm"), help=f"default {d.agg}")
    p.add_argument("--adv-method", choices=("grpo", "dr_grpo", "rloo", "batch_std"),
                   help=f"default {d.adv_method}")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--device", help="default cuda when available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default float32")
    p.add_argument("--out", metavar="DIR", help="metrics.jsonl, curve.png, config.json "
                   "(default runs/<task>-<ops>)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlkernels", description="Fused, exact kernels for RL post-training of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, backends and why any is unavailable"
                   ).set_defaults(func=_info)
    p = sub.add_parser("verify", help="every op x every available backend vs the fp64 "
                       "reference; exit 1 on any failure")
    p.add_argument("--backend", choices=("torch", "triton", "cuda"),
                   help="verify only this backend (default: every available one)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and fp32 only (under a minute on 2 CPU cores)")
    p.set_defaults(func=_verify)
    p = sub.add_parser("bench", help="benchmarks: median/p20/p80 ms, %% of the measured "
                       "roofline, peak memory, vs naive torch, torch.compile and peers; "
                       "CSV + markdown + PNG")
    from rlkernels._bench.cases import OPS as _BENCH_OPS
    p.add_argument("--op", nargs="+", choices=list(_BENCH_OPS), metavar="OP",
                   help="ops to run (default: all): " + ", ".join(_BENCH_OPS))
    p.add_argument("--peers", action="store_true",
                   help="include peers (TRL, verl, flash-attn, Liger, CCE) that import")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: benchmarks/results/<gpu-or-cpu>/)")
    p.add_argument("--quick", action="store_true", default=None,
                   help="tiny shapes (the default on CPU)")
    p.add_argument("--full", dest="quick", action="store_false",
                   help="the full shape grid (the default on a GPU)")
    p.add_argument("--providers", help="comma-separated providers to run (default: all "
                   "rlkernels backends, torch-naive, torch-compile, and peers with --peers)")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="fwd, fwd+bwd or both (default)")
    p.add_argument("--budget-s", type=float, help="time budget for the whole run; shapes "
                   "past each op's share are recorded as skipped")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=_bench)
    _add_train_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
