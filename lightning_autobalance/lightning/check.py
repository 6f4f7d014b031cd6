"""The held-back check: does the found loss beat its start on upper data the search never saw?

A search that lowers its upper objective may only have fitted the upper split's noise (a few images per tail
class). The check holds part of the upper split back from the search and, at its end, asks one question of that
part: **if the classifier head were trained to convergence on the current features with the found loss, and again
with the start loss, which head scores better on the held-back samples?** The found loss replaces its start only
when it wins; otherwise the loss goes back to where it started. What it answers is a proxy: two heads on the features
of the search's own model (trained with the found loss), not the network retrained with each loss, so a loss it keeps
can still lose once retrained (measured in docs/results.md).

For a search started from logit adjustment (the default; :data:`CONSISTENT_STARTS`), a second question comes first,
about the regime: **does the network fit its training data?** It is answered on the training rows the check reads
anyway: the balanced error of the network's logits as its training loss sees them (``delta * logits + offset``, the
found loss). Above ``fit_tolerance`` (default :data:`FIT_TOLERANCE`) the found loss is not kept, whatever the heads
say. Where a network cannot fit its data (augmentation, a short schedule, a small network), logit adjustment is
already the consistent loss for balanced error (Menon et al., 2021), so what a search started there finds on a few
hundred upper images is their noise: on every augmented benchmark seed we measured, such a found loss lost or tied once
the network was retrained with it, while the heads preferred it on half of them (docs/results.md, "The decision,
rebuilt"). Where the network memorises its training data, logit adjustment loses its grip and the search has
something to find (the multiplicative adjustment of the VS loss, docs/theory.md); there the heads decide. A search
started elsewhere (plain cross-entropy, which the search moves towards logit adjustment) is judged by the heads alone.

Each of the two heads is the equilibrium of the head's strongly convex training problem under weight decay
(:func:`~lightning_autobalance.core.head.solve_head`, Newton's method from the network's own head) on the features of
the training data; both are scored with the upper objective on the held-back features. Only the last layer responds to
the loss here: the check is about the loss's effect where it acts most directly, at the cost of a forward pass over
the training data and a few small solves.

With a searched augmentation (``search=[..., "augment"]``) the verdict covers it too: the pair (start loss, start
augmentation) is compared with (found loss, found augmentation). The head under each loss is trained on the features of
the training rows augmented with that pair's strengths (fixed draws, the same for both, from a generator of the check's
own seeded from the augmentation's seed: the training stream of draws is untouched), while the held-back upper rows
stay clean; when the start wins, both the loss and the augmentation go back to their start. Here too only the head
responds: the check asks which features-and-loss pair gives the better head, not which augmentation would train the
better network.

:func:`holdout_split` chooses the held-back part (stratified per class, or per (group, class) cell);
:func:`compare_losses` scores the losses; :func:`read_features` reads a head's inputs from batches (these three know
nothing of Lightning); :func:`check_found_loss` puts them together for an AutoBalance module; :class:`HeldBackCheck`
is the check over a fit, in one place: its share and split, the head's weight decay, when it runs, its objective,
its result (what the callback calls from its hooks and checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from lightning_autobalance.core.augment import augment, draw
from lightning_autobalance.core.augment_parametrization import STREAMS, stream_seed
from lightning_autobalance.core.cells import cell_index, count_table
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
from lightning_autobalance.core.random_state import preserve_random_state
from lightning_autobalance.data._checks import non_finite_sample

__all__ = ["AUTO_HOLDOUT", "CHECK_STREAM", "CHECK_WEIGHT_DECAY", "CONSISTENT_STARTS", "FIT_TOLERANCE", "CheckResult",
           "HeldBackCheck", "augment_variants", "check_found_loss", "compare_losses", "head_weight_decay",
           "holdout_split", "read_feature_sets", "read_features", "training_error"]

#: the share of the upper data held back for the check when ``UpperData(holdout=None)`` (the default)
AUTO_HOLDOUT = 0.5

#: the head's weight decay in the check when neither the model optimizer nor the estimator gives one (only with the
#: default ``UpperData(holdout=None)``; an explicit ``holdout`` then refuses the fit)
CHECK_WEIGHT_DECAY = 5e-4

#: the training balanced error above which the network is said not to fit its training data, and the found loss is not
#: kept (``AutoBalanceCallback(fit_tolerance=...)``), for a search started from one of :data:`CONSISTENT_STARTS`
FIT_TOLERANCE = 0.1

#: the presets whose loss is already the consistent one for balanced error where the network does not fit its data
#: (logit adjustment, per class or per (group, class) cell): the fit rule applies to searches started from them
CONSISTENT_STARTS = ("la", "group_balanced")

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
    no gradient (its mode is restored after): :func:`read_feature_sets` of the inputs as they are."""
    (features,), target, group = read_feature_sets(module, head, batches, unpack, None, forward, to_device, max_rows)
    return features, target, group


