"""``AutoBalanceMixin``: gives an existing LightningModule a learnable AutoBalance training loss."""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_autobalance.core.augment import AugmentSettings, Draws, augment, identity_start
from lightning_autobalance.core.augment_parametrization import (
    AUGMENT_KINDS,
    AugmentKind,
    AugmentParameters,
    coerce_settings,
)
from lightning_autobalance.core.losses import (
    AdjustedCrossEntropy,
    LossTables,
    Reduction,
    adjusted_cross_entropy,
    as_count_table,
    load_loss_tables,
    save_loss_tables,
)
from lightning_autobalance.core.parametrization import (
    PARAMETRIZATIONS,
    LossParametrization,
    ParametrizationKind,
    PerClass,
    build_parametrization,
)
from lightning_autobalance.data.search_split import SearchSplit, dataset_targets

__all__ = ["AUGMENT", "AugmentRecord", "AutoBalanceMixin", "MixinState", "loss_from_file", "training_loader",
           "unpack_batch"]

#: the name in ``configure_autobalance(search=...)`` that turns the searched augmentation on
AUGMENT = "augment"


def _search_names(search: Sequence[str] | str) -> list[str]:
    items = search.replace("+", ",").split(",") if isinstance(search, str) else list(search)
    return [str(s).strip().lower() for s in items if str(s).strip()]


def _loss_search(search: Sequence[str] | str) -> tuple[str, ...]:
    """What the loss's parametrisation searches: ``search`` without :data:`AUGMENT`."""
    return tuple(s for s in _search_names(search) if s != AUGMENT)


class AugmentRecord(NamedTuple):
    """What :meth:`AutoBalanceMixin.autobalance_augment` was given and drew, kept for the hyper step: the clean
    inputs, labels, groups (``None`` where the tables have one row) and the draws."""

    inputs: Tensor
    target: Tensor
    group: Tensor | None
    draws: Draws


def unpack_batch(batch: Any) -> tuple[Any, Tensor, Tensor | None]:
    """Splits a batch into ``(inputs, target, group)``.

    Understands ``(x, y)`` and ``(x, y, g)`` tuples or lists and mappings with keys ``x``/``input``/``inputs``,
    ``y``/``target``/``label`` and optionally ``g``/``group``.

    Raises:
        ValueError: for any other layout, saying which layouts are understood.
    """
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    if isinstance(batch, Mapping):
        def pick(*keys: str) -> Any:
            return next((batch[k] for k in keys if k in batch), None)

        x, y, g = pick("x", "input", "inputs"), pick("y", "target", "targets", "label"), pick("g", "group")
        if x is not None and y is not None:
            return x, y, g
    kind = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    raise ValueError(f"Cannot unpack a batch of type {kind}: expected (x, y), (x, y, g) or a mapping with keys "
                     "'x' and 'y' (and optionally 'g'). Override `autobalance_unpack(batch)` for other layouts.")


def loss_from_file(path: str | Path, class_counts: Any) -> tuple[PerClass, dict[str, Any]]:
    """A fixed loss (a :class:`PerClass` with nothing searched) from a file written by ``export_loss``.

    When the file records its parametrisation and free values (files from :meth:`AutoBalanceMixin.export_loss`),
    the parametrisation is rebuilt on ``class_counts`` and the free values copied in: the searched deviation from
    the preset is kept while the preset itself follows the counts the model is now trained on. (A loss searched on
    an 80% split and exported as absolute tables would carry that split's rounding of the tail counts, e.g. a tail
    class of 1 sample out of 2, into retraining on the whole set.) Other files give their tables as they are.

    When the file also holds an ``augmentation`` section (the searched augmentation, written by ``export_loss`` from
    a module that had one), it is rebuilt alike on the loss's counts
    (:meth:`~lightning_autobalance.core.augment_parametrization.AugmentParameters.from_record`) and returned as
    ``info["augment_parameters"]``, not frozen (the caller decides); ``None`` for files without one.

    Raises:
        ValueError: if the file's number of classes differs from ``class_counts``, or its augmentation does not fit
            (its tables, classes or groups), naming the field and what was expected.
    """
    tables, info = load_loss_tables(path)
    k = torch.as_tensor(class_counts).shape[-1]
    if tables.num_classes != k:
        raise ValueError(f"Loss file {str(path)!r} has {tables.num_classes} classes but class_counts has {k}.")
    alpha = info.get("alpha")
    if isinstance(alpha, dict) and "parametrization" in info:
        rebuilt = _rebuild(info["parametrization"], class_counts, info, tables.num_groups)
        free = rebuilt.alpha()
        if set(free) != set(alpha):
            raise ValueError(f"Loss file {str(path)!r}: free values {sorted(alpha)} do not match its "
                             f"parametrisation's {sorted(free)}.")
        with torch.no_grad():
            for name, value in alpha.items():
                value = torch.as_tensor(value, dtype=free[name].dtype)
                if value.shape != free[name].shape:
                    raise ValueError(f"Loss file {str(path)!r}: {name} has shape {tuple(value.shape)}, expected "
                                     f"{tuple(free[name].shape)}.")
                free[name].copy_(value)
            tables = rebuilt.retraining_tables()
    decision = info.get("decision")
    if isinstance(decision, Mapping) and decision.get("decision") == "pending":
        rank_zero_warn(f"Loss file {str(path)!r} was written before the held-back check ruled on its loss (from a "
                       "checkpoint saved during the search): the check may have put the start back. Export the loss "
                       "from the module or checkpoint at the end of the search.")
    loss = PerClass.from_tables(LossTables(*(t.detach().float() for t in tables)), class_counts)
    loss.decision = dict(decision) if isinstance(decision, Mapping) else None
    section = info.get("augmentation")
    info["augment_parameters"] = None if section is None else AugmentParameters.from_record(
        section, loss.class_counts, where=f"Loss file {str(path)!r}: augmentation")
    return loss, info


def _rebuild(kind: str, class_counts: Any, saved: Mapping[str, Any], num_groups: int | None) -> LossParametrization:
    """A parametrisation of ``kind`` on ``class_counts`` with the settings a loss file or a state dict saved."""
    return build_parametrization(kind, class_counts, preset=saved.get("preset", "ce"), search=saved.get("search", ()),
                                 num_groups=num_groups, group_size=int(saved.get("group_size", 1)),
                                 preset_kwargs=saved.get("preset_kwargs"))


#: What a module that never calls ``configure_autobalance`` searches (the defaults of that method).
_DEFAULTS: dict[str, Any] = {"preset": "la", "search": ("offset",), "parametrization": "hierarchical",
                             "group_size": 1, "num_groups": None, "reduction": "mean", "preset_kwargs": None,
                             "loss_file": None, "freeze": False, "num_classes": None}
#: Training calls of ``autobalance_loss`` in a row whose loss never reached backward before that is an error.
_UNREACHED_LIMIT = 3


