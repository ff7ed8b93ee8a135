"""Checks the store runs on its inputs before anything is added to the session: closed
vocabularies, caller-supplied ids, sha256 digests. Each failure is an InvalidInputError."""

from __future__ import annotations

from auditor.errors import InvalidInputError

MAX_ID_LENGTH = 64


def check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidInputError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


def check_id(field: str, value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(f"{field} must be a non-empty string of at most {MAX_ID_LENGTH} characters")


def check_sha256(field: str, value: str | None) -> None:
    if value is None:
        return
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidInputError(f"{field} must be a lowercase sha256 hex digest; got {value!r}")
