"""Hidden-state capture from any ``torch.nn.Module`` by forward hooks.

A *layer spec* names a module of the model as :meth:`torch.nn.Module.named_modules`
spells it, plus where to read it:

* ``"fc2"`` or ``"fc2:output"``: the module's output;
* ``"fc2:input"``: the module's (first positional) input, e.g. the input of the last
  ``nn.Linear``, the last fully connected hidden state of a classifier.

Every captured state is flattened to ``(B, D)``. The default spec (:func:`default_layers`)
is the input of the last ``nn.Linear`` registered in the model, since I-defender models
fully connected hidden states only (Zheng & Hong, Section 3).

:func:`attach` registers the hooks and returns a :class:`HiddenStateHooks` handle
(``remove()``, or use it as a context manager); :func:`hidden_states` runs one forward pass;
:func:`collect` runs a whole ``DataLoader`` on the model's device, with a progress bar, in
eval mode, and restores the model's modes and removes its hooks afterwards, even when the
forward raises.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "HiddenStateHooks",
    "LayerSpec",
    "attach",
    "collect",
    "default_layers",
    "eval_mode",
    "hidden_states",
    "model_device",
    "model_dtype",
    "parse_layers",
]

_WHERE = ("output", "input")


# --------------------------------------------------------------------------------------
# Layer specs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """One hidden state to capture: a module (by its ``named_modules()`` name) and where.

    Attributes
    ----------
    module_name : str
        The module's name in ``model.named_modules()`` (``""`` is the model itself).
    where : {'output', 'input'}
        Its output, or its first positional input.
    """

    module_name: str
    where: str

    @property
    def spec(self) -> str:
        """Canonical spec string: ``"name"`` for an output, ``"name:input"`` for an input."""
        return self.module_name if self.where == "output" else f"{self.module_name}:input"

    def __str__(self) -> str:
        return self.spec


def _split_spec(spec: str) -> tuple[str, str]:
    """``"fc:input"`` -> ``("fc", "input")``; ``"fc"`` / ``"fc:output"`` -> ``("fc", "output")``."""
    name, sep, suffix = spec.rpartition(":")
    if sep and suffix in _WHERE:
        return name, suffix
    return spec, "output"


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """The default spec: the input of the last ``nn.Linear`` of ``model``.

    "Last" is the last one in registration order (``named_modules()``), which is the
    forward order for ``nn.Sequential`` and for the usual ``__init__`` layouts
    (torchvision's ``fc`` / ``classifier.6``, ...).

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    layers : tuple of str
        ``("<name of the last Linear>:input",)``.

    Raises
    ------
    ValueError
        If ``model`` has no ``nn.Linear``.
    """
    _check_model(model)
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear:
        raise ValueError(
            "layers must be given for a model without an nn.Linear layer (the default is "
            "the input of the last nn.Linear); got a model with none"
        )
    return (f"{linear[-1]}:input",)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")


def parse_layers(model: nn.Module, layers: str | Sequence[str] | None = None) -> tuple[LayerSpec, ...]:
    """Resolve layer specs against ``model.named_modules()``.

    Parameters
    ----------
    model : torch.nn.Module
    layers : str or sequence of str, optional
        Specs such as ``"features.3"``, ``"fc2:output"`` or ``"fc2:input"``.
        Default: :func:`default_layers`.

    Returns
    -------
    specs : tuple of LayerSpec
        In the order given.

    Raises
    ------
    TypeError
        If ``model`` is not a module or a spec is not a string.
    ValueError
        For an unknown module name (the message lists the valid names), an empty list or
        a spec given twice.
    """
    _check_model(model)
    if layers is None:
        layers = default_layers(model)
    if isinstance(layers, str):
        layers = (layers,)
    if not isinstance(layers, Iterable):
        raise TypeError(f"layers must be a str or a sequence of str; got {type(layers).__name__}")
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one layer; got an empty sequence")
    names = dict(model.named_modules())
    specs = []
    for spec in layers:
        if not isinstance(spec, str):
            raise TypeError(f"layers must hold str specs such as 'fc:input'; got {spec!r}")
        name, where = _split_spec(spec)
        if name not in names:
            valid = ", ".join(repr(n) for n in names if n)
            raise ValueError(
                f"layers must name modules of the model (as in model.named_modules(), with an "
                f"optional ':input' or ':output' suffix); got unknown layer {name!r}. "
                f"Valid names: {valid}"
            )
        specs.append(LayerSpec(name, where))
    seen = set()
    for spec in specs:
        if spec in seen:
            raise ValueError(f"layers must name each hidden state once; got {spec.spec!r} twice")
        seen.add(spec)
    return tuple(specs)


# --------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------


def model_device(model: nn.Module, default: torch.device | None = torch.device("cpu")) -> torch.device | None:
    """The device of the model's first parameter (or buffer); ``default`` for a model with neither.

    Parameters
    ----------
    model : torch.nn.Module
    default : torch.device or None, default=torch.device('cpu')
        Returned when ``model`` has no parameter and no buffer (pass ``None`` to tell
        that case apart, e.g. to follow the input's device instead).
    """
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return default


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (or buffer), else None."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return None


@contextlib.contextmanager
def eval_mode(models: nn.Module | Iterable[nn.Module]) -> Iterator[Any]:
    """Put ``models`` in eval mode; restore every submodule's own ``training`` flag on exit.

    The flags are restored one module at a time, so a model in mixed modes (say, train
    mode with frozen batch-norm layers in eval) comes back exactly as it was, even when
    the body raises. Submodules shared by several of the given models are restored once.

    Parameters
    ----------
    models : torch.nn.Module or iterable of torch.nn.Module
        One model (yielded by the context manager) or several (e.g. a classifier and a
        detector's model; ``None`` is yielded).
    """
    single = isinstance(models, nn.Module)
    roots = [models] if single else list(models)
    modes = {}
    for root in roots:
        for module in root.modules():
            modes.setdefault(id(module), (module, module.training))
    try:
        for root in roots:
            root.eval()
        yield models if single else None
    finally:
        for module, training in modes.values():
            module.training = training


# --------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------


class HiddenStateHooks:
    """Forward hooks on the modules of some layer specs; a removable handle.

    Each hook returns None, so the model's outputs are never replaced. During a forward
    pass each hook stores its module's output (or input), flattened to ``(B, D)``, in a
    per-call buffer that :meth:`pop` empties. The stored state is a copy, so an in-place
    operation later in the forward (``nn.ReLU(inplace=True)``) cannot change it; with
    ``keep_graph=False`` it is detached, with ``keep_graph=True`` it stays in the autograd
    graph (for differentiable log-densities).

    Use :func:`attach` to create one. The handle is a context manager whose exit calls
    :meth:`remove`; ``remove`` may be called more than once. The model does not reference
    the handle once it is removed, and the handle does not reference the model.

    Attributes
    ----------
    layers : tuple of LayerSpec
    keep_graph : bool
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerSpec], *, keep_graph: bool = False):
        self.layers = tuple(layers)
        self.keep_graph = bool(keep_graph)
        self._buffer: dict[LayerSpec, Tensor] = {}
        self._calls: dict[LayerSpec, int] = {}
        self._handles: list[Any] = []
        modules = dict(model.named_modules())
        try:
            for spec in self.layers:
                module = modules[spec.module_name]
                if spec.where == "input":
                    handle = module.register_forward_pre_hook(self._input_hook(spec))
                else:
                    handle = module.register_forward_hook(self._output_hook(spec))
                self._handles.append(handle)
        except BaseException:
            self.remove()
            raise

    def _store(self, spec: LayerSpec, value: Any) -> None:
        if not isinstance(value, Tensor) or value.ndim == 0:
            what = "output" if spec.where == "output" else "first positional input"
            raise TypeError(
                f"layer {spec.spec!r} must produce a batched tensor as its {what} to be "
                f"captured; got {type(value).__name__}"
                + (f" of shape {tuple(value.shape)}" if isinstance(value, Tensor) else "")
            )
        state = value.reshape(value.shape[0], -1)  # (B, D)
        if not self.keep_graph:
            state = state.detach()
        self._buffer[spec] = state.clone()
        self._calls[spec] = self._calls.get(spec, 0) + 1

    def _output_hook(self, spec: LayerSpec):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._store(spec, output)

        return hook

    def _input_hook(self, spec: LayerSpec):
        def hook(module: nn.Module, args: tuple) -> None:
            self._store(spec, args[0] if args else None)

        return hook

    def pop(self) -> dict[str, Tensor]:
        """The states of the last forward pass, ``{spec: (B, D) tensor}``; empties the buffer.

        Raises
        ------
        RuntimeError
            If a layer did not run during the forward pass, or ran more than once (a
            module called several times per forward, such as a shared activation, has
            no single hidden state: name a module that runs once).
        """
        buffer, calls = self._buffer, self._calls
        self._buffer, self._calls = {}, {}
        for spec in self.layers:
            if spec not in buffer:
                raise RuntimeError(
                    f"layer {spec.spec!r} did not run during the forward pass; name a module "
                    "that the model's forward calls"
                )
            if calls[spec] > 1:
                raise RuntimeError(
                    f"layer {spec.spec!r} ran {calls[spec]} times in one forward pass (a module "
                    "used more than once has no single hidden state); name a module that runs once"
                )
        return {spec.spec: buffer[spec] for spec in self.layers}

    def remove(self) -> None:
        """Remove every hook and drop any buffered state (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._buffer, self._calls = {}, {}

    def __enter__(self) -> "HiddenStateHooks":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self._handles else "removed"
        return f"HiddenStateHooks(layers={[s.spec for s in self.layers]}, {state})"


def attach(model: nn.Module, layers: str | Sequence[str] | None = None, *,
           keep_graph: bool = False) -> HiddenStateHooks:
    """Register capture hooks on ``model`` for ``layers``.

    Parameters
    ----------
    model : torch.nn.Module
    layers : str or sequence of str, optional
        Layer specs (see :func:`parse_layers`); default :func:`default_layers`.
    keep_graph : bool, default=False
        Keep the captured states in the autograd graph instead of detaching them.

    Returns
    -------
    hooks : HiddenStateHooks
        A removable handle and context manager; read the states with ``hooks.pop()``
        after each forward pass.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from idefender_gpu.features import attach
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> with attach(model, ["0", "2:input"]) as hooks:
    ...     logits = model(torch.randn(5, 4))
    ...     states = hooks.pop()
    >>> {name: tuple(h.shape) for name, h in states.items()}
    {'0': (5, 8), '2:input': (5, 8)}
    """
    return HiddenStateHooks(model, parse_layers(model, layers), keep_graph=keep_graph)


def _to_model(x: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """Move ``x`` to the model's device, and floating inputs to its floating dtype.

    Copies to an accelerator are asynchronous (``non_blocking``); copies to the CPU are
    not, since the CPU could read the result before an asynchronous copy lands.
    """
    non_blocking = device.type != "cpu"
    if dtype is not None and x.is_floating_point() and x.dtype != dtype:
        return x.to(device=device, dtype=dtype, non_blocking=non_blocking)
    return x.to(device=device, non_blocking=non_blocking)


def hidden_states(model: nn.Module, x: Tensor, layers: str | Sequence[str] | None = None, *,
                  keep_graph: bool = False) -> tuple[Any, dict[str, Tensor]]:
    """One forward pass of ``model`` on ``x``, returning its output and the hidden states.

    The hooks are attached for this call only and removed afterwards, even if the
    forward raises. The model runs in the mode it is in; gradients follow the caller's
    grad mode (``keep_graph=True`` keeps the states differentiable).

    Parameters
    ----------
    model : torch.nn.Module
    x : Tensor of shape (B, ...)
        Moved to the model's device (and floating dtype).
    layers : str or sequence of str, optional
    keep_graph : bool, default=False

    Returns
    -------
    output : Any
        What ``model(x)`` returns.
    states : dict of str to Tensor of shape (B, D)
        Keyed by the canonical spec strings.
    """
    specs = parse_layers(model, layers)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor of shape (B, ...); got {type(x).__name__}")
    x = _to_model(x, model_device(model), model_dtype(model))
    with HiddenStateHooks(model, specs, keep_graph=keep_graph) as hooks:
        output = model(x)
        return output, hooks.pop()


# --------------------------------------------------------------------------------------
# Collection over a DataLoader
# --------------------------------------------------------------------------------------


@dataclass
class _Collected:
    """Hidden states of a whole loader (private)."""

    states: dict[str, Tensor]  # spec -> (N, D)
    labels: Tensor | None  # (N,) int64, or None for unlabelled batches
    n_outputs: int | None  # width of the model's 2-D output, None when it is not (B, n)
    input_shape: tuple[int, ...]  # per-sample input shape


def _split_batch(batch: Any, index: int, labelled: bool | None) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` from a loader batch: a pair/list ``(x, y, ...)`` or a bare tensor ``x``."""
    if isinstance(batch, Tensor):
        x, y = batch, None
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    elif isinstance(batch, (tuple, list)) and len(batch) == 1:
        x, y = batch[0], None
    else:
        raise TypeError(
            f"loader must yield (inputs, labels) pairs or input tensors; got a "
            f"{type(batch).__name__} at batch {index}"
        )
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise TypeError(
            f"loader inputs must be tensors of shape (B, ...); got {type(x).__name__} at batch {index}"
        )
    if labelled is not None and (y is not None) != labelled:
        raise ValueError(
            f"loader must yield labels in every batch or in none; batch {index} differs from batch 0"
        )
    if y is not None:
        if not isinstance(y, Tensor):
            y = torch.as_tensor(y)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(
                f"loader labels must be integer class labels; got dtype {y.dtype} at batch {index}"
            )
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"loader labels must have shape (B,) = ({x.shape[0]},) to match the inputs; got "
                f"shape {tuple(y.shape)} at batch {index}"
            )
    return x, y


