"""Kernel contract tests: E-step and M-step kernels against independent float64 oracles.

The generic checks live in contract mixins, one per group of kernels (``KERNELS`` names
them): :class:`KernelContract` for the kernels every backend exports (``log_prob_norm``,
``m_step_statistics``), and :class:`LogProbContract`, :class:`EStepContract`,
:class:`MStepContract` for the dense-only ``log_gaussian_prob``,
``estimate_log_prob_resp``, ``estimate_gaussian_parameters``. A backend's test class
inherits the contracts of the kernels it has and says which backend it is and how it
turns a canonical :class:`Problem` (NumPy float64 arrays) into its inputs
(``make_inputs``): ``TestDense`` runs all four, ``TestKeOps`` the KernelContract; no test
is generated for a kernel a backend does not have.

Oracles: ``scipy.stats.multivariate_normal``, ``torch.distributions.MultivariateNormal``
and scikit-learn's private ``_estimate_log_gaussian_prob`` / ``_estimate_gaussian_parameters``
/ ``_compute_precision_cholesky`` (per group), plus closed-form gradients.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.mixture import _gaussian_mixture as skgm

import idefender_gpu.kernels as ker
from conftest import tol

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")

#: layout name -> (number of groups, or None for no G axis; X shared by every group)
LAYOUTS = {
    "noG": (None, False),  # X (N, D), means (K, D) -> (N, K)
    "G1": (1, False),  # X (1, N, D), means (1, K, D) -> (1, N, K)
    "G3": (3, False),  # X (3, N, D), means (3, K, D) -> (3, N, K)
    "G3-sharedX": (3, True),  # X (N, D) scored under every group -> (3, N, K)
}

#: backend name -> module exposing the kernel functions (KeOps adds its entry here).
BACKEND_MODULES = {"torch": "idefender_gpu.kernels", "keops": "idefender_gpu.kernels._keops"}

REG_COVAR = 1e-3  # not the default 1e-6, so a missing/doubled regulariser shows


#: every kernel the contract exercises (the dense backend exports them all)
CONTRACT_KERNELS = (
    "log_gaussian_prob",
    "estimate_log_prob_resp",
    "estimate_gaussian_parameters",
    "log_prob_norm",
    "m_step_statistics",
)

def _functions(backend: str):
    """The kernel module of ``backend``: a kernel it lacks is an AttributeError, never a
    skip (each contract below lists the kernels it needs, and a backend's test class
    inherits only the contracts of the kernels it has)."""
    return importlib.import_module(BACKEND_MODULES[backend])


# --------------------------------------------------------------------------------------
# Canonical problems (NumPy float64) and oracles
# --------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One random batched mixture problem, always stored with its G axis.

    ``call_arrays()`` gives the arrays in the layout the kernels are called with.
    """

    covariance_type: str
    layout: str
    X: np.ndarray  # (G, N, D) (for a shared X every group holds the same rows)
    means: np.ndarray  # (G, K, D)
    covariances: np.ndarray  # per covariance type, with G
    prec_chol: np.ndarray  # scikit-learn's precisions_cholesky_, per group
    log_weights: np.ndarray  # (G, K)
    resp: np.ndarray  # (G, N, K), rows sum to one

    @property
    def has_group_axis(self) -> bool:
        return LAYOUTS[self.layout][0] is not None

    @property
    def shared_X(self) -> bool:
        return LAYOUTS[self.layout][1]

    def call_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "X": self.X,
            "means": self.means,
            "prec_chol": self.prec_chol,
            "covariances": self.covariances,
            "log_weights": self.log_weights,
            "resp": self.resp,
        }
        if not self.has_group_axis:
            arrays = {name: a[0] for name, a in arrays.items()}
        elif self.shared_X:
            arrays["X"] = self.X[0]
        return arrays

    def grouped(self, result: torch.Tensor) -> np.ndarray:
        """A kernel output as float64 NumPy with its G axis (added back for ``noG``)."""
        out = result.detach().cpu().double().numpy()
        return out if self.has_group_axis else out[None]

    def full_covariances(self) -> np.ndarray:
        """``(G, K, D, D)`` dense covariance of every component."""
        G, K, D = self.means.shape
        cov = self.covariances
        if self.covariance_type == "full":
            return cov
        if self.covariance_type == "tied":
            return np.broadcast_to(cov[:, None], (G, K, D, D)).copy()
        if self.covariance_type == "diag":
            return cov[..., :, None] * np.eye(D)
        return cov[..., None, None] * np.eye(D)


def random_covariances(rng, covariance_type, G, K, D):
    """Random SPD covariances (well conditioned) in the layout of ``covariance_type``."""
    if covariance_type == "full":
        A = rng.normal(size=(G, K, D, D))
        return A @ A.swapaxes(-1, -2) / D + 0.5 * np.eye(D)
    if covariance_type == "tied":
        A = rng.normal(size=(G, D, D))
        return A @ A.swapaxes(-1, -2) / D + 0.5 * np.eye(D)
    if covariance_type == "diag":
        return rng.uniform(0.3, 2.5, size=(G, K, D))
    return rng.uniform(0.3, 2.5, size=(G, K))


def sklearn_prec_chol(covariances, covariance_type):
    """scikit-learn's ``precisions_cholesky_`` for every group (independent of our linalg)."""
    return np.stack([skgm._compute_precision_cholesky(c, covariance_type) for c in covariances])


def random_problem(
    covariance_type, layout="G3", *, n_samples=13, n_features=3, n_components=4, seed=0
) -> Problem:
    rng = np.random.default_rng(seed)
    n_groups, shared = LAYOUTS[layout]
    G, N, D, K = n_groups or 1, n_samples, n_features, n_components
    means = rng.normal(scale=2.0, size=(G, K, D))
    covariances = random_covariances(rng, covariance_type, G, K, D)
    comp = rng.integers(0, K, size=(G, N))
    X = np.take_along_axis(means, comp[..., None], axis=1) + 1.5 * rng.normal(size=(G, N, D))
    if shared:
        X = np.broadcast_to(X[:1], X.shape).copy()
    weights = rng.dirichlet(np.ones(K), size=G)  # (G, K)
    logits = 2.0 * rng.normal(size=(G, N, K))
    resp = np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))
    return Problem(
        covariance_type=covariance_type,
        layout=layout,
        X=X,
        means=means,
        covariances=covariances,
        prec_chol=sklearn_prec_chol(covariances, covariance_type),
        log_weights=np.log(weights),
        resp=resp,
    )


