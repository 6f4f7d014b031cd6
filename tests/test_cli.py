"""Tests of the ``lightning-autobalance`` command (``fit``, ``validate``, ``test``, the example configs, bad input)
and of ``examples/add_to_existing_module.py``. Tiny settings: Digits-LT, 1 or 2 epochs, in-process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import load_script

from lightning_autobalance import AutoBalanceCallback, Estimator
from lightning_autobalance.core.losses import preset_tables
from lightning_autobalance.runner.cli import AutoBalanceCLI, UsageError, main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DIGITS = str(EXAMPLES / "digits_lt.yaml")
BASELINES = ("ce", "la", "cdt", "vs", "class_balanced", "ldam_drw", "focal")
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(autouse=True)
def _cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest's own arguments are not the CLI's (and LightningCLI warns when both are given)."""
    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])


def _print_config(capsys: pytest.CaptureFixture, *args: str) -> dict[str, Any]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _exit_code_and_stderr(capsys: pytest.CaptureFixture, args: list[str]) -> tuple[int | str | None, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


# ====================================================================== fit, validate, test
def test_fit_validate_test_on_digits(tmp_path: Path) -> None:
    common = ["--config", DIGITS, *QUIET, "--trainer.default_root_dir", str(tmp_path),
              "--data.init_args.search_split", "true"]
    fit = AutoBalanceCLI(args=["fit", *common, "--trainer.max_epochs", "2",
                               "--trainer.callbacks.init_args.every_n_steps", "2",
                               "--trainer.callbacks.init_args.start_step", "0",
                               # 2 epochs do not fit the data: the heads decide, so that the searched loss stays
                               "--trainer.callbacks.init_args.fit_tolerance", "null"])
    callback = next(c for c in fit.trainer.callbacks if isinstance(c, AutoBalanceCallback))
    assert callback.hyper_steps > 0
    assert fit.model.class_counts == fit.datamodule.class_counts  # linked from the datamodule (the lower split)
    start = preset_tables("la", fit.model.class_counts)
    assert not start.offset.allclose(fit.model.autobalance_tables().offset)  # the loss was searched
    fit_error = float(fit.trainer.callback_metrics["val/balanced_error"])
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    assert Path(ckpt).is_file()
    assert (Path(fit.trainer.log_dir) / "config.yaml").is_file()

    validate = AutoBalanceCLI(args=["validate", *common, "--ckpt_path", ckpt])
    val_error = float(validate.trainer.callback_metrics["val/balanced_error"])
    assert 0.0 <= val_error <= 1.0
    assert val_error == pytest.approx(fit_error)  # the checkpoint holds the final weights

    test = AutoBalanceCLI(args=["test", *common, "--ckpt_path", ckpt])
    metrics = test.trainer.callback_metrics
    assert float(metrics["test/balanced_error"]) == pytest.approx(val_error)  # validation reads the test set
    assert {"test/head_error", "test/medium_error", "test/tail_error", "test/class_error/9"} <= set(metrics)
    assert len(test.model.test_report["per_class_error"]) == 10
    # The learned loss travels in the checkpoint's state_dict.
    assert test.model.autobalance_tables().offset.allclose(fit.model.autobalance_tables().offset)


def test_plain_fit_without_config(tmp_path: Path) -> None:
    cli = AutoBalanceCLI(args=["fit", "--model.network", "digits_net", "--model.preset", "la",
                               "--data", "LongTailDigits", "--data.init_args.imbalance_ratio", "10",
                               "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
                               "--trainer.default_root_dir", str(tmp_path), *QUIET])
    assert cli.model.hparams.num_classes == 10
    assert cli.model.class_counts == cli.datamodule.class_counts
    assert 0.0 <= float(cli.trainer.callback_metrics["val/balanced_error"]) <= 1.0


# ====================================================================== the example configs
EXAMPLE_CONFIGS = {
    "digits_lt": {"data": "LongTailDigits", "network": "digits_net"},
    "digits_lt_one_phase": {"data": "LongTailDigits", "network": "digits_net"},
    "cifar10_lt": {"data": "LongTailCIFAR10", "network": "resnet32", "parametrization": "class"},
    "cifar100_lt": {"data": "LongTailCIFAR100", "network": "resnet32", "parametrization": "groups",
                    "group_size": 10},
    "imagenet_lt": {"data": "LongTailImageFolder", "network": "resnet50", "parametrization": "groups",
                    "group_size": 20},
    "cifar10_lt_jpeg": {"data": "LongTailImageFolder", "network": "resnet32"},
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_CONFIGS))
def test_example_config_parses(name: str, capsys: pytest.CaptureFixture) -> None:
    path = EXAMPLES / f"{name}.yaml"
    assert f"lightning-autobalance pipeline --config examples/{name}.yaml" in path.read_text()  # header comment
    expected = EXAMPLE_CONFIGS[name]
    config = _print_config(capsys, "pipeline", "--config", str(path))
    assert config["data"]["class_path"].endswith("." + expected["data"])
    assert config["model"]["network"] == expected["network"]
    for key in ("parametrization", "group_size"):
        if key in expected:
            assert config["model"][key] == expected[key]
    if not name.startswith("digits_lt"):  # the paper's settings
        init = config["data"]["init_args"]
        assert init["imbalance_ratio"] == 100 and init["batch_size"] == (256 if name == "imagenet_lt" else 128)
        callback = config["trainer"]["callbacks"][0]
        assert callback["class_path"] == "lightning_autobalance.AutoBalanceCallback"
    if name.startswith("cifar"):
        model = config["model"]
        optimizer, schedule = model["optimizer"], model["lr_scheduler"]
        assert optimizer["class_path"] == "torch.optim.SGD"
        sgd = {key: optimizer["init_args"][key] for key in ("lr", "momentum", "weight_decay", "nesterov")}
        assert sgd == {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}
        assert schedule["class_path"] == "lightning_autobalance.core.lr_schedule.WarmupDecayLR"
        assert schedule["init_args"] == {"schedule": "step", "warmup_epochs": 5, "milestones": [160, 180],
                                         "lr_decay": 0.1}
        assert (config["search_epochs"], config["retrain_epochs"]) == (300, 200)
        assert config["trainer"]["callbacks"][0]["init_args"]["start_epoch"] == 120
    if name in ("cifar10_lt", "cifar100_lt"):
        assert config["data"]["init_args"]["root"] == "data" and config["data"]["init_args"]["download"] is False
    if name == "imagenet_lt":
        init = config["data"]["init_args"]
        assert init["already_long_tailed"] is True and init["image_size"] == 224 and init["train_list"]
        assert config["trainer"]["max_epochs"] == 90
    # The same file serves `fit` (the pipeline's own keys are accepted there and ignored).
    fit = _print_config(capsys, "fit", "--config", str(path))
    assert fit["model"] == config["model"]


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_overlay_parses(name: str, capsys: pytest.CaptureFixture) -> None:
    path = EXAMPLES / "baselines" / f"{name}.yaml"
    text = path.read_text()
    assert f"--config examples/digits_lt.yaml --config examples/baselines/{name}.yaml" in text
    config = _print_config(capsys, "pipeline", "--config", DIGITS, "--config", str(path))
    assert config["baselines"] == [name] and config["search"] is False
    assert config["output_dir"] == f"runs/digits_lt_{name}"
    # Everything else comes from digits_lt.yaml.
    assert config["model"]["network"] == "digits_net" and config["trainer"]["max_epochs"] == 40
    assert config["data"]["class_path"] == "lightning_autobalance.data.LongTailDigits"
    assert "drw_epoch" not in config["model"] or config["model"]["drw_epoch"] is None  # deprecated, unused
    drw = (config.get("baseline_losses") or {}).get("ldam_drw", {}).get("init_args", {}).get("drw_epoch")
    assert drw == (30 if name == "ldam_drw" else None)


