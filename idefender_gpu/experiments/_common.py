"""Helpers shared by the experiments (private): devices, batches, progress, phase timing, paths.

Every experiment (``blackbox`` today; ``semi-whitebox``, ``graybox``, ``adaptive`` later)
checks its device with :func:`check_device` before any work, shows tqdm bars through
:func:`progress_bar` (on a terminal, or when asked) and times its phases with
:class:`PhaseTimer`, which also logs one line when a phase starts and one with its
elapsed seconds when it ends (logger ``idefender_gpu.experiments``: the command prints
these on stderr, so a run without a terminal is never silent). :func:`display_path`
writes paths into results files without the temporary or private folders of the machine
that made them.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from numbers import Integral, Real
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

import idefender_gpu
from idefender_gpu._param_validation import InstanceOf, Interval, Options, Predicate
from idefender_gpu.data import DATASETS, cache_dir
from idefender_gpu.metrics import roc_auc_score, roc_curve, tpr_at_fpr

__all__ = ["PhaseTimer", "batches", "check_device", "craft", "detection", "display_path", "finish", "load_average",
           "logger", "machine_info", "progress_bar", "rate", "roc"]

logger = logging.getLogger("idefender_gpu.experiments")


def check_device(device: Any) -> torch.device:
    """``torch.device(device)`` if this machine has it; else a ``ValueError`` that says why.

    Parameters
    ----------
    device : str or torch.device
        ``'cpu'``, ``'cuda'``, ``'cuda:1'``, ``'mps'``, ...

    Returns
    -------
    device : torch.device

    Raises
    ------
    ValueError
        For a string that names no torch device type (``'tpu'``), or a device this
        machine does not have (``'cuda'`` without CUDA, ``'cuda:3'`` with two GPUs).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1'; got {device!r}") \
            from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else f"torch is built with CUDA {torch.version.cuda} but sees no GPU")
            raise ValueError(f"device {str(device)!r} is not available: {why}; use device 'cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r} is not available: this machine has {count} CUDA "
                             f"device(s), cuda:0 to cuda:{count - 1}")
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and available():
        return dev
    raise ValueError(f"device {str(device)!r} is not available on this machine; use device 'cpu'"
                     + (" or 'cuda'" if torch.cuda.is_available() else ""))


def batches(n: int, batch_size: int) -> list[slice]:
    """Slices of ``range(n)`` of at most ``batch_size`` each."""
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def progress_bar(iterable: Iterable, desc: str, progress: bool | None, total: int | None = None,
                 unit: str = "batch") -> Iterable:
    """A tqdm bar (``progress`` None: only when stderr is a terminal)."""
    return tqdm(iterable, desc=desc, total=total, disable=None if progress is None else not progress,
                leave=False, unit=unit)


def craft(attack: Callable, x: Tensor, y: Tensor, batch_size: int, device: torch.device,
           desc: str, progress: bool | None) -> Tensor:
    """Adversarial versions of ``x`` batch by batch, on ``device`` (returned on ``device``)."""
    parts = []
    for sl in progress_bar(batches(x.shape[0], batch_size), desc, progress):
        parts.append(attack(x[sl].to(device), y[sl].to(device)))
    return torch.cat(parts)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Wall-clock seconds per named phase, accumulated (CUDA synchronised at both ends).

    ``with timer("train", "model F")`` logs ``model F ...`` when it starts and
    ``model F: 12.3 s`` when it ends (INFO, logger ``idefender_gpu.experiments``) and adds
    the seconds to ``timer.seconds["train"]``; ``label=False`` times without logging.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.load_at_start = load_average()  # the machine's load when the run began

    @contextmanager
    def __call__(self, name: str, label: str | bool | None = None) -> Iterator[None]:
        text = name if label is None or label is True else label
        if label is not False:
            logger.info("%s ...", text)
        _synchronize(self.device)
        start = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        finally:
            _synchronize(self.device)
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            if label is not False and not failed:
                logger.info("%s: %.1f s", text, elapsed)


def display_path(path: Any) -> str | None:
    """``path`` as results files record it: never a temporary or private folder of this machine.

    A Debian dataset folder keeps its absolute path and names its package; a path under the
    cache folder is written ``<cache>/...``; one under the working folder, relative to it;
    one under the home folder, ``~/...``; any other only by its last name, ``<elsewhere>/name``.
    """
    if path is None:
        return None
    if str(path).startswith("stand-in:"):  # a stand-in dataset's source: no file
        return str(path)
    path = Path(os.path.abspath(Path(path).expanduser()))
    for spec in DATASETS.values():
        debian = Path(spec.debian_dir)
        if path == debian or debian in path.parents:
            package = f"Debian package {spec.debian_package}" if spec.debian_package else "Debian folder"
            return f"{path} ({package})"
    anchors = ((Path(os.path.abspath(cache_dir())), "<cache>/"), (Path.cwd(), ""), (Path.home(), "~/"))
    for anchor, prefix in anchors:
        if anchor == Path(anchor.anchor):  # a working or home folder at the root: no anchor
            continue
        if path == anchor:
            return prefix.rstrip("/") or "."
        if anchor in path.parents:
            return prefix + str(path.relative_to(anchor))
    return f"<elsewhere>/{path.name}"


