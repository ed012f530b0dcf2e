"""Compile the fused lm_head's Triton kernels for sm_90a and read their machine code (no GPU).

Run as a script (it needs real JITFunctions, i.e. Triton imported without TRITON_INTERPRET):
``python tests/triton/linear_sm90_check.py OUT.json [--quick]``. Uses the capture API of
``benchmarks/sm90_compile.py`` on GPU-like meta tensors at N=16384, H=3584, V=151936: the
triton path (forward and backward, with and without a bias and the entropy gradient, bf16;
unless ``--quick`` also fp32 inputs with no head precision, a ``"bf16"`` and a ``"tf32"``
head, fp16 inputs on a ``"bf16"`` head and an ``"fp32"`` head on bf16 inputs) and the
cuBLAS path (its ``_dz_kernel`` ``FROM_LOGITS`` launches). Each distinct launch is compiled
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``; registers and spills come from
``ptxas -v`` (:func:`sm90_compile.ptxas_usage`), the wgmma shapes from ``cuobjdump -sass``
of the cubin (every ``HGMMA.MxNxK`` instruction). Compiler outputs, not measurements.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
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


def cases(quick: bool):
    from rlkernels.triton import linear as K

    def run(path, dtype, prec):
        hid, w = S.gpu(N, H, dtype=dtype), S.gpu(V, H, dtype=dtype)
        tok = S.gpu(N, dtype=torch.int64)
        for b in (None, S.gpu(V, dtype=dtype)):
            lp, e, st = K.linear_token_logprobs_forward(hid, w, b, tok, 1.0, -100, True, prec,
                                                        path)
            K.linear_token_logprobs_backward(lp, e, hid, w, b, tok, st, 1.0, -100, prec, path)
            K.linear_token_logprobs_backward(lp, None, hid, w, b, tok, st, 1.0, -100, prec,
                                             path)

    out = [("triton bf16", lambda: run("triton", torch.bfloat16, None)),
           ("cublas bf16", lambda: run("cublas", torch.bfloat16, None))]
    if not quick:
        out += [("triton fp32 head=bf16", lambda: run("triton", torch.float32, "bf16")),
                ("triton fp32 head=tf32", lambda: run("triton", torch.float32, "tf32")),
                ("triton fp32", lambda: run("triton", torch.float32, None)),
                ("triton fp16 head=bf16", lambda: run("triton", torch.float16, "bf16")),
                ("triton bf16 head=fp32", lambda: run("triton", torch.bfloat16, "fp32"))]
    return out


def hgmma_shapes(cubin: bytes):
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return sorted({m.group(0) for m in HGMMA.finditer(sass)})


def main(out_path: str, quick: bool) -> int:
    launches, errors = S.capture_launches(cases(quick), 90)
    rows = []
    for launch in launches.values():
        if launch.fn.fn.__module__ != "rlkernels.triton.linear":
            continue
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
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(out_path).write_text(json.dumps(dict(results=rows, errors=errors), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], "--quick" in sys.argv))
