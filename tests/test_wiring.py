"""Wiring a module to the search, told early and plainly (issue 34): a searchable loss fitted without the callback
says so; a training step that never calls the searched loss is refused at the fit's first optimizer step; the head
is the layer watched making the logits, not the last nn.Linear registered; a setting given explicitly is not warned
of."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from test_head import _data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback, AutoBalanceMixin, Estimator, UpperData
from lightning_autobalance.core.head import watch_head
from lightning_autobalance.models.normed_linear import NormedLinear

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
]

K, D = 3, 4
COUNTS = [36, 9, 3]


def _loaders(seed=0):
    x, y, xu, yu = _data(seed=seed, n=48, m=30)
    train = DataLoader(TensorDataset(x.float(), y), batch_size=16, shuffle=False)
    upper = DataLoader(TensorDataset(xu.float(), yu), batch_size=8)
    return train, upper


def _trainer(callbacks=(), **kwargs) -> pl.Trainer:
    options = {"max_epochs": 2, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    return pl.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


class Module(AutoBalanceMixin, pl.LightningModule):
    """A small network whose layers ``build`` makes; ``autobalance_loss`` as its training loss, SGD with weight
    decay (the held-back check's head needs some)."""

    def __init__(self, **autobalance):
        super().__init__()
        self.build()
        self.configure_autobalance(COUNTS, **autobalance)
        self.steps_run = 0

    def build(self):
        self.body = nn.Sequential(nn.Linear(D, 8), nn.ReLU())
        self.fc = nn.Linear(8, K)

    def forward(self, x):
        return self.fc(self.body(x))

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        x, y = batch
        return self.autobalance_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1e-3)


def _fit(model, callback=None, **trainer_kwargs):
    torch.manual_seed(0)
    train, upper = _loaders()
    callbacks = [] if callback is None else [callback(upper)]
    trainer = _trainer(callbacks, **trainer_kwargs)
    trainer.fit(model, train_dataloaders=train)
    return trainer


def _searching(holdout=None, **settings):
    def make(upper):
        return AutoBalanceCallback(upper=UpperData(dataloader=upper, holdout=holdout), warmup_fraction=0.0,
                                   every_n_steps=1, **settings)
    return make


# ---------------------------------------------------------------------------------------------------------------
# 3. no silent no-search
# ---------------------------------------------------------------------------------------------------------------
def _no_search_warnings(model, callback=None) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(model, callback)
    return [str(w.message) for w in caught if "has no AutoBalanceCallback" in str(w.message)]


def test_a_searchable_loss_fitted_without_the_callback_says_so_once():
    said = _no_search_warnings(Module())
    assert len(said) == 1  # two epochs, six training steps: said once
    assert "searches nothing" in said[0] and "configure_autobalance(..., freeze=True)" in said[0]


def test_no_word_with_the_callback_or_a_frozen_loss():
    assert _no_search_warnings(Module(), _searching()) == []
    assert _no_search_warnings(Module(freeze=True)) == []
    assert _no_search_warnings(Module(search=())) == []  # nothing to search


# ---------------------------------------------------------------------------------------------------------------
# 4. mis-wiring refused at the first optimizer step
# ---------------------------------------------------------------------------------------------------------------
class OwnCriterion(Module):
    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        x, y = batch
        return F.cross_entropy(self(x), y)


def test_a_training_step_with_its_own_criterion_is_refused_at_the_first_optimizer_step():
    model = OwnCriterion()
    torch.manual_seed(0)
    train, upper = _loaders()
    callback = AutoBalanceCallback(upper=UpperData(dataloader=upper, holdout=0))  # the default schedule: a warm-up
    trainer = _trainer([callback], max_epochs=10)
    with pytest.raises(RuntimeError, match=r"call self\.autobalance_loss\(logits, y\) in training_step") as info:
        trainer.fit(model, train_dataloaders=train)
    assert "\n" not in str(info.value) and "the first of this fit" in str(info.value)
    assert trainer.global_step == 0 and model.steps_run == 1  # not after the warm-up
    assert callback.hyper_steps == 0


def test_a_frozen_loss_with_its_own_criterion_is_not_refused():
    trainer = _fit(OwnCriterion(freeze=True), _searching(), max_epochs=1)
    assert trainer.global_step == 3


# ---------------------------------------------------------------------------------------------------------------
# 5. the head is the layer that makes the logits
# ---------------------------------------------------------------------------------------------------------------
class ClassifierFirst(Module):
    """Defines its classifier before its body: the last nn.Linear registered is a hidden layer."""

    def build(self):
        self.fc = nn.Linear(8, K)
        self.body = nn.Sequential(nn.Linear(D, 8), nn.ReLU())


class NormedHead(Module):
    """A cosine head (not an nn.Linear) after a hidden nn.Linear of width K."""

    def build(self):
        self.body = nn.Sequential(nn.Linear(D, K), nn.ReLU())
        self.fc = NormedLinear(K, K)


class ScaledNormedHead(NormedHead):
    """The same, its logits computed after the last layer: which layer makes them cannot be told."""

    def forward(self, x):
        return self.fc(self.body(x)) * 2.0


