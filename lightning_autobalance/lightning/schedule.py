"""``Schedule``: when the search takes its hyper steps, as one value, answering :meth:`Schedule.should_step` for every
optimizer step in the manner of Lightning's ``WeightAveraging.should_update``. Plain Python; nothing of Lightning (the
callback hands in the run's length and epoch count).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import Any

from lightning_autobalance.core.coerce import coerce_value, raise_first

__all__ = ["MAX_AUTO_INTERVAL", "ONE_PHASE_HYPER_SHARE", "Schedule", "auto_interval"]

#: The automatic schedule never takes a hyper step more often than this many optimizer steps apart once the run is
#: long enough: a default hyper step costs about 1.4-1.8 plain steps, so 20 keeps a search epoch within 1.10 plain
#: epochs (benchmarks/speed.py).
MAX_AUTO_INTERVAL = 20
#: In a one-phase run (a :class:`~lightning_autobalance.data.fold_in.FoldInSampler` in the training data) the
#: automatic schedule makes at most this share of the run's optimizer steps hyper steps, so that the whole run costs
#: at most about 1.1 plain trainings (benchmarks/speed.py --one-phase).
ONE_PHASE_HYPER_SHARE = 0.05


def auto_interval(window_steps: int, target_hyper_steps: int, upper_batches_per_pass: int = 1) -> int:
    """The interval (in optimizer steps) between hyper steps that the schedule chooses when ``every_n_steps`` is
    not given.

    The rule: aim for ``max(target_hyper_steps, 2 * upper_batches_per_pass)`` hyper steps in the window of
    optimizer steps where the search is active (after the warm-up, before any stop), i.e. an interval of
    ``window_steps // aim``, clipped to ``[1, MAX_AUTO_INTERVAL]``. A short run or a small dataset therefore steps
    often (down to every optimizer step) and still makes enough hyper steps to move; a long one steps every 20
    optimizer steps, which bounds the overhead; the upper split is drawn at least twice when the run allows.

    Example:
        >>> auto_interval(128, 200)      # a 40-epoch search on 280 digits: every step
        1
        >>> auto_interval(750, 200)      # 12 CIFAR-10-LT epochs: every 3 steps
        3
        >>> auto_interval(18_700, 200)   # 300 CIFAR-10-LT epochs: every 20 steps
        20
    """
    aim = max(int(target_hyper_steps), 2 * int(upper_batches_per_pass), 1)
    return int(min(max(window_steps // aim, 1), MAX_AUTO_INTERVAL))


@dataclass
class Schedule:
    """When hyper steps are taken: every ``every_n_steps`` optimizer steps inside a window of the run.

    Args:
        every_n_steps: take a hyper step every this many optimizer steps (``k >= 1``). ``None`` (default): chosen
            from the run, see :func:`auto_interval` (and at most 5% of a one-phase run's steps).
        target_hyper_steps: the number of hyper steps the automatic interval aims for (``>= 1``).
        start_epoch: first epoch with hyper steps. ``None``: see ``warmup_fraction``.
        start_step: first optimizer step with hyper steps (overrides ``start_epoch``).
        stop_epoch: no hyper steps from this epoch on (``None``: until the end).
        stop_step: no hyper steps from this optimizer step on.
        warmup_fraction: when neither ``start_epoch`` nor ``start_step`` is given, the fraction of the run's
            optimizer steps to train before the first hyper step, in ``[0, 1)``.

    The settings stay a value: :meth:`plan` returns a planned copy for one fit (the same class, so an overridden
    :meth:`should_step` applies), whose :attr:`interval`, :attr:`first`, :attr:`end` and :attr:`planned` describe
    that fit.

    Example:
        >>> schedule = Schedule(warmup_fraction=0.25)
        >>> fit = schedule.plan(total_steps=400, max_epochs=4)
        >>> fit.first, fit.end, fit.interval, fit.planned
        (100, 400, 1, 300)
        >>> fit.should_step(99, 0), fit.should_step(100, 1)
        (False, True)
        >>> Schedule.coerce({"every_n_steps": 0})
        Traceback (most recent call last):
        ...
        ValueError: every_n_steps must be at least 1 (or None for the automatic schedule); got 0.
    """

    every_n_steps: int | None = None
    target_hyper_steps: int = 200
    start_epoch: int | None = None
    start_step: int | None = None
    stop_epoch: int | None = None
    stop_step: int | None = None
    warmup_fraction: float = 0.2

    def __post_init__(self) -> None:
        checks = [
            (self.every_n_steps is None or self.every_n_steps >= 1,
             f"every_n_steps must be at least 1 (or None for the automatic schedule); got {self.every_n_steps}."),
            (self.target_hyper_steps >= 1, f"target_hyper_steps must be at least 1; got {self.target_hyper_steps}."),
            (0.0 <= self.warmup_fraction < 1.0, f"warmup_fraction must lie in [0, 1); got {self.warmup_fraction}."),
        ]
        for start, stop, name in ((self.start_epoch, self.stop_epoch, "epoch"), (self.start_step, self.stop_step,
                                                                                 "step")):
            checks.append((start is None or start >= 0, f"start_{name} must be >= 0; got {start}."))
            checks.append((stop is None or start is None or stop > start,
                           f"stop_{name} ({stop}) must come after start_{name} ({start})."))
        raise_first(checks)
        # The plan of a fit (set on the copy plan() returns; plain attributes, not settings).
        #: the optimizer step where the automatic warm-up ends
        self.auto_start_step = 0
        #: the epoch where a one-phase run folds the upper split into training (the search stops there)
        self.fold_in_epoch: int | None = None
        #: the interval between hyper steps in this fit, in optimizer steps
        self.interval = self.every_n_steps or 1
        #: the first optimizer step of the window and the step it ends before (``None``: the run's length is unknown)
        self.first, self.end = 0, None
        #: hyper steps planned in this fit (``None`` when the run's length is unknown)
        self.planned: int | None = None

    @classmethod
    def coerce(cls, value: Any) -> Schedule:
        """A :class:`Schedule` from itself, ``None`` (the default), or a mapping of its settings (a YAML group, a
        Hydra ``DictConfig``), validated alike."""
        return coerce_value(cls, value, "schedule", (f.name for f in fields(cls)))

    # ------------------------------------------------------------------------------------------------------------
    def bounds(self) -> tuple[tuple[str, int], list[tuple[str, int]]]:
        """The window of the search, defined once: its start and its stops, each ``("step", s)`` or ``("epoch", e)``."""
        if self.start_step is not None:
            start = ("step", self.start_step)
        elif self.start_epoch is not None:
            start = ("epoch", self.start_epoch)
        else:
            start = ("step", self.auto_start_step)
        stops = [("step", self.stop_step)] if self.stop_step is not None else []
        stops += [("epoch", e) for e in (self.stop_epoch, self.fold_in_epoch) if e is not None]
        return start, stops

    def active(self, step: int, epoch: int) -> bool:
        """Whether optimizer step ``step`` of epoch ``epoch`` lies in the window."""
        (kind, at), stops = self.bounds()
        started = (step if kind == "step" else epoch) >= at
        return started and not any((step if k == "step" else epoch) >= s for k, s in stops)

    def should_step(self, step: int, epoch: int) -> bool:
        """Whether a hyper step follows optimizer step ``step`` (``trainer.global_step`` before it is taken) of epoch
        ``epoch``. Override for a schedule of your own (the plan's figures then describe the default one)."""
        return (step + 1) % self.interval == 0 and self.active(step, epoch)

    # ------------------------------------------------------------------------------------------------------------
    def plan(self, total_steps: float, max_epochs: int | None, upper_batches_per_pass: int = 1,
             fold_in_epoch: int | None = None) -> Schedule:
        """A copy of this schedule planned for one fit: the warm-up, the window in optimizer steps, the interval and
        the number of hyper steps (this schedule is left as it is).

        Args:
            total_steps: the run's optimizer steps (``trainer.estimated_stepping_batches``; ``inf`` if unknown).
            max_epochs: the run's epochs (``None`` or ``-1`` if unbounded).
            upper_batches_per_pass: upper batches in one pass over the upper data (the automatic interval draws it
                at least twice when the run allows).
            fold_in_epoch: a one-phase run's fold-in epoch: the search stops there.

        Raises:
            ValueError: ``stop_epoch`` or ``stop_step`` lies after a one-phase run's fold-in.
        """
        fit = copy.copy(self)
        fit._plan(total_steps, max_epochs, upper_batches_per_pass, fold_in_epoch)
        return fit

    def _plan(self, total_steps: float, max_epochs: int | None, upper_batches_per_pass: int,
              fold_in_epoch: int | None) -> None:
        finite = math.isfinite(total_steps)
        per_epoch = total_steps / max_epochs if max_epochs is not None and max_epochs > 0 and finite else None
        self.auto_start_step = int(self.warmup_fraction * total_steps) if finite else 0
        self.fold_in_epoch = fold_in_epoch
        self._check_fold_in(per_epoch)
        (kind, at), stops = self.bounds()
        first = at if kind == "step" else (int(at * per_epoch) if per_epoch is not None else None)
        ends = [total_steps] if finite else []
        ends += [s if k == "step" else s * per_epoch for k, s in stops if k == "step" or per_epoch is not None]
        end = int(min(ends)) if ends else None
        self.first, self.end = first or 0, end
        if first is None or end is None:
            self.interval, self.planned = self.every_n_steps or MAX_AUTO_INTERVAL, None
            return
        window = max(end - first, 0)
        self.interval = self.every_n_steps or auto_interval(window, self.target_hyper_steps, upper_batches_per_pass)
        if self.every_n_steps is None and fold_in_epoch is not None:
            cap = max(int(ONE_PHASE_HYPER_SHARE * total_steps), 1)  # one-phase: bound the cost of the whole run
            self.interval = max(self.interval, -(-window // cap))
        # Steps s in [first, end) with (s + 1) % interval == 0.
        self.planned = max((end // self.interval) - (first // self.interval), 0)

    def _check_fold_in(self, per_epoch: float | None) -> None:
        fold = self.fold_in_epoch
        if fold is None:
            return
        late = []
        if self.stop_epoch is not None and self.stop_epoch > fold:
            late.append(f"stop_epoch={self.stop_epoch}")
        if self.stop_step is not None and per_epoch is not None and self.stop_step > fold * per_epoch:
            late.append(f"stop_step={self.stop_step}")
        if late:
            raise ValueError(f"AutoBalanceCallback: {' and '.join(late)} would go on searching after epoch {fold}, "
                             "where the training data's FoldInSampler folds the upper split into training (the loss "
                             "would then be tuned on data the model trains on). Leave stop_epoch/stop_step unset: "
                             "the search stops at the fold-in by itself.")

    def why_no_step(self, final_step: int) -> str:
        """Why a fit that ended at optimizer step ``final_step`` had no step due, for a warning."""
        if final_step <= self.first:
            return (f"the fit ended at optimizer step {final_step}, before the search starts (step {self.first}: see "
                    "start_epoch / start_step / warmup_fraction)")
        return (f"no optimizer step in [{self.first}, {final_step}) was due (every {self.interval} steps; see "
                "every_n_steps, stop_epoch / stop_step)")

    def summary(self) -> str:
        """One line on the plan, for the start of a fit."""
        how = "every_n_steps" if self.every_n_steps else "auto"
        if self.planned is None:
            return (f"AutoBalance: a hyper step every {self.interval} optimizer steps ({how}) from step {self.first}; "
                    "the run's length is unknown, so the number of hyper steps is too.")
        return (f"AutoBalance: {self.planned} hyper steps planned, every {self.interval} optimizer steps ({how}) in "
                f"steps [{self.first}, {self.end}) of this fit.")
