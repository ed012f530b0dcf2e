"""The ``rlkernels`` command line: ``info``, ``verify``, ``bench`` (SPEC section 4).

``train`` is listed by ``--help`` as not available in this version, so that a
user who types it gets a clear message instead of an argparse error.
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


def _not_yet(name: str):
    def run(_args) -> int:
        print(f"rlkernels {name}: not available in this version yet", file=sys.stderr)
        return 2
    return run


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
    sub.add_parser("train", help="the reference GRPO trainer (not available yet)"
                   ).set_defaults(func=_not_yet("train"))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
