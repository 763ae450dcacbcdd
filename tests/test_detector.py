"""IDefender and the Mahalanobis baseline: fitting against the mixture estimator and
closed forms, log-densities against scipy, gradcheck through a classifier, detection of
planted off-manifold points, thresholds against per-class quantiles, and detector files
(round trip; truncated, tampered, foreign and pickled files refused without running them).

Synthetic data: three classes, each two sub-clusters on a 2-D plane in R^8 plus small
isotropic noise (0.05); "off-manifold" points are natural points moved by 1.0 along
the five directions orthogonal to the planes. The classifier is a linear map ``Q`` (an
orthogonal matrix) followed by a nearest-centroid ``nn.Linear``, so it labels every
natural and planted point correctly and the hidden state ``Qx`` keeps the clusters' shape.
Seeds are fixed; with this separation (maha² ~ 400 for planted points) the statistical
assertions have no realistic failure mode.
"""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import safetensors.torch
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import PicklePayload, tol
from idefender_gpu import IDefender, MahalanobisDetector, NotFittedError
from idefender_gpu.detector._states import class_thresholds
from idefender_gpu.metrics import roc_auc_score
from idefender_gpu.mixture import BatchedGaussianMixture

C, D_IN = 3, 8
_BASIS = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(123),
                                     dtype=torch.float64))[0]
_CENTRES = 10.0 * torch.eye(C, D_IN, dtype=torch.float64)

DETECTORS = {
    "idefender": lambda model, **kw: IDefender(model, n_components=2, random_state=0, progress=False, **kw),
    "mahalanobis": lambda model, **kw: MahalanobisDetector(model, progress=False, **kw),
}


def clusters(n_per_class: int, seed: int, dtype=torch.float32):
    """``x (C*n, 8)`` on per-class planes with two sub-clusters each, ``y (C*n,)``."""
    g = torch.Generator().manual_seed(seed)
    N = C * n_per_class
    y = torch.arange(C).repeat_interleave(n_per_class)
    side = (torch.randint(0, 2, (N,), generator=g) * 2 - 1).to(torch.float64)
    z = torch.randn(N, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    x = _CENTRES[y] + 2.0 * side[:, None] * _BASIS[:, 2] + z @ _BASIS[:, :2].T + 0.05 * noise
    return x.to(dtype), y


def off_manifold(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Move each point by 1.0 along a random direction orthogonal to the class planes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[0], D_IN - 3, generator=g, dtype=torch.float64)
    w = w / w.norm(dim=1, keepdim=True)
    return x + (w @ _BASIS[:, 3:].T).to(x.dtype)


def classifier(dtype=torch.float32, width: int = D_IN, n_classes: int = C) -> nn.Sequential:
    """``Linear(Q)`` then a nearest-centroid ``Linear``: logits_c = μ_cᵀx - ½‖μ_c‖²."""
    q = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=torch.Generator().manual_seed(7),
                                    dtype=torch.float64))[0][:width]  # (width, 8)
    centres = 10.0 * torch.eye(n_classes, D_IN, dtype=torch.float64)
    first, last = nn.Linear(D_IN, width), nn.Linear(width, n_classes)
    with torch.no_grad():
        first.weight.copy_(q)
        first.bias.zero_()
        last.weight.copy_(centres @ q.T)
        last.bias.copy_(-0.5 * centres.square().sum(1))
    return nn.Sequential(first, last).to(dtype)


def loader(x, y, batch_size=100):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


@pytest.fixture(scope="module")
def data():
    x, y = clusters(200, seed=0)
    return x, y


@pytest.fixture(scope="module")
def fitted(data):
    """One fitted detector of each kind on the float32 classifier (read-only in tests)."""
    x, y = data
    return {name: make(classifier()).fit(loader(x, y)) for name, make in DETECTORS.items()}


