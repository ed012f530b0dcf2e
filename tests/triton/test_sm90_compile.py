"""Ahead-of-time compile of every launched Triton kernel for sm_90 (H100 / H200), on CPU.

The other tests here run the kernels in the interpreter, which accepts code the real compiler
rejects and cannot see registers or shared memory. ``benchmarks/sm90_compile.py --quick``
captures every launch the launchers make at GPU-realistic shapes (one shape per op family, every
flag combination: every kernel and constexpr family once), compiles each for sm_90 with Triton's
own compiler and reads ``ptxas -v``. It runs in a subprocess: the script needs real
``JITFunction`` objects, i.e. Triton imported WITHOUT the ``TRITON_INTERPRET=1`` that conftest.py
sets for this process. A private Triton cache makes each run really compile (~30-60 s on two
cores). Skipped when Triton's NVIDIA backend or its bundled ptxas is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "sm90_compile.py"
SHARED_LIMIT_SM90 = 232448  # bytes of shared memory one block may use (227 KiB)

# Spills reported on 2026-11-21 and not fixed yet (kernels are someone else's to change): a
# (kernel, config words) pair matches a result whose config contains all the words. A spill
# anywhere else fails; remove an entry once its kernel stops spilling.
KNOWN_SPILLS = [
    ("_policy_fwd_kernel", ("SEQ=1",)),  # GSPO forward: 64 registers, 8 B stack spill
]


def _skip_reason():
    """Why this machine cannot compile for sm_90 (None when it can)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001 -- any failure means: no NVIDIA backend here
        return f"triton's NVIDIA backend is not importable ({type(exc).__name__}: {exc})"
    if not path or not os.access(path, os.X_OK):
        return f"triton's bundled ptxas is missing ({path!r})"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The JSON report of one ``--quick --arch 90`` run, and the script's output."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--arch", "90",
                           "--json", str(tmp / "report.json")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    path = tmp / "report.json"
    assert path.exists(), f"the script wrote no report:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return json.loads(path.read_text()), proc.stdout


def _known_spill(result) -> bool:
    return any(result["kernel"] == name and all(w in result["config"].split() for w in words)
               for name, words in KNOWN_SPILLS)


def test_every_case_ran(report):
    data, out = report
    assert data["case_errors"] == [], out[-3000:]


def test_every_kernel_compiles_within_shared_memory(report):
    data, _ = report
    failed = [f"{r['kernel']} [{r['config']}]: {r['error']}" for r in data["results"]
              if not r["ok"]]
    assert not failed, "\n".join(failed)
    over = [f"{r['kernel']} [{r['config']}]: {r['shared']} B" for r in data["results"]
            if r["shared"] > SHARED_LIMIT_SM90]
    assert not over, "\n".join(over)


def test_no_new_spills(report):
    data, _ = report
    spills = [r for r in data["results"] if r["spill_store"] or r["spill_load"]]
    new = [f"{r['kernel']} [{r['config']}]: {r['regs']} regs, {r['spill_store']} B spill "
           f"stores, {r['spill_load']} B spill loads" for r in spills if not _known_spill(r)]
    assert not new, "\n".join(new)


def test_every_launched_kernel_is_captured(report):
    """Each ``@triton.jit`` function that ``rlkernels/triton/*.py`` launches (found in the
    source: ``name[grid](...)``, or a name ending in ``_kernel``) was compiled at least once,
    so that a new kernel cannot go without this check."""
    data, _ = report
    launched = [f"{mod}.{name}" for mod, names in data["launched"].items() for name in names]
    # the discovery itself works: the kernels of every family are found
    for name in ("vocab._token_logprobs_fwd_kernel", "sparse._sparse_bwd_kernel",
                 "advantage._group_advantages_kernel", "policy._policy_bwd_kernel",
                 "linear._gemm_kernel"):
        assert name in launched
    assert data["uncovered"] == [], (
        f"kernels launched but never captured: {data['uncovered']}; add a case for their "
        f"launcher to benchmarks/sm90_compile.py")


def test_launchers_took_their_gpu_branches(report):
    """The capture's tensors pass for CUDA ones: the launchers chose their GPU settings (the
    linear kernels' GPU tiles without the interpreter's upcast, libdevice in the policy
    kernels), not the interpreter's."""
    data, _ = report
    configs = {(r["kernel"], w) for r in data["results"] for w in r["config"].split()}
    assert ("_fwd_kernel", "UPCAST=0") in configs
    assert ("_fwd_kernel", "BLOCK_N=128") in configs  # the GPU tile (interpreter: 16)
    assert ("_fwd_kernel", "UPCAST=1") not in configs
    assert ("_policy_fwd_kernel", "LIBDEVICE_EXP=1") in configs
    assert ("_token_logprobs_fwd_kernel", "BLOCK_V=4096") in configs


# ------------------------------------------------------------------ benchmarks/sass_report.py

REPORT = ROOT / "benchmarks" / "sass_report.py"

# A hand-written function: a loop (0x0040 .. 0x0100) with a 16-byte load, an out-of-line rare
# block (0x0140) that jumps back into the loop, and a misaligned side of an in-loop test.
_SASS = """
\t\tFunction : toy
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_TID.X ;
        /*0020*/                   MOV R2, RZ ;
        /*0030*/                   MOV R3, RZ ;
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0050*/                   FSETP.GT.AND P1, PT, R4, R0, PT ;
        /*0060*/               @P1 BRA 0x140 ;
        /*0070*/                   MUFU.EX2 R5, R4 ;
        /*0080*/                   FADD R6, R6, R5 ;
        /*0090*/                   SHFL.BFLY PT, R7, R6, 0x1, 0x1f ;
        /*00a0*/                   IADD3 R2, R2, 0x10, RZ ;
        /*00b0*/                   STG.E.64 desc[UR4][R2.64], R6 ;
        /*00c0*/                   ISETP.LT.AND P0, PT, R2, R9, PT ;
        /*00d0*/                   NOP ;
        /*00e0*/                   FADD R8, R8, R6 ;
        /*00f0*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0100*/                @P0 BRA 0x40 ;
        /*0110*/                   EXIT ;
        /*0120*/                   BRA 0x120;
        /*0130*/                   NOP;
        /*0140*/                   FMUL R0, R4, 1 ;
        /*0150*/                   BRA 0x70 ;
"""


