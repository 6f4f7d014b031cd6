"""Upper objectives: values and gradients (w.r.t. the logits) against references written out here in float64, the
handling of units absent from a batch, and bad settings and inputs."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from lightning_autobalance.core.objectives import (
    OBJECTIVES,
    BalancedCrossEntropy,
    BlendedObjective,
    EqualOpportunityGap,
    UpperObjective,
    WorstGroupLoss,
    balanced_cross_entropy,
    blended_objective,
    build_objective,
    check_objective,
    equal_opportunity_gap,
    worst_group_loss,
)
from lightning_autobalance.core.reduce import Reducer

DT = torch.float64
K, G, N = 3, 2, 48


def _batch(n: int = N, k: int = K, g: int = G, seed: int = 0):
    """Float64 logits and labels/groups in which every (label, group) cell occurs."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=gen, dtype=DT) * 2.0
    cells = torch.arange(n) % (k * g)
    cells = cells[torch.randperm(n, generator=gen)]
    return logits, cells % k, cells // k


def _nll(f_row: torch.Tensor, y: int) -> torch.Tensor:
    """-log softmax(f)_y for one sample, written out: log sum exp minus the true logit."""
    return torch.log(torch.exp(f_row).sum()) - f_row[y]


def _mean_loss(f, ys, gs, keep) -> torch.Tensor:
    """Mean cross-entropy of the samples i with keep(y_i, g_i), by an explicit loop."""
    terms = [_nll(f[i], int(ys[i])) for i in range(f.shape[0]) if keep(int(ys[i]), int(gs[i]))]
    return torch.stack(terms).sum() / len(terms)


def _value_and_grad(fn, logits):
    f = logits.clone().requires_grad_(True)
    value = fn(f)
    (grad,) = torch.autograd.grad(value, f)
    return value.detach(), grad


def _assert_same(fn, ref, logits):
    value, grad = _value_and_grad(fn, logits)
    ref_value, ref_grad = _value_and_grad(ref, logits)
    assert value.dtype == DT
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12)
    assert grad.abs().sum() > 0


def _units(over):
    if over == "class":
        return [(lambda y, g, c=c: y == c) for c in range(K)]
    if over == "group":
        return [(lambda y, g, h=h: g == h) for h in range(G)]
    return [(lambda y, g, c=c, h=h: y == c and g == h) for h in range(G) for c in range(K)]


# ---------------------------------------------------------------------------------------------------------------
# balanced cross-entropy
# ---------------------------------------------------------------------------------------------------------------


def test_balanced_ce_per_class_and_per_cell():
    logits, y, g = _batch()
    counts = [[40, 5, 1], [2, 9, 30]]  # upper counts per (group, class)
    n_class = [42.0, 14.0, 31.0]
    total = 87.0

    def ref_class(f):
        return sum(total / (K * n_class[int(y[i])]) * _nll(f[i], int(y[i])) for i in range(N)) / N

    def ref_cell(f):
        return sum(total / (G * K * counts[int(g[i])][int(y[i])]) * _nll(f[i], int(y[i])) for i in range(N)) / N

    _assert_same(lambda f: BalancedCrossEntropy(n_class)(f, y, g), ref_class, logits)
    _assert_same(lambda f: BalancedCrossEntropy(counts)(f, y, g), ref_class, logits)  # a table: summed over groups
    _assert_same(lambda f: build_objective("balanced_ce", counts, over="cell")(f, y, g), ref_cell, logits)
    weight = torch.tensor([[total / (G * K * c) for c in row] for row in counts], dtype=DT)
    _assert_same(lambda f: balanced_cross_entropy(f, y, weight, g), ref_cell, logits)
    with pytest.raises(ValueError, match="needs the group"):
        BalancedCrossEntropy(counts, over="cell")(logits, y, None)
    with pytest.raises(ValueError, match=r"no sample of \(label 2, group 0\)"):
        BalancedCrossEntropy([[4, 4, 0], [4, 4, 4]], over="cell")


# ---------------------------------------------------------------------------------------------------------------
# smooth worst class / group / cell
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("over", ["class", "group", "cell"])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 7.0])
def test_worst_group_lse_matches_reference(over, temperature):
    logits, y, g = _batch(seed=1)

    def ref(f):
        means = torch.stack([_mean_loss(f, y, g, keep) for keep in _units(over)])
        return temperature * torch.log(torch.exp(means / temperature).mean())

    counts = [[8, 8, 8], [8, 8, 8]]
    name = "worst_class" if over == "class" else "worst_group"
    kwargs = {"temperature": temperature} if over == "class" else {"over": over, "temperature": temperature}
    _assert_same(lambda f: build_objective(name, counts, **kwargs)(f, y, g), ref, logits)
    _assert_same(lambda f: worst_group_loss(f, y, g, num_groups=G, over=over, temperature=temperature), ref, logits)


