"""Generate the greedy answers to the control prompts that ship for the default model.

    .venv/bin/python scripts/make_control_answers.py [--max-new-tokens 128]

Writes workers/monitoring/data/control_answers/<fingerprint>-<prompts hash>.json.gz. A deployment of the
default model replays these instead of generating 700+ answers at its first start; any other
model generates its own once (workers.monitoring.control). Re-run after editing control_prompts.json.
"""

from __future__ import annotations

import argparse
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from auditor.settings import Settings
from probes.concepts import load_control_prompts
from workers.monitoring.control import SHIPPED_DIR, _answers_file, generate_answers, write_answers
from workers.serving.host import ModelHost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=48)
    args = parser.parse_args()
    model = ModelHost(Settings()).model
    prompts = load_control_prompts()
    started = time.perf_counter()
    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:

        def progress(description, total):
            task = bar.add_task(description, total=total)
            return lambda n: bar.advance(task, n)

        answers = generate_answers(model, prompts, args.max_new_tokens, args.batch_size, progress)
    path = _answers_file(SHIPPED_DIR, model, prompts)
    write_answers(path, model, prompts, answers, args.max_new_tokens)
    lengths = sorted(len(a.output_ids) for a in answers)
    print(f"{len(answers)} answers in {time.perf_counter() - started:.0f}s -> {path}")
    print(
        f"lengths: min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
        f"at the limit {sum(n == args.max_new_tokens for n in lengths)}"
    )


if __name__ == "__main__":
    main()