def _assert_no_hooks(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


# --------------------------------------------------------------------------------------
# Fitting and shapes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DETECTORS)
def test_fitted_attributes_shapes_and_device(kind, data, device):
    x, y = data
    model = classifier().to(device)
    detector = DETECTORS[kind](model).fit(loader(x, y))
    assert detector.model is model
    assert detector.layers_ == ("1:input",) and detector.n_features_ == {"1:input": D_IN}
    assert detector.n_classes_ == C and detector.input_shape_ == (D_IN,) and detector.keep_ == 0.95
    assert detector.thresholds_.shape == (C,) and detector.thresholds_.device.type == device.type
    xb = x[:5].to(device)
    log_density = detector.log_density(xb)
    assert log_density.shape == (5, C) and log_density.dtype == torch.float32
    assert log_density.device.type == device.type
    assert detector.log_density(xb, classes=y[:5].to(device)).shape == (5,)
    assert detector.score(xb).shape == (5,) and detector.reject(xb).dtype == torch.bool
    predicted = detector.predict(xb)
    assert predicted.dtype == torch.int64 and predicted.device.type == device.type


def test_fit_equals_batched_mixture_on_the_hidden_states(data, fitted):
    """Oracle: BatchedGaussianMixture fitted directly on Qx grouped by the true labels."""
    x, y = data
    model = fitted["idefender"].model
    with torch.no_grad():
        h = model[0](x)
    reference = BatchedGaussianMixture(2, reg_covar=1e-4, random_state=0).fit(h, y)
    torch.testing.assert_close(fitted["idefender"].means_["1:input"], reference.means_, **tol(torch.float32))
    torch.testing.assert_close(fitted["idefender"].weights_["1:input"], reference.weights_, **tol(torch.float32))
    torch.testing.assert_close(fitted["idefender"].precisions_cholesky_["1:input"],
                               reference.precisions_cholesky_, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_idefender_log_density_matches_scipy(covariance_type, seed):
    """Oracle: scipy's multivariate normal per component, logsumexp with the log-weights."""
    x, y = clusters(60, seed=1, dtype=torch.float64)
    model = classifier(torch.float64)
    detector = IDefender(model, n_components=2, covariance_type=covariance_type, random_state=0,
                         progress=False).fit(loader(x, y))
    xq = off_manifold(x[::20], seed=2)
    got = detector.log_density(xq).detach().numpy()  # (B, C)
    with torch.no_grad():
        h = model[0](xq).numpy()
    weights = detector.weights_["1:input"].numpy()
    means = detector.means_["1:input"].numpy()
    prec_chol = detector.precisions_cholesky_["1:input"].numpy()
    expected = np.empty_like(got)
    for c in range(C):
        comps = []
        for k in range(2):
            if covariance_type == "full":
                precision = prec_chol[c, k] @ prec_chol[c, k].T
            elif covariance_type == "tied":
                precision = prec_chol[c] @ prec_chol[c].T
            elif covariance_type == "diag":
                precision = np.diag(prec_chol[c, k] ** 2)
            else:
                precision = np.eye(D_IN) * prec_chol[c, k] ** 2
            cov = np.linalg.inv(precision)
            comps.append(np.log(weights[c, k]) + multivariate_normal(means[c, k], cov).logpdf(h))
        expected[:, c] = logsumexp(np.stack(comps, 1), axis=1)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8)


def test_mahalanobis_matches_closed_form(seed):
    """Oracle: class means, pooled within-class covariance + reg, scipy log-density."""
    x, y = clusters(60, seed=3, dtype=torch.float64)
    model = classifier(torch.float64)
    detector = MahalanobisDetector(model, reg_covar=1e-3, progress=False).fit(loader(x, y))
    with torch.no_grad():
        h = model[0](x).numpy()
    yn = y.numpy()
    means = np.stack([h[yn == c].mean(0) for c in range(C)])
    centred = h - means[yn]
    cov = centred.T @ centred / len(h) + 1e-3 * np.eye(D_IN)
    np.testing.assert_allclose(detector.means_["1:input"].numpy(), means, rtol=1e-10, atol=1e-10)
    xq = x[::15]
    got = detector.log_density(xq).detach().numpy()
    expected = np.stack([multivariate_normal(means[c], cov).logpdf(h[::15]) for c in range(C)], 1)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8)
    # Lee et al.'s class: the nearest mean (max over classes); score is that class's log-density
    torch.testing.assert_close(detector.score(xq), torch.as_tensor(expected.max(1)), **tol(torch.float64))


