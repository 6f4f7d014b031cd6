"""The ``lightning-autobalance`` command: a LightningCLI with ``fit``, ``validate``, ``test``, ``predict`` and
``pipeline`` (search the loss, retrain with it, compare with baselines).

Example::

    lightning-autobalance pipeline --config examples/digits_lt.yaml
    lightning-autobalance fit --config examples/cifar10_lt.yaml --trainer.max_epochs 5
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_autobalance.classifier import ImbalancedClassifier
from lightning_autobalance.data.base import LongTailDataModule
from lightning_autobalance.pipeline import AutoBalanceTrainer

__all__ = ["AutoBalanceCLI", "main"]


class AutoBalanceCLI(LightningCLI):
    """LightningCLI for :class:`~lightning_autobalance.ImbalancedClassifier` and the long-tailed datamodules.

    The datamodule's ``num_classes`` and ``class_counts`` are linked into the model, and the ``pipeline``
    subcommand runs :meth:`~lightning_autobalance.pipeline.AutoBalanceTrainer.pipeline`.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", ImbalancedClassifier)
        kwargs.setdefault("datamodule_class", LongTailDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_class", AutoBalanceTrainer)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"} if _has_omegaconf() else {})
        super().__init__(**kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "pipeline": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_counts", "model.class_counts", apply_on="instantiate")

    def before_pipeline(self) -> None:
        """Saves the resolved configuration beside the results."""
        out = Path(self.config["pipeline"].get("output_dir", "runs/autobalance"))
        if self.trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, out / "config.yaml", overwrite=True, skip_check=True)


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-autobalance`` console script."""
    AutoBalanceCLI(args=args if args is not None else sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    main()
