"""The held-back check with a searched augmentation: it judges (start loss, start augmentation) against (found loss,
found augmentation) on training features augmented with each pair's strengths under the same draws, keeps or puts
back both, and a resumed fit keeps the augmentation's start. The reference figures are made here from the module's
own head inputs (a linear layer: the inputs themselves) and the draws of the check's stream, independently of the
reading code."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import linear_module
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback, AutoBalanceMixin, UpperData
from lightning_autobalance.core.augment import augment, draw
from lightning_autobalance.core.augment_parametrization import stream_seed
from lightning_autobalance.lightning import check as check_module
from lightning_autobalance.lightning.check import CHECK_STREAM, CheckResult, HeldBackCheck, check_found_loss

pytestmark = pytest.mark.usefixtures("one_thread")

COUNTS = [36, 9, 3]
Base = linear_module(AutoBalanceMixin, pl.LightningModule, in_features=4)


class Module(Base):  # type: ignore[misc, valid-type]
    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.autobalance_loss(self(self.autobalance_augment(x, y)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=1e-3)


def module(seed: int = 0, search=("offset", "augment")) -> Module:
    torch.manual_seed(seed)
    model = Module(COUNTS, preset="la", search=search)
    model.configure_augment({"ops": "noise+erase"}, parametrization="class", seed=4)
    return model


def data(seed: int = 0, n=(36, 9, 3), m=10):
    gen = torch.Generator().manual_seed(seed)

    def blobs(counts):
        y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
        return torch.randn(len(y), 4, generator=gen) + 1.5 * torch.nn.functional.one_hot(y, 4).float(), y

    x, y = blobs(n)
    xu, yu = blobs([m] * 3)
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(xu, yu), batch_size=8)


def objective(logits, target, group):
    return torch.nn.functional.cross_entropy(logits, target)


def moved(model) -> tuple[dict, dict]:
    """Moves the loss's and the augmentation's free values as a search would; returns their starts."""
    params, aug = model.autobalance_parameters(), model.autobalance_augment_parameters()
    start = ({k: v.clone() for k, v in params.alpha().items()}, {k: v.clone() for k, v in aug.alpha().items()})
    with torch.no_grad():
        for value in [*params.alpha().values(), *aug.alpha().values()]:
            value.add_(torch.linspace(-1.0, 1.0, value.numel()).reshape(value.shape))
    return start


def test_the_check_judges_each_pair_on_its_own_augmented_features_with_the_same_draws():
    model = module()
    train, held = data()
    params, aug = model.autobalance_parameters(), model.autobalance_augment_parameters()
    start_alpha, start_aug = moved(model)
    counts_before = dict(aug.draw_counts)
    result = check_found_loss(model, params, start_alpha, train, held, objective, 1e-3, fit_tolerance=None,
                              augmentation=aug, start_augment=start_aug)
    assert result.augmentation and aug.draw_counts == counts_before  # the training stream is not drawn from

    # the reference: the head's inputs are the (augmented) inputs; one draw per batch from the check's stream
    gen = torch.Generator().manual_seed(stream_seed(aug.seed, CHECK_STREAM, 0, 0))
    with torch.no_grad():
        tables = [aug.tables(start_aug), aug.tables()]
    rows: list[list[torch.Tensor]] = [[], []]
    for x, y in train:
        d = draw(aug.settings, x.shape, gen)
        for i, t in enumerate(tables):
            rows[i].append(augment(x, y, None, t, d, aug.settings))
    y_all = torch.cat([y for _, y in train])
    xh, yh = torch.cat([x for x, _ in held]), torch.cat([y for _, y in held])
    theta = torch.cat([model.layer.weight, model.layer.bias[:, None]], 1).reshape(-1).detach()
    with torch.no_grad():
        losses = [params.tables(start_alpha), params.tables()]
    expected = [check_module.compare_losses(torch.cat(r), y_all, None, xh, yh, None, [loss],
                                            model.autobalance_loss_from_tables, objective, theta, 3, True, 1e-3)[0]
                for r, loss in zip(rows, losses)]
    assert torch.cat(rows[0]).dtype == torch.float32 and not torch.equal(torch.cat(rows[0]), torch.cat(rows[1]))
    torch.testing.assert_close(torch.tensor([result.start, result.found], dtype=torch.float64),
                               torch.stack(expected).double(), rtol=1e-9, atol=1e-12)
    # without the augmentation both heads read the clean rows: other figures
    plain = check_found_loss(model, params, start_alpha, train, held, objective, 1e-3, fit_tolerance=None)
    assert not plain.augmentation and plain.found != result.found


def ready_check(model) -> tuple[HeldBackCheck, dict, dict]:
    chk = HeldBackCheck(share=0.5)
    chk.held_back = torch.arange(6)
    aug = model.autobalance_augment_parameters()
    chk.begin(model, model.autobalance_parameters().alpha(), [], weight_decay=1e-3, augment_alpha=aug.alpha())
    start = moved(model)
    return chk, start[0], start[1]


@pytest.mark.parametrize("keep", [False, True])
def test_a_check_that_puts_back_restores_the_augmentation_too_and_one_that_keeps_keeps_it(monkeypatch, keep):
    model = module()
    train, held = data()
    chk, start_alpha, start_aug = ready_check(model)
    found_aug = {k: v.clone() for k, v in model.autobalance_augment_parameters().alpha().items()}
    seen = {}

    def fake(module, params, start, train_batches, held_batches, objective, weight_decay, head, to_device, reduce,
             fit_tolerance, augmentation, start_augment, rank):
        seen.update(augmentation=augmentation, start_augment=start_augment)
        return CheckResult(1.0, 0.5 if keep else 2.0, 6, augmentation=augmentation is not None)

    monkeypatch.setattr(check_module, "check_found_loss", fake)
    result = chk.run(model, model.autobalance_parameters(), train, held, objective)
    assert seen["augmentation"] is model.autobalance_augment_parameters()
    assert all(torch.equal(seen["start_augment"][k], start_aug[k]) for k in start_aug)
    alpha, aug = model.autobalance_parameters().alpha(), model.autobalance_augment_parameters().alpha()
    wanted = found_aug if keep else start_aug
    assert all(torch.equal(aug[k].double(), wanted[k].double()) for k in wanted)
    assert all(torch.equal(alpha[k], start_alpha[k]) for k in start_alpha) != keep
    record = model.autobalance_parameters().decision
    assert record["augmentation"] == ("found augmentation kept" if keep else "start augmentation put back")
    assert "augmentation" in result.describe() and "augmentation" in result.reason


def test_a_resumed_check_keeps_the_augmentations_start():
    model = module()
    chk, _, start_aug = ready_check(model)
    state = chk.state_dict()
    assert all(torch.equal(state["start_augment"][k], start_aug[k]) for k in start_aug)
    resumed = HeldBackCheck(share=0.5)
    resumed.load_state_dict(state)
    resumed.held_back = torch.arange(6)
    aug = model.autobalance_augment_parameters()  # now at the values the search left (the checkpoint's)
    resumed.begin(model, model.autobalance_parameters().alpha(), [], weight_decay=1e-3, resumed=True,
                  augment_alpha=aug.alpha())
    assert all(torch.equal(resumed.start_augment[k], start_aug[k]) for k in start_aug)
    assert not all(torch.equal(aug.alpha()[k], start_aug[k]) for k in start_aug)
    fresh = HeldBackCheck(share=0.5)
    fresh.held_back = torch.arange(6)
    fresh.begin(model, model.autobalance_parameters().alpha(), [], weight_decay=1e-3)  # no augmentation searched
    assert fresh.start_augment is None and fresh.state_dict()["start_augment"] is None


# the second: the loss has no free value, the default holdout (which holds nothing back when nothing is searched)
@pytest.mark.parametrize("search", [("offset", "augment"), ("augment",)])
def test_in_a_fit_the_decision_covers_the_searched_augmentation(search):
    model = module(search=search)
    train, upper = data()
    aug = model.autobalance_augment_parameters()
    start = {k: v.clone() for k, v in aug.alpha().items()}
    upper_data = UpperData(dataloader=upper) if search == ("augment",) else UpperData(dataloader=upper, holdout=0.5)
    cb = AutoBalanceCallback(upper=upper_data, warmup_fraction=0.0, every_n_steps=1, hyper_lr=0.5, fit_tolerance=None)
    pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb]).fit(model, train_dataloaders=train)
    result = cb.check_result
    assert result is not None and result.augmentation
    now = model.autobalance_augment_parameters().alpha()
    assert all(torch.equal(now[k], start[k]) for k in start) != result.keep  # put back exactly, or kept as found
    assert model.autobalance_parameters().decision["augmentation"] in ("found augmentation kept",
                                                                       "start augmentation put back")


def test_find_loss_sets_the_decided_augmentation_frozen_on_the_module(tmp_path):
    from lightning_autobalance import find_loss

    model = module()
    train, _ = data(n=(60, 24, 10))
    train = DataLoader(train.dataset, batch_size=16, shuffle=True)
    found = find_loss(model, train, trainer_kwargs={"max_epochs": 2, "accelerator": "cpu", "logger": False,
                                                    "enable_progress_bar": False, "enable_model_summary": False,
                                                    "default_root_dir": tmp_path},
                      callback_kwargs={"warmup_fraction": 0.0, "every_n_steps": 1, "hyper_lr": 0.5,
                                       "fit_tolerance": None})
    aug = model.autobalance_augment_parameters()
    assert aug.frozen and model.loss_frozen and found.augmentation is not None
    searched = found.search_model.autobalance_augment_parameters()  # "class": the strengths do not follow counts
    for name, value in aug.strengths().items():
        torch.testing.assert_close(found.augmentation[name].double(), value.double(), rtol=0, atol=0)
        torch.testing.assert_close(value.double(), searched.strengths()[name].double(), rtol=1e-12, atol=1e-12)
    assert found.decision["augmentation"] in ("found augmentation kept", "start augmentation put back")
