"""Log-probabilities of the tokens a generation chose, and the most likely alternatives at each
step, as OpenAI's `logprobs` / `top_logprobs` report them: from the model's own distribution
(log-softmax of the logits, before temperature or top-p), whatever the sampling did."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # OpenAI's ceiling for chat; completions allow 5


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # the k most likely tokens at this step, most likely first


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """logits [vocab] at one step -> the chosen token's log-probability and the top k."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = ()
    if k > 0:
        values, ids = logprobs.topk(k)
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), top)


def _entry(tokenizer, token: int, logprob: float) -> dict:
    text = tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def logprob_entries(tokenizer, logprobs: list[TokenLogprob]) -> list[dict]:
    """OpenAI's chat shape, one entry per token: token text, logprob, its UTF-8 bytes, and the
    top alternatives in the same shape. (A byte-level token that is part of a character decodes
    to U+FFFD; its bytes are those of that text, not the raw token bytes.)"""
    return [
        {**_entry(tokenizer, lp.token, lp.logprob), "top_logprobs": [_entry(tokenizer, t, v) for t, v in lp.top]}
        for lp in logprobs
    ]
