"""What the real third-party clients send, recorded from the pinned versions against a stand-in
server (support.openai_recorder), then replayed to Auditor's API: each body must pass every check
(this app has no worker, so an accepted request gets as far as its 503), or be refused for the
reason the test names. No model: a client upgrade that changes its requests fails here first.

tests/clients/test_*_client.py run the same clients against the real model."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.openai_recorder import recording_openai_server

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
COMPLY_TESTS = [
    "chat-basic-response",
    "chat-system-prompt",
    "chat-multi-turn",
    "chat-error-handling",
    "chat-streaming-response",
    "chat-streaming-usage",
]


def _langchain(base: str, recorder) -> dict[str, dict]:
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    def model(**extra):
        return ChatOpenAI(base_url=f"{base}/v1", api_key="sk-x", model="auditor", max_retries=0, **extra)

    greedy = model(temperature=0, max_tokens=24)
    greedy.invoke("hi")
    greedy.invoke([SystemMessage("Be brief."), HumanMessage("hi")], stop=["\n"], seed=7)
    model().invoke("hi")
    list(greedy.stream("hi"))
    list(model(stream_usage=True).stream("hi"))
    names = ["invoke", "invoke-options", "invoke-defaults", "stream", "stream-usage"]
    return {f"langchain-{name}": body for name, body in zip(names, recorder.bodies("/chat/completions"), strict=True)}


def _lm_eval(base: str, recorder) -> dict[str, dict]:
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    shapes = {}
    for name, model, route, extra in [
        ("chat-generate", "local-chat-completions", "chat/completions", {}),
        ("completions-generate", "local-completions", "completions", {"tokenizer_backend": None}),
    ]:
        recorder.clear()
        lm_eval.simple_evaluate(
            model=model,
            model_args={"model": "auditor", "base_url": f"{base}/v1/{route}", "max_retries": 1, **extra},
            tasks=["auditor_arithmetic"],
            limit=1,
            task_manager=task_manager,
            apply_chat_template=model == "local-chat-completions",
            bootstrap_iters=0,
        )
        (shapes[f"lm-eval-{name}"],) = recorder.bodies(route)
    # A loglikelihood request needs a tokenizer to run (none here without the model's files): its
    # body is built by the same method the harness posts, for one (context + continuation).
    completions = LocalCompletionsAPI(model="auditor", base_url=f"{base}/v1/completions", tokenizer_backend=None)
    shapes["lm-eval-loglikelihood"] = completions._create_payload(
        completions.create_message(["Question: Which animal says meow?\nAnswer: cat"]), generate=False, seed=1234
    )
    return shapes


def _llm_comply(base: str, recorder) -> dict[str, dict]:
    from llm_comply.tests.openai_chat import OPENAI_CHAT_TESTS

    recorder.clear()
    command = [sys.executable, "-m", "llm_comply.cli", "run", "--format", "openai-chat", "--json"]
    subprocess.run(
        [*command, "-u", f"{base}/v1", "-k", "sk-x", "-m", "auditor", "-f", ",".join(COMPLY_TESTS)],
        capture_output=True,
        timeout=120,
        check=False,
    )
    in_run_order = [test.id for test in OPENAI_CHAT_TESTS if test.id in COMPLY_TESTS]  # its order, not -f's
    bodies = recorder.bodies("/chat/completions")
    return {f"llm-comply-{name}": body for name, body in zip(in_run_order, bodies, strict=True)}


@pytest.fixture(scope="module")
def sent(tmp_path_factory) -> dict[str, dict]:
    """{case: the JSON body the client posted}."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", "sk-x")
        patch.setenv("HF_HUB_OFFLINE", "1")
        with recording_openai_server() as (base, recorder):
            return {**_langchain(base, recorder), **_lm_eval(base, recorder), **_llm_comply(base, recorder)}


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[httpx.Client]:
    from auditor.api.main import create_app
    from auditor.db.engine import run_migrations
    from auditor.settings import Settings
    from support.auth import bearer, issue_token
    from support.http_server import serving

    url = f"sqlite:///{tmp_path_factory.mktemp('client-shapes') / 'auditor.db'}"
    run_migrations(url)
    app = create_app(Settings(database_url=url, data_dir=tmp_path_factory.mktemp("data")))
    token = issue_token(url, scopes=["client"], name="client-shapes")
    with serving(app) as base_url, httpx.Client(base_url=f"{base_url}/v1", headers=bearer(token), timeout=30) as http:
        yield http


