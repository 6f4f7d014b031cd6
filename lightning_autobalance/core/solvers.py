"""The hypergradient methods, one table: :data:`SOLVERS`, by :attr:`Estimator.method
<lightning_autobalance.core.estimator.Estimator.method>` name.

Every method maps a :class:`~lightning_autobalance.core.problem.Problem` to a :class:`Solution`: the hypergradient
``dF/dalpha`` by name of ``alpha`` and the upper objective's value. The implicit-function methods find a direction
``p`` approximating ``H^{-1} v`` (``v`` the upper gradient) and hand it to :func:`from_direction`, which forms
``-d^2 L_train / d alpha d theta . p`` through the loss head only:

* ``"neumann"``: ``p = eta * sum_{j=0..terms} (I - eta H)^j v``;
* ``"cg"``: conjugate gradient on ``(H + damping I) p = v``;
* ``"unroll"``: ``p = eta v`` with ``v`` taken at the virtual step ``theta' = theta - eta g``;
* ``"head"``: the classifier head solved to its equilibrium on recent features
  (:func:`~lightning_autobalance.core.head.head_hypergradient`): the hypergradient at that equilibrium.

A new method is a function ``solve(problem) -> Solution`` and an entry in :data:`SOLVERS`
(:class:`~lightning_autobalance.core.estimator.Estimator` accepts every name of the table).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_autobalance.core.augment_term import direction_term, head_input_term
from lightning_autobalance.core.head import FeatureMemory, find_head, head_hypergradient, head_input, head_parameters
from lightning_autobalance.core.linear_solve import Tree, axpy, conjugate_gradient, neumann_series, scale
from lightning_autobalance.core.problem import Problem, logits_product, mixed_term, reduce_tree
from lightning_autobalance.core.random_state import from_state

__all__ = ["SOLVERS", "Solution", "from_direction", "head_solver"]


class Solution(NamedTuple):
    """What every method returns: ``grad`` (``dF/dalpha`` by name of ``alpha``, in the dtype the method computed it;
    :func:`~lightning_autobalance.core.hypergradient.hypergradient` widens it), the upper ``objective``, and, for a
    method that solves something to convergence, its relative ``residual`` (``None`` for the others)."""

    grad: Tree
    objective: Tensor
    residual: Tensor | None = None


def from_direction(problem: Problem, p: Tree, objective: Tensor) -> Solution:
    """The hypergradient ``-d^2 L_train / d alpha d theta . p`` for a direction ``p`` in the weights: per training
    batch the logits product ``J p`` and the mixed term through the loss head, averaged over the batches and reduced
    over processes (no double backward through the network). With a searched augmentation
    (``problem.augmentation``) also in its free values, through the inputs
    (:func:`~lightning_autobalance.core.augment_term.direction_term`)."""
    if problem.augmentation is not None:
        return Solution(direction_term(problem, p), objective)
    grad: Tree | None = None
    for batch in problem.train_batches:
        logits, u = logits_product(problem.fmodel, problem.params, batch, p, problem.estimator.product)
        m = mixed_term(logits, u, batch.target, batch.group, problem.alpha, problem.tables_fn, problem.train_loss)
        grad = m if grad is None else axpy(1.0, m, grad)
    assert grad is not None
    return Solution(reduce_tree(scale(-1.0 / len(problem.train_batches), grad), problem.reduce), objective)


def neumann(problem: Problem) -> Solution:
    """``p`` by the Neumann series of the damped curvature (``eta``, ``terms``, ``damping``)."""
    est = problem.estimator
    v, value = problem.upper_gradient()
    return from_direction(problem, neumann_series(lambda x: problem.curvature(x, est.damping), v, est.eta, est.terms),
                          value)


def cg(problem: Problem) -> Solution:
    """``p`` by conjugate gradient on the damped curvature (``cg_iterations``, ``damping``)."""
    est = problem.estimator
    v, value = problem.upper_gradient()
    return from_direction(problem, conjugate_gradient(problem.curvature, v, est.cg_iterations, est.damping), value)


def unroll(problem: Problem) -> Solution:
    """The exact derivative of one virtual training step: ``p = eta v(theta - eta g)``."""
    eta = problem.estimator.eta
    v, value = problem.upper_gradient(axpy(-eta, problem.train_gradient(), problem.params))
    return from_direction(problem, scale(eta, v), value)


def _features(problem: Problem, head: nn.Linear, batch: Any) -> Tensor:
    """The input of ``head`` on ``batch`` at the current weights (one forward pass, no gradient)."""
    with torch.no_grad(), from_state(batch.rng_state, problem.fmodel.device):
        return head_input(head, lambda: problem.fmodel(problem.params, batch.inputs), detach=True)


def head_solver(problem: Problem) -> Solution:
    """The ``"head"`` entry of :data:`~lightning_autobalance.core.hypergradient.SOLVERS`.

    Finds the head (:func:`find_head`, or ``Estimator.head``), reads the features of the problem's training and
    upper batches, adds them to the :class:`FeatureMemory` buffers kept on the functional model (``head_memory``
    of ``Estimator``: rows kept; ``0`` keeps only the current batches), and returns :func:`head_hypergradient`
    from the network's current head (or, when the feature width is unchanged, the previous equilibrium: a warm
    start, so that a few Newton steps suffice).
    """
    est = problem.estimator
    module = problem.fmodel.module
    name = find_head(module, getattr(est, "head", None))
    head = dict(module.named_modules())[name]
    prefix = f"{name}." if name else ""
    w, b = problem.params.get(prefix + "weight"), problem.params.get(prefix + "bias")
    if w is None:
        raise ValueError(f"The head {name!r} has no trainable weight; the 'head' method searches through it.")
    memory = problem.fmodel.memory.setdefault("head", {})
    kept = int(getattr(est, "head_memory", 0))
    sides = {}
    for side, batches in (("train", problem.train_batches), ("upper", problem.upper_batches)):
        # the current batches' rows plus, with head_memory > 0, the newest rows kept from earlier hyper steps
        if kept:
            mem = memory.get(side)
            if mem is None or mem.capacity != kept:
                mem = memory[side] = FeatureMemory(kept)
        else:
            mem = FeatureMemory(sum(b.target.shape[0] for b in batches))
        for batch in batches:
            mem.add(_features(problem, head, batch), batch.target, batch.group)
        sides[side] = (mem.features, mem.target, mem.group)
    train, upper = sides["train"], sides["upper"]
    assert train[0] is not None and upper[0] is not None
    current = head_parameters(w, b)
    previous = memory.get("theta")
    start = previous if previous is not None and previous.shape == current.shape else current
    result = head_hypergradient(
        *train, *upper, problem.alpha, problem.tables_fn, problem.train_loss, problem.objective, start,
        num_classes=w.shape[0], bias=b is not None, weight_decay=est.weight_decay, damping=est.damping,
        steps=int(getattr(est, "head_steps", 10)), cg_iterations=est.cg_iterations * 10, reduce=problem.reduce)
    memory["theta"] = result.theta
    grad = result.grad
    if problem.augmentation is not None:  # the current training rows are the last of the memory's
        assert result.direction is not None
        grad = {**grad, **head_input_term(problem, head, *train, result.theta, result.direction, w.shape[0],
                                          b is not None)}
    return Solution(grad, result.objective, result.residual)


#: The hypergradient methods by name. Adding an entry is all a new method needs.
SOLVERS: dict[str, Callable[[Problem], Solution]] = {"neumann": neumann, "cg": cg, "unroll": unroll,
                                                     "head": head_solver}
