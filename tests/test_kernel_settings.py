"""Numerical settings of the kernels (``kernels/_settings.py``) and the kernels' accuracy
under TF32 (issue 16 item 6), emulated on CPU: :class:`conftest.EmulateTF32` rounds both
factors of every float32 GEMM to TF32's 10-bit mantissa, as tensor cores do.

Also: ``import idefender_gpu.kernels`` stays light (issue 11 item 6).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import idefender_gpu.kernels as ker
from conftest import EmulateTF32, round_to_tf32

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


# --------------------------------------------------------------------------------------
# allow_tf32: scoped, restored, never silent
# --------------------------------------------------------------------------------------


def _flags():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_allow_tf32_sets_and_restores_both_flags():
    before = _flags()
    assert before[0] is False  # conftest's autouse fixture: TF32 off in every test
    with ker.allow_tf32():
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cudnn.allow_tf32 is True
        assert ker.tf32_enabled()
        with ker.allow_tf32(False):  # nested: forbid inside an allowed block
            assert not ker.tf32_enabled() and torch.backends.cudnn.allow_tf32 is False
        assert ker.tf32_enabled()
    assert _flags() == before
    assert not ker.tf32_enabled()


def test_allow_tf32_restores_after_an_exception():
    before = _flags()
    with pytest.raises(RuntimeError, match="boom"):
        with ker.allow_tf32():
            raise RuntimeError("boom")
    assert _flags() == before


@pytest.mark.slow
def test_allow_tf32_with_pytorchs_newer_api():
    """A program that set ``fp32_precision`` (PyTorch then refuses the legacy flags): the
    context manager uses the same API (run in a subprocess: the switch is global)."""
    code = (
        "import torch\n"
        "from idefender_gpu.kernels import allow_tf32, tf32_enabled\n"
        "m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv\n"
        "m.fp32_precision = 'ieee'\n"
        "c.fp32_precision = 'ieee'\n"
        "assert not tf32_enabled()\n"
        "with allow_tf32():\n"
        "    assert tf32_enabled() and m.fp32_precision == 'tf32' and c.fp32_precision == 'tf32'\n"
        "assert m.fp32_precision == 'ieee' and c.fp32_precision == 'ieee'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allow_tf32_rejects_a_non_bool():
    with pytest.raises(TypeError, match="enabled"):
        with ker.allow_tf32("yes"):
            pass  # pragma: no cover


@pytest.mark.slow
def test_import_kernels_is_light_and_flips_no_flag():
    """``import idefender_gpu.kernels`` (and the KeOps module and the EM backends) imports
    neither scikit-learn nor SciPy, pykeops or the mixture/detector stack (issue 11 item 6),
    and switches no TF32 flag (STYLE C7). In a fresh interpreter."""
    code = (
        "import sys, torch\n"
        "flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,\n"
        "                 torch.get_float32_matmul_precision())\n"
        "before = flags()\n"
        "import idefender_gpu.kernels\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'pykeops')\n"
        "       or m.startswith(('idefender_gpu.mixture', 'idefender_gpu.detector',\n"
        "                        'idefender_gpu.attacks', 'idefender_gpu.features'))]\n"
        "assert not bad, bad\n"
        "import idefender_gpu.kernels._keops\n"
        "assert 'pykeops' not in sys.modules  # imported on first use only\n"
        "assert flags() == before, (before, flags())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------
# The TF32 emulation itself
# --------------------------------------------------------------------------------------


def test_round_to_tf32_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0, 1 + 2**-11, 1 + 2**-10, -(1 + 3 * 2**-11), 1 / 3, 0.0, 1e-30, 3e38])
    expected = torch.tensor([1.0, 1 + 2**-10, 1 + 2**-10, -(1 + 2**-9), 1365 / 4096, 0.0])
    out = round_to_tf32(x)
    torch.testing.assert_close(out[:6], expected, rtol=0, atol=0)
    assert bool(((out - x).abs() <= 2**-11 * x.abs()).all())  # half a unit of the 10-bit mantissa
    assert round_to_tf32(x.double()) is not None and torch.equal(round_to_tf32(x.double()), x.double())


def test_emulate_tf32_rounds_gemm_factors_only():
    a = torch.full((1, 1), 1 + 2**-12)
    b = torch.ones(1, 1)
    assert float(a @ b) == 1 + 2**-12
    with EmulateTF32():
        assert float(a @ b) == 1.0  # a rounded to 1
        assert float(torch.bmm(a[None], b[None])) == 1.0
        assert float(torch.ones(1, 1, 1).baddbmm(a[None], b[None])) == 2.0
        assert float(a + b) == 2 + 2**-12  # elementwise work is exact float32
        assert float(a.double() @ b.double()) == 1 + 2**-12  # float64 unaffected


# --------------------------------------------------------------------------------------
# Accuracy of the log-densities under TF32 (emulated): centred before every product
# --------------------------------------------------------------------------------------


def _problem(covariance_type, offset, *, seed=0):
    """Float32 inputs (G=2, N=1000, K=8, D=32; means 3σ apart, offset from the origin)
    and the float64 log-densities of exactly those inputs."""
    g = torch.Generator().manual_seed(seed)
    G, N, K, D = 2, 1000, 8, 32
    f64 = torch.float64
    means = 3 * torch.randn(G, K, D, generator=g, dtype=f64) + offset
    comp = torch.randint(0, K, (G, N), generator=g)
    X = torch.gather(means, 1, comp[..., None].expand(-1, -1, D))
    X = X + torch.randn(G, N, D, generator=g, dtype=f64)
    A = torch.randn(G, K, D, D, generator=g, dtype=f64) / D**0.5
    full = A @ A.mT + 0.5 * torch.eye(D, dtype=f64)
    variances = full.diagonal(dim1=-2, dim2=-1).contiguous()
    cov = {"full": full, "tied": full[:, 0], "diag": variances,
           "spherical": variances.mean(-1)}[covariance_type]
    prec_chol, _ = ker.compute_prec_chol(cov, covariance_type)
    X32, means32, prec32 = X.float(), means.float(), prec_chol.float()
    expected = ker.log_gaussian_prob(X32.double(), means32.double(), prec32.double(),
                                     covariance_type)
    return X32, means32, prec32, expected


def _rel_error(actual, expected):
    return float(((actual.double() - expected).abs() / expected.abs().clamp_min(1)).max())


def _uncentred_full(X, means, prec_chol):
    """The pre-fix formula: ``[x, 1] @ [P; -μ P]`` with the shift folded into the GEMM."""
    G, K, D, _ = prec_chol.shape
    mu_prec = (means.unsqueeze(-2) @ prec_chol).squeeze(-2)  # (G, K, D)
    wide = torch.cat([prec_chol.permute(0, 2, 1, 3).reshape(G, D, K * D),
                      -mu_prec.reshape(G, 1, K * D)], dim=1)  # (G, D+1, K*D)
    x_aug = torch.cat([X, X.new_ones(*X.shape[:-1], 1)], dim=-1)  # (G, N, D+1)
    maha = (x_aug @ wide).square().view(G, X.shape[1], K, D).sum(-1)  # (G, N, K)
    log_det = ker.log_det_prec_chol(prec_chol, "full", D)  # (G, K)
    return -0.5 * (D * ker._linalg.LOG_2PI + maha) + log_det.unsqueeze(-2)


#: Largest relative error of the log-densities under TF32, from the measurement in
#: ``kernels/_settings.py`` (7e-4 and 1.8e-3) with a margin of ~2x for other seeds.
TF32_BOUND = {"full": 1.5e-3, "tied": 1.5e-3, "diag": 4e-3, "spherical": 4e-3}


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_tf32_error_does_not_grow_with_the_offset(covariance_type):
    """Non-regression (issue 16 item 6): data 100σ from the origin are scored as accurately
    under TF32 as centred data, because samples and means are centred before the GEMM
    (the folded ``[x, 1] @ [P; -μ P]`` lost 25x: 1.6e-2 against 6.6e-4)."""
    errors = {}
    for offset in (0.0, 100.0):
        X, means, prec_chol, expected = _problem(covariance_type, offset)
        with EmulateTF32():
            errors[offset] = _rel_error(
                ker.log_gaussian_prob(X, means, prec_chol, covariance_type), expected)
    assert errors[100.0] <= TF32_BOUND[covariance_type], errors
    assert errors[100.0] <= 2 * errors[0.0], errors
    assert errors[0.0] > 1e-4, errors  # the emulation is on: TF32's own round-off shows


def test_uncentred_formula_loses_digits_under_tf32():
    """The measurement behind the fix: the folded formula's TF32 error grows with the
    offset, the kernel's does not."""
    X, means, prec_chol, expected = _problem("full", 100.0)
    with EmulateTF32():
        old = _rel_error(_uncentred_full(X, means, prec_chol), expected)
        new = _rel_error(ker.log_gaussian_prob(X, means, prec_chol, "full"), expected)
    assert old > 5e-3 and old > 8 * new, (old, new)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_far_from_origin_keeps_float32_accuracy(covariance_type):
    """Without TF32: float32 round-off only (the folded formula had 3.6e-6 at 100σ)."""
    X, means, prec_chol, expected = _problem(covariance_type, 100.0, seed=1)
    error = _rel_error(ker.log_gaussian_prob(X, means, prec_chol, covariance_type), expected)
    assert error <= (1e-6 if covariance_type in ("full", "tied") else 4e-6), error
    if covariance_type == "full":
        assert _rel_error(_uncentred_full(X, means, prec_chol), expected) > 2 * error


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_shared_X_layout_is_centred_too(covariance_type):
    """``X (N, D)`` scored under every group (the detector's layout) under TF32."""
    X, means, prec_chol, expected = _problem(covariance_type, 100.0, seed=2)
    with EmulateTF32():
        out = ker.log_gaussian_prob(X[0], means, prec_chol, covariance_type)
    exp_shared = ker.log_gaussian_prob(X[0].double(), means.double(), prec_chol.double(),
                                       covariance_type)
    assert _rel_error(out, exp_shared) <= TF32_BOUND[covariance_type]


