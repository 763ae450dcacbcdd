"""DeepFool, multi-class L2 (paper Section 2.1), vectorised over the batch."""

from __future__ import annotations

from numbers import Integral
from typing import ClassVar

import torch
from torch import Tensor, nn

from idefender_gpu._param_validation import Interval
from idefender_gpu.attacks._base import COUNT, NON_NEGATIVE, NORM_FLOOR, Attack, expand_to

__all__ = ["DeepFool"]

#: Added to ``|f'_l|`` in each step, as in the reference implementation, so a sample
#: lying exactly on a boundary still moves.
_STEP_MARGIN = 1e-4


class DeepFool(Attack):
    r"""DeepFool: the smallest L2 step to the nearest linearised class boundary, repeated.

    Paper Section 2.1 (Zheng & Hong), after Moosavi-Dezfooli et al. (2016). At the current
    point :math:`x_i` of a sample with true class :math:`y`, for every candidate class
    :math:`k \ne y`,

    .. math::
        f'_k = f_k(x_i) - f_y(x_i), \qquad w'_k = \nabla_x f_k(x_i) - \nabla_x f_y(x_i),

    the nearest linearised boundary is :math:`l = \arg\min_k |f'_k| / \lVert w'_k \rVert_2`
    and the step is :math:`r_i = (|f'_l| + 10^{-4})\, w'_l / \lVert w'_l \rVert_2^2`. The
    steps are summed into :math:`r` and :math:`x_{i+1} = \mathrm{clip}_{[low, high]}(x +
    (1 + \text{overshoot})\, r)`, until the prediction leaves :math:`y` or ``max_iter``
    steps are taken. For a linear classifier the first step reaches the nearest boundary
    exactly: :math:`\lVert r \rVert = \min_k |f'_k| / \lVert w'_k \rVert` (plus the margin).

    Distance: L2 (minimal, unbounded: there is no ``eps``).

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits of shape (B, n_classes). Put in eval mode during the
        attack; its previous mode is restored afterwards.
    overshoot : float, default=0.02
        Relative overshoot applied to the summed perturbation, >= 0.
    max_iter : int, default=50
        Maximum number of linearisation steps per sample, >= 1.
    num_classes : int or None, default=10
        Number of candidate classes: the ``num_classes`` highest-scoring classes at the
        clean input, the true class included (the reference implementation's
        ``num_classes``; it bounds the gradients per step to ``num_classes - 1``). ``None``
        (or a value above the model's class count) uses every class. >= 2.
    bounds : tuple of float, default=(0.0, 1.0)
        Valid input range; inputs must lie in it and every iterate is clamped to it.

    Notes
    -----
    The batch is attacked at once: each iteration runs the model on the samples still
    classified as their label (a boolean mask over the batch, one host synchronisation per
    iteration to gather them) and takes ``num_classes - 1`` gradients with
    ``torch.autograd.grad``, one per candidate class, each covering the whole sub-batch.
    Samples that are misclassified to begin with are returned unchanged. This relies on the
    model treating samples independently in eval mode (true of standard layers).

    References
    ----------
    .. [1] Z. Zheng and P. Hong, "Robust Detection of Adversarial Attacks by Modeling the
       Intrinsic Properties of Deep Neural Networks", NeurIPS 2018, Section 2.1.
    .. [2] S.-M. Moosavi-Dezfooli, A. Fawzi and P. Frossard, "DeepFool: a simple and
       accurate method to fool deep neural networks", CVPR 2016.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from idefender_gpu.attacks import DeepFool
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> x = torch.rand(6, 1, 4, 4)
    >>> y = model(x).argmax(1)
    >>> attack = DeepFool(model, overshoot=0.02, max_iter=50, bounds=(-10.0, 10.0))
    >>> attack
    DeepFool(overshoot=0.02, max_iter=50, num_classes=10, bounds=(-10.0, 10.0))
    >>> x_adv = attack(x, y)
    >>> bool((model(x_adv).argmax(1) != y).all())
    True
    """

    _parameter_constraints: ClassVar[dict[str, list]] = {
        **Attack._parameter_constraints,
        "overshoot": [NON_NEGATIVE],
        "max_iter": [COUNT],
        "num_classes": [Interval(Integral, 2, None, closed="left"), None],
    }

    def __init__(
        self,
        model: nn.Module,
        *,
        overshoot: float = 0.02,
        max_iter: int = 50,
        num_classes: int | None = 10,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(model, overshoot=overshoot, max_iter=max_iter, num_classes=num_classes,
                         bounds=bounds)

    def _check_call(self, n_classes: int, device: torch.device) -> None:
        if n_classes < 2:
            raise ValueError(f"DeepFool needs a model with at least 2 classes; got {n_classes}")

    def _perturb(self, x: Tensor, y: Tensor) -> Tensor:
        low, high = self.bounds
        x = x.detach()
        with torch.no_grad():
            logits = self.model(x)  # (B, n_classes)
        n_classes = logits.shape[1]
        n_cand = n_classes if self.num_classes is None else min(self.num_classes, n_classes)
        # Candidate classes other than y: the top of the clean logits, y itself put first.
        ranking = logits.scatter(1, y[:, None], float("inf"))  # (B, n_classes)
        others = ranking.topk(n_cand, dim=1).indices[:, 1:]  # (B, n_cand - 1)

        r_tot = torch.zeros_like(x)  # (B, ...)
        x_adv = x.clone()
        active = logits.argmax(1) == y  # (B,) samples still to move
        for _ in range(self.max_iter):
            index = active.nonzero().squeeze(1)  # (b,)
            if index.numel() == 0:
                break
            x_i = x_adv[index].requires_grad_(True)  # (b, ...)
            logits_i = self.model(x_i)  # (b, n_classes)
            y_i = y[index]
            still = logits_i.argmax(1) == y_i  # (b,)
            active[index] = still
            f_diff = logits_i.gather(1, others[index]) - logits_i.gather(1, y_i[:, None])  # (b, m)
            n_others = f_diff.shape[1]
            w_diff = torch.stack(
                [
                    torch.autograd.grad(f_diff[:, j].sum(), x_i, retain_graph=j < n_others - 1)[0]
                    for j in range(n_others)  # one gradient per candidate class, whole sub-batch
                ],
                dim=1,
            ).flatten(2)  # (b, m, D)
            with torch.no_grad():
                f_diff = f_diff.abs()  # (b, m)
                w_sq = w_diff.square().sum(-1).clamp_min(NORM_FLOOR**2)  # (b, m)
                nearest = (f_diff / w_sq.sqrt()).argmin(1, keepdim=True)  # (b, 1)
                f_l = f_diff.gather(1, nearest)  # (b, 1)
                w_l = w_diff.gather(1, nearest[:, :, None].expand(-1, 1, w_diff.shape[2]))[:, 0]  # (b, D)
                r_i = ((f_l + _STEP_MARGIN) / w_sq.gather(1, nearest)) * w_l  # (b, D)
                r_i = r_i * still[:, None]  # samples already fooled stay where they are
                r_tot[index] += r_i.reshape(x_i.shape)
                x_new = (x[index] + (1.0 + self.overshoot) * r_tot[index]).clamp(low, high)
                x_adv[index] = torch.where(expand_to(still, x_new), x_new, x_adv[index])
        return x_adv
