"""idefender-gpu: GPU-native Gaussian mixtures and the I-defender adversarial-input detector.

Modules
-------
idefender_gpu.mixture
    ``GaussianMixture`` (a drop-in for ``sklearn.mixture.GaussianMixture``) and
    ``BatchedGaussianMixture`` (one mixture per group, all groups fitted in one pass).
idefender_gpu.kernels
    Pure tensor math: Gaussian log-densities from precision Cholesky factors,
    responsibilities, sufficient statistics, chunked under a memory budget.
"""

from idefender_gpu.exceptions import (
    ConvergenceWarning,
    NotFittedError,
    NotPSDError,
    NumericalWarning,
)

__version__ = "0.1.0"

__all__ = [
    "ConvergenceWarning",
    "NotFittedError",
    "NotPSDError",
    "NumericalWarning",
    "__version__",
]
