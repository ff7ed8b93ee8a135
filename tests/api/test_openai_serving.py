"""Generation through the OpenAI routes on the embedded default: the official `openai` client and
raw HTTP against the API with its in-process worker and the real default model, on SQLite.

Text completions the way evaluation harnesses use them: `echo` (the prompt and its tokens'
log-probabilities, `max_tokens` 0 allowed), and `prompt` as a list of texts or token-id lists,
one monitored request per prompt, answered by index.

Streaming (server-sent events): what a streaming client must be able to rely on: the streamed text is the non-streamed text, the
stored rows are the same, each chunk's running scores agree with the final ones, the stream ends
with the full `auditor` block (and usage when asked), and a client that leaves mid-stream leaves
a `cancelled` request with its scores, never one left `running`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from sqlalchemy import select

from auditor.db.engine import make_engine, run_migrations, session_factory
from auditor.db.models import MonitoredRequest, RequestScore
from auditor.settings import Settings
from support.auth import bearer, issue_token
from support.databases import Databases
from support.http_server import serving

pytestmark = pytest.mark.model

COUNT = [{"role": "user", "content": "Count from 1 to 20, one number per line."}]


@pytest.fixture(scope="module")
def service(tmp_path_factory, host) -> Iterator[dict]:
    from auditor.api.main import create_app
    from workers.serving.inprocess import InProcessDispatcher

    databases = Databases("sqlite", tmp_path_factory.mktemp("streaming"))
    url = databases.new_url()
    run_migrations(url)
    # Divergence flags off: no null of ordinary answers to fit (minutes); the scores, and the
    # plumbing these tests check, are the same. tests/service/ streams with flags on.
    settings = Settings(database_url=url, data_dir=host.settings.data_dir, divergence_flags=False, request_timeout=120)
    dispatcher = InProcessDispatcher(settings)
    dispatcher.runtime.host.__dict__["model"] = host.model  # share the session's loaded weights
    dispatcher.warm_up()
    app = create_app(settings, dispatcher)
    token = issue_token(url, scopes=["client"], name="streaming")
    engine = make_engine(url)
    try:
        with serving(app) as base_url:
            yield {
                "app": app,
                "base_url": base_url,
                "token": token,
                "sessions": session_factory(engine),
                "dispatcher": dispatcher,
                "client": openai.OpenAI(base_url=f"{base_url}/v1", api_key=token, max_retries=0, timeout=120),
            }
    finally:
        engine.dispose()
        databases.drop_all()


def _stream_chat(client, **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model="auditor", stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def _rows(service, request_id: str) -> tuple[MonitoredRequest, dict]:
    with service["sessions"]() as session:
        request = session.get(MonitoredRequest, request_id)
        scores = session.scalars(select(RequestScore).where(RequestScore.request_id == request_id)).all()
        return request, {(s.concept_id, s.layer): (s.mean, s.max, s.last, s.n_tokens) for s in scores}


def test_a_streamed_chat_is_the_non_streamed_chat_token_for_token_and_row_for_row(service):
    client = service["client"]
    plain = client.chat.completions.create(model="auditor", messages=COUNT, max_tokens=40, temperature=0)
    text, chunks = _stream_chat(
        client, messages=COUNT, max_tokens=40, temperature=0, stream_options={"include_usage": True}
    )
    assert len(text) > 20 and text == plain.choices[0].message.content
    # one chunk per token or so, not one chunk at the end
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 20
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == [plain.choices[0].finish_reason]
    # include_usage: a last chunk with usage and no choices, the same usage as non-streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    # the final auditor block is the non-streamed one (scores, flags, alerts, how it was read)
    final, expected = finish[0].model_extra["auditor"], plain.model_extra["auditor"]
    assert final["request_id"] == chunks[0].id != expected["request_id"]
    assert [final[key] for key in ("flags", "alerts", "monitor")] == [
        expected[k] for k in ("flags", "alerts", "monitor")
    ]
    assert final["scores"].keys() == expected["scores"].keys()
    for name, score in expected["scores"].items():
        for field, value in score.items():
            assert final["scores"][name][field] == (value if value is None else pytest.approx(value, abs=1e-4))
    # and the stored rows are the same, for every concept at every layer
    streamed_row, streamed_scores = _rows(service, chunks[0].id)
    plain_row, plain_scores = _rows(service, plain.id)
    assert streamed_row.status == plain_row.status == "done"
    assert streamed_row.completion_text == plain_row.completion_text == text
    assert streamed_row.completion_tokens == plain_row.completion_tokens
    assert streamed_scores.keys() == plain_scores.keys() and len(streamed_scores) > 10
    for key, values in plain_scores.items():
        assert streamed_scores[key] == pytest.approx(values, abs=1e-4)


def test_each_chunk_carries_running_scores_that_end_at_the_final_scores(service):
    _, chunks = _stream_chat(service["client"], messages=COUNT, max_tokens=24, temperature=0)
    live = [c.model_extra["auditor"] for c in chunks if c.choices and c.choices[0].delta.content]
    assert [r["tokens"] for r in live] == sorted({r["tokens"] for r in live})  # strictly growing
    final = next(c for c in chunks if c.choices and c.choices[0].finish_reason).model_extra["auditor"]
    assert live[-1]["tokens"] == final["monitor"]["tokens"] == 24  # every token was streamed live
    for name, score in final["scores"].items():
        assert live[-1]["scores"][name]["layer"] == score["layer"]
        assert live[-1]["scores"][name]["mean"] == pytest.approx(score["mean"], abs=1e-4)
        assert live[-1]["scores"][name]["last"] == pytest.approx(score["last"], abs=1e-4)
        assert live[0]["scores"][name]["mean"] == pytest.approx(live[0]["scores"][name]["last"], abs=1e-5)
    # a request naming concepts sees only those, live and at the end
    _, chunks = _stream_chat(
        service["client"],
        messages=COUNT,
        max_tokens=6,
        temperature=0,
        extra_body={"auditor": {"concepts": ["pessimism"]}},
    )
    assert {tuple(c.model_extra["auditor"]["scores"]) for c in chunks if c.model_extra.get("auditor")} == {
        ("pessimism",)
    }


def test_a_streamed_stop_sequence_never_sends_the_stop_or_anything_after_it(service):
    client = service["client"]
    plain = client.chat.completions.create(model="auditor", messages=COUNT, max_tokens=60, temperature=0, stop=["7"])
    text, chunks = _stream_chat(client, messages=COUNT, max_tokens=60, temperature=0, stop=["7"])
    assert text == plain.choices[0].message.content and "7" not in text and "6" in text
    assert next(c for c in chunks if c.choices and c.choices[0].finish_reason).choices[0].finish_reason == "stop"


def test_a_streamed_text_completion_with_logprobs_is_the_non_streamed_one(service):
    client = service["client"]
    args = {"model": "auditor", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    plain = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, **args))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    expected = plain.choices[0].logprobs
    assert [t for lp in streamed for t in lp.tokens] == expected.tokens
    assert [o for lp in streamed for o in lp.text_offset] == expected.text_offset
    assert [v for lp in streamed for v in lp.token_logprobs] == pytest.approx(expected.token_logprobs, abs=1e-4)
    assert [t for lp in streamed for t in lp.top_logprobs] == [
        pytest.approx(top, abs=1e-4) for top in expected.top_logprobs
    ]


def test_the_wire_format_is_server_sent_events_ending_in_done(service):
    body = {"model": "auditor", "messages": COUNT, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.Client(base_url=service["base_url"], headers=bearer(service["token"]), timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = response.read().decode()
    events = [block for block in raw.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(block[len("data: ") :]) for block in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1


def _wait_for_status(service, request_id: str, timeout: float = 60) -> MonitoredRequest:
    deadline = time.monotonic() + timeout
    while True:
        request, scores = _rows(service, request_id)
        if request.status not in ("queued", "running"):
            return request, scores
        assert time.monotonic() < deadline, f"{request_id} still {request.status}"
        time.sleep(0.1)


def test_a_client_that_leaves_mid_stream_leaves_a_cancelled_request_with_its_scores(service):
    body = {"model": "auditor", "messages": COUNT, "max_tokens": 400, "temperature": 0, "stream": True}
    in_flight = service["app"].state.in_flight
    with httpx.Client(base_url=service["base_url"], headers=bearer(service["token"]), timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            seen = 0
            for line in lines:
                seen += line.startswith("data: ")
                if seen >= 5:
                    break
            assert in_flight.count == 1  # the stream holds its admission while it runs
        # leaving the `with` closes the connection mid-stream
    request, scores = _wait_for_status(service, first["id"])
    assert request.status == "cancelled" and request.finish_reason == "cancelled"
    assert 5 <= request.completion_tokens < 400  # stopped soon after the client left, not at the end
    assert request.completion_text and request.finished_at is not None
    assert scores and {n for *_, n in scores.values()} == {request.completion_tokens}
    deadline = time.monotonic() + 10
    while in_flight.count:  # the admission is released when the stream ends, however it ends
        assert time.monotonic() < deadline, "the stream's admission was never released"
        time.sleep(0.05)
    assert not service["dispatcher"].streams._streams  # and its channel is gone


def test_a_failure_mid_stream_is_an_error_chunk_and_a_failed_request(service, monkeypatch):
    from workers.serving import streaming

    original = streaming.LiveAnswer.update

    def fail_after_three(self, bank, progress):
        if len(progress.output_ids) > 3:
            raise RuntimeError("the stream broke")
        return original(self, bank, progress)

    monkeypatch.setattr(streaming.LiveAnswer, "update", fail_after_three)
    stream = service["client"].chat.completions.create(
        model="auditor", messages=COUNT, max_tokens=60, temperature=0, stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="the stream broke"):
        for chunk in stream:
            received.append(chunk)
    assert received and received[0].id.startswith("chatcmpl-")
    request, _ = _wait_for_status(service, received[0].id)
    assert request.status == "failed" and "the stream broke" in request.error


def test_stream_options_without_stream_or_unknown_ones_are_a_400(service):
    client = service["client"]
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        client.chat.completions.create(model="auditor", messages=COUNT, stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match="continuous_usage_stats"):
        client.chat.completions.create(
            model="auditor", messages=COUNT, stream=True, stream_options={"continuous_usage_stats": True}
        )


PROMPT = "The capital of France is"


def test_echo_returns_the_prompt_and_its_tokens_log_probabilities_before_the_answer(service, host):
    import torch

    client = service["client"]
    plain = client.completions.create(model="auditor", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    echoed = client.completions.create(
        model="auditor", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2, echo=True
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    lp, prompt_ids = echoed.choices[0].logprobs, host.model.tokenizer(PROMPT).input_ids
    assert len(lp.tokens) == len(prompt_ids) + plain.usage.completion_tokens
    assert "".join(lp.tokens) == echoed.choices[0].text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[len(prompt_ids)] == len(PROMPT)
    # the prompt's log-probabilities are the model's own, from one plain forward pass
    with torch.no_grad():
        expected = host.model.hf_model(torch.tensor([prompt_ids])).logits[0].log_softmax(-1)
    for i in range(1, len(prompt_ids)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, prompt_ids[i]].item(), abs=1e-3)
        assert len(lp.top_logprobs[i]) == 2
        assert max(lp.top_logprobs[i].values()) == pytest.approx(expected[i - 1].max().item(), abs=1e-3)
    # and the answer's part is the non-echoed answer's
    assert lp.token_logprobs[len(prompt_ids) :] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert echoed.usage.model_dump() == plain.usage.model_dump()


def test_max_tokens_zero_with_echo_reads_the_prompt_only_and_records_no_scores(service, host):
    answer = service["client"].completions.create(
        model="auditor", prompt=PROMPT, max_tokens=0, temperature=0, logprobs=1, echo=True
    )
    prompt_ids = host.model.tokenizer(PROMPT).input_ids
    assert answer.choices[0].text == PROMPT and answer.usage.completion_tokens == 0
    assert answer.usage.prompt_tokens == len(prompt_ids) == len(answer.choices[0].logprobs.tokens)
    assert answer.model_extra["auditor"]["monitor"]["status"] == "insufficient_tokens"
    request, scores = _rows(service, answer.id)
    assert request.status == "done" and request.completion_tokens == 0 and request.completion_text == ""
    assert scores == {}  # nothing was generated, so nothing was read


def test_a_list_of_prompts_is_one_request_each_answered_by_index(service, host):
    client = service["client"]
    prompts = [PROMPT, "Two plus two is", "The opposite of hot is"]
    alone = [
        client.completions.create(model="auditor", prompt=p, max_tokens=5, temperature=0).choices[0].text
        for p in prompts
    ]
    batch = client.completions.create(model="auditor", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.text for c in batch.choices] == alone
    ids = [c.model_extra["auditor"]["request_id"] for c in batch.choices]
    assert ids == [f"{batch.id}-{i}" for i in range(3)] and batch.model_extra["auditor"]["request_id"] == ids[0]
    for request_id in ids:
        request, scores = _rows(service, request_id)
        assert request.status == "done" and request.completion_tokens == 5 and scores
    assert batch.usage.completion_tokens == 15
    # token ids are the same prompts
    token_ids = [host.model.tokenizer(p).input_ids for p in prompts]
    by_ids = client.completions.create(model="auditor", prompt=token_ids, max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == alone
    one = client.completions.create(model="auditor", prompt=token_ids[0], max_tokens=5, temperature=0, echo=True)
    assert one.choices[0].text == PROMPT + alone[0]


def test_bad_prompts_are_a_clear_4xx(service):
    client = service["client"]
    with pytest.raises(openai.UnprocessableEntityError, match="at most 64 prompts"):
        client.completions.create(model="auditor", prompt=["x"] * 65, max_tokens=1)
    with pytest.raises(openai.UnprocessableEntityError, match="not in the model.s vocabulary"):
        client.completions.create(model="auditor", prompt=[1, 2, 10**9], max_tokens=1)


def test_a_request_the_api_stops_waiting_for_is_cancelled_in_the_worker(service):
    """The API's timeout ends the wait with a 503; the worker is told, stops the generation and
    records it `cancelled` with what it had, instead of running on for nobody."""
    from auditor.api.main import create_app

    settings = service["app"].state.settings.model_copy(update={"request_timeout": 1.0})
    impatient = create_app(settings, service["dispatcher"])
    with serving(impatient) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=service["token"], max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as gave_up:
            client.chat.completions.create(model="auditor", messages=COUNT, max_tokens=1000, temperature=0)
    assert gave_up.value.status_code == 503
    with service["sessions"]() as session:
        request_id = session.scalars(
            select(MonitoredRequest.id).order_by(MonitoredRequest.created_at.desc()).limit(1)
        ).one()
    request, scores = _wait_for_status(service, request_id)
    assert request.status == "cancelled" and 0 < request.completion_tokens < 1000
    assert scores  # what it had was scored and stored


def test_a_retry_with_the_same_idempotency_key_is_the_same_request(service):
    from sqlalchemy import func

    client = service["client"]

    def count_rows() -> int:
        with service["sessions"]() as session:
            return session.scalar(select(func.count()).select_from(MonitoredRequest))

    before = count_rows()
    key = {"Idempotency-Key": "retry-7f3a"}
    first = client.chat.completions.create(model="auditor", messages=COUNT, max_tokens=6, extra_headers=key)
    again = client.chat.completions.create(model="auditor", messages=COUNT, max_tokens=6, extra_headers=key)
    assert again.id == first.id and again.choices[0].message.content == first.choices[0].message.content
    assert again.model_extra["auditor"]["scores"] == first.model_extra["auditor"]["scores"]  # the recorded answer
    assert count_rows() == before + 1  # one request, not two
    with pytest.raises(openai.UnprocessableEntityError, match="used for a different request"):
        client.chat.completions.create(model="auditor", messages=COUNT, max_tokens=7, extra_headers=key)
    # per token and per route: the same key on text completions is another request
    other = client.completions.create(model="auditor", prompt=["a", "b"], max_tokens=2, extra_headers=key)
    repeat = client.completions.create(model="auditor", prompt=["a", "b"], max_tokens=2, extra_headers=key)
    assert [c.model_extra["auditor"]["request_id"] for c in repeat.choices] == [
        c.model_extra["auditor"]["request_id"] for c in other.choices
    ]
    assert count_rows() == before + 3
    # audits: the same ids, queued once
    with httpx.Client(base_url=service["base_url"], headers=bearer(service["token"]), timeout=60) as http:
        body = {"items": [{"prompt": "Say hi.", "completion": "Hi there, nice to meet you."}]}
        submitted = http.post("/v1/audits", json=body, headers={"Idempotency-Key": "audit-1"})
        resubmitted = http.post("/v1/audits", json=body, headers={"Idempotency-Key": "audit-1"})
        assert submitted.status_code == resubmitted.status_code == 202
        assert submitted.json()["ids"] == resubmitted.json()["ids"]
        assert (
            http.post(
                "/v1/audits", json={"items": body["items"] * 2}, headers={"Idempotency-Key": "audit-1"}
            ).status_code
            == 422
        )
    assert count_rows() == before + 4
