"""Pure-math tier: synthetic ground truth, no model."""

import numpy as np
import pytest
import torch

from auditor.errors import InvalidInputError
from probes.calibration import fit_calibration, fpr_thresholds, percentiles, z_scores
from probes.extraction import extract_direction, extract_per_layer, mean_difference
from probes.pooling import pool
from probes.scoring import aggregate, cosine_scores, masked_mean
from probes.separation import auroc, auroc_with_ci
from probes.steering import Steering, apply_steering, start_position, steering_delta
from probes.sweep import choose_layer, sweep_layers
from probes.validation import check_layer, check_pairs, check_vector

D_MODEL = 64


def planted_pairs(n_pairs: int, strength: float, noise: float = 1.0, seed: int = 0):
    """Pairs that share random context and differ by `strength` along one hidden direction."""
    gen = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(D_MODEL, generator=gen), dim=0)
    context = 5 * torch.randn(n_pairs, D_MODEL, generator=gen)
    pos = context + strength * direction + noise * torch.randn(n_pairs, D_MODEL, generator=gen)
    neg = context + noise * torch.randn(n_pairs, D_MODEL, generator=gen)
    return pos, neg, direction


@pytest.mark.parametrize("method", ["mean_diff", "logistic", "pca", "lda"])
def test_every_method_recovers_a_planted_direction(method):
    pos, neg, direction = planted_pairs(n_pairs=1000, strength=6.0, noise=0.3)
    recovered = extract_direction(pos, neg, method)
    assert float(recovered.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(recovered @ direction) > 0.99


def test_mean_difference_equals_the_articles_formula():
    pos, neg, _ = planted_pairs(n_pairs=12, strength=2.0)
    raw = (pos - neg).mean(dim=0)
    assert torch.allclose(mean_difference(pos, neg), raw / raw.norm(), atol=1e-6)


def test_pca_sign_points_toward_the_positive_side():
    pos, neg, direction = planted_pairs(n_pairs=50, strength=6.0, noise=0.3)
    assert float(extract_direction(neg, pos, "pca") @ direction) < -0.99


def test_per_layer_extraction_finds_each_layers_own_direction():
    pos_a, neg_a, dir_a = planted_pairs(200, 6.0, 0.3, seed=1)
    pos_b, neg_b, dir_b = planted_pairs(200, 6.0, 0.3, seed=2)
    directions = extract_per_layer(torch.stack([pos_a, pos_b]), torch.stack([neg_a, neg_b]), "mean_diff")
    assert float(directions[0] @ dir_a) > 0.99 and float(directions[1] @ dir_b) > 0.99


@pytest.mark.parametrize(
    "pos, neg, message",
    [
        (torch.zeros(0, D_MODEL), torch.zeros(0, D_MODEL), "no pairs"),
        (torch.ones(3, D_MODEL), torch.ones(2, D_MODEL), "unequal"),
        (torch.full((2, D_MODEL), float("nan")), torch.ones(2, D_MODEL), "NaN"),
        (torch.ones(2, D_MODEL), torch.ones(2, D_MODEL), "do not differ"),
    ],
)
def test_extraction_rejects_bad_activations(pos, neg, message):
    with pytest.raises(InvalidInputError, match=message):
        extract_direction(pos, neg, "mean_diff")


def test_unknown_method_is_named_in_the_error():
    with pytest.raises(InvalidInputError, match="unknown extraction method 'ica'"):
        extract_direction(torch.ones(2, 4), torch.zeros(2, 4), "ica")


def test_pair_and_vector_validation():
    with pytest.raises(InvalidInputError, match="unequal"):
        check_pairs(["a", "b"], ["c"])
    with pytest.raises(InvalidInputError, match="empty"):
        check_pairs(["a", " "], ["c", "d"])
    with pytest.raises(InvalidInputError, match="no contrastive pairs"):
        check_pairs([], [])
    with pytest.raises(InvalidInputError, match="dimension 10 but the model's d_model is 576"):
        check_vector(torch.ones(10), 576)
    with pytest.raises(InvalidInputError, match="zero vector"):
        check_vector(torch.zeros(576), 576)
    with pytest.raises(InvalidInputError, match="Inf"):
        check_vector(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(InvalidInputError, match="out of range"):
        check_layer(30, 30)
    with pytest.raises(InvalidInputError, match="out of range"):
        check_layer(-1, 30)


def test_auroc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.integers(0, 2, 60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(scores, labels) == pytest.approx(brute)


def test_auroc_ci_brackets_the_estimate_and_needs_two_classes():
    rng = np.random.default_rng(1)
    labels = np.array([1] * 80 + [0] * 80)
    scores = rng.normal(labels * 1.0, 1.0)
    est = auroc_with_ci(scores, labels, n_boot=300)
    assert est.ci_low < est.auroc < est.ci_high
    assert 0.65 < est.auroc < 0.9  # true AUROC for d=1 is Phi(1/sqrt 2) = 0.76
    with pytest.raises(InvalidInputError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])


def test_pooling_skips_the_sink_and_respects_padding():
    acts = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    acts[:, 0] = 1e4  # attention sink
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    mean = pool(acts, mask, "mean")
    assert torch.allclose(mean[0], acts[0, 1:3].mean(dim=0))
    assert torch.allclose(mean[1], acts[1, 1:4].mean(dim=0))
    last = pool(acts, mask, "last")
    assert torch.equal(last[0], acts[0, 2]) and torch.equal(last[1], acts[1, 3])
    layered = pool(torch.stack([acts, 2 * acts]), mask, "last")  # [layers, batch, d]
    assert torch.equal(layered[1, 0], 2 * acts[0, 2])
    with pytest.raises(InvalidInputError, match="no tokens left"):
        pool(acts, torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]]), "mean")


