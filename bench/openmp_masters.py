"""Why the worker generates slower than the same code on a main thread: OpenMP thread pools.

    python bench/openmp_masters.py        # ~1 min

torch (CPU wheel) runs intra-op work on libgomp. Every thread that starts a parallel region
becomes a master with a pool of its own, and once libgomp manages more threads than the machine
has CPUs it stops spinning between regions ("throttled": workers sleep and are woken by futex
for every region). On 2 cores with 2 torch threads, a second master is enough. A decode step is
hundreds of small parallel regions, so every wake-up shows.

Printed: ms per generated token (32 greedy tokens, monitored), for the model used on one thread
only, again after one other (still running) thread has run a single large matmul (a second
master), and once more after that thread has exited. The
worker's model thread is not the first torch thread in its process, which is the slow case.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_result

MESSAGES = [{"role": "user", "content": "How do solar panels work?"}]


def main() -> None:
    import torch

    from auditor.settings import Settings
    from workers.runtime.generate import SamplingConfig
    from workers.serving.host import ModelHost

    sampling = SamplingConfig(max_new_tokens=32)
    host = ModelHost(Settings(data_dir=REPO / ".auditor", torch_threads=2))
    model_thread = ThreadPoolExecutor(1)  # one thread owns the model, as in a worker
    bank = model_thread.submit(host.bank).result()

    def ms_per_token() -> float:
        host.generate(MESSAGES, sampling, bank=bank)
        runs = []
        for _ in range(4):
            began = time.perf_counter()
            result = host.generate(MESSAGES, sampling, bank=bank)
            runs.append(1000 * (time.perf_counter() - began) / len(result.generation.output_ids))
        return statistics.median(runs)

    alone = model_thread.submit(ms_per_token).result()
    # Kept alive: when a master thread exits, libgomp frees its pool and the throttling ends.
    other_thread = ThreadPoolExecutor(1)
    other_thread.submit(lambda: torch.randn(256, 4096) @ torch.randn(4096, 4096)).result()
    after = model_thread.submit(ms_per_token).result()
    result = {
        "ms_per_token_one_master": round(alone, 1),
        "ms_per_token_after_a_second_master": round(after, 1),
        "slowdown": round(after / alone, 3),
    }
    other_thread.shutdown()  # the second master exits: its pool goes
    result["ms_per_token_after_it_exited"] = round(model_thread.submit(ms_per_token).result(), 1)
    write_result("openmp_masters", result)
    print(result)


if __name__ == "__main__":
    main()