def scipy_log_prob(problem: Problem) -> np.ndarray:
    """``(G, N, K)`` log-densities from ``scipy.stats.multivariate_normal``."""
    G, K, _ = problem.means.shape
    covs = problem.full_covariances()
    out = np.empty((G, problem.X.shape[1], K))
    for g in range(G):
        for k in range(K):
            out[g, :, k] = multivariate_normal(problem.means[g, k], covs[g, k]).logpdf(
                problem.X[g]
            )
    return out


def assert_close_np(actual, expected, dtype, **overrides):
    kwargs = {**tol(dtype), **overrides}
    torch.testing.assert_close(
        torch.as_tensor(np.asarray(actual, dtype=np.float64)),
        torch.as_tensor(np.asarray(expected, dtype=np.float64)),
        **kwargs,
    )


# --------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# The contracts
# --------------------------------------------------------------------------------------



class _ContractBase:
    """Fixtures and helpers of every contract. Subclasses set ``backend`` and
    ``make_inputs``; each contract sets ``KERNELS``, the kernels its tests call."""

    backend: str
    KERNELS: tuple[str, ...] = ()

    def make_inputs(self, problem: Problem, dtype: torch.dtype, device) -> dict:
        """Tensors for ``problem.call_arrays()`` in this backend's input format."""
        raise NotImplementedError

    # ---- fixtures ---------------------------------------------------------------------

    @pytest.fixture
    def fn(self):
        return _functions(self.backend)

    @pytest.fixture(params=COVARIANCE_TYPES)
    def covariance_type(self, request):
        return request.param

    @pytest.fixture(params=list(LAYOUTS))
    def layout(self, request):
        """Every way to lay out groups for the E-step kernels."""
        return request.param

    @pytest.fixture(params=["G1", "G3"])
    def mstep_layout(self, request):
        """The M-step takes ``X (G, N, D)`` only."""
        return request.param

    def _log_prob(self, fn, problem, dtype=torch.float64, device="cpu", **kwargs):
        t = self.make_inputs(problem, dtype, device)
        return fn.log_gaussian_prob(
            t["X"], t["means"], t["prec_chol"], problem.covariance_type, **kwargs
        )


    def _mstep(self, fn, problem, dtype=torch.float64, device="cpu", reg_covar=REG_COVAR, **kw):
        t = self.make_inputs(problem, dtype, device)
        return fn.estimate_gaussian_parameters(
            t["X"], t["resp"], reg_covar, problem.covariance_type, **kw
        )

    @staticmethod
    def _sklearn_mstep(X, resp, covariance_type, reg_covar=REG_COVAR):
        return skgm._estimate_gaussian_parameters(X, resp, reg_covar, covariance_type)

    def _assert_mstep_matches_sklearn(self, problem, result, dtype, sizes=None):
        nk, means, covariances = (r.detach().cpu().double().numpy() for r in result)
        G = problem.means.shape[0]
        assert nk.shape == problem.log_weights.shape
        assert means.shape == problem.means.shape
        assert covariances.shape == problem.covariances.shape
        for g in range(G):
            n = problem.X.shape[1] if sizes is None else sizes[g]
            exp_nk, exp_means, exp_cov = self._sklearn_mstep(
                problem.X[g, :n], problem.resp[g, :n], problem.covariance_type
            )
            assert_close_np(nk[g], exp_nk, dtype)
            assert_close_np(means[g], exp_means, dtype)
            assert_close_np(covariances[g], exp_cov, dtype)


