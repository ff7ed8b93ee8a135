"""The two signals divergence flags compare (probes/divergence.py), measured on the model.

Both are calibrated z-scores at each concept's primary layer, against the same neutral
calibration: the residual signal from the monitored generation, the text signal from the
completion re-read alone in a fresh context (no prompt, no steering), exactly as calibration
texts are read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from probes.calibration import z_scores
from workers.concepts import ConceptBank, per_text_scores
from workers.monitor import RequestScores, score_generation
from workers.runtime.batch_generate import BatchGenerator, SequenceRequest
from workers.runtime.generate import SamplingConfig, encode_prompt
from workers.runtime.model import LoadedModel


def primary(bank: ConceptBank, per_layer: torch.Tensor) -> torch.Tensor:
    """[..., n_layers, n_concepts] -> [..., n_concepts]: each concept at its primary layer."""
    index = torch.tensor([bank.layers.index(bank.auto_layers[name]) for name in bank.names])
    return per_layer[..., index, torch.arange(len(bank.names))]


def residual_signal(bank: ConceptBank, scores: RequestScores) -> torch.Tensor:
    return primary(bank, scores.z_mean)


def text_signals(model: LoadedModel, bank: ConceptBank, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """[n_texts, n_concepts]: each completion re-read alone."""
    raw = per_text_scores(model, texts, bank.directions, bank.layers, batch_size)  # [N, L, K]
    return primary(bank, z_scores(bank.calibration, raw))


def control_signals(model: LoadedModel, bank: ConceptBank, prompts: Sequence[str], max_new_tokens: int,
                    batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy answers to ordinary prompts, generated in batches -> (residual, text) signals,
    each [n_answers, n_concepts]. Empty answers are dropped (they have no text to re-read)."""
    batch = BatchGenerator(model, bank.layers)
    pending = [(i, SequenceRequest(encode_prompt(model, p), SamplingConfig(max_new_tokens=max_new_tokens)))
               for i, p in enumerate(prompts)]
    done = {}
    while pending or len(batch):
        room = batch_size - len(batch)
        done.update(batch.add(pending[:room]))
        pending = pending[room:]
        done.update(batch.step())
    texts, residual = [], []
    for i in range(len(prompts)):
        text = model.tokenizer.decode(done[i].output_ids, skip_special_tokens=True)
        if text.strip():
            texts.append(text)
            residual.append(residual_signal(bank, score_generation(bank, done[i])))
    return torch.stack(residual), text_signals(model, bank, texts, batch_size)
