"""The (group, class) cell index of a ``G x K`` table (loss, count and error tables), the one place it is computed,
and the units a loss is taken per. Functional core: knows nothing of Lightning.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["cell_index", "count_table", "num_units", "unit_index"]

_Index = TypeVar("_Index")


def cell_index(group: _Index, target: _Index, num_classes: int) -> _Index:
    """The flat index ``group * num_classes + target`` of the (group, class) cell, row-major over ``G x K``.

    Flattening a ``G x K`` table with ``reshape(-1)`` (or counting flat indices with ``bincount(..., minlength=G * K)``
    and reshaping to ``(G, K)``) uses the same order. Works element-wise on Python ints, NumPy integer arrays and
    integer tensors alike (it only multiplies and adds, and returns the inputs' kind), so it is as cheap as writing the
    expression out and reads nothing back from a device; it checks nothing (the callers validate their labels and
    groups where they read them).

    Example:
        >>> import torch
        >>> cell_index(torch.tensor([0, 1, 2]), torch.tensor([3, 0, 4]), 5)
        tensor([ 3,  5, 14])
        >>> torch.arange(6).view(2, 3).reshape(-1)[cell_index(1, 2, 3)]  # the same cell of the flattened table
        tensor(5)
    """
    return group * num_classes + target  # type: ignore[operator, return-value]


def unit_index(over: str, target: Tensor, group: Tensor | None, num_classes: int) -> Tensor:
    """The unit of every sample when a loss is taken per ``over``: ``"class"`` (the label), ``"group"`` or ``"cell"``
    (:func:`cell_index`); ``group`` is needed unless ``over="class"``."""
    if over == "class":
        return target
    assert group is not None
    return group if over == "group" else cell_index(group, target, num_classes)


def num_units(over: str, num_classes: int, num_groups: int) -> int:
    """How many units :func:`unit_index` numbers."""
    return {"class": num_classes, "group": num_groups, "cell": num_groups * num_classes}[over]


def count_table(labels: Tensor, groups: Tensor | None, num_classes: int,
                 num_groups: int | None) -> tuple[list[int], list[list[int]] | None]:
    """Counts of ``labels`` per class and, with ``groups`` of the same length, per (group, class) cell: a
    ``num_groups x num_classes`` table (``num_groups`` ``None``: one past the largest group index).

    Raises:
        ValueError: a negative group index, or one at or beyond ``num_groups``.
    """
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    if groups is None or groups.numel() != labels.numel():
        return counts, None
    if groups.numel() and groups.min() < 0:
        raise ValueError("The upper data has negative group indices.")
    g = int(num_groups) if num_groups is not None else int(groups.max()) + 1 if groups.numel() else 1
    if groups.numel() and groups.max() >= g:
        raise ValueError(f"The upper data has group indices outside [0, {g}) ({g} groups).")
    cells = torch.bincount(cell_index(groups, labels, num_classes), minlength=g * num_classes).view(g, num_classes)
    return counts, cells.tolist()
