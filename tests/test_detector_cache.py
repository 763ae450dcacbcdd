"""The fit by EM (several components per class) when the hidden states do not fit
``memory_budget`` (issue 12, item 1): EM passes streamed from the hidden-state cache on
disk (``cache=DIR``) or from the model run again, and the cache itself (manifest, refusals,
resume, corruption, no pickle).

The streamed fits are :meth:`BatchedGaussianMixture.fit_stream` on the loader's batches
of hidden states (its initialisation, from a sample of each class, is not the in-memory
``fit``'s), so they are compared with ``fit_stream`` on the same batches collected by
hand, in float64, to round-off; the in-memory path (states under the budget) with
``fit``. A tiny ``memory_budget`` forces the streamed path on tiny data.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from idefender_gpu import IDefender
from idefender_gpu.detector import _cache
from idefender_gpu.detector._states import class_thresholds
from idefender_gpu.exceptions import InvalidParameterError
from idefender_gpu.features import hidden_states
from idefender_gpu.mixture import BatchedGaussianMixture

pytestmark = pytest.mark.usefixtures("one_thread")

C, D, N_PER, BATCH = 3, 4, 40, 16
#: below the 120 x 5 x 8 bytes of one layer's float64 states: the streamed path
SMALL = 4000
#: two layers of 16 x 5 float64 states are 1280 bytes: a shard every two batches
SHARD = 2000
TIGHT = dict(rtol=1e-12, atol=1e-12)


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(N_PER)
    side = (torch.randint(0, 2, (y.shape[0],), generator=g) * 2 - 1).double()
    x = 4.0 * torch.eye(C, D, dtype=torch.float64)[y] + 1.5 * side[:, None] * torch.eye(D, dtype=torch.float64)[3] \
        + 0.5 * torch.randn(y.shape[0], D, generator=g, dtype=torch.float64)
    perm = torch.randperm(y.shape[0], generator=g)
    return x[perm], y[perm]


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).double()


def loader(x, y):
    return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def detector(model, **kw):
    kw = {"n_components": 2, "random_state": 0, "progress": False, "dtype": "float64", **kw}
    return IDefender(model, **kw)


class Forwards:
    """Counts the model's forward passes (a forward hook on the root module)."""

    def __init__(self, model):
        self.n = 0
        model.register_forward_hook(lambda *args: setattr(self, "n", self.n + 1))


def assert_same_detector(a, b, **tol):
    tol = tol or TIGHT
    for layer in a.layers_:
        for name in ("weights_", "means_", "precisions_cholesky_"):
            torch.testing.assert_close(getattr(a, name)[layer], getattr(b, name)[layer], **tol)
    torch.testing.assert_close(a.thresholds_, b.thresholds_, **tol)


@pytest.fixture(scope="module")
def xy():
    return data()


@pytest.fixture(scope="module")
def cached_fit(xy, tmp_path_factory):
    """A two-layer fit streamed from a fresh cache (several shards)."""
    folder = tmp_path_factory.mktemp("cache") / "states"
    model = make_model()
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_cache, "SHARD_BYTES", SHARD)
        torch.set_num_threads(1)  # as the one_thread fixture, which module fixtures precede
        try:
            det = detector(model, layers=["0", "2:input"], memory_budget=SMALL, cache=folder).fit(loader(*xy))
        finally:
            torch.set_num_threads(threads)
    return model, det, folder


# --------------------------------------------------------------------------------------
# The streamed fits equal fit_stream on the same batches
# --------------------------------------------------------------------------------------


def test_cached_fit_equals_fit_stream_on_the_collected_states(cached_fit, xy):
    model, det, folder = cached_fit
    x, y = xy
    batches = [(hidden_states(model, x[i:i + BATCH], det.layers_)[1], y[i:i + BATCH])
               for i in range(0, len(y), BATCH)]
    options = det._fit_options(torch.float64, torch.device("cpu"))
    scores = torch.zeros(len(y), dtype=torch.float64)
    for layer in det.layers_:
        ref = BatchedGaussianMixture(**options).fit_stream([(states[layer], labels) for states, labels in batches])
        torch.testing.assert_close(det.weights_[layer], ref.weights_, **TIGHT)
        torch.testing.assert_close(det.means_[layer], ref.means_, **TIGHT)
        torch.testing.assert_close(det.precisions_cholesky_[layer], ref.precisions_cholesky_, **TIGHT)
        states = torch.cat([s[layer] for s, _ in batches])
        scores += ref.score_samples(states, y)
    torch.testing.assert_close(det.thresholds_, class_thresholds(scores, y, C, 0.95), **TIGHT)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n_samples"] == len(y) and len(manifest["shards"]) == 4
    assert manifest["layers"] == ["0", "2:input"] and manifest["dtype"] == "float64"
    assert manifest["input_shape"] == [D] and manifest["widths"] == [5, 5]


