"""CIFAR-10 from its binary version, parsed with NumPy (private: the public names live in
:mod:`idefender_gpu.data`).

The binary version (``cifar-10-binary.tar.gz`` from https://www.cs.toronto.edu/~kriz/cifar.html)
unpacks into ``cifar-10-batches-bin/``: ``data_batch_1.bin`` ... ``data_batch_5.bin`` (training)
and ``test_batch.bin``, each a run of 3073-byte records: one label byte (0-9), then the 32x32
image channel-major (1024 red, 1024 green, 1024 blue bytes, rows top to bottom).

torchvision's ``CIFAR10`` folder (``cifar-10-batches-py``) holds the *python* version: pickles.
Unpickling a file can run arbitrary code, and this project never unpickles, so that folder is
refused with a message naming the binary version's URL (a restricted unpickler would be a
second, riskier parser of the same data; the binary version is plain bytes and as easy to get).

Search order, as for Fashion-MNIST: the ``root`` argument (``--data DIR``) only, when given;
else ``$IDEFENDER_DATA`` only, when set; else the download cache ``cache_dir()/data``. Each
folder is searched as is, as ``<folder>/cifar-10-batches-bin``, ``<folder>/cifar10`` and
``<folder>/cifar10/cifar-10-batches-bin``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from idefender_gpu.data._common import (
    Dataset,
    _check_wording,
    _download_failed,
    _named_folder,
    _new_top,
    _not_found_first_line,
    _remove_empty_dirs,
    cache_dir,
)
from idefender_gpu.exceptions import DatasetNotFoundError

#: Canonical name -> class names (label order, from ``batches.meta.txt``).
CIFAR_CLASSES: dict[str, tuple[str, ...]] = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
ALIASES = {"cifar-10": "cifar10", "cifar_10": "cifar10"}

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
#: The folder the tarball unpacks into.
FOLDER = "cifar-10-batches-bin"
#: split -> its batch files, in order.
BATCHES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
RECORD = 1 + 3 * 32 * 32  # one label byte + the channel-major pixels
_PICKLED = "cifar-10-batches-py"


def read_cifar_batch(path: Any, n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Parse one batch file of CIFAR-10's binary version.

    Parameters
    ----------
    path : str or os.PathLike
        A ``data_batch_<i>.bin`` or ``test_batch.bin``: records of 1 label byte and 3072
        pixel bytes (channel-major).
    n_classes : int, default=10
        Labels must be in ``[0, n_classes)``.

    Returns
    -------
    images : ndarray of uint8, shape (N, 3, 32, 32)
    labels : ndarray of uint8, shape (N,)

    Raises
    ------
    ValueError
        When the file is empty, its size is not a multiple of 3073 bytes (truncated or not a
        binary batch: a pickle of the python version, say) or a label is out of range.
    """
    path = Path(path)
    return _parse_batch(path.read_bytes(), path, n_classes)