def test_baseline_overlay_runs(tmp_path: Path) -> None:
    out = tmp_path / "ldam"
    main(["pipeline", "--config", DIGITS, "--config", str(EXAMPLES / "baselines" / "ldam_drw.yaml"), *QUIET,
          "--trainer.max_epochs", "2", "--output_dir", str(out), "--baseline_losses",
          '{"ldam_drw": {"class_path": "lightning_autobalance.core.losses.LDAMLoss", "init_args": {"drw_epoch": 1}}}'])
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["rows"]] == ["ldam_drw"]
    assert "search" not in results and not (out / "search").exists()
    assert 0.0 <= results["rows"][0]["balanced_error"] <= 1.0


# ====================================================================== the Python example
def test_add_to_existing_module_example_runs() -> None:
    path = EXAMPLES / "add_to_existing_module.py"
    marked = [line for line in path.read_text().splitlines() if "# AutoBalance" in line]
    assert 4 <= len(marked) <= 8  # a few changed lines, each marked
    for needle in ("AutoBalanceMixin, pl.LightningModule", "self.configure_autobalance(", "self.autobalance_loss(",
                   "AutoBalanceCallback(upper_dataloader="):
        assert any(needle in line for line in marked), needle
    module = load_script(path)
    metrics = module.main(["--epochs", "2"])
    assert 0.0 <= float(metrics["test_balanced_error"]) <= 1.0


