"""Bearer-token authentication and scopes: `admin` (vectors, calibrations, tokens), `client`
(completions, audits), `reader` (reports). Scopes do not imply one another; a token holds the
set it was created with. A missing or unknown token is a 401, a token without the route's
scope a 403. Only the health probes and /metrics are open (see PUBLIC_PATHS)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from auditor.access import tokens
from auditor.access.tokens import Principal
from auditor.errors import AuthenticationError, PermissionDeniedError

# Probes and scrapes run without credentials (kubelet, Prometheus); they reveal no records.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_bearer = HTTPBearer(
    auto_error=False,
    description="`auditor token create` prints one; the OpenAI client sends its api_key as this header",
)


def _principal(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthenticationError("missing bearer token: send `Authorization: Bearer <token>`")
    # A read-only session of its own: authentication must not take the SQLite write lock.
    with request.app.state.read_sessions() as session:
        principal = tokens.authenticate(session, credentials.credentials)
    if principal is None:
        raise AuthenticationError("invalid or revoked token")
    request.state.principal = principal
    return principal


def require(scope: str):
    """A dependency that admits tokens holding `scope`."""

    def check(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
    ) -> Principal:
        principal = _principal(request, credentials)
        if scope not in principal.scopes:
            raise PermissionDeniedError(
                f"token '{principal.name}' lacks scope '{scope}' (it has: {', '.join(sorted(principal.scopes))})"
            )
        return principal

    check.__name__ = f"require_{scope}"
    return Depends(check)


def current_principal(request: Request) -> Principal:
    """The caller, as authenticated by the router's `require` dependency."""
    return request.state.principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
