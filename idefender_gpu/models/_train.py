"""The SGD training loop of ``idefender-gpu train``, resumable bit for bit on CPU (private).

:func:`train_classifier` trains an image classifier on tensors in memory the way the
WideResNet paper trains on CIFAR-10 (Zagoruyko & Komodakis, 2016): random 32x32 crops of
the image padded by 4 zero pixels and random horizontal flips, SGD with Nesterov momentum
0.9 and weight decay 5e-4, a learning rate multiplied by 0.2 at 30%, 60% and 80% of the
epochs (60, 120 and 160 of 200), cross-entropy. On CUDA the forward pass runs under
``torch.autocast`` (float16) with a ``GradScaler``; on CPU in float32.

Every random draw is derived from the seed, the epoch and the step, never from a running
generator: the batch order of an epoch is ``randperm`` of a generator seeded with
``(seed, epoch)``, and each step seeds the (forked) global RNG with ``(seed, epoch, step)``
before drawing its crops, flips and dropout masks. A training state therefore needs no RNG
state: the model's and optimizer's tensors, the epoch and step, the scaler's scale and the
running sums of the epoch. It is one safetensors file (:func:`save_training_state`:
tensors ``model/<name>`` and ``optimizer/<param index>/<name>``, the rest as JSON metadata
with a SHA-256 digest; never a pickle), written after every epoch and when a run stops
early, and :func:`train_classifier` with ``resume=True`` continues from it: on CPU, 2 steps,
a save and 2 resumed steps give the weights of 4 steps straight, bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from idefender_gpu._files import check_path, read_verified, write_verified
from idefender_gpu._param_validation import Interval, Predicate, validate_params
from idefender_gpu.models._paper import _architecture

__all__ = ["STATE_FORMAT", "TrainConfig", "augment", "load_training_state", "save_training_state",
           "train_classifier"]

STATE_FORMAT = "idefender-gpu/train-state"
STATE_VERSION = 1
_LOG = logging.getLogger(__name__)
_MIX = 1_000_003  # a prime: seeds (seed, epoch, step) -> one int


def _milestones_ok(value: Any) -> bool:
    return (isinstance(value, tuple) and all(isinstance(f, float) and 0.0 < f < 1.0 for f in value)
            and list(value) == sorted(set(value)))


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_classifier` (the WRN paper's CIFAR-10 recipe by default).

    Parameters
    ----------
    epochs : int, default=200
    batch_size : int, default=128
    lr : float, default=0.1
        Initial learning rate.
    momentum : float, default=0.9
        Nesterov momentum.
    weight_decay : float, default=5e-4
    milestones : tuple of float, default=(0.3, 0.6, 0.8)
        Fractions of the epochs after which the rate is multiplied by ``gamma``.
    gamma : float, default=0.2
    seed : int, default=0
        Initialisation, batch order, augmentation and dropout all derive from it.
    augment : bool, default=True
        Random crops (4-pixel zero padding) and horizontal flips.
    amp : bool or None, default=None
        Mixed precision (float16 autocast + GradScaler); None: on CUDA only. True needs CUDA.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    gamma: float = 0.2
    seed: int = 0
    augment: bool = True
    amp: bool | None = None

    _parameter_constraints: ClassVar[dict[str, list]] = {
        "epochs": [Interval(Integral, 1, None)],
        "batch_size": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0.0, None, closed="neither")],
        "momentum": [Interval(Real, 0.0, 1.0, closed="left")],
        "weight_decay": [Interval(Real, 0.0, None)],
        "milestones": [Predicate(_milestones_ok, "an increasing tuple of floats in (0, 1)")],
        "gamma": [Interval(Real, 0.0, 1.0, closed="right")],
        "seed": [Interval(Integral, 0, None)],
        "augment": ["boolean"],
        "amp": ["boolean", None],
    }

    def validate(self) -> "TrainConfig":
        """Check every field (``InvalidParameterError`` naming the first bad one); returns self."""
        validate_params("TrainConfig", dataclasses.asdict(self), self._parameter_constraints)
        return self

    def milestone_epochs(self) -> list[int]:
        """Epochs (0-based) from which each further ``gamma`` applies: 60, 120, 160 for 200 epochs."""
        return [max(1, round(f * self.epochs)) for f in self.milestones]

    def lr_at(self, epoch: int) -> float:
        """The learning rate of epoch ``epoch`` (0-based)."""
        return self.lr * self.gamma ** sum(epoch >= m for m in self.milestone_epochs())

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON values (milestones as a list)."""
        fields = dataclasses.asdict(self)
        fields["milestones"] = list(self.milestones)
        return fields


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * _MIX + int(part)) % (2**63 - 1)
    return value


