"""Verified tensor files: one safetensors file with a JSON config and a SHA-256 digest (private).

Detector files (:mod:`idefender_gpu.detector._io`) and model checkpoints
(:mod:`idefender_gpu.models`) are both written and read here. Layout of the safetensors
metadata (a ``str -> str`` map):

* ``"format"``: a marker naming the kind of file (``"idefender-gpu/detector"``, ...);
* ``"config"``: the caller's config as JSON (sorted keys), holding ``"format_version"``;
* ``"sha256"``: a SHA-256 digest over the marker, the config string and every tensor's
  name, dtype, shape and bytes, in name order, each field prefixed by its length.

Reading never unpickles anything: the file is parsed by ``safetensors`` (a JSON header
and raw little-endian tensor bytes), so a crafted file cannot run code. The digest detects
truncation, corruption and edits made without recomputing it; it is a checksum, not a
signature (someone who rewrites the file can recompute it), so callers still check every
tensor's shape against the config and the config against what they load it into.

Writes are atomic (a temporary file in the same folder, then a rename), so a reader never
sees half a file and an interrupted write leaves the previous file intact; the file gets the
permissions ``open()`` would give it (the umask's). Reads go tensor
by tensor from a memory map and copy each tensor once (the copy outlives the map, so
replacing the file later is safe): the file's bytes are never held a second time in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

__all__ = ["check_path", "digest", "read_verified", "write_verified"]


def check_path(path: Any) -> Path:
    """``path`` as a :class:`~pathlib.Path`; ``TypeError`` unless a str or ``os.PathLike``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    return Path(path)


def digest(marker: str, config_json: str, tensors: dict[str, Tensor]) -> str:
    """SHA-256 over ``marker``, ``config_json`` and ``tensors`` (length-prefixed fields).

    Each tensor contributes its name, dtype, shape (JSON) and raw bytes, in name order.
    """
    sha = hashlib.sha256()

    def put(data: Any, length: int | None = None) -> None:
        sha.update((len(data) if length is None else length).to_bytes(8, "little"))
        sha.update(data)

    put(marker.encode())
    put(config_json.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        put(name.encode())
        put(str(tensor.dtype).encode())
        put(json.dumps(list(tensor.shape)).encode())
        raw = tensor.reshape(-1).view(torch.uint8).numpy()  # a view: no copy of the bytes
        put(memoryview(raw), raw.nbytes)
    return sha.hexdigest()


def _host_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors sharing no storage (what safetensors can write)."""
    out, seen = {}, set()
    for name, tensor in tensors.items():
        host = tensor.detach().to("cpu").contiguous()
        if host.untyped_storage().data_ptr() in seen:
            host = host.clone()  # tied weights: safetensors refuses tensors that share storage
        seen.add(host.untyped_storage().data_ptr())
        out[name] = host
    return out


def write_verified(path: Any, marker: str, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write ``tensors`` and the JSON-able ``config`` to ``path`` (atomically).

    Parameters
    ----------
    path : str or os.PathLike
        The file; its folder is created if missing.
    marker : str
        The ``"format"`` entry of the metadata.
    config : dict
        JSON-able; written with sorted keys.
    tensors : dict of str to Tensor
        Any device; written from host copies.

    Returns
    -------
    path : Path
    """
    path = check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(config, sort_keys=True)
    host = _host_tensors(tensors)
    metadata = {"format": marker, "config": config_json, "sha256": digest(marker, config_json, host)}
    # A fresh name beside the target, so the rename is atomic. Its permissions are those
    # open() gives a new file (they follow the umask), whatever save_file creates (0600).
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb"):
            mode = tmp.stat().st_mode
        save_file(host, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_verified(path: Any, marker: str, *, kind: str, version: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a file written by :func:`write_verified`: ``(config, tensors)`` on CPU.

    Parameters
    ----------
    path : str or os.PathLike
    marker : str
        The ``"format"`` the metadata must hold.
    kind : str
        What the file is, for messages (``"detector file"``, ``"model checkpoint"``).
    version : int
        The ``"format_version"`` the config must hold.

    Raises
    ------
    TypeError
        If ``path`` is not a str or ``os.PathLike``.
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a complete safetensors file (truncated, a pickle, anything
        else: never unpickled), lacks the marker, holds no config or digest, fails the
        digest, or holds an unreadable config or another format version.
    """
    path = check_path(path)
    where = repr(str(path))
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist: no {kind} to read")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            # clone: the memory map goes away with the handle (and with a later rewrite)
            tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
    except SafetensorError as exc:
        raise ValueError(
            f"{where} is not a {kind}: it is not a complete safetensors file (truncated, "
            f"corrupted, or another format such as a pickle, which is never loaded): {exc}"
        ) from None
    if metadata.get("format") != marker:
        raise ValueError(
            f"{where} is not an idefender-gpu {kind}: its metadata must have "
            f"format={marker!r}; got {metadata.get('format')!r}"
        )
    config_json, stored = metadata.get("config"), metadata.get("sha256")
    if not isinstance(config_json, str) or not isinstance(stored, str):
        raise ValueError(f"{where} is not a valid {kind}: its metadata must hold 'config' and 'sha256'")
    if digest(marker, config_json, tensors) != stored:
        raise ValueError(
            f"{where} failed its integrity check: the SHA-256 digest of its config and tensors "
            "does not match the one stored in the file (the file was modified or corrupted)"
        )
    try:
        config = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not a valid {kind}: its config is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{where} is not a valid {kind}: its config must be a JSON object")
    if config.get("format_version") != version:
        raise ValueError(
            f"{where} has {kind} format version {config.get('format_version')!r}; this "
            f"idefender-gpu reads version {version}"
        )
    return config, tensors
