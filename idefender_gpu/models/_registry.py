"""One builder for every architecture, by name (private; re-exported by :mod:`idefender_gpu.models`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from idefender_gpu.models._paper import MODELS, build_paper_model
from idefender_gpu.models._wideresnet import HIDDEN_LAYER as WRN_HIDDEN_LAYER
from idefender_gpu.models._wideresnet import parse_wrn_name, wide_resnet

__all__ = ["MODEL_NAMES", "build_model", "hidden_layer"]

#: the names :func:`build_model` accepts, for messages ("wrn-D-K" stands for every WRN)
MODEL_NAMES = ("E", "F", "wrn-D-K", "vgg19", "vgg19-narrow")
_PAPER_LAYERS = {"E": "fc3:input", "F": "fc:input"}


def build_model(name: str, n_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """A fresh model by name (random weights from the global torch RNG).

    Parameters
    ----------
    name : str
        ``"E"``, ``"F"`` (the paper's Table 1, 1x28x28 inputs), ``"wrn-D-K"`` (a
        :class:`~idefender_gpu.models.WideResNet`, ``D = 6n + 4``: ``"wrn-34-8"``,
        ``"wrn-46-8"``, 3x32x32 inputs) or ``"vgg19"`` (torchvision's architecture, 3x224x224
        inputs; pass ``weights=`` to load a file, see :func:`~idefender_gpu.models.vgg19`) or
        ``"vgg19-narrow"`` (:class:`~idefender_gpu.models.NarrowVGG19`, the ImageNet stand-in's).
    n_classes : int, optional
        Default 10, or 1000 for ``"vgg19"``.
    **kwargs
        The architecture's own options (``dropout`` of a WRN, ``weights`` of VGG19).

    Raises
    ------
    ValueError
        For an unknown name, or a WRN whose depth is not ``6n + 4``.
    """
    if isinstance(name, str) and name == "vgg19":
        from idefender_gpu.models._vgg import vgg19  # torchvision, on first use only

        return vgg19(n_classes=1000 if n_classes is None else n_classes, **kwargs)
    if isinstance(name, str) and name == "vgg19-narrow":  # the ImageNet stand-in's network
        from idefender_gpu.models._vgg import NarrowVGG19

        return NarrowVGG19(10 if n_classes is None else n_classes, **kwargs)
    n_classes = 10 if n_classes is None else n_classes
    if isinstance(name, str) and name in MODELS:
        if kwargs:
            raise TypeError(f"model {name!r} takes no options; got {sorted(kwargs)}")
        return build_paper_model(name, n_classes)
    if parse_wrn_name(name) is not None:  # raises for a malformed depth
        return wide_resnet(name, n_classes, **kwargs)
    raise ValueError(f"model must be one of {list(MODEL_NAMES)} (such as 'wrn-34-8' or 'wrn-46-8'); got {name!r}")


def hidden_layer(name: str) -> str:
    """The layer spec the I-defender detector reads on model ``name`` (``IDefender(model, layers=...)``).

    ``"fc3:input"`` for E (200 features), ``"fc:input"`` for F (1152) and every WRN (the
    pooled ``64k`` features), ``"classifier.6:input"`` for VGG19 (4096): always the input of
    the last Linear layer.
    """
    if isinstance(name, str) and name in _PAPER_LAYERS:
        return _PAPER_LAYERS[name]
    if isinstance(name, str) and name in ("vgg19", "vgg19-narrow"):
        return "classifier.6:input"
    if parse_wrn_name(name) is not None:
        return WRN_HIDDEN_LAYER
    raise ValueError(f"model must be one of {list(MODEL_NAMES)}; got {name!r}")
