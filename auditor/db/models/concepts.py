"""Concept versions and their per-layer vectors, and the ORM guard that keeps a registered
version immutable (but for `active` and `retired_at`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    event,
    inspect,
    true,
)
from sqlalchemy.orm import Mapped, Mapper, mapped_column, relationship

from auditor.db.models.base import CONCEPT_SOURCES, Base, JSONType, UTCDateTime, one_of, utcnow
from auditor.errors import AuditorError

# What makes two versions the same: the inputs of an extraction, not its output (the same pairs
# extracted on two workers need not give bit-identical floats, so vector_hash would let a twin
# through). These are the fields workers.serving.registry.find_extracted compares. An upload has
# no pairs (pairs_hash NULL) and so no identity: NULLs are distinct in a unique index on
# Postgres and SQLite alike, so every upload is a version of its own.
CONCEPT_IDENTITY = ("name", "model_fingerprint", "pairs_hash", "method", "pooling")


class Concept(Base):
    """One concept *version*: immutable once written except `active` / `retired_at`.
    A new vector for the same name is a new row with the next version number; the same
    extraction (CONCEPT_IDENTITY) registered again is the row already there."""

    __tablename__ = "concepts"
    __table_args__ = (
        UniqueConstraint("name", "version"),
        # A unique index rather than a constraint: SQLite builds it in place, where adding a
        # constraint would copy and drop the table its vectors, flags and rollups reference.
        Index("uq_concepts_identity", *CONCEPT_IDENTITY, unique=True),
        CheckConstraint("version >= 1", name="version_positive"),
        one_of("source", CONCEPT_SOURCES),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text, default="")
    active: Mapped[bool] = mapped_column(default=True, server_default=true())
    retired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    # Provenance: a vector is only meaningful in the basis it was extracted in (DESIGN.md).
    model_id: Mapped[str] = mapped_column(String(512))
    model_revision: Mapped[str | None] = mapped_column(String(256))
    model_fingerprint: Mapped[str] = mapped_column(String(64))  # sha256 hex
    loader: Mapped[str] = mapped_column(String(64))
    hook_point: Mapped[str] = mapped_column(String(128))
    d_model: Mapped[int] = mapped_column(Integer)
    n_layers_model: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(64))
    pooling: Mapped[str] = mapped_column(String(64))
    n_pairs: Mapped[int | None] = mapped_column(Integer)  # None for uploaded vectors
    pairs_hash: Mapped[str | None] = mapped_column(String(64))
    vector_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the stored bytes, layer order
    source: Mapped[str] = mapped_column(String(32))
    primary_layer: Mapped[int] = mapped_column(Integer)
    provenance: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)

    vectors: Mapped[list[ConceptVector]] = relationship(
        back_populates="concept", order_by="ConceptVector.layer", cascade="all, delete-orphan"
    )


class ConceptVector(Base):
    """One unit direction of a concept version at one layer (float32 LE, d_model values)."""

    __tablename__ = "concept_vectors"

    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    vector: Mapped[bytes] = mapped_column(LargeBinary)

    concept: Mapped[Concept] = relationship(back_populates="vectors")


# ---- immutability of registered vectors (ORM-level guard; the store never issues raw UPDATEs) ----

_MUTABLE_CONCEPT_COLUMNS = frozenset({"active", "retired_at"})


@event.listens_for(Concept, "before_update")
def _concept_is_immutable(mapper: Mapper[Any], _connection: Any, target: Concept) -> None:
    state = inspect(target)
    changed = {attr.key for attr in mapper.column_attrs if state.attrs[attr.key].history.has_changes()}
    if changed - _MUTABLE_CONCEPT_COLUMNS:
        raise AuditorError(
            f"concept {target.name} v{target.version} is immutable; tried to change "
            f"{sorted(changed - _MUTABLE_CONCEPT_COLUMNS)} — register a new version instead"
        )


@event.listens_for(ConceptVector, "before_update")
def _vector_is_immutable(_mapper: Mapper[Any], _connection: Any, target: ConceptVector) -> None:
    raise AuditorError(f"concept vector (concept {target.concept_id}, layer {target.layer}) is immutable")