# --------------------------------------------------------------------------------------
# Scores and records
# --------------------------------------------------------------------------------------


def detection(natural: Tensor, adversarial: Tensor) -> tuple[float | None, float | None]:
    """``(AUC, TPR at 5% FPR)`` of ``-score`` with adversarial inputs as positives."""
    if adversarial.numel() == 0:
        return None, None
    scores = torch.cat([-natural, -adversarial])
    labels = torch.cat([torch.zeros(natural.numel()), torch.ones(adversarial.numel())])
    return float(roc_auc_score(scores, labels)), float(tpr_at_fpr(scores, labels, 0.05))


def roc(natural: Tensor, adversarial: Tensor) -> tuple[list[float], list[float]] | None:
    """The ROC curve ``(fpr, tpr)`` of ``-score``, adversarial inputs as positives (None if none)."""
    if adversarial.numel() == 0:
        return None
    scores = torch.cat([-natural, -adversarial])
    labels = torch.cat([torch.zeros(natural.numel()), torch.ones(adversarial.numel())])
    fpr, tpr, _ = roc_curve(scores, labels)
    return fpr.tolist(), tpr.tolist()


def rate(mask: Tensor) -> float | None:
    """The fraction of true values of ``mask`` (None when it is empty)."""
    return float(mask.double().mean()) if mask.numel() else None


def load_average() -> list[float] | None:
    """The machine's load average over 1, 5 and 15 minutes (``uptime``'s), None where the
    platform has none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device, timer: "PhaseTimer | None" = None) -> dict[str, Any]:
    """What results files record about the machine: device, versions, platform, threads, and
    its load average now (``load_average``) and, given the run's ``timer``, when it began
    (``load_average_start``): timings from a loaded machine are not benchmarks."""
    info = {"device": str(device), "torch": torch.__version__, "idefender_gpu": idefender_gpu.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average": load_average()}
    if timer is not None:
        info["load_average_start"] = timer.load_at_start
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def finish(results: dict[str, Any], timer: PhaseTimer, start: float) -> dict[str, Any]:
    """Close a run's results: ``timings`` (each phase and the total since ``start``, a
    ``time.perf_counter()``) and the machine's load at the start and now (``machine``)."""
    results["timings"] = {**{k: round(v, 2) for k, v in timer.seconds.items()},
                          "total": round(time.perf_counter() - start, 2)}
    machine = results.setdefault("machine", machine_info(timer.device))
    machine["load_average_start"], machine["load_average"] = timer.load_at_start, load_average()
    return results


def load_checked(config: Any) -> Any:
    """The dataset of ``config`` (a stand-in one for ``config.stand_in``) with ``n_train``/``n_test`` checked against it and applied, and
    every class holding at least ``max(2, n_components)`` training images (before any training)."""
    from idefender_gpu.data import load_dataset, stand_in_dataset

    if getattr(config, "stand_in", False):  # seeded random images of the real shapes, of the requested sizes
        data = stand_in_dataset(config.dataset, n_train=config.n_train, n_test=config.n_test, seed=config.seed)
    else:
        data = load_dataset(config.dataset, config.data, download=config.download, wording="command")
    for name, option, split, requested, available in (
            ("n_train", "--n-train", "training", config.n_train, data.x_train.shape[0]),
            ("n_test", "--n-test", "test", config.n_test, data.x_test.shape[0])):
        if requested is not None and requested > available:
            raise ValueError(f"{name} ({option}) must be at most {available}, the number of {split} "
                             f"images of {data.name} in {data.source}; got {requested}")
    data = data.subset(config.n_train, config.n_test)
    counts = torch.bincount(data.y_train, minlength=data.n_classes)  # (n_classes,)
    smallest = int(counts.argmin())
    if int(counts[smallest]) < max(config.n_components, 2):
        raise ValueError(f"every class needs at least max(2, n_components (--components)) = "
                         f"{max(config.n_components, 2)} training images for its mixture; class {smallest} "
                         f"({data.classes[smallest]}) has {int(counts[smallest])} of the {len(data.y_train)} "
                         f"in use (raise --n-train or lower --components)")
    return data


#: The settings every experiment config shares, and what they accept (``_parameter_constraints``).
CONFIG_CONSTRAINTS: dict[str, list] = {
    "dataset": [Options(str, set(DATASETS))],
    "data": [None, InstanceOf(str, os.PathLike)],
    "seed": [Interval(Integral, 0, None)],
    "epochs": [Interval(Integral, 1, None)],
    "device": [InstanceOf(str, torch.device)],
    "progress": [None, "boolean"],
    "download": ["boolean"],
    "cache": [None, InstanceOf(str, os.PathLike)],
    "layers": [Predicate(lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                         and all(isinstance(x, str) for x in v), "a non-empty tuple of str")],
    "n_components": [Interval(Integral, 1, None)],
    "covariance_type": [Options(str, {"full", "tied", "diag", "spherical"})],
    "reg_covar": [Interval(Real, 0.0, None, closed="left")],
    "batch_size": [Interval(Integral, 1, None)],
    "memory_budget": [None, Interval(Integral, 1, None)],
}
