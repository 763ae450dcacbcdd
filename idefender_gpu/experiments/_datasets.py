"""What changes per dataset in the semi-white-box and gray-box protocols (private): one table.

:data:`PROFILES` maps each dataset to a :class:`Profile`: its models by role (``Source`` is
the one model of the semi-white-box protocol; ``Target`` and ``Wide``, Table 8's bigger
network, join it in the gray-box protocol), the detector's layer, the default training
length, the gray-box attacks and alphas, and whether the paper's tables are on this dataset.
:data:`STAND_INS` holds the ``--stand-in`` variants (seeded random images of the real shapes,
narrow networks, a few steps: the pipeline end to end, no reproduction) and
:data:`STAND_IN_SIZES` their sizes. :func:`obtain_model` gets a role's model: from a user's
checkpoint (``weights``, an ``idefender-gpu train`` ``model.safetensors``), else from the
checkpoint cache, else trained (models E / F with :func:`~idefender_gpu.models.load_or_train`,
a WideResNet with :func:`~idefender_gpu.models.train_classifier`) and cached under
:func:`~idefender_gpu.models.checkpoint_key`.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from idefender_gpu.data import cache_dir
from idefender_gpu.experiments import paper
from idefender_gpu.models import (
    build_model,
    checkpoint_key,
    hidden_layer,
    load_checkpoint,
    load_or_train,
    save_checkpoint,
    train,
)

__all__ = ["DATASET_DEFAULTS", "PLANNED", "PROFILES", "STAND_INS", "STAND_IN_DATASET_SIZES", "STAND_IN_NOTE", "STAND_IN_SEARCH", "STAND_IN_SIZES",
           "STAND_IN_STEPS", "Profile", "Role", "WideF",
           "check_supported", "obtain_model", "profile_for"]

STAND_IN_NOTE = ("STAND-IN RUN, NOT A REPRODUCTION: seeded random images of the dataset's shapes, narrow "
                 "networks trained for a few steps and a handful of attacked images, to prove the pipeline "
                 "end to end; no number here says anything about the method.")


class WideF(nn.Sequential):
    """Model F's family, 1.5 times wider: Conv(96,8x8,2)-ReLU-Conv(192,6x6,2)-ReLU-FC.

    Same module names as model F (``conv1, relu1, conv2, relu2, flatten, fc``), so the same
    I-defender layer spec (``conv2``: 192 x 3 x 3 = 1728 features for 28 x 28 inputs).
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        size2 = ((image_size - 8) // 2 + 1 - 6) // 2 + 1
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 96, kernel_size=8, stride=2)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(96, 192, kernel_size=6, stride=2)),
            ("relu2", nn.ReLU()),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(192 * size2 * size2, n_classes)),
        ]))


@dataclass(frozen=True)
class Role:
    """One model of a protocol: its role, architecture name and seed offset (seed + offset)."""

    role: str
    model: str
    seed_offset: int
    what: str  # how reports describe it


@dataclass(frozen=True)
class Profile:
    """What one dataset sets in the semi-white-box and gray-box protocols."""

    dataset: str
    roles: tuple[Role, ...]  # Source first; then Target and Wide (the gray-box protocol)
    layers: tuple[str, ...]  # the detector's default layer(s)
    epochs: int  # default training length
    graybox_attacks: tuple[tuple[str, str, float], ...]  # (label, GrayBox base, eps)
    alphas: tuple[float, ...]
    graybox_notes: tuple[str, ...]
    paper_same_dataset: bool  # the paper's Tables 6-8 are on this dataset
    experiments: frozenset[str] = frozenset({"semi-whitebox", "graybox", "adaptive"})
    stand_in: bool = False
    #: read through loaders, never held in memory (ImageNet: ``_loaders``); the gray-box
    #: protocol then runs its models one after the other (one detector in memory at a time)
    streamed: bool = False
    #: the models are never trained here: what to pass as ``--weights`` (None: trained and cached)
    weights_hint: str | None = None


_F_ROLES = (Role("Source", "F", 1, "model F"), Role("Target", "F", 2, "model F"),
            Role("Wide", "WideF", 3, "WideF (1.5x F's channels, plain torch layers)"))
_F_NOTES = (
    "Source and Target: model F trained twice, seeds seed + 1 and seed + 2; Wide: 1.5x F's channels (built in "
    "`idefender_gpu/experiments/_datasets.py` from plain torch layers), seed + 3. Each has its own I-defender.",
    "Eps: the paper's CIFAR-10 eps (2-20 grey levels) barely move F on Fashion-MNIST: Iter-Linf 0.1 (Table 5's "
    "smallest FGSM eps) and 0.065 (the paper's ratio 0.0085 / 0.013), Iter-L2 1.8 (0.1 x 0.47 / 0.013 x "
    "sqrt(784 / 3072)), FGSM 0.3 (Table 5's largest).",
)
_F_ATTACKS = (("Iter-Linf eps=0.1", "bim", 0.1), ("Iter-Linf eps=0.065", "bim", 0.065),
              ("Iter-L2 eps=1.8", "l2", 1.8), ("FGSM eps=0.3", "fgsm", 0.3))
