"""Every command and Python snippet of the README runs as written, at tiny size and offline.

The commands are read from the README itself: every line of its ``bash`` blocks (``&&`` chains split) and its
inline commands (`` `python benchmarks/...` ``). Each one runs with its own arguments, followed by arguments that
make it tiny (one epoch, two batches, one seed, outputs in a temporary folder, a hand-made copy of the data a
config needs); the install, test-suite and GPU commands are those CI and the GPU check run. A README command that
this file does not know how to run fails ``test_every_readme_command_is_known``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_script
from PIL import Image
from test_data_modules import _fake_cifar10

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: What CI (``.ci/run``) and the GPU check run themselves: not rerun from inside the suite.
NOT_HERE = {
    "python3 -m venv .venv": "CI creates the environment (.ci/run)",
    '.venv/bin/pip install -e ".[dev]"': "CI installs the package (.ci/run)",
    ".venv/bin/python -m pytest -q": "this is the test command itself",
    "bash .ci/run": "CI itself",
}


def readme_commands() -> list[str]:
    text = README.read_text()
    commands: list[str] = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang != "bash":
            continue
        for line in body.splitlines():
            line = re.split(r"\s{2,}#", line)[0].strip()  # a trailing comment
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split("&&")]
    commands += re.findall(r"`((?:python benchmarks/|bash )[^`]+)`", text)
    return list(dict.fromkeys(commands))


def readme_python() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _kind(command: str) -> str:
    if command in NOT_HERE:
        return "not_here"
    words = shlex.split(command)
    if words[0].endswith("lightning-autobalance"):
        return "cli"
    if words[:2] == ["bash", "benchmarks/gpu_check.sh"]:
        return "gpu"
    if words[0].endswith("ruff"):
        return "ruff"
    if words[0] == "python" and len(words) > 1 and words[1].startswith("benchmarks/"):
        return Path(words[1]).stem
    return "unknown"


def test_every_readme_command_is_known() -> None:
    commands = readme_commands()
    assert any("pipeline --config examples/digits_lt.yaml" in c for c in commands)  # the reader found the blocks
    unknown = [c for c in commands if _kind(c) == "unknown"]
    assert not unknown, f"README commands this test cannot run: {unknown}"


def test_the_readme_is_short_and_every_table_row_has_its_command() -> None:
    """The README is for users (about 150 lines; the lab notebook is docs/results.md), and each row of its results
    table names the command that produced it (``# row N`` after the command), so rows can be added one at a time."""
    text = README.read_text()
    assert len(text.splitlines()) <= 155
    rows = re.findall(r"^\| (\d+[a-z]?) \|", text, re.M)
    assert len(rows) >= 2  # only benchmarks trained with augmentation; the ablations are in docs/results.md
    commands = "\n".join(readme_commands())
    missing = [row for row in rows if not re.search(rf"# row {row}\b", text)]
    assert not missing, f"table rows without a command: {missing}"
    assert "quality.py" in commands and "docs/recipes.md" in text


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the benchmark commands of this module write (shared: the evidence command reads a quality run)."""
    return tmp_path_factory.mktemp("readme-bench")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Hand-made stand-ins for the data the configs name: a CIFAR-10 release and a CIFAR-10 JPEG folder."""
    root = tmp_path_factory.mktemp("readme-data")
    _fake_cifar10(root / "cifar", per_class=20, test_per_class=3)
    jpeg = root / "jpeg"
    for split, n in (("train", 20), ("test", 3)):
        for c in range(10):
            folder = jpeg / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (32, 32), (25 * c, 10 * i, 0)).save(folder / f"{i:04d}.png")
    return {"cifar": root / "cifar", "jpeg": jpeg}


def _load(script: str) -> Any:
    return load_script(ROOT / script, f"readme_{Path(script).stem}")


def _tiny_cli(words: list[str], out: Path, data: dict[str, Path]) -> list[str]:
    if "--help" in words:
        return []
    extra = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_test_batches", "2",
             "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--search_epochs", "1",
             "--retrain_epochs", "1", "--output_dir", str(out)]
    config = " ".join(words)
    if "cifar10_lt.yaml" in config:
        extra += ["--data.init_args.root", str(data["cifar"]), "--data.init_args.check_integrity", "false",
                  "--data.init_args.imbalance_ratio", "10", "--data.init_args.batch_size", "16",
                  "--data.init_args.num_workers", "0", "--model.lr_scheduler.init_args.warmup_epochs", "0"]
    if "one_phase" in config and "fit" in words:
        extra += ["--trainer.max_epochs", "2", "--data.init_args.fold_in_epoch", "1"]
    if "--one_phase" in words:
        extra += ["--retrain_epochs", "2"]
    return extra


def _tiny_quality(words: list[str], tmp: Path, data: dict[str, Path]) -> list[str]:
    extra = ["--seeds", "0", "--runs-dir", str(tmp / "runs" / "quality"), "--docs-dir", str(tmp / "docs"),
             "--set=--search_epochs=1", "--set=--retrain_epochs=1", "--set=--trainer.max_epochs=1",
             "--set=--trainer.limit_train_batches=2", "--set=--trainer.limit_test_batches=2",
             "--la-taus", "1.0", "--vs-gammas", "0.15", "--vs-taus", "1.0"]
    if "one_phase" in words:  # a one-phase run needs an epoch to search and one after the fold-in
        extra.append("--set=--retrain_epochs=2")
    if any("cifar10_lt_jpeg" in w or "terminal_phase" in w for w in words):
        extra += [f"--set=--data.init_args.root={data['jpeg']}", "--set=--data.init_args.batch_size=16",
                  "--set=--data.init_args.imbalance_ratio=10"]
    if any("terminal_phase" in w for w in words):  # its profile asks for 2000 images of the largest class
        extra.append("--set=--data.init_args.n_max=20")
    return extra


