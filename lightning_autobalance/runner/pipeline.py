"""The whole method from one call: search the loss, export it, retrain with it, test, compare with baselines.

Stages (each in its own folder of ``output_dir``, each resumable from its last checkpoint, each skipped when its
``result.json`` already exists and its fingerprint matches):

1. ``search``: fit on the lower part of the per-class split with :class:`~lightning_autobalance.AutoBalanceCallback`
   drawing upper batches from the held-out part; the found loss is written to ``found_loss.yaml``;
2. ``autobalance``: retrain from scratch on the whole training set with that loss frozen, then test;
3. with ``one_phase``, ``one_phase``: a single fit on the whole training set that searches the loss on the 80/20 split
   for the first ``fold_in`` share of the epochs, then folds the upper part into training with the loss frozen
   (:class:`~lightning_autobalance.data.fold_in.FoldInSampler`), then tests: one training run instead of two;
4. one stage per baseline (``ce``, ``la``, ``cdt``, ``vs``, ``class_balanced``, ``inverse_frequency``,
   ``ldam_drw``, ``focal``; with groups also ``group_balanced`` and ``group_dro``; beside a searched augmentation
   ``la_uniform`` and ``la_cuda``, the LA loss with the model's augmentation at its start strengths or under
   :class:`~lightning_autobalance.AugmentCurriculum`): train on the whole training set with that fixed loss, then
   test.

With a datamodule that has groups (``group_counts``, e.g. :class:`~lightning_autobalance.data.ColoredDigits`) and a
model that takes ``group_counts`` (:class:`~lightning_autobalance.ImbalancedClassifier`), every stage's model gets the
``G x K`` counts of its training set: the searched loss has class x group tables, the presets are built per
(group, class) cell, and the group metrics land in ``results.json``.

Finally ``results.json`` (balanced, per-class, head/medium/tail and worst-class errors; with groups also the
worst-group error, the per-cell and per-group errors and the equal-opportunity gap; the found loss, wall times),
``loss.png`` (the learned parameters against class frequency) and a table on the console.

**Runs you can trust.** Every stage records a fingerprint of what determines its result (``fingerprint.json``:
the model's and datamodule's arguments for that stage, the data's class counts, the trainer arguments that change
training, the epochs, the seed, the search's settings, the loss file a retraining uses, the library version; see
:mod:`lightning_autobalance.runner.fingerprint`). A rerun compares it before any training: equal means skip or resume,
different means a one-line refusal naming what changed and the two ways out (another ``output_dir``, or
``--restart STAGE`` / ``--restart all``: that stage, and those built on it, train again from scratch). The guard
fails closed: a stage folder holding work (a result or a checkpoint) whose fingerprint is missing or unreadable is
refused the same way, never reused. Paths are compared resolved (a folder given as a relative or an absolute path is
the same folder). A resumed stage therefore never loads an optimizer or scheduler built from another configuration.
Checkpoints are read with ``weights_only=True`` (tensors and plain values only): a pickled object in an output
folder never runs. An unreadable ``result.json``, ``last.ckpt`` or found loss file is named in a warning, moved
aside (``*.corrupt``) and replaced by the fallback: the previous epoch's checkpoint (``previous.ckpt``), else a fresh
start (a search's loss file is exported again from the search's checkpoint). Every argument is checked before
anything is written, and so is whatever a stage's fit would refuse at its start (a preflight fits each stage that is
to search up to its first optimizer step, saving nothing). A write that finds the disk full stops the run with
:class:`PipelineDiskFull`; the same command resumes it in place. One run per ``output_dir`` at a time
(:class:`~lightning_autobalance.runner.output_lock.OutputLock`;
a lock left by a killed run is taken over). A stage's ``fit_time_s`` is its total over interruptions (``attempts``
counts them), up to its last checkpoint in each.

Models and datamodules are re-created from their saved hyperparameters with a few overrides, so the model class
must take ``class_counts``, ``num_classes``, ``loss``, ``preset``, ``search``, ``loss_file`` and ``freeze_loss``
(as :class:`~lightning_autobalance.ImbalancedClassifier` does) and the datamodule ``search_split``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import importlib
import json
import logging
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    DeviceStatsMonitor,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelSummary,
    ProgressBar,
    Timer,
)
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters_context
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from lightning_autobalance.core.losses import load_loss_tables, preset_tables
from lightning_autobalance.data._checks import counts_disagreement, non_finite_sample
from lightning_autobalance.data.fold_in import DEFAULT_FOLD_IN, fold_in_epoch
from lightning_autobalance.lightning.callback import AutoBalanceCallback
from lightning_autobalance.lightning.classifier import loss_config
from lightning_autobalance.lightning.curriculum import AugmentCurriculum
from lightning_autobalance.runner.fingerprint import (
    IGNORED_DATA_KEYS,
    IGNORED_TRAINER_KEYS,
    callback_settings,
    changes,
    describe,
    file_digest,
    resolve_paths,
)
from lightning_autobalance.runner.output_lock import OutputFolderInUse, OutputLock

__all__ = ["BASELINES", "BASELINE_CALLBACKS", "AutoBalanceTrainer", "PipelineDiskFull", "PipelineSetupError",
           "no_space", "run_pipeline"]

#: Baseline name -> model overrides (a fixed loss, no search).
BASELINES: dict[str, dict[str, Any]] = {
    "ce": {"loss": "autobalance", "preset": "ce"},
    "la": {"loss": "autobalance", "preset": "la"},
    "cdt": {"loss": "autobalance", "preset": "cdt"},
    "vs": {"loss": "autobalance", "preset": "vs"},
    "class_balanced": {"loss": "autobalance", "preset": "class_balanced"},
    "inverse_frequency": {"loss": "autobalance", "preset": "inverse_frequency"},
    "ldam_drw": {"loss": "ldam"},
    "focal": {"loss": "focal"},
    # Group baselines (need a datamodule with groups, e.g. ColoredDigits, and a model taking group_counts):
    # per (class, group) cell weights N / (G K n_{g,y}); online group DRO over (label, group) cells.
    "group_balanced": {"loss": "autobalance", "preset": "group_balanced"},
    "group_dro": {"loss": "group_dro"},
    # Beside the searched augmentation, with the LA loss fixed: the same ops (the model's `augmentation` settings,
    # built frozen) at their start strengths for every class, never searched; and those ops under a per-class
    # curriculum of strength after CUDA (the stage's AugmentCurriculum, BASELINE_CALLBACKS).
    "la_uniform": {"loss": "autobalance", "preset": "la", "search": ("augment",), "freeze_loss": True},
    "la_cuda": {"loss": "autobalance", "preset": "la", "search": ("augment",), "freeze_loss": True},
}
#: Baseline name -> the callbacks (classes, built with their defaults) its stage trains with beside the trainer's.
BASELINE_CALLBACKS: dict[str, tuple[type[pl.Callback], ...]] = {"la_cuda": (AugmentCurriculum,)}
_GROUP_BASELINES = ("group_balanced", "group_dro")
#: Callbacks a stage replaces with its own: checkpoints go to the stage's folder, the config is saved once.
_DROPPED_CALLBACKS = (SaveConfigCallback, ModelCheckpoint)


#: the errors of a write that found no room: the disk is full, or the user's quota is spent
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def no_space(err: BaseException) -> OSError | None:
    """The ``OSError`` of a write that found no room (:data:`NO_SPACE`) in the chain of ``err`` (as Python prints it:
    causes and contexts), or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_SPACE:
            return current
        current = current.__cause__ or current.__context__
    return None


