"""``ImbalancedClassifier``: a ready LightningModule for long-tailed classification with an AutoBalance loss."""

from __future__ import annotations

import importlib
import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassRecall
from typing_extensions import override

from lightning_autobalance.core.losses import FocalLoss, GroupDROLoss, LDAMLoss, Reduction
from lightning_autobalance.core.lr_schedule import WarmupDecayLR
from lightning_autobalance.core.metrics import GroupErrors
from lightning_autobalance.core.parametrization import ParametrizationKind
from lightning_autobalance.data.profiles import head_medium_tail
from lightning_autobalance.lightning.mixin import AutoBalanceMixin
from lightning_autobalance.models import NormedLinear, build_network

__all__ = ["ImbalancedClassifier"]

LossName = Literal["autobalance", "ldam", "focal", "group_dro"]
#: A training criterion given as a value: ``criterion(logits, target, group) -> scalar tensor``.
Criterion = Callable[[Tensor, Tensor, Tensor | None], Tensor]

#: A loss given by name -> the class of its value, built with that class's defaults (``None``: the AutoBalance family).
NAMED_LOSSES: dict[str, type[nn.Module] | None] = {"autobalance": None, "ldam": LDAMLoss, "focal": FocalLoss,
                                                    "group_dro": GroupDROLoss}
#: The deprecated per-loss arguments -> (the named loss they configure, the argument of its value).
_FLAT_ARGUMENTS = {"ldam_max_margin": ("ldam", "max_margin"), "ldam_scale": ("ldam", "scale"),
                   "drw_epoch": ("ldam", "drw_epoch"), "focal_gamma": ("focal", "gamma"),
                   "dro_step_size": ("group_dro", "step_size")}


def loss_config(loss: Any) -> dict[str, Any]:
    """How hyperparameters (and checkpoints) hold a loss object given in Python: one that keeps its constructor's
    arguments as plain data in ``init_args`` (the package's losses do) in LightningCLI's ``class_path``/``init_args``
    form, which the classifier rebuilds; any other as ``{"not_saved": its class}``, which loading asks for."""
    named = loss if inspect.isfunction(loss) else type(loss)
    path = f"{named.__module__}.{named.__qualname__}"
    args = getattr(loss, "init_args", None)
    return {"class_path": path, "init_args": dict(args)} if isinstance(args, Mapping) else {"not_saved": path}


