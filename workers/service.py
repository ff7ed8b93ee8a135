"""What a worker does for one request, as plain functions (the Celery task is a thin shell).

One `Runtime` per process, built lazily on first use: the model, a database session factory,
and the calibrated bank of registered concepts.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

from auditor import audit_log, metrics, privacy, store
from auditor.db import database_url, make_engine, session_factory, writer_engine
from auditor.drift_export import DriftExporter
from auditor.settings import Settings
from probes.calibration import fpr_thresholds
from probes.concepts import builtin_concepts, concept_from_dict, load_concept, load_control_prompts
from probes.divergence import DivergenceThresholds, fit_thresholds
from probes.errors import InvalidInputError
from workers.concepts import ConceptBank, calibrate_bank, calibration_texts
from workers.batcher import ModelThread
from workers.engine import Engine, SteerRequest
from workers.monitor import RequestScores
from workers.registry import (
    active_concept_ids,
    bank_from_registry,
    find_extracted,
    load_divergence_thresholds,
    load_stored_calibration,
    reference_hash,
    register_builtin_concepts,
    register_extracted,
    save_calibration,
    save_divergence_thresholds,
)
from workers.divergence import control_signals
from workers.runtime.generate import SamplingConfig

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = Engine(settings)
        self.sessions = session_factory(writer_engine(make_engine(database_url(settings))))
        # The only thread that touches the model; it batches what arrives together.
        self.model_thread = ModelThread(self, settings.batch_max_size, settings.batch_wait_ms / 1000)
        self._bank: ConceptBank | None = None
        self._calibration_id: int | None = None
        self._thresholds: tuple[ConceptBank, Any] | None = None
        self._divergence: tuple[ConceptBank, DivergenceThresholds | None] | None = None
        self._drift: DriftExporter | None = None
        self._builtins_registered = False

    @cached_property
    def injected_steering(self) -> list[SteerRequest]:
        """The drill setting AUDITOR_INJECT_STEERING: steering applied to every generation the
        way a tampered pipeline would, to prove the monitor catches it."""
        if not self.settings.inject_steering:
            return []
        concept, alpha = self.settings.inject_steering.rsplit(":", 1)
        return [SteerRequest(concept, float(alpha), relative=True)]

    @cached_property
    def reference_texts(self) -> list[str]:
        return calibration_texts([load_concept(n) for n in builtin_concepts()])

    def bank(self) -> ConceptBank:
        """(Model thread only.) The calibrated bank of active concepts. Rebuilt when the registry's set of active
        versions changes (a registration, activation or retirement since the last request), so
        a vector registered through the admin API is monitored from the next request on, and
        when a newer calibration is stored. The calibration itself is computed once per
        deployment and stored; later processes read it back.

        While the database is unreachable, the bank in hand serves on (a registry change
        reaches this worker once the database is back): the requests already accepted must not
        fail over a check that usually finds nothing new, and their writes wait in
        `in_transaction` until the database returns."""
        if self._bank is None:
            return self._fresh_bank()
        try:
            return self._fresh_bank()
        except Exception as exc:
            if not _retryable(exc):
                raise
            log.warning("database unavailable: serving with the concept bank in hand (%s)", type(exc).__name__)
            return self._bank

    def _fresh_bank(self) -> ConceptBank:
        with self.sessions() as session:
            if not self._builtins_registered:
                register_builtin_concepts(session, self.engine)
                session.commit()
                self._builtins_registered = True
            active = active_concept_ids(session, self.engine)
            calibration_id = store.newest_calibration_id(session)
            if self._bank is None or self._bank.concept_ids != active or calibration_id != self._calibration_id:
                bank = bank_from_registry(session, self.engine)
                texts_hash = reference_hash(self.reference_texts)
                if not load_stored_calibration(session, bank, texts_hash):
                    self._calibrate(session, bank)
                self._calibration_id = store.newest_calibration_id(session)
                self._bank = bank
        return self._bank

    def thresholds(self, bank: ConceptBank):
        """Raw-score alert thresholds [n_layers, n_concepts] at the target FPR, per bank."""
        if self._thresholds is None or self._thresholds[0] is not bank:
            self._thresholds = (bank, fpr_thresholds(bank.calibration, self.settings.target_fpr)[0])
        return self._thresholds[1]

    def warm_up(self) -> ConceptBank:
        """(Model thread only.) Everything the first request would otherwise wait for: the
        model, the registered and calibrated bank, the divergence thresholds. Then starts the
        drift export."""
        bank = self.bank()
        self.divergence_thresholds(bank)
        self.drift_exporter().start()
        return bank

    def drift_exporter(self) -> DriftExporter:
        if self._drift is None:
            s = self.settings
            self._drift = DriftExporter(self.sessions, self.engine.model.fingerprint.model_id,
                                        timedelta(minutes=s.drift_recent_minutes),
                                        timedelta(minutes=s.drift_baseline_minutes), s.drift_interval_seconds)
        return self._drift

    def divergence_thresholds(self, bank: ConceptBank, refit: bool = False, target_fpr: float | None = None):
        """(Model thread only.) Divergence thresholds for `bank`'s concepts: stored ones, or
        fitted now on answers to the control prompts and stored (once per deployment and set
        of active concepts). None when divergence flags are off."""
        if not self.settings.divergence_flags:
            return None
        if not refit and self._divergence is not None and self._divergence[0] is bank:
            return self._divergence[1]
        with self.sessions() as session:
            thresholds = None if refit else load_divergence_thresholds(session, bank)
            if thresholds is None:
                target_fpr = target_fpr or self.settings.target_fpr
                residual, text = control_signals(self.engine.model, bank, load_control_prompts(),
                                                 self.settings.control_max_tokens, self.settings.batch_max_size)
                thresholds = fit_thresholds(residual, text, target_fpr)
                save_divergence_thresholds(session, bank, thresholds, residual, text, target_fpr)
                session.commit()
        self._divergence = (bank, thresholds)
        return thresholds

    def fitted_divergence_thresholds(self, bank: ConceptBank) -> DivergenceThresholds | None:
        """The thresholds already fitted for `bank`, if any; never fits (any thread may ask)."""
        if self._divergence is not None and self._divergence[0] is bank:
            return self._divergence[1]
        return None

    def _calibrate(self, session, bank: ConceptBank, target_fpr: float | None = None) -> int:
        calibrate_bank(self.engine.model, bank, self.reference_texts, self.settings.batch_size)
        rows = save_calibration(session, bank, reference_hash(self.reference_texts),
                                target_fpr or self.settings.target_fpr)
        session.commit()
        return rows


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime(settings: Settings | None = None) -> Runtime:
    """The process's runtime. Built on first call, i.e. inside a task in the worker child,
    never in a prefork parent."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from auditor.settings import get_settings

            _runtime = Runtime(settings or get_settings())
        return _runtime