# --------------------------------------------------------------------------------------
# M-step under TF32: first moments centred (on CUDA with TF32 allowed only)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_mstep_means_under_tf32_do_not_lose_the_offset(covariance_type, monkeypatch):
    """``Σ r x`` rounds ``x`` to 10 bits under TF32: data 100σ from the origin moved the
    means by up to 5e-3σ. With TF32 active (simulated: the predicate says CUDA with TF32
    allowed) the products are centred; on CPU the predicate is False and the path unchanged."""
    from idefender_gpu.kernels import _dense

    X, means, prec_chol, _ = _problem(covariance_type, 100.0, seed=3)
    resp = torch.softmax(ker.log_gaussian_prob(X.double(), means.double(), prec_chol.double(),
                                               covariance_type), -1)
    expected = ker.estimate_gaussian_parameters(X.double(), resp, 1e-3, covariance_type)[1]
    expected_shift = ker.shifted_statistics(X.double(), resp, means.double(), covariance_type)[1]
    resp32 = resp.float()

    def errors():
        with EmulateTF32():
            got = ker.estimate_gaussian_parameters(X, resp32, 1e-3, covariance_type)[1]
            first = ker.shifted_statistics(X, resp32, means, covariance_type)[1]
        return (float((got.double() - expected).abs().max()),
                float((first.double() - expected_shift).abs().max() / resp.sum(-2).max()))

    assert not _dense._tf32_products(X)  # CPU: never
    plain = errors()
    monkeypatch.setattr(_dense, "_tf32_products", lambda X: X.dtype == torch.float32)
    centred = errors()
    # measured: 5.3e-3 / 4.7e-3 uncentred, 4.2e-4 / 2.4e-4 centred
    assert plain[0] > 3e-3 and plain[1] > 3e-3, plain
    assert centred[0] < 1e-3 and centred[1] < 1e-3, centred
    assert centred[0] * 5 < plain[0] and centred[1] * 5 < plain[1], (plain, centred)
    # the centred products run in chunks of rows: the same sums under a tiny budget
    chunked = ker.estimate_gaussian_parameters(X, resp32, 1e-3, covariance_type, memory_budget=64)
    torch.testing.assert_close(chunked, ker.estimate_gaussian_parameters(X, resp32, 1e-3,
                                                                         covariance_type),
                               rtol=1e-4, atol=1e-4)
    first = ker.shifted_statistics(X, resp32, means, covariance_type, memory_budget=64)[1]
    torch.testing.assert_close(first, ker.shifted_statistics(X, resp32, means,
                                                             covariance_type)[1],
                               rtol=1e-4, atol=1e-3)


