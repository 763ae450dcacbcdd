"""The hidden-state cache on disk of a streamed detector fit (private).

A fit with several components per class (EM: one pass over the hidden states per
iteration) whose states do not fit the detector's ``memory_budget`` can run the model once
and stream every later pass from disk: ``IDefender(..., cache=DIR)``. A cache folder holds

* ``shard-NNNNNN.safetensors``: the states of consecutive loader batches, one tensor
  ``states.<i>`` ``(n, D_i)`` per layer ``i`` (in the detector's compute dtype) and
  ``labels`` ``(n,)`` int64. A shard is written once its states reach :data:`SHARD_BYTES`
  (and at the end), atomically (a temporary file, then a rename);
* ``manifest.json``: what the cache was written for (the model's class and a SHA-256
  digest of its ``state_dict`` names, dtypes, shapes and values, the layer specs and
  widths, the dtype, the per-sample input shape, the number of classes, the rank and the
  number of ranks), and the shards written so far: each shard's file, its SHA-256 and
  the sizes of the loader batches it holds, and whether the pass is complete. It is
  rewritten atomically after every shard, so it only ever names complete shards.

Opening an existing cache (:meth:`StateCache.open`) checks its manifest against the
detector (a cache of another model, layer set or dtype is refused with a ``ValueError``
naming what differs) and every listed shard's SHA-256 (a corrupted shard is refused).
A complete cache is reused without running the model; an incomplete one (an interrupted
first pass) is resumed: the loader batches it holds are read again but not run through
the model (their sizes and labels must match), and writing goes on from the next batch.
Later passes memory-map the shards (:meth:`StateCache.batches`): only the layer a pass
needs is read, and no shard is held in memory beyond the batch being used. Nothing is
ever unpickled: shards are safetensors files, the manifest is JSON.

Disk cost: ``N x D x itemsize`` bytes per layer (``N`` samples, ``D`` features), plus
``8 N`` for the labels.

:mod:`._streamed` decides when the cache is written and reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = ["SHARD_BYTES", "StateCache", "model_digest", "rank_folder"]

MANIFEST = "manifest.json"
FORMAT = "idefender-gpu/hidden-state-cache"
VERSION = 1
#: A shard is written once the states it buffers reach this many bytes.
SHARD_BYTES = 64 * 2**20
#: The manifest entries a cache must match, and how a mismatch is described.
_KEY_NAMES = {
    "model": "model",
    "layers": "layers",
    "dtype": "dtype",
    "rank": "rank",
    "world_size": "number of ranks",
}


def model_digest(model: nn.Module) -> str:
    """SHA-256 over the model's ``state_dict``: each tensor's name, dtype, shape and bytes,
    in name order (length-prefixed fields; one tensor on the host at a time)."""
    sha = hashlib.sha256()

    def put(data: Any, length: int | None = None) -> None:
        sha.update((len(data) if length is None else length).to_bytes(8, "little"))
        sha.update(data)

    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, Tensor):
            continue
        host = tensor.detach().to("cpu").contiguous()
        put(name.encode())
        put(str(host.dtype).encode())
        put(json.dumps(list(host.shape)).encode())
        raw = host.reshape(-1).view(torch.uint8).numpy()
        put(memoryview(raw), raw.nbytes)
    return sha.hexdigest()


def rank_folder(root: Path, rank: int | None, world_size: int | None) -> Path:
    """The folder of this process's cache: ``root`` in one process, else a per-rank subfolder."""
    return root if rank is None else root / f"rank-{rank}-of-{world_size}"


