"""``ImbalancedClassifier(loss=...)`` given as a value: the package's loss modules and plain criteria train the
network, a name trains as its value bit for bit, the deprecated per-loss arguments still work (with a warning), bad
values fail at construction with a message, checkpoints and the CLI's ``class_path`` work. Tiny random data, a few
CPU steps."""

from __future__ import annotations

import sys

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import ImbalancedClassifier
from lightning_autobalance.core.losses import FocalLoss, GroupDROLoss, LDAMLoss
from lightning_autobalance.models import NormedLinear
from lightning_autobalance.runner.pipeline import BASELINES

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = [6, 4, 2]


def _data(groups: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 64, generator=gen)
    y = torch.arange(12) % 3
    tensors = (x, y, torch.arange(12) % 2) if groups else (x, y)
    return DataLoader(TensorDataset(*tensors), batch_size=4)


def _fit(model: ImbalancedClassifier, loader: DataLoader, steps: int = 3) -> ImbalancedClassifier:
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    return model


def _trained(seed: int = 0, steps: int = 3, **kwargs) -> ImbalancedClassifier:
    pl.seed_everything(seed, verbose=False)
    model = ImbalancedClassifier("digits_net", 3, COUNTS, **kwargs)
    return _fit(model, _data(groups=bool(kwargs.get("num_groups"))), steps)


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key
        else:  # the AutoBalance loss's settings (extra state)
            assert sa[key] == sb[key], key


# ====================================================================== names are values
_VALUES = {"ldam_drw": LDAMLoss, "focal": FocalLoss, "group_dro": GroupDROLoss}


@pytest.mark.parametrize("name", sorted(_VALUES))
def test_each_named_baseline_trains_as_its_value_bitwise(name: str) -> None:
    """What the pipeline builds for a baseline by name (``BASELINES``), as a value and as the ``class_path`` mapping
    of ``baseline_losses`` (and of checkpoints): the same parameters to the last bit, over 7 steps (3 epochs)."""
    overrides = {**BASELINES[name], "search": (), "loss_file": None, "freeze_loss": False}
    groups = {"num_groups": 2} if name == "group_dro" else {}
    by_name = _trained(steps=7, **overrides, **groups)
    by_value = _trained(steps=7, **{**overrides, "loss": _VALUES[name]()}, **groups)
    path = f"lightning_autobalance.core.losses.{_VALUES[name].__name__}"
    by_mapping = _trained(steps=7, **{**overrides, "loss": {"class_path": path, "init_args": {}}}, **groups)
    assert type(by_name.criterion) is _VALUES[name] and by_name.hparams.loss == BASELINES[name]["loss"]
    _assert_same_weights(by_name, by_value)
    _assert_same_weights(by_name, by_mapping)


def test_the_deprecated_per_loss_arguments_warn_and_configure_the_named_value() -> None:
    with pytest.warns(FutureWarning, match=r"ImbalancedClassifier\(drw_epoch=1\) is deprecated .*LDAMLoss"):
        by_name = _trained(steps=7, loss="ldam", drw_epoch=1)  # DRW from the second of 3 epochs
    by_value = _trained(steps=7, loss=LDAMLoss(drw_epoch=1))
    assert by_name.criterion.reweighting and by_name.criterion.drw_epoch == 1
    _assert_same_weights(by_name, by_value)
    with pytest.warns(FutureWarning, match="deprecated"):  # one that configures another name is ignored
        assert isinstance(ImbalancedClassifier("digits_net", 3, COUNTS, loss="focal", drw_epoch=1).criterion,
                          FocalLoss)


# ====================================================================== the package's losses as values
def test_a_focal_loss_object_trains_as_the_name_bitwise() -> None:
    with pytest.warns(FutureWarning, match="deprecated"):
        by_name = _trained(loss="focal", focal_gamma=2.0)
    by_value = _trained(loss=FocalLoss(gamma=2.0))
    assert isinstance(by_value.criterion, FocalLoss) and by_value.criterion.gamma == 2.0
    _assert_same_weights(by_name, by_value)
    # the loss was used: another gamma trains other weights from the same start
    other = _trained(loss=FocalLoss(gamma=0.5))
    assert not torch.equal(other.network.state_dict()["head.weight"], by_value.network.state_dict()["head.weight"])
    assert tuple(by_value.autobalance_parameters().search) == ()  # the AutoBalance loss is not searched


