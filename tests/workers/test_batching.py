"""Continuous batching on the real model: every request served inside a batch gets the tokens and
scores it gets alone (workers.runtime.batch_generate)."""

from __future__ import annotations

import pytest
import torch

from probes.steering import Steering, start_position, steering_delta
from workers.monitoring.scores import score_generation
from workers.runtime.batch_generate import BatchGenerator, SequenceRequest
from workers.runtime.generate import SamplingConfig, encode_prompt, generate

pytestmark = pytest.mark.model

PROMPTS = [
    "Hi!",
    "Write one sentence about the sea.",
    "List three things people usually pack for a long weekend trip to the mountains in late autumn, "
    "and say briefly why each of them matters when the weather turns cold and wet.",
    "What is 2 + 2?",
    "Explain in two sentences why the sky looks blue during the day but red and orange at sunset.",
]
LIMITS = [12, 20, 7, 16, 24]


def _run(batch: BatchGenerator, joins: dict[int, list]) -> dict:
    """Step until empty; joins[step] are added before that step. -> key -> Generation."""
    done, step = {}, 0
    while len(batch) or any(s >= step for s in joins):
        if step in joins:
            done.update(batch.add(joins[step]))
        done.update(batch.step())
        step += 1
        assert step < 500
    return done


def _assert_same(alone, batched, bank, tol=1e-4):
    assert batched.output_ids == alone.output_ids
    assert batched.finish_reason == alone.finish_reason
    assert batched.resid.shape == alone.resid.shape
    a, b = score_generation(bank, alone), score_generation(bank, batched)
    for field in ("mean", "max", "last"):
        diff = (getattr(a.aggregates, field) - getattr(b.aggregates, field)).abs().max()
        assert float(diff) < tol, (field, float(diff))
    assert float((a.per_token - b.per_token).abs().max()) < tol


@pytest.fixture(scope="module")
def requests(model):
    return [
        SequenceRequest(encode_prompt(model, prompt), SamplingConfig(max_new_tokens=limit))
        for prompt, limit in zip(PROMPTS, LIMITS)
    ]


@pytest.fixture(scope="module")
def alone(model, bank, requests):
    return [generate(model, r.prompt_ids, r.config, bank.layers) for r in requests]


def test_prompt_lengths_differ_enough_to_need_padding(requests):
    lengths = sorted(len(r.prompt_ids) for r in requests)
    assert lengths[-1] - lengths[0] > 30


def test_a_batch_gives_each_request_its_own_tokens_and_scores(model, bank, requests, alone):
    batch = BatchGenerator(model, bank.layers)
    done = _run(batch, {0: list(enumerate(requests))})
    assert sorted(done) == list(range(len(requests)))
    for i, generation in done.items():
        _assert_same(alone[i], generation, bank)
    assert batch.cache is None and len(batch) == 0  # everyone left


def test_requests_joining_a_running_batch_match_serving_alone(model, bank, requests, alone):
    batch = BatchGenerator(model, bank.layers)
    joins = {0: [(0, requests[0]), (2, requests[2])], 3: [(1, requests[1]), (3, requests[3])], 9: [(4, requests[4])]}
    done = _run(batch, joins)
    for i, generation in done.items():
        _assert_same(alone[i], generation, bank)


def test_steering_one_row_leaves_its_batch_mates_untouched(host, model, bank, requests, alone):
    prompt = requests[1].prompt_ids
    vectors = bank.vectors["pessimism"]
    layer = vectors.auto_layer
    steer = Steering(
        layer,
        steering_delta(vectors.direction(layer), 0.8, bank.typical_norms[layer]),
        start_position("generated", len(prompt)),
    )
    steered_request = SequenceRequest(prompt, requests[1].config, steering=[steer])
    steered_alone = generate(model, prompt, requests[1].config, bank.layers, [steer])
    assert steered_alone.output_ids != alone[1].output_ids  # the steering is strong enough to show

    batch = BatchGenerator(model, bank.layers)
    done = _run(batch, {0: [(0, requests[0]), ("steered", steered_request), (1, requests[1]), (3, requests[3])]})
    _assert_same(steered_alone, done["steered"], bank)
    for i in (0, 1, 3):
        _assert_same(alone[i], done[i], bank)


