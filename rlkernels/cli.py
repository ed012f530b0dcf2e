"""The ``rlkernels`` command line: ``info``, ``verify`` (SPEC section 4).

``bench`` and ``train`` are listed by ``--help`` as not available in this version, so that a
user who types them gets a clear message instead of an argparse error.
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
    for name, text in (("bench", "microbenchmarks (not available yet)"),
                       ("train", "the reference GRPO trainer (not available yet)")):
        sub.add_parser(name, help=text).set_defaults(func=_not_yet(name))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
