"""One concept version per extraction: a unique index on (name, model fingerprint, pairs hash,
method, pooling), so two workers warming up on a fresh database, or two identical extraction
jobs, cannot each register a version (and score every request twice).

A database that already holds such twins is repaired first, without deleting anything (scores,
flags and rollups reference every version; concepts are never deleted): in each group the oldest
active version keeps the identity (the oldest, if none is active); the others are retired and
their pairs_hash moves into their provenance (`pairs_hash`, `duplicate_of`: the keeper's id), so
they are no longer that identity but still say where they came from. Downgrade drops the index
and leaves the repair as it is.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-09
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from itertools import groupby

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")
IDENTITY = ("name", "model_fingerprint", "pairs_hash", "method", "pooling")
INDEX = "uq_concepts_identity"

concepts = sa.table(
    "concepts",
    sa.column("id", sa.Integer()),
    sa.column("version", sa.Integer()),
    *(sa.column(name, sa.String()) for name in IDENTITY),
    sa.column("active", sa.Boolean()),
    sa.column("retired_at", sa.DateTime(timezone=True)),
    sa.column("provenance", JSONType),
)


def _retire_duplicates(connection: sa.Connection) -> None:
    identity = [concepts.c[name] for name in IDENTITY]
    rows = connection.execute(
        sa.select(concepts).where(concepts.c.pairs_hash.is_not(None)).order_by(*identity, concepts.c.version)
    ).all()
    now = datetime.now(UTC)
    for _, group in groupby(rows, key=lambda row: tuple(getattr(row, name) for name in IDENTITY)):
        versions = list(group)
        if len(versions) < 2:
            continue
        keeper = next((row for row in versions if row.active), versions[0])
        for row in versions:
            if row.id == keeper.id:
                continue
            connection.execute(
                concepts.update()
                .where(concepts.c.id == row.id)
                .values(
                    pairs_hash=None,
                    active=False,
                    retired_at=row.retired_at or now,
                    provenance={**(row.provenance or {}), "duplicate_of": keeper.id, "pairs_hash": row.pairs_hash},
                )
            )


def upgrade() -> None:
    _retire_duplicates(op.get_bind())
    op.create_index(INDEX, "concepts", list(IDENTITY), unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="concepts")
