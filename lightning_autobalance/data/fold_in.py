"""``FoldInSampler``: the training order of a one-phase AutoBalance run.

A one-phase run learns the loss and trains the model it keeps in a single fit. For its first ``fold_in_epoch`` epochs
it trains on the lower part of a per-class split while :class:`~lightning_autobalance.AutoBalanceCallback` tunes the
loss on the held-out upper part; from ``fold_in_epoch`` on the loss is frozen and the upper part is folded into
training, so the model ends up trained on all the data.

The sampler keeps the epoch length that of the whole training set throughout: before the fold-in an epoch draws
``len(lower) + len(upper)`` samples from the lower part (every lower sample once, then a seeded choice of lower
samples again, without repeats while the lower part lasts), after it an epoch is a permutation of all samples. The
number of optimizer steps per epoch is then the same as in plain training on the whole set, so learning-rate
schedules sized by ``trainer.estimated_stepping_batches`` stay right and one-phase training costs what plain
training costs, plus the hyper steps.

The order depends only on ``seed`` and the epoch (``set_epoch``, which Lightning calls at every epoch start, also
through the ``DistributedSamplerWrapper`` it puts around the sampler under DDP): every process draws the same list,
and a resumed run the same order as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

__all__ = ["FoldInSampler", "find_fold_in_sampler", "fold_in_epoch"]

#: The share of a one-phase run's epochs searched before the fold-in, chosen on validation (docs/tuning.md, round 3).
DEFAULT_FOLD_IN = 0.3


def fold_in_epoch(epochs: int, share: float = DEFAULT_FOLD_IN) -> int:
    """The fold-in epoch of a one-phase run of ``epochs`` epochs (``>= 2``): ``round(share * epochs)``, kept in
    ``[1, epochs - 1]`` so that both parts have at least one epoch.

    Example:
        >>> fold_in_epoch(40), fold_in_epoch(6), fold_in_epoch(2, 0.9)
        (12, 2, 1)
    """
    return min(max(round(float(share) * int(epochs)), 1), int(epochs) - 1)


class FoldInSampler(Sampler[int]):
    """Draws from the lower part until ``fold_in_epoch``, then from lower and upper parts together.

    Args:
        lower_indices: dataset indices of the lower part (trained on from the start).
        upper_indices: dataset indices of the upper part (held out for the loss search, folded in at ``fold_in_epoch``).
        fold_in_epoch: the first epoch (0-based) that trains on both parts; ``>= 1``.
        seed: seeds the order (with the epoch).

    Example:
        >>> sampler = FoldInSampler([0, 1, 2, 3], [4], fold_in_epoch=1)
        >>> sampler.set_epoch(0); sorted(set(sampler)) == [0, 1, 2, 3], len(list(sampler))
        (True, 5)
        >>> sampler.set_epoch(1); sorted(sampler)
        [0, 1, 2, 3, 4]
    """

    def __init__(self, lower_indices: Sequence[int] | Any, upper_indices: Sequence[int] | Any, fold_in_epoch: int,
                 seed: int = 0) -> None:
        lower = torch.as_tensor(lower_indices, dtype=torch.long).flatten()
        upper = torch.as_tensor(upper_indices, dtype=torch.long).flatten()
        if lower.numel() == 0:
            raise ValueError("FoldInSampler needs a non-empty lower part (lower_indices).")
        if isinstance(fold_in_epoch, bool) or not isinstance(fold_in_epoch, int) or fold_in_epoch < 1:
            raise ValueError(f"fold_in_epoch must be an integer >= 1 (the first epoch that trains on the upper part "
                             f"too); got {fold_in_epoch!r}.")
        overlap = set(lower.tolist()) & set(upper.tolist())
        if overlap:
            raise ValueError(f"The lower and upper parts share {len(overlap)} indices (e.g. {sorted(overlap)[:5]}): "
                             "the upper part must be held out.")
        self.lower, self.upper = lower, upper
        self.fold_in_epoch = fold_in_epoch
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch, which decides the order and whether the upper part is in."""
        self.epoch = int(epoch)

    @property
    def folded(self) -> bool:
        """Whether the current epoch trains on the upper part too."""
        return self.epoch >= self.fold_in_epoch

    def __len__(self) -> int:
        return self.lower.numel() + self.upper.numel()

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self)
        if self.folded:
            pool = torch.cat([self.lower, self.upper])
            order = pool[torch.randperm(n, generator=g)]
        else:
            lower = self.lower.numel()
            rounds = [torch.randperm(lower, generator=g) for _ in range(-(-n // lower))]
            slots = torch.cat(rounds)[:n]  # every lower sample once, then the next round's first ones
            order = self.lower[slots[torch.randperm(n, generator=g)]]
        return iter(order.tolist())


def find_fold_in_sampler(loader: Any) -> FoldInSampler | None:
    """The :class:`FoldInSampler` of a training dataloader (also inside Lightning's ``DistributedSamplerWrapper``
    or a batch sampler), or None."""
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()), None)
    candidates = [getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)]
    for sampler in candidates:
        for _ in range(3):  # the sampler, a wrapper's dataset, that dataset's sampler
            if isinstance(sampler, FoldInSampler):
                return sampler
            inner = getattr(sampler, "dataset", None)
            sampler = getattr(inner, "_sampler", inner)
    return None
