"""The ``idefender-gpu`` command.

Subcommands
-----------
bench
    Batched EM against scikit-learn (NumPy and array-API) and torchgmm on the named
    workloads of :data:`idefender_gpu.bench.WORKLOADS`: JSON records in a fresh
    ``results/bench-<UTC time>/`` (``--out`` to choose) and a markdown table; see
    :mod:`idefender_gpu.bench.cli`.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``idefender-gpu`` command."""
    parser = argparse.ArgumentParser(prog="idefender-gpu", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    from idefender_gpu.bench.cli import register as register_bench

    register_bench(sub)
    from idefender_gpu.experiments.cli import register as register_reproduce

    register_reproduce(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``idefender-gpu`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
