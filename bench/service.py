"""The real distributed service on loopback, for benchmarks that measure it end to end.

    from service import running_service
    with running_service(workers=1) as svc:
        httpx.get(svc.base_url + "/readyz")

Starts, in this order: a throwaway Postgres database (migrated), a Redis database number
(flushed), `auditor worker` and `auditor api` as subprocesses with the same environment a
deployment gives them; waits for /readyz; and always tears all of it down again (processes,
database, Redis keys), also on an exception or Ctrl-C.

The same setup as the `service` fixture in tests/service/test_service.py, except that the API runs as its
own uvicorn process too: a benchmark must not share its GIL with the server it is timing.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from auditor.db.engine import normalize_url, run_migrations

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _issue_token(db_url: str) -> str:
    """A token with every scope, as `auditor token create` makes one."""
    from auditor.access import tokens
    from auditor.db.engine import make_engine, session_factory

    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            issued = tokens.create_token(
                session, name="bench", scopes=("admin", "client", "reader"), created_by="bench"
            )
            session.commit()
            return issued.token
    finally:
        engine.dispose()


@dataclass
class Service:
    base_url: str
    db_url: str
    broker_url: str
    workers: int
    torch_threads: int
    log_dir: Path
    token: str  # all scopes (admin, client, reader)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def logs(self, tail: int = 40) -> str:
        """The last lines of every process log, for a failure message."""
        out = []
        for path in sorted(self.log_dir.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(out)


def default_threads(workers: int) -> int:
    # Two for the usual single worker: what the service tests give it, and what the in-process
    # baselines must then also use for a like-for-like ratio.
    if workers == 1:
        return 2
    return max(1, (os.cpu_count() or 1) // workers)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _admin_engine(admin_url: str):
    # CREATE/DROP DATABASE cannot run inside a transaction block.
    return create_engine(normalize_url(admin_url), isolation_level="AUTOCOMMIT")


def _create_database(admin_url: str) -> tuple[str, str]:
    name = f"auditor_bench_{secrets.token_hex(6)}"
    engine = _admin_engine(admin_url)
    try:
        with engine.connect() as admin:
            admin.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return name, make_url(normalize_url(admin_url)).set(database=name).render_as_string(False)


def _drop_database(admin_url: str, name: str) -> None:
    engine = _admin_engine(admin_url)
    try:
        with engine.connect() as admin:
            # FORCE: a process we failed to stop must not keep the database alive.
            admin.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


def _start(name: str, args: list[str], env: dict, log_dir: Path) -> subprocess.Popen:
    # Output to files, never an unread PIPE: a chatty process would block once the pipe fills.
    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    # Own session: the process group is then exactly this process and anything it spawns, so
    # teardown reaches those too even if the parent hangs.
    proc = subprocess.Popen(
        args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    proc._bench_log = log  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Celery: warm shutdown; uvicorn: graceful exit
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # The group, even after a clean parent exit: an orphaned child would keep a model (and a
    # database connection) alive.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    proc._bench_log.close()  # type: ignore[attr-defined]


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """A `kill` of the benchmark unwinds through the finally blocks like Ctrl-C does."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def running_service(
    workers: int = 1,
    torch_threads: int | None = None,
    concurrency: int | None = None,
    admin_url: str | None = None,
    ready_timeout: float = 300.0,
    request_timeout: float = 600.0,
    data_dir: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Service]:
    """API + worker(s) on Redis and a fresh Postgres database; torn down on exit.

    `workers` is the number of `auditor worker` processes, each one model (and one model thread
    batching whatever its task threads hand it); `concurrency`, if given, is each worker's task
    thread count (default: the CLI's, AUDITOR_BATCH_MAX_SIZE + 2). The workers share one host
    name, so Celery warns about duplicate node names when there are several; harmless here."""
    import redis

    admin_url = admin_url or os.environ.get("AUDITOR_BENCH_POSTGRES_URL", DEFAULT_ADMIN_URL)
    threads = torch_threads or default_threads(workers)
    data_dir = data_dir or REPO / ".auditor"
    redis_db = _pick_redis_db()
    broker = f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"
    redis_client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=redis_db, socket_connect_timeout=3)
    db_name = None
    procs: list[subprocess.Popen] = []
    log_dir = Path(tempfile.mkdtemp(prefix="auditor-bench-"))
    failed = True
    with _sigterm_as_exit():
        try:
            redis_client.flushdb()
            db_name, db_url = _create_database(admin_url)
            run_migrations(db_url)
            token = _issue_token(db_url)
            env = {
                **os.environ,
                "AUDITOR_DATABASE_URL": db_url,
                "AUDITOR_BROKER_URL": broker,
                "AUDITOR_DATA_DIR": str(data_dir),  # shared extraction cache: no re-extraction
                "AUDITOR_TORCH_THREADS": str(threads),
                "AUDITOR_REQUEST_TIMEOUT": str(request_timeout),
                **(extra_env or {}),
            }
            worker_args = [sys.executable, "-m", "auditor.cli", "worker", "--loglevel", "WARNING"]
            if concurrency:
                worker_args += ["--concurrency", str(concurrency)]
            for number in range(workers):
                procs.append(_start(f"worker-{number}", worker_args, env, log_dir))
            port = free_port()
            procs.append(
                _start(
                    "api",
                    [
                        sys.executable,
                        "-m",
                        "auditor.cli",
                        "api",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                        "--no-migrate",
                    ],
                    env,
                    log_dir,
                )
            )
            service = Service(f"http://127.0.0.1:{port}", db_url, broker, workers, threads, log_dir, token)
            _wait_ready(service, procs, ready_timeout)
            yield service
            failed = False
        finally:
            for proc in reversed(procs):  # API first: no new work reaches a stopping worker
                _stop(proc, grace=30)
            if db_name is not None:
                _drop_database(admin_url, db_name)
            try:
                redis_client.flushdb()
            finally:
                redis_client.close()
            if failed:
                print(f"service logs kept in {log_dir}", file=sys.stderr)
            else:
                shutil.rmtree(log_dir, ignore_errors=True)