def test_settings_docstring_examples_run():
    """``kernels/`` lies outside pytest's doctest paths: run the module's examples here."""
    import doctest

    from idefender_gpu.kernels import _settings

    result = doctest.testmod(_settings, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0, result


# --------------------------------------------------------------------------------------
# The same accuracy on the real device (TF32 for real on a CUDA GPU; CPU: float32)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_kernels_under_allow_tf32_on_the_device(covariance_type, device):
    """Under :func:`allow_tf32` on the device: the E-step and the M-step means keep the
    TF32 bound with data 100σ from the origin (on CPU the flag changes nothing)."""
    X, means, prec_chol, expected = _problem(covariance_type, 100.0, seed=4)
    resp = torch.softmax(expected, -1)
    expected_means = ker.estimate_gaussian_parameters(X.double(), resp, 1e-3, covariance_type)[1]
    X, means, prec_chol = X.to(device), means.to(device), prec_chol.to(device)
    with ker.allow_tf32():
        log_prob = ker.log_gaussian_prob(X, means, prec_chol, covariance_type)
        new_means = ker.estimate_gaussian_parameters(X, resp.float().to(device), 1e-3,
                                                     covariance_type)[1]
    assert _rel_error(log_prob.cpu(), expected) <= TF32_BOUND[covariance_type]
    assert float((new_means.cpu().double() - expected_means).abs().max()) < 1e-3


def test_default_budget_on_the_device(device):
    budget = ker.default_memory_budget(device)
    assert budget >= ker.DEFAULT_MEMORY_BUDGET[device.type]
    if device.type == "cuda":  # a real query of the free memory
        free, total = torch.cuda.mem_get_info(device)
        assert budget <= max(ker.DEFAULT_MEMORY_BUDGET["cuda"], total)
