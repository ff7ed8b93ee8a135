"""Daily rollups: what retention keeps of requests older than its window (per UTC day, serving
model and concept version: count, sum, sum of squares, min and max of the primary-layer score and
z, flagged requests by kind).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _count(name: str) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "daily_rollups",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("model_id", sa.String(length=512), nullable=False),
        sa.Column("concept_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        _count("requests"),
        sa.Column("score_sum", sa.Double(), nullable=False),
        sa.Column("score_sumsq", sa.Double(), nullable=False),
        sa.Column("score_min", sa.Double(), nullable=True),
        sa.Column("score_max", sa.Double(), nullable=True),
        _count("z_count"),
        sa.Column("z_sum", sa.Double(), nullable=False),
        sa.Column("z_sumsq", sa.Double(), nullable=False),
        sa.Column("z_min", sa.Double(), nullable=True),
        sa.Column("z_max", sa.Double(), nullable=True),
        _count("flagged"),
        _count("flagged_hidden"),
        _count("flagged_surface"),
        _count("flagged_threshold"),
        _count("flagged_drift"),
        sa.ForeignKeyConstraint(["concept_id"], ["concepts.id"], name=op.f("fk_daily_rollups_concept_id_concepts")),
        sa.PrimaryKeyConstraint("day", "model_id", "concept_id", name=op.f("pk_daily_rollups")),
    )
    op.create_index("ix_daily_rollups_concept_day", "daily_rollups", ["concept_id", "day"])


def downgrade() -> None:
    op.drop_index("ix_daily_rollups_concept_day", table_name="daily_rollups")
    op.drop_table("daily_rollups")
