"""``StepLog``: the figures of the hyper steps, kept on the device and read back in one transfer.

A hyper step reads nothing back to the host: its figures (whether the hypergradient was finite, the objective, the
hypergradient's norm, the loss parameters) are recorded as device tensors and read together, every
:data:`READ_EVERY` hyper steps, at the end of every epoch and of the fit, or when a count is asked for. Only then
do loggers receive them (with their own step numbers) and are skipped steps counted.

Plain PyTorch; loggers are any objects with ``log_metrics(metrics, step)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["READ_EVERY", "StepLog", "parameter_figures"]

#: Hyper steps whose figures wait on the device before they are read back in one transfer.
READ_EVERY = 64

#: The largest relative residual of a method's own solve (the ``"head"`` method's Newton solve) taken as converged.
RESIDUAL_LIMIT = 1e-3


def parameter_figures(params: Any, log_max_classes: int) -> tuple[list[str], list[Tensor]]:
    """Names and device values of the loss parameters' logged figures: every entry of the searched tables up to
    ``log_max_classes`` (classes x groups), else their minimum, maximum and mean; and the shared scalars."""
    names: list[str] = []
    values: list[Tensor] = []
    with torch.no_grad():
        tables = params.tables()
    k, g = params.num_classes, params.num_groups
    width = len(str(k - 1))
    for name, table in zip(("delta", "offset", "weight"), tables):
        if name not in params.search:
            continue
        table = table.detach().double()
        if k * g <= log_max_classes:
            for gi in range(g):
                prefix = f"autobalance/{name}/" + (f"g{gi}_" if g > 1 else "")
                names += [f"{prefix}{c:0{width}d}" for c in range(k)]
                values.append(table[gi].flatten())
        else:
            names += [f"autobalance/{name}/{stat}" for stat in ("min", "max", "mean")]
            values.append(torch.stack([table.min(), table.max(), table.mean()]))
    for name, value in params.alpha().items():
        if value.ndim == 0:  # shared scalars (tau, gamma, omega)
            names.append(f"autobalance/{name}")
            values.append(value.detach().double().reshape(1))
    return names, values


class StepLog:
    """Counts of the hyper steps and their figures, read from the device in one transfer.

    Example:
        >>> log = StepLog()
        >>> log.record(3, torch.tensor(True), torch.tensor(0.5), torch.tensor(1.0))
        >>> log.read([])
        []
        >>> log.attempted, log.skipped, log.last_objective
        (1, 0, 0.5)
    """

    def __init__(self) -> None:
        self.attempted = 0  # hyper steps taken, finite or not (a host count)
        self.skipped = 0  # of those, skipped (known once their records are read)
        self.fit_attempted = 0
        self.fit_skipped = 0
        self.last_objective: float | None = None
        self.objectives: list[float] = []  # the objectives read since the last call of take_objectives()
        self._records: list[tuple[int, list[str], Tensor, Tensor | None]] = []
        #: (step, residual) of the hyper steps read whose solve stopped short of convergence (``RESIDUAL_LIMIT``)
        self.unconverged: list[tuple[int, float]] = []

    def start_fit(self) -> None:
        self.fit_attempted = self.fit_skipped = 0

    def restore(self, hyper_steps: int, skipped_steps: int) -> None:
        """Counts from a checkpoint (records not yet read are dropped)."""
        self._records = []
        self.skipped = int(skipped_steps)
        self.attempted = int(hyper_steps) + self.skipped

    @property
    def full(self) -> bool:
        return len(self._records) >= READ_EVERY

    def record(self, step: int, finite: Tensor, objective: Tensor, norm: Tensor, names: Iterable[str] = (),
               values: Iterable[Tensor] = (), sizes: Tensor | None = None) -> None:
        """Keeps one hyper step's figures on the device. ``sizes``: the (train, upper) batch sizes of every
        process, checked when read."""
        self.attempted += 1
        self.fit_attempted += 1
        all_names = ["finite", "autobalance/objective", "autobalance/hypergrad_norm", *names]
        parts = [finite.double().reshape(1), objective.detach().double().reshape(1), norm.reshape(1), *values]
        device = parts[0].device
        self._records.append((step, all_names, torch.cat([v.to(device) for v in parts]), sizes))

    def read(self, loggers: Iterable[Any]) -> list[int]:
        """Reads the records in one transfer, hands their figures to the loggers, and returns the steps skipped
        for a non-finite hypergradient.

        Raises:
            RuntimeError: the processes had different batch sizes at a hyper step.
        """
        if not self._records:
            return []
        records, self._records = self._records, []
        sizes = [r[3] for r in records if r[3] is not None]
        if sizes:
            gathered = torch.stack([s.reshape(-1, 2) for s in sizes]).cpu()
            bad = [i for i in range(gathered.shape[0]) if not bool((gathered[i] == gathered[i][0]).all())]
            if bad:
                raise RuntimeError(f"AutoBalance under DDP needs the same batch sizes on every process (for the "
                                   f"averaged hypergradient to be that of the union of their batches); got (train, "
                                   f"upper) {gathered[bad[0]].tolist()} across ranks. Use drop_last=True or equal "
                                   "shards.")
        flat = torch.cat([r[2].detach().double().cpu() for r in records]).tolist()
        loggers = list(loggers)
        at = 0
        skipped_at = []
        for step, names, values, _ in records:
            row = dict(zip(names, flat[at:at + values.numel()], strict=True))
            at += values.numel()
            if row.pop("finite") < 0.5:
                self.skipped += 1
                self.fit_skipped += 1
                skipped_at.append(step)
                row.pop("autobalance/hypergrad_norm")
            residual = row.get("autobalance/solver_residual", 0.0)
            if not residual <= RESIDUAL_LIMIT:
                self.unconverged.append((step, residual))
            self.last_objective = row["autobalance/objective"]
            self.objectives.append(self.last_objective)
            row["autobalance/skipped"] = float(self.skipped)
            for logger in loggers:
                logger.log_metrics(row, step=step)
        return skipped_at

    def take_objectives(self) -> list[float]:
        """The objectives read since the last call (the progress bar's figure for the epoch)."""
        out, self.objectives = self.objectives, []
        return out
