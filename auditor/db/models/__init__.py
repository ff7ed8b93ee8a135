"""Database tables, portable across Postgres and SQLite (conventions: base.py).

    base.py          Base, naming convention, column types, CHECK vocabularies, utcnow
    concepts.py      concept versions, their vectors, and the immutability guard
    traffic.py       monitored requests, request scores, flags
    calibrations.py  concept calibrations, answer calibrations
    jobs.py          extraction and calibration jobs
    access.py        API tokens, the admin audit log
    rollups.py       daily rollups (what retention keeps)

Importing the package maps every table (Alembic and `Base.metadata` need them all); callers
import from here: `from auditor.db.models import Concept`.
"""

from auditor.db.models.access import AdminAction, ApiToken
from auditor.db.models.base import (
    CONCEPT_SOURCES,
    FLAG_KINDS,
    JOB_KINDS,
    JOB_STATUSES,
    NAMING_CONVENTION,
    PRIVACY_MODES,
    REQUEST_KINDS,
    REQUEST_STATUSES,
    SCOPES,
    Base,
    BigIntId,
    JSONType,
    UTCDateTime,
    new_uuid,
    one_of,
    utcnow,
)
from auditor.db.models.calibrations import AnswerCalibration, Calibration
from auditor.db.models.concepts import Concept, ConceptVector
from auditor.db.models.jobs import Job
from auditor.db.models.rollups import DailyRollup
from auditor.db.models.traffic import Flag, MonitoredRequest, RequestScore

__all__ = [
    "CONCEPT_SOURCES",
    "FLAG_KINDS",
    "JOB_KINDS",
    "JOB_STATUSES",
    "NAMING_CONVENTION",
    "PRIVACY_MODES",
    "REQUEST_KINDS",
    "REQUEST_STATUSES",
    "SCOPES",
    "AdminAction",
    "AnswerCalibration",
    "ApiToken",
    "Base",
    "BigIntId",
    "Calibration",
    "Concept",
    "ConceptVector",
    "DailyRollup",
    "Flag",
    "JSONType",
    "Job",
    "MonitoredRequest",
    "RequestScore",
    "UTCDateTime",
    "new_uuid",
    "one_of",
    "utcnow",
]
