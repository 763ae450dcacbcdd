"""k-means++ seeding and Lloyd iterations on the device, batched over groups (private).

Used to initialise the mixtures (``init_params='kmeans'`` and ``'k-means++'``) without
scikit-learn. Shapes: ``X (G, N, D)``, ``weight (G, N)`` (one for samples, zero for the
padding of groups of unequal sizes), ``counts (G,)`` real samples per group.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from idefender_gpu.kernels import chunk_rows


def _sq_dist(X: Tensor, centers: Tensor, memory_budget: int | None) -> Tensor:
    """Squared Euclidean distances ``(G, N, T)`` between ``X (G, N, D)`` and ``centers (G, T, D)``."""
    G, N, D = X.shape
    T = centers.shape[1]
    c_sq = centers.square().sum(-1).unsqueeze(-2)  # (G, 1, T)
    rows = chunk_rows(N, 2 * G * (T + D) * X.element_size(), memory_budget, X.device)
    out = X.new_empty(G, N, T)  # allocated once: see kernels._dense._output
    for start in range(0, N, rows):
        xc = X[:, start : start + rows]  # (G, c, D)
        x_sq = xc.square().sum(-1, keepdim=True)  # (G, c, 1)
        out[:, start : start + rows] = torch.baddbmm(x_sq + c_sq, xc, centers.mT, alpha=-2).clamp_min_(0)
    return out  # (G, N, T)


def _gather_rows(X: Tensor, index: Tensor) -> Tensor:
    """``X[g, index[g, t]]`` -> ``(G, T, D)``."""
    return torch.gather(X, 1, index.unsqueeze(-1).expand(-1, -1, X.shape[-1]))


def kmeans_plusplus(
    X: Tensor,
    weight: Tensor,
    counts: Tensor,
    n_clusters: int,
    generator: torch.Generator,
    memory_budget: int | None = None,
) -> Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007), batched over groups.

    Each new centre is the best of ``2 + floor(log K)`` candidates drawn with probability
    proportional to the squared distance to the closest centre so far, as in
    scikit-learn's ``kmeans_plusplus``.

    Returns
    -------
    indices : Tensor of int64
        ``(G, K)`` indices (into each group's rows) of the chosen seeds.
    """
    G, N, D = X.shape
    n_trials = 2 + int(math.log(n_clusters))
    last = (counts - 1).unsqueeze(-1)  # (G, 1)
    first = torch.multinomial(weight, 1, generator=generator)  # (G, 1)
    indices = [first]
    closest = _sq_dist(X, _gather_rows(X, first), memory_budget).squeeze(-1) * weight  # (G, N)
    for _ in range(1, n_clusters):
        cumulative = closest.double().cumsum(-1)  # (G, N)
        potential = cumulative[:, -1:]  # (G, 1)
        draws = 1.0 - torch.rand(G, n_trials, generator=generator, device=X.device, dtype=torch.float64)
        candidates = torch.searchsorted(cumulative, draws * potential)  # (G, T)
        candidates = torch.minimum(candidates, last)
        dist = _sq_dist(X, _gather_rows(X, candidates), memory_budget).mT  # (G, T, N)
        trial_closest = torch.minimum(closest.unsqueeze(1), dist) * weight.unsqueeze(1)  # (G, T, N)
        best = trial_closest.sum(-1).argmin(-1, keepdim=True)  # (G, 1)
        closest = torch.gather(trial_closest, 1, best.unsqueeze(-1).expand(-1, 1, N)).squeeze(1)
        indices.append(torch.gather(candidates, 1, best))
    return torch.cat(indices, dim=1)  # (G, K)


def kmeans_lloyd(
    X: Tensor,
    weight: Tensor,
    centers: Tensor,
    *,
    max_iter: int = 300,
    tol: float = 1e-4,
    memory_budget: int | None = None,
) -> Tensor:
    """Lloyd's algorithm from ``centers (G, K, D)``; returns the labels ``(G, N)``.

    Stops when every group's squared centre shift is below ``tol`` times the mean
    per-feature variance of its samples (scikit-learn's criterion), or after
    ``max_iter`` iterations. An empty cluster keeps its centre. One host synchronisation
    per iteration.
    """
    G, N, D = X.shape
    K = centers.shape[1]
    counts = weight.sum(-1, keepdim=True)  # (G, 1)
    mean = (X * weight.unsqueeze(-1)).sum(1) / counts  # (G, D)
    var = (((X - mean.unsqueeze(1)).square() * weight.unsqueeze(-1)).sum(1) / counts).mean(-1)
    threshold = tol * var  # (G,)
    for _ in range(max_iter):
        labels = _sq_dist(X, centers, memory_budget).argmin(-1)  # (G, N)
        one_hot = torch.nn.functional.one_hot(labels, K).to(X.dtype) * weight.unsqueeze(-1)
        sizes = one_hot.sum(1).unsqueeze(-1)  # (G, K, 1)
        sums = one_hot.mT @ X  # (G, K, D)
        new_centers = torch.where(sizes > 0, sums / sizes.clamp_min(1), centers)
        shift = (new_centers - centers).square().sum((-1, -2))  # (G,)
        centers = new_centers
        if bool((shift <= threshold).all()):
            break
    return _sq_dist(X, centers, memory_budget).argmin(-1)