def _report_module():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    import importlib.util
    spec = importlib.util.spec_from_file_location("_sass_report_under_test", REPORT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    # the module imports sm90_compile, which pops TRITON_INTERPRET; restore it for this process
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        spec.loader.exec_module(mod)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return mod


def test_sass_loop_counting_on_a_known_function():
    """One loop (the backward BRA of the out-of-line block is not one); its layout path skips
    the rare block and the NOP: 12 instructions, 16 B loaded and 8 B stored per thread."""
    R = _report_module()
    code = R.parse_sass(_SASS)["toy"]
    loops = R.find_loops(code)
    assert len(loops) == 1, loops
    lp = loops[0]
    assert (lp.head, lp.instr, lp.load_b, lp.store_b) == (0x40, 12, 16, 8)
    assert (lp.mufu, lp.shfl, lp.bar, lp.vector) == (1, 1, 0, True)
    # 12 instructions for 24 bytes a thread: I / (32 x 24 B) / (132 * 4 * 1.98e9) * 3e12
    assert lp.ratio == pytest.approx(12 * 3.0e12 / (32 * 24 * 132 * 4 * 1.98e9))


# A loop whose rare block (0x0080, a rebase) is laid out in line, skipped by a taken branch,
# and two exclusive copies of one loop (an aligned and a misaligned row) behind one test.
_SASS_RARE = """
\t\tFunction : rare
        /*0000*/                   ISETP.NE.AND P2, PT, R9, RZ, PT ;
        /*0010*/               @P2 BRA 0x100 ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   FSETP.GT.AND P1, PT, R4, R0, PT ;
        /*0040*/              @!P1 BRA 0xa0 ;
        /*0050*/                   FMUL R6, R6, R5 ;
        /*0060*/                   FMUL R8, R8, R5 ;
        /*0070*/                   MOV R0, R4 ;
        /*0080*/                   FADD R6, R6, 1 ;
        /*0090*/                   FADD R8, R8, 1 ;
        /*00a0*/                   MUFU.EX2 R5, R4 ;
        /*00b0*/                   IADD3 R2, R2, 0x10, RZ ;
        /*00c0*/                   ISETP.LT.AND P0, PT, R2, R9, PT ;
        /*00d0*/                @P0 BRA 0x20 ;
        /*00e0*/                   EXIT ;
        /*00f0*/                   NOP ;
        /*0100*/                   LDG.E.64 R4, desc[UR4][R2.64] ;
        /*0110*/                   LDG.E.64 R6, desc[UR4][R2.64+0x8] ;
        /*0120*/                   IADD3 R2, R2, 0x4, RZ ;
        /*0130*/                   ISETP.LT.AND P0, PT, R2, R9, PT ;
        /*0140*/                @P0 BRA 0x100 ;
        /*0150*/                   EXIT ;
"""


def test_sass_min_path_and_exclusive_loops():
    """The layout path counts the in-line rare block (10 instructions); the counted path is
    the shortest one moving the same bytes (5), with the block listed as skipped. The scalar
    loop is the other side of the row's test: one group, reported as misaligned, not a
    second pass."""
    R = _report_module()
    code = R.parse_sass(_SASS_RARE)["rare"]
    loops = R.find_loops(code)
    assert len(loops) == 2, loops
    vec = next(lp for lp in loops if lp.head == 0x20)
    assert (vec.instr_layout, vec.instr_min, vec.instr) == (12, 7, 7)
    assert vec.skipped == ["0x50"] and (vec.load_b, vec.vec16) == (16, 1)
    scal = next(lp for lp in loops if lp.head == 0x100)
    assert scal.group == vec.group
    row = R.analyze(code, R.Row("x", "op", "fwd", "rare", "", "bf16", ""))
    assert row.passes == 1 and row.loops_hot == 1 and row.instr == 7
    assert row.misaligned_ratio == pytest.approx(R.issue_dram_ratio(5, 16))


def test_sass_report_quick(tmp_path):
    """``--quick`` (triton token_logprobs kernels at N=16384, V=151936 bf16): every kernel
    compiles, has one streaming pass with 16-byte accesses, and the dump holds its SASS."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, str(REPORT), "--quick", "--jobs", "2",
                           "--dump", str(tmp_path / "dump"), "--json",
                           str(tmp_path / "rows.json")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {(r["op"], r["direction"]) for r in rows} >= {("token_logprobs", "fwd"),
                                                         ("token_logprobs", "bwd")}
    for r in rows:
        assert r["error"] == "" and r["passes"] == 1, r
        assert r["load_b"] >= 16 and r["instr"] > 0 and r["regs"] > 0, r
        assert r["local_instr"] == 0 and r["spill_b"] == 0, r
    index = json.loads((tmp_path / "dump" / "index.json").read_text())
    assert len(index) == len(rows)
    for entry in index:
        assert entry["backend"] == "triton" and entry["dtype"] == "bf16"
        assert "LDG.E.128" in (tmp_path / "dump" / entry["sass_file"]).read_text()
