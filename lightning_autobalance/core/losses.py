"""The AutoBalance loss family and the fixed baseline losses.

For logits ``f`` of a sample with label ``y`` (and group ``g``) the family is

.. math::

    z_k = \\Delta_{g,k} f_k + l_{g,k}, \\qquad
    \\ell(f, y, g) = w_{g,y} \\, (-\\log \\mathrm{softmax}(z)_y)

with a multiplicative adjustment ``delta`` (positive), an additive adjustment ``offset`` and a per-class
weight ``weight`` (positive). Each is a table of shape ``(G, K)``: ``G`` groups by ``K`` classes; ``G = 1``
is the plain per-class loss. Cross-entropy, logit adjustment (balanced softmax), CDT, VS, class-balanced
and inverse-frequency weighting are points of the family (:func:`preset_tables`). LDAM (with deferred
re-weighting) and focal loss lie outside it and are provided as plain baselines.

Everything here is plain PyTorch: nothing knows about Lightning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_autobalance.core.cells import num_units, unit_index
from lightning_autobalance.core.reduce import Reducer

__all__ = ["PRESETS", "AdjustedCrossEntropy", "FocalLoss", "GroupDROLoss", "LDAMLoss", "LossTables",
           "adjusted_cross_entropy", "as_count_table", "class_balanced_weights", "focal_loss", "ldam_loss",
           "ldam_margins", "load_loss_tables", "preset_tables", "resolve_preset", "save_loss_tables",
           "unit_mean_losses"]

Reduction = Literal["mean", "weighted_mean", "sum", "none"]
_REDUCTIONS = ("mean", "weighted_mean", "sum", "none")
LOSS_FILE_FORMAT = "lightning-autobalance/loss-v1"

#: Canonical preset names and the aliases accepted for them.
PRESETS: dict[str, tuple[str, ...]] = {
    "ce": ("cross_entropy", "cross-entropy"),
    "la": ("logit_adjustment", "logit-adjustment", "balanced_softmax", "balanced-softmax"),
    "cdt": (),
    "vs": ("vs_loss",),
    "class_balanced": ("cb", "class-balanced"),
    "inverse_frequency": ("inv_freq", "inverse-frequency"),
    "group_balanced": ("gb", "group-balanced", "cell_balanced"),
}


class LossTables(NamedTuple):
    """The three tables of the loss family, each of shape ``(G, K)``.

    Attributes:
        delta: multiplicative logit adjustment (positive).
        offset: additive logit adjustment.
        weight: per-class (per class and group) loss weight (positive).
    """

    delta: Tensor
    offset: Tensor
    weight: Tensor

    @property
    def num_groups(self) -> int:
        return self.delta.shape[0]

    @property
    def num_classes(self) -> int:
        return self.delta.shape[1]

    def to(self, *args: Any, **kwargs: Any) -> LossTables:
        """Moves or casts the three tables like :meth:`torch.Tensor.to`."""
        return LossTables(*(t.to(*args, **kwargs) for t in self))


def resolve_preset(name: str) -> str:
    """The canonical name of a preset given its name or an alias; raises ``ValueError`` for an unknown one."""
    key = str(name).strip().lower()
    for canonical, aliases in PRESETS.items():
        if key == canonical or key in aliases:
            return canonical
    known = ", ".join(f"{c!r}" + (f" (aliases {', '.join(map(repr, a))})" if a else "") for c, a in PRESETS.items())
    raise ValueError(f"Unknown loss preset {name!r}; expected one of {known}.")


def as_count_table(class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor, num_classes: int | None = None,
                   num_groups: int | None = None) -> Tensor:
    """Validates class counts and returns them as a float64 table of shape ``(G, K)``.

    Args:
        class_counts: ``K`` per-class counts, or a ``G x K`` table of per-(group, class) counts.
        num_classes: the expected ``K``, if known.
        num_groups: the expected ``G``; a 1-D ``class_counts`` is repeated for every group.

    Raises:
        ValueError: if a count is zero, negative or not finite, or the shape is not the expected one.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.ndim not in (1, 2) or counts.numel() == 0:
        raise ValueError(f"class_counts must be a non-empty list of K counts or a G x K table; got shape "
                         f"{tuple(counts.shape)}.")
    if not torch.isfinite(counts).all() or (counts <= 0).any() or (counts != counts.round()).any():
        bad = [round(v, 6) for v in counts.flatten().tolist() if not (math.isfinite(v) and v > 0 and v == round(v))]
        raise ValueError(f"class_counts must be positive whole numbers of samples (each class needs at least one); "
                         f"got {bad} among them.")
    if counts.ndim == 1:
        counts = counts.unsqueeze(0)
    if num_classes is not None and counts.shape[1] != num_classes:
        raise ValueError(f"class_counts has {counts.shape[1]} classes, expected num_classes={num_classes}.")
    if num_groups is not None:
        if counts.shape[0] == 1 and num_groups > 1:
            counts = counts.expand(num_groups, -1).clone()
        elif counts.shape[0] != num_groups:
            raise ValueError(f"class_counts has {counts.shape[0]} group rows, expected num_groups={num_groups}.")
    return counts


