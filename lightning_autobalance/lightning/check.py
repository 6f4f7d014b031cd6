"""The held-back check: does the found loss beat its start on upper data the search never saw?

A search that lowers its upper objective may only have fitted the upper split's noise (a few images per tail
class). The check holds part of the upper split back from the search and, at its end, asks one question of that
part: **if the classifier head were trained to convergence on the current features with the found loss, and again
with the start loss, which head scores better on the held-back samples?** The found loss replaces its start only
when it wins; otherwise the loss goes back to where it started. So a search can stop improving, but it cannot end
worse than its start by more than the check's own error.

Each of the two heads is the equilibrium of the head's strongly convex training problem under weight decay
(:func:`~lightning_autobalance.core.head.solve_head`, Newton's method from the network's own head) on the features of
the training data; both are scored with the upper objective on the held-back features. Only the last layer responds to
the loss here: the check is about the loss's effect where it acts most directly, at the cost of a forward pass over
the training data and a few small solves, and it knows nothing of Lightning.

:func:`holdout_split` chooses the held-back part (stratified per class, or per (group, class) cell);
:func:`compare_losses` scores the losses; :func:`read_features` reads a head's inputs from batches;
:func:`check_found_loss` puts them together for an AutoBalance module; :class:`HeldBackCheck` is the check's state
over a fit (what the callback keeps and checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_autobalance.core.cells import cell_index
from lightning_autobalance.core.head import (
    HeadProblem,
    augment_features,
    find_head,
    head_parameters,
    head_weight_decay,
    optimizer_head_weight_decay,
    solve_head,
)
from lightning_autobalance.core.losses import LossTables

__all__ = ["CheckResult", "HeldBackCheck", "check_found_loss", "compare_losses", "head_weight_decay", "holdout_split",
           "read_features"]

#: the most training rows the check reads (a shuffled loader gives a random sample of that size)
TRAIN_ROWS = 65536

TrainLoss = Callable[[Tensor, Tensor, "Tensor | None", LossTables], Tensor]
Objective = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def holdout_split(labels: Tensor, fraction: float, seed: int = 0, groups: Tensor | None = None,
                  num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """Splits sample indices into a search part and a held-back part, stratified.

    In every class (every (group, class) cell when ``groups`` is given) with ``n >= 2`` samples,
    ``max(1, floor(fraction * n))`` samples are held back, at most ``n - 1``: each unit keeps at least one sample for
    the search. Units with one sample stay whole in the search part.

    Args:
        labels: the label of every sample, ``(N,)``.
        fraction: the share held back, in ``(0, 1)``.
        seed: seeds which samples are held back.
        groups: the group of every sample, or ``None``.
        num_classes: ``K`` (default: ``max(labels) + 1``).

    Returns:
        ``(search, held_back)``: sorted index tensors, disjoint, together ``0 .. N - 1``.

    Example:
        >>> search, held = holdout_split(torch.tensor([0, 0, 0, 0, 1, 1, 2]), 0.5, seed=0)
        >>> len(search), len(held), sorted(torch.tensor([0, 0, 0, 0, 1, 1, 2])[held].tolist())
        (4, 3, [0, 0, 1])
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout must be a share in (0, 1); got {fraction}.")
    labels = torch.as_tensor(labels).long().flatten()
    k = int(num_classes) if num_classes is not None else (int(labels.max()) + 1 if labels.numel() else 1)
    units = labels if groups is None else cell_index(torch.as_tensor(groups).long().flatten(), labels, k)
    gen = torch.Generator().manual_seed(int(seed))
    held = []
    for unit in torch.unique(units).tolist():
        members = torch.nonzero(units == unit).flatten()
        n = members.numel()
        if n < 2:
            continue
        m = min(max(1, int(fraction * n)), n - 1)
        held.append(members[torch.randperm(n, generator=gen)[:m]])
    held_back = torch.sort(torch.cat(held)).values if held else torch.zeros(0, dtype=torch.long)
    keep = torch.ones(labels.numel(), dtype=torch.bool)
    keep[held_back] = False
    return torch.nonzero(keep).flatten(), held_back


