"""The attack base class and the gradient loop shared by FGSM, BIM and iterative L2 (private).

:class:`Attack` holds everything that is the same for every attack: validation of ``x``
and ``y``, the move to the model's device, eval mode (restored afterwards, also on
exceptions), ``torch.enable_grad()``, clamping to ``bounds``, detaching, and the return to
the input's device. A subclass implements one method, ``_perturb(x, y)``.

:class:`GradientAttack` holds the gradient loop once (after Foolbox 3's
``BaseGradientDescent``); the Linf and L2 attacks override only ``_normalize``,
``_project`` and ``_random_start``, written with the norm helpers of this module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from numbers import Integral, Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idefender_gpu._validation import check_scalar, describe

__all__ = ["Attack", "GradientAttack"]

#: Norms are floored at this value before dividing (a zero gradient stays zero).
NORM_FLOOR = 1e-12

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------------------
# Norm helpers: pure functions on (B, ...) tensors, reduced over every axis but the first
# --------------------------------------------------------------------------------------


def expand_to(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` broadcastable against ``like`` ``(B, ...)``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def l2_norms(delta: Tensor) -> Tensor:
    """Per-sample L2 norm: ``(B, ...)`` -> ``(B,)``."""
    return delta.flatten(1).norm(p=2, dim=1)


def linf_norms(delta: Tensor) -> Tensor:
    """Per-sample Linf norm: ``(B, ...)`` -> ``(B,)``."""
    return delta.flatten(1).abs().amax(dim=1)


def l2_normalize(grad: Tensor) -> Tensor:
    """``grad / max(||grad||_2, 1e-12)`` per sample, shape ``(B, ...)``."""
    return grad / expand_to(l2_norms(grad).clamp_min(NORM_FLOOR), grad)


def l2_project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project ``x_adv`` onto the L2 ball of radius ``eps`` around ``x`` (per sample)."""
    delta = x_adv - x  # (B, ...)
    factor = (eps / l2_norms(delta).clamp_min(NORM_FLOOR)).clamp(max=1.0)  # (B,)
    return x + delta * expand_to(factor, delta)


def linf_project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clip ``x_adv`` to the Linf ball of radius ``eps`` around ``x``."""
    return x + (x_adv - x).clamp(-eps, eps)


def linf_random_start(x: Tensor, eps: float) -> Tensor:
    """A uniform sample of the Linf ball of radius ``eps`` around each sample."""
    return x + torch.empty_like(x).uniform_(-eps, eps)


def l2_random_start(x: Tensor, eps: float) -> Tensor:
    """A uniform sample of the L2 ball of radius ``eps`` around each sample.

    Direction: a normalised Gaussian; radius: ``eps * u ** (1 / D)`` with ``u ~ U(0, 1)``.
    """
    direction = l2_normalize(torch.randn_like(x))  # (B, ...)
    n_features = x[0].numel()
    radius = eps * torch.rand(x.shape[0], dtype=x.dtype, device=x.device) ** (1.0 / n_features)
    return x + direction * expand_to(radius, x)


# --------------------------------------------------------------------------------------
# Hyperparameter validation
# --------------------------------------------------------------------------------------


def check_positive(value: Any, name: str) -> None:
    """A real number > 0."""
    check_scalar(value, name, Real, 0, low_open=True)
    if not value < float("inf"):
        raise ValueError(f"The '{name}' parameter must be finite. Got {value!r} instead.")


def check_count(value: Any, name: str, low: int = 1) -> None:
    """An int >= ``low``."""
    check_scalar(value, name, Integral, low)


def check_bool(value: Any, name: str) -> None:
    """A Python bool."""
    if not isinstance(value, bool):
        raise TypeError(f"The '{name}' parameter must be a bool. Got {value!r} instead.")


def check_bounds(bounds: Any) -> tuple[float, float]:
    """``(low, high)``: two finite real numbers with ``low < high``."""
    if (
        not isinstance(bounds, (tuple, list))
        or len(bounds) != 2
        or any(isinstance(b, bool) or not isinstance(b, Real) for b in bounds)
    ):
        raise TypeError(
            f"The 'bounds' parameter must be a pair (low, high) of real numbers. Got {bounds!r} instead."
        )
    low, high = float(bounds[0]), float(bounds[1])
    if not (low < high and abs(low) < float("inf") and abs(high) < float("inf")):
        raise ValueError(
            f"The 'bounds' parameter must be finite with low < high. Got {bounds!r} instead."
        )
    return low, high


def check_model(model: Any, name: str = "model") -> nn.Module:
    """An ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module; got {type(model).__name__}")
    return model


