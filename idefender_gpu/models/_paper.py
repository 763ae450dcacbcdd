"""Models E and F of the paper's Table 1, seeded training, and a safetensors checkpoint cache (private).

Model E (the attacker's substitute in the black-box experiment) is a multi-layer perceptron,
model F (the defended classifier) a small CNN, both for 28x28 grey images (MNIST,
Fashion-MNIST), as in Defense-GAN's detection experiment that the paper repeats:

========================  ======================================================
Model E                   Model F
========================  ======================================================
FC(200), ReLU             Conv(64, 8x8, stride 2), ReLU
FC(200), ReLU             Conv(128, 6x6, stride 2), ReLU
FC(10) (+ softmax)        FC(10) (+ softmax)
========================  ======================================================

Table 1 gives no padding; the convolutions here have none (PyTorch's default, 'VALID'):
28x28 -> 11x11x64 -> 3x3x128, so the last hidden state (the flattened convolution output
feeding the FC layer, ``"fc:input"``) has 1152 features. (Defense-GAN's code, ``model_f`` of
its ``utils/network_builder.py``, pads the first convolution ('SAME') and adds a third
convolution that Table 1 does not list; padding alone would give 5x5x128 = 3200 features: 2.4
times the training cost and 7.7 times the cost of a full-covariance density per sample, more
than a 2-core CPU can afford in the 10 minutes the experiment is given.) The softmax is left
to the loss: the models return logits.

:func:`train` is deterministic for a seed on a given device (initialisation and batch order
come from the seed). :func:`train_substitute` trains the black-box attacker's substitute by
Papernot et al.'s Jacobian-based dataset augmentation, querying the attacked model for labels
(Defense-GAN's black-box setting, which the paper repeats). :func:`load_or_train` and
:func:`load_or_train_substitute` cache trained weights as safetensors under
``cache_dir() / 'models'``, keyed by dataset, data hash, model, seed, epochs and the training
hyper-parameters (and, for a substitute, the attacked model's key), and reuse them.
:func:`load_checkpoint` never unpickles: it reads safetensors, checks the format marker, a
SHA-256 digest, the architecture name and every tensor's name and shape before loading
(``strict``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from idefender_gpu._files import read_verified, write_verified
from idefender_gpu.data import cache_dir

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODELS",
    "ModelE",
    "ModelF",
    "TRAIN_DEFAULTS",
    "build_paper_model",
    "checkpoint_key",
    "evaluate",
    "load_checkpoint",
    "load_or_train",
    "load_or_train_substitute",
    "save_checkpoint",
    "train",
    "train_substitute",
]

CHECKPOINT_FORMAT = "idefender-gpu/model"
CHECKPOINT_VERSION = 1

#: default training hyper-parameters (part of the cache key)
TRAIN_DEFAULTS = {"batch_size": 128, "lr": 1e-3, "optimizer": "adam"}


class ModelE(nn.Sequential):
    """Model E of Table 1: FC(200)-ReLU-FC(200)-ReLU-FC(n_classes), on flattened images.

    Parameters
    ----------
    n_classes : int, default=10
    in_features : int, default=784
        Flattened input size (1x28x28).

    Notes
    -----
    Input ``(B, C, H, W)`` with ``C*H*W = in_features``; output logits ``(B, n_classes)``.
    Module names: ``flatten, fc1, relu1, fc2, relu2, fc3``.
    """

    def __init__(self, n_classes: int = 10, in_features: int = 784) -> None:
        super().__init__(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(in_features, 200)),
            ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(200, 200)),
            ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(200, n_classes)),
        ]))


class ModelF(nn.Sequential):
    """Model F of Table 1: Conv(64,8x8,2)-ReLU-Conv(128,6x6,2)-ReLU-FC(n_classes).

    Parameters
    ----------
    n_classes : int, default=10
    in_channels : int, default=1
    image_size : int, default=28

    Notes
    -----
    No padding. For 28x28 inputs: ``(B, 1, 28, 28) -> (B, 64, 11, 11) -> (B, 128, 3, 3)
    -> (B, 1152) -> (B, n_classes)``. Module names:
    ``conv1, relu1, conv2, relu2, flatten, fc``; the I-defender layer is ``"fc:input"``
    (the default: the input of the last ``nn.Linear``).
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        size1 = (image_size - 8) // 2 + 1
        size2 = (size1 - 6) // 2 + 1
        super().__init__(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 64, kernel_size=8, stride=2)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(64, 128, kernel_size=6, stride=2)),
            ("relu2", nn.ReLU()),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(128 * size2 * size2, n_classes)),
        ]))


