"""LanguageModel with float inputs (`input_dim`) and a regression head (`output_dim`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode_helpers import prefill_then_decode
from memjax.models import build_model

VOCAB, D, T, PROMPT, B = 32, 16, 21, 17, 2


def model(mixer="deltanet", **kwargs):
    options = {"chunk_size": 8} if mixer != "attention" else {}
    return build_model(dict(name="lm", vocab_size=VOCAB, d_model=D, num_layers=2,
                            mixer={"name": mixer, **options}, short_conv=3, **kwargs))


def float_inputs(n=5):
    return jax.random.normal(jax.random.key(1), (B, T, n))


@pytest.mark.parametrize("kwargs, inputs, shape, top_params", [
    ({"input_dim": 5, "output_dim": 3}, float_inputs(), (B, T, 3), {"input_proj", "head"}),
    ({"input_dim": 5}, float_inputs(), (B, T, VOCAB), {"input_proj", "embed"}),  # tied logits
    ({"input_dim": 5, "tie_embeddings": False}, float_inputs(), (B, T, VOCAB), {"input_proj", "lm_head"}),
    ({"output_dim": 2}, jnp.zeros((B, T), jnp.int32), (B, T, 2), {"embed", "head"}),
    ({}, jnp.zeros((B, T), jnp.int32), (B, T, VOCAB), {"embed"}),  # the token model, unchanged
])
def test_input_and_output_widths(kwargs, inputs, shape, top_params):
    m = model(**kwargs)
    params = m.init(jax.random.key(0), inputs)["params"]
    assert m.apply({"params": params}, inputs).shape == shape
    blocks = {f"block_{i}" for i in range(2)} | {"final_norm"}
    assert set(params) == top_params | blocks
    if "input_proj" in params:
        assert params["input_proj"]["kernel"].shape == (5, D)


def test_token_model_state_size_is_unchanged_by_the_io_options():
    assert model(input_dim=5, output_dim=1).state_size(T) == model().state_size(T)


def test_wrong_input_width_and_missing_vocab_are_errors():
    with pytest.raises(ValueError, match=r"input_dim = 4 expects float inputs \[B, T, 4\]"):
        model(input_dim=4).init(jax.random.key(0), float_inputs(5))
    no_vocab = build_model(dict(name="lm", vocab_size=0, d_model=D, num_layers=1,
                                mixer={"name": "attention"}, input_dim=5))
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        no_vocab.init(jax.random.key(0), float_inputs(5))
    regression = build_model(dict(name="lm", vocab_size=0, d_model=D, num_layers=1,
                                  mixer={"name": "attention"}, input_dim=5, output_dim=1))
    params = regression.init(jax.random.key(0), float_inputs(5))["params"]
    assert "embed" not in params


@pytest.mark.parametrize("mixer", ["deltanet", "attention"])
def test_prefill_then_decode_equals_full_forward_for_float_inputs(mixer):
    m = model(mixer, input_dim=5, output_dim=1)
    x = float_inputs()
    params = m.init(jax.random.key(0), x)["params"]
    full = m.apply({"params": params}, x)
    apply = jax.jit(lambda inputs, c: m.apply({"params": params}, inputs, cache=c))
    decoded, cache = prefill_then_decode(apply, x, PROMPT, m.init_cache(B, T))
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=2e-4, atol=2e-4)
    assert int(cache["length"]) == T
