"""prometheus_client's multiprocess mode: the directory every process writes its values to.

When PROMETHEUS_MULTIPROC_DIR is set in the environment, every process writes its values to files
in that directory, and whichever process serves /metrics aggregates all of them with
MultiProcessCollector. The variable must be in the environment before the process starts:
prometheus_client picks its value storage (files or memory) when it is first imported, and this
module reads the variable once, at the same moment, so the two agree. The directory must start
empty for each deployment (a tmpfs in docker-compose), or counters of a previous run are added in.
Without the variable, metrics live in prometheus_client's default registry of this process.

Nothing here touches the filesystem at import: `ensure_multiprocess_dir` creates the directory
when the metrics are first defined (auditor.telemetry.definitions), which is the first moment
prometheus_client opens a file in it.
"""

from __future__ import annotations

import os

from prometheus_client import multiprocess

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_multiproc_dir = os.environ.get(MULTIPROC_DIR_ENV)


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, or None when this process keeps its own metrics."""
    return _multiproc_dir or None


def ensure_multiprocess_dir() -> str | None:
    """Create the multiprocess directory if it is missing (idempotent); -> multiprocess_dir().

    prometheus_client opens this process's value file in it as soon as a metric without labels is
    defined: a missing directory would fail that with FileNotFoundError."""
    path = multiprocess_dir()
    if path:
        os.makedirs(path, exist_ok=True)
    return path


def mark_process_dead(pid: int | None = None, path: str | None = None) -> None:
    """Multiprocess mode: forget a dead process's live gauges (worker_up, model load time).
    Call from the parent when a child exits, or from a process's own shutdown hook with its
    pid. Its counters and histograms stay: they are totals. No-op without multiprocess mode."""
    path = path or multiprocess_dir()
    if path:
        multiprocess.mark_process_dead(os.getpid() if pid is None else pid, path)
