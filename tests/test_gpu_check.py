"""The one prepared GPU call (DESIGN section 7) rehearsed on CPU, so it cannot rot between loans.

``OUT=DIR GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh`` runs every step of the GPU check at
tiny shapes (Triton through the interpreter, the CUDA steps reported as skipped); these tests
run it once (a few minutes on 2 CPU cores) and check what a GPU call would bring back: exit 0,
at most 8 files, no deeper than the device tool returns, a true summary.md, streamed parity and
benchmark CSVs, and that benchmarks/gpu_ingest.py turns them into results and auto's table.
"""

from __future__ import annotations

import csv
import os
import re
import runpy
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import rlkernels
from rlkernels import backends

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
STEPS = ("env", "ext", "parity", "tests", "sanitizers", "headline",
         "trainer", "grid")
sys.path.insert(0, str(BENCH))

import gpu_ingest  # noqa: E402
import gpu_sanitize  # noqa: E402


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    work = tmp_path_factory.mktemp("gpu_check_work")
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_DRY": "1", "GPU_CHECK_WORK": str(work),
           "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=330)
    return out, proc


def test_rehearsal_exits_0_with_a_true_summary(rehearsal):
    out, proc = rehearsal
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    for step in STEPS:
        line = next((x for x in summary.splitlines() if x.startswith(f"| {step} |")), None)
        assert line is not None, f"summary.md has no line for {step}:\n{summary}"
        assert re.match(rf"\| {step} \| (ok|skipped) \|", line), line
    assert "RUNNING" not in summary


def test_rehearsal_leaves_what_the_device_tool_returns(rehearsal):
    out, _ = rehearsal
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {"summary.md", "env.json", "parity.csv", "bench.csv", "check.log",
            "tests.log", "trainer.json"} <= {p.name for p in files}
    assert len(files) <= 8, sorted(p.name for p in files)
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", s)
                                           for s in rel.parts), rel


def test_rehearsal_parity_covers_every_public_op(rehearsal):
    out, _ = rehearsal
    rows = list(csv.DictReader(open(out / "parity.csv")))
    ops = {r["op"] for r in rows}
    public = {n for n in rlkernels.__all__ if n not in
              ("__version__", "available_backends", "set_backend", "set_debug",
               "linear_grpo_loss", "entropy")}  # these two run inside other cases
    assert public <= ops | {"entropy"}, public - ops
    triton = [r for r in rows if r["backend"] == "triton"]
    assert triton and all(r["status"] == "PASS" for r in triton), \
        [r for r in triton if r["status"] != "PASS"]
    cuda = [r for r in rows if r["backend"] == "cuda"]
    assert cuda and all(r["status"].startswith("skipped") for r in cuda)
    assert any("2^31" in r["case"] for r in triton)


