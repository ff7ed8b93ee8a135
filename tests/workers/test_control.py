"""Control answers and their traces on the real model: what every answer is read against must be
exactly what serving measures."""

from __future__ import annotations

import pytest
import torch

from probes.concepts import load_control_prompts, load_control_set
from workers.monitoring import control
from workers.monitoring.divergence import primary
from workers.runtime.batch_generate import BatchGenerator, SequenceRequest
from workers.runtime.generate import SamplingConfig, encode_prompt

pytestmark = pytest.mark.model


def test_the_control_set_is_large_varied_and_unique():
    entries = load_control_set()
    prompts = [p.strip().lower() for p, _ in entries]
    assert len(entries) >= 600 and len(set(prompts)) == len(prompts)
    categories = {c for _, c in entries}
    assert categories == {"everyday", "advice", "writing", "coding", "maths", "summarising", "explain"}
    assert min(sum(c == name for _, c in entries) for name in categories) >= 50


def test_shipped_answers_are_the_default_models_greedy_answers(model):
    """The shipped file is what generating would give: the first prompts, answered now."""
    prompts = load_control_prompts()
    shipped = control._read_answers(control._answers_file(control.SHIPPED_DIR, model, prompts), 12)
    assert shipped is not None, "no shipped control answers for the default model"
    fresh = control.generate_answers(model, prompts[:6], 12)
    same = [a.output_ids == b.output_ids for a, b in zip(fresh, shipped[:6])]
    assert sum(same) >= 5, same  # batch composition can flip a near-tie in float rounding, rarely
    assert all(a.prompt_ids == b.prompt_ids for a, b in zip(fresh, shipped[:6]))


def test_replayed_traces_equal_what_generation_captured(model, bank):
    prompts = ["How do I water a fern?", "Write one line about the sea."]
    batch = BatchGenerator(model, bank.layers)
    requests = [
        (i, SequenceRequest(encode_prompt(model, p), SamplingConfig(max_new_tokens=10))) for i, p in enumerate(prompts)
    ]
    done = dict(batch.add(requests))
    while len(batch):
        done.update(batch.step())
    answers = [control.ControlAnswer(list(r.prompt_ids), list(done[i].output_ids)) for i, r in requests]
    traces = control.answer_traces(model, bank, answers)
    from workers.monitoring.scores import score_generation

    for i, answer in enumerate(answers):
        captured = score_generation(bank, done[i]).per_token  # [n_layers, n_tokens, K]
        index = torch.tensor([bank.layers.index(bank.auto_layers[n]) for n in bank.names])
        want = captured[index, :, torch.arange(len(bank.names))].T  # [n_tokens, K]
        n = len(answer.output_ids)
        torch.testing.assert_close(traces.residual[i, :n].float(), want.float(), atol=2e-3, rtol=0)
        assert traces.residual[i, n:].isnan().all()
        # The mean of the trace is the served score at the primary layer.
        torch.testing.assert_close(
            traces.residual[i, :n].mean(0).float(),
            primary(bank, score_generation(bank, done[i]).aggregates.mean).float(),
            atol=2e-3,
            rtol=0,
        )


def test_the_text_read_to_the_primary_layers_equals_a_full_read(model, bank):
    """Answers are re-read only as deep as the deepest primary layer; that must equal reading
    every layer as standalone text and picking each concept's primary one."""
    from workers.monitoring.concepts import per_text_scores

    texts = [
        "I doubt this will ever work out; it never does.",
        "Use a list comprehension in Python.",
        "Sure! Here is a short, friendly answer.",
    ]
    assert max(bank.auto_layers.values()) < max(bank.layers)  # so the shortcut is exercised
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    full = primary(bank, per_text_scores(model, texts, bank.directions, bank.layers))
    torch.testing.assert_close(control.text_means(model, bank, ids).float(), full.float(), atol=1e-5, rtol=0)


def test_traces_are_cached_per_concept_and_read_back_unchanged(model, bank, tmp_path, monkeypatch):
    prompts = load_control_prompts()
    answers = control.control_answers(model, prompts[:5], 6, tmp_path)
    first = control.answer_traces(model, bank, answers, tmp_path)

    def no_forward(*args, **kwargs):
        raise AssertionError("read the model again instead of the cache")

    monkeypatch.setattr(control, "read_spans", no_forward)
    again = control.answer_traces(model, bank, answers, tmp_path)
    assert torch.equal(first.residual.nan_to_num(7.0), again.residual.nan_to_num(7.0))
    assert torch.equal(first.text.nan_to_num(7.0), again.text.nan_to_num(7.0))
    assert torch.equal(first.text_lengths, again.text_lengths)
