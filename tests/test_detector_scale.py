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
from conftest import run_peak_rss

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


# --------------------------------------------------------------------------------------
# The one-pass streamed fit (K = 1) and shrinkage covariances
# --------------------------------------------------------------------------------------


def _in_memory_fit(x, y, covariance_type, reg_covar=1e-4):
    """The mixture engine on every state at once (what IDefender K=1 did before streaming)."""
    from idefender_gpu.mixture import BatchedGaussianMixture

    m = BatchedGaussianMixture(n_components=1, covariance_type=covariance_type, reg_covar=reg_covar,
                               dtype=torch.float64, random_state=0).fit(x, y)
    return m.weights_, m.means_, m.precisions_cholesky_


class Batches:
    """A re-iterable loader whose batches are sorted by class or shuffled, of uneven sizes."""

    def __init__(self, x, y, sizes, order="shuffled"):
        idx = torch.argsort(y, stable=True) if order == "sorted" else torch.arange(y.shape[0])
        self.x, self.y = x[idx], y[idx]
        self.bounds = torch.cumsum(torch.tensor([0, *sizes]), 0).tolist()
        assert self.bounds[-1] == y.shape[0]

    def __iter__(self):
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            yield self.x[a:b], self.y[a:b]


@pytest.mark.parametrize("covariance_type", ["full", "diag", "tied", "spherical"])
@pytest.mark.parametrize("order", ["shuffled", "sorted"])
def test_streamed_fit_equals_the_in_memory_fit(covariance_type, order, data):
    """K=1: per-class moments merged over uneven batches (some of one sample) == one fit on all."""
    (x, y), (xt, _) = data
    sizes = [1, 2, 97, 1, 150, 29, 200]
    stream = Batches(x, y, sizes, order)
    detector = IDefender(Identity(), n_components=1, covariance_type=covariance_type, dtype="float64",
                         progress=False).fit(stream)
    weights, means, prec_chol = _in_memory_fit(x, y, covariance_type)
    layer = detector.layers_[0]
    torch.testing.assert_close(detector.weights_[layer], weights, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(detector.means_[layer], means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(detector.precisions_cholesky_[layer], prec_chol, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(detector.thresholds_, _all_class_thresholds(detector, x, y), rtol=1e-12,
                               atol=1e-10)
    one_batch = IDefender(Identity(), n_components=1, covariance_type=covariance_type, dtype="float64",
                          progress=False).fit([(x, y)])
    torch.testing.assert_close(detector.score(xt), one_batch.score(xt), rtol=1e-11, atol=1e-10)


def test_streamed_fit_float32_far_from_the_origin():
    """Small variances far from the origin: the pairwise merge keeps them in float32
    (``E[hh^T] - mu mu^T`` would lose every digit: 1e3^2 * 2^-24 ~ 0.06 > 1e-2)."""
    x, y = gaussian_classes(60, seed=3)
    x = (1e3 + 0.1 * x).float()  # the float64 reference sees the same (rounded) inputs
    model = Identity(dtype=torch.float32)
    stream = Batches(x, y, [60] * 12)
    detector = IDefender(model, n_components=1, reg_covar=0.0, progress=False).fit(stream)
    _, means, prec_chol = _in_memory_fit(x.double(), y, "full", reg_covar=0.0)
    cov = torch.linalg.inv(prec_chol @ prec_chol.mT)
    got = torch.linalg.inv(detector.precisions_cholesky_[detector.layers_[0]].double()
                           @ detector.precisions_cholesky_[detector.layers_[0]].double().mT)
    torch.testing.assert_close(got, cov, rtol=0, atol=2e-5)  # variances ~1e-2


@pytest.mark.parametrize("estimator", ["ledoit-wolf", "oas"])
@pytest.mark.parametrize("n_per_class", [4, 40])
def test_shrinkage_equals_scikit_learn(estimator, n_per_class):
    """Per class, sklearn's LedoitWolf / OAS (assume_centered=False) + reg_covar; also n < D."""
    from sklearn.covariance import OAS, LedoitWolf

    x, y = gaussian_classes(n_per_class, seed=4, width=D)
    reg = 1e-3
    stream = Batches(x, y, [13] * (x.shape[0] // 13) + [x.shape[0] % 13] * bool(x.shape[0] % 13))
    detector = IDefender(Identity(), n_components=1, covariance_estimator=estimator, reg_covar=reg,
                         dtype="float64", progress=False).fit(stream)
    P = detector.precisions_cholesky_[detector.layers_[0]][:, 0]  # (C, D, D)
    got = torch.linalg.inv(P @ P.mT)
    Oracle = LedoitWolf if estimator == "ledoit-wolf" else OAS
    for c in range(C):
        expected = Oracle(assume_centered=False).fit(x[y == c].numpy()).covariance_ + reg * torch.eye(D).numpy()
        # through the Cholesky factor and an inverse: round-off times the condition number
        torch.testing.assert_close(got[c], torch.as_tensor(expected), rtol=1e-8, atol=1e-12)
    means = detector.means_[detector.layers_[0]][:, 0]
    torch.testing.assert_close(means, torch.stack([x[y == c].mean(0) for c in range(C)]), rtol=1e-12, atol=1e-12)


def test_shrinkage_tied_equals_full(data):
    (x, y), (xt, _) = data
    full = IDefender(Identity(), n_components=1, covariance_estimator="oas", dtype="float64",
                     progress=False).fit(loader(x, y))
    tied = IDefender(Identity(), n_components=1, covariance_type="tied", covariance_estimator="oas",
                     dtype="float64", progress=False).fit(loader(x, y))
    torch.testing.assert_close(tied.score(xt), full.score(xt), rtol=1e-12, atol=1e-10)


def test_shrinkage_is_saved_and_loaded(tmp_path, data):
    (x, y), (xt, _) = data
    detector = IDefender(Identity(), n_components=1, covariance_estimator="ledoit-wolf", dtype="float64",
                         progress=False).fit(loader(x, y))
    detector.save(tmp_path / "d.safetensors")
    loaded = IDefender.load(tmp_path / "d.safetensors", Identity())
    assert loaded.covariance_estimator == "ledoit-wolf"
    torch.testing.assert_close(loaded.score(xt), detector.score(xt), rtol=0, atol=0)


def test_files_without_the_estimator_field_load_as_empirical(tmp_path, data):
    """Detector files written before the option existed have no 'covariance_estimator'."""
    from idefender_gpu.detector import _io

    (x, y), (xt, _) = data
    detector = IDefender(Identity(), n_components=1, dtype="float64", progress=False).fit(loader(x, y))
    detector.save(tmp_path / "new.safetensors")
    config, tensors = _io.read_detector_file(tmp_path / "new.safetensors")
    del config["params"]["covariance_estimator"]
    _io.write_detector_file(tmp_path / "old.safetensors", config, tensors)
    loaded = IDefender.load(tmp_path / "old.safetensors", Identity())
    assert loaded.covariance_estimator == "empirical"
    torch.testing.assert_close(loaded.score(xt), detector.score(xt), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"covariance_estimator": "shrunk"}, "'covariance_estimator' parameter of IDefender must be a str among"),
    ({"covariance_estimator": None}, "'covariance_estimator' parameter of IDefender"),
    ({"covariance_estimator": "oas", "n_components": 2}, "needs n_components=1"),
    ({"covariance_estimator": "ledoit-wolf", "covariance_type": "diag"}, "needs covariance_type 'full' or 'tied'"),
])
def test_bad_covariance_estimator_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IDefender(Identity(), **kwargs)


def test_bad_covariance_estimator_set_later_is_refused_before_reading(data):
    (x, y), _ = data
    detector = IDefender(Identity(), n_components=2, progress=False)
    detector.covariance_estimator = "oas"

    def never():
        raise AssertionError("read")
        yield

    class Never:
        def __iter__(self):
            return never()

    with pytest.raises(ValueError, match="needs n_components=1"):
        detector.fit(Never())
    assert not hasattr(detector, "thresholds_")


def test_streamed_fit_refuses_a_one_shot_iterator(data):
    (x, y), _ = data
    detector = IDefender(Identity(), n_components=1, progress=False)
    with pytest.raises(TypeError, match="loader must be re-iterable"):
        detector.fit(iter(loader(x, y)))
    assert not hasattr(detector, "thresholds_")


def test_streamed_fit_refuses_a_loader_that_changes_between_passes(data):
    (x, y), _ = data

    class Shrinking:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            n = x.shape[0] if self.passes == 1 else x.shape[0] - 64
            return iter(loader(x[:n], y[:n]))

    detector = IDefender(Identity(), n_components=1, progress=False)
    with pytest.raises(ValueError, match="same \\(inputs, labels\\) on every pass"):
        detector.fit(Shrinking())
    assert not hasattr(detector, "thresholds_")


def test_streamed_fit_checks_like_the_in_memory_fit(data):
    (x, y), _ = data
    with pytest.raises(ValueError, match=r"loader labels must be class labels in \[0, n_classes\)"):
        IDefender(Identity(), n_components=1, progress=False).fit(loader(x, y + 1))
    with pytest.raises(ValueError, match="at least 2 sample"):
        keep = (y != 4) | (torch.arange(y.shape[0]) == int((y == 4).nonzero()[0]))
        IDefender(Identity(), n_components=1, progress=False).fit(loader(x[keep], y[keep]))
    with pytest.raises(ValueError, match="pairs"):
        IDefender(Identity(), n_components=1, progress=False).fit([x[:10]])


@pytest.mark.parametrize("estimator", ["ledoit-wolf", "oas"])
@pytest.mark.parametrize("n_per_class", [2, 5, 300])
def test_shrunk_covariances_of_merged_moments_equal_scikit_learn(estimator, n_per_class):
    """The closed form on moments merged over batches of 7 or 61 (fourth moment shifted at each
    merge), batched over classes, against sklearn directly (no factorisation in between)."""
    from sklearn.covariance import OAS, LedoitWolf

    from idefender_gpu.detector._moments import batch_moments, merge_moments, shrunk_covariances

    x, y = gaussian_classes(n_per_class, seed=6, width=D)
    x = x + 50.0  # away from the origin: the shifts matter
    total = None
    step = 7 if n_per_class < 10 else 61
    for start in range(0, x.shape[0], step):
        part = batch_moments(x[start:start + step], y[start:start + step], C, diagonal=False, higher=True,
                             memory_budget=1 if start % 2 else None)  # one tile per block, or all
        total = merge_moments(total, part, C)
    got = shrunk_covariances(total, estimator)
    Oracle = LedoitWolf if estimator == "ledoit-wolf" else OAS
    for c in range(C):
        expected = torch.as_tensor(Oracle(assume_centered=False).fit(x[y == c].numpy()).covariance_)
        torch.testing.assert_close(got[c], expected, rtol=1e-11, atol=1e-12)


class _ThreadRanks:
    """A stand-in for ``DataParallel.sum_parts``: ranks are threads meeting at a barrier."""

    def __init__(self, world_size):
        import threading

        self.barrier = threading.Barrier(world_size)
        self.parts = {}

    def sum_parts(self, compute, shapes, dtype, device, what):
        import threading

        me = threading.get_ident()
        self.barrier.wait()
        self.parts[me] = compute()
        self.barrier.wait()
        total = [sum(parts[i] for parts in self.parts.values()) for i in range(len(shapes))]
        self.barrier.wait()
        return total


@pytest.mark.parametrize("diagonal, higher, pooled", [(False, True, False), (True, False, False),
                                                     (False, False, True)])
def test_all_reduced_moments_equal_the_moments_of_all_data(diagonal, higher, pooled):
    """Three 'ranks' (threads) with unequal shards, a class absent from one: the merged
    moments equal those of all the data (counts, means, scatter, third and fourth moments)."""
    import threading

    from idefender_gpu.detector._moments import all_reduce_moments, batch_moments, merge_moments

    x, y = gaussian_classes(20, seed=8)
    x = x + 30.0
    keep = [(y != 2) & (torch.arange(y.shape[0]) % 3 == 0), torch.arange(y.shape[0]) % 3 == 1,
            torch.arange(y.shape[0]) % 3 == 2]
    keep[0] |= (y == 2) & (torch.arange(y.shape[0]) % 3 == 0)
    keep[0] &= y != 5  # class 5 absent from rank 0
    rest = ~(keep[0] | keep[1] | keep[2])
    keep[1] |= rest
    setting = _ThreadRanks(3)
    results = [None] * 3

    def rank(r):
        m = merge_moments(None, batch_moments(x[keep[r]], y[keep[r]], C, diagonal=diagonal, higher=higher,
                                              pooled=pooled), C)
        results[r] = all_reduce_moments(setting, m, "test")

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = merge_moments(None, batch_moments(x, y, C, diagonal=diagonal, higher=higher, pooled=pooled), C)
    for got in results:
        for a, b in zip(got._fields(), expected._fields()):
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-9)


_PEAK_RSS = """
import json
import torch
from torch import nn
from idefender_gpu import IDefender
from idefender_gpu.features import collect

class OnTheFly:
    '''n_batches batches of 2000 states x 128 made on the fly (10 classes), the same on every pass.'''
    def __init__(self, n_batches):
        self.n_batches = n_batches
    def __iter__(self):
        for b in range(self.n_batches):
            g = torch.Generator().manual_seed(b)
            y = torch.randint(0, 10, (2000,), generator=g)
            yield torch.randn(2000, 128, generator=g) + y[:, None].float(), y

torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(128, 10))
IDefender(model, n_components=1, progress=False).fit(OnTheFly(2))  # warm-up
collect(model, OnTheFly(2), progress=False)

def peak(mode, n_batches):
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = status("VmRSS")
    if mode == "fit":
        IDefender(model, n_components=1, progress=False).fit(OnTheFly(n_batches))
    else:
        states = collect(model, OnTheFly(n_batches), progress=False)
        del states
    return status("VmHWM") - base

print(json.dumps({f"{mode} {n}": peak(mode, n) for mode in ("fit", "collect") for n in (10, 100)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_streamed_fit_memory_does_not_grow_with_the_number_of_batches():
    """Peak RSS (VmHWM reset before each run; the four runs in one fresh process) of a K=1
    fit over 10 and 100 batches of 2000 x 128 float32 states made on the fly: 100 batches
    hold 102 MB of states, the fit keeps only a score and a label per sample and sorts them
    for the thresholds (a few arrays of N = 200,000 scalars, about 10 MB), so its peak may
    grow by at most 24 MiB; collecting the states (what the fit did before) grows by more
    than 75 MB (so the measurement can fail). A fit that held its states would grow like
    the collection: pages an earlier run left mapped cannot hide 92 MB of new states."""
    record = run_peak_rss(_PEAK_RSS)
    growth = record["fit 100"] - record["fit 10"]
    assert growth < 24 * 2**20, record
    held = record["collect 100"] - record["collect 10"]
    assert held > 75 * 10**6, record


@pytest.mark.parametrize("order", ["shuffled", "sorted"])
def test_streamed_mahalanobis_equals_the_in_memory_closed_form(order, data):
    """The pooled scatter merged over uneven batches == the one-hot 'tied' M-step on all states."""
    from idefender_gpu.detector._densities import SharedCovarianceGaussians

    (x, y), (xt, _) = data
    detector = MahalanobisDetector(Identity(), dtype="float64", progress=False).fit(
        Batches(x, y, [1, 2, 97, 1, 150, 29, 200], order))
    reference = SharedCovarianceGaussians.fit(x, y, C, {"reg_covar": 1e-4})
    layer = detector.layers_[0]
    torch.testing.assert_close(detector.means_[layer], reference.means, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(detector.precisions_cholesky_[layer], reference.prec_chol, rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(detector.thresholds_, _all_class_thresholds(detector, x, y), rtol=1e-12,
                               atol=1e-10)


def test_calibrate_streams_any_iterable(data):
    """calibrate is one pass: a one-shot iterator gives the thresholds of the loader."""
    (x, y), (xt, yt) = data
    detector = DETECTORS["k2-full"](Identity(), dtype="float64").fit(loader(x, y))
    expected = detector.calibrate(loader(xt, yt, batch_size=7), keep=0.8).thresholds_.clone()
    got = detector.calibrate(iter(loader(xt, yt, batch_size=50)), keep=0.8).thresholds_
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(got, _all_class_thresholds(detector, xt, yt), rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match=r"class labels in \[0, n_classes\)"):
        detector.calibrate(loader(xt, yt + 1))
    with pytest.raises(ValueError, match="at least 1 sample"):
        detector.calibrate(loader(xt[yt != 3], yt[yt != 3]))
    torch.testing.assert_close(detector.thresholds_, got)  # unchanged by the failed call
