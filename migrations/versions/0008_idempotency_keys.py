"""Idempotency keys: a client's retry with the same `Idempotency-Key` is the request it already
made. One nullable column on monitored_requests (a sha256, see auditor.api.idempotency) and a
unique index on it; rows without a key (NULL) are not constrained.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "uq_monitored_requests_idempotency_key"


def upgrade() -> None:
    with op.batch_alter_table("monitored_requests") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(length=64), nullable=True))
    op.create_index(INDEX, "monitored_requests", ["idempotency_key"], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="monitored_requests")
    with op.batch_alter_table("monitored_requests") as batch:
        batch.drop_column("idempotency_key")
