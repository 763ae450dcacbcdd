"""Class-conditional densities of one layer's hidden states (private).

Each density holds the fitted tensors of one layer and evaluates ``log p(h | class)`` for
every class with :func:`idefender_gpu.kernels.log_gaussian_prob` (the same kernel the EM
uses: no second copy of the math), differentiably with respect to ``h``:

* :class:`ClassMixtures` (I-defender): one Gaussian mixture per class, the groups ``G`` of
  the kernel being the classes; ``log p(h | c) = logsumexp_k(log w_ck + log N(h | μ_ck, Σ_ck))``.
* :class:`SharedCovarianceGaussians` (Mahalanobis baseline): one Gaussian per class with a
  covariance shared by all classes, evaluated as a single group whose ``K`` components are
  the classes with the kernel's ``'tied'`` covariance; ``log p(h | c) = log N(h | μ_c, Σ)``.

Both expose ``fit(H, labels, n_classes, options)``, ``log_prob(h) -> (B, n_classes)``
(every class, in blocks of classes: bounded memory), ``log_prob_classes(h, classes)``
(one or several given classes per sample: only their parameters are read),
``tensors()`` / ``from_tensors()`` for the file format (with shape checks), ``to(device)``
and ``data_parallel`` (whether ``fit`` works inside ``data_parallel``).
:func:`sum_log_density` sums the layers' log-densities.

Scoring under given classes (:func:`class_tiles`): the ``P`` (sample, class) pairs are
sorted by class and cut into tiles of ``m = ceil(P / n_present)`` rows that each hold
pairs of ONE class (zero rows pad a class's last tile). The tiles are the groups of one
batched kernel call, each with its class's parameters gathered: no Python loop over
samples or classes, at most ``P + n_present (m - 1) < 2P`` rows and at most
``2 n_present`` gathered parameter sets, whatever the class balance of the batch. Tiles
are processed in blocks that keep the gathered parameters under the memory budget.

Storage device: the fitted tensors may live on another device than the hidden states
(``storage_device``: host memory, pinned when the states are on CUDA, or a memory map).
A density marked ``stored`` (:meth:`ClassMixtures.stored_on`) never moves whole: each block
of classes (``log_prob``), or the distinct classes of each block of tiles
(``log_prob_classes``), is gathered where the tensors live and copied to the states' device
(:func:`fetch`; from pinned memory through a pinned block, asynchronously), so the
compute device holds one block of parameters at a time. The numbers are those of the
unmoved density; gradients flow to ``h`` as before (the parameters are constants).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu.detector._io import file_tensor
from idefender_gpu.mixture import BatchedGaussianMixture

_LOG_2PI = math.log(2 * math.pi)

__all__ = ["ClassMixtures", "ClassTiles", "DENSITIES", "SharedCovarianceGaussians", "class_tiles", "fetch",
           "store", "sum_log_density"]


def sum_log_density(densities: dict[str, Any], states: dict[str, Tensor],
                    memory_budget: int | None, classes: Tensor | None = None) -> Tensor:
    """``Σ_layers log p(h_layer | c)`` (layers independent given the class).

    ``(B, n_classes)`` for every class, or, with ``classes`` ``(B,)`` / ``(B, m)`` (int64,
    in range), ``(B,)`` / ``(B, m)`` under those classes only. Each layer's states
    ``(B, D)`` are cast to its density's dtype (differentiably).
    """
    total = None
    tiles = None
    for spec, density in densities.items():
        h = states[spec]
        if h.dtype != density.means.dtype:
            h = h.to(density.means.dtype)
        if classes is None:
            log_prob = density.log_prob(h, memory_budget)  # (B, C)
        else:
            if tiles is None:  # one layout for every layer
                tiles = class_tiles(classes, density.means.shape[0])
            log_prob = density.log_prob_classes(h, tiles, memory_budget)  # (B,) or (B, m)
        total = log_prob if total is None else total + log_prob
    return total


def fetch(tensor: Tensor, index: slice | Tensor, device: torch.device) -> Tensor:
    """``tensor[index]`` on ``device``, indexed where ``tensor`` lives (only the rows asked
    for move). From pinned host memory to CUDA the rows go through a pinned block,
    asynchronously (PyTorch's pinned-memory cache keeps the block until the copy is done)."""
    if isinstance(index, Tensor):
        index = index.to(tensor.device)
    if tensor.device == device:
        return tensor[index]
    if device.type == "cuda" and tensor.device.type == "cpu" and tensor.is_pinned():
        if isinstance(index, slice):
            part = tensor[index]  # a view of pinned memory
        else:
            part = torch.empty((index.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=True)
            torch.index_select(tensor, 0, index, out=part)
        return part.to(device, non_blocking=True)
    return tensor[index].to(device)


def _row_step(tensor: Tensor, block_bytes: int = 64 * 2**20) -> int:
    return max(1, block_bytes // max(1, tensor[:1].numel() * tensor.element_size()))


def store(tensor: Tensor, device: torch.device, pin: bool) -> Tensor:
    """``tensor`` on the storage ``device`` (host memory pinned when ``pin``), copied in
    blocks of rows into one destination (never a second full copy on the host)."""
    if tensor.device == device and (not pin or tensor.is_pinned()):
        return tensor
    if not pin:
        return tensor.to(device)
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    if tensor.ndim == 0:
        return out.copy_(tensor)
    step = _row_step(tensor)
    for start in range(0, tensor.shape[0], step):
        out[start:start + step].copy_(tensor[start:start + step])
    return out


def _budget(memory_budget: int | None, device: torch.device) -> int:
    return kernels.default_memory_budget(device) if memory_budget is None else int(memory_budget)


@dataclass(frozen=True)
class ClassTiles:
    """The layout of (sample, class) pairs in single-class tiles (see the module docstring).

    Attributes
    ----------
    shape : tuple of int
        ``classes.shape``: ``(B,)`` or ``(B, m)``; the result is reshaped to it.
    sample : Tensor of int64, shape (P,)
        The sample of each pair (``P = classes.numel()``, row-major order).
    position : Tensor of int64, shape (P,)
        Each pair's row in the flattened ``(T * rows, ...)`` tiles.
    tile_class : Tensor of int64, shape (T,)
        The class of each tile.
    rows : int
        Rows per tile.
    """

    shape: tuple[int, ...]
    sample: Tensor
    position: Tensor
    tile_class: Tensor
    rows: int

    @property
    def n_tiles(self) -> int:
        return int(self.tile_class.shape[0])

    def layout(self, h: Tensor) -> Tensor:
        """``h (B, D)`` -> ``(T, rows, D)`` tiles, zero padding (differentiable)."""
        D = h.shape[-1]
        flat = h.new_zeros(self.n_tiles * self.rows, D)
        flat = flat.index_copy(0, self.position, h[self.sample])  # out of place: autograd-safe
        return flat.view(self.n_tiles, self.rows, D)

    def unlayout(self, values: Tensor) -> Tensor:
        """``(T, rows)`` per-row values -> the pairs' values, shaped like ``classes``."""
        return values.reshape(-1)[self.position].reshape(self.shape)


def class_tiles(classes: Tensor, n_classes: int) -> ClassTiles:
    """Lay the (sample, class) pairs of ``classes`` ``(B,)`` or ``(B, m)`` out in tiles.

    One host synchronisation (the number of tiles). ``classes`` must be int64 in
    ``[0, n_classes)``.
    """
    shape = tuple(classes.shape)
    flat = classes.reshape(-1)
    device = flat.device
    P = flat.shape[0]
    per = 1 if len(shape) == 1 else shape[1]
    sample = torch.arange(P, device=device) // max(1, per)
    counts = torch.bincount(flat, minlength=n_classes)  # (C,)
    n_present = max(1, int((counts > 0).sum()))
    rows = max(1, -(-P // n_present))
    tiles = (counts + rows - 1) // rows  # (C,)
    tile_start = torch.cumsum(tiles, 0) - tiles  # (C,)
    offsets = torch.cumsum(counts, 0) - counts  # (C,)
    order = torch.argsort(flat, stable=True)  # (P,) pairs by class
    sorted_class = flat[order]
    rank = torch.arange(P, device=device) - offsets[sorted_class]  # rank of the pair in its class
    position = torch.empty_like(order)
    position[order] = (tile_start[sorted_class] + rank // rows) * rows + rank % rows
    tile_class = torch.repeat_interleave(torch.arange(n_classes, device=device), tiles)  # (T,)
    return ClassTiles(shape, sample, position, tile_class, rows)


def _tile_blocks(n_tiles: int, bytes_per_tile: int, memory_budget: int | None,
                 device: torch.device) -> list[slice]:
    """Blocks of tiles whose gathered parameters and intermediates fit the budget."""
    per_block = max(1, _budget(memory_budget, device) // max(1, bytes_per_tile))
    return [slice(start, min(start + per_block, n_tiles)) for start in range(0, n_tiles, per_block)]


def _class_blocks(n_classes: int, bytes_per_class: int, memory_budget: int | None,
                  device: torch.device) -> list[slice]:
    """Blocks of classes whose parameters (as the kernel lays them out) fit the budget."""
    per_block = max(1, _budget(memory_budget, device) // max(1, bytes_per_class))
    return [slice(start, min(start + per_block, n_classes)) for start in range(0, n_classes, per_block)]


@dataclass(frozen=True)
class ClassMixtures:
    """One Gaussian mixture per class for one layer.

    Attributes
    ----------
    weights : Tensor of shape (n_classes, K)
    means : Tensor of shape (n_classes, K, D)
    prec_chol : Tensor
        ``precisions_cholesky_`` of the classes' mixtures, with leading ``n_classes``.
    covariance_type : str
    stored : bool
        The tensors stay where they are (a storage device) and blocks of classes move to
        the states' device when scoring (see the module docstring), even when both devices
        are the same.
    """

    weights: Tensor
    means: Tensor
    prec_chol: Tensor
    covariance_type: str
    stored: bool = False
    #: the fit is a BatchedGaussianMixture fit, data-parallel inside ``data_parallel``
    data_parallel: ClassVar[bool] = True

    @classmethod
    def fit(cls, H: Tensor, labels: Tensor, n_classes: int, options: dict[str, Any]) -> "ClassMixtures":
        """All classes' mixtures in one batched EM pass: ``H (N, D)``, ``labels (N,)``."""
        # G = max(label) + 1 = n_classes: the caller checked that every class has samples.
        mixture = BatchedGaussianMixture(**options).fit(H, labels)
        return cls(mixture.weights_, mixture.means_, mixture.precisions_cholesky_, options["covariance_type"])

    def stored_on(self, device: torch.device, pin: bool = False) -> "ClassMixtures":
        """This density with its tensors kept on the storage ``device`` (see ``stored``)."""
        return ClassMixtures(store(self.weights, device, pin), store(self.means, device, pin),
                             store(self.prec_chol, device, pin), self.covariance_type, stored=True)

    def _moves(self, device: torch.device) -> bool:
        """Whether scoring on ``device`` gathers blocks (a storage device) rather than
        indexing the tensors in place."""
        return self.stored or self.means.device != device

    def _take(self, index: slice | Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(weights, means, prec_chol)`` of the classes ``index`` on ``device``."""
        return (fetch(self.weights, index, device), fetch(self.means, index, device),
                fetch(self.prec_chol, index, device))

    def _param_bytes(self) -> int:
        """Bytes of one class's parameters."""
        C = self.means.shape[0]
        return (self.means[:1].numel() + self.prec_chol.numel() // C + self.weights.shape[1]) \
            * self.means.element_size()

    def _block_log_prob(self, h: Tensor, block: slice, memory_budget: int | None) -> Tensor:
        """``log p(h | c)`` for the classes of ``block``: ``(B, block size)``."""
        weights, means, prec_chol = self._take(block, h.device)
        log_prob = kernels.log_gaussian_prob(h, means, prec_chol, self.covariance_type,
                                             memory_budget=memory_budget)  # (Cb, B, K)
        log_prob = log_prob + weights.log().unsqueeze(-2)  # (Cb, B, K)
        return torch.logsumexp(log_prob, dim=-1).mT  # (B, Cb)

    def log_prob(self, h: Tensor, memory_budget: int | None = None) -> Tensor:
        """``log p(h | c)`` for every class: ``h (B, D)`` -> ``(B, n_classes)``.

        In blocks of classes whose parameters fit ``memory_budget`` (one block when all do);
        a stored density moves one block at a time to ``h``'s device.
        """
        blocks = _class_blocks(self.means.shape[0], self._param_bytes(), memory_budget, h.device)
        if len(blocks) == 1 and not self._moves(h.device):
            return self._block_log_prob(h, slice(None), memory_budget)
        return torch.cat([self._block_log_prob(h, block, memory_budget) for block in blocks], dim=1)

    def log_prob_classes(self, h: Tensor, tiles: ClassTiles, memory_budget: int | None = None) -> Tensor:
        """``log p(h_b | c)`` under the classes of ``tiles`` only (:func:`class_tiles`)."""
        X = tiles.layout(h)  # (T, rows, D)
        K, D = self.means.shape[1:]
        moves = self._moves(h.device)
        # moving: the distinct classes' parameters, then their copies laid out per tile
        tile_bytes = (2 if moves else 1) * self._param_bytes() + 2 * tiles.rows * K * D * h.element_size()
        out = []
        for block in _tile_blocks(tiles.n_tiles, tile_bytes, memory_budget, h.device):
            cls = tiles.tile_class[block]  # (Tb,)
            if moves:  # the distinct classes move once, then are laid out per tile on the device
                present, inverse = torch.unique(cls, return_inverse=True)  # (U,), (Tb,)
                weights, means, prec_chol = (t[inverse] for t in self._take(present, h.device))
            else:
                weights, means, prec_chol = self.weights[cls], self.means[cls], self.prec_chol[cls]
            log_prob = kernels.log_gaussian_prob(X[block], means, prec_chol,
                                                 self.covariance_type, memory_budget=memory_budget)  # (Tb, rows, K)
            log_prob = log_prob + weights.log().unsqueeze(-2)
            out.append(torch.logsumexp(log_prob, dim=-1))  # (Tb, rows)
        return tiles.unlayout(out[0] if len(out) == 1 else torch.cat(out))

    @property
    def n_features(self) -> int:
        return int(self.means.shape[-1])

    def to(self, device: torch.device) -> "ClassMixtures":
        return replace(self, weights=self.weights.to(device), means=self.means.to(device),
                       prec_chol=self.prec_chol.to(device))

    def tensors(self) -> dict[str, Tensor]:
        return {"weights": self.weights, "means": self.means, "prec_chol": self.prec_chol}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], *, n_classes: int, n_features: int,
                     config: dict[str, Any], dtype: torch.dtype, prefix: str) -> "ClassMixtures":
        C, D, K = n_classes, n_features, int(config["n_components"])
        ctype = config["covariance_type"]
        weights = file_tensor(tensors, prefix + "weights", (C, K), dtype)
        means = file_tensor(tensors, prefix + "means", (C, K, D), dtype)
        prec_chol = file_tensor(tensors, prefix + "prec_chol", kernels.precision_shape(ctype, C, K, D), dtype)
        return cls(weights, means, prec_chol, ctype)


@dataclass(frozen=True)
class SharedCovarianceGaussians:
    """One Gaussian per class with one covariance shared by all classes, for one layer.

    Attributes
    ----------
    means : Tensor of shape (n_classes, D)
        Class means.
    prec_chol : Tensor of shape (D, D)
        Upper factor of the shared precision, ``Σ⁻¹ = P Pᵀ``.
    stored : bool
        As :class:`ClassMixtures`: kept on a storage device; the ``C D + D²`` values are
        small, so all-class scoring moves them whole, scoring under given classes moves the
        factor and the distinct classes' means.
    """

    means: Tensor
    prec_chol: Tensor
    stored: bool = False
    #: :meth:`fit` (in memory) is not data-parallel; the detector fits by streaming
    #: (:meth:`from_moments`), which is
    data_parallel: ClassVar[bool] = False

    @classmethod
    def fit(cls, H: Tensor, labels: Tensor, n_classes: int, options: dict[str, Any]) -> "SharedCovarianceGaussians":
        """Class means and the pooled within-class covariance (+ ``reg_covar``), closed form.

        ``Σ = Σ_c Σ_{n: y_n = c} (h_n - μ_c)(h_n - μ_c)ᵀ / N + reg_covar · I``, computed as
        the ``'tied'`` M-step of one group whose components are the classes, with hard
        (one-hot) responsibilities.
        """
        dtype = H.dtype  # the caller casts H to the compute dtype
        resp = torch.nn.functional.one_hot(labels, n_classes).to(dtype)  # (N, C)
        _, means, covariance = kernels.estimate_gaussian_parameters(
            H.unsqueeze(0), resp.unsqueeze(0), float(options["reg_covar"]), "tied",
            memory_budget=options.get("memory_budget"),
        )  # (1, C, D), (1, D, D)
        prec_chol, info = kernels.compute_prec_chol(covariance, "tied")
        kernels.check_cholesky_info(info, "tied", dtype)
        return cls(means[0], prec_chol[0])

    @classmethod
    def from_moments(cls, moments: Any, reg_covar: float) -> "SharedCovarianceGaussians":
        """From merged per-class moments with a pooled scatter (:mod:`._moments`, a
        duck-typed ``ClassMoments``):
        ``Σ = Σ_c S_c / Σ_c n_c + reg_covar · I`` (counts floored by ``10 eps`` as in
        :meth:`fit`, which it equals to round-off)."""
        dtype = moments.means.dtype
        nk = moments.counts + 10 * torch.finfo(dtype).eps  # (C,)
        covariance = moments.scatter / nk.sum()  # (D, D): the pooled scatter Σ_c S_c
        covariance = covariance + reg_covar * torch.eye(covariance.shape[0], dtype=dtype,
                                                        device=covariance.device)
        prec_chol, info = kernels.compute_prec_chol(covariance.unsqueeze(0), "tied")
        kernels.check_cholesky_info(info, "tied", dtype)
        return cls(moments.means, prec_chol[0])

    def log_prob(self, h: Tensor, memory_budget: int | None = None) -> Tensor:
        """``log N(h | μ_c, Σ)`` for every class: ``h (B, D)`` -> ``(B, n_classes)``.

        The classes share one factor, so all of them take one ``(B, D) @ (D, D)`` product
        and the kernel's chunks of samples bound the memory.
        """
        means, prec_chol = fetch(self.means, slice(None), h.device), fetch(self.prec_chol, slice(None), h.device)
        return kernels.log_gaussian_prob(h, means.unsqueeze(0), prec_chol.unsqueeze(0), "tied",
                                         memory_budget=memory_budget)[0]  # (B, C)

    def log_prob_classes(self, h: Tensor, tiles: ClassTiles, memory_budget: int | None = None) -> Tensor:
        """``log N(h_b | μ_c, Σ)`` under the classes of ``tiles`` only.

        ``‖(h - c̄) P - (μ_c - c̄) P‖²`` with ``c̄`` the mean of the class means (as the
        all-class kernel centres), one product for the samples and one gathered row per
        pair; the tiles' layout is not needed (the factor is shared).
        """
        D = self.means.shape[-1]
        flat_class = tiles.tile_class[tiles.position // tiles.rows]  # (P,) the class of each pair
        if self.stored or self.means.device != h.device:  # the factor and the classes present move
            centre = self.means.detach().mean(0, keepdim=True).to(h.device)  # (1, D)
            prec_chol = fetch(self.prec_chol, slice(None), h.device)
            present, flat_class = torch.unique(flat_class, return_inverse=True)  # (U,), (P,)
            means = fetch(self.means, present, h.device)  # (U, D)
        else:
            centre = self.means.detach().mean(0, keepdim=True)  # (1, D)
            prec_chol, means = self.prec_chol, self.means
        y = (h - centre) @ prec_chol  # (B, D)
        mu_prec = (means - centre) @ prec_chol  # (C, D), or (U, D)
        maha = (y[tiles.sample] - mu_prec[flat_class]).square().sum(-1)  # (P,)
        log_det = kernels.log_det_prec_chol(prec_chol.unsqueeze(0), "tied", D)[0]
        return (-0.5 * (D * _LOG_2PI + maha) + log_det).reshape(tiles.shape)

    @property
    def n_features(self) -> int:
        return int(self.means.shape[-1])

    def to(self, device: torch.device) -> "SharedCovarianceGaussians":
        return replace(self, means=self.means.to(device), prec_chol=self.prec_chol.to(device))

    def stored_on(self, device: torch.device, pin: bool = False) -> "SharedCovarianceGaussians":
        """This density with its tensors kept on the storage ``device``."""
        return SharedCovarianceGaussians(store(self.means, device, pin), store(self.prec_chol, device, pin),
                                         stored=True)

    def tensors(self) -> dict[str, Tensor]:
        return {"means": self.means, "prec_chol": self.prec_chol}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], *, n_classes: int, n_features: int,
                     config: dict[str, Any], dtype: torch.dtype, prefix: str) -> "SharedCovarianceGaussians":
        C, D = n_classes, n_features
        means = file_tensor(tensors, prefix + "means", (C, D), dtype)
        prec_chol = file_tensor(tensors, prefix + "prec_chol", kernels.precision_shape("tied", None, C, D), dtype)
        return cls(means, prec_chol)


#: density name (as written in detector files) -> class
DENSITIES = {"class_mixtures": ClassMixtures, "shared_covariance": SharedCovarianceGaussians}
