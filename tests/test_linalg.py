"""Factor conversions of ``idefender_gpu.kernels`` (``kernels/_linalg.py``).

Oracles: NumPy ``cholesky``/``inv``, ``torch.linalg.slogdet`` and scikit-learn's
``_compute_precision_cholesky``; all in float64 on batched shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture import _gaussian_mixture as skgm

import idefender_gpu.kernels as ker
from conftest import tol
from idefender_gpu.exceptions import NotPSDError

F64 = torch.float64
MATRIX_TYPES = ("full", "tied")
VECTOR_TYPES = ("diag", "spherical")

#: batch shapes (without the trailing (D, D)) of matrix factors
MATRIX_BATCHES = [(), (4,), (2, 3)]
#: full shapes of diag / spherical factors
VECTOR_SHAPES = {"diag": [(3,), (4, 3), (2, 4, 3)], "spherical": [(4,), (2, 4), (2, 3, 4)]}


def random_spd(rng, batch, D=3):
    """Random well-conditioned SPD matrices ``batch + (D, D)``."""
    A = rng.normal(size=(*batch, D, D))
    return A @ A.swapaxes(-1, -2) / D + 0.3 * np.eye(D)


def np_prec_chol(cov):
    """scikit-learn's construction, by hand: ``prec_chol = cholesky(cov)^{-T}``."""
    L = np.linalg.cholesky(cov)
    return np.linalg.inv(L).swapaxes(-1, -2)


def t64(a):
    return torch.as_tensor(np.asarray(a), dtype=F64)


def assert_upper(P):
    assert torch.equal(P, P.triu()), "not upper triangular"
    assert bool((P.diagonal(dim1=-2, dim2=-1) > 0).all()), "diagonal not positive"


def assert_lower(L):
    assert torch.equal(L, L.tril()), "not lower triangular"
    assert bool((L.diagonal(dim1=-2, dim2=-1) > 0).all()), "diagonal not positive"


# --------------------------------------------------------------------------------------
# Round trips and oracles, matrices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", MATRIX_BATCHES, ids=str)
def test_matrix_conversions_match_numpy(batch):
    rng = np.random.default_rng(1)
    cov = random_spd(rng, batch)
    P = t64(np_prec_chol(cov))
    L = ker.scale_tril_from_prec_chol(P)
    assert L.shape == P.shape
    assert_lower(L)
    torch.testing.assert_close(L, t64(np.linalg.cholesky(cov)), **tol(F64))
    torch.testing.assert_close(ker.prec_chol_from_scale_tril(L), P, **tol(F64))
    torch.testing.assert_close(ker.covariance_from_prec_chol(P, "full"), t64(cov), **tol(F64))
    torch.testing.assert_close(
        ker.precision_from_prec_chol(P, "full"), t64(np.linalg.inv(cov)), **tol(F64)
    )


@pytest.mark.parametrize("covariance_type", MATRIX_TYPES)
@pytest.mark.parametrize("batch", MATRIX_BATCHES, ids=str)
def test_matrix_round_trips(covariance_type, batch):
    """prec_chol -> scale_tril -> prec_chol, -> covariance -> prec_chol, -> precision ->
    prec_chol, and covariance @ precision = I."""
    rng = np.random.default_rng(2)
    P = t64(np_prec_chol(random_spd(rng, batch)))
    ctype = covariance_type
    torch.testing.assert_close(
        ker.prec_chol_from_scale_tril(ker.scale_tril_from_prec_chol(P)), P, **tol(F64)
    )
    cov = ker.covariance_from_prec_chol(P, ctype)
    prec = ker.precision_from_prec_chol(P, ctype)
    eye = torch.eye(P.shape[-1], dtype=F64).expand_as(cov)
    torch.testing.assert_close(cov @ prec, eye, **tol(F64))
    P_from_cov, info = ker.compute_prec_chol(cov, ctype)
    assert_upper(P_from_cov)
    assert info.shape == batch and not bool(info.any())
    torch.testing.assert_close(P_from_cov, P, **tol(F64))
    P_from_prec, info = ker.prec_chol_from_precisions(prec, ctype)
    assert_upper(P_from_prec)
    assert info.shape == batch and not bool(info.any())
    torch.testing.assert_close(P_from_prec, P, **tol(F64))


