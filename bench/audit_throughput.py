"""Audit throughput through the real service: batched submissions / one at a time.

    python bench/audit_throughput.py                 # 64 pairs, batches of 16
    python bench/audit_throughput.py --pairs 16 --batch 8

An audit scores a (prompt, completion) pair served by another stack: the worker replays it
teacher-forced and writes every concept x layer score to Postgres. The worker's model thread
replays the items queued at the same moment in padded forward passes of up to
AUDITOR_BATCH_MAX_SIZE rows, so batching should buy throughput. Three ways of auditing the same
pairs, each timed from the first POST to the last audit seen `done`:

  one at a time       POST one pair, poll it until done, then the next: a client that waits
  batched             POST the pairs in submissions of --batch items, then poll them all
  concurrent singles  POST every pair as its own single-item audit without waiting, then poll:
                      the same load as "batched" arriving as separate tasks, which the worker
                      can only batch by coalescing tasks that are queued together

Reported: items/s per mode and batched / one at a time. Polling is part of what a client sees, so
it is inside the timing; --poll sets its interval (it costs CPU the worker could use on a small
machine, which is why it is not 0). Warm-up audits go first (a worker loads its model and
calibrates on its first task) and are not timed.

Correctness guards: every audit must end `done` with scores; and the scores of a pair must not
depend on how it was submitted (padding in a batch must not leak into real positions): max |mean
difference| over each pair's (concept, layer) rows against the one-at-a-time run, expected < 1e-4.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result
from service import running_service

TOPICS = [
    ("How do I keep basil growing indoors?", "basil", "a sunny windowsill"),
    ("What's a good way to start running?", "running", "short easy runs"),
    ("How can I save money on groceries?", "grocery shopping", "a written list"),
    ("Any tips for a first camping trip?", "camping", "a tent you have pitched at home first"),
    ("How do I learn to touch type?", "touch typing", "ten minutes of practice a day"),
    ("What should I know before painting a room?", "painting a room", "good masking tape"),
    ("How do I get better at chess?", "chess", "solving a few tactics puzzles daily"),
    ("How can I make my mornings less rushed?", "morning routines", "laying out clothes the night before"),
    ("What's the best way to study for an exam?", "exam preparation", "spaced practice tests"),
    ("How do I start journaling?", "journaling", "a notebook you enjoy writing in"),
    ("How do I clean a cast iron pan?", "cast iron care", "hot water and a stiff brush"),
    ("How can I be more productive working from home?", "remote work", "a fixed start time"),
    ("What should I pack for a beach holiday?", "beach trips", "sunscreen and a refillable bottle"),
    ("How do I bake bread without a mixer?", "baking bread", "a long, slow rise"),
    ("How can I help my dog calm down during storms?", "anxious dogs", "a quiet, covered space"),
    ("What's an easy way to start meditating?", "meditation", "two minutes of breathing"),
]
WARM_UP_PER_WORKER = 24  # above the CLI's default task threads per worker (batch_max_size + 2)
OPENERS = [
    "Good question!",
    "Happy to help.",
    "Here is a simple approach.",
    "Sure.",
    "That's a great thing to work on.",
]
SENTENCES = [
    "The most useful first step with {topic} is {tip}.",
    "Start small and build the habit before adding anything more ambitious.",
    "Keep a short note of what worked, so you can repeat it next time.",
    "Most people find that consistency matters more than intensity when it comes to {topic}.",
    "If something goes wrong, don't worry: adjust one thing at a time and try again.",
    "Friends or online communities interested in {topic} can offer encouragement and practical advice.",
    "It also helps to set aside a regular time for it, even if it is only a few minutes.",
    "Give yourself a few weeks before judging the results.",
    "A little preparation, such as {tip}, saves a lot of trouble later.",
    "Finally, enjoy the process; progress tends to come sooner than you expect.",
]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    """Plausible assistant answers of about 20-80 tokens, fixed by the seed."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        prompt, topic, tip = TOPICS[i % len(TOPICS)]
        # A length drawn in words (~1.3 tokens each), so lengths spread evenly over the range
        # and the batches really carry padding.
        target_words, parts = rng.randint(15, 55), [rng.choice(OPENERS)]
        for sentence in rng.sample(SENTENCES, len(SENTENCES)):
            if len(" ".join(parts).split()) >= target_words:
                break
            parts.append(sentence)
        pairs.append({"prompt": prompt, "completion": " ".join(parts).format(topic=topic, tip=tip)})
    return pairs


