"""Continuous batching: many generations share one KV-cached forward pass per decode step.

Rows join between steps and leave as soon as they finish:

- *join*: new requests are prefilled together as a left-padded batch, then merged into the
  running batch by left-padding whichever KV cache is shorter (zeros under a 0 attention mask);
- *step*: every row samples its next token with its own sampling settings and seed; rows that hit
  EOS or their token limit leave before the next forward (their last token is never fed back,
  exactly as in `generate`), and columns that have become padding for every remaining row are
  trimmed off the left of the cache.

Each row keeps its own coordinates: its column `c` in the batch is its position `c - pad`.
Positions for the model come from the attention mask (TransformerBridge derives `position_ids`
from it), so a row's logits and residuals are those it would get alone, up to float rounding;
`tests/workers/test_batching.py` checks tokens are identical and scores agree within 1e-4.

Residuals are captured per pass and handed to each row, padding stripped, so a finished row's
`Generation.resid` has exactly the layout `generate` produces: [n_layers, P + N - 1, d_model].
Steering is per row: a row's delta is added only to that row's positions from its start.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from auditor.errors import InvalidInputError
from probes.steering import Steering
from probes.validation import check_layer, check_vector
from workers.runtime.generate import Generation, SamplingConfig, _check_length, _next_token
from workers.runtime.logprobs import TokenLogprob, prompt_logprobs, token_logprob
from workers.runtime.model import LoadedModel
from workers.runtime.stopping import StopMatcher


@dataclass
class SequenceRequest:
    """One generation to run inside a batch. Steering positions are the row's own."""

    prompt_ids: list[int]
    config: SamplingConfig = SamplingConfig()  # noqa: RUF009 - frozen, so one shared default is safe
    steering: Sequence[Steering] = ()


@dataclass
class _Row:
    key: Hashable
    request: SequenceRequest
    pad: int  # left-padding columns in front of this row's first real token
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    chunks: list[torch.Tensor] = field(default_factory=list)  # [n_layers, pos, d_model] per pass
    finish: str | None = None
    stops: StopMatcher | None = None
    stopped_after: int | None = None  # whole tokens kept when a stop sequence matched
    logprobs: list[TokenLogprob] | None = None  # when the request asks for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo: read from the prefill's logits
    joined_at: float = 0.0
    prefill_seconds: float = 0.0
    prefilled_at: float = 0.0


def validate_request(model: LoadedModel, request: SequenceRequest) -> None:
    """Everything that could fail for this request alone, checked before it joins a batch."""
    if not request.prompt_ids:
        raise InvalidInputError("the prompt is empty")
    _check_length(model, len(request.prompt_ids), request.config)
    for steer in request.steering:
        check_layer(steer.layer, model.n_layers)
        check_vector(steer.delta, model.d_model, "steering vector")


