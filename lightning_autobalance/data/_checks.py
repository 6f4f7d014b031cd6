"""Argument checks shared by the datamodules; each error names the argument and its range.

Example:
    >>> check_int("batch_size", 64, minimum=1)
    64
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

__all__ = ["check_bool", "check_choice", "check_int", "check_real"]


def check_int(name: str, value: object, minimum: int, allow_none: bool = False) -> int | None:
    """Return ``value`` as an int ``>= minimum`` (or None when allowed), else raise ValueError.

    Example:
        >>> check_int("n", None, 1, allow_none=True) is None
        True
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        expected = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_real(
    name: str,
    value: object,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float inside the given interval, else raise ValueError.

    Example:
        >>> check_real("upper_fraction", 0.2, 0.0, 1.0, low_open=True, high_open=True)
        0.2
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    number = float(value)
    inside = (
        math.isfinite(number)
        and (number > low if low_open else number >= low)
        and (number < high if high_open else number <= high)
    )
    if not inside:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return number


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool, else raise ValueError.

    Example:
        >>> check_bool("download", False)
        False
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError.

    Example:
        >>> check_choice("profile", "step", ("exponential", "step"))
        'step'
    """
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
