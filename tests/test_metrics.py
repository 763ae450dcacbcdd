"""Detection metrics against scikit-learn's ``roc_curve`` / ``roc_auc_score`` (the oracle),
ties included, plus a brute-force oracle for TPR at a fixed FPR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from conftest import tol
from idefender_gpu.metrics import roc_auc_score, roc_curve, tpr_at_fpr

F64 = tol(torch.float64)


def _problem(seed: int, n: int = 300, ties: bool = False, dtype=torch.float32):
    """Scores of positives shifted up by one; ``ties`` rounds them to a coarse grid."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    scores = rng.normal(size=n) + labels
    if ties:
        scores = np.round(scores * 2) / 2  # about a dozen distinct values
    return torch.as_tensor(scores, dtype=dtype), torch.as_tensor(labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("drop_intermediate", [True, False])
def test_roc_curve_matches_sklearn(seed, ties, drop_intermediate, device):
    scores, labels = _problem(seed, ties=ties)
    fpr, tpr, thresholds = roc_curve(scores.to(device), labels.to(device), drop_intermediate=drop_intermediate)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels.numpy(), scores.numpy(), drop_intermediate=drop_intermediate)
    assert fpr.device.type == device.type and fpr.dtype == torch.float64
    torch.testing.assert_close(fpr.cpu(), torch.as_tensor(sk_fpr, dtype=torch.float64), **F64)
    torch.testing.assert_close(tpr.cpu(), torch.as_tensor(sk_tpr, dtype=torch.float64), **F64)
    torch.testing.assert_close(thresholds.cpu(), torch.as_tensor(sk_thr, dtype=torch.float64), **F64)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_matches_sklearn(seed, ties, device):
    scores, labels = _problem(seed, ties=ties)
    auc = roc_auc_score(scores.to(device), labels.to(device))
    expected = skm.roc_auc_score(labels.numpy(), scores.numpy())
    assert auc.shape == () and auc.device.type == device.type
    torch.testing.assert_close(auc.cpu(), torch.tensor(expected, dtype=torch.float64), **F64)


def test_roc_auc_all_tied_is_one_half_and_extremes():
    labels = torch.tensor([0, 1, 0, 1, 1])
    assert float(roc_auc_score(torch.zeros(5), labels)) == 0.5
    assert float(roc_auc_score(labels.float(), labels)) == 1.0
    assert float(roc_auc_score(-labels.float(), labels)) == 0.0


def test_roc_auc_is_pairwise_probability_with_half_ties():
    """Oracle: the Mann-Whitney statistic counted pair by pair."""
    scores, labels = _problem(5, n=120, ties=True, dtype=torch.float64)
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    expected = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean()
    torch.testing.assert_close(roc_auc_score(scores, labels), expected, **F64)


def test_infinite_scores_are_ordered():
    scores = torch.tensor([-torch.inf, 0.0, torch.inf, torch.inf])
    labels = torch.tensor([0, 0, 1, 1])
    assert float(roc_auc_score(scores, labels)) == 1.0
    _, _, thresholds = roc_curve(scores, labels, drop_intermediate=False)
    assert thresholds.tolist() == [torch.inf, torch.inf, 0.0, -torch.inf]


def test_bool_labels_and_numpy_inputs_accepted():
    scores, labels = _problem(0)
    a = roc_auc_score(scores, labels.bool())
    b = roc_auc_score(scores.numpy(), labels.numpy())
    torch.testing.assert_close(a, b, **F64)


def _tpr_at_fpr_oracle(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Brute force over every threshold ``t`` (predict positive when ``score >= t``)."""
    best = 0.0
    neg, pos = scores[labels == 0], scores[labels == 1]
    for t in np.concatenate([scores, [np.inf]]):
        if (neg >= t).mean() <= fpr:
            best = max(best, (pos >= t).mean())
    return best


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("fpr", [0.0, 0.05, 0.3, 1.0])
def test_tpr_at_fpr_matches_brute_force(seed, ties, fpr, device):
    scores, labels = _problem(seed, n=200, ties=ties, dtype=torch.float64)
    got = tpr_at_fpr(scores.to(device), labels.to(device), fpr=fpr)
    expected = _tpr_at_fpr_oracle(scores.numpy(), labels.numpy(), fpr)
    torch.testing.assert_close(got.cpu(), torch.tensor(expected, dtype=torch.float64), **F64)


def test_tpr_at_fpr_uses_sklearn_curve():
    """Same number from scikit-learn's curve: max TPR where FPR <= 0.05."""
    scores, labels = _problem(3, n=400)
    sk_fpr, sk_tpr, _ = skm.roc_curve(labels.numpy(), scores.numpy(), drop_intermediate=False)
    expected = sk_tpr[sk_fpr <= 0.05].max()
    assert float(tpr_at_fpr(scores, labels)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "scores, labels, error, match",
    [
        (torch.zeros(4), torch.tensor([0, 0, 0, 0]), ValueError, "both classes"),
        (torch.zeros(4), torch.tensor([1, 1, 1, 1]), ValueError, "both classes"),
        (torch.zeros(4), torch.tensor([0, 1, 0]), ValueError, "labels must have shape \\(4,\\)"),
        (torch.zeros(2, 2), torch.tensor([0, 1, 0, 1]), ValueError, "scores must have shape"),
        (torch.tensor([0.0, torch.nan]), torch.tensor([0, 1]), ValueError, "NaN"),
        (torch.zeros(3), torch.tensor([0, 1, 2]), ValueError, "labels must be 0"),
        (torch.zeros(2, dtype=torch.complex64), torch.tensor([0, 1]), TypeError, "real numbers"),
    ],
)
def test_bad_inputs(scores, labels, error, match):
    with pytest.raises(error, match=match):
        roc_auc_score(scores, labels)


@pytest.mark.parametrize("fpr", [-0.1, 1.5, "0.05", True, float("nan"), float("inf")])
def test_tpr_at_fpr_bad_fpr(fpr):
    scores, labels = _problem(0, n=20)
    with pytest.raises(ValueError, match=r"The 'fpr' parameter of tpr_at_fpr must be a float in the range "
                                         r"\[0.0, 1.0\]. Got .* instead"):
        tpr_at_fpr(scores, labels, fpr=fpr)


def test_roc_curve_bad_drop_intermediate():
    scores, labels = _problem(0, n=20)
    with pytest.raises(TypeError, match="'drop_intermediate' parameter of roc_curve must be an instance of 'bool'"):
        roc_curve(scores, labels, drop_intermediate="yes")
