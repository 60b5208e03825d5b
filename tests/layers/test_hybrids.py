"""The memory hybrids (exact local attention beside a compressive memory): Infini-attention and
the artificial hippocampus network (AHN). Their float64 NumPy oracles (numpy_hybrids.py) are
checked in test_mixer_oracles.py; here: against their attention branch where the memory must be
empty, prefill-then-decode at segment and window boundaries, and their option errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_hybrids import ORACLES
from test_decoding import VOCAB, model_for
from test_mixer_oracles import BATCH, D, T, f32_values, perturbed_params, rel_err

from memjax.layers import build_mixer
from memjax.layers.attention import Attention
from memjax.layers.cache import cache_bytes

def test_the_memory_variants_differ():
    """The oracle cases exercise the memory: the delta update changes the output from the third
    segment on (the second reads M_1, the same for both), and the AHN memory changes it."""
    x = f32_values(np.random.default_rng(1).normal(size=(BATCH, T, D)))
    infini = ORACLES["infini_attention"]
    p = perturbed_params(build_mixer(D, {"name": "infini_attention", "segment": 5}))
    linear, delta = (infini(p, x, num_heads=2, segment=5, delta=d) for d in (False, True))
    np.testing.assert_array_equal(linear[:, :10], delta[:, :10])
    assert rel_err(linear[:, 10:], delta[:, 10:]) > 1e-3
    ahn = ORACLES["hippocampus"]
    p = perturbed_params(build_mixer(D, {"name": "hippocampus", "memory": "deltanet"}))
    attention_only, with_memory = (ahn(p, x, num_heads=2, window=w, memory="deltanet")
                                   for w in (T, 5))
    assert rel_err(with_memory, attention_only) > 1e-3


@pytest.mark.parametrize("delta", [False, True])
def test_infini_single_segment_is_its_gated_local_attention(delta):
    """T <= segment: the memory reads exactly 0, so the output is softmax attention with each
    head's output scaled by 1 - sigmoid(beta): Attention with those rows of W_out scaled."""
    layer = build_mixer(D, {"name": "infini_attention", "num_heads": 2, "segment": 12,
                            "delta": delta})
    x = jax.random.normal(jax.random.key(0), (BATCH, 12, D))
    params = layer.init(jax.random.key(1), x)["params"]
    params = params | {"beta": jnp.array([0.7, -1.3])}  # a gate other than 1/2
    keep = np.repeat(1.0 - jax.nn.sigmoid(params["beta"]), D // 2)[:, None]  # per out row
    reference = {"qkv": params["qkv"], "out": {"kernel": params["out"]["kernel"] * keep}}
    infini = jax.jit(lambda p, x: layer.apply({"params": p}, x))
    attention = jax.jit(lambda p, x: Attention(D, num_heads=2).apply({"params": p}, x))
    for length in (12, 7):  # a whole segment, and one shorter than the segment
        np.testing.assert_allclose(infini(params, x[:, :length]),
                                   attention(reference, x[:, :length]), rtol=1e-5, atol=1e-6)
    # The memory readout alone (sigmoid(beta) = 1): exactly 0 within the first segment only.
    memory_only = params | {"beta": jnp.full((2,), jnp.inf)}
    np.testing.assert_array_equal(infini(memory_only, x), 0.0)
    y = infini(memory_only, jax.random.normal(jax.random.key(2), (BATCH, 16, D)))
    np.testing.assert_array_equal(y[:, :12], 0.0)
    assert np.all(np.abs(y[:, 12:]) > 0)


@pytest.mark.parametrize("memory", ["gated_deltanet", "deltanet"])
@pytest.mark.parametrize("window", [12, 20, 0])
def test_ahn_with_a_window_longer_than_the_sequence_is_its_attention(memory, window):
    """Nothing leaves the window (window >= T, or 0 = unbounded): the memory branch is exactly
    0 and the output is the attention submodule's, bit for bit."""
    layer = build_mixer(D, {"name": "hippocampus", "num_heads": 2, "window": window,
                            "memory": memory, "chunk_size": 4})
    x = jax.random.normal(jax.random.key(0), (BATCH, 12, D))
    params = layer.init(jax.random.key(1), x)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.3, params)  # no zero output projection
    attention = Attention(D, num_heads=2, window=window, chunk_size=4)
    np.testing.assert_array_equal(layer.apply({"params": params}, x),
                                  attention.apply({"params": params["attention"]}, x))


def test_ahn_cache_holds_a_memory_only_when_tokens_can_leave_the_window():
    layer = build_mixer(D, {"name": "hippocampus", "num_heads": 2, "window": 5,
                            "memory": "gated_deltanet"})
    attention = Attention(D, num_heads=2, window=5)
    dim = D // 2
    # The memory: state, three conv histories (conv_size 4), k, v, beta, g of the last 5 tokens.
    memory = 4 * (2 * dim * dim + 3 * 3 * D + 5 * (2 * D + 2 * 2))
    assert cache_bytes(layer, 24) == cache_bytes(attention, 24) + memory
    assert cache_bytes(layer, 5) == cache_bytes(attention, 5)  # nothing ever leaves
    infini = build_mixer(D, {"name": "infini_attention", "num_heads": 2, "segment": 5})
    assert cache_bytes(infini, 24) == 4 * (2 * (dim * dim + dim) + 2 * 5 * D + 1)


