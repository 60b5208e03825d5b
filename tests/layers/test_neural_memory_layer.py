"""The Titans LMM mixer beyond the registry-wide tests (oracle, decoding, init): its inner-loop
diagnostics, and that a cache started from `init_cache` begins at the learned memory weights."""

import jax
import numpy as np

from memjax.layers import build_mixer
from memjax.layers.registry import has_own_short_conv

D, T = 16, 24


def _layer_and_params(length=T, **options):
    options = {"num_heads": 2, **options}
    layer = build_mixer(D, {"name": "lmm", "memory_chunk": 4, **options})
    x = jax.random.normal(jax.random.key(0), (2, length, D))
    return layer, layer.init(jax.random.key(1), x)["params"], x


def test_diagnostics_are_sown_when_training_and_the_memory_learns_its_sequence():
    # One head of K = 16 and 8 tokens: few enough pairs for a 16 x 16 memory to hold them all.
    layer, params, x = _layer_and_params(8, architecture="linear", momentum=False, num_heads=1)
    y, sown = layer.apply({"params": params}, x, mutable=["metrics"])
    metrics = {name: float(value[0]) for name, value in sown["metrics"].items()}
    assert set(metrics) == {"inner_loss_initial_weights", "inner_loss_final_weights",
                            "update_norm", "effective_lr"}
    # The zero initial linear memory predicts 0: its loss is the mean ||v||^2; storing the
    # sequence must lower it.
    assert metrics["inner_loss_final_weights"] < 0.9 * metrics["inner_loss_initial_weights"]
    assert metrics["update_norm"] > 0
    assert 0 < metrics["effective_lr"] < 1  # theta = sigmoid(...) without momentum
    np.testing.assert_array_equal(y, layer.apply({"params": params}, x))  # same output


def test_mac_sows_the_segment_mean_of_its_inner_loop_diagnostics():
    layer = build_mixer(D, {"name": "titans_mac", "segment": 4, "memory_chunk": 2,
                            "momentum": False, "num_heads": 1})
    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    params = layer.init(jax.random.key(1), x)["params"]
    y, sown = layer.apply({"params": params}, x, mutable=["metrics"])
    metrics = {name: float(value[0]) for name, value in sown["metrics"].items()}
    assert set(metrics) == {"inner_loss_initial_weights", "inner_loss_final_weights",
                            "update_norm", "effective_lr"}
    assert metrics["inner_loss_final_weights"] < metrics["inner_loss_initial_weights"]
    assert metrics["update_norm"] > 0 and 0 < metrics["effective_lr"] < 1
    np.testing.assert_array_equal(y, layer.apply({"params": params}, x))  # same output


def test_decoding_from_an_empty_cache_uses_the_learned_initial_memory():
    layer, params, x = _layer_and_params()
    params = jax.tree_util.tree_map(lambda a: a, params)
    params["memory"] = {n: w + 0.1 for n, w in params["memory"].items()}  # not the init values
    full = layer.apply({"params": params}, x)
    cache = layer.init_cache(2, T)
    first, cache = layer.apply({"params": params}, x[:, :1], cache)
    np.testing.assert_allclose(first, full[:, :1], rtol=1e-5, atol=1e-5)
    assert int(cache["started"]) == 1


def test_mac_prefill_must_start_at_a_segment_boundary():
    """A multi-token call with a cache mid-segment cannot be computed exactly: NaN, not a
    plausible wrong answer."""
    layer = build_mixer(D, {"name": "titans_mac", "segment": 4})
    x = jax.random.normal(jax.random.key(0), (2, 6, D))
    params = layer.init(jax.random.key(1), x)["params"]
    cache = layer.init_cache(2, 6)
    y, cache = layer.apply({"params": params}, x[:, :1], cache)  # one token: mid-segment
    assert np.all(np.isfinite(y))
    y, _ = layer.apply({"params": params}, x[:, 1:], cache)
    assert np.all(np.isnan(y))


def test_the_block_convolves_in_front_of_titans_attention_branches():
    # MAC's and MAG's attention read x unconvolved: without the block's short convolution they
    # have no local order (MAC failed passkey with the needle in the query's own segment).
    assert not has_own_short_conv("titans_mac") and not has_own_short_conv("titans_mag")
    assert has_own_short_conv("lmm")  # the memory alone convolves its q, k, v itself
