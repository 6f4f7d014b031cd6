"""Tests of the long-tail profiles, the seeded selection and the per-class split."""

import math

import numpy as np
import pytest

from lightning_autobalance.data import head_medium_tail, long_tail_counts, select_long_tail, split_per_class

CIFAR10_LT_100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


# ---------------------------------------------------------------------- long_tail_counts
def test_cifar10_lt_counts_are_exact() -> None:
    counts = long_tail_counts(5000, 10, 100.0)
    assert counts == CIFAR10_LT_100
    assert sum(counts) == 12406
    assert all(isinstance(n, int) for n in counts)


@pytest.mark.parametrize(
    ("n_max", "num_classes", "rho", "total", "last"),
    [(5000, 10, 10, 20431, 500), (5000, 10, 50, 13996, 100), (500, 100, 100, 10847, 5), (500, 100, 10, 19573, 50)],
)
def test_standard_benchmark_totals(n_max: int, num_classes: int, rho: float, total: int, last: int) -> None:
    counts = long_tail_counts(n_max, num_classes, rho)
    assert sum(counts) == total
    assert counts[0] == n_max
    assert counts[-1] == last
    assert counts == sorted(counts, reverse=True)


def test_exact_integers_survive_floating_point() -> None:
    # Whenever n_max * rho ** (-c / (C - 1)) is an integer the count must be exactly it.
    for rho in (3, 7, 10, 50, 100, 200, 1000):
        for n_max in range(rho, 20 * rho + 1, rho):
            assert long_tail_counts(n_max, 2, rho) == [n_max, n_max // rho]
    assert long_tail_counts(5000, 2, 100) == [5000, 50]
    assert long_tail_counts(1000, 3, 100) == [1000, 100, 10]
    assert long_tail_counts(10**6, 4, 1000) == [10**6, 10**5, 10**4, 10**3]


def test_balanced_and_single_class() -> None:
    assert long_tail_counts(7, 5, 1.0) == [7] * 5
    assert long_tail_counts(7, 1, 100.0) == [7]
    assert long_tail_counts(7, 1, 1.0, profile="step") == [7]


def test_step_profile() -> None:
    assert long_tail_counts(100, 10, 10.0, profile="step") == [100] * 5 + [10] * 5
    assert long_tail_counts(100, 10, 10.0, profile="step", step_fraction=0.3) == [100] * 7 + [10] * 3
    assert long_tail_counts(100, 4, 1000.0, profile="step") == [100, 100, 1, 1]
    assert long_tail_counts(100, 4, 1000.0, profile="step", min_count=5) == [100, 100, 5, 5]
    assert long_tail_counts(100, 4, 10.0, profile="step", step_fraction=0.0) == [100] * 4
    assert long_tail_counts(100, 4, 10.0, profile="step", step_fraction=1.0) == [10] * 4


def test_min_count_raises_the_tail() -> None:
    counts = long_tail_counts(144, 10, 100.0)
    assert counts[-1] == 1
    raised = long_tail_counts(144, 10, 100.0, min_count=2)
    assert raised[-1] == 2
    assert [max(n, 2) for n in counts] == raised
    assert long_tail_counts(50, 3, 1000.0, min_count=50) == [50, 50, 50]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
        ({"imbalance_ratio": 0.0}, "imbalance_ratio"),
        ({"imbalance_ratio": -3.0}, "imbalance_ratio"),
        ({"imbalance_ratio": math.nan}, "imbalance_ratio"),
        ({"imbalance_ratio": math.inf}, "imbalance_ratio"),
        ({"imbalance_ratio": "100"}, "imbalance_ratio"),
        ({"n_max": 0}, "n_max"),
        ({"n_max": 2.5}, "n_max"),
        ({"n_max": True}, "n_max"),
        ({"num_classes": 0}, "num_classes"),
        ({"min_count": 0}, "min_count"),
        ({"min_count": 5001}, "min_count"),
        ({"profile": "linear"}, "profile"),
        ({"profile": "step", "step_fraction": 1.5}, "step_fraction"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, name: str) -> None:
    args = {"n_max": 5000, "num_classes": 10, "imbalance_ratio": 100.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        long_tail_counts(**args)


def test_bad_rho_message_gives_the_range() -> None:
    with pytest.raises(ValueError, match=r">= 1"):
        long_tail_counts(5000, 10, 0.5)


# ---------------------------------------------------------------------- select_long_tail
def _interleaved_targets(per_class: int, num_classes: int, seed: int = 0) -> np.ndarray:
    targets = np.repeat(np.arange(num_classes), per_class)
    return np.random.default_rng(seed).permutation(targets)


def test_select_keeps_the_asked_counts() -> None:
    targets = _interleaved_targets(50, 5)
    counts = long_tail_counts(50, 5, 10.0)
    kept = select_long_tail(targets, counts, seed=3)
    assert kept.dtype == np.int64
    assert np.all(np.diff(kept) > 0)
    assert np.bincount(targets[kept], minlength=5).tolist() == counts


def test_select_is_seeded() -> None:
    targets = _interleaved_targets(40, 4)
    counts = [30, 20, 10, 5]
    a = select_long_tail(targets, counts, seed=1)
    assert np.array_equal(a, select_long_tail(targets, counts, seed=1))
    assert not np.array_equal(a, select_long_tail(targets, counts, seed=2))


def test_select_positions_do_not_depend_on_interleaving() -> None:
    counts = [30, 20, 10, 5]
    sorted_targets = np.repeat(np.arange(4), 40)
    mixed_targets = _interleaved_targets(40, 4, seed=9)
    kept_sorted = select_long_tail(sorted_targets, counts, seed=5)
    kept_mixed = select_long_tail(mixed_targets, counts, seed=5)
    for c in range(4):
        members = np.flatnonzero(mixed_targets == c)
        positions_mixed = np.searchsorted(members, kept_mixed[mixed_targets[kept_mixed] == c])
        positions_sorted = kept_sorted[sorted_targets[kept_sorted] == c] - 40 * c
        assert positions_mixed.tolist() == positions_sorted.tolist()


def test_select_errors_name_the_class() -> None:
    targets = np.array([0, 0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"class 1 \('cat'\) has 2 samples .* asks for 3"):
        select_long_tail(targets, [3, 3, 1], seed=0, class_names=["dog", "cat", "emu"])
    with pytest.raises(ValueError, match=r"class 3 has no samples"):
        select_long_tail(targets, [1, 1, 1, 1], seed=0)
    with pytest.raises(ValueError, match="class index 2"):
        select_long_tail(targets, [1, 1], seed=0)
    with pytest.raises(ValueError, match="counts"):
        select_long_tail(targets, [1, -1, 1], seed=0)


# ---------------------------------------------------------------------- split_per_class
def test_split_invariants() -> None:
    targets = np.repeat(np.arange(6), [500, 120, 37, 10, 3, 2])
    targets = np.random.default_rng(0).permutation(targets)
    lower, upper = split_per_class(targets, fraction=0.2, seed=4)
    assert np.intersect1d(lower, upper).size == 0
    assert np.array_equal(np.union1d(lower, upper), np.arange(targets.size))
    assert np.all(np.diff(lower) > 0) and np.all(np.diff(upper) > 0)
    up = np.bincount(targets[upper], minlength=6)
    low = np.bincount(targets[lower], minlength=6)
    assert up.tolist() == [100, 24, 7, 2, 1, 1]  # round(0.2 n), at least 1
    assert low.tolist() == [400, 96, 30, 8, 2, 1]
    assert (low >= 1).all() and (up >= 1).all()


def test_split_keeps_one_on_each_side() -> None:
    targets = np.repeat([0, 1], [2, 10])
    lower, upper = split_per_class(targets, fraction=0.99, seed=0)
    assert np.bincount(targets[upper]).tolist() == [1, 9]
    assert np.bincount(targets[lower]).tolist() == [1, 1]
    lower, upper = split_per_class(targets, fraction=0.01, seed=0)
    assert np.bincount(targets[upper]).tolist() == [1, 1]


def test_split_is_seeded() -> None:
    targets = np.repeat(np.arange(3), 50)
    a = split_per_class(targets, 0.2, seed=7)
    b = split_per_class(targets, 0.2, seed=7)
    c = split_per_class(targets, 0.2, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_split_errors() -> None:
    with pytest.raises(ValueError, match=r"at least 2 samples of class 'emu'"):
        split_per_class([0, 0, 1, 1, 2], 0.2, seed=0, class_names=["a", "b", "emu"])
    with pytest.raises(ValueError, match=r"at least 2 samples of class '1'"):
        split_per_class([0, 0, 1], 0.2)
    for bad in (0.0, 1.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"fraction .*\(0, 1\)"):
            split_per_class([0, 0, 1, 1], bad)


# ---------------------------------------------------------------------- head / medium / tail
def test_head_medium_tail_shots_rule() -> None:
    counts = long_tail_counts(500, 100, 100.0)
    labels = head_medium_tail(counts)
    counts_arr = np.asarray(counts)
    assert (labels[counts_arr > 100] == "head").all()
    assert (labels[(counts_arr >= 20) & (counts_arr <= 100)] == "medium").all()
    assert (labels[counts_arr < 20] == "tail").all()
    assert set(labels.tolist()) == {"head", "medium", "tail"}
    assert head_medium_tail([101, 100, 20, 19]).tolist() == ["head", "medium", "medium", "tail"]


def test_head_medium_tail_falls_back_to_thirds() -> None:
    # Everything has fewer than 20 samples: the shots rule puts all in "tail".
    counts = [5, 18, 9, 12, 3, 7, 15, 1, 11, 2]
    labels = head_medium_tail(counts)
    assert labels.tolist().count("head") == 4
    assert labels.tolist().count("medium") == 3
    assert labels.tolist().count("tail") == 3
    order = np.argsort(-np.asarray(counts), kind="stable")
    assert labels[order].tolist() == ["head"] * 4 + ["medium"] * 3 + ["tail"] * 3
    assert head_medium_tail(counts, rule="shots").tolist() == ["tail"] * 10
    assert head_medium_tail([500, 400, 300], rule="thirds").tolist() == ["head", "medium", "tail"]
    with pytest.raises(ValueError, match="rule"):
        head_medium_tail(counts, rule="halves")  # type: ignore[arg-type]
