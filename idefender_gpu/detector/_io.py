"""Detector files: the schema of a fitted detector in one verified safetensors file (private).

The bytes (safetensors, the JSON config in its metadata, the SHA-256 digest, atomic writes,
never unpickling) are :mod:`idefender_gpu._files`'s job, shared with model checkpoints. This
module holds what a *detector* file contains:

* the config (:class:`DetectorHeader`): format version, detector class, density, layer
  specs and their widths, number of classes, per-sample input shape, ``keep``, dtype and the
  detector's own hyper-parameters (``params``);
* the tensors: ``"thresholds"`` ``(n_classes,)`` and, for the layer at position ``i``, the
  density's tensors under the prefix ``"layers.{i}."`` (:func:`layer_prefix`); every tensor
  is checked against the shape and dtype the config implies, and for finiteness, by
  :func:`file_tensor`.

:func:`write_detector_file` and :func:`read_detector_file` move ``(config, tensors)``
to and from a file; :func:`detector_record` and :func:`parse_detector_record` translate
between them and a :class:`DetectorHeader`.

At scale (1000 classes x 4096^2 floats is 67 GB per component) a file is never held twice:
:mod:`idefender_gpu._files` writes each tensor block by block (blocks of classes: every
density tensor has a leading class axis) from wherever it lives, hashing as it writes, and
reads each tensor straight into its place (a CUDA device, pinned host memory, or a memory
map), hashing as it reads; :func:`file_tensor` checks finiteness in blocks too. The schema
(:data:`FORMAT_VERSION` 1) is the one every release wrote, so older files load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from idefender_gpu import _files
from idefender_gpu.features import HiddenStateHooks, eval_mode, model_device, model_dtype

__all__ = [
    "DTYPES",
    "DetectorHeader",
    "FORMAT",
    "FORMAT_VERSION",
    "check_model_matches",
    "detector_record",
    "digest",
    "file_tensor",
    "layer_prefix",
    "parse_detector_record",
    "read_detector_file",
    "read_detector_for",
    "write_detector_file",
]

FORMAT = "idefender-gpu/detector"
FORMAT_VERSION = 1
#: dtype names of a detector file -> torch dtypes
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: config fields and their JSON types (bool is never an int here)
_FIELDS = {"detector": str, "density": str, "layers": list, "n_features": list, "n_classes": int,
           "input_shape": list, "keep": (int, float), "dtype": str, "params": dict}


# --------------------------------------------------------------------------------------
# Bytes: the verified file
# --------------------------------------------------------------------------------------


def digest(config_json: str, tensors: dict[str, Tensor]) -> str:
    """SHA-256 of a detector file's config string and tensors (see :func:`idefender_gpu._files.digest`)."""
    return _files.digest(FORMAT, config_json, tensors)


