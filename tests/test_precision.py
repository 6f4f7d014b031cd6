"""Mixed precision: bf16-mixed on the CPU here; float16 and CUDA under the ``gpu`` mark (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback, AutoBalanceMixin
from lightning_autobalance.core.hypergradient import Batch, hypergradient
from lightning_autobalance.core.objectives import BalancedCrossEntropy

COUNTS = [120, 40, 12]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class ConvNet(AutoBalanceMixin, pl.LightningModule):
    """A small CNN with BatchNorm, CIFAR-shaped inputs."""

    def __init__(self, search=("offset", "weight")) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(4),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
        self.configure_autobalance(COUNTS, preset="la", search=search)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.autobalance_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def images(counts, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    x = torch.randn(len(y), 3, 16, 16, generator=g) * 0.5
    x[:, 0] += (y == 0).float()[:, None, None]  # a colour cue per class
    x[:, 1] += (y == 1).float()[:, None, None]
    x[:, 2] += (y == 2).float()[:, None, None]
    return x, y


def fit(precision: str, accelerator: str, steps: int = 12, estimator=None):
    pl.seed_everything(0, verbose=False)
    x, y = images(COUNTS, 0)
    xu, yu = images([20, 20, 20], 1)
    model = ConvNet()
    callback = AutoBalanceCallback(holdout=0, every_n_steps=2, start_step=0, estimator=estimator,  # the search alone
                                   upper_dataloader=DataLoader(TensorDataset(xu, yu), batch_size=30, shuffle=True))
    trainer = pl.Trainer(max_steps=steps, accelerator=accelerator, devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    return model, callback


def hypergradients(device: torch.device, dtype: torch.dtype | None, **estimator):
    """The default hypergradient (or ``estimator``'s) of one fixed problem, in float32 or under autocast with
    ``dtype``."""
    torch.manual_seed(0)
    model = ConvNet().to(device).train()
    x, y = images(COUNTS, 0)
    xu, yu = images([20, 20, 20], 1)
    x, y, xu, yu = x[:64].to(device), y[:64].to(device), xu.to(device), yu.to(device)
    params = model.autobalance
    objective = BalancedCrossEntropy(COUNTS)
    scale = 1024.0 if dtype == torch.float16 else 1.0
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    with ctx:
        res = hypergradient(model, params.alpha(), params.tables, model.autobalance_loss_from_tables, objective,
                            [Batch(x, y)], [Batch(xu, yu)], loss_scale=scale, **estimator)
    return res


def cosine(a: dict, b: dict) -> float:
    u = torch.cat([v.flatten().double() for v in a.values()])
    v = torch.cat([v.flatten().double() for v in b.values()])
    return float(u @ v / (u.norm() * v.norm()))


@pytest.mark.parametrize("estimator", [None, {"method": "head", "weight_decay": 1e-3, "head_memory": 64}])
def test_bf16_mixed_fit_on_cpu_keeps_float32_loss_parameters(estimator):
    model, callback = fit("bf16-mixed", "cpu", estimator=estimator)
    assert callback.hyper_steps == 6 and callback.skipped_steps == 0
    for t in model.autobalance.alpha().values():
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
        assert t.abs().max() > 0  # the search moved them


def test_bf16_autocast_hypergradient_on_cpu_is_close_to_float32():
    ref = hypergradients(torch.device("cpu"), None)
    low = hypergradients(torch.device("cpu"), torch.bfloat16)
    assert low.finite and all(v.dtype == torch.float32 for v in low.grad.values())
    assert cosine(low.grad, ref.grad) > 0.95


def test_bf16_autocast_head_hypergradient_on_cpu_is_close_to_float32():
    """The head method under autocast: features read in bfloat16, the head's problem solved in float32."""
    head = {"method": "head", "weight_decay": 1e-3, "head_memory": 0}
    ref = hypergradients(torch.device("cpu"), None, **head)
    low = hypergradients(torch.device("cpu"), torch.bfloat16, **head)
    assert low.finite and all(v.dtype == torch.float32 for v in low.grad.values())
    assert cosine(low.grad, ref.grad) > 0.95


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_hypergradient_is_close_to_float32(dtype):
    device = torch.device("cuda")
    ref = hypergradients(device, None)
    low = hypergradients(device, dtype)
    assert low.finite
    assert cosine(low.grad, ref.grad) > 0.98


@pytest.mark.gpu
@cuda
def test_cuda_float32_hypergradient_matches_cpu():
    a = hypergradients(torch.device("cuda"), None)
    b = hypergradients(torch.device("cpu"), None)
    for k in b.grad:
        torch.testing.assert_close(a.grad[k].cpu(), b.grad[k], rtol=2e-3, atol=1e-5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed", "32-true"])
def test_cuda_fit_with_each_precision(precision):
    model, callback = fit(precision, "gpu")
    assert callback.hyper_steps + callback.skipped_steps == 6 and callback.hyper_steps >= 5
    for t in model.autobalance.alpha().values():
        # float32 whatever the precision (Lightning moves the module back to the CPU when the fit ends)
        assert t.dtype == torch.float32 and torch.isfinite(t).all()


@pytest.mark.gpu
@cuda
def test_cuda_16_mixed_overflow_is_skipped():
    class Overflow(BalancedCrossEntropy):
        def __call__(self, logits, target, group=None):
            return super().__call__(logits, target, group) * torch.tensor(float("inf"), device=logits.device)

    pl.seed_everything(0, verbose=False)
    x, y = images(COUNTS, 0)
    model = ConvNet()
    callback = AutoBalanceCallback(every_n_steps=2, start_step=0, objective=Overflow(COUNTS),
                                   upper_dataloader=DataLoader(TensorDataset(*images([20, 20, 20], 1)), batch_size=30))
    trainer = pl.Trainer(max_steps=4, accelerator="gpu", devices=1, precision="16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    before = {k: v.clone() for k, v in model.autobalance.alpha().items()}
    with pytest.warns(UserWarning, match="non-finite hypergradient"):
        trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    assert callback.skipped_steps == 2 and callback.hyper_steps == 0
    for k, v in model.autobalance.alpha().items():
        assert torch.equal(v.cpu(), before[k])


def test_the_toy_images_are_learnable():
    # The toy data must be learnable, or the precision checks above compare noise.
    x, y = images(COUNTS, 0)
    means = torch.stack([x[y == c].mean(dim=(0, 2, 3)) for c in range(3)])
    assert torch.equal(means.argmax(dim=1), torch.arange(3))
    assert F.one_hot(y).sum(0).tolist() == COUNTS