@pytest.mark.parametrize("covariance_type", MATRIX_TYPES)
@pytest.mark.parametrize("batch", MATRIX_BATCHES, ids=str)
def test_prec_chol_from_precisions_is_upper_factor(covariance_type, batch):
    """Upper triangular P with P Pᵀ = precision (not the lower Cholesky, whose L Lᵀ
    also equals it), equal to scikit-learn's factor of the covariance."""
    rng = np.random.default_rng(3)
    precision = random_spd(rng, batch, D=4)
    P, info = ker.prec_chol_from_precisions(t64(precision), covariance_type)
    assert P.shape == precision.shape and info.shape == batch
    assert not bool(info.any())
    assert_upper(P)
    torch.testing.assert_close(P @ P.mT, t64(precision), **tol(F64))
    cov = np.linalg.inv(precision).reshape(-1, 4, 4)
    expected = np.stack([skgm._compute_precision_cholesky(c, "tied") for c in cov])
    torch.testing.assert_close(P, t64(expected.reshape(precision.shape)), **tol(F64))


@pytest.mark.parametrize("batch", MATRIX_BATCHES, ids=str)
def test_compute_prec_chol_matches_sklearn(batch):
    rng = np.random.default_rng(4)
    cov = random_spd(rng, batch)
    P, info = ker.compute_prec_chol(t64(cov), "full")
    flat = cov.reshape(-1, 3, 3)
    expected = skgm._compute_precision_cholesky(flat, "full").reshape(cov.shape)
    torch.testing.assert_close(P, t64(expected), **tol(F64))
    assert not bool(info.any())


# --------------------------------------------------------------------------------------
# Round trips, diag / spherical
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "covariance_type, shape",
    [(c, s) for c in VECTOR_TYPES for s in VECTOR_SHAPES[c]],
    ids=str,
)
def test_vector_conversions(covariance_type, shape):
    rng = np.random.default_rng(5)
    cov = rng.uniform(0.2, 3.0, size=shape)
    ctype = covariance_type
    P, info = ker.compute_prec_chol(t64(cov), ctype)
    assert P.shape == shape
    torch.testing.assert_close(P, t64(1.0 / np.sqrt(cov)), **tol(F64))
    assert not bool(info.any())
    torch.testing.assert_close(ker.covariance_from_prec_chol(P, ctype), t64(cov), **tol(F64))
    prec = ker.precision_from_prec_chol(P, ctype)
    torch.testing.assert_close(prec, t64(1.0 / cov), **tol(F64))
    P2, info2 = ker.prec_chol_from_precisions(prec, ctype)
    torch.testing.assert_close(P2, P, **tol(F64))
    assert not bool(info2.any())
    if ctype == "diag":
        assert info.shape == shape[:-1] and info2.shape == shape[:-1]
    else:
        assert info.shape == shape and info2.shape == shape


# --------------------------------------------------------------------------------------
# log det
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_log_det_prec_chol_matches_slogdet(covariance_type):
    """``log det(prec_chol) = ½ log det(precision)``, precision densified for the oracle."""
    rng = np.random.default_rng(6)
    G, K, D = 3, 4, 3
    if covariance_type == "full":
        P = t64(np_prec_chol(random_spd(rng, (G, K), D)))
        expected_shape = (G, K)
    elif covariance_type == "tied":
        P = t64(np_prec_chol(random_spd(rng, (G,), D)))
        expected_shape = (G,)
    elif covariance_type == "diag":
        P = t64(rng.uniform(0.2, 3.0, size=(G, K, D)))
        expected_shape = (G, K)
    else:
        P = t64(rng.uniform(0.2, 3.0, size=(G, K)))
        expected_shape = (G, K)
    out = ker.log_det_prec_chol(P, covariance_type, D)
    assert out.shape == expected_shape
    precision = ker.precision_from_prec_chol(P, covariance_type)
    if covariance_type == "diag":
        precision = torch.diag_embed(precision)
    elif covariance_type == "spherical":
        precision = precision[..., None, None] * torch.eye(D, dtype=F64)
    sign, logabsdet = torch.linalg.slogdet(precision)
    assert bool((sign > 0).all())
    torch.testing.assert_close(out, 0.5 * logabsdet, **tol(F64))


