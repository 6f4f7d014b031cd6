"""The cost of one hyper step of the ``"head"`` method, in plain training steps, beside the default estimator's.

A plain step is forward, backward and an SGD step of ResNet-32 on a CIFAR-shaped batch of 128 (random images, a
long-tailed label draw). A hyper step is :func:`~lightning_autobalance.core.hypergradient.hypergradient` on that batch
(its logits already computed, as in training) and one upper batch of 128. Medians of ``--repeats`` timings, all in
one run (report the ratios, not the seconds).

Example::

    python benchmarks/head_cost.py --threads 1 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_autobalance.core.estimator import Estimator
from lightning_autobalance.core.hypergradient import Batch, FunctionalModel, hypergradient
from lightning_autobalance.core.losses import adjusted_cross_entropy
from lightning_autobalance.core.parametrization import Hierarchical
from lightning_autobalance.models import build_network


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    net = build_network("resnet32", num_classes=10)
    net.train()
    loss = Hierarchical(counts, preset="la")
    probs = torch.tensor(counts, dtype=torch.float) / sum(counts)
    x, y = torch.randn(args.batch_size, 3, 32, 32), torch.multinomial(probs, args.batch_size, replacement=True)
    xu, yu = torch.randn(args.batch_size, 3, 32, 32), torch.arange(args.batch_size) % 10
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=2e-4)

    def train_loss(f, t, g, tab):
        return adjusted_cross_entropy(f, t, *tab, group=g)

    def objective(f, t, g):
        return F.cross_entropy(f, t)

    def plain() -> None:
        opt.zero_grad()
        train_loss(net(x), y, None, loss.tables(loss.alpha())).backward()
        opt.step()

    with torch.no_grad():
        logits = net(x)
    rows = [("plain step", plain)]
    for name, est in [("default (one-step Neumann)", Estimator()),
                      ("head, memory 2048, 10 Newton steps", Estimator(method="head", weight_decay=2e-4)),
                      ("head, memory 2048, 3 Newton steps", Estimator(method="head", weight_decay=2e-4,
                                                                      head_steps=3))]:
        fmodel = FunctionalModel(net)

        def step(est=est, fmodel=fmodel) -> None:
            hypergradient(fmodel, loss.alpha(), loss.tables, train_loss, objective,
                          [Batch(x, y, logits=logits)], [Batch(xu, yu)], est)

        if est.method == "head":  # fill the feature memory as a run would before timing
            for _ in range(16):
                step()
        rows.append((name, step))
    seconds = {name: _median_seconds(fn, args.repeats) for name, fn in rows}
    base = seconds["plain step"]
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, medians of {args.repeats}")
    print("| piece | plain steps |\n|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value / base:.2f} |")


if __name__ == "__main__":
    main()
