"""The protocols' data over loaders, for data sets too big to hold in memory: ImageNet (private).

ImageNet cannot live in memory (1.28M training images of 602 KB as float tensors), so its
protocols read it from disk through ``DataLoader``s (:class:`StreamedData`):

- the detectors' training data: ``imagenet_folder(ROOT, 'train', 'eval')`` (``--n-train N``: a
  seeded subset, read in index order), streamed twice by the detector's K=1 fit (moments,
  then thresholds) and once more for the training-data ID-99 thresholds (``--n-calibrate``);
- the val split, split once by :func:`split_val` (seeded, stratified): the held-out images
  that calibrate the thresholds (every class holds some: val is sorted by class, so "the last
  ``n_holdout``" would hold out a few classes only) and the evaluation images, in a seeded
  shuffled order, so "the first ``n_attack``" are a sample of every class;
- only the ``n_attack`` attacked images are tensors in memory (:meth:`StreamedData.attacked`);
  the natural evaluation images are scored through a loader.

The stand-in (``--stand-in``) is :func:`~idefender_gpu.data.stand_in_imagenet_folder` (few
classes, seeded PIL images through the real eval transform, smaller crops) on the same path.
The training-data ID-99 thresholds use a seeded stratified ``n_calibrate`` of the training
images (train/ is sorted by class too). Loaders use ``workers`` processes (default
``min(8, CPUs)``, 0 for the stand-in) and pinned memory on CUDA.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

__all__ = ["STAND_IN_IMAGE", "StreamedData", "default_workers", "load_streamed", "split_val"]

#: the stand-in's images: (crop, resize) through the real eval transform, and its class count
#: (a 224 x 224 crop would make the CPU stand-in run ten times slower, for no more coverage)
STAND_IN_IMAGE = {"size": 64, "resize": 73, "raw_size": (80, 100), "n_classes": 10}


def default_workers() -> int:
    """Loader processes when ``--workers`` is not given: ``min(8, CPUs available)``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return min(8, cpus)


