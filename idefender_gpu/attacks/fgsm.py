"""Fast Gradient Sign Method (paper Eq. 1)."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from idefender_gpu.attacks._base import LINF, POSITIVE, Attack, GradientAttack

__all__ = ["FGSM"]


class FGSM(GradientAttack):
    r"""Fast Gradient Sign Method: one signed-gradient step of size ``eps``.

    Paper Eq. 1 (Zheng & Hong, Section 2.1), after Goodfellow et al. (2015):

    .. math::
        x_{adv} = \mathrm{clip}_{[low, high]}\big(x + \epsilon \cdot
        \mathrm{sign}(\nabla_x J(\theta, x, l))\big)

    with :math:`J` the cross-entropy of the true class :math:`l`.

    Distance: Linf.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning logits of shape (B, n_classes). Put in eval mode during the
        attack; its previous mode is restored afterwards.
    eps : float
        Linf radius of the perturbation, > 0, in the units of ``bounds``.
    targeted : bool, default=False
        If True, ``y`` holds target classes and the step descends their cross-entropy.
    bounds : tuple of float, default=(0.0, 1.0)
        Valid input range; inputs must lie in it and outputs are clamped to it.

    See Also
    --------
    BIM : the iterative version (paper Eq. 2).

    Notes
    -----
    Calling the attack, ``attack(x, y)``, takes ``x`` of shape (B, ...) within ``bounds``
    and integer labels ``y`` of shape (B,), and returns a detached tensor of the same shape,
    dtype and device as ``x``. The gradient comes from ``torch.autograd.grad`` on a detached
    copy of ``x``; the model's parameter gradients are never touched.

    References
    ----------
    .. [1] Z. Zheng and P. Hong, "Robust Detection of Adversarial Attacks by Modeling the
       Intrinsic Properties of Deep Neural Networks", NeurIPS 2018, Eq. 1.
    .. [2] I. Goodfellow, J. Shlens and C. Szegedy, "Explaining and Harnessing Adversarial
       Examples", ICLR 2015.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from idefender_gpu.attacks import FGSM
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> attack = FGSM(model, eps=0.1)
    >>> attack
    FGSM(eps=0.1, targeted=False, bounds=(0.0, 1.0))
    >>> x_adv = attack(x, y)
    >>> x_adv.shape, bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
    (torch.Size([5, 1, 4, 4]), True)
    """

    norm = LINF
    _parameter_constraints: ClassVar[dict[str, list]] = {
        **Attack._parameter_constraints,
        "eps": [POSITIVE],
        "targeted": ["boolean"],
    }

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        targeted: bool = False,
        bounds: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        super().__init__(model, eps=eps, targeted=targeted, bounds=bounds)

    @property
    def steps(self) -> int:
        """One step."""
        return 1

    @property
    def step_size(self) -> float:
        """The whole budget in one step: ``eps``."""
        return self.eps
