"""Adversarial attacks of the I-defender paper, on one small base class.

Every attack is built with its model (and the detector where it needs one) and called as
``attack(x, y) -> x_adv``: inputs of shape (B, ...) within ``bounds`` (``[0, 1]`` by
default), integer labels of shape (B,), untargeted by default; the batch runs on the
model's device, the model's modes are restored afterwards, and the result is detached,
inside ``bounds``, with the dtype and device of ``x``.

FGSM
    Fast gradient sign method, paper Eq. 1 (Linf).
BIM
    Basic iterative method / iterative Linf, paper Eq. 2; PGD with ``random_start=True``.
IterativeL2
    Iterative L2 of Metzen et al., paper Eq. 3.
DeepFool
    Minimal L2 perturbation to the nearest linearised boundary, multi-class, batched.
GrayBox
    Gray-box attack on classifier + I-defender, paper Eq. 6 (and a hinge form).
MarginPGD
    Adaptive margin-loss attack on a defended (K+1)-logit model with APGD's step schedule,
    random restarts and targets (Linf or L2).
DefendedModel
    Classifier + detector as one (K+1)-class ``nn.Module`` ("rejected" is class K, a
    well-scaled logit), for attacking the defended model end to end with any attack library.
"""

from idefender_gpu.attacks._base import Attack, GradientAttack
from idefender_gpu.attacks.bim import BIM
from idefender_gpu.attacks.deepfool import DeepFool
from idefender_gpu.attacks.defended import DefendedModel
from idefender_gpu.attacks.fgsm import FGSM
from idefender_gpu.attacks.graybox import GrayBox
from idefender_gpu.attacks.l2_iterative import IterativeL2
from idefender_gpu.attacks.margin import MarginPGD

__all__ = [
    "Attack",
    "BIM",
    "DeepFool",
    "DefendedModel",
    "FGSM",
    "GradientAttack",
    "GrayBox",
    "IterativeL2",
    "MarginPGD",
]
