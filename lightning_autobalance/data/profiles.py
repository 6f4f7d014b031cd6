"""Long-tail profiles, seeded sample selection and per-class splits.

Plain numpy; nothing here knows about Lightning. These functions fix the data protocol of the long-tailed benchmarks:
which class keeps how many samples, which samples stay, how the training set is split into a lower (training) and an
upper (held-out) part for the loss search, and which classes count as head, medium or tail.

Example:
    >>> counts = long_tail_counts(5000, 10, 100.0)
    >>> counts
    [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    >>> sum(counts)
    12406
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np

from lightning_autobalance.data._checks import check_int, check_real

__all__ = ["head_medium_tail", "long_tail_counts", "select_long_tail", "split_per_class"]

# Relative tolerance used to snap values such as 5000 * 100 ** -1 = 50.00000000000001 (or
# 49.99999999999999) to the integer they stand for before taking the floor.
_SNAP_RTOL = 1e-9


def _floor_snapped(value: float) -> int:
    """Floor of ``value``, after snapping values within rounding noise of an integer."""
    nearest = round(value)
    if abs(value - nearest) <= _SNAP_RTOL * max(1.0, abs(value)):
        return int(nearest)
    return math.floor(value)


def _class_label(c: int, class_names: Sequence[str] | None) -> str:
    """Human-readable label of class ``c`` for error messages."""
    if class_names is not None and 0 <= c < len(class_names):
        return f"class {c} ({class_names[c]!r})"
    return f"class {c}"


def long_tail_counts(n_max: int, num_classes: int, imbalance_ratio: float,
                     profile: Literal["exponential", "step"] = "exponential", step_fraction: float = 0.5,
                     min_count: int = 1) -> list[int]:
    """Per-class sample counts of a long-tailed training set.

    Classes keep the dataset's own order: class 0 is the head.

    * ``"exponential"``: ``n_c = floor(n_max * rho ** (-c / (C - 1)))`` for ``c = 0 .. C-1``
      (Cui et al. 2019; Cao et al. 2019). Values within floating-point noise of an integer
      are snapped to it first, so ``5000 * 100 ** -1`` gives exactly 50.
    * ``"step"``: the first ``C - round(step_fraction * C)`` classes keep ``n_max``, the
      remaining ``round(step_fraction * C)`` (rounded half up) get ``floor(n_max / rho)``.

    Counts below ``min_count`` are raised to ``min_count``.

    Args:
        n_max: Count of the largest (first) class, at least 1.
        num_classes: Number of classes ``C``, at least 1.
        imbalance_ratio: ``rho = n_max / n_min`` before the ``min_count`` floor; finite and
            at least 1 (1 gives a balanced set).
        step_fraction: Fraction of classes in the minority for the step profile, in [0, 1].
        min_count: Smallest count a class may get, between 1 and ``n_max``.

    Raises:
        ValueError: An argument is out of range; the message names it and its range.

    Example:
        >>> long_tail_counts(100, 4, 10.0, profile="step")
        [100, 100, 10, 10]
        >>> long_tail_counts(5000, 10, 1000.0, min_count=10)[-1]
        10
    """
    n_max = check_int("n_max", n_max, 1)
    num_classes = check_int("num_classes", num_classes, 1)
    min_count = check_int("min_count", min_count, 1)
    if min_count > n_max:
        raise ValueError(f"min_count must be between 1 and n_max={n_max}, got {min_count}")
    if isinstance(imbalance_ratio, bool) or not isinstance(imbalance_ratio, numbers.Real):
        raise ValueError(f"imbalance_ratio must be a finite number >= 1, got {imbalance_ratio!r}")
    rho = float(imbalance_ratio)
    if not math.isfinite(rho) or rho < 1.0:
        raise ValueError(f"imbalance_ratio must be a finite number >= 1, got {imbalance_ratio!r}")
    if profile == "exponential":
        if num_classes == 1:
            raw = [n_max]
        else:
            raw = [_floor_snapped(n_max * rho ** (-c / (num_classes - 1))) for c in range(num_classes)]
    elif profile == "step":
        fraction = check_real("step_fraction", step_fraction, 0.0, 1.0)
        num_tail = math.floor(fraction * num_classes + 0.5)
        tail = _floor_snapped(n_max / rho)
        raw = [n_max] * (num_classes - num_tail) + [tail] * num_tail
    else:
        raise ValueError(f"profile must be 'exponential' or 'step', got {profile!r}")
    return [max(int(n), min_count) for n in raw]


def _targets_array(targets: Sequence[int] | np.ndarray, name: str = "targets") -> np.ndarray:
    """Validate labels: a 1-D array of non-negative integers."""
    array = np.asarray(targets)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class indices, got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    if array.min() < 0:
        raise ValueError(f"{name} must hold class indices >= 0, found {int(array.min())}")
    return array.astype(np.int64, copy=False)


def select_long_tail(targets: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int,
                     class_names: Sequence[str] | None = None) -> np.ndarray:
    """Seeded choice of the samples that a long-tailed subset keeps.

    One ``numpy.random.default_rng(seed)`` generator is used for all classes, in class order. For class ``c`` it draws
    ``counts[c]`` distinct *positions* among that class's samples (the class's indices in increasing order), so the
    positions kept depend only on the seed and the per-class totals, not on how classes are interleaved. Two datasets
    that list each class's samples in the same order (e.g. the CIFAR-10 batches and an image folder sorted by file name)
    therefore keep the same samples.

    Args:
        targets: Class index of every sample of the full (balanced) set.
        counts: Number of samples to keep for each class; ``len(counts)`` is the number of classes.
        class_names: Optional class names, used in error messages.

    Returns:
        The kept indices into ``targets``, sorted increasingly, as an int64 array.

    Raises:
        ValueError: A class has no samples, or fewer samples than asked; the message names
            the class. Also for labels outside ``range(len(counts))`` or negative counts.

    Example:
        >>> targets = np.array([0, 1, 0, 1, 0, 1])
        >>> kept = select_long_tail(targets, counts=[3, 1], seed=0)
        >>> np.bincount(targets[kept]).tolist()
        [3, 1]
    """
    labels = _targets_array(targets)
    wanted = [int(n) for n in counts]
    num_classes = len(wanted)
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"targets hold class index {int(labels.max())} but counts has only {num_classes} entries "
                         f"(expected labels in 0..{num_classes - 1})")
    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    for c, n in enumerate(wanted):
        if n < 0:
            raise ValueError(f"counts[{c}] must be >= 0, got {n}")
        members = np.flatnonzero(labels == c)
        if members.size == 0:
            raise ValueError(f"{_class_label(c, class_names)} has no samples; expected at least {n} to keep")
        if members.size < n:
            raise ValueError(f"{_class_label(c, class_names)} has {members.size} samples but the long-tail profile "
                             f"asks for {n}")
        positions = rng.choice(members.size, size=n, replace=False)
        kept.append(members[positions])
    if not kept:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(kept)).astype(np.int64, copy=False)


def split_per_class(targets: Sequence[int] | np.ndarray, fraction: float = 0.2, seed: int = 0,
                    class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into a lower (training) part and an upper (held-out) part.

    Each class ``c`` with ``n_c`` samples gives ``round(fraction * n_c)`` (rounded half up) samples to the upper part,
    but at least 1, and keeps at least 1 in the lower part, so both parts follow the same imbalance profile and contain
    every class. The split uses one ``numpy.random.default_rng(seed)`` generator, classes in increasing label order.
    Labels that never occur are skipped.

    Args:
        targets: Class index of every sample.
        fraction: Fraction of each class that goes to the upper part, in (0, 1).
        class_names: Optional class names, used in error messages.

    Returns:
        ``(lower, upper)``: sorted int64 index arrays into ``targets``, disjoint, whose union
        is ``range(len(targets))``.

    Raises:
        ValueError: ``fraction`` is outside (0, 1), or a class has fewer than 2 samples.

    Example:
        >>> lower, upper = split_per_class([0] * 10 + [1] * 5, fraction=0.2, seed=0)
        >>> len(lower), len(upper)
        (12, 3)
    """
    frac = check_real("fraction", fraction, 0.0, 1.0, low_open=True, high_open=True)
    labels = _targets_array(targets)
    rng = np.random.default_rng(seed)
    lower: list[np.ndarray] = []
    upper: list[np.ndarray] = []
    for c in np.unique(labels).tolist():
        members = np.flatnonzero(labels == c)
        n = members.size
        if n < 2:
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            raise ValueError(f"a search split needs at least 2 samples of class {name!r} (index {c}), it has {n}; "
                             "lower the imbalance ratio, raise min_count, or disable search_split")
        n_upper = min(max(math.floor(frac * n + 0.5), 1), n - 1)
        order = rng.permutation(n)
        upper.append(members[order[:n_upper]])
        lower.append(members[order[n_upper:]])
    if not lower:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty.copy()
    return (np.sort(np.concatenate(lower)).astype(np.int64, copy=False),
            np.sort(np.concatenate(upper)).astype(np.int64, copy=False))


