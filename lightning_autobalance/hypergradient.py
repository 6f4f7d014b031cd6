"""Hypergradients of an upper objective with respect to the loss parameters ``alpha``.

With ``theta*(alpha) = argmin L_train(theta, alpha)`` and ``F(alpha) = L_upper(theta*(alpha))`` the implicit
function theorem gives

.. math::

    \\frac{dF}{d\\alpha} = -\\frac{\\partial^2 L_{train}}{\\partial\\alpha\\,\\partial\\theta}\\, p, \\qquad
    p = H^{-1} v, \\quad v = \\nabla_\\theta L_{upper}, \\quad H = \\nabla^2_\\theta L_{train}.

Methods (:func:`hypergradient`, chosen by an :class:`~lightning_autobalance.estimator.Estimator`):

* ``"neumann"``: ``p = eta * sum_{j=0..terms} (I - eta H)^j v`` (the paper's approximation). ``terms=0`` is the
  cheapest useful estimate, ``p = eta v``: the one-step unrolled hypergradient with ``v`` taken at ``theta``
  (first-order accurate in ``eta``).
* ``"cg"``: conjugate gradient on ``(H + damping I) p = v``.
* ``"unroll"``: the exact derivative of ``L_upper(theta - eta grad L_train(theta, alpha))``, i.e. ``v`` taken at
  the virtual step ``theta' = theta - eta g`` and ``p = eta v(theta')``.

``H`` is the exact Hessian (``curvature="hessian"``, forward-over-reverse) or the positive semi-definite
Gauss-Newton matrix ``J^T (d^2 loss / dz^2) J`` (``curvature="gauss_newton"``).

**The structure used.** ``alpha`` touches only the logits. With ``J_i`` the Jacobian of the logits ``f_i`` of
training sample ``i``, ``<grad_theta L_train, p> = mean_i <d loss_i/d f_i (f_i, alpha), J_i p>``. So the mixed
term needs one logits product ``u_i = J_i p`` (forward-mode ``jvp``, or a difference of logits along ``p``) and
then the gradient in ``alpha`` of ``mean_i <d loss_i / d f_i, u_i>``, which involves the loss head only
(:func:`mixed_term`): no double backward through the network.

All network passes use :func:`torch.func.functional_call` on the module given (never a DDP wrapper) with copies
of its buffers, so BatchNorm running statistics are left untouched. Nothing here knows about Lightning; the
optional ``reduce`` callable (e.g. a mean over processes) is applied to every linear piece: the upper gradient,
each curvature product, the training gradient and the final hypergradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_autobalance.estimator import CURVATURES, Curvature, Estimator, ProductMode
from lightning_autobalance.estimator import SOLVERS as _REGISTRY
from lightning_autobalance.head import head_solver
from lightning_autobalance.losses import LossTables
from lightning_autobalance.random_state import from_state

__all__ = [
    "SOLVERS",
    "Problem",
    "Batch",
    "Estimator",
    "FunctionalModel",
    "HypergradientResult",
    "conjugate_gradient",
    "curvature_product",
    "hypergradient",
    "logits_product",
    "mixed_term",
    "neumann_series",
    "upper_gradient",
]

Tree = dict[str, Tensor]
TrainLoss = Callable[[Tensor, Tensor, "Tensor | None", LossTables], Tensor]
Objective = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
TablesFn = Callable[[Mapping[str, Tensor]], LossTables]
Reduce = Callable[[Tensor], Tensor]


class Batch(NamedTuple):
    """One batch for the hypergradient.

    Attributes:
        inputs: what the forward function takes.
        target: labels ``(N,)``.
        group: group indices ``(N,)`` or ``None``.
        logits: the logits at the current ``theta`` if already computed (saves a forward pass).
        rng_state: the random state (``torch.get_rng_state()``, CUDA state or ``None``) under which ``logits``
            were computed; restored before any forward pass on this batch, so dropout masks agree.
    """

    inputs: Any
    target: Tensor
    group: Tensor | None = None
    logits: Tensor | None = None
    rng_state: tuple[Tensor, Tensor | None] | None = None


# ---------------------------------------------------------------------------------------------------------
# Small tree arithmetic (dicts of tensors with the same keys)
# ---------------------------------------------------------------------------------------------------------


def _axpy(a: float | Tensor, x: Tree, y: Tree) -> Tree:
    return {k: y[k] + a * x[k] for k in y}


def _scale(a: float | Tensor, x: Tree) -> Tree:
    return {k: a * v for k, v in x.items()}


def _dot(x: Tree, y: Tree) -> Tensor:
    return sum((x[k].double() * y[k].double()).sum() for k in x)  # type: ignore[return-value]


def _norm(x: Tree) -> Tensor:
    return _dot(x, x).sqrt()


def _reduce_tree(tree: Tree, reduce: Reduce | None) -> Tree:
    """Applies ``reduce`` once to all tensors of a tree flattened into one buffer (one collective call)."""
    if reduce is None or not tree:
        return tree
    keys = list(tree)
    flat = torch.cat([tree[k].reshape(-1) for k in keys])
    flat = reduce(flat)
    out, i = {}, 0
    for k in keys:
        n = tree[k].numel()
        out[k] = flat[i:i + n].view(tree[k].shape).to(tree[k].dtype)
        i += n
    return out


_rng = from_state  # the batch's recorded random state (dropout masks as in the training step's pass)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------------------------
# The network as a function of its parameters
# ---------------------------------------------------------------------------------------------------------


class _Call(nn.Module):
    def __init__(self, module: nn.Module, forward: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.module = module
        self.fn = forward

    def forward(self, inputs: Any) -> Tensor:
        return self.fn(self.module, inputs)


class FunctionalModel:
    """The logits of a module as a pure function of its trainable parameters.

    Buffers are cloned on every call, so BatchNorm in training mode uses batch statistics without touching the
    module's running statistics (and works under ``torch.func`` transforms). The module's mode (train/eval) is
    used as it is.

    Args:
        module: the (unwrapped) network or LightningModule.
        forward: ``forward(module, inputs) -> logits``; default ``module(inputs)``.
        exclude_buffers: prefixes of buffer names not to clone (e.g. the loss parameters).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> fm = FunctionalModel(net)
        >>> fm(fm.params(), torch.randn(4, 3)).shape
        torch.Size([4, 2])
    """

    def __init__(self, module: nn.Module, forward: Callable[[nn.Module, Any], Tensor] | None = None,
                 exclude_buffers: Sequence[str] = ("autobalance.",)) -> None:
        self.module = module
        self._call = _Call(module, forward or (lambda m, x: m(x)))
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        #: scratch space kept between calls for methods with memory (the ``"head"`` method's feature buffers)
        self.memory: dict[str, Any] = {}
        self._buffer_names = [n for n, _ in module.named_buffers() if not n.startswith(tuple(exclude_buffers))]
        if not self.names:
            raise ValueError(f"{type(module).__name__} has no trainable parameters to differentiate.")

    def params(self) -> Tree:
        """The current trainable parameters, detached (no copy)."""
        named = dict(self.module.named_parameters())
        return {n: named[n].detach() for n in self.names}

    def __call__(self, params: Mapping[str, Tensor], inputs: Any) -> Tensor:
        named = dict(self.module.named_buffers())
        state = {f"module.{n}": named[n].clone() for n in self._buffer_names}
        state.update({f"module.{n}": v for n, v in params.items()})
        return functional_call(self._call, state, (inputs,))

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _difference_step(params: Tree, direction: Tree, central: bool) -> tuple[Tensor, Tensor]:
    """The step ``h`` of a difference along ``direction`` (scaled to the norms of both) and whether the direction
    is zero, as device tensors: computing them reads nothing back to the host. A non-finite direction gives a
    non-finite ``h`` or a zero one (its product is then non-finite too, and the hyper step is skipped)."""
    dtype = next(iter(params.values())).dtype
    eps = torch.finfo(_wide(dtype)).eps
    rel = eps ** (1.0 / 3.0) if central else math.sqrt(eps)
    pn, dn = _norm(params), _norm(direction)
    zero = dn == 0.0
    h = rel * pn.clamp(min=1.0) / torch.where(zero, torch.ones_like(dn), dn)
    return h, zero


def logits_product(fmodel: FunctionalModel, params: Tree, batch: Batch, direction: Tree,
                   mode: ProductMode = "auto") -> tuple[Tensor, Tensor]:
    """Returns ``(f, u)``: the logits of a batch and the product ``u = J direction`` of their Jacobian.

    ``mode="jvp"`` uses forward-mode differentiation (exact, about 1.3 training steps for a CNN);
    ``mode="difference"`` a difference of logits along ``direction``: one extra forward pass when
    ``batch.logits`` (the logits at ``theta``) is given, else a central difference of two, whose mean also gives
    the logits (to second order in the step). The step is scaled to the norms of the parameters and the direction.
    Under a float16/bfloat16 autocast, where a difference of rounded logits would be noise, the difference is a
    central one with the two forward passes in float32 (autocast off). ``"auto"`` is read as ``"difference"``.
    """
    device = fmodel.device
    low = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) in (
        torch.float16, torch.bfloat16)
    if mode == "auto":
        mode = "difference"
    if mode == "jvp":
        def f(p: Tree) -> Tensor:
            return fmodel(p, batch.inputs)

        with _rng(batch.rng_state, device):
            logits, u = torch.func.jvp(f, (params,), ({k: direction[k].to(v) for k, v in params.items()},))
        return logits.detach(), u.detach()
    if mode != "difference":
        raise ValueError(f"mode must be 'auto', 'jvp' or 'difference'; got {mode!r}.")
    cached = None if low else batch.logits
    h, zero = _difference_step(params, direction, central=cached is None)
    wide = _wide(params[fmodel.names[0]].dtype)
    with torch.no_grad(), _no_autocast(device) if low else contextlib.nullcontext():
        with _rng(batch.rng_state, device):
            plus = fmodel(_axpy(h.to(wide), direction, params), batch.inputs).to(wide)
        if cached is None:
            with _rng(batch.rng_state, device):
                minus = fmodel(_axpy(-h.to(wide), direction, params), batch.inputs).to(wide)
            logits, u = (plus + minus) / 2.0, (plus - minus) / (2.0 * h)
        else:
            logits, u = cached, (plus - cached.to(wide)) / h
        return logits, torch.where(zero, torch.zeros_like(u), u)


# ---------------------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------------------


def _leaf_alpha(alpha: Mapping[str, Tensor]) -> Tree:
    return {k: v.detach().to(_wide(v.dtype)).requires_grad_(True) for k, v in alpha.items()}


def mixed_term(logits: Tensor, tangent: Tensor, target: Tensor, group: Tensor | None, alpha: Mapping[str, Tensor],
               tables_fn: TablesFn, train_loss: TrainLoss) -> Tree:
    """Gradient in ``alpha`` of ``<d L_train / d f, u>`` for fixed logits ``f`` and tangents ``u``.

    This is ``d^2 L_train / d alpha d theta`` applied to ``p`` when ``u = J p``: a derivative through the loss
    head only. Computed in float32 or wider, outside autocast.
    """
    device = logits.device
    with _no_autocast(device), torch.enable_grad():
        leaf = _leaf_alpha(alpha)
        tables = tables_fn(leaf)
        dtype = _wide(tables.delta.dtype)
        f = logits.detach().to(dtype).requires_grad_(True)
        loss = train_loss(f, target, group, tables)
        (grad_f,) = torch.autograd.grad(loss, f, create_graph=True)
        inner = (grad_f * tangent.to(dtype)).sum()
        grads = torch.autograd.grad(inner, list(leaf.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaf.items(), grads)}


def upper_gradient(fmodel: FunctionalModel, params: Tree, batches: Sequence[Batch], objective: Objective,
                   reduce: Reduce | None = None, loss_scale: float = 1.0) -> tuple[Tree, Tensor]:
    """``v = grad_theta L_upper`` averaged over the batches (and ``reduce``), with the objective's value.

    ``loss_scale`` multiplies the objective before the backward pass and divides the gradient after it (the
    gradient scaler's factor under float16 autocast, against underflow).
    """
    total: Tree | None = None
    value = torch.zeros((), dtype=torch.float64, device=fmodel.device)
    for batch in batches:
        leaf = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad(), _rng(batch.rng_state, fmodel.device):
            out = objective(fmodel(leaf, batch.inputs), batch.target, batch.group)
            if out.ndim != 0:
                raise ValueError(f"The upper objective must return a scalar; got shape {tuple(out.shape)}.")
            grads = torch.autograd.grad(out * loss_scale, list(leaf.values()), allow_unused=True)
        g = {k: torch.zeros_like(v) if gi is None else gi.detach() for (k, v), gi in zip(leaf.items(), grads)}
        total = g if total is None else _axpy(1.0, g, total)
        value = value + out.detach().double()
    assert total is not None
    n = float(len(batches))
    total = _reduce_tree(_scale(1.0 / (n * loss_scale), total), reduce)
    value = value / n
    if reduce is not None:
        value = reduce(value.reshape(1)).reshape(())
    return total, value


def _train_loss_of_params(fmodel: FunctionalModel, batch: Batch, tables: LossTables,
                          train_loss: TrainLoss) -> Callable[[Tree], Tensor]:
    def loss(p: Tree) -> Tensor:
        return train_loss(fmodel(p, batch.inputs), batch.target, batch.group, tables)

    return loss


def train_gradient(fmodel: FunctionalModel, params: Tree, batches: Sequence[Batch], tables: LossTables,
                   train_loss: TrainLoss, reduce: Reduce | None = None, loss_scale: float = 1.0) -> Tree:
    """``grad_theta L_train`` at fixed tables, averaged over the batches (and ``reduce``)."""
    total: Tree | None = None
    for batch in batches:
        leaf = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad(), _rng(batch.rng_state, fmodel.device):
            out = _train_loss_of_params(fmodel, batch, tables, train_loss)(leaf)
            grads = torch.autograd.grad(out * loss_scale, list(leaf.values()), allow_unused=True)
        g = {k: torch.zeros_like(v) if gi is None else gi for (k, v), gi in zip(leaf.items(), grads)}
        total = g if total is None else _axpy(1.0, g, total)
    assert total is not None
    return _reduce_tree(_scale(1.0 / (len(batches) * loss_scale), total), reduce)


def curvature_product(fmodel: FunctionalModel, params: Tree, batches: Sequence[Batch], tables: LossTables,
                      train_loss: TrainLoss, vector: Tree, curvature: Curvature = "gauss_newton",
                      reduce: Reduce | None = None, loss_scale: float = 1.0) -> Tree:
    """``H vector`` for the training loss at fixed tables, averaged over the batches (and ``reduce``).

    ``"hessian"``: the exact Hessian-vector product (forward-over-reverse). ``"gauss_newton"``:
    ``J^T (d^2 loss/d f^2) J vector`` (one ``jvp``, a head-only second derivative and one ``vjp``).
    """
    total: Tree | None = None
    vec = {k: vector[k].to(v) for k, v in params.items()}
    for batch in batches:
        with torch.enable_grad(), _rng(batch.rng_state, fmodel.device):
            if curvature == "hessian":
                loss = _train_loss_of_params(fmodel, batch, tables, train_loss)
                _, hv = torch.func.jvp(torch.func.grad(loss), (params,), (vec,))
            elif curvature == "gauss_newton":
                def f(p: Tree, b: Batch = batch) -> Tensor:
                    return fmodel(p, b.inputs)

                logits, u = torch.func.jvp(f, (params,), (vec,))
                with _no_autocast(logits.device):
                    z = logits.detach().to(_wide(logits.dtype)).requires_grad_(True)
                    (gz,) = torch.autograd.grad(train_loss(z, batch.target, batch.group, tables), z,
                                                create_graph=True)
                    (r,) = torch.autograd.grad((gz * u.to(z.dtype)).sum(), z)
                _, vjp_fn = torch.func.vjp(f, params)
                (hv,) = vjp_fn((r * loss_scale).to(logits.dtype))
                hv = _scale(1.0 / loss_scale, hv) if isinstance(loss_scale, Tensor) or loss_scale != 1.0 else hv
            else:
                raise ValueError(f"curvature must be one of {CURVATURES}; got {curvature!r}.")
        hv = {k: t.detach() for k, t in hv.items()}
        total = hv if total is None else _axpy(1.0, hv, total)
    assert total is not None
    return _reduce_tree(_scale(1.0 / len(batches), total), reduce)


def neumann_series(matvec: Callable[[Tree], Tree], v: Tree, eta: float, terms: int) -> Tree:
    """``eta * sum_{j=0..terms} (I - eta H)^j v``, an approximation of ``H^{-1} v`` (needs ``eta ||H|| < 2``)."""
    current, total = v, v
    for _ in range(terms):
        current = _axpy(-eta, matvec(current), current)
        total = _axpy(1.0, current, total)
    return _scale(eta, total)


def conjugate_gradient(matvec: Callable[[Tree], Tree], v: Tree, iterations: int, damping: float = 0.0,
                       tol: float = 1e-10) -> Tree:
    """Solves ``(H + damping I) p = v`` by conjugate gradient from ``p = 0`` (``H`` symmetric positive definite).

    Stops after ``iterations`` products, when the residual norm falls below ``tol * ||v||``, or when a direction
    of non-positive curvature appears (possible with an indefinite Hessian; add damping or use Gauss-Newton).
    Nothing is read back from the device: a stop is a flag on the device after which ``p`` keeps its value (the
    remaining products are still computed, so every process makes the same collective calls).
    """
    x = {k: torch.zeros_like(t) for k, t in v.items()}
    r = dict(v)
    d = dict(v)
    rr = _dot(r, r)
    stop = tol * tol * rr.clamp(min=1e-300)
    going = torch.ones((), dtype=torch.bool, device=rr.device)
    for _ in range(iterations):
        going = going & ~(rr <= stop)  # a NaN residual goes on (and makes p non-finite, as it should)
        hd = matvec(d)
        if damping:
            hd = _axpy(damping, d, hd)
        dhd = _dot(d, hd)
        going = going & ~(dhd <= 0.0)
        step = (rr / dhd).to(next(iter(v.values())).dtype)
        x = {k: torch.where(going, t, x[k]) for k, t in _axpy(step, d, x).items()}
        r = {k: torch.where(going, t, r[k]) for k, t in _axpy(-step, hd, r).items()}
        rr_new = torch.where(going, _dot(r, r), rr)
        d = {k: torch.where(going, t, d[k]) for k, t in _axpy((rr_new / rr).to(step.dtype), d, r).items()}
        rr = rr_new
    return x


@dataclass
class HypergradientResult:
    """What :func:`hypergradient` returns.

    Attributes:
        grad: ``dF/dalpha`` by name (same keys and dtypes as ``alpha``).
        objective: the upper objective's value on the upper batches (at ``theta``, or ``theta'`` for unroll).
        finite: whether every entry of ``grad`` is finite: a 0-dim bool tensor on the gradient's device, so that
            computing it reads nothing back to the host (``bool(result.finite)`` reads it).
    """

    grad: Tree
    objective: Tensor
    finite: Tensor


# ---------------------------------------------------------------------------------------------------------
# The methods: how the direction p of the mixed term is found
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """What a hypergradient method sees: the model at ``theta``, the batches, the loss tables at ``alpha``, the two
    objectives and the :class:`~lightning_autobalance.estimator.Estimator`."""

    fmodel: FunctionalModel
    params: Tree
    train_batches: Sequence[Batch]
    upper_batches: Sequence[Batch]
    tables: LossTables
    train_loss: TrainLoss
    objective: Objective
    estimator: Estimator
    reduce: Reduce | None
    loss_scale: float
    alpha: Mapping[str, Tensor] | None = None
    tables_fn: TablesFn | None = None

    def upper_gradient(self, params: Tree | None = None) -> tuple[Tree, Tensor]:
        """``v = grad_theta L_upper`` at ``params`` (default ``theta``) and the objective's value there."""
        return upper_gradient(self.fmodel, self.params if params is None else params, self.upper_batches,
                              self.objective, self.reduce, self.loss_scale)

    def train_gradient(self) -> Tree:
        """``grad_theta L_train`` at ``theta``, with the estimator's ``weight_decay`` term."""
        g = train_gradient(self.fmodel, self.params, self.train_batches, self.tables, self.train_loss, self.reduce,
                           self.loss_scale)
        wd = self.estimator.weight_decay
        return _axpy(wd, self.params, g) if wd else g

    def curvature(self, vec: Tree, shift: float = 0.0) -> Tree:
        """``(H + (weight_decay + shift) I) vec`` with the estimator's curvature."""
        hv = curvature_product(self.fmodel, self.params, self.train_batches, self.tables, self.train_loss, vec,
                               self.estimator.curvature, self.reduce, self.loss_scale)
        total = self.estimator.weight_decay + shift
        return _axpy(total, vec, hv) if total else hv


