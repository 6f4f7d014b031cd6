"""End-to-end tests of ``lightning-autobalance pipeline``: search -> export -> retrain -> baselines -> results.

Tiny settings (Digits-LT, 3 epochs, a hyper step every 2 optimizer steps from the first), run in-process through
``lightning_autobalance.runner.cli.main``.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import crash_at
from test_data_modules import _fake_cifar10  # the fake CIFAR-10 release of the datamodule tests

from lightning_autobalance.core.losses import LDAMLoss, load_loss_tables
from lightning_autobalance.runner.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "examples" / "digits_lt.yaml")
TINY = [
    "--trainer.max_epochs", "3",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
    "--trainer.callbacks.init_args.every_n_steps", "2",
    "--trainer.callbacks.init_args.start_step", "0",
    # 3 epochs do not fit the training data, where the default check would put the start back: the heads decide here
    "--trainer.callbacks.init_args.fit_tolerance", "null",
]
STAGES = ("search", "autobalance", "ce", "la")


@pytest.fixture(autouse=True)
def _cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest's own arguments are not the CLI's (and LightningCLI warns when both are given)."""
    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])


def _digits_args(out: Path, *extra: str) -> list[str]:
    return ["pipeline", "--config", DIGITS, *TINY, "--output_dir", str(out), *extra]


def _snapshot(out: Path) -> dict[str, int]:
    """mtime (ns) of every stage's checkpoint and result file."""
    files = [out / s / "checkpoints" / "last.ckpt" for s in STAGES] + [out / s / "result.json" for s in STAGES]
    return {str(f.relative_to(out)): f.stat().st_mtime_ns for f in files}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("pipeline") / "digits"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["lightning-autobalance"])
        main(_digits_args(out))
    return out, json.loads((out / "results.json").read_text())