def test_several_layers_sum_log_densities(data):
    """Independence across layers: the sum of single-layer detectors (same seed)."""
    x, y = data
    model = nn.Sequential(nn.Linear(D_IN, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, C))
    torch.manual_seed(0)
    kwargs = dict(n_components=1, random_state=0, progress=False)
    both = IDefender(model, ["2:input", "4:input"], **kwargs).fit(loader(x, y))
    first = IDefender(model, "2:input", **kwargs).fit(loader(x, y))
    second = IDefender(model, "4:input", **kwargs).fit(loader(x, y))
    assert both.n_features_ == {"2:input": 6, "4:input": 5}
    xq = x[::30]
    torch.testing.assert_close(both.log_density(xq), first.log_density(xq) + second.log_density(xq),
                               **tol(torch.float32))


def test_cnn_on_images_default_layer(seed):
    class TinyCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc1 = nn.Linear(4 * 6 * 6, 6)
            self.fc2 = nn.Linear(6, C)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x))).flatten(1)
            return self.fc2(torch.tanh(self.fc1(h)))

    model = TinyCNN().train()
    y = torch.arange(90) % C
    x = torch.rand(90, 1, 8, 8) + 0.5 * y[:, None, None, None]
    detector = IDefender(model, covariance_type="diag", progress=False, random_state=0).fit(loader(x, y, 32))
    assert detector.layers_ == ("fc2:input",) and detector.input_shape_ == (1, 8, 8)
    assert model.training and model.bn.training  # mode restored
    _assert_no_hooks(model)
    running_mean = model.bn.running_mean.clone()
    assert detector.reject(x[:7]).shape == (7,)
    torch.testing.assert_close(model.bn.running_mean, running_mean, rtol=0, atol=0)  # eval mode used
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\).*got shape \(7, 1, 9, 8\)"):
        detector.score(torch.rand(7, 1, 9, 8))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 8, 8\)"):
        detector.log_density(torch.rand(1, 8, 8))


# --------------------------------------------------------------------------------------
# Differentiability
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, covariance_type",
    [("idefender", "full"), ("idefender", "diag"), ("idefender", "tied"), ("mahalanobis", None)],
)
def test_log_density_gradcheck_through_the_classifier(kind, covariance_type):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, C)).double()
    y = torch.arange(120) % C
    x = torch.randn(120, 6, dtype=torch.float64) + 2.0 * nn.functional.one_hot(y, 6).double()
    if kind == "idefender":
        detector = IDefender(model, n_components=2, covariance_type=covariance_type, random_state=0,
                             progress=False)
    else:
        detector = MahalanobisDetector(model, progress=False)
    detector.fit(loader(x, y, 40))
    assert detector.thresholds_.dtype == torch.float64
    xq = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(detector.log_density, (xq,), eps=1e-6, atol=1e-6, rtol=1e-5)
    classes = torch.tensor([2, 0, 1])
    assert torch.autograd.gradcheck(lambda v: detector.log_density(v, classes), (xq,), eps=1e-6,
                                    atol=1e-6, rtol=1e-5)
    _assert_no_hooks(model)


def test_log_density_follows_grad_mode(fitted, data):
    detector = fitted["idefender"]
    x = data[0][:4].clone().requires_grad_(True)
    assert detector.log_density(x).requires_grad
    with torch.no_grad():
        assert not detector.log_density(x).requires_grad
    assert not detector.score(x).requires_grad


# --------------------------------------------------------------------------------------
# Detection and thresholds
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DETECTORS)
def test_planted_off_manifold_points_score_lower(kind, fitted):
    detector = fitted[kind]
    x_nat, y_nat = clusters(100, seed=11)  # held-out natural points
    x_off = off_manifold(x_nat, seed=12)
    model = detector.model
    with torch.no_grad():  # the planted points keep their class: only the detector can tell
        assert bool((model(x_nat).argmax(1) == y_nat).all()) and bool((model(x_off).argmax(1) == y_nat).all())
    scores = torch.cat([-detector.score(x_nat), -detector.score(x_off)])  # adversarial = positive
    labels = torch.cat([torch.zeros(len(x_nat)), torch.ones(len(x_off))])
    assert float(roc_auc_score(scores, labels)) > 0.99
    assert float(detector.reject(x_off).float().mean()) > 0.9
    predicted = detector.predict(x_off)
    assert bool(((predicted == -1) | (predicted == y_nat)).all())


