"""Linear solves on trees (dicts of tensors with the same keys): ``H^{-1} v`` from products ``v -> H v``.

* :func:`neumann_series`: ``eta * sum_{j=0..terms} (I - eta H)^j v`` (the paper's approximation);
* :func:`conjugate_gradient`: ``(H + damping I) p = v`` for a symmetric positive definite ``H``.

Both take ``matvec`` as a plain callable, so they serve the network's curvature (:mod:`.problem`) and the head's
Hessian (:mod:`.head`) alike. Nothing is read back from the device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["Tree", "axpy", "conjugate_gradient", "dot", "neumann_series", "norm", "scale"]

Tree = dict[str, Tensor]

def axpy(a: float | Tensor, x: Tree, y: Tree) -> Tree:
    return {k: y[k] + a * x[k] for k in y}


def scale(a: float | Tensor, x: Tree) -> Tree:
    return {k: a * v for k, v in x.items()}


def dot(x: Tree, y: Tree) -> Tensor:
    return sum((x[k].double() * y[k].double()).sum() for k in x)  # type: ignore[return-value]


def norm(x: Tree) -> Tensor:
    return dot(x, x).sqrt()


def neumann_series(matvec: Callable[[Tree], Tree], v: Tree, eta: float, terms: int) -> Tree:
    """``eta * sum_{j=0..terms} (I - eta H)^j v``, an approximation of ``H^{-1} v`` (needs ``eta ||H|| < 2``)."""
    current, total = v, v
    for _ in range(terms):
        current = axpy(-eta, matvec(current), current)
        total = axpy(1.0, current, total)
    return scale(eta, total)


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
    rr = dot(r, r)
    stop = tol * tol * rr.clamp(min=1e-300)
    going = torch.ones((), dtype=torch.bool, device=rr.device)
    for _ in range(iterations):
        going = going & ~(rr <= stop)  # a NaN residual goes on (and makes p non-finite, as it should)
        hd = matvec(d)
        if damping:
            hd = axpy(damping, d, hd)
        dhd = dot(d, hd)
        going = going & ~(dhd <= 0.0)
        step = (rr / dhd).to(next(iter(v.values())).dtype)
        x = {k: torch.where(going, t, x[k]) for k, t in axpy(step, d, x).items()}
        r = {k: torch.where(going, t, r[k]) for k, t in axpy(-step, hd, r).items()}
        rr_new = torch.where(going, dot(r, r), rr)
        d = {k: torch.where(going, t, d[k]) for k, t in axpy((rr_new / rr).to(step.dtype), d, r).items()}
        rr = rr_new
    return x

