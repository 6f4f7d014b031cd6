"""Parametrisations of the loss parameters ``alpha`` that AutoBalance searches.

A parametrisation maps a few free tensors (``alpha``) to the ``(delta, offset, weight)`` tables of
:mod:`lightning_autobalance.core.losses`: one free value per class and group (:class:`PerClass`) or per bin of
classes of similar frequency (:class:`FrequencyGroups`), three dataset-level scalars (:class:`DatasetDependent`), or
those scalars plus a residual per class (:class:`Hierarchical`, the default); each class gives its formulas.

The free tensors are *buffers*, not parameters: a model optimizer built from ``module.parameters()`` never
sees them, yet they are saved in ``state_dict``. They are kept in float32 or wider even when the module is cast
to half precision. Positivity of ``delta`` and ``weight`` comes from an exponential reparametrisation, and the
directions the loss cannot see, or that would let a scale drift, are removed: the free offsets are centred in
every row, the geometric mean of ``delta`` stays that of its preset, and the weights keep the preset's total.

Plain PyTorch, nothing of Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_autobalance.core.losses import LossTables, as_count_table, preset_tables, resolve_preset

__all__ = ["PARAMETRIZATIONS", "SEARCHABLE", "DatasetDependent", "FrequencyGroups", "Hierarchical",
           "LossParametrization", "PerClass", "build_parametrization", "frequency_bins"]

SEARCHABLE = ("delta", "offset", "weight")
ParametrizationKind = Literal["hierarchical", "class", "groups", "dataset"]
_LOW_PRECISION = (torch.float16, torch.bfloat16)
#: The shared scalar of each table in the dataset-level parametrisations.
_SCALARS = {"delta": "gamma", "offset": "tau", "weight": "omega"}


def _check_search(search: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(search, str):
        search = [s for s in search.replace("+", ",").split(",") if s.strip()]
    names = tuple(dict.fromkeys(s.strip().lower() for s in search))
    unknown = [s for s in names if s not in SEARCHABLE]
    if unknown:
        raise ValueError(f"search names unknown tables {unknown}; expected a subset of {list(SEARCHABLE)}.")
    return names


def apply_keeping_precision(module: nn.Module, fn: Any) -> Any:
    """``nn.Module._apply`` for a module of buffers that a search updates: device moves apply as usual; a cast to
    float16/bfloat16 does not, so that the search's arithmetic stays float32 or wider."""
    for name, buf in list(module._buffers.items()):
        if buf is None:
            continue
        out = fn(buf)
        if buf.is_floating_point() and out.dtype in _LOW_PRECISION and buf.dtype not in _LOW_PRECISION:
            out = buf.to(device=out.device)
        module._buffers[name] = out
    return module


