"""``Estimator``: how a hypergradient is estimated, as one value.

The same frozen dataclass configures :func:`~lightning_autobalance.core.hypergradient.hypergradient` and
:class:`~lightning_autobalance.AutoBalanceCallback` (its ``estimator`` argument), and reads from YAML as a nested
group (``estimator: {method: cg, cg_iterations: 10}``). It is validated here, once, at construction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn

from lightning_autobalance.core.coerce import coerce_value, raise_first
from lightning_autobalance.core.head import optimizer_head_weight_decay
from lightning_autobalance.core.problem import CURVATURES, PRODUCTS, Curvature, ProductMode
from lightning_autobalance.core.solvers import SOLVERS

__all__ = ["CURVATURES", "PRODUCTS", "SOLVERS", "Curvature", "Estimator", "ProductMode", "with_head_weight_decay"]


@dataclass(frozen=True)
class Estimator:
    """The hypergradient estimate (see :mod:`lightning_autobalance.core.hypergradient` for the mathematics).

    Attributes:
        method: ``"neumann"`` (``p = eta sum_{j<=terms} (I - eta H)^j v``), ``"cg"`` (conjugate gradient on
            ``(H + damping I) p = v``) or ``"unroll"`` (the exact derivative of one virtual SGD step of size
            ``eta``), ``"head"`` (the implicit hypergradient of the classifier head solved to its equilibrium on
            recent features, :mod:`lightning_autobalance.core.head`: the response of the trained head, not of one step);
            any name of :data:`lightning_autobalance.core.solvers.SOLVERS` (where a new method is added).
        eta: the Neumann step / virtual SGD step, ``> 0``.
        terms: Neumann terms beyond the first, ``>= 0`` (``0``: the one-step hypergradient; the paper uses 5
            with ``eta=1``).
        damping: added to the curvature, ``>= 0``.
        cg_iterations: conjugate-gradient iterations, ``>= 1``.
        curvature: ``"gauss_newton"`` (positive semi-definite) or ``"hessian"``.
        product: how the logits product ``J p`` is formed: ``"difference"`` (a difference of logits along ``p``
            that reuses the training step's forward pass) or ``"jvp"`` (forward mode, exact). ``"auto"`` is read as
            ``"difference"``.
        weight_decay: the L2 coefficient of the training objective (the model optimizer's weight decay), ``>= 0``:
            it adds ``weight_decay * I`` to the curvature. ``"head"`` needs it ``> 0``; under
            :class:`~lightning_autobalance.AutoBalanceCallback`, ``0`` (the default) means the weight decay the model
            optimizer applies to the head, read at the start of the fit.
        head: ``"head"`` method and the held-back check: the name of the ``nn.Linear`` layer producing the logits
            (``None``: the callback watches a forward pass at setup for the layer whose output the logits are,
            :func:`~lightning_autobalance.core.head.watch_head`; used as given, nothing watched).
        head_memory: ``"head"`` method: feature rows of recent training (and upper) batches kept to solve the
            head's equilibrium on (``0``: the current batches only).
        head_steps: ``"head"`` method: Newton steps per hyper step (warm-started from the previous equilibrium).

    Example:
        >>> Estimator()
        Estimator(method='neumann', eta=1.0, terms=0, damping=0.0, cg_iterations=5, curvature='gauss_newton', \
product='difference', weight_decay=0.0, head=None, head_memory=2048, head_steps=10)
        >>> Estimator(method="cg", damping=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: damping must be >= 0; got -1.0.
        >>> Estimator.coerce({"method": "cg", "cg_iterations": 10}).cg_iterations
        10
    """

    method: str = "neumann"
    eta: float = 1.0
    terms: int = 0
    damping: float = 0.0
    cg_iterations: int = 5
    curvature: Curvature = "gauss_newton"
    product: ProductMode = "difference"
    weight_decay: float = 0.0
    head: str | None = None
    head_memory: int = 2048
    head_steps: int = 10

    def __post_init__(self) -> None:
        if self.product == "auto":
            object.__setattr__(self, "product", "difference")
        raise_first([
            (self.method in SOLVERS, f"method must be one of {tuple(SOLVERS)}; got {self.method!r}."),
            (self.curvature in CURVATURES, f"curvature must be one of {CURVATURES}; got {self.curvature!r}."),
            (self.product in PRODUCTS, f"product must be one of {PRODUCTS}; got {self.product!r}."),
            (self.eta > 0, f"eta must be positive; got {self.eta}."),
            (isinstance(self.terms, int) and self.terms >= 0,
             f"terms (Neumann terms beyond the first) must be >= 0; got {self.terms}."),
            (self.damping >= 0, f"damping must be >= 0; got {self.damping}."),
            (isinstance(self.cg_iterations, int) and self.cg_iterations >= 1,
             f"cg_iterations must be at least 1; got {self.cg_iterations}."),
            (self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay}."),
            (isinstance(self.head_memory, int) and self.head_memory >= 0,
             f"head_memory (feature rows kept) must be >= 0; got {self.head_memory}."),
            (isinstance(self.head_steps, int) and self.head_steps >= 1,
             f"head_steps (Newton steps) must be at least 1; got {self.head_steps}."),
        ])

    @classmethod
    def coerce(cls, value: Any) -> Estimator:
        """An :class:`Estimator` from itself, ``None`` (the default), or a mapping of its fields (a YAML group, a
        Hydra ``DictConfig``, a jsonargparse dict), validated alike; ``ValueError`` for another type, a key that is not
        a field, or a bad setting."""
        return coerce_value(cls, value, "estimator", (f.name for f in fields(cls)))


def with_head_weight_decay(estimator: Estimator, module: nn.Module,
                           param_groups: Iterable[dict[str, Any]]) -> tuple[Estimator, str | None]:
    """For the ``"head"`` method, ``estimator`` with the head's weight decay read from the model optimizer when it
    gives none (``weight_decay=0``), and a warning when the one it gives differs from the optimizer's (the head's
    equilibrium is then not the one training approaches). Other methods are returned unchanged.

    Raises:
        ValueError: when the ``"head"`` method has no weight decay from either: the head's equilibrium would not
            exist. Called before any training time is spent.
    """
    if estimator.method != "head":
        return estimator, None
    name, found = optimizer_head_weight_decay(module, param_groups, estimator.head)
    if estimator.weight_decay:
        if found is not None and found != estimator.weight_decay:
            return estimator, (f"Estimator(method='head', weight_decay={estimator.weight_decay}) differs from the "
                               f"weight decay {found} that the model optimizer applies to the head {name!r}: the "
                               "hypergradient is taken at an equilibrium training does not approach."
                               + (" Leave weight_decay unset (0) to use the optimizer's." if found else ""))
        return estimator, None
    if not found:
        where = "holds no parameter group with it" if found is None else "gives it weight_decay 0"
        raise ValueError(f"Estimator(method='head') needs weight decay on the classifier head {name!r} (it makes the "
                         f"head's equilibrium exist), and the model optimizer {where}: give the optimizer "
                         "weight_decay > 0 for the head, or set Estimator(weight_decay=...).")
    return replace(estimator, weight_decay=found), None