def _criterion(loss: Any, settings: dict[str, Any], class_counts: list[int], num_classes: int,
               num_groups: int | None) -> Criterion | None:
    """The criterion a loss value trains with (``None``: the AutoBalance family), sized for the model and checked. A
    name is built with the deprecated per-loss ``settings`` that configure it; a ``class_path``/``init_args`` mapping
    (what hyperparameters hold) is instantiated; a criterion with ``for_model`` is sized by it."""
    example = "e.g. lightning_autobalance.core.losses.FocalLoss(gamma=2.0)"
    if isinstance(loss, str):
        if loss not in NAMED_LOSSES:
            raise ValueError(f"loss must be 'autobalance', 'ldam', 'focal' or 'group_dro', or a criterion object "
                             f"({example}); got {loss!r}.")
        named = NAMED_LOSSES[loss]
        if named is None:
            return None
        loss = named(**{arg: settings[k] for k, (of, arg) in _FLAT_ARGUMENTS.items() if of == loss and k in settings})
    if isinstance(loss, Mapping):
        if "not_saved" in loss:
            raise ValueError(f"loss={dict(loss)}: this model was built with a loss object that its hyperparameters "
                             "(and checkpoints) cannot hold. Give the loss again, e.g. "
                             "ImbalancedClassifier.load_from_checkpoint(path, loss=FocalLoss(gamma=2.0)); its state "
                             "(e.g. GroupDROLoss's q) is then restored from the checkpoint.")
        module, _, name = str(loss.get("class_path")).rpartition(".")
        try:
            loss = getattr(importlib.import_module(module), name)(**dict(loss.get("init_args") or {}))
        except (ImportError, AttributeError, TypeError, ValueError) as err:
            raise ValueError(f"loss={dict(loss)}: cannot build it: {err}") from err
    if inspect.isclass(loss):
        raise ValueError(f"loss must be a criterion object, not a class: got the class {loss.__qualname__}; "
                         f"construct it ({loss.__name__}(...)).")
    if not callable(loss):
        raise ValueError(f"loss must be one of 'autobalance', 'ldam', 'focal', 'group_dro' or a criterion: an "
                         f"nn.Module or callable criterion(logits, target, group) -> scalar tensor ({example}); got "
                         f"a {type(loss).__name__}: {loss!r}.")
    sized = getattr(loss, "for_model", None)
    loss = sized(class_counts, num_groups) if callable(sized) else loss
    target = loss.forward if isinstance(loss, nn.Module) else loss
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: taken as it is
        signature = None
    if signature is not None:
        try:
            signature.bind(None, None, None)
        except TypeError as err:
            raise ValueError(f"loss: a criterion is called as criterion(logits, target, group) (group is None for "
                             f"(x, y) batches); {type(loss).__name__} with signature {signature} cannot be: {err}. A "
                             f"two-argument loss can be wrapped: lambda logits, target, group: loss(logits, target)."
                             ) from err
    if isinstance(loss, LDAMLoss) and loss.margins.numel() != num_classes:
        raise ValueError(f"loss: the LDAMLoss was built for {loss.margins.numel()} classes (its class_counts) but "
                         f"num_classes is {num_classes}.")
    if isinstance(loss, GroupDROLoss):
        if loss.over != "class" and not num_groups:
            raise ValueError(f"loss: a GroupDROLoss over={loss.over!r} needs groups: give num_groups (and batches "
                             "(x, y, g)).")
        if loss.num_classes != num_classes or (loss.over != "class" and loss.num_groups != num_groups):
            raise ValueError(f"loss: the GroupDROLoss was built for num_classes={loss.num_classes}, "
                             f"num_groups={loss.num_groups} but the model has num_classes={num_classes}, "
                             f"num_groups={num_groups}.")
    return loss


def _check_optimization(optimizer: OptimizerCallable | None, lr_scheduler: LRSchedulerCallable | None) -> None:
    """Builds the optimizer and scheduler once on a throw-away parameter, so that a bad setting (a negative learning
    rate, a missing scheduler argument) is reported at construction, not when training starts."""
    for name, value in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
        if value is not None and not callable(value):
            raise ValueError(f"{name} must be a callable (from YAML: a class_path such as torch.optim.SGD with its "
                             f"init_args) or None; got {value!r}.")
    probe = [nn.Parameter(torch.zeros(1))]
    try:
        opt = optimizer(probe) if optimizer is not None else torch.optim.SGD(probe, lr=0.1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"optimizer: {err}") from err
    if not isinstance(opt, torch.optim.Optimizer):
        raise ValueError(f"optimizer must return a torch.optim.Optimizer; it returned a {type(opt).__name__}.")
    if lr_scheduler is not None:
        try:
            lr_scheduler(opt)
        except (TypeError, ValueError) as err:
            raise ValueError(f"lr_scheduler: {err}") from err


