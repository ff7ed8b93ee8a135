"""Separation statistics: AUROC with ties, stratified bootstrap CI, effect size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from probes.errors import InvalidInputError


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _check_binary(scores: np.ndarray, labels: np.ndarray) -> None:
    if scores.shape != labels.shape or scores.ndim != 1:
        raise InvalidInputError(
            f"scores and labels must be equal-length 1-D arrays, got {scores.shape} and {labels.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise InvalidInputError("labels must be 0 or 1")
    if labels.min() == labels.max():
        raise InvalidInputError(
            f"AUROC needs both classes, but every label is {int(labels[0]) if len(labels) else '-'}"
        )
    if not np.isfinite(scores).all():
        raise InvalidInputError("scores contain NaN or Inf")


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given their average rank (vectorised: bootstraps call this a lot)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts_group = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.concatenate([starts[1:], [len(values)]])
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[group]
    return ranks


def auroc(scores, labels) -> float:
    """P(score of a random label-1 item > score of a random label-0 item), ties count half."""
    scores, labels = _as_numpy(scores), _as_numpy(labels)
    _check_binary(scores, labels)
    ranks = _ranks(scores)
    n_pos = labels.sum()
    n_neg = len(labels) - n_pos
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class AurocEstimate:
    auroc: float
    ci_low: float
    ci_high: float
    n: int
    n_positive: int


def auroc_with_ci(scores, labels, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> AurocEstimate:
    """AUROC with a percentile bootstrap CI, resampling within each class (stratified)."""
    scores, labels = _as_numpy(scores), _as_numpy(labels)
    point = auroc(scores, labels)
    rng = np.random.default_rng(seed)
    pos, neg = scores[labels == 1], scores[labels == 0]
    boot_labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    estimates = np.empty(n_boot)
    for b in range(n_boot):
        sample = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        estimates[b] = auroc(sample, boot_labels)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return AurocEstimate(point, float(low), float(high), len(labels), len(pos))


def cohens_d(pos_scores, neg_scores) -> float:
    """Standardised mean difference with the pooled standard deviation."""
    pos, neg = _as_numpy(pos_scores), _as_numpy(neg_scores)
    pooled = np.sqrt((pos.var(ddof=1) + neg.var(ddof=1)) / 2) if min(len(pos), len(neg)) > 1 else 0.0
    return float((pos.mean() - neg.mean()) / pooled) if pooled > 0 else float("inf")
