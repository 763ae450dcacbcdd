"""Dense backend: one fused E+M pass over the samples, chunk by chunk (private).

:func:`em_pass` is one EM iteration's work on ``X (G, N, D)``: for each chunk of ``c``
rows it computes the component log-densities (the centred GEMMs of :mod:`._dense`), the
log-sum-exp, the responsibilities and the chunk's sufficient statistics, and adds them
to totals; the next chunk reuses the same buffers. No ``(G, N, K)`` tensor is formed:
the largest intermediate is one chunk's ``(G, c, K*D)`` (full) or ``(G, c, K)``, sized
to the cache by :func:`~._chunks.pass_rows`.

The totals are those of :func:`~._dense.shifted_statistics` centred on ``centres`` (by
default the current means), plus ``Σ_n w_n log p(x_n)`` per group, so
:func:`~._dense.statistics_to_parameters` turns them into the new parameters exactly as
for a streamed or data-parallel fit, and they add up across batches and ranks.

How each covariance type gets its statistics from the chunk (``x̃ = x - c̄``, ``s̃ = s -
c̄`` for the statistics' centres ``s_k``, centred on their mean ``c̄`` before any product,
as in the E-step):

* full: ``counts = Σ r``, ``first = Σ r x̃ - counts s̃`` (one GEMM), ``second = Σ r (x -
  s_k)(x - s_k)ᵀ`` as the Gram matrix of ``√r (x̃ - s̃_k)`` (one batched GEMM: centred
  on each component's centre);
* diag / spherical: one GEMM ``[x̃², x̃, 1]ᵀ r`` (the E-step's own ``[x̃², x̃, 1]``
  buffer) gives ``Σ r x̃²``, ``Σ r x̃`` and the counts; re-centred on the centres
  at the end, ``second = Σ r x̃² - 2 s̃ Σ r x̃ + counts s̃²``: the shifted-data algorithm
  of :func:`~._dense._covariances_diag`, cancelling only the spread of the means about
  ``c̄`` (no ``(G, c, K, D)`` work);
* tied: ``first`` as for full, ``second = Σ_n w_n x̃ x̃ᵀ`` with ``w_n = Σ_k r_nk``.

Runs without autograd (in-place work on buffers). No host synchronisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._chunks import _chunks, pass_rows
from ._dense import _add_gram, _group_centre
from ._linalg import LOG_2PI, log_det_prec_chol

__all__ = ["em_pass", "pass_bytes_per_row"]


def pass_bytes_per_row(covariance_type: str, G: int, K: int, D: int, itemsize: int) -> int:
    """Bytes of the buffers of :func:`em_pass` per row of a chunk (all G groups).

    full: the GEMM output ``(K*D)`` and the centred rows per component ``(K*D)``, plus
    ``K + D + 1``; tied: ``K*D + 2D + K``; diag/spherical: ``K + 2D + 1``.
    """
    per_group = {
        "full": 2 * K * D + K + D + 1,
        "tied": K * D + 2 * D + K,
        "diag": K + 2 * D + 1,
        "spherical": K + 2 * D + 1,
    }[covariance_type]
    return G * per_group * itemsize


def _view(buffer: Tensor, *shape: int) -> Tensor:
    """A contiguous view of the first ``prod(shape)`` elements of a flat ``buffer``."""
    n = 1
    for s in shape:
        n *= s
    return buffer[:n].view(shape)


def _bmm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out = a @ b`` over a leading batch axis; one 2-D GEMM when it has one element
    (PyTorch's CPU ``bmm`` is about 30% slower than ``mm`` for these thin shapes)."""
    if a.shape[0] == 1:
        torch.mm(a[0], b[0], out=out[0])
        return out
    return torch.bmm(a, b, out=out)


def _sum_of_squares(rows: Tensor, ones: Tensor, out: Tensor) -> None:
    """``out (M, 1) = Σ_d rows[:, d]²`` for ``rows (M, D)``, squared in place: the sum as
    a GEMM with ``ones (D, 1)`` (2x faster on CPU than ``sum(-1)`` over a short last axis)."""
    torch.mul(rows, rows, out=rows)
    torch.mm(rows, ones, out=out)


