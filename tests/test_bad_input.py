"""Bad input for ``GaussianMixture`` and ``BatchedGaussianMixture``.

Every error names the offending argument or value; a failed ``fit`` leaves a fitted
estimator exactly as it was; degenerate (but valid) data gives finite results.
"""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest
import sklearn.exceptions
import torch
from conftest import make_blobs

from idefender_gpu.exceptions import ConvergenceWarning, NotFittedError, NotPSDError
from idefender_gpu.mixture import BatchedGaussianMixture, GaussianMixture

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]
FITTED = ["weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"]


class Api:
    """Uniform calls for both estimators (the batched one with a single group 0)."""

    def __init__(self, batched: bool):
        self.batched = batched
        self.cls = BatchedGaussianMixture if batched else GaussianMixture
        self.name = self.cls.__name__

    def __repr__(self):
        return self.name

    def make(self, *args, **kwargs):
        return self.cls(*args, **kwargs)

    def y(self, X):
        return np.zeros(len(X), dtype=np.int64)

    def fit(self, model, X):
        return model.fit(X, self.y(X)) if self.batched else model.fit(X)

    def xy(self, X):
        """Arguments of predict-like methods."""
        return (X, self.y(X)) if self.batched else (X,)

    def init(self, array):
        """An init array in this estimator's layout (leading G=1 when batched)."""
        if isinstance(array, torch.Tensor):
            return array.unsqueeze(0) if self.batched else array
        array = np.asarray(array)
        return array[None] if self.batched else array


APIS = [Api(False), Api(True)]
api_param = pytest.mark.parametrize("api", APIS, ids=lambda a: a.name)


@pytest.fixture(scope="module")
def data():
    X, _ = make_blobs(120, 2, 2, seed=7, spread=4.0)
    return X


def snapshot(model):
    names = {k for k in vars(model) if k.endswith("_")} | set(FITTED)  # FITTED are properties
    state = {k: copy.deepcopy(getattr(model, k)) for k in names}
    assert set(FITTED) <= state.keys()
    return state


def assert_same_state(before, model):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        now = after[key]
        if isinstance(value, list):
            assert len(value) == len(now), key
            for a, b in zip(value, now):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(now), err_msg=key)


# --------------------------------------------------------------------------------------
# X
# --------------------------------------------------------------------------------------


@api_param
@pytest.mark.parametrize("bad, message", [(np.nan, "Input X contains NaN"),
                                          (np.inf, "Input X contains infinity"),
                                          (-np.inf, "Input X contains infinity")])
def test_non_finite_X(api, data, bad, message):
    X = data.copy()
    X[5, 1] = bad
    with pytest.raises(ValueError, match=message):
        api.fit(api.make(2), X)
    model = api.fit(api.make(2, random_state=0), data)
    for method in ("predict", "predict_proba", "score_samples", "score"):
        with pytest.raises(ValueError, match=message):
            getattr(model, method)(*api.xy(X))
    with pytest.raises(ValueError, match=message):  # also as a tensor
        api.fit(api.make(2), torch.from_numpy(X))


@api_param
def test_wrong_ndim(api, data):
    with pytest.raises(ValueError, match=r"Expected 2D array, got 1D array instead: X has shape \(120,\)"):
        api.fit(api.make(2), data[:, 0])
    with pytest.raises(ValueError, match=r"Expected 2D array, got 3D array instead: X has shape \(1, 120, 2\)"):
        api.fit(api.make(2), data[None])
    model = api.fit(api.make(2, random_state=0), data)
    with pytest.raises(ValueError, match="got 1D array"):
        model.score_samples(*api.xy(data[:, 0]))
    with pytest.raises(ValueError, match="got 3D array"):
        model.predict(data[None], *([np.zeros(1, dtype=int)] if api.batched else []))


