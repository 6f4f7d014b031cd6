"""``AutoBalanceMixin``: gives an existing LightningModule a learnable AutoBalance training loss."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_autobalance.losses import (
    AdjustedCrossEntropy,
    LossTables,
    Reduction,
    adjusted_cross_entropy,
    as_count_table,
    load_loss_tables,
    save_loss_tables,
)
from lightning_autobalance.parametrization import (
    LossParametrization,
    ParametrizationKind,
    PerClass,
    build_parametrization,
)

__all__ = ["AutoBalanceMixin", "loss_from_file", "unpack_batch"]


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

    Raises:
        ValueError: if the file's number of classes differs from ``class_counts``.
    """
    tables, info = load_loss_tables(path)
    k = torch.as_tensor(class_counts).shape[-1]
    if tables.num_classes != k:
        raise ValueError(f"Loss file {str(path)!r} has {tables.num_classes} classes but class_counts has {k}.")
    alpha = info.get("alpha")
    if isinstance(alpha, dict) and "parametrization" in info:
        rebuilt = build_parametrization(info["parametrization"], class_counts, preset=info.get("preset", "ce"),
                                        search=info.get("search", ()), num_groups=tables.num_groups,
                                        group_size=int(info.get("group_size", 1)),
                                        preset_kwargs=info.get("preset_kwargs"))
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
    return PerClass.from_tables(LossTables(*(t.detach().float() for t in tables)), class_counts), info


