"""Argument checks shared by the datamodules; each returns the value checked, and each error names the argument and
its range."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["check_bool", "check_choice", "check_int", "check_real", "counts_disagreement", "non_finite_sample"]


def check_int(name: str, value: object, minimum: int, allow_none: bool = False) -> int | None:
    """Return ``value`` as an int ``>= minimum`` (or None when allowed), else raise ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        expected = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def check_real(name: str, value: object, low: float, high: float = math.inf, low_open: bool = False,
               high_open: bool = False) -> float:
    """Return ``value`` as a finite float inside the given interval, else raise ValueError."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or math.isinf(high) else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    number = float(value)
    inside = (math.isfinite(number) and (number > low if low_open else number >= low)
              and (number < high if high_open else number <= high))
    if not inside:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return number


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool, else raise ValueError."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError."""
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def counts_disagreement(given: object, actual: Sequence[int], given_name: str = "the class counts given",
                        actual_name: str = "those counted from the data's labels") -> str | None:
    """A warning text when class counts given by the user differ from those of the data's own labels (None when they
    agree, or when nothing was given); it says so when they are the same numbers in another order (the class order
    reversed, a sorted list).

    Example:
        >>> counts_disagreement([1, 5, 20], [20, 5, 1]).endswith("the same numbers in another order: check the order "
        ...                                                       "of classes.")
        True
        >>> counts_disagreement([20, 5, 1], [20, 5, 1]) is None
        True
    """
    if given is None or isinstance(given, (str, bytes)):
        return None
    try:
        mine = np.asarray(given, dtype=np.float64).reshape(-1).tolist()
    except (TypeError, ValueError):
        return None
    theirs = [float(c) for c in actual]
    if mine == theirs:
        return None
    text = f"{given_name} {_brief(mine)} differ from {actual_name} {_brief(theirs)}"
    if sorted(mine) == sorted(theirs):
        text += ": the same numbers in another order: check the order of classes."
    else:
        text += "."
    return text


def _brief(values: list[float], shown: int = 6) -> str:
    items = [str(int(v)) if float(v).is_integer() else f"{v:g}" for v in values[:shown]]
    return "[" + ", ".join(items) + (", ...]" if len(values) > shown else "]")


_ARRAY_ATTRIBUTES = ("images", "data", "inputs", "features", "x")


def non_finite_sample(dataset: Any) -> str | None:
    """Where a dataset held in memory has a NaN or infinite input (``"sample 3 of 31 (label 7) holds nan"``), else
    None; looks at its arrays at once (a ``TensorDataset``'s first tensor, an ``images`` / ``data`` array, through
    ``Subset``), never item by item, and says nothing about data it cannot see that way (files read lazily).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> x = torch.zeros(4, 2); x[2, 1] = float("nan")
        >>> non_finite_sample(TensorDataset(x, torch.tensor([0, 1, 1, 0])))
        'sample 2 of 4 (label 1) holds nan'
    """
    indices = None
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # torch.utils.data.Subset, nested
        picked = np.asarray(dataset.indices, dtype=np.int64)
        indices = picked if indices is None else picked[indices]
        dataset = dataset.dataset
    arrays = list(getattr(dataset, "tensors", ())[:1]) or [getattr(dataset, a) for a in _ARRAY_ATTRIBUTES
                                                           if hasattr(dataset, a)][:1]
    if not arrays:
        return None
    array = arrays[0]
    if isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating):
        array = torch.from_numpy(array)
    if not isinstance(array, torch.Tensor) or not array.is_floating_point() or array.ndim == 0:
        return None
    rows = array if indices is None else array[torch.from_numpy(indices).to(array.device)]
    bad = ~torch.isfinite(rows.reshape(rows.shape[0], -1)).all(dim=1)
    if not bool(bad.any()):
        return None
    position = int(bad.nonzero()[0, 0])
    flat = rows[position].reshape(-1)
    value = flat[~torch.isfinite(flat)][0].item()
    labels = getattr(dataset, "tensors", (None, None))[1] if hasattr(dataset, "tensors") else getattr(
        dataset, "targets", None)
    label = ""
    if labels is not None:
        try:
            source = position if indices is None else int(indices[position])
            label = f" (label {int(labels[source])})"
        except (IndexError, TypeError, ValueError):
            label = ""
    return f"sample {position} of {rows.shape[0]}{label} holds {value}"
