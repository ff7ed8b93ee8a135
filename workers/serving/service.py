"""What a worker does for one request, as plain functions (the Celery task is a thin shell).

One `WorkerContext` per process, built lazily on first use: the model, a database session factory,
and the calibrated bank of registered concepts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from auditor import privacy
from auditor.access import audit_log
from auditor.db import store
from auditor.db.engine import database_url, make_engine, session_factory, writer_engine
from auditor.errors import InvalidInputError
from auditor.settings import Settings
from auditor.telemetry import metrics
from auditor.telemetry.drift_export import DriftExporter
from probes.answer_null import LengthNull, certifiable, minimum_answers, null_from_dict, null_to_dict
from probes.calibration import fpr_thresholds
from probes.concepts import builtin_concepts, concept_from_dict, load_concept, load_control_set
from workers.monitoring.concepts import ConceptBank, calibrate_bank, calibration_texts
from workers.monitoring.control import answer_traces, bank_key, control_answers
from workers.monitoring.divergence import Verdict
from workers.monitoring.scores import RequestScores
from workers.runtime.generate import SamplingConfig
from workers.serving.host import ModelHost, SteerRequest
from workers.serving.model_thread import ModelThread
from workers.serving.registry import (
    active_concept_ids,
    bank_from_registry,
    find_extracted,
    load_stored_calibration,
    reference_hash,
    register_builtin_concepts,
    register_extracted,
    save_calibration,
)
from workers.serving.traffic import traffic_answers
from workers.serving.warmup import StepProgress, WarmUpState

log = logging.getLogger(__name__)


class WorkerContext:
    def __init__(self, settings: Settings, progress: StepProgress | None = None):
        self.settings = settings
        self.state = WarmUpState()  # what readiness reports while the model loads and calibrates
        self.progress = self.state.progress(progress)
        self.host = ModelHost(settings)  # the model, its concept vectors and steering
        self.sessions = session_factory(writer_engine(make_engine(database_url(settings))))
        # The only thread that touches the model; it batches what arrives together.
        self.model_thread = ModelThread(self, settings.batch_max_size, settings.batch_wait_ms / 1000)
        self._bank: ConceptBank | None = None
        self._calibration_id: int | None = None
        self._thresholds: tuple[ConceptBank, Any] | None = None
        self._null: tuple[ConceptBank, LengthNull | None] | None = None
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
                register_builtin_concepts(session, self.host)
                session.commit()
                self._builtins_registered = True
            active = active_concept_ids(session, self.host)
            # A calibration stored by any process (a recalibration job, another worker) shows here.
            calibration_id = (store.newest_calibration_id(session), store.newest_answer_calibration_id(session))
            if self._bank is None or self._bank.concept_ids != active or calibration_id != self._calibration_id:
                bank = bank_from_registry(session, self.host)
                texts_hash = reference_hash(self.reference_texts)
                if not load_stored_calibration(session, bank, texts_hash):
                    self._calibrate(session, bank)
                self._calibration_id = (
                    store.newest_calibration_id(session),
                    store.newest_answer_calibration_id(session),
                )
                self._bank = bank
        return self._bank

    def warm_up(self) -> ConceptBank:
        """(Model thread only.) Everything the first request would otherwise wait for: the
        model, the registered and calibrated bank, the null of ordinary answers. Then starts
        the drift export. Each step is reported in `state` (readiness) and on the progress bar."""
        self.state.phase("loading the model")
        _ = self.host.model
        self.state.phase("registering concepts")
        bank = self.bank()
        self.answer_null(bank)
        self.state.ready()
        self.drift_exporter().start()
        return bank

    def drift_exporter(self) -> DriftExporter:
        if self._drift is None:
            s = self.settings
            self._drift = DriftExporter(
                self.sessions,
                self.host.model.fingerprint.model_id,
                timedelta(minutes=s.drift_recent_minutes),
                timedelta(minutes=s.drift_baseline_minutes),
                s.drift_interval_seconds,
            )
        return self._drift

    def control_set(self) -> tuple[tuple[str, str], ...]:
        """(prompt, category) of the control prompts in use."""
        rows = load_control_set()
        return rows[: self.settings.control_limit] if self.settings.control_limit else rows

    def control_prompts(self) -> tuple[str, ...]:
        return tuple(prompt for prompt, _ in self.control_set())

    def answer_null(self, bank: ConceptBank, refit: bool = False, target_fpr: float | None = None) -> LengthNull | None:
        """(Model thread only.) The null of ordinary answers for `bank`'s concepts: the newest
        stored one for exactly these concept versions (fitted on control answers or on recorded
        traffic), or fitted now on the control prompts' answers and stored (once per deployment
        and set of active concepts). None when divergence flags are off."""
        if not self.settings.divergence_flags:
            return None
        if not refit and self._null is not None and self._null[0] is bank:
            return self._null[1]
        model, key = self.host.model, bank_key(self.host.model, bank)
        target_fpr = target_fpr or self.settings.target_fpr
        with self.sessions() as session:
            row = None if refit else store.latest_answer_calibration(session, bank_key=key)
            if row is not None and self._reusable(row, target_fpr):
                null = null_from_dict(row.null)
            else:
                null = self.fit_control_null(bank, target_fpr)
                store.add_answer_calibration(
                    session,
                    bank_key=key,
                    model_fingerprint=model.fingerprint.hash,
                    concept_ids=bank.concept_ids or [],
                    source="control",
                    null=null_to_dict(null),
                    summary=null.summary(),
                )
                session.commit()
        self._null = (bank, null)
        return null

    def _reusable(self, row, target_fpr: float) -> bool:
        """A stored control null serves on only under the settings it was fitted for. A null
        fitted on traffic keeps the target and confidence the operator asked for and stays until
        the operator refits (its window is not reproducible here); only a change of the minimum
        flag length, which reshapes the null, retires it."""
        null = row.null
        same = row.min_tokens == self.settings.min_flag_tokens
        if row.source == "control":
            expected = "held_out_group" if len({c for _, c in self.control_set()}) > 1 else "in_sample"
            same = (
                same
                and math.isclose(null["target_fpr"], target_fpr)
                and math.isclose(null["confidence"], self.settings.calibration_confidence)
                and null.get("threshold_method", "in_sample") == expected
            )
        if not same:
            log.info(
                "stored answer null %d was fitted under other settings (target %g, min tokens %d); refitting",
                row.id,
                null["target_fpr"],
                row.min_tokens,
            )
        return same

    def fit_control_null(self, bank: ConceptBank, target_fpr: float) -> LengthNull:
        """(Model thread only.) Answers to the control prompts (shipped for the default model,
        else generated once and cached), traced per concept, fitted at `target_fpr`."""
        s = self.settings
        self.state.phase("calibrating on control answers")
        answers = control_answers(
            self.host.model,
            self.control_prompts(),
            s.control_max_tokens,
            s.control_cache_dir,
            max(s.batch_max_size, 16),
            self.progress,
        )
        traces = answer_traces(self.host.model, bank, answers, s.control_cache_dir, s.batch_size, self.progress)
        categories = [category for _, category in self.control_set()]
        null = traces.fit(target_fpr, s.calibration_confidence, s.min_flag_tokens, groups=categories)
        summary = null.summary()
        log.info(
            "answer null fitted on %d control answers: certified to %d tokens; divergence rate %.4f "
            "(95%% upper %.4f), alert rate %.4f (95%% upper %.4f) against a %.4f target",
            summary["n_answers"],
            null.certified_length,
            summary["divergence_achieved_fpr"],
            summary["divergence_upper_95"],
            summary["alert_achieved_fpr"],
            summary["alert_upper_95"],
            target_fpr,
        )
        return null

    def fit_traffic_null(self, session, bank: ConceptBank, target_fpr: float, since, until) -> LengthNull:
        """(Model thread only.) The null from this deployment's recorded answers in the window."""
        s = self.settings
        self.state.phase("calibrating on recorded traffic")
        answers = traffic_answers(session, self.host.model, since, until, s.control_max_tokens)
        if not certifiable(len(answers), target_fpr, s.calibration_confidence):
            raise InvalidInputError(
                f"{len(answers)} replayable answers between {since.isoformat()} and {until.isoformat()}: too few to "
                f"promise a {target_fpr:g} false-alarm rate at {s.calibration_confidence:g} confidence (need "
                f"{minimum_answers(target_fpr, s.calibration_confidence)}; only full-privacy, unsteered answers count)"
            )
        traces = answer_traces(self.host.model, bank, answers, None, s.batch_size, self.progress)
        return traces.fit(target_fpr, s.calibration_confidence, s.min_flag_tokens)

    def fitted_null(self, bank: ConceptBank) -> LengthNull | None:
        """The null already fitted for `bank`, if any; never fits (any thread may ask)."""
        if self._null is not None and self._null[0] is bank:
            return self._null[1]
        return None

    def _calibrate(self, session, bank: ConceptBank, target_fpr: float | None = None) -> int:
        calibrate_bank(self.host.model, bank, self.reference_texts, self.settings.batch_size)
        rows = save_calibration(
            session, bank, reference_hash(self.reference_texts), target_fpr or self.settings.target_fpr
        )
        session.commit()
        return rows


