"""Benchmark harness: batched EM against scikit-learn on the same data and initialisation.

Every figure is measured in one run against references on the same data:

* ``idefender_gpu``: :class:`~idefender_gpu.mixture.BatchedGaussianMixture`, all groups in
  one batched pass, on the chosen device;
* ``sklearn_numpy``: ``sklearn.mixture.GaussianMixture`` on NumPy, a loop over the groups;
* ``sklearn_array_api``: the same on torch tensors through scikit-learn's array-API mode
  (``SCIPY_ARRAY_API=1``, explicit inits: its fastest path), on the same device.

All three start from the same ``weights_init`` / ``means_init`` / ``precisions_init`` and run a
fixed number of EM iterations (``tol=0``). Seconds per EM iteration are
``(T(1 + iters) - T(1)) / iters`` (initialisation and validation cancel out), best of
``repeats``. CUDA is synchronised before every clock read. FLOP/s count the two
``N K D²`` GEMM passes of an iteration (Mahalanobis terms and centred covariances,
``4 N K D²`` flops), against the dense float32 matmul rate of the same device measured in the
same run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
import warnings
from pathlib import Path
from typing import Any, Callable

# scikit-learn's array-API mode needs this before SciPy is first imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from idefender_gpu.mixture import BatchedGaussianMixture  # noqa: E402

__all__ = ["em_workload", "format_table", "run_em_benchmark"]


def em_workload(n_samples: int, n_features: int, n_groups: int, n_components: int,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic class-conditional data and a shared initialisation (float32).

    Each group holds ``n_components`` anisotropic Gaussian clusters. The initial means are
    random samples of the group, the weights uniform and the precisions the inverse of the
    group's per-feature variance (diagonal matrices, in the 'full' layout).
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n_samples) % n_groups
    rng.shuffle(y)
    X = np.empty((n_samples, n_features), dtype=np.float32)
    weights = np.full((n_groups, n_components), 1.0 / n_components, dtype=np.float32)
    means = np.empty((n_groups, n_components, n_features), dtype=np.float32)
    precisions = np.zeros((n_groups, n_components, n_features, n_features), dtype=np.float32)
    diag = np.arange(n_features)
    for g in range(n_groups):
        idx = np.flatnonzero(y == g)
        centres = rng.normal(scale=3.0, size=(n_components, n_features))
        mixing = rng.normal(size=(n_components, n_features, n_features)) / np.sqrt(n_features)
        comp = rng.integers(0, n_components, size=idx.size)
        noise = rng.normal(size=(idx.size, n_features))
        X[idx] = centres[comp] + np.einsum("nd,nde->ne", noise, mixing[comp]) + 0.5 * noise
        means[g] = X[rng.choice(idx, n_components, replace=False)]
        precisions[g][:, diag, diag] = 1.0 / X[idx].var(0)
    return {"X": X, "y": y, "weights": weights, "means": means, "precisions": precisions}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_iteration(fit: Callable[[int], Any], iters: int, repeats: int,
                   device: torch.device) -> tuple[float, Any]:
    """Best-of-``repeats`` seconds per EM iteration and the last long fit's result."""
    fit(1)  # warm-up (allocators, kernel caches, KeOps/BLAS initialisation)
    best = float("inf")
    result = None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fit(1)
        _sync(device)
        t1 = time.perf_counter()
        result = fit(1 + iters)
        _sync(device)
        t2 = time.perf_counter()
        best = min(best, ((t2 - t1) - (t1 - t0)) / iters)
    return best, result