_MNIST_FAMILY = dict(roles=_F_ROLES, layers=("conv2",), epochs=5, graybox_attacks=_F_ATTACKS,
                     alphas=(0.0, 1e-3, 1e-2, 1e-1, 1.0), graybox_notes=_F_NOTES, paper_same_dataset=False)
_CIFAR_ROLES = (Role("Source", "wrn-34-8", 1, "WRN-34-8"), Role("Target", "wrn-34-8", 2, "WRN-34-8"),
                Role("Wide", "wrn-46-8", 3, "WRN-46-8 (Table 8's bigger Target)"))

#: dataset -> its profile
PROFILES: dict[str, Profile] = {
    "fashion-mnist": Profile("fashion-mnist", **_MNIST_FAMILY),
    "mnist": Profile("mnist", **_MNIST_FAMILY),
    "cifar10": Profile(
        "cifar10", roles=_CIFAR_ROLES, layers=(hidden_layer("wrn-34-8"),), epochs=200,
        graybox_attacks=paper.GRAYBOX_ATTACKS, alphas=paper.GRAYBOX_ALPHAS,
        graybox_notes=("Source and Target: WRN-34-8 trained twice (seeds seed + 1 and seed + 2) with the WRN "
                       "paper's recipe (`idefender-gpu train`); Wide: WRN-46-8 (seed + 3). Each has its own "
                       "I-defender on the input of its last Linear layer (the pooled 512 / 512 features).",
                       "Eps and alphas: the paper's (Iter-Linf 0.013 and 0.0085, Iter-L2 0.47, FGSM 0.075 on "
                       "[0, 1] pixels; alpha 1e-3, 1e-2, 1e-1)."),
        paper_same_dataset=True, experiments=frozenset({"semi-whitebox", "graybox", "adaptive"})),
    "imagenet": Profile(
        "imagenet", roles=(Role("Source", "vgg19", 1, "VGG19"), Role("Target", "vgg19", 2, "VGG19")),
        layers=(hidden_layer("vgg19"),), epochs=1, graybox_attacks=paper.IMAGENET_ATTACKS,
        alphas=paper.IMAGENET_ALPHAS,
        graybox_notes=("Source and Target: two VGG19s trained independently on ImageNet, from the user's files "
                       "(--weights SOURCE --weights TARGET; never trained here), each with its own I-defender on "
                       "the input of its last Linear layer (4096 features, one full-covariance Gaussian per "
                       "class). Run one after the other: Source's detector is freed before Target's is fitted.",
                       "Eps: the paper's (FGSM 0.3, Iter-Linf 0.019, Iter-L2 12.5; 10 steps of 2.5 eps / 10), "
                       "applied to [0, 1] pixels; the paper does not say on which scale. They are not consistent "
                       "on one scale: FGSM 0.3 on [0, 1] pixels cannot leave the Target's accuracy at 70.89% "
                       "(clean 71.03%), yet on [0, 255] (0.3 / 255) Iter-Linf 0.019 would be negligible too. "
                       "--eps-scale S divides every eps by S (recorded in results.json)."),
        paper_same_dataset=True, experiments=frozenset({"graybox", "adaptive"}), streamed=True,
        weights_hint=("VGG19 weight files (safetensors or a .pth state dict), e.g. torchvision's "
                      "vgg19-dcbb9e9d.pth for Source and an independently trained VGG19 for Target")),
}

#: dataset -> its ``--stand-in`` profile: narrow WRNs, one epoch
STAND_INS: dict[str, Profile] = {
    "cifar10": replace(
        PROFILES["cifar10"], stand_in=True, epochs=1, layers=(hidden_layer("wrn-10-1"),),
        roles=(Role("Source", "wrn-10-1", 1, "WRN-10-1 (stand-in for WRN-34-8)"),
               Role("Target", "wrn-10-1", 2, "WRN-10-1 (stand-in for WRN-34-8)"),
               Role("Wide", "wrn-16-1", 3, "WRN-16-1 (stand-in for WRN-46-8)")),
        paper_same_dataset=False),
    "imagenet": replace(
        PROFILES["imagenet"], stand_in=True, epochs=4, weights_hint=None, paper_same_dataset=False,
        layers=(hidden_layer("vgg19-narrow"),),
        roles=(Role("Source", "vgg19-narrow", 1, "VGG19/8 (every width / 8, 128-wide classifier; stand-in "
                                                "for VGG19)"),
               Role("Target", "vgg19-narrow", 2, "VGG19/8 (stand-in for VGG19)"))),
}

