"""The length-aware null as pure math, on synthetic answers whose ground truth is known.

Control and test answers are drawn from the same process (exchangeable): per-token cosines that
are autocorrelated along the answer, correlated across concepts, with a text re-read that tracks
the residual. The family-wise rate (a request raising *any* flag over every concept and both
kinds) must stay within the target at every length, and a planted hidden shift must be found."""

from __future__ import annotations

import math

import pytest
import torch

from auditor.errors import InvalidInputError
from probes.answer_null import (
    binomial_sf,
    clopper_pearson_upper,
    fit_length_null,
    null_from_dict,
    null_to_dict,
    pac_rank,
    prefix_means,
)


def answers(n: int, k: int, max_len: int, seed: int, shift: torch.Tensor | None = None):
    """-> residual traces, text traces [n, max_len, k], lengths [n]. Per-token AR(1) noise
    (phi 0.7) with a shared per-answer offset (what the prompt is about) and cross-concept
    correlation; the text re-read shares most of the residual's variation."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.4 * torch.ones(k, k) / k  # correlated concepts
    offset = torch.randn(n, 1, k, generator=g) @ mix * 0.03  # the topic of the answer
    noise = torch.zeros(n, max_len, k)
    state = torch.randn(n, k, generator=g)
    for t in range(max_len):
        state = 0.7 * state + math.sqrt(1 - 0.49) * torch.randn(n, k, generator=g)
        noise[:, t] = state @ mix
    base = 0.1 + offset + 0.05 * noise
    text = base + 0.02 * torch.randn(n, max_len, k, generator=g) + 0.01
    residual = base + 0.02 * torch.randn(n, max_len, k, generator=g)
    if shift is not None:
        residual = residual + shift  # planted: the internals carry a concept the words do not
    # Some answers stop early (EOS), most run to the limit.
    lengths = torch.where(
        torch.rand(n, generator=g) < 0.25, torch.randint(1, max_len + 1, (n,), generator=g), torch.full((n,), max_len)
    )
    return residual, text, lengths


def family_rates(null, residual, text, lengths, n_tokens):
    """Share of test answers with any divergence flag, and with any alert, read at n_tokens."""
    keep = lengths >= n_tokens
    r = prefix_means(residual, lengths)[keep, n_tokens - 1]
    t = prefix_means(text, lengths)[keep, n_tokens - 1]
    reading = null.read(r, n_tokens, t)  # the whole batch at once
    one = null.read(r[0], n_tokens, t[0])  # ... which equals reading one answer alone
    assert one.flagged == bool(reading.any_flag()[0]) and torch.allclose(one.percentile, reading.percentile[0])
    return float(reading.any_flag().double().mean()), float(reading.alert.any(-1).double().mean()), len(r)


def test_binomial_tail_and_clopper_pearson_match_known_values():
    assert binomial_sf(0, 10, 0.3) == 1.0
    assert binomial_sf(3, 600, 0.01) == pytest.approx(1 - math.exp(-6) * (1 + 6 + 18), abs=3e-3)  # ~Poisson(6)
    assert binomial_sf(1, 100, 0.01) == pytest.approx(1 - 0.99**100)
    # Textbook: 0 of n -> upper 95 % bound 1 - 0.05^(1/n) (the "rule of three" ~ 3/n).
    assert clopper_pearson_upper(0, 300) == pytest.approx(1 - 0.05 ** (1 / 300), rel=1e-6)
    assert clopper_pearson_upper(10, 1000) == pytest.approx(0.01696, abs=2e-4)


def test_pac_rank_promises_the_target_with_the_stated_confidence():
    assert pac_rank(100, 0.01, 0.9) == 0  # 100 values cannot promise 1 % at 90 %
    assert pac_rank(230, 0.01, 0.9) == 1
    j = pac_rank(700, 0.01, 0.9)
    assert binomial_sf(j, 700, 0.01) >= 0.9 > binomial_sf(j + 1, 700, 0.01)


def test_prefix_means_are_means_of_each_prefix_and_nan_past_the_end():
    traces = torch.arange(12, dtype=torch.float64).reshape(2, 3, 2)
    means = prefix_means(traces, torch.tensor([3, 2]))
    assert means[0, 2, 1].item() == pytest.approx((1 + 3 + 5) / 3)
    assert means[1, 1, 0].item() == pytest.approx((6 + 8) / 2)
    assert means[1, 2].isnan().all()


@pytest.mark.parametrize("k", [1, 6, 16])
def test_family_wise_false_alarm_rate_holds_at_every_length(k):
    """At 90 % confidence about one length in ten may sit above the target by the luck of the
    control draw (the guarantee is per length), so every length must stay within 1.75x the
    target and the lengths together at or below it."""
    target = 0.02
    residual, text, lengths = answers(900, k, 64, seed=0)
    null = fit_length_null(residual, lengths, target, text_traces=text, confidence=0.9, min_tokens=1)
    test_residual, test_text, test_lengths = answers(6000, k, 64, seed=1)
    flagged_rates, alerted_rates = [], []
    for n_tokens in (1, 2, 4, 8, 16, 32, 64):
        flagged, alerted, _ = family_rates(null, test_residual, test_text, test_lengths, n_tokens)
        assert flagged <= 1.75 * target and alerted <= 1.75 * target, (k, n_tokens, flagged, alerted)
        # Not vacuous: the thresholds are not so high that nothing ever flags.
        assert flagged > target / 6 and alerted > target / 6, (k, n_tokens, flagged, alerted)
        flagged_rates.append(flagged)
        alerted_rates.append(alerted)
    assert sum(flagged_rates) / 7 <= target and sum(alerted_rates) / 7 <= target, (flagged_rates, alerted_rates)


def test_per_test_thresholds_would_have_broken_the_budget():
    """The reason for the family-wise maximum: with six concepts tested per request, a per-test
    2 % threshold lets far more than 2 % of requests through. (Keeps the test above honest.)"""
    residual, _, lengths = answers(900, 6, 32, seed=0)
    control = prefix_means(residual, lengths)[:, 15]
    per_test = control.nanquantile(0.98, dim=0)
    test_residual, _, test_lengths = answers(6000, 6, 32, seed=1)
    fresh = prefix_means(test_residual, test_lengths)[:, 15]
    fresh = fresh[~fresh.isnan().any(-1)]
    assert float((fresh > per_test).any(-1).double().mean()) > 0.05


def test_the_guarantee_holds_over_draws_of_the_control_set():
    """Training-conditional: over independent control sets, the share whose thresholds let more
    than the target through stays near 1 - confidence or below."""
    target, over = 0.05, 0
    test_residual, test_text, test_lengths = answers(4000, 4, 16, seed=99)
    draws = 12
    for seed in range(draws):
        residual, text, lengths = answers(300, 4, 16, seed=100 + seed)
        null = fit_length_null(residual, lengths, target, text_traces=text, confidence=0.9, min_tokens=1)
        flagged, _, n = family_rates(null, test_residual, test_text, test_lengths, 8)
        over += flagged > target + 2 * math.sqrt(target * (1 - target) / n)
    assert over <= 3  # expected ~1.2 of 12 at 90 % confidence


def test_short_answers_are_marked_insufficient_and_never_flagged():
    residual, text, lengths = answers(600, 3, 16, seed=0)
    null = fit_length_null(residual, lengths, 0.05, text_traces=text, min_tokens=4)
    huge = torch.full((3,), 10.0)
    reading = null.read(huge, 3, -huge)
    assert reading.status == "insufficient_tokens"
    assert not reading.flagged and not reading.alert.any()
    assert null.read(huge, 4, -huge).flagged


def test_a_planted_hidden_shift_is_found_and_reads_high_against_answers():
    residual, text, lengths = answers(900, 6, 64, seed=0)
    null = fit_length_null(residual, lengths, 0.01, text_traces=text, min_tokens=1)
    shift = torch.zeros(6)
    shift[2] = 0.1  # about 3 sd of the answers' own spread in z: residual z > 0 nearly always
    steered_residual, steered_text, steered_lengths = answers(300, 6, 64, seed=5, shift=shift)
    means = prefix_means(steered_residual, steered_lengths)[:, 31]
    text_means = prefix_means(steered_text, steered_lengths)[:, 31]
    keep = ~means.isnan().any(-1)
    readings = [null.read(r, 32, t) for r, t in zip(means[keep], text_means[keep])]
    hidden = [bool(x.hidden[2]) for x in readings]
    assert sum(hidden) / len(hidden) > 0.95
    assert all(not x.surface[2] for x in readings)
    # Ordinary answers read near z 0 at their own length; the steered concept reads high.
    ordinary = prefix_means(*answers(2000, 6, 64, seed=3)[::2])[:, 7]
    ordinary = ordinary[~ordinary.isnan().any(-1)]
    z = torch.stack([null.read(r, 8).residual_z for r in ordinary])
    assert z.median(dim=0).values.abs().max() < 0.15
    assert torch.stack([x.residual_z[2] for x in readings]).median() > 2


def test_lengths_beyond_the_certified_range_are_read_at_it():
    residual, text, lengths = answers(300, 2, 32, seed=0)
    lengths[:200] = 8  # only 100 answers go past 8 tokens: too few to certify 1 % at 90 %
    null = fit_length_null(residual, lengths, 0.01, text_traces=text)
    assert null.certified_length == 8
    assert null.read(torch.zeros(2), 30).length_used == 8


def test_the_null_round_trips_through_json():
    import json

    residual, text, lengths = answers(300, 3, 16, seed=0)
    null = fit_length_null(residual, lengths, 0.05, text_traces=text)
    again = null_from_dict(json.loads(json.dumps(null_to_dict(null))))
    probe = torch.tensor([0.12, 0.08, 0.1])
    a, b = null.read(probe, 9, probe), again.read(probe, 9, probe)
    assert torch.allclose(a.residual_z, b.residual_z) and torch.allclose(a.percentile, b.percentile)
    assert a.divergence_threshold == b.divergence_threshold


def test_bad_control_input_is_refused():
    with pytest.raises(InvalidInputError):
        fit_length_null(torch.zeros(5, 4), torch.ones(5), 0.01)
    with pytest.raises(InvalidInputError):
        fit_length_null(torch.full((5, 4, 2), math.nan), torch.full((5,), 4), 0.01)
    with pytest.raises(InvalidInputError):
        fit_length_null(torch.zeros(5, 4, 2), torch.full((5,), 4), 1.5)


def test_flags_and_alerts_name_the_concept_both_signals_and_the_length():
    from probes.divergence import alerts, divergences

    residual, text, lengths = answers(600, 3, 16, seed=0)
    null = fit_length_null(residual, lengths, 0.02, text_traces=text, min_tokens=1)
    mean_r = prefix_means(residual, lengths)[:, 11].nanmean(0)
    mean_t = prefix_means(text, lengths)[:, 11].nanmean(0)
    steered = mean_r.clone()
    steered[0] += 0.2  # far above any ordinary answer, the words unchanged
    reading = null.read(steered, 12, mean_t)
    found = divergences(reading, ["pessimism", "formality", "urgency"])
    assert [(d.concept, d.kind) for d in found] == [(0, "hidden")]
    assert "pessimism" in found[0].reason and "12 tokens" in found[0].reason
    assert f"{found[0].residual_z:+.2f}" in found[0].reason and f"{found[0].text_z:+.2f}" in found[0].reason
    assert [a.concept for a in alerts(reading, ["pessimism", "formality", "urgency"])] == [0]
    # Two low signals never flag, however far apart.
    low = mean_r.clone()
    low[1] -= 0.3
    lower_text = mean_t.clone()
    lower_text[1] -= 0.9
    assert not divergences(null.read(low, 12, lower_text), ["a", "b", "c"])


def grouped_answers(n_groups: int, per_group: int, k: int, max_len: int, seed: int):
    """Answers in kinds of request (groups) that shift the residual/text gap and the residual
    itself by a per-group offset: exchangeable groups, not exchangeable answers."""
    g = torch.Generator().manual_seed(seed)
    residual, text, lengths = answers(n_groups * per_group, k, max_len, seed)
    group = torch.arange(n_groups).repeat_interleave(per_group)
    gap_shift = torch.randn(n_groups, 1, k, generator=g)[group] * 0.004
    level_shift = torch.randn(n_groups, 1, k, generator=g)[group] * 0.015
    return residual + level_shift + gap_shift, text + level_shift, lengths, group.tolist()


def test_held_out_group_thresholds_spend_less_on_kinds_of_request_the_control_set_lacks():
    """Control answers come from 8 kinds of request; live traffic from 8 kinds never seen.
    Thresholds set in sample treat answers as exchangeable, which they are not across kinds;
    set on held-out-group statistics they also carry the shift between kinds, so on new kinds
    they raise fewer false alarms, for every draw of the control set. (With 8 groups they cannot
    promise the target on any new kind: the group shift is sampled 8 times.)"""
    k, length, target = 5, 16, 0.02
    for control_seed in (3, 4, 5, 6):
        residual, text, lengths, groups = grouped_answers(8, 150, k, length, seed=control_seed)
        in_sample = fit_length_null(residual, lengths, target, text_traces=text, min_tokens=1)
        held_out = fit_length_null(residual, lengths, target, text_traces=text, min_tokens=1, groups=groups)
        assert (held_out.threshold_method, in_sample.threshold_method) == ("held_out_group", "in_sample")
        assert float(held_out.divergence_threshold[length - 1]) > float(in_sample.divergence_threshold[length - 1])
        assert torch.equal(held_out.residual_mean, in_sample.residual_mean)  # same z units: only thresholds move
        rates = {"in_sample": 0.0, "held_out": 0.0}
        for seed in range(10):
            r, t, n, _ = grouped_answers(8, 100, k, length, seed=100 + seed)
            for name, null in (("in_sample", in_sample), ("held_out", held_out)):
                rates[name] += max(family_rates(null, r, t, n, length)[:2]) / 10
        assert rates["held_out"] < 0.95 * rates["in_sample"], (control_seed, rates)
    assert null_from_dict(null_to_dict(held_out)).threshold_method == "held_out_group"


def test_group_labels_must_match_the_answers():
    residual, text, lengths = answers(40, 2, 8, seed=1)
    with pytest.raises(InvalidInputError, match="group labels"):
        fit_length_null(residual, lengths, 0.1, text_traces=text, groups=["a", "b"] * 3)
