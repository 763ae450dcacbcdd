"""Exceptions and warnings of idefender-gpu.

When scikit-learn is installed, :class:`NotFittedError` and :class:`ConvergenceWarning`
subclass scikit-learn's classes of the same names, so code written against
``sklearn.mixture.GaussianMixture`` that catches them keeps working. scikit-learn stays
an optional dependency: without it they subclass ``(ValueError, AttributeError)`` and
``UserWarning`` as scikit-learn's do.
"""

from __future__ import annotations

try:  # pragma: no cover - exercised whichever way the environment is set up
    from sklearn.exceptions import ConvergenceWarning as _SkConvergenceWarning
    from sklearn.exceptions import NotFittedError as _SkNotFittedError
except ImportError:  # pragma: no cover
    _SkNotFittedError = None
    _SkConvergenceWarning = None

__all__ = ["ConvergenceWarning", "NotFittedError", "NotPSDError", "NumericalWarning"]

if _SkNotFittedError is not None:

    class NotFittedError(_SkNotFittedError):
        """Raised when an estimator or detector is used before it is fitted.

        Subclasses ``sklearn.exceptions.NotFittedError`` (itself a ``ValueError`` and an
        ``AttributeError``).
        """

    class ConvergenceWarning(_SkConvergenceWarning):
        """Warned when EM stops at ``max_iter`` before reaching ``tol``.

        Subclasses ``sklearn.exceptions.ConvergenceWarning``.
        """

else:  # pragma: no cover

    class NotFittedError(ValueError, AttributeError):
        """Raised when an estimator or detector is used before it is fitted."""

    class ConvergenceWarning(UserWarning):
        """Warned when EM stops at ``max_iter`` before reaching ``tol``."""


class NotPSDError(ValueError):
    """A covariance matrix is not positive definite, so its Cholesky factor does not exist.

    The message names the group and component, and the remedies: fewer components, a
    larger ``reg_covar``, rescaled data, or float64 instead of float32.
    """


class NumericalWarning(RuntimeWarning):
    """A numerical fix-up (such as added jitter) changed the result."""