@dataclass
class _Batch:
    """One loader batch run through the model (private)."""

    index: int
    states: dict[str, Tensor]  # spec -> (B, D), detached, on the model's device
    labels: Tensor | None  # (B,) int64 on the model's device, or None for unlabelled batches
    output: Any  # what the model returned
    input_shape: tuple[int, ...]  # per-sample input shape (the same for every batch)


def _batches(model: nn.Module, loader: Iterable, specs: Sequence[LayerSpec], *,
             progress: bool | None = None, desc: str = "hidden states") -> Iterator[_Batch]:
    """Run ``loader`` through ``model`` in eval mode under ``no_grad``, one batch at a time (private).

    The hooks are attached and the eval mode set for the whole iteration; both are undone
    when it ends, raises, or is closed early (so the caller must not run ``model`` itself
    between two batches). Every batch is checked against batch 0 (per-sample input shape;
    labels in all batches or none). An empty loader raises.
    """
    device, dtype = model_device(model), model_dtype(model)
    input_shape: tuple[int, ...] | None = None
    labelled: bool | None = None
    disable = None if progress is None else not progress
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    with eval_mode(model), HiddenStateHooks(model, specs) as hooks:
        # iter() once here: tqdm.auto's bar would call iter(loader) twice (one pass wasted,
        # DataLoader workers started twice, a re-iterable loader's pass counted twice)
        for index, batch in enumerate(tqdm(iter(loader), total=total, desc=desc, unit="batch",
                                           disable=disable, leave=False)):
            x, y = _split_batch(batch, index, labelled)
            if input_shape is None:
                input_shape, labelled = tuple(x.shape[1:]), y is not None
            elif tuple(x.shape[1:]) != input_shape:
                raise ValueError(
                    f"loader inputs must all have the per-sample shape {input_shape} of batch 0; "
                    f"got shape {tuple(x.shape)} at batch {index}"
                )
            with torch.no_grad():  # not around the yield: the caller keeps its grad mode
                output = model(_to_model(x, device, dtype))
            states = hooks.pop()
            if y is not None:
                y = y.to(device=device, dtype=torch.int64, non_blocking=device.type != "cpu")
            yield _Batch(index, states, y, output, input_shape)
    if input_shape is None:
        raise ValueError("loader must yield at least one batch; got an empty loader")


