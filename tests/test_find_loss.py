"""find_loss: the search on a copy, the decided loss set on the module, frozen (lightning/find_loss.py)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import linear_module
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback, AutoBalanceMixin, find_loss
from lightning_autobalance.data.search_split import search_split
from lightning_autobalance.lightning.mixin import loss_from_file

COUNTS = [60, 24, 10]
TRAINER = {"max_epochs": 3, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
           "enable_progress_bar": False, "enable_model_summary": False}
# tiny blobs never fit well, where the default check would put the start back: the heads decide here
SEARCH = {"warmup_fraction": 0.0, "every_n_steps": 1, "hyper_lr": 0.2, "fit_tolerance": None}


class Module(linear_module(AutoBalanceMixin, pl.LightningModule, in_features=4)):  # type: ignore[misc]
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1e-3)


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    x = torch.randn(len(y), 4, generator=gen) + 2.0 * torch.nn.functional.one_hot(y, 4).float()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)


@pytest.mark.parametrize("preset, decided", [("ce", "found loss kept"), ("la", "start put back")])
def test_find_loss_sets_the_decided_loss_frozen_on_the_whole_counts_and_leaves_the_weights(tmp_path, preset, decided):
    torch.manual_seed(0)
    model = Module(COUNTS, preset=preset, search=("offset",))
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("autobalance")}
    found = find_loss(model, _data(), trainer_kwargs={**TRAINER, "default_root_dir": tmp_path}, callback_kwargs=SEARCH)
    params = model.autobalance_parameters()
    assert params.frozen and found.hyper_steps > 0 and found.path == tmp_path / "find_loss" / "found_loss.yaml"
    assert params.class_counts[0].tolist() == COUNTS  # the whole training set's, not the lower split's
    assert found.search_model.autobalance_parameters().class_counts[0].tolist() == [48, 19, 8]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # the search trained a copy
    # the loss set is the file's, rebuilt on the whole counts, and it carries the check's decision
    expected, _ = loss_from_file(found.path, COUNTS)
    assert torch.allclose(params.tables().offset, expected.tables().offset)
    assert found.decision == params.decision and found.decision["decision"] == decided  # both paths, on this data
    kept = decided == "found loss kept"
    start = Module(COUNTS, preset=preset).autobalance_parameters().tables().offset
    moved = not torch.allclose(found.tables.offset, start)
    assert moved == kept
    # the user's own fit then trains the model to keep with that loss, unchanged
    before = params.tables().offset.clone()
    pl.Trainer(**TRAINER).fit(model, _data())
    assert torch.equal(model.autobalance_parameters().tables().offset, before)


def test_find_loss_is_the_documented_manual_recipe(tmp_path):
    """Split, copy, callback on the upper part, export, load frozen: the same loss, to the last bit."""
    torch.manual_seed(0)
    model = Module(COUNTS, preset="la", search=("offset",))
    manual = Module(COUNTS, preset="la", search=("offset",))
    manual.load_state_dict(model.state_dict())
    found = find_loss(model, _data(), trainer_kwargs={**TRAINER, "default_root_dir": tmp_path / "a"},
                      callback_kwargs=SEARCH, seed=3)

    torch.manual_seed(0)
    loader = _data()
    split = search_split(loader.dataset, 0.2, 3)
    searched = Module(split.class_counts, preset="la", search=("offset",))
    searched.load_state_dict({k: v for k, v in manual.state_dict().items() if not k.startswith("autobalance")},
                             strict=False)
    cb = AutoBalanceCallback(**SEARCH, upper_dataloader=DataLoader(split.upper, batch_size=16))
    pl.Trainer(**TRAINER, callbacks=[cb]).fit(searched, DataLoader(split.lower, batch_size=16, shuffle=True))
    searched.export_loss(tmp_path / "manual.yaml")
    manual.load_loss(tmp_path / "manual.yaml")
    assert torch.equal(manual.autobalance_parameters().tables().offset, model.autobalance_parameters().tables().offset)
    assert cb.hyper_steps == found.hyper_steps


def test_find_loss_finds_the_counts_when_the_module_was_given_none(tmp_path):
    torch.manual_seed(0)
    model = Module.__new__(Module)
    pl.LightningModule.__init__(model)
    model.layer = torch.nn.Linear(4, 3)
    find_loss(model, _data(), trainer_kwargs={**TRAINER, "default_root_dir": tmp_path}, callback_kwargs=SEARCH)
    assert model.autobalance_parameters().class_counts[0].tolist() == COUNTS and model.loss_frozen


@pytest.mark.parametrize("bad, match", [
    ({"train_dataloaders": None}, "give train_dataloaders"),
    ({"trainer_kwargs": {"callbacks": [AutoBalanceCallback()]}}, "adds its own AutoBalanceCallback"),
    ({"callback_kwargs": {"upper_dataloader": None}}, "leave upper and upper_dataloader out"),
    ({"train_dataloaders": [1, 2]}, "needs one DataLoader over a map-style dataset"),
])
def test_find_loss_refuses_bad_arguments_before_training(bad, match):
    model = Module(COUNTS)
    args = {"train_dataloaders": _data(), **bad}
    with pytest.raises(ValueError, match=match):
        find_loss(model, args.pop("train_dataloaders"), **args)


def test_find_loss_refuses_a_frozen_loss():
    model = Module(COUNTS)
    model.freeze_loss()
    with pytest.raises(ValueError, match="the module's loss is frozen"):
        find_loss(model, _data())
