"""Per-cell batch augmentation that gradients flow through, and its hypergradient (DESIGN.md section 13).

Every op has one free value per cell (a class, or a (group, class) cell ``g * K + y``) in a ``(G, K)`` table,
unconstrained; what it stands for is ``limit * sigmoid(value)``:

* ``mix`` (any shape): ``x + lam (x_partner - x)``, the partner from the same cell, ``lam = max_mix sigmoid(a) u``;
* ``flip`` (images ``(N, C, H, W)``): a horizontal flip with probability ``sigmoid(a)``;
* ``shift`` (images): a translation by ``s xi`` of the side, ``s = max_shift sigmoid(a)``, by bilinear sampling;
* ``erase`` (``ndim >= 2``): a soft box of side ``max_erase sigmoid(a)`` set to zero (on ``H, W``, else the last
  dimension: a 1-D signal's segment, a span of tabular features);
* ``noise`` (any shape): ``x + sigma xi``, ``sigma = max_noise sigmoid(a)``.

The ops run in that order. An op named in ``gated`` is also applied with a per-cell probability (table
``p_<op>``). Probabilities are relaxed Bernoulli gates: with straight-through (the default) the forward pass is a
hard 0/1 and the gradient that of the relaxation. The random draws ``xi`` come from :func:`draw`, with an explicit
generator or seed, so a hyper step can hold them fixed and resume or DDP reproduce them.

:func:`input_mixed_term` is the phi-gradient of ``<grad_theta L(theta; A(x; phi, xi)), p>`` by a central
difference along ``p``; :func:`input_hypergradient` is ``-`` its mean over training batches, the augmentation's
share of a hypergradient for a direction ``p`` (e.g. ``p = eta v(theta')`` for one-step unrolling). Plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_autobalance.core.cells import cell_index
from lightning_autobalance.core.linear_solve import Tree, axpy, scale
from lightning_autobalance.core.problem import (
    Batch,
    FunctionalModel,
    Problem,
    difference_step,
    reduce_tree,
    wide_dtype,
)
from lightning_autobalance.core.random_state import from_state

__all__ = ["IMAGE_OPS", "OPS", "START_FRACTION", "AugmentSettings", "Draws", "InputPasses", "augment", "draw",
           "erase", "gate", "identity_start", "initial_params", "input_hypergradient", "input_mixed_term",
           "input_passes", "partners", "strengths", "translate"]

OPS = ("mix", "flip", "shift", "erase", "noise")  # in the order they are applied
IMAGE_OPS = ("flip", "shift")
PADDINGS = ("zeros", "border", "reflection")
_LIMITS = {"mix": "max_mix", "shift": "max_shift", "erase": "max_erase", "noise": "max_noise"}


def _op_names(value: Sequence[str] | str, field: str) -> tuple[str, ...]:
    items = value.replace("+", ",").split(",") if isinstance(value, str) else list(value)
    names = [str(s).strip().lower() for s in items if str(s).strip()]
    unknown = [s for s in names if s not in OPS]
    if unknown:
        raise ValueError(f"AugmentSettings.{field}: unknown op(s) {unknown}; expected names from {list(OPS)}.")
    return tuple(op for op in OPS if op in names)


@dataclass(frozen=True)
class AugmentSettings:
    """Which ops are on and their fixed constants (validated here; list or ``"a+b"`` strings are accepted).

    Attributes:
        ops: the ops applied (any of :data:`OPS`; stored in the order applied).
        gated: ops among ``ops`` (not ``flip``, a probability already) applied with a searched probability.
        max_shift, max_erase, max_noise, max_mix: the largest strength of each op (shift and erase as a
            fraction of the side, noise in input units, mix as the partner's largest share).
        temperature: of the relaxed Bernoulli gates.
        edge: width of the soft edge of the erased box, as a fraction of the side.
        padding: ``grid_sample``'s padding mode for the shift.
        straight_through: hard 0/1 gates forward (soft gradient); ``False`` keeps the soft gate forward too.
    """

    ops: tuple[str, ...] = ("flip", "shift")
    gated: tuple[str, ...] = ()
    max_shift: float = 0.125
    max_erase: float = 0.5
    max_noise: float = 0.1
    max_mix: float = 0.5
    temperature: float = 0.5
    edge: float = 0.05
    padding: str = "zeros"
    straight_through: bool = True

    def __post_init__(self) -> None:
        ops, gated = _op_names(self.ops, "ops"), _op_names(self.gated, "gated")
        if not ops:
            raise ValueError(f"AugmentSettings.ops is empty; expected at least one of {list(OPS)}.")
        bad = [op for op in gated if op not in ops or op == "flip"]
        if bad:
            raise ValueError(f"AugmentSettings.gated: {bad} cannot be gated; expected ops that are on and have a "
                             f"strength: {[op for op in ops if op != 'flip']}.")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("ops", "gated", "padding", "straight_through"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"AugmentSettings.{f.name} must be a positive finite number; got {value!r}.")
            object.__setattr__(self, f.name, float(value))
        for name in ("max_shift", "max_erase", "max_mix"):
            if getattr(self, name) > 1.0:
                raise ValueError(f"AugmentSettings.{name} is a fraction; expected at most 1, got "
                                 f"{getattr(self, name)}.")
        if self.padding not in PADDINGS:
            raise ValueError(f"AugmentSettings.padding must be one of {list(PADDINGS)}; got {self.padding!r}.")
        if not isinstance(self.straight_through, bool):
            raise ValueError(f"AugmentSettings.straight_through must be a bool; got {self.straight_through!r}.")
        object.__setattr__(self, "ops", ops)
        object.__setattr__(self, "gated", gated)

    @property
    def names(self) -> tuple[str, ...]:
        """The free tables these settings need: one per op, then ``p_<op>`` per gated op."""
        return self.ops + tuple(f"p_{op}" for op in self.gated)

    def limit(self, name: str) -> float:
        """The largest value of table ``name`` (``1`` for a probability)."""
        return getattr(self, _LIMITS[name]) if name in _LIMITS else 1.0


# ---------------------------------------------------------------------------------------------------------
# Parameters and draws
# ---------------------------------------------------------------------------------------------------------


def initial_params(settings: AugmentSettings, num_classes: int, num_groups: int = 1,
                   start: Mapping[str, float] | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The free ``(G, K)`` tables giving the strengths ``start`` (by table name, in the units of :func:`strengths`;
    default half of each limit) in every cell."""
    start = dict(start or {})
    unknown = sorted(set(start) - set(settings.names))
    if unknown:
        raise ValueError(f"start names tables {unknown} that these settings lack; expected {list(settings.names)}.")
    out = {}
    for name in settings.names:
        hi = settings.limit(name)
        s = float(start.get(name, hi / 2))
        if not 0.0 < s < hi:
            raise ValueError(f"start[{name!r}] must lie strictly between 0 and {hi}; got {s}.")
        out[name] = torch.full((num_groups, num_classes), math.log(s / (hi - s)), dtype=dtype)
    return out


#: the start of a module's searched augmentation, as a fraction of every table's limit (:func:`identity_start`)
START_FRACTION = 0.05


def identity_start(settings: AugmentSettings, fraction: float = START_FRACTION) -> dict[str, float]:
    """Start strengths close to no augmentation: ``fraction`` of every table's limit (a flip or gate probability
    ``fraction``). A module's searched augmentation starts there unless told otherwise, so that a search put back to
    its start (or an augmentation never searched) leaves the training the module had without it.

    Example:
        >>> identity_start(AugmentSettings(ops=("flip", "shift")))
        {'flip': 0.05, 'shift': 0.00625}
    """
    return {name: settings.limit(name) * fraction for name in settings.names}


def strengths(params: Mapping[str, Tensor], settings: AugmentSettings) -> dict[str, Tensor]:
    """What the free tables stand for: ``limit * sigmoid(value)`` (magnitudes in their units, probabilities)."""
    return {name: settings.limit(name) * torch.sigmoid(params[name]) for name in settings.names}


class Draws(NamedTuple):
    """The random draws of one batch (``None`` for an op that is off); hold them fixed within a hyper step."""

    mix: Tensor | None = None  # (N, 2): a sort key choosing the partner, the share u in U(0, 1)
    flip: Tensor | None = None  # (N,) logistic noise of the flip gate
    shift: Tensor | None = None  # (N, 2) in U(-1, 1): (x, y) translation in units of the strength
    erase: Tensor | None = None  # (N, 2) in U(0, 1): the box centre (row, column; the column only if not an image)
    noise: Tensor | None = None  # like the inputs, N(0, 1)
    gates: Tensor | None = None  # (N, len(gated)) logistic noise of the probability gates

    def to(self, device: torch.device | str) -> Draws:
        return Draws(*(None if t is None else t.to(device) for t in self))


def draw(settings: AugmentSettings, shape: Sequence[int], generator: torch.Generator | int) -> Draws:
    """Draws for a batch of inputs of ``shape`` from ``generator`` (or a fresh CPU generator seeded with an int),
    on the generator's device, in float32."""
    gen = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
    n = int(shape[0])

    def uniform(*size: int) -> Tensor:
        return torch.rand(*size, generator=gen, device=gen.device)

    def logistic(*size: int) -> Tensor:
        u = uniform(*size).clamp(1e-6, 1.0 - 1e-6)
        return torch.log(u) - torch.log1p(-u)

    on = settings.ops
    return Draws(
        mix=uniform(n, 2) if "mix" in on else None,
        flip=logistic(n) if "flip" in on else None,
        shift=2.0 * uniform(n, 2) - 1.0 if "shift" in on else None,
        erase=uniform(n, 2) if "erase" in on else None,
        noise=torch.randn(*shape, generator=gen, device=gen.device) if "noise" in on else None,
        gates=logistic(n, len(settings.gated)) if settings.gated else None,
    )


# ---------------------------------------------------------------------------------------------------------
# The ops (each on a batch, with one value per sample)
# ---------------------------------------------------------------------------------------------------------


def _col(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample ``(N,)`` tensor shaped to broadcast against ``x``."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def gate(x: Tensor, new: Tensor, logit: Tensor, noise: Tensor, temperature: float, straight_through: bool) -> Tensor:
    """``new`` where a relaxed Bernoulli gate ``sigmoid((logit + noise) / temperature)`` opens, else ``x``; with
    straight-through exactly ``new`` or ``x`` forward (the gate rounded), the relaxation's gradient backward."""
    soft = _col(torch.sigmoid((logit + noise.to(logit.dtype)) / temperature), x)
    if not straight_through:
        return x + soft * (new - x)
    return torch.where(_col(logit + noise > 0, x), new, x) + (soft - soft.detach()) * (new - x)


def partners(cells: Tensor, key: Tensor) -> Tensor:
    """For each sample another of its cell (itself if alone): the next one in a random cyclic order per cell."""
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(cells[order], stable=True)]
    sorted_cells = cells[order]
    pos = torch.arange(len(cells), device=cells.device)
    starts = torch.ones_like(sorted_cells, dtype=torch.bool)
    starts[1:] = sorted_cells[1:] != sorted_cells[:-1]
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), 0).values  # run start of each position
    nxt = torch.cat([pos[1:], pos[:1]])
    ends = torch.cat([starts[1:], starts[:1]])  # the next position opens another run: wrap to this run's start
    out = torch.empty_like(order)
    out[order] = order[torch.where(ends, first, nxt)]
    return out