def test_seeded_sampling_in_a_batch_matches_alone(model, bank, requests):
    sampled = [
        SequenceRequest(r.prompt_ids, SamplingConfig(max_new_tokens=12, temperature=0.8, seed=7 + i))
        for i, r in enumerate(requests[:3])
    ]
    batch = BatchGenerator(model, bank.layers)
    done = _run(batch, {0: list(enumerate(sampled))})
    for i, request in enumerate(sampled):
        assert done[i].output_ids == generate(model, request.prompt_ids, request.config, bank.layers).output_ids


def test_a_one_token_request_finishes_at_prefill(model, bank, requests):
    request = SequenceRequest(requests[0].prompt_ids, SamplingConfig(max_new_tokens=1))
    batch = BatchGenerator(model, bank.layers)
    finished = batch.add([("one", request)])
    assert [key for key, _ in finished] == ["one"] and len(batch) == 0
    assert finished[0][1].resid.shape[1] == len(request.prompt_ids)
    assert finished[0][1].output_ids == generate(model, request.prompt_ids, request.config).output_ids


def test_padding_columns_are_trimmed_once_the_long_rows_leave(model, bank, requests):
    long_first = SequenceRequest(requests[2].prompt_ids, SamplingConfig(max_new_tokens=2))
    short_long = SequenceRequest(requests[0].prompt_ids, SamplingConfig(max_new_tokens=10))
    batch = BatchGenerator(model, bank.layers)
    batch.add([("long", long_first), ("short", short_long)])
    width_with_long = batch.mask.shape[1]
    batch.step()  # the long prompt's row is done after its second token
    assert len(batch) == 1 and batch.rows[0].pad == 0
    assert batch.mask.shape[1] == len(requests[0].prompt_ids) + 1 < width_with_long
    assert torch.all(batch.mask == 1)


# ---- the model thread: what the worker's task threads wait on ----


@pytest.fixture(scope="module")
def runtime(host, tmp_path_factory):
    from auditor.db.engine import run_migrations
    from auditor.settings import Settings
    from workers.serving.context import WorkerContext

    url = f"sqlite:///{tmp_path_factory.mktemp('batching-db') / 'auditor.db'}"
    run_migrations(url)
    # Divergence flags off: they are tests/workers/test_monitoring.py's subject, and fitting them costs a minute.
    runtime = WorkerContext(
        Settings(
            database_url=url,
            data_dir=host.settings.data_dir,
            batch_max_size=8,
            batch_wait_ms=50,
            divergence_flags=False,
        )
    )
    runtime.host.__dict__["model"] = host.model  # share the session's loaded weights
    runtime.model_thread.call(runtime.bank).result()
    return runtime


def test_concurrent_requests_are_batched_and_a_bad_one_fails_alone(runtime, model):
    from concurrent.futures import wait

    from auditor.errors import InvalidInputError

    too_long = "word " * (model.max_context + 10)
    prompts = [PROMPTS[1], too_long, PROMPTS[3], PROMPTS[4]]
    futures = [runtime.model_thread.generate(p, SamplingConfig(max_new_tokens=10), chat=True) for p in prompts]
    wait(futures, timeout=300)
    assert runtime.model_thread.peak_batch == 3  # the three valid ones ran as one batch
    with pytest.raises(InvalidInputError, match="exceeds the model's context"):
        futures[1].result()
    bank = runtime.bank()
    for prompt, future in zip([prompts[0], prompts[2], prompts[3]], [futures[0], futures[2], futures[3]]):
        served = future.result()
        alone = generate(model, encode_prompt(model, prompt), SamplingConfig(max_new_tokens=10), bank.layers)
        _assert_same(alone, served.generation, bank)
        assert served.text == model.tokenizer.decode(alone.output_ids, skip_special_tokens=True)