#: model name -> class
MODELS: dict[str, type[nn.Module]] = {"E": ModelE, "F": ModelF}


def build_paper_model(name: str, n_classes: int = 10) -> nn.Module:
    """A fresh Model ``"E"`` or ``"F"`` for 1x28x28 inputs (uses the global torch RNG).

    :func:`idefender_gpu.models.build_model` is the public builder of every architecture.

    Raises
    ------
    ValueError
        For an unknown name.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}; got {name!r}")
    return MODELS[name](n_classes)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def _check_xy(x: Any, y: Any) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError(f"x must be a floating Tensor of shape (N, ...); got {x!r:.80}")
    if not isinstance(y, Tensor) or y.is_floating_point() or y.shape != (x.shape[0],):
        raise ValueError(f"y must be an integer Tensor of shape ({x.shape[0]},); got "
                         f"{getattr(y, 'shape', type(y).__name__)}")


def train(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 5, seed: int = 0,
          batch_size: int = TRAIN_DEFAULTS["batch_size"], lr: float = TRAIN_DEFAULTS["lr"],
          device: Any = None, progress: bool | None = None, desc: str = "train") -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; deterministic for a seed.

    The parameters are re-initialised from ``seed`` (``reset_parameters`` of every layer
    under a forked RNG, so the global RNG is untouched), and the batch order of each epoch
    is a permutation drawn from a generator seeded with ``seed``: two calls with the same
    arguments on CPU give the same weights, bit for bit (on CUDA, cuDNN may pick
    non-deterministic convolution algorithms unless ``torch.backends.cudnn.deterministic``
    is set).

    Parameters
    ----------
    model : nn.Module
        Returns logits ``(B, n_classes)``.
    x : Tensor of shape (N, ...)
        Inputs in ``[0, 1]``; moved to ``device`` batch by batch if they live elsewhere.
    y : Tensor of int64, shape (N,)
    epochs : int, default=5
    seed : int, default=0
    batch_size : int, default=128
    lr : float, default=1e-3
    device : str or torch.device, optional
        Default: the model's device.
    progress : bool, optional
        tqdm bar over the batches (default: when stderr is a terminal).
    desc : str
        Progress-bar label.

    Returns
    -------
    model : nn.Module
        The same module, trained and in eval mode.
    """
    _check_xy(x, y)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters") and module is not model:
                module.reset_parameters()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = x.shape[0]
    n_batches = (n + batch_size - 1) // batch_size
    model.train()
    disable = None if progress is None else not progress
    with tqdm(total=epochs * n_batches, desc=desc, unit="batch", disable=disable, leave=False) as bar:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start:start + batch_size]
                xb = x[index].to(device, non_blocking=True)
                yb = y[index].to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
    return model.eval()


