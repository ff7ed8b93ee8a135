"""Concept versions and their vectors: registering the next version of a name (all vectors
checked and stored unit length, or nothing) or getting the version already registered from the
same extraction, reading them back, pausing, resuming and retiring. A registered version is
immutable but for `active` and `retired_at` (see auditor.db.models)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auditor.db.enums import ConceptSource
from auditor.db.models import Concept, ConceptVector, utcnow
from auditor.db.store.codecs import VectorLike, as_tensor, vector_from_bytes, vector_to_bytes
from auditor.db.store.validation import check_choice, check_sha256
from auditor.errors import ConceptNotFound, InvalidInputError
from probes.validation import check_layer, check_vector

# A stored vector is unit length; one already this close is kept bit-exact, so the extractor's
# own vector_hash (over the same float32 bytes) still matches the stored one.
UNIT_TOLERANCE = 1e-5


def _unit_bytes(layer: Any, values: VectorLike, *, d_model: int, n_layers: int) -> bytes:
    check_layer(layer, n_layers)
    vector = check_vector(as_tensor(values), d_model, f"vector at layer {layer}")
    norm = float(vector.norm())
    if abs(norm - 1.0) > UNIT_TOLERANCE:
        vector = vector / norm
    return vector_to_bytes(vector)


def _validated_vectors(
    vectors: Mapping[int, VectorLike], *, d_model: int, n_layers: int, primary_layer: int
) -> dict[int, bytes]:
    """All or nothing: every vector is checked before anything is added to the session."""
    if not vectors:
        raise InvalidInputError("no vectors given: a concept needs a vector at one layer at least")
    if d_model < 1 or n_layers < 1:
        raise InvalidInputError(f"d_model ({d_model}) and n_layers_model ({n_layers}) must be >= 1")
    stored = {
        layer: _unit_bytes(layer, values, d_model=d_model, n_layers=n_layers)
        for layer, values in sorted(vectors.items())
    }
    if primary_layer not in stored:
        raise InvalidInputError(f"primary_layer {primary_layer} has no vector; vectors exist at {sorted(stored)}")
    return stored


def _serialize_registrations(session: Session, name: str) -> None:
    """Two registrations of one name at once would both pick version n+1. On Postgres a
    transaction-scoped advisory lock orders them; SQLite allows one writer at a time anyway.
    The unique (name, version) constraint is the backstop on both. This orders the inserts
    only: it does not stop the second from being a twin of the first (its caller checked for
    one before the lock, and before a long extraction); the identity constraint does that."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        session.execute(select(func.pg_advisory_xact_lock(key)))


def _next_version(session: Session, name: str) -> int:
    latest = session.scalar(select(func.max(Concept.version)).where(Concept.name == name))
    return (latest or 0) + 1


class Registration(NamedTuple):
    concept: Concept
    created: bool  # False: the same extraction was registered already, and `concept` is that row


def find_concept_version(
    session: Session, *, name: str, model_fingerprint: str, pairs_hash: str | None, method: str, pooling: str
) -> Concept | None:
    """The version registered from exactly these pairs, method and pooling on this model (its
    identity, auditor.db.models.concepts.CONCEPT_IDENTITY), retired or not. None for an upload
    (no pairs_hash): uploads have no identity."""
    if pairs_hash is None:
        return None
    return session.scalar(
        select(Concept).where(
            Concept.name == name,
            Concept.model_fingerprint == model_fingerprint,
            Concept.pairs_hash == pairs_hash,
            Concept.method == method,
            Concept.pooling == pooling,
        )
    )


def add_concept_version(session: Session, **fields: Any) -> Concept:
    """register_concept_version's row, for callers that need not know whether it is new."""
    return register_concept_version(session, **fields).concept


