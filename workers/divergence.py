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
    """[n_texts, n_concepts]: each completion re-read alone.

    Only the concepts' primary layers are read, so the re-read (on the serving path, once per
    finished batch) stops at the deepest of them instead of running the whole model."""
    layers = sorted({bank.auto_layers[name] for name in bank.names})
    rows = [bank.layers.index(layer) for layer in layers]
    raw = per_text_scores(model, texts, bank.directions[rows], layers, batch_size)  # [N, n_primary_layers, K]
    z = z_scores(bank.calibration.rows(rows), raw)
    return z[:, [layers.index(bank.auto_layers[name]) for name in bank.names], torch.arange(len(bank.names))]


# Greedy answers to the control prompts depend on the model, the prompts and the length only, not
# on the concepts. Kept per process, so refitting after the active concepts change (a vector
# registered, retired, recalibrated) replays them in one teacher-forced pass per batch instead of
# generating every answer again: seconds, not a minute, before the next request is served.
_CONTROL_ANSWERS: dict[tuple[str, tuple[str, ...], int], list[tuple[list[int], list[int], str]]] = {}


def control_signals(model: LoadedModel, bank: ConceptBank, prompts: Sequence[str], max_new_tokens: int,
                    batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy answers to ordinary prompts, generated in batches -> (residual, text) signals,
    each [n_answers, n_concepts]. Empty answers are dropped (they have no text to re-read).
    (Model thread only.)"""
    key = (model.fingerprint.hash, tuple(prompts), max_new_tokens)
    answers = _CONTROL_ANSWERS.get(key)
    if answers is None:
        answers, residual = _generate_answers(model, bank, prompts, max_new_tokens, batch_size)
        _CONTROL_ANSWERS[key] = answers
    else:
        residual = _replayed_residual(model, bank, answers, batch_size)
    return residual, text_signals(model, bank, [text for _, _, text in answers], batch_size)


def _generate_answers(model: LoadedModel, bank: ConceptBank, prompts: Sequence[str], max_new_tokens: int,
                      batch_size: int) -> tuple[list[tuple[list[int], list[int], str]], torch.Tensor]:
    batch = BatchGenerator(model, bank.layers)
    pending = [(i, SequenceRequest(encode_prompt(model, p), SamplingConfig(max_new_tokens=max_new_tokens)))
               for i, p in enumerate(prompts)]
    requests = dict(pending)
    done = {}
    while pending or len(batch):
        room = batch_size - len(batch)
        done.update(batch.add(pending[:room]))
        pending = pending[room:]
        done.update(batch.step())
    answers, residual = [], []
    for i in range(len(prompts)):
        text = model.tokenizer.decode(done[i].output_ids, skip_special_tokens=True)
        if text.strip():
            answers.append((list(requests[i].prompt_ids), list(done[i].output_ids), text))
            residual.append(residual_signal(bank, score_generation(bank, done[i])))
    return answers, torch.stack(residual)


def _replayed_residual(model: LoadedModel, bank: ConceptBank, answers: Sequence[tuple[list[int], list[int], str]],
                       batch_size: int) -> torch.Tensor:
    from workers.service import replay_scores  # the audit path's replay; imported late (cycle)

    residual = []
    for start in range(0, len(answers), batch_size):
        chunk = [(prompt_ids, output_ids) for prompt_ids, output_ids, _ in answers[start:start + batch_size]]
        residual += [residual_signal(bank, scores) for scores in replay_scores(model, bank, chunk)]
    return torch.stack(residual)