def _pick_redis_db() -> int:
    """A random database number 1..15, preferring an empty one: the service tests pick theirs
    the same way on the same server, and two services on one queue would steal each other's
    tasks (and our flushdb would wipe theirs)."""
    import redis

    numbers = random.sample(range(1, 16), 15)
    for number in numbers:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number, socket_connect_timeout=3)
        try:
            if client.dbsize() == 0:  # also fails fast, before anything is created, if Redis is down
                return number
        finally:
            client.close()
    return numbers[0]


def _wait_ready(service: Service, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[3]} exited with {proc.returncode}\n{service.logs()}")
        try:
            response = httpx.get(service.base_url + "/readyz", timeout=10)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.TransportError as exc:  # the API is still importing
            last = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"service not ready after {timeout:.0f}s: {last}\n{service.logs()}")


def service_rows(db_url: str, request_ids: list[str]) -> dict[str, dict]:
    """Per request id: its status, token counts and server-side timings, and how many score
    rows it has in Postgres. Ids missing from the database are absent from the result."""
    from auditor.db.engine import make_engine

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = (
                conn.execute(
                    text(
                        "SELECT r.id, r.status, r.error, r.completion_tokens, r.queue_seconds, r.prefill_seconds,"
                        " r.decode_seconds, (SELECT count(*) FROM request_scores s WHERE s.request_id = r.id) AS n_scores"
                        " FROM monitored_requests r WHERE r.id = ANY(:ids)"
                    ),
                    {"ids": list(request_ids)},
                )
                .mappings()
                .all()
            )
    finally:
        engine.dispose()
    return {row["id"]: dict(row) for row in rows}
