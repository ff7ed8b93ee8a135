"""Peak memory of the worst audit the limits allow, read the way a worker reads it.

    python bench/audit_memory.py                        # 4 items at the model's full context
    python bench/audit_memory.py --items 64             # the whole worst submission (~30 passes)

An audit submission holds up to MAX_AUDIT_ITEMS (64) items, each prompt + completion up to the
model's context (8,192 tokens for SmolLM2). The model thread replays them in passes of at most
AUDITOR_MAX_BATCH_TOKENS padded tokens (16,384) and at most the attention scores of one
sequence of half that (a full-context item passes alone), each pass
stopping after the deepest monitored layer and keeping per-layer cosines with the bank
([rows, positions, concepts]) instead of residuals ([rows, positions, d_model]). Measured: the
process's peak RSS (ru_maxrss) after the model and bank are loaded, and after the whole audit,
in a fresh process; plus what the residuals alone would have taken had they been kept whole.
Items are random token ids (the cost does not depend on the words). Memory is freed between
passes, so the peak of one full pass is the peak of any submission: the default replays four
items (four passes) rather than all 64 (most of an hour on 2 cores); `--items 1` is one pass.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_result


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=0, help="prompt + completion per item (0: the model's context)")
    args = parser.parse_args()
    from auditor.settings import Settings
    from workers.monitoring.replay import replay_chunks, replay_scores
    from workers.serving.host import ModelHost

    settings = Settings(data_dir=REPO / ".auditor")
    host = ModelHost(settings)
    model, bank = host.model, host.bank()
    tokens = args.tokens or model.max_context
    loaded = peak_mib()
    generator = torch.Generator().manual_seed(0)
    sequences = []
    for _ in range(args.items):
        ids = torch.randint(100, model.vocab_size, (tokens,), generator=generator).tolist()
        sequences.append((ids[: tokens // 2], ids[tokens // 2 :]))
    chunks = replay_chunks([tokens] * args.items, settings.batch_max_size, settings.max_batch_tokens)
    started = time.perf_counter()
    for number, chunk in enumerate(chunks, 1):
        replay_scores(model, bank, [sequences[i] for i in chunk])
        print(f"pass {number}/{len(chunks)}: peak RSS {peak_mib():,.0f} MiB", flush=True)
    seconds = time.perf_counter() - started
    whole = args.items * tokens * len(bank.layers) * model.d_model * 4 / 2**20
    result = {
        "items": args.items,
        "tokens_per_item": tokens,
        "passes": len(chunks),
        "rows_per_pass": len(chunks[0]),
        "max_batch_tokens": settings.max_batch_tokens,
        "monitored_layers": len(bank.layers),
        "concepts": len(bank.names),
        "peak_rss_after_load_mib": loaded,
        "peak_rss_after_audit_mib": peak_mib(),
        "residuals_kept_whole_would_be_mib": whole,
        "seconds": seconds,
    }
    print(
        f"{args.items} items x {tokens} tokens in {len(chunks)} passes ({seconds:.0f} s): peak RSS "
        f"{loaded:,.0f} MiB loaded -> {result['peak_rss_after_audit_mib']:,.0f} MiB; the residuals alone, "
        f"kept whole, would be {whole:,.0f} MiB"
    )
    print(f"wrote {write_result('audit_memory', result)}")


if __name__ == "__main__":
    main()
