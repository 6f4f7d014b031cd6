"""The (group, class) cell index, the one place it is computed.

With ``G`` sensitive groups and ``K`` classes, the cells of a ``G x K`` table (loss tables, count tables, error
tables) are numbered row by row: cell ``(g, y)`` is ``g * K + y``. Flattening a ``G x K`` table with
``reshape(-1)`` (or counting flat indices with ``bincount(..., minlength=G * K)`` and reshaping to ``(G, K)``) uses
the same order. Functional core: knows nothing of Lightning.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["cell_index"]

_Index = TypeVar("_Index")


def cell_index(group: _Index, target: _Index, num_classes: int) -> _Index:
    """The flat index ``group * num_classes + target`` of the (group, class) cell, row-major over ``G x K``.

    Works element-wise on Python ints, NumPy integer arrays and integer tensors alike (it only multiplies and
    adds), so it is as cheap as writing the expression out and reads nothing back from a device; it checks nothing
    (the callers validate their labels and groups where they read them).

    Args:
        group: the group ``g`` of each sample, in ``0 .. G - 1``.
        target: the class ``y`` of each sample, in ``0 .. K - 1``.
        num_classes: ``K``.

    Returns:
        ``g * K + y``, of the inputs' kind.

    Example:
        >>> import torch
        >>> cell_index(torch.tensor([0, 1, 2]), torch.tensor([3, 0, 4]), 5)
        tensor([ 3,  5, 14])
        >>> torch.arange(6).view(2, 3).reshape(-1)[cell_index(1, 2, 3)]  # the same cell of the flattened table
        tensor(5)
    """
    return group * num_classes + target  # type: ignore[operator, return-value]