class BatchGenerator:
    """The running batch of one model. Not thread-safe: one thread owns it (workers.serving.model_thread)."""

    def __init__(self, model: LoadedModel, monitor_layers: Sequence[int] = ()):
        self.model = model
        self.layers = list(monitor_layers)
        self.rows: list[_Row] = []
        self.cache = None  # HF DynamicCache over the rows, [batch, heads, columns, head_dim]
        self.mask: torch.Tensor | None = None  # [batch, columns], 1 = real token
        self.next_logits: torch.Tensor | None = None  # [batch, vocab]

    def __len__(self) -> int:
        return len(self.rows)

    # ---- join ----

    def add(self, items: Sequence[tuple[Hashable, SequenceRequest]]) -> list[tuple[Hashable, Generation]]:
        """Prefill `items` as one left-padded batch and merge them into the running batch.
        Requests must already be validated (`validate_request`). Returns rows that finished
        at once (a one-token limit, or EOS as the first token)."""
        if not items:
            return []
        started = time.perf_counter()
        device = self.model.device
        width = max(len(request.prompt_ids) for _, request in items)
        tokens = torch.full((len(items), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        rows = []
        for b, (key, request) in enumerate(items):
            n = len(request.prompt_ids)
            tokens[b, width - n :] = torch.tensor(request.prompt_ids)
            mask[b, width - n :] = 1
            seed = request.config.seed
            generator = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
            stops = StopMatcher(self.model.tokenizer, request.config.stop) if request.config.stop else None
            logprobs = None if request.config.logprobs is None else []
            rows.append(_Row(key, request, width - n, generator, stops=stops, logprobs=logprobs, joined_at=started))
        logits, cache, resid = self._forward(tokens.to(device), mask.to(device), rows, past=None, offset=0)
        now = time.perf_counter()
        for b, row in enumerate(rows):
            row.chunks.append(resid[:, b, row.pad :] if resid is not None else None)
            if (k := row.request.config.prompt_logprobs) is not None:
                row.prompt_logprobs = prompt_logprobs(logits[b, row.pad :], row.request.prompt_ids, k)
            row.prefill_seconds, row.prefilled_at = now - started, now
        first_new = len(self.rows)
        self._merge(rows, cache, mask.to(device), logits[:, -1])
        # Only the newcomers choose a token now; running rows chose theirs at the last step.
        return self._sample(range(first_new, len(self.rows)))

    def _merge(self, rows: list[_Row], cache, mask: torch.Tensor, next_logits: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask, self.next_logits = rows, cache, mask, next_logits
            return
        old_width, new_width = self.mask.shape[1], mask.shape[1]
        width = max(old_width, new_width)
        for row in self.rows:
            row.pad += width - old_width
        for row in rows:
            row.pad += width - new_width
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(mask, width)], dim=0)
        self.next_logits = torch.cat([self.next_logits, next_logits], dim=0)
        self.rows = self.rows + rows

    # ---- step ----

    def step(self) -> list[tuple[Hashable, Generation]]:
        """One decode pass for every running row, then sample. Returns the rows that finished."""
        if not self.rows:
            return []
        device = self.model.device
        last = torch.tensor([[row.output[-1]] for row in self.rows], device=device)
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=device)], dim=1)
        logits, self.cache, resid = self._forward(
            last, self.mask, self.rows, past=self.cache, offset=self.mask.shape[1] - 1
        )
        for b, row in enumerate(self.rows):
            row.chunks.append(resid[:, b] if resid is not None else None)
        self.next_logits = logits[:, -1]
        return self._sample()

    def _sample(self, rows: Sequence[int] | None = None) -> list[tuple[Hashable, Generation]]:
        """Choose the next token of `rows` (default: all); rows that are done leave the batch."""
        choosing = set(range(len(self.rows)) if rows is None else rows)
        finished, keep = [], []
        for b, row in enumerate(self.rows):
            if b not in choosing:
                keep.append(b)
                continue
            config = row.request.config
            token = _next_token(self.next_logits[b], config, row.generator)
            row.output.append(token)
            if row.logprobs is not None:
                row.logprobs.append(token_logprob(self.next_logits[b], token, config.logprobs))
            if config.stop_at_eos and token in self.model.eos_token_ids:
                row.finish = "stop"
            elif row.stops is not None and (kept := row.stops.cut(row.output)) is not None:
                row.finish, row.stopped_after = "stop", kept
            elif len(row.output) >= config.max_new_tokens:
                row.finish = "length"
            if row.finish is None:
                keep.append(b)
            else:
                finished.append((row.key, self._result(row)))
        if len(keep) < len(self.rows):
            self._select(keep)
        return finished

    def cancel(self, keys: Sequence[Hashable]) -> list[tuple[Hashable, Generation]]:
        """End the rows of `keys` now, with what they generated so far (finish "cancelled")."""
        wanted = {id(key) for key in keys}  # by identity: a key need not be hashable by value
        finished, keep = [], []
        for b, row in enumerate(self.rows):
            if id(row.key) in wanted:
                row.finish = "cancelled"
                finished.append((row.key, self._result(row)))
            else:
                keep.append(b)
        if finished:
            self._select(keep)
        return finished

    def _select(self, keep: list[int]) -> None:
        if not keep:
            self.rows, self.cache, self.mask, self.next_logits = [], None, None, None
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[b] for b in keep]
        self.mask, self.next_logits = self.mask[index], self.next_logits[index]
        trim = min(row.pad for row in self.rows)  # columns now padding for every row
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, trim:]
            layer.values = layer.values[index, :, trim:]
        if trim:
            self.mask = self.mask[:, trim:]
            for row in self.rows:
                row.pad -= trim

    def _result(self, row: _Row) -> Generation:
        resid = torch.cat(row.chunks, dim=1) if self.layers else None
        generation = Generation(
            prompt_ids=list(row.request.prompt_ids),
            output_ids=row.output,
            finish_reason=row.finish,
            resid=resid,
            layers=list(self.layers),
            prefill_seconds=row.prefill_seconds,
            decode_seconds=time.perf_counter() - row.prefilled_at,
            logprobs=row.logprobs,
            prompt_logprobs=row.prompt_logprobs,
        )
        return generation if row.stopped_after is None else generation.stopped_after(row.stopped_after)

    # ---- one forward pass under per-row hooks ----

    @property
    def _pad_id(self) -> int:
        tokenizer = self.model.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.inference_mode()
    def _forward(self, tokens: torch.Tensor, mask: torch.Tensor, rows: list[_Row], past, offset: int):
        """tokens [batch, pos] at columns offset.. -> (logits, cache, resid [n_layers, batch, pos, d] | None)."""
        captured: dict[int, torch.Tensor] = {}
        hooks = [(self.model.hook_name(layer), hook) for layer, hook in _steering_hooks(rows, offset, tokens.shape[1])]
        for layer in self.layers:

            def capture(resid: torch.Tensor, hook, layer=layer) -> None:
                captured[layer] = resid.detach()

            hooks.append((self.model.hook_name(layer), capture))
        with self.model.bridge.hooks(fwd_hooks=hooks):
            logits, cache = self.model.bridge.forward(
                tokens, return_type="logits_and_cache", attention_mask=mask, past_key_values=past
            )
        resid = torch.stack([captured[layer] for layer in self.layers]) if self.layers else None
        return logits, cache, resid


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad a [batch, columns] mask or [batch, heads, columns, dim] cache on the left."""
    axis = 1 if tensor.ndim == 2 else 2
    missing = width - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)


def _steering_hooks(rows: list[_Row], offset: int, n_positions: int):
    """(layer, hook) pairs adding each row's own deltas at that row's steered positions only."""
    by_layer: dict[int, list[tuple[int, Steering]]] = {}
    for b, row in enumerate(rows):
        for steer in row.request.steering:
            by_layer.setdefault(steer.layer, []).append((b, steer))
    for layer, entries in by_layer.items():

        def steer(resid: torch.Tensor, hook, entries=entries) -> torch.Tensor:
            resid = resid.clone()
            columns = torch.arange(offset, offset + n_positions, device=resid.device)
            for b, steering in entries:
                position = columns - rows[b].pad  # the row's own positions (negative = padding)
                first = int((position < steering.start_position).sum())
                resid[b, first:] += steering.delta.to(device=resid.device, dtype=resid.dtype)
            return resid

        yield layer, steer