def split_val(labels: Tensor, n_holdout: int, seed: int, n_test: int | None = None,
              n_classes: int | None = None, *, option: str = "n_holdout (--n-holdout)",
              what: str = "held-out calibration images") -> tuple[Tensor, Tensor]:
    """Split a labelled split into evaluation and held-out indices, seeded and stratified.

    Parameters
    ----------
    labels : Tensor of int64, shape (N,)
        The split's labels in file order (ImageNet's val: sorted by class).
    n_holdout : int
        Held-out images in all, shared among the classes in proportion to their counts
        (largest remainders first, ties to the lower class); every class needs one.
    seed : int
    n_test : int, optional
        Use only a seeded random ``n_test`` of the ``N`` images (default all).
    n_classes : int, optional
        Classes that must be held out (default ``labels.max() + 1``).
    option, what : str
        How messages name ``n_holdout`` and the held-out images (the same split draws the
        stratified calibration subset of the training images).

    Returns
    -------
    eval_idx : Tensor of int64, shape (N_eval,)
        The evaluation images in a seeded random order (the first ``n_attack`` are attacked).
    holdout_idx : Tensor of int64, shape (n_holdout,)
        The held-out images, sorted (read in file order).

    Raises
    ------
    ValueError
        When ``n_holdout`` leaves no evaluation image, or a class gets no held-out image.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64)
    n_classes = int(labels.max()) + 1 if n_classes is None else int(n_classes)
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(int(seed)))  # (N,)
    if n_test is not None:
        order = order[:n_test]
    n = order.numel()
    if n_holdout >= n:
        raise ValueError(f"{option} must be smaller than the {n} images in use (--n-test, --n-train): the "
                         f"rest is the evaluation set; got {n_holdout}")
    chosen = labels[order]  # (n,) labels in the seeded order
    counts = torch.bincount(chosen, minlength=n_classes)  # (C,)
    share = counts.double() * n_holdout / n  # (C,)
    quota = share.floor().long()  # (C,)
    left = n_holdout - int(quota.sum())
    if left > 0:  # largest remainders first; a stable sort keeps ties in class order
        quota[torch.sort(share - quota.double(), descending=True, stable=True).indices[:left]] += 1
    missing = (quota == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"the {what} ({option.split(' ')[0]} {n_holdout}, shared among the classes of the "
                         f"{n} images in use) must hold every class; classes {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} get none (raise {option.split(' ')[-1].strip('()')} "
                         f"to at least {n_classes}{', and --n-test' if n_test is not None else ''})")
    by_class = torch.sort(chosen * n + torch.arange(n), stable=True).indices  # (n,) class by class, seeded order
    start = torch.cumsum(counts, 0) - counts  # (C,) first position of each class
    rank = torch.empty(n, dtype=torch.int64)
    rank[by_class] = torch.arange(n) - start[chosen[by_class]]  # (n,) rank of each image within its class
    held = rank < quota[chosen]  # (n,)
    return order[~held], torch.sort(order[held]).values


@dataclass
class StreamedData:
    """A data set read through loaders: what the protocols use of a ``Dataset`` record, plus
    the loaders (``name``, ``classes``, ``source``, ``sha256``, ``stand_in`` as there)."""

    name: str
    classes: list[str]
    source: Any
    sha256: str
    stand_in: bool
    train: Any  # a torch Dataset of (image (3, H, W) in [0, 1], label), the training images in use
    val: Any  # the whole val split
    eval_idx: Tensor  # (N_eval,) into val, seeded order
    holdout_idx: Tensor  # (n_holdout,) into val, sorted
    calibrate_idx: Tensor  # (n_calibrate,) into train: a seeded stratified subset (every class)
    y_train: Tensor  # (N_train,) labels of the training images in use
    y_val: Tensor  # (N_val,) labels of the whole val split
    workers: int
    batch_size: int
    pin_memory: bool

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_train(self) -> int:
        return int(self.y_train.numel())

    def loader(self, which: str, count: int | None = None) -> DataLoader:
        """A fresh (re-iterable) loader of ``'train'``, ``'calibrate'`` (the training-data ID-99
        thresholds' images), ``'eval'`` or ``'holdout'`` images; ``count``: the first ``count`` only."""
        dataset, index = {"train": (self.train, None), "calibrate": (self.train, self.calibrate_idx),
                          "eval": (self.val, self.eval_idx), "holdout": (self.val, self.holdout_idx)}[which]
        if index is None:
            index = torch.arange(len(dataset))
        if count is not None:
            index = index[:count]
        return DataLoader(Subset(dataset, index.tolist()), batch_size=self.batch_size, shuffle=False,
                          num_workers=self.workers, pin_memory=self.pin_memory)

    def labels(self, which: str) -> Tensor:
        """The labels ``(N,)`` of ``'train'``, ``'eval'`` or ``'holdout'``, in the loaders' order."""
        if which in ("train", "calibrate"):
            return self.y_train if which == "train" else self.y_train[self.calibrate_idx]
        return self.y_val[self.eval_idx if which == "eval" else self.holdout_idx]

    def tensors(self, which: str, count: int | None = None) -> tuple[Tensor, Tensor]:
        """The first ``count`` images of ``which`` as tensors in memory: ``(x (n, 3, H, W), y (n,))``
        on CPU (the attacked images; the stand-in's training images)."""
        xs, ys = [], []
        for x, y in self.loader(which, count):
            xs.append(x)
            ys.append(torch.as_tensor(y, dtype=torch.int64))
        return torch.cat(xs), torch.cat(ys)


def _train_subset(dataset: Any, labels: Tensor, n_train: int | None, seed: int) -> tuple[Any, Tensor]:
    if n_train is None or n_train >= labels.numel():
        return dataset, labels
    generator = torch.Generator().manual_seed(int(seed) + 1)  # not the val split's stream
    index = torch.sort(torch.randperm(labels.numel(), generator=generator)[:n_train]).values  # (n_train,)
    return Subset(dataset, index.tolist()), labels[index]


def _digest(*parts: Any) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def load_streamed(config: Any, device: torch.device) -> StreamedData:
    """The ImageNet folder ``config.data`` (or, with ``config.stand_in``, its stand-in), split
    and checked (every class of the training images in use needs ``max(2, n_components)``
    images) before any model is loaded."""
    from idefender_gpu.data import imagenet_folder, imagenet_transform, stand_in_imagenet_folder

    seed = int(config.seed)
    if config.stand_in:
        transform = imagenet_transform("eval", size=STAND_IN_IMAGE["size"], resize=STAND_IN_IMAGE["resize"])
        n_classes = STAND_IN_IMAGE["n_classes"]
        train = stand_in_imagenet_folder("train", n_images=config.n_train or 6 * n_classes, n_classes=n_classes,
                                         transform=transform, seed=seed, raw_size=STAND_IN_IMAGE["raw_size"])
        val = stand_in_imagenet_folder("val", n_images=config.n_test or 4 * n_classes, n_classes=n_classes,
                                       transform=transform, seed=seed, raw_size=STAND_IN_IMAGE["raw_size"])
        name, source = "imagenet-stand-in", f"stand-in:imagenet:seed={seed}"
        n_train, n_test = None, None  # the stand-in is made of the requested sizes
        identity: tuple = (source, len(train), len(val), STAND_IN_IMAGE)
    else:
        if config.data is None:
            raise ValueError("--dataset imagenet needs --data ROOT: the ImageNet folder holding train/ and val/, "
                             "one sub-folder per class (or --stand-in)")
        train, val = imagenet_folder(config.data, "train"), imagenet_folder(config.data, "val")
        if train.classes != val.classes:
            raise ValueError(f"imagenet: {config.data}: train/ and val/ have different class folders "
                             f"({len(train.classes)} and {len(val.classes)}); both need the same ones")
        name, source, n_train, n_test = "imagenet", config.data, config.n_train, config.n_test
        for option, requested, available in (("n_train (--n-train)", n_train, len(train)),
                                             ("n_test (--n-test)", n_test, len(val))):
            if requested is not None and requested > available:
                raise ValueError(f"{option} must be at most {available}, the images of that split in "
                                 f"{config.data}; got {requested}")
        identity = (os.path.abspath(config.data), len(train), len(val), train.samples[0][0], val.samples[-1][0])
    y_train_all = torch.as_tensor(train.targets, dtype=torch.int64)
    y_val = torch.as_tensor(val.targets, dtype=torch.int64)
    classes = list(train.classes)
    eval_idx, holdout_idx = split_val(y_val, config.n_holdout, seed, n_test, len(classes))
    train_used, y_train = _train_subset(train, y_train_all, n_train, seed)
    counts = torch.bincount(y_train, minlength=len(classes))  # (C,)
    smallest, need = int(counts.argmin()), max(config.n_components, 2)
    if int(counts[smallest]) < need:
        raise ValueError(f"every class needs at least max(2, n_components (--components)) = {need} training images "
                         f"for its mixture; class {smallest} ({classes[smallest]}) has {int(counts[smallest])} of "
                         f"the {y_train.numel()} in use (raise --n-train or lower --components)")
    n_cal = y_train.numel() if config.n_calibrate is None else min(int(config.n_calibrate), y_train.numel())
    if n_cal < y_train.numel():  # train/ is sorted by class: its first n_cal images would hold a few classes
        calibrate_idx = split_val(y_train, n_cal, seed + 2, None, len(classes), option="n_calibrate (--n-calibrate)",
                                  what="training images of the ID-99 thresholds")[1]
    else:
        calibrate_idx = torch.arange(y_train.numel())
    workers = (0 if config.stand_in else default_workers()) if config.workers is None else int(config.workers)
    return StreamedData(name, classes, source, _digest(*identity, y_train.numel(), seed), bool(config.stand_in),
                        train_used, val, eval_idx, holdout_idx, calibrate_idx, y_train, y_val, workers,
                        int(config.batch_size), device.type == "cuda")
