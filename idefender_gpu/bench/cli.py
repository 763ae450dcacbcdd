"""The ``bench`` subcommand of ``idefender-gpu``: EM benchmarks as JSON and markdown tables.

``idefender-gpu bench --workload a`` times workload (a) (the default) for our backends and
the references (:func:`~idefender_gpu.bench.run.run_workload`) and writes
``workload_<name>_<device>.json`` into a fresh folder, ``results/bench-<UTC time>/`` unless
``--out`` names one; the committed ``benchmarks/results/`` changes only when asked
(``--out benchmarks/results``). ``--table`` prints the table of a folder's records (by
default the committed ones).

Wire it into the main parser with :func:`register`::

    from idefender_gpu.bench.cli import register as register_bench
    register_bench(sub)      # sub = parser.add_subparsers(...)

This module imports neither torch, NumPy nor SciPy: the run does, after the command has set
``SCIPY_ARRAY_API=1`` (scikit-learn's array-API reference) and the thread counts
(``--threads``), restarting itself where those libraries were already loaded.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import logging
import os
import sys
from pathlib import Path

__all__ = ["COMMITTED_RESULTS", "DETECTOR_WORKLOAD_CHOICES", "WORKLOAD_CHOICES", "default_out",
           "environment_updates", "register"]

#: ``--workload`` choices: the EM workloads (:data:`idefender_gpu.bench.WORKLOADS`), ``all``
#: of those, and the detector workloads (:data:`DETECTOR_WORKLOAD_CHOICES`).
WORKLOAD_CHOICES = ("a", "b", "c1", "c2", "d-diag", "d-full", "all", "imagenet-cpu", "imagenet-width",
                    "detector-overhead")

#: The detector workloads (:data:`idefender_gpu.bench.detector_workloads.DETECTOR_WORKLOADS`).
DETECTOR_WORKLOAD_CHOICES = ("imagenet-cpu", "imagenet-width", "detector-overhead")

#: The committed results (README's tables): written only when ``--out`` names them.
COMMITTED_RESULTS = Path("benchmarks") / "results"

#: Thread-count variables of the BLAS and OpenMP runtimes (read when those libraries load).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: Libraries that read the environment above when they are first imported.
_ENV_READERS = ("scipy", "numpy", "torch", "sklearn")

_DESCRIPTION = """\
Batched EM against scikit-learn (NumPy and array-API) and torchgmm on the same data and the
same initialisation: seconds per iteration, one fit to --tol (iterations, convergence,
log-likelihood, peak memory), GFLOP/s against the device's float32 matmul rate, per
implementation; a JSON record per workload and a markdown table. Results go to a fresh
folder, results/bench-<UTC time>/, unless --out names one: the committed
benchmarks/results/ changes only with --out benchmarks/results."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite float > 0; got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite float >= 0; got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``add_subparsers`` object.

    Returns
    -------
    argparse.ArgumentParser
        The ``bench`` parser (its ``func`` default runs the benchmark).
    """
    bench = subparsers.add_parser(
        "bench", help="EM benchmarks against scikit-learn and torchgmm (JSON + table)",
        description=_DESCRIPTION)
    add = bench.add_argument
    add("--workload", choices=WORKLOAD_CHOICES, default="a",
        help="named workload of idefender_gpu.bench.WORKLOADS (a: 60000x128, G=10, K=5, full; "
             "b: 50000x512, G=10, K=3; c1/c2: ImageNet-sized, GPU only; d-diag/d-full: "
             "1000000x16, K=256), all of those; or a detector workload (imagenet-cpu: "
             "IDefender's streamed fit on 1281167x1024 synthetic states, 1000 classes; "
             "imagenet-width: 128000x4096, 100 classes, empirical and Ledoit-Wolf; "
             "detector-overhead: score(x) against model(x) for Model F and VGG19) "
             "(default %(default)s)")
    add("--n", type=_positive_int, default=None,
        help="samples N (detector workloads: training states; default: the workload's)")
    add("--d", type=_positive_int, default=None, help="features D (default: the workload's)")
    add("--groups", type=_positive_int, default=None,
        help="independent mixtures G (detector workloads: classes; default: the workload's)")
    add("--n-test", type=_positive_int, default=None,
        help="detector workloads: held-out states scored (default: the workload's)")
    add("--batch-size", type=_positive_int, default=None,
        help="detector workloads: states per loader batch (default: the workload's)")
    add("--order", choices=("sorted", "shuffled", "both"), default="sorted",
        help="detector fit workloads: batches sorted by class (as ImageFolder yields them), "
             "shuffled, or both variants (default %(default)s)")
    add("--estimators", default=None,
        help="detector fit workloads: comma-separated covariance estimators (empirical, "
             "ledoit-wolf, oas; default: the workload's)")
    add("--k", type=_positive_int, default=None,
        help="components K per mixture (default: the workload's)")
    add("--scale", type=_positive_float, default=None,
        help="multiply the workload's N by this factor (at least 2 samples per component "
             "and group), e.g. 0.1 for a slice of c1")
    add("--iters", type=_positive_int, default=5,
        help="EM iterations of the timed fit: seconds per iteration = "
             "(min T(1+iters) - min T(1)) / iters (default %(default)s)")
    add("--repeats", type=_positive_int, default=2,
        help="timed runs of each length; the fastest counts (default %(default)s)")
    add("--tol", type=_non_negative_float, default=1e-3, help="tol of the fit to convergence (default %(default)s)")
    add("--max-iter", type=_positive_int, default=100, help="max_iter of the fit to convergence (default %(default)s)")
    add("--limit-min", type=_positive_float, default=10.0,
        help="minutes one implementation may spend per phase (timing, fit) before that phase "
             "is shortened or skipped with its estimate; detector fit workloads: the time "
             "limit of each variant's process (default %(default)s)")
    add("--device", default=None, help="torch device of our fits and the array-API reference "
                                       "(default: cuda if available, else cpu)")
    add("--seed", type=int, default=0, help="seed of the synthetic data and initialisation (default %(default)s)")
    add("--references", default=None,
        help="comma-separated references: sklearn_numpy, sklearn_array_api, torchgmm "
             "('' for none; default: all three; torchgmm is recorded as skipped, with its "
             "install command, where it is not installed)")
    add("--no-array-api", action="store_true",
        help="leave out scikit-learn's array-API reference (and SCIPY_ARRAY_API)")
    add("--group-block", type=_positive_int, default=None,
        help="groups per batched fit of ours (default: all that fit in device memory)")
    add("--memory-budget", type=_positive_int, default=None,
        help="memory_budget in bytes of our estimator (default: its own)")
    add("--threads", type=_positive_int, default=None,
        help="CPU threads of torch, BLAS and OpenMP, in this process and the fit subprocesses "
             "(default: the libraries' own; 1 is the least disturbed on a shared machine)")
    add("--allow-gpu-only-on-cpu", action="store_true",
        help="run GPU-only workloads (c1, c2) on a CPU device too (only sensible with small "
             "--n/--d/--groups, to try the machinery)")
    add("--out", type=Path, default=None,
        help="folder of the JSON records (default: a fresh results/bench-<UTC time>/; "
             f"{COMMITTED_RESULTS}/ holds the committed ones; with --table: the folder to read, "
             f"default {COMMITTED_RESULTS}/)")
    add("--table", action="store_true",
        help="print the markdown table of the records in --out and exit (runs nothing)")
    bench.set_defaults(func=functools.partial(_main, parser=bench))
    return bench


def default_out(now: datetime.datetime | None = None) -> Path:
    """``results/bench-<UTC time>``, the default ``--out`` of a run (a new folder each second)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return Path("results") / f"bench-{now.strftime('%Y%m%dT%H%M%SZ')}"