def _matmul_rate(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Dense float32 matmul FLOP/s of ``device`` (best of ``repeats``)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def _machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import sklearn

        info["sklearn"] = sklearn.__version__
    except ImportError:
        pass
    return info


def run_em_benchmark(
    n_samples: int = 60000,
    n_features: int = 128,
    n_groups: int = 10,
    n_components: int = 5,
    *,
    iters: int = 5,
    repeats: int = 2,
    device: str | torch.device | None = None,
    references: tuple[str, ...] = ("sklearn_numpy", "sklearn_array_api"),
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``iters`` full-covariance EM iterations of ours and of the references.

    Returns a JSON-able dict with the machine, the workload, per implementation
    ``sec_per_iter``, ``gflops``, ``final_mean_log_likelihood`` (per group, after the
    timed fit) and the ratios ``speedup_vs_<reference>`` (reference time / ours).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = em_workload(n_samples, n_features, n_groups, n_components, seed)
    flops = 4.0 * n_samples * n_components * n_features**2
    results: dict[str, dict[str, Any]] = {}

    X_t = torch.from_numpy(data["X"]).to(device)
    y_t = torch.from_numpy(data["y"]).to(device)
    inits = {k: torch.from_numpy(data[k]).to(device) for k in ("weights", "means", "precisions")}

    def ours(max_iter: int) -> np.ndarray:
        model = BatchedGaussianMixture(
            n_components, weights_init=inits["weights"], means_init=inits["means"],
            precisions_init=inits["precisions"], tol=0.0, max_iter=max_iter, device=device,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(X_t, y_t)
        return model.lower_bound_.cpu().numpy()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sec, lower_bound = _per_iteration(ours, iters, repeats, device)
    results["idefender_gpu"] = {"sec_per_iter": sec, "final_mean_log_likelihood": lower_bound.tolist()}
    if device.type == "cuda":
        results["idefender_gpu"]["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)

    groups = [np.flatnonzero(data["y"] == g) for g in range(n_groups)]

    def sklearn_loop(to_array: Callable[[np.ndarray], Any], array_api: bool) -> Callable[[int], np.ndarray]:
        import sklearn
        from sklearn.mixture import GaussianMixture as SkGaussianMixture

        parts = [to_array(data["X"][idx]) for idx in groups]
        w = [to_array(data["weights"][g]) for g in range(n_groups)]
        m = [to_array(data["means"][g]) for g in range(n_groups)]
        p = [to_array(data["precisions"][g]) for g in range(n_groups)]

        def fit(max_iter: int) -> np.ndarray:
            out = []
            with warnings.catch_warnings(), sklearn.config_context(array_api_dispatch=array_api):
                warnings.simplefilter("ignore")
                for g in range(n_groups):
                    model = SkGaussianMixture(
                        n_components, weights_init=w[g], means_init=m[g], precisions_init=p[g],
                        init_params="random_from_data", tol=0.0, max_iter=max_iter,
                    ).fit(parts[g])
                    out.append(float(model.lower_bound_))
            return np.array(out)

        return fit

    for name in references:
        try:
            if name == "sklearn_numpy":
                fit = sklearn_loop(lambda a: a, array_api=False)
                ref_device = torch.device("cpu")
            elif name == "sklearn_array_api":
                fit = sklearn_loop(lambda a: torch.from_numpy(a).to(device), array_api=True)
                ref_device = device
            else:
                raise ValueError(f"unknown reference {name!r}")
            sec, lower_bound = _per_iteration(fit, iters, repeats, ref_device)
        except ImportError as exc:
            results[name] = {"skipped": f"not installed: {exc}"}
            continue
        except RuntimeError as exc:
            results[name] = {"skipped": str(exc)}
            continue
        results[name] = {"sec_per_iter": sec, "final_mean_log_likelihood": lower_bound.tolist()}

    peak = _matmul_rate(device)
    ours_ll = np.array(results["idefender_gpu"]["final_mean_log_likelihood"])
    for name, entry in results.items():
        if "sec_per_iter" not in entry:
            continue
        entry["gflops"] = flops / entry["sec_per_iter"] / 1e9
        entry["fraction_of_matmul_peak"] = entry["gflops"] * 1e9 / peak
        if name != "idefender_gpu":
            ll = np.array(entry["final_mean_log_likelihood"])
            entry["max_rel_diff_log_likelihood_vs_ours"] = float(np.max(np.abs(ll - ours_ll) / np.abs(ll)))
    ratios = {
        f"speedup_vs_{name}": entry["sec_per_iter"] / results["idefender_gpu"]["sec_per_iter"]
        for name, entry in results.items()
        if name != "idefender_gpu" and "sec_per_iter" in entry
    }
    return {
        "benchmark": "em_full_fixed_iterations",
        "machine": _machine(device),
        "workload": {
            "n_samples": n_samples, "n_features": n_features, "n_groups": n_groups,
            "n_components": n_components, "covariance_type": "full", "dtype": "float32",
            "iters": iters, "repeats": repeats, "seed": seed,
        },
        "matmul_gflops": peak / 1e9,
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "results": results,
        "ratios": ratios,
    }


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of benchmark records (one row per implementation)."""
    lines = [
        "| machine | workload | implementation | s / EM iteration | GFLOP/s | % of matmul peak | speed-up of ours |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for record in records:
        w = record["workload"]
        m = record["machine"]
        where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} threads)"
        shape = f"{w['n_samples']}x{w['n_features']}, G={w['n_groups']}, K={w['n_components']}, {w['covariance_type']}, {w['dtype']}"
        ours = record["results"]["idefender_gpu"]["sec_per_iter"]
        for name, entry in record["results"].items():
            if "sec_per_iter" not in entry:
                lines.append(f"| {where} | {shape} | {name} | skipped: {entry.get('skipped', '')} | | | |")
                continue
            speedup = "1.0" if name == "idefender_gpu" else f"{entry['sec_per_iter'] / ours:.1f}x"
            lines.append(
                f"| {where} | {shape} | {name} | {entry['sec_per_iter']:.4f} | {entry['gflops']:.1f} | "
                f"{100 * entry['fraction_of_matmul_peak']:.0f}% | {speedup} |"
            )
    return "\n".join(lines)
