"""/admin/tokens (create, list, revoke) and /admin/audit-log (read the admin audit log)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, status

from auditor.access import audit_log, tokens
from auditor.api.deps import ReadSessionDep, RowId, SessionDep
from auditor.api.errors import query_error
from auditor.api.schemas import AdminActionRead, TokenCreate, TokenIssued, TokenRead
from auditor.api.security import PrincipalDep
from auditor.errors import WindowError
from auditor.reports.window import as_utc

router = APIRouter(prefix="/admin", tags=["admin: tokens and audit log"])


@router.post("/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenIssued)
def create_token(body: TokenCreate, session: SessionDep, principal: PrincipalDep) -> TokenIssued:
    """Create a token. The secret is in this response only; store it now."""
    issued = tokens.create_token(session, name=body.name, scopes=body.scopes, created_by=principal.name)
    audit_log.record(
        session,
        actor=principal,
        action="token.create",
        target=f"token:{issued.row.id}",
        details={"name": body.name, "scopes": issued.row.scopes, "prefix": issued.row.prefix},
    )
    session.commit()
    return TokenIssued.model_validate({**TokenRead.model_validate(issued.row).model_dump(), "token": issued.token})


@router.get("/tokens", response_model=list[TokenRead])
def list_tokens(session: ReadSessionDep, include_revoked: bool = False) -> list[TokenRead]:
    return [TokenRead.model_validate(row) for row in tokens.list_tokens(session, include_revoked=include_revoked)]


@router.delete("/tokens/{token_id}", response_model=TokenRead)
def revoke_token(token_id: RowId, session: SessionDep, principal: PrincipalDep) -> TokenRead:
    """Revoke a token (idempotent). Its requests get 401 from the next request on."""
    row = tokens.revoke_token(session, token_id=token_id)
    audit_log.record(
        session,
        actor=principal,
        action="token.revoke",
        target=f"token:{row.id}",
        details={"name": row.name, "prefix": row.prefix},
    )
    session.commit()
    return TokenRead.model_validate(row)


@router.get("/audit-log", response_model=list[AdminActionRead])
def read_audit_log(
    session: ReadSessionDep,
    since: datetime | None = None,
    action: str | None = Query(None, max_length=64),
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AdminActionRead]:
    """Admin actions, newest first: who (token name and prefix), what, when, vector hash.
    `since` without a zone (or a date alone) is UTC, as in report windows."""
    if since is not None:
        try:
            since = as_utc(since, field="since")
        except WindowError as exc:
            raise query_error(exc, since.isoformat()) from None
    return [
        AdminActionRead.model_validate(row)
        for row in audit_log.entries(session, since=since, action=action, limit=limit)
    ]