def module_device(module: nn.Module) -> torch.device | None:
    """Device of the first parameter (else buffer) of ``module``; ``None`` if it has neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


@contextmanager
def eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    """Put every submodule of ``modules`` in eval mode; restore each one's own flag after.

    Flags are restored module by module, so a model whose submodules were in mixed modes
    gets exactly those modes back, also when the body raises.
    """
    saved = {}
    for module in modules:
        for sub in module.modules():
            saved.setdefault(id(sub), (sub, sub.training))
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for sub, training in saved.values():
            sub.training = training


# --------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------


class Attack(ABC):
    """Base class of every attack: validation, device, eval mode, clamping, detaching.

    Subclasses store their hyperparameters (validated, keyword-only) and implement
    ``_perturb(x, y)``, which receives ``x`` on the model's device with gradients enabled
    and the model in eval mode, and returns the adversarial batch. An attack keeps no state
    between calls.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits of shape (B, n_classes).
    bounds : tuple of float, default=(0.0, 1.0)
        Valid input range ``(low, high)``; inputs must lie in it and outputs stay in it.
    """

    #: Names of the hyperparameters shown by ``repr`` (in this order).
    _param_names: tuple[str, ...] = ("bounds",)

    def __init__(self, model: nn.Module, *, bounds: tuple[float, float] = (0.0, 1.0)) -> None:
        self.model = check_model(model)
        self.bounds = check_bounds(bounds)

    # -- hooks for subclasses -------------------------------------------------------------

    @abstractmethod
    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial version of ``x`` ``(B, ...)`` for labels ``y`` ``(B,)``."""

    def _modules(self) -> list[nn.Module]:
        """Modules put in eval mode during the attack (and restored afterwards)."""
        return [self.model]

    def _check_call(self, n_classes: int, device: torch.device) -> None:
        """Extra per-call checks of the subclass (e.g. the detector's class count)."""

    # -- the public entry point -----------------------------------------------------------

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Attack a batch.

        Parameters
        ----------
        x : Tensor of shape (B, ...)
            Floating-point inputs within ``bounds``, on any device.
        y : Tensor of shape (B,)
            Integer labels in ``[0, n_classes)``: the true classes (the target classes for
            a targeted attack).

        Returns
        -------
        x_adv : Tensor of shape (B, ...)
            Detached adversarial inputs within ``bounds``, same dtype and device as ``x``.

        Raises
        ------
        TypeError
            If ``x`` is not a floating-point tensor or ``y`` not an integer tensor.
        ValueError
            If the shapes disagree, ``x`` is not finite or leaves ``bounds``, or a label is
            out of range.
        """
        x, y = self._check_inputs(x, y)
        device = module_device(self.model)
        device = x.device if device is None else device
        x_dev, y_dev = x.detach().to(device), y.to(device=device, dtype=torch.int64)
        with eval_mode(self._modules()), torch.enable_grad():
            with torch.no_grad():
                probe = self.model(x_dev[:1])
            n_classes = self._check_logits(probe)
            self._check_labels(y_dev, n_classes)
            self._check_call(n_classes, device)
            x_adv = self._perturb(x_dev, y_dev)
        low, high = self.bounds
        return x_adv.detach().clamp(low, high).to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        params = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._param_names)
        return f"{type(self).__name__}({params})"

    # -- validation -------------------------------------------------------------------------

    def _check_inputs(self, x: Any, y: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, ...); got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got {describe(x)}")
        if x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(
                f"x must have shape (B, ...) with B >= 1 and at least one feature axis; got {describe(x)}"
            )
        if not isinstance(y, Tensor):
            raise TypeError(
                f"y must be a torch.Tensor of integer labels of shape (B,); got {type(y).__name__}"
            )
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer labels (torch.int64); got {describe(y)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x; got {describe(y)}")
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"x must be finite; got NaN or infinity ({describe(x)})")
        low, high = self.bounds
        x_min, x_max = float(x.min()), float(x.max())
        if x_min < low or x_max > high:
            raise ValueError(
                f"x must lie within bounds [{low}, {high}]; got values in [{x_min}, {x_max}] "
                f"({describe(x)}). Rescale x or pass bounds= to the attack."
            )
        return x, y

    @staticmethod
    def _check_logits(logits: Any) -> int:
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            got = describe(logits) if isinstance(logits, Tensor) else f"type {type(logits).__name__}"
            raise ValueError(f"model must return logits of shape (B, n_classes); got {got}")
        return logits.shape[1]

    @staticmethod
    def _check_labels(y: Tensor, n_classes: int) -> None:
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= n_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"y must hold labels in [0, {n_classes}) (the model has {n_classes} classes); "
                f"got label {bad}"
            )


# --------------------------------------------------------------------------------------
# The shared gradient loop
# --------------------------------------------------------------------------------------


class GradientAttack(Attack):
    """Projected gradient ascent on a loss, shared by FGSM, BIM and iterative L2.

    One step: ``x <- clip_bounds(project_eps(x + sign * step_size * normalize(grad)))``
    with ``sign = +1`` (ascend the loss of the true class) or ``-1`` (targeted: descend the
    loss of the target class). Subclasses set ``eps``, ``steps``, ``step_size``,
    ``random_start`` and ``targeted`` and implement ``_normalize``, ``_project`` and
    ``_random_start``.
    """

    eps: float
    steps: int
    step_size: float
    random_start: bool = False
    targeted: bool = False

    @abstractmethod
    def _normalize(self, grad: Tensor) -> Tensor:
        """Steepest-ascent direction of unit norm from a gradient ``(B, ...)``."""

    @abstractmethod
    def _project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Project ``x_adv`` back onto the eps ball around ``x``."""

    @abstractmethod
    def _random_start(self, x: Tensor) -> Tensor:
        """A random point of the eps ball around ``x``."""

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample cross-entropy of the model at ``x`` for labels ``y``: ``(B,)``."""
        return F.cross_entropy(self.model(x), y, reduction="none")

    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        return self._ascend(x, y, self._loss)

    def _ascend(self, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """Run the loop on ``loss_fn(x, y) -> (B,)``; gradients by ``torch.autograd.grad``.

        Samples are attacked independently (the per-sample losses are summed, and the model
        is in eval mode), so the batch gradient is the stack of per-sample gradients.
        """
        low, high = self.bounds
        sign = -1.0 if self.targeted else 1.0
        x = x.detach()
        x_adv = self._random_start(x).clamp(low, high) if self.random_start else x.clone()
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(x_adv, y).sum(), x_adv)
            with torch.no_grad():
                x_adv = x_adv + (sign * self.step_size) * self._normalize(grad)
                x_adv = self._project(x_adv, x).clamp(low, high)
        return x_adv.detach()
