"""The closed vocabularies of the schema: statuses, kinds, sources, scopes.

Each is a `str` enum, so a member compares equal to its value, is stored and sent as that plain
string (JSON, SQL, Celery payloads, Prometheus labels), and the tuple of values feeds the
table's CHECK constraint where the column has one (auditor.db.models): adding a member there is
a migration.
"""

from __future__ import annotations

from enum import Enum


class _Values(str, Enum):
    def __str__(self) -> str:  # f"{status}" is the value, as for a plain string
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class RequestStatus(_Values):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # a streamed request whose client left: recorded with what it generated


# A request in one of these is final: recorded once, never run again.
FINAL_REQUEST_STATUSES = (RequestStatus.DONE, RequestStatus.CANCELLED)


class JobStatus(_Values):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class RequestKind(_Values):
    CHAT = "chat"
    COMPLETION = "completion"
    AUDIT = "audit"


class JobKind(_Values):
    EXTRACT = "extract"
    CALIBRATE = "calibrate"


class FlagKind(_Values):
    HIDDEN = "hidden"  # the residual stream reads the concept, the text does not
    SURFACE = "surface"  # the text reads it, the residual stream does not
    THRESHOLD = "threshold"  # the residual stream alone passes the alert threshold
    DRIFT = "drift"


class PrivacyMode(_Values):
    FULL = "full"
    REDACTED = "redacted"
    HASH = "hash"


class ConceptSource(_Values):
    PAIRS = "pairs"
    UPLOAD_JSON = "upload-json"
    UPLOAD_SAFETENSORS = "upload-safetensors"
    UPLOAD_GGUF = "upload-gguf"


class CalibrationSource(_Values):
    """What an answer null was fitted on (answer_calibrations.source)."""

    CONTROL = "control"  # the shipped control prompts' answers
    TRAFFIC = "traffic"  # the deployment's own recorded answers over a window


class Scope(_Values):
    ADMIN = "admin"
    CLIENT = "client"
    READER = "reader"


__all__ = [
    "CalibrationSource",
    "ConceptSource",
    "FlagKind",
    "JobKind",
    "JobStatus",
    "PrivacyMode",
    "RequestKind",
    "RequestStatus",
    "Scope",
]
