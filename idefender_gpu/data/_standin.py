"""Stand-ins: seeded random images with the real shapes and class counts of CIFAR-10 and
ImageNet, for pipelines run where the data cannot be (private: the public names live in
:mod:`idefender_gpu.data`).

The images are not pure noise: each class has a fixed random low-resolution pattern (3x4x4,
upsampled bilinearly), and an image is ``0.6 * pattern + 0.4 * uniform noise``, so a network
can learn the classes in a few steps and a stand-in run exercises training, features and the
detector with accuracies above chance. Nothing here is a reproduction of anything: the
records say so (``name`` ends in ``-stand-in``, ``stand_in=True``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset

from idefender_gpu._param_validation import Interval, Options, check_param
from idefender_gpu.data._cifar import ALIASES, CIFAR_CLASSES
from idefender_gpu.data._common import Dataset
from idefender_gpu.data._imagenet import _TRANSFORM, _resolve_transform


@dataclass(frozen=True)
class StandIn:
    """The shape of one stand-in: image ``shape`` (C, H, W), class names, default sizes."""

    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    n_train: int
    n_test: int


#: Stand-ins by the name of the dataset they stand in for.
STAND_INS: dict[str, StandIn] = {
    "cifar10": StandIn((3, 32, 32), CIFAR_CLASSES["cifar10"], 1000, 200),
    "imagenet": StandIn((3, 224, 224), tuple(f"class-{i:04d}" for i in range(1000)), 64, 32),
}
_PATTERN = (4, 4)  # the class patterns' resolution
_CHUNK = 256  # images generated at a time (bounds the temporaries)


def _generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *stream)`` (independent streams per split)."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _patterns(n_classes: int, channels: int, seed: int) -> Tensor:
    return torch.rand((n_classes, channels, *_PATTERN), generator=_generator(seed, 0))  # (n_classes, C, 4, 4)


def _balanced_labels(n: int, n_classes: int, generator: torch.Generator) -> Tensor:
    return (torch.randperm(n, generator=generator) % n_classes).to(torch.int64)  # (N,)


def _render(patterns: Tensor, labels: Tensor, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Images (N, C, H, W) in [0, 1]: the labels' patterns upsampled, plus uniform noise."""
    out = torch.empty((len(labels), patterns.shape[1], *size), dtype=torch.float32)  # (N, C, H, W)
    for start in range(0, len(labels), _CHUNK):
        chunk = labels[start:start + _CHUNK]
        smooth = F.interpolate(patterns[chunk], size=size, mode="bilinear", align_corners=False)  # (n, C, H, W)
        noise = torch.rand(smooth.shape, generator=generator)  # (n, C, H, W)
        out[start:start + len(chunk)] = (0.6 * smooth + 0.4 * noise).clamp_(0.0, 1.0)
    return out


def _canonical(name: Any) -> Any:
    """``name`` in its canonical spelling ('CIFAR-10' -> 'cifar10'), if it is a str."""
    return ALIASES.get(name.lower(), name.lower()) if isinstance(name, str) else name


def _check_common(name: Any, n_classes: Any, seed: Any, owner: str) -> StandIn:
    check_param(name, "name", [Options(str, set(STAND_INS))], owner)
    spec = STAND_INS[name]
    check_param(n_classes, "n_classes", [None, Interval(Integral, 2, len(spec.classes))], owner)
    check_param(seed, "seed", [Interval(Integral, 0, None)], owner)
    return spec


def stand_in_dataset(name: str, n_train: int | None = None, n_test: int | None = None, seed: int = 0, *,
                     n_classes: int | None = None) -> Dataset:
    """A :class:`Dataset` of seeded random images shaped like ``name``'s (not real data).

    Parameters
    ----------
    name : {'cifar10', 'imagenet'}
        Case-insensitive; 'cifar-10' is accepted too. ``'cifar10'``: (3, 32, 32) images, its 10 class names. ``'imagenet'``: (3, 224, 224)
        images, 1000 classes named ``class-0000`` ... (keep ``n_train`` small: 0.6 MB an image).
    n_train, n_test : int, optional
        Sizes; default 1000 / 200 for 'cifar10', 64 / 32 for 'imagenet'.
    seed : int, default=0
        The same seed and sizes give the same images; the class patterns depend on the seed
        only, so training and test images of a class share theirs.
    n_classes : int, optional
        Use only the first ``n_classes`` classes (default all: 10 or 1000).

    Returns
    -------
    Dataset
        ``name`` is ``'<name>-stand-in'``, ``stand_in`` is True, ``source`` is
        ``stand-in:<name>:seed=<seed>``; labels are balanced (each class ``N // n_classes`` or
        one more times); ``sha256`` hashes the generation settings.

    Examples
    --------
    >>> from idefender_gpu.data import stand_in_dataset
    >>> data = stand_in_dataset("cifar10", n_train=40, n_test=20)
    >>> data.name, tuple(data.x_train.shape), data.n_classes
    ('cifar10-stand-in', (40, 3, 32, 32), 10)
    """
    owner = "stand_in_dataset"
    name = _canonical(name)
    spec = _check_common(name, n_classes, seed, owner)
    for value, label in ((n_train, "n_train"), (n_test, "n_test")):
        check_param(value, label, [None, Interval(Integral, 1, None)], owner)
    n_train = spec.n_train if n_train is None else int(n_train)
    n_test = spec.n_test if n_test is None else int(n_test)
    n_classes = len(spec.classes) if n_classes is None else int(n_classes)
    patterns = _patterns(n_classes, spec.shape[0], seed)
    splits = []
    for stream, n in ((1, n_train), (2, n_test)):
        generator = _generator(seed, stream)
        labels = _balanced_labels(n, n_classes, generator)
        splits.append((_render(patterns, labels, spec.shape[1:], generator), labels))
    key = f"stand-in:{name}:seed={seed}:n_train={n_train}:n_test={n_test}:n_classes={n_classes}"
    return Dataset(
        name=f"{name}-stand-in", x_train=splits[0][0], y_train=splits[0][1], x_test=splits[1][0],
        y_test=splits[1][1], classes=spec.classes[:n_classes], source=Path(f"stand-in:{name}:seed={seed}"),
        sha256=hashlib.sha256(key.encode()).hexdigest(), stand_in=True,
    )


