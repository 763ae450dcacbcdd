"""EM backends: how an E-step and an M-step are computed (private).

Each backend is one class with the same two static methods: ``pass_statistics`` (one EM
pass: the log-likelihood sum and the sufficient statistics centred on
``params.stats_centres``, near the means, which the one
:func:`~idefender_gpu.kernels.statistics_to_parameters` turns into parameters) and ``log_prob_norm`` (scoring); adding a backend is one class plus one table entry (C14).
The EM driver never looks inside.

* ``torch`` (dense): one fused pass per chunk of rows (:func:`~idefender_gpu.kernels.em_pass`):
  log-densities, responsibilities and statistics together, never the ``(G, N, K)`` matrix.
* ``keops``: the E-step keeps only ``log p(x)`` ``(G, N)``; the M-step recomputes the
  responsibilities lazily inside one KeOps reduction (split into slices of samples along a
  chunk axis, so it runs in parallel over N), which returns the sufficient statistics of
  the dense :func:`~idefender_gpu.kernels.shifted_statistics`; the dense
  :func:`~idefender_gpu.kernels.statistics_to_parameters` turns them into parameters (the
  one copy of that formula, shared with the streamed and data-parallel fits). No
  ``(N, K, D)`` tensor at all.

Both backends run with whatever TF32 setting the caller chose
(:func:`idefender_gpu.kernels.allow_tf32`); none is changed here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from idefender_gpu import kernels


def _log_lik_sum(log_prob_norm: Tensor, weight: Tensor | None) -> Tensor:
    """Per-group sum of ``log p(x)`` over real samples, ``(G,)``."""
    if weight is None:
        return log_prob_norm.sum(-1)
    return torch.where(weight > 0, log_prob_norm, 0).sum(-1)


class DenseEM:
    """Dense torch backend: one fused pass per EM iteration (:func:`kernels.em_pass`)."""

    name = "torch"

    @staticmethod
    def pass_statistics(X, weight, params, covariance_type, memory_budget):
        """One pass over ``X (G, N, D)``: ``(Σ log p(x) (G,), counts, first, second)``,
        the statistics centred on ``params.stats_centres`` (:func:`kernels.shifted_statistics`'s)."""
        return kernels.em_pass(X, params.weights.log(), params.means, params.prec_chol,
                               covariance_type, sample_weight=weight, memory_budget=memory_budget,
                               centres=params.stats_centres)

    @staticmethod
    def log_prob_norm(X, params, covariance_type, memory_budget):
        """``log p(x)`` ``(G, N)``, differentiable."""
        return kernels.log_prob_norm(X, params.weights.log(), params.means, params.prec_chol,
                                     covariance_type, memory_budget=memory_budget)


class KeOpsEM:
    """KeOps backend (pykeops imported on first use)."""

    name = "keops"

    @staticmethod
    def pass_statistics(X, weight, params, covariance_type, memory_budget):
        """As :meth:`DenseEM.pass_statistics`: ``log p(x)`` by one KeOps reduction, then
        the statistics with the responsibilities recomputed lazily (a second one)."""
        from idefender_gpu.kernels import _keops

        log_weights = params.weights.log()
        log_prob_norm = _keops.log_prob_norm(X, log_weights, params.means, params.prec_chol,
                                             covariance_type)  # (G, N)
        stats = _keops.sufficient_statistics(
            X, log_prob_norm, log_weights, params.means, params.prec_chol, covariance_type,
            sample_weight=weight, memory_budget=memory_budget, centres=params.stats_centres,
        )
        return (_log_lik_sum(log_prob_norm, weight), *stats)

    @staticmethod
    def log_prob_norm(X, params, covariance_type, memory_budget):
        """``log p(x)`` ``(G, N)``, differentiable."""
        from idefender_gpu.kernels import _keops

        return _keops.log_prob_norm(X, params.weights.log(), params.means, params.prec_chol,
                                    covariance_type)


BACKENDS = {"torch": DenseEM, "keops": KeOpsEM}
BACKEND_NAMES = ("auto", *BACKENDS)


def prefers_keops(n_features: int, n_components: int, covariance_type: str) -> bool:
    """The ``backend='auto'`` rule, from ``benchmarks/bench_backends.py`` (see README).

    KeOps evaluates each (sample, component) term in registers: it wins when the per-pair
    work is small (few features) and there are many components, where the dense backend
    moves ``N K D`` intermediates through memory. Dense batched GEMMs win everywhere else.
    Measured on a 2-core AMD EPYC CPU: before the fused dense pass
    (``benchmarks/results/backends_cpu.json``, N in {1e4, 1e5}, K in {4, 32, 256}, D in {2,
    8, 16, 32, 64}) KeOps won only at D = 2; with it (``backends_cpu_d2.json``, the D = 2
    points, idle, 2 threads) only full covariances with K = 256 are left (1.1x at N = 1e4,
    2.0x at 1e5; tied won at N = 1e5 only, diag and spherical nowhere). No GPU map yet.
    """
    return (n_features <= AUTO_KEOPS_MAX_FEATURES[covariance_type]
            and n_components >= AUTO_KEOPS_MIN_COMPONENTS[covariance_type])


#: Largest D where KeOps beat dense in the backend benchmark, per covariance type (0: nowhere).
AUTO_KEOPS_MAX_FEATURES = {"full": 2, "tied": 0, "diag": 0, "spherical": 0}
#: Fewest components where KeOps beat dense at that D, per covariance type.
AUTO_KEOPS_MIN_COMPONENTS = {"full": 256, "tied": 256, "diag": 256, "spherical": 256}


def resolve_backend(name: str, n_features: int, n_components: int, covariance_type: str):
    """Backend class for ``name`` (``'auto'`` applies :func:`prefers_keops` when pykeops imports)."""
    if name == "auto":
        if prefers_keops(n_features, n_components, covariance_type):
            from idefender_gpu.kernels import _keops

            if _keops.available():
                return KeOpsEM
        return DenseEM
    if name == "keops":
        from idefender_gpu.kernels import _keops

        _keops._lazy()  # ImportError with the install hint when pykeops is missing
    return BACKENDS[name]
