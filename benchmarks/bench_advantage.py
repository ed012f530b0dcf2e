"""Benchmarks of the advantage ops: `rlkernels bench --op <the advantage ops>` (see rlkernels/_bench).

    python benchmarks/bench_advantage.py [--peers] [--out DIR] [--quick | --full] [--budget-s S]
"""

import sys

from rlkernels.cli import bench_family

if __name__ == "__main__":
    sys.exit(bench_family("advantage"))
