"""torchvision's VGG19 for ImageNet, with weights the user supplies; nothing is downloaded (private).

:class:`VGG19` is torchvision's ``vgg19`` architecture (configuration "E": 16 convolutions,
three Linear layers, 143,667,240 parameters for 1000 classes) with the same module and
state-dict names, so torchvision's own weight file loads into it unchanged. It takes images
in ``[0, 1]`` and applies ImageNet's normalisation itself (non-persistent buffers), so
attacks and the detector work in pixel space. Its I-defender layer is :data:`HIDDEN_LAYER`,
``"classifier.6:input"``: the 4096 features entering the last Linear layer.

:func:`vgg19` loads weights from a file the user names (safetensors, plain or an
idefender-gpu model checkpoint; or a PyTorch ``.pth`` state dict read with
``torch.load(weights_only=True)``, which refuses anything but tensors and containers), or
from torchvision's cache folder (``torch.hub.get_dir()/checkpoints/vgg19-dcbb9e9d.pth``, the
file ``torchvision.models.vgg19(weights="IMAGENET1K_V1")`` leaves there). With weights, the
model is built on the ``meta`` device and the file's tensors are assigned to it, so 143M
parameters are not initialised only to be overwritten (a ``.pth`` file is read with
``mmap=True``: its parameters are views of a private memory map of the file until the model
is moved to another device; keep the file in place meanwhile). A missing file, a pickle with code in
it, or tensors whose names or shapes differ from the architecture's raise an error naming
the file and what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.vgg import VGG, cfgs, make_layers

from idefender_gpu._files import check_path, read_verified
from idefender_gpu.models._paper import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

__all__ = ["HIDDEN_LAYER", "IMAGENET_MEAN", "IMAGENET_STD", "NarrowVGG19", "TORCHVISION_FILE", "VGG19",
           "load_state_file", "torchvision_weights_path", "vgg19"]

#: ImageNet's per-channel statistics (torchvision's preprocessing)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the hidden layer the detector reads: the input of the last Linear layer (4096 features)
HIDDEN_LAYER = "classifier.6:input"
#: torchvision's file name of the IMAGENET1K_V1 weights in its cache folder
TORCHVISION_FILE = "vgg19-dcbb9e9d.pth"


class VGG19(VGG):
    """torchvision's VGG19 (no batch norm) taking ``(B, 3, H, W)`` images in ``[0, 1]``.

    Parameters
    ----------
    n_classes : int, default=1000
    dropout : float, default=0.5
        Dropout of the classifier (torchvision's).
    init_weights : bool, default=True
        torchvision's initialisation (False when weights are loaded next).

    Attributes
    ----------
    architecture : str
        ``"vgg19"``.
    hidden_layer : str
        :data:`HIDDEN_LAYER`.

    Notes
    -----
    The state dict has torchvision's names (``features.0.weight`` ... ``classifier.6.bias``);
    the normalisation buffers ``mean`` and ``std`` are not part of it. For 224x224 inputs:
    ``(B, 3, 224, 224) -> features (B, 512, 7, 7) -> (B, 25088) -> (B, 4096) -> (B, 4096) ->
    (B, n_classes)``.
    """

    def __init__(self, n_classes: int = 1000, *, dropout: float = 0.5, init_weights: bool = True) -> None:
        super().__init__(make_layers(cfgs["E"], batch_norm=False), num_classes=n_classes,
                         init_weights=init_weights, dropout=dropout)
        self.architecture = "vgg19"
        self.hidden_layer = HIDDEN_LAYER
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward((x - self.mean) / self.std)


class _KaimingConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose ``reset_parameters`` is torchvision's VGG initialisation (He normal,
    fan-out; zero bias): a re-initialisation (``models.train``) keeps a deep plain network trainable."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class _KaimingLinear(nn.Linear):
    """``nn.Linear`` re-initialised He normal (fan-in), zero bias."""

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class NarrowVGG19(VGG19):
    """VGG19 with every convolution ``divisor`` times narrower and a ``hidden``-wide classifier.

    The stand-in of ``reproduce graybox --dataset imagenet --stand-in`` (registry name
    ``"vgg19-narrow"``): the same module names as :class:`VGG19` (``features.0`` ...
    ``features.36``, ``avgpool``, ``classifier.0`` ... ``classifier.6``), so the same
    detector layer (:data:`HIDDEN_LAYER`, here ``hidden`` features), the same
    normalisation inside, and any input of at least 32 x 32 pixels (the adaptive pooling).
    Its layers re-initialise He normal (torchvision's VGG initialisation, the classifier's
    too): with PyTorch's default initialisation a plain 19-layer network this narrow
    outputs a constant and never trains.

    Parameters
    ----------
    n_classes : int, default=10
    divisor : int, default=8
        Each of VGG19's convolution widths (64 ... 512) divided by it (8 ... 64).
    hidden : int, default=128
        Width of the two hidden Linear layers (VGG19's: 4096).
    dropout : float, default=0.0
    """

    def __init__(self, n_classes: int = 10, *, divisor: int = 8, hidden: int = 128, dropout: float = 0.0) -> None:
        nn.Module.__init__(self)  # VGG's own __init__ would allocate the 4096-wide classifier first
        layers: list[nn.Module] = []
        channels = 3
        for v in cfgs["E"]:  # make_layers' layout (same indices), with the re-initialising layers
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                width = max(1, int(v) // divisor)
                layers += [_KaimingConv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            _KaimingLinear(channels * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            _KaimingLinear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout), _KaimingLinear(hidden, n_classes))
        self.architecture = "vgg19-narrow"
        self.hidden_layer = HIDDEN_LAYER
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)


def torchvision_weights_path() -> Path:
    """Where torchvision keeps VGG19's ImageNet weights: ``torch.hub.get_dir()/checkpoints/``
    :data:`TORCHVISION_FILE` (it may not exist)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILE


def vgg19(weights: Any = None, n_classes: int = 1000, *, dropout: float = 0.5) -> VGG19:
    """torchvision's VGG19 architecture, randomly initialised or with weights from a file.

    Parameters
    ----------
    weights : str, os.PathLike, ``"torchvision"`` or None
        None: torchvision's random initialisation (global torch RNG). A path: a safetensors
        file (plain, or an idefender-gpu model checkpoint of architecture ``"vgg19"``) or a
        ``.pth`` state dict. ``"torchvision"``: torchvision's cache file
        (:func:`torchvision_weights_path`). Nothing is ever downloaded.
    n_classes : int, default=1000
    dropout : float, default=0.5

    Returns
    -------
    model : VGG19
        On CPU, float32, in eval mode when weights were loaded.

    Raises
    ------
    FileNotFoundError
        If the weights file does not exist (for ``"torchvision"``: naming the cache path and
        how to fill it, or to pass ``--weights FILE``).
    ValueError
        If the file is neither safetensors nor a tensors-only PyTorch file, or its tensors'
        names or shapes are not VGG19's with ``n_classes`` classes.
    """
    if weights is None:
        return VGG19(n_classes, dropout=dropout)
    if isinstance(weights, str) and weights == "torchvision":
        path = torchvision_weights_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"no torchvision VGG19 weights at {str(path)!r}: copy torchvision's IMAGENET1K_V1 file "
                f"({TORCHVISION_FILE}) there, or name a weights file (--weights FILE)")
    else:
        path = check_path(weights)
    state = load_state_file(path, architecture="vgg19")
    with torch.device("meta"):
        model = VGG19(n_classes, dropout=dropout, init_weights=False)
    _assign(model, state, path)
    return model.eval()


def load_state_file(path: Any, *, architecture: str | None = None) -> dict[str, Tensor]:
    """The tensors of a weights file, on CPU, without running any code from it.

    Parameters
    ----------
    path : str or os.PathLike
        A safetensors file (a plain one, or an idefender-gpu model checkpoint, whose digest
        is checked) or a PyTorch file of a state dict (``torch.load(weights_only=True)``;
        a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and ``module.`` prefixes of
        ``DataParallel`` are undone).
    architecture : str, optional
        For an idefender-gpu checkpoint: the architecture it must record.

    Returns
    -------
    state : dict of str to Tensor

    Raises
    ------
    FileNotFoundError, ValueError
    """
    path = check_path(path)
    where = repr(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"weights file {where} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
        return _safetensors_state(path, architecture)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # an unpickling refusal, a truncated zip, ...: not a usable weights file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"weights file {where} is neither safetensors nor a tensors-only PyTorch state dict "
                         f"(torch.load(weights_only=True) refused it: {first})") from None
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                               for k, v in loaded.items()):
        raise ValueError(f"weights file {where} does not hold a state dict (names to tensors)")
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return dict(loaded)


