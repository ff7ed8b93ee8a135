"""What streaming costs: a request's total time streamed against the same request not streamed.

    python bench/streaming_overhead.py                    # both paths, 12 prompts x 2, 64 tokens
    python bench/streaming_overhead.py --paths redis --repeats 1

Paths:
- `embedded`: `auditor run` (API + in-process worker, SQLite, the in-memory channel), as a
  subprocess, as a user runs it;
- `redis`: the compose deployment's path, `auditor api` + `auditor worker` on Redis (tokens on
  a Redis stream) and Postgres (bench/service.py).

Measured, client side with the official `openai` client: the wall time from sending the request
to the last byte (for a stream: to `data: [DONE]`), for the same greedy request streamed and not
streamed, sent one at a time and alternating (stream first on even prompts, plain first on odd
ones), so both see the same machine. Also the time to the first content chunk, which is what
streaming is for. Target: streamed / non-streamed <= 1.05 at the median of the per-prompt ratios.

Both stacks fit their null of ordinary answers on a short control set (AUDITOR_CONTROL_LIMIT
240, AUDITOR_CONTROL_MAX_TOKENS 8, as the service tests do): the warm-up is not what is measured,
and every answer is still read against a null, on both sides alike.

Correctness guard, reported beside the timings: the streamed text must equal the non-streamed
text for every prompt.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_result
from service import _issue_token, default_threads, free_port, running_service
from service_latency import PROMPTS as SERVICE_PROMPTS

SHORT_NULL = {"AUDITOR_CONTROL_LIMIT": "240", "AUDITOR_CONTROL_MAX_TOKENS": "8"}
PROMPTS = SERVICE_PROMPTS[:12]  # the ordinary questions bench/service_latency.py times


@contextmanager
def embedded(threads: int):
    """`auditor run` on a throwaway SQLite database, sharing the repo's extraction cache."""
    from auditor.db.engine import run_migrations

    with tempfile.TemporaryDirectory(prefix="auditor-stream-bench-") as tmp:
        db_url = f"sqlite:///{tmp}/auditor.db"
        run_migrations(db_url)
        token = _issue_token(db_url)
        port = free_port()
        env = {
            **os.environ,
            "AUDITOR_DATABASE_URL": db_url,
            "AUDITOR_DATA_DIR": str(REPO / ".auditor"),
            "AUDITOR_TORCH_THREADS": str(threads),
            **SHORT_NULL,
        }
        env.pop("AUDITOR_BROKER_URL", None)
        log = Path(tmp) / "run.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "auditor.cli", "run", "--port", str(port), "--log-level", "warning"],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 1800
            while True:
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "auditor run did not become ready"
                time.sleep(1)
            yield base, token
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def measure(base_url: str, token: str, repeats: int, max_tokens: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key=token, max_retries=0, timeout=600)

    def plain(prompt: str) -> tuple[float, str]:
        started = time.perf_counter()
        answer = client.chat.completions.create(
            model="auditor", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        return time.perf_counter() - started, answer.choices[0].message.content

    def streamed(prompt: str) -> tuple[float, float, str]:
        started, first, parts = time.perf_counter(), None, []
        for chunk in client.chat.completions.create(
            model="auditor",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - started
                parts.append(chunk.choices[0].delta.content)
        return time.perf_counter() - started, first, "".join(parts)

    plain(PROMPTS[0])  # warm: the first request pays for lazy imports on both sides
    streamed(PROMPTS[0])
    rows = []
    for repeat in range(repeats):
        for index, prompt in enumerate(PROMPTS):
            if index % 2 == 0:
                total_s, first_s, text_s = streamed(prompt)
                total_p, text_p = plain(prompt)
            else:
                total_p, text_p = plain(prompt)
                total_s, first_s, text_s = streamed(prompt)
            rows.append(
                {
                    "repeat": repeat,
                    "prompt": index,
                    "plain_s": total_p,
                    "stream_s": total_s,
                    "first_chunk_s": first_s,
                    "same_text": text_s == text_p,
                }
            )
        print(f"  pass {repeat + 1}/{repeats} done", flush=True)
    ratios = np.asarray([r["stream_s"] / r["plain_s"] for r in rows])
    return {
        "ratio_p50": float(np.median(ratios)),
        "ratio_mean": float(ratios.mean()),
        "plain_p50_s": float(np.median([r["plain_s"] for r in rows])),
        "stream_p50_s": float(np.median([r["stream_s"] for r in rows])),
        "first_chunk_p50_s": float(np.median([r["first_chunk_s"] for r in rows])),
        "all_texts_equal": all(r["same_text"] for r in rows),
        "n": len(rows),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", choices=["embedded", "redis"], default=["embedded", "redis"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    threads = default_threads(1)
    results = {"max_tokens": args.max_tokens, "target_ratio_p50": 1.05, "paths": {}}
    for path in args.paths:
        print(f"== {path}", flush=True)
        if path == "embedded":
            with embedded(threads) as (base, token):
                found = measure(base, token, args.repeats, args.max_tokens)
        else:
            with running_service(workers=1, torch_threads=threads, extra_env=SHORT_NULL) as svc:
                found = measure(svc.base_url, svc.token, args.repeats, args.max_tokens)
        results["paths"][path] = found
        print(
            f"  {path}: streamed/plain p50 {found['ratio_p50']:.3f} (mean {found['ratio_mean']:.3f}); "
            f"plain p50 {found['plain_p50_s']:.2f} s, streamed p50 {found['stream_p50_s']:.2f} s, "
            f"first chunk p50 {found['first_chunk_p50_s']:.2f} s; texts equal: {found['all_texts_equal']}",
            flush=True,
        )
    print(f"wrote {write_result('streaming_overhead', results)}")


if __name__ == "__main__":
    main()