def score_rows(bank: ConceptBank, scores: RequestScores, traces: bool = False) -> list[dict[str, Any]]:
    """One row per (concept version, layer) that holds a vector; with `traces`, each row also
    carries its per-token cosine trace (float32, one value per scored token)."""
    rows = []
    for li, layer in enumerate(bank.layers):
        for k, concept_id in enumerate(bank.concept_ids):
            if bank.mask is not None and not bool(bank.mask[li, k]):
                continue
            rows.append({
                "concept_id": concept_id, "layer": layer,
                "mean": float(scores.aggregates.mean[li, k]), "max": float(scores.aggregates.max[li, k]),
                "last": float(scores.aggregates.last[li, k]),
                "calibrated_z": float(scores.z_mean[li, k]) if scores.z_mean is not None else None,
                "percentile": float(scores.percentile_mean[li, k]) if scores.percentile_mean is not None else None,
                "n_tokens": scores.aggregates.n_tokens,
                "trace": scores.per_token[li, :, k].float() if traces else None,
            })  # fmt: skip
    return rows


def record_metrics(runtime: "Runtime", bank: ConceptBank, scores: RequestScores) -> None:
    """Prometheus: each concept's calibrated score at its primary layer, and whether it crossed
    the alert threshold (bounded series: concept × primary layer × model, never per layer)."""
    if bank.calibration is None:
        return
    # The alert threshold fitted on answers to control prompts when there is one; otherwise the
    # neutral-text threshold (standalone text reads concepts differently from answers).
    control = runtime.fitted_divergence_thresholds(bank)
    thresholds = runtime.thresholds(bank)
    samples = []
    for k, name in enumerate(bank.names):
        layer = bank.auto_layers[name]
        if layer not in bank.layers:
            continue
        li = bank.layers.index(layer)
        z = float(scores.z_mean[li, k])
        if control is not None and control.alert_z is not None:
            exceeded = z > float(control.alert_z[k])
        else:
            exceeded = bool(scores.aggregates.mean[li, k] > thresholds[li, k])
        samples.append(metrics.ScoreSample(name.split(":v")[0], layer, z, exceeded=exceeded))
    metrics.record_scores(runtime.engine.model.fingerprint.model_id, samples)


