"""The commands that start the service's processes, or ready the database for them: `run` (the
API with an in-process worker, or the API alone beside a broker), `api`, `worker`, `beat` and
`migrate`.

Plain functions: `auditor/cli/__init__.py` registers them on the app, in `--help` order.
uvicorn, the API app, Celery and `workers` are imported inside the commands, so `auditor --help`
does not wait for them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Annotated

import typer

from auditor.cli.app import clear_errors, console, err_console
from auditor.cli.tokens import TOKEN_FILE, embedded_admin_token
from auditor.data_dir import ensure_private_dir
from auditor.settings import get_settings

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _check_log_level(value: str) -> str:
    # Checked here, not by uvicorn: it would fail only after the model has loaded.
    if value.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"choose one of {', '.join(LOG_LEVELS)}")
    return value.lower()


LogLevel = Annotated[
    str, typer.Option("--log-level", callback=_check_log_level, help=f"uvicorn's: {', '.join(LOG_LEVELS)}")
]


def migrate(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Bring the database (AUDITOR_DATABASE_URL, default SQLite in the data dir) to a revision."""
    from auditor.db.engine import database_url, run_migrations

    with clear_errors():
        url = database_url(get_settings())
        run_migrations(url, revision)
    console.print(f"database at {revision}: {url.split('@')[-1]}")


def api(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    migrate_first: Annotated[bool, typer.Option("--migrate/--no-migrate", help="run migrations before serving")] = True,
    log_level: LogLevel = "info",
) -> None:
    """Serve the HTTP API (admin concepts, health, OpenAPI docs at /docs)."""
    import uvicorn

    from auditor.api.main import create_app
    from auditor.db.engine import database_url, run_migrations

    settings = get_settings()
    with clear_errors():
        if migrate_first:
            run_migrations(database_url(settings))
        application = create_app(settings)
    console.print(f"Auditor API on http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    uvicorn.run(application, host=host, port=port, log_level=log_level)


def worker(
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="task threads; default: AUDITOR_BATCH_MAX_SIZE + 2")
    ] = None,
    loglevel: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Run a Celery worker on AUDITOR_BROKER_URL: one process, one model, loaded lazily on the
    first task. Task threads hand requests to the model thread, which generates the ones that
    arrive together as one batch. For more model copies, run more workers."""
    settings = get_settings()
    if not settings.broker_url:
        err_console.print(
            "[bold red]error:[/] AUDITOR_BROKER_URL is not set (the embedded default needs no worker: `auditor run`)"
        )
        raise typer.Exit(2)
    from workers.tasks import celery_app

    threads = concurrency or settings.batch_max_size + 2
    # A node name per process: several workers on one host must not all be "celery@host"
    # (Celery warns, and /readyz could not count them apart).
    node = f"auditor-{os.getpid()}@%h"
    os.environ["AUDITOR_WORKER_POOL"] = "threads"  # lets workers.tasks warm the model up at start
    _serve_worker_metrics(settings.worker_metrics_port)
    celery_app.worker_main(
        ["worker", f"--loglevel={loglevel}", f"--concurrency={threads}", "--pool=threads", f"--hostname={node}"]
    )


def beat(loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run Celery beat on AUDITOR_BROKER_URL: it sends the retention job (auditor.retention, every
    AUDITOR_RETENTION_INTERVAL_SECONDS) to the workers, which fold requests older than
    AUDITOR_RETENTION_DAYS into daily rollups and delete them. One per deployment (a second
    would only repeat the work: retention is safe to run concurrently). `auditor run` without a
    broker runs retention in-process instead."""
    settings = get_settings()
    if not settings.broker_url:
        err_console.print("[bold red]error:[/] AUDITOR_BROKER_URL is not set (`auditor run` runs retention in-process)")
        raise typer.Exit(2)
    from auditor.queue.dispatch import make_celery

    celery_app = make_celery(settings)
    if not celery_app.conf.beat_schedule:
        err_console.print(
            "[yellow]warning:[/] retention is off (AUDITOR_RETENTION_DAYS or "
            "AUDITOR_RETENTION_INTERVAL_SECONDS is 0): nothing to schedule"
        )
    schedule_file = ensure_private_dir(settings.data_dir) / "celerybeat-schedule"  # when each entry last ran
    celery_app.start(["beat", f"--loglevel={loglevel}", f"--schedule={schedule_file}"])


def _serve_worker_metrics(port: int) -> None:
    """Prometheus scrapes each worker here (the API serves its own /metrics)."""
    if not port:
        return
    from auditor.telemetry import metrics

    try:
        metrics.start_worker_metrics_server(port)
    except OSError as exc:  # another worker on this host has the port: serve without, say so
        err_console.print(f"[yellow]warning:[/] worker metrics not served on port {port}: {exc}")


def run(
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    log_level: LogLevel = "info",
) -> None:
    """The main job: the API with an in-process worker (embedded default: SQLite, no broker).
    With AUDITOR_BROKER_URL set, the API alone; run `auditor worker` processes beside it."""
    import uvicorn

    from auditor.api.main import create_app
    from auditor.db.engine import database_url, run_migrations

    settings = get_settings()
    dispatcher = None
    with clear_errors():
        url = database_url(settings)
        run_migrations(url)
        if not settings.broker_url:
            from workers.serving.inprocess import InProcessDispatcher

            with _step_bars() as progress:
                dispatcher = InProcessDispatcher(settings, progress)
                dispatcher.warm_up()
            from auditor.telemetry import metrics

            metrics.set_worker_up(dispatcher.runtime.host.model.fingerprint.model_id)
            from auditor.db.retention import RetentionLoop

            RetentionLoop(settings, dispatcher.runtime.sessions).start()  # no broker, so no beat
        application = create_app(settings, dispatcher)
        token = embedded_admin_token(url, settings.data_dir)
    base = f"http://{host}:{port}"
    # print, not rich: the commands must survive copy-paste unwrapped at any terminal width.
    print(f"""Auditor on {base}  (database: {url.split("@")[-1]}; docs: {base}/docs)

Admin token for this run (scopes admin, client, reader; also in {settings.data_dir / TOKEN_FILE}):

  export AUDITOR_TOKEN={token}

  curl -s {base}/v1/chat/completions -H "Authorization: Bearer $AUDITOR_TOKEN" -H 'content-type: application/json' \\
       -d '{{"model": "auditor", "messages": [{{"role": "user", "content": "Any advice for learning guitar?"}}], "max_tokens": 40, "temperature": 0}}'

  python -c "from openai import OpenAI; import os; c = OpenAI(base_url='{base}/v1', api_key=os.environ['AUDITOR_TOKEN']); \\
r = c.chat.completions.create(model='auditor', messages=[{{'role': 'user', 'content': 'Hi!'}}], max_tokens=30, temperature=0); \\
print(r.choices[0].message.content, r.model_extra['auditor'])"
""")
    uvicorn.run(application, host=host, port=port, log_level=log_level)


@contextmanager
def _step_bars():
    """A StepProgress (workers.serving.warmup) drawing one rich bar per long warm-up step, with counts,
    elapsed time and the time left; the first line says what happens before the first bar."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    ) as bars:
        bars.console.print(
            "loading the model, registering the built-in concepts, calibrating on ordinary answers "
            "(stored: later starts reuse it)"
        )

        def start(description: str, total: int):
            task = bars.add_task(description, total=total)
            return lambda n: bars.advance(task, n)

        yield start
