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


# Positions whose log-softmax is computed at once when reading a prompt's log-probabilities:
# [PROMPT_CHUNK, vocab] float32 is ~50 MB for a 49k vocabulary, whatever the prompt's length.
PROMPT_CHUNK = 256


def prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int], k: int) -> list[TokenLogprob | None]:
    """logits [P, vocab] of a prompt's own positions -> each prompt token's log-probability given
    the tokens before it, and the top k there (`echo`). The first token has none (None): nothing
    precedes it. The last position predicts the first generated token, so it is not read."""
    out: list[TokenLogprob | None] = [None]
    for start in range(0, len(prompt_ids) - 1, PROMPT_CHUNK):
        stop = min(start + PROMPT_CHUNK, len(prompt_ids) - 1)
        logprobs = torch.log_softmax(logits[start:stop].float(), dim=-1)  # [chunk, vocab]
        targets = torch.tensor(prompt_ids[start + 1 : stop + 1], device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        tops = logprobs.topk(k, dim=-1) if k > 0 else None
        for i, (token, value) in enumerate(zip(targets.tolist(), chosen)):
            top = () if tops is None else tuple(zip(tops.indices[i].tolist(), tops.values[i].tolist()))
            out.append(TokenLogprob(token, value, top))
    return out


def prompt_entries(tokenizer, prompt_ids: list[int], logprobs: list[TokenLogprob | None]) -> list[dict]:
    """`prompt_logprobs` in the chat entry shape; the first token's logprob and top are None."""
    first = {**_entry(tokenizer, prompt_ids[0], None), "top_logprobs": None}
    return [first, *logprob_entries(tokenizer, [lp for lp in logprobs[1:] if lp is not None])]


def _entry(tokenizer, token: int, logprob: float | None) -> dict:
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
