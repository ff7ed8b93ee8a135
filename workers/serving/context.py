"""The worker's process-wide state: one `WorkerContext` per process, built lazily on first use.

It holds the model host, a database session factory, the model thread, the calibrated bank of
registered concepts (rebuilt when the registry changes), the null of ordinary answers, and the
drift exporter. `get_runtime` builds the process's one on first use (inside a task, never in a
prefork parent); `heartbeat` is the slot an `auditor worker` process keeps its heartbeat
publisher in (workers.tasks).
"""

from __future__ import annotations

import logging
import math
import threading
from datetime import timedelta
from functools import cached_property

from auditor.db import store
from auditor.db.engine import database_url, make_engine, session_factory, writer_engine
from auditor.db.enums import CalibrationSource
from auditor.errors import InvalidInputError
from auditor.queue.streams import StreamPublisher, redis_streams
from auditor.settings import Settings, get_settings
from auditor.telemetry.drift_export import DriftExporter
from probes.answer_null import LengthNull, certifiable, minimum_answers, null_from_dict, null_to_dict
from probes.concepts import builtin_concepts, load_concept, load_control_set
from workers.monitoring.concepts import ConceptBank, calibrate_bank, calibration_texts
from workers.monitoring.control import answer_traces, bank_key, control_answers
from workers.serving.host import ModelHost, SteerRequest
from workers.serving.model_thread import ModelThread
from workers.serving.registry import (
    active_concept_ids,
    bank_from_registry,
    load_stored_calibration,
    reference_hash,
    register_builtin_concepts,
    save_calibration,
)
from workers.serving.traffic import traffic_answers
from workers.serving.transactions import retryable
from workers.serving.warmup import StepProgress, WarmUpState

log = logging.getLogger(__name__)


class WorkerContext:
    """Everything a worker process serves with. Methods marked "model thread only" use the
    model and run on `model_thread`; the rest may be called from any thread."""

    def __init__(
        self, settings: Settings, progress: StepProgress | None = None, streams: StreamPublisher | None = None
    ):
        self.settings = settings
        # Where streamed requests' tokens go: given (in-process), or the broker's Redis.
        self.streams = streams if streams is not None else redis_streams(settings)
        self.state = WarmUpState()  # what readiness reports while the model loads and calibrates
        self.progress = self.state.progress(progress)
        self.host = ModelHost(settings)  # the model, its concept vectors and steering
        self.sessions = session_factory(writer_engine(make_engine(database_url(settings))))
        # The only thread that touches the model; it batches what arrives together.
        self.model_thread = ModelThread(self, settings.batch_max_size, settings.batch_wait_ms / 1000)
        self._bank: ConceptBank | None = None
        self._calibration_id: int | None = None
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
        `workers.serving.transactions.in_transaction` until the database returns."""
        if self._bank is None:
            return self._fresh_bank()
        try:
            return self._fresh_bank()
        except Exception as exc:
            if not retryable(exc):
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
                    self.calibrate(session, bank)
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
                    source=CalibrationSource.CONTROL,
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
        if row.source == CalibrationSource.CONTROL:
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

    def calibrate(self, session, bank: ConceptBank, target_fpr: float | None = None) -> int:
        """(Model thread only.) `bank`'s calibration on standalone neutral text at every layer,
        saved in `session` and committed; returns the number of rows written."""
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
            _runtime = WorkerContext(settings or get_settings())
        return _runtime


def current_runtime() -> WorkerContext | None:
    """The process's runtime if one was built; never builds one (shutdown hooks ask)."""
    return _runtime
