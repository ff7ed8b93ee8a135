"""Model tier: KV-cached generation under hooks on the real default model."""

import pytest
import torch

from auditor.errors import InvalidInputError
from probes.steering import Steering, start_position, steering_delta
from workers.runtime.generate import SamplingConfig, encode_prompt, generate
from workers.runtime.hooks import ResidualCapture, hooked, live_hook_count

pytestmark = pytest.mark.model

PROMPT = "I'm thinking about learning to play guitar. Any advice for getting started?"
N_TOKENS = 24


@pytest.fixture(scope="module")
def prompt_ids(model):
    return encode_prompt(model, PROMPT)


@pytest.fixture(scope="module")
def all_layers(model):
    return list(range(model.n_layers))


def pessimism_steering(host, bank, prompt_ids, scope: str, alpha: float = 0.6) -> Steering:
    vectors = bank.vectors["pessimism"]
    layer = vectors.auto_layer
    delta = steering_delta(vectors.direction(layer), alpha, bank.typical_norms[layer])
    return Steering(layer, delta, start_position(scope, len(prompt_ids)))


@pytest.mark.parametrize("monitored", [False, True], ids=["no-probes", "probes"])
@pytest.mark.parametrize("scope", [None, "generated", "all"], ids=["no-steer", "steer-generated", "steer-all"])
def test_cached_generation_equals_uncached_token_for_token(host, bank, model, prompt_ids, all_layers, monitored, scope):
    steering = [pessimism_steering(host, bank, prompt_ids, scope)] if scope else []
    layers = all_layers if monitored else None
    config = SamplingConfig(max_new_tokens=N_TOKENS, stop_at_eos=False)
    cached = generate(model, prompt_ids, config, layers, steering, use_cache=True)
    uncached = generate(model, prompt_ids, config, layers, steering, use_cache=False)
    assert cached.output_ids == uncached.output_ids
    assert len(cached.output_ids) == N_TOKENS
    if monitored:
        # same positions, same values: the residuals came from the same forward passes
        assert cached.resid.shape == (model.n_layers, len(prompt_ids) + N_TOKENS - 1, model.d_model)
        assert cached.resid.shape == uncached.resid.shape
        scale = cached.resid[:, 1:].abs().amax()
        assert float((cached.resid[:, 1:] - uncached.resid[:, 1:]).abs().amax() / scale) < 1e-3


def test_cached_generation_equals_plain_hugging_face_generate(model, prompt_ids):
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        reference = model.hf_model.generate(ids, max_new_tokens=N_TOKENS, do_sample=False, min_new_tokens=N_TOKENS)
    ours = generate(model, prompt_ids, SamplingConfig(max_new_tokens=N_TOKENS, stop_at_eos=False))
    assert ours.output_ids == reference[0, len(prompt_ids) :].tolist()


def test_probes_change_no_output_token_and_no_logit(model, prompt_ids, all_layers):
    config = SamplingConfig(max_new_tokens=N_TOKENS)
    plain = generate(model, prompt_ids, config)
    monitored = generate(model, prompt_ids, config, monitor_layers=all_layers)
    assert plain.output_ids == monitored.output_ids and plain.resid is None
    tokens = torch.tensor([prompt_ids])
    with torch.inference_mode():
        bare = model.bridge.forward(tokens)
        with hooked(model, capture=ResidualCapture(all_layers)):
            probed = model.bridge.forward(tokens)
    assert torch.equal(bare, probed)


def test_steering_changes_the_text(host, bank, model, prompt_ids):
    config = SamplingConfig(max_new_tokens=N_TOKENS)
    steered = generate(model, prompt_ids, config, steering=[pessimism_steering(host, bank, prompt_ids, "generated")])
    assert steered.output_ids != generate(model, prompt_ids, config).output_ids


class FailingCapture(ResidualCapture):
    """A probe that blows up in the middle of a forward pass."""

    def hook_for(self, layer):
        def explode(resid, hook):
            raise RuntimeError(f"probe failed at layer {layer}")

        return explode if layer == self.layers[-1] else super().hook_for(layer)


def test_no_hook_survives_a_request_even_when_it_raises(model, prompt_ids, all_layers):
    assert live_hook_count(model) == 0
    generate(model, prompt_ids, SamplingConfig(max_new_tokens=3), monitor_layers=all_layers)
    assert live_hook_count(model) == 0
    steer = Steering(layer=2, delta=torch.ones(model.d_model))
    with pytest.raises(RuntimeError, match="probe failed at layer 20"):
        with hooked(model, capture=FailingCapture([5, 20]), steering=[steer]):
            assert live_hook_count(model) == 3
            with torch.inference_mode():
                model.bridge.forward(torch.tensor([prompt_ids]))
    assert live_hook_count(model) == 0
    with pytest.raises(KeyError):
        with hooked(model, steering=[steer]):
            raise KeyError("request failed between passes")
    assert live_hook_count(model) == 0


