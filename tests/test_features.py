"""Hidden-state capture: hooks against a manual forward of the sub-network, handle hygiene
(removed hooks, restored modes, no leaked references) even when the forward raises."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import tol
from idefender_gpu.features import (
    HiddenStateHooks,
    _batches,
    attach,
    collect,
    default_layers,
    eval_mode,
    hidden_states,
    model_device,
    model_dtype,
    parse_layers,
)


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.act = nn.ReLU(inplace=True)  # in-place: captures must not be changed by it
        self.fc1 = nn.Linear(2 * 6 * 6, 8)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        h = self.act(self.bn(self.conv(x)))
        h = self.drop(torch.relu(self.fc1(h.flatten(1))))
        return self.fc2(h)


def _assert_no_hooks(model: nn.Module) -> None:
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


# --------------------------------------------------------------------------------------
# Layer specs
# --------------------------------------------------------------------------------------


def test_default_layer_is_input_of_last_linear():
    assert default_layers(_mlp()) == ("4:input",)
    assert default_layers(TinyCNN()) == ("fc2:input",)


def test_default_layer_needs_a_linear():
    with pytest.raises(ValueError, match="without an nn.Linear"):
        default_layers(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_spec_syntax():
    specs = parse_layers(TinyCNN(), ["fc1", "fc2:input", "conv:output"])
    assert [(s.module_name, s.where, s.spec) for s in specs] == [
        ("fc1", "output", "fc1"), ("fc2", "input", "fc2:input"), ("conv", "output", "conv")]


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ValueError, match="unknown layer 'fc3'.*Valid names: 'conv', 'bn', 'act', 'fc1', 'drop', 'fc2'"):
        parse_layers(TinyCNN(), "fc3:input")


@pytest.mark.parametrize(
    "layers, error, match",
    [
        ([], ValueError, "at least one layer"),
        (["fc1", "fc1:output"], ValueError, "'fc1' twice"),
        ([3], TypeError, "str specs"),
        (3, TypeError, "str or a sequence"),
    ],
)
def test_bad_layer_specs(layers, error, match):
    with pytest.raises(error, match=match):
        parse_layers(TinyCNN(), layers)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got function"):
        parse_layers(lambda x: x, "fc")


# --------------------------------------------------------------------------------------
# Capture against a manual forward of the sub-network
# --------------------------------------------------------------------------------------


def test_capture_equals_manual_forward_mlp(seed):
    model = _mlp(torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    output, states = hidden_states(model, x, ["0", "2:input", "4:input", "4"])
    h0 = model[0](x)
    h2_in = model[1](h0)
    h4_in = model[3](model[2](h2_in))
    expected = {"0": h0, "2:input": h2_in, "4:input": h4_in, "4": model[4](h4_in)}
    assert list(states) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(states[name], value, **tol(torch.float64))
    torch.testing.assert_close(output, expected["4"], **tol(torch.float64))
    _assert_no_hooks(model)


def test_capture_flattens_and_survives_inplace_ops(seed):
    """The conv/bn outputs are flattened to (B, D) and copied before ReLU(inplace=True)."""
    model = TinyCNN().eval()
    x = torch.randn(3, 1, 8, 8)
    _, states = hidden_states(model, x, ["conv", "bn", "act:input", "fc1:input"])
    conv = model.conv(x)
    bn = model.bn(conv)
    assert states["conv"].shape == (3, 72)
    torch.testing.assert_close(states["conv"], conv.flatten(1), **tol(torch.float32))
    torch.testing.assert_close(states["bn"], bn.flatten(1), **tol(torch.float32))  # pre-ReLU values
    torch.testing.assert_close(states["act:input"], bn.flatten(1), **tol(torch.float32))
    assert bool((states["bn"] < 0).any())  # the in-place ReLU did not reach the copy
    torch.testing.assert_close(states["fc1:input"], torch.relu(bn).flatten(1), **tol(torch.float32))


def test_detached_by_default_graph_kept_on_request(seed):
    model = _mlp()
    x = torch.randn(2, 5, requires_grad=True)
    _, states = hidden_states(model, x, "4:input")
    assert not states["4:input"].requires_grad
    _, states = hidden_states(model, x, "4:input", keep_graph=True)
    (grad,) = torch.autograd.grad(states["4:input"].sum(), x)
    assert grad.shape == x.shape and bool(grad.abs().sum() > 0)


def test_outputs_not_replaced(seed):
    model = _mlp()
    x = torch.randn(3, 5)
    expected = model(x)
    with attach(model, ["0", "4:input"]) as hooks:
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        hooks.pop()


def test_module_run_twice_is_refused():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 3), relu, nn.Linear(3, 3), relu, nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="ran 2 times"):
        hidden_states(model, torch.randn(2, 3), "1")
    _assert_no_hooks(model)


def test_layer_that_does_not_run_is_reported():
    model = TinyCNN()
    model.unused = nn.Linear(2, 2)  # registered, never called by forward
    with pytest.raises(RuntimeError, match="'unused' did not run"):
        hidden_states(model, torch.randn(2, 1, 8, 8), "unused")


def test_non_tensor_output_is_refused():
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)[0]

    model = Net()
    with pytest.raises(TypeError, match="'pair' must produce a batched tensor as its output to be captured; got tuple"):
        hidden_states(model, torch.randn(2, 3), "pair")
    _assert_no_hooks(model)


# --------------------------------------------------------------------------------------
# Handle hygiene
# --------------------------------------------------------------------------------------


def test_handle_remove_is_idempotent_and_drops_references(seed):
    model = _mlp()
    hooks = attach(model, ["0", "4:input"])
    model(torch.randn(2, 5))
    hooks.remove()
    hooks.remove()
    _assert_no_hooks(model)
    assert hooks._buffer == {}
    ref = weakref.ref(hooks)
    del hooks
    gc.collect()
    assert ref() is None  # the model keeps nothing that references the handle


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_hooks_removed_and_modes_restored_when_forward_raises():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(), Boom())
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    modes = [m.training for m in model.modules()]
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(RuntimeError, match="boom"):
        collect(model, loader, ["0", "2:input"], progress=False)
    _assert_no_hooks(model)
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(RuntimeError, match="boom"):
        hidden_states(model, torch.randn(2, 4), "1")
    _assert_no_hooks(model)


def test_eval_mode_restores_mixed_modes():
    model = TinyCNN().train()
    model.bn.eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model.fc1.training and not model.bn.training


def test_eval_mode_of_several_models_sharing_a_module():
    """The attacks' case: a classifier and a detector's model sharing layers; each flag comes
    back once, as it was, also when the body raises."""
    shared = nn.Sequential(nn.Linear(3, 3), nn.Dropout())
    first, second = nn.Sequential(shared, nn.Linear(3, 2)), nn.Sequential(shared, nn.BatchNorm1d(3))
    first.train()
    second.eval()
    shared[1].train()
    modes = {id(m): m.training for net in (first, second) for m in net.modules()}
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode([first, second]) as yielded:
            assert yielded is None
            assert not any(m.training for net in (first, second) for m in net.modules())
            raise RuntimeError("inside")
    assert {id(m): m.training for net in (first, second) for m in net.modules()} == modes
    with eval_mode(first) as yielded:
        assert yielded is first
    with eval_mode(iter([first])):  # any iterable of modules
        assert not first.training
    assert first.training


def test_model_device_and_dtype_of_a_module_without_tensors():
    empty = nn.Sequential(nn.ReLU())
    assert model_device(empty) == torch.device("cpu")
    assert model_device(empty, default=None) is None
    assert model_dtype(empty) is None
    model = nn.Linear(2, 2).double()
    assert model_device(model, default=None) == torch.device("cpu") and model_dtype(model) == torch.float64


def test_batches_undo_hooks_and_modes_when_closed_early():
    """The per-batch iterator behind collect (a streamed fit reads it): stopping after one
    batch removes the hooks and restores the modes; the caller's grad mode is its own."""
    model = _mlp().train()
    specs = parse_layers(model, ["2:input"])
    loader = DataLoader(TensorDataset(torch.randn(12, 5), torch.arange(12) % 3), batch_size=4)
    batches = _batches(model, loader, specs, progress=False)
    first = next(batches)
    assert torch.is_grad_enabled()  # no_grad wraps the forward only, not the caller
    assert not model.training and first.index == 0 and first.input_shape == (5,)
    assert first.states["2:input"].shape == (4, 7) and not first.states["2:input"].requires_grad
    assert first.labels.dtype == torch.int64 and first.output.shape == (4, 3)
    batches.close()
    _assert_no_hooks(model)
    assert all(m.training for m in model.modules())