def read_feature_sets(module: nn.Module, head: nn.Linear, batches: Iterable[Any],
                      unpack: Callable[[Any], tuple[Any, Tensor, Tensor | None]],
                      variants: Callable[[Any, Tensor, Tensor | None], Sequence[Any]] | None = None,
                      forward: Callable[[Any], Any] | None = None, to_device: Callable[[Any], Any] | None = None,
                      max_rows: int | None = None) -> tuple[list[Tensor], Tensor, Tensor | None]:
    """The inputs of ``head`` (flattened) for one or more variants of every batch's inputs, with the labels and groups,
    over ``batches``, with ``module`` in evaluation mode and no gradient (its mode is restored after).

    Args:
        module: the network (or the LightningModule).
        head: the linear layer whose inputs are read (run once per forward pass).
        batches: an iterable of batches (a DataLoader).
        unpack: ``batch -> (inputs, target, group or None)``.
        variants: ``(inputs, target, group) -> [inputs, ...]``, the inputs each set of features is read from (e.g.
            the batch augmented in two ways, with the same draws); ``None``: one set, the inputs as they are.
        forward: ``inputs -> logits`` (default: ``module(inputs)``).
        to_device: moves a batch where ``module`` is (default: leaves it).
        max_rows: stop once this many rows are read (``None``: read every batch).

    Returns:
        ``([features per variant], target, group or None)``.
    """
    seen: list[Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach().flatten(1)))
    features: list[list[Tensor]] = []
    targets, groups = [], []
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs, target, group = unpack(to_device(batch) if to_device is not None else batch)
                rows = []
                for x in ([inputs] if variants is None else variants(inputs, target, group)):
                    count = len(seen)
                    (forward or module)(x)
                    if len(seen) != count + 1:
                        raise ValueError(f"The held-back check expects the head layer to run once per forward pass; "
                                         f"it ran {len(seen) - count} times.")
                    rows.append(seen[-1])
                features.append(rows)
                targets.append(torch.as_tensor(target).long().to(seen[-1].device))
                if group is not None:
                    groups.append(torch.as_tensor(group).long().to(seen[-1].device))
                if max_rows is not None and sum(f[0].shape[0] for f in features) >= max_rows:
                    break
    finally:
        handle.remove()
        module.train(training)
    if not features:
        raise ValueError("The held-back check read no batch.")
    group_all = torch.cat(groups) if groups and len(groups) == len(features) else None
    sets = [torch.cat([rows[i] for rows in features]) for i in range(len(features[0]))]
    return sets, torch.cat(targets), group_all


def training_error(logits: Tensor, target: Tensor, group: Tensor | None, tables: LossTables) -> Tensor:
    """The balanced error of ``logits`` as a loss of the family sees them: ``argmax(delta * logits + offset)`` (the
    row of each sample's group; the one row of a per-class loss for every sample) against ``target``, averaged over
    the classes present.

    Example:
        >>> tables = LossTables(torch.ones(1, 2), torch.tensor([[0.0, -3.0]]), torch.ones(1, 2))
        >>> float(training_error(torch.tensor([[0.0, 1.0], [0.0, 4.0]]), torch.tensor([1, 1]), None, tables))
        0.5
    """
    row = torch.zeros_like(target) if group is None or tables.delta.shape[0] == 1 else group.long()
    delta, offset = tables.delta.to(logits)[row], tables.offset.to(logits)[row]
    wrong = ((delta * logits + offset).argmax(-1) != target).to(logits.dtype)
    k = logits.shape[-1]
    counts = torch.bincount(target, minlength=k).to(logits.dtype)
    errors = torch.zeros(k, dtype=logits.dtype, device=logits.device).index_add_(0, target, wrong)
    present = counts > 0
    return (errors[present] / counts[present]).mean()


