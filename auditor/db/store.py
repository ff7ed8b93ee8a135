"""Reads and writes. Keyword-only functions that take the session first and never commit: the
caller owns the transaction, so a rejected input or a failed task leaves nothing half-written.
Functions may flush (to get ids, or to surface a constraint error inside the caller's
transaction); a flush is not a commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import torch
from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from auditor import privacy
from auditor.db.models import (
    CONCEPT_SOURCES,
    FLAG_KINDS,
    JOB_KINDS,
    PRIVACY_MODES,
    REQUEST_KINDS,
    AnswerCalibration,
    Calibration,
    Concept,
    ConceptVector,
    Flag,
    Job,
    MonitoredRequest,
    RequestScore,
    utcnow,
)
from auditor.errors import ConceptNotFound, InvalidInputError, JobNotFound, RequestNotFound
from probes.validation import check_layer, check_vector

VectorLike = torch.Tensor | np.ndarray | Sequence[float]

# A stored vector is unit length; one already this close is kept bit-exact, so the extractor's
# own vector_hash (over the same float32 bytes) still matches the stored one.
UNIT_TOLERANCE = 1e-5
MAX_ID_LENGTH = 64


# ---- float32 little-endian bytes ----


def _as_tensor(values: VectorLike) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu()
    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def vector_to_bytes(values: VectorLike) -> bytes:
    """1-D values -> float32 little-endian bytes (explicit '<f4': the format, not the CPU's)."""
    array = _as_tensor(values).to(torch.float32).numpy()  # .to first: bf16 has no numpy dtype
    return array.astype("<f4", copy=False).tobytes()


def vector_from_bytes(data: bytes, d_model: int) -> torch.Tensor:
    if len(data) != 4 * d_model:
        raise InvalidInputError(f"stored vector has {len(data)} bytes; d_model {d_model} needs {4 * d_model}")
    return trace_from_bytes(data)


def trace_from_bytes(data: bytes) -> torch.Tensor:
    # astype copies into a writable, native-order array (frombuffer's view is read-only).
    return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))


# ---- validation helpers ----


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InvalidInputError(f"{field} must be one of {', '.join(allowed)}; got {value!r}")


