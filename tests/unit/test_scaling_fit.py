"""The scaling-law fit (Chinchilla's approach 3) recovers known parameters from synthetic losses,
the compute-optimal allocation matches a hand-computed case, and bad input is a one-line error."""
import math

import numpy as np
import pytest

from gptscale.errors import DataError
from gptscale.scaling.fit import ScalingLaw, compute_optimal, fit_scaling_law, optimum_intervals, poorly_constrained

CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, eq. 10


def _grid(law, sizes=5, budgets=5, noise=0.0, seed=0):
    n, d = np.meshgrid(np.geomspace(1e6, 1e9, sizes), np.geomspace(1e8, 1e11, budgets))
    n, d = n.ravel(), d.ravel()
    loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0.0, noise, n.shape))
    return n, d, loss


@pytest.mark.parametrize("law", [CHINCHILLA, ScalingLaw(E=2.5, A=80.0, B=3000.0, alpha=0.55, beta=0.3)])
def test_exact_losses_give_back_the_law(law):
    fit = fit_scaling_law(*_grid(law, sizes=4, budgets=3))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, name) == pytest.approx(getattr(law, name), rel=1e-5), name
    assert fit.points == 12 and fit.objective < 1e-15 and not fit.skipped


def test_noisy_losses_land_near_the_law_and_inside_the_bootstrap_intervals():
    fit = fit_scaling_law(*_grid(CHINCHILLA, noise=0.002), bootstrap=40, level=0.95, seed=1)
    law = fit.law
    assert law.alpha == pytest.approx(0.34, abs=0.04) and law.beta == pytest.approx(0.28, abs=0.04)
    assert law.E == pytest.approx(1.69, rel=0.1)
    n_opt, _ = law.compute_optimal(1e24)
    assert n_opt == pytest.approx(CHINCHILLA.compute_optimal(1e24)[0], rel=0.5)
    for name in ("E", "alpha", "beta"):
        low, high = fit.intervals[name]
        assert low <= getattr(CHINCHILLA, name) <= high, (name, low, high)
        assert low <= getattr(law, name) <= high
    assert len(fit.samples) == 40
    start = [[6.0, 6.0, 0.5, 0.3, 0.3]]  # seeded: the same resamples again (one start, to be quick)
    once, again = (fit_scaling_law(*_grid(CHINCHILLA, noise=0.002), starts=start, bootstrap=5, seed=3) for _ in "12")
    assert once.intervals == again.intervals and once.samples != fit.samples[:5]
    optimum = optimum_intervals(fit, 1e24)
    assert optimum["N_opt"][0] < n_opt < optimum["N_opt"][1]
    assert poorly_constrained(fit.intervals) == []  # 25 points spanning 3 decades pin every parameter


def test_runs_that_cannot_separate_the_terms_are_flagged():
    """The sweep demo's case: a bootstrap interval for E from ~0 to 1.5 says the runs do not
    separate the irreducible loss from the power laws."""
    demo = {"E": (3e-222, 1.53), "A": (4.78, 22.4), "B": (17.3, 1.49e4), "alpha": (0.025, 0.32),
            "beta": (0.089, 0.78)}
    assert poorly_constrained(demo) == ["E", "B", "beta"]
    assert poorly_constrained({"E": (1.6, 1.8), "A": (300.0, 500.0), "alpha": (0.3, 0.4)}) == []


def test_compute_optimal_allocation_by_hand():
    # alpha = 0.5, beta = 0.25, A = 2, B = 1: G = (0.5 * 2 / (0.25 * 1))^(1/0.75) = 4^(4/3);
    # C/6 = 1e12: N = G * 1e12^(1/3) = 4^(4/3) * 1e4, D = 1e12^(2/3) / G = 1e8 / 4^(4/3)
    law = ScalingLaw(E=1.0, A=2.0, B=1.0, alpha=0.5, beta=0.25)
    n, d = compute_optimal(law, 6e12)
    assert n == pytest.approx(4 ** (4 / 3) * 1e4, rel=1e-12) and d == pytest.approx(1e8 / 4 ** (4 / 3), rel=1e-12)
    assert 6 * n * d == pytest.approx(6e12, rel=1e-12)
    # and it is the minimum of L along 6 N D = C
    others = np.geomspace(n / 10, n * 10, 2001)
    assert law.loss(n, d) <= law.loss(others, 6e12 / (6 * others)).min() + 1e-12
    assert compute_optimal(ScalingLaw(E=1.0, A=1.0, B=1.0, alpha=0.5, beta=0.5), 6e20) == pytest.approx((1e10, 1e10))
    assert all(math.isnan(v) for v in compute_optimal(ScalingLaw(E=1.0, A=1.0, B=1.0, alpha=0.0, beta=0.5), 1e20))


def _one_line(err):
    message = str(err.value)
    assert "\n" not in message
    return message


def test_too_few_points_is_a_one_line_error():
    n, d, loss = _grid(CHINCHILLA, sizes=2, budgets=2)
    with pytest.raises(DataError) as err:
        fit_scaling_law(n, d, loss)
    assert "needs at least 5 runs with a finite final loss; got 4" in _one_line(err)
    with pytest.raises(DataError) as err:
        fit_scaling_law([1e6] * 6, np.geomspace(1e8, 1e10, 6), [3.0] * 6)
    assert "at least 2 different model sizes and 2 different token counts; got 1 size(s)" in _one_line(err)


def test_non_finite_losses_are_skipped_with_a_note():
    n, d, loss = _grid(CHINCHILLA, sizes=3, budgets=3)
    loss[4], loss[7] = float("nan"), float("inf")
    fit = fit_scaling_law(n, d, loss, starts=[[6.0, 6.0, 0.5, 0.3, 0.3]])
    assert fit.points == 7 and len(fit.skipped) == 2 and "point 4" in fit.skipped[0]
    loss[:5] = float("nan")
    with pytest.raises(DataError) as err:
        fit_scaling_law(n, d, loss)
    assert "got 3" in _one_line(err)
