"""The first pass of a detector fit by EM, and the streamed hidden states of the later passes (private).

A fit with several components per class makes one pass over the hidden states per EM
iteration. :func:`fit_states` runs the loader through the model once and holds the states
(in the compute dtype) while they fit the detector's ``memory_budget`` (None: a quarter of
the device's memory, :func:`default_state_budget`): then the fit is the in-memory one (a
:class:`~._states.LabelledStates`). Past the budget the held states are dropped or spilled,
and a :class:`StreamedStates` serves every later pass:

* from the hidden-state cache on disk (``cache=DIR``, :mod:`._cache`): the first pass
  writes the shards (or resumes an interrupted first pass, or reuses a complete cache
  without running the model), later passes memory-map them;
* or by running the model again on the loader (no cache): one forward of the whole loader
  per EM pass (and per layer), each pass checked to yield the same batches (sizes and
  labels) in the same order as the first.

Inside ``data_parallel`` each rank streams its own shard, from its own subfolder
``rank-R-of-W`` of the cache; the ranks agree on the path (streamed if any rank's states
do not fit; a rank whose states fit then streams them from memory) through
:func:`~._states.agreed_first_pass`.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from idefender_gpu.detector._cache import StateCache, model_digest, rank_folder
from idefender_gpu.detector._states import LabelledStates, agreed_first_pass, current_rank, shape_row, stream_thresholds
from idefender_gpu.features import LayerSpec, _batches, _split_batch, model_device, model_dtype

logger = logging.getLogger("idefender_gpu.detector")
__all__ = ["StreamedStates", "default_state_budget", "fit_layers", "fit_states"]


def default_state_budget(device: torch.device) -> int:
    """Bytes of hidden states a fit holds in memory when ``memory_budget`` is None: a
    quarter of the device's memory (of the host's physical memory on CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        return 4 * 2**30


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class StreamedStates:
    """The hidden states of a fit that does not hold them all: one source, many passes.

    Attributes
    ----------
    n_classes : int
    input_shape : tuple of int
    counts : list of int
        Samples of each class, over all ranks.
    dtype : torch.dtype
        The compute dtype the states come in.
    device : torch.device
        The model's device.
    labels : list of Tensor
        This rank's labels of each loader batch (CPU int64), as the first pass saw them.
    cache : StateCache or None
        The states on disk, else:
    held : list or None
        This rank's states in memory (inside ``data_parallel``, a rank whose states fit
        while another's did not), else the model is run again on ``loader``.
    """

    model: nn.Module
    loader: Iterable
    specs: tuple[LayerSpec, ...]
    n_classes: int
    input_shape: tuple[int, ...]
    counts: list[int]
    dtype: torch.dtype
    device: torch.device
    labels: list[Tensor]
    cache: StateCache | None
    held: list[tuple[list[Tensor], Tensor]] | None
    progress: bool | None = None

    @property
    def source(self) -> str:
        """``'cache'``, ``'memory'`` or ``'model'`` (run again on every pass)."""
        return "cache" if self.cache is not None else "memory" if self.held is not None else "model"

    def batches(self, layers: Sequence[str] | None = None) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """One pass: ``({layer: (B, D)}, labels (B,))`` per loader batch, in order.

        States from the cache are CPU views of its memory map; from the model, on its
        device; labels on the CPU. ``layers`` (spec strings) default to every layer.
        """
        names = [spec.spec for spec in self.specs]
        layers = names if layers is None else list(layers)
        index = [names.index(name) for name in layers]
        if self.cache is not None:
            for states, labels in self.cache.batches(index):
                yield dict(zip(layers, states)), labels
            return
        if self.held is not None:
            for (states, _), labels in zip(self.held, self.labels):
                yield {name: states[i] for name, i in zip(layers, index)}, labels
            return
        yield from self._rerun([self.specs[i] for i in index])

    def _rerun(self, specs: list[LayerSpec]) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
        """The model run again on the loader; each batch checked against the first pass."""
        n = len(self.labels)
        count = 0
        for batch in _batches(self.model, self.loader, specs, progress=self.progress, desc="fit: EM pass"):
            i = batch.index
            if i >= n or batch.labels is None or batch.labels.shape != self.labels[i].shape \
                    or not torch.equal(batch.labels.to("cpu"), self.labels[i]):
                raise ValueError(
                    "loader must yield the same batches in the same order on every pass of the fit "
                    "(without a cache, the model runs on the loader again for every EM pass); batch "
                    f"{i} differs from the first pass (a DataLoader with shuffle=True reorders every "
                    "pass: use shuffle=False, or give cache=DIR)"
                )
            count += 1
            yield {name: h.to(self.dtype) for name, h in batch.states.items()}, self.labels[i]
        if count != n:
            raise ValueError(
                "loader must yield the same batches in the same order on every pass of the fit "
                f"(without a cache, the model runs on the loader again for every EM pass); got {count} "
                f"batches, {n} in the first pass"
            )


