"""ImageNet-style ResNets and ResNeXt from torchvision, behind the package's network convention."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

__all__ = ["TorchvisionResNet"]


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet or ResNeXt with its classifier split off as ``head``.

    The torchvision network is kept as ``backbone`` with its ``fc`` layer replaced by an identity, so ``backbone(x)``
    returns the pooled features and ``head`` maps them to logits. ``weights`` is handed to torchvision's builder (e.g.
    ``"DEFAULT"`` or ``"IMAGENET1K_V2"``; torchvision downloads them on first use). When pretrained weights are asked
    for with a number of classes different from theirs, the backbone keeps the pretrained weights and ``head`` is a
    freshly initialised linear layer (the usual fine-tuning set-up).

    Attributes:
        ARCHS: Names of the supported architectures.
        backbone: The torchvision network, with ``fc`` an ``nn.Identity``.
        head: The final ``nn.Linear`` from pooled features to logits.
        num_features: Size of the pooled feature vector.

    Args:
        num_classes: Number of output logits.
        arch: One of ``ARCHS``.
        weights: Name of a torchvision weights entry for ``arch``, or None for random initialisation.

    Raises:
        ValueError: If ``arch`` or ``weights`` is not known.

    Example:
        >>> import torch
        >>> net = TorchvisionResNet(num_classes=5, arch="resnet18")
        >>> net(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 5])
        >>> net.forward_features(torch.randn(2, 3, 64, 64)).shape
        torch.Size([2, 512])
    """

    ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d")

    def __init__(self, num_classes: int = 1000, arch: str = "resnet50", weights: str | None = None) -> None:
        super().__init__()
        if arch not in self.ARCHS:
            raise ValueError(f"unknown torchvision arch {arch!r}; valid names: {', '.join(self.ARCHS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive; got {num_classes}")
        self.arch = arch
        self.num_classes = num_classes
        builder = getattr(torchvision.models, arch)
        if weights is None:
            backbone = builder(weights=None, num_classes=num_classes)
        else:
            enum = torchvision.models.get_model_weights(arch)
            try:
                entry = enum.verify(weights)
            except KeyError:
                valid = ", ".join(enum.__members__)
                raise ValueError(f"unknown weights {weights!r} for {arch}; valid names: {valid}") from None
            backbone = builder(weights=entry)
        fc = backbone.fc
        assert isinstance(fc, nn.Linear)
        self.num_features = fc.in_features
        head = fc if fc.out_features == num_classes else nn.Linear(self.num_features, num_classes)
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(N, num_features)`` of images ``(N, 3, H, W)``, before the linear head."""
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, num_classes) for images of shape (N, 3, H, W)."""
        return self.head(self.forward_features(x))