class LogProbContract(_ContractBase):
    """``log_gaussian_prob`` against oracles, chunked, differentiated, in every layout."""

    KERNELS = ("log_gaussian_prob",)


    # ---- log-densities: oracles ---------------------------------------------------------

    def test_log_prob_shape(self, fn, covariance_type, layout):
        problem = random_problem(covariance_type, layout)
        out = self._log_prob(fn, problem)
        G, N, K = problem.resp.shape
        assert out.shape == ((G, N, K) if problem.has_group_axis else (N, K))

    def test_log_prob_matches_scipy(self, fn, covariance_type, layout, device):
        problem = random_problem(covariance_type, layout, seed=1)
        out = self._log_prob(fn, problem, device=device)
        assert_close_np(problem.grouped(out), scipy_log_prob(problem), torch.float64)

    def test_log_prob_matches_torch_distributions(self, fn, covariance_type, layout, device):
        problem = random_problem(covariance_type, layout, seed=2)
        out = self._log_prob(fn, problem, device=device)
        mvn = torch.distributions.MultivariateNormal(
            loc=torch.as_tensor(problem.means)[:, None],  # (G, 1, K, D)
            covariance_matrix=torch.as_tensor(problem.full_covariances())[:, None],
        )
        expected = mvn.log_prob(torch.as_tensor(problem.X).unsqueeze(-2))  # (G, N, K)
        assert_close_np(problem.grouped(out), expected, torch.float64)

    def test_log_prob_matches_sklearn(self, fn, covariance_type, layout, device):
        problem = random_problem(covariance_type, layout, seed=3)
        out = problem.grouped(self._log_prob(fn, problem, device=device))
        for g in range(problem.means.shape[0]):
            expected = skgm._estimate_log_gaussian_prob(
                problem.X[g], problem.means[g], problem.prec_chol[g], covariance_type
            )
            assert_close_np(out[g], expected, torch.float64)

    @pytest.mark.parametrize(
        "n_samples, n_features, n_components", [(1, 1, 1), (2, 1, 3), (5, 4, 1)]
    )
    def test_degenerate_sizes_match_oracles(
        self, fn, covariance_type, layout, n_samples, n_features, n_components
    ):
        """One sample, one feature, one component: no size-1 axis is squeezed or broadcast
        the wrong way (the M-step's counterpart is in :class:`MStepContract`)."""
        problem = random_problem(
            covariance_type, layout, n_samples=n_samples, n_features=n_features,
            n_components=n_components, seed=30,
        )
        out = self._log_prob(fn, problem)
        assert_close_np(problem.grouped(out), scipy_log_prob(problem), torch.float64)

    def test_log_prob_float32_matches_float64_oracle(self, fn, covariance_type, layout):
        problem = random_problem(covariance_type, layout, seed=4)
        out = self._log_prob(fn, problem, dtype=torch.float32)
        assert out.dtype == torch.float32
        assert_close_np(problem.grouped(out), scipy_log_prob(problem), torch.float32)

    def test_log_prob_far_from_origin_float32(self, fn, covariance_type):
        """Data and means offset by 1e3: the densities depend on ``x - mu`` only.

        The oracle is evaluated on the float32-rounded inputs, so only the kernel's own
        round-off is measured. A naive ``x² p - 2 x μ p + μ² p`` expansion loses every digit
        here (``x² ~ 1e6``); the kernels centre or difference first.
        """
        problem = random_problem(covariance_type, "G3", seed=5)
        problem.X = (problem.X + 1e3).astype(np.float32).astype(np.float64)
        problem.means = (problem.means + 1e3).astype(np.float32).astype(np.float64)
        problem.prec_chol = problem.prec_chol.astype(np.float32).astype(np.float64)
        out = self._log_prob(fn, problem, dtype=torch.float32)
        expected = np.stack(
            [
                skgm._estimate_log_gaussian_prob(
                    problem.X[g], problem.means[g], problem.prec_chol[g], covariance_type
                )
                for g in range(3)
            ]
        )
        # x P and μ P are ~1e3 and cancel to O(1) in the full/tied Mahalanobis terms, so
        # the absolute round-off is ~1e3 * eps32 per coordinate: allow 1e-3 absolute.
        assert_close_np(problem.grouped(out), expected, torch.float32, atol=1e-3)

    def test_log_prob_same_for_every_parameterisation(self, fn, covariance_type, layout):
        """prec_chol from covariances, scale_tril, precisions and sklearn agree, and the
        tied/diag/spherical densities equal the full density of the equivalent matrices."""
        problem = random_problem(covariance_type, layout, seed=6)
        t = self.make_inputs(problem, torch.float64, "cpu")
        cov = t["covariances"]
        ctype = covariance_type
        candidates = {
            "sklearn": t["prec_chol"],
            "covariance": ker.compute_prec_chol(cov, ctype)[0],
            "precision": ker.prec_chol_from_precisions(
                torch.linalg.inv(cov) if ctype in ("full", "tied") else cov.reciprocal(), ctype
            )[0],
        }
        # scale_tril of the equivalent dense matrices, reduced back to ctype's layout
        full_cov = torch.as_tensor(problem.full_covariances())
        if not problem.has_group_axis:
            full_cov = full_cov[0]
        full_pc = ker.prec_chol_from_scale_tril(torch.linalg.cholesky(full_cov))
        if ctype == "full":
            candidates["scale_tril"] = full_pc
        elif ctype == "tied":
            candidates["scale_tril"] = full_pc[..., 0, :, :]
        elif ctype == "diag":
            candidates["scale_tril"] = full_pc.diagonal(dim1=-2, dim2=-1)
        else:
            candidates["scale_tril"] = full_pc.diagonal(dim1=-2, dim2=-1)[..., 0]
        expected = fn.log_gaussian_prob(t["X"], t["means"], full_pc, "full")
        for name, pc in candidates.items():
            torch.testing.assert_close(pc, t["prec_chol"], **tol(torch.float64), msg=name)
            out = fn.log_gaussian_prob(t["X"], t["means"], pc, ctype)
            torch.testing.assert_close(out, expected, **tol(torch.float64), msg=name)

    # ---- log-densities: chunking, gradients, dtypes -------------------------------------

    @pytest.mark.parametrize("memory_budget", [1, 300])
    def test_log_prob_chunked_matches_default(self, fn, covariance_type, layout, memory_budget):
        problem = random_problem(covariance_type, layout, seed=7)
        full = self._log_prob(fn, problem)
        chunked = self._log_prob(fn, problem, memory_budget=memory_budget)
        torch.testing.assert_close(chunked, full, **tol(torch.float64))
        assert_close_np(problem.grouped(chunked), scipy_log_prob(problem), torch.float64)

    @pytest.mark.parametrize("memory_budget", [None, 1])
    def test_log_prob_gradcheck(self, fn, covariance_type, layout, memory_budget):
        """gradcheck w.r.t. X, means and prec_chol (upper triangular, positive diagonal;
        the lower zeros are perturbed too, which the kernels use as given)."""
        problem = random_problem(
            covariance_type, layout, n_samples=4, n_features=2, n_components=2, seed=8
        )
        t = self.make_inputs(problem, torch.float64, "cpu")
        inputs = tuple(t[k].clone().requires_grad_(True) for k in ("X", "means", "prec_chol"))

        def f(X, means, prec_chol):
            return fn.log_gaussian_prob(
                X, means, prec_chol, covariance_type, memory_budget=memory_budget
            )

        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)

    def test_log_prob_gradient_matches_closed_form(self, fn, covariance_type, layout):
        """Closed-form gradients of ``Σ log N(x_n | μ_k, Σ_k)``:

        ``d/dx_n = -Σ_k Λ_k (x_n - μ_k)`` and ``d/dμ_k = Σ_n Λ_k (x_n - μ_k)``.
        """
        problem = random_problem(covariance_type, layout, seed=9)
        t = self.make_inputs(problem, torch.float64, "cpu")
        X = t["X"].clone().requires_grad_(True)
        means = t["means"].clone().requires_grad_(True)
        fn.log_gaussian_prob(X, means, t["prec_chol"], covariance_type).sum().backward()
        prec = np.linalg.inv(problem.full_covariances())  # (G, K, D, D)
        diff = problem.X[:, :, None, :] - problem.means[:, None, :, :]  # (G, N, K, D)
        lam_diff = np.einsum("gkde,gnke->gnkd", prec, diff)  # (G, N, K, D)
        grad_X = -lam_diff.sum(2)  # (G, N, D)
        grad_means = lam_diff.sum(1)  # (G, K, D)
        if not problem.has_group_axis:
            grad_X, grad_means = grad_X[0], grad_means[0]
        elif problem.shared_X:
            grad_X = grad_X.sum(0)
        assert_close_np(X.grad, grad_X, torch.float64)
        assert_close_np(means.grad, grad_means, torch.float64)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_log_prob_keeps_dtype_and_device(self, fn, covariance_type, layout, dtype, device):
        problem = random_problem(covariance_type, layout, seed=10)
        out = self._log_prob(fn, problem, dtype=dtype, device=device)
        assert out.dtype == dtype
        assert out.device.type == device.type


