"""End-to-end tests of the long-tailed datamodules (digits, CIFAR, image folders, lists)."""

import gc
import os
import pickle
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from lightning_autobalance.data import (
    ColoredDigits,
    LongTailCIFAR10,
    LongTailCIFAR100,
    LongTailDataModule,
    LongTailDigits,
    LongTailImageFolder,
    long_tail_counts,
    select_long_tail,
)

JPEG_TARBALL = Path(os.environ.get("LTAB_CIFAR10_JPEG", "/work/shared/data/cifar10-jpeg.tar.gz"))


def _labels_of(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(y) for _, ys in loader for y in ys]


# ====================================================================== digits
def test_digits_counts_before_setup() -> None:
    dm = LongTailDigits()
    assert dm.num_classes == 10
    assert dm.class_names == [str(c) for c in range(10)]
    assert dm.class_counts == long_tail_counts(144, 10, 100.0, min_count=2)
    assert dm.class_counts[-1] == 2
    assert dm.long_tail_counts == dm.class_counts
    assert dm.upper_class_counts is None
    assert dm._datasets == {}  # nothing built yet


def test_digits_batches_and_balanced_test() -> None:
    dm = LongTailDigits(imbalance_ratio=10)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert sorted(np.bincount(_labels_of(dm.train_dataloader()), minlength=10).tolist()) == sorted(dm.class_counts)
    test_labels = _labels_of(dm.test_dataloader())
    assert np.bincount(test_labels).tolist() == [30] * 10
    assert _labels_of(dm.val_dataloader()) == test_labels  # val_source="test"
    # The test set does not depend on the training seed, and never meets the training set.
    other = LongTailDigits(imbalance_ratio=10, seed=5)
    assert torch.equal(other.test_dataset.images, dm.test_dataset.images)
    train_rows = {tuple(r.flatten().tolist()) for r in dm.train_dataset.images}
    assert not any(tuple(r.flatten().tolist()) in train_rows for r in dm.test_dataset.images[:50])


def test_digits_search_split() -> None:
    dm = LongTailDigits(search_split=True, upper_batch_size=16)
    lt = np.asarray(dm.long_tail_counts)
    lower, upper = np.asarray(dm.class_counts), np.asarray(dm.upper_class_counts)
    assert (lower + upper).tolist() == lt.tolist()
    assert (lower >= 1).all() and (upper >= 1).all()
    assert np.intersect1d(dm.train_indices, dm.upper_indices).size == 0
    assert np.array_equal(np.union1d(dm.train_indices, dm.upper_indices), dm.long_tail_indices)
    assert len(dm.train_dataset) == lower.sum() and len(dm.upper_dataset) == upper.sum()
    batches = list(dm.upper_dataloader())
    assert batches[0][0].shape == (16, 1, 8, 8)
    assert np.bincount(torch.cat([b[1] for b in batches]).numpy(), minlength=10).tolist() == upper.tolist()
    off = LongTailDigits(search_split=False)
    assert off.class_counts == dm.long_tail_counts
    assert np.array_equal(off.train_indices, dm.long_tail_indices)
    with pytest.raises(RuntimeError, match="search_split=True"):
        off.upper_dataloader()


def test_digits_seeds() -> None:
    a, b, c = (
        LongTailDigits(seed=1, search_split=True),
        LongTailDigits(seed=1, search_split=True),
        LongTailDigits(seed=2, search_split=True),
    )
    assert np.array_equal(a.train_indices, b.train_indices)
    assert np.array_equal(a.upper_indices, b.upper_indices)
    assert not np.array_equal(a.long_tail_indices, c.long_tail_indices)
    assert a.class_counts == c.class_counts


def test_digits_val_sources() -> None:
    dm = LongTailDigits(search_split=True, val_source="upper", augment=True)
    val = dm.val_dataloader()
    assert len(val.dataset) == sum(dm.upper_class_counts)
    first = torch.stack([dm.val_dataset[i][0] for i in range(5)])
    again = torch.stack([dm.val_dataset[i][0] for i in range(5)])
    assert torch.equal(first, again)  # validation is never augmented
    assert LongTailDigits(val_source="none").val_dataloader() == []


