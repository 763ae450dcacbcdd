"""I-defender: one Gaussian mixture per class on a classifier's hidden states (Zheng & Hong)."""

from __future__ import annotations

import os
from numbers import Integral
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from idefender_gpu._param_validation import InstanceOf, Interval, Options
from idefender_gpu.detector._base import _DetectorBase
from idefender_gpu.detector._densities import ClassMixtures
from idefender_gpu.detector._moments import COVARIANCE_ESTIMATORS, gaussian_parameters
from idefender_gpu.mixture import BatchedGaussianMixture

__all__ = ["IDefender"]

#: ``init_params`` of :class:`~idefender_gpu.mixture.BatchedGaussianMixture` (scikit-learn's four)
INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")


class IDefender(_DetectorBase):
    r"""I-defender: reject inputs whose hidden state is unlikely under its class.

    Zheng & Hong, *Robust Detection of Adversarial Attacks by Modeling the Intrinsic
    Properties of Deep Neural Networks* (NeurIPS 2018), Section 3. For each class ``c``
    the distribution of the classifier's hidden states on natural data of that class
    (the intrinsic hidden state distribution) is modelled by a Gaussian mixture (Eq. 4)

    .. math::
        p(\mathcal H(x) \mid c) = \sum_{k=1}^K w_{ck}\,\mathcal N(\mathcal H(x) \mid \mu_{ck}, \Sigma_{ck}),

    and an input the classifier assigns to class ``c`` is rejected when
    ``log p(H(x) | c) < TH_c`` (Eq. 5).

    Parameters
    ----------
    model : torch.nn.Module
        The classifier; it must return logits of shape ``(B, n_classes)``. The detector
        never modifies it: hooks are attached only for the duration of each call, and its
        train/eval modes are restored afterwards.
    layers : str or sequence of str, optional
        Hidden states to model, as :func:`idefender_gpu.features.parse_layers` specs:
        ``"name"`` (a module's output) or ``"name:input"`` (its first input). Default: the
        input of the last ``nn.Linear`` (the last fully connected hidden state), since
        the paper models fully connected hidden states only. With several layers, their
        log-densities are summed: the layers are treated as independent given the class.
    n_components : int, default=1
        Mixture components per class (K).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
        As in :class:`idefender_gpu.mixture.GaussianMixture` ('tied': one covariance per
        class shared by that class's components).
    covariance_estimator : {'empirical', 'ledoit-wolf', 'oas'}, default='empirical'
        How each class's covariance is estimated, with ``n_components=1`` only:
        'empirical' is the maximum-likelihood (sample) covariance; 'ledoit-wolf' and 'oas'
        shrink it towards ``tr(Σ)/D · I`` by scikit-learn's closed-form shrinkage
        (``sklearn.covariance.LedoitWolf`` / ``OAS``, per class, not assuming centred data),
        for classes with few samples for their width (the sample covariance of ``n < D``
        samples is singular). Only with ``covariance_type`` 'full' or 'tied' (the same for
        one component). ``reg_covar`` is added to the diagonal after shrinkage. Cost: the
        same pass as the empirical fit ('ledoit-wolf' also accumulates one D-vector and one
        scalar per class, for the fourth moment).
    keep : float in (0, 1], default=0.95
        Fraction of each class's natural data the thresholds keep: 0.95 for ID-95, 0.99
        for ID-99.
    reg_covar : float, default=1e-4
        Added to every covariance diagonal. Larger than scikit-learn's 1e-6 because hidden
        states of ReLU networks often have dead units (zero variance) and are fitted in
        float32.
    tol, max_iter, n_init, init_params, random_state
        EM settings, as in :class:`idefender_gpu.mixture.BatchedGaussianMixture`
        (``tol=1e-3``, ``max_iter=100``, ``n_init=1``, ``init_params='kmeans'``).
    dtype : {None, 'float32', 'float64'} or torch dtype, default=None
        Dtype of the mixtures. Default: the hidden states' float32/float64 (else float32).
        Hidden states are cast to it when scoring.
    memory_budget : int, optional
        Bytes allowed for the intermediates of one chunk of samples in the kernels, and
        for the parameters of one block of classes moved or computed at a time.
    storage_device : str or torch.device, optional
        Where the fitted parameters live (e.g. ``"cpu"`` beside a model on ``"cuda"``:
        1000 classes x 4096^2 floats is 67 GB per component), in pinned host memory when
        it is the CPU and the model is on CUDA. Scoring (``score``, ``reject``,
        ``predict``, ``log_density``, the thresholds, ``calibrate``) then moves only the
        parameters of the classes a batch needs to the model's device, in blocks of
        classes under ``memory_budget``; ``log_density(x)`` streams every class in blocks.
        The one-component fit writes its closed-form parameters there block by block.
        Cost: each scoring call copies the ``K D^2`` values of every class it needs over
        the host-device link (67 MB per class at D = 4096 in float32: about 3 ms over
        PCIe 4 x16), so it pays off only when the parameters do not fit the device.
        Default: the model's device (everything moved there, once).
    progress : bool, optional
        tqdm progress bar over the loader in :meth:`fit` / :meth:`calibrate`. Default:
        shown when stderr is a terminal.
    cache : str or os.PathLike, optional
        A folder for the hidden-state cache of a fit with ``n_components > 1`` whose
        hidden states do not fit ``memory_budget`` (see Notes). Default: no cache (the
        model runs on the loader again for every EM pass). Not used with
        ``n_components=1``, which streams in two passes.

    Raises
    ------
    InvalidParameterError
        (a ``ValueError`` and a ``TypeError``) For a hyper-parameter outside what the
        class's ``_parameter_constraints`` table declares (NaN and infinity never pass a
        real one); ``ValueError`` for a layer name the model does not have.

    Attributes
    ----------
    model : torch.nn.Module
        The classifier.
    layers_ : tuple of str
        Canonical layer specs, in the order given.
    n_features_ : dict of str to int
        Width D of each layer's hidden state.
    n_classes_ : int
        Width of the model's output.
    input_shape_ : tuple of int
        Per-sample input shape the detector was fitted on.
    thresholds_ : Tensor of shape (n_classes,)
        Per-class thresholds on the log-density (paper Eq. 5), on the model's device.
    keep_ : float
        The ``keep`` the current thresholds were computed with.
    weights_, means_, precisions_cholesky_ : dict of str to Tensor
        Per layer, the class mixtures' parameters with a leading ``n_classes`` axis:
        ``(n_classes, K)``, ``(n_classes, K, D)`` and the precision Cholesky factors as in
        :class:`~idefender_gpu.mixture.BatchedGaussianMixture`.

    Notes
    -----
    With ``n_components=1``, :meth:`fit` streams: one pass over the loader merges per-class
    counts, means and centred scatters batch by batch (Chan et al.'s pairwise update), the
    Gaussians follow in closed form, and a second pass scores the training data under
    their true classes for the thresholds; no more than one batch of hidden states is
    held, so the loader must be re-iterable (a list or a ``DataLoader``). With more
    components, :meth:`fit` runs the loader once, groups the hidden states by their true
    labels and fits all classes' mixtures of a layer in one batched EM pass
    (:class:`~idefender_gpu.mixture.BatchedGaussianMixture`, G = n_classes); layers have
    different widths, so each layer gets its own batched fit. It holds the hidden states
    (``N x D`` values per layer, in the compute dtype) only while they fit
    ``memory_budget`` bytes (summed over the layers; None: a quarter of the device's
    memory, the host's on CPU). Past it, every EM pass streams the states through
    :meth:`BatchedGaussianMixture.fit_stream
    <idefender_gpu.mixture.BatchedGaussianMixture.fit_stream>` (groups = classes; its
    initialisation, from a sample of each class, is not the in-memory fit's):

    * with ``cache=DIR``, from safetensors shards written by the first pass (``N x D x
      itemsize`` bytes of disk per layer, plus 8 bytes per sample for the labels) with a
      JSON manifest naming the model (a SHA-256 of its ``state_dict``), the layers, the
      dtype, the input shape, the samples and each shard's SHA-256; later passes
      memory-map the shards. A later fit on the same folder reuses a complete cache
      without running the model (it cannot check the data themselves: use one folder per
      loader); a cache of another model, layer set or dtype, or with a corrupted shard, is
      refused with a ``ValueError``; an interrupted first pass is resumed (the batches
      already written are read again but not run through the model, and must match).
    * without a cache, by running the model again on the loader: one forward of the whole
      loader per EM iteration and per layer (plus the initialisation's passes: one for the
      seeding sample and the k-means passes of ``init_params='kmeans'``, and one for the
      thresholds). The loader must be re-iterable and yield the same batches in the same
      order on every pass (checked by their sizes and labels).

    Inside :func:`~idefender_gpu.distributed.data_parallel` each rank streams its own shard
    (its cache in the subfolder ``rank-R-of-W`` of ``DIR``).
    :meth:`log_density` is an ordinary autograd function of the input, the function
    attacks differentiate: it calls :func:`idefender_gpu.kernels.log_gaussian_prob`, adds
    the log-weights and reduces with logsumexp. ``log_density(x)`` evaluates every class
    (``(B, n_classes)``, in blocks of classes); :meth:`score`, :meth:`reject` and
    :meth:`predict` only the predicted class.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from idefender_gpu import IDefender
    >>> g = torch.Generator().manual_seed(0)
    >>> y = torch.arange(300) % 3
    >>> x = torch.randn(300, 4, generator=g) + 3 * nn.functional.one_hot(y, 4)
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> detector = IDefender(model, n_components=1, random_state=0)
    >>> detector = detector.fit(DataLoader(TensorDataset(x, y), batch_size=100))
    >>> detector.layers_, detector.thresholds_.shape
    (('2:input',), torch.Size([3]))
    >>> detector.log_density(x[:5]).shape, detector.predict(x[:5]).shape
    (torch.Size([5, 3]), torch.Size([5]))
    """

    _density_name = "class_mixtures"
    _parameter_constraints: dict[str, list] = {
        **_DetectorBase._parameter_constraints,
        # the mixture's own constraints (one source of truth), but at least one EM iteration
        **{name: BatchedGaussianMixture._parameter_constraints[name]
           for name in ("n_components", "covariance_type", "tol", "n_init", "init_params",
                        "random_state")},
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "covariance_estimator": [Options(str, set(COVARIANCE_ESTIMATORS))],
        "cache": [None, InstanceOf(str, os.PathLike)],
    }

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str] | None = None,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        covariance_estimator: str = "empirical",
        keep: float = 0.95,
        reg_covar: float = 1e-4,
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        random_state: Any = None,
        dtype: Any = None,
        memory_budget: int | None = None,
        storage_device: Any = None,
        progress: bool | None = None,
        cache: str | os.PathLike | None = None,
    ) -> None:
        self._init(locals())

    def _validate(self):
        specs = super()._validate()
        if self.covariance_estimator != "empirical":
            if self.n_components != 1:
                raise ValueError(
                    f"covariance_estimator={self.covariance_estimator!r} needs n_components=1 (a "
                    f"closed-form shrinkage of one Gaussian per class); got n_components={self.n_components}"
                )
            if self.covariance_type not in ("full", "tied"):
                raise ValueError(
                    f"covariance_estimator={self.covariance_estimator!r} needs covariance_type 'full' or "
                    f"'tied' (it shrinks a full covariance); got covariance_type={self.covariance_type!r}"
                )
        return specs

    def _min_per_class(self) -> int:
        return max(2, self.n_components)

    def _streams_fit(self) -> bool:
        return self.n_components == 1

    def _moment_kinds(self) -> tuple[bool, bool, bool]:
        return self.covariance_type in ("diag", "spherical"), self.covariance_estimator == "ledoit-wolf", False

    def _fit_density_stream(self, batches, options: dict[str, Any]) -> ClassMixtures:
        mixture = BatchedGaussianMixture(**options).fit_stream(batches)
        return ClassMixtures(mixture.weights_, mixture.means_, mixture.precisions_cholesky_,
                             options["covariance_type"])

    def _density_from_moments(self, moments) -> ClassMixtures:
        # The factors are made in blocks of classes; with a storage device each block is
        # written there (pinned beside CUDA), else over the spent scatter (no second buffer).
        storage, pin = self._storage()
        out = None
        if storage is not None and self.covariance_type in ("full", "tied"):
            C, D = moments.means.shape
            shape = (C, 1, D, D) if self.covariance_type == "full" else (C, D, D)
            out = torch.empty(shape, dtype=moments.means.dtype, device=storage, pin_memory=pin)
        params = gaussian_parameters(moments, self.covariance_type, float(self.reg_covar),
                                     self.covariance_estimator, out=out, memory_budget=self.memory_budget)
        density = ClassMixtures(*params, self.covariance_type)
        return density if storage is None else density.stored_on(storage, pin)

    def _fit_options(self, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "covariance_type": self.covariance_type,
            "tol": self.tol,
            "reg_covar": float(self.reg_covar),
            "max_iter": self.max_iter,
            "n_init": self.n_init,
            "init_params": self.init_params,
            "random_state": self.random_state,
            "dtype": dtype,
            "device": device,
            "memory_budget": self.memory_budget,
        }

    def _config(self) -> dict[str, Any]:
        seed = self.random_state
        seed = int(seed) if isinstance(seed, (Integral, np.integer)) and not isinstance(seed, bool) else None
        return {
            "n_components": int(self.n_components),
            "covariance_type": self.covariance_type,
            "covariance_estimator": self.covariance_estimator,
            "reg_covar": float(self.reg_covar),
            "tol": float(self.tol),
            "max_iter": int(self.max_iter),
            "n_init": int(self.n_init),
            "init_params": self.init_params,
            "random_state": seed,
        }

    @property
    def weights_(self) -> dict[str, Tensor]:
        """Per layer, the mixture weights ``(n_classes, K)``."""
        return self._per_layer("weights")
