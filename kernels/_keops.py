"""KeOps backend: Gaussian-mixture reductions as symbolic (N, K) LazyTensor reductions.

No ``(N, K, D)`` tensor is ever formed: every ``(sample i, component j)`` term is evaluated
in registers by a KeOps reduction, over ``i`` or over ``j``. Batched over the leading group
axis ``G`` (one KeOps batch dimension), so the reduction axes are ``dim=1`` (over samples
``i``) and ``dim=2`` (over components ``j``).

Variables (A3 index convention, with the batch axis first):

* ``x_i``: samples, ``(G, N, 1, D)``;
* ``mu_j``: means, ``(G, 1, K, D)``;
* full covariances: ``Pt_j = prec_chol_jᵀ`` flattened row-major to ``(G, 1, K, D*D)`` so that
  ``Pt_j.matvecmult(x_i - mu_j) = (x_i - mu_j)ᵀ P_j``;
* diag: ``p_j = prec_chol²`` ``(G, 1, K, D)``; spherical ``(G, 1, K, 1)``;
* tied: the shared factor is applied densely first (``y = x P``, one ``N D²`` GEMM), then
  ``‖y_i - (μ P)_j‖²`` is a KeOps squared distance.

Exported with the same names and signatures as the dense backend: :func:`log_prob_norm`
and :func:`m_step_statistics`, plus :func:`sufficient_statistics` (the sums of the M-step,
the dense :func:`~._dense.shifted_statistics` centred on the EM loop's centres). The M-step
turns those sums into parameters with the dense backend's one
:func:`~._dense.statistics_to_parameters`. All return plain tensors, are differentiable
where the dense ones are (:func:`log_prob_norm`), and check dtype and device at their
boundary without casting anything (KeOps' documented contract). KeOps compiles each new
formula on first use (a few seconds per formula and dtype, cached under
``~/.cache/keops*``); the set of formulas is four covariance types times two reductions
(the sample weight of the M-step is a variable, ones when omitted).

The M-step reduction runs over the samples with only ``G K`` outputs; reduced as one
axis, KeOps' 1D scheme would give one thread per output, each looping over all N samples
(about 256 threads for N = 10⁶, K = 256). The samples are therefore split into slices of
:data:`REDUCTION_ROWS` along an extra batch axis, reduced per slice (``G · slices · K``
outputs in parallel) and the partial sums added densely.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dense import statistics_to_parameters, tied_second_moment
from ._linalg import LOG_2PI, log_det_prec_chol

__all__ = ["REDUCTION_ROWS", "available", "log_prob_norm", "m_step_statistics",
           "sufficient_statistics"]

#: Samples per slice of the chunk axis of the M-step reduction (:func:`sufficient_statistics`).
REDUCTION_ROWS = 8192

_INSTALL_HINT = (
    "backend='keops' needs pykeops: pip install 'idefender-gpu[keops]' (or pip install pykeops) "
    "and a C++ compiler (g++) for its on-first-use compilation"
)


def _lazy():
    """Import ``pykeops.torch.LazyTensor`` lazily with an install hint on failure."""
    try:
        from pykeops.torch import LazyTensor
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    return LazyTensor


def available() -> bool:
    """Whether pykeops can be imported."""
    try:
        _lazy()
    except ImportError:
        return False
    return True


def _check(**tensors: Tensor) -> None:
    """Same dtype and device everywhere, float32/float64 only (nothing is cast or moved)."""
    items = [(name, t) for name, t in tensors.items() if t is not None]
    name0, t0 = items[0]
    if t0.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name0} must be float32 or float64 for the KeOps backend; got {t0.dtype}")
    for name, t in items[1:]:
        if t.dtype != t0.dtype or t.device != t0.device:
            raise TypeError(
                f"{name} must have the dtype and device of {name0} ({t0.dtype}, {t0.device}) for "
                f"the KeOps backend; got ({t.dtype}, {t.device})"
            )


def _batched(X: Tensor, means: Tensor, prec_chol: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Add the group axis where it is missing; X ``(N, D)`` is shared by every group."""
    single = means.ndim == 2
    if single:
        means, prec_chol = means.unsqueeze(0), prec_chol.unsqueeze(0)
    if X.ndim == 2:
        X = X.unsqueeze(0).expand(means.shape[0], -1, -1)
    return X, means, prec_chol, single


