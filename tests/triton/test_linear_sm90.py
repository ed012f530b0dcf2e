"""The fused lm_head's Triton kernels compiled for sm_90a (H100 / H200) on CPU: wgmma shapes,
registers, spills (``tests/triton/linear_sm90_check.py``, run in a subprocess because it needs
Triton without the interpreter; a private cache makes it really compile: ~130 distinct
launches, two compiler processes at a time, ~5 min on 2 idle cores).

What must hold at N=16384, H=3584, V=151936, for every configuration the launchers can pick on
a GPU (bf16 / fp16 / fp32 inputs x ``head_precision`` None / bf16 / tf32 / fp32 x bias x
entropy (gradient), the private TRL head's map and ``EXTRAS``, and the cuBLAS path's
``_dz_kernel``; compiler outputs, not measurements):

* no spills in any linear kernel, on either path;
* every GEMM kernel (the forward ``_fwd_kernel``, ``_dz_kernel``'s recompute, both
  ``_gemm_kernel`` products) issues only wgmma with N >= 128 (``HGMMA.64x128x16``, or
  ``64x128x8`` for TF32 / 3xTF32: fp32 operands never fall back to FMA dots), on 128-row
  tiles for the forward and ``_dz_kernel`` (two warpgroups stacked along the rows); the
  epilogues fit by folding each tile in column halves or quarters (see
  ``rlkernels.triton.linear._fwd_kernel``, ``_dz_part`` and ``_blocks``);
* the cuBLAS path's ``_dz_kernel`` (``FROM_LOGITS``) runs no GEMM.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "triton" / "linear_sm90_check.py"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        if not os.access(get_ptxas(90).path, os.X_OK):
            pytest.skip("triton's bundled ptxas is missing")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"triton's NVIDIA backend is not importable ({exc})")
    tmp = tmp_path_factory.mktemp("linear_sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    out = tmp / "report.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=2400)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["errors"] == []
    return data["results"]


def _width(shape: str) -> int:
    return int(re.match(r"HGMMA\.\d+x(\d+)x\d+", shape).group(1))


def test_covers_every_configuration(results):
    kernels = {r["kernel"] for r in results}
    assert {"_fwd_kernel", "_fwd_merge_kernel", "_dz_kernel", "_gemm_kernel"} <= kernels
    configs = [r["config"].split() for r in results]
    for flags in (["ptr=fp32/i64", "DOT_PREC=tf32x3"], ["ptr=fp32/i64", "DOT_PREC=tf32"],
                  ["ROUND=1"], ["ptr=fp16/fp32/i64", "ROUND=0"], ["MAP=2", "EXTRAS=1"],
                  ["MAP=1", "EXTRAS=0"], ["HAS_BIAS=1", "WITH_ENTROPY=0"], ["HAS_GH=0"],
                  ["FROM_LOGITS=1"]):
        assert any(set(flags) <= set(c) for c in configs), flags


def test_compiles_without_spills(results):
    for r in results:
        assert "error" not in r, r
        assert r["spill_store"] == 0 and r["spill_load"] == 0, r


def test_gemms_are_128_wide(results):
    fwd = [r for r in results if r["kernel"] == "_fwd_kernel"]
    assert fwd
    for r in results:
        if r["kernel"] in ("_gemm_kernel", "_fwd_kernel") or (
                r["kernel"] == "_dz_kernel" and "FROM_LOGITS=0" in r["config"]):
            assert r["hgmma"], r
            assert min(_width(s) for s in r["hgmma"]) >= 128, r
            if r["kernel"] != "_gemm_kernel":
                assert "BLOCK_N=128" in r["config"].split(), r


def test_cublas_dz_runs_no_gemm(results):
    from_logits = [r for r in results if r["kernel"] == "_dz_kernel"
                   and "FROM_LOGITS=1" in r["config"]]
    assert from_logits and all(r["hgmma"] == [] for r in from_logits)
