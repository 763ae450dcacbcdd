"""Tests of ``idefender_gpu.models`` (issue 7): Table 1 shapes, seeded training, the checkpoint cache.

Training runs on tiny synthetic data (a few dozen 28x28 images), on CPU, in well under a second
per model.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from idefender_gpu import IDefender
from idefender_gpu.models import _paper as models_module  # where load_or_train looks up train
from idefender_gpu.data import Dataset
from idefender_gpu.features import hidden_states
from idefender_gpu.models import (
    ModelE,
    ModelF,
    build_model,
    checkpoint_key,
    evaluate,
    load_checkpoint,
    load_or_train,
    save_checkpoint,
    train,
    train_substitute,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on busy shared cores


def tiny_dataset(n_train: int = 64, n_test: int = 16, seed: int = 0) -> Dataset:
    """Images whose class is the row holding a bright bar (10 classes), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.arange(n) % 10
        x = 0.2 * torch.rand(n, 1, 28, 28, generator=g)
        x[torch.arange(n), 0, 2 + 2 * y, :] = 1.0
        return x, y

    (xtr, ytr), (xte, yte) = make(n_train), make(n_test)
    sha = hashlib.sha256(xtr.numpy().tobytes() + ytr.numpy().tobytes()).hexdigest()
    return Dataset("fashion-mnist", xtr, ytr, xte, yte, tuple(map(str, range(10))), Path("."), sha)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------
# Architectures (Table 1)
# --------------------------------------------------------------------------------------


def test_model_e_matches_table_1():
    model = ModelE()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(200, 784), (200, 200), (10, 200)]
    assert [type(m) for m in model.children()] == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10


def test_model_f_matches_table_1():
    model = ModelF()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size, m.stride) for m in convs] == [(64, (8, 8), (2, 2)), (128, (6, 6), (2, 2))]
    assert [type(m) for m in model.children()] == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear]
    x = torch.rand(2, 1, 28, 28)
    states = hidden_states(model, x, ["conv1", "conv2", "fc:input"])[1]
    assert states["conv1"].shape == (2, 64 * 11 * 11)
    assert states["conv2"].shape == (2, 128 * 3 * 3)
    assert states["fc:input"].shape == (2, 1152)
    assert torch.equal(states["fc:input"], states["conv2"].clamp_min(0))  # the ReLU between them
    assert model(x).shape == (2, 10) and model.fc.weight.shape == (10, 1152)


def test_build_model():
    assert isinstance(build_model("E"), ModelE) and isinstance(build_model("F", 5), ModelF)
    assert build_model("F", 5).fc.out_features == 5
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("G")


def test_idefender_default_layer_on_model_f():
    data = tiny_dataset(n_train=40)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=20)
    detector = IDefender(ModelF(), "conv2", covariance_type="diag", progress=False).fit(loader)
    assert detector.n_features_ == {"conv2": 1152}
    default = IDefender(ModelF(), covariance_type="diag", progress=False).fit(loader)
    assert default.layers_ == ("fc:input",) and default.n_features_ == {"fc:input": 1152}


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["E", "F"])
def test_training_is_reproducible(name):
    data = tiny_dataset()
    fresh = [build_model(name) for _ in range(3)]  # construction draws from the global RNG; training does not
    state = torch.random.get_rng_state()
    a = train(fresh[0], data.x_train, data.y_train, epochs=1, seed=0, batch_size=16, progress=False)
    b = train(fresh[1], data.x_train, data.y_train, epochs=1, seed=0, batch_size=16, progress=False)
    c = train(fresh[2], data.x_train, data.y_train, epochs=1, seed=1, batch_size=16, progress=False)
    assert same_weights(a, b)
    assert not same_weights(a, c)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert not a.training


def test_training_learns():
    data = tiny_dataset(n_train=200)
    model = train(ModelE(), data.x_train, data.y_train, epochs=5, seed=0, batch_size=20, lr=3e-3, progress=False)
    accuracy = float((evaluate(model, data.x_test) == data.y_test).float().mean())
    assert accuracy > 0.9


def test_substitute_training_queries_the_oracle():
    data = tiny_dataset(n_train=200)
    oracle = train(ModelE(), data.x_train, data.y_train, epochs=5, seed=0, batch_size=20, lr=3e-3, progress=False)
    calls = []
    forward = oracle.forward
    oracle.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    sub, info = train_substitute(ModelE(), oracle, data.x_test[:10], data.y_test[:10], rounds=3, epochs=2,
                                 seed=0, batch_size=8, progress=False)
    assert info == {"n_substitute_train": 40, "oracle_queries": 30}  # 10 -> 20 -> 40, labels of 10 + 20 new
    assert sum(calls) == 30
    again, _ = train_substitute(ModelE(), oracle, data.x_test[:10], data.y_test[:10], rounds=3,
                                epochs=2, seed=0, batch_size=8, progress=False)
    assert same_weights(sub, again) and not sub.training


