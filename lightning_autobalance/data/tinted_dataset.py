"""Grey images tinted by the colour of their group, held in memory: items ``(x, y, g)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["TintedImageDataset"]


class TintedImageDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """Grey images coloured by a per-group tint, with labels and groups.

    Item ``i`` is ``((palette[g_i] * image_i - mean) / std, y_i, g_i)``: the grey image (values in [0, 1]) times
    the RGB tint of its group (one colour per channel), so the background stays black and only the strokes carry
    the colour; then normalised by a scalar ``mean`` and ``std``. Labels and groups are Python ints, so the default
    collate function makes ``int64`` tensors of them. ``targets`` and ``groups`` are exposed as arrays (the
    callback reads the upper counts from them).

    Args:
        images: ``(N, 1, H, W)`` grey images in [0, 1].
        targets: ``N`` class labels.
        groups: ``N`` group indices into ``palette``.
        palette: ``(G, 3)`` RGB tints.
        mean: subtracted after tinting.
        std: divides after tinting.
        transform: optional callable applied to the normalised ``(3, H, W)`` tensor (e.g. a random crop).

    Example:
        >>> ds = TintedImageDataset(torch.ones(2, 1, 8, 8), [0, 1], [1, 0], torch.eye(3)[:2])
        >>> x, y, g = ds[0]
        >>> tuple(x.shape), y, g, x[:, 0, 0].tolist()
        ((3, 8, 8), 0, 1, [0.0, 1.0, 0.0])
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int] | np.ndarray, groups: Sequence[int] | np.ndarray,
                 palette: torch.Tensor, mean: float = 0.0, std: float = 1.0,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        labels = np.asarray(targets, dtype=np.int64)
        group_ids = np.asarray(groups, dtype=np.int64)
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape (N, 1, H, W); got {tuple(images.shape)}")
        if not len(images) == labels.shape[0] == group_ids.shape[0]:
            raise ValueError(f"got {len(images)} images, {labels.shape[0]} targets and {group_ids.shape[0]} groups")
        if palette.ndim != 2 or palette.shape[1] != 3:
            raise ValueError(f"palette must have shape (G, 3); got {tuple(palette.shape)}")
        if group_ids.size and (group_ids.min() < 0 or group_ids.max() >= palette.shape[0]):
            raise ValueError(f"groups must lie in [0, {palette.shape[0]})")
        if not std > 0:
            raise ValueError(f"std must be positive; got {std}")
        self.images = images
        self.targets = labels
        self.groups = group_ids
        self.palette = palette.float()
        self.mean, self.std = float(mean), float(std)
        self.transform = transform

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """Return ``(tinted image, label, group)`` of sample ``index``."""
        g = int(self.groups[index])
        image = (self.palette[g].view(3, 1, 1) * self.images[index] - self.mean) / self.std
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), g
