"""llm-comply (an OpenAI-schema conformance tester) against Auditor, through its CLI:
`llm-comply run --format openai-chat -u BASE/v1 -k TOKEN -m auditor --json -f IDS`.

Its openai-chat requests carry only `model` and `messages` (no max_tokens: the deployment's
default applies), and it checks: HTTP 200; the body against the OpenAI spec's
CreateChatCompletionResponse (bundled JSON schema); a non-empty `id`; `choices[0].message` with
role `assistant` and content; `finish_reason == "stop"`; `usage` with prompt, completion and
total tokens (basic test only). Warnings only: `message.refusal`, `message.annotations`,
`choices[0].logprobs` present, and the id prefixed `chatcmpl-`. The error test sends no `model`
and wants a 400 or 422. Its streaming tests add `"stream": true` (and `stream_options`
`{"include_usage": true}`) and want SSE chunks with `delta.content`, a `finish_reason`, a usage
chunk and `data: [DONE]` last.

Not run here: chat-tool-calling (tools are refused: 400), chat-image-input (content parts are a
422) and chat-reasoning-summary (it skips itself for any model not named like o1/o3/gpt-5)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.model


def comply(stack, *test_ids: str) -> dict[str, dict]:
    """Run llm-comply's openai-chat tests; {test id: its result (status, errors, warnings)}."""
    command = [sys.executable, "-m", "llm_comply.cli", "run", "--format", "openai-chat", "--json", "--timeout", "300"]
    done = subprocess.run(
        [*command, "-u", stack.v1, "-k", stack.token, "-m", "auditor", "-f", ",".join(test_ids)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"llm-comply printed no JSON report (exit {done.returncode}): {done.stdout} {done.stderr}")
    results = {r["id"]: r for r in report["results"]}
    assert sorted(results) == sorted(test_ids), report
    assert done.returncode == (0 if all(r["status"] != "failed" for r in results.values()) else 1)
    return results


@pytest.mark.parametrize(
    ("test_id", "served"),
    [
        ("chat-basic-response", 1),
        ("chat-system-prompt", 1),
        ("chat-multi-turn", 1),
        ("chat-error-handling", 0),  # no `model`: a 422, and no request row
    ],
)
def test_the_basic_openai_chat_checks_pass(stack, test_id, served):
    rows = stack.request_rows()
    result = comply(stack, test_id)[test_id]
    assert result["status"] == "passed", result
    assert stack.request_rows() == rows + served
    # The only advisory left: OpenAI's message carries `annotations: []`, Auditor's does not.
    assert all("annotations" in warning for warning in result.get("warnings", [])), result


@pytest.mark.parametrize("test_id", ["chat-streaming-response", "chat-streaming-usage"])
def test_the_streaming_openai_chat_checks_pass(stack, test_id):
    rows = stack.request_rows()
    result = comply(stack, test_id)[test_id]
    assert result["status"] == "passed", result
    assert not result.get("warnings"), result
    assert stack.request_rows() == rows + 1
