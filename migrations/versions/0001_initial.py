"""Initial schema: concept registry, monitored requests and their scores, flags, calibrations,
jobs.

Revision ID: 0001
Revises:
Create Date: 2026-11-24

Types are spelled out here rather than imported from auditor.db.models: a migration must keep
creating the same schema after the models move on.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER only


def _one_of(column: str, values: Sequence[str], table: str) -> sa.CheckConstraint:
    quoted = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({quoted})", name=op.f(f"ck_{table}_{column}"))


def upgrade() -> None:
    _create_concepts()
    _create_requests()
    _create_scores()
    _create_flags()
    _create_calibrations()
    _create_jobs()


def _create_concepts() -> None:
    op.create_table(
        "concepts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("retired_at", TIMESTAMP, nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("model_id", sa.String(length=512), nullable=False),
        sa.Column("model_revision", sa.String(length=256), nullable=True),
        sa.Column("model_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("loader", sa.String(length=64), nullable=False),
        sa.Column("hook_point", sa.String(length=128), nullable=False),
        sa.Column("d_model", sa.Integer(), nullable=False),
        sa.Column("n_layers_model", sa.Integer(), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("pooling", sa.String(length=64), nullable=False),
        sa.Column("n_pairs", sa.Integer(), nullable=True),
        sa.Column("pairs_hash", sa.String(length=64), nullable=True),
        sa.Column("vector_hash", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("primary_layer", sa.Integer(), nullable=False),
        sa.Column("provenance", JSON, nullable=False),
        _one_of("source", ("pairs", "upload-json", "upload-safetensors", "upload-gguf"), "concepts"),
        sa.CheckConstraint("version >= 1", name=op.f("ck_concepts_version_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_concepts")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_concepts_name_version")),
    )
    op.create_table(
        "concept_vectors",
        sa.Column("concept_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["concept_id"], ["concepts.id"],
            name=op.f("fk_concept_vectors_concept_id_concepts"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("concept_id", "layer", name=op.f("pk_concept_vectors")),
    )  # fmt: skip


def _create_requests() -> None:
    op.create_table(
        "monitored_requests",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("model_fingerprint", sa.String(length=64), nullable=True),
        sa.Column("model_id", sa.String(length=512), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("queue_seconds", sa.Double(), nullable=True),
        sa.Column("prefill_seconds", sa.Double(), nullable=True),
        sa.Column("decode_seconds", sa.Double(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("finish_reason", sa.String(length=32), nullable=True),
        sa.Column("privacy_mode", sa.String(length=16), nullable=False),
        sa.Column("prompt_text", sa.Text(), nullable=True),
        sa.Column("completion_text", sa.Text(), nullable=True),
        sa.Column("prompt_sha256", sa.String(length=64), nullable=True),
        sa.Column("completion_sha256", sa.String(length=64), nullable=True),
        sa.Column("params", JSON, nullable=False),
        sa.Column("steered", sa.Boolean(), server_default=sa.false(), nullable=False),
        _one_of("kind", ("chat", "completion", "audit"), "monitored_requests"),
        _one_of("status", ("queued", "running", "done", "failed"), "monitored_requests"),
        _one_of("privacy_mode", ("full", "redacted", "hash"), "monitored_requests"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_monitored_requests")),
    )
    op.create_index("ix_monitored_requests_created_at", "monitored_requests", ["created_at"])


def _create_scores() -> None:
    op.create_table(
        "request_scores",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        # No FK to concepts: see RequestScore.concept_id in auditor/db/models.py.
        sa.Column("concept_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("layer", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("mean", sa.Double(), nullable=False),
        sa.Column("max", sa.Double(), nullable=False),
        sa.Column("last", sa.Double(), nullable=False),
        sa.Column("calibrated_z", sa.Double(), nullable=True),
        sa.Column("percentile", sa.Double(), nullable=True),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("trace", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"], ["monitored_requests.id"],
            name=op.f("fk_request_scores_request_id_monitored_requests"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "request_id", "concept_id", "layer", name=op.f("pk_request_scores")
        ),
    )  # fmt: skip
    op.create_index("ix_request_scores_concept_created", "request_scores", ["concept_id", "created_at"])
    op.create_index("ix_request_scores_created_at", "request_scores", ["created_at"])


def _create_flags() -> None:
    op.create_table(
        "flags",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("concept_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("residual_signal", sa.Double(), nullable=False),
        sa.Column("text_signal", sa.Double(), nullable=True),
        sa.Column("threshold", sa.Double(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        _one_of("kind", ("hidden", "surface", "threshold", "drift"), "flags"),
        sa.ForeignKeyConstraint(
            ["concept_id"], ["concepts.id"], name=op.f("fk_flags_concept_id_concepts")
        ),
        sa.ForeignKeyConstraint(
            ["request_id"], ["monitored_requests.id"],
            name=op.f("fk_flags_request_id_monitored_requests"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_flags")),
    )  # fmt: skip
    op.create_index("ix_flags_concept_created", "flags", ["concept_id", "created_at"])
    op.create_index("ix_flags_kind_created", "flags", ["kind", "created_at"])
    op.create_index("ix_flags_request_id", "flags", ["request_id"])


def _create_calibrations() -> None:
    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("concept_id", sa.Integer(), nullable=False),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("mean", sa.Double(), nullable=False),
        sa.Column("std", sa.Double(), nullable=False),
        sa.Column("n_reference", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Double(), nullable=True),
        sa.Column("target_fpr", sa.Double(), nullable=True),
        sa.Column("achieved_fpr", sa.Double(), nullable=True),
        sa.Column("reference", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["concept_id"], ["concepts.id"], name=op.f("fk_calibrations_concept_id_concepts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibrations")),
    )
    op.create_index(
        "ix_calibrations_concept_layer_created",
        "calibrations",
        ["concept_id", "layer", "created_at"],
    )


def _create_jobs() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("result", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        _one_of("kind", ("extract", "calibrate"), "jobs"),
        _one_of("status", ("queued", "running", "done", "failed"), "jobs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )


def downgrade() -> None:
    # Children before parents; dropping a table drops its indexes.
    for table in (
        "jobs", "calibrations", "flags", "request_scores",
        "monitored_requests", "concept_vectors", "concepts",
    ):  # fmt: skip
        op.drop_table(table)
