"""Public Gaussian-mixture estimators: ``GaussianMixture`` and ``BatchedGaussianMixture``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from numbers import Integral

from idefender_gpu._param_validation import Interval, Predicate
from idefender_gpu._validation import check_labels
from idefender_gpu.mixture._base import _GaussianMixtureBase, _is_device

__all__ = ["BatchedGaussianMixture", "GaussianMixture"]

_SHARED_PARAMETERS_DOC = """
    n_components : int, default=1
        The number of mixture components.
    covariance_type : {{'full', 'tied', 'diag', 'spherical'}}, default='full'
        'full': each component has its own general covariance matrix; 'tied': all
        components share one general covariance matrix; 'diag': each component has its
        own diagonal covariance matrix; 'spherical': each component has its own single
        variance.
    tol : float, default=1e-3
        The convergence threshold. EM iterations stop when the lower bound average gain
        is below this threshold.
    reg_covar : float, default=1e-6
        Non-negative regularization added to the diagonal of covariance.
    max_iter : int, default=100
        The number of EM iterations to perform.
    n_init : int, default=1
        The number of initializations to perform. The best results are kept.
    init_params : {{'kmeans', 'k-means++', 'random', 'random_from_data'}}, default='kmeans'
        The method used to initialize the weights, the means and the precisions.
        'kmeans' runs k-means++ seeding and Lloyd iterations on the device (never
        through scikit-learn); 'k-means++' uses the seeds alone; 'random' draws random
        responsibilities; 'random_from_data' picks random samples as means.
    weights_init : array-like of shape {shape_weights}, default=None
        The user-provided initial weights.
    means_init : array-like of shape {shape_means}, default=None
        The user-provided initial means.
    precisions_init : array-like, default=None
        The user-provided initial precisions (inverse of the covariance matrices), of
        shape {shape_precisions}.
    random_state : int, RandomState, Generator, torch.Generator or None, default=None
        Seeds the initialization and :meth:`sample`. The draws come from a
        ``torch.Generator`` on the compute device, so they differ from scikit-learn's.
    warm_start : bool, default=False
        If True, the solution of the last fit initializes the next one and ``n_init``
        is ignored.
    verbose : int, default=0
        Progress messages through the ``logging`` logger ``idefender_gpu.mixture``
        (level INFO) instead of scikit-learn's prints.
    verbose_interval : int, default=10
        Number of iterations between progress messages.
    device : str or torch.device, default=None
        Compute device. Default: the device of a tensor input; for NumPy input CUDA when
        available, else CPU.
    dtype : {{None, 'float32', 'float64'}} or torch dtype, default=None
        Compute dtype. Default: the input's float32/float64; float64 for NumPy integer
        input (as scikit-learn); float32 otherwise.
    backend : {{'auto', 'torch', 'keops'}}, default='auto'
        Kernel backend. 'torch': dense batched GEMMs over chunks of samples. 'keops':
        KeOps lazy reductions (pykeops, optional), no ``(N, K, D)`` intermediate; each new
        formula compiles on first use (seconds). 'auto' picks from the measured table in
        README (``benchmarks/bench_backends.py``).
    memory_budget : int, default=None
        Bytes allowed for the intermediates of one chunk of samples in the kernels
        (default 64 MiB). Samples are processed in chunks that stay under it."""


class GaussianMixture(_GaussianMixtureBase):
    __doc__ = (
        """Gaussian mixture fitted by EM on the device of its input: a drop-in for
    :class:`sklearn.mixture.GaussianMixture`.

    Same parameters (names, order, defaults), fitted attributes and methods as
    scikit-learn's, plus keyword-only ``device``, ``dtype``, ``backend`` and
    ``memory_budget``. NumPy input gives NumPy output (float32 stays float32); tensor
    input gives tensors on the input's device. From the same ``weights_init``,
    ``means_init`` and ``precisions_init`` it reproduces scikit-learn's fit to
    round-off.

    Parameters
    ----------"""
        + _SHARED_PARAMETERS_DOC.format(
            shape_weights="(n_components,)",
            shape_means="(n_components, n_features)",
            shape_precisions="(n_components,) 'spherical', (n_features, n_features) 'tied', "
            "(n_components, n_features) 'diag', (n_components, n_features, n_features) 'full'",
        )
        + """

    Attributes
    ----------
    weights_ : array of shape (n_components,)
    means_ : array of shape (n_components, n_features)
    covariances_ : array
        Shape as ``precisions_init``.
    precisions_ : array
        Shape as ``precisions_init``.
    precisions_cholesky_ : array
        Upper-triangular factors with ``precision = P @ P.T`` (full/tied), or square
        roots of the precisions (diag/spherical).
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Mean log-likelihood of the training data at the best run's last iteration.
    lower_bounds_ : list of float
        The lower bound at each iteration of the best run.
    n_features_in_ : int

    Raises
    ------
    NotFittedError
        When a method other than ``fit`` is used before fitting (subclasses
        scikit-learn's ``NotFittedError`` when scikit-learn is installed).
    NotPSDError
        When a covariance is not positive definite (a ``ValueError``).

    Warns
    -----
    ConvergenceWarning
        When the best run did not converge within ``max_iter``.

    See Also
    --------
    BatchedGaussianMixture : one mixture per group label, all fitted in one pass.

    Examples
    --------
    >>> import numpy as np
    >>> from idefender_gpu.mixture import GaussianMixture
    >>> X = np.array([[1, 2], [1, 4], [1, 0], [10, 2], [10, 4], [10, 0]])
    >>> gm = GaussianMixture(n_components=2, random_state=0, device="cpu").fit(X)
    >>> np.sort(gm.means_[:, 0])
    array([ 1., 10.])
    >>> bool(gm.predict([[0, 0]])[0] != gm.predict([[12, 3]])[0])
    True
    """
    )

    _batched = False

    def fit(self, X: Any, y: Any = None) -> "GaussianMixture":
        """Estimate the model parameters with the EM algorithm.

        Parameters
        ----------
        X : array-like or Tensor of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        self : GaussianMixture
        """
        self._fit(X, None)
        return self

    def fit_stream(self, data: Any) -> "GaussianMixture":
        """Fit by streaming EM from batches that are read once per EM iteration.

        Exact EM (the in-memory fit's result, to round-off) with the samples never all in
        memory: each pass scores the batches and adds up their sufficient statistics,
        centred on the current means. A first pass validates the batches and keeps a
        uniform sample of ``max(256, 20 * n_components)`` rows for the seeding of
        ``init_params``; ``'kmeans'`` then runs Lloyd passes over the stream. Later passes
        trust what the first pass checked (they must yield the same data) and, with
        labels on the CPU, make no host synchronisation besides the convergence check
        of each iteration; CPU batches bound for CUDA go through pinned memory
        (``DataLoader(pin_memory=True)`` saves that copy).

        Parameters
        ----------
        data : iterable or callable
            Re-iterable batches (a ``DataLoader``, a list of arrays) of ``X`` of shape
            (batch, n_features), or ``(X, ...)`` tuples (the rest is ignored); or a callable
            returning a fresh iterable. NumPy or tensors, as :meth:`fit`.

        Returns
        -------
        self : GaussianMixture
        """
        self._fit_stream(data)
        return self

    def fit_predict(self, X: Any, y: Any = None) -> Any:
        """Fit, then return the component labels of ``X`` (a final E-step makes them
        equal ``fit(X).predict(X)``).

        Returns
        -------
        labels : array of shape (n_samples,)
        """
        groups = self._fit(X, None).groups  # this rank's samples when data-parallel
        state = self._state
        labels = self._weighted_log_prob(groups.X, state.params).argmax(-1)[0]
        return state.kind.out(labels)

    def _log_prob(self, X: Any) -> tuple[Tensor, Any]:
        state = self._check_is_fitted()
        X_t, kind = self._check_X(X, state)
        return self._weighted_log_prob(X_t, state.params)[0], kind  # (N, K)

    def score_samples(self, X: Any) -> Any:
        """Log-likelihood of each sample.

        Returns
        -------
        log_prob : array of shape (n_samples,)
        """
        state = self._check_is_fitted()
        X_t, kind = self._check_X(X, state)
        return kind.out(self._log_prob_norm(X_t, state)[0])

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-likelihood of ``X``: ``score_samples(X).mean()`` (NumPy's mean for
        NumPy input, as scikit-learn computes it; torch's for a tensor).

        Returns
        -------
        log_likelihood : float
        """
        state = self._check_is_fitted()
        X_t, kind = self._check_X(X, state)
        return float(kind.out(self._log_prob_norm(X_t, state)[0]).mean())

    def predict(self, X: Any) -> Any:
        """Most probable component of each sample.

        Returns
        -------
        labels : array of shape (n_samples,)
        """
        weighted, kind = self._log_prob(X)
        return kind.out(weighted.argmax(-1))

    def predict_proba(self, X: Any) -> Any:
        """Posterior probability of each component for each sample.

        Returns
        -------
        resp : array of shape (n_samples, n_components)
        """
        weighted, kind = self._log_prob(X)
        return kind.out(torch.softmax(weighted, dim=-1))

    def sample(self, n_samples: int = 1) -> tuple[Any, Any]:
        """Draw samples from the fitted mixture.

        Returns
        -------
        X : array of shape (n_samples, n_features)
        y : array of shape (n_samples,)
            Component labels, sorted.
        """
        state = self._check_is_fitted()
        X, labels = self._sample(n_samples, state)
        return state.kind.out(X[0]), state.kind.out(labels[0])

    def bic(self, X: Any) -> float:
        """Bayesian information criterion (lower is better)."""
        n = len(X)
        return -2 * self.score(X) * n + self._n_parameters() * math.log(n)

    def aic(self, X: Any) -> float:
        """Akaike information criterion (lower is better)."""
        return -2 * self.score(X) * len(X) + 2 * self._n_parameters()


class BatchedGaussianMixture(_GaussianMixtureBase):
    __doc__ = (
        """G independent Gaussian mixtures, one per group label, fitted in one batched EM pass.

    ``fit(X, y)`` fits one mixture to the samples of each group ``g`` in
    ``y in [0, G)``; groups may have unequal sizes. Every kernel call handles all groups
    at once (no Python loop over groups); each group has its own convergence test, and a
    group that has converged stops changing, so the result equals G separate
    :class:`GaussianMixture` fits from the same initialisation.

    Parameters
    ----------"""
        + _SHARED_PARAMETERS_DOC.format(
            shape_weights="(G, n_components)",
            shape_means="(G, n_components, n_features)",
            shape_precisions="(G, n_components) 'spherical', (G, n_features, n_features) 'tied', "
            "(G, n_components, n_features) 'diag', (G, n_components, n_features, n_features) 'full'",
        )
        + """

    group_block_size : int, default=None
        Fit (and score) at most this many groups' mixtures at once on the compute device:
        the mixtures are independent, so blocks give the same result. For when all
        ``G * K * D * D`` parameters do not fit on the device. None: all groups at once.
    storage_device : str or torch.device, default=None
        Where the samples wait during ``fit`` and where the fitted parameters are kept
        (e.g. ``"cpu"`` while computing on ``"cuda"``); scoring moves only the groups a
        batch needs, one block at a time. None: the compute device.

    Attributes
    ----------
    n_groups_ : int
        G, from the init arrays if given, else ``max(y) + 1``.
    weights_ : array of shape (G, n_components)
    means_ : array of shape (G, n_components, n_features)
    covariances_, precisions_, precisions_cholesky_ : array
        As in :class:`GaussianMixture` with a leading G axis.
    converged_ : array of bool, shape (G,)
    n_iter_ : array of int, shape (G,)
    lower_bound_ : array of shape (G,)
    lower_bounds_ : list of G arrays
        Per group, the lower bound at each of its iterations.
    n_features_in_ : int

    Examples
    --------
    >>> import torch
    >>> from idefender_gpu.mixture import BatchedGaussianMixture
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.cat([torch.randn(200, 3, generator=g), torch.randn(300, 3, generator=g) + 5])
    >>> y = torch.cat([torch.zeros(200), torch.ones(300)]).long()
    >>> bgm = BatchedGaussianMixture(2, random_state=0).fit(X, y)
    >>> tuple(bgm.means_.shape)
    (2, 2, 3)
    >>> tuple(bgm.score_samples(X).shape), tuple(bgm.score_samples(X, y).shape)
    ((500, 2), (500,))
    """
    )

    _batched = True

    _parameter_constraints: dict[str, list] = {
        **_GaussianMixtureBase._parameter_constraints,
        "group_block_size": [Interval(Integral, 1, None, closed="left"), None],
        "storage_device": [Predicate(_is_device, "a torch device or its name"), None],
    }

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
        group_block_size: int | None = None,
        storage_device: Any = None,
    ) -> None:
        super().__init__(
            n_components, covariance_type=covariance_type, tol=tol, reg_covar=reg_covar,
            max_iter=max_iter, n_init=n_init, init_params=init_params, weights_init=weights_init,
            means_init=means_init, precisions_init=precisions_init, random_state=random_state,
            warm_start=warm_start, verbose=verbose, verbose_interval=verbose_interval,
            device=device, dtype=dtype, backend=backend, memory_budget=memory_budget,
        )
        self.group_block_size = group_block_size
        self.storage_device = storage_device

    def _storage_device(self, device: torch.device) -> torch.device:
        return device if self.storage_device is None else torch.device(self.storage_device)

    def _group_block_size(self) -> int | None:
        return self.group_block_size

    def _init_groups(self) -> int | None:
        """G from the leading axis of the init arrays (they must agree), or None."""
        n_groups = None
        for name in ("weights_init", "means_init", "precisions_init"):
            value = getattr(self, name)
            if value is not None:
                shape = tuple(value.shape) if isinstance(value, Tensor) else np.shape(value)
                if len(shape) == 0:
                    raise ValueError(f"{name} must have a leading group axis of size G; got a scalar")
                if n_groups is not None and shape[0] != n_groups:
                    raise ValueError(
                        f"{name} must have {n_groups} groups along its first axis like the other "
                        f"init arrays; got shape {shape}"
                    )
                n_groups = shape[0]
        return n_groups

    def _set_fitted(self, run, kind, D, device, dtype, backend):
        super()._set_fitted(run, kind, D, device, dtype, backend)
        self.n_groups_ = int(run.params.weights.shape[0])

    def fit(self, X: Any, y: Any) -> "BatchedGaussianMixture":
        """Fit one mixture per group.

        Parameters
        ----------
        X : array-like or Tensor of shape (n_samples, n_features)
        y : array-like or Tensor of int, shape (n_samples,)
            Group labels in ``[0, G)``. Every group needs at least ``n_components``
            samples.

        Returns
        -------
        self : BatchedGaussianMixture
        """
        self._fit(X, y)
        return self

    def fit_stream(self, data: Any) -> "BatchedGaussianMixture":
        """Fit every group's mixture by streaming EM from re-iterable ``(X, y)`` batches.

        One pass over the batches per EM iteration; each batch is scored under the
        mixtures of the groups it holds only. Exact EM: the in-memory :meth:`fit` result on
        the same data, to round-off. See :meth:`GaussianMixture.fit_stream` for the
        initialisation. Batches that hold few groups each (e.g. sorted by class) are
        cheapest when the mixtures are large.

        Parameters
        ----------
        data : iterable or callable
            Re-iterable batches ``(X, y)``: ``X`` of shape (batch, n_features), ``y`` group
            labels of shape (batch,); or a callable returning a fresh iterable.

        Returns
        -------
        self : BatchedGaussianMixture
        """
        self._fit_stream(data)
        return self

    def fit_predict(self, X: Any, y: Any) -> Any:
        """Fit, then return each sample's most probable component within its group."""
        self._fit(X, y)
        return self.predict(X, y)

    def _own_group_log_prob(self, X: Any, y: Any) -> tuple[Tensor, Any]:
        """``(N, K)`` weighted log-probabilities of each sample under its group's mixture."""
        state = self._check_is_fitted()
        X_t, kind = self._check_X(X, state)
        y_t = check_labels(y, X_t.shape[0], state.device, self.n_groups_)
        return self._own_group(X_t, y_t, state, log_norm=False), kind

    def score_samples(self, X: Any, y: Any = None) -> Any:
        """Log-likelihood of each sample under its group's mixture, or under every group.

        Parameters
        ----------
        X : array-like or Tensor of shape (n_samples, n_features)
        y : array-like or Tensor of int, shape (n_samples,), optional

        Returns
        -------
        log_prob : array of shape (n_samples,) with ``y``, else (n_samples, G)
        """
        state = self._check_is_fitted()
        X_t, kind = self._check_X(X, state)
        if y is None:
            return kind.out(self._log_prob_norm(X_t, state).mT)  # (N, G)
        return kind.out(self._own_group_log_prob_norm(X_t, y, state))

    def score(self, X: Any, y: Any) -> float:
        """Mean log-likelihood of the samples under their groups' mixtures."""
        state = self._check_is_fitted()
        X_t, _ = self._check_X(X, state)
        return float(self._own_group_log_prob_norm(X_t, y, state).mean())

    def _own_group_log_prob_norm(self, X_t: Tensor, y: Any, state) -> Tensor:
        """``log p(x | its group)`` ``(N,)``: each group scores only its own samples."""
        y_t = check_labels(y, X_t.shape[0], state.device, self.n_groups_)
        return self._own_group(X_t, y_t, state, log_norm=True)

    def predict(self, X: Any, y: Any) -> Any:
        """Most probable component of each sample within its group's mixture."""
        weighted, kind = self._own_group_log_prob(X, y)
        return kind.out(weighted.argmax(-1))

    def predict_proba(self, X: Any, y: Any) -> Any:
        """Component posteriors ``(n_samples, n_components)`` within each sample's group."""
        weighted, kind = self._own_group_log_prob(X, y)
        return kind.out(torch.softmax(weighted, dim=-1))

    def sample(self, n_samples: int = 1) -> tuple[Any, Any]:
        """Draw ``n_samples`` from every group's mixture.

        Returns
        -------
        X : array of shape (G, n_samples, n_features)
        y : array of shape (G, n_samples)
            Component labels, sorted within each group.
        """
        state = self._check_is_fitted()
        X, labels = self._sample(n_samples, state)
        return state.kind.out(X), state.kind.out(labels)