def _weighted_log_prob(X: Tensor, log_weights: Tensor, means: Tensor, prec_chol: Tensor,
                       covariance_type: str):
    """Symbolic ``log w_j + log N(x_i | j)`` of shape ``(G, [S,] N, K)``, and ``x_i``, ``mu_j``.

    ``X`` is ``(G, N, D)``, or ``(G, S, n, D)`` with a slice axis ``S`` (the parameters are
    broadcast over it); the parameters have the group axis ``G``.
    """
    LazyTensor = _lazy()
    G, K, D = means.shape
    sliced = X.ndim == 4
    j_shape = (G, 1, 1, K) if sliced else (G, 1, K)  # batch axes + (i=1, j=K)
    log_det = log_det_prec_chol(prec_chol, covariance_type, D)  # (G, K) or (G,)
    if covariance_type == "tied":
        log_det = log_det.unsqueeze(-1).expand(G, K)
    const = (log_weights + log_det - 0.5 * D * LOG_2PI).reshape(*j_shape, 1)
    c_j = LazyTensor(const.contiguous())  # (G, [1,] 1, K, 1)
    x_i = LazyTensor(X.unsqueeze(-2).contiguous())  # (G, [S,] N, 1, D)
    mu_j = LazyTensor(means.reshape(*j_shape, D).contiguous())  # (G, [1,] 1, K, D)
    if covariance_type == "full":
        pt_j = LazyTensor(prec_chol.mT.reshape(*j_shape, D * D).contiguous())  # (G, [1,] 1, K, D*D)
        maha = pt_j.matvecmult(x_i - mu_j).sqnorm2()  # (G, [S,] N, K) symbolic
    elif covariance_type == "tied":
        # the shared factor applied densely, to samples and means centred first (TF32-safe)
        centre = means.detach().mean(-2, keepdim=True)  # (G, 1, D)
        P = prec_chol.unsqueeze(1) if sliced else prec_chol  # (G, [1,] D, D)
        y = (X - (centre.unsqueeze(1) if sliced else centre)) @ P  # (G, [S,] N, D)
        y_i = LazyTensor(y.unsqueeze(-2).contiguous())  # (G, [S,] N, 1, D)
        m_j = LazyTensor(((means - centre) @ prec_chol).reshape(*j_shape, D).contiguous())
        maha = y_i.sqdist(m_j)
    elif covariance_type == "diag":
        p_j = LazyTensor(prec_chol.square().reshape(*j_shape, D).contiguous())  # (G, [1,] 1, K, D)
        maha = (x_i - mu_j).weightedsqnorm(p_j)
    else:
        p_j = LazyTensor(prec_chol.square().reshape(*j_shape, 1).contiguous())  # (G, [1,] 1, K, 1)
        maha = x_i.sqdist(mu_j) * p_j
    return c_j - 0.5 * maha, x_i, mu_j


def _sliced(t: Tensor, n_slices: int, rows: int, fill: float) -> Tensor:
    """``(G, N, ...)`` -> ``(G, S, rows, ...)``, the last slice padded with ``fill``."""
    G, N = t.shape[:2]
    pad = n_slices * rows - N
    if pad:
        t = torch.cat([t, t.new_full((G, pad, *t.shape[2:]), fill)], dim=1)
    return t.reshape(G, n_slices, rows, *t.shape[2:])