# ====================================================================== bad input
def test_unknown_key_on_the_command_line(capsys: pytest.CaptureFixture) -> None:
    code, err = _exit_code_and_stderr(capsys, ["fit", "--config", DIGITS, "--model.no_such_key", "1"])
    assert code not in (0, None)
    assert "no_such_key" in err


def test_unknown_key_in_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  no_such_key: 1\n")
    code, err = _exit_code_and_stderr(capsys, ["pipeline", "--config", DIGITS, "--config", str(bad)])
    assert code not in (0, None)
    assert "no_such_key" in err


def test_unknown_key_exit_status_of_the_console_script() -> None:
    script = Path(sys.executable).with_name("lightning-autobalance")
    if not script.is_file():
        pytest.skip("the lightning-autobalance console script is not installed beside this Python")
    proc = subprocess.run([str(script), "fit", "--config", DIGITS, "--trainer.no_such_key", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no_such_key" in proc.stderr


def test_unknown_baseline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code, err = _exit_code_and_stderr(capsys, ["pipeline", "--config", DIGITS, "--baselines", "[ce, nope]",
                                               "--output_dir", str(out)])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(re.escape("Unknown baselines ['nope']") + ".*ldam_drw", err)
    assert not any(p.is_dir() for p in out.glob("*"))  # no stage started


@pytest.mark.parametrize(("config", "message"), [
    ("cifar10_lt", r"CIFAR-10 data folder '.*missing/cifar-10-batches-py' not found: pass download=True"),
    ("cifar100_lt", r"CIFAR-100 data folder '.*missing/cifar-100-python' not found"),
    ("cifar10_lt_jpeg", r"image folder root '.*missing' does not exist"),
])
def test_missing_dataset_folder(config: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _exit_code_and_stderr(capsys, ["fit", "--config", str(EXAMPLES / f"{config}.yaml"),
                                               "--data.init_args.root", str(tmp_path / "missing"),
                                               "--trainer.accelerator", "cpu"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search("lightning-autobalance: error: FileNotFoundError: " + message, err)


def test_pipeline_refuses_the_automatic_optimizer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _exit_code_and_stderr(capsys, ["pipeline", "--config", DIGITS, "--optimizer", "Adam",
                                               "--output_dir", str(tmp_path / "run")])
    assert code == 2 and "`pipeline` does not take --optimizer" in err


@pytest.mark.parametrize(("arg", "value", "message"), [
    ("--data.init_args.imbalance_ratio", "0", "imbalance_ratio must be a finite number in [1, inf), got 0.0"),
    ("--data.init_args.batch_size", "0", "batch_size must be an integer >= 1, got 0"),
    ("--trainer.callbacks.init_args.every_n_steps", "0", "every_n_steps must be at least 1"),
    ("--trainer.callbacks.init_args.objective", "nope", "Unknown upper objective 'nope'; expected one of"),
    ("--data.init_args.fold_in_epoch", "3", "fold_in_epoch needs search_split=True"),
])
def test_a_bad_setting_is_one_line(arg: str, value: str, message: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    """The constructor's own message, alone on the error line (not jsonargparse's report of every subtype)."""
    code, err = _exit_code_and_stderr(capsys, ["pipeline", "--config", DIGITS, arg, value,
                                               "--output_dir", str(tmp_path / "run")])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lightning-autobalance: error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_debug_keeps_the_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_AUTOBALANCE_DEBUG", "1")
    with pytest.raises(Exception, match="batch_size") as info:
        main(["pipeline", "--config", DIGITS, "--data.init_args.batch_size", "0", "--output_dir", str(tmp_path)])
    assert not isinstance(info.value, UsageError)


# ====================================================================== fit with the pipeline's config
def test_fit_without_a_search_split_fails_at_once_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _exit_code_and_stderr(capsys, ["fit", "--config", DIGITS, *QUIET, "--output_dir", str(tmp_path)])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lightning-autobalance: error: `fit` with an AutoBalanceCallback needs upper data")
    assert "--data.init_args.search_split true" in lines[0] and "pipeline" in lines[0]
    assert not list(tmp_path.rglob("*.ckpt"))  # nothing was trained


def test_the_estimator_is_one_nested_group_in_yaml(tmp_path: Path) -> None:
    cli = AutoBalanceCLI(args=["fit", "--config", DIGITS, *QUIET, "--output_dir", str(tmp_path),
                               "--data.init_args.search_split", "true", "--trainer.max_epochs", "1",
                               "--trainer.callbacks.init_args.estimator.method", "cg",
                               "--trainer.callbacks.init_args.estimator.cg_iterations", "3"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, AutoBalanceCallback)]
    assert callback.estimator == Estimator(method="cg", cg_iterations=3)
    assert callback.hyper_steps > 0


def test_fit_logs_under_the_configs_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cli = AutoBalanceCLI(args=["fit", "--config", DIGITS, *QUIET, "--output_dir", str(out),
                               "--data.init_args.search_split", "true", "--trainer.max_epochs", "1"])
    assert Path(cli.trainer.log_dir).resolve().is_relative_to((out / "fit").resolve())
    assert list((out / "fit").rglob("*.ckpt"))


def test_tutorial_module_twin_takes_at_most_ten_changed_lines(tmp_path: Path) -> None:
    """A tutorial-style module (log_softmax forward, nll_loss, SGD + OneCycleLR, random split) with AutoBalance
    added in at most ten marked lines: hyper steps happen, the loss moves, stays out of the optimizer and comes back
    from the checkpoint."""
    path = EXAMPLES / "tutorial_module.py"
    marked = [line for line in path.read_text().splitlines() if "  # AutoBalance" in line]  # code comments only
    assert 6 <= len(marked) <= 10
    assert any("search_split(" in line for line in marked)  # the data split is among them
    module = load_script(path)
    model, trainer, metrics = module.main(["--epochs", "3", "--root", str(tmp_path)])
    callback = next(c for c in trainer.callbacks if isinstance(c, AutoBalanceCallback))
    assert callback.hyper_steps > 0
    alpha = {k: v.detach().clone() for k, v in model.autobalance.alpha().items()}
    decision = model.autobalance_parameters().decision  # the held-back check ruled on the loss the search found
    assert decision["decision"] in ("found loss kept", "start put back")
    moved = any(float(v.abs().max()) > 0 for v in alpha.values())  # from the preset start (all zero)
    assert moved == (decision["decision"] == "found loss kept")
    in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert in_optimizer.isdisjoint(id(t) for t in model.autobalance.alpha().values())
    restored = module.LitDigits.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    # a checkpoint says which loss it holds: one written during the search is marked pending; one written after the
    # check holds the decided loss
    saved = restored.autobalance_parameters().decision
    assert saved["decision"] in ("pending", decision["decision"])
    if saved["decision"] != "pending":
        for name, value in alpha.items():
            torch.testing.assert_close(restored.autobalance.alpha()[name], value, rtol=0, atol=0)
    assert 0.0 <= float(metrics["test_balanced_error"]) <= 1.0


@pytest.mark.parametrize(("extra", "expected"), [
    (["--config", "/no/such/file.yaml"], "File does not exist"),
    (["--search_epochs", "2.5"], 'Parser key "search_epochs": Expected a <class \'int\'>; Given value: 2.5'),
    (["--trainer.no_such_key", "3"], "unrecognized arguments: --trainer.no_such_key 3"),
    # a class's own argument: named down to it (it used to be 'Parser key "data": Problem with given class_path ...:;
    # Given value: NestedArg(...)', with neither the argument's type nor a key the command line takes)
    (["--data.init_args.batch_size", "abc"],
     'Parser key "data.init_args.batch_size": Expected a <class \'int\'>; Given value: abc'),
    (["--model.optimizer.init_args.lr", "fast"],
     'Parser key "model.optimizer.init_args.lr": Expected a <class \'float\'>; Given value: fast'),
    (["--trainer.callbacks.init_args.seed", "x"],
     'Parser key "trainer.callbacks.init_args.seed": Expected a <class \'int\'>; Given value: x'),
    (["--data.init_args.no_such", "1"],
     'Parser key "data.init_args.no_such": lightning_autobalance.data.LongTailDigits takes no argument \'no_such\''),
])
def test_a_parse_error_is_one_line(extra, expected, capsys, monkeypatch):
    """A missing config file, a value of the wrong type and an unknown key: one line naming what is wrong, exit 2,
    before anything is built (they used to print 80 to 100 lines of usage)."""
    from lightning_autobalance.runner.cli import main

    monkeypatch.setattr("sys.argv", ["lightning-autobalance"])
    config = str(Path(__file__).resolve().parents[1] / "examples" / "digits_lt.yaml")
    args = ["pipeline", *([] if extra[0] == "--config" else ["--config", config]), *extra]
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and expected in err, err

