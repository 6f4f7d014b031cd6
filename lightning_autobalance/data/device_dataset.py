"""An image dataset kept as one tensor on the training device, served in whole, transformed batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_autobalance.data.memory_dataset import InMemoryImageDataset
from lightning_autobalance.data.transforms import BatchTransform

__all__ = ["DeviceImageDataset", "keep_batch"]


def keep_batch(batch: list[Tensor]) -> list[Tensor]:
    """The collate function of a :class:`DeviceImageDataset` loader: the dataset already returns the batch."""
    return batch


class DeviceImageDataset(Dataset[tuple[Tensor, int]]):
    """Images and labels as two tensors on one device; a batch is cut and transformed there.

    A ``DataLoader`` over it (``num_workers=0``, ``collate_fn=keep_batch``) asks for a whole batch of indices at
    once (``__getitems__``); the dataset gathers those images on its device and applies a
    :class:`~lightning_autobalance.data.transforms.BatchTransform` to them, so training on a GPU never copies an
    image from the host. Samplers (random, :class:`~lightning_autobalance.data.fold_in.FoldInSampler`, Lightning's
    distributed sampler) work as with any map-style dataset.

    Args:
        images: ``(N, C, H, W)`` tensor (usually ``uint8``).
        targets: ``N`` integer labels.
        transform: The per-image transform to batch (a ``v2.Compose``), a ``BatchTransform``, or None.

    Raises:
        ValueError: ``images`` is not 4-D, or differs in length from ``targets``, or the transform cannot be batched.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> ds = DeviceImageDataset(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), [0, 1, 2, 0, 1, 2])
        >>> x, y = next(iter(DataLoader(ds, batch_size=4, collate_fn=keep_batch)))
        >>> tuple(x.shape), y.tolist()
        ((4, 1, 4, 4), [0, 1, 2, 0])
    """

    def __init__(self, images: Tensor, targets: Sequence[int] | np.ndarray | Tensor, transform: Any = None) -> None:
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise ValueError("DeviceImageDataset needs the images as one (N, C, H, W) tensor, got "
                             f"{type(images).__name__}{'' if not isinstance(images, Tensor) else tuple(images.shape)}")
        labels = torch.as_tensor(np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets, dtype=np.int64))
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {labels.shape[0]} targets")
        self.images = images
        self.labels = labels.to(images.device)
        self.targets = labels.numpy()
        self.transform = transform if transform is None or isinstance(transform, BatchTransform) \
            else BatchTransform(transform)

    @classmethod
    def from_memory(cls, dataset: InMemoryImageDataset) -> DeviceImageDataset:
        """The same images, labels and transform as an :class:`InMemoryImageDataset` of equal-sized images.

        Raises:
            ValueError: The images differ in size, or the transform cannot be batched.
        """
        images = dataset.images
        if not isinstance(images, Tensor):
            shapes = {tuple(t.shape) for t in images}
            if len(shapes) > 1:
                raise ValueError(f"images of {len(shapes)} different sizes cannot be kept as one tensor on the device")
            images = torch.stack(list(images)) if len(images) else torch.empty(0, 3, 32, 32, dtype=torch.uint8)
        return cls(images, dataset.targets, dataset.transform)

    @property
    def device(self) -> torch.device:
        """Where the images are."""
        return self.images.device

    def to(self, device: torch.device | str) -> DeviceImageDataset:
        """Move the images and labels to ``device`` (in place; nothing is copied when they are there already)."""
        device = torch.device(device)
        if device != self.images.device:
            self.images = self.images.to(device)
            self.labels = self.labels.to(device)
        return self

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitems__(self, indices: Sequence[int]) -> list[Tensor]:
        """The batch ``[images, labels]`` of ``indices``, transformed, on the dataset's device."""
        index = torch.as_tensor(indices, dtype=torch.long).to(self.device, non_blocking=True)
        images = self.images.index_select(0, index)
        if self.transform is not None:
            images = self.transform(images)
        return [images, self.labels.index_select(0, index)]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """One ``(image, label)``, for code that reads items one by one."""
        return self.__getitems__([index])[0][0], int(self.targets[index])
