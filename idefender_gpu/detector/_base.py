"""The detector machinery shared by :class:`IDefender` and :class:`MahalanobisDetector` (private).

A detector is built on a classifier and the names of some of its layers. ``fit`` runs the
natural training data through the classifier (eval mode, no gradients), fits one
class-conditional density per layer on the hidden states with their true labels, and sets
per-class thresholds (paper Eq. 5). Detectors with one Gaussian per class
(``_streams_fit``) stream instead: one pass merges per-class moments (:mod:`._moments`),
one pass scores for the thresholds, never holding every hidden state. Scoring runs the
classifier once per call: its logits give the predicted class, the hooks give the hidden
states, and the densities give ``log p(H(x) | c)`` through the mixture kernels,
differentiably: under the scored class only for ``score`` / ``reject`` / ``predict`` and
the true class only for the thresholds (unless the scoring rule needs every class:
``_scores_all_classes``), for every class in blocks of classes in ``log_density(x)``.

Jobs are split by module: hyper-parameters are declared in each class's
``_parameter_constraints`` table and checked by :mod:`idefender_gpu._param_validation`;
the hidden states of a loader, in one process or data-parallel, come from
:mod:`._states`; the densities are :mod:`._densities`; the file schema is :mod:`._io`.
Subclasses choose the density, its fitting options, the config that goes into a detector
file, and the class a sample is scored under.
"""

from __future__ import annotations

import logging
import time
from numbers import Integral, Real
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from idefender_gpu._param_validation import InstanceOf, Interval, Predicate, check_param, validate_params
from idefender_gpu._validation import resolve_dtype
from idefender_gpu.detector import _io
from idefender_gpu.detector._densities import DENSITIES, sum_log_density
from idefender_gpu.detector._states import (
    calibration_thresholds,
    streamed_moments,
    streamed_thresholds,
    write_once,
)
from idefender_gpu.detector._streamed import fit_layers, fit_states
from idefender_gpu.exceptions import NotFittedError
from idefender_gpu.features import (
    HiddenStateHooks,
    _to_model,
    eval_mode,
    model_device,
    model_dtype,
    parse_layers,
)
from idefender_gpu.mixture import BatchedGaussianMixture


logger = logging.getLogger("idefender_gpu.detector")
__all__ = ["_DetectorBase"]


def _is_dtype(value: Any) -> bool:
    """Whether ``value`` names a compute dtype (float32 / float64) :func:`resolve_dtype` accepts."""
    return resolve_dtype(value, torch.empty(0)) is not None


