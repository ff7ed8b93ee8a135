"""One concept version per identity (name, model fingerprint, pairs hash, method, pooling), on real
Postgres and on a SQLite file: registrations racing each other (two workers warming up on a fresh
database, two identical extraction jobs) end with one row whose id both get, a repeated
registration returns the version already there, and the migration that adds the constraint
repairs a database that already holds duplicates."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import torch
from sqlalchemy import Engine, insert, select

from auditor.db import store
from auditor.db.engine import downgrade, make_engine, run_migrations, session_factory, writer_engine
from auditor.db.models import Concept, ConceptVector, Flag, MonitoredRequest, RequestScore
from support.databases import Databases, _postgres_reachable

D_MODEL, N_LAYERS = 16, 4
FINGERPRINT = "ab" * 32
PAIRS_HASH = "ef" * 32
REQUEST = {"id": "r1", "kind": "chat", "status": "done", "privacy_mode": "hash", "params": {}, "steered": False,
           "created_at": datetime(2025, 1, 3, tzinfo=UTC)}  # fmt: skip


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def databases(request, tmp_path_factory) -> Iterator[Databases]:
    if request.param == "postgres" and (reason := _postgres_reachable()):
        pytest.skip(reason)
    dbs = Databases(request.param, tmp_path_factory.mktemp(f"identity-{request.param}"))
    yield dbs
    dbs.drop_all()


@pytest.fixture
def engine(databases: Databases) -> Iterator[Engine]:
    url = databases.new_url()
    run_migrations(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def random_unit_vectors(seed: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    vectors = {layer: torch.randn(D_MODEL, generator=gen) for layer in range(N_LAYERS)}
    return {layer: v / v.norm() for layer, v in vectors.items()}


def fields(name: str = "pessimism", seed: int = 0, **overrides) -> dict:
    """A pairs-extracted version; `seed` changes only the vectors (as a re-extraction on another
    worker might), not the identity."""
    return {
        "name": name,
        "vectors": random_unit_vectors(seed),
        "primary_layer": 2,
        "created_by": "test",
        "model_id": "org/model",
        "model_fingerprint": FINGERPRINT,
        "loader": "test",
        "hook_point": "blocks.{layer}.hook_resid_post",
        "d_model": D_MODEL,
        "n_layers_model": N_LAYERS,
        "method": "mean_diff",
        "pooling": "mean",
        "source": "pairs",
        "n_pairs": 10,
        "pairs_hash": PAIRS_HASH,
        **overrides,
    }


def rows_named(engine: Engine, name: str) -> list[tuple[int, int]]:
    with session_factory(engine)() as session:
        return list(session.execute(select(Concept.id, Concept.version).where(Concept.name == name)))


# ---- registrations racing each other ----


def test_concurrent_registrations_of_one_identity_make_one_row(engine: Engine):
    """Each racer first finds nothing registered (as find_extracted / the built-in check do),
    then, while the other is past the same check, registers: both end with the one row's id."""
    readers, writers = session_factory(engine), session_factory(writer_engine(engine))
    both_checked = threading.Barrier(2, timeout=30)
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def race(seed: int) -> None:
        try:
            with readers() as session:
                assert store.list_concepts(session, name="pessimism") == []
            both_checked.wait()
            with writers() as session:
                concept = store.add_concept_version(session, **fields(seed=seed))
                session.commit()
                results[seed] = concept.id
        except BaseException as exc:  # reported below, from the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    rows = rows_named(engine, "pessimism")
    assert len(rows) == 1, rows
    ((concept_id, version),) = rows
    assert version == 1
    assert results == {1: concept_id, 2: concept_id}
    with session_factory(engine)() as session:  # the loser's vectors were not left behind either
        assert session.scalar(select(ConceptVector.concept_id).where(ConceptVector.concept_id != concept_id)) is None


def test_a_repeated_registration_returns_the_version_there(engine: Engine):
    with session_factory(writer_engine(engine))() as session:
        first = store.add_concept_version(session, **fields(seed=1))
        other = store.add_concept_version(session, **fields(name="formality", seed=3))
        # Same identity, other vectors: the version already there, and the transaction goes on.
        again = store.register_concept_version(session, **fields(seed=2))
        assert (again.concept.id, again.created) == (first.id, False)
        session.commit()
    assert rows_named(engine, "pessimism") == [(first.id, 1)]
    assert rows_named(engine, "formality") == [(other.id, 1)]  # written before the duplicate, kept