def test_an_ldam_loss_object_gets_the_cosine_head_and_trains_as_the_name() -> None:
    with pytest.warns(FutureWarning, match="deprecated"):
        by_name = _trained(loss="ldam", ldam_scale=10.0)
    by_value = _trained(loss=LDAMLoss(COUNTS, scale=10.0))
    sized = _trained(loss=LDAMLoss(scale=10.0))  # without class_counts: sized for the model
    assert isinstance(by_value.network.head, NormedLinear)
    _assert_same_weights(by_name, by_value)
    _assert_same_weights(by_name, sized)
    assert sized.hparams.loss["init_args"]["class_counts"] is None  # recorded as given
    with pytest.raises(ValueError, match=r"built for 2 classes .* num_classes is 3"):
        ImbalancedClassifier("digits_net", 3, COUNTS, loss=LDAMLoss([5, 5]))


def test_a_group_dro_loss_object_must_fit_the_model_and_moves_its_q() -> None:
    pl.seed_everything(0, verbose=False)
    criterion = GroupDROLoss(3, 2, step_size=0.5)
    model = _fit(ImbalancedClassifier("digits_net", 3, COUNTS, num_groups=2, loss=criterion), _data(groups=True))
    assert model.criterion is criterion
    assert not torch.allclose(criterion.q, torch.full((6,), 1 / 6))  # the online weights moved during training
    with pytest.raises(ValueError, match="over='cell' needs groups"):
        ImbalancedClassifier("digits_net", 3, COUNTS, loss=GroupDROLoss(3, 2))
    over_classes = ImbalancedClassifier("digits_net", 3, COUNTS, loss=GroupDROLoss(3, 1, over="class"))  # no groups
    assert over_classes.criterion.q.shape == (3,)
    with pytest.raises(ValueError, match=r"built for num_classes=3, num_groups=2 .* num_groups=3"):
        ImbalancedClassifier("digits_net", 3, COUNTS, num_groups=3, loss=GroupDROLoss(3, 2))


