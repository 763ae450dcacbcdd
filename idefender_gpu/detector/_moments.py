"""Per-class moments of hidden states, merged batch by batch; one Gaussian per class (private).

The one-component-per-class fit of :class:`~idefender_gpu.detector.IDefender` is exact in
one pass over the data: per class, the count ``n``, the mean ``μ`` and the centred scatter
``S = Σ (h - μ)(h - μ)ᵀ`` (its diagonal for 'diag' / 'spherical') of every batch are
merged into running totals by Chan et al.'s pairwise update

    ``n = n_a + n_b``, ``δ = μ_b - μ_a``, ``μ = μ_a + δ n_b / n``,
    ``S = S_a + S_b + δ δᵀ n_a n_b / n``,

never through ``E[hhᵀ] - μμᵀ`` (which loses every digit of a small variance far from the
origin in float32). Ledoit-Wolf also needs the centred fourth moment ``F = Σ ‖h - μ‖⁴``,
merged with the third moment ``T = Σ ‖h - μ‖² (h - μ)`` by shifting each part to the merged
mean (with ``d`` the part's mean minus the merged mean):

    ``T' = T + tr(S) d + 2 S d + n ‖d‖² d``,
    ``F' = F + 4 dᵀ S d + 4 d·T + 2 ‖d‖² tr(S) + n ‖d‖⁴``.

Inside ``data_parallel`` the ranks' moments are combined the same way in two all-reduces
(:func:`all_reduce_moments`: the counts and sums give the global means, then each rank's
moments shifted to them are summed). Only the classes present in a batch are updated.

:func:`gaussian_parameters` turns the totals into the fitted tensors of
:class:`~idefender_gpu.detector._densities.ClassMixtures` with ``K = 1``: the empirical
covariance (as the mixture's M-step computes it), or a shrunk one
(:func:`shrunk_covariances`: Ledoit-Wolf or OAS in closed form, batched over classes, as
``sklearn.covariance.LedoitWolf`` / ``OAS`` compute them), then ``reg_covar`` on the
diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from idefender_gpu import kernels
from idefender_gpu.detector._densities import class_tiles

__all__ = ["COVARIANCE_ESTIMATORS", "ClassBuckets", "ClassMoments", "MomentAccumulator", "all_reduce_moments", "batch_moments",
           "gaussian_parameters", "merge_moments", "shrinkage_coefficients", "shrunk_covariances"]

#: ``covariance_estimator`` values of IDefender
COVARIANCE_ESTIMATORS = ("empirical", "ledoit-wolf", "oas")


@dataclass(frozen=True)
class ClassMoments:
    """Per-class count, mean and centred moments of one layer's states.

    Attributes
    ----------
    counts : Tensor of shape (C,)
        In the compute dtype (exact integers).
    means : Tensor of shape (C, D)
    scatter : Tensor of shape (C, D, D), or (C, D) when ``diagonal``, or (D, D) when ``pooled``
        (the sum over classes ``Σ_c S_c``: all a shared covariance needs, ``C`` times smaller)
    third : Tensor of shape (C, D) or None
        ``Σ ‖h - μ‖² (h - μ)`` (Ledoit-Wolf only).
    fourth : Tensor of shape (C,) or None
        ``Σ ‖h - μ‖⁴`` (Ledoit-Wolf only).
    pooled : bool
    classes : Tensor of int64, shape (C,), or None
        The classes the rows are (a batch's moments cover the classes present in it
        only, in increasing order); None: every class, in order (running totals).
    reusable : bool
        Whether :func:`gaussian_parameters` may write the factors into the storage of
        ``scatter`` (running totals made by :func:`merge_moments` or
        :func:`all_reduce_moments`, which belong to the fit): then the fit holds one
        ``(C, D, D)`` buffer, not two, and ``scatter`` is spent.
    """

    counts: Tensor
    means: Tensor
    scatter: Tensor
    third: Tensor | None = None
    fourth: Tensor | None = None
    pooled: bool = False
    classes: Tensor | None = None
    reusable: bool = False

    @property
    def diagonal(self) -> bool:
        return self.scatter.ndim == 2 and not self.pooled

    def take(self, index: Tensor) -> "ClassMoments":
        """The moments of some classes (a pooled scatter is kept whole)."""
        fields = [t if t is None or (i == 2 and self.pooled) else t[index] for i, t in enumerate(self._fields())]
        return ClassMoments(*fields, pooled=self.pooled)

    def _fields(self) -> tuple:
        return (self.counts, self.means, self.scatter, self.third, self.fourth)


def batch_moments(h: Tensor, labels: Tensor, n_classes: int, *, diagonal: bool,
                  higher: bool, pooled: bool = False, memory_budget: int | None = None) -> ClassMoments:
    """The moments of one batch ``h (N, D)`` with ``labels (N,)``, for the classes present.

    The full scatter is a batched ``Σ d dᵀ`` over single-class tiles of the batch (no
    loop over classes or samples), in blocks of tiles whose ``(D, D)`` products fit
    ``memory_budget``, added into the ``(P, D, D)`` result by class (``P`` classes present:
    a batch sorted by class, as ``ImageFolder`` yields it, touches few). One host
    synchronisation (the present classes).
    """
    present = torch.bincount(labels, minlength=n_classes).nonzero().squeeze(1)  # (P,)
    local_of = torch.full((n_classes,), -1, dtype=torch.int64, device=labels.device)
    local_of[present] = torch.arange(present.shape[0], device=labels.device)
    labels = local_of[labels]  # (N,) in [0, P)
    C, D = present.shape[0], h.shape[1]
    counts = torch.bincount(labels, minlength=C).to(h.dtype)  # (P,)
    ref = h[:1]  # (1, D): sums of h - ref, not of h, keep the digits of states far from the origin
    sums = h.new_zeros(C, D).index_add_(0, labels, h - ref)  # (P, D)
    means = ref + sums / counts.unsqueeze(1)
    centred = h - means[labels]  # (N, D)
    if pooled:
        scatter = centred.mT @ centred  # (D, D) = Σ_c S_c
    elif diagonal:
        scatter = h.new_zeros(C, D).index_add_(0, labels, centred.square())
    else:
        tiles = class_tiles(labels, C)
        X = tiles.layout(centred)  # (T, rows, D), zero padding
        scatter = h.new_zeros(C, D, D)
        budget = kernels.default_memory_budget(h.device) if memory_budget is None else int(memory_budget)
        step = max(1, budget // (D * D * h.element_size()))
        for start in range(0, tiles.n_tiles, step):
            block = slice(start, start + step)
            gram = X[block].mT @ X[block]  # (Tb, D, D)
            # through (C, D*D) views: the 3-D index_add_ of PyTorch's CPU build takes a
            # path about 1000x slower on small slices
            scatter.view(C, D * D).index_add_(0, tiles.tile_class[block], gram.reshape(-1, D * D))
    third = fourth = None
    if higher:
        norm2 = centred.square().sum(1)  # (N,)
        third = h.new_zeros(C, D).index_add_(0, labels, norm2.unsqueeze(1) * centred)
        fourth = h.new_zeros(C).index_add_(0, labels, norm2.square())
    return ClassMoments(counts, means, scatter, third, fourth, pooled, present)


def _zeros_like_totals(part: ClassMoments, n_classes: int) -> ClassMoments:
    """All-zero running totals for ``n_classes`` classes, shaped like ``part``'s moments."""
    def full(t: Tensor | None, pooled_field: bool = False) -> Tensor | None:
        if t is None:
            return None
        return t.new_zeros(t.shape) if pooled_field else t.new_zeros(n_classes, *t.shape[1:])

    return ClassMoments(full(part.counts), full(part.means), full(part.scatter, part.pooled),
                        full(part.third), full(part.fourth), part.pooled, reusable=True)


