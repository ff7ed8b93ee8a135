"""`auditor eval`: how well a concept's score separates the two labels of a labelled JSONL set
(AUROC with a bootstrap CI), beside text-only baselines, as a table or one JSON object.

A plain function: `auditor/cli/__init__.py` registers it on the app as `eval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from auditor.cli.app import clear_errors, console
from auditor.cli.datasets import read_labelled_jsonl
from auditor.cli.model import Method, Pooling, model_host, parse_layer, resolve_concepts

BASELINE_LABELS = {
    "keyword": "keyword count (the concept's lexicon)",
    "bag_of_words": "bag of words, 5-fold CV on this file",
}


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
    from workers.monitoring.evaluation import evaluate_vectors

    with clear_errors():
        data = read_labelled_jsonl(file, flip=flip, limit=limit)  # fail fast, before the model loads
    [definition] = resolve_concepts([concept])
    with model_host() as host:
        vectors = host.vectors(definition, method, pooling)
        result = evaluate_vectors(
            host.model,
            vectors,
            data.texts,
            data.labels,
            parse_layer(layer, host),
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
                table.add_row(
                    BASELINE_LABELS[name],
                    f"{b.auroc:.3f}",
                    f"{b.ci_low:.3f}–{b.ci_high:.3f}",
                    "yes" if est.auroc > b.auroc else "[bold red]no[/]",
                )
            console.print(table)
            if "keyword" not in result.baselines:
                console.print(f"{definition.name} declares no lexicon: no keyword baseline")
            if "bag_of_words" not in result.baselines:
                console.print("fewer than two texts of one label: no cross-validated bag-of-words baseline")
