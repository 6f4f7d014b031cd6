"""Group-sensitive training end to end: class x group losses, the coloured-digits benchmark datamodule, group metrics,
group DRO and group-balanced baselines, the callback with group objectives, and the pipeline with groups."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback, ImbalancedClassifier, adjusted_cross_entropy, preset_tables
from lightning_autobalance.core.losses import GroupDROLoss
from lightning_autobalance.core.metrics import GroupErrors, group_report
from lightning_autobalance.data import ColoredDigits, LongTailDigits
from lightning_autobalance.models import DigitsNet
from lightning_autobalance.runner.cli import main
from lightning_autobalance.runner.pipeline import run_pipeline

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*is using the validation dataloader as upper data.*"),
]

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64


def _trainer(callbacks=(), **kwargs) -> pl.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
               "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def _model(dm: ColoredDigits, **kwargs) -> ImbalancedClassifier:
    net = lambda k: DigitsNet(k, in_features=192, hidden=32)  # noqa: E731
    options = {"preset": "la", "search": ("offset",),
               "optimizer": functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=2e-4)}
    options.update(kwargs)
    return ImbalancedClassifier(net, dm.num_classes, dm.class_counts, num_groups=dm.num_groups,
                                group_counts=dm.group_counts, **options)


# ---------------------------------------------------------------------------------------------------------------
# the class x group loss
# ---------------------------------------------------------------------------------------------------------------


def test_class_x_group_loss_with_one_group_equals_the_per_class_loss():
    gen = torch.Generator().manual_seed(0)
    logits, y = torch.randn(30, 4, generator=gen, dtype=DT), torch.randint(0, 4, (30,), generator=gen)
    g = torch.randint(0, 3, (30,), generator=gen)
    counts = [50, 20, 5, 2]
    per_class = preset_tables("vs", counts, dtype=DT)
    plain = adjusted_cross_entropy(logits, y, *(t[0] for t in per_class))
    # a one-row table ignores the groups
    torch.testing.assert_close(adjusted_cross_entropy(logits, y, *per_class, group=g), plain, rtol=0, atol=0)
    # G rows that are all the same row: the group index makes no difference
    repeated = preset_tables("vs", [counts] * 3, dtype=DT)
    assert repeated.delta.shape == (3, 4)
    torch.testing.assert_close(adjusted_cross_entropy(logits, y, *repeated, group=g), plain, rtol=1e-15, atol=0)
    # the same through the classifier (mixin) path: one row of group counts is the per-class loss
    net = lambda k: DigitsNet(k, in_features=4, hidden=8)  # noqa: E731
    per_class_model = ImbalancedClassifier(net, 4, counts, preset="la")
    one_group_model = ImbalancedClassifier(net, 4, counts, preset="la", group_counts=[counts], num_groups=1)
    f = logits.float()
    torch.testing.assert_close(one_group_model.autobalance_loss(f, y, torch.zeros_like(y)),
                               per_class_model.autobalance_loss(f, y))


def test_group_balanced_preset_and_classifier_counts():
    table = [[90, 6], [10, 94]]
    weight = preset_tables("group_balanced", table, dtype=DT).weight
    n = torch.tensor(table, dtype=DT)
    torch.testing.assert_close(weight, n.sum() / (4 * n))
    assert float((weight * n).sum()) == pytest.approx(float(n.sum()))  # mean weight per sample 1
    model = ImbalancedClassifier(lambda k: DigitsNet(k, in_features=4), 2, [100, 100], preset="group_balanced",
                                 group_counts=table)
    assert model.autobalance.num_groups == 2
    torch.testing.assert_close(model.autobalance_tables().weight.double(), weight, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="do not match class_counts"):
        ImbalancedClassifier(lambda k: DigitsNet(k, in_features=4), 2, [100, 99], group_counts=table)
    with pytest.raises(ValueError, match="rows but num_groups is 3"):
        ImbalancedClassifier(lambda k: DigitsNet(k, in_features=4), 2, [100, 100], group_counts=table, num_groups=3)
    with pytest.raises(ValueError, match="needs groups"):
        ImbalancedClassifier(lambda k: DigitsNet(k, in_features=4), 2, [100, 100], loss="group_dro")


def test_group_dro_loss_follows_the_online_algorithm():
    gen = torch.Generator().manual_seed(1)
    criterion = GroupDROLoss(num_classes=2, num_groups=2, step_size=0.5)
    q = torch.full((4,), 0.25, dtype=DT)
    for _ in range(3):
        logits = torch.randn(16, 2, generator=gen, dtype=DT).requires_grad_(True)
        y, g = torch.randint(0, 2, (16,), generator=gen), torch.randint(0, 2, (16,), generator=gen)
        y[0], g[0] = 1, 1
        g[y == 0] = 0  # the cell (label 0, group 1) is absent: its weight only renormalises
        ce = F.cross_entropy(logits.detach(), y, reduction="none")
        means = torch.stack([ce[(g * 2 + y) == j].mean() if ((g * 2 + y) == j).any() else torch.zeros((), dtype=DT)
                             for j in range(4)])
        q = q * torch.exp(0.5 * means)
        q = q / q.sum()
        loss = criterion(logits, y, g)
        torch.testing.assert_close(criterion.q.double(), q, rtol=1e-6, atol=0)
        torch.testing.assert_close(loss, (q.float().double() * means).sum(), rtol=1e-6, atol=0)
    criterion.eval()
    before = criterion.q.clone()
    criterion(logits, y, g)
    assert torch.equal(criterion.q, before)  # evaluation does not move q
    with pytest.raises(ValueError, match="needs the group"):
        criterion(logits, y)
    with pytest.raises(ValueError, match="step_size must be a positive"):
        GroupDROLoss(2, 2, step_size=0.0)


# ---------------------------------------------------------------------------------------------------------------
# the coloured digits
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["digits", "binary"])
def test_colored_digits_correlation_in_training_and_balance_at_test(task):
    dm = ColoredDigits(task=task, correlation=0.9, search_split=True, seed=3)
    k, groups = dm.num_classes, dm.num_groups
    assert (k, groups) == ((10, 2) if task == "digits" else (2, 2))
    lower, upper = np.array(dm.group_counts), np.array(dm.upper_group_counts)
    assert lower.sum(axis=0).tolist() == dm.class_counts and upper.sum(axis=0).tolist() == dm.upper_class_counts
    for c in range(k):
        whole = lower[:, c] + upper[:, c]
        n_c = int(whole.sum())
        assert abs(whole[c % groups] / n_c - 0.9) <= 0.5 / n_c + 1e-12  # exact up to rounding
        for part in (lower, upper):  # the split per cell keeps the correlation in both parts
            assert abs(part[c % groups, c] / part[:, c].sum() - 0.9) <= 1.0 / part[:, c].sum() + 1e-12
    assert (upper >= 1).all() and (lower >= 1).all()
    # the datasets carry the same groups
    train = dm.train_dataset
    cells = np.bincount(train.groups * k + train.targets, minlength=groups * k).reshape(groups, k)
    assert cells.tolist() == dm.group_counts
    assert set(dm.train_indices.tolist()).isdisjoint(dm.upper_indices.tolist())
    # test: every image in every colour
    test = dm.test_dataset
    cells = np.bincount(test.groups * k + test.targets, minlength=groups * k).reshape(groups, k)
    assert (cells == cells[0]).all() and len(set(cells.flatten().tolist())) == 1
    x0, y0, g0 = test[0]
    x1, y1, g1 = test[1]
    assert (y0, g0, y1, g1) == (y1, 0, y0, 1) and not torch.equal(x0, x1)
    torch.testing.assert_close((x0 * dm._std + dm._mean) / dm.palette[0].view(3, 1, 1),
                               (x1 * dm._std + dm._mean) / dm.palette[1].view(3, 1, 1))  # the same grey image
    x, y, g = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 8, 8) and y.dtype == g.dtype == torch.int64


def test_colored_digits_seeds_and_errors():
    a, b = ColoredDigits(seed=0), ColoredDigits(seed=1)
    assert not np.array_equal(a.train_groups, b.train_groups)
    assert np.array_equal(a.train_groups, ColoredDigits(seed=0).train_groups)
    assert a.upper_group_counts is None
    three = ColoredDigits(num_groups=3, correlation=0.8)
    counts = np.array(three.group_counts)
    assert counts.shape == (3, 10) and (counts >= 1).all()
    with pytest.raises(ValueError, match="no training sample for class 1 in group 0"):
        _ = ColoredDigits(correlation=1.0).class_counts
    with pytest.raises(ValueError, match=r"class 1 in group 0 \(red\)"):  # one sample: cannot be split
        _ = ColoredDigits(correlation=0.993, search_split=True).class_counts
    for kwargs, match in (({"correlation": 0.4}, "correlation"), ({"num_groups": 7}, "num_groups must be at most"),
                          ({"num_groups": 1}, "num_groups"), ({"task": "cifar"}, "task"),
                          ({"saturation": 0.0}, "saturation")):
        with pytest.raises(ValueError, match=match):
            ColoredDigits(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------


def test_group_metrics():
    correct = torch.tensor([[9, 5, 0], [8, 10, 0]])
    total = torch.tensor([[10, 10, 0], [10, 10, 4]])
    report = group_report(correct, total)
    assert report["cell_error"][0][:2] == pytest.approx([0.1, 0.5]) and np.isnan(report["cell_error"][0][2])
    assert report["group_error"] == pytest.approx([0.3, (0.2 + 0.0 + 1.0) / 3])
    assert report["worst_group_error"] == pytest.approx(1.0)
    assert report["average_error"] == pytest.approx(1 - 32 / 44)
    assert report["eo_gap_per_label"][:2] == pytest.approx([0.1, 0.5]) and np.isnan(report["eo_gap_per_label"][2])
    assert report["eo_gap"] == pytest.approx(0.3)  # label 2 has one group only: left out
    metric = GroupErrors(num_classes=2, num_groups=2)
    metric.update(torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 1, 0, 1, 0]), torch.tensor([0, 0, 1, 1, 1]))
    out = metric.compute()
    assert out["cell_error"] == [[0.0, 0.0], [0.5, 0.0]] and out["eo_gap"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="groups in"):
        metric.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([2]))


def test_classifier_metrics_without_groups_are_unchanged():
    dm = LongTailDigits(imbalance_ratio=10, batch_size=256)
    model = ImbalancedClassifier("digits_net", dm.num_classes, dm.class_counts)
    assert model.val_groups is None
    _trainer(max_steps=1, limit_val_batches=0).test(model, datamodule=dm, verbose=False)
    assert set(model.test_report) == {"balanced_error", "per_class_error", "head_error", "medium_error",
                                      "tail_error", "worst_class_error"}


# ---------------------------------------------------------------------------------------------------------------
# the callback with groups
# ---------------------------------------------------------------------------------------------------------------


def _group_blobs(cells, seed=0):
    """Two-feature Gaussian data with labels and groups; ``cells[g][y]`` samples per cell."""
    gen = torch.Generator().manual_seed(seed)
    ys, gs = [], []
    for g, row in enumerate(cells):
        for y, n in enumerate(row):
            ys += [y] * n
            gs += [g] * n
    y, g = torch.tensor(ys), torch.tensor(gs)
    x = torch.randn(len(y), 2, generator=gen) + torch.stack([y.float() * 2, g.float()], dim=1)
    return TensorDataset(x, y, g)


class BlobNet(ImbalancedClassifier):
    def __init__(self, **kwargs):
        super().__init__(lambda k: DigitsNet(k, in_features=2, hidden=8, depth=1), 2, [60, 60], num_groups=2,
                         group_counts=[[54, 6], [6, 54]], **kwargs)
        self.steps_run = 0

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


def _train_blobs():
    return DataLoader(_group_blobs([[54, 6], [6, 54]], seed=1), batch_size=30, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def _fails_before_training(callback, exc, match):
    model = BlobNet()
    trainer = _trainer([callback], max_steps=3)
    with pytest.raises(exc, match=match):
        trainer.fit(model, _train_blobs())
    assert trainer.global_step == 0 and model.steps_run == 0


def test_bad_objective_settings_fail_at_construction():
    for kwargs, match in (({"objective": "blend", "objective_kwargs": {"lam": 2}}, r"must lie in \[0, 1\]"),
                          ({"objective": "worst_group", "objective_kwargs": {"temperature": 0}}, "temperature"),
                          ({"objective": "deo", "objective_kwargs": {"foo": 1}}, r"takes no argument \['foo'\]"),
                          ({"objective": "fairest"}, "Unknown upper objective"),
                          ({"objective": lambda f, t, g: f.mean(), "objective_kwargs": {"lam": 0.5}},
                           "only for a named objective"),
                          ({"objective_kwargs": [1]}, "objective_kwargs must be a mapping")):
        with pytest.raises(ValueError, match=match):
            AutoBalanceCallback(**kwargs)


def test_groups_missing_from_the_upper_data_fail_at_setup():
    upper = DataLoader(_group_blobs([[20, 20], [20, 0]]), batch_size=40)
    callback = AutoBalanceCallback(objective="deo", upper_dataloader=upper)
    _fails_before_training(callback, ValueError, r"upper data has no sample of \(label 1, group 1\)")
    callback = AutoBalanceCallback(objective="worst_group", objective_kwargs={"over": "group"},
                                   upper_dataloader=DataLoader(_group_blobs([[20, 20], [0, 0]]), batch_size=40))
    _fails_before_training(callback, ValueError, "upper data has no sample of group 1")
    no_groups = DataLoader(TensorDataset(torch.randn(40, 2), torch.arange(40) % 2), batch_size=40)
    callback = AutoBalanceCallback(objective="deo", upper_dataloader=no_groups)
    _fails_before_training(callback, ValueError, "the upper batches carry no groups")
    out_of_range = TensorDataset(torch.randn(8, 2), torch.arange(8) % 2, torch.arange(8) % 3)
    callback = AutoBalanceCallback(objective="deo", upper_dataloader=DataLoader(out_of_range, batch_size=8))
    _fails_before_training(callback, ValueError, r"group indices outside \[0, 2\)")


def test_a_non_scalar_objective_gets_a_clear_message():
    callback = AutoBalanceCallback(holdout=0, every_n_steps=1, start_step=0, objective=lambda f, t, g: F.cross_entropy(
        f, t, reduction="none"), upper_dataloader=DataLoader(_group_blobs([[10, 10], [10, 10]]), batch_size=40))
    with pytest.raises(ValueError, match=r"upper objective .* returned a tensor of shape \(40,\); it must return a "
                                         "scalar"):
        _trainer([callback], max_steps=2).fit(BlobNet(), _train_blobs())


def test_fit_with_groups_and_the_blended_objective(tmp_path):
    torch.manual_seed(0)
    dm = ColoredDigits(task="binary", search_split=True, batch_size=64, upper_batch_size=512, correlation=0.9)
    model = _model(dm)
    assert model.autobalance.alpha()["offset"].shape == (2, 2)
    start = model.autobalance.alpha()["offset"].clone()
    callback = AutoBalanceCallback(holdout=0, every_n_steps=2, start_step=0, objective="blend",
                                   objective_kwargs={"lam": 0.5, "accuracy_kwargs": {"over": "cell"}})
    trainer = _trainer([callback], max_steps=12, logger=CSVLogger(tmp_path, name="", version="logs"),
                       log_every_n_steps=1, limit_val_batches=2, val_check_interval=6)
    trainer.fit(model, datamodule=dm)
    assert callback.hyper_steps == 6 and callback.skipped_steps == 0
    assert "BlendedObjective(lam=0.5" in repr(callback._objective_fn)
    assert callback._objective_fn.objective.fairness.num_groups == 2
    moved = model.autobalance.alpha()["offset"] - start
    assert moved.abs().min() > 0
    with open(tmp_path / "logs" / "metrics.csv") as fh:
        keys = set(next(csv.reader(fh)))
    assert {"autobalance/offset/g0_0", "autobalance/offset/g1_1", "autobalance/objective"} <= keys
    assert {"val/worst_group_error", "val/eo_gap", "val/group_error/g1", "val/cell_error/g1_0"} <= keys
    trainer.test(model, datamodule=dm, verbose=False)
    report = model.test_report
    assert np.array(report["cell_error"]).shape == (2, 2)
    assert report["worst_group_error"] == pytest.approx(max(max(r) for r in report["cell_error"]))
    assert 0.0 <= report["eo_gap"] <= 1.0 and report["average_error"] == pytest.approx(report["balanced_error"])


def test_group_dro_classifier_trains_on_group_batches():
    dm = ColoredDigits(task="binary", batch_size=128)
    model = _model(dm, loss=GroupDROLoss(step_size=0.1))
    _trainer(max_steps=4, limit_val_batches=0).fit(model, datamodule=dm)
    q = model.criterion.q
    assert q.shape == (4,) and float(q.sum()) == pytest.approx(1.0) and not torch.allclose(q, torch.full((4,), 0.25))


# ---------------------------------------------------------------------------------------------------------------
# the pipeline with groups
# ---------------------------------------------------------------------------------------------------------------


def test_pipeline_with_groups(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])
    out = tmp_path / "groups"
    main(["pipeline", "--config", str(ROOT / "examples" / "colored_digits.yaml"), "--output_dir", str(out),
          "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.callbacks.init_args.every_n_steps", "2", "--trainer.callbacks.init_args.start_step", "0",
          "--data.init_args.task", "binary", "--data.init_args.batch_size", "128", "--plot", "false"])
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["autobalance", "ce", "group_balanced", "group_dro", "la"]
    assert np.array(results["group_counts"]).shape == (2, 2)
    assert results["search"]["hyper_steps"] > 0
    for row in results["rows"]:
        assert 0.0 <= row["worst_group_error"] <= 1.0 and 0.0 <= row["eo_gap"] <= 1.0
        assert np.array(row["cell_error"]).shape == (2, 2)
        assert row["worst_group_error"] >= row["average_error"] - 1e-12
    assert np.array(results["found_loss"]["offset"]).shape == (2, 2)


def test_group_baselines_need_groups(tmp_path):
    dm = LongTailDigits(imbalance_ratio=10)
    model = ImbalancedClassifier("digits_net", dm.num_classes, dm.class_counts)
    with pytest.raises(ValueError, match=r"baselines \['group_dro'\] need groups"):
        run_pipeline(model, dm, {"max_epochs": 1}, tmp_path, search=False, baselines=["ce", "group_dro"])


def test_loss_plot_draws_every_group_row_against_its_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    from lightning_autobalance.runner.pipeline import plot_loss

    cells = [[100, 6, 50], [5, 90, 40]]
    tables = preset_tables("la", cells)
    summary = {"class_counts": [105, 96, 90], "group_counts": cells,
               "found_loss": {k: v.tolist() for k, v in tables._asdict().items()}}
    figures: list[matplotlib.figure.Figure] = []
    save = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    plot_loss(summary, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    offset_axis = figures[0].axes[1]
    lines = {line.get_label(): line for line in offset_axis.get_lines()}
    assert set(lines) == {f"{kind}, group {g}" for g in (0, 1) for kind in ("found", "logit adjustment (tau=1)")}
    for g, row in enumerate(cells):
        found = lines[f"found, group {g}"]
        assert list(found.get_xdata()) == sorted(row, reverse=True)
        # The search's start is group logit adjustment, so the found curve lies on the reference one.
        np.testing.assert_allclose(found.get_ydata(), lines[f"logit adjustment (tau=1), group {g}"].get_ydata())
        expected = np.log(np.array(sorted(row, reverse=True)) / sum(row))
        np.testing.assert_allclose(found.get_ydata(), expected - expected.mean(), rtol=1e-6)


def test_cell_index_is_the_row_major_flattening_of_a_g_by_k_table() -> None:
    """``cell_index`` numbers (group, class) cells as ``reshape(-1)`` of a ``G x K`` table does, for ints, NumPy
    arrays and tensors; the group datamodule's cell counts use it."""
    from lightning_autobalance.core.cells import cell_index

    g, k = 3, 4
    table = torch.arange(g * k).view(g, k) * 10
    groups, labels = torch.meshgrid(torch.arange(g), torch.arange(k), indexing="ij")
    flat = cell_index(groups.reshape(-1), labels.reshape(-1), k)
    assert torch.equal(flat, torch.arange(g * k))
    assert torch.equal(table.reshape(-1)[flat], table[groups.reshape(-1), labels.reshape(-1)])
    assert cell_index(2, 3, k) == 11
    assert np.array_equal(cell_index(np.array([0, 2]), np.array([1, 3]), k), np.array([1, 11]))
    dm = ColoredDigits(num_groups=3, correlation=0.6)
    counts = np.bincount(cell_index(dm.train_groups, np.asarray(dm.train_dataset.targets), dm.num_classes),
                         minlength=3 * dm.num_classes).reshape(3, dm.num_classes)
    assert counts.tolist() == dm.group_counts
