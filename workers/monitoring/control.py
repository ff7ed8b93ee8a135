"""Ordinary answers the monitor is read against, measured on the loaded model.

- **Control answers**: greedy answers to the shipped control prompts. For the default model they
  ship with Auditor (`workers/monitoring/data/control_answers/`, made by `scripts/make_control_answers.py`),
  so a fresh deployment replays them instead of generating them; for any other model they are
  generated once and cached on disk (`AUDITOR_CONTROL_CACHE_DIR`).
- **Traces**: per answer, the per-token cosine of every concept at its primary layer, once as
  generated (a teacher-forced replay of prompt + answer, the same numbers generation captures)
  and once as re-read alone (the answer's own tokens after the sink token, no prompt): the two
  signals divergence compares. Cached per concept direction, so adding a concept reads only it.
- **The null**: probes.answer_null fitted on those traces.

Both reads stop at the deepest primary layer: nothing above it, nor the logits, is needed.

Size: answers, traces and the null share one cache layout and one key scheme; kept together so
the cache is described in one place.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from probes.answer_null import LengthNull, fit_length_null
from probes.scoring import cosine_scores
from workers.monitoring.concepts import ConceptBank
from workers.runtime.activations import sink_token_id
from workers.runtime.batch_generate import BatchGenerator, SequenceRequest
from workers.runtime.generate import SamplingConfig, encode_prompt
from workers.runtime.hooks import ResidualCapture, hooked
from workers.runtime.model import LoadedModel

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "data" / "control_answers"
# Starts a progress task (description, total) and returns its advance(n) callback.
StepProgress = Callable[[str, int], Callable[[int], None]]


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass(frozen=True)
class ControlAnswer:
    prompt_ids: list[int]
    output_ids: list[int]  # as generated, EOS included when the answer ended on it


@dataclass
class AnswerTraces:
    """Per-token cosines of K concepts at their primary layers, for N answers."""

    residual: torch.Tensor  # [N, T, K], generation span (the positions that chose each token)
    text: torch.Tensor  # [N, T, K], the answer's text re-read alone
    lengths: torch.Tensor  # [N] tokens scored in the generation span
    text_lengths: torch.Tensor  # [N] tokens of text (no EOS)

    def fit(
        self, target_fpr: float, confidence: float, min_tokens: int, groups: Sequence[str] | None = None
    ) -> LengthNull:
        return fit_length_null(
            self.residual,
            self.lengths,
            target_fpr,
            text_traces=self.text,
            confidence=confidence,
            min_tokens=min_tokens,
            text_lengths=self.text_lengths,
            groups=groups,
        )


def prompts_hash(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def answers_hash(answers: Sequence[ControlAnswer]) -> str:
    payload = json.dumps([[a.prompt_ids, a.output_ids] for a in answers]).encode()
    return hashlib.sha256(payload).hexdigest()


def content_ids(model: LoadedModel, output_ids: Sequence[int]) -> list[int]:
    """The tokens of an answer that are text: special tokens (the closing EOS) dropped, exactly
    what `decode(..., skip_special_tokens=True)` shows."""
    special = set(model.tokenizer.all_special_ids)
    return [t for t in output_ids if t not in special]


# ---- control answers: shipped, cached, or generated ----


def _answers_file(directory: Path, model: LoadedModel, prompts: Sequence[str]) -> Path:
    return directory / f"{model.fingerprint.hash[:16]}-{prompts_hash(prompts)[:16]}.json.gz"


def _read_answers(path: Path, max_new_tokens: int) -> list[ControlAnswer] | None:
    """Answers from a file made with at least `max_new_tokens`, cut to that many: a greedy
    answer's first n tokens are the answer the same prompt gets with max_tokens = n."""
    if not path.exists():
        return None
    data = json.loads(gzip.decompress(path.read_bytes()))
    if data["max_new_tokens"] < max_new_tokens:
        return None
    return [ControlAnswer(a["prompt_ids"], a["output_ids"][:max_new_tokens]) for a in data["answers"]]


