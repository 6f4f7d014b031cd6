"""The basic residual block of the CIFAR ResNets, with a parameter-free (option A) shortcut."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlockA"]


class BasicBlockA(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an option-A identity shortcut.

    When the block changes resolution or width, the shortcut subsamples the input with stride
    2 (every other pixel) and pads the channel dimension with zeros, so it has no parameters.

    Args:
        in_planes: Channels of the input.
        planes: Channels of the output.
        stride: Stride of the first convolution (1 or 2).

    Raises:
        ValueError: If ``planes < in_planes`` (zero padding cannot remove channels).

    Example:
        >>> import torch
        >>> block = BasicBlockA(16, 32, stride=2)
        >>> block(torch.randn(2, 16, 32, 32)).shape
        torch.Size([2, 32, 16, 16])
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        extra = planes - in_planes
        if extra < 0:
            raise ValueError(f"option-A shortcut cannot reduce channels ({in_planes} -> {planes})")
        # Zero channels added before and after the input's channels.
        self.pad_channels = (extra // 2, extra - extra // 2)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Parameter-free shortcut: stride-s subsampling plus zero padding of channels."""
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels != (0, 0):
            # F.pad pads the last dimensions first: (W, W, H, H, C, C).
            x = F.pad(x, (0, 0, 0, 0, *self.pad_channels))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))
