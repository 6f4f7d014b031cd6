"""Common logic of the long-tailed datamodules: profile, seeded selection, search split."""

import hashlib
import os
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from lightning_autobalance.data import profiles
from lightning_autobalance.data._checks import check_bool, check_choice, check_int, check_real
from lightning_autobalance.data.device_dataset import DeviceImageDataset, keep_batch
from lightning_autobalance.data.fold_in import FoldInSampler
from lightning_autobalance.data.memory_dataset import InMemoryImageDataset

__all__ = ["LongTailDataModule"]


class LongTailDataModule(pl.LightningDataModule):
    """Base of the long-tailed datamodules.

    A subclass provides a *pool* (the full training set it starts from) through :meth:`_load_pool`, which returns the
    pool's labels and class names cheaply (no image decoding), and builds datasets from pool indices through
    :meth:`_build_dataset` and :meth:`_build_test_dataset`. This base then

    1. computes the long-tail counts (:func:`~lightning_autobalance.data.profiles.long_tail_counts`
       with ``n_max`` = the largest pool class, unless the subclass says otherwise),
    2. keeps a seeded choice of samples per class (:func:`~lightning_autobalance.data.profiles.select_long_tail`),
    3. with ``search_split=True``, splits the kept samples per class into a lower part (the
       training set) and an upper part held out for the loss search
       (:func:`~lightning_autobalance.data.profiles.split_per_class`), both seeded by ``seed``,
    4. serves the dataloaders.

    The counts (:attr:`class_counts`, :attr:`num_classes`, ...) are computed on first access and cached, so they can be
    read right after construction (LightningCLI links them into the model); any error about the data (a missing folder,
    a class with too few samples) surfaces there, before training starts. All arguments are checked at construction.

    Args:
        imbalance_ratio: ``rho = n_max / n_min`` of the profile, finite and >= 1.
        upper_fraction: Fraction of each class held out as the upper part when ``search_split`` is True, in (0, 1).
        search_split: If True, the training dataloader serves only the lower part and :meth:`upper_dataloader` the
            held-out upper part; if False, training uses the whole long-tailed set.
        batch_size: Batch size of the training, validation and test dataloaders.
        upper_batch_size: Batch size of :meth:`upper_dataloader`; None means ``batch_size``.
        num_workers: Dataloader worker processes (persistent when > 0).
        seed: Seeds the choice of kept samples and the search split (and the order of the upper dataloader).
        val_source: What :meth:`val_dataloader` serves: ``"test"`` (the balanced test set), ``"upper"`` (the held-out
            part, without augmentation; needs ``search_split``) or ``"none"`` (no validation).
        min_count: Smallest per-class count of the profile, >= 1.
        step_fraction: Fraction of minority classes of the step profile, in [0, 1].
        upper_augment: Whether the upper dataloader applies the training augmentation.
        fold_in_epoch: One-phase training (needs ``search_split``): the training dataloader serves the
            lower part until this epoch (0-based) and the whole long-tailed set from it on, through a
            :class:`~lightning_autobalance.data.fold_in.FoldInSampler` (every epoch as long as one over
            the whole set). :attr:`class_counts` are then those of the whole set, the data the final
            model is trained on; an :class:`~lightning_autobalance.AutoBalanceCallback` stops
            searching at the fold-in. None (default): no fold-in.
        device_resident: Keep every image as one tensor on the training device (the trainer's root device, moved
            when a dataloader is built) and crop, flip and normalise whole batches there
            (:class:`~lightning_autobalance.data.device_dataset.DeviceImageDataset`): on a GPU no image crosses from
            the host during training. Same images, split, order and augmentation distribution as the default path
            (the random draws differ). Needs ``num_workers=0`` and images of one size held in memory; the
            datamodules that accept it say so.

    Raises:
        ValueError: An argument is out of range or inconsistent (e.g. ``val_source="upper"`` without ``search_split``).

    Example:
        >>> from lightning_autobalance.data import LongTailDigits
        >>> dm = LongTailDigits(imbalance_ratio=10, search_split=True)
        >>> dm.num_classes, len(dm.class_counts) == len(dm.upper_class_counts)
        (10, True)
    """

    def __init__(self, imbalance_ratio: float = 100.0, profile: Literal["exponential", "step"] = "exponential",
                 upper_fraction: float = 0.2, search_split: bool = False, batch_size: int = 128,
                 upper_batch_size: int | None = None, num_workers: int = 0, seed: int = 0,
                 val_source: Literal["test", "upper", "none"] = "test", min_count: int = 1, step_fraction: float = 0.5,
                 upper_augment: bool = True, fold_in_epoch: int | None = None, device_resident: bool = False) -> None:
        super().__init__()
        self.imbalance_ratio = check_real("imbalance_ratio", imbalance_ratio, 1.0)
        self.profile = check_choice("profile", profile, ("exponential", "step"))
        self.upper_fraction = check_real("upper_fraction", upper_fraction, 0.0, 1.0, True, True)
        self.search_split = check_bool("search_split", search_split)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.upper_batch_size = check_int("upper_batch_size", upper_batch_size, 1, allow_none=True)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.seed = check_int("seed", seed, 0)
        self.val_source = check_choice("val_source", val_source, ("test", "upper", "none"))
        self.min_count = check_int("min_count", min_count, 1)
        self.step_fraction = check_real("step_fraction", step_fraction, 0.0, 1.0)
        self.upper_augment = check_bool("upper_augment", upper_augment)
        self.fold_in_epoch = check_int("fold_in_epoch", fold_in_epoch, 1, allow_none=True)
        self.device_resident = check_bool("device_resident", device_resident)
        if self.device_resident and self.num_workers:
            raise ValueError(f"device_resident=True needs num_workers=0 (batches are cut on the device by the main "
                             f"process), got num_workers={self.num_workers}")
        if self.val_source == "upper" and not self.search_split:
            raise ValueError("val_source='upper' needs search_split=True (there is no upper part otherwise)")
        if self.fold_in_epoch is not None and not self.search_split:
            raise ValueError("fold_in_epoch needs search_split=True: it folds the held-out upper part into training "
                             "at that epoch, and without search_split there is none")
        self.save_hyperparameters()

        self._pool_targets: np.ndarray | None = None
        self._class_names: list[str] | None = None
        self._kept: np.ndarray | None = None
        self._lower: np.ndarray | None = None
        self._upper: np.ndarray | None = None
        self._datasets: dict[str, Dataset[Any]] = {}

    # ------------------------------------------------------------------ subclass hooks
    def data_files(self) -> list[str]:
        """The files the training and test data are read from (empty for data held in memory or bundled)."""
        return []

    def content_digest(self) -> str:
        """A digest of the data itself, for a run's fingerprint: the training pool's labels and every file of
        :meth:`data_files` with its size and modification time, so that replaced, added or removed images (training
        or test) make a new configuration. Cheap: no image is decoded."""
        self._ensure_plan()
        assert self._pool_targets is not None
        digest = hashlib.sha256(np.ascontiguousarray(self._pool_targets, dtype=np.int64).tobytes())
        for path in self.data_files():
            stat = os.stat(path)
            digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def _load_pool(self) -> tuple[np.ndarray, list[str]]:
        """Labels of the training pool and the class names; cheap (no image decoding)."""
        raise NotImplementedError

    def _profile_counts(self, pool_counts: list[int]) -> list[int] | None:
        """Per-class counts to keep from the pool, or None to keep the pool as it is.

        The default applies the profile with ``n_max`` = the largest pool class.
        """
        return profiles.long_tail_counts(max(pool_counts), len(pool_counts), self.imbalance_ratio, self.profile,
                                         self.step_fraction, self.min_count)

    def _build_dataset(self, indices: np.ndarray, augment: bool) -> Dataset[Any]:
        """Dataset of the pool samples ``indices``, with or without training augmentation."""
        raise NotImplementedError

    def _build_test_dataset(self) -> Dataset[Any]:
        """The balanced test set."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the plan
    def _ensure_plan(self) -> None:
        """Compute (once) the pool labels, the kept samples and the search split."""
        if self._kept is not None:
            return
        targets, names = self._load_pool()
        targets = np.asarray(targets, dtype=np.int64)
        num_classes = len(names)
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__}: the training data has no classes")
        if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
            raise ValueError(f"{type(self).__name__}: labels must lie in 0..{num_classes - 1}, found "
                             f"{int(targets.min())}..{int(targets.max())}")
        pool_counts = np.bincount(targets, minlength=num_classes).tolist()
        for c, n in enumerate(pool_counts):
            if n == 0:
                raise ValueError(f"class {c} ({names[c]!r}) has no training samples")
        counts = self._profile_counts(pool_counts)
        if counts is None:
            kept = np.arange(targets.size, dtype=np.int64)
        else:
            kept = profiles.select_long_tail(targets, counts, self.seed, class_names=names)
        strata, strata_names = self._strata(targets, kept, list(names))
        if self.search_split:
            lower_pos, upper_pos = profiles.split_per_class(strata, self.upper_fraction, self.seed,
                                                            class_names=strata_names)
            lower, upper = kept[lower_pos], kept[upper_pos]
        else:
            lower, upper = kept, None
        self._pool_targets, self._class_names = targets, list(names)
        self._lower, self._upper, self._kept = lower, upper, kept

    def _strata(self, targets: np.ndarray, kept: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
        """What the search split is made per, for the kept samples: one stratum id each (``0 .. S - 1``, every
        stratum present) and the strata's names for messages. The default is the class; a subclass with finer cells
        (:class:`~lightning_autobalance.data.ColoredDigits`: class x group) overrides it, and may check its cells
        here (it runs whether or not ``search_split`` is on)."""
        return targets[kept], names

    def _counts_of(self, indices: np.ndarray) -> list[int]:
        assert self._pool_targets is not None
        return np.bincount(self._pool_targets[indices], minlength=self.num_classes).astype(int).tolist()

    @property
    def class_names(self) -> list[str]:
        """Class names, in label order."""
        self._ensure_plan()
        assert self._class_names is not None
        return list(self._class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def long_tail_counts(self) -> list[int]:
        """Per-class counts of the whole long-tailed training set (lower + upper parts)."""
        self._ensure_plan()
        assert self._kept is not None
        return self._counts_of(self._kept)

    @property
    def class_counts(self) -> list[int]:
        """Per-class counts of the training set in use: the lower part with ``search_split``,
        else (and with ``fold_in_epoch``, where training ends on it) the whole long-tailed set."""
        self._ensure_plan()
        assert self._lower is not None
        return self._counts_of(self._counted_indices())

    def _counted_indices(self) -> np.ndarray:
        """The samples that :attr:`class_counts` counts: the whole set with ``fold_in_epoch``, else the training set
        in use."""
        self._ensure_plan()
        assert self._lower is not None and self._kept is not None
        return self._kept if self.fold_in_epoch is not None else self._lower

    @property
    def upper_class_counts(self) -> list[int] | None:
        """Per-class counts of the held-out upper part, or None without ``search_split``."""
        self._ensure_plan()
        return None if self._upper is None else self._counts_of(self._upper)

    @property
    def upper_targets(self) -> list[int] | None:
        """The label of every sample of the upper part, in the order of :attr:`upper_dataset`, or None without
        ``search_split`` (the callback uses them for class-balanced upper batches)."""
        self._ensure_plan()
        if self._upper is None:
            return None
        assert self._pool_targets is not None
        return self._pool_targets[self._upper].astype(int).tolist()

    @property
    def long_tail_indices(self) -> np.ndarray:
        """Pool indices of the whole long-tailed training set (sorted)."""
        self._ensure_plan()
        assert self._kept is not None
        return self._kept.copy()

    @property
    def train_indices(self) -> np.ndarray:
        """Pool indices that the training dataloader serves (sorted); with ``fold_in_epoch``, those it serves
        before the fold-in (the lower part)."""
        self._ensure_plan()
        assert self._lower is not None
        return self._lower.copy()

    @property
    def upper_indices(self) -> np.ndarray | None:
        """Pool indices of the upper part (sorted), or None without ``search_split``."""
        self._ensure_plan()
        return None if self._upper is None else self._upper.copy()

    # ------------------------------------------------------------------ datasets
    def _require_upper(self) -> np.ndarray:
        if not self.search_split:
            raise RuntimeError(f"{type(self).__name__} has no upper split: construct it with search_split=True to hold "
                               "out part of the training set for the loss search")
        self._ensure_plan()
        assert self._upper is not None
        return self._upper

    def _cached_dataset(self, key: str) -> Dataset[Any]:
        if key not in self._datasets:
            if key == "train":
                self._ensure_plan()
                assert self._lower is not None
                indices = self._lower
                if self.fold_in_epoch is not None:  # lower part first, then the upper part (see train_dataloader)
                    indices = np.concatenate([self._lower, self._require_upper()])
                dataset = self._build_dataset(indices, augment=True)
            elif key == "upper":
                dataset = self._build_dataset(self._require_upper(), augment=self.upper_augment)
            elif key == "upper_eval":
                dataset = self._build_dataset(self._require_upper(), augment=False)
            else:
                dataset = self._build_test_dataset()
            if self.device_resident:  # see ``device_resident``
                if not isinstance(dataset, InMemoryImageDataset):
                    raise ValueError(f"{type(self).__name__}: device_resident=True needs its images held in memory, "
                                     f"but it built a {type(dataset).__name__}")
                dataset = DeviceImageDataset.from_memory(dataset)
            self._datasets[key] = dataset
        return self._datasets[key]

    @property
    def train_dataset(self) -> Dataset[Any]:
        """The training set in use (lower part or whole long-tailed set), augmented. With ``fold_in_epoch``: the
        lower part followed by the upper part."""
        return self._cached_dataset("train")

    @property
    def upper_dataset(self) -> Dataset[Any]:
        """The held-out upper part (augmented when ``upper_augment``); ``RuntimeError`` without ``search_split``."""
        return self._cached_dataset("upper")

    @property
    def test_dataset(self) -> Dataset[Any]:
        """The balanced test set."""
        return self._cached_dataset("test")

    @property
    def val_dataset(self) -> Dataset[Any] | None:
        """The validation set chosen by ``val_source`` (None for ``"none"``)."""
        if self.val_source == "none":
            return None
        return self._cached_dataset("test" if self.val_source == "test" else "upper_eval")

    def setup(self, stage: str) -> None:
        """Build the datasets a stage needs (``"fit"``, ``"validate"``, ``"test"``, ``"predict"``)."""
        self._ensure_plan()
        if stage == "fit":
            _ = self.train_dataset
            if self.search_split:
                _ = self.upper_dataset
            _ = self.val_dataset
        elif stage == "validate":
            _ = self.val_dataset
        elif stage in ("test", "predict"):
            _ = self.test_dataset

    # ------------------------------------------------------------------ dataloaders
    def _loader(self, dataset: Dataset[Any], batch_size: int, shuffle: bool = False,
                sampler: Sampler[int] | None = None, generator: torch.Generator | None = None) -> DataLoader[Any]:
        if isinstance(dataset, DeviceImageDataset):  # to the attached trainer's device (the CPU without one)
            trainer = getattr(self, "trainer", None)
            dataset.to(trainer.strategy.root_device if trainer is not None else torch.device("cpu"))
            return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=generator,
                              drop_last=False, collate_fn=keep_batch)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, generator=generator,
                          drop_last=False, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training batches ``(x, y)``, ``y`` an int64 tensor; no sample is dropped. With
        ``fold_in_epoch``, ordered by a :class:`~lightning_autobalance.data.fold_in.FoldInSampler`."""
        dataset = self.train_dataset
        if self.fold_in_epoch is None:
            return self._loader(dataset, self.batch_size, shuffle=True)
        assert self._lower is not None and self._upper is not None
        lower = len(self._lower)
        sampler = FoldInSampler(range(lower), range(lower, lower + len(self._upper)), self.fold_in_epoch, self.seed)
        return self._loader(dataset, self.batch_size, sampler=sampler)

    def upper_sampler(self) -> Sampler[int]:
        """Sampler of the upper part: a ``RandomSampler`` with its own generator seeded by ``seed``, so drawing
        upper batches never touches the global random state.

        It does not shard: under several processes the consumer shards (the callback's
        :class:`~lightning_autobalance.lightning.batch_stream.BatchStream` gives every rank its own part of each pass,
        the one sharding path of the package). ``RuntimeError`` without ``search_split``.
        """
        generator = torch.Generator().manual_seed(self.seed)
        return RandomSampler(self.upper_dataset, generator=generator)  # type: ignore[arg-type]

    def upper_dataloader(self) -> DataLoader[Any]:
        """Shuffled batches of the held-out upper part (see :meth:`upper_sampler`); ``RuntimeError`` without
        ``search_split``."""
        sampler = self.upper_sampler()
        generator = torch.Generator().manual_seed(self.seed)
        return self._loader(self.upper_dataset, self.upper_batch_size or self.batch_size, sampler=sampler,
                            generator=generator)

    def val_dataloader(self) -> DataLoader[Any] | list[Any]:
        """Validation batches per ``val_source``; an empty list for ``"none"``."""
        dataset = self.val_dataset
        if dataset is None:
            return []
        return self._loader(dataset, self.batch_size)

    def test_dataloader(self) -> DataLoader[Any]:
        """Batches of the balanced test set, in order."""
        return self._loader(self.test_dataset, self.batch_size)
