"""lm-evaluation-harness (`lm_eval.simple_evaluate`) against Auditor, on the two small tasks in
tests/clients/tasks/ (loaded with include_path, from local JSONL: no hub).

- `local-chat-completions` (generate_until): one request per document, `{"messages": [...],
  "model", "max_tokens", "temperature": 0.0, "stop": [...] (at most 4), "seed": 1234}`; reads
  `choices[i].index` and `choices[i].message.content`.
- `local-completions` with tokenizer_backend=None (generate_until): the same with `"prompt": str`;
  reads `choices[i].index` and `choices[i].text`.
- `local-completions` with a tokenizer (loglikelihood, multiple_choice): `{"prompt": context +
  continuation, "max_tokens": 1, "logprobs": 1, "echo": true, "temperature": 0, "seed": 1234}`;
  reads `choices[i].logprobs.token_logprobs[ctxlen:-1]` and `top_logprobs[ctxlen:-1]` (dicts),
  ctxlen counted by its own tokenizer: the served model's, saved locally (`tokenizer_dir`).

The API key is read from OPENAI_API_KEY (local-* models send `Authorization: Bearer $OPENAI_API_KEY`)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
pytestmark = pytest.mark.model

ARITHMETIC_DOCS = 10
CHOICES_TOTAL = 30  # choices over the ten documents of choices.jsonl: one request each


@pytest.fixture
def evaluate(stack, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", stack.token)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)

    def run(model: str, task: str, **model_args):
        return lm_eval.simple_evaluate(
            model=model,
            model_args={"model": "auditor", "max_retries": 1, "timeout": 300, **model_args},
            tasks=[task],
            task_manager=task_manager,
            log_samples=True,
            bootstrap_iters=0,
            apply_chat_template=model == "local-chat-completions",
        )

    return run


def _last_number(text: str) -> str | None:
    found = re.findall(r"-?[0-9]+", text)
    return found[-1] if found else None


def _check_exact_match(results: dict, task: str) -> tuple[float, list[dict]]:
    """The task's score is a real number in [0, 1], and is the fraction of answers whose last
    integer is the target, recomputed here from the logged samples."""
    score = results["results"][task]["exact_match,last-number"]
    samples = results["samples"][task]
    assert len(samples) == ARITHMETIC_DOCS
    assert isinstance(score, float) and not math.isnan(score) and 0.0 <= score <= 1.0
    hits = [_last_number(s["resps"][0][0]) == s["target"] for s in samples]
    assert score == pytest.approx(sum(hits) / len(hits))
    assert all(isinstance(s["resps"][0][0], str) for s in samples)
    assert any(s["resps"][0][0].strip() for s in samples), "every answer came back empty"
    assert score > 0, "not one sum right: were the answers read at all?"  # greedy SmolLM2 gets several
    return score, samples


def test_local_chat_completions_generate_until(stack, evaluate, openai_client):
    rows = stack.request_rows()
    results = evaluate("local-chat-completions", "auditor_arithmetic", base_url=f"{stack.v1}/chat/completions")
    _, samples = _check_exact_match(results, "auditor_arithmetic")
    assert stack.request_rows() == rows + ARITHMETIC_DOCS  # every document was one served request

    # What lm-eval recorded is what the API answers to the same request.
    first = next(s for s in samples if s["doc"]["question"] == "What is 2 + 3?")
    reference = openai_client.chat.completions.create(
        model="auditor",
        messages=[{"role": "user", "content": "Question: What is 2 + 3?\nAnswer:"}],
        max_tokens=16,
        temperature=0.0,
        stop=["\n"],
        seed=1234,
    )
    assert first["resps"][0][0] == reference.choices[0].message.content


def test_local_completions_generate_until_without_a_tokenizer(stack, evaluate, openai_client):
    rows = stack.request_rows()
    results = evaluate(
        "local-completions", "auditor_arithmetic", base_url=f"{stack.v1}/completions", tokenizer_backend=None
    )
    _, samples = _check_exact_match(results, "auditor_arithmetic")
    assert stack.request_rows() == rows + ARITHMETIC_DOCS

    first = next(s for s in samples if s["doc"]["question"] == "What is 7 + 3?")
    reference = openai_client.completions.create(
        model="auditor",
        prompt="Question: What is 7 + 3?\nAnswer:",
        max_tokens=16,
        temperature=0.0,
        stop=["\n"],
        seed=1234,
    )
    assert first["resps"][0][0] == reference.choices[0].text
    assert "\n" not in first["resps"][0][0]


def test_local_completions_loglikelihood_multiple_choice(stack, evaluate, tokenizer_dir, host):
    """Prompt log-probabilities through `echo`: each choice's log-likelihood must be the served
    model's own, computed here in one forward pass."""
    import torch

    rows = stack.request_rows()
    results = evaluate(
        "local-completions",
        "auditor_choices",
        base_url=f"{stack.v1}/completions",
        tokenizer_backend="huggingface",
        tokenizer=str(tokenizer_dir),
        tokenized_requests=False,  # the prompt as text: the API takes no token ids
    )
    accuracy = results["results"]["auditor_choices"]["acc,none"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
    assert stack.request_rows() == rows + CHOICES_TOTAL

    samples = results["samples"]["auditor_choices"]
    assert len(samples) == 10
    tokenizer, hf_model = host.model.tokenizer, host.model.hf_model
    for sample in samples[:3]:
        for (context, continuation), (loglikelihood, _greedy) in zip(
            sample["arguments"], [resp[0] for resp in sample["resps"]]
        ):
            context_ids = tokenizer(context, add_special_tokens=False).input_ids
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = hf_model(torch.tensor([whole])).logits[0].log_softmax(-1)
            expected = sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))
            assert loglikelihood == pytest.approx(expected, abs=1e-3)
    predicted = [max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) for s in samples]
    assert accuracy == pytest.approx(sum(p == s["target"] for p, s in zip(predicted, samples)) / len(samples))


def test_local_completions_with_token_ids_in_batches_reads_the_same_likelihoods(stack, evaluate, tokenizer_dir):
    """lm-eval's default with a tokenizer: each prompt sent as token ids, four prompts per
    request (`prompt: [[ids], ...]`); choices come back by index. The log-likelihoods are those
    of the same prompts sent one by one as text."""
    common = {
        "base_url": f"{stack.v1}/completions",
        "tokenizer_backend": "huggingface",
        "tokenizer": str(tokenizer_dir),
    }
    rows = stack.request_rows()
    batched = evaluate("local-completions", "auditor_choices", tokenized_requests=True, batch_size=4, **common)
    assert stack.request_rows() == rows + CHOICES_TOTAL  # one monitored request per prompt
    one_by_one = evaluate("local-completions", "auditor_choices", tokenized_requests=False, **common)

    def likelihoods(results) -> list[float]:
        samples = sorted(results["samples"]["auditor_choices"], key=lambda s: s["doc_id"])
        return [resp[0][0] for s in samples for resp in s["resps"]]

    assert likelihoods(batched) == pytest.approx(likelihoods(one_by_one), abs=1e-3)
    accuracy = batched["results"]["auditor_choices"]["acc,none"]
    assert accuracy == one_by_one["results"]["auditor_choices"]["acc,none"]
    assert accuracy >= 0.5  # easy questions, 2-4 choices: the default model beats chance
