"""The fused E+M pass of the dense backend (issue 17): ``kernels.em_pass``.

Oracle: the unfused dense kernels (``estimate_log_prob_resp`` then ``shifted_statistics``
on the whole ``(G, N, K)`` responsibilities), which ``tests/test_kernels.py`` checks against
scipy and scikit-learn. Chunked equals unchunked to round-off (chunks of 1 row, a few rows
and all rows), every covariance type, G > 1 groups with padding, float32 and float64. A fit
allocates no ``(G, N, K)`` tensor per EM iteration. The chunk-size rule reads the cache
size from sysfs (a fake tree here) and honours an explicit budget exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import idefender_gpu.kernels as ker
from idefender_gpu.kernels import _dense
from conftest import make_blobs, tol

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


def _problem(covariance_type, dtype, G=3, N=37, K=4, D=5, seed=0):
    """Data far from the origin, groups padded to N rows (group 1: 30, group 2: 9)."""
    gen = torch.Generator().manual_seed(seed)
    opts = {"generator": gen, "dtype": torch.float64}
    X = 2 * torch.randn(G, N, D, **opts) + 10
    weight = torch.ones(G, N, dtype=torch.float64)
    if G == 3:
        weight[1, 30:] = 0
        weight[2, 9:] = 0
    X = X * weight.unsqueeze(-1)  # zero padding rows, as the group layout has them
    means = torch.randn(G, K, D, **opts) + 10
    log_weights = torch.log_softmax(torch.randn(G, K, **opts), -1)
    if covariance_type in ("full", "tied"):
        shape = (G, K, D, D) if covariance_type == "full" else (G, D, D)
        A = 0.4 * torch.randn(*shape, **opts)
        cov = A @ A.mT + torch.eye(D, dtype=torch.float64)
    else:
        cov = torch.rand(*ker.precision_shape(covariance_type, G, K, D), **opts) + 0.5
    prec_chol, info = ker.compute_prec_chol(cov, covariance_type)
    assert not info.any()
    cast = lambda t: t.to(dtype)  # noqa: E731
    return cast(X), cast(weight), cast(log_weights), cast(means), cast(prec_chol)


def _unfused(X, weight, log_weights, means, prec_chol, covariance_type):
    """The oracle: the whole (G, N, K) responsibilities, then the shifted statistics."""
    log_prob_norm, log_resp = ker.estimate_log_prob_resp(X, log_weights, means, prec_chol,
                                                         covariance_type)
    resp = log_resp.exp() * weight.unsqueeze(-1)
    stats = ker.shifted_statistics(X, resp, means, covariance_type)
    return ((log_prob_norm * weight).sum(-1), *stats)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_em_pass_equals_unfused_statistics_for_every_chunk_size(covariance_type, dtype):
    X, weight, log_weights, means, prec_chol = _problem(covariance_type, dtype)
    oracle = _unfused(*(t.double() for t in (X, weight, log_weights, means, prec_chol)),
                      covariance_type)
    names = ("log_lik", "counts", "first", "second")
    # float32: the diag/spherical second moment is re-centred from sums about c̄ (the
    # shifted-data algorithm): its error is relative to Σ r (x - c̄)², not to the result
    loose = {"rtol": 1e-4, "atol": 2e-3} if dtype == torch.float32 else tol(dtype)
    unchunked = None
    for rows in (1, 4, X.shape[1]):
        got = ker.em_pass(X, log_weights, means, prec_chol, covariance_type,
                          sample_weight=weight, rows=rows)
        for name, value, expected in zip(names, got, oracle):
            assert value.dtype == dtype and value.shape == expected.shape, name
            torch.testing.assert_close(value.double(), expected, **loose, msg=name)
        if unchunked is None:
            unchunked = got
        else:  # chunked == unchunked to round-off
            for name, a, b in zip(names, got, unchunked):
                scale = b.abs().max().clamp_min(1)
                assert float((a - b).abs().max() / scale) < 50 * torch.finfo(dtype).eps, name


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_em_pass_without_padding_and_parameters_from_statistics(covariance_type):
    """No sample weight (one full group); the statistics give the unfused M-step."""
    X, _, log_weights, means, prec_chol = _problem(covariance_type, torch.float64, G=1, N=23)
    log_lik, counts, first, second = ker.em_pass(X, log_weights, means, prec_chol,
                                                 covariance_type, memory_budget=1)  # 1 row
    log_prob_norm, log_resp = ker.estimate_log_prob_resp(X, log_weights, means, prec_chol,
                                                         covariance_type)
    torch.testing.assert_close(log_lik, log_prob_norm.sum(-1), **tol(torch.float64))
    expected = ker.estimate_gaussian_parameters(X, log_resp.exp(), 1e-3, covariance_type)
    got = ker.statistics_to_parameters(counts, first, second, means, 1e-3, covariance_type)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tol(torch.float64))


@pytest.mark.filterwarnings("ignore::idefender_gpu.exceptions.ConvergenceWarning")
def test_fit_allocates_no_n_by_k_tensor_per_iteration(monkeypatch):
    """Issue 17: an EM iteration is one fused pass; the (G, N, K) log-densities are made
    only outside the iterations (the final E-step of fit_predict / scoring)."""
    from idefender_gpu.mixture import BatchedGaussianMixture

    X, y = make_blobs([60, 45], 3, 2, seed=1)
    calls = []
    original = _dense._output
    monkeypatch.setattr(_dense, "_output", lambda *a: calls.append(1) or original(*a))
    counts = {}
    for max_iter in (1, 3):
        calls.clear()
        BatchedGaussianMixture(2, max_iter=max_iter, tol=0.0, init_params="random_from_data",
                               random_state=0, dtype="float64").fit(X, y)
        counts[max_iter] = len(calls)
    assert counts[1] == counts[3]


@pytest.mark.filterwarnings("ignore::idefender_gpu.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("covariance_type", ("full", "diag"))
def test_in_memory_fit_equals_streamed_fit(covariance_type):
    """Both sources make the same fused pass (the stream batch by batch)."""
    from idefender_gpu.mixture import GaussianMixture

    X, _ = make_blobs(90, 3, 3, seed=2)
    common = dict(covariance_type=covariance_type, max_iter=4, tol=0.0, random_state=0,
                  init_params="random_from_data", dtype="float64", device="cpu")
    init = dict(weights_init=np.full(3, 1 / 3), means_init=X[[0, 40, 80]])
    a = GaussianMixture(3, **common, **init).fit(X)
    b = GaussianMixture(3, **common, **init).fit_stream([X[:50], X[50:]])
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(a.covariances_, b.covariances_, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(a.lower_bound_, b.lower_bound_, rtol=1e-12)


# --------------------------------------------------------------------------------------
# Chunk size of the pass
# --------------------------------------------------------------------------------------


def test_pass_rows_fill_the_default_budget_with_a_floor_and_an_explicit_budget_exactly():
    budget = ker.DEFAULT_MEMORY_BUDGET["cpu"]
    bpr = ker.pass_bytes_per_row("diag", 1, 256, 16, 4)
    assert bpr == (256 + 33) * 4
    assert ker.pass_rows(10**6, bpr, None, "cpu") == budget // bpr  # 7256 rows of d-diag
    assert ker.pass_rows(100, bpr, None, "cpu") == 100  # never more than N
    # thin GEMMs are slow: at least MIN_PASS_ROWS rows (8 MiB / 143 kB would be 58: workload b)...
    b_row = ker.pass_bytes_per_row("full", 10, 3, 512, 4)
    assert budget // b_row < ker.MIN_PASS_ROWS
    assert ker.pass_rows(10**6, b_row, None, "cpu") == ker.MIN_PASS_ROWS
    # ... while those stay within MAX_PASS_BYTES (ImageNet's 1000 classes: 49 MB per row)
    c1_row = ker.pass_bytes_per_row("full", 1000, 1, 4096, 4)
    assert ker.pass_rows(10**6, c1_row, None, "cpu") == max(1, ker.MAX_PASS_BYTES // c1_row)
    assert ker.pass_rows(10**6, bpr, 10 * bpr, "cpu") == 10  # an explicit budget, exactly
    assert ker.pass_rows(10**6, bpr, 1, "cpu") == 1


@pytest.mark.parametrize("covariance_type", ("diag", "spherical"))
def test_statistics_to_parameters_floors_a_variance_rounded_below_zero(covariance_type):
    """The fused pass re-centres diag moments from sums about the centre of the means: a
    variance that should be 0 can come out as -1e-9; it is floored at 0 before reg_covar,
    as the unfused M-step does (``_covariances_diag``)."""
    counts = torch.ones(1, 1, dtype=torch.float64)
    first = torch.ones(1, 1, 2, dtype=torch.float64)
    second = torch.full((1, 1, 2), 1 - 1e-9, dtype=torch.float64)
    centres = torch.zeros(1, 1, 2, dtype=torch.float64)
    _, _, var = ker.statistics_to_parameters(counts, first, second, centres, 1e-6, covariance_type)
    assert bool((var >= 1e-6).all())
