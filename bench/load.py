"""Load test: concurrent clients against the full service with two workers, on loopback.

    python bench/load.py                                  # 8 clients, 96 requests → bench/results/load.json
    python bench/load.py --clients 16 --requests 200 --time-limit 300

API → Redis → two `auditor worker` processes (one model each, `AUDITOR_PROCESSES_PER_MACHINE=2`
so they split the cores) → Postgres, all started by bench/service.py on 127.0.0.1 and torn down
afterwards. Each client is a thread with its own official `openai` client (and, for audits, an
httpx client) sending requests back to back until the request budget or the time limit is spent
(both bounded). One request in `--audit-every` is an audit of an external completion (submit,
then poll until done); the rest are chat completions.

Reported: requests/s and completion tokens/s over the wall time, p50 / p99 client latency per
kind, the error count with examples, and, read back from Postgres afterwards, how many of the
answered requests have their row `done` with one score per active concept (`missing` must be 0),
and that no request id appears twice.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import common
import httpx
from concurrency import PROMPTS, percentile
from service import running_service, service_rows


def run_load(service, clients: int, n_requests: int, time_limit: float, max_tokens: int, audit_every: int) -> dict:
    from openai import OpenAI

    assert service.base_url.startswith("http://127.0.0.1:"), "loopback only"
    lock = threading.Lock()
    budget = iter(range(n_requests))
    records: list[dict] = []
    deadline = time.monotonic() + time_limit

    def chat(client, prompt: str) -> dict:
        response = client.chat.completions.create(
            model="auditor", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        return {"kind": "chat", "id": response.id, "tokens": response.usage.completion_tokens}

    def audit(http: httpx.Client, prompt: str, index: int) -> dict:
        submitted = http.post(
            "/v1/audits",
            json={
                "items": [
                    {
                        "prompt": prompt,
                        "completion": f"Here is a short answer, number {index}: start small and keep going.",
                    }
                ]
            },
        )
        submitted.raise_for_status()
        audit_id = submitted.json()["ids"][0]
        while time.monotonic() < deadline + 120:
            body = http.get(f"/v1/audits/{audit_id}").raise_for_status().json()
            if body["status"] in ("done", "failed"):
                if body["status"] == "failed":
                    raise RuntimeError(f"audit {audit_id} failed: {body.get('error')}")
                return {"kind": "audit", "id": audit_id, "tokens": 0}
            time.sleep(0.2)
        raise TimeoutError(f"audit {audit_id} not done in time")

    def client_loop() -> None:
        client = OpenAI(base_url=service.base_url + "/v1", api_key=service.token, max_retries=0, timeout=600)
        with httpx.Client(base_url=service.base_url, headers=service.headers, timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    index = next(budget, None)
                if index is None:
                    return
                prompt = PROMPTS[index % len(PROMPTS)]
                kind = "audit" if audit_every and index % audit_every == audit_every - 1 else "chat"
                started = time.perf_counter()
                try:
                    record = audit(http, prompt, index) if kind == "audit" else chat(client, prompt)
                    record["error"] = None
                except Exception as exc:  # counted, not raised: the error count is a result
                    record = {"kind": kind, "id": None, "tokens": 0, "error": f"{type(exc).__name__}: {exc}"[:200]}
                record["seconds"] = time.perf_counter() - started
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ok = [r for r in records if r["error"] is None]

    def latency(kind: str) -> dict:
        values = [r["seconds"] for r in ok if kind in ("all", r["kind"])]
        return {
            "n": len(values),
            "p50_seconds": statistics.median(values) if values else None,
            "p99_seconds": percentile(values, 0.99) if values else None,
        }

    return {
        "clients": clients,
        "requests_budget": n_requests,
        "time_limit_seconds": time_limit,
        "sent": len(records),
        "answered": len(ok),
        "errors": len(records) - len(ok),
        "error_examples": sorted({r["error"] for r in records if r["error"]})[:5],
        "wall_seconds": wall,
        "requests_per_second": len(ok) / wall,
        "completion_tokens": sum(r["tokens"] for r in ok),
        "tokens_per_second": sum(r["tokens"] for r in ok) / wall,
        "latency": {kind: latency(kind) for kind in ("all", "chat", "audit")},
        "ids": [r["id"] for r in ok],
    }


def active_concepts(service) -> int:
    with httpx.Client(base_url=service.base_url, headers=service.headers, timeout=30) as http:
        return len(http.get("/admin/concepts", params={"active": True}).raise_for_status().json())


def concepts_scored(db_url: str, request_ids: list[str]) -> dict[str, int]:
    """Per request id: how many distinct concepts have score rows (each has one per layer)."""
    from sqlalchemy import text

    from auditor.db.engine import make_engine

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT request_id, count(DISTINCT concept_id) FROM request_scores"
                    " WHERE request_id = ANY(:ids) GROUP BY request_id"
                ),
                {"ids": list(request_ids)},
            ).all()
    finally:
        engine.dispose()
    return {request_id: n for request_id, n in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=96, help="request budget (all kinds)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds; no new request starts after it")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--audit-every", type=int, default=4, help="every Nth request is an audit; 0 = none")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    extra_env = {"AUDITOR_PROCESSES_PER_MACHINE": str(args.workers)}
    with running_service(workers=args.workers, extra_env=extra_env) as service:
        # Warm-up outside the clock: every worker loads its model and calibration on start, and
        # /readyz only waits for the first ping.
        run_load(service, args.workers * 2, args.workers * 2, 600, 4, 0)
        result = run_load(service, args.clients, args.requests, args.time_limit, args.max_tokens, args.audit_every)
        n_concepts = active_concepts(service)
        rows = service_rows(service.db_url, result["ids"])
        scored = concepts_scored(service.db_url, result["ids"])
    ids = result.pop("ids")
    complete = [i for i in ids if i in rows and rows[i]["status"] == "done" and scored.get(i) == n_concepts]
    result.update(
        {
            "workers": args.workers,
            "max_tokens": args.max_tokens,
            "active_concepts": n_concepts,
            "recorded_with_all_scores": len(complete),
            "missing": len(ids) - len(complete),
            "duplicate_ids": len(ids) - len(set(ids)),
        }
    )
    lat = result["latency"]
    print(
        f"{args.clients} clients, {args.workers} workers: {result['answered']}/{result['sent']} answered in "
        f"{result['wall_seconds']:.1f}s — {result['requests_per_second']:.2f} req/s, "
        f"{result['tokens_per_second']:.1f} tok/s; chat p50 {lat['chat']['p50_seconds'] or 0:.2f}s "
        f"p99 {lat['chat']['p99_seconds'] or 0:.2f}s; audit p50 {lat['audit']['p50_seconds'] or 0:.2f}s; "
        f"errors {result['errors']}; all scores in Postgres for {len(complete)}/{len(ids)} "
        f"(missing {result['missing']}, duplicates {result['duplicate_ids']})",
        flush=True,
    )
    path = common.write_result("load", result)
    print(f"→ {path.relative_to(Path(common.REPO))}")


if __name__ == "__main__":
    main()
