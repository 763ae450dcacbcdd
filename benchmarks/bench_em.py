"""Batched EM against scikit-learn and torchgmm: the same as ``idefender-gpu bench``.

Usage::

    python benchmarks/bench_em.py                         # workload a, JSON in results/bench-<UTC time>/
    python benchmarks/bench_em.py --workload b            # a named workload (a, b, c1, c2, d-diag, d-full, all)
    python benchmarks/bench_em.py --out benchmarks/results   # rewrite the committed results (only when asked)
    python benchmarks/bench_em.py --table                 # README's table from benchmarks/results/

See :mod:`idefender_gpu.bench` for the method and ``idefender-gpu bench --help`` for the options.
"""

import sys

from idefender_gpu.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
