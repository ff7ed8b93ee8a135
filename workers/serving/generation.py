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
from typing import Any, NoReturn

from sqlalchemy import select

from auditor import privacy
from auditor.db import store
from auditor.db.enums import FINAL_REQUEST_STATUSES, PrivacyMode, RequestStatus
from auditor.db.labels import display_labels
from auditor.db.models import Flag
from auditor.errors import InvalidInputError
from auditor.queue.streams import StreamPublisher
from auditor.telemetry import metrics
from workers.monitoring.divergence import INSUFFICIENT as INSUFFICIENT_TOKENS
from workers.monitoring.divergence import OFF
from workers.runtime.generate import SamplingConfig, encode_prompt, read_prompt
from workers.runtime.logprobs import prompt_entries
from workers.serving.context import WorkerContext, get_runtime
from workers.serving.recording import record_metrics, score_rows, store_verdict
from workers.serving.responses import answer_response, flag_body, monitor_body, score_body, served_answer
from workers.serving.streaming import LiveAnswer, TokenListener, asks_to_cancel, pump, wait_cancellable
from workers.serving.transactions import in_transaction

log = logging.getLogger(__name__)


def serve_generation(request_id: str, payload: dict[str, Any], runtime: WorkerContext | None = None) -> dict[str, Any]:
    """Generate a monitored completion for a queued request (inside whatever batch the model
    thread is running), write its scores in one batch and mark it done, exactly once however
    many times the task runs."""
    runtime = runtime or get_runtime()
    publisher = runtime.streams
    if not payload.get("stream"):
        try:
            return _serve(request_id, payload, runtime, publisher)
        finally:
            if publisher is not None:
                publisher.forget(request_id)
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
    started = _start(request_id, runtime, publisher)
    if isinstance(started, dict):
        return started
    queued_at, kind = started
    if payload.get("sampling", {}).get("max_new_tokens") == 0:
        return _read_prompt_only(request_id, payload, runtime, queued_at, kind)
    model_id = runtime.host.model.fingerprint.model_id
    try:
        sampling = SamplingConfig(**payload.get("sampling", {}))
        prompt = payload["messages"] if "messages" in payload else payload["prompt"]
        submitted = time.time()
        streaming = bool(payload.get("stream"))
        listener = TokenListener(streaming=streaming) if publisher is not None else None
        future = runtime.model_thread.generate(prompt, sampling, chat="messages" in payload, listener=listener)
        if streaming:
            live = LiveAnswer(runtime.host.model.tokenizer, sampling.stop)
            pump(request_id, listener, future, live, publisher)
        elif listener is not None:
            wait_cancellable(request_id, listener, future, publisher)
        served = future.result()
    except Exception as exc:
        _failed(request_id, payload, runtime, exc, kind, queued_at)
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
    answer = served_answer(request_id, served, finish, runtime.fitted_null(bank), status)
    if payload.get("echo"):
        answer["prompt"] = _echo(runtime, generation.prompt_ids, served.prompt_logprobs)
    return answer


def _start(request_id: str, runtime: WorkerContext, publisher: StreamPublisher | None) -> dict[str, Any] | tuple:
    """Mark the request running: (queued at, kind). Or, when there is nothing to run, its
    answer: as recorded (a repeat run), or cancelled (its client left while it was queued)."""

    def start(session) -> dict[str, Any] | tuple:
        request = store.get_request(session, request_id=request_id, for_update=True)
        if request is None:
            raise InvalidInputError(f"no request {request_id!r}")
        if request.status in FINAL_REQUEST_STATUSES:
            if request.completion_text is not None and request.privacy_mode == PrivacyMode.FULL:
                return recorded_generation(session, request)
            # Recorded without its text (privacy mode): generate again for the caller, record nothing.
        elif publisher is not None and asks_to_cancel(publisher, request_id):
            store.mark_request(session, request_id=request_id, status=RequestStatus.CANCELLED)
            return cancelled_before_start(request_id)
        else:
            store.mark_request(session, request_id=request_id, status=RequestStatus.RUNNING)
        return request.created_at, request.kind

    return in_transaction(runtime, start, f"starting {request_id}")


