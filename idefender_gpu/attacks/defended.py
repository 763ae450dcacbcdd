"""Classifier plus detector as one (K+1)-class model, for end-to-end attacks."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from idefender_gpu._param_validation import InstanceOf, check_param, validate_params
from idefender_gpu.attacks._base import DETECTOR, POSITIVE
from idefender_gpu.attacks.graybox import detector_thresholds

__all__ = ["DefendedModel"]


class DefendedModel(nn.Module):
    r"""A classifier and its detector as one (K+1)-class model; the extra class is "rejected".

    For logits :math:`z(x) \in \mathbb R^K`, predicted class :math:`c = \arg\max_j z_j` and
    the detector's log-density :math:`\log P(\mathcal H(x) \mid c)` with threshold
    :math:`TH_c` (paper Eq. 5), the model returns the K logits unchanged plus

    .. math::
        z_K(x) = z_c(x) + \text{scale} \cdot \big(TH_c - \log P(\mathcal H(x) \mid c)\big).

    So :math:`z_K > \max_j z_j` exactly when the detector rejects :math:`x` under its
    predicted class: the argmax of the K+1 logits is K ("rejected") for rejected inputs and
    the classifier's prediction otherwise (a tie, when the log-density equals the threshold,
    goes to the classifier as ``argmax`` takes the first maximum, matching the strict ``<``
    of Eq. 5). The extra logit is differentiable in ``x`` through both the classifier and
    ``detector.log_density``, so any attack library can attack the defended model end to
    end (the construction of Carlini & Wagner, 2017, with the rejection margin measured in
    log-likelihood).

    Parameters
    ----------
    detector : object
        Fitted detector with ``model`` (the classifier, an ``nn.Module`` returning logits
        (B, K)), ``log_density(x) -> Tensor (B, K)`` differentiable in ``x``, and
        ``thresholds_`` of shape (K,), such as :class:`idefender_gpu.IDefender`.
    scale : float, default=1.0
        Logits per unit of log-likelihood margin, > 0. It does not change which class
        wins, only how steep the "rejected" logit is for gradient-based attacks.

    Attributes
    ----------
    model : torch.nn.Module
        The classifier (``detector.model``), a submodule: ``eval()`` / ``train()`` and
        ``.to()`` reach it.
    detector : object
        The detector (also a submodule when it is an ``nn.Module``).

    Notes
    -----
    An untargeted attack on the wrapper with the true label counts "rejected" (class K)
    as a success, which it is not for an attacker who wants to evade the detector: judge
    success with :meth:`evades` (prediction neither the true class nor K), or run targeted
    attacks towards classes below K. Each forward runs the classifier and
    ``detector.log_density`` (which usually runs the classifier again to read its hidden
    state). With float logits, a rejection margin below the resolution of :math:`z_c` can
    round to a tie (then counted as accepted).

    References
    ----------
    .. [1] Z. Zheng and P. Hong, "Robust Detection of Adversarial Attacks by Modeling the
       Intrinsic Properties of Deep Neural Networks", NeurIPS 2018, Eq. 5.
    .. [2] N. Carlini and D. Wagner, "Adversarial Examples Are Not Easily Detected:
       Bypassing Ten Detection Methods", AISec 2017.

    Examples
    --------
    >>> import math
    >>> import torch
    >>> from torch import nn
    >>> from idefender_gpu.attacks import BIM, DefendedModel
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> class Detector:
    ...     model = model
    ...     thresholds_ = torch.full((3,), -4.0)
    ...     def log_density(self, x):
    ...         d = (model(x)[:, None, :] - 3 * torch.eye(3)).square().sum(-1)  # (B, 3)
    ...         return -0.5 * d - 1.5 * math.log(2 * math.pi)
    >>> defended = DefendedModel(Detector())
    >>> x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    >>> defended(x).shape
    torch.Size([4, 4])
    >>> x_adv = BIM(defended, eps=0.1, alpha=0.025, targeted=True)(x, (y + 1) % 3)
    >>> defended.evades(x_adv, y).shape
    torch.Size([4])
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "detector": [DETECTOR],
        "scale": [POSITIVE],
    }

    def __init__(self, detector: Any, *, scale: float = 1.0) -> None:
        super().__init__()
        validate_params(type(self).__name__, {"detector": detector, "scale": scale}, self._parameter_constraints)
        check_param(getattr(detector, "model", None), "detector.model", [InstanceOf(nn.Module)], type(self).__name__)
        self.model = detector.model
        self.detector = detector
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, K + 1): the classifier's K, then "rejected"."""
        logits = self.model(x)  # (B, K)
        thresholds = detector_thresholds(self.detector, logits.shape[1], logits)  # (K,)
        log_density = self.detector.log_density(x)  # (B, K)
        if log_density.shape != logits.shape:
            raise ValueError(
                f"detector.log_density(x) must have shape {tuple(logits.shape)} (B, K); got "
                f"{tuple(log_density.shape)}"
            )
        thresholds = thresholds.to(log_density)
        top, predicted = logits.max(1)  # (B,), (B,)
        margin = thresholds[predicted] - log_density.gather(1, predicted[:, None])[:, 0]  # (B,)
        rejected = top + self.scale * margin  # (B,)
        return torch.cat([logits, rejected[:, None].to(logits.dtype)], dim=1)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Predicted classes (B,) in ``[0, K]``; K means rejected by the detector."""
        return self(x).argmax(1)

    def evades(self, x: Tensor, y: Tensor) -> Tensor:
        """Boolean (B,): misclassified (not ``y``) and accepted (not K) by the defended model."""
        predicted = self.predict(x)
        return (predicted != y.to(predicted.device)) & (predicted != self.n_classes)

    @property
    def n_classes(self) -> int:
        """K, the classifier's class count (the "rejected" index)."""
        thresholds = getattr(self.detector, "thresholds_", None)
        if thresholds is None:
            raise AttributeError("n_classes needs a fitted detector (thresholds_)")
        return len(thresholds)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
