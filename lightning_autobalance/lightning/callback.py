r"""
AutoBalance
^^^^^^^^^^^

Learn the training loss while the model trains: on the optimizer steps its :class:`~lightning_autobalance.Schedule`
picks, take the hypergradient of an objective measured on held-out ("upper") data with respect to the loss
parameters of an :class:`~lightning_autobalance.AutoBalanceMixin` module and update them.

The callback is a thin adapter between the Trainer and values it is given: a :class:`~lightning_autobalance.Schedule`
(when), an :class:`~lightning_autobalance.Estimator` (how the hypergradient is estimated), an
:class:`~lightning_autobalance.core.objectives.UpperObjective` (what is minimised), an
:class:`~lightning_autobalance.UpperData` (on which data) and a :class:`~lightning_autobalance.HyperOptimizer` (how
the loss parameters move).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.utilities import move_data_to_device
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_autobalance.core.estimator import Estimator, with_head_weight_decay
from lightning_autobalance.core.head import WatchedHead, find_head, watch_head
from lightning_autobalance.core.hypergradient import Batch, FunctionalModel, hypergradient
from lightning_autobalance.core.objectives import Objective, UpperObjective
from lightning_autobalance.core.random_state import preserve_random_state
from lightning_autobalance.core.reduce import Reducer
from lightning_autobalance.data.fold_in import find_fold_in_sampler
from lightning_autobalance.lightning import augment_step
from lightning_autobalance.lightning.batch_stream import BatchStream, map_style
from lightning_autobalance.lightning.check import CHECK_WEIGHT_DECAY, FIT_TOLERANCE, CheckResult, HeldBackCheck
from lightning_autobalance.lightning.flat_settings import callback_values, flat_settings
from lightning_autobalance.lightning.hyper_optimizer import HyperOptimizer, HyperUpdate, OptimizerCallable
from lightning_autobalance.lightning.mixin import AutoBalanceMixin, training_loader
from lightning_autobalance.lightning.schedule import MAX_AUTO_INTERVAL, ONE_PHASE_HYPER_SHARE, Schedule, auto_interval
from lightning_autobalance.lightning.step_log import RESIDUAL_LIMIT, StepLog, parameter_figures
from lightning_autobalance.lightning.strategies import SHARDED_STRATEGIES
from lightning_autobalance.lightning.upper_data import UpperBatches, UpperData

__all__ = ["CHECK_WEIGHT_DECAY", "MAX_AUTO_INTERVAL", "ONE_PHASE_HYPER_SHARE", "AutoBalanceCallback", "auto_interval"]





def _autobalance_forward(module: Any, inputs: Any) -> Tensor:
    return module.autobalance_forward(inputs)


def _probe_batch(loader: Any) -> Any:
    """A few samples of ``loader`` as one batch: read from its dataset by index where it can (no worker started, no
    sampler drawn), else its first batch."""
    dataset, collate = getattr(loader, "dataset", None), getattr(loader, "collate_fn", None)
    if map_style(dataset) and collate is not None and len(dataset) > 0:
        if getattr(loader, "batch_sampler", None) is None:  # automatic batching off: an item is a batch
            return collate(dataset[0])
        return collate([dataset[i] for i in range(min(len(dataset), getattr(loader, "batch_size", None) or 4, 4))])
    return next(iter(loader))


def _watch_head(trainer: pl.Trainer, pl_module: Any) -> WatchedHead | str:
    """The layer that makes the logits (:func:`~lightning_autobalance.core.head.watch_head`) on a few training
    samples, in evaluation mode, without gradient, the random state and the module's mode kept; or why the forward
    pass could not run."""
    loader = training_loader(trainer)
    if loader is None:
        return "no training batch to watch the forward pass on"
    modes = [(m, m.training) for m in pl_module.modules()]  # each submodule's own mode, as it was
    try:
        with preserve_random_state(trainer.strategy.root_device), torch.no_grad():
            try:
                inputs = pl_module.autobalance_unpack(move_data_to_device(_probe_batch(loader), pl_module.device))[0]
            except (ValueError, TypeError):  # items that are not samples (a device-resident loader): its first batch
                inputs = pl_module.autobalance_unpack(move_data_to_device(next(iter(loader)), pl_module.device))[0]
            pl_module.eval()
            return watch_head(pl_module, lambda: pl_module.autobalance_forward(inputs))
    except Exception as err:  # the caller's fallback says why
        return f"a forward pass on a training batch failed ({type(err).__name__}: {err})"
    finally:
        for module, mode in modes:
            module.training = mode


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _loss_scale(trainer: pl.Trainer) -> float | Tensor:
    """The gradient scaler's scale under float16 (a device tensor, read without a host sync), else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    # torch's GradScaler keeps its scale as a device tensor in the private ``_scale`` (None before its first use);
    # ``get_scale()`` would read it back. Guarded by tests/test_lightning_private.py.
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else float(scaler.get_scale())


