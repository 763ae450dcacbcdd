"""The public entry points over every in-memory dataset (private: re-exported by
:mod:`idefender_gpu.data`).

One dispatch table maps each canonical name to the module that reads it; every reader module
offers the same three functions, ``search_dirs(name, root)``, ``find_files(name, root, *,
wording)`` and ``load(name, root, *, download, wording)``. A new dataset is one reader module
plus one entry here.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from idefender_gpu.data import _cifar, _idx
from idefender_gpu.data._common import Dataset, _check_wording


#: Every name :func:`load_dataset` loads (canonical spelling), e.g. for a command's ``--dataset``
#: choices; ImageNet is a folder (:func:`~idefender_gpu.data.imagenet_folder`), not in memory.
DATASET_NAMES: tuple[str, ...] = tuple(sorted({*_idx.DATASETS, *_cifar.CIFAR_CLASSES}))


def _readers() -> dict[str, ModuleType]:
    """Canonical name -> reader module (built on each call: tests patch ``DATASETS``)."""
    return {**{name: _idx for name in _idx.DATASETS}, **{name: _cifar for name in _cifar.CIFAR_CLASSES}}


def _canonical(name: Any) -> tuple[str, ModuleType]:
    """``name``'s canonical spelling (aliases, any case) and its reader module."""
    if not isinstance(name, str):
        raise TypeError(f"dataset must be a str; got {type(name).__name__}")
    readers = _readers()
    key = {**_idx._ALIASES, **_cifar.ALIASES}.get(name.lower(), name.lower())
    if key not in readers:
        raise ValueError(f"dataset must be one of {sorted(readers)}; got {name!r}")
    return key, readers[key]


def search_dirs(name: str, root: Any = None) -> list[Path]:
    """The folders :func:`find_dataset` looks in for ``name``, in order (existing or not).

    Parameters
    ----------
    name : {'fashion-mnist', 'mnist', 'cifar10'}
    root : str or os.PathLike, optional
        A folder given by the user (``--data``): when given, only it (as is, under the
        dataset's names and in torchvision's layout) is searched. Else ``$IDEFENDER_DATA``
        when set (only it); else the system's folders (Debian's, for the MNIST family) and
        the download cache.

    Returns
    -------
    dirs : list of Path
    """
    key, reader = _canonical(name)
    return reader.search_dirs(key, root)


def find_dataset(name: str, root: Any = None, *, wording: str = "python") -> dict[str, Path]:
    """Locate the files of ``name`` (no download).

    Parameters
    ----------
    name : {'fashion-mnist', 'mnist', 'cifar10'}
    root : str or os.PathLike, optional
        The only folder searched when given (see the package docstring for the order).
    wording : {'python', 'command'}, default='python'
        How the not-found message names the options: the Python arguments (``root=DIR``,
        ``download=True``) or the ``idefender-gpu`` command's (``--data DIR``,
        ``--no-download``).

    Returns
    -------
    files : dict
        For the MNIST family ``{"train_images", "train_labels", "test_images",
        "test_labels"} -> Path``; for CIFAR-10 each batch file's name
        (``"data_batch_1.bin"`` ... ``"test_batch.bin"``) -> Path.

    Raises
    ------
    DatasetNotFoundError
        Its first line says what is missing (and which named folder lacks it), then every
        folder searched and the ways to get the files.
    """
    key, reader = _canonical(name)
    return reader.find_files(key, root, wording=wording)


def load_dataset(name: str, root: Any = None, *, download: bool = False, wording: str = "python") -> Dataset:
    """Load MNIST, Fashion-MNIST or CIFAR-10 from local files (or torchvision's download).

    Parameters
    ----------
    name : {'fashion-mnist', 'mnist', 'cifar10'}
        Also accepted (case-insensitive): 'fmnist', 'fashion_mnist', 'FashionMNIST';
        'cifar-10', 'CIFAR10'.
    root : str or os.PathLike, optional
        The folder holding the files; when given it is the only one searched (and never
        replaced by a download). See the package docstring for the whole search order.
    download : bool, default=False
        When no folder is named (no ``root``, no ``$IDEFENDER_DATA``) and no local files
        are found, download them with torchvision into ``cache_dir() / 'data'`` (CIFAR-10:
        the binary tarball, md5-checked). Tests and CI never download.
    wording : {'python', 'command'}, default='python'
        How the not-found message names the options (see :func:`find_dataset`).

    Returns
    -------
    Dataset
        Images float32 in ``[0, 1]``: (N, 1, 28, 28) for the MNIST family (60000 / 10000),
        (N, 3, 32, 32) for CIFAR-10 (50000 / 10000); labels int64.

    Raises
    ------
    DatasetNotFoundError
        When the files are not found (and not downloaded: ``download`` off, a folder named,
        or the download failed). The first line says what is missing; then the folders
        searched, the files expected, how to get the data, and why a download failed.
    ValueError
        When a file is malformed: not a valid IDX file, images and labels that disagree, a
        CIFAR-10 batch whose size is not a multiple of 3073 bytes or with a label out of range.
    """
    key, reader = _canonical(name)
    _check_wording(wording)
    return reader.load(key, root, download=download, wording=wording)
