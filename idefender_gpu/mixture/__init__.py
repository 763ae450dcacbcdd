"""Gaussian mixtures fitted by EM on the device of their input.

``GaussianMixture`` is a drop-in for ``sklearn.mixture.GaussianMixture``;
``BatchedGaussianMixture`` fits one mixture per group label in one batched pass.
"""

from idefender_gpu.mixture._gaussian_mixture import BatchedGaussianMixture, GaussianMixture

__all__ = ["BatchedGaussianMixture", "GaussianMixture"]
