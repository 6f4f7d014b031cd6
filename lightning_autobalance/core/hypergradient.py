"""Hypergradients of an upper objective with respect to the loss parameters ``alpha``.

With ``theta*(alpha) = argmin L_train(theta, alpha)`` and ``F(alpha) = L_upper(theta*(alpha))`` the implicit
function theorem gives

.. math::

    \\frac{dF}{d\\alpha} = -\\frac{\\partial^2 L_{train}}{\\partial\\alpha\\,\\partial\\theta}\\, p, \\qquad
    p = H^{-1} v, \\quad v = \\nabla_\\theta L_{upper}, \\quad H = \\nabla^2_\\theta L_{train}.

Methods (:mod:`.solvers`, chosen by an :class:`~lightning_autobalance.core.estimator.Estimator`):

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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_autobalance.core.augment_term import InputAugmentation
from lightning_autobalance.core.estimator import Estimator
from lightning_autobalance.core.linear_solve import Tree, conjugate_gradient, neumann_series
from lightning_autobalance.core.losses import LossTables
from lightning_autobalance.core.problem import (
    Batch,
    FunctionalModel,
    Objective,
    Problem,
    Reduce,
    TablesFn,
    TrainLoss,
    curvature_product,
    logits_product,
    mixed_term,
    upper_gradient,
    wide_dtype,
)
from lightning_autobalance.core.solvers import SOLVERS, Solution

# the pieces are re-exported: the one import a user of the functional core needs
__all__ = ["SOLVERS", "Batch", "Estimator", "FunctionalModel", "HypergradientResult", "InputAugmentation", "Problem",
           "Solution", "conjugate_gradient", "curvature_product", "hypergradient", "logits_product", "mixed_term",
           "neumann_series", "upper_gradient"]


@dataclass
class HypergradientResult:
    """What :func:`hypergradient` returns.

    Attributes:
        grad: ``dF/dalpha`` by name (same keys and dtypes as ``alpha``).
        objective: the upper objective's value on the upper batches (at ``theta``, or ``theta'`` for unroll).
        finite: whether every entry of ``grad`` is finite: a 0-dim bool tensor on the gradient's device, so that
            computing it reads nothing back to the host (``bool(result.finite)`` reads it).
        residual: for a method that solves to convergence (``"head"``: its Newton solve), how far from converged
            it stopped, relative (:class:`~lightning_autobalance.core.head.HeadResult`); ``None`` for the others.
    """

    grad: Tree
    objective: Tensor
    finite: Tensor
    residual: Tensor | None = None


# ---------------------------------------------------------------------------------------------------------
# The methods: how the direction p of the mixed term is found
# ---------------------------------------------------------------------------------------------------------


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
    augmentation: InputAugmentation | None = None,
    **settings: Any,
) -> HypergradientResult:
    """The gradient of the upper objective with respect to the loss parameters ``alpha`` (and, with
    ``augmentation``, with respect to a searched augmentation's free values).

    Args:
        model: the network (or a :class:`FunctionalModel` of it) at the current ``theta``.
        alpha: the free loss parameters by name (not modified).
        tables_fn: maps ``alpha`` to the loss tables, differentiably.
        train_loss: ``train_loss(logits, target, group, tables) -> scalar`` (a mean over the batch).
        objective: ``objective(logits, target, group) -> scalar`` on upper batches.
        train_batches: batches of the training loss (for the mixed term and curvature products).
        upper_batches: batches of the upper objective.
        estimator: the method and its settings (:class:`~lightning_autobalance.core.estimator.Estimator`; default: the
            one-step Neumann estimate). ``damping`` is added to the curvature for ``"cg"`` (and, as
            ``(1 - eta lambda)``, for Neumann); ``weight_decay`` ``mu`` stands for an L2 term ``mu/2 ||theta||^2``
            in the training objective: it adds ``mu I`` to the curvature and ``mu theta`` to the training gradient.
        reduce: averages a tensor over processes (identical call order on every process); ``None`` for one.
        forward: ``forward(module, inputs) -> logits`` when ``model`` is a module and not ``module(inputs)``.
        loss_scale: factor applied to losses before backward passes through the network and removed after (the
            gradient scaler's scale under float16 autocast).
        augmentation: a searched augmentation of the training batches
            (:class:`~lightning_autobalance.core.augment_term.InputAugmentation`): ``train_batches`` then hold the
            clean inputs (and, where given, the logits of their augmented twins), and the result's ``grad`` also
            holds the free values of ``augmentation.free``. ``alpha`` may then be empty. ``None`` (default): the
            loss parameters alone, at the cost described above.
        **settings: instead of ``estimator``, its fields by name (``method="cg", cg_iterations=20``).

    Returns:
        A :class:`HypergradientResult`.

    Example:
        >>> from lightning_autobalance.core.parametrization import PerClass
        >>> from lightning_autobalance.core.losses import adjusted_cross_entropy
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
    if not train_batches or not upper_batches:
        raise ValueError("hypergradient needs at least one training batch and one upper batch.")
    clean: Sequence[Batch] = ()
    if augmentation is not None:
        clash = sorted(set(alpha) & set(augmentation.free))
        if clash:
            raise ValueError(f"The augmentation's free values {clash} have the names of loss parameters; rename them.")
        clean, train_batches = train_batches, augmentation.augmented(train_batches)
    fmodel = model if isinstance(model, FunctionalModel) else FunctionalModel(model, forward)
    params = fmodel.params()
    with torch.no_grad():
        tables = LossTables(*(t.detach() for t in tables_fn({k: v.detach() for k, v in alpha.items()})))

    problem = Problem(fmodel, params, train_batches, upper_batches, tables, train_loss, objective, est, reduce,
                      loss_scale, alpha, tables_fn, augmentation, clean)
    solved = SOLVERS[est.method](problem)
    names = dict(alpha) if augmentation is None else {**alpha, **augmentation.free}
    grad = {k: solved.grad[k].to(wide_dtype(names[k].dtype)) for k in names}
    finite = torch.stack([torch.isfinite(t).all() for t in grad.values()]).all()
    return HypergradientResult(grad=grad, objective=solved.objective, finite=finite, residual=solved.residual)