class Auditor:
    def __init__(self, base_url: str, headers: dict[str, str], poll: float, timeout: float):
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=60)
        self.poll, self.timeout = poll, timeout

    def submit(self, items: list[dict]) -> list[str]:
        response = self.http.post("/v1/audits", json={"items": items})
        if response.status_code != 202:
            raise RuntimeError(f"POST /v1/audits -> {response.status_code}: {response.text}")
        return response.json()["ids"]

    def wait(self, ids: list[str]) -> dict[str, dict]:
        """Poll each id in turn until done or failed; the ids finish roughly in order anyway."""
        deadline = time.monotonic() + self.timeout
        final = {}
        for audit_id in ids:
            while True:
                body = self.http.get(f"/v1/audits/{audit_id}").raise_for_status().json()
                if body["status"] in ("done", "failed"):
                    final[audit_id] = body
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"audit {audit_id} still {body['status']} after {self.timeout:.0f}s")
                time.sleep(self.poll)
        return final


def one_at_a_time(auditor: Auditor, pairs: list[dict]) -> tuple[list[dict], float, list[float]]:
    results, latencies = [], []
    started = time.perf_counter()
    for pair in pairs:
        t0 = time.perf_counter()
        [audit_id] = auditor.submit([pair])
        results.append(auditor.wait([audit_id])[audit_id])
        latencies.append(time.perf_counter() - t0)
    return results, time.perf_counter() - started, latencies


def batched(auditor: Auditor, pairs: list[dict], batch: int) -> tuple[list[dict], float]:
    started = time.perf_counter()
    ids = [i for start in range(0, len(pairs), batch) for i in auditor.submit(pairs[start : start + batch])]
    final = auditor.wait(ids)
    return [final[i] for i in ids], time.perf_counter() - started


def concurrent_singles(auditor: Auditor, pairs: list[dict]) -> tuple[list[dict], float]:
    started = time.perf_counter()
    ids = [auditor.submit([pair])[0] for pair in pairs]
    final = auditor.wait(ids)
    return [final[i] for i in ids], time.perf_counter() - started


def failures(results: list[dict]) -> list[str]:
    return [
        f"{r['id']}: {r['status']} {r.get('error') or ''}".strip()
        for r in results
        if r["status"] != "done" or not r["scores"]
    ]


