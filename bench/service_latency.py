"""End-to-end latency of the served path against the same work done in-process.

    python bench/service_latency.py                      # 20 prompts x 2 passes, 32 new tokens
    python bench/service_latency.py --repeats 1 --max-tokens 16

Measured: client-side wall time of an OpenAI-client chat completion through the real service
(API process -> Redis -> `auditor worker` -> scores written to Postgres -> reply), divided by the
wall time of the same monitored generation (every concept x every layer, scores included) called
directly in this process. Target: service / in-process <= 1.10 at p50. p99 is reported too; with
~40 requests it is close to the maximum, so read it as "the slow tail", not a precise quantile.

Why the ratio: the model work is the same on both sides, so what it isolates is what the
distribution costs (HTTP, two queue hops, the database writes, the result backend round trip),
plus the worker's batching model thread (a batch of one here, after its idle wait for company)
against the plain single-sequence loop.

Same greedy requests on both sides, sent one at a time, so the figures are latency, not
throughput; warm-up requests on each side are discarded (a worker loads its model and
calibrates its bank on its first task). The in-process pass runs before the service starts, so
the two never compete for cores, and with the worker's torch thread count.

Correctness guards, reported next to the timings: the service must return the same text as
in-process generation for every prompt (greedy decoding), and every served request must be
`done` in Postgres with its score rows written.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_result
from service import default_threads, running_service, service_rows

PROMPTS = [
    "What's a good way to start learning to cook at home?",
    "How do I keep my houseplants alive during winter?",
    "Can you explain what compound interest is?",
    "What are some tips for sleeping better?",
    "How should I prepare for a job interview?",
    "What is the difference between a virus and a bacterium?",
    "Suggest a few ideas for a rainy weekend with kids.",
    "How do I make a simple budget?",
    "Why is the sky blue?",
    "What should I look for when buying a used bicycle?",
    "How can I improve my handwriting?",
    "Give me a quick recipe for tomato soup.",
    "What's the best way to memorise a short speech?",
    "How do solar panels work?",
    "Any advice for running my first 5k?",
    "How do I write a polite email declining an invitation?",
    "What are the main causes of inflation?",
    "How can I make my small apartment feel bigger?",
    "What is a good routine for learning a new language?",
    "Explain how vaccines train the immune system.",
]
WARM_UP = "Hello! Can you tell me a fun fact about octopuses?"
WARM_UP_PER_WORKER = 24  # above the CLI's default task threads per worker (batch_max_size + 2)


def stats(seconds: list[float]) -> dict:
    values = np.asarray(seconds)
    return {
        "p50_s": float(np.percentile(values, 50)),
        "p99_s": float(np.percentile(values, 99)),
        "mean_s": float(values.mean()),
        "n": len(values),
    }


def in_process(prompts: list[str], repeats: int, max_tokens: int, threads: int) -> list[dict]:
    from auditor.settings import Settings
    from workers.runtime.generate import SamplingConfig
    from workers.serving.host import ModelHost

    host = ModelHost(Settings(data_dir=REPO / ".auditor", torch_threads=threads))
    bank = host.bank()  # built (extracted, calibrated) once, outside the timings
    sampling = SamplingConfig(max_new_tokens=max_tokens)
    host.generate([{"role": "user", "content": WARM_UP}], sampling, bank=bank)
    runs = []
    for repeat in range(repeats):
        for index, prompt in enumerate(prompts):
            messages = [{"role": "user", "content": prompt}]
            started = time.perf_counter()
            result = host.generate(messages, sampling, bank=bank)
            seconds = time.perf_counter() - started
            runs.append(
                {
                    "repeat": repeat,
                    "prompt": index,
                    "seconds": seconds,
                    "text": result.text,
                    "completion_tokens": len(result.generation.output_ids),
                }
            )
        print(f"in-process pass {repeat + 1}/{repeats} done", flush=True)
    return runs


def served(
    prompts: list[str], repeats: int, max_tokens: int, threads: int, workers: int, concurrency: int | None
) -> tuple[list[dict], dict]:
    from openai import OpenAI

    with running_service(workers=workers, torch_threads=threads, concurrency=concurrency) as svc:
        client = OpenAI(base_url=svc.base_url + "/v1", api_key=svc.token, max_retries=0, timeout=600)

        def ask(prompt: str, tokens: int = max_tokens):
            return client.chat.completions.create(
                model="auditor", messages=[{"role": "user", "content": prompt}], max_tokens=tokens, temperature=0
            )

        started = time.perf_counter()
        ask(WARM_UP)  # a worker loads its model, registers concepts and calibrates on its first task
        if workers > 1:
            # Enough short requests at once that every worker gets some (one worker reserves at
            # most one task per thread), so no model load lands in a timed request.
            with ThreadPoolExecutor(WARM_UP_PER_WORKER * workers) as pool:
                list(pool.map(lambda _: ask(WARM_UP, 2), range(WARM_UP_PER_WORKER * workers)))
        print(f"service warm-up: {time.perf_counter() - started:.1f} s", flush=True)
        runs = []
        for repeat in range(repeats):
            for index, prompt in enumerate(prompts):
                started = time.perf_counter()
                response = ask(prompt)
                seconds = time.perf_counter() - started
                runs.append(
                    {
                        "repeat": repeat,
                        "prompt": index,
                        "seconds": seconds,
                        "id": response.id,
                        "text": response.choices[0].message.content,
                        "completion_tokens": response.usage.completion_tokens,
                    }
                )
            print(f"service pass {repeat + 1}/{repeats} done", flush=True)
        # Read while the database still exists: the context manager drops it on exit.
        rows = service_rows(svc.db_url, [r["id"] for r in runs])
    return runs, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the prompts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use only the first N prompts")
    parser.add_argument("--workers", type=int, default=1, help="`auditor worker` processes (one model each)")
    parser.add_argument("--concurrency", type=int, default=None, help="task threads per worker (default: the CLI's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per model process (both sides)")
    args = parser.parse_args()
    prompts = PROMPTS[: args.prompts]
    threads = args.threads or default_threads(args.workers)
    started = time.perf_counter()
    print(
        f"{len(prompts)} prompts x {args.repeats} passes, {args.max_tokens} new tokens, {threads} torch threads, "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )

    # Load on the machine per phase: the two sides run minutes apart, so a neighbour's job that
    # starts in between skews the ratio; this is how a reader can tell.
    load = {"before_in_process": os.getloadavg()[0]}
    local = in_process(prompts, args.repeats, args.max_tokens, threads)
    gc.collect()  # the in-process model is unreachable now: free it before the worker loads its own
    load["before_service"] = os.getloadavg()[0]
    service, rows = served(prompts, args.repeats, args.max_tokens, threads, args.workers, args.concurrency)
    load["after_service"] = os.getloadavg()[0]

    expected = {(r["repeat"], r["prompt"]): r for r in local}
    mismatched = [r["prompt"] for r in service if r["text"] != expected[(r["repeat"], r["prompt"])]["text"]]
    not_stored = [
        r["id"]
        for r in service
        if (row := rows.get(r["id"])) is None or row["status"] != "done" or row["n_scores"] == 0
    ]

    inproc, serv = stats([r["seconds"] for r in local]), stats([r["seconds"] for r in service])
    ratio_p50, ratio_p99 = serv["p50_s"] / inproc["p50_s"], serv["p99_s"] / inproc["p99_s"]
    # Per token: normalises away prompts that stop early at end-of-sequence.
    ms_per_token = {
        name: float(np.median([1000 * r["seconds"] / max(1, r["completion_tokens"]) for r in runs]))
        for name, runs in (("in_process", local), ("service", service))
    }
    # Where the service's extra time goes: the worker's own prefill + decode vs the client's wall.
    worker_gen = [
        rows[r["id"]]["prefill_seconds"] + rows[r["id"]]["decode_seconds"]
        for r in service
        if r["id"] in rows and rows[r["id"]]["decode_seconds"] is not None
    ]
    queue = [rows[r["id"]]["queue_seconds"] for r in service if rows.get(r["id"], {}).get("queue_seconds") is not None]
    timed = [
        (r["seconds"], rows[r["id"]]["prefill_seconds"] + rows[r["id"]]["decode_seconds"])
        for r in service
        if r["id"] in rows and rows[r["id"]]["decode_seconds"] is not None
    ]
    overhead = [wall - gen for wall, gen in timed]
    # Both terms from the same request, so unlike the headline ratio it survives load changing
    # between the two phases; it slightly overstates the cost (scoring is outside `gen`).
    wall_over_gen = [wall / gen for wall, gen in timed if gen > 0]
    result = {
        "prompts": len(prompts),
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "workers": args.workers,
        "torch_threads": threads,
        "in_process": {k: round(v, 4) if isinstance(v, float) else v for k, v in inproc.items()},
        "service": {k: round(v, 4) if isinstance(v, float) else v for k, v in serv.items()},
        "ratio_p50": round(ratio_p50, 3),
        "ratio_p99": round(ratio_p99, 3),
        "ms_per_token_median": {k: round(v, 2) for k, v in ms_per_token.items()},
        "ratio_ms_per_token": round(ms_per_token["service"] / ms_per_token["in_process"], 3),
        "completion_tokens_mean": round(float(np.mean([r["completion_tokens"] for r in service])), 1),
        "service_breakdown_median_s": {
            "worker_prefill_plus_decode": round(float(np.median(worker_gen)), 4) if worker_gen else None,
            "queue_until_generation_starts": round(float(np.median(queue)), 4) if queue else None,
            "client_wall_minus_worker_generation": round(float(np.median(overhead)), 4) if overhead else None,
        },
        "client_wall_over_worker_generation_p50": round(float(np.median(wall_over_gen)), 3) if wall_over_gen else None,
        "text_mismatches": len(mismatched),
        "mismatched_prompts": sorted(set(mismatched)),
        "requests_missing_scores": len(not_stored),
        "target": "service / in-process <= 1.10 at p50",
        "target_met": ratio_p50 <= 1.10,
        "loadavg_1m": {k: round(v, 2) for k, v in load.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = write_result("service_latency", result)

    from rich.console import Console
    from rich.table import Table

    table = Table("", "in-process", "service", "service / in-process", title="monitored chat completion latency")
    for key, label in (("p50_s", "p50"), ("p99_s", "p99"), ("mean_s", "mean")):
        table.add_row(
            f"{label} (ms)", f"{1000 * inproc[key]:.0f}", f"{1000 * serv[key]:.0f}", f"{serv[key] / inproc[key]:.3f}"
        )
    table.add_row(
        "ms / token (median)",
        f"{ms_per_token['in_process']:.1f}",
        f"{ms_per_token['service']:.1f}",
        f"{result['ratio_ms_per_token']:.3f}",
    )
    console = Console()
    console.print(table)
    verdict = "[green]met[/]" if result["target_met"] else "[red]missed[/]"
    console.print(
        f"target p50 ratio <= 1.10: {verdict} ({ratio_p50:.3f}); text mismatches: {len(mismatched)}; "
        f"requests without stored scores: {len(not_stored)}"
    )
    console.print(
        f"service, median per request: {result['service_breakdown_median_s']}; client wall / worker "
        f"generation {result['client_wall_over_worker_generation_p50']}; load average {result['loadavg_1m']}"
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