class EStepContract(_ContractBase):
    """``estimate_log_prob_resp``: log-likelihoods and log-responsibilities."""

    KERNELS = ("estimate_log_prob_resp",)


    # ---- E-step ---------------------------------------------------------------------------

    def _estep(self, fn, problem, dtype=torch.float64, device="cpu", **kwargs):
        t = self.make_inputs(problem, dtype, device)
        return fn.estimate_log_prob_resp(
            t["X"], t["log_weights"], t["means"], t["prec_chol"], problem.covariance_type,
            **kwargs,
        )

    def test_estep_resp_rows_sum_to_one(self, fn, covariance_type, layout):
        problem = random_problem(covariance_type, layout, seed=11)
        log_prob_norm, log_resp = self._estep(fn, problem)
        G, N, K = problem.resp.shape
        if problem.has_group_axis:
            assert log_prob_norm.shape == (G, N) and log_resp.shape == (G, N, K)
        else:
            assert log_prob_norm.shape == (N,) and log_resp.shape == (N, K)
        resp = log_resp.exp()
        assert bool((resp >= 0).all()) and bool((resp <= 1 + 1e-12).all())
        ones = torch.ones_like(resp[..., 0])
        torch.testing.assert_close(resp.sum(-1), ones, **tol(torch.float64))

    def test_estep_matches_hand_computed_logsumexp(self, fn, covariance_type, layout, device):
        problem = random_problem(covariance_type, layout, seed=12)
        log_prob_norm, log_resp = self._estep(fn, problem, device=device)
        weighted = scipy_log_prob(problem) + problem.log_weights[:, None, :]  # (G, N, K)
        norm = logsumexp(weighted, axis=-1)  # (G, N)
        assert_close_np(problem.grouped(log_prob_norm), norm, torch.float64)
        assert_close_np(problem.grouped(log_resp), weighted - norm[..., None], torch.float64)

    def test_estep_stable_far_from_every_component(self, fn, covariance_type):
        """Samples ~100 standard deviations out: every exp() underflows, log-sum-exp must not."""
        problem = random_problem(covariance_type, "G3", seed=13)
        problem.X = problem.X + 150.0
        log_prob_norm, log_resp = self._estep(fn, problem)
        assert bool(torch.isfinite(log_prob_norm).all()) and bool(torch.isfinite(log_resp).all())
        assert float(log_prob_norm.max()) < -1000  # the point of the test: exp() underflows
        torch.testing.assert_close(
            log_resp.exp().sum(-1), torch.ones_like(log_prob_norm), **tol(torch.float64)
        )
        weighted = scipy_log_prob(problem) + problem.log_weights[:, None, :]
        norm = logsumexp(weighted, axis=-1)
        assert_close_np(log_prob_norm, norm, torch.float64)
        assert_close_np(log_resp, weighted - norm[..., None], torch.float64)

    @pytest.mark.parametrize("memory_budget", [1, 300])
    def test_estep_chunked_matches_default(self, fn, covariance_type, layout, memory_budget):
        problem = random_problem(covariance_type, layout, seed=14)
        expected = self._estep(fn, problem)
        actual = self._estep(fn, problem, memory_budget=memory_budget)
        torch.testing.assert_close(actual, expected, **tol(torch.float64))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_estep_keeps_dtype_and_device(self, fn, covariance_type, layout, dtype, device):
        problem = random_problem(covariance_type, layout, seed=15)
        for out in self._estep(fn, problem, dtype=dtype, device=device):
            assert out.dtype == dtype
            assert out.device.type == device.type


