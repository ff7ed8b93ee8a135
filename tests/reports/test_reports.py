"""Audit reports on real Postgres and on SQLite: seeded traffic over a baseline and a recent window
(one concept shifted in the recent one), flags, two serving models, two versions of one concept,
every privacy mode. Values are checked against what was seeded; the API over real HTTP, the CLI
as a subprocess, and the HTML page rendered by headless Chromium. No model is loaded."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest

from auditor.api.main import create_app
from auditor.db import store
from auditor.db.engine import make_engine, run_migrations, session_factory
from auditor.errors import InvalidInputError, NotFoundError, WindowError
from auditor.reports import Report, build_report
from auditor.reports.aggregate import DRIFT_P_VALUE, ConceptSummary, DriftRow
from auditor.reports.html import to_html
from auditor.reports.queries import ComparisonRow, FlaggedRequest
from auditor.reports.render import SECTIONS, TEXT_SNIPPET, rows_to_csv, to_csv, to_json, to_text
from auditor.reports.window import Window, baseline_window, choose_bucket, report_window
from auditor.settings import Settings
from probes.drift import ks_two_sample, population_stability_index
from support.auth import bearer, issue_token
from support.databases import Databases, _postgres_reachable
from support.http_server import serving

UTC = UTC
BASELINE = Window(datetime(2025, 5, 25, tzinfo=UTC), datetime(2025, 5, 28, tzinfo=UTC))
RECENT = Window(datetime(2025, 5, 28, tzinfo=UTC), datetime(2025, 5, 31, tzinfo=UTC))
MODEL_A, MODEL_B = "org/model-a", "org/model-b"
FINGERPRINT = {MODEL_A: "aa" * 32, MODEL_B: "bb" * 32}
N_MODEL_A, N_MODEL_B = 480, 120  # requests per window
D_MODEL, N_LAYERS = 8, 30
THRESHOLD = 0.07  # pessimism v1's calibrated alert threshold, raw scale (z = 2 below)
UNCALIBRATED = 6  # model B's first recent requests are stored without a z-score
LEGACY_HASH_ROW = "recent-a-010"  # a flagged hash-mode request whose row still holds its prompt text
LEGACY_REDACTED_ROW = "recent-a-020"  # a flagged redacted-mode request whose row holds its raw prompt

# The seeded concept versions: (name, version) -> (model, primary layer, layers with a vector).
PESSIMISM_V1, PESSIMISM_V2, FORMALITY = ("pessimism", 1), ("pessimism", 2), ("formality", 1)
IDLE = ("idle", 1)  # active, never scored: listed with no data
CONCEPTS = {
    PESSIMISM_V1: (MODEL_A, 15, [14, 15]),
    PESSIMISM_V2: (MODEL_A, 12, [12]),
    FORMALITY: (MODEL_B, 3, [3]),
    IDLE: (MODEL_A, 5, [5]),
}


def raw_score(z: float) -> float:
    return 0.05 + 0.01 * z


@dataclass
class Seeded:
    """What was written, so tests can compute every expected value themselves."""

    url: str
    requests: dict[str, dict] = field(default_factory=dict)  # id -> window, model, mode, texts, time
    z: dict[tuple[str, int], dict[str, float | None]] = field(default_factory=dict)  # concept -> id -> z
    flags: list[dict] = field(default_factory=list)
    concept_ids: dict[tuple[str, int], int] = field(default_factory=dict)

    def ids_in(self, window: str, concept: tuple[str, int]) -> list[str]:
        return [rid for rid in self.z[concept] if self.requests[rid]["window"] == window]

    def z_values(self, window: str, concept: tuple[str, int]) -> np.ndarray:
        values = [self.z[concept][rid] for rid in self.ids_in(window, concept)]
        return np.array([v for v in values if v is not None])

    def raw_values(self, window: str, concept: tuple[str, int]) -> np.ndarray:
        ids = self.ids_in(window, concept)
        return np.array([self.requests[rid]["raw"][concept] for rid in ids])

    def flagged_ids(self, window: str, concept: tuple[str, int], kind: str | None = None) -> set[str]:
        return {
            f["request_id"] for f in self.flags
            if f["concept"] == concept and self.requests[f["request_id"]]["window"] == window
            and kind in (None, f["kind"])
        }  # fmt: skip

    def hidden_texts(self) -> list[str]:
        """Texts of hash- and redacted-mode requests, and the email addresses planted in them: no
        report may ever show them (a redacted one shows its text with [EMAIL] instead)."""
        return [
            text for r in self.requests.values() if r["mode"] != "full"
            for text in (r["prompt"], r["completion"], r["email"])
        ]  # fmt: skip


def _register_concepts(session, seeded: Seeded) -> None:
    rng = np.random.default_rng(0)
    for (name, _version), (model, primary, layers) in CONCEPTS.items():
        concept = store.add_concept_version(
            session, name=name, vectors={layer: rng.normal(size=D_MODEL) for layer in layers},
            primary_layer=primary, created_by="test", model_id=model, model_fingerprint=FINGERPRINT[model],
            loader="test", hook_point="blocks.{layer}.hook_resid_post", d_model=D_MODEL,
            n_layers_model=N_LAYERS, method="mean_diff", pooling="mean", source="pairs",
        )  # fmt: skip
        seeded.concept_ids[(concept.name, concept.version)] = concept.id
    retired = store.add_concept_version(
        session, name="retired_thing", vectors={1: rng.normal(size=D_MODEL)}, primary_layer=1,
        created_by="test", model_id=MODEL_A, model_fingerprint=FINGERPRINT[MODEL_A], loader="test",
        hook_point="blocks.{layer}.hook_resid_post", d_model=D_MODEL, n_layers_model=N_LAYERS,
        method="mean_diff", pooling="mean", source="pairs",
    )  # fmt: skip
    store.retire_concept(session, concept_id=retired.id)
    p1 = seeded.concept_ids[PESSIMISM_V1]
    # An older calibration with another threshold: the report must use the newest.
    store.add_calibration(session, concept_id=p1, layer=15, mean=0.05, std=0.01, reference=[0.05] * 4, threshold=0.5)
    store.add_calibration(
        session,
        concept_id=p1,
        layer=15,
        mean=0.05,
        std=0.01,
        reference=[0.05] * 4,
        threshold=THRESHOLD,
        target_fpr=0.02,
    )


def _score_rows(seeded: Seeded, request_id: str, scores: dict[tuple[str, int], float | None]) -> list[dict]:
    rows = []
    for concept, z in scores.items():
        raw = raw_score(0.0 if z is None else z)
        seeded.z.setdefault(concept, {})[request_id] = z
        seeded.requests[request_id].setdefault("raw", {})[concept] = raw
        _model, primary, layers = CONCEPTS[concept]
        for layer in layers:
            # Off the primary layer an absurd value: any report that reads it is visibly wrong.
            value = raw if layer == primary else 5.0
            rows.append(
                {
                    "concept_id": seeded.concept_ids[concept],
                    "layer": layer,
                    "mean": value,
                    "max": value,
                    "last": value,
                    "answer_z": z if layer == primary else None,
                    # The neutral-text z is another scale: reports must not read it.
                    "calibrated_z": 99.0,
                    "percentile": None,
                    "n_tokens": 7,
                }
            )
    return rows


def _flag(session, seeded: Seeded, request_id: str, concept, kind: str, layer: int, residual: float) -> None:
    store.add_flag(
        session,
        request_id=request_id,
        concept_id=seeded.concept_ids[concept],
        layer=layer,
        kind=kind,
        residual_signal=residual,
        threshold=THRESHOLD,
        text_signal=0.1,
        reason=f"seeded {kind}",
    )
    seeded.flags.append(
        {"request_id": request_id, "concept": concept, "kind": kind, "margin": abs(residual - THRESHOLD)}
    )


def _seed_request(
    session, seeded: Seeded, *, request_id: str, window_name: str, model: str, created_at: datetime, index: int
) -> None:
    mode = ("full", "hash", "redacted")[index % 3]
    email = f"{request_id}@example.com"
    prompt, completion = f"prompt secret {request_id} mail {email}", f"completion secret {request_id} to {email}"
    row = store.create_request(
        session,
        request_id=request_id,
        kind="chat",
        prompt_text=prompt,
        privacy_mode=mode,
        model_id=model,
        model_fingerprint=FINGERPRINT[model],
        created_at=created_at,
    )
    if request_id in (LEGACY_HASH_ROW, LEGACY_REDACTED_ROW):
        row.prompt_text = prompt  # as if written in full mode before the mode changed
    store.mark_request(session, request_id=request_id, status="running")
    store.mark_request(session, request_id=request_id, status="done", completion_text=completion)
    seeded.requests[request_id] = {
        "window": window_name,
        "model": model,
        "mode": mode,
        "prompt": prompt,
        "completion": completion,
        "email": email,
        "created_at": created_at,
    }


def _seed_traffic(session, seeded: Seeded) -> None:
    rng = np.random.default_rng(7)
    for window_name, window in (("baseline", BASELINE), ("recent", RECENT)):
        shift = 1.0 if window_name == "recent" else 0.0  # only pessimism v2 moves
        for model, n in ((MODEL_A, N_MODEL_A), (MODEL_B, N_MODEL_B)):
            step = window.duration / n  # the first request sits exactly on the window's start
            for i in range(n):
                request_id = f"{window_name}-{model[-1]}-{i:03d}"
                _seed_request(
                    session,
                    seeded,
                    request_id=request_id,
                    window_name=window_name,
                    model=model,
                    created_at=window.start + i * step,
                    index=i,
                )
                if model == MODEL_A:
                    z1, z2 = float(rng.normal()), float(rng.normal(loc=shift))
                    scores = {PESSIMISM_V1: z1, PESSIMISM_V2: z2}
                    if z1 > 1.5:
                        _flag(session, seeded, request_id, PESSIMISM_V1, "hidden", 15, raw_score(z1))
                    if i % 10 == 0:  # text shows the concept, the residual far less: margins vary
                        _flag(session, seeded, request_id, PESSIMISM_V1, "surface", 14, 0.5 * raw_score(z1))
                else:
                    z = float(rng.normal())
                    uncalibrated = window_name == "recent" and i < UNCALIBRATED
                    scores = {FORMALITY: None if uncalibrated else z}
                    if z > 2.0:
                        _flag(session, seeded, request_id, FORMALITY, "threshold", 3, raw_score(z))
                store.insert_scores(session, request_id=request_id, rows=_score_rows(seeded, request_id, scores))


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def seeded(request, tmp_path_factory) -> Iterator[Seeded]:
    if request.param == "postgres" and (reason := _postgres_reachable()):
        pytest.skip(reason)
    databases = Databases(request.param, tmp_path_factory.mktemp(f"reports-{request.param}"))
    url = databases.new_url()
    run_migrations(url)
    engine = make_engine(url)
    result = Seeded(url)
    with session_factory(engine)() as session:
        _register_concepts(session, result)
        _seed_traffic(session, result)
        session.commit()
    engine.dispose()
    yield result
    databases.drop_all()


@pytest.fixture(scope="module")
def report(seeded) -> Report:
    engine = make_engine(seeded.url)
    with session_factory(engine)() as session:
        built = build_report(session, RECENT.start, RECENT.end, BASELINE.start, BASELINE.end, top=1000)
    engine.dispose()
    return built


def by_label(rows) -> dict[tuple[str, int], object]:
    return {(row.concept, row.version): row for row in rows}


# ---- values equal to what was seeded ----


def test_the_report_covers_active_and_scored_concept_versions(report):
    assert [(ref.concept, ref.version) for ref in report.concepts] == [FORMALITY, IDLE, PESSIMISM_V1, PESSIMISM_V2]
    assert report.bucket == "hour"  # a 3-day window


def test_summary_counts_and_means_equal_the_seeded_values(report, seeded):
    summary = by_label(report.summary)
    for concept in (PESSIMISM_V1, PESSIMISM_V2, FORMALITY):
        row, z = summary[concept], seeded.z_values("recent", concept)
        assert row.requests == len(seeded.ids_in("recent", concept))
        assert row.layer == CONCEPTS[concept][1]
        assert row.mean_z == pytest.approx(z.mean(), abs=1e-12)
        assert row.p50_z == pytest.approx(np.percentile(z, 50), abs=1e-12)
        assert row.p95_z == pytest.approx(np.percentile(z, 95), abs=1e-12)
        assert row.flagged == len(seeded.flagged_ids("recent", concept))
        assert row.flagged_rate == pytest.approx(row.flagged / row.requests)
    assert summary[PESSIMISM_V1].requests == N_MODEL_A and summary[FORMALITY].requests == N_MODEL_B
    # Uncalibrated rows count as requests but not in the z statistics.
    assert len(seeded.z_values("recent", FORMALITY)) == N_MODEL_B - UNCALIBRATED
    # Alerts: the share of requests that crossed the concept's alert (its `threshold` flags); the
    # threshold itself depends on each answer's length, so there is no single one to show.
    p1 = summary[PESSIMISM_V1]
    assert p1.threshold is None and p1.above_threshold_rate == 0.0
    formality = summary[FORMALITY]
    alerted = seeded.flagged_ids("recent", FORMALITY, "threshold")
    assert alerted and formality.above_threshold_rate == pytest.approx(len(alerted) / formality.requests)
    # A request flagged both hidden and surface counts once in the total, once per kind.
    hidden, surface = (seeded.flagged_ids("recent", PESSIMISM_V1, kind) for kind in ("hidden", "surface"))
    assert hidden & surface, "the seed should include a request flagged twice"
    assert p1.flagged_by_kind == {"hidden": len(hidden), "surface": len(surface), "threshold": 0, "drift": 0}
    assert p1.flagged == len(hidden | surface)
    idle = summary[IDLE]
    assert (idle.requests, idle.mean_z, idle.flagged_rate) == (0, None, None)


def test_drift_flags_the_shifted_concept_and_not_the_stable_ones(report, seeded):
    drift = by_label(report.drift)
    assert drift[PESSIMISM_V2].status == "drift"
    assert drift[PESSIMISM_V1].status == "stable" and drift[FORMALITY].status == "stable"
    assert drift[IDLE].status == "insufficient data" and drift[IDLE].psi is None
    for concept in (PESSIMISM_V1, PESSIMISM_V2, FORMALITY):
        old, new = seeded.raw_values("baseline", concept), seeded.raw_values("recent", concept)
        row = drift[concept]
        assert (row.baseline_requests, row.recent_requests) == (old.size, new.size)
        assert row.psi == pytest.approx(population_stability_index(old, new), abs=1e-12)
        assert (row.ks_statistic, row.p_value) == pytest.approx(ks_two_sample(old, new), abs=1e-12)
    assert drift[PESSIMISM_V2].psi > 0.5 and drift[PESSIMISM_V2].p_value < 1e-10  # a 1 sd shift
    # Stable: the KS test finds no move beyond chance. (PSI alone would not do: with 10 bins its
    # null mean is (10 − 1)(1/n + 1/m), 0.15 for formality's 120 + 120 scores — above 0.1.)
    for stable in (PESSIMISM_V1, FORMALITY):
        assert drift[stable].p_value > DRIFT_P_VALUE


def test_comparison_groups_by_serving_model_and_concept_version(report, seeded):
    rows = {(r.model_id, r.concept, r.version): r for r in report.comparison}
    assert set(rows) == {(MODEL_A, "pessimism", 1), (MODEL_A, "pessimism", 2), (MODEL_B, "formality", 1)}
    for (_model, name, version), row in rows.items():
        concept = (name, version)
        assert row.requests == len(seeded.ids_in("recent", concept))
        assert row.mean_z == pytest.approx(seeded.z_values("recent", concept).mean(), abs=1e-9)
        assert row.mean_score == pytest.approx(seeded.raw_values("recent", concept).mean(), abs=1e-12)
        assert row.flagged == len(seeded.flagged_ids("recent", concept))


def test_time_series_buckets_partition_the_window(report, seeded):
    for concept in (PESSIMISM_V1, FORMALITY):
        points = [p for p in report.series if (p.concept, p.version) == concept]
        assert all(p.bucket_start.minute == 0 and RECENT.start <= p.bucket_start < RECENT.end for p in points)
        assert sum(p.requests for p in points) == len(seeded.ids_in("recent", concept))
        assert sum(p.flagged for p in points) == len(seeded.flagged_ids("recent", concept))
        first_hour = [
            rid
            for rid in seeded.ids_in("recent", concept)
            if seeded.requests[rid]["created_at"] < RECENT.start + timedelta(hours=1)
        ]
        assert points[0].bucket_start == RECENT.start and points[0].requests == len(first_hour)


def strongest_flags(seeded: Seeded, concept) -> dict[str, dict]:
    """request id -> its flag furthest from the threshold, for the recent window."""
    strongest: dict[str, dict] = {}
    for flag in seeded.flags:
        rid = flag["request_id"]
        recent = flag["concept"] == concept and seeded.requests[rid]["window"] == "recent"
        if recent and (rid not in strongest or flag["margin"] > strongest[rid]["margin"]):
            strongest[rid] = flag
    return strongest


def test_top_flagged_lists_each_request_once_strongest_first(seeded, report):
    engine = make_engine(seeded.url)
    with session_factory(engine)() as session:
        top = build_report(
            session, RECENT.start, RECENT.end, BASELINE.start, BASELINE.end, concepts=["pessimism"], top=5
        ).flagged
    engine.dispose()
    strongest = strongest_flags(seeded, PESSIMISM_V1)
    expected = sorted(strongest, key=lambda rid: strongest[rid]["margin"], reverse=True)[:5]
    assert [(r.concept, r.version) for r in top] == [PESSIMISM_V1] * 5
    assert [r.rank for r in top] == [1, 2, 3, 4, 5]
    assert [r.request_id for r in top] == expected
    # With every flagged request listed: each once, with the kind and margin of its strongest flag.
    listed = [r for r in report.flagged if (r.concept, r.version) == PESSIMISM_V1]
    assert sorted(r.request_id for r in listed) == sorted(strongest)
    for row in listed:
        assert (row.kind, row.margin) == (
            strongest[row.request_id]["kind"],
            pytest.approx(strongest[row.request_id]["margin"]),
        )


def test_flagged_requests_show_only_what_their_privacy_mode_stored(report, seeded):
    assert {r.privacy_mode for r in report.flagged} == {"full", "hash", "redacted"}
    assert {LEGACY_HASH_ROW, LEGACY_REDACTED_ROW} <= {r.request_id for r in report.flagged}
    for row in report.flagged:
        stored = seeded.requests[row.request_id]
        if row.privacy_mode == "full":
            assert (row.prompt, row.completion) == (stored["prompt"], stored["completion"])
        elif row.privacy_mode == "hash":
            assert row.prompt == "sha256:" + hashlib.sha256(stored["prompt"].encode()).hexdigest()
            assert row.completion == "sha256:" + hashlib.sha256(stored["completion"].encode()).hexdigest()
        else:  # personal data masked, the rest kept
            assert row.prompt == f"prompt secret {row.request_id} mail [EMAIL]"
            assert row.completion == f"completion secret {row.request_id} to [EMAIL]"


def test_no_output_format_reveals_text_of_hash_or_redacted_requests(report, seeded):
    outputs = [to_json(report), to_html(report), to_text(report, width=400)]
    outputs += [to_csv(report, section) for section in SECTIONS]
    flagged_csv = to_csv(report, "flagged")
    assert "sha256:" in flagged_csv and "prompt secret recent-a-000" in flagged_csv  # full mode shows text
    hidden = seeded.hidden_texts()
    assert len(hidden) > 100
    for output in outputs:
        assert not [text for text in hidden if text in output]


def test_csv_and_json_carry_the_same_numbers(report):
    records = list(csv.DictReader(io.StringIO(to_csv(report, "summary"))))
    document = json.loads(to_json(report))
    assert len(records) == len(document["summary"]) == len(report.summary)
    for record, row, item in zip(records, report.summary, document["summary"]):
        assert int(record["requests"]) == row.requests == item["requests"]
        assert int(record["flagged_by_kind.hidden"]) == row.flagged_by_kind["hidden"]
        if row.mean_z is not None:
            assert float(record["mean_z"]) == pytest.approx(row.mean_z) and item["mean_z"] == pytest.approx(row.mean_z)
        else:
            assert record["mean_z"] == "" and item["mean_z"] is None
    assert document["window"] == {"start": RECENT.start.isoformat(), "end": RECENT.end.isoformat()}


def test_csv_text_cannot_run_as_a_spreadsheet_formula():
    @dataclass
    class Row:
        prompt: str
        score: float

    rows = [Row('=HYPERLINK("http://evil.example","x")', -0.5), Row("@SUM(A1)", 0.25), Row("fine", 1.0)]
    records = list(csv.DictReader(io.StringIO(rows_to_csv(Row, rows))))
    assert [r["prompt"] for r in records] == ['\'=HYPERLINK("http://evil.example","x")', "'@SUM(A1)", "fine"]
    assert [float(r["score"]) for r in records] == [-0.5, 0.25, 1.0]


# Prompt text is the requester's: rich markup, ANSI colour, a terminal bell, a C1 CSI (\x9b) and a
# bidi override (it reorders what a terminal shows) are data to the operator, never instructions.
HOSTILE = "[/x] [bold]red[/bold] \x1b[31mansi\x1b[0m bell\x07 csi\x9b2J rtl\u202eevil"
HOSTILE_SHOWN = r"[/x] [bold]red[/bold] \x1b[31mansi\x1b[0m bell\x07 csi\x9b2J rtl\u202eevil"
RAW_CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e")


def hostile_report() -> Report:
    """Every text a table shows carries HOSTILE: concept, model, request id, kind, privacy mode,
    status, prompt and completion (a concept or model name is admin input; a prompt anyone's)."""
    name, model = f"c{HOSTILE}", f"m{HOSTILE}"
    summary = ConceptSummary(
        concept=name, version=1, concept_id=1, layer=3, model_id=model, requests=1, mean_z=None, p50_z=None,
        p95_z=None, threshold=None, above_threshold_rate=None, flagged=1, flagged_rate=1.0,
        flagged_by_kind={HOSTILE: 1},
    )  # fmt: skip
    drift = DriftRow(
        concept=name, version=1, concept_id=1, layer=3, baseline_requests=0, recent_requests=1,
        baseline_mean_score=None, recent_mean_score=0.1, psi=None, ks_statistic=None, p_value=None, status=HOSTILE,
    )  # fmt: skip
    comparison = ComparisonRow(
        model_id=model, concept=name, version=1, concept_id=1, requests=1, mean_z=None, mean_score=0.1,
        flagged=1, flagged_rate=1.0,
    )  # fmt: skip
    flagged = FlaggedRequest(
        concept=name, version=1, concept_id=1, rank=1, request_id=HOSTILE, created_at=RECENT.start,
        model_id=model, kind=HOSTILE, layer=3, residual_signal=5.0, text_signal=None, threshold=2.0, margin=3.0,
        reason=HOSTILE, privacy_mode=HOSTILE, prompt=HOSTILE, completion=f"={HOSTILE}",
    )  # fmt: skip
    return Report(
        window=RECENT, baseline=BASELINE, bucket="day", generated_at=RECENT.end, concepts=[], summary=[summary],
        drift=[drift], comparison=[comparison], flagged=[flagged], series=[], baseline_scores={}, recent_scores={},
    )  # fmt: skip


def test_text_table_shows_markup_literally_and_control_characters_escaped():
    text = to_text(hostile_report(), width=2000)  # wide enough that no cell wraps
    for raw in RAW_CONTROLS:
        assert raw not in text
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", text)
    lines = text.splitlines()
    # Each table shows the text whole and literal: brackets kept, "[bold]" not eaten as a style.
    cells = [c.strip() for line in lines for c in line.split("│")]
    assert f"c{HOSTILE_SHOWN} v1" in cells  # concept, in all four tables
    assert sum(c == f"c{HOSTILE_SHOWN} v1" for c in cells) == 4
    assert f"m{HOSTILE_SHOWN}" in cells and HOSTILE_SHOWN in cells  # model; request id, kind, privacy
    assert f"{HOSTILE_SHOWN} 1" in cells  # flags by kind
    # The prompt and completion are cut to a snippet, after the escaping: it is what is shown.
    snippet = HOSTILE_SHOWN[: TEXT_SNIPPET - 1] + "…"
    assert snippet in cells and f"={HOSTILE_SHOWN}"[: TEXT_SNIPPET - 1] + "…" in cells


def test_csv_cells_carry_control_characters_escaped_and_keep_line_breaks():
    records = list(csv.DictReader(io.StringIO(to_csv(hostile_report(), "flagged"))))
    assert [(r["prompt"], r["completion"], r["reason"]) for r in records] == [
        (HOSTILE_SHOWN, f"'={HOSTILE_SHOWN}", HOSTILE_SHOWN)
    ]
    assert records[0]["concept"] == f"c{HOSTILE_SHOWN}"

    @dataclass
    class Row:
        prompt: str

    # Tabs and line breaks are ordinary text in a quoted CSV cell; a control byte first is no formula.
    rows = [Row("two\nlines\tand a tab"), Row("\x1b=1+1")]
    records = list(csv.DictReader(io.StringIO(rows_to_csv(Row, rows))))
    assert [r["prompt"] for r in records] == ["two\nlines\tand a tab", r"\x1b=1+1"]


def test_an_empty_window_still_renders_every_format(seeded):
    engine = make_engine(seeded.url)
    with session_factory(engine)() as session:
        empty = build_report(
            session,
            datetime(2020, 1, 2, tzinfo=UTC),
            datetime(2020, 1, 3, tzinfo=UTC),
            datetime(2020, 1, 1, tzinfo=UTC),
            datetime(2020, 1, 2, tzinfo=UTC),
        )
    engine.dispose()
    # Active versions are listed with no data; the retired one, unscored here, is not.
    assert [(row.concept, row.version, row.requests) for row in empty.summary] == [
        (*FORMALITY, 0),
        (*IDLE, 0),
        (*PESSIMISM_V1, 0),
        (*PESSIMISM_V2, 0),
    ]
    assert {row.status for row in empty.drift} == {"insufficient data"}
    assert empty.series == empty.flagged == empty.comparison == []
    page = to_html(empty)
    assert page.count('<figure class="plot"') == 3 and "none in this window" in page
    assert to_csv(empty, "flagged").startswith("concept,version,concept_id,rank,request_id,")
    assert json.loads(to_json(empty))["series"] == []
    assert "insufficient data" in to_text(empty)


def test_an_unknown_concept_is_named(seeded):
    engine = make_engine(seeded.url)
    with session_factory(engine)() as session, pytest.raises(NotFoundError, match="unknown concept 'nope'"):
        build_report(session, RECENT.start, RECENT.end, BASELINE.start, BASELINE.end, concepts=["pessimism", "nope"])
    engine.dispose()


# ---- windows ----

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def test_windows_parse_relative_iso_and_default_baselines():
    window = report_window("24h", "now", now=NOW)
    assert (window.start, window.end) == (NOW - timedelta(hours=24), NOW)
    naive = report_window("2025-05-01T00:00", "2025-05-02T06:00+02:00", now=NOW)
    assert naive.start == datetime(2025, 5, 1, tzinfo=UTC) and naive.end == datetime(2025, 5, 2, 4, tzinfo=UTC)
    default = baseline_window(None, window=window, now=NOW)
    assert (default.start, default.end) == (NOW - timedelta(hours=48), NOW - timedelta(hours=24))
    week = baseline_window("7d", window=window, now=NOW)
    assert (week.start, week.end) == (window.start - timedelta(days=7), window.start)
    interval = baseline_window("30d/2025-05-30T00:00Z", window=window, now=NOW)
    assert (interval.start, interval.end) == (NOW - timedelta(days=30), datetime(2025, 5, 30, tzinfo=UTC))
    assert choose_bucket("auto", window) == "hour" and choose_bucket(None, report_window("7d", "now", now=NOW)) == "day"


@pytest.mark.parametrize(
    "since, until, baseline, field_name, message",
    [
        ("yesterday", "now", None, "since", "cannot read 'yesterday'"),
        ("1h", "2h", None, "until", "the window is empty"),
        ("24h", "now", "12h/now", "baseline", "overlaps the report window"),
        ("24h", "now", "0d", "baseline", "length zero"),
        ("24h", "now", "last week", "baseline", "cannot read 'last week'"),
        ("24h", "now", "2d/3d", "baseline", "is empty"),
        # Past what a datetime can hold (year 1 to 9999): named, never an OverflowError.
        ("1000000d", "now", None, "since", "'1000000d' reaches back before 0001-01-01"),
        ("99999999999d", "now", None, "since", "'99999999999d' reaches back before 0001-01-01"),
        ("0001-01-02", "now", None, "since", "the default baseline"),
        ("24h", "now", "9999999d", "baseline", "'9999999d' before since reaches back before 0001-01-01"),
        ("24h", "now", "99999999999d", "baseline", "reaches back before 0001-01-01"),
        ("0001-01-01T00:00+05:00", "now", None, "since", "outside the times"),
        ("24h", "9999-12-31T23:59-05:00", "1d", "until", "outside the times"),
        ("24h", "now", "1000000d/now", "baseline", "reaches back before 0001-01-01"),
    ],
)
def test_bad_windows_name_the_parameter(since, until, baseline, field_name, message):
    with pytest.raises(WindowError, match=message) as caught:
        window = report_window(since, until, now=NOW)
        baseline_window(baseline, window=window, now=NOW)
    assert caught.value.field == field_name and str(caught.value).startswith(f"{field_name}: ")


def test_windows_reach_the_first_and_last_representable_days():
    first = report_window("0001-01-02", "now", now=NOW)
    assert first.start == datetime(1, 1, 2, tzinfo=UTC)
    assert baseline_window("1d", window=first, now=NOW).start == datetime(1, 1, 1, tzinfo=UTC)
    last = report_window("24h", "9999-12-31T23:59:59", now=NOW)
    assert last.end == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)