def _skip_written(loader: Iterable, cache: StateCache, labels: list[Tensor]) -> list[Any]:
    """The batches of ``loader`` after those the (resumed) cache holds (an empty list, or an
    iterator of at least one batch). The batches the cache holds are read first and compared
    (size, labels, per-sample shape) but not run through the model."""
    where = repr(str(cache.folder))
    iterator = iter(loader)
    for i, expected in enumerate(labels):
        batch = next(iterator, None)
        if batch is None:
            raise ValueError(f"loader yields {i} batches, fewer than the {len(labels)} the cache {where} "
                             "holds: resume with the loader the cache was written from, or delete the folder")
        x, y = _split_batch(batch, i, True)
        if tuple(x.shape[1:]) != cache.input_shape or y.shape != expected.shape \
                or not torch.equal(y.to(device="cpu", dtype=torch.int64), expected):
            raise ValueError(
                f"loader batch {i} differs from the batch the cache {where} holds (its size, labels or "
                "per-sample shape): resume with the loader the cache was written from, in the same "
                "order, or delete the folder"
            )
    first = next(iterator, None)
    return [] if first is None else itertools.chain([first], iterator)


@dataclass
class _Pass:
    """What one rank's first pass found (private)."""

    n_classes: int
    input_shape: tuple[int, ...]
    dtype: torch.dtype
    labels: list[Tensor]  # CPU, per batch
    held: list[tuple[list[Tensor], Tensor]] | None  # in memory (labels on the device)
    cache: StateCache | None
    streamed: bool


def _first_pass(model: nn.Module, loader: Iterable, specs: Sequence[LayerSpec], *, resolve_dtype: Callable,
                budget: int, cache: StateCache | None, progress: bool | None, owner: str) -> _Pass:
    """Run the loader through the model once: hold the states while they fit ``budget``,
    then write them to ``cache`` (or keep only the labels); resume or reuse a cache."""
    if cache is not None and cache.complete:
        try:
            n_batches = len(loader)  # type: ignore[arg-type]
        except TypeError:
            n_batches = None
        if n_batches is not None and n_batches != len(cache.batch_sizes):
            raise ValueError(
                f"cache {str(cache.folder)!r} holds {len(cache.batch_sizes)} loader batches but this loader "
                f"has {n_batches}: give the cache folder of this loader, or delete this one to rebuild it"
            )
        return _Pass(cache.n_classes, cache.input_shape, getattr(torch, cache.key["dtype"]), cache.labels(),
                     None, cache, True)
    labels = cache.labels() if cache is not None else []
    resumed = bool(labels)
    batches = _skip_written(loader, cache, labels) if resumed else loader
    held: list | None = None if resumed else []
    held_bytes = 0
    n_classes = cache.n_classes if resumed else None
    input_shape = cache.input_shape if resumed else None
    dtype = None
    # (a resumed pass with every batch written already runs nothing: _batches refuses an empty loader)
    for batch in _batches(model, batches, specs, progress=progress, desc="fit: hidden states") \
            if not resumed or batches else ():
        y = batch.labels
        if y is None:
            raise ValueError("loader must yield (inputs, labels) pairs to fit a detector; got inputs only")
        states = [batch.states[spec.spec] for spec in specs]
        if dtype is None:
            output = batch.output
            if not isinstance(output, Tensor) or output.ndim != 2:
                raise ValueError("model must return logits of shape (B, n_classes) to be guarded by a "
                                 "detector; got another output")
            dtype = resolve_dtype(states[0])
            if cache is not None and _dtype_name(dtype) != cache.key["dtype"]:
                raise ValueError(f"{owner} cannot cache hidden states of dtype {_dtype_name(dtype)} for a model "
                                 f"whose parameters are {cache.key['dtype']}: give dtype= explicitly")
            n_classes, input_shape = int(output.shape[1]), batch.input_shape
            if cache is not None:
                cache.check_first_batch(input_shape, n_classes, [h.shape[1] for h in states])
        if y.numel():
            low, high = (int(v) for v in torch.aminmax(y))
            if low < 0 or high >= n_classes:
                raise ValueError(
                    f"loader labels must be class labels in [0, n_classes) = [0, {n_classes}) (n_classes "
                    f"is the width of the model's output); got label {low if low < 0 else high}")
        states = [h.to(dtype) for h in states]
        labels.append(y.to("cpu"))
        if held is not None:
            held.append((states, y))
            held_bytes += sum(h.numel() * h.element_size() for h in states)
            if held_bytes > budget:  # spill: to the cache, else keep the labels only
                if cache is not None:
                    for part, part_y in held:
                        cache.add(part, part_y)
                held = None
        elif cache is not None:
            cache.add(states, y)
    if dtype is None and not resumed:
        raise ValueError("loader must yield at least one batch; got an empty loader")
    if dtype is None:  # every batch was in the cache already
        dtype = getattr(torch, cache.key["dtype"])
    if held is None and cache is not None:
        cache.finish()
    return _Pass(n_classes, input_shape, dtype, labels, held, cache if held is None else None, held is None)


