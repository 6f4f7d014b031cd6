"""Upper (validation-side) objectives that the loss search minimises.

An objective is any callable ``objective(logits, target, group) -> scalar tensor``. Named objectives
(:data:`OBJECTIVES`, built by :func:`build_objective` from the counts of the upper data):

==================  ================================================================================================
name                objective
==================  ================================================================================================
``balanced_ce``     cross-entropy weighted by the inverse class (or, ``over="cell"``, (class, group) cell) frequency
                    of the upper data: the default, a smooth surrogate of the balanced error
``worst_class``     a smooth maximum over classes of the per-class mean cross-entropy (:class:`WorstGroupLoss`)
``worst_group``     the same over groups: ``over="cell"`` ((label, group) cells, the default), ``"group"`` or
                    ``"class"``
``deo``             difference of equal opportunity: the gap between groups of the per-(label, group) mean
                    cross-entropy, averaged over labels (:class:`EqualOpportunityGap`)
``blend``           ``(1 - lam) * accuracy + lam * fairness`` of two of the others (:class:`BlendedObjective`)
==================  ================================================================================================

Each class has a functional form beside it (``balanced_cross_entropy``, ``worst_group_loss``,
``equal_opportunity_gap``, ``blended_objective``), in the style of ``torchmetrics.functional``. Everything is
differentiable in the logits and computed in float32 or wider.

**Per-unit means over a batch.** The worst-group and equal-opportunity objectives take the mean cross-entropy of
every class, group or (label, group) cell *present in the batch*. A unit absent from the batch is masked: it is
left out of the smooth maximum, and a label with fewer than two groups in the batch is left out of the gap; a batch
with no label in two groups gives a gap of 0 (with a warning). With ``missing="raise"`` an absent unit raises
instead. Units absent from the whole upper data are refused when the objective is built
(from the upper counts, at the callback's setup): give every required class, group or cell at least one upper
sample (the group datamodules split per (class, group) cell for that reason).

**Multiple processes.** ``balanced_ce`` is a plain mean over samples with weights fixed from counts, so the mean
of its gradients over processes is its gradient on the union of their batches. The other objectives are nonlinear
in per-unit means (a log-sum-exp, a maximum, a gap), so averaging what every process computes on its own batch
would only approximate them. Built with a :class:`~lightning_autobalance.core.reduce.Reducer` over several processes
(the callback passes its own), they sum the per-unit loss sums and counts over processes first (one collective call
per evaluation): every process gets the objective of the union of the batches, and a gradient that, averaged over
processes, is its exact gradient there. A unit counts as present when any process has it. A user's own callable
objective is evaluated per process and its gradients averaged, which is exact for a mean over samples.

**No host reads.** With ``validate=False`` (how :class:`UpperObjective` builds them for the callback, which checks
the labels and groups of the upper data once, at setup) no objective reads anything back from the device: absent
units are masked with ``torch.where``, not by indexing. ``validate=True`` (the default for direct use) checks the
values of every batch (one host read) and warns when an equal-opportunity batch has no gap to measure;
``missing="raise"`` reads whether every unit is present.

Plain PyTorch; nothing of Lightning.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_autobalance.core.cells import cell_index, num_units, unit_index
from lightning_autobalance.core.losses import as_count_table, check_loss_inputs, unit_mean_losses
from lightning_autobalance.core.reduce import Reducer

__all__ = ["OBJECTIVES", "BalancedCrossEntropy", "BlendedObjective", "EqualOpportunityGap", "WorstClassLoss",
           "UpperObjective", "WorstGroupLoss", "balanced_cross_entropy", "blended_objective", "build_objective",
           "check_objective", "equal_opportunity_gap", "resolve_objective", "unit_mean_losses", "worst_group_loss"]

Objective = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
Over = Literal["class", "group", "cell"]
Missing = Literal["mask", "raise"]
_OVER = ("class", "group", "cell")
_MISSING = ("mask", "raise")


# -- Small helpers -----------------------------------------------------------------------------------------------------
def _wide(logits: Tensor) -> Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _count_table(counts: Sequence[int] | Sequence[Sequence[int]] | Tensor, num_groups: int | None = None) -> Tensor:
    """Counts of the upper data as a float64 ``(G, K)`` table; zeros allowed (absent cells are checked later)."""
    table = torch.as_tensor(counts, dtype=torch.float64)
    if table.ndim == 1:
        table = table.unsqueeze(0)
    if table.ndim != 2 or table.numel() == 0:
        raise ValueError(f"class_counts must be K counts or a G x K table of (group, class) counts; got shape "
                         f"{tuple(table.shape)}.")
    if not torch.isfinite(table).all() or (table < 0).any():
        raise ValueError("class_counts must be non-negative numbers of samples.")
    if num_groups is not None and table.shape[0] != num_groups:
        if table.shape[0] != 1:
            raise ValueError(f"class_counts has {table.shape[0]} group rows, expected num_groups={num_groups}.")
        # Only class counts are known: every group is assumed present (the datamodule or the callback checks
        # the cells when it knows them).
        table = table.expand(num_groups, -1).clone()
    return table


class _OnDevice:
    """Copies of a host tensor on the devices (and dtypes) it is used on, made once each."""

    def __init__(self, tensor: Tensor) -> None:
        self.host = tensor
        self._copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def on(self, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
        key = (device, dtype or self.host.dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self.host.to(device).to(key[1])
        return copy


def _unit_name(over: str, j: int, num_classes: int) -> str:
    if over == "class":
        return f"class {j}"
    if over == "group":
        return f"group {j}"
    return f"(label {j % num_classes}, group {j // num_classes})"


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}; got {value!r}.")
    return str(value)


def _check_num_groups(num_groups: Any) -> int | None:
    if num_groups is None:
        return None
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer or None; got {num_groups!r}.")
    return num_groups


def _check_batch(logits: Tensor, target: Tensor, group: Tensor | None, num_groups: int | None, needs_group: bool,
                 what: str, validate: bool = True) -> int:
    """Validates a batch (shapes always; label and group ranges, one host read, with ``validate``); returns the
    number of groups."""
    if needs_group and group is None:
        raise ValueError(f"{what} needs the group of every sample: batches must be (x, y, g).")
    if validate and group is not None and num_groups is None:
        raise ValueError(f"{what} needs num_groups to check the group indices.")
    g = num_groups or 1
    check_loss_inputs(logits, target, group if needs_group else None, g, check_values=validate)
    return g


def _missing_error(what: str, names: list[str], batch: bool) -> ValueError:
    where = "this upper batch" if batch else "the upper data"
    fix = ("use larger upper batches (upper_batch_size) or missing='mask'" if batch else
           "give every one at least one upper sample (e.g. a split per (class, group) cell)")
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return ValueError(f"{what}: {where} has no sample of {shown}; {fix}.")


# -- Balanced cross-entropy (the default) ------------------------------------------------------------------------------
def balanced_cross_entropy(logits: Tensor, target: Tensor, class_weight: Tensor,
                           group: Tensor | None = None) -> Tensor:
    """``mean_i class_weight[y_i] * CE(logits_i, y_i)``, computed in float32 or wider.

    With ``class_weight[y] = N / (K n_y)`` from the counts ``n_y`` of the upper data, the expectation is the
    class-averaged cross-entropy. ``class_weight`` may also be a ``(G, K)`` table (sample ``(y, g)`` uses
    ``class_weight[g, y]``; then ``group`` is needed): with ``N / (G K n_{g,y})`` the expectation is the
    cross-entropy averaged over (class, group) cells.
    """
    ce = F.cross_entropy(_wide(logits), target, reduction="none")
    weight = class_weight.to(ce)
    if weight.ndim == 2:
        if group is None:
            raise ValueError("A (G, K) table of weights needs the group of every sample.")
        return (weight[group, target] * ce).mean()
    return (weight[target] * ce).mean()


class BalancedCrossEntropy:
    """Balanced cross-entropy with weights fixed from the counts of the upper data (the default upper objective).

    Args:
        class_counts: samples per class of the upper data (or of the training data when the upper split has the
            same profile), or a ``G x K`` table of samples per (group, class).
        over: ``"class"``: weights ``N / (K n_y)`` (the mean over classes of the per-class cross-entropy);
            ``"cell"``: weights ``N / (G K n_{g,y})`` (the mean over (class, group) cells), which needs the count
            table and batches with groups.
        num_groups: the number of groups ``G`` for ``over="cell"`` (default: the rows of ``class_counts``).
        reducer: accepted so that every objective is built alike; not needed (a mean over samples: the average of
            the processes' gradients is its gradient on the union of their batches).
        validate: accepted likewise; the labels are checked by ``cross_entropy`` itself.

    Example:
        >>> objective = BalancedCrossEntropy([90, 9, 1])
        >>> value = objective(torch.randn(5, 3), torch.tensor([0, 0, 1, 2, 0]), None)
    """

    requires_all_classes = True
    uses_groups = False

    def __init__(self, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor, over: Over = "class",
                 num_groups: int | None = None, *, reducer: Reducer | None = None, validate: bool = True) -> None:
        self.check_settings(over=over, num_groups=num_groups)
        self.over = over
        table = _count_table(class_counts, num_groups if over == "cell" else None)
        counts = as_count_table(table.sum(dim=0))[0]
        self.class_counts = counts
        self.num_groups = table.shape[0]
        self.uses_groups = over == "cell"
        if over == "cell":
            missing = [f"(label {k}, group {g})" for g, k in (table == 0).nonzero().tolist()]
            if missing:
                raise _missing_error("balanced_ce over (class, group) cells", missing, batch=False)
            self.class_weight = table.sum() / (table.numel() * table)
        else:
            self.class_weight = counts.sum() / (counts.numel() * counts)
        # float64 here; copied to a device once (then cast there to the float32 or wider dtype of the loss)
        self._weight = _OnDevice(self.class_weight)

    @staticmethod
    def check_settings(over: Any = "class", num_groups: Any = None) -> None:
        """Checks the settings alone (no counts needed); raises ``ValueError``."""
        _check_choice("over", over, ("class", "cell"))
        _check_num_groups(num_groups)

    def __call__(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        if self.over == "cell" and group is None:
            raise ValueError("balanced_ce over (class, group) cells needs the group of every sample: batches must be "
                             "(x, y, g).")
        return balanced_cross_entropy(logits, target, self._weight.on(logits.device),
                                      group if self.over == "cell" else None)

    def __repr__(self) -> str:
        cells = f", over='cell', num_groups={self.num_groups}" if self.over == "cell" else ""
        return f"BalancedCrossEntropy(num_classes={self.class_counts.numel()}{cells})"


# -- Smooth worst class / worst group ----------------------------------------------------------------------------------
def _soft_max(values: Tensor, present: Tensor, mode: str, temperature: float, fraction: float) -> Tensor:
    """Over the units ``present``: ``T log mean exp(v / T)`` (``"lse"``), the CVaR at ``fraction`` (``"cvar"``) or
    the maximum (``"max"``). Absent units are masked with ``torch.where`` (no indexing by a mask: nothing is read
    back from the device)."""
    m = present.sum().to(values.dtype)
    if mode == "lse":
        scaled = torch.where(present, values / temperature, torch.full_like(values, -math.inf))
        log_m = m.double().log().to(values.dtype)  # as math.log of the count, rounded once
        return temperature * (torch.logsumexp(scaled, dim=0) - log_m)
    if mode == "max":
        return torch.where(present, values, torch.full_like(values, -math.inf)).max()
    # CVaR: the mean of the largest fraction of the m values, the boundary value counted fractionally.
    ordered = torch.sort(torch.where(present, values, torch.full_like(values, -math.inf)), descending=True).values
    rank = torch.arange(values.numel(), dtype=values.dtype, device=values.device)
    ordered = torch.where(rank < m, ordered, torch.zeros_like(ordered))
    mass = fraction * m
    weights = torch.clamp(mass - rank, 0.0, 1.0)
    return (weights * ordered).sum() / mass


def worst_group_loss(logits: Tensor, target: Tensor, group: Tensor | None = None, num_groups: int | None = None,
                     over: Over = "cell", mode: Literal["lse", "cvar", "max"] = "lse", temperature: float = 0.1,
                     fraction: float = 0.2, missing: Missing = "mask", validate: bool = True,
                     reducer: Reducer | None = None) -> Tensor:
    """A smooth maximum over classes, groups or (label, group) cells of their mean cross-entropy in the batch.

    With ``L_j`` the mean cross-entropy of the samples of unit ``j`` in the batch, over the ``m`` units present:

    * ``mode="lse"``: ``T * log( (1/m) sum_j exp(L_j / T) )``, which lies between the mean of the ``L_j``
      (``T -> inf``) and their maximum (``T -> 0``);
    * ``mode="cvar"``: the mean of the largest ``fraction`` of the ``L_j`` (conditional value at risk; the unit on
      the boundary counts fractionally; ``fraction=1`` is the mean);
    * ``mode="max"``: the maximum itself.

    Args:
        group: group of every sample ``(N,)`` in ``[0, num_groups)`` (needed unless ``over="class"``).
        over: ``"class"``, ``"group"`` or ``"cell"`` (a (label, group) pair, the groups of group DRO).
        temperature: ``T > 0`` of ``"lse"``: small is close to the maximum, large to the mean.
        fraction: CVaR level in ``(0, 1]``.
        missing: a unit absent from the batch is left out (``"mask"``) or raises (``"raise"``, one host read).
        validate: check the label and group ranges (one host read); shapes are always checked.
        reducer: the objective of the union of the processes' batches
            (:class:`~lightning_autobalance.core.reduce.Reducer`; ``None``: this batch).

    Example:
        >>> logits, y, g = torch.randn(8, 3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.tensor([0, 1] * 4)
        >>> worst_group_loss(logits, y, g, num_groups=2).ndim
        0
    """
    WorstGroupLoss.check_settings(over=over, mode=mode, temperature=temperature, fraction=fraction, missing=missing,
                                  num_groups=num_groups)
    k = logits.shape[-1]
    g = _check_batch(logits, target, group, num_groups, over != "class", f"worst-{over} objective", validate)
    losses = F.cross_entropy(_wide(logits), target, reduction="none")
    means, present = unit_mean_losses(losses, unit_index(over, target, group, k), num_units(over, k, g), reducer)
    if missing == "raise" and not bool(present.all()):
        names = [_unit_name(over, j, k) for j in (~present).nonzero().flatten().tolist()]
        raise _missing_error(f"worst-{over} objective", names, batch=True)
    return _soft_max(means, present, mode, temperature, fraction)


class WorstGroupLoss:
    """A smooth worst-class, worst-group or worst-cell objective (see :func:`worst_group_loss`).

    Args:
        class_counts: ``K`` class counts or a ``G x K`` table of (group, class) counts of the upper data. Every unit
            the objective ranges over must have at least one upper sample (checked here, before training).
        num_groups: ``G`` (default: the rows of ``class_counts``).
        over, mode, temperature, fraction, missing, reducer, validate: as in :func:`worst_group_loss`.

    Example:
        >>> objective = WorstGroupLoss([[20, 2], [2, 20]], over="cell", temperature=0.5)
        >>> objective(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])).ndim
        0
    """

    requires_all_classes = True
    counts_per_cell = True

    def __init__(self, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor, over: Over = "cell",
                 mode: Literal["lse", "cvar", "max"] = "lse", temperature: float = 0.1, fraction: float = 0.2,
                 missing: Missing = "mask", num_groups: int | None = None, *, reducer: Reducer | None = None,
                 validate: bool = True) -> None:
        self.check_settings(over=over, mode=mode, temperature=temperature, fraction=fraction, missing=missing,
                            num_groups=num_groups)
        self.reducer, self.validate = reducer, bool(validate)
        table = _count_table(class_counts, num_groups)
        self.class_counts = table.sum(dim=0)
        self.num_classes = table.shape[1]
        self.num_groups = table.shape[0]
        self.over, self.mode, self.temperature, self.fraction, self.missing = over, mode, temperature, fraction, missing
        self.uses_groups = over != "class"
        if over != "class" and self.num_groups < 2:
            raise ValueError(f"The worst-{over} objective needs groups: num_groups >= 2 (a G x K table of upper "
                             f"counts); got {self.num_groups} group.")
        per_unit = {"class": table.sum(dim=0), "group": table.sum(dim=1), "cell": table.flatten()}[over]
        missing_units = [_unit_name(over, j, self.num_classes) for j in (per_unit == 0).nonzero().flatten().tolist()]
        if missing_units:
            raise _missing_error(f"The worst-{over} objective", missing_units, batch=False)

    @staticmethod
    def check_settings(over: Any = "cell", mode: Any = "lse", temperature: Any = 0.1, fraction: Any = 0.2,
                       missing: Any = "mask", num_groups: Any = None) -> None:
        """Checks the settings alone (no counts needed); raises ``ValueError``."""
        _check_choice("over", over, _OVER)
        _check_choice("mode", mode, ("lse", "cvar", "max"))
        _check_choice("missing", missing, _MISSING)
        _check_num_groups(num_groups)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
                or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a positive finite number; got {temperature!r}.")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"fraction (the CVaR level) must lie in (0, 1]; got {fraction!r}.")

    def __call__(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        return worst_group_loss(logits, target, group, self.num_groups, self.over, self.mode, self.temperature,
                                self.fraction, self.missing, self.validate, self.reducer)

    def __repr__(self) -> str:
        setting = f"temperature={self.temperature}" if self.mode == "lse" else f"fraction={self.fraction}"
        return f"WorstGroupLoss(over={self.over!r}, mode={self.mode!r}, {setting}, num_groups={self.num_groups})"


# -- Difference of equal opportunity -----------------------------------------------------------------------------------
def equal_opportunity_gap(logits: Tensor, target: Tensor, group: Tensor, num_groups: int,
                          gap: Literal["abs", "square"] = "abs", pairs: Literal["max", "mean"] = "max",
                          labels: Sequence[int] | None = None, missing: Missing = "mask", validate: bool = True,
                          reducer: Reducer | None = None) -> Tensor:
    """A differentiable surrogate of the difference of equal opportunity (DEO) between groups.

    With ``L(y, g)`` the mean cross-entropy of the samples of label ``y`` and group ``g`` in the batch (a
    surrogate of the error rate ``1 - TPR`` of label ``y`` in group ``g``), the gap of label ``y`` is, over the
    groups present with that label:

    * ``pairs="max"``: ``max_g L(y, g) - min_g L(y, g)``, the largest pairwise gap (for two groups
      ``|L(y, 0) - L(y, 1)|``);
    * ``pairs="mean"``: the mean over pairs ``g < h`` of ``|L(y, g) - L(y, h)|`` (equal to ``"max"`` for two groups);

    squared with ``gap="square"`` (smooth at zero). The objective is the mean of the gaps over the labels in
    ``labels`` (default: every label) that have samples of at least two groups in the batch. For a binary task,
    ``labels=[1]`` is the classic equal-opportunity gap (true-positive rates); every label (the default) also
    counts the gap of the negative label (false-positive rates), as equalised odds does.

    When no requested label has two groups in the batch, the gap is 0 (attached to the logits); with ``validate``
    a warning says so. Labels and groups are masked with ``torch.where``: without ``validate`` (which reads the
    label and group ranges back) and ``missing="raise"`` nothing is read back from the device.

    Args:
        gap: ``"abs"`` or ``"square"``; pairs: ``"max"`` or ``"mean"`` (above).
        labels: the labels whose gaps are averaged: class indices, or a boolean mask of ``K`` entries (default:
            every label).
        missing: ``"mask"`` (a label with fewer than two groups in the batch is left out) or ``"raise"``.
        validate: check the label and group ranges of every batch and warn when it has no gap (one host read).
        reducer: the objective of the union of the processes' batches
            (:class:`~lightning_autobalance.core.reduce.Reducer`; ``None``: this batch).

    Raises:
        ValueError: for bad settings or indices, or (with ``missing="raise"``) when a requested (label, group) cell
            is absent from the batch.

    Example:
        >>> logits, y, g = torch.randn(8, 2), torch.tensor([0, 1] * 4), torch.tensor([0, 0, 1, 1] * 2)
        >>> equal_opportunity_gap(logits, y, g, num_groups=2) >= 0
        tensor(True)
    """
    mask_given = isinstance(labels, Tensor)
    EqualOpportunityGap.check_settings(gap=gap, pairs=pairs, missing=missing, num_groups=num_groups,
                                       labels=None if mask_given else labels)
    k = logits.shape[-1]
    _check_batch(logits, target, group, num_groups, True, "The equal-opportunity objective", validate)
    if validate and labels is not None and not mask_given and any(not 0 <= y < k for y in labels):
        raise ValueError(f"labels must lie in [0, {k}); got {list(labels)}.")
    losses = F.cross_entropy(_wide(logits), target, reduction="none")
    means, present = unit_mean_losses(losses, cell_index(group, target, k), num_groups * k, reducer)
    means, present = means.view(num_groups, k), present.view(num_groups, k)
    if mask_given:
        wanted = labels.to(device=means.device, dtype=torch.bool)  # type: ignore[union-attr]
    else:
        wanted = torch.full((k,), labels is None, dtype=torch.bool, device=means.device)
        if labels is not None:
            wanted[torch.as_tensor(list(labels), dtype=torch.long, device=means.device)] = True
    if missing == "raise":
        absent = [f"(label {y}, group {g_})" for g_ in range(num_groups) for y in range(k)
                  if bool(wanted[y]) and not bool(present[g_, y])]
        if absent:
            raise _missing_error("The equal-opportunity objective", absent, batch=True)
    valid = wanted & (present.sum(dim=0) >= 2)  # labels with samples of two groups or more
    if pairs == "max":
        high = torch.where(present, means, torch.full_like(means, -math.inf)).amax(dim=0)
        low = torch.where(present, means, torch.full_like(means, math.inf)).amin(dim=0)
        diffs = torch.where(valid, high - low, torch.zeros_like(high))
        gaps = diffs.square() if gap == "square" else diffs
    else:
        both = present.unsqueeze(0) & present.unsqueeze(1)  # (G, G, K): groups g and h both have label y
        both = both & torch.ones(num_groups, num_groups, dtype=torch.bool, device=means.device).triu(1).unsqueeze(-1)
        diffs = (means.unsqueeze(1) - means.unsqueeze(0)).abs()
        diffs = diffs.square() if gap == "square" else diffs
        pair_counts = both.sum(dim=(0, 1)).to(means.dtype)
        gaps = torch.where(both, diffs, torch.zeros_like(diffs)).sum(dim=(0, 1)) / pair_counts.clamp_min(1.0)
    gaps = torch.where(valid, gaps, torch.zeros_like(gaps))
    if validate and not bool(valid.any()):
        warnings.warn("The equal-opportunity objective: no label in this upper batch has samples of two groups, so no "
                      "gap can be measured and the batch contributes 0; use larger upper batches (upper_batch_size) "
                      "or missing='raise'.", stacklevel=2)
    return gaps.sum() / valid.sum().to(gaps.dtype).clamp_min(1.0)  # 0 (attached to the logits) without a gap


class EqualOpportunityGap:
    """The difference-of-equal-opportunity surrogate as an objective (see :func:`equal_opportunity_gap`).

    Args:
        class_counts: a ``G x K`` table of (group, class) counts of the upper data, ``G >= 2``. Every (label, group)
            cell of the requested labels needs at least one upper sample (checked here, before training).
        num_groups: ``G`` (default: the rows of ``class_counts``).
        gap, pairs, labels, missing, reducer, validate: as in :func:`equal_opportunity_gap`.

    Example:
        >>> objective = EqualOpportunityGap([[20, 2], [2, 20]])
        >>> objective(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])).ndim
        0
    """

    requires_all_classes = True
    uses_groups = True
    counts_per_cell = True

    def __init__(self, class_counts: Sequence[Sequence[int]] | Tensor, gap: Literal["abs", "square"] = "abs",
                 pairs: Literal["max", "mean"] = "max", labels: Sequence[int] | None = None, missing: Missing = "mask",
                 num_groups: int | None = None, *, reducer: Reducer | None = None, validate: bool = True) -> None:
        self.check_settings(gap=gap, pairs=pairs, missing=missing, num_groups=num_groups, labels=labels)
        self.reducer, self.validate = reducer, bool(validate)
        table = _count_table(class_counts, num_groups)
        self.class_counts = table.sum(dim=0)
        self.num_groups, self.num_classes = table.shape
        if self.num_groups < 2:
            raise ValueError("The equal-opportunity objective compares groups: it needs num_groups >= 2 (a G x K table "
                             f"of upper counts); got {self.num_groups} group.")
        k = self.num_classes
        self.labels = None if labels is None else [int(y) for y in labels]
        if self.labels is not None and any(not 0 <= y < k for y in self.labels):
            raise ValueError(f"labels must lie in [0, {k}); got {self.labels}.")
        wanted = list(range(k)) if self.labels is None else self.labels
        absent = [f"(label {y}, group {g})" for g in range(self.num_groups) for y in wanted if table[g, y] == 0]
        if absent:
            raise _missing_error("The equal-opportunity objective", absent, batch=False)
        self.gap, self.pairs, self.missing = gap, pairs, missing
        mask = torch.zeros(k, dtype=torch.bool)
        mask[wanted] = True
        self._wanted = _OnDevice(mask)  # the labels as a mask, copied to a device once

    @staticmethod
    def check_settings(gap: Any = "abs", pairs: Any = "max", missing: Any = "mask", num_groups: Any = None,
                       labels: Any = None) -> None:
        """Checks the settings alone (no counts needed); raises ``ValueError``."""
        _check_choice("gap", gap, ("abs", "square"))
        _check_choice("pairs", pairs, ("max", "mean"))
        _check_choice("missing", missing, _MISSING)
        _check_num_groups(num_groups)
        if labels is not None and (isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence) or not labels
                                   or any(isinstance(y, bool) or not isinstance(y, int) for y in labels)):
            raise ValueError(f"labels must be a non-empty list of class indices or None; got {labels!r}.")

    def __call__(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        if group is None:
            raise ValueError("The equal-opportunity objective needs the group of every sample: batches must be "
                             "(x, y, g).")
        return equal_opportunity_gap(logits, target, group, self.num_groups, self.gap, self.pairs,
                                     self._wanted.on(logits.device), self.missing, self.validate, self.reducer)

    def __repr__(self) -> str:
        return (f"EqualOpportunityGap(gap={self.gap!r}, pairs={self.pairs!r}, labels={self.labels}, "
                f"num_groups={self.num_groups})")


# -- Blend of an accuracy and a fairness objective ---------------------------------------------------------------------
def _check_lam(lam: Any) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (the weight of the fairness objective) must lie in [0, 1]; got {lam!r}.")
    return float(lam)


def blended_objective(accuracy: Tensor, fairness: Tensor, lam: float) -> Tensor:
    """``(1 - lam) * accuracy + lam * fairness`` for two objective values, ``lam`` in ``[0, 1]``."""
    lam = _check_lam(lam)
    return (1.0 - lam) * accuracy + lam * fairness


class BlendedObjective:
    """``(1 - lam) * accuracy_objective + lam * fairness_objective``.

    Args:
        class_counts: the upper counts, handed to both parts (a ``G x K`` table for group objectives).
        lam: the weight of the fairness objective, in ``[0, 1]``.
        accuracy: a name from :data:`OBJECTIVES` or a callable (default ``"balanced_ce"``).
        fairness: a name or a callable (default ``"deo"``).
        accuracy_kwargs, fairness_kwargs: settings of a named accuracy or fairness objective.
        num_groups, reducer, validate: handed to both named parts.

    Example:
        >>> objective = BlendedObjective([[20, 2], [2, 20]], lam=0.5, fairness="worst_group")
        >>> objective(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])).ndim
        0
    """

    counts_per_cell = True

    def __init__(self, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor, lam: float = 0.5,
                 accuracy: str | Objective = "balanced_ce", fairness: str | Objective = "deo",
                 accuracy_kwargs: Mapping[str, Any] | None = None, fairness_kwargs: Mapping[str, Any] | None = None,
                 num_groups: int | None = None, *, reducer: Reducer | None = None, validate: bool = True) -> None:
        self.check_settings(lam=lam, accuracy=accuracy, fairness=fairness, accuracy_kwargs=accuracy_kwargs,
                            fairness_kwargs=fairness_kwargs, num_groups=num_groups)
        self.lam = float(lam)
        groups = {} if num_groups is None else {"num_groups": num_groups}  # a named part's, unless its settings say
        self.accuracy, self.fairness = (
            UpperObjective(part, **(groups if isinstance(part, str) else {}) | dict(kwargs or {}))._make(
                class_counts, reducer, validate)
            for part, kwargs in ((accuracy, accuracy_kwargs), (fairness, fairness_kwargs)))
        self.requires_all_classes = any(getattr(o, "requires_all_classes", False)
                                        for o in (self.accuracy, self.fairness))
        self.uses_groups = any(getattr(o, "uses_groups", False) for o in (self.accuracy, self.fairness))

    @staticmethod
    def check_settings(lam: Any = 0.5, accuracy: Any = "balanced_ce", fairness: Any = "deo",
                       accuracy_kwargs: Any = None, fairness_kwargs: Any = None, num_groups: Any = None) -> None:
        """Checks ``lam`` and both parts' names and settings (no counts needed); raises ``ValueError``."""
        _check_lam(lam)
        _check_num_groups(num_groups)
        for (name, part), kwargs in zip((("accuracy", accuracy), ("fairness", fairness)),
                                        (accuracy_kwargs, fairness_kwargs)):
            if isinstance(part, str) and resolve_objective(part) == "blend":
                raise ValueError(f"The {name} part of a blend cannot itself be a blend.")
            if kwargs is not None and not isinstance(kwargs, Mapping):
                raise ValueError(f"{name}_kwargs must be a mapping of settings; got {type(kwargs).__name__}.")
            if callable(part) and not isinstance(part, str):
                if kwargs:
                    raise ValueError(f"{name}_kwargs are only for a named {name} objective, not a callable.")
                continue
            check_objective(part, **(dict(kwargs or {})))

    def __call__(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        parts = []
        for weight, objective in ((1.0 - self.lam, self.accuracy), (self.lam, self.fairness)):
            if weight > 0:  # a part with weight 0 is not evaluated (it may need groups the batch lacks)
                parts.append(weight * objective(logits, target, group))
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def __repr__(self) -> str:
        return f"BlendedObjective(lam={self.lam}, accuracy={self.accuracy!r}, fairness={self.fairness!r})"


# -- Registry ----------------------------------------------------------------------------------------------------------
class WorstClassLoss(WorstGroupLoss):
    """The ``"worst_class"`` objective: :class:`WorstGroupLoss` over classes (``over="class"``, the only value
    it takes).

    Example:
        >>> WorstClassLoss([20, 5, 2], temperature=0.5).over
        'class'
    """

    def __init__(self, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor, over: Over = "class",
                 mode: Literal["lse", "cvar", "max"] = "lse", temperature: float = 0.1, fraction: float = 0.2,
                 missing: Missing = "mask", num_groups: int | None = None, *, reducer: Reducer | None = None,
                 validate: bool = True) -> None:
        super().__init__(class_counts, over, mode, temperature, fraction, missing, num_groups, reducer=reducer,
                         validate=validate)  # its check_settings refuses any other ``over``

    @staticmethod
    def check_settings(over: Any = "class", mode: Any = "lse", temperature: Any = 0.1, fraction: Any = 0.2,
                       missing: Any = "mask", num_groups: Any = None) -> None:
        """Checks the settings alone (no counts needed); raises ``ValueError``."""
        if over != "class":
            raise ValueError("'worst_class' ranges over classes; use 'worst_group' with over='group' or 'cell'.")
        WorstGroupLoss.check_settings("class", mode, temperature, fraction, missing, num_groups)


#: Objectives selectable by name; each entry builds the objective from the upper counts (``K`` class counts or a
#: ``G x K`` table of (group, class) counts) and its settings.
OBJECTIVES: dict[str, Callable[..., Objective]] = {"balanced_ce": BalancedCrossEntropy, "worst_class": WorstClassLoss,
                                                   "worst_group": WorstGroupLoss, "deo": EqualOpportunityGap,
                                                   "blend": BlendedObjective}
_ALIASES = {"balanced_cross_entropy": "balanced_ce", "equal_opportunity": "deo", "eo_gap": "deo",
            "blended": "blend"}


def resolve_objective(name: str) -> str:
    """The canonical name of a named objective (aliases: ``balanced_cross_entropy``, ``equal_opportunity``,
    ``eo_gap``, ``blended``); raises ``ValueError`` for an unknown name."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in OBJECTIVES:
        raise ValueError(f"Unknown upper objective {name!r}; expected one of {sorted(OBJECTIVES)} or a callable "
                         "objective(logits, target, group) -> scalar.")
    return key


class _Scalar:
    """Calls a user's objective and checks that it returns a scalar tensor, with a message that names it."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective

    def __call__(self, logits: Tensor, target: Tensor, group: Tensor | None) -> Tensor:
        out = self.objective(logits, target, group)
        if not isinstance(out, Tensor) or out.ndim != 0:
            what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
            raise ValueError(f"The upper objective {self.objective!r} returned {what}; it must return a scalar "
                             "(0-dimensional) tensor that depends on the logits, e.g. the mean of per-sample losses "
                             "(`.mean()`).")
        return out

    def __repr__(self) -> str:
        return repr(self.objective)


class UpperObjective:
    """The upper objective as a value: what to build from the upper data's counts, and its settings, validated here.

    Args:
        objective: a name from :data:`OBJECTIVES` (``"balanced_ce"``, ``"worst_class"``, ``"worst_group"``,
            ``"deo"``, ``"blend"``; aliases accepted), one of the objective classes (any class whose first argument
            is the upper counts), or a ready callable ``objective(logits, target, group) -> scalar`` (used as it is:
            it takes no settings).
        **settings: the settings of a named objective or class (e.g. ``temperature=0.1`` for ``"worst_class"``,
            ``lam=0.5, fairness="deo"`` for ``"blend"``), checked now by the class's own ``check_settings``.

    :class:`~lightning_autobalance.AutoBalanceCallback` takes one (it knows no objective by name); :meth:`build` makes
    the objective from the counts, with the :class:`~lightning_autobalance.core.reduce.Reducer` of the run.
    :meth:`coerce` also accepts a name or a mapping ``{"name": ..., **settings}`` (a YAML group or a Hydra
    ``DictConfig``).

    Example:
        >>> spec = UpperObjective("worst_class", temperature=0.5)
        >>> spec.build([20, 5, 2])  # checked to return a scalar; shown as the objective it wraps
        WorstGroupLoss(over='class', mode='lse', temperature=0.5, num_groups=1)
        >>> UpperObjective.coerce({"name": "blend", "lam": 2.0})
        Traceback (most recent call last):
        ...
        ValueError: lam (the weight of the fairness objective) must lie in [0, 1]; got 2.0.
    """

    def __init__(self, objective: str | type | Objective = "balanced_ce", **settings: Any) -> None:
        self.name: str | None = None
        self.builder: type | None = None
        self.objective: Objective | None = None
        if isinstance(objective, str):
            self.name = resolve_objective(objective)
            self.builder = OBJECTIVES[self.name]  # type: ignore[assignment]
        elif isinstance(objective, type):
            self.builder = objective
        elif callable(objective):
            if settings:
                raise ValueError(f"A callable upper objective takes no settings (they are only for a named objective "
                                 f"or an objective class); got {sorted(settings)} beside {objective!r}.")
            self.objective = objective
        else:
            raise ValueError(f"objective must be a name from {sorted(OBJECTIVES)}, an objective class or a callable "
                             f"objective(logits, target, group) -> scalar; got {type(objective).__name__}.")
        self.settings = dict(settings)
        checker = getattr(self.builder, "check_settings", None)
        if checker is not None:
            try:
                checker(**self.settings)
            except TypeError as err:  # a setting the objective does not take (Python names the first)
                found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
                unknown = [found.group(1)] if found else sorted(self.settings)
                raise ValueError(f"The objective {self.describe()} takes no argument {unknown} ({err}).") from err

    @classmethod
    def coerce(cls, value: Any) -> UpperObjective:
        """An :class:`UpperObjective` from itself, a name, a class, a callable, or a mapping
        ``{"name": <name>, **settings}`` (``"objective"`` is read as ``"name"``), validated alike."""
        if isinstance(value, UpperObjective):
            return value
        if isinstance(value, Mapping):
            settings = {str(k): v for k, v in value.items()}
            name = settings.pop("name", settings.pop("objective", "balanced_ce"))
            return cls(name, **settings)
        return cls(value)

    @property
    def is_named(self) -> bool:
        """Whether the objective is built from counts (a name or a class), not a ready callable."""
        return self.builder is not None

    @property
    def counts_per_cell(self) -> bool:
        """Whether it is built from (group, class) counts when the upper batches carry groups."""
        return bool(getattr(self.builder, "counts_per_cell", False)) or self.settings.get("over") == "cell"

    @property
    def requires_all_classes(self) -> bool:
        """Whether every class needs upper samples (every built objective; a callable that says so)."""
        return self.is_named or bool(getattr(self.objective, "requires_all_classes", False))

    @property
    def num_groups(self) -> int | None:
        """The number of groups its settings give (``None`` when they give none)."""
        return self.settings.get("num_groups")

    def build(self, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor, reducer: Reducer | None = None,
              validate: bool = True) -> Objective:
        """The objective for these upper counts (``K`` class counts or a ``G x K`` table), wrapped in a check that
        it returns a scalar tensor (the wrapper's ``objective`` is the objective itself).

        Args:
            reducer: combines the per-unit statistics over processes (``None``: one process).
            validate: whether the built objective checks the label and group ranges of every batch (a host read
                each call; the callback checks the upper data once instead and builds with ``False``).

        Raises:
            ValueError: for units the objective needs that the counts lack.
        """
        return _Scalar(self._make(class_counts, reducer, validate))

    def _make(self, class_counts: Any, reducer: Reducer | None = None, validate: bool = True) -> Objective:
        """The objective itself (:meth:`build` wraps it in a check that it returns a scalar)."""
        if self.objective is not None:
            return self.objective
        assert self.builder is not None
        return self.builder(class_counts, **self.settings, reducer=reducer, validate=validate)

    def describe(self) -> str:
        """The objective's name (or class or callable) for messages."""
        if self.name is not None:
            return repr(self.name)
        return self.builder.__name__ if self.builder is not None else repr(self.objective)

    def __repr__(self) -> str:
        what = self.describe()
        settings = "".join(f", {k}={v!r}" for k, v in self.settings.items())
        return f"UpperObjective({what}{settings})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UpperObjective) and (self.name, self.builder, self.objective, self.settings) == (
            other.name, other.builder, other.objective, other.settings)

    __hash__ = None  # type: ignore[assignment]


def check_objective(objective: str | Objective, **kwargs: Any) -> None:
    """Checks a named objective and its settings without any counts (e.g. when a callback is constructed); raises
    ``ValueError`` for an unknown name, an argument the objective does not take, or a bad setting."""
    UpperObjective(objective, **kwargs)


def build_objective(objective: str | Objective, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor,
                    **kwargs: Any) -> Objective:
    """A callable objective: a named one (with its settings ``kwargs``) built from the upper data's counts, as
    :meth:`UpperObjective.build` makes it but without the scalar check, or a callable as it is; raises ``ValueError``
    for an unknown name, bad settings, or units the objective needs that the counts lack."""
    if callable(objective) and not isinstance(objective, (str, type)):
        UpperObjective(objective, **kwargs)  # a callable takes no settings
        return objective
    return UpperObjective(objective, **kwargs)._make(class_counts)