def register_concept_version(
    session: Session,
    *,
    name: str,
    vectors: Mapping[int, VectorLike],
    primary_layer: int,
    created_by: str,
    model_id: str,
    model_fingerprint: str,
    loader: str,
    hook_point: str,
    d_model: int,
    n_layers_model: int,
    method: str,
    pooling: str,
    source: str,
    model_revision: str | None = None,
    n_pairs: int | None = None,
    pairs_hash: str | None = None,
    description: str = "",
    provenance: Mapping[str, Any] | None = None,
) -> Registration:
    """Register the next version of `name`, or get the one registered already from the same
    extraction (CONCEPT_IDENTITY): insert-or-get, so two workers or jobs racing to register it
    end with one row. Vectors are stored as unit float32 vectors; earlier versions are never
    touched."""
    if not name or len(name) > 128:
        raise InvalidInputError("concept name must be 1 to 128 characters")
    check_choice("source", source, ConceptSource.values())
    check_sha256("model_fingerprint", model_fingerprint)
    check_sha256("pairs_hash", pairs_hash)
    stored = _validated_vectors(vectors, d_model=d_model, n_layers=n_layers_model, primary_layer=primary_layer)
    _serialize_registrations(session, name)
    concept = Concept(
        name=name,
        version=_next_version(session, name),
        description=description,
        created_by=created_by,
        model_id=model_id,
        model_revision=model_revision,
        model_fingerprint=model_fingerprint,
        loader=loader,
        hook_point=hook_point,
        d_model=d_model,
        n_layers_model=n_layers_model,
        method=method,
        pooling=pooling,
        n_pairs=n_pairs,
        pairs_hash=pairs_hash,
        vector_hash=hashlib.sha256(b"".join(stored.values())).hexdigest(),
        source=source,
        primary_layer=primary_layer,
        provenance=dict(provenance or {}),
        vectors=[ConceptVector(layer=layer, vector=data) for layer, data in stored.items()],
    )
    try:
        # A SAVEPOINT: a twin's insert fails alone, the caller's transaction (its audit entry,
        # its job row) goes on. The twin is visible by now: on Postgres the advisory lock waited
        # for the first registration's commit (and READ COMMITTED reads it); on SQLite the
        # writer's transaction began after it (BEGIN IMMEDIATE), or it is in this very session.
        with session.begin_nested():
            session.add(concept)
            session.flush()  # assigns the id
    except IntegrityError:
        existing = find_concept_version(
            session,
            name=name,
            model_fingerprint=model_fingerprint,
            pairs_hash=pairs_hash,
            method=method,
            pooling=pooling,
        )
        if existing is None:  # another constraint (a (name, version) race on a deferred SQLite txn)
            raise
        return Registration(existing, created=False)
    return Registration(concept, created=True)


def get_concept(session: Session, *, concept_id: int) -> Concept | None:
    return session.get(Concept, concept_id)


def get_concept_by_name(session: Session, *, name: str, version: int | None = None) -> Concept | None:
    """The given version of `name`, or its latest one."""
    query = select(Concept).where(Concept.name == name)
    if version is not None:
        return session.scalar(query.where(Concept.version == version))
    return session.scalar(query.order_by(Concept.version.desc()).limit(1))


def _require_concept(session: Session, concept_id: int) -> Concept:
    concept = session.get(Concept, concept_id)
    if concept is None:
        raise ConceptNotFound(concept_id)
    return concept


def list_concepts(session: Session, *, active: bool | None = None, name: str | None = None) -> list[Concept]:
    query = select(Concept).order_by(Concept.name, Concept.version)
    if active is not None:
        query = query.where(Concept.active.is_(active))
    if name is not None:
        query = query.where(Concept.name == name)
    return list(session.scalars(query))


def set_active(session: Session, *, concept_id: int, active: bool) -> Concept:
    """Pause or resume monitoring of one version. A retired version stays retired."""
    concept = _require_concept(session, concept_id)
    if active and concept.retired_at is not None:
        raise InvalidInputError(f"concept {concept.name} v{concept.version} is retired; register a new version instead")
    concept.active = active
    return concept


def retire_concept(session: Session, *, concept_id: int) -> Concept:
    """Withdraw a version for good (kept for the history of scores that reference it)."""
    concept = _require_concept(session, concept_id)
    concept.active = False
    if concept.retired_at is None:  # retiring twice keeps the first date
        concept.retired_at = utcnow()
    return concept


def concept_vectors(session: Session, *, concept_id: int) -> dict[int, torch.Tensor]:
    """layer -> unit float32 vector [d_model], for one concept version."""
    d_model = _require_concept(session, concept_id).d_model
    rows = session.execute(
        select(ConceptVector.layer, ConceptVector.vector)
        .where(ConceptVector.concept_id == concept_id)
        .order_by(ConceptVector.layer)
    )
    return {layer: vector_from_bytes(data, d_model) for layer, data in rows}