def _failed(
    request_id: str, payload: dict[str, Any], runtime: WorkerContext, exc: Exception, kind, queued_at
) -> NoReturn:
    """Record the request failed (unless another run recorded it) and raise `exc`, scrubbed of
    the request's text outside full mode."""
    texts = privacy.request_texts(payload)  # an error may quote them: kept only in full mode
    modes = {runtime.settings.privacy_mode}  # and the request's own (the row is the truth)
    failure = f"{type(exc).__name__}: {exc}"

    def fail(session) -> None:
        request = store.get_request(session, request_id=request_id, for_update=True)
        modes.add(request.privacy_mode if request is not None else PrivacyMode.FULL)
        if request is not None and request.status not in FINAL_REQUEST_STATUSES:  # another run may have recorded it
            error = privacy.scrub(failure, request.privacy_mode, texts)
            store.mark_request(session, request_id=request_id, status=RequestStatus.FAILED, error=error[:2000])

    in_transaction(runtime, fail, f"recording the failure of {request_id}")
    model_id = runtime.host.model.fingerprint.model_id
    metrics.record_request(kind, RequestStatus.FAILED, model_id, time.time() - queued_at.timestamp())
    clean = privacy.scrubbed_exception(exc, privacy.strictest(modes), texts)
    if clean is exc:
        raise exc
    raise clean from None  # Celery logs and stores what is raised; the original quotes the prompt


def _echo(runtime: WorkerContext, prompt_ids: list[int], logprobs: list[dict] | None) -> dict[str, Any]:
    """What `echo` returns before the answer: the prompt's text and, when asked, its tokens'
    log-probabilities (the first has none)."""
    text = runtime.host.model.tokenizer.decode(prompt_ids, skip_special_tokens=True)
    return {"text": text, "tokens": len(prompt_ids), "logprobs": logprobs}


def _read_prompt_only(
    request_id: str, payload: dict[str, Any], runtime: WorkerContext, queued_at, kind
) -> dict[str, Any]:
    """`max_tokens` 0: nothing is generated, so nothing is monitored (no answer, no scores);
    the prompt is read for `echo` (its text, and its log-probabilities when asked for)."""
    model = runtime.host.model
    k = payload["sampling"].get("prompt_logprobs")

    def read() -> tuple[list[int], list[dict] | None]:
        prompt_ids = encode_prompt(model, payload["prompt"], chat=False)
        if k is None:
            return prompt_ids, None
        return prompt_ids, prompt_entries(model.tokenizer, prompt_ids, read_prompt(model, prompt_ids, k))

    submitted = time.time()
    try:
        prompt_ids, logprobs = runtime.model_thread.call(read).result()
    except Exception as exc:
        _failed(request_id, payload, runtime, exc, kind, queued_at)

    def record(session) -> dict[str, Any] | None:
        request = store.get_request(session, request_id=request_id, for_update=True)
        if request is not None and request.status in FINAL_REQUEST_STATUSES:
            return recorded_generation(session, request, text="")
        store.mark_request(
            session,
            request_id=request_id,
            status=RequestStatus.DONE,
            completion_text="",
            finish_reason="length",
            model_id=model.fingerprint.model_id,
            model_fingerprint=model.fingerprint.hash,
            queue_seconds=max(0.0, submitted - queued_at.timestamp()),
            prompt_tokens=len(prompt_ids),
            completion_tokens=0,
            monitor_status=INSUFFICIENT_TOKENS,
        )
        return None

    answer = in_transaction(runtime, record, f"recording {request_id}") or answer_response(
        request_id=request_id,
        text="",
        finish_reason="length",
        prompt_tokens=len(prompt_ids),
        completion_tokens=0,
        scores={},
        flags=[],
        monitor=monitor_body(INSUFFICIENT_TOKENS, 0),
    )
    metrics.record_request(kind, RequestStatus.DONE, model.fingerprint.model_id, time.time() - queued_at.timestamp())
    if payload.get("echo"):
        answer["prompt"] = _echo(runtime, prompt_ids, logprobs)
    return answer


def give_up(request_ids: list[str], reason: str, runtime: WorkerContext | None = None) -> None:
    """Mark requests failed with `reason`, those not final yet (a task refused as poison)."""
    runtime = runtime or get_runtime()

    def fail(session) -> None:
        for request_id in request_ids:
            request = store.get_request(session, request_id=request_id, for_update=True)
            if request is not None and request.status not in FINAL_REQUEST_STATUSES:
                store.mark_request(session, request_id=request_id, status=RequestStatus.FAILED, error=reason)

    in_transaction(runtime, fail, f"refusing {request_ids[0]}")


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
