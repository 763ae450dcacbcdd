"""Batched full-covariance EM against scikit-learn (issue 3's first benchmark).

Usage::

    python benchmarks/bench_em.py                 # 60000x128, G=10, K=5, float32
    python benchmarks/bench_em.py --workload b    # a named workload (a, b, c1, c2, d-diag, d-full, all)
    python benchmarks/bench_em.py --table         # README table from benchmarks/results/

Same as ``idefender-gpu bench``; see :mod:`idefender_gpu.bench` for the method.
"""

import sys

from idefender_gpu.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
