"""Report statistics computed from fetched score samples: per-concept summaries, time buckets
and drift verdicts. No database here: `queries.py` fetches, this file counts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from auditor.db.enums import FlagKind
from auditor.reports.queries import ConceptRef, FlaggedSet, RollupDay, ScoreSample
from auditor.reports.window import BUCKET_SECONDS
from probes.drift import MIN_SAMPLE_SIZE, ks_two_sample, population_stability_index

# A concept has drifted when its distribution moved by at least a "moderate" PSI (the usual
# 0.1–0.25 band) AND the move is unlikely to be chance at these sample sizes. PSI alone is noisy
# on small windows; KS alone calls trivial moves significant on large ones.
DRIFT_PSI = 0.1
DRIFT_P_VALUE = 0.01


@dataclass(frozen=True)
class ConceptSummary:
    concept: str
    version: int
    concept_id: int
    layer: int
    model_id: str
    requests: int
    mean_z: float | None
    p50_z: float | None
    p95_z: float | None
    threshold: float | None  # None: the alert threshold is a function of answer length (z units)
    above_threshold_rate: float | None  # share of requests that crossed the concept's alert
    flagged: int  # requests with any flag
    flagged_rate: float | None
    flagged_by_kind: dict[str, int]  # every flag kind, zero included: stable CSV columns


@dataclass(frozen=True)
class SeriesPoint:
    concept: str
    version: int
    concept_id: int
    bucket_start: datetime
    requests: int
    mean_z: float | None
    mean_score: float
    flagged: int
    flagged_rate: float


@dataclass(frozen=True)
class DriftRow:
    concept: str
    version: int
    concept_id: int
    layer: int
    baseline_requests: int
    recent_requests: int
    baseline_mean_score: float | None
    recent_mean_score: float | None
    psi: float | None
    ks_statistic: float | None
    p_value: float | None
    status: str  # "drift", "stable" or "insufficient data"


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _percentile(values: np.ndarray, q: float) -> float | None:
    # Linear interpolation: numpy's default, and what Postgres' percentile_cont computes.
    return float(np.percentile(values, q)) if values.size else None


def summarize(
    refs: Sequence[ConceptRef],
    scores: Mapping[int, ScoreSample],
    flagged: Mapping[int, FlaggedSet],
    thresholds: Mapping[int, float],
) -> list[ConceptSummary]:
    rows = []
    for ref in refs:
        sample, flags = scores[ref.concept_id], flagged[ref.concept_id]
        z = sample.z[~np.isnan(sample.z)]
        n = sample.score.size
        threshold = thresholds.get(ref.concept_id)
        # Alerts are stored as `threshold` flags when an answer crosses the family-wise alert
        # threshold at its length: the rate of those is the rate of alerts.
        above = len(flags.by_kind.get(FlagKind.THRESHOLD, ())) / n if n else None
        rows.append(ConceptSummary(
            concept=ref.concept, version=ref.version, concept_id=ref.concept_id, layer=ref.layer,
            model_id=ref.model_id, requests=n, mean_z=_mean(z), p50_z=_percentile(z, 50),
            p95_z=_percentile(z, 95), threshold=threshold, above_threshold_rate=above,
            flagged=len(flags.times), flagged_rate=len(flags.times) / n if n else None,
            flagged_by_kind={kind: len(flags.by_kind.get(kind, ())) for kind in FlagKind.values()},
        ))  # fmt: skip
    return rows


def time_series(
    refs: Sequence[ConceptRef],
    scores: Mapping[int, ScoreSample],
    flagged: Mapping[int, FlaggedSet],
    bucket: str,
    rollups: Mapping[int, Sequence[RollupDay]] | None = None,
) -> list[SeriesPoint]:
    """One point per concept version and UTC hour or day that has scores (empty buckets carry no
    rate, so they are left out rather than drawn as zero). Daily points also count the days
    rolled up past retention (`rollups`), added to what per-request rows remain of the day."""
    width = BUCKET_SECONDS[bucket]
    points = []
    for ref in refs:
        sample = scores[ref.concept_id]
        starts = np.floor(sample.times / width) * width
        flagged_times = np.array(list(flagged[ref.concept_id].times.values()))
        flagged_starts = np.floor(flagged_times / width) * width
        rolled = {day.start: day for day in (rollups or {}).get(ref.concept_id, ())} if bucket == "day" else {}
        for start in np.unique(np.concatenate([starts, list(rolled)])):
            in_bucket = starts == start
            z = sample.z[in_bucket]
            z = z[~np.isnan(z)]
            n = int(in_bucket.sum())
            n_flagged = int((flagged_starts == start).sum())
            mean_z, mean_score = _mean(z), float(sample.score[in_bucket].mean()) if n else None
            if (day := rolled.get(float(start))) is not None:
                z_count = z.size + day.z_count
                mean_z = (float(z.sum()) + day.z_sum) / z_count if z_count else None
                mean_score = (
                    (float(sample.score[in_bucket].sum()) + day.score_sum) / (n + day.requests)
                    if n + day.requests
                    else None
                )
                n, n_flagged = n + day.requests, n_flagged + day.flagged
            if not n:
                continue
            points.append(SeriesPoint(
                concept=ref.concept, version=ref.version, concept_id=ref.concept_id,
                bucket_start=datetime.fromtimestamp(start, tz=UTC), requests=n,
                mean_z=mean_z, mean_score=mean_score, flagged=n_flagged, flagged_rate=n_flagged / n,
            ))  # fmt: skip
    return points


def drift(
    refs: Sequence[ConceptRef],
    baseline: Mapping[int, ScoreSample],
    recent: Mapping[int, ScoreSample],
) -> list[DriftRow]:
    """Recent raw scores against the baseline window's, per concept version. Raw scores rather
    than z: a recalibration between the windows shifts every z and would read as drift, while
    the raw score of a fixed vector cannot move for that reason (and both statistics are
    unchanged by the affine map from raw to z when the calibration is the same)."""
    rows = []
    for ref in refs:
        old, new = baseline[ref.concept_id].score, recent[ref.concept_id].score
        psi = ks = p_value = None
        status = "insufficient data"
        if min(old.size, new.size) >= MIN_SAMPLE_SIZE:
            psi = population_stability_index(old, new, bins=min(10, old.size))
            ks, p_value = ks_two_sample(old, new)
            status = "drift" if psi >= DRIFT_PSI and p_value < DRIFT_P_VALUE else "stable"
        rows.append(DriftRow(
            concept=ref.concept, version=ref.version, concept_id=ref.concept_id, layer=ref.layer,
            baseline_requests=old.size, recent_requests=new.size, baseline_mean_score=_mean(old),
            recent_mean_score=_mean(new), psi=psi, ks_statistic=ks, p_value=p_value, status=status,
        ))  # fmt: skip
    return rows