_runtime: WorkerContext | None = None
_runtime_lock = threading.Lock()
heartbeat = None  # auditor.queue.heartbeat.HeartbeatPublisher of an `auditor worker` process


def get_runtime(settings: Settings | None = None) -> WorkerContext:
    """The process's runtime. Built on first call, i.e. inside a task in the worker child,
    never in a prefork parent."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from auditor.settings import get_settings

            _runtime = WorkerContext(settings or get_settings())
        return _runtime


def current_runtime() -> WorkerContext | None:
    """The process's runtime if one was built; never builds one (shutdown hooks ask)."""
    return _runtime


def score_rows(
    bank: ConceptBank, scores: RequestScores, verdict: Verdict | None = None, traces: bool = False
) -> list[dict[str, Any]]:
    """One row per (concept version, layer) that holds a vector; with `traces`, each row also
    carries its per-token cosine trace (float32, one value per scored token). Each concept's
    primary-layer row also carries its z and percentile against ordinary answers of the same
    length, when the answer was read against them."""
    reading = verdict.reading if verdict is not None else None
    rows = []
    for li, layer in enumerate(bank.layers):
        for k, concept_id in enumerate(bank.concept_ids):
            if bank.mask is not None and not bool(bank.mask[li, k]):
                continue
            primary = reading is not None and layer == bank.auto_layers[bank.names[k]]
            rows.append({
                "concept_id": concept_id, "layer": layer,
                "mean": float(scores.aggregates.mean[li, k]), "max": float(scores.aggregates.max[li, k]),
                "last": float(scores.aggregates.last[li, k]),
                "calibrated_z": float(scores.z_mean[li, k]) if scores.z_mean is not None else None,
                "percentile": float(scores.percentile_mean[li, k]) if scores.percentile_mean is not None else None,
                "answer_z": float(reading.residual_z[k]) if primary else None,
                "answer_percentile": float(reading.percentile[k]) if primary else None,
                "n_tokens": scores.aggregates.n_tokens,
                "trace": scores.per_token[li, :, k].float() if traces else None,
            })  # fmt: skip
    return rows


