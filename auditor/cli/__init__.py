"""`auditor` command line. The composition root: the one module in `auditor/` that imports
`workers/` (to load the model and run probes, steering and evaluations)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from auditor.cli.report import report
from auditor.errors import AuditorError, InvalidInputError
from auditor.settings import Settings, get_settings

app = typer.Typer(
    help="Auditor: concept vectors, probes and steering on a served language model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # error lines stay whole and greppable

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


def _check_log_level(value: str) -> str:
    # Checked here, not by uvicorn: it would fail only after the model has loaded.
    if value.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"choose one of {', '.join(LOG_LEVELS)}")
    return value.lower()


LogLevel = Annotated[
    str, typer.Option("--log-level", callback=_check_log_level, help=f"uvicorn's: {', '.join(LOG_LEVELS)}")
]
Method = Annotated[
    str | None,
    typer.Option(help="mean_diff (article), logistic, pca or lda (shrinkage covariance); default from settings"),
]
Pooling = Annotated[str | None, typer.Option(help="mean (sink excluded) or last token; default from settings")]


@contextmanager
def _clear_errors() -> Iterator[None]:
    """Bad input and known failures print one line, not a traceback."""
    try:
        yield
    except InvalidInputError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except AuditorError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None


def _concepts(names: list[str]) -> list:
    """Resolve concept names (or JSON files) before the model loads, so a typo fails fast."""
    from probes.concepts import load_concept

    with _clear_errors():
        return [load_concept(name) for name in names]


@contextmanager
def _model_host(settings: Settings | None = None):
    from workers.serving.host import ModelHost

    settings = settings or get_settings()
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
        disable=not err_console.is_terminal and "pytest" in sys.modules,
    ) as progress:

        def start_task(description: str, total: int):
            task = progress.add_task(description, total=total)
            return lambda n: progress.advance(task, n)

        host = ModelHost(settings, progress=start_task)
        with _clear_errors():
            with err_console.status(f"loading model {settings.model}…"):
                host.model  # noqa: B018 - load now, so the spinner covers it
            yield host


def _parse_layer(layer: str, host) -> int | None:
    if layer == "auto":
        return None
    try:
        value = int(layer)
    except ValueError:
        raise InvalidInputError(f"--layer must be an integer or 'auto', got {layer!r}") from None
    from probes.validation import check_layer

    return check_layer(value, host.model.n_layers)


@app.command()
def concepts() -> None:
    """List the built-in concepts."""
    from probes.concepts import builtin_concepts, load_concept

    table = Table("concept", "status", "pairs", "neutral", "description")
    for name in builtin_concepts():
        definition = load_concept(name)
        status = definition.status if definition.status == "stable" else f"[yellow]{definition.status}[/]"
        note = f" [dim]({definition.status_note})[/]" if definition.status_note else ""
        table.add_row(
            name, status, str(definition.n_pairs), str(len(definition.neutral)), definition.description + note
        )
    console.print(table)


@app.command()
def extract(
    concept: Annotated[
        list[str], typer.Option("--concept", "-c", help="built-in name or JSON file; repeatable; default all built-ins")
    ] = [],
    method: Method = None,
    pooling: Pooling = None,
    export: Annotated[Path | None, typer.Option(help="also write <concept>.safetensors + .json here")] = None,
) -> None:
    """Extract concept vectors at every layer and pick each concept's layer by held-out pairs."""
    from probes.concepts import builtin_concepts
    from workers.monitoring.concepts import save_vectors

    definitions = _concepts(concept or builtin_concepts())
    with _model_host() as host:
        table = Table("concept", "pairs", "method", "pooling", "auto layer", "held-out AUROC", "vector hash")
        for definition in definitions:
            vectors = host.vectors(definition, method, pooling)
            best = next((r for r in vectors.sweep if r.layer == vectors.auto_layer), None)
            table.add_row(
                vectors.name,
                str(vectors.provenance["n_pairs"]),
                vectors.provenance["method"],
                vectors.provenance["pooling"],
                str(vectors.auto_layer),
                f"{best.auroc:.3f}" if best else "-",
                vectors.vector_hash[:12],
            )
            if export is not None:
                save_vectors(vectors, export / f"{vectors.name}.safetensors")
                (export / f"{vectors.name}.json").write_text(json.dumps(vectors.provenance, indent=2))
        console.print(table)
        console.print(f"vectors cached under {host.settings.data_dir / 'vectors'}")