def write_answers(
    path: Path, model: LoadedModel, prompts: Sequence[str], answers: Sequence[ControlAnswer], max_new_tokens: int
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "model_fingerprint": model.fingerprint.hash,
        "model_id": model.fingerprint.model_id,
        "prompts_hash": prompts_hash(prompts),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "answers": [{"prompt_ids": a.prompt_ids, "output_ids": a.output_ids} for a in answers],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(json.dumps(data).encode(), mtime=0))
    tmp.replace(path)


def generate_answers(
    model: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 32,
    progress: StepProgress = _no_progress,
) -> list[ControlAnswer]:
    """Greedy answers, generated in continuous batches with nothing captured."""
    advance = progress("answering control prompts", len(prompts))
    batch = BatchGenerator(model, ())
    requests = [
        (i, SequenceRequest(encode_prompt(model, p), SamplingConfig(max_new_tokens=max_new_tokens)))
        for i, p in enumerate(prompts)
    ]
    pending, done = list(requests), {}
    while pending or len(batch):
        room = batch_size - len(batch)
        finished = batch.add(pending[:room]) if room > 0 and pending else []
        pending = pending[max(room, 0) :]
        finished += batch.step() if len(batch) else []
        done.update(finished)
        advance(len(finished))
    return [ControlAnswer(list(request.prompt_ids), list(done[i].output_ids)) for i, request in requests]


def control_answers(
    model: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int,
    cache_dir: Path | None,
    batch_size: int = 32,
    progress: StepProgress = _no_progress,
) -> list[ControlAnswer]:
    """The control prompts' greedy answers for the loaded model: shipped, cached or generated
    (and then cached)."""
    for directory in (SHIPPED_DIR, cache_dir):
        if directory is None:
            continue
        answers = _read_answers(_answers_file(directory, model, prompts), max_new_tokens)
        if answers is not None:
            return answers
    log.info(
        "generating answers to %d control prompts (%d tokens each at most); cached afterwards",
        len(prompts),
        max_new_tokens,
    )
    answers = generate_answers(model, prompts, max_new_tokens, batch_size, progress)
    if cache_dir is not None:
        write_answers(_answers_file(cache_dir, model, prompts), model, prompts, answers, max_new_tokens)
    return answers


# ---- per-token traces at the concepts' primary layers ----


def primary_rows(bank: ConceptBank, concepts: Sequence[int]) -> tuple[list[int], torch.Tensor, list[int]]:
    """-> captured layers, directions [n_captured, n_concepts, d_model], and for each concept
    the index of its primary layer among the captured ones."""
    primary = [bank.auto_layers[bank.names[k]] for k in concepts]
    layers = sorted(set(primary))
    rows = [bank.layers.index(layer) for layer in layers]
    directions = bank.directions[rows][:, list(concepts)]
    return layers, directions, [layers.index(layer) for layer in primary]


