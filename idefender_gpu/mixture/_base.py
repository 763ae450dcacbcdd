"""The estimator base of ``GaussianMixture`` and ``BatchedGaussianMixture`` (private).

The scikit-learn contract (``get_params`` / ``set_params`` / ``repr``, the
``_parameter_constraints`` table checked at the start of ``fit``), the fit itself (the
data source from :func:`._sources.open_source`, then the EM core :func:`._core.fit_blocks`),
the one copy of the fitted state, scoring and sampling. The estimators call the sources
and the core; neither calls back.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu._param_validation import InstanceOf, Interval, Options, Predicate, validate_params
from idefender_gpu._validation import ArrayKind, check_array
from idefender_gpu.exceptions import ConvergenceWarning, NotFittedError
from idefender_gpu.mixture._backends import BACKEND_NAMES, DenseEM, resolve_backend
from idefender_gpu.mixture._core import (
    INIT_PARAMS,
    Config,
    Params,
    Request,
    Restarts,
    Run,
    blocks_of,
    fit_blocks,
    make_generator,
    padded,
    present_groups,
)
from idefender_gpu.mixture._inits import check_inits
from idefender_gpu.mixture._sources import open_source

__all__ = ["INIT_PARAMS"]

_DTYPES = (torch.float32, torch.float64, np.float32, np.float64)


def _is_device(value: Any) -> bool:
    try:
        return isinstance(value, (str, torch.device)) and torch.device(value) is not None
    except RuntimeError:
        return False


def _is_array_like(value: Any) -> bool:
    """scikit-learn's "array-like" (``_is_arraylike_not_scalar``)."""
    return (hasattr(value, "__len__") or hasattr(value, "shape") or hasattr(value, "__array__")) \
        and not np.isscalar(value)


_ARRAY_LIKE = Predicate(_is_array_like, "an array-like")


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


@dataclass(frozen=True)
class _FittedState:
    """The one copy of the fitted parameters (on the storage device) and how to use them.

    The public ``weights_``, ``means_``, ``covariances_``, ``precisions_`` and
    ``precisions_cholesky_`` are views of it (properties): assigning one replaces the
    tensor here, converted to the fit's dtype and device."""

    params: Params
    precisions: Tensor
    lower_bound: Tensor
    kind: ArrayKind
    device: torch.device
    dtype: torch.dtype
    backend: type = DenseEM


def _fitted_param(field: str, doc: str) -> property:
    """A public fitted array backed by :class:`_FittedState` (``field`` of its params, or
    ``"precisions"``)."""

    def get(self):
        state = self.__dict__.get("_state")
        if state is None:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{public}' (not fitted)")
        value = state.precisions if field == "precisions" else getattr(state.params, field)
        return state.kind.out(value if self._batched else value[0])

    def set(self, value):
        state = self.__dict__.get("_state")
        if state is None:
            raise AttributeError(f"{public} can be set only on a fitted {type(self).__name__}")
        old = state.precisions if field == "precisions" else getattr(state.params, field)
        tensor = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
        tensor = tensor.to(device=old.device, dtype=state.dtype)
        tensor = tensor if self._batched else tensor.unsqueeze(0)
        if field == "precisions":
            self._state = replace(state, precisions=tensor)
        else:
            self._state = replace(state, params=replace(state.params, **{field: tensor}))

    public = {"prec_chol": "precisions_cholesky_"}.get(field, field + "_")
    return property(get, set, doc=doc)


