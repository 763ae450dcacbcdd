"""Adversarial-input detectors built on a classifier's hidden states.

``IDefender`` (Zheng & Hong 2018: one Gaussian mixture per class) and the baseline
``MahalanobisDetector`` (Lee et al. 2018: one Gaussian per class, one shared covariance)
share one API: ``fit(loader)``, ``calibrate(loader)``, ``log_density(x)`` (differentiable),
``score(x)``, ``reject(x)``, ``predict(x)``, ``thresholds_``, ``save(path)`` and
``load(path, model)`` (safetensors; never unpickles).
"""

from idefender_gpu.detector._idefender import IDefender
from idefender_gpu.detector._mahalanobis import MahalanobisDetector

__all__ = ["IDefender", "MahalanobisDetector"]
