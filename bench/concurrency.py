"""Throughput and latency with 1, 4 and 16 concurrent clients through the full service
(API → Redis → one batching worker → Postgres).

Each client is a thread with its own official `openai` client sending chat completions back to
back (greedy, `--max-tokens` each) until the level's request budget is spent. Reported per
level: aggregate completion tokens/s over the level's wall time, p50 / p99 client latency, errors,
and that every request's scores are in Postgres. Targets (issue 6): throughput at 16 clients
≥ 4× that at 1; p50 latency at 16 clients ≤ 3× the single-client p50.

    python bench/concurrency.py                    # levels 1, 4, 16 → bench/results/concurrency.json
    python bench/concurrency.py --levels 1 16 --requests 32
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import common
from service import running_service, service_rows

PROMPTS = [
    "Give me three tips for sleeping better.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a small bakery.",
    "How do I politely decline a meeting invitation?",
    "Explain photosynthesis to a ten-year-old.",
    "What should I look for when buying a used bicycle?",
    "Write a haiku about autumn leaves.",
    "How can I make my morning routine more productive?",
    "What are some good habits for learning a new language?",
    "Describe the water cycle in two sentences.",
    "Recommend a weekend activity for a rainy day.",
    "How do I start journaling?",
    "What is a healthy breakfast that takes five minutes?",
    "Explain what an API is in simple terms.",
    "How should I prepare for a job interview?",
    "What are the benefits of walking every day?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_level(base_url: str, token: str, clients: int, n_requests: int, max_tokens: int) -> dict:
    from openai import OpenAI

    lock = threading.Lock()
    budget = iter(range(n_requests))
    records: list[dict] = []

    def client_loop(worker: int) -> None:
        client = OpenAI(base_url=base_url + "/v1", api_key=token, max_retries=0, timeout=600)
        while True:
            with lock:
                index = next(budget, None)
            if index is None:
                return
            prompt = PROMPTS[index % len(PROMPTS)]
            started = time.perf_counter()
            try:
                response = client.chat.completions.create(
                    model="auditor",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=max_tokens,
                    temperature=0,
                )
                record = {"id": response.id, "tokens": response.usage.completion_tokens, "error": None}
            except Exception as exc:  # counted, not raised: the level's error count is a result
                record = {"id": None, "tokens": 0, "error": f"{type(exc).__name__}: {exc}"[:200]}
            record["seconds"] = time.perf_counter() - started
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ok = [r for r in records if r["error"] is None]
    latencies = [r["seconds"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "error_examples": [r["error"] for r in records if r["error"]][:3],
        "wall_seconds": wall,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / wall,
        "p50_seconds": statistics.median(latencies) if latencies else None,
        "p99_seconds": percentile(latencies, 0.99) if latencies else None,
        "ids": [r["id"] for r in ok],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=None, help="per level; default 2 × clients, at least 12")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch-max-size", type=int, default=16)
    args = parser.parse_args()

    extra_env = {"AUDITOR_BATCH_MAX_SIZE": str(args.batch_max_size)}
    levels = []
    with running_service(workers=1, extra_env=extra_env) as service:
        run_level(service.base_url, service.token, 1, 2, args.max_tokens)  # warm-up: bank, first-batch allocations
        for clients in args.levels:
            n_requests = args.requests or max(12, 2 * clients)
            level = run_level(service.base_url, service.token, clients, n_requests, args.max_tokens)
            rows = service_rows(service.db_url, level["ids"])
            level["recorded_with_scores"] = sum(1 for r in rows.values() if r["status"] == "done" and r["n_scores"] > 0)
            level["missing"] = len(level["ids"]) - level["recorded_with_scores"]
            del level["ids"]
            levels.append(level)
            print(
                f"{clients:>3} clients: {level['tokens_per_second']:7.1f} tok/s  p50 {level['p50_seconds']:.2f}s  "
                f"p99 {level['p99_seconds']:.2f}s  errors {level['errors']}  missing {level['missing']}",
                flush=True,
            )

    by_clients = {level["clients"]: level for level in levels}
    summary = {}
    if 1 in by_clients and max(by_clients) > 1:
        top = by_clients[max(by_clients)]
        summary = {
            "throughput_ratio": top["tokens_per_second"] / by_clients[1]["tokens_per_second"],
            "p50_ratio": top["p50_seconds"] / by_clients[1]["p50_seconds"],
            "at_clients": top["clients"],
        }
        summary["throughput_target_met"] = summary["throughput_ratio"] >= 4
        summary["p50_target_met"] = summary["p50_ratio"] <= 3
        print(
            f"throughput ×{summary['throughput_ratio']:.2f} at {top['clients']} clients (target ≥ 4: "
            f"{'met' if summary['throughput_target_met'] else 'missed'}); p50 ×{summary['p50_ratio']:.2f} "
            f"(target ≤ 3: {'met' if summary['p50_target_met'] else 'missed'})"
        )
    path = common.write_result(
        "concurrency",
        {"max_tokens": args.max_tokens, "batch_max_size": args.batch_max_size, "levels": levels, "summary": summary},
    )
    print(f"→ {path.relative_to(Path(common.REPO))}")


if __name__ == "__main__":
    main()
