"""The concept commands: list the built-ins, extract vectors, sweep layers, probe texts, steer a
generation, and the demo that does a little of each. All but `concepts` load the model.

Plain functions: `auditor/cli/__init__.py` registers them on the app, in `--help` order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from auditor.cli.app import console
from auditor.cli.model import Method, Pooling, model_host, parse_layer, resolve_concepts


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

    definitions = resolve_concepts(concept or builtin_concepts())
    with model_host() as host:
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


def sweep(
    concept: Annotated[str, typer.Option("--concept", "-c", help="built-in name or JSON file")],
    method: Method = None,
    pooling: Pooling = None,
    plot: Annotated[Path | None, typer.Option(help="PNG path; default <data_dir>/sweep-<concept>.png")] = None,
) -> None:
    """Held-out separation of the concept's pairs at every layer, as a table and a PNG plot."""
    from auditor.cli.plots import plot_sweep  # matplotlib: only this command draws

    [definition] = resolve_concepts([concept])
    with model_host() as host:
        vectors = host.vectors(definition, method, pooling)
        table = Table("layer", "held-out AUROC", "effect size (d)", "")
        for row in vectors.sweep:
            mark = "◀ auto" if row.layer == vectors.auto_layer else ""
            table.add_row(str(row.layer), f"{row.auroc:.3f}", f"{row.effect_size:.2f}", mark)
        console.print(table)
        path = plot or host.settings.data_dir / f"sweep-{vectors.name}.png"
        plot_sweep(vectors.sweep, vectors.auto_layer, vectors.name, path)
        console.print(f"plot written to {path}")


def probe(
    texts: Annotated[list[str], typer.Argument(help="one or more texts to score")],
    concept: Annotated[list[str], typer.Option("--concept", "-c", help="repeatable; default all built-ins")] = [],
) -> None:
    """Score texts against concepts at each concept's auto layer (raw cosine, z, percentile)."""
    resolve_concepts(concept)
    with model_host() as host:
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

    resolve_concepts([concept])
    with model_host() as host:
        bank = host.bank()
        request = SteerRequest(concept, alpha, parse_layer(layer, host), scope, relative)
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


def demo(
    prompt: Annotated[
        str, typer.Option(help="prompt to steer")
    ] = "I'm thinking about learning to play guitar. Any advice for getting started?",
    alpha: Annotated[float, typer.Option(help="steering strength relative to the layer's typical residual norm")] = 0.2,
) -> None:
    """Extract the built-in concepts, probe a few texts, steer one prompt, print the results."""
    from workers.runtime.generate import SamplingConfig
    from workers.serving.host import SteerRequest

    with model_host() as host:
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