def test_a_read_stopped_after_its_deepest_layer_captures_what_a_full_pass_does(model, prompt_ids):
    """`stop_after` ends the pass early (no logits): the captured residuals are those of a full
    forward pass, no hook outlives the read, and the next generation is unaffected."""
    before = generate(model, prompt_ids, SamplingConfig(max_new_tokens=6))
    tokens = torch.tensor([prompt_ids])
    with torch.inference_mode():
        full, stopped = ResidualCapture([3, 11]), ResidualCapture([3, 11])
        with hooked(model, capture=full):
            logits = model.bridge.forward(tokens)
        returned = []
        with hooked(model, capture=stopped, stop_after=11):
            returned.append(model.bridge.forward(tokens))
    assert returned == []  # the pass ended at layer 11: the forward call never returned
    assert logits.shape[:2] == tokens.shape  # the full pass, for comparison
    assert torch.equal(stopped.stacked(), full.stacked())
    assert live_hook_count(model) == 0
    assert generate(model, prompt_ids, SamplingConfig(max_new_tokens=6)).output_ids == before.output_ids


@pytest.mark.parametrize(
    "steer, message",
    [
        (Steering(layer=3, delta=torch.ones(7)), "dimension 7 but the model's d_model is 576"),
        (Steering(layer=3, delta=torch.zeros(576)), "zero vector"),
        (Steering(layer=3, delta=torch.full((576,), float("nan"))), "NaN"),
        (Steering(layer=30, delta=torch.ones(576)), "out of range"),
    ],
)
def test_bad_steering_vectors_are_rejected_before_any_forward(model, prompt_ids, steer, message):
    with pytest.raises(InvalidInputError, match=message):
        generate(model, prompt_ids, SamplingConfig(max_new_tokens=3), steering=[steer])
    assert live_hook_count(model) == 0


def test_stops_at_eos_or_at_the_token_limit(model):
    ids = encode_prompt(model, "Reply with just the word yes.")
    stopped = generate(model, ids, SamplingConfig(max_new_tokens=40))
    assert stopped.finish_reason == "stop"
    assert stopped.output_ids[-1] in model.eos_token_ids
    assert stopped.output_ids.count(stopped.output_ids[-1]) == 1 or len(stopped.output_ids) < 40
    limited = generate(model, ids, SamplingConfig(max_new_tokens=1))
    assert limited.finish_reason == "length" and len(limited.output_ids) == 1


def test_sampling_is_reproducible_with_a_seed_and_varies_without(model, prompt_ids):
    config = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    first = generate(model, prompt_ids, config).output_ids
    assert first == generate(model, prompt_ids, config).output_ids
    others = {
        tuple(generate(model, prompt_ids, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=s)).output_ids)
        for s in range(3)
    }
    assert len(others) > 1


