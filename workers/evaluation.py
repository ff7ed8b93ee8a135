"""Probe quality on labelled text: AUROC (with bootstrap CI) of a concept score at a layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from probes.metrics import AurocEstimate, auroc_with_ci
from workers.concepts import ConceptVectors, per_text_scores
from workers.runtime.activations import Progress
from workers.runtime.model import LoadedModel


@dataclass(frozen=True)
class ProbeEvaluation:
    concept: str
    layer: int
    estimate: AurocEstimate


def evaluate_vectors(
    model: LoadedModel,
    vectors: ConceptVectors,
    texts: Sequence[str],
    labels: Sequence[int],
    layer: int | None = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    progress: Progress | None = None,
) -> ProbeEvaluation:
    """Score every text (mean per-token cosine, sink excluded) at `layer` (default: the
    concept's auto layer, chosen from its own pairs) and measure the separation."""
    layer = vectors.auto_layer if layer is None else layer
    directions = vectors.direction(layer)[None, None, :]  # [1 layer, 1 concept, d_model]
    scores = per_text_scores(model, texts, directions, [layer], batch_size, progress)[:, 0, 0]
    return ProbeEvaluation(vectors.name, layer, auroc_with_ci(scores, list(labels), n_boot=n_boot))
