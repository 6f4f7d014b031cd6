"""Settings from a plain mapping (a YAML group, a Hydra ``DictConfig``, a jsonargparse dict), checked alike by
every value the callback takes (``Estimator``, ``Schedule``, ``HyperOptimizer``, ``UpperData``), and the one way
their checks raise (``raise_first``). Plain Python."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

__all__ = ["coerce_value", "mapping_settings", "raise_first"]

T = TypeVar("T")


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


def raise_first(checks: Iterable[tuple[bool, str]]) -> None:
    """Raises ``ValueError`` with the message of the first ``(ok, message)`` check that failed."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def coerce_value(cls: type[T], value: Any, what: str, known: Iterable[str],
                 other: tuple[str, Callable[[Any], T | None]] | None = None) -> T:
    """``cls`` from itself, ``None`` (its defaults), a mapping of its settings, or (``other``: a description and a
    converter returning ``None`` when it does not apply) another form; raises ``ValueError`` naming what was given.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return cls(**mapping_settings(value, known, what))
    converted = other[1](value) if other is not None else None
    if converted is not None:
        return converted
    also = f", {other[0]}" if other is not None else ""
    raise ValueError(f"{what} must be a lightning_autobalance.{cls.__name__}{also} or a mapping of its settings; got "
                     f"{type(value).__name__}.")