@pytest.mark.parametrize("keep", [0.95, 0.99])
@pytest.mark.parametrize("kind", DETECTORS)
def test_reject_keeps_keep_of_natural_training_data_per_class(kind, keep, data):
    x, y = data
    detector = DETECTORS[kind](classifier(), keep=keep).fit(loader(x, y))
    rejected = detector.reject(x)
    for c in range(C):
        n = int((y == c).sum())
        kept = int((~rejected[y == c]).sum())
        expected = int(np.ceil(keep * n - 1e-9))  # 190 of 200 for ID-95, 198 for ID-99
        # the training scores are recomputed in one batch rather than four: allow one sample
        # at the threshold to move by round-off
        assert abs(kept - expected) <= 1, (c, kept, expected)


def test_class_thresholds_oracle(seed):
    """Per class: the (n - ceil(keep n) + 1)-th smallest score, i.e. ceil(keep n) kept."""
    scores = torch.randn(500, dtype=torch.float64)
    labels = torch.randint(0, 4, (500,))
    for keep in (0.5, 0.95, 0.99, 1.0):
        got = class_thresholds(scores, labels, 4, keep)
        for c in range(4):
            s = np.sort(scores[labels == c].numpy())
            n_keep = int(np.ceil(keep * len(s) - 1e-9))
            assert float(got[c]) == s[len(s) - n_keep]
            assert int((scores[labels == c] >= got[c]).sum()) == n_keep


def test_calibrate_sets_held_out_quantiles(data):
    x, y = data
    detector = IDefender(classifier(), n_components=2, random_state=0, progress=False).fit(loader(x, y))
    before = detector.thresholds_.clone()
    x_held, y_held = clusters(50, seed=5)
    assert detector.calibrate(loader(x_held, y_held), keep=0.9) is detector
    assert detector.keep == detector.keep_ == 0.9
    assert not torch.equal(before, detector.thresholds_)
    scores = detector.log_density(x_held, y_held).detach()
    for c in range(C):
        s = np.sort(scores[y_held == c].numpy())
        n_keep = int(np.ceil(0.9 * len(s) - 1e-9))
        assert float(detector.thresholds_[c]) == pytest.approx(s[len(s) - n_keep], rel=1e-6)


def test_model_left_untouched(fitted, data):
    detector = fitted["idefender"]
    model = detector.model
    model.train()
    detector.log_density(data[0][:3])
    detector.predict(data[0][:3])
    assert model.training
    _assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, options",
    [("idefender", {"covariance_type": t}) for t in ("full", "tied", "diag", "spherical")]
    + [("mahalanobis", {"score_class": "predicted"})],
)
def test_save_load_identical_scores(kind, options, data, tmp_path, device):
    x, y = data
    model = classifier().to(device)
    detector = DETECTORS[kind](model, **options).fit(loader(x[::2], y[::2]))
    path = tmp_path / "detector.safetensors"
    detector.save(path)
    loaded = type(detector).load(path, model)
    assert type(loaded) is type(detector) and loaded.model is model
    assert loaded.layers_ == detector.layers_ and loaded.keep_ == detector.keep_
    for name, value in options.items():
        assert getattr(loaded, name) == value
    assert loaded.thresholds_.device.type == device.type
    torch.testing.assert_close(loaded.thresholds_, detector.thresholds_, rtol=0, atol=0)
    xq = x[1::7].to(device)
    torch.testing.assert_close(loaded.log_density(xq), detector.log_density(xq), rtol=0, atol=0)
    torch.testing.assert_close(loaded.score(xq), detector.score(xq), rtol=0, atol=0)
    torch.testing.assert_close(loaded.predict(xq), detector.predict(xq), rtol=0, atol=0)


@pytest.fixture
def saved(fitted, tmp_path):
    path = tmp_path / "idefender.safetensors"
    fitted["idefender"].save(path)
    return path


def _header(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return data, n, json.loads(data[8:8 + n])


def test_truncated_file_refused(saved, fitted):
    data = saved.read_bytes()
    for cut in (len(data) - 3, 100, 5):
        saved.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a complete safetensors file"):
            IDefender.load(saved, fitted["idefender"].model)


def test_flipped_tensor_byte_refused(saved, fitted):
    data, n, _ = _header(saved)
    blob = bytearray(data)
    blob[8 + n + 13] ^= 0x01
    saved.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="failed its integrity check"):
        IDefender.load(saved, fitted["idefender"].model)