@dataclass(frozen=True)
class CheckResult:
    """What the held-back check found.

    Attributes:
        start: the upper objective on the held-back samples at the head trained with the start loss.
        found: the same with the found loss.
        samples: the held-back samples it was measured on.
        training_error: the network's balanced error on the training rows the check read, its logits seen through the
            found loss (:func:`training_error`); ``None``: not measured.
        fit_tolerance: the training error above which the found loss is not kept; ``None``: no such rule.
        augmentation: whether a searched augmentation was judged with the loss (``start`` and ``found`` are then the
            figures of the pairs (start loss, start augmentation) and (found loss, found augmentation), and the
            decision is about both).
    """

    start: float
    found: float
    samples: int
    training_error: float | None = None
    fit_tolerance: float | None = None
    augmentation: bool = False

    @property
    def fits(self) -> bool:
        """Whether the network fits its training data (training error at most ``fit_tolerance``, or no rule)."""
        return self.training_error is None or self.fit_tolerance is None or self.training_error <= self.fit_tolerance

    @property
    def keep(self) -> bool:
        """Whether the found loss is kept: both figures finite, the network fits its training data and the found
        loss's head scores strictly lower than its start's."""
        return self.judged and self.fits and self.found < self.start

    @property
    def judged(self) -> bool:
        """Whether both figures are finite (a NaN or infinite held-back input makes them not: the check cannot
        judge, and the start is put back, as it is when the found loss loses)."""
        return math.isfinite(self.start) and math.isfinite(self.found)

    @property
    def reason(self) -> str:
        """Why the decision went the way it did, in a few words."""
        if not self.judged:
            return ("the check cannot judge: a figure is not finite (look for NaN or infinite values in the held-back "
                    "upper data)")
        if not self.fits:
            return (f"the network does not fit its training data (training balanced error {self.training_error:.1%} "
                    f"> fit_tolerance {self.fit_tolerance:.1%}): there a consistent start is already the answer and "
                    "the search fits the upper data's noise")
        if self.augmentation:
            return f"the found loss and augmentation {'score' if self.keep else 'do not score'} lower"
        return "the found loss scores lower" if self.keep else "the found loss does not score lower"

    def record(self) -> dict[str, Any]:
        """The decision and its figures as plain values (what ``found_loss.yaml``, ``result.json``, the loss's state
        and the log carry); ``augmentation``: what became of a searched augmentation judged with the loss
        (``"found augmentation kept"`` or ``"start augmentation put back"``; ``None``: none was searched)."""
        augmentation = None if not self.augmentation else (
            "found augmentation kept" if self.keep else "start augmentation put back")
        return {"decision": "found loss kept" if self.keep else "start put back", "reason": self.reason,
                "objective_found": self.found, "objective_start": self.start, "held_back_samples": self.samples,
                "training_error": self.training_error, "fit_tolerance": self.fit_tolerance,
                "augmentation": augmentation}

    def describe(self) -> str:
        both = " and augmentation" if self.augmentation else ""
        verdict = (f"the found loss{both} {'are' if both else 'is'} kept" if self.keep
                   else f"the loss{both} {'go' if both else 'goes'} back to {'their' if both else 'its'} start")
        fit = "" if self.training_error is None else f"; training balanced error {self.training_error:.1%}"
        return (f"held-back check on {self.samples} upper samples: objective {self.found:.4f} with the found "
                f"loss{both}, {self.start:.4f} with the start loss{both}{fit}: {verdict} ({self.reason})")


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
                     reduce: Callable[[Tensor], Tensor] | None = None, steps: int = 10,
                     fit_tolerance: float | None = FIT_TOLERANCE, augmentation: Any = None,
                     start_augment: dict[str, Tensor] | None = None, rank: int = 0) -> CheckResult:
    """The held-back check of an :class:`~lightning_autobalance.AutoBalanceMixin` module's current (found) loss
    against ``start_alpha``: :func:`read_features` on both data, :func:`training_error` of the module's own head on
    the training rows, then :func:`compare_losses`.

    With ``augmentation`` (the module's searched
    :class:`~lightning_autobalance.core.augment_parametrization.AugmentParameters`) and ``start_augment`` (its free
    values at the start), the pairs (start loss, start augmentation) and (found loss, found augmentation) are compared:
    every training batch is read twice, augmented with each pair's strengths under the same draws
    (:func:`augment_variants`), and each loss's head is trained on its own pair's features; the held-back rows are read
    clean, and the training error is that of the found pair.

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
        reduce: averages the figures over processes (each reads its own training shard); ``None``: one process.
        steps: Newton steps per loss.
        fit_tolerance: the training error above which the found loss is not kept (``None``: no such rule).
        augmentation: the searched augmentation's parameters, judged with the loss (not changed here); ``None``: the
            training rows are read as they come.
        start_augment: the augmentation's free values at the start (with ``augmentation``).
        rank: the process's rank, which seeds its draws (:func:`augment_variants`).
    """
    name = find_head(module, head)
    layer = dict(module.named_modules())[name]
    forward = module.autobalance_forward  # type: ignore[attr-defined]
    unpack = module.autobalance_unpack  # type: ignore[attr-defined]
    judged = augmentation is not None and start_augment is not None
    variants = augment_variants(augmentation, [start_augment, augmentation.alpha()], rank) if judged else None
    sets, target, group = read_feature_sets(module, layer, train_batches, unpack, variants, forward, to_device,
                                            max_rows=TRAIN_ROWS)
    held = read_features(module, layer, held_back_batches, unpack, forward, to_device)
    with torch.no_grad():
        start = params.tables({k: v.detach() for k, v in start_alpha.items()})
        found = params.tables({k: v.detach() for k, v in params.alpha().items()})
    theta = head_parameters(layer.weight, layer.bias)

    def heads(features: Tensor, losses: list[Any]) -> list[Tensor]:
        return compare_losses(features, target, group, *held, losses,
                              module.autobalance_loss_from_tables,  # type: ignore[attr-defined]
                              objective, theta, layer.weight.shape[0], layer.bias is not None, weight_decay, steps)

    # each pair's head on its own features; without an augmentation both heads on the same rows
    values = [*heads(sets[0], [start]), *heads(sets[1], [found])] if judged else heads(sets[0], [start, found])
    with torch.no_grad():
        logits = nn.functional.linear(sets[-1].to(layer.weight), layer.weight, layer.bias)
        fit = training_error(logits.double(), target, group, found).to(values[0])
    figures = torch.stack([*values, fit])
    if reduce is not None:
        figures = reduce(figures)
    start_value, found_value, fit_value = figures.tolist()
    return CheckResult(start_value, found_value, int(held[1].numel()), fit_value, fit_tolerance, judged)


