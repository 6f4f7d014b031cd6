"""Where the answer is known (benchmarks/theory.py at small size): the search must find it.

Linear models on Gaussian mixtures, float64, one thread, seeded: deterministic on the CPU. Each test states its
tolerance before its assertion. They test the search, not only the code: with ``THEORY_FLIP_SIGN=1`` in the
environment every hypergradient the search receives has its sign flipped (the mutation), and then every test of this
file fails (docs/theory.md, "The tests").
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import load_benchmark

from lightning_autobalance.core.hypergradient import HypergradientResult

theory = load_benchmark("theory")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::FutureWarning")]

#: study 1, small: 3 classes in 3 dimensions, 1,500 training samples (imbalance 10), 300 upper samples per class
BAYES = theory.BayesSetup(num_classes=3, dim=3, scale=2.0, n=1500, rho=10.0, upper_per_class=300, gd_steps=400,
                          warm_steps=200, steps_between=20, hyper_steps=60, hyper_lr=0.1)
#: the benchmark's tolerances widened for the smaller samples and one seed: every offset within 0.25 nats of
#: log pi, the balanced error within 1 point of the Bayes error
BAYES_OFFSET_TOL, BAYES_ERROR_TOL = 0.25, 1.0

#: study 2, small: 3 classes, 100 training samples (imbalance 10) in 200 dimensions, 2,000 steps, a short VS grid
SEPARABLE = theory.SeparableSetup(dim=200, n=100, gd_steps=2000, record=(2000,), hyper_steps=30, hyper_lr=0.2,
                                  gammas=(0.5, 0.7, 1.0), cdt=False)
#: one seed (the benchmark: 0.5 on the mean of 5): AutoBalance at most 1.5 points above the best VS of the grid and
#: at least 0.5 below LA; LA at least 1 point above the best VS; delta of the largest class at least twice the
#: smallest's
VS_TOL, BELOW_LA, LA_GAP, DELTA_RATIO = 1.5, 0.5, 1.0, 2.0


@pytest.fixture(autouse=True)
def mutation(monkeypatch):
    """``THEORY_FLIP_SIGN=1``: the search receives every hypergradient with its sign flipped."""
    if os.environ.get("THEORY_FLIP_SIGN") != "1":
        return
    original = theory.hypergradient

    def flipped(*args, **kwargs):
        result = original(*args, **kwargs)
        return HypergradientResult({k: -g for k, g in result.grad.items()}, result.objective, result.finite)

    monkeypatch.setattr(theory, "hypergradient", flipped)


def test_search_finds_the_bayes_optimal_offsets():
    row = theory.study_bayes(BAYES, seed=0)
    err = {k: 100 * v for k, v in row["balanced_error"].items()}
    assert max(abs(v) for v in row["known_offset"]) > 1.0  # cross-entropy starts at 0: far from the answer
    assert err["ce"] - err["bayes"] > 3.0  # and 3 points from the Bayes error: the search has something to fix
    assert row["max_offset_gap"] <= BAYES_OFFSET_TOL, (row["found_offset"], row["known_offset"])
    assert err["autobalance"] - err["bayes"] <= BAYES_ERROR_TOL, err


def test_separable_regime_the_search_reaches_the_best_vs():
    row = theory.study_separable(SEPARABLE, seed=0, splits=False)
    err = {k: 100 * v for k, v in row["balanced_error"].items()}
    best = min((k for k in err if k.startswith("vs_")), key=err.__getitem__)
    delta = row["found"]["validation"]["delta"]
    assert err["la"] - err[best] >= LA_GAP, err  # the regime: multiplicative beats additive
    assert err["autobalance_validation"] - err[best] <= VS_TOL, err
    assert err["la"] - err["autobalance_validation"] >= BELOW_LA, err
    assert math.log(delta[0] / delta[-1]) >= math.log(DELTA_RATIO), delta  # rarer class, smaller delta (VS, CDT)


def test_upper_objective_on_the_fitted_training_data_carries_little_signal():
    """Study 3's premise: on the separable training data the upper objective starts near zero and a short search on it
    leaves delta near 1, while on held-out data it starts high and the same search shrinks the rare class's delta
    to below half the largest class's."""
    setup = theory.replace(SEPARABLE, hyper_steps=8)
    mixture = theory.Mixture(setup.num_classes, setup.dim, setup.scale)
    gen = torch.Generator().manual_seed(0)
    counts = theory.long_tail_counts(setup.n, setup.num_classes, setup.rho)
    x, y = mixture.draw(counts, gen)
    ux, uy = mixture.draw([setup.upper_per_class] * setup.num_classes, gen)
    on_train = theory.head_search(setup, x, y, x, y, counts)
    held_out = theory.head_search(setup, x, y, ux, uy, counts)

    def tilt(result):  # log(delta of the largest class / delta of the smallest)
        return math.log(result.tables.delta[0, 0] / result.tables.delta[0, -1])

    assert on_train.trace[0]["upper"] < 0.01 < 0.3 < held_out.trace[0]["upper"]
    assert abs(tilt(on_train)) < 0.25 < math.log(DELTA_RATIO) < tilt(held_out), (tilt(on_train), tilt(held_out))