def _rewrite(path, edit_config, recompute_digest=False, edit_tensors=None):
    _, _, header = _header(path)
    metadata = dict(header["__metadata__"])
    tensors = safetensors.torch.load(path.read_bytes())
    config = json.loads(metadata["config"])
    edit_config(config)
    metadata["config"] = json.dumps(config, sort_keys=True)
    if edit_tensors is not None:
        edit_tensors(tensors)
    if recompute_digest:
        from idefender_gpu.detector._io import digest

        metadata["sha256"] = digest(metadata["config"], tensors)
    path.write_bytes(safetensors.torch.save(tensors, metadata=metadata))


def test_edited_config_refused(saved, fitted):
    _rewrite(saved, lambda config: config.update(keep=0.5))
    with pytest.raises(ValueError, match="failed its integrity check"):
        IDefender.load(saved, fitted["idefender"].model)


def test_consistent_digest_but_wrong_tensor_shape_refused(saved, fitted):
    def shrink(tensors):
        tensors["layers.0.weights"] = tensors["layers.0.weights"][:, :1].contiguous()

    _rewrite(saved, lambda config: None, recompute_digest=True, edit_tensors=shrink)
    with pytest.raises(ValueError, match=r"'layers.0.weights' must have shape \(3, 2\)"):
        IDefender.load(saved, fitted["idefender"].model)


@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: classifier(width=6), "another model: layer '1:input' has width 8 in the file but 6"),
        (lambda: classifier(n_classes=4), "another model: it has 3 classes but this model returns \\(1, 4\\)"),
        (lambda: nn.Sequential(nn.Linear(5, 8), nn.Linear(8, C)), "fails on an input of the saved shape \\(1, 8\\)"),
        (lambda: nn.Sequential(nn.Linear(D_IN, C)), "does not fit this model.*unknown layer '1'"),
    ],
)
def test_file_from_another_model_refused(saved, other, match):
    with pytest.raises(ValueError, match=match):
        IDefender.load(saved, other())


def test_not_a_detector_refused(tmp_path, saved, fitted):
    model = fitted["idefender"].model
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(3)}, plain)
    with pytest.raises(ValueError, match="not an idefender-gpu detector file"):
        IDefender.load(plain, model)
    text = tmp_path / "notes.txt"
    text.write_text("just some text, long enough to have an 8-byte header length")
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        IDefender.load(text, model)
    with pytest.raises(ValueError, match="holds an IDefender, not a MahalanobisDetector"):
        MahalanobisDetector.load(saved, model)
    with pytest.raises(FileNotFoundError):
        IDefender.load(tmp_path / "missing.safetensors", model)
    with pytest.raises(TypeError, match="path must be a str or os.PathLike"):
        IDefender.load(3, model)


def test_pickle_file_refused_without_running_it(tmp_path, fitted):
    model = fitted["idefender"].model
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(PicklePayload(probe))).close()  # the payload is live when unpickled...
    assert probe.exists()
    marker = tmp_path / "marker"
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(PicklePayload(marker)))
    zipped = tmp_path / "detector.pt"
    torch.save(PicklePayload(marker), zipped)  # torch's zip container holding the same pickle
    for path in (raw, zipped):
        with pytest.raises(ValueError, match="never loaded"):
            IDefender.load(path, model)
        assert not marker.exists()  # ...and loading a detector never unpickles


# --------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------


def test_unfitted_detector_raises_not_fitted(tmp_path, data):
    x, y = data
    for kind in DETECTORS:
        detector = DETECTORS[kind](classifier())
        for call in (lambda: detector.log_density(x[:2]), lambda: detector.score(x[:2]),
                     lambda: detector.reject(x[:2]), lambda: detector.predict(x[:2]),
                     lambda: detector.save(tmp_path / "d.safetensors"),
                     lambda: detector.calibrate(loader(x, y)), lambda: detector.means_):
            with pytest.raises(NotFittedError, match="not fitted yet"):
                call()