#: the index of the check's own stream of augmentation draws, beside the training and hyper streams
CHECK_STREAM = len(STREAMS)


def augment_variants(augmentation: Any, alphas: Sequence[dict[str, Tensor]],
                     rank: int = 0) -> Callable[[Any, Tensor, Tensor | None], list[Tensor]]:
    """For :func:`read_feature_sets`: every batch augmented once per free values of ``alphas`` (the start's, the
    found ones), all with the same draws. The draws come from a generator of the check's own (on the inputs'
    device), seeded with :func:`~lightning_autobalance.core.augment_parametrization.stream_seed` of the
    augmentation's seed, a stream of the check's (:data:`CHECK_STREAM`) and ``rank``: the training and hyper
    streams (and their saved counts) are untouched, and the same check draws the same."""
    with torch.no_grad():
        tables = [{k: v.detach() for k, v in augmentation.tables({n: a[n].detach() for n in a}).items()}
                  for a in alphas]
    seed = stream_seed(augmentation.seed, CHECK_STREAM, rank, 0)
    state: dict[str, torch.Generator] = {}

    def variants(inputs: Any, target: Tensor, group: Tensor | None) -> list[Tensor]:
        x = torch.as_tensor(inputs)
        gen = state.get("gen")
        if gen is None:
            gen = state["gen"] = torch.Generator(device=x.device).manual_seed(seed)
        draws = draw(augmentation.settings, x.shape, gen)
        y = torch.as_tensor(target).long().to(x.device)
        g = None if group is None or augmentation.num_groups == 1 else torch.as_tensor(group).long().to(x.device)
        return [augment(x, y, g, t, draws, augmentation.settings) for t in tables]

    return variants