class LossParametrization(nn.Module):
    """Base class: holds the class counts, the preset start and the free tensors ``alpha``.

    Subclasses define :meth:`_free_shapes` and :meth:`tables`. Use :func:`build_parametrization` to make one.

    Args:
        class_counts: ``K`` training counts per class, or a ``G x K`` table per (group, class).
        preset: the preset the search starts from (see :func:`~lightning_autobalance.core.losses.preset_tables`).
        search: which of ``"delta"``, ``"offset"``, ``"weight"`` are searched; the others stay at the preset.
        num_groups: number of sensitive groups ``G`` (rows of the tables); default from ``class_counts``.
        preset_kwargs: extra arguments of the preset (``tau``, ``gamma``, ``beta``).
    """

    kind: str = "base"

    def __init__(self, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor, preset: str = "ce",
                 search: Sequence[str] | str = ("delta", "offset"), num_groups: int | None = None,
                 preset_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if num_groups is not None and num_groups < 1:
            raise ValueError(f"num_groups must be at least 1; got {num_groups}.")
        counts = as_count_table(class_counts, num_groups=num_groups)
        self.preset = resolve_preset(preset)
        self.preset_kwargs = dict(preset_kwargs or {})
        self.search = _check_search(search)
        self.register_buffer("class_counts", counts)
        base = preset_tables(self.preset, counts, **self.preset_kwargs)
        self.register_buffer("base_delta", base.delta)
        self.register_buffer("base_offset", base.offset)
        self.register_buffer("base_weight", base.weight)
        self.frozen = False
        #: the keep-or-revert decision on the current values (plain values, set by the held-back check; ``None``: no
        #: decision): saved with the loss in every state dict and loss file
        self.decision: dict[str, Any] | None = None
        for name, shape in self._free_shapes().items():
            self.register_buffer(f"alpha_{name}", torch.zeros(shape))
        self._init_free()

    # -- to override -------------------------------------------------------------------------------------
    def _free_shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def _init_free(self) -> None:
        """Sets the free tensors so that :meth:`tables` equals the preset (zeros by default)."""

    def tables(self, alpha: Mapping[str, Tensor] | None = None) -> LossTables:
        """The ``(G, K)`` loss tables for the free tensors ``alpha`` (default: the stored ones).

        Differentiable in ``alpha``: the hypergradient is taken through this function.
        """
        raise NotImplementedError

    def retraining_tables(self) -> LossTables:
        """The tables to retrain with once the search is over (by default :meth:`tables`)."""
        return self.tables()

    # -- common ------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.class_counts.shape[1]

    @property
    def num_groups(self) -> int:
        return self.class_counts.shape[0]

    def alpha(self) -> dict[str, Tensor]:
        """The free tensors by name (the stored buffers themselves: a hyper-optimizer steps them in place)."""
        return {name: getattr(self, f"alpha_{name}") for name in self._free_shapes()}

    def num_free(self) -> int:
        return sum(t.numel() for t in self.alpha().values())

    def free_value_counts(self, counts: Tensor) -> dict[str, Tensor]:
        """How many samples of a ``(G, K)`` count table inform each per-class free value (the search's shrinkage
        pulls a value towards its start in inverse proportion to this number).

        Only free tensors made of per-class (or per-bin) values appear; shared scalars are left out.
        """
        return {}

    def _count_rows(self, counts: Tensor | Sequence[Any]) -> Tensor:
        """``K`` counts or a ``(G, K)`` table (zeros allowed) as a ``(G, K)`` float table on this module's device."""
        table = torch.as_tensor(counts, dtype=self.class_counts.dtype).to(self.class_counts.device)
        table = table.reshape(-1, table.shape[-1]) if table.ndim else table.reshape(1, 1)
        if table.shape[-1] != self.num_classes or table.shape[0] not in (1, self.num_groups):
            raise ValueError(f"counts must have shape (K,) or (G, K) with K={self.num_classes}, "
                             f"G={self.num_groups}; got {tuple(torch.as_tensor(counts).shape)}.")
        return table.expand(self.num_groups, -1).clone()

    def reset(self) -> None:
        """Returns the free tensors to the preset start."""
        with torch.no_grad():
            for t in self.alpha().values():
                t.zero_()
        self._init_free()

    def _base(self) -> LossTables:
        return LossTables(self.base_delta, self.base_offset, self.base_weight)

    def _apply(self, fn: Any, recurse: bool = True) -> LossParametrization:
        return apply_keeping_precision(self, fn)

    def get_extra_state(self) -> dict[str, Any]:
        return {"kind": self.kind, "preset": self.preset, "search": list(self.search), "frozen": self.frozen,
                "decision": self.decision}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("kind", self.kind) != self.kind or list(state.get("search", self.search)) != list(self.search):
            raise ValueError(f"The saved loss parametrisation is {state.get('kind')!r} searching "
                             f"{state.get('search')}, but this module has {self.kind!r} searching {list(self.search)}.")
        self.frozen = bool(state.get("frozen", False))
        self.decision = state.get("decision")

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_groups={self.num_groups}, preset={self.preset!r}, "
                f"search={list(self.search)}, frozen={self.frozen}")