def test_labels_out_of_range_refused(data):
    x, y = data
    bad = y.clone()
    bad[5] = 3
    with pytest.raises(ValueError, match=r"labels in \[0, n_classes\) = \[0, 3\).*got label 3"):
        IDefender(classifier(), progress=False).fit(loader(x, bad))
    bad[5] = -1
    with pytest.raises(ValueError, match="got label -1"):
        MahalanobisDetector(classifier(), progress=False).fit(loader(x, bad))


def test_loader_problems_refused(data):
    x, y = data
    with pytest.raises(ValueError, match="at least 2 sample\\(s\\) of every class.*got 0 of class 2"):
        IDefender(classifier(), progress=False).fit(loader(x[y < 2], y[y < 2]))
    with pytest.raises(ValueError, match="pairs to fit a detector; got inputs only"):
        IDefender(classifier(), progress=False).fit(DataLoader(TensorDataset(x), batch_size=50))
    with pytest.raises(TypeError, match="integer class labels"):
        IDefender(classifier(), progress=False).fit(loader(x, y.float()))
    model = nn.Sequential(nn.Linear(D_IN, 4), nn.Linear(4, C), nn.Flatten(0))  # output (B*C,)
    with pytest.raises(ValueError, match="model must return logits of shape \\(B, n_classes\\)"):
        IDefender(model, "1:input", progress=False).fit(loader(x, y))


def test_calibrate_needs_the_fitted_input_shape_and_classes(fitted, data):
    detector = fitted["idefender"]
    x, y = data
    with pytest.raises(ValueError, match="at least 1 sample\\(s\\) of every class to calibrate"):
        detector.calibrate(loader(x[y != 1], y[y != 1]))
    with pytest.raises(ValueError, match="'keep' parameter of IDefender.calibrate"):
        detector.calibrate(loader(x, y), keep=1.5)


def test_bad_query_inputs(fitted, data):
    detector = fitted["idefender"]
    x, _ = data
    with pytest.raises(TypeError, match="x must be a Tensor"):
        detector.score(x[:2].numpy())
    with pytest.raises(ValueError, match=r"x must have shape \(B, 8\)"):
        detector.log_density(x[:2, :5])
    with pytest.raises(ValueError, match=r"classes must be class labels in \[0, 3\)"):
        detector.log_density(x[:2], torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"classes must have shape \(2,\)"):
        detector.log_density(x[:2], torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="classes must be an integer Tensor"):
        detector.log_density(x[:2], torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda m: IDefender(m, "fc9"), ValueError, "unknown layer 'fc9'. Valid names: '0', '1'"),
        (lambda m: IDefender(m, 3), TypeError, r"'layers' parameter of IDefender must be None, an instance of "
                                               r"'str' or an instance of 'list' or an instance of 'tuple'"),
        (lambda m: IDefender(m, keep=0.0), ValueError,
         r"The 'keep' parameter of IDefender must be a float in the range \(0.0, 1.0\]. Got 0.0 instead."),
        (lambda m: IDefender(m, keep="0.95"), TypeError, "'keep' parameter of IDefender must be a float"),
        (lambda m: IDefender(m, n_components=0), ValueError,
         r"'n_components' parameter of IDefender must be an int in the range \[1, inf\). Got 0 instead."),
        (lambda m: IDefender(m, n_components=True), TypeError, "'n_components' parameter of IDefender"),
        (lambda m: IDefender(m, covariance_type="dense"), ValueError,
         "'covariance_type' parameter of IDefender must be a str among .*'full'.*Got 'dense' instead"),
        (lambda m: IDefender(m, reg_covar=-1.0), ValueError, r"'reg_covar' parameter of IDefender must be a "
                                                            r"float in the range \[0.0, inf\)"),
        (lambda m: IDefender(m, init_params="magic"), ValueError, "'init_params' parameter of IDefender must be "
                                                                  "a str among .*'kmeans'"),
        (lambda m: IDefender(m, max_iter=0), ValueError, "'max_iter' parameter of IDefender"),
        (lambda m: IDefender(m, n_init=0), ValueError, "'n_init' parameter of IDefender"),
        (lambda m: IDefender(m, random_state="seed"), TypeError, "'random_state' parameter of IDefender"),
        (lambda m: IDefender(m, progress="yes"), TypeError,
         "'progress' parameter of IDefender must be None or an instance of 'bool'. Got 'yes' instead."),
        (lambda m: IDefender(m, dtype="float16"), ValueError,
         "'dtype' parameter of IDefender must be None or one of 'float32', 'float64'.*Got 'float16'"),
        (lambda m: IDefender(m, memory_budget=0), ValueError, "'memory_budget' parameter of IDefender"),
        (lambda m: MahalanobisDetector(m, score_class="max"), ValueError,
         "'score_class' parameter of MahalanobisDetector must be a str among .*'closest'.*Got 'max' instead"),
        (lambda m: MahalanobisDetector(m, keep=2), ValueError, "'keep' parameter of MahalanobisDetector"),
        (lambda m: IDefender(lambda x: x), TypeError,
         "'model' parameter of IDefender must be an instance of 'torch.nn.modules.module.Module'"),
    ],
)
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match) as info:
        make(classifier())
    assert isinstance(info.value, (ValueError, TypeError))