DECODE_LENGTH = 24

# (mixer options, the lengths of the successive calls after an empty cache; 1 = a decode step).
# The first case of each mixer runs in `make test`, the rest in `make test-extended` or
# `make test-slow`.
EXTENDED = pytest.mark.extended
DECODE_CASES = [
    # Prompt = two whole segments: decoding starts a segment and crosses three boundaries.
    (dict(name="infini_attention", segment=4, delta=False), [8] + [1] * 16),
    # Prompt ends mid-segment (its partial segment is buffered), delta updates.
    pytest.param(dict(name="infini_attention", segment=4, delta=True), [9] + [1] * 15,
                 marks=EXTENDED),
    # Multi-token calls mid-segment (the sequential path) and after whole segments (parallel
    # from a non-empty memory).
    pytest.param(dict(name="infini_attention", segment=4, delta=True), [5, 6, 1, 12],
                 marks=EXTENDED),
    pytest.param(dict(name="infini_attention", segment=16, delta=False), [17, 7],
                 marks=pytest.mark.slow),
    # The prompt fills the window exactly: the first decoded token sends token 0 to the memory.
    (dict(name="hippocampus", window=5, memory="gated_deltanet"), [5] + [1] * 19),
    pytest.param(dict(name="hippocampus", window=5, memory="gated_deltanet"),
                 [3, 1, 1, 6, 7, 1, 5], marks=EXTENDED),
    pytest.param(dict(name="hippocampus", window=5, memory="deltanet"), [11] + [1] * 13,
                 marks=pytest.mark.slow),
    # window >= max_len: the cache keeps no memory at all.
    pytest.param(dict(name="hippocampus", window=24, memory="gated_deltanet"), [10] + [1] * 14,
                 marks=pytest.mark.slow),
    # B'MOJO, window 5: prompts ending before, at and after the window boundary (the eidetic
    # slots fill as tokens leave), multi-token calls, more slots than evicted tokens.
    (dict(name="bmojo", window=5, eidetic=2, memory="gated_deltanet"), [4] + [1] * 20),
    pytest.param(dict(name="bmojo", window=5, eidetic=2, memory="gated_deltanet"), [5] + [1] * 19,
                 marks=EXTENDED),
    pytest.param(dict(name="bmojo", window=5, eidetic=2, memory="deltanet"), [11] + [1] * 13,
                 marks=pytest.mark.slow),
    pytest.param(dict(name="bmojo", window=5, eidetic=3, memory="gated_deltanet"),
                 [3, 1, 1, 6, 7, 1, 5], marks=EXTENDED),
    pytest.param(dict(name="bmojo", window=3, eidetic=8, memory="gated_deltanet"), [9, 2, 13],
                 marks=pytest.mark.slow),
    pytest.param(dict(name="bmojo", window=24, eidetic=2, memory="gated_deltanet"),
                 [10] + [1] * 14, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("options, calls", DECODE_CASES,
                         ids=[",".join(map(str, o.values())) + "-calls=" + ",".join(map(str, c[:3]))
                              for o, c in (getattr(case, "values", case) for case in DECODE_CASES)])
def test_prefill_then_decode_equals_full_forward(options, calls):
    assert sum(calls) == DECODE_LENGTH
    options = dict(options)
    model = model_for(options.pop("name"), **options)
    tokens = jax.random.randint(jax.random.key(1), (2, DECODE_LENGTH), 0, VOCAB)
    params = model.init(jax.random.key(0), tokens)["params"]
    full = model.apply({"params": params}, tokens)
    apply = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c))
    cache = model.init_cache(2, DECODE_LENGTH)
    pieces, start = [], 0
    for length in calls:
        logits, cache = apply(params, tokens[:, start:start + length], cache)
        pieces.append(logits)
        start += length
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, axis=1)), np.asarray(full),
                               rtol=2e-4, atol=2e-4)
    assert int(cache["length"]) == DECODE_LENGTH


@pytest.mark.parametrize("options, match", [
    (dict(name="hippocampus", memory="mamba2"),
     r"unknown memory 'mamba2'; supported: gated_deltanet, deltanet"),
    (dict(name="hippocampus", window=-1), "window must be >= 0"),
    (dict(name="hippocampus", num_heads=3), "d_model 16 is not divisible by num_heads 3"),
    (dict(name="infini_attention", segment=0), "segment must be >= 1"),
    (dict(name="infini_attention", num_heads=3), "d_model 16 is not divisible by num_heads 3"),
])
def test_bad_options_raise(options, match):
    layer = build_mixer(D, options)
    with pytest.raises(ValueError, match=match):
        layer.init(jax.random.key(0), jnp.zeros((1, 4, D)))
    with pytest.raises(ValueError, match=match):
        layer.init_cache(1, 8)