@pytest.mark.parametrize(
    "change",
    [
        {"model_fingerprint": "cd" * 32},
        {"pairs_hash": "01" * 32},
        {"method": "logistic"},
        {"pooling": "last"},
    ],
)
def test_another_identity_is_the_next_version(engine: Engine, change: dict):
    with session_factory(writer_engine(engine))() as session:
        first = store.add_concept_version(session, **fields())
        second = store.register_concept_version(session, **fields(**change))
        assert second.created and (second.concept.version, first.version) == (2, 1)
        session.commit()
    assert len(rows_named(engine, "pessimism")) == 2


def test_uploads_have_no_identity_each_is_a_version(engine: Engine):
    """An uploaded vector has no pairs: the same file uploaded twice is two versions, as before."""
    upload = {"source": "upload-json", "method": "upload", "pooling": "n/a", "pairs_hash": None, "n_pairs": None}
    with session_factory(writer_engine(engine))() as session:
        versions = [store.add_concept_version(session, **fields(**upload)).version for _ in range(2)]
        session.commit()
    assert versions == [1, 2]


# ---- the migration: a database that already holds duplicates ----


def _concept_row(concept_id: int, version: int, *, active: bool = True, retired: bool = False) -> dict:
    values = fields()
    del values["vectors"]
    return {
        **values,
        "id": concept_id,
        "version": version,
        "description": "",
        "active": active,
        "retired_at": datetime(2025, 1, 2, tzinfo=UTC) if retired else None,
        "created_at": datetime(2025, 1, 1, version, tzinfo=UTC),
        "vector_hash": "00" * 32,
        "provenance": {"sweep": []},
    }


def test_migration_keeps_one_version_per_identity(databases: Databases):
    """v1 retired by hand, v2 and v3 registered by racing workers: v2 (the oldest still active) keeps
    the identity; v1 and v3 stay (scores and flags reference them) but are retired duplicates."""
    url = databases.new_url()
    run_migrations(url, "0005")
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            session.execute(
                insert(Concept),
                [_concept_row(11, 1, active=False, retired=True), _concept_row(12, 2), _concept_row(13, 3)],
            )
            session.execute(insert(MonitoredRequest), [REQUEST])
            score = {
                "request_id": "r1",
                "layer": 2,
                "mean": 0.1,
                "max": 0.2,
                "last": 0.1,
                "n_tokens": 3,
                "created_at": REQUEST["created_at"],
            }
            session.execute(insert(RequestScore), [{**score, "concept_id": cid} for cid in (12, 13)])
            flag = {"request_id": "r1", "layer": 2, "kind": "hidden", "residual_signal": 3.0, "threshold": 2.0}
            session.execute(insert(Flag), [{**flag, "concept_id": 13, "reason": "read high"}])
            session.commit()
        engine.dispose()

        run_migrations(url)
        with session_factory(engine)() as session:
            by_id = {c.id: c for c in session.scalars(select(Concept))}
            assert sorted(by_id) == [11, 12, 13]  # concepts are never deleted
            keeper = by_id[12]
            assert (keeper.pairs_hash, keeper.active, keeper.retired_at) == (PAIRS_HASH, True, None)
            for duplicate in (by_id[11], by_id[13]):
                assert duplicate.pairs_hash is None
                assert duplicate.active is False and duplicate.retired_at is not None
                assert duplicate.provenance == {"sweep": [], "duplicate_of": 12, "pairs_hash": PAIRS_HASH}
            assert by_id[11].retired_at == datetime(2025, 1, 2, tzinfo=UTC)  # retired once, first date kept
            assert session.scalar(select(Flag.concept_id)) == 13  # history untouched
            # And from now on the identity finds the keeper.
            again = store.register_concept_version(session, **fields(seed=9))
            assert (again.concept.id, again.created) == (12, False)
        engine.dispose()

        downgrade(url, "0005")
        run_migrations(url)
    finally:
        engine.dispose()


def test_migration_on_a_database_without_duplicates_changes_no_row(databases: Databases):
    url = databases.new_url()
    run_migrations(url, "0005")
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            session.execute(insert(Concept), [_concept_row(21, 1), {**_concept_row(22, 2), "pairs_hash": "01" * 32}])
            session.commit()
            before = [(c.id, c.pairs_hash, c.active, c.provenance) for c in store.list_concepts(session)]
        engine.dispose()
        run_migrations(url)
        with session_factory(engine)() as session:
            after = [(c.id, c.pairs_hash, c.active, c.provenance) for c in store.list_concepts(session)]
        assert after == before
    finally:
        engine.dispose()
