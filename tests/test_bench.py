"""The benchmark harness (``rlkernels bench``) on CPU at tiny shapes: files, columns,
providers, skipped peers, roofline, timing helper. The numbers themselves mean nothing on CPU."""

import csv
import math
import os

import pytest
import torch

from rlkernels._bench import cases, providers, run_bench, timing
from rlkernels._bench.runner import COLUMNS
from rlkernels.cli import main

FAST = "rlkernels-torch,torch-naive,trl,verl,flash-attn,liger,cce"


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_bench_writes_csv_md(tmp_path, capsys):
    assert main(["bench", "--op", "token_logprobs", "--quick", "--out", str(tmp_path),
                 "--providers", FAST, "--no-plots"]) == 0
    csvs = [p for p in os.listdir(tmp_path) if p.endswith(".csv")]
    mds = [p for p in os.listdir(tmp_path) if p.endswith(".md")]
    assert len(csvs) == 1 and len(mds) == 2  # tables + summary
    rows = _rows(tmp_path / csvs[0])
    assert list(rows[0].keys()) == COLUMNS
    ok = {r["provider"] for r in rows if r["op"] == "token_logprobs"
          and r["metric"] == "median_ms" and r["status"] == "ok"}
    assert {"torch-naive", "rlkernels-torch"} <= ok
    for r in rows:
        if r["metric"] == "median_ms":
            assert 0 < float(r["value"]) < math.inf and float(r["roofline_pct"]) > 0
            assert r["device"] and r["torch"] == torch.__version__ and r["commit"]
    # peers that are not installed: one "skipped: <reason>" row each, no crash
    for peer in ("trl", "verl", "flash-attn", "cce"):
        st = [r["status"] for r in rows if r["provider"] == peer]
        if st and not any(s == "ok" for s in st):
            assert all(s.startswith("skipped: ") and len(s) > 10 for s in st)
    table = open(tmp_path / next(m for m in mds if not m.endswith("-summary.md"))).read()
    assert "### token_logprobs" in table and "| shape |" in table
    assert "rlkernels bench" in capsys.readouterr().out


def test_python_api_all_ops_and_roofline(tmp_path):
    res = run_bench(None, peers=True, out=str(tmp_path), quick=True,
                    providers=["rlkernels-torch", "torch-naive", "liger", "trl"],
                    shapes={op: cases.OPS[op].quick[:1] for op in cases.OPS}, plots=False,
                    log=lambda *_: None)
    roof = res["roofline"]
    assert 0 < roof.copy_gbps < math.inf and 0 < roof.gemm_tflops < math.inf
    rows = res["rows"]
    for op in cases.OPS:
        for mode in cases.OPS[op].modes:
            got = {r["provider"]: r for r in rows if r["op"] == op and r["mode"] == mode
                   and r["metric"] == "median_ms"}
            assert {"rlkernels-torch", "torch-naive"} <= set(got), (op, mode)
            assert all(r["value"] > 0 and r["roofline_pct"] > 0 for r in got.values())
    # the naive and the rlkernels forward agree (the harness compares them)
    errs = [r["value"] for r in rows if r["metric"] == "max_abs_err_vs_naive"
            and r["provider"] == "rlkernels-torch" and r["value"] != "n/a"]
    assert errs and max(errs) < 1e-3
    assert open(res["summary"]).read().count("|") > 10


def test_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    res = run_bench(["group_advantages"], out=str(tmp_path), quick=True,
                    providers=["torch-naive"], log=lambda *_: None)
    assert res["plots"] and os.path.getsize(res["plots"][0]) > 1000


def test_timing_quantiles_ordered():
    x = torch.randn(1000)
    t = timing.measure(lambda i: x.exp(), 2, device="cpu", warmup_ms=1, rep_ms=5)
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms and t.peak_mem_mib is None
    assert t.row()["peak_mem_mib"] == "n/a"
    assert timing.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert timing.n_rotating(torch.device("cpu"), 10**9) == 2


def test_floors_formulas():
    s = {"N": 4096, "V": 32000}
    tl = cases.OPS["token_logprobs"].min_bytes
    assert tl(s, "fwd+bwd", 2) > 3 * 4096 * 32000 * 2 > tl(s, "fwd", 2) > 4096 * 32000 * 2
    kl = cases.OPS["kl_divergence"].min_bytes
    assert kl(s, "fwd", 2) >= 2 * 4096 * 32000 * 2
    lin = cases.OPS["linear_token_logprobs"].flops
    s = {"N": 4096, "H": 2048, "V": 32000}
    assert lin(s, "fwd+bwd") == 3 * lin(s, "fwd") == 6 * 4096 * 2048 * 32000


def test_unknown_provider_and_op_raise(tmp_path):
    with pytest.raises(ValueError, match="providers"):
        providers.providers(["nope"])
    with pytest.raises(ValueError, match="op"):
        run_bench(["nope"], out=str(tmp_path))


def test_default_out_dir_and_summary_link(tmp_path, monkeypatch, capsys):
    """Without --out the files go to rlkernels-bench/<device>/ under the current directory
    (no benchmarks/results/ tree created in a stranger's folder), and the summary names a
    tables file that exists next to it."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--op", "group_advantages", "--quick", "--providers", "torch-naive",
                 "--modes", "fwd", "--no-plots"]) == 0
    assert os.listdir(tmp_path) == ["rlkernels-bench"]
    out_dir = tmp_path / "rlkernels-bench" / "cpu"
    files = sorted(os.listdir(out_dir))
    summaries = [f for f in files if f.endswith("-summary.md")]
    assert len(files) == 3 and len(summaries) == 1
    tables = summaries[0].replace("-summary.md", ".md")
    assert tables in files
    text = open(out_dir / summaries[0]).read()
    assert f"full tables in {tables}, next to this file" in text
    assert "benchmarks/results" not in text
    assert f"wrote into {out_dir}: " in capsys.readouterr().out