class MStepContract(_ContractBase):
    """``estimate_gaussian_parameters`` from given responsibilities against scikit-learn."""

    KERNELS = ("estimate_gaussian_parameters",)

    @pytest.mark.parametrize(
        "n_samples, n_features, n_components", [(1, 1, 1), (2, 1, 3), (5, 4, 1)]
    )
    def test_mstep_degenerate_sizes_match_sklearn(
        self, fn, covariance_type, mstep_layout, n_samples, n_features, n_components
    ):
        """One sample, one feature, one component in the M-step."""
        problem = random_problem(
            covariance_type, mstep_layout, n_samples=n_samples, n_features=n_features,
            n_components=n_components, seed=30,
        )
        self._assert_mstep_matches_sklearn(problem, self._mstep(fn, problem), torch.float64)


    def test_mstep_matches_sklearn(self, fn, covariance_type, mstep_layout, device):
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=16)
        result = self._mstep(fn, problem, device=device)
        self._assert_mstep_matches_sklearn(problem, result, torch.float64)

    def test_mstep_float32_matches_float64_oracle(self, fn, covariance_type, mstep_layout):
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=17)
        result = self._mstep(fn, problem, dtype=torch.float32)
        assert all(r.dtype == torch.float32 for r in result)
        self._assert_mstep_matches_sklearn(problem, result, torch.float32)

    def test_mstep_empty_component_matches_sklearn(self, fn, covariance_type, mstep_layout):
        """A component with no responsibility: n_k = 10 eps, mean 0, covariance = reg."""
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=18)
        resp = problem.resp.copy()
        resp[:, :, 1] = 0.0
        problem.resp = resp / resp.sum(-1, keepdims=True)
        result = self._mstep(fn, problem)
        self._assert_mstep_matches_sklearn(problem, result, torch.float64)

    def test_mstep_padding_rows_contribute_nothing(self, fn, covariance_type, mstep_layout):
        """Groups of unequal sizes padded with zero resp rows (and garbage finite samples)
        give the fit of the unpadded data: against sklearn and against our own unpadded fit."""
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=19)
        G, N, _ = problem.X.shape
        sizes = [N - 6, N, 9][:G]
        rng = np.random.default_rng(190)
        X, resp = problem.X.copy(), problem.resp.copy()
        for g, n in enumerate(sizes):
            X[g, n:] = 50.0 * rng.normal(size=X[g, n:].shape)
            resp[g, n:] = 0.0
        problem.X, problem.resp = X, resp
        result = self._mstep(fn, problem)
        self._assert_mstep_matches_sklearn(problem, result, torch.float64, sizes=sizes)
        for g, n in enumerate(sizes):
            t = self.make_inputs(problem, torch.float64, "cpu")
            alone = fn.estimate_gaussian_parameters(
                t["X"][g : g + 1, :n], t["resp"][g : g + 1, :n], REG_COVAR, covariance_type
            )
            for padded, unpadded in zip(result, alone):
                torch.testing.assert_close(padded[g : g + 1], unpadded, **tol(torch.float64))

    @pytest.mark.parametrize("memory_budget", [1, 300])
    def test_mstep_chunked_matches_default(self, fn, covariance_type, mstep_layout, memory_budget):
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=20)
        expected = self._mstep(fn, problem)
        actual = self._mstep(fn, problem, memory_budget=memory_budget)
        torch.testing.assert_close(actual, expected, **tol(torch.float64))
        self._assert_mstep_matches_sklearn(problem, actual, torch.float64)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_mstep_keeps_dtype_and_device(self, fn, covariance_type, mstep_layout, dtype, device):
        problem = random_problem(covariance_type, mstep_layout, seed=21)
        for out in self._mstep(fn, problem, dtype=dtype, device=device):
            assert out.dtype == dtype
            assert out.device.type == device.type


class KernelContract(_ContractBase):
    """The kernels every backend exports: ``log_prob_norm`` (differentiable) and
    ``m_step_statistics`` (responsibilities recomputed from the parameters)."""

    KERNELS = ("log_prob_norm", "m_step_statistics")


    # ---- fused kernels: log_prob_norm and m_step_statistics --------------------------------

    def _log_prob_norm(self, fn, problem, dtype=torch.float64, device="cpu", **kwargs):
        t = self.make_inputs(problem, dtype, device)
        return fn.log_prob_norm(
            t["X"], t["log_weights"], t["means"], t["prec_chol"], problem.covariance_type,
            **kwargs,
        )

    def test_log_prob_norm_matches_hand_computed_logsumexp(
        self, fn, covariance_type, layout, device
    ):
        problem = random_problem(covariance_type, layout, seed=40)
        out = self._log_prob_norm(fn, problem, device=device)
        G, N, _ = problem.resp.shape
        assert out.shape == ((G, N) if problem.has_group_axis else (N,))
        weighted = scipy_log_prob(problem) + problem.log_weights[:, None, :]
        assert_close_np(problem.grouped(out), logsumexp(weighted, axis=-1), torch.float64)

    def test_log_prob_norm_float32(self, fn, covariance_type, layout):
        problem = random_problem(covariance_type, layout, seed=41)
        out = self._log_prob_norm(fn, problem, dtype=torch.float32)
        assert out.dtype == torch.float32
        weighted = scipy_log_prob(problem) + problem.log_weights[:, None, :]
        assert_close_np(problem.grouped(out), logsumexp(weighted, axis=-1), torch.float32)

    @pytest.mark.parametrize("memory_budget", [1, 300])
    def test_log_prob_norm_chunked_matches_default(
        self, fn, covariance_type, layout, memory_budget
    ):
        problem = random_problem(covariance_type, layout, seed=42)
        expected = self._log_prob_norm(fn, problem)
        actual = self._log_prob_norm(fn, problem, memory_budget=memory_budget)
        torch.testing.assert_close(actual, expected, **tol(torch.float64))

    def test_log_prob_norm_gradcheck(self, fn, covariance_type, layout):
        self._log_prob_norm_gradcheck(fn, covariance_type, layout)

    def _log_prob_norm_gradcheck(self, fn, covariance_type, layout,
                                 names=("X", "log_weights", "means", "prec_chol")):
        """gradcheck w.r.t. the inputs ``names`` (the others held fixed)."""
        # D=3, the other contract problems' dimension: KeOps compiles a formula per
        # dimension, and this one's forward formula is then theirs (a first-use compile saved)
        problem = random_problem(
            covariance_type, layout, n_samples=4, n_features=3, n_components=2, seed=43
        )
        t = self.make_inputs(problem, torch.float64, "cpu")
        order = ("X", "log_weights", "means", "prec_chol")
        inputs = tuple(t[k].clone().requires_grad_(True) for k in names)

        def f(*varied):
            kw = {**{k: t[k] for k in order}, **dict(zip(names, varied))}
            return fn.log_prob_norm(*(kw[k] for k in order), covariance_type)

        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)

    def _m_step_statistics(self, fn, problem, log_prob_norm, dtype=torch.float64,
                           device="cpu", sample_weight=None, **kwargs):
        t = self.make_inputs(problem, dtype, device)
        if sample_weight is not None:
            kwargs["sample_weight"] = torch.as_tensor(sample_weight, dtype=dtype, device=device)
        return fn.m_step_statistics(
            t["X"], torch.as_tensor(log_prob_norm, dtype=dtype, device=device),
            t["log_weights"], t["means"], t["prec_chol"], problem.covariance_type, REG_COVAR,
            **kwargs,
        )

    @staticmethod
    def _oracle_resp(problem):
        """``(G, N, K)`` responsibilities of the problem's parameters, and ``log p(x)``."""
        weighted = scipy_log_prob(problem) + problem.log_weights[:, None, :]
        norm = logsumexp(weighted, axis=-1)
        return np.exp(weighted - norm[..., None]), norm

    def test_m_step_statistics_matches_sklearn(self, fn, covariance_type, mstep_layout, device):
        """Responsibilities recomputed from the parameters, then scikit-learn's M-step."""
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=44)
        problem.resp, norm = self._oracle_resp(problem)
        result = self._m_step_statistics(fn, problem, norm, device=device)
        self._assert_mstep_matches_sklearn(problem, result, torch.float64)

    def test_m_step_statistics_float32(self, fn, covariance_type, mstep_layout):
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=45)
        problem.resp, norm = self._oracle_resp(problem)
        result = self._m_step_statistics(fn, problem, norm, dtype=torch.float32)
        assert all(r.dtype == torch.float32 for r in result)
        self._assert_mstep_matches_sklearn(problem, result, torch.float32)

    def test_m_step_statistics_sample_weight_zeroes_padding(
        self, fn, covariance_type, mstep_layout
    ):
        """Zero sample weights on padding rows (garbage finite samples): the fit of the
        unpadded data."""
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=46)
        G, N, _ = problem.X.shape
        sizes = [N - 6, N, 9][:G]
        rng = np.random.default_rng(460)
        sample_weight = np.ones((G, N))
        X = problem.X.copy()
        for g, n in enumerate(sizes):
            X[g, n:] = 50.0 * rng.normal(size=X[g, n:].shape)
            sample_weight[g, n:] = 0.0
        problem.X = X
        problem.resp, norm = self._oracle_resp(problem)
        result = self._m_step_statistics(fn, problem, norm, sample_weight=sample_weight)
        self._assert_mstep_matches_sklearn(problem, result, torch.float64, sizes=sizes)

    @pytest.mark.parametrize("memory_budget", [1, 300])
    def test_m_step_statistics_chunked_matches_default(
        self, fn, covariance_type, mstep_layout, memory_budget
    ):
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=47)
        _, norm = self._oracle_resp(problem)
        expected = self._m_step_statistics(fn, problem, norm)
        actual = self._m_step_statistics(fn, problem, norm, memory_budget=memory_budget)
        torch.testing.assert_close(actual, expected, **tol(torch.float64))

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_fused_kernels_keep_dtype_and_device(
        self, fn, covariance_type, mstep_layout, dtype, device
    ):
        problem = random_problem(covariance_type, mstep_layout, seed=48)
        norm = self._log_prob_norm(fn, problem, dtype=dtype, device=device)
        outputs = [norm, *self._m_step_statistics(
            fn, problem, norm.cpu().double().numpy(), dtype=dtype, device=device
        )]
        for out in outputs:
            assert out.dtype == dtype
            assert out.device.type == device.type


