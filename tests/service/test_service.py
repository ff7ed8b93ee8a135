"""Service tier: the API over real HTTP, a real `auditor worker` (Celery) process on real Redis,
real Postgres, and the official `openai` client."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC

import httpx
import pytest
import torch
from sqlalchemy import func, select

from auditor.db.engine import make_engine, session_factory
from auditor.db.models import MonitoredRequest, RequestScore
from auditor.settings import Settings
from support.auth import bearer
from support.worker_stack import worker_stack

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def service(tmp_path_factory, data_dir, bank) -> Iterator[dict]:
    """API + one worker process. `bank` first: the worker then reuses this session's extraction
    cache (same data dir) instead of extracting again."""
    env = {
        # Short control answers, and only as many as a 1 % promise needs (230): these tests
        # check plumbing, not flag quality (tests/workers/test_monitoring.py fits the full set).
        "AUDITOR_CONTROL_MAX_TOKENS": "8",
        "AUDITOR_CONTROL_LIMIT": "240",
    }
    with worker_stack(tmp_path_factory, data_dir, env, request_timeout=300) as stack:
        with httpx.Client(base_url=stack.base_url, headers=bearer(stack.token), timeout=30) as http:
            yield {
                "base_url": stack.base_url,
                "db_url": stack.db_url,
                "app": stack.app,
                "http": http,
                "token": stack.token,
                "worker_metrics": stack.worker_metrics,
            }


@pytest.fixture(scope="module")
def client(service):
    from openai import OpenAI

    return OpenAI(base_url=service["base_url"] + "/v1", api_key=service["token"], max_retries=0, timeout=300)


def test_openai_client_chat_completion_is_answered_and_scored_in_postgres(service, client, host, bank):
    from workers.runtime.generate import SamplingConfig

    messages = [{"role": "user", "content": "What should I pack for a weekend trip to the coast?"}]
    response = client.chat.completions.create(model="auditor", messages=messages, max_tokens=16, temperature=0)
    text = response.choices[0].message.content
    auditor = response.model_extra["auditor"]
    assert text and auditor["request_id"] == response.id
    assert response.usage.completion_tokens == 16 or response.choices[0].finish_reason == "stop"

    sessions = session_factory(make_engine(service["db_url"]))
    with sessions() as session:
        row = session.get(MonitoredRequest, response.id)
        assert row.status == "done" and row.completion_text == text
        assert row.completion_tokens == response.usage.completion_tokens
        n_rows = session.scalar(
            select(func.count()).select_from(RequestScore).where(RequestScore.request_id == response.id)
        )
        scores = {
            (s.layer, s.concept_id): s
            for s in session.scalars(select(RequestScore).where(RequestScore.request_id == response.id))
        }
    assert n_rows == len(bank.names) * len(bank.layers)

    # The same request monitored inline, in this process, gives the same tokens and scores.
    inline = host.generate(messages, SamplingConfig(max_new_tokens=16), bank=bank)
    assert inline.text == text
    pessimism = auditor["scores"]["pessimism"]
    assert pessimism["mean"] == pytest.approx(inline.scores.at("pessimism", pessimism["layer"])["mean"], abs=1e-4)
    layer_means = sorted(s.mean for (layer, _), s in scores.items() if layer == pessimism["layer"])
    assert any(abs(m - pessimism["mean"]) < 1e-4 for m in layer_means)


def test_plain_completion_reads_the_prompt_as_raw_text(client, bank):
    response = client.completions.create(
        model="auditor", prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert "Paris" in response.choices[0].text
    auditor = response.model_extra["auditor"]
    # The control answers are chat answers: a raw continuation is not read against them (no z,
    # no flag, no alert) rather than read wrongly; its scores against neutral text remain.
    assert auditor["monitor"]["status"] == "no_reference" and auditor["monitor"]["tokens"] == 5
    pessimism = auditor["scores"]["pessimism"]
    # Read at the concept's own layer (the one the registered extraction chose), as chat answers are.
    assert pessimism["layer"] == bank.auto_layers["pessimism"]
    assert pessimism["z"] is None and pessimism["neutral_z"] is not None
    assert auditor["flags"] == [] and auditor["alerts"] == []


def test_a_chat_answer_is_read_against_ordinary_answers(client):
    response = client.chat.completions.create(
        model="auditor",
        max_tokens=12,
        temperature=0,
        messages=[{"role": "user", "content": "How do I keep basil fresh?"}],
    )
    auditor = response.model_extra["auditor"]
    assert auditor["monitor"]["status"] == "ok" and auditor["monitor"]["tokens"] == response.usage.completion_tokens
    assert auditor["monitor"]["reference"] == "ordinary answers of the same length"
    pessimism = auditor["scores"]["pessimism"]
    # Two references, named apart: z against ordinary answers, neutral_z against neutral text.
    assert pessimism["z"] is not None and pessimism["neutral_z"] is not None
    assert pessimism["z"] != pessimism["neutral_z"] and 0 <= pessimism["percentile"] <= 1


def test_a_one_token_answer_is_marked_insufficient_and_never_flagged(service, client):
    response = client.chat.completions.create(
        model="auditor", max_tokens=1, temperature=0, messages=[{"role": "user", "content": "Say one word."}]
    )
    auditor = response.model_extra["auditor"]
    assert auditor["monitor"]["status"] == "insufficient_tokens"
    assert auditor["flags"] == [] and auditor["alerts"] == []
    sessions = session_factory(make_engine(service["db_url"]))
    with sessions() as session:
        row = session.get(MonitoredRequest, response.id)
    assert row.monitor_status == "insufficient_tokens"


def test_a_stop_sequence_ends_the_answer_and_only_the_returned_tokens_are_scored(service, client):
    response = client.chat.completions.create(
        model="auditor",
        max_tokens=40,
        temperature=0,
        stop=["5"],
        messages=[{"role": "user", "content": "Count from 1 to 10, separated by commas. Reply with the numbers only."}],
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and "5" not in choice.message.content and "4" in choice.message.content
    assert choice.message.refusal is None  # required (nullable) by OpenAI's schema
    n_tokens = response.usage.completion_tokens
    assert response.model_extra["auditor"]["monitor"]["tokens"] == n_tokens
    sessions = session_factory(make_engine(service["db_url"]))
    with sessions() as session:
        row = session.get(MonitoredRequest, response.id)
        stored_tokens = set(session.scalars(select(RequestScore.n_tokens).where(RequestScore.request_id == row.id)))
    assert row.completion_text == choice.message.content and row.finish_reason == "stop"
    assert row.completion_tokens == n_tokens and stored_tokens == {n_tokens}


def test_log_probabilities_in_both_shapes(client):
    """Chat: one entry per returned token with its top alternatives; completions: the legacy
    parallel lists. Greedy, so each chosen token is its step's most likely one."""
    chat = client.chat.completions.create(
        model="auditor",
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        messages=[{"role": "user", "content": "Name three colours."}],
    )
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens
    assert "".join(e.token for e in entries).strip() == chat.choices[0].message.content.strip()
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-6
    plain = client.chat.completions.create(
        model="auditor", max_tokens=4, temperature=0, messages=[{"role": "user", "content": "Hi"}]
    )
    assert plain.choices[0].logprobs is None

    text = client.completions.create(model="auditor", prompt="The sky is", max_tokens=6, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == text.usage.completion_tokens
    assert "".join(lp.tokens) == text.choices[0].text
    assert lp.text_offset[0] == 0 and all(b > a for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    assert all(max(top, key=top.get) == token for token, top in zip(lp.tokens, lp.top_logprobs))


def test_unknown_model_gets_a_clear_404(client):
    import openai

    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert "unknown model 'gpt-4o'" in str(missing.value)


COUNT = [{"role": "user", "content": "Count from 1 to 20, one number per line."}]


def test_a_stream_through_the_worker_on_redis_is_the_non_streamed_answer(service, client):
    """Tokens go worker -> Redis stream -> API as they are generated; the answer, its flags and
    its stored rows are those of the same request not streamed."""
    plain = client.chat.completions.create(model="auditor", messages=COUNT, max_tokens=32, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="auditor",
            messages=COUNT,
            max_tokens=32,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) > 20 and text == plain.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 16  # token by token
    final, expected = chunks[-1].model_extra["auditor"], plain.model_extra["auditor"]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 32
    assert final["monitor"] == expected["monitor"] and final["monitor"]["status"] == "ok"  # read with flags on
    assert [f["concept"] for f in final["flags"]] == [f["concept"] for f in expected["flags"]]
    engine = make_engine(service["db_url"])
    try:
        with session_factory(engine)() as session:
            rows = {
                rid: {
                    (s.concept_id, s.layer): s.mean
                    for s in session.scalars(select(RequestScore).where(RequestScore.request_id == rid))
                }
                for rid in (plain.id, chunks[0].id)
            }
            assert session.get(MonitoredRequest, chunks[0].id).status == "done"
    finally:
        engine.dispose()
    assert rows[plain.id].keys() == rows[chunks[0].id].keys() and rows[plain.id]
    for key, mean in rows[plain.id].items():
        assert rows[chunks[0].id][key] == pytest.approx(mean, abs=1e-4)


def test_a_client_leaving_a_stream_on_redis_leaves_a_cancelled_request_in_postgres(service):
    body = {"model": "auditor", "messages": COUNT, "max_tokens": 400, "temperature": 0, "stream": True}
    with service["http"].stream("POST", "/v1/chat/completions", json=body) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        request_id = json.loads(next(lines)[6:])["id"]
        for _ in range(4):
            next(lines)
    request, n_scores = _settled(service["db_url"], request_id)
    assert request.status == "cancelled" and 4 <= request.completion_tokens < 400
    assert n_scores > 0


def _settled(db_url: str, request_id: str | None = None, timeout: float = 60) -> tuple[MonitoredRequest, int]:
    """The request (the newest one when no id is given) once it is no longer queued or running,
    and how many score rows it has."""
    engine = make_engine(db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with session_factory(engine)() as session:
                newest = select(MonitoredRequest).order_by(MonitoredRequest.created_at.desc()).limit(1)
                request = session.get(MonitoredRequest, request_id) if request_id else session.scalars(newest).one()
                n_scores = session.scalar(
                    select(func.count()).select_from(RequestScore).where(RequestScore.request_id == request.id)
                )
            if request.status not in ("queued", "running"):
                return request, n_scores
            assert time.monotonic() < deadline, f"{request.id} still {request.status} after {timeout:.0f}s"
            time.sleep(0.2)
    finally:
        engine.dispose()


def test_a_vector_registered_through_the_api_is_monitored_from_the_next_request(service, client, bank):
    import numpy as np

    from auditor.db.models import Concept

    direction = bank.vectors["pessimism"].direction(15).numpy()
    created = service["http"].post(
        "/admin/concepts", json={"name": "uploaded_gloom", "layer": 15, "vector": direction.tolist()}, timeout=30
    )
    assert created.status_code == 201, created.text
    concept_id = created.json()["id"]
    response = client.chat.completions.create(
        model="auditor", messages=[{"role": "user", "content": "Tell me about rain."}], max_tokens=8, temperature=0
    )
    assert "uploaded_gloom" in response.model_extra["auditor"]["scores"]
    sessions = session_factory(make_engine(service["db_url"]))
    with sessions() as session:
        rows = list(
            session.scalars(
                select(RequestScore).where(
                    RequestScore.request_id == response.id, RequestScore.concept_id == concept_id
                )
            )
        )
        builtin_id = session.scalar(select(Concept.id).where(Concept.name == "pessimism"))
        twin = session.get(RequestScore, (response.id, builtin_id, 15))
    assert [r.layer for r in rows] == [15]  # only the layer it has a vector for
    assert rows[0].mean == pytest.approx(twin.mean, abs=1e-5)  # same direction, same score
    assert np.isfinite(rows[0].calibrated_z)


def test_an_audit_of_an_external_completion_scores_like_inline_monitoring(service, host, bank):

    from workers.runtime.generate import SamplingConfig

    messages = [{"role": "user", "content": "Describe a rainy Monday morning commute."}]
    inline = host.generate(messages, SamplingConfig(max_new_tokens=14, stop_at_eos=False), bank=bank)
    completion_ids = host.model.tokenizer(inline.text, add_special_tokens=False)["input_ids"]
    assert completion_ids == inline.generation.output_ids  # the text re-tokenises to the same tokens
    submitted = service["http"].post(
        "/v1/audits",
        timeout=30,
        json={
            "items": [
                {"messages": messages, "completion": inline.text},
                {"prompt": "Plain text prompt:", "completion": " something else entirely"},
            ]
        },
    )
    assert submitted.status_code == 202, submitted.text
    audit_id = submitted.json()["ids"][0]
    deadline = time.monotonic() + 180
    while (audit := service["http"].get(f"/v1/audits/{audit_id}", timeout=30).json())["status"] != "done":
        assert audit["status"] in ("queued", "running"), audit
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert audit["completion_tokens"] == 14
    by_key = {(s["concept"], s["layer"]): s for s in audit["scores"]}
    for name in ("pessimism", "formality", "urgency"):
        for layer in (5, 15, 25):
            expected = inline.scores.at(name, layer)
            got = by_key[(name, layer)]
            assert got["mean"] == pytest.approx(expected["mean"], abs=1e-4)
            assert got["last"] == pytest.approx(expected["last"], abs=1e-4)
    missing = service["http"].get("/v1/audits/audit-nope", timeout=30)
    assert missing.status_code == 404
    bad = service["http"].post("/v1/audits", timeout=30, json={"items": [{"completion": "no prompt"}]})
    assert bad.status_code == 422 and "either `prompt` or `messages`" in bad.text


def test_readiness_sees_the_database_the_broker_and_a_live_worker(service):

    ready = httpx.get(service["base_url"] + "/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["database"] == "ok" and checks["broker"] == "ok" and checks["workers"] == "ok (1 ready of 1 live)"


def test_a_request_for_an_unknown_concept_gets_a_clear_4xx(client):
    import openai

    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model="auditor",
            messages=messages,
            max_tokens=2,
            extra_body={"auditor": {"concepts": ["pessimism", "no_such_concept"]}},
        )
    assert "no_such_concept" in str(missing.value) and "active concepts: " in str(missing.value)
    only = client.chat.completions.create(
        model="auditor",
        messages=messages,
        max_tokens=2,
        temperature=0,
        extra_body={"auditor": {"concepts": ["pessimism"]}},
    )
    assert list(only.model_extra["auditor"]["scores"]) == ["pessimism"]


def _wait_for_job(http, accepted, timeout: float = 300) -> dict:

    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["Location"] == accepted.json()["poll"]
    deadline = time.monotonic() + timeout
    while (job := http.get(accepted.json()["poll"]).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    return job


def test_extraction_from_pairs_runs_as_a_job_and_registers_what_in_process_extraction_gives(service, client, host):

    from probes.concepts import ConceptDefinition, load_concept

    pessimism = load_concept("pessimism")
    pairs = [{"positive": p, "negative": n} for p, n in zip(pessimism.positives[:24], pessimism.negatives[:24])]
    body = {"name": "gloom_from_pairs", "description": "24 pessimism pairs", "pairs": pairs, "method": "mean_diff"}
    job = _wait_for_job(service["http"], service["http"].post("/admin/concepts/extract", json=body, timeout=30))
    assert job["status"] == "done" and job["kind"] == "extract", job
    result = job["result"]
    assert result["n_pairs"] == 24 and not result["reused"]
    assert result["held_out_auroc"] > 0.8  # pessimism pairs separate well even from 24
    assert 0.25 * 30 <= result["primary_layer"] <= 0.75 * 30

    concept = service["http"].get(f"/admin/concepts/{result['concept_id']}", timeout=30).json()
    assert (concept["method"], concept["source"], concept["n_pairs"]) == ("mean_diff", "pairs", 24)
    exported = service["http"].get(f"/admin/concepts/{result['concept_id']}/export", timeout=30).json()
    worker_vector = torch.tensor(exported["vectors"][str(result["primary_layer"])])
    definition = ConceptDefinition("gloom_from_pairs", "", pessimism.positives[:24], pessimism.negatives[:24])
    local = host.vectors(definition, method="mean_diff")
    assert local.auto_layer == result["primary_layer"]
    assert (
        float(torch.nn.functional.cosine_similarity(worker_vector, local.direction(result["primary_layer"]), dim=0))
        > 0.999
    )

    again = _wait_for_job(service["http"], service["http"].post("/admin/concepts/extract", json=body, timeout=30))
    assert (
        again["result"]["reused"] and again["result"]["concept_id"] == result["concept_id"]
    )  # same pairs: no new version
    response = client.chat.completions.create(
        model="auditor", messages=[{"role": "user", "content": "How was your week?"}], max_tokens=4, temperature=0
    )
    assert "gloom_from_pairs" in response.model_extra["auditor"]["scores"]


def test_calibration_job_stores_thresholds_that_a_new_worker_process_reuses(service, host):

    from workers.serving.context import WorkerContext
    from workers.serving.registry import bank_from_registry, load_stored_calibration, reference_hash

    http = service["http"]
    job = _wait_for_job(http, http.post("/admin/calibrations", json={"target_fpr": 0.05}, timeout=30))
    assert job["status"] == "done", job
    result = job["result"]
    assert result["target_fpr"] == 0.05 and result["n_reference"] > 100
    for name, row in result["concepts"].items():
        assert 0 < row["neutral_achieved_fpr"] <= 0.05, (name, row)
    # The null of ordinary answers, refitted at the same target: its own answers within it.
    assert result["source"] == "control" and result["n_answers"] >= 230
    assert result["divergence_achieved_fpr"] <= 0.05 and result["alert_achieved_fpr"] <= 0.05
    answers = http.get("/admin/calibrations/answers").json()
    assert answers[0]["id"] == result["answer_calibration_id"] and answers[0]["in_force"]
    assert (
        answers[0]["target_fpr"] == 0.05 and answers[0]["divergence_upper_95"] > answers[0]["divergence_achieved_fpr"]
    )
    listed = {row["concept"]: row for row in http.get("/admin/calibrations").json()}
    assert set(listed) >= {"pessimism", "formality", "gloom_from_pairs"}
    assert listed["pessimism"]["threshold"] == pytest.approx(result["concepts"]["pessimism"]["neutral_threshold"])
    assert listed["pessimism"]["target_fpr"] == 0.05 and listed["pessimism"]["primary"]

    # A fresh process reads the stored calibration back instead of recomputing it, and it is
    # the calibration this process computes itself on the same model and texts.
    runtime = WorkerContext(Settings(database_url=service["db_url"], data_dir=host.settings.data_dir))
    runtime.host.__dict__["model"] = host.model  # share the loaded weights; not the point here
    with runtime.sessions() as session:
        bank = bank_from_registry(session, runtime.host)
        assert load_stored_calibration(session, bank, reference_hash(runtime.reference_texts))
    k, li = bank.names.index("pessimism"), bank.layers.index(15)
    local = host.bank()
    assert float(bank.calibration.mean[li, k]) == pytest.approx(
        float(local.calibration.mean[li, local.names.index("pessimism")]), abs=1e-5
    )
    assert bank.typical_norms[15] == pytest.approx(local.typical_norms[15], rel=1e-4)


def test_recalibration_from_recorded_traffic_replays_the_window_and_is_read_from_then_on(service, client):
    """POST /admin/calibrations with source=traffic: the answers recorded in the window (here
    planted as rows, as the API records them in full mode) are replayed and become the null."""
    from datetime import datetime, timedelta

    from auditor.db import store

    http = service["http"]
    now = datetime.now(UTC)
    since = (now - timedelta(hours=2)).isoformat()
    too_few = http.post(
        "/admin/calibrations", json={"source": "traffic", "since": since, "target_fpr": 0.05}, timeout=30
    )
    assert too_few.status_code == 422 and "needs at least 45" in too_few.text, too_few.text
    assert http.post("/admin/calibrations", json={"source": "traffic"}, timeout=30).status_code == 422  # no window

    fingerprint = http.get("/v1/model").json()["fingerprint"]
    sessions = session_factory(make_engine(service["db_url"]))
    with sessions() as session:
        for i in range(60):
            messages = [{"role": "user", "content": f"Give me tip number {i} for a tidy desk."}]
            request_id = f"chatcmpl-traffic-{i}"
            store.create_request(
                session,
                request_id=request_id,
                kind="chat",
                prompt_text=messages[0]["content"],
                params={"messages": messages},
                model_fingerprint=fingerprint,
                created_at=now - timedelta(minutes=90 - i),
            )
            store.mark_request(session, request_id=request_id, status="running")
            store.mark_request(
                session,
                request_id=request_id,
                status="done",
                finish_reason="length",
                completion_text=f"Keep only what you use every day, and put item {i} away.",
            )
        session.commit()
    job = _wait_for_job(
        http,
        http.post("/admin/calibrations", json={"source": "traffic", "since": since, "target_fpr": 0.05}, timeout=30),
    )
    assert job["status"] == "done", job
    assert job["result"]["source"] == "traffic" and job["result"]["n_answers"] >= 60
    newest = http.get("/admin/calibrations/answers").json()[0]
    assert newest["source"] == "traffic" and newest["in_force"] and newest["window_start"] is not None
    # Answers are read against it from the next request on: the thresholds it stored apply.
    response = client.chat.completions.create(
        model="auditor",
        max_tokens=6,
        temperature=0,
        messages=[{"role": "user", "content": "Give me a tip for a tidy desk."}],
    )
    monitor = response.model_extra["auditor"]["monitor"]
    assert monitor["status"] == "ok" and monitor["target_fpr"] == 0.05
    # Put the control-answer null back for the tests after this one.
    assert _wait_for_job(http, http.post("/admin/calibrations", json={}, timeout=30))["status"] == "done"


def test_worker_and_api_export_prometheus_metrics_for_real_traffic(service, client):
    from prometheus_client.parser import text_string_to_metric_families

    def samples(url: str) -> dict:
        text = httpx.get(url, timeout=30).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(found: dict, name: str, **labels) -> float:
        return sum(v for (n, ls), v in found.items() if n == name and labels.items() <= dict(ls).items())

    before = samples(service["worker_metrics"])
    # Long enough to be read against ordinary answers (shorter ones are insufficient_tokens: unobserved).
    client.chat.completions.create(
        model="auditor",
        messages=[{"role": "user", "content": "Describe the sea in two sentences."}],
        max_tokens=8,
        temperature=0,
    )
    after = samples(service["worker_metrics"])
    assert (
        value(after, "auditor_requests_total", kind="chat", status="done")
        == value(before, "auditor_requests_total", kind="chat", status="done") + 1
    )
    assert (
        value(after, "auditor_concept_score_count", concept="pessimism")
        == value(before, "auditor_concept_score_count", concept="pessimism") + 1
    )
    assert (
        value(after, "auditor_tokens_total", direction="completion")
        >= value(before, "auditor_tokens_total", direction="completion") + 1
    )
    assert value(after, "auditor_worker_up") == 1 and value(after, "auditor_model_load_seconds") > 0
    assert all("request" not in dict(labels) for (_, labels) in after)  # bounded labels only
    api = samples(service["base_url"] + "/metrics")
    assert value(api, "auditor_queue_depth", queue="celery") == 0  # nothing waiting now


def test_a_request_the_api_gives_up_on_is_cancelled_in_the_worker_on_redis(service):
    """An API whose timeout is 2 s, in front of the same worker: the 503 comes at the timeout,
    and the worker stops the generation and records it `cancelled` (the cancel mark goes through
    Redis), instead of generating 1,000 tokens for nobody."""
    from openai import InternalServerError, OpenAI

    from auditor.api.main import create_app
    from support.http_server import serving

    settings = service["app"].state.settings.model_copy(update={"request_timeout": 2.0})
    with serving(create_app(settings)) as base_url:
        client = OpenAI(base_url=base_url + "/v1", api_key=service["token"], max_retries=0, timeout=60)
        with pytest.raises(InternalServerError):
            client.chat.completions.create(model="auditor", messages=COUNT, max_tokens=1000, temperature=0)
    request, _ = _settled(service["db_url"])
    assert request.status == "cancelled" and 0 < request.completion_tokens < 1000
