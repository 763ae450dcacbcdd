"""Gray-box attack on a classifier defended by I-defender (paper Eq. 6)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idefender_gpu._param_validation import Options
from idefender_gpu.attacks._base import (
    COUNT,
    DETECTOR,
    NON_NEGATIVE,
    POSITIVE,
    Attack,
    GradientAttack,
)
from idefender_gpu.attacks.bim import BIM
from idefender_gpu.attacks.fgsm import FGSM
from idefender_gpu.attacks.l2_iterative import IterativeL2
from idefender_gpu.exceptions import NotFittedError

__all__ = ["GrayBox", "detector_thresholds"]

#: Base attacks by name: each brings its own normalize / project / random start.
BASES: dict[str, type[GradientAttack]] = {"fgsm": FGSM, "bim": BIM, "l2": IterativeL2}

OBJECTIVES = ("paper", "hinge")


def detector_thresholds(detector: Any, n_classes: int, like: Tensor, *, exact: bool = False) -> Tensor:
    """``detector.thresholds_`` as a ``(n_classes,)`` tensor with the dtype/device of ``like``
    (with ``exact=True``: in the dtype promoted from theirs and ``like``'s, so comparisons
    are the detector's own).

    Raises :class:`~idefender_gpu.exceptions.NotFittedError` when the detector has no
    thresholds yet and ``ValueError`` when their shape does not match the classifier.
    """
    thresholds = getattr(detector, "thresholds_", None)
    if thresholds is None:
        raise NotFittedError(
            f"This {type(detector).__name__} detector has no thresholds_ yet; fit it before "
            "attacking through it."
        )
    thresholds = torch.as_tensor(thresholds)
    if thresholds.shape != (n_classes,):
        raise ValueError(
            f"detector.thresholds_ must have shape ({n_classes},) to match the classifier's "
            f"{n_classes} classes; got shape {tuple(thresholds.shape)}"
        )
    dtype = torch.promote_types(thresholds.dtype, like.dtype) if exact else like.dtype
    return thresholds.to(device=like.device, dtype=dtype)


class GrayBox(Attack):
    r"""Gray-box attack: fool the classifier while keeping the detector's likelihood high.

    Paper Eq. 6 (Zheng & Hong, Section 4.3). The base attack (FGSM, BIM or iterative L2)
    ascends, instead of the cross-entropy alone,

    .. math::
        J(x, y_s \mid \theta) + \alpha \prod_{k \ne s} \mathrm{Reject}(x, y_k)
        \times \max_{k \ne s} \log P(\mathcal H(x) \mid y_k)

    with :math:`\mathrm{Reject}(x, c) = [\log P(\mathcal H(x) \mid c) < TH_c]`
    (paper Eq. 5). The product is a gate: while every class other than the true one
    rejects :math:`x`, the attack also climbs the best of their log-likelihoods; once one
    of them accepts :math:`x`, only the cross-entropy is left. The gate is an indicator and
    carries no gradient.

    ``objective="hinge"`` uses the form common in adaptive-attack practice instead:

    .. math::
        J(x, y_s \mid \theta) + \alpha \min\big(0,\ \log P(\mathcal H(x) \mid t) - TH_t\big),
        \qquad t = \arg\max_{k \ne s} f_k(x),

    which penalises :math:`x` only while its likelihood under :math:`t`, the class the
    classifier is being moved to (its best-scoring wrong class at the current iterate), is
    below that class's threshold. I-defender scores an input under its predicted class, so
    this is the constraint a successful evasion has to meet.

    Both terms use ``detector.log_density`` itself (differentiable in ``x``) and
    ``detector.thresholds_``; the attack keeps no copy of the detector's math.

    Distance: Linf for ``base="fgsm"`` and ``"bim"``, L2 for ``base="l2"``.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits of shape (B, n_classes), for the cross-entropy term.
        Usually ``detector.model`` (the attacker's own, fully known defended model).
    detector : object
        Fitted detector with ``log_density(x) -> Tensor (B, n_classes)``, differentiable
        in ``x``, and ``thresholds_`` of shape (n_classes,) (log-density thresholds:
        class ``c`` rejects when ``log_density[:, c] < thresholds_[c]``), such as
        :class:`idefender_gpu.IDefender`.
    base : {'fgsm', 'bim', 'l2'}, default='bim'
        Base attack: FGSM (Eq. 1), BIM / iterative Linf (Eq. 2) or iterative L2 (Eq. 3).
    alpha : float, default=1.0
        Weight of the detector term, >= 0 (the paper's :math:`\alpha` of Eq. 6; the paper
        uses 1e-3 to 1). With 0 the attack is its base attack.
    eps : float
        Radius of the eps ball (Linf or L2 per ``base``), > 0.
    step_size : float, optional
        Step size of ``base="bim"`` / ``"l2"`` (their ``alpha`` of Eq. 2 / 3), > 0;
        required for them, not accepted for ``"fgsm"`` (which steps by ``eps``).
    steps : int, optional
        Iterations of ``base="bim"`` / ``"l2"`` (default 10); not accepted for ``"fgsm"``.
    random_start : bool, default=False
        Random start in the eps ball (``"bim"`` / ``"l2"`` only).
    objective : {'paper', 'hinge'}, default='paper'
        The detector term: the gated Eq. 6, or the hinge form above.
    bounds : tuple of float, default=(0.0, 1.0)
        Valid input range; inputs must lie in it and every iterate is clamped to it.

    Raises
    ------
    NotFittedError
        When called with a detector that has no ``thresholds_`` yet.

    Notes
    -----
    ``attack(x, y)`` takes ``x`` of shape (B, ...) within ``bounds`` and the true labels
    ``y`` of shape (B,), and returns a detached tensor of the same shape, dtype and device
    as ``x``, inside the base attack's eps ball. The model (and the detector's model, and
    the detector if it is a module) are in eval mode during the attack and get their
    previous modes back afterwards. Each step runs the classifier once for the
    cross-entropy and ``detector.log_density`` once.

    References
    ----------
    .. [1] Z. Zheng and P. Hong, "Robust Detection of Adversarial Attacks by Modeling the
       Intrinsic Properties of Deep Neural Networks", NeurIPS 2018, Eq. 5 and 6.
    .. [2] N. Carlini and D. Wagner, "Adversarial Examples Are Not Easily Detected:
       Bypassing Ten Detection Methods", AISec 2017.
    .. [3] F. Tramer, N. Carlini, W. Brendel and A. Madry, "On Adaptive Attacks to
       Adversarial Example Defenses", NeurIPS 2020.

    Examples
    --------
    A stand-in detector: one unit Gaussian per class on the logits.

    >>> import math
    >>> import torch
    >>> from torch import nn
    >>> from idefender_gpu.attacks import GrayBox
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> class Detector:
    ...     model = model
    ...     thresholds_ = torch.full((3,), -4.0)
    ...     def log_density(self, x):
    ...         h = model(x)                                        # (B, 3) hidden state
    ...         d = (h[:, None, :] - 3 * torch.eye(3)).square().sum(-1)  # (B, 3)
    ...         return -0.5 * d - 1.5 * math.log(2 * math.pi)
    >>> attack = GrayBox(model, Detector(), base="bim", alpha=0.5, eps=0.1, step_size=0.025)
    >>> attack
    GrayBox(base='bim', alpha=0.5, eps=0.1, step_size=0.025, steps=10, random_start=False, objective='paper', bounds=(0.0, 1.0))
    >>> x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    >>> x_adv = attack(x, y)
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
    True
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {
        **Attack._parameter_constraints,
        "detector": [DETECTOR],
        "base": [Options(str, BASES)],
        "alpha": [NON_NEGATIVE],
        "eps": [POSITIVE],
        "step_size": [POSITIVE, None],
        "steps": [COUNT, None],
        "random_start": ["boolean"],
        "objective": [Options(str, OBJECTIVES)],
    }

    def __init__(
        self,
        model: nn.Module,
        detector: Any,
        *,
        base: str = "bim",
        alpha: float = 1.0,
        eps: float,
        step_size: float | None = None,
        steps: int | None = None,
        random_start: bool = False,
        objective: str = "paper",
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        if base == "fgsm":
            for name, value, default in (
                ("step_size", step_size, None), ("steps", steps, None), ("random_start", random_start, False),
            ):
                if value != default:
                    raise ValueError(
                        f"The '{name}' parameter is not used by base='fgsm' (one step of size "
                        f"eps from x); got {value!r}. Use base='bim' for an iterative attack."
                    )
        elif base in BASES and step_size is None:
            raise ValueError(
                f"The 'step_size' parameter is required for base={base!r} (the step size "
                "of paper Eq. 2 / 3); got None."
            )
        elif base in BASES and steps is None:
            steps = 10
        super().__init__(model, detector=detector, base=base, alpha=alpha, eps=eps, step_size=step_size,
                         steps=steps, random_start=random_start, objective=objective, bounds=bounds)

    def _base_attack(self) -> GradientAttack:
        """The base attack with this attack's hyperparameters (built per call: no state)."""
        if self.base == "fgsm":
            return FGSM(self.model, eps=self.eps, bounds=self.bounds)
        return BASES[self.base](
            self.model, eps=self.eps, alpha=self.step_size, steps=self.steps,
            random_start=self.random_start, bounds=self.bounds,
        )

    def _modules(self) -> list[nn.Module]:
        modules = [self.model]
        for candidate in (getattr(self.detector, "model", None), self.detector):
            if isinstance(candidate, nn.Module):
                modules.append(candidate)
        return modules

    def _check_call(self, n_classes: int, device: torch.device) -> None:
        detector_thresholds(self.detector, n_classes, torch.empty(0, device=device))

    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        return self._base_attack()._ascend(x, y, self._objective)

    def _objective(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample objective ``(B,)``: cross-entropy plus ``alpha`` times the detector term."""
        logits = self.model(x)  # (B, n_classes)
        loss = F.cross_entropy(logits, y, reduction="none")  # (B,)
        if self.alpha == 0:
            return loss  # exactly the base attack's loss
        log_density = self.detector.log_density(x)  # (B, n_classes)
        n_classes = logits.shape[1]
        if log_density.shape != logits.shape:
            raise ValueError(
                f"detector.log_density(x) must have shape {tuple(logits.shape)} (B, n_classes); "
                f"got {tuple(log_density.shape)}"
            )
        thresholds = detector_thresholds(self.detector, n_classes, log_density)  # (n_classes,)
        other = torch.ones_like(log_density, dtype=torch.bool).scatter(1, y[:, None], False)  # (B, n_classes)
        if self.objective == "paper":
            all_reject = ((log_density < thresholds) | ~other).all(1)  # (B,) the product of Eq. 6
            best = log_density.masked_fill(~other, float("-inf")).amax(1)  # (B,) max over k != s
            term = torch.where(all_reject, best, torch.zeros_like(best))  # (B,)
        else:
            target = logits.detach().masked_fill(~other, float("-inf")).argmax(1)  # (B,)
            margin = log_density.gather(1, target[:, None])[:, 0] - thresholds[target]  # (B,)
            term = margin.clamp(max=0.0)  # (B,) zero once t accepts x
        return loss + self.alpha * term