#: the sizes a stand-in run uses unless told otherwise (command-line option names, ``_`` for ``-``)
STAND_IN_SIZES = {"n_train": 200, "n_test": 100, "n_holdout": 40, "n_attack": 16, "n_calibrate": 200}
#: ... where a dataset's stand-in differs (ImageNet's: 10 classes of 64 x 64 crops, ``_loaders``)
STAND_IN_DATASET_SIZES = {"imagenet": {"n_train": 60, "n_test": 40, "n_holdout": 20, "n_attack": 8,
                                       "n_calibrate": 60}}

#: the semi-white-box search budgets of a stand-in run (unless told otherwise)
STAND_IN_SEARCH = {"max_evaluations": 3, "max_deepfool_steps": 3, "tolerance": 0.05, "steps": 2}
#: the gray-box attack steps of a stand-in run
STAND_IN_STEPS = 2

#: dataset -> the protocol options it sets where the user kept the default (command-line names,
#: ``_`` for ``-``): ImageNet's attacks backpropagate through VGG19 beside a 67 GB detector, and
#: its held-out thresholds need images of every class (25 of val's 50 per class; 2000 would be 2)
DATASET_DEFAULTS = {"imagenet": {"batch_size": 64, "n_holdout": 25000}}

#: dataset -> why its protocols are not built yet (one line each; none left)
PLANNED: dict[str, str] = {}


def profile_for(dataset: str, stand_in: bool = False) -> Profile:
    """The profile of ``dataset`` (its stand-in variant with ``stand_in``); ``ValueError`` in one line
    when there is none."""
    if dataset in PLANNED:
        raise ValueError(f"--dataset {dataset} is not built yet: its protocols need {PLANNED[dataset]}")
    table = STAND_INS if stand_in else PROFILES
    if dataset not in table:
        if stand_in:
            raise ValueError(f"--stand-in is available for {', '.join(sorted(STAND_INS))} only (the real "
                             f"{dataset} runs on this machine's CPU anyway); got --dataset {dataset}")
        raise ValueError(f"dataset must be one of {sorted(PROFILES)}; got {dataset!r}")
    return table[dataset]


def check_supported(experiment: str, dataset: str, stand_in: bool = False) -> Profile:
    """The profile, after checking that ``experiment`` runs on ``dataset`` (one-line ``ValueError``)."""
    profile = profile_for(dataset, stand_in)
    if experiment not in profile.experiments:
        where = sorted(name for name, p in PROFILES.items() if experiment in p.experiments)
        raise ValueError(f"reproduce {experiment} runs on {', '.join(where)} only; --dataset {dataset} is not "
                         f"built yet")
    return profile


def build_role_model(name: str, n_classes: int) -> nn.Module:
    """A fresh model of architecture ``name`` ('E', 'F', 'WideF' or 'wrn-D-K')."""
    return WideF(n_classes) if name == "WideF" else build_model(name, n_classes)


def _cache_path(cache: Any, key: str) -> Path:
    return (Path(cache) if cache is not None else cache_dir() / "models") / f"{key}.safetensors"


def _from_weights(path: Any, name: str, data: Any, device: torch.device) -> tuple[nn.Module, dict[str, Any], str]:
    if name == "vgg19":  # torchvision's .pth, safetensors or our checkpoint; built on meta, tensors assigned
        from idefender_gpu.models import vgg19

        model = vgg19(weights=path, n_classes=data.n_classes)
        info = {"path": os.fspath(path), "cached": True, "user_weights": True}
        return model.to(device).eval(), info, f"{name} from the user's file {Path(path).name}"
    model = build_role_model(name, data.n_classes)
    info = load_checkpoint(path, model)
    trained_on = info.get("dataset")
    if trained_on is not None and trained_on != data.name:
        raise ValueError(f"--weights {os.fspath(path)!r} holds a {name} trained on {trained_on}, not on {data.name}")
    config = info.get("config") if isinstance(info.get("config"), dict) else {}  # idefender-gpu train's record
    info = {"seed": config.get("seed"), "epochs": info.get("epochs_done", config.get("epochs")), **info,
            "path": os.fspath(path), "cached": True, "user_weights": True}
    return model.to(device).eval(), info, f"{name} from the user's checkpoint {Path(path).name}"


def _load_or_train_wide(data: Any, seed: int, epochs: int, device: torch.device, cache: Any,
                        progress: bool | None) -> tuple[nn.Module, dict[str, Any]]:
    """:class:`WideF` trained like model F, cached beside the other checkpoints."""
    model = WideF(data.n_classes)
    path = _cache_path(cache, checkpoint_key(data.name, data.sha256, "WideF", seed, epochs))
    if path.is_file():
        info = load_checkpoint(path, model)
        return model.to(device).eval(), {**info, "path": str(path), "cached": True}
    start = time.perf_counter()
    train(model, data.x_train, data.y_train, epochs=epochs, seed=seed, device=device, progress=progress,
          desc="train model WideF")
    info = {"model": "WideF", "dataset": data.name, "seed": seed, "epochs": epochs,
            "train_seconds": time.perf_counter() - start}
    save_checkpoint(model, path, info)
    return model.eval(), {**info, "path": str(path), "cached": False}


