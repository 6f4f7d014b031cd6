"""A datamodule shaped like the Lightning-Hydra template's MNIST one: the data is made in ``setup()`` and split at
random into train/val/test there, so nothing about the classes is known when the model is built.

The data: scikit-learn's 8x8 digits (offline), made long-tailed (class ``c`` keeps ``n_max * rho**(-c/9)`` images).
AutoBalance needs no change here: the mixin counts the classes of ``data_train`` at setup.
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning import LightningDataModule
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset, TensorDataset, random_split


class DigitsDataModule(LightningDataModule):
    def __init__(self, imbalance_ratio: float = 10.0,
                 train_val_test_split: tuple[float, float, float] = (0.7, 0.15, 0.15), batch_size: int = 32,
                 num_workers: int = 0, seed: int = 42) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.data_train: Dataset | None = None
        self.data_val: Dataset | None = None
        self.data_test: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return 10

    def setup(self, stage: str | None = None) -> None:
        if self.data_train is not None:
            return
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        keep = []
        for c in range(10):
            members = torch.nonzero(y == c).flatten()
            keep += members[: int(len(members) * self.hparams.imbalance_ratio ** (-c / 9))].tolist()
        dataset = TensorDataset(x[keep], y[keep])
        generator = torch.Generator().manual_seed(self.hparams.seed)
        self.data_train, self.data_val, self.data_test = random_split(
            dataset, list(self.hparams.train_val_test_split), generator=generator)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data_train, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data_val, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data_test, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
