"""The implicit hypergradient of the classifier head at its equilibrium (the ``"head"`` method).

A one-step hypergradient on a young model answers "which loss helps the model at its next step"; early in training that
means "push the under-fit tail", whatever the end of training needs (short-horizon bias). This method answers a longer
question exactly, for the part of the network the loss acts on most directly: **if the last linear layer were trained to
convergence on the current features, how would the upper objective move with the loss parameters?**

With the features ``x_i`` of the training samples held fixed (rows of ``X``, a buffer of recent training
batches) and the head ``theta = (W, b)`` (``K x d`` plus ``K``), the head's training problem

.. math::

    \\theta^*(\\alpha) = \\arg\\min_\\theta\\; L_{train}(X W^\\top + b; \\alpha)
    + \\tfrac{\\lambda}{2}\\|\\theta\\|^2

is strongly convex for the adjusted cross-entropy under weight decay ``lambda > 0``. Its solution is found by
Newton's method; then, by the implicit function theorem,

.. math::

    \\frac{d\\,U(\\theta^*(\\alpha))}{d\\alpha} = -\\frac{\\partial^2 L_{train}}{\\partial\\alpha\\,\\partial\\theta}
    \\Big|_{\\theta^*} (H + \\mu I)^{-1}\\, \\nabla_\\theta U(\\theta^*), \\qquad
    H = \\nabla^2_\\theta L_{train}(\\theta^*) + \\lambda I,

with ``U`` the upper objective on the features of upper batches and ``mu`` the estimator's ``damping``. For
``K (d + 1)`` up to ``dense_limit`` parameters (650 for a ResNet-32 head on CIFAR-10) the Hessian is formed and
solved densely; beyond, the Newton steps and the final solve use conjugate gradient with Hessian-vector products.
Everything is exact for the head: the only approximations are the frozen features and the finite Newton budget.

Cost: no backward pass through the network at all. A hyper step runs one forward pass (no gradient) on each
training and upper batch to read their features, and the rest is arithmetic on ``(N, d)`` matrices.

Nothing here knows about Lightning. Both users of the equilibrium build on this module: the ``"head"`` method
(:func:`lightning_autobalance.core.solvers.head_solver`) and the held-back check
(:mod:`lightning_autobalance.lightning.check`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_autobalance.core.linear_solve import conjugate_gradient
from lightning_autobalance.core.losses import LossTables

__all__ = ["FeatureMemory", "HeadProblem", "HeadResult", "WatchedHead", "augment_features", "find_head",
           "head_hypergradient", "head_input", "head_parameters", "head_weight_decay", "optimizer_head_weight_decay",
           "solve_head", "watch_head"]

TrainLoss = Callable[[Tensor, Tensor, "Tensor | None", LossTables], Tensor]
Objective = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
Reduce = Callable[[Tensor], Tensor]

#: the most entries of the per-sample logit Hessians (N x K x K) formed at once; beyond, Hessian-vector products
_BLOCKS_LIMIT = 2 ** 24

#: step sizes tried along each Newton direction (all at once, so that choosing one reads nothing to the host)
_STEPS = (*(2.0 ** -j for j in range(12)), 0.0)


@dataclass(frozen=True)
class WatchedHead:
    """What one forward pass told of the layer that makes the logits (:func:`watch_head`).

    Attributes:
        name: the qualified name of the submodule whose output the logits are, or ``None`` when it cannot be told.
        layer: that submodule (``None`` with ``name``).
        why: why it cannot be told (``None`` when it can).
    """

    name: str | None
    layer: nn.Module | None = None
    why: str | None = None

    @property
    def linear(self) -> bool:
        """Whether the layer that makes the logits is an ``nn.Linear`` (a head the check and ``"head"`` can use)."""
        return isinstance(self.layer, nn.Linear)


def _record(records: list[tuple[str, nn.Module, Tensor]], name: str, layer: nn.Module, _args: Any,
            output: Any) -> None:
    if isinstance(output, Tensor):
        records.append((name, layer, output))


def watch_head(module: nn.Module, run: Callable[[], Any]) -> WatchedHead:
    """The layer that makes the logits, found by watching one forward pass rather than by registration order.

    Every submodule of ``module`` (not ``module`` itself) is watched while ``run()`` computes the logits (e.g.
    ``lambda: net(x)``; the caller chooses the mode, the gradient and the random state). The head is the innermost
    submodule whose output *is* the tensor returned (a container passing its child's output on resolves to the
    child); when the logits are computed after the last layer (``log_softmax(fc(x))``, ``fc(x) / T``), the one
    submodule whose outputs have the logits' shape. Several such submodules, or none, and it cannot be told.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> watch_head(net, lambda: net(torch.randn(2, 4))).name
        '2'
        >>> watch_head(net, lambda: torch.log_softmax(net(torch.randn(2, 4)), 1)).name
        '2'
    """
    records: list[tuple[str, nn.Module, Tensor]] = []
    handles = [layer.register_forward_hook(functools.partial(_record, records, name))
               for name, layer in module.named_modules() if name]
    try:
        logits = run()
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        what = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        return WatchedHead(None, why=f"the forward pass returned {what}, not (N, K) logits")

    def producer(out: Tensor) -> tuple[str, nn.Module]:  # the innermost (first finished) submodule giving ``out``
        return next((name, layer) for name, layer, o in records if o is out)

    if any(o is logits for *_, o in records):
        return WatchedHead(*producer(logits))
    shaped = dict(producer(o) for *_, o in records if o.shape == logits.shape)
    if len(shaped) == 1:
        return WatchedHead(*next(iter(shaped.items())))
    why = ("no layer's output is the logits or has their shape" if not shaped else
           f"the logits are computed after the layers, and several give outputs of their shape {sorted(shaped)}")
    return WatchedHead(None, why=why)


def head_input(head: nn.Module, run: Callable[[], Any], detach: bool = False) -> Tensor:
    """The input of ``head`` while ``run()`` runs (one forward pass of the network), flattened to rows ``(N, d)``:
    with its graph, or detached with ``detach``. What the ``"head"`` method reads its features with.

    Raises:
        ValueError: the head ran other than once during ``run()``.
    """
    seen: list[Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach() if detach else args[0]))
    try:
        run()
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(f"The 'head' method expects the head layer to run once per forward pass; it ran {len(seen)} "
                         "times. Give Estimator(head='<layer name>') for the layer that produces the logits.")
    return seen[0].flatten(1)


def find_head(module: nn.Module, name: str | None = None) -> str:
    """The qualified name of the classifier head: ``name`` if given (checked), else the last ``nn.Linear``
    registered in ``module`` (for the networks of this package and most classifiers, the layer producing logits;
    :func:`watch_head` tells it from a forward pass, which the callback does before a fit and passes on as ``name``).

    Raises:
        ValueError: when ``name`` is not an ``nn.Linear`` of ``module`` or ``module`` has none.
    """
    modules = dict(module.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if name is not None:
        if not isinstance(modules.get(name), nn.Linear):
            raise ValueError(f"Estimator(head={name!r}) must name an nn.Linear layer of {type(module).__name__}; "
                             f"its nn.Linear layers are {linear}.")
        return name
    if not linear:
        raise ValueError(f"The 'head' method needs the network's last layer to be an nn.Linear (the classifier head); "
                         f"{type(module).__name__} has none. Give Estimator(head='<layer name>') or use another "
                         "method.")
    return linear[-1]


def head_weight_decay(param_groups: Iterable[dict[str, Any]], weight: Tensor) -> float | None:
    """The weight decay of the optimizer parameter group holding ``weight`` (``None`` when no group holds it)."""
    for group in param_groups:
        if any(p is weight for p in group.get("params", ())):
            return float(group.get("weight_decay", 0.0) or 0.0)
    return None


def optimizer_head_weight_decay(module: nn.Module, param_groups: Iterable[dict[str, Any]],
                                head: str | None = None) -> tuple[str, float | None]:
    """The head's name (:func:`find_head`) and the weight decay the optimizer applies to its weight
    (:func:`head_weight_decay`)."""
    name = find_head(module, head)
    return name, head_weight_decay(param_groups, dict(module.named_modules())[name].weight)


@dataclass
class FeatureMemory:
    """A ring buffer of recent features, labels and groups (device tensors), capped at ``capacity`` rows.

    The head method keeps one for training batches and one for upper batches, so that the head's equilibrium is
    solved on more samples than one batch holds (tail classes appear in it), without extra forward passes.
    """

    capacity: int
    features: Tensor | None = None
    target: Tensor | None = None
    group: Tensor | None = None

    def add(self, features: Tensor, target: Tensor, group: Tensor | None) -> None:
        """Appends rows, dropping the oldest beyond ``capacity``; a change of feature width restarts the buffer."""
        if self.features is not None and (self.features.shape[1:] != features.shape[1:]
                                          or (self.group is None) != (group is None)
                                          or self.features.device != features.device):
            self.features = self.target = self.group = None
        def cat(old: Tensor | None, new: Tensor) -> Tensor:
            return (new if old is None else torch.cat([old, new]))[-self.capacity:]

        self.features = cat(self.features, features.detach())
        self.target = cat(self.target, target.detach())
        self.group = None if group is None else cat(self.group, group.detach())


@dataclass
class HeadResult:
    """What :func:`head_hypergradient` returns.

    Attributes:
        grad: ``dU(theta*(alpha))/dalpha`` by name (float32 or wider).
        objective: the upper objective at the equilibrium head ``theta*``.
        theta: the equilibrium head, flat: ``K`` rows ``(w_k, b_k)`` (``w_k`` alone without a bias).
        grad_norm: the norm of the head's training gradient at ``theta`` (how well Newton converged), a device tensor.
        residual: ``grad_norm`` relative to ``lambda ||theta||`` (at the equilibrium the data gradient equals
            ``-lambda theta``): about the rounding error when Newton converged, ``1e-3`` and above when it stopped
            early (too few ``head_steps`` for a weak weight decay), a device tensor.
        direction: ``p = (H + mu I)^{-1} v`` at ``theta``, flat like it (what a mixed term in other free values,
            e.g. a searched augmentation's, is applied to).
    """

    grad: dict[str, Tensor]
    objective: Tensor
    theta: Tensor
    grad_norm: Tensor = field(repr=False)
    residual: Tensor = field(repr=False)
    direction: Tensor | None = field(default=None, repr=False)


def augment_features(features: Tensor, bias: bool) -> Tensor:
    """``[x, 1]`` rows when the head has a bias, else ``x``: the head is then ``logits = X_aug theta^T``."""
    return torch.cat([features, features.new_ones(features.shape[0], 1)], 1) if bias else features


def _mean(value: Tensor, reduce: Reduce | None) -> Tensor:
    return value if reduce is None else reduce(value.reshape(-1)).reshape(value.shape)


@dataclass(frozen=True)
class HeadProblem:
    """The head's training problem on fixed features. ``theta`` is flat, ``K`` rows of ``(w_k, b_k)``.

    The training loss must be a sum over samples of per-sample terms of the logits (any normalisation by a
    label-dependent constant is fine), as every loss of the family is: then its Hessian in the logits is block
    diagonal, ``A_i`` (``K x K``) per sample, and the head's Hessian is ``sum_i A_i (x) x_i x_i^T`` (``x_i`` with
    the bias's 1), formed from ``K`` Hessian-vector products in the logits and one contraction over samples.
    """

    features: Tensor  # (N, m): augmented with a column of ones when there is a bias
    target: Tensor
    group: Tensor | None
    tables: LossTables
    train_loss: TrainLoss
    weight_decay: float
    num_classes: int
    reduce: Reduce | None

    def logits(self, theta: Tensor) -> Tensor:
        return self.features @ theta.view(self.num_classes, -1).T

    def data_loss(self, theta: Tensor) -> Tensor:
        return self.train_loss(self.logits(theta), self.target, self.group, self.tables)

    def loss(self, theta: Tensor) -> Tensor:
        return _mean(self.data_loss(theta), self.reduce) + 0.5 * self.weight_decay * (theta * theta).sum()

    def _logit_grad(self, logits: Tensor) -> Tensor:
        return torch.func.grad(lambda f: self.train_loss(f, self.target, self.group, self.tables))(logits)

    def gradient(self, theta: Tensor) -> Tensor:
        g = (self._logit_grad(self.logits(theta)).T @ self.features).reshape(-1)
        return _mean(g, self.reduce) + self.weight_decay * theta

    def blocks(self, theta: Tensor) -> Tensor:
        """``A_i = d^2 loss / d f_i^2`` for every sample, ``(N, K, K)``: one logits-space Hessian-vector product
        per class (the direction ``e_k`` in every sample's logits)."""
        logits = self.logits(theta).detach()
        eye = torch.eye(self.num_classes, dtype=logits.dtype, device=logits.device)
        directions = eye.unsqueeze(1).expand(-1, logits.shape[0], -1)  # (K, N, K)

        def column(direction: Tensor) -> Tensor:
            return torch.func.jvp(self._logit_grad, (logits,), (direction,))[1]

        # (N, K, K): [i, b, a] = A_i[b, a]; contiguous, or the contractions with it run several times slower
        return torch.func.vmap(column)(directions).permute(1, 2, 0).contiguous()

    def hessian(self, theta: Tensor) -> Tensor:
        """``sum_i A_i (x) x_i x_i^T + lambda I``. Each ``A_i`` is symmetric (a Hessian), so only the class pairs
        ``a <= b`` are contracted, in one matrix product: block ``(b, a)`` is block ``(a, b)`` transposed."""
        x, k = self.features, self.num_classes
        n, m = x.shape
        rows, cols = torch.triu_indices(k, k, device=x.device)
        pairs = self.blocks(theta)[:, rows, cols]  # (N, P): A_i[a, b] for a <= b
        upper = ((pairs.unsqueeze(2) * x.unsqueeze(1)).reshape(n, -1).T @ x).reshape(-1, m, m)  # (P, m, m)
        h = x.new_empty(k, k, m, m)
        h[rows, cols] = upper
        h[cols, rows] = upper.transpose(1, 2)
        h = h.permute(0, 2, 1, 3).reshape(theta.numel(), theta.numel())  # [(a, c), (b, d)]
        return _mean(h, self.reduce) + self.weight_decay * torch.eye(theta.numel(), dtype=h.dtype, device=h.device)

    def hvp(self, theta: Tensor, vec: Tensor, blocks: Tensor | None = None) -> Tensor:
        """``H vec``: with ``blocks`` (:meth:`blocks`) by contraction, else by one Jacobian-vector product of the
        logits' gradient (memory ``O(N K)``, not the blocks' ``O(N K^2)``: the form for many classes)."""
        u = self.logits(vec)  # J vec: the logits are linear in theta
        if blocks is None:
            logits = self.logits(theta).detach()
            au = torch.func.jvp(self._logit_grad, (logits,), (u,))[1]
        else:
            au = torch.einsum("nab,nb->na", blocks, u)
        hv = (au.T @ self.features).reshape(-1)
        return _mean(hv, self.reduce) + self.weight_decay * vec


def _solve(problem: HeadProblem, theta: Tensor, rhs: Tensor, shift: float, dense_limit: int,
           cg_iterations: int) -> Tensor:
    """``(H(theta) + shift I)^{-1} rhs``: dense up to ``dense_limit`` parameters, else conjugate gradient."""
    if theta.numel() <= dense_limit:
        h = problem.hessian(theta)
        if shift:
            h = h + shift * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        return torch.linalg.solve_ex(h, rhs)[0]  # solve_ex: no check that syncs a CUDA device with the host
    # the per-sample blocks when they are small (reused by every iteration), else a product per iteration
    blocks = problem.blocks(theta) if problem.features.shape[0] * problem.num_classes ** 2 <= _BLOCKS_LIMIT else None

    solved = conjugate_gradient(lambda v: {"theta": problem.hvp(theta, v["theta"], blocks)}, {"theta": rhs},
                                cg_iterations, damping=shift)
    return solved["theta"]


def solve_head(problem: HeadProblem, theta: Tensor, steps: int, dense_limit: int = 4096,
               cg_iterations: int = 50) -> Tensor:
    """Newton's method on the head's strongly convex training problem, from ``theta``, for ``steps`` steps.

    Each step tries the step sizes ``1, 1/2, ..., 1/2048`` and ``0`` along the Newton direction at once (the logits are
    linear in ``theta``, so every candidate costs one cheap loss evaluation) and keeps the longest whose loss is the
    lowest up to rounding: the loss never increases beyond rounding, the full step converges quadratically to the
    solution once the losses can no longer tell the candidates apart, and nothing is read back to the host.
    """
    steps_t = torch.tensor(_STEPS, dtype=theta.dtype, device=theta.device)
    for _ in range(steps):
        direction = _solve(problem, theta, problem.gradient(theta), 0.0, dense_limit, cg_iterations)
        base, move = problem.logits(theta), problem.logits(direction)  # the logits are linear in theta
        data = torch.stack([problem.train_loss(base - t * move, problem.target, problem.group, problem.tables)
                            for t in _STEPS])
        cands = theta.unsqueeze(0) - steps_t.unsqueeze(1) * direction.unsqueeze(0)
        values_t = _mean(data, problem.reduce) + 0.5 * problem.weight_decay * (cands * cands).sum(1)
        values_t = torch.where(torch.isfinite(values_t), values_t, torch.full_like(values_t, float("inf")))
        # the longest step whose loss is the lowest up to rounding: near the solution the candidates' losses differ
        # by less than the rounding of the loss itself, and the full Newton step is what converges to it
        best = values_t.min()
        tie = values_t <= best + 8 * torch.finfo(values_t.dtype).eps * best.abs().clamp_min(1.0)
        theta = theta - steps_t[torch.argmax(tie.to(torch.int8))] * direction
    return theta


def head_hypergradient(features: Tensor, target: Tensor, group: Tensor | None, upper_features: Tensor,
                       upper_target: Tensor, upper_group: Tensor | None, alpha: Mapping[str, Tensor],
                       tables_fn: Callable[[Mapping[str, Tensor]], LossTables], train_loss: TrainLoss,
                       objective: Objective, theta: Tensor, num_classes: int, bias: bool, weight_decay: float,
                       damping: float = 0.0, steps: int = 10, dense_limit: int = 4096, cg_iterations: int = 50,
                       reduce: Reduce | None = None) -> HeadResult:
    """``dU(theta*(alpha))/dalpha`` for a linear head ``theta = (W, b)`` on fixed features (see the module text).

    Args:
        features, target, group: the training samples' features ``(N, d)``, labels and groups (or ``None``).
        upper_features, upper_target, upper_group: the same for the upper objective.
        alpha: the free loss parameters by name (not modified).
        tables_fn: maps ``alpha`` to the loss tables, differentiably.
        train_loss: ``train_loss(logits, target, group, tables) -> scalar``: a sum of per-sample terms (each
            loss of the family, any reduction), see :class:`HeadProblem`.
        objective: ``objective(logits, target, group) -> scalar`` on the upper samples.
        theta: the starting head, flat: ``K`` rows ``(w_k, b_k)`` (``w_k`` alone without a bias); e.g. the
            network's current head (:func:`head_parameters`).
        num_classes: ``K``, the rows of ``W``.
        bias: whether each row of ``theta`` ends with the class's bias.
        weight_decay: ``lambda > 0``, the L2 coefficient of the head's training problem (the model optimizer's
            weight decay): it makes the problem strongly convex, so that ``theta*`` exists.
        damping: ``mu >= 0`` added to the Hessian in the implicit solve only.
        steps: Newton steps from ``theta``.
        dense_limit: the largest head (``K (d + 1)`` parameters) whose Hessian is formed densely.
        cg_iterations: conjugate-gradient iterations per solve beyond ``dense_limit``.
        reduce: averages a tensor over processes (every rank's buffers the same size); ``None`` for one process.
    """
    if not weight_decay > 0:
        raise ValueError(f"The 'head' method needs weight_decay > 0 (the model optimizer's weight decay, which makes "
                         f"the head's equilibrium exist); got {weight_decay}. Set Estimator(weight_decay=...).")
    wide = torch.promote_types(features.dtype, torch.float32)
    with torch.no_grad():
        tables = LossTables(*(t.detach().to(wide) for t in tables_fn({k: v.detach() for k, v in alpha.items()})))
    problem = HeadProblem(augment_features(features.detach().to(wide), bias), target, group, tables, train_loss,
                           float(weight_decay), num_classes, reduce)
    # under a mixed-precision context the features were read in low precision; the head's problem is solved wide
    with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
        theta_star = solve_head(problem, theta.detach().to(wide), steps, dense_limit, cg_iterations)
        upper = HeadProblem(augment_features(upper_features.detach().to(wide), bias), upper_target, upper_group, tables,
                             train_loss, 0.0, num_classes, reduce)

        def upper_value(t: Tensor) -> Tensor:
            return objective(upper.logits(t), upper_target, upper_group)

        v, value = torch.func.grad_and_value(upper_value)(theta_star)
        v, value = _mean(v, reduce), _mean(value.detach(), reduce)
        p = _solve(problem, theta_star, v, float(damping), dense_limit, cg_iterations)
        grad = _mixed(problem, theta_star, p, alpha, tables_fn, train_loss)
        grad = {k: -_mean(g, reduce) for k, g in grad.items()}
        grad_norm = torch.linalg.vector_norm(problem.gradient(theta_star)).detach()
        scale = weight_decay * torch.linalg.vector_norm(theta_star).detach()
        residual = grad_norm / scale.clamp_min(torch.finfo(wide).tiny)
    return HeadResult(grad=grad, objective=value.detach(), theta=theta_star.detach(), grad_norm=grad_norm,
                      residual=residual, direction=p.detach())


def head_parameters(weight: Tensor, bias: Tensor | None) -> Tensor:
    """A linear head's parameters flat, in the layout of :func:`head_hypergradient`: ``K`` rows ``(w_k, b_k)``."""
    rows = weight.detach() if bias is None else torch.cat([weight.detach(), bias.detach().unsqueeze(1)], 1)
    return rows.reshape(-1)


def _mixed(problem: HeadProblem, theta: Tensor, p: Tensor, alpha: Mapping[str, Tensor],
           tables_fn: Callable[[Mapping[str, Tensor]], LossTables], train_loss: TrainLoss) -> dict[str, Tensor]:
    """``d^2 L_train / d alpha d theta . p``: the gradient in ``alpha`` of ``<d L_train/d f, J p>``."""
    if not alpha:  # nothing of the loss searched (a searched augmentation alone)
        return {}
    wide = {k: torch.promote_types(v.dtype, torch.float32) for k, v in alpha.items()}
    leaf = {k: v.detach().to(wide[k]).requires_grad_(True) for k, v in alpha.items()}
    tables = tables_fn(leaf)
    f = problem.logits(theta).detach().requires_grad_(True)
    u = problem.logits(p).detach()  # J p: the logits are linear in theta
    loss = train_loss(f, problem.target, problem.group, LossTables(*(t.to(f.dtype) for t in tables)))
    (grad_f,) = torch.autograd.grad(loss, f, create_graph=True)
    grads = torch.autograd.grad((grad_f * u).sum(), list(leaf.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaf.items(), grads)}