def _fresh(folder: Path) -> Path:
    """``folder``, or ``folder-2``, ``folder-3``... if it exists; created."""
    candidate, n = folder, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = folder.with_name(f"{folder.name}-{n}")


def references_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The references ``args`` asks for, in order."""
    if args.references is not None:
        names = tuple(r.strip() for r in args.references.split(",") if r.strip())
    else:
        names = ("sklearn_numpy", "sklearn_array_api", "torchgmm")
    if args.no_array_api:
        names = tuple(r for r in names if r != "sklearn_array_api")
    return names


def environment_updates(args: argparse.Namespace, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables a run of ``args`` needs set before SciPy, NumPy and torch load:
    ``SCIPY_ARRAY_API=1`` for the array-API reference, the thread counts for ``--threads``."""
    environ = os.environ if environ is None else environ
    updates = {}
    if (not args.table and "sklearn_array_api" in references_of(args)
            and environ.get("SCIPY_ARRAY_API") != "1"):
        updates["SCIPY_ARRAY_API"] = "1"
    if args.threads is not None and any(environ.get(v) != str(args.threads) for v in THREAD_VARIABLES):
        updates.update({v: str(args.threads) for v in THREAD_VARIABLES})
    return updates


def _argv(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Command-line arguments of ``parser`` that give ``args`` back (for the restart)."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        flag = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                out.append(flag)
        elif value is not None and value != action.default:
            out += [flag, str(value)]
    return out


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    updates = environment_updates(args)
    if updates:
        if not any(name in sys.modules for name in _ENV_READERS):
            os.environ.update(updates)  # nothing that reads them is loaded yet
        else:
            env = dict(os.environ, **updates)
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, "-m", "idefender_gpu.cli", "bench",
                                       *_argv(args, parser)], env)
    if args.table:
        return _table(args.out or COMMITTED_RESULTS)
    problem = _device_problem(args.device)
    if problem:  # idefender-gpu's main prints it as one "error:" line, exit code 2
        raise ValueError(f"argument --device: {problem}")
    return _workloads(args)


