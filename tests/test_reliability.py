"""Runs you can trust (docs/reliability.md): stage fingerprints and restarts, one run per output folder, damaged
stage files, fit time over interruptions, bad images and list files named before training, damaged loss files."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import crash_at
from PIL import Image

from lightning_autobalance.core.losses import load_loss_tables
from lightning_autobalance.data import LongTailImageFolder
from lightning_autobalance.runner.cli import main
from lightning_autobalance.runner.output_lock import OutputFolderInUse, OutputLock
from lightning_autobalance.runner.pipeline import PipelineDiskFull, no_space

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "examples" / "digits_lt.yaml")
QUICK = ["--trainer.max_epochs", "3", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])


def _run(out: Path, *extra: str, baselines: str = "[la]") -> dict:
    main(["pipeline", "--config", DIGITS, *QUICK, "--search", "false", "--baselines", baselines,
          "--output_dir", str(out), *extra])
    return json.loads((out / "results.json").read_text())


def _refused(capsys: pytest.CaptureFixture, out: Path, *extra: str, baselines: str = "[la]") -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _run(out, *extra, baselines=baselines)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------- fingerprints
def test_an_added_training_callback_is_part_of_the_fingerprint(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Stochastic weight averaging changes the model a stage ends with: adding it is a new configuration, refused in
    one line; a progress-bar or checkpoint callback is not."""
    out = tmp_path / "run"
    _run(out)
    swa = ["--trainer.callbacks+=pytorch_lightning.callbacks.StochasticWeightAveraging",
           "--trainer.callbacks.swa_lrs", "0.01"]
    err = _refused(capsys, out, *swa)
    assert "holds the stage 'la' of another configuration" in err and "callbacks" in err
    again = _run(out, "--trainer.callbacks+=pytorch_lightning.callbacks.LearningRateMonitor")
    assert again["rows"]


