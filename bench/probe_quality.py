"""Probe quality: AUROC (95% bootstrap CI) of the built-in concepts on labelled text they were
not built from, side by side with the reference article's 5-pair last-token vector and two
text-only baselines on the same rows (the concept's keyword count; a bag-of-words logistic
regression cross-validated on the set itself, see probes/baselines.py).

python_bias is read on real answers to programming requests: the reference answers of
../shared/eval/prompts_code_alpaca_2k.jsonl (first 800 characters), labelled Python / another
language by bench/code_language.py's rules, and the hand-written bench/data set.

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
from common import EVAL_DIR, REPO, host, write_result

from probes.concepts import ConceptDefinition, load_concept
from probes.separation import auroc, auroc_with_ci
from workers.monitoring.concepts import extract_concept, per_text_scores
from workers.monitoring.evaluation import text_baselines

# (file, flip labels?, what label 1 means after the flip)
PESSIMISM_SETS = [
    ("sst2_test.jsonl", True, "negative movie-review sentence"),
    ("rt_polarity.jsonl", True, "negative review snippet"),
    ("uci_yelp_labelled.jsonl", True, "negative Yelp sentence"),
    ("uci_imdb_labelled.jsonl", True, "negative IMDb sentence"),
    ("repe_happiness_vs_sadness.jsonl", True, "sadness scenario"),
]
PYTHON_SETS = [
    ("code_alpaca_reference_answers", False, "real answer's code is Python (other: another language)"),
    ("code_alpaca_model_answers", False, "the default model's answer is in Python (other: another language)"),
    (str(REPO / "bench" / "data" / "python_bias_answers.jsonl"), False, "hand-written answer in Python"),
]
ANSWER_CHARS = 800  # the first 800 characters of an answer, as the held-out check reads them


def code_alpaca_answers() -> list[dict]:
    """The dataset's reference answers whose language the rules can tell, labelled 1 = Python."""
    from code_language import language

    rows = []
    for line in (EVAL_DIR / "prompts_code_alpaca_2k.jsonl").open(encoding="utf-8"):
        answer = json.loads(line)["reference_answer"][:ANSWER_CHARS]
        lang = language(answer)
        if lang is not None:
            rows.append({"text": answer, "label": int(lang == "python"), "language": lang})
    return rows


MODEL_ANSWER_PROMPTS = 600  # requests answered by the default model (cached after the first run)
MODEL_ANSWER_TOKENS = 160
CACHE = Path.home() / ".cache" / "auditor" / "bench"


def _printed(description: str, total: int):
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        if n:
            print(f"\r  {description}: {done[0]}/{total}", end="\n" if done[0] >= total else "", flush=True)

    return advance


def code_alpaca_model_answers(eng) -> list[dict]:
    """The default model's greedy answers (prose and code, as a served model writes them) to the
    first MODEL_ANSWER_PROMPTS requests, labelled by the same rules; generated once and cached."""
    from code_language import language

    from workers.monitoring.control import content_ids, generate_answers

    path = (
        CACHE
        / f"code_alpaca_answers-{eng.model.fingerprint.hash[:16]}-{MODEL_ANSWER_PROMPTS}-{MODEL_ANSWER_TOKENS}.jsonl"
    )
    if not path.exists():
        prompts = [
            json.loads(line)["prompt"] for line in (EVAL_DIR / "prompts_code_alpaca_2k.jsonl").open(encoding="utf-8")
        ]
        prompts = prompts[:MODEL_ANSWER_PROMPTS]
        print(
            f"answering {len(prompts)} programming requests with the default model (once; cached in {path})", flush=True
        )
        answers = generate_answers(eng.model, prompts, MODEL_ANSWER_TOKENS, batch_size=16, progress=_printed)
        CACHE.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as out:
            for prompt, answer in zip(prompts, answers):
                text = eng.model.tokenizer.decode(content_ids(eng.model, answer.output_ids))
                out.write(json.dumps({"prompt": prompt, "answer": text}) + "\n")
    rows = []
    for line in path.open(encoding="utf-8"):
        answer = json.loads(line)["answer"][:ANSWER_CHARS]
        lang = language(answer)
        if lang is not None:
            rows.append({"text": answer, "label": int(lang == "python"), "language": lang})
    return rows


def read(path: Path, flip: bool, limit: int | None, eng=None) -> tuple[list[str], list[int]]:
    if path.name == "code_alpaca_reference_answers":
        rows = code_alpaca_answers()
    elif path.name == "code_alpaca_model_answers":
        rows = code_alpaca_model_answers(eng)
    else:
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
        if not path.exists() and not path.name.startswith("code_alpaca_"):
            print(f"skip {path}: not found", file=sys.stderr)
            continue
        texts, labels = read(path, flip, limit, eng)
        scores = per_text_scores(eng.model, texts, directions, list(range(n_layers)), eng.settings.batch_size)
        baselines = text_baselines(load_concept(concept), texts, labels)
        for k, name in enumerate(names):
            layer = vectors[name].auto_layer
            est = auroc_with_ci(scores[:, layer, k], labels)
            best_layer = max(range(n_layers), key=lambda candidate: auroc(scores[:, candidate, k], labels))
            rows.append(
                {
                    "concept": concept,
                    "set": path.name,
                    "label_1": meaning,
                    "vector": name,
                    "layer": layer,
                    "auroc": round(est.auroc, 3),
                    "ci_low": round(est.ci_low, 3),
                    "ci_high": round(est.ci_high, 3),
                    "n": est.n,
                    "eval_best_layer": best_layer,
                    "eval_best_auroc": round(auroc(scores[:, best_layer, k], labels), 3),
                    **{f"{b}_auroc": round(e.auroc, 3) for b, e in baselines.items()},
                    **{f"{b}_ci": [round(e.ci_low, 3), round(e.ci_high, 3)] for b, e in baselines.items()},
                    "beats_keyword": ("keyword" in baselines and est.auroc > baselines["keyword"].auroc),
                    "beats_keyword_ci": ("keyword" in baselines and est.ci_low > baselines["keyword"].auroc),
                }
            )
            print(
                f"{concept:12s} {path.name:34s} {name:34s} L{layer:<2d} AUROC {est.auroc:.3f} "
                f"[{est.ci_low:.3f}, {est.ci_high:.3f}]  (best on this set: L{best_layer} "
                f"{rows[-1]['eval_best_auroc']:.3f}); keyword {rows[-1].get('keyword_auroc', '-')}, "
                f"bag of words {rows[-1]['bag_of_words_auroc']}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--limit", type=int, default=2000, help="rows per set, sampled with seed 0 (0 = all; rt_polarity has 10,662)"
    )
    parser.add_argument(
        "--skip-model-answers",
        action="store_true",
        help="leave out the default model's answers to programming requests (generated once, "
        f"~1 h on 2 busy cores for {MODEL_ANSWER_PROMPTS})",
    )
    args = parser.parse_args()
    global PYTHON_SETS
    if args.skip_model_answers:
        PYTHON_SETS = [entry for entry in PYTHON_SETS if entry[0] != "code_alpaca_model_answers"]
    eng = host()
    limit = args.limit or None
    rows = evaluate_sets(eng, "pessimism", PESSIMISM_SETS, limit)
    rows += evaluate_sets(eng, "python_bias", PYTHON_SETS, limit)
    path = write_result("probe_quality", {"limit": limit, "rows": rows})
    print(f"written {path}")


if __name__ == "__main__":
    main()
