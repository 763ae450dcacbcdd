"""Tests of the training loop and the ``idefender-gpu train`` command (issue 14).

Tiny WideResNets (wrn-10-1) on 8x8 random images: every run is a few steps on CPU.
"""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from idefender_gpu import cli
from idefender_gpu.exceptions import InvalidParameterError
from idefender_gpu.models import TrainConfig, build_model, load_checkpoint, train_classifier
from idefender_gpu.models._train import augment, load_training_state

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(n: int = 12, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.arange(n) % 10


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------
# Config, schedule, augmentation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "The 'epochs' parameter of TrainConfig must be an int in the range \\[1, inf\\). Got 0"),
    ("lr", math.nan, "The 'lr' parameter of TrainConfig must be a float in the range \\(0.0, inf\\). Got nan"),
    ("lr", -0.1, "'lr' parameter"),
    ("batch_size", 2.0, "'batch_size' parameter"),
    ("milestones", (0.6, 0.3), "increasing tuple"),
    ("amp", "yes", "'amp' parameter"),
])
def test_config_is_validated(field, value, message):
    with pytest.raises(InvalidParameterError, match=message):
        TrainConfig(**{field: value}).validate()
    x, y = tiny()
    model = build_model("wrn-10-1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=field):
        train_classifier(model, x, y, TrainConfig(**{field: value}), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed


def test_wrn_schedule():
    config = TrainConfig()
    assert config.milestone_epochs() == [60, 120, 160]
    rates = [config.lr_at(e) for e in (0, 59, 60, 119, 120, 159, 160, 199)]
    assert rates == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008], rel=1e-12)


def test_augment_crops_and_flips():
    x = torch.rand(64, 2, 5, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = augment(x, padding=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2,) * 4)
    flipped = 0
    for i in range(x.shape[0]):  # every output is one crop of the padded image, maybe mirrored
        crops = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 5, dx:dx + 6]))]
        assert crops, i
        flipped += all(f for _, _, f in crops)
    assert 10 < flipped < 54  # about half are flipped
    torch.manual_seed(0)
    assert torch.equal(augment(x, padding=2), out)


# --------------------------------------------------------------------------------------
# The loop and its states
# --------------------------------------------------------------------------------------


def test_resume_is_bit_exact(tmp_path):
    """2 steps, save, 2 resumed steps == 4 steps straight (3 steps an epoch: crosses an epoch end)."""
    x, y = tiny()
    config = TrainConfig(epochs=3, batch_size=4, seed=1)
    state = tmp_path / "state.safetensors"
    first = build_model("wrn-10-1")
    result = train_classifier(first, x, y, config, checkpoint=state, max_steps=2, progress=False)
    assert result["step"] == 2 and result["epoch"] == 0 and state.is_file()
    resumed = build_model("wrn-10-1")
    result = train_classifier(resumed, x, y, config, checkpoint=state, resume=True, max_steps=4, progress=False,
                              x_test=x[:4], y_test=y[:4])
    straight = build_model("wrn-10-1")
    expected = train_classifier(straight, x, y, config, max_steps=4, progress=False, x_test=x[:4], y_test=y[:4])
    assert result["step"] == expected["step"] == 4 and result["epoch"] == 1
    assert same_weights(resumed, straight) and not same_weights(first, straight)
    for a, b in zip(result["history"], expected["history"]):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    optimizer = torch.optim.SGD(build_model("wrn-10-1").parameters(), lr=1.0, momentum=0.9)
    meta = load_training_state(state, build_model("wrn-10-1"), optimizer)
    assert meta["epoch"] == 1 and meta["step_in_epoch"] == 1 and meta["config"] == config.to_json()
    assert meta["schedule"] == {"milestone_epochs": [1, 2, 2], "gamma": 0.2, "lr": pytest.approx(0.02)}
    assert meta["rng"]["seed"] == 1
    assert all(torch.is_tensor(s["momentum_buffer"]) for s in optimizer.state.values())
    assert not resumed.training


def test_states_are_safetensors_and_checked(tmp_path, monkeypatch):
    x, y = tiny()
    config = TrainConfig(epochs=1, batch_size=6)
    state = tmp_path / "state.safetensors"
    train_classifier(build_model("wrn-10-1"), x, y, config, checkpoint=state, info={"dataset": "a"}, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a training state must never be unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    with pytest.raises(ValueError, match="another config"):
        train_classifier(build_model("wrn-10-1"), x, y, TrainConfig(epochs=2, batch_size=6), checkpoint=state,
                         resume=True, info={"dataset": "a"}, progress=False)
    with pytest.raises(ValueError, match="another info"):
        train_classifier(build_model("wrn-10-1"), x, y, config, checkpoint=state, resume=True,
                         info={"dataset": "b"}, progress=False)
    with pytest.raises(ValueError, match="training state of 'wrn-10-1', not of 'wrn-10-2'"):
        train_classifier(build_model("wrn-10-2"), x, y, config, checkpoint=state, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no training state"):
        train_classifier(build_model("wrn-10-1"), x, y, config, checkpoint=tmp_path / "none", resume=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train_classifier(build_model("wrn-10-1"), x, y, TrainConfig(amp=True), device="cpu")


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------


@pytest.fixture
def small_stand_in(monkeypatch):
    monkeypatch.setitem(cli.STAND_IN, "n_train", 16)
    monkeypatch.setitem(cli.STAND_IN, "n_test", 8)
    monkeypatch.setitem(cli.STAND_IN, "epochs", 1)


def test_stand_in_command(tmp_path, capsys, small_stand_in):
    out = tmp_path / "run"
    args = ["train", "--stand-in", "--out", str(out), "--batch-size", "8", "--quiet", "--device", "cpu", "--n-test", "4"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("STAND-IN RUN, NOT A REPRODUCTION")
    summary = json.loads((out / "train.json").read_text())
    assert next(iter(summary)) == "note" and summary["stand_in"] is True and summary["epochs_done"] == 1
    assert summary["model"] == "wrn-10-1" and summary["hidden_layer"] == "fc:input"
    assert summary["n_train"] == 16 and summary["n_test"] == 4
    assert load_checkpoint(out / "model.safetensors", build_model("wrn-10-1"))["stand_in"] is True
    assert cli.main(args) == 2  # a training state is never overwritten silently
    assert "already holds a training state" in capsys.readouterr().err
    assert cli.main(args + ["--resume"]) == 0  # finished: resumes to the same end


@pytest.mark.parametrize("argv, message", [
    (["--model", "wrn-33-8"], "6n \\+ 4"),
    (["--model", "vgg19"], "VGG19 is not trained here"),
    (["--lr", "nan"], "argument --lr: must be a finite float > 0"),
    (["--epochs", "0"], "argument --epochs"),
    (["--dataset", "imagenet"], "argument --dataset"),
    (["--device", "tpu"], "argument --device"),
])
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", *argv])
    assert info.value.code == 2
    assert message.replace("\\", "") in capsys.readouterr().err


def test_missing_data_and_resume_exit_2(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("idefender-gpu: error:") and "nowhere" in err and "Traceback" not in err
    assert cli.main(["train", "--stand-in", "--resume", "--out", str(tmp_path / "o")]) == 2
    assert "--resume: no training state" in capsys.readouterr().err
