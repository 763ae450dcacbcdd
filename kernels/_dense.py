"""Dense torch backend: Gaussian-mixture E-step and M-step kernels.

Pure functions, batched over a leading group axis ``G`` (``G`` independent mixtures in
one call), chunked over samples so that no intermediate exceeds ``memory_budget`` bytes.
No state, no RNG, no validation beyond cheap shape asserts, no host synchronisation.

Shapes (C1 letters): ``X (G, N, D)``, or ``(N, D)`` shared by every group when scoring;
``log_weights (G, K)``; ``means (G, K, D)``; ``prec_chol`` as in :mod:`._linalg`;
``resp`` / ``log_resp`` ``(G, N, K)``. Rows of ``resp`` that are all zero (the padding of
groups of unequal sizes) contribute nothing to the statistics.

Peak memory of one chunk of ``c`` samples (``s`` bytes per element):

* full log-density: ``(G, c, K, D)`` twice; tied/diag/spherical: ``(G, c, K, D)`` or
  ``(G, c, K)``;
* full covariances: ``(G, K, c, D)`` twice; diag/spherical: the same; tied ``(G, c, D)``.

``c`` is the largest count that keeps those under ``memory_budget`` (:mod:`._chunks`:
the default budget per device, a minimum row count on CUDA). Sums over chunks are
accumulated in place (``baddbmm_``), never through a per-chunk temporary of the result.

The EM iterations of a fit do not go through these E-step/M-step pairs (which make the
whole ``(G, N, K)`` responsibilities) but through the fused pass of :mod:`._fused`, which
makes the same centred GEMMs chunk by chunk; these serve scoring, the initialisation and
the unfused oracle of the tests.

Accuracy: every E-step product sees samples and means centred on the mean of the
component means (``x - c``, ``μ - c``), so float32 and TF32 lose no digits to the data's
distance from the origin; with TF32 active the M-step's first moments are centred too
(:mod:`._settings` has the measured accuracy). float64 results are those of the
uncentred formulas to round-off.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._chunks import _chunks, chunk_rows
from ._linalg import LOG_2PI, log_det_prec_chol, precision_shape
from ._settings import tf32_enabled

__all__ = [
    "estimate_gaussian_parameters",
    "estimate_log_prob_resp",
    "log_gaussian_prob",
    "log_prob_norm",
    "log_prob_norm_and_resp",
    "m_step_statistics",
    "shifted_statistics",
    "statistics_shapes",
    "statistics_to_parameters",
    "tied_covariance",
    "tied_second_moment",
]

def _output(X: Tensor, G: int, K: int) -> Tensor:
    """The ``(G, N, K)`` result, allocated once before the chunk loop: small per-chunk
    results kept alive between large freed temporaries fragment the heap (peak RSS grew
    to the unchunked size in ``tests/test_stream.py::test_memory_budget_bounds_peak_rss``)."""
    return X.new_empty(G, X.shape[-2], K)


# --------------------------------------------------------------------------------------
# Log-densities
# --------------------------------------------------------------------------------------


def _group_centre(means: Tensor, shared: bool) -> Tensor:
    """A reference point per group, ``(G, 1, D)`` (``(1, D)`` for a shared X): the mean of
    the component means, detached (every Mahalanobis distance is invariant to it).

    Samples and means are shifted by it before any product, so the GEMMs see
    ``x - c`` and ``μ_k - c`` (the spread of the data about its centre) rather than
    coordinates far from the origin: the cancellation in ``x P - μ P`` then costs only
    the relative error of the product times ``(|x - c| + |μ - c|) / |x - μ|``, which
    matters in float32 and most under TF32 (10-bit mantissa; see :mod:`._settings`).
    """
    centre = means.detach().mean(-2, keepdim=True)  # (G, 1, D)
    return centre.mean(0) if shared else centre  # (1, D) for a shared X


def _maha_full(X: Tensor, means: Tensor, prec_chol: Tensor, rows: int) -> Tensor:
    """Squared Mahalanobis distances ``‖(x - c) P_k - (μ_k - c) P_k‖²``, full covariances.

    One GEMM per chunk against the components' factors laid side by side, with the
    shift ``-(μ_k - c) P_k`` folded in as an extra row matched by a column of ones in the
    centred samples: ``[x - c, 1] @ [[P_1 … P_K], [-(μ_1 - c) P_1 … -(μ_K - c) P_K]]`` is
    ``(c, K*D)`` per group (``c`` of :func:`_group_centre`). (A broadcast bias in
    ``baddbmm`` costs an extra memory pass, and is pathologically slow for some chunk
    sizes on CPU.) The centred samples are written straight into one ``[x - c, 1]``
    buffer reused by every chunk. Then a squared norm over each component's D columns.
    """
    G, K, D, _ = prec_chol.shape
    # In-place work (squaring, the reused buffer) only when autograd needs nothing of it.
    in_place = not (torch.is_grad_enabled() and (X.requires_grad or means.requires_grad
                                                  or prec_chol.requires_grad))
    shared = X.ndim == 2  # samples scored under every group: one (c, D+1) @ (D+1, G*K*D) GEMM
    centre = _group_centre(means, shared)  # (G, 1, D) or (1, D)
    mu_prec = ((means - centre.view(-1, 1, D)).unsqueeze(-2) @ prec_chol).squeeze(-2)  # (G, K, D)
    if shared:
        prec_wide = prec_chol.permute(2, 0, 1, 3).reshape(D, G * K * D)  # (D, G*K*D)
        prec_wide = torch.cat([prec_wide, -mu_prec.reshape(1, G * K * D)], dim=0)  # (D+1, G*K*D)
    else:
        prec_wide = prec_chol.permute(0, 2, 1, 3).reshape(G, D, K * D)  # (G, D, K*D)
        prec_wide = torch.cat([prec_wide, -mu_prec.reshape(G, 1, K * D)], dim=1)  # (G, D+1, K*D)
    out = _output(X, G, K)  # (G, N, K)
    n_rows = X.shape[-2]
    if in_place and n_rows:
        buffer = X.new_empty(*X.shape[:-2], min(rows, n_rows), D + 1)  # (..., rows, D+1)
        buffer[..., D] = 1
    for sl in _chunks(n_rows, rows):
        xc = X[..., sl, :]  # (G, c, D) or (c, D)
        if in_place:
            x_aug = buffer[..., : xc.shape[-2], :]  # (..., c, D+1)
            torch.sub(xc, centre, out=x_aug[..., :D])
        else:
            x_aug = torch.cat([xc - centre, xc.new_ones(*xc.shape[:-1], 1)], dim=-1)
        y = x_aug @ prec_wide  # (G, c, K*D) or (c, G*K*D)
        y = y.square_() if in_place else y.square()
        if shared:
            out[:, sl] = y.view(-1, G, K, D).sum(-1).permute(1, 0, 2)  # (G, c, K)
        else:
            out[:, sl] = y.view(G, -1, K, D).sum(-1)  # (G, c, K)
    return out


def _maha_tied(X: Tensor, means: Tensor, prec_chol: Tensor, rows: int) -> Tensor:
    """``‖(x - c) P - (μ_k - c) P‖²`` with one factor ``P (G, D, D)`` shared by the K
    components, centred on :func:`_group_centre` before the product."""
    centre = _group_centre(means, X.ndim == 2)  # (G, 1, D) or (1, D)
    mu_prec = (means - centre.view(-1, 1, means.shape[-1])) @ prec_chol  # (G, K, D)
    out = _output(X, *means.shape[:2])  # (G, N, K)
    for sl in _chunks(X.shape[-2], rows):
        y = (X[..., sl, :] - centre) @ prec_chol  # (G, c, D)
        diff = y.unsqueeze(-2) - mu_prec.unsqueeze(-3)  # (G, c, K, D)
        out[:, sl] = diff.square().sum(-1)  # (G, c, K)
    return out


def _maha_diag(X: Tensor, means: Tensor, prec_chol: Tensor, rows: int) -> Tensor:
    """Diagonal precisions ``p = prec_chol²``: ``Σ_d p_kd (x_d - μ_kd)²`` by one GEMM.

    Expanded as ``x² pᵀ - 2 x (μ p)ᵀ + Σ μ² p``, i.e. ``[x², x, 1] @ [pᵀ; -2 (μ p)ᵀ; Σ μ² p]``,
    after shifting samples and means by the mean of the group's component means, which
    keeps the cancellation in the expansion to the spread of the data around that centre.
    """
    centre = means.mean(-2, keepdim=True)  # (G, 1, D)
    mu = means - centre  # (G, K, D)
    prec = prec_chol.square()  # (G, K, D)
    weights = torch.cat([prec.mT, -2 * (mu * prec).mT,  # (G, 2D+1, K)
                         (mu.square() * prec).sum(-1).unsqueeze(-2)], dim=-2)
    out = _output(X, *means.shape[:2])  # (G, N, K)
    for sl in _chunks(X.shape[-2], rows):
        xc = X[..., sl, :] - centre  # (G, c, D)
        x_aug = torch.cat([xc.square(), xc, xc.new_ones(*xc.shape[:-1], 1)], dim=-1)  # (G, c, 2D+1)
        out[:, sl] = (x_aug @ weights).clamp_min(0)  # (G, c, K)
    return out


def _maha_spherical(X: Tensor, means: Tensor, prec_chol: Tensor, rows: int) -> Tensor:
    """One precision ``p_k = prec_chol_k²`` per component: ``p_k ‖x - μ_k‖²``."""
    centre = means.mean(-2, keepdim=True)  # (G, 1, D)
    mu = means - centre  # (G, K, D)
    prec = prec_chol.square().unsqueeze(-2)  # (G, 1, K)
    mu_sq = mu.square().sum(-1).unsqueeze(-2)  # (G, 1, K)
    out = _output(X, *means.shape[:2])  # (G, N, K)
    for sl in _chunks(X.shape[-2], rows):
        xc = X[..., sl, :] - centre  # (G, c, D)
        x_sq = xc.square().sum(-1, keepdim=True)  # (G, c, 1)
        dist = torch.baddbmm(x_sq + mu_sq, xc, mu.mT, alpha=-2).clamp_min_(0)  # (G, c, K)
        out[:, sl] = dist * prec  # (G, c, K)
    return out


_MAHALANOBIS = {
    "full": _maha_full,
    "tied": _maha_tied,
    "diag": _maha_diag,
    "spherical": _maha_spherical,
}


def log_gaussian_prob(
    X: Tensor,
    means: Tensor,
    prec_chol: Tensor,
    covariance_type: str,
    *,
    memory_budget: int | None = None,
) -> Tensor:
    r"""Log-density of every sample under every component, batched over groups.

    .. math::
        \log \mathcal N(x \mid \mu_k, \Sigma_k) = -\tfrac12\big(D \log 2\pi
        + \lVert (x - \mu_k)^\top P_k \rVert^2\big) + \sum_d \log (P_k)_{dd}

    with ``P_k = prec_chol[k]`` (``Σ_k⁻¹ = P_k P_kᵀ``). Differentiable with respect to
    every argument.

    Parameters
    ----------
    X : Tensor
        ``(G, N, D)`` samples per group, or ``(N, D)`` scored under every group.
    means : Tensor
        ``(G, K, D)``, or ``(K, D)`` for a single mixture (then the result has no G).
    prec_chol : Tensor
        Shape per ``covariance_type`` (see :mod:`._linalg`), with the same leading G.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    memory_budget : int, optional
        Bytes allowed for the intermediates of one chunk of samples.

    Returns
    -------
    log_prob : Tensor
        ``(G, N, K)`` (``(N, K)`` without G), same dtype/device as ``X``.
    """
    single = means.ndim == 2
    if single:
        means, prec_chol = means.unsqueeze(0), prec_chol.unsqueeze(0)
    G, K, D = means.shape
    itemsize = X.element_size()
    if covariance_type in ("full", "tied"):
        bytes_per_row = 2 * G * K * D * itemsize
    else:
        bytes_per_row = (2 * G * D + 2 * G * K) * itemsize
    rows = chunk_rows(X.shape[-2], bytes_per_row, memory_budget, X.device)
    maha = _MAHALANOBIS[covariance_type](X, means, prec_chol, rows)  # (G, N, K)
    log_det = log_det_prec_chol(prec_chol, covariance_type, D)  # (G, K) or (G,)
    if covariance_type == "tied":
        log_det = log_det.unsqueeze(-1)  # (G, 1)
    log_prob = -0.5 * (D * LOG_2PI + maha) + log_det.unsqueeze(-2)  # (G, N, K)
    return log_prob.squeeze(0) if single else log_prob


def log_prob_norm_and_resp(weighted_log_prob: Tensor) -> tuple[Tensor, Tensor]:
    """``log p(x) = logsumexp_k`` and ``log_resp = weighted_log_prob - log p(x)``.

    ``weighted_log_prob (..., N, K)`` -> ``(..., N)``, ``(..., N, K)``.
    """
    log_prob_norm = torch.logsumexp(weighted_log_prob, dim=-1)  # (G, N)
    return log_prob_norm, weighted_log_prob - log_prob_norm.unsqueeze(-1)


def estimate_log_prob_resp(
    X: Tensor,
    log_weights: Tensor,
    means: Tensor,
    prec_chol: Tensor,
    covariance_type: str,
    *,
    memory_budget: int | None = None,
) -> tuple[Tensor, Tensor]:
    """E-step: per-sample log-likelihood ``(G, N)`` and log-responsibilities ``(G, N, K)``.

    ``log_weights (G, K)``; the other arguments as in :func:`log_gaussian_prob`.
    """
    log_prob = log_gaussian_prob(X, means, prec_chol, covariance_type, memory_budget=memory_budget)
    return log_prob_norm_and_resp(log_prob + log_weights.unsqueeze(-2))


# --------------------------------------------------------------------------------------
# M-step statistics
# --------------------------------------------------------------------------------------


def _tf32_products(X: Tensor) -> bool:
    """Whether float32 GEMMs on ``X``'s device round their factors to TF32 now (CUDA with
    TF32 allowed: :func:`~._settings.allow_tf32`). Never on CPU, so the CPU path is not
    touched by the centring it triggers."""
    return X.is_cuda and X.dtype == torch.float32 and tf32_enabled()


def _centred_first(X: Tensor, resp: Tensor, shift: Tensor, memory_budget: int | None) -> Tensor:
    """``Σ_n r_nk (x_n - s)`` ``(G, K, D)`` for ``shift (G, 1, D)``, in chunks of rows
    accumulated in place (no centred copy of all of ``X``)."""
    G, N, D = X.shape
    rows = chunk_rows(N, G * D * X.element_size(), memory_budget, X.device)
    total = X.new_zeros(G, resp.shape[-1], D)
    for sl in _chunks(N, rows):
        total.baddbmm_(resp[:, sl].mT, X[:, sl] - shift)  # (G, K, D), in place
    return total


def _weighted_sums(X: Tensor, resp: Tensor, counts: Tensor, memory_budget: int | None) -> Tensor:
    """``Σ_n r_nk x_n`` ``(G, K, D)``. Under TF32 (rounding ``x`` to 10 bits, an error of
    ``2⁻¹¹ |x|`` that grows with the data's distance from the origin) as
    ``Σ_n r_nk (x_n - x_0) + n_k x_0`` on the group's first sample ``x_0``, so the
    rounded product sees the spread of the data only; an empty component still sums to 0."""
    if not _tf32_products(X) or X.shape[1] == 0:
        return resp.mT @ X
    ref = X[:, :1]  # (G, 1, D), a sample of every group (padding sits at the end)
    return _centred_first(X, resp, ref, memory_budget) + counts.unsqueeze(-1) * ref


def _add_to_diagonal(matrices: Tensor, value: float) -> Tensor:
    matrices.diagonal(dim1=-2, dim2=-1).add_(value)
    return matrices


def _add_gram(total: Tensor, scaled: Tensor) -> None:
    """``total (..., D, D) += scaledᵀ scaled`` (``scaled (..., c, D)``) by one in-place
    ``baddbmm_`` over the flattened batch: no ``(..., D, D)`` temporary per chunk."""
    c, D = scaled.shape[-2:]
    flat = scaled.reshape(-1, c, D)
    total.view(-1, D, D).baddbmm_(flat.mT, flat)


def _covariances_full(X, resp, nk, means, reg_covar, memory_budget):
    """``Σ_k = Σ_n r_nk (x_n - μ_k)(x_n - μ_k)ᵀ / n_k + reg``, accumulated centred.

    As a Gram matrix ``Aᵀ A`` of ``A = √r ⊙ (x - μ_k)``: one intermediate per chunk.
    """
    G, K, D = means.shape
    rows = chunk_rows(X.shape[1], G * K * D * X.element_size(), memory_budget, X.device)
    cov = X.new_zeros(G, K, D, D)
    sqrt_resp = resp.sqrt().mT.unsqueeze(-1)  # (G, K, N, 1)
    for sl in _chunks(X.shape[1], rows):
        scaled = X[:, sl].unsqueeze(1) - means.unsqueeze(2)  # (G, K, c, D)
        scaled.mul_(sqrt_resp[:, :, sl])
        _add_gram(cov, scaled)  # (G, K, D, D) += scaledᵀ scaled, in place
    cov.div_(nk[..., None, None])
    return _add_to_diagonal(cov, reg_covar)


def tied_second_moment(
    X: Tensor, weight: Tensor, shift: Tensor, *, memory_budget: int | None = None
) -> Tensor:
    """``Σ_n w_n (x_n - s)(x_n - s)ᵀ`` per group, ``(G, D, D)``, accumulated in place.

    ``X (G, N, D)``, ``weight (G, N)`` (zero on padding), ``shift (G, 1, D)``.
    """
    G, N, D = X.shape
    rows = chunk_rows(N, 2 * G * D * X.element_size(), memory_budget, X.device)
    second = X.new_zeros(G, D, D)
    for sl in _chunks(N, rows):
        xc = X[:, sl] - shift  # (G, c, D)
        second.baddbmm_((xc * weight[:, sl].unsqueeze(-1)).mT, xc)  # (G, D, D), in place
    return second


def tied_covariance(
    X: Tensor,
    weight: Tensor,
    nk: Tensor,
    means: Tensor,
    reg_covar: float,
    *,
    memory_budget: int | None = None,
) -> Tensor:
    """Tied covariance ``(Σ_n w_n x̃_n x̃_nᵀ - Σ_k n_k μ̃_k μ̃_kᵀ) / Σ_k n_k + reg``, ``(G, D, D)``.

    ``x̃ = x - c`` and ``μ̃ = μ - c`` are centred on the group's weighted mean ``c``, so
    the subtraction cancels only the spread of the component means about it. ``weight
    (G, N)`` is one for samples and zero for padding; ``nk (G, K)``, ``means (G, K, D)``.
    """
    total = nk.sum(-1)  # (G,)
    centre = (nk.unsqueeze(-1) * means).sum(-2) / total.unsqueeze(-1)  # (G, D)
    cov = tied_second_moment(X, weight, centre.unsqueeze(1), memory_budget=memory_budget)
    mu = means - centre.unsqueeze(1)  # (G, K, D)
    cov.sub_((mu * nk.unsqueeze(-1)).mT @ mu)  # (G, D, D)
    cov.div_(total[:, None, None])
    return _add_to_diagonal(cov, reg_covar)


def _covariances_tied(X, resp, nk, means, reg_covar, memory_budget):
    """Tied covariance from responsibilities (their row sums are the sample weights)."""
    return tied_covariance(X, resp.sum(-1), nk, means, reg_covar, memory_budget=memory_budget)


def _covariances_diag(X, resp, nk, means, reg_covar, memory_budget):
    """``σ²_kd = Σ_n r_nk (x_nd - μ_kd)² / n_k + reg`` by one GEMM per chunk.

    Computed as ``Σ_n r_nk (x_nd - c_d)² / n_k - (μ_kd - c_d)²`` on samples shifted by the
    group's weighted mean ``c`` (the shifted-data algorithm): ``respᵀ (x - c)²`` is a
    ``(K, c) @ (c, D)`` GEMM instead of ``N K D`` elementwise work, and the subtraction
    cancels only the spread of the component means about ``c``.
    """
    G, K, D = means.shape
    rows = chunk_rows(X.shape[1], 2 * G * D * X.element_size(), memory_budget, X.device)
    centre = ((nk.unsqueeze(-1) * means).sum(-2) / nk.sum(-1, keepdim=True)).unsqueeze(1)  # (G, 1, D)
    second = X.new_zeros(G, K, D)
    for sl in _chunks(X.shape[1], rows):
        second.baddbmm_(resp[:, sl].mT, (X[:, sl] - centre).square())  # (G, K, D), in place
    var = second.div_(nk.unsqueeze(-1)).sub_((means - centre).square())
    return var.clamp_min_(0).add_(reg_covar)  # (G, K, D)


def _covariances_spherical(X, resp, nk, means, reg_covar, memory_budget):
    """Mean over features of the diagonal variances, ``(G, K)``."""
    return _covariances_diag(X, resp, nk, means, reg_covar, memory_budget).mean(-1)


_COVARIANCES = {
    "full": _covariances_full,
    "tied": _covariances_tied,
    "diag": _covariances_diag,
    "spherical": _covariances_spherical,
}


def estimate_gaussian_parameters(
    X: Tensor,
    resp: Tensor,
    reg_covar: float,
    covariance_type: str,
    *,
    memory_budget: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """M-step sufficient statistics: counts, means and centred covariances.

    Parameters
    ----------
    X : Tensor
        ``(G, N, D)`` samples (padding rows arbitrary but finite).
    resp : Tensor
        ``(G, N, K)`` responsibilities, rows summing to one for samples and zero for
        padding.
    reg_covar : float
        Added to every covariance diagonal.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    memory_budget : int, optional
        Bytes allowed for the intermediates of one chunk of samples.

    Returns
    -------
    nk : Tensor
        ``(G, K)`` soft counts, floored by ``10 * eps`` of the dtype as in scikit-learn.
    means : Tensor
        ``(G, K, D)``.
    covariances : Tensor
        Shape per ``covariance_type`` (see :mod:`._linalg`), same dtype/device as ``X``.
    """
    counts = resp.sum(-2)  # (G, K)
    nk = counts + 10 * torch.finfo(resp.dtype).eps  # (G, K)
    means = _weighted_sums(X, resp, counts, memory_budget) / nk.unsqueeze(-1)  # (G, K, D)
    covariances = _COVARIANCES[covariance_type](X, resp, nk, means, reg_covar, memory_budget)
    return nk, means, covariances


def log_prob_norm(
    X: Tensor,
    log_weights: Tensor,
    means: Tensor,
    prec_chol: Tensor,
    covariance_type: str,
    *,
    memory_budget: int | None = None,
) -> Tensor:
    """Per-sample mixture log-likelihood ``logsumexp_k (log w_k + log N(x | k))``.

    ``(G, N)`` (``(N,)`` without G); arguments as in :func:`log_gaussian_prob` plus
    ``log_weights (G, K)``. Differentiable. Mirrors the KeOps backend's function.
    """
    log_prob = log_gaussian_prob(X, means, prec_chol, covariance_type, memory_budget=memory_budget)
    return torch.logsumexp(log_prob + log_weights.unsqueeze(-2), dim=-1)


def m_step_statistics(
    X: Tensor,
    log_prob_norm: Tensor,
    log_weights: Tensor,
    means: Tensor,
    prec_chol: Tensor,
    covariance_type: str,
    reg_covar: float,
    *,
    sample_weight: Tensor | None = None,
    memory_budget: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """M-step from the parameters that produced ``log_prob_norm`` (mirrors the KeOps backend).

    Recomputes the responsibilities ``(G, N, K)`` densely, then
    :func:`estimate_gaussian_parameters`. ``sample_weight (G, N)`` zeroes padding rows.
    """
    log_prob = log_gaussian_prob(X, means, prec_chol, covariance_type, memory_budget=memory_budget)
    resp = (log_prob + log_weights.unsqueeze(-2) - log_prob_norm.unsqueeze(-1)).exp()
    if sample_weight is not None:
        resp = resp * sample_weight.unsqueeze(-1)
    return estimate_gaussian_parameters(X, resp, reg_covar, covariance_type, memory_budget=memory_budget)


# --------------------------------------------------------------------------------------
# Sufficient statistics that add up across batches (streaming and data-parallel EM)
# --------------------------------------------------------------------------------------


def shifted_statistics(
    X: Tensor,
    resp: Tensor,
    centres: Tensor,
    covariance_type: str,
    *,
    memory_budget: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over samples that can be added across batches (or ranks), centred on ``centres``.

    With ``d = x - c_k`` (``c_k = centres[k]``, usually the current means):

    * ``counts (G, K) = Σ_n r_nk`` (no floor);
    * ``first (G, K, D) = Σ_n r_nk d``;
    * ``second``: full ``(G, K, D, D) = Σ_n r_nk d dᵀ``; diag/spherical ``(G, K, D)`` its
      diagonal; tied ``(G, D, D) = Σ_n w_n (x - c̄)(x - c̄)ᵀ`` with ``c̄`` the mean of the
      centres and ``w_n = Σ_k r_nk``.

    :func:`statistics_to_parameters` turns the totals into counts, means and covariances.
    Centring on the current means keeps the final correction ``δ δᵀ`` small (``δ`` is the
    move of a mean in one EM step), so the covariances stay accurate in float32.
    ``X (G, N, D)``, ``resp (G, N, K)`` (zero rows for padding), ``centres (G, K, D)``.
    """
    G, N, D = X.shape
    K = resp.shape[-1]
    counts = resp.sum(-2)  # (G, K)
    if _tf32_products(X):  # TF32 rounds x itself: centre before the product
        shift = centres.mean(-2, keepdim=True)  # (G, 1, D)
        first = (_centred_first(X, resp, shift, memory_budget)
                 - counts.unsqueeze(-1) * (centres - shift))  # (G, K, D)
    else:
        first = resp.mT @ X - counts.unsqueeze(-1) * centres  # (G, K, D)
    if covariance_type == "tied":
        shift = centres.mean(-2, keepdim=True)  # (G, 1, D)
        return counts, first, tied_second_moment(X, resp.sum(-1), shift,
                                                 memory_budget=memory_budget)
    rows = chunk_rows(N, G * K * D * X.element_size(), memory_budget, X.device)
    if covariance_type == "full":
        second = X.new_zeros(G, K, D, D)
        sqrt_resp = resp.sqrt().mT.unsqueeze(-1)  # (G, K, N, 1)
        for sl in _chunks(N, rows):
            scaled = X[:, sl].unsqueeze(1) - centres.unsqueeze(2)  # (G, K, c, D)
            scaled.mul_(sqrt_resp[:, :, sl])
            _add_gram(second, scaled)  # (G, K, D, D), in place
        return counts, first, second
    second = X.new_zeros(G * K, 1, D)
    for sl in _chunks(N, rows):
        diff_sq = (X[:, sl].unsqueeze(1) - centres.unsqueeze(2)).square()  # (G, K, c, D)
        c = diff_sq.shape[2]
        weights = resp[:, sl].mT.reshape(G * K, 1, c)  # (G*K, 1, c)
        second.baddbmm_(weights, diff_sq.view(G * K, c, D))  # (G*K, 1, D), in place
    return counts, first, second.view(G, K, D)


def statistics_shapes(covariance_type: str, G: int, K: int, D: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of ``(counts, first, second)`` of :func:`shifted_statistics` (what a
    data-parallel fit all-reduces): ``(G, K)``, ``(G, K, D)`` and ``second`` full
    ``(G, K, D, D)``, tied ``(G, D, D)``, diag and spherical ``(G, K, D)`` (the spherical
    second moment keeps its D features until :func:`statistics_to_parameters`)."""
    second = precision_shape("diag" if covariance_type == "spherical" else covariance_type, G, K, D)
    return (G, K), (G, K, D), second


def statistics_to_parameters(
    counts: Tensor,
    first: Tensor,
    second: Tensor,
    centres: Tensor,
    reg_covar: float,
    covariance_type: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(nk, means, covariances)`` from totals of :func:`shifted_statistics`.

    ``nk = counts + 10 eps``; ``δ = first / nk``; ``means = centres + δ``; full
    ``Σ_k = second_k / nk - δ_k δ_kᵀ + reg`` (diag: the diagonal, floored at 0 before
    ``reg``; spherical: its mean over features); tied ``Σ = (second - Σ_k nk (μ_k - c̄)(μ_k - c̄)ᵀ) / Σ_k nk + reg``.
    """
    nk = counts + 10 * torch.finfo(counts.dtype).eps  # (G, K)
    delta = first / nk.unsqueeze(-1)  # (G, K, D)
    means = centres + delta
    if covariance_type == "full":
        cov = second / nk[..., None, None] - delta.unsqueeze(-1) * delta.unsqueeze(-2)
        return nk, means, _add_to_diagonal(cov, reg_covar)
    if covariance_type in ("diag", "spherical"):
        # floored at 0 before reg_covar, as _covariances_diag: a fused pass re-centres
        # its diag moments from sums about c̄, which can round a tiny variance below 0
        var = (second / nk.unsqueeze(-1) - delta.square()).clamp_min_(0).add_(reg_covar)
        return nk, means, var if covariance_type == "diag" else var.mean(-1)
    mu = means - centres.mean(-2, keepdim=True)  # (G, K, D)
    cov = (second - (mu * nk.unsqueeze(-1)).mT @ mu) / nk.sum(-1)[:, None, None]
    return nk, means, _add_to_diagonal(cov, reg_covar)
