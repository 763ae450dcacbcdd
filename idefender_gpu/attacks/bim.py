"""Basic Iterative Method, iterative Linf (paper Eq. 2); with a random start, PGD."""

from __future__ import annotations

from idefender_gpu.attacks._base import LINF, IterativeAttack

__all__ = ["BIM"]


class BIM(IterativeAttack):
    r"""Basic Iterative Method: repeated signed-gradient steps clipped to the eps ball.

    Paper Eq. 2 (Zheng & Hong, Section 2.1), after Kurakin et al. (2017):

    .. math::
        x_{adv}^{i+1} = \mathrm{clip}_{[low, high]}\,\mathrm{clip}_{\epsilon}
        \big\{x_{adv}^{i} + \alpha \cdot \mathrm{sign}(\nabla_x J(\theta, x_{adv}^{i}, l))\big\}

    starting from :math:`x_{adv}^0 = x`, or, with ``random_start=True``, from a uniform
    sample of the eps ball (projected gradient descent, Madry et al. 2018). The paper uses
    10 iterations.

    Distance: Linf.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits of shape (B, n_classes). Put in eval mode during the
        attack; its previous mode is restored afterwards.
    eps : float
        Linf radius of the eps ball, > 0.
    alpha : float
        Step size of each iteration, > 0 (the paper's :math:`\alpha`).
    steps : int, default=10
        Number of iterations, >= 1.
    random_start : bool, default=False
        Start from a uniform sample of the eps ball (PGD) instead of ``x``.
    targeted : bool, default=False
        If True, ``y`` holds target classes and the steps descend their cross-entropy.
    bounds : tuple of float, default=(0.0, 1.0)
        Valid input range; inputs must lie in it and every iterate is clamped to it.

    See Also
    --------
    FGSM : one step of size ``eps`` (paper Eq. 1).
    IterativeL2 : the L2 counterpart (paper Eq. 3).

    Notes
    -----
    ``attack(x, y)`` takes ``x`` of shape (B, ...) within ``bounds`` and integer labels
    ``y`` of shape (B,), and returns a detached tensor of the same shape, dtype and device
    as ``x`` with ``||x_adv - x||_inf <= eps``. Gradients come from ``torch.autograd.grad``;
    the model's parameter gradients are never touched. The random start draws from torch's
    global generator on the model's device (seed it for reproducible runs).

    References
    ----------
    .. [1] Z. Zheng and P. Hong, "Robust Detection of Adversarial Attacks by Modeling the
       Intrinsic Properties of Deep Neural Networks", NeurIPS 2018, Eq. 2.
    .. [2] A. Kurakin, I. Goodfellow and S. Bengio, "Adversarial Examples in the Physical
       World", ICLR Workshop 2017.
    .. [3] A. Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
       ICLR 2018.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from idefender_gpu.attacks import BIM
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> attack = BIM(model, eps=0.1, alpha=0.025, steps=10, random_start=True)
    >>> attack
    BIM(eps=0.1, alpha=0.025, steps=10, random_start=True, targeted=False, bounds=(0.0, 1.0))
    >>> x_adv = attack(x, y)
    >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6), bool(x_adv.min() >= 0), bool(x_adv.max() <= 1)
    (True, True, True)
    """

    norm = LINF