def _neumann(problem: Problem) -> tuple[Tree, Tensor]:
    est = problem.estimator
    v, value = problem.upper_gradient()
    return neumann_series(lambda x: problem.curvature(x, est.damping), v, est.eta, est.terms), value


def _cg(problem: Problem) -> tuple[Tree, Tensor]:
    est = problem.estimator
    v, value = problem.upper_gradient()
    return conjugate_gradient(problem.curvature, v, est.cg_iterations, est.damping), value


def _unroll(problem: Problem) -> tuple[Tree, Tensor]:
    eta = problem.estimator.eta
    v, value = problem.upper_gradient(_axpy(-eta, problem.train_gradient(), problem.params))
    return _scale(eta, v), value


#: The hypergradient methods by :attr:`Estimator.method <lightning_autobalance.estimator.Estimator.method>` name. A
#: method maps a :class:`Problem` to ``(p, objective value)``: ``p`` approximates ``H^{-1} v`` (``v`` the upper
#: gradient; for ``unroll`` it is ``eta v`` at the virtually stepped weights), and :func:`hypergradient` turns it
#: into ``-d^2 L_train / d alpha d theta . p``. A method may instead return the finished hypergradient, an object
#: with ``grad`` (by name of ``alpha``) and ``objective`` (``"head"``: :func:`~lightning_autobalance.head.head_solver`,
#: which differentiates at the head's equilibrium rather than at ``theta``). Adding an entry here is all a new
#: method needs (:class:`~lightning_autobalance.estimator.Estimator` accepts every name of this table).
SOLVERS: dict[str, Callable[[Problem], Any]] = _REGISTRY  # the dict Estimator checks names against
SOLVERS.update({"neumann": _neumann, "cg": _cg, "unroll": _unroll,
                                                "head": head_solver})


