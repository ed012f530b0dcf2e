"""Instructions per public op call (callgrind): the host-overhead measure without the noise.

    python benchmarks/host_instructions.py [--ops policy_loss,token_logprobs] [--number 30]

``host_overhead.py`` times the stubbed public calls (every backend kernel replaced by its
recorded result); on a shared 2-core VM those times move by +-50 % from minute to minute,
which hides any change smaller than that. This script counts the instructions the same
stubbed calls execute instead: it re-runs itself under ``valgrind --tool=callgrind`` and
counts only inside the measured loops (collection toggled on and a profile dumped at the
exit of ``builtin_oct``, which the script calls around each loop and nothing else calls),
so the counts repeat to the instruction from run to run and an A/B of two trees is exact.
Instructions are not time (their cost differs between C++ and the Python interpreter, and
cache misses do not show), so the goal of issue 19 stays judged in microseconds by
``host_overhead.py``; use this one to see what a change saves.

Per op: ``fwd`` (inputs that need no gradient) and ``fwd+bwd`` (the public call plus
``torch.autograd.backward``, the leaves' ``.grad`` reset before each call, as in
``host_overhead.py``), in thousands of instructions per call, the stand-ins (the recorded
results handed back through the recorder) included; and the torch floor (a no-op
``autograd.Function`` with one input per leaf: the engine's work per leaf gradient is
torch's, so an op is compared with the floor of its number of leaves). A run takes minutes
(valgrind runs Python ~50x slower; the kernels run once, for the recording).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import host_overhead as ho  # noqa: E402

from rlkernels import _checks  # noqa: E402

_MARK = "builtin_oct"  # the C function whose exits delimit the measured loops
_MAX_LEAVES = 2  # the most inputs requiring grad of a host_overhead.py case


class _Loop:
    """``oct(_Loop(fn, n))`` runs ``fn`` n times inside ``builtin_oct``."""

    def __init__(self, fn: Callable[[], object], n: int):
        self.fn, self.n = fn, n

    def __index__(self) -> int:
        fn = self.fn
        for _ in range(self.n):
            fn()
        return 0


def _measured(args) -> None:
    """Inside valgrind: run every measured loop (labels written to ``args.labels``)."""
    torch.set_num_threads(1)
    _checks._cpu_checks = False  # as host_overhead.py: the GPU path reads no data
    labels: List[str] = []

    def loop(label: str, fn: Callable[[], object]) -> None:
        for _ in range(3):  # warm: memos, caches
            fn()
        labels.append(label)
        oct(_Loop(fn, args.number))

    xs = [torch.zeros(ho.B, ho.T, requires_grad=True) for _ in range(_MAX_LEAVES)]
    one = torch.ones(())

    def floor_fwd_bwd(n):
        for x in xs[:n]:
            x.grad = None
        torch.autograd.backward([ho.nothing(n).apply(*xs[:n])], [one])

    loop("floor fwd", lambda: ho._Nothing.apply(xs[0]))
    for n in range(1, _MAX_LEAVES + 1):  # the floor of an op with n leaves
        loop(f"floor fwd+bwd {n}", lambda n=n: floor_fwd_bwd(n))
    cases = ho._cases(args.backend)
    for op in args.ops:
        for mode, grad in (("fwd", False), ("fwd+bwd", True)):
            call = cases[op](grad)
            outs = ho._differentiable(call()) if grad else []
            if grad and not outs:
                continue  # no gradient (group_advantages, gae, ...)
            grads = [torch.ones_like(o) for o in outs]
            leaves = ho._leaves(call)

            def public(call=call, grad=grad, grads=grads, leaves=leaves):
                for leaf in leaves:
                    leaf.grad = None
                res = call()
                if grad:
                    torch.autograd.backward(ho._differentiable(res), grads)

            rec = ho._Recorder()
            with ho._recording(rec):
                public()
                rec.replay, rec.cursor = True, 0
                loop(f"{op} {mode}", public)
    with open(args.labels, "w") as f:
        f.write("\n".join(labels))


def _totals(directory: str) -> List[int]:
    """The instruction totals of the dumps, in dump order."""
    paths = sorted(glob.glob(os.path.join(directory, "cg.out.*")),
                   key=lambda p: int(p.rsplit(".", 1)[1]))
    totals = []
    for path in paths:
        with open(path) as f:
            for line in f:
                if line.startswith("totals:"):
                    totals.append(int(line.split()[1]))
                    break
    return totals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--ops", default="", help="comma list of host_overhead.py's case names "
                                              "(default: all)")
    ap.add_argument("--number", type=int, default=30, help="calls per measured loop")
    ap.add_argument("--labels", help=argparse.SUPPRESS)  # set when running under valgrind
    args = ap.parse_args(argv)
    known = list(ho._cases(args.backend))
    args.ops = [o for o in args.ops.split(",") if o] or known
    unknown = sorted(set(args.ops) - set(known))
    if unknown:
        print(f"host_instructions: error: --ops: unknown {unknown}; known: {known}",
              file=sys.stderr)
        return 2
    if args.labels:
        _measured(args)
        return 0
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("host_instructions: error: valgrind not found (apt install valgrind)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        labels = os.path.join(tmp, "labels")
        cmd = [valgrind, "--tool=callgrind", "--collect-atstart=no",
               f"--toggle-collect={_MARK}", f"--dump-after={_MARK}",
               f"--callgrind-out-file={os.path.join(tmp, 'cg.out')}", sys.executable,
               os.path.abspath(__file__), "--backend", args.backend, "--ops",
               ",".join(args.ops), "--number", str(args.number), "--labels", labels]
        # a fixed hash seed: string hashes (dict and set layouts, hence some probe counts)
        # otherwise differ from run to run by a few thousand instructions per call
        run = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": "0"})
        if run.returncode != 0 or not os.path.exists(labels):
            print(run.stdout[-4000:] + run.stderr[-4000:], file=sys.stderr)
            return 1
        with open(labels) as f:
            names = f.read().split("\n")
        # the loops' dumps are the large ones (a stray call of the marker from elsewhere
        # would dump a few hundred instructions)
        totals = [t for t in _totals(tmp) if t >= 1000 * args.number]
    if len(totals) != len(names):
        print(f"host_instructions: error: {len(names)} loops but {len(totals)} dumps",
              file=sys.stderr)
        return 1
    per_call = {n: t / args.number / 1000 for n, t in zip(names, totals)}
    print(f"torch {torch.__version__}, backend {args.backend}, B={ho.B} T={ho.T} V={ho.V}; "
          f"thousands of instructions per call ({args.number} calls per loop, callgrind)")
    floors = ", ".join(f"{n}: {per_call[f'floor fwd+bwd {n}']:.1f}"
                       for n in range(1, _MAX_LEAVES + 1))
    print(f"torch floor (a no-op autograd.Function, one input per leaf): fwd "
          f"{per_call['floor fwd']:.1f}, fwd+bwd by leaves {floors}")
    print("| op | fwd | fwd+bwd | fwd+bwd - floor of its leaves |")
    print("| --- | ---: | ---: | ---: |")
    cases = ho._cases(args.backend)
    for op in args.ops:
        fwd = per_call.get(f"{op} fwd")
        both = per_call.get(f"{op} fwd+bwd")
        leaves = min(max(len(ho._leaves(cases[op](True))), 1), _MAX_LEAVES)
        cells = [f"{fwd:.1f}" if fwd is not None else "n/a"]
        cells += ([f"{both:.1f}", f"{both - per_call[f'floor fwd+bwd {leaves}']:.1f}"]
                  if both is not None else ["n/a", "n/a"])
        print(f"| {op} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
