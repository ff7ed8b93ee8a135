"""The model thread: one per worker process, the only thread that touches the model.

Task threads (Celery's `threads` pool, or the embedded default's thread pool) hand it work and
wait on a future; it batches what arrives together:

- generations join the running batch (workers.runtime.batch_generate) between decode steps,
  up to `batch_max_size` rows. When the batch is idle, the first arrival waits up to
  `batch_wait_ms` for company, so a burst starts as one batch rather than a batch of one;
- audit replays queued at the same moment, from any number of submissions, run as one padded
  teacher-forced pass;
- anything else (extraction, calibration) runs alone between steps.

A request that fails validation fails alone; its batch-mates never see it.

Why a thread and not celery-batches: celery-batches buffers whole tasks and runs them as one
call, so a batch only starts when the buffer flushes and every request waits for the slowest
one; requests cannot join or leave a running batch. Continuous batching needs a loop that owns
the KV cache across steps, and per-request Celery tasks keep acks, retries and results
per request. See DESIGN notes in README ("Worker batching").

Size: the loop, its job types and its one batch state belong together; the batching itself lives
in workers.runtime.batch_generate.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from auditor.telemetry import metrics
from workers.monitoring.concepts import ConceptBank
from workers.monitoring.divergence import Verdict, judge
from workers.monitoring.replay import encode_replay, replay_chunks, replay_scores
from workers.monitoring.scores import RequestScores, score_generation
from workers.runtime.batch_generate import BatchGenerator, SequenceRequest, validate_request
from workers.runtime.generate import Generation, SamplingConfig, encode_prompt
from workers.runtime.logprobs import logprob_entries, prompt_entries
from workers.serving.streaming import TokenListener

if TYPE_CHECKING:
    from auditor.settings import Settings
    from probes.answer_null import LengthNull
    from workers.serving.host import ModelHost, SteerRequest

log = logging.getLogger(__name__)


class ModelOwner(Protocol):
    """What the model thread needs from the worker around it (a `WorkerContext` in a worker,
    anything with these members in a test): the model host, the bank in force, the answer null
    for a bank, steering injected on every request, and the divergence-flag switch."""

    host: ModelHost
    settings: Settings
    injected_steering: list[SteerRequest]

    def bank(self) -> ConceptBank: ...

    def answer_null(self, bank: ConceptBank) -> LengthNull | None: ...


@dataclass
class GenerationJob:
    prompt: str | list[dict]
    chat: bool
    sampling: SamplingConfig
    steer: list = field(default_factory=list)  # host.SteerRequest, resolved per prompt length
    future: Future = field(default_factory=Future)
    listener: TokenListener | None = None  # a streamed request: told of every token, may cancel


@dataclass
class ReplayJob:
    items: list[dict]
    future: Future = field(default_factory=Future)


@dataclass
class CallJob:
    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


@dataclass
class Served:
    """A finished monitored generation, with the bank it was scored against."""

    generation: Generation
    text: str
    scores: RequestScores
    bank: ConceptBank
    verdict: Verdict = field(default_factory=lambda: Verdict("calibrating"))
    logprobs: list[dict] | None = None  # OpenAI's chat entries, when the request asked for them
    prompt_logprobs: list[dict] | None = None  # the same for the prompt's tokens (echo), when asked for

    @property
    def flags(self):
        return self.verdict.flags


@dataclass
class Replayed:
    """One audited (prompt, completion) replayed and read."""

    scores: RequestScores
    bank: ConceptBank
    prompt_tokens: int
    completion_tokens: int
    verdict: Verdict = field(default_factory=lambda: Verdict("calibrating"))


class ModelThread:
    def __init__(self, owner: ModelOwner, max_batch: int, wait_seconds: float):
        self.owner = owner
        self.max_batch = max_batch
        self.wait_seconds = wait_seconds
        self.inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.batch: BatchGenerator | None = None
        self._banks: dict[Any, ConceptBank] = {}  # row key -> bank it is scored against
        self.peak_batch = 0  # most rows generated together so far (observability, tests)

    # ---- the task threads' side ----

    def generate(
        self,
        prompt: str | list[dict],
        sampling: SamplingConfig,
        chat: bool,
        steer=(),
        listener: TokenListener | None = None,
    ) -> Future:
        """-> Future of a `Served`. A `listener` hears of each token as it is chosen, and can
        end the generation early (its `cancel`): the answer is then what was generated so far,
        finish reason "cancelled"."""
        return self._put(GenerationJob(prompt, chat, sampling, steer=list(steer), listener=listener))

    def replay(self, items: list[dict]) -> Future:
        """-> Future of a list with, per item, a `Replayed` or the exception that item alone
        raised."""
        return self._put(ReplayJob(items))

    def call(self, fn: Callable[[], Any]) -> Future:
        return self._put(CallJob(fn))

    def _put(self, job) -> Future:
        self._ensure_started()
        self.inbox.put(job)
        return job.future

    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="auditor-model", daemon=True)
                self._thread.start()

    # ---- the model thread ----

    def _loop(self) -> None:
        while True:
            try:
                self._turn()
            except Exception:  # a bug here must not kill the thread every task waits on
                log.exception("model thread turn failed")
                self._fail_running()

    def _turn(self) -> None:
        running = self.batch is not None and len(self.batch) > 0
        jobs = self._collect(block=not running)
        generations = [job for job in jobs if isinstance(job, GenerationJob)]
        replays = [job for job in jobs if isinstance(job, ReplayJob)]
        for job in jobs:
            if isinstance(job, CallJob):
                _settle(job.future, job.fn)
        if replays:
            self._replay(replays)
        if generations:
            self._admit(generations)
        if self.batch is not None and len(self.batch):
            self._cancel_abandoned()
        if self.batch is not None and len(self.batch):
            metrics.observe_batch(len(self.batch))
            self._finish(self.batch.step())
            self._report_progress()

    def _collect(self, block: bool) -> list:
        """Everything waiting now; when idle, block for the first job, then give company
        `wait_seconds` to arrive (up to a full batch)."""
        jobs = []
        if block:
            jobs.append(self.inbox.get())
            deadline = time.monotonic() + self.wait_seconds
            while len(jobs) < self.max_batch and (remaining := deadline - time.monotonic()) > 0:
                try:
                    jobs.append(self.inbox.get(timeout=remaining))
                except queue.Empty:
                    break
        while True:
            try:
                jobs.append(self.inbox.get_nowait())
            except queue.Empty:
                return jobs

    def _bank(self) -> ConceptBank:
        return self.owner.bank()

    def _admit(self, jobs: list[GenerationJob]) -> None:
        model = self.owner.host.model
        bank = self._bank()
        if self.batch is None:
            self.batch = BatchGenerator(model, bank.layers)
        room = self.max_batch - len(self.batch)
        budget = self.owner.settings.max_batch_tokens  # padded prefill tokens this turn
        admitted, widest = [], 0
        for job in jobs:
            if len(admitted) >= room:
                self.inbox.put(job)  # the batch is full: next turn
                continue
            try:
                prompt_ids = encode_prompt(model, job.prompt, job.chat)
                steer = [*job.steer, *self.owner.injected_steering]
                steering = [self.owner.host.steering(s, bank, len(prompt_ids)) for s in steer]
                request = SequenceRequest(prompt_ids, job.sampling, steering)
                validate_request(model, request)
            except Exception as exc:  # this request alone fails
                job.future.set_exception(exc)
                continue
            wider, rows = max(widest, len(prompt_ids)), len(admitted) + 1
            if admitted and (wider * rows > budget or wider**2 * rows > (budget // 2) ** 2):
                self.inbox.put(job)  # past this turn's prefill budget (tokens, attention): next step
                continue
            widest = max(widest, len(prompt_ids))
            admitted.append((job, request))
            self._banks[id(job)] = bank
            if job.listener is not None:
                job.listener.bank = bank
        if admitted:
            finished = self.batch.add([(job, request) for job, request in admitted])
            self.peak_batch = max(self.peak_batch, len(self.batch) + len(finished))
            self._finish(finished)
            self._report_progress()

    def _report_progress(self) -> None:
        """Tell each streamed row's listener of its newest token (and the residual that chose it)."""
        for row in self.batch.rows:
            listener = row.key.listener
            if listener is not None and listener.streaming:
                chunk = row.chunks[-1] if row.chunks else None
                listener.progress(row.output, None if chunk is None else chunk[:, -1], row.logprobs)

    def _cancel_abandoned(self) -> None:
        """End the rows whose client has gone: they are answered (and recorded) with what they
        generated so far."""
        gone = [row.key for row in self.batch.rows if row.key.listener is not None and row.key.listener.cancel.is_set()]
        if gone:
            self._finish(self.batch.cancel(gone))

    def _finish(self, finished: list[tuple[GenerationJob, Generation]]) -> None:
        """Score each finished row, re-read its text alone (all of this step's answers in one
        pass) and compare the two signals."""
        if not finished:
            return
        model = self.owner.host.model
        served = []
        for job, generation in finished:
            bank = self._banks.pop(id(job))
            try:
                text = generation.answer_text(model.tokenizer)
                scores = score_generation(bank, generation)
                logprobs = prompt_logprobs = None
                if generation.logprobs is not None:
                    logprobs = logprob_entries(model.tokenizer, generation.logprobs)
                if generation.prompt_logprobs is not None:
                    prompt_logprobs = prompt_entries(model.tokenizer, generation.prompt_ids, generation.prompt_logprobs)
                served.append(
                    (job, Served(generation, text, scores, bank, logprobs=logprobs, prompt_logprobs=prompt_logprobs))
                )
            except Exception as exc:
                job.future.set_exception(exc)
        self._judge([(s, s.scores, s.generation.output_ids, job.chat is not False) for job, s in served])
        for job, result in served:
            job.future.set_result(result)

    def _judge(self, answers: list[tuple[Any, RequestScores, list[int], bool]]) -> None:
        """Read each answer against ordinary answers of its length (flags and alerts), all of
        this step's answers in one re-read. Sets `.verdict` on each holder. The last field says
        whether the prompt was a chat."""
        by_bank: dict[int, list] = {}
        for holder, scores, output_ids, chat in answers:
            by_bank.setdefault(id(holder.bank), []).append((holder, scores, output_ids, chat))
        for group in by_bank.values():
            bank = group[0][0].bank
            try:
                null = self.owner.answer_null(bank)
                verdicts = judge(
                    self.owner.host.model,
                    bank,
                    null,
                    [(s, ids) for _, s, ids, _ in group],
                    enabled=self.owner.settings.divergence_flags,
                    chat=[c for *_, c in group],
                )
            except Exception:  # flags are extra: never lose the answers over them
                log.exception("divergence check failed")
                continue
            for (holder, *_), verdict in zip(group, verdicts):
                holder.verdict = verdict

    def _replay(self, jobs: list[ReplayJob]) -> None:
        bank = self._bank()
        model = self.owner.host.model
        outcomes: list[list[Any]] = []
        valid = []  # (job index, item index, encoded)
        for j, job in enumerate(jobs):
            outcomes.append([None] * len(job.items))
            for i, item in enumerate(job.items):
                try:
                    valid.append((j, i, encode_replay(model, item)))
                except Exception as exc:
                    outcomes[j][i] = exc
        lengths = [len(p) + len(c) for _, _, (p, c) in valid]
        for indices in replay_chunks(lengths, self.max_batch, self.owner.settings.max_batch_tokens):
            chunk = [valid[k] for k in indices]
            try:
                scores = replay_scores(model, bank, [encoded for _, _, encoded in chunk])
            except Exception as exc:
                scores = [exc] * len(chunk)
            replayed = []
            for (j, i, encoded), result in zip(chunk, scores):
                if isinstance(result, Exception):
                    outcomes[j][i] = result
                    continue
                outcomes[j][i] = Replayed(result, bank, len(encoded[0]), len(encoded[1]))
                replayed.append((outcomes[j][i], result, encoded[1], bool(jobs[j].items[i].get("messages"))))
            self._judge(replayed)
        for job, outcome in zip(jobs, outcomes):
            job.future.set_result(outcome)

    def _fail_running(self) -> None:
        """After an unexpected error the running batch's state is suspect: fail its rows."""
        if self.batch is not None:
            for row in self.batch.rows:
                if not row.key.future.done():
                    row.key.future.set_exception(RuntimeError("the model thread hit an internal error"))
                self._banks.pop(id(row.key), None)
            self.batch = None


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:
        future.set_exception(exc)