def test_lse_lies_between_mean_and_max_and_tends_to_both():
    logits, y, g = _batch(seed=2)
    means = torch.stack([_mean_loss(logits, y, g, keep) for keep in _units("cell")])
    values = [float(worst_group_loss(logits, y, g, G, temperature=t)) for t in (1e-3, 0.1, 1.0, 10.0, 1e4)]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(values))  # decreasing in the temperature
    assert values[0] == pytest.approx(float(means.max()), abs=1e-2)
    assert values[-1] == pytest.approx(float(means.mean()), abs=1e-3)
    assert float(worst_group_loss(logits, y, g, G, mode="max")) == pytest.approx(float(means.max()), rel=1e-12)


@pytest.mark.parametrize("fraction", [0.1, 1 / 6, 0.25, 0.5, 0.8, 1.0])
def test_cvar_matches_its_variational_formula(fraction):
    logits, y, g = _batch(seed=3)

    def ref(f):
        # CVaR_a = max { sum_j q_j L_j : 0 <= q_j <= 1/(a m), sum_j q_j = 1 }: the maximiser q* fills the largest
        # L_j first; by Danskin's theorem the gradient is sum_j q*_j grad L_j (q* held fixed).
        means = torch.stack([_mean_loss(f, y, g, keep) for keep in _units("cell")])
        m = means.numel()
        q, left = [0.0] * m, 1.0
        for j in sorted(range(m), key=lambda j: -float(means[j].detach())):
            q[j] = min(1.0 / (fraction * m), left)
            left -= q[j]
        return sum(qj * lj for qj, lj in zip(q, means))

    _assert_same(lambda f: worst_group_loss(f, y, g, G, mode="cvar", fraction=fraction), ref, logits)
    _assert_same(lambda f: WorstGroupLoss([[8] * K] * G, mode="cvar", fraction=fraction)(f, y, g), ref, logits)


def test_absent_units_are_masked_or_raise():
    logits, y, g = _batch(seed=4)
    keep = ~((y == 2) & (g == 1))  # drop the cell (label 2, group 1) from the batch
    f, yk, gk = logits[keep], y[keep], g[keep]

    def ref(x):
        units = [u for j, u in enumerate(_units("cell")) if j != 1 * K + 2]
        means = torch.stack([_mean_loss(x, yk, gk, u) for u in units])
        return 0.5 * torch.log(torch.exp(means / 0.5).mean())

    objective = WorstGroupLoss([[5] * K] * G, temperature=0.5)
    _assert_same(lambda x: objective(x, yk, gk), ref, f)
    strict = WorstGroupLoss([[5] * K] * G, temperature=0.5, missing="raise")
    with pytest.raises(ValueError, match=r"this upper batch has no sample of \(label 2, group 1\)"):
        strict(f, yk, gk)
    strict(logits, y, g)  # every cell present: fine


# ---------------------------------------------------------------------------------------------------------------
# difference of equal opportunity
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gap", ["abs", "square"])
def test_deo_two_groups_matches_reference(gap):
    logits, y, g = _batch(seed=5)

    def ref(f):
        gaps = []
        for c in range(K):
            d = _mean_loss(f, y, g, lambda yy, gg, c=c: yy == c and gg == 0) - \
                _mean_loss(f, y, g, lambda yy, gg, c=c: yy == c and gg == 1)
            gaps.append(d.abs() if gap == "abs" else d * d)
        return sum(gaps) / K

    _assert_same(lambda f: EqualOpportunityGap([[6] * K] * G, gap=gap)(f, y, g), ref, logits)
    _assert_same(lambda f: build_objective("deo", [[6] * K] * G, gap=gap)(f, y, g), ref, logits)
    _assert_same(lambda f: equal_opportunity_gap(f, y, g, G, gap=gap), ref, logits)

    def ref_positive(f):  # binary-style equal opportunity: one label only
        d = _mean_loss(f, y, g, lambda yy, gg: yy == 1 and gg == 0) - \
            _mean_loss(f, y, g, lambda yy, gg: yy == 1 and gg == 1)
        return d.abs() if gap == "abs" else d * d

    _assert_same(lambda f: equal_opportunity_gap(f, y, g, G, gap=gap, labels=[1]), ref_positive, logits)


