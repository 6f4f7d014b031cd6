"""Test a checkpoint with a freshly built module, as the Lightning-Hydra template's ``src/eval.py`` does::

    python examples/hydra_template/src/eval.py ckpt_path=runs/hydra_template/checkpoints/last.ckpt

Nothing here knows about AutoBalance: the module's loss (and its class counts) come back from the checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.train import build


def evaluate(cfg: Mapping[str, Any], instantiate: Callable[..., Any]) -> dict[str, Any]:
    datamodule, model, trainer = build(cfg, instantiate)
    # weights_only=False: the checkpoint's hyperparameters hold the optimizer's partial (a checkpoint of one's own)
    trainer.test(model=model, datamodule=datamodule, ckpt_path=cfg["ckpt_path"], weights_only=False)
    return dict(trainer.callback_metrics)


def main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path="../configs", config_name="eval.yaml")
    def run(cfg: Any) -> None:
        evaluate(cfg, hydra.utils.instantiate)

    run()


if __name__ == "__main__":
    main()
