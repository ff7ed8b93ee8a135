"""Teacher-forced replay of (prompt, completion) pairs served elsewhere: the audit path. The
scored span is exactly the one monitored generation scores, so an audited answer reads the same
numbers its generation would have."""

from __future__ import annotations

from typing import Any

import torch

from auditor.errors import InvalidInputError
from workers.monitoring.concepts import ConceptBank
from workers.monitoring.scores import RequestScores, score_resid
from workers.runtime.generate import encode_prompt
from workers.runtime.hooks import ResidualCapture, hooked


def encode_replay(model, item: dict[str, Any]) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one (prompt, completion) pair to replay; raises for this
    item alone."""
    prompt = item["messages"] if item.get("messages") else item["prompt"]
    prompt_ids = encode_prompt(model, prompt, chat=bool(item.get("messages")))
    completion_ids = model.tokenizer(item["completion"], add_special_tokens=False)["input_ids"]
    if not completion_ids:
        raise InvalidInputError("a completion to audit is empty")
    if len(prompt_ids) + len(completion_ids) > model.max_context:
        raise InvalidInputError(f"prompt + completion exceed the model's context of {model.max_context} tokens")
    return prompt_ids, completion_ids


def replay_scores(model, bank: ConceptBank, sequences: list[tuple[list[int], list[int]]]) -> list[RequestScores]:
    """Teacher-forced replay of encoded (prompt, completion) pairs in one padded forward pass.

    Each sequence is prompt + completion tokens; the scored span is the positions that chose the
    completion's tokens (the last prompt position onward), exactly the span monitored generation
    scores.
    """
    width = max(len(p) + len(c) for p, c in sequences)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    batch = torch.full((len(sequences), width), pad, dtype=torch.long)
    for row, (p, c) in enumerate(sequences):
        batch[row, : len(p) + len(c)] = torch.tensor(p + c)
    capture = ResidualCapture(bank.layers)
    with torch.inference_mode(), hooked(model, capture=capture):
        # Right padding: causal attention keeps every real position independent of the pads.
        model.bridge.forward(batch.to(model.device), return_type=None)
    resid = capture.stacked()  # [n_layers, batch, width, d_model]
    results = []
    for row, (p, c) in enumerate(sequences):
        span_end = len(p) + len(c) - 1  # the last completion token is never read
        results.append(score_resid(bank, resid[:, row, :span_end], start=len(p) - 1))
    return results
