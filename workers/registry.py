"""The concept registry (database) as the worker sees it: built-in concepts registered once per
model, and the bank of active vectors that every request is scored against."""

from __future__ import annotations

import torch
from sqlalchemy.orm import Session

from auditor import store
from probes.concepts import builtin_concepts, load_concept
from probes.errors import InvalidInputError
from workers.concepts import ConceptBank
from workers.engine import Engine


def register_builtin_concepts(session: Session, engine: Engine) -> list[int]:
    """Extract (or reuse the file cache) and register every built-in concept whose pairs are not
    yet registered for this model. Idempotent: same pairs + same model = no new version."""
    fingerprint = engine.model.fingerprint
    registered = {
        (c.name, c.pairs_hash) for c in store.list_concepts(session) if c.model_fingerprint == fingerprint.hash
    }
    added = []
    for name in builtin_concepts():
        definition = load_concept(name)
        if (name, definition.pairs_hash) in registered:
            continue
        vectors = engine.vectors(definition)
        concept = store.add_concept_version(
            session, name=name, description=definition.description,
            vectors={layer: vectors.directions[layer] for layer in range(engine.model.n_layers)},
            primary_layer=vectors.auto_layer, created_by="builtin", model_id=fingerprint.model_id,
            model_revision=fingerprint.revision, model_fingerprint=fingerprint.hash,
            loader=fingerprint.loader, hook_point=fingerprint.hook_point, d_model=fingerprint.d_model,
            n_layers_model=fingerprint.n_layers, method=vectors.provenance["method"],
            pooling=vectors.provenance["pooling"], source="pairs", n_pairs=definition.n_pairs,
            pairs_hash=definition.pairs_hash,
            provenance={"sweep": [r.__dict__ for r in vectors.sweep]},
        )
        added.append(concept.id)
    return added


def _active_concepts(session: Session, engine: Engine) -> list:
    fingerprint = engine.model.fingerprint.hash
    return [c for c in store.list_concepts(session, active=True) if c.model_fingerprint == fingerprint]


def active_concept_ids(session: Session, engine: Engine) -> list[int]:
    """Cheap per-request check of which versions the bank should hold (in bank order)."""
    return [c.id for c in _active_concepts(session, engine)]


def bank_from_registry(session: Session, engine: Engine) -> ConceptBank:
    """Every active concept version registered for the loaded model, at the monitored layers."""
    model, layers = engine.model, engine.layers
    concepts = _active_concepts(session, engine)
    if not concepts:
        raise InvalidInputError(f"no active concepts are registered for {model.fingerprint.model_id}")
    names = [c.name if sum(o.name == c.name for o in concepts) == 1 else f"{c.name}:v{c.version}" for c in concepts]
    directions = torch.zeros(len(layers), len(concepts), model.d_model)
    mask = torch.zeros(len(layers), len(concepts), dtype=torch.bool)
    for k, concept in enumerate(concepts):
        for layer, vector in store.concept_vectors(session, concept_id=concept.id).items():
            if layer in layers:
                directions[layers.index(layer), k] = vector
                mask[layers.index(layer), k] = True
    return ConceptBank(
        names=names, layers=list(layers), directions=directions,
        auto_layers={name: c.primary_layer for name, c in zip(names, concepts)}, vectors={},
        concept_ids=[c.id for c in concepts], mask=mask,
    )
