"""The ``"head"`` method: the implicit hypergradient of the classifier head at its equilibrium.

References, all in float64 and independent of the code under test: the head's equilibrium re-solved by L-BFGS to
convergence for every perturbed ``alpha`` (central finite differences of ``U(theta*(alpha))``), and the closed-form
Kronecker Hessian of the adjusted cross-entropy of a linear head.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_autobalance.core.estimator import Estimator
from lightning_autobalance.core.head import (
    FeatureMemory,
    HeadProblem,
    augment_features,
    find_head,
    head_hypergradient,
    head_parameters,
    solve_head,
)
from lightning_autobalance.core.hypergradient import Batch, hypergradient
from lightning_autobalance.core.losses import LossTables, adjusted_cross_entropy
from lightning_autobalance.core.parametrization import PerClass

K, D = 3, 4


def _train_loss(f, t, g, tab):
    return adjusted_cross_entropy(f, t, *tab, group=g)


def _balanced_ce(counts):
    w = 1.0 / torch.as_tensor(counts, dtype=torch.float64)

    def objective(f, t, g):
        return F.cross_entropy(f, t, weight=w.to(f.dtype))

    return objective


def _data(seed=0, n=48, m=30):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = torch.cat([torch.zeros(n - 12, dtype=torch.long), torch.ones(9, dtype=torch.long),
                   torch.full((3,), 2, dtype=torch.long)])
    x = x + 1.5 * F.one_hot(y, D).double()  # class-dependent means, not separable
    xu = torch.randn(m, D, generator=gen, dtype=torch.float64)
    yu = torch.arange(m) % K
    xu = xu + 1.5 * F.one_hot(yu, D).double()
    return x, y, xu, yu


def _linear(x, theta, bias=True):
    """The head's logits in the layout under test: K rows (w_k, b_k), written out independently."""
    rows = theta.view(K, D + 1 if bias else D)
    return x @ rows[:, :D].T + (rows[:, D] if bias else 0.0)


