"""The admin audit log: one append-only row per admin action (who, what, when, vector hash)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from auditor.access.tokens import Principal
from auditor.db.models import AdminAction

# Actions done outside the API (CLI, the embedded start-up) name this actor.
LOCAL_ACTOR = "local-cli"


def record(
    session: Session,
    *,
    actor: Principal | str | None,
    action: str,
    target: str | None = None,
    vector_hash: str | None = None,
    details: dict[str, Any] | None = None,
) -> AdminAction:
    """Add the row to the caller's transaction: the action and its log entry commit together.
    `actor` is the API caller, or a name for work done on its behalf (a worker running a job)."""
    principal = actor if isinstance(actor, Principal) else None
    row = AdminAction(
        actor=principal.name if principal else (actor or LOCAL_ACTOR),
        actor_prefix=principal.prefix if principal else None,
        action=action,
        target=target,
        vector_hash=vector_hash,
        details=details or {},
    )
    session.add(row)
    return row


def entries(
    session: Session, *, since: datetime | None = None, action: str | None = None, limit: int = 100
) -> list[AdminAction]:
    query = select(AdminAction).order_by(AdminAction.id.desc()).limit(limit)
    if since is not None:
        query = query.where(AdminAction.at >= since)
    if action is not None:
        query = query.where(AdminAction.action == action)
    return list(session.scalars(query))
