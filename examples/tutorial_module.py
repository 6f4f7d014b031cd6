"""AutoBalance added to a tutorial-style LightningModule, with every changed line marked ``# AutoBalance``.

The module is written the way many public tutorials write one: ``forward`` returns ``log_softmax``, the loss is
``nll_loss``, the optimizer is SGD with a ``OneCycleLR`` schedule stepped every batch, and the data is a random
80/20 split of the training set. The changes (at most ten lines, the data split included):

* ``search_split`` replaces ``random_split``: a per-class split keeps every class in both parts (a random split of
  long-tailed data usually leaves a tail class out of the held-out part) and returns the training class counts;
* the mixin joins the bases, ``configure_autobalance`` declares the counts, ``autobalance_loss`` replaces
  ``nll_loss`` (log-probabilities are fine here: the search moves additive offsets, which a per-sample constant
  does not change; searching ``delta`` would need the raw scores, and the mixin warns if it sees log-probabilities
  then);
* ``AutoBalanceCallback`` joins the Trainer's callbacks with the held-out part as upper data.

``optimizer``, scheduler, checkpoints and logging are untouched. Runs in seconds on a CPU::

    python examples/tutorial_module.py [--epochs 10]
"""

from __future__ import annotations

import argparse
import tempfile

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_autobalance as ab  # AutoBalance


def long_tailed_digits(rho: float = 20.0, test_per_class: int = 30) -> tuple[TensorDataset, TensorDataset]:
    """Long-tailed training digits (class c keeps 150 * rho^(-c/9) images) and a balanced test set."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    train, test = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test += idx[:test_per_class].tolist()
        train += idx[test_per_class:test_per_class + max(3, int(150 * rho ** (-c / 9)))].tolist()
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


class LitDigits(ab.AutoBalanceMixin, pl.LightningModule):  # AutoBalance: the mixin joins the bases
    def __init__(self, class_counts, lr: float = 0.05, steps_per_epoch: int = 10, epochs: int = 10):  # AutoBalance
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.configure_autobalance(class_counts)  # AutoBalance: LA start, offsets searched

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.model(x), dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.autobalance_loss(self(x), y)  # AutoBalance: was F.nll_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        wrong = (self(x).argmax(dim=1) != y).float()
        errors = torch.stack([wrong[y == c].mean() for c in torch.unique(y)])
        self.log("test_balanced_error", errors.mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=0.1, epochs=self.hparams.epochs, steps_per_epoch=self.hparams.steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(argv: list[str] | None = None) -> tuple[LitDigits, pl.Trainer, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--root", default=None, help="checkpoint folder (default: a temporary one)")
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    full, test = long_tailed_digits()
    train, val, class_counts, _ = ab.data.search_split(full, fraction=0.2, seed=0)  # AutoBalance: was random_split
    train_loader = DataLoader(train, batch_size=32, shuffle=True)
    model = LitDigits(class_counts, steps_per_epoch=len(train_loader), epochs=args.epochs)  # AutoBalance: counts
    upper_loader = DataLoader(val, batch_size=32)  # AutoBalance: the held-out part tunes the loss
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=args.root or tempfile.mkdtemp(),
                         callbacks=[ab.AutoBalanceCallback(upper_dataloader=upper_loader)])  # AutoBalance
    trainer.fit(model, train_loader)
    metrics = trainer.test(model, DataLoader(test, batch_size=300), verbose=False)[0]
    print(f"learned tau: {float(model.autobalance.alpha()['tau']):+.3f}; balanced test error "
          f"{metrics['test_balanced_error']:.3f}")
    return model, trainer, metrics


if __name__ == "__main__":
    main()
