"""The audit task's body: completions served elsewhere, replayed through the model and scored,
each item recorded exactly once however many times its task runs
(see workers.serving.transactions)."""

from __future__ import annotations

from typing import Any

from auditor import privacy
from auditor.db import store
from auditor.db.enums import RequestKind, RequestStatus
from auditor.telemetry import metrics
from workers.serving.context import WorkerContext, get_runtime
from workers.serving.recording import record_metrics, score_rows, store_verdict
from workers.serving.transactions import in_transaction


def serve_audits(
    request_ids: list[str], items: list[dict[str, Any]], runtime: WorkerContext | None = None
) -> dict[str, Any]:
    """Score completions served elsewhere. The model thread replays every audit item queued at
    the same moment, from any number of submissions, in one padded pass; an item that cannot
    be replayed fails alone. Each item is recorded once however many times the task runs (row
    locks, as for generations), and the writes retry while the database is away."""
    runtime = runtime or get_runtime()

    def start(session) -> list[tuple[str, dict]]:
        pending = []
        for request_id, item in zip(request_ids, items):
            row = store.get_request(session, request_id=request_id, for_update=True)
            if row is not None and row.status != RequestStatus.DONE:  # re-delivered: skip what is recorded
                store.mark_request(session, request_id=request_id, status=RequestStatus.RUNNING)
                pending.append((request_id, item))
        return pending

    pending = in_transaction(runtime, start, f"starting audit {request_ids[0]}")
    if not pending:
        return {"request_ids": request_ids, "status": RequestStatus.DONE}
    try:
        outcomes = runtime.model_thread.replay([item for _, item in pending]).result()
    except Exception as exc:
        outcomes = [exc] * len(pending)
    fingerprint = runtime.host.model.fingerprint

    def record(session) -> list[tuple[str, Any]]:
        written = []  # (status, outcome) of the items this run recorded
        for (request_id, item), outcome in zip(pending, outcomes):
            row = store.get_request(session, request_id=request_id, for_update=True)
            if row is None or row.status == RequestStatus.DONE:  # another run recorded it first
                continue
            if isinstance(outcome, Exception):
                error = privacy.scrub(
                    f"{type(outcome).__name__}: {outcome}", row.privacy_mode, privacy.request_texts(item)
                )
                store.mark_request(session, request_id=request_id, status=RequestStatus.FAILED, error=error[:2000])
                written.append((RequestStatus.FAILED, outcome))
                continue
            store.insert_scores_copy(
                session,
                request_id=request_id,
                rows=score_rows(outcome.bank, outcome.scores, outcome.verdict, runtime.settings.store_traces),
            )
            store.mark_request(
                session,
                request_id=request_id,
                status=RequestStatus.DONE,
                completion_text=item["completion"],
                model_id=fingerprint.model_id,
                model_fingerprint=fingerprint.hash,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                monitor_status=outcome.verdict.status,
            )
            store_verdict(session, request_id=request_id, bank=outcome.bank, verdict=outcome.verdict)
            written.append((RequestStatus.DONE, outcome))
        return written

    for status, outcome in in_transaction(runtime, record, f"recording audit {request_ids[0]}"):
        if status == RequestStatus.FAILED:
            metrics.record_request(RequestKind.AUDIT, RequestStatus.FAILED, fingerprint.model_id)
            continue
        metrics.record_request(
            RequestKind.AUDIT,
            RequestStatus.DONE,
            fingerprint.model_id,
            None,
            outcome.prompt_tokens,
            outcome.completion_tokens,
        )
        record_metrics(fingerprint.model_id, outcome.bank, outcome.verdict)
    failed = sum(isinstance(o, Exception) for o in outcomes)
    return {"request_ids": request_ids, "status": RequestStatus.DONE if not failed else f"{failed} failed"}
