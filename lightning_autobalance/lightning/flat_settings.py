"""The callback's settings by their flat names (``every_n_steps=``, ``hyper_lr=``, ``objective_kwargs=``,
``upper_source=``, ...): the form of earlier versions and of shipped YAML ``init_args``, grouped here into the values
they belong to (:class:`~lightning_autobalance.Schedule`, :class:`~lightning_autobalance.HyperOptimizer`, the
objective's settings, :class:`~lightning_autobalance.UpperData`).

``AutoBalanceCallback(**flat)`` hands its extra keyword arguments to :func:`flat_settings`, whose signature
jsonargparse follows, so LightningCLI YAML and ``--help`` keep every flat name. Plain Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning_autobalance.core.objectives import UpperObjective
from lightning_autobalance.lightning.hyper_optimizer import HyperOptimizer, LrSchedule, SchedulerCallable
from lightning_autobalance.lightning.schedule import Schedule
from lightning_autobalance.lightning.upper_data import UpperData, UpperSource

__all__ = ["callback_values", "flat_settings", "settings_value"]


def flat_settings(every_n_steps: int | None = None, target_hyper_steps: int | None = None,
                   start_epoch: int | None = None, start_step: int | None = None, stop_epoch: int | None = None,
                   stop_step: int | None = None, warmup_fraction: float | None = None, hyper_lr: float | None = None,
                   hyper_scheduler: SchedulerCallable | None = None, hyper_lr_schedule: LrSchedule | None = None,
                   shrinkage: float | None = None, max_norm: float | None = None,
                   objective_kwargs: dict[str, Any] | None = None, upper_source: UpperSource | None = None,
                   upper_class_counts: list[int] | None = None,
                   balanced_upper: bool | None = None, holdout: float | None = None) -> dict[str, dict[str, Any]]:
    """The settings of the callback's values by their flat names (the form of earlier versions and of YAML
    ``init_args``), grouped by the value they belong to; ``None`` is "not given".

    Args:
        every_n_steps: :attr:`Schedule.every_n_steps <lightning_autobalance.Schedule>`.
        target_hyper_steps: ``Schedule.target_hyper_steps``.
        start_epoch: ``Schedule.start_epoch``.
        start_step: ``Schedule.start_step``.
        stop_epoch: ``Schedule.stop_epoch``.
        stop_step: ``Schedule.stop_step``.
        warmup_fraction: ``Schedule.warmup_fraction``.
        hyper_lr: ``HyperOptimizer.lr``.
        hyper_scheduler: ``HyperOptimizer.scheduler``.
        hyper_lr_schedule: ``HyperOptimizer.lr_schedule``.
        shrinkage: ``HyperOptimizer.shrinkage``.
        max_norm: ``HyperOptimizer.max_norm``.
        objective_kwargs: the settings of a named ``objective``.
        upper_source: ``UpperData.source``.
        upper_class_counts: ``UpperData.class_counts``.
        balanced_upper: ``UpperData.balanced``.
        holdout: ``UpperData.holdout``.
    """
    given = {k: v for k, v in locals().items() if v is not None}
    groups: dict[str, dict[str, Any]] = {"schedule": {}, "hyper": {}, "objective": {}, "upper": {}}
    renames = {"hyper_lr": ("hyper", "lr"), "hyper_scheduler": ("hyper", "scheduler"),
               "hyper_lr_schedule": ("hyper", "lr_schedule"), "shrinkage": ("hyper", "shrinkage"),
               "max_norm": ("hyper", "max_norm"), "upper_source": ("upper", "source"),
               "upper_class_counts": ("upper", "class_counts"), "balanced_upper": ("upper", "balanced"),
               "holdout": ("upper", "holdout")}
    for name, value in given.items():
        if name == "objective_kwargs":
            if not isinstance(value, Mapping):
                raise ValueError(f"objective_kwargs must be a mapping of settings; got {type(value).__name__}.")
            groups["objective"].update(value)
        else:
            group, key = renames.get(name, ("schedule", name))
            groups[group][key] = value
    return groups


def settings_value(cls: Any, value: Any, flat: dict[str, Any], name: str) -> Any:
    """``cls.coerce(value)``, or ``cls(**flat)`` for settings given by their flat names (not both)."""
    if not flat:
        return cls.coerce(value)
    if value is not None:
        raise ValueError(f"give {name}=... or its settings by name ({', '.join(sorted(flat))}), not both.")
    return cls(**flat)


def callback_values(groups: dict[str, dict[str, Any]], schedule: Any, objective: Any, upper: Any,
                    hyper_optimizer: Any, upper_dataloader: Any) -> tuple[Schedule, UpperObjective, UpperData,
                                                                          HyperOptimizer]:
    """The callback's values from its arguments and the settings :func:`flat_settings` grouped.

    Raises:
        ValueError: a value given both whole and by its flat settings, or a bad setting.
    """
    schedule = settings_value(Schedule, schedule, groups["schedule"], "schedule")
    if groups["objective"] and isinstance(objective, (UpperObjective, Mapping)):
        raise ValueError("give objective_kwargs only with an objective given by name or class.")
    objective = (UpperObjective(objective, **groups["objective"]) if groups["objective"]
                 else UpperObjective.coerce(objective))
    if upper_dataloader is not None:
        groups["upper"]["dataloader"] = upper_dataloader
    upper = settings_value(UpperData, upper, groups["upper"], "upper")
    if isinstance(hyper_optimizer, (HyperOptimizer, Mapping)) or not groups["hyper"]:
        hyper_optimizer = settings_value(HyperOptimizer, hyper_optimizer, groups["hyper"], "hyper_optimizer")
    else:  # an optimizer callable (or none) with its settings by their flat names
        hyper_optimizer = HyperOptimizer(optimizer=hyper_optimizer, **groups["hyper"])
    return schedule, objective, upper, hyper_optimizer
