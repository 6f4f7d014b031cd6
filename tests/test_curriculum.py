"""The baselines beside the searched augmentation: ``la_uniform`` (the ops at their start strengths, never searched)
and ``la_cuda`` (:class:`~lightning_autobalance.AugmentCurriculum`, a per-class curriculum of strength after CUDA):
the level rule, the levels' tables, the callback in a fit (and resumed), and both through the pipeline."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import pytorch_lightning as pl
import torch
from conftest import load_benchmark
from pytorch_lightning.callbacks import ModelCheckpoint
from test_augment_search import EpochSeededSampler, images, trainer
from test_pipeline import _digits_args
from torch.utils.data import DataLoader, TensorDataset

from lightning_autobalance import AugmentCurriculum, ImbalancedClassifier
from lightning_autobalance.core.augment import OPS, START_FRACTION, AugmentSettings
from lightning_autobalance.core.augment_parametrization import AugmentParameters
from lightning_autobalance.core.curriculum import free_values_for, level_tables, update_levels
from lightning_autobalance.runner.cli import main
from lightning_autobalance.runner.pipeline import BASELINE_CALLBACKS, BASELINES

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
    pytest.mark.filterwarnings("ignore:.*Checkpoint directory .* exists and is not empty.*"),
    pytest.mark.filterwarnings("ignore:.*validation_step.*"),
    pytest.mark.filterwarnings("ignore:.*Be aware that when using `ckpt_path`.*"),
    pytest.mark.filterwarnings("ignore:.*`torch.jit.script` is deprecated.*:FutureWarning"),
]

ALL_OPS = {"ops": "+".join(OPS), "gated": "noise+erase"}


# ====================================================================== the pure core
def test_update_rule_against_a_hand_worked_epoch() -> None:
    # class 0: 6/10 = 0.6 reaches the threshold (up); class 1: 0.5 (down); class 2: 1.0 but at the top (stays 10);
    # class 3: not seen (stays); class 4: 0.2 at level 0 (stays 0: never below)
    levels = torch.tensor([0, 3, 10, 2, 0])
    correct, total = torch.tensor([6, 5, 10, 0, 1]), torch.tensor([10, 10, 10, 0, 5])
    assert update_levels(levels, correct, total, 0.6, 10).tolist() == [1, 2, 10, 2, 0]
    assert update_levels(levels, correct, total, 0.65, 10).tolist() == [0, 2, 10, 2, 0]
    assert update_levels(levels, correct, total, 0.6, 3).tolist() == [1, 2, 3, 2, 0]  # capped at the top


@pytest.mark.parametrize(("kind", "group_size"), [("class", 1), ("hierarchical", 1), ("groups", 1)])
def test_levels_give_tables_of_level_over_max_times_the_limit(kind: str, group_size: int) -> None:
    params = AugmentParameters([50, 30, 20, 9, 3], ALL_OPS, kind=kind, group_size=group_size, num_groups=None)
    levels, top, margin = torch.tensor([0, 1, 4, 7, 8]), 8, 1e-3
    with torch.no_grad():
        for name, value in free_values_for(params, level_tables(levels, params.settings, top, 1, margin)).items():
            params.alpha()[name].copy_(value)
    fraction = (levels.double() / top).clamp(margin, 1 - margin)
    got = params.strengths()
    assert set(got) == set(params.settings.names)
    for name, table in got.items():
        limit = params.settings.limit(name) * (0.5 if name == "flip" else 1.0)  # a flip's top: probability 1/2
        torch.testing.assert_close(table[0].double(), fraction * limit, rtol=1e-5, atol=1e-7)
    assert torch.equal(got["shift"][0, 1:4].double().round(decimals=6),
                       (levels[1:4].double() / top * params.settings.max_shift).round(decimals=6))


def test_tables_a_parametrisation_cannot_hold_are_refused() -> None:
    tables = level_tables(torch.tensor([0, 5, 10]), AugmentSettings(), 10)
    with pytest.raises(ValueError, match="'dataset'"):
        free_values_for(AugmentParameters([50, 10, 2], kind="dataset"), tables)
    with pytest.raises(ValueError, match="group_size=2"):
        free_values_for(AugmentParameters([50, 10, 2], kind="groups", group_size=2), tables)


# ====================================================================== the callback's settings
@pytest.mark.parametrize(("kwargs", "named"), [
    ({"threshold": 0.0}, "threshold"), ({"threshold": 1.5}, "threshold"), ({"threshold": float("nan")}, "threshold"),
    ({"threshold": True}, "threshold"), ({"max_level": 0}, "max_level"), ({"max_level": 2.5}, "max_level"),
    ({"max_level": True}, "max_level"), ({"margin": 0.5}, "margin"), ({"margin": 0}, "margin"),
])
def test_bad_settings_raise_naming_the_setting(kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named} .*{re.escape(repr(next(iter(kwargs.values()))))}"):
        AugmentCurriculum(**kwargs)


# ====================================================================== the callback in a fit
def classifier(counts, **kwargs) -> ImbalancedClassifier:
    pl.seed_everything(0, verbose=False)
    options = {"search": ("augment",), "freeze_loss": True, "augmentation": {"ops": "flip+shift+noise"}}
    return ImbalancedClassifier("digits_net", num_classes=len(counts), class_counts=list(counts),
                                **{**options, **kwargs})


def loader(x, y) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=16, sampler=EpochSeededSampler(len(y), seed=1))


def test_the_curriculum_raises_a_learned_class_and_lowers_one_that_is_not() -> None:
    # Inputs that say nothing of the label, 60 of class 0 for 6 of class 1: plain cross-entropy predicts class 0,
    # learned (accuracy about 1), class 1 not (about 0). Both start at level 3.
    counts = [60, 6]
    x = torch.randn(sum(counts), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    model = classifier(counts, preset="ce")
    curriculum = AugmentCurriculum(max_level=10)
    curriculum.load_state_dict({"levels": [3, 3], "epochs": 0, "max_level": 10})
    trainer(callbacks=[curriculum], max_epochs=3).fit(model, loader(x, y))
    assert curriculum.epochs == 3
    assert curriculum.levels.tolist() == [6, 0]
    limit = model.autobalance_augmentation.settings.max_shift
    torch.testing.assert_close(model.autobalance_augmentation.strengths()["shift"][0],
                               torch.tensor([0.6 * limit, 1e-3 * limit]), rtol=1e-4, atol=1e-7)


def test_the_levels_resume_from_a_checkpoint_as_if_never_stopped(tmp_path) -> None:
    x, y = images([40, 12, 4], 1)

    def fit(epochs: int, ckpt: str | None = None, save: bool = False) -> AugmentCurriculum:
        model, curriculum = classifier([40, 12, 4]), AugmentCurriculum(threshold=0.5, max_level=4)
        callbacks = [curriculum, *([ModelCheckpoint(dirpath=tmp_path, filename="last")] if save else [])]
        trainer(callbacks, max_epochs=epochs, enable_checkpointing=save).fit(model, loader(x, y), ckpt_path=ckpt)
        return curriculum

    whole = fit(4)
    fit(2, save=True)
    resumed = fit(4, ckpt=str(tmp_path / "last.ckpt"))
    assert resumed.epochs == whole.epochs == 4
    assert resumed.levels.tolist() == whole.levels.tolist() and whole.levels.max() > 0
    state = whole.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain data (weights_only checkpoints)
    again = AugmentCurriculum(threshold=0.5, max_level=4)
    again.load_state_dict(state)
    assert again.levels.tolist() == whole.levels.tolist() and again.epochs == 4
    with pytest.raises(ValueError, match="max_level=4"):
        AugmentCurriculum(max_level=5).load_state_dict(state)


def test_setup_refuses_a_module_without_a_frozen_augmentation() -> None:
    x, y = images([8, 4], 0)
    with pytest.raises(ValueError, match="no augmentation to drive"):
        trainer([AugmentCurriculum()], max_epochs=1).fit(classifier([8, 4], search=("offset",)), loader(x, y))
    unfrozen = classifier([8, 4], freeze_loss=False)
    with pytest.raises(ValueError, match="freeze_augment"):
        trainer([AugmentCurriculum()], max_epochs=1).fit(unfrozen, loader(x, y))
    unfrozen.freeze_augment()
    assert unfrozen.autobalance_augmentation.frozen
    unfrozen.unfreeze_augment()
    assert not unfrozen.autobalance_augmentation.frozen
    with pytest.raises(RuntimeError, match="no augmentation"):
        classifier([8, 4], search=("offset",)).freeze_augment()


class OwnLoss(ImbalancedClassifier):
    """Applies the augmentation but trains with a loss of its own (the mixin never sees the logits): it returns
    them when ``give_logits``."""

    give_logits = True

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(self.autobalance_augment(x, y))
        loss = torch.nn.functional.cross_entropy(logits, y)
        return {"loss": loss, "logits": logits.detach()} if self.give_logits else loss


def test_the_logits_come_from_the_step_outputs_or_an_error_says_how() -> None:
    x, y = images([20, 8], 0)
    pl.seed_everything(0, verbose=False)
    model = OwnLoss("digits_net", num_classes=2, class_counts=[20, 8], search=("augment",), freeze_loss=True)
    curriculum = AugmentCurriculum(threshold=0.01)
    trainer([curriculum], max_epochs=2).fit(model, loader(x, y))
    assert curriculum.epochs == 2 and curriculum.levels[0] == 2  # the head class, predicted from the start
    model.give_logits = False
    with pytest.raises(RuntimeError, match=re.escape("'logits': logits.detach()")):
        trainer([AugmentCurriculum()], max_epochs=1).fit(model, loader(x, y))


# ====================================================================== la_uniform
class WatchStrengths(pl.Callback):
    """The augmentation's strengths at every training batch."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        aug = pl_module.autobalance_augmentation
        self.seen.append({k: v.clone() for k, v in pl_module._autobalance_augment_tables(aug).items()})


