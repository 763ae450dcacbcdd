"""Class-conditional densities of one layer's hidden states (private).

Each density holds the fitted tensors of one layer and evaluates ``log p(h | class)`` for
every class with :func:`idefender_gpu.kernels.log_gaussian_prob` (the same kernel the EM
uses: no second copy of the math), differentiably with respect to ``h``:

* :class:`ClassMixtures` (I-defender): one Gaussian mixture per class, the groups ``G`` of
  the kernel being the classes; ``log p(h | c) = logsumexp_k(log w_ck + log N(h | μ_ck, Σ_ck))``.
* :class:`SharedCovarianceGaussians` (Mahalanobis baseline): one Gaussian per class with a
  covariance shared by all classes, evaluated as a single group whose ``K`` components are
  the classes with the kernel's ``'tied'`` covariance; ``log p(h | c) = log N(h | μ_c, Σ)``.

Both expose ``fit(H, labels, n_classes, options)``, ``log_prob(h) -> (B, n_classes)``,
``tensors()`` / ``from_tensors()`` for the file format (with shape checks), ``to(device)``
and ``data_parallel`` (whether ``fit`` works inside ``data_parallel``).
:func:`sum_log_density` sums the layers' log-densities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu.detector._io import file_tensor
from idefender_gpu.mixture import BatchedGaussianMixture

__all__ = ["ClassMixtures", "DENSITIES", "SharedCovarianceGaussians", "sum_log_density"]


def sum_log_density(densities: dict[str, Any], states: dict[str, Tensor],
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
    """

    weights: Tensor
    means: Tensor
    prec_chol: Tensor
    covariance_type: str
    #: the fit is a BatchedGaussianMixture fit, data-parallel inside ``data_parallel``
    data_parallel: ClassVar[bool] = True

    @classmethod
    def fit(cls, H: Tensor, labels: Tensor, n_classes: int, options: dict[str, Any]) -> "ClassMixtures":
        """All classes' mixtures in one batched EM pass: ``H (N, D)``, ``labels (N,)``."""
        # G = max(label) + 1 = n_classes: the caller checked that every class has samples.
        mixture = BatchedGaussianMixture(**options).fit(H, labels)
        return cls(mixture.weights_, mixture.means_, mixture.precisions_cholesky_, options["covariance_type"])

    def log_prob(self, h: Tensor, memory_budget: int | None = None) -> Tensor:
        """``log p(h | c)`` for every class: ``h (B, D)`` -> ``(B, n_classes)``."""
        log_prob = kernels.log_gaussian_prob(h, self.means, self.prec_chol, self.covariance_type,
                                             memory_budget=memory_budget)  # (C, B, K)
        log_prob = log_prob + self.weights.log().unsqueeze(-2)  # (C, B, K)
        return torch.logsumexp(log_prob, dim=-1).mT  # (B, C)

    @property
    def n_features(self) -> int:
        return int(self.means.shape[-1])

    def to(self, device: torch.device) -> "ClassMixtures":
        return ClassMixtures(self.weights.to(device), self.means.to(device), self.prec_chol.to(device),
                             self.covariance_type)

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
    """

    means: Tensor
    prec_chol: Tensor
    #: the closed-form fit is not data-parallel yet
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

    def log_prob(self, h: Tensor, memory_budget: int | None = None) -> Tensor:
        """``log N(h | μ_c, Σ)`` for every class: ``h (B, D)`` -> ``(B, n_classes)``."""
        return kernels.log_gaussian_prob(h, self.means.unsqueeze(0), self.prec_chol.unsqueeze(0), "tied",
                                         memory_budget=memory_budget)[0]  # (B, C)

    @property
    def n_features(self) -> int:
        return int(self.means.shape[-1])

    def to(self, device: torch.device) -> "SharedCovarianceGaussians":
        return SharedCovarianceGaussians(self.means.to(device), self.prec_chol.to(device))

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
