"""The hypergradient when searched augmentation parameters touch the inputs (DESIGN.md section 13).

The loss parameters ``alpha`` touch only the logits, so their mixed term ``d^2 L_train / d alpha d theta . p`` goes
through the loss head (:func:`~lightning_autobalance.core.problem.mixed_term`). The augmentation's free values
``phi`` touch the inputs, ``x' = A(x; phi, xi)`` with the random draws ``xi`` held fixed, so theirs goes through the
network's derivative in its inputs: the gradient in ``phi`` of ``<grad_theta L_train(theta; x'(phi)), p>``, taken
by a central difference along ``p`` of two ordinary backward passes that reach the inputs
(:func:`~lightning_autobalance.core.augment.input_passes`). Those two passes also give the logits product ``J p``
on the augmented inputs, so the loss parameters' term costs no pass of its own (:func:`direction_term`).

:class:`InputAugmentation` is what :func:`~lightning_autobalance.core.hypergradient.hypergradient` takes beside the
loss parameters; with it, every method of :data:`~lightning_autobalance.core.solvers.SOLVERS` returns the
hypergradient in both. Without it nothing here runs, and the default path keeps its cost. Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_autobalance.core.augment import AugmentSettings, Draws, augment, input_passes
from lightning_autobalance.core.head import HeadProblem, augment_features, head_input
from lightning_autobalance.core.linear_solve import Tree, axpy, scale
from lightning_autobalance.core.losses import LossTables
from lightning_autobalance.core.problem import Batch, Problem, logits_product, mixed_term, reduce_tree, wide_dtype
from lightning_autobalance.core.random_state import from_state

__all__ = ["InputAugmentation", "direction_term", "head_input_term"]

AugmentTablesFn = Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]


@dataclass(frozen=True)
class InputAugmentation:
    """The searched augmentation of the training batches, as the hypergradient needs it.

    With it, :func:`~lightning_autobalance.core.hypergradient.hypergradient` takes the training batches' inputs as
    the *clean* inputs ``x``, makes the network's inputs ``A(x; phi, xi)`` from them (with ``draws``: those the
    training step used, so that its recorded logits still apply) and returns the hypergradient in ``free`` beside
    that in the loss parameters.

    Attributes:
        free: the free values ``phi`` by name (not modified); no name may be one of the loss parameters'.
        settings: the ops and their constants.
        draws: one :class:`~lightning_autobalance.core.augment.Draws` per training batch, in their order.
        tables_fn: maps ``free`` to the ``(G, K)`` tables of :func:`~lightning_autobalance.core.augment.augment`,
            differentiably (e.g. :meth:`~lightning_autobalance.core.augment_parametrization.AugmentParameters.tables`);
            ``None``: ``free`` are those tables.

    Example:
        >>> from lightning_autobalance.core.augment import draw, initial_params
        >>> s = AugmentSettings(ops="noise")
        >>> aug = InputAugmentation(initial_params(s, num_classes=3), s, [draw(s, (4, 5), 0)])
        >>> aug.augmented([Batch(torch.zeros(4, 5), torch.tensor([0, 1, 2, 0]))])[0].inputs.abs().sum() > 0
        tensor(True)
    """

    free: Mapping[str, Tensor]
    settings: AugmentSettings
    draws: Sequence[Draws]
    tables_fn: AugmentTablesFn | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.settings, AugmentSettings):
            raise ValueError(f"InputAugmentation.settings must be an AugmentSettings; got "
                             f"{type(self.settings).__name__}.")
        if not self.free:
            raise ValueError("InputAugmentation.free is empty: nothing of the augmentation is searched.")
        if not self.draws or not all(isinstance(d, Draws) for d in self.draws):
            raise ValueError("InputAugmentation.draws must hold one Draws (core.augment.draw) per training batch.")

    def tables(self, free: Mapping[str, Tensor] | None = None) -> Mapping[str, Tensor]:
        """The ``(G, K)`` tables for ``free`` (default: the stored ones)."""
        free = self.free if free is None else free
        return free if self.tables_fn is None else self.tables_fn(free)

    def augmented(self, batches: Sequence[Batch]) -> list[Batch]:
        """The batches as the network sees them: inputs ``A(x; phi, xi)`` (detached), the rest as they are."""
        if len(batches) != len(self.draws):
            raise ValueError(f"InputAugmentation has {len(self.draws)} draws for {len(batches)} training batches; "
                             "give one per batch, in their order.")
        with torch.no_grad():
            tables = {k: v.detach() for k, v in self.tables().items()}
            return [b._replace(inputs=augment(b.inputs, b.target, b.group, tables, d, self.settings).detach())
                    for b, d in zip(batches, self.draws)]

    def chain(self, table_grads: Mapping[str, Tensor]) -> Tree:
        """Gradients in the tables sent back to the free values (one vector-Jacobian product of ``tables_fn``)."""
        if self.tables_fn is None:
            return dict(table_grads)
        with torch.enable_grad():
            leaf = {k: v.detach().to(wide_dtype(v.dtype)).requires_grad_(True) for k, v in self.free.items()}
            tables = self.tables(leaf)
            names = list(tables)
            grads = torch.autograd.grad([tables[n] for n in names], list(leaf.values()),
                                        [table_grads[n].to(tables[n]) for n in names], allow_unused=True)
        return {k: torch.zeros_like(v) if g is None else g.detach() for (k, v), g in zip(leaf.items(), grads)}


def _table_leaves(aug: InputAugmentation) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in aug.tables().items()}


def _low_precision(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) in (
        torch.float16, torch.bfloat16)


def direction_term(problem: Problem, p: Tree) -> Tree:
    """``-d^2 L_train / d (alpha, phi) d theta . p``, averaged over the training batches and reduced over processes
    in one call: for ``phi`` through the inputs, for ``alpha`` through the loss head on the logits product that the
    same passes give (or a ``jvp`` with ``Estimator(product="jvp")``). Two forward and backward passes per batch."""
    aug: InputAugmentation = problem.augmentation
    clean = problem.clean_batches
    tables = _table_leaves(aug)
    fmodel, device = problem.fmodel, problem.fmodel.device

    def loss(f: Tensor, t: Tensor, g: Tensor | None) -> Tensor:
        return problem.train_loss(f, t, g, problem.tables)

    total: Tree | None = None
    for batch, plain, draws in zip(problem.train_batches, clean, aug.draws):
        cached = None if _low_precision(device) else batch.logits
        passes = input_passes(fmodel, problem.params, plain._replace(logits=cached), p, tables, draws, aug.settings,
                              loss)
        term = dict(passes.grad)
        if problem.alpha:
            logits, u = passes.logits, passes.tangent
            if problem.estimator.product == "jvp":
                logits, u = logits_product(fmodel, problem.params, batch, p, "jvp")
            term.update(mixed_term(logits, u, batch.target, batch.group, problem.alpha, problem.tables_fn,
                                   problem.train_loss))
        total = term if total is None else axpy(1.0, term, total)
    assert total is not None
    total = reduce_tree(scale(-1.0 / len(problem.train_batches), total), problem.reduce)
    out = {k: total[k] for k in (problem.alpha or {})}
    out.update(aug.chain({k: total[k] for k in tables}))
    return out


def head_input_term(problem: Problem, head: nn.Module, features: Tensor, target: Tensor, group: Tensor | None,
                    theta: Tensor, direction: Tensor, num_classes: int, bias: bool) -> Tree:
    """The ``"head"`` method's hypergradient in ``phi``: ``-d^2 L_head / d phi d theta . p`` at the head's equilibrium
    ``theta`` (flat, ``K`` rows ``(w_k, b_k)``) for its direction ``p = (H + mu I)^{-1} v``, reduced over processes.

    ``features`` are the rows the head's problem was solved on, the current training batches' the last of them
    (:class:`~lightning_autobalance.core.head.FeatureMemory` appends them), which alone depend on ``phi`` (earlier
    rows were made with earlier values). The gradient of ``<grad_theta L_head, p>`` in those rows (on the head, in
    closed form by autograd) is sent back through the network's features of the augmented inputs to ``phi``: one
    forward and backward pass per training batch.
    """
    aug: InputAugmentation = problem.augmentation
    clean = problem.clean_batches
    wide = torch.promote_types(features.dtype, torch.float32)
    with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
        rows = features.detach().to(wide).requires_grad_(True)
        tables = LossTables(*(t.detach().to(wide) for t in problem.tables))
        hp = HeadProblem(augment_features(rows, bias), target, group, tables, problem.train_loss, 0.0,
                         num_classes, None)
        th = theta.detach().to(wide).requires_grad_(True)
        (g,) = torch.autograd.grad(hp.data_loss(th), th, create_graph=True)
        (cotangent,) = torch.autograd.grad((g * direction.detach().to(wide)).sum(), rows)
    sizes = [b.target.shape[0] for b in clean]
    n, kept = sum(sizes), min(sum(sizes), rows.shape[0])
    current = cotangent[rows.shape[0] - kept:]
    current = torch.cat([current.new_zeros(n - kept, current.shape[1]), current])  # rows no longer kept: none
    with torch.enable_grad():
        leaf = {k: v.detach().to(wide_dtype(v.dtype)).requires_grad_(True) for k, v in _table_leaves(aug).items()}
        total: Tree = {k: torch.zeros_like(v) for k, v in leaf.items()}
        for batch, draws, c in zip(clean, aug.draws, torch.split(current, sizes)):
            with from_state(batch.rng_state, problem.fmodel.device):
                x_aug = augment(batch.inputs, batch.target, batch.group, leaf, draws, aug.settings)
                feats = head_input(head, lambda x=x_aug: problem.fmodel(problem.params, x))
            grads = torch.autograd.grad(feats, list(leaf.values()), c.to(feats.dtype), allow_unused=True)
            total = {k: total[k] if gr is None else total[k] + gr for k, gr in zip(leaf, grads)}
    return aug.chain(scale(-1.0, reduce_tree(total, problem.reduce)))