def test_results_json(digits_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = digits_run
    assert results["output_dir"] == str(out)
    assert results["model"] == "ImbalancedClassifier" and results["datamodule"] == "LongTailDigits"
    counts = results["class_counts"]
    k = len(counts)
    assert k == 10 and counts[0] > counts[-1]
    assert [r["method"] for r in results["rows"]] == ["autobalance", "ce", "la"]
    for row in results["rows"]:
        assert 0.0 <= row["balanced_error"] <= 1.0
        assert len(row["per_class_error"]) == k
        assert all(0.0 <= e <= 1.0 for e in row["per_class_error"])
        assert row["balanced_error"] == pytest.approx(sum(row["per_class_error"]) / k, abs=1e-6)
        for key in ("head_error", "medium_error", "tail_error"):
            assert 0.0 <= row[key] <= 1.0, key  # digits has classes of all three kinds
        assert row["worst_class_error"] == pytest.approx(max(row["per_class_error"]))
        assert row["fit_time_s"] > 0
    assert results["rows"][0]["search_time_s"] > 0
    search = results["search"]
    assert search["hyper_steps"] > 0 and search["skipped_steps"] == 0 and search["fit_time_s"] > 0
    assert Path(search["found_loss"]) == out / "found_loss.yaml"
    found = results["found_loss"]
    assert set(found) == {"delta", "offset", "weight"}
    for name, table in found.items():
        assert len(table) == 1 and len(table[0]) == k, name
        assert all(math.isfinite(v) for v in table[0]), name
    # The default search changes the offsets only (from logit adjustment); delta and weight stay at the preset.
    assert found["delta"][0] == [1.0] * k and found["weight"][0] == [1.0] * k


def test_found_loss_png_and_config(digits_run: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture) -> None:
    out, results = digits_run
    tables, info = load_loss_tables(out / "found_loss.yaml")
    assert tables.delta.shape == (1, 10)
    assert torch.allclose(tables.delta.double(), torch.tensor(results["found_loss"]["delta"], dtype=torch.float64))
    assert info["search"] == ["offset"] and info["preset"] == "la"
    moved = info["alpha"]["offset"][0]  # the searched deviation from the preset
    assert max(moved) - min(moved) > 1e-4
    # the held-back check's decision, with its figures, in the loss file and in the search's result.json
    decision = json.loads((out / "search" / "result.json").read_text())["decision"]
    assert info["decision"] == decision == results["search"]["decision"]
    assert decision["decision"] == "found loss kept" and decision["fit_tolerance"] is None
    assert decision["objective_found"] < decision["objective_start"] and 0.0 <= decision["training_error"] <= 1.0

    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", png[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", png[16:24])
    assert width > 100 and height > 100
    assert struct.unpack(">I", png[29:33])[0] == zlib.crc32(png[12:29])  # the IHDR chunk's CRC
    assert png.endswith(b"IEND\xaeB`\x82")

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["output_dir"] == str(out) and saved["baselines"] == ["ce", "la"]
    assert saved["data"]["class_path"] == "lightning_autobalance.data.LongTailDigits"
    # The saved configuration is a valid `pipeline --config` file.
    with pytest.raises(SystemExit) as exit_info:
        main(["pipeline", "--config", str(out / "config.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["output_dir"] == str(out)

    for stage in STAGES:
        assert (out / stage / "checkpoints" / "last.ckpt").is_file(), stage
        assert json.loads((out / stage / "result.json").read_text())["method"] == stage


def test_rerun_skips_finished_stages(digits_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = digits_run
    before = _snapshot(out)
    main(_digits_args(out))
    assert _snapshot(out) == before  # no stage trained or tested again
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == results["rows"]
    assert again["found_loss"] == results["found_loss"]
    assert again["search"] == results["search"]


def test_interrupted_search_resumes_to_the_same_loss(digits_run: tuple[Path, dict[str, Any]],
                                                     tmp_path: Path) -> None:
    _, reference = digits_run
    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        main(_digits_args(out, "--baselines", "[]", crash_at(2)))
    assert (out / "search" / "checkpoints" / "last.ckpt").is_file()  # written at the end of epoch 1
    assert not (out / "search" / "result.json").exists()
    assert not (out / "found_loss.yaml").exists()

    main(_digits_args(out, "--baselines", "[]"))
    assert (out / "search" / "logs" / "metrics.1.csv").is_file()  # the first attempt's log, kept
    assert (out / "search" / "logs" / "metrics.csv").is_file()
    results = json.loads((out / "results.json").read_text())
    # The same loss as the uninterrupted run: the resumed search continued where it stopped (weights, loss,
    # hyper-optimizer, upper-batch stream and random state), it did not restart.
    assert results["found_loss"] == reference["found_loss"]
    assert results["search"]["hyper_steps"] == reference["search"]["hyper_steps"]
    assert [r["method"] for r in results["rows"]] == ["autobalance"]
    assert results["rows"][0]["per_class_error"] == reference["rows"][0]["per_class_error"]


def test_fake_cifar10_folder_through_the_cli(tmp_path: Path, one_thread: None) -> None:
    """The CIFAR-10-LT example config on a tiny hand-made release (resnet32, one epoch per stage)."""
    _fake_cifar10(tmp_path / "data", per_class=20, test_per_class=3)
    out = tmp_path / "run"
    main([
        "pipeline", "--config", str(ROOT / "examples" / "cifar10_lt.yaml"),
        "--data.init_args.root", str(tmp_path / "data"),
        "--data.init_args.check_integrity", "false",
        "--data.init_args.imbalance_ratio", "10",
        "--data.init_args.batch_size", "16",
        "--data.init_args.num_workers", "0",
        "--trainer.accelerator", "cpu",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.callbacks.init_args.start_epoch", "0",
        "--trainer.callbacks.init_args.every_n_steps", "2",
        "--trainer.callbacks.init_args.max_norm", "1.0",  # hyper steps on an untrained network and noise images
        "--model.lr_scheduler.init_args.warmup_epochs", "0",
        "--search_epochs", "1",
        "--retrain_epochs", "1",
        "--baselines", "[ce]",
        "--output_dir", str(out),
    ])
    results = json.loads((out / "results.json").read_text())
    assert results["datamodule"] == "LongTailCIFAR10"
    assert results["class_counts"][0] == 20 and len(results["class_counts"]) == 10
    assert [r["method"] for r in results["rows"]] == ["autobalance", "ce"]
    assert results["search"]["hyper_steps"] > 0
    for row in results["rows"]:
        assert 0.0 <= row["balanced_error"] <= 1.0 and len(row["per_class_error"]) == 10
    assert (out / "loss.png").is_file() and (out / "found_loss.yaml").is_file()


# ====================================================================== LDAM-DRW's schedule
@pytest.mark.parametrize(("drw_epoch", "warns"), [(160, True), (2, True), (1, False), (None, False)])
def test_ldam_warns_when_drw_never_starts(drw_epoch: int | None, warns: bool, recwarn: pytest.WarningsRecorder) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_autobalance import ImbalancedClassifier

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(12, 64), torch.arange(12) % 3)
    model = ImbalancedClassifier("digits_net", 3, [4, 4, 4], loss=LDAMLoss(drw_epoch=drw_epoch))
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, DataLoader(data, batch_size=6))
    messages = [str(w.message) for w in recwarn if "deferred re-weighting" in str(w.message)]
    assert len(messages) == int(warns)
    if warns:
        assert f"drw_epoch={drw_epoch}" in messages[0] and "max_epochs=2" in messages[0]
    assert model.criterion.reweighting == (drw_epoch is not None and drw_epoch <= 1)
