"""The two lm-eval tasks in tests/clients/tasks/ (tag `auditor_smoke`) load offline, from any
working directory, through `--include_path`, with the documents and prompts they were written
with. No model and no server."""

from __future__ import annotations

import json
import operator
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict:
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("elsewhere"))  # the JSONL is found beside the YAML, not in cwd
        for name, value in OFFLINE.items():
            patch.setenv(name, value)
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        return manager.load(["auditor_smoke"])["tasks"]


def test_the_cli_validates_both_tasks_from_include_path(tmp_path):
    command = [sys.executable, "-m", "lm_eval", "validate", "--tasks", "auditor_arithmetic,auditor_choices"]
    done = subprocess.run(
        [*command, "--include_path", str(TASKS_DIR)],
        cwd=tmp_path,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All tasks found and valid" in done.stdout + done.stderr


def test_arithmetic_is_ten_greedy_generations_with_correct_targets(tasks):
    task = tasks["auditor_arithmetic"]
    docs = list(task.test_docs())
    assert task.OUTPUT_TYPE == "generate_until" and len(docs) == 10
    assert task.doc_to_text(docs[0]) == "Question: What is 2 + 3?\nAnswer:"
    assert task.config.generation_kwargs == {
        "until": ["\n"],
        "do_sample": False,
        "temperature": 0.0,
        "max_gen_toks": 16,
    }
    for doc in docs:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", doc["question"]).groups()
        assert task.doc_to_target(doc) == str({"+": operator.add, "-": operator.sub}[op](int(a), int(b)))


def test_choices_is_ten_multiple_choice_questions(tasks):
    task = tasks["auditor_choices"]
    docs = list(task.test_docs())
    assert task.OUTPUT_TYPE == "multiple_choice" and len(docs) == 10
    assert task.doc_to_text(docs[0]) == "Question: Which of these is a fruit?\nAnswer:"
    assert task.doc_to_choice(docs[0]) == ["apple", "hammer"] and task.doc_to_target(docs[0]) == 0
    rows = [json.loads(line) for line in (TASKS_DIR / "choices.jsonl").read_text().splitlines()]
    assert [task.doc_to_choice(doc) for doc in docs] == [row["choices"] for row in rows]
    for doc in docs:
        assert 2 <= len(task.doc_to_choice(doc)) <= 4
        assert 0 <= task.doc_to_target(doc) < len(task.doc_to_choice(doc))
    assert sum(len(task.doc_to_choice(doc)) for doc in docs) == 30  # one loglikelihood request each