# --------------------------------------------------------------------------------------
# Collection over a DataLoader
# --------------------------------------------------------------------------------------


def test_collect_matches_manual_forward(seed, device):
    model = TinyCNN().to(device).train()
    x = torch.randn(10, 1, 8, 8)
    y = torch.arange(10) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # last batch is short
    states, labels = collect(model, loader, ["conv", "fc2:input"], progress=False)
    assert model.training  # restored
    _assert_no_hooks(model)
    assert states["conv"].device.type == device.type and labels.device.type == device.type
    assert states["conv"].shape == (10, 72) and states["fc2:input"].shape == (10, 8)
    assert not states["fc2:input"].requires_grad
    torch.testing.assert_close(labels.cpu(), y)
    with torch.no_grad(), eval_mode(model):  # eval mode: BN running stats, no dropout
        xd = x.to(device)
        expected = torch.relu(model.fc1(model.act(model.bn(model.conv(xd))).flatten(1)))
    torch.testing.assert_close(states["fc2:input"], expected, **tol(torch.float32))


def test_collect_unlabelled_loader_and_dtype_cast(seed):
    model = _mlp(torch.float64)
    x = torch.randn(6, 5)  # float32 inputs, float64 model: inputs cast to the model's dtype
    states, labels = collect(model, DataLoader(TensorDataset(x), batch_size=4), progress=False)
    assert labels is None
    assert states["4:input"].dtype == torch.float64 and states["4:input"].shape == (6, 6)


