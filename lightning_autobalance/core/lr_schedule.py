"""``WarmupDecayLR``: the paper's learning-rate schedule (linear warm-up, then cosine or step decay), sized to the run.

LightningCLI builds a scheduler from a ``class_path`` as a callable ``optimizer -> scheduler`` (its
``LRSchedulerCallable``), before anything knows how long the run is. This schedule is written in epochs (warm-up
epochs, milestones) and stepped every optimizer step, so it needs the run's length: the module that uses it calls
:meth:`WarmupDecayLR.fit_to_run` once the trainer knows it (:class:`~lightning_autobalance.ImbalancedClassifier`
does so in ``configure_optimizers``). Until then it keeps the optimizer's learning rate.

Plain PyTorch (no Lightning), like the rest of the functional core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupDecayLR"]

ScheduleKind = Literal["step", "cosine", "constant"]


class _RunFactor:
    """The factor of the base learning rate at an optimizer step; 1 until the run's length is set.

    A callable object (not a closure) so that :class:`~torch.optim.lr_scheduler.LambdaLR` saves its fields in
    ``state_dict`` as plain numbers and strings.
    """

    def __init__(self, schedule: str, warmup_epochs: float, milestones: list[int], lr_decay: float) -> None:
        self.schedule = schedule
        self.warmup_epochs = warmup_epochs
        self.milestones = milestones
        self.lr_decay = lr_decay
        self.steps_per_epoch: float | None = None
        self.epochs: int | None = None

    def __call__(self, step: int) -> float:
        steps_per_epoch, epochs = self.steps_per_epoch, self.epochs
        if steps_per_epoch is None or epochs is None:
            return 1.0
        warmup = self.warmup_epochs
        epoch = step / steps_per_epoch
        if warmup > 0 and epoch < warmup:
            return (epoch + 1.0 / steps_per_epoch) / warmup
        if self.schedule == "cosine":
            progress = min((epoch - warmup) / max(epochs - warmup, 1e-8), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "step":
            return self.lr_decay ** sum(epoch >= m for m in self.milestones)
        return 1.0


class WarmupDecayLR(LambdaLR):
    """Linear warm-up over ``warmup_epochs``, then cosine annealing to 0 at the end of the run, step decay at
    ``milestones``, or a constant rate; stepped every optimizer step (fractional epochs are fine).

    At optimizer step ``t`` of a run of ``E`` epochs of ``S`` steps each (epoch ``e = t / S``), the learning rate is
    the optimizer's times

    * ``(e + 1 / S) / warmup_epochs`` while ``e < warmup_epochs``, then
    * ``"cosine"``: ``(1 + cos(pi * min((e - warmup_epochs) / (E - warmup_epochs), 1))) / 2``;
    * ``"step"``: ``lr_decay ** (number of milestones <= e)``;
    * ``"constant"``: 1.

    ``S`` and ``E`` are given by :meth:`fit_to_run`; before that the factor is 1.

    Args:
        schedule: ``"cosine"``, ``"step"`` or ``"constant"`` after the warm-up.
        warmup_epochs: epochs of linear warm-up, >= 0 (may be fractional; 0: none).
        milestones: epochs at which ``"step"`` multiplies the learning rate by ``lr_decay`` (non-negative).
        lr_decay: the step factor, in (0, 1].

    Raises:
        ValueError: an argument out of range, naming it.

    Example:
        >>> import torch
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> schedule = WarmupDecayLR(opt, "step", warmup_epochs=1, milestones=[2])
        >>> schedule.fit_to_run(steps_per_epoch=2, epochs=3)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 4))
        ...     opt.step(); schedule.step()
        >>> lrs
        [0.05, 0.1, 0.1, 0.1, 0.01, 0.01]
    """

    def __init__(self, optimizer: Optimizer, schedule: ScheduleKind = "cosine", warmup_epochs: float = 0.0,
                 milestones: Sequence[int] = (160, 180), lr_decay: float = 0.1) -> None:
        if schedule not in ("step", "cosine", "constant"):
            raise ValueError(f"schedule must be 'step', 'cosine' or 'constant'; got {schedule!r}.")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int | float) or not warmup_epochs >= 0 \
                or not math.isfinite(warmup_epochs):
            raise ValueError(f"warmup_epochs must be a finite number >= 0 (epochs of linear warm-up); got "
                             f"{warmup_epochs!r}.")
        if isinstance(lr_decay, bool) or not isinstance(lr_decay, int | float) or not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must lie in (0, 1] (the factor at each milestone); got {lr_decay!r}.")
        marks = list(milestones)
        if any(isinstance(m, bool) or not isinstance(m, int | float) or m < 0 for m in marks):
            raise ValueError(f"milestones must be epochs >= 0; got {list(milestones)!r}.")
        self.schedule = schedule
        super().__init__(optimizer, _RunFactor(schedule, warmup_epochs, sorted(marks), lr_decay))

    @property
    def run_length(self) -> tuple[float, int] | None:
        """``(steps per epoch, epochs)`` once :meth:`fit_to_run` has been called, else None."""
        factor = self.lr_lambdas[0]
        assert isinstance(factor, _RunFactor)
        if factor.steps_per_epoch is None or factor.epochs is None:
            return None
        return factor.steps_per_epoch, factor.epochs

    def fit_to_run(self, steps_per_epoch: float, epochs: int) -> None:
        """Sizes the schedule to a run of ``epochs`` epochs (a positive integer) of ``steps_per_epoch`` optimizer steps
        (a positive number, may be fractional) and sets the learning rate of the current step accordingly; raises
        ``ValueError`` for other values."""
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int | float) \
                or not 0 < steps_per_epoch < math.inf:
            raise ValueError(f"steps_per_epoch must be a positive finite number; got {steps_per_epoch!r}.")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be a positive integer; got {epochs!r}.")
        for factor in self.lr_lambdas:
            assert isinstance(factor, _RunFactor)
            factor.steps_per_epoch, factor.epochs = steps_per_epoch, epochs
        lrs = [base * factor(self.last_epoch) for factor, base in zip(self.lr_lambdas, self.base_lrs, strict=True)]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr: list[Any] = lrs
