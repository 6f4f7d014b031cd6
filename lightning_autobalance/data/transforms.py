"""Tensor transforms of the long-tailed datamodules.

Every transform here takes a ``uint8`` image tensor of shape ``(C, H, W)`` (as the in-memory
and file datasets produce) and returns a normalised ``float32`` tensor. They are built from
``torchvision.transforms.v2`` and are picklable, so they work with dataloader workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms import v2

__all__ = ["BatchTransform", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN",
           "IMAGENET_STD", "cifar_transform", "imagenet_transform"]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def cifar_transform(mean: Sequence[float], std: Sequence[float], train: bool, size: int = 32,
                    padding: int = 4) -> v2.Compose:
    """CIFAR-style transform of a ``uint8`` ``(C, H, W)`` tensor.

    Training: ``RandomCrop(size, padding)`` (zero padding), ``RandomHorizontalFlip``, then scaling to [0, 1] and
    ``Normalize(mean, std)``. Evaluation: scaling and ``Normalize`` only.

    Args:
        mean, std: Per-channel mean and standard deviation of the [0, 1]-scaled images.
        size: Side of the square crop.
        padding: Zero padding added on each side before the crop.

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


def imagenet_transform(image_size: int, train: bool, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """ImageNet-style transform of a ``uint8`` ``(C, H, W)`` tensor of any size.

    Training: ``RandomResizedCrop(image_size)`` and ``RandomHorizontalFlip``. Evaluation:
    ``Resize(int(image_size * 256 / 224))`` then ``CenterCrop(image_size)``. Both end with
    scaling to [0, 1] and ``Normalize(mean, std)``.

    ``image_size`` is the side of the square output; ``mean`` and ``std`` as in :func:`cifar_transform`.

    Example:
        >>> import torch
        >>> t = imagenet_transform(24, train=False)
        >>> t(torch.zeros(3, 40, 50, dtype=torch.uint8)).shape
        torch.Size([3, 24, 24])
    """
    if train:
        steps: list[v2.Transform] = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(int(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class BatchTransform:
    """A per-image ``v2.Compose`` of crop, flip, scaling and normalisation, applied to a whole batch at once.

    It takes a batch ``(B, C, H, W)`` (``uint8`` or floating) on any device and does all its work there, drawing
    its random numbers from that device's global generator (seeded by ``torch.manual_seed`` and Lightning's
    ``seed_everything``), so a batch kept on a GPU never visits the host. Every image gets its own draws, with the
    distribution of the per-image transform: a crop offset uniform over ``0..2 * padding`` on each axis (zero
    padding), a horizontal flip with probability ``p``. Supported steps, in any order the source uses:
    ``RandomCrop(size, padding)`` with ``size`` the image's own size, constant zero fill;
    ``RandomHorizontalFlip(p)``; ``ToDtype(torch.float32, scale=True)``; ``Normalize(mean, std)``.

    Args:
        source: The per-image transform (a ``v2.Compose`` or one of the steps above), or None for no transform.

    Raises:
        ValueError: ``source`` has a step this class cannot batch; the message names it.

    Example:
        >>> import torch
        >>> batch = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
        >>> BatchTransform(cifar_transform(CIFAR10_MEAN, CIFAR10_STD, train=True))(batch).shape
        torch.Size([4, 3, 32, 32])
    """

    def __init__(self, source: v2.Transform | None) -> None:
        steps = list(source.transforms) if isinstance(source, v2.Compose) else [] if source is None else [source]
        self.steps: list[tuple[str, object]] = []
        for step in steps:
            if isinstance(step, v2.RandomCrop):
                padding = list(step.padding or [0])
                if (step.pad_if_needed or step.padding_mode != "constant" or step.fill not in (0, None)
                        or len(set(padding)) != 1):
                    raise ValueError(f"BatchTransform: only RandomCrop with the same zero padding on every side is "
                                     f"supported, got {step}")
                self.steps.append(("crop", (tuple(step.size), int(padding[0]))))
            elif isinstance(step, v2.RandomHorizontalFlip):
                self.steps.append(("flip", float(step.p)))
            elif isinstance(step, v2.ToDtype) and step.scale and step.dtype == torch.float32:
                self.steps.append(("scale", None))
            elif isinstance(step, v2.Normalize):
                self.steps.append(("normalize", (tuple(step.mean), tuple(step.std))))
            else:
                raise ValueError(f"BatchTransform cannot apply {type(step).__name__} to a batch on the device: "
                                 "supported are RandomCrop (zero padding, the image's own size), "
                                 "RandomHorizontalFlip, ToDtype(torch.float32, scale=True) and Normalize")

    def __call__(self, images: Tensor) -> Tensor:
        x = images
        for kind, arg in self.steps:
            if kind == "crop":
                x = _random_crop(x, *arg)  # type: ignore[misc]
            elif kind == "flip":
                flip = torch.rand(x.shape[0], device=x.device) < arg  # type: ignore[operator]
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            elif kind == "scale":
                x = x.to(torch.float32) / 255.0 if not x.is_floating_point() else x.to(torch.float32)
            else:
                mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device)[:, None, None] for v in arg)  # type: ignore[misc]
                x = (x - mean) / std
        return x


def _random_crop(x: Tensor, size: tuple[int, int], padding: int) -> Tensor:
    """Per-image random crop of ``size`` from the zero-padded batch, offsets uniform over ``0..2 * padding``."""
    b, c, h, w = x.shape
    if (h, w) != tuple(size):
        raise ValueError(f"BatchTransform: RandomCrop{tuple(size)} on images of size {(h, w)}; only a crop of the "
                         "image's own size (after padding) is supported")
    if padding == 0:
        return x
    padded = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    top = torch.randint(0, 2 * padding + 1, (b,), device=dev)
    left = torch.randint(0, 2 * padding + 1, (b,), device=dev)
    rows = (top[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    return padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows, cols]
