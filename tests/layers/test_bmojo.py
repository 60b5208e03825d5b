"""B'MOJO (memjax/layers/bmojo.py): sliding-window attention plus eidetic tokens plus a fading
memory. Against its float64 NumPy oracle (numpy_bmojo.py), its surprise and eidetic selection
alone, hippocampus (eidetic = 0) and its attention (nothing leaves the window), prefill-then-
decode across the window boundary, and its option errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_bmojo import ORACLES, eidetic_sets, fading_memory_np
from test_mixer_oracles import BATCH, D, T, f32_values, perturbed_params, rel_err

import memjax.layers.bmojo as bmojo
from memjax.layers import build_mixer
from memjax.layers.attention import Attention
from memjax.layers.cache import cache_bytes

bmojo_np = ORACLES["bmojo"]
MEMORY_KINDS = ["gated_deltanet", "deltanet"]


def oracle_case(memory, window=4, eidetic=2, seed=0):
    options = dict(num_heads=2, window=window, eidetic=eidetic, memory=memory, chunk_size=4)
    layer = build_mixer(D, {"name": "bmojo", **options})
    params = perturbed_params(layer, seed=seed)
    x = f32_values(np.random.default_rng(1 + seed).normal(size=(BATCH, T, D)))
    return layer, params, x, options


def float64_apply(layer, params, x, mutable=False):
    with jax.enable_x64(True):
        fn = lambda p, x: layer.apply({"params": p}, x, mutable=mutable)  # noqa: E731
        out = jax.jit(fn)(jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(x))
        return jax.tree_util.tree_map(np.asarray, out)


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_layer_matches_oracle_and_its_surprise(memory):
    """Window 4, 2 eidetic tokens, T = 12 (tokens 0..7 leave the window): the float64 forward
    against the oracle, and the sown surprise against the oracle's (float32 gates: ~1e-8)."""
    layer, params, x, options = oracle_case(memory)
    want = bmojo_np(params, x, num_heads=2, window=4, eidetic=2, memory=memory)
    got, state = float64_apply(layer, params, x, mutable=["intermediates"])
    assert rel_err(got, want) < 1e-6
    (surprise,) = state["intermediates"]["surprise"]
    _, want_surprise = fading_memory_np(params, x, num_heads=2, window=4, memory=memory)
    np.testing.assert_array_equal(surprise[:, :4], 0.0)  # the zeros in front of the stream
    np.testing.assert_allclose(surprise[:, 4:], want_surprise[:, :T - 4], rtol=1e-6)
    # The case exercises the eidetic tokens: without them the output moves by O(1).
    assert rel_err(bmojo_np(params, x, num_heads=2, window=4, eidetic=0, memory=memory),
                   want) > 1e-2


def test_oracle_case_selections_are_not_degenerate():
    """The oracle's eidetic sets in the oracle case change over time and are not simply the
    oldest or the latest evicted tokens (else a wrong ranking could pass)."""
    _, params, x, _ = oracle_case("gated_deltanet")
    _, surprise = fading_memory_np(params, x, num_heads=2, window=4, memory="gated_deltanet")
    sets = eidetic_sets(surprise, 4, 2)
    for b in range(BATCH):
        late = [tuple(s) for s in sets[b][6:]]
        assert len(set(late)) > 1
        assert any(s != (0, 1) and s != (t - 5, t - 4) for t, s in enumerate(late, start=6))


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_no_eidetic_tokens_is_hippocampus(memory):
    """eidetic = 0: hippocampus's parameters and computation, bit for bit, forward and cache."""
    layer, params, x, options = oracle_case(memory, eidetic=0)
    hippocampus = build_mixer(D, {"name": "hippocampus", **{k: v for k, v in options.items()
                                                            if k != "eidetic"}})
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        perturbed_params(hippocampus))
    p, x = jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(x, jnp.float32)
    np.testing.assert_array_equal(layer.apply({"params": p}, x),
                                  hippocampus.apply({"params": p}, x))
    assert (jax.tree_util.tree_structure(layer.init_cache(2, 24))
            == jax.tree_util.tree_structure(hippocampus.init_cache(2, 24)))


