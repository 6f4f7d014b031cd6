r"""
AutoBalance
^^^^^^^^^^^

Learn the training loss while the model trains: every ``every_n_steps`` optimizer steps, take the hypergradient of
an objective measured on held-out ("upper") data with respect to the loss parameters of an
:class:`~lightning_autobalance.AutoBalanceMixin` module and update them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.callback import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_autobalance.batch_stream import BatchStream
from lightning_autobalance.data.fold_in import find_fold_in_sampler
from lightning_autobalance.estimator import Estimator
from lightning_autobalance.hypergradient import Batch, FunctionalModel, hypergradient
from lightning_autobalance.mixin import AutoBalanceMixin
from lightning_autobalance.objectives import (
    Objective,
    across_processes,
    build_objective,
    check_objective,
    resolve_objective,
)

log = logging.getLogger(__name__)

__all__ = ["AutoBalanceCallback"]

OptimizerCallable = Callable[[Iterable], Optimizer]
SchedulerCallable = Callable[[Optimizer], Any]
UpperSource = Literal["auto", "datamodule", "dataloader", "val"]
LrSchedule = Literal["cosine", "constant"]


def _sharded_strategies() -> tuple[type, ...]:
    """Strategies the hypergradient cannot run under (the model sharded across processes, or XLA), from
    ``pytorch_lightning`` and, when installed, the unified ``lightning`` package (separate classes)."""
    import importlib

    found: list[type] = []
    for package in ("pytorch_lightning.strategies", "lightning.pytorch.strategies"):
        try:
            module = importlib.import_module(package)
        except ImportError:
            continue
        for name in ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAStrategy",
                     "SingleDeviceXLAStrategy"):
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                found.append(cls)
    return tuple(found)


_UNSUPPORTED = _sharded_strategies()
#: The automatic schedule never takes a hyper step more often than this many optimizer steps apart once the run is
#: long enough: a default hyper step costs about 1.4-1.8 plain steps, so 20 keeps a search epoch within 1.10 plain
#: epochs (benchmarks/speed.py).
MAX_AUTO_INTERVAL = 20
#: In a one-phase run (a :class:`~lightning_autobalance.data.fold_in.FoldInSampler` in the training data) the
#: automatic schedule makes at most this share of the run's optimizer steps hyper steps, so that the whole run costs
#: at most about 1.1 plain trainings (benchmarks/speed.py --one-phase).
ONE_PHASE_HYPER_SHARE = 0.05
#: Hyper steps whose figures wait on the device before they are read back in one transfer (also read at the end of
#: every epoch and of the fit).
_READ_EVERY = 64


def auto_interval(window_steps: int, target_hyper_steps: int, upper_batches_per_pass: int = 1) -> int:
    """The interval (in optimizer steps) between hyper steps that the callback chooses when ``every_n_steps`` is
    not given.

    The rule: aim for ``max(target_hyper_steps, 2 * upper_batches_per_pass)`` hyper steps in the window of
    optimizer steps where the search is active (after the warm-up, before any stop), i.e. an interval of
    ``window_steps // aim``, clipped to ``[1, MAX_AUTO_INTERVAL]``. A short run or a small dataset therefore steps
    often (down to every optimizer step) and still makes enough hyper steps to move; a long one steps every 20
    optimizer steps, which bounds the overhead; the upper split is drawn at least twice when the run allows.

    Example:
        >>> auto_interval(128, 200)      # a 40-epoch search on 280 digits: every step
        1
        >>> auto_interval(750, 200)      # 12 CIFAR-10-LT epochs: every 3 steps
        3
        >>> auto_interval(18_700, 200)   # 300 CIFAR-10-LT epochs: every 20 steps
        20
    """
    aim = max(int(target_hyper_steps), 2 * int(upper_batches_per_pass), 1)
    return int(min(max(window_steps // aim, 1), MAX_AUTO_INTERVAL))


def _cosine_factor(step: int, total: int) -> float:
    """Cosine decay of the hyper learning rate from 1 to 0 over ``total`` hyper steps (then 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _default_hyper_optimizer(lr: float) -> OptimizerCallable:
    return functools.partial(torch.optim.Adam, lr=lr)  # a partial, not a closure: ddp_spawn pickles callbacks


@contextlib.contextmanager
def _preserve_random_state(device: torch.device) -> Iterator[None]:
    """Restores torch (CPU and the current CUDA device), Python and NumPy random states after the block."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


def _autobalance_forward(module: Any, inputs: Any) -> Tensor:
    return module.autobalance_forward(inputs)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _check_labels(labels: Tensor, num_classes: int) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"The upper data has labels from {int(labels.min())} to {int(labels.max())}, but the loss has "
                         f"{num_classes} classes (class_counts given to configure_autobalance has {num_classes} "
                         f"entries): expected labels in [0, {num_classes}). Give one count per class of the data.")


def _objective_name(objective: Any) -> str | None:
    if not isinstance(objective, str):
        return None
    try:
        return resolve_objective(objective)
    except ValueError:
        return None


class _ScalarObjective:
    """Calls the upper objective and checks that it returns a scalar tensor, with a message that names it."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.requires_all_classes = getattr(objective, "requires_all_classes", False)

    def __call__(self, logits: Tensor, target: Tensor, group: Tensor | None) -> Tensor:
        out = self.objective(logits, target, group)
        if not isinstance(out, Tensor) or out.ndim != 0:
            what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
            raise ValueError(f"AutoBalanceCallback: the upper objective {self.objective!r} returned {what}; it must "
                             "return a scalar (0-dimensional) tensor that depends on the logits, e.g. the mean of "
                             "per-sample losses (`.mean()`).")
        return out

    def __repr__(self) -> str:
        return repr(self.objective)


class AutoBalanceCallback(Callback):
    r"""Searches the loss parameters of an :class:`~lightning_autobalance.AutoBalanceMixin` module by bilevel
    optimisation while the Trainer fits the model.

    Every ``every_n_steps`` optimizer steps (not micro-batches: under gradient accumulation it acts once per step)
    it computes the gradient of the upper objective with respect to the loss parameters (see
    :func:`~lightning_autobalance.hypergradient.hypergradient`) and takes one step of its own optimizer on them.
    With no arguments it uses the cheapest estimate that works well: the first Neumann term (the one-step
    hypergradient at the current weights) on the current training batch, whose logits the training step already
    computed, and one upper batch, with the logits product taken as a difference of logits. That costs about one
    extra forward and backward pass per hyper step.

    **Schedule sized to the run.** Without ``every_n_steps`` the interval follows :func:`auto_interval`: about
    ``target_hyper_steps`` hyper steps in the active window, never more often than every optimizer step nor less
    often than every 20. At the start of fit the callback says (rank zero, once) how many hyper steps the run will
    make; at the end it warns when it made none, and why. The hyper learning rate decays along a cosine over the
    planned hyper steps (``hyper_lr_schedule``), so the loss settles instead of random-walking around its optimum.

    **A clean signal.** Three things keep the few held-out images of tail classes from steering the search:
    upper batches are class-balanced (``balanced_upper``: every class equally often, its images repeated; the upper
    split is used whole when it fits in one batch); the default parametrisation
    (:class:`~lightning_autobalance.parametrization.Hierarchical`) moves all classes together through shared
    scalars; and per-class values are shrunk towards their start in inverse proportion to their upper counts
    (``shrinkage``).

    **One-phase runs.** When the training dataloader draws through a
    :class:`~lightning_autobalance.data.fold_in.FoldInSampler` (e.g. a long-tailed datamodule with
    ``fold_in_epoch``), the search stops at the sampler's fold-in epoch, where the upper split joins the training
    data, and the automatic schedule makes at most 5% of the run's optimizer steps hyper steps
    (``ONE_PHASE_HYPER_SHARE``), so that the single run costs about 1.1 plain trainings. A ``stop_epoch`` or
    ``stop_step`` after the fold-in is refused at the start of fit.

    The extra passes run on the unwrapped module with copies of its buffers (BatchNorm statistics are untouched),
    in the precision plugin's forward context (autocast), from and back to the training loop's random state; the
    loss-parameter arithmetic stays in float32 or wider. A non-finite hypergradient skips that step with a
    warning: the loss parameters keep their values (the hyper-optimizer sees a zero gradient there).

    **No host round-trips.** A hyper step reads nothing back from the device: the finiteness check, gradient
    clipping and skip act on device tensors, and the step's figures (objective, hypergradient norm, loss
    parameters) stay there until they are read in one transfer, at the end of each epoch and of the fit, every 64
    hyper steps, or when an attribute such as :attr:`hyper_steps` is read. Loggers receive them then, with their
    own step numbers. Under DDP every linear piece is averaged over processes so that the loss parameters stay identical
    on every rank.

    Args:
        every_n_steps: take a hyper step every this many optimizer steps (``k >= 1``). ``None`` (default): chosen
            from the run, see :func:`auto_interval`.
        target_hyper_steps: the number of hyper steps the automatic schedule aims for (``>= 1``).
        start_epoch: first epoch with hyper steps. ``None``: see ``warmup_fraction``.
        start_step: first optimizer step with hyper steps (overrides ``start_epoch``).
        stop_epoch: no hyper steps from this epoch on (``None``: until the end).
        stop_step: no hyper steps from this optimizer step on.
        warmup_fraction: when neither ``start_epoch`` nor ``start_step`` is given, the fraction of the run's
            optimizer steps (``trainer.estimated_stepping_batches``) to train before the first hyper step.
        estimator: how the hypergradient is estimated: an :class:`~lightning_autobalance.estimator.Estimator`
            (method ``"neumann"``, ``"cg"`` or ``"unroll"``, ``eta``, ``terms``, ``damping``, ``cg_iterations``,
            ``curvature``, ``product``, ``weight_decay``), validated when built; from YAML a nested group,
            ``estimator: {method: cg, cg_iterations: 10}``. Default: ``Estimator()``, the one-step Neumann
            estimate with the logits product taken as a difference.
        train_batches: training batches per hyper step; the current batch is the first, the others are drawn
            from the training data (the paper uses 10).
        upper_batches: upper batches per hyper step (the paper uses 10).
        hyper_lr: learning rate of the default hyper-optimizer, Adam (``None``: 0.02). Adam rather than SGD with
            momentum: the size of the hypergradient shrinks by more than an order of magnitude as the training set is
            fitted, so no single SGD learning rate suits a whole run (``docs/tuning.md``).
        hyper_optimizer: a callable ``params -> torch.optim.Optimizer`` replacing the default (from a LightningCLI
            YAML: ``class_path: torch.optim.SGD`` with ``init_args: {lr: 0.01, momentum: 0.9}``); it carries its
            own learning rate, so giving ``hyper_lr`` too is an error.
        hyper_scheduler: a callable ``optimizer -> scheduler``, stepped after every hyper step (replaces
            ``hyper_lr_schedule``).
        hyper_lr_schedule: ``"cosine"`` (default): the hyper learning rate decays from its value to 0 along a cosine
            over the planned hyper steps (constant when the run's length is unknown); ``"constant"``: no decay.
        shrinkage: after every hyper step each per-class free value ``a`` informed by ``n`` upper samples is
            pulled towards its start: ``a <- a * max(0, 1 - lr * shrinkage / n)`` (decoupled, like AdamW's weight
            decay; ``lr`` the current hyper learning rate). Under a consistent signal a value then settles at most
            about ``n / shrinkage`` from its start; under noise it stays near it. Shared scalars are not shrunk.
            ``0`` turns it off.
        balanced_upper: draw class-balanced upper batches (every class equally often; the named objectives then
            weigh classes equally) when the upper split is larger than one batch and its batches carry no groups.
        max_norm: clip the hypergradient to this norm (``None``: no clipping).
        objective: the upper objective: a name from :data:`~lightning_autobalance.objectives.OBJECTIVES`
            (``"balanced_ce"``, ``"worst_class"``, ``"worst_group"``, ``"deo"``, ``"blend"``) or a callable
            ``objective(logits, target, group) -> scalar``. Named objectives are built at setup from the counts of
            the upper data: per class, or per (group, class) cell when the upper batches carry groups.
        objective_kwargs: settings of a named objective (e.g. ``{"lam": 0.5, "fairness": "deo"}`` for ``"blend"``,
            ``{"temperature": 0.1}`` for ``"worst_group"``); checked at construction. Under DDP every named
            objective is that of the union of the processes' upper batches (the per-unit ones sum their statistics
            over processes, see :func:`~lightning_autobalance.objectives.across_processes`); a callable is
            evaluated per process and its gradients averaged.
        upper_source: where upper batches come from: ``"datamodule"`` (its ``upper_dataloader()`` hook, or the
            LightningModule's), ``"dataloader"`` (``upper_dataloader`` below), ``"val"`` (the validation
            dataloader, with a warning: the loss is then tuned on the data that is used to judge it) or
            ``"auto"`` (the first of these that exists).
        upper_dataloader: an explicit upper dataloader.
        upper_class_counts: class counts of the upper data (default: from the datamodule, the dataset's
            ``targets``, or by reading the labels once).
        log_max_classes: log every loss parameter per class up to this many classes, else summaries.
        seed: seeds the order of upper (and extra training) batches.

    Example::

        from pytorch_lightning import Trainer
        from lightning_autobalance import AutoBalanceCallback

        trainer = Trainer(max_epochs=30, callbacks=[AutoBalanceCallback()])
        trainer.fit(model, datamodule=dm)  # model: an AutoBalanceMixin LightningModule
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        target_hyper_steps: int = 200,
        start_epoch: int | None = None,
        start_step: int | None = None,
        stop_epoch: int | None = None,
        stop_step: int | None = None,
        warmup_fraction: float = 0.2,
        estimator: Estimator | None = None,
        train_batches: int = 1,
        upper_batches: int = 1,
        hyper_lr: float | None = None,
        hyper_optimizer: OptimizerCallable | None = None,
        hyper_scheduler: SchedulerCallable | None = None,
        hyper_lr_schedule: LrSchedule = "cosine",
        shrinkage: float = 16.0,
        balanced_upper: bool = True,
        max_norm: float | None = None,
        objective: str | Objective = "balanced_ce",
        objective_kwargs: dict[str, Any] | None = None,
        upper_source: UpperSource = "auto",
        upper_dataloader: DataLoader | None = None,
        upper_class_counts: list[int] | None = None,
        log_max_classes: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        checks = [
            (every_n_steps is None or every_n_steps >= 1,
             f"every_n_steps must be at least 1 (or None for the automatic schedule); got {every_n_steps}."),
            (target_hyper_steps >= 1, f"target_hyper_steps must be at least 1; got {target_hyper_steps}."),
            (hyper_lr_schedule in ("cosine", "constant"),
             f"hyper_lr_schedule must be 'cosine' or 'constant'; got {hyper_lr_schedule!r}."),
            (shrinkage >= 0, f"shrinkage must be >= 0; got {shrinkage}."),
            (estimator is None or isinstance(estimator, Estimator),
             f"estimator must be an lightning_autobalance.Estimator; got {type(estimator).__name__}."),
            (train_batches >= 1 and upper_batches >= 1,
             f"train_batches and upper_batches must be at least 1; got {train_batches}, {upper_batches}."),
            (0.0 <= warmup_fraction < 1.0, f"warmup_fraction must lie in [0, 1); got {warmup_fraction}."),
            (hyper_lr is None or hyper_lr > 0, f"hyper_lr must be positive; got {hyper_lr}."),
            (hyper_lr is None or hyper_optimizer is None,
             f"give hyper_lr ({hyper_lr}) or hyper_optimizer, not both: the optimizer carries its own learning "
             "rate."),
            (max_norm is None or max_norm > 0, f"max_norm must be positive or None; got {max_norm}."),
            (upper_source in ("auto", "datamodule", "dataloader", "val"),
             f"upper_source must be 'auto', 'datamodule', 'dataloader' or 'val'; got {upper_source!r}."),
            (upper_source != "dataloader" or upper_dataloader is not None,
             "upper_source='dataloader' needs an upper_dataloader."),
            (log_max_classes >= 0, f"log_max_classes must be >= 0; got {log_max_classes}."),
        ]
        for start, stop, name in ((start_epoch, stop_epoch, "epoch"), (start_step, stop_step, "step")):
            checks.append((start is None or start >= 0, f"start_{name} must be >= 0; got {start}."))
            checks.append((stop is None or start is None or stop > start,
                           f"stop_{name} ({stop}) must come after start_{name} ({start})."))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if not (isinstance(objective, str) or callable(objective)):
            raise ValueError(f"objective must be a name or a callable; got {type(objective).__name__}.")
        if objective_kwargs is not None and not isinstance(objective_kwargs, Mapping):
            raise ValueError(f"objective_kwargs must be a mapping of settings; got {type(objective_kwargs).__name__}.")
        check_objective(objective, **dict(objective_kwargs or {}))  # an unknown name or bad settings fail here
        self.every_n_steps = every_n_steps
        self.target_hyper_steps = target_hyper_steps
        self.hyper_lr_schedule = hyper_lr_schedule
        self.shrinkage = shrinkage
        self.balanced_upper = balanced_upper
        self.start_epoch, self.start_step = start_epoch, start_step
        self.stop_epoch, self.stop_step = stop_epoch, stop_step
        self.warmup_fraction = warmup_fraction
        self.estimator = estimator if estimator is not None else Estimator()
        self.train_batches, self.upper_batches = train_batches, upper_batches
        self.hyper_lr = hyper_lr
        self._hyper_optimizer_fn = hyper_optimizer or _default_hyper_optimizer(0.02 if hyper_lr is None else hyper_lr)
        self._hyper_scheduler_fn = hyper_scheduler
        self.max_norm = max_norm
        self.objective = objective
        self.objective_kwargs = dict(objective_kwargs or {})
        self.upper_source = upper_source
        self.upper_dataloader = upper_dataloader
        self.upper_class_counts = upper_class_counts
        self.log_max_classes = log_max_classes
        self.seed = seed

        self._attempted = 0  # hyper steps taken, finite or not (host count)
        self._skipped = 0  # of those, skipped (known once their records are read)
        self._last_objective: float | None = None
        self._records: list[tuple[int, list[str], Tensor]] = []  # (step, names, values) not read yet
        self._fmodel: FunctionalModel | None = None  # the module as a function of its weights, built once a fit
        self.optimizer: Optimizer | None = None
        self.scheduler: Any = None
        self._objective_fn: Objective | None = None
        self._upper: BatchStream | None = None
        self._train: BatchStream | None = None
        self._auto_start_step = 0
        self._interval = every_n_steps or 1
        self._planned: int | None = None
        self._window: tuple[int, int | None] = (0, None)
        self._fit_attempted = 0
        self._fit_skipped = 0
        self._shrink_counts: dict[str, Tensor] = {}
        self._pending: dict[str, Any] | None = None
        self._batch: Any = None
        self._batch_rng: tuple[Tensor, Tensor | None] | None = None
        self._warned_frozen = False
        self._train_state: dict[str, int] | None = None
        self._fold_in_epoch: int | None = None
        self._resumed_at = 0

    @property
    def hyper_steps(self) -> int:
        """Hyper steps that updated the loss parameters (skipped ones excluded), over every fit of this callback."""
        self._read()
        return self._attempted - self._skipped

    @property
    def skipped_steps(self) -> int:
        """Hyper steps skipped for a non-finite hypergradient."""
        self._read()
        return self._skipped

    @property
    def last_objective(self) -> float | None:
        """The upper objective's value at the latest hyper step (None before the first)."""
        self._read()
        return self._last_objective

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps or "auto", method=self.estimator.method)

    # ------------------------------------------------------------------------------------------------------
    # setup: every check before any training time is spent
    # ------------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(pl_module, AutoBalanceMixin):
            raise TypeError(f"AutoBalanceCallback needs a LightningModule that inherits AutoBalanceMixin; "
                            f"{type(pl_module).__name__} does not. Add the mixin and call configure_autobalance().")
        params = pl_module.autobalance_parameters()
        if isinstance(trainer.strategy, _UNSUPPORTED):
            strategy = type(trainer.strategy).__name__
            raise RuntimeError(f"AutoBalanceCallback does not support the sharded strategy {strategy}: the "
                               "hypergradient needs the whole model on every process. Use strategy='ddp' (or "
                               "'ddp_spawn') or a single device.")
        if params.num_free() == 0:
            rank_zero_warn("The AutoBalance loss has nothing to search (search=() or a loaded loss): the callback "
                           "will do nothing.")
        loader = self._resolve_upper_loader(trainer, pl_module)
        # Every process must learn about a process without upper data, or the others would wait for it forever.
        try:
            self._upper = BatchStream(loader, seed=self.seed, rank=trainer.global_rank, world_size=trainer.world_size)
            batches, error = self._upper.batches_per_pass(), None
        except ValueError as err:
            batches, error = 0, err
        self._check_ranks_agree(trainer, batches)
        if error is not None:
            raise error
        counts, cells = self._upper_counts(trainer, pl_module, loader)
        num_classes = params.num_classes
        if counts is not None and len(counts) != num_classes:
            raise ValueError(f"The upper data's class counts have {len(counts)} entries, but class_counts given to "
                             f"configure_autobalance has {num_classes}: they must have one entry per class.")
        needs_all = isinstance(self.objective, str) or getattr(self.objective, "requires_all_classes", False)
        if counts is not None and min(counts) == 0 and needs_all:
            missing = [c for c, n in enumerate(counts) if n == 0]
            longer = (f" The loss has {num_classes} classes (len(class_counts)); if the data has fewer, class_counts "
                      "is too long." if missing == list(range(missing[0], num_classes)) else "")
            raise ValueError(f"The upper data has no sample of classes {missing}, which the objective "
                             f"{self.objective!r} needs: give every class at least one upper sample, e.g. with a "
                             "per-class split: `lower, upper, class_counts, _ = "
                             f"lightning_autobalance.data.search_split(train_dataset)`.{longer}")
        if cells is not None and params.num_groups > 1 and len(cells) != params.num_groups:
            raise ValueError(f"The upper data has {len(cells)} groups, the loss has num_groups={params.num_groups}.")
        table: Any = cells if cells is not None else counts
        self._shrink_counts = params.free_value_counts(torch.as_tensor(
            table if table is not None else params.class_counts.sum(0).tolist(), dtype=torch.float64))
        if self.balanced_upper and cells is None and batches > 1:
            labels = self._upper_labels(trainer, pl_module, loader, num_classes)
            self._upper = BatchStream(loader, seed=self.seed, rank=trainer.global_rank,
                                      world_size=trainer.world_size, labels=labels)
            if self._upper.balanced and table is not None:
                # Every class is drawn equally often: the objective weighs the classes equally.
                table = [1 if n > 0 else 0 for n in table]
        try:
            objective = build_objective(self.objective, table if table is not None else
                                        params.class_counts.sum(0).tolist(), **self.objective_kwargs)
        except ValueError as err:
            groups = "" if cells is not None or not isinstance(self.objective, str) else (
                " (the upper batches carry no groups: group objectives need (x, y, g) batches)")
            raise ValueError(f"AutoBalanceCallback: the upper objective {self.objective!r} does not fit the upper "
                             f"data{groups}: {err}") from err
        self._objective_fn = _ScalarObjective(objective)

    def _resolve_upper_loader(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        source = self.upper_source
        if self.upper_dataloader is not None and source in ("auto", "dataloader"):
            return self.upper_dataloader
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
        source = trainer.fit_loop.epoch_loop.val_loop._data_source
        if source.is_defined():
            with contextlib.suppress(NotImplementedError, pl.utilities.exceptions.MisconfigurationException):
                val = source.dataloader()
        if isinstance(val, (list, tuple)):
            val = val[0] if val else None
        if val is None:
            raise RuntimeError("AutoBalanceCallback found no upper data: give the datamodule (or the LightningModule) "
                               "an upper_dataloader() method, pass upper_dataloader=..., or provide a validation "
                               "dataloader.")
        rank_zero_warn("AutoBalanceCallback is using the validation dataloader as upper data: the loss will be "
                       "tuned on the data used to judge it. Prefer a held-out split (upper_dataloader).")
        return val

    def _upper_counts(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      loader: Any) -> tuple[list[int] | None, list[list[int]] | None]:
        """Class counts of the upper data and, when its batches carry groups, its ``G x K`` (group, class) counts.

        From ``upper_class_counts``, the datamodule's ``upper_class_counts`` / ``upper_group_counts``, the dataset's
        ``targets`` / ``groups`` attributes, or by reading the labels (and groups) once.
        """
        params = pl_module.autobalance_parameters()  # type: ignore[attr-defined]
        datamodule = trainer.datamodule
        from_datamodule = loader is not self.upper_dataloader
        num_groups = params.num_groups if params.num_groups > 1 else self.objective_kwargs.get("num_groups")
        if num_groups is None and from_datamodule:
            num_groups = getattr(datamodule, "num_groups", None)
        counts: list[int] | None = None
        cells: list[list[int]] | None = None
        if self.upper_class_counts is not None:
            counts = [int(c) for c in self.upper_class_counts]
        elif from_datamodule and getattr(datamodule, "upper_class_counts", None) is not None:
            counts = [int(c) for c in datamodule.upper_class_counts]
        if from_datamodule and getattr(datamodule, "upper_group_counts", None) is not None:
            cells = [[int(c) for c in row] for row in datamodule.upper_group_counts]
        named = _objective_name(self.objective)
        wants_cells = params.num_groups > 1 or (named is not None and named != "balanced_ce") or (
            self.objective_kwargs.get("over") == "cell")
        if counts is None or (cells is None and wants_cells):
            read_counts, cells = self._read_groups(pl_module, loader, params.num_classes, num_groups)
            counts = read_counts if counts is None else counts
        return counts, cells

    def _upper_labels(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loader: Any,
                      num_classes: int) -> Tensor:
        """The label of every upper sample in dataset order: the datamodule's ``upper_targets``, the dataset's
        ``targets``, or read once."""
        dataset = getattr(loader, "dataset", None)
        targets = None
        if loader is not self.upper_dataloader:
            targets = getattr(trainer.datamodule, "upper_targets", None)
        if targets is None:
            targets = getattr(dataset, "targets", None)
        if targets is None or dataset is None or len(targets) != len(dataset):
            return self._read_labels(pl_module, loader, num_classes)[0]
        return torch.as_tensor(targets).long().flatten()

    def _read_labels(self, pl_module: pl.LightningModule, loader: Any,
                     num_classes: int) -> tuple[Tensor, Tensor | None]:
        """Labels (and groups) of the whole upper dataset, read once per loader (counts and class-balanced batches
        both need them)."""
        cached = self.__dict__.get("_labels_read")
        if cached is not None and cached[0] is loader:
            return cached[1], cached[2]
        dataset = getattr(loader, "dataset", None)
        parts, group_parts = [], []
        # Read the whole dataset (not one process's shard) in order; a loader draws from the global RNG.
        reader = loader
        if dataset is not None:
            reader = DataLoader(dataset, batch_size=256, collate_fn=getattr(loader, "collate_fn", None))
        with _preserve_random_state(torch.device("cpu")):
            for batch in reader:
                _, y, g = pl_module.autobalance_unpack(batch)  # type: ignore[attr-defined]
                parts.append(torch.as_tensor(y).long().cpu())
                if g is not None:
                    group_parts.append(torch.as_tensor(g).long().cpu())
        labels = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        groups = torch.cat(group_parts) if group_parts and len(group_parts) == len(parts) else None
        _check_labels(labels, num_classes)
        self._labels_read = (loader, labels, groups)
        return labels, groups

    def _read_groups(self, pl_module: pl.LightningModule, loader: Any, num_classes: int,
                     num_groups: int | None) -> tuple[list[int], list[list[int]] | None]:
        """Reads the labels (and groups) of the upper data: from the dataset's ``targets`` and ``groups`` attributes,
        or by reading the whole dataset once."""
        dataset = getattr(loader, "dataset", None)
        targets = getattr(dataset, "targets", None)
        group_ids = getattr(dataset, "groups", None)
        if targets is not None:
            labels = torch.as_tensor(targets).long().flatten()
            groups = None if group_ids is None else torch.as_tensor(group_ids).long().flatten()
        else:
            labels, groups = self._read_labels(pl_module, loader, num_classes)
        _check_labels(labels, num_classes)
        counts = torch.bincount(labels, minlength=num_classes).tolist()
        if groups is None or groups.numel() != labels.numel():
            return counts, None
        if groups.numel() and groups.min() < 0:
            raise ValueError("The upper data has negative group indices.")
        g = int(num_groups) if num_groups is not None else int(groups.max()) + 1 if groups.numel() else 1
        if groups.numel() and groups.max() >= g:
            raise ValueError(f"The upper data has group indices outside [0, {g}) ({g} groups).")
        cells = torch.bincount(groups * num_classes + labels, minlength=g * num_classes).view(g, num_classes)
        return counts, cells.tolist()

    def _check_ranks_agree(self, trainer: pl.Trainer, batches: int) -> None:
        if trainer.world_size <= 1:
            return
        sizes = trainer.strategy.all_gather(torch.tensor([batches], device=trainer.strategy.root_device)).flatten()
        if int(sizes.min()) == 0 or int(sizes.min()) != int(sizes.max()):
            raise RuntimeError(f"Every process needs upper data, and the same number of upper batches; got "
                               f"{sizes.tolist()} batches per pass across ranks.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = pl_module.autobalance_parameters()  # type: ignore[attr-defined]
        alpha = list(params.alpha().values())
        self.optimizer = self._hyper_optimizer_fn(alpha) if alpha else None
        self.scheduler = self._hyper_scheduler_fn(self.optimizer) if (self._hyper_scheduler_fn and alpha) else None
        total = trainer.estimated_stepping_batches
        if self.start_step is None and self.start_epoch is None:
            self._auto_start_step = int(self.warmup_fraction * total) if math.isfinite(total) else 0
        self._check_fold_in(trainer, total)
        self._plan(trainer, total)
        if (self._hyper_scheduler_fn is None and self.hyper_lr_schedule == "cosine" and self.optimizer is not None
                and self._planned):
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, functools.partial(_cosine_factor, total=self._planned))
        self._fit_attempted = self._fit_skipped = 0
        self._fmodel = None
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        self._announce(trainer, pl_module)

    def _check_fold_in(self, trainer: pl.Trainer, total: float) -> None:
        """Finds a one-phase run's fold-in epoch (a FoldInSampler in the training data): the search stops there."""
        sampler = find_fold_in_sampler(trainer.train_dataloader)
        self._fold_in_epoch = None if sampler is None else sampler.fold_in_epoch
        if self._fold_in_epoch is None:
            return
        fold = self._fold_in_epoch
        per_epoch = self._steps_per_epoch(trainer, total)
        late = []
        if self.stop_epoch is not None and self.stop_epoch > fold:
            late.append(f"stop_epoch={self.stop_epoch}")
        if self.stop_step is not None and per_epoch is not None and self.stop_step > fold * per_epoch:
            late.append(f"stop_step={self.stop_step}")
        if late:
            raise ValueError(f"AutoBalanceCallback: {' and '.join(late)} would go on searching after epoch {fold}, "
                             "where the training data's FoldInSampler folds the upper split into training (the loss "
                             "would then be tuned on data the model trains on). Leave stop_epoch/stop_step unset: "
                             "the search stops at the fold-in by itself.")

    def _steps_per_epoch(self, trainer: pl.Trainer, total: float) -> float | None:
        epochs = trainer.max_epochs
        if epochs is not None and epochs > 0 and math.isfinite(total):
            return total / epochs
        return None

    def _plan(self, trainer: pl.Trainer, total: float) -> None:
        """Resolves the active window ``[first, end)`` in optimizer steps, the interval and the planned number of
        hyper steps (``None`` when the run's length is unknown)."""
        per_epoch = self._steps_per_epoch(trainer, total)
        if self.start_step is not None:
            first = self.start_step
        elif self.start_epoch is not None:
            first = int(self.start_epoch * per_epoch) if per_epoch is not None else None
        else:
            first = self._auto_start_step
        ends = [total] if math.isfinite(total) else []
        if self.stop_step is not None:
            ends.append(self.stop_step)
        if self.stop_epoch is not None and per_epoch is not None:
            ends.append(self.stop_epoch * per_epoch)
        if self._fold_in_epoch is not None and per_epoch is not None:
            ends.append(self._fold_in_epoch * per_epoch)
        end = int(min(ends)) if ends else None
        self._window = (first or 0, end)
        if first is None or end is None:
            self._interval, self._planned = self.every_n_steps or MAX_AUTO_INTERVAL, None
            return
        window = max(end - first, 0)
        upper = self._upper.batches_per_pass() if self._upper is not None else 1
        self._interval = self.every_n_steps or auto_interval(window, self.target_hyper_steps, upper)
        if self.every_n_steps is None and self._fold_in_epoch is not None:
            cap = max(int(ONE_PHASE_HYPER_SHARE * total), 1)  # one-phase: bound the cost of the whole run
            self._interval = max(self._interval, -(-window // cap))
        # Steps s in [first, end) with (s + 1) % interval == 0.
        self._planned = max((end // self._interval) - (first // self._interval), 0)

    def _announce(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        first, end = self._window
        how = "every_n_steps" if self.every_n_steps else "auto"
        if self._planned is None:
            rank_zero_info(f"AutoBalance: a hyper step every {self._interval} optimizer steps ({how}) from step "
                           f"{first}; the run's length is unknown, so the number of hyper steps is too.")
        else:
            rank_zero_info(f"AutoBalance: {self._planned} hyper steps planned, every {self._interval} optimizer steps "
                           f"({how}) in steps [{first}, {end}) of this fit.")
        if self._fold_in_epoch is not None:
            rank_zero_info(f"AutoBalance: one-phase run: the search stops at epoch {self._fold_in_epoch}, where the "
                           "training data's FoldInSampler folds the upper split into training.")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fold_in_epoch is not None and trainer.current_epoch == self._fold_in_epoch:
            rank_zero_info(f"AutoBalance: epoch {self._fold_in_epoch}: the upper split is now trained on; the loss "
                           f"stays as the search left it ({self.hyper_steps} hyper steps).")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resumed_at = trainer.global_step  # restored from a checkpoint by now

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read(trainer)
        if self._fit_attempted - self._fit_skipped > 0 or self.optimizer is None or trainer.sanity_checking:
            return
        end = self._window[1]
        if end is not None and self._resumed_at >= end and self.hyper_steps > 0:
            return  # resumed after the search window: its hyper steps were made before the interruption
        params = pl_module.autobalance_parameters()  # type: ignore[attr-defined]
        first = self._window[0]
        if params.frozen:
            why = "the loss is frozen"
        elif self.skipped_steps:
            why = f"all {self.skipped_steps} hyper steps had a non-finite hypergradient and were skipped"
        elif trainer.global_step <= first:
            why = (f"the fit ended at optimizer step {trainer.global_step}, before the search starts (step {first}: "
                   "see start_epoch / start_step / warmup_fraction)")
        else:
            why = (f"no optimizer step in [{first}, {trainer.global_step}) was due (every {self._interval} steps; "
                   "see every_n_steps, stop_epoch / stop_step)")
        rank_zero_warn(f"AutoBalance made no hyper step in this fit: {why}. The loss is unchanged. For a short fit "
                       "use AutoBalanceCallback(warmup_fraction=0.0) or a smaller every_n_steps.")

    # ------------------------------------------------------------------------------------------------------
    # schedule
    # ------------------------------------------------------------------------------------------------------
    def _active(self, trainer: pl.Trainer) -> bool:
        step, epoch = trainer.global_step, trainer.current_epoch
        if self.start_step is not None:
            started = step >= self.start_step
        elif self.start_epoch is not None:
            started = epoch >= self.start_epoch
        else:
            started = step >= self._auto_start_step
        stopped = (self.stop_step is not None and step >= self.stop_step) or (
            self.stop_epoch is not None and epoch >= self.stop_epoch) or (
            self._fold_in_epoch is not None and epoch >= self._fold_in_epoch)
        return started and not stopped

    def _due(self, trainer: pl.Trainer) -> bool:
        return (trainer.global_step + 1) % self._interval == 0 and self._active(trainer)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        due = self.optimizer is not None and self._due(trainer)
        pl_module.autobalance_request_logits(due)  # type: ignore[attr-defined]
        self._batch = batch if due else None
        self._batch_rng = _rng_state(pl_module.device) if due else None

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        if self._batch is None or self.optimizer is None:
            return
        params = pl_module.autobalance_parameters()  # type: ignore[attr-defined]
        if params.frozen:
            if not self._warned_frozen:
                rank_zero_info("AutoBalance: the loss is frozen, so no hyper steps are taken.")
                self._warned_frozen = True
        else:
            self._hyper_step(trainer, pl_module)
        self._batch = None
        pl_module.autobalance_request_logits(False)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------------------------------------------
    # the hyper step
    # ------------------------------------------------------------------------------------------------------
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

    def _reduce(self, trainer: pl.Trainer) -> Callable[[Tensor], Tensor] | None:
        if trainer.world_size <= 1:
            return None

        def reduce(t: Tensor) -> Tensor:
            return trainer.strategy.reduce(t, reduce_op="mean")

        return reduce

    def _check_batch_sizes(self, trainer: pl.Trainer, train: list[Batch], upper: list[Batch]) -> None:
        sizes = torch.tensor([sum(b.target.shape[0] for b in train), sum(b.target.shape[0] for b in upper)],
                             device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(sizes).reshape(-1, 2)
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"AutoBalance under DDP needs the same batch sizes on every process (for the "
                               f"averaged hypergradient to be that of the union of their batches); got (train, upper) "
                               f"{gathered.tolist()} across ranks. Use drop_last=True or equal shards.")

    def _hyper_step(self, trainer: pl.Trainer, pl_module: Any) -> None:
        assert self._upper is not None and self._objective_fn is not None and self.optimizer is not None
        params = pl_module.autobalance
        device = pl_module.device
        loss_scale = 1.0
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            loss_scale = float(scaler.get_scale())
        with _preserve_random_state(device), trainer.precision_plugin.forward_context(), torch.enable_grad():
            train = [self._as_batch(pl_module, self._batch, pl_module.autobalance_recorded_logits, self._batch_rng)]
            for _ in range(self.train_batches - 1):
                extra = trainer.strategy.batch_to_device(self._train_stream(trainer).next())
                train.append(self._as_batch(pl_module, extra))
            upper = [self._as_batch(pl_module, trainer.strategy.batch_to_device(self._upper.next()))
                     for _ in range(self.upper_batches)]
            if trainer.world_size > 1:
                self._check_batch_sizes(trainer, train, upper)
            if self._fmodel is None or self._fmodel.module is not pl_module:
                self._fmodel = FunctionalModel(pl_module, _autobalance_forward)
            fmodel = self._fmodel
            processes = contextlib.nullcontext()
            if trainer.world_size > 1:
                processes = across_processes(lambda t: trainer.strategy.reduce(t, reduce_op="sum"),
                                             trainer.world_size)
            with processes:
                result = hypergradient(
                    fmodel, params.alpha(), params.tables, pl_module.autobalance_loss_from_tables,
                    self._objective_fn, train, upper, self.estimator, reduce=self._reduce(trainer),
                    loss_scale=loss_scale)
        norm = self._update(params, result)
        self._attempted += 1
        self._fit_attempted += 1
        objective = result.objective.detach()
        pl_module.log("hyper_obj", objective.float(), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        names, values = ["finite", "autobalance/objective", "autobalance/hypergrad_norm"], [
            result.finite.double().reshape(1), objective.double().reshape(1), norm.reshape(1)]
        if trainer.loggers and trainer.global_rank == 0:
            more, tensors = self._parameter_values(params)
            names += more
            values += tensors
        self._records.append((trainer.global_step, names, torch.cat([v.to(values[0].device) for v in values])))
        if len(self._records) >= _READ_EVERY:
            self._read(trainer)

    def _update(self, params: Any, result: Any) -> Tensor:
        """One step of the hyper-optimizer on the loss parameters, skipped (the parameters restored) when the
        hypergradient is not finite; all on the device. Returns the hypergradient's norm (before clipping)."""
        assert self.optimizer is not None
        ok = result.finite
        grads = result.grad
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        factor = None
        if self.max_norm is not None:
            factor = torch.clamp(self.max_norm / norm, max=1.0)
        alpha = params.alpha()
        before = {name: tensor.detach().clone() for name, tensor in alpha.items()}
        for name, tensor in alpha.items():
            g = grads[name] if factor is None else grads[name] * factor.to(grads[name].dtype)
            tensor.grad = torch.where(ok, g, torch.zeros_like(g)).to(tensor)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._shrink(params, lr)
        with torch.no_grad():
            for name, tensor in alpha.items():
                tensor.copy_(torch.where(ok, tensor, before[name]))
        if self.scheduler is not None:
            self.scheduler.step()
        return norm  # type: ignore[return-value]

    def _read(self, trainer: pl.Trainer | None = None) -> None:
        """Brings the hyper steps' records to the host in one transfer: counts skipped steps (with a warning),
        keeps the last objective and hands the figures to the loggers."""
        if not self._records:
            return
        records, self._records = self._records, []
        flat = torch.cat([r[2].detach().double().cpu() for r in records]).tolist()
        loggers = trainer.loggers if trainer is not None and trainer.global_rank == 0 else []
        at = 0
        skipped_at = []
        for step, names, values in records:
            row = dict(zip(names, flat[at:at + values.numel()], strict=True))
            at += values.numel()
            if row.pop("finite") < 0.5:
                self._skipped += 1
                self._fit_skipped += 1
                skipped_at.append(step)
                row.pop("autobalance/hypergrad_norm")
            self._last_objective = row["autobalance/objective"]
            row["autobalance/skipped"] = float(self._skipped)
            for logger in loggers:
                logger.log_metrics(row, step=step)
        if skipped_at:
            where = f"step {skipped_at[0]}" if len(skipped_at) == 1 else f"steps {skipped_at}"
            rank_zero_warn(f"AutoBalance: non-finite hypergradient at {where}; hyper step skipped ({self._skipped} so "
                           "far). The loss parameters are unchanged.")

    @torch.no_grad()
    def _shrink(self, params: Any, lr: float) -> None:
        """Pulls each per-class free value towards its start by ``lr * shrinkage / n`` (``n``: its upper count)."""
        if self.shrinkage <= 0:
            return
        alpha = params.alpha()
        for name, counts in self._shrink_counts.items():
            value = alpha[name]
            factor = (1.0 - lr * self.shrinkage / counts.to(value).clamp(min=1.0)).clamp(min=0.0)
            value.mul_(factor)

    def _parameter_values(self, params: Any) -> tuple[list[str], list[Tensor]]:
        """Names and device values of the loss parameters' logged figures (tables per class, or their summary)."""
        names: list[str] = []
        values: list[Tensor] = []
        with torch.no_grad():
            tables = params.tables()
        k, g = params.num_classes, params.num_groups
        width = len(str(k - 1))
        for name, table in zip(("delta", "offset", "weight"), tables):
            if name not in params.search:
                continue
            table = table.detach().double()
            if k * g <= self.log_max_classes:
                for gi in range(g):
                    prefix = f"autobalance/{name}/" + (f"g{gi}_" if g > 1 else "")
                    names += [f"{prefix}{c:0{width}d}" for c in range(k)]
                    values.append(table[gi].flatten())
            else:
                names += [f"autobalance/{name}/{stat}" for stat in ("min", "max", "mean")]
                values.append(torch.stack([table.min(), table.max(), table.mean()]))
        for name, value in params.alpha().items():
            if value.ndim == 0:  # shared scalars (tau, gamma, omega)
                names.append(f"autobalance/{name}")
                values.append(value.detach().double().reshape(1))
        return names, values

    # ------------------------------------------------------------------------------------------------------
    # checkpointing
    # ------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        self._read()
        return {
            "hyper_steps": self.hyper_steps,
            "skipped_steps": self.skipped_steps,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "upper_stream": self._upper.state_dict() if self._upper is not None else None,
            "train_stream": self._train.state_dict() if self._train is not None else self._train_state,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start, where the optimizer is built: apply it there.
        self._pending = dict(state_dict)
        self._records = []
        self._skipped = int(state_dict.get("skipped_steps", 0))
        self._attempted = int(state_dict.get("hyper_steps", 0)) + self._skipped

    def _apply_state(self, state: dict[str, Any]) -> None:
        if state.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("upper_stream") is not None and self._upper is not None:
            self._upper.load_state_dict(state["upper_stream"])
        self._train_state = state.get("train_stream")
