"""Streaming EM (``fit_stream``) equals the in-memory fit; the memory budget bounds peak memory."""

from __future__ import annotations

import os
import textwrap
import warnings

import numpy as np
import pytest
import torch
from conftest import make_blobs, run_peak_rss

from idefender_gpu.mixture import BatchedGaussianMixture, GaussianMixture

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


@pytest.fixture(scope="module")
def grouped():
    X, y = make_blobs([150, 300, 80], 4, 3, seed=1)
    perm = np.random.default_rng(0).permutation(len(X))
    return X[perm], y[perm]


def _inits(X, y, covariance_type):
    """A converged fit's parameters, perturbed: every component alive, EM still has work."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = BatchedGaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(X, y)
    return dict(weights_init=ref.weights_, means_init=ref.means_ * 0.9 + 0.1,
                precisions_init=ref.precisions_, covariance_type=covariance_type)


def _uneven_batches(X, y, sizes=(37, 5, 64, 1, 90)):
    out, start, i = [], 0, 0
    while start < len(X):
        stop = start + sizes[i % len(sizes)]
        out.append((X[start:stop], y[start:stop]))
        start, i = stop, i + 1
    return out


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_batched_stream_equals_in_memory_fit(grouped, covariance_type):
    X, y = grouped
    common = dict(_inits(X, y, covariance_type), tol=1e-8, max_iter=40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = BatchedGaussianMixture(2, **common).fit(X, y)
        stream = BatchedGaussianMixture(2, **common).fit_stream(_uneven_batches(X, y))
    np.testing.assert_array_equal(stream.n_iter_, memory.n_iter_)
    np.testing.assert_array_equal(stream.converged_, memory.converged_)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "lower_bound_"):
        # one pass with statistics centred on the current means vs. two-pass centred sums:
        # the same algebra, different float64 round-off
        np.testing.assert_allclose(getattr(stream, name), getattr(memory, name), rtol=1e-9, atol=1e-11)
    for a, b in zip(stream.lower_bounds_, memory.lower_bounds_):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_single_mixture_stream_from_a_dataloader(grouped):
    """A torch DataLoader of X alone (float32 tensors): the in-memory fit, tensor outputs."""
    X, _ = grouped
    X32 = torch.from_numpy(X).float()
    inits = _inits(X, np.zeros(len(X), dtype=int), "full")
    common = dict(weights_init=inits["weights_init"][0], means_init=inits["means_init"][0],
                  precisions_init=inits["precisions_init"][0], tol=1e-5, max_iter=30)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X32), batch_size=64)
    memory = GaussianMixture(2, **common).fit(X32)
    stream = GaussianMixture(2, **common).fit_stream(loader)
    assert isinstance(stream.means_, torch.Tensor) and stream.means_.dtype == torch.float32
    assert stream.n_iter_ == memory.n_iter_
    torch.testing.assert_close(stream.means_, memory.means_, rtol=1e-4, atol=1e-4)  # float32 sums
    torch.testing.assert_close(stream.covariances_, memory.covariances_, rtol=1e-4, atol=1e-4)
    assert abs(stream.lower_bound_ - memory.lower_bound_) < 1e-4 * abs(memory.lower_bound_)


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random_from_data"])
def test_stream_initialisations_reach_the_in_memory_likelihood(grouped, init_params):
    """Seeds come from a reservoir sample (and Lloyd passes for 'kmeans'), so runs differ
    from the in-memory ones; on easy data they reach the same likelihood within 2%.
    ('random' responsibilities land in a poor local optimum for about half the seeds, in
    memory and streamed alike, so it gets only the finiteness check below.)"""
    X, y = grouped
    batches = _uneven_batches(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = BatchedGaussianMixture(3, init_params=init_params, random_state=0, n_init=2).fit_stream(batches)
        memory = BatchedGaussianMixture(3, init_params=init_params, random_state=0, n_init=2).fit(X, y)
    assert stream.score(X, y) >= memory.score(X, y) - 0.02 * abs(memory.score(X, y))


def test_stream_random_init_is_finite_and_converges(grouped):
    X, y = grouped
    model = BatchedGaussianMixture(3, init_params="random", random_state=0).fit_stream(_uneven_batches(X, y))
    assert np.isfinite(model.lower_bound_).all() and model.converged_.all()
    assert np.isfinite(model.score_samples(X, y)).all()


def test_stream_accepts_a_callable_and_is_reproducible(grouped):
    X, y = grouped
    make = lambda: iter(_uneven_batches(X, y))  # noqa: E731 - a fresh iterator per pass
    a = BatchedGaussianMixture(2, random_state=3).fit_stream(make)
    b = BatchedGaussianMixture(2, random_state=3).fit_stream(make)
    np.testing.assert_array_equal(a.means_, b.means_)


def test_bad_streams(grouped):
    X, y = grouped
    model = BatchedGaussianMixture(2)
    with pytest.raises(TypeError, match="re-iterable"):
        model.fit_stream(iter(_uneven_batches(X, y)))
    with pytest.raises(ValueError, match="at least one batch"):
        model.fit_stream([])
    with pytest.raises(ValueError, match="features"):
        model.fit_stream([(X[:50], y[:50]), (X[50:, :3], y[50:])])
    bad = X.copy()
    bad[200, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.fit_stream(_uneven_batches(bad, y))
    with pytest.raises(ValueError, match="group labels"):
        model.fit_stream([(X, -y)])
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        BatchedGaussianMixture(2).fit_stream([(X[:3], np.array([0, 1, 1]))])


def test_failed_stream_fit_keeps_the_previous_fit(grouped):
    X, y = grouped
    model = BatchedGaussianMixture(2, random_state=0).fit(X, y)
    before = {k: np.copy(getattr(model, k)) for k in ("weights_", "means_", "covariances_")}
    bad = X.copy()
    bad[-1, 0] = np.inf
    with pytest.raises(ValueError):
        model.fit_stream(_uneven_batches(bad, y))
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(model, k), v)


_PEAK_RSS = textwrap.dedent(
    """
    import json, sys, warnings
    import torch
    from idefender_gpu.mixture import GaussianMixture

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200_000, 32, generator=g)
    P = torch.eye(32).expand(8, 32, 32).contiguous()
    kw = dict(weights_init=torch.full((8,), 1 / 8), means_init=X[:8].clone(), precisions_init=P)
    GaussianMixture(8, max_iter=1, **kw, memory_budget=2**20).fit(X[:1000])  # warm-up

    def peak(budget):
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
            f.write("5")
        base = status("VmRSS")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            GaussianMixture(8, max_iter=2, tol=0.0, memory_budget=budget, **kw).fit(X)
        return status("VmHWM") - base

    print(json.dumps({budget: peak(int(budget)) for budget in sys.argv[1:]}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_budget_bounds_peak_rss():
    """Peak RSS of a fit (N=200000, D=32, K=8, full, float32) in a fresh process, from
    Linux's VmHWM reset just before the fit (``/proc/self/clear_refs``).

    Unchunked, the Mahalanobis GEMM output alone is N*K*D*4 = 205 MB. With a 4 MiB budget
    the peak must stay within twice the budget plus the data (25.6 MB), a few (N, K)
    responsibility-sized arrays (6.4 MB each) and 16 MiB of allocator slack; with a budget
    large enough for one chunk it must exceed 150 MB (so the measurement can fail). Both
    fits run in one fresh process, the small budget first (VmHWM reset before each).
    """
    budget = 4 * 2**20
    data = 200_000 * 32 * 4
    resp = 200_000 * 8 * 4
    record = run_peak_rss(_PEAK_RSS, budget, 2**30)
    small, large = record[str(budget)], record[str(2**30)]
    assert small < 2 * budget + data + 6 * resp + 16 * 2**20, record
    assert large > 150 * 10**6, record


@pytest.mark.parametrize("cls", [GaussianMixture, BatchedGaussianMixture])
@pytest.mark.parametrize("params", [{"tol": float("nan")}, {"reg_covar": float("inf")}, {"n_init": 0}])
def test_fit_stream_validates_the_hyperparameters_before_reading(cls, params):
    """``fit_stream`` checks ``_parameter_constraints`` first: no batch is read."""
    read = []

    def data():
        read.append(1)
        return [np.zeros((4, 2))]

    with pytest.raises(ValueError, match=f"The '{next(iter(params))}' parameter of {cls.__name__} must be"):
        cls(1, **params).fit_stream(data)
    assert read == []