def _check_id(field: str, value: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(f"{field} must be a non-empty string of at most {MAX_ID_LENGTH} characters")


def _check_sha256(field: str, value: str | None) -> None:
    if value is None:
        return
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidInputError(f"{field} must be a lowercase sha256 hex digest; got {value!r}")


# ---- concepts ----


def _unit_bytes(layer: Any, values: VectorLike, *, d_model: int, n_layers: int) -> bytes:
    check_layer(layer, n_layers)
    vector = check_vector(_as_tensor(values), d_model, f"vector at layer {layer}")
    norm = float(vector.norm())
    if abs(norm - 1.0) > UNIT_TOLERANCE:
        vector = vector / norm
    return vector_to_bytes(vector)


def _validated_vectors(
    vectors: Mapping[int, VectorLike], *, d_model: int, n_layers: int, primary_layer: int
) -> dict[int, bytes]:
    """All or nothing: every vector is checked before anything is added to the session."""
    if not vectors:
        raise InvalidInputError("no vectors given: a concept needs a vector at one layer at least")
    if d_model < 1 or n_layers < 1:
        raise InvalidInputError(f"d_model ({d_model}) and n_layers_model ({n_layers}) must be >= 1")
    stored = {
        layer: _unit_bytes(layer, values, d_model=d_model, n_layers=n_layers)
        for layer, values in sorted(vectors.items())
    }
    if primary_layer not in stored:
        raise InvalidInputError(f"primary_layer {primary_layer} has no vector; vectors exist at {sorted(stored)}")
    return stored


def _serialize_registrations(session: Session, name: str) -> None:
    """Two registrations of one name at once would both pick version n+1. On Postgres a
    transaction-scoped advisory lock orders them; SQLite allows one writer at a time anyway.
    The unique (name, version) constraint is the backstop on both."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        session.execute(select(func.pg_advisory_xact_lock(key)))


def _next_version(session: Session, name: str) -> int:
    latest = session.scalar(select(func.max(Concept.version)).where(Concept.name == name))
    return (latest or 0) + 1


def add_concept_version(
    session: Session,
    *,
    name: str,
    vectors: Mapping[int, VectorLike],
    primary_layer: int,
    created_by: str,
    model_id: str,
    model_fingerprint: str,
    loader: str,
    hook_point: str,
    d_model: int,
    n_layers_model: int,
    method: str,
    pooling: str,
    source: str,
    model_revision: str | None = None,
    n_pairs: int | None = None,
    pairs_hash: str | None = None,
    description: str = "",
    provenance: Mapping[str, Any] | None = None,
) -> Concept:
    """Register the next version of `name`. Vectors are stored as unit float32 vectors;
    earlier versions are never touched."""
    if not name or len(name) > 128:
        raise InvalidInputError("concept name must be 1 to 128 characters")
    _check_choice("source", source, CONCEPT_SOURCES)
    _check_sha256("model_fingerprint", model_fingerprint)
    _check_sha256("pairs_hash", pairs_hash)
    stored = _validated_vectors(vectors, d_model=d_model, n_layers=n_layers_model, primary_layer=primary_layer)
    _serialize_registrations(session, name)
    concept = Concept(
        name=name,
        version=_next_version(session, name),
        description=description,
        created_by=created_by,
        model_id=model_id,
        model_revision=model_revision,
        model_fingerprint=model_fingerprint,
        loader=loader,
        hook_point=hook_point,
        d_model=d_model,
        n_layers_model=n_layers_model,
        method=method,
        pooling=pooling,
        n_pairs=n_pairs,
        pairs_hash=pairs_hash,
        vector_hash=hashlib.sha256(b"".join(stored.values())).hexdigest(),
        source=source,
        primary_layer=primary_layer,
        provenance=dict(provenance or {}),
        vectors=[ConceptVector(layer=layer, vector=data) for layer, data in stored.items()],
    )
    session.add(concept)
    session.flush()  # assigns the id; a (name, version) race fails here, inside the caller's txn
    return concept


def get_concept(session: Session, *, concept_id: int) -> Concept | None:
    return session.get(Concept, concept_id)


def get_concept_by_name(session: Session, *, name: str, version: int | None = None) -> Concept | None:
    """The given version of `name`, or its latest one."""
    query = select(Concept).where(Concept.name == name)
    if version is not None:
        return session.scalar(query.where(Concept.version == version))
    return session.scalar(query.order_by(Concept.version.desc()).limit(1))


def _require_concept(session: Session, concept_id: int) -> Concept:
    concept = session.get(Concept, concept_id)
    if concept is None:
        raise ConceptNotFound(concept_id)
    return concept


def list_concepts(session: Session, *, active: bool | None = None, name: str | None = None) -> list[Concept]:
    query = select(Concept).order_by(Concept.name, Concept.version)
    if active is not None:
        query = query.where(Concept.active.is_(active))
    if name is not None:
        query = query.where(Concept.name == name)
    return list(session.scalars(query))


def set_active(session: Session, *, concept_id: int, active: bool) -> Concept:
    """Pause or resume monitoring of one version. A retired version stays retired."""
    concept = _require_concept(session, concept_id)
    if active and concept.retired_at is not None:
        raise InvalidInputError(f"concept {concept.name} v{concept.version} is retired; register a new version instead")
    concept.active = active
    return concept


def retire_concept(session: Session, *, concept_id: int) -> Concept:
    """Withdraw a version for good (kept for the history of scores that reference it)."""
    concept = _require_concept(session, concept_id)
    concept.active = False
    if concept.retired_at is None:  # retiring twice keeps the first date
        concept.retired_at = utcnow()
    return concept


def concept_vectors(session: Session, *, concept_id: int) -> dict[int, torch.Tensor]:
    """layer -> unit float32 vector [d_model], for one concept version."""
    d_model = _require_concept(session, concept_id).d_model
    rows = session.execute(
        select(ConceptVector.layer, ConceptVector.vector)
        .where(ConceptVector.concept_id == concept_id)
        .order_by(ConceptVector.layer)
    )
    return {layer: vector_from_bytes(data, d_model) for layer, data in rows}


# ---- requests ----


def _stored_text(text: str | None, privacy_mode: str) -> tuple[str | None, str | None]:
    """(text to store, sha256 of the original to store). full: both. redacted: the text with
    personal data and secrets masked, and the digest. hash: the digest only (lets an auditor
    match a known prompt without keeping it). See auditor.privacy."""
    return privacy.stored_text(text, privacy_mode)


def create_request(
    session: Session,
    *,
    request_id: str,
    kind: str,
    prompt_text: str | None,
    privacy_mode: str = "full",
    params: Mapping[str, Any] | None = None,
    steered: bool = False,
    model_id: str | None = None,
    model_fingerprint: str | None = None,
    created_at: datetime | None = None,
) -> MonitoredRequest:
    _check_id("request_id", request_id)
    _check_choice("kind", kind, REQUEST_KINDS)
    _check_choice("privacy_mode", privacy_mode, PRIVACY_MODES)
    _check_sha256("model_fingerprint", model_fingerprint)
    if session.get(MonitoredRequest, request_id) is not None:
        raise InvalidInputError(f"request {request_id!r} already exists")
    text, digest = _stored_text(prompt_text, privacy_mode)
    request = MonitoredRequest(
        id=request_id,
        kind=kind,
        status="queued",
        privacy_mode=privacy_mode,
        prompt_text=text,
        prompt_sha256=digest,
        params=dict(params or {}),
        steered=steered,
        model_id=model_id,
        model_fingerprint=model_fingerprint,
        created_at=created_at or utcnow(),
    )
    session.add(request)
    session.flush()  # scores and flags reference it; raw COPY needs the row in the database
    return request


def get_request(session: Session, *, request_id: str, for_update: bool = False) -> MonitoredRequest | None:
    """`for_update` locks the row until the transaction ends (SELECT ... FOR UPDATE; SQLite,
    which has no row locks, serializes writers anyway): workers check "already done?" and
    record under it, so two runs of one task never both record a request."""
    if for_update:
        return session.get(MonitoredRequest, request_id, with_for_update=True, populate_existing=True)
    return session.get(MonitoredRequest, request_id)


def _require_request(session: Session, request_id: str) -> MonitoredRequest:
    request = session.get(MonitoredRequest, request_id)
    if request is None:
        raise RequestNotFound(request_id)
    return request


# Re-running a failed request, or a task redelivered after a lost worker (acks_late), is allowed;
# a finished request is final.
_NEXT_STATUSES = {
    "queued": {"running", "failed"},
    "running": {"running", "done", "failed"},
    "failed": {"running", "failed"},
    "done": set(),
}


def mark_request(
    session: Session,
    *,
    request_id: str,
    status: str,
    error: str | None = None,
    completion_text: str | None = None,
    finish_reason: str | None = None,
    model_id: str | None = None,
    model_fingerprint: str | None = None,
    queue_seconds: float | None = None,
    prefill_seconds: float | None = None,
    decode_seconds: float | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    monitor_status: str | None = None,
) -> MonitoredRequest:
    """Move a request to `status`, stamping started_at / finished_at, and record whatever
    results are given (None leaves a field as it was)."""
    request = _require_request(session, request_id)
    if status not in _NEXT_STATUSES[request.status]:
        raise InvalidInputError(f"request {request_id!r} cannot go from {request.status} to {status}")
    _check_sha256("model_fingerprint", model_fingerprint)
    if error is not None and request.privacy_mode != "full":
        error = privacy.redact(error)  # callers scrub the request's own text; this masks the rest
    request.status = status
    if status == "running":
        request.started_at = utcnow()
    elif status in ("done", "failed"):
        request.finished_at = utcnow()
    if completion_text is not None:
        request.completion_text, request.completion_sha256 = _stored_text(completion_text, request.privacy_mode)
    updates = {
        "error": error,
        "finish_reason": finish_reason,
        "model_id": model_id,
        "model_fingerprint": model_fingerprint,
        "queue_seconds": queue_seconds,
        "prefill_seconds": prefill_seconds,
        "decode_seconds": decode_seconds,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "monitor_status": monitor_status,
    }
    for field, value in updates.items():
        if value is not None:
            setattr(request, field, value)
    return request


# ---- scores ----

SCORE_FIELDS = frozenset({
    "concept_id", "layer", "mean", "max", "last", "calibrated_z", "percentile", "answer_z",
    "answer_percentile", "n_tokens", "trace",
})  # fmt: skip
ScoreRows = Sequence[Mapping[str, Any]]
_COPY_COLUMNS = (
    "request_id", "concept_id", "layer", "mean", "max", "last",
    "calibrated_z", "percentile", "answer_z", "answer_percentile", "n_tokens", "trace", "created_at",
)  # fmt: skip
_COPY_TYPES = (
    "text", "int4", "int4", "float8", "float8", "float8",
    "float8", "float8", "float8", "float8", "int4", "bytea", "timestamptz",
)  # fmt: skip


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _trace_bytes(trace: Any) -> bytes | None:
    if trace is None or isinstance(trace, bytes):
        return trace
    return vector_to_bytes(trace)


def _score_params(request_id: str, created_at: datetime | None, rows: ScoreRows) -> list[dict[str, Any]]:
    """Plain Python values (drivers reject numpy/torch scalars) and the same keys on every row,
    so the whole request goes out as one batch."""
    params = []
    for index, row in enumerate(rows):
        unknown = row.keys() - SCORE_FIELDS
        if unknown:
            raise InvalidInputError(f"score row {index} has unknown fields {sorted(unknown)}")
        try:
            params.append({
                "request_id": request_id,
                "concept_id": int(row["concept_id"]),
                "layer": int(row["layer"]),
                "mean": float(row["mean"]),
                "max": float(row["max"]),
                "last": float(row["last"]),
                "calibrated_z": _optional_float(row.get("calibrated_z")),
                "percentile": _optional_float(row.get("percentile")),
                "answer_z": _optional_float(row.get("answer_z")),
                "answer_percentile": _optional_float(row.get("answer_percentile")),
                "n_tokens": int(row["n_tokens"]),
                "trace": _trace_bytes(row.get("trace")),
                "created_at": created_at,
            })  # fmt: skip
        except KeyError as missing:
            raise InvalidInputError(f"score row {index} lacks {missing.args[0]!r}") from None
    return params


def _prepared_scores(session: Session, request_id: str, rows: ScoreRows) -> list[dict[str, Any]]:
    """Rows ready to write, after one round trip that fetches the request's created_at and
    checks the concept ids (request_scores has no foreign key to concepts: see the model).
    One query instead of two was worth ~10% of per-request ingest time."""
    session.flush()  # Core statements below do not autoflush; pending rows must be visible
    params = _score_params(request_id, None, rows)  # created_at filled in below
    wanted = {row["concept_id"] for row in params}
    concepts, requests = Concept.__table__, MonitoredRequest.__table__
    n_known = select(func.count()).select_from(concepts).where(concepts.c.id.in_(wanted))
    found = session.execute(
        select(requests.c.created_at, n_known.scalar_subquery()).where(requests.c.id == request_id)
    ).one_or_none()
    if found is None:
        raise RequestNotFound(request_id)
    if found[1] != len(wanted):
        known = set(session.scalars(select(concepts.c.id).where(concepts.c.id.in_(wanted))))
        raise InvalidInputError(f"score rows name unknown concept ids {sorted(wanted - known)}")
    for row in params:
        row["created_at"] = found[0]  # copied from the request, for time-range reports
    return params


def insert_scores(session: Session, *, request_id: str, rows: ScoreRows) -> int:
    """All of one request's (concept, layer) rows in one executemany (psycopg 3 pipelines it;
    sqlite3 runs it in C)."""
    if not rows:
        return 0
    params = _prepared_scores(session, request_id, rows)
    # The Table, not the ORM entity: the ORM's bulk path spent ~25% more time per request on
    # per-row bookkeeping, and left None columns out of rows, splitting the batch.
    session.execute(insert(RequestScore.__table__), params)
    return len(rows)


def insert_scores_copy(session: Session, *, request_id: str, rows: ScoreRows) -> int:
    """Same as insert_scores through Postgres binary COPY (falls back to it on SQLite)."""
    if session.get_bind().dialect.name != "postgresql":
        return insert_scores(session, request_id=request_id, rows=rows)
    if not rows:
        return 0
    params = _prepared_scores(session, request_id, rows)  # flushes: COPY bypasses the ORM
    columns = ", ".join(_COPY_COLUMNS)
    # The session's own connection, so COPY joins the caller's transaction.
    cursor = session.connection().connection.driver_connection.cursor()
    with cursor.copy(f"COPY request_scores ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(list(_COPY_TYPES))
        for row in params:
            copy.write_row(tuple(row[column] for column in _COPY_COLUMNS))
    return len(rows)


def delete_scores(session: Session, *, request_id: str) -> int:
    """Drop a request's scores, so a redelivered task (acks_late) can write them again."""
    table = RequestScore.__table__
    return session.execute(delete(table).where(table.c.request_id == request_id)).rowcount


