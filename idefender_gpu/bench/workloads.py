"""Named benchmark workloads, their FLOP counts and their synthetic data.

:data:`WORKLOADS` names the shapes (a, b, c1, c2, d-diag, d-full); :func:`em_data` (host,
NumPy) and :func:`em_data_torch` (on the device, for ImageNet-sized shapes) make the data and
the shared initialisation every implementation starts from; :class:`BenchData` holds them as
tensors with the rows of each group. Imports only NumPy and torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FLOP_FORMULAS",
    "WORKLOADS",
    "BenchData",
    "Workload",
    "em_data",
    "em_data_torch",
    "flops_per_iteration",
    "precisions_init",
    "scaled_workload",
]


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


def em_data(n_samples: int, n_features: int, n_groups: int, n_components: int,
             seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic class-conditional data and a shared initialisation (float32, on the host).

    Each group holds ``n_components`` anisotropic Gaussian clusters. Returns ``X (N, D)``,
    group labels ``y (N,)``, uniform ``weights (G, K)``, ``means (G, K, D)`` (one random
    sample of each cluster) and diagonal initial precisions ``prec_diag (G, K, D)`` (the
    inverse of the group's per-feature variance; :func:`precisions_init` makes the
    ``precisions_init`` of a covariance type from them). One ``(n_g, D) @ (D, D)`` product per cluster (never an ``(N, D, D)`` array), so the
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


class BenchData:
    """A workload's data and initialisation as tensors, with the rows of each group.

    Made on ``device`` for ``generator='torch'`` workloads, on the host otherwise (the
    caller passes the device it wants).
    """

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