# --------------------------------------------------------------------------------------
# Failure detection: info and check_cholesky_info
# --------------------------------------------------------------------------------------

G, K, D = 3, 4, 3
BAD_GROUP, BAD_COMPONENT = 1, 2


def covariances_with_one_failure(covariance_type, *, seed=7, bad_value=-0.5):
    """Valid covariances except at (BAD_GROUP, BAD_COMPONENT) (tied: group BAD_GROUP),
    where the matrix has eigenvalue ``bad_value`` (diag/spherical: that variance)."""
    rng = np.random.default_rng(seed)
    if covariance_type in MATRIX_TYPES:
        batch = (G, K) if covariance_type == "full" else (G,)
        cov = random_spd(rng, batch, D)
        Q, _ = np.linalg.qr(rng.normal(size=(D, D)))
        bad = Q @ np.diag([2.0, 1.0, bad_value]) @ Q.T  # symmetric, one eigenvalue <= 0
        where = (BAD_GROUP, BAD_COMPONENT) if covariance_type == "full" else (BAD_GROUP,)
        cov[where] = bad
    elif covariance_type == "diag":
        cov = rng.uniform(0.2, 3.0, size=(G, K, D))
        cov[BAD_GROUP, BAD_COMPONENT, 1] = bad_value
    else:
        cov = rng.uniform(0.2, 3.0, size=(G, K))
        cov[BAD_GROUP, BAD_COMPONENT] = bad_value
    return cov


def expected_failures(covariance_type):
    shape = (G,) if covariance_type == "tied" else (G, K)
    failed = torch.zeros(shape, dtype=torch.bool)
    failed[(BAD_GROUP,) if covariance_type == "tied" else (BAD_GROUP, BAD_COMPONENT)] = True
    return failed


@pytest.mark.parametrize("bad_value", [-0.5, -1e-3])
@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_compute_prec_chol_info_flags_exactly_the_non_pd_entry(covariance_type, bad_value):
    cov = covariances_with_one_failure(covariance_type, bad_value=bad_value)
    P, info = ker.compute_prec_chol(t64(cov), covariance_type)
    assert info.dtype == torch.int32
    torch.testing.assert_close(info != 0, expected_failures(covariance_type))
    # the failure does not leak into the other groups/components of the batch
    ok = ~expected_failures(covariance_type)
    for g in range(G):
        if covariance_type == "tied":
            if ok[g]:
                exp = skgm._compute_precision_cholesky(cov[g], "tied")
                torch.testing.assert_close(P[g], t64(exp), **tol(F64))
            continue
        for k in range(K):
            if ok[g, k]:
                exp = skgm._compute_precision_cholesky(cov[g, k : k + 1], covariance_type)[0]
                torch.testing.assert_close(P[g, k], t64(exp), **tol(F64))


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_prec_chol_from_precisions_info_flags_non_pd(covariance_type):
    """Same detection from precisions (an indefinite precision is just as invalid)."""
    precisions = covariances_with_one_failure(covariance_type, seed=8)
    _, info = ker.prec_chol_from_precisions(t64(precisions), covariance_type)
    torch.testing.assert_close(info != 0, expected_failures(covariance_type))