def read_features(module: nn.Module, head: nn.Linear, batches: Iterable[Any],
                  unpack: Callable[[Any], tuple[Any, Tensor, Tensor | None]],
                  forward: Callable[[Any], Any] | None = None, to_device: Callable[[Any], Any] | None = None,
                  max_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The inputs of ``head`` (flattened), labels and groups over ``batches``, with ``module`` in evaluation mode and
    no gradient (its mode is restored after).

    Args:
        module: the network (or the LightningModule).
        head: the linear layer whose inputs are read (run once per forward pass).
        batches: an iterable of batches (a DataLoader).
        unpack: ``batch -> (inputs, target, group or None)``.
        forward: ``inputs -> logits`` (default: ``module(inputs)``).
        to_device: moves a batch where ``module`` is (default: leaves it).
        max_rows: stop once this many rows are read (``None``: read every batch).
    """
    seen: list[Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().flatten(1)))
    features, targets, groups = [], [], []
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs, target, group = unpack(to_device(batch) if to_device is not None else batch)
                count = len(seen)
                (forward or module)(inputs)
                if len(seen) != count + 1:
                    raise ValueError(f"The held-back check expects the head layer to run once per forward pass; it ran "
                                     f"{len(seen) - count} times.")
                features.append(seen[-1])
                targets.append(torch.as_tensor(target).long().to(seen[-1].device))
                if group is not None:
                    groups.append(torch.as_tensor(group).long().to(seen[-1].device))
                if max_rows is not None and sum(f.shape[0] for f in features) >= max_rows:
                    break
    finally:
        handle.remove()
        module.train(training)
    if not features:
        raise ValueError("The held-back check read no batch.")
    group_all = torch.cat(groups) if groups and len(groups) == len(features) else None
    return torch.cat(features), torch.cat(targets), group_all


@dataclass(frozen=True)
class CheckResult:
    """What the held-back check found.

    Attributes:
        start: the upper objective on the held-back samples at the head trained with the start loss.
        found: the same with the found loss.
        samples: the held-back samples it was measured on.
    """

    start: float
    found: float
    samples: int

    @property
    def keep(self) -> bool:
        """Whether the found loss wins (strictly lower objective than its start)."""
        return self.found < self.start

    def describe(self) -> str:
        verdict = "the found loss is kept" if self.keep else "the loss goes back to its start"
        return (f"held-back check on {self.samples} upper samples: objective {self.found:.4f} with the found loss, "
                f"{self.start:.4f} with the start loss: {verdict}")


def compare_losses(features: Tensor, target: Tensor, group: Tensor | None,
                   check_features: Tensor, check_target: Tensor, check_group: Tensor | None,
                   tables: Sequence[LossTables], train_loss: TrainLoss, objective: Objective, theta: Tensor,
                   num_classes: int, bias: bool, weight_decay: float, steps: int = 10,
                   dense_limit: int = 4096, cg_iterations: int = 50) -> list[Tensor]:
    """The upper objective on the check samples at the head's equilibrium under each loss of ``tables``.

    For every entry of ``tables`` the head ``theta = (W, b)`` is trained to its equilibrium on the training
    features (``steps`` Newton steps of :func:`~lightning_autobalance.core.head.solve_head` from ``theta``, weight decay
    ``weight_decay > 0``) and scored with ``objective`` on ``check_features``. Computed in float64.

    Args:
        features, target, group: the training samples' head inputs ``(N, d)``, labels, groups (or ``None``).
        check_features, check_target, check_group: the same for the held-back samples.
        tables: the losses compared (e.g. ``[start, found]``).
        train_loss: ``train_loss(logits, target, group, tables) -> scalar`` (a sum of per-sample terms).
        objective: ``objective(logits, target, group) -> scalar``.
        theta: the starting head, flat: ``K`` rows ``(w_k, b_k)``
            (:func:`~lightning_autobalance.core.head.head_parameters`).
        num_classes: ``K``.
        bias: whether each row of ``theta`` ends with the class's bias.
        weight_decay: the head's L2 coefficient, ``> 0`` (the model optimizer's).
        steps: Newton steps per loss.
        dense_limit, cg_iterations: as in :func:`~lightning_autobalance.core.head.solve_head`.

    Returns:
        One scalar tensor per entry of ``tables``.
    """
    if not weight_decay > 0:
        raise ValueError(f"The held-back check needs weight_decay > 0 (the model optimizer's weight decay, which makes "
                         f"the head's equilibrium exist); got {weight_decay}.")
    x = augment_features(features.detach().to(torch.float64), bias)
    check = augment_features(check_features.detach().to(torch.float64), bias)
    values = []
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):  # solved in float64 in any context
        for table in tables:
            wide = LossTables(*(t.detach().to(torch.float64) for t in table))
            problem = HeadProblem(x, target, group, wide, train_loss, float(weight_decay), num_classes, None)
            head = solve_head(problem, theta.detach().to(torch.float64), steps, dense_limit, cg_iterations)
            logits = check @ head.view(num_classes, -1).T
            values.append(objective(logits, check_target, check_group).detach())
    return values


def check_found_loss(module: nn.Module, params: Any, start_alpha: dict[str, Tensor],
                     train_batches: Iterable[Any], held_back_batches: Iterable[Any], objective: Objective,
                     weight_decay: float, head: str | None = None, to_device: Callable[[Any], Any] | None = None,
                     reduce: Callable[[Tensor], Tensor] | None = None, steps: int = 10) -> CheckResult:
    """The held-back check of an :class:`~lightning_autobalance.AutoBalanceMixin` module's current (found) loss
    against ``start_alpha``: :func:`read_features` on both data, then :func:`compare_losses`.

    Args:
        module: the module (its ``autobalance_unpack``, ``autobalance_forward`` and ``autobalance_loss_from_tables``
            are used; its loss parameters are not changed here).
        params: its loss parametrisation (``tables(alpha)``, ``alpha()``).
        start_alpha: the loss parameters the search started from.
        train_batches: the training data (one pass is read).
        held_back_batches: the held-back upper data.
        objective: ``objective(logits, target, group) -> scalar`` on the held-back samples.
        weight_decay: the head's L2 coefficient, ``> 0``.
        head: the head's qualified name (default: the last ``nn.Linear``).
        to_device: moves a batch to the module's device.
        reduce: averages the two figures over processes (each reads its own training shard); ``None``: one process.
        steps: Newton steps per loss.
    """
    name = find_head(module, head)
    layer = dict(module.named_modules())[name]
    forward = module.autobalance_forward  # type: ignore[attr-defined]
    unpack = module.autobalance_unpack  # type: ignore[attr-defined]
    train = read_features(module, layer, train_batches, unpack, forward, to_device, max_rows=TRAIN_ROWS)
    held = read_features(module, layer, held_back_batches, unpack, forward, to_device)
    with torch.no_grad():
        start = params.tables({k: v.detach() for k, v in start_alpha.items()})
        found = params.tables({k: v.detach() for k, v in params.alpha().items()})
    values = compare_losses(*train, *held, [start, found], module.autobalance_loss_from_tables,  # type: ignore
                            objective, head_parameters(layer.weight, layer.bias), layer.weight.shape[0],
                            layer.bias is not None, weight_decay, steps)
    pair = torch.stack(values)
    if reduce is not None:
        pair = reduce(pair)
    start_value, found_value = pair.tolist()
    return CheckResult(start_value, found_value, int(held[1].numel()))


class HeldBackCheck:
    """The held-back check over one fit: the loss parameters it started from, the head's weight decay, the result.

    :meth:`begin` at the start of the fit, :meth:`run` once the search is over (it puts the start back when the found
    loss loses), :meth:`state_dict` / :meth:`load_state_dict` so that a resumed fit neither runs it twice nor forgets
    its result.
    """

    def __init__(self) -> None:
        self.start_alpha: dict[str, Tensor] | None = None
        self.weight_decay = 0.0
        self.result: CheckResult | None = None
        self._restored_start: dict[str, Tensor] | None = None

    def begin(self, module: nn.Module, alpha: dict[str, Tensor], param_groups: Iterable[dict[str, Any]],
              weight_decay: float = 0.0, head: str | None = None, fallback: float | None = None) -> bool:
        """Records the start; the weight decay is ``weight_decay`` when ``> 0``, else that of the optimizer group
        holding the head's weight (:func:`head_weight_decay`), else ``fallback``. Returns whether the fallback was
        used.

        Raises:
            ValueError: when none gives the head a weight decay ``> 0`` (the head's equilibrium would not exist):
                before any training time is spent.
        """
        restored = self._restored_start  # a resumed fit starts where the interrupted one started, not at its checkpoint
        self.start_alpha = {k: (restored[k] if restored is not None and k in restored else v.detach()).clone().to(v)
                            for k, v in alpha.items()}
        used_fallback = False
        if not weight_decay:
            weight_decay = optimizer_head_weight_decay(module, param_groups, head)[1] or 0.0
        if not weight_decay > 0 and fallback is not None:
            weight_decay, used_fallback = fallback, True
        if not weight_decay > 0:
            raise ValueError("UpperData(holdout=...) checks the found loss at the classifier head's equilibrium, which "
                             "needs weight decay on the head: give the model optimizer weight_decay > 0 for it, or "
                             "set Estimator(weight_decay=...).")
        self.weight_decay = float(weight_decay)
        return used_fallback

    def run(self, module: nn.Module, params: Any, train_batches: Iterable[Any], held_back_batches: Iterable[Any],
            objective: Objective, head: str | None = None, to_device: Callable[[Any], Any] | None = None,
            reduce: Callable[[Tensor], Tensor] | None = None) -> CheckResult:
        """:func:`check_found_loss`; when the found loss loses, the start is copied back into ``params.alpha()``."""
        assert self.start_alpha is not None, "HeldBackCheck.run before begin"
        result = check_found_loss(module, params, self.start_alpha, train_batches, held_back_batches, objective,
                                  self.weight_decay, head, to_device, reduce)
        if not result.keep:
            with torch.no_grad():
                for name, value in params.alpha().items():
                    value.copy_(self.start_alpha[name])
        self.result = result
        return result

    def state_dict(self) -> dict[str, Any]:
        return {"result": None if self.result is None else vars(self.result).copy(),
                "start_alpha": None if self.start_alpha is None else {k: v.detach().cpu().clone()
                                                                      for k, v in self.start_alpha.items()}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        result = state.get("result")
        self.result = None if result is None else CheckResult(**result)
        self._restored_start = state.get("start_alpha")