def record_metrics(runtime: WorkerContext, bank: ConceptBank, verdict: Verdict) -> None:
    """Prometheus: each concept's z against ordinary answers of the same length at its primary
    layer, and whether it crossed the family-wise alert threshold (bounded series: concept ×
    primary layer × model, never per layer). Answers not read against answers (too short,
    calibrating, flags off) are not observed: their numbers are in other units."""
    reading = verdict.reading
    if reading is None or verdict.status != "ok":
        return
    samples = [
        metrics.ScoreSample(
            concept_label(name), bank.auto_layers[name], float(reading.residual_z[k]), exceeded=bool(reading.alert[k])
        )
        for k, name in enumerate(bank.names)
    ]
    metrics.record_scores(runtime.host.model.fingerprint.model_id, samples)
    for flag in verdict.flags:
        metrics.record_flag(flag.kind, concept_label(bank.names[flag.concept]), runtime.host.model.fingerprint.model_id)


def concept_label(name: str) -> str:
    """The concept name without its `:vN` version suffix (bounded metric labels)."""
    return name.split(":v")[0]


def _rounded(value: float | None, digits: int = 5) -> float | None:
    return None if value is None else round(float(value), digits)


def headline(bank: ConceptBank, scores: RequestScores, verdict: Verdict | None = None) -> dict[str, dict[str, Any]]:
    """Per concept, the scores at its primary layer: what the API returns inline. `z` and
    `percentile` are read against ordinary answers of the same length (None when the answer was
    not: too short, calibrating, flags off); `neutral_z` / `neutral_percentile` against
    standalone neutral text, as `auditor probe` reads text."""
    reading = verdict.reading if verdict is not None else None
    out = {}
    for k, name in enumerate(bank.names):
        layer = bank.auto_layers[name]
        if layer not in bank.layers:
            continue
        row = scores.at(name, layer)
        out[name] = {
            "layer": layer,
            "mean": _rounded(row["mean"]),
            "max": _rounded(row["max"]),
            "last": _rounded(row["last"]),
            "z": _rounded(reading.residual_z[k]) if reading is not None else None,
            "percentile": _rounded(reading.percentile[k]) if reading is not None else None,
            "neutral_z": _rounded(row.get("z")),
            "neutral_percentile": _rounded(row.get("percentile")),
        }
    return out


