"""One declarative validation family for every public hyper-parameter (private).

In the spirit of scikit-learn's ``_parameter_constraints``: each public class declares a
table ``{name: [constraint, ...]}`` and calls :func:`validate_params` at its public entry
point (``fit`` for estimators, ``__init__`` or ``__call__`` for detectors and attacks). A
value is valid when it satisfies at least one of its constraints. One message style, the
one of scikit-learn::

    The 'tol' parameter of GaussianMixture must be a float in the range [0.0, inf). Got nan instead.

raised as :class:`~idefender_gpu.exceptions.InvalidParameterError` (a ``ValueError`` and a
``TypeError``; scikit-learn's class when scikit-learn is installed). NaN and infinity never
satisfy an :class:`Interval`, whatever its bounds, so every real hyper-parameter rejects them.

Constraints
-----------
``Interval(Integral | Real, left, right, closed=...)``
    Numbers in a range (``None`` for an open end). ``bool`` is never a number here.
``Options(str, {...})``
    One of a set of values.
``InstanceOf(type, ...)``
    An instance of one of the given types.
``Predicate(function, description)``
    Anything else, with the words for the message (e.g. ``"a torch device"``).
``None``
    The value ``None``.
``"boolean"``
    A Python or NumPy bool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from numbers import Integral, Real
from typing import Any

import numpy as np

from idefender_gpu import exceptions

__all__ = [
    "InstanceOf",
    "Interval",
    "Options",
    "Predicate",
    "check_param",
    "validate_params",
]


class Interval:
    """Numbers of ``type_`` (``Integral`` or ``Real``) between ``left`` and ``right``.

    Parameters
    ----------
    type_ : {numbers.Integral, numbers.Real}
        ``Real`` also accepts ints; neither accepts ``bool``.
    left, right : float or None
        Bounds; ``None`` is unbounded (the message writes ``-inf`` / ``inf``).
    closed : {"left", "right", "both", "neither"}, default="left"
        Which bounds belong to the interval.
    """

    def __init__(self, type_: type, left: float | None, right: float | None, *,
                 closed: str = "left") -> None:
        if type_ not in (Integral, Real):
            raise TypeError(f"type_ must be numbers.Integral or numbers.Real; got {type_!r}")
        if closed not in ("left", "right", "both", "neither"):
            raise ValueError(f"closed must be 'left', 'right', 'both' or 'neither'; got {closed!r}")
        self.type_, self.left, self.right, self.closed = type_, left, right, closed

    def is_satisfied_by(self, value: Any) -> bool:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, self.type_):
            return False
        if self.type_ is Real and not math.isfinite(float(value)):
            return False
        if self.left is not None:
            if value < self.left or (value == self.left and self.closed in ("right", "neither")):
                return False
        if self.right is not None:
            if value > self.right or (value == self.right and self.closed in ("left", "neither")):
                return False
        return True

    def __str__(self) -> str:
        kind = "an int" if self.type_ is Integral else "a float"
        left = "-inf" if self.left is None else self.left
        right = "inf" if self.right is None else self.right
        lb = "[" if self.left is not None and self.closed in ("left", "both") else "("
        rb = "]" if self.right is not None and self.closed in ("right", "both") else ")"
        return f"{kind} in the range {lb}{left}, {right}{rb}"


class Options:
    """One of ``options``, all of type ``type_`` (usually ``str``)."""

    def __init__(self, type_: type, options: Iterable[Any]) -> None:
        self.type_, self.options = type_, frozenset(options)

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, self.type_) and value in self.options

    def __str__(self) -> str:
        listed = ", ".join(repr(o) for o in sorted(self.options, key=repr))
        return f"a {self.type_.__name__} among {{{listed}}}"


class InstanceOf:
    """An instance of one of ``types``."""

    def __init__(self, *types: type) -> None:
        self.types = types

    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, self.types) and not (
            isinstance(value, bool) and bool not in self.types
        )

    def __str__(self) -> str:
        names = [f"'{t.__module__}.{t.__qualname__}'".replace("'builtins.", "'") for t in self.types]
        return " or ".join(f"an instance of {n}" for n in names)


class Predicate:
    """Values for which ``function(value)`` is true, described as ``description``."""

    def __init__(self, function: Callable[[Any], bool], description: str) -> None:
        self.function, self.description = function, description

    def is_satisfied_by(self, value: Any) -> bool:
        try:
            return bool(self.function(value))
        except (TypeError, ValueError):
            return False

    def __str__(self) -> str:
        return self.description


class _NoneConstraint:
    def is_satisfied_by(self, value: Any) -> bool:
        return value is None

    def __str__(self) -> str:
        return "None"


class _Boolean:
    def is_satisfied_by(self, value: Any) -> bool:
        return isinstance(value, (bool, np.bool_))

    def __str__(self) -> str:
        return "an instance of 'bool'"


def _make(constraint: Any) -> Any:
    if constraint is None:
        return _NoneConstraint()
    if constraint == "boolean":
        return _Boolean()
    if hasattr(constraint, "is_satisfied_by"):
        return constraint
    raise TypeError(f"unknown constraint {constraint!r}")  # a programming error, not user input


def _describe(constraints: list[Any]) -> str:
    words = [str(c) for c in constraints]
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def check_param(value: Any, name: str, constraints: list[Any], owner: str | None = None) -> None:
    """Raise :class:`~idefender_gpu.exceptions.InvalidParameterError` unless ``value``
    satisfies one of ``constraints``.

    Parameters
    ----------
    value : object
        The value to check.
    name : str
        The parameter's name, quoted in the message.
    constraints : list
        Constraints (see the module docstring); one satisfied is enough.
    owner : str, optional
        The class or function the parameter belongs to (``"... of GaussianMixture ..."``).
    """
    made = [_make(c) for c in constraints]
    if any(c.is_satisfied_by(value) for c in made):
        return
    of = f" of {owner}" if owner else ""
    raise exceptions.InvalidParameterError(
        f"The '{name}' parameter{of} must be {_describe(made)}. Got {value!r} instead."
    )


def validate_params(owner: str, values: Mapping[str, Any], constraints: Mapping[str, list[Any]]) -> None:
    """Check every entry of ``values`` that ``constraints`` declares, in declaration order.

    Parameters
    ----------
    owner : str
        The class name used in messages.
    values : mapping
        Parameter names to values (e.g. ``estimator.get_params(deep=False)``).
    constraints : mapping
        Parameter names to lists of constraints. A name declared here but absent from
        ``values`` is a programming error (``KeyError``).

    Raises
    ------
    InvalidParameterError
        On the first parameter that satisfies none of its constraints; nothing is changed.
    """
    for name, allowed in constraints.items():
        check_param(values[name], name, allowed, owner)
