"""Benchmark harness: batched EM against scikit-learn (and torchgmm) on the same data.

Two entry points, both behind ``idefender-gpu bench``:

:func:`run_em_benchmark` (``idefender-gpu bench`` without ``--workload``): workload (a)
by default, a fixed number of full-covariance EM iterations of

* ``idefender_gpu``: :class:`~idefender_gpu.mixture.BatchedGaussianMixture`, all groups in
  one batched pass, on the chosen device;
* ``sklearn_numpy``: ``sklearn.mixture.GaussianMixture`` on NumPy, a loop over the groups;
* ``sklearn_array_api``: the same on torch tensors through scikit-learn's array-API mode
  (``SCIPY_ARRAY_API=1``, explicit inits: its fastest path), on the same device.

All three start from the same ``weights_init`` / ``means_init`` / ``precisions_init`` and run a
fixed number of EM iterations (``tol=0``). Seconds per EM iteration are
``(T(1 + iters) - T(1)) / iters`` (initialisation and validation cancel out), with the
fastest of ``repeats`` runs of each. CUDA is synchronised before every clock read. FLOP/s
count the two ``N K D²`` GEMM passes of an iteration (Mahalanobis terms and centred
covariances, ``4 N K D²`` flops), against the dense float32 matmul rate of the same device
measured in the same run.

:func:`run_workload` (``idefender-gpu bench --workload NAME``): the named shapes of
:data:`WORKLOADS` (a, b, c1, c2, d-diag, d-full), each with our backends and the references
(scikit-learn on NumPy, scikit-learn array-API on torch, torchgmm where it is installed):
seconds per iteration as above, one fit to ``tol`` from the same initialisation (iterations,
convergence, final mean log-likelihood, peak memory), FLOP/s (:data:`FLOP_FORMULAS`) against
the matmul rate of the implementation's device, and a time limit per implementation that
turns over-long phases into honest estimates. Records are JSON; :func:`format_records`
renders every kind as markdown (``idefender-gpu bench --table``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

# scikit-learn's array-API mode needs this before SciPy is first imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from idefender_gpu.mixture import BatchedGaussianMixture  # noqa: E402

logger = logging.getLogger("idefender_gpu.bench")

__all__ = [
    "FLOP_FORMULAS",
    "REFERENCES",
    "WORKLOADS",
    "Workload",
    "backend_row",
    "em_data",
    "em_data_torch",
    "em_workload",
    "flops_per_iteration",
    "format_backend_table",
    "format_records",
    "format_table",
    "format_workload_table",
    "machine_info",
    "matmul_rate",
    "precisions_init",
    "run_em_benchmark",
    "run_workload",
    "scaled_workload",
    "sync",
]


def em_data(n_samples: int, n_features: int, n_groups: int, n_components: int,
             seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`em_workload` with diagonal initial precisions ``prec_diag (G, K, D)``.

    One ``(n_g, D) @ (D, D)`` product per cluster (never an ``(N, D, D)`` array), so the
    shapes of the big workloads fit in memory.
    """
    rng = np.random.default_rng(seed)
    y = np.arange(n_samples) % n_groups
    rng.shuffle(y)
    X = np.empty((n_samples, n_features), dtype=np.float32)
    weights = np.full((n_groups, n_components), 1.0 / n_components, dtype=np.float32)
    means = np.empty((n_groups, n_components, n_features), dtype=np.float32)
    prec_diag = np.empty((n_groups, n_components, n_features), dtype=np.float32)
    for g in range(n_groups):
        idx = np.flatnonzero(y == g)
        centres = rng.normal(scale=3.0, size=(n_components, n_features))
        mixing = rng.normal(size=(n_components, n_features, n_features)) / np.sqrt(n_features)
        comp = rng.integers(0, n_components, size=idx.size)
        noise = rng.normal(size=(idx.size, n_features))
        mixed = np.empty_like(noise)  # (n_g, D): noise_i @ mixing[comp_i]
        order = np.argsort(comp, kind="stable")
        bounds = np.searchsorted(comp[order], np.arange(n_components + 1))
        for k in range(n_components):
            rows = order[bounds[k]:bounds[k + 1]]
            mixed[rows] = noise[rows] @ mixing[k]
        X[idx] = centres[comp] + mixed + 0.5 * noise
        # One random sample of each cluster as the initial means: from random samples of the
        # whole group, EM can shrink a component onto fewer than D samples (a singular
        # covariance: 60000x128, K=5 fails within 5 iterations in every implementation).
        picks = [rng.choice(idx[comp == k]) if (comp == k).any() else rng.choice(idx)
                 for k in range(n_components)]
        means[g] = X[picks]
        prec_diag[g] = 1.0 / X[idx].var(0)
    return {"X": X, "y": y, "weights": weights, "means": means, "prec_diag": prec_diag}