class PerClass(LossParametrization):
    """One free value per class and group for each searched table (the paper's "personalised" loss).

    ``delta = base_delta * exp(a - mean(a))``, ``offset = base_offset + b - rowmean(b)``,
    ``weight = base_weight * exp(c)`` rescaled to the preset's total.

    Example:
        >>> p = PerClass([500, 50, 5], preset="la", search=("delta", "offset"))
        >>> sorted(p.alpha())
        ['delta', 'offset']
        >>> p.tables().offset.shape
        torch.Size([1, 3])
    """

    kind = "class"

    def _num_free_columns(self) -> int:
        return self.num_classes

    def _free_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: (self.num_groups, self._num_free_columns()) for name in self.search}

    def _expand(self, value: Tensor, interpolate: bool = False) -> Tensor:
        return value

    def _column_counts(self, counts: Tensor) -> Tensor:
        return counts

    def free_value_counts(self, counts: Tensor) -> dict[str, Tensor]:
        per_column = self._column_counts(self._count_rows(counts))
        return {name: per_column for name in self.search}

    def _tables(self, alpha: Mapping[str, Tensor], interpolate: bool) -> LossTables:
        delta, offset, weight = self._base()
        if "delta" in alpha:
            a = self._expand(alpha["delta"], interpolate)
            delta = delta * torch.exp(a - a.mean())
        if "offset" in alpha:
            b = self._expand(alpha["offset"], interpolate)
            offset = offset + b - b.mean(dim=1, keepdim=True)
        if "weight" in alpha:
            c = self._expand(alpha["weight"], interpolate)
            raw = weight * torch.exp(c - c.max())  # max, not mean: the rescaling cancels it and exp cannot overflow
            weight = raw * (weight.sum() / raw.sum())
        return LossTables(delta, offset, weight)

    def tables(self, alpha: Mapping[str, Tensor] | None = None) -> LossTables:
        return self._tables(self.alpha() if alpha is None else alpha, interpolate=False)

    @classmethod
    def from_tables(cls, tables: LossTables, class_counts: Sequence[int] | Tensor | None = None,
                    search: Sequence[str] | str = ()) -> PerClass:
        """A parametrisation that starts from given tables (e.g. a loss found by a search and loaded from file).

        Args:
            tables: ``(G, K)`` tables; they become the start ("preset") of the parametrisation.
            class_counts: the class counts to keep beside them (default: ones; they are informative only here).
            search: tables to keep searching from there (default: none).
        """
        g, k = tables.delta.shape
        counts = torch.ones(g, k) if class_counts is None else as_count_table(class_counts, k, g)
        p = cls(counts, preset="ce", search=search, num_groups=g)
        with torch.no_grad():
            for name, table in zip(("base_delta", "base_offset", "base_weight"), tables):
                getattr(p, name).copy_(table.to(getattr(p, name)))
        return p