def test_audits_from_separate_submissions_replay_together_and_a_bad_item_fails_alone(runtime, model):
    from workers.monitoring.replay import encode_replay, replay_scores

    good = [
        {"prompt": "Tell me about rain.", "completion": " Rain is water falling from clouds."},
        {"messages": [{"role": "user", "content": "Hi"}], "completion": "Hello! How can I help you today?"},
    ]
    bad = {"prompt": "x", "completion": "word " * (model.max_context + 10)}
    first = runtime.model_thread.replay([good[0], bad])
    second = runtime.model_thread.replay([good[1]])
    outcome_first, outcome_second = first.result(timeout=300), second.result(timeout=300)
    assert isinstance(outcome_first[1], Exception) and "context" in str(outcome_first[1])
    bank = runtime.bank()
    for item, outcome in ((good[0], outcome_first[0]), (good[1], outcome_second[0])):
        scores = outcome.scores
        (alone,) = replay_scores(model, bank, [encode_replay(model, item)])
        assert float((scores.aggregates.mean - alone.aggregates.mean).abs().max()) < 1e-4


def test_concurrent_task_threads_share_the_embedded_sqlite_store(runtime):
    """The embedded default: several task threads write request rows and scores into one SQLite
    file at once (this once failed with "database is locked")."""
    from concurrent.futures import ThreadPoolExecutor

    from sqlalchemy import func, select

    from auditor.db import store
    from auditor.db.models import RequestScore
    from workers.serving.generation import serve_generation

    ids = [f"chatcmpl-sqlite-{i}" for i in range(6)]
    with runtime.sessions() as session:
        for request_id in ids:
            store.create_request(session, request_id=request_id, kind="chat", prompt_text="p")
        session.commit()
    payload = {"messages": [{"role": "user", "content": "Name a colour."}], "sampling": {"max_new_tokens": 4}}
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda request_id: serve_generation(request_id, payload, runtime), ids))
    assert {r["status"] for r in results} == {"done"}
    bank = runtime.model_thread.call(runtime.bank).result()
    with runtime.sessions() as session:
        for request_id in ids:
            assert store.get_request(session, request_id=request_id).status == "done"
            n = session.scalar(
                select(func.count()).select_from(RequestScore).where(RequestScore.request_id == request_id)
            )
            assert n == len(bank.names) * len(bank.layers)


def test_per_token_traces_are_stored_when_asked_and_round_trip(runtime, bank, alone):
    from auditor.db import store
    from workers.serving.recording import score_rows

    scores = score_generation(bank, alone[1])
    bank_ids = bank.__class__(**{**bank.__dict__, "concept_ids": list(range(1, len(bank.names) + 1))})
    assert all(row["trace"] is None for row in score_rows(bank_ids, scores))  # off by default
    rows = score_rows(bank_ids, scores, traces=True)
    with runtime.sessions() as session:
        store.create_request(session, request_id="chatcmpl-traces", kind="chat", prompt_text="p")
        store.insert_scores(session, request_id="chatcmpl-traces", rows=rows)
        stored = {
            (r.concept_id, r.layer): r.trace for r in store.scores_for_request(session, request_id="chatcmpl-traces")
        }
        session.rollback()
    k, layer = bank.names.index("pessimism"), 15
    trace = store.trace_from_bytes(stored[(k + 1, layer)])
    assert trace.shape == (len(alone[1].output_ids),)
    assert torch.allclose(trace, scores.per_token[bank.layers.index(layer), :, k].float())


def test_replay_passes_keep_within_the_row_and_token_budget():
    from workers.monitoring.replay import replay_chunks

    lengths = [100, 300, 50, 2000, 10, 10, 10, 10, 10]
    chunks = replay_chunks(lengths, max_rows=4, max_tokens=1000)
    assert [i for chunk in chunks for i in chunk] == list(range(len(lengths)))  # all, in order
    for chunk in chunks:
        padded = max(lengths[i] for i in chunk) * len(chunk)
        assert len(chunk) <= 4 and (padded <= 1000 or len(chunk) == 1)
    assert [3] in chunks  # longer than the budget: alone
    assert replay_chunks([5] * 10, max_rows=4, max_tokens=10**6) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # attention: two full-length rows hold twice one row's scores, past the bound of one
    # sequence of half the budget; four quarter-length rows hold as many as one half-length row
    assert replay_chunks([8192, 8192], max_rows=16, max_tokens=16384) == [[0], [1]]
    assert replay_chunks([4096] * 4, max_rows=16, max_tokens=16384) == [[0, 1, 2, 3]]
