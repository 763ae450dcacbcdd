"""Labelled hidden states of a loader, in one process or data-parallel (private).

Every place where a detector behaves differently inside
:func:`idefender_gpu.distributed.data_parallel` is here, so ``fit``, ``calibrate`` and
``save`` read the same in one process and on many ranks:

* :class:`LabelledStates` are the checked hidden states of a labelled loader, held in
  memory (what :func:`idefender_gpu.detector._streamed.fit_states` returns when they fit
  the budget); :meth:`LabelledStates.thresholds` scores the states under their true classes and turns
  the scores into per-class thresholds (paper Eq. 5); inside ``data_parallel`` over the
  scores of every rank (exact per-class order statistics);
* :func:`streamed_moments` and :func:`streamed_thresholds` are the one-pass fit's two
  passes over a re-iterable loader (one Gaussian per class, :mod:`._moments`): per-class
  moments merged batch by batch (then over the ranks), and the scores under the true
  classes; neither holds more than one batch of hidden states;
* :func:`calibration_thresholds` is ``calibrate``'s one pass (scores under the true
  classes, batch by batch);
* :func:`agreed_first_pass` runs the first pass of a fit by EM (several components per
  class, :func:`idefender_gpu.detector._streamed.fit_states`). Inside ``data_parallel`` the
  loader is this rank's shard: an error on any rank is raised on every rank, the ranks must
  agree on the per-sample input shape and the number of classes (and agree whether the
  states are held in memory), and the per-class counts are those of all ranks;
  :func:`stream_thresholds` scores streamed states batch by batch;
* :func:`write_once` runs a write on rank 0 only (every rank holds the same detector).

:func:`class_thresholds` is the pure per-class quantile.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from idefender_gpu.detector._moments import ClassBuckets, ClassMoments, MomentAccumulator, all_reduce_moments
from idefender_gpu.distributed import current as current_data_parallel
from idefender_gpu.features import LayerSpec, _batches

__all__ = ["LabelledStates", "StreamedMoments", "agreed_first_pass", "calibration_thresholds", "class_thresholds",
           "current_rank", "shape_row", "stream_thresholds", "streamed_moments",
           "streamed_thresholds", "write_once"]

#: Input dimensions compared across ranks (with the number of elements).
_SHAPE_DIMS = 6
#: what a detector does with a loader -> what its data is called in messages
_DATA = {"fit": "training", "calibrate": "calibration"}


def class_thresholds(scores: Tensor, labels: Tensor, n_classes: int, keep: float) -> Tensor:
    """Per-class thresholds that keep a fraction ``keep`` of each class's samples.

    For class ``c`` with ``n_c`` samples, the threshold is the ``(n_c - m_c + 1)``-th largest
    score, ``m_c = ceil(keep * n_c)``: exactly ``m_c`` samples score at or above it when
    there are no ties (more with ties at the threshold), so ``score < threshold`` rejects
    at most ``1 - keep`` of the class. No loop over classes: one sort by (class, score).

    Parameters
    ----------
    scores : Tensor of shape (N,)
    labels : Tensor of int64, shape (N,)
        In ``[0, n_classes)``; every class must occur.
    n_classes : int
    keep : float in (0, 1]

    Returns
    -------
    thresholds : Tensor of shape (n_classes,), same dtype/device as ``scores``.
    """
    counts = torch.bincount(labels, minlength=n_classes)  # (C,)
    order = torch.argsort(scores, stable=True)  # (N,) by score
    order = order[torch.argsort(labels[order], stable=True)]  # (N,) by class, then score
    offsets = torch.cumsum(counts, 0) - counts  # (C,)
    # 1e-9 absorbs round-off in keep * n_c (0.95 * 20 must keep 19, not 20).
    n_keep = torch.ceil(counts.to(torch.float64) * keep - 1e-9).to(torch.int64)  # (C,)
    n_keep = torch.minimum(n_keep.clamp_min(1), counts)
    return scores[order][offsets + counts - n_keep]  # (C,)


@dataclass(frozen=True)
class LabelledStates:
    """The hidden states of a labelled loader (this rank's shard inside ``data_parallel``).

    Attributes
    ----------
    states : dict of str to Tensor of shape (N, D)
        Per layer spec, on the model's device.
    labels : Tensor of int64, shape (N,)
    n_classes : int
    input_shape : tuple of int
        Per-sample input shape.
    counts : list of int
        Samples of each class, over all ranks.
    what : {'fit', 'calibrate'}
        What the states are for (in messages).
    setting : object or None
        The active data-parallel setting, None in one process.
    """

    states: dict[str, Tensor]
    labels: Tensor
    n_classes: int
    input_shape: tuple[int, ...]
    counts: list[int]
    what: str
    setting: Any = None

    def thresholds(self, log_density: Callable[[dict[str, Tensor]], Tensor], keep: float) -> Tensor:
        """Per-class thresholds keeping ``keep`` of the states' scores under their true classes.

        Parameters
        ----------
        log_density : callable
            ``(states, classes (N,)) -> (N,)`` log-densities under the given classes (the
            true ones here: no other class is evaluated); run without gradients.
        keep : float in (0, 1]

        Returns
        -------
        thresholds : Tensor of shape (n_classes,)
            The same on every rank inside ``data_parallel``.
        """
        setting = self.setting
        guard = setting.guard(f"scoring its {_DATA[self.what]} data") if setting else nullcontext()
        with guard, torch.no_grad():
            scores = log_density(self.states, self.labels)  # (N,) under the true classes
        labels = self.labels
        if setting is not None:  # one score and one label per sample: exact order statistics
            scores = setting.gather_rows(scores, "gathering the training scores")
            labels = setting.gather_rows(labels, "gathering the training labels")
        return class_thresholds(scores, labels, self.n_classes, keep)


def _check_counts(counts: list[int], min_per_class: int, what: str) -> None:
    short = [c for c, n in enumerate(counts) if n < min_per_class]
    if short:
        c = short[0]
        raise ValueError(
            f"loader must hold at least {min_per_class} sample(s) of every class to {what} the "
            f"detector; got {counts[c]} of class {c}"
            + (f" ({len(short)} classes short)" if len(short) > 1 else "")
        )


def _check_table(table: list[list[int]]) -> None:
    """The ranks agree on the number of classes and the per-sample input shape."""
    if any(row != table[0] for row in table):
        got = ", ".join(f"{row[0]} classes and per-sample input shape {tuple(row[3:3 + row[1]])}"
                        f" on rank {r}" for r, row in enumerate(table))
        raise ValueError(
            "loader inputs must have the same per-sample shape, and the model the same "
            f"number of classes, on every rank of a data-parallel fit; got {got}"
        )


def _check_reiterable(loader: Any, owner: str) -> None:
    if isinstance(loader, Iterator):  # never call iter() here: it would start a pass (DataLoader workers)
        raise TypeError(
            f"loader must be re-iterable (a list, a DataLoader or another iterable whose iter() "
            f"starts afresh) for {owner}.fit with one component per class: it reads the data "
            "twice (the class moments, then the thresholds) and never holds every hidden state; "
            f"got a one-shot iterator of type {type(loader).__name__}"
        )


@dataclass(frozen=True)
class StreamedMoments:
    """What the first pass of a streamed fit returns.

    Attributes
    ----------
    moments : dict of str to ClassMoments
        Per layer spec, of all ranks' data.
    n_classes : int
    input_shape : tuple of int
    counts : list of int
        Samples of each class, over all ranks.
    dtype : torch.dtype
        The compute dtype the moments are in.
    """

    moments: dict[str, ClassMoments]
    n_classes: int
    input_shape: tuple[int, ...]
    counts: list[int]
    dtype: torch.dtype


def streamed_moments(model: nn.Module, loader: Iterable, specs: Sequence[LayerSpec], *,
                     resolve_dtype: Callable[[Tensor], torch.dtype], diagonal: bool, higher: bool,
                     pooled: bool = False, memory_budget: int | None = None, min_per_class: int = 1, progress: bool | None = None,
                     owner: str = "detector") -> StreamedMoments:
    """One pass over ``loader``: per layer, per-class moments merged batch by batch.

    Parameters
    ----------
    model, loader, specs
        The model, a labelled loader (inside ``data_parallel``, this rank's shard) and the
        layer specs; ``loader`` must be re-iterable (checked first).
    resolve_dtype : callable
        ``first hidden state -> compute dtype``.
    diagonal, higher, pooled : bool
        Diagonal scatters only; third and fourth moments too (Ledoit-Wolf); one scatter
        summed over the classes (a shared covariance).
    memory_budget : int, optional
        Bytes for the ``(D, D)`` products of one block of a batch's class tiles.
    min_per_class, progress, owner
        Samples every class needs (over all ranks), the progress bar, the detector's
        class name (messages).

    Raises
    ------
    TypeError
        For a one-shot iterator (before reading), non-integer labels, batches that are not
        ``(x, y)`` pairs.
    ValueError
        For an unlabelled loader, labels outside ``[0, n_classes)``, a model whose output is
        not ``(B, n_classes)``, a class with fewer than ``min_per_class`` samples, or ranks
        that disagree on the input shape or the number of classes.
    """
    _check_reiterable(loader, owner)
    setting = current_data_parallel()

    def run() -> tuple[list[int], tuple[Any, int, tuple[int, ...], torch.dtype]]:
        # class buckets then merges (_moments.MomentAccumulator): a shuffled loader costs
        # about what a sorted one does
        accumulators: dict[str, MomentAccumulator] = {}
        n_classes, dtype, input_shape = None, None, None
        for batch in _batches(model, loader, specs, progress=progress, desc="fit: class moments"):
            if batch.labels is None:
                raise ValueError("loader must yield (inputs, labels) pairs to fit a detector; got inputs only")
            if n_classes is None:
                output = batch.output
                if not isinstance(output, Tensor) or output.ndim != 2:
                    raise ValueError(
                        "model must return logits of shape (B, n_classes) to be guarded by a detector; "
                        "got another output"
                    )
                n_classes = int(output.shape[1])
                dtype = resolve_dtype(next(iter(batch.states.values())))
                input_shape = batch.input_shape
            labels = batch.labels
            if labels.numel():
                low, high = (int(v) for v in torch.aminmax(labels))
                if low < 0 or high >= n_classes:
                    raise ValueError(
                        f"loader labels must be class labels in [0, n_classes) = [0, {n_classes}) (n_classes "
                        f"is the width of the model's output); got label {low if low < 0 else high}"
                    )
            for spec, h in batch.states.items():
                if spec not in accumulators:
                    accumulators[spec] = MomentAccumulator(n_classes, diagonal=diagonal, higher=higher,
                                                           pooled=pooled, memory_budget=memory_budget)
                accumulators[spec].add(h.to(dtype), labels)
        totals = {spec: acc.result() for spec, acc in accumulators.items()}
        shape = list(input_shape[:_SHAPE_DIMS]) + [0] * (_SHAPE_DIMS - len(input_shape[:_SHAPE_DIMS]))
        row = [n_classes, len(input_shape), int(torch.Size(input_shape).numel()), *shape]
        return row, (totals, n_classes, input_shape, dtype)

    if setting is None:
        totals, n_classes, input_shape, dtype = run()[1]
    else:
        (totals, n_classes, input_shape, dtype), table = setting.exchange(
            run, 3 + _SHAPE_DIMS, "streaming the class moments to fit")
        _check_table(table)
        totals = {spec: all_reduce_moments(setting, m, "merging the class moments of every rank")
                  for spec, m in totals.items()}
    counts = next(iter(totals.values())).counts
    counts = [int(round(c)) for c in counts.tolist()]
    _check_counts(counts, min_per_class, "fit")
    return StreamedMoments(totals, n_classes, input_shape, counts, dtype)


def streamed_thresholds(model: nn.Module, loader: Iterable, specs: Sequence[LayerSpec],
                        log_density: Callable[[dict[str, Tensor], Tensor], Tensor], fitted: StreamedMoments,
                        keep: float, progress: bool | None = None) -> Tensor:
    """The second pass: scores under the true classes, batch by batch; per-class thresholds.

    Only the scores and labels ``(N,)`` are kept. Inside ``data_parallel`` they are gathered
    from every rank (exact order statistics).

    Raises
    ------
    ValueError
        If the loader yields other data than in the first pass (per-sample shape or
        per-class counts).
    """
    setting = current_data_parallel()
    guard = setting.guard("scoring its training data") if setting else nullcontext()
    scores, labels = [], []
    # states held per class until 64 of a class are there (_moments.ClassBuckets): each group
    # reads a class's factor for many states, also when a shuffled batch holds few of each
    buckets = ClassBuckets(fitted.n_classes, 64)

    def score(groups: list[tuple[dict[str, Tensor], Tensor]]) -> None:
        for states, classes in groups:
            with torch.no_grad():
                scores.append(log_density(states, classes))  # (n,) under the true classes
            labels.append(classes)

    with guard:
        for batch in _batches(model, loader, specs, progress=progress, desc="fit: thresholds"):
            if batch.labels is None or batch.input_shape != fitted.input_shape or (
                    batch.labels.numel() and not 0 <= int(batch.labels.min()) <= int(batch.labels.max())
                    < fitted.n_classes):
                raise ValueError("loader must yield the same (inputs, labels) on every pass of the fit; "
                                 f"batch {batch.index} differs from the first pass")
            score(buckets.add(batch.states, batch.labels))
        score(buckets.drain())
        scores, labels = torch.cat(scores), torch.cat(labels)
        if setting is None:
            again = torch.bincount(labels, minlength=fitted.n_classes).tolist()
            if again != fitted.counts:
                raise ValueError("loader must yield the same (inputs, labels) on every pass of the fit; "
                                 "the per-class counts of the second pass differ from the first")
    if setting is not None:  # one score and one label per sample: exact order statistics
        scores = setting.gather_rows(scores, "gathering the training scores")
        labels = setting.gather_rows(labels, "gathering the training labels")
    return class_thresholds(scores, labels, fitted.n_classes, keep)


def calibration_thresholds(model: nn.Module, loader: Iterable, specs: Sequence[LayerSpec],
                           log_density: Callable[[dict[str, Tensor], Tensor], Tensor], *, n_classes: int,
                           input_shape: tuple[int, ...], keep: float, progress: bool | None = None) -> Tensor:
    """One pass over a labelled loader, scoring each batch under its true classes; the
    per-class thresholds. Only the scores and labels ``(N,)`` are kept (any iterable works).

    Checks as the fit does (labels in range, every
    class present over all ranks, the ranks agreeing on the input shape), and that the
    inputs have the per-sample ``input_shape`` the detector was fitted on (before
    scoring). Inside ``data_parallel`` the scores of every rank are gathered.
    """
    setting = current_data_parallel()

    def run() -> tuple[list[int], tuple[Tensor, Tensor]]:
        scores, labels = [], []
        for batch in _batches(model, loader, specs, progress=progress, desc="calibrate: scores"):
            if batch.labels is None:
                raise ValueError("loader must yield (inputs, labels) pairs to calibrate a detector; "
                                 "got inputs only")
            if batch.input_shape != input_shape:
                raise ValueError(
                    f"loader inputs must have the per-sample shape {input_shape} the detector was "
                    f"fitted on; got {batch.input_shape}"
                )
            if batch.labels.numel():
                low, high = (int(v) for v in torch.aminmax(batch.labels))
                if low < 0 or high >= n_classes:
                    raise ValueError(
                        f"loader labels must be class labels in [0, n_classes) = [0, {n_classes}) (n_classes "
                        f"is the width of the model's output); got label {low if low < 0 else high}"
                    )
            with torch.no_grad():
                scores.append(log_density(batch.states, batch.labels))  # (B,) under the true classes
            labels.append(batch.labels)
        shape = list(input_shape[:_SHAPE_DIMS]) + [0] * (_SHAPE_DIMS - len(input_shape[:_SHAPE_DIMS]))
        row = [n_classes, len(input_shape), int(torch.Size(input_shape).numel()), *shape]
        return row, (torch.cat(scores), torch.cat(labels))

    if setting is None:
        scores, labels = run()[1]
        counts = torch.bincount(labels, minlength=n_classes)
    else:
        (scores, labels), table = setting.exchange(run, 3 + _SHAPE_DIMS, "scoring the calibration data")
        _check_table(table)
        (counts,) = setting.sum_parts(
            lambda: [torch.bincount(labels, minlength=n_classes)], [(n_classes,)],
            torch.int64, labels.device, "counting the samples of each class")
    _check_counts(counts.tolist(), 1, "calibrate")
    if setting is not None:  # one score and one label per sample: exact order statistics
        scores = setting.gather_rows(scores, "gathering the calibration scores")
        labels = setting.gather_rows(labels, "gathering the calibration labels")
    return class_thresholds(scores, labels, n_classes, keep)


def current_rank() -> tuple[int | None, int | None]:
    """``(rank, world_size)`` inside ``data_parallel``, ``(None, None)`` in one process."""
    setting = current_data_parallel()
    return (None, None) if setting is None else (setting.rank, setting.world_size)


def shape_row(n_classes: int, input_shape: tuple[int, ...]) -> list[int]:
    """The ints the ranks compare (:func:`_check_table`): the number of classes and the input shape."""
    shape = list(input_shape[:_SHAPE_DIMS]) + [0] * (_SHAPE_DIMS - len(input_shape[:_SHAPE_DIMS]))
    return [n_classes, len(input_shape), int(torch.Size(input_shape).numel()), *shape]


def agreed_first_pass(run: Callable[[], tuple[list[int], bool, Any]],
                      labels_of: Callable[[Any], tuple[Tensor, int]],
                      min_per_class: int) -> tuple[Any, bool, list[int], Any]:
    """The first pass of a fit, in one process or agreed over the ranks.

    Parameters
    ----------
    run : callable
        ``() -> (row, streamed, payload)``: this rank's pass; ``row`` is :func:`shape_row`,
        ``streamed`` whether its states did not stay in memory.
    labels_of : callable
        ``payload -> (labels (N,), n_classes)``.
    min_per_class : int

    Returns
    -------
    payload, streamed, counts, setting
        ``streamed`` is true if it is on any rank; ``counts`` are the per-class counts of
        every rank; ``setting`` the data-parallel setting (None in one process).

    Raises
    ------
    ValueError
        For a class with fewer than ``min_per_class`` samples, ranks that disagree on the
        input shape or the number of classes; inside ``data_parallel`` what ``run`` raises
        on any rank is raised on every rank.
    """
    setting = current_data_parallel()
    if setting is None:
        _, streamed, payload = run()
        labels, n_classes = labels_of(payload)
        counts = torch.bincount(labels, minlength=n_classes)
    else:
        def flagged() -> tuple[list[int], tuple[bool, Any]]:
            row, flag, out = run()
            return [int(flag), *row], (flag, out)

        (_, payload), table = setting.exchange(flagged, 4 + _SHAPE_DIMS, "collecting the hidden states to fit")
        _check_table([row[1:] for row in table])
        streamed = any(row[0] for row in table)
        labels, n_classes = labels_of(payload)
        (counts,) = setting.sum_parts(
            lambda: [torch.bincount(labels, minlength=n_classes)], [(n_classes,)],
            torch.int64, labels.device, "counting the samples of each class")
    counts = counts.tolist()
    _check_counts(counts, min_per_class, "fit")
    return payload, streamed, counts, setting


def stream_thresholds(batches: Iterable[tuple[dict[str, Tensor], Tensor]],
                      log_density: Callable[[dict[str, Tensor], Tensor], Tensor], n_classes: int,
                      keep: float) -> Tensor:
    """Per-class thresholds from streamed ``(states, labels)`` batches, scored under their
    true classes; only a score and a label per sample are kept (gathered over the ranks
    inside ``data_parallel``)."""
    setting = current_data_parallel()
    guard = setting.guard("scoring its training data") if setting else nullcontext()
    scores, labels = [], []
    with guard, torch.no_grad():
        for states, y in batches:
            scores.append(log_density(states, y))  # (B,) under the true classes
            labels.append(y)
        scores, labels = torch.cat(scores), torch.cat(labels)
    if setting is not None:  # one score and one label per sample: exact order statistics
        scores = setting.gather_rows(scores, "gathering the training scores")
        labels = setting.gather_rows(labels, "gathering the training labels")
    return class_thresholds(scores, labels, n_classes, keep)


def write_once(write: Callable[[], None], what: str) -> None:
    """Run ``write()``; inside ``data_parallel`` on rank 0 only, the other ranks waiting for it
    (and raising if it fails)."""
    setting = current_data_parallel()
    if setting is None:
        write()
        return
    with setting.guard(what):
        if setting.rank == 0:
            write()
