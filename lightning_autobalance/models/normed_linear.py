"""``NormedLinear``: a cosine-similarity classifier head (used with the LDAM loss)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NormedLinear"]


class NormedLinear(nn.Module):
    """Logits are cosine similarities between the features and one weight vector per class, in ``[-1, 1]``.

    LDAM (Cao et al. 2019) is defined on such logits, with a scale ``s`` applied inside the loss.

    Args:
        in_features: feature size.
        out_features: number of classes.

    Example:
        >>> head = NormedLinear(8, 3)
        >>> bool(head(torch.randn(4, 8)).abs().max() <= 1.0)
        True
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        nn.init.uniform_(self.weight, -1.0, 1.0)
        with torch.no_grad():
            self.weight.renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
