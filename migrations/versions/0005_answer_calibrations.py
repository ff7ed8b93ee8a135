"""Length-aware calibration against ordinary answers: the null per set of active concepts, the
answer-relative z and percentile on each primary-layer score row, and how each request was read.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "answer_calibrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("bank_key", sa.String(length=64), nullable=False),
        sa.Column("model_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("concept_ids", JSONType, nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("window_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("n_answers", sa.Integer(), nullable=False),
        sa.Column("target_fpr", sa.Double(), nullable=False),
        sa.Column("confidence", sa.Double(), nullable=False),
        sa.Column("min_tokens", sa.Integer(), nullable=False),
        sa.Column("certified_length", sa.Integer(), nullable=False),
        sa.Column("summary", JSONType, nullable=False),
        sa.Column("null", JSONType, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_answer_calibrations")),
    )
    op.create_index("ix_answer_calibrations_bank_created", "answer_calibrations", ["bank_key", "created_at"])
    with op.batch_alter_table("request_scores") as batch:
        batch.add_column(sa.Column("answer_z", sa.Double(), nullable=True))
        batch.add_column(sa.Column("answer_percentile", sa.Double(), nullable=True))
    with op.batch_alter_table("monitored_requests") as batch:
        batch.add_column(sa.Column("monitor_status", sa.String(length=24), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("monitored_requests") as batch:
        batch.drop_column("monitor_status")
    with op.batch_alter_table("request_scores") as batch:
        batch.drop_column("answer_percentile")
        batch.drop_column("answer_z")
    op.drop_index("ix_answer_calibrations_bank_created", table_name="answer_calibrations")
    op.drop_table("answer_calibrations")
