"""The detector at scale: scoring only the classes needed, shrinkage covariances and the
one-pass streamed fit for one component per class.

* Subset scoring (``log_density(x, classes=...)``, ``score`` / ``reject`` / ``predict`` under
  the scored class only, thresholds under the true class only) equals the all-class path
  in float64 to round-off, for IDefender (K=1 and K=2, every covariance type) and the
  Mahalanobis baseline (both scoring rules), also with class blocks and tiles forced by a
  tiny memory budget, and with gradients.

Many classes (12) in a small width (6) on synthetic Gaussian data; the model is the
identity followed by a linear read-out, so hidden states are the inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from idefender_gpu import IDefender, MahalanobisDetector
from idefender_gpu.detector._densities import class_tiles
from idefender_gpu.detector._states import class_thresholds

C, D = 12, 6


def gaussian_classes(n_per_class: int, seed: int, dtype=torch.float64, n_classes: int = C, width: int = D):
    """``x (C*n, D)``: class ``c`` is a Gaussian with its own mean and an anisotropic covariance."""
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(n_classes, width, generator=g, dtype=torch.float64)
    scales = torch.randn(n_classes, width, width, generator=g, dtype=torch.float64) / width ** 0.5
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    z = torch.randn(y.shape[0], width, generator=g, dtype=torch.float64)
    x = centres[y] + (z.unsqueeze(1) @ (torch.eye(width, dtype=torch.float64) + scales[y])).squeeze(1)
    perm = torch.randperm(y.shape[0], generator=g)
    return x[perm].to(dtype), y[perm]


class Identity(nn.Module):
    """Hidden state = the input (the input of ``head``), logits = a fixed read-out."""

    def __init__(self, n_classes: int = C, width: int = D, dtype=torch.float64, seed: int = 5):
        super().__init__()
        self.head = nn.Linear(width, n_classes).to(dtype)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            self.head.weight.copy_(torch.randn(n_classes, width, generator=g, dtype=torch.float64))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x)


def loader(x, y, batch_size=64):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


DETECTORS = {
    "k1-full": lambda m, **kw: IDefender(m, n_components=1, random_state=0, progress=False, **kw),
    "k1-diag": lambda m, **kw: IDefender(m, n_components=1, covariance_type="diag", random_state=0, progress=False, **kw),
    "k2-full": lambda m, **kw: IDefender(m, n_components=2, random_state=0, progress=False, **kw),
    "k2-diag": lambda m, **kw: IDefender(m, n_components=2, covariance_type="diag", random_state=0, progress=False, **kw),
    "k2-tied": lambda m, **kw: IDefender(m, n_components=2, covariance_type="tied", random_state=0, progress=False, **kw),
    "k2-spherical": lambda m, **kw: IDefender(m, n_components=2, covariance_type="spherical", random_state=0,
                                              progress=False, **kw),
    "maha-closest": lambda m, **kw: MahalanobisDetector(m, progress=False, **kw),
    "maha-predicted": lambda m, **kw: MahalanobisDetector(m, score_class="predicted", progress=False, **kw),
}


@pytest.fixture(scope="module")
def data():
    return gaussian_classes(40, seed=0), gaussian_classes(10, seed=1)


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def fitted(request, data):
    (x, y), _ = data
    return request.param, DETECTORS[request.param](Identity(), dtype="float64").fit(loader(x, y))


def _all_class_thresholds(detector, x, y):
    """The thresholds as computed before subset scoring: every class, then the true one."""
    with torch.no_grad():
        scores = detector.log_density(x).gather(1, y[:, None])[:, 0]
    return class_thresholds(scores, y, C, detector.keep_)


def _all_class_score(detector, x):
    """``score`` as computed before subset scoring: every class, then the scored one."""
    with torch.no_grad():
        ld = detector.log_density(x)
        logits = detector.model(x)
        scored = ld.argmax(1) if getattr(detector, "score_class", "predicted") == "closest" else logits.argmax(1)
    return ld.gather(1, scored[:, None])[:, 0], scored


def test_subset_log_density_equals_all_classes(fitted, data):
    _, detector = fitted
    _, (xt, yt) = data
    full = detector.log_density(xt)  # (B, C)
    one = detector.log_density(xt, classes=yt)  # (B,)
    torch.testing.assert_close(one, full.gather(1, yt[:, None])[:, 0], rtol=1e-12, atol=1e-10)
    several = torch.stack([yt, (yt + 5) % C, torch.zeros_like(yt)], 1)  # (B, 3), repeats allowed
    torch.testing.assert_close(detector.log_density(xt, classes=several), full.gather(1, several),
                               rtol=1e-12, atol=1e-10)


def test_score_reject_predict_equal_all_classes(fitted, data):
    _, detector = fitted
    _, (xt, _) = data
    expected, scored = _all_class_score(detector, xt)
    torch.testing.assert_close(detector.score(xt), expected, rtol=1e-12, atol=1e-10)
    thresholds = detector.thresholds_
    # away from ties at the threshold, the decisions are those of the all-class scores
    clear = (expected - thresholds[scored]).abs() > 1e-8
    assert torch.equal(detector.reject(xt)[clear], (expected < thresholds[scored])[clear])
    predicted = detector.model(xt).argmax(1)
    reference = torch.where(expected < thresholds[scored], torch.full_like(predicted, -1), predicted)
    assert torch.equal(detector.predict(xt)[clear], reference[clear])


def test_thresholds_equal_all_classes(fitted, data):
    _, detector = fitted
    (x, y), (xt, yt) = data
    torch.testing.assert_close(detector.thresholds_, _all_class_thresholds(detector, x, y),
                               rtol=1e-12, atol=1e-10)
    before = detector.thresholds_.clone()
    try:
        detector.calibrate(loader(xt, yt), keep=0.9)
        torch.testing.assert_close(detector.thresholds_, _all_class_thresholds(detector, xt, yt),
                                   rtol=1e-12, atol=1e-10)
    finally:
        detector.thresholds_, detector.keep = before, 0.95
        detector.keep_ = 0.95


@pytest.mark.parametrize("budget", [1, 3000])
def test_blocks_and_tiles_under_a_tiny_budget(budget, data):
    """A budget of 1 byte: one class per block, one tile per block; same numbers."""
    (x, y), (xt, yt) = data
    reference = IDefender(Identity(), n_components=2, random_state=0, progress=False, dtype="float64").fit(loader(x, y))
    small = IDefender(Identity(), n_components=2, random_state=0, progress=False, dtype="float64").fit(loader(x, y))
    small.memory_budget = budget
    torch.testing.assert_close(small.log_density(xt), reference.log_density(xt), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(small.log_density(xt, classes=yt), reference.log_density(xt, classes=yt),
                               rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(small.score(xt), reference.score(xt), rtol=1e-12, atol=1e-10)


def test_subset_gradients_equal_all_classes(fitted, data):
    _, detector = fitted
    _, (xt, yt) = data
    x1 = xt[:7].clone().requires_grad_(True)
    detector.log_density(x1, classes=yt[:7]).sum().backward()
    x2 = xt[:7].clone().requires_grad_(True)
    detector.log_density(x2).gather(1, yt[:7, None]).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("counts", [[50, 1, 1, 0, 3], [1, 1, 1, 1, 1], [0, 0, 7, 0, 0], [4, 0, 9, 2, 1]])
def test_class_tiles_layout(counts):
    """Every pair gets its own row of a tile of its own class; padding is bounded."""
    g = torch.Generator().manual_seed(0)
    classes = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    classes = classes[torch.randperm(classes.shape[0], generator=g)]
    tiles = class_tiles(classes, len(counts))
    P = classes.shape[0]
    assert tiles.position.unique().shape[0] == P  # no two pairs share a row
    assert torch.equal(tiles.tile_class[tiles.position // tiles.rows], classes)
    n_present = sum(1 for c in counts if c)
    assert tiles.n_tiles * tiles.rows < 2 * P + tiles.rows and tiles.n_tiles <= 2 * n_present
    h = torch.arange(P, dtype=torch.float64).unsqueeze(1)
    assert torch.equal(tiles.unlayout(tiles.layout(h)[..., 0]), h[:, 0])


def test_subset_scoring_on_an_imbalanced_batch(data):
    """Most samples of one class, a few of others, absent classes: still the same numbers."""
    (x, y), (xt, yt) = data
    detector = DETECTORS["k2-full"](Identity(), dtype="float64").fit(loader(x, y))
    classes = torch.where(torch.arange(xt.shape[0]) % 17 == 0, yt, torch.full_like(yt, 3))
    torch.testing.assert_close(detector.log_density(xt, classes=classes),
                               detector.log_density(xt).gather(1, classes[:, None])[:, 0],
                               rtol=1e-12, atol=1e-10)
