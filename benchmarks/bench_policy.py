"""Benchmarks of the policy ops: `rlkernels bench --op <the policy ops>` (see rlkernels/_bench).

    python benchmarks/bench_policy.py [--peers] [--out DIR] [--quick | --full] [--budget-s S]
"""

import sys

from rlkernels.cli import bench_family

if __name__ == "__main__":
    sys.exit(bench_family("policy"))
