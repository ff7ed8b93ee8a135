"""Model tier: KV-cached generation under hooks on the real default model."""

import pytest
import torch

from probes.errors import InvalidInputError
from probes.steering import Steering, start_position, steering_delta
from workers.runtime.generate import SamplingConfig, encode_prompt, generate
from workers.runtime.hooks import hooked, live_hook_count

pytestmark = pytest.mark.model

PROMPT = "I'm thinking about learning to play guitar. Any advice for getting started?"
N_TOKENS = 24


@pytest.fixture(scope="module")
def prompt_ids(model):
    return encode_prompt(model, PROMPT)


@pytest.fixture(scope="module")
def all_layers(model):
    return list(range(model.n_layers))


def pessimism_steering(engine, bank, prompt_ids, scope: str, alpha: float = 0.6) -> Steering:
    vectors = bank.vectors["pessimism"]
    layer = vectors.auto_layer
    delta = steering_delta(vectors.direction(layer), alpha, bank.typical_norms[layer])
    return Steering(layer, delta, start_position(scope, len(prompt_ids)))


@pytest.mark.parametrize("monitored", [False, True], ids=["no-probes", "probes"])
@pytest.mark.parametrize("scope", [None, "generated", "all"], ids=["no-steer", "steer-generated", "steer-all"])
def test_cached_generation_equals_uncached_token_for_token(engine, bank, model, prompt_ids, all_layers, monitored, scope):
    steering = [pessimism_steering(engine, bank, prompt_ids, scope)] if scope else []
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
    assert ours.output_ids == reference[0, len(prompt_ids):].tolist()


def test_probes_change_no_output_token_and_no_logit(model, prompt_ids, all_layers):
    config = SamplingConfig(max_new_tokens=N_TOKENS)
    plain = generate(model, prompt_ids, config)
    monitored = generate(model, prompt_ids, config, monitor_layers=all_layers)
    assert plain.output_ids == monitored.output_ids and plain.resid is None
    tokens = torch.tensor([prompt_ids])
    with torch.inference_mode():
        bare = model.bridge.forward(tokens)
        from workers.runtime.hooks import ResidualCapture

        with hooked(model, capture=ResidualCapture(all_layers)):
            probed = model.bridge.forward(tokens)
    assert torch.equal(bare, probed)


def test_steering_changes_the_text(engine, bank, model, prompt_ids):
    config = SamplingConfig(max_new_tokens=N_TOKENS)
    steered = generate(model, prompt_ids, config, steering=[pessimism_steering(engine, bank, prompt_ids, "generated")])
    assert steered.output_ids != generate(model, prompt_ids, config).output_ids


def test_no_hook_survives_a_request_even_when_it_raises(model, prompt_ids, all_layers):
    assert live_hook_count(model) == 0
    generate(model, prompt_ids, SamplingConfig(max_new_tokens=3), monitor_layers=all_layers)
    assert live_hook_count(model) == 0
    wrong_width = Steering(layer=3, delta=torch.ones(model.d_model + 1))  # fails inside the forward
    with pytest.raises(RuntimeError):
        generate(model, prompt_ids, SamplingConfig(max_new_tokens=3), all_layers, [wrong_width])
    assert live_hook_count(model) == 0
    with pytest.raises(KeyError):
        with hooked(model, steering=[Steering(layer=2, delta=torch.zeros(model.d_model))]):
            assert live_hook_count(model) == 1
            raise KeyError("request failed")
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
    others = {tuple(generate(model, prompt_ids, SamplingConfig(max_new_tokens=16, temperature=1.0, seed=s)).output_ids) for s in range(3)}
    assert len(others) > 1


def test_prompt_longer_than_the_context_is_rejected(model):
    too_long = [1] * (model.max_context - 10)
    with pytest.raises(InvalidInputError, match="exceeds the model's context"):
        generate(model, too_long, SamplingConfig(max_new_tokens=64))


@pytest.mark.parametrize("kwargs, message", [
    ({"max_new_tokens": 0}, "at least 1"),
    ({"temperature": -1.0}, ">= 0"),
    ({"top_p": 0.0}, "top_p"),
])
def test_bad_sampling_settings_are_rejected(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        SamplingConfig(**kwargs)