def test_rehearsal_bench_rows(rehearsal):
    out, _ = rehearsal
    from rlkernels._bench.runner import COLUMNS
    with open(out / "bench.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert {r["metric"] for r in rows if r["op"] == "_roofline"} == {"copy_gbps", "gemm_tflops"}
    timed = {(r["op"], r["mode"]) for r in rows if r["metric"] == "median_ms"
             and r["provider"] == "rlkernels-triton"}
    assert ("token_logprobs", "fwd") in timed and ("token_logprobs", "fwd+bwd") in timed


def _docs_with_markers(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(BENCH / "results" / "README.md", results / "README.md")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{gpu_ingest.START}\nold\n{gpu_ingest.END}\nafter\n")
    return results, readme


def test_ingest_turns_the_rehearsal_into_results(rehearsal, tmp_path):
    out, _ = rehearsal
    results, readme = _docs_with_markers(tmp_path)
    auto = tmp_path / "_auto_table.py"
    res = gpu_ingest.ingest(str(out), str(results), str(readme), str(auto), allow_dry=True,
                            log=lambda s: None)
    stamp = res["stamp"]
    for name in (f"{stamp}.csv", f"{stamp}.md", f"{stamp}-summary.md", f"{stamp}-parity.csv",
                 f"{stamp}-trainer.json"):
        assert (results / "cpu" / name).exists(), name
    md = (results / "cpu" / f"{stamp}.md").read_text()
    assert "| parity | ok |" in md and "Parity sweep" in md and "token_logprobs" in md
    text = readme.read_text()
    assert "old" not in text and "rlkernels (best)" in text and text.endswith("after\n")
    assert "(none yet)" not in (results / "README.md").read_text()
    table = runpy.run_path(str(auto))["TABLE"]
    assert table and all(dev == "cpu" and b in backends.BACKENDS
                         for (op, dev), b in table.items())
    assert ("token_logprobs", "cpu") in table


def test_ingest_refuses_a_dry_run_by_default(rehearsal, tmp_path):
    out, _ = rehearsal
    results, readme = _docs_with_markers(tmp_path)
    with pytest.raises(SystemExit, match="dry run"):
        gpu_ingest.ingest(str(out), str(results), str(readme), None, log=lambda s: None)


def _row(op, mode, shape, provider, ms):
    return {"op": op, "mode": mode, "shape": shape, "provider": provider, "status": "ok",
            "metric": "median_ms", "value": ms}


def test_auto_table_votes_per_cell_and_drops_parity_failures():
    rows = [_row("token_logprobs", "fwd", "a", "rlkernels-triton", 1.0),
            _row("token_logprobs", "fwd", "a", "rlkernels-cuda", 2.0),
            _row("token_logprobs", "fwd+bwd", "a", "rlkernels-triton", 3.0),
            _row("token_logprobs", "fwd+bwd", "a", "rlkernels-cuda", 2.0),
            _row("entropy", "fwd", "a", "rlkernels-cuda", 0.5),
            _row("entropy", "fwd", "a", "rlkernels-triton", 0.6),
            _row("entropy", "fwd", "a", "torch-naive", 0.1),  # not a backend: no vote
            _row("gae", "fwd", "b", "rlkernels-triton", 1.0),
            _row("gae", "fwd", "b", "rlkernels-cuda", 0.5)]
    # token_logprobs (entropy dispatches to it too): cuda 2 votes, triton 1
    table = gpu_ingest.auto_table(rows, [], "cuda")
    assert table == {("token_logprobs", "cuda"): "cuda", ("gae", "cuda"): "cuda"}
    parity = [{"dispatch": "advantage/gae", "backend": "cuda", "status": "FAIL"},
              {"dispatch": "vocab/token_logprobs", "backend": "cuda", "status": "error"}]
    table = gpu_ingest.auto_table(rows, parity, "cuda")
    assert table == {("token_logprobs", "cuda"): "triton", ("gae", "cuda"): "triton"}
    assert gpu_ingest.auto_table([], [], "cuda") == {}


def test_backends_load_the_ingested_table(monkeypatch):
    fake = types.ModuleType("rlkernels._auto_table")
    fake.TABLE = {("token_logprobs", "cuda"): "cuda", ("gae", "cuda"): "no-such-backend"}
    monkeypatch.setitem(sys.modules, "rlkernels._auto_table", fake)
    assert backends._load_auto_table() == {("token_logprobs", "cuda"): "cuda"}
    monkeypatch.setitem(sys.modules, "rlkernels._auto_table", None)  # no table: no claim
    assert backends._load_auto_table() == {}


def test_sanitize_driver_reaches_every_binding_through_a_launcher():
    names = gpu_sanitize.entry_points()
    assert "token_logprobs_forward" in names and "version" not in names
    launchers = "".join(p.read_text() for p in (ROOT / "rlkernels" / "cuda").glob("*.py"))
    unreachable = [n for n in names if f"C.{n}(" not in launchers]
    assert not unreachable, f"_C entry points no launcher calls: {unreachable}"
    out = subprocess.run([sys.executable, str(BENCH / "gpu_sanitize.py"), "--list"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith(f"{len(names)} launch entry points")


def test_prepare_check_prints_a_short_command_and_a_carry_under_64_mib():
    out = subprocess.run(["bash", str(BENCH / "gpu_prepare.sh"), "--check"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    n = int(re.search(r"one command, (\d+) characters", out.stdout).group(1))
    assert n < 2000
    mib = float(re.search(r"= ([0-9.]+) MiB of 64 MiB", out.stdout).group(1))
    assert mib < 64
    assert 'carry:     [".gpu"]' in out.stdout and "gpu_check.sh" in out.stdout