class _Pass:
    """The buffers and the per-chunk steps of one :func:`em_pass` (one covariance type)."""

    def __init__(self, X: Tensor, log_weights: Tensor, means: Tensor, prec_chol: Tensor,
                 covariance_type: str, rows: int, centres: Tensor) -> None:
        G, K, D = means.shape
        self.G, self.K, self.D, self.ctype = G, K, D, covariance_type
        self.centre = _group_centre(centres, False)  # (G, 1, D)
        self.mu = means - self.centre  # (G, K, D), centred means
        # the centres of the statistics, centred (the same tensor when they are the means)
        self.shift = self.mu if centres is means else centres - self.centre  # (G, K, D)
        log_det = log_det_prec_chol(prec_chol, covariance_type, D)  # (G, K) or (G,)
        if covariance_type == "tied":
            log_det = log_det.unsqueeze(-1)  # (G, 1)
        # log w_k + log det P_k - D/2 log 2π, added to -maha/2
        self.bias = (log_weights + log_det - 0.5 * D * LOG_2PI).unsqueeze(-2)  # (G, 1, K)
        new = X.new_empty
        self.log_prob = new(G * rows * K)  # (G, c, K) per chunk, flat
        if covariance_type in ("diag", "spherical"):
            self.x_aug = new(G * rows * (2 * D + 1))  # [x̃², x̃, 1]
            # [x̃², x̃, 1]ᵀ r: this orientation of the product is about 2x faster than
            # rᵀ [x̃², x̃, 1] on CPU (MKL, K >> D); added to the totals from a small buffer
            self.moments = X.new_zeros(G, 2 * D + 1, K)
            self.chunk_moments = X.new_empty(G, 2 * D + 1, K)
            prec = prec_chol.square()  # (G, K, D) or (G, K)
            if covariance_type == "diag":
                self.weights = torch.cat([prec.mT, -2 * (self.mu * prec).mT,  # (G, 2D+1, K)
                                          (self.mu.square() * prec).sum(-1).unsqueeze(-2)], dim=-2)
            else:
                self.prec = prec.unsqueeze(-2)  # (G, 1, K)
                self.weights = torch.cat([X.new_ones(G, D, K), -2 * self.mu.mT,  # (G, 2D+1, K)
                                          self.mu.square().sum(-1).unsqueeze(-2)], dim=-2)
            return
        self.counts = X.new_zeros(G, K)
        self.first = X.new_zeros(G, K, D)  # Σ r x̃
        self.ones = X.new_ones(D, 1)
        if covariance_type == "full":
            self.x_aug = new(G * rows * (D + 1))  # [x̃, 1]
            self.y = new(G * rows * K * D)  # (G, c, K*D)
            mu_prec = (self.mu.unsqueeze(-2) @ prec_chol).squeeze(-2)  # (G, K, D)
            wide = prec_chol.permute(0, 2, 1, 3).reshape(G, D, K * D)  # (G, D, K*D)
            self.prec_wide = torch.cat([wide, -mu_prec.reshape(G, 1, K * D)], dim=1)  # (G, D+1, K*D)
            self.second = X.new_zeros(G, K, D, D)
            self.sqrt_resp = new(G * rows * K)  # (G, c, K)
        else:  # tied
            self.x_aug = new(G * rows * D)  # x̃
            self.y = new(G * rows * K * D)  # (G, c, K, D)
            self.yc = new(G * rows * D)  # x̃ P
            self.prec_chol = prec_chol  # (G, D, D)
            self.mu_prec = (self.mu @ prec_chol).unsqueeze(-3)  # (G, 1, K, D)
            self.second = X.new_zeros(G, D, D)

    # -- E-step of one chunk: the squared Mahalanobis distances (G, c, K) ------------------

    def maha(self, X: Tensor) -> Tensor:
        G, K, D = self.G, self.K, self.D
        c = X.shape[1]
        out = _view(self.log_prob, G, c, K)
        if self.ctype == "full":
            x_aug = _view(self.x_aug, G, c, D + 1)
            torch.sub(X, self.centre, out=x_aug[..., :D])
            x_aug[..., D] = 1
            y = _view(self.y, G, c, K * D)
            _bmm(x_aug, self.prec_wide, y)
            _sum_of_squares(y.view(G * c * K, D), self.ones, out.view(G * c * K, 1))
        elif self.ctype == "tied":
            xc = _view(self.x_aug, G, c, D)
            torch.sub(X, self.centre, out=xc)
            yc = _bmm(xc, self.prec_chol, _view(self.yc, G, c, D))
            diff = torch.sub(yc.unsqueeze(-2), self.mu_prec, out=_view(self.y, G, c, K, D))
            _sum_of_squares(diff.view(G * c * K, D), self.ones, out.view(G * c * K, 1))
        else:
            x_aug = _view(self.x_aug, G, c, 2 * D + 1)
            torch.sub(X, self.centre, out=x_aug[..., D:2 * D])
            torch.square(x_aug[..., D:2 * D], out=x_aug[..., :D])
            x_aug[..., 2 * D] = 1
            _bmm(x_aug, self.weights, out).clamp_min_(0)
            if self.ctype == "spherical":
                out.mul_(self.prec)
        return out

    # -- M-step sums of one chunk ---------------------------------------------------------

    def accumulate(self, resp: Tensor) -> None:
        """Add the chunk's statistics; ``resp (G, c, K)`` (zero rows for padding)."""
        G, K, D = self.G, self.K, self.D
        c = resp.shape[1]
        if self.ctype in ("diag", "spherical"):
            x_aug = _view(self.x_aug, G, c, 2 * D + 1)
            self.moments.add_(_bmm(x_aug.mT, resp, self.chunk_moments))
            return
        self.counts.add_(resp.sum(-2))
        if self.ctype == "full":
            xc = _view(self.x_aug, G, c, D + 1)[..., :D]  # (G, c, D)
            self.first.baddbmm_(resp.mT, xc)
            scaled = torch.sub(xc.unsqueeze(1), self.shift.unsqueeze(2),  # (G, K, c, D)
                               out=_view(self.y, G, K, c, D))
            sqrt_resp = torch.sqrt(resp, out=_view(self.sqrt_resp, G, c, K))
            scaled.mul_(sqrt_resp.mT.unsqueeze(-1))
            _add_gram(self.second, scaled)
        else:
            xc = _view(self.x_aug, G, c, D)
            self.first.baddbmm_(resp.mT, xc)
            scaled = torch.mul(xc, resp.sum(-1, keepdim=True).sqrt_(), out=_view(self.yc, G, c, D))
            self.second.baddbmm_(scaled.mT, scaled)

    def totals(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(counts, first, second)`` centred on the centres (tied: on ``c̄``)."""
        D, shift = self.D, self.shift
        if self.ctype in ("diag", "spherical"):
            moments = self.moments.mT  # (G, K, 2D+1)
            sq, lin, counts = moments[..., :D], moments[..., D:2 * D], moments[..., 2 * D]
            first = lin - counts.unsqueeze(-1) * shift  # (G, K, D)
            second = sq - 2 * shift * lin + counts.unsqueeze(-1) * shift.square()
            return counts.contiguous(), first, second.contiguous()
        first = self.first - self.counts.unsqueeze(-1) * shift
        return self.counts, first, self.second


@torch.no_grad()
def em_pass(
    X: Tensor,
    log_weights: Tensor,
    means: Tensor,
    prec_chol: Tensor,
    covariance_type: str,
    *,
    sample_weight: Tensor | None = None,
    memory_budget: int | None = None,
    rows: int | None = None,
    centres: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One EM pass: log-likelihood sums and sufficient statistics, chunk by chunk.

    Parameters
    ----------
    X : Tensor
        ``(G, N, D)`` samples (padding rows finite).
    log_weights : Tensor
        ``(G, K)``.
    means : Tensor
        ``(G, K, D)``, the current means.
    prec_chol : Tensor
        Shape per ``covariance_type`` (see :mod:`._linalg`), leading G.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    sample_weight : Tensor, optional
        ``(G, N)``, one for samples and zero for padding.
    memory_budget : int, optional
        Bytes for one chunk's buffers (:func:`pass_bytes_per_row` per row); by default
        :func:`~._chunks.pass_rows` sizes chunks to the cache (CPU).
    rows : int, optional
        Rows per chunk, overriding ``memory_budget``.
    centres : Tensor, optional
        ``(G, K, D)``, where the statistics are centred (default: ``means``; the EM loop
        keeps them while the means move little, see ``mixture._core.sticky_centres``).
        The samples are centred on their mean ``c̄`` per group before every product.

    Returns
    -------
    log_lik : Tensor
        ``(G,)``, ``Σ_n w_n log p(x_n)``.
    counts, first, second : Tensor
        The totals of :func:`~._dense.shifted_statistics` with these ``centres``: ``(G,
        K)``, ``(G, K, D)``, and full ``(G, K, D, D)``, tied ``(G, D, D)``, diag and
        spherical ``(G, K, D)``. Same dtype/device as ``X``.
    """
    G, N, D = X.shape
    K = means.shape[1]
    if rows is None:
        bytes_per_row = pass_bytes_per_row(covariance_type, G, K, D, X.element_size())
        rows = pass_rows(N, bytes_per_row, memory_budget, X.device)
    rows = max(1, min(int(rows), max(N, 1)))
    state = _Pass(X, log_weights, means, prec_chol, covariance_type, rows,
                  means if centres is None else centres)
    # exp() whose result is subnormal (or underflows) runs 25-70x slower on CPU, and
    # subnormal responsibilities slow the GEMMs: exponents are floored where
    # exp(floor) / K is still a normal number (a responsibility < 1e-34 in float32,
    # < 1e-300 in float64, instead of a smaller one or 0)
    floor = math.log(torch.finfo(X.dtype).tiny) + math.log(max(K, 1)) + 1.0
    log_lik = X.new_zeros(G)
    for sl in _chunks(N, rows):
        log_prob = state.maha(X[:, sl])  # (G, c, K)
        log_prob.mul_(-0.5).add_(state.bias)  # weighted log-densities
        top = log_prob.amax(-1, keepdim=True)  # (G, c, 1)
        resp = log_prob.sub_(top).clamp_min_(floor).exp_()  # (G, c, K), unnormalised
        total = resp.sum(-1, keepdim=True)  # (G, c, 1)
        resp.div_(total)
        norm = top.add_(total.log_()).squeeze(-1)  # (G, c): log p(x)
        if sample_weight is not None:
            padding = sample_weight[:, sl] == 0  # (G, c)
            resp.masked_fill_(padding.unsqueeze(-1), 0)
            norm = norm.masked_fill_(padding, 0)
        log_lik.add_(norm.sum(-1))
        state.accumulate(resp)
    return (log_lik, *state.totals())
