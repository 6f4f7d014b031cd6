"""``Reducer``: how tensors are combined over the processes of a run, as one value.

The hypergradient (every linear piece is averaged), the per-unit upper objectives (their per-unit loss sums and
counts are summed) and :class:`~lightning_autobalance.core.losses.GroupDROLoss` (the same sums during training) all take
one :class:`Reducer`, passed to them explicitly. One process needs none (``Reducer()`` is the identity).
:class:`~lightning_autobalance.AutoBalanceCallback` builds one from the Lightning strategy
(:meth:`Reducer.from_strategy`); plain ``torch.distributed`` code uses :meth:`Reducer.torch_distributed`, which reads
the process group when it is called, so one object serves before and after ``init_process_group``.

Every process must make the same calls in the same order (they are collective). Plain PyTorch; nothing of Lightning
is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Reducer"]


class Reducer:
    """Sums or averages a tensor over ``world_size`` processes (the identity for one process).

    Args:
        world_size: the number of processes, ``>= 1``.
        sum: ``sum(t) -> tensor``, the sum of ``t`` over the processes (may work in place); needed when
            ``world_size > 1``.
        mean: ``mean(t) -> tensor``, the mean over the processes (default: ``sum(t) / world_size``).

    A reducer is also a callable: ``reducer(t)`` is ``reducer.mean(t)``, the form that
    :func:`~lightning_autobalance.core.hypergradient.hypergradient` takes as ``reduce``.

    Example:
        >>> r = Reducer()  # one process
        >>> r.sum(torch.tensor([1.0, 2.0])), r.world_size
        (tensor([1., 2.]), 1)
        >>> Reducer(world_size=2)
        Traceback (most recent call last):
        ...
        ValueError: Reducer: world_size=2 needs a sum(t) callable that sums over the processes.
    """

    def __init__(self, world_size: int = 1, sum: Callable[[Tensor], Tensor] | None = None,
                 mean: Callable[[Tensor], Tensor] | None = None) -> None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"Reducer: world_size must be a positive integer; got {world_size!r}.")
        if world_size > 1 and sum is None:
            raise ValueError(f"Reducer: world_size={world_size} needs a sum(t) callable that sums over the processes.")
        self._world_size = world_size
        self._sum = sum
        self._mean = mean

    @property
    def world_size(self) -> int:
        """The number of processes reduced over."""
        return self._world_size

    @property
    def is_local(self) -> bool:
        """Whether this reducer is the identity (one process)."""
        return self.world_size == 1

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the processes."""
        if self.is_local or self._sum is None:
            return tensor
        return self._sum(tensor)

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean of ``tensor`` over the processes."""
        if self.is_local:
            return tensor
        if self._mean is not None:
            return self._mean(tensor)
        return self.sum(tensor) / self.world_size

    def __call__(self, tensor: Tensor) -> Tensor:
        return self.mean(tensor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(world_size={self.world_size})"

    @staticmethod
    def from_strategy(strategy: Any, world_size: int) -> Reducer:
        """The reducer of a Lightning strategy: its ``reduce(t, reduce_op="sum" | "mean")`` (identity on one
        process). Defined here without importing Lightning: ``strategy`` is any object with that method."""
        if world_size <= 1:
            return Reducer()
        return Reducer(world_size, sum=lambda t: strategy.reduce(t, reduce_op="sum"),
                       mean=lambda t: strategy.reduce(t, reduce_op="mean"))

    @staticmethod
    def torch_distributed() -> Reducer:
        """A reducer over the default ``torch.distributed`` process group, read at every call (the identity while
        no process group is initialised)."""
        return _TorchDistributed()


class _TorchDistributed(Reducer):
    """:meth:`Reducer.torch_distributed`: ``torch.distributed.all_reduce`` over the default group, if any."""

    @property
    def world_size(self) -> int:
        dist = torch.distributed
        return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1

    def sum(self, tensor: Tensor) -> Tensor:
        if self.is_local:
            return tensor
        torch.distributed.all_reduce(tensor)
        return tensor
