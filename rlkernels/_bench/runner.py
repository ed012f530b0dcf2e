"""Run ops x shapes x modes x providers; write the CSV, markdown tables and PNG plots.

    rlkernels bench [--op OP ...] [--peers] [--out DIR] [--quick] [--providers a,b]
                    [--modes fwd,fwd+bwd] [--budget-s S]

Output files, named by the UTC time of the run (``STAMP`` = ``YYYY-MM-DD_HHMMSS``), in ``DIR``
(default ``rlkernels-bench/<gpu-or-cpu>/`` under the current directory):

* ``DIR/STAMP.csv``: one row per (op, mode, shape, provider, metric), with the device,
  torch / triton / rlkernels versions, git commit and date on every row;
* ``DIR/STAMP.md``: one table per op and mode (rows shapes, columns providers, cells
  ``median ms (% of roofline)``), the skipped providers with their reasons;
* ``DIR/STAMP-summary.md``: one line per op at its largest shape (for a README), pointing to
  ``STAMP.md`` for the full tables;
* ``DIR/STAMP-<op>.png``: median time per provider and shape (when matplotlib imports).
"""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import cases, providers as prov
from .roofline import Roofline, measure_roofline
from .timing import measure, n_rotating

COLUMNS = ["date", "device", "torch", "triton", "rlkernels", "commit", "op", "mode", "shape",
           "dtype", "provider", "status", "metric", "value", "unit", "roofline_pct"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=here, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:
        pass
    return "unknown"


def versions() -> Dict[str, str]:
    import rlkernels
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "not installed"
    return {"torch": torch.__version__, "triton": tv, "rlkernels": rlkernels.__version__}


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _max_abs_err(out, ref) -> Optional[float]:
    a, r = _tensors(out), _tensors(ref)
    if not a or not r or a[0].shape != r[0].shape:
        return None
    a, r = a[0].detach().double(), r[0].detach().double()
    both = torch.isfinite(a) & torch.isfinite(r)
    if not bool((torch.isfinite(a) == torch.isfinite(r)).all()):
        return float("inf")
    return float((a[both] - r[both]).abs().max()) if bool(both.any()) else 0.0


def _caller(spec: cases.OpSpec, fn, inputs: List[dict], shape: dict, mode: str):
    if mode == "fwd":
        def call(i):
            with torch.no_grad():
                return fn(inputs[i], shape)
        return call

    def call(i):
        d = inputs[i]
        outs = [t for t in _tensors(fn(d, shape)) if t.requires_grad]
        if not outs:
            raise RuntimeError("no output depends on the differentiable inputs")
        grads = torch.autograd.grad(outs, [d[k] for k in spec.grad],
                                    grad_outputs=[torch.ones_like(t) for t in outs],
                                    allow_unused=True)
        if all(g is None for g in grads):
            raise RuntimeError("backward produced no gradient")
        return grads
    return call


def _short(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:200]}"


