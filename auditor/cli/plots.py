"""Static plots (PNG) for the CLI: the layer sweep.

Built on `matplotlib.figure.Figure`, never pyplot, as the report figures are
(auditor/reports/plots.py): no global figure state and no GUI backend to select, so it draws the
same in a headless process as anywhere else.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def plot_sweep(sweep, auto_layer: int, concept: str, path: Path) -> Path:
    """Held-out AUROC and effect size per layer, the auto layer marked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = [r.layer for r in sweep]
    fig = Figure(figsize=(8, 4), dpi=120)
    auroc_axis = fig.subplots()
    auroc_axis.plot(layers, [r.auroc for r in sweep], marker="o", color="tab:blue", label="held-out AUROC")
    auroc_axis.set_xlabel("layer")
    auroc_axis.set_ylabel("held-out pair AUROC", color="tab:blue")
    auroc_axis.set_ylim(0.4, 1.02)
    effect_axis = auroc_axis.twinx()
    effect_axis.plot(layers, [r.effect_size for r in sweep], marker=".", color="tab:orange", label="effect size")
    effect_axis.set_ylabel("Cohen's d", color="tab:orange")
    auroc_axis.axvline(auto_layer, color="grey", linestyle="--")
    auroc_axis.annotate(f"auto = {auto_layer}", (auto_layer, 0.45), ha="center", backgroundcolor="white")
    auroc_axis.set_title(f"{concept}: separation of held-out pairs by layer")
    fig.tight_layout()
    fig.savefig(path)
    return path
