"""Hypergradients in float64 against independent references.

References: finite differences of the upper loss after an explicit SGD step (unroll), the exact implicit
hypergradient from a full Hessian solve at a converged solution of a strictly convex problem (Neumann, CG), finite
differences of the trained solution, and double backward through the network (the head-only mixed term).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import flat, unflatten
from torch import nn
from torch.func import functional_call

from lightning_autobalance.core.estimator import Estimator
from lightning_autobalance.core.hypergradient import (
    Batch,
    FunctionalModel,
    conjugate_gradient,
    curvature_product,
    hypergradient,
    logits_product,
    mixed_term,
    neumann_series,
)
from lightning_autobalance.core.losses import adjusted_cross_entropy
from lightning_autobalance.core.parametrization import Hierarchical, PerClass

pytestmark = [pytest.mark.usefixtures("float64"), pytest.mark.filterwarnings("ignore::FutureWarning")]




def train_loss(f, t, g, tables):
    return adjusted_cross_entropy(f, t, *tables, group=g, validate=False)


def balanced_ce(counts):
    w = 1.0 / torch.as_tensor(counts, dtype=torch.float64)
    w = w / w.mean()

    def objective(f, t, g):
        return (w[t] * F.cross_entropy(f, t, reduction="none")).mean()

    return objective


def make_data(n=60, d=4, k=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((c,), i) for i, c in enumerate([n // 2, n // 3, n - n // 2 - n // 3])])
    x = torch.randn(n, d, generator=gen) + 0.8 * F.one_hot(y, d)[:, :d].double() * 1.5
    return x, y


class TanhNet(nn.Module):
    def __init__(self, d=4, k=3, h=6):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, h), nn.Linear(h, k)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def loss_at(model, params, x, y, tables, mu=0.0):
    f = functional_call(model, params, (x,))
    reg = 0.5 * mu * sum((p ** 2).sum() for p in params.values())
    return train_loss(f, y, None, tables) + reg


@pytest.fixture()
def problem():
    torch.manual_seed(0)
    x, y = make_data()
    xu, yu = make_data(seed=1)
    param = PerClass([30, 20, 10], preset="la", search=("delta", "offset", "weight")).double()
    with torch.no_grad():
        for t in param.alpha().values():
            t.normal_(0, 0.2)
    return x, y, xu, yu, param


def alpha_fd(fun, alpha, h=1e-6):
    """Central finite differences of a scalar function of the alpha dict."""
    grads = {}
    for name, t in alpha.items():
        g = torch.zeros_like(t)
        for i in range(t.numel()):
            plus = {k: v.clone() for k, v in alpha.items()}
            minus = {k: v.clone() for k, v in alpha.items()}
            plus[name].view(-1)[i] += h
            minus[name].view(-1)[i] -= h
            g.view(-1)[i] = (fun(plus) - fun(minus)) / (2 * h)
        grads[name] = g
    return grads


def assert_tree_close(a, b, rtol, atol=1e-10):
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("kind", ["class", "hierarchical"])
@pytest.mark.parametrize("product", ["jvp", "difference"])
def test_unroll_matches_finite_difference_of_one_sgd_step(problem, product, kind):
    x, y, xu, yu, param = problem
    if kind == "hierarchical":  # shared scalars and per-class residuals: the chain rule through their tables
        param = Hierarchical([30, 20, 10], preset="la", search=("delta", "offset", "weight")).double()
        with torch.no_grad():
            for t in param.alpha().values():
                t.normal_(0, 0.2)
    net = TanhNet().double()
    eta = 0.3
    objective = balanced_ce([30, 20, 10])
    alpha = {k: v.clone() for k, v in param.alpha().items()}

    def upper_after_step(a):
        params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
        g = torch.autograd.grad(loss_at(net, params, x, y, param.tables(a)), list(params.values()))
        stepped = {k: p - eta * gi for (k, p), gi in zip(params.items(), g)}
        return objective(functional_call(net, stepped, (xu,)), yu, None).item()

    expected = alpha_fd(upper_after_step, alpha)
    res = hypergradient(net, alpha, param.tables, train_loss, objective, [Batch(x, y)], [Batch(xu, yu)],
                        method="unroll", eta=eta, product=product)
    assert res.finite and sorted(res.grad) == sorted(param.alpha())
    assert all(float(g.abs().max()) > 1e-6 for g in expected.values())  # every free value matters here
    assert_tree_close(res.grad, expected, rtol=1e-5)
    assert res.objective.item() == pytest.approx(upper_after_step(alpha), rel=1e-10)


def test_unroll_with_weight_decay_matches_finite_difference(problem):
    x, y, xu, yu, param = problem
    net, eta, mu = TanhNet().double(), 0.2, 0.05
    objective = balanced_ce([30, 20, 10])
    alpha = {k: v.clone() for k, v in param.alpha().items()}

    def upper_after_step(a):
        params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
        g = torch.autograd.grad(loss_at(net, params, x, y, param.tables(a), mu), list(params.values()))
        stepped = {k: p - eta * gi for (k, p), gi in zip(params.items(), g)}
        return objective(functional_call(net, stepped, (xu,)), yu, None).item()

    res = hypergradient(net, alpha, param.tables, train_loss, objective, [Batch(x, y)], [Batch(xu, yu)],
                        method="unroll", eta=eta, weight_decay=mu, product="jvp")
    assert_tree_close(res.grad, alpha_fd(upper_after_step, alpha), rtol=1e-5)


def solve(net, x, y, tables, mu, iters=60):
    """Newton's method in float64 with the full Hessian: the training minimiser theta*(alpha)."""
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    shapes = {k: v for k, v in params.items()}
    vec = flat(params)
    for _ in range(iters):
        def fun(v):
            return loss_at(net, unflatten(v, shapes), x, y, tables, mu)

        g = torch.autograd.functional.jacobian(fun, vec)
        if g.norm() < 1e-13:
            break
        h = torch.autograd.functional.hessian(fun, vec)
        vec = vec - torch.linalg.solve(h, g)
    return unflatten(vec, shapes)


