"""Guards that fail closed (issue 27): no code runs from an output folder, stage folders that cannot be checked are
refused, the suggested restarts parse, the CLI shows the library's own message, every value is checked before anything
is written, bad images and list labels are named before training. Tiny settings: Digits-LT, 1 to 3 epochs."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_at
from PIL import Image

from lightning_autobalance import ImbalancedClassifier
from lightning_autobalance.data import LongTailDigits, LongTailImageFolder
from lightning_autobalance.runner.cli import _root_message, main
from lightning_autobalance.runner.output_lock import OutputLock
from lightning_autobalance.runner.pipeline import PipelineSetupError, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_autobalance"
DIGITS = str(ROOT / "examples" / "digits_lt.yaml")
QUICK = ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]
SEARCH = ["--trainer.callbacks.init_args.every_n_steps", "2", "--trainer.callbacks.init_args.start_step", "0"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])


def _args(out: Path | str, *extra: str, search: bool = False, baselines: str = "[la]") -> list[str]:
    return ["pipeline", "--config", DIGITS, *QUICK, *(SEARCH if search else ["--search", "false"]),
            "--baselines", baselines, "--output_dir", str(out), *extra]


def _run(out: Path | str, *extra: str, **kw) -> dict:
    main(_args(out, *extra, **kw))
    return json.loads((Path(out) / "results.json").read_text())


def _one_line_error(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("lightning-autobalance: error: ")
    return err.strip()


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()}


# =========================================================================== 1. no code runs from an output folder
class _Payload:
    """Unpickling it creates a marker file: what a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "epoch": 0, "payload": _Payload(marker)}, path)
    assert not marker.exists()


def test_a_pickled_payload_in_a_bare_output_folder_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A crafted search/checkpoints/last.ckpt in a folder without fingerprints (shared, downloaded): refused, not
    loaded."""
    out, marker = tmp_path / "shared", tmp_path / "PAYLOAD_RAN"
    _plant(out / "search" / "checkpoints" / "last.ckpt", marker)
    err = _one_line_error(capsys, _args(out, search=True, baselines="[]"))
    assert "holds work of the stage 'search' (last.ckpt) but no fingerprint.json" in err and "--restart search" in err
    assert not marker.exists()


def test_a_pickled_payload_in_place_of_a_checkpoint_never_runs(tmp_path: Path,
                                                               recwarn: pytest.WarningsRecorder) -> None:
    """The same payload put in place of an interrupted search's own last.ckpt (its fingerprint intact): never
    unpickled (weights_only=True), named, moved aside, and the search starts again."""
    out, marker = tmp_path / "run", tmp_path / "PAYLOAD_RAN"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        _run(out, crash_at(1), search=True, baselines="[]")
    ckpt = out / "search" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (out / "search" / "fingerprint.json").is_file()
    _plant(ckpt, marker)
    results = _run(out, search=True, baselines="[]")
    assert not marker.exists()
    messages = " ".join(str(w.message) for w in recwarn)
    assert f"the checkpoint {ckpt} cannot be read" in messages and "pickled Python objects" in messages
    assert (ckpt.parent / "last.ckpt.corrupt").is_file()
    assert results["search"]["attempts"] == 1  # from the start, not from the planted file


def test_the_package_loads_nothing_unsafely() -> None:
    """Audit: every torch.load says weights_only=True; YAML only through safe_load; no pickle, no numpy pickles."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            unsafe = (("torch.load(" in code and "weights_only=True" not in code)
                      or "weights_only=False" in code
                      or re.search(r"yaml\.(load|unsafe_load|full_load|load_all)\(", code)
                      or re.search(r"\bpickle\.loads?\(|\bdill\.|allow_pickle=True", code))
            if unsafe:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, offenders


# =========================================================================== 2. the fingerprint guard fails closed
def test_a_stage_without_its_fingerprint_is_refused_not_reused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    first = _run(out)
    (out / "la" / "fingerprint.json").unlink()
    before = _mtimes(out)
    err = _one_line_error(capsys, _args(out, "--seed", "5"))
    assert (f"{out / 'la'} holds work of the stage 'la' (result.json, last.ckpt, previous.ckpt) but no "
            "fingerprint.json") in err
    assert _mtimes(out) == before  # results.json still holds the first run
    assert json.loads((out / "results.json").read_text())["seed"] == first["seed"] != 5
    # The way out the message names (its exact words) works.
    way_out = re.search(r"--restart (\S+?)[).]* \(or", err).group(1)
    again = _run(out, "--seed", "5", "--restart", way_out)
    assert again["seed"] == 5 and json.loads((out / "la" / "fingerprint.json").read_text())["seed"] == 5


