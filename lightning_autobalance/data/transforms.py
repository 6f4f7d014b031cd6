"""Tensor transforms of the long-tailed datamodules.

Every transform here takes a ``uint8`` image tensor of shape ``(C, H, W)`` (as the in-memory
and file datasets produce) and returns a normalised ``float32`` tensor. They are built from
``torchvision.transforms.v2`` and are picklable, so they work with dataloader workers.

Example:
    >>> import torch
    >>> image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    >>> cifar_transform(CIFAR10_MEAN, CIFAR10_STD, train=True)(image).shape
    torch.Size([3, 32, 32])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "cifar_transform",
    "imagenet_transform",
]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def cifar_transform(
    mean: Sequence[float], std: Sequence[float], train: bool, size: int = 32, padding: int = 4
) -> v2.Compose:
    """CIFAR-style transform of a ``uint8`` ``(C, H, W)`` tensor.

    Training: ``RandomCrop(size, padding)`` (zero padding), ``RandomHorizontalFlip``, then
    scaling to [0, 1] and ``Normalize(mean, std)``. Evaluation: scaling and ``Normalize``
    only.

    Args:
        mean: Per-channel mean of the [0, 1]-scaled images.
        std: Per-channel standard deviation of the [0, 1]-scaled images.
        train: Whether to add the random crop and flip.
        size: Side of the square crop.
        padding: Zero padding added on each side before the crop.

    Returns:
        The composed transform.

    Example:
        >>> import torch
        >>> t = cifar_transform((0.5,), (0.5,), train=False)
        >>> t(torch.full((1, 32, 32), 255, dtype=torch.uint8)).max().item()
        1.0
    """
    steps: list[v2.Transform] = []
    if train:
        steps += [v2.RandomCrop(size, padding=padding), v2.RandomHorizontalFlip()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def imagenet_transform(
    image_size: int,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """ImageNet-style transform of a ``uint8`` ``(C, H, W)`` tensor of any size.

    Training: ``RandomResizedCrop(image_size)`` and ``RandomHorizontalFlip``. Evaluation:
    ``Resize(int(image_size * 256 / 224))`` then ``CenterCrop(image_size)``. Both end with
    scaling to [0, 1] and ``Normalize(mean, std)``.

    Args:
        image_size: Side of the square output.
        train: Training (random) or evaluation (deterministic) pipeline.
        mean: Per-channel mean of the [0, 1]-scaled images.
        std: Per-channel standard deviation of the [0, 1]-scaled images.

    Returns:
        The composed transform.

    Example:
        >>> import torch
        >>> t = imagenet_transform(24, train=False)
        >>> t(torch.zeros(3, 40, 50, dtype=torch.uint8)).shape
        torch.Size([3, 24, 24])
    """
    if train:
        steps: list[v2.Transform] = [
            v2.RandomResizedCrop(image_size, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        steps = [
            v2.Resize(int(image_size * 256 / 224), antialias=True),
            v2.CenterCrop(image_size),
        ]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)
