"""A real Prometheus server for tests: start it on a free loopback port with a generated config,
ask its HTTP API, wait for targets and alerts, and always stop it.

Reusable by any test that needs to see Auditor's metrics through Prometheus (tests/telemetry/test_alerting.py
scrapes a crafted metrics target; an end-to-end test can point it at a real API and worker).
Needs the `prometheus` and `promtool` binaries (Debian package `prometheus`, installed by
scripts/ensure-prometheus.sh); callers skip with `SKIP_REASON` when they are missing.
"""

from __future__ import annotations

import json
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
RULES_TESTS = REPO / "deploy" / "prometheus" / "rules.test.yml"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
SKIP_REASON = "prometheus/promtool not installed: run scripts/ensure-prometheus.sh (Debian package `prometheus`)"

T = TypeVar("T")


# ---- reading PromQL (no server needed) ----

_PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w$:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(?!\s*\()")


def series_references(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it is matched on) for every series a PromQL expression selects.

    Deliberately small: selectors `name{...}` and bare names, after removing strings, ranges,
    grouping clauses, Grafana variables and function calls. Enough for Auditor's dashboards and
    rules, and strict: an identifier it does not understand counts as a metric name, so a
    check against the exported metrics fails rather than passes."""
    found = []
    for name, matchers in _SELECTOR.findall(expr):
        labels = set(_MATCHER.findall(_STRING.sub('""', matchers)))
        if name:
            found.append((name, labels))
        elif "__name__" not in labels:
            raise ValueError(f"selector without a metric name in {expr!r}")
    rest = _SELECTOR.sub(" ", _STRING.sub('""', expr))
    rest = _GROUPING.sub(" ", re.sub(r"\[[^\]]*\]", " ", rest))
    rest = re.sub(r"\$\{[^}]*\}|\$\w+", " ", rest)
    rest = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?[smhdwy]?\b", " ", rest)
    for name in _IDENTIFIER.findall(rest):
        if name.lower() not in _PROMQL_WORDS:
            found.append((name, set()))
    return found


# ---- a Prometheus server ----


def free_port() -> int:
    """A loopback port nobody listens on right now (a race with other processes is possible
    but short; start_prometheus retries on a taken port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call `probe` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = probe()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError) as exc:  # not up yet
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what}"
                + (f" (last error: {last_error})" if last_error else "")
            )
        time.sleep(interval)


def promtool(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL or "promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def rules_with_short_for(source: Path, destination: Path, hold: str = "1s") -> Path:
    """A copy of a rules file whose alerts need their condition for only `hold`.

    A test cannot wait out `for: 15m`; everything else (expressions, labels, annotations) is
    the file's own, so an alert that fires here fires in production once its `for` has passed.
    The `for` durations themselves are covered by `promtool test rules`."""
    document = yaml.safe_load(source.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = hold
    destination.write_text(yaml.safe_dump(document, sort_keys=False))
    return destination


def write_config(
    path: Path, jobs: Mapping[str, Sequence[str]], rule_files: Sequence[Path] = (), interval: str = "1s"
) -> Path:
    """A Prometheus config scraping `jobs` ({job name: ["host:port", ...]}) at /metrics."""
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": list(targets)}]}
            for job, targets in jobs.items()
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log_path: Path

    # ---- HTTP API ----

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # 400 bad_data etc. carry a JSON error body
            body = json.load(exc)
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def targets(self, job: str | None = None) -> list[dict]:
        active = self.api("targets", state="active")["activeTargets"]
        return [t for t in active if job is None or t["labels"].get("job") == job]

    def alerts(self, name: str | None = None) -> list[dict]:
        found = self.api("alerts")["alerts"]
        return [a for a in found if name is None or a["labels"]["alertname"] == name]

    # ---- waiting ----

    def wait_for_target_up(self, job: str, timeout: float = 15) -> list[dict]:
        return wait_until(lambda: [t for t in self.targets(job) if t["health"] == "up"], timeout, f"target {job} up")

    def wait_for_alert(
        self, name: str, state: str = "firing", timeout: float = 20, labels: Mapping[str, str] | None = None
    ) -> dict:
        """The first alert `name` in `state` ("pending" or "firing") whose labels include `labels`."""

        def match() -> dict | None:
            for alert in self.alerts(name):
                if alert["state"] == state and all(alert["labels"].get(k) == v for k, v in (labels or {}).items()):
                    return alert
            return None

        try:
            return wait_until(match, timeout, f"alert {name} {state}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; alerts now: {self.alerts()}") from None

    def wait_for_evaluations(self, count: int = 2, timeout: float = 15) -> None:
        """Until every rule group has been evaluated `count` more times from now."""

        def stamps() -> list[str]:
            return [group["lastEvaluation"] for group in self.api("rules")["groups"]]

        seen = [stamps()]

        def advanced() -> bool:
            now = stamps()
            if now != seen[-1]:
                seen.append(now)
            return len(seen) > count

        wait_until(advanced, timeout, f"{count} rule evaluations", interval=0.1)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class PrometheusError(RuntimeError):
    pass


@contextmanager
def start_prometheus(
    workdir: Path,
    jobs: Mapping[str, Sequence[str]],
    rule_files: Sequence[Path] = (),
    interval: str = "1s",
    startup_timeout: float = 20,
) -> Iterator[Prometheus]:
    """Run `prometheus` on 127.0.0.1:<free port> scraping `jobs`, with its data in `workdir`;
    stopped (and killed if it does not stop) on exit, whatever happened."""
    if PROMETHEUS is None:
        raise RuntimeError(SKIP_REASON)
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "prometheus.yml", jobs, rule_files, interval)
    for attempt in range(3):  # another process may take the free port before we bind it
        port = free_port()
        log_path = workdir / f"prometheus-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
            )  # fmt: skip
        server = Prometheus(f"http://127.0.0.1:{port}", process, log_path)
        try:
            wait_until(lambda: process.poll() is not None or _ready(server.url), startup_timeout, "prometheus ready")
            if process.poll() is None:
                break
            if "address already in use" not in log_path.read_text(errors="replace"):
                raise RuntimeError(f"prometheus exited with {process.returncode}:\n{server.log_tail()}")
        except BaseException:
            stop(process)
            raise
    else:
        raise RuntimeError("prometheus could not bind a free port in 3 attempts")
    try:
        yield server
    finally:
        stop(process)


def _ready(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
        return response.status == 200


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)


@contextmanager
def python_process(
    code: str, *args: object, env: Mapping[str, str], ready: str = "ready", timeout: float = 30
) -> Iterator[subprocess.Popen]:
    """Run `code` in a fresh interpreter (from the repo root) until the block ends.

    The child prints `ready` on a line once it serves; it reads commands from stdin (the
    caller writes lines with `send`) and must exit when stdin closes. Its stderr goes to a
    file (a pipe nobody reads could fill and block it) and is shown if it fails to start."""
    errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - outlives this function, closed by the caller
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        env=dict(env), cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True,
    )  # fmt: skip
    try:
        readable, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if readable else ""
        if line.strip() != ready:
            stop(process)
            errors.seek(0)
            raise RuntimeError(
                f"child did not print {ready!r} (exit {process.poll()}, printed {line!r}):\n{errors.read()[-3000:]}"
            )
        yield process
    finally:
        if process.stdin and not process.stdin.closed:
            try:
                process.stdin.close()
            except BrokenPipeError:
                pass
        stop(process)
        errors.close()


def send(process: subprocess.Popen, command: str) -> None:
    process.stdin.write(command + "\n")
    process.stdin.flush()