@pytest.mark.parametrize("memory", MEMORY_KINDS)
@pytest.mark.parametrize("window", [12, 20, 0])
def test_nothing_leaves_the_window_is_its_attention(memory, window):
    """window >= T (or 0 = unbounded): no token leaves the window, so there is no eidetic
    token and the memory branch is 0: the output is Attention's with the same parameters (the
    masked form's rounding for window > 0, bit for bit for window = 0)."""
    layer = build_mixer(D, {"name": "bmojo", "num_heads": 2, "window": window, "eidetic": 2,
                            "memory": memory, "chunk_size": 4})
    x = jax.random.normal(jax.random.key(0), (BATCH, 12, D))
    params = layer.init(jax.random.key(1), x)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.3, params)  # no zero output projection
    attention = Attention(D, num_heads=2, window=window, chunk_size=4)
    want = attention.apply({"params": params["attention"]}, x)
    np.testing.assert_allclose(layer.apply({"params": params}, x), want,
                               rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(want))))
    if window == 0:
        np.testing.assert_array_equal(layer.apply({"params": params}, x), want)


def brute_force_mask(surprise, window, eidetic):
    """Token j eidetic for query t: j <= t - window and fewer than `eidetic` tokens i <= t -
    window beat it, i.e. (e_i, i) > (e_j, j): the larger surprise, ties to the later token."""
    B, T = surprise.shape
    mask = np.zeros((B, T, T), bool)
    for b, t, j in itertools.product(range(B), range(T), range(T)):
        if j <= t - window:
            beaten_by = sum((surprise[b, i], i) > (surprise[b, j], j)
                            for i in range(t - window + 1))
            mask[b, t, j] = beaten_by < eidetic
    return mask


@pytest.mark.parametrize("window, eidetic", [(1, 1), (3, 2), (4, 3), (2, 6), (5, 0), (24, 2)])
def test_parallel_mask_matches_brute_force(window, eidetic):
    """Random surprises from a few values (many ties) and continuous ones; also the oracle's
    selection (eidetic_sets) agrees with the brute force."""
    rng = np.random.default_rng(window * 10 + eidetic)
    for surprise in (rng.integers(0, 3, size=(3, 16)).astype(np.float32),
                     rng.random((3, 16)).astype(np.float32)):
        got = np.asarray(bmojo.parallel_eidetic_mask(jnp.asarray(surprise), window, eidetic))
        want = brute_force_mask(surprise, window, eidetic)
        np.testing.assert_array_equal(got, want)
        sets = eidetic_sets(surprise, window, eidetic)
        assert all(list(np.flatnonzero(want[b, t])) == sets[b][t]
                   for b in range(3) for t in range(16))


def test_one_very_surprising_token_stays_eidetic():
    """One evicted token far more surprising than every other is attended by every later
    query (once it has left the window) with E = 1; with tied surprises the latest wins."""
    T_, window = 16, 3
    surprise = np.full((1, T_), 0.5, np.float32)
    surprise[0, 2] = 100.0
    mask = np.asarray(bmojo.parallel_eidetic_mask(jnp.asarray(surprise), window, 1))[0]
    for t in range(T_):
        np.testing.assert_array_equal(np.flatnonzero(mask[t]),
                                      [2] if t >= 2 + window else ([t - window] if t >= window
                                                                   else []))
    # All tied: the most recent evicted token is the eidetic one.
    tied = np.asarray(bmojo.parallel_eidetic_mask(jnp.zeros((1, T_)), window, 2))[0]
    for t in range(window, T_):
        np.testing.assert_array_equal(np.flatnonzero(tied[t]),
                                      [j for j in (t - window - 1, t - window) if j >= 0])


def test_a_surprising_token_is_attended_by_the_layer():
    """The attention module end to end, fed the oracle's surprises (E = 1, window 4): a late
    query's output depends on which evicted token is the most surprising, and on nothing else
    of the surprises: demoting that token changes the output, lowering all others does not."""
    _, params, x, _ = oracle_case("gated_deltanet", window=4, eidetic=1)
    _, surprise = fading_memory_np(params, x, num_heads=2, window=4, memory="gated_deltanet")
    t = T - 2
    (star,) = eidetic_sets(surprise, 4, 1)[0][t]
    assert star < t - 4  # not simply the last token to leave the window
    attention = bmojo.EideticAttention(D, 2, 4, 1)
    apply = lambda e: attention.apply(  # noqa: E731
        {"params": jax.tree_util.tree_map(jnp.asarray, params["attention"])},
        jnp.asarray(x[:1], jnp.float32), e)[0, t]
    # The absorbed stream: entry i is token i - 4 (zeros for the 4 positions before token 0).
    absorbed = jnp.asarray(np.concatenate([np.zeros((1, 4)), surprise[:1, :T - 4]], axis=1))
    y = apply(absorbed)
    assert float(jnp.max(jnp.abs(apply(absorbed.at[0, 4 + star].set(-1.0)) - y))) > 1e-4
    others = jnp.where(jnp.arange(T) == 4 + star, absorbed, absorbed - 0.01)
    np.testing.assert_array_equal(apply(others), y)


