"""Do the answer-null thresholds hold on a kind of request the control set never had?

Leave one control category out (everyday, advice, coding, writing, maths, explain,
summarising), fit the null on the other six exactly as serving does, and read the held-out
category's answers at each length. Pooled over the seven folds this is the false-alarm rate on
traffic of a kind the null never saw, the closest check the control set itself allows of
"false-alarm rates hold on prompts you do not have". Both threshold methods are compared: in
sample (answers treated as exchangeable) and held-out-group (serving's default: each control
answer read against the null of the other categories).

Only the control answers and their traces are used (shipped answers; traces cached in
CONTROL_CACHE_DIR, replayed once otherwise, ~6 min on 2 cores).

    python bench/control_transfer.py
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import common
import torch

LENGTHS = (1, 2, 4, 8, 16, 32, 64, 128)


def traces_and_categories():
    from auditor.db.engine import run_migrations
    from auditor.settings import Settings
    from workers.monitoring.control import answer_traces, control_answers
    from workers.serving.context import WorkerContext

    tmp = Path(tempfile.mkdtemp(prefix="auditor-transfer-"))
    url = f"sqlite:///{tmp / 'auditor.db'}"
    run_migrations(url)
    runtime = WorkerContext(Settings(database_url=url, data_dir=common.REPO / ".auditor", drift_interval_seconds=0))
    torch.set_num_threads(runtime.settings.resolved_threads())
    s = runtime.settings
    bank = runtime.model_thread.call(runtime.bank).result()

    def work():
        answers = control_answers(
            runtime.host.model, runtime.control_prompts(), s.control_max_tokens, s.control_cache_dir, 16
        )
        return answer_traces(runtime.host.model, bank, answers, s.control_cache_dir, s.batch_size)

    traces = runtime.model_thread.call(work).result()
    return traces, [category for _, category in runtime.control_set()], bank.names, s


def rate(k: int, n: int) -> dict:
    from probes.answer_null import clopper_pearson_upper

    return {"k": k, "n": n, "rate": k / n, "upper_95": clopper_pearson_upper(k, n)}


def run() -> None:
    from workers.monitoring.control import AnswerTraces

    traces, categories, names, s = traces_and_categories()
    groups = sorted(set(categories))
    result: dict = {
        "target_fpr": s.target_fpr,
        "confidence": s.calibration_confidence,
        "categories": dict(collections.Counter(categories)),
        "concepts": names,
        "methods": {},
    }
    for method in ("in_sample", "held_out_group"):
        hits = {n: {"flag": 0, "alert": 0, "n": 0} for n in LENGTHS}
        by_category: dict[str, dict] = {}
        for held in groups:
            test = torch.tensor([c == held for c in categories])
            train = ~test
            fit_groups = (
                [c for c, keep in zip(categories, train.tolist()) if keep] if method == "held_out_group" else None
            )
            null = AnswerTraces(
                traces.residual[train], traces.text[train], traces.lengths[train], traces.text_lengths[train]
            ).fit(s.target_fpr, s.calibration_confidence, 1, groups=fit_groups)
            mine = by_category.setdefault(held, {})
            for n_tokens in LENGTHS:
                flags = alerts = count = 0
                for i in test.nonzero().flatten().tolist():
                    n = min(n_tokens, int(traces.lengths[i]))
                    n_text = min(n, int(traces.text_lengths[i]))
                    text_mean = traces.text[i, :n_text].mean(0) if n_text else None
                    reading = null.read(traces.residual[i, :n].mean(0), n, text_mean)
                    flags += reading.flagged
                    alerts += bool(reading.alert.any())
                    count += 1
                hits[n_tokens]["flag"] += flags
                hits[n_tokens]["alert"] += alerts
                hits[n_tokens]["n"] += count
                mine[str(n_tokens)] = {"flag": flags, "alert": alerts, "n": count}
        result["methods"][method] = {
            "pooled": {
                str(n): {"flag": rate(h["flag"], h["n"]), "alert": rate(h["alert"], h["n"])} for n, h in hits.items()
            },
            "by_category": by_category,
        }
        print(f"{method}:")
        for n, h in hits.items():
            print(f"  {n:3d} tokens: flagged {h['flag'] / h['n']:.4f}, alerted {h['alert'] / h['n']:.4f} (n={h['n']})")
    path = common.write_result("control_transfer", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    run()