def test_rerun_model_fit_equals_the_cached_fit(cached_fit, xy):
    model, cached, _ = cached_fit
    forwards = Forwards(model)
    rerun = detector(model, layers=["0", "2:input"], memory_budget=SMALL).fit(loader(*xy))
    assert_same_detector(rerun, cached)
    assert forwards.n > 10 * len(loader(*xy))  # the model ran on every pass of every layer's EM


def test_a_complete_cache_is_reused_without_running_the_model(cached_fit, xy):
    model, cached, folder = cached_fit
    forwards = Forwards(model)
    again = detector(model, layers=["0", "2:input"], memory_budget=SMALL, cache=folder).fit(loader(*xy))
    assert forwards.n == 0
    assert_same_detector(again, cached, rtol=0, atol=0)


def test_states_that_fit_the_budget_take_the_in_memory_fit(xy, tmp_path):
    model = make_model()
    det = detector(model, cache=tmp_path / "unused").fit(loader(*xy))
    layer = det.layers_[0]
    states = hidden_states(model, xy[0], [layer])[1][layer]
    ref = BatchedGaussianMixture(**det._fit_options(torch.float64, torch.device("cpu"))).fit(states, xy[1])
    torch.testing.assert_close(det.means_[layer], ref.means_, **TIGHT)
    torch.testing.assert_close(det.precisions_cholesky_[layer], ref.precisions_cholesky_, **TIGHT)
    assert not (tmp_path / "unused").exists()


# --------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    (lambda: (make_model(seed=1), {}), r"written for another model: Sequential with state_dict digest [0-9a-f]{12}"
                                        r"\.\.\. in the cache, Sequential with state_dict digest [0-9a-f]{12}\.\.\. "
                                        "for this detector"),
    (lambda: (make_model(), {"layers": ["0"]}), "written for another layers"),
    (lambda: (make_model(), {"dtype": "float32"}), "written for another dtype: 'float64' in the cache, 'float32'"),
])
def test_a_cache_of_another_model_layer_set_or_dtype_is_refused(cached_fit, xy, change, match):
    _, _, folder = cached_fit
    model, kw = change()
    kw = {"layers": ["0", "2:input"], **kw}
    with pytest.raises(ValueError, match=match):
        detector(model, memory_budget=SMALL, cache=folder, **kw).fit(loader(*xy))


def test_a_corrupted_shard_is_refused(cached_fit, xy, tmp_path):
    model, _, folder = cached_fit
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    shard = copy / "shard-000001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF  # one byte of the states
    shard.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard 'shard-000001.safetensors' failed its SHA-256 check"):
        detector(model, layers=["0", "2:input"], memory_budget=SMALL, cache=copy).fit(loader(*xy))
    shard.unlink()
    with pytest.raises(ValueError, match="is missing its shard"):
        detector(model, layers=["0", "2:input"], memory_budget=SMALL, cache=copy).fit(loader(*xy))


def test_the_cache_is_never_pickled(cached_fit, xy, monkeypatch):
    model, cached, folder = cached_fit
    for file in folder.iterdir():
        head = file.read_bytes()[:16]
        assert not head.startswith(b"\x80"), file  # no pickle protocol header
        if file.suffix == ".safetensors":
            n = int.from_bytes(head[:8], "little")
            json.loads(file.read_bytes()[8:8 + n])  # a safetensors JSON header
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load"))
    again = detector(model, layers=["0", "2:input"], memory_budget=SMALL, cache=folder).fit(loader(*xy))
    assert_same_detector(again, cached, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------


class Interrupted:
    """The loader's batches, raising at batch ``stop`` on the first pass only."""

    def __init__(self, batches, stop):
        self.batches, self.stop, self.passes = batches, stop, 0

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.batches):
            if self.passes == 1 and i == self.stop:
                raise RuntimeError("interrupted")
            yield batch


