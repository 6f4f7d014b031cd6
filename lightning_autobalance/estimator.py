"""``Estimator``: how a hypergradient is estimated, as one value.

The same frozen dataclass configures :func:`~lightning_autobalance.hypergradient.hypergradient` and
:class:`~lightning_autobalance.AutoBalanceCallback` (its ``estimator`` argument), and reads from YAML as a nested
group (``estimator: {method: cg, cg_iterations: 10}``). It is validated here, once, at construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CURVATURES", "METHODS", "PRODUCTS", "Curvature", "Estimator", "Method", "ProductMode"]

Method = Literal["neumann", "cg", "unroll"]
Curvature = Literal["gauss_newton", "hessian"]
ProductMode = Literal["difference", "jvp", "auto"]
METHODS = ("neumann", "cg", "unroll")
CURVATURES = ("gauss_newton", "hessian")
PRODUCTS = ("difference", "jvp")


def _methods() -> tuple[str, ...]:
    """The method names: the built-in ones and any added to ``hypergradient.SOLVERS``."""
    from lightning_autobalance.hypergradient import SOLVERS  # the registry lives with the methods

    return tuple(SOLVERS)


@dataclass(frozen=True)
class Estimator:
    """The hypergradient estimate (see :mod:`lightning_autobalance.hypergradient` for the mathematics).

    Attributes:
        method: ``"neumann"`` (``p = eta sum_{j<=terms} (I - eta H)^j v``), ``"cg"`` (conjugate gradient on
            ``(H + damping I) p = v``) or ``"unroll"`` (the exact derivative of one virtual SGD step of size
            ``eta``); any name of :data:`lightning_autobalance.hypergradient.SOLVERS` (where a new method is added).
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
            it adds ``weight_decay * I`` to the curvature.

    Example:
        >>> Estimator()
        Estimator(method='neumann', eta=1.0, terms=0, damping=0.0, cg_iterations=5, curvature='gauss_newton', \
product='difference', weight_decay=0.0)
        >>> Estimator(method="cg", damping=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: damping must be >= 0; got -1.0.
    """

    method: str = "neumann"
    eta: float = 1.0
    terms: int = 0
    damping: float = 0.0
    cg_iterations: int = 5
    curvature: Curvature = "gauss_newton"
    product: ProductMode = "difference"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.product == "auto":
            object.__setattr__(self, "product", "difference")
        checks = [
            (self.method in _methods(), f"method must be one of {_methods()}; got {self.method!r}."),
            (self.curvature in CURVATURES, f"curvature must be one of {CURVATURES}; got {self.curvature!r}."),
            (self.product in PRODUCTS, f"product must be one of {PRODUCTS}; got {self.product!r}."),
            (self.eta > 0, f"eta must be positive; got {self.eta}."),
            (isinstance(self.terms, int) and self.terms >= 0,
             f"terms (Neumann terms beyond the first) must be >= 0; got {self.terms}."),
            (self.damping >= 0, f"damping must be >= 0; got {self.damping}."),
            (isinstance(self.cg_iterations, int) and self.cg_iterations >= 1,
             f"cg_iterations must be at least 1; got {self.cg_iterations}."),
            (self.weight_decay >= 0, f"weight_decay must be >= 0; got {self.weight_decay}."),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
