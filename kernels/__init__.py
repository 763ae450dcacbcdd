"""Pure tensor kernels of idefender-gpu (installed as ``idefender_gpu.kernels``).

Gaussian log-densities from precision Cholesky factors, log-sum-exp responsibilities and
weighted sufficient statistics for the four covariance types, batched over a leading group
axis ``G`` and chunked over samples under a memory budget. One EM iteration of a fit is one
fused pass (``_fused.em_pass``: log-densities, responsibilities and centred statistics per
chunk of rows sized to the cache, never the ``(G, N, K)`` matrix). Two backends export the same
``log_prob_norm`` and ``m_step_statistics``: dense torch (``_dense``, re-exported here) and
KeOps (``idefender_gpu.kernels._keops``, imported lazily: pykeops is optional). Factor
conversions and the covariance-shape table (:func:`precision_shape`) live in ``_linalg``;
numerical settings (the TF32 opt-in :func:`allow_tf32`) in ``_settings``.

Importing this package imports torch only (never scikit-learn, pykeops or the mixture and
detector stack).
"""

from ._chunks import (
    CUDA_FREE_FRACTION,
    DEFAULT_MEMORY_BUDGET,
    MIN_CHUNK_ROWS,
    MAX_PASS_BYTES,
    MIN_PASS_ROWS,
    chunk_rows,
    default_memory_budget,
    pass_rows,
)
from ._dense import (
    estimate_gaussian_parameters,
    estimate_log_prob_resp,
    log_gaussian_prob,
    log_prob_norm,
    log_prob_norm_and_resp,
    m_step_statistics,
    shifted_statistics,
    statistics_shapes,
    statistics_to_parameters,
    tied_covariance,
    tied_second_moment,
)
from ._fused import em_pass, pass_bytes_per_row
from ._linalg import (
    COVARIANCE_TYPES,
    check_cholesky_info,
    compute_prec_chol,
    covariance_from_prec_chol,
    log_det_prec_chol,
    prec_chol_from_precisions,
    precision_shape,
    prec_chol_from_scale_tril,
    precision_from_prec_chol,
    scale_tril_from_prec_chol,
)
from ._settings import allow_tf32, tf32_enabled

__all__ = [
    "COVARIANCE_TYPES",
    "MAX_PASS_BYTES",
    "MIN_PASS_ROWS",
    "em_pass",
    "pass_bytes_per_row",
    "pass_rows",
    "CUDA_FREE_FRACTION",
    "MIN_CHUNK_ROWS",
    "allow_tf32",
    "tf32_enabled",
    "DEFAULT_MEMORY_BUDGET",
    "check_cholesky_info",
    "chunk_rows",
    "default_memory_budget",
    "compute_prec_chol",
    "covariance_from_prec_chol",
    "estimate_gaussian_parameters",
    "estimate_log_prob_resp",
    "log_det_prec_chol",
    "log_gaussian_prob",
    "log_prob_norm",
    "log_prob_norm_and_resp",
    "m_step_statistics",
    "prec_chol_from_precisions",
    "prec_chol_from_scale_tril",
    "precision_from_prec_chol",
    "precision_shape",
    "scale_tril_from_prec_chol",
    "shifted_statistics",
    "statistics_shapes",
    "statistics_to_parameters",
    "tied_covariance",
    "tied_second_moment",
]