def flag_body(name: str, kind: str, residual_z: float, text_z: float | None, threshold: float, reason: str) -> dict:
    return {
        "concept": name,
        "kind": kind,
        "residual_z": round(residual_z, 4),
        "text_z": None if text_z is None else round(text_z, 4),
        "threshold": round(threshold, 4),
        "reason": reason,
    }


def monitor_body(verdict: Verdict, null: LengthNull | None, n_tokens: int) -> dict[str, Any]:
    """How the answer was read: `status` ("ok", "insufficient_tokens", "calibrating", "off"),
    the reference its z is read against, and the thresholds that applied at its length."""
    body: dict[str, Any] = {
        "status": verdict.status,
        "tokens": n_tokens,
        "reference": "ordinary answers of the same length",
    }
    if null is not None:
        body.update(target_fpr=null.target_fpr, min_tokens=null.min_tokens)
    if verdict.reading is not None:
        body.update(
            read_at_length=verdict.reading.length_used,
            divergence_threshold=round(verdict.reading.divergence_threshold, 4),
            alert_threshold=round(verdict.reading.alert_threshold, 4),
        )
    return body


def answer_body(runtime: WorkerContext, bank: ConceptBank, scores: RequestScores, verdict: Verdict) -> dict[str, Any]:
    """The monitoring part of a fresh answer: scores, flags, alerts and how it was read."""
    names = bank.names
    return {
        "scores": headline(bank, scores, verdict),
        "flags": [
            flag_body(names[f.concept], f.kind, f.residual_z, f.text_z, f.threshold, f.reason) for f in verdict.flags
        ],
        "alerts": [
            flag_body(names[f.concept], f.kind, f.residual_z, f.text_z, f.threshold, f.reason) for f in verdict.alerts
        ],
        "monitor": monitor_body(verdict, runtime.fitted_null(bank), scores.aggregates.n_tokens),
    }


def store_verdict(session, *, request_id: str, bank: ConceptBank, verdict: Verdict) -> None:
    """Flags (hidden / surface) and alerts (kind `threshold`) as rows, each at its concept's
    primary layer with both signals and the threshold that applied."""
    for flag in [*verdict.flags, *verdict.alerts]:
        store.add_flag(
            session,
            request_id=request_id,
            concept_id=bank.concept_ids[flag.concept],
            layer=bank.auto_layers[bank.names[flag.concept]],
            kind=flag.kind,
            residual_signal=flag.residual_z,
            text_signal=flag.text_z,
            threshold=flag.threshold,
            reason=flag.reason,
        )


# ---- exactly once, across crashes and restarts ----
#
# A task can run more than once: Redis re-delivers it when its worker dies mid-task (acks are
# late) or holds it past the visibility timeout, and the API sends it again when Redis comes
# back without it (auditor.queue.dispatch). Each run takes the request's row lock (SELECT … FOR
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


def in_transaction(runtime: WorkerContext, work, what: str):
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
            log.warning(
                "database unavailable while %s, retrying in %.1fs: %s: %s", what, pause, type(exc).__name__, first_line
            )
            time.sleep(pause)
            pause = min(pause * 2, settings.db_retry_max_backoff)


def _display_names(concepts: list) -> dict[int, str]:
    """Concept id -> the name answers use: the bare name, or name:vN when several versions of
    it are present (as workers.serving.registry.bank_from_registry names them)."""
    return {
        c.id: c.name if sum(o.name == c.name for o in concepts) == 1 else f"{c.name}:v{c.version}" for c in concepts
    }