def max_mean_diff(reference: list[dict], other: list[dict]) -> float | None:
    """Largest |mean| difference over the (concept_id, layer) rows both runs have for each pair."""
    worst = None
    for a, b in zip(reference, other):
        means = {(s["concept_id"], s["layer"]): s["mean"] for s in a["scores"]}
        for s in b["scores"]:
            key = (s["concept_id"], s["layer"])
            if key in means:
                diff = abs(means[key] - s["mean"])
                worst = diff if worst is None else max(worst, diff)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="items per batched submission (API maximum 64)")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between status polls")
    parser.add_argument("--workers", type=int, default=1, help="`auditor worker` processes (one model each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker process")
    parser.add_argument("--concurrency", type=int, default=None, help="task threads per worker (default: the CLI's)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for one mode's audits")
    args = parser.parse_args()
    if not 1 <= args.batch <= 64:
        parser.error("--batch must be 1..64 (the API takes at most 64 items per submission)")
    pairs = make_pairs(args.pairs)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    print(
        f"{len(pairs)} pairs, batches of {args.batch}, poll every {args.poll}s, "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
        flush=True,
    )

    with running_service(workers=args.workers, torch_threads=args.threads, concurrency=args.concurrency) as svc:
        auditor = Auditor(svc.base_url, svc.headers, args.poll, args.timeout)
        t0 = time.perf_counter()
        # A worker loads its model on its first task. With several workers, enough single
        # audits at once that each gets some (one worker reserves at most one task per thread),
        # so no model load lands inside a timed mode.
        singles = 1 if args.workers == 1 else WARM_UP_PER_WORKER * args.workers
        warm_ids = [auditor.submit([pairs[n % len(pairs)]])[0] for n in range(singles)]
        warm_ids += auditor.submit(pairs[: args.batch])
        warm = list(auditor.wait(warm_ids).values())
        if bad := failures(warm):
            raise RuntimeError(f"warm-up audits failed: {bad[:3]}\n{svc.logs()}")
        print(f"warm-up: {time.perf_counter() - t0:.1f} s", flush=True)

        single, t_single, latencies = one_at_a_time(auditor, pairs)
        print(f"one at a time: {len(pairs) / t_single:.2f} items/s", flush=True)
        batch, t_batch = batched(auditor, pairs, args.batch)
        print(f"batched: {len(pairs) / t_batch:.2f} items/s", flush=True)
        concurrent, t_concurrent = concurrent_singles(auditor, pairs)
        print(f"concurrent singles: {len(pairs) / t_concurrent:.2f} items/s", flush=True)
        auditor.http.close()
        threads = svc.torch_threads

    modes = {
        "one_at_a_time": (single, t_single),
        "batched": (batch, t_batch),
        "concurrent_singles": (concurrent, t_concurrent),
    }
    failed = {name: failures(results) for name, (results, _) in modes.items()}
    tokens = [r["completion_tokens"] for r in single if r["completion_tokens"]]
    diff_batched, diff_concurrent = max_mean_diff(single, batch), max_mean_diff(single, concurrent)
    result = {
        "pairs": len(pairs),
        "batch": args.batch,
        "poll_s": args.poll,
        "workers": args.workers,
        "torch_threads": threads,
        "worker_concurrency": args.concurrency or "cli default",
        "completion_tokens": {"min": min(tokens), "mean": round(sum(tokens) / len(tokens), 1), "max": max(tokens)}
        if tokens
        else None,
        "modes": {
            name: {
                "seconds": round(seconds, 3),
                "items_per_s": round(len(pairs) / seconds, 2),
                "failed": len(failed[name]),
            }
            for name, (_, seconds) in modes.items()
        },
        "one_at_a_time_latency_median_s": round(sorted(latencies)[len(latencies) // 2], 4),
        "ratio_batched_over_one_at_a_time": round(t_single / t_batch, 2),
        "ratio_concurrent_singles_over_one_at_a_time": round(t_single / t_concurrent, 2),
        "max_abs_mean_diff_batched_vs_single": diff_batched,
        "max_abs_mean_diff_concurrent_vs_single": diff_concurrent,
        "failures": {name: f[:5] for name, f in failed.items() if f},
        "loadavg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = write_result("audit_throughput", result)

    from rich.console import Console
    from rich.table import Table

    table = Table("mode", "seconds", "items/s", "x one at a time", "failed", title=f"audits of {len(pairs)} pairs")
    for name, (_, seconds) in modes.items():
        table.add_row(
            name.replace("_", " "),
            f"{seconds:.2f}",
            f"{len(pairs) / seconds:.2f}",
            f"{t_single / seconds:.2f}",
            str(len(failed[name])),
        )
    console = Console()
    console.print(table)

    def show(diff: float | None) -> str:
        return "no common rows" if diff is None else f"{diff:.2e}" + ("" if diff < 1e-4 else " [red](>= 1e-4)[/]")

    console.print(
        f"max |mean diff| vs one at a time: batched {show(diff_batched)}, "
        f"concurrent singles {show(diff_concurrent)}; completion tokens {result['completion_tokens']}"
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
