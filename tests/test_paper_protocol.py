"""benchmarks/paper_protocol.py end to end on the CPU at tiny size: the commands it builds, a run of two rows in
parallel processes with device-resident data, and the time limit stopping what still runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_protocol.py"


def _load():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar_like")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 3)):
        for c in range(10):
            target = root / split / f"c{c}"
            target.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(target / f"{i}.png")
    return root


def test_scaled_epochs_shorten_the_whole_protocol_together():
    pp = _load()
    assert pp.scaled_epochs(1.0) == []
    got = dict(zip(pp.scaled_epochs(0.1)[::2], pp.scaled_epochs(0.1)[1::2], strict=True))
    assert got == {"--search_epochs": "30", "--retrain_epochs": "20",
                   "--model.lr_scheduler.init_args.milestones": "[16, 18]",
                   "--baseline_losses": '{"ldam_drw": {"class_path": "lightning_autobalance.core.losses.LDAMLoss", '
                                        '"init_args": {"drw_epoch": 16}}}',
                   "--model.lr_scheduler.init_args.warmup_epochs": "0.5"}


def _run(folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(folder), "--out", str(out), "--accelerator", "cpu",
         "--threads", "1", "--scale", "0.01", "--set=--data.init_args.imbalance_ratio=4",
         "--set=--data.init_args.batch_size=16", "--set=--trainer.callbacks.init_args.every_n_steps=1",
         "--set=--trainer.callbacks.init_args.max_norm=1.0", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_protocol_runs_rows_in_parallel_and_writes_the_table(folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = _run(folder, out, "--rows", "autobalance", "la", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scale"] == 0.01 and set(summary["rows"]) == {"autobalance", "la"}
    for row in ("autobalance", "la"):
        (error,) = summary["rows"][row]["balanced_error"]
        assert 0.0 <= error <= 100.0
        assert summary["rows"][row]["status"]["0"]["returncode"] == 0
    assert summary["rows"]["autobalance"]["hyper_steps"][0] > 0
    assert summary["rows"]["la"]["paper"] == 23.13
    # Each run is a pipeline of its own, on device-resident data, with the protocol's epochs scaled (3 + 2).
    results = json.loads((out / "autobalance_seed0" / "run" / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["autobalance"]
    config = (out / "autobalance_seed0" / "run" / "config.yaml").read_text()
    assert "device_resident: true" in config and "search_epochs: 3" in config and "retrain_epochs: 2" in config
    table = (out / "paper_protocol.md").read_text()
    assert "| autobalance |" in table and "| 21.15 |" in table and "python benchmarks/paper_protocol.py" in table


def test_time_limit_stops_unfinished_runs(folder: Path, tmp_path: Path):
    out = tmp_path / "out"
    proc = _run(folder, out, "--rows", "la", "--time-limit", "2")
    assert proc.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"]["la"]["balanced_error"] == [] and summary["rows"]["la"]["status"]["0"]["killed"]
    assert "stopped at the time limit" in (out / "paper_protocol.md").read_text()


def test_missing_data_folder_is_refused_before_anything_runs(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "is not a folder" in proc.stderr