def test_an_unreadable_fingerprint_is_refused_not_moved_aside(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    _run(out)
    (out / "la" / "fingerprint.json").write_text('{"library": "0.')
    err = _one_line_error(capsys, _args(out, "--trainer.max_epochs", "1"))
    assert f"{out / 'la' / 'fingerprint.json'} cannot be read (JSONDecodeError" in err and "--restart la" in err
    assert (out / "la" / "fingerprint.json").read_text() == '{"library": "0.'  # left as it was
    assert not (out / "la" / "fingerprint.json.corrupt").exists()


def test_a_relative_and_an_absolute_output_dir_are_one_folder(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The retraining's loss_file is recorded resolved: the same folder named two ways is the same configuration."""
    monkeypatch.chdir(tmp_path)
    first = _run("ref", search=True, baselines="[]")
    before = _mtimes(tmp_path / "ref")
    again = _run(tmp_path / "ref", search=True, baselines="[]")
    assert again["rows"] == first["rows"]
    changed = {k for k, v in _mtimes(tmp_path / "ref").items() if before.get(k) != v}
    assert changed <= {"results.json", "loss.png", "config.yaml"}  # every stage skipped


# =========================================================================== 3. restarts as the message says
def test_the_restart_forms_the_refusal_suggests_parse(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    _run(out)
    err = _one_line_error(capsys, _args(out, "--trainer.max_epochs", "1"))
    forms = re.findall(r"(--restart [^\s()]+?)[).]*(?=[\s)]|$)", err)
    assert forms == ["--restart la", "--restart all"], err
    for form in forms:
        results = _run(out, "--trainer.max_epochs", "1", *shlex.split(form))
        assert results["rows"][0]["attempts"] == 1
    assert json.loads((out / "la" / "fingerprint.json").read_text())["epochs"] == 1


def test_a_damaged_loss_file_is_named_and_written_again(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    out = tmp_path / "run"
    _run(out, search=True, baselines="[]")
    found = out / "found_loss.yaml"
    reference = found.read_bytes()
    retrained = (out / "autobalance" / "result.json").stat().st_mtime_ns
    found.write_bytes(reference[: len(reference) // 3])  # truncated
    _run(out, search=True, baselines="[]")
    messages = " ".join(str(w.message) for w in recwarn)
    assert f"the search's loss file {found} is damaged" in messages and "found_loss.yaml.corrupt" in messages
    assert found.read_bytes() == reference  # exported again from the search's checkpoint
    assert (out / "autobalance" / "result.json").stat().st_mtime_ns == retrained  # its input unchanged: skipped
    # Restarting the stage that reads it, with the file damaged again, recovers the same way.
    found.write_bytes(reference[:40])
    results = _run(out, "--restart", "autobalance", search=True, baselines="[]")
    assert found.read_bytes() == reference and results["rows"][0]["attempts"] == 1


# =========================================================================== 4. the library's own message
def test_the_root_message_stops_at_raise_from_none() -> None:
    def library() -> None:
        try:
            int("1.5")
        except ValueError:
            raise ValueError("train_list 'x.txt', line 3: expected '<relative/path> <integer label>'") from None

    try:
        try:
            library()
        except ValueError as err:
            raise RuntimeError("wrapped by the argument parser") from err
    except RuntimeError as outer:
        assert _root_message(outer) == "train_list 'x.txt', line 3: expected '<relative/path> <integer label>'"


def _tree(root: Path, per_class: tuple[int, ...] = (6, 4, 3), suffix: str = "png") -> None:
    for split in ("train", "test"):
        for c, n in enumerate(per_class):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n if split == "train" else 2):
                Image.new("RGB", (32, 32), (40 * c, 20 * i, 0)).save(folder / f"{i}.{suffix}")


def _image_folder_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["pipeline", "--model.network", "resnet32", "--data", "LongTailImageFolder",
            "--data.init_args.root", str(root), "--data.init_args.imbalance_ratio", "2",
            "--trainer.accelerator", "cpu", "--output_dir", str(out), *extra]


@pytest.mark.parametrize(("label", "expected"), [
    ("", "line 2: expected '<relative/path> <integer label>', got 'train/class0/1.png'"),
    ("1.5", "line 2: expected '<relative/path> <integer label>', got 'train/class0/1.png 1.5'"),
])
def test_a_bad_list_label_is_named_by_file_and_line_in_one_line(label: str, expected: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    _tree(tmp_path)
    (tmp_path / "train.txt").write_text(f"train/class0/0.png 0\ntrain/class0/1.png {label}\ntrain/class1/0.png 1\n")
    out = tmp_path / "run"
    err = _one_line_error(capsys, _image_folder_args(tmp_path, out, "--data.init_args.train_list", "train.txt",
                                                     "--data.init_args.val_source", "none",
                                                     "--data.init_args.already_long_tailed", "true"))
    assert f"train_list '{tmp_path / 'train.txt'}', {expected}" in err
    assert not out.exists()


# =========================================================================== 6. values, data, output folder
@pytest.mark.parametrize(("extra", "message"), [
    (["--search_epochs", "-3"], "search_epochs must be a whole number >= 1"),
    (["--retrain_epochs", "0"], "retrain_epochs must be a whole number >= 1"),
    (["--seed", "-1"], "seed must be a whole number in 0..4294967295"),
    (["--search_epochs", "0"], "search_epochs must be a whole number >= 1"),
    (["--trainer.max_epochs", "0"], "trainer.max_epochs=0 trains nothing, yet the search and the retraining"),
])
def test_a_bad_value_is_refused_before_anything_is_written(extra: list[str], message: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    err = _one_line_error(capsys, _args(out, *extra, search=True, baselines="[ce]"))
    assert message in err
    assert not out.exists()  # no fingerprint, no config.yaml: nothing blocks the corrected run


def test_a_file_or_an_unwritable_output_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    taken = tmp_path / "a_file"
    taken.write_text("not a folder")
    err = _one_line_error(capsys, _args(taken))
    assert f"output_dir {taken} is a file, not a folder" in err
    beneath = taken / "run"
    err = _one_line_error(capsys, _args(beneath))
    assert f"output_dir {beneath} cannot be used: Not a directory" in err
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root writes anywhere: the refusal a read-only folder gives, as the kernel words it
            def refuse(self: OutputLock) -> None:
                raise PermissionError(13, "Permission denied", str(self.path))

            monkeypatch.setattr(OutputLock, "acquire", refuse)
        err = _one_line_error(capsys, _args(read_only))
        assert f"output_dir {read_only} cannot be used: Permission denied ({read_only / '.lock'})" in err
    finally:
        read_only.chmod(0o755)


@pytest.mark.parametrize("kind", ["corrupt", "truncated_jpeg", "text_as_png"])
def test_a_bad_image_is_named_by_path_before_training(kind: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    _tree(tmp_path, suffix="jpg" if kind == "truncated_jpeg" else "png")
    if kind == "corrupt":
        bad = tmp_path / "train" / "class1" / "1.png"
        data = bytearray(bad.read_bytes())
        data[20:40] = b"\x00" * 20  # a broken header
        bad.write_bytes(bytes(data))
    elif kind == "truncated_jpeg":
        bad = tmp_path / "train" / "class1" / "1.jpg"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:-200])
    else:
        bad = tmp_path / "train" / "class1" / "1.png"
        bad.write_text("1,2,3\n4,5,6\n")
    # The datamodule names it when the counts are first read (nothing built, nothing trained) ...
    dm = LongTailImageFolder(str(tmp_path), imbalance_ratio=2)
    with pytest.raises(RuntimeError, match=rf"1 of the \d+ training images cannot be opened: {re.escape(str(bad))} "):
        _ = dm.class_counts
    # ... and the command says so in one line, before it writes anything.
    out = tmp_path / "run"
    err = _one_line_error(capsys, _image_folder_args(tmp_path, out))
    assert str(bad) in err and not out.exists()


class _PoisonedDigits(LongTailDigits):
    """Digits-LT with NaN in every image of class 0 (so in its upper part too)."""

    def _load_pool(self):
        pool = super()._load_pool()
        labels = torch.as_tensor(np.asarray(self._targets))
        self._images = torch.as_tensor(self._images).clone()
        self._images[labels == 0] = float("nan")
        return pool


def test_non_finite_upper_data_is_named_before_the_search(tmp_path: Path) -> None:
    dm = _PoisonedDigits(imbalance_ratio=10, batch_size=32)
    model = ImbalancedClassifier("digits_net", dm.num_classes, dm.class_counts)
    with pytest.raises(PipelineSetupError, match=r"The upper data of _PoisonedDigits \(the held-out part the search "
                                                 r"tunes the loss on\) holds non-finite values: sample \d+ of \d+ "
                                                 r"\(label 0\) holds nan"):
        run_pipeline(model, dm, {"max_epochs": 1}, tmp_path / "run", baselines=[])
    assert not (tmp_path / "run").exists()


def test_class_counts_in_another_order_than_the_datas_are_warned_about(tmp_path: Path) -> None:
    dm = LongTailDigits(imbalance_ratio=10)
    model = ImbalancedClassifier("digits_net", dm.num_classes, list(reversed(dm.class_counts)))
    out = tmp_path / "run"
    warned = pytest.warns(UserWarning, match=r"the model template's class_counts \[.*\] differ from those of "
                                             r"LongTailDigits's own labels .*the same numbers in another order: "
                                             r"check the order of classes")
    refused = pytest.raises(PipelineSetupError, match="in use by another run")  # it stops there: nothing trained
    with OutputLock(out), warned, refused:
        run_pipeline(model, dm, {"max_epochs": 1}, out, search=False, baselines=["la"])


# =========================================================================== issue 26: no preflight message
def test_no_preflight_message(tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        _run(tmp_path / "run", "--trainer.max_epochs", "1")
    shown = caplog.text + " ".join(capsys.readouterr())
    assert "fast_dev_run" not in shown


def test_the_search_fingerprint_tells_upper_objectives_apart() -> None:
    """An objective is a settings object (no hparams, not a dataclass): its name and arguments are recorded."""
    from lightning_autobalance import AutoBalanceCallback
    from lightning_autobalance.runner.fingerprint import callback_settings, changes

    balanced = callback_settings(AutoBalanceCallback(objective="balanced_ce"))
    assert changes(balanced, callback_settings(AutoBalanceCallback(objective="balanced_ce"))) == []
    diff = changes(balanced, callback_settings(AutoBalanceCallback(objective="worst_class")))
    assert any(d.startswith("settings.objective.attributes.name: 'balanced_ce' -> 'worst_class'") for d in diff), diff
