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

Both directions stream, so a file as large as the memory is never held twice:

* :func:`save_file` (what :func:`write_verified` calls) writes the safetensors layout itself,
  tensors in name order, each in blocks of :data:`BLOCK_BYTES` (a CUDA tensor is copied to
  the host one block at a time; a CPU tensor is written from its own memory), hashing each
  block as it is written; the header is written first with a placeholder digest and
  rewritten in place at the end (a hex digest has a fixed length). The files are ordinary
  safetensors files (``safetensors.safe_open`` reads them).
* :func:`read_verified` reads each tensor straight from the file into its final place (a
  fresh CPU tensor, pinned host memory, or a CUDA tensor through one pinned block), hashing
  as it goes: one copy, no second buffer and no memory map held; or, with ``mmap=True``,
  returns views of a private (copy-on-write) memory map of the file, hashed page by page,
  which the operating system pages in and out (the file must then stay in place and
  unmodified while the tensors live; replacing it by a rename, as :func:`write_verified`
  does, is safe).

Writes are atomic (a temporary file in the same folder, then a rename), so a reader never
sees half a file and an interrupted write leaves the previous file intact; the file gets the
permissions ``open()`` would give it (the umask's).
"""

from __future__ import annotations

import hashlib
import json
import mmap as _mmap
import os
import struct
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

__all__ = ["BLOCK_BYTES", "check_path", "digest", "read_verified", "save_file", "write_verified"]

#: bytes of one block moved between a tensor and a file (a host copy of at most this much)
BLOCK_BYTES = 64 * 2**20
#: torch dtypes and their safetensors names (the dtypes these files hold)
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
#: the placeholder digest written first (same length as a SHA-256 hex digest)
_PLACEHOLDER = "0" * 64


def check_path(path: Any) -> Path:
    """``path`` as a :class:`~pathlib.Path`; ``TypeError`` unless a str or ``os.PathLike``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    return Path(path)


class _Digest:
    """The file digest, fed incrementally: the marker and config first, then per tensor (in
    name order) its name, dtype and shape, then its bytes in any number of pieces."""

    def __init__(self, marker: str, config_json: str) -> None:
        self._sha = hashlib.sha256()
        self._put(marker.encode())
        self._put(config_json.encode())

    def _put(self, data: bytes) -> None:
        self._sha.update(len(data).to_bytes(8, "little"))
        self._sha.update(data)

    def begin(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> None:
        """Start a tensor of ``nbytes`` bytes (its bytes follow through :meth:`update`)."""
        self._put(name.encode())
        self._put(str(dtype).encode())
        self._put(json.dumps(list(shape)).encode())
        self._sha.update(int(nbytes).to_bytes(8, "little"))

    def update(self, data: Any) -> None:
        self._sha.update(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _host_blocks(tensor: Tensor, block_bytes: int | None = None) -> Iterator[np.ndarray]:
    """The bytes of ``tensor`` (row-major, any device or strides) as consecutive host
    ``uint8`` arrays of about ``block_bytes`` each: views of a contiguous CPU tensor's own
    memory, else one block copied at a time."""
    t = tensor.detach()
    if t.numel() == 0:
        return
    if t.is_contiguous():
        t = t.reshape(-1)  # a view: blocks of elements
    elif t.ndim == 0:
        t = t.reshape(1)
    row_bytes = _nbytes(t[0])
    step = max(1, int(BLOCK_BYTES if block_bytes is None else block_bytes) // max(1, row_bytes))
    for start in range(0, t.shape[0], step):
        part = t[start:start + step]
        if part.device.type != "cpu":
            part = part.to("cpu")
        yield part.contiguous().reshape(-1).view(torch.uint8).numpy()


def digest(marker: str, config_json: str, tensors: dict[str, Tensor]) -> str:
    """SHA-256 over ``marker``, ``config_json`` and ``tensors`` (length-prefixed fields).

    Each tensor contributes its name, dtype, shape (JSON) and raw bytes, in name order
    (read block by block: no copy of a CPU tensor, one block at a time of a CUDA one).
    """
    sha = _Digest(marker, config_json)
    for name in sorted(tensors):
        tensor = tensors[name]
        sha.begin(name, tensor.dtype, tuple(tensor.shape), _nbytes(tensor))
        for block in _host_blocks(tensor):
            sha.update(memoryview(block))
    return sha.hexdigest()


def _header(metadata: dict[str, str], entries: dict[str, dict[str, Any]]) -> bytes:
    """A safetensors header: the 8-byte little-endian length, then the JSON padded with
    spaces to a multiple of 8 bytes (so the data starts aligned)."""
    text = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def save_file(tensors: dict[str, Tensor], filename: str, metadata: dict[str, str], *,
              digest_of: tuple[str, str] | None = None, block_bytes: int | None = None) -> None:
    """Write ``tensors`` to ``filename`` as a safetensors file, block by block.

    The streamed counterpart of ``safetensors.torch.save_file``: tensors (any device,
    strides or shared storage) in name order, each in blocks of ``block_bytes`` (a host
    copy of one block at most), never a bytes copy of the whole file.

    Parameters
    ----------
    tensors : dict of str to Tensor
    filename : str
        Created or truncated.
    metadata : dict of str to str
        The header's ``__metadata__``.
    digest_of : (marker, config_json), optional
        When given, ``metadata["sha256"]`` is set to :func:`digest` of ``marker``,
        ``config_json`` and the tensors, computed from the blocks as they are written (the
        header is rewritten in place at the end).
    block_bytes : int, optional
        Default :data:`BLOCK_BYTES`.
    """
    names = sorted(tensors)
    entries, offset = {}, 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which these files do not hold "
                            f"(one of {', '.join(map(str, _DTYPE_NAMES))})")
        size = _nbytes(tensor)
        entries[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    metadata = dict(metadata)
    sha = None
    if digest_of is not None:
        sha = _Digest(*digest_of)
        metadata["sha256"] = _PLACEHOLDER
    header = _header(metadata, entries)
    with open(filename, "wb") as handle:
        handle.write(header)
        for name in names:
            tensor = tensors[name]
            if sha is not None:
                sha.begin(name, tensor.dtype, tuple(tensor.shape), _nbytes(tensor))
            for block in _host_blocks(tensor, block_bytes):
                view = memoryview(block)
                handle.write(view)
                if sha is not None:
                    sha.update(view)
        if sha is not None:
            metadata["sha256"] = sha.hexdigest()
            final = _header(metadata, entries)
            assert len(final) == len(header)  # a hex digest has the placeholder's length
            handle.seek(0)
            handle.write(final)


def write_verified(path: Any, marker: str, config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write ``tensors`` and the JSON-able ``config`` to ``path`` (atomically, streamed).

    Parameters
    ----------
    path : str or os.PathLike
        The file; its folder is created if missing.
    marker : str
        The ``"format"`` entry of the metadata.
    config : dict
        JSON-able; written with sorted keys.
    tensors : dict of str to Tensor
        Any device; written block by block (:func:`save_file`), the digest computed from
        the same blocks.

    Returns
    -------
    path : Path
    """
    path = check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(config, sort_keys=True)
    metadata = {"format": marker, "config": config_json}
    # A fresh name beside the target, so the rename is atomic. Its permissions are those
    # open() gives a new file (they follow the umask).
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb"):
            mode = tmp.stat().st_mode
        save_file(tensors, str(tmp), metadata, digest_of=(marker, config_json))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _incomplete(where: str, kind: str, detail: Any) -> ValueError:
    return ValueError(
        f"{where} is not a {kind}: it is not a complete safetensors file (truncated, "
        f"corrupted, or another format such as a pickle, which is never loaded): {detail}"
    )


def _entries(handle: BinaryIO, file_size: int, where: str, kind: str) -> tuple[int, dict[str, tuple]]:
    """``(data start, {name: (dtype, shape, start, stop)})`` of a header ``safe_open``
    already accepted, checked again (offsets inside the file, sizes matching shapes)."""
    handle.seek(0)
    (length,) = struct.unpack("<Q", handle.read(8))
    data_start = 8 + length
    try:
        header = json.loads(handle.read(length))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _incomplete(where, kind, exc) from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(v) for v in info["shape"])
            start, stop = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _incomplete(where, kind, f"tensor {name!r} has an unsupported or malformed entry") from None
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or stop - start != numel * itemsize or start < 0 \
                or data_start + stop > file_size:
            raise _incomplete(where, kind, f"tensor {name!r} does not match its offsets")
        entries[name] = (dtype, shape, data_start + start, data_start + stop)
    return data_start, entries


def _readinto(handle: BinaryIO, view: memoryview, where: str, kind: str) -> None:
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:])
        if not got:
            raise _incomplete(where, kind, "the file ended early (was it changed while being read?)")
        done += got


def _read_tensor(handle: BinaryIO, entry: tuple, sha: _Digest, device: torch.device, pin_memory: bool,
                 block_bytes: int, where: str, kind: str) -> Tensor:
    """One tensor read straight into its place on ``device``, hashed block by block."""
    dtype, shape, start, stop = entry
    pinned = pin_memory and device.type == "cpu" and torch.cuda.is_available()
    out = torch.empty(shape, dtype=dtype, device=device, pin_memory=pinned)
    if stop == start:
        return out
    flat = out.reshape(-1).view(torch.uint8)  # a view of out's bytes
    handle.seek(start)
    size = stop - start
    if device.type == "cpu":
        buffer = memoryview(flat.numpy())
        for lo in range(0, size, block_bytes):
            part = buffer[lo:min(lo + block_bytes, size)]
            _readinto(handle, part, where, kind)
            sha.update(part)
        return out
    staging = torch.empty(min(block_bytes, size), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    buffer = memoryview(staging.numpy())
    for lo in range(0, size, block_bytes):
        n = min(block_bytes, size - lo)
        _readinto(handle, buffer[:n], where, kind)
        sha.update(buffer[:n])
        flat[lo:lo + n].copy_(staging[:n])  # synchronous: the staging block is reused next
    return out


def _mapped_tensor(mapped: _mmap.mmap, handle: BinaryIO, entry: tuple, sha: _Digest, block_bytes: int,
                   where: str, kind: str) -> Tensor:
    """A view of the memory map (hashed page by page); a copy where the bytes are not
    aligned for the dtype."""
    dtype, shape, start, stop = entry
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if stop == start or start % itemsize:
        return _read_tensor(handle, entry, sha, torch.device("cpu"), False, block_bytes, where, kind)
    with memoryview(mapped) as view:
        for lo in range(start, stop, block_bytes):
            sha.update(view[lo:min(lo + block_bytes, stop)])
    return torch.frombuffer(mapped, dtype=dtype, count=(stop - start) // itemsize, offset=start).reshape(shape)


def read_verified(path: Any, marker: str, *, kind: str, version: int, device: Any = None,
                  pin_memory: bool = False, mmap: bool = False,
                  block_bytes: int | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read and verify a file written by :func:`write_verified`: ``(config, tensors)``.

    Each tensor is read straight into its place and hashed on the way (one copy of the
    file's bytes, whatever its size); nothing is returned unless the digest matches.

    Parameters
    ----------
    path : str or os.PathLike
    marker : str
        The ``"format"`` the metadata must hold.
    kind : str
        What the file is, for messages (``"detector file"``, ``"model checkpoint"``).
    version : int
        The ``"format_version"`` the config must hold.
    device : str or torch.device, optional
        Where the tensors go (default CPU); a CUDA device is filled through one pinned
        host block of ``block_bytes``.
    pin_memory : bool, default=False
        CPU tensors in pinned (page-locked) host memory, when CUDA is available.
    mmap : bool, default=False
        CPU tensors as views of a private memory map of the file instead of copies (the
        file must stay in place, unmodified, while they live; a rename over it is safe).
        Not with a CUDA ``device`` or ``pin_memory``.
    block_bytes : int, optional
        Default :data:`BLOCK_BYTES`.

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
    block_bytes = BLOCK_BYTES if block_bytes is None else int(block_bytes)
    device = torch.device("cpu" if device is None else device)
    if mmap and (device.type != "cpu" or pin_memory):
        raise ValueError(f"mmap=True maps the file into host memory: it needs device='cpu' and "
                         f"pin_memory=False; got device={str(device)!r}, pin_memory={pin_memory}")
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist: no {kind} to read")
    try:  # safetensors validates the header (the JSON, the offsets, the file's length)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as exc:
        raise _incomplete(where, kind, exc) from None
    if metadata.get("format") != marker:
        raise ValueError(
            f"{where} is not an idefender-gpu {kind}: its metadata must have "
            f"format={marker!r}; got {metadata.get('format')!r}"
        )
    config_json, stored = metadata.get("config"), metadata.get("sha256")
    if not isinstance(config_json, str) or not isinstance(stored, str):
        raise ValueError(f"{where} is not a valid {kind}: its metadata must hold 'config' and 'sha256'")
    sha = _Digest(marker, config_json)
    tensors: dict[str, Tensor] = {}
    with open(path, "rb") as handle:
        _, entries = _entries(handle, os.fstat(handle.fileno()).st_size, where, kind)
        mapped = _mmap.mmap(handle.fileno(), 0, access=_mmap.ACCESS_COPY) if mmap else None
        for name in sorted(entries):
            dtype, shape, start, stop = entries[name]
            sha.begin(name, dtype, shape, stop - start)
            if mapped is not None:
                tensors[name] = _mapped_tensor(mapped, handle, entries[name], sha, block_bytes, where, kind)
            else:
                tensors[name] = _read_tensor(handle, entries[name], sha, device, pin_memory, block_bytes,
                                             where, kind)
    if sha.hexdigest() != stored:
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
