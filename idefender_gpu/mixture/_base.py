"""The batched EM driver shared by ``GaussianMixture`` and ``BatchedGaussianMixture`` (private).

All G mixtures are fitted in one pass: the samples of each group are laid out in a padded
``(G, N_max, D)`` block with a ``(G, N_max)`` weight of ones for samples and zeros for the
padding, and every kernel call handles all groups at once. Each group keeps its own
lower bound, convergence flag and iteration count; a group that has converged keeps its
parameters while the others go on, so the result equals G separate fits from the same
initialisation. One host synchronisation per EM iteration (the convergence flags).
"""

from __future__ import annotations

import inspect
import logging
import time
import warnings
from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu._validation import (
    ArrayKind,
    check_array,
    check_init_array,
    check_options,
    check_scalar,
    resolve_device,
    resolve_dtype,
)
from idefender_gpu.distributed import current as current_data_parallel
from idefender_gpu.exceptions import ConvergenceWarning, NotFittedError
from idefender_gpu.mixture._backends import BACKEND_NAMES, DenseEM, resolve_backend
from idefender_gpu.mixture._kmeans import kmeans_lloyd, kmeans_plusplus

logger = logging.getLogger("idefender_gpu.mixture")

INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")


# --------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    """Batched mixture parameters on the compute device."""

    weights: Tensor  # (G, K)
    means: Tensor  # (G, K, D)
    covariances: Tensor  # per covariance type, leading G
    prec_chol: Tensor  # per covariance type, leading G

    def select(self, mask: Tensor, other: "_Params") -> "_Params":
        """Per group: ``self`` where ``mask (G,)`` is True, else ``other``."""

        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(mask.view(-1, *([1] * (a.ndim - 1))), a, b)

        return _Params(*(pick(a, b) for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (self.weights, self.means, self.covariances, self.prec_chol)

    def take(self, groups: Tensor | slice) -> "_Params":
        """The parameters of some groups (an index tensor or a slice)."""
        return _Params(*(t[groups] for t in self.astuple()))

    def to(self, device: torch.device) -> "_Params":
        return _Params(*(t.to(device, non_blocking=True) for t in self.astuple()))

    @staticmethod
    def cat(blocks: "list[_Params]") -> "_Params":
        return _Params(*(torch.cat(ts) for ts in zip(*(b.astuple() for b in blocks))))


@dataclass(frozen=True)
class _Groups:
    """Samples laid out per group: ``X (G, N_max, D)``, ``weight (G, N_max)`` or None."""

    X: Tensor
    weight: Tensor | None  # None when no padding (all groups full)
    counts: Tensor  # (G,) real samples per group, compute dtype

    def dense_weight(self) -> Tensor:
        if self.weight is not None:
            return self.weight
        return self.X.new_ones(self.X.shape[:2])


@dataclass(frozen=True)
class _Config:
    n_components: int
    covariance_type: str
    tol: float
    reg_covar: float
    max_iter: int
    memory_budget: int | None
    backend: type = DenseEM


def _group_layout(X: Tensor, y: Tensor, n_groups: int) -> tuple[_Groups, Tensor, Tensor]:
    """Pad the samples of each group into ``(G, N_max, D)``.

    Returns the layout and, for every sample of ``X``, its ``(group, row)`` position.
    """
    if n_groups == 1:  # one group: a view, no copy
        counts = torch.full((1,), X.shape[0], dtype=X.dtype, device=X.device)
        rows = torch.arange(X.shape[0], device=X.device)
        return _Groups(X.unsqueeze(0), None, counts), y, rows
    counts = torch.bincount(y, minlength=n_groups)  # (G,)
    order = torch.argsort(y, stable=True)  # (N,)
    offsets = torch.cumsum(counts, 0) - counts  # (G,)
    sorted_y = y[order]
    rows_sorted = torch.arange(y.shape[0], device=y.device) - offsets[sorted_y]
    rows = torch.empty_like(rows_sorted)
    rows[order] = rows_sorted
    n_max = int(counts.max())
    full = bool((counts == n_max).all())
    Xp = X.new_zeros(n_groups, n_max, X.shape[1])
    Xp[y, rows] = X
    weight = None
    if not full:
        weight = X.new_zeros(n_groups, n_max)
        weight[y, rows] = 1
    return _Groups(Xp, weight, counts.to(X.dtype)), y, rows


def _present_groups(y: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Groups present in ``y``, each sample's index among them and its row in its group,
    and the largest group count: the layout of only the groups a batch holds."""
    present, local = torch.unique(y, return_inverse=True)
    counts = torch.bincount(local, minlength=present.shape[0])
    order = torch.argsort(local, stable=True)
    offsets = torch.cumsum(counts, 0) - counts
    rows = torch.empty_like(local)
    rows[order] = torch.arange(y.shape[0], device=y.device) - offsets[local[order]]
    return present, local, rows, int(counts.max())


def _padded(X: Tensor, local: Tensor, rows: Tensor, n_groups: int, n_max: int) -> tuple[Tensor, Tensor]:
    """``(n_groups, n_max, D)`` samples at ``[local, rows]`` and their 0/1 weights."""
    Xp = X.new_zeros(n_groups, n_max, X.shape[1])
    Xp[local, rows] = X
    weight = X.new_zeros(n_groups, n_max)
    weight[local, rows] = 1
    return Xp, weight


def _seed_of(random_state: Any) -> int:
    """The seed ``random_state`` gives: an int, None (fresh entropy), NumPy RandomState/Generator
    or torch Generator (the last three are advanced by one draw)."""
    if random_state is None:
        seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)
    elif isinstance(random_state, (Integral, np.integer)) and not isinstance(random_state, bool):
        seed = int(random_state)
    elif isinstance(random_state, np.random.RandomState):
        seed = int(random_state.randint(0, 2**31 - 1))
    elif isinstance(random_state, np.random.Generator):
        seed = int(random_state.integers(0, 2**62))
    elif isinstance(random_state, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=random_state))
    else:
        raise ValueError(
            "random_state must be None, an int, a numpy.random.RandomState or Generator, "
            f"or a torch.Generator; got {type(random_state).__name__}"
        )
    return seed


def _make_generator(random_state: Any, device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded by :func:`_seed_of`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(_seed_of(random_state))
    return generator


# --------------------------------------------------------------------------------------
# Initialisation: one function per init_params value (dispatch table)
# --------------------------------------------------------------------------------------


def _one_hot_at(groups: _Groups, indices: Tensor, n_components: int) -> Tensor:
    """Responsibilities ``(G, N, K)`` with ``resp[g, indices[g, k], k] = 1``."""
    G, N, _ = groups.X.shape
    resp = groups.X.new_zeros(G, N, n_components)
    columns = torch.arange(n_components, device=indices.device).expand_as(indices)
    resp[torch.arange(G, device=indices.device).unsqueeze(-1), indices, columns] = 1
    return resp


def _resp_kmeans(groups: _Groups, K: int, gen: torch.Generator, budget: int | None) -> Tensor:
    weight = groups.dense_weight()
    seeds = kmeans_plusplus(groups.X, weight, groups.counts.long(), K, gen, budget)
    centers = torch.gather(groups.X, 1, seeds.unsqueeze(-1).expand(-1, -1, groups.X.shape[-1]))
    labels = kmeans_lloyd(groups.X, weight, centers, memory_budget=budget)  # (G, N)
    return torch.nn.functional.one_hot(labels, K).to(groups.X.dtype) * weight.unsqueeze(-1)


def _resp_kmeans_plusplus(groups: _Groups, K: int, gen: torch.Generator, budget: int | None) -> Tensor:
    seeds = kmeans_plusplus(groups.X, groups.dense_weight(), groups.counts.long(), K, gen, budget)
    return _one_hot_at(groups, seeds, K)


def _resp_random(groups: _Groups, K: int, gen: torch.Generator, budget: int | None) -> Tensor:
    G, N, _ = groups.X.shape
    resp = torch.rand(G, N, K, generator=gen, device=groups.X.device, dtype=groups.X.dtype)
    resp = resp / resp.sum(-1, keepdim=True)
    if groups.weight is not None:
        resp = resp * groups.weight.unsqueeze(-1)
    return resp


def _resp_random_from_data(groups: _Groups, K: int, gen: torch.Generator, budget: int | None) -> Tensor:
    G, N, _ = groups.X.shape
    keys = torch.rand(G, N, generator=gen, device=groups.X.device, dtype=groups.X.dtype)
    if groups.weight is not None:
        keys = torch.where(groups.weight > 0, keys, -1.0)
    indices = keys.topk(K, dim=-1).indices  # (G, K) distinct rows of real samples
    return _one_hot_at(groups, indices, K)


_INITIAL_RESP = {
    "kmeans": _resp_kmeans,
    "k-means++": _resp_kmeans_plusplus,
    "random": _resp_random,
    "random_from_data": _resp_random_from_data,
}


# --------------------------------------------------------------------------------------
# EM
# --------------------------------------------------------------------------------------


def _params_from_covariances(weights, means, covariances, cfg: _Config, mask=None) -> _Params:
    prec_chol, info = kernels.compute_prec_chol(covariances, cfg.covariance_type)
    kernels.check_cholesky_info(info, cfg.covariance_type, covariances.dtype, mask)
    return _Params(weights, means, covariances, prec_chol)


def _finish_m_step(nk: Tensor, means: Tensor, covariances: Tensor,
                   cfg: _Config) -> tuple[_Params, Tensor]:
    """Parameters from M-step statistics, and the Cholesky ``info`` to check."""
    weights = nk / nk.sum(-1, keepdim=True)
    prec_chol, info = kernels.compute_prec_chol(covariances, cfg.covariance_type)
    return _Params(weights, means, covariances, prec_chol), info


class _InMemory:
    """Samples held in memory in the padded group layout; one E+M step per call.

    A data source gives the driver ``counts``, ``em_step``, ``initial_statistics``,
    ``block``, ``make_generator`` (the initialisation's generator) and ``check_info``
    (raises for a failed step); see also ``StreamSource`` and the data-parallel source.
    """

    make_generator = staticmethod(_make_generator)
    check_info = staticmethod(kernels.check_cholesky_info)

    def __init__(self, groups: _Groups) -> None:
        self.groups = groups
        self.counts = groups.counts  # (G,)

    def em_step(self, params: _Params, cfg: _Config) -> tuple[Tensor, _Params, Tensor]:
        """Mean log-likelihood ``(G,)`` under ``params``, the new parameters and the
        Cholesky ``info`` of the new covariances."""
        g, backend = self.groups, cfg.backend
        mean_log_prob, e_state = backend.e_step(g.X, g.weight, g.counts, params,
                                                cfg.covariance_type, cfg.memory_budget)
        stats = backend.m_step(g.X, g.weight, e_state, params, cfg.covariance_type,
                               cfg.reg_covar, cfg.memory_budget)
        return (mean_log_prob, *_finish_m_step(*stats, cfg))

    def block(self, start: int, stop: int, device: torch.device) -> "_InMemory":
        """The groups ``[start, stop)`` on ``device``."""
        g = self.groups
        weight = None if g.weight is None else g.weight[start:stop].to(device)
        return _InMemory(_Groups(g.X[start:stop].to(device), weight, g.counts[start:stop].to(device)))

    def initial_statistics(self, method: str, gen: torch.Generator, cfg: _Config):
        """``(nk, means, covariances)`` of the responsibilities ``init_params`` gives."""
        resp = _INITIAL_RESP[method](self.groups, cfg.n_components, gen, cfg.memory_budget)
        return kernels.estimate_gaussian_parameters(
            self.groups.X, resp, cfg.reg_covar, cfg.covariance_type, memory_budget=cfg.memory_budget
        )


@dataclass
class _Run:
    params: _Params
    lower_bound: Tensor  # (G,)
    n_iter: Tensor  # (G,) int64
    converged: Tensor  # (G,) bool
    lower_bounds: list[Tensor]  # one (G,) tensor per iteration


def _cat_runs(runs: "list[_Run]") -> "_Run":
    """Concatenate the runs of consecutive blocks of groups."""
    n_hist = max(len(r.lower_bounds) for r in runs)
    history = []
    for i in range(n_hist):  # a block that stopped early repeats its last lower bound
        history.append(torch.cat([r.lower_bounds[min(i, len(r.lower_bounds) - 1)] for r in runs]))
    return _Run(_Params.cat([r.params for r in runs]), torch.cat([r.lower_bound for r in runs]),
                torch.cat([r.n_iter for r in runs]), torch.cat([r.converged for r in runs]), history)


def _run_em(step, params: _Params, lower_bound: Tensor, cfg: _Config, verbose: int,
            verbose_interval: int, check_info=kernels.check_cholesky_info) -> _Run:
    """EM iterations for all groups at once until each converges or ``max_iter``.

    ``step(params, cfg)`` returns the mean log-likelihood ``(G,)`` under ``params``, the
    next parameters and their Cholesky ``info`` (one pass over the data). When ``info`` of
    an active group is non-zero, ``check_info(info, covariance_type, dtype, failed)``
    raises (the data source's; a data-parallel step also flags a failed rank there).
    """
    G = params.weights.shape[0]
    device = params.weights.device
    active = torch.ones(G, dtype=torch.bool, device=device)
    converged = torch.zeros(G, dtype=torch.bool, device=device)
    n_iter = torch.zeros(G, dtype=torch.int64, device=device)
    history: list[Tensor] = []
    tic = time.perf_counter()
    for it in range(1, cfg.max_iter + 1):
        mean_log_prob, new_params, info = step(params, cfg)
        failed = (info != 0).reshape(G, -1).any(-1) & active  # (G,)
        params = new_params.select(active, params)
        change = mean_log_prob - lower_bound
        lower_bound = torch.where(active, mean_log_prob, lower_bound)
        history.append(mean_log_prob)
        n_iter = torch.where(active, it, n_iter)
        now_converged = active & (change.abs() < cfg.tol)
        converged |= now_converged
        active = active & ~now_converged
        any_failed, any_active = torch.stack([failed.any(), active.any()]).tolist()  # one sync
        if any_failed:
            check_info(info, cfg.covariance_type, lower_bound.dtype, failed)
        if verbose and it % verbose_interval == 0:
            toc = time.perf_counter()
            logger.info("  Iteration %d\t time lapse %.5fs\t active groups %d", it, toc - tic,
                        int(active.sum()))
            tic = toc
        if not any_active:
            break
    return _Run(params, lower_bound, n_iter, converged, history)


# --------------------------------------------------------------------------------------
# Estimator base
# --------------------------------------------------------------------------------------


class _EstimatorParams:
    """``get_params`` / ``set_params`` / ``repr`` from the ``__init__`` signature (sklearn contract)."""

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [p.name for p in signature.parameters.values() if p.name != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Parameters of this estimator, as passed to ``__init__``.

        Parameters
        ----------
        deep : bool, default=True
            Ignored (no sub-estimators); present for scikit-learn compatibility.

        Returns
        -------
        params : dict
        """
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> "_EstimatorParams":
        """Set parameters of this estimator; unknown names raise ``ValueError``.

        Returns
        -------
        self : estimator instance
        """
        valid = self._param_names()
        for name in params:
            if name not in valid:
                raise ValueError(
                    f"Invalid parameter {name!r} for estimator {type(self).__name__}. "
                    f"Valid parameters are: {sorted(valid)!r}."
                )
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        signature = inspect.signature(type(self).__init__)
        changed = []
        for name, parameter in signature.parameters.items():
            if name == "self":
                continue
            value = getattr(self, name)
            default = parameter.default
            same = value is default or (
                not isinstance(value, (np.ndarray, Tensor))
                and not isinstance(default, (np.ndarray, Tensor))
                and value == default
            )
            if not same:
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"


class _GaussianMixtureBase(_EstimatorParams):
    """EM for G independent Gaussian mixtures; subclasses shape the public API."""

    _batched: bool = True

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
        device: Any = None,
        dtype: Any = None,
        backend: str = "auto",
        memory_budget: int | None = None,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.device = device
        self.dtype = dtype
        self.backend = backend
        self.memory_budget = memory_budget

    # -- validation --------------------------------------------------------------------

    def _validate_hyperparameters(self) -> None:
        check_scalar(self.n_components, "n_components", Integral, 1)
        check_options(self.covariance_type, "covariance_type", kernels.COVARIANCE_TYPES)
        check_scalar(self.tol, "tol", Real, 0.0)
        check_scalar(self.reg_covar, "reg_covar", Real, 0.0)
        check_scalar(self.max_iter, "max_iter", Integral, 0)
        check_scalar(self.n_init, "n_init", Integral, 1)
        check_options(self.init_params, "init_params", INIT_PARAMS)
        if not isinstance(self.warm_start, (bool, np.bool_)):
            raise TypeError(f"The 'warm_start' parameter must be a bool. Got {self.warm_start!r} instead.")
        check_scalar(self.verbose, "verbose", Integral, 0)
        check_scalar(self.verbose_interval, "verbose_interval", Integral, 1)
        check_options(self.backend, "backend", BACKEND_NAMES)
        if self.memory_budget is not None:
            check_scalar(self.memory_budget, "memory_budget", Integral, 0, low_open=True)

    def _precision_shape(self, G: int, D: int) -> tuple[int, ...]:
        K = self.n_components
        return {
            "full": (G, K, D, D),
            "tied": (G, D, D),
            "diag": (G, K, D),
            "spherical": (G, K),
        }[self.covariance_type]

    def _init_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape a user passes: with the leading G when batched, without it otherwise."""
        return shape if self._batched else shape[1:]

    def _checked_inits(self, G: int, D: int, dtype, device) -> dict[str, Tensor | None]:
        """Validate ``weights_init`` / ``means_init`` / ``precisions_init`` (with leading G)."""
        K = self.n_components
        out: dict[str, Tensor | None] = {"weights": None, "means": None, "prec_chol": None}
        if self.weights_init is not None:
            weights = check_init_array(self.weights_init, name="weights_init",
                                       shape=self._init_shape((G, K)), dtype=dtype, device=device)
            weights = weights.reshape(G, K)
            low, high = float(weights.min()), float(weights.max())
            if low < 0.0 or high > 1.0:
                raise ValueError(
                    "The parameter 'weights' should be in the range [0, 1], but got max value "
                    f"{high:.5f}, min value {low:.5f}"
                )
            atol = 1e-6 if dtype == torch.float32 else 1e-8
            deviation = (weights.sum(-1) - 1).abs()
            if bool((deviation > atol).any()):
                worst = int(deviation.argmax())
                where = f" for group {worst}" if self._batched else ""
                raise ValueError(
                    "The parameter 'weights' should be normalized, but got sum(weights) = "
                    f"{float(weights[worst].sum()):.5f}{where}"
                )
            out["weights"] = weights
        if self.means_init is not None:
            means = check_init_array(self.means_init, name="means_init",
                                     shape=self._init_shape((G, K, D)), dtype=dtype, device=device)
            out["means"] = means.reshape(G, K, D)
        if self.precisions_init is not None:
            shape = self._precision_shape(G, D)
            precisions = check_init_array(self.precisions_init, name="precisions_init",
                                          shape=self._init_shape(shape), dtype=dtype, device=device)
            precisions = precisions.reshape(shape)
            ctype = self.covariance_type
            if ctype in ("full", "tied"):
                symmetric = torch.isclose(precisions, precisions.mT).all()
                prec_chol, info = kernels.prec_chol_from_precisions(precisions, ctype)
                if not bool(symmetric) or bool((info != 0).any()):
                    raise ValueError(f"'{ctype} precision' should be symmetric, positive-definite")
            else:
                if bool((precisions <= 0).any()):
                    raise ValueError(f"'{ctype} precision' should be positive")
                prec_chol, _ = kernels.prec_chol_from_precisions(precisions, ctype)
            out["prec_chol"] = prec_chol
        return out

    # -- fitting -----------------------------------------------------------------------

    def _initial_params(self, source, inits: dict, cfg: _Config,
                        gen: torch.Generator) -> _Params:
        """Initial parameters from the user's inits, completed by ``init_params``."""
        weights, means, prec_chol = inits["weights"], inits["means"], inits["prec_chol"]
        covariances = None
        if weights is None or means is None or prec_chol is None:
            nk, resp_means, resp_covariances = source.initial_statistics(self.init_params, gen, cfg)
            weights = nk / source.counts.unsqueeze(-1) if weights is None else weights
            means = resp_means if means is None else means
            if prec_chol is None:
                covariances = resp_covariances
                init = _params_from_covariances(weights, means, covariances, cfg)
                prec_chol = init.prec_chol
        if covariances is None:
            covariances = kernels.covariance_from_prec_chol(prec_chol, cfg.covariance_type)
        return _Params(weights, means, covariances, prec_chol)

    def _fit_groups(self, source, inits: dict, cfg: _Config, gen: torch.Generator,
                    warm: "_Params | None", warm_lower_bound: Tensor | None) -> _Run:
        """All ``n_init`` runs; per group, the run with the largest lower bound wins."""
        n_init = 1 if warm is not None else self.n_init
        best: _Run | None = None
        for init in range(n_init):
            if self.verbose:
                logger.info("Initialization %d", init)
            if warm is not None:
                params, lower_bound = warm, warm_lower_bound
            else:
                params = self._initial_params(source, inits, cfg, gen)
                lower_bound = torch.full_like(source.counts, -torch.inf)
            run = _run_em(source.em_step, params, lower_bound, cfg, self.verbose, self.verbose_interval,
                          source.check_info)
            if cfg.max_iter == 0:
                run.lower_bound = torch.full_like(lower_bound, -torch.inf)
            if best is None:
                best = run
                continue
            better = (run.lower_bound > best.lower_bound) | torch.isneginf(best.lower_bound)
            n_hist = max(len(best.lower_bounds), len(run.lower_bounds))
            pad = lambda h, i: h[i] if i < len(h) else h[-1]  # noqa: E731
            best = _Run(
                params=run.params.select(better, best.params),
                lower_bound=torch.where(better, run.lower_bound, best.lower_bound),
                n_iter=torch.where(better, run.n_iter, best.n_iter),
                converged=torch.where(better, run.converged, best.converged),
                lower_bounds=[torch.where(better, pad(run.lower_bounds, i), pad(best.lower_bounds, i))
                              for i in range(n_hist)],
            )
        assert best is not None
        return best

    def _fit(self, X: Any, y: Any) -> tuple[_Groups, Tensor, Tensor]:
        """Validate, fit, and set the fitted attributes only once everything succeeded.

        Returns the group layout and each sample's (group, row) for a final E-step.
        Inside :func:`idefender_gpu.distributed.data_parallel`, ``X`` and ``y`` are this
        rank's shard and the fit is data-parallel.
        """
        self._validate_hyperparameters()
        setting = current_data_parallel()
        if setting is not None:
            from idefender_gpu.mixture._distributed import fit_shard

            return fit_shard(self, X, y, setting)
        raw, kind = _peek(X)
        dtype = resolve_dtype(self.dtype, raw)
        device = resolve_device(self.device, raw, kind.numpy)
        # With a storage device the samples wait there and each block of groups moves to
        # the compute device in turn.
        X_t, kind = check_array(X, dtype=dtype, device=self._storage_device(device),
                                estimator_name=type(self).__name__, ensure_min_samples=2)
        n_samples, D = X_t.shape
        if self.warm_start and self.__sklearn_is_fitted__() and D != self.n_features_in_:
            raise ValueError(
                f"X has {D} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        y_t, G = self._labels_for_fit(y, n_samples, device, dtype, D)
        groups, y_t, rows = _group_layout(X_t, y_t, G)
        self._fit_source(_InMemory(groups), D, kind, device)
        return groups, y_t, rows

    # -- blocks of groups (overridden by BatchedGaussianMixture) ---------------------------

    def _storage_device(self, device: torch.device) -> torch.device:
        """Where fitted parameters (and, in memory, the samples) are kept."""
        return device

    def _group_block_size(self) -> int | None:
        """At most this many groups on the compute device at once (None: all)."""
        return None

    def _blocks(self, n_groups: int) -> list[tuple[int, int]]:
        size = self._group_block_size() or n_groups
        return [(start, min(start + size, n_groups)) for start in range(0, n_groups, size)]

    def _fit_source(self, source, D: int, kind: ArrayKind, device: torch.device | None = None) -> None:
        """Fit from a data source (in memory or streamed): checks, inits, EM; the fitted
        attributes are set only once everything succeeded."""
        counts = source.counts.long()
        G, dtype = counts.shape[0], source.counts.dtype
        device = source.counts.device if device is None else device
        storage = self._storage_device(device)
        if self.warm_start and self.__sklearn_is_fitted__() and D != self.n_features_in_:
            raise ValueError(
                f"X has {D} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        too_small = counts < self.n_components
        if bool(too_small.any()):
            g = int(too_small.nonzero()[0, 0])
            where = f" for group {g}" if self._batched else ""
            raise ValueError(
                "Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {int(counts[g])}{where}"
            )
        inits = self._checked_inits(G, D, dtype, storage)
        backend = resolve_backend(self.backend, D, self.n_components, self.covariance_type)
        cfg = _Config(self.n_components, self.covariance_type, float(self.tol),
                      float(self.reg_covar), int(self.max_iter), self.memory_budget, backend)
        gen = source.make_generator(self.random_state, device)
        warm_params = warm_lb = None
        if self.warm_start and self.__sklearn_is_fitted__():
            state = self._state
            if state.params.weights.shape[0] != G or state.device != device \
                    or state.params.weights.dtype != dtype:
                raise ValueError("warm_start needs the same groups, dtype and device as the previous fit")
            warm_params, warm_lb = state.params, state.lower_bound
        blocks = self._blocks(G)
        with torch.no_grad():
            if len(blocks) == 1 and storage == device:
                run = self._fit_groups(source, inits, cfg, gen, warm_params, warm_lb)
            else:  # independent mixtures: one block of groups at a time on the compute device
                runs = []
                for start, stop in blocks:
                    part = {k: None if v is None else v[start:stop].to(device) for k, v in inits.items()}
                    warm_part = None if warm_params is None else warm_params.take(slice(start, stop)).to(device)
                    warm_lb_part = None if warm_lb is None else warm_lb[start:stop].to(device)
                    run = self._fit_groups(source.block(start, stop, device), part, cfg, gen,
                                           warm_part, warm_lb_part)
                    runs.append(_Run(run.params.to(storage), run.lower_bound.to(storage),
                                     run.n_iter.to(storage), run.converged.to(storage),
                                     [h.to(storage) for h in run.lower_bounds]))
                run = _cat_runs(runs)
        # Everything succeeded: only now touch the fitted state.
        self._set_fitted(run, kind, D, device, dtype, backend)
        self._warn_not_converged(run)

    def _labels_for_fit(self, y, n_samples, device, dtype, D) -> tuple[Tensor, int]:
        raise NotImplementedError

    def _warn_not_converged(self, run: _Run) -> None:
        if self.max_iter == 0:
            return
        not_converged = (~run.converged).nonzero().flatten().tolist()
        if not not_converged:
            return
        message = (
            "Best performing initialization did not converge. Try different init "
            "parameters, or increase max_iter, tol, or check for degenerate data."
        )
        if self._batched:
            message = message[:-1] + f" (groups {not_converged[:10]}" + (
                " ...)." if len(not_converged) > 10 else ")."
            )
        warnings.warn(message, ConvergenceWarning, stacklevel=3)

    # -- fitted state ------------------------------------------------------------------

    def _set_fitted(self, run: _Run, kind: ArrayKind, D: int, device, dtype, backend) -> None:
        params = run.params
        lower_bound = run.lower_bound
        self._state = _FittedState(params, lower_bound, kind, device, dtype, backend)
        public = self._public(params, kind)
        self.weights_ = public["weights_"]
        self.means_ = public["means_"]
        self.covariances_ = public["covariances_"]
        self.precisions_ = public["precisions_"]
        self.precisions_cholesky_ = public["precisions_cholesky_"]
        self._state = replace(self._state, sources=self._source_ids())
        n_iter = run.n_iter.tolist()
        converged = run.converged.tolist()
        history = torch.stack(run.lower_bounds, dim=1) if run.lower_bounds else \
            lower_bound.new_zeros(lower_bound.shape[0], 0)  # (G, n_iterations)
        if self._batched:
            self.converged_ = kind.out(run.converged)
            self.n_iter_ = kind.out(run.n_iter)
            self.lower_bound_ = kind.out(lower_bound)
            self.lower_bounds_ = [kind.out(history[g, : n_iter[g]]) for g in range(history.shape[0])]
        else:
            self.converged_ = bool(converged[0])
            self.n_iter_ = int(n_iter[0])
            self.lower_bound_ = float(lower_bound[0])
            self.lower_bounds_ = history[0, : n_iter[0]].tolist()
        self.n_features_in_ = D

    def _public(self, params: _Params, kind: ArrayKind) -> dict[str, Any]:
        precisions = kernels.precision_from_prec_chol(params.prec_chol, self.covariance_type)
        values = {
            "weights_": params.weights,
            "means_": params.means,
            "covariances_": params.covariances,
            "precisions_": precisions,
            "precisions_cholesky_": params.prec_chol,
        }
        squeeze = (lambda t: t) if self._batched else (lambda t: t[0])
        return {name: kind.out(squeeze(value)) for name, value in values.items()}

    def _source_ids(self) -> tuple[int, int, int, int]:
        return (id(self.weights_), id(self.means_), id(self.covariances_), id(self.precisions_cholesky_))

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "_state")

    def __sklearn_tags__(self):
        """scikit-learn estimator tags (density estimator), so its helpers (``Pipeline``,
        ``GridSearchCV``, ``check_is_fitted``) accept the estimator. Needs scikit-learn."""
        from sklearn.utils import InputTags, Tags, TargetTags

        return Tags(
            estimator_type="density_estimator",
            target_tags=TargetTags(required=self._batched),
            transformer_tags=None,
            regressor_tags=None,
            classifier_tags=None,
            input_tags=InputTags(allow_nan=False),
        )

    def _check_is_fitted(self) -> "_FittedState":
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                "appropriate arguments before using this estimator."
            )
        state = self._state
        if state.sources != self._source_ids():
            # The public attributes were replaced by the user: compute from them.
            state = replace(state, params=self._params_from_public(state), sources=self._source_ids())
            self._state = state
        return state

    def _params_from_public(self, state: "_FittedState") -> _Params:
        def load(value):
            tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
            tensor = tensor.to(device=state.device, dtype=state.dtype)
            return tensor if self._batched else tensor.unsqueeze(0)

        return _Params(load(self.weights_), load(self.means_), load(self.covariances_),
                       load(self.precisions_cholesky_))

    def _check_X(self, X: Any, state: "_FittedState") -> tuple[Tensor, ArrayKind]:
        return check_array(X, dtype=state.dtype, device=state.device,
                           estimator_name=type(self).__name__, n_features=self.n_features_in_)

    def _weighted_log_prob(self, X: Tensor, params: _Params) -> Tensor:
        """``log w_k + log N(x | k)`` for every group: ``(G, N, K)`` from ``X (N, D)`` or ``(G, N, D)``."""
        log_prob = kernels.log_gaussian_prob(X, params.means, params.prec_chol, self.covariance_type,
                                             memory_budget=self.memory_budget)
        return log_prob + params.weights.log().unsqueeze(-2)

    def _device_blocks(self, state: "_FittedState", groups: Tensor | None = None):
        """``(selector, params on the compute device)`` per block of groups: all groups, or
        those in ``groups`` (an index tensor) only. Parameters kept on a storage device
        move to the compute device one block at a time."""
        G = state.params.weights.shape[0] if groups is None else groups.shape[0]
        for start, stop in self._blocks(G):
            part = slice(start, stop)
            chosen = part if groups is None else groups[part].to(state.params.weights.device)
            yield part, state.params.take(chosen).to(state.device)

    def _log_prob_norm(self, X: Tensor, state: "_FittedState") -> Tensor:
        """``log p(x)`` under every group, ``(G, N)``, with the fitted backend."""
        return torch.cat([
            state.backend.log_prob_norm(X, params, self.covariance_type, self.memory_budget)
            for _, params in self._device_blocks(state)
        ])

    def _own_group(self, X: Tensor, y: Tensor, state: "_FittedState", log_norm: bool) -> Tensor:
        """Each sample under its own group's mixture only: ``log p(x | y)`` ``(N,)`` when
        ``log_norm``, else the weighted component log-probabilities ``(N, K)``. Only the
        groups present in ``y`` are laid out and their parameters gathered."""
        present, local, rows, n_max = _present_groups(y)
        out = None
        for part, params in self._device_blocks(state, present):
            chosen = (local >= part.start) & (local < part.stop)
            Xp, _ = _padded(X[chosen], local[chosen] - part.start, rows[chosen],
                            part.stop - part.start, n_max)
            if log_norm:
                values = state.backend.log_prob_norm(Xp, params, self.covariance_type,
                                                     self.memory_budget)  # (u, n_max)
            else:
                values = self._weighted_log_prob(Xp, params)  # (u, n_max, K)
            picked = values[local[chosen] - part.start, rows[chosen]]
            if out is None:
                out = picked.new_empty(X.shape[0], *picked.shape[1:])
            out[chosen] = picked
        return out

    def _n_parameters(self) -> int:
        """Free parameters of one mixture (scikit-learn's count)."""
        K, D = self.n_components, self.n_features_in_
        cov_params = {
            "full": K * D * (D + 1) / 2.0,
            "diag": K * D,
            "tied": D * (D + 1) / 2.0,
            "spherical": K,
        }[self.covariance_type]
        return int(cov_params + D * K + K - 1)

    def _sample(self, n_samples: int, state: "_FittedState") -> tuple[Tensor, Tensor]:
        """``n_samples`` draws per group: ``X (G, n, D)`` and component labels ``(G, n)``, sorted by component."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples!r} . The sampling requires at least one sample."
            )
        params = state.params
        G, K, D = params.means.shape
        gen = _make_generator(self.random_state, state.device)
        labels = torch.multinomial(params.weights, n_samples, replacement=True, generator=gen)
        labels = labels.sort(-1).values  # (G, n)
        noise = torch.randn(G, n_samples, D, generator=gen, device=state.device, dtype=state.dtype)
        means = torch.gather(params.means, 1, labels.unsqueeze(-1).expand(-1, -1, D))  # (G, n, D)
        ctype = self.covariance_type
        if ctype in ("diag", "spherical"):
            scale = params.prec_chol.reciprocal()  # (G, K, D) or (G, K)
            if ctype == "spherical":
                scale = scale.unsqueeze(-1).expand(G, K, D)
            scale = torch.gather(scale, 1, labels.unsqueeze(-1).expand(-1, -1, D))
            return means + noise * scale, labels
        scale_tril = kernels.scale_tril_from_prec_chol(params.prec_chol)
        if ctype == "tied":
            return means + noise @ scale_tril.mT, labels
        # full: x = μ_k + L_k z, one component at a time over chunks (no (n, D, D) gather)
        rows = kernels.chunk_rows(n_samples, G * K * D * state.dtype.itemsize, self.memory_budget,
                                   state.device)
        out = []
        for start in range(0, n_samples, rows):
            z = noise[:, start:start + rows]  # (G, c, D)
            y = z.unsqueeze(1) @ scale_tril.mT  # (G, K, c, D)
            lab = labels[:, start:start + rows]  # (G, c)
            pick = lab.view(G, 1, -1, 1).expand(-1, 1, -1, D)
            out.append(torch.gather(y, 1, pick).squeeze(1))  # (G, c, D)
        return means + torch.cat(out, dim=1), labels


@dataclass(frozen=True)
class _FittedState:
    params: _Params
    lower_bound: Tensor
    kind: ArrayKind
    device: torch.device
    dtype: torch.dtype
    backend: type = DenseEM
    sources: tuple[int, ...] = ()


def _peek(X: Any) -> tuple[Tensor, ArrayKind]:
    """Tensor view of ``X`` (no copy, no validation) to resolve the compute dtype/device."""
    if isinstance(X, Tensor):
        return X, ArrayKind(numpy=False, device=X.device)
    try:
        array = np.asarray(X)
    except Exception:  # noqa: BLE001 - check_array raises the proper error later
        return torch.empty(0), ArrayKind(numpy=True)
    if array.dtype.kind != "f":  # integers and booleans: float64, as scikit-learn does
        return torch.empty(0, dtype=torch.float64), ArrayKind(numpy=True)
    return torch.empty(0, dtype=torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype), ArrayKind(numpy=True)