def test_digits_step_profile_and_augmentation() -> None:
    dm = LongTailDigits(profile="step", imbalance_ratio=10, augment=True)
    assert dm.class_counts == [144] * 5 + [14] * 5
    x, _ = dm.train_dataset[0]
    assert x.shape == (1, 8, 8)


def test_upper_loader_does_not_touch_global_rng() -> None:
    dm = LongTailDigits(search_split=True)
    state = torch.get_rng_state()
    list(dm.upper_dataloader())
    assert torch.equal(state, torch.get_rng_state())


def test_upper_data_is_sharded_in_one_place() -> None:
    """The datamodule's upper loader does not shard; the callback's BatchStream gives each of 2 ranks its part of
    every pass (padded to equal lengths, as DistributedSampler does)."""
    from lightning_autobalance.lightning.batch_stream import BatchStream

    dm = LongTailDigits(search_split=True, imbalance_ratio=10, upper_batch_size=4)
    n = len(dm.upper_dataset)
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)  # type: ignore[assignment]
    loader = dm.upper_dataloader()
    assert sorted(loader.sampler) == list(range(n))
    streams = [BatchStream(loader, seed=3, rank=r, world_size=2) for r in (0, 1)]
    shards = [list(s.sampler) for s in streams]
    assert len(shards[0]) == len(shards[1]) == (n + 1) // 2
    assert set(shards[0]) | set(shards[1]) == set(range(n))
    assert len(set(shards[0]) & set(shards[1])) == 2 * ((n + 1) // 2) - n


def test_digits_with_worker_process() -> None:
    dm = LongTailDigits(num_workers=1, imbalance_ratio=10)
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    assert sum(len(y) for _, y in loader) == sum(dm.class_counts)
    del loader  # shut the persistent worker down here rather than in a later test
    gc.collect()


class _TinyNet(pl.LightningModule):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = torch.nn.Linear(64, num_classes)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self.validation_step(batch, _)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_digits_with_trainer() -> None:
    dm = LongTailDigits(search_split=True, val_source="upper")
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(_TinyNet(dm.num_classes), datamodule=dm)
    trainer.test(_TinyNet(dm.num_classes), datamodule=dm, verbose=False)
    assert dm.hparams["search_split"] is True and dm.hparams["test_per_class"] == 30


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
        ({"imbalance_ratio": float("nan")}, "imbalance_ratio"),
        ({"profile": "linear"}, "profile"),
        ({"upper_fraction": 0.0}, "upper_fraction"),
        ({"upper_fraction": 1.0}, "upper_fraction"),
        ({"search_split": "yes"}, "search_split"),
        ({"batch_size": 0}, "batch_size"),
        ({"upper_batch_size": 0}, "upper_batch_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"val_source": "train"}, "val_source"),
        ({"val_source": "upper"}, "search_split"),
        ({"min_count": 0}, "min_count"),
        ({"test_per_class": 0}, "test_per_class"),
        ({"augment": 1}, "augment"),
    ],
)
def test_digits_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LongTailDigits(**kwargs)


def test_digits_too_few_images_for_the_test_set() -> None:
    dm = LongTailDigits(test_per_class=175)
    with pytest.raises(ValueError, match=r"digit class \d has \d+ images.*test_per_class=175"):
        _ = dm.class_counts


def test_digits_split_needs_two_samples() -> None:
    dm = LongTailDigits(min_count=1, search_split=True)
    with pytest.raises(ValueError, match="at least 2 samples of class '9'"):
        _ = dm.class_counts


# ====================================================================== CIFAR (fake release)
def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def _fake_cifar10(root: Path, per_class: int = 20, test_per_class: int = 3) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    targets = rng.permutation(np.repeat(np.arange(10), per_class))
    data = rng.integers(0, 256, size=(targets.size, 3072), dtype=np.uint8)
    for b, part in enumerate(np.array_split(np.arange(targets.size), 5), start=1):
        _write_pickle(folder / f"data_batch_{b}", {"data": data[part], "labels": targets[part].tolist()})
    test_targets = np.repeat(np.arange(10), test_per_class)
    test_data = rng.integers(0, 256, size=(test_targets.size, 3072), dtype=np.uint8)
    _write_pickle(folder / "test_batch", {"data": test_data, "labels": test_targets.tolist()})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names})
    return data, targets


