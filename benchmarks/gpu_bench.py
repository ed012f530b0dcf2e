"""Steps 6-7 of benchmarks/gpu_check.sh: benchmarks whose every row reaches the CSV at once.

    python benchmarks/gpu_bench.py --preset headline --csv OUT/bench.csv [--env OUT/env.json]
                                   [--budget-s S] [--dry]
    python benchmarks/gpu_bench.py --preset grid ...

The harness of ``rlkernels bench`` (:class:`rlkernels._bench.runner.Bench`: rotating inputs,
median / p20 / p80, peak memory, % of roofline, errors vs torch-naive) with each row appended
to the CSV and flushed as it is measured, so a run cut at any point keeps what it measured.

* ``headline``: one realistic shape per op, every provider (peers included, each only if it
  imports), forward and forward+backward: vocabulary ops at N=16384, V=151936 bf16; grpo_loss
  B=16 x T=1024, V=151936, with and without ``grad_in_forward`` (``grpo_loss_gif``);
  policy_loss and gae at B=512, T=4096; group_advantages B=16384;
  the linear ops at N=16384, H=3584, V=151936. Two passes over the ops in priority order,
  each op with an equal share of its pass's time: first the providers that answer the
  questions (rlkernels triton and cuda, torch-naive, the peers; 70% of the budget), then
  the slow-to-start or secondary ones (torch.compile, rlkernels-torch, triton-cublas).
* ``grid``: the rest of ``rlkernels bench``'s full grid (headline shapes left out), largest
  shapes first.

The ceilings come from ``env.json`` (step 1, measured once per run) when given, else they
are measured here. ``--dry`` (the CPU rehearsal): quick shapes on CPU, fp32, no
torch.compile (minutes of C++ compilation on a small CPU).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from typing import Dict, List

HEADLINE: Dict[str, dict] = {
    "token_logprobs": {"N": 16384, "V": 151936},
    "grpo_loss": {"B": 16, "T": 1024, "V": 151936},
    "grpo_loss_gif": {"B": 16, "T": 1024, "V": 151936},
    "linear_grpo_loss": {"N": 16384, "H": 3584, "V": 151936},
    "linear_grpo_loss_gif": {"N": 16384, "H": 3584, "V": 151936},
    "linear_token_logprobs": {"N": 16384, "H": 3584, "V": 151936},
    "kl_divergence": {"N": 16384, "V": 151936},
    "token_logprobs_entropy": {"N": 16384, "V": 151936},
    "entropy": {"N": 16384, "V": 151936},
    "sparse_logprobs": {"N": 16384, "V": 151936},
    "policy_loss": {"B": 512, "T": 4096},
    "gae": {"B": 512, "T": 4096},
    "group_advantages": {"B": 16384, "G": 16},
}
# The CPU rehearsal: shapes small enough for the Triton interpreter (a few program instances
# per kernel), the grid one extra shape of two ops; no torch.compile.
DRY_HEADLINE: Dict[str, dict] = {
    "token_logprobs": {"N": 4, "V": 257}, "grpo_loss": {"B": 2, "T": 2, "V": 257},
    "grpo_loss_gif": {"B": 2, "T": 2, "V": 257},
    "linear_grpo_loss": {"N": 4, "H": 32, "V": 257},
    "linear_grpo_loss_gif": {"N": 4, "H": 32, "V": 257},
    "linear_token_logprobs": {"N": 4, "H": 32, "V": 257},
    "kl_divergence": {"N": 4, "V": 257}, "token_logprobs_entropy": {"N": 4, "V": 257},
    "entropy": {"N": 4, "V": 257}, "sparse_logprobs": {"N": 4, "V": 257},
    "policy_loss": {"B": 2, "T": 64}, "gae": {"B": 2, "T": 64},
    "group_advantages": {"B": 16, "G": 8},
}
DRY_GRID: Dict[str, List[dict]] = {"token_logprobs": [{"N": 6, "V": 300}]}
DRY_PROVIDERS = ["rlkernels-triton", "rlkernels-cuda", "torch-naive", "trl", "liger", "cce",
                 "rlkernels-torch"]


SECOND_PASS = ("torch-compile", "rlkernels-torch", "rlkernels-triton-cublas")
FIRST_PASS_SHARE = 0.7


def _numel(shape: dict) -> int:
    return math.prod(shape.values())


def plan(preset: str, dry: bool) -> Dict[str, List[dict]]:
    """op -> shapes, in run order."""
    from rlkernels._bench import cases
    plan: Dict[str, List[dict]] = {}
    for op in HEADLINE:
        if op not in cases.OPS:
            continue
        if dry:
            plan[op] = [DRY_HEADLINE[op]] if preset == "headline" else DRY_GRID.get(op, [])
        elif preset == "headline":
            plan[op] = [HEADLINE[op]]
        else:
            rest = [s for s in cases.shapes(op, False) if s != HEADLINE[op]]
            plan[op] = sorted(rest, key=_numel, reverse=True)
    return {op: s for op, s in plan.items() if s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("headline", "grid"), required=True)
    ap.add_argument("--csv", required=True, help="CSV to append the rows to")
    ap.add_argument("--env", help="env.json of step 1 (ceilings, commit)")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--providers", help="comma-separated (default: all, peers included)")
    ap.add_argument("--dry", action="store_true", help="CPU rehearsal: quick shapes")
    args = ap.parse_args(argv)
    start = time.monotonic()
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"

    import torch

    from rlkernels._bench import providers as prov
    from rlkernels._bench.roofline import Roofline, measure_roofline
    from rlkernels._bench.runner import COLUMNS, Bench, device_name, git_commit, versions

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = {}
    if args.env and os.path.exists(args.env):
        with open(args.env) as f:
            env = json.load(f)
    c = env.get("ceilings")
    roof = (Roofline(str(device), c["copy_bytes"], c["copy_gbps"], c["gemm_n"], c["gemm_dtype"],
                     c["gemm_tflops"]) if c else measure_roofline(device, quick=args.dry))
    meta = {"date": env.get("date") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": device_name(device), "commit": env.get("commit") or git_commit(),
            **versions()}
    names = [p for p in (args.providers or "").split(",") if p] or (
        DRY_PROVIDERS if args.dry else None)
    plist = prov.providers(names, peers=True)

    new = not os.path.exists(args.csv) or os.path.getsize(args.csv) == 0
    f = open(args.csv, "a", newline="")
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    if new:
        writer.writeheader()

    class StreamingBench(Bench):
        def add(self, *a, **k):
            super().add(*a, **k)
            writer.writerow({key: self.rows[-1].get(key, "") for key in COLUMNS})
            f.flush()

    bench = StreamingBench(device, dtype, args.dry, roof, meta,
                           log=lambda line: print(line, flush=True))
    if new:
        bench.add("_roofline", "", f"copy {roof.copy_bytes}B", "_device", "ok", "copy_gbps",
                  roof.copy_gbps, "GB/s")
        bench.add("_roofline", "", f"gemm {roof.gemm_dtype} {roof.gemm_n}^3", "_device", "ok",
                  "gemm_tflops", roof.gemm_tflops, "TFLOP/s")
    todo = plan(args.preset, args.dry)
    print(f"{args.preset}: {meta['device']}, {str(dtype).replace('torch.', '')}, "
          f"{sum(len(s) for s in todo.values())} shapes, providers "
          f"{', '.join(p.name for p in plist)}", flush=True)
    t_imports = time.monotonic()
    for p in plist:  # import every peer now, not inside the first op's share of the budget
        try:
            p.build(next(iter(todo)))
        except Exception:
            pass
    print(f"providers imported in {time.monotonic() - t_imports:.1f} s", flush=True)
    first = [p for p in plist if p.name not in SECOND_PASS]
    second = [p for p in plist if p.name in SECOND_PASS]
    passes = [(first, FIRST_PASS_SHARE), (second, 1.0)] if second and first else [(plist, 1.0)]
    for group, share in passes:
        pass_end = math.inf if args.budget_s is None else start + share * args.budget_s
        for i, (op, shapes) in enumerate(todo.items()):
            t0 = time.monotonic()
            deadline = t0 + max(0.0, pass_end - t0) / (len(todo) - i)
            bench.run_op(op, group, ("fwd", "fwd+bwd"), deadline, shapes=shapes)
            print(f"{op} ({', '.join(p.name for p in group)}): {time.monotonic() - t0:.1f} s",
                  flush=True)
    f.close()
    ok = sum(1 for r in bench.rows if r["metric"] == "median_ms")
    err = sum(1 for r in bench.rows if str(r["status"]).startswith("error"))
    budget = sum(1 for r in bench.rows if "time budget" in str(r["status"]))
    print(f"NOTE: {ok} timings, {err} errors, {budget} cut by the time budget "
          f"({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
