"""Tests for memjax.layers (ShortConv, Attention, LinearAttention, registry) and the LM backbone.

Everything is tiny (d_model 16, vocab 32, T <= 24) and float32: the cost on CPU is the number of
distinct compilations. The operator-level numerics are covered in tests/ops; here we check the
layer wiring: causality, window reach, forms agreeing through the layer, carried state,
cache sizes against their formulas, the mixer registry and the LanguageModel's `positions` path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from memjax.layers import MIXERS, ShortConv, build_mixer, mixer_options
from memjax.layers.registry import has_own_short_conv
from memjax.layers.attention import Attention
from memjax.layers.bmojo import EideticAttention
from memjax.layers.cache import cache_bytes
from memjax.layers.linear_attention import LinearAttention
from memjax.models.lm import LanguageModel

D = 16
VOCAB = 32
F32_TOL = dict(rtol=1e-5, atol=1e-5)
# Perturbation tests: "unchanged" means below this (the masked weights are exactly 0, so the
# differences are in practice exactly 0); "changed" means clearly above it.
UNCHANGED = 1e-6


def randn(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def reach(apply_fn, T, seed=0):
    """changed[s, t]: does perturbing input position s change output position t?

    All T perturbed copies plus the clean input go through one batched call.
    """
    x = randn(seed, 1, T, D)
    bump = 3.0 * randn(seed + 1, T, D)  # a distinct perturbation per source position
    batch = jnp.concatenate([x, x + jnp.eye(T)[:, :, None] * bump[:, None, :]], axis=0)
    y = np.asarray(apply_fn(batch))
    diff = np.abs(y[1:] - y[:1]).max(axis=-1)  # [s, t]
    changed = diff > UNCHANGED
    # Changed entries must be clearly changed, not rounding noise.
    assert np.all((diff < UNCHANGED) | (diff > 1e-3)), diff
    return changed


# ---------------------------------------------------------------------------------------------
# ShortConv
# ---------------------------------------------------------------------------------------------


def short_conv_np(x, weight, bias):
    """y[b, t, c] = sum_{i < kernel, t - i >= 0} w[i, c] x[b, t - i, c] + bias[c], float64."""
    x, weight, bias = (np.asarray(a, np.float64) for a in (x, weight, bias))
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        for i in range(weight.shape[0]):
            if t - i >= 0:
                y[:, t] += weight[i] * x[:, t - i]
    return y + bias


@pytest.mark.parametrize("kernel_size", [1, 4])
def test_short_conv_matches_numpy(kernel_size):
    x = randn(0, 2, 11, D)
    conv = ShortConv(kernel_size)
    params = conv.init(jax.random.key(0), x)
    # A non-zero bias so its broadcast is checked too.
    params = {"params": {**params["params"], "bias": randn(1, D)}}
    y = conv.apply(params, x)
    assert y.shape == x.shape
    p = params["params"]
    np.testing.assert_allclose(np.asarray(y), short_conv_np(x, p["weight"], p["bias"]), **F32_TOL)


def test_short_conv_is_causal_with_kernel_reach():
    kernel_size, T = 3, 9
    conv = ShortConv(kernel_size)
    params = conv.init(jax.random.key(0), jnp.zeros((1, T, D)))
    changed = reach(lambda x: conv.apply(params, x), T)
    s, t = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    np.testing.assert_array_equal(changed, (s <= t) & (t < s + kernel_size))


# ---------------------------------------------------------------------------------------------
# Attention: window reach
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [0, 1, 4])
def test_attention_window_reach(window):
    """Output t depends on inputs s with t - W < s <= t (window W), or all s <= t (window 0)."""
    T = 12
    layer = Attention(d_model=D, num_heads=2, window=window)
    params = layer.init(jax.random.key(0), jnp.zeros((1, T, D)))
    changed = reach(lambda x: layer.apply(params, x), T)
    s, t = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
    expected = s <= t
    if window:
        expected &= s > t - window
    np.testing.assert_array_equal(changed, expected)


# ---------------------------------------------------------------------------------------------
# LinearAttention: forms agree through the layer, state shape, carried state
# ---------------------------------------------------------------------------------------------

LA_HEADS, LA_CHUNK = 2, 4


def la_layer(impl):
    return LinearAttention(d_model=D, num_heads=LA_HEADS, chunk_size=LA_CHUNK, impl=impl)


@pytest.fixture(scope="module")
def la_params():
    return la_layer("reference").init(jax.random.key(0), jnp.zeros((1, LA_CHUNK, D)))


@pytest.mark.parametrize("T", [12, 10])  # a multiple of chunk_size and not
def test_linear_attention_reference_equals_chunk(la_params, T):
    x = randn(T, 2, T, D)
    fresh = la_layer("reference").init_cache(2, T)
    y_ref, s_ref = la_layer("reference").apply(la_params, x, fresh)
    y_chunk, s_chunk = la_layer("chunk").apply(la_params, x, fresh)
    s_ref, s_chunk = s_ref["state"], s_chunk["state"]
    assert y_ref.shape == y_chunk.shape == (2, T, D)
    head_dim = D // LA_HEADS
    assert s_ref.shape == s_chunk.shape == (2, LA_HEADS, head_dim, head_dim)
    assert s_ref.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y_chunk), np.asarray(y_ref), **F32_TOL)
    np.testing.assert_allclose(np.asarray(s_chunk), np.asarray(s_ref), rtol=1e-5, atol=1e-4)


def test_linear_attention_without_state_returns_array(la_params):
    y = la_layer("chunk").apply(la_params, randn(0, 1, 5, D))
    assert isinstance(y, jax.Array) and y.shape == (1, 5, D)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_linear_attention_two_halves_equal_whole(la_params, impl):
    T, split = 11, 6  # the split is not chunk-aligned
    x = randn(3, 2, T, D)
    layer = la_layer(impl)
    fresh = layer.init_cache(2, T)
    y_whole, s_whole = layer.apply(la_params, x, fresh)
    y1, s1 = layer.apply(la_params, x[:, :split], fresh)
    y2, s2 = layer.apply(la_params, x[:, split:], s1)
    s2, s_whole = s2["state"], s_whole["state"]
    np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), np.asarray(y_whole), **F32_TOL)
    np.testing.assert_allclose(np.asarray(s2), np.asarray(s_whole), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Cache sizes (unbound modules: shapes only, nothing allocated); counters are int32 (4 bytes)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, seq_len, expected",
    [
        (Attention(d_model=16), 10, 2 * 16 * 10 * 4 + 4),  # 1280: full K/V cache, + count
        (Attention(d_model=16, num_heads=4), 24, 2 * 16 * 24 * 4 + 4),  # heads don't matter
        (Attention(d_model=16, window=4), 10, 2 * 16 * 4 * 4 + 4),  # 512: window < T
        (Attention(d_model=16, window=32), 10, 2 * 16 * 10 * 4 + 4),  # window > T: min(W, T) = T
        (LinearAttention(d_model=16, num_heads=2), 10, 2 * 8 * 8 * 4),  # 512
        (LinearAttention(d_model=16, num_heads=4), 1000, 4 * 4 * 4 * 4),  # 256, independent of T
        (LinearAttention(d_model=32, num_heads=1), 1, 1 * 32 * 32 * 4),  # 4096
    ],
)
def test_mixer_cache_bytes(module, seq_len, expected):
    assert cache_bytes(module, seq_len) == expected


@pytest.mark.parametrize(
    "kwargs, seq_len, expected",
    [
        # model count + 2 layers * (attention cache 2*16*10*4 = 1280 + count + conv (4-1)*16*4 = 192)
        (dict(num_layers=2, mixer={"name": "attention"}), 10, 4 + 2 * (1280 + 4 + 192)),
        # 3 layers, window 4, conv 3: 3 * (2*16*4*4 = 512 + count + 2*16*4 = 128)
        (dict(num_layers=3, mixer={"name": "attention", "window": 4}, short_conv=3), 20,
         4 + 3 * (512 + 4 + 128)),
        # 2 layers linear attention H=2: 2 * (2*8*8*4 = 512 + 192)
        (dict(num_layers=2, mixer={"name": "linear_attention", "num_heads": 2}), 50, 4 + 2 * (512 + 192)),
        # no short conv: 4 layers * 256
        (dict(num_layers=4, mixer={"name": "linear_attention", "num_heads": 4}, short_conv=0), 7,
         4 + 4 * 256),
        # DeltaNet convolves its own q, k, v: no block convolution in front of it (192 bytes)...
        (dict(num_layers=1, mixer={"name": "deltanet"}), 7, 4 + (2 * 8 * 8 + 3 * 3 * 16) * 4),
        # ... unless stacked on purpose (the ablation).
        (dict(num_layers=1, mixer={"name": "deltanet"}, stack_short_convs=True), 7,
         4 + (2 * 8 * 8 + 3 * 3 * 16) * 4 + 192),
        # A hybrid stack sums its layers: window-4 attention (512 + 4 + conv 192), then DeltaNet.
        (dict(num_layers=2, mixer=None, layers="swa,deltanet",
              mixers={"swa": {"name": "attention", "window": 4}, "deltanet": {"name": "deltanet"}}),
         30, 4 + (512 + 4 + 192) + (2 * 8 * 8 + 3 * 3 * 16) * 4),
    ],
)
def test_lm_state_size(kwargs, seq_len, expected):
    model = LanguageModel(vocab_size=VOCAB, d_model=D, **kwargs)
    assert model.state_size(seq_len) == expected


# ---------------------------------------------------------------------------------------------
# Mixer registry
# ---------------------------------------------------------------------------------------------


def test_registered_mixers():
    assert {"attention", "linear_attention"} <= set(MIXERS.names())


def attention_reads_input_unconvolved(name: str) -> bool:
    """Does mixer `name` (default options) hand its input x, unchanged, to a softmax attention?

    Traced with jax.eval_shape: every module call is intercepted (the mixer's own included, so
    `attention` itself counts), and a softmax-attention call whose first argument is x itself
    (the same tracer) is one.
    """
    mixer = build_mixer(D, {"name": name})
    x_seen, found = [], []

    def watch(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name == "__call__" and args
                and isinstance(module, (Attention, EideticAttention)) and args[0] is x_seen[0]):
            found.append(type(module).__name__)
        return next_fun(*args, **kwargs)

    def init(x):
        x_seen.append(x)
        with nn.intercept_methods(watch):
            return mixer.init(jax.random.key(0), x)

    jax.eval_shape(init, jax.ShapeDtypeStruct((1, 8, D), jnp.float32))
    return bool(found)


@pytest.mark.parametrize("name", sorted(MIXERS.names()))
def test_block_convolves_in_front_of_attention_branches(name):
    """A mixer whose softmax attention reads x unconvolved must get the block's short
    convolution (`own_short_conv` False): attention without a position embedding has no local
    order otherwise, so it cannot form an induction head. Two hybrids missed this (issue 15:
    MQAR recall 0.99 beyond their window, 0.1-0.4 inside it); MAC and MAG before them."""
    if attention_reads_input_unconvolved(name):
        assert not has_own_short_conv(name), f"{name}: set own_short_conv = False"


def test_attention_branch_detector_sees_the_known_branches():
    assert {n for n in ("attention", "hippocampus", "bmojo", "titans_mag", "lmm", "deltanet")
            if attention_reads_input_unconvolved(n)} == {"attention", "hippocampus", "bmojo",
                                                         "titans_mag"}


def test_mixer_options_list_exactly_the_configurable_fields():
    assert mixer_options("attention") == {"num_heads": 1, "window": 0, "persistent_tokens": 0,
                                          "impl": "auto", "chunk_size": 64}
    assert mixer_options("linear_attention") == {"num_heads": 2, "chunk_size": 64, "impl": "auto"}


def test_build_mixer_sets_fields():
    mixer = build_mixer(D, {"name": "attention", "window": 5, "num_heads": 4})
    assert isinstance(mixer, Attention)
    assert (mixer.d_model, mixer.window, mixer.num_heads) == (D, 5, 4)
    # The options dict is not consumed.
    options = {"name": "linear_attention", "impl": "reference"}
    build_mixer(D, options)
    assert options == {"name": "linear_attention", "impl": "reference"}


def test_build_mixer_unknown_option_raises():
    with pytest.raises(ValueError, match=r"'attention'.*expand_k"):
        build_mixer(D, {"name": "attention", "expand_k": 2})  # a GLA option


def test_unknown_mixer_raises_key_error_listing_known():
    with pytest.raises(KeyError) as info:
        build_mixer(D, {"name": "no_such_mixer"})
    message = str(info.value)
    assert "no_such_mixer" in message
    assert "attention" in message and "linear_attention" in message
    with pytest.raises(KeyError, match="linear_attention"):
        mixer_options("nope")


# ---------------------------------------------------------------------------------------------
# LanguageModel
# ---------------------------------------------------------------------------------------------


def tokens(seed, batch, T):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, T)), jnp.int32)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mixer={"name": "attention", "num_heads": 2}),
        dict(mixer={"name": "linear_attention", "chunk_size": 4}, norm="rmsnorm", mlp_ratio=2.0,
             pos_emb="learned", max_len=24, tie_embeddings=False),
    ],
    ids=["attention_tied", "linear_attention_untied"],
)
def test_lm_positions_select_rows_of_full_logits(kwargs):
    model = LanguageModel(vocab_size=VOCAB, d_model=D, num_layers=2, **kwargs)
    toks = tokens(0, 2, 14)
    params = model.init(jax.random.key(0), toks)
    full = model.apply(params, toks)
    assert full.shape == (2, 14, VOCAB)
    positions = jnp.asarray([[0, 13, 5], [7, 7, 2]], jnp.int32)  # repeats and any order
    picked = model.apply(params, toks, positions)
    assert picked.shape == (2, 3, VOCAB)
    expected = np.stack([np.asarray(full)[b, np.asarray(positions)[b]] for b in range(2)])
    np.testing.assert_allclose(np.asarray(picked), expected, **F32_TOL)
    assert np.all(np.isfinite(np.asarray(full)))


def test_lm_learned_pos_emb_too_long_raises():
    model = LanguageModel(vocab_size=VOCAB, d_model=D, num_layers=1, mixer={"name": "attention"},
                          pos_emb="learned", max_len=8)
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds max_len 8"):
        model.init(jax.random.key(0), tokens(0, 1, 9))


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(norm="batchnorm"), r"unknown norm 'batchnorm'"), (dict(pos_emb="rope"), r"unknown pos_emb 'rope'")],
)
def test_lm_unknown_norm_or_pos_emb_raises(kwargs, match):
    model = LanguageModel(vocab_size=VOCAB, d_model=D, num_layers=1, mixer={"name": "attention"}, **kwargs)
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), tokens(0, 1, 4))


@pytest.mark.parametrize("mixer, expected", [
    # H * K * K memory
    (dict(name="retnet", num_heads=4), 4 * 8 * 8 * 4),
    # memory plus three (conv_size - 1) x d convolution histories
    (dict(name="deltanet", num_heads=2, conv_size=4), (2 * 16 * 16 + 3 * 3 * 32) * 4),
    (dict(name="gated_deltanet", num_heads=2, conv_size=4), (2 * 16 * 16 + 3 * 3 * 32) * 4),
    # key width expand_k * d / H = 8, value width 16
    (dict(name="gla", num_heads=2, expand_k=0.5), 2 * 8 * 16 * 4),
    # memory plus the previous token
    (dict(name="rwkv7", num_heads=2), (2 * 16 * 16 + 32) * 4),
    # Taylor (de-duplicated) features F = 1 + 4 + 4*5/2 = 15, values 16 + normaliser, plus window KV
    (dict(name="based", num_heads=2, feature_dim=4, window=8), 2 * 15 * 17 * 4 + 2 * 32 * 8 * 4 + 4),
])
def test_recurrent_state_sizes(mixer, expected):
    from memjax.layers import build_mixer

    assert cache_bytes(build_mixer(32, mixer, parent=None), 100) == expected