class _Crafted:
    """A pickled object whose loading would run code (it would create ``ran``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cifar_without_its_md5_check_refuses_a_crafted_batch_file_unread(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    marker = tmp_path / "ran"
    _write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", {"data": _Crafted(marker), "labels": []})
    dm = LongTailCIFAR10(root=str(tmp_path), check_integrity=False, imbalance_ratio=10, batch_size=8)
    with pytest.raises(Exception, match=r"names pathlib.*refused unread"):
        dm.setup("fit")
    assert not marker.exists()


def _fake_cifar100(root: Path, per_class: int = 6, test_per_class: int = 2) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    targets = rng.permutation(np.repeat(np.arange(100), per_class))
    data = rng.integers(0, 256, size=(targets.size, 3072), dtype=np.uint8)
    coarse = (targets // 5).tolist()
    _write_pickle(folder / "train", {"data": data, "fine_labels": targets.tolist(), "coarse_labels": coarse})
    test_targets = np.repeat(np.arange(100), test_per_class)
    test_data = rng.integers(0, 256, size=(test_targets.size, 3072), dtype=np.uint8)
    _write_pickle(folder / "test", {"data": test_data, "fine_labels": test_targets.tolist()})
    names = [f"fine{c:02d}" for c in range(100)]
    _write_pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": [str(c) for c in range(20)]})
    return data, targets


def test_cifar10_from_fake_release(tmp_path: Path) -> None:
    data, targets = _fake_cifar10(tmp_path)
    dm = LongTailCIFAR10(root=str(tmp_path), check_integrity=False, imbalance_ratio=10, batch_size=8)
    counts = long_tail_counts(20, 10, 10.0)
    assert dm.class_counts == counts and dm.num_classes == 10
    assert dm.class_names[0] == "airplane" and dm.class_names[9] == "truck"
    kept = select_long_tail(targets, counts, seed=0)
    assert np.array_equal(dm.long_tail_indices, kept)
    dm.setup("fit")
    expected = torch.from_numpy(data[kept].reshape(-1, 3, 32, 32))
    assert torch.equal(dm.train_dataset.images, expected)  # torchvision parsed the batches
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.bincount(_labels_of(dm.test_dataloader())).tolist() == [3] * 10
    xt, _ = next(iter(dm.test_dataloader()))
    assert abs(float(xt.mean())) < 1.5  # normalised


def test_cifar10_search_split(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    dm = LongTailCIFAR10(root=str(tmp_path), check_integrity=False, imbalance_ratio=10, search_split=True)
    assert [a + b for a, b in zip(dm.class_counts, dm.upper_class_counts)] == long_tail_counts(20, 10, 10.0)
    assert sum(len(y) for _, y in dm.upper_dataloader()) == sum(dm.upper_class_counts)


def test_cifar100_from_fake_release(tmp_path: Path) -> None:
    data, targets = _fake_cifar100(tmp_path)
    dm = LongTailCIFAR100(root=str(tmp_path), check_integrity=False, imbalance_ratio=3, batch_size=16)
    counts = long_tail_counts(6, 100, 3.0)
    assert dm.num_classes == 100 and dm.class_counts == counts
    assert dm.class_names[:2] == ["fine00", "fine01"]
    kept = select_long_tail(targets, counts, seed=0)
    assert torch.equal(dm.train_dataset.images, torch.from_numpy(data[kept].reshape(-1, 3, 32, 32)))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
    assert np.bincount(_labels_of(dm.test_dataloader())).tolist() == [2] * 100


def test_cifar_missing_and_corrupt(tmp_path: Path) -> None:
    dm = LongTailCIFAR10(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*cifar-10-batches-py.*download=True"):
        _ = dm.class_counts
    _fake_cifar10(tmp_path)
    strict = LongTailCIFAR10(root=str(tmp_path))  # md5 sums of the fake files are wrong
    with pytest.raises(RuntimeError, match=r"cifar-10-batches-py.*corrupted"):
        _ = strict.num_classes
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    broken = LongTailCIFAR10(root=str(tmp_path), check_integrity=False)
    with pytest.raises(RuntimeError, match=r"missing or corrupted"):
        _ = broken.num_classes
    with pytest.raises(ValueError, match="check_integrity"):
        LongTailCIFAR100(root=str(tmp_path), check_integrity="no")  # type: ignore[arg-type]


def test_cifar_profile_too_steep_for_split(tmp_path: Path) -> None:
    _fake_cifar100(tmp_path)
    dm = LongTailCIFAR100(root=str(tmp_path), check_integrity=False, imbalance_ratio=100, search_split=True)
    with pytest.raises(ValueError, match=r"at least 2 samples of class 'fine\d\d'"):
        _ = dm.class_counts


# ====================================================================== image folder
def _write_tree(root: Path, train: dict[str, int], test: dict[str, int], size: tuple[int, int] = (32, 32)) -> None:
    rng = np.random.default_rng(0)
    for split, spec in (("train", train), ("test", test)):
        for name, n in spec.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    _write_tree(tmp_path, {"cat": 12, "dog": 10, "emu": 9}, {"cat": 3, "dog": 3, "emu": 3})
    return tmp_path


def test_folder_tree(tree: Path) -> None:
    dm = LongTailImageFolder(str(tree), imbalance_ratio=4, batch_size=5)
    assert dm.class_names == ["cat", "dog", "emu"]
    assert dm.class_counts == long_tail_counts(12, 3, 4.0) == [12, 6, 3]
    targets = np.repeat(np.arange(3), [12, 10, 9])
    assert np.array_equal(dm.long_tail_indices, select_long_tail(targets, [12, 6, 3], seed=0))
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.bincount(_labels_of(dm.test_dataloader())).tolist() == [3, 3, 3]
    # n_max and already_long_tailed
    assert LongTailImageFolder(str(tree), imbalance_ratio=4, n_max=8).class_counts == [8, 4, 2]
    assert LongTailImageFolder(str(tree), already_long_tailed=True).class_counts == [12, 10, 9]


def test_folder_cache_matches_lazy(tree: Path) -> None:
    lazy = LongTailImageFolder(str(tree), imbalance_ratio=4, search_split=True, val_source="upper")
    cached = LongTailImageFolder(
        str(tree), imbalance_ratio=4, search_split=True, val_source="upper", cache_in_memory=True
    )
    cached.setup("fit")
    for a, b in ((lazy.val_dataset, cached.val_dataset), (lazy.test_dataset, cached.test_dataset)):
        assert len(a) == len(b)
        for i in range(len(a)):
            assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]


def test_folder_image_size_mode(tmp_path: Path) -> None:
    _write_tree(tmp_path, {"a": 4, "b": 3}, {"a": 2, "b": 2}, size=(40, 30))
    dm = LongTailImageFolder(str(tmp_path), imbalance_ratio=2, image_size=24, batch_size=4)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 24, 24)
    xt, _ = next(iter(dm.test_dataloader()))
    assert xt.shape == (4, 3, 24, 24)
    small = LongTailImageFolder(str(tmp_path), imbalance_ratio=2, cache_in_memory=True)  # resized to 32x32
    assert small.train_dataset[0][0].shape == (3, 32, 32)
    cached = LongTailImageFolder(str(tmp_path), imbalance_ratio=2, image_size=24, cache_in_memory=True)
    assert cached.test_dataset[0][0].shape == (3, 24, 24)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _ = LongTailImageFolder(str(tmp_path / "nowhere")).class_counts
    with pytest.raises(FileNotFoundError, match=r"train.*ImageFolder layout"):
        _ = LongTailImageFolder(str(tmp_path)).class_counts
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=r"train' has no class subfolders"):
        _ = LongTailImageFolder(str(tmp_path)).class_counts
    _write_tree(tmp_path / "t2", {"a": 3, "b": 2}, {"a": 1, "c": 1})
    (tmp_path / "t2" / "train" / "empty").mkdir()
    (tmp_path / "t2" / "train" / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty' has no image files"):
        _ = LongTailImageFolder(str(tmp_path / "t2")).class_counts
    (tmp_path / "t2" / "train" / "empty" / "notes.txt").unlink()
    (tmp_path / "t2" / "train" / "empty").rmdir()
    with pytest.raises(ValueError, match=r"class folders of .*test.* differ"):
        _ = LongTailImageFolder(str(tmp_path / "t2")).class_counts
    ok = LongTailImageFolder(str(tmp_path / "t2"), val_source="none", imbalance_ratio=2)
    assert ok.class_counts == [3, 1]
    with pytest.raises(ValueError, match=r"class 1 \('b'\) has 2 training images .* asks for 3.*already_long_tailed"):
        _ = LongTailImageFolder(str(tmp_path / "t2"), val_source="none", imbalance_ratio=1).class_counts


def test_folder_unreadable_image(tree: Path) -> None:
    bad = tree / "train" / "cat" / "0000.png"
    bad.write_bytes(b"this is not an image")
    # Named when the datasets are built (verify_images), before any training ...
    with pytest.raises(RuntimeError, match=r"1 of the \d+ training images cannot be opened: .*cat.*0000\.png"):
        LongTailImageFolder(str(tree), already_long_tailed=True).setup("fit")
    # ... and, without that check, when the image is read.
    lazy = LongTailImageFolder(str(tree), already_long_tailed=True, verify_images=False)
    position = lazy.train_dataset.paths.index(str(bad))
    with pytest.raises(RuntimeError, match=r"cannot read image file .*0000\.png"):
        lazy.train_dataset[position]
    with pytest.raises(RuntimeError, match=r"cannot be opened: .*cat.*0000\.png"):  # checked before decoding too
        LongTailImageFolder(str(tree), already_long_tailed=True, cache_in_memory=True).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_max": 0}, "n_max"),
        ({"image_size": 0}, "image_size"),
        ({"cache_in_memory": "yes"}, "cache_in_memory"),
        ({"already_long_tailed": True, "n_max": 5}, "n_max"),
        ({"test_list": "x.txt"}, "test_list"),
        ({"train_list": "x.txt"}, "test_list"),
        ({"root": ""}, "root"),
    ],
)
def test_folder_bad_arguments(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LongTailImageFolder(**{"root": str(tmp_path), **kwargs})


# ====================================================================== list files
@pytest.fixture
def listed(tmp_path: Path) -> Path:
    _write_tree(tmp_path, {"n01": 8, "n02": 5, "n03": 3}, {"n01": 2, "n02": 2, "n03": 2}, size=(36, 28))
    lines = ["# ImageNet-LT style list", ""]
    for label, name in enumerate(["n01", "n02", "n03"]):
        lines += [f"train/{name}/{f} {label}" for f in sorted(os.listdir(tmp_path / "train" / name))]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    test_lines = [
        f"test/{name}/{f} {label}"
        for label, name in enumerate(["n01", "n02", "n03"])
        for f in sorted(os.listdir(tmp_path / "test" / name))
    ]
    (tmp_path / "test.txt").write_text("\n".join(test_lines) + "\n")
    return tmp_path


def test_list_mode(listed: Path) -> None:
    dm = LongTailImageFolder(
        str(listed),
        train_list="train.txt",
        test_list=str(listed / "test.txt"),
        already_long_tailed=True,
        image_size=16,
        batch_size=4,
        search_split=True,
    )
    assert dm.class_names == ["n01", "n02", "n03"]
    assert dm.long_tail_counts == [8, 5, 3]
    assert [a + b for a, b in zip(dm.class_counts, dm.upper_class_counts)] == [8, 5, 3]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64
    assert np.bincount(_labels_of(dm.test_dataloader())).tolist() == [2, 2, 2]
    profiled = LongTailImageFolder(str(listed), train_list="train.txt", test_list="test.txt", imbalance_ratio=4)
    assert profiled.class_counts == [8, 4, 2]


def _rewrite(path: Path, line_no: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("line", "error", "pattern"),
    [
        ("train/n01/0000.png", ValueError, r"train\.txt', line 4: expected '<relative/path> <integer label>'"),
        ("train/n01/0000.png one", ValueError, r"line 4: expected '<relative/path> <integer label>'"),
        ("train/n01/0000.png -1", ValueError, r"line 4: expected a label >= 0"),
        ("train/n01/missing.png 0", FileNotFoundError, r"line 4: image file .*missing\.png' not found"),
    ],
)
def test_list_train_errors(listed: Path, line: str, error: type, pattern: str) -> None:
    _rewrite(listed / "train.txt", 4, line)
    dm = LongTailImageFolder(str(listed), train_list="train.txt", test_list="test.txt", already_long_tailed=True)
    with pytest.raises(error, match=pattern):
        _ = dm.class_counts


def test_list_test_errors(listed: Path) -> None:
    _rewrite(listed / "test.txt", 2, "test/n01/0001.png 3")
    dm = LongTailImageFolder(str(listed), train_list="train.txt", test_list="test.txt", already_long_tailed=True)
    with pytest.raises(ValueError, match=r"test\.txt', line 2: expected a label in 0\.\.2, got 3"):
        _ = dm.class_counts
    with pytest.raises(FileNotFoundError, match=r"train_list file 'nope\.txt' not found"):
        _ = LongTailImageFolder(str(listed), train_list="nope.txt", val_source="none").class_counts
    no_test = LongTailImageFolder(str(listed), train_list="train.txt", val_source="none", already_long_tailed=True)
    assert no_test.class_counts == [8, 5, 3]
    with pytest.raises(RuntimeError, match="test_list"):
        no_test.test_dataloader()


# ====================================================================== the CIFAR-10 JPEG copy
def _extract(tarball: Path, target: Path) -> None:
    if shutil.which("tar"):  # about 1 s, against about 9 s for the tarfile module
        subprocess.run(["tar", "xzf", str(tarball), "-C", str(target)], check=True)
    else:
        with tarfile.open(tarball) as archive:
            archive.extractall(target, filter="data")


@pytest.fixture(scope="module")
def cifar10_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JPEG copy, extracted once into a cache folder (or a temporary one if that fails)."""
    if not JPEG_TARBALL.is_file():
        pytest.skip(f"{JPEG_TARBALL} is not present")
    stamp = f"{JPEG_TARBALL.stat().st_size}\n"
    cache = Path(os.environ.get("LTAB_CACHE", Path.home() / ".cache" / "lightning-autobalance"))
    target = cache / "test-cifar10-jpeg"
    marker = target / ".extracted"
    if marker.is_file() and marker.read_text() == stamp:
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix="test-cifar10-jpeg.partial-", dir=cache))
        _extract(JPEG_TARBALL, partial)
        (partial / ".extracted").write_text(stamp)
        if target.exists():
            shutil.rmtree(target)
        partial.rename(target)
        return target
    except OSError:
        root = tmp_path_factory.mktemp("cifar10-jpeg")
        _extract(JPEG_TARBALL, root)
        return root


