"""Probe quality: AUROC (95% bootstrap CI) of the built-in concepts on labelled text they were
not built from, side by side with the reference article's 5-pair last-token vector.

    python bench/probe_quality.py              # up to 2,000 rows per set (~8 min on 2 CPU cores)
    python bench/probe_quality.py --limit 0    # every row (rt_polarity alone is ~7 min)

Every layer is chosen from the concept's own pairs (held-out pair AUROC), never from these sets.
The article baseline's best layer *on the evaluation set itself* is also shown, labelled as the
optimistic upper bound it is.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EVAL_DIR, REPO, engine, write_result  # noqa: E402

from probes.concepts import ConceptDefinition, load_concept  # noqa: E402
from probes.metrics import auroc, auroc_with_ci  # noqa: E402
from workers.concepts import extract_concept, per_text_scores  # noqa: E402

# (file, flip labels?, what label 1 means after the flip)
PESSIMISM_SETS = [
    ("sst2_test.jsonl", True, "negative movie-review sentence"),
    ("rt_polarity.jsonl", True, "negative review snippet"),
    ("uci_yelp_labelled.jsonl", True, "negative Yelp sentence"),
    ("uci_imdb_labelled.jsonl", True, "negative IMDb sentence"),
    ("repe_happiness_vs_sadness.jsonl", True, "sadness scenario"),
]
PYTHON_SETS = [(str(REPO / "bench" / "data" / "python_bias_answers.jsonl"), False, "answer in Python")]


def read(path: Path, flip: bool, limit: int | None) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
    if limit and len(rows) > limit:
        rows = random.Random(0).sample(rows, limit)
    return [r["text"] for r in rows], [(1 - r["label"]) if flip else r["label"] for r in rows]


def candidates(eng, concept: str) -> dict[str, object]:
    """The vectors compared: default method, the article's mean difference on our pairs, and the
    article's own 5 pairs with last-token pooling."""
    definition = load_concept(concept)
    article = ConceptDefinition(f"{concept}-article5", "", definition.positives[:5], definition.negatives[:5])
    return {
        f"built-in, {eng.settings.extraction_method}": eng.vectors(definition),
        "built-in, mean_diff": eng.vectors(definition, method="mean_diff"),
        "article 5 pairs, mean_diff, last": extract_concept(eng.model, article, "mean_diff", "last"),
    }


def evaluate_sets(eng, concept: str, sets, limit: int | None) -> list[dict]:
    vectors = candidates(eng, concept)
    names = list(vectors)
    n_layers = eng.model.n_layers
    directions = torch.stack([vectors[n].directions for n in names], dim=1)  # [L, K, d]
    rows = []
    for file, flip, meaning in sets:
        path = Path(file) if Path(file).is_absolute() else EVAL_DIR / file
        if not path.exists():
            print(f"skip {path}: not found", file=sys.stderr)
            continue
        texts, labels = read(path, flip, limit)
        scores = per_text_scores(eng.model, texts, directions, list(range(n_layers)), eng.settings.batch_size)
        for k, name in enumerate(names):
            layer = vectors[name].auto_layer
            est = auroc_with_ci(scores[:, layer, k], labels)
            best_layer = max(range(n_layers), key=lambda l: auroc(scores[:, l, k], labels))
            rows.append({
                "concept": concept, "set": path.name, "label_1": meaning, "vector": name,
                "layer": layer, "auroc": round(est.auroc, 3), "ci_low": round(est.ci_low, 3),
                "ci_high": round(est.ci_high, 3), "n": est.n,
                "eval_best_layer": best_layer,
                "eval_best_auroc": round(auroc(scores[:, best_layer, k], labels), 3),
            })
            print(f"{concept:12s} {path.name:34s} {name:34s} L{layer:<2d} AUROC {est.auroc:.3f} "
                  f"[{est.ci_low:.3f}, {est.ci_high:.3f}]  (best on this set: L{best_layer} "
                  f"{rows[-1]['eval_best_auroc']:.3f})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=2000, help="rows per set, sampled with seed 0 (0 = all; rt_polarity has 10,662)")
    args = parser.parse_args()
    eng = engine()
    limit = args.limit or None
    rows = evaluate_sets(eng, "pessimism", PESSIMISM_SETS, limit)
    rows += evaluate_sets(eng, "python_bias", PYTHON_SETS, limit)
    path = write_result("probe_quality", {"limit": limit, "rows": rows})
    print(f"written {path}")


if __name__ == "__main__":
    main()
