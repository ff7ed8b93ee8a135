"""What a worker does for one request, as plain functions (the Celery task is a thin shell).

One `Runtime` per process, built lazily on first use: the model, a database session factory,
and the calibrated bank of registered concepts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from auditor import store
from auditor.db import database_url, make_engine, session_factory
from auditor.settings import Settings
from probes.errors import InvalidInputError
from workers.concepts import ConceptBank, calibrate_bank, calibration_texts
from workers.engine import Engine
from workers.monitor import RequestScores
from probes.concepts import builtin_concepts, load_concept
from workers.registry import active_concept_ids, bank_from_registry, register_builtin_concepts
from workers.runtime.generate import SamplingConfig


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.engine = Engine(settings)
        self.sessions = session_factory(make_engine(database_url(settings)))
        # The model and its hooks serve one request at a time per process.
        self.lock = threading.Lock()
        self._bank: ConceptBank | None = None
        self._builtins_registered = False

    def bank(self) -> ConceptBank:
        """The calibrated bank of active concepts. Rebuilt when the registry's set of active
        versions changes (a registration, activation or retirement since the last request), so
        a vector registered through the admin API is monitored from the next request on."""
        with self.sessions() as session:
            if not self._builtins_registered:
                register_builtin_concepts(session, self.engine)
                session.commit()
                self._builtins_registered = True
            active = active_concept_ids(session, self.engine)
            if self._bank is None or self._bank.concept_ids != active:
                bank = bank_from_registry(session, self.engine)
                texts = calibration_texts([load_concept(n) for n in builtin_concepts()])
                self._bank = calibrate_bank(self.engine.model, bank, texts, self.settings.batch_size)
        return self._bank


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime(settings: Settings | None = None) -> Runtime:
    """The process's runtime. Built on first call, i.e. inside a task in the worker child,
    never in a prefork parent."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            from auditor.settings import get_settings

            _runtime = Runtime(settings or get_settings())
        return _runtime


def score_rows(bank: ConceptBank, scores: RequestScores) -> list[dict[str, Any]]:
    """One row per (concept version, layer) that holds a vector."""
    rows = []
    for li, layer in enumerate(bank.layers):
        for k, concept_id in enumerate(bank.concept_ids):
            if bank.mask is not None and not bool(bank.mask[li, k]):
                continue
            rows.append({
                "concept_id": concept_id, "layer": layer,
                "mean": float(scores.aggregates.mean[li, k]), "max": float(scores.aggregates.max[li, k]),
                "last": float(scores.aggregates.last[li, k]),
                "calibrated_z": float(scores.z_mean[li, k]) if scores.z_mean is not None else None,
                "percentile": float(scores.percentile_mean[li, k]) if scores.percentile_mean is not None else None,
                "n_tokens": scores.aggregates.n_tokens,
            })  # fmt: skip
    return rows


def headline(bank: ConceptBank, scores: RequestScores) -> dict[str, dict[str, float]]:
    """Per concept, the scores at its primary layer: what the API returns inline."""
    out = {}
    for name in bank.names:
        layer = bank.auto_layers[name]
        if layer in bank.layers:
            row = scores.at(name, layer)
            out[name] = {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items() if k != "concept"}
    return out


