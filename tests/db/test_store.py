"""The database layer on real Postgres and on a SQLite file: migrations, the concept registry,
request scores. Postgres tests skip (with the reason) when the server is unreachable; point
AUDITOR_TEST_POSTGRES_URL at a server whose user may CREATE DATABASE to run them elsewhere."""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import torch
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from auditor.db import store
from auditor.db.engine import database_url, downgrade, make_engine, normalize_url, run_migrations, session_factory
from auditor.db.models import Base, Concept, ConceptVector, RequestScore
from auditor.errors import AuditorError, InvalidInputError, NotFoundError
from auditor.settings import Settings
from support.databases import Databases, _postgres_reachable

D_MODEL, N_LAYERS = 64, 30
FINGERPRINT = "ab" * 32

EXPECTED_TABLES = {
    "alembic_version", "concepts", "concept_vectors", "monitored_requests",
    "request_scores", "flags", "calibrations", "jobs", "api_tokens", "admin_audit_log",
    "daily_rollups", "answer_calibrations",
}  # fmt: skip
EXPECTED_INDEXES = {
    "admin_audit_log": {"ix_admin_audit_log_at"},
    "request_scores": {"ix_request_scores_concept_created", "ix_request_scores_created_at"},
    "flags": {"ix_flags_concept_created", "ix_flags_kind_created", "ix_flags_request_id"},
    "monitored_requests": {"ix_monitored_requests_created_at"},
    "calibrations": {"ix_calibrations_concept_layer_created"},
    "concepts": {"uq_concepts_identity"},
    "daily_rollups": {"ix_daily_rollups_concept_day"},
    "answer_calibrations": {"ix_answer_calibrations_bank_created"},
}