class TestDense(LogProbContract, EStepContract, MStepContract, KernelContract):
    """The dense torch backend (``idefender_gpu.kernels``), every layout (no G, G=1, G=3,
    shared X) through the contract's ``layout``/``mstep_layout`` parametrisation."""

    backend = "torch"

    def make_inputs(self, problem, dtype, device):
        return {
            name: torch.as_tensor(array, dtype=dtype, device=device)
            for name, array in problem.call_arrays().items()
        }


def _keops_available() -> bool:
    from idefender_gpu.kernels import _keops

    return _keops.available()


@pytest.mark.keops
@pytest.mark.skipif(not _keops_available(), reason="pykeops is not installed")
class TestKeOps(KernelContract):
    """The KeOps backend: the contract of the kernels it exports (``log_prob_norm`` and
    ``m_step_statistics``). Inputs are made contiguous, as KeOps requires; nothing else
    differs. Each new formula compiles once (seconds, cached under ``~/.cache/keops*``)."""

    backend = "keops"

    def make_inputs(self, problem, dtype, device):
        return {
            name: torch.as_tensor(array, dtype=dtype, device=device).contiguous()
            for name, array in problem.call_arrays().items()
        }

    @pytest.fixture(params=["full", "diag"])
    def gradcheck_type(self, request):
        return request.param

    def test_log_prob_norm_gradcheck(self, fn, gradcheck_type, layout):
        """Gradients of the KeOps reduction (full and diag only: every backward formula
        compiles separately, one per variable, and these two cover the matrix and the
        vector formulas). Full: w.r.t. every input. Diag: w.r.t. ``log_weights`` and
        ``prec_chol``, the diag-only glue (``p_j = prec_chol²`` and the log-determinant in
        ``c_j``); its ``x_i``/``mu_j`` variables are made by the lines the full formula's
        gradcheck covers, so two backward compiles fewer."""
        names = ("X", "log_weights", "means", "prec_chol")
        if gradcheck_type == "diag":
            names = ("log_weights", "prec_chol")
        self._log_prob_norm_gradcheck(fn, gradcheck_type, layout, names)

    @pytest.fixture(params=["full", "diag"])
    def float32_mstep_type(self, request):
        return request.param

    def test_m_step_statistics_float32(self, fn, float32_mstep_type, mstep_layout):
        """The float32 M-step reduction of full and diag only (each is a formula compiled on
        first use): the statistics terms of the other two are sub-expressions of these
        (tied's ``Concat(1, x - mu)`` of full's, spherical's of diag's), and their
        float32 Mahalanobis terms run in ``test_log_prob_norm_float32``."""
        super().test_m_step_statistics_float32(fn, float32_mstep_type, mstep_layout)

    @pytest.mark.parametrize("dtype", [torch.float64])
    def test_fused_kernels_keep_dtype_and_device(
        self, fn, covariance_type, mstep_layout, dtype, device
    ):
        super().test_fused_kernels_keep_dtype_and_device(
            fn, covariance_type, mstep_layout, dtype, device)

    def test_fused_kernels_keep_float32_and_device(self, fn, float32_mstep_type, mstep_layout,
                                                   device):
        """float32 for the M-step formulas compiled in float32 (full and diag)."""
        super().test_fused_kernels_keep_dtype_and_device(
            fn, float32_mstep_type, mstep_layout, torch.float32, device)

    def test_m_step_statistics_slices_match_one_reduction(self, fn, covariance_type, mstep_layout):
        """The M-step reduction's chunk axis (issue 16, slow item 2): 23 samples in slices
        of 5 (the last one padded) give the statistics of one reduction over all of them,
        and scikit-learn's M-step; with padding rows of zero sample weight too."""
        rows_per_slice = 5
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=49)
        problem.resp, norm = self._oracle_resp(problem)
        G, N, _ = problem.X.shape
        expected = self._m_step_statistics(fn, problem, norm, rows_per_slice=N)
        actual = self._m_step_statistics(fn, problem, norm, rows_per_slice=rows_per_slice)
        torch.testing.assert_close(actual, expected, **tol(torch.float64))
        self._assert_mstep_matches_sklearn(problem, actual, torch.float64)
        sample_weight = np.ones((G, N))
        sample_weight[:, 17:] = 0.0
        weighted = self._m_step_statistics(fn, problem, norm, sample_weight=sample_weight,
                                           rows_per_slice=rows_per_slice)
        problem.resp = problem.resp * sample_weight[..., None]
        self._assert_mstep_matches_sklearn(problem, weighted, torch.float64, sizes=[17] * G)

    def test_sufficient_statistics_equal_dense_shifted_statistics(
        self, fn, covariance_type, mstep_layout
    ):
        """KeOps returns the dense backend's sufficient statistics (centred on the current
        means), so both backends finish the M-step with one ``statistics_to_parameters``."""
        problem = random_problem(covariance_type, mstep_layout, n_samples=23, seed=50)
        resp, norm = self._oracle_resp(problem)
        t = self.make_inputs(problem, torch.float64, "cpu")
        lazy = fn.sufficient_statistics(
            t["X"], torch.as_tensor(norm), t["log_weights"], t["means"], t["prec_chol"],
            covariance_type, rows_per_slice=7,
        )
        dense = ker.shifted_statistics(t["X"], torch.as_tensor(resp), t["means"], covariance_type)
        torch.testing.assert_close(lazy, dense, **tol(torch.float64))
        G, K, D = problem.means.shape
        assert tuple(x.shape for x in lazy) == ker.statistics_shapes(covariance_type, G, K, D)


