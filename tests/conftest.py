"""Helpers shared by several test files."""

from __future__ import annotations

import torch
from torch import nn


def linear_module(*bases: type, in_features: int) -> type:
    """A minimal AutoBalance LightningModule class on the given bases (in that order): one linear layer,
    ``autobalance_loss`` as the training loss, SGD. ``cls(counts, **autobalance)`` builds one."""

    def __init__(self, counts, **autobalance):
        super(cls, self).__init__()
        self.layer = nn.Linear(in_features, len(counts))
        self.configure_autobalance(counts, **autobalance)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.autobalance_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    cls = type("LinearModule", bases, {"__init__": __init__, "forward": forward, "training_step": training_step,
                                       "configure_optimizers": configure_optimizers})
    return cls
