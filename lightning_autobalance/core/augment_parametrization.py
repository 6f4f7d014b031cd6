"""How the searched augmentation's free values map to the ``(G, K)`` tables of :mod:`.augment`.

The same shapes as the loss's (:mod:`.parametrization`), one free tensor (or pair of scalars) per table of the
:class:`~lightning_autobalance.core.augment.AugmentSettings` (``shift``, ``noise``, ``p_noise``, ...), each a
deviation from the start table (:func:`~lightning_autobalance.core.augment.initial_params`; zero free values give
the start strengths):

* ``"class"``: one value per cell, ``(G, K)`` (per (group, class) cell with ``G > 1``);
* ``"groups"``: classes sorted by count share one value per bin of ``group_size`` classes
  (:func:`~lightning_autobalance.core.parametrization.frequency_bins`), ``(G, bins)``;
* ``"dataset"``: two scalars per table, a level moving every cell at once and a slope along the centred
  ``log(n / n_max)`` of the cells' counts (the tail against the head);
* ``"hierarchical"`` (the default): those two scalars plus a residual per cell, centred over the table so that the
  level stays the one shared part; the residuals are the values a search shrinks towards zero where a cell has
  little upper data (:meth:`AugmentParameters.free_value_counts`).

The free values are all in the unconstrained space of the tables (``strength = limit * sigmoid(table)``). Their
names carry the prefix ``augment_`` (``augment_shift``, ``augment_shift_level``, ``augment_shift_slope``), so that
they sit beside the loss's free values in one dictionary (one hyper optimizer, one hypergradient) without a clash.
They are buffers, saved in ``state_dict`` and never seen by a model optimizer, kept in float32 or wider.

Plain PyTorch, nothing of Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_autobalance.core.augment import AugmentSettings, Draws, draw, initial_params, strengths
from lightning_autobalance.core.coerce import coerce_value
from lightning_autobalance.core.losses import as_count_table
from lightning_autobalance.core.parametrization import apply_keeping_precision, frequency_bins

__all__ = ["AUGMENT_KINDS", "PREFIX", "STREAMS", "AugmentKind", "AugmentParameters", "coerce_settings", "stream_seed"]

AugmentKind = Literal["hierarchical", "class", "groups", "dataset"]
AUGMENT_KINDS = ("hierarchical", "class", "groups", "dataset")
#: the prefix of every free augmentation value's name
PREFIX = "augment_"
#: the draw streams: the training steps' batches, and the extra training batches of the hyper steps
STREAMS = ("train", "hyper")
_MASK = (1 << 64) - 1


def stream_seed(*values: int) -> int:
    """A seed from integers (a seed, a stream, a rank, a count), mixed as in splitmix64 so that neighbouring counts
    give unrelated generators; the same integers always give the same seed.

    Example:
        >>> stream_seed(0, 0, 0, 1) == stream_seed(0, 0, 0, 1) != stream_seed(0, 0, 0, 2)
        True
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & _MASK)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def coerce_settings(value: AugmentSettings | Mapping[str, Any] | None) -> AugmentSettings:
    """:class:`~lightning_autobalance.core.augment.AugmentSettings` from itself, ``None`` (its defaults) or a mapping
    of its fields (a YAML group), validated alike.

    Example:
        >>> coerce_settings({"ops": "shift+noise"}).names
        ('shift', 'noise')
    """
    return coerce_value(AugmentSettings, value, "augment", (f.name for f in fields(AugmentSettings)))