@pytest.mark.parametrize("covariance_type", ["diag", "spherical"])
def test_compute_prec_chol_flags_zero_variance(covariance_type):
    cov = covariances_with_one_failure(covariance_type, bad_value=0.0)
    _, info = ker.compute_prec_chol(t64(cov), covariance_type)
    torch.testing.assert_close(info != 0, expected_failures(covariance_type))


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_check_cholesky_info_passes_when_all_factorisations_succeed(covariance_type):
    shape = (G,) if covariance_type == "tied" else (G, K)
    info = torch.zeros(shape, dtype=torch.int32)
    assert ker.check_cholesky_info(info, covariance_type, F64) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_check_cholesky_info_names_group_and_component(covariance_type, dtype):
    cov = t64(covariances_with_one_failure(covariance_type)).to(dtype)
    _, info = ker.compute_prec_chol(cov, covariance_type)
    with pytest.raises(NotPSDError) as excinfo:
        ker.check_cholesky_info(info, covariance_type, dtype)
    assert isinstance(excinfo.value, ValueError)  # as scikit-learn raises ValueError
    message = str(excinfo.value)
    if covariance_type == "tied":
        assert f"group {BAD_GROUP}" in message
        assert "component" not in message.replace("components", "")
    else:
        assert f"group {BAD_GROUP}, component {BAD_COMPONENT}" in message
    assert "reg_covar" in message
    assert ("float64" in message) == (dtype == torch.float32)


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_check_cholesky_info_mask_suppresses_masked_out_groups(covariance_type):
    cov = t64(covariances_with_one_failure(covariance_type))
    _, info = ker.compute_prec_chol(cov, covariance_type)
    mask = torch.ones(G, dtype=torch.bool)
    mask[BAD_GROUP] = False
    ker.check_cholesky_info(info, covariance_type, F64, mask=mask)  # no raise
    with pytest.raises(NotPSDError):
        ker.check_cholesky_info(info, covariance_type, F64, mask=torch.ones(G, dtype=torch.bool))
    # two failing groups, the first masked out: the message names the second
    info = info.clone()
    info[0] = 1
    with pytest.raises(NotPSDError, match="group 0"):
        ker.check_cholesky_info(info, covariance_type, F64)
    mask = torch.tensor([False, True, True])
    with pytest.raises(NotPSDError, match=f"group {BAD_GROUP}"):
        ker.check_cholesky_info(info, covariance_type, F64, mask=mask)


# --------------------------------------------------------------------------------------
# dtype / device invariants
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
def test_linalg_keeps_dtype_and_device(covariance_type, dtype, device):
    rng = np.random.default_rng(9)
    if covariance_type in MATRIX_TYPES:
        batch = (G, K) if covariance_type == "full" else (G,)
        cov = random_spd(rng, batch, D)
    else:
        cov = rng.uniform(0.2, 3.0, size=(G, K, D) if covariance_type == "diag" else (G, K))
    cov = torch.as_tensor(cov, dtype=dtype, device=device)
    P, info = ker.compute_prec_chol(cov, covariance_type)
    precision = ker.precision_from_prec_chol(P, covariance_type)
    outputs = [
        P,
        ker.covariance_from_prec_chol(P, covariance_type),
        precision,
        ker.prec_chol_from_precisions(precision, covariance_type)[0],
        ker.log_det_prec_chol(P, covariance_type, D),
    ]
    if covariance_type in MATRIX_TYPES:
        L = ker.scale_tril_from_prec_chol(P)
        outputs += [L, ker.prec_chol_from_scale_tril(L)]
    for out in outputs:
        assert out.dtype == dtype
        assert out.device.type == device.type
    assert info.dtype == torch.int32 and info.device.type == device.type
    # float32 agrees with the float64 computation
    P64, _ = ker.compute_prec_chol(cov.double(), covariance_type)
    torch.testing.assert_close(P.double(), P64, **tol(torch.float32))


