"""lightning-autobalance: learn the training loss for imbalanced data with PyTorch Lightning."""

__version__ = "0.1.0.dev0"