def _trace(scatter: Tensor) -> Tensor:
    return scatter.sum(-1) if scatter.ndim == 2 else scatter.diagonal(dim1=-2, dim2=-1).sum(-1)


def _times(scatter: Tensor, d: Tensor) -> Tensor:
    """``S d`` per class."""
    return scatter * d if scatter.ndim == 2 else (scatter @ d.unsqueeze(-1)).squeeze(-1)


def _shift_higher(n: Tensor, third: Tensor, fourth: Tensor, trace: Tensor, sd: Tensor,
                  d: Tensor) -> tuple[Tensor, Tensor]:
    """The third and fourth moments about the mean minus ``d (C, D)``, from the counts
    ``n``, ``tr(S)`` and ``S d`` (the formulas of the module docstring)."""
    d2 = d.square().sum(-1)  # (C,)
    shifted_third = third + trace.unsqueeze(1) * d + 2 * sd + (n * d2).unsqueeze(1) * d
    shifted_fourth = (fourth + 4 * (d * sd).sum(-1) + 4 * (d * third).sum(-1) + 2 * d2 * trace
                      + n * d2.square())
    return shifted_third, shifted_fourth


def _shifted(m: ClassMoments, d: Tensor) -> ClassMoments:
    """``m``'s centred moments about its mean minus ``d (C, D)`` (its count and scatter
    correction are the caller's); the third and fourth moments per the module docstring."""
    if m.third is None:
        return m
    third, fourth = _shift_higher(m.counts, m.third, m.fourth, _trace(m.scatter),
                                  _times(m.scatter, d), d)
    return replace(m, third=third, fourth=fourth)


