"""The `auditor` command as a user runs it: bad input fails fast and clearly; real runs print
real numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.eval_data import EVAL_DIR

AUDITOR = [sys.executable, "-m", "auditor.cli"]


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([*AUDITOR, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def jsonl(tmp_path):
    def write(lines: list[str]) -> Path:
        path = tmp_path / "set.jsonl"
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


def test_eval_of_a_missing_file_is_a_clear_error():
    result = run_cli("eval", "/nonexistent/set.jsonl", "--concept", "pessimism")
    assert result.returncode == 2
    assert "file not found: /nonexistent/set.jsonl" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "fine", "label": 1}', "{not json"], "set.jsonl:2: not valid JSON"),
        (
            ['{"text": "fine", "label": 1}', '{"text": "fine"}'],
            'set.jsonl:2: expected an object with "text" and "label"',
        ),
        (['{"text": "fine", "label": 2}'], "label must be 0 or 1, got 2"),
        (['{"text": "", "label": 1}'], "text must be a non-empty string"),
        (['{"text": "a", "label": 1}', '{"text": "b", "label": 1}'], "AUROC needs both classes"),
    ],
)
def test_eval_rejects_malformed_sets_with_the_line_number(jsonl, lines, message):
    result = run_cli("eval", str(jsonl(lines)), "--concept", "pessimism")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["sweep"], ["extract"], ["steer", "hello", "--alpha", "1"], ["probe", "hello"]])
def test_unknown_concept_is_named_before_the_model_loads(command):
    result = run_cli(*command, "--concept", "nonexistent_concept", timeout=60)
    assert result.returncode == 2
    assert "unknown concept 'nonexistent_concept'" in result.stderr


@pytest.mark.model
def test_eval_json_reports_a_real_auroc(data_dir, host):
    host.vectors("pessimism")  # the subprocess reuses this session's cached extraction
    rows_file = EVAL_DIR / "uci_yelp_labelled.jsonl"
    if not rows_file.exists():
        pytest.skip("eval data not present")
    result = run_cli(
        "eval",
        str(rows_file),
        "--concept",
        "pessimism",
        "--flip",
        "--json",
        "--limit",
        "300",
        "--n-boot",
        "200",
        env_extra={"AUDITOR_DATA_DIR": str(data_dir)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"auroc", "ci_low", "ci_high", "layer", "n"} <= report.keys()
    assert report["n"] == 300 and report["layer"] == host.vectors("pessimism").auto_layer
    assert report["ci_low"] <= report["auroc"] <= report["ci_high"]
    assert report["auroc"] > 0.8  # negative Yelp sentences score as pessimistic
    # Text-only baselines on the same rows: the lexicon of gloom words barely separates reviews;
    # bag of words, cross-validated on the 300 rows themselves, learns their vocabulary.
    keyword, bow = report["baselines"]["keyword"], report["baselines"]["bag_of_words"]
    assert 0.45 < keyword["auroc"] < 0.7 and keyword["ci_low"] <= keyword["auroc"] <= keyword["ci_high"]
    assert 0.7 < bow["auroc"] < report["auroc"]
    assert report["beats_keyword"] is True and report["status"] == "stable"


@pytest.mark.model
def test_sweep_prints_every_layer_and_draws_the_plot(data_dir, host, tmp_path):
    host.vectors("urgency")
    plot = tmp_path / "urgency.png"
    result = run_cli(
        "sweep",
        "--concept",
        "urgency",
        "--plot",
        str(plot),
        env_extra={"AUDITOR_DATA_DIR": str(data_dir), "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stderr
    auto = host.vectors("urgency").auto_layer
    assert "◀ auto" in result.stdout
    auto_line = next(line for line in result.stdout.splitlines() if "◀ auto" in line)
    assert auto_line.split("│")[1].strip() == str(auto)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "value",
    [
        "pessimism",
        "pessimism:",
        ":0.1",
        "pessimism:0.1:2",
        "pessimism:abc",
        "bad name:0.1",
        "pessimism:0..1",
        "pessimism:.",
    ],
)
def test_a_malformed_steering_drill_setting_is_refused_at_startup(value):
    from pydantic import ValidationError

    from auditor.settings import Settings

    with pytest.raises(ValidationError, match="inject_steering"):
        Settings(inject_steering=value)


@pytest.mark.parametrize("value", ["", "pessimism:0.1", "python_bias:-0.05", "my.concept-2:1"])
def test_a_well_formed_steering_drill_setting_is_accepted(value):
    from auditor.settings import Settings

    assert Settings(inject_steering=value).inject_steering == value


def test_concepts_lists_each_builtin_with_its_status():
    from probes.concepts import builtin_concepts, load_concept

    result = run_cli("concepts", env_extra={"COLUMNS": "200"}, timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") > 3}
    for name in builtin_concepts():
        assert load_concept(name).status in rows[name], rows.get(name)
    assert "experimental" in rows["flattery"] and "stable" in rows["pessimism"]