def _lbfgs_head(x, y, tables, wd, bias=True):
    """The head's equilibrium by L-BFGS and plain Newton polishing (not the solver under test), to round-off."""
    theta = torch.zeros(K * D + (K if bias else 0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=60, tolerance_grad=1e-13, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = _linear(x, theta, bias)
        loss = _train_loss(logits, y, None, tables) + 0.5 * wd * (theta * theta).sum()
        loss.backward()
        return loss

    opt.step(closure)
    # polish: plain Newton steps with autograd's dense Hessian from L-BFGS's point (quadratic convergence there)

    def loss_of(t):
        return _train_loss(_linear(x, t, bias), y, None, tables) + 0.5 * wd * (t * t).sum()

    t = theta.detach()
    for _ in range(4):
        g = torch.autograd.functional.jacobian(loss_of, t)
        t = t - torch.linalg.solve(torch.autograd.functional.hessian(loss_of, t), g)
    return t


@pytest.mark.parametrize(("bias", "search"), [(True, ("delta", "offset")), (False, ("delta", "offset")),
                                              (True, ("delta", "offset", "weight"))],
                         ids=["bias", "no-bias", "bias-weight"])
def test_head_hypergradient_matches_finite_differences_of_the_resolved_equilibrium(bias, search):
    """Every searched table, the weights included (a mixed term that detached the weight table would leave
    the weight hypergradient wrong and pass a test that searched only delta and the offsets)."""
    x, y, xu, yu = _data()
    param = PerClass([36, 9, 3], preset="la", search=search).double()
    alpha = {k: v.detach().clone() for k, v in param.alpha().items()}
    alpha = {k: v + 0.05 * torch.arange(v.numel(), dtype=v.dtype).view_as(v) for k, v in alpha.items()}  # off preset
    objective, wd = _balanced_ce([10, 10, 10]), 0.05

    def upper_at(a):
        tables = LossTables(*param.tables(a))
        theta = _lbfgs_head(x, y, tables, wd, bias)
        return objective(_linear(xu, theta, bias), yu, None)

    res = head_hypergradient(x, y, None, xu, yu, None, alpha, param.tables, _train_loss, objective,
                             torch.zeros(K * D + (K if bias else 0), dtype=torch.float64), K, bias, wd, steps=30)
    eps = 1e-5
    for name, value in alpha.items():
        fd = torch.zeros_like(value)
        for i in range(value.numel()):
            plus = {k: v.clone() for k, v in alpha.items()}
            minus = {k: v.clone() for k, v in alpha.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            fd.view(-1)[i] = (upper_at(plus) - upper_at(minus)) / (2 * eps)
        torch.testing.assert_close(res.grad[name], fd, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(res.objective, upper_at(alpha), rtol=1e-9, atol=1e-12)


def test_head_hessian_is_autograds_and_the_kronecker_closed_form():
    x, y, _, _ = _data(1)
    param = PerClass([36, 9, 3], preset="vs", search=("delta", "offset")).double()
    tables = LossTables(*param.tables(param.alpha()))
    wd = 0.01
    problem = HeadProblem(augment_features(x, True), y, None, tables, _train_loss, wd, K, None)
    theta = torch.randn(K * D + K, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hessian = problem.hessian(theta)
    # autograd's dense Hessian of the flat loss (no structure used)
    dense = torch.autograd.functional.hessian(
        lambda t: _train_loss(_linear(x, t), y, None, tables) + 0.5 * wd * (t * t).sum(), theta)
    torch.testing.assert_close(hessian, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(problem.hvp(theta, theta.flip(0)), dense @ theta.flip(0), rtol=1e-10, atol=1e-12)
    # closed form: mean_i w_y [Dl (diag p - p p^T) Dl] (x) [x;1][x;1]^T + wd I, in the layout (class, feature+1)
    delta, offset, weight = (t[0] for t in tables)
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    z = delta * _linear(x, theta) + offset
    p = z.softmax(1)
    a = weight[y].view(-1, 1, 1) * delta.view(1, K, 1) * (torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)) \
        * delta.view(1, 1, K)
    closed = torch.einsum("nab,nc,nd->acbd", a, xa, xa).reshape(K * (D + 1), K * (D + 1)) / len(x)
    closed = closed + wd * torch.eye(K * (D + 1), dtype=x.dtype)
    torch.testing.assert_close(hessian, closed, rtol=1e-10, atol=1e-12)


def test_newton_reaches_the_equilibrium_and_cg_agrees_with_the_dense_solve():
    x, y, _, _ = _data(2)
    tables = LossTables(*PerClass([36, 9, 3], preset="la").double().tables(PerClass([36, 9, 3]).double().alpha()))
    problem = HeadProblem(augment_features(x, True), y, None, tables, _train_loss, 0.02, K, None)
    start = torch.zeros(K * D + K, dtype=torch.float64)
    dense = solve_head(problem, start, steps=12)
    assert problem.gradient(dense).norm() < 1e-10
    reference = _lbfgs_head(x, y, tables, 0.02)
    torch.testing.assert_close(dense, reference, rtol=1e-7, atol=1e-8)
    iterative = solve_head(problem, start, steps=12, dense_limit=0, cg_iterations=2 * start.numel())
    torch.testing.assert_close(iterative, dense, rtol=1e-7, atol=1e-8)
    # the loss never goes up along the way, even from far away
    far = 20.0 * torch.ones_like(start)
    assert problem.loss(solve_head(problem, far, steps=1)) <= problem.loss(far)


def test_hessian_vector_products_without_blocks_match_the_dense_hessian(monkeypatch):
    """The product by a Jacobian-vector product of the logits' gradient (used when N K^2 is large) equals the product
    with the per-sample blocks and with autograd's dense Hessian; the iterative solve agrees either way."""
    import lightning_autobalance.core.head as head_module

    x, y, _, _ = _data(3)
    tables = LossTables(*PerClass([36, 9, 3], preset="la").double().tables(PerClass([36, 9, 3]).double().alpha()))
    problem = HeadProblem(augment_features(x, True), y, None, tables, _train_loss, 0.02, K, None)
    theta = torch.randn(K * D + K, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    vec = torch.randn_like(theta)
    dense = torch.autograd.functional.hessian(problem.loss, theta) @ vec
    torch.testing.assert_close(problem.hvp(theta, vec), dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(problem.hvp(theta, vec, problem.blocks(theta)), dense, rtol=1e-10, atol=1e-12)
    start = torch.zeros_like(theta)
    with_blocks = solve_head(problem, start, steps=8, dense_limit=0, cg_iterations=2 * start.numel())
    monkeypatch.setattr(head_module, "_BLOCKS_LIMIT", 0)
    without = solve_head(problem, start, steps=8, dense_limit=0, cg_iterations=2 * start.numel())
    torch.testing.assert_close(without, with_blocks, rtol=1e-7, atol=1e-8)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, D), nn.Tanh())
        self.fc = nn.Linear(D, K)

    def forward(self, x):
        return self.fc(self.body(x))


def test_through_hypergradient_equals_the_functional_core_on_the_network_features():
    torch.manual_seed(0)
    net = _Net().double()
    param = PerClass([40, 8, 2], preset="la", search=("delta", "offset")).double()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, K, (32,))
    xu, yu = torch.randn(12, 5, dtype=torch.float64), torch.arange(12) % K
    objective = _balanced_ce([4, 4, 4])
    est = Estimator(method="head", weight_decay=0.03, head_memory=0, head_steps=20)
    from lightning_autobalance.core.hypergradient import FunctionalModel

    fmodel = FunctionalModel(net)
    for _ in range(2):  # head_memory=0: every call sees its own batches only, not the previous call's
        res = hypergradient(fmodel, param.alpha(), param.tables, _train_loss, objective, [Batch(x, y)],
                            [Batch(xu, yu)], est)
    with torch.no_grad():
        feats, ufeats = net.body(x), net.body(xu)
    theta = head_parameters(net.fc.weight, net.fc.bias)
    ref = head_hypergradient(feats, y, None, ufeats, yu, None, param.alpha(), param.tables, _train_loss, objective,
                             theta, K, True, 0.03, steps=20)
    for k in ref.grad:
        torch.testing.assert_close(res.grad[k], ref.grad[k], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.objective, ref.objective)


def test_feature_memory_keeps_the_newest_rows_and_solves_on_all_of_them():
    mem = FeatureMemory(capacity=5)
    for i in range(3):
        mem.add(torch.full((2, 3), float(i)), torch.full((2,), i), None)
    assert mem.features.shape == (5, 3) and mem.target.tolist() == [0, 1, 1, 2, 2]
    mem.add(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), None)  # new width: restarts
    assert mem.features.shape == (1, 4)

    torch.manual_seed(1)
    net = _Net().double()
    param = PerClass([40, 8, 2], preset="la").double()
    from lightning_autobalance.core.hypergradient import FunctionalModel

    fmodel = FunctionalModel(net)
    objective = _balanced_ce([4, 4, 4])
    est = Estimator(method="head", weight_decay=0.03, head_memory=64)
    batches = [(torch.randn(16, 5, dtype=torch.float64), torch.randint(0, K, (16,))) for _ in range(2)]
    upper = (torch.randn(9, 5, dtype=torch.float64), torch.arange(9) % K)
    for xb, yb in batches:
        res = hypergradient(fmodel, param.alpha(), param.tables, _train_loss, objective, [Batch(xb, yb)],
                            [Batch(*upper)], est)
    memory = fmodel.memory["head"]
    assert memory["train"].features.shape == (32, D) and memory["upper"].features.shape == (18, D)
    with torch.no_grad():
        feats = net.body(torch.cat([b[0] for b in batches]))
        ufeats = net.body(torch.cat([upper[0], upper[0]]))
    ref = head_hypergradient(feats, torch.cat([b[1] for b in batches]), None, ufeats, torch.cat([upper[1]] * 2), None,
                             param.alpha(), param.tables, _train_loss, objective, memory["theta"], K, True, 0.03,
                             steps=10)
    for k in ref.grad:
        torch.testing.assert_close(res.grad[k], ref.grad[k], rtol=1e-6, atol=1e-9)


def test_settings_are_checked():
    assert Estimator(method="head").weight_decay == 0.0  # under the callback: the optimizer's, read at fit start
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        Estimator(method="head", weight_decay=-1.0)
    with pytest.raises(ValueError, match="head_steps"):
        Estimator(method="head", weight_decay=1e-4, head_steps=0)
    with pytest.raises(ValueError, match="head_memory"):
        Estimator(method="head", weight_decay=1e-4, head_memory=-1)
    net = _Net()
    assert find_head(net) == "fc"
    with pytest.raises(ValueError, match=r"nn.Linear layers are \['body.0', 'fc'\]"):
        find_head(net, "body")
    with pytest.raises(ValueError, match="has none"):
        find_head(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_newton_converges_to_rounding_not_to_the_resolution_of_its_line_search():
    """Near the solution the candidate steps' losses differ by less than the loss's own rounding; choosing among
    them by value alone stalls short of the equilibrium (gradient norm 2e-11 here). Taking the longest step
    among those tied up to rounding lets the full Newton step finish the job: the gradient reaches rounding."""
    gen = torch.Generator().manual_seed(1)
    y = torch.arange(48) % K
    x = torch.tanh(torch.randn(48, 8, generator=gen, dtype=torch.float64) + 3.0 * F.one_hot(y, 8).double())
    param = PerClass([40, 8, 2], preset="la", search=("delta", "offset", "weight")).double()
    with torch.no_grad():
        for t in param.alpha().values():
            t.normal_(0, 0.2, generator=gen)
        tables = LossTables(*param.tables(param.alpha()))
    problem = HeadProblem(augment_features(x, True), y, None, tables, _train_loss, 0.05, K, None)
    theta = solve_head(problem, torch.zeros(K * 9, dtype=torch.float64), 30)
    assert float(problem.gradient(theta).norm()) < 1e-14


def test_the_residual_tells_an_unconverged_solve_from_a_converged_one():
    """``HeadResult.residual``: the head's training gradient relative to ``lambda ||theta||`` at the solution
    returned. One Newton step from zero under weak weight decay is far from the equilibrium; thirty reach rounding."""
    x, y, xu, yu = _data()
    param = PerClass([36, 9, 3], preset="la", search=("offset",)).double()

    def residual(steps: int) -> float:
        res = head_hypergradient(x, y, None, xu, yu, None, param.alpha(), param.tables, _train_loss,
                                 _balanced_ce([10, 10, 10]), torch.zeros(K * D + K, dtype=torch.float64), K, True,
                                 1e-4, steps=steps)
        return float(res.residual)

    assert residual(1) > 1e-3
    assert residual(30) < 1e-9
