"""Classifiers of the I-defender experiments, their training and their checkpoints.

* Models E and F of the paper's Table 1 (MNIST, Fashion-MNIST), seeded training, the
  black-box substitute and the safetensors checkpoint cache (``_paper``);
* :class:`WideResNet` (WRN-34-8, WRN-46-8, any ``"wrn-D-K"``) for CIFAR-10 (``_wideresnet``);
* :class:`VGG19`, torchvision's ImageNet architecture with weights from a user's file or
  torchvision's cache, never downloaded (``_vgg``, imported on first use: it loads torchvision);
* :func:`train_classifier`, the SGD training loop of ``idefender-gpu train`` (augmentation,
  the WRN schedule, mixed precision on CUDA, resumable safetensors training states; ``_train``).

:func:`build_model` builds any of them by name and :func:`hidden_layer` names the layer the
detector reads (the input of the last Linear layer).
"""

from __future__ import annotations

from idefender_gpu._lazy import lazy_exports
from idefender_gpu.models._paper import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    MODELS,
    TRAIN_DEFAULTS,
    ModelE,
    ModelF,
    checkpoint_key,
    evaluate,
    load_checkpoint,
    load_or_train,
    load_or_train_substitute,
    save_checkpoint,
    train,
    train_substitute,
)
from idefender_gpu.models._registry import MODEL_NAMES, build_model, hidden_layer
from idefender_gpu.models._wideresnet import CIFAR10_MEAN, CIFAR10_STD, WideResNet, wide_resnet

_LAZY = {
    "NarrowVGG19": "idefender_gpu.models._vgg",
    "VGG19": "idefender_gpu.models._vgg",
    "vgg19": "idefender_gpu.models._vgg",
    "load_state_file": "idefender_gpu.models._vgg",
    "torchvision_weights_path": "idefender_gpu.models._vgg",
    "TrainConfig": "idefender_gpu.models._train",
    "train_classifier": "idefender_gpu.models._train",
    "load_training_state": "idefender_gpu.models._train",
}

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MODELS",
    "MODEL_NAMES",
    "TRAIN_DEFAULTS",
    "ModelE",
    "ModelF",
    "WideResNet",
    "build_model",
    "checkpoint_key",
    "evaluate",
    "hidden_layer",
    "load_checkpoint",
    "load_or_train",
    "load_or_train_substitute",
    "save_checkpoint",
    "train",
    "train_substitute",
    "wide_resnet",
    *sorted(_LAZY),
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