def _outer(a: Tensor, b: Tensor, diagonal: bool) -> Tensor:
    return a * b if diagonal else a.unsqueeze(-1) * b.unsqueeze(-2)


def _row_blocks(n_rows: int, bytes_per_row: int, memory_budget: int | None,
                device: torch.device) -> list[slice]:
    """Blocks of rows (classes) whose ``bytes_per_row`` temporaries fit ``memory_budget``
    (the device's default budget when None; at least one row per block)."""
    budget = kernels.default_memory_budget(device) if memory_budget is None else int(memory_budget)
    step = max(1, budget // max(1, bytes_per_row))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _matrix_bytes(scatter: Tensor) -> int:
    """Bytes of one class's ``(D, D)`` matrix of ``scatter (C, D, D)``."""
    return scatter.shape[-1] ** 2 * scatter.element_size()


def _rows_trace_times(scatter: Tensor, rows: Tensor, d: Tensor,
                      memory_budget: int | None = None) -> tuple[Tensor, Tensor]:
    """``tr(S_c)`` and ``S_c d_c`` for the classes ``rows (P,)`` of a full ``scatter
    (C, D, D)``, gathering blocks of classes (never a ``(P, D, D)`` copy): ``(P,)``, ``(P, D)``."""
    trace, times = d.new_empty(d.shape[0]), d.new_empty(d.shape)
    for block in _row_blocks(rows.shape[0], _matrix_bytes(scatter), memory_budget, scatter.device):
        gathered = scatter[rows[block]]  # (Pb, D, D)
        trace[block], times[block] = _trace(gathered), _times(gathered, d[block])
    return trace, times


def merge_moments(total: ClassMoments | None, part: ClassMoments, n_classes: int,
                  memory_budget: int | None = None) -> ClassMoments:
    """Chan et al.'s pairwise merge of a batch's ``part`` into ``total`` (in place; zeros for
    ``n_classes`` classes when None), for the classes in ``part`` only.

    A full ``(C, D, D)`` scatter is updated in place, in blocks of the present classes whose
    ``(D, D)`` temporaries fit ``memory_budget`` (a batch of a shuffled loader touches almost
    every class: no ``(P, D, D)`` copy of the totals), adding ``S_b`` and then the
    correction ``δ δᵀ n_a n_b / n``, in the order of the formula.
    """
    if total is None:
        total = _zeros_like_totals(part, n_classes)
    present = part.classes  # only the classes of this batch move
    if total.pooled or total.diagonal:
        return _merge_small(total, part, present)
    b = part
    a_counts, a_means = total.counts[present], total.means[present]  # (P,), (P, D)
    n = a_counts + b.counts
    frac = (b.counts / n).unsqueeze(1)  # (P, 1), n >= 1 here
    delta = b.means - a_means  # (P, D)
    means = a_means + delta * frac
    weight = (a_counts * b.counts / n).unsqueeze(1)  # (P, 1)
    third = fourth = None
    if total.third is not None:  # from the scatter of a before it is updated
        d_a, d_b = a_means - means, b.means - means
        trace_a, sd_a = _rows_trace_times(total.scatter, present, d_a, memory_budget)  # (P,), (P, D)
        third_a, fourth_a = _shift_higher(a_counts, total.third[present], total.fourth[present],
                                          trace_a, sd_a, d_a)
        third_b, fourth_b = _shift_higher(b.counts, b.third, b.fourth, _trace(b.scatter),
                                          _times(b.scatter, d_b), d_b)
        third, fourth = third_a + third_b, fourth_a + fourth_b
    C, D = total.means.shape
    flat = total.scatter.view(C, D * D)  # 2-D index_add_: the 3-D one is slow on CPU
    for block in _row_blocks(present.shape[0], 2 * _matrix_bytes(b.scatter), memory_budget,
                             b.scatter.device):
        rows = present[block]
        flat.index_add_(0, rows, b.scatter[block].reshape(-1, D * D))  # S_a + S_b
        correction = _outer(delta[block], delta[block], False) * weight[block].unsqueeze(2)
        flat.index_add_(0, rows, correction.reshape(-1, D * D))  # + δ δᵀ n_a n_b / n
    for old, new in ((total.counts, n), (total.means, means), (total.third, third),
                     (total.fourth, fourth)):
        if old is not None:
            old.view(old.shape[0], -1).index_copy_(0, present, new.reshape(new.shape[0], -1))
    return total


def _merge_small(total: ClassMoments, part: ClassMoments, present: Tensor) -> ClassMoments:
    """:func:`merge_moments` for a pooled ``(D, D)`` or a diagonal ``(C, D)`` scatter (the
    copies of the present classes' moments are small)."""
    a, b = total.take(present), part
    n = a.counts + b.counts
    frac = (b.counts / n).unsqueeze(1)  # (P, 1), n >= 1 here
    delta = b.means - a.means  # (P, D)
    means = a.means + delta * frac
    weight = (a.counts * b.counts / n).unsqueeze(1)  # (P, 1)
    if a.pooled:
        scatter = a.scatter + b.scatter + (delta * weight).mT @ delta  # (D, D)
    else:
        scatter = a.scatter + b.scatter + _outer(delta, delta, True) * weight
    third = fourth = None
    if a.third is not None:
        sa, sb = _shifted(a, a.means - means), _shifted(b, b.means - means)
        third, fourth = sa.third + sb.third, sa.fourth + sb.fourth
    merged = ClassMoments(n, means, scatter, third, fourth, a.pooled)
    for index, (old, new) in enumerate(zip(total._fields(), merged._fields())):
        if index == 2 and a.pooled:
            old.copy_(new)
        elif old is not None:  # in place (the totals belong to the fit), through 2-D views
            old.view(old.shape[0], -1).index_copy_(0, present, new.reshape(new.shape[0], -1))
    return total


class ClassBuckets:
    """Rows of aligned ``(N, D_i)`` tensors held per class until ``rows`` of a class are there.

    ``add(tensors, labels)`` returns the groups of rows ready now, ``(tensors, labels)`` of
    whole classes (the rows held for them, then this batch's), and keeps the other rows in
    ``(C, rows, D_i)`` buckets; ``drain()`` returns what is held. Each group has at most
    ``max_classes`` classes (None: no limit). Work whose cost per class is ``D²`` whatever
    its rows (a scatter merged, a factor read to score) then meets at least ``rows`` rows a
    class, however the loader orders its samples: a shuffled batch of 4096 among 1000
    classes holds 4 rows a class, a sorted one (``ImageFolder``'s order) passes straight
    through.
    """

    def __init__(self, n_classes: int, rows: int, max_classes: int | None = None) -> None:
        self.n_classes, self.rows, self.max_classes = n_classes, rows, max_classes
        self._bucket: dict[str, Tensor] | None = None  # name -> (C, rows, D_i)
        self._fill: Tensor | None = None  # (C,) rows held per class

    def _groups(self, classes: Tensor) -> list[Tensor]:
        """``classes (C,)`` (bool) as masks of at most ``max_classes`` classes each."""
        if self.max_classes is None:
            return [classes]
        present = classes.nonzero().squeeze(1)  # (P,)
        if present.shape[0] <= self.max_classes:
            return [classes]
        groups = []
        for start in range(0, present.shape[0], self.max_classes):
            mask = torch.zeros_like(classes)
            mask[present[start:start + self.max_classes]] = True
            groups.append(mask)
        return groups

    def _held(self, which: Tensor, tensors: dict[str, Tensor] | None = None,
              take: Tensor | None = None, labels: Tensor | None = None) -> list[tuple[dict[str, Tensor], Tensor]]:
        """Groups of the rows held for the classes ``which (C,)``, with the rows ``take`` of
        ``tensors`` (labels ``labels``) of those classes after them."""
        C, rows, fill = self.n_classes, self.rows, self._fill
        used = torch.arange(rows, device=fill.device) < fill.unsqueeze(1)  # (C, rows) rows in use
        classes = torch.arange(C, device=fill.device).unsqueeze(1).expand(C, rows)  # (C, rows)
        out = []
        for group in self._groups(which):
            slots = used & group.unsqueeze(1)
            parts = {k: b[slots] for k, b in self._bucket.items()}
            group_labels = classes[slots]
            if tensors is not None:
                mine = take & group[labels]
                parts = {k: torch.cat([parts[k], t[mine]]) for k, t in tensors.items()}
                group_labels = torch.cat([group_labels, labels[mine]])
            out.append((parts, group_labels))
        return out

    def add(self, tensors: dict[str, Tensor], labels: Tensor) -> list[tuple[dict[str, Tensor], Tensor]]:
        """Take one batch (``tensors`` of ``(N, D_i)``, ``labels (N,)`` int64 in range)."""
        C = self.n_classes
        if self._bucket is None:
            self._bucket = {k: t.new_empty(C, self.rows, t.shape[1]) for k, t in tensors.items()}
            self._fill = torch.zeros(C, dtype=torch.int64, device=labels.device)
        fill = self._fill
        counts = torch.bincount(labels, minlength=C)  # (C,)
        ready = (fill + counts) >= self.rows  # (C,) these classes go now, with what is held
        go = ready[labels]  # (N,)
        out = self._held(ready, tensors, go, labels) if bool(go.any()) else []
        if out:
            fill[ready] = 0
        keep = ~go
        if bool(keep.any()):  # the other rows join their class's bucket
            kept = labels[keep]  # (M,)
            staying = counts * ~ready  # (C,)
            order = torch.argsort(kept, stable=True)
            first = torch.cumsum(staying, 0) - staying  # (C,) rank of a class's first kept row
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.shape[0], device=labels.device) - first[kept[order]]
            for k, t in tensors.items():
                self._bucket[k][kept, fill[kept] + rank] = t[keep]
            fill += staying
        return out

    def drain(self) -> list[tuple[dict[str, Tensor], Tensor]]:
        """The groups of every row still held (then none is)."""
        if self._bucket is None or not bool((self._fill > 0).any()):
            return []
        out = self._held(self._fill > 0)
        self._fill.zero_()
        return out