def augment(x: Tensor, padding: int = 4) -> Tensor:
    """Random ``(H, W)`` crops of ``x`` zero-padded by ``padding``, and random horizontal flips.

    Draws ``(B, 3)`` integers from the global torch RNG (on CPU, then moved): the row and
    column offsets in ``[0, 2 * padding]`` and the flip bit of each image.

    Parameters
    ----------
    x : Tensor of shape (B, C, H, W)

    Returns
    -------
    Tensor of shape (B, C, H, W), same dtype and device as ``x``.
    """
    batch, _, height, width = x.shape
    draws = torch.randint(0, 2 * padding + 1, (batch, 3)).to(x.device)  # (B, 3)
    padded = nn.functional.pad(x, (padding,) * 4)                              # (B, C, H + 2p, W + 2p)
    rows = draws[:, 0:1] + torch.arange(height, device=x.device)               # (B, H)
    cols = draws[:, 1:2] + torch.arange(width, device=x.device)                # (B, W)
    flip = (draws[:, 2] % 2).bool()                                            # (B,)
    cols = torch.where(flip[:, None], cols.flip(-1), cols)                     # flipped columns
    index = torch.arange(batch, device=x.device)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------
# Training states
# --------------------------------------------------------------------------------------


def save_training_state(path: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                        meta: dict[str, Any]) -> Path:
    """Write a training state (atomically): the model's and the optimizer's tensors and ``meta``.

    Tensors ``model/<state-dict name>`` and ``optimizer/<param index>/<state name>``; the
    optimizer's other state values and its ``param_groups`` go to the JSON config with
    ``meta`` (epoch, step, scaler, sums, config, info).
    """
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optim["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    config = {"format_version": STATE_VERSION, "architecture": _architecture(model),
              "param_groups": optim["param_groups"], "optimizer_scalars": scalars, **meta}
    return write_verified(path, STATE_FORMAT, config, tensors)