def translate(x: Tensor, shift: Tensor, padding: str = "zeros") -> Tensor:
    """Moves each image by ``shift`` ``(N, 2)`` (x, y), fractions of its width and height, by bilinear sampling."""
    n = x.shape[0]
    eye = torch.eye(2, dtype=x.dtype, device=x.device).expand(n, 2, 2)
    theta = torch.cat([eye, 2.0 * shift.to(x.dtype).unsqueeze(-1)], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _window(length: int, centre: Tensor, half: Tensor, edge: float) -> Tensor:
    """``(N, length)``: about 1 within ``half`` of ``centre`` on ``[0, 1]``, 0 outside, with a soft edge."""
    t = (torch.arange(length, dtype=half.dtype, device=half.device) + 0.5) / length
    return torch.sigmoid((half[:, None] - (t - centre[:, None]).abs()) / edge)


def erase(x: Tensor, size: Tensor, centre: Tensor, edge: float) -> Tensor:
    """Sets a soft box of side ``size`` (fraction) around ``centre`` to zero: on ``(H, W)`` of images, else on the
    last dimension (``centre[:, 1]``)."""
    half, centre = size / 2.0, centre.to(x.dtype)
    cols = _window(x.shape[-1], centre[:, 1], half, edge)
    if x.ndim == 4:
        mask = (_window(x.shape[-2], centre[:, 0], half, edge)[:, :, None] * cols[:, None, :])[:, None]
    else:
        mask = cols.reshape(x.shape[0], *([1] * (x.ndim - 2)), x.shape[-1])
    return x * (1.0 - mask)


# ---------------------------------------------------------------------------------------------------------
# The augmentation
# ---------------------------------------------------------------------------------------------------------


def _check(x: Tensor, target: Tensor, params: Mapping[str, Tensor], draws: Draws, settings: AugmentSettings) -> None:
    image = [op for op in settings.ops if op in IMAGE_OPS]
    if image and x.ndim != 4:
        raise ValueError(f"ops {image} need images (N, C, H, W); got inputs of shape {tuple(x.shape)}. Use the "
                         "generic ops (mix, erase, noise) for other inputs.")
    if "erase" in settings.ops and x.ndim < 2:
        raise ValueError(f"erase needs inputs with a feature dimension; got shape {tuple(x.shape)}.")
    missing = [n for n in settings.names if n not in params]
    if missing:
        raise ValueError(f"params lack the tables {missing}; expected {list(settings.names)} (see initial_params).")
    shapes = {n: tuple(params[n].shape) for n in settings.names}
    if len(set(shapes.values())) != 1 or len(shapes[settings.names[0]]) != 2:
        raise ValueError(f"params must be (G, K) tables of one shape; got shapes {shapes}.")
    lacking = [op for op in settings.ops if getattr(draws, op) is None] + (["gates"] if settings.gated and (
        draws.gates is None or draws.gates.shape[-1] != len(settings.gated)) else [])
    if lacking:
        raise ValueError(f"draws lack {lacking}; make them with draw() for these settings.")
    sizes = {name: t.shape[0] for name, t in zip(Draws._fields, draws) if t is not None}
    if any(n != x.shape[0] for n in sizes.values()) or (draws.noise is not None and draws.noise.shape != x.shape):
        raise ValueError(f"draws were made for another batch (sizes {sizes}); inputs have shape {tuple(x.shape)}.")
    if target.shape[0] != x.shape[0]:
        raise ValueError(f"target has {target.shape[0]} labels for {x.shape[0]} inputs.")


def augment(x: Tensor, target: Tensor, group: Tensor | None, params: Mapping[str, Tensor], draws: Draws,
            settings: AugmentSettings) -> Tensor:
    """The batch ``x`` augmented with the strengths of each sample's cell; differentiable in ``params``.

    Args:
        x: the inputs, ``(N, ...)``; images ``(N, C, H, W)`` for ``flip`` and ``shift``.
        target: labels ``(N,)``; group: group indices ``(N,)`` or ``None`` (then the tables have one row; tables
            of one row apply to every group).
        params: the free ``(G, K)`` tables by name (:attr:`AugmentSettings.names`).
        draws: from :func:`draw` for these settings and this batch (fixed: the result is a function of them).
        settings: the ops and their constants.

    Example:
        >>> s = AugmentSettings(ops="flip+shift+noise", gated="noise")
        >>> x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        >>> augment(x, y, None, initial_params(s, num_classes=10), draw(s, x.shape, 0), s).shape
        torch.Size([8, 3, 32, 32])
    """
    _check(x, target, params, draws, settings)
    rows, num_classes = params[settings.names[0]].shape
    if group is None and rows != 1:
        raise ValueError(f"The tables have {rows} group rows, so a group index is needed for every sample.")
    cells = target if group is None or rows == 1 else cell_index(group, target, num_classes)  # 1 row: every group
    free = {name: params[name].to(x.device).reshape(-1)[cells].to(x.dtype) for name in settings.names}
    value = {name: settings.limit(name) * torch.sigmoid(a) for name, a in free.items()}
    d = draws.to(x.device)
    for op in settings.ops:
        if op == "mix":
            new = x + _col(value["mix"] * d.mix[:, 1].to(x.dtype), x) * (x[partners(cells, d.mix[:, 0])] - x)
        elif op == "flip":
            new = gate(x, x.flip(-1), free["flip"], d.flip, settings.temperature, settings.straight_through)
        elif op == "shift":
            new = translate(x, value["shift"][:, None] * d.shift.to(x.dtype), settings.padding)
        elif op == "erase":
            new = erase(x, value["erase"], d.erase, settings.edge)
        else:
            new = x + _col(value["noise"], x) * d.noise.to(x.dtype)
        if op in settings.gated:
            j = settings.gated.index(op)
            new = gate(x, new, free[f"p_{op}"], d.gates[:, j], settings.temperature, settings.straight_through)
        x = new
    return x


# ---------------------------------------------------------------------------------------------------------
# The hypergradient through the inputs
# ---------------------------------------------------------------------------------------------------------

Loss = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def input_mixed_term(fmodel: FunctionalModel, params: Tree, batch: Batch, direction: Tree, phi: Mapping[str, Tensor],
                     draws: Draws, settings: AugmentSettings, loss: Loss, input_grad: Tensor | None = None) -> Tree:
    """The gradient in ``phi`` of ``<grad_theta L(theta; A(x; phi, xi)), direction>`` (``d^2 L / d phi d theta``
    applied to ``direction``), by a difference along ``direction``.

    ``batch.inputs`` are the clean inputs ``x``. ``A`` runs once; ordinary backward passes at ``theta +- h direction``
    (``h`` scaled as for the logits difference) give input gradients whose central difference is sent back through
    ``A`` to ``phi``. With ``input_grad``, the gradient of the same loss in the augmented inputs at ``theta`` (e.g.
    kept from the training step's backward pass), a forward difference needs one pass only. ``loss(logits, target,
    group)`` is the training loss (a mean), run in float32 or wider with autocast off.
    """
    return input_passes(fmodel, params, batch, direction, phi, draws, settings, loss, input_grad).grad


class InputPasses(NamedTuple):
    """What the passes of :func:`input_passes` give: the mixed term in ``phi`` and, from the same forward passes,
    the logits on the augmented inputs and their product ``J direction`` (a difference of logits)."""

    grad: Tree
    logits: Tensor | None  # None for a forward difference on a batch without its logits
    tangent: Tensor | None


def input_passes(fmodel: FunctionalModel, params: Tree, batch: Batch, direction: Tree, phi: Mapping[str, Tensor],
                 draws: Draws, settings: AugmentSettings, loss: Loss, input_grad: Tensor | None = None) -> InputPasses:
    """:func:`input_mixed_term` with what its forward passes give on the way: the logits ``f`` at ``theta`` on the
    augmented inputs (``batch.logits`` when given, else the mean of the two passes) and ``u = J direction``, the
    difference of the logits of the passes (central; forward from ``batch.logits`` with ``input_grad``), so that the
    loss parameters' mixed term (:func:`~lightning_autobalance.core.problem.mixed_term`) needs no pass of its own."""
    h, zero = difference_step(params, direction, central=input_grad is None)
    device = fmodel.device
    leaf = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
        x_aug = augment(batch.inputs, batch.target, batch.group, leaf, draws, settings)
        input_grads, outputs = [], []
        for sign in (1.0,) if input_grad is not None else (1.0, -1.0):
            x_in = x_aug.detach().requires_grad_(True)
            with from_state(batch.rng_state, device):
                logits = fmodel(axpy(sign * h, direction, params), x_in)
                out = loss(logits, batch.target, batch.group)
            input_grads.append(torch.autograd.grad(out, x_in)[0])
            outputs.append(logits.detach())
        if input_grad is None:
            diff = (input_grads[0] - input_grads[1]) / (2.0 * h).to(x_aug.dtype)
        else:
            diff = (input_grads[0] - input_grad.to(x_aug.dtype)) / h.to(x_aug.dtype)
        diff = torch.where(zero, torch.zeros_like(diff), diff)
        grads = torch.autograd.grad(x_aug, list(leaf.values()), grad_outputs=diff, allow_unused=True)
    wide = wide_dtype(outputs[0].dtype)
    if len(outputs) == 2:
        plus, minus = outputs[0].to(wide), outputs[1].to(wide)
        f, u = (plus + minus) / 2.0 if batch.logits is None else batch.logits, (plus - minus) / (2.0 * h).to(wide)
    elif batch.logits is not None:
        f, u = batch.logits, (outputs[0].to(wide) - batch.logits.to(wide)) / h.to(wide)
    else:  # a forward difference without the logits at theta: no product
        return InputPasses(_filled(leaf, grads), None, None)
    return InputPasses(_filled(leaf, grads), f, torch.where(zero, torch.zeros_like(u), u))


def _filled(leaf: Mapping[str, Tensor], grads: Sequence[Tensor | None]) -> Tree:
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaf.items(), grads)}