@pytest.fixture()
def convex():
    """Multinomial logistic regression with an L2 term: strictly convex, solved to convergence."""
    x, y, xu, yu, param = (None,) * 5
    torch.manual_seed(1)
    x, y = make_data(n=45, seed=2)
    xu, yu = make_data(n=30, seed=3)
    param = PerClass([20, 15, 10], preset="vs", search=("delta", "offset", "weight")).double()
    with torch.no_grad():
        for t in param.alpha().values():
            t.normal_(0, 0.3)
    net = nn.Linear(4, 3).double()
    mu = 0.05
    with torch.no_grad():
        opt = solve(net, x, y, param.tables(), mu)
        for k, p in net.named_parameters():
            p.copy_(opt[k])
    return net, x, y, xu, yu, param, mu


def exact_implicit(net, x, y, xu, yu, param, mu, objective):
    """-(d2 L / d alpha d theta)^T H^{-1} v with explicit matrices."""
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    vec = flat(params)
    alpha = {k: v.clone() for k, v in param.alpha().items()}
    avec = flat(alpha)

    def grad_theta(v, a):
        p = unflatten(v, params)
        tables = param.tables(unflatten(a, alpha))
        return torch.autograd.grad(loss_at(net, p, x, y, tables, mu), list(p.values()), create_graph=True)

    def gvec(v, a):
        return torch.cat([g.reshape(-1) for g in grad_theta(v.requires_grad_(), a)])

    h = torch.autograd.functional.jacobian(lambda v: gvec(v, avec), vec)
    m = torch.autograd.functional.jacobian(lambda a: gvec(vec.clone(), a), avec)  # (P, A)
    v = torch.autograd.functional.jacobian(lambda t: objective(functional_call(net, unflatten(t, params), (xu,)), yu,
                                                               None), vec)
    return unflatten(-m.T @ torch.linalg.solve(h, v), alpha), h


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_neumann_and_cg_converge_to_exact_implicit_hypergradient(convex, curvature):
    net, x, y, xu, yu, param, mu = convex
    objective = balanced_ce([20, 15, 10])
    expected, h = exact_implicit(net, x, y, xu, yu, param, mu, objective)
    eta = 1.0 / torch.linalg.eigvalsh(h).max().item()
    alpha = {k: v.clone() for k, v in param.alpha().items()}
    common = dict(curvature=curvature, weight_decay=mu, product="jvp")
    neu = hypergradient(net, alpha, param.tables, train_loss, objective, [Batch(x, y)], [Batch(xu, yu)],
                        method="neumann", eta=eta, terms=3000, **common)
    cg = hypergradient(net, alpha, param.tables, train_loss, objective, [Batch(x, y)], [Batch(xu, yu)],
                       method="cg", cg_iterations=60, **common)
    assert_tree_close(neu.grad, expected, rtol=1e-6)
    assert_tree_close(cg.grad, expected, rtol=1e-7)
    # Few Neumann terms are visibly off: the test can tell a converged series from a truncated one.
    short = hypergradient(net, alpha, param.tables, train_loss, objective, [Batch(x, y)], [Batch(xu, yu)],
                          method="neumann", eta=eta, terms=2, **common)
    assert (flat(short.grad) - flat(expected)).norm() > 1e-3 * flat(expected).norm()


