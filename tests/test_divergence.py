"""Divergence flags as pure math: thresholds fitted on control traffic hold their false-positive
rate on fresh control traffic and catch a planted hidden shift."""

from __future__ import annotations

import pytest
import torch

from probes.divergence import divergences, fit_thresholds, flags_matrix
from probes.errors import InvalidInputError


def control(n: int, seed: int, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated residual and text signals, as on ordinary traffic."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, k, generator=g)
    residual = shared + 0.5 * torch.randn(n, k, generator=g)
    text = shared + 0.5 * torch.randn(n, k, generator=g)
    return residual, text


def test_thresholds_hold_their_false_positive_rate_on_fresh_control_traffic():
    thresholds = fit_thresholds(*control(4000, seed=0), target_fpr=0.01)
    assert torch.all(thresholds.achieved_fpr <= 0.01)
    fresh_residual, fresh_text = control(20000, seed=1)
    flagged = torch.stack([flags_matrix(r, t, thresholds).any(-1) for r, t in zip(fresh_residual, fresh_text)])
    fresh_fpr = flagged.double().mean(0)
    assert torch.all(fresh_fpr < 0.015) and torch.all(fresh_fpr > 0.002)


def test_a_hidden_shift_is_flagged_hidden_and_a_textual_one_surface():
    thresholds = fit_thresholds(*control(4000, seed=0), target_fpr=0.01)
    residual, text = control(500, seed=2)
    steered = residual.clone()
    steered[:, 1] += 4.0  # internals pushed toward concept 1; the words unchanged
    detected = torch.stack([flags_matrix(r, t, thresholds)[1, 0] for r, t in zip(steered, text)])
    assert detected.double().mean() > 0.95
    others = torch.stack([flags_matrix(r, t, thresholds)[[0, 2]].any() for r, t in zip(steered, text)])
    assert others.double().mean() < 0.03  # the other concepts stay quiet

    wordy = text.clone()
    wordy[:, 0] += 4.0
    surface = torch.stack([flags_matrix(r, t, thresholds)[0, 1] for r, t in zip(residual, wordy)])
    assert surface.double().mean() > 0.95


def test_reasons_name_the_concept_and_both_signals():
    thresholds = fit_thresholds(*control(1000, seed=0), target_fpr=0.02)
    found = divergences(torch.tensor([6.0, 0.1, 0.0]), torch.tensor([0.2, 0.0, 0.1]), thresholds,
                        ["pessimism", "formality", "urgency"])
    assert [(d.concept, d.kind) for d in found] == [(0, "hidden")]
    assert "pessimism" in found[0].reason and "+6.00" in found[0].reason and "+0.20" in found[0].reason
    # Two low signals never flag, however far apart.
    assert not divergences(torch.tensor([-1.0, 0, 0]), torch.tensor([-9.0, 0, 0]), thresholds, ["a", "b", "c"])


def test_bad_signals_are_rejected():
    with pytest.raises(InvalidInputError, match="shape"):
        fit_thresholds(torch.zeros(10, 2), torch.zeros(10, 3), 0.01)
    with pytest.raises(InvalidInputError, match="NaN"):
        fit_thresholds(torch.full((10, 2), float("nan")), torch.zeros(10, 2), 0.01)
    with pytest.raises(InvalidInputError, match="target_fpr"):
        fit_thresholds(torch.zeros(10, 2), torch.zeros(10, 2), 0.0)


@pytest.mark.model
def test_a_refit_replays_the_cached_control_answers_and_matches_generating_them(model, bank, monkeypatch):
    """Control answers do not depend on the concepts: a refit (new active set) replays them in a
    teacher-forced pass instead of generating again, and gets the same signals."""
    from probes.concepts import load_control_prompts
    from workers import divergence

    prompts = load_control_prompts()[:6]
    monkeypatch.setattr(divergence, "_CONTROL_ANSWERS", {})
    generated_residual, generated_text = divergence.control_signals(model, bank, prompts, 8)

    def no_generation(*args, **kwargs):
        raise AssertionError("the refit generated again instead of replaying")

    monkeypatch.setattr(divergence, "BatchGenerator", no_generation)
    replayed_residual, replayed_text = divergence.control_signals(model, bank, prompts, 8)
    assert replayed_residual.shape == generated_residual.shape == (len(generated_text), len(bank.names))
    # z units: replay and KV-cached decoding differ only by float rounding.
    torch.testing.assert_close(replayed_residual, generated_residual, atol=1e-3, rtol=0)
    assert torch.equal(replayed_text, generated_text)


@pytest.mark.model
def test_the_text_signal_read_to_the_primary_layers_only_equals_a_full_read(model, bank):
    """The serving path re-reads answers only as deep as the deepest primary layer; that must
    give the same z-scores as reading every layer and picking each concept's primary one."""
    from probes.calibration import z_scores
    from workers.concepts import per_text_scores
    from workers.divergence import primary, text_signals

    texts = ["I doubt this will ever work out; it never does.", "Use a list comprehension in Python.",
             "Sure! Here is a short, friendly answer."]
    assert max(bank.auto_layers.values()) < max(bank.layers)  # so the shortcut is exercised
    full = primary(bank, z_scores(bank.calibration, per_text_scores(model, texts, bank.directions, bank.layers)))
    torch.testing.assert_close(text_signals(model, bank, texts), full, atol=1e-6, rtol=0)
