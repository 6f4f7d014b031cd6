"""The searched augmentation inside Lightning: the mixin's parameters and ``autobalance_augment``, the callback's hyper
step with ``search=[..., "augment"]``, and a tiny end-to-end search on synthetic images through the ready
classifier, resumed from a checkpoint to the same values."""

from __future__ import annotations

import csv

import pytest
import pytorch_lightning as pl
import torch
from conftest import EpochSeededSampler
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback, AutoBalanceMixin, ImbalancedClassifier
from lightning_autobalance.core.augment import AugmentSettings

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*validation_step.*"),
    pytest.mark.filterwarnings("ignore:.*Be aware that when using `ckpt_path`.*"),
]

COUNTS = [40, 12, 4]
K = len(COUNTS)


def images(counts, seed):
    """8 x 8 one-channel images: a bright 3 x 3 patch at a place of each class's own, on noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    x = 0.5 * torch.randn(len(y), 1, 8, 8, generator=gen)
    for i, c in enumerate(y.tolist()):
        r, col = [(1, 1), (1, 4), (4, 2)][c]
        x[i, 0, r:r + 3, col:col + 3] += 1.5
    return x, y


def trainer(callbacks=(), **kwargs) -> pl.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    return pl.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


AUGMENT = {"ops": "flip+shift+noise", "gated": "noise", "straight_through": False, "parametrization": "class",
           "seed": 3}


def search_setup(train_batches: int = 2):
    x, y = images(COUNTS, 1)
    train = DataLoader(TensorDataset(x, y), batch_size=16, sampler=EpochSeededSampler(len(y), seed=2))
    xu, yu = images([8] * K, 2)
    callback = AutoBalanceCallback(every_n_steps=1, warmup_fraction=0.0, holdout=0, hyper_lr=0.1, shrinkage=0.0,
                                   train_batches=train_batches, upper_dataloader=DataLoader(TensorDataset(xu, yu),
                                                                                            batch_size=12),
                                   estimator={"method": "unroll", "eta": 0.5})
    torch.manual_seed(0)
    model = ImbalancedClassifier("digits_net", num_classes=K, class_counts=COUNTS, search=("offset", "augment"),
                                 augmentation=dict(AUGMENT))
    return model, callback, train


def free_values(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in
            {**model.autobalance.alpha(), **model.autobalance_augmentation.alpha()}.items()}


def test_a_search_moves_the_per_class_strengths_and_resumes_to_the_same_values(tmp_path):
    model, callback, train = search_setup()
    start = model.autobalance_augmentation.strengths()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    logger = CSVLogger(tmp_path, name="log")
    trainer([callback, ckpt], max_epochs=4, enable_checkpointing=True, logger=logger, log_every_n_steps=1).fit(
        model, train)
    assert callback.hyper_steps == 16 and callback.skipped_steps == 0
    moved = model.autobalance_augmentation.strengths()
    assert sorted(moved) == ["flip", "noise", "p_noise", "shift"]
    for table, value in moved.items():  # every table, every class on its own
        change = (value - start[table]).abs() / start[table]  # relative: the start is close to no augmentation
        assert bool((change > 0.05).all()), (table, value, start[table])
        assert len(set(value.flatten().tolist())) == K, table
    assert model.autobalance_augmentation.draw_counts == {"train": 16, "hyper": 16}
    final = free_values(model)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in final.items() if not k.startswith("augment_"))

    # the strengths reach the logger with the other figures
    with open(next((tmp_path / "log").rglob("metrics.csv"))) as f:
        header = next(csv.reader(f))
    assert {"autobalance/augment/shift/0", "autobalance/augment/p_noise/2", "autobalance/offset/1"} <= set(header)

    # resumed from the checkpoint after the second epoch: the same values, to the last bit
    saved = torch.load(tmp_path / "epoch=1.ckpt", weights_only=False)["state_dict"]
    assert saved["autobalance_augmentation._extra_state"]["draw_counts"] == {"train": 8, "hyper": 8}
    resumed, resumed_cb, train = search_setup()
    trainer([resumed_cb], max_epochs=4).fit(resumed, train, ckpt_path=tmp_path / "epoch=1.ckpt")
    assert resumed_cb.hyper_steps == 16
    for name, value in final.items():
        assert torch.equal(free_values(resumed)[name], value), name

    # and a fresh classifier built from the checkpoint applies the found augmentation
    loaded = ImbalancedClassifier.load_from_checkpoint(tmp_path / "epoch=3.ckpt")
    for table, value in moved.items():
        torch.testing.assert_close(loaded.autobalance_augmentation.strengths()[table], value)


class Module(AutoBalanceMixin, pl.LightningModule):
    def __init__(self, augment_step: bool = True, **autobalance):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, K))
        self.augment_step = augment_step
        self.configure_autobalance(COUNTS, **autobalance)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.augment_step:
            x = self.autobalance_augment(x, y)
        return self.autobalance_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=0.01)


def test_autobalance_augment_is_the_identity_unless_searched_and_in_training():
    x, y = images(COUNTS, 0)
    plain = Module(search="offset")
    assert plain.autobalance_augment(x, y) is x and plain.autobalance_augment_parameters() is None
    assert not any(n.startswith("autobalance_augmentation") for n in plain.state_dict())
    searched = Module(search=("offset", "augment"))
    searched.configure_augment(AugmentSettings(ops="shift+noise"), seed=5)
    searched.eval()
    assert searched.autobalance_augment(x, y) is x  # evaluation mode
    searched.train()
    out = searched.autobalance_augment(x, y)
    assert out.shape == x.shape and not torch.equal(out, x) and not out.requires_grad
    # deterministic given the seed and the count of draws; the global random state untouched
    other = Module(search="offset+augment")
    other.configure_augment({"ops": "shift+noise"}, seed=5)
    other.train()
    state = torch.get_rng_state()
    assert torch.equal(other.autobalance_augment(x, y), out)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(other.autobalance_augment(x, y), out)  # the next draws
    # the count of draws travels with the state dict, so the next draws are the same
    again = Module(search="offset+augment")
    again.configure_augment({"ops": "shift+noise"}, seed=5)
    again.load_state_dict(searched.state_dict())
    again.train()
    assert again.autobalance_augmentation.draw_counts["train"] == 1
    torch.testing.assert_close(again.autobalance_augment(x, y), searched.autobalance_augment(x, y))
    # another parametrisation; the loss's own search is unchanged by "augment"
    groups = Module(search=("offset", "augment"), parametrization="groups", group_size=2)
    assert groups.autobalance.search == ("offset",)
    assert groups.autobalance_augmentation.kind == "groups"
    assert groups.autobalance_augmentation.alpha()["augment_shift"].shape == (1, 2)
    with pytest.raises(ValueError, match="parametrization must be one of"):
        groups.configure_augment(parametrization="rows")
    # no longer searched: the parameters go
    groups.configure_autobalance(COUNTS, search="offset", parametrization="groups", group_size=2)
    assert groups.autobalance_augment_parameters() is None


def test_a_search_without_autobalance_augment_in_the_training_step_is_stopped():
    x, y = images(COUNTS, 1)
    xu, yu = images([8] * K, 2)
    model = Module(augment_step=False, search=("offset", "augment"))
    model.configure_augment({"ops": "noise"})
    callback = AutoBalanceCallback(every_n_steps=1, warmup_fraction=0.0, holdout=0,
                                   upper_dataloader=DataLoader(TensorDataset(xu, yu), batch_size=12))
    with pytest.raises(RuntimeError, match=r"did not call `x = self.autobalance_augment\(x, y\)`"):
        trainer([callback], max_epochs=1).fit(model, DataLoader(TensorDataset(x, y), batch_size=16))


def test_the_augmentation_alone_is_searched_with_the_head_method():
    """Nothing of the loss searched: the callback still steps (the augmentation's values), here by the head's
    equilibrium through the features of the augmented inputs."""
    x, y = images(COUNTS, 1)
    xu, yu = images([8] * K, 2)
    torch.manual_seed(0)
    model = Module(search="augment")
    model.configure_augment({"ops": "noise+erase", "straight_through": False}, parametrization="hierarchical")
    start = {k: v.clone() for k, v in model.autobalance_augmentation.alpha().items()}
    callback = AutoBalanceCallback(every_n_steps=1, warmup_fraction=0.0, holdout=0, shrinkage=0.0,
                                   estimator={"method": "head", "weight_decay": 0.01, "head": "net.1"},
                                   upper_dataloader=DataLoader(TensorDataset(xu, yu), batch_size=12))
    trainer([callback], max_epochs=2).fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    assert callback.hyper_steps == 8 and model.autobalance.num_free() == 0
    assert all(not torch.equal(v, start[k]) for k, v in model.autobalance_augmentation.alpha().items())


@pytest.mark.parametrize("estimator", [{}, {"method": "unroll", "eta": 0.1, "product": "jvp"},
                                       {"method": "head", "weight_decay": 0.01, "head_steps": 2, "head_memory": 64,
                                        "head": "net.1"}])
def test_a_hyper_step_with_the_augmentation_searched_makes_no_host_read(estimator, monkeypatch):
    """The probe of tests/test_callback.py, watching the new files too: the whole optimizer step of a hyper step with
    the augmentation searched (every op, a gated one, an extra training batch) reads nothing back from the device."""
    import test_callback

    monkeypatch.setattr(test_callback, "_CORE", (*test_callback._CORE, "augment.py", "augment_term.py",
                                                 "augment_parametrization.py", "augment_step.py", "problem.py",
                                                 "solvers.py", "linear_solve.py"))
    x, y = images(COUNTS, 1)
    xu, yu = images([8] * K, 2)
    torch.manual_seed(0)
    model = Module(search=("offset", "augment"), validate_inputs=False)
    model.configure_augment({"ops": "mix+flip+shift+erase+noise", "gated": "noise"})
    callback = AutoBalanceCallback(holdout=0, every_n_steps=1, start_step=0, estimator=estimator, train_batches=2,
                                   upper_dataloader=DataLoader(TensorDataset(xu, yu), batch_size=12))
    probe = test_callback._HostReads()
    probe.install(monkeypatch)
    trainer([test_callback._WatchOptimizerSteps(probe), callback], max_steps=4).fit(
        model, DataLoader(TensorDataset(x, y), batch_size=16))
    monkeypatch.undo()
    assert callback.hyper_steps == 4 and callback.skipped_steps == 0
    assert sorted(set(probe.reads)) == []