def class_balanced_weights(counts: Tensor, beta: float = 0.9999) -> Tensor:
    """Class-balanced weights of Cui et al. (2019), normalised to sum to ``K`` in each row.

    ``w_y`` is proportional to ``(1 - beta) / (1 - beta ** n_y)``, the inverse of the effective number of samples.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must lie in [0, 1); got {beta}.")
    counts = torch.as_tensor(counts, dtype=torch.float64)
    raw = (1.0 - beta) / (1.0 - torch.pow(torch.as_tensor(beta, dtype=torch.float64), counts))
    return raw / raw.sum(dim=-1, keepdim=True) * counts.shape[-1]


def preset_tables(name: str, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor,
                  num_groups: int | None = None, *, tau: float = 1.0, gamma: float | None = None, beta: float = 0.9999,
                  dtype: torch.dtype = torch.float32) -> LossTables:
    """Builds the ``(delta, offset, weight)`` tables of a named preset from the class counts.

    ========================  ==========================================================================
    preset                    setting (``n_y`` class count, ``pi_y = n_y / n``)
    ========================  ==========================================================================
    ``ce``                    ``delta = 1``, ``offset = 0``, ``weight = 1``
    ``la``                    ``offset_y = tau * log(pi_y)`` (logit adjustment; balanced softmax at tau 1)
    ``cdt``                   ``delta_y = (n_y / n_max) ** gamma`` (gamma 0.2 unless given)
    ``vs``                    both: ``delta_y = (n_y / n_max) ** gamma``, ``offset_y = tau log pi_y``
                              (gamma 0.3 unless given)
    ``class_balanced``        ``weight_y ~ (1 - beta) / (1 - beta ** n_y)``, summing to ``K``
    ``inverse_frequency``     ``weight_y ~ 1 / n_y``, summing to ``K``
    ``group_balanced``        ``weight_{g,y} = N / (G K n_{g,y})`` over the whole ``G x K`` table (each
                              (class, group) cell gets the same total weight, the mean weight per sample
                              is 1); with one group, ``N / (K n_y)``
    ========================  ==========================================================================

    With a ``G x K`` count table every group row is built from its own counts (except ``group_balanced``,
    normalised over the whole table).

    Args:
        name: preset name or alias (see :data:`PRESETS`).
        class_counts: ``K`` per-class training counts or a ``G x K`` table.
        num_groups: number of group rows ``G`` (default: the rows of ``class_counts``, else 1).
        tau, gamma, beta: the presets' settings (table above).

    Example:
        >>> tables = preset_tables("la", [100, 10, 1])
        >>> tables.offset.shape
        torch.Size([1, 3])
    """
    preset = resolve_preset(name)
    counts = as_count_table(class_counts, num_groups=num_groups)
    ones = torch.ones_like(counts)
    delta, offset, weight = ones.clone(), torch.zeros_like(counts), ones.clone()
    log_prior = torch.log(counts / counts.sum(dim=1, keepdim=True))
    ratio = counts / counts.max(dim=1, keepdim=True).values
    if preset == "la":
        offset = tau * log_prior
    elif preset == "cdt":
        delta = ratio ** (0.2 if gamma is None else gamma)
    elif preset == "vs":
        delta = ratio ** (0.3 if gamma is None else gamma)
        offset = tau * log_prior
    elif preset == "class_balanced":
        weight = class_balanced_weights(counts, beta)
    elif preset == "inverse_frequency":
        weight = (1.0 / counts) / (1.0 / counts).sum(dim=1, keepdim=True) * counts.shape[1]
    elif preset == "group_balanced":
        weight = counts.sum() / (counts.numel() * counts)
    return LossTables(delta.to(dtype), offset.to(dtype), weight.to(dtype))


def check_loss_inputs(logits: Tensor, target: Tensor, group: Tensor | None = None, num_groups: int = 1,
                      check_values: bool = True) -> None:
    """Validates logits, labels and group indices; raises ``ValueError`` naming what is wrong.

    Checks that ``logits`` is ``(N, K)`` and finite, that ``target`` holds ``N`` labels in ``[0, K)`` and
    ``group`` (when given) ``N`` indices in ``[0, num_groups)``. The value checks cost one host synchronisation;
    ``check_values=False`` checks shapes and dtypes only (read from the host, no synchronisation).
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, K); got {tuple(logits.shape)}.")
    n, k = logits.shape
    checks = [("target", target, k, "class")] + ([("group", group, num_groups, "group")] if group is not None else [])
    for name, values, _, what in checks:
        if values.ndim != 1 or values.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) to match the logits; got {tuple(values.shape)}.")
        if values.dtype.is_floating_point or values.dtype == torch.bool or values.is_complex():
            raise ValueError(f"{name} must hold integer {what} indices; got dtype {values.dtype}.")
    if not check_values:
        return
    ok = torch.isfinite(logits).all()
    for _, values, high, _ in checks:
        ok = ok & ((values >= 0) & (values < high)).all()
    if bool(ok):
        return
    for name, values, high, what in checks:
        bad = values[(values < 0) | (values >= high)]
        if bad.numel():
            raise ValueError(f"{name} must lie in [0, {high}) ({high} {what}{'es' if what == 'class' else 's'}); "
                             f"got {bad.unique()[:5].tolist()}.")
    raise ValueError("logits contain NaN or infinite values; expected finite logits (check the learning rate, "
                     "the input data and mixed-precision overflow).")