def hypergradient(
    model: nn.Module | FunctionalModel,
    alpha: Mapping[str, Tensor],
    tables_fn: TablesFn,
    train_loss: TrainLoss,
    objective: Objective,
    train_batches: Sequence[Batch],
    upper_batches: Sequence[Batch],
    estimator: Estimator | None = None,
    reduce: Reduce | None = None,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
    loss_scale: float = 1.0,
    **settings: Any,
) -> HypergradientResult:
    """The gradient of the upper objective with respect to the loss parameters ``alpha``.

    Args:
        model: the network (or a :class:`FunctionalModel` of it) at the current ``theta``.
        alpha: the free loss parameters by name (not modified).
        tables_fn: maps ``alpha`` to the loss tables, differentiably.
        train_loss: ``train_loss(logits, target, group, tables) -> scalar`` (a mean over the batch).
        objective: ``objective(logits, target, group) -> scalar`` on upper batches.
        train_batches: batches of the training loss (for the mixed term and curvature products).
        upper_batches: batches of the upper objective.
        estimator: the method and its settings (:class:`~lightning_autobalance.estimator.Estimator`; default: the
            one-step Neumann estimate). ``damping`` is added to the curvature for ``"cg"`` (and, as
            ``(1 - eta lambda)``, for Neumann); ``weight_decay`` ``mu`` stands for an L2 term ``mu/2 ||theta||^2``
            in the training objective: it adds ``mu I`` to the curvature and ``mu theta`` to the training gradient.
        reduce: averages a tensor over processes (identical call order on every process); ``None`` for one.
        forward: ``forward(module, inputs) -> logits`` when ``model`` is a module and not ``module(inputs)``.
        loss_scale: factor applied to losses before backward passes through the network and removed after (the
            gradient scaler's scale under float16 autocast).
        **settings: instead of ``estimator``, its fields by name (``method="cg", cg_iterations=20``).

    Returns:
        A :class:`HypergradientResult`.

    Example:
        >>> from lightning_autobalance.parametrization import PerClass
        >>> from lightning_autobalance.losses import adjusted_cross_entropy
        >>> net, loss = nn.Linear(4, 3), PerClass([50, 10, 2], preset="la")
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> res = hypergradient(net, loss.alpha(), loss.tables,
        ...                     lambda f, t, g, tab: adjusted_cross_entropy(f, t, *tab, group=g),
        ...                     lambda f, t, g: torch.nn.functional.cross_entropy(f, t),
        ...                     [Batch(x, y)], [Batch(x, y)], Estimator(method="unroll", eta=0.1))
        >>> sorted(res.grad)
        ['delta', 'offset']
    """
    if estimator is not None and settings:
        raise ValueError(f"hypergradient takes an estimator or its settings by name, not both; got {sorted(settings)} "
                         "beside an Estimator.")
    est = estimator if estimator is not None else Estimator(**settings)
    method, product = est.method, est.product
    if not train_batches or not upper_batches:
        raise ValueError("hypergradient needs at least one training batch and one upper batch.")
    fmodel = model if isinstance(model, FunctionalModel) else FunctionalModel(model, forward)
    params = fmodel.params()
    with torch.no_grad():
        tables = LossTables(*(t.detach() for t in tables_fn({k: v.detach() for k, v in alpha.items()})))

    problem = Problem(fmodel, params, train_batches, upper_batches, tables, train_loss, objective, est, reduce,
                      loss_scale, alpha, tables_fn)
    solved = SOLVERS[method](problem)
    if hasattr(solved, "grad"):  # the method returned the hypergradient itself
        grad = {k: solved.grad[k].to(_wide(alpha[k].dtype)) for k in alpha}
        finite = torch.stack([torch.isfinite(t).all() for t in grad.values()]).all()
        return HypergradientResult(grad=grad, objective=solved.objective, finite=finite)
    p, value = solved

    grad: Tree | None = None
    for batch in train_batches:
        logits, u = logits_product(fmodel, params, batch, p, product)
        m = mixed_term(logits, u, batch.target, batch.group, alpha, tables_fn, train_loss)
        grad = m if grad is None else _axpy(1.0, m, grad)
    assert grad is not None
    grad = _reduce_tree(_scale(-1.0 / len(train_batches), grad), reduce)
    grad = {k: grad[k].to(_wide(alpha[k].dtype)) for k in alpha}
    finite = torch.stack([torch.isfinite(t).all() for t in grad.values()]).all()
    return HypergradientResult(grad=grad, objective=value, finite=finite)