def _collect(model: nn.Module, loader: Iterable, specs: Sequence[LayerSpec], *,
             progress: bool | None = None, desc: str = "hidden states") -> _Collected:
    """Every batch of :func:`_batches`, concatenated (private)."""
    chunks: dict[str, list[Tensor]] = {spec.spec: [] for spec in specs}
    labels: list[Tensor] = []
    n_outputs: int | None = None
    for batch in _batches(model, loader, specs, progress=progress, desc=desc):
        if batch.index == 0:
            output = batch.output
            n_outputs = output.shape[1] if isinstance(output, Tensor) and output.ndim == 2 else None
        for spec, state in batch.states.items():
            chunks[spec].append(state)
        if batch.labels is not None:
            labels.append(batch.labels)
    return _Collected(
        states={spec: torch.cat(parts) for spec, parts in chunks.items()},
        labels=torch.cat(labels) if labels else None,
        n_outputs=n_outputs,
        input_shape=batch.input_shape,
    )


def collect(model: nn.Module, loader: Iterable, layers: str | Sequence[str] | None = None, *,
            progress: bool | None = None) -> tuple[dict[str, Tensor], Tensor | None]:
    """Hidden states of every batch of ``loader``, on the model's device.

    The model runs in eval mode under ``torch.no_grad()``; its modes are restored and its
    hooks removed afterwards, even if a forward pass raises.

    Parameters
    ----------
    model : torch.nn.Module
    loader : iterable
        A ``torch.utils.data.DataLoader`` (or any iterable) yielding ``(x, y)`` pairs,
        or input tensors alone. Inputs ``x (B, ...)`` are moved to the model's device
        (floating inputs to its floating dtype).
    layers : str or sequence of str, optional
        Layer specs (see :func:`parse_layers`); default :func:`default_layers`.
    progress : bool, optional
        Show a tqdm progress bar. Default: shown when stderr is a terminal.

    Returns
    -------
    states : dict of str to Tensor of shape (n_samples, D)
        Detached, on the model's device, keyed by the canonical spec strings.
    labels : Tensor of int64, shape (n_samples,), or None
        The loader's labels, on the model's device; None when the batches hold inputs only.
    """
    collected = _collect(model, loader, parse_layers(model, layers), progress=progress)
    return collected.states, collected.labels
