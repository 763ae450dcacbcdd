"""Wide residual networks for 32x32 images (Zagoruyko & Komodakis, 2016), in plain torch (private).

WRN-d-k: a 3x3 convolution to 16 channels, then three stages of ``n = (d - 4) / 6``
pre-activation basic blocks of widths ``16k``, ``32k``, ``64k`` (strides 1, 2, 2), a final
BatchNorm + ReLU, global average pooling and one ``nn.Linear``. A basic block is
``BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3`` plus a shortcut: the identity, or a
1x1 convolution (of the pre-activated input, as in the authors' code) where the width or
the stride changes. Convolutions have no bias. ``d = 6n + 4``, as in the authors' code
(``n = (d - 4) / 6``): WRN-34-8 has 5 blocks per stage, WRN-46-8 has 7.

The I-defender layer is :data:`HIDDEN_LAYER`, ``"fc:input"``: the pooled features, ``64k``
wide (512 for WRN-34-8 and WRN-46-8), which is also the detector's default (the input of
the last ``nn.Linear``). Inputs are images in ``[0, 1]``; the model normalises them itself
(per-channel ``mean`` / ``std``, CIFAR-10's by default, held as non-persistent buffers), so
attacks and the detector work in pixel space.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "HIDDEN_LAYER", "WideResNet", "parse_wrn_name", "wide_resnet"]

#: per-channel statistics of CIFAR-10's training images (the usual normalisation)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
#: the hidden layer the detector reads: the pooled features (the input of ``fc``)
HIDDEN_LAYER = "fc:input"

_NAME = re.compile(r"wrn-(\d+)-(\d+)")


class BasicBlock(nn.Module):
    """Pre-activation basic block: ``BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3`` + shortcut.

    Parameters
    ----------
    in_planes, out_planes : int
        Widths of the input and output.
    stride : int
        Stride of the first convolution (and of the 1x1 shortcut).
    dropout : float
        Dropout probability between the two convolutions (0: none).

    Notes
    -----
    ``(B, in_planes, H, W) -> (B, out_planes, H / stride, W / stride)``. The shortcut is a
    1x1 convolution of the pre-activated input when the shape changes, else the identity.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                         if in_planes != out_planes or stride != 1 else None)

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for ``(B, C, 32, 32)`` images in ``[0, 1]``.

    Parameters
    ----------
    depth : int, default=34
        ``6n + 4`` (10, 16, 22, 28, 34, 40, 46, ...): ``n`` blocks per stage.
    widen_factor : int, default=8
        ``k``: stage widths ``16k, 32k, 64k``.
    n_classes : int, default=10
    dropout : float, default=0.0
        Dropout between the two convolutions of each block.
    in_channels : int, default=3
    mean, std : sequence of float, default CIFAR-10's
        Per-channel normalisation applied first (non-persistent buffers: not in the state dict).

    Attributes
    ----------
    architecture : str
        ``"wrn-<depth>-<widen_factor>"`` (recorded in checkpoints).
    hidden_layer : str
        :data:`HIDDEN_LAYER` (``"fc:input"``, ``64k`` features).

    Notes
    -----
    Module names: ``conv1, block1, block2, block3`` (``nn.Sequential`` of :class:`BasicBlock`),
    ``bn, relu, pool, flatten, fc``. Shapes for 32x32 inputs:
    ``(B, C, 32, 32) -> (B, 16k, 32, 32) -> (B, 32k, 16, 16) -> (B, 64k, 8, 8) -> (B, 64k) ->
    (B, n_classes)``. Initialisation (:meth:`reset_parameters`): He normal (fan-out) for the
    convolutions, BatchNorm weight 1 and bias 0, the Linear layer torch's default with a zero
    bias, as in the authors' code.
    """

    def __init__(self, depth: int = 34, widen_factor: int = 8, n_classes: int = 10, *, dropout: float = 0.0,
                 in_channels: int = 3, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__()
        _check_depth_width(depth, widen_factor)
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.architecture = f"wrn-{depth}-{widen_factor}"
        self.hidden_layer = HIDDEN_LAYER
        self.depth, self.widen_factor = depth, widen_factor
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean and std must have in_channels={in_channels} values; got {len(mean)} and "
                             f"{len(std)}")
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        for stage, stride in enumerate((1, 2, 2), start=1):
            blocks = [BasicBlock(widths[stage - 1] if i == 0 else widths[stage], widths[stage],
                                 stride if i == 0 else 1, dropout) for i in range(n)]
            self.add_module(f"block{stage}", nn.Sequential(OrderedDict(
                (str(i), block) for i, block in enumerate(blocks))))
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], n_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He normal (fan-out) convolutions, BatchNorm (1, 0), Linear torch's default with zero bias."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                module.reset_parameters()
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1((x - self.mean) / self.std)
        out = self.block3(self.block2(self.block1(out)))
        out = self.flatten(self.pool(self.relu(self.bn(out))))
        return self.fc(out)


def _check_depth_width(depth: object, widen_factor: object) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth of a WideResNet must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, 40, 46, ...); "
                         f"got {depth!r}")
    if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
        raise ValueError(f"widen_factor of a WideResNet must be a positive int; got {widen_factor!r}")


def parse_wrn_name(name: str) -> tuple[int, int] | None:
    """``(depth, widen_factor)`` of ``"wrn-D-K"``, None for a name of another form.

    Raises
    ------
    ValueError
        For a ``"wrn-D-K"`` name whose depth is not ``6n + 4`` or whose width is 0.
    """
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        return None
    depth, width = int(match[1]), int(match[2])
    try:
        _check_depth_width(depth, width)
    except ValueError as exc:
        raise ValueError(f"model {name!r}: {exc}") from None
    return depth, width


def wide_resnet(name: str, n_classes: int = 10, **kwargs: object) -> WideResNet:
    """A fresh WRN from its name, ``"wrn-34-8"``, ``"wrn-46-8"`` or any ``"wrn-D-K"``.

    Parameters
    ----------
    name : str
    n_classes : int, default=10
    **kwargs
        ``dropout``, ``in_channels``, ``mean``, ``std`` of :class:`WideResNet`.

    Raises
    ------
    ValueError
        For a name not of the form ``"wrn-D-K"`` or a depth not ``6n + 4``.
    """
    parsed = parse_wrn_name(name)
    if parsed is None:
        raise ValueError(f"a WideResNet name must be 'wrn-D-K' (such as 'wrn-34-8'); got {name!r}")
    return WideResNet(*parsed, n_classes, **kwargs)  # type: ignore[arg-type]