def scores_for_request(session: Session, *, request_id: str) -> list[RequestScore]:
    query = (
        select(RequestScore)
        .where(RequestScore.request_id == request_id)
        .order_by(RequestScore.concept_id, RequestScore.layer)
    )
    return list(session.scalars(query))


# ---- flags and calibrations ----


def add_flag(
    session: Session,
    *,
    request_id: str,
    concept_id: int,
    layer: int,
    kind: str,
    residual_signal: float,
    threshold: float,
    reason: str,
    text_signal: float | None = None,
) -> Flag:
    _check_choice("kind", kind, FLAG_KINDS)
    flag = Flag(
        request_id=request_id,
        concept_id=concept_id,
        layer=layer,
        kind=kind,
        residual_signal=float(residual_signal),
        text_signal=_optional_float(text_signal),
        threshold=float(threshold),
        reason=reason,
    )
    session.add(flag)
    session.flush()
    return flag


def delete_flags(session: Session, *, request_id: str) -> int:
    """A re-delivered request rewrites its flags, like its scores."""
    return session.execute(delete(Flag).where(Flag.request_id == request_id)).rowcount


def add_calibration(
    session: Session,
    *,
    concept_id: int,
    layer: int,
    mean: float,
    std: float,
    reference: Sequence[float],
    threshold: float | None = None,
    target_fpr: float | None = None,
    achieved_fpr: float | None = None,
    typical_norm: float | None = None,
    reference_set: str = "neutral",
    reference_hash: str | None = None,
) -> Calibration:
    _check_sha256("reference_hash", reference_hash)
    calibration = Calibration(
        concept_id=concept_id,
        layer=layer,
        mean=float(mean),
        std=float(std),
        n_reference=len(reference),
        reference=sorted(float(score) for score in reference),  # percentiles by bisection
        threshold=_optional_float(threshold),
        target_fpr=_optional_float(target_fpr),
        achieved_fpr=_optional_float(achieved_fpr),
        typical_norm=_optional_float(typical_norm),
        reference_set=reference_set,
        reference_hash=reference_hash,
    )
    session.add(calibration)
    session.flush()
    return calibration


