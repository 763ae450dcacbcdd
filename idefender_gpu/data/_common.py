"""What every dataset loader shares (private): the :class:`Dataset` record, the cache folder,
the folder the user names (``root`` / ``$IDEFENDER_DATA``), the not-found wording and the
clean-up and error text of a failed download."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

def cache_dir() -> Path:
    """The cache folder: ``$IDEFENDER_CACHE``, else ``$XDG_CACHE_HOME/idefender-gpu``, else
    ``~/.cache/idefender-gpu`` (checkpoints and downloads live under it)."""
    env = os.environ.get("IDEFENDER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "idefender-gpu"


#: How the not-found message names the ways to point at the data, per ``wording``.
_WORDS = {
    "python": {"root": "root=DIR", "env": "IDEFENDER_DATA", "download": "pass download=True"},
    "command": {"root": "--data DIR", "env": "IDEFENDER_DATA", "download": "run without --no-download"},
}


def _check_wording(wording: Any) -> dict[str, str]:
    if wording not in _WORDS:
        raise ValueError(f"wording must be one of {sorted(_WORDS)}; got {wording!r}")
    return _WORDS[wording]


def _named_folder(root: Any) -> tuple[Path, str] | None:
    """The folder the user named, and by which means (``'root'`` or ``'env'``), if any."""
    if root is not None:
        return Path(root).expanduser(), "root"
    env = os.environ.get("IDEFENDER_DATA")
    if env:
        return Path(env).expanduser(), "env"
    return None


def _not_found_first_line(name: str, root: Any, words: dict[str, str], files: str) -> str:
    """The first line of a not-found message: which ``files`` (e.g. ``'IDX files'``) of
    ``name`` are missing, and from the default folders or from the one the user named."""
    named = _named_folder(root)
    if named is None:
        return (f"{name}: the {files} were not found in the default folders (no {words['root']} "
                f"or {words['env']} given).")
    folder, how = named
    given = f"the folder given by {words['root']}" if how == "root" else \
        f"the folder named by {words['env']}"
    state = "does not exist" if not folder.exists() else (
        "is not a folder" if not folder.is_dir() else f"holds no {name} {files}")
    return f"{name}: {given}, {folder}, {state}."


@dataclass(frozen=True)
class Dataset:
    """A loaded image classification dataset, images in ``[0, 1]``.

    Attributes
    ----------
    name : str
        Canonical name (``'fashion-mnist'``, ``'mnist'``, ``'cifar10'``); a stand-in's
        name ends in ``'-stand-in'`` (``'cifar10-stand-in'``).
    x_train, x_test : Tensor of float32, shape (N, C, H, W)
        Pixel values divided by 255, in ``[0, 1]``: (N, 1, 28, 28) for the MNIST family,
        (N, 3, 32, 32) for CIFAR-10.
    y_train, y_test : Tensor of int64, shape (N,)
    classes : tuple of str
    source : Path
        Folder the files were read from (a stand-in: ``stand-in:<name>:seed=<seed>``, no
        real folder).
    sha256 : str
        SHA-256 over the raw pixel and label bytes of both splits (a content hash that does
        not depend on compression or file names); checkpoints are keyed by it.
    stand_in : bool, default=False
        True for the seeded random images of :func:`stand_in_dataset` (not a real dataset:
        reports built on it are not reproductions).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: tuple[str, ...]
    source: Path
    sha256: str = field(repr=False)
    stand_in: bool = False

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """The first ``n_train`` training and ``n_test`` test samples (None: all).

        The hash covers the subset (so cached models trained on it are keyed apart).
        """
        x_train, y_train = self.x_train[:n_train], self.y_train[:n_train]
        x_test, y_test = self.x_test[:n_test], self.y_test[:n_test]
        if n_train is None and n_test is None:
            return self
        sha = hashlib.sha256(f"{self.sha256}:{len(x_train)}:{len(x_test)}".encode()).hexdigest()
        return dataclasses.replace(self, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                                   sha256=sha)


def _remove_empty_dirs(leaf: Path, top: Path | None) -> None:
    """Remove ``leaf`` and its parents up to ``top`` (included) while they are empty."""
    if top is None:
        return
    folder = leaf
    while True:
        try:
            folder.rmdir()
        except OSError:  # not empty, or gone
            return
        if folder == top or folder.parent == folder:
            return
        folder = folder.parent


def _download_failed(not_found: Exception, exc: Exception) -> str:
    """The not-found text followed by one line saying why the download failed too."""
    reason = " ".join(str(exc).split())
    reason = reason if len(reason) <= 300 else reason[:297] + "..."
    return (f"{not_found}\nThe download with torchvision failed too: {type(exc).__name__}"
            + (f": {reason}" if reason else ""))


def _new_top(root: Path) -> Path | None:
    """The outermost folder of ``root`` (or its parents) that does not exist yet, if any: what a
    failed download must remove again."""
    return next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
