"""The searched per-cell augmentation (core/augment.py): what each op does, determinism given the draws, the
validation, and its hypergradient through the inputs in float64 against double backward and against finite
differences of the upper objective after one explicit SGD step (the random draws held fixed)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ConvNet
from conftest import small_images as images
from torch.func import functional_call

from lightning_autobalance.core.augment import (
    AugmentSettings,
    Draws,
    augment,
    draw,
    initial_params,
    input_hypergradient,
    input_mixed_term,
    partners,
    strengths,
    translate,
)
from lightning_autobalance.core.estimator import Estimator
from lightning_autobalance.core.linear_solve import axpy, scale
from lightning_autobalance.core.losses import adjusted_cross_entropy
from lightning_autobalance.core.parametrization import PerClass
from lightning_autobalance.core.problem import Batch, FunctionalModel, Problem

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = ("mix", "flip", "shift", "erase", "noise")


def random_params(settings, groups=2, classes=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    start = initial_params(settings, classes, groups, dtype=torch.get_default_dtype())
    return {k: v + 0.5 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in start.items()}


# ---------------------------------------------------------------------------------------------------------
# Settings, parameters, draws
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ops": ("rotate",)}, r"unknown op\(s\) \['rotate'\]"),
    ({"ops": ()}, "ops is empty"),
    ({"ops": "flip", "gated": "flip"}, r"\['flip'\] cannot be gated"),
    ({"ops": "flip+shift", "gated": "noise"}, r"\['noise'\] cannot be gated.*\['shift'\]"),
    ({"max_noise": -1.0}, "max_noise must be a positive finite number; got -1.0"),
    ({"temperature": math.nan}, "temperature must be a positive finite number; got nan"),
    ({"edge": True}, "edge must be a positive finite number; got True"),
    ({"max_mix": 1.5}, "max_mix is a fraction; expected at most 1, got 1.5"),
    ({"padding": "wrap"}, r"padding must be one of .*got 'wrap'"),
    ({"straight_through": "yes"}, "straight_through must be a bool; got 'yes'"),
])
def test_settings_reject_bad_values_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentSettings(**kwargs)


def test_settings_are_values_in_canonical_order():
    a = AugmentSettings(ops="noise+shift, mix", gated=["noise"])
    assert a == AugmentSettings(ops=("mix", "shift", "noise"), gated=("noise",))
    assert a.ops == ("mix", "shift", "noise") and a.names == ("mix", "shift", "noise", "p_noise")
    assert hash(a) == hash(AugmentSettings(ops=["shift", "mix", "noise"], gated="noise"))


def test_initial_params_give_the_start_strengths():
    s = AugmentSettings(ops=ALL, gated=("erase",))
    params = initial_params(s, num_classes=4, num_groups=2, start={"noise": 0.02, "flip": 0.3})
    assert all(t.shape == (2, 4) for t in params.values()) and set(params) == set(s.names)
    got = strengths(params, s)
    torch.testing.assert_close(got["noise"], torch.full((2, 4), 0.02))
    torch.testing.assert_close(got["flip"], torch.full((2, 4), 0.3))
    torch.testing.assert_close(got["shift"], torch.full((2, 4), s.max_shift / 2))
    with pytest.raises(ValueError, match=r"start\['noise'\] must lie strictly between 0 and 0.1; got 0.2"):
        initial_params(s, 4, start={"noise": 0.2})
    with pytest.raises(ValueError, match=r"lack; expected"):
        initial_params(AugmentSettings(ops="flip"), 4, start={"noise": 0.01})


def test_draws_depend_only_on_the_seed():
    s = AugmentSettings(ops=ALL, gated=("noise", "mix"))
    x, y, g = images()
    params = random_params(s)
    torch.manual_seed(123)  # the global state plays no part
    a = draw(s, x.shape, 7)
    torch.manual_seed(456)
    b = draw(s, x.shape, torch.Generator().manual_seed(7))
    c = draw(s, x.shape, 8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(not torch.equal(u, v) for u, v in zip(a, c))
    assert torch.equal(augment(x, y, g, params, a, s), augment(x, y, g, params, b, s))
    assert not torch.allclose(augment(x, y, g, params, a, s), augment(x, y, g, params, c, s))
    assert draw(AugmentSettings(ops="flip"), x.shape, 7).noise is None


# ---------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------


def test_shift_moves_each_cell_by_its_own_strength():
    s = AugmentSettings(ops="shift", max_shift=0.5)
    x, y, g = images(n=6)
    # cell (g, y) -> shift of 1 pixel for group 0, 2 pixels for group 1 (width 6), to the left along x
    pixels = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    frac = pixels / 6
    params = {"shift": torch.log(frac / (0.5 - frac))}
    d = Draws(shift=torch.tensor([[1.0, 0.0]]).repeat(6, 1))
    out = augment(x, y, g, params, d, s)
    for i in range(6):
        k = int(pixels[g[i], y[i]])
        torch.testing.assert_close(out[i, :, :, :-k], x[i, :, :, k:])
        assert out[i, :, :, -k:].abs().max() == 0  # zeros padding
    torch.testing.assert_close(translate(x, torch.zeros(6, 2)), x)


def test_flip_gate_is_hard_forward_and_soft_backward():
    s = AugmentSettings(ops="flip")
    x, y, g = images()
    params = {"flip": torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]], requires_grad=True)}
    d = draw(s, x.shape, 3)
    out = augment(x, y, g, params, d, s)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    assert all(f or torch.equal(out[i], x[i]) for i, f in enumerate(flipped)) and 0 < sum(flipped) < len(x)
    w = torch.randn_like(x)
    (hard,) = torch.autograd.grad((w * out).sum(), params["flip"])
    soft_settings = AugmentSettings(ops="flip", straight_through=False)
    (soft,) = torch.autograd.grad((w * augment(x, y, g, params, d, soft_settings)).sum(), params["flip"])
    assert hard.abs().min() > 0
    torch.testing.assert_close(hard, soft)


def test_partners_are_in_the_same_cell():
    cells = torch.tensor([2, 0, 2, 1, 0, 2, 2, 3])
    p = partners(cells, torch.rand(8, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.sort(p).values, torch.arange(8))  # a permutation
    assert torch.equal(cells[p], cells)
    assert p[7] == 7 and p[3] == 3 and (p[[0, 1, 2, 4, 5, 6]] != torch.tensor([0, 1, 2, 4, 5, 6])).all()


@pytest.mark.parametrize("shape", [(12, 5), (12, 2, 40), (12, 2, 6, 6)])
def test_generic_ops_take_any_shape(shape):
    s = AugmentSettings(ops="mix+noise", max_mix=0.8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    y, g = torch.arange(12) % 3, (torch.arange(12) // 3) % 2
    params = random_params(s)
    d = draw(s, x.shape, 5)
    out = augment(x, y, g, params, d, s)
    v = strengths(params, s)
    cell = g * 3 + y
    lam = v["mix"].reshape(-1)[cell] * d.mix[:, 1]
    mixed = x + lam.view(-1, *[1] * (x.ndim - 1)) * (x[partners(cell, d.mix[:, 0])] - x)
    torch.testing.assert_close(out, mixed + v["noise"].reshape(-1)[cell].view(-1, *[1] * (x.ndim - 1)) * d.noise)
    erased = augment(torch.ones(shape), y, g, random_params(AugmentSettings(ops="erase")),
                     draw(AugmentSettings(ops="erase"), shape, 5), AugmentSettings(ops="erase", edge=0.01))
    assert erased.min() < 0.05 and erased.max() > 0.95 and erased.shape == shape


def test_erase_removes_a_box_of_the_searched_size():
    s = AugmentSettings(ops="erase", edge=0.005)
    size = torch.tensor([[0.25, 0.5]])
    params = {"erase": torch.log(size / (s.max_erase - size))}
    x, y = torch.ones(2, 1, 40, 40), torch.tensor([0, 1])
    out = augment(x, y, None, params, Draws(erase=torch.full((2, 2), 0.5)), s)
    torch.testing.assert_close(1 - out.mean((1, 2, 3)), size.reshape(-1) ** 2, atol=0.01, rtol=0)
    signal = augment(torch.ones(2, 1, 100), y, None, params, Draws(erase=torch.full((2, 2), 0.5)), s)
    torch.testing.assert_close(1 - signal.mean((1, 2)), size.reshape(-1), atol=0.01, rtol=0)


def test_augment_rejects_what_it_cannot_apply():
    s = AugmentSettings(ops="flip+noise")
    x, y, g = images()
    params, d = random_params(s), draw(s, x.shape, 0)
    with pytest.raises(ValueError, match=r"ops \['flip'\] need images .*shape \(12, 72\)"):
        augment(x.flatten(1), y, g, params, d, s)
    with pytest.raises(ValueError, match=r"params lack the tables \['noise'\]"):
        augment(x, y, g, {"flip": params["flip"]}, d, s)
    with pytest.raises(ValueError, match=r"draws lack \['noise'\]"):
        augment(x, y, g, params, d._replace(noise=None), s)
    with pytest.raises(ValueError, match="group index is needed"):
        augment(x, y, None, params, d, s)
    with pytest.raises(ValueError, match=r"draws were made for another batch"):
        augment(x[:6], y[:6], g[:6], params, d, s)
    with pytest.raises(ValueError, match=r"\(G, K\) tables of one shape"):
        augment(x, y, g, {**params, "noise": params["noise"][0]}, d, s)


# ---------------------------------------------------------------------------------------------------------
# The hypergradient through the inputs (float64)
# ---------------------------------------------------------------------------------------------------------


def call(net, params, x):
    """The network at ``params`` on copies of its buffers (batch statistics, running ones untouched)."""
    return functional_call(net, {**{k: b.clone() for k, b in net.named_buffers()}, **params}, (x,))


def train_loss(f, t, g, tables):
    return adjusted_cross_entropy(f, t, *tables, group=g, validate=False)


@pytest.fixture()
def setup(float64):
    torch.manual_seed(0)
    net = ConvNet().double()
    counts = torch.tensor([[6, 4, 2], [5, 3, 1]])
    tables = PerClass(counts, preset="la").double().tables()
    settings = AugmentSettings(ops=ALL, gated=("shift", "erase", "noise"), max_noise=0.3, max_mix=0.8,
                               straight_through=False)
    x, y, g = images()
    return net, tables, settings, x, y, g, random_params(settings), draw(settings, x.shape, 11)


@pytest.mark.parametrize("difference", ["central", "forward"])
@pytest.mark.parametrize("straight_through", [True, False])
def test_input_mixed_term_matches_double_backward(setup, straight_through, difference):
    net, tables, settings, x, y, g, phi, d = setup
    settings = AugmentSettings(**{**settings.__dict__, "straight_through": straight_through})
    gen = torch.Generator().manual_seed(2)
    p = {k: torch.randn(v.shape, generator=gen) for k, v in net.named_parameters()}

    leaf = {k: v.clone().requires_grad_() for k, v in phi.items()}
    params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
    out = train_loss(call(net, params, augment(x, y, g, leaf, d, settings)), y, g, tables)
    grads = torch.autograd.grad(out, list(params.values()), create_graph=True)
    inner = sum((gi * p[k]).sum() for k, gi in zip(params, grads))
    expected = dict(zip(leaf, torch.autograd.grad(inner, list(leaf.values()))))

    input_grad = None
    if difference == "forward":  # the input gradient at theta, as the training step's backward pass would keep it
        x_in = augment(x, y, g, phi, d, settings).requires_grad_()
        (input_grad,) = torch.autograd.grad(train_loss(call(net, dict(net.named_parameters()), x_in), y, g, tables),
                                            x_in)
    fmodel = FunctionalModel(net)
    got = input_mixed_term(fmodel, fmodel.params(), Batch(x, y, g), p, phi, d, settings,
                           lambda f, t, gr: train_loss(f, t, gr, tables), input_grad)
    assert sorted(got) == sorted(settings.names)
    rtol = 1e-6 if difference == "central" else 1e-5
    for k in expected:
        assert expected[k].abs().max() > 1e-4, k  # every table matters here
        torch.testing.assert_close(got[k], expected[k], rtol=rtol, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
    zero = input_mixed_term(fmodel, fmodel.params(), Batch(x, y, g), {k: 0 * v for k, v in p.items()}, phi, d,
                            settings, lambda f, t, gr: train_loss(f, t, gr, tables))
    assert all(bool((v == 0).all()) for v in zero.values())


def test_unrolled_hypergradient_matches_finite_difference_of_one_sgd_step(setup):
    net, tables, settings, x, y, g, phi, d = setup
    xu, yu, gu = images(n=9, seed=5)
    eta = 0.5

    def objective(f, t, gr):
        return F.cross_entropy(f, t)

    def upper_after_step(table):
        params = {k: v.detach().requires_grad_() for k, v in net.named_parameters()}
        out = train_loss(call(net, params, augment(x, y, g, table, d, settings)), y, g, tables)
        grads = torch.autograd.grad(out, list(params.values()))
        stepped = {k: v - eta * gi for (k, v), gi in zip(params.items(), grads)}
        return objective(call(net, stepped, xu), yu, gu).item()

    expected, h = {}, 1e-6
    for name, t in phi.items():
        expected[name] = torch.zeros_like(t)
        for i in range(t.numel()):
            plus, minus = dict(phi), dict(phi)
            plus[name], minus[name] = t.clone(), t.clone()
            plus[name].view(-1)[i] += h
            minus[name].view(-1)[i] -= h
            expected[name].view(-1)[i] = (upper_after_step(plus) - upper_after_step(minus)) / (2 * h)

    # the one-step direction p = eta v(theta - eta g), with g on the augmented batch, then the input mixed term
    fmodel = FunctionalModel(net)
    augmented = Batch(augment(x, y, g, phi, d, settings).detach(), y, g)
    problem = Problem(fmodel, fmodel.params(), [augmented], [Batch(xu, yu, gu)], tables, train_loss, objective,
                      Estimator(method="unroll", eta=eta), None, 1.0)
    v, value = problem.upper_gradient(axpy(-eta, problem.train_gradient(), problem.params))
    got = input_hypergradient(problem, scale(eta, v), phi, [Batch(x, y, g)], [d], settings)
    assert value.item() == pytest.approx(upper_after_step(phi), rel=1e-12)
    for k in expected:
        assert expected[k].abs().max() > 1e-5, k
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")


def test_input_mixed_term_in_float32_is_close_to_the_float64_reference():
    """The difference step scaled for float32 (as for the logits difference) keeps the term to about 1e-4."""
    torch.manual_seed(0)
    net = ConvNet()
    tables = PerClass(torch.tensor([[6, 4, 2], [5, 3, 1]]), preset="la").tables()
    settings = AugmentSettings(ops=ALL, gated=("erase",), max_noise=0.3)
    x, y, g = images()
    phi, d = random_params(settings), draw(settings, x.shape, 4)
    p = {k: torch.randn(v.shape) for k, v in net.named_parameters()}

    def term(model, dtype):
        fmodel, cast = FunctionalModel(model), type(tables)(*(u.to(dtype) for u in tables))

        def loss(f, t, gr):
            return train_loss(f, t, gr, cast)

        return input_mixed_term(fmodel, fmodel.params(), Batch(x.to(dtype), y, g),
                                {k: v.to(dtype) for k, v in p.items()}, {k: v.to(dtype) for k, v in phi.items()}, d,
                                settings, loss)

    single, double = term(net, torch.float32), term(copy.deepcopy(net).double(), torch.float64)
    for k in double:
        assert single[k].dtype == torch.float32
        assert float((single[k].double() - double[k]).norm() / double[k].norm()) < 1e-3, k
