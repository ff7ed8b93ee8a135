"""Drift on live traffic, exported for alerting: every `interval`, each active concept's recent
scores (the last `recent`) against the `baseline` window just before them, at its primary layer,
as `auditor_drift_psi` (deploy/prometheus/rules.yml alerts on it). The statistics are the audit
report's (auditor.reports: PSI and KS on raw scores, so a recalibration is not mistaken for
drift)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from auditor.db.labels import display_labels
from auditor.db.models import utcnow
from auditor.reports.aggregate import DriftRow
from auditor.reports.queries import resolve_concepts
from auditor.reports.report import drift_section
from auditor.reports.window import Window
from auditor.telemetry import metrics

log = logging.getLogger(__name__)


class DriftExporter:
    def __init__(self, sessions, model_id: str, recent: timedelta, baseline: timedelta, interval: float):
        self.sessions, self.model_id = sessions, model_id
        self.recent, self.baseline, self.interval = recent, baseline, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self, now: datetime | None = None) -> list[DriftRow]:
        now = now or utcnow()
        window = Window(now - self.recent, now)
        baseline = Window(window.start - self.baseline, window.start)
        with self.sessions() as session:
            refs = resolve_concepts(session, names=None, windows=[window])
            rows = drift_section(session, refs=refs, window=window, baseline=baseline)
        labels = display_labels(_Named(row.concept, row.version) for row in rows)
        for row, label in zip(rows, labels):
            if row.psi is not None:
                metrics.set_drift(label, row.layer, self.model_id, row.psi)
        return rows

    def start(self) -> None:
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="auditor-drift", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:  # a failed pass is logged and retried next interval
                log.exception("drift export failed")


@dataclass(frozen=True)
class _Named:
    name: str
    version: int
