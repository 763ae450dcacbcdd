"""The ``idefender-gpu`` command.

Subcommands
-----------
bench
    Batched EM against scikit-learn (NumPy and array-API) on the same data and
    initialisation; prints the table and the speed-ups and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _bench(args: argparse.Namespace) -> int:
    from idefender_gpu.bench import format_table, run_em_benchmark

    out = Path(args.out)
    if args.table:
        records = [json.loads(p.read_text()) for p in sorted(out.glob("em_*.json"))]
        print(format_table(records))
        return 0
    references = ("sklearn_numpy",) + (() if args.no_array_api else ("sklearn_array_api",))
    record = run_em_benchmark(
        args.n, args.d, args.groups, args.k, iters=args.iters, repeats=args.repeats,
        device=args.device, references=references, seed=args.seed,
    )
    print(format_table([record]))
    for name, ratio in record["ratios"].items():
        print(f"{name}: {ratio:.2f}x")
    out.mkdir(parents=True, exist_ok=True)
    device = record["machine"]["device"].replace(":", "")
    path = out / f"em_{args.n}x{args.d}_G{args.groups}_K{args.k}_{device}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``idefender-gpu`` command."""
    parser = argparse.ArgumentParser(prog="idefender-gpu", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="EM benchmark against scikit-learn (JSON + table)")
    bench.add_argument("--n", type=int, default=60000, help="samples (default 60000)")
    bench.add_argument("--d", type=int, default=128, help="features (default 128)")
    bench.add_argument("--groups", type=int, default=10, help="mixtures G (default 10)")
    bench.add_argument("--k", type=int, default=5, help="components per mixture (default 5)")
    bench.add_argument("--iters", type=int, default=5, help="timed EM iterations (default 5)")
    bench.add_argument("--repeats", type=int, default=2, help="best of this many (default 2)")
    bench.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--no-array-api", action="store_true", help="skip scikit-learn's array-API reference")
    bench.add_argument("--out", default="benchmarks/results", help="JSON directory")
    bench.add_argument("--table", action="store_true", help="print the table of the JSON in --out and exit")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``idefender-gpu`` console script."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
