"""``HyperOptimizer``: how the loss parameters are updated from their hypergradient, as one value, and the
:class:`HyperUpdate` of one fit that takes the steps on the device. Plain PyTorch; nothing of Lightning."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_autobalance.core.coerce import coerce_value, raise_first

__all__ = ["HyperOptimizer", "HyperUpdate", "OptimizerCallable", "SchedulerCallable"]

OptimizerCallable = Callable[[Iterable], Optimizer]
SchedulerCallable = Callable[[Optimizer], Any]
LrSchedule = Literal["cosine", "constant"]


def _cosine_factor(step: int, total: int) -> float:
    """Cosine decay of the hyper learning rate from 1 to 0 over ``total`` hyper steps (then 0)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


@dataclass(frozen=True)
class HyperOptimizer:
    """The hyper-optimizer's settings, validated when it is built; :meth:`build` makes the update of one fit.

    Args:
        optimizer: a callable ``params -> torch.optim.Optimizer`` (from a LightningCLI YAML: ``class_path:
            torch.optim.SGD`` with ``init_args: {lr: 0.01, momentum: 0.9}``); it carries its own learning rate.
            ``None``: Adam with ``lr``. Adam rather than SGD with momentum: the size of the hypergradient shrinks by
            more than an order of magnitude as the training set is fitted, so no single SGD learning rate suits a
            whole run (``docs/tuning.md``).
        lr: learning rate of the default Adam (``None``: 0.02); giving it with ``optimizer`` is an error.
        scheduler: a callable ``optimizer -> scheduler``, stepped after every hyper step (replaces ``lr_schedule``).
        lr_schedule: ``"cosine"``: the learning rate decays from its value to 0 along a cosine over the planned
            hyper steps (constant when the run's length is unknown); ``"constant"``: no decay.
        shrinkage: after every hyper step each per-class free value ``a`` informed by ``n`` upper samples is
            pulled towards its start: ``a <- a * max(0, 1 - lr * shrinkage / n)`` (decoupled, like AdamW's weight
            decay; ``lr`` the current learning rate). Shared scalars are not shrunk. ``0`` turns it off.
        max_norm: clip the hypergradient to this norm (``None``: no clipping).

    Example:
        >>> HyperOptimizer.coerce({"lr": 0.05, "shrinkage": 0.0}).lr
        0.05
        >>> HyperOptimizer(lr=0.1, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
        Traceback (most recent call last):
        ...
        ValueError: give hyper_lr (0.1) or hyper_optimizer, not both: the optimizer carries its own learning rate.
    """

    optimizer: OptimizerCallable | None = None
    lr: float | None = None
    scheduler: SchedulerCallable | None = None
    lr_schedule: LrSchedule = "cosine"
    shrinkage: float = 16.0
    max_norm: float | None = None

    def __post_init__(self) -> None:
        raise_first([
            (self.optimizer is None or callable(self.optimizer),
             f"hyper_optimizer must be a callable params -> Optimizer; got {type(self.optimizer).__name__}."),
            (self.lr is None or self.lr > 0, f"hyper_lr must be positive; got {self.lr}."),
            (self.lr is None or self.optimizer is None,
             f"give hyper_lr ({self.lr}) or hyper_optimizer, not both: the optimizer carries its own learning rate."),
            (self.scheduler is None or callable(self.scheduler),
             f"hyper_scheduler must be a callable optimizer -> scheduler; got {type(self.scheduler).__name__}."),
            (self.lr_schedule in ("cosine", "constant"),
             f"hyper_lr_schedule must be 'cosine' or 'constant'; got {self.lr_schedule!r}."),
            (self.shrinkage >= 0, f"shrinkage must be >= 0; got {self.shrinkage}."),
            (self.max_norm is None or self.max_norm > 0, f"max_norm must be positive or None; got {self.max_norm}."),
        ])

    @classmethod
    def coerce(cls, value: Any) -> HyperOptimizer:
        """A :class:`HyperOptimizer` from itself, ``None`` (the default), an optimizer callable, or a mapping of its
        settings (a YAML group, a Hydra ``DictConfig``), validated alike."""
        return coerce_value(cls, value, "hyper_optimizer", (f.name for f in fields(cls)),
                            ("a callable params -> Optimizer", lambda v: cls(optimizer=v) if callable(v) else None))

    def optimizer_fn(self) -> OptimizerCallable:
        """The callable that builds the optimizer (a partial, not a closure: ``ddp_spawn`` pickles callbacks)."""
        return self.optimizer or functools.partial(torch.optim.Adam, lr=0.02 if self.lr is None else self.lr)

    def build(self, alpha: Mapping[str, Tensor], planned: int | None,
              shrink_counts: Mapping[str, Tensor] | None = None) -> HyperUpdate | None:
        """The update of one fit for the free loss parameters ``alpha`` (``None`` when there are none).

        Args:
            alpha: the free loss parameters by name (updated in place).
            planned: the hyper steps planned (the cosine's length; ``None`` or 0: no decay).
            shrink_counts: per free value, the upper count that informs it (see ``shrinkage``).
        """
        params = list(alpha.values())
        if not params:
            return None
        optimizer = self.optimizer_fn()(params)
        scheduler = self.scheduler(optimizer) if self.scheduler is not None else None
        if self.scheduler is None and self.lr_schedule == "cosine" and planned:
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_cosine_factor, total=planned))
        counts = {name: c.to(alpha[name]) for name, c in (shrink_counts or {}).items()}  # on the device, once
        return HyperUpdate(self, optimizer, scheduler, counts)


