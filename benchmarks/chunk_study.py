"""Rows per chunk of the fused EM pass against seconds per EM iteration (issue 17).

For each workload (``a``, ``b``, ``d-diag`` by default; the shapes of
``idefender_gpu.bench.workloads.WORKLOADS``) and each chunk size, one
``BatchedGaussianMixture`` fit from the workload's shared initialisation with
``max_iter=1`` and ``max_iter=3`` (``tol=0``); ``(T(3) - T(1)) / 2`` is the time of one EM
iteration (initialisation and the final E-step cancel), best of ``--repeats``. A chunk of
``r`` rows is asked for through the public ``memory_budget`` (``r`` times
``kernels.pass_bytes_per_row``, which the fused pass divides back); ``auto`` is the
default rule (``kernels.pass_rows``: the default 8 MiB budget, at least ``MIN_PASS_ROWS``).

Time only on an idle machine (no other job beside it), e.g.::

    python benchmarks/chunk_study.py --threads 2 --out benchmarks/results/chunk_study.json

``--scale 0.2`` runs every workload on a fifth of its samples (a quick look).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from idefender_gpu import kernels
from idefender_gpu.bench.timing import machine_info
from idefender_gpu.bench.workloads import WORKLOADS, BenchData, precisions_init, scaled_workload
from idefender_gpu.mixture import BatchedGaussianMixture

DEFAULT_ROWS = ("64", "128", "256", "512", "1024", "2048", "4096", "auto")


def _fit_seconds(data: BenchData, workload, max_iter: int, memory_budget: int | None) -> float:
    w = workload
    model = BatchedGaussianMixture(
        w.n_components, covariance_type=w.covariance_type, tol=0.0, reg_covar=w.reg_covar,
        max_iter=max_iter, weights_init=data.weights, means_init=data.means,
        precisions_init=precisions_init(data.prec_diag, w.covariance_type),
        device="cpu", backend="torch", memory_budget=memory_budget,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of the short fits
        t0 = time.perf_counter()
        model.fit(data.X, data.y)
        return time.perf_counter() - t0


def study(name: str, rows_list: list[str], scale: float, repeats: int, seed: int) -> dict:
    """One workload's table: rows per chunk -> seconds per EM iteration."""
    workload = WORKLOADS[name]
    if scale != 1.0:
        workload = scaled_workload(workload, scale=scale)
    data = BenchData(workload, seed, torch.device("cpu"))
    G, K, D = workload.n_groups, workload.n_components, workload.n_features
    n_max = max(b - a for a, b in zip(data.offsets, data.offsets[1:]))
    bytes_per_row = kernels.pass_bytes_per_row(workload.covariance_type, G, K, D,
                                               data.X.element_size())
    _fit_seconds(data, workload, 1, None)  # warm-up (allocator, BLAS threads)
    table = []
    for rows in rows_list:
        budget = None if rows == "auto" else int(rows) * bytes_per_row
        chosen = kernels.pass_rows(n_max, bytes_per_row, budget, "cpu")
        best = float("inf")
        for _ in range(repeats):
            t1 = _fit_seconds(data, workload, 1, budget)
            t3 = _fit_seconds(data, workload, 3, budget)
            best = min(best, max(t3 - t1, 0.0) / 2)
        table.append({"rows": rows, "rows_per_chunk": chosen, "sec_per_iter": best,
                      "buffer_bytes": chosen * bytes_per_row})
        print(f"{name:7s} rows={rows:>5s} ({chosen:6d})  {best:8.3f} s/iter", file=sys.stderr)
    return {"workload": name, "n_samples": workload.n_samples, "n_features": D, "n_groups": G,
            "n_components": K, "covariance_type": workload.covariance_type, "dtype": "float32",
            "bytes_per_row": bytes_per_row, "table": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["a", "b", "d-diag"],
                        choices=sorted(WORKLOADS))
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS),
                        help="rows per chunk to try (integers, or 'auto': the default rule)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of each workload's N")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: a fresh file under /tmp)")
    args = parser.parse_args(argv)
    for rows in args.rows:
        if rows != "auto" and not (rows.isdigit() and int(rows) > 0):
            parser.error(f"--rows takes positive integers or 'auto'; got {rows!r}")
    torch.set_num_threads(args.threads)
    record = {
        "what": "rows per chunk of the fused EM pass against seconds per EM iteration",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": machine_info("cpu"),
        "threads": args.threads,
        "load_average_before": os.getloadavg(),
        "default_budget_bytes": kernels.DEFAULT_MEMORY_BUDGET["cpu"],
        "scale": args.scale,
        "results": [study(name, args.rows, args.scale, args.repeats, args.seed)
                    for name in args.workloads],
        "load_average_after": os.getloadavg(),
    }
    out = args.out or Path(f"/tmp/chunk_study_{int(time.time())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
