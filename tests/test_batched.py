"""``BatchedGaussianMixture``: one batched fit equals G separate ``GaussianMixture`` fits.

The oracle is G independent ``GaussianMixture`` fits (themselves checked against
scikit-learn in ``test_gaussian_mixture.py``) from the same per-group initial parameters.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import sklearn.exceptions
import torch
from conftest import make_blobs, tol

from idefender_gpu.exceptions import ConvergenceWarning
from idefender_gpu.mixture import BatchedGaussianMixture, GaussianMixture
from idefender_gpu.mixture import _core as mixture_core

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]
FITTED = ["weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"]
SIZES = (150, 300, 80, 220)
K = 3
F64 = tol(torch.float64)


def assert_allclose64(actual, desired, **overrides):
    np.testing.assert_allclose(actual, desired, **{**F64, **overrides})


def crude_inits(X, n_components, covariance_type, seed):
    """Poor initial parameters (random rows as means, isotropic precisions): many EM steps."""
    rng = np.random.default_rng(seed)
    n_samples, n_features = X.shape
    means = X[rng.choice(n_samples, n_components, replace=False)].copy()
    weights = np.full(n_components, 1.0 / n_components)
    v = 1.0 / X.var(0).mean()
    precisions = {
        "full": np.tile(np.eye(n_features) * v, (n_components, 1, 1)),
        "tied": np.eye(n_features) * v,
        "diag": np.full((n_components, n_features), v),
        "spherical": np.full(n_components, v),
    }[covariance_type]
    return {"weights_init": weights, "means_init": means, "precisions_init": precisions}


@pytest.fixture(scope="module")
def groups_data():
    """G=4 groups of sizes 150/300/80/220, D=4, K=3 blobs each; rows shuffled so the
    labels are interleaved (the batched layout must not rely on sorted y)."""
    X, y = make_blobs(list(SIZES), 4, K, seed=3, spread=2.5)
    perm = np.random.default_rng(0).permutation(len(X))
    return X[perm], y[perm]


def per_group_inits(X, y, covariance_type):
    per = [crude_inits(X[y == g], K, covariance_type, seed=g) for g in range(len(SIZES))]
    stacked = {key: np.stack([p[key] for p in per]) for key in per[0]}
    return per, stacked


def separate_fits(X, y, covariance_type, per, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return [GaussianMixture(K, covariance_type=covariance_type, **per[g], **kwargs).fit(X[y == g])
                for g in range(len(per))]


def fit_batched(X, y, covariance_type, stacked, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return BatchedGaussianMixture(K, covariance_type=covariance_type, **stacked, **kwargs).fit(X, y)


def assert_matches_separate(batched, separate):
    G = len(separate)
    assert batched.n_groups_ == G
    for name in FITTED:
        value = getattr(batched, name)
        assert isinstance(value, np.ndarray) and value.dtype == np.float64
        assert value.shape == (G, *getattr(separate[0], name).shape), name
        for g in range(G):
            assert_allclose64(value[g], getattr(separate[g], name), err_msg=f"{name}[{g}]")
    np.testing.assert_array_equal(batched.n_iter_, [s.n_iter_ for s in separate])
    np.testing.assert_array_equal(batched.converged_, [s.converged_ for s in separate])
    assert batched.converged_.dtype == np.bool_ and batched.n_iter_.dtype == np.int64
    assert_allclose64(batched.lower_bound_, [s.lower_bound_ for s in separate])
    assert isinstance(batched.lower_bounds_, list) and len(batched.lower_bounds_) == G
    for g in range(G):
        assert len(batched.lower_bounds_[g]) == separate[g].n_iter_
        assert_allclose64(batched.lower_bounds_[g], separate[g].lower_bounds_)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_batched_equals_separate_fits(groups_data, covariance_type):
    X, y = groups_data
    per, stacked = per_group_inits(X, y, covariance_type)
    separate = separate_fits(X, y, covariance_type, per, tol=1e-5)
    n_iters = [s.n_iter_ for s in separate]
    assert len(set(n_iters)) > 1, f"precondition: groups converge at different iterations {n_iters}"
    assert all(s.converged_ for s in separate)
    batched = fit_batched(X, y, covariance_type, stacked, tol=1e-5)
    assert_matches_separate(batched, separate)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_converged_groups_stop_changing(groups_data, covariance_type):
    """max_iter between the groups' iteration counts: groups that converged before it keep
    their converged parameters while the others go on and stop unconverged."""
    X, y = groups_data
    per, stacked = per_group_inits(X, y, covariance_type)
    separate = separate_fits(X, y, covariance_type, per, tol=1e-5)
    n_iters = sorted(s.n_iter_ for s in separate)
    cut = n_iters[0] + (n_iters[-1] - n_iters[0]) // 2
    assert n_iters[0] <= cut < n_iters[-1]
    with pytest.warns(ConvergenceWarning, match="groups") as record:
        batched = BatchedGaussianMixture(K, covariance_type=covariance_type, tol=1e-5, max_iter=cut,
                                         **stacked).fit(X, y)
    capped = separate_fits(X, y, covariance_type, per, tol=1e-5, max_iter=cut)
    assert_matches_separate(batched, capped)
    unconverged = [g for g, s in enumerate(separate) if s.n_iter_ > cut]
    assert list(np.flatnonzero(~batched.converged_)) == unconverged
    message = str(record[0].message)
    assert f"groups {unconverged}" in message  # names the groups that did not converge
    for g, s in enumerate(separate):
        if s.n_iter_ <= cut:  # converged before the cut: identical to the uncapped fit
            for name in FITTED:
                assert_allclose64(getattr(batched, name)[g], getattr(s, name), err_msg=f"{name}[{g}]")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_batched_predictions_match_separate_models(groups_data, covariance_type):
    X, y = groups_data
    per, stacked = per_group_inits(X, y, covariance_type)
    separate = separate_fits(X, y, covariance_type, per)
    batched = fit_batched(X, y, covariance_type, stacked)
    N, G = len(X), len(SIZES)

    own = batched.score_samples(X, y)
    assert own.shape == (N,) and own.dtype == np.float64
    every = batched.score_samples(X)
    assert every.shape == (N, G)
    proba = batched.predict_proba(X, y)
    assert proba.shape == (N, K)
    labels = batched.predict(X, y)
    assert labels.shape == (N,) and labels.dtype == np.int64
    for g in range(G):
        mask = y == g
        assert_allclose64(own[mask], separate[g].score_samples(X[mask]))
        assert_allclose64(every[:, g], separate[g].score_samples(X))
        assert_allclose64(proba[mask], separate[g].predict_proba(X[mask]))
        np.testing.assert_array_equal(labels[mask], separate[g].predict(X[mask]))
    # own-group rows and all-group rows go through GEMMs of different shapes: BLAS may
    # order the sums differently, so equal to round-off, not bitwise
    np.testing.assert_allclose(own, every[np.arange(N), y], rtol=1e-13, atol=0)
    np.testing.assert_array_equal(labels, proba.argmax(1))
    assert_allclose64(batched.score(X, y), own.mean())
    # a subset with a single group and a single sample go through the same layout
    mask = y == 2
    assert_allclose64(batched.score_samples(X[mask], y[mask]), every[mask, 2])
    assert_allclose64(batched.score_samples(X[:1], y[:1]), every[:1, y[0]])
    # fit_predict equals fit(X, y).predict(X, y), also when stopped early
    for max_iter in (1, 100):
        fp = fit_batched(X, y, covariance_type, stacked, max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fp_labels = BatchedGaussianMixture(K, covariance_type=covariance_type, max_iter=max_iter,
                                               **stacked).fit_predict(X, y)
        np.testing.assert_array_equal(fp_labels, fp.predict(X, y))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_lower_bound_never_decreases(groups_data, covariance_type):
    X, y = groups_data
    _, stacked = per_group_inits(X, y, covariance_type)
    batched = fit_batched(X, y, covariance_type, stacked, tol=1e-8, max_iter=200)
    assert max(len(b) for b in batched.lower_bounds_) >= 10, "precondition: a long EM run"
    for g, bounds in enumerate(batched.lower_bounds_):
        assert len(bounds) >= 3
        assert bounds.dtype == np.float64
        steps = np.diff(bounds)
        # EM is monotone; allow only the round-off of a mean over a few hundred
        # log-densities (observed decreases of ~1e-14 once converged)
        assert np.all(steps >= -1e-12 * np.abs(bounds[1:])), (g, steps.min())
        assert bounds[-1] == batched.lower_bound_[g]


def test_group_with_fewer_samples_than_components_is_named(groups_data):
    X, y = groups_data
    keep = (y != 2) | (np.cumsum(y == 2) <= 2)  # group 2 keeps only 2 samples < K=3
    with pytest.raises(ValueError, match=r"n_components = 3, n_samples = 2 for group 2"):
        BatchedGaussianMixture(K).fit(X[keep], y[keep])
    missing = np.where(y == 1, 3, y)  # labels 0, 2, 3: group 1 is empty
    with pytest.raises(ValueError, match="for group 1"):
        BatchedGaussianMixture(K).fit(X, missing)


def test_n_init_keeps_the_best_run_per_group(groups_data, monkeypatch):
    X, y = groups_data
    finals = []
    real_run_em = mixture_core.run_em

    def spy(*args, **kwargs):
        run = real_run_em(*args, **kwargs)
        finals.append(run.lower_bound.detach().cpu().clone())
        return run

    monkeypatch.setattr(mixture_core, "run_em", spy)
    batched = BatchedGaussianMixture(K, n_init=4, init_params="random", random_state=1).fit(X, y)
    runs = torch.stack(finals).numpy()  # (n_init, G)
    assert runs.shape == (4, len(SIZES))
    winners = runs.argmax(0)
    assert len(set(winners.tolist())) > 1, "precondition: different runs win in different groups"
    np.testing.assert_array_equal(batched.lower_bound_, runs.max(0))
    for g, bounds in enumerate(batched.lower_bounds_):
        assert bounds[-1] == batched.lower_bound_[g]


def test_max_iter_zero_keeps_the_inits(groups_data):
    X, y = groups_data
    _, stacked = per_group_inits(X, y, "diag")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batched = BatchedGaussianMixture(K, covariance_type="diag", max_iter=0, **stacked).fit(X, y)
    np.testing.assert_array_equal(batched.means_, stacked["means_init"])
    assert_allclose64(batched.precisions_, stacked["precisions_init"])
    assert np.all(batched.lower_bound_ == -np.inf)
    np.testing.assert_array_equal(batched.n_iter_, 0)
    assert not batched.converged_.any()
    assert all(len(b) == 0 for b in batched.lower_bounds_)


def test_sample_shapes_and_component_means(groups_data):
    X, y = groups_data
    batched = BatchedGaussianMixture(K, covariance_type="full", random_state=0).fit(X, y)
    samples, labels = batched.sample(4000)
    assert samples.shape == (len(SIZES), 4000, 4) and samples.dtype == np.float64
    assert labels.shape == (len(SIZES), 4000) and labels.dtype == np.int64
    for g in range(len(SIZES)):
        assert np.all(np.diff(labels[g]) >= 0)
        for k in range(K):
            draws = samples[g][labels[g] == k]
            if len(draws) < 200:
                continue
            se = np.sqrt(np.diag(batched.covariances_[g, k]) / len(draws))
            # 6 standard errors: fails with probability < 1e-8 per coordinate (fixed seed)
            assert np.all(np.abs(draws.mean(0) - batched.means_[g, k]) < 6 * se), (g, k)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64])
def test_batched_numpy_dtype_is_preserved(groups_data, np_dtype):
    X, y = groups_data
    batched = BatchedGaussianMixture(2, random_state=0).fit(X.astype(np_dtype), y)
    for name in FITTED:
        assert getattr(batched, name).dtype == np_dtype, name
    assert batched.lower_bound_.dtype == np_dtype
    assert batched.score_samples(X.astype(np_dtype)).dtype == np_dtype
    assert batched.score_samples(X.astype(np_dtype), y).dtype == np_dtype
    assert batched.predict_proba(X.astype(np_dtype), y).dtype == np_dtype
    assert batched.predict(X.astype(np_dtype), y).dtype == np.int64
    assert batched.sample(3)[0].dtype == np_dtype


def test_batched_tensor_in_tensor_out(groups_data, device):
    X, y = groups_data
    Xt = torch.as_tensor(X, device=device)
    yt = torch.as_tensor(y, device=device)
    batched = BatchedGaussianMixture(2, random_state=0).fit(Xt, yt)
    for name in FITTED + ["lower_bound_", "converged_", "n_iter_"]:
        value = getattr(batched, name)
        assert isinstance(value, torch.Tensor) and value.device == Xt.device, name
    assert batched.converged_.dtype == torch.bool and batched.n_iter_.dtype == torch.int64
    assert all(isinstance(b, torch.Tensor) for b in batched.lower_bounds_)
    for out in (batched.score_samples(Xt, yt), batched.score_samples(Xt), batched.predict_proba(Xt, yt)):
        assert isinstance(out, torch.Tensor) and out.device == Xt.device and out.dtype == torch.float64
    labels = batched.predict(Xt, yt)
    assert labels.dtype == torch.int64 and labels.device == Xt.device
    samples, sample_labels = batched.sample(3)
    assert tuple(samples.shape) == (len(SIZES), 3, 4) and samples.device == Xt.device
    ref = BatchedGaussianMixture(2, random_state=0, device=Xt.device).fit(X, y)  # same device, same draws
    torch.testing.assert_close(batched.means_.cpu(), torch.from_numpy(ref.means_), **F64)


def test_convergence_warning_class(groups_data):
    X, y = groups_data
    with pytest.warns(sklearn.exceptions.ConvergenceWarning):
        BatchedGaussianMixture(K, max_iter=1, tol=1e-12, random_state=0).fit(X, y)


@pytest.mark.keops
@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_keops_backend_fit_equals_dense_fit(covariance_type):
    """backend='keops' (lazy reductions, responsibilities never stored) gives the dense fit:
    unequal groups (padding weights), same inits, float64."""
    pytest.importorskip("pykeops")
    X, y = make_blobs([120, 200, 90], 3, 3, seed=11)
    common = dict(init_params="random_from_data", random_state=0, tol=1e-8, max_iter=40,
                  covariance_type=covariance_type)
    dense = BatchedGaussianMixture(3, backend="torch", **common).fit(X, y)
    lazy = BatchedGaussianMixture(3, backend="keops", **common).fit(X, y)
    np.testing.assert_array_equal(lazy.n_iter_, dense.n_iter_)
    for name in ("weights_", "means_", "covariances_", "lower_bound_"):
        np.testing.assert_allclose(getattr(lazy, name), getattr(dense, name), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(lazy.score_samples(X, y), dense.score_samples(X, y), rtol=1e-10)
    np.testing.assert_allclose(lazy.score_samples(X), dense.score_samples(X), rtol=1e-10)


@pytest.mark.parametrize("block", [1, 2, 3])
def test_group_blocks_and_storage_device_equal_one_block(block):
    """Fitting G=5 independent mixtures ``block`` groups at a time, parameters kept on the
    storage device, gives exactly the one-block fit; scoring gathers only the groups needed."""
    X, y = make_blobs([150, 300, 80, 120, 60], 4, 2, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = BatchedGaussianMixture(2, init_params="random_from_data", random_state=0).fit(X, y)
    common = dict(weights_init=ref.weights_, means_init=ref.means_ * 0.9,
                  precisions_init=ref.precisions_, tol=1e-8, max_iter=30)
    one = BatchedGaussianMixture(2, **common).fit(X, y)
    blocked = BatchedGaussianMixture(2, group_block_size=block, storage_device="cpu", **common).fit(X, y)
    # Same arithmetic per group; a GEMM library may still round the block shapes differently
    # in the last bit (cuBLAS), hence a tolerance of a few ulps on the floats.
    close = dict(rtol=1e-12, atol=1e-14)
    for name in ("n_iter_", "converged_"):
        np.testing.assert_array_equal(getattr(blocked, name), getattr(one, name))
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_", "lower_bound_"):
        np.testing.assert_allclose(getattr(blocked, name), getattr(one, name), **close, err_msg=name)
    for a, b in zip(blocked.lower_bounds_, one.lower_bounds_):
        np.testing.assert_allclose(a, b, **close)
    subset = y < 2  # a batch holding two of the five groups
    np.testing.assert_allclose(blocked.score_samples(X[subset], y[subset]),
                               one.score_samples(X[subset], y[subset]), **close)
    np.testing.assert_allclose(blocked.predict_proba(X, y), one.predict_proba(X, y), **close)
    # (N, G) under every group: different GEMM shapes per block, so round-off only
    np.testing.assert_allclose(blocked.score_samples(X), one.score_samples(X), rtol=1e-12)


def test_group_blocks_are_validated():
    X, y = make_blobs([50, 60], 2, 1, seed=0)
    with pytest.raises(ValueError, match="group_block_size"):
        BatchedGaussianMixture(1, group_block_size=0).fit(X, y)
    with pytest.raises(ValueError, match="storage_device"):
        BatchedGaussianMixture(1, storage_device="nope").fit(X, y)
    with pytest.raises(ValueError, match="not supported by fit_stream"):
        BatchedGaussianMixture(1, group_block_size=1).fit_stream([(X, y)])
