"""``BatchStream``: an endless, seeded, resumable and sharded stream of batches from a DataLoader.

The callback draws its upper batches (and any extra training batches) from such a stream. The order of samples
is a function of ``(seed, epoch)`` alone and the stream remembers how far it got, so that a run resumed from a
checkpoint sees exactly the batches an uninterrupted run would have seen. Under several processes every rank
reads its own shard (the same split as :class:`torch.utils.data.DistributedSampler`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Sampler

__all__ = ["BatchStream", "ShardSampler", "class_balanced_order", "map_style", "why_not_resampled"]


def class_balanced_order(labels: Tensor, generator: torch.Generator) -> list[int]:
    """One pass of indices in which every class present occurs equally often, shuffled.

    Each class gets ``ceil(N / C)`` draws (``N`` samples, ``C`` classes present): its samples in a random order,
    repeated (each repetition reshuffled) as often as needed, so within a class every sample is drawn equally often
    up to one. The pass therefore has ``C * ceil(N / C)`` indices.
    """
    classes = torch.unique(labels)
    per_class = math.ceil(labels.numel() / max(classes.numel(), 1))
    picks = []
    for c in classes.tolist():
        members = torch.nonzero(labels == c).flatten()
        rounds = math.ceil(per_class / members.numel())
        order = torch.cat([members[torch.randperm(members.numel(), generator=generator)] for _ in range(rounds)])
        picks.append(order[:per_class])
    both = torch.cat(picks)
    return both[torch.randperm(both.numel(), generator=generator)].tolist()


def map_style(dataset: Any) -> bool:
    """Whether ``dataset`` is a map-style dataset with a length (it can be read by index, and read whole)."""
    return dataset is not None and not isinstance(dataset, IterableDataset) and isinstance(dataset, Sized)


def why_not_resampled(dataloader: Any) -> str | None:
    """Why a :class:`BatchStream` cannot re-create ``dataloader`` around its own sampler (``None`` when it can): an
    iterable or unsized dataset, or a custom batch sampler. Then its batches cannot be drawn by index (no subset,
    class balance, shards or exact resumption)."""
    if not map_style(getattr(dataloader, "dataset", None)):
        return "its dataset is not a map-style dataset with a length"
    if getattr(dataloader, "batch_size", None) is None:
        return "it has a custom batch sampler"
    return None


class ShardSampler(Sampler[int]):
    """Indices of one rank's shard for one epoch, shuffled by ``(seed, epoch)``, starting at ``start``.

    Pads to equal shard lengths like ``DistributedSampler`` (``drop_last=False``), so every rank has the same
    number of samples and therefore the same batch sizes. With ``labels`` every pass is class-balanced
    (:func:`class_balanced_order`). With ``subset`` (dataset indices) only those samples are drawn: ``length`` and
    ``labels`` then describe the subset, and the sampler yields ``subset[i]``.
    """

    def __init__(self, length: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 labels: Tensor | None = None, subset: Tensor | None = None) -> None:
        if length < 1:
            raise ValueError("ShardSampler needs a non-empty dataset.")
        if labels is not None and labels.numel() != length:
            raise ValueError(f"ShardSampler: {labels.numel()} labels for a dataset of {length} samples.")
        if subset is not None and torch.as_tensor(subset).numel() != length:
            raise ValueError(f"ShardSampler: a subset of {torch.as_tensor(subset).numel()} indices for length "
                             f"{length}.")
        self.length, self.seed, self.rank, self.world_size, self.shuffle = length, seed, rank, world_size, shuffle
        self.labels = None if labels is None else torch.as_tensor(labels).long().flatten()
        self.subset = None if subset is None else torch.as_tensor(subset).long().flatten().tolist()
        self.epoch = 0
        self.start = 0

    @property
    def pass_length(self) -> int:
        if self.labels is None:
            return self.length
        classes = torch.unique(self.labels).numel()
        return classes * math.ceil(self.length / classes)

    @property
    def shard_size(self) -> int:
        return math.ceil(self.pass_length / self.world_size)

    def indices(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.labels is not None:
            order = class_balanced_order(self.labels, gen)
        elif self.shuffle:
            order = torch.randperm(self.length, generator=gen).tolist()
        else:
            order = list(range(self.length))
        total = self.shard_size * self.world_size
        while len(order) < total:  # padded as DistributedSampler pads (repeated for more ranks than samples)
            order += order[: total - len(order)]
        mine = order[self.rank:total:self.world_size]
        return mine if self.subset is None else [self.subset[i] for i in mine]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(self.shard_size - self.start, 0)


class BatchStream:
    """Endless batches from a DataLoader, reshuffled every pass, seeded, resumable and sharded.

    The DataLoader is re-created with a :class:`ShardSampler` (keeping its batch size, workers, collate function
    and the rest). Loaders that cannot be re-created (an ``IterableDataset``, a custom batch sampler) are read as
    they are, with a warning that resuming then cannot reproduce the same batches.

    Args:
        seed: seeds the order of every pass.
        rank, world_size: this process's rank and the number of processes.
        shuffle: shuffle within each pass.
        labels: the label of every sample drawn (of ``subset`` when given, else of the dataset): each pass is then
            class-balanced (:func:`class_balanced_order`; every class equally often, small classes repeated).
        subset: draw only these dataset indices (e.g. all but a held-back part); ``None`` draws them all.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=4)
        >>> stream = BatchStream(loader, seed=0)
        >>> [len(stream.next()[0]) for _ in range(4)]
        [4, 4, 2, 4]
    """

    def __init__(self, dataloader: DataLoader, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, labels: Tensor | None = None, subset: Tensor | None = None) -> None:
        self.source = dataloader
        self.epoch = 0
        self.position = 0
        self._iterator: Iterator[Any] | None = None
        self.sampler: ShardSampler | None = None
        self.loader: Any = dataloader
        dataset = getattr(dataloader, "dataset", None)
        obstacle = why_not_resampled(dataloader)
        if obstacle is not None:
            self.balanced = False
            if subset is not None:
                raise ValueError(f"Drawing a subset of the data needs a dataloader the stream can sample by index; "
                                 f"{obstacle}.")
            warnings.warn(f"This dataloader cannot be re-sampled ({obstacle}): it is read as it is, so resuming will "
                          "not reproduce the same batches and it is not sharded.", stacklevel=2)
        else:
            # Private in lightning_fabric, the one function that re-creates any DataLoader (subclass, custom
            # arguments) around a new sampler; guarded by tests/test_lightning_private.py.
            from lightning_fabric.utilities.data import _update_dataloader

            length = len(dataset) if subset is None else torch.as_tensor(subset).numel()
            self.sampler = ShardSampler(length, seed, rank, world_size, shuffle, labels=labels, subset=subset)
            self.loader = _update_dataloader(dataloader, self.sampler)
            self.balanced = labels is not None
        if self.batches_per_pass() == 0:
            raise ValueError("The dataloader yields no batches (an empty dataset, or drop_last with fewer samples than "
                             "one batch); the search needs at least one batch of upper data on every process.")

    def balance(self, labels: Tensor) -> None:
        """Makes every pass class-balanced from now on (``labels``: the label of every sample drawn, those of the
        subset when there is one), as if the stream had been built with them; a loader that cannot be re-sampled is
        left as it is."""
        if self.sampler is None:
            return
        labels = torch.as_tensor(labels).long().flatten()
        if labels.numel() != self.sampler.length:
            raise ValueError(f"BatchStream.balance: {labels.numel()} labels for a dataset of {self.sampler.length} "
                             "samples.")
        self.sampler.labels = labels
        self.balanced = True
        self._iterator = None

    def batches_per_pass(self) -> int:
        if self.sampler is None:
            try:
                return len(self.loader)
            except TypeError:
                return 1
        n = self.sampler.shard_size
        bs = self.loader.batch_size
        return n // bs if self.loader.drop_last else math.ceil(n / bs)

    def _open(self) -> None:
        if self.sampler is not None:
            self.sampler.epoch = self.epoch
            self.sampler.start = self.position * self.loader.batch_size
        self._iterator = iter(self.loader)
        if self.sampler is None:
            for _ in range(self.position):
                next(self._iterator, None)

    def next(self) -> Any:
        """The next batch; starts a new, reshuffled pass when one ends."""
        for _ in range(2):
            if self._iterator is None:
                self._open()
            assert self._iterator is not None
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.epoch += 1
                self.position = 0
                continue
            self.position += 1
            return batch
        raise RuntimeError("The dataloader yielded no batch in a whole pass.")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterator = None
