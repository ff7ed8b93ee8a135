"""A request may be `cancelled`: a streamed request whose client disconnected, recorded with the
tokens and scores it had so far.

Downgrade turns cancelled requests into failed ones (with the reason in `error`) before the CHECK
narrows again: the older schema has no word for them.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = ("queued", "running", "done", "failed")
NEW = (*OLD, "cancelled")


def _status_check(batch, values: Sequence[str]) -> None:
    quoted = ", ".join(f"'{value}'" for value in values)
    batch.drop_constraint(op.f("ck_monitored_requests_status"), type_="check")
    batch.create_check_constraint(op.f("ck_monitored_requests_status"), f"status IN ({quoted})")


def upgrade() -> None:
    with op.batch_alter_table("monitored_requests") as batch:
        _status_check(batch, NEW)


def downgrade() -> None:
    op.execute(
        sa.text(
            "UPDATE monitored_requests SET status = 'failed', "
            "error = COALESCE(error, 'cancelled: the client disconnected') WHERE status = 'cancelled'"
        )
    )
    with op.batch_alter_table("monitored_requests") as batch:
        _status_check(batch, OLD)
