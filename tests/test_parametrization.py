"""Parametrisations of alpha: shapes, start at the preset, invariants, frequency bins, interpolation, state.

The expected preset tables and the interpolation are written here from their formulas (numpy's ``interp`` for
the piecewise-linear interpolation between bin centres), not taken from the library.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lightning_autobalance.core.losses import LossTables
from lightning_autobalance.core.parametrization import (
    DatasetDependent,
    FrequencyGroups,
    LossParametrization,
    PerClass,
    build_parametrization,
    frequency_bins,
)

DT = torch.float64
# deliberately not sorted, with a tie (30, 30), so that frequency order differs from index order
COUNTS = [30, 400, 9, 120, 30, 4, 200, 60, 15, 2]
K = len(COUNTS)
ALL = ("delta", "offset", "weight")


def ref_preset(name: str, counts, tau: float = 1.0, gamma: float | None = None, beta: float = 0.9999):
    """(delta, offset, weight) of a preset from the formulas of DESIGN.md section 2, float64, (G, K)."""
    n = torch.as_tensor(counts, dtype=DT)
    n = n[None] if n.ndim == 1 else n
    k = n.shape[1]
    ones, zeros = torch.ones_like(n), torch.zeros_like(n)
    ratio = n / n.max(dim=1, keepdim=True).values
    log_pi = torch.log(n / n.sum(dim=1, keepdim=True))
    if name == "ce":
        return ones, zeros, ones
    if name == "la":
        return ones, tau * log_pi, ones
    if name == "cdt":
        return ratio ** (0.2 if gamma is None else gamma), zeros, ones
    if name == "vs":
        return ratio ** (0.3 if gamma is None else gamma), tau * log_pi, ones
    if name == "class_balanced":
        w = (1 - beta) / (1 - beta**n)
        return ones, zeros, w / w.sum(dim=1, keepdim=True) * k
    if name == "inverse_frequency":
        w = 1.0 / n
        return ones, zeros, w / w.sum(dim=1, keepdim=True) * k
    raise AssertionError(name)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


def _randomize(p: LossParametrization, scale: float = 1.0, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in p.alpha().values():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=DT) * scale + (0.5 if t.ndim == 0 else 0.0))


def _sorted_order(counts) -> list[int]:
    # frequency order (largest first), ties by class index: the order the bins follow
    return [int(i) for i in np.lexsort((np.arange(len(counts)), -np.asarray(counts, dtype=float)))]


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("num_groups", [None, 3])
def test_alpha_and_table_shapes(num_groups):
    g = num_groups or 1
    p = build_parametrization("class", COUNTS, preset="la", search=ALL, num_groups=num_groups)
    assert isinstance(p, PerClass) and p.kind == "class"
    assert {k: tuple(v.shape) for k, v in p.alpha().items()} == {n: (g, K) for n in ALL}
    assert p.num_free() == 3 * g * K

    p = build_parametrization("groups", COUNTS, preset="la", search=("offset", "weight"), num_groups=num_groups,
                              group_size=3)
    assert isinstance(p, FrequencyGroups) and p.kind == "groups"
    assert {k: tuple(v.shape) for k, v in p.alpha().items()} == {"offset": (g, 4), "weight": (g, 4)}

    p = build_parametrization("dataset", COUNTS, preset="vs", search=ALL, num_groups=num_groups)
    assert isinstance(p, DatasetDependent) and p.kind == "dataset"
    assert {k: tuple(v.shape) for k, v in p.alpha().items()} == {"gamma": (), "tau": (), "omega": ()}
    assert p.num_free() == 3

    for kind in ("class", "groups", "dataset"):
        p = build_parametrization(kind, COUNTS, preset="vs", search=ALL, num_groups=num_groups, group_size=4)
        assert p.num_classes == K and p.num_groups == g
        tables = p.tables()
        assert isinstance(tables, LossTables)
        assert [tuple(t.shape) for t in tables] == [(g, K)] * 3
        assert [tuple(t.shape) for t in p.retraining_tables()] == [(g, K)] * 3
        assert all(v.dtype == torch.float32 for v in p.alpha().values())
        assert all(not isinstance(b, torch.nn.Parameter) for b in p.buffers())
        assert list(p.parameters()) == []


def test_bad_arguments():
    with pytest.raises(ValueError,
                       match=r"Unknown parametrization 'perclass'; expected 'hierarchical', 'class', 'groups' or"):
        build_parametrization("perclass", COUNTS)
    with pytest.raises(ValueError, match=r"search names unknown tables \['scale'\]; expected a subset of"):
        build_parametrization("class", COUNTS, search=("delta", "scale"))
    with pytest.raises(ValueError, match=r"num_groups must be at least 1; got 0"):
        PerClass(COUNTS, num_groups=0)
    with pytest.raises(ValueError, match=r"group_size must be at least 1; got 0"):
        frequency_bins(COUNTS, 0)
    with pytest.raises(ValueError, match=r"class_counts must be positive"):
        build_parametrization("groups", [3, 0, 1], group_size=2)
    assert PerClass(COUNTS, search="delta+offset").search == ("delta", "offset")
    assert PerClass(COUNTS, search="weight, offset").search == ("weight", "offset")


# ---------------------------------------------------------------- the start is the preset


START_CASES = [(kind, preset) for kind in ("class", "groups")
               for preset in ("ce", "la", "cdt", "vs", "class_balanced", "inverse_frequency")]
START_CASES += [("dataset", p) for p in ("ce", "la", "cdt", "vs", "inverse_frequency")]


@pytest.mark.parametrize(("kind", "preset"), START_CASES)
def test_initial_alpha_gives_the_preset(kind, preset):
    p = build_parametrization(kind, COUNTS, preset=preset, search=ALL, group_size=3)
    expected = ref_preset(preset, COUNTS)
    for got, want in zip(p.tables(), expected):
        _close(got, want)
    for got, want in zip(p.retraining_tables(), expected):
        _close(got, want)
    if kind != "dataset":
        assert all(bool((v == 0).all()) for v in p.alpha().values())
    # reset() returns to the start after a change
    _randomize(p, seed=3)
    assert not torch.allclose(p.tables().offset.double(), expected[1], atol=1e-3)
    p.reset()
    for got, want in zip(p.tables(), expected):
        _close(got, want)


def test_preset_kwargs_reach_the_start():
    p = build_parametrization("class", COUNTS, preset="vs", preset_kwargs={"gamma": 0.6, "tau": 1.4})
    for got, want in zip(p.tables(), ref_preset("vs", COUNTS, gamma=0.6, tau=1.4)):
        _close(got, want)
    d = build_parametrization("dataset", COUNTS, preset="vs", preset_kwargs={"gamma": 0.6, "tau": 1.4})
    assert d.alpha()["gamma"].item() == pytest.approx(0.6)
    assert d.alpha()["tau"].item() == pytest.approx(1.4)
    for got, want in zip(d.tables(), ref_preset("vs", COUNTS, gamma=0.6, tau=1.4)):
        _close(got, want)


# ---------------------------------------------------------------- only the searched tables move


@pytest.mark.parametrize("kind", ["class", "groups", "dataset"])
@pytest.mark.parametrize("search", [("delta",), ("offset",), ("weight",), ("delta", "weight"), ALL])
def test_only_searched_tables_change(kind, search):
    preset = "vs" if kind == "dataset" else "class_balanced"
    p = build_parametrization(kind, COUNTS, preset=preset, search=search, group_size=3)
    before = p.tables()
    _randomize(p, seed=1)
    after = p.tables()
    for name, b, a in zip(ALL, before, after):
        if name in search:
            assert not torch.allclose(a, b, atol=1e-3), f"{name} is searched but did not move"
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tables_are_differentiable_in_alpha():
    for kind in ("class", "groups", "dataset"):
        p = build_parametrization(kind, COUNTS, preset="la", search=ALL, group_size=3)
        _randomize(p, seed=2)
        alpha = {k: v.detach().clone().requires_grad_(True) for k, v in p.alpha().items()}
        tables = p.tables(alpha)
        probe = torch.linspace(-1, 1, K)
        (tables.delta * probe).sum().backward(retain_graph=True)
        (tables.offset * probe).sum().backward(retain_graph=True)
        (tables.weight * probe).sum().backward()
        for name, a in alpha.items():
            assert a.grad is not None and bool(torch.isfinite(a.grad).all()) and a.grad.abs().sum() > 0, name
        # passing alpha explicitly gives the same tables as storing it
        with torch.no_grad():
            for k, v in alpha.items():
                p.alpha()[k].copy_(v)
        for a, b in zip(tables, p.tables()):
            torch.testing.assert_close(a.detach(), b)


# ---------------------------------------------------------------- no drifting scale, positivity


@pytest.mark.parametrize("kind", ["class", "groups"])
@pytest.mark.parametrize("num_groups", [None, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_invariants(kind, num_groups, seed):
    for preset in ("vs", "class_balanced"):
        p = build_parametrization(kind, COUNTS, preset=preset, search=ALL, num_groups=num_groups, group_size=3)
        base = [t.double() for t in p.tables()]
        _randomize(p, scale=3.0, seed=seed)
        delta, offset, weight = (t.double() for t in p.tables())
        assert not torch.allclose(offset, base[1], atol=1e-2)
        _close(offset.mean(dim=1), base[1].mean(dim=1), 1e-5)  # common shift of each row fixed
        _close(weight.sum(), base[2].sum(), 1e-5)  # total weight fixed
        _close(torch.log(delta).mean(), torch.log(base[0]).mean(), 1e-5)  # geometric mean of delta fixed
        # a common shift of the free values is invisible
        before = p.tables()
        with torch.no_grad():
            for t in p.alpha().values():
                t.add_(5.0)
        for a, b in zip(p.tables(), before):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dataset_weights_keep_their_total():
    p = build_parametrization("dataset", [[5, 50, 500], [400, 40, 4]], preset="inverse_frequency", search=ALL)
    for seed in range(4):
        _randomize(p, scale=2.0, seed=seed)
        _close(p.tables().weight.sum(dim=1), torch.full((2,), 3.0, dtype=DT))


@pytest.mark.parametrize("kind", ["class", "groups", "dataset"])
def test_positivity_for_large_alpha(kind):
    p = build_parametrization(kind, COUNTS, preset="vs", search=ALL, num_groups=2, group_size=3)
    for seed in range(5):
        # alpha spreads of ~50 (exp(50) ~ 5e21): far beyond a search, still inside float32's range
        _randomize(p, scale=8.0 if kind != "dataset" else 3.0, seed=seed)
        delta, offset, weight = p.tables()
        for t in (delta, offset, weight):
            assert bool(torch.isfinite(t).all())
        assert bool((delta > 0).all()) and bool((weight > 0).all())


# ---------------------------------------------------------------- frequency bins


@pytest.mark.parametrize(("k", "g", "sizes"), [(10, 3, [3, 3, 3, 1]), (10, 4, [4, 4, 2]), (10, 1, [1] * 10),
                                               (10, 10, [10]), (10, 15, [10]), (100, 30, [30, 30, 30, 10])])
def test_frequency_bins_cover_every_class_once_in_frequency_order(k, g, sizes):
    rng = np.random.default_rng(k + g)
    counts = rng.integers(1, 50, size=k).tolist()  # random order, many ties
    bins = frequency_bins(counts, g)
    assert [len(b) for b in bins] == sizes
    flat = [c for b in bins for c in b]
    assert sorted(flat) == list(range(k))  # every class exactly once
    assert flat == _sorted_order(counts)
    seen = [counts[c] for c in flat]
    assert all(a >= b for a, b in itertools.pairwise(seen))  # largest first
    p = FrequencyGroups(counts, group_size=g, search="offset")
    assert p.alpha()["offset"].shape == (1, len(sizes))
    assert p.bins == bins


@pytest.mark.parametrize(("k", "g"), [(10, 3), (10, 4), (100, 30)])
def test_frequency_groups_share_one_value_per_bin(k, g):
    counts = list(range(3 * k, 0, -3))[::-1]  # increasing: frequency order is the reverse of index order
    p = FrequencyGroups(counts, group_size=g, preset="ce", search=("offset", "delta"))
    m = p.alpha()["offset"].shape[1]
    values = torch.linspace(-2.0, 3.0, m, dtype=DT) ** 2  # not monotone
    with torch.no_grad():
        p.alpha()["offset"].copy_(values[None])
        p.alpha()["delta"].copy_(values[None])
    order = _sorted_order(counts)
    v = torch.empty(k, dtype=DT)
    for pos, cls in enumerate(order):
        v[cls] = values[pos // g]
    tables = p.tables()
    _close(tables.offset[0], v - v.mean())
    _close(tables.delta[0], torch.exp(v - v.mean()))
    torch.testing.assert_close(tables.weight, torch.ones(1, k))


# ---------------------------------------------------------------- retraining interpolation


def _interp_reference(counts, g, values):
    """Class values interpolated linearly between bin centres in frequency order; constant beyond the ends."""
    order = _sorted_order(counts)
    k = len(counts)
    sizes = [min(g, k - s) for s in range(0, k, g)]
    starts = np.cumsum([0, *sizes[:-1]])
    centres = starts + (np.asarray(sizes) - 1) / 2.0
    at_pos = np.interp(np.arange(k), centres, np.asarray(values, dtype=float))
    out = np.empty(k)
    out[order] = at_pos
    return torch.tensor(out, dtype=DT), [order[int(c)] for c in centres if float(c).is_integer()], centres


@pytest.mark.parametrize(("k", "g"), [(10, 3), (10, 4), (10, 2), (100, 30), (100, 10), (7, 7)])
def test_retraining_interpolation_matches_reference(k, g):
    rng = np.random.default_rng(k * g)
    counts = rng.permutation(np.arange(1, k + 1) * 7).tolist()
    p = FrequencyGroups(counts, group_size=g, preset="ce", search=ALL)
    m = len(p.bins)
    values = torch.tensor(rng.normal(size=m), dtype=DT)
    with torch.no_grad():
        for t in p.alpha().values():
            t.copy_(values[None])
    v, centre_classes, _ = _interp_reference(counts, g, values.numpy())
    tables = p.retraining_tables()
    _close(tables.offset[0], v - v.mean())
    _close(tables.delta[0], torch.exp(v - v.mean()))
    _close(tables.weight[0], torch.exp(v) / torch.exp(v).sum() * k)
    # each class at a bin's centre gets exactly that bin's value (up to the common shift)
    centre_bins = [next(i for i, b in enumerate(p.bins) if c in b) for c in centre_classes]
    if len(centre_classes) >= 2:
        shift = (tables.offset[0, centre_classes[0]] - values[centre_bins[0]]).item()
        for c, b in zip(centre_classes, centre_bins):
            assert tables.offset[0, c].item() - shift == pytest.approx(values[b].item(), abs=1e-5)


@pytest.mark.parametrize(("k", "g"), [(10, 3), (10, 4), (100, 30), (100, 33)])
def test_retraining_interpolation_properties(k, g):
    counts = [int(c) for c in np.random.default_rng(1).permutation(np.arange(5, 5 + 3 * k, 3))]
    p = FrequencyGroups(counts, group_size=g, preset="la", search=("offset",))
    m = len(p.bins)
    base = p.tables().offset
    # constant bin values give constant class values: the retraining tables are the preset's
    with torch.no_grad():
        p.alpha_offset.fill_(1.7)
    torch.testing.assert_close(p.retraining_tables().offset, base, rtol=1e-6, atol=1e-6)
    # a monotone alpha gives values monotone along the frequency order
    increasing = torch.cumsum(torch.rand(m, generator=torch.Generator().manual_seed(0)) + 0.1, 0)
    with torch.no_grad():
        p.alpha_offset.copy_(increasing[None])
    added = (p.retraining_tables().offset - base)[0]
    along = added[_sorted_order(counts)]
    assert bool((along[1:] - along[:-1] >= -1e-6).all())
    assert along[-1] - along[0] > 0.1
    # retraining differs from the bin-constant search tables (unless bins are single classes)
    assert not torch.allclose(p.retraining_tables().offset, p.tables().offset, atol=1e-3)
    # the class at the centre of an odd bin takes the bin's value exactly (offsets are centred, so compare
    # differences between centre classes with differences between bin values)
    centre = [(b[(len(b) - 1) // 2], i) for i, b in enumerate(p.bins) if len(b) % 2 == 1]
    assert len(centre) >= (2 if g % 2 else 0)  # even bins have no class at their centre
    for (c, i), (c0, i0) in zip(centre[1:], centre[:-1]):
        assert (added[c] - added[c0]).item() == pytest.approx((increasing[i] - increasing[i0]).item(), abs=1e-5)


def test_per_class_retraining_tables_are_the_tables():
    p = build_parametrization("class", COUNTS, preset="vs", search=ALL)
    _randomize(p, seed=4)
    for a, b in zip(p.retraining_tables(), p.tables()):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- dataset-dependent


@pytest.mark.parametrize("counts", [COUNTS, [[5, 50, 500], [300, 30, 3]]])
def test_dataset_dependent_formulas(counts):
    gamma, tau, omega = 0.7, 1.3, 0.6
    p = DatasetDependent(counts, preset="ce", search=ALL)
    with torch.no_grad():
        p.alpha()["gamma"].fill_(gamma)
        p.alpha()["tau"].fill_(tau)
        p.alpha()["omega"].fill_(omega)
    n = torch.as_tensor(counts, dtype=DT)
    n = n[None] if n.ndim == 1 else n
    pi = n / n.sum(dim=1, keepdim=True)
    raw = pi ** (-omega)
    delta, offset, weight = p.tables()
    _close(delta, (n / n.max(dim=1, keepdim=True).values) ** gamma)
    _close(offset, tau * torch.log(pi))
    _close(weight, raw / raw.sum(dim=1, keepdim=True) * n.shape[1])
    # only tau searched: gamma and omega keep the preset's start (vs: gamma 0.3; omega 0)
    q = DatasetDependent(counts, preset="vs", search="offset")
    assert set(q.alpha()) == {"tau"} and q.alpha()["tau"].item() == pytest.approx(1.0)
    with torch.no_grad():
        q.alpha()["tau"].fill_(tau)
    _close(q.tables().delta, (n / n.max(dim=1, keepdim=True).values) ** 0.3)
    _close(q.tables().offset, tau * torch.log(pi))
    _close(q.tables().weight, torch.ones_like(n))


def test_dataset_dependent_start_values():
    assert {k: v.item() for k, v in DatasetDependent(COUNTS, preset="cdt", search=ALL).alpha().items()} == \
        pytest.approx({"gamma": 0.2, "tau": 0.0, "omega": 0.0})
    assert {k: v.item() for k, v in DatasetDependent(COUNTS, preset="la", search=ALL,
                                                     preset_kwargs={"tau": 0.5}).alpha().items()} == \
        pytest.approx({"gamma": 0.0, "tau": 0.5, "omega": 0.0})
    assert {k: v.item() for k, v in DatasetDependent(COUNTS, preset="inv_freq", search=ALL).alpha().items()} == \
        pytest.approx({"gamma": 0.0, "tau": 0.0, "omega": 1.0})


@pytest.mark.parametrize("preset", ["class_balanced", "cb", "class-balanced"])
def test_dataset_dependent_rejects_class_balanced(preset):
    with pytest.raises(ValueError, match=r"preset 'class_balanced' is not in the dataset-dependent family"):
        build_parametrization("dataset", COUNTS, preset=preset)
    with pytest.raises(ValueError, match=r"not in the dataset-dependent family"):
        DatasetDependent(COUNTS, preset=preset)


# ---------------------------------------------------------------- state


@pytest.mark.parametrize("kind", ["class", "groups", "dataset"])
def test_state_dict_round_trip(kind):
    def make():
        return build_parametrization(kind, COUNTS, preset="vs", search=ALL, group_size=3, num_groups=2)

    p = make()
    _randomize(p, seed=7)
    p.frozen = True
    sd = p.state_dict()
    assert all(f"alpha_{k}" in sd for k in p.alpha())
    assert sd["_extra_state"]["frozen"] is True and sd["_extra_state"]["kind"] == kind
    fresh = make()
    assert fresh.frozen is False
    assert any(not torch.equal(a, b) for a, b in zip(fresh.alpha().values(), p.alpha().values()))
    fresh.load_state_dict(sd)
    assert fresh.frozen is True
    for k, v in p.alpha().items():
        torch.testing.assert_close(fresh.alpha()[k], v, rtol=0, atol=0)
    for a, b in zip(fresh.tables(), p.tables()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # unfrozen state comes back unfrozen
    p.frozen = False
    fresh.load_state_dict(p.state_dict())
    assert fresh.frozen is False


def test_state_dict_of_another_kind_or_search_raises():
    src = PerClass(COUNTS, preset="la", search=("delta", "offset"))
    same_shapes = FrequencyGroups(COUNTS, group_size=1, preset="la", search=("delta", "offset"))
    with pytest.raises(ValueError, match=r"saved loss parametrisation is 'class' .* this module has 'groups'"):
        same_shapes.load_state_dict(src.state_dict())
    with pytest.raises(ValueError, match=r"saved loss parametrisation is 'class' .* this module has 'dataset'"):
        DatasetDependent(COUNTS, preset="la").load_state_dict(src.state_dict())
    with pytest.raises(ValueError, match=r"searching \['delta', 'offset'\], but this module has 'class' searching "
                                         r"\['offset'\]"):
        PerClass(COUNTS, preset="la", search="offset").load_state_dict(src.state_dict(), strict=False)


@pytest.mark.parametrize("kind", ["class", "groups", "dataset"])
def test_precision_casts(kind):
    p = build_parametrization(kind, COUNTS, preset="vs", search=ALL, group_size=3)
    _randomize(p, seed=8)
    ref = [t.double() for t in p.tables()]
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.bfloat16()):
        q = build_parametrization(kind, COUNTS, preset="vs", search=ALL, group_size=3)
        q.load_state_dict(p.state_dict())
        out = cast(q)
        assert out is q
        assert all(v.dtype == torch.float32 for v in q.alpha().values())
        assert all(b.dtype in (torch.float32, torch.float64) for b in q.buffers())
        for got, want in zip(q.tables(), ref):
            assert got.dtype == torch.float32
            _close(got, want, 1e-6)
    q = build_parametrization(kind, COUNTS, preset="vs", search=ALL, group_size=3)
    q.load_state_dict(p.state_dict())
    q.double()
    assert all(v.dtype == torch.float64 for v in q.alpha().values())
    for got, want in zip(q.tables(), ref):
        assert got.dtype == torch.float64
        _close(got, want, 1e-6)
    q.float()
    assert all(v.dtype == torch.float32 for v in q.alpha().values())


def test_per_class_from_tables():
    gen = torch.Generator().manual_seed(11)
    tables = LossTables(torch.rand(2, 4, generator=gen) + 0.5, torch.randn(2, 4, generator=gen),
                        torch.rand(2, 4, generator=gen) + 0.1)
    p = PerClass.from_tables(tables)
    assert p.num_free() == 0 and p.alpha() == {}
    assert p.num_groups == 2 and p.num_classes == 4
    torch.testing.assert_close(p.class_counts, torch.ones(2, 4, dtype=DT))
    for a, b in zip(p.tables(), tables):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    q = PerClass.from_tables(tables, class_counts=[9, 7, 5, 3], search=("offset", "weight"))
    torch.testing.assert_close(q.class_counts, torch.tensor([[9, 7, 5, 3]] * 2, dtype=DT))
    assert {k: tuple(v.shape) for k, v in q.alpha().items()} == {"offset": (2, 4), "weight": (2, 4)}
    for a, b in zip(q.tables(), tables):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _randomize(q, seed=12)
    moved = q.tables()
    torch.testing.assert_close(moved.delta, tables.delta, rtol=0, atol=0)
    _close(moved.offset.mean(dim=1), tables.offset.mean(dim=1))
    _close(moved.weight.sum(), tables.weight.sum())
    assert not torch.allclose(moved.offset, tables.offset, atol=1e-3)
    with pytest.raises(ValueError, match=r"class_counts has 3 classes, expected num_classes=4"):
        PerClass.from_tables(tables, class_counts=[1, 2, 3])


# ---------------------------------------------------------------- hierarchical: shared scalars + residuals


def test_hierarchical_start_is_the_preset_and_tau_walks_from_ce_to_la():
    for preset in ("ce", "la", "vs", "class_balanced", "inverse_frequency"):
        p = build_parametrization("hierarchical", COUNTS, preset=preset, search=ALL)
        assert {k: tuple(v.shape) for k, v in p.alpha().items()} == {
            "gamma": (), "delta": (1, K), "tau": (), "offset": (1, K), "omega": (), "weight": (1, K)}
        for got, want in zip(p.tables(), ref_preset(preset, COUNTS)):
            _close(got, want)
    # from CE, tau = t gives t * log pi (up to the row's common shift, which the loss cannot see)
    p = build_parametrization("hierarchical", COUNTS, preset="ce", search="offset")
    log_pi = torch.log(torch.as_tensor(COUNTS, dtype=DT) / sum(COUNTS))
    for t in (0.5, 1.0, 1.7):
        with torch.no_grad():
            p.alpha()["tau"].fill_(t)
        got = p.tables().offset.double()[0]
        _close(got - got.mean(), t * (log_pi - log_pi.mean()), 1e-5)
    # from LA, tau = -1 is cross-entropy; gamma and omega are the dataset family's exponents around the preset
    q = build_parametrization("hierarchical", COUNTS, preset="la", search=ALL)
    with torch.no_grad():
        q.alpha()["tau"].fill_(-1.0)
        q.alpha()["gamma"].fill_(0.3)
        q.alpha()["omega"].fill_(1.0)
    delta, offset, weight = (t.double()[0] for t in q.tables())
    counts = torch.as_tensor(COUNTS, dtype=DT)
    _close(offset - offset.mean(), torch.zeros(K, dtype=DT), 1e-5)
    ratio = (counts / counts.max()) ** 0.3
    _close(delta, ratio / torch.exp(torch.log(ratio).mean()), 1e-5)
    _close(weight, (1 / counts) / (1 / counts).sum() * K, 1e-5)


def test_hierarchical_residuals_are_centred_and_shrinkable():
    p = build_parametrization("hierarchical", [[5, 50, 500], [400, 40, 4]], preset="la", search=ALL)
    base = [t.double() for t in p.tables()]
    _randomize(p, scale=2.0, seed=4)
    delta, _, weight = (t.double() for t in p.tables())
    _close(weight.sum(), base[2].sum(), 1e-5)
    _close(torch.log(delta).mean(), torch.log(base[0]).mean(), 1e-5)
    counts = p.free_value_counts(torch.tensor([3.0, 0.0, 7.0]))
    assert sorted(counts) == sorted(ALL)  # residuals only, never the shared scalars
    _close(counts["offset"], torch.tensor([[3.0, 0.0, 7.0], [3.0, 0.0, 7.0]], dtype=DT))
    with pytest.raises(ValueError, match=r"counts must have shape \(K,\) or \(G, K\) with K=3"):
        p.free_value_counts(torch.ones(4))
    assert build_parametrization("dataset", COUNTS, search=ALL).free_value_counts(torch.ones(K)) == {}
    g = build_parametrization("groups", COUNTS, preset="la", search="offset", group_size=3)
    per_bin = g.free_value_counts(torch.arange(1.0, K + 1))["offset"][0]
    assert per_bin.shape == (len(g.bins),)
    for m, members in enumerate(g.bins):
        assert per_bin[m].item() == pytest.approx(sum(c + 1.0 for c in members))