def _cli_main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_autobalance.runner.cli import main

    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])
    if "--help" in argv:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code in (0, None)
    else:
        main(argv)


# ------------------------------------------------------------------------------------------- the commands
@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs(command: str, tmp_path: Path, bench: Path, data: dict[str, Path],
                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    kind = _kind(command)
    words = shlex.split(command)
    monkeypatch.chdir(ROOT)  # the commands are written for the repository root
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if kind == "not_here":
            pytest.skip(NOT_HERE[command])
        elif kind == "gpu":
            if not torch.cuda.is_available():
                pytest.skip("needs a CUDA device (run on a GPU machine)")
            subprocess.run(words, cwd=ROOT, check=True)
        elif kind == "ruff":  # the environment's own ruff (the README names .venv's)
            ruff = Path(sys.executable).parent / "ruff"
            if not ruff.is_file():
                pytest.skip("ruff is not installed in this environment")
            subprocess.run([str(ruff), *words[1:]], cwd=ROOT, check=True)
        elif kind == "cli":
            _cli_main([*words[1:], *_tiny_cli(words, tmp_path / "out", data)], monkeypatch)
        elif kind == "quality":
            name = words[words.index("--name") + 1]
            _load("benchmarks/quality.py").main([*words[2:], *_tiny_quality(words, bench, data)])
            seed = bench / "runs" / "quality" / name / "seed_0"
            methods = words[words.index("--methods") + 1:] if "--methods" in words else ["autobalance"]
            methods = [m for m in methods[: next((i for i, w in enumerate(methods) if w.startswith("-")),
                                                 len(methods))]]
            missing = [m for m in methods if not (seed / m / "result.json").is_file()]
            assert not missing, f"methods that did not finish: {missing}"
        elif kind == "evidence":
            # It reads a finished benchmark: make the one it names, tiny, then run it as written there.
            name = Path(words[-1]).name
            if not (bench / "runs" / "quality" / name).is_dir():
                quality = shlex.split(next(c for c in readme_commands()
                                            if "quality.py" in c and re.search(rf"--name {re.escape(name)}(\s|$)", c)))
                _load("benchmarks/quality.py").main([*quality[2:], *_tiny_quality(quality, bench, data)])
            monkeypatch.chdir(bench)
            monkeypatch.setattr("sys.argv", words[1:])
            _load(str(ROOT / "benchmarks" / "evidence.py")).main()
            assert re.search(r"\*\*(met|missed)\*\*", capsys.readouterr().out)  # a table and its verdicts
        elif kind == "groups":
            argv = [*words[2:], "--seeds", "0", "--out", str(tmp_path / "groups"), "--", "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "2", "--trainer.limit_test_batches", "2"]
            monkeypatch.setattr("sys.argv", ["groups.py", *argv])
            _load("benchmarks/groups.py").main()
        elif kind == "paper_protocol":  # a GPU command: here one row, on the CPU, at 1% of the protocol's epochs
            out = tmp_path / "paper"
            argv = [*words[2:], "--data", str(data["jpeg"]), "--out", str(out), "--accelerator", "cpu",
                    "--scale", "0.01", "--rows", "la", "--threads", "1", "--set=--data.init_args.imbalance_ratio=10",
                    "--set=--data.init_args.batch_size=16"]
            assert _load("benchmarks/paper_protocol.py").main(argv) == 0
            assert "| la |" in (out / "paper_protocol.md").read_text()
        elif kind == "speed":
            argv = [*words[2:], "--quick", "--batch-size", "4", "--repeats", "1", "--epoch-repeats", "1",
                    "--epoch-steps", "2", "--schedules", "3", "--out", str(tmp_path / "speed.md")]
            monkeypatch.setattr("sys.argv", ["speed.py", *argv])
            _load("benchmarks/speed.py").main()
            assert (tmp_path / "speed.md").read_text().strip()
        else:  # pragma: no cover - caught by test_every_readme_command_is_known
            pytest.fail(f"unknown README command: {command}")
    finally:
        torch.set_num_threads(threads)


def test_readme_python_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "your own LightningModule" snippet (find_loss, then the user's fit), with a dataset and a network of one's
    own (the two names it leaves to the reader): digits, and a small MLP."""
    (snippet,) = readme_python()
    from lightning_autobalance.data import LongTailDigits

    dm = LongTailDigits(imbalance_ratio=10)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scope: dict[str, Any] = {
            "train_dataset": dm.train_dataset,
            "net": torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 10)),
        }
        exec(compile(snippet, str(README), "exec"), scope)
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "find_loss" / "found_loss.yaml").is_file()
    assert scope["found"].hyper_steps > 0 and scope["model"].loss_frozen
    assert scope["found"].decision == scope["model"].autobalance_parameters().decision is not None