class AutoBalanceCallback(Callback):
    r"""Searches the loss parameters of an :class:`~lightning_autobalance.AutoBalanceMixin` module by bilevel
    optimisation while the Trainer fits the model.

    On every optimizer step its ``schedule`` picks (not micro-batches: under gradient accumulation it acts once per
    step) it computes the gradient of the upper objective with respect to the loss parameters (see
    :func:`~lightning_autobalance.core.hypergradient.hypergradient`) and takes one step of its own optimizer on them.
    With no arguments it uses the cheapest estimate that works well: the one-step Neumann hypergradient on the current
    training batch, whose logits the training step already computed, and one class-balanced upper batch; about one
    extra forward and backward pass per hyper step, every few optimizer steps after a 20% warm-up
    (:func:`~lightning_autobalance.lightning.schedule.auto_interval`; at most 5% of the steps of a one-phase run, which
    stops
    at its :class:`~lightning_autobalance.data.fold_in.FoldInSampler`'s fold-in epoch). At the start of fit it says
    how many hyper steps it plans; at the end it warns when it made none, and why.

    By default half of the upper data (per class) is held back from the search, and once the search is over the
    found loss is checked against the loss it started from: the classifier head is trained to its equilibrium on the
    training features with each, and the found loss stays only if its head scores better on the held-back half and,
    for a search started from logit adjustment, the network fits its training data (``fit_tolerance``); otherwise the
    start is put back
    (:mod:`lightning_autobalance.lightning.check`; ``check_result`` has the figures, the decision is also kept with the
    loss parameters, so every later checkpoint and ``export_loss`` carries it; ``should_check`` can be overridden,
    ``UpperData(holdout=0)`` turns it off). The head is the layer that makes the
    logits, watched on a forward pass of a few training samples at setup (or ``Estimator(head=...)``); a fit whose head
    cannot be told is refused before training. Where the check cannot run (an iterable upper dataset, one upper sample
    per class, logits not made by an ``nn.Linear``) the search uses all the upper data, with a message.

    The extra passes run on the unwrapped module with copies of its buffers (BatchNorm statistics are untouched),
    in the precision plugin's forward context, from and back to the training loop's random state; the
    loss-parameter arithmetic stays in float32 or wider. A non-finite hypergradient skips that step with a warning.
    A hyper step reads nothing back from the device (under any estimator, objective, float16 or DDP; only an
    objective set to ``missing="raise"`` reads whether its units are present): its figures
    (objective, hypergradient norm, loss parameters) reach loggers in one transfer at the end of each epoch, every 64
    hyper steps and at the end of the fit, and the progress bar shows ``hyper_obj`` once an epoch. Under DDP one
    :class:`~lightning_autobalance.core.reduce.Reducer` averages every linear piece over the processes and sums the
    named objectives' per-unit statistics, so that the loss parameters stay identical on every rank.

    Every value below also accepts a plain mapping of its settings (a YAML group, a Hydra ``DictConfig``, a
    jsonargparse dict), validated alike; the flat names of earlier versions (``every_n_steps=``, ``start_epoch=``,
    ``hyper_lr=``, ``shrinkage=``, ``max_norm=``, ``objective_kwargs=``, ``upper_source=``, ``balanced_upper=``, ...)
    are accepted as keyword arguments and go to the value they belong to.

    Args:
        schedule: when hyper steps are taken (:class:`~lightning_autobalance.Schedule`: ``every_n_steps``,
            ``target_hyper_steps``, ``start_epoch``/``start_step``, ``stop_epoch``/``stop_step``,
            ``warmup_fraction``). Default: ``Schedule()``, sized to the run.
        estimator: how the hypergradient is estimated (:class:`~lightning_autobalance.Estimator`, or
            ``{method: cg, cg_iterations: 10}``). Default: the one-step Neumann estimate.
        objective: the upper objective: a name (``"balanced_ce"``, ``"worst_class"``, ``"worst_group"``, ``"deo"``,
            ``"blend"``), an :class:`~lightning_autobalance.core.objectives.UpperObjective` (a name or objective class
            with its settings), a mapping ``{name: worst_class, temperature: 0.1}``, or a callable
            ``objective(logits, target, group) -> scalar``. Objectives given by name or class are built at setup from
            the counts of the upper data (per (group, class) cell when its batches carry groups).
        upper: where upper batches come from (:class:`~lightning_autobalance.UpperData`: ``source``,
            ``dataloader``, ``class_counts``, ``balanced``, ``holdout``). Default: the dataloader given, else the
            datamodule's or module's ``upper_dataloader()``, else the validation data (with a warning), half of it
            held back for the check where it can run.
        hyper_optimizer: how the loss parameters move: a callable ``params -> torch.optim.Optimizer`` (from YAML:
            ``class_path: torch.optim.SGD`` with ``init_args``), or a :class:`~lightning_autobalance.HyperOptimizer`
            (``optimizer``, ``lr``, ``scheduler``, ``lr_schedule``, ``shrinkage``, ``max_norm``). Default: Adam, lr
            0.02, decayed along a cosine over the planned hyper steps, shrinkage 16.
        upper_dataloader: an upper dataloader (the shortcut for ``upper=UpperData(dataloader=...)``).
        train_batches: training batches per hyper step; the current batch is the first, the others are drawn
            from the training data (the paper uses 10).
        upper_batches: upper batches per hyper step (the paper uses 10).
        log_max_classes: log every loss parameter per class up to this many classes, else summaries.
        seed: seeds the order of upper (and extra training) batches.
        fit_tolerance: for a search started from logit adjustment (the default preset, or ``group_balanced``), the
            held-back check keeps a found loss only where the network fits its training data: its balanced error on
            the training rows the check reads, logits seen through the found loss, at most this share (default 0.1).
            ``None``: the check's heads alone decide (as they do for other starts).
        **flat: settings by their flat names, as above.

    Raises:
        ValueError: a bad setting (at construction); RuntimeError at the fit's first optimizer step, or at a due
            hyper step, when the module's ``training_step`` has not called ``self.autobalance_loss`` since the
            previous optimizer step.

    Example::

        from pytorch_lightning import Trainer
        from lightning_autobalance import AutoBalanceCallback, Schedule

        trainer = Trainer(max_epochs=30, callbacks=[AutoBalanceCallback(schedule=Schedule(every_n_steps=5),
                                                                        objective="worst_class")])
        trainer.fit(model, datamodule=dm)  # model: an AutoBalanceMixin LightningModule
    """

    def __init__(
        self,
        schedule: Schedule | Mapping[str, Any] | None = None,
        estimator: Estimator | Mapping[str, Any] | None = None,
        objective: str | UpperObjective | Mapping[str, Any] | Objective = "balanced_ce",
        upper: UpperData | Mapping[str, Any] | None = None,
        hyper_optimizer: HyperOptimizer | OptimizerCallable | Mapping[str, Any] | None = None,
        upper_dataloader: DataLoader | None = None,
        train_batches: int = 1,
        upper_batches: int = 1,
        log_max_classes: int = 100,
        seed: int = 0,
        fit_tolerance: float | None = FIT_TOLERANCE,
        **flat: Any,
    ) -> None:
        super().__init__()
        groups = flat_settings(**flat)
        if fit_tolerance is not None and (isinstance(fit_tolerance, bool) or not isinstance(fit_tolerance, (int, float))
                                          or not 0.0 <= fit_tolerance <= 1.0):
            raise ValueError(f"fit_tolerance must be a share in [0, 1] (the training balanced error above which a "
                             f"found loss is not kept) or None (no such rule); got {fit_tolerance!r}.")
        self.fit_tolerance = None if fit_tolerance is None else float(fit_tolerance)
        if train_batches < 1 or upper_batches < 1:
            raise ValueError(f"train_batches and upper_batches must be at least 1; got {train_batches}, "
                             f"{upper_batches}.")
        if log_max_classes < 0:
            raise ValueError(f"log_max_classes must be >= 0; got {log_max_classes}.")
        self.estimator = Estimator.coerce(estimator)
        self._estimator = self.estimator  # this fit's: the head method's weight decay read from the optimizer
        self.schedule, self.objective, self.upper, self.hyper_optimizer = callback_values(
            groups, schedule, objective, upper, hyper_optimizer, upper_dataloader)
        self.train_batches, self.upper_batches = train_batches, upper_batches
        self.log_max_classes, self.seed = log_max_classes, seed

        self._log = StepLog()
        self._update: HyperUpdate | None = None
        self._objective_fn: Objective | None = None
        self._reducer = Reducer()
        self._shrink_counts: dict[str, Tensor] = {}
        self._fmodel: FunctionalModel | None = None  # the module as a function of its weights, built once a fit
        self._train: BatchStream | None = None
        self._train_state: dict[str, int] | None = None
        self._pending: dict[str, Any] | None = None
        self._batch: Any = None
        self._batch_rng: tuple[Tensor, Tensor | None] | None = None
        self._loss_calls: int | None = None  # the module's autobalance_loss calls at the previous optimizer step
        self._first_step = False  # the next optimizer step is the fit's first (its wiring is checked)
        self._warned_frozen = False
        self._resumed_at = 0
        self._upper: UpperBatches | None = None  # this fit's upper data (UpperData.build)
        self._schedule = self.schedule  # this fit's plan (Schedule.plan), the settings until the fit starts
        self._check = HeldBackCheck(self.upper.holdout, self.estimator.head, self.fit_tolerance)
        self._head = self.estimator.head  # this fit's head: the nn.Linear watched making the logits (setup)

    # ------------------------------------------------------------------------------------------------------------
    @property
    def hyper_steps(self) -> int:
        """Hyper steps that updated the loss parameters (skipped ones excluded), over every fit of this callback."""
        self._read()
        return self._log.attempted - self._log.skipped

    @property
    def skipped_steps(self) -> int:
        """Hyper steps skipped for a non-finite hypergradient."""
        self._read()
        return self._log.skipped

    @property
    def last_objective(self) -> float | None:
        """The upper objective's value at the latest hyper step (None before the first)."""
        self._read()
        return self._log.last_objective

    @property
    def optimizer(self) -> Optimizer | None:
        """The hyper-optimizer of the current fit (None before it, or with nothing to search)."""
        return self._update.optimizer if self._update is not None else None

    @property
    def scheduler(self) -> Any:
        return self._update.scheduler if self._update is not None else None

    @property
    def fit_upper(self) -> UpperBatches | None:
        """The upper data as built for the current (or last) fit: its loader, stream and counts."""
        return self._upper

    @property
    def fit_schedule(self) -> Schedule:
        """The schedule as planned for the current (or last) fit: its ``interval``, ``first``, ``end``, ``planned``."""
        return self._schedule

    @property
    def upper_dataloader(self) -> Any:
        return self.upper.dataloader

    @property
    def upper_source(self) -> str:
        return self.upper.source

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.schedule.every_n_steps or "auto",
                                        method=self.estimator.method)

    # ------------------------------------------------------------------------------------------------------------
    # setup: every check before any training time is spent
    # ------------------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, AutoBalanceMixin):
            raise TypeError(f"AutoBalanceCallback needs a LightningModule that inherits AutoBalanceMixin; "
                            f"{type(pl_module).__name__} does not. Add the mixin and call configure_autobalance().")
        pl_module._autobalance_state.searched_by = id(trainer)  # the module is searched in this fit
        params = pl_module.autobalance_parameters()
        if isinstance(trainer.strategy, SHARDED_STRATEGIES):
            raise RuntimeError(f"AutoBalanceCallback does not support the sharded strategy "
                               f"{type(trainer.strategy).__name__}: the hypergradient needs the whole model on every "
                               "process. Use strategy='ddp' (or 'ddp_spawn') or a single device.")
        if params.num_free() == 0 and augment_step.searched_augmentation(pl_module) is None:
            rank_zero_warn("The AutoBalance loss has nothing to search (search=() or a loaded loss): the callback "
                           "will do nothing.")
        objective = self.objective
        try:
            find_head(pl_module, self.estimator.head)
            searched = params.num_free() or augment_step.searched_augmentation(pl_module) is not None
            checkable = None if searched else "the loss has nothing to search"
        except ValueError:
            checkable = "the module has no nn.Linear head"
        self._head = self.estimator.head
        if checkable is None and self._head is None and (self.estimator.method == "head" or self.upper.holdout != 0):
            checkable = self._find_head(trainer, pl_module)
        self._check.head = self._head
        upper = self._upper = self.upper.build(trainer, pl_module, self.seed, objective.counts_per_cell,
                                               objective.num_groups, self._check, checkable)
        table, shrink_table = upper.objective_table, upper.shrink_table
        missing = upper.missing_classes()
        if missing and objective.requires_all_classes:
            k = params.num_classes
            longer = (f" The loss has {k} classes (len(class_counts)); if the data has fewer, class_counts is too "
                      "long." if missing == list(range(missing[0], k)) else "")
            raise ValueError(f"The upper data has no sample of classes {missing}, which the objective "
                             f"{objective.describe()} needs: give every class at least one upper sample, e.g. with a "
                             "per-class split: `lower, upper, class_counts, _ = "
                             f"lightning_autobalance.data.search_split(train_dataset)`.{longer}")
        training_counts = params.class_counts.sum(0).tolist()
        counts = torch.as_tensor(shrink_table if shrink_table is not None else training_counts, dtype=torch.float64)
        self._shrink_counts = {**params.free_value_counts(counts),
                               **augment_step.shrink_counts(pl_module, counts)}  # a searched augmentation's
        self._reducer = Reducer.from_strategy(trainer.strategy, trainer.world_size)
        try:
            self._objective_fn = objective.build(table if table is not None else training_counts, self._reducer,
                                                 validate=False)  # the upper labels were checked above, once
        except ValueError as err:
            groups = "" if upper.cells is not None or not objective.is_named else (
                " (the upper batches carry no groups: group objectives need (x, y, g) batches)")
            raise ValueError(f"AutoBalanceCallback: the upper objective {objective.describe()} does not fit the upper "
                             f"data{groups}: {err}") from err

    def _find_head(self, trainer: pl.Trainer, pl_module: Any) -> str | None:
        """Sets this fit's head (``self._head``) to the ``nn.Linear`` that makes the logits, watched on a forward pass
        of a few training samples; else returns why the held-back check cannot run (under the default ``holdout``) or
        refuses the fit: the head cannot be told, or the ``"head"`` method or an explicit ``holdout`` needs one."""
        watched = _watch_head(trainer, pl_module)
        if isinstance(watched, WatchedHead) and watched.linear:
            self._head = watched.name
            return None
        linear = [n for n, m in pl_module.named_modules() if isinstance(m, nn.Linear)]
        name = "Estimator(head='<layer name>') (its nn.Linear layers: " + ", ".join(linear) + ")"
        if isinstance(watched, WatchedHead) and watched.name is None:
            raise ValueError(f"AutoBalanceCallback cannot tell which layer of {type(pl_module).__name__} makes the "
                             f"logits (the classifier head of the held-back check and of the 'head' method): "
                             f"{watched.why}. Name it with {name}, or give UpperData(holdout=0) and another "
                             "method.")
        why = watched if isinstance(watched, str) else (
            f"the logits come from {watched.name!r}, a {type(watched.layer).__name__}, not an nn.Linear")
        if self.estimator.method == "head":
            raise ValueError(f"Estimator(method='head') needs the classifier head to be an nn.Linear: {why}. Name "
                             f"the layer with {name}, or use another method.")
        if self.upper.holdout is not None:
            raise ValueError(f"UpperData(holdout={self.upper.holdout}) checks the found loss at an nn.Linear "
                             f"classifier head: {why}. Name the layer with {name}, or give holdout=0.")
        return why

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = pl_module.autobalance_parameters()  # type: ignore[attr-defined]
        total = trainer.estimated_stepping_batches  # loads the training data, where a FoldInSampler may be
        sampler = find_fold_in_sampler(trainer.train_dataloader)
        stream = self._upper.stream if self._upper is not None else None
        self._schedule = self.schedule.plan(total, trainer.max_epochs,
                                            stream.batches_per_pass() if stream is not None else 1,
                                            None if sampler is None else sampler.fold_in_epoch)
        self._update = self.hyper_optimizer.build(augment_step.searched_values(pl_module), self._schedule.planned,
                                                  self._shrink_counts)
        self._log.start_fit()
        self._fmodel = None
        self._loss_calls = getattr(pl_module, "autobalance_loss_calls", None)
        self._first_step = True
        groups = [g for o in trainer.optimizers for g in o.param_groups]
        estimator = self.estimator if self._head == self.estimator.head else replace(self.estimator, head=self._head)
        self._estimator, note = with_head_weight_decay(estimator, pl_module, groups)  # "head": the optimizer's
        if note:
            rank_zero_warn(f"AutoBalance: {note}")
        # before any training: an explicit holdout needs weight decay on the head; a resumed fit keeps its start
        searched_augment = augment_step.searched_augmentation(pl_module)  # judged and put back with the loss
        self._check.begin(pl_module, params.alpha(), groups, self._estimator.weight_decay, self._pending is not None,
                          augment_alpha=None if searched_augment is None else searched_augment.alpha())
        if self._check.start_alpha is not None and self._check.result is None and not params.frozen:
            params.decision = {"decision": "pending", "reason": "the held-back check has not ruled on this loss "
                               "yet: it runs once the search is over"}
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        rank_zero_info(self._schedule.summary())
        if self._schedule.fold_in_epoch is not None:
            rank_zero_info(f"AutoBalance: one-phase run: the search stops at epoch {self._schedule.fold_in_epoch}, "
                           "where the training data's FoldInSampler folds the upper split into training.")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resumed_at = trainer.global_step  # restored from a checkpoint by now

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fold = self._schedule.fold_in_epoch
        if fold is not None and trainer.current_epoch == fold:
            rank_zero_info(f"AutoBalance: epoch {fold}: the upper split is now trained on; the loss stays as the "
                           f"search left it ({self.hyper_steps} hyper steps).")

    # ------------------------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        due = self._update is not None and self._schedule.should_step(trainer.global_step, trainer.current_epoch)
        pl_module.autobalance_request_logits(due)  # type: ignore[attr-defined]
        self._batch = batch if due else None
        self._batch_rng = _rng_state(pl_module.device) if due else None

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        calls = getattr(pl_module, "autobalance_loss_calls", None)
        before, self._loss_calls = self._loss_calls, calls
        first, self._first_step = self._first_step, False  # the wiring is also checked at the fit's first step
        if self._update is None or (self._batch is None and not first):
            return
        params = pl_module.autobalance_parameters()  # type: ignore[attr-defined]
        if not params.frozen and calls is not None and before is not None and calls == before:
            when = "a hyper step is due" if self._batch is not None else "the first of this fit"
            raise RuntimeError(f"AutoBalance: at optimizer step {trainer.global_step} ({when}), "
                               f"{type(pl_module).__name__}.training_step has not called self.autobalance_loss "
                               "since the previous optimizer step, so the model does not train on the loss being "
                               "searched: call self.autobalance_loss(logits, y) in training_step (in place of "
                               "your own criterion) and return it as the loss.")
        if self._batch is None:
            return
        if params.frozen:
            if not self._warned_frozen:
                rank_zero_info("AutoBalance: the loss is frozen, so no hyper steps are taken.")
                self._warned_frozen = True
        else:
            self._hyper_step(trainer, pl_module)
        self._batch = None
        pl_module.autobalance_request_logits(False)  # type: ignore[attr-defined]

    def _as_batch(self, pl_module: Any, batch: Any, logits: Tensor | None = None,
                  rng: tuple[Tensor, Tensor | None] | None = None) -> Batch:
        inputs, target, group = pl_module.autobalance_unpack(batch)
        if logits is not None and (logits.ndim != 2 or logits.shape[0] != target.shape[0]):
            logits = None
        return Batch(inputs, target, group, logits, rng)

    def _train_stream(self, trainer: pl.Trainer) -> BatchStream:
        """Extra training batches, from a stream over the training data opened at first use."""
        if self._train is None:
            loader = trainer.train_dataloader
            if isinstance(loader, (list, tuple)):
                loader = loader[0]
            elif isinstance(loader, dict):
                loader = next(iter(loader.values()))
            self._train = BatchStream(loader, seed=self.seed + 1, rank=trainer.global_rank,
                                      world_size=trainer.world_size)
            if self._train_state is not None:
                self._train.load_state_dict(self._train_state)
        return self._train

    def _hyper_step(self, trainer: pl.Trainer, pl_module: Any) -> None:
        upper_data = self._upper
        assert upper_data is not None and self._objective_fn is not None and self._update is not None
        params = pl_module.autobalance
        device = pl_module.device
        with preserve_random_state(device), trainer.precision_plugin.forward_context(), torch.enable_grad():
            train = [self._as_batch(pl_module, self._batch, pl_module.autobalance_recorded_logits, self._batch_rng)]
            for _ in range(self.train_batches - 1):
                extra = trainer.strategy.batch_to_device(self._train_stream(trainer).next())
                train.append(self._as_batch(pl_module, extra))
            upper = [self._as_batch(pl_module, trainer.strategy.batch_to_device(upper_data.next()))
                     for _ in range(self.upper_batches)]
            train, augmentation = augment_step.augmented_train(pl_module, train)  # clean inputs when searched
            sizes = None
            if trainer.world_size > 1:  # checked when the figures are read: every rank gathers, none waits
                sizes = trainer.strategy.all_gather(torch.tensor(
                    [sum(b.target.shape[0] for b in train), sum(b.target.shape[0] for b in upper)],
                    device=trainer.strategy.root_device)).reshape(-1, 2)
            if self._fmodel is None or self._fmodel.module is not pl_module:
                self._fmodel = FunctionalModel(pl_module, _autobalance_forward)
            result = hypergradient(
                self._fmodel, params.alpha(), params.tables, pl_module.autobalance_loss_from_tables,
                self._objective_fn, train, upper, self._estimator,
                reduce=None if self._reducer.is_local else self._reducer, loss_scale=_loss_scale(trainer),
                augmentation=augmentation)
        finite = result.finite if sizes is None else result.finite & (sizes == sizes[0]).all().to(result.finite)
        norm = self._update.step(augment_step.searched_values(pl_module), result.grad, finite)
        names, values = ([], [])
        if trainer.loggers and trainer.global_rank == 0:
            names, values = parameter_figures(params, self.log_max_classes)
            more = augment_step.augment_figures(pl_module, self.log_max_classes)
            names, values = [*names, *more[0]], [*values, *more[1]]
        if result.residual is not None:  # read with the other figures, and warned of when too large
            names, values = ["autobalance/solver_residual", *names], [result.residual.reshape(1), *values]
        self._log.record(trainer.global_step, finite, result.objective, norm, names, values, sizes)
        if self._log.full:
            self._read(trainer)

    def _read(self, trainer: pl.Trainer | None = None) -> None:
        """Reads the hyper steps' figures in one transfer (see
        :class:`~lightning_autobalance.lightning.step_log.StepLog`)."""
        loggers = trainer.loggers if trainer is not None and trainer.global_rank == 0 else []
        skipped_at = self._log.read(loggers)
        if skipped_at:
            where = f"step {skipped_at[0]}" if len(skipped_at) == 1 else f"steps {skipped_at}"
            rank_zero_warn(f"AutoBalance: non-finite hypergradient at {where}; hyper step skipped "
                           f"({self._log.skipped} so far). The loss parameters are unchanged.")
        if self._log.unconverged:
            (step, worst), count = max(self._log.unconverged, key=lambda s: s[1]), len(self._log.unconverged)
            self._log.unconverged = []
            rank_zero_warn(f"AutoBalance: the {self._estimator.method!r} method's solve stopped short of convergence "
                           f"at {count} hyper step(s) (relative residual up to {worst:.2g} at step {step}, above "
                           f"{RESIDUAL_LIMIT:g}): its hypergradient is inexact. Give it more steps "
                           "(Estimator(head_steps=...)) or more weight decay on the head.")

    # ------------------------------------------------------------------------------------------------------------
    # the end of an epoch and of the fit
    # ------------------------------------------------------------------------------------------------------------
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read(trainer)
        if self._log.fit_attempted and self._log.last_objective is not None:
            pl_module.log("hyper_obj", float(self._log.last_objective), prog_bar=True, logger=False, on_step=False,
                          on_epoch=True)
        end, max_epochs = self._schedule.end, trainer.max_epochs or -1  # -1: a run bounded by max_steps only
        if (end is not None and trainer.global_step >= end) or 0 < max_epochs <= trainer.current_epoch + 1:
            self._run_check(trainer, pl_module, log=True)  # before this epoch's checkpoint: it holds the loss kept

    def should_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Whether the held-back check runs now (once a fit, when the search is over): upper data held back
        (:class:`~lightning_autobalance.UpperData` ``holdout``), hyper steps made in this fit and the loss (or a
        searched augmentation) not frozen. Override to decide otherwise."""
        frozen = pl_module.autobalance_parameters().frozen  # type: ignore[attr-defined]
        return self._check.ready(self._log.fit_attempted - self._log.fit_skipped > 0,
                                 frozen and augment_step.searched_augmentation(pl_module) is None)

    def _run_check(self, trainer: pl.Trainer, pl_module: Any, log: bool = False) -> None:
        """The held-back check (:mod:`lightning_autobalance.lightning.check`): keeps the found loss only when it beats
        its start on the upper samples the search never saw; otherwise puts the start back."""
        self._read(trainer)
        if self.should_check(trainer, pl_module):
            upper = self._upper
            assert upper is not None
            self._check.run_in_fit(trainer, pl_module, self.objective, upper.loader,
                                   None if upper.cells is None else len(upper.cells),
                                   None if self._reducer.is_local else self._reducer, log)

    @property
    def held_back_check(self) -> HeldBackCheck:
        """The held-back check (its split, start, weight decay and result)."""
        return self._check

    @property
    def check_result(self) -> CheckResult | None:
        """The held-back check's figures (``UpperData(holdout=...)``), once it has run."""
        return self._check.result

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_check(trainer, pl_module)
        params = pl_module.autobalance_parameters()  # type: ignore[attr-defined]
        if self._check.result is None and (params.decision or {}).get("decision") == "pending":
            params.decision = None  # the search made no hyper step: there was nothing to rule on
        self._read(trainer)
        log, schedule = self._log, self._schedule
        if log.fit_attempted - log.fit_skipped > 0 or self._update is None or trainer.sanity_checking:
            return
        if schedule.end is not None and self._resumed_at >= schedule.end and self.hyper_steps > 0:
            return  # resumed after the search window: its hyper steps were made before the interruption
        if pl_module.autobalance_parameters().frozen:  # type: ignore[attr-defined]
            why = "the loss is frozen"
        elif self.skipped_steps:
            why = f"all {self.skipped_steps} hyper steps had a non-finite hypergradient and were skipped"
        else:
            why = schedule.why_no_step(trainer.global_step)
        rank_zero_warn(f"AutoBalance made no hyper step in this fit: {why}. The loss is unchanged. For a short fit "
                       "use AutoBalanceCallback(warmup_fraction=0.0) or a smaller every_n_steps.")

    # ------------------------------------------------------------------------------------------------------------
    # checkpointing
    # ------------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        self._read()
        update = self._update.state_dict() if self._update is not None else {"optimizer": None, "scheduler": None}
        return {
            "hyper_steps": self.hyper_steps,
            "skipped_steps": self.skipped_steps,
            "optimizer": update["optimizer"],
            "scheduler": update["scheduler"],
            "upper_stream": None if self._upper is None or self._upper.stream is None
            else self._upper.stream.state_dict(),
            "train_stream": self._train.state_dict() if self._train is not None else self._train_state,
            "check": self._check.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start, where the optimizer is built: apply it there.
        self._pending = dict(state_dict)
        self._log.restore(int(state_dict.get("hyper_steps", 0)), int(state_dict.get("skipped_steps", 0)))
        self._check.load_state_dict(state_dict.get("check"))

    def _apply_state(self, state: dict[str, Any]) -> None:
        if self._update is not None:
            self._update.load_state_dict(state)
        if state.get("upper_stream") is not None and self._upper is not None and self._upper.stream is not None:
            self._upper.stream.load_state_dict(state["upper_stream"])
        self._train_state = state.get("train_stream")
