"""/v1/audits: score (prompt, completion) pairs served by another stack, in the background."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, status
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from auditor.api import dispatching, idempotency
from auditor.api.deps import FingerprintDep, ReadSessionDep, SessionDep, SettingsDep
from auditor.api.idempotency import IdempotencyKeyHeader
from auditor.api.limits import check_audit
from auditor.api.schemas import AuditCreate, AuditFlag, AuditRead, AuditScore
from auditor.api.security import PrincipalDep
from auditor.db import store
from auditor.db.enums import FlagKind, PrivacyMode, RequestKind, RequestStatus
from auditor.db.models import Concept, Flag, RequestScore
from auditor.errors import AuditNotFound, InvalidInputError
from auditor.queue.dispatch import TASK_AUDIT

router = APIRouter(prefix="/v1/audits", tags=["audits"])


@router.post("", status_code=status.HTTP_202_ACCEPTED)
def submit(
    body: AuditCreate,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    fingerprint: FingerprintDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKeyHeader = None,
):
    """Queue the items for scoring (one batched replay); returns their ids to poll. Sent again
    with the same Idempotency-Key, the same ids, queued once."""
    check_audit(body, settings)
    if (error := dispatching.no_worker(request)) is not None:
        return error
    keys: list[str | None] = [None] * len(body.items)
    digest = None
    if idempotency_key is not None:
        keys = idempotency.row_keys(principal.token_id, "audits", idempotency_key, len(body.items))
        digest = idempotency.request_digest(body)
        if (earlier := idempotency.earlier_requests(session, keys, digest)) is not None:
            return {"ids": [row.id for row in earlier], "status": RequestStatus.QUEUED}
    items = []
    for index, item in enumerate(body.items):
        if (item.prompt is None) == (item.messages is None):
            raise InvalidInputError(f"items[{index}]: give either `prompt` or `messages`")
        items.append(item.model_dump(exclude_none=True))
    ids = [f"audit-{uuid.uuid4().hex}" for _ in items]
    for request_id, item, key in zip(ids, items, keys):
        prompt_text = item.get("prompt") or "\n".join(f"{m['role']}: {m['content']}" for m in item["messages"])
        # In full mode the messages themselves are kept too (the text already is): a traffic
        # calibration replays them through the chat template.
        keep_messages = item.get("messages") and settings.privacy_mode == PrivacyMode.FULL
        params = {"messages": item["messages"]} if keep_messages else {}
        if digest is not None:
            params[idempotency.DIGEST] = digest
        try:
            store.create_request(
                session,
                request_id=request_id,
                kind=RequestKind.AUDIT,
                prompt_text=prompt_text,
                privacy_mode=settings.privacy_mode,
                model_id=fingerprint.model_id,
                params=params,
                idempotency_key=key,
            )
        except IntegrityError:  # the same key, from a call accepted a moment ago
            session.rollback()
            raise idempotency.racing() from None
    refused = dispatching.submit_requests(
        request,
        session,
        TASK_AUDIT,
        [ids, items],
        request_ids=ids,
        kind=RequestKind.AUDIT,
        model_id=fingerprint.model_id,
    )
    if refused is not None:
        return refused
    return {"ids": ids, "status": RequestStatus.QUEUED}


@router.get("/{audit_id}", response_model=AuditRead)
def get(audit_id: str, session: ReadSessionDep) -> AuditRead:
    """Status, and once done every score row (each concept version at each of its layers)."""
    row = store.get_request(session, request_id=audit_id)
    if row is None or row.kind != RequestKind.AUDIT:
        raise AuditNotFound(audit_id)
    scores = session.execute(
        select(RequestScore, Concept.name, Concept.version)
        .join(Concept, Concept.id == RequestScore.concept_id)
        .where(RequestScore.request_id == audit_id)
        .order_by(Concept.name, RequestScore.layer)
    )
    flags = session.execute(
        select(Flag, Concept.name)
        .join(Concept, Concept.id == Flag.concept_id)
        .where(Flag.request_id == audit_id)
        .order_by(Flag.id)
    )
    flag_rows = [
        AuditFlag(
            concept=name,
            kind=f.kind,
            residual_z=f.residual_signal,
            text_z=f.text_signal,
            threshold=f.threshold,
            reason=f.reason,
        )
        for f, name in flags
    ]
    return AuditRead(
        id=row.id,
        status=row.status,
        error=row.error,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        monitor_status=row.monitor_status,
        scores=[
            AuditScore(
                concept=name,
                concept_id=s.concept_id,
                version=version,
                layer=s.layer,
                mean=s.mean,
                max=s.max,
                last=s.last,
                z=s.answer_z,
                percentile=s.answer_percentile,
                neutral_z=s.calibrated_z,
                neutral_percentile=s.percentile,
            )
            for s, name, version in scores
        ],
        flags=[f for f in flag_rows if f.kind != FlagKind.THRESHOLD],
        alerts=[f for f in flag_rows if f.kind == FlagKind.THRESHOLD],
    )