def input_hypergradient(problem: Problem, direction: Tree, phi: Mapping[str, Tensor], batches: Sequence[Batch],
                        draws: Sequence[Draws], settings: AugmentSettings,
                        input_grads: Sequence[Tensor] | None = None) -> Tree:
    """The augmentation's hypergradient ``-d^2 L_train / d phi d theta . direction``, averaged over the training
    batches (clean inputs, with the draws their augmented twins in ``problem.train_batches`` were made with) and
    reduced over processes with ``problem.reduce``. ``input_grads``: per batch, see :func:`input_mixed_term`."""
    grads_in = list(input_grads) if input_grads is not None else [None] * len(batches)
    if not batches or not len(batches) == len(draws) == len(grads_in):
        raise ValueError(f"input_hypergradient needs one Draws (and input gradient, if any) per batch; got "
                         f"{len(batches)} batches, {len(draws)} draws and {len(grads_in)} input gradients.")

    def loss(f: Tensor, t: Tensor, g: Tensor | None) -> Tensor:
        return problem.train_loss(f, t, g, problem.tables)

    total: Tree | None = None
    for batch, d, gx in zip(batches, draws, grads_in):
        m = input_mixed_term(problem.fmodel, problem.params, batch, direction, phi, d, settings, loss, gx)
        total = m if total is None else axpy(1.0, m, total)
    assert total is not None
    return reduce_tree(scale(-1.0 / len(batches), total), problem.reduce)
