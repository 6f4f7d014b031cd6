"""An image dataset that decodes files lazily with PIL."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["ImageFileDataset", "decode_image"]


def decode_image(path: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode an image file into an RGB ``uint8`` tensor of shape ``(3, H, W)``.

    Args:
        path: The image file.
        size: Optional ``(height, width)``; images of another size are resized to it
            (bilinear).

    Returns:
        The decoded image.

    Raises:
        RuntimeError: The file is missing or cannot be decoded; the message names it.

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.new("RGB", (5, 4)).save(path)
        >>> decode_image(path).shape
        torch.Size([3, 4, 5])
    """
    try:
        with Image.open(path) as raw:
            image = raw.convert("RGB")
            if size is not None and (image.height, image.width) != tuple(size):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise RuntimeError(f"cannot read image file '{path}': {err}") from err
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageFileDataset(Dataset[tuple[torch.Tensor, int]]):
    """Image files decoded with PIL when an item is read.

    Items are ``(transform(image), label)`` where ``image`` is an RGB ``uint8`` tensor of
    shape ``(3, H, W)`` and ``label`` a Python int.

    Args:
        paths: Image file paths.
        targets: Class label of each file.
        transform: Optional callable applied to each decoded tensor.
        size: Optional ``(height, width)`` that every image is resized to on decoding.

    Raises:
        ValueError: ``paths`` and ``targets`` differ in length.

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> path = os.path.join(tempfile.mkdtemp(), "a.png")
        >>> Image.new("RGB", (8, 8)).save(path)
        >>> x, y = ImageFileDataset([path], [3])[0]
        >>> tuple(x.shape), y
        ((3, 8, 8), 3)
    """

    def __init__(
        self,
        paths: Sequence[str],
        targets: Sequence[int] | np.ndarray,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        labels = np.asarray(targets, dtype=np.int64)
        if len(paths) != labels.shape[0]:
            raise ValueError(f"got {len(paths)} paths but {labels.shape[0]} targets")
        self.paths = list(paths)
        self.targets = labels
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Decode file ``index`` and return ``(image, label)``."""
        image = decode_image(self.paths[index], self.size)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
