"""The in-memory data source: all samples in the padded group layout (private).

:func:`open_memory` validates ``X`` (and ``y``) once and lays the samples out as
``(G, N_max, D)`` on the storage device; :class:`InMemorySource` makes one E+M step per
call with the fit's backend (one pass over the tensor's chunks: the dense backend's fused
:func:`~idefender_gpu.kernels.em_pass`, statistics centred near the current means, as the
streamed and data-parallel fits), and draws the initial responsibilities of ``init_params``
(one function per value, a dispatch table).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu._validation import ArrayKind, check_array, resolve_device, resolve_dtype
from idefender_gpu.mixture._core import (
    Config,
    Groups,
    Params,
    Request,
    finish_m_step,
    group_layout,
    labels_for_fit,
    make_generator,
    peek,
)
from idefender_gpu.mixture._kmeans import kmeans_lloyd, kmeans_plusplus

# --------------------------------------------------------------------------------------
# Initialisation: one function per init_params value (dispatch table)
# --------------------------------------------------------------------------------------


def _one_hot_at(groups: Groups, indices: Tensor, n_components: int) -> Tensor:
    """Responsibilities ``(G, N, K)`` with ``resp[g, indices[g, k], k] = 1``."""
    G, N, _ = groups.X.shape
    resp = groups.X.new_zeros(G, N, n_components)
    columns = torch.arange(n_components, device=indices.device).expand_as(indices)
    resp[torch.arange(G, device=indices.device).unsqueeze(-1), indices, columns] = 1
    return resp


def _resp_kmeans(groups: Groups, K: int, gen: torch.Generator, budget: int | None) -> Tensor:
    weight = groups.dense_weight()
    seeds = kmeans_plusplus(groups.X, weight, groups.counts.long(), K, gen, budget)
    centers = torch.gather(groups.X, 1, seeds.unsqueeze(-1).expand(-1, -1, groups.X.shape[-1]))
    labels = kmeans_lloyd(groups.X, weight, centers, memory_budget=budget)  # (G, N)
    return torch.nn.functional.one_hot(labels, K).to(groups.X.dtype) * weight.unsqueeze(-1)


def _resp_kmeans_plusplus(groups: Groups, K: int, gen: torch.Generator, budget: int | None) -> Tensor:
    seeds = kmeans_plusplus(groups.X, groups.dense_weight(), groups.counts.long(), K, gen, budget)
    return _one_hot_at(groups, seeds, K)


def _resp_random(groups: Groups, K: int, gen: torch.Generator, budget: int | None) -> Tensor:
    G, N, _ = groups.X.shape
    resp = torch.rand(G, N, K, generator=gen, device=groups.X.device, dtype=groups.X.dtype)
    resp = resp / resp.sum(-1, keepdim=True)
    if groups.weight is not None:
        resp = resp * groups.weight.unsqueeze(-1)
    return resp


def _resp_random_from_data(groups: Groups, K: int, gen: torch.Generator, budget: int | None) -> Tensor:
    G, N, _ = groups.X.shape
    keys = torch.rand(G, N, generator=gen, device=groups.X.device, dtype=groups.X.dtype)
    if groups.weight is not None:
        keys = torch.where(groups.weight > 0, keys, -1.0)
    indices = keys.topk(K, dim=-1).indices  # (G, K) distinct rows of real samples
    return _one_hot_at(groups, indices, K)


INITIAL_RESP = {
    "kmeans": _resp_kmeans,
    "k-means++": _resp_kmeans_plusplus,
    "random": _resp_random,
    "random_from_data": _resp_random_from_data,
}


# --------------------------------------------------------------------------------------
# The source
# --------------------------------------------------------------------------------------


class InMemorySource:
    """Samples held in memory in the padded group layout; one E+M step per call
    (a :class:`~idefender_gpu.mixture._core.DataSource`).

    Parameters
    ----------
    groups : Groups
        The layout, on the storage device (moved block by block by :meth:`block`).
    device : torch.device
        The compute device.
    n_features : int
    kind : ArrayKind
    """

    make_generator = staticmethod(make_generator)
    check_info = staticmethod(kernels.check_cholesky_info)

    def __init__(self, groups: Groups, device: torch.device, n_features: int, kind: ArrayKind) -> None:
        self.groups = groups
        self.counts = groups.counts  # (G,)
        self.device = device
        self.n_features = n_features
        self.kind = kind

    def em_step(self, params: Params, cfg: Config) -> tuple[Tensor, Params, Tensor]:
        """Mean log-likelihood ``(G,)`` under ``params``, the new parameters and the
        Cholesky ``info`` of the new covariances: one pass of the backend (the dense one
        fused chunk by chunk), the statistics centred near the current means."""
        g = self.groups
        log_lik, counts, first, second = cfg.backend.pass_statistics(
            g.X, g.weight, params, cfg.covariance_type, cfg.memory_budget)
        stats = kernels.statistics_to_parameters(counts, first, second, params.stats_centres,
                                                 cfg.reg_covar, cfg.covariance_type)
        return (log_lik / g.counts, *finish_m_step(*stats, cfg))

    def block(self, start: int, stop: int, device: torch.device) -> "InMemorySource":
        """The groups ``[start, stop)`` on ``device``."""
        return InMemorySource(self.groups.block(start, stop, device), device, self.n_features, self.kind)

    def initial_statistics(self, method: str, gen: torch.Generator, cfg: Config):
        """``(nk, means, covariances)`` of the responsibilities ``init_params`` gives."""
        resp = INITIAL_RESP[method](self.groups, cfg.n_components, gen, cfg.memory_budget)
        return kernels.estimate_gaussian_parameters(
            self.groups.X, resp, cfg.reg_covar, cfg.covariance_type, memory_budget=cfg.memory_budget
        )


def open_memory(request: Request, X: Any, y: Any) -> InMemorySource:
    """Validate ``X`` (and ``y``) and lay the samples out per group.

    With a storage device the samples wait there and each block of groups moves to the
    compute device in turn.
    """
    raw, kind = peek(X)
    dtype = resolve_dtype(request.dtype, raw)
    device = resolve_device(request.device, raw, kind.numpy)
    X_t, kind = check_array(X, dtype=dtype, device=request.storage(device),
                            estimator_name=request.estimator_name, ensure_min_samples=2)
    n_samples, D = X_t.shape
    y_t, G = labels_for_fit(request, y, n_samples, device)
    groups, _, _ = group_layout(X_t, y_t, G)
    return InMemorySource(groups, device, D, kind)
