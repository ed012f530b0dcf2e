"""Benchmarks of the linear ops: `rlkernels bench --op <the linear ops>` (see rlkernels/_bench).

    python benchmarks/bench_linear.py [--peers] [--out DIR] [--quick | --full] [--budget-s S]
"""

import sys

from rlkernels._bench.runner import main_family

if __name__ == "__main__":
    sys.exit(main_family("linear"))
