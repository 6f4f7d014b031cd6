"""The loss family and the baseline losses against each paper's own formula (float64).

Every reference below is written from the formula of its paper (logit adjustment, balanced softmax, CDT, VS,
class-balanced, inverse frequency, LDAM with DRW, focal loss); none of them calls the library. Values and the
gradients with respect to the logits are compared.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_autobalance.core.losses import (
    LOSS_FILE_FORMAT,
    PRESETS,
    AdjustedCrossEntropy,
    FocalLoss,
    LDAMLoss,
    LossTables,
    adjusted_cross_entropy,
    as_count_table,
    class_balanced_weights,
    focal_loss,
    ldam_loss,
    ldam_margins,
    load_loss_tables,
    preset_tables,
    resolve_preset,
    save_loss_tables,
)

DT = torch.float64
COUNTS = [500, 160, 45, 12, 3]
K = len(COUNTS)


def _n() -> torch.Tensor:
    return torch.tensor(COUNTS, dtype=DT)


def _batch(n: int = 16, k: int = K, seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=gen, dtype=DT) * scale
    extra = torch.randint(0, k, (max(n - k, 0),), generator=gen)
    target = torch.cat([torch.arange(k), extra])[:n]  # every class present when n >= k
    return logits, target


def _value_and_grad(fn, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = logits.detach().clone().requires_grad_(True)
    value = fn(f)
    (grad,) = torch.autograd.grad(value, f)
    return value.detach(), grad


def _assert_same_value_and_grad(fn_lib, fn_ref, logits: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-12):
    v_lib, g_lib = _value_and_grad(fn_lib, logits)
    v_ref, g_ref = _value_and_grad(fn_ref, logits)
    assert v_lib.dtype == DT
    torch.testing.assert_close(v_lib, v_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(g_lib, g_ref, rtol=rtol, atol=atol)
    assert g_ref.abs().sum() > 0  # the comparison is not vacuous


# ---------------------------------------------------------------- references from the papers


def ref_ce(f, y):
    return F.cross_entropy(f, y)


def ref_logit_adjustment(f, y, tau=1.0):
    n = _n()
    return F.cross_entropy(f + tau * torch.log(n / n.sum()), y)


def ref_balanced_softmax(f, y):
    # Ren et al. 2020: p_y = n_y exp(f_y) / sum_k n_k exp(f_k)
    n = _n()
    num = n[y] * torch.exp(f.gather(1, y[:, None]).squeeze(1))
    den = (n[None, :] * torch.exp(f)).sum(dim=1)
    return (-torch.log(num / den)).mean()


def ref_cdt(f, y, gamma=0.2):
    n = _n()
    return F.cross_entropy(f * (n / n.max()) ** gamma, y)


def ref_vs(f, y, gamma=0.3, tau=1.0):
    n = _n()
    return F.cross_entropy((n / n.max()) ** gamma * f + tau * torch.log(n / n.sum()), y)


def ref_class_balanced(f, y, beta=0.9999):
    n = _n()
    w = (1.0 - beta) / (1.0 - beta**n)
    w = w / w.sum() * len(COUNTS)
    return (w[y] * F.cross_entropy(f, y, reduction="none")).mean()


def ref_inverse_frequency(f, y):
    n = _n()
    w = (1.0 / n) / (1.0 / n).sum() * len(COUNTS)
    return (w[y] * F.cross_entropy(f, y, reduction="none")).mean()


def ref_group_balanced(f, y):
    # one group: every class gets the same total weight, N / (K n_y) per sample
    n = _n()
    w = n.sum() / (len(COUNTS) * n)
    return (w[y] * F.cross_entropy(f, y, reduction="none")).mean()


PRESET_CASES = [
    ("ce", {}, ref_ce),
    ("cross_entropy", {}, ref_ce),
    ("la", {}, ref_logit_adjustment),
    ("la", {"tau": 1.7}, lambda f, y: ref_logit_adjustment(f, y, tau=1.7)),
    ("logit_adjustment", {"tau": 0.5}, lambda f, y: ref_logit_adjustment(f, y, tau=0.5)),
    ("balanced_softmax", {}, ref_balanced_softmax),
    ("la", {}, ref_balanced_softmax),  # balanced softmax is LA at tau 1
    ("cdt", {}, ref_cdt),
    ("cdt", {"gamma": 0.45}, lambda f, y: ref_cdt(f, y, gamma=0.45)),
    ("vs", {}, ref_vs),
    ("vs_loss", {"gamma": 0.1, "tau": 1.5}, lambda f, y: ref_vs(f, y, gamma=0.1, tau=1.5)),
    ("class_balanced", {}, ref_class_balanced),
    ("cb", {"beta": 0.99}, lambda f, y: ref_class_balanced(f, y, beta=0.99)),
    ("class-balanced", {"beta": 0.999}, lambda f, y: ref_class_balanced(f, y, beta=0.999)),
    ("inverse_frequency", {}, ref_inverse_frequency),
    ("inv_freq", {}, ref_inverse_frequency),
    ("group_balanced", {}, ref_group_balanced),
]


@pytest.mark.parametrize(("name", "kwargs", "reference"), PRESET_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PRESET_CASES)])
def test_preset_matches_baseline_formula(name, kwargs, reference):
    tables = preset_tables(name, COUNTS, dtype=DT, **kwargs)
    assert isinstance(tables, LossTables)
    assert all(t.shape == (1, K) and t.dtype == DT for t in tables)
    logits, target = _batch()

    def lib(f):
        return adjusted_cross_entropy(f, target, *tables)

    _assert_same_value_and_grad(lib, lambda f: reference(f, target), logits)


def test_every_preset_is_covered_and_aliases_resolve():
    covered = {resolve_preset(c[0]) for c in PRESET_CASES}
    assert covered == set(PRESETS)
    for canonical, aliases in PRESETS.items():
        assert resolve_preset(canonical) == canonical
        assert resolve_preset(canonical.upper()) == canonical
        for alias in aliases:
            assert resolve_preset(alias) == canonical
            for a, b in zip(preset_tables(alias, COUNTS), preset_tables(canonical, COUNTS)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_preset_default_settings_from_the_papers():
    n = _n()
    tables = preset_tables("vs", COUNTS, dtype=DT)  # gamma 0.3, tau 1
    torch.testing.assert_close(tables.delta[0], (n / n.max()) ** 0.3)
    torch.testing.assert_close(tables.offset[0], torch.log(n / n.sum()))
    torch.testing.assert_close(tables.weight[0], torch.ones(K, dtype=DT))
    cb = preset_tables("class_balanced", COUNTS, dtype=DT).weight[0]  # beta 0.9999, sum K
    raw = (1 - 0.9999) / (1 - 0.9999**n)
    torch.testing.assert_close(cb, raw / raw.sum() * K)
    torch.testing.assert_close(cb.sum(), torch.tensor(float(K), dtype=DT))
    torch.testing.assert_close(class_balanced_weights(n, 0.9999), raw / raw.sum() * K)
    assert preset_tables("la", COUNTS).delta.dtype == torch.float32  # default dtype


def test_preset_with_group_count_table_uses_each_row():
    table = [[100, 10, 1], [5, 50, 500]]
    tables = preset_tables("vs", table, dtype=DT, gamma=0.5)
    assert tables.num_groups == 2 and tables.num_classes == 3
    for g, row in enumerate(table):
        n = torch.tensor(row, dtype=DT)
        torch.testing.assert_close(tables.offset[g], torch.log(n / n.sum()))
        torch.testing.assert_close(tables.delta[g], (n / n.max()) ** 0.5)
    repeated = preset_tables("la", [100, 10, 1], num_groups=3, dtype=DT)
    assert repeated.offset.shape == (3, 3)
    torch.testing.assert_close(repeated.offset[2], repeated.offset[0])


# ---------------------------------------------------------------- reductions


def _random_tables(g: int, k: int = K, seed: int = 1) -> LossTables:
    gen = torch.Generator().manual_seed(seed)
    delta = torch.rand(g, k, generator=gen, dtype=DT) * 1.5 + 0.25
    offset = torch.randn(g, k, generator=gen, dtype=DT)
    weight = torch.rand(g, k, generator=gen, dtype=DT) * 2.0 + 0.1
    return LossTables(delta, offset, weight)


def _per_sample_ref(f, y, tables: LossTables, g=None) -> torch.Tensor:
    out = []
    for i in range(f.shape[0]):
        row = 0 if g is None else int(g[i])
        z = tables.delta[row] * f[i] + tables.offset[row]
        nll = torch.logsumexp(z, dim=0) - z[y[i]]
        out.append(tables.weight[row, y[i]] * nll)
    return torch.stack(out)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "weighted_mean"])
def test_reductions(reduction):
    logits, target = _batch(n=20)
    tables = _random_tables(1)

    def ref(f):
        losses = _per_sample_ref(f, target, tables)
        w_y = tables.weight[0][target]
        return {"none": losses, "sum": losses.sum(), "mean": losses.sum() / len(target),
                "weighted_mean": losses.sum() / w_y.sum()}[reduction]

    def lib(f):
        return adjusted_cross_entropy(f, target, *tables, reduction=reduction)

    v_lib = lib(logits)
    v_ref = ref(logits)
    torch.testing.assert_close(v_lib, v_ref, rtol=1e-10, atol=1e-12)
    weights = torch.linspace(0.3, 1.7, len(target), dtype=DT)  # to differentiate "none" as a scalar
    _assert_same_value_and_grad(lambda f: (lib(f) * (weights if reduction == "none" else 1)).sum(),
                                lambda f: (ref(f) * (weights if reduction == "none" else 1)).sum(), logits)


def test_weighted_mean_equals_torch_weighted_cross_entropy():
    logits, target = _batch(n=24, seed=3)
    w = torch.tensor([0.2, 0.5, 1.0, 2.0, 4.0], dtype=DT)
    _assert_same_value_and_grad(
        lambda f: adjusted_cross_entropy(f, target, weight=w, reduction="weighted_mean"),
        lambda f: F.cross_entropy(f, target, weight=w), logits)
    # "mean" divides by N instead (the class-balanced convention)
    _assert_same_value_and_grad(
        lambda f: adjusted_cross_entropy(f, target, weight=w, reduction="mean"),
        lambda f: (w[target] * F.cross_entropy(f, target, reduction="none")).mean(), logits)
    # without weights, weighted_mean is the plain mean
    torch.testing.assert_close(adjusted_cross_entropy(logits, target, reduction="weighted_mean"),
                               F.cross_entropy(logits, target))


def test_unknown_reduction_raises():
    logits, target = _batch()
    with pytest.raises(ValueError, match=r"reduction must be one of .*'mean'.*got 'avg'"):
        adjusted_cross_entropy(logits, target, reduction="avg")


# ---------------------------------------------------------------- class x group tables


@pytest.mark.parametrize("reduction", ["none", "mean", "weighted_mean", "sum"])
def test_group_tables_select_the_row_of_each_sample(reduction):
    logits, target = _batch(n=30, seed=5)
    group = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(9))
    assert set(group.tolist()) == {0, 1, 2}
    tables = _random_tables(3, seed=4)

    def ref(f):
        losses = _per_sample_ref(f, target, tables, group)
        w_y = tables.weight[group, target]
        return {"none": losses, "sum": losses.sum(), "mean": losses.mean(),
                "weighted_mean": losses.sum() / w_y.sum()}[reduction]

    mix = torch.linspace(0.5, 1.5, 30, dtype=DT)
    _assert_same_value_and_grad(
        lambda f: (adjusted_cross_entropy(f, target, *tables, group=group, reduction=reduction) * mix).sum(),
        lambda f: (ref(f) * mix).sum(), logits)
    # the rows really matter: a permuted group assignment gives another loss
    other = adjusted_cross_entropy(logits, target, *tables, group=(group + 1) % 3, reduction="sum")
    assert not torch.allclose(other, adjusted_cross_entropy(logits, target, *tables, group=group, reduction="sum"))


def test_one_group_equals_per_class_loss():
    logits, target = _batch(n=12, seed=6)
    tables = _random_tables(1, seed=7)
    per_class = adjusted_cross_entropy(logits, target, *(t[0] for t in tables))  # (K,) tables
    with_rows = adjusted_cross_entropy(logits, target, *tables)  # (1, K) tables, no group
    with_group = adjusted_cross_entropy(logits, target, *tables, group=torch.zeros(12, dtype=torch.long))
    torch.testing.assert_close(with_rows, per_class, rtol=0, atol=0)
    torch.testing.assert_close(with_group, per_class, rtol=0, atol=0)
    torch.testing.assert_close(per_class, _per_sample_ref(logits, target, tables).mean())


def test_missing_tables_mean_identity():
    logits, target = _batch()
    torch.testing.assert_close(adjusted_cross_entropy(logits, target), F.cross_entropy(logits, target))
    off = torch.randn(K, dtype=DT)
    torch.testing.assert_close(adjusted_cross_entropy(logits, target, offset=off),
                               F.cross_entropy(logits + off, target))


# ---------------------------------------------------------------- LDAM and DRW


def ref_ldam_margins(counts, max_margin=0.5):
    n = torch.tensor(counts, dtype=DT)
    c = max_margin * n.min() ** 0.25  # m_y = C / n_y^(1/4) with the rarest class at max_margin
    return c / n**0.25


def ref_ldam(f, y, margins, s=30.0, weight=None):
    z = f.clone()
    idx = torch.arange(len(y))
    z[idx, y] = z[idx, y] - margins[y]  # true logit only
    losses = -torch.log_softmax(s * z, dim=1)[idx, y]
    if weight is None:
        return losses.mean()
    return (weight[y] * losses).sum() / weight[y].sum()


def test_ldam_margins():
    m = ldam_margins(COUNTS)
    ref = ref_ldam_margins(COUNTS)
    torch.testing.assert_close(m.double(), ref, rtol=1e-6, atol=1e-7)
    assert math.isclose(m.max().item(), 0.5, rel_tol=1e-6)
    assert int(m.argmax()) == COUNTS.index(min(COUNTS))
    torch.testing.assert_close(ldam_margins(COUNTS, max_margin=0.2).double(), ref_ldam_margins(COUNTS, 0.2),
                               rtol=1e-6, atol=1e-7)


def test_ldam_loss_function_subtracts_margin_from_true_logit_only():
    logits, target = _batch(n=20, seed=11, scale=0.3)
    margins = ref_ldam_margins(COUNTS)
    _assert_same_value_and_grad(lambda f: ldam_loss(f, target, margins, scale=30.0),
                                lambda f: ref_ldam(f, target, margins, 30.0), logits)
    _assert_same_value_and_grad(lambda f: ldam_loss(f, target, margins, scale=10.0),
                                lambda f: ref_ldam(f, target, margins, 10.0), logits)


def test_ldam_module_and_drw_switch():
    logits, target = _batch(n=20, seed=12, scale=0.3)
    beta = 0.9999
    n = _n()
    cb = (1 - beta) / (1 - beta**n)
    cb = cb / cb.sum() * K
    margins = ref_ldam_margins(COUNTS)
    crit = LDAMLoss(COUNTS, drw_epoch=3)
    assert list(crit.parameters()) == []
    tol = {"rtol": 1e-5, "atol": 1e-6}  # margins and DRW weights are float32 buffers

    for epoch, reweighted in [(0, False), (2, False), (3, True), (10, True)]:
        crit.set_epoch(epoch)
        assert crit.reweighting is reweighted
        weight = cb if reweighted else None
        v_lib, g_lib = _value_and_grad(lambda f, c=crit: c(f, target), logits)
        v_ref, g_ref = _value_and_grad(lambda f, w=weight: ref_ldam(f, target, margins, 30.0, w), logits)
        torch.testing.assert_close(v_lib, v_ref, **tol)
        torch.testing.assert_close(g_lib, g_ref, **tol)
    # the switch changes the loss
    crit.set_epoch(0)
    before = crit(logits, target)
    crit.set_epoch(3)
    assert not torch.allclose(before, crit(logits, target))

    never = LDAMLoss(COUNTS, drw_epoch=None)
    never.set_epoch(10_000)
    assert not never.reweighting
    torch.testing.assert_close(never(logits, target), ref_ldam(logits, target, margins), **tol)
    with pytest.raises(ValueError, match="max_margin and scale must be positive"):
        LDAMLoss(COUNTS, scale=0.0)


# ---------------------------------------------------------------- focal loss


def ref_focal(f, y, gamma):
    p = torch.softmax(f, dim=1)[torch.arange(len(y)), y]
    return (-((1 - p) ** gamma) * torch.log(p)).mean()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.5])
def test_focal_loss(gamma):
    logits, target = _batch(n=18, seed=13)
    _assert_same_value_and_grad(lambda f: focal_loss(f, target, gamma=gamma),
                                lambda f: ref_focal(f, target, gamma), logits)
    _assert_same_value_and_grad(lambda f: FocalLoss(gamma)(f, target), lambda f: ref_focal(f, target, gamma), logits)


def test_focal_gamma_zero_is_cross_entropy_and_negative_gamma_raises():
    logits, target = _batch(seed=14)
    _assert_same_value_and_grad(lambda f: focal_loss(f, target, gamma=0.0), lambda f: F.cross_entropy(f, target),
                                logits)
    with pytest.raises(ValueError, match=r"gamma must be non-negative; got -1"):
        focal_loss(logits, target, gamma=-1.0)
    with pytest.raises(ValueError, match=r"gamma must be non-negative"):
        FocalLoss(-0.5)


# ---------------------------------------------------------------- the module and the loss file


def test_adjusted_cross_entropy_module():
    crit = AdjustedCrossEntropy.from_preset("vs", COUNTS, gamma=0.25, tau=1.2)
    assert list(crit.parameters()) == []
    sd = crit.state_dict()
    assert set(sd) == {"delta", "offset", "weight"}
    n = _n()
    torch.testing.assert_close(sd["delta"][0].double(), (n / n.max()) ** 0.25, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sd["offset"][0].double(), 1.2 * torch.log(n / n.sum()), rtol=1e-6, atol=1e-6)
    assert all(t.dtype == torch.float32 for t in sd.values())
    logits, target = _batch(seed=15)
    v_lib, g_lib = _value_and_grad(lambda f: crit(f, target), logits)
    v_ref, g_ref = _value_and_grad(lambda f: ref_vs(f, target, gamma=0.25, tau=1.2), logits)
    torch.testing.assert_close(v_lib, v_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_lib, g_ref, rtol=1e-6, atol=1e-6)

    # the tables are restored by load_state_dict
    other = AdjustedCrossEntropy.from_preset("ce", COUNTS)
    other.load_state_dict(crit.state_dict())
    torch.testing.assert_close(other(logits, target), crit(logits, target), rtol=0, atol=0)

    weighted = AdjustedCrossEntropy.from_preset("inverse_frequency", COUNTS, reduction="weighted_mean")
    w = (1.0 / n) / (1.0 / n).sum() * K
    torch.testing.assert_close(weighted(logits, target), F.cross_entropy(logits, target, weight=w),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="delta and weight must be positive"):
        AdjustedCrossEntropy(torch.zeros(K), torch.zeros(K), torch.ones(K))
    with pytest.raises(ValueError, match="must share one shape"):
        AdjustedCrossEntropy(torch.ones(K), torch.zeros(K - 1), torch.ones(K))


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
@pytest.mark.parametrize("groups", [1, 3])
def test_loss_file_round_trip(tmp_path, suffix, groups):
    tables = _random_tables(groups, seed=20).to(torch.float32)
    path = save_loss_tables(tmp_path / "sub" / f"loss{suffix}", tables, reduction="weighted_mean", preset="vs")
    assert path.is_file()
    text = path.read_text()
    doc = yaml.safe_load(text) if suffix != ".json" else json.loads(text)
    assert doc["format"] == LOSS_FILE_FORMAT
    assert (doc["num_groups"], doc["num_classes"]) == (groups, K)
    loaded, info = load_loss_tables(path)
    for a, b in zip(loaded, tables):
        assert a.dtype == torch.float32 and a.shape == (groups, K)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert info["reduction"] == "weighted_mean" and info["preset"] == "vs"
    assert "delta" not in info

    crit = AdjustedCrossEntropy.from_file(path)
    assert crit.reduction == "weighted_mean"
    logits, target = _batch(n=12, seed=21)
    group = torch.arange(12) % groups
    expected = _per_sample_ref(logits, target, tables.to(DT), group if groups > 1 else None)
    w_y = tables.weight.double()[group, target]
    torch.testing.assert_close(crit(logits, target, group if groups > 1 else None), expected.sum() / w_y.sum(),
                               rtol=1e-6, atol=1e-7)


def test_low_precision_logits_give_float32_loss():
    logits, target = _batch(n=16, seed=22)
    low = logits.to(torch.bfloat16)
    exact = low.float()
    tables = preset_tables("vs", COUNTS)  # float32 tables
    out = adjusted_cross_entropy(low, target, *tables)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, adjusted_cross_entropy(exact, target, *tables), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.double(), ref_vs(exact.double(), target), rtol=1e-5, atol=1e-5)
    assert adjusted_cross_entropy(low, target).dtype == torch.float32  # no tables at all
    assert adjusted_cross_entropy(logits.half(), target).dtype == torch.float32
    f_out = focal_loss(low, target, gamma=2.0)
    assert f_out.dtype == torch.float32
    torch.testing.assert_close(f_out.double(), ref_focal(exact.double(), target, 2.0), rtol=1e-5, atol=1e-5)
    m = ref_ldam_margins(COUNTS)
    l_out = ldam_loss(low.tanh(), target, m)
    assert l_out.dtype == torch.float32
    # a bfloat16 loss would be off by ~1e-2; float32 arithmetic matches the float64 reference closely
    torch.testing.assert_close(l_out.double(), ref_ldam(low.tanh().double(), target, m), rtol=1e-5, atol=1e-5)
    low.requires_grad_(True)
    adjusted_cross_entropy(low, target, *tables).backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- bad input


def test_labels_out_of_range():
    logits, _ = _batch(n=4)
    with pytest.raises(ValueError, match=r"target must lie in \[0, 5\).*got \[-1\]"):
        adjusted_cross_entropy(logits, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match=r"target must lie in \[0, 5\).*got \[5, 7\]"):
        adjusted_cross_entropy(logits, torch.tensor([0, 5, 7, 2]))
    with pytest.raises(ValueError, match=r"target must lie in \[0, 5\)"):
        focal_loss(logits, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(ValueError, match=r"target must lie in \[0, 5\)"):
        LDAMLoss(COUNTS)(logits, torch.tensor([0, 1, 2, -3]))
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        adjusted_cross_entropy(logits, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("counts", [[10, 0, 3], [10, -2, 3], [10, float("nan"), 3], [10, 10.5, 3]])
def test_non_positive_class_count(counts):
    with pytest.raises(ValueError, match=r"class_counts must be positive whole numbers of samples"):
        preset_tables("la", counts)
    with pytest.raises(ValueError, match=r"class_counts must be positive"):
        as_count_table(counts)
    with pytest.raises(ValueError, match=r"class_counts must be positive"):
        ldam_margins(counts)


def test_counts_of_the_wrong_length():
    with pytest.raises(ValueError, match=r"class_counts has 3 classes, expected num_classes=4"):
        as_count_table([5, 3, 1], num_classes=4)
    with pytest.raises(ValueError, match=r"class_counts has 2 group rows, expected num_groups=3"):
        as_count_table([[5, 3, 1], [1, 2, 3]], num_groups=3)
    with pytest.raises(ValueError, match=r"non-empty"):
        as_count_table([])
    logits, target = _batch(n=6)
    with pytest.raises(ValueError, match=r"delta must have shape \(K,\) or \(G, K\) with K=5; got \((1, )?4,?\)"):
        adjusted_cross_entropy(logits, target, delta=torch.ones(4, dtype=DT))
    with pytest.raises(ValueError, match=r"weight must have shape \(K,\) or \(G, K\) with K=5; got \(2, 6\)"):
        adjusted_cross_entropy(logits, target, weight=torch.ones(2, 6, dtype=DT), group=torch.zeros(6).long())
    four_class = preset_tables("la", [40, 30, 20, 10])
    with pytest.raises(ValueError, match=r"delta must have shape .*K=5; got \(1, 4\)"):
        adjusted_cross_entropy(logits, target, *four_class)


def test_group_index_errors():
    logits, target = _batch(n=6)
    tables = _random_tables(2)
    with pytest.raises(ValueError, match=r"group must lie in \[0, 2\) \(2 groups\); got \[2\]"):
        adjusted_cross_entropy(logits, target, *tables, group=torch.tensor([0, 1, 2, 0, 1, 0]))
    with pytest.raises(ValueError, match=r"group must lie in \[0, 2\).*got \[-1\]"):
        adjusted_cross_entropy(logits, target, *tables, group=torch.tensor([0, 1, -1, 0, 1, 0]))
    with pytest.raises(ValueError, match=r"delta has 2 group rows, so a group index is needed for every sample"):
        adjusted_cross_entropy(logits, target, *tables)
    with pytest.raises(ValueError, match=r"group must hold integer group indices; got dtype torch.float"):
        adjusted_cross_entropy(logits, target, *tables, group=torch.zeros(6))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits(bad):
    logits, target = _batch(n=6)
    logits[2, 1] = bad
    with pytest.raises(ValueError, match=r"logits contain NaN or infinite values; expected finite logits"):
        adjusted_cross_entropy(logits, target)
    with pytest.raises(ValueError, match=r"logits contain NaN or infinite values"):
        focal_loss(logits, target)
    with pytest.raises(ValueError, match=r"logits contain NaN or infinite values"):
        AdjustedCrossEntropy.from_preset("la", COUNTS)(logits, target)


def test_unknown_preset_and_float_labels():
    with pytest.raises(ValueError, match=r"Unknown loss preset 'focal'; expected one of 'ce'.*'la'"):
        preset_tables("focal", COUNTS)
    with pytest.raises(ValueError, match=r"Unknown loss preset 'nope'"):
        AdjustedCrossEntropy.from_preset("nope", COUNTS)
    logits, target = _batch(n=6)
    with pytest.raises(ValueError, match=r"target must hold integer class indices; got dtype torch.float32"):
        adjusted_cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match=r"target must hold integer class indices; got dtype torch.bool"):
        adjusted_cross_entropy(logits, target > 1)
    with pytest.raises(ValueError, match=r"logits must have shape \(N, K\)"):
        adjusted_cross_entropy(logits[0], target[:1])


def _write(path, doc):
    if path.suffix == ".json":
        path.write_text(json.dumps(doc))
    else:
        path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_malformed_loss_files(tmp_path, suffix):
    good = {"format": LOSS_FILE_FORMAT, "num_groups": 1, "num_classes": 3,
            "delta": [[1.0, 1.0, 1.0]], "offset": [[0.0, 0.1, 0.2]], "weight": [[1.0, 2.0, 3.0]]}
    tables, _ = load_loss_tables(_write(tmp_path / f"good{suffix}", good))
    assert tables.weight.tolist() == [[1.0, 2.0, 3.0]]

    with pytest.raises(ValueError, match=r"is not a lightning-autobalance loss file \(expected format: "
                                         r"'lightning-autobalance/loss-v1'\)"):
        load_loss_tables(_write(tmp_path / f"fmt{suffix}", {**good, "format": "something-else"}))
    with pytest.raises(ValueError, match=r"delta has shape \(1, 2\), expected \(num_groups, num_classes\) = \(1, 3\)"):
        load_loss_tables(_write(tmp_path / f"shape{suffix}", {**good, "delta": [[1.0, 1.0]]}))
    with pytest.raises(ValueError, match=r"weight has shape \(3,\), expected \(num_groups, num_classes\)"):
        load_loss_tables(_write(tmp_path / f"flat{suffix}", {**good, "weight": [1.0, 1.0, 1.0]}))
    with pytest.raises(ValueError, match=r"expected \(num_groups, num_classes\) = \(2, 3\)"):
        load_loss_tables(_write(tmp_path / f"groups{suffix}", {**good, "num_groups": 2}))
    with pytest.raises(ValueError, match=r"delta and weight must be positive"):
        load_loss_tables(_write(tmp_path / f"delta{suffix}", {**good, "delta": [[1.0, 0.0, 1.0]]}))
    with pytest.raises(ValueError, match=r"delta and weight must be positive"):
        load_loss_tables(_write(tmp_path / f"weight{suffix}", {**good, "weight": [[1.0, -2.0, 1.0]]}))
    with pytest.raises(ValueError, match=r"missing or malformed table"):
        load_loss_tables(_write(tmp_path / f"missing{suffix}", {k: v for k, v in good.items() if k != "offset"}))
    with pytest.raises(ValueError, match=r"is not a lightning-autobalance loss file"):
        AdjustedCrossEntropy.from_file(_write(tmp_path / f"list{suffix}", [1, 2, 3]))
    broken = tmp_path / f"broken{suffix}"
    broken.write_text("{not: [valid")
    with pytest.raises(ValueError, match=r"could not be parsed"):
        load_loss_tables(broken)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_loss_tables(tmp_path / f"absent{suffix}")