class _DetectorBase:
    """Shared fit / calibrate / score / save / load of class-conditional detectors."""

    #: key of :data:`DENSITIES` naming the per-layer density
    _density_name: str = ""
    #: Every constructor parameter and what it accepts (scikit-learn's ``_parameter_constraints``);
    #: subclasses extend it. The layer names are resolved against the model by
    #: :func:`~idefender_gpu.features.parse_layers` (they cannot be declared).
    _parameter_constraints: dict[str, list] = {
        "model": [InstanceOf(nn.Module)],
        "layers": [None, InstanceOf(str), InstanceOf(list, tuple)],
        "keep": [Interval(Real, 0.0, 1.0, closed="right")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "dtype": [None, Predicate(_is_dtype, "one of 'float32', 'float64', torch.float32, torch.float64")],
        "memory_budget": [None, Interval(Integral, 0, None, closed="neither")],
        "storage_device": BatchedGaussianMixture._parameter_constraints["storage_device"],
        "progress": [None, "boolean"],
    }

    def _init(self, params: dict[str, Any]) -> None:
        """``__init__``: store each parameter under its own name (from the subclass's
        ``locals()``), then validate. The detector is bound to its model, so there is
        nothing to clone: an unknown layer or a bad hyper-parameter fails fast, before any
        data is read."""
        for name in self._parameter_constraints:
            setattr(self, name, params[name])
        self._validate()

    # -- validation --------------------------------------------------------------------

    def _validate(self):
        """Check the hyper-parameters (their current values); return the resolved layer specs."""
        owner = type(self).__name__
        validate_params(owner, {name: getattr(self, name) for name in self._parameter_constraints},
                        self._parameter_constraints)
        return parse_layers(self.model, self.layers)

    def _fit_options(self, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Keyword arguments for the density's ``fit``."""
        return {"reg_covar": float(self.reg_covar), "memory_budget": self.memory_budget,
                "dtype": dtype, "device": device}

    def _config(self) -> dict[str, Any]:
        """Subclass hyper-parameters written to (and read back from) a detector file."""
        return {"reg_covar": float(self.reg_covar)}

    def _min_per_class(self) -> int:
        return 1

    def _streams_fit(self) -> bool:
        """Whether :meth:`fit` streams the loader (:meth:`_fit_streamed`) instead of holding
        every hidden state."""
        return False

    def _moment_kinds(self) -> tuple[bool, bool, bool]:
        """``(diagonal, higher, pooled)`` moments the streamed fit accumulates (:mod:`._moments`)."""
        return False, False, False

    def _density_from_moments(self, moments: Any) -> Any:
        """The fitted density of one layer from its merged :class:`~._moments.ClassMoments`."""
        raise NotImplementedError

    def _fit_streamed(self, loader: Iterable, specs) -> None:
        """One pass for the class moments, the densities in closed form, one pass for the
        thresholds (scored under the true classes); sets the fitted state at the end only."""
        diagonal, higher, pooled = self._moment_kinds()
        fitted = streamed_moments(
            self.model, loader, specs, resolve_dtype=lambda h: resolve_dtype(self.dtype, h),
            diagonal=diagonal, higher=higher, pooled=pooled, memory_budget=self.memory_budget,
            min_per_class=self._min_per_class(),
            progress=self.progress, owner=type(self).__name__)
        densities = {}
        for spec in list(fitted.moments):  # each layer's moments freed once its density is made
            densities[spec] = self._density_from_moments(fitted.moments.pop(spec))
        start = time.perf_counter()
        logger.info("fit: thresholds (keep %s of each class) ...", self.keep)
        thresholds = streamed_thresholds(
            self.model, loader, specs,
            lambda states, classes: sum_log_density(densities, states, self.memory_budget, classes),
            fitted, float(self.keep), progress=self.progress)
        logger.info("fit: thresholds done in %.1f s", time.perf_counter() - start)
        self._set_fitted(specs, densities, fitted.n_classes, fitted.input_shape, thresholds, self.keep)

    def _fit_density_stream(self, batches: Any, options: dict[str, Any]) -> Any:
        """The fitted density of one layer from re-iterable ``(H (B, D), labels (B,))`` batches
        (a callable returning a fresh pass), for detectors that fit by EM."""
        raise NotImplementedError

    def _scores_all_classes(self) -> bool:
        """Whether :meth:`_scoring_class` needs the log-density of every class (else it is
        called with ``log_density=None`` and only the scored class is evaluated)."""
        return False

    def _scoring_class(self, logits: Tensor, log_density: Tensor | None) -> Tensor:
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

    def _storage(self) -> tuple[torch.device | None, bool]:
        """``(storage device, pin)``: where the fitted tensors live (None: the model's device,
        moved whole) and whether host storage is pinned (the model is on CUDA)."""
        if self.storage_device is None:
            return None, False
        storage = torch.device(self.storage_device)
        return storage, storage.type == "cpu" and model_device(self.model).type == "cuda"

    def _set_fitted(self, specs, densities, n_classes, input_shape, thresholds, keep) -> None:
        storage, pin = self._storage()
        if storage is not None:  # kept there; scoring moves blocks of classes (no copy if already there)
            densities = {spec: density.stored_on(storage, pin) for spec, density in densities.items()}
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

    @property
    def means_(self) -> dict[str, Tensor]:
        """Per layer, the fitted means with a leading ``n_classes`` axis (shapes: the class docstring)."""
        return self._per_layer("means")

    @property
    def precisions_cholesky_(self) -> dict[str, Tensor]:
        """Per layer, the fitted precision Cholesky factors (shapes: the class docstring)."""
        return self._per_layer("prec_chol")

    def _densities_on(self, device: torch.device) -> dict[str, Any]:
        """The fitted densities for scoring on ``device``: moved once (with ``thresholds_``) if
        the model moved, unless they live on ``storage_device`` (then they stay there and
        score in blocks of classes, :mod:`._densities`)."""
        first = next(iter(self._densities.values()))
        if self.storage_device is not None:
            if self.thresholds_.device != device:
                self.thresholds_ = self.thresholds_.to(device)
            return self._densities
        if first.means.device != device:
            self._densities = {spec: density.to(device) for spec, density in self._densities.items()}
            self.thresholds_ = self.thresholds_.to(device)
        return self._densities

    def _layers_log_density(self, states: dict[str, Tensor], classes: Tensor | None = None) -> Tensor:
        """Sum over layers of ``log p(h_layer | c)``: ``(B, n_classes)``, or under ``classes``
        ``(B,)`` / ``(B, m)`` only (same shape as ``classes``)."""
        first = next(iter(states.values()))
        return sum_log_density(self._densities_on(first.device), states, self.memory_budget, classes)

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
        InvalidParameterError
            (a ``ValueError`` and a ``TypeError``) If a hyper-parameter, set since the
            detector was built, fails the class's ``_parameter_constraints``; raised
            before any data is read.
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
        Detectors with one Gaussian per class (``IDefender(n_components=1)``,
        ``MahalanobisDetector``) stream the loader twice (per-class moments, then the
        thresholds), holding one batch at a time, and the loader must be re-iterable (a
        one-shot iterator raises a ``TypeError``). A fit by EM holds the hidden states
        (``N × Σ_layers D`` values) on the model's device while they fit ``memory_budget``,
        else streams every EM pass from a cache on disk or from the model run again (see
        :class:`~idefender_gpu.IDefender`'s ``cache``).

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
        if self._streams_fit():
            self._fit_streamed(loader, specs)  # sets the fitted state only once it succeeded
            return self
        data = fit_states(self.model, loader, specs,
                          resolve_dtype=lambda h: resolve_dtype(self.dtype, h), memory_budget=self.memory_budget,
                          cache=getattr(self, "cache", None), min_per_class=self._min_per_class(),
                          progress=self.progress, owner=type(self).__name__)
        # One batched fit per layer (different D), in memory or streamed; then the thresholds.
        densities, thresholds = fit_layers(
            data, DENSITIES[self._density_name].fit, self._fit_density_stream, self._fit_options,
            lambda densities, states, classes: sum_log_density(densities, states, self.memory_budget, classes),
            float(self.keep))
        # Everything succeeded: only now touch the fitted state.
        self._set_fitted(specs, densities, data.n_classes, data.input_shape, thresholds, self.keep)
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

        Raises
        ------
        NotFittedError
            Before :meth:`fit`.
        InvalidParameterError
            (a ``ValueError`` and a ``TypeError``) For a ``keep`` outside ``(0, 1]`` or NaN;
            nothing is changed.
        ValueError
            As :meth:`fit` for the loader, or inputs of another per-sample shape than the
            detector was fitted on.

        Notes
        -----
        One pass over ``loader`` (any iterable), scoring each batch under its true classes;
        only a score and a label per sample are kept, never the hidden states.
        """
        self._check_is_fitted()
        keep = self.keep if keep is None else keep
        check_param(keep, "keep", self._parameter_constraints["keep"], f"{type(self).__name__}.calibrate")
        # one pass, batch by batch: only a score and a label per sample are kept
        self.thresholds_ = calibration_thresholds(
            self.model, loader, self._specs, self._layers_log_density, n_classes=self.n_classes_,
            input_shape=self.input_shape_, keep=float(keep), progress=self.progress)
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
        classes : Tensor of int, shape (B,) or (B, m), optional
            One class per sample, or ``m`` classes per sample: only those classes'
            densities are evaluated (their parameters gathered per class segment of the
            batch), the same numbers as the matching entries of the all-class result.

        Returns
        -------
        log_density : Tensor of shape (B, n_classes), or shaped like ``classes``
            In the dtype of the fitted densities, on the model's device. All classes are
            evaluated in blocks of classes (bounded memory).

        Raises
        ------
        NotFittedError
            Before :meth:`fit`.
        ValueError
            If ``x`` is not shaped ``(B, *input_shape_)``, or ``classes`` is not ``(B,)`` or
            ``(B, m)`` in ``[0, n_classes)`` (checking the range is a host synchronisation).
        """
        self._check_is_fitted()
        x = self._check_x(x)
        if classes is not None:
            classes = self._check_classes(classes, x.shape[0])
        _, states = self._forward(x, keep_graph=True)
        if classes is not None:
            classes = classes.to(device=next(iter(states.values())).device)
        return self._layers_log_density(states, classes)

    def _check_classes(self, classes: Any, n_samples: int) -> Tensor:
        """``classes`` as int64 ``(B,)`` or ``(B, m)`` in ``[0, n_classes)``."""
        if not isinstance(classes, Tensor) or classes.is_floating_point() or classes.is_complex() \
                or classes.dtype == torch.bool:
            raise TypeError(f"classes must be an integer Tensor of shape ({n_samples},) or ({n_samples}, m); "
                            f"got {classes!r}")
        if classes.ndim not in (1, 2) or classes.shape[0] != n_samples:
            raise ValueError(f"classes must have shape ({n_samples},) or ({n_samples}, m) to match x; got "
                             f"shape {tuple(classes.shape)}")
        classes = classes.to(dtype=torch.int64)
        if classes.numel() and bool(((classes < 0) | (classes >= self.n_classes_)).any()):
            raise ValueError(f"classes must be class labels in [0, {self.n_classes_}); got {classes.tolist()}")
        return classes

    def _evaluate(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(predicted class, score, class scored under)``, each ``(B,)``, without gradients.

        Only the scored class's density is evaluated, unless the scoring class itself
        needs every class (:meth:`_scores_all_classes`).
        """
        self._check_is_fitted()
        x = self._check_x(x)
        with torch.no_grad():
            logits, states = self._forward(x, keep_graph=False)
            if self._scores_all_classes():
                log_density = self._layers_log_density(states)  # (B, C)
                scored = self._scoring_class(logits, log_density)  # (B,)
                score = log_density.gather(1, scored.unsqueeze(1)).squeeze(1)  # (B,)
            else:
                scored = self._scoring_class(logits, None)  # (B,)
                score = self._layers_log_density(states, scored)  # (B,)
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

        Notes
        -----
        The tensors are written block by block (blocks of classes) from where they live
        (the model's device or ``storage_device``), and the digest is computed from the
        same blocks: the file is never assembled in memory, so saving needs one block of
        host memory beyond the detector itself (:mod:`idefender_gpu._files`).
        ``storage_device`` is not written: it belongs to the machine, and :meth:`load`
        takes its own.
        """
        self._check_is_fitted()
        header = _io.DetectorHeader(
            detector=type(self).__name__, density=self._density_name, layers=self.layers_,
            n_features=tuple(self.n_features_[spec] for spec in self.layers_), n_classes=self.n_classes_,
            input_shape=self.input_shape_, keep=self.keep_,
            dtype=next(iter(self._densities.values())).means.dtype, params=self._config(),
        )
        config, tensors = _io.detector_record(header, self.thresholds_,
                                              [self._densities[spec].tensors() for spec in self.layers_])
        write_once(lambda: _io.write_detector_file(path, config, tensors), "saving the detector")

    @classmethod
    def load(cls, path: Any, model: nn.Module, *, storage_device: Any = None,
             mmap: bool = False) -> "_DetectorBase":
        """Read a detector written by :meth:`save` and attach it to ``model``.

        Never unpickles: the file is parsed by safetensors, so a crafted file cannot run
        code. The file's digest, its config, every tensor's shape and the model are
        checked; the model runs once on a zero input of the saved input shape to compare
        its layer widths and number of classes with the file's.

        Parameters
        ----------
        path : str or os.PathLike
        model : torch.nn.Module
            The classifier the detector was fitted on (same architecture and weights).
        storage_device : str or torch.device, optional
            Where the fitted tensors are kept, as the constructor's ``storage_device``
            (host memory is pinned when ``model`` is on CUDA). Default: ``model``'s device.
        mmap : bool, default=False
            Keep the fitted tensors as views of a memory map of the file instead of
            copies: the operating system pages them in as classes are scored. The storage
            must then be the CPU (``storage_device='cpu'``, or a CPU model), and the file
            must stay in place, unmodified, while the detector lives (saving another
            detector over it is safe: files are replaced by a rename).

        Returns
        -------
        detector

        Raises
        ------
        ValueError
            If the file is truncated, tampered with, not a detector, a detector of another
            class, or fitted on a model whose layers differ from ``model``'s
            (``FileNotFoundError`` for a missing file, ``TypeError`` for a ``path`` that is
            not a str or ``os.PathLike``); for ``mmap=True`` with a storage that is not the
            CPU. ``InvalidParameterError`` for a ``storage_device`` that is not a device.

        Notes
        -----
        Each tensor is read straight from the file into its place (the storage device, a
        CUDA device through one pinned block, or pinned host memory) and hashed on the
        way: loading holds one copy of the parameters, never the file's bytes beside them.
        """
        where = f"{str(path)!r}"
        check_param(storage_device, "storage_device", cls._parameter_constraints["storage_device"],
                    f"{cls.__name__}.load")
        check_param(mmap, "mmap", ["boolean"], f"{cls.__name__}.load")
        device = model_device(model)
        config, tensors = _io.read_detector_for(path, device, storage_device, mmap)
        header, thresholds = _io.parse_detector_record(config, tensors, detector=cls.__name__,
                                                       density=cls._density_name, where=where)
        try:
            detector = cls(model, list(header.layers), keep=header.keep, dtype=config["dtype"],
                           storage_device=storage_device, **header.params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where} does not fit this model or is malformed: {exc}") from None
        specs = parse_layers(model, detector.layers)
        _io.check_model_matches(model, specs, header.n_classes, header.input_shape, header.n_features, where)
        density_cls = DENSITIES[cls._density_name]
        densities = {}
        for index, spec in enumerate(specs):
            density = density_cls.from_tensors(
                tensors, n_classes=header.n_classes, n_features=header.n_features[index],
                config=detector._config(), dtype=header.dtype, prefix=_io.layer_prefix(index),
            )
            densities[spec.spec] = density if storage_device is not None else density.to(device)
        detector._set_fitted(specs, densities, header.n_classes, header.input_shape, thresholds.to(device),
                             header.keep)
        return detector

    def __repr__(self) -> str:
        fitted = f", n_classes_={self.n_classes_}" if self._is_fitted() else ""
        return f"{type(self).__name__}(layers={self.layers!r}, keep={self.keep!r}{fitted})"