def test_folder_on_cifar10_jpeg_matches_cifar_module(cifar10_jpeg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = LongTailImageFolder(str(cifar10_jpeg), seed=3)
    assert folder.class_counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(folder.class_counts) == 12406

    # LongTailCIFAR10's own selection, on release-ordered (interleaved) labels of 5000 per class.
    release_targets = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 5000))
    names = folder.class_names

    def fake_read(self: LongTailCIFAR10, train: bool) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        return torch.empty(0), release_targets, names

    monkeypatch.setattr(LongTailCIFAR10, "_read", fake_read)
    cifar = LongTailCIFAR10(root="unused", seed=3)
    assert cifar.class_counts == folder.class_counts
    folder_targets = np.repeat(np.arange(10), 5000)
    for c in range(10):
        in_folder = folder.long_tail_indices[folder_targets[folder.long_tail_indices] == c] - 5000 * c
        members = np.flatnonzero(release_targets == c)
        kept = cifar.long_tail_indices
        in_release = np.searchsorted(members, kept[release_targets[kept] == c])
        assert in_folder.tolist() == in_release.tolist()
    paths = folder.train_dataset.paths
    assert paths[0].endswith(os.path.join("train", "airplane", "0000.jpg"))
    x, y = folder.train_dataset[len(paths) - 1]
    assert x.shape == (3, 32, 32) and y == 9