def layer_in_pieces(layer, params, x, calls, max_len):
    apply = jax.jit(lambda p, x, c: layer.apply({"params": p}, x, c))  # compiles per call length
    cache, pieces, start = layer.init_cache(x.shape[0], max_len), [], 0
    for length in calls:
        y, cache = apply(params, x[:, start:start + length], cache)
        pieces.append(y)
        start += length
    return jnp.concatenate(pieces, axis=1), cache


# Each distinct call length compiles once: `make test` runs three splits of four lengths.
ALL_SPLITS = ([20], [1] * 20, [4, 4, 1, 11], [3, 1, 7, 9], [5, 2, 13])


@pytest.mark.parametrize("memory, splits", [
    pytest.param("gated_deltanet", ALL_SPLITS[:3], id="gated_deltanet"),
    pytest.param("gated_deltanet", ALL_SPLITS[3:], id="gated_deltanet-more",
                 marks=pytest.mark.slow),
    pytest.param("deltanet", ALL_SPLITS, id="deltanet", marks=pytest.mark.slow)])
def test_layer_decodes_any_split(memory, splits):
    """The layer alone, window 4, 2 eidetic tokens, T = 20: several splits, from all-at-once
    to one token at a time, equal the full forward; the cached slots are the top 2."""
    layer = build_mixer(D, {"name": "bmojo", "num_heads": 2, "window": 4, "eidetic": 2,
                            "memory": memory, "chunk_size": 4})
    x = jax.random.normal(jax.random.key(0), (BATCH, 20, D))
    params = jax.jit(layer.init)(jax.random.key(1), x)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.1 * jax.random.normal(
        jax.random.key(2), a.shape), params)
    full, state = layer.apply({"params": params}, x, mutable=["intermediates"])
    (surprise,) = state["intermediates"]["surprise"]
    for calls in splits:
        got, cache = layer_in_pieces(layer, params, x, calls, 20)
        np.testing.assert_allclose(got, full, rtol=2e-5, atol=2e-5, err_msg=str(calls))
        slots = cache["eidetic"]
        evicted = np.asarray(surprise[:, 4:])  # tokens 0..15
        for b in range(BATCH):
            top = sorted(range(16), key=lambda j: (evicted[b, j], j), reverse=True)[:2]
            assert list(np.asarray(slots["position"][b])) == top, calls
    # Fewer evicted tokens than slots: empty slots stay marked -1.
    _, cache = layer_in_pieces(layer, params, x[:, :5], [2, 3], 20)
    assert np.all(np.asarray(cache["eidetic"]["position"]) == [[0, -1]] * BATCH)


def test_cache_is_hippocampus_plus_the_eidetic_slots():
    """init_cache is honest: the eidetic buffer adds E keys, values, surprises and positions
    (float32 / int32) to hippocampus's cache, and nothing when no token can leave the window."""
    options = {"num_heads": 2, "window": 5, "memory": "gated_deltanet"}
    layer = build_mixer(D, {"name": "bmojo", "eidetic": 3, **options})
    hippocampus = build_mixer(D, {"name": "hippocampus", **options})
    assert cache_bytes(layer, 24) == cache_bytes(hippocampus, 24) + 4 * 3 * (2 * D + 2)
    assert cache_bytes(layer, 5) == cache_bytes(hippocampus, 5)  # nothing ever leaves
    assert cache_bytes(build_mixer(D, {"name": "bmojo", "eidetic": 0, **options}), 24) == (
        cache_bytes(hippocampus, 24))


@pytest.mark.parametrize("options, match", [
    (dict(memory="mamba2"), r"bmojo: unknown memory 'mamba2'; supported: gated_deltanet, "
                            "deltanet"),
    (dict(window=-1), "bmojo: window must be >= 0"),
    (dict(eidetic=-2), "bmojo: eidetic must be >= 0"),
    (dict(num_heads=3), "d_model 16 is not divisible by num_heads 3"),
])
def test_bad_options_raise(options, match):
    layer = build_mixer(D, {"name": "bmojo", **options})
    with pytest.raises(ValueError, match=match):
        layer.init(jax.random.key(0), jnp.zeros((1, 4, D)))
    with pytest.raises(ValueError, match=match):
        layer.init_cache(1, 8)