def log_prob_norm(
    X: Tensor,
    log_weights: Tensor,
    means: Tensor,
    prec_chol: Tensor,
    covariance_type: str,
    *,
    memory_budget: int | None = None,
) -> Tensor:
    r"""Per-sample mixture log-likelihood :math:`\log \sum_k w_k \mathcal N(x \mid k)`.

    One KeOps log-sum-exp reduction over the components.

    Parameters
    ----------
    X : Tensor
        ``(G, N, D)``, or ``(N, D)`` scored under every group.
    log_weights : Tensor
        ``(G, K)`` (``(K,)`` without G).
    means, prec_chol : Tensor
        As in the dense backend.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    memory_budget : int, optional
        Unused: KeOps keeps every ``(i, j)`` term in registers.

    Returns
    -------
    Tensor
        ``(G, N)`` (``(N,)`` without G), same dtype/device as ``X``; differentiable.
    """
    _check(X=X, log_weights=log_weights, means=means, prec_chol=prec_chol)
    if means.ndim == 2:
        log_weights = log_weights.unsqueeze(0)
    X, means, prec_chol, single = _batched(X, means, prec_chol)
    weighted, _, _ = _weighted_log_prob(X, log_weights, means, prec_chol, covariance_type)
    out = weighted.logsumexp(dim=2).squeeze(-1)  # (G, N)
    return out.squeeze(0) if single else out