@pytest.fixture(scope="session", params=["postgres", "sqlite"])
def databases(request, tmp_path_factory) -> Iterator[Databases]:
    if request.param == "postgres" and (reason := _postgres_reachable()):
        pytest.skip(reason)
    dbs = Databases(request.param, tmp_path_factory.mktemp(f"db-{request.param}"))
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def engine(databases: Databases) -> Iterator[Engine]:
    url = databases.new_url()
    run_migrations(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """Each test runs in one transaction that is rolled back: the store never commits."""
    with session_factory(engine)() as session:
        yield session
        session.rollback()


# ---- helpers ----


def unit_vectors(layers, seed: int = 0, d_model: int = D_MODEL) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vectors = {}
    for layer in layers:
        vector = torch.randn(d_model, generator=gen)
        vectors[layer] = vector / vector.norm()
    return vectors


def register(session: Session, name: str = "pessimism", vectors=None, **overrides) -> Concept:
    fields = dict(
        name=name,
        vectors=unit_vectors(range(N_LAYERS)) if vectors is None else vectors,
        primary_layer=15,
        created_by="test",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_revision="gguf:" + "cd" * 32,
        model_fingerprint=FINGERPRINT,
        loader="transformers-gguf",
        hook_point="blocks.{layer}.hook_resid_post",
        d_model=D_MODEL,
        n_layers_model=N_LAYERS,
        method="mean_diff",
        pooling="mean",
        source="pairs",
        n_pairs=40,
        pairs_hash="ef" * 32,
        provenance={"sink_positions_skipped": 1},
    )
    fields.update(overrides)
    return store.add_concept_version(session, **fields)


def stored_vector_bytes(session: Session, concept_id: int) -> dict[int, bytes]:
    query = select(ConceptVector).where(ConceptVector.concept_id == concept_id)
    return {row.layer: row.vector for row in session.scalars(query)}


def count(session: Session, model) -> int:
    return session.scalar(select(func.count()).select_from(model))


# ---- configuration ----


def test_urls(tmp_path):
    url = "postgresql://u:p%40ss@h:5433/db"  # an escaped "@" in the password survives
    assert normalize_url(url) == "postgresql+psycopg://u:p%40ss@h:5433/db"
    assert normalize_url("postgres://h/db") == "postgresql+psycopg://h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"
    data_dir = tmp_path / "nested" / "data"
    url = database_url(Settings(data_dir=data_dir, database_url=""))
    assert url == f"sqlite:///{(data_dir / 'auditor.db').resolve()}"
    assert data_dir.is_dir()
    explicit = database_url(Settings(data_dir=data_dir, database_url="postgresql://h/db"))
    assert explicit == "postgresql+psycopg://h/db"


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, which leaves new files world-readable: what the modes must beat."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_data_dir_and_its_sqlite_files_are_private(tmp_path, umask_022):
    data_dir = tmp_path / "nested" / "data"
    url = database_url(Settings(data_dir=data_dir, database_url=""))
    assert mode(data_dir) == 0o700  # it will hold prompts and token hashes
    engine = make_engine(url)
    try:
        run_migrations(url)
        with engine.connect() as conn:  # a connection open: the WAL and its index exist
            conn.exec_driver_sql("SELECT count(*) FROM concepts").scalar()
            files = {name: mode(data_dir / name) for name in ("auditor.db", "auditor.db-wal", "auditor.db-shm")}
    finally:
        engine.dispose()
    assert files == {"auditor.db": 0o600, "auditor.db-wal": 0o600, "auditor.db-shm": 0o600}
    # A SQLite file named by URL, outside the data dir, is created private too.
    elsewhere = tmp_path / "elsewhere.db"
    engine = make_engine(f"sqlite:///{elsewhere}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()
    assert mode(elsewhere) == 0o600


def test_an_existing_shared_data_dir_is_left_as_it_is_with_a_warning(tmp_path, umask_022, caplog):
    data_dir = tmp_path / "shared"
    data_dir.mkdir(mode=0o755)
    with caplog.at_level(logging.WARNING, logger="auditor.data_dir"):
        database_url(Settings(data_dir=data_dir, database_url=""))
    assert mode(data_dir) == 0o755  # the user's directory, the user's modes
    warnings = [r.getMessage() for r in caplog.records if r.name == "auditor.data_dir"]
    assert warnings == [f"{data_dir} is open to other users (mode 0755) and holds prompts: chmod 700 it"]


def test_sqlite_pragmas(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'p.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


# ---- migrations ----


def _schema(url: str) -> tuple[set[str], dict[str, set[str]]]:
    engine = make_engine(url)
    try:
        inspector = inspect(engine)
        tables = set(inspector.get_table_names())
        indexes = {t: {ix["name"] for ix in inspector.get_indexes(t)} for t in tables}
        return tables, indexes
    finally:
        engine.dispose()


def _model_drift(url: str) -> list:
    """Differences between the migrated schema and the models (empty = they agree)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_migrations_upgrade_downgrade_upgrade(databases: Databases):
    url = databases.new_url()
    run_migrations(url)
    tables, indexes = _schema(url)
    assert tables == EXPECTED_TABLES
    for table, expected in EXPECTED_INDEXES.items():
        assert expected <= indexes[table], (table, indexes[table])
    assert _model_drift(url) == []

    downgrade(url, "base")
    assert _schema(url)[0] == {"alembic_version"}

    run_migrations(url)
    assert _schema(url)[0] == EXPECTED_TABLES
    assert _model_drift(url) == []


# ---- concept registry ----


def test_second_version_leaves_first_unchanged(session: Session):
    first = register(session, vectors=unit_vectors(range(N_LAYERS), seed=1))
    session.flush()
    before = stored_vector_bytes(session, first.id)
    first_hash = first.vector_hash

    second = register(session, vectors=unit_vectors([15], seed=2), pairs_hash="01" * 32)  # other pairs
    session.flush()
    session.expire_all()  # read back from the database, not the identity map

    assert (first.version, second.version) == (1, 2)
    assert first.id != second.id
    after = stored_vector_bytes(session, first.id)
    assert after == before and len(after) == N_LAYERS
    assert store.get_concept(session, concept_id=first.id).vector_hash == first_hash
    assert sorted(store.concept_vectors(session, concept_id=second.id)) == [15]
    assert store.get_concept_by_name(session, name="pessimism").id == second.id
    assert store.get_concept_by_name(session, name="pessimism", version=1).id == first.id


def test_vectors_round_trip_as_unit_float32(session: Session):
    raw = {3: torch.arange(1, D_MODEL + 1, dtype=torch.float64) * 7.0, 4: np.ones(D_MODEL)}
    concept = register(session, vectors=raw, primary_layer=3)
    loaded = store.concept_vectors(session, concept_id=concept.id)
    assert sorted(loaded) == [3, 4]
    for layer, vector in loaded.items():
        assert vector.dtype == torch.float32 and vector.shape == (D_MODEL,)
        assert abs(float(vector.norm()) - 1.0) < 1e-6
        expected = torch.as_tensor(raw[layer], dtype=torch.float32)
        assert torch.allclose(vector, expected / expected.norm(), atol=1e-7)


def test_already_unit_vectors_are_stored_bit_exact(session: Session):
    vectors = unit_vectors(range(N_LAYERS), seed=5)
    concept = register(session, vectors=vectors)
    stacked = torch.stack([vectors[layer] for layer in range(N_LAYERS)])
    import hashlib

    # Same formula as workers.monitoring.concepts.ConceptVectors.vector_hash.
    assert concept.vector_hash == hashlib.sha256(stacked.numpy().tobytes()).hexdigest()
    loaded = store.concept_vectors(session, concept_id=concept.id)
    assert all(torch.equal(loaded[layer], vectors[layer]) for layer in range(N_LAYERS))


def _bad_vector_cases():
    good = unit_vectors([0])[0]
    nan = good.clone()
    nan[7] = float("nan")
    return {
        "wrong-length": ({0: torch.ones(D_MODEL + 1)}, "dimension"),
        "nan": ({0: good, 1: nan}, "NaN"),
        "inf": ({0: good.clone().fill_(float("inf"))}, "NaN or Inf"),
        "zero": ({0: good, 2: torch.zeros(D_MODEL)}, "zero vector"),
        "layer-too-high": ({0: good, N_LAYERS: good}, "out of range"),
        "layer-negative": ({-1: good}, "out of range"),
        "empty": ({}, "no vectors"),
        "2-D": ({0: good.reshape(8, 8)}, "1-D"),
    }


@pytest.mark.parametrize("case", list(_bad_vector_cases()))
def test_invalid_vectors_write_nothing(session: Session, case: str):
    vectors, message = _bad_vector_cases()[case]
    with pytest.raises(InvalidInputError, match=message):
        register(session, vectors=vectors, primary_layer=min(vectors, default=0))
    # Counted in the same transaction, so anything added to the session would be flushed and seen.
    assert count(session, Concept) == 0
    assert count(session, ConceptVector) == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"primary_layer": 5}, "primary_layer 5 has no vector"),
        ({"source": "telepathy"}, "source must be one of"),
        ({"model_fingerprint": "not-a-hash"}, "sha256"),
        ({"name": ""}, "name"),
    ],
)
def test_invalid_registration_fields_write_nothing(session: Session, overrides, message):
    with pytest.raises(InvalidInputError, match=message):
        register(session, vectors=unit_vectors([15]), **overrides)
    assert count(session, Concept) == 0 and count(session, ConceptVector) == 0


def test_store_never_commits(engine: Engine, session: Session):
    register(session)
    assert count(session, Concept) == 1
    with session_factory(engine)() as other:  # another connection sees nothing uncommitted
        assert count(other, Concept) == 0


def test_active_and_retired(session: Session):
    a = register(session, name="a")
    b = register(session, name="b")
    store.set_active(session, concept_id=a.id, active=False)
    assert [c.name for c in store.list_concepts(session, active=True)] == ["b"]
    assert [c.name for c in store.list_concepts(session, active=False)] == ["a"]
    store.retire_concept(session, concept_id=b.id)
    assert b.retired_at is not None and b.active is False
    with pytest.raises(InvalidInputError, match="retired"):
        store.set_active(session, concept_id=b.id, active=True)
    assert store.set_active(session, concept_id=a.id, active=True).active is True
    assert [c.name for c in store.list_concepts(session, name="a")] == ["a"]
    with pytest.raises(NotFoundError):
        store.retire_concept(session, concept_id=999_999)


def test_concept_rows_are_immutable(session: Session):
    concept = register(session)
    concept.model_fingerprint = "00" * 32
    with pytest.raises(AuditorError, match="immutable"):
        session.flush()


# ---- requests and scores ----


def _score_rows(concept_ids: list[int], n_layers: int, n_tokens: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for concept_id in concept_ids:
        for layer in range(n_layers):
            trace = rng.standard_normal(n_tokens).astype(np.float32)
            rows.append({
                "concept_id": concept_id, "layer": layer,
                "mean": float(trace.mean()), "max": float(trace.max()), "last": float(trace[-1]),
                "calibrated_z": float(rng.standard_normal()) if layer % 2 else None,
                "percentile": float(rng.uniform()) if layer % 3 else None,
                "n_tokens": n_tokens, "trace": torch.from_numpy(trace),
            })  # fmt: skip
    return rows


@pytest.mark.parametrize("writer", ["insert_scores", "insert_scores_copy"])
def test_scores_round_trip_exactly(session: Session, writer: str):
    concept_ids = [register(session, name=f"c{i}", vectors=unit_vectors([15])).id for i in range(6)]
    created = datetime(2025, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    store.create_request(session, request_id="req-1", kind="chat", prompt_text="hi", created_at=created)
    rows = _score_rows(concept_ids, N_LAYERS, n_tokens=64)
    assert len(rows) == 180

    assert getattr(store, writer)(session, request_id="req-1", rows=rows) == 180
    session.flush()
    session.expire_all()
    stored = store.scores_for_request(session, request_id="req-1")

    assert len(stored) == 180
    expected = sorted(rows, key=lambda r: (r["concept_id"], r["layer"]))
    for got, want in zip(stored, expected):
        assert (got.concept_id, got.layer, got.n_tokens) == (want["concept_id"], want["layer"], 64)
        assert (got.mean, got.max, got.last) == (want["mean"], want["max"], want["last"])
        assert (got.calibrated_z, got.percentile) == (want["calibrated_z"], want["percentile"])
        assert got.created_at == created
        assert torch.equal(store.trace_from_bytes(got.trace), want["trace"])


def test_insert_scores_is_one_statement(session: Session):
    concept_ids = [register(session, name=f"c{i}", vectors=unit_vectors([15])).id for i in range(6)]
    store.create_request(session, request_id="req-batch", kind="chat", prompt_text="x")
    statements: list[str] = []
    from sqlalchemy import event

    def listener(conn, cursor, statement, *_rest) -> None:
        statements.append(statement)

    event.listen(session.get_bind(), "before_cursor_execute", listener)
    try:
        rows = _score_rows(concept_ids, N_LAYERS, 8)
        store.insert_scores(session, request_id="req-batch", rows=rows)
    finally:
        event.remove(session.get_bind(), "before_cursor_execute", listener)
    inserts = [s for s in statements if s.lstrip().upper().startswith("INSERT INTO REQUEST_SCORES")]
    assert len(inserts) == 1, statements


def test_scores_reject_bad_rows_and_unknown_keys(session: Session):
    concept = register(session, vectors=unit_vectors([15]))
    store.create_request(session, request_id="r", kind="audit", prompt_text="p")
    with pytest.raises(InvalidInputError, match="lacks 'mean'"):
        store.insert_scores(session, request_id="r", rows=[{"concept_id": concept.id, "layer": 0}])
    with pytest.raises(InvalidInputError, match="unknown fields"):
        row = {"concept_id": concept.id, "layer": 0, "mean": 0, "max": 0, "last": 0, "n_tokens": 1}
        store.insert_scores(session, request_id="r", rows=[{**row, "meen": 1}])
    with pytest.raises(NotFoundError):
        store.insert_scores(session, request_id="nope", rows=[row])
    assert count(session, RequestScore) == 0


def test_scores_need_an_existing_concept(session: Session):
    store.create_request(session, request_id="r-fk", kind="chat", prompt_text="p")
    row = {"concept_id": 424242, "layer": 0, "mean": 0, "max": 0, "last": 0, "n_tokens": 1}
    for writer in (store.insert_scores, store.insert_scores_copy):
        with pytest.raises(InvalidInputError, match=r"unknown concept ids \[424242\]"):
            writer(session, request_id="r-fk", rows=[row])
    assert count(session, RequestScore) == 0


def test_foreign_keys_are_enforced(session: Session):
    """On SQLite too (PRAGMA foreign_keys): a flag for a request that does not exist fails."""
    concept = register(session, vectors=unit_vectors([15]))
    with pytest.raises(IntegrityError):
        store.add_flag(session, request_id="ghost", concept_id=concept.id, layer=15,
                       kind="threshold", residual_signal=1, threshold=0.5, reason="")  # fmt: skip


def test_report_query_uses_concept_time_index(session: Session):
    """Postgres: with sequential scans priced out (the test table is tiny), the planner picks the
    (concept_id, created_at) index for a concept x time-range query. SQLite: its planner does
    so on its own."""
    dialect = session.get_bind().dialect.name
    query = (
        "SELECT avg(mean) FROM request_scores "
        "WHERE concept_id = 1 AND created_at >= '2025-01-01' AND created_at < '2025-02-01'"
    )
    if dialect == "postgresql":
        session.execute(text("SET LOCAL enable_seqscan = off"))
        plan = "\n".join(session.scalars(text("EXPLAIN " + query)))
    else:
        rows = session.execute(text("EXPLAIN QUERY PLAN " + query))
        plan = "\n".join(str(row[-1]) for row in rows)
    assert "ix_request_scores_concept_created" in plan, plan


def test_privacy_modes(session: Session):
    import hashlib

    digest = hashlib.sha256(b"secret prompt").hexdigest()
    full = store.create_request(session, request_id="f", kind="chat", prompt_text="secret prompt")
    hashed = store.create_request(
        session, request_id="h", kind="chat", prompt_text="secret prompt", privacy_mode="hash"
    )
    redacted = store.create_request(
        session, request_id="x", kind="chat", prompt_text="mail ann@example.org", privacy_mode="redacted"
    )
    assert (full.prompt_text, full.prompt_sha256) == ("secret prompt", digest)
    assert (hashed.prompt_text, hashed.prompt_sha256) == (None, digest)
    # Redacted: personal data masked, and the digest of the original text.
    assert (redacted.prompt_text, redacted.prompt_sha256) == (
        "mail [EMAIL]",
        hashlib.sha256(b"mail ann@example.org").hexdigest(),
    )
    store.mark_request(session, request_id="x", status="failed", error="bad input from ann@example.org")
    assert redacted.error == "bad input from [EMAIL]"
    store.mark_request(session, request_id="h", status="running")
    done = store.mark_request(session, request_id="h", status="done", completion_text="answer")
    assert done.completion_text is None
    assert done.completion_sha256 == hashlib.sha256(b"answer").hexdigest()


def test_request_lifecycle(session: Session):
    params = {"temperature": 0.7, "steering": {"concept": "pessimism", "alpha": 4.0}}
    store.create_request(session, request_id="life", kind="completion", prompt_text="p",
                         params=params, steered=True)  # fmt: skip
    with pytest.raises(InvalidInputError, match="already exists"):
        store.create_request(session, request_id="life", kind="completion", prompt_text="p")
    running = store.mark_request(session, request_id="life", status="running", queue_seconds=0.25)
    assert running.started_at is not None and running.finished_at is None
    done = store.mark_request(
        session, request_id="life", status="done", completion_text="out", prompt_tokens=3,
        completion_tokens=5, prefill_seconds=0.1, decode_seconds=0.9, finish_reason="length",
        model_fingerprint=FINGERPRINT, model_id="m",
    )  # fmt: skip
    session.flush()
    session.expire_all()
    got = store.get_request(session, request_id="life")
    assert (got.status, got.completion_text, got.completion_tokens) == ("done", "out", 5)
    assert got.params == params and got.steered is True
    assert got.finished_at >= got.started_at >= got.created_at
    assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timedelta(0)
    with pytest.raises(InvalidInputError, match="cannot go from done"):
        store.mark_request(session, request_id="life", status="running")
    del done


def test_flags_calibrations_jobs(session: Session):
    concept = register(session)
    store.create_request(session, request_id="fl", kind="chat", prompt_text="p")
    flag = store.add_flag(
        session, request_id="fl", concept_id=concept.id, layer=15, kind="hidden",
        residual_signal=3.2, text_signal=0.1, threshold=2.5, reason="residual high, text neutral",
    )  # fmt: skip
    assert flag.id is not None
    with pytest.raises(InvalidInputError, match="kind must be one of"):
        store.add_flag(session, request_id="fl", concept_id=concept.id, layer=15, kind="odd",
                       residual_signal=1, threshold=1, reason="")  # fmt: skip

    store.add_calibration(session, concept_id=concept.id, layer=15, mean=0.0, std=1.0,
                          reference=[0.3, -1.0, 0.1])  # fmt: skip
    newer = store.add_calibration(session, concept_id=concept.id, layer=15, mean=0.1, std=0.9,
                                  reference=[2.0, 1.0], threshold=1.5, target_fpr=0.01)  # fmt: skip
    latest = store.latest_calibration(session, concept_id=concept.id, layer=15)
    assert latest.id == newer.id and latest.reference == [1.0, 2.0] and latest.n_reference == 2

    job = store.create_job(session, kind="extract", payload={"concept": "pessimism"})
    assert job.status == "queued" and len(job.id) == 36
    store.start_job(session, job_id=job.id)
    store.finish_job(session, job_id=job.id, result={"concept_id": concept.id})
    session.flush()
    session.expire_all()
    got = store.get_job(session, job_id=job.id)
    assert (got.status, got.result, got.error) == ("done", {"concept_id": concept.id}, None)
    other = store.create_job(session, kind="calibrate", payload={})
    failed = store.finish_job(session, job_id=other.id, error="boom")
    assert failed.status == "failed" and failed.finished_at is not None


def test_vector_bytes_are_little_endian_float32():
    values = torch.tensor([1.0, -2.5, math.pi], dtype=torch.float64)
    data = store.vector_to_bytes(values)
    assert data == np.array([1.0, -2.5, math.pi], dtype="<f4").tobytes()
    assert torch.equal(store.vector_from_bytes(data, 3), values.float())
    with pytest.raises(InvalidInputError, match="d_model 4"):
        store.vector_from_bytes(data, 4)
    assert store.vector_to_bytes(torch.ones(2, dtype=torch.bfloat16)) == np.ones(2, "<f4").tobytes()
