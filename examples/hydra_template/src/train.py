"""Train, then test the best checkpoint, as the Lightning-Hydra template's ``src/train.py`` does::

    python examples/hydra_template/src/train.py trainer.max_epochs=5

Hydra builds every object from ``configs/`` (``hydra-core`` must be installed). :func:`train` takes the composed
config and an ``instantiate`` function, so the same steps also run without Hydra (tests/test_examples.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from lightning_autobalance import find_loss  # autobalance: +1

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the template's rootutils: `src` importable


def build(cfg: Mapping[str, Any], instantiate: Callable[..., Any]) -> tuple[Any, Any, pl.Trainer]:
    """The datamodule, the model and the Trainer (with every callback of ``cfg.callbacks``) from a config."""
    datamodule = instantiate(cfg["data"])
    model = instantiate(cfg["model"])
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if "_target_" in c]
    trainer = instantiate(cfg["trainer"], callbacks=callbacks, logger=False)
    return datamodule, model, trainer


def train(cfg: Mapping[str, Any], instantiate: Callable[..., Any]) -> tuple[dict[str, Any], pl.Trainer]:
    """Seeds, builds, searches the loss on a copy of the model (``find_loss``: the decided loss is set on the model,
    frozen), fits the model to keep on all the training data, then tests the best checkpoint."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg["seed"], workers=True)
    datamodule, model, trainer = build(cfg, instantiate)
    if cfg.get("train"):
        search = {k: v for k, v in cfg["trainer"].items() if k != "_target_"}  # autobalance: +1
        find_loss(model, datamodule=datamodule, trainer_kwargs={**search, "logger": False})  # autobalance: +1
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = dict(trainer.callback_metrics)
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model=model, datamodule=datamodule, ckpt_path=best or None, weights_only=False)
        metrics.update(trainer.callback_metrics)
    return metrics, trainer


def main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path="../configs", config_name="train.yaml")
    def run(cfg: Any) -> float | None:
        metrics, _ = train(cfg, hydra.utils.instantiate)
        value = metrics.get("test/acc")
        return None if value is None else float(value)

    run()


if __name__ == "__main__":
    main()
