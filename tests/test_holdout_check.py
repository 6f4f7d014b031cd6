"""The held-back check (lightning_autobalance/lightning/check.py, UpperData(holdout=...), the callback's check).

References are independent: the heads' equilibria are re-solved with L-BFGS and autograd Newton (tests/test_head.py's
solver, not the one under test); the split is checked by counting.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import linear_module
from test_head import _balanced_ce, _data, _lbfgs_head, _linear, _train_loss
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback, AutoBalanceMixin, UpperData
from lightning_autobalance.core.losses import LossTables
from lightning_autobalance.lightning.batch_stream import BatchStream, ShardSampler
from lightning_autobalance.lightning.check import (
    CheckResult,
    check_found_loss,
    compare_losses,
    head_weight_decay,
    holdout_split,
    training_error,
)

K = 3


def _tables(offset):
    return LossTables(torch.ones(K, dtype=torch.float64), torch.as_tensor(offset, dtype=torch.float64),
                      torch.ones(K, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# the split
# ---------------------------------------------------------------------------------------------------------------
def test_holdout_split_is_stratified_disjoint_and_keeps_one_per_class_for_the_search():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 2 + [3])
    search, held = holdout_split(labels, 0.5, seed=3)
    assert sorted(search.tolist() + held.tolist()) == list(range(labels.numel()))
    assert torch.bincount(labels[held], minlength=4).tolist() == [5, 2, 1, 0]  # floor(0.5 n), >= 1, <= n - 1
    assert torch.bincount(labels[search], minlength=4).tolist() == [5, 3, 1, 1]
    again, _ = holdout_split(labels, 0.5, seed=3)
    other, _ = holdout_split(labels, 0.5, seed=4)
    assert torch.equal(again, search) and not torch.equal(other, search)
    # per (group, class) cell: each cell split on its own
    groups = torch.tensor([0, 1] * 5 + [0] * 5 + [0, 1] + [0])
    _, held_cells = holdout_split(labels, 0.5, seed=0, groups=groups)
    cells = groups * 4 + labels
    assert torch.bincount(cells[held_cells], minlength=8).tolist() == [2, 2, 0, 0, 2, 0, 0, 0]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_holdout_split_refuses_a_share_outside_the_open_interval(fraction):
    with pytest.raises(ValueError, match=r"holdout must be a share in \(0, 1\)"):
        holdout_split(torch.tensor([0, 0, 1, 1]), fraction)


def test_upper_data_holdout_is_validated_at_construction():
    with pytest.raises(ValueError, match=r"holdout must be a share of the upper data in \[0, 1\)"):
        UpperData(holdout=1.0)
    with pytest.raises(ValueError, match="holdout"):
        UpperData(holdout=True)
    assert UpperData.coerce({"holdout": 0.5}).holdout == 0.5


def test_batch_stream_over_a_subset_never_draws_the_rest_and_balances_the_subset():
    labels = torch.tensor([0] * 12 + [1] * 4)
    loader = DataLoader(TensorDataset(torch.arange(16), labels), batch_size=4)
    subset = torch.tensor([0, 1, 2, 3, 4, 5, 12, 13])
    stream = BatchStream(loader, seed=0, labels=labels[subset], subset=subset)
    drawn = torch.cat([stream.next()[0] for _ in range(12)])
    assert set(drawn.tolist()) <= set(subset.tolist())
    assert set(drawn.tolist()) == set(subset.tolist())  # every sample of the subset is drawn
    counts = torch.bincount(labels[drawn], minlength=2)
    assert counts[0] == counts[1]  # class-balanced over the subset
    with pytest.raises(ValueError, match="a subset of 3 indices for length 8"):
        ShardSampler(8, subset=torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------------------------
# the comparison, against independently re-solved equilibria (float64)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_compare_losses_scores_each_loss_at_its_independently_solved_equilibrium(bias):
    x, y, xu, yu = _data(seed=1)
    wd = 0.05
    objective = _balanced_ce([10, 10, 10])
    losses = [_tables([0.0, 0.0, 0.0]), _tables([-1.2, 0.4, 1.5])]
    theta0 = torch.zeros(K * (x.shape[1] + (1 if bias else 0)), dtype=torch.float64)
    values = compare_losses(x, y, None, xu, yu, None, losses, _train_loss, objective, theta0, K, bias, wd, steps=25)
    for tables, value in zip(losses, values):
        head = _lbfgs_head(x, y, tables, wd, bias)
        expected = objective(_linear(xu, head, bias), yu, None)
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-10)
    assert values[0] != values[1]


def test_compare_losses_needs_weight_decay():
    x, y, xu, yu = _data()
    with pytest.raises(ValueError, match="needs weight_decay > 0"):
        compare_losses(x, y, None, xu, yu, None, [_tables([0, 0, 0])], _train_loss, _balanced_ce([1, 1, 1]),
                       torch.zeros(15, dtype=torch.float64), K, True, 0.0)


def test_check_result_keeps_only_a_strict_improvement():
    assert CheckResult(1.0, 0.9, 10).keep and not CheckResult(1.0, 1.0, 10).keep
    assert "goes back to its start" in CheckResult(1.0, 1.2, 4).describe()


def test_head_weight_decay_reads_the_group_holding_the_head():
    head, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": other.parameters(), "weight_decay": 0.0},
                           {"params": head.parameters(), "weight_decay": 3e-4}], lr=0.1)
    assert head_weight_decay(opt.param_groups, head.weight) == 3e-4
    assert head_weight_decay(opt.param_groups[:1], head.weight) is None


# ---------------------------------------------------------------------------------------------------------------
# the callback: check at the end of the search, the start put back when the found loss loses
# ---------------------------------------------------------------------------------------------------------------
def _module(weight_decay=1e-3):
    base = linear_module(AutoBalanceMixin, pl.LightningModule, in_features=4)

    class Module(base):  # type: ignore[misc, valid-type]
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=weight_decay)

    return Module


def _loaders(seed=0):
    x, y, xu, yu = _data(seed=seed, n=48, m=30)
    train = DataLoader(TensorDataset(x.float(), y), batch_size=16, shuffle=False)
    upper = DataLoader(TensorDataset(xu.float(), yu), batch_size=8)
    return train, upper


def _fit(callback, weight_decay=1e-3, epochs=3):
    torch.manual_seed(0)
    train, upper = _loaders()
    model = _module(weight_decay)([36, 9, 3], preset="la", search=("offset",))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback(upper)])
    start = {k: v.detach().clone() for k, v in model.autobalance_parameters().alpha().items()}
    trainer.fit(model, train_dataloaders=train)
    return model, trainer.callbacks[0], start


def _callback(hyper_lr, fit_tolerance=0.1):
    def make(upper):
        return AutoBalanceCallback(upper=UpperData(dataloader=upper, holdout=0.5), warmup_fraction=0.0,
                                   every_n_steps=1, hyper_lr=hyper_lr, fit_tolerance=fit_tolerance)
    return make


def test_the_check_runs_once_at_the_end_and_its_decision_matches_the_loss_left():
    model, cb, start = _fit(_callback(0.5))
    result = cb.check_result
    assert isinstance(result, CheckResult) and result.samples == 15  # half of 10 per class held back
    alpha = model.autobalance_parameters().alpha()
    moved = any(not torch.equal(alpha[k], start[k]) for k in start)
    assert moved == result.keep  # kept: the found loss stays; lost: exactly the start is back
    if not result.keep:
        assert all(torch.equal(alpha[k], start[k]) for k in start)
    assert cb.state_dict()["check"]["result"] == {"start": result.start, "found": result.found, "samples": 15,
                                                  "training_error": result.training_error, "fit_tolerance": 0.1,
                                                  "augmentation": False}
    assert all(torch.equal(cb.state_dict()["check"]["start_alpha"][k], start[k]) for k in start)


def test_a_found_loss_that_loses_on_the_held_back_part_is_replaced_by_its_start(monkeypatch):
    # Force a found loss far from anything sensible (an enormous hyper step), then check that the start comes back.
    model, cb, start = _fit(_callback(50.0))
    result = cb.check_result
    assert result is not None and result.found > result.start and not result.keep
    alpha = model.autobalance_parameters().alpha()
    assert all(torch.equal(alpha[k], start[k]) for k in start)


def test_the_check_refuses_a_model_without_weight_decay_before_training():
    with pytest.raises(ValueError, match="needs weight decay on the head"):
        _fit(_callback(0.5), weight_decay=0.0)


def test_a_holdout_that_holds_nothing_back_is_an_error_at_setup():
    x = torch.randn(3, 4)
    upper = DataLoader(TensorDataset(x, torch.tensor([0, 1, 2])), batch_size=3)
    train, _ = _loaders()
    model = _module()([36, 9, 3], preset="la", search=("offset",))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[AutoBalanceCallback(upper=UpperData(dataloader=upper, holdout=0.5))])
    with pytest.raises(ValueError, match="holds nothing back: every class of the upper data has one sample"):
        trainer.fit(model, train_dataloaders=train)


def test_the_search_never_draws_a_held_back_sample_and_a_resumed_fit_keeps_the_result():
    _, cb, _ = _fit(_callback(0.5))
    drawn = set(cb.fit_upper.stream.sampler.subset)
    held = set(cb.held_back_check.held_back.tolist())
    assert held and not drawn & held and len(drawn | held) == 30
    restored = AutoBalanceCallback(upper=UpperData(holdout=0.5))
    restored.load_state_dict(cb.state_dict())
    assert restored.check_result == cb.check_result  # a resumed fit does not run the check again


# ---------------------------------------------------------------------------------------------------------------
# the default (holdout=None): the check where it can run, nothing held back (and a message) where it cannot
# ---------------------------------------------------------------------------------------------------------------
def _default_fit(weight_decay, upper=None, caplog=None):
    torch.manual_seed(0)
    train, default_upper = _loaders()
    model = _module(weight_decay)([36, 9, 3], preset="la", search=("offset",))
    cb = AutoBalanceCallback(upper_dataloader=upper or default_upper, warmup_fraction=0.0, every_n_steps=1)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(model, train_dataloaders=train)
    return cb


def test_by_default_half_the_upper_data_is_held_back_and_checked():
    assert UpperData().holdout is None
    cb = _default_fit(1e-3)
    assert cb.held_back_check.held_back is not None and cb.held_back_check.held_back.numel() == 15
    assert cb.check_result is not None and cb.check_result.samples == 15


def test_by_default_a_head_without_weight_decay_is_checked_with_the_fallback(caplog):
    with caplog.at_level("INFO"):
        cb = _default_fit(0.0)
    assert cb.check_result is not None and cb._check.weight_decay == 5e-4
    assert "has no weight decay; the held-back check trains its heads with weight decay 0.0005" in caplog.text


def test_by_default_an_upper_split_with_one_sample_per_class_is_searched_whole(caplog):
    upper = DataLoader(TensorDataset(torch.randn(3, 4), torch.tensor([0, 1, 2])), batch_size=3)
    with caplog.at_level("INFO"):
        cb = _default_fit(1e-3, upper)
    assert cb.held_back_check.held_back is None and cb.check_result is None and cb.hyper_steps > 0
    assert "no held-back check (every class of the upper data has one sample)" in caplog.text


def test_holdout_zero_holds_nothing_back():
    torch.manual_seed(0)
    train, upper = _loaders()
    model = _module(1e-3)([36, 9, 3], preset="la", search=("offset",))
    cb = AutoBalanceCallback(upper=UpperData(dataloader=upper, holdout=0), warmup_fraction=0.0, every_n_steps=1)
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb]).fit(model, train_dataloaders=train)
    assert cb.held_back_check.held_back is None and cb.check_result is None and cb.hyper_steps > 0


def test_read_features_reads_the_head_inputs_in_eval_mode_and_stops_at_max_rows():
    from lightning_autobalance.lightning.check import read_features

    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Dropout(0.5), torch.nn.Linear(5, 3))
    net.train()
    loader = DataLoader(TensorDataset(torch.randn(40, 4), torch.arange(40) % 3), batch_size=8)
    feats, target, group = read_features(net, net[2], loader, lambda b: (b[0], b[1], None), max_rows=20)
    assert feats.shape == (24, 5) and target.tolist() == (torch.arange(24) % 3).tolist() and group is None
    with torch.no_grad():
        expected = net[0](torch.cat([b[0] for b in list(loader)[:3]]))  # dropout off: evaluation mode
    torch.testing.assert_close(feats, expected)
    assert net.training  # its mode is restored


def test_a_run_bounded_by_max_steps_checks_once_after_its_last_hyper_step():
    torch.manual_seed(0)
    train, upper = _loaders()
    model = _module(1e-3)([36, 9, 3], preset="la", search=("offset",))
    cb = AutoBalanceCallback(upper_dataloader=upper, warmup_fraction=0.0, every_n_steps=1)
    seen = []
    original = cb._run_check

    def recording(trainer, pl_module, log=False):
        before = cb.check_result
        original(trainer, pl_module, log)
        if cb.check_result is not None and before is None:
            seen.append(trainer.global_step)

    cb._run_check = recording
    pl.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb]).fit(model, train_dataloaders=train)
    assert cb.hyper_steps == 8 and seen == [8]  # not after the first of three epochs (max_epochs is -1 here)


def test_a_second_fit_of_the_same_callback_is_checked_again():
    model, cb, _ = _fit(_callback(0.5))
    first = cb.check_result
    train, _ = _loaders()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    start = {k: v.detach().clone() for k, v in model.autobalance_parameters().alpha().items()}
    trainer.fit(model, train_dataloaders=train)
    assert cb.check_result is not None and cb.check_result is not first
    assert all(torch.equal(cb._check.start_alpha[k], start[k]) for k in start)  # its start is this fit's


def test_a_check_that_cannot_judge_says_so_and_puts_the_start_back():
    """A NaN held-back input makes both figures NaN: the start goes back (fails closed), and the verdict says the
    check could not judge instead of reading as a loss that lost."""
    cannot = CheckResult(float("nan"), float("nan"), 4)
    assert not cannot.keep and not cannot.judged and "cannot judge" in cannot.describe()
    judged = CheckResult(1.0, 0.5, 4)
    assert judged.keep and judged.judged and "cannot judge" not in judged.describe()


def test_the_split_names_the_classes_the_check_cannot_judge(caplog):
    from lightning_autobalance.lightning.check import HeldBackCheck

    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])  # class 2: one upper sample, which stays in the search
    with caplog.at_level("INFO"):
        search = HeldBackCheck().split(lambda: (labels, None), None, None, seed=0, num_classes=3)
    assert search is not None and 6 in search.tolist()
    assert "cannot judge classes [2]" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# the regime: a found loss is kept only where the network fits its training data
# ---------------------------------------------------------------------------------------------------------------
def test_training_error_is_the_balanced_error_of_the_adjusted_logits_sample_by_sample():
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(40, K, generator=gen, dtype=torch.float64), torch.arange(40) % K
    group = (torch.arange(40) // 20).long()
    tables = LossTables(torch.rand(2, K, generator=gen, dtype=torch.float64) + 0.5,
                        torch.randn(2, K, generator=gen, dtype=torch.float64), torch.ones(2, K, dtype=torch.float64))
    wrong, seen = [0.0] * K, [0] * K  # the reference: a plain loop over samples
    for z, y, g in zip(logits.tolist(), target.tolist(), group.tolist()):
        adjusted = [tables.delta[g][k].item() * z[k] + tables.offset[g][k].item() for k in range(K)]
        wrong[y] += float(max(range(K), key=adjusted.__getitem__) != y)
        seen[y] += 1
    expected = sum(w / n for w, n in zip(wrong, seen)) / K
    assert float(training_error(logits, target, group, tables)) == pytest.approx(expected, abs=1e-12)
    # a class absent from the rows is left out of the mean, not counted as right or wrong
    two = target != 2
    reference = training_error(logits[two], target[two], group[two], tables)
    assert 0.0 <= float(reference) <= 1.0
    plain = LossTables(torch.ones(1, K), torch.zeros(1, K), torch.ones(1, K))
    assert float(training_error(torch.tensor([[5.0, 0.0, 0.0]]), torch.tensor([0]), None, plain)) == 0.0
    # a per-class loss (one row) on batches that carry groups: every sample reads that row
    one_row = LossTables(tables.delta[:1], tables.offset[:1], tables.weight[:1])
    assert torch.equal(training_error(logits, target, group, one_row), training_error(logits, target, None, one_row))


def test_check_result_keeps_a_winning_loss_only_where_the_network_fits():
    assert CheckResult(1.0, 0.9, 10, training_error=0.05, fit_tolerance=0.1).keep
    loses = CheckResult(1.0, 0.9, 10, training_error=0.3, fit_tolerance=0.1)
    assert not loses.fits and not loses.keep and "does not fit its training data" in loses.describe()
    assert CheckResult(1.0, 0.9, 10, training_error=0.3, fit_tolerance=None).keep  # the heads alone
    assert not CheckResult(1.0, 1.1, 10, training_error=0.0, fit_tolerance=0.1).keep
    record = loses.record()
    assert record["decision"] == "start put back" and record["training_error"] == 0.3
    assert record["objective_found"] == 0.9 and record["objective_start"] == 1.0 and record["fit_tolerance"] == 0.1
    assert CheckResult(1.0, 0.9, 10).record()["decision"] == "found loss kept"  # a result saved before the rule


def test_the_checks_training_error_is_the_modules_own_under_the_found_loss():
    torch.manual_seed(0)
    train, upper = _loaders()
    model = _module()([36, 9, 3], preset="la", search=("offset",))
    params = model.autobalance_parameters()
    start = {k: v.detach().clone() for k, v in params.alpha().items()}
    with torch.no_grad():
        params.alpha()["offset"].add_(torch.tensor([[0.5, -0.2, 0.1]]))
    result = check_found_loss(model, params, start, train, upper, _balanced_ce([10, 10, 10]), 1e-3)
    x, y = train.dataset.tensors
    with torch.no_grad():
        expected = training_error(model(x).double(), y, None, params.tables())
    assert result.training_error == pytest.approx(float(expected), abs=1e-12)
    assert result.fit_tolerance == 0.1


def _separable_fit(fit_tolerance, tmp_path=None, epochs=4):
    """A fit on data the linear module separates (every class far from the others), with checkpoints every epoch."""
    torch.manual_seed(0)
    x, y, xu, yu = _data(seed=0, n=48, m=30)
    x, xu = x + 8.0 * torch.nn.functional.one_hot(y, 4).double(), xu + 8.0 * torch.nn.functional.one_hot(yu, 4).double()
    train = DataLoader(TensorDataset(x.float(), y), batch_size=16)
    upper = DataLoader(TensorDataset(xu.float(), yu), batch_size=8)
    model = _module()([36, 9, 3], preset="la", search=("offset",))
    checkpoints = [] if tmp_path is None else [pl.callbacks.ModelCheckpoint(tmp_path, filename="{epoch}",
                                                                            save_top_k=-1)]
    cb = AutoBalanceCallback(upper=UpperData(dataloader=upper, holdout=0.5), warmup_fraction=0.0, every_n_steps=1,
                             hyper_lr=0.5, fit_tolerance=fit_tolerance)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=tmp_path is not None,
                         callbacks=[cb, *checkpoints])
    trainer.fit(model, train_dataloaders=train)
    return model, cb


def test_a_network_that_does_not_fit_its_data_gets_its_start_back_and_every_record_says_why(tmp_path):
    model, cb, start = _fit(_callback(0.5))
    result = cb.check_result
    assert result is not None and result.training_error > 0.1 and not result.keep  # the tiny noisy problem
    assert all(torch.equal(model.autobalance_parameters().alpha()[k], start[k]) for k in start)
    decision = model.autobalance_parameters().decision
    assert decision == result.record() and "does not fit its training data" in decision["reason"]
    # the loss file and the module's state dict carry it, and a module loaded from either gets it back
    path = model.export_loss(tmp_path / "found.yaml")
    assert "start put back" in path.read_text()
    from lightning_autobalance.lightning.mixin import loss_from_file
    assert loss_from_file(path, [36, 9, 3])[0].decision == decision
    fresh = _module()([36, 9, 3], preset="la", search=("offset",))
    fresh.load_state_dict(model.state_dict())
    assert fresh.autobalance_parameters().decision == decision
    # the same fit with the rule off: the heads alone decide
    _, alone, _ = _fit(_callback(0.5, fit_tolerance=None))
    assert alone.check_result.keep == (alone.check_result.found < alone.check_result.start)
    assert alone.check_result.training_error == pytest.approx(result.training_error)


def test_where_the_network_fits_its_data_the_heads_decide(tmp_path):
    model, cb = _separable_fit(0.1)
    result = cb.check_result
    assert result is not None and result.training_error == 0.0 and result.fits
    assert result.keep == (result.found < result.start)
    assert model.autobalance_parameters().decision["decision"] == ("found loss kept" if result.keep
                                                                   else "start put back")


def test_a_checkpoint_saved_before_the_check_says_its_loss_is_pending(tmp_path):
    from lightning_autobalance.lightning.mixin import loss_from_file

    _separable_fit(0.1, tmp_path, epochs=2)
    first = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)["state_dict"]["autobalance._extra_state"]
    last = torch.load(tmp_path / "epoch=1.ckpt", weights_only=True)["state_dict"]["autobalance._extra_state"]
    assert first["decision"]["decision"] == "pending"  # written during the search
    assert last["decision"]["decision"] in ("found loss kept", "start put back")  # the check ran before it
    model = _module()([36, 9, 3], preset="la", search=("offset",))
    model.load_state_dict(torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)["state_dict"])
    path = model.export_loss(tmp_path / "early.yaml")
    with pytest.warns(UserWarning, match="written before the held-back check ruled on its loss"):
        loss_from_file(path, [36, 9, 3])


def test_a_fit_with_no_hyper_step_leaves_no_pending_decision():
    torch.manual_seed(0)
    train, upper = _loaders()
    model = _module()([36, 9, 3], preset="la", search=("offset",))
    cb = AutoBalanceCallback(upper=UpperData(dataloader=upper, holdout=0.5), start_step=10_000)
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb]).fit(model, train_dataloaders=train)
    assert cb.hyper_steps == 0 and model.autobalance_parameters().decision is None


@pytest.mark.parametrize("bad", [1.5, -0.1, True, "0.1"])
def test_fit_tolerance_is_validated_at_construction(bad):
    with pytest.raises(ValueError, match="fit_tolerance must be a share in"):
        AutoBalanceCallback(fit_tolerance=bad)


def test_a_non_finite_upper_input_is_named_by_sample_and_refused_before_training():
    torch.manual_seed(0)
    train, upper = _loaders()
    x, y = upper.dataset.tensors
    x = x.clone()
    x[7, 2] = float("inf")
    bad = DataLoader(TensorDataset(x, y), batch_size=8)
    model = _module()([36, 9, 3], preset="la", search=("offset",))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[AutoBalanceCallback(upper_dataloader=bad)])
    with pytest.raises(ValueError, match=r"The upper data holds non-finite values: sample 7 of 30 \(label 1\) holds "
                                         r"inf"):
        trainer.fit(model, train_dataloaders=train)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # no training step was taken


def test_a_search_started_from_cross_entropy_is_judged_by_the_heads_alone():
    """The fit rule is about a consistent start (LA): from plain CE the search moves towards it, and the heads judge."""
    torch.manual_seed(0)
    train, upper = _loaders()
    model = _module()([36, 9, 3], preset="ce", search=("offset",))
    cb = _callback(0.5)(upper)
    pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb]).fit(model, train_dataloaders=train)
    result = cb.check_result
    assert result.training_error > 0.1 and result.fit_tolerance is None  # does not fit, and no rule applies
    assert result.keep == (result.found < result.start)
    assert model.autobalance_parameters().decision["fit_tolerance"] is None
