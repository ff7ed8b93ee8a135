"""Score-ingest throughput into Postgres: rows/s for request_scores. Target >= 50,000 rows/s.

    python bench/ingest.py                       # 200,000 rows, 180 per request, 64-float traces
    python bench/ingest.py --rows 50000 --no-trace
    AUDITOR_BENCH_POSTGRES_URL=postgresql://user@host/postgres python bench/ingest.py

Creates a throwaway database on the server (dropped afterwards unless --keep), migrates it and
registers 6 concepts. Four ways of writing the same rows, each into an emptied table:

  insert/request   store.insert_scores: one batched INSERT per request, own session + commit
  copy/request     store.insert_scores_copy: binary COPY per request, own session + commit
  insert/all       one executemany of every row, one commit
  copy/all         one COPY of every row, one commit

--writers N runs the per-request modes from N threads at once (N worker processes writing).

Per-request modes are what a worker does (one request's 6 concepts x 30 layers, then commit);
the timing includes the session, the request lookup and the commit. Request rows are created
beforehand and not timed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psycopg
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result

from auditor.db import store
from auditor.db.engine import make_engine, normalize_url, run_migrations, session_factory
from auditor.db.models import MonitoredRequest, RequestScore, utcnow

N_CONCEPTS, N_LAYERS, D_MODEL = 6, 30, 576
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def score_rows(concept_ids: list[int], trace_len: int, seed: int = 0) -> list[dict]:
    """One request's rows: every concept at every layer."""
    rng = np.random.default_rng(seed)
    rows = []
    for concept_id in concept_ids:
        for layer in range(N_LAYERS):
            trace = rng.standard_normal(max(trace_len, 1)).astype("<f4")
            rows.append({
                "concept_id": concept_id, "layer": layer,
                "mean": float(trace.mean()), "max": float(trace.max()), "last": float(trace[-1]),
                "calibrated_z": float(trace.mean() * 3), "percentile": 0.5, "n_tokens": trace_len,
                "trace": trace.tobytes() if trace_len else None,
            })  # fmt: skip
    return rows


def register_concepts(factory: Callable[[], Session]) -> list[int]:
    rng = np.random.default_rng(1)
    with factory() as session, session.begin():
        return [
            store.add_concept_version(
                session, name=f"bench-{i}", vectors={15: rng.standard_normal(D_MODEL)},
                primary_layer=15, created_by="bench", model_id="bench", model_fingerprint="0" * 64,
                loader="none", hook_point="blocks.{layer}.hook_resid_post", d_model=D_MODEL,
                n_layers_model=N_LAYERS, method="mean_diff", pooling="mean", source="upload-json",
            ).id
            for i in range(N_CONCEPTS)
        ]  # fmt: skip


def create_requests(factory: Callable[[], Session], prefix: str, n: int) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(n)]
    now = utcnow()
    with factory() as session, session.begin():
        session.execute(
            insert(MonitoredRequest),
            [{"id": rid, "kind": "chat", "status": "done", "privacy_mode": "hash",
              "params": {}, "steered": False, "created_at": now} for rid in ids],
        )  # fmt: skip
    return ids


def per_request(factory, writer, request_ids: list[str], rows: list[dict], writers: int) -> None:
    """Each request in its own session and transaction; `writers` threads stand in for that many
    worker processes writing at once (psycopg releases the GIL while it waits on the server)."""

    def write(ids: list[str]) -> None:
        for request_id in ids:
            with factory() as session, session.begin():
                writer(session, request_id=request_id, rows=rows)

    if writers == 1:
        return write(request_ids)
    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, [request_ids[i::writers] for i in range(writers)]))


def all_at_once_insert(factory, request_ids: list[str], rows: list[dict]) -> None:
    now = utcnow()
    params = [{**row, "request_id": rid, "created_at": now} for rid in request_ids for row in rows]
    with factory() as session, session.begin():
        session.execute(insert(RequestScore.__table__), params)  # as store.insert_scores does


