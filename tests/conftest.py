"""Shared fixtures: tolerance table, seeded RNG, devices. No network access anywhere."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

# One tolerance table, per dtype (C13). float64 oracles are tight; float32 loosened by
# round-off of accumulations over thousands of samples.
TOLERANCES = {
    torch.float64: {"rtol": 1e-8, "atol": 1e-10},
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tol(dtype: torch.dtype) -> dict:
    """``rtol``/``atol`` keywords for ``torch.testing.assert_close`` at ``dtype``."""
    return TOLERANCES[dtype]


@pytest.fixture
def seed():
    """Seed torch, NumPy and ``random``; restore the global RNG states afterwards."""
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()
    py_state = random.getstate()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield 0
    torch.random.set_rng_state(torch_state)
    np.random.set_state(np_state)
    random.setstate(py_state)


@pytest.fixture(params=DEVICES)
def device(request):
    """Every available device: CPU always, CUDA when present."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Comparisons with dense float references run without TF32 (restored afterwards)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def make_blobs(n_per_group, n_features, n_components, *, seed=0, spread=4.0, dtype=np.float64):
    """Gaussian blobs: for each group, ``n_components`` clusters with random covariances.

    Returns ``X (N, D)`` and group labels ``y (N,)`` (all zeros when ``n_per_group`` is an int).
    """
    rng = np.random.default_rng(seed)
    sizes = [n_per_group] if np.isscalar(n_per_group) else list(n_per_group)
    xs, ys = [], []
    for g, n in enumerate(sizes):
        centres = rng.normal(scale=spread, size=(n_components, n_features))
        comp = rng.integers(0, n_components, size=n)
        mix = rng.normal(size=(n_components, n_features, n_features)) / np.sqrt(n_features)
        noise = rng.normal(size=(n, n_features))
        xs.append(centres[comp] + np.einsum("nd,nde->ne", noise, mix[comp]) + 0.3 * noise)
        ys.append(np.full(n, g))
    return np.concatenate(xs).astype(dtype), np.concatenate(ys)