class PipelineDiskFull(OSError):
    """A write of the pipeline found no room (a full disk, a spent quota): the run stopped where it was, and the same
    command resumes it in place once there is space (every file is written whole or not at all). The CLI prints it in
    one line."""


class PipelineSetupError(ValueError):
    """A pipeline that cannot start as asked (a bad argument, an output folder holding another configuration's
    results, a folder in use by another run), raised before any training; the CLI prints it in one line."""


def _clone(template: Any, **overrides: Any) -> Any:
    hparams = getattr(template, "hparams", None)
    if not hparams:
        raise ValueError(f"The pipeline re-creates {type(template).__name__} for every stage from its saved "
                         "hyperparameters: call self.save_hyperparameters() in its __init__.")
    config = dict(hparams)
    instantiator = config.pop("_instantiator", None)
    if isinstance(instantiator, str):
        # Made by LightningCLI: the hyperparameters are its configuration, where a callable argument (e.g.
        # ``model.optimizer``, a ``network`` class) is still a ``class_path`` dict. Instantiate it as
        # ``load_from_checkpoint`` does, and keep that plain configuration as the new object's hyperparameters (so
        # its checkpoints load with ``weights_only=True`` and it can be cloned in turn).
        module_name, _, fn_name = instantiator.rpartition(".")
        instantiate = getattr(importlib.import_module(module_name), fn_name)
        config = {**config, **overrides}
        # Private in Lightning, what load_from_checkpoint uses to keep the CLI's configuration as hyperparameters;
        # guarded by tests/test_lightning_private.py.
        with _given_hyperparameters_context(hparams=config, instantiator=instantiator):
            return instantiate(type(template), config)
    # Other private entries (``_class_path``) are LightningCLI's too.
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return type(template)(**{**kwargs, **overrides})


def _data(template: Any, search_split: bool, fold_in_epoch: int | None = None) -> Any:
    """A stage's datamodule: the template with its search split on or off, and a fold-in only where asked for (a
    config that sets ``fold_in_epoch`` for ``fit`` still gives the other stages plain training data)."""
    overrides: dict[str, Any] = {"search_split": search_split}
    if fold_in_epoch is not None or "fold_in_epoch" in dict(getattr(template, "hparams", {}) or {}):
        overrides["fold_in_epoch"] = fold_in_epoch
    return _clone(template, **overrides)