def sufficient_statistics(
    X: Tensor,
    log_prob_norm: Tensor,
    log_weights: Tensor,
    means: Tensor,
    prec_chol: Tensor,
    covariance_type: str,
    *,
    sample_weight: Tensor | None = None,
    memory_budget: int | None = None,
    rows_per_slice: int | None = None,
    centres: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The M-step's sums over samples, centred on ``centres`` (default: the current
    means), responsibilities recomputed lazily.

    ``r_ij = exp(log w_j + log N(x_i | j) - log p(x_i)) · s_i`` (``s_i`` the sample weight,
    zero on padding) is never stored. One KeOps reduction over the samples gives, per
    component, ``counts = Σ r``, ``first = Σ r (x - m_j)`` and ``second = Σ r (x - m_j)
    (x - m_j)ᵀ`` (full; diag/spherical its diagonal) centred on ``m_j = centres[j]``;
    tied: ``second = Σ_i s_i (x_i - c̄)(x_i - c̄)ᵀ`` densely, ``c̄`` the mean of the
    centres. These are exactly the sums of the dense
    :func:`~._dense.shifted_statistics` with the same ``centres``, ready for
    :func:`~._dense.statistics_to_parameters`.

    Parameters
    ----------
    X : Tensor
        ``(G, N, D)``.
    log_prob_norm : Tensor
        ``(G, N)`` from :func:`log_prob_norm` with the same parameters.
    log_weights, means, prec_chol : Tensor
        The current parameters (``(G, K)``, ``(G, K, D)``, per covariance type).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    sample_weight : Tensor, optional
        ``(G, N)``; ones when omitted.
    memory_budget : int, optional
        Bytes for the dense chunks of the tied second moment.
    rows_per_slice : int, optional
        Samples per slice of the reduction's chunk axis (default :data:`REDUCTION_ROWS`).
    centres : Tensor, optional
        ``(G, K, D)``: ``m_j`` above is ``centres[j]`` (tied: ``c̄`` is their mean).

    Returns
    -------
    counts : Tensor
        ``(G, K)`` (no floor).
    first : Tensor
        ``(G, K, D)``.
    second : Tensor
        ``(G, K, D, D)`` full, ``(G, K, D)`` diag/spherical, ``(G, D, D)`` tied.
    """
    LazyTensor = _lazy()
    _check(X=X, log_prob_norm=log_prob_norm, log_weights=log_weights, means=means,
           prec_chol=prec_chol, sample_weight=sample_weight)
    G, N, D = X.shape
    K = means.shape[1]
    rows = max(1, min(N, REDUCTION_ROWS if rows_per_slice is None else int(rows_per_slice)))
    n_slices = -(-N // rows) if N else 1
    # padding rows: zero samples whose log p(x) is the largest finite value, so their
    # responsibilities underflow to 0 (no infinity, whatever math flags KeOps compiles with)
    Xs = _sliced(X, n_slices, rows, 0.0)  # (G, S, n, D)
    weighted, x_i, _ = _weighted_log_prob(Xs, log_weights, means, prec_chol, covariance_type)
    norm_s = _sliced(log_prob_norm, n_slices, rows, torch.finfo(X.dtype).max)  # (G, S, n)
    log_norm_i = LazyTensor(norm_s.reshape(G, n_slices, rows, 1, 1).contiguous())
    # the sample weight is always a variable (ones when omitted): one formula per
    # covariance type and dtype, whether or not a fit pads its groups
    weight = X.new_ones(G, N) if sample_weight is None else sample_weight
    weight_s = _sliced(weight, n_slices, rows, 0.0)  # (G, S, n)
    resp = (weighted - log_norm_i).exp()  # (G, S, n, K) symbolic
    resp = resp * LazyTensor(weight_s.reshape(G, n_slices, rows, 1, 1).contiguous())
    # the statistics' centres are always their own variable (one formula, whether or not
    # they are the means)
    centres = means if centres is None else centres
    _check(X=X, centres=centres)
    s_j = LazyTensor(centres.reshape(G, 1, 1, K, D).contiguous())  # (G, 1, 1, K, D)
    diff = x_i - s_j  # (G, S, n, K, D) symbolic
    if covariance_type == "full":
        second = diff.tensorprod(diff)  # D*D
    elif covariance_type in ("diag", "spherical"):
        second = diff.square()  # D
    else:
        second = None  # tied: dense below
    ones = LazyTensor(Xs.new_ones(G, n_slices, rows, 1, 1))
    terms = ones.concat(diff) if second is None else ones.concat(diff).concat(second)
    sums = (resp * terms).sum(dim=2).sum(1)  # (G, S, K, .) per slice -> (G, K, 1 + D [+ ...])
    counts, first = sums[..., 0], sums[..., 1 : 1 + D]  # (G, K), (G, K, D)
    if covariance_type == "full":
        return counts, first, sums[..., 1 + D :].reshape(G, K, D, D)
    if covariance_type in ("diag", "spherical"):
        return counts, first, sums[..., 1 + D :]
    shift = centres.mean(-2, keepdim=True)  # (G, 1, D), as statistics_to_parameters expects
    return counts, first, tied_second_moment(X, weight, shift, memory_budget=memory_budget)


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
    rows_per_slice: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """M-step from responsibilities recomputed lazily: counts, means, centred covariances.

    :func:`sufficient_statistics` centred on the current means ``m_j``, then the dense
    backend's :func:`~._dense.statistics_to_parameters`: ``μ_j = m_j + δ_j`` with
    ``δ_j = Σ r (x - m_j) / n_j`` and ``Σ_j = Σ r (x - m_j)(x - m_j)ᵀ / n_j - δ_j δ_jᵀ``,
    where ``δ_j`` is the (small) move of the mean, so nothing large cancels.

    Parameters
    ----------
    X, log_prob_norm, log_weights, means, prec_chol, covariance_type, sample_weight, \
memory_budget, rows_per_slice
        As in :func:`sufficient_statistics`.
    reg_covar : float
        Added to every covariance diagonal.

    Returns
    -------
    nk, means, covariances : Tensor
        As the dense :func:`~._dense.estimate_gaussian_parameters` (``nk`` floored at
        ``10 * eps``).
    """
    counts, first, second = sufficient_statistics(
        X, log_prob_norm, log_weights, means, prec_chol, covariance_type,
        sample_weight=sample_weight, memory_budget=memory_budget, rows_per_slice=rows_per_slice,
    )
    return statistics_to_parameters(counts, first, second, means, reg_covar, covariance_type)