def test_collect_with_progress_bar(seed, capsys):
    model = _mlp()
    loader = DataLoader(TensorDataset(torch.randn(6, 5), torch.zeros(6, dtype=torch.long)), batch_size=3)
    states, _ = collect(model, loader, progress=True)
    assert states["4:input"].shape == (6, 6)
    assert "hidden states" in capsys.readouterr().err


@pytest.mark.parametrize(
    "batches, error, match",
    [
        ([], ValueError, "at least one batch"),
        ([(torch.randn(2, 5), torch.zeros(2))], TypeError, "integer class labels"),
        ([(torch.randn(2, 5), torch.zeros(3, dtype=torch.long))], ValueError, "labels must have shape \\(B,\\) = \\(2,\\)"),
        ([(torch.randn(2, 5),), (torch.randn(2, 5), torch.zeros(2, dtype=torch.long))], ValueError, "every batch or in none"),
        (["text"], TypeError, "pairs or input tensors"),
    ],
)
def test_collect_bad_batches(batches, error, match):
    model = _mlp()
    with pytest.raises(error, match=match):
        collect(model, batches, progress=False)
    _assert_no_hooks(model)


def test_collect_inconsistent_input_shapes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    batches = [torch.randn(2, 4), torch.randn(2, 2, 2)]
    with pytest.raises(ValueError, match="per-sample shape \\(4,\\) of batch 0; got shape \\(2, 2, 2\\) at batch 1"):
        collect(model, batches, progress=False)


def test_handle_class_directly_with_specs():
    model = _mlp()
    hooks = HiddenStateHooks(model, parse_layers(model, "2"))
    assert "attached" in repr(hooks)
    with hooks:
        model(torch.randn(1, 5))
        assert hooks.pop()["2"].shape == (1, 6)
    assert "removed" in repr(hooks)


def test_collect_iterates_the_loader_once():
    """One iter() per pass: tqdm.auto's bar used to call iter(loader) twice (a wasted pass,
    DataLoader workers started twice)."""
    import torch
    from torch import nn

    from idefender_gpu.features import collect

    class Counting:
        def __init__(self):
            self.iters = 0

        def __iter__(self):
            self.iters += 1
            return iter([(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))])

    for progress in (False, True):
        data = Counting()
        collect(nn.Sequential(nn.Linear(3, 2)), data, progress=progress)
        assert data.iters == 1