@app.command()
def sweep(
    concept: Annotated[str, typer.Option("--concept", "-c", help="built-in name or JSON file")],
    method: Method = None,
    pooling: Pooling = None,
    plot: Annotated[Path | None, typer.Option(help="PNG path; default <data_dir>/sweep-<concept>.png")] = None,
) -> None:
    """Held-out separation of the concept's pairs at every layer, as a table and a PNG plot."""
    from auditor.cli.plots import plot_sweep

    [definition] = _concepts([concept])
    with _model_host() as host:
        vectors = host.vectors(definition, method, pooling)
        table = Table("layer", "held-out AUROC", "effect size (d)", "")
        for row in vectors.sweep:
            mark = "◀ auto" if row.layer == vectors.auto_layer else ""
            table.add_row(str(row.layer), f"{row.auroc:.3f}", f"{row.effect_size:.2f}", mark)
        console.print(table)
        path = plot or host.settings.data_dir / f"sweep-{vectors.name}.png"
        plot_sweep(vectors.sweep, vectors.auto_layer, vectors.name, path)
        console.print(f"plot written to {path}")


@app.command()
def probe(
    texts: Annotated[list[str], typer.Argument(help="one or more texts to score")],
    concept: Annotated[list[str], typer.Option("--concept", "-c", help="repeatable; default all built-ins")] = [],
) -> None:
    """Score texts against concepts at each concept's auto layer (raw cosine, z, percentile)."""
    _concepts(concept)
    with _model_host() as host:
        bank = host.bank(concept or None)
        scores = host.probe(texts, bank)
        for t, text in enumerate(texts):
            table = Table("concept", "layer", "cosine", "z vs neutral", "percentile", title=text[:80])
            for k, name in enumerate(bank.names):
                li = bank.layer_index(bank.auto_layers[name])
                z = float(scores["z"][t, li, k])
                table.add_row(
                    name,
                    str(bank.auto_layers[name]),
                    f"{float(scores['raw'][t, li, k]):+.4f}",
                    _colour_z(z),
                    f"{100 * float(scores['percentile'][t, li, k]):.0f}%",
                )
            console.print(table)


def _colour_z(z: float) -> str:
    colour = "red" if z >= 2 else "yellow" if z >= 1 else "default"
    return f"[{colour}]{z:+.2f}[/]"


