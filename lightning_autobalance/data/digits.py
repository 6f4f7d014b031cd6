"""Long-tailed scikit-learn digits: a tiny embedded benchmark that needs no download."""

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from lightning_autobalance.data import profiles
from lightning_autobalance.data._checks import check_bool, check_int
from lightning_autobalance.data.base import LongTailDataModule
from lightning_autobalance.data.memory_dataset import InMemoryImageDataset

__all__ = ["LongTailDigits"]


class LongTailDigits(LongTailDataModule):
    """Long-tailed version of ``sklearn.datasets.load_digits()`` (1,797 8x8 grey images).

    Protocol: a balanced test set of ``test_per_class`` images per class is taken out first (seeded by ``test_seed``, so
    it stays the same across training seeds); of the rest (the pool, about 150 per class) ``n_max`` = the smallest pool
    class count, and the profile keeps ``n_c`` samples of class ``c`` (seeded by ``seed``). The default ``min_count=2``
    keeps every class splittable by ``search_split``: with ``imbalance_ratio=100`` the exponential tail would be
    ``floor(n_max / 100) = 1``, so the effective tail is 2 samples and the effective ratio ``n_max / 2``.

    Images are ``float32`` tensors of shape ``(1, 8, 8)``: pixel values scaled to [0, 1], then normalised with the mean
    and standard deviation of the pool. All data stays in memory.

    Args:
        test_per_class: Test images per class, >= 1.
        test_seed: Seed of the choice of test images.
        augment: If True, training images are shifted at random by up to one pixel (zero padding before normalisation).
        batch_size: Batch size of the training, validation and test dataloaders (default 64 here).
        min_count: Smallest per-class count of the profile, >= 1 (default 2 here; see above).
        **kwargs: The other arguments of :class:`LongTailDataModule` (``imbalance_ratio``, ``search_split``,
            ``seed``, ...), with its defaults.

    Raises:
        ValueError: An argument is out of range; or, when the counts are first computed, a
            class has too few images for ``test_per_class`` plus ``min_count``.

    Example:
        >>> dm = LongTailDigits(imbalance_ratio=100)
        >>> dm.class_counts[0], dm.class_counts[-1], dm.num_classes
        (144, 2, 10)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape[1:]), y.dtype
        ((1, 8, 8), torch.int64)
    """

    def __init__(self, test_per_class: int = 30, test_seed: int = 0, augment: bool = False, batch_size: int = 64,
                 min_count: int = 2, **kwargs: Any) -> None:
        super().__init__(batch_size=batch_size, min_count=min_count, **kwargs)
        self.test_per_class = check_int("test_per_class", test_per_class, 1)
        self.test_seed = check_int("test_seed", test_seed, 0)
        self.augment = check_bool("augment", augment)
        self._images: torch.Tensor | None = None  # all 1,797 images, [0, 1]-scaled
        self._targets: np.ndarray | None = None
        self._pool: np.ndarray | None = None  # indices (into all images) of the pool
        self._test: np.ndarray | None = None  # indices of the test set
        self._mean = 0.0
        self._std = 1.0

    def _load_pool(self) -> tuple[np.ndarray, list[str]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        targets = np.asarray(digits.target, dtype=np.int64)
        num_classes = int(targets.max()) + 1
        names = [str(c) for c in range(num_classes)]
        available = np.bincount(targets, minlength=num_classes)
        for c, n in enumerate(available.tolist()):
            if n < self.test_per_class + self.min_count:
                raise ValueError(f"digit class {c} has {n} images: too few for test_per_class={self.test_per_class} "
                                 f"plus min_count={self.min_count} training images")
        test = profiles.select_long_tail(targets, [self.test_per_class] * num_classes, self.test_seed)
        pool = np.setdiff1d(np.arange(targets.size), test)
        images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
        self._images, self._targets, self._pool, self._test = images, targets, pool, test
        self._mean = float(images[pool].mean())
        self._std = float(images[pool].std())
        return targets[pool], names

    def _profile_counts(self, pool_counts: list[int]) -> list[int] | None:
        return profiles.long_tail_counts(min(pool_counts), len(pool_counts), self.imbalance_ratio, self.profile,
                                         self.step_fraction, self.min_count)

    def _transform(self, augment: bool) -> v2.Compose:
        steps: list[v2.Transform] = []
        if augment:
            steps.append(v2.RandomCrop(8, padding=1))
        steps.append(v2.Normalize([self._mean], [self._std]))
        return v2.Compose(steps)

    def _build_dataset(self, indices: np.ndarray, augment: bool) -> Dataset[Any]:
        self._ensure_plan()
        assert self._images is not None and self._targets is not None and self._pool is not None
        rows = self._pool[indices]
        return InMemoryImageDataset(self._images[rows], self._targets[rows], self._transform(augment and self.augment))

    def _build_test_dataset(self) -> Dataset[Any]:
        self._ensure_plan()
        assert self._images is not None and self._targets is not None and self._test is not None
        return InMemoryImageDataset(self._images[self._test], self._targets[self._test], self._transform(False))