def test_build_report_rejects_an_overlapping_baseline_before_reading():
    with pytest.raises(InvalidInputError, match="overlaps"):
        build_report(None, RECENT.start, RECENT.end, RECENT.start - timedelta(hours=1), RECENT.end)


# ---- the API over real HTTP ----


@pytest.fixture(scope="module")
def api(seeded, tmp_path_factory) -> Iterator[httpx.Client]:
    app = create_app(Settings(database_url=seeded.url, data_dir=tmp_path_factory.mktemp("data")))
    token = issue_token(seeded.url, scopes=["reader"], name="report-reader")
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=60, headers=bearer(token)) as client:
        yield client


WINDOW_PARAMS = {
    "since": RECENT.start.isoformat(),
    "until": RECENT.end.isoformat(),
    "baseline": f"{BASELINE.start.isoformat()}/{BASELINE.end.isoformat()}",
}


@pytest.mark.parametrize(
    "section, key", [("summary", "summary"), ("drift", "drift"), ("compare", "comparison"), ("series", "series")]
)  # path, report field
def test_api_sections_equal_the_report(api, report, section, key):
    response = api.get(f"/reports/{section}", params=WINDOW_PARAMS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["window"] == {"start": RECENT.start.isoformat(), "end": RECENT.end.isoformat()}
    assert body["rows"] == json.loads(to_json(report))[key]


def test_api_flagged_respects_top_concept_and_privacy(api, seeded):
    params = {**WINDOW_PARAMS, "concept": ["pessimism", "formality"], "top": 3}
    rows = api.get("/reports/flagged", params=params).json()["rows"]
    assert Counter((r["concept"], r["version"]) for r in rows) == {PESSIMISM_V1: 3, FORMALITY: 3}
    csv_text = api.get("/reports/flagged", params={**WINDOW_PARAMS, "top": 1000, "format": "csv"}).text
    assert len(list(csv.DictReader(io.StringIO(csv_text)))) == len(seeded.flagged_ids("recent", PESSIMISM_V1)) + len(
        seeded.flagged_ids("recent", FORMALITY)
    )
    assert not [text for text in seeded.hidden_texts() if text in csv_text]


def test_api_csv_and_html(api, report):
    summary_csv = api.get("/reports/summary", params={**WINDOW_PARAMS, "format": "csv"})
    assert summary_csv.headers["content-type"].startswith("text/csv")
    assert summary_csv.text == to_csv(report, "summary")
    page = api.get("/reports/html", params=WINDOW_PARAMS)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for plot_id in ("plot-scores-over-time", "plot-score-distribution", "plot-flagged-rate"):
        assert f'<figure class="plot" id="{plot_id}"><svg' in page.text


@pytest.mark.parametrize(
    "params, status, loc, message",
    [
        ({"since": "yesterday"}, 422, ["query", "since"], "cannot read 'yesterday'"),
        ({"since": "1h", "until": "2h"}, 422, ["query", "until"], "the window is empty"),
        ({"baseline": "1h/now"}, 422, ["query", "baseline"], "overlaps"),
        ({"bucket": "week"}, 422, ["query", "bucket"], "'auto', 'hour' or 'day'"),
        ({"top": 0}, 422, ["query", "top"], "greater than or equal to 1"),
        ({"concept": "nope"}, 404, ["query", "concept"], "unknown concept 'nope'"),
    ],
)
def test_api_rejects_bad_parameters_in_the_error_shape(api, params, status, loc, message):
    path = "/reports/series" if "bucket" in params else "/reports/flagged"
    response = api.get(path, params=params)
    assert response.status_code == status, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == loc and message in detail["msg"]
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["summary", "flagged", "compare", "drift", "series", "html"])
@pytest.mark.parametrize(
    "params, field_name, message",
    [
        ({"since": "1000000d"}, "since", "reaches back before 0001-01-01"),
        ({"since": "0001-01-02"}, "since", "the default baseline"),
        ({"baseline": "9999999d"}, "baseline", "reaches back before 0001-01-01"),
        ({"since": "99999999999d"}, "since", "reaches back before 0001-01-01"),
    ],
)
def test_api_windows_past_the_representable_times_are_a_422_naming_the_parameter(
    api, path, params, field_name, message
):
    response = api.get(f"/reports/{path}", params=params)
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["query", field_name] and message in detail["msg"], detail