def test_la_uniform_keeps_the_start_strengths_equal_for_every_class() -> None:
    counts = [40, 12, 4]
    x, y = images(counts, 1)
    kwargs = {**BASELINES["la_uniform"], "augmentation": {"ops": "flip+shift+noise", "start": {"shift": 0.05}}}
    model = classifier(counts, **kwargs)
    aug = model.autobalance_augmentation
    assert model.loss_frozen and aug.frozen and "la_uniform" not in BASELINE_CALLBACKS
    watch = WatchStrengths()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*AutoBalance.*")  # no "nothing is searched" warning
        trainer([watch], max_epochs=2).fit(model, loader(x, y))
    assert len(watch.seen) == 2 * 4
    limits = {name: aug.settings.limit(name) for name in aug.settings.names}
    for tables in watch.seen:
        for name, table in tables.items():
            strength = limits[name] * torch.sigmoid(table)
            want = 0.05 if name == "shift" else limits[name] * START_FRACTION  # the start: given, else near none
            torch.testing.assert_close(strength, torch.full_like(strength, want), rtol=1e-6, atol=1e-7)
    assert all(torch.equal(t, watch.seen[0][n]) for tables in watch.seen for n, t in tables.items())


# ====================================================================== through the pipeline
def test_the_pipeline_trains_la_uniform_and_la_cuda(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])
    out = tmp_path / "run"
    main(_digits_args(out, "--search", "false", "--trainer.max_epochs", "2", "--baselines", "[la_uniform, la_cuda]"))
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["la_uniform", "la_cuda"]
    for row in results["rows"]:
        assert 0.0 <= row["balanced_error"] <= 1.0
    ckpt = torch.load(out / "la_cuda" / "checkpoints" / "last.ckpt", weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("AugmentCurriculum"))
    assert state["epochs"] == 2 and len(state["levels"]) == len(results["class_counts"])
    fingerprint = json.loads((out / "la_cuda" / "fingerprint.json").read_text())
    assert "AugmentCurriculum" in json.dumps(fingerprint.get("callbacks"))
    assert "callbacks" not in json.loads((out / "la_uniform" / "fingerprint.json").read_text())


def test_the_quality_benchmark_runs_both_baselines(tmp_path) -> None:
    quality = load_benchmark("quality")
    assert {"la_uniform", "la_cuda"} <= set(quality.METHODS) and {"la_uniform", "la_cuda"} <= set(quality.LABELS)
    args = quality.pipeline_args(tmp_path / "c.yaml", 0, tmp_path / "out", ["la", "la_uniform", "la_cuda"], [])
    assert args[args.index("--baselines") + 1] == "[la, la_uniform, la_cuda]"
    assert args[args.index("--search") + 1] == "false"