class Bench:
    def __init__(self, device, dtype, quick: bool, roof: Roofline, meta: dict,
                 log=print, mem_budget_frac: float = 0.25):
        self.device, self.dtype, self.quick, self.roof = device, dtype, quick, roof
        self.meta, self.log = meta, log
        self.rows: List[dict] = []
        self.mem_budget_frac = mem_budget_frac

    def add(self, op, mode, shape, provider, status, metric="", value="", unit="", pct=""):
        self.rows.append({**self.meta, "op": op, "mode": mode, "shape": shape,
                          "dtype": str(self.dtype).replace("torch.", ""), "provider": provider,
                          "status": status, "metric": metric, "value": value, "unit": unit,
                          "roofline_pct": pct})

    def _inputs(self, spec, shape):
        gen = torch.Generator(device=self.device).manual_seed(0)
        first = spec.make(shape, self.device, self.dtype, gen)
        nbytes = sum(t.numel() * t.element_size() for t in first.values())
        budget = None
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.mem_budget_frac)
        n = n_rotating(self.device, nbytes, budget)
        return [first] + [spec.make(shape, self.device, self.dtype, gen) for _ in range(n - 1)]

    def run_op(self, op: str, plist: Sequence[prov.Provider], modes: Sequence[str],
               deadline: float, shapes: Optional[List[dict]] = None):
        spec = cases.OPS[op]
        b = torch.tensor([], dtype=self.dtype).element_size()
        fns, reasons = {}, {}
        for p in plist:
            try:
                fns[p.name] = p.build(op)
            except prov.Skip as exc:
                reasons[p.name] = str(exc)
            except Exception as exc:  # a peer that breaks on import-time setup
                reasons[p.name] = f"build failed ({_short(exc)})"
        for name, why in reasons.items():
            self.add(op, "", "", name, f"skipped: {why}")
            self.log(f"  {op:24} {name:17} skipped: {why}")
        for shape in (shapes if shapes is not None else cases.shapes(op, self.quick)):
            label = cases.shape_label(shape)
            if time.monotonic() > deadline:
                for m in modes:
                    for name in fns:
                        self.add(op, m, label, name, "skipped: time budget")
                self.log(f"  {op:24} {label:24} skipped: time budget")
                continue
            try:
                inputs = self._inputs(spec, shape)
            except Exception as exc:
                for name in fns:
                    self.add(op, "", label, name, f"error: inputs: {_short(exc)}")
                self.log(f"  {op:24} {label:24} inputs failed: {_short(exc)}")
                self._free()
                continue
            try:
                with torch.no_grad():
                    ref = prov.NAIVE[op](inputs[0], shape)
            except Exception:
                ref = None
            self._free()
            for mode in modes:
                if mode not in spec.modes:
                    continue
                for d in inputs:
                    for k in spec.grad:
                        d[k].requires_grad_(mode == "fwd+bwd")
                min_bytes = spec.min_bytes(shape, mode, b)
                flops = spec.flops(shape, mode)
                floor = self.roof.floor_ms(min_bytes, flops)
                self.add(op, mode, label, "_floor", "ok", "floor_ms", floor, "ms")
                for name, fn in fns.items():
                    kind = prov.BY_NAME[name].kind if name in prov.BY_NAME else "peer"
                    if time.monotonic() > deadline:
                        self.add(op, mode, label, name, "skipped: time budget")
                        continue
                    self._measure_one(spec, op, mode, label, shape, name, kind, fn, inputs,
                                      ref, min_bytes, flops)
            del inputs, ref
            self._free()

    def _measure_one(self, spec, op, mode, label, shape, name, kind, fn, inputs, ref,
                     min_bytes, flops):
        call = _caller(spec, fn, inputs, shape, mode)
        err = None
        try:
            if mode == "fwd" and ref is not None:
                err = _max_abs_err(call(0), ref)
            t = measure(call, len(inputs), device=self.device,
                        warmup_ms=10 if self.quick else 25, rep_ms=30 if self.quick else 100,
                        max_rep=100 if self.quick else 1000)
        except Exception as exc:
            oom = isinstance(exc, torch.cuda.OutOfMemoryError) if hasattr(
                torch.cuda, "OutOfMemoryError") else False
            status = ("error: out of memory" if oom else
                      f"skipped: call failed ({_short(exc)})" if kind == "peer" else
                      f"error: {_short(exc)}")
            self.add(op, mode, label, name, status)
            self.log(f"  {op:24} {mode:8} {label:24} {name:17} {status}")
            self._free()
            return
        # 3 significant digits, not 2 decimals: a slow provider on a tiny CPU shape stays > 0
        pct = float(f"{self.roof.pct(min_bytes, flops, t.median_ms):.3g}")
        add = lambda metric, value, unit: self.add(op, mode, label, name, "ok", metric, value,
                                                    unit, pct)
        add("median_ms", t.median_ms, "ms")
        add("p20_ms", t.p20_ms, "ms")
        add("p80_ms", t.p80_ms, "ms")
        add("peak_mem_mib", "n/a" if t.peak_mem_mib is None else t.peak_mem_mib, "MiB")
        add("gbps", min_bytes / (t.median_ms * 1e-3) / 1e9, "GB/s")
        if flops:
            add("tflops", flops / (t.median_ms * 1e-3) / 1e12, "TFLOP/s")
        add("max_abs_err_vs_naive", "n/a" if err is None else err, "")
        mem = "n/a" if t.peak_mem_mib is None else f"{t.peak_mem_mib:.0f} MiB"
        self.log(f"  {op:24} {mode:8} {label:24} {name:17} {t.median_ms:9.3f} ms "
                 f"[{t.p20_ms:.3f}, {t.p80_ms:.3f}] {pct:6.1f}% roofline  peak {mem}"
                 + (f"  err {err:.2e}" if isinstance(err, float) else ""))

    def _free(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---- output -----------------------------------------------------------------------------

def write_csv(rows: List[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def markdown(rows: List[dict], meta: dict, roof: Roofline) -> str:
    lines = [f"Run {meta['date']} on **{meta['device']}**; torch {meta['torch']}, triton "
             f"{meta['triton']}, rlkernels {meta['rlkernels']}, commit `{meta['commit']}`.",
             "",
             f"Roofline measured in this run: copy {roof.copy_gbps:.0f} GB/s (read + write, "
             f"{roof.copy_bytes / 2**20:.0f} MiB buffer), GEMM {roof.gemm_tflops:.1f} TFLOP/s "
             f"({roof.gemm_dtype} {roof.gemm_n}^3). Cells: median ms (% of roofline); "
             "p20/p80, peak memory and errors vs torch-naive are in the CSV.", ""]
    ops = [o for o in cases.OPS if any(r["op"] == o for r in rows)]
    for op in ops:
        spec = cases.OPS[op]
        lines += [f"### {op}" + (f" ({spec.note})" if spec.note else ""), ""]
        op_rows = [r for r in rows if r["op"] == op]
        for mode in spec.modes:
            ok = [r for r in op_rows if r["mode"] == mode and r["metric"] == "median_ms"
                  and r["provider"] != "_floor"]
            if not ok and not any(r["mode"] == mode for r in op_rows):
                continue
            provs = list(dict.fromkeys(r["provider"] for r in op_rows
                                       if r["mode"] == mode and r["provider"] != "_floor"))
            shapes = list(dict.fromkeys(r["shape"] for r in op_rows
                                        if r["mode"] == mode and r["shape"]))
            if not provs or not shapes:
                continue
            lines += [f"**{mode}**", "",
                      "| shape | floor ms | " + " | ".join(provs) + " |",
                      "| --- | --- | " + " | ".join("---" for _ in provs) + " |"]
            for s in shapes:
                floor = next((r["value"] for r in op_rows if r["mode"] == mode and
                              r["shape"] == s and r["metric"] == "floor_ms"), None)
                cells = []
                for p in provs:
                    hit = [r for r in op_rows if r["mode"] == mode and r["shape"] == s
                           and r["provider"] == p]
                    med = next((r for r in hit if r["metric"] == "median_ms"), None)
                    if med is not None:
                        cells.append(f"{_fmt_ms(med['value'])} ({med['roofline_pct']:.0f}%)")
                    elif hit:
                        st = hit[0]["status"]
                        cells.append("budget" if "time budget" in st else
                                     "OOM" if "out of memory" in st else
                                     "skip" if st.startswith("skipped") else "error")
                    else:
                        cells.append("—")
                lines.append(f"| {s} | {'' if floor is None else _fmt_ms(floor)} | "
                             + " | ".join(cells) + " |")
            lines.append("")
        notes = list(dict.fromkeys(f"{r['provider']}: {r['status']}" for r in op_rows
                                   if r["status"] not in ("ok",) and
                                   "time budget" not in r["status"]))
        if notes:
            lines += ["Not measured:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def summary(rows: List[dict], meta: dict, tables: str) -> str:
    """One line per op and mode at the largest measured shape: best rlkernels provider vs
    torch-naive and the best peer (median ms, % roofline). ``tables``: the name of the file
    with the full tables, written next to the summary."""
    lines = [f"Benchmarks ({meta['date'][:10]}, {meta['device']}, median ms and % of the "
             f"measured roofline at the largest shape; full tables in {tables}, next to "
             "this file):", "",
             "| op | mode | shape | rlkernels (best) | torch naive | torch.compile | best peer |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    med = [r for r in rows if r["metric"] == "median_ms" and r["status"] == "ok"
           and r["provider"] != "_floor"]
    for op in cases.OPS:
        for mode in cases.MODES:
            mine = [r for r in med if r["op"] == op and r["mode"] == mode]
            if not mine:
                continue
            shape = mine[-1]["shape"]
            at = [r for r in mine if r["shape"] == shape]

            def best(pred):
                c = [r for r in at if pred(r["provider"])]
                if not c:
                    return "—"
                r = min(c, key=lambda r: r["value"])
                return f"{_fmt_ms(r['value'])} ({r['roofline_pct']:.0f}%, {r['provider']})"
            peer_names = {p.name for p in prov.PROVIDERS if p.kind == "peer"}
            lines.append(f"| {op} | {mode} | {shape} | "
                         f"{best(lambda p: p.startswith('rlkernels-'))} | "
                         f"{best(lambda p: p == 'torch-naive')} | "
                         f"{best(lambda p: p == 'torch-compile')} | "
                         f"{best(lambda p: p in peer_names)} |")
    return "\n".join(lines) + "\n"


def plot(rows: List[dict], out_dir: str, stamp: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    paths = []
    med = [r for r in rows if r["metric"] == "median_ms" and r["status"] == "ok"
           and r["provider"] != "_floor"]
    for op in cases.OPS:
        op_rows = [r for r in med if r["op"] == op]
        if not op_rows:
            continue
        modes = [m for m in cases.MODES if any(r["mode"] == m for r in op_rows)]
        fig, axes = plt.subplots(len(modes), 1, figsize=(11, 3.8 * len(modes)), squeeze=False)
        for ax, mode in zip(axes[:, 0], modes):
            mr = [r for r in op_rows if r["mode"] == mode]
            shapes = list(dict.fromkeys(r["shape"] for r in mr))
            provs = list(dict.fromkeys(r["provider"] for r in mr))
            width = 0.8 / max(1, len(provs))
            for j, p in enumerate(provs):
                xs, ys = [], []
                for i, s in enumerate(shapes):
                    v = [r["value"] for r in mr if r["shape"] == s and r["provider"] == p]
                    if v:
                        xs.append(i + j * width - 0.4 + width / 2)
                        ys.append(v[0])
                ax.bar(xs, ys, width, label=p)
            floors = [next((r["value"] for r in rows if r["op"] == op and r["mode"] == mode
                            and r["shape"] == s and r["metric"] == "floor_ms"), math.nan)
                      for s in shapes]
            ax.plot(range(len(shapes)), floors, "k_", markersize=30, label="roofline floor")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=20, fontsize=7)
            ax.set_yscale("log")
            ax.set_ylabel("median ms (log)")
            ax.set_title(f"{op} {mode}")
            ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stamp}-{op}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def run_bench(ops: Optional[Sequence[str]] = None, *, peers: bool = False,
              out: Optional[str] = None, quick: Optional[bool] = None,
              providers: Optional[Sequence[str]] = None,
              modes: Optional[Sequence[str]] = None, device=None, dtype=None,
              budget_s: Optional[float] = None, plots: bool = True,
              shapes: Optional[Dict[str, List[dict]]] = None, log=print) -> Dict[str, object]:
    """Run the benchmarks; returns ``{"csv", "md", "summary", "plots", "rows", "roofline"}``.

    ``quick`` (default: True on CPU) uses the tiny shapes; ``budget_s`` bounds the whole run
    (each op gets an equal share of what is left; shapes past its share are recorded as
    ``skipped: time budget``); ``shapes`` overrides the grid per op.
    """
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = device.type != "cuda" if quick is None else quick
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ops = list(ops or cases.OPS)
    for op in ops:
        if op not in cases.OPS:
            raise ValueError(f"op: expected some of {', '.join(cases.OPS)}, got {op!r}")
    modes = list(modes or cases.MODES)
    for m in modes:
        if m not in cases.MODES:
            raise ValueError(f"modes: expected some of {cases.MODES}, got {m!r}")
    plist = prov.providers(list(providers) if providers else None, peers=peers)
    out = out or os.path.join("rlkernels-bench", device_slug(device))
    os.makedirs(out, exist_ok=True)
    start = time.monotonic()
    stamp = time.strftime("%Y-%m-%d_%H%M%S", time.gmtime())
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": device_name(device), "commit": git_commit(), **versions()}
    log(f"rlkernels bench: {meta['device']}, {'quick' if quick else 'full'} shapes, "
        f"{str(dtype).replace('torch.', '')}, ops {', '.join(ops)}")
    roof = measure_roofline(device, quick=quick)
    log(f"roofline: copy {roof.copy_gbps:.0f} GB/s, GEMM {roof.gemm_tflops:.1f} TFLOP/s")
    bench = Bench(device, dtype, quick, roof, meta, log=log)
    bench.add("_roofline", "", f"copy {roof.copy_bytes}B", "_device", "ok", "copy_gbps",
              roof.copy_gbps, "GB/s")
    bench.add("_roofline", "", f"gemm {roof.gemm_dtype} {roof.gemm_n}^3", "_device", "ok",
              "gemm_tflops", roof.gemm_tflops, "TFLOP/s")
    for i, op in enumerate(ops):
        t0 = time.monotonic()
        if budget_s is None:
            deadline = math.inf
        else:
            left = budget_s - (t0 - start)
            deadline = t0 + max(0.0, left) / (len(ops) - i)
        bench.run_op(op, plist, modes, deadline,
                     shapes=None if shapes is None else shapes.get(op))
        log(f"{op}: {time.monotonic() - t0:.1f} s")
    csv_path = os.path.join(out, f"{stamp}.csv")
    write_csv(bench.rows, csv_path)
    md_path = os.path.join(out, f"{stamp}.md")
    with open(md_path, "w") as f:
        f.write(f"# rlkernels bench, {meta['device']}\n\n" + markdown(bench.rows, meta, roof))
    sum_path = os.path.join(out, f"{stamp}-summary.md")
    with open(sum_path, "w") as f:
        f.write(summary(bench.rows, meta, os.path.basename(md_path)))
    pngs = plot(bench.rows, out, stamp) if plots else []
    names = ", ".join(os.path.basename(p) for p in (csv_path, md_path, sum_path))
    log(f"wrote into {os.path.abspath(out)}: {names}"
        + (f", {len(pngs)} plots" if pngs else
           " (no plots: matplotlib missing)" if plots else ""))
    log(f"total {time.monotonic() - start:.1f} s")
    return {"csv": csv_path, "md": md_path, "summary": sum_path, "plots": pngs,
            "rows": bench.rows, "roofline": roof}