def latest_calibration(session: Session, *, concept_id: int, layer: int) -> Calibration | None:
    query = (
        select(Calibration)
        .where(Calibration.concept_id == concept_id, Calibration.layer == layer)
        .order_by(Calibration.created_at.desc(), Calibration.id.desc())
        .limit(1)
    )
    return session.scalar(query)


def latest_calibrations(
    session: Session, *, concept_ids: Sequence[int], reference_set: str = "neutral"
) -> dict[tuple[int, int], Calibration]:
    """The newest calibration from `reference_set` of every (concept version, layer) among
    `concept_ids`, in one query."""
    if not concept_ids:
        return {}
    newest = (
        select(Calibration.concept_id, Calibration.layer, func.max(Calibration.id).label("id"))
        .where(Calibration.concept_id.in_(list(concept_ids)), Calibration.reference_set == reference_set)
        .group_by(Calibration.concept_id, Calibration.layer)
        .subquery()
    )
    rows = session.scalars(select(Calibration).join(newest, Calibration.id == newest.c.id))
    return {(row.concept_id, row.layer): row for row in rows}


def add_answer_calibration(
    session: Session,
    *,
    bank_key: str,
    model_fingerprint: str,
    concept_ids: Sequence[int],
    source: str,
    null: Mapping[str, Any],
    summary: Mapping[str, Any],
    window_start: datetime | None = None,
    window_end: datetime | None = None,
) -> AnswerCalibration:
    """Store a length-aware null (probes.answer_null.null_to_dict) for one bank of concepts."""
    _check_sha256("bank_key", bank_key)
    _check_sha256("model_fingerprint", model_fingerprint)
    _check_choice("source", source, ("control", "traffic"))
    row = AnswerCalibration(
        bank_key=bank_key,
        model_fingerprint=model_fingerprint,
        concept_ids=[int(i) for i in concept_ids],
        source=source,
        window_start=window_start,
        window_end=window_end,
        n_answers=int(summary["n_answers"]),
        target_fpr=float(null["target_fpr"]),
        confidence=float(null["confidence"]),
        min_tokens=int(null["min_tokens"]),
        certified_length=int(null["certified_length"]),
        summary=dict(summary),
        null=dict(null),
    )
    session.add(row)
    session.flush()
    return row


