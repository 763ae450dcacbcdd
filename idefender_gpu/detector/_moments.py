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

__all__ = ["COVARIANCE_ESTIMATORS", "ClassMoments", "all_reduce_moments", "batch_moments",
           "gaussian_parameters", "merge_moments", "shrunk_covariances"]

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
    """

    counts: Tensor
    means: Tensor
    scatter: Tensor
    third: Tensor | None = None
    fourth: Tensor | None = None
    pooled: bool = False
    classes: Tensor | None = None

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
                        full(part.third), full(part.fourth), part.pooled)


def _trace(scatter: Tensor) -> Tensor:
    return scatter.sum(-1) if scatter.ndim == 2 else scatter.diagonal(dim1=-2, dim2=-1).sum(-1)


def _times(scatter: Tensor, d: Tensor) -> Tensor:
    """``S d`` per class."""
    return scatter * d if scatter.ndim == 2 else (scatter @ d.unsqueeze(-1)).squeeze(-1)


def _shifted(m: ClassMoments, d: Tensor) -> ClassMoments:
    """``m``'s centred moments about its mean minus ``d (C, D)`` (its count and scatter
    correction are the caller's); the third and fourth moments per the module docstring."""
    if m.third is None:
        return m
    trace = _trace(m.scatter)  # (C,)
    sd = _times(m.scatter, d)  # (C, D)
    d2 = d.square().sum(-1)  # (C,)
    n = m.counts
    third = m.third + trace.unsqueeze(1) * d + 2 * sd + (n * d2).unsqueeze(1) * d
    fourth = (m.fourth + 4 * (d * sd).sum(-1) + 4 * (d * m.third).sum(-1) + 2 * d2 * trace
              + n * d2.square())
    return replace(m, third=third, fourth=fourth)


def _outer(a: Tensor, b: Tensor, diagonal: bool) -> Tensor:
    return a * b if diagonal else a.unsqueeze(-1) * b.unsqueeze(-2)


def merge_moments(total: ClassMoments | None, part: ClassMoments, n_classes: int) -> ClassMoments:
    """Chan et al.'s pairwise merge of a batch's ``part`` into ``total`` (in place; zeros for
    ``n_classes`` classes when None), for the classes in ``part`` only."""
    if total is None:
        total = _zeros_like_totals(part, n_classes)
    present = part.classes  # only the classes of this batch move
    a, b = total.take(present), part
    n = a.counts + b.counts
    frac = (b.counts / n).unsqueeze(1)  # (P, 1), n >= 1 here
    delta = b.means - a.means  # (P, D)
    means = a.means + delta * frac
    weight = (a.counts * b.counts / n).unsqueeze(1)  # (P, 1)
    if a.pooled:
        scatter = a.scatter + b.scatter + (delta * weight).mT @ delta  # (D, D)
    else:
        if not a.diagonal:
            weight = weight.unsqueeze(2)
        scatter = a.scatter + b.scatter + _outer(delta, delta, a.diagonal) * weight
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
    return ClassMoments(counts, means, *parts, pooled=m.pooled)


def shrunk_covariances(m: ClassMoments, estimator: str) -> Tensor:
    """Per-class shrunk covariances ``(C, D, D)`` (``(1 - s) Σ̂ + s tr(Σ̂)/D · I``).

    ``Σ̂ = S / n`` is the maximum-likelihood covariance; the shrinkage ``s`` is
    scikit-learn's: Ledoit-Wolf (``ledoit_wolf_shrinkage``, from ``Σ̂``, ``n`` and the
    fourth moment ``F``) or OAS (from ``Σ̂`` and ``n``). With one feature ``s = 0``.
    """
    n = m.counts  # (C,)
    D = m.means.shape[1]
    emp = m.scatter / n[:, None, None]  # (C, D, D)
    mu = _trace(emp) / D  # (C,)
    frob2 = emp.square().sum((-2, -1))  # (C,) ‖Σ̂‖_F²
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
    s = shrinkage[:, None, None]
    eye = torch.eye(D, dtype=emp.dtype, device=emp.device)
    return (1 - s) * emp + s * mu[:, None, None] * eye


def gaussian_parameters(m: ClassMoments, covariance_type: str, reg_covar: float,
                        estimator: str = "empirical") -> tuple[Tensor, Tensor, Tensor]:
    """``(weights (C, 1), means (C, 1, D), prec_chol)`` of one Gaussian per class.

    'empirical' finishes the statistics as the mixture's M-step does
    (:func:`idefender_gpu.kernels.statistics_to_parameters`: counts floored by ``10 eps``);
    a shrinkage estimator ('full' / 'tied' only) shrinks ``S / n`` first. ``reg_covar`` is
    added to the diagonal after shrinkage.

    Raises
    ------
    NotPSDError
        Via :func:`idefender_gpu.kernels.check_cholesky_info`.
    """
    C, D = m.means.shape
    centres = m.means.unsqueeze(1)  # (C, 1, D)
    if estimator == "empirical":
        second = m.scatter.unsqueeze(1) if covariance_type != "tied" else m.scatter
        nk, means, covariances = kernels.statistics_to_parameters(
            m.counts.unsqueeze(1), torch.zeros_like(centres), second, centres, reg_covar, covariance_type)
    else:
        shrunk = shrunk_covariances(m, estimator)  # (C, D, D)
        shrunk = shrunk + reg_covar * torch.eye(D, dtype=shrunk.dtype, device=shrunk.device)
        means = centres
        nk = m.counts.unsqueeze(1) + 10 * torch.finfo(m.counts.dtype).eps
        covariances = shrunk.unsqueeze(1) if covariance_type == "full" else shrunk
    prec_chol, info = kernels.compute_prec_chol(covariances, covariance_type)
    kernels.check_cholesky_info(info, covariance_type, m.means.dtype)
    weights = nk / nk.sum(1, keepdim=True)  # (C, 1): ones
    return weights, means, prec_chol