def _jacobian_step(model: nn.Module, x: Tensor, y: Tensor, lmbda: float, batch_size: int) -> Tensor:
    """Papernot et al.'s Jacobian augmentation: ``clip(x + lmbda * sign(d softmax(model(x))_y / dx), 0, 1)``."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device).requires_grad_(True)
        yb = y[start:start + batch_size].to(device)
        probs = model(xb).softmax(-1).gather(1, yb[:, None]).sum()  # samples are independent in eval mode
        (grad,) = torch.autograd.grad(probs, xb)
        out.append((xb.detach() + lmbda * grad.sign()).clamp(0.0, 1.0).to(x.device))
    return torch.cat(out)


def train_substitute(model: nn.Module, oracle: nn.Module, x_seed: Tensor, y_seed: Tensor, *,
                     rounds: int = 6, epochs: int = 10, lmbda: float = 0.1, seed: int = 0,
                     batch_size: int = TRAIN_DEFAULTS["batch_size"], lr: float = TRAIN_DEFAULTS["lr"],
                     device: Any = None, progress: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train a black-box attacker's substitute by Jacobian-based dataset augmentation.

    Papernot et al., *Practical Black-Box Attacks against Machine Learning* (2017), with the
    settings of Defense-GAN's black-box experiment (which the I-defender paper repeats): the
    attacker holds ``x_seed`` (150 test images with their labels), and for ``rounds`` rounds
    trains the substitute ``epochs`` epochs on its set, then doubles the set with
    ``clip(x + lmbda * sign(grad_x p_y(x)), 0, 1)`` (``p_y``: the substitute's softmax
    probability of the sample's current label) and labels the new points by querying the
    oracle's predicted class (labels only, no probabilities). The weights carry over from
    round to round (a fresh Adam each round), as in cleverhans' ``train_sub``.

    Parameters
    ----------
    model : nn.Module
        The substitute (model E); re-initialised from ``seed``.
    oracle : nn.Module
        The attacked classifier (model F), queried for labels only.
    x_seed : Tensor of shape (N, ...)
    y_seed : Tensor of int64, shape (N,)
        The attacker's labels of the seed images (their true labels).
    rounds, epochs, lmbda, seed, batch_size, lr, device, progress
        ``rounds - 1`` augmentations happen (none after the last training round).

    Returns
    -------
    model : nn.Module
        Trained, in eval mode.
    info : dict
        ``n_substitute_train`` (final set size) and ``oracle_queries``.
    """
    _check_xy(x_seed, y_seed)
    x_sub, y_sub = x_seed.clone(), y_seed.clone()
    queries = 0
    for rho in range(rounds):
        generator_seed = seed * 1000 + rho
        if rho == 0:
            train(model, x_sub, y_sub, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, device=device,
                  progress=progress, desc=f"substitute round {rho + 1}/{rounds}")
        else:
            _continue_training(model, x_sub, y_sub, epochs=epochs, seed=generator_seed, batch_size=batch_size,
                               lr=lr, progress=progress, desc=f"substitute round {rho + 1}/{rounds}")
        if rho < rounds - 1:
            model.eval()
            x_new = _jacobian_step(model, x_sub, y_sub, lmbda, batch_size)
            y_new = evaluate(oracle, x_new)
            queries += x_new.shape[0]
            x_sub, y_sub = torch.cat([x_sub, x_new]), torch.cat([y_sub, y_new.to(y_sub.device)])
    return model.eval(), {"n_substitute_train": int(x_sub.shape[0]), "oracle_queries": queries}


def _continue_training(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, seed: int, batch_size: int,
                       lr: float, progress: bool | None, desc: str) -> None:
    """More epochs of Adam (a fresh optimizer) on ``(x, y)`` without re-initialising ``model``."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    n = x.shape[0]
    model.train()
    disable = None if progress is None else not progress
    with tqdm(total=epochs * ((n + batch_size - 1) // batch_size), desc=desc, unit="batch", disable=disable,
              leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, batch_size):
                index = order[start:start + batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x[index].to(device)), y[index].to(device))
                loss.backward()
                optimizer.step()
                bar.update(1)
    model.eval()


@torch.no_grad()
@torch.no_grad()  # no autograd graph: a batch of 1000 through a WRN would otherwise keep its activations
def evaluate(model: nn.Module, x: Tensor, *, batch_size: int = 1000) -> Tensor:
    """Predicted classes ``(N,)`` of ``model`` on ``x`` (eval mode, batched, no autograd), on ``x``'s device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        predictions = [model(x[i:i + batch_size].to(device)).argmax(1).to(x.device)
                       for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(predictions)


# --------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------


def _architecture(model: nn.Module) -> str:
    """The architecture name a checkpoint records: the model's ``architecture`` attribute
    (``"wrn-34-8"``, ``"vgg19"``), ``"E"`` / ``"F"``, else the class name."""
    named = getattr(model, "architecture", None)
    if isinstance(named, str):
        return named
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    return type(model).__name__


