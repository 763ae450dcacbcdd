"""The ``idefender-gpu`` command.

Subcommands
-----------
bench
    Batched EM against scikit-learn (NumPy and array-API) on the same data and
    initialisation; prints the table and the speed-ups and writes JSON. Without
    ``--workload``: workload (a), 60000x128, G=10, K=5, full, a fixed number of iterations.
    With ``--workload {a,b,c1,c2,d-diag,d-full,all}``: the named workloads of
    :data:`idefender_gpu.bench.WORKLOADS` with seconds per iteration, the fit to ``--tol``,
    peak memory, FLOP/s and the references (scikit-learn NumPy and array-API, torchgmm).
    ``--table`` prints every record in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

WORKLOAD_CHOICES = ("a", "b", "c1", "c2", "d-diag", "d-full", "all")


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _reexec(argv: list[str] | None, env_updates: dict[str, str]) -> None:
    """Start this command again with ``env_updates``: ``SCIPY_ARRAY_API`` (SciPy reads it on
    import, and importing this package already imports SciPy through scikit-learn) and the
    BLAS/OpenMP thread counts (read when those libraries load)."""
    env = dict(os.environ, **env_updates)
    args = sys.argv[1:] if argv is None else list(argv)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "idefender_gpu.cli", *args], env)


def _table(out: Path) -> int:
    from idefender_gpu.bench import format_records

    records = [json.loads(p.read_text()) for pattern in ("em_*.json", "workload_*.json", "backends_*.json")
               for p in sorted(out.glob(pattern))]
    print(format_records(records))
    return 0


def _bench_legacy(args: argparse.Namespace, out: Path) -> int:
    from idefender_gpu.bench import format_table, run_em_benchmark

    n, d = args.n or 60000, args.d or 128
    groups, k = args.groups or 10, args.k or 5
    references = ("sklearn_numpy",) + (() if args.no_array_api else ("sklearn_array_api",))
    record = run_em_benchmark(
        n, d, groups, k, iters=args.iters or 5, repeats=args.repeats or 2,
        device=args.device, references=references, seed=args.seed,
    )
    print(format_table([record]))
    for name, ratio in record["ratios"].items():
        print(f"{name}: {ratio:.2f}x")
    out.mkdir(parents=True, exist_ok=True)
    device = record["machine"]["device"].replace(":", "")
    path = out / f"em_{n}x{d}_G{groups}_K{k}_{device}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _bench_workloads(args: argparse.Namespace, out: Path) -> int:
    from idefender_gpu.bench import WORKLOADS, format_records, run_workload, scaled_workload

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("idefender_gpu.bench").setLevel(logging.INFO)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    if args.references is not None:
        references = tuple(r for r in args.references.split(",") if r)
    else:
        references = ("sklearn_numpy", "sklearn_array_api", "torchgmm")
    if args.no_array_api:
        references = tuple(r for r in references if r != "sklearn_array_api")
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for name in names:
        workload = scaled_workload(WORKLOADS[name], n_samples=args.n, n_features=args.d,
                                   n_groups=args.groups, n_components=args.k, scale=args.scale)
        record = run_workload(
            workload, references=references, device=args.device, iters=args.iters or 5,
            repeats=args.repeats or 2, tol=args.tol, max_iter=args.max_iter,
            limit_minutes=args.limit_min, group_block=args.group_block,
            memory_budget=args.memory_budget, seed=args.seed,
            allow_gpu_only_on_cpu=args.allow_gpu_only_on_cpu,
        )
        records.append(record)
        device = record["machine"]["device"].replace(":", "")
        path = out / f"workload_{name}_{device}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        if "skipped" in record:
            print(f"workload {name}: skipped: {record['skipped']}")
        else:
            for key, value in record["ratios"].items():
                if key != "ours":
                    print(f"workload {name}: {key}: {value:.2f}x")
            print(f"workload {name}: {record['wall_seconds']:.0f} s")
        print(f"wrote {path}")
    print(format_records(records))
    return 0


def _bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.table:
        return _table(out)
    if args.workload is None:
        return _bench_legacy(args, out)
    return _bench_workloads(args, out)


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of the ``idefender-gpu`` command."""
    parser = argparse.ArgumentParser(prog="idefender-gpu", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="EM benchmarks against scikit-learn and torchgmm (JSON + table)")
    bench.add_argument("--workload", choices=WORKLOAD_CHOICES, default=None,
                       help="named workload(s) of idefender_gpu.bench.WORKLOADS; default: the "
                            "fixed-iteration benchmark of workload a")
    bench.add_argument("--n", type=int, default=None, help="samples (default 60000, or the workload's)")
    bench.add_argument("--d", type=int, default=None, help="features (default 128, or the workload's)")
    bench.add_argument("--groups", type=int, default=None, help="mixtures G (default 10, or the workload's)")
    bench.add_argument("--k", type=int, default=None,
                       help="components per mixture (default 5, or the workload's)")
    bench.add_argument("--iters", type=int, default=None, help="timed EM iterations (default 5)")
    bench.add_argument("--repeats", type=int, default=None, help="best of this many (default 2)")
    bench.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--no-array-api", action="store_true", help="skip scikit-learn's array-API reference")
    bench.add_argument("--references", default=None,
                       help="workloads: comma-separated references "
                            "(default sklearn_numpy,sklearn_array_api,torchgmm; '' for none)")
    bench.add_argument("--tol", type=float, default=1e-3,
                       help="workloads: tol of the timed fit (default 1e-3)")
    bench.add_argument("--max-iter", type=int, default=100,
                       help="workloads: max_iter of the timed fit (default 100)")
    bench.add_argument("--limit-min", type=float, default=10.0,
                       help="workloads: minutes one implementation may spend per phase before "
                            "it is reduced or skipped with its estimate (default 10)")
    bench.add_argument("--group-block", type=int, default=None,
                       help="workloads: groups per batched fit (default: all that fit in device memory)")
    bench.add_argument("--memory-budget", type=int, default=None,
                       help="workloads: memory_budget bytes of our estimator (default: its own)")
    bench.add_argument("--threads", type=int, default=None,
                       help="CPU threads of torch, BLAS and OpenMP, in this process and the fit "
                            "subprocesses (default: the libraries' own; 1 is the least disturbed "
                            "on a shared machine)")
    bench.add_argument("--scale", type=float, default=None, help=argparse.SUPPRESS)
    bench.add_argument("--allow-gpu-only-on-cpu", action="store_true", help=argparse.SUPPRESS)
    bench.add_argument("--out", default="benchmarks/results", help="JSON directory")
    bench.add_argument("--table", action="store_true", help="print the table of the JSON in --out and exit")
    bench.set_defaults(func=_bench)
    from idefender_gpu.experiments.cli import register as register_reproduce

    register_reproduce(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``idefender-gpu`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        updates = {}
        if _needs_array_api(args) and os.environ.get("SCIPY_ARRAY_API") != "1":
            updates["SCIPY_ARRAY_API"] = "1"
        if args.threads is not None and any(os.environ.get(v) != str(args.threads)
                                            for v in THREAD_VARIABLES):
            updates.update({v: str(args.threads) for v in THREAD_VARIABLES})
        if updates:
            _reexec(argv, updates)
    return args.func(args)


def _needs_array_api(args: argparse.Namespace) -> bool:
    if args.table or args.no_array_api:
        return False
    return args.workload is None or args.references is None or "sklearn_array_api" in args.references


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