def test_implicit_hypergradient_matches_finite_differences_of_trained_solution(convex):
    net, x, y, xu, yu, param, mu = convex
    objective = balanced_ce([20, 15, 10])
    alpha = {k: v.clone() for k, v in param.alpha().items()}

    def trained_upper(a):
        opt = solve(net, x, y, param.tables(a), mu)
        return objective(functional_call(net, opt, (xu,)), yu, None).item()

    expected = alpha_fd(trained_upper, alpha, h=1e-5)
    cg = hypergradient(net, alpha, param.tables, train_loss, objective, [Batch(x, y)], [Batch(xu, yu)],
                       method="cg", cg_iterations=60, curvature="hessian", weight_decay=mu, product="difference")
    assert_tree_close(cg.grad, expected, rtol=1e-5, atol=1e-8)


def test_head_only_mixed_term_equals_double_backward(problem):
    x, y, _, _, param = problem
    net = TanhNet().double()
    fm = FunctionalModel(net)
    params = fm.params()
    gen = torch.Generator().manual_seed(5)
    p = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    alpha = {k: v.clone() for k, v in param.alpha().items()}
    f, u = logits_product(fm, params, Batch(x, y), p, mode="jvp")
    head = mixed_term(f, u, y, None, alpha, param.tables, train_loss)
    # Reference: d/d alpha <grad_theta L_train(theta, alpha), p> by double backward through the network.
    leaf_a = {k: v.clone().requires_grad_() for k, v in alpha.items()}
    leaf_p = {k: v.clone().requires_grad_() for k, v in params.items()}
    g = torch.autograd.grad(loss_at(net, leaf_p, x, y, param.tables(leaf_a)), list(leaf_p.values()),
                            create_graph=True)
    inner = sum((gi * p[k]).sum() for gi, k in zip(g, leaf_p))
    ref = dict(zip(leaf_a, torch.autograd.grad(inner, list(leaf_a.values()))))
    assert_tree_close(head, ref, rtol=1e-10)


