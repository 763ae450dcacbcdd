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
and :func:`m_step_statistics`. Both return plain tensors, are differentiable where the dense
ones are (:func:`log_prob_norm`), and check dtype, device and contiguity at their boundary
without casting anything (KeOps' documented contract). KeOps compiles each new formula on
first use (a few seconds per formula and dtype, cached under ``~/.cache/keops*``); the set
of formulas is four covariance types times two reductions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._linalg import LOG_2PI, log_det_prec_chol

__all__ = ["available", "log_prob_norm", "m_step_statistics"]

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
    """Symbolic ``log w_j + log N(x_i | j)`` of shape ``(G, N, K)``, and ``x_i``, ``mu_j``."""
    LazyTensor = _lazy()
    G, K, D = means.shape
    log_det = log_det_prec_chol(prec_chol, covariance_type, D)  # (G, K) or (G,)
    if covariance_type == "tied":
        log_det = log_det.unsqueeze(-1).expand(G, K)
    const = (log_weights + log_det - 0.5 * D * LOG_2PI).reshape(G, 1, K, 1)
    c_j = LazyTensor(const.contiguous())  # (G, 1, K, 1)
    x_i = LazyTensor(X.unsqueeze(2).contiguous())  # (G, N, 1, D)
    mu_j = LazyTensor(means.unsqueeze(1).contiguous())  # (G, 1, K, D)
    if covariance_type == "full":
        pt_j = LazyTensor(prec_chol.mT.reshape(G, 1, K, D * D).contiguous())  # (G, 1, K, D*D)
        maha = pt_j.matvecmult(x_i - mu_j).sqnorm2()  # (G, N, K) symbolic
    elif covariance_type == "tied":
        y_i = LazyTensor((X @ prec_chol).unsqueeze(2).contiguous())  # (G, N, 1, D)
        m_j = LazyTensor((means @ prec_chol).unsqueeze(1).contiguous())  # (G, 1, K, D)
        maha = y_i.sqdist(m_j)
    elif covariance_type == "diag":
        p_j = LazyTensor(prec_chol.square().unsqueeze(1).contiguous())  # (G, 1, K, D)
        maha = (x_i - mu_j).weightedsqnorm(p_j)
    else:
        p_j = LazyTensor(prec_chol.square().reshape(G, 1, K, 1).contiguous())  # (G, 1, K, 1)
        maha = x_i.sqdist(mu_j) * p_j
    return c_j - 0.5 * maha, x_i, mu_j


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
    """M-step from responsibilities recomputed lazily: counts, means, centred covariances.

    ``r_ij = exp(log w_j + log N(x_i | j) - log p(x_i)) · s_i`` (``s_i`` the sample weight,
    zero on padding) is never stored. One reduction over the samples gives, per
    component, ``Σ r``, ``Σ r (x - m_j)`` and ``Σ r (x - m_j)(x - m_j)ᵀ`` (or its diagonal)
    centred on the current means ``m_j``; then ``μ_j = m_j + δ_j`` with
    ``δ_j = Σ r (x - m_j) / n_j`` and ``Σ_j = Σ r (x - m_j)(x - m_j)ᵀ / n_j - δ_j δ_jᵀ``,
    where ``δ_j`` is the (small) move of the mean, so nothing large cancels.

    Parameters
    ----------
    X : Tensor
        ``(G, N, D)``.
    log_prob_norm : Tensor
        ``(G, N)`` from :func:`log_prob_norm` with the same parameters.
    log_weights, means, prec_chol : Tensor
        The current parameters (``(G, K)``, ``(G, K, D)``, per covariance type).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reg_covar : float
    sample_weight : Tensor, optional
        ``(G, N)``; ones when omitted.
    memory_budget : int, optional
        Bytes for the dense chunks of the tied covariance.

    Returns
    -------
    nk, means, covariances : Tensor
        As the dense :func:`~._dense.estimate_gaussian_parameters` (``nk`` floored at
        ``10 * eps``).
    """
    LazyTensor = _lazy()
    _check(X=X, log_prob_norm=log_prob_norm, log_weights=log_weights, means=means,
           prec_chol=prec_chol, sample_weight=sample_weight)
    G, N, D = X.shape
    K = means.shape[1]
    weighted, x_i, mu_j = _weighted_log_prob(X, log_weights, means, prec_chol, covariance_type)
    log_norm_i = LazyTensor(log_prob_norm.reshape(G, N, 1, 1).contiguous())  # (G, N, 1, 1)
    resp = (weighted - log_norm_i).exp()  # (G, N, K) symbolic
    if sample_weight is not None:
        resp = resp * LazyTensor(sample_weight.reshape(G, N, 1, 1).contiguous())
    diff = x_i - mu_j  # (G, N, K, D) symbolic
    if covariance_type == "full":
        second = diff.tensorprod(diff)  # D*D
    elif covariance_type in ("diag", "spherical"):
        second = diff.square()  # D
    else:
        second = None  # tied: dense below
    ones = LazyTensor(X.new_ones(G, N, 1, 1))
    terms = ones.concat(diff) if second is None else ones.concat(diff).concat(second)
    sums = (resp * terms).sum(dim=1)  # (G, K, 1 + D [+ D*D or D])
    nk = sums[..., 0] + 10 * torch.finfo(X.dtype).eps  # (G, K)
    delta = sums[..., 1 : 1 + D] / nk.unsqueeze(-1)  # (G, K, D) move of each mean
    new_means = means + delta
    if covariance_type == "full":
        cov = sums[..., 1 + D :].reshape(G, K, D, D) / nk[..., None, None]
        cov = cov - delta.unsqueeze(-1) * delta.unsqueeze(-2)
        cov.diagonal(dim1=-2, dim2=-1).add_(reg_covar)
    elif covariance_type in ("diag", "spherical"):
        cov = sums[..., 1 + D :] / nk.unsqueeze(-1) - delta.square() + reg_covar  # (G, K, D)
        if covariance_type == "spherical":
            cov = cov.mean(-1)
    else:
        from ._dense import tied_covariance

        weight = X.new_ones(G, N) if sample_weight is None else sample_weight
        cov = tied_covariance(X, weight, nk, new_means, reg_covar, memory_budget=memory_budget)
    return nk, new_means, cov
