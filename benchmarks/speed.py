"""Speed and memory of a hyper step, in units of one plain training step, measured in one process.

Prints (and with --out writes as markdown):

1. the cost of one hyper step per method (ResNet-32, CIFAR-shaped batch 128 by default), as a median ratio to a
   plain training step (forward, backward, SGD) timed in the same process, interleaved; also with a searched
   per-class augmentation (its hypergradient through the inputs, ``hypergradient(augmentation=...)``);
2. the authors' protocol (Neumann, eta 1, J 5, 10 training and 10 upper batches) as a configuration;
3. the wall time of a search epoch relative to a plain epoch, both through ``pytorch_lightning.Trainer`` with
   and without :class:`~lightning_autobalance.AutoBalanceCallback` at its defaults, at the interval its automatic
   schedule picks for a 300-epoch (and a 12-epoch) CIFAR-10-LT search;
4. the whole-run cost of a one-phase run (``--one-phase``): a fit of several epochs whose training data is drawn
   through a :class:`~lightning_autobalance.data.FoldInSampler` with the callback at its defaults, over a plain fit
   of the same epochs on the same data, both through ``Trainer`` in one process, interleaved;
5. on CUDA, the peak memory of a hyper step relative to a plain step;
6. how the default hyper step's cost grows with the number of classes and the network's depth.

Usage::

    python benchmarks/speed.py                         # everything, CPU, about 10 minutes on 2 cores
    python benchmarks/speed.py --quick                 # fewer repeats
    python benchmarks/speed.py --epoch-only            # only the search-epoch table
    python benchmarks/speed.py --one-phase-only        # only the one-phase run's cost
    python benchmarks/speed.py --quick --steps-only    # only the hyper-step table (no authors' protocol)
    python benchmarks/speed.py --device cuda --out docs/speed_gpu.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback, AutoBalanceMixin
from lightning_autobalance.core.augment_parametrization import AugmentParameters
from lightning_autobalance.core.hypergradient import Batch, FunctionalModel, InputAugmentation, hypergradient
from lightning_autobalance.core.objectives import BalancedCrossEntropy
from lightning_autobalance.data import FoldInSampler, search_split
from lightning_autobalance.data.fold_in import fold_in_epoch
from lightning_autobalance.lightning.callback import auto_interval
from lightning_autobalance.models import ResNetCIFAR

METHODS: dict[str, dict[str, Any]] = {
    "default (neumann J=0, logits difference, 1+1 batches)": {},
    "neumann J=0, jvp": {"product": "jvp"},
    "unroll (exact one step, jvp)": {"method": "unroll", "eta": 0.1, "product": "jvp"},
    "neumann J=5, eta 0.1, Gauss-Newton": {"terms": 5, "eta": 0.1},
    "neumann J=5, eta 0.1, Hessian": {"terms": 5, "eta": 0.1, "curvature": "hessian"},
    "cg 5 iterations, Gauss-Newton, damping 1": {"method": "cg", "cg_iterations": 5, "damping": 1.0},
    "default + augmentation searched (flip, shift; per class)": {"augment": "flip+shift"},
    "default + augmentation searched (all five ops, gated noise)": {"augment": "mix+flip+shift+erase+noise"},
}
AUTHORS = {"terms": 5, "eta": 1.0, "curvature": "hessian", "train_batches": 10, "upper_batches": 10}


class Net(AutoBalanceMixin, pl.LightningModule):
    def __init__(self, num_classes: int = 10, depth: int = 32, channels_last: bool = True, lr: float = 0.1) -> None:
        super().__init__()
        self.net = ResNetCIFAR(num_classes, depth=depth)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        counts = [max(int(500 * 100 ** (-c / max(num_classes - 1, 1))), 5) for c in range(num_classes)]
        self.configure_autobalance(counts, preset="la")
        self.autobalance_validate = False
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.autobalance_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=2e-4)


def batch(n: int, k: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).to(device), torch.randint(0, k, (n,), generator=g).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def step_costs(model: Net, device: torch.device, k: int, bs: int, repeats: int,
               configs: dict[str, dict[str, Any]],
               report: Callable[[str, float, float | None], None] | None = None,
               ) -> dict[str, tuple[float, float | None]]:
    """Median ratio (hyper step / plain step) and, on CUDA, the peak-memory ratio for each configuration."""
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    params = model.autobalance
    objective = BalancedCrossEntropy(params.class_counts[0].tolist())
    batches = [batch(bs, k, device, s) for s in range(20)]
    state: dict[str, Any] = {}

    def plain() -> None:
        x, y = batches[0]
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        state["logits"] = logits.detach()
        model.autobalance_loss(logits, y).backward()
        opt.step()

    def hyper(cfg: dict[str, Any]) -> Callable[[], None]:
        cfg = dict(cfg)
        n_train, n_upper = cfg.pop("train_batches", 1), cfg.pop("upper_batches", 1)
        ops = cfg.pop("augment", None)  # a searched augmentation: its hypergradient through the inputs too
        gated = "noise" if ops is not None and "noise" in ops else ""
        aug = None if ops is None else AugmentParameters(params.class_counts.cpu(), {"ops": ops, "gated": gated},
                                                         kind="class").to(device)

        def run() -> None:
            fm = FunctionalModel(model, lambda m, x: m.autobalance_forward(x))
            x, y = batches[0]
            train = [Batch(x, y, logits=state["logits"])] + [Batch(*batches[1 + i]) for i in range(n_train - 1)]
            upper = [Batch(*batches[10 + i % 10]) for i in range(n_upper)]
            augmentation = None if aug is None else InputAugmentation(
                aug.alpha(), aug.settings, [aug.next_draws(b.inputs.shape, device) for b in train], aug.tables)
            hypergradient(fm, params.alpha(), params.tables, model.autobalance_loss_from_tables, objective, train,
                          upper, augmentation=augmentation, **cfg)

        return run

    for _ in range(3):  # warm-up
        plain()
    results: dict[str, tuple[float, float | None]] = {}
    for name, cfg in configs.items():
        run = hyper(cfg)
        run()
        ratios = []
        reps = 1 if cfg.get("train_batches", 1) > 1 else repeats  # the authors' protocol: one (long) repeat
        for _ in range(reps):
            t_plain = timed(plain, device)
            t_hyper = timed(run, device)
            ratios.append(t_hyper / t_plain)
        mem = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            plain()
            sync(device)
            plain_peak = torch.cuda.max_memory_allocated(device) - base
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            run()
            sync(device)
            mem = (torch.cuda.max_memory_allocated(device) - base) / max(plain_peak, 1)
        results[name] = (statistics.median(ratios), mem)
        if report is not None:
            report(name, *results[name])
    return results


def epoch_overhead(device: torch.device, steps: int, repeats: int, every: int | None) -> float:
    """Median wall time of a search "epoch" (``steps`` optimizer steps) over a plain one, via Trainer."""
    n = 128 * steps
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    upper = TensorDataset(torch.randn(1024, 3, 32, 32, generator=g), torch.randint(0, 10, (1024,), generator=g))
    accelerator = "gpu" if device.type == "cuda" else "cpu"

    def fit(with_callback: bool) -> float:
        pl.seed_everything(0, verbose=False)
        model = Net()
        cbs = []
        if with_callback:
            # holdout 0: the held-back check runs once at the end of a search (one forward pass over the training
            # data), not every epoch; timed here is the per-epoch cost of the hyper steps
            kwargs = {"warmup_fraction": 0.0, "upper_dataloader": DataLoader(upper, batch_size=128, shuffle=True),
                      "holdout": 0}
            if every is not None:
                kwargs["every_n_steps"] = every
            cbs.append(AutoBalanceCallback(**kwargs))
        trainer = pl.Trainer(max_epochs=1, accelerator=accelerator, devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=cbs)
        loader = DataLoader(data, batch_size=128, shuffle=True)
        t = time.perf_counter()
        trainer.fit(model, loader)
        return time.perf_counter() - t

    fit(True)  # warm-up (lazy imports, allocator)
    ratios = []
    for _ in range(repeats):
        plain = fit(False)
        search = fit(True)
        ratios.append(search / plain)
    return statistics.median(ratios)


def one_phase_overhead(device: torch.device, epochs: int, steps: int, repeats: int) -> tuple[float, int]:
    """Median wall time of a one-phase run (``epochs`` epochs of ``steps`` optimizer steps, the fold-in where the
    pipeline puts it by default, the callback's defaults) over a plain run of the same epochs on the same data, via
    Trainer; and its hyper steps."""
    n = 128 * steps
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (n,), generator=g)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), labels)
    split = search_split(labels)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    made = 0

    def fit(one_phase: bool) -> float:
        nonlocal made
        pl.seed_everything(0, verbose=False)
        model = Net()
        cbs = []
        if one_phase:
            sampler = FoldInSampler(split.lower, split.upper, fold_in_epoch=fold_in_epoch(epochs))
            loader = DataLoader(data, batch_size=128, sampler=sampler)
            upper = DataLoader(torch.utils.data.Subset(data, split.upper.tolist()), batch_size=128, shuffle=True)
            cbs.append(AutoBalanceCallback(upper_dataloader=upper))
        else:
            loader = DataLoader(data, batch_size=128, shuffle=True)
        trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=cbs)
        t = time.perf_counter()
        trainer.fit(model, loader)
        if cbs:
            made = cbs[0].hyper_steps
        return time.perf_counter() - t

    fit(True)  # warm-up
    ratios = []
    for _ in range(repeats):
        plain = fit(False)
        ratios.append(fit(True) / plain)
    return statistics.median(ratios), made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epoch-steps", type=int, default=60, help="optimizer steps of the timed epoch")
    parser.add_argument("--epoch-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip the scaling table")
    parser.add_argument("--epoch-only", action="store_true", help="only the search-epoch overhead table")
    parser.add_argument("--steps-only", action="store_true",
                        help="only the hyper-step table, without the authors' protocol (minutes on a CPU)")
    parser.add_argument("--schedules", type=int, nargs="+", default=[300, 12],
                        help="search lengths in epochs whose automatic interval is timed")
    parser.add_argument("--one-phase-only", action="store_true", help="only the one-phase run's cost")
    parser.add_argument("--one-phase-epochs", type=int, default=6)
    parser.add_argument("--one-phase-steps", type=int, default=20, help="optimizer steps per epoch of that run")
    parser.add_argument("--out", default=None, help="write the tables to this markdown file")
    args = parser.parse_args()
    if args.quick:  # fewer repeats and steps (never more than asked for), no scaling table
        args.repeats, args.epoch_repeats, args.epoch_steps = min(args.repeats, 3), 1, min(args.epoch_steps, 40)
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
             f"ResNet-32, batch {args.batch_size}, channels_last", ""]

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    if args.one_phase_only:
        ratio, made = one_phase_overhead(device, args.one_phase_epochs, args.one_phase_steps, args.epoch_repeats)
        emit("| one-phase run | hyper steps | run / plain run |")
        emit("|---|---|---|")
        emit(f"| {args.one_phase_epochs} epochs of {args.one_phase_steps} steps, fold-in at epoch "
             f"{fold_in_epoch(args.one_phase_epochs)}, defaults | {made} | {ratio:.3f} |")
        emit(f"(whole fits through Trainer, median of {args.epoch_repeats}, interleaved with the plain fit)")
        if args.out:
            with open(args.out, "w") as fh:
                fh.write("\n".join(lines) + "\n")
        return
    if not args.epoch_only:
        emit("| hyper step | cost (plain steps) | peak memory (plain steps) |")
        emit("|---|---|---|")
        configs = dict(METHODS) if args.steps_only else {
            **METHODS, "authors' protocol (neumann J=5, eta 1, Hessian, 10+10 batches)": AUTHORS}
        costs = step_costs(Net(), device, 10, args.batch_size, args.repeats, configs,
                           lambda label, ratio, mem: emit(f"| {label} | {ratio:.2f} | "
                                                          f"{'n/a (CPU)' if mem is None else f'{mem:.2f}'} |"))
        emit()
        if args.steps_only:
            if args.out:
                with open(args.out, "w") as fh:
                    fh.write("\n".join(lines) + "\n")
            return
    # The interval the callback's automatic schedule picks for a CIFAR-10-LT search (9,925 lower images, batch 128:
    # 78 optimizer steps an epoch, the first 20% warm-up; 2,481 upper images: 20 upper batches a pass).
    emit("| search run (CIFAR-10-LT sized, default schedule) | interval chosen | search epoch / plain epoch |")
    emit("|---|---|---|")
    for epochs in args.schedules:
        window = int(0.8 * epochs * 78)
        every = auto_interval(window, AutoBalanceCallback().schedule.target_hyper_steps, 20)
        ratio = epoch_overhead(device, args.epoch_steps, args.epoch_repeats, every)
        emit(f"| {epochs} epochs ({window // every} hyper steps) | every {every} steps | {ratio:.3f} |")
    emit(f"({args.epoch_steps}-step epochs timed through Trainer, median of {args.epoch_repeats})")
    if not args.epoch_only:
        authors_epoch = 1.0 + costs[next(k for k in costs if k.startswith("authors"))][0] / 20.0
        emit(f"authors' protocol every 20 steps, estimated from its step cost: {authors_epoch:.2f} plain epochs")
    if not args.quick and not args.epoch_only:
        emit()
        emit("| classes K | depth | default hyper step (plain steps) |")
        emit("|---|---|---|")
        for k, depth in ((10, 32), (100, 32), (1000, 32), (10, 56), (10, 110)):
            r = step_costs(Net(k, depth), device, k, args.batch_size, max(3, args.repeats // 2),
                           {"default": {}})["default"][0]
            emit(f"| {k} | {depth} | {r:.2f} |")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
