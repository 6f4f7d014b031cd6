"""Coloured scikit-learn digits: a group benchmark with a spurious colour, from bundled real images."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from lightning_autobalance.core.cells import cell_index
from lightning_autobalance.data import profiles
from lightning_autobalance.data._checks import check_bool, check_choice, check_int, check_real
from lightning_autobalance.data.base import LongTailDataModule
from lightning_autobalance.data.tinted_dataset import TintedImageDataset

__all__ = ["PALETTE", "ColoredDigits"]

#: RGB tints of the groups, in order: red, green, blue, yellow, magenta, cyan (before desaturation).
PALETTE: tuple[tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0),
                                                   (1.0, 0.0, 1.0), (0.0, 1.0, 1.0))


class ColoredDigits(LongTailDataModule):
    """``sklearn.datasets.load_digits()`` with a colour group correlated with the label in training only.

    Every image is tinted by the colour of its group (group 0 red-ish, 1 green-ish, then blue, yellow, magenta,
    cyan; see :class:`~lightning_autobalance.data.tinted_dataset.TintedImageDataset`), giving ``(3, 8, 8)`` inputs
    and batches ``(x, y, g)``. The colour is a *spurious* attribute:

    * **training** (and the upper part of the search split): of the samples of class ``c``, a fraction
      ``correlation`` (exactly, up to rounding) carries the *majority group* ``c mod G``; the rest are spread evenly
      over the other groups (minority cells). The choice is seeded by ``seed``.
    * **test**: every test image appears once in *every* colour (``G`` copies), so the test set is balanced over
      groups within each class, and the groups differ only by the colour.

    Tasks: ``"digits"`` (10 classes, the digit) or ``"binary"`` (2 classes: digit < 5 and digit >= 5).

    Protocol: ``test_per_class`` images of every digit are taken out first (seeded by ``test_seed``, the same for
    every training seed); the rest is the training pool (about 140 images per digit with the default 40). With
    ``imbalance_ratio > 1`` the classes are also made long-tailed (as :class:`LongTailDigits` does, ``n_max`` = the
    smallest pool class); by default (``1``) the pool is kept whole. With ``search_split=True`` the split is made
    per (class, group) cell (``upper_fraction`` of each, at least one sample in each part), so both parts have the
    training correlation and the upper part has every cell; a cell with fewer than 2 samples raises a
    ``ValueError`` naming it. Without the split every cell still needs one training sample.

    Exposed for LightningCLI links: :attr:`num_classes`, :attr:`class_counts`, :attr:`num_groups` and
    :attr:`group_counts` (``G x K`` counts of the training set in use), plus :attr:`upper_group_counts`.

    Args:
        num_groups: number of colour groups ``G`` (2 to 6).
        correlation: fraction of each class's training samples in its majority group, in ``[1/G, 1]``
            (``1/G``: no correlation).
        saturation: strength of the tint in ``(0, 1]``: the other channels keep ``1 - saturation`` of the stroke.
        test_per_class: test images per digit, >= 1.
        test_seed: seed of the choice of test images.
        augment: shift training images at random by up to one pixel.
        imbalance_ratio: ``rho = n_max / n_min`` of the class profile, >= 1 (default 1: classes as in the pool).
        batch_size: batch size of the training, validation and test dataloaders (default 64 here).
        min_count: smallest per-class count of the profile, >= 1 (default 2 here).
        **kwargs: the other arguments of :class:`LongTailDataModule` (``search_split``, ``seed``, ...), with its
            defaults; here ``upper_fraction`` is taken per (class, group) cell and ``seed`` also seeds the groups.
            ``device_resident`` is not taken (the images are tinted per sample on the host).

    Example:
        >>> dm = ColoredDigits(correlation=0.9)
        >>> dm.num_classes, dm.num_groups, len(dm.group_counts)
        (10, 2, 2)
        >>> x, y, g = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape[1:]), y.dtype, g.dtype
        ((3, 8, 8), torch.int64, torch.int64)
    """

    def __init__(self, task: Literal["digits", "binary"] = "digits", num_groups: int = 2, correlation: float = 0.95,
                 saturation: float = 0.8, test_per_class: int = 40, test_seed: int = 0, augment: bool = False,
                 imbalance_ratio: float = 1.0, batch_size: int = 64, min_count: int = 2, **kwargs: Any) -> None:
        if "device_resident" in kwargs:
            raise ValueError(f"{type(self).__name__} does not take device_resident (got "
                             f"{kwargs['device_resident']!r}): its images are tinted per sample on the host")
        super().__init__(imbalance_ratio=imbalance_ratio, batch_size=batch_size, min_count=min_count,
                         device_resident=False, **kwargs)
        self.task = check_choice("task", task, ("digits", "binary"))
        groups = check_int("num_groups", num_groups, 2)
        assert groups is not None
        if groups > len(PALETTE):
            raise ValueError(f"num_groups must be at most {len(PALETTE)} (one colour each), got {num_groups!r}")
        self._num_groups = groups
        self.correlation = check_real("correlation", correlation, 1.0 / groups, 1.0)
        self.saturation = check_real("saturation", saturation, 0.0, 1.0, low_open=True)
        self.test_per_class = check_int("test_per_class", test_per_class, 1)
        self.test_seed = check_int("test_seed", test_seed, 0)
        self.augment = check_bool("augment", augment)
        self._images: torch.Tensor | None = None  # all 1,797 grey images in [0, 1]
        self._labels: np.ndarray | None = None  # task label of every image
        self._pool: np.ndarray | None = None  # indices (into all images) of the pool
        self._test: np.ndarray | None = None  # indices of the test images
        self._pool_groups: np.ndarray | None = None  # group of every pool sample (-1: not kept)
        self._mean = 0.0
        self._std = 1.0

    # ------------------------------------------------------------------ groups
    @property
    def num_groups(self) -> int:
        """Number of colour groups ``G``."""
        return self._num_groups

    @property
    def palette(self) -> torch.Tensor:
        """``(G, 3)`` RGB tints: 1 on the colour's channels, ``1 - saturation`` on the others."""
        base = torch.tensor(PALETTE[: self._num_groups], dtype=torch.float32)
        return base + (1.0 - base) * (1.0 - self.saturation)

    def majority_group(self, label: int) -> int:
        """The group that carries most training samples of class ``label``: ``label mod G``."""
        return int(label) % self._num_groups

    def _cell_counts(self, indices: np.ndarray) -> list[list[int]]:
        assert self._pool_targets is not None and self._pool_groups is not None
        k, g = self.num_classes, self._num_groups
        cells = cell_index(self._pool_groups[indices], self._pool_targets[indices], k)
        return np.bincount(cells, minlength=g * k).reshape(g, k).astype(int).tolist()

    @property
    def group_counts(self) -> list[list[int]]:
        """``G x K`` samples per (group, class) of the training set in use (lower part with ``search_split``; the
        whole set with ``fold_in_epoch``)."""
        return self._cell_counts(self._counted_indices())

    @property
    def upper_group_counts(self) -> list[list[int]] | None:
        """``G x K`` samples per (group, class) of the upper part, or None without ``search_split``."""
        self._ensure_plan()
        return None if self._upper is None else self._cell_counts(self._upper)

    @property
    def train_groups(self) -> np.ndarray:
        """Group of every sample of :attr:`train_indices`."""
        self._ensure_plan()
        assert self._pool_groups is not None and self._lower is not None
        return self._pool_groups[self._lower].copy()

    # ------------------------------------------------------------------ the pool and the plan
    def _load_pool(self) -> tuple[np.ndarray, list[str]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        digit = np.asarray(digits.target, dtype=np.int64)
        for d, n in enumerate(np.bincount(digit, minlength=10).tolist()):
            if n < self.test_per_class + self.min_count:
                raise ValueError(f"digit {d} has {n} images: too few for test_per_class={self.test_per_class} plus "
                                 f"min_count={self.min_count} training images")
        test = profiles.select_long_tail(digit, [self.test_per_class] * 10, self.test_seed)
        pool = np.setdiff1d(np.arange(digit.size), test)
        images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
        labels = (digit >= 5).astype(np.int64) if self.task == "binary" else digit
        names = ["0-4", "5-9"] if self.task == "binary" else [str(c) for c in range(10)]
        self._images, self._labels, self._pool, self._test = images, labels, pool, test
        self._mean = float(images[pool].mean())
        self._std = float(images[pool].std())
        return labels[pool], names

    def _profile_counts(self, pool_counts: list[int]) -> list[int] | None:
        if self.imbalance_ratio == 1.0:
            return None
        return profiles.long_tail_counts(min(pool_counts), len(pool_counts), self.imbalance_ratio, self.profile,
                                         self.step_fraction, self.min_count)

    def _assign_groups(self, targets: np.ndarray, kept: np.ndarray, num_classes: int) -> np.ndarray:
        """Groups of the kept samples: per class, ``round(correlation * n_c)`` in the majority group, the rest
        spread evenly (in turn) over the other groups, in a seeded random order."""
        groups = np.full(targets.shape[0], -1, dtype=np.int64)
        rng = np.random.default_rng([self.seed, 7919])
        g = self._num_groups
        for c in range(num_classes):
            members = kept[targets[kept] == c]
            members = members[rng.permutation(members.size)]
            major = self.majority_group(c)
            n_major = int(np.floor(self.correlation * members.size + 0.5))
            others = [h for h in range(g) if h != major]
            assigned = np.empty(members.size, dtype=np.int64)
            assigned[:n_major] = major
            assigned[n_major:] = [others[i % len(others)] for i in range(members.size - n_major)]
            groups[members] = assigned
        return groups

    def _strata(self, targets: np.ndarray, kept: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
        """The kept samples' groups (assigned here, seeded) and their (class, group) cells, which the search split is
        made per; every cell must have a sample."""
        k = len(names)
        groups = self._assign_groups(targets, kept, k)
        cells = cell_index(groups[kept], targets[kept], k)
        colours = ["red", "green", "blue", "yellow", "magenta", "cyan"]
        cell_names = [f"class {name} in group {h} ({colours[h]})" for h in range(self._num_groups) for name in names]
        present = np.bincount(cells, minlength=self._num_groups * k)
        empty = [cell_names[j] for j in np.flatnonzero(present == 0)]
        if empty:
            raise ValueError(f"{type(self).__name__}: no training sample for {', '.join(empty[:4])}"
                             f"{' and more' if len(empty) > 4 else ''} (correlation={self.correlation}); every (class, "
                             "group) cell needs samples: lower the correlation or keep more samples per class")
        self._pool_groups = groups
        return cells, cell_names

    # ------------------------------------------------------------------ datasets
    def _transform(self, augment: bool) -> v2.Compose | None:
        return v2.Compose([v2.RandomCrop(8, padding=1)]) if augment else None

    def _build_dataset(self, indices: np.ndarray, augment: bool) -> Dataset[Any]:
        self._ensure_plan()
        assert self._images is not None and self._labels is not None and self._pool is not None
        assert self._pool_groups is not None
        rows = self._pool[indices]
        return TintedImageDataset(self._images[rows], self._labels[rows], self._pool_groups[indices], self.palette,
                                  self._mean, self._std, self._transform(augment and self.augment))

    def _build_test_dataset(self) -> Dataset[Any]:
        self._ensure_plan()
        assert self._images is not None and self._labels is not None and self._test is not None
        g = self._num_groups
        rows = np.repeat(self._test, g)  # every test image once in every colour
        groups = np.tile(np.arange(g, dtype=np.int64), self._test.size)
        return TintedImageDataset(self._images[rows], self._labels[rows], groups, self.palette, self._mean,
                                  self._std)
