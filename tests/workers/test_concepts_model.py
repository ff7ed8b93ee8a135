"""Model tier: extraction, sweep, scoring and calibration on the real default model."""

import pytest
import torch

from auditor.errors import InvalidInputError
from probes.concepts import ConceptDefinition, load_concept
from probes.separation import auroc
from support.eval_data import eval_rows
from workers.monitoring.concepts import extract_concept, per_text_scores
from workers.runtime.activations import sink_token_id

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def small_concept():
    full = load_concept("pessimism")
    return ConceptDefinition("pessimism-12", "", full.positives[:12], full.negatives[:12])


def reference_direction(model, concept, layer: int, pooling: str) -> torch.Tensor:
    """The article's procedure, one text at a time through run_with_cache, no batching."""

    def residual(text: str) -> torch.Tensor:
        ids = [sink_token_id(model), *model.tokenizer(text, add_special_tokens=False)["input_ids"]]
        name = f"blocks.{layer}.hook_resid_post"
        with torch.inference_mode():
            _, cache = model.bridge.run_with_cache(torch.tensor([ids]), names_filter=name)
        acts = cache[name][0]  # [pos, d_model]
        return acts[-1] if pooling == "last" else acts[1:].mean(dim=0)

    pos = torch.stack([residual(t) for t in concept.positives])
    neg = torch.stack([residual(t) for t in concept.negatives])
    raw = (pos - neg).mean(dim=0)
    return raw / raw.norm()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_batched_extraction_equals_the_plain_reference(model, small_concept, pooling):
    vectors = extract_concept(model, small_concept, "mean_diff", pooling, batch_size=5)
    for layer in (4, 15, 25):
        expected = reference_direction(model, small_concept, layer, pooling)
        assert float(vectors.direction(layer) @ expected) > 0.9999
    assert vectors.provenance["n_pairs"] == 12
    assert vectors.provenance["pairs_hash"] == small_concept.pairs_hash
    assert vectors.provenance["model_fingerprint"] == model.fingerprint.hash
    auto = next(r for r in vectors.sweep if r.layer == vectors.auto_layer)
    assert vectors.provenance["pair_separation_auroc"] == round(auto.auroc, 4)
    assert (vectors.provenance["method"], vectors.provenance["pooling"]) == ("mean_diff", pooling)


def test_batched_scoring_equals_one_text_at_a_time(model, bank):
    texts = [
        "Short one.",
        "A somewhat longer sentence about the weather in spring.",
        "Nothing ever works out for me, and it won't start now.",
    ]
    batched = per_text_scores(model, texts, bank.directions, bank.layers, batch_size=3)
    single = torch.cat([per_text_scores(model, [t], bank.directions, bank.layers, batch_size=1) for t in texts])
    assert batched.shape == (3, len(bank.layers), len(bank.names))
    assert torch.allclose(batched, single, atol=1e-4)


def test_pessimism_probe_separates_real_sentiment_text(host, model):
    rows = eval_rows("sst2_test.jsonl", 300)
    vectors = host.vectors("pessimism")
    scores = per_text_scores(
        model, [r["text"] for r in rows], vectors.direction(vectors.auto_layer)[None, None], [vectors.auto_layer]
    )
    negative_sentiment = [1 - r["label"] for r in rows]
    assert auroc(scores[:, 0, 0], negative_sentiment) >= 0.8


def test_auto_layer_comes_from_held_out_pairs(host, model):
    vectors = host.vectors("pessimism")
    assert len(vectors.sweep) == model.n_layers
    best = max(r.auroc for r in vectors.sweep if r.layer == vectors.auto_layer for _ in [0])
    assert best > 0.75  # held-out pairs separate well at the chosen layer


def test_calibration_centres_neutral_text_and_flags_the_concept(host, bank):
    k = bank.index("pessimism")
    li = bank.layer_index(bank.auto_layers["pessimism"])
    assert bank.calibration.n_reference > 100
    assert abs(float(bank.calibration.mean[li, k])) < 1  # cosines, not norms
    scores = host.probe(
        [
            "Everything we try falls apart; there is no reason to expect this to end well.",
            "The museum opens at nine and the cafe is on the second floor.",
        ],
        bank,
    )
    gloomy, neutral = float(scores["z"][0, li, k]), float(scores["z"][1, li, k])
    assert gloomy > 2.0 and abs(neutral) < 2.0
    assert float(scores["percentile"][0, li, k]) > 0.95


def test_steering_moves_the_probe_score_and_the_text(host, bank):
    from workers.runtime.generate import SamplingConfig
    from workers.serving.host import SteerRequest

    prompt = "What should I pack for a weekend trip to the coast?"
    sampling = SamplingConfig(max_new_tokens=32)
    baseline = host.generate(prompt, sampling, bank=bank)
    steered = host.generate(prompt, sampling, [SteerRequest("pessimism", 0.3, relative=True)], bank)
    assert steered.text != baseline.text
    injected = bank.auto_layers["pessimism"]
    # Read five layers downstream, with that layer's own direction: the injected signal must
    # have propagated through the network, not merely be present where it was added.
    downstream = injected + 5
    assert steered.scores.at("pessimism", downstream)["z"] > baseline.scores.at("pessimism", downstream)["z"] + 2


def test_texts_longer_than_the_context_and_empty_texts_are_rejected(model, bank):
    with pytest.raises(InvalidInputError, match="context"):
        per_text_scores(model, ["word " * (model.max_context + 5)], bank.directions, bank.layers)
    with pytest.raises(InvalidInputError, match="empty"):
        per_text_scores(model, ["fine", "  "], bank.directions, bank.layers)


def test_steering_rejects_bad_vectors_and_layers(host, bank):
    from workers.serving.host import SteerRequest

    with pytest.raises(InvalidInputError, match="out of range"):
        host.steering(SteerRequest("pessimism", 1.0, layer=model_layers(host)), bank, 10)
    with pytest.raises(InvalidInputError, match="finite"):
        host.steering(SteerRequest("pessimism", float("nan")), bank, 10)
    with pytest.raises(InvalidInputError, match="unknown concept"):
        host.steering(SteerRequest("optimism-that-does-not-exist", 1.0), bank, 10)


def model_layers(host) -> int:
    return host.model.n_layers