# ====================================================================== a criterion of one's own
def test_a_plain_callable_criterion_is_used() -> None:
    calls: list[tuple[int, bool]] = []

    def hinge(logits: torch.Tensor, target: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
        calls.append((logits.shape[0], group is None))
        return F.multi_margin_loss(logits, target)

    model = _trained(loss=hinge)
    assert calls == [(4, True)] * 3  # every training step, (x, y) batches: group None
    assert model.criterion is hinge
    assert tuple(model.autobalance_parameters().search) == ()  # the AutoBalance loss is not searched
    # the same as a training loop with that loss: the criterion's gradient moved the weights
    reference = _trained(loss=lambda logits, target, group: F.multi_margin_loss(logits, target))
    _assert_same_weights(model, reference)


class _Epochs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def forward(self, logits, target, group=None):
        return F.cross_entropy(logits, target)


def test_a_module_criterion_with_set_epoch_is_told_the_epoch() -> None:
    criterion = _Epochs()
    pl.seed_everything(0, verbose=False)
    _fit(ImbalancedClassifier("digits_net", 3, COUNTS, loss=criterion), _data(), steps=7)  # 3 batches an epoch
    assert criterion.epochs == [0, 1, 2]


def test_a_criterion_that_returns_no_scalar_fails_with_a_message() -> None:
    model = ImbalancedClassifier("digits_net", 3, COUNTS,
                                 loss=lambda logits, target, group: F.cross_entropy(logits, target, reduction="none"))
    with pytest.raises(ValueError, match=r"must return a scalar tensor; function returned Tensor of shape \(4,\)"):
        _fit(model, _data(), steps=1)


# ====================================================================== bad values
@pytest.mark.parametrize(("loss", "message"), [
    ("cross_entropy", r"loss must be 'autobalance', 'ldam', 'focal' or 'group_dro', or a criterion object .*"
                      r"got 'cross_entropy'"),
    (FocalLoss, r"not a class: got the class FocalLoss; construct it \(FocalLoss\(...\)\)"),
    (2.0, r"or a criterion: an nn.Module or callable criterion\(logits, target, group\) .* got a float"),
    (lambda logits, target: logits.sum(),
     r"called as criterion\(logits, target, group\).*signature \(logits, target\)"),
    (nn.CrossEntropyLoss(), r"CrossEntropyLoss with signature \(input: .*, target: .*\) .* cannot be: too many "
                            r"positional arguments. A two-argument loss can be wrapped: lambda logits, target, group"),
])
def test_a_bad_loss_value_fails_at_construction(loss, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImbalancedClassifier("digits_net", 3, COUNTS, loss=loss)


@pytest.mark.parametrize("setting", [{"focal_gamma": 2.0}, {"drw_epoch": 30}, {"ldam_scale": 10.0},
                                     {"ldam_max_margin": 0.3}, {"dro_step_size": 0.1}])
def test_a_per_loss_argument_with_a_loss_value_fails(setting: dict) -> None:
    (name, value), = setting.items()
    with pytest.raises(ValueError, match=rf"{name}={value!r} would be ignored: .* loss is a FocalLoss object"):
        ImbalancedClassifier("digits_net", 3, COUNTS, loss=FocalLoss(2.0), **setting)
    with pytest.warns(FutureWarning, match="deprecated"):  # with a name: deprecated, but they configure it
        ImbalancedClassifier("digits_net", 3, COUNTS, loss="focal", **setting)


# ====================================================================== checkpoints
def _checkpoint(model: ImbalancedClassifier, path) -> str:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return str(path)


def test_checkpoint_of_a_package_loss_object_holds_its_class_path_and_loads_alone(tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    criterion = GroupDROLoss(step_size=0.5)  # sized for the model
    model = _fit(ImbalancedClassifier("digits_net", 3, COUNTS, num_groups=2, loss=criterion), _data(groups=True))
    path = _checkpoint(model, tmp_path / "dro.ckpt")
    saved = torch.load(path, weights_only=True)  # plain data: the object is not pickled
    assert saved["hyper_parameters"]["loss"] == {
        "class_path": "lightning_autobalance.core.losses.GroupDROLoss",
        "init_args": {"num_classes": None, "num_groups": None, "step_size": 0.5, "over": "cell"}}
    loaded = ImbalancedClassifier.load_from_checkpoint(path)
    assert loaded.criterion.step_size == 0.5 and not torch.allclose(loaded.criterion.q, torch.full((6,), 1 / 6))
    assert torch.equal(loaded.criterion.q, model.criterion.q)  # the state travels in the state_dict
    _assert_same_weights(loaded, model)


def test_checkpoint_of_a_function_asks_for_it_and_loads_with_it(tmp_path) -> None:
    model = _trained(loss=_cross_entropy)
    path = _checkpoint(model, tmp_path / "function.ckpt")
    saved = torch.load(path, weights_only=True)["hyper_parameters"]["loss"]
    assert saved == {"not_saved": f"{__name__}._cross_entropy"}
    with pytest.raises(ValueError, match=r"built with a loss object.*load_from_checkpoint\(path, loss="):
        ImbalancedClassifier.load_from_checkpoint(path)
    _assert_same_weights(ImbalancedClassifier.load_from_checkpoint(path, loss=_cross_entropy), model)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def test_checkpoint_of_a_named_loss_loads_alone(tmp_path) -> None:
    model = _trained(loss="focal")
    loaded = ImbalancedClassifier.load_from_checkpoint(_checkpoint(model, tmp_path / "focal.ckpt"))
    assert isinstance(loaded.criterion, FocalLoss) and loaded.criterion.gamma == 1.0
    _assert_same_weights(loaded, model)


# ====================================================================== LightningCLI / jsonargparse
def test_cli_takes_the_loss_as_a_class_path_and_checkpoints_rebuild_it(tmp_path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_autobalance.runner.cli import AutoBalanceCLI

    monkeypatch.setattr(sys, "argv", ["lightning-autobalance"])
    cli = AutoBalanceCLI(args=["--model.network", "digits_net", "--data", "LongTailDigits",
                               "--model.loss", "lightning_autobalance.core.losses.FocalLoss",
                               "--model.loss.gamma", "2.5",
                               "--trainer.logger", "false"], run=False)
    assert isinstance(cli.model.criterion, FocalLoss) and cli.model.criterion.gamma == 2.5
    assert cli.model.hparams["loss"] == {"class_path": "lightning_autobalance.core.losses.FocalLoss",
                                         "init_args": {"gamma": 2.5}}
    # with the CLI the hyperparameters hold the class_path, so load_from_checkpoint rebuilds the loss alone
    loaded = ImbalancedClassifier.load_from_checkpoint(_checkpoint(cli.model, tmp_path / "cli.ckpt"))
    assert isinstance(loaded.criterion, FocalLoss) and loaded.criterion.gamma == 2.5
    # the names keep working through the CLI; an LDAMLoss without class_counts gets the data's
    named = AutoBalanceCLI(args=["--model.network", "digits_net", "--data", "LongTailDigits", "--model.loss", "focal",
                                 "--trainer.logger", "false"], run=False)
    assert isinstance(named.model.criterion, FocalLoss) and named.model.criterion.gamma == 1.0
    ldam = AutoBalanceCLI(args=["--model.network", "digits_net", "--data", "LongTailDigits", "--model.loss",
                                "lightning_autobalance.core.losses.LDAMLoss", "--model.loss.drw_epoch", "30",
                                "--trainer.logger", "false"], run=False)
    assert ldam.model.criterion.drw_epoch == 30 and ldam.model.criterion.margins.numel() == 10
