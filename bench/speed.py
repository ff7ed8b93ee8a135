"""Speed benchmarks, each a ratio measured side by side in one run on the same weights.

    python bench/speed.py                 # all four
    python bench/speed.py --only monitor  # monitor | article | batch | memory

1. monitor: monitored generation (every built-in concept x every layer, 64 new tokens, scores
   and aggregates included) / the same loop with no hooks; plain Hugging Face `generate` shown
   alongside. Target <= 1.05.
2. article: the reference article's loop (full re-run through run_with_hooks per new token,
   probe hook attached) / monitored KV-cached generation, same tokens out, at 32, 80 and 256
   new tokens. Targets >= 4 at 80, >= 10 at 256.
3. batch: texts/s scoring many texts in padded batches / one text per forward pass. Target >= 3.
4. memory: peak RSS of a fresh process that loads the default model and generates once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import EVAL_DIR, host, median, timed, write_result

from workers.monitoring.scores import score_generation
from workers.runtime.generate import SamplingConfig, encode_prompt, generate

PROMPTS = [
    "I'm thinking about learning to play guitar. Any advice for getting started?",
    "What's the best way to build a small REST API?",
    "Explain how a refrigerator keeps food cold.",
    "Write a short note to a neighbour about a package I received for them.",
    "What should I consider before adopting a dog?",
]


def plain_hf_model(eng):
    """A second copy of the same weights, never wrapped by TransformerLens (SDPA attention)."""
    from workers.runtime.model import _load_hf, resolve_dtype

    dtype = resolve_dtype(eng.settings.dtype, eng.model.device)
    hf_model, *_ = _load_hf(eng.settings.model, dtype, eng.settings.model_cache_dir)
    return hf_model.to(eng.model.device).eval()


def bench_monitor(eng, repeats: int = 3) -> dict:
    model, bank = eng.model, eng.bank()
    plain_hf = plain_hf_model(eng)
    config = SamplingConfig(max_new_tokens=64, stop_at_eos=False)  # exactly 64 tokens each
    hf_config = dict(max_new_tokens=64, min_new_tokens=64, do_sample=False)
    plain_t, monitored_t, hf_t = [], [], []
    for _ in range(repeats):
        for prompt in PROMPTS:
            ids = encode_prompt(model, prompt)
            plain, t_plain = timed(generate, model, ids, config)

            def monitored_call():
                generation = generate(model, ids, config, bank.layers)
                return generation, score_generation(bank, generation)

            (monitored, _scores), t_mon = timed(monitored_call)
            with torch.inference_mode():
                reference, t_hf = timed(plain_hf.generate, torch.tensor([ids]), **hf_config)
            assert plain.output_ids == monitored.output_ids, "probes changed the output"
            assert reference[0, len(ids) :].tolist() == monitored.output_ids, "differs from plain HF"
            plain_t.append(t_plain)
            monitored_t.append(t_mon)
            hf_t.append(t_hf)
    result = {
        "concepts": len(bank.names),
        "layers": len(bank.layers),
        "new_tokens": 64,
        "runs": len(plain_t),
        "unmonitored_s_median": round(median(plain_t), 3),
        "monitored_s_median": round(median(monitored_t), 3),
        "plain_hf_generate_s_median": round(median(hf_t), 3),
        # per-run ratios, so a background hiccup in one run cannot dominate the figure
        "monitored_over_unmonitored": round(median([m / p for m, p in zip(monitored_t, plain_t)]), 3),
        "monitored_over_plain_hf_generate": round(median([m / h for m, h in zip(monitored_t, hf_t)]), 3),
        "target": "monitored / unmonitored <= 1.05",
    }
    print(f"monitor: {result}", flush=True)
    return result


@torch.inference_mode()
def article_loop(model, prompt_ids: list[int], layers: list[int], max_tokens: int) -> list[int]:
    """The article's generate_steered, with a probe hook instead of a steering hook: the whole
    sequence goes through run_with_hooks again for every new token."""
    captured = []

    def probe(value, hook):
        captured.append(value[:, -1, :].detach())

    hooks = [(model.hook_name(layer), probe) for layer in layers]
    generated = torch.tensor([prompt_ids])
    out = []
    for _ in range(max_tokens):
        logits = model.bridge.run_with_hooks(generated, fwd_hooks=hooks)
        next_tok = logits[0, -1, :].argmax().view(1, 1)
        generated = torch.cat([generated, next_tok], dim=1)
        out.append(int(next_tok))
    return out


def bench_article(eng, lengths=(32, 80, 256)) -> dict:
    model, bank = eng.model, eng.bank()
    ids = encode_prompt(model, PROMPTS[0])
    rows = []
    for n in lengths:
        config = SamplingConfig(max_new_tokens=n, stop_at_eos=False)
        started = time.perf_counter()
        generation = generate(model, ids, config, bank.layers)
        score_generation(bank, generation)
        t_ours = time.perf_counter() - started
        article, t_article = timed(article_loop, model, ids, bank.layers, n)
        same = article == generation.output_ids
        rows.append(
            {
                "new_tokens": n,
                "article_s": round(t_article, 2),
                "monitored_s": round(t_ours, 2),
                "speedup": round(t_article / t_ours, 2),
                "same_tokens": same,
            }
        )
        print(f"article: {rows[-1]}", flush=True)
    return {"rows": rows, "targets": {"80": ">= 4", "256": ">= 10"}}


def bench_batch(eng, n_texts: int = 256) -> dict:
    from workers.monitoring.concepts import per_text_scores

    model, bank = eng.model, eng.bank()
    path = EVAL_DIR / "sst2_test.jsonl"
    texts = [json.loads(line)["text"] for line in path.open()][:n_texts]
    per_text_scores(model, texts[:8], bank.directions, bank.layers, batch_size=8)  # warm-up
    batched, t_batched = timed(per_text_scores, model, texts, bank.directions, bank.layers, batch_size=32)
    single, t_single = timed(per_text_scores, model, texts, bank.directions, bank.layers, batch_size=1)
    max_diff = float((batched - single).abs().max())
    result = {
        "texts": n_texts,
        "batch_size": 32,
        "batched_texts_per_s": round(n_texts / t_batched, 1),
        "single_texts_per_s": round(n_texts / t_single, 1),
        "throughput_ratio": round(t_single / t_batched, 2),
        "max_abs_score_difference": max_diff,
        "target": ">= 3",
    }
    print(f"batch: {result}", flush=True)
    return result


MEMORY_PROBE = """
import torch
from auditor.settings import Settings
from workers.serving.host import ModelHost
host = ModelHost(Settings())
model = host.model
from workers.runtime.generate import SamplingConfig, encode_prompt, generate
generate(model, encode_prompt(model, "Hello there"), SamplingConfig(max_new_tokens=16), list(range(model.n_layers)))
# VmHWM is this process's own peak; ru_maxrss can carry the forking parent's peak over.
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")))
"""


def bench_memory() -> dict:
    """Peak RSS in a fresh process: cold (first load dequantises the GGUF into the weights
    cache) and warm (loads the cached float32 weights)."""
    import os
    import tempfile

    def peak(cache_dir: str) -> float:
        env = {**os.environ, "AUDITOR_MODEL_CACHE_DIR": cache_dir}
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True, env=env)
        return round(int(out.stdout.strip().splitlines()[-1]) / 1024, 1)

    with tempfile.TemporaryDirectory() as cache_dir:
        cold = peak(cache_dir)
        warm = peak(cache_dir)
    result = {
        "cold_peak_rss_mib": cold,
        "warm_peak_rss_mib": warm,
        "what": "fresh process: load default model + one monitored generation",
    }
    print(f"memory: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["monitor", "article", "batch", "memory"], action="append")
    args = parser.parse_args()
    chosen = args.only or ["monitor", "article", "batch", "memory"]
    eng = host()
    results = {}
    started = time.perf_counter()
    if "monitor" in chosen:
        results["monitor"] = bench_monitor(eng)
    if "article" in chosen:
        results["article"] = bench_article(eng)
    if "batch" in chosen:
        results["batch"] = bench_batch(eng)
    if "memory" in chosen:
        results["memory"] = bench_memory()
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"written {write_result('speed' if len(chosen) == 4 else 'speed-' + '-'.join(chosen), results)}")


if __name__ == "__main__":
    main()
