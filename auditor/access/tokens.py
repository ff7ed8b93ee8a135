"""API tokens: `aud_<prefix>_<secret>`, scoped, stored as sha256 only.

The prefix is public and indexed, so authenticating is one indexed lookup and one constant-time
comparison of hashes (`hmac.compare_digest`). Tokens carry 256 bits of randomness, so a plain
sha256 is enough: slow password hashes protect low-entropy secrets, which these are not."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from auditor.db.models import SCOPES, ApiToken, utcnow
from auditor.errors import InvalidInputError, TokenNotFound

TOKEN_PREFIX = "aud"
# Embedded-mode tokens share this name; each start revokes the previous one.
EMBEDDED_TOKEN_NAME = "embedded-admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: enough to authorise a request and to name the actor in the audit log."""

    token_id: int
    name: str
    prefix: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once; never stored
    row: ApiToken


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_scopes(scopes: Iterable[str]) -> list[str]:
    chosen = sorted({scope.strip() for scope in scopes if scope.strip()})
    if not chosen:
        raise InvalidInputError(f"a token needs at least one scope of {', '.join(SCOPES)}")
    unknown = [scope for scope in chosen if scope not in SCOPES]
    if unknown:
        raise InvalidInputError(f"unknown scope(s) {', '.join(unknown)}; choose from {', '.join(SCOPES)}")
    return chosen


def create_token(session: Session, *, name: str, scopes: Iterable[str], created_by: str) -> IssuedToken:
    name = name.strip()
    if not name or len(name) > 128:
        raise InvalidInputError("token name must be 1-128 characters")
    prefix = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
    row = ApiToken(
        name=name, prefix=prefix, token_sha256=_sha256(token), scopes=parse_scopes(scopes), created_by=created_by
    )
    session.add(row)
    session.flush()
    return IssuedToken(token=token, row=row)


def authenticate(session: Session, token: str) -> Principal | None:
    """The token's principal, or None for a malformed, unknown or revoked token."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1] or len(parts[1]) > 32:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.prefix == parts[1]))
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.token_sha256, _sha256(token)):
        return None
    return Principal(token_id=row.id, name=row.name, prefix=row.prefix, scopes=frozenset(row.scopes))


def list_tokens(session: Session, *, include_revoked: bool = False) -> list[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_token(session: Session, *, token_id: int) -> ApiToken:

    row = session.get(ApiToken, token_id)
    if row is None:
        raise TokenNotFound(token_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def revoke_named(session: Session, *, name: str) -> int:
    """Revoke every live token with this name (the embedded default rotates its admin token)."""
    rows = session.scalars(select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)))
    count = 0
    for row in rows:
        row.revoked_at = utcnow()
        count += 1
    return count