def latest_answer_calibration(session: Session, *, bank_key: str) -> AnswerCalibration | None:
    """The newest length-aware null fitted for exactly this bank of concept versions."""
    return session.scalar(
        select(AnswerCalibration)
        .where(AnswerCalibration.bank_key == bank_key)
        .order_by(AnswerCalibration.id.desc())
        .limit(1)
    )


def replayable_requests(since: datetime, until: datetime, fingerprint: str | None = None):
    """SELECT of the recorded answers a traffic calibration can replay, oldest first: finished,
    unsteered, stored verbatim (full privacy mode), in [since, until)."""
    query = select(MonitoredRequest).where(
        MonitoredRequest.status == "done",
        MonitoredRequest.privacy_mode == "full",
        MonitoredRequest.steered.is_(False),
        MonitoredRequest.completion_text.is_not(None),
        MonitoredRequest.prompt_text.is_not(None),
        MonitoredRequest.created_at >= since,
        MonitoredRequest.created_at < until,
    )
    if fingerprint is not None:
        query = query.where(MonitoredRequest.model_fingerprint == fingerprint)
    return query.order_by(MonitoredRequest.created_at)


def newest_answer_calibration_id(session: Session) -> int | None:
    return session.scalar(select(func.max(AnswerCalibration.id)))


def newest_calibration_id(session: Session) -> int | None:
    """Changes whenever any calibration is stored: a cheap per-request staleness check."""
    return session.scalar(select(func.max(Calibration.id)))


# ---- jobs ----


def create_job(session: Session, *, kind: str, payload: Mapping[str, Any]) -> Job:
    _check_choice("kind", kind, JOB_KINDS)
    job = Job(kind=kind, status="queued", payload=dict(payload))
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: str) -> Job | None:
    return session.get(Job, job_id)


def start_job(session: Session, *, job_id: str) -> Job:
    job = _require_job(session, job_id)
    job.status = "running"
    return job


def finish_job(
    session: Session,
    *,
    job_id: str,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
) -> Job:
    """done with a result, or failed with an error."""
    job = _require_job(session, job_id)
    job.status = "failed" if error is not None else "done"
    job.result = dict(result) if result is not None else None
    job.error = error
    job.finished_at = utcnow()
    return job


def _require_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise JobNotFound(job_id)
    return job
