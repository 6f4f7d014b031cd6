"""``AugmentCurriculum``: a per-class curriculum of augmentation strength (after CUDA, Ahn et al., ICLR 2023).

The callback drives the strengths of the module's augmentation (``search=[..., "augment"]``, built and frozen) from
the levels of :mod:`lightning_autobalance.core.curriculum`: it counts, per class, the training steps' correct
predictions on their augmented batches over an epoch, sums the counts over processes, moves every class's level up
or down at the epoch's end and writes the strengths that the new levels give into the augmentation's free values.

What a module must provide: the mixin (:class:`~lightning_autobalance.AutoBalanceMixin`), the augmentation applied
in ``training_step`` (``x = self.autobalance_augment(x, y)``, as :class:`~lightning_autobalance.ImbalancedClassifier`
does) and the logits of that step, one of two ways: the loss computed with ``self.autobalance_loss(logits, y)``
(the callback asks the mixin to keep them:
:meth:`~lightning_autobalance.AutoBalanceMixin.autobalance_request_logits`), or ``training_step`` returning
``{"loss": loss, "logits": logits.detach()}``. Beside an
:class:`~lightning_autobalance.AutoBalanceCallback` (which asks for the logits itself, on its own steps) only the
second way works.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_autobalance.core.augment_parametrization import AugmentParameters
from lightning_autobalance.core.curriculum import check_settings, free_values_for, level_tables, update_levels
from lightning_autobalance.lightning.callback import AutoBalanceCallback
from lightning_autobalance.lightning.mixin import AutoBalanceMixin

__all__ = ["AugmentCurriculum"]


class AugmentCurriculum(pl.Callback):
    """Raises a class's augmentation strength while the class is still learned under it, lowers it otherwise.

    Every class starts at level 0 (about no augmentation). At every training epoch's end a class whose accuracy on
    its augmented training samples of that epoch reached ``threshold`` goes up one level, any other down one (within
    ``0 .. max_level``; a class not seen keeps its level); every op of the augmentation then has, for that class,
    ``level / max_level`` times its limit (a gate's probability ``level / max_level``, the flip's half that: at the
    top level a flip with probability 1/2, not a mirror of every image), kept ``margin`` from 0 and 1.

    Our own implementation of CUDA's rule. It differs from the paper in one way: the accuracy is that of the
    training steps' own predictions on their augmented batches (before each step's update), not of extra augmented
    copies drawn at every level up to the class's own, so it costs no forward pass. The counts are summed over
    processes (DDP) before the update, so every process holds the same levels; the update is deterministic.

    Needs a module with the mixin whose augmentation is built (``configure_autobalance(search=[..., "augment"])``)
    and frozen (``freeze=True`` or :meth:`~lightning_autobalance.AutoBalanceMixin.freeze_augment`): the callback
    sets its strengths, a search must not. See the module's text for how the logits reach the callback.

    Args:
        threshold: the accuracy in ``(0, 1]`` that raises a level (the paper's ``gamma``, 0.6).
        max_level: the highest level (a positive integer); a level of ``max_level`` is the ops' full strength.
        margin: in ``(0, 0.5)``: ``level / max_level`` is clamped to ``[margin, 1 - margin]`` so that the tables'
            logits are finite.

    Example:
        >>> import pytorch_lightning as pl
        >>> from lightning_autobalance import AugmentCurriculum, ImbalancedClassifier
        >>> model = ImbalancedClassifier("digits_net", 3, [100, 10, 1], search=("augment",), freeze_loss=True)
        >>> trainer = pl.Trainer(callbacks=[AugmentCurriculum(threshold=0.6, max_level=10)], logger=False)
    """

    def __init__(self, threshold: float = 0.6, max_level: int = 10, margin: float = 1e-3) -> None:
        check_settings(threshold, max_level, margin)
        self.threshold, self.max_level, self.margin = float(threshold), int(max_level), float(margin)
        self.levels: Tensor | None = None  # (K,) int64 on the CPU, once known (setup, or a checkpoint)
        self.epochs = 0  # level updates made (epochs ended), over fits
        self._correct: Tensor | None = None
        self._total: Tensor | None = None
        self._request = True  # ask the mixin for the logits (not beside an AutoBalanceCallback)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(threshold=self.threshold, max_level=self.max_level)

    # -- setup ---------------------------------------------------------------------------------------------
    @staticmethod
    def _augmentation(pl_module: pl.LightningModule) -> AugmentParameters:
        if not isinstance(pl_module, AutoBalanceMixin):
            raise TypeError(f"AugmentCurriculum needs a LightningModule with AutoBalanceMixin; "
                            f"{type(pl_module).__name__} has none.")
        aug = pl_module.autobalance_augment_parameters()
        if aug is None:
            raise ValueError(f"AugmentCurriculum: {type(pl_module).__name__} has no augmentation to drive. Build one "
                             "with configure_autobalance(search=[..., 'augment'], freeze=True) (ImbalancedClassifier("
                             "search=['augment'], freeze_loss=True)) and apply it in training_step with "
                             "x = self.autobalance_augment(x, y).")
        return aug

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        aug = self._augmentation(pl_module)
        if not aug.frozen:
            raise ValueError("AugmentCurriculum sets the augmentation's strengths itself, but the augmentation is not "
                             "frozen, so an AutoBalanceCallback would search it too: freeze it "
                             "(model.freeze_augment(), or configure_autobalance(..., freeze=True)).")
        free_values_for(aug, level_tables(torch.zeros(aug.num_classes, dtype=torch.long), aug.settings,
                                          self.max_level, aug.num_groups, self.margin))  # a kind that can hold them
        if self.levels is None or self.levels.numel() != aug.num_classes:
            self.levels = torch.zeros(aug.num_classes, dtype=torch.long)
        self._request = not any(isinstance(cb, AutoBalanceCallback) for cb in trainer.callbacks)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        aug = self._augmentation(pl_module)
        if self.levels is None or self.levels.numel() != aug.num_classes:
            raise ValueError(f"AugmentCurriculum: the restored levels are for "
                             f"{None if self.levels is None else self.levels.numel()} classes, but the module's "
                             f"augmentation has {aug.num_classes}.")
        self._apply(aug)

    # -- counting ------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._correct = self._total = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._request:
            pl_module.autobalance_request_logits(True)  # type: ignore[operator]

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        logits = outputs.get("logits") if isinstance(outputs, dict) else None
        if logits is None:
            logits = pl_module.autobalance_recorded_logits  # type: ignore[attr-defined]
        if logits is None:
            raise RuntimeError("AugmentCurriculum needs the logits of every training step: compute the loss with "
                               "self.autobalance_loss(logits, y), or return {'loss': loss, 'logits': "
                               "logits.detach()} from training_step (the only way beside an AutoBalanceCallback).")
        _, y, _ = pl_module.autobalance_unpack(batch)  # type: ignore[operator]
        k = self._levels().numel()
        if logits.ndim != 2 or logits.shape[1] != k or logits.shape[0] != y.shape[0]:
            raise ValueError(f"AugmentCurriculum: the training step's logits have shape {tuple(logits.shape)}; "
                             f"expected ({y.shape[0]}, {k}) for its {y.shape[0]} labels.")
        y = y.to(logits.device).long()
        hits = torch.nn.functional.one_hot(y, k)  # (N, K); sums, not bincount: deterministic on CUDA, no sync
        total = hits.sum(dim=0)
        correct = (hits * (logits.detach().argmax(dim=1) == y).long()[:, None]).sum(dim=0)
        self._total = total if self._total is None else self._total + total
        self._correct = correct if self._correct is None else self._correct + correct

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._request:
            pl_module.autobalance_request_logits(False)  # type: ignore[operator]
        levels = self._levels()
        device = pl_module.device
        zeros = torch.zeros(levels.numel(), dtype=torch.long, device=device)
        correct = (self._correct if self._correct is not None else zeros).to(device)
        total = (self._total if self._total is not None else zeros).to(device)
        # Every process takes part, also one that saw no batch (its counts are zero).
        counts = trainer.strategy.reduce(torch.stack([correct, total]).double(), reduce_op="sum")
        correct, total = counts.round().long().cpu()
        self.levels = update_levels(levels, correct, total, self.threshold, self.max_level)
        self.epochs += 1
        self._correct = self._total = None
        self._apply(self._augmentation(pl_module))
        # the same value on every process: sync_dist only spares DDP's warning
        pl_module.log("curriculum/mean_level", float(self.levels.double().mean()), on_epoch=True, sync_dist=True)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._request and isinstance(pl_module, AutoBalanceMixin):
            pl_module.autobalance_request_logits(False)  # a fit stopped within an epoch: the mixin keeps nothing

    # -- levels to strengths -------------------------------------------------------------------------------
    def _levels(self) -> Tensor:
        if self.levels is None:
            raise RuntimeError("AugmentCurriculum: no levels yet (the callback was not set up by a fit).")
        return self.levels

    def _apply(self, aug: AugmentParameters) -> None:
        tables = level_tables(self._levels(), aug.settings, self.max_level, aug.num_groups, self.margin)
        alpha = aug.alpha()
        with torch.no_grad():
            for name, value in free_values_for(aug, tables).items():
                alpha[name].copy_(value)

    def strengths(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The module's augmentation strengths per cell (what the levels give, after :meth:`setup`)."""
        return self._augmentation(pl_module).strengths()

    # -- checkpoints ---------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # plain types only (``torch.load(weights_only=True)``); the epoch's partial counts are not kept: they are
        # per process, and a resumed epoch counts again from its first batch after the checkpoint
        return {"levels": None if self.levels is None else [int(v) for v in self.levels], "epochs": self.epochs,
                "threshold": self.threshold, "max_level": self.max_level}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        levels = state_dict.get("levels")
        saved_max = int(state_dict.get("max_level", self.max_level))
        if saved_max != self.max_level:
            raise ValueError(f"AugmentCurriculum: the checkpoint's levels go up to max_level={saved_max}, but this "
                             f"callback has max_level={self.max_level}.")
        self.levels = None if levels is None else torch.tensor([int(v) for v in levels], dtype=torch.long)
        self.epochs = int(state_dict.get("epochs", 0))
        if self.levels is not None:
            rank_zero_info(f"AugmentCurriculum: resumed at levels {self.levels.tolist()} after {self.epochs} epochs.")

    def __repr__(self) -> str:
        return f"AugmentCurriculum(threshold={self.threshold}, max_level={self.max_level}, margin={self.margin})"
