"""AutoBalance in a module shaped like the public Lightning CIFAR-10 tutorial, SWA subclass included.

The shape: ``forward`` returns ``log_softmax`` and the loss is ``nll_loss``; SGD with a ``OneCycleLR`` schedule
stepped every batch; a random 80/20 split of the training set into plain DataLoaders; then a stochastic weight
averaging module, a subclass whose ``__init__`` takes the trained network and calls a bare ``super().__init__()``.
The data is scikit-learn's 8x8 digits made long-tailed (offline, seconds on a CPU) instead of CIFAR-10.

The lines marked ``# autobalance`` are the only changes (``+1`` added, ``~1`` changed): the import, the mixin in
the bases, the two training losses, ``find_loss`` (the search on a copy of the module, on a per-class split of the
training data; the loss the held-back check decides on is set on the module, frozen, before the tutorial's own fit
trains the model to keep on all the training data), and one line that gives the SWA module that loss. No class
counts: the mixin finds them from the training split's labels. ``log_softmax`` stays: the default search moves
additive offsets, which a per-sample constant does not change (the mixin warns only if ``delta`` is searched). ::

    python examples/tutorial_swa.py [--epochs 8 --swa-epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule, Trainer, seed_everything
from sklearn.datasets import load_digits
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader, TensorDataset, random_split
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_autobalance import AutoBalanceMixin, find_loss  # autobalance: +1


def long_tailed_digits(rho: float = 10.0, test_per_class: int = 30) -> tuple[TensorDataset, TensorDataset]:
    """Long-tailed training digits (class c keeps ``150 * rho**(-c/9)`` images) and a balanced test set."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    train, test = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test += idx[:test_per_class].tolist()
        train += idx[test_per_class:test_per_class + int(150 * rho ** (-c / 9))].tolist()
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def create_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class LitDigits(AutoBalanceMixin, LightningModule):  # autobalance: ~1
    def __init__(self, lr: float = 0.05, steps_per_epoch: int = 10, epochs: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.model(x), dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.autobalance_loss(logits, y)  # autobalance: ~1 (was F.nll_loss(logits, y))
        self.log("train_loss", loss)
        return loss

    def evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", F.nll_loss(logits, y), prog_bar=True)
        self.log(f"{stage}_acc", multiclass_accuracy(logits.argmax(dim=1), y, num_classes=10, average="macro"),
                 prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluate(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = OneCycleLR(optimizer, 0.1, epochs=self.trainer.max_epochs,
                               steps_per_epoch=self.hparams.steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SWADigits(LitDigits):
    def __init__(self, trained_model: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters("lr")
        self.model = trained_model
        self.swa_model = AveragedModel(self.model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.swa_model(x), dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.autobalance_loss(F.log_softmax(self.model(x), dim=1), y)  # autobalance: ~1 (was F.nll_loss)
        self.log("train_loss", loss)
        return loss

    def on_train_epoch_end(self) -> None:
        self.swa_model.update_parameters(self.model)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)

    def on_train_end(self) -> None:
        update_bn(self.trainer.train_dataloader, self.swa_model, device=self.device)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--swa-epochs", type=int, default=3)
    parser.add_argument("--root", default=None, help="checkpoint folder (default: a temporary one)")
    args = parser.parse_args(argv)
    root = args.root or tempfile.mkdtemp()
    seed_everything(7, verbose=False)
    full, test = long_tailed_digits()
    train_set, val_set = random_split(full, [0.8, 0.2], generator=torch.Generator().manual_seed(42))
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    val_loader, test_loader = DataLoader(val_set, batch_size=64), DataLoader(test, batch_size=300)

    model = LitDigits(lr=0.05, steps_per_epoch=len(train_loader))
    settings = dict(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=root)
    found = find_loss(model, train_loader, val_loader, trainer_kwargs=settings)  # autobalance: +1
    trainer = Trainer(**settings)
    trainer.fit(model, train_loader, val_loader)
    (tested,) = trainer.test(model, test_loader, verbose=False)

    swa_model = SWADigits(model.model, lr=0.01)
    swa_model.autobalance_like(model, freeze=True)  # autobalance: +1 (train the SWA phase on the loss found)
    swa_trainer = Trainer(max_epochs=args.swa_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, default_root_dir=root)
    swa_trainer.fit(swa_model, train_loader, val_loader)
    (swa_tested,) = swa_trainer.test(swa_model, test_loader, verbose=False)
    print(f"the held-back check: {found.decision['decision']} ({found.decision['reason']}); balanced test accuracy "
          f"{tested['test_acc']:.3f}, after SWA {swa_tested['test_acc']:.3f}")
    return {"model": model, "trainer": trainer, "swa_model": swa_model, "swa_trainer": swa_trainer,
            "test": tested, "swa_test": swa_tested, "found": found}


if __name__ == "__main__":
    main()
