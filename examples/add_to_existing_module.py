"""Turn an existing LightningModule into AutoBalance with a few changed lines.

The module and the training script below are plain PyTorch Lightning code for a long-tailed version of
scikit-learn's digits; the lines marked ``# AutoBalance`` are the only changes:

1. ``AutoBalanceMixin`` first in the bases of the module;
2. ``self.configure_autobalance(class_counts, ...)`` in ``__init__`` (the starting loss and what to search);
3. ``self.autobalance_loss(logits, y)`` instead of ``F.cross_entropy(logits, y)`` in ``training_step``;
4. ``AutoBalanceCallback(upper_dataloader=...)`` in the Trainer's callbacks, with a held-out ("upper") part of the
   training data, which the callback uses to tune the loss for a balanced error.

The loss parameters live in the module's state (its ``state_dict`` and checkpoints carry them) but are not
``nn.Parameter``\\ s, so ``configure_optimizers`` stays as it was. The search starts from logit adjustment
(``preset="la"``) and moves the per-class additive ``offset`` (the library's defaults, written out; add ``"delta"``
to ``search`` for the multiplicative part too). With a tail of a handful of images (one or two upper images per
tail class) this toy shows the wiring, not the method's gain: see ``docs/tuning.md`` and
``lightning-autobalance pipeline --config examples/digits_lt.yaml`` for comparisons with baselines. Runs in a few
seconds on a CPU::

    python examples/add_to_existing_module.py [--epochs 30]
"""

from __future__ import annotations

import argparse

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback, AutoBalanceMixin  # AutoBalance


def long_tailed_digits(rho: float = 20.0, test_per_class: int = 30, upper_fraction: float = 0.2, seed: int = 0):
    """Long-tailed digits: (train, upper, test) TensorDatasets and the training class counts.

    Class c keeps n_max * rho^(-c/9) training images; ``upper_fraction`` of each class (at least one image) is held
    out as upper data; the test set is balanced.
    """
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(digits.target == c)) for c in range(10)]
    n_max = min(len(idx) for idx in per_class) - test_per_class
    train, upper, test = [], [], []
    for c, idx in enumerate(per_class):
        test += idx[:test_per_class].tolist()
        kept = idx[test_per_class:test_per_class + max(2, int(n_max * rho ** (-c / 9)))]
        n_upper = max(1, round(upper_fraction * len(kept)))
        upper += kept[:n_upper].tolist()
        train += kept[n_upper:].tolist()
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std

    def subset(indices: list[int]) -> TensorDataset:
        return TensorDataset(x[indices], y[indices])

    counts = torch.bincount(y[train], minlength=10).tolist()
    return subset(train), subset(upper), subset(test), counts


class DigitsClassifier(AutoBalanceMixin, pl.LightningModule):  # AutoBalance: the mixin goes first
    def __init__(self, class_counts: list[int], lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, len(class_counts)))
        self.configure_autobalance(class_counts, preset="la", search=("offset",))  # AutoBalance
        self.test_correct = torch.zeros(len(class_counts))
        self.test_total = torch.zeros(len(class_counts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.autobalance_loss(self(x), y)  # AutoBalance: was F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        correct = (self(x).argmax(dim=1) == y).float()
        self.test_correct += torch.bincount(y, weights=correct, minlength=len(self.test_total)).cpu()
        self.test_total += torch.bincount(y, minlength=len(self.test_total)).cpu()

    def on_test_epoch_end(self) -> None:
        per_class_error = 1.0 - self.test_correct / self.test_total.clamp(min=1)
        self.log("test_balanced_error", per_class_error.mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    train, upper, test, counts = long_tailed_digits()
    train_loader = DataLoader(train, batch_size=32, shuffle=True)
    upper_loader = DataLoader(upper, batch_size=32, shuffle=True)  # AutoBalance: held-out upper data
    test_loader = DataLoader(test, batch_size=128)

    model = DigitsClassifier(counts)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[AutoBalanceCallback(upper_dataloader=upper_loader)],  # AutoBalance
    )
    trainer.fit(model, train_loader)
    metrics = trainer.test(model, test_loader, verbose=False)[0]

    tables = model.autobalance_tables()  # the learned loss: z_k = f_k + offset_k (delta_k = 1)
    print(f"training counts per class: {counts}")
    print(f"learned offset: {[round(v, 3) for v in tables.offset[0].tolist()]}")
    print(f"balanced test error: {metrics['test_balanced_error']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
