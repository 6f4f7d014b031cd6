"""Settings from a plain mapping (a YAML group, a Hydra ``DictConfig``, a jsonargparse dict), checked alike by
every value the callback takes (``Estimator``, ``Schedule``, ``HyperOptimizer``, ``UpperData``). Plain Python."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["mapping_settings"]


def mapping_settings(value: Mapping[Any, Any], known: Iterable[str], what: str) -> dict[str, Any]:
    """The settings of a mapping as a dict with string keys; raises ``ValueError`` naming unknown keys.

    Example:
        >>> mapping_settings({"lr": 0.1}, ["lr", "shrinkage"], "hyper_optimizer")
        {'lr': 0.1}
        >>> mapping_settings({"rl": 0.1}, ["lr"], "hyper_optimizer")
        Traceback (most recent call last):
        ...
        ValueError: hyper_optimizer: unknown settings ['rl']; expected some of ['lr'].
    """
    settings = {str(k): v for k, v in value.items()}
    known = sorted(known)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ValueError(f"{what}: unknown settings {unknown}; expected some of {known}.")
    return settings