def em_workload(n_samples: int, n_features: int, n_groups: int, n_components: int,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic class-conditional data and a shared initialisation (float32).

    Each group holds ``n_components`` anisotropic Gaussian clusters. The initial means are
    one random sample of each cluster, the weights uniform and the precisions the inverse of
    the group's per-feature variance (diagonal matrices, in the 'full' layout).
    """
    data = em_data(n_samples, n_features, n_groups, n_components, seed)
    return {
        "X": data["X"], "y": data["y"], "weights": data["weights"], "means": data["means"],
        "precisions": precisions_init(data["prec_diag"], "full"),
    }


def precisions_init(prec_diag: np.ndarray | torch.Tensor, covariance_type: str):
    """``precisions_init`` of ``covariance_type`` from diagonal precisions ``(..., K, D)``.

    'full': ``(..., K, D, D)`` diagonal matrices; 'diag': unchanged; 'spherical': the mean
    over features ``(..., K)``; 'tied': the first component's ``(..., D, D)``.
    """
    xp_diag = torch.diag_embed if isinstance(prec_diag, torch.Tensor) else _np_diag_embed
    if covariance_type == "full":
        return xp_diag(prec_diag)
    if covariance_type == "diag":
        return prec_diag
    if covariance_type == "spherical":
        return prec_diag.mean(-1)
    if covariance_type == "tied":
        return xp_diag(prec_diag[..., 0, :])
    raise ValueError(f"covariance_type must be one of full, tied, diag, spherical; got {covariance_type!r}")


def _np_diag_embed(a: np.ndarray) -> np.ndarray:
    out = np.zeros(a.shape + a.shape[-1:], dtype=a.dtype)
    idx = np.arange(a.shape[-1])
    out[..., idx, idx] = a
    return out


def sync(device: torch.device) -> None:
    """``torch.cuda.synchronize`` on CUDA devices, nothing elsewhere (before reading clocks)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_iteration(fit: Callable[[int], Any], iters: int, repeats: int,
                   device: torch.device) -> tuple[float, Any]:
    """Seconds per EM iteration, ``(min T(1 + iters) - min T(1)) / iters`` over ``repeats``
    (the minimum of each clock is the least disturbed by other processes), and the last long
    fit's result."""
    fit(1)  # warm-up (allocators, kernel caches, KeOps/BLAS initialisation)
    best1 = best2 = float("inf")
    result = None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fit(1)
        sync(device)
        t1 = time.perf_counter()
        result = fit(1 + iters)
        sync(device)
        t2 = time.perf_counter()
        best1, best2 = min(best1, t1 - t0), min(best2, t2 - t1)
    return max(best2 - best1, 0.0) / iters, result  # 0: below the noise of the clock


def matmul_rate(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Dense float32 matmul FLOP/s of ``device`` (best of ``repeats``), measured now."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model, core and thread counts, library versions and the device (JSON-able)."""
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
    threads = {v: os.environ[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
               if v in os.environ}
    if threads:
        info["thread_environment"] = threads
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

    peak = matmul_rate(device)
    ours_ll = np.array(results["idefender_gpu"]["final_mean_log_likelihood"])
    for name, entry in results.items():
        if "sec_per_iter" not in entry:
            continue
        if entry["sec_per_iter"] > 0:
            entry["gflops"] = flops / entry["sec_per_iter"] / 1e9
            entry["fraction_of_matmul_peak"] = entry["gflops"] * 1e9 / peak
        if name != "idefender_gpu":
            ll = np.array(entry["final_mean_log_likelihood"])
            entry["max_rel_diff_log_likelihood_vs_ours"] = float(np.max(np.abs(ll - ours_ll) / np.abs(ll)))
    ours_sec = results["idefender_gpu"]["sec_per_iter"]
    ratios = {
        f"speedup_vs_{name}": entry["sec_per_iter"] / ours_sec
        for name, entry in results.items()
        if name != "idefender_gpu" and "sec_per_iter" in entry and ours_sec > 0
    }
    return {
        "benchmark": "em_full_fixed_iterations",
        "machine": machine_info(device),
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


# --------------------------------------------------------------------------------------
# Named workloads (issue 4): per-iteration time, fit to tol, memory, FLOP/s, references
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A named benchmark shape: ``n_groups`` mixtures of ``n_components`` on ``(N, D)`` data.

    ``backends`` are our backends to run; ``gpu_only`` workloads are skipped (and recorded
    as skipped) on a CPU; ``generator`` picks the synthetic data: ``'numpy'``
    (:func:`em_data`, on the host) or ``'torch'`` (:func:`em_data_torch`, on the device).
    """

    name: str
    n_samples: int
    n_features: int
    n_groups: int
    n_components: int
    covariance_type: str
    backends: tuple[str, ...] = ("torch",)
    gpu_only: bool = False
    reg_covar: float = 1e-6
    generator: str = "numpy"
    description: str = ""


WORKLOADS: dict[str, Workload] = {
    "a": Workload("a", 60_000, 128, 10, 5, "full",
                  description="MNIST-sized hidden states: 10 classes, K=5, full"),
    "b": Workload("b", 50_000, 512, 10, 3, "full",
                  description="CIFAR-10-sized 512-d features: 10 classes, K=3, full"),
    "c1": Workload("c1", 1_281_167, 4096, 1000, 1, "full", gpu_only=True, reg_covar=1e-2,
                   generator="torch",
                   description="ImageNet-1k train-set shape, 4096-d synthetic features, 1000 "
                               "classes, K=1, full (reg_covar=1e-2: ~1281 samples per class < D, "
                               "so every sample covariance is singular)"),
    "c2": Workload("c2", 1_281_167, 4096, 1000, 2, "full", gpu_only=True, reg_covar=1e-2,
                   generator="torch",
                   description="as c1 with K=2"),
    "d-diag": Workload("d-diag", 1_000_000, 16, 1, 256, "diag", backends=("torch", "keops"),
                       description="many components, few features (where KeOps should win): "
                                   "G=1, K=256, diag"),
    "d-full": Workload("d-full", 1_000_000, 16, 1, 256, "full", backends=("torch", "keops"),
                       description="as d-diag with full covariances"),
}

#: The references a workload run tries, in order.
REFERENCES = ("sklearn_numpy", "sklearn_array_api", "torchgmm")

#: Our counting of the floating-point work of one EM iteration, per covariance type: the
#: multiply-adds (2 flops each) of the N x K x D (or N x D x D) products an iteration needs,
#: whatever the backend actually executes (KeOps recomputes the E-step inside its M-step).
FLOP_FORMULAS = {
    "full": "4 N K D^2: two N K D^2 GEMM passes (Mahalanobis terms; centred covariances)",
    "tied": "4 N D^2 + 4 N K D: whitening and shared covariance (N D^2 each), distances and "
            "r^T x (N K D each)",
    "diag": "8 N K D: four N K D products (E-step x^2 p and x (mu p); M-step r^T x and r^T x^2)",
    "spherical": "4 N K D: two N K D products (E-step x mu; M-step r^T x)",
}


def flops_per_iteration(n_samples: int, n_components: int, n_features: int,
                        covariance_type: str) -> float:
    """Floating-point operations of one EM iteration, as :data:`FLOP_FORMULAS` states."""
    N, K, D = float(n_samples), float(n_components), float(n_features)
    return {
        "full": 4 * N * K * D * D,
        "tied": 4 * N * D * D + 4 * N * K * D,
        "diag": 8 * N * K * D,
        "spherical": 4 * N * K * D,
    }[covariance_type]


def scaled_workload(workload: Workload, *, n_samples: int | None = None,
                    n_features: int | None = None, n_groups: int | None = None,
                    n_components: int | None = None, scale: float | None = None) -> Workload:
    """``workload`` with some shapes overridden, and ``n_samples`` multiplied by ``scale``
    (at least two samples per component in every group)."""
    changes: dict[str, Any] = {}
    for key, value in (("n_samples", n_samples), ("n_features", n_features),
                       ("n_groups", n_groups), ("n_components", n_components)):
        if value is not None:
            changes[key] = value
    out = replace(workload, **changes)
    if scale is not None:
        floor = 2 * out.n_groups * out.n_components
        out = replace(out, n_samples=max(floor, int(round(out.n_samples * scale))))
    return out


def em_data_torch(n_samples: int, n_features: int, n_groups: int, n_components: int,
                  seed: int = 0, device: str | torch.device = "cpu",
                  rank: int = 64) -> dict[str, Tensor]:
    """Synthetic features generated on ``device`` (float32), rows sorted by group.

    For shapes too big for the host path of :func:`em_data` (ImageNet-sized). Each group
    holds ``n_components`` clusters ``centre_k + z A_k + noise / 2`` with a random rank-``rank``
    factor ``A_k``; the initialisation is as in :func:`em_data` (a random sample of each
    cluster as means, uniform weights, inverse per-feature variances as diagonal precisions).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    G, K, D = n_groups, n_components, n_features
    r = min(rank, D)
    counts = torch.full((G,), n_samples // G, dtype=torch.int64)
    counts[: n_samples % G] += 1
    y = torch.repeat_interleave(torch.arange(G), counts).to(device)
    X = torch.empty(n_samples, D, dtype=torch.float32, device=device)
    weights = torch.full((G, K), 1.0 / K, dtype=torch.float32, device=device)
    means = torch.empty(G, K, D, dtype=torch.float32, device=device)
    prec_diag = torch.empty(G, K, D, dtype=torch.float32, device=device)
    start = 0
    for g, n_g in enumerate(counts.tolist()):
        opts = {"generator": gen, "device": device}
        centres = 3.0 * torch.randn(K, D, **opts)
        factors = torch.randn(K, r, D, **opts) / r**0.5
        comp = torch.randint(0, K, (n_g,), **opts)
        Xg = centres[comp] + 0.5 * torch.randn(n_g, D, **opts)  # (n_g, D)
        z = torch.randn(n_g, r, **opts)
        for k in range(K):
            rows = (comp == k).nonzero().squeeze(-1)
            Xg[rows] += z[rows] @ factors[k]
        X[start:start + n_g] = Xg
        for k in range(K):  # one random sample of each cluster as the initial means
            rows = (comp == k).nonzero().squeeze(-1)
            if rows.numel() == 0:
                rows = torch.arange(n_g, device=device)
            means[g, k] = Xg[rows[torch.randint(0, rows.numel(), (1,), **opts)]].squeeze(0)
        prec_diag[g] = 1.0 / Xg.var(0).unsqueeze(0)
        start += n_g
    return {"X": X, "y": y, "weights": weights, "means": means, "prec_diag": prec_diag}


class _Data:
    """A workload's data and initialisation as tensors, with the rows of each group."""

    def __init__(self, workload: Workload, seed: int, device: torch.device) -> None:
        w = workload
        if w.generator == "torch":
            raw = em_data_torch(w.n_samples, w.n_features, w.n_groups, w.n_components, seed, device)
        else:
            raw = {k: torch.from_numpy(v) for k, v in
                   em_data(w.n_samples, w.n_features, w.n_groups, w.n_components, seed).items()}
        self.X, self.y = raw["X"], raw["y"]
        self.weights, self.means, self.prec_diag = raw["weights"], raw["means"], raw["prec_diag"]
        counts = torch.bincount(self.y.cpu(), minlength=w.n_groups)
        self.offsets = [0] + torch.cumsum(counts, 0).tolist()
        self.order = torch.argsort(self.y, stable=True)  # rows sorted by group

    def rows(self, start: int, stop: int) -> Tensor:
        """Row indices of groups ``start .. stop - 1``."""
        return self.order[self.offsets[start]:self.offsets[stop]]


class _Implementation:
    """One implementation under test: ``fit(groups, max_iter, tol)`` over a range of groups."""

    name = ""
    notes = ""

    def __init__(self, data: _Data, workload: Workload, device: torch.device) -> None:
        self.data, self.workload, self.device = data, workload, device
        self.probe_groups = workload.n_groups if workload.n_groups <= 10 else 2

    def fit(self, groups: range, max_iter: int, tol: float) -> dict[str, np.ndarray]:
        """Per group of ``groups``: ``lower_bound``, ``n_iter``, ``converged`` (NumPy)."""
        raise NotImplementedError


class _Ours(_Implementation):
    notes = "BatchedGaussianMixture: all groups in one batched fit"

    def __init__(self, data, workload, device, backend: str, group_block: int | None,
                 memory_budget: int | None) -> None:
        super().__init__(data, workload, device)
        self.backend, self.memory_budget = backend, memory_budget
        self.name = f"idefender_gpu[{backend}]"
        self.X, self.y = data.X.to(device), data.y.to(device)
        self.order = data.order.to(device)
        self.weights, self.means = data.weights.to(device), data.means.to(device)
        self.prec_diag = data.prec_diag.to(device)
        self.group_block = group_block or _auto_group_block(workload, device)
        self.probe_groups = min(workload.n_groups, self.group_block)
        if self.group_block < workload.n_groups:
            self.notes = (
                f"BatchedGaussianMixture on blocks of {self.group_block} groups, one block after "
                "another, each block's fitted parameters dropped after its fit (a benchmark of "
                "the EM work: G*K*D^2 float32 covariances of all groups would not fit on the "
                "device, nor, several times over, in host memory for storage_device)"
            )

    def fit(self, groups, max_iter, tol):
        w, out = self.workload, []
        for start in range(groups.start, groups.stop, self.group_block):
            stop = min(start + self.group_block, groups.stop)
            if start == 0 and stop == w.n_groups:
                X, y = self.X, self.y
            else:
                rows = self.order[self.data.offsets[start]:self.data.offsets[stop]]
                X, y = self.X[rows], self.y[rows] - start
            model = BatchedGaussianMixture(
                w.n_components, covariance_type=w.covariance_type, tol=tol, reg_covar=w.reg_covar,
                max_iter=max_iter, weights_init=self.weights[start:stop],
                means_init=self.means[start:stop],
                precisions_init=precisions_init(self.prec_diag[start:stop], w.covariance_type),
                device=self.device, backend=self.backend, memory_budget=self.memory_budget,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.fit(X, y)
            out.append((model.lower_bound_.cpu().numpy(), model.n_iter_.cpu().numpy(),
                        model.converged_.cpu().numpy()))
        return {key: np.concatenate([o[i] for o in out])
                for i, key in enumerate(("lower_bound", "n_iter", "converged"))}


def _auto_group_block(workload: Workload, device: torch.device) -> int:
    """Groups per batched fit: all of them, unless the device memory would not hold them."""
    w = workload
    if device.type != "cuda":
        return w.n_groups
    free, _ = torch.cuda.mem_get_info(device)
    n_max = -(-w.n_samples // w.n_groups) * 1.1
    cov = {"full": w.n_components * w.n_features**2, "tied": w.n_features**2,
           "diag": w.n_components * w.n_features, "spherical": w.n_components}[w.covariance_type]
    # ~10 parameter-sized arrays (covariances, factors, M-step temporaries, inits) and a few
    # copies of the padded samples, in float32.
    per_group = 4 * (10 * cov + 4 * n_max * w.n_features + 4 * n_max * w.n_components)
    return int(max(1, min(w.n_groups, 0.5 * free // per_group)))


class _Sklearn(_Implementation):
    def __init__(self, data, workload, device, array_api: bool) -> None:
        super().__init__(data, workload, device if array_api else torch.device("cpu"))
        import sklearn  # noqa: F401 - ImportError: recorded as skipped

        self.array_api = array_api
        self.name = "sklearn_array_api" if array_api else "sklearn_numpy"
        self.notes = ("scikit-learn GaussianMixture, one fit per group (a Python loop), same "
                      "explicit inits" + (" on torch tensors, array_api_dispatch=True, "
                                          "SCIPY_ARRAY_API=1" if array_api else " on NumPy"))
        if array_api and os.environ.get("SCIPY_ARRAY_API") != "1":
            raise RuntimeError("SCIPY_ARRAY_API=1 must be set before SciPy is imported")
        self._parts: dict[int, tuple] = {}

    def _part(self, g: int) -> tuple:
        if g not in self._parts:
            d, ctype = self.data, self.workload.covariance_type
            arrays = (d.X[d.rows(g, g + 1)], d.weights[g], d.means[g],
                      precisions_init(d.prec_diag[g], ctype))
            if self.array_api:
                arrays = tuple(a.to(self.device) for a in arrays)
            else:
                arrays = tuple(a.cpu().numpy() for a in arrays)
            self._parts[g] = arrays
        return self._parts[g]

    def fit(self, groups, max_iter, tol):
        import sklearn
        from sklearn.mixture import GaussianMixture as SkGaussianMixture

        w = self.workload
        out = {"lower_bound": [], "n_iter": [], "converged": []}
        with warnings.catch_warnings(), sklearn.config_context(array_api_dispatch=self.array_api):
            warnings.simplefilter("ignore")
            for g in groups:
                X, weights, means, precisions = self._part(g)
                model = SkGaussianMixture(
                    w.n_components, covariance_type=w.covariance_type, tol=tol,
                    reg_covar=w.reg_covar, max_iter=max_iter, weights_init=weights,
                    means_init=means, precisions_init=precisions, init_params="random_from_data",
                ).fit(X)
                out["lower_bound"].append(float(model.lower_bound_))
                out["n_iter"].append(int(model.n_iter_))
                out["converged"].append(bool(model.converged_))
        return {k: np.array(v) for k, v in out.items()}


class _TorchGMM(_Implementation):
    name = "torchgmm"

    def __init__(self, data, workload, device) -> None:
        super().__init__(data, workload, device)
        from importlib.metadata import version

        from torchgmm.bayes import GaussianMixture  # noqa: F401 - ImportError: skipped

        self.version = version("torchgmm")
        self.notes = (
            f"torchgmm {self.version} (PyTorch Lightning): one mixture per call, so a Python loop "
            "over the groups; it takes only init_means (our means_init) and computes its own "
            "initial covariances and weights from the data, so its iterations and "
            "log-likelihoods are not from our initialisation; tol is its convergence_tolerance "
            "on the mean negative log-likelihood; each call builds a Lightning Trainer"
        )
        for name in ("lightning.pytorch", "pytorch_lightning", "lightning_fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self._parts: dict[int, tuple[Tensor, Tensor]] = {}

    def fit(self, groups, max_iter, tol):
        from torchgmm.bayes import GaussianMixture as TgGaussianMixture

        w, d = self.workload, self.data
        accelerator = "gpu" if self.device.type == "cuda" else "cpu"
        out = {"lower_bound": [], "n_iter": [], "converged": []}
        for g in groups:
            if g not in self._parts:
                self._parts[g] = (d.X[d.rows(g, g + 1)].to(self.device), d.means[g].to(self.device))
            X, means = self._parts[g]
            model = TgGaussianMixture(
                w.n_components, covariance_type=w.covariance_type, init_means=means,
                convergence_tolerance=tol, covariance_regularization=w.reg_covar,
                trainer_params={"max_epochs": max_iter, "accelerator": accelerator, "devices": 1,
                                "enable_progress_bar": False, "logger": False,
                                "enable_checkpointing": False, "enable_model_summary": False},
            )
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                model.fit(X)
            out["lower_bound"].append(-float(model.nll_))
            out["n_iter"].append(int(model.num_iter_))
            out["converged"].append(bool(model.converged_))
        return {k: np.array(v) for k, v in out.items()}


def _make_implementation(name: str, data: _Data, workload: Workload, device: torch.device,
                         group_block: int | None = None,
                         memory_budget: int | None = None) -> _Implementation:
    if name.startswith("idefender_gpu["):
        backend = name[len("idefender_gpu["):-1]
        return _Ours(data, workload, device, backend, group_block, memory_budget)
    if name == "sklearn_numpy":
        return _Sklearn(data, workload, device, array_api=False)
    if name == "sklearn_array_api":
        return _Sklearn(data, workload, device, array_api=True)
    if name == "torchgmm":
        return _TorchGMM(data, workload, device)
    raise ValueError(f"unknown implementation {name!r}; expected one of "
                     f"idefender_gpu[<backend>], {', '.join(REFERENCES)}")


def _clock(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def _probe(impl: _Implementation) -> dict[str, Any]:
    """Warm-up, then ``T(1)`` and ``T(3)`` on the first ``probe_groups`` groups, scaled to G."""
    G = impl.workload.n_groups
    sub = range(impl.probe_groups)
    impl.fit(sub, 1, 0.0)  # warm-up (allocators, BLAS, KeOps modules, Lightning imports)
    t1, _ = _clock(lambda: impl.fit(sub, 1, 0.0), impl.device)
    t3, _ = _clock(lambda: impl.fit(sub, 3, 0.0), impl.device)
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
        code = "import sys; from idefender_gpu.bench import _runner_main; _runner_main(*sys.argv[1:])"
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
    data = _Data(workload, spec["seed"], device if workload.generator == "torch" else torch.device("cpu"))
    result: dict[str, Any] = {}
    if spec["impl"] is not None:
        impl = _make_implementation(spec["impl"], data, workload, device, spec["group_block"],
                                    spec["memory_budget"])
        result = _fit_to_tol(impl, spec["max_iter"], spec["tol"], spec["warm_up"])
    Path(out_path).write_text(json.dumps(result))


def _fit_to_tol(impl: _Implementation, max_iter: int, tol: float,
                warm_up: bool = True) -> dict[str, Any]:
    """One warm-up iteration (on the probe groups), then the timed fit to ``tol`` from the
    explicit inits."""
    groups = range(impl.workload.n_groups)
    if warm_up:
        impl.fit(range(impl.probe_groups), 1, 0.0)
    seconds, out = _clock(lambda: impl.fit(groups, max_iter, tol), impl.device)
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

    Returns a JSON-able record (``benchmark: 'em_workload'``).
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
    data = _Data(spec, seed, device if spec.generator == "torch" else torch.device("cpu"))
    rates: dict[str, float] = {}
    results: dict[str, dict[str, Any]] = {}
    names = [f"idefender_gpu[{b}]" for b in spec.backends] + list(references)
    runner_spec = {"workload": asdict(spec), "seed": seed, "device": str(device),
                   "group_block": group_block, "memory_budget": memory_budget}
    for name in names:
        try:
            impl = _make_implementation(name, data, spec, device, group_block, memory_budget)
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

        entry: dict[str, Any] = {"device": str(impl.device), "notes": impl.notes}
        if isinstance(impl, _Ours):
            entry["backend"], entry["group_block"] = impl.backend, impl.group_block
        if isinstance(impl, _TorchGMM):
            entry["version"] = impl.version
        results[name] = entry
        try:
            _measure(impl, entry, runner_spec, name, iters, repeats, tol, max_iter, limit_s,
                     baseline)
        except Exception as exc:  # noqa: BLE001 - a failed implementation is recorded
            entry["error"] = f"{type(exc).__name__}: {exc}"
            continue
        if entry.get("sec_per_iter", 0.0) > 0.0:  # 0: below the noise of the clock
            kind = impl.device.type
            if kind not in rates:
                rates[kind] = matmul_rate(impl.device)
            entry["gflops"] = header["flops_per_iteration"] / entry["sec_per_iter"] / 1e9
            entry["fraction_of_matmul_peak"] = entry["gflops"] * 1e9 / rates[kind]
    header["matmul_gflops"] = {kind: rate / 1e9 for kind, rate in rates.items()}
    header["results"] = results
    header["ratios"] = _ratios(results)
    header["wall_seconds"] = time.perf_counter() - t_start
    return header


def _measure(impl: _Implementation, entry: dict[str, Any], runner_spec: dict[str, Any],
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
            best1 = min(best1, _clock(lambda: fit(1), impl.device)[0])
            best2 = min(best2, _clock(lambda: fit(1 + iters), impl.device)[0])
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
            if name == "idefender_gpu":
                speedup = "1.0"
            else:
                speedup = f"{entry['sec_per_iter'] / ours:.1f}x" if ours > 0 else ""
            gflops = f"{entry['gflops']:.1f}" if "gflops" in entry else ""
            peak = f"{100 * entry['fraction_of_matmul_peak']:.0f}%" if "gflops" in entry else ""
            lines.append(
                f"| {where} | {shape} | {name} | {entry['sec_per_iter']:.4f} | {gflops} | "
                f"{peak} | {speedup} |"
            )
    return "\n".join(lines)


def _bytes(n: float | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f} GiB"


def format_workload_table(records: list[dict[str, Any]]) -> str:
    """Markdown table of named-workload records (one row per implementation)."""
    lines = [
        "| workload | machine | implementation | s / EM iteration | fit to tol: s (iterations, "
        "converged) | final mean log-lik. | peak memory | GFLOP/s | % of matmul peak | "
        "speed-up of ours |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for record in records:
        w, m = record["workload"], record["machine"]
        where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} threads)"
        shape = (f"{w['name']}: {w['n_samples']}x{w['n_features']}, G={w['n_groups']}, "
                 f"K={w['n_components']}, {w['covariance_type']}")
        if "skipped" in record:
            lines.append(f"| {shape} | {where} | - | skipped: {record['skipped']} | | | | | | |")
            continue
        ours = record["ratios"].get("ours")
        for name, entry in record["results"].items():
            if "sec_per_iter" not in entry:
                reason = entry.get("skipped") or entry.get("error", "")
                lines.append(f"| {shape} | {where} | {name} | {reason} | | | | | | |")
                continue
            fit = entry.get("fit", {})
            if "seconds" in fit:
                capped = ""
                if fit.get("max_iter_capped_by_time_limit") and fit["n_iter_max"] >= fit["max_iter"]:
                    capped = f", stopped at max_iter={fit['max_iter']} by the time limit"
                conv = "yes" if fit["converged"] else f"{100 * fit['converged_fraction']:.0f}%"
                fit_cell = f"{fit['seconds']:.1f} ({fit['n_iter_max']}, {conv}{capped})"
                ll = f"{fit['final_mean_log_likelihood']:.4f}"
                mem = _bytes(fit.get("peak_memory_bytes"))
            else:
                fit_cell, ll, mem = fit.get("skipped", entry.get("error", "")), "", ""
            if name == ours:
                speedup = "1.0"
            else:
                ratio = record["ratios"].get(f"speedup_vs_{name}")
                speedup = "" if ratio is None else f"{ratio:.2g}x"
            gflops = f"{entry['gflops']:.1f}" if "gflops" in entry else ""
            peak = f"{100 * entry['fraction_of_matmul_peak']:.1f}%" if "gflops" in entry else ""
            lines.append(
                f"| {shape} | {where} | {name} | {entry['sec_per_iter']:.4f} | {fit_cell} | {ll} | "
                f"{mem} | {gflops} | {peak} | {speedup} |"
            )
    return "\n".join(lines)


def _backend_cell(entry: dict[str, Any]) -> str:
    if "sec_per_iter" not in entry:
        return "error"
    mark = ""
    if entry.get("extrapolated"):
        mark = " (extrap.)"
    elif "T(0)" in entry.get("method", ""):
        mark = " (1 sample)"
    return f"{entry['sec_per_iter']:.4f}{mark}"


def backend_row(row: dict[str, Any]) -> str:
    """One markdown row of the backend grid: ctype, D, K, N, dense, keops, winner, ratio."""
    winner = row.get("winner", "-")
    ratio = f"{row['ratio_dense_over_keops']:.2f}" if "ratio_dense_over_keops" in row else "-"
    return (f"| {row['covariance_type']} | {row['n_features']} | {row['n_components']} | "
            f"{row['n_samples']} | {_backend_cell(row['torch'])} | {_backend_cell(row['keops'])} | "
            f"{winner} | {ratio} |")


def format_backend_table(record: dict[str, Any]) -> str:
    """Markdown table of a backend-grid record (``benchmarks/bench_backends.py``)."""
    m = record["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['torch_threads']} threads)"
    lines = [
        f"Backends on {where}, float32, G=1: seconds per EM iteration; ratio = dense / KeOps "
        "(above 1: KeOps faster)",
        "",
        "| ctype | D | K | N | dense s/it | keops s/it | winner | ratio dense/keops |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    lines += [backend_row(row) for row in record["rows"]]
    return "\n".join(lines)


def format_records(records: list[dict[str, Any]]) -> str:
    """Every kind of benchmark record as markdown: the fixed-iteration table
    (:func:`format_table`), the named workloads and the backend grids."""
    parts = []
    legacy = [r for r in records if r.get("benchmark") == "em_full_fixed_iterations"]
    workloads = [r for r in records if r.get("benchmark") == "em_workload"]
    if legacy:
        parts.append(format_table(legacy))
    if workloads:
        parts.append(format_workload_table(workloads))
    parts += [format_backend_table(r) for r in records if r.get("benchmark") == "em_backends"]
    return "\n\n".join(parts)
