"""Teacher-forced replay of (prompt, completion) pairs served elsewhere: the audit path. The
scored span is exactly the one monitored generation scores, so an audited answer reads the same
numbers its generation would have."""

from __future__ import annotations

from typing import Any

import torch

from auditor.errors import InvalidInputError
from probes.scoring import cosine_scores
from workers.monitoring.concepts import ConceptBank
from workers.monitoring.scores import RequestScores, score_cosines
from workers.runtime.generate import encode_prompt
from workers.runtime.hooks import hooked


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


class CosineCapture:
    """Reduces each monitored layer's residual to its cosines with the bank's directions as the
    forward pass produces it: [batch, pos, n_concepts] kept per layer instead of
    [batch, pos, d_model], ~100x less for a handful of concepts (a 16 x 8,192-token audit batch
    would otherwise hold 30 layers x 576 floats per position: tens of GB)."""

    def __init__(self, bank: ConceptBank):
        self.bank = bank
        self.layers = list(bank.layers)
        self._cosines: dict[int, torch.Tensor] = {}

    def hook_for(self, layer: int):
        directions = self.bank.directions[self.bank.layer_index(layer)][None]  # [1, n_concepts, d_model]

        def capture(resid: torch.Tensor, hook) -> None:  # resid: [batch, pos, d_model]
            self._cosines[layer] = cosine_scores(resid.detach().float(), directions.expand(resid.shape[0], -1, -1))

        return capture

    def stacked(self) -> torch.Tensor:
        """-> [n_layers, batch, pos, n_concepts]."""
        return torch.stack([self._cosines[layer] for layer in self.layers])


def replay_scores(model, bank: ConceptBank, sequences: list[tuple[list[int], list[int]]]) -> list[RequestScores]:
    """Teacher-forced replay of encoded (prompt, completion) pairs in one padded forward pass
    (keep the batch within a token budget: `replay_chunks`).

    Each sequence is prompt + completion tokens; the scored span is the positions that chose the
    completion's tokens (the last prompt position onward), exactly the span monitored generation
    scores. Residuals are reduced to cosines as they are produced, and the pass stops after the
    deepest monitored layer: nothing above it, no logits.
    """
    width = max(len(p) + len(c) for p, c in sequences)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    batch = torch.full((len(sequences), width), pad, dtype=torch.long)
    for row, (p, c) in enumerate(sequences):
        batch[row, : len(p) + len(c)] = torch.tensor(p + c)
    capture = CosineCapture(bank)
    with torch.inference_mode(), hooked(model, capture=capture, stop_after=max(bank.layers)):
        # Right padding: causal attention keeps every real position independent of the pads.
        model.bridge.forward(batch.to(model.device), return_type=None)
    cosines = capture.stacked()  # [n_layers, batch, width, n_concepts]
    results = []
    for row, (p, c) in enumerate(sequences):
        span_end = len(p) + len(c) - 1  # the last completion token is never read
        results.append(score_cosines(bank, cosines[:, row, len(p) - 1 : span_end]))
    return results


def replay_chunks(lengths: list[int], max_rows: int, max_tokens: int) -> list[list[int]]:
    """Indices of sequences (by their lengths, in order) grouped into padded passes of at most
    `max_rows` rows and `max_tokens` padded tokens (rows x the longest), and at most as many
    attention scores as one sequence of half the budget has (rows x longest², per head and
    layer: eager attention holds them all at once, 2.4 GB for one 8,192-token row; two such
    rows in one pass peaked at 12.4 GB, bench/audit_memory.py). One past a bound goes alone."""
    max_cells = (max_tokens // 2) ** 2
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index, length in enumerate(lengths):
        widest = max(longest, length)
        rows = len(current) + 1
        if current and (len(current) >= max_rows or widest * rows > max_tokens or widest**2 * rows > max_cells):
            chunks.append(current)
            current, widest = [], length
        current.append(index)
        longest = widest
    if current:
        chunks.append(current)
    return chunks
