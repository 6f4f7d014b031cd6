"""A short CIFAR-style search on one GPU under each mixed precision: does it run, stay finite, and what it costs.

For each precision (``16-mixed``, ``bf16-mixed``, ``32-true``): ResNet-32 on CIFAR-10-LT (rho 100) from the JPEG
copy when ``--data`` points at its extracted folder (``train/<class>/*.jpg``, ``test/...``), else on random
CIFAR-shaped data; a search of ``--epochs`` epochs with :class:`~lightning_autobalance.AutoBalanceCallback`
(hyper steps from the first step, every 10 steps), then the balanced test error of the searched model.
Prints a markdown table and writes it with ``--out``.

    python benchmarks/gpu_search.py --data /tmp/cifar10-jpeg --epochs 3 --out gpu_search.md
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback
from lightning_autobalance.lightning.classifier import ImbalancedClassifier


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def synthetic() -> pl.LightningDataModule:
    counts = [int(5000 * 100 ** (-c / 9)) for c in range(10)]
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.randn(len(y), 3, 32, 32, generator=g)
    yu = torch.arange(1000) % 10
    xu = torch.randn(1000, 3, 32, 32, generator=g)
    dm = pl.LightningDataModule.from_datasets(TensorDataset(x, y), TensorDataset(xu, yu), TensorDataset(xu, yu),
                                              batch_size=128, num_workers=4)
    dm.class_counts, dm.num_classes = counts, 10
    dm.upper_dataloader = lambda: DataLoader(TensorDataset(xu, yu), batch_size=128, shuffle=True)
    return dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--precisions", nargs="*", default=["16-mixed", "bf16-mixed", "32-true"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--limit-batches", type=float, default=1.0, help="for a quick smoke run")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = [f"device: {name}, torch {torch.__version__}, pytorch_lightning "
            f"{pl.__version__}; data: {'CIFAR-10-LT (JPEG copy)' if args.data else 'random CIFAR-shaped'}; "
            f"{args.epochs} search epochs, ResNet-32, batch 128", "",
            "| precision | epoch time (s, median) | hyper steps | skipped | loss parameters finite | "
            "balanced test error (%) |", "|---|---|---|---|---|---|"]
    for precision in args.precisions:
        pl.seed_everything(0, verbose=False)
        if args.data:
            from lightning_autobalance.data import LongTailImageFolder

            dm = LongTailImageFolder(root=args.data, search_split=True, batch_size=128, num_workers=6,
                                     cache_in_memory=True, val_source="none")
        else:
            dm = synthetic()
        model = ImbalancedClassifier("resnet32", num_classes=dm.num_classes, class_counts=dm.class_counts,
                                     channels_last=True)
        timer = EpochTimer()
        callback = AutoBalanceCallback(every_n_steps=10, start_step=0)
        trainer = pl.Trainer(max_epochs=args.epochs, accelerator=args.accelerator, devices=1,
                             precision=precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[callback, timer], limit_val_batches=0,
                             limit_train_batches=args.limit_batches, limit_test_batches=args.limit_batches)
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm, verbose=False)
        finite = all(bool(torch.isfinite(t).all()) for t in model.autobalance.alpha().values())
        error = 100 * model.test_report.get("balanced_error", float("nan"))
        times = sorted(timer.times)
        rows.append(f"| {precision} | {times[len(times) // 2]:.2f} | {callback.hyper_steps} | "
                    f"{callback.skipped_steps} | {finite} | {error:.2f} |")
        print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
