"""idefender-gpu: GPU-native Gaussian mixtures and the I-defender adversarial-input detector.

Modules
-------
idefender_gpu.mixture
    ``GaussianMixture`` (a drop-in for ``sklearn.mixture.GaussianMixture``) and
    ``BatchedGaussianMixture`` (one mixture per group, all groups fitted in one pass).
idefender_gpu.kernels
    Pure tensor math: Gaussian log-densities from precision Cholesky factors,
    responsibilities, sufficient statistics, chunked under a memory budget.
idefender_gpu.features
    Hidden-state capture from any ``nn.Module`` by forward hooks, over a DataLoader.
idefender_gpu.detector
    ``IDefender`` and the ``MahalanobisDetector`` baseline (also importable from here).
idefender_gpu.metrics
    ROC curve, ROC AUC and TPR at a fixed FPR on tensors.
idefender_gpu.distributed
    ``data_parallel()``: under ``torchrun``, the mixture fits (in memory and streaming)
    and ``IDefender.fit`` run data-parallel on ``torch.distributed``, one shard per rank.
"""

from idefender_gpu._lazy import lazy_exports

__version__ = "0.1.0"

# Public names resolved on first use (PEP 562), so that ``import idefender_gpu.kernels``
# imports neither the detector and mixture stack nor scikit-learn.
_LAZY = {
    "ConvergenceWarning": "idefender_gpu.exceptions",
    "InvalidParameterError": "idefender_gpu.exceptions",
    "NotFittedError": "idefender_gpu.exceptions",
    "NotPSDError": "idefender_gpu.exceptions",
    "NumericalWarning": "idefender_gpu.exceptions",
    "IDefender": "idefender_gpu.detector",
    "MahalanobisDetector": "idefender_gpu.detector",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "ConvergenceWarning",
    "IDefender",
    "InvalidParameterError",
    "MahalanobisDetector",
    "NotFittedError",
    "NotPSDError",
    "NumericalWarning",
    "__version__",
]
