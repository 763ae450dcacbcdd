"""Margin-loss PGD with APGD's step-size schedule, for defended (K+1)-logit models."""

from __future__ import annotations

import math
from numbers import Integral
from typing import ClassVar

import torch
from torch import Tensor, nn

from idefender_gpu._param_validation import Interval, Options
from idefender_gpu.attacks._base import COUNT, NORMS, POSITIVE, Attack, expand_to

__all__ = ["MarginPGD", "apgd_checkpoints"]

#: APGD's constants (Croce & Hein 2020, Section 3): momentum, the fraction of steps that
#: must raise the loss between two checkpoints, the first checkpoint and the shrinking
#: and smallest gaps between checkpoints (fractions of ``steps``).
MOMENTUM = 0.75
RHO = 0.75
FIRST_CHECKPOINT, GAP_DECREASE, MIN_GAP = 0.22, 0.03, 0.06


def apgd_checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints ``ceil(p_j * steps)``: ``p_0 = 0``, ``p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, below or at ``steps``."""
    p = [0.0, FIRST_CHECKPOINT]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - GAP_DECREASE, MIN_GAP))
    points = {math.ceil(round(q * steps, 9)) for q in p[1:]}  # round: 0.22 + 0.19 is not 0.41
    return sorted(w for w in points if 0 < w <= steps)


class MarginPGD(Attack):
    r"""Margin-loss PGD with APGD's step schedule, random restarts and targets; keeps the best.

    An adaptive attack on a classifier defended by a detector and wrapped as one
    (K+1)-logit model (:class:`DefendedModel`: logit K is "rejected"). It maximises the
    margin of the best wrong class over both the true class and "rejected",

    .. math::
        L(x) = \max_{j \notin \{y, K\}} z_j(x) - \max\big(z_y(x), z_K(x)\big),

    which is positive exactly when the defended model predicts a wrong class and the
    detector accepts the input (an evasion). Targeted runs (towards the ``n_targets``
    best-scoring wrong classes at the clean input, as APGD-T) use the margin
    :math:`z_t - \max_{j \ne t} z_j` and, with ``targeted_loss='both'`` (the default),
    then the targeted cross-entropy over all outputs, :math:`z_t - \log \sum_j e^{z_j}`
    (the loss of torchattacks' and ART's targeted PGD, an ensemble of losses as in
    AutoAttack). The two fail on different images: the margin's gradient is that of two
    logits only, and switches between the class logits and the reject logit as the input
    crosses the detector's threshold; the cross-entropy's weighs every logit by its
    softmax share, the reject logit included, so it also pushes down the detector's margin
    while the input is accepted. On a plain K-logit classifier (no reject logit) it is an
    ordinary margin (Carlini-Wagner) attack.

    Each run is APGD (Croce & Hein 2020): step size :math:`\eta = 2\epsilon`, momentum
    0.75, and at each checkpoint (22%, then gaps shrinking by 3% down to 6% of the steps)
    the step size is halved, and the run restarts from its best point, for every sample
    whose loss rose in fewer than 75% of the steps since the previous checkpoint, or whose
    best loss and step size both stayed the same. Runs: ``n_restarts`` untargeted runs, then
    per target ``n_restarts`` runs of each targeted loss, each from a uniform random point
    of the eps ball, each on the samples not yet evaded. A sample's result is its first
    evasion, else the point of highest untargeted margin seen.

    Distance: Linf (``norm="linf"``) or L2 (``norm="l2"``).

    Parameters
    ----------
    model : torch.nn.Module
        Returns logits (B, K + 1) with a reject logit (such as :class:`DefendedModel`), or
        (B, K) for a plain classifier. Put in eval mode during the attack.
    eps : float
        Radius of the eps ball, > 0.
    norm : {'linf', 'l2'}, default='linf'
        The threat model.
    steps : int, default=100
        Iterations per run, >= 1.
    n_restarts : int, default=1
        Random restarts per loss (untargeted, and each target), >= 1.
    n_targets : int, default=3
        Targeted runs towards the ``n_targets`` best-scoring wrong classes at the clean
        input (capped at K - 1), >= 0; 0 runs the untargeted margin only (AutoAttack's
        APGD-T uses 9). The targeted runs cost little: they attack only the samples the
        earlier runs did not turn into evasions.
    targeted_loss : {'both', 'margin', 'ce'}, default='both'
        The loss of the targeted runs: the margin, the cross-entropy over all outputs, or
        both in turn (margin first). On model F with I-defender (Fashion-MNIST, 200 test
        images, 40 steps per run) the cross-entropy runs lift MarginPGD above torchattacks'
        three-target PGD where the margin alone was 1-2 points below it
        (``benchmarks/results/reproduce-fashion-mnist/adaptive/pgd-recipe.md``).
    reject_index : int, None or 'auto', default='auto'
        Index of the reject logit: ``'auto'`` reads ``model.reject_index`` (None if the
        model has none: a plain classifier).
    bounds : tuple of float, default=(0.0, 1.0)
        Valid input range; inputs must lie in it and every iterate is clamped to it.

    See Also
    --------
    DefendedModel : the (K+1)-logit wrapper of a classifier and its detector.
    GrayBox : the paper's gray-box attack (Eq. 6).

    Notes
    -----
    ``attack(x, y)`` takes ``x`` (B, ...) within ``bounds`` and the true labels ``y``
    (B,) in ``[0, K)``, and returns a detached tensor of the same shape, dtype and device
    inside the eps ball. Each step runs the model once with gradients and never synchronises
    with the host; each run does once (to gather the samples not yet evaded). Random starts draw from torch's global
    generator on the model's device (seed it for reproducible runs).

    References
    ----------
    .. [1] F. Croce and M. Hein, "Reliable Evaluation of Adversarial Robustness with an
       Ensemble of Diverse Parameter-free Attacks", ICML 2020.
    .. [2] N. Carlini and D. Wagner, "Adversarial Examples Are Not Easily Detected:
       Bypassing Ten Detection Methods", AISec 2017.
    .. [3] F. Tramer, N. Carlini, W. Brendel and A. Madry, "On Adaptive Attacks to
       Adversarial Example Defenses", NeurIPS 2020.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from idefender_gpu.attacks import MarginPGD
    >>> _ = torch.manual_seed(0)
    >>> classifier = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    >>> images, labels = torch.rand(6, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0, 1])
    >>> attack = MarginPGD(classifier, eps=0.05, steps=10, n_targets=2)
    >>> attack.n_targets, attack.targeted_loss
    (2, 'both')
    >>> adversarial = attack(images, labels)
    >>> bool((adversarial - images).abs().max() <= 0.05 + 1e-6)
    True
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {
        **Attack._parameter_constraints,
        "eps": [POSITIVE],
        "norm": [Options(str, NORMS)],
        "steps": [COUNT],
        "n_restarts": [COUNT],
        "n_targets": [Interval(Integral, 0, None, closed="left")],
        "targeted_loss": [Options(str, {"both", "margin", "ce"})],
        "reject_index": [Options(str, {"auto"}), Interval(Integral, 0, None, closed="left"), None],
    }

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        norm: str = "linf",
        steps: int = 100,
        n_restarts: int = 1,
        n_targets: int = 3,
        targeted_loss: str = "both",
        reject_index: int | str | None = "auto",
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(model, eps=eps, norm=norm, steps=steps, n_restarts=n_restarts,
                         n_targets=n_targets, targeted_loss=targeted_loss, reject_index=reject_index,
                         bounds=bounds)

    # -- the reject logit ---------------------------------------------------------------

    def _reject(self) -> int | None:
        if self.reject_index == "auto":
            return getattr(self.model, "reject_index", None)
        return self.reject_index

    def _check_call(self, n_classes: int, device: torch.device) -> None:
        reject = self._reject()
        if reject is not None and reject >= n_classes:
            raise ValueError(
                f"reject_index must be an output index of the model, in [0, {n_classes}); got {reject}"
            )

    # -- losses -------------------------------------------------------------------------

    def _margins(self, logits: Tensor, y: Tensor, target: Tensor | None, loss: str = "margin") -> Tensor:
        """Per-sample loss ``(b,)``: the untargeted margin (``target`` None), or towards
        ``target`` the margin (``loss='margin'``) or the cross-entropy (``loss='ce'``)."""
        reject = self._reject()
        rows = torch.arange(len(y), device=y.device)
        if target is not None and loss == "ce":
            return logits[rows, target] - logits.logsumexp(1)
        if target is not None:
            others = logits.clone()
            others[rows, target] = float("-inf")
            return logits[rows, target] - others.amax(1)
        wrong = logits.clone()
        wrong[rows, y] = float("-inf")
        guard = logits[rows, y]
        if reject is not None:
            wrong[:, reject] = float("-inf")
            guard = torch.maximum(guard, logits[:, reject])
        return wrong.amax(1) - guard

    def _evaluate(self, x_adv: Tensor, y: Tensor, target: Tensor | None,
                  kind: str = "margin") -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, grad, untargeted margin)`` at ``x_adv``: ``(b,)``, ``(b, ...)``, ``(b,)``."""
        x_adv = x_adv.detach().requires_grad_(True)
        logits = self.model(x_adv)  # (b, n_outputs)
        loss = self._margins(logits, y, target, kind)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
        margin = loss.detach() if target is None else self._margins(logits.detach(), y, None)
        return loss.detach(), grad, margin

    # -- one APGD run ---------------------------------------------------------------------

    def _run(self, x: Tensor, y: Tensor, target: Tensor | None, kind: str = "margin") -> tuple[Tensor, Tensor]:
        """One APGD run on the batch ``x`` (b, ...): ``(x_out, best untargeted margin)``.

        ``x_out`` is the first evading iterate (untargeted margin > 0) of each sample, else
        its iterate of highest untargeted margin.
        """
        norm, eps = NORMS[self.norm], self.eps
        low, high = self.bounds

        def project(z: Tensor) -> Tensor:
            return norm.project(z, x, eps).clamp(low, high)

        x_adv = norm.random_start(x, eps).clamp(low, high)
        loss, grad, margin = self._evaluate(x_adv, y, target, kind)
        x_best, loss_best, grad_best = x_adv, loss, grad  # best of the run's loss
        x_out, margin_out = x_adv, margin  # first evasion, else best untargeted margin
        eta = torch.full((len(x),), 2.0 * eps, dtype=x.dtype, device=x.device)  # (b,)
        x_prev = x_adv
        loss_prev = loss
        rises = torch.zeros_like(loss)  # steps that raised the loss since the last checkpoint
        best_at_check, halved_at_check = loss_best.clone(), torch.ones_like(loss, dtype=torch.bool)
        checkpoints, last_check = apgd_checkpoints(self.steps), 0
        for k in range(1, self.steps + 1):
            with torch.no_grad():
                z = project(x_adv + expand_to(eta, x) * norm.normalize(grad))
                if k > 1:  # momentum
                    z = project(x_adv + MOMENTUM * (z - x_adv) + (1.0 - MOMENTUM) * (x_adv - x_prev))
                x_prev, x_adv = x_adv, z
            loss, grad, margin = self._evaluate(x_adv, y, target, kind)
            with torch.no_grad():
                # Keep the first evasion (margin > 0), else the highest untargeted margin.
                keep = (margin > margin_out) & ~(margin_out > 0)  # (b,)
                x_out = torch.where(expand_to(keep, x), x_adv, x_out)
                margin_out = torch.where(keep, margin, margin_out)
                rises += loss > loss_prev
                loss_prev = loss
                better = loss > loss_best  # (b,)
                x_best = torch.where(expand_to(better, x), x_adv, x_best)
                grad_best = torch.where(expand_to(better, x), grad, grad_best)
                loss_best = torch.where(better, loss, loss_best)
                if k in checkpoints:
                    stalled = (rises < RHO * (k - last_check)) | (~halved_at_check & (loss_best <= best_at_check))
                    eta = torch.where(stalled, eta / 2.0, eta)
                    x_adv = torch.where(expand_to(stalled, x), x_best, x_adv)  # restart from the best
                    grad = torch.where(expand_to(stalled, x), grad_best, grad)
                    x_prev = torch.where(expand_to(stalled, x), x_adv, x_prev)  # no momentum across
                    loss_prev = torch.where(stalled, loss_best, loss_prev)
                    rises.zero_()
                    best_at_check, halved_at_check, last_check = loss_best.clone(), stalled, k
        return x_out, margin_out

    # -- restarts and targets ---------------------------------------------------------------

    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            logits = self.model(x)
        margin_best = self._margins(logits, y, None)  # (B,) the clean point counts too
        x_best = x.clone()
        reject = self._reject()
        n_classes = logits.shape[1] - (reject is not None)
        ranking = logits.clone()
        ranking[torch.arange(len(y), device=y.device), y] = float("-inf")
        if reject is not None:
            ranking[:, reject] = float("-inf")
        n_targets = min(self.n_targets, n_classes - 1)
        targets = ranking.topk(n_targets, dim=1).indices if n_targets else None  # (B, n_targets)
        kinds = ("margin", "ce") if self.targeted_loss == "both" else (self.targeted_loss,)
        runs = [(None, "margin")] * self.n_restarts + [(t, kind) for t in range(n_targets) for kind in kinds
                                                       for _ in range(self.n_restarts)]
        for run, kind in runs:
            todo = (margin_best <= 0).nonzero().squeeze(1)  # samples not evaded yet
            if todo.numel() == 0:
                break
            target = None if run is None else targets[todo, run]
            x_run, margin_run = self._run(x[todo], y[todo], target, kind)
            better = margin_run > margin_best[todo]
            x_best[todo[better]] = x_run[better]
            margin_best[todo[better]] = margin_run[better]
        return x_best
