"""The ``lightning-autobalance`` command: a LightningCLI with ``fit``, ``validate``, ``test``, ``predict`` and
``pipeline`` (search the loss, retrain with it, compare with baselines).

Example::

    lightning-autobalance pipeline --config examples/digits_lt.yaml
    lightning-autobalance fit --config examples/cifar10_lt.yaml --data.init_args.search_split true

One config file serves every subcommand: ``fit``, ``validate`` and ``test`` accept the pipeline's own keys
(``output_dir``, ``baselines``, ...); ``fit`` logs under ``<output_dir>/fit`` and the others ignore them. ``fit``
with an ``AutoBalanceCallback`` needs a datamodule with ``search_split: true`` (or the callback's own upper data)
and says so in one line before any training.

A bad setting (an out-of-range value, an unknown objective, a missing data folder, a setting a stage's fit would
refuse) is reported in one line, the library's own message, with exit status 2; a full disk in one line naming the
folder, with exit status 1 (the same command resumes the pipeline once there is room). Set
``LIGHTNING_AUTOBALANCE_DEBUG=1`` for the full traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_autobalance.data.base import LongTailDataModule
from lightning_autobalance.lightning.callback import AutoBalanceCallback
from lightning_autobalance.lightning.classifier import ImbalancedClassifier
from lightning_autobalance.runner.pipeline import AutoBalanceTrainer, PipelineDiskFull, PipelineSetupError, no_space

__all__ = ["AutoBalanceCLI", "UsageError", "main"]


class AutoBalanceCLI(LightningCLI):
    """LightningCLI for :class:`~lightning_autobalance.ImbalancedClassifier` and the long-tailed datamodules.

    The datamodule's ``num_classes`` and ``class_counts`` (and, for a group datamodule, ``num_groups`` and
    ``group_counts``) are linked into the model, and the ``pipeline``
    subcommand runs :meth:`~lightning_autobalance.runner.pipeline.AutoBalanceTrainer.pipeline`.
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

    # Private LightningCLI hook (no public one builds a subcommand's parser); tests/test_lightning_private.py fails
    # loudly if an upgrade moves it.
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.exit_on_error = False  # a parse error reaches main(), which says it in one line
        if subcommand != "pipeline" and callable(getattr(klass, "pipeline", None)):
            # Accept (and ignore) the pipeline's own keys (output_dir, baselines, ...) in the other subcommands, so
            # that one config file serves `pipeline`, `fit`, `validate` and `test`. They are not recorded as this
            # subcommand's method arguments, so they are not passed to `trainer.fit` and the like.
            parser.add_method_arguments(klass, "pipeline", skip=set(self.subcommands()["pipeline"]))
        return parser

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False  # a parse error reaches main(), which says it in one line
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_counts", "model.class_counts", apply_on="instantiate")
        # Group datamodules (ColoredDigits) also have num_groups and group_counts; for the others these links are
        # skipped (jsonargparse ignores a link whose source attribute the datamodule lacks).
        parser.link_arguments("data.num_groups", "model.num_groups", apply_on="instantiate")
        parser.link_arguments("data.group_counts", "model.group_counts", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        """Builds the model, datamodule, callbacks and trainer; a constructor's own error becomes a one-line
        :class:`UsageError` (the root cause, not jsonargparse's report of every type it tried)."""
        try:
            super().instantiate_classes()
        except UsageError:
            raise
        except Exception as err:
            if os.environ.get("LIGHTNING_AUTOBALANCE_DEBUG"):
                raise
            raise UsageError(_root_message(err)) from err

    # Private LightningCLI hook, the only place that sees --optimizer before it is patched onto the model; guarded
    # by tests/test_lightning_private.py.
    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        if subcommand == "pipeline":
            given = [key for key in ("optimizer", "lr_scheduler") if self.config["pipeline"].get(key) is not None]
            if given:
                # The pipeline re-creates the model for every stage from its hyperparameters, so an optimizer
                # patched onto this instance would be silently dropped.
                raise ValueError(f"`pipeline` does not take {' or '.join('--' + k for k in given)}: it builds a "
                                 "new model for every stage from the `model` arguments. Set them there: "
                                 "model.optimizer and model.lr_scheduler, each a class_path (such as "
                                 "torch.optim.AdamW, lightning_autobalance.core.lr_schedule.WarmupDecayLR) with "
                                 "init_args.")
            return
        super()._add_configure_optimizers_method_to_model(subcommand)

    def before_instantiate_classes(self) -> None:
        """``fit`` writes its logs and checkpoints under the config's ``output_dir`` unless the trainer names a
        ``default_root_dir`` of its own."""
        if self.subcommand != "fit":
            return
        config = self.config["fit"]
        trainer = config.get("trainer")
        if trainer is not None and trainer.get("default_root_dir") is None and config.get("output_dir"):
            trainer["default_root_dir"] = str(Path(config["output_dir"]) / "fit")

    def before_fit(self) -> None:
        """Fails at once, in one line, when an AutoBalanceCallback would find no upper data."""
        datamodule = self.datamodule
        if not isinstance(datamodule, LongTailDataModule) or datamodule.search_split:
            return
        for callback in self.trainer.callbacks:
            if (isinstance(callback, AutoBalanceCallback) and callback.upper_dataloader is None
                    and callback.upper_source in ("auto", "datamodule")):
                raise UsageError(f"`fit` with an AutoBalanceCallback needs upper data, but {type(datamodule).__name__} "
                                 "has no search split: add `--data.init_args.search_split true` (fit then trains on "
                                 "80% of the training set and tunes the loss on the rest), or run `pipeline`.")

    def before_pipeline(self) -> None:
        """Has the pipeline save the resolved configuration beside the results (in a form that ``pipeline --config``
        reads back) once it has accepted the run: a run refused for its output folder leaves the folder as it was."""

        def write(path: Path) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # LightningCLI's private _parser(subcommand): its SaveConfigCallback has no hook for a run that is
            # accepted later; guarded by tests/test_lightning_private.py.
            self._parser("pipeline").save(self.config["pipeline"], path, overwrite=True, skip_none=False,
                                          skip_check=True)

        self.trainer.config_writer = write


def _root_message(err: BaseException) -> str:
    """The message of the innermost exception of a chain (the constructor's own ``ValueError``), on one line.

    The chain is followed as Python prints it: through ``raise ... from err`` (``__cause__``) and an exception raised
    while handling another (``__context__``), but not past ``raise ... from None`` (``__suppress_context__``), where
    the library put its own message over an internal one (e.g. ``int('1.5')``'s ``invalid literal``).
    """
    seen = {id(err)}
    root = err
    while True:
        nxt = root.__cause__ or (None if root.__suppress_context__ else root.__context__)
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        root = nxt
    text = " ".join(str(root).split()) or type(root).__name__
    return text if isinstance(root, (ValueError, TypeError)) else f"{type(root).__name__}: {text}"


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401
    except ImportError:
        return False
    return True


class UsageError(ValueError):
    """A mistake in how the command was called; ``main`` prints it in one line and exits with status 2."""


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-autobalance`` console script."""
    debug = bool(os.environ.get("LIGHTNING_AUTOBALANCE_DEBUG"))
    try:
        AutoBalanceCLI(args=args)
    except (UsageError, PipelineSetupError) as err:
        if debug and err.__cause__ is not None:  # refused inside a fit (the preflight): where it was raised
            raise
        print(f"lightning-autobalance: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    except argparse.ArgumentError as err:  # the parser's: an unknown key, a value of the wrong type, a missing file
        if debug:
            raise
        print(f"lightning-autobalance: error: {_parse_message(str(err))} (lightning-autobalance <subcommand> --help "
              "lists the options)", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:  # a write that found no room, in the pipeline or in fit/test's own logs and checkpoints
        full = err if isinstance(err, PipelineDiskFull) else no_space(err)
        if full is None or debug:
            raise
        if isinstance(full, PipelineDiskFull):  # names the output folder and how the run resumes
            message = str(full)
        else:
            where = full.filename2 or full.filename  # a copy's (shutil.move across disks) is its target
            place = f" of {Path(os.fspath(where)).parent} (writing {where})" if where else ""
            message = f"No space left on the disk{place}: free space there and run the command again."
        print(f"lightning-autobalance: error: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(1) from None


_KEY = re.compile(r'Parser key "([^"]+)":')
_TYPE = re.compile(r"Expected an? <class '[^']+'>")
_UNKNOWN = re.compile(r"Option '([^']+)' is not accepted")
_CLASS = re.compile(r"class_path '([^']+)'")
_NESTED = re.compile(r"NestedArg\(key='[^']*', val=(.*)\)")


def _parse_message(message: str) -> str:
    """jsonargparse's report on one line: the key (down to a class's own argument, ``data.init_args.batch_size``,
    where the report nests it under the class_path it tried), the type expected and the value given.

    Example:
        >>> print(_parse_message('''Parser key "data":
        ...   Errors:
        ...     - Problem with given class_path 'lightning_autobalance.data.LongTailDigits':
        ...         Parser key "batch_size":
        ...           Expected a <class 'int'>. Got value: abc
        ...     - Expected a <class 'NoneType'>
        ...   Given value: NestedArg(key='batch_size', val='abc')'''))
        Parser key "data.init_args.batch_size": Expected a <class 'int'>; Given value: abc
    """
    raw = [line for line in message.strip().splitlines() if line.strip()]
    lines = [line.strip() for line in raw]
    head = lines[0] if lines else "invalid arguments"
    first = _KEY.match(head)
    bullet = next((i for i, line in enumerate(lines) if line.startswith("- ")), None)
    if first is None or bullet is None:  # unrecognized arguments, a missing file: jsonargparse's own line
        return " ".join(" ".join(lines[:2]).split())
    # the first error listed (up to the next one at its depth), down to the innermost key it names
    depth = len(raw[bullet]) - len(raw[bullet].lstrip())
    stop = next((i for i in range(bullet + 1, len(raw)) if raw[i].startswith(" " * depth + "- ")), len(raw))
    block = lines[bullet:stop]
    keys = [first.group(1)]
    after = 0
    for i, line in enumerate(block):
        for inner in _KEY.findall(line):
            keys.append(inner)
            after = i
    rest = block[after:]
    unknown = next((m.group(1) for line in rest for m in [_UNKNOWN.search(line)] if m), None)
    owner = _CLASS.search(block[0])
    if unknown is not None:  # an argument the class does not take
        where = owner.group(1) if owner else "the class given"
        return f'Parser key "{".init_args.".join([*keys, unknown])}": {where} takes no argument {unknown!r}'
    reason = next((m.group(0) for line in rest for m in [_TYPE.search(line)] if m), None) or block[0][2:].split(
        ". Got value:")[0]
    given = next((line.split("Given value:", 1)[1] for line in rest if "Given value:" in line), None) or next(
        (line.split("Got value:", 1)[1] for line in rest if "Got value:" in line), None) or next(
        (line.split("Given value:", 1)[1] for line in lines[stop:] if line.startswith("Given value:")), "")
    given = given.split(". Got value:")[0].strip()
    nested = _NESTED.fullmatch(given)
    given = nested.group(1).strip("'") if nested else given
    key = ".init_args.".join(keys)
    return " ".join(f'Parser key "{key}": {reason.rstrip(":")}{f"; Given value: {given}" if given else ""}'.split())


if __name__ == "__main__":  # pragma: no cover
    main()
