"""Group metrics: error per (label, group) cell, per group, worst group, and the equal-opportunity gap.

Definitions (``e[g, y]``: the error rate of the samples of label ``y`` and group ``g``):

* ``cell_error``: the ``G x K`` table ``e[g, y]`` (NaN for a cell without samples);
* ``group_error``: per group ``g``, the mean over labels of ``e[g, y]`` (the class-balanced error within the group;
  on a test set balanced over classes in every group it is the group's error rate);
* ``worst_group_error``: the largest ``e[g, y]`` over the cells with samples, a *group* being a (label, group)
  cell as in group DRO (Sagawa et al. 2020);
* ``average_error``: the error rate over all samples;
* ``eo_gap``: the difference of equal opportunity, the mean over labels ``y`` (those with samples in at least two
  groups) of ``max_g e[g, y] - min_g e[g, y]``; for two groups ``|TPR_y(g=0) - TPR_y(g=1)|`` averaged over labels
  (for a binary task, the mean of the true-positive and true-negative rate gaps, i.e. the average-odds
  difference); ``eo_gap_per_label`` gives each label's gap.

torchmetrics has no multiclass, multi-group form of these (``BinaryFairness`` is binary and reports ratios), so
:class:`GroupErrors` keeps the counts per cell itself, as a torchmetrics ``Metric`` (summed over processes).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_autobalance.core.cells import cell_index

__all__ = ["GroupErrors", "group_report"]


def group_report(correct: Tensor, total: Tensor) -> dict[str, Any]:
    """The group metrics (see the module docstring) from ``G x K`` tables of correct and total counts.

    Example:
        >>> report = group_report(torch.tensor([[9, 5], [8, 10]]), torch.tensor([[10, 10], [10, 10]]))
        >>> report["worst_group_error"], report["eo_gap"]
        (0.5, 0.3)
    """
    correct, total = correct.double().cpu(), total.double().cpu()
    present = total > 0
    cell = torch.where(present, 1.0 - correct / total.clamp_min(1.0), torch.full_like(total, math.nan))
    group_error = [float(row[~row.isnan()].mean()) if (~row.isnan()).any() else math.nan for row in cell]
    gaps = []
    for y in range(cell.shape[1]):
        column = cell[:, y][present[:, y]]
        gaps.append(float(column.max() - column.min()) if column.numel() >= 2 else math.nan)
    valid = [v for v in gaps if not math.isnan(v)]
    n = float(total.sum())
    return {"cell_error": [[float(v) for v in row] for row in cell], "group_error": group_error,
            "worst_group_error": float(cell[present].max()) if present.any() else math.nan,
            "average_error": 1.0 - float(correct.sum()) / n if n > 0 else math.nan,
            "eo_gap": sum(valid) / len(valid) if valid else math.nan, "eo_gap_per_label": gaps}


class GroupErrors(Metric):
    """Counts correct predictions per (group, label) cell; :meth:`compute` returns :func:`group_report`.

    Example:
        >>> metric = GroupErrors(num_classes=2, num_groups=2)
        >>> metric.update(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1]))
        >>> metric.compute()["worst_group_error"]
        1.0
    """

    full_state_update = False
    correct: Tensor
    total: Tensor

    def __init__(self, num_classes: int, num_groups: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1 or num_groups < 1:
            raise ValueError(f"num_classes and num_groups must be positive; got {num_classes}, {num_groups}.")
        self.num_classes, self.num_groups = num_classes, num_groups
        self.add_state("correct", torch.zeros(num_groups, num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_groups, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, group: Tensor) -> None:
        """Adds a batch of predicted labels, true labels and groups (each ``(N,)``)."""
        if not (preds.shape == target.shape == group.shape) or target.ndim != 1:
            raise ValueError(f"preds, target and group must be three (N,) tensors; got {tuple(preds.shape)}, "
                             f"{tuple(target.shape)}, {tuple(group.shape)}.")
        k, g = self.num_classes, self.num_groups
        if target.numel() and (target.min() < 0 or target.max() >= k or group.min() < 0 or group.max() >= g):
            raise ValueError(f"labels must lie in [0, {k}) and groups in [0, {g}).")
        cell = cell_index(group.long(), target.long(), k).to(self.total.device)
        self.total += torch.bincount(cell, minlength=g * k).view(g, k)
        hits = (preds.to(target.device) == target).to(self.total.device)
        self.correct += torch.bincount(cell[hits], minlength=g * k).view(g, k)

    def compute(self) -> dict[str, Any]:
        return group_report(self.correct, self.total)
