"""The two real-project shapes of docs/recipes.md, run on tiny data on the CPU: the Lightning-Hydra-template-shaped
example (configs + module + datamodule, then eval.py on a fresh module) and the tutorial-shaped one with its SWA
subclass. Each needs at most five marked changed lines besides the import, and no class counts."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import load_script

from lightning_autobalance import AutoBalanceCallback

ROOT = Path(__file__).resolve().parents[1]
HYDRA = ROOT / "examples" / "hydra_template"
RECIPES = ROOT / "docs" / "recipes.md"
MARK = re.compile(r"#\s*autobalance:\s*([+~]1)")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*using the validation dataloader as upper data.*"),
    pytest.mark.filterwarnings("ignore:.*upper data.*validation.*"),
]


def _marked(paths: list[Path]) -> list[str]:
    return [line.strip() for p in paths for line in p.read_text().splitlines() if MARK.search(line)]


# ------------------------------------------------------------------------------------ Hydra, without Hydra
def _locate(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def instantiate(node: Any, **kwargs: Any) -> Any:
    """The part of ``hydra.utils.instantiate`` the example's configs use: ``_target_``, ``_partial_``, nesting."""
    if isinstance(node, dict) and "_target_" in node:
        args = {k: instantiate(v) for k, v in node.items() if k not in ("_target_", "_partial_")}
        args.update(kwargs)
        target = _locate(node["_target_"])
        return functools.partial(target, **args) if node.get("_partial_") else target(**args)
    if isinstance(node, dict):
        return {k: instantiate(v) for k, v in node.items()}
    if isinstance(node, list):
        return [instantiate(v) for v in node]
    return node


def compose(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The config ``name`` with its defaults list resolved (one file per group) and dotted overrides applied."""
    configs = HYDRA / "configs"
    cfg = yaml.safe_load((configs / f"{name}.yaml").read_text())
    for entry in cfg.pop("defaults"):
        if isinstance(entry, dict):
            ((group, option),) = entry.items()
            cfg[group] = yaml.safe_load((configs / group / f"{option}.yaml").read_text())
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[last] = value
    return cfg


@pytest.fixture
def hydra_example(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(HYDRA))
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        monkeypatch.delitem(sys.modules, name)
    yield importlib.import_module("src.train"), importlib.import_module("src.eval")
    for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        sys.modules.pop(name, None)


def _tiny(tmp_path: Path) -> dict[str, Any]:
    return {"trainer.max_epochs": 2, "trainer.default_root_dir": str(tmp_path), "trainer.enable_progress_bar": False,
            "trainer.enable_model_summary": False}


def test_hydra_template_example_trains_then_eval_py_tests_the_checkpoint(tmp_path, hydra_example):
    train, evaluate = hydra_example
    marked = _marked([*HYDRA.rglob("*.py"), *HYDRA.rglob("*.yaml")])
    assert len(marked) <= 6 and len([m for m in marked if "import" not in m]) == 4, marked
    cfg = compose("train", _tiny(tmp_path))
    metrics, trainer = train.train(cfg, instantiate)
    assert not [c for c in trainer.callbacks if isinstance(c, AutoBalanceCallback)]  # find_loss searched on a copy
    model = trainer.lightning_module
    assert model.loss_frozen and model.autobalance_loss_calls == trainer.global_step
    assert model.autobalance_parameters().decision["decision"] in ("found loss kept", "start put back")
    assert sum(model.autobalance.class_counts[0].tolist()) == len(trainer.datamodule.data_train)
    # every checkpoint of the fit holds the decided loss and its decision (one truth about the loss)
    for path in Path(trainer.checkpoint_callback.dirpath).glob("*.ckpt"):
        saved = torch.load(path, weights_only=False)["state_dict"]
        loss = {k: v for k, v in model.state_dict().items() if k.startswith("autobalance.") and torch.is_tensor(v)}
        assert loss and all(torch.equal(saved[k].cpu(), v.cpu()) for k, v in loss.items())
        assert saved["autobalance._extra_state"]["decision"] == model.autobalance_parameters().decision
    assert 0.0 <= float(metrics["test/acc"]) <= 1.0
    # eval.py: a freshly built module and datamodule, the best checkpoint
    best = trainer.checkpoint_callback.best_model_path
    again = evaluate.evaluate(compose("eval", {**_tiny(tmp_path), "ckpt_path": best}), instantiate)
    assert float(again["test/acc"]) == pytest.approx(float(metrics["test/acc"]))


@pytest.mark.skipif(importlib.util.find_spec("hydra") is None, reason="hydra-core is not installed")
def test_hydra_template_example_with_hydra_itself(tmp_path, hydra_example):  # pragma: no cover - needs hydra
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.utils import instantiate as hydra_instantiate

    train, _ = hydra_example
    overrides = [f"{k}={v}" for k, v in _tiny(tmp_path).items()]
    with initialize_config_dir(config_dir=str(HYDRA / "configs"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides)
    metrics, _ = train.train(cfg, hydra_instantiate)
    assert 0.0 <= float(metrics["test/acc"]) <= 1.0


# ------------------------------------------------------------------------------------ the tutorial and SWA
def test_tutorial_shaped_example_with_an_swa_subclass(tmp_path):
    path = ROOT / "examples" / "tutorial_swa.py"
    marked = _marked([path])
    assert len([m for m in marked if "import" not in m]) <= 5 and len(marked) <= 6, marked
    out = load_script(path, "tutorial_swa").main(["--epochs", "2", "--swa-epochs", "1", "--root", str(tmp_path)])
    model, swa = out["model"], out["swa_model"]
    assert out["found"].hyper_steps > 0 and model.loss_frozen  # the search ran on a copy; the model kept is fitted
    assert out["found"].decision == model.autobalance_parameters().decision is not None
    found = model.autobalance_tables()
    for a, b in zip(swa.autobalance_tables(), found):  # the SWA phase trained on the loss found
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert swa.autobalance_loss_calls == out["swa_trainer"].global_step > 0
    assert 0.0 <= float(out["swa_test"]["test_acc"]) <= 1.0


def test_the_recipes_show_the_examples_marked_lines():
    """docs/recipes.md shows each marked line of the examples as it is in the file."""
    text = RECIPES.read_text()
    for line in _marked([ROOT / "examples" / "tutorial_swa.py", *HYDRA.rglob("*.py"), *HYDRA.rglob("*.yaml")]):
        code = MARK.split(line)[0].rstrip().rstrip("#").rstrip()
        assert code in text, code
