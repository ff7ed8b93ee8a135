"""The generation task's body: a queued chat or completion request generated, monitored,
recorded and answered exactly once however many times its task runs
(see workers.serving.transactions), and the answer of a request already recorded read back.

A streamed request (`payload["stream"]`) is the same request: while the model thread generates
it, its text and running scores go out on the request's channel (workers.serving.streaming),
and its answer, or its error, is the channel's last event. A client that leaves mid-stream
cancels it: it is recorded `cancelled`, with the tokens and scores it had."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import select

from auditor import privacy
from auditor.db import store
from auditor.db.enums import FINAL_REQUEST_STATUSES, PrivacyMode, RequestStatus
from auditor.db.labels import display_labels
from auditor.db.models import Flag
from auditor.errors import InvalidInputError
from auditor.queue.streams import StreamPublisher
from auditor.telemetry import metrics
from workers.monitoring.divergence import OFF
from workers.runtime.generate import SamplingConfig
from workers.serving.context import WorkerContext, get_runtime
from workers.serving.recording import record_metrics, score_rows, store_verdict
from workers.serving.responses import answer_response, flag_body, monitor_body, score_body, served_answer
from workers.serving.streaming import LiveAnswer, TokenListener, pump
from workers.serving.transactions import in_transaction

log = logging.getLogger(__name__)


def serve_generation(request_id: str, payload: dict[str, Any], runtime: WorkerContext | None = None) -> dict[str, Any]:
    """Generate a monitored completion for a queued request (inside whatever batch the model
    thread is running), write its scores in one batch and mark it done, exactly once however
    many times the task runs."""
    runtime = runtime or get_runtime()
    if not payload.get("stream"):
        return _serve(request_id, payload, runtime, None)
    publisher = runtime.streams
    if publisher is None:
        raise InvalidInputError("this worker has no stream channel (streaming needs a Redis broker or result backend)")
    try:
        answer = _serve(request_id, payload, runtime, publisher)
    except Exception as exc:
        # The message as the task raises it: scrubbed of the request's text outside full mode.
        try:
            publisher.publish(request_id, {"type": "error", "message": f"{type(exc).__name__}: {exc}"[:2000]})
        except Exception:  # the channel itself is gone: the API's wait runs out and says so
            log.warning("could not publish the failure of %s", request_id, exc_info=True)
        raise
    else:
        publisher.publish(request_id, {"type": "done", "answer": answer})
        return answer
    finally:
        publisher.forget(request_id)


def _serve(
    request_id: str, payload: dict[str, Any], runtime: WorkerContext, publisher: StreamPublisher | None
) -> dict[str, Any]:
    def start(session) -> dict[str, Any] | tuple:
        request = store.get_request(session, request_id=request_id, for_update=True)
        if request is None:
            raise InvalidInputError(f"no request {request_id!r}")
        if request.status in FINAL_REQUEST_STATUSES:
            if request.completion_text is not None and request.privacy_mode == PrivacyMode.FULL:
                return recorded_generation(session, request)
            # Recorded without its text (privacy mode): generate again for the caller, record nothing.
        elif publisher is not None and publisher.cancelled(request_id):
            # Its client left while it waited in the queue: nothing to generate.
            store.mark_request(session, request_id=request_id, status=RequestStatus.CANCELLED)
            return cancelled_before_start(request_id)
        else:
            store.mark_request(session, request_id=request_id, status=RequestStatus.RUNNING)
        return request.created_at, request.kind

    started = in_transaction(runtime, start, f"starting {request_id}")
    if isinstance(started, dict):
        return started
    queued_at, kind = started
    model_id = runtime.host.model.fingerprint.model_id
    try:
        sampling = SamplingConfig(**payload.get("sampling", {}))
        prompt = payload["messages"] if "messages" in payload else payload["prompt"]
        submitted = time.time()
        listener = TokenListener() if publisher is not None else None
        future = runtime.model_thread.generate(prompt, sampling, chat="messages" in payload, listener=listener)
        if listener is not None:
            live = LiveAnswer(runtime.host.model.tokenizer, sampling.stop)
            pump(request_id, listener, future, live, publisher)
        served = future.result()
    except Exception as exc:
        texts = privacy.request_texts(payload)  # an error may quote them: kept only in full mode
        modes = {runtime.settings.privacy_mode}  # and the request's own (the row is the truth)

        failure = f"{type(exc).__name__}: {exc}"

        def fail(session) -> None:
            request = store.get_request(session, request_id=request_id, for_update=True)
            modes.add(request.privacy_mode if request is not None else PrivacyMode.FULL)
            if request is not None and request.status != RequestStatus.DONE:  # another run may have recorded it
                error = privacy.scrub(failure, request.privacy_mode, texts)
                store.mark_request(session, request_id=request_id, status=RequestStatus.FAILED, error=error[:2000])

        in_transaction(runtime, fail, f"recording the failure of {request_id}")
        metrics.record_request(kind, RequestStatus.FAILED, model_id, time.time() - queued_at.timestamp())
        clean = privacy.scrubbed_exception(exc, privacy.strictest(modes), texts)
        if clean is exc:
            raise
        raise clean from None  # Celery logs and stores what is raised; the original quotes the prompt
    generation, bank = served.generation, served.bank
    finish = generation.finish_reason if generation.finish_reason in ("stop", "cancelled") else "length"
    status = RequestStatus.CANCELLED if finish == "cancelled" else RequestStatus.DONE

    def record(session) -> dict[str, Any] | None:
        request = store.get_request(session, request_id=request_id, for_update=True)
        if request is not None and request.status in FINAL_REQUEST_STATUSES:  # another run recorded it first
            return recorded_generation(session, request, text=served.text)
        # COPY on Postgres (53k rows/s vs 34k for batched INSERT, bench/ingest.py); INSERT on SQLite.
        store.insert_scores_copy(
            session,
            request_id=request_id,
            rows=score_rows(bank, served.scores, served.verdict, runtime.settings.store_traces),
        )
        store.mark_request(
            session,
            request_id=request_id,
            status=status,
            completion_text=served.text,
            finish_reason=finish,
            model_id=runtime.host.model.fingerprint.model_id,
            model_fingerprint=runtime.host.model.fingerprint.hash,
            queue_seconds=max(0.0, submitted - queued_at.timestamp()),
            prefill_seconds=generation.prefill_seconds,
            decode_seconds=generation.decode_seconds,
            prompt_tokens=len(generation.prompt_ids),
            completion_tokens=len(generation.output_ids),
            monitor_status=served.verdict.status,
        )
        store_verdict(session, request_id=request_id, bank=bank, verdict=served.verdict)
        return None

    recorded = in_transaction(runtime, record, f"recording {request_id}")
    if recorded is not None:
        return recorded  # counted in the metrics by the run that recorded it
    metrics.record_request(
        kind,
        status,
        model_id,
        time.time() - queued_at.timestamp(),
        len(generation.prompt_ids),
        len(generation.output_ids),
    )
    record_metrics(model_id, bank, served.verdict)
    return served_answer(request_id, served, finish, runtime.fitted_null(bank), status)


def cancelled_before_start(request_id: str) -> dict[str, Any]:
    """The answer of a request cancelled before a token was generated: nothing read."""
    return answer_response(
        request_id=request_id,
        text="",
        finish_reason="cancelled",
        prompt_tokens=0,
        completion_tokens=0,
        scores={},
        flags=[],
        monitor=monitor_body(OFF, 0),
        status=RequestStatus.CANCELLED,
    )


def _display_names(concepts: list) -> dict[int, str]:
    """Concept id -> the name answers use: the bare name, or name:vN when several versions of
    it are present (as workers.serving.registry.bank_from_registry names them)."""
    return dict(zip((c.id for c in concepts), display_labels(concepts)))


def recorded_generation(session, request, text: str | None = None) -> dict[str, Any]:
    """The answer of a finished request as recorded: what its first run returned (headline
    scores at each concept's primary layer, flags, alerts, and how it was read, without the
    thresholds, which are not stored). The text is the stored one in `full` privacy mode; under
    `hash` (none stored) and `redacted` (masked) `text`, a repeat run's own, stands in."""
    scores = store.scores_for_request(session, request_id=request.id)
    concepts = {s.concept_id: store.get_concept(session, concept_id=s.concept_id) for s in scores}
    names = _display_names([c for c in concepts.values() if c is not None])
    headline = {}
    n_tokens = request.completion_tokens or 0
    for s in scores:
        concept = concepts.get(s.concept_id)
        if concept is None or s.layer != concept.primary_layer:
            continue
        n_tokens = s.n_tokens
        headline[names[s.concept_id]] = score_body(
            s.layer, s.mean, s.max, s.last, s.answer_z, s.answer_percentile, s.calibrated_z, s.percentile
        )
    flags = session.scalars(select(Flag).where(Flag.request_id == request.id).order_by(Flag.id))
    full = request.privacy_mode == PrivacyMode.FULL and request.completion_text is not None
    return answer_response(
        status=request.status,
        request_id=request.id,
        text=request.completion_text if full else text,
        finish_reason=request.finish_reason,
        prompt_tokens=request.prompt_tokens,
        completion_tokens=request.completion_tokens,
        scores=headline,
        flags=[
            flag_body(
                names.get(f.concept_id, str(f.concept_id)),
                f.kind,
                f.residual_signal,
                f.text_signal,
                f.threshold,
                f.reason,
            )
            for f in flags
        ],
        monitor=monitor_body(request.monitor_status or OFF, n_tokens),
    )
