"""The EM core shared by every mixture estimator and every data source (private).

What one fit is, independent of where the samples come from: the parameter containers
(:class:`Params`), the padded group layout (:class:`Groups`, :func:`group_layout`), the
random generators (:func:`seed_of`, :func:`make_generator`), the EM loop over all G
groups at once (:func:`run_em`), the ``n_init`` restarts (:func:`fit_groups`), the blocks
of groups (:func:`fit_blocks`) and the M-step finish (:func:`finish_m_step`).

The samples are reached only through a :class:`DataSource` (one EM pass over the data per
call); the sources (``_memory``, ``_stream``, ``_distributed``) import this module, never
the reverse, and so do the estimators (``_base``). This module imports only
:mod:`idefender_gpu.kernels`, the backends and the exceptions.

All G mixtures are fitted in one pass: the samples of each group are laid out in a padded
``(G, N_max, D)`` block with a ``(G, N_max)`` weight of ones for samples and zeros for the
padding, and every kernel call handles all groups at once. Each group keeps its own lower
bound, convergence flag and iteration count; a group that has converged keeps its
parameters while the others go on, so the result equals G separate fits from the same
initialisation. One host synchronisation per EM iteration (the convergence flags).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu._validation import ArrayKind, check_labels, reject_sparse
from idefender_gpu.mixture._backends import DenseEM

logger = logging.getLogger("idefender_gpu.mixture")

#: The values of ``init_params``.
INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")


# --------------------------------------------------------------------------------------
# Containers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """Batched mixture parameters (leading G axis on every tensor).

    ``centres`` (``(G, K, D)`` or None: the means) is where the next EM pass centres its
    sufficient statistics (:func:`sticky_centres`); it is not a parameter of the mixture.
    """

    weights: Tensor  # (G, K)
    means: Tensor  # (G, K, D)
    covariances: Tensor  # per covariance type, leading G
    prec_chol: Tensor  # per covariance type, leading G
    centres: Tensor | None = None  # (G, K, D)

    @property
    def stats_centres(self) -> Tensor:
        """The centres of the next pass's statistics (the means when none are kept)."""
        return self.means if self.centres is None else self.centres

    def select(self, mask: Tensor, other: "Params") -> "Params":
        """Per group: ``self`` where ``mask (G,)`` is True, else ``other``."""

        def pick(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(mask.view(-1, *([1] * (a.ndim - 1))), a, b)

        centres = (None if self.centres is None and other.centres is None
                   else pick(self.stats_centres, other.stats_centres))
        return Params(*(pick(a, b) for a, b in zip(self.astuple(), other.astuple())), centres)

    def astuple(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four parameters (without ``centres``)."""
        return (self.weights, self.means, self.covariances, self.prec_chol)

    def take(self, groups: Tensor | slice) -> "Params":
        """The parameters of some groups (an index tensor or a slice)."""
        return Params(*(t[groups] for t in self.astuple()),
                      None if self.centres is None else self.centres[groups])

    def to(self, device: torch.device) -> "Params":
        return Params(*(t.to(device, non_blocking=True) for t in self.astuple()),
                      None if self.centres is None else self.centres.to(device, non_blocking=True))

    @staticmethod
    def cat(blocks: "list[Params]") -> "Params":
        centres = (None if all(b.centres is None for b in blocks)
                   else torch.cat([b.stats_centres for b in blocks]))
        return Params(*(torch.cat(ts) for ts in zip(*(b.astuple() for b in blocks))), centres)


@dataclass(frozen=True)
class Groups:
    """Samples laid out per group: ``X (G, N_max, D)``, ``weight (G, N_max)`` or None."""

    X: Tensor
    weight: Tensor | None  # None when no padding (all groups full)
    counts: Tensor  # (G,) real samples per group, compute dtype

    def dense_weight(self) -> Tensor:
        if self.weight is not None:
            return self.weight
        return self.X.new_ones(self.X.shape[:2])

    def block(self, start: int, stop: int, device: torch.device) -> "Groups":
        """The groups ``[start, stop)`` on ``device``."""
        weight = None if self.weight is None else self.weight[start:stop].to(device)
        return Groups(self.X[start:stop].to(device), weight, self.counts[start:stop].to(device))


@dataclass(frozen=True)
class Config:
    """The hyper-parameters the EM loop and the data sources read."""

    n_components: int
    covariance_type: str
    tol: float
    reg_covar: float
    max_iter: int
    memory_budget: int | None
    backend: type = DenseEM


@dataclass
class Run:
    """The result of EM for G groups (per group: the best of the ``n_init`` runs)."""

    params: Params
    lower_bound: Tensor  # (G,)
    n_iter: Tensor  # (G,) int64
    converged: Tensor  # (G,) bool
    lower_bounds: list[Tensor]  # one (G,) tensor per iteration

    def to(self, device: torch.device) -> "Run":
        return Run(self.params.to(device), self.lower_bound.to(device), self.n_iter.to(device),
                   self.converged.to(device), [h.to(device) for h in self.lower_bounds])


@runtime_checkable
class DataSource(Protocol):
    """Where the samples of a fit come from: one EM pass over the data per call.

    Implemented by ``_memory.InMemorySource`` (a padded tensor), ``_stream.StreamSource``
    (re-iterable batches) and ``_distributed.DistributedSource`` (this rank's shard plus
    one all-reduce per pass); made by ``_sources.open_source``.

    Attributes
    ----------
    counts : Tensor of shape (G,)
        Samples per group, compute dtype (over all ranks for a data-parallel source).
    device : torch.device
        The compute device.
    n_features : int
    kind : ArrayKind
        How the input arrived (NumPy or tensors), for the outputs.
    """

    counts: Tensor
    device: torch.device
    n_features: int
    kind: Any

    def make_generator(self, random_state: Any, device: torch.device) -> torch.Generator:
        """The initialisation's generator on ``device``."""
        ...

    def initial_statistics(self, method: str, gen: torch.Generator,
                           cfg: Config) -> tuple[Tensor, Tensor, Tensor]:
        """``(nk (G, K), means (G, K, D), covariances)`` of the responsibilities that
        ``init_params = method`` gives."""
        ...

    def em_step(self, params: Params, cfg: Config) -> tuple[Tensor, Params, Tensor]:
        """One E+M step over all the data: the mean log-likelihood ``(G,)`` under
        ``params``, the new parameters and the Cholesky ``info`` of the new covariances."""
        ...

    def check_info(self, info: Tensor, covariance_type: str, dtype: torch.dtype,
                   failed: Tensor) -> None:
        """Raise for a failed step (``failed (G,)``: the groups whose ``info`` is non-zero)."""
        ...

    def block(self, start: int, stop: int, device: torch.device) -> "DataSource":
        """The source of the groups ``[start, stop)`` computing on ``device``."""
        ...


# --------------------------------------------------------------------------------------
# Group layout
# --------------------------------------------------------------------------------------


def group_layout(X: Tensor, y: Tensor, n_groups: int) -> tuple[Groups, Tensor, Tensor]:
    """Pad the samples of each group into ``(G, N_max, D)`` (on ``X``'s device).

    Returns the layout and, for every sample of ``X``, its ``(group, row)`` position.
    """
    if n_groups == 1:  # one group: a view, no copy
        counts = torch.full((1,), X.shape[0], dtype=X.dtype, device=X.device)
        rows = torch.arange(X.shape[0], device=X.device)
        return Groups(X.unsqueeze(0), None, counts), y, rows
    y = y.to(X.device)
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
    return Groups(Xp, weight, counts.to(X.dtype)), y, rows


def present_groups(y: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Groups present in ``y``, each sample's index among them and its row in its group,
    and the largest group count: the layout of only the groups a batch holds (computed
    where ``y`` is: on the CPU, no device synchronisation)."""
    present, local = torch.unique(y, return_inverse=True)
    counts = torch.bincount(local, minlength=present.shape[0])
    order = torch.argsort(local, stable=True)
    offsets = torch.cumsum(counts, 0) - counts
    rows = torch.empty_like(local)
    rows[order] = torch.arange(y.shape[0], device=y.device) - offsets[local[order]]
    return present, local, rows, int(counts.max())


def padded(X: Tensor, local: Tensor, rows: Tensor, n_groups: int, n_max: int) -> tuple[Tensor, Tensor]:
    """``(n_groups, n_max, D)`` samples at ``[local, rows]`` and their 0/1 weights."""
    Xp = X.new_zeros(n_groups, n_max, X.shape[1])
    Xp[local, rows] = X
    weight = X.new_zeros(n_groups, n_max)
    weight[local, rows] = 1
    return Xp, weight


# --------------------------------------------------------------------------------------
# Random generators
# --------------------------------------------------------------------------------------


def seed_of(random_state: Any) -> int:
    """The seed ``random_state`` gives: an int, None (fresh entropy), NumPy RandomState/Generator
    or torch Generator (the last three are advanced by one draw; a torch generator on its
    own device)."""
    if random_state is None:
        seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint64)[0] >> 1)
    elif isinstance(random_state, (Integral, np.integer)) and not isinstance(random_state, bool):
        seed = int(random_state)
    elif isinstance(random_state, np.random.RandomState):
        seed = int(random_state.randint(0, 2**31 - 1))
    elif isinstance(random_state, np.random.Generator):
        seed = int(random_state.integers(0, 2**62))
    elif isinstance(random_state, torch.Generator):
        seed = int(torch.randint(0, 2**62, (1,), generator=random_state, device=random_state.device))
    else:
        raise ValueError(
            "random_state must be None, an int, a numpy.random.RandomState or Generator, "
            f"or a torch.Generator; got {type(random_state).__name__}"
        )
    return seed


def make_generator(random_state: Any, device: torch.device) -> torch.Generator:
    """A torch generator on ``device`` seeded by :func:`seed_of`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed_of(random_state))
    return generator


# --------------------------------------------------------------------------------------
# EM
# --------------------------------------------------------------------------------------


#: A component's statistics stay centred on the same point while its mean is within this
#: many standard deviations of it in every feature (:func:`sticky_centres`).
STICKY_CENTRES = 0.1


def sticky_centres(new: Params, centres: Tensor, covariance_type: str) -> Params:
    """``new`` with the centres of the next pass's statistics: the previous ``centres``
    ``(G, K, D)`` of each component whose new mean is within ``STICKY_CENTRES`` standard
    deviations of them in every feature, else its new mean.

    Centring the sums on the current means keeps the covariances accurate (the correction
    ``δ δᵀ`` of :func:`kernels.statistics_to_parameters` stays small), but a centre that
    moves with the means every iteration changes the rounding of every sum: in float32 the
    parameters then never settle on a fixed point, and a log-likelihood whose rounding
    error is about 1e-3 (D = 128, ill-conditioned covariances) keeps wandering by more
    than ``tol`` (measured: 3 to 10 iterations where scikit-learn stops after 3). A centre
    kept while the mean moves by less than 0.1 standard deviations costs at most 1% of the
    covariances' precision (``(σ² + δ²) / σ²``) and lets the parameters, as scikit-learn's,
    become a fixed point once the responsibilities stop changing.
    """
    var = new.covariances
    if covariance_type == "full":
        var = var.diagonal(dim1=-2, dim2=-1)  # (G, K, D)
    elif covariance_type == "tied":
        var = var.diagonal(dim1=-2, dim2=-1).unsqueeze(-2)  # (G, 1, D)
    elif covariance_type == "spherical":
        var = var.unsqueeze(-1)  # (G, K, 1)
    keep = ((new.means - centres).square() <= STICKY_CENTRES ** 2 * var).all(-1, keepdim=True)
    return Params(*new.astuple(), torch.where(keep, centres, new.means))


def finish_m_step(nk: Tensor, means: Tensor, covariances: Tensor, cfg: Config) -> tuple[Params, Tensor]:
    """Parameters from M-step statistics, and the Cholesky ``info`` to check."""
    weights = nk / nk.sum(-1, keepdim=True)
    prec_chol, info = kernels.compute_prec_chol(covariances, cfg.covariance_type)
    return Params(weights, means, covariances, prec_chol), info


def cat_runs(runs: list[Run]) -> Run:
    """Concatenate the runs of consecutive blocks of groups."""
    n_hist = max(len(r.lower_bounds) for r in runs)
    history = []
    for i in range(n_hist):  # a block that stopped early repeats its last lower bound
        history.append(torch.cat([r.lower_bounds[min(i, len(r.lower_bounds) - 1)] for r in runs]))
    return Run(Params.cat([r.params for r in runs]), torch.cat([r.lower_bound for r in runs]),
               torch.cat([r.n_iter for r in runs]), torch.cat([r.converged for r in runs]), history)


def run_em(step, params: Params, lower_bound: Tensor, cfg: Config, verbose: int,
           verbose_interval: int, check_info=kernels.check_cholesky_info) -> Run:
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
        new_params = sticky_centres(new_params, params.stats_centres, cfg.covariance_type)
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
    return Run(params, lower_bound, n_iter, converged, history)


def initial_params(source: DataSource, inits: dict, init_params: str, cfg: Config,
                   gen: torch.Generator) -> Params:
    """Initial parameters from the user's ``inits`` (``weights``, ``means``, ``prec_chol``,
    each None or with leading G), completed by ``init_params`` on ``source``."""
    weights, means, prec_chol = inits["weights"], inits["means"], inits["prec_chol"]
    covariances = None
    if weights is None or means is None or prec_chol is None:
        nk, resp_means, resp_covariances = source.initial_statistics(init_params, gen, cfg)
        weights = nk / source.counts.unsqueeze(-1) if weights is None else weights
        means = resp_means if means is None else means
        if prec_chol is None:
            covariances = resp_covariances
            prec_chol, info = kernels.compute_prec_chol(covariances, cfg.covariance_type)
            kernels.check_cholesky_info(info, cfg.covariance_type, covariances.dtype, None)
    if covariances is None:
        covariances = kernels.covariance_from_prec_chol(prec_chol, cfg.covariance_type)
    return Params(weights, means, covariances, prec_chol)


@dataclass(frozen=True)
class Restarts:
    """How the runs of one fit start: ``n_init`` restarts from ``init_params`` (and the
    user's ``inits``), or one warm start from ``warm`` (parameters and lower bounds)."""

    n_init: int
    init_params: str
    inits: dict
    warm: "tuple[Params, Tensor] | None" = None
    verbose: int = 0
    verbose_interval: int = 10

    def block(self, start: int, stop: int, device: torch.device) -> "Restarts":
        inits = {k: None if v is None else v[start:stop].to(device) for k, v in self.inits.items()}
        warm = None
        if self.warm is not None:
            warm = (self.warm[0].take(slice(start, stop)).to(device), self.warm[1][start:stop].to(device))
        return Restarts(self.n_init, self.init_params, inits, warm, self.verbose, self.verbose_interval)


def fit_groups(source: DataSource, restarts: Restarts, cfg: Config, gen: torch.Generator) -> Run:
    """All ``n_init`` runs; per group, the run with the largest lower bound wins."""
    warm = restarts.warm
    n_init = 1 if warm is not None else restarts.n_init
    best: Run | None = None
    for init in range(n_init):
        if restarts.verbose:
            logger.info("Initialization %d", init)
        if warm is not None:
            params, lower_bound = warm
        else:
            params = initial_params(source, restarts.inits, restarts.init_params, cfg, gen)
            lower_bound = torch.full_like(source.counts, -torch.inf)
        run = run_em(source.em_step, params, lower_bound, cfg, restarts.verbose,
                     restarts.verbose_interval, source.check_info)
        if cfg.max_iter == 0:
            run.lower_bound = torch.full_like(lower_bound, -torch.inf)
        if best is None:
            best = run
            continue
        better = (run.lower_bound > best.lower_bound) | torch.isneginf(best.lower_bound)
        n_hist = max(len(best.lower_bounds), len(run.lower_bounds))
        pad = lambda h, i: h[i] if i < len(h) else h[-1]  # noqa: E731
        best = Run(
            params=run.params.select(better, best.params),
            lower_bound=torch.where(better, run.lower_bound, best.lower_bound),
            n_iter=torch.where(better, run.n_iter, best.n_iter),
            converged=torch.where(better, run.converged, best.converged),
            lower_bounds=[torch.where(better, pad(run.lower_bounds, i), pad(best.lower_bounds, i))
                          for i in range(n_hist)],
        )
    assert best is not None
    return best


def blocks_of(n_groups: int, size: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive blocks of at most ``size`` groups (None: one block)."""
    size = size or n_groups
    return [(start, min(start + size, n_groups)) for start in range(0, n_groups, size)]


def fit_blocks(source: DataSource, restarts: Restarts, cfg: Config, gen: torch.Generator,
               block_size: int | None, storage: torch.device) -> Run:
    """EM for every group: all at once on the compute device, or (the mixtures are
    independent) one block of ``block_size`` groups at a time, the results kept on
    ``storage``. The blocks give the one-block result."""
    device = source.device
    blocks = blocks_of(source.counts.shape[0], block_size)
    with torch.no_grad():
        if len(blocks) == 1 and storage == device:
            return fit_groups(source, restarts, cfg, gen)
        runs = [fit_groups(source.block(start, stop, device), restarts.block(start, stop, device),
                           cfg, gen).to(storage)
                for start, stop in blocks]
        return cat_runs(runs)


# --------------------------------------------------------------------------------------
# What a data source needs to know about the fit
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """The estimator's settings a data source reads when it opens (plain values: the
    sources never see the estimator).

    ``n_groups`` is G when the init arrays fix it (else None: ``max(y) + 1``); ``batched``
    says whether ``y`` holds group labels (otherwise every sample is in group 0);
    ``storage_device`` is where the samples wait in memory (None: the compute device).
    """

    estimator_name: str
    batched: bool
    n_components: int
    n_groups: int | None
    dtype: Any
    device: Any
    random_state: Any
    memory_budget: int | None
    storage_device: Any = None

    def storage(self, device: torch.device) -> torch.device:
        return device if self.storage_device is None else torch.device(self.storage_device)


def peek(X: Any) -> tuple[Tensor, ArrayKind]:
    """Tensor view of ``X`` (no copy, no validation) to resolve the compute dtype/device;
    rejects sparse input."""
    reject_sparse(X)
    if isinstance(X, Tensor):
        return X, ArrayKind(numpy=False, device=X.device)
    try:
        array = np.asarray(X)
    except Exception:  # noqa: BLE001 - check_array raises the proper error later
        return torch.empty(0), ArrayKind(numpy=True)
    if array.dtype.kind != "f":  # integers and booleans: float64, as scikit-learn does
        return torch.empty(0, dtype=torch.float64), ArrayKind(numpy=True)
    return torch.empty(0, dtype=torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype), ArrayKind(numpy=True)


def labels_for_fit(request: Request, y: Any, n_samples: int, device: torch.device) -> tuple[Tensor, int]:
    """Validated group labels ``(n_samples,)`` int64 on ``device`` and G."""
    if not request.batched:
        return torch.zeros(n_samples, dtype=torch.int64, device=device), 1
    labels = check_labels(y, n_samples, device, request.n_groups)
    n_groups = request.n_groups
    if n_groups is None:
        n_groups = int(labels.max()) + 1
    return labels, n_groups