class MomentAccumulator:
    """The running per-class moments of a stream of ``(h (N, D), labels (N,))`` batches.

    ``add`` then ``result()`` is ``merge_moments(total, batch_moments(h, labels, ...))`` over
    the batches, to round-off. With full scatters the states go through
    :class:`ClassBuckets` of ``rows`` rows (``(C, rows, D)``, ``rows / D`` of the
    parameters' size): every merge then costs a ``(D, D)`` update for at least ``rows``
    states, where merging each batch of a shuffled loader would cost ``C D²`` per batch for
    ``B D²`` of products. The classes merged at once are limited so that one merge's
    ``(P, D, D)`` batch scatter stays under ``merge_bytes`` (default 256 MiB, or
    ``memory_budget`` if larger): the buckets of a shuffled loader fill together. Diagonal
    and pooled scatters are merged batch by batch (their merges cost ``C D`` or ``D²``).
    """

    def __init__(self, n_classes: int, *, diagonal: bool, higher: bool, pooled: bool = False,
                 memory_budget: int | None = None, rows: int | None = None,
                 merge_bytes: int | None = None) -> None:
        self.n_classes, self.diagonal, self.higher, self.pooled = n_classes, diagonal, higher, pooled
        self.memory_budget, self.rows = memory_budget, rows
        self.merge_bytes = max(256 * 2**20, memory_budget or 0) if merge_bytes is None else merge_bytes
        self.total: ClassMoments | None = None
        self._buckets: ClassBuckets | None = None

    def _merge(self, h: Tensor, labels: Tensor) -> None:
        part = batch_moments(h, labels, self.n_classes, diagonal=self.diagonal, higher=self.higher,
                             pooled=self.pooled, memory_budget=self.memory_budget)
        self.total = merge_moments(self.total, part, self.n_classes, self.memory_budget)

    def add(self, h: Tensor, labels: Tensor) -> None:
        """Take one batch ``h (N, D)``, ``labels (N,)`` (int64 in ``[0, n_classes)``)."""
        if labels.numel() == 0:
            if self.total is None:  # zero totals of the right shape, as a merge of nothing gives
                self._merge(h, labels)
            return
        if self.diagonal or self.pooled:
            self._merge(h, labels)
            return
        if self._buckets is None:
            D = h.shape[1]
            rows = self.rows if self.rows is not None else min(64, max(1, D // 4))
            self._buckets = ClassBuckets(self.n_classes, rows,
                                         max(1, self.merge_bytes // (D * D * h.element_size())))
        for parts, group_labels in self._buckets.add({"h": h}, labels):
            self._merge(parts["h"], group_labels)

    def result(self) -> ClassMoments:
        """The moments of every batch added (the buckets merged first); running totals."""
        if self._buckets is not None:
            for parts, group_labels in self._buckets.drain():
                self._merge(parts["h"], group_labels)
            self._buckets = None
        if self.total is None:
            raise ValueError("no states were added")
        return self.total


def all_reduce_moments(setting: Any, m: ClassMoments, what: str) -> ClassMoments:
    """The moments of every rank's data, the same on every rank (two flat all-reduces).

    First the counts and sums (the global means), then each rank's scatter and higher
    moments shifted to the global means, summed.
    """
    C, D = m.means.shape
    dtype, device = m.means.dtype, m.means.device
    counts, sums = setting.sum_parts(lambda: [m.counts, m.means * m.counts.unsqueeze(1)],
                                     [(C,), (C, D)], dtype, device, f"{what} (counts and means)")
    means = sums / counts.clamp_min(1).unsqueeze(1)

    def shifted() -> list[Tensor]:
        d = m.means - means  # (C, D); absent classes have zero count and contribute nothing
        weight = m.counts.unsqueeze(1)
        if m.pooled:
            scatter = m.scatter + (d * weight).mT @ d
        else:
            scatter = m.scatter + _outer(d, d, m.diagonal) * (weight if m.diagonal else weight.unsqueeze(2))
        parts = [scatter]
        if m.third is not None:
            s = _shifted(m, d)
            parts += [s.third, s.fourth]
        return parts

    shapes = [tuple(m.scatter.shape)] + ([(C, D), (C,)] if m.third is not None else [])
    parts = setting.sum_parts(shifted, shapes, dtype, device, f"{what} (centred moments)")
    return ClassMoments(counts, means, *parts, pooled=m.pooled, reusable=True)


def shrinkage_coefficients(m: ClassMoments, estimator: str,
                           memory_budget: int | None = None) -> tuple[Tensor, Tensor]:
    """Per class, the shrinkage ``s (C,)`` and the target scale ``tr(Σ̂)/D (C,)`` of
    :func:`shrunk_covariances`, read from a full scatter in blocks of classes (no
    ``(C, D, D)`` temporary)."""
    n = m.counts  # (C,)
    C, D = m.means.shape
    mu, frob2 = n.new_empty(C), n.new_empty(C)  # (C,) tr(Σ̂)/D and ‖Σ̂‖_F²
    for block in _row_blocks(C, 2 * _matrix_bytes(m.scatter), memory_budget, m.scatter.device):
        emp = m.scatter[block] / n[block, None, None]  # (Cb, D, D) Σ̂
        mu[block] = _trace(emp) / D
        frob2[block] = emp.square().sum((-2, -1))
    if estimator == "ledoit-wolf":
        beta = (m.fourth / n - frob2) / (D * n)
        delta = (frob2 - D * mu.square()) / D
        beta = torch.minimum(beta, delta)
        shrinkage = torch.where(beta == 0, torch.zeros_like(beta), beta / delta)
    elif estimator == "oas":
        alpha = frob2 / D ** 2
        num = alpha + mu.square()
        den = (n + 1) * (alpha - mu.square() / D)
        shrinkage = torch.where(den == 0, torch.ones_like(den), torch.clamp(num / den, max=1.0))
    else:
        raise ValueError(f"covariance_estimator must be one of {COVARIANCE_ESTIMATORS}; got {estimator!r}")
    if D == 1:
        shrinkage = torch.zeros_like(shrinkage)
    return shrinkage, mu


def _shrink_block(scatter: Tensor, n: Tensor, shrinkage: Tensor, mu: Tensor) -> Tensor:
    """``(1 - s) S / n + s μ I`` of a block of classes: ``(Cb, D, D)``, a new tensor."""
    out = (scatter / n[:, None, None]).mul_((1 - shrinkage)[:, None, None])  # (Cb, D, D)
    out.diagonal(dim1=-2, dim2=-1).add_((shrinkage * mu)[:, None])
    return out


def shrunk_covariances(m: ClassMoments, estimator: str) -> Tensor:
    """Per-class shrunk covariances ``(C, D, D)`` (``(1 - s) Σ̂ + s tr(Σ̂)/D · I``).

    ``Σ̂ = S / n`` is the maximum-likelihood covariance; the shrinkage ``s`` is
    scikit-learn's: Ledoit-Wolf (``ledoit_wolf_shrinkage``, from ``Σ̂``, ``n`` and the
    fourth moment ``F``) or OAS (from ``Σ̂`` and ``n``). With one feature ``s = 0``.
    """
    shrinkage, mu = shrinkage_coefficients(m, estimator)
    return _shrink_block(m.scatter, m.counts, shrinkage, mu)


def gaussian_parameters(m: ClassMoments, covariance_type: str, reg_covar: float,
                        estimator: str = "empirical", *, out: Tensor | None = None,
                        memory_budget: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights (C, 1), means (C, 1, D), prec_chol)`` of one Gaussian per class.

    'empirical' finishes the statistics as the mixture's M-step does
    (:func:`idefender_gpu.kernels.statistics_to_parameters`: counts floored by ``10 eps``,
    the same numbers); a shrinkage estimator ('full' / 'tied' only) shrinks ``S / n``
    first. ``reg_covar`` is added to the diagonal after shrinkage.

    Full and tied factors are made in blocks of classes whose ``(D, D)`` temporaries (the
    covariance, its Cholesky factor, the factor's inverse) fit ``memory_budget`` (the
    device's default when None): at 1000 classes of 1024 features the ``(C, D, D)`` result
    (4.2 GB in float32) is the only full-size allocation, and there is none when the
    factors overwrite the scatter (``out``).

    Parameters
    ----------
    m : ClassMoments
        Merged totals (every class, in order).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float
    estimator : {'empirical', 'ledoit-wolf', 'oas'}
    out : Tensor, optional
        Where the full / tied factors are written, block by block: ``(C, 1, D, D)`` for
        'full', ``(C, D, D)`` for 'tied', any device (a storage device) and the factors'
        dtype. It may be ``m.scatter`` itself (viewed as ``(C, 1, D, D)`` for 'full'): the
        scatter of each block is read before its factor overwrites it, so the fit then
        needs no second ``(C, D, D)`` buffer, and ``m.scatter`` is spent (whether or not
        this raises). Default: ``m.scatter`` when ``m.reusable`` (running totals), else a
        new tensor. Ignored for 'diag' / 'spherical'.
    memory_budget : int, optional
        Bytes for one block's temporaries.

    Raises
    ------
    NotPSDError
        Via :func:`idefender_gpu.kernels.check_cholesky_info`.
    """
    C, D = m.means.shape
    centres = m.means.unsqueeze(1)  # (C, 1, D)
    nk = m.counts.unsqueeze(1) + 10 * torch.finfo(m.counts.dtype).eps  # (C, 1)
    weights = nk / nk.sum(1, keepdim=True)  # (C, 1): ones
    if covariance_type in ("diag", "spherical"):  # (C, D) moments: no blocks needed
        nk, means, covariances = kernels.statistics_to_parameters(
            m.counts.unsqueeze(1), torch.zeros_like(centres), m.scatter.unsqueeze(1), centres,
            reg_covar, covariance_type)
        prec_chol, info = kernels.compute_prec_chol(covariances, covariance_type)
        kernels.check_cholesky_info(info, covariance_type, m.means.dtype)
        return weights, means, prec_chol
    shape = (C, 1, D, D) if covariance_type == "full" else (C, D, D)
    if out is None:
        out = m.scatter.view(shape) if m.reusable else m.scatter.new_empty(shape)
    elif tuple(out.shape) != shape:
        out = out.view(shape)  # m.scatter (C, D, D) as the (C, 1, D, D) of 'full'
    shrink = None if estimator == "empirical" else shrinkage_coefficients(m, estimator, memory_budget)
    infos = []
    for block in _row_blocks(C, 3 * _matrix_bytes(m.scatter), memory_budget, m.scatter.device):
        if shrink is None:
            # statistics_to_parameters' full covariance S / nk - δ δᵀ with δ = 0 / nk = 0
            cov = m.scatter[block] / nk[block, :, None]  # (Cb, D, D)
        else:
            cov = _shrink_block(m.scatter[block], m.counts[block], shrink[0][block], shrink[1][block])
        cov.diagonal(dim1=-2, dim2=-1).add_(reg_covar)
        if covariance_type == "full":
            cov = cov.unsqueeze(1)  # (Cb, 1, D, D)
        factor, info = kernels.compute_prec_chol(cov, covariance_type)
        del cov
        out[block].copy_(factor)
        infos.append(info)
    kernels.check_cholesky_info(torch.cat(infos), covariance_type, m.means.dtype)
    return weights, centres, out
