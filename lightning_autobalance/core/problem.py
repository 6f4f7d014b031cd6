"""The pieces every hypergradient method is built from, on a network seen as a function of its weights.

* :class:`Batch`: a batch with its recorded logits and random state;
* :class:`FunctionalModel`: the logits as a function of the weights (``torch.func.functional_call`` on copies of the
  buffers, so BatchNorm running statistics are left untouched);
* :func:`upper_gradient`, :func:`train_gradient`, :func:`curvature_product` (Gauss-Newton or Hessian): the linear
  pieces, each reduced over processes by the optional ``reduce``;
* :func:`logits_product` (``J p`` by jvp or a difference of logits) and :func:`mixed_term` (the loss head's part
  of ``d^2 L_train / d alpha d theta``): the structure that makes the mixed term cheap;
* :class:`Problem`: all of it for one hyper step, as a method (:mod:`.solvers`) sees it.

Nothing here knows about Lightning.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_autobalance.core.linear_solve import Tree, axpy, norm, scale
from lightning_autobalance.core.losses import LossTables
from lightning_autobalance.core.random_state import from_state

__all__ = ["CURVATURES", "PRODUCTS", "Batch", "Curvature", "FunctionalModel", "Problem", "ProductMode",
           "curvature_product", "difference_step", "logits_product", "mixed_term", "reduce_tree", "train_gradient",
           "upper_gradient", "wide_dtype"]

Curvature = Literal["gauss_newton", "hessian"]
ProductMode = Literal["difference", "jvp", "auto"]
CURVATURES = ("gauss_newton", "hessian")
PRODUCTS = ("difference", "jvp")

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



def reduce_tree(tree: Tree, reduce: Reduce | None) -> Tree:
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


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def difference_step(params: Tree, direction: Tree, central: bool) -> tuple[Tensor, Tensor]:
    """The step ``h`` of a difference along ``direction`` (scaled to the norms of both) and whether the direction
    is zero, as device tensors: computing them reads nothing back to the host. A non-finite direction gives a
    non-finite ``h`` or a zero one (its product is then non-finite too, and the hyper step is skipped)."""
    dtype = next(iter(params.values())).dtype
    eps = torch.finfo(wide_dtype(dtype)).eps
    rel = eps ** (1.0 / 3.0) if central else math.sqrt(eps)
    pn, dn = norm(params), norm(direction)
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
    h, zero = difference_step(params, direction, central=cached is None)
    wide = wide_dtype(params[fmodel.names[0]].dtype)
    with torch.no_grad(), _no_autocast(device) if low else contextlib.nullcontext():
        with _rng(batch.rng_state, device):
            plus = fmodel(axpy(h.to(wide), direction, params), batch.inputs).to(wide)
        if cached is None:
            with _rng(batch.rng_state, device):
                minus = fmodel(axpy(-h.to(wide), direction, params), batch.inputs).to(wide)
            logits, u = (plus + minus) / 2.0, (plus - minus) / (2.0 * h)
        else:
            logits, u = cached, (plus - cached.to(wide)) / h
        return logits, torch.where(zero, torch.zeros_like(u), u)


# ---------------------------------------------------------------------------------------------------------
# The pieces
# ---------------------------------------------------------------------------------------------------------


def _leaf_alpha(alpha: Mapping[str, Tensor]) -> Tree:
    return {k: v.detach().to(wide_dtype(v.dtype)).requires_grad_(True) for k, v in alpha.items()}


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
        dtype = wide_dtype(tables.delta.dtype)
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
        total = g if total is None else axpy(1.0, g, total)
        value = value + out.detach().double()
    assert total is not None
    n = float(len(batches))
    total = reduce_tree(scale(1.0 / (n * loss_scale), total), reduce)
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
        total = g if total is None else axpy(1.0, g, total)
    assert total is not None
    return reduce_tree(scale(1.0 / (len(batches) * loss_scale), total), reduce)


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
                    z = logits.detach().to(wide_dtype(logits.dtype)).requires_grad_(True)
                    (gz,) = torch.autograd.grad(train_loss(z, batch.target, batch.group, tables), z,
                                                create_graph=True)
                    (r,) = torch.autograd.grad((gz * u.to(z.dtype)).sum(), z)
                _, vjp_fn = torch.func.vjp(f, params)
                (hv,) = vjp_fn((r * loss_scale).to(logits.dtype))
                hv = scale(1.0 / loss_scale, hv) if isinstance(loss_scale, Tensor) or loss_scale != 1.0 else hv
            else:
                raise ValueError(f"curvature must be one of {CURVATURES}; got {curvature!r}.")
        hv = {k: t.detach() for k, t in hv.items()}
        total = hv if total is None else axpy(1.0, hv, total)
    assert total is not None
    return reduce_tree(scale(1.0 / len(batches), total), reduce)



@dataclass(frozen=True)
class Problem:
    """What a hypergradient method sees: the model at ``theta``, the batches, the loss tables at ``alpha``, the two
    objectives and the :class:`~lightning_autobalance.core.estimator.Estimator` (typed ``Any`` here: the estimator
    imports this module, so it is not imported back)."""

    fmodel: FunctionalModel
    params: Tree
    train_batches: Sequence[Batch]
    upper_batches: Sequence[Batch]
    tables: LossTables
    train_loss: TrainLoss
    objective: Objective
    estimator: Any
    reduce: Reduce | None
    loss_scale: float
    alpha: Mapping[str, Tensor] | None = None
    tables_fn: TablesFn | None = None
    #: the searched augmentation (:class:`~lightning_autobalance.core.augment_term.InputAugmentation`, typed ``Any``:
    #: that module imports this one) or ``None``; with it ``train_batches`` hold the augmented inputs and
    #: ``clean_batches`` the same batches with the clean ones
    augmentation: Any = None
    clean_batches: Sequence[Batch] = ()

    def upper_gradient(self, params: Tree | None = None) -> tuple[Tree, Tensor]:
        """``v = grad_theta L_upper`` at ``params`` (default ``theta``) and the objective's value there."""
        return upper_gradient(self.fmodel, self.params if params is None else params, self.upper_batches,
                              self.objective, self.reduce, self.loss_scale)

    def train_gradient(self) -> Tree:
        """``grad_theta L_train`` at ``theta``, with the estimator's ``weight_decay`` term."""
        g = train_gradient(self.fmodel, self.params, self.train_batches, self.tables, self.train_loss, self.reduce,
                           self.loss_scale)
        wd = self.estimator.weight_decay
        return axpy(wd, self.params, g) if wd else g

    def curvature(self, vec: Tree, shift: float = 0.0) -> Tree:
        """``(H + (weight_decay + shift) I) vec`` with the estimator's curvature."""
        hv = curvature_product(self.fmodel, self.params, self.train_batches, self.tables, self.train_loss, vec,
                               self.estimator.curvature, self.reduce, self.loss_scale)
        total = self.estimator.weight_decay + shift
        return axpy(total, vec, hv) if total else hv
