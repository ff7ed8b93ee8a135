"""Where a worker's time goes, in one process: the same greedy chat completion three ways.

    python bench/serving_overhead.py                    # 20 prompts x 2 passes, 32 new tokens

- `plain`: `ModelHost.generate`, the single-sequence monitored loop (service_latency's baseline);
- `model_thread`: through the worker's model thread (continuous batching, a batch of one here),
  divergence flags off;
- `model_thread+flags`: the same with divergence flags on, i.e. each answer also re-read alone
  for its text signal.

Then the re-read alone, on each of those answers one at a time (as a batch of one is re-read):
`workers.monitoring.control.text_means`, which reads only as deep as the deepest primary layer,
against a read of the whole model (every layer, through the unembedding), as it was before.

The three run interleaved prompt by prompt, so a change in machine load hits all of them alike.
Same greedy requests, so the texts must be equal (checked). The database is a throwaway SQLite
file; nothing here touches Redis or Postgres, so what the service adds on top (HTTP, queues,
writes) is service_latency's ratio divided by this one's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_result
from service_latency import PROMPTS, WARM_UP

MODES = ("plain", "model_thread", "model_thread+flags")


def full_depth_read(model, text: str) -> None:
    """The re-read as it was: every layer captured, the forward pass run to the logits."""
    import torch

    from workers.runtime.activations import tokenize_texts
    from workers.runtime.hooks import ResidualCapture, hooked

    ids = torch.tensor(tokenize_texts(model, [text]), device=model.device)
    with torch.inference_mode(), hooked(model, capture=ResidualCapture(range(model.n_layers))):
        model.bridge.forward(ids)


def reread_seconds(runtime, bank, answers: list[str]) -> dict[str, float]:
    """p50 seconds to re-read one answer: the serving path's text signal vs a full-depth read."""
    from workers.monitoring.control import text_means

    model = runtime.host.model
    timings: dict[str, list[float]] = {"primary_layers_only": [], "full_depth": []}
    for text in answers:
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        for name, read in (
            ("primary_layers_only", lambda: text_means(model, bank, [ids])),
            ("full_depth", lambda: full_depth_read(model, text)),
        ):
            began = time.perf_counter()
            runtime.model_thread.call(read).result()
            timings[name].append(time.perf_counter() - began)
    return {name: float(np.median(values)) for name, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the prompts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use only the first N prompts")
    args = parser.parse_args()

    from auditor.settings import Settings
    from workers.runtime.generate import SamplingConfig
    from workers.serving.context import WorkerContext

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="auditor-overhead-"))
    settings = Settings(
        data_dir=REPO / ".auditor", database_url=f"sqlite:///{workdir / 'auditor.db'}", divergence_flags=True
    )
    from auditor.db.engine import run_migrations

    run_migrations(settings.database_url)
    runtime = WorkerContext(settings)
    runtime.model_thread.call(runtime.warm_up).result()  # model, bank, calibration, divergence thresholds
    bank = runtime.bank()
    sampling = SamplingConfig(max_new_tokens=args.max_tokens)
    print(f"warm-up: {time.perf_counter() - started:.1f} s, load average {os.getloadavg()[0]:.2f}", flush=True)

    def ask(mode: str, prompt: str) -> tuple[float, str, int]:
        messages = [{"role": "user", "content": prompt}]
        settings.divergence_flags = mode == "model_thread+flags"
        began = time.perf_counter()
        if mode == "plain":
            result = runtime.host.generate(messages, sampling, bank=bank)
            text, flagged = result.text, 0
        else:
            served = runtime.model_thread.generate(messages, sampling, chat=True).result()
            text, flagged = served.text, int(served.text_z is not None)
        return time.perf_counter() - began, text, flagged

    for mode in MODES:
        ask(mode, WARM_UP)
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    rereads = 0
    mismatches = 0
    answers: list[str] = []
    for repeat in range(args.repeats):
        for prompt in PROMPTS[: args.prompts]:
            texts = []
            for mode in MODES:
                took, text, flagged = ask(mode, prompt)
                seconds[mode].append(took)
                texts.append(text)
                rereads += flagged
            mismatches += len(set(texts)) > 1
            answers.append(texts[0])
        print(f"pass {repeat + 1}/{args.repeats} done", flush=True)
    reread = reread_seconds(runtime, bank, [a for a in answers if a.strip()])

    p50 = {mode: float(np.median(values)) for mode, values in seconds.items()}
    result = {
        "prompts": args.prompts,
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "p50_s": {mode: round(value, 4) for mode, value in p50.items()},
        "model_thread_over_plain_p50": round(p50["model_thread"] / p50["plain"], 3),
        "flags_over_model_thread_p50": round(p50["model_thread+flags"] / p50["model_thread"], 3),
        "flags_over_plain_p50": round(p50["model_thread+flags"] / p50["plain"], 3),
        "answers_reread": rereads,
        "text_mismatches": mismatches,
        "reread_one_answer_p50_s": {name: round(value, 4) for name, value in reread.items()},
        "primary_layers": sorted(set(bank.auto_layers.values())),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = write_result("serving_overhead", result)
    for mode in MODES:
        print(f"{mode:>20}: p50 {1000 * p50[mode]:7.0f} ms")
    print({k: v for k, v in result.items() if k.endswith("_p50") or k in ("answers_reread", "text_mismatches")})
    print(
        f"re-reading one answer, p50: {1000 * reread['primary_layers_only']:.0f} ms to the deepest primary layer "
        f"{max(bank.auto_layers.values())}, {1000 * reread['full_depth']:.0f} ms through the whole model"
    )
    print(f"written {path}")


if __name__ == "__main__":
    main()
