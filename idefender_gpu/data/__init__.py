"""Datasets, from local files first and torchvision's download last; ImageNet folders; stand-ins.

In memory, as a :class:`Dataset` (:func:`load_dataset`): MNIST, Fashion-MNIST (IDX files) and
CIFAR-10 (its binary version, ``cifar-10-batches-bin``; torchvision's pickled
``cifar-10-batches-py`` is refused, because this project never unpickles). Streamed from a
folder: ImageNet's ``train``/``val`` class folders (:func:`imagenet_folder`, a torchvision
``ImageFolder`` with the standard transforms; :class:`ImageNetNormalize` belongs in the model
wrapper, since the attacks work on ``[0, 1]`` pixels). Stand-ins with the real shapes and class
counts for pipelines run without the data (:func:`stand_in_dataset`,
:func:`stand_in_imagenet_folder`).

MNIST and Fashion-MNIST: the four IDX files of either dataset (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally ``.gz``; the dotted
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

CIFAR-10 is searched in the same order (``root`` only; else ``$IDEFENDER_DATA`` only; else the
cache, ``cache_dir()/data/cifar-10-batches-bin``), each folder as is, as
``<folder>/cifar-10-batches-bin``, ``<folder>/cifar10`` and ``<folder>/cifar10/cifar-10-batches-bin``.

Examples
--------
>>> from idefender_gpu.data import load_dataset
>>> data = load_dataset("fashion-mnist")                      # doctest: +SKIP
>>> data.x_train.shape, data.x_train.dtype, data.y_train.shape  # doctest: +SKIP
(torch.Size([60000, 1, 28, 28]), torch.float32, torch.Size([60000]))
>>> from idefender_gpu.data import stand_in_dataset
>>> stand_in_dataset("cifar10", n_train=20, n_test=10).x_train.shape
torch.Size([20, 3, 32, 32])
"""

from idefender_gpu.data._cifar import CIFAR_CLASSES, read_cifar_batch
from idefender_gpu.data._common import Dataset, cache_dir
from idefender_gpu.data._idx import DATASETS, read_idx
from idefender_gpu.data._imagenet import (
    IMAGENET_MEAN,
    IMAGENET_N_CLASSES,
    IMAGENET_STD,
    ImageNetNormalize,
    imagenet_folder,
    imagenet_transform,
)
from idefender_gpu.data._load import DATASET_NAMES, find_dataset, load_dataset, search_dirs
from idefender_gpu.data._standin import STAND_INS, StandInImageFolder, stand_in_dataset, stand_in_imagenet_folder
from idefender_gpu.exceptions import DatasetNotFoundError

__all__ = [
    "CIFAR_CLASSES",
    "DATASETS",
    "DATASET_NAMES",
    "Dataset",
    "DatasetNotFoundError",
    "IMAGENET_MEAN",
    "IMAGENET_N_CLASSES",
    "IMAGENET_STD",
    "ImageNetNormalize",
    "STAND_INS",
    "StandInImageFolder",
    "cache_dir",
    "find_dataset",
    "imagenet_folder",
    "imagenet_transform",
    "load_dataset",
    "read_cifar_batch",
    "read_idx",
    "search_dirs",
    "stand_in_dataset",
    "stand_in_imagenet_folder",
]
