"""Every hypergradient method with a searched augmentation (core/augment_term.py), in float64 against independent
references, the random draws held fixed:

* ``unroll`` (both logits products): central finite differences of the upper objective after one explicit SGD step
  on the augmented batch, in the loss parameters and the augmentation's free values together;
* ``neumann`` and ``cg``: the exact implicit hypergradient ``-M^T H^{-1} v`` from explicit matrices (``M`` by
  double backward through the augmentation and the network) at the converged solution of a strictly convex
  problem, and finite differences of that solution re-trained;
* ``head``: finite differences of the upper objective at the head's equilibrium re-solved on the features of the
  augmented inputs.

The augmentation's parametrisations (core/augment_parametrization.py) are tested here too. Gates are soft
(``straight_through=False``) where finite differences are the reference: a hard gate is piecewise constant.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ConvNet, flat, unflatten
from conftest import small_images as images
from torch import nn
from torch.func import functional_call

from lightning_autobalance.core.augment import AugmentSettings, augment, draw, strengths
from lightning_autobalance.core.augment_parametrization import AugmentParameters, coerce_settings
from lightning_autobalance.core.estimator import Estimator
from lightning_autobalance.core.hypergradient import Batch, FunctionalModel, InputAugmentation, hypergradient
from lightning_autobalance.core.losses import LossTables, adjusted_cross_entropy
from lightning_autobalance.core.parametrization import PerClass

pytestmark = [pytest.mark.usefixtures("one_thread", "float64"), pytest.mark.filterwarnings("ignore::FutureWarning")]

IMAGE_OPS = dict(ops=("mix", "flip", "shift", "erase", "noise"), gated=("shift", "noise"), max_noise=0.3,
                 max_mix=0.8, straight_through=False)
VECTOR_OPS = dict(ops=("mix", "erase", "noise"), gated=("noise",), max_noise=0.4, max_mix=0.8, edge=0.2,
                  straight_through=False)




def train_loss(f, t, g, tables):
    return adjusted_cross_entropy(f, t, *tables, group=g, validate=False)


def balanced_ce(f, t, g):
    return F.cross_entropy(f, t)


def call(net, params, x):
    """The network at ``params`` on copies of its buffers (batch statistics; running ones untouched)."""
    return functional_call(net, {**{k: b.clone() for k, b in net.named_buffers()}, **params}, (x,))


def moved(module, scale=0.3, seed=1):
    """Free values off their start, so that every entry matters."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v.detach() + scale * torch.randn(v.shape, generator=gen) for k, v in module.alpha().items()}


def fd(fun, values, h=1e-6):
    """Central finite differences of a scalar function of a dict of tensors."""
    out = {}
    for name, t in values.items():
        g = torch.zeros_like(t)
        for i in range(t.numel()):
            plus, minus = dict(values), dict(values)
            plus[name], minus[name] = t.clone(), t.clone()
            plus[name].view(-1)[i] += h
            minus[name].view(-1)[i] -= h
            g.view(-1)[i] = (fun(plus) - fun(minus)) / (2 * h)
        out[name] = g
    return out