def serve_generation(request_id: str, payload: dict[str, Any], runtime: Runtime | None = None) -> dict[str, Any]:
    """Generate a monitored completion for a queued request, write its scores in one batch and
    mark it done. Re-delivery after a crash rewrites the same request's scores (idempotent)."""
    runtime = runtime or get_runtime()
    with runtime.sessions() as session:
        request = store.get_request(session, request_id=request_id)
        if request is None:
            raise InvalidInputError(f"no request {request_id!r}")
        if request.status == "done":
            return {"request_id": request_id, "status": "done", "text": request.completion_text,
                    "finish_reason": request.finish_reason, "prompt_tokens": request.prompt_tokens,
                    "completion_tokens": request.completion_tokens, "scores": {}}
        queued_at = request.created_at
        store.mark_request(session, request_id=request_id, status="running")
        session.commit()
    try:
        sampling = SamplingConfig(**payload.get("sampling", {}))
        prompt = payload["messages"] if "messages" in payload else payload["prompt"]
        with runtime.lock:
            bank = runtime.bank()
            started = time.time()
            result = runtime.engine.generate(prompt, sampling, bank=bank, chat="messages" in payload)
    except Exception as exc:
        with runtime.sessions() as session:
            store.mark_request(session, request_id=request_id, status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
            session.commit()
        raise
    generation = result.generation
    finish = "stop" if generation.finish_reason == "stop" else "length"
    with runtime.sessions() as session:
        store.delete_scores(session, request_id=request_id)
        # COPY on Postgres (53k rows/s vs 34k for batched INSERT, bench/ingest.py); INSERT on SQLite.
        store.insert_scores_copy(session, request_id=request_id, rows=score_rows(bank, result.scores))
        store.mark_request(
            session, request_id=request_id, status="done", completion_text=result.text, finish_reason=finish,
            model_id=runtime.engine.model.fingerprint.model_id, model_fingerprint=runtime.engine.model.fingerprint.hash,
            queue_seconds=max(0.0, started - queued_at.timestamp()), prefill_seconds=generation.prefill_seconds,
            decode_seconds=generation.decode_seconds, prompt_tokens=len(generation.prompt_ids),
            completion_tokens=len(generation.output_ids),
        )
        session.commit()
    return {"request_id": request_id, "status": "done", "text": result.text, "finish_reason": finish,
            "prompt_tokens": len(generation.prompt_ids), "completion_tokens": len(generation.output_ids),
            "scores": headline(bank, result.scores)}


def replay_scores(runtime: Runtime, bank: ConceptBank, items: list[dict[str, Any]]) -> list[tuple[RequestScores, int, int]]:
    """Teacher-forced replay of (prompt, completion) pairs in one padded forward pass.

    Each sequence is prompt + completion tokens; the scored span is the positions that chose the
    completion's tokens (the last prompt position onward), exactly the span monitored generation
    scores. Returns (scores, prompt_tokens, completion_tokens) per item.
    """
    import torch

    from workers.monitor import score_resid
    from workers.runtime.generate import encode_prompt
    from workers.runtime.hooks import ResidualCapture, hooked

    model = runtime.engine.model
    sequences = []
    for item in items:
        prompt = item["messages"] if item.get("messages") else item["prompt"]
        prompt_ids = encode_prompt(model, prompt, chat=bool(item.get("messages")))
        completion_ids = model.tokenizer(item["completion"], add_special_tokens=False)["input_ids"]
        if not completion_ids:
            raise InvalidInputError("a completion to audit is empty")
        if len(prompt_ids) + len(completion_ids) > model.max_context:
            raise InvalidInputError(f"prompt + completion exceed the model's context of {model.max_context} tokens")
        sequences.append((prompt_ids, completion_ids))
    width = max(len(p) + len(c) for p, c in sequences)
    batch = torch.full((len(sequences), width), model.tokenizer.pad_token_id, dtype=torch.long)
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
        results.append((score_resid(bank, resid[:, row, :span_end], start=len(p) - 1), len(p), len(c)))
    return results


def serve_audits(request_ids: list[str], items: list[dict[str, Any]], runtime: Runtime | None = None) -> dict[str, Any]:
    """Score completions served elsewhere, all queued items of one submission in one batch."""
    runtime = runtime or get_runtime()
    try:
        with runtime.lock:
            bank = runtime.bank()
            results = replay_scores(runtime, bank, items)
    except Exception as exc:
        with runtime.sessions() as session:
            for request_id in request_ids:
                store.mark_request(session, request_id=request_id, status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
            session.commit()
        raise
    fingerprint = runtime.engine.model.fingerprint
    with runtime.sessions() as session:
        for request_id, item, (scores, n_prompt, n_completion) in zip(request_ids, items, results):
            store.mark_request(session, request_id=request_id, status="running")
            store.delete_scores(session, request_id=request_id)
            store.insert_scores_copy(session, request_id=request_id, rows=score_rows(bank, scores))
            store.mark_request(session, request_id=request_id, status="done", completion_text=item["completion"],
                               model_id=fingerprint.model_id, model_fingerprint=fingerprint.hash,
                               prompt_tokens=n_prompt, completion_tokens=n_completion)
        session.commit()
    return {"request_ids": request_ids, "status": "done"}
