"""Where each EM backend wins: dense torch against KeOps, one EM iteration (issue 4).

Usage::

    python benchmarks/bench_backends.py                  # full grid, CPU (~15 min on 2 quiet cores)
    python benchmarks/bench_backends.py --quick          # tiny grid (~1 min with a warm KeOps cache)
    python benchmarks/bench_backends.py --device cuda    # the same grid on a GPU
    python benchmarks/bench_backends.py --threads 1      # one CPU thread each (shared machines)
    python benchmarks/bench_backends.py --features 2 8   # only the points with D = 2 or 8
    python benchmarks/bench_backends.py --table          # re-print the table of the committed JSON

Method. For every grid point (covariance type, D, K, N; float32, G = 1) the same data and the
same explicit initialisation (``weights_init``, ``means_init``, ``precisions_init``, ``tol=0``)
go through :class:`~idefender_gpu.mixture.GaussianMixture` with ``backend='torch'`` and
``backend='keops'``, back to back, their repeats alternating. Seconds per EM iteration (E-step + M-step) are
``(min T(1 + iters) - min T(1)) / iters`` over ``repeats`` fits (``iters`` grows for cheap
points so that the timed part lasts at least half a second), after a warm-up fit; KeOps compiles
each formula (covariance type, D) once on a tiny slice before any timing, and the compile
times are recorded. Points whose method would cost more than ``--budget`` seconds are timed
once as ``T(1) - T(0)`` (``max_iter=0`` is the initialisation alone); points whose smaller-N
time, scaled linearly in N, exceeds ``--skip-above`` seconds per iteration are not run and
carry that estimate, marked ``extrapolated``. Every row says which method it used.

The first run on a machine also compiles 32 KeOps formulas (two per covariance type and D,
seconds to tens of seconds each, cached under ``~/.cache/keops*``); the compile times are in
the JSON and inside the wall time. On a shared machine ``--threads 1`` gives steadier
numbers (a multi-threaded torch op stalls when one of its threads is descheduled).

Writes ``backends_<device>.json`` into a fresh ``results/bench-backends-<UTC time>/`` (``--out``
names the file; ``--out benchmarks/results/backends_cpu.json`` rewrites the committed one, only
when asked) and prints a markdown table; ``ratio`` is
dense s/it divided by KeOps s/it (above 1: KeOps faster). The ``backend='auto'`` constants in
``idefender_gpu/mixture/_backends.py`` are read off this table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from idefender_gpu.bench import (
    backend_row,
    em_data,
    format_backend_table,
    machine_info,
    matmul_rate,
    precisions_init,
    sync,
)
from idefender_gpu.mixture import GaussianMixture

logger = logging.getLogger("bench_backends")

BACKENDS = ("torch", "keops")

#: (covariance types, N, K, D) of the full grid; tied and spherical on a smaller one.
GRID = [
    (("full", "diag"), (10_000, 100_000), (4, 32, 256), (2, 8, 16, 32, 64)),
    (("tied", "spherical"), (10_000, 100_000), (4, 256), (2, 16, 64)),
]
QUICK_GRID = [
    (("full", "diag", "tied", "spherical"), (2_000,), (4, 64), (2, 16)),
]

#: Extra regularisation so that K = 256 components of D = 64 fitted on N = 10k samples stay
#: positive definite in float32 (it does not change the cost of an iteration).
REG_COVAR = 1e-2


def _grid(quick: bool, features: tuple[int, ...] | None = None) -> list[tuple[str, int, int, int]]:
    """Grid points ``(covariance_type, D, K, N)``, N ascending within each (type, D, K);
    only the dimensions in ``features`` when given."""
    points = []
    for ctypes, ns, ks, ds in (QUICK_GRID if quick else GRID):
        for ctype, d, k, n in itertools.product(ctypes, ds, ks, ns):
            if features is None or d in features:
                points.append((ctype, d, k, n))
    return points


def _fit_function(data: dict[str, np.ndarray], ctype: str, backend: str, device: torch.device,
                  n_rows: int | None = None) -> Callable[[int], None]:
    """``fit(max_iter)``: one :class:`GaussianMixture` fit from the explicit inits."""
    X = torch.from_numpy(data["X"][:n_rows]).to(device)
    K = data["means"].shape[1]
    w = torch.from_numpy(data["weights"][0]).to(device)
    m = torch.from_numpy(data["means"][0]).to(device)
    p = torch.from_numpy(precisions_init(data["prec_diag"][0], ctype)).to(device)

    def fit(max_iter: int) -> None:
        model = GaussianMixture(K, covariance_type=ctype, tol=0.0, max_iter=max_iter,
                                reg_covar=REG_COVAR, weights_init=w, means_init=m,
                                precisions_init=p, device=device, backend=backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(X)

    return fit


def _clock(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _time_backends(fits: dict[str, Callable[[int], None]], device: torch.device, iters: int,
                   repeats: int, budget: float, min_timed: float = 0.5) -> dict[str, dict[str, Any]]:
    """Seconds per EM iteration of each ``fits[backend]``, with the method used.

    After a warm-up and a probe (``T(1)``, ``T(2)``) of each backend, the repeats alternate
    between the backends (dense, KeOps, KeOps, dense, ...), so that both see the same load
    of a shared machine; per backend the result is ``(min T(1 + iters) - min T(1)) / iters``
    (the minimum of each clock is the least disturbed by other processes). Cheap points get
    more iterations, so that the timed difference lasts at least ``min_timed`` seconds, and up
    to twice the repeats. A backend whose repeats would cost more than ``budget`` seconds is
    timed once as ``T(1) - T(0)`` (``max_iter=0``: validation and initialisation only).
    """
    plan: dict[str, dict[str, Any]] = {}
    for name, fit in fits.items():
        warm = _clock(lambda: fit(1), device)  # warm-up, and a probe of the cost
        t1 = min(warm, _clock(lambda: fit(1), device))
        per_iter = max(_clock(lambda: fit(2), device) - t1, 1e-4)
        n_iter = max(iters, min(32, math.ceil(min_timed / per_iter)))
        cost = t1 + (t1 + n_iter * per_iter)  # one repeat
        plan[name] = {"iters": n_iter, "t1": t1, "full": cost * repeats <= budget,
                      "repeats": min(2 * repeats, max(repeats, int(budget / (4 * cost))))}
    best1 = {name: plan[name]["t1"] for name in fits}
    best2 = {name: math.inf for name in fits}
    t0 = {}
    for r in range(max(p["repeats"] if p["full"] else 1 for p in plan.values())):
        order = list(fits) if r % 2 == 0 else list(fits)[::-1]
        for name in order:
            fit, p = fits[name], plan[name]
            if p["full"] and r < p["repeats"]:
                best1[name] = min(best1[name], _clock(lambda: fit(1), device))
                best2[name] = min(best2[name], _clock(lambda: fit(1 + p["iters"]), device))
            elif not p["full"] and r == 0:
                t0[name] = _clock(lambda: fit(0), device)
                best1[name] = min(best1[name], _clock(lambda: fit(1), device))
    out = {}
    for name, p in plan.items():
        if p["full"]:
            out[name] = {"sec_per_iter": max(best2[name] - best1[name], 0.0) / p["iters"],
                         "method": f"(min T(1+{p['iters']}) - min T(1))/{p['iters']}, "
                                   f"{p['repeats']} repeats, alternating backends",
                         "fit1_seconds": best1[name]}
        else:
            out[name] = {"sec_per_iter": max(best1[name] - t0[name], 0.0),
                         "method": "T(1)-T(0), one sample (over --budget)",
                         "fit1_seconds": best1[name]}
    return out


def run_grid(device: torch.device, quick: bool, iters: int, repeats: int, budget: float,
             skip_above: float, seed: int = 0, features: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Time both backends over the grid; returns the JSON-able record."""
    rows: list[dict[str, Any]] = []
    compile_s: dict[str, float] = {}
    measured: dict[tuple, tuple[int, float]] = {}  # (ctype, D, K, backend) -> (N, s/it)
    t_start = time.perf_counter()
    for ctype, D, K, N in _grid(quick, features):
        data = em_data(N, D, 1, K, seed)
        row: dict[str, Any] = {"covariance_type": ctype, "n_features": D, "n_components": K,
                               "n_samples": N}
        fits = {}
        for backend in BACKENDS:
            key = (ctype, D, K, backend)
            if backend == "keops" and f"{ctype}/D={D}" not in compile_s:
                tiny = _fit_function(data, ctype, backend, device, n_rows=max(4 * K, 256))
                compile_s[f"{ctype}/D={D}"] = _clock(lambda: tiny(2), device)
            previous = measured.get(key)
            if previous is not None and previous[1] * N / previous[0] > skip_above:
                estimate = previous[1] * N / previous[0]
                row[backend] = {"sec_per_iter": estimate,
                                "method": f"extrapolated linearly in N from N={previous[0]} "
                                          f"(estimate {estimate:.1f} s/it > --skip-above {skip_above:g} s)",
                                "extrapolated": True}
                continue
            fits[backend] = _fit_function(data, ctype, backend, device)
        try:
            row.update(_time_backends(fits, device, iters, repeats, budget))
        except Exception as exc:  # noqa: BLE001 - a failed point is recorded, not fatal
            row.update({b: {"error": f"{type(exc).__name__}: {exc}"} for b in fits})
        for backend in fits:
            if "sec_per_iter" in row[backend]:
                measured[(ctype, D, K, backend)] = (N, row[backend]["sec_per_iter"])
        dense, keops = row["torch"].get("sec_per_iter"), row["keops"].get("sec_per_iter")
        if dense is not None and keops is not None and keops > 0:
            row["winner"] = "keops" if keops < dense else "torch"
            row["ratio_dense_over_keops"] = dense / keops
        rows.append(row)
        logger.info("%s", backend_row(row))
    return {
        "benchmark": "em_backends",
        "machine": machine_info(device),
        "matmul_gflops": matmul_rate(device) / 1e9,
        "settings": {"dtype": "float32", "n_groups": 1, "threads": torch.get_num_threads(),
                     "iters": iters, "repeats": repeats,
                     "budget_s": budget, "skip_above_s_per_iter": skip_above, "reg_covar": REG_COVAR,
                     "quick": quick, "seed": seed, "tol": 0.0, "memory_budget": "default",
                     "features": None if features is None else list(features)},
        "keops_compile_seconds": compile_s,
        "wall_seconds": time.perf_counter() - t_start,
        "rows": rows,
    }


