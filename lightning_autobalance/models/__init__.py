"""Networks: the CIFAR ResNets of the long-tail literature, a small digits MLP, torchvision ResNets.

Every network takes ``num_classes`` as its first constructor argument and exposes ``forward_features(x)`` (the features
fed to the classifier) and ``head`` (the final ``nn.Linear``). ``build_network`` builds one by name.

Example:
    >>> from lightning_autobalance.models import build_network
    >>> net = build_network("resnet32", num_classes=100)
    >>> net.head.out_features
    100
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from lightning_autobalance.models.basic_block import BasicBlockA
from lightning_autobalance.models.normed_linear import NormedLinear
from lightning_autobalance.models.resnet32 import ResNet32
from lightning_autobalance.models.resnet_cifar import ResNetCIFAR
from lightning_autobalance.models.small import DigitsNet
from lightning_autobalance.models.torchvision_resnet import TorchvisionResNet

__all__ = ["NETWORK_NAMES", "BasicBlockA", "DigitsNet", "NormedLinear", "ResNet32", "ResNetCIFAR", "TorchvisionResNet",
           "build_network"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": partial(ResNetCIFAR, depth=20),
    "resnet32": ResNet32,
    "resnet44": partial(ResNetCIFAR, depth=44),
    "resnet56": partial(ResNetCIFAR, depth=56),
    "resnet110": partial(ResNetCIFAR, depth=110),
    "resnet1202": partial(ResNetCIFAR, depth=1202),
    "digits_net": DigitsNet,
    **{arch: partial(TorchvisionResNet, arch=arch) for arch in TorchvisionResNet.ARCHS},
}

#: Names accepted by :func:`build_network`.
NETWORK_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_network(name: str, num_classes: int, **kwargs: object) -> nn.Module:
    """Build a network by name.

    ``resnet20`` ... ``resnet1202`` are the CIFAR ResNets (:class:`ResNetCIFAR`, 16/32/64
    channels, option-A shortcuts); ``resnet18`` ... ``resnet152`` and ``resnext50_32x4d`` are the
    ImageNet networks of torchvision (:class:`TorchvisionResNet`); ``digits_net`` is
    :class:`DigitsNet`. Names are case-insensitive and ``-`` may stand for ``_``.

    Args:
        name: One of :data:`NETWORK_NAMES`.
        num_classes: Number of output logits.
        **kwargs: Further constructor arguments (e.g. ``width`` for the CIFAR ResNets,
            ``hidden`` for ``digits_net``, ``weights`` for the torchvision networks).

    Raises:
        ValueError: If ``name`` is not known.

    Example:
        >>> net = build_network("digits_net", 10, hidden=32)
        >>> net.num_features
        32
    """
    key = name.lower().replace("-", "_")
    if key not in _BUILDERS:
        raise ValueError(f"unknown network {name!r}; known names: {', '.join(NETWORK_NAMES)}")
    return _BUILDERS[key](num_classes, **kwargs)