def _describe(value: Any) -> str:
    """A manifest entry in a message (a model as its class and a short digest)."""
    if isinstance(value, dict) and set(value) == {"class", "digest"}:
        return f"{value['class']} with state_dict digest {str(value['digest'])[:12]}..."
    return repr(value)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            sha.update(block)
    return sha.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a fresh file beside it and a rename."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class StateCache:
    """One process's cache folder: its manifest, the shards written so far, a write buffer.

    Build it with :meth:`open`. Attributes mirror the manifest: ``shards`` (list of
    ``{"file", "sha256", "batches"}``), ``complete``, and, once the first batch is known,
    ``input_shape``, ``n_classes`` and ``widths``.
    """

    def __init__(self, folder: Path, key: dict[str, Any], manifest: dict[str, Any] | None) -> None:
        self.folder = folder
        self.key = dict(key)
        manifest = manifest or {}
        self.shards: list[dict[str, Any]] = list(manifest.get("shards", []))
        self.complete = bool(manifest.get("complete", False))
        shape = manifest.get("input_shape")
        self.input_shape = None if shape is None else tuple(int(s) for s in shape)
        self.n_classes = manifest.get("n_classes")
        self.widths = manifest.get("widths")
        self._buffer: list[tuple[list[Tensor], Tensor]] = []
        self._buffered = 0

    # -- opening -------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: Any, key: dict[str, Any]) -> "StateCache":
        """The cache in ``folder`` (created if missing), checked against ``key``.

        ``key`` holds ``model`` (``{"class", "digest"}``), ``layers`` (spec strings),
        ``dtype`` (its name), ``rank`` and ``world_size`` (None in one process).

        Raises
        ------
        ValueError
            If ``folder`` is a file, or holds a manifest that is not a cache manifest, of another
            version, written for another model, layer set, dtype or rank, or listing a
            shard that is missing or fails its SHA-256 check.
        """
        folder = Path(folder)
        where = repr(str(folder))
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"cache must be a folder (made if missing); got {where}, which is a file")
        path = folder / MANIFEST
        if not path.exists():  # a fresh cache: the folder is made when the first shard is written
            return cls(folder, key, None)
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cache {where} has an unreadable {MANIFEST} ({exc}); delete the folder "
                             "or give another cache folder") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"cache {where} is not an idefender-gpu hidden-state cache: its {MANIFEST} "
                             f"must have format={FORMAT!r}")
        if manifest.get("format_version") != VERSION:
            raise ValueError(f"cache {where} has format version {manifest.get('format_version')!r}; this "
                             f"idefender-gpu reads version {VERSION}: delete the folder to rebuild it")
        for name, what in _KEY_NAMES.items():
            if manifest.get(name) != key[name]:
                raise ValueError(
                    f"cache {where} was written for another {what}: {_describe(manifest.get(name))} in the "
                    f"cache, {_describe(key[name])} for this detector; give another cache folder, or delete "
                    "this one to rebuild it"
                )
        cache = cls(folder, key, manifest)
        for shard in cache.shards:
            file = folder / shard["file"]
            if not file.exists():
                raise ValueError(f"cache {where} is missing its shard {shard['file']!r}; delete the "
                                 "folder to rebuild it")
            if _file_sha256(file) != shard["sha256"]:
                raise ValueError(
                    f"cache {where}: shard {shard['file']!r} failed its SHA-256 check (the file was "
                    "modified or corrupted); delete the folder to rebuild it"
                )
        return cache

    # -- what it holds -------------------------------------------------------------------

    @property
    def batch_sizes(self) -> list[int]:
        """The sizes of the loader batches the written shards hold, in order."""
        return [n for shard in self.shards for n in shard["batches"]]

    def labels(self) -> list[Tensor]:
        """The labels of every written batch (CPU int64), in order."""
        return [labels for _, labels in self.batches(())]

    def check_first_batch(self, input_shape: tuple[int, ...], n_classes: int, widths: Sequence[int]) -> None:
        """Set (fresh cache) or compare (resumed cache) what the first batch tells."""
        if self.input_shape is None:
            self.input_shape, self.n_classes, self.widths = tuple(input_shape), int(n_classes), list(widths)
            return
        got = (tuple(input_shape), int(n_classes), list(widths))
        if got != (self.input_shape, self.n_classes, self.widths):
            raise ValueError(
                f"cache {str(self.folder)!r} holds inputs of per-sample shape {self.input_shape}, "
                f"{self.n_classes} classes and layer widths {self.widths}; this loader and model give "
                f"{got[0]}, {got[1]} and {got[2]}: give another cache folder, or delete this one"
            )

    # -- writing -------------------------------------------------------------------------

    def add(self, states: Sequence[Tensor], labels: Tensor) -> None:
        """Buffer one loader batch (``states`` per layer ``(B, D_i)``, ``labels (B,)``);
        write a shard once the buffer reaches :data:`SHARD_BYTES`."""
        host = [h.detach().to("cpu") for h in states]
        self._buffer.append((host, labels.detach().to(device="cpu", dtype=torch.int64)))
        self._buffered += sum(h.numel() * h.element_size() for h in host)
        if self._buffered >= SHARD_BYTES:
            self._flush()

    def finish(self) -> None:
        """Write the last shard and mark the cache complete."""
        self._flush()
        self.complete = True
        self._write_manifest()

    def _flush(self) -> None:
        if not self._buffer:
            return
        buffer, self._buffer, self._buffered = self._buffer, [], 0
        sizes = [int(labels.shape[0]) for _, labels in buffer]
        tensors = {"labels": torch.cat([labels for _, labels in buffer])}
        for i in range(len(buffer[0][0])):  # one layer at a time: the buffer's parts go as they are joined
            tensors[f"states.{i}"] = torch.cat([states[i] for states, _ in buffer])
            for states, _ in buffer:
                states[i] = None
        del buffer
        name = f"shard-{len(self.shards):06d}.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / name
        tmp = path.with_name(f"{name}.{uuid.uuid4().hex[:12]}.tmp")
        try:  # written from the tensors (no bytes copy), hashed from the file, then renamed
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
            sha256 = _file_sha256(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.shards.append({"file": name, "sha256": sha256, "batches": sizes})
        self._write_manifest()

    def _write_manifest(self) -> None:
        manifest = {"format": FORMAT, "format_version": VERSION, **self.key,
                    "input_shape": None if self.input_shape is None else list(self.input_shape),
                    "n_classes": self.n_classes, "widths": self.widths,
                    "n_samples": sum(self.batch_sizes), "complete": self.complete, "shards": self.shards}
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())

    # -- reading -------------------------------------------------------------------------

    def batches(self, layers: Sequence[int]) -> Iterator[tuple[list[Tensor], Tensor]]:
        """The written loader batches, in order: ``([states of each layer in layers], labels)``.

        The shards are memory-mapped; the states are views of the map (CPU, the cache's
        dtype), valid while referenced.
        """
        for shard in self.shards:
            path = self.folder / shard["file"]
            sizes = shard["batches"]
            n = sum(sizes)
            try:
                with safe_open(str(path), framework="pt") as handle:
                    labels = handle.get_tensor("labels")
                    states = [handle.get_tensor(f"states.{i}") for i in layers]
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"cache {str(self.folder)!r}: shard {shard['file']!r} cannot be read "
                                 f"({exc}); delete the folder to rebuild it") from None
            widths = [self.widths[i] for i in layers]
            if tuple(labels.shape) != (n,) or [tuple(h.shape) for h in states] != [(n, w) for w in widths]:
                raise ValueError(f"cache {str(self.folder)!r}: shard {shard['file']!r} does not hold the "
                                 "shapes its manifest lists; delete the folder to rebuild it")
            start = 0
            for size in sizes:
                yield [h[start:start + size] for h in states], labels[start:start + size]
                start += size