@torch.inference_mode()
def read_spans(
    model: LoadedModel,
    bank: ConceptBank,
    sequences: Sequence[tuple[list[int], int, int]],
    concepts: Sequence[int] | None = None,
    batch_size: int = 16,
    advance: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """For each (token ids, start, n): the cosine of each concept at its primary layer at the n
    positions from `start`, [n, n_concepts]. Right-padded batches of similar length; the pass
    stops at the deepest primary layer."""
    concepts = list(range(len(bank.names))) if concepts is None else list(concepts)
    layers, directions, which = primary_rows(bank, concepts)
    out: list[torch.Tensor | None] = [None] * len(sequences)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        width = max(len(sequences[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(sequences[i][0])] = torch.tensor(sequences[i][0])
        capture = ResidualCapture(layers)
        with hooked(model, capture=capture, stop_after=max(layers)):
            # Causal attention: real positions never see the right padding.
            model.bridge.forward(ids.to(model.device), return_type=None)
        resid = capture.stacked().float()  # [n_captured, batch, width, d_model]
        n_layers, batch, _, d_model = resid.shape
        scores = cosine_scores(resid.reshape(n_layers, batch * width, d_model), directions.to(resid.device))
        scores = scores.reshape(n_layers, batch, width, -1)  # [n_captured, batch, width, n_concepts]
        picked = scores[which, :, :, torch.arange(len(concepts))]  # [n_concepts, batch, width]
        for row, i in enumerate(chunk):
            _, start, n = sequences[i]
            out[i] = picked[:, row, start : start + n].T.cpu().double()
        if advance is not None:
            advance(len(chunk))
    return out  # type: ignore[return-value]


def residual_spans(model: LoadedModel, answers: Sequence[ControlAnswer]) -> list[tuple[list[int], int, int]]:
    """Teacher-forced replay: prompt + answer (its last token is never read), scored from the
    last prompt position: exactly the span monitored generation scores."""
    return [(a.prompt_ids + a.output_ids[:-1], len(a.prompt_ids) - 1, len(a.output_ids)) for a in answers]


def text_spans(model: LoadedModel, token_lists: Sequence[Sequence[int]]) -> list[tuple[list[int], int, int]]:
    """Each answer's text alone after the sink token (as standalone text is read)."""
    sink = sink_token_id(model)
    return [([sink, *tokens], 1, len(tokens)) for tokens in token_lists]


def text_means(
    model: LoadedModel, bank: ConceptBank, token_lists: Sequence[Sequence[int]], batch_size: int = 16
) -> torch.Tensor:
    """[n_answers, n_concepts]: the mean cosine of each answer's text re-read alone (answers
    must have at least one text token)."""
    traces = read_spans(model, bank, text_spans(model, token_lists), batch_size=batch_size)
    return torch.stack([trace.mean(dim=0) for trace in traces])


def _stack(traces: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.full((len(traces), width), torch.nan, dtype=torch.float64)
    for i, trace in enumerate(traces):
        out[i, : trace.shape[0]] = trace[:width]
    return out


def _concept_key(model: LoadedModel, bank: ConceptBank, k: int) -> str:
    layer = bank.auto_layers[bank.names[k]]
    direction = bank.directions[bank.layers.index(layer), k].float().contiguous().numpy().tobytes()
    return hashlib.sha256(model.fingerprint.hash.encode() + str(layer).encode() + direction).hexdigest()


def answer_traces(
    model: LoadedModel,
    bank: ConceptBank,
    answers: Sequence[ControlAnswer],
    cache_dir: Path | None = None,
    batch_size: int = 16,
    progress: StepProgress = _no_progress,
) -> AnswerTraces:
    """Both traces of every answer for every concept in `bank`; concepts already traced on the
    same answers (same direction, same layer) come from the disk cache."""
    width = max(len(a.output_ids) for a in answers)
    lengths = torch.tensor([len(a.output_ids) for a in answers])
    texts = [content_ids(model, a.output_ids) for a in answers]
    text_lengths = torch.tensor([len(t) for t in texts])
    key = answers_hash(answers)[:16]
    columns: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    paths = (
        {
            k: cache_dir / "traces" / f"{key}-{_concept_key(model, bank, k)[:24]}.safetensors"
            for k in range(len(bank.names))
        }
        if cache_dir is not None
        else {}
    )
    for k, path in paths.items():
        if path.exists():
            stored = load_file(str(path))
            columns[k] = (stored["residual"].double(), stored["text"].double())
    missing = [k for k in range(len(bank.names)) if k not in columns]
    if missing:
        residual = read_spans(
            model,
            bank,
            residual_spans(model, answers),
            missing,
            batch_size,
            progress("replaying control answers", len(answers)),
        )
        text = read_spans(
            model,
            bank,
            text_spans(model, [t or [sink_token_id(model)] for t in texts]),
            missing,
            batch_size,
            progress("re-reading control answers", len(answers)),
        )
        for j, k in enumerate(missing):
            columns[k] = (_stack([r[:, j] for r in residual], width), _stack([t[:, j] for t in text], width))
            if k in paths:
                paths[k].parent.mkdir(parents=True, exist_ok=True)
                save_file({"residual": columns[k][0], "text": columns[k][1]}, str(paths[k]))
    residual = torch.stack([columns[k][0] for k in range(len(bank.names))], dim=-1)
    text = torch.stack([columns[k][1] for k in range(len(bank.names))], dim=-1)
    return AnswerTraces(residual, text, lengths, text_lengths)


def bank_key(model: LoadedModel, bank: ConceptBank) -> str:
    """Identifies a null: the model, and each concept's direction at its primary layer, in order."""
    digest = hashlib.sha256(model.fingerprint.hash.encode())
    for k in range(len(bank.names)):
        digest.update(_concept_key(model, bank, k).encode())
    return digest.hexdigest()