def save_checkpoint(model: nn.Module, path: Any, info: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights to one safetensors file (atomically: temp file + rename).

    The metadata holds the format marker, a JSON config (architecture name, ``info``) and a
    SHA-256 digest over the config and tensors.

    Parameters
    ----------
    model : nn.Module
    path : str or os.PathLike
    info : dict, optional
        JSON-able facts stored with the weights (dataset, seed, epochs, accuracy...).

    Returns
    -------
    path : Path
    """
    config = {"format_version": CHECKPOINT_VERSION, "architecture": _architecture(model), "info": info or {}}
    return write_verified(path, CHECKPOINT_FORMAT, config, model.state_dict())


def load_checkpoint(path: Any, model: nn.Module) -> dict[str, Any]:
    """Load weights written by :func:`save_checkpoint` into ``model`` (never unpickles).

    Parameters
    ----------
    path : str or os.PathLike
    model : nn.Module
        A module of the architecture the file was written from; loaded with ``strict``
        key and shape checks, moved to nothing (tensors are copied into its parameters).

    Returns
    -------
    info : dict
        The ``info`` stored with the weights.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a complete safetensors file (a pickle is never loaded), lacks
        the checkpoint marker, fails its digest (tampered or corrupted), was written from
        another architecture, or its tensors' names or shapes differ from ``model``'s.
    """
    config, tensors = read_verified(path, CHECKPOINT_FORMAT, kind="model checkpoint", version=CHECKPOINT_VERSION)
    where = repr(str(path))
    expected = _architecture(model)
    if config.get("architecture") != expected:
        raise ValueError(f"{where} holds weights of architecture {config.get('architecture')!r}, not "
                         f"{expected!r}")
    own = model.state_dict()
    if set(own) != set(tensors):
        raise ValueError(f"{where} does not match the model: tensors {sorted(set(tensors) ^ set(own))} "
                         "are in only one of them")
    for name, tensor in own.items():
        if tensors[name].shape != tensor.shape or tensors[name].dtype != tensor.dtype:
            raise ValueError(f"{where} does not match the model: tensor {name!r} has shape "
                             f"{tuple(tensors[name].shape)} ({tensors[name].dtype}) in the file but "
                             f"{tuple(tensor.shape)} ({tensor.dtype}) in the model")
    model.load_state_dict(tensors, strict=True)
    info = config.get("info")
    return info if isinstance(info, dict) else {}


def checkpoint_key(dataset: str, data_sha256: str, model: str, seed: int, epochs: int,
                   **hyper: Any) -> str:
    """File stem of a cached model: readable fields plus a hash of everything that matters."""
    fields = {"dataset": dataset, "data": data_sha256, "model": model, "seed": int(seed),
              "epochs": int(epochs), "version": CHECKPOINT_VERSION, **TRAIN_DEFAULTS, **hyper}
    tag = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return f"{dataset}-{model}-seed{seed}-ep{epochs}-{data_sha256[:12]}-{tag}"


def _cached(model: nn.Module, key: str, cache: Any, use_cache: bool,
            device: Any) -> tuple[Path, dict[str, Any] | None]:
    """The cache file of ``key``; when it exists (and ``use_cache``), load it into ``model``.

    Returns ``(path, info)``, ``info`` None when nothing was loaded. A file that fails
    :func:`load_checkpoint`'s checks raises (it is never overwritten silently).
    """
    folder = Path(cache) if cache is not None else cache_dir() / "models"
    path = folder / f"{key}.safetensors"
    if not (use_cache and path.is_file()):
        return path, None
    try:
        info = load_checkpoint(path, model)
    except ValueError as exc:
        raise ValueError(f"{exc}. Delete {str(path)!r} to retrain it.") from None
    model.to(device).eval()
    return path, {**info, "path": str(path), "cached": True, "key": key}


def load_or_train(name: str, dataset: Any, *, seed: int = 0, epochs: int = 5, device: Any = "cpu",
                  cache: Any = None, use_cache: bool = True, progress: bool | None = None,
                  **train_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Model ``name`` trained on ``dataset``'s training split, from the cache when present.

    Parameters
    ----------
    name : {'E', 'F'}
    dataset : idefender_gpu.data.Dataset
    seed, epochs
        As in :func:`train`; with the dataset's content hash, they key the cache.
    device : str or torch.device, default='cpu'
    cache : str or os.PathLike, optional
        Checkpoint folder; default ``cache_dir() / 'models'``.
    use_cache : bool, default=True
        False: always train, and do not write the cache.
    progress : bool, optional
    **train_kwargs
        ``batch_size``, ``lr`` (part of the key).

    Returns
    -------
    model : nn.Module
        In eval mode on ``device``.
    info : dict
        ``path`` (the checkpoint), ``cached`` (whether it was reused), ``key``, ``seed``,
        ``epochs``, ``train_seconds`` (of the original training).

    Raises
    ------
    ValueError
        If the cached file exists but fails :func:`load_checkpoint`'s checks (it is never
        overwritten silently: delete it to retrain).
    """
    model = build_paper_model(name, dataset.n_classes)
    hyper = {k: v for k, v in train_kwargs.items() if k in ("batch_size", "lr")}
    key = checkpoint_key(dataset.name, dataset.sha256, name, seed, epochs, **hyper)
    path, cached = _cached(model, key, cache, use_cache, device)
    if cached is not None:
        return model, cached
    start = time.perf_counter()
    train(model, dataset.x_train, dataset.y_train, epochs=epochs, seed=seed, device=device,
          progress=progress, desc=f"train model {name}", **hyper)
    seconds = time.perf_counter() - start
    info = {"model": name, "dataset": dataset.name, "data_sha256": dataset.sha256, "seed": int(seed),
            "epochs": int(epochs), "n_train": int(dataset.x_train.shape[0]), "train_seconds": seconds,
            **TRAIN_DEFAULTS, **hyper}
    if use_cache:
        save_checkpoint(model, path, info)
    return model.eval(), {**info, "path": str(path) if use_cache else None, "cached": False, "key": key}


def load_or_train_substitute(dataset: Any, oracle: nn.Module, oracle_key: str, *, name: str = "E",
                             seed: int = 0, holdout: int = 150, rounds: int = 6, epochs: int = 10,
                             lmbda: float = 0.1, device: Any = "cpu", cache: Any = None,
                             use_cache: bool = True,
                             progress: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The black-box attacker's substitute (:func:`train_substitute`), from the cache when present.

    The attacker's seed set is the first ``holdout`` test images with their true labels
    (Defense-GAN's setting: they are then left out of the evaluation). The cache key adds
    the oracle's own key (its labels shape the substitute) and the augmentation settings.

    Returns
    -------
    model : nn.Module
    info : dict
        As :func:`load_or_train`, plus ``n_substitute_train`` and ``oracle_queries``.
    """
    model = build_paper_model(name, dataset.n_classes)
    key = checkpoint_key(dataset.name, dataset.sha256, f"{name}sub", seed, epochs, oracle=oracle_key,
                         holdout=holdout, rounds=rounds, lmbda=lmbda)
    path, cached = _cached(model, key, cache, use_cache, device)
    if cached is not None:
        return model, cached
    start = time.perf_counter()
    model.to(device)
    _, extra = train_substitute(model, oracle, dataset.x_test[:holdout], dataset.y_test[:holdout],
                                rounds=rounds, epochs=epochs, lmbda=lmbda, seed=seed, device=device,
                                progress=progress)
    info = {"model": name, "substitute": "jacobian", "dataset": dataset.name, "data_sha256": dataset.sha256,
            "oracle": oracle_key, "seed": int(seed), "epochs": int(epochs), "rounds": int(rounds),
            "lmbda": float(lmbda), "holdout": int(holdout), "train_seconds": time.perf_counter() - start,
            **extra, **TRAIN_DEFAULTS}
    if use_cache:
        save_checkpoint(model, path, info)
    return model.eval(), {**info, "path": str(path) if use_cache else None, "cached": False, "key": key}