@dataclass
class MixinState:
    """What the mixin keeps on a module beside its loss parameters, in one place (``module._autobalance_state``)."""

    #: the settings given to ``configure_autobalance`` (``{"like": True}`` for a loss copied with
    #: ``autobalance_like``; ``None``: never called, the defaults)
    config: dict[str, Any] | None = None
    #: the counts were given (or copied) explicitly: a checkpoint's counts must then match them
    explicit: bool = False
    #: where counts found at setup came from (for error messages)
    found_from: str | None = None
    #: the state-dict hooks are registered
    hooked: bool = False
    #: the callback asked for the next training logits, and the logits kept for it
    record: bool = False
    recorded: Tensor | None = None
    #: the loss tables with the versions of the parameters they were computed from
    cache: tuple[Any, LossTables] | None = None
    #: checks made once: the logits looked at for log-probabilities; the fit (``id`` of its Trainer) whose counts
    #: were compared with the labels, and whose searching callback was looked for
    checked_logprobs: bool = False
    counts_checked: int | None = None
    search_checked: int | None = None
    #: the fit (``id`` of its Trainer) an AutoBalanceCallback set this module up for
    searched_by: int | None = None
    #: the searched augmentation: the settings given to ``configure_augment``, what ``autobalance_augment`` kept for
    #: the callback (asked with the logits), and its tables with the versions of the values they were computed from
    augment: dict[str, Any] | None = None
    #: the augmentation a loss file held (``configure_autobalance(loss_file=...)`` or ``load_loss``): it wins over
    #: ``configure_augment``'s settings and is built whether or not ``search`` names ``"augment"``
    augment_loaded: AugmentParameters | None = None
    augmented: AugmentRecord | None = None
    augment_cache: tuple[Any, dict[str, Tensor]] | None = None


def _mark_reached(flag: list[bool], grad: Tensor) -> None:
    flag[0] = True


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _same_counts(class_counts: Any, params: LossParametrization, num_groups: int | None) -> bool:
    try:
        table = as_count_table(class_counts, num_groups=num_groups)
    except ValueError:
        return False
    return tuple(table.shape) == tuple(params.class_counts.shape) and bool(
        torch.equal(table.to(params.class_counts), params.class_counts))


def _first_loader(loader: Any) -> Any:
    """The first of several training dataloaders (a list, a mapping or a ``CombinedLoader``)."""
    iterables = getattr(loader, "iterables", None)
    if iterables is not None and not hasattr(loader, "dataset"):
        loader = iterables
    if isinstance(loader, (list, tuple)):
        return _first_loader(loader[0]) if loader else None
    if isinstance(loader, Mapping):
        return _first_loader(next(iter(loader.values()), None))
    return loader


def training_loader(trainer: Any) -> Any:
    """The fit's training dataloader: the loop's own once it has one, else the one the Trainer would ask for
    (``fit(train_dataloaders=...)``, the datamodule's or the module's ``train_dataloader()``). Before the loop
    has its data this reads ``trainer.fit_loop._data_source`` (private, checked in tests/test_real_shapes.py), as
    the callback reads the validation loop's."""
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is not None and source.is_defined():
            try:
                loader = source.dataloader()
            except Exception:  # e.g. a datamodule whose train_dataloader() needs setup("fit")
                loader = None
    return _first_loader(loader)