def test_prompt_longer_than_the_context_is_rejected(model):
    too_long = [1] * (model.max_context - 10)
    with pytest.raises(InvalidInputError, match="exceeds the model's context"):
        generate(model, too_long, SamplingConfig(max_new_tokens=64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "at least 1"),
        ({"temperature": -1.0}, ">= 0"),
        ({"top_p": 0.0}, "top_p"),
    ],
)
def test_bad_sampling_settings_are_rejected(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        SamplingConfig(**kwargs)


def test_a_local_model_directory_and_a_gguf_path_load_the_same_weights(model, settings, prompt_ids):
    from auditor.model_identity import bundled_gguf_path
    from workers.runtime.model import load_model

    converted = next(p for p in settings.model_cache_dir.iterdir() if (p / "config.json").exists())
    as_directory = load_model(str(converted))
    as_gguf_path = load_model(str(bundled_gguf_path()), cache_dir=settings.model_cache_dir)
    assert as_directory.fingerprint.loader == "transformers"
    assert as_gguf_path.fingerprint.hash == model.fingerprint.hash  # same file, same basis
    assert as_directory.fingerprint.hash != model.fingerprint.hash  # another loader is another basis
    config = SamplingConfig(max_new_tokens=12)
    expected = generate(model, prompt_ids, config).output_ids
    assert generate(as_directory, prompt_ids, config).output_ids == expected
    assert generate(as_gguf_path, prompt_ids, config).output_ids == expected


def test_a_missing_model_is_a_clear_error():
    from auditor.errors import ModelLoadError
    from workers.runtime.model import load_model

    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model("/nonexistent/model.gguf")
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model("/nonexistent/model-directory")


def test_the_api_can_know_the_fingerprint_without_loading_weights(model):
    from auditor.model_identity import describe_model

    described = describe_model("smollm2")
    assert described == model.fingerprint
    assert described.hash == model.fingerprint.hash


COUNTING = "Count from 1 to 10, separated by commas. Reply with the numbers only."


def test_logprobs_are_the_models_own_and_the_same_in_a_batch(model, all_layers):
    """Greedy: the chosen token is the most likely one, so its log-probability is the top one;
    log-probabilities are <= 0, sorted, and the batched path reports the same numbers."""
    from workers.runtime.batch_generate import BatchGenerator, SequenceRequest

    prompt = encode_prompt(model, COUNTING)
    config = SamplingConfig(max_new_tokens=12, logprobs=3, stop_at_eos=False)
    alone = generate(model, prompt, config, all_layers)
    assert len(alone.logprobs) == len(alone.output_ids) == 12
    for token, lp in zip(alone.output_ids, alone.logprobs):
        assert lp.token == token and len(lp.top) == 3
        assert lp.top[0] == (token, pytest.approx(lp.logprob, abs=1e-6))
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and values[0] <= 0
        assert sum(torch.tensor(values).exp()) <= 1 + 1e-5
    assert generate(model, prompt, SamplingConfig(max_new_tokens=4), all_layers).logprobs is None

    batch = BatchGenerator(model, all_layers)
    finished = batch.add([("row", SequenceRequest(prompt, config))])
    while not finished:
        finished = batch.step()
    ((_, batched),) = finished
    assert batched.output_ids == alone.output_ids
    for a, b in zip(alone.logprobs, batched.logprobs):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-3


def test_a_stop_sequence_ends_the_answer_before_it_and_the_span_is_what_is_returned(model, all_layers):
    """Greedy, so the stopped answer is a prefix of the unstopped one: the longest run of whole
    tokens whose text ends before the first "5"; its residuals are exactly those positions."""
    from workers.runtime.batch_generate import BatchGenerator, SequenceRequest

    prompt = encode_prompt(model, COUNTING)
    full = generate(model, prompt, SamplingConfig(max_new_tokens=40), all_layers)
    full_text = full.answer_text(model.tokenizer)
    assert "5" in full_text and "4" in full_text.split("5")[0], full_text  # the premise of the test
    before = full_text[: full_text.index("5")]

    config = SamplingConfig(max_new_tokens=40, stop=["5", "never-appears"])
    stopped = generate(model, prompt, config, all_layers)
    k = len(stopped.output_ids)
    text = stopped.answer_text(model.tokenizer)
    assert stopped.finish_reason == "stop" and "5" not in text and "4" in text, text
    assert stopped.output_ids == full.output_ids[:k] and before.startswith(text)
    one_more = model.tokenizer.decode(full.output_ids[: k + 1], skip_special_tokens=True)
    assert not before.startswith(one_more), (text, one_more)  # the next token reaches the stop
    span = len(prompt) - 1 + k
    assert stopped.resid.shape[1] == span
    assert torch.allclose(stopped.resid, full.resid[:, :span], atol=1e-4)

    batch = BatchGenerator(model, all_layers)
    finished = batch.add([("stopped", SequenceRequest(prompt, config))])
    while not finished:
        finished = batch.step()
    ((_, batched),) = finished
    assert batched.output_ids == stopped.output_ids and batched.finish_reason == "stop"
    assert batched.answer_text(model.tokenizer) == text
    assert batched.resid.shape[1] == span


def test_top_k_samples_only_among_the_k_most_likely_tokens():
    import torch

    from workers.runtime.generate import SamplingConfig, _next_token

    logits = torch.randn(500, generator=torch.Generator().manual_seed(3))
    top3 = set(logits.topk(3).indices.tolist())
    generator = torch.Generator().manual_seed(0)
    one = [_next_token(logits, SamplingConfig(temperature=1.0, top_k=1), generator) for _ in range(50)]
    three = [_next_token(logits, SamplingConfig(temperature=2.0, top_k=3), generator) for _ in range(300)]
    every = [_next_token(logits, SamplingConfig(temperature=2.0), generator) for _ in range(300)]
    assert set(one) == {int(logits.argmax())}
    assert set(three) == top3  # all three drawn, nothing else
    assert len(set(every) - top3) > 50  # without top_k, far more than three tokens come up