def write_detector_file(path: Any, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` and ``config`` (JSON-able) to ``path`` as one verified safetensors file."""
    _files.write_verified(path, FORMAT, config, tensors)


def read_detector_file(path: Any, *, device: Any = None, pin_memory: bool = False,
                       mmap: bool = False) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a detector file: ``(config, tensors)``, tensors on ``device`` (CPU by
    default; pinned, or views of a memory map of the file, as
    :func:`idefender_gpu._files.read_verified` reads them).

    Raises what :func:`idefender_gpu._files.read_verified` raises: never unpickles, and
    refuses truncated, foreign, tampered and other-version files with a ``ValueError``.
    """
    return _files.read_verified(path, FORMAT, kind="detector file", version=FORMAT_VERSION, device=device,
                                pin_memory=pin_memory, mmap=mmap)


def read_detector_for(path: Any, device: torch.device, storage_device: Any,
                      mmap: bool) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """:func:`read_detector_file` for a detector on a model on ``device``: the tensors go
    straight to ``storage_device`` (pinned host memory beside CUDA) or, when None, to
    ``device``; ``mmap`` needs that to be the CPU (``ValueError`` otherwise)."""
    target = device if storage_device is None else torch.device(storage_device)
    if mmap and target.type != "cpu":
        raise ValueError(f"mmap=True keeps the parameters memory-mapped in host memory: it needs "
                         f"storage_device='cpu' (or a model on the CPU); the storage would be {str(target)!r}")
    pin = target.type == "cpu" and device.type == "cuda" and not mmap
    return read_detector_file(path, device=target, pin_memory=pin, mmap=mmap)


def check_model_matches(model: nn.Module, specs: Sequence[Any], n_classes: int, input_shape: tuple[int, ...],
                        widths: Sequence[int], where: str) -> None:
    """Run ``model`` on a zero input of the saved shape; compare the layer widths and the
    number of classes with the file's (``ValueError`` naming what differs)."""
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


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorHeader:
    """What a detector file says about the detector, besides its tensors.

    Attributes
    ----------
    detector : str
        The detector's class name (``"IDefender"``, ``"MahalanobisDetector"``).
    density : str
        The per-layer density's name (a key of ``detector._densities.DENSITIES``).
    layers : tuple of str
        Canonical layer specs, in order.
    n_features : tuple of int
        Width D of each layer.
    n_classes : int
    input_shape : tuple of int
        Per-sample input shape.
    keep : float
    dtype : torch.dtype
        Of every fitted tensor.
    params : dict
        The detector's hyper-parameters, JSON-able (passed back to its constructor).
    """

    detector: str
    density: str
    layers: tuple[str, ...]
    n_features: tuple[int, ...]
    n_classes: int
    input_shape: tuple[int, ...]
    keep: float
    dtype: torch.dtype
    params: dict[str, Any]


def layer_prefix(index: int) -> str:
    """Prefix of the tensors of the layer at position ``index``."""
    return f"layers.{index}."


def file_tensor(tensors: dict[str, Tensor], name: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """The tensor ``name`` of a file, with the shape and dtype its config implies, finite."""
    tensor = tensors.get(name)
    if tensor is None:
        problem = "it is missing"
    elif tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
        problem = f"got shape {tuple(tensor.shape)}, dtype {tensor.dtype}"
    elif not _all_finite(tensor):
        problem = "got NaN or infinity"
    else:
        return tensor
    raise ValueError(f"detector file tensor {name!r} must have shape {tuple(shape)} and dtype {dtype} "
                     f"(from its config) and be finite; {problem}")


def _all_finite(tensor: Tensor) -> bool:
    """Whether every value is finite: the minimum and maximum of each block of rows (NaN
    propagates through both), so no mask or copy the size of the tensor is made."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    tensor = tensor.reshape(1) if tensor.ndim == 0 else tensor
    step = max(1, _files.BLOCK_BYTES // max(1, tensor[0].numel() * tensor.element_size()))
    for start in range(0, tensor.shape[0], step):
        low, high = torch.aminmax(tensor[start:start + step])
        if not bool(torch.isfinite(torch.stack([low, high])).all()):
            return False
    return True


def detector_record(header: DetectorHeader, thresholds: Tensor,
                    layer_tensors: Sequence[dict[str, Tensor]]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, tensors)`` of a detector file.

    Parameters
    ----------
    header : DetectorHeader
    thresholds : Tensor of shape (n_classes,)
    layer_tensors : sequence of dict of str to Tensor
        Per layer (in ``header.layers`` order), the density's tensors by name.
    """
    config = {
        "format_version": FORMAT_VERSION,
        "detector": header.detector,
        "density": header.density,
        "layers": list(header.layers),
        "n_features": list(header.n_features),
        "n_classes": header.n_classes,
        "input_shape": list(header.input_shape),
        "keep": header.keep,
        "dtype": str(header.dtype).replace("torch.", ""),
        "params": header.params,
    }
    tensors = {"thresholds": thresholds}
    for index, layer in enumerate(layer_tensors):
        for name, tensor in layer.items():
            tensors[layer_prefix(index) + name] = tensor
    return config, tensors


def parse_detector_record(config: dict[str, Any], tensors: dict[str, Tensor], *, detector: str,
                          density: str, where: str) -> tuple[DetectorHeader, Tensor]:
    """Check a file's config and its thresholds; the header and ``thresholds (n_classes,)``.

    Parameters
    ----------
    config, tensors
        As :func:`read_detector_file` returns them.
    detector, density : str
        The detector class and density the caller loads.
    where : str
        The file, for messages.

    Raises
    ------
    ValueError
        If a field is missing or malformed, the file holds another detector, or the
        config is inconsistent (no layers, widths not matching layers, unknown dtype,
        non-positive sizes), or the thresholds tensor is missing or malformed.
    """
    for key, kind in _FIELDS.items():
        if not isinstance(config.get(key), kind) or isinstance(config.get(key), bool):
            raise ValueError(f"{where} is not a valid detector file: config field {key!r} is missing or malformed")
    if config["detector"] != detector or config["density"] != density:
        held = config["detector"]
        raise ValueError(f"{where} holds {_article(held)} {held}, not {_article(detector)} {detector}; "
                         f"load it with {held}.load")
    layers, widths = config["layers"], config["n_features"]
    if not layers or len(widths) != len(layers) or config["dtype"] not in DTYPES \
            or not all(isinstance(v, int) and v > 0 for v in [*widths, *config["input_shape"]]) \
            or config["n_classes"] < 1:
        raise ValueError(f"{where} is not a valid detector file: its config is inconsistent")
    header = DetectorHeader(
        detector=detector, density=density, layers=tuple(layers), n_features=tuple(widths),
        n_classes=config["n_classes"], input_shape=tuple(config["input_shape"]), keep=config["keep"],
        dtype=DTYPES[config["dtype"]], params=config["params"],
    )
    thresholds = file_tensor(tensors, "thresholds", (header.n_classes,), header.dtype)
    return header, thresholds


def _article(noun: str) -> str:
    """'a' or 'an' before ``noun`` (by its first letter)."""
    return "an" if noun[:1].lower() in "aeiou" else "a"
