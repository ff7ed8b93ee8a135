"""The model plus its concept bank, loaded lazily once per process, and the operations the CLI
(and later the workers) run on them: probe text, generate monitored, steer, evaluate."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from auditor.errors import InvalidInputError
from auditor.settings import Settings
from auditor.telemetry import metrics
from probes.calibration import percentiles, z_scores
from probes.concepts import ConceptDefinition, builtin_concepts, load_concept
from probes.steering import Steering, start_position, steering_delta
from workers.monitoring.concepts import (
    ConceptBank,
    ConceptVectors,
    build_bank,
    calibrate_bank,
    calibration_texts,
    get_concept_vectors,
    per_text_scores,
)
from workers.monitoring.scores import RequestScores, score_generation
from workers.runtime.activations import Progress
from workers.runtime.generate import Generation, SamplingConfig, encode_prompt, generate
from workers.runtime.model import LoadedModel, load_model

# Starts a progress task (description, total items) and returns its advance callback.
TaskProgress = Callable[[str, int], Progress]


def _silent(description: str, total: int) -> Progress | None:
    return None


class _LazyTask:
    """Starts its progress task on the first advance, so cache hits show no empty bar."""

    def __init__(self, start: TaskProgress, description: str, total: int):
        self._start, self._description, self._total = start, description, total
        self._advance: Progress | None = None
        self._started = False

    def __call__(self, n: int) -> None:
        if not self._started:
            self._advance, self._started = self._start(self._description, self._total), True
        if self._advance is not None:
            self._advance(n)


@dataclass(frozen=True)
class SteerRequest:
    concept: str
    alpha: float
    layer: int | None = None  # None = the concept's auto layer
    scope: str = "generated"
    relative: bool = False  # alpha in units of the layer's typical residual norm


@dataclass
class MonitoredGeneration:
    generation: Generation
    text: str
    scores: RequestScores


class ModelHost:
    def __init__(self, settings: Settings, progress: TaskProgress = _silent):
        self.settings = settings
        self.progress = progress
        self._vectors: dict[str, ConceptVectors] = {}
        self._bank: ConceptBank | None = None

    @cached_property
    def model(self) -> LoadedModel:
        # Oversubscribed threads are a 10-100x trap when several model processes share cores.
        torch.set_num_threads(self.settings.resolved_threads())
        started = time.perf_counter()
        model = load_model(
            self.settings.model, self.settings.device, self.settings.dtype, self.settings.model_cache_dir
        )
        metrics.set_model_loaded(model.fingerprint.model_id, time.perf_counter() - started)
        return model

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory already (asking never loads it)."""
        return "model" in self.__dict__

    @property
    def layers(self) -> list[int]:
        layers = self.settings.layer_list(self.model.n_layers)
        bad = [layer for layer in layers if not 0 <= layer < self.model.n_layers]
        if bad:
            raise InvalidInputError(f"monitor_layers {bad} out of range 0..{self.model.n_layers - 1}")
        return layers

    def vectors(
        self, concept: str | ConceptDefinition, method: str | None = None, pooling: str | None = None
    ) -> ConceptVectors:
        method = method or self.settings.extraction_method
        pooling = pooling or self.settings.pooling
        definition = load_concept(concept) if isinstance(concept, str) else concept
        key = f"{definition.name}:{definition.pairs_hash}:{method}:{pooling}"
        if key not in self._vectors:
            self._vectors[key] = get_concept_vectors(
                self.model,
                definition,
                method,
                pooling,
                self.settings.data_dir,
                self.settings.batch_size,
                _LazyTask(self.progress, f"extract {definition.name}", 2 * definition.n_pairs),
            )
        return self._vectors[key]

    def bank(self, concepts: Sequence[str] | None = None) -> ConceptBank:
        """The built-in concepts (or the named ones) at the monitored layers, calibrated."""
        names = list(concepts) if concepts else builtin_concepts()
        if self._bank is not None and self._bank.names == names:
            return self._bank
        definitions = [load_concept(name) for name in names]
        bank = build_bank([self.vectors(d) for d in definitions], self.layers)
        texts = calibration_texts(definitions)
        self._bank = calibrate_bank(
            self.model, bank, texts, self.settings.batch_size, _LazyTask(self.progress, "calibrate", len(texts))
        )
        return self._bank

    def probe(self, texts: Sequence[str], bank: ConceptBank | None = None) -> dict[str, torch.Tensor]:
        """Raw, z and percentile scores [n_texts, n_layers, n_concepts] for each text."""
        bank = bank or self.bank()
        raw = per_text_scores(self.model, texts, bank.directions, bank.layers, self.settings.batch_size)
        return {"raw": raw, "z": z_scores(bank.calibration, raw), "percentile": percentiles(bank.calibration, raw)}

    def steering(self, request: SteerRequest, bank: ConceptBank, prompt_length: int) -> Steering:
        vectors = bank.vectors.get(request.concept) or self.vectors(request.concept)
        layer = vectors.auto_layer if request.layer is None else request.layer
        direction = vectors.direction(layer)
        reference = None
        if request.relative:
            if layer not in bank.typical_norms:
                raise InvalidInputError(f"no typical residual norm measured at layer {layer}")
            reference = bank.typical_norms[layer]
        delta = steering_delta(direction, request.alpha, reference)
        return Steering(layer, delta, start_position(request.scope, prompt_length))

    def generate(
        self,
        prompt: str | list[dict],
        sampling: SamplingConfig | None = None,
        steer: Sequence[SteerRequest] = (),
        bank: ConceptBank | None = None,
        chat: bool | None = None,
    ) -> MonitoredGeneration:
        """`chat=False` reads a plain prompt as raw text (the /v1/completions contract);
        None applies the chat template when the model has one."""
        bank = bank or self.bank()
        sampling = sampling or SamplingConfig(max_new_tokens=self.settings.max_new_tokens)
        prompt_ids = encode_prompt(self.model, prompt, chat)
        steering = [self.steering(s, bank, len(prompt_ids)) for s in steer]
        generation = generate(self.model, prompt_ids, sampling, bank.layers, steering)
        text = generation.answer_text(self.model.tokenizer)
        return MonitoredGeneration(generation, text, score_generation(bank, generation))
