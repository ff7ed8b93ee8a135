"""Reads and writes. Keyword-only functions that take the session first and never commit: the
caller owns the transaction, so a rejected input or a failed task leaves nothing half-written.
Functions may flush (to get ids, or to surface a constraint error inside the caller's
transaction); a flush is not a commit.

    codecs.py        float32 little-endian bytes <-> tensors (vectors, traces)
    validation.py    input checks: vocabularies, ids, sha256 digests
    concepts.py      concept versions and their vectors
    requests.py      monitored requests and their status transitions
    scores.py        per-request score rows (executemany or Postgres COPY)
    flags.py         flags
    calibrations.py  concept calibrations and answer calibrations
    jobs.py          extraction and calibration jobs

Callers use the package (`from auditor.db import store; store.create_request(...)`); the names
below are its API.
"""

from auditor.db.store.calibrations import (
    add_answer_calibration,
    add_calibration,
    latest_answer_calibration,
    latest_calibration,
    latest_calibrations,
    newest_answer_calibration_id,
    newest_calibration_id,
)
from auditor.db.store.codecs import VectorLike, trace_from_bytes, vector_from_bytes, vector_to_bytes
from auditor.db.store.concepts import (
    UNIT_TOLERANCE,
    Registration,
    add_concept_version,
    concept_vectors,
    find_concept_version,
    get_concept,
    get_concept_by_name,
    list_concepts,
    register_concept_version,
    retire_concept,
    set_active,
)
from auditor.db.store.flags import add_flag
from auditor.db.store.jobs import create_job, finish_job, get_job, start_job
from auditor.db.store.requests import (
    create_request,
    get_request,
    mark_request,
    replayable_requests,
    requests_by_idempotency_key,
)
from auditor.db.store.scores import (
    COPY_COLUMNS,
    COPY_TYPES,
    SCORE_FIELDS,
    ScoreRows,
    insert_scores,
    insert_scores_copy,
    scores_for_request,
)
from auditor.db.store.validation import MAX_ID_LENGTH

__all__ = [
    "COPY_COLUMNS",
    "COPY_TYPES",
    "MAX_ID_LENGTH",
    "SCORE_FIELDS",
    "UNIT_TOLERANCE",
    "Registration",
    "ScoreRows",
    "VectorLike",
    "add_answer_calibration",
    "add_calibration",
    "add_concept_version",
    "add_flag",
    "concept_vectors",
    "create_job",
    "create_request",
    "find_concept_version",
    "finish_job",
    "get_concept",
    "get_concept_by_name",
    "get_job",
    "get_request",
    "insert_scores",
    "insert_scores_copy",
    "latest_answer_calibration",
    "latest_calibration",
    "latest_calibrations",
    "list_concepts",
    "mark_request",
    "newest_answer_calibration_id",
    "newest_calibration_id",
    "register_concept_version",
    "replayable_requests",
    "requests_by_idempotency_key",
    "retire_concept",
    "scores_for_request",
    "set_active",
    "start_job",
    "trace_from_bytes",
    "vector_from_bytes",
    "vector_to_bytes",
]