def test_what_each_client_sends(sent):
    """The request shapes the pinned clients send (the pins in constraints.txt)."""
    assert sent["langchain-invoke"] == {
        "model": "auditor",
        "stream": False,
        "messages": [{"content": "hi", "role": "user"}],
        "max_completion_tokens": 24,  # ChatOpenAI(max_tokens=24) is sent as max_completion_tokens
        "temperature": 0.0,
    }
    assert sent["langchain-invoke-options"]["stop"] == ["\n"] and sent["langchain-invoke-options"]["seed"] == 7
    assert sent["langchain-invoke-options"]["messages"][0] == {"content": "Be brief.", "role": "system"}
    assert sent["langchain-invoke-defaults"] == {"model": "auditor", "stream": False, "messages": [{"content": "hi", "role": "user"}]}  # fmt: skip
    assert sent["langchain-stream"]["stream"] is True and "stream_options" not in sent["langchain-stream"]
    assert sent["langchain-stream-usage"]["stream_options"] == {"include_usage": True}

    question = "Question: What is 2 + 3?\nAnswer:"
    assert sent["lm-eval-chat-generate"] == {
        "messages": [{"role": "user", "content": question}],
        "model": "auditor",
        "max_tokens": 16,
        "temperature": 0.0,
        "stop": ["\n"],  # the task's `until`, plus the EOS string when the harness has a tokenizer
        "seed": 1234,
    }
    assert sent["lm-eval-completions-generate"] == {
        "prompt": question,  # a string: token ids ([[...]]) only with a tokenizer and tokenized_requests
        "model": "auditor",
        "max_tokens": 16,
        "temperature": 0.0,
        "stop": ["\n"],
        "seed": 1234,
    }
    assert sent["lm-eval-loglikelihood"] == {
        "model": "auditor",
        "prompt": "Question: Which animal says meow?\nAnswer: cat",
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }

    assert sent["llm-comply-chat-basic-response"] == {
        "model": "auditor",
        "messages": [{"role": "user", "content": "Say hello in exactly 3 words."}],
    }
    assert "model" not in sent["llm-comply-chat-error-handling"]
    assert sent["llm-comply-chat-streaming-response"]["stream"] is True
    assert sent["llm-comply-chat-streaming-usage"]["stream_options"] == {"include_usage": True}


def _route(case: str, body: dict) -> str:
    return "/completions" if "prompt" in body else "/chat/completions"


ACCEPTED = [
    "langchain-invoke",
    "langchain-invoke-options",
    "langchain-invoke-defaults",
    "lm-eval-chat-generate",
    "lm-eval-completions-generate",
    "llm-comply-chat-basic-response",
    "llm-comply-chat-system-prompt",
    "llm-comply-chat-multi-turn",
    "langchain-stream",
    "langchain-stream-usage",
    "lm-eval-loglikelihood",
    "llm-comply-chat-streaming-response",
    "llm-comply-chat-streaming-usage",
]


@pytest.mark.parametrize("case", ACCEPTED)
def test_the_api_accepts_what_the_client_sends(sent, api, case):
    body = sent[case]
    answer = api.post(_route(case, body), json=body)
    assert answer.status_code == 503, answer.text  # past every check: only the missing worker is left
    assert answer.json()["error"]["code"] == "worker_unavailable", answer.text


def test_a_body_without_model_is_the_422_llm_comply_expects(sent, api):
    answer = api.post("/chat/completions", json=sent["llm-comply-chat-error-handling"])
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["message"].startswith("body.model"), answer.text