@app.command()
def steer(
    prompt: Annotated[str, typer.Argument(help="the user prompt (chat template applied for chat models)")],
    concept: Annotated[str, typer.Option("--concept", "-c")],
    alpha: Annotated[float, typer.Option("--alpha", "-a", help="strength; absolute, or relative with --relative")],
    layer: Annotated[str, typer.Option(help="layer index or 'auto'")] = "auto",
    relative: Annotated[bool, typer.Option(help="alpha in units of the layer's typical residual norm")] = False,
    scope: Annotated[str, typer.Option(help="'generated' (from the last prompt token on) or 'all'")] = "generated",
    max_tokens: Annotated[int, typer.Option(min=1, max=1024)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    seed: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Generate with and without steering, side by side, with each output's probe scores."""
    from workers.runtime.generate import SamplingConfig
    from workers.serving.host import SteerRequest

    _concepts([concept])
    with _model_host() as host:
        bank = host.bank()
        request = SteerRequest(concept, alpha, _parse_layer(layer, host), scope, relative)
        sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, seed=seed)
        baseline = host.generate(prompt, sampling, bank=bank)
        steered = host.generate(prompt, sampling, steer=[request], bank=bank)
        _print_side_by_side(bank, baseline, steered, request)


def _print_side_by_side(bank, baseline, steered, request) -> None:
    where = f"layer {request.layer if request.layer is not None else bank.auto_layers.get(request.concept, 'auto')}"
    table = Table(
        "",
        "baseline",
        f"steered: {request.concept} α={request.alpha:g}{' (relative)' if request.relative else ''} at {where}",
        show_lines=True,
    )
    table.add_row("output", baseline.text, steered.text)
    for name in bank.names:
        layer = bank.auto_layers[name]
        base, new = baseline.scores.at(name, layer), steered.scores.at(name, layer)
        table.add_row(f"{name} z (L{layer})", _colour_z(base["z"]), _colour_z(new["z"]))
    console.print(table)


@app.command("eval")
def evaluate(
    file: Annotated[Path, typer.Argument(help='JSONL with {"text": ..., "label": 0|1} per line')],
    concept: Annotated[str, typer.Option("--concept", "-c")],
    layer: Annotated[str, typer.Option(help="layer index or 'auto' (chosen from the concept's own pairs)")] = "auto",
    flip: Annotated[bool, typer.Option(help="invert labels (label 0 = concept present)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    method: Method = None,
    pooling: Pooling = None,
    limit: Annotated[int | None, typer.Option(min=2, help="use only the first N rows")] = None,
    n_boot: Annotated[int, typer.Option(min=100, help="bootstrap resamples for the CI")] = 1000,
) -> None:
    """AUROC (95% bootstrap CI) of a concept's score at separating label 1 from label 0."""
    from auditor.cli.datasets import read_labelled_jsonl
    from workers.monitoring.evaluation import evaluate_vectors

    with _clear_errors():
        data = read_labelled_jsonl(file, flip=flip, limit=limit)  # fail fast, before the model loads
    [definition] = _concepts([concept])
    with _model_host() as host:
        vectors = host.vectors(definition, method, pooling)
        result = evaluate_vectors(
            host.model,
            vectors,
            data.texts,
            data.labels,
            _parse_layer(layer, host),
            host.settings.batch_size,
            n_boot,
            definition=definition,
        )
        est = result.estimate
        report = {
            "concept": result.concept,
            "file": str(file),
            "flip": flip,
            "layer": result.layer,
            "auroc": round(est.auroc, 4),
            "ci_low": round(est.ci_low, 4),
            "ci_high": round(est.ci_high, 4),
            "n": est.n,
            "n_positive": est.n_positive,
            "method": vectors.provenance["method"],
            "pooling": vectors.provenance["pooling"],
            "vector_hash": vectors.vector_hash,
            "status": definition.status,
            "baselines": {
                name: {"auroc": round(b.auroc, 4), "ci_low": round(b.ci_low, 4), "ci_high": round(b.ci_high, 4)}
                for name, b in result.baselines.items()
            },
            "beats_keyword": result.beats_keyword,
        }
        if as_json:
            print(json.dumps(report))
        else:
            console.print(
                f"{result.concept} on {file.name}{' (flipped)' if flip else ''}: AUROC "
                f"[bold]{est.auroc:.3f}[/] (95% CI {est.ci_low:.3f}–{est.ci_high:.3f}) at layer "
                f"{result.layer}, n={est.n} ({est.n_positive} positive)"
            )
            table = Table("text-only baseline", "AUROC", "95% CI", "probe beats it")
            for name, b in result.baselines.items():
                label = {
                    "keyword": "keyword count (the concept's lexicon)",
                    "bag_of_words": "bag of words, 5-fold CV on this file",
                }[name]
                table.add_row(
                    label,
                    f"{b.auroc:.3f}",
                    f"{b.ci_low:.3f}–{b.ci_high:.3f}",
                    "yes" if est.auroc > b.auroc else "[bold red]no[/]",
                )
            console.print(table)
            if "keyword" not in result.baselines:
                console.print(f"{definition.name} declares no lexicon: no keyword baseline")
            if "bag_of_words" not in result.baselines:
                console.print("fewer than two texts of one label: no cross-validated bag-of-words baseline")


@app.command()
def demo(
    prompt: Annotated[
        str, typer.Option(help="prompt to steer")
    ] = "I'm thinking about learning to play guitar. Any advice for getting started?",
    alpha: Annotated[float, typer.Option(help="steering strength relative to the layer's typical residual norm")] = 0.2,
) -> None:
    """Extract the built-in concepts, probe a few texts, steer one prompt, print the results."""
    from workers.runtime.generate import SamplingConfig
    from workers.serving.host import SteerRequest

    with _model_host() as host:
        bank = host.bank()
        table = Table("concept", "pairs", "auto layer", "held-out AUROC")
        for name in bank.names:
            vectors = bank.vectors[name]
            best = next(r for r in vectors.sweep if r.layer == vectors.auto_layer)
            table.add_row(name, str(vectors.provenance["n_pairs"]), str(vectors.auto_layer), f"{best.auroc:.3f}")
        console.print(table)
        samples = [
            "I have a bad feeling about this deployment; it's going to go wrong again.",
            "This looks promising, let's ship it.",
            "Honestly, for scripting like this I'd always reach for Python.",
            "URGENT: reply within the hour or the account will be closed.",
        ]
        scores = host.probe(samples, bank)
        probe_table = Table(title="probe z-scores vs neutral text", expand=True)
        probe_table.add_column("text", ratio=4)
        for name in bank.names:
            probe_table.add_column(f"{name}\nL{bank.auto_layers[name]}", ratio=1, justify="right")
        for t, text in enumerate(samples):
            cells = [
                _colour_z(float(scores["z"][t, bank.layer_index(bank.auto_layers[n]), k]))
                for k, n in enumerate(bank.names)
            ]
            probe_table.add_row(text, *cells)
        console.print(probe_table)
        request = SteerRequest("pessimism", alpha, None, "generated", relative=True)
        sampling = SamplingConfig(max_new_tokens=48)
        _print_side_by_side(
            bank, host.generate(prompt, sampling, bank=bank), host.generate(prompt, sampling, [request], bank), request
        )


@app.command()
def migrate(revision: Annotated[str, typer.Argument(help="target revision")] = "head") -> None:
    """Bring the database (AUDITOR_DATABASE_URL, default SQLite in the data dir) to a revision."""
    from auditor.db.engine import database_url, run_migrations

    with _clear_errors():
        url = database_url(get_settings())
        run_migrations(url, revision)
    console.print(f"database at {revision}: {url.split('@')[-1]}")


@app.command()
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
    with _clear_errors():
        if migrate_first:
            run_migrations(database_url(settings))
        application = create_app(settings)
    console.print(f"Auditor API on http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    uvicorn.run(application, host=host, port=port, log_level=log_level)


@app.command()
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


@app.command()
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
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    schedule_file = settings.data_dir / "celerybeat-schedule"  # when each entry last ran
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


@app.command()
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
    with _clear_errors():
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
        token = _embedded_admin_token(url, settings.data_dir)
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


TOKEN_FILE = "admin-token"


def _embedded_admin_token(url: str, data_dir: Path) -> str:
    """A fresh all-scopes token for this run of the embedded default; the previous run's is
    revoked. Also written (mode 0600) to the data dir, for scripts."""
    from auditor.access import audit_log, tokens
    from auditor.db.engine import make_engine, session_factory
    from auditor.db.models import SCOPES

    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            revoked = tokens.revoke_named(session, name=tokens.EMBEDDED_TOKEN_NAME)
            issued = tokens.create_token(
                session, name=tokens.EMBEDDED_TOKEN_NAME, scopes=SCOPES, created_by=audit_log.LOCAL_ACTOR
            )
            audit_log.record(
                session,
                actor=None,
                action="token.create",
                target=f"token:{issued.row.id}",
                details={"name": issued.row.name, "scopes": issued.row.scopes, "revoked_previous": revoked},
            )
            session.commit()
    finally:
        engine.dispose()
    path = data_dir / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(issued.token + "\n")
    return issued.token


# ---- tokens: `auditor token create|list|revoke` ----

token_app = typer.Typer(help="API tokens: create (the secret is printed once), list, revoke.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@contextmanager
def _session():
    from auditor.db.engine import database_url, make_engine, run_migrations, session_factory

    url = database_url(get_settings())
    with _clear_errors():
        run_migrations(url)
    engine = make_engine(url)
    try:
        with session_factory(engine)() as session, _clear_errors():
            yield session
    finally:
        engine.dispose()


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="who or what will use it, e.g. 'grafana' or 'alice'")],
    scope: Annotated[list[str], typer.Option("--scope", "-s", help="admin, client or reader; repeatable")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the token")] = False,
) -> None:
    """Create a token with these scopes. The secret is printed once and stored only hashed."""
    from auditor.access import audit_log, tokens

    with _session() as session:
        issued = tokens.create_token(session, name=name, scopes=scope, created_by=audit_log.LOCAL_ACTOR)
        audit_log.record(
            session,
            actor=None,
            action="token.create",
            target=f"token:{issued.row.id}",
            details={"name": issued.row.name, "scopes": issued.row.scopes, "prefix": issued.row.prefix},
        )
        session.commit()
    if quiet:
        print(issued.token)
    else:
        err_console.print(
            f"token {issued.row.id} '{issued.row.name}' ({', '.join(issued.row.scopes)}); "
            "store it now, it is not shown again:"
        )
        print(issued.token)


@token_app.command("list")
def token_list(include_revoked: Annotated[bool, typer.Option("--all", help="include revoked tokens")] = False) -> None:
    """List tokens (never their secrets)."""
    from auditor.access import tokens

    with _session() as session:
        table = Table("id", "name", "prefix", "scopes", "created", "revoked")
        for row in tokens.list_tokens(session, include_revoked=include_revoked):
            table.add_row(
                str(row.id),
                row.name,
                row.prefix,
                ",".join(row.scopes),
                f"{row.created_at:%Y-%m-%d %H:%M}",
                f"{row.revoked_at:%Y-%m-%d %H:%M}" if row.revoked_at else "",
            )
    console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[int, typer.Argument(help="the id from `auditor token list`")]) -> None:
    """Revoke a token; requests carrying it get 401 from then on."""
    from auditor.access import audit_log, tokens

    with _session() as session:
        row = tokens.revoke_token(session, token_id=token_id)
        audit_log.record(
            session,
            actor=None,
            action="token.revoke",
            target=f"token:{row.id}",
            details={"name": row.name, "prefix": row.prefix},
        )
        session.commit()
    console.print(f"revoked token {row.id} '{row.name}'")


# Audit reports live in their own module: queries and rendering, no model.
app.command("report")(report)


if __name__ == "__main__":  # pragma: no cover
    app()
