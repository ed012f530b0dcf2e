"""Benchmark harness behind ``rlkernels bench`` (SPEC section 4, DESIGN section 6).

Private: the modules here are the runner, not public API.

* :mod:`.timing`    median / p20 / p80 (CUDA events on GPU, ``perf_counter`` on CPU),
  warm-up, rotating inputs, peak memory delta.
* :mod:`.roofline`  copy bandwidth and bf16 GEMM rate measured in the same run; the minimal
  bytes / FLOPs of each op live with the op in :mod:`.cases`.
* :mod:`.cases`     ops, their input builders, shape grids (full GPU grid and ``--quick``).
* :mod:`.providers` who runs each op: rlkernels backends, naive torch, torch.compile, peers
  (each only when importable, otherwise listed as skipped with the reason).
* :mod:`.runner`    ops x shapes x modes x providers -> CSV, markdown tables, PNG plots.
"""

from .runner import run_bench  # noqa: F401

__all__ = ["run_bench"]