@api_param
def test_feature_count_mismatch_after_fit(api, data):
    model = api.fit(api.make(2, random_state=0), data)
    message = re.escape(f"X has 3 features, but {api.name} is expecting 2 features as input.")
    X3 = np.zeros((4, 3))
    methods = ["predict", "predict_proba", "score_samples", "score"]
    if not api.batched:
        methods += ["bic", "aic"]
    for method in methods:
        with pytest.raises(ValueError, match=message):
            getattr(model, method)(*api.xy(X3))
    if api.batched:
        with pytest.raises(ValueError, match=message):
            model.score_samples(X3)
    # warm_start refit with another feature count: same wording
    model.set_params(warm_start=True)
    with pytest.raises(ValueError, match=message):
        api.fit(model, np.random.default_rng(0).normal(size=(20, 3)))


@api_param
def test_non_numeric_X(api, data):
    with pytest.raises(TypeError, match="X must be an array-like of real numbers"):
        api.fit(api.make(1), np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(ValueError, match="Complex data not supported"):
        api.fit(api.make(1), torch.ones(4, 2, dtype=torch.complex64))


@api_param
def test_fewer_samples_than_components(api, data):
    match = "Expected n_samples >= n_components but got n_components = 5, n_samples = 3"
    if api.batched:
        match += " for group 0"
    with pytest.raises(ValueError, match=match):
        api.fit(api.make(5), data[:3])


@api_param
def test_single_sample(api, data):
    with pytest.raises(ValueError, match=r"Found array with 1 sample\(s\) .* minimum of 2 is required"):
        api.fit(api.make(1), data[:1])


@api_param
def test_sample_needs_a_positive_count(api, data):
    model = api.fit(api.make(2, random_state=0), data)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n_samples"):
            model.sample(bad)


# --------------------------------------------------------------------------------------
# Group labels (batched only)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def groups():
    X, y = make_blobs([40, 50], 2, 2, seed=1)
    return X, y


def test_labels_with_fractions(groups):
    X, y = groups
    with pytest.raises(TypeError, match="y must hold integer group labels; got non-integer"):
        BatchedGaussianMixture(2).fit(X, y + 0.5)
    with pytest.raises(TypeError, match="y must hold integer group labels"):
        BatchedGaussianMixture(2).fit(X, np.where(y == 1, np.nan, 0.0))
    # floats holding integers are accepted as labels
    BatchedGaussianMixture(2, random_state=0).fit(X, y.astype(np.float64))


def test_labels_non_numeric(groups):
    X, y = groups
    with pytest.raises(TypeError, match="y must be an array-like of real numbers"):
        BatchedGaussianMixture(2).fit(X, y.astype(str))
    with pytest.raises(TypeError, match="y must hold integer group labels"):
        BatchedGaussianMixture(2).fit(X, torch.from_numpy(y == 1))
    with pytest.raises(ValueError, match="y must be an array of group labels"):
        BatchedGaussianMixture(2).fit(X, None)


def test_labels_negative(groups):
    X, y = groups
    with pytest.raises(ValueError, match=r"y must hold group labels in \[0, n_groups\); got label -1"):
        BatchedGaussianMixture(2).fit(X, y - 1)


def test_labels_beyond_the_groups_of_the_init_arrays(groups):
    X, y = groups
    weights = np.full((2, 2), 0.5)  # fixes G=2
    with pytest.raises(ValueError, match=r"y must hold group labels in \[0, 2\); got label 2"):
        BatchedGaussianMixture(2, weights_init=weights).fit(X, np.where(y == 1, 2, 0))
    model = BatchedGaussianMixture(2, random_state=0).fit(X, y)
    for method in ("predict", "predict_proba", "score_samples", "score"):
        with pytest.raises(ValueError, match=r"got label 2"):
            getattr(model, method)(X, np.full(len(X), 2))


def test_labels_wrong_length(groups):
    X, y = groups
    with pytest.raises(ValueError, match=rf"y must have shape \({len(X)},\) to match X"):
        BatchedGaussianMixture(2).fit(X, y[:-1])
    with pytest.raises(ValueError, match=r"y must have shape"):
        BatchedGaussianMixture(2).fit(X, y[:, None])
    model = BatchedGaussianMixture(2, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match=r"y must have shape \(5,\)"):
        model.predict(X[:5], y[:4])


def test_init_arrays_disagree_on_the_number_of_groups(groups):
    X, y = groups
    with pytest.raises(ValueError, match="means_init must have 2 groups"):
        BatchedGaussianMixture(2, weights_init=np.full((2, 2), 0.5), means_init=np.zeros((3, 2, 2))).fit(X, y)


def test_batched_non_normalised_weights_names_the_group(groups):
    X, y = groups
    weights = np.array([[0.5, 0.5], [0.3, 0.6]])
    with pytest.raises(ValueError, match=r"sum\(weights\) = 0.90000 for group 1"):
        BatchedGaussianMixture(2, weights_init=weights).fit(X, y)


# --------------------------------------------------------------------------------------
# Init arrays
# --------------------------------------------------------------------------------------


PRECISION_SHAPES = {"full": (2, 2, 2), "tied": (2, 2), "diag": (2, 2), "spherical": (2,)}


@api_param
def test_init_arrays_with_wrong_shape(api, data):
    lead = "(1, " if api.batched else "("
    cases = [
        ("weights_init", np.full(3, 1 / 3), "full", f"{lead}2,)" if not api.batched else "(1, 2)"),
        ("means_init", np.zeros((3, 2)), "full", f"{lead}2, 2)"),
        ("precisions_init", np.ones((2, 2)), "full", f"{lead}2, 2, 2)"),
        ("precisions_init", np.ones(2), "tied", f"{lead}2, 2)"),
        ("precisions_init", np.ones(3), "spherical", f"{lead}2,)" if not api.batched else "(1, 2)"),
        ("precisions_init", np.ones((2, 3)), "diag", f"{lead}2, 2)"),
    ]
    for name, array, covariance_type, expected in cases:
        model = api.make(2, covariance_type=covariance_type, **{name: api.init(array)})
        sk_name = {"weights_init": "weights", "means_init": "means"}.get(name, f"{covariance_type} precision")
        with pytest.raises(ValueError, match=re.escape(f"The parameter '{sk_name}' should have the shape of {expected}")):
            api.fit(model, data)


@api_param
@pytest.mark.parametrize("name", ["weights_init", "means_init", "precisions_init"])
def test_init_tensor_with_wrong_dtype(api, data, name):
    value = {"weights_init": torch.full((2,), 0.5), "means_init": torch.zeros(2, 2),
             "precisions_init": torch.eye(2).repeat(2, 1, 1)}[name]
    assert value.dtype == torch.float32  # the model is fitted in float64 (NumPy float64 X)
    with pytest.raises(TypeError, match=rf"{name} must have dtype torch.float64 .*got .*dtype torch.float32"):
        api.fit(api.make(2, **{name: api.init(value)}), data)


@api_param
@pytest.mark.parametrize("name", ["weights_init", "means_init", "precisions_init"])
def test_init_tensor_on_wrong_device(api, data, name):
    shape = {"weights_init": (2,), "means_init": (2, 2), "precisions_init": (2, 2, 2)}[name]
    value = torch.empty(shape, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match=rf"{name} must be on device cpu .*device meta"):
        api.fit(api.make(2, device="cpu", **{name: api.init(value)}), data)


@api_param
def test_non_normalised_or_negative_weights(api, data):
    with pytest.raises(ValueError, match=r"'weights' should be normalized, but got sum\(weights\) = 1.10000"):
        api.fit(api.make(2, weights_init=api.init([0.5, 0.6])), data)
    # scikit-learn's message prints the minimum as "max value" (kept word for word)
    with pytest.raises(ValueError, match=r"'weights' should be in the range \[0, 1\], but got max value -0.50000, min value 1.50000"):
        api.fit(api.make(2, weights_init=api.init([-0.5, 1.5])), data)


@api_param
@pytest.mark.parametrize("name", ["weights_init", "means_init", "precisions_init"])
def test_non_finite_init_arrays(api, data, name):
    value = {"weights_init": np.array([0.5, np.nan]), "means_init": np.array([[0.0, 0.0], [np.inf, 0.0]]),
             "precisions_init": np.array([np.eye(2), np.full((2, 2), np.nan)])}[name]
    message = "Input contains infinity" if name == "means_init" else "Input contains NaN."
    with pytest.raises(ValueError, match=message):
        api.fit(api.make(2, **{name: api.init(value)}), data)


SKLEARN_INIT_ERRORS = [  # bad init arrays for which scikit-learn's GaussianMixture raises
    ("full", {"weights_init": np.full(3, 1 / 3)}),
    ("full", {"weights_init": np.array([0.5, 0.6])}),
    ("full", {"weights_init": np.array([-0.5, 1.5])}),
    ("full", {"weights_init": np.array([0.5, np.nan])}),
    ("full", {"means_init": np.zeros((3, 2))}),
    ("full", {"means_init": np.array([[0.0, 0.0], [np.inf, 0.0]])}),
    ("full", {"precisions_init": np.ones((2, 2))}),
    ("full", {"precisions_init": np.array([np.eye(2), -np.eye(2)])}),
    ("full", {"precisions_init": np.array([np.eye(2), [[1.0, 0.5], [0.0, 1.0]]])}),
    ("tied", {"precisions_init": np.ones(2)}),
    ("tied", {"precisions_init": np.array([[1.0, 2.0], [2.0, 1.0]])}),
    ("diag", {"precisions_init": np.ones((2, 3))}),
    ("diag", {"precisions_init": np.array([[1.0, 1.0], [1.0, 0.0]])}),
    ("spherical", {"precisions_init": np.ones(3)}),
    ("spherical", {"precisions_init": np.array([1.0, -1.0])}),
]


@pytest.mark.parametrize("covariance_type, init", SKLEARN_INIT_ERRORS,
                         ids=[f"{c}-{next(iter(i))}-{k}" for k, (c, i) in enumerate(SKLEARN_INIT_ERRORS)])
def test_init_errors_word_for_word_as_sklearn(data, covariance_type, init):
    """The drop-in raises scikit-learn 1.9.1's exact message for each bad init array."""
    import sklearn.mixture

    with pytest.raises(ValueError) as expected:
        sklearn.mixture.GaussianMixture(2, covariance_type=covariance_type, **init).fit(data)
    with pytest.raises(ValueError) as ours:
        GaussianMixture(2, covariance_type=covariance_type, **init).fit(data)
    assert str(ours.value) == str(expected.value)


NOT_PD = {
    "full": (np.array([np.eye(2), -np.eye(2)]), "'full precision' should be symmetric, positive-definite"),
    "tied": (np.array([[1.0, 2.0], [2.0, 1.0]]), "'tied precision' should be symmetric, positive-definite"),
    "diag": (np.array([[1.0, 1.0], [1.0, 0.0]]), "'diag precision' should be positive"),
    "spherical": (np.array([1.0, -1.0]), "'spherical precision' should be positive"),
}


@api_param
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_non_pd_precisions(api, data, covariance_type):
    value, message = NOT_PD[covariance_type]
    with pytest.raises(ValueError, match=re.escape(message)):
        api.fit(api.make(2, covariance_type=covariance_type, precisions_init=api.init(value)), data)


@api_param
def test_non_symmetric_precisions(api, data):
    value = np.array([np.eye(2), [[1.0, 0.5], [0.0, 1.0]]])
    with pytest.raises(ValueError, match="symmetric, positive-definite"):
        api.fit(api.make(2, precisions_init=api.init(value)), data)


# --------------------------------------------------------------------------------------
# Hyper-parameters and use before fit
# --------------------------------------------------------------------------------------


HYPERPARAMETERS = [  # scikit-learn's wording (InvalidParameterError is a ValueError and a TypeError)
    ({"n_components": 0}, ValueError, r"The 'n_components' parameter of {name} must be an int in the range \[1, inf\). Got 0 instead."),
    ({"n_components": 1.5}, TypeError, r"'n_components' parameter of {name} must be an int"),
    ({"covariance_type": "foo"}, ValueError, r"'covariance_type' parameter of {name} must be a str among .*Got 'foo'"),
    ({"tol": -1}, ValueError, r"'tol' parameter of {name} must be a float in the range \[0.0, inf\). Got -1"),
    ({"reg_covar": -1e-3}, ValueError, r"'reg_covar' parameter of {name} must be a float in the range"),
    ({"max_iter": -1}, ValueError, r"'max_iter' parameter of {name} must be an int in the range \[0, inf\)"),
    ({"n_init": 0}, ValueError, r"'n_init' parameter of {name} must be an int in the range \[1, inf\)"),
    ({"init_params": "foo"}, ValueError, r"'init_params' parameter of {name} must be a str among .*Got 'foo'"),
    ({"backend": "foo"}, ValueError, r"'backend' parameter of {name} must be a str among .*'auto'.*Got 'foo'"),
    ({"memory_budget": 0}, ValueError, r"'memory_budget' parameter of {name} must be an int in the range \(0, inf\) or None. Got 0"),
    ({"warm_start": "yes"}, TypeError, r"'warm_start' parameter of {name} must be an instance of 'bool'"),
    ({"dtype": "float16"}, ValueError, r"'dtype' parameter of {name} must be .*Got 'float16'"),
    ({"device": "nodevice"}, ValueError, r"'device' parameter of {name} must be a torch device or its name or None. Got 'nodevice'"),
    ({"random_state": "seed"}, ValueError, r"'random_state' parameter of {name} must be an int in the range \[0, 4294967295\]"),
    ({"random_state": -1}, ValueError, r"'random_state' parameter of {name} must be an int in the range"),
    ({"verbose": -1}, ValueError, r"'verbose' parameter of {name} must be an int in the range \[0, inf\)"),
    ({"verbose_interval": 0}, ValueError, r"'verbose_interval' parameter of {name} must be an int in the range \[1, inf\)"),
    ({"weights_init": 0.5}, ValueError, r"'weights_init' parameter of {name} must be an array-like or None"),
    # NaN and infinity satisfy no interval: every real hyper-parameter rejects them
    ({"tol": float("nan")}, ValueError, r"The 'tol' parameter of {name} must be a float in the range \[0.0, inf\). Got nan instead."),
    ({"tol": float("inf")}, ValueError, r"The 'tol' parameter of {name} must be a float in the range \[0.0, inf\). Got inf instead."),
    ({"reg_covar": float("nan")}, ValueError, r"The 'reg_covar' parameter of {name} must be a float .*Got nan instead."),
    ({"reg_covar": float("inf")}, ValueError, r"The 'reg_covar' parameter of {name} must be a float .*Got inf instead."),
    ({"reg_covar": np.float32("nan")}, ValueError, r"The 'reg_covar' parameter of {name} must be a float .*Got np.float32\(nan\)"),
    ({"tol": -float("inf")}, ValueError, r"The 'tol' parameter of {name} must be a float .*Got -inf instead."),
]


@api_param
@pytest.mark.parametrize("params, error, message", HYPERPARAMETERS,
                         ids=[next(iter(p)) + "=" + repr(next(iter(p.values()))) for p, _, _ in HYPERPARAMETERS])
def test_invalid_hyperparameters(api, data, params, error, message):
    kwargs = {"n_components": 2, **params}
    model = api.make(**kwargs)  # construction never validates (scikit-learn contract)
    with pytest.raises(error, match=message.replace("{name}", api.name)):
        api.fit(model, data)


@api_param
def test_use_before_fit(api, data):
    model = api.make(2)
    calls = [("predict", api.xy(data)), ("predict_proba", api.xy(data)),
             ("score_samples", api.xy(data)), ("score", api.xy(data)), ("sample", ())]
    if api.batched:
        calls.append(("score_samples", (data,)))
    else:
        calls += [("bic", (data,)), ("aic", (data,))]
    for method, args in calls:
        with pytest.raises(sklearn.exceptions.NotFittedError, match=f"This {api.name} instance is not fitted yet"):
            getattr(model, method)(*args)
        with pytest.raises(NotFittedError):
            getattr(model, method)(*args)


# --------------------------------------------------------------------------------------
# A failed fit leaves the fitted state untouched
# --------------------------------------------------------------------------------------


@api_param
def test_failed_fit_keeps_the_previous_fit(api, data):
    model = api.fit(api.make(2, random_state=0), data)
    before = snapshot(model)
    proba = model.predict_proba(*api.xy(data))

    X_nan = data.copy()
    X_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        api.fit(model, X_nan)
    assert_same_state(before, model)

    with pytest.raises(ValueError, match="minimum of 2"):
        api.fit(model, data[:1])
    assert_same_state(before, model)

    model.set_params(precisions_init=api.init(NOT_PD["full"][0]))
    with pytest.raises(ValueError, match="positive-definite"):
        api.fit(model, data)
    assert_same_state(before, model)

    # EM itself fails (no regularisation, two distinct points): NotPSDError mid-fit
    model.set_params(precisions_init=None, reg_covar=0.0)
    with pytest.raises(NotPSDError, match="group 0"):
        api.fit(model, np.repeat(data[:2], 10, axis=0))
    assert_same_state(before, model)

    np.testing.assert_array_equal(model.predict_proba(*api.xy(data)), proba)


def test_not_psd_error_is_a_value_error():
    assert issubclass(NotPSDError, ValueError)


# --------------------------------------------------------------------------------------
# Degenerate but valid data: finite results with the default reg_covar
# --------------------------------------------------------------------------------------


def _degenerate_sets():
    X, _ = make_blobs(100, 3, 2, seed=0)
    duplicates = np.repeat(X[:10], 10, axis=0)
    constant = X.copy()
    constant[:, 1] = 5.0
    collinear = X.copy()
    collinear[:, 2] = collinear[:, 0]
    return {"duplicate_rows": duplicates, "constant_column": constant,
            "equal_columns": collinear, "all_equal": np.ones((20, 3))}


DEGENERATE = _degenerate_sets()


def assert_finite_model(model, X, *y):
    for name in FITTED:
        assert np.isfinite(np.asarray(getattr(model, name))).all(), name
    assert np.isfinite(np.asarray(model.lower_bound_)).all()
    assert np.isfinite(model.score_samples(X, *y)).all()
    proba = model.predict_proba(X, *y)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(-1), 1.0, rtol=1e-10)