def all_at_once_copy(factory, request_ids: list[str], rows: list[dict]) -> None:
    # One COPY for everything: the per-request store function, minus its request lookup.
    now = utcnow()
    columns = store.COPY_COLUMNS
    with factory() as session, session.begin():
        cursor = session.connection().connection.driver_connection.cursor()
        sql = f"COPY request_scores ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        with cursor.copy(sql) as copy:
            copy.set_types(list(store.COPY_TYPES))
            for rid in request_ids:
                for row in rows:
                    values = {**row, "request_id": rid, "created_at": now}
                    copy.write_row(tuple(values[c] for c in columns))


def timed(label: str, n_rows: int, factory, run: Callable[[], None]) -> dict:
    with factory() as session, session.begin():
        session.execute(text("TRUNCATE request_scores"))  # same empty table and indexes each time
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    with factory() as session:
        stored = session.scalar(text("SELECT count(*) FROM request_scores"))
    assert stored == n_rows, f"{label}: wrote {stored} rows, expected {n_rows}"
    result = {"mode": label, "rows": n_rows, "seconds": round(seconds, 3),
              "rows_per_s": round(n_rows / seconds)}  # fmt: skip
    print(f"{label:<16} {n_rows:>9,} rows  {seconds:7.2f} s  {n_rows / seconds:>10,.0f} rows/s")
    return result


def admin_connection(admin_url: str) -> psycopg.Connection:
    plain = make_url(admin_url).set(drivername="postgresql").render_as_string(False)
    return psycopg.connect(plain, autocommit=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--trace-len", type=int, default=64, help="floats per trace (0 = no trace)")
    parser.add_argument("--no-trace", action="store_true")
    parser.add_argument("--admin-url", default=None, help="server URL with CREATE DATABASE rights")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("--writers", type=int, default=1, help="concurrent per-request writers")
    return parser.parse_args()


def run_modes(url: str, args: argparse.Namespace, trace_len: int, n_requests: int) -> list[dict]:
    engine = make_engine(url, pool_size=max(5, args.writers))
    try:
        factory = session_factory(engine)
        rows = score_rows(register_concepts(factory), trace_len)
        n_rows = n_requests * len(rows)
        modes = {
            "insert/request": lambda ids: per_request(factory, store.insert_scores, ids, rows, args.writers),
            "copy/request": lambda ids: per_request(factory, store.insert_scores_copy, ids, rows, args.writers),
            "insert/all": lambda ids: all_at_once_insert(factory, ids, rows),
            "copy/all": lambda ids: all_at_once_copy(factory, ids, rows),
        }
        results = []
        for label, run in modes.items():
            ids = create_requests(factory, label.replace("/", "-"), n_requests)
            results.append(timed(label, n_rows, factory, lambda: run(ids)))
        return results
    finally:
        engine.dispose()


def main() -> None:
    args = parse_args()
    admin_url = args.admin_url or os.environ.get("AUDITOR_BENCH_POSTGRES_URL", DEFAULT_ADMIN_URL)
    trace_len = 0 if args.no_trace else args.trace_len
    rows_per_request = N_CONCEPTS * N_LAYERS
    n_requests = max(1, args.rows // rows_per_request)

    name = f"auditor_ingest_{secrets.token_hex(4)}"
    with admin_connection(admin_url) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(normalize_url(admin_url)).set(database=name).render_as_string(False)
    try:
        run_migrations(url)
        print(
            f"{n_requests} requests x {rows_per_request} rows, trace {trace_len} floats, "
            f"{args.writers} writer(s), db {name}, load average {os.getloadavg()[0]:.2f} on "
            f"{os.cpu_count()} CPUs (other work on the machine skews the figures)"
        )
        results = run_modes(url, args, trace_len, n_requests)
        path = write_result("ingest", {
            "target_rows_per_s": 50_000, "trace_len": trace_len,
            "rows_per_request": rows_per_request, "writers": args.writers,
            "loadavg_1m_after": round(os.getloadavg()[0], 2), "results": results,
        })  # fmt: skip
        print(f"results: {path}")
    finally:
        if not args.keep:
            with admin_connection(admin_url) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
