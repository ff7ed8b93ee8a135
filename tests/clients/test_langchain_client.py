"""LangChain's `ChatOpenAI` (langchain-openai) against Auditor, next to the official `openai`
client. ChatOpenAI sends `max_completion_tokens` (never `max_tokens`), `"stream": false` on every
call, and `temperature`, `stop`, `seed` only when set; it reads `choices[0].message.content`,
`finish_reason`, `usage` and `id`."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.model

QUESTION = "Name one colour of the rainbow."


@pytest.fixture(scope="module")
def chat_model(stack):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=stack.v1,
        api_key=stack.token,
        model="auditor",
        temperature=0,
        max_tokens=24,
        max_retries=0,
        timeout=300,
    )


def test_invoke_answers_what_the_openai_client_answers_greedily(stack, chat_model, openai_client):
    rows = stack.request_rows()
    reference = openai_client.chat.completions.create(
        model="auditor", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24
    )
    answer = chat_model.invoke(QUESTION)

    expected = reference.choices[0].message.content
    assert expected.strip(), "the reference answer is empty"
    assert answer.content == expected
    assert answer.response_metadata["finish_reason"] == reference.choices[0].finish_reason
    assert answer.response_metadata["model_name"] == reference.model
    served_id = answer.response_metadata["id"]  # (answer.id is LangChain's own run id)
    assert served_id.startswith("chatcmpl-") and served_id != reference.id
    usage = answer.usage_metadata
    assert usage["input_tokens"] == reference.usage.prompt_tokens
    assert usage["output_tokens"] == reference.usage.completion_tokens
    assert 0 < usage["output_tokens"] <= 24
    assert stack.request_rows() == rows + 2  # both were served and recorded


def test_system_message_stop_and_seed_reach_the_model(chat_model, openai_client):
    from langchain_core.messages import HumanMessage, SystemMessage

    system, user = "You are a helpful assistant.", "List three fruits, one per line."
    reference = openai_client.chat.completions.create(
        model="auditor",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        temperature=0,
        max_tokens=24,
        stop=["\n"],
        seed=7,
    )
    unstopped = openai_client.chat.completions.create(
        model="auditor",
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        temperature=0,
        max_tokens=24,
        seed=7,
    )
    answer = chat_model.invoke([SystemMessage(system), HumanMessage(user)], stop=["\n"], seed=7)

    assert answer.content == reference.choices[0].message.content
    # The stop really acted: without it the same greedy answer runs on past a newline.
    full = unstopped.choices[0].message.content
    assert "\n" in full.strip()
    assert answer.content == full[: full.index("\n")]
    assert answer.response_metadata["finish_reason"] == "stop"


def test_stream_concatenates_to_the_invoke_answer(stack, chat_model):
    from langchain_openai import ChatOpenAI

    whole = chat_model.invoke(QUESTION).content
    chunks = list(chat_model.stream(QUESTION))
    assert len(chunks) > 1
    assert "".join(chunk.content for chunk in chunks) == whole

    # stream_usage=True adds stream_options={"include_usage": true}: the usage chunk at the end.
    counting = ChatOpenAI(
        base_url=stack.v1, api_key=stack.token, model="auditor", temperature=0, max_tokens=24, stream_usage=True
    )
    total = None
    for chunk in counting.stream(QUESTION):
        total = chunk if total is None else total + chunk
    assert total.content == whole
    assert total.usage_metadata["output_tokens"] > 0 and total.usage_metadata["input_tokens"] > 0
