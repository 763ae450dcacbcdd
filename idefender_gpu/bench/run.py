"""One workload run: the probe, the timing, the fit to ``tol`` and the JSON record.

:func:`run_workload` is the harness's one entry point (``idefender-gpu bench``). It imports
:mod:`~idefender_gpu.bench.workloads`, :mod:`~idefender_gpu.bench.timing` and
:mod:`~idefender_gpu.bench.references`, never the reverse. A CPU implementation's fit to
``tol`` runs in a fresh subprocess (:func:`_runner_main`), whose peak RSS is its memory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from idefender_gpu.bench.references import REFERENCES, Implementation, make_implementation, reference_skip
from idefender_gpu.bench.timing import clock, machine_info, matmul_probe
from idefender_gpu.bench.workloads import (
    FLOP_FORMULAS,
    WORKLOADS,
    BenchData,
    Workload,
    flops_per_iteration,
)

logger = logging.getLogger("idefender_gpu.bench")

__all__ = ["run_workload"]


def _probe(impl: Implementation) -> dict[str, Any]:
    """Warm-up, then ``T(1)`` and ``T(3)`` on the first ``probe_groups`` groups, scaled to G."""
    G = impl.workload.n_groups
    sub = range(impl.probe_groups)
    impl.fit(sub, 1, 0.0)  # warm-up (allocators, BLAS, KeOps modules, Lightning imports)
    t1, _ = clock(lambda: impl.fit(sub, 1, 0.0), impl.device)
    t3, _ = clock(lambda: impl.fit(sub, 3, 0.0), impl.device)
    scale = G / len(sub)
    per_iter = max(t3 - t1, 0.0) / 2
    return {"groups": len(sub), "sec_per_iter": per_iter * scale,
            "init_seconds": max(t1 - per_iter, 0.0) * scale}


def _fit_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one fit (or only the data, ``impl=None``) in a fresh process; add its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, SCIPY_ARRAY_API="1")
        code = "import sys; from idefender_gpu.bench.run import _runner_main; _runner_main(*sys.argv[1:])"
        with open(Path(tmp) / "log.txt", "w+") as log:
            proc = subprocess.Popen([sys.executable, "-c", code, str(spec_path), str(out_path)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            log.seek(0)
            tail = log.read()[-2000:]
        if proc.returncode != 0:
            raise RuntimeError(f"fit subprocess failed ({proc.returncode}): {tail}")
        result = json.loads(out_path.read_text())
    result["peak_memory_bytes"] = usage.ru_maxrss * 1024  # Linux: KiB
    result["peak_memory_kind"] = "peak RSS of a process that ran only this fit (incl. data, imports)"
    return result


def _runner_main(spec_path: str, out_path: str) -> None:
    """Entry point of the fit subprocess (see :func:`_fit_in_subprocess`)."""
    spec = json.loads(Path(spec_path).read_text())
    workload = Workload(**{**spec["workload"], "backends": tuple(spec["workload"]["backends"])})
    device = torch.device(spec["device"])
    data = BenchData(workload, spec["seed"], device if workload.generator == "torch" else torch.device("cpu"))
    result: dict[str, Any] = {}
    if spec["impl"] is not None:
        impl = make_implementation(spec["impl"], data, workload, device, spec["group_block"],
                                    spec["memory_budget"])
        result = _fit_to_tol(impl, spec["max_iter"], spec["tol"], spec["warm_up"])
    Path(out_path).write_text(json.dumps(result))


def _fit_to_tol(impl: Implementation, max_iter: int, tol: float,
                warm_up: bool = True) -> dict[str, Any]:
    """One warm-up iteration (on the probe groups), then the timed fit to ``tol`` from the
    explicit inits."""
    groups = range(impl.workload.n_groups)
    if warm_up:
        impl.fit(range(impl.probe_groups), 1, 0.0)
    seconds, out = clock(lambda: impl.fit(groups, max_iter, tol), impl.device)
    lower_bound = out["lower_bound"].astype(float)
    return {
        "seconds": seconds, "max_iter": max_iter, "tol": tol,
        "n_iter": out["n_iter"].tolist() if out["n_iter"].size <= 20 else None,
        "n_iter_mean": float(out["n_iter"].mean()), "n_iter_max": int(out["n_iter"].max()),
        "converged": bool(out["converged"].all()),
        "converged_fraction": float(out["converged"].mean()),
        "final_mean_log_likelihood": float(lower_bound.mean()),
        "final_mean_log_likelihood_per_group": lower_bound.tolist(),
    }


def run_workload(
    workload: Workload | str,
    *,
    references: tuple[str, ...] = REFERENCES,
    device: str | torch.device | None = None,
    iters: int = 5,
    repeats: int = 2,
    tol: float = 1e-3,
    max_iter: int = 100,
    limit_minutes: float = 10.0,
    group_block: int | None = None,
    memory_budget: int | None = None,
    seed: int = 0,
    allow_gpu_only_on_cpu: bool = False,
) -> dict[str, Any]:
    """Benchmark one named workload: ours (each backend of the workload) and the references.

    For every implementation, on the same data and (except torchgmm) the same explicit
    initialisation:

    * ``sec_per_iter``: ``(T(1 + iters) - T(1)) / iters``, ``tol=0``, best of ``repeats``
      (after a warm-up);
    * ``fit``: the time of one fit to ``tol`` capped at ``max_iter`` iterations, with
      ``n_iter``, ``converged`` and the final mean log-likelihood (per group and averaged),
      and its peak memory: ``torch.cuda.max_memory_allocated`` for CUDA implementations
      (the data on the device included), else the peak RSS of a subprocess that runs only
      that fit (data, interpreter and libraries included; nothing subtracted);
    * ``gflops``: :func:`flops_per_iteration` / ``sec_per_iter``, and its fraction of the
      dense float32 matmul rate of the implementation's device, measured in the same run.

    Nothing runs longer than ``limit_minutes`` per implementation and phase: a probe
    (``T(1)``, ``T(3)`` on the first groups, scaled to all of them) estimates the cost
    first; an over-long timing becomes a single ``(T(3) - T(1)) / 2`` sample or is skipped with
    the estimate, and an over-long fit runs with ``max_iter`` lowered to what fits in the
    limit (``max_iter_capped_by_time_limit``, at least one iteration), or is skipped.
    Before any of that, a reference whose per-group copies would not fit in the memory
    available (:func:`~idefender_gpu.bench.references.reference_skip`: scikit-learn on
    workloads c1/c2) is recorded as skipped with its estimate; one that is not installed
    (torchgmm) as skipped with the command that installs it. The dense float32 matmul rate
    of each device type is ``matmul_gflops`` (``matmul_probe``: the probe's shape and
    whether TF32 was on).

    Parameters
    ----------
    workload : Workload or str
        A :class:`~idefender_gpu.bench.workloads.Workload` or a name of
        :data:`~idefender_gpu.bench.workloads.WORKLOADS`.
    references : tuple of str, default REFERENCES
        References to run after our backends (``()`` for none).
    device : str or torch.device, optional
        Device of our fits and of the array-API reference; default CUDA if available.
    iters, repeats : int
        Timed iterations and repeats of ``sec_per_iter``.
    tol, max_iter : float, int
        Of the fit to convergence.
    limit_minutes : float
        Time limit of one implementation's phase.
    group_block, memory_budget : int, optional
        Groups per batched fit and ``memory_budget`` of ours.
    seed : int
        Seed of the synthetic data and initialisation.
    allow_gpu_only_on_cpu : bool
        Run ``gpu_only`` workloads on a CPU device too (tests of the machinery).

    Returns
    -------
    dict
        A JSON-able record (``benchmark: 'em_workload'``) that
        :func:`~idefender_gpu.bench.report.format_records` renders.
    """
    spec = WORKLOADS[workload] if isinstance(workload, str) else workload
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    header = {
        "benchmark": "em_workload",
        "machine": machine_info(device),
        "workload": {**asdict(spec), "dtype": "float32", "tol": tol, "max_iter": max_iter,
                     "iters": iters, "repeats": repeats, "seed": seed},
        "flop_formula": FLOP_FORMULAS[spec.covariance_type],
        "flops_per_iteration": flops_per_iteration(spec.n_samples, spec.n_components,
                                                   spec.n_features, spec.covariance_type),
        "time_limit_minutes": limit_minutes,
    }
    if spec.gpu_only and device.type != "cuda" and not allow_gpu_only_on_cpu:
        gigabytes = spec.n_samples * spec.n_features * 4 / 1e9
        params = spec.n_groups * spec.n_components * spec.n_features**2 * 4 / 1e9
        header["skipped"] = (
            f"GPU-only workload, not run on {device}: {spec.n_samples}x{spec.n_features} float32 "
            f"features are {gigabytes:.0f} GB and the G*K*D^2 covariances {params:.0f} GB; run it "
            "with a CUDA device (idefender-gpu bench --workload "
            f"{spec.name} --device cuda)"
        )
        return header
    t_start = time.perf_counter()
    limit_s = 60.0 * limit_minutes
    data = BenchData(spec, seed, device if spec.generator == "torch" else torch.device("cpu"))
    probes: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any]] = {}
    names = [f"idefender_gpu[{b}]" for b in spec.backends] + list(references)
    runner_spec = {"workload": asdict(spec), "seed": seed, "device": str(device),
                   "group_block": group_block, "memory_budget": memory_budget}
    for name in names:
        skip = reference_skip(name, spec, device)
        if skip is not None:
            results[name] = skip
            continue
        try:
            impl = make_implementation(name, data, spec, device, group_block, memory_budget)
        except ImportError as exc:
            results[name] = {"skipped": f"not installed: {exc}"}
            continue
        except Exception as exc:  # noqa: BLE001 - recorded, the other implementations go on
            results[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
            continue

        def baseline() -> None:
            """What a process holds with the imports and the data only (subtracted nowhere)."""
            if "baseline_peak_rss_bytes" not in header:
                header["baseline_peak_rss_bytes"] = _fit_in_subprocess(
                    {**runner_spec, "impl": None})["peak_memory_bytes"]

        entry: dict[str, Any] = impl.describe()
        results[name] = entry
        try:
            _measure(impl, entry, runner_spec, name, iters, repeats, tol, max_iter, limit_s,
                     baseline)
        except Exception as exc:  # noqa: BLE001 - a failed implementation is recorded
            entry["error"] = f"{type(exc).__name__}: {exc}"
            continue
        if entry.get("sec_per_iter", 0.0) > 0.0:  # 0: below the noise of the clock
            kind = impl.device.type
            if kind not in probes:
                probes[kind] = matmul_probe(impl.device)
            entry["gflops"] = header["flops_per_iteration"] / entry["sec_per_iter"] / 1e9
            entry["fraction_of_matmul_peak"] = entry["gflops"] / probes[kind]["gflops"]
    header["matmul_gflops"] = {kind: probe["gflops"] for kind, probe in probes.items()}
    header["matmul_probe"] = probes
    header["results"] = results
    header["ratios"] = _ratios(results)
    header["wall_seconds"] = time.perf_counter() - t_start
    return header


def _measure(impl: Implementation, entry: dict[str, Any], runner_spec: dict[str, Any],
             name: str, iters: int, repeats: int, tol: float, max_iter: int,
             limit_s: float, baseline: Callable[[], None]) -> None:
    """Fill ``entry`` with the probe, ``sec_per_iter`` and ``fit`` of ``impl``."""
    G = impl.workload.n_groups
    logger.info("%s %s: probe", impl.workload.name, name)
    probe = _probe(impl)
    entry["probe"] = probe
    logger.info("%s %s: probe %.3g s/iteration; timing", impl.workload.name, name,
                probe["sec_per_iter"])
    per_iter, init = probe["sec_per_iter"], probe["init_seconds"]
    timing_cost = repeats * (2 * init + (2 + iters) * per_iter)
    whole = probe["groups"] == G
    if timing_cost <= limit_s:
        fit = lambda m: impl.fit(range(G), m, 0.0)  # noqa: E731
        if not whole:
            fit(1)  # warm-up on all groups
        best1 = best2 = math.inf
        for _ in range(repeats):
            best1 = min(best1, clock(lambda: fit(1), impl.device)[0])
            best2 = min(best2, clock(lambda: fit(1 + iters), impl.device)[0])
        entry["sec_per_iter"] = max(best2 - best1, 0.0) / iters
        entry["timing_method"] = f"(min T(1+{iters}) - min T(1))/{iters}, {repeats} repeats"
    elif whole:
        entry["sec_per_iter"] = per_iter
        entry["timing_method"] = (f"(T(3)-T(1))/2, one sample: {iters} iterations x {repeats} repeats "
                                  f"would take ~{timing_cost / 60:.1f} min > limit {limit_s / 60:g} min")
    else:
        entry["skipped"] = (f"timing skipped: estimated {timing_cost / 60:.1f} min > limit "
                            f"{limit_s / 60:g} min (~{per_iter:.3g} s/iteration from T(1), T(3) on "
                            f"{probe['groups']} of {G} groups)")
    logger.info("%s %s: %s s/iteration; fit to tol", impl.workload.name, name,
                entry.get("sec_per_iter", "skipped"))
    fit_cost = init + max_iter * per_iter
    capped = max_iter
    if fit_cost > limit_s:
        capped = int((limit_s - init) // per_iter) if per_iter > 0 else max_iter
        if capped < 1:
            entry["fit"] = {"skipped": f"fit skipped: estimated {fit_cost / 60:.1f} min for "
                                       f"{max_iter} iterations > limit {limit_s / 60:g} min"}
            return
    if impl.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(impl.device)
        result = _fit_to_tol(impl, capped, tol)
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(impl.device)
        result["peak_memory_kind"] = "torch.cuda.max_memory_allocated (incl. the data on the device)"
    else:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the subprocess may need the device memory we cache
        baseline()
        # A fresh process: warm up unless an iteration is long enough to dwarf one-time costs.
        result = _fit_in_subprocess({**runner_spec, "impl": name, "max_iter": capped, "tol": tol,
                                     "warm_up": per_iter < 5.0})
    if capped != max_iter:
        result["max_iter_capped_by_time_limit"] = True
        result["uncapped_estimate_minutes"] = fit_cost / 60
    entry["fit"] = result


def _ratios(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Speed-ups of our fastest backend over each reference (reference time / ours)."""
    ours = {n: e for n, e in results.items()
            if n.startswith("idefender_gpu") and e.get("sec_per_iter", 0.0) > 0.0}
    if not ours:
        return {}
    best = min(ours, key=lambda n: ours[n]["sec_per_iter"])
    out: dict[str, Any] = {"ours": best}
    for name, entry in results.items():
        if name == best or entry.get("sec_per_iter", 0.0) <= 0.0:
            continue
        out[f"speedup_vs_{name}"] = entry["sec_per_iter"] / ours[best]["sec_per_iter"]
        fit, fit_ours = entry.get("fit", {}), ours[best].get("fit", {})
        if "seconds" in fit and "seconds" in fit_ours:
            out[f"fit_time_ratio_vs_{name}"] = fit["seconds"] / fit_ours["seconds"]
    return out

