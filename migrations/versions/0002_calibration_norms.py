"""Calibrations remember the layer's typical residual norm (relative steering reads it) and the
reference set they came from, so a worker reuses a stored calibration instead of recomputing it
at every start.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("calibrations") as batch:
        batch.add_column(sa.Column("typical_norm", sa.Double(), nullable=True))
        batch.add_column(sa.Column("reference_set", sa.String(length=64), server_default="neutral", nullable=False))
        batch.add_column(sa.Column("reference_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("calibrations") as batch:
        batch.drop_column("reference_hash")
        batch.drop_column("reference_set")
        batch.drop_column("typical_norm")