class _RandomState(pl.Callback):
    """Keeps the random state (torch, CUDA, NumPy, Python) in the stage's checkpoints and restores it on resume.

    Lightning does not checkpoint it, so a stage resumed from ``last.ckpt`` would shuffle its data differently from an
    uninterrupted run: with it, a resumed stage continues exactly as if it had not stopped (data order, augmentation).
    """

    @property
    def state_key(self) -> str:
        return "autobalance-pipeline-random-state"

    def state_dict(self) -> dict[str, Any]:
        # Plain types and tensors only, so that ``torch.load(weights_only=True)`` reads the checkpoint.
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state: dict[str, Any] = {"torch": torch.get_rng_state(),
                                 "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos),
                                           int(has_gauss), float(gauss)],
                                 "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = state_dict["python"]
        random.setstate((version, tuple(internal), gauss_next))
        if "cuda" in state_dict and torch.cuda.is_available() and len(state_dict["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class _KeepPrevious(pl.Callback):
    """Copies the stage's ``last.ckpt`` to ``previous.ckpt`` before it is overwritten, so that a checkpoint spoiled
    after it was written (a full disk, a truncated copy) leaves an older one to resume from."""

    def __init__(self, checkpoints: Path) -> None:
        self.checkpoints = checkpoints

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        last = self.checkpoints / "last.ckpt"
        if trainer.is_global_zero and last.is_file():
            shutil.copyfile(last, self.checkpoints / "previous.ckpt.tmp")
            (self.checkpoints / "previous.ckpt.tmp").replace(self.checkpoints / "previous.ckpt")


class _FitClock(pl.Callback):
    """Fit time of a stage over all its attempts: each checkpoint carries the time spent up to it (and the number of
    attempts), which a resumed attempt adds its own time to."""

    def __init__(self) -> None:
        self.before = 0.0  # time of earlier attempts, up to the checkpoint this one resumed from
        self.attempts = 1
        self._start = time.perf_counter()

    @property
    def state_key(self) -> str:
        return "autobalance-pipeline-fit-clock"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def total(self) -> float:
        return self.before + time.perf_counter() - self._start

    def state_dict(self) -> dict[str, Any]:
        return {"fit_time_s": self.total(), "attempts": self.attempts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("fit_time_s", 0.0))
        self.attempts = int(state_dict.get("attempts", 1)) + 1


def _read_json(path: Path, what: str) -> Any:
    """A JSON file of a stage, or None (with a warning that names it, the file moved aside) when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        aside = path.with_name(path.name + ".corrupt")
        rank_zero_warn(f"{path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:120]}); it is "
                       f"moved to {aside.name} and {what}.")
        if rank_zero_only.rank == 0:
            path.replace(aside)
        return None


def _resume_checkpoint(name: str, checkpoints: Path) -> str | None:
    """The newest readable checkpoint of a stage (``last.ckpt``, else ``previous.ckpt``); unreadable ones are named
    in a warning and moved aside."""
    for candidate in (checkpoints / "last.ckpt", checkpoints / "previous.ckpt"):
        if not candidate.is_file():
            continue
        try:
            # Tensors and plain values only: the stage's own checkpoints hold nothing else, and a pickled object
            # placed in the output folder (shared, downloaded, restored) must not run.
            torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, empty, not a checkpoint, holds pickled objects
            aside = candidate.with_name(candidate.name + ".corrupt")
            why = type(err).__name__
            if "weights_only" in str(err).lower() or "unsupported global" in str(err).lower():
                why += ": it holds pickled Python objects besides tensors and plain values, which are not loaded"
            rank_zero_warn(f"[{name}] the checkpoint {candidate} cannot be read ({why}); it is moved to "
                           f"{aside.name} and the stage resumes from an older checkpoint if there is one, else from "
                           "the start.")
            if rank_zero_only.rank == 0:
                candidate.replace(aside)
            continue
        return str(candidate)
    return None


@rank_zero_only
def _keep_previous_metrics(log_dir: Path) -> None:
    """Moves the ``metrics.csv`` of an interrupted attempt aside (``metrics.1.csv``, ...): ``CSVLogger`` would delete it
    when the resumed stage logs."""
    previous = log_dir / "metrics.csv"
    if previous.is_file():
        k = 1
        while (log_dir / f"metrics.{k}.csv").exists():
            k += 1
        previous.rename(log_dir / f"metrics.{k}.csv")


def _stage_trainer(trainer_kwargs: dict[str, Any], stage_dir: Path, max_epochs: int | None,
                   search: bool) -> pl.Trainer:
    kwargs = dict(trainer_kwargs)
    callbacks = kwargs.pop("callbacks", None) or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    kept = []
    for cb in callbacks:
        if isinstance(cb, _DROPPED_CALLBACKS) or (isinstance(cb, AutoBalanceCallback) and not search):
            continue
        kept.append(copy.deepcopy(cb))
    if search and not any(isinstance(cb, AutoBalanceCallback) for cb in kept):
        kept.append(AutoBalanceCallback())
    # One file, ``last.ckpt``, rewritten at every epoch end. (``save_last=True, save_top_k=0`` would write it only
    # when training ends: since Lightning 2.x ``last`` follows a top-k save, so nothing would be left to resume from.)
    kept.append(ModelCheckpoint(dirpath=stage_dir / "checkpoints", filename="last", save_top_k=1,
                                enable_version_counter=False))
    kept.append(_RandomState())
    kept.append(_KeepPrevious(stage_dir / "checkpoints"))
    kept.append(_FitClock())
    kwargs["callbacks"] = kept
    kwargs["enable_checkpointing"] = True
    kwargs["default_root_dir"] = str(stage_dir)
    if kwargs.get("logger", True) is not False:
        _keep_previous_metrics(stage_dir / "logs")
        kwargs["logger"] = [CSVLogger(str(stage_dir), name="", version="logs"),
                            TensorBoardLogger(str(stage_dir), name="", version="logs")]
    if max_epochs is not None:
        kwargs["max_epochs"] = max_epochs
    return pl.Trainer(**kwargs)


def _fit_and_test(name: str, model: pl.LightningModule, datamodule: pl.LightningDataModule, trainer: pl.Trainer,
                  stage_dir: Path, resume: bool, test: bool = True) -> dict[str, Any]:
    ckpt = _resume_checkpoint(name, stage_dir / "checkpoints") if resume else None
    if ckpt:
        rank_zero_info(f"[{name}] resuming from {ckpt}")
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    clock = next(c for c in trainer.callbacks if isinstance(c, _FitClock))
    result: dict[str, Any] = {"method": name, "fit_time_s": clock.total(), "attempts": clock.attempts}
    if test:
        metrics = trainer.test(model, datamodule=datamodule, verbose=False)
        report = dict(getattr(model, "test_report", {}) or {})
        if not report and metrics:
            report = {k.split("/", 1)[-1]: v for k, v in metrics[0].items() if k.startswith("test/")}
        result.update(report)
    return result


def _counts(model: pl.LightningModule, datamodule: Any) -> dict[str, Any]:
    """The counts a stage's model is built with: classes, and (group, class) cells when both sides know groups."""
    counts = {"class_counts": datamodule.class_counts, "num_classes": datamodule.num_classes}
    if "group_counts" in dict(getattr(model, "hparams", {}) or {}):
        cells = getattr(datamodule, "group_counts", None)
        counts["group_counts"] = cells
        if cells is not None:
            counts["num_groups"] = len(cells)
    return counts


class _FirstStepTaken(Exception):
    """Ends a preflight fit once its first optimizer step is taken (not an error)."""


class _StopAfterFirstStep(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= 1 or batch_idx >= 64:
            raise _FirstStepTaken


def _single_process(trainer_kwargs: dict[str, Any]) -> bool:
    strategy = trainer_kwargs.get("strategy", "auto")
    single = strategy in ("auto", "single_device") or isinstance(strategy, SingleDeviceStrategy)
    return single and trainer_kwargs.get("num_nodes", 1) == 1 and trainer_kwargs.get("devices", 1) in (1, "1")


#: Trainer arguments a preflight fit sets itself: it logs, saves, shows and profiles nothing.
_PREFLIGHT_KEYS = ("callbacks", "logger", "enable_checkpointing", "enable_progress_bar", "enable_model_summary",
                   "default_root_dir", "profiler", "num_sanity_val_steps", "fast_dev_run")


def _preflight(plan: list[_Stage], pending: set[str], model: Any, datamodule: Any, trainer_kwargs: dict[str, Any],
               epochs_of: Callable[[_Stage], int | None]) -> None:
    """Every stage that is to train is checked before anything is written: its model is built, and a searching stage
    (else the first stage to train) fits as that stage would (its model, data, callbacks, trainer arguments and
    epochs) up to its first optimizer step, logging and saving nothing. Whatever the fit refuses at its setup, its
    start or its first step (the head method with no weight decay on the head, a ``holdout`` its upper data cannot
    give, a head that cannot be told, a ``training_step`` that keeps its own criterion) is then a
    :class:`PipelineSetupError` and the output folder stays as it was. The step also keeps one-off start-up costs
    (lazy imports) out of the stage timings.

    Only the models are built under a multi-process strategy (stages must run in step on every process there); a stage
    that reads an earlier stage's output (the retraining on the found loss) is checked when it starts.
    """
    ready = [st for st in plan if st.name in pending and not st.after]
    stepped = {st.name for st in ready if st.search} or {st.name for st in ready[:1]}
    single = _single_process(trainer_kwargs)
    for st in ready:
        try:
            with _quiet_lightning(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # what the stage warns of, it says when it trains
                model_ = _clone(model, **st.model)
                if st.name not in stepped or not single:
                    continue
                kwargs = {k: v for k, v in trainer_kwargs.items() if k not in _PREFLIGHT_KEYS}
                callbacks = _stage_kwargs(trainer_kwargs, st).get("callbacks") or []
                callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
                kept = [copy.deepcopy(cb) for cb in callbacks if not isinstance(cb, (*_DROPPED_CALLBACKS, *_OBSERVERS))
                        and (st.search or not isinstance(cb, AutoBalanceCallback))]
                if st.search and not any(isinstance(cb, AutoBalanceCallback) for cb in kept):
                    kept.append(AutoBalanceCallback())
                epochs = epochs_of(st)
                if epochs is not None:
                    kwargs["max_epochs"] = epochs
                trainer = pl.Trainer(**kwargs, callbacks=[*kept, _StopAfterFirstStep()], logger=False,
                                     enable_checkpointing=False, enable_progress_bar=False,
                                     enable_model_summary=False, num_sanity_val_steps=0)
                with contextlib.suppress(_FirstStepTaken):
                    trainer.fit(model_, datamodule=_data(datamodule, **st.data))
        except (ValueError, TypeError, RuntimeError, MisconfigurationException) as err:
            raise PipelineSetupError(f"The stage '{st.name}' cannot train as configured: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    """An exception's message on one line (its type named where it is not a ValueError)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, ValueError) else f"{type(err).__name__}: {text}"


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's and Fabric's info lines (``Running in `fast_dev_run` mode``, the device summary) held back;
    warnings still shown."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric",
                                                     "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _write_json(path: Path, data: Any) -> None:
    """Writes through a temporary file and a rename: a crash or a full disk leaves the old file or the new one,
    never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def run_pipeline(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    trainer_kwargs: dict[str, Any] | None = None,
    output_dir: str | Path = "runs/autobalance",
    search: bool = True,
    baselines: Sequence[str] = ("ce", "la"),
    search_epochs: int | None = None,
    retrain_epochs: int | None = None,
    resume: bool = True,
    plot: bool = True,
    seed: int | None = None,
    one_phase: bool = False,
    fold_in: float = DEFAULT_FOLD_IN,
    restart: Sequence[str] | str = (),
    write_config: Callable[[Path], None] | None = None,
    baseline_losses: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Runs the search-then-retrain method and the baselines; returns (and writes) the results.

    Args:
        model: a template module (e.g. :class:`~lightning_autobalance.ImbalancedClassifier`); each stage trains a
            fresh copy built from its hyperparameters.
        datamodule: a template long-tailed datamodule (``search_split`` is set per stage).
        trainer_kwargs: ``pl.Trainer`` arguments shared by all stages. An
            :class:`~lightning_autobalance.AutoBalanceCallback` among the callbacks configures the search (a default
            one is added otherwise) and is removed from the other stages.
        output_dir: where stages, ``found_loss.yaml``, ``results.json`` and ``loss.png`` go.
        search: run the search and the retraining (``False``: baselines only).
        baselines: names from :data:`BASELINES`.
        baseline_losses: baseline name (run or not) -> the loss value it trains with in place of its name's
            defaults (a ``class_path``/``init_args`` mapping, e.g. ``{"ldam_drw": {"class_path":
            "lightning_autobalance.core.losses.LDAMLoss", "init_args": {"drw_epoch": 30}}}``).
        search_epochs: epochs of the search (default: the trainer's ``max_epochs``).
        retrain_epochs: epochs of retraining, of the baselines and of the one-phase run (default: the trainer's
            ``max_epochs``).
        resume: continue unfinished stages from their last checkpoint and skip finished ones (False: train every
            stage again; a stage folder of another configuration is refused all the same, see ``restart``).
        plot: write ``loss.png``.
        seed: every stage starts from this seed (same initial weights for every method); default: the seed in
            force when the pipeline starts (``torch.initial_seed()``, i.e. ``seed_everything``'s).
        one_phase: also run the one-phase mode (row ``one_phase``): ``retrain_epochs`` epochs in one fit
            that learns the loss on the split until the fold-in and then trains on everything with it.
        fold_in: the share of the one-phase run's epochs searched before the upper part is folded in, in (0, 1).
        restart: stages to train again from scratch (their folders are removed first), or ``"all"``: a list of
            names, or one name (``"search"``, ``"all"``, or names separated by commas); a stage built on a restarted
            one (the retraining on the search's loss) is restarted with it.
        write_config: called with ``<output_dir>/config.yaml`` once the run is accepted (output folder free, no
            stage of another configuration in it), e.g. to save the resolved configuration there.

    Returns:
        The content of ``results.json``.

    Raises:
        PipelineSetupError: before anything is written: a bad argument (epochs below 1, a negative seed, ...), a bad
            image or non-finite upper data, an output folder that cannot be used or holds another configuration's
            stages (see ``restart``), an output folder in use by another run, a setting a stage's fit refuses at
            its start (the head method with no weight decay on the head, a ``holdout`` the upper data cannot give).
        PipelineDiskFull: a write found no room (``ENOSPC``, ``EDQUOT``); the same call resumes the run in place.
    """
    search_epochs, retrain_epochs, seed = _check_arguments(search, baselines, search_epochs, retrain_epochs, resume,
                                                           plot, seed, one_phase, dict(trainer_kwargs or {}))
    restart = [restart] if isinstance(restart, str) else list(restart or [])
    restart = [part.strip() for item in restart for part in str(item).split(",") if part.strip()]
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise PipelineSetupError(f"Unknown baselines {unknown}; expected names from {sorted(BASELINES)}.")
    # as plain data (the CLI hands over objects), the form every stage's hyperparameters and fingerprint hold
    baseline_losses = {k: v if isinstance(v, (str, dict)) else loss_config(v)
                       for k, v in (baseline_losses or {}).items()}
    if any("not_saved" in v for v in baseline_losses.values() if isinstance(v, dict)):
        raise PipelineSetupError(f"baseline_losses {baseline_losses}: a stage's loss must be plain data: a name, or a "
                                 "class_path whose class keeps its init_args (as the package's losses do).")
    own = [b for b in BASELINES if BASELINES[b]["loss"] != "autobalance"]  # set for a baseline that may not run
    if set(baseline_losses) - set(own):
        raise PipelineSetupError(f"baseline_losses names {sorted(baseline_losses)}; expected some of the baselines "
                                 f"that train with a loss of their own: {own}.")
    if not search and not baselines and not one_phase:
        raise PipelineSetupError("Nothing to run: search=False, one_phase=False and no baselines.")
    if isinstance(fold_in, bool) or not isinstance(fold_in, (int, float)) or not 0.0 < float(fold_in) < 1.0:
        raise PipelineSetupError(f"fold_in must lie in (0, 1) (the share of the one-phase run's epochs searched "
                                 f"before the upper part is folded in); got {fold_in}.")
    for key in ("search_split",):
        if key not in dict(getattr(datamodule, "hparams", {}) or {}):
            raise PipelineSetupError(f"The pipeline needs a datamodule with a `{key}` argument (a LongTailDataModule); "
                                     f"{type(datamodule).__name__} has none in its hyperparameters.")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise PipelineSetupError(f"output_dir {out} is a file, not a folder: give a folder path.")
    kwargs = dict(trainer_kwargs or {})
    fold_epoch = 0
    if one_phase:
        epochs = retrain_epochs if retrain_epochs is not None else kwargs.get("max_epochs")
        if epochs is None or int(epochs) < 2:
            raise PipelineSetupError(f"one_phase needs at least 2 epochs (retrain_epochs or the trainer's max_epochs) "
                                     f"to search and then fold in; got {epochs}.")
        fold_epoch = fold_in_epoch(int(epochs), fold_in)
    seed = int(torch.initial_seed() % 2**31) if seed is None else int(seed)
    full = _data(datamodule, search_split=False)
    try:
        counts = _counts(model, full)
    except (ValueError, RuntimeError, FileNotFoundError) as err:  # the data's own checks (a bad image, a bad list)
        raise PipelineSetupError(" ".join(str(err).split()) or type(err).__name__) from err
    given = dict(getattr(model, "hparams", {}) or {}).get("class_counts")
    disagreement = counts_disagreement(given, counts["class_counts"], "the model template's class_counts",
                                       f"those of {type(datamodule).__name__}'s own labels")
    if disagreement:
        rank_zero_warn(disagreement + " The pipeline builds every stage's model with the data's counts.")
    if counts.get("group_counts") is None and any(b in _GROUP_BASELINES for b in baselines):
        raise PipelineSetupError(f"The baselines {[b for b in baselines if b in _GROUP_BASELINES]} need groups: a "
                                 "datamodule with group_counts (e.g. ColoredDigits) and a model that takes "
                                 "group_counts (ImbalancedClassifier).")
    found = out / "found_loss.yaml"
    plan: list[_Stage] = []
    if search:
        split = _data(datamodule, search_split=True)
        _check_upper_data(split)
        plan.append(_Stage("search", {**_counts(model, split), "loss": "autobalance"}, {"search_split": True},
                           search=True, test=False, prepared=split))
        plan.append(_Stage("autobalance", {**counts, "loss": "autobalance", "loss_file": str(found),
                                           "freeze_loss": True}, {"search_split": False}, inputs=(found,),
                           after=("search",)))
    if one_phase:
        folded = _data(datamodule, search_split=True, fold_in_epoch=fold_epoch)
        plan.append(_Stage("one_phase", {**_counts(model, folded), "loss": "autobalance"},
                           {"search_split": True, "fold_in_epoch": fold_epoch}, search=True, prepared=folded))
    for name in baselines:
        loss = {"loss": baseline_losses[name]} if name in baseline_losses else {}
        plan.append(_Stage(name, {**counts, "search": (), "loss_file": None, "freeze_loss": False, **BASELINES[name],
                                  **loss}, {"search_split": False},
                           callbacks=tuple(make() for make in BASELINE_CALLBACKS.get(name, ()))))
    names = [st.name for st in plan]
    unknown = [r for r in restart if r != "all" and r not in names]
    if unknown:
        raise PipelineSetupError(f"restart names stages this run does not have: {unknown}; expected some of {names} "
                                 "or 'all'.")
    recompute = set(names) if "all" in restart else set(restart)
    recompute |= {st.name for st in plan if recompute & set(st.after)}  # and what is built on them
    lock = OutputLock(out) if rank_zero_only.rank == 0 else None
    fresh = not out.exists()  # a run refused before it wrote anything leaves no folder behind
    try:
        if lock is not None:
            lock.acquire()
            if lock.taken_over:
                rank_zero_info(f"Took over the lock {lock.path} left by a run that is gone ({lock.taken_over}).")
    except OutputFolderInUse as err:
        raise PipelineSetupError(str(err)) from None
    except OSError as err:  # read-only, a file on the way, no space
        raise PipelineSetupError(f"output_dir {out} cannot be used: {err.strerror or err}"
                                 f"{f' ({err.filename})' if err.filename else ''}; give a folder this run can "
                                 "write to.") from None
    try:
        return _run_plan(plan, recompute, out, found, model, datamodule, kwargs, full, counts, seed, search_epochs,
                         retrain_epochs, resume, plot, fold_epoch, write_config)
    except Exception as err:
        full_disk = no_space(err)
        if full_disk is None:
            raise
        where = full_disk.filename2 or full_disk.filename  # a copy's (shutil.move across disks) is its target
        inside = where is not None and Path(os.fspath(where)).resolve().is_relative_to(out.resolve())
        raise PipelineDiskFull(
            f"No space left on the disk of {out if inside or where is None else Path(os.fspath(where)).parent}"
            f"{f' (writing {where})' if where is not None else ''}: free space there and rerun the same command (or "
            f"move {out} to a disk with room and give its new place as output_dir): the run resumes where it stopped, "
            "finished stages kept and the interrupted one continued from its last readable checkpoint.") from err
    finally:
        if lock is not None:
            lock.release()
            if fresh:
                with contextlib.suppress(OSError):  # only where nothing was written (rmdir removes no file)
                    out.rmdir()


def _check_arguments(search: Any, baselines: Any, search_epochs: Any, retrain_epochs: Any, resume: Any, plot: Any,
                     seed: Any, one_phase: Any, trainer_kwargs: dict[str, Any]) -> tuple[int | None, int | None,
                                                                                     int | None]:
    """Every argument of :func:`run_pipeline` that Lightning would only reject (or silently accept) once a stage
    starts, checked before anything is written; returns the epochs and the seed as ints."""

    def whole(name: str, value: Any, low: int, high: int | None = None, what: str = "") -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
                high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise PipelineSetupError(f"{name} must be a whole number {bound}{what}; got {value!r}.")
        return int(value)

    for name, value in (("search", search), ("resume", resume), ("plot", plot), ("one_phase", one_phase)):
        if not isinstance(value, bool):
            raise PipelineSetupError(f"{name} must be true or false; got {value!r}.")
    if isinstance(baselines, str) or not all(isinstance(b, str) for b in baselines):
        raise PipelineSetupError(f"baselines must be a list of names (e.g. [ce, la]); got {baselines!r}.")
    search_epochs = whole("search_epochs", search_epochs, 1, what=" (or None for the trainer's max_epochs)")
    retrain_epochs = whole("retrain_epochs", retrain_epochs, 1, what=" (or None for the trainer's max_epochs)")
    seed = whole("seed", seed, 0, 2**32 - 1, " (or None for the seed in force)")
    max_epochs = trainer_kwargs.get("max_epochs")
    users = ([] if not search or search_epochs is not None else ["the search"]) + (
        [] if (not baselines and not search and not one_phase) or retrain_epochs is not None
        else ["the retraining and the baselines"])
    if users and max_epochs is not None:
        unlimited = max_epochs == -1 and trainer_kwargs.get("max_steps", -1) not in (None, -1)
        if not unlimited and (isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1):
            raise PipelineSetupError(f"trainer.max_epochs={max_epochs!r} trains nothing, yet {' and '.join(users)} "
                                     "take their epochs from it: give max_epochs >= 1 (or search_epochs / "
                                     "retrain_epochs).")
    return search_epochs, retrain_epochs, seed


def _check_upper_data(split: Any) -> None:
    """Refuses upper data (the held-out part the search tunes the loss on) that holds NaN or infinity: every hyper
    step would be skipped. Only data held in memory is looked at (no decoding, no device copy)."""
    if getattr(split, "device_resident", False) or not isinstance(getattr(type(split), "upper_dataset", None),
                                                                   property):
        return
    try:
        upper = split.upper_dataset
    except ValueError as err:  # the split cannot be made (a class with one sample): said before any training
        raise PipelineSetupError(f"The search split of {type(split).__name__} cannot be made: {err}.") from None
    except (RuntimeError, AttributeError):  # no upper part after all: the callback will say so
        return
    where = non_finite_sample(upper)
    if where is not None:
        raise PipelineSetupError(f"The upper data of {type(split).__name__} (the held-out part the search tunes the "
                                 f"loss on) holds non-finite values: {where}. Every hyper step would be skipped; fix "
                                 "the data.")


@dataclass
class _Stage:
    """One stage of the pipeline: its name and what its model and datamodule differ from the templates in."""

    name: str
    model: dict[str, Any]
    data: dict[str, Any]
    search: bool = False
    test: bool = True
    inputs: tuple[Path, ...] = ()  # files it reads (a found loss): their digests are part of its fingerprint
    after: tuple[str, ...] = ()  # stages whose output it uses
    prepared: Any = None  # its datamodule, when the plan already built it (for its counts)
    callbacks: tuple[pl.Callback, ...] = ()  # its own, beside the trainer's (a baseline's: BASELINE_CALLBACKS)


def _stage_kwargs(trainer_kwargs: dict[str, Any], st: _Stage) -> dict[str, Any]:
    """The trainer arguments of a stage: the trainer's, with the stage's own callbacks (copies) after its callbacks
    (so that they count in its fingerprint as any callback that changes training does)."""
    if not st.callbacks:
        return trainer_kwargs
    given = trainer_kwargs.get("callbacks") or []
    given = given if isinstance(given, list) else [given]
    return {**trainer_kwargs, "callbacks": [*given, *(copy.deepcopy(cb) for cb in st.callbacks)]}


#: callbacks that watch or save training without changing it: not part of a stage's fingerprint
_OBSERVERS = (ModelCheckpoint, ProgressBar, ModelSummary, LearningRateMonitor, DeviceStatsMonitor, Timer,
              SaveConfigCallback)


def _fingerprint(st: _Stage, model: Any, datamodule: Any, kwargs: dict[str, Any], full: Any, seed: int,
                 epochs: int | None, with_inputs: bool, out: Path | None = None) -> dict[str, Any]:
    from lightning_autobalance import __version__

    data = {k: v for k, v in dict(getattr(datamodule, "hparams", {}) or {}).items() if k not in IGNORED_DATA_KEYS}
    fp: dict[str, Any] = {
        "library": __version__,
        "seed": seed,
        "epochs": epochs if epochs is not None else kwargs.get("max_epochs"),
        "model": {"class": describe(type(model)),
                  "hparams": describe(resolve_paths({**dict(model.hparams), **st.model}, base=out))},
        "data": {"class": describe(type(datamodule)), "hparams": describe(resolve_paths({**data, **st.data},
                                                                                         base=out)),
                 "class_counts": describe(full.class_counts),
                 **({"content": full.content_digest()} if hasattr(full, "content_digest") else {})},
        "trainer": describe({k: v for k, v in kwargs.items() if k not in IGNORED_TRAINER_KEYS}),
    }
    callbacks = kwargs.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    # every callback that can change training decides the result too (observers, checkpointing and a callback whose
    # class says `changes_training = False` left out)
    others = [callback_settings(c) for c in callbacks if not isinstance(c, (AutoBalanceCallback, *_OBSERVERS))
              and getattr(c, "changes_training", True)]
    if others:
        fp["callbacks"] = others
    if st.search:
        cb = next((c for c in callbacks if isinstance(c, AutoBalanceCallback)), None) or AutoBalanceCallback()
        fp["autobalance"] = callback_settings(cb)
    if with_inputs:
        fp["inputs"] = {p.name: file_digest(p) if p.is_file() else None for p in st.inputs}
    return fp


def _way_out(name: str) -> str:
    """The two ways out of a refused stage folder, in forms the command line parses."""
    return f"Use another output_dir, or restart it from scratch with --restart {name} (or --restart all)."


def _work_in(stage_dir: Path) -> list[str]:
    """What a stage folder holds that a rerun would reuse: its result and its checkpoints."""
    found = [stage_dir / "result.json", *sorted((stage_dir / "checkpoints").glob("*.ckpt"))]
    return [p.name for p in found if p.is_file()]


def _check_stage(st: _Stage, stage_dir: Path, fp: dict[str, Any], quiet: bool = False) -> None:
    """Refuses a stage folder that holds work (a result, a checkpoint) of another configuration (compares
    ``fingerprint.json``) or work it cannot check: no fingerprint, or one that cannot be read. Fails closed where there
    is work; a folder with none (a fit that stopped before its first checkpoint, e.g. on a setting it refused) blocks
    nothing: the stage starts afresh and writes its own fingerprint."""
    recorded = stage_dir / "fingerprint.json"
    work = _work_in(stage_dir)
    if not recorded.is_file():
        if work:
            raise PipelineSetupError(f"{stage_dir} holds work of the stage '{st.name}' ({', '.join(work)}) but no "
                                     "fingerprint.json, so it cannot be checked against this configuration. "
                                     + _way_out(st.name))
        return
    try:
        old = json.loads(recorded.read_text())
        if not isinstance(old, dict):
            raise ValueError(f"a JSON {type(old).__name__}, not an object")
    except (OSError, ValueError) as err:
        if not work:  # nothing to reuse: the stage starts and writes its fingerprint again
            return
        raise PipelineSetupError(f"{recorded} cannot be read ({type(err).__name__}: "
                                 f"{' '.join(str(err).split())[:80]}), so the work in {stage_dir} ({', '.join(work)}) "
                                 "cannot be checked against this configuration. " + _way_out(st.name)) from None
    if "inputs" not in fp:
        old.pop("inputs", None)
    diff = changes(old, fp)
    if diff and not work:
        if quiet:  # said once, when the stage starts
            return
        rank_zero_info(f"[{st.name}] {stage_dir} holds no result or checkpoint of its earlier configuration: the stage "
                       "starts afresh.")
    elif diff:
        # the data's digest says nothing by its value: say what it stands for
        diff = ["data.content: the training or test files changed (added, removed or modified)"
                if d.startswith("data.content:") else d for d in diff]
        shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise PipelineSetupError(f"{stage_dir} holds the stage '{st.name}' of another configuration ({shown}). "
                                 + _way_out(st.name))


def _loss_file_ok(name: str, path: Path) -> bool:
    """Whether a finished search's loss file reads back; when not, a warning names it as damaged (or missing), it is
    moved aside and the stage is finished again from its checkpoint, which exports it again."""
    try:
        load_loss_tables(path)
        return True
    except (OSError, ValueError) as err:
        aside = path.with_name(path.name + ".corrupt")
        damaged = path.is_file()
        rank_zero_warn(f"[{name}] the search's loss file {path} "
                       + (f"is damaged ({' '.join(str(err).split())[:160]}); it is moved to {aside.name} and"
                          if damaged else "is missing;")
                       + " the search is finished again from its checkpoint, which writes it again.")
        if damaged and rank_zero_only.rank == 0:
            path.replace(aside)
        return False


def _run_plan(plan: list[_Stage], recompute: set[str], out: Path, found: Path, model: Any, datamodule: Any,
              kwargs: dict[str, Any], full: Any, counts: dict[str, Any], seed: int, search_epochs: int | None,
              retrain_epochs: int | None, resume: bool, plot: bool, fold_epoch: int,
              write_config: Callable[[Path], None] | None) -> dict[str, Any]:
    def epochs_of(st: _Stage) -> int | None:
        return search_epochs if st.name == "search" else retrain_epochs

    def loss_file(st: _Stage) -> Path:
        return found if st.name == "search" else out / st.name / "found_loss.yaml"

    # Before anything is written: refuse folders of another configuration (also without resume: such a folder is
    # never overwritten unless it is restarted), check every stage that is to train, then clear what is restarted.
    for st in plan:
        if st.name not in recompute:
            _check_stage(st, out / st.name, _fingerprint(st, model, datamodule, _stage_kwargs(kwargs, st), full, seed,
                                                         epochs_of(st), False, out), quiet=True)
    pending = {st.name for st in plan
               if st.name in recompute or not resume or not (out / st.name / "result.json").is_file()}
    _preflight(plan, pending, model, datamodule, kwargs, epochs_of)
    for st in plan:
        stage_dir = out / st.name
        if st.name in recompute and rank_zero_only.rank == 0 and stage_dir.exists():
            rank_zero_info(f"[{st.name}] restart: {stage_dir} is removed and the stage trains from scratch.")
            shutil.rmtree(stage_dir)
            if st.name == "search":
                found.unlink(missing_ok=True)
    if write_config is not None and rank_zero_only.rank == 0:
        write_config(out / "config.yaml")
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"output_dir": str(out), "seed": seed, "model": type(model).__name__,
                               "datamodule": type(datamodule).__name__}
    summary["class_counts"] = full.class_counts
    if counts.get("group_counts") is not None:
        summary["group_counts"] = counts["group_counts"]

    def stage(st: _Stage) -> dict[str, Any]:
        stage_dir = out / st.name
        fp = _fingerprint(st, model, datamodule, _stage_kwargs(kwargs, st), full, seed, epochs_of(st), True, out)
        if st.name not in recompute:
            _check_stage(st, stage_dir, fp)
        if resume:
            done = stage_dir / "result.json"
            if done.is_file():
                result = _read_json(done, "the stage is finished again from its checkpoint")
                if result is not None and st.search and not _loss_file_ok(st.name, loss_file(st)):
                    result = None
                if result is not None:
                    rank_zero_info(f"[{st.name}] already done ({done}); skipped")
                    return result
        if rank_zero_only.rank == 0:
            _write_json(stage_dir / "fingerprint.json", fp)
        pl.seed_everything(seed, workers=True, verbose=False)
        model_ = _clone(model, **st.model)
        dm_ = st.prepared if st.prepared is not None else _data(datamodule, **st.data)
        trainer = _stage_trainer(_stage_kwargs(kwargs, st), stage_dir, epochs_of(st), search=st.search)
        result = _fit_and_test(st.name, model_, dm_, trainer, stage_dir, resume, test=st.test)
        if st.search:
            loss_path = loss_file(st)
            if trainer.is_global_zero:
                model_.export_loss(loss_path)
            cb = next(c for c in trainer.callbacks if isinstance(c, AutoBalanceCallback))
            result.update({"found_loss": str(loss_path), "hyper_steps": cb.hyper_steps,
                           "skipped_steps": cb.skipped_steps, "decision": model_.autobalance_parameters().decision})
            if cb.hyper_steps == 0:
                rank_zero_warn(f"The search took no hyper step in {trainer.current_epoch} epochs, so the found loss is "
                               "the starting preset: check the AutoBalanceCallback's start_epoch / start_step against "
                               "search_epochs.")
        if trainer.is_global_zero:
            _write_json(stage_dir / "result.json", result)
        trainer.strategy.barrier("autobalance-stage")
        return result

    for st in plan:
        row = stage(st)
        if st.name == "search":
            summary["search"] = row
            continue
        if st.name == "autobalance":
            row["method"] = "autobalance"
            row["search_time_s"] = summary["search"]["fit_time_s"]
            tables, _ = load_loss_tables(found)
            summary["found_loss"] = {k: v.tolist() for k, v in tables._asdict().items()}
        elif st.name == "one_phase":
            row["fold_in_epoch"] = fold_epoch
            tables, _ = load_loss_tables(row["found_loss"])
            summary["one_phase_loss"] = {k: v.tolist() for k, v in tables._asdict().items()}
        rows.append(row)
    summary["rows"] = rows
    _finish(out, summary, plot)
    return summary


@rank_zero_only
def _finish(out: Path, summary: dict[str, Any], plot: bool) -> None:
    _write_json(out / "results.json", summary)
    if plot and "found_loss" in summary:
        plot_loss(summary, out / "loss.png")
    print_table(summary["rows"])
    rank_zero_info(f"results: {out / 'results.json'}")


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """Prints the comparison table (balanced, head/medium/tail and worst-class error in %, wall time)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Balanced test error (%), lower is better")
    groups = any("worst_group_error" in r for r in rows)
    columns = ["method", "balanced", "head", "medium", "tail", "worst class"]
    columns += ["worst group", "EO gap"] if groups else []
    for col in (*columns, "time (s)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    best = min((r.get("balanced_error", float("inf")) for r in rows), default=float("inf"))

    def pct(r: dict[str, Any], key: str) -> str:
        v = r.get(key)
        return "-" if v is None or v != v else f"{100 * v:.2f}"

    for r in rows:
        t = r.get("fit_time_s", 0.0) + r.get("search_time_s", 0.0)
        mark = " *" if r.get("balanced_error") == best else ""
        cells = [pct(r, "balanced_error"), pct(r, "head_error"), pct(r, "medium_error"), pct(r, "tail_error"),
                 pct(r, "worst_class_error")]
        cells += [pct(r, "worst_group_error"), pct(r, "eo_gap")] if groups else []
        table.add_row(r["method"] + mark, *cells, f"{t:.0f}")
    Console().print(table)


def plot_loss(summary: dict[str, Any], path: Path) -> None:
    """Plots the found ``delta``, ``offset`` and ``weight`` against class frequency, with logit adjustment.

    With groups, every row of the class x group tables is drawn against its own (group, class) cell counts, and
    the logit-adjustment reference is the one of those cells (offsets ``log p(y | g)``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = {k: torch.tensor(v, dtype=torch.float64) for k, v in summary["found_loss"].items()}
    rows = found["offset"].shape[0]
    cells = summary.get("group_counts")
    if rows > 1 and cells is not None and len(cells) == rows:
        counts = torch.tensor(cells, dtype=torch.float64)
    else:
        counts = torch.tensor(summary["class_counts"], dtype=torch.float64).expand(rows, -1)
    la = preset_tables("la", counts.clamp(min=1), dtype=torch.float64)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for g in range(rows):
        order = torch.argsort(counts[g], descending=True)
        x = counts[g][order].clamp(min=0.5)
        suffix = f", group {g}" if rows > 1 else ""
        offset = found["offset"][g] - found["offset"][g].mean()
        ref = la.offset[g] - la.offset[g].mean()
        panels = (("delta", found["delta"][g], None), ("offset (centred)", offset, ref),
                  ("weight", found["weight"][g], None))
        for ax, (name, values, reference) in zip(axes, panels):
            (line,) = ax.plot(x, values[order], "o-", label="found" + suffix)
            if reference is not None:
                ax.plot(x, reference[order], "x--", color=line.get_color(),
                        label="logit adjustment (tau=1)" + suffix)
            ax.set_title(name)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("training samples of the " + ("(group, class) cell" if rows > 1 else "class"))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small")
    fig.suptitle("Loss found by AutoBalance against class frequency")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


class AutoBalanceTrainer(pl.Trainer):
    """A ``pytorch_lightning.Trainer`` with one more entry point, :meth:`pipeline` (and the CLI subcommand).

    It remembers its constructor arguments so the pipeline can build one trainer per stage from them.

    Example::

        trainer = AutoBalanceTrainer(max_epochs=30, callbacks=[AutoBalanceCallback()])
        trainer.pipeline(ImbalancedClassifier("digits_net", 10, dm.class_counts), LongTailDigits())
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args:
            raise TypeError("AutoBalanceTrainer takes keyword arguments only.")
        self.init_kwargs = dict(kwargs)
        #: Called with ``<output_dir>/config.yaml`` once a pipeline run is accepted (the CLI saves its config there).
        self.config_writer: Callable[[Path], None] | None = None
        super().__init__(**kwargs)

    def pipeline(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        output_dir: str = "runs/autobalance",
        search: bool = True,
        baselines: list[str] | None = None,
        search_epochs: int | None = None,
        retrain_epochs: int | None = None,
        resume: bool = True,
        plot: bool = True,
        seed: int | None = None,
        one_phase: bool = False,
        fold_in: float = DEFAULT_FOLD_IN,
        restart: list[str] | str | None = None,
        baseline_losses: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Search the loss, retrain with it, train the baselines, test all and write results.json.

        Args:
            model: the model template.
            datamodule: the long-tailed datamodule template.
            output_dir: folder of the run.
            search: run the AutoBalance search and retraining.
            baselines: baseline names (default ``["ce", "la"]``), see
                ``lightning_autobalance.runner.pipeline.BASELINES``.
            baseline_losses: baseline name -> its loss value in place of its name's defaults, e.g. ``{ldam_drw:
                {class_path: lightning_autobalance.core.losses.LDAMLoss, init_args: {drw_epoch: 30}}}``.
            search_epochs: epochs of the search (default: ``max_epochs``).
            retrain_epochs: epochs of retraining and baselines (default: ``max_epochs``).
            resume: resume unfinished stages and skip finished ones.
            plot: write loss.png.
            seed: seed of every stage (default: the one set by ``seed_everything``).
            one_phase: also run the one-phase mode: one fit of ``retrain_epochs`` epochs that learns the loss on
                the split for the first ``fold_in`` share of its epochs, then trains on everything with it (row
                ``one_phase``).
            fold_in: share of the one-phase run searched before the upper part joins training, in (0, 1).
            restart: stages to train again from scratch: one name (``--restart search``, which restarts the
                retraining with it, or ``--restart all``) or a list (``--restart [search, la]``); a rerun refuses a
                stage folder of another configuration otherwise.
        """
        if datamodule is None:
            raise PipelineSetupError("pipeline needs a datamodule (a LongTailDataModule).")
        return run_pipeline(model, datamodule, self.init_kwargs, output_dir, search,
                            ["ce", "la"] if baselines is None else baselines, search_epochs, retrain_epochs, resume,
                            plot, seed, one_phase, fold_in, restart or (), self.config_writer, baseline_losses)