def frequency_bins(class_counts: Sequence[int] | Tensor, group_size: int) -> list[list[int]]:
    """Sorts classes by count (largest first, ties by index) and cuts them into bins of ``group_size``.

    Any ``group_size >= 1`` works; when it does not divide ``K`` the last bin is smaller.

    Example:
        >>> frequency_bins([5, 50, 500, 1], 3)
        [[2, 1, 0], [3]]
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten().tolist()
    if group_size < 1:
        raise ValueError(f"group_size must be at least 1; got {group_size}.")
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    return [order[i:i + group_size] for i in range(0, len(order), group_size)]


class FrequencyGroups(PerClass):
    """Classes sorted by frequency share one free value per bin of ``group_size`` classes.

    During the search every class takes its bin's value. :meth:`retraining_tables` instead interpolates
    linearly between the bin centres (in order of frequency) to give ``K`` smooth per-class values, as the paper
    does when it retrains with a loss searched on bins.

    Args:
        class_counts: see :class:`LossParametrization`; bins are formed from the counts summed over groups.
        group_size: classes per bin (the paper: 1 for CIFAR-10, 10 for CIFAR-100, 20 for ImageNet-LT).
        **kwargs: the other arguments of :class:`LossParametrization`.

    Example:
        >>> p = FrequencyGroups(list(range(100, 0, -1)), group_size=30, preset="la", search="offset")
        >>> p.alpha()["offset"].shape
        torch.Size([1, 4])
    """

    kind = "groups"

    def __init__(self, class_counts: Sequence[int] | Tensor, group_size: int = 10, **kwargs: Any) -> None:
        counts = as_count_table(class_counts)
        self.bins = frequency_bins(counts.sum(dim=0), group_size)
        self.group_size = group_size
        k = counts.shape[1]
        constant = torch.zeros(k, len(self.bins), dtype=torch.float64)
        centres, position = [], 0
        for m, members in enumerate(self.bins):
            constant[members, m] = 1.0
            centres.append(position + (len(members) - 1) / 2.0)
            position += len(members)
        interp = torch.zeros_like(constant)
        for m, members in enumerate(self.bins):
            for j, cls in enumerate(members):
                pos = m * group_size + j
                interp[cls] = _hat_weights(pos, centres)
        super().__init__(class_counts, **kwargs)
        self.register_buffer("expand_constant", constant.float(), persistent=False)
        self.register_buffer("expand_interpolate", interp.float(), persistent=False)

    def _num_free_columns(self) -> int:
        return len(self.bins)

    def _expand(self, value: Tensor, interpolate: bool = False) -> Tensor:
        matrix = self.expand_interpolate if interpolate else self.expand_constant
        return value @ matrix.to(value).T

    def _column_counts(self, counts: Tensor) -> Tensor:
        return counts @ self.expand_constant.to(counts)

    def retraining_tables(self) -> LossTables:
        return self._tables(self.alpha(), interpolate=True)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "group_size": self.group_size}


def _hat_weights(pos: float, centres: list[float]) -> Tensor:
    """Linear-interpolation weights of a position between bin centres (constant beyond the ends)."""
    w = torch.zeros(len(centres), dtype=torch.float64)
    if len(centres) == 1 or pos <= centres[0]:
        w[0] = 1.0
    elif pos >= centres[-1]:
        w[-1] = 1.0
    else:
        m = max(i for i, c in enumerate(centres) if c <= pos)
        t = (pos - centres[m]) / (centres[m + 1] - centres[m])
        w[m], w[m + 1] = 1.0 - t, t
    return w


class DatasetDependent(LossParametrization):
    """Three scalars: ``delta_y = (n_y/n_max)**gamma``, ``offset_y = tau log pi_y``, ``weight_y ~ pi_y**-omega``.

    ``search`` names tables as elsewhere: ``"delta"`` searches ``gamma``, ``"offset"`` ``tau`` and ``"weight"``
    ``omega``. The start comes from the preset (``ce``: all zero; ``la``: ``tau``; ``cdt``: ``gamma``; ``vs``:
    both; ``inverse_frequency``: ``omega = 1``). Class-balanced weights are not in this family.

    Example:
        >>> p = DatasetDependent([500, 50, 5], preset="vs", search=("delta", "offset"))
        >>> {k: round(v.item(), 2) for k, v in p.alpha().items()}
        {'gamma': 0.3, 'tau': 1.0}
    """

    kind = "dataset"

    def __init__(self, class_counts: Sequence[int] | Tensor, preset: str = "ce", **kwargs: Any) -> None:
        if resolve_preset(preset) in ("class_balanced", "group_balanced"):
            raise ValueError(f"preset {resolve_preset(preset)!r} is not in the dataset-dependent family "
                             "(weights pi**-omega); start from 'inverse_frequency' or 'ce', or use PerClass.")
        super().__init__(class_counts, preset=preset, **kwargs)

    def _free_shapes(self) -> dict[str, tuple[int, ...]]:
        return {_SCALARS[name]: () for name in self.search}

    def _start(self) -> dict[str, float]:
        kw = self.preset_kwargs
        tau = float(kw.get("tau", 1.0))
        gamma = kw.get("gamma")
        return {
            "gamma": {"cdt": 0.2 if gamma is None else float(gamma),
                      "vs": 0.3 if gamma is None else float(gamma)}.get(self.preset, 0.0),
            "tau": tau if self.preset in ("la", "vs") else 0.0,
            "omega": 1.0 if self.preset == "inverse_frequency" else 0.0,
        }

    def _init_free(self) -> None:
        start = self._start()
        with torch.no_grad():
            for name, t in self.alpha().items():
                t.fill_(start[name])

    def alpha(self) -> dict[str, Tensor]:
        return {_SCALARS[n]: getattr(self, f"alpha_{_SCALARS[n]}") for n in self.search}

    def tables(self, alpha: Mapping[str, Tensor] | None = None) -> LossTables:
        alpha = self.alpha() if alpha is None else alpha
        start = self._start()
        values = {k: alpha.get(k, torch.tensor(v, dtype=self.base_delta.dtype, device=self.base_delta.device))
                  for k, v in start.items()}
        counts = self.class_counts.to(self.base_delta.dtype)
        log_ratio = torch.log(counts / counts.max(dim=1, keepdim=True).values)
        log_prior = torch.log(counts / counts.sum(dim=1, keepdim=True))
        delta = torch.exp(values["gamma"] * log_ratio)
        offset = values["tau"] * log_prior
        raw = torch.exp(-values["omega"] * log_prior)
        weight = raw / raw.sum(dim=1, keepdim=True) * counts.shape[1]
        return LossTables(delta, offset, weight)


class Hierarchical(LossParametrization):
    """Shared dataset-level scalars plus a residual per class: the library's default parametrisation.

    For every searched table, a scalar moves all classes together along the direction of the dataset-dependent
    family and a per-class residual adds what is specific to a class::

        offset = base_offset + tau * log pi + (b - rowmean(b))
        delta  = base_delta * exp(gamma * (log(n / n_max) - mean) + a - mean(a))
        weight = base_weight * pi ** -omega * exp(c), rescaled to the preset's total

    ``tau``, ``gamma``, ``omega`` start at zero and are *increments* on the preset (from ``preset="ce"``,
    ``tau = 1`` is logit adjustment; from ``preset="la"``, ``tau = -1`` is cross-entropy). The scalars use the
    pooled signal of all classes, so they move reliably even when tail classes have one or two held-out images;
    the residuals ``a, b, c`` (free tensors named ``delta``, ``offset``, ``weight`` as in :class:`PerClass`) are the
    values a search should shrink towards zero where a class has little upper data
    (:meth:`free_value_counts`). Retraining on other counts rebuilds ``log pi`` on those counts.

    Example:
        >>> p = Hierarchical([500, 50, 5], preset="ce", search="offset")
        >>> sorted(p.alpha())
        ['offset', 'tau']
        >>> with torch.no_grad():
        ...     _ = p.alpha()["tau"].fill_(1.0)
        >>> la = PerClass([500, 50, 5], preset="la").tables().offset
        >>> bool(torch.allclose(p.tables().offset - p.tables().offset.mean(), la - la.mean()))
        True
    """

    kind = "hierarchical"

    def _free_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for name in self.search:
            shapes[_SCALARS[name]] = ()
            shapes[name] = (self.num_groups, self.num_classes)
        return shapes

    def free_value_counts(self, counts: Tensor) -> dict[str, Tensor]:
        table = self._count_rows(counts)
        return {name: table for name in self.search}

    def tables(self, alpha: Mapping[str, Tensor] | None = None) -> LossTables:
        alpha = self.alpha() if alpha is None else alpha
        delta, offset, weight = self._base()
        counts = self.class_counts.to(delta.dtype)
        log_prior = torch.log(counts / counts.sum(dim=1, keepdim=True))
        if "offset" in alpha:
            b = alpha["offset"]
            offset = offset + alpha["tau"] * log_prior + b - b.mean(dim=1, keepdim=True)
        if "delta" in alpha:
            log_ratio = torch.log(counts / counts.max(dim=1, keepdim=True).values)
            a = alpha["gamma"] * (log_ratio - log_ratio.mean()) + alpha["delta"]
            delta = delta * torch.exp(a - a.mean())
        if "weight" in alpha:
            c = -alpha["omega"] * log_prior + alpha["weight"]
            raw = weight * torch.exp(c - c.max())
            weight = raw * (weight.sum() / raw.sum())
        return LossTables(delta, offset, weight)


def build_parametrization(kind: ParametrizationKind, class_counts: Sequence[int] | Sequence[Sequence[int]] | Tensor,
                          preset: str = "ce", search: Sequence[str] | str = ("delta", "offset"),
                          num_groups: int | None = None, group_size: int = 1,
                          preset_kwargs: Mapping[str, Any] | None = None) -> LossParametrization:
    """Makes a parametrisation by name: ``"hierarchical"`` (shared scalars plus per-class residuals), ``"class"``,
    ``"groups"`` (bins of ``group_size``) or ``"dataset"``.

    Example:
        >>> build_parametrization("groups", list(range(100, 0, -1)), preset="la", group_size=10).num_free()
        20
    """
    if kind not in PARAMETRIZATIONS:
        raise ValueError(f"Unknown parametrization {kind!r}; expected 'hierarchical', 'class', 'groups' or 'dataset'.")
    extra = {"group_size": group_size} if kind == "groups" else {}
    return PARAMETRIZATIONS[kind](class_counts, preset=preset, search=search, num_groups=num_groups,
                                  preset_kwargs=preset_kwargs, **extra)


#: The parametrisations by name (their ``kind``).
PARAMETRIZATIONS: dict[str, type[LossParametrization]] = {
    p.kind: p for p in (Hierarchical, PerClass, FrequencyGroups, DatasetDependent)}

