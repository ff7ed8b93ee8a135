"""Drift statistics (probes/drift.py) against synthetic ground truth and brute-force definitions."""

import itertools
import math
import re

import numpy as np
import pytest
import torch

from auditor.errors import InvalidInputError
from probes.drift import (
    PSI_EMPTY_BIN_FLOOR,
    kolmogorov_survival,
    ks_statistic,
    ks_two_sample,
    population_stability_index,
)


def normal(n: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(loc=shift, scale=1.0, size=n)


def brute_force_ks(a, b) -> float:
    """sup_x |F_a(x) − F_b(x)| by its definition, one observed x at a time."""
    return max(abs(sum(v <= x for v in a) / len(a) - sum(v <= x for v in b) / len(b)) for x in list(a) + list(b))


def test_two_samples_of_one_distribution_show_no_drift():
    baseline, recent = normal(2000, seed=1), normal(2000, seed=2)
    psi = population_stability_index(baseline, recent)
    statistic, p_value = ks_two_sample(baseline, recent)
    assert psi < 0.02
    assert p_value > 0.05 and statistic < 0.05


def test_a_sample_against_itself_is_exactly_stable():
    sample = normal(500)
    assert population_stability_index(sample, sample) == 0.0
    assert ks_two_sample(sample, sample) == (0.0, 1.0)


def test_a_half_sd_shift_is_detected():
    baseline, recent = normal(2000, seed=1), normal(2000, shift=0.5, seed=2)
    psi = population_stability_index(baseline, recent)
    statistic, p_value = ks_two_sample(baseline, recent)
    assert psi > 0.1
    # For a normal shift of δ sd the PSI tends to δ² (the symmetric KL divergence) = 0.25.
    assert 0.15 < psi < 0.4
    assert p_value < 1e-6
    # The largest CDF gap between N(0,1) and N(0.5,1) is 2Φ(0.25) − 1 ≈ 0.197.
    assert statistic == pytest.approx(0.197, abs=0.04)


def test_psi_equals_a_hand_computed_value():
    # Baseline 1..10 in 5 quantile bins: {1,2} {3,4} {5,6} {7,8} {9,10}, 0.2 each.
    # Recent puts 0.6 in the first bin and 0.1 in each other one.
    baseline = np.arange(1, 11, dtype=float)
    recent = [1, 1, 1, 1, 1, 1, 3, 5, 7, 9]
    expected = (0.6 - 0.2) * math.log(0.6 / 0.2) + 4 * (0.1 - 0.2) * math.log(0.1 / 0.2)
    assert population_stability_index(baseline, recent, bins=5) == pytest.approx(expected, rel=1e-12)


def test_psi_with_ties_and_empty_bins_stays_finite():
    tied = np.array([0.0] * 90 + list(range(1, 11)), dtype=float)  # most quantile edges coincide
    assert population_stability_index(tied, tied.copy()) == 0.0
    beyond = np.full(50, 100.0)  # every recent value above the baseline's range: one bin
    psi = population_stability_index(normal(1000), beyond)
    # Top bin: (1 − 0.1)·ln(1/0.1); nine empty recent bins, each (floor − 0.1)·ln(floor/0.1).
    floor = PSI_EMPTY_BIN_FLOOR
    expected = 0.9 * math.log(10) + 9 * (floor - 0.1) * math.log(floor / 0.1)
    assert math.isfinite(psi) and psi == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    "a, b",
    [
        (normal(37, seed=3), normal(23, shift=0.3, seed=4)),
        (
            np.random.default_rng(5).integers(0, 5, 40).astype(float),  # heavy ties
            np.random.default_rng(6).integers(0, 6, 31).astype(float),
        ),
        (np.array([1.0, 2, 3, 4, 5]), np.array([3.0, 4, 5, 6, 7, 8])),
    ],
)
def test_ks_statistic_matches_its_brute_force_definition(a, b):
    assert ks_statistic(a, b) == pytest.approx(brute_force_ks(a, b), abs=1e-12)
    assert ks_statistic(b, a) == pytest.approx(brute_force_ks(a, b), abs=1e-12)


@pytest.mark.parametrize(
    "x, survival",
    [
        (1.224, 0.10),
        (1.358, 0.05),
        (1.628, 0.01),
        (1.731, 0.005),
        (1.949, 0.001),
    ],
)
def test_kolmogorov_survival_at_tabulated_critical_values(x, survival):
    assert kolmogorov_survival(x) == pytest.approx(survival, rel=0.01)


def test_kolmogorov_survival_limits_and_monotonicity():
    grid = np.linspace(0.01, 4, 400)
    values = [kolmogorov_survival(float(x)) for x in grid]
    assert kolmogorov_survival(0.0) == 1.0 and values[0] == pytest.approx(1.0)
    assert all(later <= earlier for earlier, later in itertools.pairwise(values))
    assert 0.0 <= values[-1] < 1e-12


def test_p_values_are_calibrated_under_the_null():
    """Under H0 about 5% of tests fall below 0.05 (1000 draws: binomial sd ≈ 0.7%)."""
    rng = np.random.default_rng(1)
    p_values = np.array([ks_two_sample(rng.normal(size=60), rng.normal(size=90))[1] for _ in range(1000)])
    assert 0.03 <= (p_values < 0.05).mean() <= 0.07
    assert 0.42 <= (p_values < 0.5).mean() <= 0.55


def test_torch_tensors_and_lists_are_accepted():
    baseline, recent = normal(300, seed=1), normal(300, shift=1.0, seed=2)
    expected = ks_two_sample(baseline, recent)
    assert ks_two_sample(torch.from_numpy(baseline), list(recent)) == expected


@pytest.mark.parametrize(
    "baseline, recent, message",
    [
        ([1.0, 2, 3, 4], [1.0, 2, 3, 4, 5], "baseline has 4 value(s)"),
        ([1.0, 2, 3, 4, 5], [], "recent has 0 value(s)"),
        ([1.0, 2, float("nan"), 4, 5], [1.0, 2, 3, 4, 5], "baseline contains 1 NaN or Inf"),
        ([1.0, 2, 3, 4, 5], [1.0, 2, 3, float("inf"), 5], "recent contains 1 NaN or Inf"),
        (np.ones((5, 2)), [1.0, 2, 3, 4, 5], "must be 1-D"),
    ],
)
def test_bad_samples_are_rejected_clearly(baseline, recent, message):
    for statistic in (population_stability_index, ks_two_sample):
        with pytest.raises(InvalidInputError, match=re.escape(message)):
            statistic(baseline, recent)


def test_bad_bin_counts_are_rejected():
    with pytest.raises(InvalidInputError, match="bins must be an integer >= 2"):
        population_stability_index(normal(100), normal(100), bins=1)
    with pytest.raises(InvalidInputError, match="fewer than the 10 bins"):
        population_stability_index(normal(8), normal(100), bins=10)
