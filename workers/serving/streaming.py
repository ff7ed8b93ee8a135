"""A streamed generation's tokens on their way out: from the model thread to the task thread
(`TokenListener`), turned into text that will not change and running scores (`LiveAnswer`),
and published on the request's channel (auditor.queue.streams) by `pump`.

The model thread only queues what it has (the tokens so far, the residual that chose the newest
one) and reads the listener's cancel flag between steps: decoding, scoring and publishing happen
on the task thread, so a slow channel never slows the batch.

What is sent is always the text of a run of whole leading tokens, and only once it cannot change:
- a token that ends inside a multi-byte character waits for the rest of it;
- with stop sequences, text that could still turn out to be the start of a stop (the last
  `longest stop - 1` characters) waits: the returned answer ends before the stop and keeps only
  the whole tokens in front of it (workers.runtime.stopping), so what was sent is always a prefix
  of the final answer.
The rest of the answer is in the `done` event (the non-streamed answer), and the API sends
whatever of it was not sent yet: streamed text equals non-streamed text.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch

from auditor.queue.streams import StreamPublisher
from probes.scoring import cosine_scores
from workers.monitoring.concepts import ConceptBank
from workers.runtime.logprobs import TokenLogprob, logprob_entries

log = logging.getLogger(__name__)

# How often the task thread asks the channel whether the client has gone (a Redis EXISTS).
CANCEL_POLL_SECONDS = 0.25


@dataclass
class Progress:
    """One step of one row, as the model thread saw it."""

    output_ids: list[int]
    resid: torch.Tensor | None  # [n_layers, d_model]: the state that chose output_ids[-1]
    logprobs: list[TokenLogprob] | None


@dataclass
class TokenListener:
    """Between the model thread (which calls `progress` and reads `cancel`) and the task thread
    (which drains `updates`). `bank` is set when the row joins the batch."""

    streaming: bool = True  # False: only told to stop (a non-streamed request given up on)
    updates: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancel: threading.Event = field(default_factory=threading.Event)
    bank: ConceptBank | None = None

    def progress(self, output_ids: list[int], resid: torch.Tensor | None, logprobs) -> None:
        self.updates.put(Progress(list(output_ids), resid, None if logprobs is None else list(logprobs)))


class LiveAnswer:
    """What of a growing answer can be sent, and the running scores of the tokens sent."""

    def __init__(self, tokenizer, stops: tuple[str, ...] | list[str] = ()):
        self.tokenizer = tokenizer
        self.hold = max((len(s) for s in stops), default=0)
        self.sent_tokens = 0
        self.sent_text = ""
        self._seen = 0  # tokens whose residual has been scored
        self._per_token: list[torch.Tensor] = []  # [n_concepts] per token, at each primary layer
        self._sums: list[torch.Tensor] = []  # running sums of those: _sums[i] covers tokens 0..i
        self._names: list[str] = []
        self._layers: list[int] = []
        self._columns: tuple[list[int], list[int]] | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _score(self, bank: ConceptBank | None, progress: Progress) -> None:
        if len(progress.output_ids) <= self._seen:
            return  # reported twice (a row that joined reports with the running ones)
        self._seen = len(progress.output_ids)
        if bank is None or progress.resid is None:
            return
        if self._columns is None:
            headline = [(k, n) for k, n in enumerate(bank.names) if bank.auto_layers[n] in bank.layers]
            self._names = [n for _, n in headline]
            self._layers = [bank.auto_layers[n] for _, n in headline]
            self._columns = ([bank.layers.index(x) for x in self._layers], [k for k, _ in headline])
        cosines = cosine_scores(progress.resid.float()[:, None], bank.directions)[:, 0]  # [n_layers, n_concepts]
        rows, columns = self._columns
        value = cosines[rows, columns]
        self._per_token.append(value)
        self._sums.append(value if not self._sums else self._sums[-1] + value)

    def update(self, bank: ConceptBank | None, progress: Progress) -> dict[str, Any] | None:
        """The `delta` event for this step, or None when nothing new can be sent yet."""
        self._score(bank, progress)
        ids = progress.output_ids
        full = self._decode(ids)  # decoded once per step: it is also the first candidate
        limit = len(full) - max(self.hold - 1, 0)
        for keep in range(len(ids), self.sent_tokens, -1):
            text = full if keep == len(ids) else self._decode(ids[:keep])
            if len(text) <= limit and not text.endswith("\ufffd") and text.startswith(self.sent_text):
                return self._delta(ids, keep, text, progress.logprobs)
        return None

    def _delta(self, ids: list[int], keep: int, text: str, logprobs) -> dict[str, Any]:
        event: dict[str, Any] = {
            "type": "delta",
            "offset": len(self.sent_text),
            "text": text[len(self.sent_text) :],
            "tokens": keep,
            "scores": self.scores(keep),
        }
        if logprobs is not None:
            event["logprobs"] = logprob_entries(self.tokenizer, logprobs[self.sent_tokens : keep])
        self.sent_tokens, self.sent_text = keep, text
        return event

    def scores(self, n_tokens: int) -> dict[str, dict[str, Any]]:
        """Per concept at its primary layer: the mean and the last cosine over the first
        `n_tokens` tokens (as the final scores' `mean` and `last`)."""
        n_tokens = min(n_tokens, len(self._sums))
        if not n_tokens:
            return {}
        mean, last = self._sums[n_tokens - 1] / n_tokens, self._per_token[n_tokens - 1]
        return {
            name: {"layer": layer, "mean": round(float(mean[k]), 5), "last": round(float(last[k]), 5)}
            for k, (name, layer) in enumerate(zip(self._names, self._layers))
        }


def wait_cancellable(request_id: str, listener: TokenListener, future: Future, publisher: StreamPublisher) -> None:
    """Wait for a non-streamed row, asking the channel every CANCEL_POLL_SECONDS whether the API
    has given up on it (its timeout): then the row ends with what it has, instead of running on
    for nobody."""
    while not future.done():
        try:
            future.result(timeout=CANCEL_POLL_SECONDS)
        except FutureTimeout:
            if not listener.cancel.is_set() and asks_to_cancel(publisher, request_id):
                listener.cancel.set()
        except Exception:  # the row's own failure: the caller reads it from the future
            return


def asks_to_cancel(publisher: StreamPublisher, request_id: str) -> bool:
    """Whether the API has given up on the request. The channel being away (Redis restarting)
    says nothing: the answer is still recorded, and the API may still be waiting for it."""
    try:
        return publisher.cancelled(request_id)
    except Exception as exc:
        log.debug("cannot ask whether %s is cancelled: %s", request_id, exc)
        return False


def pump(
    request_id: str,
    listener: TokenListener,
    future: Future,
    live: LiveAnswer,
    publisher: StreamPublisher,
) -> None:
    """Publish the row's deltas until the model thread settles `future`; ask the channel
    between tokens whether the client has gone, and tell the model thread if so. Should this
    fail (the channel gone), the row is cancelled too: nobody would read its answer."""
    try:
        _pump(request_id, listener, future, live, publisher)
    except BaseException:
        listener.cancel.set()
        raise


def _pump(
    request_id: str, listener: TokenListener, future: Future, live: LiveAnswer, publisher: StreamPublisher
) -> None:
    polled = 0.0
    while True:
        try:
            progress = listener.updates.get(timeout=0.05)
        except queue.Empty:
            if future.done():
                return
        else:
            if (event := live.update(listener.bank, progress)) is not None:
                publisher.publish(request_id, event)
        now = time.monotonic()
        if not listener.cancel.is_set() and now - polled >= CANCEL_POLL_SECONDS:
            polled = now
            if asks_to_cancel(publisher, request_id):
                listener.cancel.set()