def _row(table: Tensor | None, group: Tensor | None, num_classes: int, name: str) -> Tensor | None:
    """Picks the row of a (G, K) table that applies to each sample; (K,) or (1, K) tables broadcast."""
    if table is None:
        return None
    shape = tuple(table.shape)
    if table.ndim == 1:
        table = table.unsqueeze(0)
    if table.ndim != 2 or table.shape[1] != num_classes:
        raise ValueError(f"{name} must have shape (K,) or (G, K) with K={num_classes}; got {shape}.")
    if table.shape[0] == 1:
        return table[0]
    if group is None:
        raise ValueError(f"{name} has {table.shape[0]} group rows, so a group index is needed for every sample.")
    return table[group]


def adjusted_cross_entropy(logits: Tensor, target: Tensor, delta: Tensor | None = None, offset: Tensor | None = None,
                           weight: Tensor | None = None, group: Tensor | None = None, reduction: Reduction = "mean",
                           validate: bool = True) -> Tensor:
    """The loss family ``w_{g,y} * CE(delta_g * f + offset_g, y)``.

    Args:
        logits: raw logits ``f`` of shape ``(N, K)``; computed in float32 or wider whatever their dtype.
        target: labels of shape ``(N,)`` in ``[0, K)``.
        delta: multiplicative adjustment, ``(K,)`` or ``(G, K)``; ``None`` means 1.
        offset: additive adjustment, ``(K,)`` or ``(G, K)``; ``None`` means 0.
        weight: per-class weight, ``(K,)`` or ``(G, K)``; ``None`` means 1.
        group: group index of each sample, ``(N,)`` in ``[0, G)``; needed when a table has ``G > 1`` rows.
        reduction: ``"mean"`` (sum of weighted losses over ``N``, the class-balanced convention), ``"weighted_mean"``
            (over the sum of the weights, as ``torch.nn.functional.cross_entropy`` does), ``"sum"`` or ``"none"``.
        validate: check shapes, label ranges and finiteness first (one host synchronisation).

    Returns:
        The reduced loss, or the per-sample losses for ``reduction="none"``.

    Example:
        >>> logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
        >>> tables = preset_tables("la", [100, 10, 1])
        >>> loss = adjusted_cross_entropy(logits, y, *tables)
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")
    num_groups = max((t.shape[0] for t in (delta, offset, weight) if t is not None and t.ndim == 2), default=1)
    if validate:  # a per-class loss (one row) ignores group indices
        check_loss_inputs(logits, target, group if num_groups > 1 else None, num_groups)
    k = logits.shape[-1]
    table_dtypes = [t.dtype for t in (delta, offset, weight) if t is not None]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    for t in table_dtypes:
        dtype = torch.promote_types(dtype, t)
    z = logits.to(dtype)
    d, l_, w = (_row(t, group, k, n) for t, n in ((delta, "delta"), (offset, "offset"), (weight, "weight")))
    if d is not None:
        z = z * d
    if l_ is not None:
        z = z + l_
    nll = -torch.log_softmax(z, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if w is not None:
        w_y = w.gather(-1, target.unsqueeze(-1)).squeeze(-1) if w.ndim == 2 else w[target]
        losses = w_y * nll
    else:
        w_y, losses = None, nll
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction == "weighted_mean" and w_y is not None:
        return losses.sum() / w_y.sum()
    return losses.sum() / max(losses.shape[0], 1)


class AdjustedCrossEntropy(nn.Module):
    """A fixed member of the loss family as a plain ``torch.nn.Module`` (no Lightning needed).

    The tables are buffers: they move with ``.to(device)`` and are saved in the ``state_dict``, but are not
    parameters, so no optimizer picks them up.

    Args:
        delta, offset, weight: the tables of :func:`adjusted_cross_entropy`, of one shape ``(K,)`` or ``(G, K)``.
        reduction: see :func:`adjusted_cross_entropy`.
        validate: check the inputs on every call.

    Example:
        >>> criterion = AdjustedCrossEntropy.from_preset("la", class_counts=[500, 50, 5])
        >>> loss = criterion(torch.randn(8, 3), torch.randint(0, 3, (8,)))
    """

    def __init__(self, delta: Tensor, offset: Tensor, weight: Tensor, reduction: Reduction = "mean",
                 validate: bool = True) -> None:
        super().__init__()
        tables = [torch.as_tensor(t, dtype=torch.float32) for t in (delta, offset, weight)]
        tables = [t.unsqueeze(0) if t.ndim == 1 else t for t in tables]
        if len({tuple(t.shape) for t in tables}) != 1 or tables[0].ndim != 2:
            raise ValueError(f"delta, offset and weight must share one shape (K,) or (G, K); got "
                             f"{[tuple(t.shape) for t in tables]}.")
        if (tables[0] <= 0).any() or (tables[2] <= 0).any():
            raise ValueError("delta and weight must be positive.")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")
        self.register_buffer("delta", tables[0])
        self.register_buffer("offset", tables[1])
        self.register_buffer("weight", tables[2])
        self.reduction: Reduction = reduction
        self.validate = validate

    @classmethod
    def from_preset(cls, name: str, class_counts: Sequence[int] | Tensor, reduction: Reduction = "mean",
                    **preset_kwargs: Any) -> AdjustedCrossEntropy:
        """Builds the loss of a named preset (see :func:`preset_tables`)."""
        return cls(*preset_tables(name, class_counts, **preset_kwargs), reduction=reduction)

    @classmethod
    def from_file(cls, path: str | Path) -> AdjustedCrossEntropy:
        """Loads a loss exported by :func:`save_loss_tables` (YAML or JSON)."""
        tables, info = load_loss_tables(path)
        return cls(*tables, reduction=info.get("reduction", "mean"))

    @property
    def tables(self) -> LossTables:
        return LossTables(self.delta, self.offset, self.weight)

    def forward(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        return adjusted_cross_entropy(logits, target, self.delta, self.offset, self.weight, group=group,
                                      reduction=self.reduction, validate=self.validate)

    def extra_repr(self) -> str:
        return f"num_groups={self.delta.shape[0]}, num_classes={self.delta.shape[1]}, reduction={self.reduction!r}"


def save_loss_tables(path: str | Path, tables: LossTables, **info: Any) -> Path:
    """Writes loss tables to a small YAML (``.yaml``/``.yml``) or JSON file.

    Args:
        path: destination; the suffix picks the format.
        **info: extra JSON-serialisable entries stored beside the tables (e.g. ``reduction``, ``preset``).
    """
    path = Path(path)
    doc: dict[str, Any] = {"format": LOSS_FILE_FORMAT, "num_groups": tables.num_groups,
                           "num_classes": tables.num_classes, **info,
                           "delta": tables.delta.detach().double().cpu().tolist(),
                           "offset": tables.offset.detach().double().cpu().tolist(),
                           "weight": tables.weight.detach().double().cpu().tolist()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    else:
        path.write_text(json.dumps(doc, indent=2))
    return path


def load_loss_tables(path: str | Path) -> tuple[LossTables, dict[str, Any]]:
    """Reads a file written by :func:`save_loss_tables`: its tables (float32, ``(G, K)``) and its other entries.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not a loss file or its tables are malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Loss file {str(path)!r} does not exist.")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as err:
        raise ValueError(f"Loss file {str(path)!r} could not be parsed: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != LOSS_FILE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a lightning-autobalance loss file (expected format: "
                         f"{LOSS_FILE_FORMAT!r}).")
    try:
        tables = LossTables(*(torch.tensor(doc[k], dtype=torch.float32) for k in ("delta", "offset", "weight")))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"Loss file {str(path)!r} has a missing or malformed table: {err}") from err
    expected = (doc.get("num_groups"), doc.get("num_classes"))
    for name, table in zip(("delta", "offset", "weight"), tables):
        if table.ndim != 2 or tuple(table.shape) != expected:
            raise ValueError(f"Loss file {str(path)!r}: {name} has shape {tuple(table.shape)}, expected "
                             f"(num_groups, num_classes) = {expected}.")
        if not torch.isfinite(table).all():
            raise ValueError(f"Loss file {str(path)!r}: {name} holds non-finite values.")
    if (tables.delta <= 0).any() or (tables.weight <= 0).any():
        raise ValueError(f"Loss file {str(path)!r}: delta and weight must be positive.")
    for name, values in (doc.get("alpha") or {}).items():  # the searched values, used to rebuild the loss
        try:
            finite = bool(torch.isfinite(torch.as_tensor(values, dtype=torch.float64)).all())
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise ValueError(f"Loss file {str(path)!r}: alpha.{name} holds non-finite or non-numeric values; the "
                             "file is damaged (export the loss again, or delete the alpha section to use the tables "
                             "as they are).")
    info = {k: v for k, v in doc.items() if k not in ("delta", "offset", "weight")}
    return tables, info