@pytest.mark.parametrize(("pairs", "gap"), [("max", "abs"), ("mean", "abs"), ("max", "square"), ("mean", "square")])
def test_deo_three_groups(pairs, gap):
    groups = 3
    logits, y, g = _batch(n=72, g=groups, seed=6)

    def ref(f):
        out = []
        for c in range(K):
            cell = [_mean_loss(f, y, g, lambda yy, gg, c=c, h=h: yy == c and gg == h) for h in range(groups)]
            diffs = [(cell[a] - cell[b]).abs() for a, b in itertools.combinations(range(groups), 2)]
            if pairs == "max":
                d = max(diffs, key=float)
                out.append(d if gap == "abs" else d * d)
            else:
                out.append(sum(d if gap == "abs" else d * d for d in diffs) / len(diffs))
        return sum(out) / K

    _assert_same(lambda f: equal_opportunity_gap(f, y, g, groups, gap=gap, pairs=pairs), ref, logits)


def test_deo_masks_labels_without_two_groups():
    logits, y, g = _batch(seed=7)
    keep = ~((y == 0) & (g == 1))  # label 0 only in group 0 now
    f, yk, gk = logits[keep], y[keep], g[keep]

    def ref(x):
        return sum((_mean_loss(x, yk, gk, lambda yy, gg, c=c: yy == c and gg == 0)
                    - _mean_loss(x, yk, gk, lambda yy, gg, c=c: yy == c and gg == 1)).abs() for c in (1, 2)) / 2

    _assert_same(lambda x: equal_opportunity_gap(x, yk, gk, G), ref, f)
    with pytest.raises(ValueError, match=r"no sample of \(label 0, group 1\)"):
        equal_opportunity_gap(f, yk, gk, G, missing="raise")
    only = (g == 0)  # one group only: no gap can be measured; the batch contributes 0
    x = logits[only].clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="no label in this upper batch has samples of two groups"):
        value = equal_opportunity_gap(x, y[only], g[only], G)
    assert float(value) == 0.0 and value.requires_grad


# ---------------------------------------------------------------------------------------------------------------
# blend
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
def test_blend_matches_reference(lam):
    logits, y, g = _batch(seed=8)
    counts = [[9, 4, 7], [3, 8, 6]]
    total = 37.0

    def ref(f):
        acc = sum(total / (G * K * counts[int(g[i])][int(y[i])]) * _nll(f[i], int(y[i])) for i in range(N)) / N
        fair = sum((_mean_loss(f, y, g, lambda yy, gg, c=c: yy == c and gg == 0)
                    - _mean_loss(f, y, g, lambda yy, gg, c=c: yy == c and gg == 1)).abs() for c in range(K)) / K
        return (1 - lam) * acc + lam * fair

    objective = build_objective("blend", counts, lam=lam, accuracy_kwargs={"over": "cell"})
    _assert_same(lambda f: objective(f, y, g), ref, logits)
    acc = BalancedCrossEntropy(counts, over="cell")
    _assert_same(lambda f: blended_objective(acc(f, y, g), equal_opportunity_gap(f, y, g, G), lam), ref, logits)


def test_blend_of_callables_and_worst_group():
    logits, y, g = _batch(seed=9)
    mse = lambda f, t, gr: (f ** 2).mean()  # noqa: E731
    blend = BlendedObjective([[8] * K] * G, lam=0.25, accuracy=mse, fairness="worst_group",
                             fairness_kwargs={"temperature": 0.2})
    expected = 0.75 * mse(logits, y, g) + 0.25 * worst_group_loss(logits, y, g, G, temperature=0.2)
    torch.testing.assert_close(blend(logits, y, g), expected, rtol=1e-12, atol=0)
    assert blend.uses_groups and blend.requires_all_classes
    # lam = 0: the fairness part is not evaluated (batches without groups are then fine)
    plain = BlendedObjective([[8] * K] * G, lam=0.0)
    torch.testing.assert_close(plain(logits, y, None), BalancedCrossEntropy([16] * K)(logits, y))


