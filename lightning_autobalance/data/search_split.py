"""``search_split``: what :class:`~lightning_autobalance.AutoBalanceCallback` needs from a user's own dataset.

One call gives a seeded per-class lower/upper split (every class in both parts, the same imbalance profile in
each) and the class counts of the lower part, which is what ``configure_autobalance(class_counts)`` takes. It reads
the labels from wherever a dataset keeps them: a ``targets`` attribute (``torchvision`` datasets, ``ImageFolder``),
a chain of ``Subset``\\ s, a ``ConcatDataset``, a ``TensorDataset`` (its second tensor), or by reading every
sample once; a tensor or list of labels also works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from lightning_autobalance.data.profiles import split_per_class

__all__ = ["LabelledSubset", "SearchSplit", "dataset_targets", "search_split"]


class LabelledSubset(Subset):
    """A ``Subset`` that also carries the labels of its samples as ``targets`` (so nothing has to read them)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], targets: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        self.targets = [int(t) for t in targets]


class SearchSplit(NamedTuple):
    """The result of :func:`search_split`."""

    lower: Any
    """The part to train on: a :class:`LabelledSubset` (or an index array when labels were given)."""
    upper: Any
    """The held-out part the callback tunes the loss on (same type as ``lower``)."""
    class_counts: list[int]
    """Samples per class in ``lower``: pass them to ``configure_autobalance``."""
    upper_class_counts: list[int]
    """Samples per class in ``upper``."""


def _as_labels(values: Any) -> np.ndarray:
    return np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(-1).astype(np.int64)


def dataset_targets(dataset: Any) -> np.ndarray:
    """The label of every sample of ``dataset``, in order, without decoding images where it can.

    Looks for a ``targets`` attribute (also through ``Subset`` chains and ``ConcatDataset``), the second tensor of a
    ``TensorDataset``, and otherwise reads ``dataset[i][1]`` for every ``i``.

    Example:
        >>> data = TensorDataset(torch.zeros(5, 2), torch.tensor([0, 1, 1, 2, 0]))
        >>> dataset_targets(Subset(Subset(data, [4, 3, 2, 1]), [0, 1])).tolist()
        [0, 2]
    """
    if isinstance(dataset, (torch.Tensor, np.ndarray, list, tuple)):
        return _as_labels(dataset)
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):
        return _as_labels(targets)
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset):
        return np.concatenate([dataset_targets(part) for part in dataset.datasets])
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return _as_labels(dataset.tensors[1])
    labels = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise ValueError(f"dataset_targets: sample {i} of {type(dataset).__name__} is not an (input, label, ...) "
                             "pair and the dataset has no `targets`; pass the labels (a tensor or list) instead.")
        labels.append(int(sample[1]))
    return np.asarray(labels, dtype=np.int64)


def search_split(data: Any, fraction: float = 0.2, seed: int = 0, num_classes: int | None = None) -> SearchSplit:
    """Splits a dataset per class into a lower part (to train on) and an upper part (to tune the loss on).

    Each class gives ``round(fraction * n_c)`` samples, at least one, to the upper part and keeps at least one in the
    lower part, so both parts contain every class with the same imbalance profile (a random 80/20 split of a
    long-tailed dataset usually leaves tail classes out of one part).

    Args:
        data: a ``Dataset`` (see :func:`dataset_targets` for where the labels come from) or the labels themselves.
        fraction: share of each class held out, in ``(0, 1)``.
        seed: seeds the split.
        num_classes: the number of classes ``K`` (default: the largest label plus one); counts have length ``K``.

    Returns:
        A :class:`SearchSplit` ``(lower, upper, class_counts, upper_class_counts)``; ``lower`` and ``upper`` are
        :class:`LabelledSubset`\\ s of ``data``, or index arrays when ``data`` holds labels.

    Raises:
        ValueError: a class has fewer than 2 samples, or a label is outside ``[0, num_classes)``.

    Example:
        >>> data = TensorDataset(torch.zeros(30, 2), torch.tensor([0] * 20 + [1] * 8 + [2] * 2))
        >>> lower, upper, counts, upper_counts = search_split(data, seed=0)
        >>> counts, upper_counts
        ([16, 6, 1], [4, 2, 1])
    """
    labels = dataset_targets(data)
    k = int(labels.max()) + 1 if num_classes is None and labels.size else int(num_classes or 0)
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"search_split: labels run from {int(labels.min())} to {int(labels.max())}, outside "
                         f"[0, {k}) for num_classes={k}.")
    lower, upper = split_per_class(labels, fraction=fraction, seed=seed)
    counts = np.bincount(labels[lower], minlength=k).tolist()
    upper_counts = np.bincount(labels[upper], minlength=k).tolist()
    if isinstance(data, (torch.Tensor, np.ndarray, list, tuple)):
        return SearchSplit(lower, upper, counts, upper_counts)
    return SearchSplit(LabelledSubset(data, lower.tolist(), labels[lower]),
                       LabelledSubset(data, upper.tolist(), labels[upper]), counts, upper_counts)
