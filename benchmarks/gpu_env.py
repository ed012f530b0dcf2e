"""Step 1 of benchmarks/gpu_check.sh: the environment and the two ceilings, in one file.

    python benchmarks/gpu_env.py --out OUT/env.json [--dry]

Prints versions, the GPU (name, SMs, memory, L2), nvidia-smi, the tools the later steps use
(nvcc, compute-sanitizer, ncu, pytest plugins), then measures the copy bandwidth (read + write
GB/s) and the bf16 GEMM rate (TFLOP/s) with :func:`rlkernels._bench.roofline.measure_roofline`
and writes everything to ``env.json``. The later steps (benchmarks, ingest) take their
ceilings from this file, so every "% of roofline" of the run uses the same two numbers.
``--dry`` (the CPU rehearsal) measures on CPU with tiny buffers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time


def _run(cmd) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip()
    except Exception as exc:  # missing tool, timeout
        return f"unavailable ({type(exc).__name__})"


def carried_commit(root: str) -> str:
    """The commit the carried _C was built from (.gpu/BUILD.txt), else git's, else unknown:
    the device receives the working tree without .git."""
    try:
        with open(os.path.join(root, ".gpu", "BUILD.txt")) as f:
            for line in f:
                if line.startswith("commit "):
                    return line.split(None, 1)[1].strip()
    except OSError:
        pass
    from rlkernels._bench.runner import git_commit
    return git_commit()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="env.json to write")
    ap.add_argument("--dry", action="store_true", help="CPU rehearsal: tiny buffers")
    args = ap.parse_args(argv)

    import torch

    import rlkernels
    from rlkernels._bench.roofline import measure_roofline
    from rlkernels._bench.runner import device_name, device_slug, versions

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cuda = torch.cuda.is_available() and not args.dry
    device = torch.device("cuda" if cuda else "cpu")
    env = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dry": args.dry,
           "device": device_name(device), "device_slug": device_slug(device),
           "device_type": device.type, "python": platform.python_version(),
           "commit": carried_commit(root), **versions(),
           "torch_cuda": torch.version.cuda or "", "backends": rlkernels.available_backends(),
           "tools": {t: bool(shutil.which(t)) for t in ("nvcc", "compute-sanitizer", "ncu",
                                                        "nvidia-smi")},
           "pytest_plugins": {m: importlib.util.find_spec(m) is not None
                              for m in ("xdist", "pytest_timeout")}}
    if cuda:
        p = torch.cuda.get_device_properties(device)
        env.update(sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                   l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                   capability=f"{p.major}.{p.minor}")
    for k, v in env.items():
        print(f"{k:16} {v}")
    if shutil.which("nvidia-smi"):
        print(_run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,"
                    "clocks.max.sm,temperature.gpu,power.draw", "--format=csv"]))
    for tool in ("nvcc", "compute-sanitizer", "ncu"):
        if shutil.which(tool):
            print(f"{tool}: " + _run([tool, "--version"]).splitlines()[-1])
    t = time.perf_counter()
    roof = measure_roofline(device, quick=args.dry)
    env["ceilings"] = {"copy_gbps": roof.copy_gbps, "copy_bytes": roof.copy_bytes,
                       "gemm_tflops": roof.gemm_tflops, "gemm_n": roof.gemm_n,
                       "gemm_dtype": roof.gemm_dtype}
    print(f"ceilings: copy {roof.copy_gbps:.0f} GB/s (read + write, "
          f"{roof.copy_bytes / 2**20:.0f} MiB), GEMM {roof.gemm_tflops:.1f} TFLOP/s "
          f"({roof.gemm_dtype} {roof.gemm_n}^3), {time.perf_counter() - t:.1f} s")
    with open(args.out, "w") as f:
        json.dump(env, f, indent=1)
    print(f"NOTE: {env['device']}: copy {roof.copy_gbps:.4g} GB/s, GEMM "
          f"{roof.gemm_tflops:.4g} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
