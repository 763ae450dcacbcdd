"""Tests of the WideResNet and VGG19 architectures of ``idefender_gpu.models`` (issue 14).

Parameter counts are checked against a count written out here from the paper's description
(not read back from the model), closed by the paper's own figure for WRN-28-10 (36.5M). Big
models are built on the ``meta`` device (no memory, no initialisation); VGG19's weight loading
is exercised on small files (the real file is 548 MB and never downloaded).
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from idefender_gpu import IDefender
from idefender_gpu.features import hidden_states
from idefender_gpu.models import VGG19, WideResNet, build_model, hidden_layer, save_checkpoint, vgg19
from idefender_gpu.models._vgg import _assign, load_state_file

pytestmark = pytest.mark.usefixtures("one_thread")


def wrn_parameters(depth: int, k: int, n_classes: int = 10) -> int:
    """WRN-depth-k's parameter count from the paper's description: 3x3 convolutions without
    bias, two BN parameters per channel, a 1x1 shortcut where the width changes."""
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = 3 * 16 * 9
    for stage in range(1, 4):
        w_in, w = widths[stage - 1], widths[stage]
        for i in range(n):
            first = w_in if i == 0 else w
            total += 2 * first + first * w * 9 + 2 * w + w * w * 9
            if i == 0 and (first != w or stage > 1):
                total += first * w
    return total + 2 * widths[3] + widths[3] * n_classes + n_classes


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, depth, k", [("wrn-28-10", 28, 10), ("wrn-34-8", 34, 8), ("wrn-46-8", 46, 8),
                                            ("wrn-16-4", 16, 4), ("wrn-10-1", 10, 1)])
def test_parameter_counts(name, depth, k):
    with torch.device("meta"):
        model = build_model(name)
    assert isinstance(model, WideResNet) and model.architecture == name
    assert count(model) == wrn_parameters(depth, k)
    blocks = [list(getattr(model, f"block{s}").children()) for s in (1, 2, 3)]
    assert [len(b) for b in blocks] == [(depth - 4) // 6] * 3
    assert [b[0].conv1.stride for b in blocks] == [(1, 1), (2, 2), (2, 2)]
    assert [b[-1].conv2.out_channels for b in blocks] == [16 * k, 32 * k, 64 * k]
    assert model.fc.in_features == 64 * k


def test_wrn_28_10_matches_the_paper():
    assert round(wrn_parameters(28, 10) / 1e6, 1) == 36.5  # Zagoruyko & Komodakis, Table 4
    assert round(wrn_parameters(34, 8) / 1e6, 2) == 29.55 and round(wrn_parameters(46, 8) / 1e6, 2) == 41.95


def test_block_is_pre_activation():
    model = build_model("wrn-10-2", dropout=0.3).eval()
    block = model.block2[0]
    assert block.shortcut is not None and block.shortcut.kernel_size == (1, 1)
    assert isinstance(block.dropout, nn.Dropout) and block.dropout.p == 0.3
    assert build_model("wrn-10-1").block1[0].shortcut is None  # 16 -> 16, stride 1: the identity
    x = torch.randn(2, 16 * 2, 8, 8)
    activated = torch.relu(block.bn1(x))
    expected = block.conv2(torch.relu(block.bn2(block.conv1(activated)))) + block.shortcut(activated)
    torch.testing.assert_close(block(x), expected)


def test_forward_and_hidden_layer():
    model = build_model("wrn-10-2", n_classes=7).eval()
    x = torch.rand(3, 3, 32, 32)
    layer = hidden_layer("wrn-10-2")
    out, states = hidden_states(model, x, [layer, "block3"])
    assert layer == model.hidden_layer == "fc:input"
    assert out.shape == (3, 7) and states[layer].shape == (3, 128)
    pooled = torch.relu(model.bn(states["block3"].reshape(3, 128, 8, 8))).mean((-2, -1))
    torch.testing.assert_close(states[layer], pooled)
    assert "mean" not in model.state_dict()  # the normalisation is not a weight
    normalised = (x - torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]) / torch.tensor(
        [0.2470, 0.2435, 0.2616])[:, None, None]
    torch.testing.assert_close(model.conv1((x - model.mean) / model.std), model.conv1(normalised))


def test_detector_on_the_hidden_layer():
    torch.manual_seed(0)
    model = build_model("wrn-10-1", n_classes=2).eval()
    x, y = torch.rand(24, 3, 16, 16), torch.arange(24) % 2
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)
    detector = IDefender(model, hidden_layer("wrn-10-1"), covariance_type="diag", progress=False).fit(loader)
    assert detector.n_features_ == {"fc:input": 64}
    assert detector.score(x[:4]).shape == (4,)


@pytest.mark.parametrize("name, message", [("wrn-33-8", "6n \\+ 4"), ("wrn-4-8", "6n \\+ 4"),
                                           ("wrn-34-0", "positive int"), ("resnet-18", "model must be one of"),
                                           ("WRN-34-8", "model must be one of")])
def test_bad_names(name, message):
    with pytest.raises(ValueError, match=message):
        build_model(name)
    with pytest.raises(ValueError):
        hidden_layer(name)


# --------------------------------------------------------------------------------------
# VGG19
# --------------------------------------------------------------------------------------


def test_vgg19_is_torchvisions_architecture():
    with torch.device("meta"):
        ours, theirs = build_model("vgg19"), torchvision.models.vgg19()
    assert isinstance(ours, VGG19) and ours.architecture == "vgg19"
    assert count(ours) == torchvision.models.VGG19_Weights.IMAGENET1K_V1.meta["num_params"] == 143_667_240
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert hidden_layer("vgg19") == ours.hidden_layer == "classifier.6:input"
    assert isinstance(ours.classifier[6], nn.Linear) and ours.classifier[6].in_features == 4096


def test_vgg19_normalises_its_input(monkeypatch):
    """The forward of torchvision's VGG sees ImageNet-normalised pixels."""
    seen = []
    monkeypatch.setattr(torchvision.models.VGG, "forward", lambda self, x: seen.append(x) or x.sum((1, 2, 3)))
    with torch.device("meta"):
        model = VGG19(init_weights=False)
    model.mean, model.std = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1), \
        torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    x = torch.rand(1, 3, 4, 4)
    model(x)
    torch.testing.assert_close(seen[0][0, 1], (x[0, 1] - 0.456) / 0.224)


