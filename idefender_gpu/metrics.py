"""Detection metrics on tensors: ROC curve, ROC AUC and TPR at a fixed FPR.

Conventions follow :mod:`sklearn.metrics`: positives are ``label == 1``, and a higher score
means "more positive". In the paper's evaluation the positives are the adversarial
inputs and the negatives the natural ones, while a detector's :meth:`score` is a
log-density (higher = more natural), so pass the negated score::

    scores = torch.cat([-detector.score(x_natural), -detector.score(x_adversarial)])
    labels = torch.cat([torch.zeros(len(x_natural)), torch.ones(len(x_adversarial))])
    auc = roc_auc_score(scores, labels)

Everything runs on the scores' device, in float64. Ties between scores are handled as
scikit-learn does: tied scores form one operating point, and the AUC counts a tied
(positive, negative) pair as one half.
"""

from __future__ import annotations

from numbers import Real
from typing import Any

import torch
from torch import Tensor

from idefender_gpu._param_validation import Interval, check_param
from idefender_gpu._validation import describe

__all__ = ["roc_auc_score", "roc_curve", "tpr_at_fpr"]


def _check_scores_labels(scores: Any, labels: Any) -> tuple[Tensor, Tensor]:
    """``(N,)`` float64 scores (no NaN) and ``(N,)`` float64 0/1 labels, with both classes."""
    scores_t = scores if isinstance(scores, Tensor) else torch.as_tensor(scores)
    device = scores_t.device
    labels_t = labels if isinstance(labels, Tensor) else torch.as_tensor(labels, device=device)
    if scores_t.is_complex() or scores_t.dtype == torch.bool:
        raise TypeError(f"scores must hold real numbers; got {describe(scores_t)}")
    if scores_t.ndim != 1:
        raise ValueError(f"scores must have shape (n_samples,); got {describe(scores_t)}")
    if labels_t.ndim != 1 or labels_t.shape[0] != scores_t.shape[0]:
        raise ValueError(
            f"labels must have shape ({scores_t.shape[0]},) to match scores; got {describe(labels_t)}"
        )
    scores_t = scores_t.to(torch.float64)
    labels_t = labels_t.to(device=device, dtype=torch.float64)
    if bool(torch.isnan(scores_t).any()):
        raise ValueError("scores must not contain NaN; got NaN")
    is_binary = (labels_t == 0) | (labels_t == 1)
    if not bool(is_binary.all()):
        raise ValueError(
            f"labels must be 0 (negative) or 1 (positive); got values {torch.unique(labels_t).tolist()}"
        )
    n_pos = int(labels_t.sum())
    if n_pos == 0 or n_pos == labels_t.shape[0]:
        raise ValueError(
            "labels must contain both classes (0 and 1) for a ROC curve; got only "
            f"{'positives' if n_pos else 'negatives'}"
        )
    return scores_t, labels_t


def _binary_clf_curve(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """False/true positive counts at each distinct score, in decreasing score order.

    Returns ``fps, tps, thresholds``, each ``(n_distinct,)``.
    """
    order = torch.argsort(scores, descending=True, stable=True)  # (N,)
    scores, labels = scores[order], labels[order]
    last_of_run = torch.ones_like(scores, dtype=torch.bool)  # (N,) last index of each tie run
    last_of_run[:-1] = scores[1:] != scores[:-1]
    idx = torch.nonzero(last_of_run).squeeze(1)  # (n_distinct,)
    tps = torch.cumsum(labels, 0)[idx]
    fps = (idx + 1).to(torch.float64) - tps
    return fps, tps, scores[idx]


def roc_curve(scores: Any, labels: Any, *, drop_intermediate: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Receiver operating characteristic, as :func:`sklearn.metrics.roc_curve`.

    Parameters
    ----------
    scores : Tensor of shape (n_samples,)
        Higher means more positive (for detectors: ``-score``, see the module docstring).
    labels : Tensor of shape (n_samples,)
        1 for positives, 0 for negatives (bool or numbers); both must occur.
    drop_intermediate : bool, default=True
        Drop thresholds that are not corners of the curve (as scikit-learn does).

    Returns
    -------
    fpr : Tensor of float64, shape (n_thresholds,)
        False positive rate of ``scores >= thresholds[i]``, increasing from 0.
    tpr : Tensor of float64, shape (n_thresholds,)
        True positive rate, increasing from 0.
    thresholds : Tensor of float64, shape (n_thresholds,)
        Decreasing; ``thresholds[0] = inf`` (nothing predicted positive).

    Raises
    ------
    ValueError
        For mismatched shapes, NaN scores, labels other than 0/1, or a single class.
    """
    check_param(drop_intermediate, "drop_intermediate", ["boolean"], "roc_curve")
    scores_t, labels_t = _check_scores_labels(scores, labels)
    fps, tps, thresholds = _binary_clf_curve(scores_t, labels_t)
    if drop_intermediate and fps.shape[0] > 2:
        # keep the ends and every point where the slope changes (second differences != 0)
        corner = torch.ones_like(fps, dtype=torch.bool)
        corner[1:-1] = (torch.diff(fps, n=2) != 0) | (torch.diff(tps, n=2) != 0)
        fps, tps, thresholds = fps[corner], tps[corner], thresholds[corner]
    zero = fps.new_zeros(1)
    fps, tps = torch.cat([zero, fps]), torch.cat([zero, tps])
    thresholds = torch.cat([thresholds.new_full((1,), torch.inf), thresholds])
    return fps / fps[-1], tps / tps[-1], thresholds


def roc_auc_score(scores: Any, labels: Any) -> Tensor:
    """Area under the ROC curve, as :func:`sklearn.metrics.roc_auc_score` (binary).

    The probability that a random positive scores above a random negative, ties
    counting one half (trapezoids over the full curve).

    Parameters
    ----------
    scores, labels
        As in :func:`roc_curve`.

    Returns
    -------
    auc : Tensor of float64, shape ()
    """
    fpr, tpr, _ = roc_curve(scores, labels, drop_intermediate=False)
    return torch.trapezoid(tpr, fpr)


def tpr_at_fpr(scores: Any, labels: Any, fpr: float = 0.05) -> Tensor:
    """True positive rate at a false positive rate of at most ``fpr``.

    The largest TPR over the thresholds whose FPR does not exceed ``fpr`` (no
    interpolation between operating points); e.g. the fraction of adversarial inputs
    detected when at most 5% of natural inputs are rejected.

    Parameters
    ----------
    scores, labels
        As in :func:`roc_curve`.
    fpr : float in [0, 1], default=0.05

    Returns
    -------
    tpr : Tensor of float64, shape ()

    Raises
    ------
    InvalidParameterError
        (a ``ValueError`` and a ``TypeError``) for an ``fpr`` that is not a real number
        in ``[0, 1]`` (NaN included).
    """
    check_param(fpr, "fpr", [Interval(Real, 0.0, 1.0, closed="both")], "tpr_at_fpr")
    fpr_curve, tpr_curve, _ = roc_curve(scores, labels, drop_intermediate=False)
    allowed = fpr_curve <= fpr  # (n_thresholds,), True at least at fpr_curve[0] = 0
    return torch.where(allowed, tpr_curve, torch.zeros_like(tpr_curve)).max()