def test_an_interrupted_first_pass_is_resumed(cached_fit, xy, tmp_path, monkeypatch):
    model, cached, _ = cached_fit
    monkeypatch.setattr(_cache, "SHARD_BYTES", SHARD)
    batches = list(loader(*xy))
    folder = tmp_path / "states"
    interrupted = Interrupted(batches, stop=5)
    with pytest.raises(RuntimeError, match="interrupted"):
        detector(model, layers=["0", "2:input"], memory_budget=SMALL, cache=folder).fit(interrupted)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert not manifest["complete"] and [s["batches"] for s in manifest["shards"]] == [[16, 16], [16, 16]]
    forwards = Forwards(model)
    resumed = detector(model, layers=["0", "2:input"], memory_budget=SMALL, cache=folder).fit(interrupted)
    assert forwards.n == len(batches) - 4  # the four batches in the cache are not run again
    assert_same_detector(resumed, cached)


def test_a_first_pass_interrupted_after_its_last_shard_is_completed(cached_fit, xy, tmp_path):
    """Every batch written, the manifest not yet marked complete: nothing runs again."""
    model, cached, folder = cached_fit
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in folder.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    forwards = Forwards(model)
    resumed = detector(model, layers=["0", "2:input"], memory_budget=SMALL, cache=copy).fit(loader(*xy))
    assert forwards.n == 0 and json.loads((copy / "manifest.json").read_text())["complete"]
    assert_same_detector(resumed, cached, rtol=0, atol=0)


def test_a_resume_with_another_loader_is_refused(cached_fit, xy, tmp_path, monkeypatch):
    model, _, _ = cached_fit
    monkeypatch.setattr(_cache, "SHARD_BYTES", SHARD)
    batches = list(loader(*xy))
    folder = tmp_path / "states"
    layers = ["0", "2:input"]
    with pytest.raises(RuntimeError, match="interrupted"):
        detector(model, layers=layers, memory_budget=SMALL, cache=folder).fit(Interrupted(batches, stop=5))
    shuffled = [batches[1], batches[0], *batches[2:]]
    with pytest.raises(ValueError, match="loader batch 0 differs from the batch the cache"):
        detector(model, layers=layers, memory_budget=SMALL, cache=folder).fit(shuffled)
    with pytest.raises(ValueError, match="loader yields 1 batches, fewer than the 4"):
        detector(model, layers=layers, memory_budget=SMALL, cache=folder).fit(batches[:1])


# --------------------------------------------------------------------------------------
# The model run again (no cache)
# --------------------------------------------------------------------------------------


class Changing:
    """The loader's batches; from the second pass on, two batches swapped."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        if self.passes == 1:
            return iter(self.batches)
        return iter([self.batches[1], self.batches[0], *self.batches[2:]])


def test_a_loader_that_changes_between_passes_is_refused(xy):
    with pytest.raises(ValueError, match="same batches in the same order on every pass"):
        detector(make_model(), memory_budget=SMALL).fit(Changing(list(loader(*xy))))


def test_a_one_shot_iterator_over_the_budget_needs_a_cache(xy, tmp_path):
    model = make_model()
    with pytest.raises(TypeError, match="loader must be re-iterable.*give cache=DIR"):
        detector(model, memory_budget=SMALL).fit(iter(loader(*xy)))
    det = detector(model, memory_budget=SMALL, cache=tmp_path / "states").fit(iter(loader(*xy)))
    assert det.thresholds_.shape == (C,)


def test_the_cache_parameter_is_validated(tmp_path, xy):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cache must be a folder"):
        detector(make_model(), memory_budget=SMALL, cache=tmp_path / "file").fit(loader(*xy))
    with pytest.raises(InvalidParameterError, match="The 'cache' parameter of IDefender must be None or an "
                                                    "instance of 'str' or an instance of 'os.PathLike'"):
        IDefender(make_model(), n_components=2, cache=3)


# --------------------------------------------------------------------------------------
# Inside data_parallel (a world of one process: the same code paths as on many ranks)
# --------------------------------------------------------------------------------------


@pytest.fixture
def world_of_one(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_data_parallel_streams_from_a_cache_per_rank(world_of_one, xy, tmp_path):
    """Inside data_parallel the in-memory fit and the streamed ones share their
    initialisation (a sample of each class chosen by row hashes): the same detector."""
    from idefender_gpu.distributed import data_parallel

    model = make_model()
    with data_parallel(timeout=60):
        memory = detector(model).fit(loader(*xy))
        cached = detector(model, memory_budget=SMALL, cache=tmp_path / "states").fit(loader(*xy))
        rerun = detector(model, memory_budget=SMALL).fit(loader(*xy))
    assert json.loads((tmp_path / "states" / "rank-0-of-1" / "manifest.json").read_text())["complete"]
    assert_same_detector(cached, rerun)
    assert_same_detector(cached, memory, rtol=1e-9, atol=1e-10)
