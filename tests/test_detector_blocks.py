"""Issue 12 item 2: class blocks and a storage device for the detector; save / load per block.

* ``storage_device``: the fitted parameters stay there and scoring moves only the classes a
  batch needs, in blocks of classes. On this CPU machine the storage and the model are both
  on "cpu", but a stored density always takes the moving path (gather where the tensors
  live, copy to the states' device), so these tests run it: the moved rows are recorded
  through :func:`idefender_gpu.detector._densities.fetch`, and scores, thresholds,
  ``calibrate``, ``log_density`` (all classes and subsets) and gradients equal the plain
  detector's in float64 to round-off, also with blocks forced by a tiny ``memory_budget``.
* The one-component fit writes its factors to the storage device block by block
  (``gaussian_parameters(out=...)``): with blocks of a few classes, the plain fit's numbers.
* Files are written and read block by block (tiny ``_files.BLOCK_BYTES`` here): the bytes
  do not depend on the block size, safetensors reads them, the old layout (safetensors'
  own writer, the frozen digest) still loads, a memory-mapped load scores the same, and
  every corruption is refused in every read mode.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from idefender_gpu import IDefender, MahalanobisDetector, _files
from idefender_gpu.detector import _densities, _io
from idefender_gpu.exceptions import InvalidParameterError
from conftest import run_peak_rss
from test_files import _reference_digest  # the frozen version-1 digest (the oracle of both files)

C, D = 8, 5


def gaussian_classes(n_per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = 4.0 * torch.randn(C, D, generator=g, dtype=torch.float64)
    scales = torch.randn(C, D, D, generator=g, dtype=torch.float64) / D ** 0.5
    y = torch.arange(C).repeat_interleave(n_per_class)
    z = torch.randn(y.shape[0], D, generator=g, dtype=torch.float64)
    x = centres[y] + (z.unsqueeze(1) @ (torch.eye(D, dtype=torch.float64) + scales[y])).squeeze(1)
    perm = torch.randperm(y.shape[0], generator=g)
    return x[perm], y[perm]


class Identity(nn.Module):
    """Hidden state = the input of ``head``; logits = a fixed read-out."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D, C).to(torch.float64)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(C, D, generator=torch.Generator().manual_seed(5),
                                               dtype=torch.float64))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(x)


def loader(x, y, batch_size=50):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


DETECTORS = {
    "k1-full": lambda **kw: IDefender(Identity(), n_components=1, **kw),
    "k1-diag": lambda **kw: IDefender(Identity(), n_components=1, covariance_type="diag", **kw),
    "k1-oas": lambda **kw: IDefender(Identity(), n_components=1, covariance_estimator="oas", **kw),
    "k2-full": lambda **kw: IDefender(Identity(), n_components=2, random_state=0, **kw),
    "maha-closest": lambda **kw: MahalanobisDetector(Identity(), **kw),
    "maha-predicted": lambda **kw: MahalanobisDetector(Identity(), score_class="predicted", **kw),
}
CLOSE = {"rtol": 1e-12, "atol": 1e-10}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_module():
    """One intra-op thread for the whole module, the module-scoped fits included (see the
    ``one_thread`` fixture of conftest: spinning OpenMP threads on busy shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return gaussian_classes(30, seed=0), gaussian_classes(6, seed=1)


@pytest.fixture(scope="module", params=sorted(DETECTORS))
def pair(request, data):
    """The same detector fitted plainly and with ``storage_device='cpu'``."""
    (x, y), _ = data
    make = DETECTORS[request.param]
    plain = make(dtype="float64", progress=False).fit(loader(x, y))
    stored = make(dtype="float64", progress=False, storage_device="cpu").fit(loader(x, y))
    return request.param, plain, stored


class Moves:
    """Records the classes each :func:`_densities.fetch` of a per-class tensor moves."""

    def __init__(self, monkeypatch):
        self.rows: list[set[int]] = []
        real = _densities.fetch

        def fetch(tensor, index, device):
            if tensor.shape[0] == C:  # a per-class tensor (not the shared (D, D) factor)
                rows = range(C)[index] if isinstance(index, slice) else index.tolist()
                self.rows.append(set(rows))
            return real(tensor, index, device)

        monkeypatch.setattr(_densities, "fetch", fetch)

    def union(self) -> set[int]:
        return set().union(*self.rows)


def _scores(detector, x, classes):
    return {
        "all": detector.log_density(x),
        "subset": detector.log_density(x, classes),
        "score": detector.score(x),
        "predict": detector.predict(x),
        "reject": detector.reject(x),
    }


def _gradient(detector, x, classes):
    x = x.clone().requires_grad_(True)
    detector.log_density(x, classes).sum().backward()
    return x.grad


def test_stored_detector_equals_the_plain_one(pair, data):
    """Parameters, thresholds, every scoring path and the gradients: the stored detector
    (moving path) gives the plain detector's numbers."""
    name, plain, stored = pair
    (x, y), (xt, yt) = data
    assert all(d.stored for d in stored._densities.values())
    assert not any(d.stored for d in plain._densities.values())
    layer = plain.layers_[0]
    torch.testing.assert_close(stored.means_[layer], plain.means_[layer], **CLOSE)
    torch.testing.assert_close(stored.precisions_cholesky_[layer], plain.precisions_cholesky_[layer], **CLOSE)
    torch.testing.assert_close(stored.thresholds_, plain.thresholds_, **CLOSE)
    classes = torch.stack([yt, (yt + 3) % C], 1)  # (B, 2)
    for key, value in _scores(plain, xt, classes).items():
        torch.testing.assert_close(_scores(stored, xt, classes)[key], value, **CLOSE, msg=key)
    torch.testing.assert_close(_gradient(stored, xt, classes), _gradient(plain, xt, classes), **CLOSE)
    torch.testing.assert_close(_gradient(stored, xt, None), _gradient(plain, xt, None), **CLOSE)
    got = stored.calibrate(loader(xt, yt), keep=0.8).thresholds_
    torch.testing.assert_close(got, plain.calibrate(loader(xt, yt), keep=0.8).thresholds_, **CLOSE)