NOT_FINITE = [float("nan"), float("inf"), -float("inf"), np.float64("nan")]
#: every real hyper-parameter of each detector class
REAL_PARAMS = {IDefender: ("keep", "reg_covar", "tol"), MahalanobisDetector: ("keep", "reg_covar")}


@pytest.mark.parametrize("value", NOT_FINITE, ids=repr)
@pytest.mark.parametrize("cls, name", [(c, n) for c, names in REAL_PARAMS.items() for n in names],
                         ids=lambda v: getattr(v, "__name__", v))
def test_nan_and_inf_hyper_parameters_refused(cls, name, value):
    """Issue 11: NaN and infinity never pass a real hyper-parameter (``reg_covar=inf`` used
    to pass, and ``nan`` compares False with every bound)."""
    with pytest.raises(ValueError, match=f"The '{name}' parameter of {cls.__name__} must be a float in the "
                                         f"range .*Got {re.escape(repr(value))} instead"):
        cls(classifier(), **{name: value})


def test_nan_keep_refused_by_calibrate_and_after_set(fitted, data):
    x, y = data
    detector = fitted["idefender"]
    before = detector.thresholds_.clone()
    for keep in (float("nan"), 1.5, 0.0):
        with pytest.raises(ValueError, match=r"The 'keep' parameter of IDefender.calibrate must be a float "
                                             r"in the range \(0.0, 1.0\]"):
            detector.calibrate(loader(x, y), keep=keep)
    torch.testing.assert_close(detector.thresholds_, before, rtol=0, atol=0)  # nothing changed
    fresh = IDefender(classifier(), progress=False)
    fresh.reg_covar = float("nan")  # set after construction: fit validates again, before reading data
    with pytest.raises(ValueError, match="'reg_covar' parameter of IDefender"):
        fresh.fit(loader(x, y))
    assert not hasattr(fresh, "thresholds_")


@pytest.mark.parametrize("cls", [IDefender, MahalanobisDetector])
def test_constraint_table_declares_every_constructor_parameter(cls):
    import inspect

    assert set(inspect.signature(cls).parameters) == set(cls._parameter_constraints)


def test_init_params_options_are_the_mixture_options():
    """The detector declares the options it forwards to BatchedGaussianMixture: each fits,
    and the mixture refuses what the detector refuses."""
    from idefender_gpu.detector._idefender import INIT_PARAMS

    g = torch.Generator().manual_seed(0)
    h, groups = torch.randn(40, 2, generator=g, dtype=torch.float64), torch.arange(40) % 2
    for option in INIT_PARAMS:
        BatchedGaussianMixture(2, init_params=option, random_state=0, tol=10.0).fit(h, groups)
    with pytest.raises(ValueError, match="init_params"):
        BatchedGaussianMixture(2, init_params="magic").fit(h, groups)


def test_data_parallel_is_handled_in_one_module():
    """Issue 11: every data-parallel branch of the detector lives in ``detector/_states.py``
    (collecting, thresholds over all ranks, rank-0 writes); fit, calibrate and save do not branch."""
    from pathlib import Path

    import idefender_gpu.detector as package

    folder = Path(package.__file__).parent
    imports = re.compile(r"^\s*(from idefender_gpu(\.distributed| import distributed)|import idefender_gpu\.distributed)",
                         re.MULTILINE)
    users = sorted(p.name for p in folder.glob("*.py") if imports.search(p.read_text()))
    assert users == ["_states.py"]
