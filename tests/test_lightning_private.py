"""Lightning's private APIs the package relies on, checked one by one so that a Lightning upgrade that moves or
reshapes one fails here, by name, rather than somewhere inside a fit. Each check names the package code that
uses it and why no public API serves. Run for ``pytorch_lightning`` and, when installed, the unified ``lightning``."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

PACKAGES = ["pytorch_lightning"]
try:
    importlib.import_module("lightning.pytorch")
    PACKAGES.append("lightning.pytorch")
except ImportError:  # the unified package is optional
    pass


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def _require(condition: bool, what: str, used_by: str) -> None:
    assert condition, (f"Lightning changed a private API: {what}. lightning_autobalance uses it in {used_by}; adapt "
                       "that code (and this test) before widening the Lightning pin in pyproject.toml.")


@pytest.mark.parametrize("package", PACKAGES)
def test_lightning_cli_private_hooks(package):
    cli = importlib.import_module(f"{package}.cli").LightningCLI
    prepare = getattr(cli, "_prepare_subcommand_parser", None)
    _require(prepare is not None and _params(prepare)[:2] == ["klass", "subcommand"],
             "LightningCLI._prepare_subcommand_parser(klass, subcommand, **kwargs)",
             "cli.py (the pipeline's keys accepted by fit/validate/test, so one config serves every subcommand)")
    add = getattr(cli, "_add_configure_optimizers_method_to_model", None)
    _require(add is not None and _params(add) == ["subcommand"],
             "LightningCLI._add_configure_optimizers_method_to_model(subcommand)",
             "cli.py (refusing --optimizer for `pipeline`, which rebuilds the model per stage)")
    parser = getattr(cli, "_parser", None)
    _require(parser is not None and _params(parser) == ["subcommand"], "LightningCLI._parser(subcommand)",
             "cli.py (saving the resolved pipeline config once the run is accepted)")


@pytest.mark.parametrize("package", PACKAGES)
def test_given_hyperparameters_context(package):
    mixin = importlib.import_module(f"{package}.core.mixins.hparams_mixin")
    context = getattr(mixin, "_given_hyperparameters_context", None)
    _require(context is not None and _params(context) == ["hparams", "instantiator"],
             "core.mixins.hparams_mixin._given_hyperparameters_context(hparams, instantiator)",
             "pipeline.py (re-creating a LightningCLI model per stage with its configuration as hyperparameters)")
    with context(hparams={"a": 1}, instantiator="x.y"):
        pass


@pytest.mark.parametrize("package", PACKAGES)
def test_validation_data_source(package):
    pl = importlib.import_module(package)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    source = getattr(trainer.fit_loop.epoch_loop.val_loop, "_data_source", None)
    _require(source is not None and callable(getattr(source, "is_defined", None))
             and callable(getattr(source, "dataloader", None)),
             "trainer.fit_loop.epoch_loop.val_loop._data_source with is_defined() and dataloader()",
             "callback.py (upper_source='val': the validation loader as the Trainer resolved it from fit(), the "
             "datamodule or the module)")


def test_update_dataloader():
    data = importlib.import_module("lightning_fabric.utilities.data")
    update = getattr(data, "_update_dataloader", None)
    _require(update is not None and _params(update)[:2] == ["dataloader", "sampler"],
             "lightning_fabric.utilities.data._update_dataloader(dataloader, sampler)",
             "batch_stream.py (re-creating a user's DataLoader around the seeded, sharded upper sampler)")
    loader = DataLoader(TensorDataset(torch.arange(6)), batch_size=4, collate_fn=lambda b: b)
    remade = update(loader, SequentialSampler(range(6)))
    assert remade.batch_size == 4 and remade.collate_fn is loader.collate_fn


def test_grad_scaler_keeps_its_scale_as_a_tensor():
    """The callback reads the float16 loss scale as ``GradScaler._scale`` (a tensor, no host read) once the scaler
    has scaled a loss; ``get_scale()`` would read it back to the host."""
    import torch

    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    scaler.scale(torch.ones(()))
    assert isinstance(scaler._scale, torch.Tensor) and float(scaler._scale) == 256.0 == scaler.get_scale()
