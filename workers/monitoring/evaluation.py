"""Probe quality on labelled text: AUROC (with bootstrap CI) of a concept score at a layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from probes.baselines import bag_of_words_scores, keyword_scores
from probes.concepts import ConceptDefinition
from probes.separation import AurocEstimate, auroc_with_ci
from workers.monitoring.concepts import ConceptVectors, per_text_scores
from workers.runtime.activations import Progress
from workers.runtime.model import LoadedModel


@dataclass(frozen=True)
class ProbeEvaluation:
    concept: str
    layer: int
    estimate: AurocEstimate
    baselines: dict[str, AurocEstimate] = field(default_factory=dict)

    @property
    def beats_keyword(self) -> bool | None:
        """Does the probe beat the concept's keyword count on these rows (None: no lexicon)?"""
        keyword = self.baselines.get("keyword")
        return None if keyword is None else self.estimate.auroc > keyword.auroc


def text_baselines(
    definition: ConceptDefinition, texts: Sequence[str], labels: Sequence[int], n_boot: int = 1000
) -> dict[str, AurocEstimate]:
    """AUROC of the text-only baselines on the same rows: the concept's keyword count (when it
    declares a lexicon) and a bag-of-words logistic regression cross-validated on the rows."""
    out = {}
    if definition.lexicon:
        out["keyword"] = auroc_with_ci(keyword_scores(texts, definition.lexicon), list(labels), n_boot=n_boot)
    # Cross-validation needs two texts of each label; a smaller set still gets its probe AUROC.
    if min(sum(1 for y in labels if y == 1), sum(1 for y in labels if y == 0)) >= 2:
        out["bag_of_words"] = auroc_with_ci(bag_of_words_scores(texts, labels), list(labels), n_boot=n_boot)
    return out


def evaluate_vectors(
    model: LoadedModel,
    vectors: ConceptVectors,
    texts: Sequence[str],
    labels: Sequence[int],
    layer: int | None = None,
    batch_size: int = 16,
    n_boot: int = 1000,
    progress: Progress | None = None,
    definition: ConceptDefinition | None = None,
) -> ProbeEvaluation:
    """Score every text (mean per-token cosine, sink excluded) at `layer` (default: the
    concept's auto layer, chosen from its own pairs) and measure the separation; with the
    concept's `definition`, the text-only baselines on the same rows too."""
    layer = vectors.auto_layer if layer is None else layer
    directions = vectors.direction(layer)[None, None, :]  # [1 layer, 1 concept, d_model]
    scores = per_text_scores(model, texts, directions, [layer], batch_size, progress)[:, 0, 0]
    baselines = text_baselines(definition, texts, labels, n_boot) if definition is not None else {}
    return ProbeEvaluation(vectors.name, layer, auroc_with_ci(scores, list(labels), n_boot=n_boot), baselines)