# ---------------------------------------------------------------------------------------------------------------
# bad settings and inputs
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs", "match"), [
    ("blend", {"lam": 1.5}, r"lam .* must lie in \[0, 1\]"),
    ("blend", {"lam": -0.1}, r"lam .* must lie in \[0, 1\]"),
    ("worst_group", {"temperature": 0.0}, "temperature must be a positive"),
    ("worst_group", {"temperature": -1.0}, "temperature must be a positive"),
    ("worst_class", {"temperature": float("inf")}, "temperature must be a positive"),
    ("worst_group", {"mode": "cvar", "fraction": 0.0}, r"fraction .* must lie in \(0, 1\]"),
    ("worst_group", {"over": "pixel"}, "over must be one of"),
    ("worst_class", {"over": "cell"}, "'worst_class' ranges over classes"),
    ("deo", {"gap": "cube"}, "gap must be one of"),
    ("deo", {"labels": []}, "labels must be a non-empty list"),
    ("deo", {"tempreature": 1.0}, r"takes no argument \['tempreature'\]"),
    ("blend", {"fairness": "unknown"}, "Unknown upper objective 'unknown'"),
    ("blend", {"fairness": "blend"}, "cannot itself be a blend"),
    ("blend", {"fairness_kwargs": {"temperature": 0}}, "takes no argument"),
    ("blend", {"fairness": "worst_group", "fairness_kwargs": {"temperature": 0}}, "temperature must be a positive"),
    ("no_such_objective", {}, "Unknown upper objective"),
])
def test_bad_settings_fail_without_counts(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_objective(name, **kwargs)
    with pytest.raises(ValueError, match=match):
        build_objective(name, [[5] * K] * G, **kwargs)


def test_group_indices_and_missing_groups():
    logits, y, g = _batch(seed=10)
    with pytest.raises(ValueError, match=r"group must lie in \[0, 2\)"):
        worst_group_loss(logits, y, g + 1, num_groups=G)
    with pytest.raises(ValueError, match=r"group must lie in \[0, 2\)"):
        EqualOpportunityGap([[5] * K] * G)(logits, y, g - 1)
    with pytest.raises(ValueError, match="needs the group of every sample"):
        WorstGroupLoss([[5] * K] * G)(logits, y, None)
    with pytest.raises(ValueError, match="needs the group of every sample"):
        EqualOpportunityGap([[5] * K] * G)(logits, y, None)
    # units missing from the upper data: refused when the objective is built
    with pytest.raises(ValueError, match=r"the upper data has no sample of group 1"):
        WorstGroupLoss([[5] * K, [0] * K], over="group")
    with pytest.raises(ValueError, match=r"the upper data has no sample of \(label 1, group 0\)"):
        build_objective("deo", [[5, 0, 5], [5, 5, 5]])
    EqualOpportunityGap([[5, 0, 5], [5, 5, 5]], labels=[0, 2])  # the missing cell's label is not asked for
    with pytest.raises(ValueError, match="needs num_groups >= 2"):
        build_objective("deo", [5] * K)
    with pytest.raises(ValueError, match="needs groups"):
        build_objective("worst_group", [5] * K)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        EqualOpportunityGap([[5] * K] * G, labels=[3])


def test_registry_and_callables():
    assert set(OBJECTIVES) == {"balanced_ce", "worst_class", "worst_group", "deo", "blend"}
    fn = lambda f, t, g: f.sum()  # noqa: E731
    assert build_objective(fn, [1, 2, 3]) is fn
    with pytest.raises(ValueError, match="only for a named objective"):
        build_objective(fn, [1, 2, 3], lam=0.5)
    assert isinstance(build_objective("Equal-Opportunity", [[3] * K] * G), EqualOpportunityGap)
    logits, y, g = _batch(seed=11)
    for name in OBJECTIVES:  # every named objective is differentiable and returns a float64 scalar here
        value, grad = _value_and_grad(lambda f, name=name: build_objective(name, [[8] * K] * G)(f, y, g), logits)
        assert value.ndim == 0 and math.isfinite(float(value)) and torch.isfinite(grad).all()


def test_low_precision_logits_give_float32_objectives():
    logits, y, g = _batch(seed=12)
    for name in OBJECTIVES:
        value = build_objective(name, [[8] * K] * G)(logits.to(torch.bfloat16), y, g)
        assert value.dtype == torch.float32, name


# ====================================================================== several processes
ACROSS = [
    ("worst_class", {}),
    ("worst_group", {"mode": "cvar", "fraction": 0.4}),
    ("worst_group", {"over": "group", "mode": "max"}),
    ("deo", {"gap": "square"}),
    ("blend", {"lam": 0.3, "accuracy": "worst_group", "fairness": "deo"}),
]


@pytest.mark.parametrize(("name", "kwargs"), ACROSS)
def test_a_reducer_gives_the_objective_of_the_union(name: str, kwargs: dict) -> None:
    """Two simulated processes (halves of one batch, some cells absent from a half), each with a Reducer that adds
    the other's statistics: each gets the value on the union, and the mean of their gradients is the gradient on the
    union (float64)."""
    torch.manual_seed(0)
    k, world = 3, 2
    target = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2, 0, 2, 1, 0, 1])
    group = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1])
    logits = torch.randn(len(target), k, dtype=torch.float64)
    cells = torch.zeros(2, k, dtype=torch.long).index_put_((group, target), torch.ones_like(target), accumulate=True)
    objective = build_objective(name, cells.tolist(), **kwargs)
    union = logits.clone().requires_grad_(True)
    exact = objective(union, target, group)
    (exact_grad,) = torch.autograd.grad(exact, union)
    halves = [slice(0, 5), slice(5, None)]  # the first half has no sample of group 1
    # What each process would send to the all-reduce, recorded with a reduction that returns it unchanged.
    sent: list[list[torch.Tensor]] = []
    for h in halves:
        calls: list[torch.Tensor] = []
        recording = Reducer(world, sum=lambda t, calls=calls: calls.append(t.clone()) or t)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            UpperObjective(name, **kwargs).build(cells.tolist(), recording)(logits[h], target[h], group[h])
        sent.append(calls)
    grad = torch.zeros_like(logits)
    naive = []
    for rank, h in enumerate(halves):
        received = iter(sent[1 - rank])
        reducer = Reducer(world, sum=lambda t, received=received: t + next(received))
        part = logits[h].clone().requires_grad_(True)
        value = UpperObjective(name, **kwargs).build(cells.tolist(), reducer, validate=False)(part, target[h],
                                                                                              group[h])
        torch.testing.assert_close(value, exact.detach(), rtol=1e-12, atol=1e-12)
        (grad[h],) = torch.autograd.grad(value, part)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the first half alone has no equal-opportunity gap to measure
            naive.append(float(objective(logits[h], target[h], group[h])))
    torch.testing.assert_close(grad / world, exact_grad, rtol=1e-10, atol=1e-12)
    # Without the reducer, the mean of the per-process values is not the union's value (the test has teeth).
    assert abs(sum(naive) / world - float(exact)) > 1e-3