class _GaussianMixtureBase(_EstimatorParams):
    """EM for G independent Gaussian mixtures; subclasses shape the public API."""

    _batched: bool = True

    #: scikit-learn's table (``BaseMixture`` then ``GaussianMixture``, same order and
    #: values), then this library's keyword-only extras.
    _parameter_constraints: dict[str, list] = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "init_params": [Options(str, set(INIT_PARAMS))],
        "random_state": [Interval(Integral, 0, 2**32 - 1, closed="both"),
                         InstanceOf(np.random.RandomState, np.random.Generator, torch.Generator), None],
        "warm_start": ["boolean"],
        "verbose": [Interval(Integral, 0, None, closed="left"), "boolean"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        "covariance_type": [Options(str, set(kernels.COVARIANCE_TYPES))],
        "weights_init": [_ARRAY_LIKE, None],
        "means_init": [_ARRAY_LIKE, None],
        "precisions_init": [_ARRAY_LIKE, None],
        "device": [Predicate(_is_device, "a torch device or its name"), None],
        "dtype": [Options(str, {"float32", "float64"}),
                  Predicate(lambda v: any(v is d for d in _DTYPES), "torch.float32 or torch.float64"), None],
        "backend": [Options(str, set(BACKEND_NAMES))],
        "memory_budget": [Interval(Integral, 0, None, closed="neither"), None],
    }

    weights_ = _fitted_param("weights", "Mixture weights, fitted.")
    means_ = _fitted_param("means", "Component means, fitted.")
    covariances_ = _fitted_param("covariances", "Component covariances, fitted.")
    precisions_ = _fitted_param("precisions", "Component precisions, fitted.")
    precisions_cholesky_ = _fitted_param("prec_chol", "Cholesky factors of the precisions, fitted.")

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

    # -- fitting -----------------------------------------------------------------------

    def _validate_params(self) -> None:
        validate_params(type(self).__name__, self.get_params(deep=False), self._parameter_constraints)

    def _init_groups(self) -> int | None:
        """G from the init arrays (None: from the labels); 1 for one mixture."""
        return 1

    def _storage_device(self, device: torch.device) -> torch.device:
        """Where fitted parameters (and, in memory, the samples) are kept."""
        return device

    def _group_block_size(self) -> int | None:
        """At most this many groups on the compute device at once (None: all)."""
        return None

    def _request(self) -> Request:
        return Request(type(self).__name__, self._batched, self.n_components, self._init_groups(),
                       self.dtype, self.device, self.random_state, self.memory_budget,
                       getattr(self, "storage_device", None))

    def _fit(self, X: Any, y: Any):
        """Validate, fit from ``X`` (``y``), and set the fitted attributes only once
        everything succeeded. Returns the data source.

        Inside :func:`idefender_gpu.distributed.data_parallel`, the data are this rank's
        shard and the fit is data-parallel (the factory picks the source)."""
        self._validate_params()
        source = open_source(self._request(), X, y)
        self._fit_source(source)
        return source

    def _fit_stream(self, data: Any) -> None:
        """:meth:`_fit` from re-iterable batches (``fit_stream``)."""
        self._validate_params()
        self._fit_source(open_source(self._request(), stream=data))

    def _fit_source(self, source) -> None:
        """Checks, inits, EM on ``source``; the fitted attributes are set only at the end."""
        counts = source.counts.long()
        G, dtype, device, D = counts.shape[0], source.counts.dtype, source.device, source.n_features
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
        inits = check_inits(self.weights_init, self.means_init, self.precisions_init,
                            covariance_type=self.covariance_type, n_components=self.n_components,
                            n_groups=G, n_features=D, batched=self._batched, dtype=dtype, device=storage)
        backend = resolve_backend(self.backend, D, self.n_components, self.covariance_type)
        cfg = Config(self.n_components, self.covariance_type, float(self.tol),
                     float(self.reg_covar), int(self.max_iter), self.memory_budget, backend)
        gen = source.make_generator(self.random_state, device)
        warm = None
        if self.warm_start and self.__sklearn_is_fitted__():
            state = self._state
            if state.params.weights.shape[0] != G or state.device != device \
                    or state.params.weights.dtype != dtype:
                raise ValueError("warm_start needs the same groups, dtype and device as the previous fit")
            warm = (state.params, state.lower_bound)
        restarts = Restarts(self.n_init, self.init_params, inits, warm, self.verbose, self.verbose_interval)
        run = fit_blocks(source, restarts, cfg, gen, self._group_block_size(), storage)
        # Everything succeeded: only now touch the fitted state.
        self._set_fitted(run, source.kind, D, device, dtype, backend)
        self._warn_not_converged(run)

    def _warn_not_converged(self, run: Run) -> None:
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
        warnings.warn(message, ConvergenceWarning, stacklevel=5)

    # -- fitted state ------------------------------------------------------------------

    def _set_fitted(self, run: Run, kind: ArrayKind, D: int, device, dtype, backend) -> None:
        params, lower_bound = run.params, run.lower_bound
        precisions = kernels.precision_from_prec_chol(params.prec_chol, self.covariance_type)
        self._state = _FittedState(params, precisions, lower_bound, kind, device, dtype, backend)
        n_iter = run.n_iter.tolist()
        history = torch.stack(run.lower_bounds, dim=1) if run.lower_bounds else \
            lower_bound.new_zeros(lower_bound.shape[0], 0)  # (G, n_iterations)
        if self._batched:
            self.converged_ = kind.out(run.converged)
            self.n_iter_ = kind.out(run.n_iter)
            self.lower_bound_ = kind.out(lower_bound)
            self.lower_bounds_ = [kind.out(history[g, : n_iter[g]]) for g in range(history.shape[0])]
        else:
            self.converged_ = bool(run.converged.tolist()[0])
            self.n_iter_ = int(n_iter[0])
            self.lower_bound_ = float(lower_bound[0])
            self.lower_bounds_ = history[0, : n_iter[0]].tolist()
        self.n_features_in_ = D

    def __sklearn_is_fitted__(self) -> bool:
        return "_state" in self.__dict__

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

    def _check_is_fitted(self) -> _FittedState:
        if not self.__sklearn_is_fitted__():
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                "appropriate arguments before using this estimator."
            )
        return self._state

    # -- scoring -----------------------------------------------------------------------

    def _check_X(self, X: Any, state: _FittedState) -> tuple[Tensor, ArrayKind]:
        return check_array(X, dtype=state.dtype, device=state.device,
                           estimator_name=type(self).__name__, n_features=self.n_features_in_)

    def _weighted_log_prob(self, X: Tensor, params: Params) -> Tensor:
        """``log w_k + log N(x | k)`` for every group: ``(G, N, K)`` from ``X (N, D)`` or ``(G, N, D)``."""
        log_prob = kernels.log_gaussian_prob(X, params.means, params.prec_chol, self.covariance_type,
                                             memory_budget=self.memory_budget)
        return log_prob + params.weights.log().unsqueeze(-2)

    def _device_blocks(self, state: _FittedState, groups: Tensor | None = None):
        """``(selector, params on the compute device)`` per block of groups: all groups, or
        those in ``groups`` (an index tensor) only. Parameters kept on a storage device
        move to the compute device one block at a time."""
        G = state.params.weights.shape[0] if groups is None else groups.shape[0]
        for start, stop in blocks_of(G, self._group_block_size()):
            part = slice(start, stop)
            chosen = part if groups is None else groups[part].to(state.params.weights.device)
            yield part, state.params.take(chosen).to(state.device)

    def _log_prob_norm(self, X: Tensor, state: _FittedState) -> Tensor:
        """``log p(x)`` under every group, ``(G, N)``, with the fitted backend."""
        return torch.cat([
            state.backend.log_prob_norm(X, params, self.covariance_type, self.memory_budget)
            for _, params in self._device_blocks(state)
        ])

    def _own_group(self, X: Tensor, y: Tensor, state: _FittedState, log_norm: bool) -> Tensor:
        """Each sample under its own group's mixture only: ``log p(x | y)`` ``(N,)`` when
        ``log_norm``, else the weighted component log-probabilities ``(N, K)``. Only the
        groups present in ``y`` are laid out and their parameters gathered."""
        present, local, rows, n_max = present_groups(y)
        out = None
        for part, params in self._device_blocks(state, present):
            chosen = (local >= part.start) & (local < part.stop)
            Xp, _ = padded(X[chosen], local[chosen] - part.start, rows[chosen],
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

    # -- sampling ----------------------------------------------------------------------

    def _sample(self, n_samples: int, state: _FittedState) -> tuple[Tensor, Tensor]:
        """``n_samples`` draws per group: ``X (G, n, D)`` and component labels ``(G, n)``,
        sorted by component, on the compute device (where the generator lives, whatever
        the storage device of the parameters)."""
        if isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples!r} . The sampling requires at least one sample."
            )
        device, dtype = state.device, state.dtype
        G, K, D = state.params.means.shape
        gen = make_generator(self.random_state, device)
        labels = torch.multinomial(state.params.weights.to(device), n_samples, replacement=True, generator=gen)
        labels = labels.sort(-1).values  # (G, n)
        noise = torch.randn(G, n_samples, D, generator=gen, device=device, dtype=dtype)
        out = torch.empty_like(noise)
        for part, params in self._device_blocks(state):  # the draws above, then each block's scale
            out[part] = self._place(params, noise[part], labels[part], state)
        return out, labels

    def _place(self, params: Params, noise: Tensor, labels: Tensor, state: _FittedState) -> Tensor:
        """``μ_k + L_k z`` for standard normal ``noise (G, n, D)`` and components ``labels (G, n)``."""
        G, K, D = params.means.shape
        n_samples = noise.shape[1]
        means = torch.gather(params.means, 1, labels.unsqueeze(-1).expand(-1, -1, D))  # (G, n, D)
        ctype = self.covariance_type
        if ctype in ("diag", "spherical"):
            scale = params.prec_chol.reciprocal()  # (G, K, D) or (G, K)
            if ctype == "spherical":
                scale = scale.unsqueeze(-1).expand(G, K, D)
            scale = torch.gather(scale, 1, labels.unsqueeze(-1).expand(-1, -1, D))
            return means + noise * scale
        scale_tril = kernels.scale_tril_from_prec_chol(params.prec_chol)
        if ctype == "tied":
            return means + noise @ scale_tril.mT
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
        return means + torch.cat(out, dim=1)
