"""Residual streams of many texts, read in padded batches (one forward pass per batch).

Texts are read without a chat template, with a fixed first token prepended (the tokenizer's
BOS, else its EOS) so that the attention sink lands on a token that carries no content and
every real word can be pooled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from auditor.errors import InvalidInputError
from workers.runtime.hooks import ResidualCapture, hooked
from workers.runtime.model import LoadedModel

SINK_POSITIONS = 1  # positions at the start of every sequence that pooling skips
Progress = Callable[[int], None]  # called with the number of texts just finished


def sink_token_id(model: LoadedModel) -> int:
    tokenizer = model.tokenizer
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise InvalidInputError("the tokenizer has neither a BOS nor an EOS token to use as sink")
    return int(token)


def tokenize_texts(model: LoadedModel, texts: Sequence[str]) -> list[list[int]]:
    if len(texts) == 0:
        raise InvalidInputError("no texts given")
    sink = sink_token_id(model)
    encoded = []
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"text #{index} is empty")
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + SINK_POSITIONS > model.max_context:
            raise InvalidInputError(
                f"text #{index} is {len(ids)} tokens long; the model's context is {model.max_context}"
            )
        encoded.append([sink, *ids])
    return encoded


@dataclass
class Batch:
    indices: list[int]  # positions of these texts in the caller's list
    input_ids: torch.Tensor  # [batch, pos], right-padded
    mask: torch.Tensor  # [batch, pos], 1 = real token


def length_sorted_batches(encoded: list[list[int]], batch_size: int, pad_id: int, device: torch.device) -> list[Batch]:
    """Group texts of similar length so that padding stays small."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in indices)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        batches.append(Batch(indices, ids.to(device), mask.to(device)))
    return batches


@torch.inference_mode()
def run_batches(
    model: LoadedModel,
    texts: Sequence[str],
    layers: Sequence[int],
    reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Apply `reduce(resid [n_layers, batch, pos, d_model], mask [batch, pos]) -> [n_layers, batch, ...]`
    to every batch and return the results in the caller's text order: [n_layers, n_texts, ...]."""
    encoded = tokenize_texts(model, texts)
    pad_id = model.tokenizer.pad_token_id
    results: list[torch.Tensor | None] = [None] * len(texts)
    for batch in length_sorted_batches(encoded, batch_size, pad_id, model.device):
        capture = ResidualCapture(layers)
        # No logits are read: the pass ends at the deepest captured layer.
        with hooked(model, capture=capture, stop_after=max(layers)):
            # Right padding needs no attention mask in a causal model: real tokens never
            # attend to the pads after them, and padded positions are dropped by `reduce`.
            model.bridge.forward(batch.input_ids, return_type=None)
        reduced = reduce(capture.stacked().float(), batch.mask)  # [n_layers, batch, ...]
        for row, index in enumerate(batch.indices):
            results[index] = reduced[:, row]
        if progress is not None:
            progress(len(batch.indices))
    return torch.stack(results, dim=1)
