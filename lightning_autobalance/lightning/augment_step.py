"""What a hyper step needs from a module whose augmentation is searched (``search=[..., "augment"]``), in one place.

:class:`~lightning_autobalance.AutoBalanceCallback` calls these few functions: the free values one hyper optimizer
moves (the loss's and the augmentation's, :func:`searched_values`), their shrinkage counts
(:func:`shrink_counts`), the training batches with their clean inputs and the draws they were (or are) augmented
with (:func:`augmented_train`, which makes the
:class:`~lightning_autobalance.core.augment_term.InputAugmentation` the hypergradient takes) and the figures logged
(:func:`augment_figures`). For a module without a searched augmentation they return what the callback had
before: the loss's values, no counts, the batches as they are, no figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_autobalance.core.augment_parametrization import AugmentParameters
from lightning_autobalance.core.augment_term import InputAugmentation
from lightning_autobalance.core.problem import Batch

__all__ = ["augment_figures", "augmented_train", "searched_augmentation", "searched_values", "shrink_counts"]


def searched_augmentation(pl_module: Any) -> AugmentParameters | None:
    """The module's augmentation parameters when they are searched (built and not frozen), else ``None``."""
    get = getattr(pl_module, "autobalance_augment_parameters", None)
    aug = get() if callable(get) else None
    return aug if isinstance(aug, AugmentParameters) and not aug.frozen else None


def searched_values(pl_module: Any) -> dict[str, Tensor]:
    """The free values a hyper step moves, by name: the loss's, then the searched augmentation's (the buffers
    themselves, updated in place by one hyper optimizer)."""
    values = dict(pl_module.autobalance_parameters().alpha())
    aug = searched_augmentation(pl_module)
    if aug is not None:
        values.update(aug.alpha())
    return values


def shrink_counts(pl_module: Any, counts: Any) -> dict[str, Tensor]:
    """The searched augmentation's per-cell free values and the upper counts that inform them (for shrinkage)."""
    aug = searched_augmentation(pl_module)
    return {} if aug is None else aug.free_value_counts(counts)


def augmented_train(pl_module: Any, train: Sequence[Batch]) -> tuple[list[Batch], InputAugmentation | None]:
    """The hyper step's training batches with their clean inputs, and the augmentation of them (``None`` when
    nothing of it is searched: the batches as they are).

    The first batch is the training step's: its clean inputs and draws are those
    :meth:`~lightning_autobalance.AutoBalanceMixin.autobalance_augment` kept (so its recorded logits still apply);
    the others are drawn afresh from the module's hyper stream.

    Raises:
        RuntimeError: the training step did not call ``autobalance_augment`` (or on another batch).
    """
    aug = searched_augmentation(pl_module)
    if aug is None:
        return list(train), None
    record = pl_module.autobalance_recorded_augment
    first = train[0]
    if record is None or record.inputs.shape[0] != first.target.shape[0]:
        raise RuntimeError(f"AutoBalance: the augmentation is searched (search=[..., 'augment']), but "
                           f"{type(pl_module).__name__}.training_step did not call "
                           "`x = self.autobalance_augment(x, y)` on its batch before the forward pass, so the hyper "
                           "step cannot tell the inputs the model trained on. Add that line to training_step "
                           "(ImbalancedClassifier does it).")
    batches = [first._replace(inputs=record.inputs), *train[1:]]
    draws = [record.draws, *(pl_module.autobalance_hyper_draws(b.inputs) for b in train[1:])]
    return batches, InputAugmentation(aug.alpha(), aug.settings, draws, aug.tables)


def augment_figures(pl_module: Any, log_max_classes: int) -> tuple[list[str], list[Tensor]]:
    """Names and device values of the searched augmentation's logged figures: the strength of every cell up to
    ``log_max_classes`` cells per table, else its minimum, maximum and mean (``autobalance/augment/<table>/...``)."""
    aug = searched_augmentation(pl_module)
    if aug is None:
        return [], []
    names: list[str] = []
    values: list[Tensor] = []
    g, k = aug.num_groups, aug.num_classes
    width = len(str(k - 1))
    for table, value in aug.strengths().items():
        value = value.double()
        if g * k <= log_max_classes:
            names += [f"autobalance/augment/{table}/" + (f"g{gi}_" if g > 1 else "") + f"{c:0{width}d}"
                      for gi in range(g) for c in range(k)]
            values.append(value.reshape(-1))
        else:
            names += [f"autobalance/augment/{table}/{stat}" for stat in ("min", "max", "mean")]
            values.append(torch.stack([value.min(), value.max(), value.mean()]))
    return names, values