class StandInImageFolder(TorchDataset):
    """An ``ImageFolder``-shaped stand-in for an ImageNet split, its images made on demand.

    Item ``i`` is ``(transform(image), label)`` where ``image`` is a PIL RGB image of
    ``raw_size`` (H, W), seeded by ``(seed, split, i)``: the same on every call and in every
    worker process. Attributes ``classes``, ``class_to_idx``, ``targets``, ``transform`` as
    torchvision's; ``stand_in`` is True. Built by :func:`stand_in_imagenet_folder`.
    """

    stand_in = True

    def __init__(self, split: str, n_images: int, classes: tuple[str, ...], transform: Any, seed: int,
                 raw_size: tuple[int, int]) -> None:
        self.split, self.seed, self.raw_size = split, seed, raw_size
        self.root = f"stand-in:imagenet:seed={seed}/{split}"
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._stream = 1 if split == "train" else 2
        labels = _balanced_labels(n_images, len(classes), _generator(seed, self._stream))
        self.targets: list[int] = labels.tolist()
        self._patterns = _patterns(len(classes), 3, seed)
        self.transform = _resolve_transform(transform)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")
        index %= len(self)
        label = self.targets[index]
        generator = _generator(self.seed, self._stream, index + 1)
        pixels = _render(self._patterns, torch.tensor([label]), self.raw_size, generator)[0]  # (3, H, W)
        array = pixels.mul(255).round_().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
        image = Image.fromarray(array)  # (H, W, 3) uint8: RGB
        return (self.transform(image) if self.transform is not None else image), label


def stand_in_imagenet_folder(split: str = "train", *, n_images: int | None = None, n_classes: int | None = None,
                             transform: Any = "eval", seed: int = 0,
                             raw_size: tuple[int, int] = (256, 320)) -> StandInImageFolder:
    """A loader-shaped ImageNet stand-in: what :func:`imagenet_folder` returns, without files.

    Parameters
    ----------
    split : {'train', 'val'}, default='train'
        Train and val draw different images (and labels) from the same class patterns.
    n_images : int, optional
        Default two per class.
    n_classes : int, optional
        Default 1000; fewer keeps a stand-in pipeline small.
    transform : {'eval', 'train'}, None or callable, default='eval'
        As in :func:`imagenet_folder`: the real transforms run on the (H, W) = ``raw_size``
        PIL images (so ``'eval'`` resizes and centre-crops them to 224).
    seed : int, default=0
    raw_size : (int, int), default=(256, 320)
        The generated images' height and width, before the transform.

    Returns
    -------
    StandInImageFolder
        A ``torch.utils.data.Dataset`` of ``(image, label)``.
    """
    owner = "stand_in_imagenet_folder"
    spec = _check_common("imagenet", n_classes, seed, owner)
    check_param(split, "split", [Options(str, {"train", "val"})], owner)
    check_param(n_images, "n_images", [None, Interval(Integral, 1, None)], owner)
    check_param(transform, "transform", _TRANSFORM, owner)
    if not (isinstance(raw_size, tuple) and len(raw_size) == 2
            and all(isinstance(s, Integral) and not isinstance(s, bool) and s >= 1 for s in raw_size)):
        raise ValueError(f"raw_size must be a tuple of two positive ints (height, width); got {raw_size!r}")
    classes = spec.classes if n_classes is None else spec.classes[:int(n_classes)]
    n_images = 2 * len(classes) if n_images is None else int(n_images)
    return StandInImageFolder(split, n_images, classes, transform, int(seed), (int(raw_size[0]), int(raw_size[1])))
