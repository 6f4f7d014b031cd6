"""Where the answer is known: the search on Gaussian mixtures with a linear model, against theory.

Three studies (docs/theory.md states each claim, its tolerance and the measured figures):

1. ``bayes``: a ``K``-class Gaussian mixture with shared identity covariance and long-tailed priors. A linear model
   is then well specified: cross-entropy learns ``log pi_y + (Bayes score)``, and the balanced-error-optimal additive
   adjustment is ``l_y = log pi_y`` (logit adjustment, tau 1) up to a constant. The search over per-class offsets,
   from a cross-entropy start, must land there, and its balanced test error on the Bayes error.
2. ``separable``: dimension above the number of training samples, plain gradient descent trained long without
   weight decay. Additive offsets lose their grip as the weights grow while a multiplicative ``delta`` keeps
   shaping the margins (Kini et al. 2021): logit adjustment falls behind the best VS loss of a grid, and the search
   over ``delta`` and offsets must reach that best VS (or do better).
3. ``split``: the search of study 2 with its upper objective on the training data themselves (no split), on an
   80/20 split of them (the paper's protocol, then retraining on all), and on a separate balanced validation set.

The lower level is a linear model (``nn.Linear``, float64) trained by full-batch gradient descent with the
library's loss (:func:`~lightning_autobalance.adjusted_cross_entropy`); fixed losses of a grid are trained side by
side as the rows of one group table. Hyper steps use :func:`~lightning_autobalance.hypergradient` with an
:class:`~lightning_autobalance.Estimator` and the library's :class:`~lightning_autobalance.HyperOptimizer`:
study 1 interleaves implicit steps (``"cg"`` with the Gauss-Newton product, which is the exact Hessian for a linear
model, and as many iterations as parameters) with gradient descent; studies 2 and 3 use the ``"head"`` method (the
linear model is a head: its equilibrium is solved by Newton and differentiated exactly) at weight decay
``1 / (lr * steps)``, a heuristic stand-in for the point of the regularisation path that gradient descent reaches
after ``steps`` steps. The upper objective is always the
library's :class:`~lightning_autobalance.BalancedCrossEntropy`. Balanced test errors are exact up to a Monte-Carlo
draw in ``K`` dimensions: for ``x ~ N(mu_y, I)`` the logits ``W x + b`` are ``N(W mu_y + b, W W^T)``, so each
class's error comes from 200,000 draws of a ``K``-vector (the same draws for every model: differences are precise).

Example::

    python benchmarks/theory.py --out docs/theory            # all three studies and the phase plot, ~8 minutes
    python benchmarks/theory.py --studies bayes --seeds 1    # one study, one seed
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_autobalance import (
    BalancedCrossEntropy,
    Batch,
    Estimator,
    HyperOptimizer,
    LossTables,
    PerClass,
    adjusted_cross_entropy,
    hypergradient,
    preset_tables,
)
from lightning_autobalance.core.problem import FunctionalModel

DTYPE = torch.float64

# ---------------------------------------------------------------------------------------------------------
# The data: a Gaussian mixture with means on orthogonal axes, unit covariance
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mixture:
    """``x ~ N(mu_y, I_d)`` with ``mu_y = scale * e_y`` (orthogonal means, pairwise distance ``scale * sqrt 2``)."""

    num_classes: int
    dim: int
    scale: float

    @property
    def means(self) -> Tensor:
        return self.scale * torch.eye(self.num_classes, self.dim, dtype=DTYPE)

    def draw(self, counts: Sequence[int], gen: torch.Generator) -> tuple[Tensor, Tensor]:
        y = torch.cat([torch.full((int(c),), k, dtype=torch.long) for k, c in enumerate(counts)])
        return self.means[y] + torch.randn(len(y), self.dim, generator=gen, dtype=DTYPE), y

    def bayes_scores(self) -> tuple[Tensor, Tensor]:
        """The balanced Bayes rule as a linear model: ``argmax_y mu_y.x - |mu_y|^2 / 2`` (uniform priors)."""
        mu = self.means
        return mu, -0.5 * (mu * mu).sum(1)


def long_tail_counts(n: int, num_classes: int, rho: float) -> list[int]:
    """``n`` samples over ``K`` classes with an exponential profile of imbalance ``rho`` (largest / smallest)."""
    shape = [rho ** (-k / (num_classes - 1)) for k in range(num_classes)]
    return [max(1, round(n * s / sum(shape))) for s in shape]


class ErrorMeter:
    """Per-class test errors of linear models ``(W, b)`` on a mixture, from fixed draws (common random numbers)."""

    def __init__(self, mixture: Mixture, draws: int = 200_000, seed: int = 12345) -> None:
        self.mixture = mixture
        self.noise = torch.randn(draws, mixture.num_classes, generator=torch.Generator().manual_seed(seed),
                                 dtype=DTYPE)

    def per_class(self, weight: Tensor, bias: Tensor) -> Tensor:
        """``(M, K)`` errors of ``M`` models: ``weight`` ``(M, K, d)`` or ``(K, d)``, ``bias`` ``(M, K)`` or ``(K,)``.
        """
        weight, bias = weight.reshape(-1, *weight.shape[-2:]), bias.reshape(-1, bias.shape[-1])
        k = self.mixture.num_classes
        chol = torch.linalg.cholesky(weight @ weight.transpose(1, 2) + 1e-12 * torch.eye(k, dtype=DTYPE))
        errors = []
        for y in range(k):
            mean = weight @ self.mixture.means[y] + bias  # (M, K)
            scores = mean[:, None, :] + torch.einsum("mkj,nj->mnk", chol, self.noise)
            errors.append((scores.argmax(-1) != y).to(DTYPE).mean(1))
        return torch.stack(errors, 1)

    def balanced(self, weight: Tensor, bias: Tensor) -> Tensor:
        return self.per_class(weight, bias).mean(1)


# ---------------------------------------------------------------------------------------------------------
# The lower level: full-batch gradient descent with the library's loss
# ---------------------------------------------------------------------------------------------------------


def train_loss(logits: Tensor, target: Tensor, group: Tensor | None, tables: LossTables) -> Tensor:
    return adjusted_cross_entropy(logits, target, *tables, group=group, validate=False)


def train_fixed(x: Tensor, y: Tensor, tables: Sequence[LossTables], steps: int, lr: float, record: Sequence[int] = (),
                meter: ErrorMeter | None = None) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
    """Trains one linear model per loss (rows of ``tables``) from zero by full-batch gradient descent, side by side:
    model ``m`` is group ``m`` of one ``(M, K)`` table, so one call of the loss serves all. Returns the weights
    ``(M, K, d)``, biases ``(M, K)`` and the balanced errors at the steps in ``record``."""
    m, (n, d), k = len(tables), x.shape, tables[0].delta.shape[1]
    delta, offset, weight = (torch.cat([getattr(t, name).to(DTYPE) for t in tables]) for name in LossTables._fields)
    w = torch.zeros(m, k, d, dtype=DTYPE, requires_grad=True)
    b = torch.zeros(m, k, dtype=DTYPE, requires_grad=True)
    group, target = torch.arange(m).repeat_interleave(n), y.repeat(m)
    seen: dict[int, Tensor] = {}
    for step in range(1, steps + 1):
        logits = (torch.einsum("mkd,nd->mnk", w, x) + b[:, None]).reshape(m * n, k)
        # the mean over M * n samples: each model's own mean loss, divided by M (undone by the step size)
        loss = adjusted_cross_entropy(logits, target, delta, offset, weight, group=group, validate=False)
        gw, gb = torch.autograd.grad(loss * m, (w, b))
        with torch.no_grad():
            w -= lr * gw
            b -= lr * gb
        if step in record and meter is not None:
            seen[step] = meter.balanced(w.detach(), b.detach())
    return w.detach(), b.detach(), seen


def gradient_steps(net: nn.Linear, x: Tensor, y: Tensor, tables: LossTables, steps: int, lr: float) -> None:
    for _ in range(steps):
        loss = train_loss(net(x), y, None, tables)
        grads = torch.autograd.grad(loss, list(net.parameters()))
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads):
                p -= lr * g


# ---------------------------------------------------------------------------------------------------------
# The upper level: the library's hypergradient and hyper-optimizer
# ---------------------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    tables: LossTables
    trace: list[dict[str, Any]]
    seconds: float


def search(x: Tensor, y: Tensor, upper_x: Tensor, upper_y: Tensor, counts: Sequence[int], *,
           tables_to_search: Sequence[str], preset: str, estimator: Estimator, hyper_steps: int, hyper_lr: float,
           warm_steps: int = 0, steps_between: int = 0, lr: float = 1.0, first_estimator: Estimator | None = None,
           on_step: Callable[[int, PerClass], dict[str, Any]] | None = None) -> SearchResult:
    """AutoBalance on a linear model: per-class tables (``PerClass``) from ``preset``, upper objective the balanced
    cross-entropy of the upper samples, Adam on the free values (no shrinkage: the claims are about where the
    search aims), a cosine decay of its learning rate over ``hyper_steps``.

    With ``steps_between > 0`` the model trains by gradient descent (``warm_steps`` first, then ``steps_between``
    after each hyper step) and the estimator is taken at its current weights; the ``"head"`` method solves the
    model's equilibrium itself (warm-started from the previous one; ``first_estimator`` for the first call, with
    more Newton steps).
    """
    start = time.perf_counter()
    k, d = len(counts), x.shape[1]
    net = nn.Linear(d, k).to(DTYPE)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
    model = FunctionalModel(net)
    loss = PerClass(counts, preset=preset, search=tuple(tables_to_search)).to(DTYPE)
    alpha = loss.alpha()
    upper_counts = torch.bincount(upper_y, minlength=k).tolist()
    objective = BalancedCrossEntropy(upper_counts)
    update = HyperOptimizer(lr=hyper_lr, shrinkage=0.0).build(alpha, hyper_steps)
    assert update is not None
    gradient_steps(net, x, y, loss.tables(), warm_steps, lr)
    trace = []
    for step in range(hyper_steps):
        est = first_estimator if step == 0 and first_estimator is not None else estimator
        result = hypergradient(model, alpha, loss.tables, train_loss, objective, [Batch(x, y)],
                               [Batch(upper_x, upper_y)], est)
        update.step(alpha, result.grad, result.finite)
        gradient_steps(net, x, y, loss.tables(), steps_between, lr)
        row = {"step": step, "upper": float(result.objective)}
        if on_step is not None:
            row.update(on_step(step, loss))
        trace.append(row)
    tables = LossTables(*(t.detach().clone() for t in loss.tables()))
    return SearchResult(tables, trace, time.perf_counter() - start)


def centred(values: Tensor) -> Tensor:
    return values - values.mean()


def known_offsets(counts: Sequence[int]) -> Tensor:
    """The balanced-error-optimal offsets of study 1: ``log pi_y``, centred (the loss cannot see a constant)."""
    c = torch.as_tensor(counts, dtype=DTYPE)
    return centred(torch.log(c / c.sum()))


# ---------------------------------------------------------------------------------------------------------
# Study 1: the Bayes-optimal offsets
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BayesSetup:
    num_classes: int = 4
    dim: int = 4
    scale: float = 2.0
    n: int = 6000
    rho: float = 20.0
    upper_per_class: int = 1000
    gd_lr: float = 1.0
    gd_steps: int = 1500
    warm_steps: int = 300
    steps_between: int = 20
    hyper_steps: int = 100
    hyper_lr: float = 0.1
    method: str = "cg"
    head_weight_decay: float = 1e-6


def study_bayes(setup: BayesSetup, seed: int, meter: ErrorMeter | None = None) -> dict[str, Any]:
    """One seed of study 1: the search over per-class offsets from cross-entropy, against ``log pi``."""
    mixture = Mixture(setup.num_classes, setup.dim, setup.scale)
    meter = meter or ErrorMeter(mixture)
    gen = torch.Generator().manual_seed(seed)
    counts = long_tail_counts(setup.n, setup.num_classes, setup.rho)
    x, y = mixture.draw(counts, gen)
    ux, uy = mixture.draw([setup.upper_per_class] * setup.num_classes, gen)
    size = setup.num_classes * (setup.dim + 1)
    if setup.method == "head":
        est = Estimator(method="head", weight_decay=setup.head_weight_decay, head_memory=0, head_steps=3)
        first, warm, between = replace(est, head_steps=30), 0, 0
    else:
        est = Estimator(method="cg", curvature="gauss_newton", cg_iterations=size, product="jvp")
        first, warm, between = None, setup.warm_steps, setup.steps_between
    found = search(x, y, ux, uy, counts, tables_to_search=("offset",), preset="ce", estimator=est,
                   hyper_steps=setup.hyper_steps, hyper_lr=setup.hyper_lr, warm_steps=warm,
                   steps_between=between, lr=setup.gd_lr, first_estimator=first,
                   on_step=lambda _s, loss: {"offset": loss.tables().offset[0].tolist()})
    losses = {"ce": preset_tables("ce", counts, dtype=DTYPE), "la": preset_tables("la", counts, dtype=DTYPE),
              "autobalance": found.tables}
    w, b, _ = train_fixed(x, y, list(losses.values()), setup.gd_steps, setup.gd_lr)
    per_class = meter.per_class(w, b)
    bayes_w, bayes_b = mixture.bayes_scores()
    bayes = meter.per_class(bayes_w, bayes_b)[0]
    offsets = centred(found.tables.offset[0])
    known = known_offsets(counts)
    return {
        "seed": seed, "counts": counts, "search_seconds": found.seconds,
        "found_offset": offsets.tolist(), "known_offset": known.tolist(),
        "max_offset_gap": float((offsets - known).abs().max()),
        "balanced_error": {name: float(e.mean()) for name, e in zip(losses, per_class)}
        | {"bayes": float(bayes.mean())},
        "per_class_error": {name: e.tolist() for name, e in zip(losses, per_class)} | {"bayes": bayes.tolist()},
        "trace": [row["offset"] for row in found.trace],
    }


# ---------------------------------------------------------------------------------------------------------
# Study 2: the separable regime
# ---------------------------------------------------------------------------------------------------------

VS_GAMMAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


@dataclass(frozen=True)
class SeparableSetup:
    num_classes: int = 3
    dim: int = 300
    scale: float = 3.0
    n: int = 150
    rho: float = 10.0
    upper_per_class: int = 200
    gd_lr: float = 1.0
    gd_steps: int = 3000
    record: tuple[int, ...] = (100, 300, 1000, 3000)
    hyper_steps: int = 30
    hyper_lr: float = 0.2
    preset: str = "ce"
    search: tuple[str, ...] = ("delta", "offset")
    gammas: tuple[float, ...] = VS_GAMMAS  # the grid of VS (and CDT) exponents
    cdt: bool = True

    @property
    def head_weight_decay(self) -> float:
        """The point of the regularisation path that ``gd_steps`` steps of size ``gd_lr`` reach: ``1/(lr t)``."""
        return 1.0 / (self.gd_lr * self.gd_steps)


def fixed_grid(counts: Sequence[int], gammas: Sequence[float] = VS_GAMMAS, cdt: bool = True) -> dict[str, LossTables]:
    """CE, LA (tau 1), VS (tau 1) and CDT for each exponent of ``gammas``."""
    grid = {"ce": preset_tables("ce", counts, dtype=DTYPE), "la": preset_tables("la", counts, dtype=DTYPE)}
    grid |= {f"vs_{g}": preset_tables("vs", counts, gamma=g, dtype=DTYPE) for g in gammas}
    if cdt:
        grid |= {f"cdt_{g}": preset_tables("cdt", counts, gamma=g, dtype=DTYPE) for g in gammas}
    return grid


def head_search(setup: SeparableSetup, x: Tensor, y: Tensor, ux: Tensor, uy: Tensor,
                counts: Sequence[int]) -> SearchResult:
    est = Estimator(method="head", weight_decay=setup.head_weight_decay, head_memory=0, head_steps=3)
    return search(x, y, ux, uy, counts, tables_to_search=setup.search, preset=setup.preset, estimator=est,
                  hyper_steps=setup.hyper_steps, hyper_lr=setup.hyper_lr, first_estimator=replace(est, head_steps=40),
                  on_step=lambda _s, loss: {"delta": loss.tables().delta[0].tolist(),
                                            "offset": centred(loss.tables().offset[0]).tolist()})


def split_per_class(y: Tensor, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices of a seeded per-class split: ``fraction`` of each class (at least one) to the upper part, at least one
    left to the lower part."""
    lower, upper = [], []
    for k in range(int(y.max()) + 1):
        idx = (y == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cut = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        upper.append(idx[:cut])
        lower.append(idx[cut:])
    return torch.cat(lower), torch.cat(upper)


def study_separable(setup: SeparableSetup, seed: int, splits: bool = True,
                    meter: ErrorMeter | None = None) -> dict[str, Any]:
    """One seed of studies 2 and 3: the fixed grid (CE, LA, VS, CDT) trained long, and the search with its upper
    objective on a balanced validation set (study 2) and, with ``splits``, on the training data themselves and on an
    80/20 split of them (study 3). Every found loss is retrained by the same gradient descent on all the training
    data."""
    mixture = Mixture(setup.num_classes, setup.dim, setup.scale)
    meter = meter or ErrorMeter(mixture)
    gen = torch.Generator().manual_seed(seed)
    counts = long_tail_counts(setup.n, setup.num_classes, setup.rho)
    x, y = mixture.draw(counts, gen)
    ux, uy = mixture.draw([setup.upper_per_class] * setup.num_classes, gen)
    losses = fixed_grid(counts, setup.gammas, setup.cdt)
    found = {"validation": head_search(setup, x, y, ux, uy, counts)}
    if splits:
        found["no_split"] = head_search(setup, x, y, x, y, counts)
        lower, upper = split_per_class(y, 0.2, gen)
        lower_counts = torch.bincount(y[lower], minlength=setup.num_classes).tolist()
        found["split"] = head_search(setup, x[lower], y[lower], x[upper], y[upper], lower_counts)
    losses |= {f"autobalance_{where}": r.tables for where, r in found.items()}
    w, b, seen = train_fixed(x, y, list(losses.values()), setup.gd_steps, setup.gd_lr, record=setup.record,
                             meter=meter)
    per_class = meter.per_class(w, b)
    return {
        "seed": seed, "counts": counts,
        "balanced_error": {name: float(e.mean()) for name, e in zip(losses, per_class)},
        "per_class_error": {name: e.tolist() for name, e in zip(losses, per_class)},
        "by_step": {str(s): dict(zip(losses, e.tolist())) for s, e in seen.items()},
        "found": {where: {"delta": r.tables.delta[0].tolist(), "offset": centred(r.tables.offset[0]).tolist(),
                          "seconds": r.seconds, "upper_first": r.trace[0]["upper"], "upper_last": r.trace[-1]["upper"]}
                  for where, r in found.items()},
        "traces": {where: [{"delta": row["delta"], "offset": row["offset"]} for row in r.trace]
                   for where, r in found.items()},
    }


def study_phase(setup: SeparableSetup, sizes: Sequence[int], dims: Sequence[int], seeds: Sequence[int],
                meter_seed: int = 12345) -> dict[str, Any]:
    """Balanced error of LA and of the best VS loss of the grid against the number of training samples and the
    dimension (fixed losses only: CE, LA, VS; the same gradient descent as study 2), mean over ``seeds``."""
    mixture_cache: dict[int, ErrorMeter] = {}
    cells = []
    for n in sizes:
        for d in dims:
            cell_setup = replace(setup, n=n, dim=d)
            mixture = Mixture(setup.num_classes, d, setup.scale)
            meter = mixture_cache.setdefault(d, ErrorMeter(mixture, seed=meter_seed))
            rows = []
            for seed in seeds:
                gen = torch.Generator().manual_seed(seed)
                counts = long_tail_counts(n, setup.num_classes, setup.rho)
                x, y = mixture.draw(counts, gen)
                grid = fixed_grid(counts, setup.gammas, cdt=False)
                w, b, _ = train_fixed(x, y, list(grid.values()), cell_setup.gd_steps, cell_setup.gd_lr)
                row = dict(zip(grid, meter.balanced(w, b).tolist()))
                # whether cross-entropy fitted every training sample (the data are then linearly separable)
                row["ce_fitted"] = float(bool(((x @ w[0].T + b[0]).argmax(1) == y).all()))
                rows.append(row)
            mean = {name: sum(r[name] for r in rows) / len(rows) for name in rows[0]}
            vs = {name: v for name, v in mean.items() if name.startswith("vs_")}
            best = min(vs, key=vs.__getitem__)
            cells.append({"n": n, "dim": d, "ce": mean["ce"], "la": mean["la"], "vs_best": vs[best], "vs_gamma": best,
                          "fitted": mean["ce_fitted"]})
    return {"cells": cells, "seeds": list(seeds)}


# ---------------------------------------------------------------------------------------------------------
# Claims, fixed before the runs (docs/theory.md)
# ---------------------------------------------------------------------------------------------------------

#: tolerances, in nats for offsets and in balanced-error points (percent) otherwise
TOLERANCE = {
    "offset_gap": 0.2,          # 1: every found offset within 0.2 of log pi (centred), every seed
    "bayes_gap": 0.5,           # 1: balanced error at most 0.5 points above the Bayes error, every seed
    "vs_margin": 0.5,           # 2: AutoBalance at most 0.5 points above the best VS of the grid (mean over seeds)
    "no_split_gap": 2.0,        # 3: no split at least 2 points above the validation search (mean over seeds)
}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def judge_bayes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    gap = max(r["max_offset_gap"] for r in rows)
    err = max(100 * (r["balanced_error"]["autobalance"] - r["balanced_error"]["bayes"]) for r in rows)
    return [
        {"claim": "1a: found offsets = log pi (centred), every seed", "tolerance": f"max |gap| <= "
         f"{TOLERANCE['offset_gap']} nats", "measured": f"{gap:.3f}", "met": gap <= TOLERANCE["offset_gap"]},
        {"claim": "1b: balanced error of the found loss = Bayes error, every seed", "tolerance":
         f"<= +{TOLERANCE['bayes_gap']} points", "measured": f"{err:+.2f}", "met": err <= TOLERANCE["bayes_gap"]},
    ]


def vs_best(rows: list[dict[str, Any]]) -> str:
    """The VS loss of the grid with the lowest mean test error over the seeds (an oracle choice)."""
    names = [k for k in rows[0]["balanced_error"] if k.startswith("vs_")]
    return min(names, key=lambda k: sum(r["balanced_error"][k] for r in rows))


def paired(rows: list[dict[str, Any]], a: str, b: str, key: str = "balanced_error") -> tuple[float, float]:
    """Mean and standard error over seeds of ``error(a) - error(b)`` in points."""
    return mean_se([100 * (r[key][a] - r[key][b]) for r in rows])


def judge_separable(rows: list[dict[str, Any]], first: int, last: int) -> list[dict[str, Any]]:
    best = vs_best(rows)
    la_gap, la_se = paired(rows, "la", best)
    ab_gap, ab_se = paired(rows, "autobalance_validation", best)
    early = mean_se([100 * (r["by_step"][str(first)]["ce"] - r["by_step"][str(first)]["la"]) for r in rows])[0]
    late = mean_se([100 * (r["by_step"][str(last)]["ce"] - r["by_step"][str(last)]["la"]) for r in rows])[0]
    return [
        {"claim": f"2a: LA above the best VS ({best}) after {last} steps", "tolerance": "mean gap > 2 SE",
         "measured": f"{la_gap:+.2f} ± {la_se:.2f}", "met": la_gap > 2 * la_se},
        {"claim": f"2b: AutoBalance (Delta, l) at or below the best VS ({best})", "tolerance":
         f"mean gap <= +{TOLERANCE['vs_margin']} points", "measured": f"{ab_gap:+.2f} ± {ab_se:.2f}",
         "met": ab_gap <= TOLERANCE["vs_margin"]},
        {"claim": f"2c: LA's gain over CE fades with training (step {first} vs {last})", "tolerance":
         "gain smaller at the end", "measured": f"{early:.2f} -> {late:.2f}", "met": late < early},
    ]


def judge_split(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    gap, se = paired(rows, "autobalance_no_split", "autobalance_validation")
    split, split_se = paired(rows, "autobalance_no_split", "autobalance_split")
    return [
        {"claim": "3a: no split (upper on the fitted training data) far above the validation search",
         "tolerance": f">= +{TOLERANCE['no_split_gap']} points (mean)", "measured": f"{gap:+.2f} ± {se:.2f}",
         "met": gap >= TOLERANCE["no_split_gap"]},
        {"claim": "3b: the 80/20 split search below the no-split search", "tolerance": "mean difference > 0",
         "measured": f"{split:+.2f} ± {split_se:.2f}", "met": split > 0},
    ]


def judge_phase(phase: dict[str, Any]) -> list[dict[str, Any]]:
    wide = [100 * (c["la"] - c["vs_best"]) for c in phase["cells"] if c["dim"] >= 2 * c["n"]]
    tall = [100 * (c["la"] - c["vs_best"]) for c in phase["cells"] if 2 * c["dim"] <= c["n"]]
    if not wide or not tall:
        return []
    w, t = sum(wide) / len(wide), sum(tall) / len(tall)
    return [{"claim": "4: VS's gain over LA larger where d >= 2n than where n >= 2d", "tolerance": "mean over cells",
             "measured": f"{w:.2f} vs {t:.2f}", "met": w > t}]


# ---------------------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------------------


def claims_table(claims: list[dict[str, Any]]) -> list[str]:
    lines = ["| claim | tolerance (fixed before the run) | measured | met |", "|---|---|---|---|"]
    lines += [f"| {c['claim']} | {c['tolerance']} | {c['measured']} | {'met' if c['met'] else 'MISSED'} |"
              for c in claims]
    return lines


def error_table(rows: list[dict[str, Any]], names: Sequence[str], baseline: str) -> list[str]:
    lines = [f"| loss | balanced error % (mean ± SE, {len(rows)} seeds) | minus {baseline} (paired) |",
             "|---|---|---|"]
    for name in names:
        m, s = mean_se([100 * r["balanced_error"][name] for r in rows])
        d, ds = paired(rows, name, baseline)
        lines.append(f"| {name} | {m:.2f} ± {s:.2f} | {d:+.2f} ± {ds:.2f} |")
    return lines


def summary(results: dict[str, Any], command: str) -> str:
    out = ["# Where the answer is known: measured", "", f"Command: `{command}`", ""]
    if "bayes" in results:
        rows = results["bayes"]["rows"]
        out += ["## 1. Bayes-optimal offsets", "", *error_table(rows, ["ce", "la", "autobalance", "bayes"], "bayes"),
                "",
                "| seed | found offset (centred) | log pi (centred) | max gap | search s |", "|---|---|---|---|---|"]
        out += [f"| {r['seed']} | {', '.join(f'{v:.3f}' for v in r['found_offset'])} | "
                f"{', '.join(f'{v:.3f}' for v in r['known_offset'])} | {r['max_offset_gap']:.3f} | "
                f"{r['search_seconds']:.1f} |" for r in rows]
        out += ["", *claims_table(results["bayes"]["claims"]), ""]
    if "separable" in results:
        rows = results["separable"]["rows"]
        best = vs_best(rows)
        names = [n for n in rows[0]["balanced_error"]]
        out += ["## 2-3. The separable regime and the split", "", *error_table(rows, names, best), ""]
        steps = list(rows[0]["by_step"])
        out += ["| loss | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        for name in ["ce", "la", best, "autobalance_validation"]:
            vals = [mean_se([100 * r["by_step"][s][name] for r in rows])[0] for s in steps]
            out.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
        out += ["", "| search (upper data) | seed | delta | offset (centred) | upper objective first -> last | s |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            for where, f in r["found"].items():
                out.append(f"| {where} | {r['seed']} | {', '.join(f'{v:.2f}' for v in f['delta'])} | "
                           f"{', '.join(f'{v:.2f}' for v in f['offset'])} | {f['upper_first']:.4f} -> "
                           f"{f['upper_last']:.4f} | {f['seconds']:.1f} |")
        out += ["", *claims_table(results["separable"]["claims"]), ""]
    if "phase" in results:
        cells = results["phase"]["cells"]
        out += ["## 4. Phase plot (fixed losses)", "",
                "| n | d | CE % | LA % | best VS % (gamma) | LA - best VS | CE fits the training data |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {c['n']} | {c['dim']} | {100 * c['ce']:.2f} | {100 * c['la']:.2f} | {100 * c['vs_best']:.2f} "
                f"({c['vs_gamma'][3:]}) | {100 * (c['la'] - c['vs_best']):+.2f} | {c['fitted']:.0%} |" for c in cells]
        out += [""] + ([*claims_table(results["phase"]["claims"]), ""] if results["phase"]["claims"] else [])
    out += [f"Wall time: {results['seconds']:.0f} s ({results['threads']} thread)."]
    return "\n".join(out) + "\n"


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    if "bayes" in results:
        rows = results["bayes"]["rows"]
        k = len(rows[0]["known_offset"])
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        a.bar(range(k), rows[0]["known_offset"], color="lightgray", label="log pi (known optimum)")
        for r in rows:
            a.plot(range(k), r["found_offset"], "o", ms=5, alpha=0.7)
        a.plot([], [], "o", color="k", label="found, one dot per seed")
        a.set(xlabel="class (largest first)", ylabel="offset l (centred)", title="found offsets against log pi",
              xticks=range(k))
        a.legend(fontsize=8)
        trace = torch.tensor(rows[0]["trace"])
        for j in range(k):
            line, = b.plot(trace[:, j] - trace.mean(1), label=f"class {j}")
            b.axhline(rows[0]["known_offset"][j], color=line.get_color(), ls="--", lw=0.8)
        b.set(xlabel="hyper step", ylabel="offset (centred)", title="the search from cross-entropy (seed 0)")
        b.legend(fontsize=8)
        fig.tight_layout()
        made.append(out / "theory_bayes_offsets.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    if "separable" in results:
        rows = results["separable"]["rows"]
        best = vs_best(rows)
        steps = [int(s) for s in rows[0]["by_step"]]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        for name in ["ce", "la", best, "autobalance_validation", "autobalance_split", "autobalance_no_split"]:
            if name in rows[0]["balanced_error"]:
                a.plot(steps, [mean_se([100 * r["by_step"][str(s)][name] for r in rows])[0] for s in steps], "o-",
                       label=name)
        a.set(xscale="log", xlabel="gradient-descent steps", ylabel="balanced test error %",
              title=f"retrained losses, mean of {len(rows)} seeds")
        a.legend(fontsize=7)
        k = len(rows[0]["counts"])
        vs = preset_tables("vs", rows[0]["counts"], gamma=float(best[3:]), dtype=DTYPE).delta[0]
        vs = torch.log(vs) - torch.log(vs).mean()
        b.hlines(vs.tolist(), [j - 0.3 for j in range(k)], [j + 0.3 for j in range(k)], colors="k", lw=2,
                 label=f"{best} (best of the grid)")
        for i, where in enumerate(rows[0]["found"]):
            vals = [torch.log(torch.tensor(r["found"][where]["delta"])).tolist() for r in rows]
            for v in vals:
                b.plot([j + 0.12 * (i - 1) for j in range(k)], v, "o", color=f"C{i}", alpha=0.6)
            b.plot([], [], "o", color=f"C{i}", label=f"search, upper on {where}")
        b.set(xlabel="class (largest first)", ylabel="log delta (centred)", title="found delta, one dot per seed",
              xticks=range(k))
        b.legend(fontsize=7)
        fig.tight_layout()
        made.append(out / "theory_separable.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    if "phase" in results:
        cells = results["phase"]["cells"]
        sizes = sorted({c["n"] for c in cells})
        dims = sorted({c["dim"] for c in cells})
        grid = {(c["n"], c["dim"]): c for c in cells}
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        for ax, (title, fn) in zip(axes, [("LA, balanced error %", lambda c: 100 * c["la"]),
                                          ("best VS, balanced error %", lambda c: 100 * c["vs_best"]),
                                          ("LA minus best VS, points", lambda c: 100 * (c["la"] - c["vs_best"]))]):
            z = [[fn(grid[(n, d)]) for d in dims] for n in sizes]
            im = ax.imshow(z, origin="lower", cmap="viridis")
            for i in range(len(sizes)):
                for j in range(len(dims)):
                    ax.text(j, i, f"{z[i][j]:.1f}", ha="center", va="center", color="w", fontsize=8)
            ax.set_xticks(range(len(dims)), [str(d) for d in dims])
            ax.set_yticks(range(len(sizes)), [str(n) for n in sizes])
            ax.set(xlabel="dimension d", ylabel="training samples n", title=title)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        made.append(out / "theory_phase.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", default="bayes,separable,phase",
                        help="comma-separated: bayes, separable (studies 2 and 3), phase")
    parser.add_argument("--seeds", type=int, default=5, help="data draws per study (seeds 0, 1, ...)")
    parser.add_argument("--phase-sizes", default="50,100,200,400")
    parser.add_argument("--phase-dims", default="50,100,200,400")
    parser.add_argument("--phase-seeds", type=int, default=2)
    parser.add_argument("--bayes-between", type=int, default=BayesSetup.steps_between,
                        help="study 1: gradient-descent steps between hyper steps")
    parser.add_argument("--hyper-steps", type=int, default=SeparableSetup.hyper_steps, help="studies 2-3")
    parser.add_argument("--hyper-lr", type=float, default=SeparableSetup.hyper_lr, help="studies 2-3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("theory_out"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    studies = [s.strip() for s in args.studies.split(",") if s.strip()]
    unknown = set(studies) - {"bayes", "separable", "phase"}
    if unknown:
        parser.error(f"unknown studies {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results: dict[str, Any] = {"threads": args.threads}
    seeds = list(range(args.seeds))
    if "bayes" in studies:
        setup = BayesSetup(steps_between=args.bayes_between)
        meter = ErrorMeter(Mixture(setup.num_classes, setup.dim, setup.scale))
        rows = [study_bayes(setup, s, meter) for s in seeds]
        results["bayes"] = {"setup": setup.__dict__, "rows": rows, "claims": judge_bayes(rows)}
        print(*claims_table(results["bayes"]["claims"]), sep="\n", flush=True)
    if "separable" in studies:
        sep = SeparableSetup(hyper_steps=args.hyper_steps, hyper_lr=args.hyper_lr)
        meter = ErrorMeter(Mixture(sep.num_classes, sep.dim, sep.scale))
        rows = [study_separable(sep, s, meter=meter) for s in seeds]
        claims = judge_separable(rows, sep.record[0], sep.record[-1]) + judge_split(rows)
        results["separable"] = {"setup": {**sep.__dict__, "head_weight_decay": sep.head_weight_decay},
                                "rows": rows, "claims": claims}
        print(*claims_table(claims), sep="\n", flush=True)
    if "phase" in studies:
        phase = study_phase(SeparableSetup(), [int(v) for v in args.phase_sizes.split(",")],
                            [int(v) for v in args.phase_dims.split(",")], list(range(args.phase_seeds)))
        phase["claims"] = judge_phase(phase)
        results["phase"] = phase
        print(*claims_table(phase["claims"]), sep="\n", flush=True)
    results["seconds"] = time.perf_counter() - start
    command = "python benchmarks/theory.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    (args.out / "theory.json").write_text(json.dumps(results, indent=1))
    (args.out / "theory.md").write_text(summary(results, command.strip()))
    for path in plots(results, args.out):
        print("wrote", path)
    print(f"{results['seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
