"""Numerical settings of the kernels: TF32 as an explicit, scoped opt-in.

TF32 (NVIDIA Ampere and later) runs float32 matrix products on tensor cores with both
factors rounded to a 10-bit mantissa and float32 accumulation: several times the float32
rate (about 7x on an H100), at a unit round-off of ``2**-11 ≈ 4.9e-4`` per factor.
PyTorch leaves it off for matrix products by default, and the library never switches it
on by itself (STYLE C7/C14: no global flag is flipped silently). Use :func:`allow_tf32`
around the work that may use it::

    from idefender_gpu.kernels import allow_tf32

    with allow_tf32():
        gm.fit(X_cuda_float32)

Accuracy (emulated on CPU by rounding every GEMM factor to TF32,
``tests/test_kernel_settings.py``; ``G=2, N=2000, K=8, D=32``, components ``3σ`` apart,
data offset from the origin by up to ``100σ``), maximum relative error of the
log-densities against float64 on the same float32 inputs:

===========  ===========  ==============  ===================
covariance   float32      TF32 (centred)  TF32, uncentred GEMM
===========  ===========  ==============  ===================
full, tied   ``2.6e-7``   ``7e-4``        ``1.6e-2`` at 100σ
diag, sph.   ``1.6e-6``   ``1.8e-3``      (already centred)
===========  ===========  ==============  ===================

M-step (same data at 100σ): the means moved by up to ``5.3e-3 σ`` with uncentred
products and by ``4.2e-4 σ`` centred.

The kernels centre samples and means on the mean of the component means before every
E-step product (:func:`~._dense.log_gaussian_prob`, all devices: the same FLOPs), and,
when TF32 is active (CUDA, float32, allowed), the M-step's first moments
(``Σ r (x - x₀) + n x₀``) too, so the TF32 error does not grow with the distance of the
data from the origin; what remains is TF32's own round-off, relative to
the spread of the data about that centre (larger for diag/spherical, whose one-GEMM
expansion ``x² p - 2 x μ p + μ² p`` cancels terms of the size of that spread). That is
about three decimal digits of the log-likelihood: enough for EM on well-separated data,
not for parity tests (which run with TF32 off) or for float64 (never affected).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["allow_tf32", "tf32_enabled"]


def _state() -> tuple[str, object, object]:
    """``(api, matmul, cudnn)``: PyTorch's legacy booleans ``allow_tf32``, or, once a user
    has set the newer ``fp32_precision`` strings (reading the legacy flags then raises),
    those strings."""
    try:
        return "legacy", torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    except RuntimeError:  # the new API is in use
        return ("fp32_precision", torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cudnn.conv.fp32_precision)


def _set(api: str, matmul: object, cudnn: object) -> None:
    if api == "legacy":
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
    else:
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = cudnn


def tf32_enabled() -> bool:
    """Whether float32 matrix products on CUDA may use TF32 now (PyTorch's global flag)."""
    api, matmul, _ = _state()
    return bool(matmul) if api == "legacy" else matmul == "tf32"


@contextmanager
def allow_tf32(enabled: bool = True) -> Iterator[None]:
    """Allow (or, with ``enabled=False``, forbid) TF32 for float32 CUDA matmuls and cuDNN
    convolutions inside the block; the previous settings are restored on exit, also when
    the block raises.

    Sets ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
    (or, where the program already uses PyTorch's newer API, ``fp32_precision`` of
    ``torch.backends.cuda.matmul`` and ``torch.backends.cudnn.conv`` to ``'tf32'`` /
    ``'ieee'``: PyTorch refuses a mix of the two). Has no effect on CPU computations or
    on float64.

    Parameters
    ----------
    enabled : bool, default=True
        Whether TF32 is allowed inside the block.

    Examples
    --------
    >>> from idefender_gpu.kernels import allow_tf32, tf32_enabled
    >>> before = tf32_enabled()
    >>> with allow_tf32():
    ...     tf32_enabled()
    True
    >>> tf32_enabled() == before
    True
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool; got {enabled!r}")
    api, matmul, cudnn = _state()
    inside = enabled if api == "legacy" else ("tf32" if enabled else "ieee")
    _set(api, inside, inside)
    try:
        yield
    finally:
        _set(api, matmul, cudnn)