def load_training_state(path: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a state written by :func:`save_training_state` into ``model`` and ``optimizer``.

    Returns
    -------
    config : dict
        The JSON config (epoch, step, scaler, sums, the training config, info).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If it is not a verified training state, or was written from another architecture.
    """
    path = check_path(path)
    config, tensors = read_verified(path, STATE_FORMAT, kind="training state", version=STATE_VERSION)
    where = repr(str(path))
    if config.get("architecture") != _architecture(model):
        raise ValueError(f"{where} is a training state of {config.get('architecture')!r}, not of "
                         f"{_architecture(model)!r}")
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{where} does not match the model: {str(exc).splitlines()[0]}") from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in config.get("optimizer_scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": config["param_groups"]})
    return config


# --------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, batch_size: int,
              amp: bool) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            predicted = model(xb).argmax(1)
        correct += (predicted == y[start:start + batch_size].to(device)).sum()
    return int(correct) / max(1, x.shape[0])


def _check_data(x: Any, y: Any, what: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
        raise TypeError(f"x_{what} must be a floating Tensor of shape (N, C, H, W); got "
                        f"{getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, Tensor) or y.is_floating_point() or y.shape != (x.shape[0],):
        raise ValueError(f"y_{what} must be an integer Tensor of shape ({x.shape[0]},); got "
                         f"{getattr(y, 'shape', type(y).__name__)}")


def train_classifier(model: nn.Module, x_train: Tensor, y_train: Tensor, config: TrainConfig | None = None, *,
                     x_test: Tensor | None = None, y_test: Tensor | None = None, device: Any = None,
                     checkpoint: Any = None, resume: bool = False, max_steps: int | None = None,
                     info: dict[str, Any] | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Train ``model`` in place with SGD on ``(x_train, y_train)``; see the module docstring.

    Parameters
    ----------
    model : nn.Module
        Returns logits ``(B, n_classes)``. Re-initialised from ``config.seed`` (its
        ``reset_parameters``, else each layer's) unless resuming.
    x_train : Tensor of shape (N, C, H, W)
        Images in ``[0, 1]`` (moved to ``device`` whole when that is a GPU).
    y_train : Tensor of int64, shape (N,)
    config : TrainConfig, optional
        Default ``TrainConfig()``.
    x_test, y_test : Tensor, optional
        Evaluated after every epoch (test accuracy in the history).
    device : str or torch.device, optional
        Default: the model's device.
    checkpoint : str or os.PathLike, optional
        The training state file, written after every epoch and when ``max_steps`` stops
        the run. None: nothing is written.
    resume : bool, default=False
        Continue from ``checkpoint`` (which must exist and hold the same architecture,
        config and number of training samples).
    max_steps : int, optional
        Stop after this many optimizer steps in all (counting those before a resume).
    info : dict, optional
        JSON-able facts stored in the state (dataset, its hash, ...); a resumed state must
        hold the same.
    progress : bool, optional
        A tqdm bar over the steps (default: when stderr is a terminal).

    Returns
    -------
    result : dict
        ``epoch`` (epochs completed), ``step`` (steps in all), ``history`` (one entry per
        epoch: ``epoch``, ``lr``, ``train_loss``, ``train_accuracy``, ``test_accuracy``,
        ``seconds``), ``amp``, ``device``, ``finished`` (all epochs done).

    Raises
    ------
    InvalidParameterError
        For a bad ``config`` field.
    FileNotFoundError
        With ``resume`` and no ``checkpoint`` file.
    ValueError
        For a state of another architecture, config, data or ``info``, or ``amp=True`` off CUDA.
    """
    config = (TrainConfig() if config is None else config)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig; got {type(config).__name__}")
    config.validate()
    _check_data(x_train, y_train, "train")
    if (x_test is None) != (y_test is None):
        raise ValueError("x_test and y_test must be given together")
    if x_test is not None:
        _check_data(x_test, y_test, "test")
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a positive int or None; got {max_steps!r}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs a checkpoint path")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    amp = device.type == "cuda" if config.amp is None else config.amp
    if amp and device.type != "cuda":
        raise ValueError(f"amp=True (mixed precision) needs a CUDA device; got {str(device)!r}")
    info = dict(info or {})
    n = x_train.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        x_train = x_train.to(device)  # 50000 CIFAR images: 614 MB, read once
    y_train = y_train.to(x_train.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr_at(0), momentum=config.momentum,
                                nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    epoch, step_in_epoch, sums, history = 0, 0, [0.0, 0], []
    if resume:
        path = check_path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"no training state to resume at {str(path)!r}")
        state = load_training_state(path, model, optimizer)
        expected = {"config": config.to_json(), "n_train": n, "info": info}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"{str(path)!r} was written with another {key}: {state.get(key)!r}, not {value!r}; "
                                 "resume with the same settings or start a new run")
        epoch, step_in_epoch, sums, history = (state["epoch"], state["step_in_epoch"], state["sums"],
                                               state["history"])
        if state.get("scaler") and amp:
            scaler.load_state_dict(state["scaler"])
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            if callable(getattr(model, "reset_parameters", None)):
                model.reset_parameters()
            else:
                for module in model.modules():
                    if module is not model and callable(getattr(module, "reset_parameters", None)):
                        module.reset_parameters()
    step = epoch * steps_per_epoch + step_in_epoch
    total = config.epochs * steps_per_epoch if max_steps is None else min(max_steps, config.epochs * steps_per_epoch)

    def save() -> None:
        if checkpoint is not None:
            meta = {"epoch": epoch, "step_in_epoch": step_in_epoch, "sums": sums, "history": history,
                    "config": config.to_json(), "n_train": n, "info": info,
                    "scaler": scaler.state_dict() if amp else None,
                    "schedule": {"milestone_epochs": config.milestone_epochs(), "gamma": config.gamma,
                                 "lr": config.lr_at(min(epoch, config.epochs - 1))},
                    "rng": {"seed": config.seed, "batch_order": "randperm, generator seed (seed, epoch)",
                            "step": "torch.manual_seed((seed, epoch, step)) before each step"}}
            save_training_state(checkpoint, model, optimizer, meta)

    disable = None if progress is None else not progress
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    started = time.perf_counter()
    with tqdm(total=total, initial=step, desc="train", unit="step", disable=disable, leave=False) as bar, \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        while epoch < config.epochs and step < total:
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(config.seed, epoch)))
            order = order.to(x_train.device)
            model.train()
            while step_in_epoch < steps_per_epoch and step < total:
                torch.manual_seed(_seed(config.seed, epoch, step_in_epoch))
                index = order[step_in_epoch * config.batch_size:(step_in_epoch + 1) * config.batch_size]
                xb = x_train[index].to(device, non_blocking=True)
                yb = y_train[index].to(device, non_blocking=True)
                if config.augment:
                    xb = augment(xb)
                if device.type == "cuda":
                    xb = xb.contiguous(memory_format=torch.channels_last)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    logits = model(xb)
                    loss = nn.functional.cross_entropy(logits, yb)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach().double() * yb.shape[0]
                correct += (logits.detach().argmax(1) == yb).sum()
                step_in_epoch, step = step_in_epoch + 1, step + 1
                bar.update(1)
            sums = [sums[0] + float(loss_sum), sums[1] + int(correct)]  # one host sync per epoch (or stop)
            loss_sum.zero_()
            correct.zero_()
            if step_in_epoch < steps_per_epoch:  # stopped inside the epoch
                break
            entry = {"epoch": epoch + 1, "lr": config.lr_at(epoch), "train_loss": sums[0] / n,
                     "train_accuracy": sums[1] / n, "seconds": time.perf_counter() - started}
            if x_test is not None:
                entry["test_accuracy"] = _accuracy(model, x_test, y_test, device, 2 * config.batch_size, amp)
            history.append(entry)
            _LOG.info("epoch %d/%d: lr %.4g, loss %.4f, train accuracy %.4f%s", epoch + 1, config.epochs,
                      entry["lr"], entry["train_loss"], entry["train_accuracy"],
                      f", test accuracy {entry['test_accuracy']:.4f}" if "test_accuracy" in entry else "")
            epoch, step_in_epoch, sums = epoch + 1, 0, [0.0, 0]
            started = time.perf_counter()
            save()
        if step_in_epoch:
            save()
    model.eval()
    return {"epoch": epoch, "step": step, "history": history, "amp": amp, "device": str(device),
            "finished": epoch >= config.epochs}