def _device_problem(text: str | None) -> str | None:
    """Why ``--device`` cannot be used on this machine, or ``None``."""
    import torch

    if text is None:
        return None
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError) as exc:
        return f"not a torch device: {text!r} ({exc})"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{text!r}: CUDA is not available on this machine"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif device.type not in ("cpu", "mps", "xpu"):
        return f"{text!r}: the benchmark runs on cpu or cuda devices"
    return None


def _table(folder: Path) -> int:
    from idefender_gpu.bench.report import format_records, load_records

    if not folder.is_dir():
        raise FileNotFoundError(f"bench --table: no folder {folder}")
    print(format_records(load_records(folder)))
    return 0


def _detector_workload(args: argparse.Namespace, out: Path) -> int:
    from idefender_gpu.bench.detector_workloads import (
        DETECTOR_WORKLOADS,
        run_detector_workload,
        scaled_detector_workload,
    )
    from idefender_gpu.bench.report import format_records

    workload = scaled_detector_workload(
        DETECTOR_WORKLOADS[args.workload], n_train=args.n, n_test=args.n_test, n_features=args.d,
        n_classes=args.groups, batch_size=args.batch_size, scale=args.scale)
    orders = ("sorted", "shuffled") if args.order == "both" else (args.order,)
    estimators = None
    if args.estimators:
        estimators = tuple(e.strip() for e in args.estimators.split(",") if e.strip())
    record = run_detector_workload(workload, device=args.device, seed=args.seed, orders=orders,
                                   estimators=estimators, limit_minutes=args.limit_min)
    device = record["machine"]["device"].replace(":", "")
    path = out / f"detector_{args.workload}_{device}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"workload {args.workload}: {record['wall_seconds']:.0f} s")
    print(f"wrote {path}")
    print(format_records([record]))
    return 0


def _workloads(args: argparse.Namespace) -> int:
    from idefender_gpu.bench.report import format_records
    from idefender_gpu.bench.run import run_workload
    from idefender_gpu.bench.workloads import WORKLOADS, scaled_workload

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("idefender_gpu.bench").setLevel(logging.INFO)
    out = _fresh(default_out()) if args.out is None else args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.workload in DETECTOR_WORKLOAD_CHOICES:
        return _detector_workload(args, out)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    records = []
    for name in names:
        workload = scaled_workload(WORKLOADS[name], n_samples=args.n, n_features=args.d,
                                   n_groups=args.groups, n_components=args.k, scale=args.scale)
        record = run_workload(
            workload, references=references_of(args), device=args.device, iters=args.iters,
            repeats=args.repeats, tol=args.tol, max_iter=args.max_iter,
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
