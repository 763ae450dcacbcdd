"""Detector files: one safetensors file, tensors plus a JSON config in its metadata (private).

Layout of the safetensors metadata (a ``str -> str`` map):

* ``"format"``: the marker :data:`FORMAT`;
* ``"config"``: the detector's config as JSON (format version, detector class, layers,
  per-layer widths, number of classes, covariance type, ``keep``, hyper-parameters);
* ``"sha256"``: a SHA-256 digest over the marker, the config string and every tensor's name,
  dtype, shape and bytes, in name order.

Reading never unpickles anything: the file is parsed by ``safetensors`` (a JSON header
and raw little-endian tensor bytes), so a crafted file cannot run code. The digest detects
truncation, corruption and edits made without recomputing it; it is a checksum, not a
signature (someone who rewrites the file can recompute it), so a loader still checks
every tensor's shape against the config and the config against the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import Tensor

__all__ = ["FORMAT", "FORMAT_VERSION", "read_detector_file", "write_detector_file"]

FORMAT = "idefender-gpu/detector"
FORMAT_VERSION = 1


def _check_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    return Path(path)


def digest(config_json: str, tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the marker, the config string and the tensors (length-prefixed fields)."""
    sha = hashlib.sha256()

    def put(data: bytes) -> None:
        sha.update(len(data).to_bytes(8, "little"))
        sha.update(data)

    put(FORMAT.encode())
    put(config_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        put(name.encode())
        put(str(tensor.dtype).encode())
        put(json.dumps(list(tensor.shape)).encode())
        put(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def write_detector_file(path: Any, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` and ``config`` (JSON-able) to ``path`` as one safetensors file."""
    path = _check_path(path)
    config_json = json.dumps(config, sort_keys=True)
    cpu = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in tensors.items()}
    metadata = {"format": FORMAT, "config": config_json, "sha256": digest(config_json, cpu)}
    path.write_bytes(_st_save(cpu, metadata=metadata))


def read_detector_file(path: Any) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a detector file: ``(config, tensors)`` with tensors on CPU.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a safetensors file (truncated, a pickle, anything else), has no
        detector marker, holds an unreadable or unsupported config, or fails the digest.
    """
    path = _check_path(path)
    data = path.read_bytes()
    where = f"{str(path)!r}"
    try:
        tensors = _st_load(data)
    except SafetensorError as exc:
        raise ValueError(
            f"{where} is not a detector file: it is not a complete safetensors file (truncated, "
            f"corrupted, or another format such as a pickle, which is never loaded): {exc}"
        ) from None
    # safetensors validated the header above: 8-byte little-endian length, then JSON.
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{where} is not an idefender-gpu detector file: its metadata must have "
            f"format={FORMAT!r}; got {metadata.get('format')!r}"
        )
    config_json = metadata.get("config")
    stored_digest = metadata.get("sha256")
    if not isinstance(config_json, str) or not isinstance(stored_digest, str):
        raise ValueError(f"{where} is not a valid detector file: its metadata must hold 'config' and 'sha256'")
    if digest(config_json, tensors) != stored_digest:
        raise ValueError(
            f"{where} failed its integrity check: the SHA-256 digest of its config and tensors "
            "does not match the one stored in the file (the file was modified or corrupted)"
        )
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not a valid detector file: its config is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} is not a valid detector file: its config must be a JSON object")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where} has detector file format version {version!r}; this idefender-gpu reads "
            f"version {FORMAT_VERSION}"
        )
    return config, tensors