@pytest.mark.keops
def test_keops_matches_dense_on_a_larger_problem():
    """Backend parity beyond the small contract problems: N=2000, K=16, float32; the
    M-step reduction in slices of 300 samples (the last one padded) and in one. D=3, the
    contract's dimension: its float32 formulas are compiled already (KeOps compiles one
    per dimension and dtype, seconds each on first use)."""
    if not _keops_available():
        pytest.skip("pykeops is not installed")
    from idefender_gpu.kernels import _keops

    g = torch.Generator().manual_seed(7)
    G, N, K, D = 2, 2000, 16, 3
    X = torch.randn(G, N, D, generator=g)
    means = torch.randn(G, K, D, generator=g)
    log_weights = torch.log_softmax(torch.randn(G, K, generator=g), -1)
    A = torch.randn(G, K, D, D, generator=g)
    prec_chol, _ = ker.compute_prec_chol(A @ A.mT + torch.eye(D), "full")
    dense = ker.log_prob_norm(X, log_weights, means, prec_chol, "full")
    lazy = _keops.log_prob_norm(X, log_weights, means, prec_chol, "full")
    torch.testing.assert_close(lazy, dense, **tol(torch.float32))
    stats_dense = ker.m_step_statistics(X, dense, log_weights, means, prec_chol, "full", 1e-6)
    # float32 sums over 2000 samples in two different orders: a looser atol for the counts
    for rows_per_slice in (None, 300):
        stats_lazy = _keops.m_step_statistics(X, lazy, log_weights, means, prec_chol, "full",
                                              1e-6, rows_per_slice=rows_per_slice)
        torch.testing.assert_close(stats_lazy, stats_dense, rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------------------
# Dense-only checks
# --------------------------------------------------------------------------------------


def _contract_kernels(test_class) -> set[str]:
    return {name for cls in test_class.__mro__ for name in vars(cls).get("KERNELS", ())}


@pytest.mark.parametrize("test_class", [TestDense, TestKeOps], ids=lambda c: c.__name__)
def test_backend_exports_the_kernels_of_its_contracts(test_class):
    """A test class inherits only contracts whose kernels its backend exports (so no test
    is generated, and none skipped, for a kernel a backend lacks)."""
    module = importlib.import_module(BACKEND_MODULES[test_class.backend])
    for name in _contract_kernels(test_class):
        assert callable(getattr(module, name)), name


def test_dense_backend_runs_every_contract():
    assert _contract_kernels(TestDense) == set(CONTRACT_KERNELS)
    assert _contract_kernels(TestKeOps) == {"log_prob_norm", "m_step_statistics"}


@pytest.mark.parametrize(
    "n_rows, bytes_per_row, budget, expected",
    [
        (10, 8, 1, 1),  # budget below one row: still one row per chunk
        (10, 8, 300, 10),  # everything fits, capped at n_rows
        (100, 8, 300, 37),  # floor(300 / 8)
        (100, 0, 5, 5),  # a zero-byte row is counted as one byte
        (5, 8, None, 5),  # default budget (MiBs): everything fits
    ],
)
def test_chunk_rows(n_rows, bytes_per_row, budget, expected):
    assert ker.chunk_rows(n_rows, bytes_per_row, budget) == expected


def test_chunk_rows_respects_budget():
    for n_rows in (1, 7, 100):
        for bytes_per_row in (1, 24, 1000):
            for budget in (1, 100, 5000):
                rows = ker.chunk_rows(n_rows, bytes_per_row, budget)
                assert 1 <= rows <= n_rows
                assert rows == 1 or rows * bytes_per_row <= budget
                # maximal: one more row would exceed the budget (or there is none left)
                assert rows == n_rows or (rows + 1) * bytes_per_row > budget


def test_default_budget_on_cpu_never_asks_cuda(monkeypatch):
    """The CUDA memory query is guarded: CPU chunking never calls it (issue 16, slow 1)."""

    def no_cuda(*args, **kwargs):
        raise AssertionError("torch.cuda memory queried for a CPU device")

    for name in ("mem_get_info", "memory_reserved", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    assert ker.default_memory_budget("cpu") == ker.DEFAULT_MEMORY_BUDGET["cpu"]
    assert ker.chunk_rows(10**6, 1000, None, "cpu") == ker.DEFAULT_MEMORY_BUDGET["cpu"] // 1000
    assert ker.chunk_rows(10**6, 10**9, None, "cpu") == 1  # no minimum row count on CPU
    X = torch.randn(2, 50, 3)
    out = ker.log_gaussian_prob(X, torch.randn(2, 4, 3), torch.ones(2, 4, 3), "diag")
    assert out.shape == (2, 50, 4)


def _fake_cuda_memory(monkeypatch, free, reserved=0, allocated=0):
    calls = []

    def mem_get_info(device=None):
        calls.append(device)
        return free, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
    return calls


def test_default_cuda_budget_follows_free_memory(monkeypatch):
    """CUDA: a share of the free memory (plus the allocator's unused cache), at least the
    512 MiB floor; asked of the tensors' device."""
    calls = _fake_cuda_memory(monkeypatch, free=40 * 2**30, reserved=6 * 2**30,
                              allocated=2 * 2**30)
    expected = int(ker.CUDA_FREE_FRACTION * 44 * 2**30)
    assert ker.default_memory_budget(torch.device("cuda", 1)) == expected
    assert calls == [torch.device("cuda", 1)]
    _fake_cuda_memory(monkeypatch, free=2**30)
    assert ker.default_memory_budget("cuda") == ker.DEFAULT_MEMORY_BUDGET["cuda"]


def test_cuda_chunks_keep_a_minimum_row_count(monkeypatch):
    """Workload c1 (1000 groups, D=4096 on one GPU): 32 MiB of intermediates per row gave
    16-row chunks under 512 MiB; the default now keeps at least MIN_CHUNK_ROWS rows,
    while an explicit budget is honoured exactly."""
    _fake_cuda_memory(monkeypatch, free=2 * 2**30)
    per_row = 2 * 1000 * 1 * 4096 * 4  # full log-density, G=1000, K=1, float32
    minimum = ker.MIN_CHUNK_ROWS["cuda"]
    assert ker.chunk_rows(1_281_167, per_row, None, "cuda") == minimum
    assert ker.chunk_rows(50, per_row, None, "cuda") == 50  # never more than the rows
    assert ker.chunk_rows(1_281_167, per_row, 512 * 2**20, "cuda") == 16
    _fake_cuda_memory(monkeypatch, free=60 * 2**30)  # an idle 80 GB device: the budget wins
    assert ker.chunk_rows(1_281_167, per_row, None, "cuda") == int(15 * 2**30) // per_row


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_statistics_shapes_match_shifted_statistics(covariance_type):
    G, N, K, D = 2, 7, 3, 4
    g = torch.Generator().manual_seed(0)
    X = torch.randn(G, N, D, generator=g, dtype=torch.float64)
    resp = torch.softmax(torch.randn(G, N, K, generator=g, dtype=torch.float64), -1)
    centres = torch.randn(G, K, D, generator=g, dtype=torch.float64)
    stats = ker.shifted_statistics(X, resp, centres, covariance_type)
    assert tuple(s.shape for s in stats) == ker.statistics_shapes(covariance_type, G, K, D)
    params = ker.statistics_to_parameters(*stats, centres, 1e-3, covariance_type)
    assert params[2].shape == ker.precision_shape(covariance_type, G, K, D)


def test_log_prob_norm_and_resp_matches_logsumexp(seed):
    weighted = torch.randn(2, 5, 3, dtype=torch.float64) * 30
    norm, log_resp = ker.log_prob_norm_and_resp(weighted)
    expected = logsumexp(weighted.numpy(), axis=-1)
    assert_close_np(norm, expected, torch.float64)
    assert_close_np(log_resp, weighted.numpy() - expected[..., None], torch.float64)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_prob_empty_samples(covariance_type):
    """Zero samples give an empty (G, 0, K) result, as the M-step accepts N=0."""
    problem = random_problem(covariance_type, "G3", n_samples=1)
    t = TestDense().make_inputs(problem, torch.float64, "cpu")
    out = ker.log_gaussian_prob(t["X"][:, :0], t["means"], t["prec_chol"], covariance_type)
    assert out.shape == (3, 0, problem.means.shape[1])


@pytest.mark.keops
def test_keops_sliced_reduction_is_more_accurate_in_float32():
    """The chunk axis of the KeOps M-step (issue 16, slow item 2) also shortens every
    float32 running sum: against float64, N=100,000 in slices of 8192 is ~12x more
    accurate than one reduction over all samples (6e-6 against 7e-5 at D=3, about the
    same as at D=5)."""
    if not _keops_available():
        pytest.skip("pykeops is not installed")
    from idefender_gpu.kernels import _keops

    g = torch.Generator().manual_seed(7)
    G, N, K, D = 1, 100_000, 16, 3  # D=3 full float32: the formula of the test above
    X = torch.randn(G, N, D, generator=g)
    means = torch.randn(G, K, D, generator=g)
    log_weights = torch.log_softmax(torch.randn(G, K, generator=g), -1)
    A = torch.randn(G, K, D, D, generator=g)
    prec_chol, _ = ker.compute_prec_chol(A @ A.mT + torch.eye(D), "full")
    norm = ker.log_prob_norm(X, log_weights, means, prec_chol, "full")
    expected = ker.m_step_statistics(X.double(), norm.double(), log_weights.double(),
                                     means.double(), prec_chol.double(), "full", 1e-6)

    def error(rows_per_slice):
        out = _keops.m_step_statistics(X, norm, log_weights, means, prec_chol, "full", 1e-6,
                                       rows_per_slice=rows_per_slice)
        return max(float(((o.double() - e).abs() / e.abs().clamp_min(1)).max())
                   for o, e in zip(out, expected))

    sliced, whole = error(None), error(N)
    assert sliced < 2e-5 and 4 * sliced < whole, (sliced, whole)
