"""The device-resident data path (``device_resident=True``): batches cut and transformed where the images are.

Tested on the CPU against the default path: the same images, split and order; the evaluation transform equal to the
per-image one; every augmented image one of the per-image transform's possible outputs, with the same
distribution of crop offsets and flips; fits, one-phase runs and the pipeline work on it.
"""

from __future__ import annotations

import functools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from lightning_autobalance import AutoBalanceCallback, ImbalancedClassifier
from lightning_autobalance.data import LongTailDigits, LongTailImageFolder
from lightning_autobalance.data.device_dataset import DeviceImageDataset, keep_batch
from lightning_autobalance.data.memory_dataset import InMemoryImageDataset
from lightning_autobalance.data.transforms import CIFAR10_MEAN, CIFAR10_STD, BatchTransform, cifar_transform

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 6, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _candidates(image: torch.Tensor, padding: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every output of crop(padding) + flip for one uint8 image, by (top, left, flipped), built with v2's functional
    ops (the per-image path's own code)."""
    from torchvision.transforms.v2 import functional as TF

    h, w = image.shape[-2:]
    padded = TF.pad(image, [padding] * 4, fill=0)
    out = {}
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = TF.crop(padded, top, left, h, w)
            out[(top, left, False)] = crop
            out[(top, left, True)] = TF.horizontal_flip(crop)
    return out


def _identify(x: torch.Tensor, candidates: dict) -> tuple[int, int, bool]:
    hits = [key for key, c in candidates.items() if torch.equal(c, x)]
    assert len(hits) >= 1, "an augmented image is none of the per-image transform's possible outputs"
    return hits[0]


def test_evaluation_transform_equals_the_per_image_one():
    images = _images(5, 32)
    per_image = cifar_transform(CIFAR10_MEAN, CIFAR10_STD, train=False)
    batched = BatchTransform(per_image)(images)
    expected = torch.stack([per_image(im) for im in images])
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-6)


def test_augmentation_has_the_distribution_of_the_per_image_path():
    """Crop offsets uniform over 0..2p on each axis and flips with probability 1/2, independently per image, on
    both paths (the per-image path measured the same way); each batched output is a possible per-image output."""
    padding, draws = 2, 3000
    image = _images(1, 6, seed=1)[0]
    candidates = _candidates(image, padding)
    steps = [v2.RandomCrop(6, padding=padding), v2.RandomHorizontalFlip()]
    batched, per_image = BatchTransform(v2.Compose(steps)), v2.Compose(steps)
    torch.manual_seed(0)
    ours = [_identify(x, candidates) for x in batched(image.expand(draws, -1, -1, -1).contiguous())]
    theirs = [_identify(per_image(image), candidates) for _ in range(draws)]
    for found in (ours, theirs):
        for axis in (0, 1):
            counts = Counter(k[axis] for k in found)
            assert sorted(counts) == list(range(2 * padding + 1))
            expected = draws / (2 * padding + 1)
            chi2 = sum((counts[v] - expected) ** 2 / expected for v in counts)
            assert chi2 < 20.0  # 4 degrees of freedom: P(chi2 > 20) < 0.001
        flips = sum(k[2] for k in found)
        assert abs(flips - draws / 2) < 4 * math.sqrt(draws / 4)
    # Different images of one batch get their own draws.
    assert len(set(ours[:50])) > 20


def test_batch_transform_refuses_what_it_cannot_batch():
    with pytest.raises(ValueError, match="RandomResizedCrop"):
        BatchTransform(v2.Compose([v2.RandomResizedCrop(8)]))
    with pytest.raises(ValueError, match="zero padding"):
        BatchTransform(v2.RandomCrop(8, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="own size"):
        BatchTransform(v2.RandomCrop(6, padding=1))(_images(2, 8))


def test_dataset_serves_whole_batches_through_a_dataloader():
    images, labels = _images(10, 8), list(range(10))
    source = InMemoryImageDataset(images, labels, v2.Normalize([0.5] * 3, [0.5] * 3))
    ds = DeviceImageDataset.from_memory(InMemoryImageDataset(images.float() / 255, labels, source.transform))
    loader = DataLoader(ds, batch_size=4, sampler=[9, 0, 3, 3, 7], collate_fn=keep_batch)
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[9, 0, 3, 3], [7]]
    torch.testing.assert_close(batches[0][0][2], (images[3].float() / 255 - 0.5) / 0.5)
    x, y = ds[4]
    assert tuple(x.shape) == (3, 8, 8) and y == 4
    assert ds.to("cpu") is ds and ds.device == torch.device("cpu")
    with pytest.raises(ValueError, match="different sizes"):
        DeviceImageDataset.from_memory(InMemoryImageDataset([images[0], images[1, :, :4]], [0, 1]))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        DeviceImageDataset(images[0], [0, 1, 2])
    with pytest.raises(ValueError, match="10 images but 3 targets"):
        DeviceImageDataset(images, [0, 1, 2])


def _labels_by_epoch(dm: pl.LightningDataModule, loader: str, epochs: int = 2) -> list[list[int]]:
    torch.manual_seed(5)
    out = []
    for _ in range(epochs):
        out.append([int(v) for batch in getattr(dm, loader)() for v in batch[1]])
    return out


@pytest.mark.parametrize("fold_in_epoch", [None, 1])
def test_digits_device_resident_matches_the_default_path(fold_in_epoch):
    kwargs = dict(imbalance_ratio=10, search_split=True, batch_size=16, fold_in_epoch=fold_in_epoch)
    plain, device = LongTailDigits(**kwargs), LongTailDigits(device_resident=True, **kwargs)
    for dm in (plain, device):
        dm.setup("fit")
        dm.setup("test")
    assert device.class_counts == plain.class_counts and device.upper_targets == plain.upper_targets
    assert np.array_equal(device.train_indices, plain.train_indices)
    assert isinstance(device.train_dataset, DeviceImageDataset)
    # Same sampler, same order of samples (the labels of every batch), epoch after epoch.
    if fold_in_epoch is None:
        assert _labels_by_epoch(device, "train_dataloader") == _labels_by_epoch(plain, "train_dataloader")
    assert _labels_by_epoch(device, "upper_dataloader") == _labels_by_epoch(plain, "upper_dataloader")
    # Evaluation batches: the same tensors.
    for a, b in zip(device.test_dataloader(), plain.test_dataloader(), strict=True):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
        assert torch.equal(a[1], b[1])


def test_fold_in_sampler_drives_the_device_dataset():
    dm = LongTailDigits(imbalance_ratio=10, search_split=True, batch_size=16, fold_in_epoch=1, device_resident=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    n_lower = len(dm.train_indices)
    seen = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        seen.append(sum(int(b[1].numel()) for b in loader))
    assert seen == [sum(dm.class_counts)] * 2 and n_lower < sum(dm.class_counts)


def test_device_resident_refusals(tmp_path: Path):
    with pytest.raises(ValueError, match="num_workers=0"):
        LongTailDigits(device_resident=True, num_workers=2)
    with pytest.raises(ValueError, match="image_size=None"):
        LongTailImageFolder(str(tmp_path), image_size=24, device_resident=True)
    with pytest.raises(ValueError, match="device_resident must be"):
        LongTailDigits(device_resident="yes")  # type: ignore[arg-type]


def test_a_search_fits_on_device_resident_digits(tmp_path: Path):
    pl.seed_everything(0)
    dm = LongTailDigits(imbalance_ratio=10, search_split=True, batch_size=32, device_resident=True)
    model = ImbalancedClassifier("digits_net", dm.num_classes, dm.class_counts, preset="la",
                                 optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=2e-4))
    callback = AutoBalanceCallback(every_n_steps=2, start_epoch=0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[callback])
    trainer.fit(model, datamodule=dm)
    assert callback.hyper_steps > 0 and callback.skipped_steps == 0
    assert all(torch.isfinite(v).all() for v in model.autobalance.alpha().values())
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    assert 0.0 <= result["test/balanced_error"] <= 1.0


def test_pipeline_on_a_device_resident_image_folder(tmp_path: Path):
    """The CIFAR-10-LT JPEG config through the CLI pipeline with device_resident (a tiny folder of PNGs)."""
    from lightning_autobalance.runner.cli import main

    rng = np.random.default_rng(0)
    from PIL import Image

    for split, n in (("train", 12), ("test", 3)):
        for c in range(10):
            folder = tmp_path / "data" / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    main(["pipeline", "--config", str(ROOT / "benchmarks" / "configs" / "cifar10_lt_jpeg_short.yaml"),
          "--data.init_args.root", str(tmp_path / "data"), "--data.init_args.imbalance_ratio", "6",
          "--data.init_args.batch_size", "16", "--data.init_args.device_resident", "true",
          "--trainer.enable_progress_bar", "false", "--trainer.callbacks.init_args.every_n_steps", "1",
          "--trainer.callbacks.init_args.max_norm", "1.0", "--model.lr_scheduler.init_args.warmup_epochs", "0",
          "--search_epochs", "1", "--retrain_epochs", "1", "--baselines", "[la]", "--output_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["autobalance", "la"]
    assert results["search"]["hyper_steps"] > 0
