"""The detector machinery shared by :class:`IDefender` and :class:`MahalanobisDetector` (private).

A detector is built on a classifier and the names of some of its layers. ``fit`` runs the
natural training data through the classifier (eval mode, no gradients), fits one
class-conditional density per layer on the hidden states with their true labels, and sets
per-class thresholds (paper Eq. 5). Scoring runs the classifier once per call: its logits
give the predicted class, the hooks give the hidden states, and the densities give
``log p(H(x) | c)`` through the mixture kernels, differentiably.

Subclasses choose the density (:mod:`._densities`), its fitting options, the config that
goes into a detector file, and the class a sample is scored under.
"""

from __future__ import annotations

from contextlib import nullcontext
from numbers import Integral, Real
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from idefender_gpu._validation import resolve_dtype
from idefender_gpu.detector import _io
from idefender_gpu.detector._densities import DENSITIES, _check_tensor
from idefender_gpu.distributed import current as current_data_parallel
from idefender_gpu.exceptions import NotFittedError
from idefender_gpu.features import (
    HiddenStateHooks,
    LayerSpec,
    _collect,
    _to_model,
    eval_mode,
    model_device,
    model_dtype,
    parse_layers,
)

__all__ = ["_DetectorBase", "class_thresholds"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Densities whose fit is data-parallel inside ``idefender_gpu.distributed.data_parallel``
#: (their per-layer fit is a ``BatchedGaussianMixture`` fit).
_DATA_PARALLEL_DENSITIES = ("class_mixtures",)
#: Input dimensions compared across ranks (with the number of elements).
_SHAPE_DIMS = 6


# --------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------


def class_thresholds(scores: Tensor, labels: Tensor, n_classes: int, keep: float) -> Tensor:
    """Per-class thresholds that keep a fraction ``keep`` of each class's samples.

    For class ``c`` with ``n_c`` samples, the threshold is the ``(n_c - m_c + 1)``-th largest
    score, ``m_c = ceil(keep * n_c)``: exactly ``m_c`` samples score at or above it when
    there are no ties (more with ties at the threshold), so ``score < threshold`` rejects
    at most ``1 - keep`` of the class. No loop over classes: one sort by (class, score).

    Parameters
    ----------
    scores : Tensor of shape (N,)
    labels : Tensor of int64, shape (N,)
        In ``[0, n_classes)``; every class must occur.
    n_classes : int
    keep : float in (0, 1]

    Returns
    -------
    thresholds : Tensor of shape (n_classes,), same dtype/device as ``scores``.
    """
    counts = torch.bincount(labels, minlength=n_classes)  # (C,)
    order = torch.argsort(scores, stable=True)  # (N,) by score
    order = order[torch.argsort(labels[order], stable=True)]  # (N,) by class, then score
    offsets = torch.cumsum(counts, 0) - counts  # (C,)
    # 1e-9 absorbs round-off in keep * n_c (0.95 * 20 must keep 19, not 20).
    n_keep = torch.ceil(counts.to(torch.float64) * keep - 1e-9).to(torch.int64)  # (C,)
    n_keep = torch.minimum(n_keep.clamp_min(1), counts)
    return scores[order][offsets + counts - n_keep]  # (C,)


def _sum_log_density(densities: dict[str, Any], states: dict[str, Tensor],
                     memory_budget: int | None) -> Tensor:
    """``Σ_layers log p(h_layer | c)`` (layers independent given the class): ``(B, n_classes)``.

    Each layer's states ``(B, D)`` are cast to its density's dtype (differentiably).
    """
    total = None
    for spec, density in densities.items():
        h = states[spec]
        if h.dtype != density.means.dtype:
            h = h.to(density.means.dtype)
        log_prob = density.log_prob(h, memory_budget)  # (B, C)
        total = log_prob if total is None else total + log_prob
    return total


def _check_real(value: Any, name: str, low: float, high: float | None = None, *,
                low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    below = value <= low if low_open else value < low
    if below or (high is not None and value > high) or value != value:
        bracket = "(" if low_open else "["
        upper = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be in {bracket}{low}, {upper}; got {value!r}")
    return float(value)


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int; got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(value)


def _check_options(value: Any, name: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {list(options)}; got {value!r}")
    return value


# --------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------


class _DetectorBase:
    """Shared fit / calibrate / score / save / load of class-conditional detectors."""

    #: key of :data:`DENSITIES` naming the per-layer density
    _density_name: str = ""

    def __init__(self, model: nn.Module, layers: str | Sequence[str] | None = None, *,
                 keep: float = 0.95, reg_covar: float = 1e-4, dtype: Any = None,
                 memory_budget: int | None = None, progress: bool | None = None) -> None:
        self.model = model
        self.layers = layers
        self.keep = keep
        self.reg_covar = reg_covar
        self.dtype = dtype
        self.memory_budget = memory_budget
        self.progress = progress
        # Fail fast: an unknown layer or a bad hyper-parameter is reported before any data
        # is read (the detector is bound to its model, so there is nothing to clone).
        self._validate()

    # -- validation --------------------------------------------------------------------

    def _validate(self) -> tuple[LayerSpec, ...]:
        """Check the hyper-parameters; return the resolved layer specs."""
        specs = parse_layers(self.model, self.layers)
        _check_real(self.keep, "keep", 0.0, 1.0, low_open=True)
        _check_real(self.reg_covar, "reg_covar", 0.0)
        if self.dtype is not None:
            resolve_dtype(self.dtype, torch.empty(0))
        if self.memory_budget is not None:
            _check_int(self.memory_budget, "memory_budget", 1)
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError(f"progress must be a bool or None; got {self.progress!r}")
        self._validate_options()
        return specs

    def _validate_options(self) -> None:
        """Subclass hyper-parameters."""

    def _fit_options(self, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Keyword arguments for the density's ``fit``."""
        return {"reg_covar": float(self.reg_covar), "memory_budget": self.memory_budget,
                "dtype": dtype, "device": device}

    def _config(self) -> dict[str, Any]:
        """Subclass hyper-parameters written to (and read back from) a detector file."""
        return {"reg_covar": float(self.reg_covar)}

    def _min_per_class(self) -> int:
        return 1

    def _scoring_class(self, logits: Tensor, log_density: Tensor) -> Tensor:
        """The class each sample is scored under, ``(B,)``: the classifier's prediction."""
        return logits.argmax(-1)

    # -- fitted state ------------------------------------------------------------------

    def _is_fitted(self) -> bool:
        return hasattr(self, "_densities")

    def _check_is_fitted(self) -> None:
        if not self._is_fitted():
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with a "
                "loader of natural training data before using this detector."
            )

    def _set_fitted(self, specs, densities, n_classes, input_shape, thresholds, keep) -> None:
        self._specs = tuple(specs)
        self._densities = dict(densities)
        self.layers_ = tuple(spec.spec for spec in specs)
        self.n_features_ = {spec: densities[spec].n_features for spec in self.layers_}
        self.n_classes_ = int(n_classes)
        self.input_shape_ = tuple(input_shape)
        self.thresholds_ = thresholds
        self.keep_ = float(keep)

    def _per_layer(self, name: str) -> dict[str, Tensor]:
        """``{layer: tensor}`` of one fitted density field (for the public ``*_`` properties)."""
        self._check_is_fitted()
        return {spec: getattr(density, name) for spec, density in self._densities.items()}

    def _densities_on(self, device: torch.device) -> dict[str, Any]:
        """The fitted densities on ``device``; moved once (with ``thresholds_``) if the model moved."""
        first = next(iter(self._densities.values()))
        if first.means.device != device:
            self._densities = {spec: density.to(device) for spec, density in self._densities.items()}
            self.thresholds_ = self.thresholds_.to(device)
        return self._densities

    # -- data --------------------------------------------------------------------------

    def _labelled_states(self, loader: Iterable, specs, n_classes: int | None, what: str):
        """Hidden states, labels, number of classes and input shape of a labelled loader.

        Inside ``data_parallel`` the loader is this rank's shard: an error on any rank is
        raised on every rank, and the per-class counts are those of all ranks.
        """
        setting = current_data_parallel()

        def collect():
            collected = _collect(self.model, loader, specs, progress=self.progress,
                                 desc=f"{what}: hidden states")
            if collected.labels is None:
                raise ValueError(f"loader must yield (inputs, labels) pairs to {what} a detector; got inputs only")
            n_out = n_classes
            if n_out is None:
                if collected.n_outputs is None:
                    raise ValueError(
                        "model must return logits of shape (B, n_classes) to be guarded by a detector; "
                        "got another output"
                    )
                n_out = collected.n_outputs
            low, high = (int(v) for v in torch.aminmax(collected.labels))
            if low < 0 or high >= n_out:
                raise ValueError(
                    f"loader labels must be class labels in [0, n_classes) = [0, {n_out}) (n_classes "
                    f"is the width of the model's output); got label {low if low < 0 else high}"
                )
            shape = list(collected.input_shape[:_SHAPE_DIMS])
            shape += [0] * (_SHAPE_DIMS - len(shape))
            numel = int(torch.Size(collected.input_shape).numel())
            return [n_out, len(collected.input_shape), numel, *shape], (collected, n_out)

        if setting is None:
            collected, n_classes = collect()[1]
            counts = torch.bincount(collected.labels, minlength=n_classes)
        else:
            (collected, n_classes), table = setting.exchange(collect, 3 + _SHAPE_DIMS,
                                                             f"collecting the hidden states to {what}")
            if any(row != table[0] for row in table):
                got = ", ".join(f"{row[0]} classes and per-sample input shape {tuple(row[3:3 + row[1]])}"
                                f" on rank {r}" for r, row in enumerate(table))
                raise ValueError(
                    "loader inputs must have the same per-sample shape, and the model the same "
                    f"number of classes, on every rank of a data-parallel fit; got {got}"
                )
            (counts,) = setting.sum_parts(
                lambda: [torch.bincount(collected.labels, minlength=n_classes)], [(n_classes,)],
                torch.int64, collected.labels.device, "counting the samples of each class")
        labels = collected.labels
        counts = counts.tolist()
        need = self._min_per_class() if what == "fit" else 1
        short = [c for c, n in enumerate(counts) if n < need]
        if short:
            c = short[0]
            raise ValueError(
                f"loader must hold at least {need} sample(s) of every class to {what} the "
                f"detector; got {counts[c]} of class {c}"
                + (f" ({len(short)} classes short)" if len(short) > 1 else "")
            )
        return collected.states, labels, n_classes, collected.input_shape

    @staticmethod
    def _thresholds(scores: Tensor, labels: Tensor, n_classes: int, keep: float) -> Tensor:
        """:func:`class_thresholds`; inside ``data_parallel`` over the scores of every rank
        (one score and one label per sample are gathered: the thresholds are exact
        per-class order statistics)."""
        setting = current_data_parallel()
        if setting is not None:
            scores = setting.gather_rows(scores, "gathering the training scores")
            labels = setting.gather_rows(labels, "gathering the training labels")
        return class_thresholds(scores, labels, n_classes, keep)

    def _true_class_scores(self, states: dict[str, Tensor], labels: Tensor) -> Tensor:
        """``log p(H(x) | y)`` of collected states under their labels, ``(N,)``, no graph."""
        with torch.no_grad():
            log_density = self._layers_log_density(states)  # (N, C)
        return log_density.gather(1, labels.unsqueeze(1)).squeeze(1)  # (N,)

    # -- public API --------------------------------------------------------------------

    def fit(self, loader: Iterable) -> "_DetectorBase":
        """Fit the class-conditional densities and the thresholds on natural training data.

        The whole loader runs through the classifier once, in eval mode and without
        gradients (its modes are restored afterwards). The hidden states of each layer are
        grouped by the TRUE labels; each layer gets one batched fit over all classes
        (layers have different widths D, so one fit per layer rather than one for all).
        The thresholds are then computed on the same training data, as in the paper;
        :meth:`calibrate` recomputes them on held-out data. Nothing is changed if fitting
        fails.

        Parameters
        ----------
        loader : iterable of (x, y)
            A ``DataLoader`` of natural training data: inputs ``(B, ...)`` and integer
            labels ``(B,)`` in ``[0, n_classes)``, where ``n_classes`` is the width of the
            model's output. Every class needs samples.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            For labels outside ``[0, n_classes)``, a class with too few samples, a model
            whose output is not ``(B, n_classes)``, inputs of inconsistent shapes, or an
            unlabelled loader.
        TypeError
            For non-integer labels or batches that are not ``(x, y)`` pairs.
        NotPSDError
            If a covariance is not positive definite (raise ``reg_covar``).

        Notes
        -----
        The hidden states of the whole loader are held on the model's device during the
        fit (``N × Σ_layers D`` values).

        Inside :func:`idefender_gpu.distributed.data_parallel` (under ``torchrun``), the
        loader is this rank's shard (e.g. with a ``DistributedSampler``): each layer's
        mixtures are fitted data-parallel, the thresholds come from the scores of all
        ranks, and every rank ends with the same detector, whatever the number of ranks.
        With ``n_components=1`` it is the single-process detector to round-off; with more
        components the ``'kmeans'`` initialisation seeds from a sample gathered across
        ranks (see :mod:`idefender_gpu.distributed`), so EM may reach another local
        optimum than a single-process fit. Call :meth:`save` inside the same block: rank 0
        writes the file.
        """
        specs = self._validate()
        setting = current_data_parallel()
        if setting is not None and self._density_name not in _DATA_PARALLEL_DENSITIES:
            raise NotImplementedError(
                f"{type(self).__name__}.fit is not data-parallel yet: fit it in one process, "
                "outside idefender_gpu.distributed.data_parallel"
            )
        states, labels, n_classes, input_shape = self._labelled_states(loader, specs, None, "fit")
        first = next(iter(states.values()))
        dtype = resolve_dtype(self.dtype, first)
        options = self._fit_options(dtype, first.device)
        density_cls = DENSITIES[self._density_name]
        states = {spec: H.to(dtype) for spec, H in states.items()}
        # A loop over layers (different D), never over classes: one batched fit per layer.
        # Inside data_parallel each fit is data-parallel over the ranks' hidden states.
        densities = {spec: density_cls.fit(H, labels, n_classes, options) for spec, H in states.items()}
        with setting.guard("scoring its training data") if setting else nullcontext(), torch.no_grad():
            log_density = _sum_log_density(densities, states, self.memory_budget)  # (N, C)
            scores = log_density.gather(1, labels.unsqueeze(1)).squeeze(1)  # (N,)
        thresholds = self._thresholds(scores, labels, n_classes, float(self.keep))
        # Everything succeeded: only now touch the fitted state.
        self._set_fitted(specs, densities, n_classes, input_shape, thresholds, self.keep)
        return self

    def calibrate(self, loader: Iterable, keep: float | None = None) -> "_DetectorBase":
        """Recompute ``thresholds_`` on held-out natural data (true labels).

        Parameters
        ----------
        loader : iterable of (x, y)
            Natural data with true labels; every class needs at least one sample.
        keep : float in (0, 1], optional
            Fraction of each class's data to keep; default ``self.keep``. When given, it
            also becomes ``self.keep``.

        Returns
        -------
        self
        """
        self._check_is_fitted()
        keep = self.keep if keep is None else keep
        _check_real(keep, "keep", 0.0, 1.0, low_open=True)
        states, labels, _, input_shape = self._labelled_states(loader, self._specs, self.n_classes_,
                                                               "calibrate")
        if input_shape != self.input_shape_:
            raise ValueError(
                f"loader inputs must have the per-sample shape {self.input_shape_} the detector was "
                f"fitted on; got {input_shape}"
            )
        setting = current_data_parallel()
        with setting.guard("scoring its calibration data") if setting else nullcontext():
            scores = self._true_class_scores(states, labels)
        self.thresholds_ = self._thresholds(scores, labels, self.n_classes_, float(keep))
        self.keep = self.keep_ = float(keep)
        return self

    def _check_x(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor of shape (B, *{self.input_shape_}); got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.input_shape_ or x.ndim != len(self.input_shape_) + 1:
            expected = ", ".join(["B", *map(str, self.input_shape_)])
            raise ValueError(
                f"x must have shape ({expected}) like the inputs the detector was fitted on; got "
                f"shape {tuple(x.shape)}"
            )
        return x

    def _forward(self, x: Tensor, keep_graph: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits ``(B, n_classes)`` and hidden states of one forward pass in eval mode."""
        model = self.model
        x = _to_model(x, model_device(model), model_dtype(model))
        with eval_mode(model), HiddenStateHooks(model, self._specs, keep_graph=keep_graph) as hooks:
            logits = model(x)
            states = hooks.pop()
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[1] != self.n_classes_:
            got = f"shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(f"model must return logits of shape (B, {self.n_classes_}); got {got}")
        return logits, states

    def _layers_log_density(self, states: dict[str, Tensor]) -> Tensor:
        """Sum over layers of ``log p(h_layer | c)``: ``(B, n_classes)``."""
        first = next(iter(states.values()))
        return _sum_log_density(self._densities_on(first.device), states, self.memory_budget)

    def log_density(self, x: Tensor, classes: Tensor | None = None) -> Tensor:
        """``log p(H(x) | c)``: an ordinary, differentiable function of the input.

        classifier -> hidden states (forward hooks that keep the graph) -> per-class
        densities (the mixture kernels, log-weights and logsumexp). With several layers
        the layers' log-densities are summed (the layers are treated as independent given
        the class). The model runs in eval mode (restored afterwards); gradients follow
        the caller's grad mode.

        Parameters
        ----------
        x : Tensor of shape (B, ...)
            Inputs shaped like the training inputs; moved to the model's device and
            floating dtype (differentiably).
        classes : Tensor of int, shape (B,), optional
            One class per sample.

        Returns
        -------
        log_density : Tensor of shape (B, n_classes), or (B,) with ``classes``
            In the dtype of the fitted densities, on the model's device.

        Raises
        ------
        NotFittedError
            Before :meth:`fit`.
        ValueError
            If ``x`` is not shaped ``(B, *input_shape_)``, or ``classes`` is not ``(B,)``
            in ``[0, n_classes)`` (checking the range is this method's one host
            synchronisation).
        """
        self._check_is_fitted()
        x = self._check_x(x)
        _, states = self._forward(x, keep_graph=True)
        log_density = self._layers_log_density(states)  # (B, C)
        if classes is None:
            return log_density
        if not isinstance(classes, Tensor) or classes.is_floating_point() or classes.is_complex() \
                or classes.dtype == torch.bool:
            raise TypeError(f"classes must be an integer Tensor of shape ({x.shape[0]},); got {classes!r}")
        if tuple(classes.shape) != (x.shape[0],):
            raise ValueError(f"classes must have shape ({x.shape[0]},) to match x; got shape {tuple(classes.shape)}")
        classes = classes.to(device=log_density.device, dtype=torch.int64)
        if bool(((classes < 0) | (classes >= self.n_classes_)).any()):
            raise ValueError(f"classes must be class labels in [0, {self.n_classes_}); got {classes.tolist()}")
        return log_density.gather(1, classes.unsqueeze(1)).squeeze(1)  # (B,)

    def _evaluate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(predicted class, score, class scored under)``, each ``(B,)``, without gradients."""
        self._check_is_fitted()
        x = self._check_x(x)
        with torch.no_grad():
            logits, states = self._forward(x, keep_graph=False)
            log_density = self._layers_log_density(states)  # (B, C)
            scored = self._scoring_class(logits, log_density)  # (B,)
            score = log_density.gather(1, scored.unsqueeze(1)).squeeze(1)  # (B,)
        return logits.argmax(-1), score, scored

    def score(self, x: Tensor) -> Tensor:
        """Detection score: the log-density of the hidden state under the scored class.

        Higher means more natural. Not differentiable (use :meth:`log_density`). For ROC
        metrics with adversarial inputs as positives, use ``-score(x)``.

        Parameters
        ----------
        x : Tensor of shape (B, ...)

        Returns
        -------
        score : Tensor of shape (B,)
        """
        return self._evaluate(x)[1]

    def reject(self, x: Tensor) -> Tensor:
        """Paper Eq. 5: ``score(x) < thresholds_[c]`` for the scored class ``c``.

        Returns
        -------
        rejected : Tensor of bool, shape (B,)
        """
        _, score, scored = self._evaluate(x)
        return score < self.thresholds_.to(score.device)[scored]

    def predict(self, x: Tensor) -> Tensor:
        """The classifier's predicted class, or -1 where the detector rejects the input.

        Returns
        -------
        labels : Tensor of int64, shape (B,)
        """
        predicted, score, scored = self._evaluate(x)
        rejected = score < self.thresholds_.to(score.device)[scored]
        return torch.where(rejected, torch.full_like(predicted, -1), predicted)

    # -- files -------------------------------------------------------------------------

    def save(self, path: Any) -> None:
        """Write the fitted detector to one safetensors file (tensors + JSON config + digest).

        Inside :func:`idefender_gpu.distributed.data_parallel` only rank 0 writes (every
        rank holds the same detector); the other ranks wait for it, and raise if it fails.

        Parameters
        ----------
        path : str or os.PathLike
        """
        self._check_is_fitted()
        dtype = next(iter(self._densities.values())).means.dtype
        config = {
            "format_version": _io.FORMAT_VERSION,
            "detector": type(self).__name__,
            "density": self._density_name,
            "layers": list(self.layers_),
            "n_features": [self.n_features_[spec] for spec in self.layers_],
            "n_classes": self.n_classes_,
            "input_shape": list(self.input_shape_),
            "keep": self.keep_,
            "dtype": str(dtype).replace("torch.", ""),
            "params": self._config(),
        }
        tensors = {"thresholds": self.thresholds_}
        for index, spec in enumerate(self.layers_):
            for name, tensor in self._densities[spec].tensors().items():
                tensors[f"layers.{index}.{name}"] = tensor
        setting = current_data_parallel()
        if setting is None:
            _io.write_detector_file(path, config, tensors)
            return
        with setting.guard("saving the detector"):
            if setting.rank == 0:
                _io.write_detector_file(path, config, tensors)

    @classmethod
    def load(cls, path: Any, model: nn.Module) -> "_DetectorBase":
        """Read a detector written by :meth:`save` and attach it to ``model``.

        Never unpickles: the file is parsed by safetensors, so a crafted file cannot run
        code. The file's digest, its config, every tensor's shape and the model are
        checked; the model runs once on a zero input of the saved input shape to compare
        its layer widths and number of classes with the file's.

        Parameters
        ----------
        path : str or os.PathLike
        model : torch.nn.Module
            The classifier the detector was fitted on (same architecture and weights);
            the fitted tensors are moved to its device.

        Returns
        -------
        detector

        Raises
        ------
        ValueError
            If the file is truncated, tampered with, not a detector, a detector of another
            class, or fitted on a model whose layers differ from ``model``'s.
        """
        config, tensors = _io.read_detector_file(path)
        where = f"{str(path)!r}"
        fields = {"detector": str, "density": str, "layers": list, "n_features": list, "n_classes": int,
                  "input_shape": list, "keep": (int, float), "dtype": str, "params": dict}
        for key, kind in fields.items():
            if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
                raise ValueError(f"{where} is not a valid detector file: config field {key!r} is missing or malformed")
        if config["detector"] != cls.__name__ or config["density"] != cls._density_name:
            raise ValueError(f"{where} holds a {config['detector']}, not a {cls.__name__}; load it with "
                             f"{config['detector']}.load")
        layers, widths = config["layers"], config["n_features"]
        if not layers or len(widths) != len(layers) or config["dtype"] not in _DTYPES \
                or not all(isinstance(v, int) and v > 0 for v in [*widths, *config["input_shape"]]) \
                or config["n_classes"] < 1:
            raise ValueError(f"{where} is not a valid detector file: its config is inconsistent")
        try:
            detector = cls(model, layers, keep=config["keep"], dtype=config["dtype"], **config["params"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} does not fit this model or is malformed: {exc}") from None
        n_classes, input_shape = config["n_classes"], tuple(config["input_shape"])
        specs = parse_layers(model, layers)
        detector._check_model_matches(specs, n_classes, input_shape, widths, where)
        dtype, density_cls = _DTYPES[config["dtype"]], DENSITIES[cls._density_name]
        device = model_device(model)
        densities = {}
        for index, spec in enumerate(specs):
            density = density_cls.from_tensors(
                tensors, n_classes=n_classes, n_features=widths[index], config=detector._config(),
                dtype=dtype, prefix=f"layers.{index}.",
            )
            densities[spec.spec] = density.to(device)
        thresholds = _check_tensor(tensors, "thresholds", (n_classes,), dtype).to(device)
        detector._set_fitted(specs, densities, n_classes, input_shape, thresholds, config["keep"])
        return detector

    def _check_model_matches(self, specs, n_classes: int, input_shape: tuple[int, ...],
                             widths: Sequence[int], where: str) -> None:
        """Run ``model`` on a zero input; compare layer widths and the number of classes."""
        model = self.model
        x = torch.zeros((1, *input_shape), device=model_device(model), dtype=model_dtype(model) or torch.float32)
        try:
            with torch.no_grad(), eval_mode(model), HiddenStateHooks(model, specs) as hooks:
                logits = model(x)
                states = hooks.pop()
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"{where} was fitted on another model: this model fails on an input of the saved "
                f"shape {(1, *input_shape)}: {exc}"
            ) from None
        for spec, width in zip(specs, widths):
            got = states[spec.spec].shape[1]
            if got != width:
                raise ValueError(
                    f"{where} was fitted on another model: layer {spec.spec!r} has width "
                    f"{width} in the file but {got} in this model"
                )
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[1] != n_classes:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"{where} was fitted on another model: it has {n_classes} classes but this model "
                f"returns {got}"
            )

    def __repr__(self) -> str:
        fitted = f", n_classes_={self.n_classes_}" if self._is_fitted() else ""
        return f"{type(self).__name__}(layers={self.layers!r}, keep={self.keep!r}{fitted})"
