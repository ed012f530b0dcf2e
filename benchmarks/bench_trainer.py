"""One GRPO step at realistic size: peak memory and step time, ``--ops torch`` vs ``kernels``.

Issue #6's GPU measurement: a random model with the shape of Qwen2.5-0.5B (vocabulary 151936),
bf16, ``prompts x group_size`` sequences of about ``tokens / (prompts x group_size)`` tokens
(16k tokens per step by default). Each configuration runs in its own process (clean peak
memory) for ``--steps`` steps; the last (warm) step is reported. Writes ``trainer.json`` and
``trainer.md`` to ``--out``.

    python benchmarks/bench_trainer.py --out OUTDIR [--steps 2] [--tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = {  # name -> TrainConfig overrides
    "torch": dict(ops="torch"),
    "kernels": dict(ops="kernels"),
    "kernels --fused-head": dict(ops="kernels", fused_head=True),
}


def _child(spec: str) -> None:
    from rlkernels.trainer import TrainConfig, train

    result = train(TrainConfig(**json.loads(spec)))
    print("RESULT " + json.dumps(result["records"][-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16384, help="tokens per step (approx.)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--size", default="qwen2.5-0.5b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child)
        return 0
    os.makedirs(args.out, exist_ok=True)
    per_seq = max(8, args.tokens // (args.prompts * args.group_size))
    rows = []
    for name in args.configs.split(","):
        spec = dict(task="addition", digits=1, steps=args.steps, size=args.size,
                    dtype=args.dtype, prompts=args.prompts, group_size=args.group_size,
                    max_new_tokens=per_seq - 5, kl_coef=0.04, entropy_coef=0.0,
                    progress=False, device=args.device, **CONFIGS[name])
        proc = subprocess.run([sys.executable, __file__, "--out", args.out, "--child",
                               json.dumps(spec)], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            rows.append({"config": name, "error": " | ".join(tail)})
        else:
            rows.append({"config": name, **json.loads(line[0][7:])})
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "trainer.json"), "w") as f:
        json.dump(rows, f, indent=2)
    base = next((r for r in rows if r["config"] == "torch" and "error" not in r), None)
    lines = ["| config | peak memory (GiB) | step (s) | update (s) | rollout (s) | tokens/s |"
             " memory vs torch | update vs torch |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error'][:80]} | | | | | | |")
            continue
        rel_m = f"{r['peak_mem_gb'] / base['peak_mem_gb'] - 1:+.0%}" if base else ""
        rel_t = f"{base['update_s'] / r['update_s']:.2f}x" if base else ""
        lines.append(f"| {r['config']} | {r['peak_mem_gb']:.2f} | {r['time_s']:.3f} | "
                     f"{r['update_s']:.3f} | {r['rollout_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{rel_m} | {rel_t} |")
    with open(os.path.join(args.out, "trainer.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
