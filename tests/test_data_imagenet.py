"""Tests of ImageNet folders and the stand-ins in ``idefender_gpu.data`` (issue 14).

A tiny class-folder tree of PNGs in tmp_path stands for ImageNet (the expected class count is
patched down); nothing downloads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from idefender_gpu.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetNotFoundError,
    ImageNetNormalize,
    imagenet_folder,
    imagenet_transform,
    stand_in_dataset,
    stand_in_imagenet_folder,
)
from idefender_gpu.data import _imagenet
from idefender_gpu.exceptions import InvalidParameterError

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("n01440764", "n01443537", "n01484850")


def write_folder(root: Path, split: str = "train", per_class: int = 2, size=(40, 60)) -> None:
    """``root/split/<class>/<i>.png``: solid-colour PNGs, class c's red channel = 40 c + 10 i."""
    for c, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.zeros((*size, 3), np.uint8)
            pixels[..., 0] = 40 * c + 10 * i
            Image.fromarray(pixels).save(folder / f"{i}.png")



@pytest.fixture
def three_classes(monkeypatch):
    monkeypatch.setattr(_imagenet, "IMAGENET_N_CLASSES", len(CLASSES))


def test_folder_eval_transform(tmp_path, three_classes):
    write_folder(tmp_path, "val")
    ds = imagenet_folder(tmp_path, "val")
    assert ds.classes == list(CLASSES) and len(ds) == 6 and ds.targets == [0, 0, 1, 1, 2, 2]
    image, label = ds[3]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label == 1
    torch.testing.assert_close(image[0], torch.full((224, 224), 50 / 255))  # red of class 1, image 1
    assert float(image[1:].abs().max()) == 0.0


def test_folder_train_and_other_transforms(tmp_path, three_classes):
    write_folder(tmp_path, "train")
    torch.manual_seed(0)
    image, label = imagenet_folder(str(tmp_path), transform="train")[0]
    assert image.shape == (3, 224, 224) and label == 0
    assert isinstance(imagenet_folder(tmp_path, transform=None)[0][0], Image.Image)
    assert imagenet_folder(tmp_path, transform=lambda im: im.size)[0][0] == (60, 40)
    steps = [type(t).__name__ for t in imagenet_transform("eval").transforms]
    assert steps == ["Resize", "CenterCrop", "ToTensor"]
    steps = [type(t).__name__ for t in imagenet_transform("train").transforms]
    assert steps == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor"]


def test_bad_arguments(tmp_path):
    with pytest.raises(InvalidParameterError, match="The 'split' parameter of imagenet_folder must be"):
        imagenet_folder(tmp_path, "test")
    with pytest.raises(InvalidParameterError, match="The 'transform' parameter of imagenet_folder"):
        imagenet_folder(tmp_path, transform="center")
    with pytest.raises(InvalidParameterError, match="The 'root' parameter of imagenet_folder"):
        imagenet_folder(None)


def test_absent_root_and_split(tmp_path, three_classes):
    with pytest.raises(DatasetNotFoundError) as info:
        imagenet_folder(tmp_path / "missing")
    message = str(info.value)
    assert message.splitlines()[0] == f"imagenet: the ImageNet root folder {tmp_path / 'missing'} does not exist."
    assert f"{tmp_path / 'missing' / 'train'}/<class>/<image>.JPEG" in message and "image-net.org" in message
    write_folder(tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match=r"has no val/ folder \(its folders: train\)"):
        imagenet_folder(tmp_path, "val")


def test_loose_validation_images_say_how_to_sort_them(tmp_path, three_classes):
    (tmp_path / "val").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    with pytest.raises(DatasetNotFoundError) as info:
        imagenet_folder(tmp_path, "val")
    message = str(info.value)
    assert message.splitlines()[0] == f"imagenet: {tmp_path / 'val'} holds 3 loose image files and no class folders."
    assert "move each image into the folder of its class" in message and "valprep.sh" in message


def test_empty_class_folder_is_refused(tmp_path, three_classes):
    write_folder(tmp_path, "train")
    for png in (tmp_path / "train" / CLASSES[1]).iterdir():
        png.unlink()
    with pytest.raises(DatasetNotFoundError, match="not a complete class-folder tree"):
        imagenet_folder(tmp_path)


def test_other_class_count_warns(tmp_path):
    write_folder(tmp_path, "train", per_class=1)
    with pytest.warns(UserWarning, match="has 3 class folders, not 1000"):
        assert len(imagenet_folder(tmp_path)) == 3