# -- Baselines outside the family --------------------------------------------------------------------------------------
def ldam_margins(class_counts: Sequence[int] | Tensor, max_margin: float = 0.5) -> Tensor:
    """LDAM margins ``m_y`` proportional to ``n_y ** (-1/4)``, the largest equal to ``max_margin``."""
    counts = as_count_table(class_counts)[0]
    margins = counts.pow(-0.25)
    return (margins * (max_margin / margins.max())).float()


def ldam_loss(logits: Tensor, target: Tensor, margins: Tensor, scale: float = 30.0, weight: Tensor | None = None,
              validate: bool = True) -> Tensor:
    """LDAM loss (Cao et al. 2019): cross-entropy of ``scale * (f - m_y e_y)``.

    The margin is subtracted from the true logit only. With ``weight`` (deferred re-weighting), the mean is
    taken over the weights of the batch, as in the reference implementation.
    Meant for cosine logits (a normalised linear head), where ``scale`` sets the temperature.
    """
    if validate:
        check_loss_inputs(logits, target)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    margin = margins.to(z).gather(0, target).unsqueeze(1)
    z = z - margin * F.one_hot(target, z.shape[1]).to(z)
    return F.cross_entropy(scale * z, target, weight=None if weight is None else weight.to(z))


class LDAMLoss(nn.Module):
    """LDAM with deferred re-weighting (DRW) as a module.

    Args:
        class_counts: per-class training counts; ``None`` for a loss value that a model sizes for its classes
            (:meth:`for_model`, as ``ImbalancedClassifier`` does).
        max_margin: the largest margin (given to the rarest class).
        scale: logit scale ``s``.
        drw_epoch: epoch from which class-balanced weights are applied; ``None`` disables DRW.
        beta: class-balanced ``beta`` of the DRW weights.

    Call :meth:`set_epoch` at the start of every epoch (``ImbalancedClassifier`` does) to switch DRW on.

    Example:
        >>> criterion = LDAMLoss([500, 50, 5], drw_epoch=160)
        >>> criterion.set_epoch(170)
        >>> loss = criterion(torch.randn(8, 3).tanh(), torch.randint(0, 3, (8,)))
    """

    def __init__(self, class_counts: Sequence[int] | None = None, max_margin: float = 0.5, scale: float = 30.0,
                 drw_epoch: int | None = 160, beta: float = 0.9999) -> None:
        super().__init__()
        if max_margin <= 0 or scale <= 0:
            raise ValueError(f"max_margin and scale must be positive; got {max_margin}, {scale}.")
        sized = class_counts is not None
        #: The constructor's arguments, plain data: how a model's hyperparameters record this loss.
        self.init_args = {"class_counts": torch.as_tensor(class_counts).tolist() if sized else None,
                          "max_margin": max_margin, "scale": scale, "drw_epoch": drw_epoch, "beta": beta}
        self.register_buffer("margins", ldam_margins(class_counts, max_margin) if sized else None)
        self.register_buffer("drw_weight", class_balanced_weights(as_count_table(class_counts)[0], beta).float()
                             if sized else None)
        self.scale = scale
        self.drw_epoch = drw_epoch
        self.epoch = 0

    def for_model(self, class_counts: Sequence[int], num_groups: int | None = None) -> LDAMLoss:
        """This loss sized for a model's classes: itself when built with ``class_counts``, else a copy with them."""
        return self if self.margins is not None else LDAMLoss(**{**self.init_args, "class_counts": class_counts})

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def reweighting(self) -> bool:
        return self.drw_epoch is not None and self.epoch >= self.drw_epoch

    def forward(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        if self.margins is None:
            raise ValueError("LDAMLoss() without class_counts is a loss value that a model sizes (for_model); give "
                             "class_counts to call it directly.")
        weight = self.drw_weight if self.reweighting else None
        return ldam_loss(logits, target, self.margins, self.scale, weight)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 1.0, validate: bool = True) -> Tensor:
    """Focal loss (Lin et al. 2017), softmax form: mean of ``-(1 - p_y) ** gamma * log p_y``."""
    if gamma < 0:
        raise ValueError(f"gamma must be non-negative; got {gamma}.")
    if validate:
        check_loss_inputs(logits, target)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    logp_y = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    return (-(1.0 - logp_y.exp()).pow(gamma) * logp_y).mean()