class AutoBalanceMixin:
    """Adds a learnable AutoBalance loss to a :class:`~pytorch_lightning.LightningModule`.

    Put the mixin *before* ``LightningModule`` in the bases, call :meth:`configure_autobalance` in ``__init__``
    and use :meth:`autobalance_loss` as the training loss. The loss parameters live in a submodule
    (``self.autobalance``) as buffers: they are saved in the module's ``state_dict`` (so even a weights-only
    checkpoint restores the learned loss) but are not ``nn.Parameter``\\ s, so the model's optimizer, including
    LightningCLI's automatic one, never trains them. :class:`~lightning_autobalance.AutoBalanceCallback` updates
    them.

    For the callback, the mixin also says how to read a batch (:meth:`autobalance_unpack`) and how to get logits
    from inputs (:meth:`autobalance_forward`); the defaults handle ``(x, y)``/``(x, y, g)`` batches and
    ``self(x)``. Override them for other layouts.

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
    _autobalance_record: bool = False  # class default: autobalance_loss must reach the RuntimeError below

    def configure_autobalance(
        self,
        class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor | None,
        preset: str = "la",
        search: Sequence[str] | str = ("offset",),
        parametrization: ParametrizationKind = "hierarchical",
        group_size: int = 1,
        num_groups: int | None = None,
        reduction: Reduction = "mean",
        preset_kwargs: Mapping[str, Any] | None = None,
        loss_file: str | Path | None = None,
        freeze: bool = False,
        validate_inputs: bool = True,
        like: AutoBalanceMixin | None = None,
    ) -> LossParametrization:
        """Declares the class counts and the loss family to search; call it once in ``__init__``.

        Args:
            class_counts: training samples per class (``K`` values), or a ``G x K`` table per (group, class).
            preset: the starting loss (``"ce"``, ``"la"``, ``"cdt"``, ``"vs"``, ``"class_balanced"``,
                ``"inverse_frequency"`` or an alias; see :func:`~lightning_autobalance.losses.preset_tables`).
            search: which of ``"delta"``, ``"offset"``, ``"weight"`` the search may change. The default, the offsets
                from a logit-adjustment start, is the setting that never did worse than logit adjustment in our
                tuning (``docs/tuning.md``); the multiplicative ``delta`` has a hypergradient about the size of the
                logits times that of the offsets and is best searched on its own learning rate.
            parametrization: ``"hierarchical"`` (default: the dataset-level scalars gamma, tau, omega that move
                every class together, plus a residual per class), ``"class"`` (one value per class), ``"groups"``
                (bins of ``group_size`` classes by frequency) or ``"dataset"`` (the three scalars alone).
            group_size: classes per frequency bin for ``parametrization="groups"``.
            num_groups: number of sensitive groups ``G`` (class x group tables); batches then carry groups.
            reduction: ``"mean"`` or ``"weighted_mean"``
                (see :func:`~lightning_autobalance.losses.adjusted_cross_entropy`).
            preset_kwargs: preset settings (``tau``, ``gamma``, ``beta``).
            loss_file: start from a loss exported by :meth:`export_loss` instead of a preset (e.g. to retrain).
            freeze: freeze the loss (the callback will not change it), e.g. when retraining with a found loss.
            validate_inputs: check labels, groups and logits on every call (one host synchronisation per step).
            like: another module with the mixin whose loss to copy: its parametrisation, the values found so far,
                its counts and reduction (e.g. an SWA or fine-tuning module built from a trained one, which then
                continues from the found loss instead of a fresh preset). ``class_counts`` may then be ``None``;
                ``freeze`` and ``validate_inputs`` still apply.

        Returns:
            The parametrisation module, also available as ``self.autobalance``.
        """
        if reduction not in ("mean", "weighted_mean"):
            raise ValueError(f"reduction must be 'mean' or 'weighted_mean' for a training loss; got {reduction!r}.")
        if like is not None:
            source = like._require_autobalance()
            if class_counts is not None:
                given = as_count_table(class_counts, num_groups=source.num_groups)
                if tuple(given.shape) != tuple(source.class_counts.shape):
                    raise ValueError(f"class_counts has shape {tuple(given.shape)}, but the module given as `like` has "
                                     f"{tuple(source.class_counts.shape)}; omit class_counts to copy that module's.")
            params = copy.deepcopy(source)
            reduction = like.autobalance_reduction
        elif class_counts is None:
            raise ValueError("configure_autobalance needs class_counts (one training count per class), or "
                             "like=<a module configured with them> to copy its loss.")
        elif loss_file is not None:
            params, info = loss_from_file(loss_file, class_counts)
            reduction = info.get("reduction", reduction)
        else:
            params = build_parametrization(parametrization, class_counts, preset=preset, search=search,
                                           num_groups=num_groups, group_size=group_size, preset_kwargs=preset_kwargs)
        params.frozen = bool(freeze)
        self.autobalance = params
        self.autobalance_reduction = reduction
        self.autobalance_validate = validate_inputs
        self._autobalance_cache: tuple[Any, LossTables] | None = None
        self._autobalance_recorded: Tensor | None = None
        self._autobalance_record = False
        return params

    # -- the loss ----------------------------------------------------------------------------------------
    def autobalance_parameters(self) -> LossParametrization:
        """The loss parametrisation (``self.autobalance``), with a clear error when ``configure_autobalance`` was
        never called."""
        params = self.__dict__.get("_modules", {}).get("autobalance")
        if not isinstance(params, LossParametrization):
            raise RuntimeError(f"{type(self).__name__} uses AutoBalanceMixin but never called "
                               "`self.configure_autobalance(class_counts=...)` in its __init__.")
        return params

    _require_autobalance = autobalance_parameters  # the name used inside the package

    # -- the hand-off to the callback ---------------------------------------------------------------------
    def autobalance_request_logits(self, enabled: bool = True) -> None:
        """Asks :meth:`autobalance_loss` to keep (detached) the logits it is given until the next request.

        :class:`~lightning_autobalance.AutoBalanceCallback` calls it before a training step that a hyper step will
        follow, so that the hyper step reuses that step's logits instead of a forward pass of its own; then
        ``enabled=False`` after it. Either call drops what was kept before.
        """
        self._autobalance_record = bool(enabled)
        self._autobalance_recorded = None

    @property
    def autobalance_recorded_logits(self) -> Tensor | None:
        """The detached logits :meth:`autobalance_loss` kept since :meth:`autobalance_request_logits`, or None."""
        return self._autobalance_recorded

    def autobalance_tables(self) -> LossTables:
        """The current loss tables (detached; cached until the loss parameters change)."""
        params = self._require_autobalance()
        watched = [*params.alpha().values(), params.base_delta, params.base_offset, params.base_weight]
        key = tuple((t._version, t.data_ptr(), t.device, t.dtype) for t in watched)
        if self._autobalance_cache is None or self._autobalance_cache[0] != key:
            with torch.no_grad():
                self._autobalance_cache = (key, LossTables(*(t.detach() for t in params.tables())))
        return self._autobalance_cache[1]

    def autobalance_loss(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        """The AutoBalance training loss of a batch: ``w_{g,y} * CE(delta_g * logits + offset_g, y)``, averaged.

        Args:
            logits: the model's raw scores ``(N, K)`` before any softmax: not probabilities and not
                log-probabilities. (``log_softmax`` outputs differ from the scores by a constant per sample, which
                additive offsets and weights cannot see, but a ``delta`` other than 1 scales them and then the
                loss is not the one intended; the mixin warns once when it sees such rows with a ``delta`` that is
                not 1 or is searched.)
            target: labels ``(N,)`` in ``[0, K)``, ``K = len(class_counts)``.
            group: group indices ``(N,)`` in ``[0, G)`` when the loss has class x group tables.

        Raises:
            ValueError: the logits do not have ``K = len(class_counts)`` columns.
        """
        params = self._require_autobalance()
        if logits.ndim != 2 or logits.shape[1] != params.num_classes:
            raise ValueError(f"autobalance_loss: the logits have shape {tuple(logits.shape)}, but "
                             f"configure_autobalance was given class_counts for {params.num_classes} classes: "
                             f"expected (N, {params.num_classes}). Pass one count per output of the model.")
        if self.autobalance_validate and not getattr(self, "_autobalance_checked_logprobs", False):
            self._autobalance_checked_logprobs = True
            self._warn_if_log_probabilities(logits, params)
        if self._autobalance_record:
            self._autobalance_recorded = logits.detach()
        return adjusted_cross_entropy(logits, target, *self.autobalance_tables(), group=group,
                                      reduction=self.autobalance_reduction, validate=self.autobalance_validate)

    def _warn_if_log_probabilities(self, logits: Tensor, params: LossParametrization) -> None:
        """Warns when every row of the first batch is a log-probability vector and ``delta`` matters."""
        delta_matters = "delta" in params.search or bool((self.autobalance_tables().delta != 1).any())
        if not delta_matters or logits.shape[1] < 2 or logits.shape[0] == 0:
            return
        with torch.no_grad():
            rows = torch.logsumexp(logits.detach().float(), dim=1)
            if bool((logits.detach() <= 0).all()) and bool((rows.abs() < 1e-3).all()):
                rank_zero_warn("autobalance_loss: the model's outputs look like log-probabilities (every row's exp "
                               "sums to 1, e.g. forward returns log_softmax). The loss scales the raw scores by a "
                               "delta other than 1, so it should be given the scores before log_softmax; with "
                               "log-probabilities the multiplicative adjustment is not the intended one.")

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

    # -- freezing, export, import ------------------------------------------------------------------------
    def freeze_loss(self) -> None:
        """Freezes the loss parameters: the callback leaves them alone (e.g. for retraining)."""
        self._require_autobalance().frozen = True

    def unfreeze_loss(self) -> None:
        self._require_autobalance().frozen = False

    @property
    def loss_frozen(self) -> bool:
        return self._require_autobalance().frozen

    def export_loss(self, path: str | Path) -> Path:
        """Writes the found loss (YAML or JSON by suffix).

        The file holds the tables to retrain with (frequency bins interpolated to classes) and also the
        parametrisation and its free values, so that retraining on other class counts (the whole training set
        instead of the search split) rebuilds the preset on those counts and adds the searched deviation to it
        (see :func:`loss_from_file`).
        """
        params = self._require_autobalance()
        with torch.no_grad():
            tables = params.retraining_tables()
        counts = params.class_counts
        alpha = {k: v.detach().double().cpu().tolist() for k, v in params.alpha().items()}
        return save_loss_tables(path, tables, reduction=self.autobalance_reduction, parametrization=params.kind,
                                preset=params.preset, preset_kwargs=dict(params.preset_kwargs),
                                search=list(params.search), group_size=getattr(params, "group_size", 1),
                                class_counts=(counts[0] if counts.shape[0] == 1 else counts).round().long().tolist(),
                                alpha=alpha)

    def load_loss(self, path: str | Path, freeze: bool = True) -> None:
        """Replaces the loss by one exported with :meth:`export_loss`, frozen by default.

        The preset is rebuilt on this module's class counts (see :func:`loss_from_file`).

        Raises:
            ValueError: if the file's number of classes or groups differs from this module's.
        """
        params = self._require_autobalance()
        new, info = loss_from_file(path, params.class_counts)
        if new.base_delta.shape != params.base_delta.shape:
            raise ValueError(f"Loss file {str(path)!r} holds tables of shape {tuple(new.base_delta.shape)} "
                             f"(groups, classes), but this module's loss has {tuple(params.base_delta.shape)}.")
        new = new.to(params.base_delta.device)
        new.frozen = freeze
        self.autobalance = new
        self.autobalance_reduction = info.get("reduction", self.autobalance_reduction)
        self._autobalance_cache = None

    def loss_module(self) -> AdjustedCrossEntropy:
        """The loss to retrain with as a plain ``torch.nn.Module`` (usable without Lightning).

        These are the tables :meth:`export_loss` writes: for frequency bins, the bin values interpolated to classes.
        """
        with torch.no_grad():
            tables = self._require_autobalance().retraining_tables()
        return AdjustedCrossEntropy(*(t.float().cpu() for t in tables), reduction=self.autobalance_reduction)
