"""An image dataset that decodes files lazily with PIL."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

__all__ = ["ImageFileDataset", "bad_images", "check_image", "decode_image"]

#: Files that passed :func:`check_image`, by (path, size, mtime): a datamodule cloned for every pipeline stage checks
#: each file once per process.
_CHECKED: set[tuple[str, int, int]] = set()
_CHECKED_LOCK = threading.Lock()


def check_image(path: str) -> str | None:
    """Why an image file cannot be used (``"UnidentifiedImageError: cannot identify image file"``), or None.

    Cheap, without a full decode: the file must open as an image (not a text file with a ``.png`` suffix), pass PIL's
    ``verify()`` (a PNG's chunks and checksums, to its end), and a JPEG must decode at 1/8 scale (PIL's ``draft`` mode,
    about a millisecond), which finds one cut short; PIL refuses those when it decodes them for training.

    Example:
        >>> import tempfile, os
        >>> from PIL import Image
        >>> folder = tempfile.mkdtemp()
        >>> Image.new("RGB", (8, 8)).save(os.path.join(folder, "a.jpg"))
        >>> check_image(os.path.join(folder, "a.jpg")) is None
        True
        >>> with open(os.path.join(folder, "b.png"), "w") as f:
        ...     _ = f.write("not an image")
        >>> check_image(os.path.join(folder, "b.png")).split(":")[0]
        'UnidentifiedImageError'
    """
    try:
        stat = os.stat(path)
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key in _CHECKED:
            return None
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
            else:
                image.verify()
    except Exception as err:  # not an image, a broken header, cut short, unreadable
        return f"{type(err).__name__}: {' '.join(str(err).split())[:80]}"
    with _CHECKED_LOCK:
        _CHECKED.add(key)
    return None


def bad_images(paths: Sequence[str], threads: int | None = None) -> list[str]:
    """``"<path> (<why>)"`` for every file of ``paths`` that :func:`check_image` refuses, in order (checked in
    threads: PIL releases the GIL while it reads and decodes)."""
    workers = threads or min(16, (os.cpu_count() or 1) * 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(check_image, paths))
    return [f"{path} ({why})" for path, why in zip(paths, reasons) if why is not None]


def decode_image(path: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode an image file into an RGB ``uint8`` tensor of shape ``(3, H, W)``; with ``size`` (``(height, width)``)
    an image of another size is resized to it (bilinear).

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

    def __init__(self, paths: Sequence[str], targets: Sequence[int] | np.ndarray,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 size: tuple[int, int] | None = None) -> None:
        labels = np.asarray(targets, dtype=np.int64)
        if len(paths) != labels.shape[0]:
            raise ValueError(f"got {len(paths)} paths but {labels.shape[0]} targets")
        self.paths = list(paths)
        self.targets = labels
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Decode file ``index`` and return ``(image, label)``."""
        image = decode_image(self.paths[index], self.size)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
