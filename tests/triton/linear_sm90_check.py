"""Compile the fused lm_head's Triton kernels for sm_90a and read their machine code (no GPU).

Run as a script (it needs real JITFunctions, i.e. Triton imported without TRITON_INTERPRET):
``python tests/triton/linear_sm90_check.py OUT.json [--quick] [--only REGEX]``. Uses the
capture API of ``benchmarks/sm90_compile.py`` on GPU-like meta tensors at N=16384, H=3584,
V=151936: every configuration the launchers can pick on a GPU, i.e. the triton path (forward
and backward, with and without a bias and the entropy gradient) for bf16 / fp16 / fp32 inputs
x ``head_precision`` None / ``"bf16"`` / ``"tf32"`` / ``"fp32"``, the private TRL head
(``linear_token_stats``: the soft cap ``MAP`` with and without the ``EXTRAS`` statistics, a
logit scale alone, for bf16 and fp32 inputs), and the cuBLAS path's ``_dz_kernel``
``FROM_LOGITS`` launches (per dtype). ``--quick``: bf16 inputs only (no head precision, and
the TRL head). ``--only``: the cases whose label matches. Each distinct launch is compiled
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (two at a time); registers and
spills come from ``ptxas -v`` (:func:`sm90_compile.ptxas_usage`), the wgmma shapes from
``cuobjdump -sass`` of the cubin (every ``HGMMA.MxNxK`` instruction). Compiler outputs, not
measurements.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import get_context
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import sm90_compile as S  # noqa: E402

N, H, V = 16384, 3584, 151936
HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEADS = (None, "bf16", "tf32", "fp32")


def cases(quick: bool):
    from rlkernels.triton import linear as K

    def run(path, dtype, prec):
        hid, w = S.gpu(N, H, dtype=dtype), S.gpu(V, H, dtype=dtype)
        tok = S.gpu(N, dtype=torch.int64)
        for b in (None, S.gpu(V, dtype=dtype)):
            for ent in (True, False):
                lp, e, st = K.linear_token_logprobs_forward(hid, w, b, tok, 1.0, -100, ent,
                                                            prec, path)
            K.linear_token_logprobs_backward(lp, e, hid, w, b, tok, st, 1.0, -100, prec, path)
            K.linear_token_logprobs_backward(lp, None, hid, w, b, tok, st, 1.0, -100, prec,
                                             path)

    def trl(dtype, scale, softcap, extras):
        hid, w = S.gpu(N, H, dtype=dtype), S.gpu(V, H, dtype=dtype)
        tok = S.gpu(N, dtype=torch.int64)
        for b in (None, S.gpu(V, dtype=dtype)):
            lp, e, st, _ = K.linear_token_stats_forward(hid, w, b, tok, 1.0, -100, True, scale,
                                                        softcap, extras)
            K.linear_token_stats_backward(lp, e, hid, w, b, tok, st, 1.0, -100, scale, softcap)
            K.linear_token_stats_backward(lp, None, hid, w, b, tok, st, 1.0, -100, scale,
                                          softcap)

    out = []
    for name, dtype in DTYPES.items():
        if quick and name != "bf16":
            continue
        for prec in HEADS:
            if quick and prec is not None:
                continue
            label = f"triton {name}" + ("" if prec is None else f" head={prec}")
            out.append((label, lambda d=dtype, p=prec: run("triton", d, p)))
        out.append((f"cublas {name}", lambda d=dtype: run("cublas", d, None)))
        if name != "fp16":
            for scale, cap, extras in ((2.0, 30.0, True), (2.0, 30.0, False),
                                       (2.0, None, True), (2.0, None, False)):
                label = f"trl {name} scale={scale} softcap={cap} extras={int(extras)}"
                out.append((label, lambda d=dtype, s=scale, c=cap, x=extras: trl(d, s, c, x)))
    return out


def hgmma_shapes(cubin: bytes):
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return sorted({m.group(0) for m in HGMMA.finditer(sass)})


def compile_one(launch) -> dict:
    """One launch compiled for sm_90a: registers, spills, shared memory, wgmma shapes."""
    row = dict(kernel=launch.kernel, config=launch.config(), case=launch.case)
    try:
        src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options=launch.options.__dict__)
        row.update(S.ptxas_usage(kernel.asm["ptx"], 90))
        row["shared"] = int(kernel.metadata.shared)
        row["hgmma"] = hgmma_shapes(kernel.asm["cubin"])
    except Exception as exc:  # noqa: BLE001 -- reported
        row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    return row


_TODO: list = []  # what the forked compile processes inherit


def _child(index: int, conn) -> None:
    conn.send(compile_one(_TODO[index]))
    conn.close()


def compile_isolated(index: int) -> dict:
    """Launch ``index`` compiled in a forked process (an LLVM abort becomes an error row)."""
    ctx = get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(index, send))
    proc.start()
    send.close()
    try:
        row = recv.recv()
    except EOFError:
        la = _TODO[index]
        row = dict(kernel=la.kernel, config=la.config(), case=la.case,
                   error=f"compiler process died (exit code {proc.exitcode})")
    proc.join()
    print(json.dumps(row), flush=True)
    return row


def main(out_path: str, quick: bool, only: str = "") -> int:
    chosen = [c for c in cases(quick) if re.search(only, c[0])]
    launches, errors = S.capture_launches(chosen, 90)
    _TODO[:] = [x for x in launches.values() if x.fn.fn.__module__ == "rlkernels.triton.linear"]
    with ThreadPoolExecutor(2) as pool:  # two compiler processes at a time
        rows = list(pool.map(compile_isolated, range(len(_TODO))))
    Path(out_path).write_text(json.dumps(dict(results=rows, errors=errors), indent=1))
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    only = args[args.index("--only") + 1] if "--only" in args else ""
    sys.exit(main(args[0], "--quick" in args, only))