def headline(bank: ConceptBank, scores: RequestScores) -> dict[str, dict[str, float]]:
    """Per concept, the scores at its primary layer: what the API returns inline."""
    out = {}
    for name in bank.names:
        layer = bank.auto_layers[name]
        if layer in bank.layers:
            row = scores.at(name, layer)
            out[name] = {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items() if k != "concept"}
    return out


# ---- exactly once, across crashes and restarts ----
#
# A task can run more than once: Redis re-delivers it when its worker dies mid-task (acks are
# late) or holds it past the visibility timeout, and the API sends it again when Redis comes
# back without it (auditor.dispatch). Each run takes the request's row lock (SELECT … FOR
# UPDATE; SQLite's BEGIN IMMEDIATE does the same) when it starts and when it writes: a request
# already done is final, so a later run writes nothing and answers with the recorded result,
# and of two runs at once the first to write wins. Every write is one transaction, retried
# whole while the database is away (`in_transaction`).


def _retryable(exc: BaseException) -> bool:
    """A lost or refused connection, a server shutting down or starting up, a serialization
    failure or deadlock: the same transaction can succeed later. Constraint violations and bad
    input cannot."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(exc, (OperationalError, InterfaceError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    try:
        import psycopg
    except ImportError:
        return False
    # COPY runs on the raw driver connection: its errors arrive unwrapped.
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


def in_transaction(runtime: Runtime, work, what: str):
    """`work(session)` in a session and transaction of its own, then commit; returns what it
    returns. While the database is unreachable the whole transaction is retried with
    exponential backoff (0.2 s doubling up to `db_retry_max_backoff`) for up to
    `db_retry_seconds`, so a database restart delays a worker's writes instead of losing them;
    after that the error is raised."""
    settings = runtime.settings
    deadline = time.monotonic() + settings.db_retry_seconds
    pause = 0.2
    while True:
        try:
            with runtime.sessions() as session:
                result = work(session)
                session.commit()
                return result
        except Exception as exc:
            if not _retryable(exc) or time.monotonic() + pause > deadline:
                raise
            first_line = " ".join(str(exc).split())[:200]
            log.warning("database unavailable while %s, retrying in %.1fs: %s: %s",
                        what, pause, type(exc).__name__, first_line)
            time.sleep(pause)
            pause = min(pause * 2, settings.db_retry_max_backoff)


def _display_names(concepts: list) -> dict[int, str]:
    """Concept id -> the name answers use: the bare name, or name:vN when several versions of
    it are present (as workers.registry.bank_from_registry names them)."""
    return {c.id: c.name if sum(o.name == c.name for o in concepts) == 1 else f"{c.name}:v{c.version}"
            for c in concepts}


def recorded_generation(session, request, text: str | None = None) -> dict[str, Any]:
    """The answer of a finished request as recorded: what its first run returned (headline
    scores at each concept's primary layer, flags). The text is the stored one in `full`
    privacy mode; under `hash` (none stored) and `redacted` (masked) `text`, a repeat run's own,
    stands in."""
    from sqlalchemy import select

    from auditor.models import Flag

    scores = store.scores_for_request(session, request_id=request.id)
    concepts = {s.concept_id: store.get_concept(session, concept_id=s.concept_id) for s in scores}
    names = _display_names([c for c in concepts.values() if c is not None])
    headline_scores = {}
    for s in scores:
        concept = concepts.get(s.concept_id)
        if concept is None or s.layer != concept.primary_layer:
            continue
        row = {"layer": s.layer, "mean": s.mean, "max": s.max, "last": s.last}
        if s.calibrated_z is not None:
            row.update(z=s.calibrated_z, percentile=s.percentile)
        headline_scores[names[s.concept_id]] = {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}
    flags = session.scalars(select(Flag).where(Flag.request_id == request.id).order_by(Flag.id))
    return {"request_id": request.id, "status": "done",
            "text": request.completion_text if request.privacy_mode == "full" and request.completion_text is not None else text,
            "finish_reason": request.finish_reason, "prompt_tokens": request.prompt_tokens,
            "completion_tokens": request.completion_tokens, "scores": headline_scores,
            "flags": [{"concept": names.get(f.concept_id, str(f.concept_id)), "kind": f.kind,
                       "residual_z": round(f.residual_signal, 4),
                       "text_z": round(f.text_signal, 4) if f.text_signal is not None else None,
                       "threshold": round(f.threshold, 4), "reason": f.reason} for f in flags]}


def serve_generation(request_id: str, payload: dict[str, Any], runtime: Runtime | None = None) -> dict[str, Any]:
    """Generate a monitored completion for a queued request (inside whatever batch the model
    thread is running), write its scores in one batch and mark it done, exactly once however
    many times the task runs (see "exactly once" above)."""
    runtime = runtime or get_runtime()

    def start(session) -> dict[str, Any] | tuple:
        request = store.get_request(session, request_id=request_id, for_update=True)
        if request is None:
            raise InvalidInputError(f"no request {request_id!r}")
        if request.status == "done":
            if request.completion_text is not None and request.privacy_mode == "full":
                return recorded_generation(session, request)
            # Recorded without its text (privacy mode): generate again for the caller, record nothing.
        else:
            store.mark_request(session, request_id=request_id, status="running")
        return request.created_at, request.kind

    started = in_transaction(runtime, start, f"starting {request_id}")
    if isinstance(started, dict):
        return started
    queued_at, kind = started
    model_id = runtime.engine.model.fingerprint.model_id
    try:
        sampling = SamplingConfig(**payload.get("sampling", {}))
        prompt = payload["messages"] if "messages" in payload else payload["prompt"]
        submitted = time.time()
        served = runtime.model_thread.generate(prompt, sampling, chat="messages" in payload).result()
    except Exception as exc:
        texts = privacy.request_texts(payload)  # an error may quote them: kept only in full mode
        modes = {runtime.settings.privacy_mode}  # and the request's own (the row is the truth)

        failure = f"{type(exc).__name__}: {exc}"

        def fail(session) -> None:
            request = store.get_request(session, request_id=request_id, for_update=True)
            modes.add(request.privacy_mode if request is not None else "full")
            if request is not None and request.status != "done":  # another run may have recorded it
                error = privacy.scrub(failure, request.privacy_mode, texts)
                store.mark_request(session, request_id=request_id, status="failed", error=error[:2000])

        in_transaction(runtime, fail, f"recording the failure of {request_id}")
        metrics.record_request(kind, "failed", model_id, time.time() - queued_at.timestamp())
        clean = privacy.scrubbed_exception(exc, privacy.strictest(modes), texts)
        if clean is exc:
            raise
        raise clean from None  # Celery logs and stores what is raised; the original quotes the prompt
    generation, bank = served.generation, served.bank
    finish = "stop" if generation.finish_reason == "stop" else "length"

    def record(session) -> dict[str, Any] | None:
        request = store.get_request(session, request_id=request_id, for_update=True)
        if request is not None and request.status == "done":  # another run recorded it first
            return recorded_generation(session, request, text=served.text)
        # COPY on Postgres (53k rows/s vs 34k for batched INSERT, bench/ingest.py); INSERT on SQLite.
        store.insert_scores_copy(session, request_id=request_id, rows=score_rows(bank, served.scores, runtime.settings.store_traces))
        store.mark_request(
            session, request_id=request_id, status="done", completion_text=served.text, finish_reason=finish,
            model_id=runtime.engine.model.fingerprint.model_id, model_fingerprint=runtime.engine.model.fingerprint.hash,
            queue_seconds=max(0.0, submitted - queued_at.timestamp()), prefill_seconds=generation.prefill_seconds,
            decode_seconds=generation.decode_seconds, prompt_tokens=len(generation.prompt_ids),
            completion_tokens=len(generation.output_ids),
        )
        for flag in served.flags:
            store.add_flag(session, request_id=request_id, concept_id=bank.concept_ids[flag.concept],
                           layer=bank.auto_layers[bank.names[flag.concept]], kind=flag.kind,
                           residual_signal=flag.residual_z, text_signal=flag.text_z,
                           threshold=flag.threshold, reason=flag.reason)
        return None

    recorded = in_transaction(runtime, record, f"recording {request_id}")
    if recorded is not None:
        return recorded  # counted in the metrics by the run that recorded it
    metrics.record_request(kind, "done", model_id, time.time() - queued_at.timestamp(),
                           len(generation.prompt_ids), len(generation.output_ids))
    record_metrics(runtime, bank, served.scores)
    for flag in served.flags:
        metrics.record_flag(flag.kind, bank.names[flag.concept].split(":v")[0], model_id)
    return {"request_id": request_id, "status": "done", "text": served.text, "finish_reason": finish,
            "prompt_tokens": len(generation.prompt_ids), "completion_tokens": len(generation.output_ids),
            "scores": headline(bank, served.scores),
            "flags": [{"concept": bank.names[f.concept], "kind": f.kind, "residual_z": round(f.residual_z, 4),
                       "text_z": round(f.text_z, 4), "threshold": round(f.threshold, 4), "reason": f.reason}
                      for f in served.flags]}


def encode_replay(model, item: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one (prompt, completion) pair to replay; raises for this
    item alone."""
    from workers.runtime.generate import encode_prompt

    prompt = item["messages"] if item.get("messages") else item["prompt"]
    prompt_ids = encode_prompt(model, prompt, chat=bool(item.get("messages")))
    completion_ids = model.tokenizer(item["completion"], add_special_tokens=False)["input_ids"]
    if not completion_ids:
        raise InvalidInputError("a completion to audit is empty")
    if len(prompt_ids) + len(completion_ids) > model.max_context:
        raise InvalidInputError(f"prompt + completion exceed the model's context of {model.max_context} tokens")
    return prompt_ids, completion_ids


def replay_scores(model, bank: ConceptBank, sequences: list[tuple[list[int], list[int]]]) -> list[RequestScores]:
    """Teacher-forced replay of encoded (prompt, completion) pairs in one padded forward pass.

    Each sequence is prompt + completion tokens; the scored span is the positions that chose the
    completion's tokens (the last prompt position onward), exactly the span monitored generation
    scores.
    """
    import torch

    from workers.monitor import score_resid
    from workers.runtime.hooks import ResidualCapture, hooked

    width = max(len(p) + len(c) for p, c in sequences)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    batch = torch.full((len(sequences), width), pad, dtype=torch.long)
    for row, (p, c) in enumerate(sequences):
        batch[row, : len(p) + len(c)] = torch.tensor(p + c)
    capture = ResidualCapture(bank.layers)
    with torch.inference_mode(), hooked(model, capture=capture):
        # Right padding: causal attention keeps every real position independent of the pads.
        model.bridge.forward(batch.to(model.device), return_type=None)
    resid = capture.stacked()  # [n_layers, batch, width, d_model]
    results = []
    for row, (p, c) in enumerate(sequences):
        span_end = len(p) + len(c) - 1  # the last completion token is never read
        results.append(score_resid(bank, resid[:, row, :span_end], start=len(p) - 1))
    return results


def serve_audits(request_ids: list[str], items: list[dict[str, Any]], runtime: Runtime | None = None) -> dict[str, Any]:
    """Score completions served elsewhere. The model thread replays every audit item queued at
    the same moment, from any number of submissions, in one padded pass; an item that cannot
    be replayed fails alone. Each item is recorded once however many times the task runs (row
    locks, as for generations), and the writes retry while the database is away."""
    runtime = runtime or get_runtime()

    def start(session) -> list[tuple[str, dict]]:
        pending = []
        for request_id, item in zip(request_ids, items):
            row = store.get_request(session, request_id=request_id, for_update=True)
            if row is not None and row.status != "done":  # re-delivered: skip what is recorded
                store.mark_request(session, request_id=request_id, status="running")
                pending.append((request_id, item))
        return pending

    pending = in_transaction(runtime, start, f"starting audit {request_ids[0]}")
    if not pending:
        return {"request_ids": request_ids, "status": "done"}
    try:
        outcomes = runtime.model_thread.replay([item for _, item in pending]).result()
    except Exception as exc:
        outcomes = [exc] * len(pending)
    fingerprint = runtime.engine.model.fingerprint

    def record(session) -> list[tuple[str, Any]]:
        written = []  # (status, outcome) of the items this run recorded
        for (request_id, item), outcome in zip(pending, outcomes):
            row = store.get_request(session, request_id=request_id, for_update=True)
            if row is None or row.status == "done":  # another run recorded it first
                continue
            if isinstance(outcome, Exception):
                error = privacy.scrub(f"{type(outcome).__name__}: {outcome}", row.privacy_mode, privacy.request_texts(item))
                store.mark_request(session, request_id=request_id, status="failed", error=error[:2000])
                written.append(("failed", outcome))
                continue
            scores, bank, n_prompt, n_completion = outcome
            store.insert_scores_copy(session, request_id=request_id, rows=score_rows(bank, scores, runtime.settings.store_traces))
            store.mark_request(session, request_id=request_id, status="done", completion_text=item["completion"],
                               model_id=fingerprint.model_id, model_fingerprint=fingerprint.hash,
                               prompt_tokens=n_prompt, completion_tokens=n_completion)
            written.append(("done", outcome))
        return written

    for status, outcome in in_transaction(runtime, record, f"recording audit {request_ids[0]}"):
        if status == "failed":
            metrics.record_request("audit", "failed", fingerprint.model_id)
            continue
        scores, bank, n_prompt, n_completion = outcome
        metrics.record_request("audit", "done", fingerprint.model_id, None, n_prompt, n_completion)
        record_metrics(runtime, bank, scores)
    failed = sum(isinstance(o, Exception) for o in outcomes)
    return {"request_ids": request_ids, "status": "done" if not failed else f"{failed} failed"}


# ---- admin jobs: extraction from pairs, calibration ----


def _run_job(job_id: str, runtime: Runtime, work) -> dict[str, Any]:
    """Run `work(session)` for a queued job once: a finished job returns its stored result
    (re-delivery after a crash is harmless); a failure is recorded on the job, then raised."""
    with runtime.sessions() as session:
        job = store.get_job(session, job_id=job_id)
        if job is None:
            raise InvalidInputError(f"no job {job_id!r}")
        if job.status in ("done", "failed"):
            return {"job_id": job_id, "status": job.status, "result": job.result, "error": job.error}
        store.start_job(session, job_id=job_id)
        session.commit()
        payload = dict(job.payload)
    def run() -> dict[str, Any]:
        with runtime.sessions() as session:
            result = work(session, payload)
            store.finish_job(session, job_id=job_id, result=result)
            session.commit()
            return result

    try:
        # On the model thread, between decode steps: extraction and calibration use the model.
        result = runtime.model_thread.call(run).result()
    except Exception as exc:
        with runtime.sessions() as session:
            store.finish_job(session, job_id=job_id, error=f"{type(exc).__name__}: {exc}"[:2000])
            session.commit()
        raise
    return {"job_id": job_id, "status": "done", "result": result, "error": None}


def serve_extraction(job_id: str, runtime: Runtime | None = None) -> dict[str, Any]:
    """Extract a concept from the job's contrastive pairs at every layer, sweep for the primary
    layer, and register it as the concept's next version. The same pairs, method and pooling
    already registered on this model are reused, not registered twice."""
    runtime = runtime or get_runtime()

    def work(session, payload: dict) -> dict[str, Any]:
        definition = concept_from_dict(payload["concept"], origin="job")
        method, pooling = payload["method"], payload["pooling"]
        concept = find_extracted(session, runtime.engine, definition, method, pooling)
        reused = concept is not None
        if concept is None:
            vectors = runtime.engine.vectors(definition, method, pooling)
            concept = register_extracted(session, runtime.engine, definition, vectors,
                                         created_by=payload.get("created_by", "api"),
                                         activate=payload.get("activate", True))
            audit_log.record(session, actor=payload.get("created_by"), action="concept.register",
                             target=f"concept:{concept.name}:v{concept.version}", vector_hash=concept.vector_hash,
                             details={"concept_id": concept.id, "source": "pairs", "job_id": job_id})
        sweep = {row["layer"]: row for row in concept.provenance.get("sweep", [])}
        return {
            "concept_id": concept.id, "name": concept.name, "version": concept.version,
            "primary_layer": concept.primary_layer, "n_pairs": concept.n_pairs, "reused": reused,
            "held_out_auroc": sweep.get(concept.primary_layer, {}).get("auroc"),
        }

    return _run_job(job_id, runtime, work)


def serve_calibration(job_id: str, runtime: Runtime | None = None) -> dict[str, Any]:
    """Recalibrate every active concept on the neutral reference set and store the thresholds at
    the job's target false-positive rate; workers pick the new calibration up on their next
    request."""
    runtime = runtime or get_runtime()

    def work(session, payload: dict) -> dict[str, Any]:
        bank = bank_from_registry(session, runtime.engine)
        target_fpr = float(payload.get("target_fpr") or runtime.settings.target_fpr)
        rows = runtime._calibrate(session, bank, target_fpr)
        divergence = runtime.divergence_thresholds(bank, refit=True, target_fpr=target_fpr)
        thresholds, achieved = fpr_thresholds(bank.calibration, target_fpr)
        concepts = {}
        for k, name in enumerate(bank.names):
            layer = bank.auto_layers[name]
            if layer in bank.layers:
                li = bank.layers.index(layer)
                concepts[name] = {"concept_id": bank.concept_ids[k], "layer": layer,
                                  "threshold": float(thresholds[li, k]), "achieved_fpr": float(achieved[li, k])}
        if divergence is not None:
            for k, name in enumerate(bank.names):
                if name in concepts:
                    concepts[name].update(alert_z=float(divergence.alert_z[k]),
                                          alert_achieved_fpr=float(divergence.alert_achieved_fpr[k]),
                                          hidden_gap=float(divergence.hidden_gap[k]),
                                          surface_gap=float(divergence.surface_gap[k]),
                                          divergence_achieved_fpr=float(divergence.achieved_fpr[k]))
        return {"rows": rows, "target_fpr": target_fpr, "n_reference": bank.calibration.n_reference,
                "n_control": divergence.n_control if divergence is not None else 0, "concepts": concepts}

    return _run_job(job_id, runtime, work)
