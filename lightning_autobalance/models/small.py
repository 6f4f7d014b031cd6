"""A small multilayer perceptron for 8x8 grey digits (scikit-learn's ``load_digits``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsNet"]


class DigitsNet(nn.Module):
    """Multilayer perceptron: flatten, ``depth`` hidden layers of ``hidden`` units, linear head.

    Each hidden layer is ``Linear -> [BatchNorm1d] -> ReLU -> [Dropout]``; with batch norm the linear layers drop their
    (redundant) bias. With ``depth=0`` the network is a linear model on the flattened input. It is small enough for fast
    tests and CPU examples and, like the CIFAR ResNets, safe under ``torch.func`` transforms.

    Attributes:
        features: The hidden layers (``nn.Sequential``; empty when ``depth=0``).
        head: The final ``nn.Linear`` from features to logits.
        num_features: Size of the feature vector fed to ``head``.

    Args:
        num_classes: Number of output logits.
        in_features: Number of input features after flattening (64 for 8x8 images).
        hidden: Units of each hidden layer.
        depth: Number of hidden layers (0 or more).
        dropout: Dropout probability after each hidden activation (0 disables it).
        batch_norm: Whether to put ``BatchNorm1d`` after each hidden linear layer.

    Raises:
        ValueError: If a size is not positive, ``depth`` is negative or ``dropout`` is outside [0, 1).

    Example:
        >>> import torch
        >>> net = DigitsNet(num_classes=10)
        >>> net(torch.randn(5, 1, 8, 8)).shape
        torch.Size([5, 10])
        >>> net.forward_features(torch.randn(5, 64)).shape
        torch.Size([5, 128])
    """

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 128, depth: int = 2,
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("in_features", in_features), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"{name} must be positive; got {value}")
        if depth < 0:
            raise ValueError(f"depth must be 0 or more; got {depth}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        self.num_classes = num_classes
        self.in_features = in_features
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers.append(nn.Linear(width, hidden, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.features = nn.Sequential(*layers)
        self.num_features = width
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Activations ``(N, num_features)`` of the last hidden layer for inputs that flatten to ``(N, in_features)``
        (``(N, 1, 8, 8)`` or ``(N, 64)``)."""
        return self.features(torch.flatten(x, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes)."""
        return self.head(self.forward_features(x))