def _parse_batch(raw: bytes, path: Path, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`read_cifar_batch` on the bytes ``raw`` of ``path``."""
    if not raw or len(raw) % RECORD:
        raise ValueError(
            f"{str(path)!r} is not a CIFAR-10 binary batch: its size, {len(raw)} bytes, is not a positive "
            f"multiple of {RECORD} (1 label byte + 3072 pixel bytes per record); the file is truncated "
            f"or malformed")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)  # (N, 3073)
    labels = records[:, 0].copy()  # (N,)
    bad = np.flatnonzero(labels >= n_classes)
    if bad.size:
        raise ValueError(f"{str(path)!r} is malformed: record {int(bad[0])} has label {int(labels[bad[0]])}, "
                         f"outside [0, {n_classes})")
    images = records[:, 1:].reshape(-1, 3, 32, 32).copy()  # (N, 3, 32, 32)
    return images, labels


def search_dirs(name: str, root: Any = None) -> list[Path]:
    """The folders searched for ``name``'s batch files, in order (see the module docstring)."""
    named = _named_folder(root)
    bases = [named[0]] if named is not None else [cache_dir() / "data"]
    dirs: list[Path] = []
    for base in bases:
        for d in (base, base / FOLDER, base / name, base / name / FOLDER):
            if d not in dirs:
                dirs.append(d)
    return dirs


def _files_in(folder: Path) -> dict[str, Path] | None:
    """The six batch files in ``folder`` (file name -> path), or None if any is missing."""
    files = {n: folder / n for names in BATCHES.values() for n in names}
    return files if all(p.is_file() for p in files.values()) else None


def _pickled_copies(dirs: list[Path]) -> list[Path]:
    """Folders among (or just under) ``dirs`` that hold the pickled python version."""
    found: list[Path] = []
    for d in dirs:
        for candidate in (d, d / _PICKLED):
            if (candidate / "data_batch_1").is_file() and (candidate / "batches.meta").is_file() \
                    and candidate not in found:
                found.append(candidate)
    return found


def _not_found_message(name: str, root: Any, words: dict[str, str]) -> str:
    first = _not_found_first_line(name, root, words, "binary batch files")
    dirs = search_dirs(name, root)
    looked = "\n".join(f"  - {d}" for d in dirs)
    expected = ", ".join(n for names in BATCHES.values() for n in names)
    lines = [first, f"Looked in:\n{looked}",
             f"Expected the binary version's files: {expected} (CIFAR-10 binary version, {URL}, "
             f"unpacks into {FOLDER}/)"]
    for pickled in _pickled_copies(dirs):
        lines.append(f"Found the python version (pickles) in {pickled}: it is not read, because "
                     f"unpickling a file can run code and this project never unpickles; use the "
                     f"binary version instead")
    lines.append("To get them:\n"
                 f"  (1) download {URL} (md5 {MD5}), unpack it (tar xzf) in a folder DIR and pass "
                 f"{words['root']} or set {words['env']}=DIR\n"
                 f"  (2) with internet access and torchvision installed, and no folder named: "
                 f"{words['download']}, and torchvision's download_and_extract_archive fetches it into "
                 f"{cache_dir() / 'data' / FOLDER}")
    return "\n".join(lines)


def find_files(name: str, root: Any = None, *, wording: str = "python") -> dict[str, Path]:
    """The six batch files of ``name`` (file name -> path); no download.

    Raises
    ------
    DatasetNotFoundError
        Naming the folders searched, the files expected and how to get them.
    """
    words = _check_wording(wording)
    for folder in search_dirs(name, root):
        files = _files_in(folder)
        if files is not None:
            return files
    raise DatasetNotFoundError(_not_found_message(name, root, words))


def _fetch_archive(url: str, folder: Path, md5: str) -> None:
    """Download and unpack ``url`` into ``folder`` (torchvision's helper, md5-checked)."""
    try:
        from torchvision.datasets.utils import download_and_extract_archive
    except ImportError as exc:  # the caller reports it after the not-found help
        raise ImportError(f"torchvision is not installed (pip install the torchvision release that "
                          f"matches torch {torch.__version__})") from exc
    download_and_extract_archive(url, download_root=str(folder), md5=md5, remove_finished=True)


def _download(name: str) -> Path:
    """Fetch the binary tarball into ``cache_dir()/data/cifar-10-batches-bin``; returns it.

    The archive is unpacked in a temporary folder and its batch files are moved into place
    only when all six are there: a failed download leaves no file and no new folder behind.
    """
    root = cache_dir() / "data"
    top = _new_top(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-download-", dir=root))
    try:
        _fetch_archive(URL, tmp, MD5)
        fetched = tmp / FOLDER
        if _files_in(fetched) is None:
            raise RuntimeError(f"the archive did not unpack the six batch files into {fetched}")
        target = root / FOLDER
        target.mkdir(parents=True, exist_ok=True)
        for path in fetched.iterdir():
            os.replace(path, target / path.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty_dirs(root, top)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def load(name: str, root: Any = None, *, download: bool = False, wording: str = "python") -> Dataset:
    """Load CIFAR-10's binary batches (see :func:`idefender_gpu.data.load_dataset`)."""
    classes = CIFAR_CLASSES[name]
    _check_wording(wording)
    try:
        files = find_files(name, root, wording=wording)
    except DatasetNotFoundError as not_found:
        if not download or _named_folder(root) is not None:
            raise
        try:
            _download(name)
        except Exception as exc:  # no torchvision, no network, a bad checksum: say so after the help
            raise DatasetNotFoundError(_download_failed(not_found, exc)) from exc
        files = find_files(name, root, wording=wording)
    sha = hashlib.sha256()
    splits = {}
    for split, names in BATCHES.items():
        # one float32 buffer per split, filled batch by batch: the peak is the result plus one file
        n_total = sum(files[f].stat().st_size // RECORD for f in names)
        images = torch.empty((n_total, 3, 32, 32), dtype=torch.float32)  # (N, 3, 32, 32)
        labels = torch.empty((n_total,), dtype=torch.int64)  # (N,)
        start = 0
        for file_name in names:
            raw = files[file_name].read_bytes()
            sha.update(file_name.encode())
            sha.update(raw)
            batch_images, batch_labels = _parse_batch(raw, files[file_name], len(classes))
            if start + len(batch_labels) > n_total:
                raise ValueError(f"{str(files[file_name])!r} changed while it was read")
            stop = start + len(batch_labels)
            images[start:stop] = torch.from_numpy(batch_images)
            labels[start:stop] = torch.from_numpy(batch_labels)
            start = stop
        if start != n_total:
            raise ValueError(f"the {split} batches of {name} changed while they were read")
        splits[split] = (images.div_(255.0), labels)
    return Dataset(
        name=name, x_train=splits["train"][0], y_train=splits["train"][1],
        x_test=splits["test"][0], y_test=splits["test"][1], classes=classes,
        source=files[BATCHES["train"][0]].parent, sha256=sha.hexdigest(),
    )
