"""Validation and conversion at the public boundary (private).

Arrays arrive as NumPy arrays, torch tensors or nested sequences; they leave in the kind
they came in: NumPy in -> NumPy out, a tensor in -> a tensor on the same device out.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class ArrayKind:
    """Where an input came from, so outputs can be returned the same way."""

    numpy: bool
    device: torch.device | None = None

    def out(self, tensor: Tensor) -> Any:
        """Convert a result tensor to the input's kind (and device)."""
        if self.numpy:
            return tensor.detach().cpu().numpy()
        return tensor if tensor.device == self.device else tensor.to(self.device)


def describe(value: Any) -> str:
    """Short description of an array-like for error messages."""
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}, dtype {value.dtype}, device {value.device}"
    if isinstance(value, np.ndarray):
        return f"shape {value.shape}, dtype {value.dtype}"
    return f"type {type(value).__name__}"


def reject_sparse(X: Any, name: str = "X") -> None:
    """scikit-learn's error for a SciPy sparse matrix or a sparse tensor (dense data required)."""
    sparse = sys.modules.get("scipy.sparse")
    if sparse is not None and sparse.issparse(X):
        raise TypeError(
            f"Sparse data was passed for {name}, but dense data is required. Use '.toarray()' "
            "to convert to a dense numpy array."
        )
    if isinstance(X, Tensor) and X.layout != torch.strided:
        raise TypeError(
            f"Sparse data was passed for {name} (layout {X.layout}), but dense data is required. "
            "Use '.to_dense()' to convert to a dense tensor."
        )


def _complex_error(value: Any) -> ValueError:
    """scikit-learn's error for complex input."""
    return ValueError(f"Complex data not supported\n{value}\n")


def _to_tensor_any(value: Any, name: str) -> tuple[Tensor, ArrayKind]:
    """Tensor view of an array-like without changing dtype/device; reject non-numeric, sparse
    and complex input."""
    reject_sparse(value, name)
    if isinstance(value, Tensor):
        return value, ArrayKind(numpy=False, device=value.device)
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{name} must be an array-like of numbers; got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise TypeError(f"{name} must be an array-like of numbers; got {type(value).__name__}") from exc
    if array.dtype.kind == "c":
        raise _complex_error(array)
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise TypeError(
            f"{name} must be an array-like of real numbers; got dtype {array.dtype}"
        )
    if array.dtype.kind == "b":
        array = array.astype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(array)), ArrayKind(numpy=True)


def resolve_dtype(dtype: Any, data: Tensor) -> torch.dtype:
    """Compute dtype: the given one, else the data's float32/float64, else float32."""
    if dtype is None:
        return data.dtype if data.dtype in _FLOAT_DTYPES else torch.float32
    mapping = {
        "float32": torch.float32,
        "float64": torch.float64,
        np.float32: torch.float32,
        np.float64: torch.float64,
        torch.float32: torch.float32,
        torch.float64: torch.float64,
    }
    try:
        return mapping[dtype]
    except (KeyError, TypeError):
        raise ValueError(
            f"dtype must be one of None, 'float32', 'float64', torch.float32, torch.float64; "
            f"got {dtype!r}"
        ) from None


def resolve_device(device: Any, data: Tensor, from_numpy: bool) -> torch.device:
    """Compute device: the given one, else the input tensor's, else CUDA if available."""
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device or its name; got {device!r}") from None
    if not from_numpy:
        return data.device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def check_array(
    X: Any,
    *,
    name: str = "X",
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    estimator_name: str | None = None,
    ensure_min_samples: int = 1,
    n_features: int | None = None,
) -> tuple[Tensor, ArrayKind]:
    """Validate a 2-D sample matrix and move it to the compute dtype and device.

    Raises ``TypeError`` for non-numeric input and ``ValueError`` for a wrong ndim,
    too few samples, NaN/inf or a feature count that differs from ``n_features``.
    Messages follow scikit-learn's wording.
    """
    tensor, kind = _to_tensor_any(X, name)
    if tensor.is_complex():
        raise _complex_error(X)
    if tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers; got dtype {tensor.dtype}")
    if tensor.ndim != 2:
        if tensor.ndim == 1:
            raise ValueError(
                f"Expected 2D array, got 1D array instead: {name} has shape "
                f"{tuple(tensor.shape)}. Reshape your data either using X.reshape(-1, 1) "
                "if your data has a single feature or X.reshape(1, -1) if it contains a "
                "single sample."
            )
        raise ValueError(
            f"Expected 2D array, got {tensor.ndim}D array instead: {name} has shape "
            f"{tuple(tensor.shape)}"
        )
    n_samples = tensor.shape[0]
    if n_samples < ensure_min_samples:
        who = f" by {estimator_name}" if estimator_name else ""
        raise ValueError(
            f"Found array with {n_samples} sample(s) (shape={tuple(tensor.shape)}) while a "
            f"minimum of {ensure_min_samples} is required{who}."
        )
    if tensor.shape[1] < 1:
        raise ValueError(
            f"Found array with 0 feature(s) (shape={tuple(tensor.shape)}) while a minimum "
            "of 1 is required."
        )
    if n_features is not None and tensor.shape[1] != n_features:
        raise ValueError(
            f"X has {tensor.shape[1]} features, but {estimator_name} is expecting "
            f"{n_features} features as input."
        )
    target_dtype = dtype if dtype is not None else resolve_dtype(None, tensor)
    target_device = device if device is not None else tensor.device
    tensor = tensor.to(device=target_device, dtype=target_dtype)
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        if bool(torch.isnan(tensor).any()):
            raise ValueError(f"Input {name} contains NaN.")
        raise ValueError(
            f"Input {name} contains infinity or a value too large for dtype('{str(target_dtype).split('.')[-1]}')."
        )
    return tensor, kind


def check_labels(y: Any, n_samples: int, device: torch.device, n_groups: int | None) -> Tensor:
    """Validate group labels: ``(n_samples,)`` integers in ``[0, n_groups)``.

    Returns an int64 tensor on ``device``.
    """
    if y is None:
        raise ValueError("y must be an array of group labels of shape (n_samples,); got None")
    tensor, _ = _to_tensor_any(y, "y")
    if tensor.is_floating_point():
        if not bool((tensor == tensor.round()).all()) or not bool(torch.isfinite(tensor).all()):
            raise TypeError(
                f"y must hold integer group labels; got non-integer values ({describe(y)})"
            )
    elif tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"y must hold integer group labels; got {describe(y)}")
    if tensor.ndim != 1 or tensor.shape[0] != n_samples:
        raise ValueError(
            f"y must have shape ({n_samples},) to match X; got {describe(y)}"
        )
    tensor = tensor.to(device=device, dtype=torch.int64)
    if n_samples:
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or (n_groups is not None and high >= n_groups):
            bound = f"[0, {n_groups})" if n_groups is not None else "[0, n_groups)"
            bad = low if low < 0 else high
            raise ValueError(f"y must hold group labels in {bound}; got label {bad}")
    return tensor


__all__ = [
    "ArrayKind",
    "check_array",
    "check_labels",
    "describe",
    "reject_sparse",
    "resolve_device",
    "resolve_dtype",
]