def test_one_matmul_scores_equal_per_vector_cosines():
    gen = torch.Generator().manual_seed(0)
    resid = torch.randn(3, 7, D_MODEL, generator=gen)  # [layers, tokens, d]
    directions = torch.nn.functional.normalize(torch.randn(3, 5, D_MODEL, generator=gen), dim=-1)
    scores = cosine_scores(resid, directions)
    assert scores.shape == (3, 7, 5)
    for layer in range(3):
        for concept in range(5):
            expected = torch.nn.functional.cosine_similarity(resid[layer], directions[layer, concept][None], dim=-1)
            assert torch.allclose(scores[layer, :, concept], expected, atol=1e-5)
    agg = aggregate(scores, start=2)
    assert torch.allclose(agg.mean, scores[:, 2:].mean(dim=1))
    assert torch.equal(agg.last, scores[:, -1]) and agg.n_tokens == 5
    with pytest.raises(InvalidInputError, match="disagree"):
        cosine_scores(resid, directions[:2])


def test_masked_mean_ignores_padding_and_sink():
    scores = torch.randn(2, 2, 4, 3)  # [layers, batch, pos, concepts]
    keep = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]]).bool()
    means = masked_mean(scores, keep)
    assert torch.allclose(means[:, 0], scores[:, 0, 1:3].mean(dim=1))
    assert torch.allclose(means[:, 1], scores[:, 1, 1:4].mean(dim=1))


def test_calibration_z_scores_and_percentiles():
    reference = torch.randn(1000, 2, 3, generator=torch.Generator().manual_seed(0)) * 0.05 + 0.1
    cal = fit_calibration(reference)
    assert torch.allclose(z_scores(cal, cal.mean), torch.zeros(2, 3, dtype=torch.float64), atol=1e-9)
    one_sd_up = cal.mean + cal.std
    assert torch.allclose(z_scores(cal, one_sd_up), torch.ones(2, 3, dtype=torch.float64))
    pct = percentiles(cal, one_sd_up)
    assert ((pct > 0.78) & (pct < 0.90)).all()  # Phi(1) = 0.84
    assert float(percentiles(cal, torch.full((2, 3), 10.0)).min()) == 1.0
    with pytest.raises(InvalidInputError):
        fit_calibration(torch.randn(1, 2, 3))


