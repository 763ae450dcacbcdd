"""MNIST and Fashion-MNIST from local IDX files first, torchvision's download last (private:
the public names live in :mod:`idefender_gpu.data`).

The four IDX files of either dataset (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``; the dotted
spelling ``train-images.idx3-ubyte`` is accepted too) are looked for in ONE place when the
user names one, else in the system's places:

1. the ``root`` argument (the command's ``--data DIR``), if given: only there;
2. else the folder named by the environment variable ``$IDEFENDER_DATA``, if set: only there;
3. else Debian's packages: ``/usr/share/datasets/fashion-mnist`` (``apt-get install
   dataset-fashion-mnist``) and ``/usr/share/datasets/mnist``, then the download cache
   ``$IDEFENDER_CACHE/data`` (default ``~/.cache/idefender-gpu/data``).

A folder the user names is used or refused (:class:`DatasetNotFoundError`), never silently
replaced by another one. Each folder is searched as is, under the dataset's name
(``fashion-mnist``, ``FashionMNIST``, ...) and in torchvision's layout
(``<folder>/FashionMNIST/raw``, ``<folder>/MNIST/raw``), so a torchvision data root works
unchanged. Files are parsed with NumPy (:func:`read_idx`); nothing is unpickled. Only when
no folder is named, nothing is found and ``download=True`` does torchvision download the
files (into the cache folder; a failed download leaves nothing behind). Otherwise
:class:`DatasetNotFoundError` says what was missing, lists every folder it looked in and how
to get the data, in the words of the Python API or of the command (``wording=``).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

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

#: IDX type codes (third byte of the magic number) -> big-endian NumPy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: split -> (images stem, labels stem), in the MNIST naming
_SPLITS = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}


@dataclass(frozen=True)
class _Spec:
    """Where one dataset can live and how to get it."""

    name: str
    #: sub-folder names tried under every search folder (the first is the canonical one)
    folders: tuple[str, ...]
    #: Debian's package folder
    debian_dir: str
    #: apt package providing it, if any
    debian_package: str | None
    #: torchvision dataset class name (also its folder name in torchvision's layout)
    torchvision_class: str
    #: class names, label order
    classes: tuple[str, ...]


#: The IDX datasets (MNIST family) known to :func:`load_dataset`, by canonical name.
DATASETS: dict[str, _Spec] = {
    "fashion-mnist": _Spec(
        "fashion-mnist", ("fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw"),
        "/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist", "FashionMNIST",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
         "Ankle boot"),
    ),
    "mnist": _Spec(
        "mnist", ("mnist", "MNIST", "MNIST/raw"), "/usr/share/datasets/mnist", None, "MNIST",
        tuple(str(digit) for digit in range(10)),
    ),
}

_ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist",
            "f-mnist": "fashion-mnist"}


# --------------------------------------------------------------------------------------
# IDX parsing
# --------------------------------------------------------------------------------------


def read_idx(path: Any) -> np.ndarray:
    """Parse one IDX file (optionally gzip-compressed) into a NumPy array.

    The IDX format (LeCun's MNIST page): a magic number ``0x00 0x00 <type> <ndim>``, then
    ``ndim`` big-endian uint32 sizes, then the values, big-endian, C order. Compression is
    recognised from the gzip magic bytes, not the file name.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    array : ndarray of shape (size_0, ..., size_{ndim-1})
        uint8 for image and label files; other IDX types in their native-endian dtype.

    Raises
    ------
    ValueError
        If the file is not IDX (bad magic, unknown type code) or its length does not match
        the sizes in its header (truncated or padded).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{str(path)!r} is not a valid gzip-compressed IDX file: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{str(path)!r} is not an IDX file: it must start with the magic bytes 0x00 0x00 "
            f"<type in {sorted(hex(c) for c in _IDX_DTYPES)}> <ndim>; got {raw[:4].hex(' ') or 'nothing'}"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{str(path)!r} is truncated: its header needs {header} bytes; got {len(raw)}")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{str(path)!r} has {len(raw)} bytes but its header (shape {shape}, {dtype.name}) "
            f"implies {expected}: the file is truncated or corrupted"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------


def _canonical(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dataset must be a str; got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}; got {name!r}")
    return key


def search_dirs(name: str, root: Any = None) -> list[Path]:
    """The folders :func:`find_dataset` looks in for ``name``, in order (existing or not).

    Parameters
    ----------
    name : {'fashion-mnist', 'mnist'}
    root : str or os.PathLike, optional
        A folder given by the user (``--data``): when given, only it (as is, under the
        dataset's names and in torchvision's layout) is searched. Else ``$IDEFENDER_DATA``
        when set (only it); else Debian's folder and the download cache.

    Returns
    -------
    dirs : list of Path
    """
    spec = DATASETS[_canonical(name)]
    named = _named_folder(root)
    if named is not None:
        base = named[0]
        dirs = [base, *(base / folder for folder in spec.folders)]
    else:
        dirs = [Path(spec.debian_dir), cache_dir() / "data" / spec.torchvision_class / "raw"]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _idx_file(folder: Path, stem: str, kind: str) -> Path | None:
    """``folder/stem-idx?-ubyte[.gz]`` (or the dotted ``stem.idx?-ubyte``), if present."""
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            candidate = folder / f"{stem}{sep}{kind}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _files_in(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder``, or None if any is missing."""
    files = {}
    for split, (images, labels) in _SPLITS.items():
        image_file, label_file = _idx_file(folder, images, "idx3"), _idx_file(folder, labels, "idx1")
        if image_file is None or label_file is None:
            return None
        files[f"{split}_images"], files[f"{split}_labels"] = image_file, label_file
    return files


_FILE_NAMES = ("train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
               "t10k-labels-idx1-ubyte.gz")


def _how_to_get(spec: _Spec, words: dict[str, str]) -> str:
    ways = []
    if spec.debian_package:
        ways.append(f"on Debian/Ubuntu: sudo apt-get install {spec.debian_package} (files land in "
                    f"{spec.debian_dir})")
    ways.append(f"put the four IDX files ({_FILE_NAMES}) in a folder DIR and pass {words['root']} or set "
                f"{words['env']}=DIR")
    ways.append(f"with internet access and torchvision installed, and no folder named: {words['download']}, "
                f"and torchvision.datasets.{spec.torchvision_class} downloads them into {cache_dir() / 'data'}")
    return "\n".join(f"  ({i}) {way}" for i, way in enumerate(ways, 1))


def _not_found_message(spec: _Spec, root: Any, words: dict[str, str]) -> str:
    """The whole not-found text; its first line says what is missing (and where)."""
    first = _not_found_first_line(spec.name, root, words, "IDX files")
    looked = "\n".join(f"  - {d}" for d in search_dirs(spec.name, root))
    return f"{first}\nLooked in:\n{looked}\nTo get them:\n{_how_to_get(spec, words)}"


def find_files(name: str, root: Any = None, *, wording: str = "python") -> dict[str, Path]:
    """Locate the four IDX files of ``name`` (no download).

    Parameters
    ----------
    name : {'fashion-mnist', 'mnist'}
    root : str or os.PathLike, optional
        The only folder searched when given (see the module docstring for the order).
    wording : {'python', 'command'}, default='python'
        How the not-found message names the options: the Python arguments (``root=DIR``,
        ``download=True``) or the ``idefender-gpu`` command's (``--data DIR``,
        ``--no-download``).

    Returns
    -------
    files : dict
        ``{"train_images", "train_labels", "test_images", "test_labels"} -> Path``.

    Raises
    ------
    DatasetNotFoundError
        Its first line says what is missing (and which named folder lacks it), then every
        folder searched and the ways to get the files.
    """
    spec = DATASETS[_canonical(name)]
    words = _check_wording(wording)
    for folder in search_dirs(spec.name, root):
        files = _files_in(folder)
        if files is not None:
            return files
    raise DatasetNotFoundError(_not_found_message(spec, root, words))


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _download(spec: _Spec) -> Path:
    """torchvision's download of both splits into the cache; returns the raw folder.

    The files go to a temporary folder first and are moved into place only when both
    splits are complete: a failed download leaves no file and no new folder behind.
    """
    try:
        import torchvision
    except ImportError as exc:  # the caller reports it after the not-found help
        raise ImportError(f"torchvision is not installed (pip install the torchvision release that "
                          f"matches torch {torch.__version__})") from exc

    root = cache_dir() / "data"
    top = _new_top(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-download-", dir=root))
    try:
        dataset_cls = getattr(torchvision.datasets, spec.torchvision_class)
        for train in (True, False):
            dataset_cls(str(tmp), train=train, download=True)
        fetched = tmp / spec.torchvision_class / "raw"
        if _files_in(fetched) is None:
            raise RuntimeError(f"torchvision's download did not leave the four IDX files in {fetched}")
        raw = root / spec.torchvision_class / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for path in fetched.iterdir():
            os.replace(path, raw / path.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty_dirs(root, top)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return raw


def _check_pair(images: np.ndarray, labels: np.ndarray, what: str, n_classes: int) -> None:
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{what} images must be a uint8 IDX array of shape (N, H, W); got shape "
                         f"{images.shape}, dtype {images.dtype}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{what} labels must have shape ({images.shape[0]},) to match the images; got "
                         f"{labels.shape}")
    if labels.size and int(labels.max()) >= n_classes:
        raise ValueError(f"{what} labels must be in [0, {n_classes}); got {int(labels.max())}")


def load(name: str, root: Any = None, *, download: bool = False, wording: str = "python") -> Dataset:
    """Load MNIST or Fashion-MNIST from local IDX files (or torchvision's download).

    Parameters
    ----------
    name : {'fashion-mnist', 'mnist'}
        Also accepted: 'fmnist', 'fashion_mnist', 'FashionMNIST' (case-insensitive).
    root : str or os.PathLike, optional
        The folder holding the files; when given it is the only one searched (and never
        replaced by a download). See the module docstring for the whole search order.
    download : bool, default=False
        When no folder is named (no ``root``, no ``$IDEFENDER_DATA``) and no local files
        are found, download them with torchvision into ``cache_dir() / 'data'``. Tests and
        CI never download.
    wording : {'python', 'command'}, default='python'
        How the not-found message names the options (see :func:`find_dataset`).

    Returns
    -------
    Dataset

    Raises
    ------
    DatasetNotFoundError
        When the files are not found (and not downloaded: ``download`` off, a folder named,
        or the download failed). The first line says what is missing; then the folders
        searched, how to get the data, and why a download failed.
    ValueError
        When a file is not a valid IDX file or the images and labels disagree.
    """
    spec = DATASETS[_canonical(name)]
    _check_wording(wording)
    try:
        files = find_files(spec.name, root, wording=wording)
    except DatasetNotFoundError as not_found:
        if not download or _named_folder(root) is not None:
            raise
        try:
            _download(spec)
        except Exception as exc:  # no torchvision, no network, a broken mirror: say so after the help
            raise DatasetNotFoundError(_download_failed(not_found, exc)) from exc
        files = find_files(spec.name, root, wording=wording)
    sha = hashlib.sha256()
    arrays = {}
    for key in ("train_images", "train_labels", "test_images", "test_labels"):
        arrays[key] = read_idx(files[key])
        sha.update(key.encode())
        sha.update(np.ascontiguousarray(arrays[key]).tobytes())
    for split in ("train", "test"):
        _check_pair(arrays[f"{split}_images"], arrays[f"{split}_labels"], f"{spec.name} {split}",
                    len(spec.classes))

    def images(array: np.ndarray) -> Tensor:
        return torch.from_numpy(array).to(torch.float32).div_(255.0).unsqueeze(1)  # (N, 1, H, W)

    def labels(array: np.ndarray) -> Tensor:
        return torch.from_numpy(array.astype(np.int64))  # (N,)

    return Dataset(
        name=spec.name,
        x_train=images(arrays["train_images"]), y_train=labels(arrays["train_labels"]),
        x_test=images(arrays["test_images"]), y_test=labels(arrays["test_labels"]),
        classes=spec.classes, source=files["train_images"].parent, sha256=sha.hexdigest(),
    )