def test_watch_head_finds_the_layer_whose_output_the_logits_are():
    torch.manual_seed(0)
    x = torch.randn(4, D)
    first = ClassifierFirst()
    assert watch_head(first, lambda: first(x)).name == "fc"
    wrapped = nn.Sequential(nn.Linear(D, 8), nn.Sequential(nn.Dropout(0.0), nn.Linear(8, K), nn.Identity()))
    assert watch_head(wrapped, lambda: wrapped(x)).name == "1.1"  # through containers and an identity
    assert watch_head(wrapped, lambda: torch.log_softmax(wrapped(x), 1) / 2).name == "1.1"
    normed = NormedHead()
    watched = watch_head(normed, lambda: normed(x))
    assert watched.name == "fc" and not watched.linear
    scaled = ScaledNormedHead()
    watched = watch_head(scaled, lambda: scaled(x))
    assert watched.name is None and "several" in watched.why


def test_a_module_defining_its_classifier_first_is_checked_on_its_classifier():
    trainer = _fit(ClassifierFirst(), _searching())
    cb = trainer.callbacks[0]
    assert cb.held_back_check.head == "fc"
    assert cb.check_result is not None and cb.check_result.samples == 15


def test_the_head_method_solves_the_classifier_of_a_module_defining_it_first():
    trainer = _fit(ClassifierFirst(), _searching(holdout=0, estimator=Estimator(method="head")),
                   max_epochs=1)
    cb = trainer.callbacks[0]
    assert cb._estimator.head == "fc" and cb.hyper_steps == 3


def test_a_normed_head_is_not_checked_on_a_hidden_layer_of_width_k(caplog):
    with caplog.at_level("INFO"):
        trainer = _fit(NormedHead(), _searching())
    cb = trainer.callbacks[0]
    assert cb.check_result is None and cb.held_back_check.held_back is None and cb.hyper_steps > 0
    assert "no held-back check (the logits come from 'fc', a NormedLinear, not an nn.Linear)" in caplog.text


@pytest.mark.parametrize("settings, match", [
    ({"estimator": Estimator(method="head")}, r"Estimator\(method='head'\) needs the classifier head to be an "
                                              r"nn.Linear: the logits come from 'fc', a NormedLinear"),
    ({"upper": UpperData(holdout=0.5)}, r"UpperData\(holdout=0.5\) checks the found loss at an nn.Linear"),
])
def test_a_normed_head_is_refused_before_training_where_a_linear_head_is_needed(settings, match):
    model = NormedHead()
    torch.manual_seed(0)
    train, upper = _loaders()
    upper_data = settings.pop("upper", UpperData())
    callback = AutoBalanceCallback(upper=UpperData(dataloader=upper, holdout=upper_data.holdout), **settings)
    trainer = _trainer([callback])
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, train_dataloaders=train)
    assert model.steps_run == 0


def test_a_head_that_cannot_be_told_is_refused_before_training_and_can_be_named():
    model = ScaledNormedHead()
    torch.manual_seed(0)
    train, upper = _loaders()
    trainer = _trainer([AutoBalanceCallback(upper_dataloader=upper)])
    with pytest.raises(ValueError, match=r"cannot tell which layer of ScaledNormedHead makes the logits.*"
                                         r"Estimator\(head='<layer name>'\) \(its nn.Linear layers: body.0\)"):
        trainer.fit(model, train_dataloaders=train)
    assert model.steps_run == 0
    trainer = _fit(ScaledNormedHead(), _searching(holdout=0), max_epochs=1)
    assert trainer.callbacks[0].hyper_steps == 3  # no head needed: nothing watched


class WithNoise(Module):
    """Batch normalisation and dropout: the forward pass that watches the head must touch neither."""

    def build(self):
        self.body = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
        self.fc = nn.Linear(8, K)


def test_watching_the_head_leaves_the_fit_unchanged():
    """The forward pass that finds the head changes nothing the training sees (random state, buffers, mode)."""
    def run(head):
        torch.manual_seed(1)
        model = WithNoise()
        trainer = _fit(model, _searching(estimator=Estimator(head=head)))
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        return state, torch.get_rng_state(), trainer

    named, rng_named, _ = run("fc")  # given: nothing watched
    watched, rng_watched, trainer = run(None)
    assert trainer.callbacks[0].held_back_check.head == "fc"
    assert named.keys() == watched.keys() and all(torch.equal(named[k], watched[k]) for k in named)
    assert torch.equal(rng_named, rng_watched)


# ---------------------------------------------------------------------------------------------------------------
# 6. no warning for a setting given explicitly
# ---------------------------------------------------------------------------------------------------------------
class WithVal(Module):
    def val_dataloader(self):
        return _loaders(seed=5)[1]

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


@pytest.mark.parametrize("source, warned", [("val", False), ("auto", True)])
def test_the_validation_data_is_warned_of_only_when_auto_falls_back_to_it(source, warned):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(WithVal(), lambda upper: AutoBalanceCallback(upper=UpperData(source=source), every_n_steps=1,
                                                                     warmup_fraction=0.0), max_epochs=1)
    said = [str(w.message) for w in caught if "using the validation dataloader as upper data" in str(w.message)]
    assert len(said) == int(warned)
    assert trainer.callbacks[0].hyper_steps == 3
