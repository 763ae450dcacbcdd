"""Labelled hidden states of a loader, in one process or data-parallel (private).

Every place where a detector behaves differently inside
:func:`idefender_gpu.distributed.data_parallel` is here, so ``fit``, ``calibrate`` and
``save`` read the same in one process and on many ranks:

* :func:`labelled_states` runs a labelled loader through the model once and checks it
  (labels in range, enough samples of every class). Inside ``data_parallel`` the loader is
  this rank's shard: an error on any rank is raised on every rank, the ranks must agree on
  the per-sample input shape and the number of classes, and the per-class counts are those
  of all ranks. It returns a :class:`LabelledStates`;
* :meth:`LabelledStates.thresholds` scores the states under their true classes and turns
  the scores into per-class thresholds (paper Eq. 5); inside ``data_parallel`` over the
  scores of every rank (exact per-class order statistics);
* :func:`write_once` runs a write on rank 0 only (every rank holds the same detector).

:func:`class_thresholds` is the pure per-class quantile.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from idefender_gpu.distributed import current as current_data_parallel
from idefender_gpu.features import LayerSpec, _collect

__all__ = ["LabelledStates", "class_thresholds", "labelled_states", "write_once"]

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

    def cast(self, dtype: torch.dtype) -> "LabelledStates":
        """The same states in ``dtype``."""
        return dataclasses.replace(self, states={spec: h.to(dtype) for spec, h in self.states.items()})

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


def _check_collected(collected: Any, n_classes: int | None, what: str) -> tuple[list[int], int]:
    """``(row exchanged across ranks, n_classes)`` of one rank's collected states."""
    if collected.labels is None:
        raise ValueError(f"loader must yield (inputs, labels) pairs to {what} a detector; got inputs only")
    if n_classes is None:
        if collected.n_outputs is None:
            raise ValueError(
                "model must return logits of shape (B, n_classes) to be guarded by a detector; "
                "got another output"
            )
        n_classes = collected.n_outputs
    low, high = (int(v) for v in torch.aminmax(collected.labels))
    if low < 0 or high >= n_classes:
        raise ValueError(
            f"loader labels must be class labels in [0, n_classes) = [0, {n_classes}) (n_classes "
            f"is the width of the model's output); got label {low if low < 0 else high}"
        )
    shape = list(collected.input_shape[:_SHAPE_DIMS])
    shape += [0] * (_SHAPE_DIMS - len(shape))
    numel = int(torch.Size(collected.input_shape).numel())
    return [n_classes, len(collected.input_shape), numel, *shape], n_classes


def labelled_states(model: nn.Module, loader: Iterable, specs: Sequence[LayerSpec], *, what: str,
                    n_classes: int | None = None, min_per_class: int = 1, progress: bool | None = None,
                    owner: str = "detector", data_parallel: bool = True) -> LabelledStates:
    """Run a labelled loader through ``model`` once; its checked hidden states.

    Parameters
    ----------
    model : torch.nn.Module
    loader : iterable of (x, y)
        Inside ``data_parallel``, this rank's shard.
    specs : sequence of LayerSpec
    what : {'fit', 'calibrate'}
    n_classes : int, optional
        The number of classes; default the width of the model's output.
    min_per_class : int, default=1
        Samples every class needs (over all ranks).
    progress : bool, optional
    owner : str
        The detector's class name (messages).
    data_parallel : bool, default=True
        Whether ``what`` works inside ``data_parallel``; if not, it raises there before
        reading any data.

    Returns
    -------
    LabelledStates

    Raises
    ------
    ValueError
        For an unlabelled loader, labels outside ``[0, n_classes)``, a model whose output is
        not ``(B, n_classes)``, a class with fewer than ``min_per_class`` samples, or ranks
        that disagree on the input shape or the number of classes.
    NotImplementedError
        Inside ``data_parallel`` when ``data_parallel`` is False.
    """
    setting = current_data_parallel()
    if setting is not None and not data_parallel:
        raise NotImplementedError(
            f"{owner}.{what} is not data-parallel yet: {what} it in one process, "
            "outside idefender_gpu.distributed.data_parallel"
        )

    def collect() -> tuple[list[int], tuple[Any, int]]:
        collected = _collect(model, loader, specs, progress=progress, desc=f"{what}: hidden states")
        row, n_out = _check_collected(collected, n_classes, what)
        return row, (collected, n_out)

    if setting is None:
        collected, n_classes = collect()[1]
        counts = torch.bincount(collected.labels, minlength=n_classes)
    else:
        (collected, n_classes), table = setting.exchange(collect, 3 + _SHAPE_DIMS,
                                                         f"collecting the hidden states to {what}")
        if any(row != table[0] for row in table):
            got = ", ".join(f"{row[0]} classes and per-sample input shape {tuple(row[3:3 + row[1]])}"
                            f" on rank {r}" for r, row in enumerate(table))
            raise ValueError(
                "loader inputs must have the same per-sample shape, and the model the same "
                f"number of classes, on every rank of a data-parallel fit; got {got}"
            )
        (counts,) = setting.sum_parts(
            lambda: [torch.bincount(collected.labels, minlength=n_classes)], [(n_classes,)],
            torch.int64, collected.labels.device, "counting the samples of each class")
    counts = counts.tolist()
    short = [c for c, n in enumerate(counts) if n < min_per_class]
    if short:
        c = short[0]
        raise ValueError(
            f"loader must hold at least {min_per_class} sample(s) of every class to {what} the "
            f"detector; got {counts[c]} of class {c}"
            + (f" ({len(short)} classes short)" if len(short) > 1 else "")
        )
    return LabelledStates(collected.states, collected.labels, n_classes, collected.input_shape,
                          counts, what, setting)


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