def fit_states(model: nn.Module, loader: Iterable, specs: Sequence[LayerSpec], *,
               resolve_dtype: Callable[[Tensor], torch.dtype], memory_budget: int | None, cache: Any,
               min_per_class: int, progress: bool | None = None,
               owner: str = "detector") -> LabelledStates | StreamedStates:
    """The first pass of a fit by EM: the states in memory, or a source of streamed passes.

    Parameters
    ----------
    model : torch.nn.Module
    loader : iterable of (x, y)
        Inside ``data_parallel``, this rank's shard.
    specs : sequence of LayerSpec
    resolve_dtype : callable
        ``hidden state -> compute dtype`` (applied to the first batch's first layer; the
        cache's dtype is predicted from the model's parameters' dtype, and must be the same).
    memory_budget : int or None
        Bytes of hidden states (in the compute dtype, summed over the layers) held in
        memory; None: :func:`default_state_budget` of the model's device.
    cache : str, os.PathLike or None
        The cache folder (a subfolder per rank inside ``data_parallel``).
    min_per_class : int
        Samples every class needs (over all ranks).
    progress : bool, optional
    owner : str
        The detector's class name (messages).

    Returns
    -------
    LabelledStates or StreamedStates
        In memory when every rank's states fit the budget, else streamed (from the cache,
        this rank's held states, or the model run again).

    Raises
    ------
    ValueError
        For an unlabelled loader, labels outside ``[0, n_classes)``, a model whose output
        is not ``(B, n_classes)``, a class with fewer than ``min_per_class`` samples, ranks
        that disagree on the input shape or the number of classes; a cache written for
        another model, layer set, dtype or loader, or with a corrupted shard; a loader that
        differs from the batches a resumed cache holds.
    TypeError
        A one-shot iterator whose states do not fit the budget, without a cache (the model
        would have to run on it again).
    """
    device = model_device(model)
    budget = default_state_budget(device) if memory_budget is None else int(memory_budget)
    rank, world_size = current_rank()
    state_cache = None

    def run() -> tuple[list[int], bool, _Pass]:
        nonlocal state_cache
        if cache is not None:
            predicted = resolve_dtype(torch.empty(0, dtype=model_dtype(model) or torch.float32))
            key = {"model": {"class": type(model).__qualname__, "digest": model_digest(model)},
                   "layers": [spec.spec for spec in specs], "dtype": _dtype_name(predicted),
                   "rank": rank, "world_size": world_size}
            state_cache = StateCache.open(rank_folder(Path(cache), rank, world_size), key)
        found = _first_pass(model, loader, specs, resolve_dtype=resolve_dtype, budget=budget,
                            cache=state_cache, progress=progress, owner=owner)
        if found.cache is None and found.held is None and isinstance(loader, Iterator):
            raise TypeError(
                f"loader must be re-iterable (a list, a DataLoader) for {owner}.fit when its hidden states "
                "do not fit memory_budget and no cache folder is given: the model runs on it again for "
                f"every EM pass; got a one-shot iterator of type {type(loader).__name__} (give cache=DIR, "
                "or a larger memory_budget)"
            )
        return shape_row(found.n_classes, found.input_shape), found.streamed, found

    found, streamed, counts, setting = agreed_first_pass(
        run, lambda found: (torch.cat(found.labels), found.n_classes), min_per_class)
    if not streamed:  # every rank holds its states: the in-memory fit
        states = {spec.spec: torch.cat([part[i] for part, _ in found.held]) for i, spec in enumerate(specs)}
        labels = torch.cat([y for _, y in found.held])
        return LabelledStates(states, labels, found.n_classes, found.input_shape, counts, "fit", setting)
    data = StreamedStates(model, loader, tuple(specs), found.n_classes, found.input_shape, counts, found.dtype,
                          device, found.labels, found.cache, found.held, progress)
    logger.info("fit: every EM pass streams the hidden states from the %s (memory_budget %d bytes)",
                data.source, budget)
    return data


