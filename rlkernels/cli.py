"""The ``rlkernels`` command line: ``info``, ``verify``, ``bench``, ``train`` (SPEC section 4).

``train`` runs the reference GRPO trainer (:mod:`rlkernels.trainer`).

A user error (an unavailable backend or device, a bad option value) is one line on stderr,
``rlkernels <command>: error: <message>``, and exit status 2, as argparse does for a bad
command line; ``--debug`` shows its traceback instead. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import List, Optional


class UserError(Exception):
    """A mistake in the command line or in what it asks of this machine, reported on one line."""


def _extension_line() -> str:
    """How ``rlkernels._C`` was built, or why it is not there."""
    from rlkernels.cuda import extension_info
    from rlkernels.cuda._loader import _load

    info = extension_info()
    if not info:
        return f"not loaded: {_load()[1]}"
    if "error" in info:
        return f"loaded, but its build facts cannot be read: {info['error']}"
    return (f"built for sm_{info['cuda_archs'].replace(',', ', sm_')} with nvcc "
            f"{info['nvcc']}, CUDA runtime {info['cuda_runtime']} ({info['path']})")


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
    print(f"_C        {_extension_line()}")
    print(f"default backend: {backends.get_backend()}")
    print("backends:")
    for name, status in rlkernels.available_backends().items():
        print(f"  {name:7} {status}")
    return 0


def _interpret_hint(name: str, status: dict) -> str:
    """For an unavailable triton backend that is installed: how to check it on CPU."""
    if name != "triton" or status[name].startswith("triton is not importable"):
        return ""
    return "; rlkernels verify --interpret checks it on CPU through the Triton interpreter"


def _verify(args) -> int:
    from rlkernels import _verify as verify
    from rlkernels import backends

    status = backends.available_backends()
    names = [args.backend] if args.backend else list(backends.BACKENDS)
    if args.interpret and args.backend not in (None, "triton"):
        raise UserError(f"--interpret: checks the triton backend, got --backend {args.backend}")
    if args.interpret and status["triton"].startswith("triton is not importable"):
        raise UserError(f"--interpret: backend 'triton' is not available: {status['triton']}")
    interpret = args.interpret and status["triton"] != "ok" and "triton" in names
    if args.backend and status[args.backend] != "ok" and not interpret:
        raise UserError(f"--backend: backend {args.backend!r} is not available: "
                        f"{status[args.backend]}{_interpret_hint(args.backend, status)}")
    start = time.perf_counter()
    rows: list = []
    lines = []
    for name in names:
        if name == "triton" and interpret:
            print("triton: checking through the Triton interpreter on CPU (quick shapes, "
                  "a subprocess with TRITON_INTERPRET=1)", flush=True)
            got, uncovered = verify.check_triton_interpreted()
            note = "Triton interpreter on CPU, quick shapes"
        elif status[name] == "ok":
            got, uncovered = verify.check_backend(name, args.quick)
            note = f"on {verify.device_for(name)}"
        else:
            lines.append(f"  {name:7} skipped: {status[name]}{_interpret_hint(name, status)}")
            continue
        rows += got
        lines.append(f"  {name:7} {verify.backend_line(name, got, uncovered, note)}")
    print(verify.format_table(rows))
    failed = [r for r in rows if not r.ok]
    print("\nbackends:\n" + "\n".join(lines))
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed "
          f"({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


def _bench(args) -> int:
    from rlkernels._bench import cases, providers as prov, run_bench

    providers = [p for p in (args.providers or "").split(",") if p] or None
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in cases.MODES]
    if bad or not modes:
        raise UserError(f"--modes: expected a comma-separated list of {', '.join(cases.MODES)}, "
                        f"got {args.modes!r}")
    if providers:
        try:
            prov.providers(providers)
        except ValueError as exc:
            raise UserError(f"--{exc}") from exc
    if args.budget_s is not None and not args.budget_s > 0:
        raise UserError(f"--budget-s: expected a number of seconds > 0, got {args.budget_s}")
    run_bench(args.op, peers=args.peers, out=args.out, quick=args.quick,
              providers=providers, modes=modes, budget_s=args.budget_s,
              plots=not args.no_plots, log=lambda line: print(line, flush=True))
    return 0


def _train(args) -> int:
    import dataclasses
    import json
    import os

    from rlkernels.trainer import COMPARE_TOLERANCE, TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    _check_train(cfg)
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


def _check_train(cfg) -> None:
    """The user errors of ``rlkernels train`` that would otherwise surface as tracebacks from
    deep inside the run: option values, the device, the backend, the model folder."""
    import os

    import torch

    from rlkernels import backends
    from rlkernels.trainer.model import SIZES
    from rlkernels.trainer.run import _check

    try:
        _check(cfg)
    except ValueError as exc:
        name, _, rest = str(exc).partition(": ")
        raise UserError(f"--{name.replace('_', '-')}: {rest}") from exc
    for name in ("hidden_size", "layers"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: expected a positive integer, "
                            f"got {getattr(cfg, name)}")
    heads = SIZES[cfg.size]["heads"]
    if cfg.size == "tiny" and cfg.hidden_size % heads:
        raise UserError(f"--hidden-size: expected a multiple of {heads} (the attention heads), "
                        f"got {cfg.hidden_size}")
    if cfg.model and not os.path.isdir(cfg.model):
        raise UserError(f"--model: expected a local Hugging Face model folder, got "
                        f"{cfg.model!r} (no such folder)")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device: expected a torch device such as cpu, cuda or cuda:1, got "
                        f"{device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if not torch.version.cuda else
                   "torch.cuda.is_available() is False")
            raise UserError(f"--device: expected an available device, got {device!r}: no CUDA "
                            f"GPU is usable ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device: expected cuda:0 to cuda:{torch.cuda.device_count() - 1}"
                            f", got {device!r}")
    elif dev.type != "cpu":
        raise UserError(f"--device: expected cpu or cuda[:N], got {device!r}")
    if cfg.ops == "torch":
        return
    ops = ["token_logprobs", "group_advantages", "grpo_loss"]
    if cfg.fused_head:
        ops = ["linear_token_logprobs", "group_advantages", "linear_grpo_loss"]
    for op in ops:
        try:
            backends.resolve(cfg.backend, op, dev)
        except (RuntimeError, ValueError) as exc:
            raise UserError(f"--backend: {exc}" if cfg.backend else str(exc)) from exc


def _add_train_parser(sub, common: argparse.ArgumentParser) -> None:
    from rlkernels.trainer import TrainConfig
    from rlkernels.trainer.tasks import TASKS

    d = TrainConfig()
    p = sub.add_parser("train", parents=[common],
                       help="the reference GRPO trainer on a built-in tiny model/task",
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


_DEBUG_HELP = "on an error, show its full traceback instead of one line"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlkernels", description="Fused, exact kernels for RL post-training of LLMs.")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # also accepted after the command; SUPPRESS keeps a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", parents=[common], help="versions, devices, backends and why any "
                   "is unavailable").set_defaults(func=_info)
    p = sub.add_parser("verify", parents=[common],
                       help="every op x every available backend vs the fp64 "
                       "reference; per backend: checked or skipped with the reason; exit 1 "
                       "on any failure")
    p.add_argument("--backend", choices=("torch", "triton", "cuda"),
                   help="verify only this backend (default: every available one)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and fp32 only (under a minute on 2 CPU cores)")
    p.add_argument("--interpret", action="store_true",
                   help="without a GPU, check the triton backend on CPU through the Triton "
                   "interpreter (quick shapes, in a subprocess with TRITON_INTERPRET=1; "
                   "about half a minute on 2 CPU cores)")
    p.set_defaults(func=_verify)
    p = sub.add_parser("bench", parents=[common],
                       help="benchmarks: median/p20/p80 ms, %% of the measured "
                       "roofline, peak memory, vs naive torch, torch.compile and peers; "
                       "CSV + markdown + PNG")
    from rlkernels._bench.cases import OPS as _BENCH_OPS
    p.add_argument("--op", nargs="+", choices=list(_BENCH_OPS), metavar="OP",
                   help="ops to run (default: all): " + ", ".join(_BENCH_OPS))
    p.add_argument("--peers", action="store_true",
                   help="include peers (TRL, verl, flash-attn, Liger, CCE) that import")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: rlkernels-bench/<gpu-or-cpu>/ under the "
                   "current directory)")
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
    _add_train_parser(sub, common)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"rlkernels {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


def bench_family(family: str, argv: Optional[List[str]] = None) -> int:
    """Entry point of ``benchmarks/bench_<family>.py``: ``rlkernels bench`` on one family."""
    from rlkernels._bench.cases import FAMILIES
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--op" not in argv:
        argv = ["--op", *FAMILIES[family]] + argv
    return main(["bench", *argv])

