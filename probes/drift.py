"""Has a concept's score distribution moved? Recent scores against a baseline window.

Two views of the same question: the population stability index (how much mass moved between
the baseline's quantile bins: a size, with the usual reading < 0.1 stable, 0.1–0.25 moderate,
> 0.25 large) and the two-sample Kolmogorov–Smirnov test (the largest gap between the two
empirical CDFs, with a p-value: whether the move could be chance at these sample sizes).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from probes.errors import InvalidInputError

# Below this many values per sample neither statistic says anything, and the asymptotic
# p-value is far from the exact one.
MIN_SAMPLE_SIZE = 5

# An empty bin on either side makes ln(recent/baseline) infinite. Proportions are floored at
# this before the logarithm, so one empty bin that holds a share q on the other side adds about
# q·ln(q/1e-4) ≈ 9q: a large, finite contribution instead of an infinite index.
PSI_EMPTY_BIN_FLOOR = 1e-4

# The Kolmogorov survival series: the alternating form converges fast for large λ, the
# Jacobi-theta form for small λ; they agree to ~1e-16 around the switch.
_SERIES_SWITCH = 1.18
_SERIES_TERMS = np.arange(1, 101, dtype=np.float64)


def _sample(values, what: str) -> np.ndarray:
    """1-D float64 copy of `values` (sequence, numpy array or CPU tensor), checked."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    sample = np.asarray(values, dtype=np.float64)
    if sample.ndim != 1:
        raise InvalidInputError(f"{what} must be 1-D, got shape {sample.shape}")
    if sample.size < MIN_SAMPLE_SIZE:
        raise InvalidInputError(
            f"{what} has {sample.size} value(s); a drift statistic needs at least {MIN_SAMPLE_SIZE}"
        )
    if not np.isfinite(sample).all():
        bad = int((~np.isfinite(sample)).sum())
        raise InvalidInputError(f"{what} contains {bad} NaN or Inf value(s)")
    return sample


def population_stability_index(baseline, recent, bins: int = 10) -> float:
    """PSI = Σ_b (q_b − p_b)·ln(q_b / p_b), p and q the shares of baseline and recent values in
    bin b. Bins are the baseline's quantiles (each holds ~1/bins of it), the outer two open-ended
    so recent values beyond the baseline's range still count.

    Ties: when the baseline has repeated values some quantile edges coincide; duplicates are
    merged, so fewer (never empty-by-construction) bins are used. Empty bins that remain are
    floored at PSI_EMPTY_BIN_FLOOR (see there). Two samples from one distribution give
    ≈ (bins − 1)·(1/n_baseline + 1/n_recent), not 0.
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise InvalidInputError(f"bins must be an integer >= 2, got {bins!r}")
    baseline = _sample(baseline, "baseline")
    recent = _sample(recent, "recent")
    if baseline.size < bins:
        raise InvalidInputError(f"baseline has {baseline.size} values, fewer than the {bins} bins it must define")
    interior_quantiles = np.arange(1, bins) / bins
    edges = np.unique(np.quantile(baseline, interior_quantiles))
    # side="right": a value equal to an edge falls in the bin above it, for both samples alike.
    n_bins = edges.size + 1
    baseline_share = np.bincount(np.searchsorted(edges, baseline, side="right"), minlength=n_bins)
    recent_share = np.bincount(np.searchsorted(edges, recent, side="right"), minlength=n_bins)
    p = np.maximum(baseline_share / baseline.size, PSI_EMPTY_BIN_FLOOR)
    q = np.maximum(recent_share / recent.size, PSI_EMPTY_BIN_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_statistic(baseline, recent) -> float:
    """D = sup_x |F_baseline(x) − F_recent(x)| over the two empirical CDFs (ties handled: both
    CDFs are evaluated just after every observed value)."""
    baseline = np.sort(_sample(baseline, "baseline"))
    recent = np.sort(_sample(recent, "recent"))
    support = np.concatenate([baseline, recent])
    cdf_baseline = np.searchsorted(baseline, support, side="right") / baseline.size
    cdf_recent = np.searchsorted(recent, support, side="right") / recent.size
    return float(np.max(np.abs(cdf_baseline - cdf_recent)))


def kolmogorov_survival(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution K = sup |Brownian bridge|."""
    if x <= 0:
        return 1.0
    k = _SERIES_TERMS
    if x < _SERIES_SWITCH:
        # P(K <= x) = √(2π)/x · Σ exp(−(2k−1)²π² / (8x²))
        terms = np.exp(-((2 * k - 1) ** 2) * math.pi**2 / (8 * x * x))
        cdf = math.sqrt(2 * math.pi) / x * np.sum(terms)
        return float(min(1.0, max(0.0, 1.0 - cdf)))
    # P(K > x) = 2 Σ (−1)^(k−1) exp(−2k²x²)
    survival = 2 * np.sum((-1) ** (k - 1) * np.exp(-2 * k * k * x * x))
    return float(min(1.0, max(0.0, survival)))


def ks_two_sample(baseline, recent) -> tuple[float, float]:
    """(D, p-value) of the two-sample Kolmogorov–Smirnov test, two-sided.

    The p-value is the asymptotic Kolmogorov distribution at (√nₑ + 0.12 + 0.11/√nₑ)·D with
    nₑ = n·m/(n+m): Stephens' small-sample correction (as in Numerical Recipes' kstwo), which
    keeps it close to the exact value down to nₑ ≈ 4. With many ties (a discrete score) the test
    is conservative: the p-value is too large, never too small.
    """
    baseline = _sample(baseline, "baseline")
    recent = _sample(recent, "recent")
    statistic = ks_statistic(baseline, recent)
    root_n = math.sqrt(baseline.size * recent.size / (baseline.size + recent.size))
    return statistic, kolmogorov_survival((root_n + 0.12 + 0.11 / root_n) * statistic)