def recorded_generation(session, request, text: str | None = None) -> dict[str, Any]:
    """The answer of a finished request as recorded: what its first run returned (headline
    scores at each concept's primary layer, flags, alerts, how it was read). The text is the
    stored one in `full` privacy mode; under `hash` (none stored) and `redacted` (masked)
    `text`, a repeat run's own, stands in."""
    from sqlalchemy import select

    from auditor.db.models import Flag

    scores = store.scores_for_request(session, request_id=request.id)
    concepts = {s.concept_id: store.get_concept(session, concept_id=s.concept_id) for s in scores}
    names = _display_names([c for c in concepts.values() if c is not None])
    headline_scores = {}
    n_tokens = request.completion_tokens or 0
    for s in scores:
        concept = concepts.get(s.concept_id)
        if concept is None or s.layer != concept.primary_layer:
            continue
        n_tokens = s.n_tokens
        headline_scores[names[s.concept_id]] = {
            "layer": s.layer,
            "mean": _rounded(s.mean),
            "max": _rounded(s.max),
            "last": _rounded(s.last),
            "z": _rounded(s.answer_z),
            "percentile": _rounded(s.answer_percentile),
            "neutral_z": _rounded(s.calibrated_z),
            "neutral_percentile": _rounded(s.percentile),
        }
    rows = list(session.scalars(select(Flag).where(Flag.request_id == request.id).order_by(Flag.id)))
    bodies = [
        (
            f.kind,
            flag_body(
                names.get(f.concept_id, str(f.concept_id)),
                f.kind,
                f.residual_signal,
                f.text_signal,
                f.threshold,
                f.reason,
            ),
        )
        for f in rows
    ]
    return {
        "request_id": request.id,
        "status": "done",
        "text": request.completion_text
        if request.privacy_mode == "full" and request.completion_text is not None
        else text,
        "finish_reason": request.finish_reason,
        "prompt_tokens": request.prompt_tokens,
        "completion_tokens": request.completion_tokens,
        "scores": headline_scores,
        "flags": [body for kind, body in bodies if kind in ("hidden", "surface")],
        "alerts": [body for kind, body in bodies if kind == "threshold"],
        "monitor": {
            "status": request.monitor_status or "off",
            "tokens": n_tokens,
            "reference": "ordinary answers of the same length",
        },
    }


def serve_generation(request_id: str, payload: dict[str, Any], runtime: WorkerContext | None = None) -> dict[str, Any]:
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
    model_id = runtime.host.model.fingerprint.model_id
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
        store.insert_scores_copy(
            session,
            request_id=request_id,
            rows=score_rows(bank, served.scores, served.verdict, runtime.settings.store_traces),
        )
        store.mark_request(
            session,
            request_id=request_id,
            status="done",
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
        "done",
        model_id,
        time.time() - queued_at.timestamp(),
        len(generation.prompt_ids),
        len(generation.output_ids),
    )
    record_metrics(runtime, bank, served.verdict)
    return {
        "request_id": request_id,
        "status": "done",
        "text": served.text,
        "finish_reason": finish,
        "prompt_tokens": len(generation.prompt_ids),
        "completion_tokens": len(generation.output_ids),
        **answer_body(runtime, bank, served.scores, served.verdict),
    }


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
    fingerprint = runtime.host.model.fingerprint

    def record(session) -> list[tuple[str, Any]]:
        written = []  # (status, outcome) of the items this run recorded
        for (request_id, item), outcome in zip(pending, outcomes):
            row = store.get_request(session, request_id=request_id, for_update=True)
            if row is None or row.status == "done":  # another run recorded it first
                continue
            if isinstance(outcome, Exception):
                error = privacy.scrub(
                    f"{type(outcome).__name__}: {outcome}", row.privacy_mode, privacy.request_texts(item)
                )
                store.mark_request(session, request_id=request_id, status="failed", error=error[:2000])
                written.append(("failed", outcome))
                continue
            store.insert_scores_copy(
                session,
                request_id=request_id,
                rows=score_rows(outcome.bank, outcome.scores, outcome.verdict, runtime.settings.store_traces),
            )
            store.mark_request(
                session,
                request_id=request_id,
                status="done",
                completion_text=item["completion"],
                model_id=fingerprint.model_id,
                model_fingerprint=fingerprint.hash,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                monitor_status=outcome.verdict.status,
            )
            store_verdict(session, request_id=request_id, bank=outcome.bank, verdict=outcome.verdict)
            written.append(("done", outcome))
        return written

    for status, outcome in in_transaction(runtime, record, f"recording audit {request_ids[0]}"):
        if status == "failed":
            metrics.record_request("audit", "failed", fingerprint.model_id)
            continue
        metrics.record_request(
            "audit", "done", fingerprint.model_id, None, outcome.prompt_tokens, outcome.completion_tokens
        )
        record_metrics(runtime, outcome.bank, outcome.verdict)
    failed = sum(isinstance(o, Exception) for o in outcomes)
    return {"request_ids": request_ids, "status": "done" if not failed else f"{failed} failed"}