class HyperUpdate:
    """One fit's hyper-optimizer (:meth:`HyperOptimizer.build`): takes a step on the loss parameters from a
    hypergradient, on the device, reading nothing back to the host; a non-finite hypergradient leaves them as they
    were. It holds its settings, the optimizer over the free loss parameters, the scheduler stepped after every step
    (or ``None``), and per free value the upper count that informs it."""

    def __init__(self, settings: HyperOptimizer, optimizer: Optimizer, scheduler: Any,
                 shrink_counts: dict[str, Tensor]) -> None:
        self.settings = settings
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.shrink_counts = shrink_counts

    def step(self, alpha: Mapping[str, Tensor], grads: Mapping[str, Tensor], finite: Tensor) -> Tensor:
        """One step on ``alpha`` (in place), skipped (``alpha`` restored) where ``finite`` is false; all on the
        device. Returns the hypergradient's norm before clipping (float64, on the device)."""
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        factor = None
        if self.settings.max_norm is not None:
            factor = torch.clamp(self.settings.max_norm / norm, max=1.0)
        before = {name: tensor.detach().clone() for name, tensor in alpha.items()}
        for name, tensor in alpha.items():
            g = grads[name] if factor is None else grads[name] * factor.to(grads[name].dtype)
            tensor.grad = torch.where(finite, g, torch.zeros_like(g)).to(tensor)
        lr = float(self.optimizer.param_groups[0]["lr"])  # a host number, not a tensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.shrink(alpha, lr)
        with torch.no_grad():
            for name, tensor in alpha.items():
                tensor.copy_(torch.where(finite, tensor, before[name]))
        if self.scheduler is not None:
            self.scheduler.step()
        return norm  # type: ignore[return-value]

    @torch.no_grad()
    def shrink(self, alpha: Mapping[str, Tensor], lr: float) -> None:
        """Pulls each per-class free value towards its start by ``lr * shrinkage / n`` (``n``: its upper count)."""
        shrinkage = self.settings.shrinkage
        if shrinkage <= 0:
            return
        for name, counts in self.shrink_counts.items():
            value = alpha[name]
            factor = (1.0 - lr * shrinkage / counts.to(value).clamp(min=1.0)).clamp(min=0.0)  # .to: a no-op
            value.mul_(factor)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scheduler") is not None and self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