class FocalLoss(nn.Module):
    """Focal loss as a module; see :func:`focal_loss`.

    Example:
        >>> loss = FocalLoss(gamma=1.0)(torch.randn(8, 3), torch.randint(0, 3, (8,)))
    """

    def __init__(self, gamma: float = 1.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be non-negative; got {gamma}.")
        self.gamma = gamma
        self.init_args = {"gamma": gamma}

    def forward(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        return focal_loss(logits, target, self.gamma)


def unit_mean_losses(losses: Tensor, index: Tensor, num_units: int,
                     reducer: Reducer | None = None) -> tuple[Tensor, Tensor]:
    """Mean of ``losses`` within each unit (class, group or (class, group) cell) and which units occur.

    With a ``reducer`` over several processes (its ``sum`` called once, on detached statistics), the means and the
    presence are those of the union of all processes' samples, and the gradient of the means is scaled by the
    number of processes so that its average over the processes (what DDP and the hypergradient's ``reduce`` take)
    is the gradient of the means of the union. Nothing is read back to the host.

    Args:
        losses, index: per-sample losses ``(N,)`` and the unit of every sample ``(N,)``, in ``[0, num_units)``.
        reducer: a :class:`~lightning_autobalance.core.reduce.Reducer`; ``None`` for this process only.

    Returns:
        ``(means, present)``: ``means[j]`` is the mean over the samples of unit ``j`` (0 where it has none) and
        ``present[j]`` whether it has any. Differentiable in ``losses``.

    Example:
        >>> unit_mean_losses(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), 3)
        (tensor([2., 0., 5.]), tensor([ True, False,  True]))
    """
    sums = torch.zeros(num_units, dtype=losses.dtype, device=losses.device).index_add(0, index, losses)
    counts = torch.bincount(index, minlength=num_units).to(losses.dtype)
    world_size = 1 if reducer is None else reducer.world_size
    if reducer is not None and world_size > 1:
        total = reducer.sum(torch.stack([sums.detach(), counts]))
        scaled = world_size * sums  # value: the sums of all processes; gradient: world_size x this process's
        sums, counts = scaled + (total[0] - scaled).detach(), total[1]
    return sums / counts.clamp_min(1.0), counts > 0


class GroupDROLoss(nn.Module):
    """Online group DRO (Sagawa et al., ICLR 2020), the classic algorithm, as a training loss.

    Keeps a distribution ``q`` over the units (``(label, group)`` cells by default, as in the paper's groups; or
    groups, or classes). At every training call (module in training mode, gradients enabled) it first moves
    ``q_j <- q_j * exp(step_size * L_j)`` with ``L_j`` the mean cross-entropy of unit ``j`` in the batch (0, so no
    change, for a unit absent from the batch) and renormalises; the loss is then ``sum_j q_j L_j`` (absent units
    contribute 0), as the authors' code does. Evaluation calls do not move ``q``. No generalisation adjustment
    (``C / sqrt(n_g)``) is applied. ``q`` is a buffer (checkpointed).

    With a ``reducer`` over several processes (the default, :meth:`Reducer.torch_distributed
    <lightning_autobalance.core.reduce.Reducer.torch_distributed>`, sums over the ``torch.distributed`` group when one
    is initialised, as under DDP), a training call sums the per-unit loss sums and counts over the processes (one
    collective call, so every process must make the same training calls): ``q`` moves by the
    unit losses of the union of the batches and stays identical on every process, and the loss's gradient is
    scaled so that DDP's average over processes is the gradient of ``sum_j q_j L_j`` on the union.

    Args:
        num_classes, num_groups: ``K`` and ``G``; both ``None`` for a loss value that a model sizes (:meth:`for_model`).
        step_size: ``eta_q`` of the exponentiated-gradient step on ``q`` (the paper uses 0.01).
        reducer: combines the per-unit statistics over processes during training
            (:class:`~lightning_autobalance.core.reduce.Reducer`; default: the ``torch.distributed`` group, if any).

    Example:
        >>> criterion = GroupDROLoss(num_classes=2, num_groups=2)
        >>> loss = criterion(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]))
        >>> criterion.q.shape
        torch.Size([4])
    """

    def __init__(self, num_classes: int | None = None, num_groups: int | None = None, step_size: float = 0.01,
                 over: Literal["cell", "group", "class"] = "cell", reducer: Reducer | None = None) -> None:
        super().__init__()
        if reducer is not None and not isinstance(reducer, Reducer):
            raise ValueError(f"reducer must be a lightning_autobalance.core.reduce.Reducer or None; got "
                             f"{type(reducer).__name__}.")
        self.reducer = reducer if reducer is not None else Reducer.torch_distributed()
        #: The constructor's arguments but the reducer, plain data: how a model's hyperparameters record this loss.
        self.init_args = {"num_classes": num_classes, "num_groups": num_groups, "step_size": step_size, "over": over}
        if (num_classes is None) != (num_groups is None):
            raise ValueError(f"give both num_classes and num_groups, or neither (a model sizes the loss); got "
                             f"{num_classes}, {num_groups}.")
        if num_classes is not None and num_groups is not None and (num_classes < 1 or num_groups < 1):
            raise ValueError(f"num_classes and num_groups must be positive; got {num_classes}, {num_groups}.")
        if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"step_size must be a positive number; got {step_size!r}.")
        if over not in ("cell", "group", "class"):
            raise ValueError(f"over must be 'cell', 'group' or 'class'; got {over!r}.")
        self.num_classes, self.num_groups, self.step_size, self.over = num_classes, num_groups, float(step_size), over
        self.register_buffer("q", None)
        if num_classes is not None and num_groups is not None:
            units = num_units(over, num_classes, num_groups)
            self.q = torch.full((units,), 1.0 / units)

    def for_model(self, class_counts: Sequence[int], num_groups: int | None = None) -> GroupDROLoss:
        """This loss sized for a model's classes and groups (1 without groups): itself when built with its sizes."""
        return self if self.q is not None else GroupDROLoss(len(class_counts), num_groups or 1, self.step_size,
                                                            self.over, self.reducer)

    def forward(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        if self.q is None:
            raise ValueError("GroupDROLoss() without sizes is a loss value that a model sizes (for_model); give "
                             "num_classes and num_groups to call it directly.")
        if group is None and self.over != "class":
            raise ValueError("Group DRO needs the group of every training sample: batches must be (x, y, g).")
        check_loss_inputs(logits, target, group if self.over != "class" else None, self.num_groups)
        losses = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target,
                                 reduction="none")
        index = unit_index(self.over, target, group, self.num_classes)
        training = self.training and torch.is_grad_enabled()
        means, _ = unit_mean_losses(losses, index, self.q.numel(), self.reducer if training else None)
        if training:
            with torch.no_grad():
                q = self.q.double() * torch.exp(self.step_size * means.detach().double())
                self.q.copy_(q / q.sum())
        return (self.q.to(means) * means).sum()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_groups={self.num_groups}, step_size={self.step_size}, " \
               f"over={self.over!r}"
