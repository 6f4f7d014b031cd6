"""LongTailImageFolder's ``cifar_size``: CIFAR-style data at a smaller side (e.g. the 16x16 CPU benchmark)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_autobalance.data import LongTailImageFolder


def _write_tree(root: Path, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name, n in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n if split == "train" else 2):
                Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")


@pytest.mark.parametrize("memory", [{}, {"cache_in_memory": True}, {"device_resident": True}])
def test_cifar_size_resizes_every_split(tmp_path: Path, memory: dict) -> None:
    _write_tree(tmp_path, {"a": 6, "b": 4})
    dm = LongTailImageFolder(str(tmp_path), imbalance_ratio=2, cifar_size=16, batch_size=4, search_split=True,
                             val_source="upper", **memory)
    dm.setup("fit")
    dm.setup("test")
    for loader in (dm.train_dataloader(), dm.upper_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, _ = next(iter(loader))
        assert x.shape[1:] == (3, 16, 16) and x.dtype == torch.float32
    # the same images as the 32x32 default, only smaller: the same samples are kept
    assert np.array_equal(dm.long_tail_indices, LongTailImageFolder(str(tmp_path), imbalance_ratio=2).long_tail_indices)


def test_cifar_size_evaluation_is_the_resized_image(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"a": 3, "b": 3})
    dm = LongTailImageFolder(str(tmp_path), imbalance_ratio=1, cifar_size=8, val_source="none")
    image, _ = dm.test_dataset[0]
    path = sorted((tmp_path / "test" / "a").iterdir())[0]
    with Image.open(path) as raw:
        expected = np.asarray(raw.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
    std = torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
    torch.testing.assert_close(image * std + mean, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"cifar_size": 1}, "cifar_size"),
    ({"cifar_size": 16.5}, "cifar_size"),
    ({"train_augment": "no"}, "train_augment"),
    ({"cifar_size": 16, "image_size": 24}, "cifar_size applies to CIFAR-style data"),
])
def test_cifar_size_bad_arguments(tmp_path: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        LongTailImageFolder(str(tmp_path), **kwargs)


@pytest.mark.parametrize("memory", [{}, {"device_resident": True}])
def test_train_augment_false_trains_on_the_images_as_they_are(tmp_path: Path, memory: dict) -> None:
    _write_tree(tmp_path, {"a": 4, "b": 4})
    plain = LongTailImageFolder(str(tmp_path), imbalance_ratio=1, cifar_size=16, train_augment=False,
                                batch_size=8, val_source="none", **memory)
    plain.setup("fit")
    torch.manual_seed(0)
    first = next(iter(plain.train_dataloader()))
    torch.manual_seed(1)
    second = next(iter(plain.train_dataloader()))
    # no random crop or flip: every epoch sees the same tensors, only in its own order
    assert sorted(map(tuple, first[0].flatten(1).tolist())) == sorted(map(tuple, second[0].flatten(1).tolist()))
    augmented = LongTailImageFolder(str(tmp_path), imbalance_ratio=1, cifar_size=16, batch_size=8, val_source="none")
    augmented.setup("fit")
    torch.manual_seed(0)
    x_aug = torch.cat([next(iter(augmented.train_dataloader()))[0] for _ in range(3)])
    pool = {tuple(row) for row in first[0].flatten(1).tolist()}
    assert any(tuple(row) not in pool for row in x_aug.flatten(1).tolist())  # the default still augments