# ---------------------------------------------------------------------------- the shared arguments through **kwargs
_SHARED = {"imbalance_ratio": 7.5, "batch_size": 9, "seed": 3, "upper_fraction": 0.25, "search_split": True,
           "upper_batch_size": 11, "val_source": "upper", "min_count": 3, "step_fraction": 0.4,
           "upper_augment": False, "profile": "step", "fold_in_epoch": 2, "num_workers": 0}


@pytest.mark.parametrize("cls, own", [
    (LongTailCIFAR10, {"root": "cifar", "check_integrity": False}),
    (LongTailCIFAR100, {"root": "cifar", "download": False}),
    (LongTailImageFolder, {"root": "tree", "verify_images": False}),
    (LongTailDigits, {"test_per_class": 20, "augment": True}),
    (ColoredDigits, {"num_groups": 3, "correlation": 0.8}),
])
def test_base_arguments_reach_the_base_from_yaml(tmp_path: Path, cls: type, own: dict) -> None:
    """The subclasses forward the base's arguments through ``**kwargs``; jsonargparse (LightningCLI's parser) follows
    them into the base's signature, so a YAML config and ``--help`` still offer every one, typed, and they reach
    the base's checks and attributes."""
    import yaml
    from jsonargparse import ArgumentParser

    config = {"data": {"class_path": f"{cls.__module__}.{cls.__name__}", "init_args": {**own, **_SHARED}}}
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(config))
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_subclass_arguments(LongTailDataModule, "data")
    dm = parser.instantiate(parser.parse_args(["--config", str(path)])).data
    assert type(dm) is cls
    for key, value in {**own, **_SHARED}.items():
        assert dm.hparams[key] == value and getattr(dm, key) == value, key
    # --help names every base argument with its type, for every subclass
    help_text = _subclass_help(parser, cls)
    for key in [*_SHARED, "device_resident"]:
        if cls is ColoredDigits and key == "device_resident":
            assert "--data.device_resident" not in help_text  # not taken: tinted per sample on the host
        else:
            assert f"--data.{key}" in help_text, key
    # a bad value of a base argument is refused by the base's check, naming it
    bad = {"data": {"class_path": config["data"]["class_path"], "init_args": {**own, "batch_size": 0}}}
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="batch_size"):
        parser.instantiate(parser.parse_args(["--config", str(path)]))


def _subclass_help(parser, cls: type) -> str:
    """What ``--data.help <class>`` prints."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parser.parse_args(["--data.help", f"{cls.__module__}.{cls.__name__}"])
    return out.getvalue()


@pytest.mark.parametrize("cls, expected", [
    (LongTailDigits, {"batch_size": 64, "min_count": 2, "imbalance_ratio": 100.0}),
    (ColoredDigits, {"batch_size": 64, "min_count": 2, "imbalance_ratio": 1.0}),
    (LongTailCIFAR10, {"batch_size": 128, "min_count": 1, "imbalance_ratio": 100.0}),
])
def test_subclass_defaults_of_shared_arguments(cls: type, expected: dict) -> None:
    """A subclass that changes a shared argument's default declares just that one; the rest are the base's."""
    dm = cls()
    assert {key: getattr(dm, key) for key in expected} == expected
    assert (dm.seed, dm.upper_fraction, dm.val_source) == (0, 0.2, "test")


def test_colored_digits_refuses_device_resident() -> None:
    with pytest.raises(ValueError, match="device_resident"):
        ColoredDigits(device_resident=True)


def test_unknown_argument_is_refused() -> None:
    with pytest.raises(TypeError, match="batchsize"):
        LongTailDigits(batchsize=8)