def assert_close(got, expected, rtol, atol=1e-9):
    assert sorted(got) == sorted(expected)
    for k in expected:
        assert expected[k].abs().max() > 1e-6, f"{k} does not matter here: the test would not see it"
        torch.testing.assert_close(got[k], expected[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------------------
# unroll
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("product", ["difference", "jvp"])
@pytest.mark.parametrize("kind", ["hierarchical", "class", "groups"])
def test_unroll_matches_finite_differences_in_loss_and_augmentation(product, kind):
    """The loss's and the augmentation's free values together, class x group tables, every op, BatchNorm in
    training mode: the exact derivative of the upper objective after one SGD step on the augmented batch."""
    torch.manual_seed(0)
    net = ConvNet().double()
    counts = torch.tensor([[6, 4, 2], [5, 3, 1]])
    loss = PerClass(counts, preset="la", search=("delta", "offset")).double()
    aug = AugmentParameters(counts, IMAGE_OPS, kind=kind, group_size=2).double()
    alpha, phi = moved(loss, seed=2), moved(aug)
    x, y, g = images()
    xu, yu, gu = images(n=9, seed=5)
    draws, eta = draw(aug.settings, x.shape, 11), 0.5

    def upper_after_step(values):
        params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
        x_aug = augment(x, y, g, aug.tables(values), draws, aug.settings)
        out = train_loss(call(net, params, x_aug), y, g, loss.tables(values))
        grads = torch.autograd.grad(out, list(params.values()))
        stepped = {k: v - eta * gi for (k, v), gi in zip(params.items(), grads)}
        return balanced_ce(call(net, stepped, xu), yu, gu).item()

    expected = fd(upper_after_step, {**alpha, **phi})
    res = hypergradient(net, alpha, loss.tables, train_loss, balanced_ce, [Batch(x, y, g)], [Batch(xu, yu, gu)],
                        Estimator(method="unroll", eta=eta, product=product),
                        augmentation=InputAugmentation(phi, aug.settings, [draws], aug.tables))
    assert bool(res.finite)
    assert_close(res.grad, expected, rtol=1e-5)
    assert res.objective.item() == pytest.approx(upper_after_step({**alpha, **phi}), rel=1e-12)


def test_the_augmentation_alone_is_searched_and_the_recorded_logits_are_used():
    """No loss parameter searched (``alpha`` empty), several training batches, the logits of the augmented batch
    recorded as a training step would: the same hypergradient as computed from scratch."""
    torch.manual_seed(0)
    net = ConvNet().double()
    counts = torch.tensor([6, 4, 2])
    loss = PerClass(counts, preset="la", search=()).double()
    aug = AugmentParameters(counts, IMAGE_OPS, kind="hierarchical").double()
    phi = moved(aug)
    (x1, y1, _), (x2, y2, _) = images(), images(n=9, seed=3)
    xu, yu, _ = images(n=9, seed=5)
    d1, d2 = draw(aug.settings, x1.shape, 1), draw(aug.settings, x2.shape, 2)
    spec = InputAugmentation(phi, aug.settings, [d1, d2], aug.tables)
    recorded = call(net, dict(net.named_parameters()), spec.augmented([Batch(x1, y1), Batch(x2, y2)])[0].inputs)
    recorded = recorded.detach()
    est = Estimator(method="unroll", eta=0.5)
    fresh = hypergradient(net, {}, loss.tables, train_loss, balanced_ce, [Batch(x1, y1), Batch(x2, y2)],
                          [Batch(xu, yu)], est, augmentation=spec)
    kept = hypergradient(net, {}, loss.tables, train_loss, balanced_ce, [Batch(x1, y1, None, recorded),
                                                                        Batch(x2, y2)], [Batch(xu, yu)], est,
                         augmentation=spec)
    assert sorted(fresh.grad) == sorted(phi)

    def upper_after_step(values):
        params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
        tables = aug.tables(values)
        out = sum(train_loss(call(net, params, augment(xi, yi, None, tables, di, aug.settings)), yi, None,
                             loss.tables()) for xi, yi, di in ((x1, y1, d1), (x2, y2, d2))) / 2
        grads = torch.autograd.grad(out, list(params.values()))
        stepped = {k: v - 0.5 * gi for (k, v), gi in zip(params.items(), grads)}
        return balanced_ce(call(net, stepped, xu), yu, None).item()

    expected = fd(upper_after_step, phi)
    assert_close(fresh.grad, expected, rtol=1e-5)
    assert_close(kept.grad, expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# neumann and cg: the implicit hypergradient at a converged solution
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture()
def convex():
    """Multinomial logistic regression with an L2 term on augmented vectors (mix, erase, gated noise): strictly
    convex in the weights, solved to convergence for the augmentation's current values."""
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(2)
    y = torch.arange(45) % 3
    x = torch.randn(45, 4, generator=gen) + 1.5 * F.one_hot(y, 4).double()
    yu = torch.arange(30) % 3
    xu = torch.randn(30, 4, generator=gen) + 1.5 * F.one_hot(yu, 4).double()
    counts = torch.tensor([20, 15, 10])
    loss = PerClass(counts, preset="la", search=("delta", "offset")).double()
    aug = AugmentParameters(counts, VECTOR_OPS, kind="hierarchical").double()
    alpha, phi = moved(loss, seed=3), moved(aug, scale=0.5, seed=4)
    draws = draw(aug.settings, x.shape, 7)
    net, mu = nn.Linear(4, 3).double(), 0.05

    def solve(values, start):
        """Newton's method with the full Hessian: the training minimiser for the values given."""
        x_aug = augment(x, y, None, aug.tables(values), draws, aug.settings).detach()
        tables = loss.tables(values)

        def fun(v):
            p = unflatten(v, start)
            return train_loss(call(net, p, x_aug), y, None, tables) + 0.5 * mu * (v * v).sum()

        vec = flat(start).detach()
        for _ in range(40):
            g = torch.autograd.functional.jacobian(fun, vec)
            if g.norm() < 1e-13:
                break
            vec = vec - torch.linalg.solve(torch.autograd.functional.hessian(fun, vec), g)
        return unflatten(vec, start)

    values = {**alpha, **phi}
    with torch.no_grad():
        for k, p in solve(values, dict(net.named_parameters())).items():
            dict(net.named_parameters())[k].copy_(p)
    return net, x, y, xu, yu, loss, aug, alpha, phi, draws, mu, solve


def test_neumann_and_cg_converge_to_the_exact_implicit_hypergradient_with_augmentation(convex):
    net, x, y, xu, yu, loss, aug, alpha, phi, draws, mu, _ = convex
    params = {k: v.detach() for k, v in net.named_parameters()}
    values = {**alpha, **phi}
    names = list(values)

    def grad_theta(vec, free):
        p = unflatten(vec, params)
        v = unflatten(free, values)
        x_aug = augment(x, y, None, aug.tables(v), draws, aug.settings)
        out = train_loss(call(net, p, x_aug), y, None, loss.tables(v))
        out = out + 0.5 * mu * sum((t * t).sum() for t in p.values())
        return torch.cat([gi.reshape(-1) for gi in torch.autograd.grad(out, list(p.values()), create_graph=True)])

    vec, free = flat(params), flat(values)
    h = torch.autograd.functional.jacobian(lambda v: grad_theta(v, free), vec)
    m = torch.autograd.functional.jacobian(lambda a: grad_theta(vec.clone().requires_grad_(), a), free)
    v = torch.autograd.functional.jacobian(lambda t: balanced_ce(call(net, unflatten(t, params), xu), yu, None), vec)
    expected = unflatten(-m.T @ torch.linalg.solve(h, v), values)
    assert sorted(expected) == sorted(names)

    spec = InputAugmentation(phi, aug.settings, [draws], aug.tables)
    eta = 1.0 / torch.linalg.eigvalsh(h).max().item()
    common = dict(curvature="hessian", weight_decay=mu)
    neu = hypergradient(net, alpha, loss.tables, train_loss, balanced_ce, [Batch(x, y)], [Batch(xu, yu)],
                        Estimator(method="neumann", eta=eta, terms=3000, **common), augmentation=spec)
    cg = hypergradient(net, alpha, loss.tables, train_loss, balanced_ce, [Batch(x, y)], [Batch(xu, yu)],
                       Estimator(method="cg", cg_iterations=60, **common), augmentation=spec)
    assert_close(neu.grad, expected, rtol=1e-6)
    assert_close(cg.grad, expected, rtol=1e-6)


def test_cg_matches_finite_differences_of_the_retrained_solution_with_augmentation(convex):
    net, x, y, xu, yu, loss, aug, alpha, phi, draws, mu, solve = convex
    start = {k: v.detach().clone() for k, v in net.named_parameters()}

    def trained_upper(values):
        return balanced_ce(call(net, solve(values, start), xu), yu, None).item()

    expected = fd(trained_upper, {**alpha, **phi}, h=1e-5)
    cg = hypergradient(net, alpha, loss.tables, train_loss, balanced_ce, [Batch(x, y)], [Batch(xu, yu)],
                       Estimator(method="cg", cg_iterations=60, curvature="gauss_newton", weight_decay=mu),
                       augmentation=InputAugmentation(phi, aug.settings, [draws], aug.tables))
    assert_close(cg.grad, expected, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# head
# ---------------------------------------------------------------------------------------------------------


class BodyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 4), nn.Tanh())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def test_head_method_matches_finite_differences_of_the_resolved_equilibrium_with_augmentation():
    """The head's equilibrium re-solved (dense Newton, to round-off) on the features of the inputs augmented with
    each perturbed value: the augmentation moves the head's training features, the network's body stays."""
    torch.manual_seed(0)
    net = BodyHead().double()
    gen = torch.Generator().manual_seed(3)
    y = torch.arange(36) % 3
    x = torch.randn(36, 5, generator=gen) + 1.2 * F.one_hot(y, 5).double()
    yu = torch.arange(24) % 3
    xu = torch.randn(24, 5, generator=gen) + 1.2 * F.one_hot(yu, 5).double()
    counts = torch.tensor([18, 12, 6])
    loss = PerClass(counts, preset="la", search=("delta", "offset")).double()
    aug = AugmentParameters(counts, VECTOR_OPS, kind="class").double()
    alpha, phi = moved(loss, seed=5), moved(aug, scale=0.5, seed=6)
    draws, wd = draw(aug.settings, x.shape, 9), 0.05

    def head_rows(feats):
        return torch.cat([feats, torch.ones(feats.shape[0], 1)], 1)

    def upper_at(values):
        with torch.no_grad():
            feats = head_rows(net.body(augment(x, y, None, aug.tables(values), draws, aug.settings)))
            ufeats = head_rows(net.body(xu))
        tables = LossTables(*loss.tables(values))

        def fun(t):
            return train_loss(feats @ t.view(3, 5).T, y, None, tables) + 0.5 * wd * (t * t).sum()

        t = torch.zeros(15)
        for _ in range(30):
            t = t - torch.linalg.solve(torch.autograd.functional.hessian(fun, t),
                                       torch.autograd.functional.jacobian(fun, t))
        return balanced_ce(ufeats @ t.view(3, 5).T, yu, None).item()

    expected = fd(upper_at, {**alpha, **phi}, h=1e-5)
    res = hypergradient(net, alpha, loss.tables, train_loss, balanced_ce, [Batch(x, y)], [Batch(xu, yu)],
                        Estimator(method="head", weight_decay=wd, head_memory=0, head_steps=30),
                        augmentation=InputAugmentation(phi, aug.settings, [draws], aug.tables))
    assert_close(res.grad, expected, rtol=1e-5, atol=1e-8)
    assert res.objective.item() == pytest.approx(upper_at({**alpha, **phi}), rel=1e-8)


def test_head_method_with_memory_sends_back_only_the_current_rows():
    """With a feature memory, rows of earlier hyper steps stay fixed: the augmentation's hypergradient through the
    head is that of the current batch's rows (the last of the memory's), the older rows only in the equilibrium."""
    torch.manual_seed(0)
    net = BodyHead().double()
    gen = torch.Generator().manual_seed(4)
    y = torch.arange(24) % 3
    x = torch.randn(24, 5, generator=gen)
    x_old = torch.randn(24, 5, generator=gen)
    xu, yu = torch.randn(12, 5, generator=gen), torch.arange(12) % 3
    counts = torch.tensor([8, 8, 8])
    loss = PerClass(counts, preset="la", search=()).double()
    aug = AugmentParameters(counts, VECTOR_OPS, kind="class").double()
    phi = moved(aug, scale=0.5, seed=6)
    d_old, draws = draw(aug.settings, x.shape, 1), draw(aug.settings, x.shape, 2)
    fmodel = FunctionalModel(net)
    est = Estimator(method="head", weight_decay=0.05, head_memory=48, head_steps=30)
    hypergradient(fmodel, {}, loss.tables, train_loss, balanced_ce, [Batch(x_old, y)], [Batch(xu, yu)], est,
                  augmentation=InputAugmentation(phi, aug.settings, [d_old], aug.tables))
    # the first call's rows are in the memory now, augmented with phi as it was: held fixed below
    with torch.no_grad():
        old_feats = net.body(augment(x_old, y, None, aug.tables(phi), d_old, aug.settings))
    state = {k: (v.features.clone(), v.target.clone()) for k, v in fmodel.memory["head"].items() if k != "theta"}
    res = hypergradient(fmodel, {}, loss.tables, train_loss, balanced_ce, [Batch(x, y)], [Batch(xu, yu)], est,
                        augmentation=InputAugmentation(phi, aug.settings, [draws], aug.tables))
    torch.testing.assert_close(state["train"][0], old_feats)

    def upper_at(values):
        with torch.no_grad():
            feats = torch.cat([old_feats, net.body(augment(x, y, None, aug.tables(values), draws, aug.settings))])
            feats = torch.cat([feats, torch.ones(48, 1)], 1)
            ufeats = torch.cat([net.body(xu), torch.ones(12, 1)], 1)
        yy, tables = torch.cat([y, y]), LossTables(*loss.tables())

        def fun(t):
            return train_loss(feats @ t.view(3, 5).T, yy, None, tables) + 0.5 * 0.05 * (t * t).sum()

        t = torch.zeros(15)
        for _ in range(30):
            t = t - torch.linalg.solve(torch.autograd.functional.hessian(fun, t),
                                       torch.autograd.functional.jacobian(fun, t))
        return balanced_ce(ufeats @ t.view(3, 5).T, yu, None).item()

    assert_close(res.grad, fd(upper_at, phi, h=1e-5), rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# the default path, the checks, the parametrisations
# ---------------------------------------------------------------------------------------------------------


class Counting(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_network_passes_without_and_with_augmentation():
    """Without an augmentation the one-step hypergradient on a recorded batch runs the network as before (the
    training gradient, the upper gradient at the stepped weights and one forward difference of the logits);
    with one, the two input passes replace the logits' pass (their logits give the product)."""
    torch.manual_seed(0)
    counting = Counting(ConvNet().double())
    counts = torch.tensor([6, 4, 2])
    loss = PerClass(counts, preset="la").double()
    aug = AugmentParameters(counts, IMAGE_OPS, kind="class").double()
    x, y, _ = images()
    logits = counting(x).detach()
    counting.calls = 0
    est = Estimator(method="unroll", eta=0.5)
    hypergradient(counting, loss.alpha(), loss.tables, train_loss, balanced_ce, [Batch(x, y, None, logits)],
                  [Batch(x, y)], est)
    assert counting.calls == 3
    counting.calls = 0
    hypergradient(counting, loss.alpha(), loss.tables, train_loss, balanced_ce, [Batch(x, y, None, logits)],
                  [Batch(x, y)], est,
                  augmentation=InputAugmentation(aug.alpha(), aug.settings, [draw(aug.settings, x.shape, 0)],
                                                 aug.tables))
    assert counting.calls == 4


def test_input_augmentation_is_checked():
    s = AugmentSettings(ops="noise")
    aug = AugmentParameters([3, 2], s, kind="class")
    d = draw(s, (4, 3), 0)
    with pytest.raises(ValueError, match="free is empty"):
        InputAugmentation({}, s, [d])
    with pytest.raises(ValueError, match="one Draws"):
        InputAugmentation(aug.alpha(), s, [])
    with pytest.raises(ValueError, match="must be an AugmentSettings"):
        InputAugmentation(aug.alpha(), {"ops": "noise"}, [d])
    spec = InputAugmentation(aug.alpha(), s, [d], aug.tables)
    with pytest.raises(ValueError, match="1 draws for 2 training batches"):
        spec.augmented([Batch(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))] * 2)
    net = nn.Linear(3, 2)
    loss = PerClass([3, 2], preset="la", search="offset")
    clash = InputAugmentation({"offset": torch.zeros(1, 2)}, s, [d])
    with pytest.raises(ValueError, match=r"\['offset'\] have the names of loss parameters"):
        hypergradient(net, loss.alpha(), loss.tables, train_loss, balanced_ce,
                      [Batch(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))],
                      [Batch(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))], augmentation=clash)


@pytest.mark.parametrize("kind", ["hierarchical", "class", "groups", "dataset"])
def test_parametrisations_start_at_the_start_strengths_and_move_as_described(kind):
    counts = torch.tensor([[40, 20, 10, 5], [30, 15, 8, 2]])
    settings = AugmentSettings(ops="shift+noise", gated="noise")
    p = AugmentParameters(counts, settings, kind=kind, group_size=2, start={"noise": 0.02})
    assert all(t.shape == (2, 4) for t in p.tables().values()) and set(p.tables()) == set(settings.names)
    got = p.strengths()
    torch.testing.assert_close(got["noise"], torch.full((2, 4), 0.02))
    torch.testing.assert_close(got["shift"], torch.full((2, 4), settings.max_shift / 2))
    shapes = {k: tuple(v.shape) for k, v in p.alpha().items()}
    cells = {"hierarchical": (2, 4), "class": (2, 4), "groups": (2, 2)}.get(kind)
    for name in settings.names:
        assert shapes.get(f"augment_{name}") == cells
        assert (f"augment_{name}_level" in shapes) == (kind in ("hierarchical", "dataset"))
    counted = p.free_value_counts(counts)
    assert sorted(counted) == ([] if kind == "dataset" else ["augment_noise", "augment_p_noise", "augment_shift"])
    if kind == "groups":  # classes 0, 1 in the first bin, 2, 3 in the second
        torch.testing.assert_close(counted["augment_shift"], torch.tensor([[60.0, 15.0], [45.0, 10.0]]))
        with torch.no_grad():
            p.alpha()["augment_shift"][0, 1] = 1.0
        moved_cells = (p.tables()["shift"] != p.start_shift).nonzero().tolist()
        assert moved_cells == [[0, 2], [0, 3]]
    if kind in ("hierarchical", "dataset"):  # the slope moves the tail against the head, the level all alike
        with torch.no_grad():
            p.alpha()["augment_shift_slope"].fill_(-1.0)
        s = p.strengths()["shift"]
        assert bool((s[:, 1:] > s[:, :-1]).all())
        with torch.no_grad():
            p.alpha()["augment_shift_slope"].zero_()
            p.alpha()["augment_shift_level"].fill_(1.0)
        torch.testing.assert_close(p.tables()["shift"], p.start_shift + 1.0)
    p.reset()
    torch.testing.assert_close(p.strengths()["noise"], torch.full((2, 4), 0.02))


def test_hierarchical_residuals_are_centred_and_parameters_survive_a_state_dict():
    p = AugmentParameters([40, 20, 10], {"ops": "noise"}, kind="hierarchical", seed=3)
    with torch.no_grad():
        p.alpha()["augment_noise"].fill_(2.0)  # a common residual is the level's business: no effect
    torch.testing.assert_close(p.tables()["noise"], p.start_noise)
    with torch.no_grad():
        p.alpha()["augment_noise"].copy_(torch.tensor([[0.5, -0.2, 0.1]]))
    q = AugmentParameters([40, 20, 10], {"ops": "noise"}, kind="hierarchical")
    q.load_state_dict(p.state_dict())
    assert q.seed == 0 and q.config()["settings"] == p.config()["settings"]
    torch.testing.assert_close(q.tables()["noise"], p.tables()["noise"])
    other = AugmentParameters([40, 20, 10], {"ops": "shift"}, kind="hierarchical")
    with pytest.raises(ValueError, match="saved augmentation parameters"):
        other.load_state_dict({**other.state_dict(), "_extra_state": p.get_extra_state()})
    assert p.half().alpha()["augment_noise"].dtype == torch.float64  # no low-precision cast: the default dtype here
    torch.testing.assert_close(strengths(p.tables(), p.settings)["noise"], p.strengths()["noise"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "rows"}, "Unknown augmentation parametrization 'rows'"),
    ({"group_size": 0}, "group_size must be a positive integer; got 0"),
    ({"seed": 1.5}, "seed must be an integer; got 1.5"),
    ({"settings": {"ops": "rotate"}}, r"unknown op\(s\) \['rotate'\]"),
    ({"settings": {"opps": "noise"}}, r"augment: unknown settings \['opps'\]"),
    ({"start": {"noise": 1.0}}, r"start names tables \['noise'\]"),
])
def test_augment_parameters_reject_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentParameters([5, 3], **kwargs)
    assert coerce_settings(None) == AugmentSettings()
