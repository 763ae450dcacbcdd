"""Classifier plus detector as one (K+1)-class model, for end-to-end attacks."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from idefender_gpu._param_validation import InstanceOf, Options, check_param, validate_params
from idefender_gpu.attacks._base import DETECTOR, POSITIVE
from idefender_gpu.attacks.graybox import detector_thresholds
from idefender_gpu.features import model_device, model_dtype

__all__ = ["DefendedModel"]

#: How the log-likelihood margin becomes logits: ``g(m)``, odd, increasing, ``g(0) = 0``.
TRANSFORMS = {
    "asinh": lambda margin, unit: torch.asinh(margin / unit),
    "linear": lambda margin, unit: margin / unit,
}


class DefendedModel(nn.Module):
    r"""A classifier and its detector as one (K+1)-class model; the extra class is "rejected".

    For logits :math:`z(x) \in \mathbb R^K`, the class :math:`c` the detector scores
    :math:`x` under (the classifier's prediction for I-defender; the closest class for a
    Mahalanobis detector with ``score_class="closest"``), its log-density
    :math:`\log P(\mathcal H(x) \mid c)` and threshold :math:`TH_c` (paper Eq. 5), the
    model returns the K logits unchanged plus the "rejected" logit

    .. math::
        z_K(x) = \max_j z_j(x) + \text{scale} \cdot g\Big(
        \frac{TH_c - \log P(\mathcal H(x) \mid c)}{\text{margin\_unit}}\Big),
        \qquad g = \operatorname{asinh} \text{ (default) or the identity.}

    :math:`g` is odd and increasing, so :math:`z_K > \max_j z_j` exactly when the detector
    rejects :math:`x` (log-density strictly below the threshold): ``argmax`` of the K+1
    logits is K exactly where ``detector.reject(x)`` is True and the classifier's
    prediction elsewhere (a tie goes to the classifier, as ``argmax`` takes the first
    maximum; a margin too small to move :math:`z_K` off :math:`\max_j z_j` in floating
    point is pushed to the next representable value on the right side, so the decision
    is exact). The extra logit is differentiable in ``x`` through both the classifier
    and ``detector.log_density``, so any attack library can attack the defended model end
    to end (the construction of Carlini & Wagner, 2017).

    **Scaling.** Log-likelihood margins are in nats of a D-dimensional density: on a
    real network they are hundreds to thousands of nats (TH - log p about -1400 to -2700
    on natural Fashion-MNIST inputs with model F) with input gradients 140 to 400 times
    those of the class logits, so a linear reject logit saturates the (K+1)-softmax and
    masks the gradients of off-the-shelf attacks (their success then falls as eps grows).
    The default ``asinh`` transform needs no data: :math:`g(m) \approx
    \operatorname{sign}(m) \log 2|m|` for :math:`|m| \gg 1`, so the reject logit stays
    within about ten logits of the class logits, and its gradient (unit scale and
    margin unit), :math:`\nabla m / \sqrt{1 + m^2}`, is the relative change of the
    margin, of the order of the class logits' gradients (1.3 times them on model F,
    against 400 times for the linear logit). ``transform="linear"`` is the linear
    construction (with a small ``scale``, e.g. 0.01, it is well scaled for one network).

    Parameters
    ----------
    detector : object
        Fitted detector with ``model`` (the classifier, an ``nn.Module`` returning logits
        (B, K)), ``log_density(x) -> Tensor (B, K)`` differentiable in ``x``, and
        ``thresholds_`` of shape (K,), such as :class:`idefender_gpu.IDefender` or
        :class:`idefender_gpu.MahalanobisDetector` (whose ``score_class`` is honoured).
    scale : float, default=1.0
        Logits per unit of :math:`g`, > 0. It does not change which class wins, only how
        steep the "rejected" logit is for gradient-based attacks.
    margin_unit : float or 'auto', default=1.0
        Nats of log-likelihood margin per unit before :math:`g`, > 0 (where ``asinh``
        turns from linear to logarithmic). ``'auto'``: D / 2 for a detector of D features
        in all (the sum of ``detector.n_features_``), the mean of the quadratic term
        :math:`\tfrac12 d^2 \sim \tfrac12 \chi^2_D` of a D-dimensional Gaussian
        log-density, so the margin stays in the linear part of ``asinh`` until it is of
        the order of the density's own spread (576 nats for F's conv2, D = 1152). The
        decision is the same for every unit; only the gradients change.
    transform : {'asinh', 'linear'}, default='asinh'
        :math:`g`.

    Attributes
    ----------
    model : torch.nn.Module
        The classifier (``detector.model``), a submodule: ``eval()`` / ``train()`` and
        ``.to()`` reach it.
    detector : object
        The detector (also a submodule when it is an ``nn.Module``).
    n_classes : int
        K, the classifier's class count (from the fitted ``detector.thresholds_``).
    n_outputs : int
        K + 1, the output width (ART's ``nb_classes``).
    reject_index : int
        K, the index of the "rejected" logit (read by :class:`MarginPGD`).

    Notes
    -----
    Inputs are cast (differentiably) to the classifier's device and floating dtype, so
    float64 or float16 inputs work with a float32 model; the logits come out in the
    model's dtype.

    An untargeted attack on the wrapper with the true label counts "rejected" (class K)
    as a success, which it is not for an attacker who wants to evade the detector: judge
    success with :meth:`evades` (prediction neither the true class nor K), attack with
    :class:`MarginPGD` (whose loss knows the reject logit), or run targeted attacks towards
    classes below K. Each forward runs the classifier and ``detector.log_density`` (which
    usually runs the classifier again to read its hidden state).

    Recipes for outside libraries (eval mode first; ``defended.n_outputs`` outputs). Attack
    towards each of the classifier's best wrong classes in turn (three, as MarginPGD's
    targeted runs and APGD-T) and keep each sample's first evasion: many images can be sent
    to their best wrong class only where the detector rejects, and are evaded through
    another. On model F with I-defender (Fashion-MNIST, held-out ID-95 thresholds, 200 test
    images, 40 steps), torchattacks' PGD succeeds on 52% / 76% of the correctly classified
    images at eps 0.05 / 0.1 with the best wrong class alone, 58% / 84% over three targets,
    MarginPGD on 59% / 87%. Neither a larger step (alpha = 10 eps / steps: 50% at eps 0.05)
    nor keeping the best step (no more than the last) closes the single-target gap; a wider
    ``margin_unit`` (300 nats) adds 2-3 points to it, and ``margin_unit='auto'`` (576 nats
    there) 3 points to MarginPGD at eps 0.05 (``reproduce adaptive`` attacks through it)::

        import torchattacks
        defended = DefendedModel(detector).eval()
        with torch.no_grad():
            ranked = defended.model(x).scatter(1, y[:, None], float("-inf")).topk(3, dim=1).indices
        pgd = torchattacks.PGD(defended, eps=0.1, alpha=2.5 * 0.1 / 40, steps=40, random_start=True)
        pgd.set_mode_targeted_by_label(quiet=True)
        x_adv, todo = x.clone(), torch.ones(len(x), dtype=torch.bool)
        for target in ranked.T:  # targets in [0, K), the best wrong class first; never y
            idx = todo.nonzero().squeeze(1)
            x_t = pgd(x[idx], target[idx])
            hit = defended.evades(x_t, y[idx])
            x_adv[idx[hit]], todo[idx[hit]] = x_t[hit], False
        success = defended.evades(x_adv, y)

        from art.estimators.classification import PyTorchClassifier
        from art.attacks.evasion import ProjectedGradientDescent
        classifier = PyTorchClassifier(model=defended, loss=torch.nn.CrossEntropyLoss(),
                                       input_shape=tuple(x.shape[1:]), nb_classes=defended.n_outputs,
                                       clip_values=(0.0, 1.0))
        art_pgd = ProjectedGradientDescent(classifier, eps=0.1, eps_step=2.5 * 0.1 / 40, max_iter=40,
                                           targeted=True)
        # the same loop, with: x_t = torch.as_tensor(art_pgd.generate(x[idx].numpy(), y=target[idx].numpy()))

    References
    ----------
    .. [1] Z. Zheng and P. Hong, "Robust Detection of Adversarial Attacks by Modeling the
       Intrinsic Properties of Deep Neural Networks", NeurIPS 2018, Eq. 5.
    .. [2] N. Carlini and D. Wagner, "Adversarial Examples Are Not Easily Detected:
       Bypassing Ten Detection Methods", AISec 2017.

    Examples
    --------
    A stand-in detector with one isotropic Gaussian per class on the logits:

    >>> import torch
    >>> from torch import nn
    >>> from idefender_gpu.attacks import DefendedModel, MarginPGD
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> class Gaussians:
    ...     model = net
    ...     thresholds_ = torch.tensor([-3.0, -3.0, -3.0])
    ...     def log_density(self, x):
    ...         return -0.5 * (net(x).unsqueeze(1) - 2 * torch.eye(3)).square().sum(2)  # (B, 3)
    >>> defended = DefendedModel(Gaussians())
    >>> defended.n_outputs, defended.reject_index
    (4, 3)
    >>> x, y = torch.rand(4, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    >>> defended(x).shape, defended(x).dtype
    (torch.Size([4, 4]), torch.float32)
    >>> x_adv = MarginPGD(defended, eps=0.1, steps=20)(x, y)
    >>> defended.evades(x_adv, y).shape
    torch.Size([4])
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "detector": [DETECTOR],
        "scale": [POSITIVE],
        "margin_unit": [POSITIVE, Options(str, {"auto"})],
        "transform": [Options(str, TRANSFORMS)],
    }

    def __init__(self, detector: Any, *, scale: float = 1.0, margin_unit: float | str = 1.0,
                 transform: str = "asinh") -> None:
        super().__init__()
        values = {"detector": detector, "scale": scale, "margin_unit": margin_unit, "transform": transform}
        validate_params(type(self).__name__, values, self._parameter_constraints)
        check_param(getattr(detector, "model", None), "detector.model", [InstanceOf(nn.Module)],
                    type(self).__name__)
        self.model = detector.model
        self.detector = detector
        self.scale = scale
        self.margin_unit = margin_unit
        self.transform = transform

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (B, K + 1): the classifier's K, then "rejected".

        Parameters
        ----------
        x : Tensor of shape (B, ...)
            Inputs of any floating dtype and device (cast to the model's, differentiably).

        Returns
        -------
        logits : Tensor of shape (B, K + 1)
            In the model's dtype, on the model's device.
        """
        dtype = model_dtype(self.model)
        x = x.to(device=model_device(self.model), dtype=dtype if dtype is not None else x.dtype)
        logits = self.model(x)  # (B, K)
        thresholds = detector_thresholds(self.detector, logits.shape[1], logits, exact=True)  # (K,)
        log_density = self.detector.log_density(x)  # (B, K)
        if log_density.shape != logits.shape:
            raise ValueError(
                f"detector.log_density(x) must have shape {tuple(logits.shape)} (B, K); got "
                f"{tuple(log_density.shape)}"
            )
        # The margin in the detector's own precision (promoted from its thresholds' dtype
        # and the density's), so that margin > 0 is exactly its "score < threshold".
        thresholds = thresholds.to(torch.promote_types(thresholds.dtype, log_density.dtype))
        top = logits.max(1).values  # (B,)
        scored = self._scored_class(logits, log_density)  # (B,)
        margin = thresholds[scored] - log_density.to(thresholds.dtype).gather(1, scored[:, None])[:, 0]  # (B,)
        raw = top + self.scale * TRANSFORMS[self.transform](margin, self.unit).to(logits.dtype)
        above = torch.nextafter(top.detach(), torch.full_like(top, float("inf")))
        rejected = torch.where(margin > 0, torch.maximum(raw, above), torch.minimum(raw, top))  # (B,)
        return torch.cat([logits, rejected[:, None]], dim=1)

    def _scored_class(self, logits: Tensor, log_density: Tensor) -> Tensor:
        """The class the detector scores each sample under, ``(B,)`` (its ``score_class``)."""
        if getattr(self.detector, "score_class", "predicted") == "closest":
            return log_density.argmax(1)
        return logits.argmax(1)

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
        if thresholds is None:  # not an AttributeError: nn.Module would replace the message
            raise ValueError(
                f"n_classes needs a fitted detector (thresholds_); fit this "
                f"{type(self.detector).__name__} detector first."
            )
        return len(thresholds)

    @property
    def unit(self) -> float:
        """The margin unit in nats: ``margin_unit``, or D / 2 for ``'auto'``."""
        if self.margin_unit != "auto":
            return float(self.margin_unit)
        widths = getattr(self.detector, "n_features_", None)
        if not isinstance(widths, dict) or not widths:  # not an AttributeError: nn.Module would replace it
            raise ValueError(
                f"margin_unit='auto' needs a fitted detector with n_features_ (a dict of layer widths); "
                f"this {type(self.detector).__name__} detector has none: pass a number."
            )
        return sum(int(w) for w in widths.values()) / 2.0

    @property
    def n_outputs(self) -> int:
        """K + 1, the width of the output (ART's ``nb_classes``)."""
        return self.n_classes + 1

    @property
    def reject_index(self) -> int:
        """K, the index of the "rejected" logit."""
        return self.n_classes

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin_unit={self.margin_unit}, transform={self.transform!r}"