# ---- admin jobs: extraction from pairs, calibration ----


def _run_job(job_id: str, runtime: WorkerContext, work) -> dict[str, Any]:
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


def serve_extraction(job_id: str, runtime: WorkerContext | None = None) -> dict[str, Any]:
    """Extract a concept from the job's contrastive pairs at every layer, sweep for the primary
    layer, and register it as the concept's next version. The same pairs, method and pooling
    already registered on this model are reused, not registered twice."""
    runtime = runtime or get_runtime()

    def work(session, payload: dict) -> dict[str, Any]:
        definition = concept_from_dict(payload["concept"], origin="job")
        method, pooling = payload["method"], payload["pooling"]
        concept = find_extracted(session, runtime.host, definition, method, pooling)
        reused = concept is not None
        if concept is None:
            vectors = runtime.host.vectors(definition, method, pooling)
            concept = register_extracted(
                session,
                runtime.host,
                definition,
                vectors,
                created_by=payload.get("created_by", "api"),
                activate=payload.get("activate", True),
            )
            audit_log.record(
                session,
                actor=payload.get("created_by"),
                action="concept.register",
                target=f"concept:{concept.name}:v{concept.version}",
                vector_hash=concept.vector_hash,
                details={"concept_id": concept.id, "source": "pairs", "job_id": job_id},
            )
        sweep = {row["layer"]: row for row in concept.provenance.get("sweep", [])}
        return {
            "concept_id": concept.id,
            "name": concept.name,
            "version": concept.version,
            "primary_layer": concept.primary_layer,
            "n_pairs": concept.n_pairs,
            "reused": reused,
            "held_out_auroc": sweep.get(concept.primary_layer, {}).get("auroc"),
        }

    return _run_job(job_id, runtime, work)


def serve_calibration(job_id: str, runtime: WorkerContext | None = None) -> dict[str, Any]:
    """Recalibrate every active concept: the neutral-text calibration (standalone text, every
    layer) and the null of ordinary answers, from the control prompts or (`source: traffic`) from
    the deployment's own answers recorded in [since, until). Workers pick the new calibration up
    on their next request."""
    runtime = runtime or get_runtime()

    def work(session, payload: dict) -> dict[str, Any]:
        bank = bank_from_registry(session, runtime.host)
        target_fpr = float(payload.get("target_fpr") or runtime.settings.target_fpr)
        rows = runtime._calibrate(session, bank, target_fpr)
        window = None
        if payload.get("source") == "traffic":
            window = (datetime.fromisoformat(payload["since"]), datetime.fromisoformat(payload["until"]))
            null = runtime.fit_traffic_null(session, bank, target_fpr, *window)
        else:
            null = runtime.fit_control_null(bank, target_fpr)
        model = runtime.host.model
        summary = null.summary()
        row = store.add_answer_calibration(
            session,
            bank_key=bank_key(model, bank),
            model_fingerprint=model.fingerprint.hash,
            concept_ids=bank.concept_ids or [],
            source=payload.get("source", "control"),
            null=null_to_dict(null),
            summary=summary,
            window_start=window[0] if window else None,
            window_end=window[1] if window else None,
        )
        thresholds, achieved = fpr_thresholds(bank.calibration, target_fpr)
        concepts = {}
        for k, name in enumerate(bank.names):
            layer = bank.auto_layers[name]
            if layer in bank.layers:
                li = bank.layers.index(layer)
                concepts[name] = {
                    "concept_id": bank.concept_ids[k],
                    "layer": layer,
                    "neutral_threshold": float(thresholds[li, k]),
                    "neutral_achieved_fpr": float(achieved[li, k]),
                }
        return {
            "rows": rows,
            "target_fpr": target_fpr,
            "n_reference": bank.calibration.n_reference,
            "answer_calibration_id": row.id,
            "source": row.source,
            **summary,
            "concepts": concepts,
        }

    return _run_job(job_id, runtime, work)
