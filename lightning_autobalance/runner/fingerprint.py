"""Fingerprints of pipeline stages: what determines a stage's result, in a form that can be saved and compared.

A stage of :func:`~lightning_autobalance.runner.pipeline.run_pipeline` writes ``fingerprint.json`` into its folder
before it trains: the library version, the seed, the model's and the datamodule's arguments for that stage, the class
counts of the data, the trainer arguments that change training, the number of epochs, for a search the
``AutoBalanceCallback``'s settings, and for a retraining a digest of the loss file it trains with. A rerun builds the
fingerprint again and compares: equal means skip (finished) or resume (unfinished), different means the folder holds
another configuration's stage and the pipeline refuses to touch it.

Everything is reduced to JSON values by :func:`describe`: callables and classes by their import path, partials by
their function and arguments, tensors and arrays by their values (or a digest when large), other objects by their
class, so that two runs of the same configuration give equal fingerprints and no memory address gets in. Path
arguments (a data ``root``, a ``loss_file``, list files: :func:`resolve_paths`) are recorded resolved, so that one
folder named by a relative and by an absolute path gives one fingerprint.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import inspect
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["IGNORED_TRAINER_KEYS", "callback_settings", "changes", "describe", "file_digest", "resolve_paths"]

#: Trainer arguments that do not change what a stage computes (display, logging, where files go), left out.
IGNORED_TRAINER_KEYS = frozenset({"callbacks", "logger", "default_root_dir", "enable_progress_bar",
                                  "enable_model_summary", "log_every_n_steps", "enable_checkpointing", "profiler",
                                  "num_sanity_val_steps", "max_epochs"})
#: Datamodule arguments that change how fast data arrives, not which data: left out.
IGNORED_DATA_KEYS = frozenset({"num_workers", "verify_images"})
_LARGE = 4096
#: Objects described by their public attributes are followed this deep; modules, datasets and loaders (state, not
#: settings) are described by their class only.
_MAX_DEPTH = 3
_OPAQUE: tuple[type, ...] = (torch.nn.Module, torch.utils.data.Dataset, torch.utils.data.DataLoader,
                             torch.utils.data.Sampler)
#: Argument names whose values are file or folder paths (also any name ending in ``_dir``, ``_file``, ``_path``,
#: ``_root`` or ``_list``): :func:`resolve_paths` records them resolved.
PATH_KEYS = frozenset({"root", "path", "dir", "file", "loss_file", "train_list", "test_list", "data_dir"})
_PATH_SUFFIXES = ("_dir", "_file", "_path", "_root", "_list")


def _is_path_key(key: Any) -> bool:
    name = str(key).lower()
    return name in PATH_KEYS or name.endswith(_PATH_SUFFIXES)


def _resolved(value: str | os.PathLike[str]) -> str:
    return str(Path(os.path.expanduser(os.fspath(value))).resolve())


def resolve_paths(value: Any, key: Any = None, base: str | os.PathLike[str] | None = None) -> Any:
    """``value`` with every path argument (a string or ``Path`` under a name of :data:`PATH_KEYS`, at any depth of
    nested mappings and lists) made absolute with symlinks resolved, so that one folder given as a relative or an
    absolute path gives one fingerprint. A path inside ``base`` (the run's output folder: its found loss) is recorded
    relative to it, as ``<output_dir>/...``, so that a folder moved or copied elsewhere resumes. A ``class_path`` is
    a module path, never a file.

    Example:
        >>> resolve_paths({"root": "data", "lr": 0.1})["root"] == str(Path("data").resolve())
        True
        >>> resolve_paths({"class_path": "torch.optim.SGD", "loss_file": "/runs/a/found_loss.yaml"}, base="/runs/a")
        {'class_path': 'torch.optim.SGD', 'loss_file': '<output_dir>/found_loss.yaml'}
    """
    if isinstance(value, Mapping):
        return {k: resolve_paths(v, k, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [resolve_paths(v, key, base) for v in value]
    if str(key).lower() == "class_path":
        return value
    if isinstance(value, Path) or (isinstance(value, str) and value and "://" not in value and _is_path_key(key)):
        path = _resolved(value)
        if base is not None and Path(path).is_relative_to(_resolved(base)):
            return str(Path("<output_dir>") / Path(path).relative_to(_resolved(base)))
        return path
    return value


def _path_of(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__qualname__
    return f"{module}.{name}"


def describe(value: Any, _depth: int = 0) -> Any:
    """``value`` as plain JSON data, the same for equal configurations.

    Example:
        >>> describe({"lr": 0.1, "opt": functools.partial(torch.optim.SGD, momentum=0.9), "_private": 1})
        {'lr': 0.1, 'opt': {'partial': 'torch.optim.sgd.SGD', 'args': [], 'keywords': {'momentum': 0.9}}}
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return describe(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): describe(v, _depth) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                if not str(k).startswith("_")}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [describe(v, _depth) for v in items]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        if array.size > _LARGE:
            return {"shape": list(array.shape), "sha256": hashlib.sha256(np.ascontiguousarray(array)).hexdigest()}
        return describe(array.tolist())
    if isinstance(value, np.generic):
        return describe(value.item())
    if isinstance(value, functools.partial):
        return {"partial": describe(value.func), "args": describe(list(value.args), _depth),
                "keywords": describe(dict(value.keywords), _depth)}
    if inspect.isclass(value) or inspect.isroutine(value):
        return _path_of(value)
    if dataclasses.is_dataclass(value):
        return {"class": _path_of(type(value)), "fields": describe(dataclasses.asdict(value), _depth)}
    hparams = getattr(value, "hparams", None)
    if isinstance(hparams, Mapping):
        return {"class": _path_of(type(value)), "hparams": describe(dict(hparams), _depth)}
    if _depth < _MAX_DEPTH and hasattr(value, "__dict__") and not isinstance(value, _OPAQUE):
        # A settings object of another kind (e.g. an upper objective: its name, its loss class, its arguments):
        # its public attributes, so that two of one class with other settings differ.
        return {"class": _path_of(type(value)),
                "attributes": {k: describe(v, _depth + 1) for k, v in sorted(vars(value).items())
                               if not k.startswith("_")}}
    return {"class": _path_of(type(value))}


def callback_settings(callback: Any) -> dict[str, Any]:
    """The constructor arguments of a callback as it holds them (attributes of the same names, public or with a
    leading underscore, as Lightning's own callbacks keep theirs; a ``hyper_optimizer``/``hyper_scheduler`` from its
    private copies), described."""
    settings: dict[str, Any] = {}
    for name in inspect.signature(type(callback).__init__).parameters:
        if name in ("self", "args", "kwargs"):
            continue
        if hasattr(callback, name):
            settings[name] = getattr(callback, name)
        elif hasattr(callback, f"_{name}_fn"):
            settings[name] = getattr(callback, f"_{name}_fn")
        elif hasattr(callback, f"_{name}"):
            settings[name] = getattr(callback, f"_{name}")
    return {"class": _path_of(type(callback)), "settings": describe(settings)}


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two described values differ, each with both values (shortened).

    Example:
        >>> changes({"model": {"lr": 0.1, "wd": 0}}, {"model": {"lr": 0.05, "wd": 0}})
        ['model.lr: 0.1 -> 0.05']
    """
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{where}: (none) -> {_short(new[key])}")
            elif key not in new:
                out.append(f"{where}: {_short(old[key])} -> (none)")
            else:
                out += changes(old[key], new[key], where)
        return out
    if old != new:
        return [f"{prefix or 'value'}: {_short(old)} -> {_short(new)}"]
    return []


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
