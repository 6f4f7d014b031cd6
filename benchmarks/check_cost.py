"""Cost and accuracy of the held-back check's two head solves (lightning_autobalance/lightning/check.py).

A synthetic problem the size of the Digits-LT check (900 training rows, a 1024-wide head, 10 classes, so that the
head's 10,250 parameters are solved by conjugate gradient, not densely): the two upper-objective values and the
wall time of :func:`~lightning_autobalance.lightning.check.compare_losses` for several Newton and CG budgets, one
thread.
The values at the library's budget (10 Newton steps, 50 CG iterations) should equal those of a far larger budget.

    python benchmarks/check_cost.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from lightning_autobalance.core.losses import LossTables, adjusted_cross_entropy
from lightning_autobalance.lightning.check import compare_losses


def main() -> None:
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
