"""The OpenAI surface real clients touch before they generate anything: the model list, and
parameters this deployment cannot honour refused with a 400 naming them (never ignored).
The official `openai` client, over real HTTP, on SQLite; no worker is needed for either."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from auditor.api.main import create_app
from auditor.db.engine import run_migrations
from auditor.model_identity import describe_model
from auditor.settings import Settings
from support.auth import issue_token
from support.databases import Databases
from support.http_server import serving

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[openai.OpenAI]:
    databases = Databases("sqlite", tmp_path_factory.mktemp("openai-protocol"))
    url = databases.new_url()
    run_migrations(url)
    app = create_app(Settings(database_url=url, data_dir=tmp_path_factory.mktemp("data")))
    token = issue_token(url, scopes=["client"], name="openai-protocol")
    with serving(app) as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=token, max_retries=0)
        client.db_url = url  # for the checks that nothing was written
        yield client
    databases.drop_all()


def _request_rows(client) -> int:
    from sqlalchemy import func, select

    from auditor.db.engine import make_engine, session_factory
    from auditor.db.models import MonitoredRequest

    engine = make_engine(client.db_url)
    try:
        with session_factory(engine)() as session:
            return session.scalar(select(func.count()).select_from(MonitoredRequest))
    finally:
        engine.dispose()


def test_the_model_list_names_the_served_model_by_the_id_responses_report(client):
    served = describe_model("smollm2").model_id
    models = client.models.list()
    assert [m.id for m in models.data] == [served]
    assert models.data[0].object == "model" and models.data[0].owned_by == "auditor"
    assert isinstance(models.data[0].created, int) and models.data[0].created > 0
    assert client.models.retrieve(served).id == served
    assert client.models.retrieve("auditor").id == served  # the alias requests may use
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert "unknown model 'gpt-4o'" in str(missing.value)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1.0}, "frequency_penalty"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"extra_body": {"repetition_penalty": 1.2}}, "repetition_penalty"),
        ({"extra_body": {"temprature": 0}}, "temprature"),  # a typo is named, not ignored
    ],
)
def test_a_chat_parameter_that_cannot_be_honoured_is_a_400_naming_it(client, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="auditor", messages=MESSAGES, max_tokens=4, **extra)
    error = refused.value.body
    assert error["param"] == param and error["code"] == "unsupported_parameter", error
    assert error["message"].startswith(f"{param}:"), error


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True, "stream": True}, "echo"),
        ({"prompt": ["a", "b"], "stream": True}, "prompt"),
        ({"max_tokens": 0, "stream": True}, "max_tokens"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
    ],
)
def test_a_completion_parameter_that_cannot_be_honoured_is_a_400_naming_it(client, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**{"model": "auditor", "prompt": "Once", "max_tokens": 4, **extra})
    assert refused.value.body["param"] == param, refused.value.body


def test_neutral_values_and_stop_are_accepted_not_refused(client):
    """n=1, zero penalties, an empty logit_bias, a text response format and up to four stop
    sequences pass the checks: this app has no worker, so they get as far as its 503."""
    with pytest.raises(openai.InternalServerError) as no_worker:
        client.chat.completions.create(
            model="auditor",
            messages=MESSAGES,
            max_tokens=4,
            n=1,
            presence_penalty=0,
            frequency_penalty=0,
            logit_bias={},
            response_format={"type": "text"},
            stop=["\n", "5", "END", "###"],
            user="someone",
            # identifiers that change nothing a self-hosted model does, and vLLM's top_k
            metadata={"team": "search"},
            store=False,
            service_tier="auto",
            modalities=["text"],
            extra_body={"top_k": 40},
        )
    assert no_worker.value.status_code == 503


def test_more_than_four_stop_sequences_is_a_422_on_stop(client):
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model="auditor", messages=MESSAGES, max_tokens=4, stop=list("abcde"))
    message = refused.value.body["message"]
    assert message.startswith("body.stop:") and "at most 4 stop sequences, got 5" in message, message


@pytest.mark.parametrize(
    ("route", "extra", "field"),
    [
        ("chat", {"stop": ["ok", ""]}, "stop"),
        ("chat", {"stop": ["x" * 257]}, "stop"),
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("completion", {"logprobs": 6}, "logprobs"),
        ("completion", {"stop": 5}, "stop"),
    ],
)
def test_broken_stop_and_logprobs_values_are_a_422_naming_the_field_and_write_nothing(client, route, extra, field):
    before = _request_rows(client)
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        if route == "chat":
            client.chat.completions.create(model="auditor", messages=MESSAGES, max_tokens=4, **extra)
        else:
            client.completions.create(**{"model": "auditor", "prompt": "Once", "max_tokens": 4, **extra})
    assert refused.value.body["message"].startswith(f"body.{field}"), refused.value.body
    assert _request_rows(client) == before


def test_a_refused_parameter_writes_no_request_row(client):
    before = _request_rows(client)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="auditor", messages=MESSAGES, max_tokens=4, n=3)
    assert _request_rows(client) == before
