"""``UpperData``: where the search's held-out ("upper") batches come from, as one value, and the :class:`UpperBatches`
of one fit. This is the callback's side of the data: it reads the Trainer (its datamodule, its validation loader, its
strategy's ``all_gather``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_autobalance.core.cells import count_table
from lightning_autobalance.core.coerce import coerce_value
from lightning_autobalance.core.random_state import preserve_random_state
from lightning_autobalance.lightning.batch_stream import BatchStream, map_style, why_not_resampled
from lightning_autobalance.lightning.check import AUTO_HOLDOUT, HeldBackCheck

# AUTO_HOLDOUT and preserve_random_state live in check.py and core/random_state.py; kept here for older imports
__all__ = ["AUTO_HOLDOUT", "UpperBatches", "UpperData", "UpperSource", "preserve_random_state"]

UpperSource = Literal["auto", "datamodule", "dataloader", "val"]
_SOURCES = ("auto", "datamodule", "dataloader", "val")


def _check_labels(labels: Tensor, num_classes: int) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"The upper data has labels from {int(labels.min())} to {int(labels.max())}, but the loss has "
                         f"{num_classes} classes (its class counts, given to configure_autobalance or found at setup, "
                         f"have {num_classes} entries): expected labels in [0, {num_classes}). Give one count per "
                         "class of the data.")


class UpperData:
    """The upper data's settings, a value; :meth:`build` makes what one fit needs (:class:`UpperBatches`).

    Args:
        source: where upper batches come from: ``"datamodule"`` (its ``upper_dataloader()`` hook, or the
            LightningModule's), ``"dataloader"`` (``dataloader`` below), ``"val"`` (the validation dataloader: the
            loss is then tuned on the data that is used to judge it) or ``"auto"`` (the first of these that exists;
            a warning when that is the validation data).
        dataloader: an explicit upper dataloader.
        class_counts: class counts of the upper data (default: from the datamodule, the dataset's ``targets``, or
            by reading the labels once).
        balanced: draw class-balanced upper batches (every class equally often; the named objectives then weigh
            classes equally) when the upper split is larger than one batch and its batches carry no groups.
        holdout: the share of the upper data held back from the search (stratified per class, or per (group,
            class) cell; a class with one sample stays in the search) for the callback's held-back check, which keeps
            the found loss only when it beats its start there (:mod:`lightning_autobalance.lightning.check`). ``None``
            (the default): :data:`AUTO_HOLDOUT` where the check can run (a map-style upper dataset with a plain batch
            size, a class with two upper samples, an ``nn.Linear`` head), else nothing held back, with a message.
            ``0``: no check. A share given explicitly is an error where the check cannot run.

    Example:
        >>> UpperData.coerce({"source": "val"}).source
        'val'
        >>> UpperData(source="dataloader")
        Traceback (most recent call last):
        ...
        ValueError: upper_source='dataloader' needs an upper_dataloader.
    """

    def __init__(self, source: UpperSource = "auto", dataloader: Any = None, class_counts: list[int] | None = None,
                 balanced: bool = True, holdout: float | None = None) -> None:
        if source not in _SOURCES:
            raise ValueError(f"upper_source must be 'auto', 'datamodule', 'dataloader' or 'val'; got {source!r}.")
        if source == "dataloader" and dataloader is None:
            raise ValueError("upper_source='dataloader' needs an upper_dataloader.")
        if class_counts is not None and (isinstance(class_counts, (str, bytes)) or any(
                isinstance(c, bool) or int(c) != c or c < 0 for c in class_counts)):
            raise ValueError(f"upper_class_counts must be whole numbers >= 0, one per class; got {class_counts!r}.")
        if holdout is not None and (isinstance(holdout, bool) or not isinstance(holdout, (int, float))
                                    or not 0.0 <= holdout < 1.0):
            raise ValueError(f"holdout must be a share of the upper data in [0, 1) (0: no held-back check; None: "
                             f"{AUTO_HOLDOUT} where the check can run); got {holdout!r}.")
        class_counts = None if class_counts is None else [int(c) for c in class_counts]
        self.source, self.dataloader, self.class_counts, self.balanced = source, dataloader, class_counts, balanced
        self.holdout = None if holdout is None else float(holdout)

    @property
    def hparams(self) -> dict[str, Any]:
        """The settings (what a run's fingerprint records)."""
        return {"source": self.source, "dataloader": self.dataloader, "class_counts": self.class_counts,
                "balanced": self.balanced, "holdout": self.holdout}

    def __repr__(self) -> str:
        return (f"UpperData(source={self.source!r}, dataloader={self.dataloader!r}, class_counts={self.class_counts}, "
                f"balanced={self.balanced}, holdout={self.holdout})")

    @classmethod
    def coerce(cls, value: Any) -> UpperData:
        """An :class:`UpperData` from itself, ``None`` (the default), a dataloader, or a mapping of its settings (a
        YAML group, a Hydra ``DictConfig``), validated alike."""
        return coerce_value(cls, value, "upper", ("source", "dataloader", "class_counts", "balanced", "holdout"),
                            ("a DataLoader", lambda v: cls(dataloader=v) if hasattr(v, "dataset") else None))

    def build(self, trainer: pl.Trainer, pl_module: Any, seed: int, wants_cells: bool, num_groups: int | None,
              check: HeldBackCheck | None = None, checkable: str | None = None) -> UpperBatches:
        """What one fit needs, built from these settings: the loader found, its stream opened, the counts learned
        (:class:`UpperBatches`); the arguments are those of :meth:`UpperBatches._setup`."""
        batches = UpperBatches(self)
        batches.objective_table, batches.shrink_table = batches._setup(trainer, pl_module, seed, wants_cells,
                                                                       num_groups, check, checkable)
        return batches


class UpperBatches:
    """The upper data of one fit, built by :meth:`UpperData.build`: the loader, the stream of upper batches (the part
    the search draws from), the counts per class and per (group, class) cell, the tables the objective and the
    shrinkage are built from."""

    def __init__(self, settings: UpperData) -> None:
        self.settings = settings
        self.loader: Any = None
        self.stream: BatchStream | None = None
        self.counts: list[int] | None = None
        self.cells: list[list[int]] | None = None
        self.objective_table: Any = None
        self.shrink_table: Any = None
        self._labels_read: tuple[Any, Tensor, Tensor | None] | None = None
        self._check_each: tuple[Any, int] | None = None  # iterable upper data: (module, classes) to check each batch

    def _setup(self, trainer: pl.Trainer, pl_module: Any, seed: int, wants_cells: bool,
              num_groups: int | None, check: HeldBackCheck | None = None, checkable: str | None = None
              ) -> tuple[Any, Any]:
        """Finds the loader, opens the stream, learns the counts; returns ``(objective_table, shrink_table)``: the
        counts the objective is built from (equal per class when batches are class-balanced) and those that inform
        each loss parameter (``None`` each when unknown).

        Args:
            pl_module: the :class:`~lightning_autobalance.AutoBalanceMixin` module.
            seed: seeds the order of upper batches.
            wants_cells: the objective is built from (group, class) counts when the batches carry groups.
            num_groups: the groups the objective's settings give, if any.
            check: the held-back check of the fit, which chooses the samples held back from the search
                (:meth:`HeldBackCheck.split`); ``None``: nothing is held back.
            checkable: why the module cannot be checked (no ``nn.Linear`` head), or ``None``: with the default
                ``holdout=None`` nothing is then held back.

        Raises:
            RuntimeError: no upper data, or a process without upper batches.
            ValueError: counts that do not fit the loss.
        """
        params = pl_module.autobalance_parameters()
        loader = self.loader = self._find_loader(trainer, pl_module)
        # Every process must learn about a process without upper data (or one whose split fails), or the others
        # would wait for it forever.
        search = None
        try:
            if check is not None:
                search = check.split(lambda: self._labels_groups(trainer, pl_module, loader, params.num_classes),
                                     checkable, why_not_resampled(loader), seed, params.num_classes,
                                     getattr(loader, "dataset", None))
            self.stream = BatchStream(loader, seed=seed, rank=trainer.global_rank, world_size=trainer.world_size,
                                      subset=search)
            batches, error = self.stream.batches_per_pass(), None
        except ValueError as err:
            batches, error = 0, err
        _check_ranks_agree(trainer, batches)
        if error is not None:
            raise error
        if search is None:
            counts, cells = self._counts(trainer, pl_module, loader, wants_cells, num_groups)
        else:  # the counts of the part the search sees
            labels, groups = self._labels_groups(trainer, pl_module, loader, params.num_classes)
            counts, cells = count_table(labels[search], None if groups is None else groups[search],
                                         params.num_classes, params.num_groups if params.num_groups > 1 else num_groups)
        num_classes = params.num_classes
        if counts is not None and len(counts) != num_classes:
            raise ValueError(f"The upper data's class counts have {len(counts)} entries, but the loss's class counts "
                             f"(given to configure_autobalance or found at setup) have {num_classes}: they must have "
                             "one entry per class.")
        if cells is not None and params.num_groups > 1 and len(cells) != params.num_groups:
            raise ValueError(f"The upper data has {len(cells)} groups, the loss has num_groups={params.num_groups}.")
        self.counts, self.cells = counts, cells
        table: Any = cells if cells is not None else counts
        shrink_table = table if params.num_groups > 1 else counts  # a per-class loss: per-class counts inform it
        # Every upper label is range-checked before training (the objective is built without per-batch checks),
        # also when the counts were given outright. A dataset without a length (an iterable one: reading it could
        # never end) is checked batch by batch instead, as each is drawn (:meth:`next`).
        self._check_each = None
        labels = None
        if map_style(getattr(loader, "dataset", None)):
            labels = self._labels_groups(trainer, pl_module, loader, num_classes)[0]
        else:
            self._check_each = (pl_module, num_classes)
        if self.settings.balanced and cells is None and batches > 1:
            labels = self._labels_groups(trainer, pl_module, loader, num_classes)[0] if labels is None else labels
            self.stream.balance(labels if search is None else labels[search])
            if self.stream.balanced and table is not None:
                table = [1 if n > 0 else 0 for n in table]  # every class is drawn equally often
        return table, shrink_table

    def next(self) -> Any:
        """The next upper batch of the stream; the labels of upper data without a length are
        range-checked here, batch by batch (those of other data were checked at setup)."""
        assert self.stream is not None, "UpperBatches.next before setup"
        batch = self.stream.next()
        if self._check_each is not None:
            pl_module, num_classes = self._check_each
            _check_labels(torch.as_tensor(pl_module.autobalance_unpack(batch)[1]), num_classes)
        return batch

    def missing_classes(self) -> list[int]:
        """The classes without upper samples (empty when the counts are unknown)."""
        return [c for c, n in enumerate(self.counts or []) if n == 0]

    def _find_loader(self, trainer: pl.Trainer, pl_module: Any) -> Any:
        source = self.settings.source
        if self.settings.dataloader is not None and source in ("auto", "dataloader"):
            return self.settings.dataloader
        if source in ("auto", "datamodule"):
            for owner in (trainer.datamodule, pl_module):
                hook = getattr(owner, "upper_dataloader", None)
                if callable(hook):
                    return hook()
            if source == "datamodule":
                raise RuntimeError("upper_source='datamodule' but neither the datamodule nor the LightningModule "
                                   "has an upper_dataloader() method.")
        # The validation data as the Trainer resolves it: fit(val_dataloaders=...), the datamodule's or the module's.
        # Private (no public accessor before the validation loop runs); guarded by tests/test_lightning_private.py.
        val = None
        data_source = trainer.fit_loop.epoch_loop.val_loop._data_source
        if data_source.is_defined():
            with contextlib.suppress(NotImplementedError, pl.utilities.exceptions.MisconfigurationException):
                val = data_source.dataloader()
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        if val is None:
            raise RuntimeError("AutoBalanceCallback found no upper data: give the datamodule (or the LightningModule) "
                               "an upper_dataloader() method, pass upper_dataloader=..., or provide a validation "
                               "dataloader.")
        if source == "auto":  # a fallback is said; upper_source='val' given explicitly is not warned of
            rank_zero_warn("AutoBalanceCallback is using the validation dataloader as upper data: the loss will be "
                           "tuned on the data used to judge it. Prefer a held-out split (upper_dataloader).")
        return val

    def _counts(self, trainer: pl.Trainer, pl_module: Any, loader: Any, wants_cells: bool,
                num_groups: int | None) -> tuple[list[int] | None, list[list[int]] | None]:
        """Class counts of the upper data and, when its batches carry groups, its ``G x K`` (group, class) counts.

        From ``class_counts``, the datamodule's ``upper_class_counts`` / ``upper_group_counts``, the dataset's
        ``targets`` / ``groups`` attributes, or by reading the labels (and groups) once.
        """
        params = pl_module.autobalance_parameters()
        datamodule = trainer.datamodule
        from_datamodule = loader is not self.settings.dataloader
        groups = params.num_groups if params.num_groups > 1 else num_groups
        if groups is None and from_datamodule:
            groups = getattr(datamodule, "num_groups", None)
        counts: list[int] | None = None
        cells: list[list[int]] | None = None
        if self.settings.class_counts is not None:
            counts = [int(c) for c in self.settings.class_counts]
        elif from_datamodule and getattr(datamodule, "upper_class_counts", None) is not None:
            counts = [int(c) for c in datamodule.upper_class_counts]
        if from_datamodule and getattr(datamodule, "upper_group_counts", None) is not None:
            cells = [[int(c) for c in row] for row in datamodule.upper_group_counts]
        if counts is None or (cells is None and (params.num_groups > 1 or wants_cells)):
            read_counts, cells = count_table(*self._labels_groups(trainer, pl_module, loader, params.num_classes),
                                              params.num_classes, groups)
            counts = read_counts if counts is None else counts
        return counts, cells

    def _labels_groups(self, trainer: pl.Trainer, pl_module: Any, loader: Any,
                       num_classes: int) -> tuple[Tensor, Tensor | None]:
        """The label (and group) of every upper sample in dataset order, range-checked: the datamodule's
        ``upper_targets`` (for its own loader) or the dataset's ``targets``, with the dataset's ``groups``; else
        read once per loader (:meth:`_read_labels`)."""
        dataset = getattr(loader, "dataset", None)
        targets = getattr(trainer.datamodule, "upper_targets", None) if loader is not self.settings.dataloader else None
        targets = getattr(dataset, "targets", None) if targets is None else targets
        if targets is None or dataset is None or len(targets) != len(dataset):
            labels, groups = self._read_labels(pl_module, loader)
        else:
            labels, group_ids = torch.as_tensor(targets).long().flatten(), getattr(dataset, "groups", None)
            groups = None if group_ids is None else torch.as_tensor(group_ids).long().flatten()
        _check_labels(labels, num_classes)
        return labels, groups

    def _read_labels(self, pl_module: Any, loader: Any) -> tuple[Tensor, Tensor | None]:
        """Labels (and groups) of the whole upper dataset, read once per loader (the split, the counts and
        class-balanced batches may each need them)."""
        if self._labels_read is not None and self._labels_read[0] is loader:
            return self._labels_read[1], self._labels_read[2]
        dataset = getattr(loader, "dataset", None)
        parts, group_parts = [], []
        # Read the whole dataset (not one process's shard) in order; a loader draws from the global RNG.
        reader = loader
        if dataset is not None:
            reader = DataLoader(dataset, batch_size=256, collate_fn=getattr(loader, "collate_fn", None))
        with preserve_random_state(torch.device("cpu")):
            for batch in reader:
                _, y, g = pl_module.autobalance_unpack(batch)
                parts.append(torch.as_tensor(y).long().cpu())
                if g is not None:
                    group_parts.append(torch.as_tensor(g).long().cpu())
        labels = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        groups = torch.cat(group_parts) if group_parts and len(group_parts) == len(parts) else None
        self._labels_read = (loader, labels, groups)
        return labels, groups


def _check_ranks_agree(trainer: pl.Trainer, batches: int) -> None:
    if trainer.world_size <= 1:
        return
    sizes = trainer.strategy.all_gather(torch.tensor([batches], device=trainer.strategy.root_device)).flatten()
    if int(sizes.min()) == 0 or int(sizes.min()) != int(sizes.max()):
        raise RuntimeError(f"Every process needs upper data, and the same number of upper batches; got "
                           f"{sizes.tolist()} batches per pass across ranks.")
