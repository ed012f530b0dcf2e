"""Peak extra host memory of token_logprobs forward+backward vs naive log_softmax + gather.

Each method runs in a fresh process: logits are allocated and touched first, the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs``), then forward+backward runs and the
peak resident memory above that baseline is reported. Linux only (CPU memory).

    python benchmarks/memory_token_logprobs.py [--n 4096] [--v 151936]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(method: str, n: int, vocab: int) -> None:
    import torch

    import rlkernels as rk

    torch.manual_seed(0)
    logits = torch.randn(n, vocab).requires_grad_(True)
    tokens = torch.randint(0, vocab, (n,))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    base = _rss_kib("VmRSS:")
    if method == "naive":
        logp = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
    else:
        logp = rk.token_logprobs(logits, tokens, backend="torch")
    logp.sum().backward()
    peak = _rss_kib("VmHWM:")
    print(json.dumps({"method": method, "extra_peak_gib": (peak - base) / 2**20,
                      "logits_gib": logits.numel() * 4 / 2**30}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--child", choices=("naive", "rlkernels"))
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.n, args.v)
        return
    for method in ("naive", "rlkernels"):
        out = subprocess.run([sys.executable, __file__, "--child", method, "--n", str(args.n),
                              "--v", str(args.v)], check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{row['method']:10} logits {row['logits_gib']:.2f} GiB fp32 | extra peak "
              f"{row['extra_peak_gib']:.2f} GiB (forward+backward)")


if __name__ == "__main__":
    main()
