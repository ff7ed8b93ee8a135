"""Concept vectors on a loaded model: extraction with a layer sweep, a bank of directions for
monitoring, calibration against neutral text, and text scoring. Composes probes + runtime."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from auditor.data_dir import ensure_private_dir
from auditor.errors import FingerprintMismatchError, InvalidInputError
from probes.calibration import Calibration, fit_calibration
from probes.concepts import ConceptDefinition, load_concept, load_neutral
from probes.extraction import extract_per_layer
from probes.pooling import pool, token_mask
from probes.scoring import cosine_scores, masked_mean
from probes.sweep import LayerSeparation, choose_layer, sweep_layers
from probes.validation import check_layer, check_vector
from workers.runtime.activations import SINK_POSITIONS, Progress, run_batches
from workers.runtime.model import LoadedModel

FORMAT_VERSION = 1


@dataclass
class ConceptVectors:
    """One concept's unit direction at every layer, how well each layer separated held-out pairs,
    and the layer chosen from that (never from evaluation data)."""

    name: str
    directions: torch.Tensor  # [n_layers, d_model], unit rows
    sweep: list[LayerSeparation]
    auto_layer: int
    provenance: dict = field(default_factory=dict)

    def direction(self, layer: int) -> torch.Tensor:
        return self.directions[check_layer(layer, self.directions.shape[0])]

    @property
    def vector_hash(self) -> str:
        return hashlib.sha256(self.directions.float().contiguous().numpy().tobytes()).hexdigest()


def pooled_activations(
    model: LoadedModel,
    texts: Sequence[str],
    pooling: str,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> torch.Tensor:
    """-> [n_layers, n_texts, d_model], sink position excluded from `mean` pooling."""
    layers = list(range(model.n_layers)) if layers is None else list(layers)
    return run_batches(
        model,
        texts,
        layers,
        reduce=lambda resid, mask: pool(resid, mask, pooling, skip_first=SINK_POSITIONS),
        batch_size=batch_size,
        progress=progress,
    )


def extract_concept(
    model: LoadedModel,
    concept: ConceptDefinition,
    method: str = "mean_diff",
    pooling: str = "mean",
    batch_size: int = 16,
    progress: Progress | None = None,
) -> ConceptVectors:
    """Directions at every layer from one pass over the pairs; a 5-fold held-out sweep picks
    the layer."""
    acts = pooled_activations(model, [*concept.positives, *concept.negatives], pooling, None, batch_size, progress)
    n_pairs = concept.n_pairs
    pos_acts, neg_acts = acts[:, :n_pairs], acts[:, n_pairs:]
    directions = extract_per_layer(pos_acts, neg_acts, method)
    sweep = sweep_layers(pos_acts, neg_acts, method) if n_pairs >= 2 else []
    auto_layer = choose_layer(sweep, model.n_layers) if sweep else model.n_layers // 2
    vectors = ConceptVectors(concept.name, directions, sweep, auto_layer)
    vectors.provenance = {
        **model.fingerprint.as_dict(),
        "model_fingerprint": model.fingerprint.hash,
        "concept": concept.name,
        "method": method,
        "pooling": pooling,
        "sink_positions_skipped": SINK_POSITIONS,
        "n_pairs": n_pairs,
        "pairs_hash": concept.pairs_hash,
        "vector_hash": vectors.vector_hash,
        "auto_layer": auto_layer,
        # How well the direction separates pairs it was not fitted on (5-fold, at the auto layer).
        "pair_separation_auroc": next((round(r.auroc, 4) for r in sweep if r.layer == auto_layer), None),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "format_version": FORMAT_VERSION,
    }
    return vectors


# ---- on-disk cache of extracted vectors (the database registry supersedes it for the service) ----


def _cache_path(cache_dir: Path, model: LoadedModel, concept: ConceptDefinition, method: str, pooling: str) -> Path:
    key = f"{concept.name}-{method}-{pooling}-{concept.pairs_hash[:12]}.safetensors"
    return cache_dir / "vectors" / model.fingerprint.hash[:16] / key


def save_vectors(vectors: ConceptVectors, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "provenance": json.dumps(vectors.provenance),
        "sweep": json.dumps([asdict(r) for r in vectors.sweep]),
    }
    save_file({"directions": vectors.directions.contiguous()}, str(path), metadata=metadata)


def load_vectors(path: Path, model: LoadedModel) -> ConceptVectors:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    directions = load_file(str(path))["directions"]
    provenance = json.loads(metadata["provenance"])
    if provenance.get("model_fingerprint") != model.fingerprint.hash:
        raise FingerprintMismatchError(
            f"{path.name} was extracted from {provenance.get('model_id')} "
            f"(fingerprint {str(provenance.get('model_fingerprint'))[:12]}), not the loaded "
            f"{model.fingerprint.model_id} ({model.fingerprint.hash[:12]})"
        )
    for row in directions:
        check_vector(row, model.d_model, "stored direction")
    sweep = [LayerSeparation(**r) for r in json.loads(metadata["sweep"])]
    return ConceptVectors(provenance["concept"], directions, sweep, provenance["auto_layer"], provenance)


def get_concept_vectors(
    model: LoadedModel,
    concept: ConceptDefinition | str,
    method: str = "mean_diff",
    pooling: str = "mean",
    cache_dir: Path | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> ConceptVectors:
    """Extract, or reuse a cached extraction of the same pairs on the same model."""
    if isinstance(concept, str):
        concept = load_concept(concept)
    path = _cache_path(cache_dir, model, concept, method, pooling) if cache_dir else None
    if path is not None and path.exists():
        return load_vectors(path, model)
    vectors = extract_concept(model, concept, method, pooling, batch_size, progress)
    if path is not None:
        ensure_private_dir(cache_dir)  # the data dir: `auditor sweep` may be the first to make it
        save_vectors(vectors, path)
    return vectors


# ---- scoring text against many concepts at once ----


def per_text_scores(
    model: LoadedModel,
    texts: Sequence[str],
    directions: torch.Tensor,
    layers: Sequence[int],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Mean per-token cosine (sink excluded) of each text against each direction at each layer.

    directions [n_layers, n_concepts, d_model] -> scores [n_texts, n_layers, n_concepts].
    """

    def reduce(resid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n_layers, batch, pos, d_model = resid.shape
        scores = cosine_scores(resid.reshape(n_layers, batch * pos, d_model), directions)
        return masked_mean(scores.reshape(n_layers, batch, pos, -1), token_mask(mask, SINK_POSITIONS))

    return run_batches(model, texts, layers, reduce, batch_size, progress).permute(1, 0, 2)


@dataclass
class ConceptBank:
    """The directions the monitor reads: every concept at every monitored layer."""

    names: list[str]
    layers: list[int]
    directions: torch.Tensor  # [n_layers, n_concepts, d_model], unit rows
    auto_layers: dict[str, int]
    vectors: dict[str, ConceptVectors]
    calibration: Calibration | None = None
    typical_norms: dict[int, float] = field(default_factory=dict)  # layer -> median residual norm
    # Registry-backed banks: the database id of each concept version, and which (layer, concept)
    # cells hold a vector ([n_layers, n_concepts]; an uploaded vector may cover a few layers).
    concept_ids: list[int] | None = None
    mask: torch.Tensor | None = None

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise InvalidInputError(f"unknown concept {name!r}; loaded concepts are: {', '.join(self.names)}") from None

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise InvalidInputError(f"layer {layer} is not monitored (monitored: {self.layers})") from None


def build_bank(vectors: Sequence[ConceptVectors], layers: Sequence[int]) -> ConceptBank:
    if not vectors:
        raise InvalidInputError("a concept bank needs at least one concept")
    layers = list(layers)
    directions = torch.stack([v.directions[layers] for v in vectors], dim=1)  # [L, K, d]
    return ConceptBank(
        names=[v.name for v in vectors],
        layers=layers,
        directions=directions,
        auto_layers={v.name: v.auto_layer for v in vectors},
        vectors={v.name: v for v in vectors},
    )


def calibration_texts(concepts: Sequence[ConceptDefinition]) -> list[str]:
    """Shared neutral set plus every concept's own neutral texts, deduplicated."""
    seen: dict[str, None] = dict.fromkeys(load_neutral())
    for concept in concepts:
        seen.update(dict.fromkeys(concept.neutral))
    return list(seen)


def calibrate_bank(
    model: LoadedModel,
    bank: ConceptBank,
    texts: Sequence[str],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> ConceptBank:
    """Fit the neutral reference distribution and each layer's typical residual norm."""

    def reduce(resid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n_layers, batch, pos, d_model = resid.shape
        keep = token_mask(mask, SINK_POSITIONS)
        scores = cosine_scores(resid.reshape(n_layers, batch * pos, d_model), bank.directions)
        mean_scores = masked_mean(scores.reshape(n_layers, batch, pos, -1), keep)
        norms = masked_mean(resid.norm(dim=-1, keepdim=True), keep)  # [L, batch, 1]
        return torch.cat([mean_scores, norms], dim=-1)

    reduced = run_batches(model, texts, bank.layers, reduce, batch_size, progress)  # [L, N, K+1]
    bank.calibration = fit_calibration(reduced[..., :-1].permute(1, 0, 2))
    bank.typical_norms = {layer: float(reduced[i, :, -1].median()) for i, layer in enumerate(bank.layers)}
    return bank
