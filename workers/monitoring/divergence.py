"""Served and audited answers read against ordinary answers of the same length.

Each answer has two signals per concept at its primary layer: the *residual* mean cosine of its
monitored generation (or teacher-forced replay), and the *text* mean cosine of its own tokens
re-read alone (no prompt, no steering), read exactly as the control answers were
(workers.monitoring.control). probes.answer_null turns both into z against answers of the same length and
applies the family-wise thresholds; probes.divergence words the flags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from probes.answer_null import LengthNull, Reading
from probes.divergence import Divergence, alerts, divergences
from workers.monitoring.concepts import ConceptBank
from workers.monitoring.control import content_ids, text_means
from workers.monitoring.scores import RequestScores
from workers.runtime.model import LoadedModel

# How an answer was read (stored on the request, returned in `auditor.monitor`).
OK, INSUFFICIENT, CALIBRATING, OFF = "ok", "insufficient_tokens", "calibrating", "off"
# A plain-text prompt (/v1/completions, an audit given `prompt`): the control answers are chat
# answers, and raw continuations read nothing like them (median z of -6 to -10 on some concepts
# was measured), so such answers get no z, flag or alert rather than false ones.
NO_REFERENCE = "no_reference"


@dataclass
class Verdict:
    """What the monitor concluded about one answer."""

    status: str
    reading: Reading | None = None
    flags: list[Divergence] = field(default_factory=list)  # hidden / surface
    alerts: list[Divergence] = field(default_factory=list)  # concept-score crossings


def primary(bank: ConceptBank, per_layer: torch.Tensor) -> torch.Tensor:
    """[..., n_layers, n_concepts] -> [..., n_concepts]: each concept at its primary layer."""
    index = torch.tensor([bank.layers.index(bank.auto_layers[name]) for name in bank.names])
    return per_layer[..., index, torch.arange(len(bank.names))]


def judge(
    model: LoadedModel,
    bank: ConceptBank,
    null: LengthNull | None,
    answers: Sequence[tuple[RequestScores, Sequence[int]]],
    enabled: bool = True,
    batch_size: int = 16,
    chat: Sequence[bool] | None = None,
) -> list[Verdict]:
    """(scores, output token ids) of answers scored against `bank` -> one verdict each. Every
    answer's text is re-read in one batched pass (to the deepest primary layer only). `chat`
    says per answer whether its prompt went through the chat template (default: all did)."""
    if not enabled:
        return [Verdict(OFF) for _ in answers]
    if null is None:
        return [Verdict(CALIBRATING) for _ in answers]
    chat = [True] * len(answers) if chat is None else list(chat)
    if not all(chat):
        judged = iter(judge(model, bank, null, [a for a, c in zip(answers, chat) if c], enabled, batch_size))
        return [next(judged) if c else Verdict(NO_REFERENCE) for c in chat]
    texts = [content_ids(model, output_ids) for _, output_ids in answers]
    readable = [i for i, tokens in enumerate(texts) if tokens]
    text = dict(zip(readable, text_means(model, bank, [texts[i] for i in readable], batch_size))) if readable else {}
    verdicts = []
    for i, (scores, _) in enumerate(answers):
        reading = null.read(primary(bank, scores.aggregates.mean), scores.aggregates.n_tokens, text.get(i))
        if reading.status != OK:
            verdicts.append(Verdict(reading.status, reading))
            continue
        verdicts.append(Verdict(OK, reading, divergences(reading, bank.names), alerts(reading, bank.names)))
    return verdicts