def test_fpr_thresholds_let_through_at_most_the_target_share_of_the_reference():
    reference = torch.randn(2000, 2, 3, generator=torch.Generator().manual_seed(1))
    cal = fit_calibration(reference)
    thresholds, achieved = fpr_thresholds(cal, 0.01)
    assert torch.allclose(thresholds, torch.full((2, 3), 2.326, dtype=torch.float64), atol=0.25)  # N(0,1) 99th pct
    assert torch.all(achieved <= 0.01) and torch.all(achieved >= 0.009)
    exceeded = (reference.double() > thresholds).double().mean(dim=0)
    assert torch.allclose(exceeded, achieved)
    # Ties: a reference of identical scores can only flag what is strictly above them.
    flat = fit_calibration(torch.zeros(50, 1, 1))
    assert fpr_thresholds(flat, 0.05)[1].item() == 0.0
    with pytest.raises(InvalidInputError, match="target_fpr"):
        fpr_thresholds(cal, 1.5)


def test_steering_adds_delta_only_from_its_start_position():
    resid = torch.zeros(1, 6, 4)
    delta = steering_delta(torch.tensor([0.0, 2.0, 0.0, 0.0]), alpha=3.0)
    assert torch.equal(delta, torch.tensor([0.0, 3.0, 0.0, 0.0]))
    steer = Steering(layer=0, delta=delta, start_position=start_position("generated", prompt_length=4))
    out = apply_steering(resid, steer, offset=0)
    assert out[0, :3].abs().sum() == 0 and torch.equal(out[0, 3], delta)
    # a KV-cached decode step at absolute position 7 is always past the start
    assert torch.equal(apply_steering(torch.zeros(1, 1, 4), steer, offset=7)[0, 0], delta)
    assert torch.equal(steering_delta(torch.tensor([0.0, 1.0]), 0.5, reference_norm=200.0), torch.tensor([0.0, 100.0]))
    with pytest.raises(InvalidInputError, match="finite"):
        steering_delta(torch.ones(4), float("nan"))
    with pytest.raises(InvalidInputError, match="scope"):
        start_position("prompt", 4)


def test_sweep_picks_the_layer_where_the_concept_lives():
    layers_pos, layers_neg = [], []
    for layer, strength in enumerate([0.0, 0.5, 20.0, 2.0]):
        pos, neg, _ = planted_pairs(40, strength, noise=1.0, seed=layer)
        layers_pos.append(pos)
        layers_neg.append(neg)
    results = sweep_layers(torch.stack(layers_pos), torch.stack(layers_neg), "mean_diff")
    assert [r.layer for r in results] == [0, 1, 2, 3]
    assert results[2].auroc > 0.95 and results[0].auroc < 0.75
    assert choose_layer(results, band=None) == 2
    # the default band (25%-75% depth) keeps the choice away from token-identity layers
    assert choose_layer(results, n_layers=4) in (1, 2)
    assert choose_layer(results, n_layers=4, band=(0.5, 1.0)) == 2
    assert choose_layer(results, n_layers=4, band=(0.75, 1.0)) == 3


def test_shrinkage_lda_discounts_a_nuisance_direction_the_mean_difference_follows():
    """Pairs differ along the concept and, unequally, along a high-variance nuisance axis (what
    a text is about). The mean difference leans on the nuisance; the whitened direction
    separates new texts better."""
    gen = torch.Generator().manual_seed(0)
    concept = torch.nn.functional.normalize(torch.randn(D_MODEL, generator=gen), dim=0)
    nuisance = torch.nn.functional.normalize(torch.randn(D_MODEL, generator=gen), dim=0)

    def texts(n, present):
        topic = 4.0 * torch.randn(n, 1, generator=gen) + (1.5 if present else 0.0)  # pairs' topics differ
        return topic * nuisance + (1.0 if present else 0.0) * concept + 0.5 * torch.randn(n, D_MODEL, generator=gen)

    pos, neg = texts(150, True), texts(150, False)
    test_pos, test_neg = texts(500, True), texts(500, False)
    labels = [1] * 500 + [0] * 500

    def separation(direction):
        return auroc(torch.cat([test_pos, test_neg]) @ direction, labels)

    lda, mean = extract_direction(pos, neg, "lda"), mean_difference(pos, neg)
    assert float(lda.norm()) == pytest.approx(1.0, abs=1e-5)
    assert separation(lda) > separation(mean) + 0.05
    assert separation(lda) > 0.8
