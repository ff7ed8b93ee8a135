"""KV-cached generation under hooks, with residuals captured in the same forward passes.

Positions: a prompt of P tokens and N generated tokens. The prefill pass covers positions
0..P-1 and each decode step feeds one generated token, so the residuals captured cover
0..P+N-2. The residual at position P-1+i is the state in which generated token i was chosen;
those N positions are the response span that the monitor scores. The last generated token is
never fed back (nothing would read its output), so monitoring costs no extra forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from auditor.errors import InvalidInputError
from probes.steering import Steering
from probes.validation import check_layer, check_vector
from workers.runtime.hooks import ResidualCapture, hooked
from workers.runtime.logprobs import MAX_TOP_LOGPROBS, TokenLogprob, prompt_logprobs, token_logprob
from workers.runtime.model import LoadedModel
from workers.runtime.stopping import StopMatcher, cut_at_stop


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # sample among the k most likely tokens only; 0 = all
    seed: int | None = None
    stop_at_eos: bool = True
    stop: tuple[str, ...] = ()  # stop sequences: the answer ends before the first (not included)
    logprobs: int | None = None  # None: none recorded; k: each token's log-probability and the top k
    # `echo`: also each prompt token's log-probability and the top k (None: not read)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # a JSON payload gives a list
        if self.max_new_tokens < 1:
            raise InvalidInputError("max_new_tokens must be at least 1")
        if self.temperature < 0 or self.temperature != self.temperature:
            raise InvalidInputError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidInputError("top_k must be >= 0 (0: no limit)")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise InvalidInputError(f"{name} must be between 0 and {MAX_TOP_LOGPROBS}")


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop sequence), "length", or "cancelled" (its client left)
    resid: torch.Tensor | None  # [n_layers, P+N-1, d_model], or None when not monitored
    layers: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    text_end: int | None = None  # the answer's text is cut here (a stop inside its only token)
    logprobs: list[TokenLogprob] | None = None  # one per output token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (echo), when asked for

    @property
    def response_start(self) -> int:
        """First position of the response span in `resid` (the last prompt position)."""
        return len(self.prompt_ids) - 1

    def answer_text(self, tokenizer) -> str:
        text = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        return text if self.text_end is None else text[: self.text_end]

    def stopped_after(self, keep: int) -> Generation:
        """This generation ended by a stop sequence matched after `keep` whole tokens: only those
        are returned, and the residuals cover only their positions."""
        output, text_end = cut_at_stop(self.output_ids, keep)
        resid = None if self.resid is None else self.resid[:, : len(self.prompt_ids) - 1 + len(output)]
        logprobs = None if self.logprobs is None else self.logprobs[: len(output)]
        return Generation(
            self.prompt_ids,
            output,
            "stop",
            resid,
            self.layers,
            self.prefill_seconds,
            self.decode_seconds,
            text_end,
            logprobs,
            self.prompt_logprobs,
        )


def encode_prompt(model: LoadedModel, prompt: str | list[dict] | list[int], chat: bool | None = None) -> list[int]:
    """Token ids for a plain prompt, chat messages (chat models get their chat template), or a
    prompt given as token ids already (taken as they are, once checked against the vocabulary)."""
    tokenizer = model.tokenizer
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        vocab = model.vocab_size
        if bad := [t for t in prompt if not 0 <= t < vocab]:
            raise InvalidInputError(f"token id {bad[0]} is not in the model's vocabulary (0..{vocab - 1})")
        return list(prompt)
    use_chat = model.is_chat if chat is None else chat
    if isinstance(prompt, list):
        if not model.is_chat:
            raise InvalidInputError("chat messages given but the model has no chat template")
        messages = prompt
    elif use_chat:
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = None
    if messages is not None:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise InvalidInputError("the prompt is empty")
    return list(ids)


def _next_token(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> int:
    """logits [vocab] -> token id."""
    if config.temperature == 0:
        return int(logits.argmax())
    # Sample on the CPU: seeded generators are CPU generators, whatever device the model is on.
    logits = logits.float().cpu()
    if 0 < config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / config.temperature, dim=-1)
    if config.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs > config.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_length(model: LoadedModel, prompt_len: int, config: SamplingConfig) -> None:
    if prompt_len + config.max_new_tokens > model.max_context:
        raise InvalidInputError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the "
            f"model's context of {model.max_context} tokens"
        )


@torch.inference_mode()
def read_prompt(model: LoadedModel, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability and top k, generating nothing (`max_tokens` 0 + echo)."""
    if len(prompt_ids) > model.max_context:
        raise InvalidInputError(
            f"the prompt ({len(prompt_ids)} tokens) exceeds the model's context of {model.max_context}"
        )
    logits = model.bridge.forward(torch.tensor([prompt_ids], device=model.device))  # [1, P, vocab]
    return prompt_logprobs(logits[0], prompt_ids, k)


@torch.inference_mode()
def generate(
    model: LoadedModel,
    prompt_ids: Sequence[int],
    config: SamplingConfig = SamplingConfig(),
    monitor_layers: Sequence[int] | None = None,
    steering: Sequence[Steering] = (),
    use_cache: bool = True,
) -> Generation:
    """Generate under hooks. `use_cache=False` re-runs the full sequence each step (the
    reference behaviour that tests compare the cached path against)."""
    prompt = list(prompt_ids)
    _check_length(model, len(prompt), config)
    for steer in steering:
        check_layer(steer.layer, model.n_layers)
        check_vector(steer.delta, model.d_model, "steering vector")
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
    capture = ResidualCapture(monitor_layers) if monitor_layers else None
    tokens = torch.tensor([prompt], device=model.device)  # [1, P]
    output: list[int] = []
    logprobs: list[TokenLogprob] | None = None if config.logprobs is None else []
    finish = "length"
    stops, stopped_after = StopMatcher(model.tokenizer, config.stop), None
    with hooked(model, capture=capture, steering=steering) as tracker:
        started = time.perf_counter()
        tracker.offset = 0
        logits, cache = model.bridge.forward(tokens, return_type="logits_and_cache")
        prefill_done = time.perf_counter()
        for step in range(config.max_new_tokens):
            token = _next_token(logits[0, -1], config, generator)
            output.append(token)
            if logprobs is not None:
                logprobs.append(token_logprob(logits[0, -1], token, config.logprobs))
            if config.stop_at_eos and token in model.eos_token_ids:
                finish = "stop"
                break
            if (stopped_after := stops.cut(output)) is not None:
                break
            if step == config.max_new_tokens - 1:
                break
            if use_cache:
                tracker.offset = len(prompt) + step
                step_input = torch.tensor([[token]], device=model.device)
                logits, cache = model.bridge.forward(step_input, return_type="logits_and_cache", past_key_values=cache)
            else:
                # Full re-run: its capture covers every position so far, superseding the last.
                if capture is not None:
                    capture.clear()
                tracker.offset = 0
                full = torch.tensor([prompt + output], device=model.device)
                logits = model.bridge.forward(full)
    decode_done = time.perf_counter()
    resid = capture.stacked()[:, 0] if capture is not None else None
    generation = Generation(
        prompt_ids=prompt,
        output_ids=output,
        finish_reason=finish,
        resid=resid,
        layers=list(monitor_layers or []),
        prefill_seconds=prefill_done - started,
        decode_seconds=decode_done - prefill_done,
        logprobs=logprobs,
    )
    return generation if stopped_after is None else generation.stopped_after(stopped_after)