def small_state() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    model = build_model("wrn-10-1")
    return model, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["pth", "safetensors", "checkpoint", "wrapped-pth"])
def test_weight_files_load_without_unpickling_code(tmp_path, kind):
    model, state = small_state()
    path = tmp_path / f"w.{kind}"
    if kind == "pth":
        torch.save(state, path)
    elif kind == "wrapped-pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    elif kind == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        save_checkpoint(model, path)
    loaded = load_state_file(path, architecture="wrn-10-1")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    with torch.device("meta"):
        fresh = build_model("wrn-10-1")
    _assign(fresh, loaded, path)  # vgg19(weights=...)'s path: meta model, tensors assigned
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_weights_errors_name_the_file(tmp_path, monkeypatch):
    missing = tmp_path / "vgg19.pth"
    with pytest.raises(FileNotFoundError, match="vgg19.pth"):
        vgg19(weights=missing)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="hub/checkpoints/vgg19-dcbb9e9d.pth.*--weights FILE"):
        vgg19(weights="torchvision")
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"features.0.weight": _Evil()}, handle)
    with pytest.raises(ValueError, match="evil.pth.*weights_only"):
        vgg19(weights=evil)
    _, state = small_state()
    other = tmp_path / "wrn.pth"
    torch.save(state, other)
    with pytest.raises(ValueError, match="wrn.pth' does not match VGG19: missing \\['classifier.0.bias'"):
        vgg19(weights=other)
    checkpoint = save_checkpoint(build_model("wrn-10-1"), tmp_path / "wrn.safetensors")
    with pytest.raises(ValueError, match="architecture 'wrn-10-1', not 'vgg19'"):
        vgg19(weights=checkpoint)
