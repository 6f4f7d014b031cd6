"""``find_loss``: the loss search as one call before your own fit, the way ``Tuner.lr_find`` finds a learning rate.

With :class:`~lightning_autobalance.AutoBalanceCallback` in your Trainer, ``trainer.fit`` trains the network on part of
the training data (the rest is the upper data the loss is tuned on) with a loss that changes as it goes: a search,
not the model to keep. :func:`find_loss` runs that search on a **copy** of your module, on a per-class split of your
training data, lets the held-back check decide between the found loss and its start, and sets the decided loss on
your module, frozen and rebuilt on the counts of the whole training set. Your own ``trainer.fit(model, ...)`` then
trains the model you keep, on all the data, with no callback::

    found = find_loss(model, datamodule=dm, trainer_kwargs={"max_epochs": 30, "accelerator": "auto"})
    print(found.decision)                      # kept or put back, why, and the check's figures
    trainer = Trainer(max_epochs=30)           # your own Trainer, callbacks and loggers as usual
    trainer.fit(model, datamodule=dm)          # the model you keep

The cost is one extra training of the search copy on 80% of the data (the hyper steps add a few percent).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, RandomSampler

from lightning_autobalance.core.losses import LossTables
from lightning_autobalance.data.search_split import search_split
from lightning_autobalance.lightning.callback import AutoBalanceCallback
from lightning_autobalance.lightning.mixin import AutoBalanceMixin

__all__ = ["FoundLoss", "find_loss"]


@dataclass(frozen=True)
class FoundLoss:
    """What :func:`find_loss` found and set.

    Attributes:
        path: the loss file (:meth:`~lightning_autobalance.AutoBalanceMixin.export_loss`'s format, with the decision).
        tables: the loss tables the module now trains with (on the whole training set's counts).
        decision: the held-back check's decision and figures (``None``: no check ran).
        hyper_steps: the hyper steps of the search.
        search_model: the searched copy (trained on the lower split; for inspection, not for use).
        augmentation: with a searched augmentation (``search=[..., "augment"]``), the strengths per (group, class)
            cell by table (``G x K`` each, in their units) that the module now applies in its training steps,
            frozen like the loss (the file holds it too); ``None``: the module has no augmentation.
    """

    path: Path
    tables: LossTables
    decision: dict[str, Any] | None
    hyper_steps: int
    search_model: pl.LightningModule
    augmentation: dict[str, torch.Tensor] | None = None


def _like(loader: DataLoader, dataset: Any, shuffle: bool) -> DataLoader:
    """A loader over ``dataset`` with ``loader``'s batch size, collate function, workers and memory settings."""
    workers = loader.num_workers
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=shuffle, num_workers=workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      worker_init_fn=loader.worker_init_fn,
                      persistent_workers=workers > 0 and loader.persistent_workers)


def _loaders(train_dataloaders: Any, val_dataloaders: Any, datamodule: Any) -> tuple[DataLoader, Any]:
    if (train_dataloaders is None) == (datamodule is None):
        raise ValueError("find_loss needs the training data: give train_dataloaders (one DataLoader) or a datamodule, "
                         "not both.")
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("fit")
        train_dataloaders = datamodule.train_dataloader()
        if val_dataloaders is None and type(datamodule).val_dataloader is not pl.LightningDataModule.val_dataloader:
            val_dataloaders = datamodule.val_dataloader()
    if not isinstance(train_dataloaders, DataLoader) or not hasattr(train_dataloaders.dataset, "__getitem__"):
        raise ValueError(f"find_loss splits the training data per class, so it needs one DataLoader over a map-style "
                         f"dataset; got {type(train_dataloaders).__name__}. Use search_split and the callback "
                         "directly for other data.")
    return train_dataloaders, val_dataloaders


def find_loss(model: pl.LightningModule, train_dataloaders: DataLoader | None = None, val_dataloaders: Any = None,
              datamodule: Any = None, *,
              trainer_kwargs: Mapping[str, Any] | None = None, callback_kwargs: Mapping[str, Any] | None = None,
              fraction: float = 0.2, seed: int = 0, path: str | Path | None = None,
              upper_transform: Any = "auto") -> FoundLoss:
    """Searches the loss on a copy of ``model`` and sets the decided loss on ``model``, frozen.

    1. The training data is split per class (:func:`~lightning_autobalance.data.search_split.search_split`:
       ``fraction`` of each class to the upper part, which reads evaluation inputs where it can).
    2. A deep copy of ``model`` is fitted on the lower part by a new ``Trainer(**trainer_kwargs)`` with an
       :class:`~lightning_autobalance.AutoBalanceCallback` (``callback_kwargs``) tuning the loss on the upper part; the
       held-back check at its end keeps the found loss or puts its start back.
    3. The decided loss is written to ``path`` and loaded into ``model``, rebuilt on the whole training set's counts
       and frozen: ``model``'s weights are not touched. Fit ``model`` with your own Trainer next. A searched
       augmentation goes the same way (in the file, rebuilt and frozen on ``model``): your fit's
       ``autobalance_augment`` applies the strengths found (the start's, where the held-back check put it back).

    Args:
        model: a LightningModule with :class:`~lightning_autobalance.AutoBalanceMixin`.
        train_dataloaders: the training DataLoader (map-style dataset), or
        val_dataloaders: validation data for the search's fit (what the module's validation hooks, monitors and
            ``ReduceLROnPlateau`` need; not the upper data), or
        datamodule: a datamodule whose ``train_dataloader()`` gives the training data and ``val_dataloader()``, if it
            has one, the validation data (``prepare_data`` and ``setup("fit")`` are called).
        trainer_kwargs: the search's Trainer arguments (as for your own fit: ``max_epochs``, ``accelerator``,
            ``precision``, ...); its ``callbacks`` may not hold an AutoBalanceCallback (give ``callback_kwargs``). Its
            files go to ``<default_root_dir>/find_loss`` and it writes no checkpoint unless ``enable_checkpointing``
            is given, so that the checkpoints of your own fit are the only ones beside it.
        callback_kwargs: the search's AutoBalanceCallback arguments (its upper data is the split's upper part).
        fraction: the share of each class held out for the upper data.
        seed: seeds the split.
        path: where the loss file goes (default: ``<default_root_dir>/find_loss/found_loss.yaml``).
        upper_transform: as in :func:`~lightning_autobalance.data.search_split.search_split`.

    Raises:
        ValueError: bad arguments, a module without the mixin or with a frozen loss, training data that cannot be
            split per class: before any training.
    """
    if not isinstance(model, AutoBalanceMixin) or not isinstance(model, pl.LightningModule):
        raise ValueError(f"find_loss needs a LightningModule with AutoBalanceMixin; got {type(model).__name__}.")
    built = model._autobalance_built()
    if built is not None and built.frozen:
        raise ValueError("find_loss: the module's loss is frozen, so there is nothing to search; unfreeze it "
                         "(model.unfreeze_loss()) or fit the module as it is.")
    kwargs = dict(trainer_kwargs or {})
    # the search's files apart from those of the user's own fit (whose checkpoints must all hold the decided loss)
    kwargs["default_root_dir"] = Path(kwargs.get("default_root_dir") or Path.cwd()) / "find_loss"
    kwargs.setdefault("enable_checkpointing", False)
    callbacks = list(kwargs.pop("callbacks", None) or [])
    if any(isinstance(c, AutoBalanceCallback) for c in callbacks):
        raise ValueError("find_loss adds its own AutoBalanceCallback: give its settings as callback_kwargs, not in "
                         "trainer_kwargs['callbacks'].")
    settings = dict(callback_kwargs or {})
    if "upper" in settings or "upper_dataloader" in settings:
        raise ValueError("find_loss tunes the loss on the split's upper part: leave upper and upper_dataloader out of "
                         "callback_kwargs (fraction sets its size).")
    loader, val = _loaders(train_dataloaders, val_dataloaders, datamodule)
    split = search_split(loader.dataset, fraction, seed, num_classes=None if built is None else built.num_classes,
                         upper_transform=upper_transform)
    callback = AutoBalanceCallback(**settings, upper_dataloader=_like(loader, split.upper, shuffle=False))

    searched = copy.deepcopy(model)
    if built is not None:  # counts given to the module: the copy's loss is rebuilt on the lower part's
        searched._autobalance_build(split.class_counts)
    trainer = pl.Trainer(**kwargs, callbacks=[*callbacks, callback])
    trainer.fit(searched, train_dataloaders=_like(loader, split.lower, isinstance(loader.sampler, RandomSampler)),
                val_dataloaders=val)

    target = Path(path) if path is not None else Path(trainer.default_root_dir) / "found_loss.yaml"
    if trainer.is_global_zero:
        searched.export_loss(target)
    trainer.strategy.barrier("find_loss")
    if built is None:  # the counts of the whole training set, which the module's own fit would find
        counts = [a + b for a, b in zip(split.class_counts, split.upper_class_counts)]
        model._autobalance_build(counts)
    model.load_loss(target, freeze=True)
    params = model.autobalance_parameters()
    with torch.no_grad():
        tables = LossTables(*(t.detach().cpu() for t in params.retraining_tables()))
    aug = model.autobalance_augment_parameters()
    strengths = None if aug is None else {k: v.detach().cpu() for k, v in aug.strengths().items()}
    return FoundLoss(target, tables, params.decision, callback.hyper_steps, searched, strengths)
