"""Upper (validation-side) objectives that the loss search minimises.

An objective is any callable ``objective(logits, target, group) -> scalar tensor``. The default is the balanced
cross-entropy of DESIGN.md section 4: cross-entropy weighted by the inverse class frequency of the upper data, so
that its expectation is the mean over classes of the per-class cross-entropy. Its weights are fixed from counts
(not re-estimated per batch), so the objective is a plain mean over samples: averaging it over processes is the
same as computing it on the union of their batches.

Plain PyTorch; nothing of Lightning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_autobalance.losses import as_count_table

__all__ = ["OBJECTIVES", "BalancedCrossEntropy", "balanced_cross_entropy", "build_objective"]

Objective = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def balanced_cross_entropy(logits: Tensor, target: Tensor, class_weight: Tensor) -> Tensor:
    """``mean_i class_weight[y_i] * CE(logits_i, y_i)``, computed in float32 or wider.

    With ``class_weight[y] = N / (K n_y)`` from the counts ``n_y`` of the upper data, the expectation is the
    class-averaged cross-entropy.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(z, target, reduction="none")
    return (class_weight.to(ce)[target] * ce).mean()


class BalancedCrossEntropy:
    """Balanced cross-entropy with weights fixed from class counts (the default upper objective).

    Args:
        class_counts: samples per class of the upper data (or of the training data when the upper split has the
            same profile).

    Example:
        >>> objective = BalancedCrossEntropy([90, 9, 1])
        >>> value = objective(torch.randn(5, 3), torch.tensor([0, 0, 1, 2, 0]), None)
    """

    requires_all_classes = True

    def __init__(self, class_counts: Sequence[int] | Tensor) -> None:
        counts = as_count_table(class_counts).sum(dim=0)
        self.class_counts = counts
        self.class_weight = (counts.sum() / (counts.numel() * counts)).float()

    def __call__(self, logits: Tensor, target: Tensor, group: Tensor | None = None) -> Tensor:
        return balanced_cross_entropy(logits, target, self.class_weight.to(logits.device))

    def __repr__(self) -> str:
        return f"BalancedCrossEntropy(num_classes={self.class_counts.numel()})"


#: Objectives selectable by name; each entry builds the objective from the upper class counts.
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "balanced_ce": BalancedCrossEntropy,
}


def build_objective(objective: str | Objective, class_counts: Sequence[int] | Tensor, **kwargs: Any) -> Objective:
    """Returns a callable objective: a name from :data:`OBJECTIVES` built from the counts, or a callable as is.

    Raises:
        ValueError: for an unknown name.
    """
    if callable(objective):
        return objective
    key = str(objective).strip().lower()
    if key not in OBJECTIVES:
        raise ValueError(f"Unknown upper objective {objective!r}; expected one of {sorted(OBJECTIVES)} or a callable "
                         "objective(logits, target, group) -> scalar.")
    return OBJECTIVES[key](class_counts, **kwargs)