# --------------------------------------------------------------------------------------
# The covariance-shape table; non-finite factors (issue 16 item 7)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "covariance_type, expected, expected_no_group",
    [
        ("full", (2, 3, 5, 5), (3, 5, 5)),
        ("tied", (2, 5, 5), (5, 5)),
        ("diag", (2, 3, 5), (3, 5)),
        ("spherical", (2, 3), (3,)),
    ],
)
def test_precision_shape_table(covariance_type, expected, expected_no_group):
    assert ker.precision_shape(covariance_type, 2, 3, 5) == expected
    assert ker.precision_shape(covariance_type, None, 3, 5) == expected_no_group
    # the shape compute_prec_chol returns for covariances of that shape
    rng = np.random.default_rng(3)
    cov = covariances_with_one_failure(covariance_type, bad_value=0.5, seed=int(rng.integers(99)))
    P, _ = ker.compute_prec_chol(t64(cov), covariance_type)
    assert P.shape == ker.precision_shape(covariance_type, G, K, D)


def test_precision_shape_rejects_unknown_type():
    with pytest.raises(ValueError, match="covariance_type"):
        ker.precision_shape("circular", 1, 2, 3)


def _cholesky_ex_without_nan_check(real):
    """``cholesky_ex`` as cuSOLVER may behave: a NaN pivot gives a NaN factor and
    ``info = 0`` (LAPACK stops at it with ``info > 0``)."""

    def fake(A, *args, **kwargs):
        L, info = real(torch.nan_to_num(A, nan=1.0), *args, **kwargs)
        nan_rows = torch.isnan(A).any(-1).any(-1)  # (...)
        L = torch.where(nan_rows[..., None, None], torch.full_like(L, float("nan")), L)
        return L, info

    return fake


@pytest.mark.parametrize("covariance_type", MATRIX_TYPES)
def test_nan_factor_with_zero_info_is_flagged(covariance_type, monkeypatch):
    """Non-regression (issue 16 item 7): a factorisation that reports success with a NaN
    factor (cuSOLVER on a NaN pivot) must reach :func:`check_cholesky_info`."""
    cov = t64(covariances_with_one_failure(covariance_type, bad_value=0.5))
    where = (BAD_GROUP, BAD_COMPONENT) if covariance_type == "full" else (BAD_GROUP,)
    cov[where + (0, 0)] = float("nan")
    monkeypatch.setattr(torch.linalg, "cholesky_ex", _cholesky_ex_without_nan_check(torch.linalg.cholesky_ex))
    for convert in (ker.compute_prec_chol, ker.prec_chol_from_precisions):
        P, info = convert(cov, covariance_type)
        assert info.dtype == torch.int32
        torch.testing.assert_close(info != 0, expected_failures(covariance_type))
        assert int(info[where]) == D + 1
        with pytest.raises(NotPSDError, match=f"group {BAD_GROUP}"):
            ker.check_cholesky_info(info, covariance_type, F64)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("covariance_type", VECTOR_TYPES)
def test_non_finite_variances_are_flagged(covariance_type, bad_value):
    cov = covariances_with_one_failure(covariance_type, bad_value=bad_value)
    for convert in (ker.compute_prec_chol, ker.prec_chol_from_precisions):
        _, info = convert(t64(cov), covariance_type)
        torch.testing.assert_close(info != 0, expected_failures(covariance_type))


@pytest.mark.parametrize("covariance_type", MATRIX_TYPES)
def test_nan_covariance_is_flagged_on_every_device(covariance_type, device):
    """The real factorisation of the device (LAPACK on CPU, cuSOLVER on CUDA) on a NaN
    covariance: flagged in ``info`` either way (on CUDA this checks issue 16 item 7 for real)."""
    cov = t64(covariances_with_one_failure(covariance_type, bad_value=0.5)).to(device)
    where = (BAD_GROUP, BAD_COMPONENT) if covariance_type == "full" else (BAD_GROUP,)
    cov[where + (1, 1)] = float("nan")
    for dtype in (torch.float32, torch.float64):
        _, info = ker.compute_prec_chol(cov.to(dtype), covariance_type)
        torch.testing.assert_close((info != 0).cpu(), expected_failures(covariance_type))
