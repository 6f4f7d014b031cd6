"""An image dataset held in memory as tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["InMemoryImageDataset"]


class InMemoryImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images and labels kept in memory, transformed per sample.

    Items are ``(transform(image), label)`` with ``label`` a Python int, so that the default
    collate function turns a batch of labels into an ``int64`` tensor.

    Args:
        images: One tensor of shape ``(N, C, H, W)`` or a sequence of ``N`` tensors of shape
            ``(C, H, W)`` (sizes may then differ), usually ``uint8``.
        targets: ``N`` integer class labels.
        transform: Optional callable applied to each image tensor.

    Raises:
        ValueError: ``images`` and ``targets`` differ in length.

    Example:
        >>> import torch
        >>> ds = InMemoryImageDataset(torch.zeros(4, 1, 8, 8), [0, 1, 1, 0])
        >>> x, y = ds[2]
        >>> tuple(x.shape), y
        ((1, 8, 8), 1)
    """

    def __init__(self, images: torch.Tensor | Sequence[torch.Tensor],
                 targets: Sequence[int] | np.ndarray | torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        labels = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
        if len(images) != labels.shape[0]:
            raise ValueError(f"got {len(images)} images but {labels.shape[0]} targets")
        self.images = images
        self.targets = labels
        self.transform = transform

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(image, label)`` of sample ``index``."""
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