def _safetensors_state(path: Path, architecture: str | None) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    where = repr(str(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CHECKPOINT_FORMAT:
                return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"weights file {where} is not a complete safetensors file ({exc})") from None
    config, tensors = read_verified(path, CHECKPOINT_FORMAT, kind="model checkpoint", version=CHECKPOINT_VERSION)
    recorded = config.get("architecture")
    if architecture is not None and recorded != architecture:
        raise ValueError(f"{where} holds weights of architecture {recorded!r}, not {architecture!r}")
    return tensors


def _assign(model: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    """Check ``state`` against ``model``'s names and shapes, then assign it (in the model's dtypes, CPU)."""
    where = repr(str(path))
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights file {where} does not match {type(model).__name__}: "
                         f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                         f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"weights file {where} does not match {type(model).__name__}: tensor {name!r} has "
                             f"shape {tuple(state[name].shape)} in the file but {tuple(tensor.shape)} in the model "
                             "(another number of classes?)")
        if state[name].is_floating_point() != tensor.is_floating_point():
            raise ValueError(f"weights file {where}: tensor {name!r} is {state[name].dtype}, not {tensor.dtype}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True, assign=True)
    if isinstance(model, VGG19):  # its non-persistent buffers are still on the meta device
        model.mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
        model.std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