class HeldBackCheck:
    """The held-back check over one fit, in one place: its share of the upper data and the split (at setup), the
    head's weight decay and the loss parameters the search starts from (at the start of the fit), its objective and
    its run (once the search is over: it puts the start back when the found loss loses), its result, and
    :meth:`state_dict` / :meth:`load_state_dict` so that a resumed fit neither runs it twice nor forgets its result.

    Args:
        share: the share of the upper data held back (``UpperData(holdout=...)``): ``None`` is :data:`AUTO_HOLDOUT`
            where the check can run and nothing (with a message) where it cannot; ``0`` no check; a share given
            explicitly is an error where the check cannot run.
        head: the classifier head's qualified name (default: the last ``nn.Linear``).
        fit_tolerance: the training balanced error above which the found loss is not kept (:data:`FIT_TOLERANCE`;
            ``None``: the heads alone decide), for a search started from one of :data:`CONSISTENT_STARTS` (others are
            judged by the heads alone).
    """

    def __init__(self, share: float | None = None, head: str | None = None,
                 fit_tolerance: float | None = FIT_TOLERANCE) -> None:
        self.share, self.head, self.fit_tolerance = share, head, fit_tolerance
        self.held_back: Tensor | None = None  # after split(): the held-back dataset indices
        self._labels: Tensor | None = None
        self._groups: Tensor | None = None
        self.start_alpha: dict[str, Tensor] | None = None
        #: the searched augmentation's free values at the start (``None``: no augmentation searched)
        self.start_augment: dict[str, Tensor] | None = None
        self.weight_decay = 0.0
        self.result: CheckResult | None = None
        self._restored_start: dict[str, Tensor] | None = None
        self._restored_augment: dict[str, Tensor] | None = None

    # at setup -------------------------------------------------------------------------------------------------
    def split(self, labels_groups: Callable[[], tuple[Tensor, Tensor | None]], checkable: str | None,
              not_resampled: str | None, seed: int, num_classes: int, dataset: Any = None) -> Tensor | None:
        """Chooses the held-back samples (:attr:`held_back`) and returns the indices the search draws from, or
        ``None`` when nothing is held back (a share of ``0``; or, by default, where the check cannot run: said once).

        Args:
            labels_groups: the label (and group) of every upper sample in dataset order, read when needed.
            checkable: why the module cannot be checked (no ``nn.Linear`` head, nothing to search), or ``None``.
            not_resampled: why the upper loader cannot be drawn by index, or ``None``.
            seed: seeds the split.
            num_classes: the loss's classes.
            dataset: the upper dataset, looked at for NaN or infinite inputs where it is held in memory.

        Raises:
            ValueError: a share given explicitly that cannot hold anything back; a NaN or infinite upper input (the
                check could not judge, and the hyper steps drawing it would be skipped), named by sample.
        """
        self.held_back = self._labels = self._groups = None
        share = AUTO_HOLDOUT if self.share is None else self.share
        if not share:
            return None
        why = (checkable if self.share is None else None) or not_resampled
        if why is None:
            labels, groups = labels_groups()
            search, held = holdout_split(labels, share, seed=seed, groups=groups, num_classes=num_classes)
            if held.numel() == 0:
                why = "every class of the upper data has one sample"
        if why is not None:
            if self.share is not None:
                raise ValueError(f"UpperData(holdout={share}) holds nothing back: {why} (a class keeps at least one "
                                 "sample for the search). Use more upper data, a dataloader that can be sampled by "
                                 "index, or holdout=0 (no held-back check).")
            rank_zero_info(f"AutoBalance: no held-back check ({why}); the search uses all the upper data and its "
                           "found loss is kept as it is.")
            return None
        where = None if dataset is None else non_finite_sample(dataset)
        if where is not None:
            raise ValueError(f"The upper data holds non-finite values: {where}. The held-back check could not judge a "
                             "loss on it, and the hyper steps that draw it would be skipped; fix the data.")
        self.held_back, self._labels = held, labels[held]
        self._groups = None if groups is None else groups[held]
        unjudged = sorted(set(labels.tolist()) - set(self._labels.tolist()))
        if unjudged:
            rank_zero_info(f"AutoBalance: the held-back check cannot judge classes {unjudged[:20]}"
                           f"{' ...' if len(unjudged) > 20 else ''}: each has a single upper sample, which stays in "
                           "the search; its figure weighs the other classes only.")
        return search

    def loader(self, upper_loader: Any) -> DataLoader:
        """A loader over the held-back samples of ``upper_loader``'s dataset, in order, with its batch size and
        collate function."""
        if self.held_back is None:
            raise RuntimeError("HeldBackCheck.loader: nothing is held back (holdout=0, or before setup).")
        return DataLoader(Subset(upper_loader.dataset, self.held_back.tolist()), batch_size=upper_loader.batch_size,
                          collate_fn=upper_loader.collate_fn)

    def table(self, num_classes: int, num_groups: int | None) -> list[int] | list[list[int]]:
        """The held-back samples' counts, per (group, class) cell when ``num_groups`` is given (the objective was
        built from cells) and per class otherwise, a class or cell without samples counted as 1 (it has no rows to
        weigh): what the check's objective is built from."""
        if self._labels is None:
            raise RuntimeError("HeldBackCheck.table: nothing is held back (holdout=0, or before setup).")
        counts, cells = count_table(self._labels, self._groups, num_classes, num_groups)
        if num_groups is not None and cells is not None:
            return [[max(c, 1) for c in row] for row in cells]
        return [max(c, 1) for c in counts]

    # at the start of the fit ------------------------------------------------------------------------------------
    def begin(self, module: nn.Module, alpha: dict[str, Tensor], param_groups: Iterable[dict[str, Any]],
              weight_decay: float = 0.0, resumed: bool = False,
              augment_alpha: dict[str, Tensor] | None = None) -> None:
        """Records the start, the loss's free values and, with ``augment_alpha``, those of the searched augmentation
        (a resumed fit keeps the ones it started from, and its result) and works out the head's
        weight decay once for the fit: ``weight_decay`` when ``> 0`` (the estimator's), else that of the optimizer
        group holding the head's weight (:func:`head_weight_decay`), else, with the default share,
        :data:`CHECK_WEIGHT_DECAY` (said once). Nothing is recorded when nothing is held back.

        Raises:
            ValueError: an explicit share and no weight decay ``> 0`` on the head (its equilibrium would not exist):
                before any training time is spent.
        """
        if not resumed:
            self.result, self._restored_start, self._restored_augment = None, None, None
        if self.held_back is None:
            self.start_alpha = self.start_augment = None
            return
        # a resumed fit starts where the interrupted one started, not at its checkpoint
        self.start_alpha = _start(alpha, self._restored_start)
        self.start_augment = None if augment_alpha is None else _start(augment_alpha, self._restored_augment)
        if not weight_decay:
            weight_decay = optimizer_head_weight_decay(module, param_groups, self.head)[1] or 0.0
        if not weight_decay > 0 and self.share is None:
            weight_decay = CHECK_WEIGHT_DECAY
            rank_zero_info(f"AutoBalance: the classifier head has no weight decay; the held-back check trains its "
                           f"heads with weight decay {CHECK_WEIGHT_DECAY}.")
        if not weight_decay > 0:
            raise ValueError("UpperData(holdout=...) checks the found loss at the classifier head's equilibrium, which "
                             "needs weight decay on the head: give the model optimizer weight_decay > 0 for it, or "
                             "set Estimator(weight_decay=...).")
        self.weight_decay = float(weight_decay)

    # once the search is over ------------------------------------------------------------------------------------
    def ready(self, searched: bool, frozen: bool) -> bool:
        """Whether the check can run now: something held back, not yet run in this fit, the search made hyper
        steps (``searched``) and the loss is not frozen."""
        return bool(self.held_back is not None and self.result is None and self.start_alpha is not None and searched
                    and not frozen)

    def run(self, module: nn.Module, params: Any, train_batches: Iterable[Any], held_back_batches: Iterable[Any],
            objective: Objective, to_device: Callable[[Any], Any] | None = None,
            reduce: Callable[[Tensor], Tensor] | None = None) -> CheckResult:
        """:func:`check_found_loss`; when the found loss loses, the start is copied back into ``params.alpha()``.

        With a searched augmentation recorded at :meth:`begin` (``start_augment``), the module's augmentation
        (``autobalance_augment_parameters()``) is judged with the loss, and put back with it."""
        assert self.start_alpha is not None, "HeldBackCheck.run before begin"
        consistent = getattr(params, "preset", None) in CONSISTENT_STARTS
        get = getattr(module, "autobalance_augment_parameters", None)
        aug = get() if self.start_augment is not None and callable(get) else None
        rank = getattr(module, "_autobalance_rank", lambda: 0)()
        result = check_found_loss(module, params, self.start_alpha, train_batches, held_back_batches, objective,
                                  self.weight_decay, self.head, to_device, reduce,
                                  fit_tolerance=self.fit_tolerance if consistent else None, augmentation=aug,
                                  start_augment=self.start_augment if aug is not None else None, rank=rank)
        if not result.keep:
            with torch.no_grad():
                for name, value in params.alpha().items():
                    value.copy_(self.start_alpha[name])
                if aug is not None and self.start_augment is not None:
                    for name, value in aug.alpha().items():
                        value.copy_(self.start_augment[name])
        self.result = result
        params.decision = result.record()
        return result

    def run_in_fit(self, trainer: Any, pl_module: Any, objective: Any, upper_loader: Any, num_groups: int | None,
                   reduce: Callable[[Tensor], Tensor] | None, log: bool = False) -> CheckResult:
        """:meth:`run` inside a fit: the objective (an :class:`~lightning_autobalance.UpperObjective`) built from
        the held-back counts, the training dataloader, the held-back loader, the caller's random state kept; the
        result said once and, with ``log`` at an epoch's end, logged as ``autobalance/check_start`` and
        ``autobalance/check_found``."""
        params = pl_module.autobalance_parameters()
        built = objective.build(self.table(params.num_classes, num_groups), None, validate=False)
        with preserve_random_state(pl_module.device):
            result = self.run(pl_module, params, trainer.train_dataloader, self.loader(upper_loader), built,
                              trainer.strategy.batch_to_device, reduce)
        (rank_zero_info if result.judged else rank_zero_warn)(f"AutoBalance: {result.describe()}.")
        if log and trainer.loggers:
            pl_module.log_dict({"autobalance/check_start": result.start, "autobalance/check_found": result.found,
                                "autobalance/check_training_error": result.training_error,
                                "autobalance/check_kept": float(result.keep)}, on_step=False, on_epoch=True)
        return result

    def state_dict(self) -> dict[str, Any]:
        def saved(values: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
            return None if values is None else {k: v.detach().cpu().clone() for k, v in values.items()}

        return {"result": None if self.result is None else vars(self.result).copy(),
                "start_alpha": saved(self.start_alpha), "start_augment": saved(self.start_augment)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        result = state.get("result")
        self.result = None if result is None else CheckResult(**result)
        self._restored_start = state.get("start_alpha")
        self._restored_augment = state.get("start_augment")


def _start(values: dict[str, Tensor], restored: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """A copy of ``values``, or of the restored start where it has the name (a resumed fit)."""
    return {k: (restored[k] if restored is not None and k in restored else v.detach()).clone().to(v)
            for k, v in values.items()}