def test_training_validates_inputs():
    with pytest.raises(TypeError, match="x must be a floating Tensor"):
        train(ModelE(), torch.zeros(4, 784, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="y must be an integer Tensor of shape"):
        train(ModelE(), torch.zeros(4, 1, 28, 28), torch.zeros(3, dtype=torch.int64))


# --------------------------------------------------------------------------------------
# Checkpoints and the cache
# --------------------------------------------------------------------------------------


def test_checkpoint_round_trip_is_safetensors(tmp_path, monkeypatch):
    data = tiny_dataset(n_train=20)
    model = train(ModelF(), data.x_train, data.y_train, epochs=1, seed=0, progress=False)
    path = save_checkpoint(model, tmp_path / "f.safetensors", {"seed": 0})
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # safetensors: 8-byte length, JSON header, raw tensors
    assert header["__metadata__"]["format"] == "idefender-gpu/model"
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left nothing behind

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint must never be unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    fresh = ModelF()
    assert load_checkpoint(path, fresh) == {"seed": 0}
    assert same_weights(model, fresh)


def test_cache_is_reused(tmp_path, monkeypatch):
    data = tiny_dataset()
    model, info = load_or_train("E", data, seed=3, epochs=1, cache=tmp_path, progress=False, batch_size=16)
    assert info["cached"] is False
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{info['key']}.safetensors"]
    assert info["key"] == checkpoint_key("fashion-mnist", data.sha256, "E", 3, 1, batch_size=16)

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model must not be retrained")

    monkeypatch.setattr(models_module, "train", no_training)
    again, info2 = load_or_train("E", data, seed=3, epochs=1, cache=tmp_path, progress=False, batch_size=16)
    assert info2["cached"] is True and info2["path"] == info["path"] and info2["seed"] == 3
    assert same_weights(model, again)
    assert not again.training


def test_cache_key_separates_settings(tmp_path):
    data = tiny_dataset()
    keys = {checkpoint_key("fashion-mnist", data.sha256, "E", 0, 1),
            checkpoint_key("fashion-mnist", data.sha256, "E", 1, 1),
            checkpoint_key("fashion-mnist", data.sha256, "E", 0, 2),
            checkpoint_key("fashion-mnist", data.sha256, "F", 0, 1),
            checkpoint_key("mnist", data.sha256, "E", 0, 1),
            checkpoint_key("fashion-mnist", "0" * 64, "E", 0, 1),
            checkpoint_key("fashion-mnist", data.sha256, "E", 0, 1, lr=0.01)}
    assert len(keys) == 7


def _tamper(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # one byte of the last tensor's data
    path.write_bytes(bytes(raw))


def test_tampered_checkpoint_is_refused(tmp_path):
    path = save_checkpoint(ModelE(), tmp_path / "e.safetensors")
    _tamper(path)
    with pytest.raises(ValueError, match="integrity check"):
        load_checkpoint(path, ModelE())


def test_other_architecture_is_refused(tmp_path):
    path = save_checkpoint(ModelE(), tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match="architecture 'E', not 'F'"):
        load_checkpoint(path, ModelF())
    path = save_checkpoint(ModelF(n_classes=5), tmp_path / "f5.safetensors")
    with pytest.raises(ValueError, match="tensor 'fc.weight' has shape"):
        load_checkpoint(path, ModelF())


def test_pickle_and_foreign_files_are_refused(tmp_path):
    pickled = tmp_path / "model.safetensors"
    torch.save(ModelE().state_dict(), pickled)  # a pickle under a safetensors name
    with pytest.raises(ValueError, match="never loaded"):
        load_checkpoint(pickled, ModelE())
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in ModelE().state_dict().items()}, str(foreign))
    with pytest.raises(ValueError, match="not an idefender-gpu model checkpoint"):
        load_checkpoint(foreign, ModelE())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(save_checkpoint(ModelE(), tmp_path / "ok.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a complete safetensors file"):
        load_checkpoint(truncated, ModelE())


def test_tampered_cache_entry_is_not_used(tmp_path):
    data = tiny_dataset()
    _, info = load_or_train("E", data, seed=0, epochs=1, cache=tmp_path, progress=False)
    _tamper(Path(info["path"]))
    with pytest.raises(ValueError, match="integrity check.*Delete"):
        load_or_train("E", data, seed=0, epochs=1, cache=tmp_path, progress=False)


def test_evaluate_builds_no_autograd_graph():
    """Predictions need no graph: a batch of 1000 through a large network would otherwise keep
    every activation for a backward pass that never comes."""
    from idefender_gpu.models import evaluate

    seen = []

    class Probe(torch.nn.Linear):
        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return super().forward(x)

    model = Probe(4, 3)
    pred = evaluate(model, torch.randn(5, 4), batch_size=2)
    assert pred.shape == (5,) and seen == [False] * 3 and torch.is_grad_enabled()
