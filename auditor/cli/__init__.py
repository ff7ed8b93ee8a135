"""`auditor` command line. The composition root: the one package in `auditor/` that imports
`workers/` (to load the model and run probes, steering and evaluations).

The command modules hold plain functions; they are registered here, on the one app, in the
order `auditor --help` lists them (one explicit list, so sorting imports cannot reorder it):

- `concepts`: concepts, extract, sweep, probe, steer, demo (the model, or the built-ins);
- `evaluate`: eval (a labelled JSONL set, read by `datasets`);
- `serve`: migrate, api, worker, beat, run (the service's processes);
- `report`: the audit report (database only);
- `tokens`: the `token` sub-app (create, list, revoke).
"""

from __future__ import annotations

from auditor.cli import concepts, evaluate, serve
from auditor.cli.app import app
from auditor.cli.report import report
from auditor.cli.tokens import token_app

__all__ = ["app"]

app.command()(concepts.concepts)
app.command()(concepts.extract)
app.command()(concepts.sweep)
app.command()(concepts.probe)
app.command()(concepts.steer)
app.command("eval")(evaluate.evaluate)
app.command()(concepts.demo)
app.command()(serve.migrate)
app.command()(serve.api)
app.command()(serve.worker)
app.command()(serve.beat)
app.command()(serve.run)
app.add_typer(token_app, name="token")
# Audit reports live in their own module: queries and rendering, no model.
app.command("report")(report)
