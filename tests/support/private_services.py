"""Private Postgres and Redis servers, and the Auditor service on them, for fault tests.

The shared servers on 5432 and 6379 serve other tests at the same time and must never be
stopped. Fault tests start their own on free ports instead, in a temporary directory: a Redis
(`redis-server --save "" --appendonly no`: a restart loses everything, the harshest case) and a
Postgres cluster (initdb / pg_ctl, trust auth, its socket in the same directory; run as the
`postgres` user when we are root, since initdb refuses root). Either can be stopped and started
again on the same port while the API and the workers keep running.

`Stack` runs `auditor api` and any number of `auditor worker` processes on them, as
bench/service.py does on the shared servers (its process helpers are copied here rather than
imported: bench/ is not a package). Every process is its own session leader, so teardown
reaches whatever it spawned.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


class Unavailable(Exception):
    """The binaries this needs are not installed: the message is the skip reason."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"--- {path.name} (last {len(text)} lines)\n" + "\n".join(text)


# ---- Redis ----


class PrivateRedis:
    def __init__(self, workdir: Path, appendonly: bool = False):
        self.binary = shutil.which("redis-server")
        self.appendonly = appendonly  # off: a restart loses everything; on: as compose runs it
        if self.binary is None:
            raise Unavailable("redis-server is not installed (apt-get install redis-server)")
        self.workdir, self.port = workdir, free_port()
        self.log = workdir / "redis.log"
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """On the same port every time: clients reconnect to the address they know."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "yes" if self.appendonly else "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _wait_for(self.ping, 10, f"private redis on port {self.port}")

    def ping(self) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM: a clean shutdown that, with persistence off, forgets every key."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


# ---- Postgres ----


def _postgres_bindir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    if found := shutil.which("initdb"):
        return Path(found).parent
    raise Unavailable("Postgres server binaries (initdb, pg_ctl) not found in /usr/lib/postgresql/*/bin or PATH")


class PrivatePostgres:
    """A throwaway cluster: trust auth for `postgres`, fsync off, its socket in its own dir."""

    def __init__(self):
        self.bindir = _postgres_bindir()
        # initdb refuses to run as root: as root, hand the cluster to the `postgres` user.
        self.as_user: list[str] = []
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise Unavailable("running as root and there is no `postgres` user to run initdb as") from None
            runuser = shutil.which("runuser")
            if runuser is None:
                raise Unavailable("running as root without `runuser` to run initdb as postgres")
            self.as_user = [runuser, "-u", "postgres", "--"]
        # Directly in /tmp: pytest's tmp dirs are private to root, unreadable for `postgres`.
        self.root = Path(tempfile.mkdtemp(prefix="auditor-faults-pg-"))
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data, self.log, self.port = self.root / "data", self.root / "postgres.log", free_port()

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        done = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}\n{_tail(self.log)}"
            )

    def init(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """`fast` ends every session at once (clients see their connections drop), as a
        restart by an operator or a crash-restart by a supervisor does."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


# ---- the service on them ----


def _start(name: str, args: list[str], env: dict, log_dir: Path) -> subprocess.Popen:
    # Output to files, never an unread PIPE: a chatty process would block once the pipe fills.
    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
    )
    proc._log = log  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Celery: warm shutdown; uvicorn: graceful exit
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # the group, even after a clean exit: an orphan would keep a model and connections alive
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    proc._log.close()  # type: ignore[attr-defined]


@dataclass
class Worker:
    proc: subprocess.Popen
    metrics_port: int
    name: str

    @property
    def node_prefix(self) -> str:
        """Its Celery node name starts with this (`auditor worker` names itself by pid)."""
        return f"auditor-{self.proc.pid}@"

    def warm(self) -> bool:
        """True once its model and calibrated bank are loaded (auditor_worker_up is 1)."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return False
        return any(re.match(r"auditor_worker_up\{.*\} 1(\.0)?$", line) for line in text.splitlines())


@dataclass
class Stack:
    """`auditor api` and `auditor worker` processes on a private Redis and Postgres."""

    redis: PrivateRedis
    postgres: PrivatePostgres
    db_url: str
    env: dict[str, str]
    log_dir: Path
    base_url: str = ""
    token: str = ""
    api: subprocess.Popen | None = None
    workers: list[Worker] = field(default_factory=list)
    _count: int = 0

    def start_api(self, timeout: float = 120) -> None:
        port = free_port()
        self.api = _start(
            "api",
            [sys.executable, "-m", "auditor.cli", "api", "--host", "127.0.0.1", "--port", str(port), "--no-migrate"],
            self.env,
            self.log_dir,
        )
        self.base_url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert self.api.poll() is None, f"the API exited\n{self.logs()}"
            try:
                return httpx.get(self.base_url + "/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_for(up, timeout, "API /healthz", interval=0.3)

    def start_worker(self) -> Worker:
        port = free_port()
        self._count += 1
        name = f"worker-{self._count}"
        proc = _start(
            name,
            [sys.executable, "-m", "auditor.cli", "worker", "--loglevel", "WARNING"],
            {**self.env, "AUDITOR_WORKER_METRICS_PORT": str(port)},
            self.log_dir,
        )
        worker = Worker(proc, port, name)
        self.workers.append(worker)
        return worker

    def live_workers(self) -> list[Worker]:
        return [w for w in self.workers if w.proc.poll() is None]

    def ensure_workers(self, n: int, timeout: float = 240) -> list[Worker]:
        """At least `n` live, warm workers. New ones start one after another: the first
        calibrates the concept bank and stores it, the next only reads it back."""
        while len(self.live_workers()) < n:
            worker = self.start_worker()
            self.wait_warm(worker, timeout)
        for worker in self.live_workers():
            self.wait_warm(worker, timeout)
        return self.live_workers()

    def wait_warm(self, worker: Worker, timeout: float) -> None:
        def warm() -> bool:
            assert worker.proc.poll() is None, f"{worker.name} exited with {worker.proc.returncode}\n{self.logs()}"
            return worker.warm()

        _wait_for(warm, timeout, f"{worker.name} warm-up", interval=0.5)

    def kill(self, worker: Worker) -> None:
        """SIGKILL: no shutdown hooks, no acks, no reject; only Redis's visibility timeout
        can bring its tasks back."""
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(timeout=10)

    def worker_log(self, worker: Worker) -> str:
        return (self.log_dir / f"{worker.name}.log").read_text(errors="replace")

    def logs(self, lines: int = 40) -> str:
        return "\n".join(_tail(path, lines) for path in sorted(self.log_dir.glob("*.log")))

    def close(self) -> None:
        for worker in self.workers:  # first: no task is left half-way on a stopping API
            _stop(worker.proc, grace=10)
        if self.api is not None:
            _stop(self.api, grace=10)