_NARROW_BATCH = 8  # a few dozen stand-in images: several steps per epoch


def _load_or_train_narrow(name: str, data: Any, seed: int, epochs: int, device: torch.device, cache: Any,
                          progress: bool | None) -> tuple[nn.Module, dict[str, Any]]:
    """A stand-in network (``vgg19-narrow``) trained like model F (Adam) on the stand-in's
    training images (read from its loader into memory: a few dozen), cached."""
    model = build_model(name, data.n_classes)
    path = _cache_path(cache, checkpoint_key(data.name, data.sha256, name, seed, epochs, batch_size=_NARROW_BATCH))
    if path.is_file():
        info = load_checkpoint(path, model)
        return model.to(device).eval(), {**info, "path": str(path), "cached": True}
    x_train, y_train = data.tensors("train")
    start = time.perf_counter()
    train(model, x_train, y_train, epochs=epochs, seed=seed, device=device, progress=progress,
          batch_size=_NARROW_BATCH, desc=f"train model {name}")
    info = {"model": name, "dataset": data.name, "seed": seed, "epochs": epochs,
            "train_seconds": time.perf_counter() - start}
    save_checkpoint(model, path, info)
    return model.eval(), {**info, "path": str(path), "cached": False}


def _load_or_train_wrn(name: str, data: Any, seed: int, epochs: int, device: torch.device, cache: Any,
                       progress: bool | None) -> tuple[nn.Module, dict[str, Any]]:
    """A WideResNet trained with :func:`~idefender_gpu.models.train_classifier` (the WRN paper's
    recipe, ``epochs`` epochs, ``seed``), cached under a key of every training setting."""
    from idefender_gpu.models import TrainConfig, train_classifier

    config = TrainConfig(epochs=epochs, seed=seed)
    hyper = {k: v for k, v in config.to_json().items() if k not in ("epochs", "seed", "amp")}
    key = checkpoint_key(data.name, data.sha256, name, seed, epochs, trainer="train_classifier", **hyper)
    path = _cache_path(cache, key)
    model = build_model(name, data.n_classes)
    if path.is_file():
        try:
            info = load_checkpoint(path, model)
        except ValueError as exc:
            raise ValueError(f"{exc}. Delete {str(path)!r} to retrain it.") from None
        return model.to(device).eval(), {**info, "path": str(path), "cached": True, "key": key}
    start = time.perf_counter()
    result = train_classifier(model, data.x_train, data.y_train, config, device=device, progress=progress)
    info = {"model": name, "dataset": data.name, "data_sha256": data.sha256, "seed": seed, "epochs": epochs,
            "n_train": int(data.x_train.shape[0]), "train_seconds": time.perf_counter() - start,
            "amp": result.get("amp"), **config.to_json()}
    save_checkpoint(model.cpu(), path, info)
    return model.to(device).eval(), {**info, "path": str(path), "cached": False, "key": key}


def obtain_model(role: Role, data: Any, *, seed: int, epochs: int, device: torch.device, cache: Any = None,
                 weights: Any = None, progress: bool | None = None) -> tuple[nn.Module, dict[str, Any], str]:
    """``role``'s model: from ``weights`` when given, else the cache, else trained and cached.

    Returns ``(model, info, training)``: the model in eval mode on ``device``, what its
    checkpoint records (``path``, ``cached``, ``seed``, ``epochs``, ...) and a sentence on
    how it was obtained.
    """
    if weights is not None:
        return _from_weights(weights, role.model, data, device)
    if role.model == "vgg19":  # never trained here (ProtocolConfig.validate says so first)
        raise ValueError(f"model {role.role} (VGG19) needs a weights file (--weights FILE): VGG19s are not trained "
                         f"here")
    seed = seed + role.seed_offset
    if role.model == "vgg19-narrow":
        model, info = _load_or_train_narrow(role.model, data, seed, epochs, device, cache, progress)
    elif role.model == "WideF":
        model, info = _load_or_train_wide(data, seed, epochs, device, cache, progress)
    elif role.model in ("E", "F"):
        model, info = load_or_train(role.model, data, seed=seed, epochs=epochs, device=device, cache=cache,
                                    progress=progress)
    else:
        model, info = _load_or_train_wrn(role.model, data, seed, epochs, device, cache, progress)
    return model, info, f"{role.what} trained on the training set, {epochs} epochs, seed {seed}"