def test_normalize_module():
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    module = ImageNetNormalize()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = module(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, (x - mean.double()) / std.double())
    assert module.state_dict() == {}  # a wrapped network's weights load unchanged
    model = torch.nn.Sequential(ImageNetNormalize(), torch.nn.Conv2d(3, 1, 1))
    assert set(model.state_dict()) == {"1.weight", "1.bias"}
    with pytest.raises(ValueError, match="mean and std must be 3 finite floats"):
        ImageNetNormalize(std=(1.0, 0.0, 1.0))


def test_stand_in_dataset_cifar():
    ds = stand_in_dataset("cifar10", n_train=40, n_test=20, seed=3)
    assert ds.name == "cifar10-stand-in" and ds.stand_in and "stand-in" in str(ds.source)
    assert ds.x_train.shape == (40, 3, 32, 32) and ds.x_train.dtype == torch.float32 and ds.n_classes == 10
    assert ds.x_test.shape == (20, 3, 32, 32) and ds.y_train.dtype == torch.int64
    assert float(ds.x_train.min()) >= 0.0 and float(ds.x_train.max()) <= 1.0
    assert torch.bincount(ds.y_train).tolist() == [4] * 10 and torch.bincount(ds.y_test).tolist() == [2] * 10
    again = stand_in_dataset("cifar10", n_train=40, n_test=20, seed=3)
    assert torch.equal(again.x_train, ds.x_train) and again.sha256 == ds.sha256
    other = stand_in_dataset("cifar10", n_train=40, n_test=20, seed=4)
    assert not torch.equal(other.x_train, ds.x_train) and other.sha256 != ds.sha256
    # learnable: the nearest class mean of the training images classifies the test images
    means = torch.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)]).flatten(1)  # (10, 3072)
    nearest = torch.cdist(ds.x_test.flatten(1), means).argmin(1)
    assert float((nearest == ds.y_test).float().mean()) > 0.5
    sub = ds.subset(10, 5)
    assert sub.stand_in and sub.name == ds.name and sub.x_train.shape[0] == 10


def test_stand_in_dataset_imagenet_and_arguments():
    ds = stand_in_dataset("imagenet", n_train=3, n_test=2)
    assert ds.x_train.shape == (3, 3, 224, 224) and ds.n_classes == 1000 and ds.name == "imagenet-stand-in"
    assert stand_in_dataset("imagenet", 4, 2, n_classes=2).n_classes == 2
    assert stand_in_dataset("CIFAR-10", 10, 10).name == "cifar10-stand-in"
    with pytest.raises(InvalidParameterError, match="The 'name' parameter of stand_in_dataset"):
        stand_in_dataset("mnist")
    with pytest.raises(InvalidParameterError, match="The 'n_train' parameter"):
        stand_in_dataset("cifar10", n_train=0)
    with pytest.raises(InvalidParameterError, match="The 'n_classes' parameter"):
        stand_in_dataset("cifar10", n_classes=11)


def test_stand_in_imagenet_folder():
    train = stand_in_imagenet_folder(n_classes=4, n_images=8, seed=1, raw_size=(60, 75))
    assert len(train) == 8 and train.classes[:2] == ["class-0000", "class-0001"] and train.stand_in
    assert sorted(train.targets) == [0, 0, 1, 1, 2, 2, 3, 3]
    image, label = train[5]
    assert image.shape == (3, 224, 224) and image.dtype == torch.float32 and label == train.targets[5]
    assert torch.equal(train[-3][0], image)  # made on demand, the same each time
    val = stand_in_imagenet_folder("val", n_classes=4, transform=None, seed=1)
    raw, _ = val[0]
    assert isinstance(raw, Image.Image) and raw.size == (320, 256) and len(val) == 8
    assert np.asarray(raw).tolist() != np.asarray(stand_in_imagenet_folder(
        n_classes=4, transform=None, seed=1)[0][0]).tolist()  # val draws other images than train
    loader = torch.utils.data.DataLoader(train, batch_size=2)
    batch, labels = next(iter(loader))
    assert batch.shape == (2, 3, 224, 224) and labels.dtype == torch.int64
    assert len(stand_in_imagenet_folder(n_classes=5)) == 10
    with pytest.raises(IndexError):
        train[8]
    with pytest.raises(InvalidParameterError, match="The 'split' parameter of stand_in_imagenet_folder"):
        stand_in_imagenet_folder("test")
