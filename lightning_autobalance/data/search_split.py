"""``search_split``: what :class:`~lightning_autobalance.AutoBalanceCallback` needs from a user's own dataset, in one
call: a seeded per-class lower/upper split and the class counts of the lower part, which is what
``configure_autobalance(class_counts)`` takes; the labels are read by :func:`dataset_targets`.
"""

from __future__ import annotations

import copy
import warnings
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


def dataset_targets(dataset: Any, read: bool = True) -> np.ndarray | None:
    """The label of every sample of ``dataset``, in order, without decoding images where it can.

    Looks for a ``targets`` attribute (also through ``Subset`` chains and ``ConcatDataset``), the second tensor of a
    ``TensorDataset``, and otherwise reads ``dataset[i][1]`` for every ``i`` (or, with ``read=False``, returns
    ``None`` instead of reading samples).

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
        inner = dataset_targets(dataset.dataset, read=read)
        return None if inner is None else inner[np.asarray(dataset.indices, dtype=np.int64)]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_targets(part, read=read) for part in dataset.datasets]
        return None if any(p is None for p in parts) else np.concatenate(parts)  # type: ignore[arg-type]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return _as_labels(dataset.tensors[1])
    if not read:
        return None
    labels = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise ValueError(f"dataset_targets: sample {i} of {type(dataset).__name__} is not an (input, label, ...) "
                             "pair and the dataset has no `targets`; pass the labels (a tensor or list) instead.")
        labels.append(int(sample[1]))
    return np.asarray(labels, dtype=np.int64)


#: torchvision transforms that draw random numbers: what ``upper_transform="auto"`` leaves out of the upper part.
_RANDOM_TRANSFORMS = ("ColorJitter", "AutoAugment", "RandAugment", "TrivialAugmentWide", "AugMix", "ElasticTransform",
                      "GaussianBlur", "GaussianNoise", "ScaleJitter", "RandomShortestSize", "RandomResize")


def _is_random(transform: Any) -> bool:
    name = type(transform).__name__
    return name.startswith("Random") or name in _RANDOM_TRANSFORMS


def _base_dataset(dataset: Any) -> Any:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _with_base(dataset: Any, base: Any) -> Any:
    """A copy of a ``Subset`` chain whose innermost dataset is ``base``."""
    if not isinstance(dataset, Subset):
        return base
    outer = copy.copy(dataset)
    outer.dataset = _with_base(dataset.dataset, base)
    return outer


def _without_augmentation(transform: Any) -> Any:
    """``transform`` without its random steps when it is a torchvision ``Compose`` that has some, else ``None``."""
    steps = getattr(transform, "transforms", None)
    if type(transform).__name__ != "Compose" or not isinstance(steps, (list, tuple)):
        return None
    kept = [t for t in steps if not _is_random(t)]
    if len(kept) == len(steps):
        return None
    stripped = copy.copy(transform)
    stripped.transforms = kept
    return stripped


def _retransformed(base: Any, transform: Any) -> Any:
    """A shallow copy of ``base`` (the samples shared) that applies ``transform`` to its inputs."""
    twin = copy.copy(base)
    twin.transform = transform
    joint = getattr(twin, "transforms", None)
    if type(joint).__name__ == "StandardTransform":  # torchvision datasets that apply `transforms`
        twin.transforms = type(joint)(transform, getattr(twin, "target_transform", None))
    return twin


def _shape(sample: Any) -> Any:
    x = sample[0] if isinstance(sample, (tuple, list)) else sample
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype)
    size = getattr(x, "size", None)
    return (type(x).__name__, tuple(size) if isinstance(size, tuple) else size)


def _upper_view(data: Any, upper: np.ndarray, upper_transform: Any) -> tuple[Any, str | None]:
    """The dataset the upper part indexes (``data`` itself or a copy with the evaluation transform) and, when
    ``"auto"`` had to keep a random training transform, why."""
    if upper_transform is None:
        return data, None
    base = _base_dataset(data)
    if upper_transform != "auto":
        if not hasattr(base, "transform"):
            raise ValueError(f"search_split: upper_transform was given, but the dataset ({type(base).__name__}) has "
                             "no `transform` attribute to replace; pass upper_transform=None and build the upper "
                             "part's dataset yourself.")
        return _with_base(data, _retransformed(base, upper_transform)), None
    transform = getattr(base, "transform", None)
    if transform is None:
        return data, None
    stripped = _without_augmentation(transform)
    if stripped is None:
        if _is_random(transform):
            return data, f"its transform {type(transform).__name__} is itself random"
        return data, None
    view = _with_base(data, _retransformed(base, stripped))
    if len(upper):
        i = int(upper[0])
        try:
            same = _shape(view[i]) == _shape(data[i])
        except Exception as err:  # the stripped pipeline does not run on this data
            return data, f"without its random steps the transform fails ({type(err).__name__}: {err})"
        if not same:
            return data, "without its random steps the transform gives inputs of another shape"
    return view, None


def search_split(data: Any, fraction: float = 0.2, seed: int = 0, num_classes: int | None = None,
                 upper_transform: Any = "auto") -> SearchSplit:
    """Splits a dataset per class into a lower part (to train on) and an upper part (to tune the loss on).

    Each class gives ``round(fraction * n_c)`` samples, at least one, to the upper part and keeps at least one in the
    lower part, so both parts contain every class with the same imbalance profile (a random 80/20 split of a
    long-tailed dataset usually leaves tail classes out of one part).

    **The upper part sees evaluation inputs by default.** The loss is tuned on the upper part as a test set would
    judge it, so random training augmentation there only adds noise. With ``upper_transform="auto"`` (default), when
    the dataset (under any ``Subset``\\ s) has a torchvision ``Compose`` as its ``transform``, the upper part reads a
    shallow copy of the dataset (the samples are shared, not copied) whose ``Compose`` leaves out the random steps
    (``Random*``, ``ColorJitter``, ``AutoAugment``, ...). That is done only when it is safe: the copy must give the
    first upper sample an input of the same type and shape as the original; otherwise (e.g. a ``RandomResizedCrop``
    that also sets the size) the upper part keeps the training transform, with a warning that says to pass
    ``upper_transform=<your evaluation transform>``. The lower part always keeps the dataset as it is.

    Args:
        data: a ``Dataset`` (see :func:`dataset_targets` for where the labels come from) or the labels themselves.
        fraction: share of each class held out, in ``(0, 1)``.
        seed: seeds the split.
        num_classes: the number of classes ``K``. Default: the length of the dataset's ``classes`` attribute (e.g.
            torchvision datasets, also under ``Subset``\\ s) or else the largest label plus one. Give it when a class
            may be absent from ``data`` (e.g. a subset of it): the absent class is then an error that names it,
            rather than counts one class short.
        upper_transform: ``"auto"`` (default, see above), a callable (the evaluation transform: it replaces the
            dataset's ``transform`` for the upper part) or ``None`` (the upper part reads ``data`` as it is).

    Returns:
        A :class:`SearchSplit` ``(lower, upper, class_counts, upper_class_counts)``; ``lower`` and ``upper`` are
        :class:`LabelledSubset`\\ s, or index arrays when ``data`` holds labels.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1)``; a class with fewer than 2 samples or none at all; a label
            outside ``[0, num_classes)``.

    Example:
        >>> data = TensorDataset(torch.zeros(30, 2), torch.tensor([0] * 20 + [1] * 8 + [2] * 2))
        >>> lower, upper, counts, upper_counts = search_split(data, seed=0)
        >>> counts, upper_counts
        ([16, 6, 1], [4, 2, 1])
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"search_split: fraction must be a number in the open interval (0, 1), the share of each "
                         f"class held out; got {fraction!r}.")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ValueError(f"search_split: num_classes must be a positive integer or None; got {num_classes!r}.")
    if not (upper_transform is None or upper_transform == "auto" or callable(upper_transform)):
        raise ValueError(f"search_split: upper_transform must be 'auto', a callable or None; got {upper_transform!r}.")
    labels = dataset_targets(data)
    assert labels is not None
    classes = getattr(_base_dataset(data), "classes", None)
    if num_classes is not None:
        k, where = num_classes, f"num_classes={num_classes}"
    elif isinstance(classes, (list, tuple)) and classes and (not labels.size or labels.max() < len(classes)):
        k, where = len(classes), f"the dataset's `classes` ({len(classes)} names)"
    else:
        k, where = (int(labels.max()) + 1 if labels.size else 0), "the largest label plus one"
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"search_split: labels run from {int(labels.min())} to {int(labels.max())}, outside "
                         f"[0, {k}) for num_classes={k}; pass the number of classes as num_classes=.")
    counts_all = np.bincount(labels, minlength=k)
    absent = [c for c in range(k) if counts_all[c] == 0]
    if absent:
        raise ValueError(f"search_split: the data has no sample of classes {absent} ({k} classes from {where}); "
                         "every class needs samples in both parts. If those classes do not exist, pass the real "
                         "number as num_classes=; if the data is a subset, split the whole dataset instead.")
    few = {c: int(n) for c, n in enumerate(counts_all) if n < 2}
    if few:
        raise ValueError(f"search_split needs at least 2 samples of every class (one for each part); classes with "
                         f"fewer: {few} (class: samples). Gather more samples of them or leave those classes out of "
                         "the data.")
    lower, upper = split_per_class(labels, fraction=float(fraction), seed=seed)
    counts = np.bincount(labels[lower], minlength=k).tolist()
    upper_counts = np.bincount(labels[upper], minlength=k).tolist()
    if isinstance(data, (torch.Tensor, np.ndarray, list, tuple)):
        return SearchSplit(lower, upper, counts, upper_counts)
    view, kept = _upper_view(data, upper, upper_transform)
    if kept is not None:
        warnings.warn(f"search_split: the upper part keeps the dataset's random training transform ({kept}); pass "
                      "upper_transform=<your evaluation transform> (or upper_transform=None to keep it silently).",
                      stacklevel=2)
    return SearchSplit(LabelledSubset(data, lower.tolist(), labels[lower]),
                       LabelledSubset(view, upper.tolist(), labels[upper]), counts, upper_counts)
