"""Iterative L2 attack of Metzen et al. (paper Eq. 3)."""

from __future__ import annotations

from idefender_gpu.attacks._base import L2, IterativeAttack

__all__ = ["IterativeL2"]


class IterativeL2(IterativeAttack):
    r"""Iterative L2 attack: L2-normalised gradient steps projected onto the eps ball.

    Paper Eq. 3 (Zheng & Hong, Section 2.1), after Metzen et al. (2017):

    .. math::
        x_{adv}^{i+1} = \mathrm{clip}_{[low, high]}\,\mathrm{project}_{\epsilon}
        \Big\{x_{adv}^{i} + \alpha\,\frac{\nabla_x J(\theta, x_{adv}^{i}, l)}
        {\lVert \nabla_x J(\theta, x_{adv}^{i}, l) \rVert_2}\Big\}

    where :math:`\mathrm{project}_{\epsilon}` rescales the perturbation onto the L2 sphere
    of radius :math:`\epsilon` when it leaves the ball. Gradient norms are floored at
    1e-12, so a zero gradient gives a zero step.

    Distance: L2.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits of shape (B, n_classes). Put in eval mode during the
        attack; its previous mode is restored afterwards.
    eps : float
        L2 radius of the eps ball (over all of a sample's features), > 0.
    alpha : float
        L2 length of each step, > 0.
    steps : int, default=10
        Number of iterations, >= 1.
    random_start : bool, default=False
        Start from a uniform sample of the L2 eps ball instead of ``x``.
    targeted : bool, default=False
        If True, ``y`` holds target classes and the steps descend their cross-entropy.
    bounds : tuple of float, default=(0.0, 1.0)
        Valid input range; inputs must lie in it and every iterate is clamped to it.

    See Also
    --------
    BIM : the Linf counterpart (paper Eq. 2).

    Notes
    -----
    ``attack(x, y)`` takes ``x`` of shape (B, ...) within ``bounds`` and integer labels
    ``y`` of shape (B,), and returns a detached tensor of the same shape, dtype and device
    as ``x`` with ``||x_adv - x||_2 <= eps`` per sample. Clamping to ``bounds`` after the
    projection keeps the point in the ball (the ball is centred on a point of the box).

    References
    ----------
    .. [1] Z. Zheng and P. Hong, "Robust Detection of Adversarial Attacks by Modeling the
       Intrinsic Properties of Deep Neural Networks", NeurIPS 2018, Eq. 3.
    .. [2] J. H. Metzen, T. Genewein, V. Fischer and B. Bischoff, "On Detecting Adversarial
       Perturbations", ICLR 2017.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from idefender_gpu.attacks import IterativeL2
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> attack = IterativeL2(model, eps=0.5, alpha=0.1, steps=10)
    >>> x_adv = attack(x, y)
    >>> bool((x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-6)
    True
    """

    norm = L2
