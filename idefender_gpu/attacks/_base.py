"""The attack base class, the norm table and the gradient loop shared by the Linf and L2
attacks (private).

:class:`Attack` holds everything that is the same for every attack: hyperparameter
validation from the class's ``_parameter_constraints`` table (the one family of
:mod:`idefender_gpu._param_validation`), validation of ``x`` and ``y``, the move to the
model's device, eval mode (restored afterwards, also on exceptions), ``torch.enable_grad()``,
clamping to ``bounds``, detaching, and the return to the input's device. A subclass
implements one method, ``_perturb(x, y)``.

:class:`Norm` holds the norm-specific step direction, projection and random start (the
split of Foolbox 3's ``LinfBaseGradientDescent`` / ``L2BaseGradientDescent``), one table
entry per norm (:data:`LINF`, :data:`L2`). :class:`GradientAttack` holds the gradient loop
once (after Foolbox 3's ``BaseGradientDescent``) and takes those pieces from its class
attribute ``norm``; :class:`IterativeAttack` adds the one constructor of the iterative
attacks (BIM, iterative L2).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idefender_gpu._param_validation import InstanceOf, Interval, Predicate, validate_params
from idefender_gpu._validation import describe
from idefender_gpu.features import eval_mode, model_device

__all__ = ["Attack", "GradientAttack", "IterativeAttack", "L2", "LINF", "NORMS", "Norm"]

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
# The norm table: the norm-specific pieces of a gradient attack
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Norm:
    """The norm-specific pieces of a gradient attack, as one table entry.

    After Foolbox 3's split of ``LinfBaseGradientDescent`` / ``L2BaseGradientDescent``:
    the loop is written once, and a norm brings its step direction, its projection and its
    random start.

    Attributes
    ----------
    name : str
        ``"linf"`` or ``"l2"``.
    normalize : callable
        ``grad (B, ...) -> direction (B, ...)``: the steepest-ascent direction of unit norm
        (the sign for Linf, ``grad / max(||grad||_2, 1e-12)`` for L2).
    project : callable
        ``(x_adv, x, eps) -> x_adv``: back onto the eps ball around ``x``.
    random_start : callable
        ``(x, eps) -> x0``: a uniform sample of the eps ball around ``x``.
    measure : callable
        ``delta (B, ...) -> (B,)``: the per-sample norm.
    """

    name: str
    normalize: Callable[[Tensor], Tensor]
    project: Callable[[Tensor, Tensor, float], Tensor]
    random_start: Callable[[Tensor, float], Tensor]
    measure: Callable[[Tensor], Tensor]


LINF = Norm("linf", torch.sign, linf_project, linf_random_start, linf_norms)
L2 = Norm("l2", l2_normalize, l2_project, l2_random_start, l2_norms)

#: The norms by name (the ``norm=`` option of attacks that take one).
NORMS: dict[str, Norm] = {norm.name: norm for norm in (LINF, L2)}


# --------------------------------------------------------------------------------------
# Hyperparameter constraints (the one family of idefender_gpu._param_validation)
# --------------------------------------------------------------------------------------


def _is_bounds(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(b, Real) and not isinstance(b, bool) and math.isfinite(b) for b in value)
        and value[0] < value[1]
    )


#: ``(low, high)``: two finite real numbers with ``low < high``.
BOUNDS = Predicate(_is_bounds, "a pair (low, high) of finite real numbers with low < high")
#: A finite real number > 0.
POSITIVE = Interval(Real, 0, None, closed="neither")
#: A finite real number >= 0.
NON_NEGATIVE = Interval(Real, 0, None, closed="left")
#: An int >= 1.
COUNT = Interval(Integral, 1, None, closed="left")


def has_log_density(detector: Any) -> bool:
    """Whether ``detector`` provides a callable ``log_density``."""
    return callable(getattr(detector, "log_density", None))


#: A detector: ``log_density(x) -> (B, K)`` and ``thresholds_ (K,)``.
DETECTOR = Predicate(
    has_log_density,
    "a detector with log_density(x) -> Tensor (B, n_classes) and thresholds_ (n_classes,), "
    "like idefender_gpu.IDefender",
)


# --------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------


class Attack(ABC):
    """Base class of every attack: validation, device, eval mode, clamping, detaching.

    Subclasses declare their hyperparameters in ``_parameter_constraints`` (a table
    ``{name: [constraint, ...]}`` of :mod:`idefender_gpu._param_validation`; its order is
    the order of ``repr``), pass them keyword-only to ``Attack.__init__``, which validates
    and stores them, and implement ``_perturb(x, y)``, which receives ``x`` on the model's
    device with gradients enabled and the model in eval mode, and returns the adversarial
    batch. An attack keeps no state between calls.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits of shape (B, n_classes).
    bounds : tuple of float, default=(0.0, 1.0)
        Valid input range ``(low, high)``; inputs must lie in it and outputs stay in it.
    **params
        The subclass's hyperparameters, each declared in ``_parameter_constraints``.

    Raises
    ------
    InvalidParameterError
        (a ``ValueError`` and a ``TypeError``) naming the first hyperparameter that
        satisfies none of its constraints; NaN and infinity never satisfy a real interval.
    """

    #: Hyperparameter constraints, in ``repr`` order (``model`` and ``detector`` not shown).
    _parameter_constraints: ClassVar[dict[str, list]] = {
        "model": [InstanceOf(nn.Module)],
        "bounds": [BOUNDS],
    }

    def __init__(self, model: nn.Module, *, bounds: tuple[float, float] = (0.0, 1.0), **params: Any) -> None:
        values = {"model": model, **params, "bounds": bounds}
        table = self._parameter_constraints
        validate_params(type(self).__name__, values, {name: table[name] for name in values})
        values["bounds"] = (float(bounds[0]), float(bounds[1]))
        for name, value in values.items():
            setattr(self, name, value)

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
        has_tensors = any(True for _ in self.model.parameters()) or any(True for _ in self.model.buffers())
        device = model_device(self.model) if has_tensors else x.device  # parameter-free: x's device
        x_dev, y_dev = x.detach().to(device), y.to(device=device, dtype=torch.int64)
        with ExitStack() as stack:
            for module in self._modules():
                stack.enter_context(eval_mode(module))  # each restores its own flags, LIFO
            stack.enter_context(torch.enable_grad())
            with torch.no_grad():
                probe = self.model(x_dev[:1])
            n_classes = self._check_logits(probe)
            self._check_labels(y_dev, n_classes)
            self._check_call(n_classes, device)
            x_adv = self._perturb(x_dev, y_dev)
        low, high = self.bounds
        return x_adv.detach().clamp(low, high).to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        names = [n for n in self._parameter_constraints if n not in ("model", "detector", "bounds")]
        params = ", ".join(f"{name}={getattr(self, name)!r}" for name in (*names, "bounds"))
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
    loss of the target class); ``normalize``, ``project_eps`` and the random start come
    from the class attribute ``norm`` (:data:`LINF` or :data:`L2`). Subclasses provide
    ``eps``, ``steps``, ``step_size``, ``random_start`` and ``targeted``.
    """

    norm: ClassVar[Norm]
    eps: float
    steps: int
    step_size: float
    random_start: bool = False
    targeted: bool = False

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
        norm = self.norm
        sign = -1.0 if self.targeted else 1.0
        x = x.detach()
        x_adv = norm.random_start(x, self.eps).clamp(low, high) if self.random_start else x.clone()
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(x_adv, y).sum(), x_adv)
            with torch.no_grad():
                x_adv = x_adv + (sign * self.step_size) * norm.normalize(grad)
                x_adv = norm.project(x_adv, x, self.eps).clamp(low, high)
        return x_adv.detach()


class IterativeAttack(GradientAttack):
    """The iterative gradient attacks' one constructor: ``eps``, ``alpha``, ``steps``,
    ``random_start``, ``targeted``, ``bounds`` (BIM and iterative L2 differ only in ``norm``).
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {
        **Attack._parameter_constraints,
        "eps": [POSITIVE],
        "alpha": [POSITIVE],
        "steps": [COUNT],
        "random_start": ["boolean"],
        "targeted": ["boolean"],
    }

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        alpha: float,
        steps: int = 10,
        random_start: bool = False,
        targeted: bool = False,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
                         targeted=targeted, bounds=bounds)

    @property
    def step_size(self) -> float:  # type: ignore[override]
        """The paper's :math:`\\alpha`."""
        return self.alpha
