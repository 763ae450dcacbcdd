"""ImageNet (ILSVRC-2012) from its class-folder layout, through torchvision's ``ImageFolder``
(private: the public names live in :mod:`idefender_gpu.data`).

The layout read::

    ROOT/train/n01440764/n01440764_10026.JPEG    (1000 class folders, ~1300 images each)
    ROOT/val/n01440764/ILSVRC2012_val_00000293.JPEG   (the same 1000 folders, 50 each)

Labels are the class folders' sorted order (torchvision's convention, the one of its
pretrained VGG19). The transforms give ``[0, 1]`` pixels (``ToTensor``); the mean/std
normalisation of the pretrained networks is :class:`ImageNetNormalize`, a module to put in
front of the network, so that attacks and the detector see ``[0, 1]`` images. torchvision is
imported only when a folder or transform is built.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from idefender_gpu._param_validation import InstanceOf, Options, Predicate, check_param
from idefender_gpu.exceptions import DatasetNotFoundError

#: The per-channel mean and standard deviation of ImageNet's training pixels in ``[0, 1]``
#: (RGB), the normalisation torchvision's pretrained networks expect.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Class folders expected in each split (a different count warns).
IMAGENET_N_CLASSES = 1000
_SPLITS = ("train", "val")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: What each public function accepts (see :mod:`idefender_gpu._param_validation`).
_TRANSFORM = [Options(str, {"eval", "train"}), None, Predicate(callable, "a callable")]
_FOLDER_CONSTRAINTS: dict[str, list] = {
    "root": [InstanceOf(str, os.PathLike)],
    "split": [Options(str, set(_SPLITS))],
    "transform": _TRANSFORM,
}


class ImageNetNormalize(nn.Module):
    """``(x - mean) / std`` per channel: ImageNet's normalisation as the first layer of a model.

    Parameters
    ----------
    mean, std : sequence of 3 floats, default=IMAGENET_MEAN, IMAGENET_STD

    Shape
    -----
    x : (B, 3, H, W) in ``[0, 1]``; the output has the same shape, dtype and device. The
    constants are non-persistent buffers: they follow ``.to(device)`` and stay out of the
    ``state_dict`` (a wrapped network's weights load unchanged).

    Examples
    --------
    >>> import torch
    >>> from idefender_gpu.data import ImageNetNormalize
    >>> model = torch.nn.Sequential(ImageNetNormalize(), torch.nn.Flatten())
    >>> model(torch.full((1, 3, 2, 2), 0.485))[0, :4]
    tensor([0., 0., 0., 0.])
    """

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if mean_t.shape != (3,) or std_t.shape != (3,) or not bool(torch.isfinite(mean_t).all()) \
                or not bool((std_t > 0).all()):
            raise ValueError(f"mean and std must be 3 finite floats, std positive; got mean={mean}, std={std}")
        self.register_buffer("mean", mean_t.view(3, 1, 1), persistent=False)  # (3, 1, 1)
        self.register_buffer("std", std_t.view(3, 1, 1), persistent=False)  # (3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)  # (B, 3, H, W)

    def extra_repr(self) -> str:
        return f"mean={tuple(round(float(m), 4) for m in self.mean.flatten())}, " \
               f"std={tuple(round(float(s), 4) for s in self.std.flatten())}"


def imagenet_transform(kind: str = "eval", *, size: int = 224, resize: int = 256) -> Callable[[Any], Tensor]:
    """The standard ImageNet transform of a PIL image to a (3, size, size) float tensor in ``[0, 1]``.

    Parameters
    ----------
    kind : {'eval', 'train'}, default='eval'
        ``'eval'``: ``Resize(resize)`` (shorter side), ``CenterCrop(size)``, ``ToTensor()``.
        ``'train'``: ``RandomResizedCrop(size)``, ``RandomHorizontalFlip()``, ``ToTensor()``.
    size, resize : int, default=224, 256

    Returns
    -------
    transform : torchvision.transforms.Compose
    """
    check_param(kind, "kind", [Options(str, {"eval", "train"})], "imagenet_transform")
    from torchvision import transforms

    if kind == "eval":
        steps = [transforms.Resize(resize), transforms.CenterCrop(size)]
    else:
        steps = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
    return transforms.Compose([*steps, transforms.ToTensor()])


def _resolve_transform(transform: Any) -> Callable[[Any], Any] | None:
    return imagenet_transform(transform) if isinstance(transform, str) else transform


def _layout_error(root: Path, split: str, problem: str, fix: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"imagenet: {problem}.\nExpected the class-folder layout: {root / split}/<class>/<image>.JPEG "
        f"(for example {root / split}/n01440764/...), one folder per class, "
        f"{IMAGENET_N_CLASSES} classes.\n{fix}")


def _check_layout(root: Path, split: str) -> list[str]:
    """The class folders of ``root/split``, after checking the layout; raises what to fix."""
    folder = root / split
    get = ("Download ILSVRC-2012 from https://image-net.org (an account is needed) and unpack "
           "train/ and val/ under ROOT with one sub-folder per class.")
    if not root.is_dir():
        state = "does not exist" if not root.exists() else "is not a folder"
        raise _layout_error(root, split, f"the ImageNet root folder {root} {state}", get)
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())[:8]
        raise _layout_error(root, split, f"{root} has no {split}/ folder (its folders: "
                            f"{', '.join(present) or 'none'})", get)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES]
        if loose:
            raise _layout_error(
                root, split, f"{folder} holds {len(loose)} loose image files and no class folders",
                "The ILSVRC-2012 validation archive unpacks flat: move each image into the folder of its "
                "class (its synset id, e.g. n01440764), using the devkit's ground truth "
                "(ILSVRC2012_validation_ground_truth.txt with meta.mat), for example with the widely "
                "used valprep.sh script or torchvision.datasets.ImageNet(ROOT, split='val'), which "
                "does this once from the devkit archive.")
        raise _layout_error(root, split, f"{folder} holds no class folders", get)
    if len(classes) != IMAGENET_N_CLASSES:
        warnings.warn(f"imagenet: {folder} has {len(classes)} class folders, not {IMAGENET_N_CLASSES}: "
                      f"labels are the {len(classes)} folders' sorted order, which a network trained on "
                      f"all {IMAGENET_N_CLASSES} classes does not share", UserWarning, stacklevel=3)
    return classes


def imagenet_folder(root: Any, split: str = "train", *, transform: Any = "eval") -> Any:
    """ImageNet's ``root/train`` or ``root/val`` as a torchvision ``ImageFolder``.

    Parameters
    ----------
    root : str or os.PathLike
        The folder holding ``train/`` and ``val/``, each with one sub-folder per class.
    split : {'train', 'val'}, default='train'
    transform : {'eval', 'train'}, None or callable, default='eval'
        ``'eval'`` / ``'train'``: :func:`imagenet_transform` of that kind (tensors (3, 224,
        224) in ``[0, 1]``, not normalised: see :class:`ImageNetNormalize`); None: PIL images;
        a callable: applied to each PIL image.

    Returns
    -------
    dataset : torchvision.datasets.ImageFolder
        Items ``(image, label)``; ``classes``, ``class_to_idx``, ``targets`` as torchvision's.

    Raises
    ------
    DatasetNotFoundError
        When ``root`` or the split folder is absent, holds no class folders (a validation
        folder of loose JPEGs: the message says how to sort them) or a class folder has no
        image; the message names the path and the expected layout.
    InvalidParameterError
        For a bad ``split`` or ``transform``.

    Warns
    -----
    UserWarning
        When the split has a number of class folders other than 1000.
    """
    check_param(root, "root", _FOLDER_CONSTRAINTS["root"], "imagenet_folder")
    root = Path(root).expanduser()
    check_param(split, "split", _FOLDER_CONSTRAINTS["split"], "imagenet_folder")
    check_param(transform, "transform", _FOLDER_CONSTRAINTS["transform"], "imagenet_folder")
    _check_layout(root, split)
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root / split), transform=_resolve_transform(transform))
    except FileNotFoundError as exc:  # a class folder without an image
        raise _layout_error(root, split, f"{root / split} is not a complete class-folder tree ({exc})",
                            "Every class folder needs at least one image file.") from exc