@api_param
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_data_gives_finite_results(api, covariance_type, case):
    X = DEGENERATE[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = api.fit(api.make(2, covariance_type=covariance_type, random_state=0), X)
    assert_finite_model(model, *api.xy(X))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_more_features_than_samples(covariance_type):
    rng = np.random.default_rng(0)
    small = rng.normal(size=(5, 10))
    model = GaussianMixture(1, covariance_type=covariance_type, random_state=0).fit(small)
    assert_finite_model(model, small)
    # batched: one group with 5 samples in D=10 next to a group with 100
    X = np.concatenate([rng.normal(size=(100, 10)), small])
    y = np.r_[np.zeros(100, dtype=int), np.ones(5, dtype=int)]
    batched = BatchedGaussianMixture(1, covariance_type=covariance_type, random_state=0).fit(X, y)
    assert_finite_model(batched, X, y)
    assert np.isfinite(batched.score_samples(X)).all()
    # the small group is fitted exactly as on its own
    np.testing.assert_allclose(batched.means_[1], model.means_, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ill_defined_covariance_message_starts_with_sklearns(covariance_type, dtype):
    import sklearn.mixture

    X = np.zeros((10, 2), dtype=dtype)
    X[5:] = 1  # two collapsed points: zero covariances without reg_covar
    with pytest.raises(ValueError) as expected:
        sklearn.mixture.GaussianMixture(2, covariance_type=covariance_type, reg_covar=0).fit(X)
    with pytest.raises(ValueError) as ours:
        GaussianMixture(2, covariance_type=covariance_type, reg_covar=0, device="cpu").fit(X)
    assert str(ours.value).startswith(str(expected.value))
