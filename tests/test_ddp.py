"""Two CPU processes (gloo): DDP-exact hypergradients, identical loss parameters on every rank, resume, errors.

Each check runs tests/_ddp_script.py in a subprocess, so that Lightning's ``ddp`` launcher (which re-runs the
script for the other rank) never re-runs pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_ddp_script.py")
pytestmark = [pytest.mark.ddp, pytest.mark.timeout(300)]


def run(mode: str, out: Path, *args: str, expect_ok: bool = True, timeout: int = 240) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, str(out), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=out.parent)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-2000:] + "\n--- stderr ---\n" + proc.stderr[-6000:]
        return json.loads(out.read_text())
    assert proc.returncode != 0, "expected the run to fail"
    return {"log": proc.stdout + proc.stderr}


def test_two_rank_hypergradient_equals_one_process_on_the_union(tmp_path):
    report = run("hypergrad", tmp_path / "hg.json")
    dro = report.pop("group_dro")
    assert dro["q_moved"] > 1e-3 and dro["q_identical"], dro
    assert dro["q_diff"] < 1e-6 and dro["grad_rel_diff"] < 1e-6, dro  # q is float32
    assert len(report) == 12 and sum(name.startswith("objective_") for name in report) == 4
    for method, r in report.items():
        assert r["norm"] > 1e-3, method  # a non-trivial hypergradient
        assert r["rel_diff"] < 1e-12, (method, r)  # float64: equal up to rounding
        assert r["objective_diff"] < 1e-12, (method, r)
        assert r["ranks_identical"], method


@pytest.mark.parametrize(("strategy", "objective", "method"), [
    ("ddp_spawn", "balanced_ce", "neumann"), ("ddp", "balanced_ce", "neumann"), ("ddp", "worst_class", "neumann"),
    ("ddp", "balanced_ce", "head")])
def test_loss_parameters_identical_on_every_rank(tmp_path, strategy, objective, method):
    # worst_class: the objective built with the callback's Reducer (a sum over processes inside it); head: the
    # head method's Newton solves and feature buffers, every figure averaged over the processes
    report = run("fit", tmp_path / "fit.json", "--strategy", strategy, "--objective", objective, "--method", method)
    assert report["world_size"] == 2 and report["hyper_steps"] == report["global_step"] == 12
    rank0, rank1 = report["alpha"]
    assert rank0 == rank1  # bit-identical (JSON floats round-trip exactly)
    assert max(abs(v) for v in rank0) > 0.05  # and they did move


def test_ddp_and_ddp_spawn_agree(tmp_path):
    a = run("fit", tmp_path / "a.json", "--strategy", "ddp_spawn")
    b = run("fit", tmp_path / "b.json", "--strategy", "ddp")
    assert a["alpha"] == b["alpha"]


def test_resume_under_ddp_equals_uninterrupted_and_resumes_on_one_device(tmp_path):
    full = run("resume", tmp_path / "full.json", "--strategy", "ddp", "--epochs", "4")
    ckpt = tmp_path / "ckpt"
    # interrupted after 2 of the 4 planned epochs (the automatic schedule plans from the configured length)
    run("resume", tmp_path / "part.json", "--strategy", "ddp", "--epochs", "4", "--stop-after", "2", "--ckpt-dir",
        str(ckpt))
    resumed = run("resume", tmp_path / "resumed.json", "--strategy", "ddp", "--epochs", "4", "--resume",
                  str(ckpt / "last.ckpt"))
    assert resumed["alpha"] == full["alpha"]
    assert resumed["hyper_steps"] == full["hyper_steps"] == 16
    # A checkpoint written by 2 processes resumes on 1 (the loss parameters and the hyper-optimizer travel).
    one = run("resume", tmp_path / "one.json", "--strategy", "auto", "--devices", "1", "--epochs", "4", "--resume",
              str(ckpt / "last.ckpt"))
    part = json.loads((tmp_path / "part.json").read_text())
    assert one["world_size"] == 1 and one["hyper_steps"] == part["hyper_steps"] + 16
    assert one["alpha"][0] != part["alpha"][0]


@pytest.mark.parametrize(("mode", "message"), [
    ("bad_batch", "needs the same batch sizes on every process"),
    ("no_upper", "Every process needs upper data"),
])
def test_unequal_or_missing_upper_data_raises_on_every_rank_without_hanging(tmp_path, mode, message):
    log = run(mode, tmp_path / "x.json", "--strategy", "ddp", expect_ok=False, timeout=180)["log"]
    # Every process computes the same check and raises; Lightning may end the other process before it prints, so
    # one report is required. Not hanging is the point: the run ends well inside the timeout.
    assert any("RuntimeError" in line and message in line for line in log.splitlines()), log[-3000:]


def test_the_augmentation_curriculum_counts_every_sample_once_and_agrees_on_every_rank(tmp_path):
    report = run("curriculum", tmp_path / "curriculum.json", "--strategy", "ddp", "--epochs", "4")
    assert report["world_size"] == 2
    # every epoch, the counts summed over the two processes are the training set's, each sample once
    assert report["totals"] == [[60, 24, 8]] * 4
    rank0, rank1 = report["levels"]
    assert rank0 == rank1 and max(rank0) > 0  # the same levels on both ranks, and some moved
    assert report["noise"][0] == report["noise"][1]
