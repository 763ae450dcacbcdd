"""Conversions between the factors of a Gaussian's covariance and precision.

Every factor is named for what it factors:

* ``prec_chol`` (scikit-learn's ``precisions_cholesky_``): upper triangular with
  ``precision = prec_chol @ prec_chol.mT``, so a Mahalanobis term is one matmul.
* ``scale_tril`` (torch.distributions' convention): lower triangular with
  ``covariance = scale_tril @ scale_tril.mT``.

They are related by ``prec_chol = scale_tril^{-T}``. Shapes per covariance type, with an
optional leading batch shape ``(...)`` (usually ``(G,)``), the one table of the project
(:func:`precision_shape`):

===========  ===================
full         ``(..., K, D, D)``
tied         ``(..., D, D)``
diag         ``(..., K, D)``
spherical    ``(..., K)``
===========  ===================

Nothing here inverts a matrix or takes a determinant: triangular solves and sums of logs
of diagonals only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from idefender_gpu.exceptions import NotPSDError

__all__ = [
    "COVARIANCE_TYPES",
    "check_cholesky_info",
    "precision_shape",
    "compute_prec_chol",
    "covariance_from_prec_chol",
    "log_det_prec_chol",
    "prec_chol_from_precisions",
    "prec_chol_from_scale_tril",
    "precision_from_prec_chol",
    "scale_tril_from_prec_chol",
]

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")

_MATRIX_TYPES = ("full", "tied")


def precision_shape(covariance_type: str, G: int | None, K: int, D: int) -> tuple[int, ...]:
    """Shape of ``prec_chol`` (and of the covariances / precisions) per covariance type.

    ``full (G, K, D, D)``, ``tied (G, D, D)``, ``diag (G, K, D)``, ``spherical (G, K)``;
    ``G=None`` leaves out the group axis (one mixture, scikit-learn's shapes).

    Raises
    ------
    ValueError
        For a ``covariance_type`` outside :data:`COVARIANCE_TYPES`.
    """
    if covariance_type == "full":
        shape: tuple[int, ...] = (K, D, D)
    elif covariance_type == "tied":
        shape = (D, D)
    elif covariance_type == "diag":
        shape = (K, D)
    elif covariance_type == "spherical":
        shape = (K,)
    else:
        raise ValueError(
            f"covariance_type must be one of {COVARIANCE_TYPES}; got {covariance_type!r}"
        )
    return shape if G is None else (G, *shape)


def _flag_non_finite(factor: Tensor, info: Tensor) -> Tensor:
    """``info`` with ``D + 1`` where the factorisation reported success but ``factor``
    ``(..., D, D)`` holds NaN or infinity.

    LAPACK's ``potrf`` stops at a NaN pivot (``info > 0``); cuSOLVER may not, and returns
    ``info = 0`` with a NaN factor. Checked on the device (no host synchronisation): the
    flag travels in ``info`` to the driver's one check per iteration.
    """
    finite = torch.isfinite(factor).all(-1).all(-1)  # (...)
    return torch.where(finite | (info != 0), info, factor.shape[-1] + 1).to(info.dtype)


def _vector_info(values: Tensor, covariance_type: str) -> Tensor:
    """Failures of diag / spherical variances or precisions: not > 0 or not finite."""
    bad = ~((values > 0) & (values < math.inf))  # NaN fails both comparisons
    if covariance_type == "diag":
        return bad.sum(-1, dtype=torch.int32)  # (..., K)
    return bad.to(torch.int32)  # (..., K)


def _eye_like(matrix: Tensor) -> Tensor:
    """Identity of the trailing (D, D) shape of ``matrix``, same dtype/device."""
    return torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)


def prec_chol_from_scale_tril(scale_tril: Tensor) -> Tensor:
    """``prec_chol = scale_tril^{-T}`` by one triangular solve; shape ``(..., D, D)``."""
    inv_scale_tril = torch.linalg.solve_triangular(  # (..., D, D) lower
        scale_tril, _eye_like(scale_tril), upper=False
    )
    return inv_scale_tril.mT  # (..., D, D) upper


def scale_tril_from_prec_chol(prec_chol: Tensor) -> Tensor:
    """``scale_tril = prec_chol^{-T}`` by one triangular solve; shape ``(..., D, D)``."""
    inv_prec_chol = torch.linalg.solve_triangular(  # (..., D, D) upper
        prec_chol, _eye_like(prec_chol), upper=True
    )
    return inv_prec_chol.mT  # (..., D, D) lower


def compute_prec_chol(covariances: Tensor, covariance_type: str) -> tuple[Tensor, Tensor]:
    """Precision Cholesky factors of covariances, without raising on failure.

    Parameters
    ----------
    covariances : Tensor
        ``(..., K, D, D)`` full, ``(..., D, D)`` tied, ``(..., K, D)`` diag, ``(..., K)``
        spherical.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    prec_chol : Tensor
        Same shape, dtype and device as ``covariances``; undefined where ``info != 0``.
    info : Tensor of int32
        ``(..., K)`` (``(...)`` for tied): zero where the factor exists and is finite
        (``D + 1`` where the factorisation reported success with a NaN or infinite
        factor, as cuSOLVER can; diag/spherical: the number of variances that are not
        positive and finite). Check it with :func:`check_cholesky_info` (one host
        synchronisation) before using ``prec_chol``.
    """
    if covariance_type in _MATRIX_TYPES:
        scale_tril, info = torch.linalg.cholesky_ex(covariances)  # (..., D, D), (...)
        prec_chol = prec_chol_from_scale_tril(scale_tril)
        return prec_chol, _flag_non_finite(prec_chol, info)
    return torch.rsqrt(covariances), _vector_info(covariances, covariance_type)


def prec_chol_from_precisions(precisions: Tensor, covariance_type: str) -> tuple[Tensor, Tensor]:
    """Upper factor ``prec_chol`` with ``precision = prec_chol @ prec_chol.mT``.

    The precision is flipped along both axes, factorised as ``J Λ J = M Mᵀ`` (M lower),
    and flipped back: ``prec_chol = J M J`` is upper triangular and
    ``J M J (J M J)ᵀ = Λ``. Returns ``(prec_chol, info)`` as :func:`compute_prec_chol`.
    """
    if covariance_type in _MATRIX_TYPES:
        flipped = precisions.flip(-1, -2)  # (..., D, D)
        lower, info = torch.linalg.cholesky_ex(flipped)
        return lower.flip(-1, -2), _flag_non_finite(lower, info)
    return torch.sqrt(precisions), _vector_info(precisions, covariance_type)


def precision_from_prec_chol(prec_chol: Tensor, covariance_type: str) -> Tensor:
    """``precision = prec_chol @ prec_chol.mT`` (matrices) or ``prec_chol ** 2``."""
    if covariance_type in _MATRIX_TYPES:
        return prec_chol @ prec_chol.mT
    return prec_chol.square()


def covariance_from_prec_chol(prec_chol: Tensor, covariance_type: str) -> Tensor:
    """``covariance = scale_tril @ scale_tril.mT`` (matrices) or ``prec_chol ** -2``."""
    if covariance_type in _MATRIX_TYPES:
        scale_tril = scale_tril_from_prec_chol(prec_chol)
        return scale_tril @ scale_tril.mT
    return prec_chol.square().reciprocal()


def log_det_prec_chol(prec_chol: Tensor, covariance_type: str, n_features: int) -> Tensor:
    """``log det(prec_chol)``, half the log-determinant of the precision.

    Returns ``(..., K)`` for full/diag/spherical and ``(...)`` for tied.
    """
    if covariance_type in _MATRIX_TYPES:
        return prec_chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    if covariance_type == "diag":
        return prec_chol.log().sum(-1)
    return n_features * prec_chol.log()


def _not_psd_message(where: str, dtype: torch.dtype) -> str:
    """scikit-learn's message, verbatim, then where the factorisation failed."""
    message = (
        "Fitting the mixture model failed because some components have ill-defined "
        "empirical covariance (for instance caused by singleton or collapsed samples). "
        "Try to decrease the number of components, increase reg_covar, or scale the input data."
    )
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        message += (
            " The numerical accuracy can also be improved by passing float64 data "
            "instead of float32."
        )
    return message + f" (The covariance of {where} is not positive definite.)"


def check_cholesky_info(
    info: Tensor, covariance_type: str, dtype: torch.dtype, mask: Tensor | None = None
) -> None:
    """Raise :class:`NotPSDError` if any factorisation in ``info`` failed.

    This is the one kernel that synchronises with the host (one scalar), so an EM driver
    calls it once per iteration.

    Parameters
    ----------
    info : Tensor of int
        ``(G, K)`` (``(G,)`` for tied) as returned by :func:`compute_prec_chol`.
    covariance_type : str
    dtype : torch.dtype
        Dtype of the covariances, to suggest float64 when it was lower.
    mask : Tensor of bool, optional
        ``(G,)``; failures of groups where it is False are ignored.

    Raises
    ------
    NotPSDError
        Naming the first failing group and component.
    """
    failed = info != 0  # (G, K) or (G,)
    if mask is not None:
        failed = failed & (mask.view(-1, *([1] * (failed.ndim - 1))))
    if not bool(failed.any()):
        return
    first = failed.nonzero()[0].tolist()
    if covariance_type == "tied":
        where = f"group {first[0]} (tied covariance shared by all components)"
    else:
        where = f"group {first[0]}, component {first[1]}"
    raise NotPSDError(_not_psd_message(where, dtype))


LOG_2PI = math.log(2.0 * math.pi)