def fit_layers(data: LabelledStates | StreamedStates, fit_in_memory: Callable, fit_stream: Callable,
               options_of: Callable[[torch.dtype, torch.device], dict[str, Any]], log_density: Callable,
               keep: float) -> tuple[dict[str, Any], Tensor]:
    """One batched fit per layer (a loop over layers, never over classes), then the thresholds.

    Parameters
    ----------
    data : LabelledStates or StreamedStates
        What :func:`fit_states` returned.
    fit_in_memory : callable
        ``(H (N, D), labels (N,), n_classes, options) -> density`` (data-parallel inside
        ``data_parallel``).
    fit_stream : callable
        ``(batches, options) -> density``, ``batches()`` a fresh pass of ``(H (B, D), labels (B,))``.
    options_of : callable
        ``(compute dtype, device) -> the density's fitting options``.
    log_density : callable
        ``(densities, states, classes (B,)) -> (B,)``, the layers' summed log-density.
    keep : float

    Returns
    -------
    densities : dict of str to density
    thresholds : Tensor of shape (n_classes,)
    """
    densities = {}
    if isinstance(data, LabelledStates):  # the states are in the compute dtype already
        first = next(iter(data.states.values()))
        options = options_of(first.dtype, first.device)
        for name, H in data.states.items():
            start = time.perf_counter()
            logger.info("fit: %s mixtures of %s, %d states x %d features ...", data.n_classes, name,
                        H.shape[0], H.shape[1])
            densities[name] = fit_in_memory(H, data.labels, data.n_classes, options)
            logger.info("fit: %s mixtures done in %.1f s", name, time.perf_counter() - start)
        start = time.perf_counter()
        logger.info("fit: thresholds (keep %s of each class) ...", keep)
        thresholds = data.thresholds(lambda states, classes: log_density(densities, states, classes), keep)
        logger.info("fit: thresholds done in %.1f s", time.perf_counter() - start)
        return densities, thresholds
    options = options_of(data.dtype, data.device)
    for spec in data.specs:
        name = spec.spec
        start = time.perf_counter()
        logger.info("fit: %s mixtures of %s, streamed from the %s ...", data.n_classes, name, data.source)
        densities[name] = fit_stream(
            lambda name=name: ((states[name], labels) for states, labels in data.batches((name,))), options)
        logger.info("fit: %s mixtures done in %.1f s", name, time.perf_counter() - start)
    start = time.perf_counter()
    logger.info("fit: thresholds (keep %s of each class) ...", keep)
    device = data.device
    thresholds = stream_thresholds(
        (({name: h.to(device) for name, h in states.items()}, labels.to(device))
         for states, labels in data.batches()),
        lambda states, classes: log_density(densities, states, classes), data.n_classes, keep)
    logger.info("fit: thresholds done in %.1f s", time.perf_counter() - start)
    return densities, thresholds