def test_blocks_of_classes_move_only_what_a_batch_needs(pair, data, monkeypatch):
    """With a tiny memory budget: all-class scoring moves every class, in blocks; scoring
    under the predicted class moves those classes only; the numbers do not change."""
    name, plain, stored = pair
    _, (xt, yt) = data
    xq = xt[yt < 3]  # a batch of 3 true classes
    expected = {"all": plain.log_density(xq), "score": plain.score(xq), "predict": plain.predict(xq)}
    predicted = set(plain.model(xq).argmax(-1).tolist())
    monkeypatch.setattr(stored, "memory_budget", 600)  # a few classes' parameters per block
    moves = Moves(monkeypatch)
    torch.testing.assert_close(stored.log_density(xq), expected["all"], **CLOSE)
    assert moves.union() == set(range(C))
    if name.startswith("k"):  # class mixtures move in blocks; the shared-covariance means are small
        assert max(len(rows) for rows in moves.rows) < C
    moves.rows.clear()
    torch.testing.assert_close(stored.score(xq), expected["score"], **CLOSE)
    if name != "maha-closest":  # the closest class needs every class's density
        assert moves.union() == predicted
    torch.testing.assert_close(stored.predict(xq), expected["predict"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["k1-full", "k1-oas", "k1-diag"])
def test_streamed_fit_with_a_tiny_budget_equals_the_plain_fit(name, data):
    """The K=1 fit with blocks of three classes (tiny memory_budget: three (D, D)
    temporaries per class) written to the storage device; shrunk and diagonal too."""
    (x, y), (xt, _) = data
    plain = DETECTORS[name](dtype="float64", progress=False).fit(loader(x, y))
    blocked = DETECTORS[name](dtype="float64", progress=False, storage_device="cpu",
                              memory_budget=3 * D * D * 8 * 3).fit(loader(x, y))
    assert all(d.stored for d in blocked._densities.values())
    layer = plain.layers_[0]
    torch.testing.assert_close(blocked.precisions_cholesky_[layer], plain.precisions_cholesky_[layer], **CLOSE)
    torch.testing.assert_close(blocked.thresholds_, plain.thresholds_, **CLOSE)
    torch.testing.assert_close(blocked.score(xt), plain.score(xt), **CLOSE)


def test_storage_device_is_validated():
    with pytest.raises(InvalidParameterError, match="'storage_device' parameter of IDefender must be"):
        IDefender(Identity(), storage_device="nowhere")
    with pytest.raises(InvalidParameterError, match="'storage_device' parameter of MahalanobisDetector"):
        MahalanobisDetector(Identity(), storage_device=3)


# --------------------------------------------------------------------------------------
# Files per block
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted(data):
    (x, y), _ = data
    return DETECTORS["k1-full"](dtype="float64", progress=False).fit(loader(x, y))


LOADS = [{}, {"storage_device": "cpu"}, {"mmap": True}, {"storage_device": "cpu", "mmap": True}]


def test_save_and_load_per_block(fitted, data, tmp_path, monkeypatch):
    """Tiny blocks: the same bytes as one block, a file safetensors reads, and every load
    mode (copies, storage device, memory map) scores exactly as the saved detector."""
    _, (xt, _) = data
    fitted.save(tmp_path / "whole.safetensors")
    monkeypatch.setattr(_files, "BLOCK_BYTES", 24)  # a few values per block: many blocks per tensor
    path = tmp_path / "blocks.safetensors"
    fitted.save(path)
    assert path.read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    layer = fitted.layers_[0]
    plain = safetensors.torch.load_file(str(path))
    torch.testing.assert_close(plain["layers.0.prec_chol"], fitted.precisions_cholesky_[layer], rtol=0, atol=0)
    for kwargs in LOADS:
        loaded = IDefender.load(path, Identity(), **kwargs)
        assert all(d.stored == ("storage_device" in kwargs) for d in loaded._densities.values())
        torch.testing.assert_close(loaded.score(xt), fitted.score(xt), rtol=0, atol=0)
        torch.testing.assert_close(loaded.log_density(xt), fitted.log_density(xt), rtol=0, atol=0)
        torch.testing.assert_close(loaded.thresholds_, fitted.thresholds_, rtol=0, atol=0)


def test_memory_mapped_detector_survives_a_save_over_its_file(fitted, data, tmp_path):
    """Saving replaces the file by a rename: a detector mapping the old file is unaffected."""
    _, (xt, _) = data
    path = tmp_path / "d.safetensors"
    fitted.save(path)
    loaded = IDefender.load(path, Identity(), storage_device="cpu", mmap=True)
    other = DETECTORS["k1-diag"](dtype="float64", progress=False).fit(loader(*data[0]))
    other.save(path)
    torch.testing.assert_close(loaded.score(xt), fitted.score(xt), rtol=0, atol=0)
    loaded.save(path)  # written from its own (old) map into a new file, then renamed over it
    again = IDefender.load(path, Identity(), mmap=True)
    torch.testing.assert_close(again.score(xt), fitted.score(xt), rtol=0, atol=0)


def test_file_in_the_first_layout_still_loads(fitted, data, tmp_path, monkeypatch):
    """A version-1 file as the first release wrote it: safetensors' own writer (its tensor
    order), a config built field by field here, the frozen digest."""
    _, (xt, _) = data
    layer = fitted.layers_[0]
    named = {"thresholds": fitted.thresholds_, "layers.0.weights": fitted.weights_[layer],
             "layers.0.means": fitted.means_[layer], "layers.0.prec_chol": fitted.precisions_cholesky_[layer]}
    config = {"format_version": 1, "detector": "IDefender", "density": "class_mixtures", "layers": [layer],
              "n_features": [D], "n_classes": C, "input_shape": [D], "keep": 0.95, "dtype": "float64",
              "params": {"n_components": 1, "covariance_type": "full", "reg_covar": 1e-4, "tol": 1e-3,
                         "max_iter": 100, "n_init": 1, "init_params": "kmeans", "random_state": None}}
    config_json = json.dumps(config, sort_keys=True)
    metadata = {"format": _io.FORMAT, "config": config_json,
                "sha256": _reference_digest(_io.FORMAT, config_json, named)}
    path = tmp_path / "first.safetensors"
    path.write_bytes(safetensors.torch.save(named, metadata=metadata))
    monkeypatch.setattr(_files, "BLOCK_BYTES", 40)
    for kwargs in LOADS:
        loaded = IDefender.load(path, Identity(), **kwargs)
        assert loaded.covariance_estimator == "empirical"
        torch.testing.assert_close(loaded.score(xt), fitted.score(xt), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", LOADS)
def test_corrupted_files_refused_in_every_read_mode(fitted, tmp_path, monkeypatch, kwargs):
    path = tmp_path / "d.safetensors"
    fitted.save(path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    monkeypatch.setattr(_files, "BLOCK_BYTES", 32)
    for offset in (8 + n + 3, len(data) - 5):  # the first tensor's bytes, the last tensor's
        blob = bytearray(data)
        blob[offset] ^= 0x04
        path.write_bytes(bytes(blob))
        with pytest.raises(ValueError, match="failed its integrity check"):
            IDefender.load(path, Identity(), **kwargs)
    path.write_bytes(data[:-9])
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        IDefender.load(path, Identity(), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_refused_in_any_block(fitted, tmp_path, monkeypatch, bad):
    """A non-finite value in the last block of rows, under a valid digest."""
    path = tmp_path / "d.safetensors"
    fitted.save(path)
    config, tensors = _io.read_detector_file(path)
    tensors["layers.0.prec_chol"][-1, 0, -1, -1] = bad
    _io.write_detector_file(path, config, tensors)
    monkeypatch.setattr(_files, "BLOCK_BYTES", 3 * D * D * 8)  # blocks of 3 classes
    with pytest.raises(ValueError, match="'layers.0.prec_chol' must have shape .* and be finite; got NaN or inf"):
        IDefender.load(path, Identity(), storage_device="cpu")


def test_mmap_needs_host_storage(fitted, tmp_path):
    path = tmp_path / "d.safetensors"
    fitted.save(path)
    with pytest.raises(ValueError, match="mmap=True keeps the parameters memory-mapped"):
        IDefender.load(path, Identity(), storage_device="meta", mmap=True)
    with pytest.raises(InvalidParameterError, match="'storage_device' parameter of IDefender.load"):
        IDefender.load(path, Identity(), storage_device="nowhere")
    with pytest.raises(InvalidParameterError, match="'mmap' parameter of IDefender.load"):
        IDefender.load(path, Identity(), mmap="yes")


# --------------------------------------------------------------------------------------
# Peak memory of save / load
# --------------------------------------------------------------------------------------

_PEAK_RSS = """
import json, sys
import torch
from torch import nn
import safetensors, safetensors.torch
from idefender_gpu import IDefender

def growth(run):
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = status("VmRSS")
    kept = run()
    return status("VmHWM") - base

torch.set_num_threads(1)
C, D = 16, 512
g = torch.Generator().manual_seed(0)
y = torch.arange(C).repeat_interleave(24)
x = torch.randn(y.shape[0], D, generator=g, dtype=torch.float64) + y[:, None]
model = nn.Sequential(nn.Linear(D, C).double())
detector = IDefender(model, n_components=1, reg_covar=1e-2, progress=False).fit([(x, y)])
path = sys.argv[1]
detector.save(path + ".warm")  # warm-up: imports and first allocations
IDefender.load(path + ".warm", model)
layer = detector.layers_[0]
tensors = {"prec_chol": detector.precisions_cholesky_[layer]}
params = tensors["prec_chol"].numel() * 8

def old_read():  # the reader before: tensors of safetensors' memory map, then a copy each
    with safetensors.safe_open(path, framework="pt") as handle:
        return {name: handle.get_tensor(name).clone() for name in handle.keys()}

record = {
    "params": params,
    "save": growth(lambda: detector.save(path)),
    "load": growth(lambda: IDefender.load(path, model)),
    "bytes_save": growth(lambda: safetensors.torch.save(tensors)),
    "old_read": growth(old_read),
}
print(json.dumps(record))
"""


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_save_and_load_hold_one_copy(tmp_path):
    """Peak RSS growth (VmHWM reset before each step) around ``save`` and ``load`` of a
    detector with 33.5 MB of parameters (16 classes x 512^2 float64): saving streams
    (under a quarter of the parameters), loading holds one copy (under 1.3x; the
    finiteness check makes no mask or copy); a bytes copy of the tensors (what the former
    writer made, through ``safetensors.torch``'s ``_tobytes``) and the former reader
    (memory-mapped pages, then a copy) grow by about 1x and 2x, so the measurement can fail."""
    record = run_peak_rss(_PEAK_RSS, tmp_path / "d.safetensors")
    params = record["params"]
    assert record["save"] < 0.25 * params, record
    assert record["load"] < 1.3 * params, record
    assert record["bytes_save"] > 0.9 * params, record
    assert record["old_read"] > 1.7 * params, record


# --------------------------------------------------------------------------------------
# CUDA (skipped without one; benchmarks/gpu_check.sh runs the gpu marker)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda"])  # the gpu marker (conftest)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["k1-full", "k2-full", "maha-predicted"])
def test_pinned_host_storage_beside_a_cuda_model(name, device, data, tmp_path):
    """Host storage pinned beside a CUDA model: the same numbers as the detector on CUDA,
    gradients included, and every way of loading the file back."""
    (x, y), (xt, yt) = data
    detectors = []
    for storage in (None, "cpu"):
        detector = DETECTORS[name](dtype="float64", progress=False, storage_device=storage)
        detector.model.to(device)
        detectors.append(detector.fit(loader(x, y)))
    plain, stored = detectors
    assert all(d.means.device.type == "cpu" and d.means.is_pinned() for d in stored._densities.values())
    assert stored.thresholds_.device.type == "cuda"
    xq, classes = xt.to(device), torch.stack([yt, (yt + 1) % C], 1).to(device)
    expected = _scores(plain, xq, classes)
    for key, value in _scores(stored, xq, classes).items():
        torch.testing.assert_close(value, expected[key], **CLOSE, msg=key)
    torch.testing.assert_close(_gradient(stored, xq, classes), _gradient(plain, xq, classes), **CLOSE)
    path = tmp_path / "d.safetensors"
    stored.save(path)
    for kwargs in ({}, {"storage_device": "cpu"}, {"storage_device": "cpu", "mmap": True}):
        loaded = type(stored).load(path, plain.model, **kwargs)
        density = next(iter(loaded._densities.values()))
        assert density.means.device.type == ("cpu" if kwargs else "cuda")
        assert density.means.is_pinned() == (kwargs == {"storage_device": "cpu"})
        torch.testing.assert_close(loaded.score(xq), expected["score"], **CLOSE)