class AugmentParameters(nn.Module):
    """The searched augmentation's free values (buffers) and their map to the tables :func:`augment` takes.

    Args:
        class_counts: ``K`` training counts per class, or a ``G x K`` table per (group, class) cell.
        settings: the ops and their constants (:class:`~lightning_autobalance.core.augment.AugmentSettings`, or a
            mapping of its fields; default ``AugmentSettings()``: flip and shift).
        kind: ``"hierarchical"``, ``"class"``, ``"groups"`` or ``"dataset"`` (see the module text).
        group_size: classes per bin for ``kind="groups"``.
        num_groups: rows ``G`` of the tables; default from ``class_counts``.
        start: the start strengths by table name (default half of each limit; a module's searched augmentation
            passes :func:`~lightning_autobalance.core.augment.identity_start` instead), see
            :func:`~lightning_autobalance.core.augment.initial_params`.
        seed: the seed of the draws a module makes with these parameters (kept here, saved with them).

    Example:
        >>> p = AugmentParameters([500, 50, 5], {"ops": "shift+noise"}, kind="hierarchical")
        >>> sorted(p.alpha())[:3]
        ['augment_noise', 'augment_noise_level', 'augment_noise_slope']
        >>> p.tables()["shift"].shape, round(float(p.strengths()["shift"][0, 2]), 4)
        (torch.Size([1, 3]), 0.0625)
    """

    def __init__(self, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor,
                 settings: AugmentSettings | Mapping[str, Any] | None = None, kind: AugmentKind = "hierarchical",
                 group_size: int = 1, num_groups: int | None = None, start: Mapping[str, float] | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if kind not in AUGMENT_KINDS:
            raise ValueError(f"Unknown augmentation parametrization {kind!r}; expected one of {list(AUGMENT_KINDS)}.")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer; got {group_size!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer; got {seed!r}.")
        self.settings = coerce_settings(settings)
        self.kind, self.group_size, self.seed = kind, group_size, seed
        self.start = {str(k): float(v) for k, v in (start or {}).items()}
        counts = as_count_table(class_counts, num_groups=num_groups)
        self.register_buffer("class_counts", counts)
        g, k = counts.shape
        for name, table in initial_params(self.settings, k, g, self.start, torch.get_default_dtype()).items():
            self.register_buffer(f"start_{name}", table)
        bins = frequency_bins(counts.sum(dim=0), group_size if kind == "groups" else 1)
        expand = torch.zeros(k, len(bins))
        for b, members in enumerate(bins):
            expand[members, b] = 1.0
        self.register_buffer("expand", expand, persistent=False)  # (K, bins): a bin's value to its classes
        log_ratio = torch.log(counts / counts.max(dim=1, keepdim=True).values)
        self.register_buffer("direction", (log_ratio - log_ratio.mean()).to(torch.get_default_dtype()),
                             persistent=False)
        for name, shape in self._free_shapes().items():
            self.register_buffer(f"free_{name}", torch.zeros(shape))
        self.frozen = False
        #: draws made so far per stream (saved with the parameters: a resumed fit goes on with the same draws)
        self.draw_counts = dict.fromkeys(STREAMS, 0)

    # -- the shapes --------------------------------------------------------------------------------------
    def _free_shapes(self) -> dict[str, tuple[int, ...]]:
        g, bins = self.class_counts.shape[0], self.expand.shape[1]
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.settings.names:
            if self.kind in ("hierarchical", "dataset"):
                shapes[f"{name}_level"] = ()
                shapes[f"{name}_slope"] = ()
            if self.kind != "dataset":
                shapes[name] = (g, bins if self.kind == "groups" else self.num_classes)
        return shapes

    @property
    def num_classes(self) -> int:
        return self.class_counts.shape[1]

    @property
    def num_groups(self) -> int:
        return self.class_counts.shape[0]

    def alpha(self) -> dict[str, Tensor]:
        """The free values by name (``augment_<table>[_level|_slope]``): the stored buffers themselves, so that a
        hyper optimizer steps them in place."""
        return {PREFIX + name: getattr(self, f"free_{name}") for name in self._free_shapes()}

    def num_free(self) -> int:
        return sum(t.numel() for t in self.alpha().values())

    def tables(self, alpha: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The ``(G, K)`` tables of :func:`~lightning_autobalance.core.augment.augment` for the free values
        ``alpha`` (default: the stored ones), differentiable in them."""
        alpha = self.alpha() if alpha is None else alpha
        out = {}
        for name in self.settings.names:
            table = getattr(self, f"start_{name}")
            if self.kind in ("hierarchical", "dataset"):
                level, slope = alpha[f"{PREFIX}{name}_level"], alpha[f"{PREFIX}{name}_slope"]
                table = table + level + slope * self.direction.to(slope)
            if self.kind == "groups":
                table = table + alpha[PREFIX + name] @ self.expand.to(table).T
            elif self.kind != "dataset":
                r = alpha[PREFIX + name]
                table = table + (r - r.mean() if self.kind == "hierarchical" else r)
            out[name] = table
        return out

    def strengths(self) -> dict[str, Tensor]:
        """What the stored free values stand for, per cell: magnitudes in their units, probabilities (detached)."""
        with torch.no_grad():
            return strengths(self.tables(), self.settings)

    def free_value_counts(self, counts: Tensor | Sequence[Any]) -> dict[str, Tensor]:
        """How many samples of a ``(G, K)`` (or ``K``) count table inform each per-cell (or per-bin) free value, by
        name, for the search's shrinkage towards the start; the shared scalars are left out."""
        table = torch.as_tensor(counts, dtype=torch.float64).to(self.class_counts.device)
        table = table.reshape(-1, table.shape[-1]).expand(self.num_groups, -1)
        if table.shape[1] != self.num_classes:
            raise ValueError(f"counts must have K={self.num_classes} columns; got shape {tuple(table.shape)}.")
        per_column = table @ self.expand.to(table) if self.kind == "groups" else table
        return {PREFIX + name: per_column.clone() for name in self.settings.names if self.kind != "dataset"}

    def next_draws(self, shape: Sequence[int], device: torch.device | str, stream: str = "train",
                   rank: int = 0) -> Draws:
        """The next draws of ``stream`` for a batch of ``shape``, from a generator on ``device`` seeded with
        :func:`stream_seed` of (``seed``, the stream, ``rank``, the stream's count): deterministic given these, the
        global random state untouched, different on every process, reproduced after a checkpoint (the counts are
        saved)."""
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {list(STREAMS)}; got {stream!r}.")
        count = self.draw_counts[stream]
        self.draw_counts[stream] = count + 1
        gen = torch.Generator(device=device)
        gen.manual_seed(stream_seed(self.seed, STREAMS.index(stream), rank, count))
        return draw(self.settings, shape, gen)

    def reset(self) -> None:
        """Returns the free values to the start."""
        with torch.no_grad():
            for t in self.alpha().values():
                t.zero_()

    def _apply(self, fn: Any, recurse: bool = True) -> AugmentParameters:
        return apply_keeping_precision(self, fn)

    # -- what a checkpoint carries beside the buffers ------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The settings that rebuild these parameters from their counts (plain Python values)."""
        return {"settings": asdict(self.settings), "kind": self.kind, "group_size": self.group_size,
                "start": dict(self.start), "seed": self.seed}

    def export_record(self) -> dict[str, Any]:
        """What a loss file carries of these parameters, as plain values (the ``augmentation`` section of
        :meth:`~lightning_autobalance.AutoBalanceMixin.export_loss`): :meth:`config` (settings, parametrisation,
        group size, start, draw seed), the classes and groups, the table names, the free values (what
        :meth:`from_record` reads back), the counts they were found on, and the strengths per cell (``G x K`` per
        table, in their units: for a reader; they are not read back)."""
        counts = self.class_counts
        return {**self.config(), "num_classes": self.num_classes, "num_groups": self.num_groups,
                "tables": list(self.settings.names),
                "class_counts": (counts[0] if counts.shape[0] == 1 else counts).round().long().tolist(),
                "alpha": {k: v.detach().double().cpu().tolist() for k, v in self.alpha().items()},
                "strengths": {k: v.double().cpu().tolist() for k, v in self.strengths().items()}}

    @classmethod
    def from_record(cls, record: Any, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor,
                    where: str = "the augmentation") -> AugmentParameters:
        """Parameters rebuilt from an :meth:`export_record` on ``class_counts`` (``K`` counts or a ``G x K``
        table: those of the model now trained), the free values copied in. As for the loss, the searched
        deviations are kept while what follows the counts (the slope's direction along ``log(n / n_max)``, the
        frequency bins) is taken from ``class_counts``; with ``kind="class"`` the strengths are the recorded ones.

        Args:
            record: the mapping written by :meth:`export_record`.
            class_counts: the counts to rebuild on.
            where: names the record in error messages (e.g. ``"Loss file 'x.yaml': augmentation"``).

        Raises:
            ValueError: a record that does not fit: naming the field (``settings``, ``kind``, ``tables``,
                ``num_classes``, ``num_groups``, ``alpha``) and what was expected.
        """
        if not isinstance(record, Mapping):
            raise ValueError(f"{where} must be a mapping (written by export_loss); got {type(record).__name__}.")
        try:
            settings = coerce_settings(record.get("settings"))
        except ValueError as err:
            raise ValueError(f"{where}.settings: {err}") from err
        kind = record.get("kind", "hierarchical")
        if kind not in AUGMENT_KINDS:
            raise ValueError(f"{where}.kind is {kind!r}; expected one of {list(AUGMENT_KINDS)}.")
        tables = record.get("tables")
        if tables is not None and list(tables) != list(settings.names):
            raise ValueError(f"{where}.tables lists {list(tables)}, but its settings make the tables "
                             f"{list(settings.names)}.")
        counts = torch.as_tensor(class_counts, dtype=torch.float64)
        counts = counts.reshape(-1, counts.shape[-1])
        for field_name, have in (("num_classes", counts.shape[1]), ("num_groups", counts.shape[0])):
            saved = record.get(field_name)
            if saved is not None and int(saved) != have:
                raise ValueError(f"{where}.{field_name} is {saved}, but the model it is loaded into has {have} "
                                 f"{field_name[4:]}; expected {field_name}: {have}.")
        try:
            params = cls(counts, settings, kind, int(record.get("group_size", 1)), start=record.get("start"),
                         seed=int(record.get("seed", 0)))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err
        alpha, free = record.get("alpha"), params.alpha()
        if not isinstance(alpha, Mapping) or set(alpha) != set(free):
            got = sorted(alpha) if isinstance(alpha, Mapping) else alpha
            raise ValueError(f"{where}.alpha holds {got}; expected the free values {sorted(free)} of a {kind!r} "
                             f"parametrisation of the tables {list(settings.names)}.")
        with torch.no_grad():
            for name, value in alpha.items():
                try:
                    value = torch.as_tensor(value, dtype=torch.float64)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{where}.alpha.{name} is not numeric: {err}") from err
                if tuple(value.shape) != tuple(free[name].shape):
                    raise ValueError(f"{where}.alpha.{name} has shape {tuple(value.shape)}; expected "
                                     f"{tuple(free[name].shape)} (groups, classes or bins).")
                if not torch.isfinite(value).all():
                    raise ValueError(f"{where}.alpha.{name} holds non-finite values; expected finite numbers.")
                free[name].copy_(value.to(free[name].dtype))
        return params

    def get_extra_state(self) -> dict[str, Any]:
        return {**self.config(), "frozen": self.frozen, "draw_counts": dict(self.draw_counts)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = {k: state.get(k) for k in ("settings", "kind")}
        mine = {"settings": asdict(self.settings), "kind": self.kind}
        if any(saved[k] is not None and _plain(saved[k]) != _plain(mine[k]) for k in saved):
            raise ValueError(f"The saved augmentation parameters are {saved['kind']!r} with settings "
                             f"{saved['settings']}, but this module has {self.kind!r} with {mine['settings']}.")
        self.frozen = bool(state.get("frozen", False))
        self.draw_counts = {s: int(state.get("draw_counts", {}).get(s, 0)) for s in STREAMS}

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_groups={self.num_groups}, kind={self.kind!r}, "
                f"tables={list(self.settings.names)}, frozen={self.frozen}")


def _plain(value: Any) -> Any:
    """Tuples and lists alike, floats compared as floats (a checkpoint may hold either)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isfinite(value):
        return float(value)
    return value
