"""ResNet-32 for CIFAR, the network of the long-tail benchmarks."""

from __future__ import annotations

from lightning_autobalance.models.resnet_cifar import ResNetCIFAR

__all__ = ["ResNet32"]


class ResNet32(ResNetCIFAR):
    """ResNet-32 (five basic blocks a stage, 0.46 M parameters with 10 classes): :class:`ResNetCIFAR` with
    ``depth=32`` and its other arguments (``width=16`` is the standard network).

    Example:
        >>> import torch
        >>> net = ResNet32(num_classes=100)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__(num_classes=num_classes, depth=32, in_channels=in_channels, width=width)
