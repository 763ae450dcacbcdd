"""Mahalanobis baseline: class-conditional Gaussians with one shared covariance (Lee et al. 2018)."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from idefender_gpu._param_validation import Options
from idefender_gpu.detector._base import _DetectorBase
from idefender_gpu.detector._densities import SharedCovarianceGaussians

__all__ = ["MahalanobisDetector"]

SCORE_CLASSES = ("closest", "predicted")


class MahalanobisDetector(_DetectorBase):
    r"""Mahalanobis-distance detector: one Gaussian per class, one covariance for all classes.

    The baseline of Lee et al., *A Simple Unified Framework for Detecting
    Out-of-Distribution Samples and Adversarial Attacks* (NeurIPS 2018), with its raw
    score: no input preprocessing and no logistic regression tuned on adversarial
    examples. Per layer, the class means ``μ_c`` and the pooled within-class covariance
    ``Σ`` (plus ``reg_covar`` on the diagonal) are computed in closed form from the natural
    training data and their true labels, and

    .. math::
        \log p(h \mid c) = \log \mathcal N(h \mid \mu_c, \Sigma)
        = -\tfrac12 (h - \mu_c)^\top \Sigma^{-1} (h - \mu_c) + \text{const},

    so the score is Lee et al.'s confidence score (minus half the squared Mahalanobis
    distance) up to a constant. It has the same API as :class:`IDefender` (``fit``,
    ``calibrate``, ``log_density``, ``score``, ``reject``, ``predict``, ``thresholds_``,
    ``save`` / ``load``) and shares its code; with several layers the log-densities are
    summed.

    Parameters
    ----------
    model : torch.nn.Module
        The classifier, returning logits ``(B, n_classes)``.
    layers : str or sequence of str, optional
        Layer specs as in :class:`IDefender`; default: the input of the last ``nn.Linear``.
    keep : float in (0, 1], default=0.95
        Fraction of each class's natural data the per-class thresholds keep.
    reg_covar : float, default=1e-4
        Added to the diagonal of the shared covariance.
    score_class : {'closest', 'predicted'}, default='closest'
        The class a sample is scored under: 'closest' is Lee et al.'s
        ``max_c log p(h | c)`` (the class with the nearest mean); 'predicted' is the
        classifier's predicted class, as I-defender does. :meth:`reject` compares the
        score with that class's threshold.
    dtype, memory_budget, storage_device, progress
        As in :class:`IDefender` (the parameters here are ``C D + D^2`` values: a storage
        device moves them whole for all-class scoring, the factor and the classes present
        otherwise).

    Raises
    ------
    InvalidParameterError
        As :class:`IDefender`: a hyper-parameter outside this class's
        ``_parameter_constraints`` (NaN and infinity included), or an unknown layer.

    Attributes
    ----------
    model, layers_, n_features_, n_classes_, input_shape_, thresholds_, keep_
        As in :class:`IDefender`.
    means_ : dict of str to Tensor
        Per layer, the class means ``(n_classes, D)``.
    precisions_cholesky_ : dict of str to Tensor
        Per layer, the upper factor ``P (D, D)`` of the shared precision ``Σ⁻¹ = P Pᵀ``.

    Notes
    -----
    :meth:`fit` streams a re-iterable loader twice and never holds every hidden state: one
    pass merges the class counts, means and the pooled within-class scatter (one ``D x D``
    matrix for all classes) batch by batch, one pass scores the training data under their
    true classes for the thresholds. Inside :func:`idefender_gpu.distributed.data_parallel`
    the ranks' moments are all-reduced (the one-process detector to round-off).
    The score under the 'closest' class needs every class's density; under 'predicted'
    only that class is evaluated. The density is evaluated by :func:`idefender_gpu.kernels.log_gaussian_prob` as one
    group whose components are the classes with a ``'tied'`` covariance: the same kernel
    as :class:`IDefender`, differentiable with respect to the input.

    Examples
    --------
    The hidden state of a one-layer classifier is its input (the input of its last
    ``nn.Linear``), so the class means are those of the data:

    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from idefender_gpu import MahalanobisDetector
    >>> labels = torch.arange(90) % 3
    >>> centres = torch.tensor([[0.0, 4.0], [4.0, 0.0], [-4.0, -4.0]])
    >>> inputs = centres[labels] + torch.randn(90, 2, generator=torch.Generator().manual_seed(1))
    >>> classifier = torch.nn.Sequential(torch.nn.Linear(2, 3))
    >>> data = DataLoader(TensorDataset(inputs, labels), batch_size=30)
    >>> detector = MahalanobisDetector(classifier, keep=0.99, progress=False).fit(data)
    >>> torch.allclose(detector.means_["0:input"], centres, atol=0.5)
    True
    >>> detector.score(inputs[:5]).shape, detector.reject(10 * inputs[:5]).all().item()
    (torch.Size([5]), True)
    """

    _density_name = "shared_covariance"
    _parameter_constraints: dict[str, list] = {
        **_DetectorBase._parameter_constraints,
        "score_class": [Options(str, SCORE_CLASSES)],
    }

    def __init__(self, model: nn.Module, layers: str | Sequence[str] | None = None, *, keep: float = 0.95,
                 reg_covar: float = 1e-4, score_class: str = "closest", dtype: Any = None,
                 memory_budget: int | None = None, storage_device: Any = None,
                 progress: bool | None = None) -> None:
        self._init(locals())

    def _config(self) -> dict[str, Any]:
        return {"reg_covar": float(self.reg_covar), "score_class": self.score_class}

    def _streams_fit(self) -> bool:
        return True

    def _moment_kinds(self) -> tuple[bool, bool, bool]:
        return False, False, True  # one pooled scatter (D, D), not one per class

    def _density_from_moments(self, moments) -> SharedCovarianceGaussians:
        return SharedCovarianceGaussians.from_moments(moments, float(self.reg_covar))

    def _scores_all_classes(self) -> bool:
        return self.score_class == "closest"  # the closest class needs every class's density

    def _scoring_class(self, logits: Tensor, log_density: Tensor | None) -> Tensor:
        if self.score_class == "closest":
            return log_density.argmax(-1)
        return logits.argmax(-1)
