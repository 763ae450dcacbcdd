"""The user's initial parameters: ``weights_init``, ``means_init``, ``precisions_init`` (private).

Checked as scikit-learn checks them (``sklearn/mixture/_gaussian_mixture.py``:
``_check_weights``, ``_check_means``, ``_check_precisions``), with scikit-learn 1.9.1's
messages word for word, so code that matches them keeps working. Batched estimators pass
the arrays with a leading G axis; the messages then name the first failing group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu._validation import _to_tensor_any, describe


def _as_tensor(value: Any, name: str, sk_name: str, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """``value`` as a tensor of ``shape`` (scikit-learn's ``check_array`` + ``_check_shape``).

    NumPy arrays and sequences are cast to the compute dtype. Tensors must already have the
    compute dtype (``TypeError``) and device (``ValueError``): nothing is cast or moved
    silently."""
    if isinstance(value, Tensor):
        if value.dtype != dtype:
            raise TypeError(
                f"{name} must have dtype {dtype} (the dtype the model is fitted in); got "
                f"{describe(value)}"
            )
        if value.device != device:
            raise ValueError(
                f"{name} must be on device {device} (the device the model is fitted on); "
                f"got {describe(value)}"
            )
        tensor = value
    else:
        tensor, _ = _to_tensor_any(value, name)
        tensor = tensor.to(device=device, dtype=dtype)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        if bool(torch.isnan(tensor).any()):
            raise ValueError("Input contains NaN.")
        raise ValueError(
            f"Input contains infinity or a value too large for dtype('{str(dtype).split('.')[-1]}')."
        )
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"The parameter '{sk_name}' should have the shape of {tuple(shape)}, but got "
            f"{tuple(tensor.shape)}"
        )
    return tensor


def check_inits(weights_init: Any, means_init: Any, precisions_init: Any, *, covariance_type: str,
                n_components: int, n_groups: int, n_features: int, batched: bool,
                dtype: torch.dtype, device: torch.device) -> dict[str, Tensor | None]:
    """Validated ``{"weights": (G, K), "means": (G, K, D), "prec_chol": ...}`` (None where
    not given) on ``device`` in ``dtype``; precisions become their Cholesky factors."""
    G, K, D = n_groups, n_components, n_features
    user = (lambda shape: shape) if batched else (lambda shape: shape[1:])
    out: dict[str, Tensor | None] = {"weights": None, "means": None, "prec_chol": None}
    if weights_init is not None:
        weights = _as_tensor(weights_init, "weights_init", "weights", user((G, K)), dtype, device)
        weights = weights.reshape(G, K)
        low, high = float(weights.min()), float(weights.max())
        if low < 0.0 or high > 1.0:
            # scikit-learn's message, which prints the minimum as "max value" and the
            # maximum as "min value"; kept word for word (code matches on it)
            raise ValueError(
                "The parameter 'weights' should be in the range [0, 1], but got max value "
                f"{low:.5f}, min value {high:.5f}"
            )
        atol = 1e-6 if dtype == torch.float32 else 1e-8
        deviation = (weights.sum(-1) - 1).abs()
        if bool((deviation > atol).any()):
            worst = int(deviation.argmax())
            where = f" for group {worst}" if batched else ""
            raise ValueError(
                "The parameter 'weights' should be normalized, but got sum(weights) = "
                f"{float(weights[worst].sum()):.5f}{where}"
            )
        out["weights"] = weights
    if means_init is not None:
        means = _as_tensor(means_init, "means_init", "means", user((G, K, D)), dtype, device)
        out["means"] = means.reshape(G, K, D)
    if precisions_init is not None:
        shape = kernels.precision_shape(covariance_type, G, K, D)
        precisions = _as_tensor(precisions_init, "precisions_init", f"{covariance_type} precision",
                                user(shape), dtype, device).reshape(shape)
        if covariance_type in ("full", "tied"):
            symmetric = torch.isclose(precisions, precisions.mT).all()
            prec_chol, info = kernels.prec_chol_from_precisions(precisions, covariance_type)
            if not bool(symmetric) or bool((info != 0).any()):
                raise ValueError(f"'{covariance_type} precision' should be symmetric, positive-definite")
        else:
            if bool((precisions <= 0).any()):
                raise ValueError(f"'{covariance_type} precision' should be positive")
            prec_chol, _ = kernels.prec_chol_from_precisions(precisions, covariance_type)
        out["prec_chol"] = prec_chol
    return out