def test_a_stage_that_stopped_before_its_first_checkpoint_does_not_block_a_corrected_rerun(
        tmp_path: Path) -> None:
    """A fit that failed before any checkpoint (a refused setting) leaves only its fingerprint and logs: the corrected
    rerun starts the stage afresh instead of being refused for a configuration that left nothing to reuse."""
    out = tmp_path / "run"
    first = _run(out)
    (out / "la" / "result.json").unlink()
    for ckpt in (out / "la" / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()
    assert (out / "la" / "fingerprint.json").is_file()
    again = _run(out, "--data.init_args.imbalance_ratio", "10")
    assert json.loads((out / "la" / "fingerprint.json").read_text())["data"]["hparams"]["imbalance_ratio"] == 10
    assert again["class_counts"][-1] > first["class_counts"][-1]  # imbalance 10 keeps more of the tail than 100


def test_a_moved_folder_run_from_another_directory_reuses_every_stage(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Module paths are not file paths, and the found loss inside the run's folder is recorded relative to it: the
    same command from another directory, on the folder moved elsewhere, reuses every stage and retrains nothing."""
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir(), second_dir.mkdir()
    monkeypatch.chdir(first_dir)
    out = first_dir / "run"
    main(["pipeline", "--config", DIGITS, *QUICK, "--baselines", "[la]", "--output_dir", str(out)])
    first = json.loads((out / "results.json").read_text())
    fingerprint = (out / "autobalance" / "fingerprint.json").read_text()
    assert "<output_dir>/found_loss.yaml" in fingerprint and str(out) not in fingerprint
    assert f"{first_dir}/torch.optim" not in fingerprint
    moved = second_dir / "moved"
    os.rename(out, moved)
    monkeypatch.chdir(second_dir)
    before = {k: v for k, v in _mtimes(moved).items() if k.endswith((".ckpt", "fingerprint.json", "result.json"))}
    main(["pipeline", "--config", DIGITS, *QUICK, "--baselines", "[la]", "--output_dir", str(moved)])
    again = json.loads((moved / "results.json").read_text())
    assert again["rows"] == first["rows"]
    assert {k: v for k, v in _mtimes(moved).items() if k in before} == before  # nothing trained again


def test_a_rerun_with_another_config_is_refused_and_touches_nothing(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    first = _run(out)
    assert json.loads((out / "la" / "fingerprint.json").read_text())["epochs"] == 3
    before = _mtimes(out)
    err = _refused(capsys, out, "--data.init_args.imbalance_ratio", "10", "--trainer.max_epochs", "2")
    assert err.startswith("lightning-autobalance: error: ") and "holds the stage 'la' of another configuration" in err
    assert "data.hparams.imbalance_ratio: 100.0 -> 10.0" in err and "epochs: 3 -> 2" in err
    assert "another output_dir" in err and "--restart la" in err
    assert _mtimes(out) == before  # not even config.yaml or results.json
    # The same config is accepted: the finished stage is reused.
    again = _run(out)
    assert again["rows"] == first["rows"]
    # --restart trains it again from scratch with the new config.
    new = _run(out, "--data.init_args.imbalance_ratio", "10", "--trainer.max_epochs", "2", "--restart", "[la]")
    assert new["class_counts"] != first["class_counts"]
    assert json.loads((out / "la" / "fingerprint.json").read_text())["epochs"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["init_args"]["imbalance_ratio"] == 10


def test_resume_never_loads_another_configs_optimizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A stage that crashed at lr 0.5 is not resumed with lr 0.05: its checkpoint holds the old optimizer."""
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _run(out, "--model.optimizer.init_args.lr", "0.5", crash_at(1))
    assert (out / "la" / "checkpoints" / "last.ckpt").is_file()
    err = _refused(capsys, out, "--model.optimizer.init_args.lr", "0.05")
    assert "model.hparams.optimizer.init_args.lr: 0.5 -> 0.05" in err
    results = _run(out, "--model.optimizer.init_args.lr", "0.05", "--restart", "[all]")
    assert results["rows"][0]["attempts"] == 1  # from scratch, not resumed


def test_restarting_the_search_restarts_the_retraining_on_its_loss(tmp_path: Path) -> None:
    out = tmp_path / "run"
    tiny = ["--trainer.callbacks.init_args.every_n_steps", "2", "--trainer.callbacks.init_args.start_step", "0"]
    main(["pipeline", "--config", DIGITS, *QUICK, *tiny, "--baselines", "[]", "--output_dir", str(out)])
    fp = json.loads((out / "autobalance" / "fingerprint.json").read_text())
    assert set(fp["inputs"]) == {"found_loss.yaml"}
    search_fp = json.loads((out / "search" / "fingerprint.json").read_text())
    assert search_fp["autobalance"]["settings"]["schedule"]["fields"]["every_n_steps"] == 2
    main(["pipeline", "--config", DIGITS, *QUICK, *tiny, "--trainer.callbacks.init_args.hyper_lr", "0.1",
          "--baselines", "[]", "--restart", "[search]", "--output_dir", str(out)])
    fp2 = json.loads((out / "autobalance" / "fingerprint.json").read_text())
    assert fp2["inputs"] != fp["inputs"]  # retrained on the new search's loss, not skipped


# ------------------------------------------------------------------------------------------- damaged files
def test_damaged_result_and_checkpoints_fall_back(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _run(out, crash_at(2))
    ckpts = out / "la" / "checkpoints"
    assert (ckpts / "last.ckpt").is_file() and (ckpts / "previous.ckpt").is_file()  # epochs 1 and 0
    (ckpts / "last.ckpt").write_bytes(b"")  # truncated to nothing
    results = _run(out)
    messages = " ".join(str(w.message) for w in recwarn)
    assert f"the checkpoint {ckpts / 'last.ckpt'} cannot be read" in messages
    assert (ckpts / "last.ckpt.corrupt").is_file()
    assert results["rows"][0]["attempts"] == 2  # resumed from previous.ckpt

    (out / "la" / "result.json").write_text('{"method": "la", "bal')
    recwarn.clear()
    again = _run(out)
    assert f"{out / 'la' / 'result.json'} cannot be read" in " ".join(str(w.message) for w in recwarn)
    assert again["rows"][0]["per_class_error"] == results["rows"][0]["per_class_error"]  # finished from last.ckpt


def test_unreadable_checkpoints_start_the_stage_again(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _run(out, crash_at(1))
    for name in ("last.ckpt", "previous.ckpt"):
        path = out / "la" / "checkpoints" / name
        if path.is_file():
            path.write_bytes(b"not a checkpoint")
    results = _run(out)
    assert results["rows"][0]["attempts"] == 1


def test_fit_time_adds_up_over_interruptions(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _run(out, crash_at(2))
    state = torch.load(out / "la" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    before = state["callbacks"]["autobalance-pipeline-fit-clock"]["fit_time_s"]
    assert before > 0
    row = _run(out)["rows"][0]
    assert row["attempts"] == 2 and row["fit_time_s"] > before


# ------------------------------------------------------------------------------------------- one run per folder
def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename,
                                               "started": "earlier", "command": "lightning-autobalance pipeline"}))
        err = _refused(capsys, out)
        assert f"is in use by another run (pid {holder.pid}" in err and str(out / ".lock") in err
        assert not (out / "la").exists()
    finally:
        holder.kill()
        holder.wait()
    _run(out)  # the holder is gone: its lock is taken over
    assert not (out / ".lock").exists()  # and released at the end


def test_lock_of_another_host_and_unreadable_lock(tmp_path: Path) -> None:
    lock = OutputLock(tmp_path)
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t", "command": "c"}))
    with pytest.raises(OutputFolderInUse, match="on host elsewhere"):
        lock.acquire()
    (tmp_path / ".lock").write_text("{trunc")
    with lock:
        assert lock.taken_over == {"unreadable": True}
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


# ------------------------------------------------------------------------------------------- data and loss files
def _folder(root: Path, per_class: tuple[int, ...] = (6, 4, 3)) -> None:
    for split in ("train", "test"):
        for c, n in enumerate(per_class):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n if split == "train" else 2):
                Image.new("RGB", (32, 32), (40 * c, i, 0)).save(folder / f"{i}.png")


def test_changed_images_are_a_new_configuration_and_the_same_images_are_not(tmp_path: Path) -> None:
    """The data's content is part of a run's fingerprint: a replaced training image or a removed test image changes
    the digest (the pipeline then refuses the old stages in one line, as for any changed setting); the same files
    give the same digest."""
    _folder(tmp_path)

    def digest() -> str:
        return LongTailImageFolder(str(tmp_path), imbalance_ratio=2, batch_size=4).content_digest()

    first = digest()
    assert digest() == first
    image = tmp_path / "train" / "class1" / "0.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image)
    os.utime(image, ns=(1, 1))  # a replaced file: another size or time
    replaced = digest()
    assert replaced != first
    (tmp_path / "test" / "class0" / "1.png").unlink()
    assert digest() not in (first, replaced)


def test_changed_images_are_refused_in_words(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The rerun on changed images is refused in one line that says what changed (its old form showed two
    digests); the same images reuse the stage."""
    _folder(tmp_path / "data")
    args = ["pipeline", "--config", str(ROOT / "examples" / "cifar10_lt_jpeg.yaml"), *QUICK, "--retrain_epochs", "1",
            "--data.init_args.root", str(tmp_path / "data"), "--data.init_args.already_long_tailed", "true",
            "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4", "--model.network", "resnet20",
            "--search", "false", "--baselines", "[ce]", "--output_dir", str(tmp_path / "run")]
    main(args)
    image = tmp_path / "data" / "train" / "class1" / "0.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(image)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "holds the stage 'ce' of another configuration (data.content: the training or test files changed" in err


def test_a_class_with_one_image_is_said_in_one_line_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The search split needs two images of every class: one is refused in one line (it used to be a traceback of
    about 40 lines, raised inside a `hasattr`), and the output folder is not even created."""
    _folder(tmp_path / "data", (6, 4, 1))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main(["pipeline", "--config", str(ROOT / "examples" / "cifar10_lt_jpeg.yaml"), *QUICK,
              "--data.init_args.root", str(tmp_path / "data"), "--data.init_args.already_long_tailed", "true",
              "--data.init_args.num_workers", "0", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("lightning-autobalance: error: The search split")
    assert "at least 2 samples of class 'class2'" in err[-1] and not out.exists()


def test_a_bad_image_is_named_when_the_datasets_are_built(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "train" / "class1" / "1.png").write_bytes(b"this is not a png")
    dm = LongTailImageFolder(str(tmp_path), imbalance_ratio=2, batch_size=4, search_split=True)
    with pytest.raises(RuntimeError, match=r"1 of the \d+ training images cannot be opened: .*class1/1.png"):
        dm.setup("fit")
    LongTailImageFolder(str(tmp_path), imbalance_ratio=2, batch_size=4, verify_images=False).setup("fit")


def test_a_list_label_beyond_the_classes_names_the_file(tmp_path: Path) -> None:
    _folder(tmp_path)
    lines = [f"train/class{c}/{i}.png {c}" for c, n in enumerate((6, 4)) for i in range(n)]
    lines.append("train/class2/0.png 4")  # labels 0, 1 and 4: classes 2 and 3 have no image
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    dm = LongTailImageFolder(str(tmp_path), train_list="train.txt", val_source="none", already_long_tailed=True)
    with pytest.raises(ValueError, match=r"train_list '.*train.txt': the labels run up to 4 .* no line has the "
                                         r"labels \[2, 3\]"):
        _ = dm.class_counts


def test_a_loss_file_with_non_finite_alpha_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    tiny = ["--trainer.callbacks.init_args.every_n_steps", "2", "--trainer.callbacks.init_args.start_step", "0"]
    main(["pipeline", "--config", DIGITS, *QUICK, *tiny, "--baselines", "[]", "--output_dir", str(out)])
    doc = yaml.safe_load((out / "found_loss.yaml").read_text())
    load_loss_tables(out / "found_loss.yaml")
    name = next(iter(doc["alpha"]))
    value = doc["alpha"][name]
    doc["alpha"][name] = [float("nan")] * len(value) if isinstance(value, list) else float("nan")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=rf"alpha.{name} holds non-finite"):
        load_loss_tables(bad)


# ------------------------------------------------------------------------------------------- settings a fit refuses
@pytest.mark.parametrize(("setting", "message"), [
    (["--trainer.callbacks.init_args.estimator", "{method: head}", "--model.optimizer.init_args.weight_decay", "0"],
     "Estimator(method='head') needs weight decay on the classifier head 'network.head'"),
    (["--trainer.callbacks.init_args.upper", "{holdout: 0.5}", "--data.init_args.upper_fraction", "0.01"],
     "UpperData(holdout=0.5) holds nothing back: every class of the upper data has one sample"),
])
def test_a_setting_the_search_refuses_is_one_line_before_anything_is_written(
        setting: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """What the search's fit refuses at its setup or start (the head method with no weight decay on the head, a
    holdout its upper split is too small for) is said in one line before anything is written: no folder, no
    fingerprint to block the corrected rerun, and a `--restart all` with the bad setting removes nothing. (It used to
    be a 53 to 59-line traceback raised inside the search's fit, after config.yaml and the stage's fingerprint.)"""
    out = tmp_path / "run"
    args = ["pipeline", "--config", DIGITS, *QUICK, "--baselines", "[]", "--output_dir", str(out)]

    def refused(*extra: str) -> str:
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main([*args, *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        return err

    err = refused(*setting)
    assert f"The stage 'search' cannot train as configured: {message}" in err
    assert not out.exists()
    main([*args, *setting[:2]])  # corrected: the method or the holdout kept, its cause fixed
    before = _mtimes(out)
    assert "results.json" in before
    assert message in refused(*setting, "--restart", "all")
    assert _mtimes(out) == before


# ------------------------------------------------------------------------------------------- a full disk
def _no_space_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """The stage's `call`-th checkpoint write fails as on a full disk."""
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    original, calls = TorchCheckpointIO.save_checkpoint, []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        calls.append(path)
        if len(calls) == call:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", save_checkpoint)


def test_a_full_disk_is_one_line_naming_the_folder_and_the_rerun_resumes_in_place(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A write that finds no room stops the run with one line that names the output folder and says to free space and
    rerun (exit status 1, no traceback: it used to be 36 to 109 lines); the same command then resumes in place: the
    interrupted stage continues from its last checkpoint."""
    out = tmp_path / "run"
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as info:
        _no_space_at(patch, 2)  # the second epoch's checkpoint
        _run(out)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"lightning-autobalance: error: No space left on the disk of {out} (writing {out}/la/")
    assert "free space there and rerun the same command" in err and "resumes where it stopped" in err
    assert not (out / "la" / "result.json").exists()
    _run(out)
    assert json.loads((out / "la" / "result.json").read_text())["attempts"] == 2  # resumed, not started again


def test_a_full_disk_keeps_its_traceback_under_debug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_AUTOBALANCE_DEBUG", "1")
    _no_space_at(monkeypatch, 1)
    with pytest.raises(PipelineDiskFull, match="free space there") as info:
        _run(tmp_path / "run")
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC


def test_no_space_is_found_through_the_exception_chain() -> None:
    full = OSError(errno.ENOSPC, "No space left on device", "/x/last.ckpt")
    try:
        try:
            raise full
        except OSError as err:
            raise RuntimeError("writing failed") from err
    except RuntimeError as wrapped:
        assert no_space(wrapped) is full
    assert no_space(OSError(errno.EACCES, "Permission denied")) is None
    assert no_space(ValueError("no")) is None