class ImbalancedClassifier(AutoBalanceMixin, pl.LightningModule):
    """A classifier trained with an AutoBalance loss (or the LDAM-DRW / focal / group DRO baselines), with long-tail
    and group metrics.

    The optimiser and schedule are LightningCLI callables (``class_path`` plus ``init_args`` in YAML); by default SGD
    (``lr=0.1, momentum=0.9, weight_decay=2e-4``) under :class:`~lightning_autobalance.core.lr_schedule.WarmupDecayLR`
    (cosine annealing to 0 over the run, stepped every optimizer step; the paper's linear warm-up and step decay are its
    ``warmup_epochs``, ``schedule="step"``, ``milestones`` and ``lr_decay``). Validation and test log the balanced error
    (``1 -`` the macro-averaged recall, i.e. torchmetrics' ``MulticlassAccuracy(average="macro")``), the error on head,
    medium and tail classes, and (up to ``log_max_classes`` classes) the error of every class. At test time the raw
    logits are used: the loss adjustment shapes training only.

    With groups (``num_groups >= 2``, batches ``(x, y, g)``) the loss tables are ``G x K`` (from ``group_counts``
    when given, so presets see the counts of every (group, class) cell) and validation and test also log the group
    metrics of :mod:`lightning_autobalance.core.metrics`: the error of every (label, group) cell and of every group, the
    worst-group error (the largest cell error), the average error and the equal-opportunity gap (``eo_gap``). For
    ``(x, y)`` batches nothing changes.

    Args:
        network: a callable ``num_classes -> nn.Module`` (from a LightningCLI YAML: ``class_path`` of a network
            with its ``init_args``) or a name known to :func:`~lightning_autobalance.models.build_network`.
        num_classes: number of classes (linked from the datamodule by the CLI).
        class_counts: training samples per class (linked from the datamodule by the CLI).
        loss: the training loss, one value. ``"autobalance"`` (default): the searchable family, configured by
            ``preset`` to ``freeze_loss`` below. Or a criterion ``criterion(logits, target, group) -> scalar tensor``
            (``group`` is None for ``(x, y)`` batches) that carries its own settings, trains the network in place of
            the family (which is then not searched: ``preset`` and ``search`` are ignored) and is registered as
            ``self.criterion`` (its buffers follow the model's device and checkpoints; give every model its own):
            :class:`~lightning_autobalance.core.losses.LDAMLoss` (LDAM with its DRW epoch; the network's linear
            ``head`` becomes a cosine head), :class:`~lightning_autobalance.core.losses.FocalLoss`,
            :class:`~lightning_autobalance.core.losses.GroupDROLoss` (needs groups), or one's own nn.Module or
            callable; in YAML a ``class_path`` with its ``init_args``. A criterion with a ``for_model(class_counts,
            num_groups)`` method is sized by it: ``LDAMLoss(drw_epoch=30)`` and ``GroupDROLoss(step_size=0.1)``
            leave out their sizes and get the model's (given sizes must match it). One with ``set_epoch(epoch)`` is
            told the epoch at the start of every training epoch. The names ``"ldam"``, ``"focal"`` and
            ``"group_dro"`` stand for ``LDAMLoss()``, ``FocalLoss()`` and ``GroupDROLoss()`` with their defaults
            (:data:`NAMED_LOSSES`). Checkpoints: the hyperparameters hold a name as given, and a loss object in
            LightningCLI's form (``{"class_path": ..., "init_args": ...}``, what the CLI records too) when it keeps
            its constructor's arguments in ``init_args`` (the package's losses do); ``load_from_checkpoint(path)``
            rebuilds it and its state (e.g. ``GroupDROLoss``'s ``q``) comes from the checkpoint. Any other object (a
            function, a module of one's own) is held as ``{"not_saved": its class}``: ``load_from_checkpoint(path)``
            then raises a ``ValueError`` asking for it, ``load_from_checkpoint(path, loss=...)`` works.
        preset: starting point of the AutoBalance loss (``"ce"``, ``"la"``, ``"cdt"``, ``"vs"``,
            ``"class_balanced"``, ``"inverse_frequency"``).
        search: which of ``"delta"``, ``"offset"``, ``"weight"`` an :class:`~lightning_autobalance.AutoBalanceCallback`
            may change (default: the offsets, from the ``"la"`` start; see ``docs/tuning.md``); with ``"augment"``
            also a per-class augmentation of the training batches (``augmentation``), applied in ``training_step``.
        parametrization: ``"hierarchical"`` (default: shared scalars plus per-class residuals), ``"class"``,
            ``"groups"`` or ``"dataset"`` (see :mod:`lightning_autobalance.core.parametrization`).
        group_size: classes per frequency bin for ``parametrization="groups"``.
        num_groups: sensitive groups (class x group tables; linked from a group datamodule by the CLI).
        group_counts: training samples per (group, class) cell, ``G x K`` (linked from a group datamodule): the
            presets are then built per cell (e.g. ``"group_balanced"`` weights, ``"la"`` offsets ``log p(y | g)``).
        preset_kwargs: ``tau``, ``gamma``, ``beta`` of the preset.
        reduction: ``"mean"`` or ``"weighted_mean"``.
        loss_file: start from (and by default freeze) a loss exported by a search.
        freeze_loss: freeze the loss parameters.
        ldam_max_margin, ldam_scale, drw_epoch, focal_gamma, dro_step_size: deprecated (removed in the next
            release; a ``FutureWarning`` says so): the settings of a loss given by name, now set on its value
            (``LDAMLoss(max_margin=..., scale=..., drw_epoch=...)``, ``FocalLoss(gamma=...)``,
            ``GroupDROLoss(step_size=...)``). ``None``: not given (so ``drw_epoch=None`` no longer switches DRW off:
            ``LDAMLoss(drw_epoch=None)`` does). Given with a loss value they raise a ``ValueError``.
        optimizer: a callable ``params -> Optimizer`` (LightningCLI's ``OptimizerCallable``; in YAML a ``class_path``
            such as ``torch.optim.SGD`` with its ``init_args``). None: ``torch.optim.SGD(params, lr=0.1,
            momentum=0.9, weight_decay=2e-4)``.
        lr_scheduler: a callable ``optimizer -> LRScheduler`` (LightningCLI's ``LRSchedulerCallable``). A
            :class:`~lightning_autobalance.core.lr_schedule.WarmupDecayLR` is sized to the run (``fit_to_run``) and
            stepped every optimizer step; any other scheduler is stepped every epoch (a ``ReduceLROnPlateau``
            watches its own ``monitor`` when it has one, as LightningCLI's does, else ``val/balanced_error``).
            None: ``WarmupDecayLR(optimizer)`` (cosine to 0 over the run, no warm-up); for a constant rate give
            ``WarmupDecayLR`` with ``schedule: constant``.
        channels_last: use the ``channels_last`` memory format for image inputs (faster convolutions on CPU).
        log_max_classes: log the error of every class up to this many classes.
        augmentation: the searched augmentation when ``search`` names ``"augment"``: a mapping with the fields of
            :class:`~lightning_autobalance.core.augment.AugmentSettings` (``ops``, ``gated``, ``max_shift``, ...)
            and optionally ``parametrization``, ``group_size``, ``start`` and ``seed`` (see
            :meth:`~lightning_autobalance.AutoBalanceMixin.configure_augment`). ``None``: flip and shift, in the
            loss's parametrisation. It acts on top of the datamodule's own augmentation.

    Example:
        >>> model = ImbalancedClassifier("digits_net", num_classes=10, class_counts=[100] * 5 + [10] * 5, preset="la")
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])

        The loss as a value with its settings (``LDAMLoss`` sized for the model), or a criterion of one's own:

        >>> from lightning_autobalance.core.losses import FocalLoss, LDAMLoss
        >>> focal = ImbalancedClassifier("digits_net", 10, [100] * 5 + [10] * 5, loss=FocalLoss(gamma=2.0))
        >>> ldam = ImbalancedClassifier("digits_net", 10, [100] * 5 + [10] * 5, loss=LDAMLoss(drw_epoch=30))
        >>> ldam.hparams.loss["init_args"]["drw_epoch"], ldam.criterion.margins.shape
        (30, torch.Size([10]))
        >>> def hinge(logits, target, group):
        ...     return nn.functional.multi_margin_loss(logits, target)
        >>> custom = ImbalancedClassifier("digits_net", 10, [100] * 5 + [10] * 5, loss=hinge)

        In a LightningCLI YAML::

            model:
              loss:
                class_path: lightning_autobalance.core.losses.LDAMLoss
                init_args: {drw_epoch: 30}
    """

    def __init__(self, network: str | Callable[[int], nn.Module] = "resnet32", num_classes: int = 10,
                 class_counts: list[int] | None = None, loss: LossName | nn.Module | Criterion = "autobalance",
                 preset: str = "la", search: Sequence[str] = ("offset",),
                 parametrization: ParametrizationKind = "hierarchical", group_size: int = 1,
                 num_groups: int | None = None, group_counts: list[list[int]] | None = None,
                 preset_kwargs: dict[str, float] | None = None, reduction: Reduction = "mean",
                 loss_file: str | None = None, freeze_loss: bool = False, ldam_max_margin: float | None = None,
                 ldam_scale: float | None = None, drw_epoch: int | None = None, focal_gamma: float | None = None,
                 dro_step_size: float | None = None, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None, channels_last: bool = False,
                 log_max_classes: int = 100, augmentation: dict[str, Any] | None = None) -> None:
        super().__init__()
        if class_counts is None:
            raise ValueError("ImbalancedClassifier needs class_counts (samples per class); from the CLI they are "
                             "linked from the datamodule's class_counts.")
        if len(class_counts) != num_classes:
            raise ValueError(f"class_counts has {len(class_counts)} entries but num_classes is {num_classes}.")
        loss_counts: Any = class_counts
        if group_counts is not None:
            table = torch.as_tensor(group_counts)
            if table.ndim != 2 or table.shape[1] != num_classes:
                raise ValueError(f"group_counts must be a G x K table with K={num_classes}; got shape "
                                 f"{tuple(table.shape)}.")
            if num_groups is not None and table.shape[0] != num_groups:
                raise ValueError(f"group_counts has {table.shape[0]} rows but num_groups is {num_groups}.")
            if table.sum(dim=0).tolist() != [int(c) for c in class_counts]:
                raise ValueError(f"group_counts (summed over groups: {table.sum(dim=0).tolist()}) do not match "
                                 f"class_counts {list(class_counts)}.")
            num_groups = table.shape[0]
            loss_counts = group_counts
        flat = {"ldam_max_margin": ldam_max_margin, "ldam_scale": ldam_scale, "drw_epoch": drw_epoch,
                "focal_gamma": focal_gamma, "dro_step_size": dro_step_size}
        settings = {k: v for k, v in flat.items() if v is not None}
        given = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        if settings and not isinstance(loss, str):
            raise ValueError(f"{given} would be ignored: these deprecated arguments configure a loss given by name, "
                             f"but loss is a {type(loss).__name__} object: set them on it (e.g. FocalLoss(gamma=...), "
                             f"LDAMLoss(max_margin=..., scale=..., drw_epoch=...), GroupDROLoss(step_size=...)).")
        if settings:
            rank_zero_warn(f"ImbalancedClassifier({given}) is deprecated and will be removed in the next release: "
                           "give the loss as a value with its settings, e.g. loss=LDAMLoss(drw_epoch=30); in YAML "
                           "`loss: {class_path: lightning_autobalance.core.losses.LDAMLoss, init_args: {drw_epoch: "
                           "30}}`, for the pipeline's baselines `baseline_losses: {ldam_drw: <the same>}`.",
                           category=FutureWarning)
        criterion = _criterion(loss, settings, list(class_counts), num_classes, num_groups)
        _check_optimization(optimizer, lr_scheduler)
        with warnings.catch_warnings():  # Lightning's advice to ignore an nn.Module argument: done just below
            warnings.filterwarnings("ignore", message="Attribute 'loss' is an instance of `nn.Module`")
            self.save_hyperparameters()
        if not isinstance(loss, (str, Mapping)) and self.hparams.get("loss") is loss:
            # A loss object given in Python (through the CLI the hyperparameters hold its class_path already): held as
            # LightningCLI holds it, so that checkpoints stay plain data (see the docstring).
            self.save_hyperparameters(ignore=["loss"])
            self.hparams["loss"] = loss_config(loss)
        self.network = build_network(network, num_classes) if isinstance(network, str) else network(num_classes)
        self.optimizer_fn = optimizer
        self.lr_scheduler_fn = lr_scheduler
        family = criterion is None  # the AutoBalance loss trains (and may be searched); else it is plain CE, unused
        self.configure_autobalance(loss_counts, preset=preset if family else "ce", search=search if family else (),
                                   parametrization=parametrization, group_size=group_size, num_groups=num_groups,
                                   reduction=reduction, preset_kwargs=preset_kwargs, loss_file=loss_file,
                                   freeze=freeze_loss or loss_file is not None)
        if augmentation is not None:  # not ``augment``: the datamodules' hyperparameter of their own augmentation
            given = dict(augmentation)
            extra = {k: given.pop(k) for k in ("parametrization", "group_size", "start", "seed") if k in given}
            self.configure_augment(given, **extra)
        if isinstance(criterion, LDAMLoss):
            head = getattr(self.network, "head", None)
            if not isinstance(head, nn.Linear):
                raise ValueError("LDAM (loss='ldam' or an LDAMLoss) needs a network with a linear `head` attribute to "
                                 "replace by a cosine head (NormedLinear).")
            self.network.head = NormedLinear(head.in_features, head.out_features)
        self.criterion: nn.Module | Criterion | None = criterion
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.class_counts = list(class_counts)
        self.shot_groups = head_medium_tail(class_counts)
        metric_args = {"num_classes": num_classes}
        self.val_accuracy = MulticlassAccuracy(average="macro", **metric_args)
        self.val_recall = MulticlassRecall(average="none", **metric_args)
        self.test_accuracy = MulticlassAccuracy(average="macro", **metric_args)
        self.test_recall = MulticlassRecall(average="none", **metric_args)
        self.num_groups = int(num_groups or 1)
        self.val_groups = GroupErrors(num_classes, self.num_groups) if self.num_groups > 1 else None
        self.test_groups = GroupErrors(num_classes, self.num_groups) if self.num_groups > 1 else None
        self.test_report: dict[str, Any] = {}

    @override
    def forward(self, x: Tensor) -> Tensor:
        if self.hparams.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.network(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, g = self.autobalance_unpack(batch)
        x = self.autobalance_augment(x, y, g)  # the identity unless "augment" is searched
        logits = self(x)
        if self.criterion is not None:
            loss = self.criterion(logits, y, g)
            if not (isinstance(loss, Tensor) and loss.ndim == 0):
                raise ValueError(f"The loss criterion must return a scalar tensor; {type(self.criterion).__name__} "
                                 f"returned {type(loss).__name__}"
                                 f"{f' of shape {tuple(loss.shape)}' if isinstance(loss, Tensor) else ''}.")
        else:
            loss = self.autobalance_loss(logits, y, g)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    @override
    def on_fit_start(self) -> None:
        drw_epoch = self.criterion.drw_epoch if isinstance(self.criterion, LDAMLoss) else None
        max_epochs = self.trainer.max_epochs
        if drw_epoch is not None and max_epochs is not None and 0 <= max_epochs <= drw_epoch:
            rank_zero_warn(f"LDAM's deferred re-weighting starts at epoch drw_epoch={drw_epoch}, but the Trainer stops "
                           f"after max_epochs={max_epochs}: this fit is plain LDAM without DRW. Set "
                           f"LDAMLoss(drw_epoch=...) below max_epochs (the pipeline: baseline_losses; the paper uses "
                           f"80% of the epochs: 160 of 200).")

    @override
    def on_train_epoch_start(self) -> None:
        set_epoch = getattr(self.criterion, "set_epoch", None)  # LDAMLoss's deferred re-weighting, or one's own
        if callable(set_epoch):
            set_epoch(self.current_epoch)

    def _eval_step(self, batch: Any, accuracy: MulticlassAccuracy, recall: MulticlassRecall,
                   groups: GroupErrors | None) -> None:
        x, y, g = self.autobalance_unpack(batch)
        preds = self(x).argmax(dim=-1)
        accuracy.update(preds, y)
        recall.update(preds, y)
        if groups is not None and g is not None:
            groups.update(preds, y, g)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_accuracy, self.val_recall, self.val_groups)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_accuracy, self.test_recall, self.test_groups)

    def _report(self, accuracy: MulticlassAccuracy, recall: MulticlassRecall,
                groups: GroupErrors | None = None) -> dict[str, Any]:
        per_class = (1.0 - recall.compute().double()).cpu()
        report: dict[str, Any] = {"balanced_error": float(1.0 - accuracy.compute()),
                                  "per_class_error": per_class.tolist()}
        for name in ("head", "medium", "tail"):
            members = [c for c, s in enumerate(self.shot_groups) if s == name]
            report[f"{name}_error"] = float(per_class[members].mean()) if members else float("nan")
        report["worst_class_error"] = float(per_class.max())
        accuracy.reset()
        recall.reset()
        if groups is not None and groups.update_called:  # only when the batches carried groups
            report.update(groups.compute())
        if groups is not None:
            groups.reset()
        return report

    def _log_report(self, stage: str, report: dict[str, Any]) -> None:
        metrics = {f"{stage}/{k}": v for k, v in report.items() if isinstance(v, float) and not math.isnan(v)}
        per_class = report["per_class_error"]
        width = len(str(len(per_class) - 1))
        if len(per_class) <= self.hparams.log_max_classes:
            metrics.update({f"{stage}/class_error/{c:0{width}d}": e for c, e in enumerate(per_class)})
        if "cell_error" in report:
            metrics.update({f"{stage}/group_error/g{g}": e for g, e in enumerate(report["group_error"])
                            if not math.isnan(e)})
            if len(per_class) * self.num_groups <= self.hparams.log_max_classes:
                metrics.update({f"{stage}/cell_error/g{g}_{c:0{width}d}": e
                                for g, row in enumerate(report["cell_error"]) for c, e in enumerate(row)
                                if not math.isnan(e)})
        self.log_dict(metrics, prog_bar=False)
        self.log(f"{stage}_bal_err", report["balanced_error"], prog_bar=True, logger=False)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_report("val", self._report(self.val_accuracy, self.val_recall, self.val_groups))

    @override
    def on_test_epoch_end(self) -> None:
        self.test_report = self._report(self.test_accuracy, self.test_recall, self.test_groups)
        self._log_report("test", self.test_report)

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_fn is not None:
            optimizer = self.optimizer_fn(params)
        else:
            optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)
        trainer = self._attached_trainer()
        total = getattr(trainer, "estimated_stepping_batches", math.inf) if trainer is not None else math.inf
        max_epochs = getattr(trainer, "max_epochs", None)
        epochs = max_epochs if max_epochs not in (None, -1) else None
        known = math.isfinite(total) and bool(epochs)
        if self.lr_scheduler_fn is None and not known:  # a run of unknown length: the optimizer's own rate throughout
            return optimizer
        scheduler = self.lr_scheduler_fn(optimizer) if self.lr_scheduler_fn is not None else WarmupDecayLR(optimizer)
        if not isinstance(scheduler, WarmupDecayLR):  # in the scheduler's own units: stepped every epoch
            config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                config["monitor"] = getattr(scheduler, "monitor", None) or "val/balanced_error"  # Lightning's has one
            return {"optimizer": optimizer, "lr_scheduler": config}
        if not known:
            return optimizer
        assert epochs is not None
        scheduler.fit_to_run(max(total / epochs, 1.0), epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _attached_trainer(self) -> pl.Trainer | None:
        """The trainer this module is attached to, or None (built outside a fit, e.g. to be exported)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's "... is not attached to a `Trainer`"
            return None
