"""The CIFAR-style ResNet of He et al. (2016) with parameter-free (option A) shortcuts.

This is the ResNet-32 that the long-tail literature (LDAM-DRW, logit adjustment, CDT, AutoBalance) trains on CIFAR-10-LT
and CIFAR-100-LT. It is written to be safe under ``torch.func`` transforms: no operation writes in place into a tensor
that it did not create, so ``functional_call``, ``jvp`` and ``vjp`` all work on it, in train mode too when the BatchNorm
buffers are cloned inside the transformed function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_autobalance.models.basic_block import BasicBlockA

__all__ = ["ResNetCIFAR"]


class ResNetCIFAR(nn.Module):
    """CIFAR ResNet of depth 6n+2: three stages of n basic blocks, then pooling and a linear head.

    The stages have ``width``, ``2 * width`` and ``4 * width`` channels (16, 32, 64 by default) and work at full, half
    and quarter resolution. Shortcuts between stages are parameter-free (option A of He et al. 2016): stride-2
    subsampling plus zero-padded channels. Convolutions and the linear head use Kaiming-normal initialisation. Any input
    size works (the pooling is adaptive), though the architecture is meant for 32x32 images.

    Attributes:
        head: The final ``nn.Linear`` from pooled features to logits.
        num_features: Size of the pooled feature vector (``4 * width``).
        depth: Number of weighted layers (6n+2).

    Args:
        num_classes: Number of output logits.
        depth: Total depth, one of 20, 32, 44, 56, 110, ... (any 6n+2 with n >= 1).
        in_channels: Channels of the input images.
        width: Channels of the first stage.

    Raises:
        ValueError: If ``depth`` is not of the form 6n+2 with n >= 1, or a size is not positive.

    Example:
        >>> import torch
        >>> net = ResNetCIFAR(num_classes=10, depth=20)
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
        >>> net.forward_features(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 64])
    """

    def __init__(self, num_classes: int = 10, depth: int = 32, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError("ResNetCIFAR depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, 1202, ...); got "
                             f"{depth!r}")
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
            if value < 1:
                raise ValueError(f"{name} must be positive; got {value}")
        n = (depth - 2) // 6
        self.depth = depth
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_stage(width, width, n, stride=1)
        self.layer2 = self._make_stage(width, 2 * width, n, stride=2)
        self.layer3 = self._make_stage(2 * width, 4 * width, n, stride=2)
        self.num_features = 4 * width
        self.head = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlockA(in_planes, planes, stride)]
        layers += [BasicBlockA(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, num_features)`` of images ``(N, in_channels, H, W)``, before the linear head."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes) for images of shape (N, in_channels, H, W)."""
        return self.head(self.forward_features(x))
