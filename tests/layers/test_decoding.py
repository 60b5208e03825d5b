"""Prefill-then-decode equals one full forward pass, for every registered mixer.

The test iterates over the registry, so a newly registered mixer is covered automatically.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decode_helpers import prefill_then_decode
from memjax.layers import MIXERS, mixer_options
from memjax.models import build_model

VOCAB, D, T, PROMPT = 32, 16, 37, 33
# Small chunks so the chunked forms span several chunks within T; other options at defaults.
SMALL_OPTIONS = {"chunk_size": 16, "window": 0}


def model_for(mixer_name, **mixer_overrides):
    options = {k: v for k, v in SMALL_OPTIONS.items() if k in mixer_options(mixer_name)}
    mixer = {"name": mixer_name, **options, **mixer_overrides}
    return build_model(dict(name="lm", vocab_size=VOCAB, d_model=D, num_layers=2, mixer=mixer,
                            short_conv=3, mlp_ratio=2.0, pos_emb="learned", max_len=T))


# Option variants, run by `make test-extended` (`make test` runs every mixer at its defaults).
VARIANTS = [
    ("attention", {"window": 3}),
    ("attention", {"window": 5, "impl": "chunk"}),  # query blocks across the prompt
    ("attention", {"window": 3, "persistent_tokens": 2}),
    ("titans_mac", {"segment": 4}),  # decoding crosses segment boundaries
    ("mom", {"capacity": 1.0, "shared_memory": True}),  # counts carried over
    ("mom", {"memory": "gla", "top_k": 1}),
    ("hippocampus", {"window": 5}),  # window 0 (SMALL_OPTIONS) compresses nothing
    ("infini_attention", {"segment": 4}),
    ("bmojo", {"window": 5, "eidetic": 3}),
    ("gated_deltanet", {"num_heads": 4, "head_size": 8}),  # heads apart from d_model
]


def decode_cases():
    return ([(name, {}) for name in MIXERS.names()]
            + [pytest.param(*case, marks=pytest.mark.extended) for case in VARIANTS])


@pytest.mark.parametrize("mixer_name, overrides", decode_cases(),
                         ids=lambda c: c if isinstance(c, str) else ",".join(f"{k}={v}" for k, v in c.items()))
def test_prefill_then_decode_equals_full_forward(mixer_name, overrides):
    model = model_for(mixer_name, **overrides)
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB)
    params = model.init(jax.random.key(0), tokens)["params"]
    full = model.apply({"params": params}, tokens)

    apply = jax.jit(lambda x, c: model.apply({"params": params}, x, cache=c))
    decoded, cache = prefill_then_decode(apply, tokens, PROMPT, model.init_cache(2, T))
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=2e-4, atol=2e-4)
    assert int(cache["length"]) == T


def test_hybrid_stack_decodes_and_its_state_size_is_its_cache():
    """A per-layer pattern (window-3 attention, then Gated DeltaNet, twice): decoding equals the
    full pass, the window layers keep 3 tokens, and state_size counts exactly the cache."""
    mixers = {"swa": {"name": "attention", "window": 3},
              "gated_deltanet": {"name": "gated_deltanet", "chunk_size": 16}}
    model = build_model(dict(name="lm", vocab_size=VOCAB, d_model=D, num_layers=4, mixer=None,
                             layers="swa,gated_deltanet", mixers=mixers, short_conv=3))
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, VOCAB)
    params = model.init(jax.random.key(0), tokens)["params"]
    assert "short_conv" in params["block_0"] and "short_conv" not in params["block_1"]
    full = model.apply({"params": params}, tokens)
    decoded, cache = prefill_then_decode(
        lambda x, c: model.apply({"params": params}, x, cache=c), tokens, PROMPT,
        model.init_cache(2, T))
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), rtol=2e-4, atol=2e-4)
    assert [b["mixer"]["k"].shape[1] for b in cache["blocks"][::2]] == [3, 3]
    per_sequence = sum(leaf.nbytes // (2 if leaf.ndim else 1) for leaf in jax.tree.leaves(cache))
    assert model.state_size(T) == per_sequence


@pytest.mark.parametrize("layers, num_layers, mixers, match", [
    ("swa,deltanet", 3, {"swa": {}, "deltanet": {}}, "does not repeat evenly to num_layers = 3"),
    ("swa,deltanet", 2, {"swa": {"name": "attention"}}, r"layers names \['deltanet'\]"),
    ("", 2, {}, "model.mixer is empty and model.layers names no mixers"),
])
def test_bad_layer_patterns_raise(layers, num_layers, mixers, match):
    model = build_model(dict(name="lm", vocab_size=VOCAB, d_model=D, num_layers=num_layers,
                             mixer=None, layers=layers, mixers=mixers))
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
