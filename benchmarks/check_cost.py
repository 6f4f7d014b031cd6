"""Cost and accuracy of the held-back check's two head solves (lightning_autobalance/lightning/check.py).

A synthetic problem the size of the Digits-LT check (900 training rows, a 1024-wide head, 10 classes, so that the
head's 10,250 parameters are solved by conjugate gradient, not densely): the two upper-objective values and the
wall time of :func:`~lightning_autobalance.lightning.check.compare_losses` for several Newton and CG budgets, one
thread.
The values at the library's budget (10 Newton steps, 50 CG iterations) should equal those of a far larger budget.

    python benchmarks/check_cost.py

With ``--config`` and ``--run`` (a finished ``quality.py`` seed folder), the whole check as a fit runs it instead
(:func:`~lightning_autobalance.lightning.check.check_found_loss` on the search's ``last.ckpt``: the training rows'
features, the fit rule's training error, the two head solves) against one plain training epoch of the same model on
the same lower split, alternately, medians of ``--repeats``; the check's share of a plain training is that ratio over
the config's epochs::

    python benchmarks/check_cost.py --config benchmarks/configs/cifar10_lt16_augment.yaml \
        --run runs/quality/cifar10_lt16_augment/seed_0
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_autobalance.core.losses import LossTables, adjusted_cross_entropy
from lightning_autobalance.lightning.check import compare_losses


def in_fit(config: Path, run: Path, repeats: int) -> None:
    """The check's wall time against one plain training epoch (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quality

    from lightning_autobalance.core.head import optimizer_head_weight_decay
    from lightning_autobalance.lightning.check import check_found_loss
    from lightning_autobalance.runner.pipeline import _clone, _counts, _data

    torch.set_num_threads(1)
    model_t, dm_t, trainer_kwargs, pipeline_kwargs = quality._templates(config, 0, ())
    epochs = int(pipeline_kwargs.get("search_epochs") or trainer_kwargs.get("max_epochs") or 1)
    split = _data(dm_t, search_split=True)
    split.setup("fit")
    model = _clone(model_t, **_counts(model_t, split), loss="autobalance")
    state = torch.load(run / "search" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    params = model.autobalance_parameters()
    start = {k: torch.zeros_like(v) for k, v in params.alpha().items()}
    optimizer = model.optimizer_fn([q for q in model.parameters() if q.requires_grad])
    decay = optimizer_head_weight_decay(model, optimizer.param_groups, None)[1] or 5e-4

    def objective(f, t, g):
        return F.cross_entropy(f, t)

    checks, epoch_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        check_found_loss(model, params, start, split.train_dataloader(), split.upper_dataloader(), objective, decay)
        checks.append(time.perf_counter() - t0)
        trainer = quality.plain_trainer(trainer_kwargs, 1, run / "check_cost")
        t0 = time.perf_counter()
        plain = _clone(model_t, **_counts(model_t, split), loss="autobalance")
        plain.freeze_loss()  # a plain training: the start loss, nothing searched
        trainer.fit(plain, datamodule=split)
        epoch_times.append(time.perf_counter() - t0)
    ratio = statistics.median(c / e for c, e in zip(checks, epoch_times))
    print(f"check {statistics.median(checks):.2f} s, one plain epoch {statistics.median(epoch_times):.2f} s "
          f"(medians of {repeats}, alternating); the check is {ratio:.2f} plain epochs = {ratio / epochs:.4f} of a "
          f"{epochs}-epoch plain training")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.config is not None:
        in_fit(args.config, args.run, args.repeats)
        return
    torch.manual_seed(0)
    torch.set_num_threads(1)
    n, d, k = 900, 1024, 10
    y = torch.randint(0, k, (n,))
    x = torch.randn(n, d) * 0.3 + F.one_hot(y, d).float() * 2
    yc = torch.arange(40) % k
    xc = torch.randn(40, d) * 0.3 + F.one_hot(yc, d).float() * 2

    def train_loss(f, t, g, tables):
        return adjusted_cross_entropy(f, t, *tables, group=g)

    def objective(f, t, g):
        return F.cross_entropy(f, t)

    start = LossTables(torch.ones(1, k), torch.zeros(1, k), torch.ones(1, k))
    found = LossTables(torch.ones(1, k), torch.linspace(-1, 1, k)[None], torch.ones(1, k))
    theta = torch.zeros(k * (d + 1))
    print("| Newton steps | CG iterations | seconds | objective (start loss) | objective (found loss) |")
    print("|---|---|---|---|---|")
    for steps, cg in [(30, 200), (10, 200), (10, 50), (5, 50)]:
        t0 = time.perf_counter()
        values = compare_losses(x, y, None, xc, yc, None, [start, found], train_loss, objective, theta, k, True,
                                5e-4, steps=steps, cg_iterations=cg)
        print(f"| {steps} | {cg} | {time.perf_counter() - t0:.2f} | {float(values[0]):.6f} | {float(values[1]):.6f} |")


if __name__ == "__main__":
    main()
