"""The concept registry (database) as the worker sees it: built-in concepts registered once per
model, and the bank of active vectors that every request is scored against."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict

import torch
from sqlalchemy.orm import Session

from auditor.db import store
from auditor.db.labels import display_labels
from auditor.db.models import Concept
from auditor.errors import InvalidInputError
from probes.calibration import Calibration, fpr_thresholds
from probes.concepts import ConceptDefinition, builtin_concepts, load_concept
from workers.monitoring.concepts import ConceptBank, ConceptVectors
from workers.serving.host import ModelHost


def register_extracted(
    session: Session,
    host: ModelHost,
    definition: ConceptDefinition,
    vectors: ConceptVectors,
    *,
    created_by: str,
    activate: bool = True,
) -> store.Registration:
    """A concept version from pairs extracted on the loaded model: every layer's direction, the
    auto layer as primary, and the pairs' hash and sweep as provenance. If another worker or job
    registered the same extraction meanwhile, that version (`created` False), untouched."""
    fingerprint = host.model.fingerprint
    registration = store.register_concept_version(
        session,
        name=definition.name,
        description=definition.description,
        vectors={layer: vectors.directions[layer] for layer in range(host.model.n_layers)},
        primary_layer=vectors.auto_layer,
        created_by=created_by,
        **fingerprint.provenance(),
        method=vectors.provenance["method"],
        pooling=vectors.provenance["pooling"],
        source="pairs",
        n_pairs=definition.n_pairs,
        pairs_hash=definition.pairs_hash,
        provenance={"sweep": [asdict(r) for r in vectors.sweep]},
    )
    if registration.created and not activate:
        store.set_active(session, concept_id=registration.concept.id, active=False)
    return registration


def find_extracted(
    session: Session, host: ModelHost, definition: ConceptDefinition, method: str, pooling: str
) -> Concept | None:
    """The version already registered from exactly these pairs, method and pooling on this model."""
    return store.find_concept_version(
        session,
        name=definition.name,
        model_fingerprint=host.model.fingerprint.hash,
        pairs_hash=definition.pairs_hash,
        method=method,
        pooling=pooling,
    )


def register_builtin_concepts(session: Session, host: ModelHost) -> list[int]:
    """Extract (or reuse the file cache) and register every built-in concept whose pairs are not
    yet registered for this model. Idempotent: same pairs + same model = no new version, also
    when another worker warming up on the same database registers them at the same time (the
    check below only saves the extraction; registration is insert-or-get)."""
    fingerprint = host.model.fingerprint
    registered = {
        (c.name, c.pairs_hash) for c in store.list_concepts(session) if c.model_fingerprint == fingerprint.hash
    }
    added = []
    for name in builtin_concepts():
        definition = load_concept(name)
        if (name, definition.pairs_hash) in registered:
            continue
        registration = register_extracted(session, host, definition, host.vectors(definition), created_by="builtin")
        if registration.created:
            added.append(registration.concept.id)
    return added


def _active_concepts(session: Session, host: ModelHost) -> list:
    fingerprint = host.model.fingerprint.hash
    return [c for c in store.list_concepts(session, active=True) if c.model_fingerprint == fingerprint]


def active_concept_ids(session: Session, host: ModelHost) -> list[int]:
    """Cheap per-request check of which versions the bank should hold (in bank order)."""
    return [c.id for c in _active_concepts(session, host)]


def bank_from_registry(session: Session, host: ModelHost) -> ConceptBank:
    """Every active concept version registered for the loaded model, at the monitored layers."""
    model, layers = host.model, host.layers
    concepts = _active_concepts(session, host)
    if not concepts:
        raise InvalidInputError(f"no active concepts are registered for {model.fingerprint.model_id}")
    names = display_labels(concepts)
    directions = torch.zeros(len(layers), len(concepts), model.d_model)
    mask = torch.zeros(len(layers), len(concepts), dtype=torch.bool)
    for k, concept in enumerate(concepts):
        for layer, vector in store.concept_vectors(session, concept_id=concept.id).items():
            if layer in layers:
                directions[layers.index(layer), k] = vector
                mask[layers.index(layer), k] = True
    return ConceptBank(
        names=names,
        layers=list(layers),
        directions=directions,
        auto_layers={name: c.primary_layer for name, c in zip(names, concepts)},
        vectors={},
        concept_ids=[c.id for c in concepts],
        mask=mask,
    )


# ---- calibrations: computed once, stored, reused by every worker process ----


def reference_hash(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def _cells(bank: ConceptBank) -> list[tuple[int, int, int, int]]:
    """(layer index, concept index, layer, concept id) of every cell that holds a vector."""
    assert bank.concept_ids is not None, "a registry-backed bank"
    return [
        (li, k, layer, concept_id)
        for li, layer in enumerate(bank.layers)
        for k, concept_id in enumerate(bank.concept_ids)
        if bank.mask is None or bool(bank.mask[li, k])
    ]


def load_stored_calibration(session: Session, bank: ConceptBank, texts_hash: str) -> bool:
    """Attach the stored calibration to `bank` if every cell has one from the same reference
    texts; False (bank untouched) if anything is missing or stale."""
    stored = store.latest_calibrations(session, concept_ids=bank.concept_ids or [])
    cells = _cells(bank)
    rows = [stored.get((concept_id, layer)) for _, _, layer, concept_id in cells]
    if not rows or any(r is None or r.reference_hash != texts_hash or r.typical_norm is None for r in rows):
        return False
    n_reference = {r.n_reference for r in rows}
    if len(n_reference) != 1:
        return False
    (n,) = n_reference
    shape = (len(bank.layers), len(bank.names))
    mean, std = torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64)
    reference = torch.zeros((n, *shape), dtype=torch.float64)
    norms: dict[int, float] = {}
    for (li, k, layer, _), row in zip(cells, rows):
        mean[li, k], std[li, k] = row.mean, row.std
        reference[:, li, k] = torch.tensor(row.reference, dtype=torch.float64)
        norms[layer] = row.typical_norm
    bank.calibration = Calibration(mean=mean, std=std, reference=reference)
    bank.typical_norms = norms
    return True


def save_calibration(session: Session, bank: ConceptBank, texts_hash: str, target_fpr: float) -> int:
    """Store `bank`'s calibration, one row per cell, with the alert threshold at `target_fpr`
    and the false-positive rate it achieves on the reference set. Returns rows written."""
    calibration = bank.calibration
    assert calibration is not None
    thresholds, achieved = fpr_thresholds(calibration, target_fpr)
    cells = _cells(bank)
    for li, k, layer, concept_id in cells:
        store.add_calibration(
            session,
            concept_id=concept_id,
            layer=layer,
            mean=float(calibration.mean[li, k]),
            std=float(calibration.std[li, k]),
            reference=calibration.reference[:, li, k].tolist(),
            threshold=float(thresholds[li, k]),
            target_fpr=target_fpr,
            achieved_fpr=float(achieved[li, k]),
            typical_norm=bank.typical_norms.get(layer),
            reference_set="neutral",
            reference_hash=texts_hash,
        )
    return len(cells)