def suggest_rule(record: dict[str, Any]) -> dict[str, Any]:
    """Read ``AUTO_KEOPS_MAX_FEATURES`` / ``AUTO_KEOPS_MIN_COMPONENTS`` off the table.

    Per covariance type: the largest D such that KeOps wins at every measured N for the
    largest K and every smaller D; the minimum K is the smallest K at which KeOps wins every
    N for all D up to that limit (0 and "none" when KeOps never wins).
    """
    out: dict[str, Any] = {"max_features": {}, "min_components": {}}
    by = {}
    for row in record["rows"]:
        by.setdefault(row["covariance_type"], []).append(row)
    for ctype, rows in by.items():
        ds = sorted({r["n_features"] for r in rows})
        ks = sorted({r["n_components"] for r in rows})

        def wins(d, k):
            pts = [r for r in rows if r["n_features"] == d and r["n_components"] == k]
            return bool(pts) and all(r.get("winner") == "keops" for r in pts)

        limit = 0
        for d in ds:
            if not wins(d, ks[-1]):
                break
            limit = d
        out["max_features"][ctype] = limit
        min_k = None
        if limit:
            for k in ks:
                if all(wins(d, k) for d in ds if d <= limit):
                    min_k = k
                    break
        out["min_components"][ctype] = min_k
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid (a smoke run)")
    parser.add_argument("--features", type=int, nargs="+", default=None,
                        help="only the grid's points with these D (e.g. 2 8: where KeOps may win)")
    parser.add_argument("--device", default="cpu", help="default: cpu")
    parser.add_argument("--iters", type=int, default=2,
                        help="fewest timed EM iterations (default 2; more for cheap points)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many (default 3)")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="seconds a backend may spend on one point before it is timed once "
                             "(default 8)")
    parser.add_argument("--skip-above", type=float, default=8.0,
                        help="skip a point whose extrapolated s/it exceeds this (default 8)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and KeOps' OpenMP (default: the libraries' own); "
                             "1 is the least disturbed on a shared machine")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: results/bench-backends-<UTC time>/"
                             "backends_<device>[_quick].json, a fresh folder; with --table: "
                             "benchmarks/results/backends_<device>[_quick].json, the committed one)")
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read when KeOps' OpenMP starts
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    default = f"backends_{device.type}{'_quick' if args.quick else ''}.json"
    if args.out is not None:
        out = Path(args.out)
    elif args.table:
        out = Path(__file__).resolve().parent / "results" / default
    else:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        out = Path("results") / f"bench-backends-{stamp}" / default
    if args.table:
        record = json.loads(out.read_text())
    else:
        record = run_grid(device, args.quick, args.iters, args.repeats, args.budget, args.skip_above,
                          features=None if args.features is None else tuple(args.features))
        record["suggested_auto_rule"] = suggest_rule(record)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
    print(format_backend_table(record))
    print()
    print("suggested auto rule (read off this table):", json.dumps(record["suggested_auto_rule"]))
    print(f"grid wall time: {record['wall_seconds']:.0f} s")
    if not args.table:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
