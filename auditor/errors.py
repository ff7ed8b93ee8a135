"""Every error Auditor raises on purpose, in one hierarchy.

- Bad input derives from `probes.errors.InvalidInputError` (a ValueError), so pure math can
  raise it without importing anything of ours; the API answers it with a 4xx.
- `AuditorError` is everything that is not the caller's fault (model, storage, broker).
- `AccessError` is a missing or insufficient credential.

`auditor.api.errors` is the one place that maps these to HTTP statuses; the CLI maps them to
exit codes. Control flow inside a forward pass (`workers.runtime.hooks.StopForward`) is not an
error and lives with the hooks; `auditor.api.limits.RequestTooLarge` stays an HTTPException
because FastAPI's body parser only lets those through.
"""

from __future__ import annotations

from probes.errors import InvalidInputError

# ---- bad input (4xx) ----


class FingerprintMismatchError(InvalidInputError):
    """A vector extracted in one model's basis was offered to a different model."""


class WindowError(InvalidInputError):
    """A time parameter that cannot be used (a report window's since, until, baseline, bucket;
    the audit log's since): `field` names it, `reason` says why; the message is both, for a CLI line."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class IdempotencyConflict(InvalidInputError):
    """An Idempotency-Key reused for a different request (422), or one whose first request is
    still being written (409, retry)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class NotFoundError(InvalidInputError):
    """Something named that does not exist (404). A subclass of bad input, so every caller
    already maps it to a 4xx."""


class _IdNotFound(NotFoundError):
    what = "row"

    def __init__(self, key: object) -> None:
        super().__init__(f"no {self.what} with id {key!r}")
        self.key = key


class RequestNotFound(_IdNotFound):
    what = "request"


class ConceptNotFound(_IdNotFound):
    what = "concept"


class JobNotFound(_IdNotFound):
    what = "job"


class AuditNotFound(_IdNotFound):
    what = "audit"


class TokenNotFound(_IdNotFound):
    what = "token"


# ---- credentials (401 / 403) ----


class AccessError(Exception):
    """A request the caller is not allowed to make."""


class AuthenticationError(AccessError):
    """No credentials, or credentials that name no live token: 401."""


class PermissionDeniedError(AccessError):
    """A valid token without the scope this route needs: 403."""


# ---- not the caller's fault (5xx) ----


class AuditorError(Exception):
    """Base for failures that are not the caller's input (model, storage, broker)."""


class ModelLoadError(AuditorError):
    """The configured model could not be found or loaded."""


class TaskRefused(AuditorError):
    """A task not run again: it keeps losing its workers (auditor.queue.deliveries)."""


class ConfigError(AuditorError):
    """The deployment's settings cannot work together (said at startup, with the fix)."""


class WorkerUnavailable(AuditorError):
    """No worker answered in time, or the broker is down (503, retry)."""


class BrokerUnavailable(WorkerUnavailable):
    """The task could not be queued at all: nothing will ever run it."""


class TooManyRequests(AuditorError):
    """Over a concurrency bound: 429, retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoLiveWorker(WorkerUnavailable):
    """The broker answers but no worker does (what readiness reports)."""


__all__ = [
    "AccessError",
    "AuditNotFound",
    "AuditorError",
    "AuthenticationError",
    "BrokerUnavailable",
    "ConceptNotFound",
    "FingerprintMismatchError",
    "InvalidInputError",
    "JobNotFound",
    "ModelLoadError",
    "NoLiveWorker",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestNotFound",
    "TokenNotFound",
    "TooManyRequests",
    "WindowError",
    "WorkerUnavailable",
]
