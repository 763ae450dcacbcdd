"""Every exception and warning class of idefender-gpu.

When scikit-learn is installed, :class:`NotFittedError`, :class:`ConvergenceWarning` and
:class:`InvalidParameterError` subclass scikit-learn's classes of the same names, so code
written against ``sklearn.mixture.GaussianMixture`` that catches them keeps working.
scikit-learn stays optional and is imported only when one of those three names is first
used (``import idefender_gpu.kernels`` never imports it): without it they subclass
``(ValueError, AttributeError)``, ``UserWarning`` and ``(ValueError, TypeError)`` as
scikit-learn's do.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConvergenceWarning",
    "DatasetNotFoundError",
    "InvalidParameterError",
    "NotFittedError",
    "NotPSDError",
    "NumericalWarning",
    "RankFailedError",
]


class NotPSDError(ValueError):
    """A covariance matrix is not positive definite, so its Cholesky factor does not exist.

    The message names the group and component, and the remedies: fewer components, a
    larger ``reg_covar``, rescaled data, or float64 instead of float32.
    """


class NumericalWarning(RuntimeWarning):
    """A numerical fix-up (such as added jitter) changed the result."""


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are in none of the searched folders (and no download)."""


class RankFailedError(RuntimeError):
    """Another rank of a data-parallel fit failed, or a collective did not complete in time.

    Raised on every rank that did not fail itself; the failing rank raises its own
    exception. The message names the failing ranks, what they were doing and their errors.
    """


def _sklearn_bases() -> dict[str, tuple[type, ...]]:
    try:
        from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning
        from sklearn.exceptions import NotFittedError as SkNotFittedError
        from sklearn.utils._param_validation import InvalidParameterError as SkInvalid
    except ImportError:  # pragma: no cover - scikit-learn is optional
        return {
            "NotFittedError": (ValueError, AttributeError),
            "ConvergenceWarning": (UserWarning,),
            "InvalidParameterError": (ValueError, TypeError),
        }
    return {
        "NotFittedError": (SkNotFittedError,),
        "ConvergenceWarning": (SkConvergenceWarning,),
        "InvalidParameterError": (SkInvalid,),
    }


_DOCS = {
    "NotFittedError": "Raised when an estimator or detector is used before it is fitted.",
    "ConvergenceWarning": "Warned when EM stops at ``max_iter`` before reaching ``tol``.",
    "InvalidParameterError": (
        "A hyper-parameter has the wrong type or value (a ``ValueError`` and a ``TypeError``).\n\n"
        "The message reads ``The '<name>' parameter of <Owner> must be <constraint>. Got <value> "
        "instead.``, scikit-learn's wording."
    ),
}
_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """Create the scikit-learn-compatible classes on first use (PEP 562)."""
    if name not in _DOCS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not _LAZY:
        for key, bases in _sklearn_bases().items():
            _LAZY[key] = type(key, bases, {"__doc__": _DOCS[key], "__module__": __name__})
    return _LAZY[name]