def test_curvature_products_match_explicit_matrices(problem):
    x, y, _, _, param = problem
    net = TanhNet().double()
    fm = FunctionalModel(net)
    params = fm.params()
    tables = param.tables()
    vec = flat(params)
    gen = torch.Generator().manual_seed(3)
    p = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}

    def fun(v):
        return loss_at(net, unflatten(v, params), x, y, tables)

    hess = torch.autograd.functional.hessian(fun, vec)
    hv = curvature_product(fm, params, [Batch(x, y)], tables, train_loss, p, "hessian")
    torch.testing.assert_close(flat(hv), hess @ flat(p), rtol=1e-10, atol=1e-12)
    # Gauss-Newton: J^T Hz J with the per-sample logit Hessians written out.
    jac = torch.autograd.functional.jacobian(lambda v: functional_call(net, unflatten(v, params), (x,)), vec)
    f = functional_call(net, params, (x,))
    hz = torch.autograd.functional.hessian(lambda z: train_loss(z.view_as(f), y, None, tables), f.reshape(-1))
    gn = jac.reshape(-1, vec.numel()).T @ hz @ jac.reshape(-1, vec.numel())
    gv = curvature_product(fm, params, [Batch(x, y)], tables, train_loss, p, "gauss_newton")
    torch.testing.assert_close(flat(gv), gn @ flat(p), rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(gn).min() > -1e-10  # positive semi-definite
    assert not torch.allclose(gn, hess)  # the network is not linear: they differ


def test_solvers_on_an_explicit_matrix():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen)
    h = a @ a.T + 0.5 * torch.eye(6)
    b = torch.randn(6, generator=gen)
    exact = torch.linalg.solve(h, b)

    def mv(t):
        return {"x": h @ t["x"]}

    eta = 1.0 / torch.linalg.eigvalsh(h).max().item()
    neu = neumann_series(mv, {"x": b}, eta, 5000)["x"]
    cg = conjugate_gradient(mv, {"x": b}, 20)["x"]
    torch.testing.assert_close(neu, exact, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(cg, exact, rtol=1e-10, atol=1e-12)
    damped = conjugate_gradient(mv, {"x": b}, 20, damping=2.0)["x"]
    torch.testing.assert_close(damped, torch.linalg.solve(h + 2 * torch.eye(6), b), rtol=1e-10, atol=1e-12)


def test_difference_product_with_cached_logits_and_dropout_matches_jvp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double().train()
    x = torch.randn(10, 4)
    fm = FunctionalModel(net)
    params = fm.params()
    p = {k: torch.randn_like(v) for k, v in params.items()}
    state = (torch.get_rng_state(), None)
    cached = net(x).detach()  # the training step's own forward, dropout mask drawn from `state`
    after = torch.get_rng_state()
    f1, u1 = logits_product(fm, params, Batch(x, None, logits=cached, rng_state=state), p, mode="difference")
    f2, u2 = logits_product(fm, params, Batch(x, None, rng_state=state), p, mode="jvp")
    torch.testing.assert_close(f2, cached)
    assert f1 is cached  # the cached logits are reused, not recomputed
    torch.testing.assert_close(u1, u2, rtol=1e-6, atol=1e-8)
    assert torch.equal(torch.get_rng_state(), after)  # the surrounding random state is left as it was


def test_batchnorm_statistics_untouched_and_train_mode_used():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = make_data(n=20)
    param = PerClass([10, 6, 4], preset="la").double()
    res = hypergradient(net, param.alpha(), param.tables, train_loss, balanced_ce([10, 6, 4]), [Batch(x, y)],
                        [Batch(x, y)], method="neumann", terms=2, eta=0.1, curvature="hessian")
    assert res.finite
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_group_tables_and_reduce_hook():
    x, y = make_data(n=24)
    g = torch.arange(24) % 2
    param = PerClass([[6, 4, 2], [5, 4, 3]], preset="la", search=("offset", "weight")).double()
    net = TanhNet().double()
    calls = []

    def reduce(t):
        calls.append(t.numel())
        return t

    res = hypergradient(net, param.alpha(), param.tables, train_loss, balanced_ce([11, 8, 5]), [Batch(x, y, g)],
                        [Batch(x, y, g)], method="neumann", terms=1, eta=0.1, reduce=reduce)
    assert res.grad["offset"].shape == (2, 3)
    n_params = sum(p.numel() for p in net.parameters())
    # one call for v, one per curvature product, one for the objective value, one for the final gradient
    assert sorted(calls) == sorted([n_params, n_params, 1, 12])


def test_bad_settings_raise():
    x, y = make_data(n=12)
    param = PerClass([6, 4, 2])
    net = TanhNet().double()
    args = (net, param.alpha(), param.tables, train_loss, balanced_ce([6, 4, 2]), [Batch(x, y)], [Batch(x, y)])
    with pytest.raises(ValueError, match="eta must be positive"):
        hypergradient(*args, eta=0.0)
    with pytest.raises(ValueError, match=r"terms \(Neumann terms beyond the first\) must be >= 0"):
        hypergradient(*args, terms=-1)
    with pytest.raises(ValueError, match="method must be one of"):
        hypergradient(*args, method="magic")
    with pytest.raises(ValueError, match="an estimator or its settings by name, not both"):
        hypergradient(*args, Estimator(), eta=0.5)
    with pytest.raises(ValueError, match="scalar"):
        hypergradient(net, param.alpha(), param.tables, train_loss, lambda f, t, g: f.sum(0), [Batch(x, y)],
                      [Batch(x, y)])



def test_a_method_added_to_the_registry_is_accepted_everywhere(monkeypatch):
    """A new method is one entry of ``SOLVERS`` returning a ``Solution``: ``Estimator`` accepts its name and
    ``hypergradient`` runs it. Here ``p = v`` (the curvature taken as the identity), which must equal one-step Neumann
    with ``eta = 1``."""
    import importlib

    # the module (the package exports the function)
    hg = importlib.import_module("lightning_autobalance.core.hypergradient")
    from lightning_autobalance.core.solvers import from_direction

    def identity(problem):
        return from_direction(problem, *problem.upper_gradient())

    monkeypatch.setitem(hg.SOLVERS, "identity", identity)
    torch.manual_seed(0)
    net, loss = nn.Linear(4, 3).double(), PerClass([50, 10, 2], preset="la", search=("delta", "offset"))
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    xu, yu = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))

    def run(estimator):
        return hg.hypergradient(net, loss.alpha(), loss.tables,
                                lambda f, t, g, tab: adjusted_cross_entropy(f, t, *tab, group=g),
                                lambda f, t, g: F.cross_entropy(f, t), [Batch(x, y)], [Batch(xu, yu)], estimator,
                                ).grad

    got, expected = run(Estimator(method="identity", product="jvp")), run(Estimator(eta=1.0, product="jvp"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-12)
    monkeypatch.delitem(hg.SOLVERS, "identity")
    with pytest.raises(ValueError, match="method must be one of"):
        Estimator(method="identity")