def test_reducer_checks_world_size_and_is_used_only_when_given() -> None:
    with pytest.raises(ValueError, match="world_size must be a positive integer; got 0"):
        Reducer(world_size=0)
    with pytest.raises(ValueError, match="needs a sum"):
        Reducer(world_size=2)
    logits, target = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    before = worst_group_loss(logits, target, over="class")
    calls: list[torch.Tensor] = []
    twice = Reducer(2, sum=lambda t: calls.append(t) or 2 * t)  # a second process with the same batch
    torch.testing.assert_close(worst_group_loss(logits, target, over="class", reducer=twice), before)
    assert len(calls) == 1
    torch.testing.assert_close(worst_group_loss(logits, target, over="class"), before)
    assert len(calls) == 1  # no reducer given: no reduction


@pytest.mark.parametrize(("name", "kwargs"), [*ACROSS, ("balanced_ce", {}), ("worst_group", {"mode": "lse"}),
                                              ("deo", {"pairs": "mean"}), ("worst_class", {"mode": "cvar"})])
def test_built_for_the_callback_reads_nothing_back(name: str, kwargs: dict, monkeypatch) -> None:
    """Built with validate=False, every objective is computed on the device alone: no host read, no .cpu(), no
    nonzero, no indexing by a boolean mask (a device synchronisation each on a GPU), and the same value."""
    logits, y, g = _batch(seed=3)
    y, g = y[:10], g[:10]  # some units absent
    logits = logits[:10]
    spec = UpperObjective(name, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        checked = spec.build([[8] * K] * G)(logits, y, g)
    calls: list[str] = []

    def record(attr):
        original = getattr(torch.Tensor, attr)

        def wrapper(t, *args, **kw):
            if attr == "__getitem__":
                index = args[0] if args else None
                parts = index if isinstance(index, tuple) else (index,)
                if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                    calls.append("boolean mask")
            else:
                calls.append(attr)
            return original(t, *args, **kw)
        return wrapper

    objective = spec.build([[8] * K] * G, Reducer(), validate=False)  # built from counts on the host, at setup
    for attr in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "nonzero", "__getitem__"):
        monkeypatch.setattr(torch.Tensor, attr, record(attr))
    monkeypatch.setattr(torch, "nonzero", lambda *a, **kw: calls.append("torch.nonzero"))
    value = objective(logits, y, g)
    monkeypatch.undo()
    assert calls == []
    torch.testing.assert_close(value, checked, rtol=0, atol=0)
