"""False alarms on ordinary traffic the project never calibrated on, at every answer length, and
detection of injected steering with the same thresholds.

The null is the deployment default: fitted on the shipped control prompts' answers at
TARGET_FPR (per request, family-wise). Then ordinary prompts from ../shared/eval/prompts_*.jsonl
(never used to calibrate or tune anything) are answered greedily by the serving path's own
batched generator, capturing the residual stream at the concepts' primary layers as serving does,
and each answer's text is re-read alone as serving does. Greedy decoding makes the answer at
`max_tokens = n` the first n tokens of the answer at 256, so one generation per prompt gives
every length; each length is read with the same `LengthNull.read` serving calls.

Reported per length (4 … 256): the share of requests with any divergence flag and the share
crossing any concept alert, each with a two-sided 95 % Clopper-Pearson interval; the median
reported z per concept. Then detection of pessimism steering at relative α 0.025 / 0.05 / 0.1 and
of one other concept, with the same thresholds, at each length.

    python bench/false_alarms.py                      # ~1 h on 2 cores
    python bench/false_alarms.py --prompts 200 --steer-prompts 40   # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import common
import torch

LENGTHS = (4, 8, 16, 32, 64, 128, 256)
STEER_LENGTHS = (8, 16, 32, 64, 128)


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    from probes.answer_null import clopper_pearson_upper

    tail = (1 + level) / 2  # two-sided: each bound at 97.5 %
    upper = clopper_pearson_upper(k, n, tail)
    lower = 0.0 if k == 0 else 1.0 - clopper_pearson_upper(n - k, n, tail)
    return lower, upper


def ordinary_prompts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, source) rows, half maths word problems and half programming requests."""
    rows = []
    for name in ("prompts_gsm8k_test.jsonl", "prompts_code_alpaca_2k.jsonl"):
        path = common.EVAL_DIR / name
        prompts = [json.loads(line)["prompt"] for line in path.open()]
        random.Random(seed).shuffle(prompts)
        rows += [(p, name.split("_")[1]) for p in prompts[: n // 2]]
    return rows


def generate(runtime, bank, prompts: list[str], max_new_tokens: int, chat: bool, steer=None, batch_size: int = 48):
    """Greedy answers with the residual captured at the primary layers -> per answer
    (output ids, residual trace [n, K]) — the serving path's batch generator and scoring."""
    from workers.monitoring.control import primary_rows
    from workers.runtime.batch_generate import BatchGenerator, SequenceRequest
    from workers.runtime.generate import SamplingConfig, encode_prompt

    model = runtime.host.model
    layers, directions, which = primary_rows(bank, range(len(bank.names)))
    batch = BatchGenerator(model, layers)
    pending = []
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(model, prompt, chat)
        steering = [runtime.host.steering(steer, bank, len(ids))] if steer is not None else []
        pending.append((i, SequenceRequest(ids, SamplingConfig(max_new_tokens=max_new_tokens), steering)))
    done = {}
    started = time.perf_counter()
    while pending or len(batch):
        room = batch_size - len(batch)
        if room > 0 and pending:
            done.update(batch.add(pending[:room]))
            pending = pending[room:]
        if len(batch):
            done.update(batch.step())
        print(f"\r  {len(done)}/{len(prompts)} answered, {time.perf_counter() - started:.0f}s", end="", flush=True)
    print()
    out = []
    from probes.scoring import cosine_scores

    for i in range(len(prompts)):
        g = done[i]
        resid = g.resid.float()[:, g.response_start :]  # [n_captured, n_tokens, d_model]
        scores = cosine_scores(resid, directions)  # [n_captured, n_tokens, K]
        trace = scores[which, :, torch.arange(len(bank.names))].T.double()  # [n_tokens, K]
        out.append((list(g.output_ids), trace))
    return out


def read_lengths(runtime, bank, null, answers, lengths) -> dict[int, dict]:
    """Every answer read at every max_tokens in `lengths`, exactly as serving would read the
    answer cut there: residual mean over its first n positions, text re-read of its first n
    tokens' text."""
    from workers.monitoring.control import content_ids, read_spans, text_spans

    model = runtime.host.model
    texts = [content_ids(model, ids) for ids, _ in answers]
    readable = [i for i, t in enumerate(texts) if t]
    text_traces = dict(zip(readable, read_spans(model, bank, text_spans(model, [texts[i] for i in readable]))))
    out = {}
    for limit in lengths:
        flagged, alerted, zs, kinds, insufficient, raised = [], [], [], {}, 0, []
        for i, (ids, trace) in enumerate(answers):
            n = min(limit, len(ids))
            n_text = len(content_ids(model, ids[:n]))
            text_mean = text_traces[i][:n_text].mean(0) if n_text else None
            reading = null.read(trace[:n].mean(0), n, text_mean)
            insufficient += reading.status == "insufficient_tokens"
            flagged.append(bool(reading.flagged))
            alerted.append(bool(reading.alert.any()))
            zs.append(reading.residual_z)
            mine = {
                f"{bank.names[k]}:{kind}"
                for k in range(len(bank.names))
                for kind, hit in (
                    ("hidden", reading.hidden[k]),
                    ("surface", reading.surface[k]),
                    ("alert", reading.alert[k]),
                )
                if hit
            }
            raised.append(mine)
            for key in mine:
                kinds[key] = kinds.get(key, 0) + 1
        out[limit] = {
            "flagged": flagged,
            "alerted": alerted,
            "z": torch.stack(zs),
            "kinds": kinds,
            "insufficient": insufficient,
            "raised": raised,
        }
    return out


def rate(hits: list[bool]) -> dict:
    k, n = sum(hits), len(hits)
    low, high = clopper_pearson(k, n)
    return {"k": k, "n": n, "rate": k / n, "ci95": [low, high]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000, help="ordinary chat prompts (half maths, half code)")
    parser.add_argument(
        "--completion-prompts",
        type=int,
        default=0,
        help="of them, also read as text completions against the chat null (serving does not: "
        "it marks them no_reference); 0 = skip",
    )
    parser.add_argument("--steer-prompts", type=int, default=150)
    parser.add_argument("--other-concept", default="formality")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=max(LENGTHS),
        help="longest answer length read (cuts the run's cost roughly in proportion)",
    )
    args = parser.parse_args()
    lengths = tuple(n for n in LENGTHS if n <= args.max_tokens)
    steer_lengths = tuple(n for n in STEER_LENGTHS if n <= args.max_tokens)

    from auditor.db.engine import run_migrations
    from auditor.settings import Settings
    from workers.serving.context import WorkerContext
    from workers.serving.host import SteerRequest

    tmp = Path(tempfile.mkdtemp(prefix="auditor-false-alarms-"))
    url = f"sqlite:///{tmp / 'auditor.db'}"
    run_migrations(url)
    runtime = WorkerContext(Settings(database_url=url, data_dir=common.REPO / ".auditor", drift_interval_seconds=0))
    torch.set_num_threads(runtime.settings.resolved_threads())
    bank = runtime.model_thread.call(runtime.bank).result()
    started = time.perf_counter()
    null = runtime.model_thread.call(lambda: runtime.answer_null(bank)).result()
    print(f"null: {null.summary()} ({time.perf_counter() - started:.0f}s)")

    rows = ordinary_prompts(args.prompts)
    prompts = [p for p, _ in rows]
    print(f"{len(prompts)} ordinary chat prompts at up to {max(lengths)} tokens")
    chat = generate(runtime, bank, prompts, max(lengths), chat=True)
    completion = []
    if args.completion_prompts:
        print(f"{args.completion_prompts} of them as text completions")
        completion = generate(runtime, bank, prompts[: args.completion_prompts], max(lengths), chat=False)

    result: dict = {
        "max_tokens": max(lengths),
        "target_fpr": null.target_fpr,
        "confidence": null.confidence,
        "null": null.summary(),
        "concepts": bank.names,
        "n_prompts": len(prompts),
        "lengths": {},
        "steering": {},
    }
    for label, answers in (("chat", chat), ("completion", completion)):
        if not answers:
            continue
        readings = read_lengths(runtime, bank, null, answers, lengths)
        for limit, r in readings.items():
            median_z = r["z"].nanmedian(dim=0).values
            entry = result["lengths"].setdefault(str(limit), {})
            entry[label] = {
                "flagged": rate(r["flagged"]),
                "alert": rate(r["alerted"]),
                "insufficient_tokens": r["insufficient"],
                "by_kind": r["kinds"],
                "median_z": dict(zip(bank.names, [round(float(v), 3) for v in median_z])),
            }
            print(
                f"{label:10s} max_tokens {limit:3d}: flagged {entry[label]['flagged']['rate']:.4f} "
                f"[{entry[label]['flagged']['ci95'][1]:.4f}], alert {entry[label]['alert']['rate']:.4f} "
                f"[{entry[label]['alert']['ci95'][1]:.4f}], median z {entry[label]['median_z']}"
            )
    by_source = {}
    by_length = (32, max(lengths))
    chat_readings = read_lengths(runtime, bank, null, chat, by_length)
    for source in ("gsm8k", "code"):
        idx = [i for i, (_, s) in enumerate(rows) if s == source]
        by_source[source] = {
            str(L): {
                "flagged": rate([chat_readings[L]["flagged"][i] for i in idx]),
                "alert": rate([chat_readings[L]["alerted"][i] for i in idx]),
            }
            for L in by_length
        }
    result["by_source"] = by_source

    steer_prompts = (
        prompts[: args.steer_prompts // 2] + prompts[len(prompts) // 2 : len(prompts) // 2 + args.steer_prompts // 2]
    )
    for concept, alphas in (("pessimism", (0.025, 0.05, 0.1)), (args.other_concept, (0.05, 0.1))):
        k = bank.names.index(concept)
        for alpha in alphas:
            answers = generate(
                runtime,
                bank,
                steer_prompts,
                max(steer_lengths),
                chat=True,
                steer=SteerRequest(concept, alpha, relative=True),
            )
            readings = read_lengths(runtime, bank, null, answers, steer_lengths)
            entry = {}
            for limit, r in readings.items():
                # Detected: flagged `hidden` for the steered concept (the tampering the text hides),
                # or any flag / alert at all (what pages someone).
                hidden = [f"{concept}:hidden" in mine for mine in r["raised"]]
                entry[str(limit)] = {
                    "hidden_for_concept": rate(hidden),
                    "any_flag": rate(r["flagged"]),
                    "any_alert": rate(r["alerted"]),
                    "median_z_concept": round(float(r["z"][:, k].nanmedian()), 3),
                }
                print(
                    f"steer {concept} α={alpha} max_tokens {limit:3d}: hidden {entry[str(limit)]['hidden_for_concept']['rate']:.3f} "
                    f"any flag {entry[str(limit)]['any_flag']['rate']:.3f} alert {entry[str(limit)]['any_alert']['rate']:.3f}"
                )
            result["steering"][f"{concept}@{alpha}"] = entry
    name = "false_alarms" if max(lengths) == max(LENGTHS) else f"false_alarms_max{max(lengths)}"
    path = common.write_result(name, result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