def head_medium_tail(class_counts: Sequence[int] | np.ndarray, many_threshold: int = 100, few_threshold: int = 20,
                     rule: Literal["auto", "shots", "thirds"] = "auto") -> np.ndarray:
    """Label each class ``"head"``, ``"medium"`` or ``"tail"`` from its training count.

    The rule:

    * ``"shots"`` (the usual many/medium/few-shot convention of ImageNet-LT and CIFAR-100-LT, Liu et al. 2019):
      ``count > many_threshold`` is head, ``few_threshold <= count <= many_threshold`` is medium,
      ``count < few_threshold`` is tail. With the defaults: head > 100, medium 20..100, tail < 20.
    * ``"thirds"``: classes sorted by decreasing count (ties by class index) are cut into
      three consecutive groups of near-equal size (``numpy.array_split``; the first groups
      take the remainder), head, medium, tail. Meant for small datasets.
    * ``"auto"`` (default): ``"shots"``, unless that puts every class in one bucket and
      there are at least 3 classes; then ``"thirds"``.

    Args:
        class_counts: Training count of each class.
        many_threshold: Head classes have strictly more samples than this.
        few_threshold: Tail classes have strictly fewer samples than this.

    Raises:
        ValueError: Bad thresholds or rule, or negative counts.

    Example:
        >>> head_medium_tail([5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]).tolist()[-3:]
        ['head', 'medium', 'medium']
        >>> head_medium_tail([50, 40, 30, 20, 10, 5], rule="thirds").tolist()
        ['head', 'head', 'medium', 'medium', 'tail', 'tail']
    """
    counts = np.asarray(class_counts, dtype=np.int64)
    if counts.ndim != 1:
        raise ValueError(f"class_counts must be 1-D, got shape {counts.shape}")
    if counts.size and counts.min() < 0:
        raise ValueError(f"class_counts must be >= 0, found {int(counts.min())}")
    if few_threshold > many_threshold:
        raise ValueError(f"few_threshold must be <= many_threshold, got {few_threshold} > {many_threshold}")
    if rule not in ("auto", "shots", "thirds"):
        raise ValueError(f"rule must be 'auto', 'shots' or 'thirds', got {rule!r}")

    shots = np.where(counts > many_threshold, "head", np.where(counts < few_threshold, "tail", "medium"))
    if rule == "shots" or (rule == "auto" and (np.unique(shots).size > 1 or counts.size < 3)):
        return shots

    labels = np.full(counts.size, "medium")
    order = np.argsort(-counts, kind="stable")
    for name, group in zip(("head", "medium", "tail"), np.array_split(order, 3)):
        labels[group] = name
    return labels
