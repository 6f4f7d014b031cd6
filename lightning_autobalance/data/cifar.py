"""CIFAR-10-LT and CIFAR-100-LT datamodules over torchvision's CIFAR readers."""

import os
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_autobalance.data import transforms
from lightning_autobalance.data._checks import check_bool
from lightning_autobalance.data.base import LongTailDataModule
from lightning_autobalance.data.memory_dataset import InMemoryImageDataset
from lightning_autobalance.data.torchvision_cifar import CIFAR10Reader, CIFAR100Reader

__all__ = ["LongTailCIFAR10", "LongTailCIFAR100"]


class _LongTailCIFAR(LongTailDataModule):
    """Shared logic of :class:`LongTailCIFAR10` and :class:`LongTailCIFAR100`.

    Reads the official python release with torchvision (``torchvision.datasets.CIFAR10`` / ``CIFAR100``), keeps the
    decoded ``uint8`` images in memory as ``(N, 3, 32, 32)`` tensors, and long-tails the training set with ``n_max`` =
    the per-class count of the release (5,000 for CIFAR-10, 500 for CIFAR-100). Within a class, samples are numbered in
    the order of the release; the seeded choice of :func:`~lightning_autobalance.data.profiles.select_long_tail` picks
    positions in that order. The test set is the balanced official one.

    Training augmentation: ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
    ``Normalize`` with the dataset's mean and standard deviation; evaluation: ``Normalize``.

    Args:
        root: Folder that holds (or receives) the release's folder (``cifar-10-batches-py`` or
            ``cifar-100-python``, see :attr:`data_folder`).
        download: Let torchvision download the release (about 170 MB) when missing.
        check_integrity: Check the release's md5 sums (set False only for hand-made data).
        **kwargs: The arguments of :class:`~lightning_autobalance.data.LongTailDataModule` (``imbalance_ratio``,
            ``search_split``, ``batch_size``, ``seed``, ...), with its defaults.

    Raises:
        FileNotFoundError: (when the counts are first computed) the data folder is missing.
        RuntimeError: (idem) the release's files are missing or corrupted.
    """

    _reader: ClassVar[type[CIFAR10Reader] | type[CIFAR100Reader]]
    _title: ClassVar[str]
    _mean: ClassVar[tuple[float, float, float]]
    _std: ClassVar[tuple[float, float, float]]

    def __init__(self, root: str = "data", download: bool = False, check_integrity: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(root, str | os.PathLike) or not str(root):
            raise ValueError(f"root must be a non-empty folder path, got {root!r}")
        self.root = os.path.expanduser(str(root))
        self.download = check_bool("download", download)
        self.check_integrity = check_bool("check_integrity", check_integrity)
        self._train_images: torch.Tensor | None = None
        self._train_targets: np.ndarray | None = None

    @property
    def data_folder(self) -> str:
        """The folder torchvision reads (``<root>/cifar-10-batches-py`` or ``<root>/cifar-100-python``)."""
        return os.path.join(self.root, self._reader.base_folder)

    def _read(self, train: bool) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        """Decode one split with torchvision: ``uint8`` images ``(N, 3, 32, 32)``, labels, names."""
        folder = self.data_folder
        if not self.download and not os.path.isdir(folder):
            raise FileNotFoundError(f"{self._title} data folder '{folder}' not found: pass download=True to fetch the "
                                    f"official release into root='{self.root}', or set root to the folder that "
                                    f"contains '{self._reader.base_folder}'")
        try:
            reader = self._reader(self.root, train=train, download=self.download, check_integrity=self.check_integrity)
        except RuntimeError as err:
            raise RuntimeError(f"{self._title} files in '{folder}' are missing or corrupted ({err}); pass "
                               "download=True to fetch the official release again") from err
        images = torch.from_numpy(np.ascontiguousarray(reader.data)).permute(0, 3, 1, 2).contiguous()
        return images, np.asarray(reader.targets, dtype=np.int64), list(reader.classes)

    def data_files(self) -> list[str]:
        """The release's batch and meta files."""
        folder = self.data_folder
        return sorted(os.path.join(folder, f) for f in os.listdir(folder)) if os.path.isdir(folder) else []

    def prepare_data(self) -> None:
        """Download the release (on one process) when ``download=True``."""
        if self.download:
            for train in (True, False):
                self._reader(self.root, train=train, download=True, check_integrity=self.check_integrity)

    def _load_pool(self) -> tuple[np.ndarray, list[str]]:
        images, targets, names = self._read(train=True)
        self._train_images, self._train_targets = images, targets
        return targets, names

    def _build_dataset(self, indices: np.ndarray, augment: bool) -> Dataset[Any]:
        self._ensure_plan()
        assert self._train_images is not None and self._train_targets is not None
        rows = torch.as_tensor(indices, dtype=torch.long)
        return InMemoryImageDataset(self._train_images[rows], self._train_targets[indices],
                                    transforms.cifar_transform(self._mean, self._std, train=augment))

    def _build_test_dataset(self) -> Dataset[Any]:
        images, targets, _ = self._read(train=False)
        return InMemoryImageDataset(images, targets, transforms.cifar_transform(self._mean, self._std, train=False))


class LongTailCIFAR10(_LongTailCIFAR):
    """CIFAR-10-LT: long-tailed CIFAR-10 training set, balanced official test set.

    With the defaults (``imbalance_ratio=100``, exponential profile) the training set has
    12,406 images: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50.

    ``root`` holds (or receives, with ``download=True``) ``cifar-10-batches-py``; ``check_integrity`` checks the
    release's md5 sums; every other argument is :class:`~lightning_autobalance.data.LongTailDataModule`'s. The
    counts, first read, raise ``FileNotFoundError`` for a missing folder and ``RuntimeError`` for a corrupt one.

    Example:
        >>> dm = LongTailCIFAR10(root="~/data", imbalance_ratio=100)  # doctest: +SKIP
        >>> sum(dm.class_counts)  # doctest: +SKIP
        12406
    """

    _reader = CIFAR10Reader
    _title = "CIFAR-10"
    _mean = transforms.CIFAR10_MEAN
    _std = transforms.CIFAR10_STD


class LongTailCIFAR100(_LongTailCIFAR):
    """CIFAR-100-LT: long-tailed CIFAR-100 training set (fine labels), balanced test set.

    With the defaults (``imbalance_ratio=100``) the training set has 10,847 images, from 500
    in class 0 down to 5 in class 99.

    ``root`` holds (or receives, with ``download=True``) ``cifar-100-python``; ``check_integrity`` checks the
    release's md5 sums; every other argument is :class:`~lightning_autobalance.data.LongTailDataModule`'s. The
    counts, first read, raise ``FileNotFoundError`` for a missing folder and ``RuntimeError`` for a corrupt one.

    Example:
        >>> dm = LongTailCIFAR100(root="~/data", search_split=True)  # doctest: +SKIP
        >>> dm.num_classes  # doctest: +SKIP
        100
    """

    _reader = CIFAR100Reader
    _title = "CIFAR-100"
    _mean = transforms.CIFAR100_MEAN
    _std = transforms.CIFAR100_STD