def _save_settings(module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict hook: adds the reduction and the preset's settings to the loss's saved settings, so that a module
    rebuilt from the state dict alone gets the same loss."""
    key = prefix + "autobalance._extra_state"
    params = module._autobalance_built() if isinstance(module, AutoBalanceMixin) else None
    if params is not None and isinstance(state_dict.get(key), Mapping):
        state_dict[key] = {**state_dict[key], "reduction": module.autobalance_reduction,
                           "preset_kwargs": dict(params.preset_kwargs)}


def _restore_from_state(module: Any, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: builds the loss from the saved counts when the module has none yet (a module whose
    counts were found at setup, rebuilt with ``load_from_checkpoint`` or for ``trainer.test(ckpt_path=...)``)."""
    if isinstance(module, AutoBalanceMixin) and prefix + "autobalance.class_counts" in state_dict:
        module._autobalance_restore(state_dict, prefix)
    if isinstance(module, AutoBalanceMixin) and prefix + "autobalance_augmentation.class_counts" in state_dict:
        module._autobalance_restore_augment(state_dict, prefix)


class AutoBalanceMixin:
    """Adds a learnable AutoBalance loss to a :class:`~pytorch_lightning.LightningModule`.

    Put the mixin *before* ``LightningModule`` in the bases (after it, call :meth:`configure_autobalance` in
    ``__init__``, with or without counts, so that a fresh module can load a checkpoint) and use :meth:`autobalance_loss`
    as the training loss; add :class:`~lightning_autobalance.AutoBalanceCallback` to the Trainer. That is all a module
    needs: the class counts are found when the Trainer sets the module up (see :meth:`configure_autobalance` for where
    from), saved in the module's checkpoints, and restored by ``load_from_checkpoint``, ``trainer.test(ckpt_path=...)``
    or ``load_state_dict`` on a freshly built module. Call :meth:`configure_autobalance` (in ``__init__`` or in
    ``setup``) only to choose another loss family or to give the counts yourself.

    The loss parameters live in a submodule (``self.autobalance``) as buffers: they are saved in the module's
    ``state_dict`` (so even a weights-only checkpoint restores the learned loss) but are not ``nn.Parameter``\\ s, so
    the model's optimizer, including LightningCLI's automatic one, never trains them. The callback updates them.

    A module built around another's trained network (e.g. a stochastic-weight-averaging module made from a trained
    one) takes the found loss with one line, ``swa_module.autobalance_like(trained_module)``.

    For the callback, the mixin also says how to read a batch (:meth:`autobalance_unpack`) and how to get logits from
    inputs (:meth:`autobalance_forward`); the defaults handle ``(x, y)``/``(x, y, g)`` batches and ``self(x)``. Override
    them for other layouts. :attr:`autobalance_loss_calls` counts the calls of :meth:`autobalance_loss` in training
    mode, which lets the callback tell a training step that never uses the searched loss.

    Example:
        >>> import pytorch_lightning as pl
        >>> class Net(AutoBalanceMixin, pl.LightningModule):
        ...     def __init__(self, class_counts):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(4, len(class_counts))
        ...         self.configure_autobalance(class_counts, preset="la")
        ...     def forward(self, x):
        ...         return self.layer(x)
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return self.autobalance_loss(self(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> net = Net([100, 10, 1])
        >>> [name for name, _ in net.named_parameters()]
        ['layer.weight', 'layer.bias']
    """

    autobalance_reduction: Reduction = "mean"
    #: Whether :meth:`autobalance_loss` checks labels, groups and logits on every call (one host synchronisation
    #: per step); set ``self.autobalance_validate = False`` to skip the checks.
    autobalance_validate: bool = True
    #: Calls of :meth:`autobalance_loss` while the module is in training mode (``self.training``), over its life.
    #: :class:`~lightning_autobalance.AutoBalanceCallback` reads it to stop a fit whose training step never calls
    #: the searched loss.
    autobalance_loss_calls: int = 0

    @property
    def _autobalance_state(self) -> MixinState:
        """The mixin's state, one object (made on first use: a module may call the mixin before its own
        ``__init__`` has run)."""
        state = self.__dict__.get("_autobalance_state_")
        if state is None:
            state = self.__dict__["_autobalance_state_"] = MixinState()
        return state

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._autobalance_install_hooks()

    def configure_autobalance(self, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor | None = None,
                              preset: str = "la", search: Sequence[str] | str = ("offset",),
                              parametrization: ParametrizationKind = "hierarchical", group_size: int = 1,
                              num_groups: int | None = None, reduction: Reduction = "mean",
                              preset_kwargs: Mapping[str, Any] | None = None, loss_file: str | Path | None = None,
                              freeze: bool = False, num_classes: int | None = None,
                              **deprecated: Any) -> LossParametrization | None:
        """Chooses the loss family to search and, optionally, the class counts; call it in ``__init__`` or ``setup``.

        Optional: a module that never calls it searches the default family below on counts it finds itself.

        **Where the counts come from.** Given ``class_counts`` win. Without them the loss is built when the Trainer
        first needs it (the callback's ``setup``, or the first training step), from the first of: the datamodule's
        ``class_counts`` attribute; a :class:`~lightning_autobalance.data.SearchSplit` (the result of
        ``search_split``) stored on the datamodule; the labels of the training data (a ``targets`` attribute,
        ``Subset``/``random_split`` chains, a ``TensorDataset``, or every sample read once). The counts are saved in
        the module's ``state_dict``, so a module rebuilt from a checkpoint gets them back without data. Given
        counts are compared once per fit with the training data's labels where those are cheap to read, with a
        warning when their class frequencies disagree (e.g. counts in reversed order).

        Calling it again with the same settings (e.g. from a ``setup`` that runs for every stage) keeps the loss
        found so far.

        Args:
            class_counts: training samples per class (``K`` values), or a ``G x K`` table per (group, class);
                ``None`` (default): found at setup, see above.
            preset: the starting loss (``"ce"``, ``"la"``, ``"cdt"``, ``"vs"``, ``"class_balanced"``,
                ``"inverse_frequency"`` or an alias; see :func:`~lightning_autobalance.core.losses.preset_tables`).
            search: which of ``"delta"``, ``"offset"``, ``"weight"`` the search may change. The default, the offsets
                from a logit-adjustment start, is the setting that never did worse than logit adjustment in our
                tuning (``docs/tuning.md``); it is also indifferent to a ``forward`` that returns ``log_softmax``.
                The multiplicative ``delta`` has a hypergradient about the size of the logits times that of the
                offsets and is best searched on its own learning rate.
            parametrization: ``"hierarchical"`` (default: the dataset-level scalars gamma, tau, omega that move
                every class together, plus a residual per class), ``"class"`` (one value per class), ``"groups"``
                (bins of ``group_size`` classes by frequency) or ``"dataset"`` (the three scalars alone).
            group_size: classes per frequency bin for ``parametrization="groups"``.
            num_groups: number of sensitive groups ``G`` (class x group tables); batches then carry groups.
            reduction: ``"mean"`` or ``"weighted_mean"``
                (see :func:`~lightning_autobalance.core.losses.adjusted_cross_entropy`).
            preset_kwargs: preset settings (``tau``, ``gamma``, ``beta``).
            loss_file: start from a loss exported by :meth:`export_loss` instead of a preset (e.g. to retrain).
            freeze: freeze the loss (the callback will not change it), e.g. when retraining with a found loss.
            num_classes: the number of classes ``K`` when the counts are found from the labels (a class absent
                from the training data then gets a clear error instead of a shorter count list).
            **deprecated: the spellings of earlier versions, still taken with a ``FutureWarning``:
                ``validate_inputs=False`` is ``self.autobalance_validate = False`` (checks of labels, groups and logits
                on every call, one host synchronisation per step) and ``like=other`` is :meth:`autobalance_like`.

        Returns:
            The parametrisation module (also ``self.autobalance``), or ``None`` while the counts are not known yet.
        """
        if reduction not in ("mean", "weighted_mean"):
            raise ValueError(f"reduction must be 'mean' or 'weighted_mean' for a training loss; got {reduction!r}.")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer or None; got {num_classes!r}.")
        like = self._autobalance_deprecated(deprecated)
        self._autobalance_install_hooks()
        if like is not None:
            return self.autobalance_like(like, freeze=freeze, class_counts=class_counts)
        config = {"preset": preset, "search": search, "parametrization": parametrization, "group_size": group_size,
                  "num_groups": num_groups, "reduction": reduction,
                  "preset_kwargs": dict(preset_kwargs) if preset_kwargs is not None else None,
                  "loss_file": None if loss_file is None else str(loss_file), "freeze": bool(freeze),
                  "num_classes": num_classes}
        existing = self._autobalance_built()
        previous = self._autobalance_state.config or {}
        if existing is not None and ((class_counts is None and (previous == config or previous.get("like")))
                                     or (previous == config and _same_counts(class_counts, existing, num_groups))):
            return existing  # called again (e.g. setup for every stage), or a loss taken with autobalance_like
        self._autobalance_state.config = config
        if class_counts is not None:
            self._autobalance_state.explicit = True
        elif existing is None:
            return None  # the counts are found at setup (autobalance_parameters)
        return self._autobalance_build(existing.class_counts if class_counts is None else class_counts)

    def _autobalance_deprecated(self, deprecated: dict[str, Any]) -> AutoBalanceMixin | None:
        """Takes the spellings ``configure_autobalance`` no longer names, with a ``FutureWarning``; returns ``like``."""
        unknown = sorted(set(deprecated) - {"validate_inputs", "like"})
        if unknown:
            raise TypeError(f"configure_autobalance() got an unexpected keyword argument {unknown[0]!r}")
        if "validate_inputs" in deprecated:
            warnings.warn("configure_autobalance(validate_inputs=...) is deprecated: set "
                          "`self.autobalance_validate = ...` instead.", FutureWarning, stacklevel=3)
            self.autobalance_validate = bool(deprecated["validate_inputs"])
        if deprecated.get("like") is not None:
            warnings.warn("configure_autobalance(like=other) is deprecated: call `self.autobalance_like(other)` "
                          "instead.", FutureWarning, stacklevel=3)
        return deprecated.get("like")

    def autobalance_like(self, other: AutoBalanceMixin, freeze: bool = False,
                         class_counts: Any = None) -> LossParametrization:
        """Takes the loss of ``other``, another module with the mixin: its parametrisation, the values found so
        far, its counts and reduction, and its augmentation when it has one (``search=[..., "augment"]`` or from a
        loss file), all copies: later changes to either do not reach the other.

        The one line a module built around another's trained network needs, e.g. stochastic weight averaging::

            swa = SWAModule(trained.model)      # its __init__ ran a bare super().__init__(): a fresh loss
            swa.autobalance_like(trained)       # now it trains on the loss the search found

        Args:
            other: a module with the mixin whose loss is built (e.g. after its fit).
            freeze: freeze the copies (the callback, if any, will not change them).
            class_counts: optional; must then have the shape of ``other``'s counts.

        Raises:
            ValueError: ``class_counts`` does not match ``other``'s, or ``other`` has no loss yet.
        """
        if not isinstance(other, AutoBalanceMixin):
            raise ValueError(f"autobalance_like needs a module with AutoBalanceMixin; got {type(other).__name__}.")
        source = other._autobalance_built()
        if source is None:
            raise ValueError(f"autobalance_like: {type(other).__name__} has no AutoBalance loss yet (its counts are "
                             "found when a Trainer sets it up): call it after that module's fit.")
        if class_counts is not None:
            given = as_count_table(class_counts, num_groups=source.num_groups)
            if tuple(given.shape) != tuple(source.class_counts.shape):
                raise ValueError(f"class_counts has shape {tuple(given.shape)}, but the module given as `like` has "
                                 f"{tuple(source.class_counts.shape)}; omit class_counts to copy that module's.")
        self._autobalance_install_hooks()
        params = copy.deepcopy(source)
        params.frozen = bool(freeze)
        self._autobalance_set(params, other.autobalance_reduction)
        self._autobalance_state.config = {"like": True}
        self._autobalance_state.explicit = True
        self._autobalance_like_augment(other, bool(freeze))
        return params

    def _autobalance_like_augment(self, other: AutoBalanceMixin, freeze: bool) -> None:
        """:meth:`autobalance_like`'s copy of ``other``'s augmentation (its strengths, settings and draw counts),
        frozen with the loss; a module whose ``other`` has none is left without one."""
        source = other._autobalance_augment_built()
        if source is None:
            if self._autobalance_augment_built() is not None:
                del self._modules["autobalance_augmentation"]  # type: ignore[attr-defined]
            self._autobalance_state.augment_loaded = None
            return
        aug = copy.deepcopy(source)
        aug.frozen = freeze
        device = next((t.device for t in self.parameters()), None)  # type: ignore[attr-defined]
        self.autobalance_augmentation = aug if device is None else aug.to(device)
        self._autobalance_state.augment_loaded = self.autobalance_augmentation
        self._autobalance_state.augment_cache = None

    # -- building the loss ---------------------------------------------------------------------------------
    def _autobalance_built(self) -> LossParametrization | None:
        params = self.__dict__.get("_modules", {}).get("autobalance")
        return params if isinstance(params, LossParametrization) else None

    def _autobalance_settings(self) -> dict[str, Any]:
        config = self._autobalance_state.config
        return dict(_DEFAULTS if config is None or config.get("like") else config)

    def _autobalance_build(self, class_counts: Any) -> LossParametrization:
        config = self._autobalance_settings()
        reduction = config["reduction"]
        self._autobalance_state.augment_loaded = None
        if config["loss_file"] is not None:
            params, info = loss_from_file(config["loss_file"], class_counts)
            reduction = info.get("reduction", reduction)
            self._autobalance_state.augment_loaded = info.get("augment_parameters")
        else:
            params = build_parametrization(config["parametrization"], class_counts, preset=config["preset"],
                                           search=_loss_search(config["search"]), num_groups=config["num_groups"],
                                           group_size=config["group_size"], preset_kwargs=config["preset_kwargs"])
        params.frozen = bool(config["freeze"])
        self._autobalance_set(params, reduction)
        self._autobalance_build_augment()
        return params

    def _autobalance_set(self, params: LossParametrization, reduction: str) -> None:
        device = next((t.device for t in self.parameters()), None)  # type: ignore[attr-defined]
        if device is not None:
            params = params.to(device)
        self._autobalance_install_hooks()
        self.autobalance = params
        self.autobalance_reduction = reduction  # type: ignore[assignment]
        self._autobalance_state.cache = None
        self._autobalance_state.recorded = None

    def _autobalance_install_hooks(self) -> None:
        """Registers the state-dict hooks that save the loss settings and rebuild the loss from a checkpoint."""
        if self._autobalance_state.hooked or "_state_dict_hooks" not in self.__dict__:
            return
        self._autobalance_state.hooked = True
        self._register_state_dict_hook(_save_settings)  # type: ignore[attr-defined]
        self._register_load_state_dict_pre_hook(_restore_from_state, with_module=True)  # type: ignore[attr-defined]

    def _autobalance_restore(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Builds the loss from a state dict's counts and settings when this module has none of its own yet."""
        counts = state_dict[prefix + "autobalance.class_counts"]
        saved = state_dict.get(prefix + "autobalance._extra_state")
        saved = dict(saved) if isinstance(saved, Mapping) else {}
        existing = self._autobalance_built()
        if existing is not None:
            fits = (tuple(existing.class_counts.shape) == tuple(counts.shape)
                    and saved.get("kind", existing.kind) == existing.kind
                    and list(saved.get("search", existing.search)) == list(existing.search))
            if fits or self._autobalance_state.explicit:
                return  # the usual load (and its usual errors for counts given explicitly)
        kind = saved.get("kind")
        if kind not in PARAMETRIZATIONS:
            kind = self._autobalance_settings()["parametrization"]
        table = torch.as_tensor(counts).detach().cpu().double()
        params = _rebuild(kind, table, saved, int(table.shape[0]) if table.shape[0] > 1 else None)
        self._autobalance_set(params, saved.get("reduction", self._autobalance_settings()["reduction"]))
        self._autobalance_state.explicit = False

    def _autobalance_trainer(self) -> Any:
        return self.__dict__.get("_trainer")

    def _autobalance_find_counts(self) -> tuple[list[int] | None, str, list[str]]:
        """Class counts from what the attached Trainer has: ``(counts, where from, where it looked)``."""
        trainer = self._autobalance_trainer()
        if trainer is None:
            return None, "", ["(not attached to a Trainer)"]
        looked: list[str] = []
        datamodule = getattr(trainer, "datamodule", None)
        k = self._autobalance_settings().get("num_classes") or _int_or_none(getattr(datamodule, "num_classes", None))
        if datamodule is not None:
            try:
                counts = getattr(datamodule, "class_counts", None)
            except Exception:  # a property that needs what setup() has not made
                counts = None
            if counts is not None:
                return [int(c) for c in torch.as_tensor(counts).flatten().tolist()], \
                    f"{type(datamodule).__name__}.class_counts", looked
            looked.append("the datamodule's `class_counts`")
            splits = [v for v in vars(datamodule).values() if isinstance(v, SearchSplit)]
            if len(splits) == 1:
                return list(splits[0].class_counts), f"the SearchSplit on {type(datamodule).__name__}", looked
            looked.append("a SearchSplit on the datamodule")
        loader = training_loader(trainer)
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            looked.append("the training data (none found)")
            return None, "", looked
        try:
            labels = dataset_targets(dataset)
        except (ValueError, TypeError) as err:
            looked.append(f"the training data's labels ({err})")
            return None, "", looked
        if labels.size == 0:
            looked.append("the training data (empty)")
            return None, "", looked
        top = int(labels.max()) + 1
        counts = np.bincount(labels, minlength=max(k or 0, top)).tolist()
        return counts, f"the labels of the training data ({len(labels)} samples)", looked

    # -- the loss ----------------------------------------------------------------------------------------
    def autobalance_parameters(self) -> LossParametrization:
        """The loss parametrisation (``self.autobalance``), built from the counts found at setup if it is not
        built yet (see :meth:`configure_autobalance`).

        Raises:
            RuntimeError: the counts are not known and cannot be found (e.g. outside a Trainer), saying where it
                looked and what to do.
        """
        params = self._autobalance_built()
        if params is not None:
            return params
        counts, source, looked = self._autobalance_find_counts()
        if counts is None:
            where = "; ".join(looked)
            raise RuntimeError(f"{type(self).__name__} uses AutoBalanceMixin, but its class counts are not known: "
                               f"looked in {where}. Give them with `self.configure_autobalance(class_counts=[...])`, "
                               "a datamodule attribute `class_counts`, or training data with labels.")
        settings = self._autobalance_settings()
        missing = [c for c, n in enumerate(counts) if n == 0]
        if missing:
            raise RuntimeError(f"AutoBalance: {source} has no sample of classes {missing} (counts {counts}); every "
                               "class needs training samples. If these classes do not exist, give "
                               "configure_autobalance(num_classes=...) the real number; else give class_counts.")
        if settings["num_groups"] is not None and settings["num_groups"] > 1:
            raise RuntimeError("AutoBalance: with num_groups the (group, class) counts cannot be found from the "
                               "labels; give configure_autobalance(class_counts=<a G x K table>).")
        params = self._autobalance_build(counts)
        self._autobalance_state.explicit = False
        self._autobalance_state.found_from = source
        rank_zero_info(f"AutoBalance: class counts {counts if len(counts) <= 20 else f'({len(counts)} classes)'} "
                       f"from {source}.")
        return params

    # -- the hand-off to the callback ---------------------------------------------------------------------
    def autobalance_request_logits(self, enabled: bool = True) -> None:
        """Asks :meth:`autobalance_loss` to keep (detached) the logits it is given until the next request.

        :class:`~lightning_autobalance.AutoBalanceCallback` calls it before a training step that a hyper step will
        follow, so that the hyper step reuses that step's logits instead of a forward pass of its own; then
        ``enabled=False`` after it. Either call drops what was kept before.
        """
        self._autobalance_state.record = bool(enabled)
        self._autobalance_state.recorded = None
        self._autobalance_state.augmented = None

    @property
    def autobalance_recorded_logits(self) -> Tensor | None:
        """The detached logits :meth:`autobalance_loss` kept since :meth:`autobalance_request_logits`, or None."""
        return self._autobalance_state.recorded

    def autobalance_tables(self) -> LossTables:
        """The current loss tables (detached; cached until the loss parameters change)."""
        params = self.autobalance_parameters()
        watched = [*params.alpha().values(), params.base_delta, params.base_offset, params.base_weight]
        key = tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in watched)
        if self._autobalance_state.cache is None or self._autobalance_state.cache[0] != key:
            with torch.no_grad():
                self._autobalance_state.cache = (key, LossTables(*(t.detach() for t in params.tables())))
        return self._autobalance_state.cache[1]

    def autobalance_loss(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        """The AutoBalance training loss of a batch: ``w_{g,y} * CE(delta_g * logits + offset_g, y)``, averaged.

        Call it in ``training_step`` on the model's outputs and return (or backpropagate) what it gives: the callback
        searches this loss, so a training step that trains on another one is stopped with an error (see
        :attr:`autobalance_loss_calls`).

        Args:
            logits: the model's scores ``(N, K)``. Raw scores or ``log_softmax`` outputs: the two differ by a
                constant per sample, which additive offsets and weights cannot see, so with the default search
                (offsets only, ``delta`` 1) ``log_softmax`` is harmless. It matters only when ``delta`` is searched or
                differs from 1 (presets ``"vs"``, ``"cdt"``): ``delta`` scales the scores, and the mixin then warns
                once when it sees log-probabilities.
            target: labels ``(N,)`` in ``[0, K)``, ``K = len(class_counts)``.
            group: group indices ``(N,)`` in ``[0, G)`` when the loss has class x group tables.

        Raises:
            ValueError: the logits do not have ``K`` columns.
            RuntimeError: in training mode, logits that carry no gradient (detached, or computed under
                ``torch.no_grad``), or losses from this method that never reached a backward pass on the last three
                training calls: the model would not train on the searched loss.
        """
        params = self.autobalance_parameters()
        if logits.ndim != 2 or logits.shape[1] != params.num_classes:
            explicit = bool(self._autobalance_state.explicit)
            found = None if explicit else self._autobalance_state.found_from
            hint = (f" The counts were found from {found}: if a class has no sample there, give "
                    "configure_autobalance(num_classes=...) (or search_split(..., num_classes=...))."
                    if found else " Pass one count per output of the model.")
            source = (f"configure_autobalance was given class_counts for {params.num_classes} classes" if explicit
                      else f"the loss has {params.num_classes} classes" + (" (its counts found at setup)" if found
                                                                             else ""))
            raise ValueError(f"autobalance_loss: the logits have shape {tuple(logits.shape)}, but {source}: "
                             f"expected (N, {params.num_classes})." + hint)
        training = bool(getattr(self, "training", False))
        if training:
            self.autobalance_loss_calls = self.autobalance_loss_calls + 1
        trainer = self._autobalance_trainer()
        fitting = training and trainer is not None and bool(getattr(trainer, "training", False))
        if fitting:
            self._autobalance_check_wiring(logits)
            self._autobalance_check_counts(params)
            self._autobalance_check_searched(params)
        if self.autobalance_validate and not self._autobalance_state.checked_logprobs:
            self._autobalance_state.checked_logprobs = True
            self._warn_if_log_probabilities(logits, params)
        if self._autobalance_state.record:
            self._autobalance_state.recorded = logits.detach()
        loss = adjusted_cross_entropy(logits, target, *self.autobalance_tables(), group=group,
                                      reduction=self.autobalance_reduction, validate=self.autobalance_validate)
        if fitting and loss.requires_grad:
            reached = [False]
            loss.register_hook(functools.partial(_mark_reached, reached))
            self.__dict__.setdefault("_autobalance_reached", []).append(reached)
            del self.__dict__["_autobalance_reached"][:-_UNREACHED_LIMIT]
        return loss

    def _autobalance_check_wiring(self, logits: Tensor) -> None:
        if torch.is_grad_enabled() and not logits.requires_grad:
            raise RuntimeError("autobalance_loss: in training mode the logits carry no gradient (detached, or computed "
                               "under torch.no_grad): the model would not train on the searched loss. Pass the "
                               "model's outputs as they are, e.g. `self.autobalance_loss(self(x), y)`.")
        kept = self.__dict__.get("_autobalance_reached", [])
        if len(kept) >= _UNREACHED_LIMIT and not any(r[0] for r in kept):
            kept.clear()
            raise RuntimeError(f"autobalance_loss: the losses it returned on the last {_UNREACHED_LIMIT} training "
                               "calls never reached a backward pass, so the model trains on another loss than the one "
                               "searched. Return its value from training_step (or pass it to manual_backward).")

    def _autobalance_check_searched(self, params: LossParametrization) -> None:
        """Once per fit: a loss with something to search, not frozen, fitted by a Trainer without
        :class:`~lightning_autobalance.AutoBalanceCallback` is said to stay as it starts (no silent no-search)."""
        trainer = self._autobalance_trainer()
        state = self._autobalance_state
        if trainer is None or state.search_checked == id(trainer):
            return
        state.search_checked = id(trainer)
        if params.frozen or params.num_free() == 0:
            return
        if state.searched_by == id(trainer):  # set by AutoBalanceCallback.setup
            return
        preset = getattr(params, "preset", None)
        rank_zero_warn(f"AutoBalance: {type(self).__name__} has a loss to search ({params.num_free()} free values), "
                       "but the Trainer has no AutoBalanceCallback: this fit trains on the start loss "
                       f"(preset {preset!r}) and searches nothing. Add AutoBalanceCallback() to the Trainer's "
                       "callbacks to search it; to train on the loss as it is, freeze it "
                       "(configure_autobalance(..., freeze=True) or model.freeze_loss()).")

    def _autobalance_check_counts(self, params: LossParametrization) -> None:
        """Once per fit: given counts against the training data's labels, where those are cheap to read."""
        trainer = self._autobalance_trainer()
        if trainer is None or not self._autobalance_state.explicit or params.num_groups > 1:
            return
        if self._autobalance_state.counts_checked == id(trainer):
            return
        self._autobalance_state.counts_checked = id(trainer)
        dataset = getattr(_first_loader(getattr(trainer, "train_dataloader", None)), "dataset", None)
        labels = dataset_targets(dataset, read=False) if dataset is not None else None
        if labels is None or labels.size == 0:
            return
        given = params.class_counts[0].double().cpu()
        data = torch.as_tensor(np.bincount(labels, minlength=given.numel()), dtype=torch.float64)
        if data.numel() != given.numel():
            rank_zero_warn(f"AutoBalance: the loss has class counts for {given.numel()} classes, but the training "
                           f"data has labels up to {data.numel() - 1}.")
            return
        p_given, p_data = given / given.sum(), data / data.sum()
        both = (given >= 5) & (data >= 5)
        ratio = torch.maximum(p_given / p_data.clamp(min=1e-12), p_data / p_given.clamp(min=1e-12))
        if bool(((ratio > 2.0) & both).any()) or bool(((data == 0) != (given == 0)).any()):
            show = 20
            rank_zero_warn(f"AutoBalance: the class counts given to configure_autobalance "
                           f"{[int(v) for v in given.tolist()[:show]]} disagree with the training data's labels "
                           f"{[int(v) for v in data.tolist()[:show]]} (class frequencies more than 2x apart; e.g. "
                           "counts in another order). Omit class_counts to have them found from the data.")

    def _warn_if_log_probabilities(self, logits: Tensor, params: LossParametrization) -> None:
        """Warns when every row of the first batch is a log-probability vector and ``delta`` matters."""
        delta_matters = "delta" in params.search or bool((self.autobalance_tables().delta != 1).any())
        if not delta_matters or logits.shape[1] < 2 or logits.shape[0] == 0:
            return
        with torch.no_grad():
            rows = torch.logsumexp(logits.detach().float(), dim=1)
            if bool((logits.detach() <= 0).all()) and bool((rows.abs() < 1e-3).all()):
                rank_zero_warn("autobalance_loss: the model's outputs look like log-probabilities (every row's exp "
                               "sums to 1, e.g. forward returns log_softmax). That matters here because delta is "
                               "searched or differs from 1: delta scales the scores, so give the loss the scores "
                               "before log_softmax. (With offsets only, the default search, log_softmax is "
                               "harmless: it shifts every score of a sample by the same constant.)")

    def autobalance_loss_from_tables(self, logits: Tensor, target: Tensor, group: Tensor | None,
                                     tables: LossTables) -> Tensor:
        """The training loss for given tables (differentiable in them); used by the hypergradient."""
        return adjusted_cross_entropy(logits, target, *tables, group=group, reduction=self.autobalance_reduction,
                                      validate=False)

    # -- what the callback needs -------------------------------------------------------------------------
    def autobalance_unpack(self, batch: Any) -> tuple[Any, Tensor, Tensor | None]:
        """Splits a batch into ``(inputs, target, group)``; override for custom batch layouts."""
        return unpack_batch(batch)

    def autobalance_forward(self, inputs: Any) -> Tensor:
        """Returns the logits for ``inputs``; by default ``self(inputs)``. Override if ``forward`` differs."""
        return self(inputs)  # type: ignore[operator]

    # -- the searched augmentation (``search=[..., "augment"]``) ------------------------------------------------
    def configure_augment(
        self,
        settings: AugmentSettings | Mapping[str, Any] | None = None,
        parametrization: AugmentKind | None = None,
        group_size: int | None = None,
        start: Mapping[str, float] | None = None,
        seed: int = 0,
    ) -> AugmentParameters | None:
        """Chooses the searched per-class augmentation; it is on when ``configure_autobalance(search=...)`` names
        ``"augment"`` (then, without this call, ``AugmentSettings()``: flip and shift of images).

        Its free values sit beside the loss's (``self.autobalance_augmentation``, buffers saved in the
        ``state_dict``), in the loss's parametrisation unless another is named, and move with the same hyper
        optimizer. A training step applies it with :meth:`autobalance_augment` before its forward pass.

        Args:
            settings: the ops and their constants
                (:class:`~lightning_autobalance.core.augment.AugmentSettings` or a mapping of its fields); for inputs
                other than images ``(N, C, H, W)`` choose among the generic ops (``mix``, ``erase``, ``noise``).
            parametrization: ``"hierarchical"``, ``"class"``, ``"groups"`` or ``"dataset"``
                (:mod:`~lightning_autobalance.core.augment_parametrization`); default: the loss's.
            group_size: classes per bin for ``"groups"``; default: the loss's.
            start: the start strengths by table name; a table not named starts close to no augmentation
                (:func:`~lightning_autobalance.core.augment.identity_start`: 5% of its limit, a flip with
                probability 0.05), so that a search put back to its start leaves the module's training as it was.
            seed: the seed of the draws (with the process's rank and a count of draws saved with the values).

        Returns:
            The parameters (``self.autobalance_augmentation``), or ``None`` while the loss is not built yet or
            ``"augment"`` is not searched.

        Example:
            >>> import pytorch_lightning as pl
            >>> class Net(AutoBalanceMixin, pl.LightningModule):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.layer = torch.nn.Linear(8, 3)
            ...         self.configure_autobalance([100, 10, 1], search=("offset", "augment"))
            ...         self.configure_augment({"ops": "noise+erase"}, parametrization="class")
            >>> sorted(Net().autobalance_augmentation.alpha())
            ['augment_erase', 'augment_noise']
        """
        coerce_settings(settings)  # checked now, kept as given
        if parametrization is not None and parametrization not in AUGMENT_KINDS:
            raise ValueError(f"configure_augment: parametrization must be one of {list(AUGMENT_KINDS)} or None (the "
                             f"loss's); got {parametrization!r}.")
        self._autobalance_install_hooks()
        self._autobalance_state.augment = {"settings": settings, "parametrization": parametrization,
                                           "group_size": group_size, "start": None if start is None else dict(start),
                                           "seed": seed}
        return self._autobalance_build_augment()

    def _autobalance_augment_built(self) -> AugmentParameters | None:
        aug = self.__dict__.get("_modules", {}).get("autobalance_augmentation")
        return aug if isinstance(aug, AugmentParameters) else None

    def _autobalance_build_augment(self) -> AugmentParameters | None:
        """Builds (or keeps, or drops) the augmentation's parameters to match the settings, once the loss is built;
        an augmentation from the loss file (:attr:`MixinState.augment_loaded`) is set as it is instead."""
        loss = self._autobalance_built()
        config = self._autobalance_settings()
        existing = self._autobalance_augment_built()
        loaded = self._autobalance_state.augment_loaded
        if loss is not None and loaded is not None:
            return self._autobalance_set_loaded_augment(loaded, bool(config["freeze"]), config["search"])
        if loss is None or AUGMENT not in _search_names(config["search"]):
            if existing is not None and loss is not None:
                del self._modules["autobalance_augmentation"]  # type: ignore[attr-defined]
            return None
        given = self._autobalance_state.augment or {}
        settings = coerce_settings(given.get("settings"))
        kind = given.get("parametrization") or config["parametrization"]
        group_size = given.get("group_size") or config["group_size"]
        start, seed = {**identity_start(settings), **dict(given.get("start") or {})}, int(given.get("seed", 0))
        if existing is not None and existing.settings == settings and existing.kind == kind and \
                existing.group_size == group_size and existing.start == start and existing.seed == seed and \
                torch.equal(existing.class_counts, loss.class_counts.to(existing.class_counts)):
            return existing
        aug = AugmentParameters(loss.class_counts.detach().cpu(), settings, kind, group_size, start=start, seed=seed)
        aug.frozen = bool(config["freeze"])
        self.autobalance_augmentation = aug.to(loss.class_counts.device)
        self._autobalance_state.augment_cache = None
        return self.autobalance_augmentation

    def _autobalance_set_loaded_augment(self, aug: AugmentParameters, freeze: bool,
                                        search: Sequence[str] | str) -> AugmentParameters:
        """Sets an augmentation read from a loss file: frozen with the loss, and whenever ``search`` does not name
        ``"augment"`` (nothing asked to search it); ``configure_augment`` settings that differ are said once."""
        if self._autobalance_augment_built() is aug:
            return aug
        given = (self._autobalance_state.augment or {}).get("settings")
        if given is not None and coerce_settings(given) != aug.settings:
            rank_zero_warn(f"AutoBalance: the loss file's augmentation ({aug.settings}) is used; the settings given to "
                           f"configure_augment ({coerce_settings(given)}) are not.")
        aug.frozen = bool(freeze) or AUGMENT not in _search_names(search)
        device = next((t.device for t in self.parameters()), None)  # type: ignore[attr-defined]
        self.autobalance_augmentation = aug if device is None else aug.to(device)
        self._autobalance_state.augment_cache = None
        return self.autobalance_augmentation

    def _autobalance_restore_augment(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """Builds the augmentation's parameters from a state dict when this module has none yet."""
        if self._autobalance_augment_built() is not None:
            return
        saved = state_dict.get(prefix + "autobalance_augmentation._extra_state")
        saved = dict(saved) if isinstance(saved, Mapping) else {}
        aug = AugmentParameters(
            torch.as_tensor(state_dict[prefix + "autobalance_augmentation.class_counts"]).detach().cpu().double(),
            saved.get("settings"), saved.get("kind", "hierarchical"), int(saved.get("group_size", 1)),
            start=saved.get("start"), seed=int(saved.get("seed", 0)))
        device = next((t.device for t in self.parameters()), None)  # type: ignore[attr-defined]
        self.autobalance_augmentation = aug if device is None else aug.to(device)

    def autobalance_augment_parameters(self) -> AugmentParameters | None:
        """The searched augmentation's parameters (``self.autobalance_augmentation``), or ``None`` when
        ``"augment"`` is not searched (built with the loss, from the counts found at setup if need be)."""
        if AUGMENT not in _search_names(self._autobalance_settings()["search"]):
            return self._autobalance_augment_built()  # restored from a checkpoint, or none
        built = self._autobalance_augment_built()
        if built is not None:
            return built
        self.autobalance_parameters()  # builds the loss (from counts found at setup if need be)
        return self._autobalance_build_augment()

    def _autobalance_augment_tables(self, aug: AugmentParameters) -> dict[str, Tensor]:
        watched = [*aug.alpha().values()]
        key = (id(aug), *((t._version, t.data_ptr(), t.device, t.dtype) for t in watched))
        cache = self._autobalance_state.augment_cache
        if cache is None or cache[0] != key:
            with torch.no_grad():
                cache = self._autobalance_state.augment_cache = (key, {k: v.detach() for k, v in aug.tables().items()})
        return cache[1]

    def _autobalance_rank(self) -> int:
        trainer = self._autobalance_trainer()
        return int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0

    def autobalance_augment(self, x: Tensor, y: Tensor, group: Tensor | None = None) -> Tensor:
        """The batch augmented with the searched per-class (or per cell) strengths; call it in ``training_step``
        before the forward pass: ``x = self.autobalance_augment(x, y)``.

        The identity when ``"augment"`` is not searched and in evaluation mode. The draws come from a generator of
        their own, seeded with the augmentation's ``seed``, the process's rank and a count of draws saved with the
        parameters (:meth:`~lightning_autobalance.core.augment_parametrization.AugmentParameters.next_draws`): the
        global random state (dropout, the data order) is untouched, and a resumed fit makes the same draws. The
        result carries no gradient to the augmentation's values: the callback's hyper step takes their
        hypergradient, from the clean inputs and draws kept here when it asks.

        Args:
            x: the inputs on their device (images ``(N, C, H, W)`` for ``flip`` and ``shift``).
            y: labels ``(N,)``.
            group: group indices ``(N,)`` when the tables have a row per group (class x group); else ignored.
        """
        aug = self.autobalance_augment_parameters()
        if aug is None or not bool(getattr(self, "training", False)):
            return x
        group = group if aug.num_groups > 1 else None
        draws = aug.next_draws(x.shape, x.device, "train", self._autobalance_rank())
        with torch.no_grad():
            out = augment(x, y, group, self._autobalance_augment_tables(aug), draws, aug.settings)
        if self._autobalance_state.record:
            self._autobalance_state.augmented = AugmentRecord(x.detach(), y, group, draws)
        return out

    @property
    def autobalance_recorded_augment(self) -> AugmentRecord | None:
        """What :meth:`autobalance_augment` kept since :meth:`autobalance_request_logits`, or None."""
        return self._autobalance_state.augmented

    def autobalance_hyper_draws(self, inputs: Tensor) -> Draws:
        """Draws for an extra training batch of a hyper step (a stream of their own: :meth:`autobalance_augment`)."""
        aug = self.autobalance_augment_parameters()
        if aug is None:
            raise RuntimeError("autobalance_hyper_draws: 'augment' is not searched.")
        return aug.next_draws(inputs.shape, inputs.device, "hyper", self._autobalance_rank())

    # -- freezing, export, import ------------------------------------------------------------------------
    def freeze_loss(self) -> None:
        """Freezes the loss parameters: the callback leaves them alone (e.g. for retraining)."""
        self.autobalance_parameters().frozen = True

    def unfreeze_loss(self) -> None:
        self.autobalance_parameters().frozen = False

    def freeze_augment(self, frozen: bool = True) -> None:
        """Freezes the augmentation (``search=[..., "augment"]``; ``frozen=False`` unfreezes it): a search leaves its
        strengths alone (to train with the start strengths, or under :class:`~lightning_autobalance.AugmentCurriculum`).

        Raises:
            RuntimeError: no augmentation is built (``configure_autobalance(search=...)`` does not name ``"augment"``).
        """
        aug = self.autobalance_augment_parameters()
        if aug is None:
            raise RuntimeError("freeze_augment / unfreeze_augment: this module has no augmentation; it is built when "
                               "configure_autobalance(search=...) names 'augment'.")
        aug.frozen = bool(frozen)

    def unfreeze_augment(self) -> None:
        """Lets a search change the augmentation again (see :meth:`freeze_augment`)."""
        self.freeze_augment(False)

    @property
    def loss_frozen(self) -> bool:
        return self.autobalance_parameters().frozen

    def export_loss(self, path: str | Path) -> Path:
        """Writes the found loss (YAML or JSON by suffix), with the held-back check's decision on it (``decision``:
        kept or put back, why, and its figures; ``pending`` when written before the check ruled; ``null``: none).

        The file holds the tables to retrain with (frequency bins interpolated to classes) and also the parametrisation
        and its free values, so that retraining on other class counts (the whole training set instead of the search
        split) rebuilds the preset on those counts and adds the searched deviation to it (see :func:`loss_from_file`).

        When the module has an augmentation (``search=[..., "augment"]``, or one loaded with a loss file), the file
        also holds it, as an ``augmentation`` section
        (:meth:`~lightning_autobalance.core.augment_parametrization.AugmentParameters.export_record`: settings,
        parametrisation, draw seed, free values, and the strengths per cell for a reader), so that
        ``configure_autobalance(loss_file=...)``, :meth:`load_loss` and :func:`~lightning_autobalance.find_loss`
        retrain with the found strengths too.
        """
        params = self.autobalance_parameters()
        with torch.no_grad():
            tables = params.retraining_tables()
        counts = params.class_counts
        alpha = {k: v.detach().double().cpu().tolist() for k, v in params.alpha().items()}
        aug = self.autobalance_augment_parameters()
        extra = {} if aug is None else {"augmentation": aug.export_record()}
        return save_loss_tables(path, tables, reduction=self.autobalance_reduction, parametrization=params.kind,
                                preset=params.preset, preset_kwargs=dict(params.preset_kwargs),
                                search=list(params.search), group_size=getattr(params, "group_size", 1),
                                class_counts=(counts[0] if counts.shape[0] == 1 else counts).round().long().tolist(),
                                alpha=alpha, decision=params.decision, **extra)

    def load_loss(self, path: str | Path, freeze: bool = True) -> None:
        """Replaces the loss by one exported with :meth:`export_loss`, frozen by default.

        The preset is rebuilt on this module's class counts (see :func:`loss_from_file`). A file with an augmentation
        replaces the module's (built whether or not ``search`` names ``"augment"``; frozen with the loss, and whenever
        ``search`` does not name it), so that :meth:`autobalance_augment` applies the strengths found; a file without
        one leaves the module's augmentation as it is.

        Raises:
            ValueError: if the file's number of classes or groups differs from this module's, or its augmentation
                does not fit (see :func:`loss_from_file`).
        """
        params = self.autobalance_parameters()
        new, info = loss_from_file(path, params.class_counts)
        if new.base_delta.shape != params.base_delta.shape:
            raise ValueError(f"Loss file {str(path)!r} holds tables of shape {tuple(new.base_delta.shape)} "
                             f"(groups, classes), but this module's loss has {tuple(params.base_delta.shape)}.")
        new = new.to(params.base_delta.device)
        new.frozen = freeze
        self.autobalance = new
        self.autobalance_reduction = info.get("reduction", self.autobalance_reduction)
        self._autobalance_state.cache = None
        aug = info.get("augment_parameters")
        if aug is not None:
            self._autobalance_state.augment_loaded = aug
            self._autobalance_set_loaded_augment(aug, freeze, self._autobalance_settings()["search"])

    def loss_module(self) -> AdjustedCrossEntropy:
        """The loss to retrain with as a plain ``torch.nn.Module`` (usable without Lightning).

        These are the tables :meth:`export_loss` writes: for frequency bins, the bin values interpolated to classes.
        """
        with torch.no_grad():
            tables = self.autobalance_parameters().retraining_tables()
        return AdjustedCrossEntropy(*(t.float().cpu() for t in tables), reduction=self.autobalance_reduction)