# ---- the CLI as a subprocess ----

# The real entry point: `auditor report`, as a user runs it.
REPORT_CLI = [sys.executable, "-m", "auditor.cli", "report"]


def run_report(*args: str, url: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "AUDITOR_DATABASE_URL": url or "sqlite:////nonexistent/never-used.db"}
    return subprocess.run([*REPORT_CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def test_cli_writes_csv_json_and_html(seeded, report, tmp_path):
    window = [
        "--since",
        RECENT.start.isoformat(),
        "--until",
        RECENT.end.isoformat(),
        "--baseline",
        f"{BASELINE.start.isoformat()}/{BASELINE.end.isoformat()}",
        "--top",
        "1000",
    ]
    outputs = {fmt: tmp_path / f"report.{fmt}" for fmt in ("csv", "json", "html")}
    for fmt, path in outputs.items():
        result = run_report(*window, "--format", fmt, "--output", str(path), url=seeded.url)
        assert result.returncode == 0, result.stderr
        assert f"wrote {path}" in result.stderr
    document = json.loads(outputs["json"].read_text())
    expected = json.loads(to_json(report))
    for section in ("summary", "drift", "comparison", "flagged", "series"):
        assert document[section] == expected[section]
    assert outputs["csv"].read_text() == to_csv(report, "summary")
    page = outputs["html"].read_text()
    assert page.count('<figure class="plot"') == 3
    hidden = seeded.hidden_texts()
    assert not [text for path in outputs.values() for text in hidden if text in path.read_text()]
    drift_csv = run_report(*window, "--format", "csv", "--table", "drift", "--concept", "pessimism", url=seeded.url)
    assert drift_csv.returncode == 0, drift_csv.stderr
    statuses = {(r["concept"], r["version"]): r["status"] for r in csv.DictReader(io.StringIO(drift_csv.stdout))}
    assert statuses == {("pessimism", "1"): "stable", ("pessimism", "2"): "drift"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--since", "last tuesday"], "since: cannot read 'last tuesday'"),
        (["--since", "1h", "--until", "2h"], "until: the window is empty"),
        (["--baseline", "1h/now"], "baseline:"),
        (["--since", "[/x]"], "since: cannot read '[/x]'"),  # echoed as text, not read as markup
        (["--since", "1000000d"], "since: '1000000d' reaches back before 0001-01-01"),
        (["--since", "0001-01-02"], "since: 0001-01-02 is too early for the default baseline"),
        (["--baseline", "9999999d"], "baseline: '9999999d' before since reaches back before 0001-01-01"),
        (["--since", "99999999999d"], "since: '99999999999d' reaches back before 0001-01-01"),
    ],
)
def test_cli_bad_windows_are_one_line_and_exit_2(args, message):
    result = run_report(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_unknown_concept_is_one_line_and_exit_2(seeded):
    result = run_report("--concept", "nope", url=seeded.url)
    assert result.returncode == 2
    expected = "error: unknown concept 'nope'; known concepts: formality, idle, pessimism, retired_thing"
    assert result.stderr.strip() == expected


# ---- the HTML page in a real browser ----

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLOT_IDS = ("plot-scores-over-time", "plot-score-distribution", "plot-flagged-rate")


class FigureCensus(HTMLParser):
    """Per <figure class="plot">: how many of each element it holds; per data group (the
    <g id="<plot>-series-<id>"> / -baseline- / -recent- the report gives each data series):
    the vertices of its longest path."""

    def __init__(self) -> None:
        super().__init__()
        self.figure: str | None = None
        self.groups: list[str] = []  # ids of the open <g> elements
        self.tags: dict[str, Counter] = {}
        self.data_vertices: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        if tag == "figure" and "plot" in (attributes.get("class") or "").split():
            self.figure = attributes["id"]
            self.tags[self.figure] = Counter()
        elif self.figure is not None:
            self.tags[self.figure][tag] += 1
            if tag == "g":
                self.groups.append(attributes.get("id") or "")
            data_group = next(
                (g for g in reversed(self.groups) if re.search(r"-(series|baseline|recent)-\d+$", g)), None
            )
            if tag == "path" and data_group:
                vertices = sum((attributes.get("d") or "").count(command) for command in "MLC")
                self.data_vertices[data_group] = max(self.data_vertices.get(data_group, 0), vertices)

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self.figure = None
        elif tag == "g" and self.figure is not None:
            self.groups.pop()


def chromium(*args: str) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def html_page(report, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("html") / "report.html"
    path.write_text(to_html(report), encoding="utf-8")
    return path


def test_html_is_self_contained(html_page):
    page = html_page.read_text()
    assert "<script" not in page and "src=" not in page and "@import" not in page
    assert 'href="http' not in page and "<?xml" not in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs it: scripts/ensure-apt.sh)")
def test_headless_chromium_draws_every_plot(html_page, seeded, report):
    dom = chromium("--dump-dom", html_page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    census = FigureCensus()
    census.feed(dom.stdout)
    assert set(census.tags) == set(PLOT_IDS)
    for plot_id in PLOT_IDS:
        tags = census.tags[plot_id]
        assert tags["svg"] == 1, (plot_id, tags)
        assert tags["path"] + tags["line"] + tags["use"] >= 50, (plot_id, tags)  # axes, ticks, text
    # Every scored concept version's data is drawn: a line through each of its hourly points (72;
    # a bucket holding only uncalibrated scores has no mean z and is a gap), and a histogram
    # outline (30 bins) per window.
    for concept in (PESSIMISM_V1, PESSIMISM_V2, FORMALITY):
        concept_id = seeded.concept_ids[concept]
        points = [p for p in report.series if p.concept_id == concept_id]
        assert len(points) == 72
        with_z = sum(p.mean_z is not None for p in points)
        assert census.data_vertices.get(f"plot-scores-over-time-series-{concept_id}") == with_z
        assert census.data_vertices.get(f"plot-flagged-rate-series-{concept_id}") == 72
        for side in ("baseline", "recent"):
            assert census.data_vertices.get(f"plot-score-distribution-{side}-{concept_id}", 0) >= 30, (side, concept)
    idle = seeded.concept_ids[IDLE]
    assert not [group for group in census.data_vertices if group.endswith(f"-{idle}")]  # nothing to draw


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs it: scripts/ensure-apt.sh)")
def test_headless_chromium_paints_the_series_colours(html_page, tmp_path):
    import matplotlib.image

    screenshot = tmp_path / "report.png"
    result = chromium(f"--screenshot={screenshot}", "--window-size=1280,5000", html_page.as_uri())
    assert result.returncode == 0 and screenshot.is_file(), result.stderr[-2000:]
    pixels = matplotlib.image.imread(str(screenshot))[..., :3]
    # The first two series / the baseline and recent histograms: matplotlib's tab:blue, tab:orange.
    for rgb in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):
        close = np.abs(pixels - np.array(rgb) / 255).max(axis=-1) < 0.1
        assert close.sum() > 2000, (rgb, int(close.sum()))


def test_drift_on_live_traffic_is_exported_for_alerting(seeded, report):
    """The worker's periodic drift export sets auditor_drift_psi to the report's PSI."""
    from prometheus_client import REGISTRY

    from auditor.telemetry.drift_export import DriftExporter

    engine = make_engine(seeded.url)
    exporter = DriftExporter(
        session_factory(engine), "test-model", recent=RECENT.duration, baseline=BASELINE.duration, interval=0
    )
    rows = exporter.run_once(now=RECENT.end)
    engine.dispose()
    expected = {(r.concept, r.version): r.psi for r in report.drift}
    assert {(r.concept, r.version): r.psi for r in rows} == expected
    v2 = by_label(report.drift)[PESSIMISM_V2]
    exported = REGISTRY.get_sample_value(
        "auditor_drift_psi", {"concept": f"{v2.concept}:v{v2.version}", "layer": str(v2.layer), "model": "test-model"}
    )
    assert exported == pytest.approx(v2.psi) and exported > 0.5
