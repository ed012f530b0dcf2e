"""Turn the files a GPU check returned into committed results and ``auto``'s table.

    python benchmarks/gpu_ingest.py DIR            # DIR: the reply's files_at (env.json, ...)

Reads what ``benchmarks/gpu_check.sh`` left in ``$OUT`` (``env.json``, ``bench.csv``,
``parity.csv``, ``summary.md``, ``trainer.json``; any may be missing after a cut) and writes:

* ``benchmarks/results/<gpu>/<date>.csv`` (the benchmark rows), ``<date>.md`` (the check's
  summary, parity failures, benchmark tables, trainer table), ``<date>-summary.md``,
  ``<date>-parity.csv``, ``<date>-trainer.json`` and ``<date>-<op>.png`` (with matplotlib);
* the latest tables in ``benchmarks/results/README.md`` and the summary table of the top
  ``README.md`` (between their ``<!-- gpu-results:start -->`` / ``end`` markers);
* ``rlkernels/_auto_table.py``: per dispatched op, the backend ``auto`` picks on this device
  type, by the rule of :func:`auto_table` ("no benchmark, no claim").

A dry run's files (``GPU_CHECK_DRY=1``, CPU) are refused unless ``--allow-dry`` (tests).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_bench's presets
START, END = "<!-- gpu-results:start -->", "<!-- gpu-results:end -->"
CANDIDATES = ("triton", "cuda", "torch")  # preference order on a tie (DESIGN section 3)


def _num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return x


def read_csv(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def bench_rows(path: str) -> List[dict]:
    """The benchmark CSV with numbers as floats (what rlkernels._bench.runner's tables take)."""
    rows = read_csv(path)
    for r in rows:
        r["value"], r["roofline_pct"] = _num(r.get("value")), _num(r.get("roofline_pct"))
    return rows


def auto_table(rows: List[dict], parity: List[dict],
               device_type: str) -> Dict[Tuple[str, str], str]:
    """``{(op, device_type): backend}`` from the measured rows.

    For each op the dispatcher knows (the bench cases' ``backend_op``), every measured cell
    (bench op, mode, shape) where at least one rlkernels backend has a median votes for its
    fastest backend; the op goes to the backend with most votes (ties: triton, cuda, torch).
    A backend with a FAIL or error line for that op in the parity sweep gets no votes. An op
    without a measurement gets no entry, so ``auto`` keeps its default for it.
    """
    from rlkernels._bench import cases

    bad = {(p["dispatch"].split("/")[-1], p["backend"]) for p in parity
           if p.get("status") in ("FAIL", "error") and p.get("dispatch")}
    cells: Dict[tuple, Dict[str, float]] = defaultdict(dict)
    for r in rows:
        spec = cases.OPS.get(r.get("op", ""))
        prov = r.get("provider", "")
        if spec is None or r.get("metric") != "median_ms" or r.get("status") != "ok" \
                or not prov.startswith("rlkernels-"):
            continue
        backend = prov[len("rlkernels-"):]
        if backend not in CANDIDATES or (spec.backend_op, backend) in bad:
            continue
        if isinstance(r["value"], float):
            cells[(spec.backend_op, r["op"], r["mode"], r["shape"])][backend] = r["value"]
    votes: Dict[str, Counter] = defaultdict(Counter)
    for (op, *_), times in cells.items():
        votes[op][min(times, key=lambda b: (times[b], CANDIDATES.index(b)))] += 1
    return {(op, device_type): max(v, key=lambda b: (v[b], -CANDIDATES.index(b)))
            for op, v in votes.items()}


def write_auto_table(table: Dict[Tuple[str, str], str], path: str, source: str) -> None:
    lines = ['"""Fastest backend per op and device type, for ``backend="auto"``',
             "(rlkernels/backends.py). Written by benchmarks/gpu_ingest.py from",
             f"{source}; regenerate, do not edit.", '"""', "", "TABLE = {"]
    lines += [f"    ({op!r}, {dev!r}): {b!r}," for (op, dev), b in sorted(table.items())]
    lines += ["}", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def replace_between(path: str, text: str) -> bool:
    """Replace what is between the gpu-results markers of ``path``; False without them."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        doc = f.read()
    if START not in doc or END not in doc:
        return False
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{START}\n{text.rstrip()}\n{END}{tail}")
    return True


def _stamp(out_dir: str, date: str) -> str:
    stamp, i = date, 2
    while os.path.exists(os.path.join(out_dir, f"{stamp}.csv")):
        stamp, i = f"{date}-{i}", i + 1
    return stamp


def parity_section(parity: List[dict]) -> str:
    if not parity:
        return "Parity sweep: no lines (not run, or cut before its first case).\n"
    count = Counter(p["status"].split(":")[0] for p in parity)
    lines = ["Parity sweep vs the fp64 reference: " + ", ".join(
        f"{n} {s}" for s, n in sorted(count.items())) + ".", ""]
    bad = [p for p in parity if p["status"] in ("FAIL", "error")]
    if bad:
        lines += ["| case | backend | dtype | status | max abs | max rel | grad err (tol) | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {p['case']} | {p['backend']} | {p['dtype']} | {p['status']} | "
                  f"{p['out_abs']} | {p['out_rel']} | {p['grad_err']} ({p['grad_tol']}) | "
                  f"{p['note'][:120]} |" for p in bad]
    return "\n".join(lines) + "\n"


def trainer_section(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        rows = json.load(f)
    lines = ["| trainer config | peak memory (GiB) | step (s) | update (s) | tokens/s |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['config']} | {r['peak_mem_gb']:.2f} | {r['time_s']:.3f} | "
                         f"{r['update_s']:.3f} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def ingest(src: str, results: str, readme: Optional[str], auto_path: Optional[str],
           allow_dry: bool = False, log=print) -> Dict[str, object]:
    from rlkernels._bench import runner
    from rlkernels._bench.roofline import Roofline

    env_path = os.path.join(src, "env.json")
    if not os.path.exists(env_path):
        raise SystemExit(f"{env_path} is missing: the check was cut before its first step "
                         "(summary.md says how far it got)")
    with open(env_path) as f:
        env = json.load(f)
    if env.get("dry") and not allow_dry:
        raise SystemExit(f"{src} holds a dry run (CPU rehearsal): nothing to ingest; "
                         "--allow-dry to write it anyway")
    out_dir = os.path.join(results, env["device_slug"])
    os.makedirs(out_dir, exist_ok=True)
    stamp = _stamp(out_dir, env["date"][:10])
    rows = bench_rows(os.path.join(src, "bench.csv"))
    parity = read_csv(os.path.join(src, "parity.csv"))
    written = []

    def put(name: str, text: str) -> None:
        path = os.path.join(out_dir, name)
        with open(path, "w") as f:
            f.write(text)
        written.append(path)

    if rows:
        shutil.copy(os.path.join(src, "bench.csv"), os.path.join(out_dir, f"{stamp}.csv"))
        written.append(os.path.join(out_dir, f"{stamp}.csv"))
    for name, dest in (("parity.csv", f"{stamp}-parity.csv"),
                       ("trainer.json", f"{stamp}-trainer.json")):
        if os.path.exists(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out_dir, dest))
            written.append(os.path.join(out_dir, dest))
    c = env["ceilings"]
    roof = Roofline(env["device_type"], c["copy_bytes"], c["copy_gbps"], c["gemm_n"],
                    c["gemm_dtype"], c["gemm_tflops"])
    meta = {k: env.get(k, "") for k in ("date", "device", "torch", "triton", "rlkernels",
                                        "commit")}
    check = ""
    if os.path.exists(os.path.join(src, "summary.md")):
        with open(os.path.join(src, "summary.md")) as f:
            check = f.read().split("\n", 1)[-1].strip() + "\n"
    # the top-line summary is the headline preset's shapes (the grid's come after them)
    from gpu_bench import DRY_HEADLINE, HEADLINE
    from rlkernels._bench.cases import shape_label
    head = {(op, shape_label(s)) for op, s in (DRY_HEADLINE if env.get("dry") else
                                               HEADLINE).items()}
    head_rows = [r for r in rows if (r["op"], r["shape"]) in head]
    summary = (runner.summary(head_rows, meta, f"{stamp}.md") if head_rows else
               "No headline benchmark rows.\n")
    put(f"{stamp}-summary.md", summary)
    put(f"{stamp}.md", f"# rlkernels GPU check, {env['device']}, {env['date']}\n\n"
        f"{check}\n{parity_section(parity)}\n{trainer_section(os.path.join(src, 'trainer.json'))}"
        f"\n{runner.markdown(rows, meta, roof) if rows else ''}\n")
    pngs = runner.plot(rows, out_dir, stamp) if rows else []
    if rows and not pngs:
        log("warning: no PNG plots (matplotlib is not importable here: pip install matplotlib)")
    written += pngs
    rel = os.path.relpath(os.path.join(out_dir, f"{stamp}.md"), os.path.dirname(
        os.path.abspath(readme)) if readme else ROOT)
    table_text = summary + f"\nCheck, parity and all tables: [{rel}]({rel}).\n"
    if not replace_between(os.path.join(results, "README.md"), summary +
                           f"\nFull tables: [{env['device_slug']}/{stamp}.md]"
                           f"({env['device_slug']}/{stamp}.md).\n"):
        log(f"warning: {results}/README.md has no {START} markers; not updated")
    if readme and not replace_between(readme, table_text):
        log(f"warning: {readme} has no {START} markers; not updated")
    table = auto_table(rows, parity, env["device_type"])
    if auto_path:
        write_auto_table(table, auto_path, f"{os.path.relpath(out_dir, ROOT)}/{stamp}.csv "
                         f"({env['device']}, {env['date']})")
    for p in written:
        log(f"wrote {p}")
    log("auto: " + (", ".join(f"{op} -> {b}" for (op, _), b in sorted(table.items()))
                    or "no rlkernels backend measured: table left empty"))
    return {"dir": out_dir, "stamp": stamp, "written": written, "auto": table}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="the folder the device call returned ($OUT's files)")
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--auto-table", default=os.path.join(ROOT, "rlkernels", "_auto_table.py"))
    ap.add_argument("--allow-dry", action="store_true", help="ingest a CPU rehearsal (tests)")
    args = ap.parse_args(argv)
    ingest(args.src, args.results, args.readme, args.auto_table, allow_dry=args.allow_dry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
