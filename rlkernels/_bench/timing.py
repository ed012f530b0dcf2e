"""Timing: median with p20 and p80 over many calls, after warm-up, on rotating inputs.

On CUDA every call is bracketed by CUDA events (no host clock, no sync between calls); on CPU
by ``time.perf_counter``. The function under test receives the index of the input copy to
use, so callers can rotate over several input sets whose total size exceeds the L2 cache
(else repeated calls over one buffer would time the cache, not device memory).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    n: int
    peak_mem_mib: Optional[float]  # None on CPU ("n/a")

    def row(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "peak_mem_mib": "n/a" if self.peak_mem_mib is None else self.peak_mem_mib}


def quantile(values: List[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), ``0 <= q <= 1``."""
    if not values:
        raise ValueError("quantile: expected at least one value, got none")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def l2_bytes(device: torch.device) -> int:
    """L2 size of a CUDA device (0 on CPU or when torch does not report it)."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or getattr(props, "l2_cache_size", 0) or 0)


def n_rotating(device: torch.device, bytes_per_input: int, budget_bytes: Optional[int] = None
               ) -> int:
    """How many input copies to rotate over: together more than 3x the L2 cache on CUDA
    (at least 2, at most 64, and no more than ``budget_bytes`` in total when given);
    2 on CPU."""
    if device.type != "cuda":
        return 2
    n = max(2, math.ceil(3 * l2_bytes(device) / max(1, bytes_per_input)))
    n = min(n, 64)
    if budget_bytes is not None:
        n = min(n, max(1, budget_bytes // max(1, bytes_per_input)))
    return max(1, n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[int], object], n_inputs: int = 1, *, device=None,
            warmup_ms: float = 25.0, rep_ms: float = 100.0, min_rep: int = 5,
            max_rep: int = 1000, memory: bool = True) -> Timing:
    """Time ``fn(i)`` (``i`` = index of the input copy, rotating over ``n_inputs``).

    One untimed call first (compilation, autotuning, handle creation), then warm-up for at
    least ``warmup_ms`` (and 2 calls), then ``clamp(rep_ms / estimate, min_rep, max_rep)``
    timed calls. Returns median / p20 / p80 in milliseconds and, on CUDA, the peak memory
    allocated by one call above what was allocated before it (MiB).
    """
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    n_inputs = max(1, int(n_inputs))
    fn(0)
    _sync(device)
    # warm-up, also gives the per-call estimate
    start = time.perf_counter()
    calls = 0
    while True:
        fn(calls % n_inputs)
        calls += 1
        if calls >= 2:
            _sync(device)
            elapsed = (time.perf_counter() - start) * 1e3
            if elapsed >= warmup_ms or calls >= max_rep:
                break
    estimate = max(elapsed / calls, 1e-6)
    n_rep = int(min(max_rep, max(min_rep, rep_ms / estimate)))

    times: List[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            starts[i].record()
            fn((calls + i) % n_inputs)
            ends[i].record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(n_rep):
            t0 = time.perf_counter()
            fn((calls + i) % n_inputs)
            times.append((time.perf_counter() - t0) * 1e3)

    peak = None
    if memory and device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn(0)
        torch.cuda.synchronize(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        del out
    return Timing(quantile(times, 0.5), quantile(times, 0.2), quantile(times, 0.8), n_rep, peak)
