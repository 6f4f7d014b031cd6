"""One-phase runs: the FoldInSampler, the datamodules' ``fold_in_epoch``, the callback stopping at the fold-in, and
the pipeline's ``one_phase`` stage (resumed runs end where uninterrupted ones do)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import crash_at, linear_module
from lightning_fabric.utilities.distributed import DistributedSamplerWrapper
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AutoBalanceCallback, AutoBalanceMixin
from lightning_autobalance.data import FoldInSampler, LongTailDigits, search_split
from lightning_autobalance.data.fold_in import find_fold_in_sampler
from lightning_autobalance.lightning.callback import ONE_PHASE_HYPER_SHARE
from lightning_autobalance.runner.cli import main

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------------------


def _epoch(sampler: FoldInSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_draws_the_lower_part_then_everything():
    lower, upper = list(range(10, 50)), list(range(50, 60))
    sampler = FoldInSampler(lower, upper, fold_in_epoch=2, seed=3)
    assert len(sampler) == 50
    for epoch in (0, 1):
        drawn = _epoch(sampler, epoch)
        assert len(drawn) == 50 and set(drawn) == set(lower)  # every lower sample, no upper one
        assert max(Counter(drawn).values()) == 2  # 10 lower samples drawn a second time, none a third
        assert not sampler.folded
    for epoch in (2, 3):
        assert sorted(_epoch(sampler, epoch)) == lower + upper and sampler.folded
    # The order is a function of (seed, epoch) only: another instance (another process) draws the same.
    other = FoldInSampler(lower, upper, fold_in_epoch=2, seed=3)
    assert [_epoch(other, e) for e in range(4)] == [_epoch(sampler, e) for e in range(4)]
    assert _epoch(sampler, 0) != _epoch(sampler, 1) and _epoch(sampler, 2) != _epoch(sampler, 3)
    assert _epoch(FoldInSampler(lower, upper, 2, seed=4), 0) != _epoch(sampler, 0)


def test_sampler_with_fewer_lower_than_upper_samples_cycles_the_lower_part():
    sampler = FoldInSampler([0, 1], [2, 3, 4, 5, 6], fold_in_epoch=1)
    drawn = _epoch(sampler, 0)
    assert len(drawn) == 7 and set(drawn) == {0, 1} and sorted(Counter(drawn).values()) == [3, 4]


@pytest.mark.parametrize(("args", "match"), [
    (([0, 1], [2], 0), "fold_in_epoch must be an integer >= 1"),
    (([0, 1], [2], 1.5), "fold_in_epoch must be an integer >= 1"),
    (([], [2], 1), "non-empty lower part"),
    (([0, 1, 2], [2, 3], 1), "share 1 indices"),
])
def test_sampler_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        FoldInSampler(*args)


def test_every_ddp_rank_folds_in_at_the_same_epoch():
    """Under DDP Lightning wraps the sampler in a DistributedSamplerWrapper (one per process) and calls its
    set_epoch: the shards of all ranks make up the epoch of one process, before and after the fold-in."""
    lower, upper = list(range(30)), list(range(30, 38))
    for epoch in range(4):
        shards = []
        for rank in range(2):
            wrapper = DistributedSamplerWrapper(FoldInSampler(lower, upper, fold_in_epoch=2, seed=1),
                                                num_replicas=2, rank=rank, shuffle=False)
            wrapper.set_epoch(epoch)
            shards.append(list(wrapper))
            assert find_fold_in_sampler(DataLoader(range(38), sampler=wrapper)).epoch == epoch
        single = _epoch(FoldInSampler(lower, upper, fold_in_epoch=2, seed=1), epoch)
        assert len(shards[0]) == len(shards[1]) == 19
        assert Counter(shards[0] + shards[1]) == Counter(single)
        assert (max(shards[0] + shards[1]) >= 30) == (epoch >= 2)


# ---------------------------------------------------------------------------------------------------------------
# the datamodules
# ---------------------------------------------------------------------------------------------------------------


def test_datamodule_fold_in_epoch():
    with pytest.raises(ValueError, match="fold_in_epoch needs search_split=True"):
        LongTailDigits(fold_in_epoch=2)
    with pytest.raises(ValueError, match="fold_in_epoch must be an integer >= 1"):
        LongTailDigits(search_split=True, fold_in_epoch=0)
    dm = LongTailDigits(search_split=True, fold_in_epoch=2, batch_size=64)
    split = LongTailDigits(search_split=True)
    # The counts the model gets are those of the whole set, which the run ends up training on.
    assert dm.class_counts == dm.long_tail_counts == LongTailDigits().class_counts
    assert dm.upper_class_counts == split.upper_class_counts
    loader = dm.train_dataloader()
    assert len(loader) == math.ceil(sum(dm.long_tail_counts) / 64)  # as long as plain training's epoch
    sampler = find_fold_in_sampler(loader)
    lower = len(split.train_indices)
    labels = torch.as_tensor(dm.train_dataset.targets)
    for epoch, folded in ((0, False), (1, False), (2, True)):
        drawn = _epoch(sampler, epoch)
        assert (max(drawn) >= lower) is folded  # the train dataset holds the lower part first, then the upper
    assert Counter(labels[lower:].tolist()) == Counter(dict(enumerate(dm.upper_class_counts)))


# ---------------------------------------------------------------------------------------------------------------
# the callback: a plain Trainer with the recipe of the docs
# ---------------------------------------------------------------------------------------------------------------

K = 4


def _data(seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    counts = [160, 80, 40, 20]
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    centres = torch.tensor([[1.5, 0.0], [0.0, 1.5], [-1.5, 0.0], [0.0, -1.5]])
    return TensorDataset(centres[y] + torch.randn(len(y), 2, generator=gen), y)


Net = linear_module(AutoBalanceMixin, pl.LightningModule, in_features=2)


class Watch(Callback):
    """Records the optimizer step of every hyper step, the samples trained on per epoch and the loss parameters at
    every epoch start."""

    def __init__(self, autobalance: AutoBalanceCallback):
        self.ab = autobalance
        self.hyper_at: list[int] = []
        self.alpha: list[dict[str, torch.Tensor]] = []
        self._count = 0

    def on_train_epoch_start(self, trainer, pl_module):
        self.alpha.append({k: v.detach().clone() for k, v in pl_module.autobalance.alpha().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.ab.hyper_steps > self._count:
            self._count = self.ab.hyper_steps
            self.hyper_at.append(trainer.global_step - 1)


def _one_phase_fit(fold_in_epoch: int, epochs: int = 6, **callback):
    data = _data()
    split = search_split(data, seed=0)
    sampler = FoldInSampler(split.lower.indices, split.upper.indices, fold_in_epoch=fold_in_epoch, seed=0)
    train = DataLoader(data, batch_size=32, sampler=sampler)
    upper = DataLoader(split.upper, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(data.tensors[1], minlength=K).tolist()
    pl.seed_everything(0, verbose=False)
    model = Net(counts)
    # fit_tolerance=None: this small fit never fits its data, and these tests are about the fold-in, not the decision
    ab = AutoBalanceCallback(upper_dataloader=upper, **{"fit_tolerance": None, **callback})
    watch = Watch(ab)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ab, watch])
    trainer.fit(model, train_dataloaders=train)
    return trainer, model, ab, watch, len(train)


def test_the_search_stops_at_the_fold_in_and_the_loss_stays():
    trainer, _, ab, watch, per_epoch = _one_phase_fit(fold_in_epoch=3, every_n_steps=1, warmup_fraction=0.0)
    fold_step = 3 * per_epoch
    assert ab.hyper_steps == fold_step and watch.hyper_at == list(range(fold_step))  # every step, up to the fold
    for later in watch.alpha[3:]:  # epochs 3, 4, 5 start with the loss the search left
        for name, value in later.items():
            assert torch.equal(value, watch.alpha[3][name])
    assert any(not torch.equal(v, watch.alpha[0][k]) for k, v in watch.alpha[3].items())  # the search did move it
    assert trainer.global_step == 6 * per_epoch  # every epoch as long as one over the whole set


def test_the_automatic_schedule_of_a_one_phase_run_bounds_its_cost():
    _, _, ab, watch, per_epoch = _one_phase_fit(fold_in_epoch=10, epochs=20)
    total = 20 * per_epoch
    assert 1 <= ab.hyper_steps <= ONE_PHASE_HYPER_SHARE * total
    assert max(watch.hyper_at) < 10 * per_epoch and min(watch.hyper_at) >= int(0.2 * total)


def test_a_stop_after_the_fold_in_is_refused_at_fit_start():
    with pytest.raises(ValueError, match="stop_epoch=4 would go on searching after epoch 2"):
        _one_phase_fit(fold_in_epoch=2, stop_epoch=4)


# ---------------------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------------------

DIGITS = str(ROOT / "examples" / "digits_lt.yaml")
TINY = ["--trainer.max_epochs", "4", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--search", "false", "--baselines", "[]", "--one_phase", "true",
        "--fold_in", "0.5"]


@pytest.mark.parametrize("crash_epoch", [1, 3])  # during the search, and after the fold-in
def test_pipeline_one_phase_resumes_to_the_same_loss_and_errors(tmp_path: Path, crash_epoch: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])
    step = ["--trainer.callbacks.init_args.every_n_steps", "1"]
    main(["pipeline", "--config", DIGITS, *TINY, *step, "--output_dir", str(tmp_path / "whole")])
    reference = json.loads((tmp_path / "whole" / "results.json").read_text())
    (row,) = reference["rows"]
    assert row["method"] == "one_phase" and row["fold_in_epoch"] == 2 and row["hyper_steps"] > 0
    assert reference["one_phase_loss"]["offset"] != reference["one_phase_loss"]["delta"]

    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        main(["pipeline", "--config", DIGITS, *TINY, *step, "--output_dir", str(out), crash_at(crash_epoch)])
    assert (out / "one_phase" / "checkpoints" / "last.ckpt").is_file()
    main(["pipeline", "--config", DIGITS, *TINY, *step, "--output_dir", str(out)])
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["one_phase_loss"] == reference["one_phase_loss"]
    assert resumed["rows"][0]["hyper_steps"] == row["hyper_steps"]
    assert resumed["rows"][0]["per_class_error"] == row["per_class_error"]


def test_pipeline_one_phase_needs_two_epochs_and_a_fold_in_share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])
    for extra, message in ((["--fold_in", "1.0"], "fold_in must lie in (0, 1)"),
                           (["--trainer.max_epochs", "1"], "one_phase needs at least 2 epochs")):
        with pytest.raises(SystemExit) as info:
            main(["pipeline", "--config", DIGITS, *TINY, *extra, "--output_dir", str(tmp_path)])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.ckpt"))


def test_the_one_phase_example_config_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lightning-autobalance fit --config examples/digits_lt_one_phase.yaml``, shortened: the loss is searched
    until the fold-in, then kept, and the checkpoint carries it."""
    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])
    main(["fit", "--config", str(ROOT / "examples" / "digits_lt_one_phase.yaml"), "--trainer.max_epochs", "4",
          "--data.init_args.fold_in_epoch", "2", "--trainer.callbacks.init_args.every_n_steps", "1",
          "--trainer.callbacks.init_args.warmup_fraction", "0", "--trainer.enable_progress_bar", "false",
          "--output_dir", str(tmp_path)])
    (ckpt,) = (tmp_path / "fit").rglob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    (ab,) = [v for k, v in state["callbacks"].items() if k.startswith("AutoBalanceCallback")]
    steps_per_epoch = math.ceil(sum(LongTailDigits().class_counts) / 64)
    assert ab["hyper_steps"] == 2 * steps_per_epoch  # every step of epochs 0 and 1, none after the fold-in
    alpha = {k: v for k, v in state["state_dict"].items() if k.startswith("autobalance.")}
    assert alpha and any(float(v.abs().max()) > 0 for v in alpha.values())
