"""A per-class curriculum of augmentation strength after CUDA (Ahn et al., ICLR 2023), as plain functions.

Every class ``k`` has a level ``L_k`` in ``0 .. max_level`` (0 at the start). At the end of an epoch a class whose
training accuracy on its augmented samples reached ``threshold`` goes up one level, any other down one (never below
0 nor above ``max_level``); a class not seen in the epoch keeps its level (:func:`update_levels`). The strength of
every op of :class:`~lightning_autobalance.core.augment.AugmentSettings` for class ``k`` is ``L_k / max_level``
times the op's limit, a gate's probability (``p_<op>``) likewise ``L_k / max_level``, and the flip's probability
``L_k / max_level`` times one half (:data:`FLIP_TOP`: a flip with probability 1/2 is the most varied; beyond it
the images are mostly mirrored, and at 1 always, which for digits or text changes the class). :func:`level_tables`
gives them in the unconstrained values of :func:`~lightning_autobalance.core.augment.strengths`, the fraction kept
``margin`` away from 0 and 1 so that the logit is finite; :func:`free_values_for` writes such tables
as the free values of an :class:`~lightning_autobalance.core.augment_parametrization.AugmentParameters`.

Our own reading of the method, not the authors' code; where it differs: the paper measures a class's accuracy on
extra augmented copies of its samples at each level up to ``L_k``; here it is the accuracy of the training steps'
own predictions on their augmented batches (no extra forward pass), gathered over the epoch. With groups the level
is per class, the same in every group's row.

Plain torch, nothing of Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_autobalance.core.augment import AugmentSettings
from lightning_autobalance.core.augment_parametrization import PREFIX, AugmentParameters

__all__ = ["CURRICULUM_KINDS", "FLIP_TOP", "check_settings", "free_values_for", "level_fractions", "level_tables",
           "update_levels"]

#: the flip's probability at the top level: a flip with probability 1/2 varies the images most
FLIP_TOP = 0.5
#: the augmentation parametrisations whose free values can hold any per-class table (``"groups"`` only with bins of
#: one class each; ``"dataset"`` never)
CURRICULUM_KINDS = ("class", "hierarchical", "groups")


def update_levels(levels: Tensor, correct: Tensor, total: Tensor, threshold: float, max_level: int) -> Tensor:
    """The levels after one epoch: ``+1`` where ``correct / total >= threshold``, ``-1`` where below, unchanged
    where ``total == 0``; kept within ``0 .. max_level``.

    Args:
        levels: ``(K,)`` integer levels.
        correct, total: ``(K,)`` counts of the epoch's correctly classified and seen samples per class.
        threshold: the accuracy that raises a level (the paper's ``gamma``).
        max_level: the highest level.

    Example:
        >>> update_levels(torch.tensor([0, 3, 10, 2]), torch.tensor([7, 2, 9, 0]), torch.tensor([10, 10, 10, 0]),
        ...               threshold=0.6, max_level=10).tolist()
        [1, 2, 10, 2]
    """
    levels, correct, total = (torch.as_tensor(t).long().cpu() for t in (levels, correct, total))
    if not levels.shape == correct.shape == total.shape or levels.ndim != 1:
        raise ValueError(f"levels, correct and total must be (K,) tensors of one shape; got {tuple(levels.shape)}, "
                         f"{tuple(correct.shape)}, {tuple(total.shape)}.")
    seen = total > 0
    # correct / total >= threshold, compared in float64 (counts are exact integers there)
    up = correct.double() >= threshold * total.double()
    step = torch.where(seen, torch.where(up, 1, -1), 0)
    return (levels + step).clamp(0, max_level)


def level_fractions(levels: Tensor, max_level: int, margin: float) -> Tensor:
    """``L_k / max_level`` as float64, clamped to ``[margin, 1 - margin]``.

    Example:
        >>> level_fractions(torch.tensor([0, 5, 10]), 10, 1e-3).tolist()
        [0.001, 0.5, 0.999]
    """
    if not 0.0 < margin < 0.5:
        raise ValueError(f"margin must lie in (0, 0.5); got {margin}.")
    return (torch.as_tensor(levels).double().cpu() / max_level).clamp(margin, 1.0 - margin)


def level_tables(levels: Tensor, settings: AugmentSettings, max_level: int, num_groups: int = 1,
                 margin: float = 1e-3) -> dict[str, Tensor]:
    """The ``(G, K)`` unconstrained tables (float64) whose strengths are ``fraction * limit`` for every table of
    ``settings`` (``fraction * FLIP_TOP`` for the flip's probability), ``fraction`` from :func:`level_fractions`,
    the same in every group's row.

    Example:
        >>> from lightning_autobalance.core.augment import strengths
        >>> s = AugmentSettings(ops=("flip", "shift"))
        >>> t = level_tables(torch.tensor([0, 5, 10]), s, max_level=10)
        >>> [round(v, 4) for v in strengths(t, s)["shift"][0].tolist()]
        [0.0001, 0.0625, 0.1249]
    """
    fraction = level_fractions(levels, max_level, margin)
    return {name: torch.logit(fraction * (FLIP_TOP if name == "flip" else 1.0)).expand(num_groups, -1).clone()
            for name in settings.names}


def free_values_for(params: AugmentParameters, tables: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The free values (by name, as :meth:`AugmentParameters.alpha` has them) that make ``params.tables()`` equal
    ``tables`` (``(G, K)`` per table name): the deviation ``d`` from the start tables goes in the per-cell values;
    for ``"hierarchical"`` the shared level is ``mean(d)`` and the slope 0 (the residuals are centred). Raises a
    ``ValueError`` where the parametrisation cannot hold the tables (``"dataset"``; ``"groups"`` with a bin of
    several classes and different values in it).

    Example:
        >>> p = AugmentParameters([50, 5], {"ops": "shift"}, kind="hierarchical")
        >>> alpha = free_values_for(p, {"shift": torch.tensor([[0.0, 1.0]])})
        >>> for name, value in alpha.items():
        ...     _ = p.alpha()[name].copy_(value)
        >>> p.tables()["shift"].tolist()
        [[0.0, 1.0]]
    """
    if params.kind not in CURRICULUM_KINDS:
        raise ValueError(f"The augmentation's parametrization {params.kind!r} cannot hold a table per class; use one "
                         f"of {list(CURRICULUM_KINDS)} (configure_augment(parametrization='class')).")
    out: dict[str, Tensor] = {}
    for name in params.settings.names:
        start = getattr(params, f"start_{name}")
        target = torch.as_tensor(tables[name]).to(device=start.device, dtype=torch.float64)
        if target.shape != start.shape:
            raise ValueError(f"table {name!r} has shape {tuple(target.shape)}; expected {tuple(start.shape)}.")
        d = target - start.double()
        if params.kind == "groups":
            expand = params.expand.to(d)  # (K, bins)
            free = d @ expand / expand.sum(dim=0)
            if not torch.allclose(free @ expand.T, d, atol=1e-6):
                raise ValueError(f"The 'groups' augmentation (group_size={params.group_size}) shares one value per "
                                 "bin of classes, but the curriculum's levels differ within a bin; use "
                                 "parametrization='class' or group_size=1.")
            out[PREFIX + name] = free
            continue
        out[PREFIX + name] = d
        if params.kind == "hierarchical":
            out[f"{PREFIX}{name}_level"] = d.mean()
            out[f"{PREFIX}{name}_slope"] = torch.zeros((), dtype=d.dtype, device=d.device)
    return out


def check_settings(threshold: float, max_level: int, margin: float) -> None:
    """``ValueError`` naming the bad setting of a curriculum."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be a number in (0, 1] (an accuracy); got {threshold!r}.")
    if isinstance(max_level, bool) or not isinstance(max_level, int) or max_level < 1:
        raise ValueError(f"max_level must be a positive integer; got {max_level!r}.")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) \
            or not 0.0 < margin < 0.5:
        raise ValueError(f"margin must be a number in (0, 0.5); got {margin!r}.")
