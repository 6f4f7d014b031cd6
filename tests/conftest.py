"""Helpers shared by several test files."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny networks: one thread is as fast, kinder to a shared machine, and keeps runs bit-reproducible. Use it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")`` or as an argument."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def float64() -> Iterator[None]:
    """Every tensor made without a dtype is float64 (gradient checks against references); the default is restored
    afterwards. Use it as an argument, or ``pytest.fixture(autouse=True)`` a wrapper of it for a whole file."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class EpochSeededSampler(torch.utils.data.Sampler[int]):
    """Shuffles by (seed, epoch) only, so that the order of a resumed epoch is that of the uninterrupted run."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.length, generator=gen).tolist())

    def __len__(self) -> int:
        return self.length


def flat(tree) -> torch.Tensor:
    """The values of a dict of tensors as one vector (in the dict's order)."""
    return torch.cat([v.reshape(-1) for v in tree.values()])


def unflatten(vec, like) -> dict:
    """:func:`flat` undone: ``vec`` cut into tensors shaped as the values of ``like``."""
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


class ConvNet(nn.Module):
    """A tiny image network with batch norm (inputs ``(N, 2, 6, 6)``, 3 classes), for gradient checks."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Linear(3 * 36, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.bn(self.conv(x))).flatten(1))


def small_images(n: int = 12, seed: int = 0):
    """``n`` random ``(2, 6, 6)`` images in the default dtype, labels ``i % 3`` and groups ``(i // 3) % 2``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 6, 6, generator=gen, dtype=torch.get_default_dtype())
    return x, torch.arange(n) % 3, (torch.arange(n) // 3) % 2


class CrashAt(pl.Callback):
    """Raises in the middle of epoch ``epoch`` (an interruption after the checkpoint of the epoch before)."""

    #: an interruption, not a setting: a resumed stage without it is the same configuration
    changes_training = False

    def __init__(self, epoch: int = 2) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            raise RuntimeError("simulated interruption")


def crash_at(epoch: int) -> str:
    """The CLI argument that adds a :class:`CrashAt` callback."""
    return "--trainer.callbacks+=" + json.dumps({"class_path": "conftest.CrashAt", "init_args": {"epoch": epoch}})


def linear_module(*bases: type, in_features: int) -> type:
    """A minimal AutoBalance LightningModule class on the given bases (in that order): one linear layer,
    ``autobalance_loss`` as the training loss, SGD. ``cls(counts, **autobalance)`` builds one."""

    def __init__(self, counts, **autobalance):
        super(cls, self).__init__()
        self.layer = nn.Linear(in_features, len(counts))
        self.configure_autobalance(counts, **autobalance)

    def forward(self, x):
        return self.layer(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.autobalance_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    cls = type("LinearModule", bases, {"__init__": __init__, "forward": forward, "training_step": training_step,
                                       "configure_optimizers": configure_optimizers})
    return cls


def load_script(path: Path, name: str | None = None):
    """Imports a script that is not in a package (a benchmark, an example) as the module ``name`` (default: its
    file's stem)."""
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    """Imports ``benchmarks/<name>.py`` as the module ``name``."""
    return load_script(Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
