"""HiPPO-RNN, LSTM and GRU mixers: float64 NumPy references written from the equations,
split-and-resume, cache sizes against their formulas and bad options.

The references (tests/layers/numpy_mixers.py, shared with test_mixer_oracles.py) build LegS/LegT
from their closed forms and the step matrices with numpy solves and scipy's expm; the cells'
equations are written out from Flax's parameter names. Here the layers run their float32 path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_mixers import (
    dense,
    gru_cell_np,
    hippo_rnn_np,
    lstm_cell_np,
    memory_np,
    to_np,
)

from memjax.layers import build_mixer
from memjax.layers.cache import cache_bytes
from memjax.layers.hippo_rnn import memory_update

D = 16
TOL32 = dict(rtol=1e-4, atol=1e-4)


def randn(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape)


def init(layer, T=9, seed=0):
    x = jnp.asarray(randn(seed, 2, T, D), jnp.float32)
    params = layer.init(jax.random.key(seed), x)["params"]
    return params, x


# --------------------------------------------------------------------------------- memory update

@pytest.mark.parametrize("legs_step", ["log", "paper"])
@pytest.mark.parametrize("method", ["forward_euler", "backward_euler", "bilinear", "zoh"])
def test_legs_memory_update_matches_numpy(x64, method, legs_step):
    n, c, f = 6, randn(0, 2, 3, 6), randn(1, 2, 3)
    for k in (0, 1, 4, 50):
        got = memory_update(jnp.asarray(c), jnp.asarray(f), jnp.asarray(k), measure="legs",
                            method=method, legs_step=legs_step)
        want = memory_np(c, f, k, n, "legs", method, legs_step, None)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["bilinear", "zoh"])
def test_legt_memory_update_matches_numpy(x64, method):
    c, f = randn(2, 2, 1, 5), randn(3, 2, 1)
    got = memory_update(jnp.asarray(c), jnp.asarray(f), 7, measure="legt", method=method, theta=12.0)
    np.testing.assert_allclose(np.asarray(got), memory_np(c, f, 7, 5, "legt", method, None, 12.0),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["bilinear", "zoh"])
def test_memory_update_gradient_matches_finite_differences(x64, method):
    """Through the triangular solve / matrix exponential, at k = 0 (log step's special case) and k > 0."""
    c0, f0 = jnp.asarray(randn(4, 1, 2, 5)), jnp.asarray(randn(5, 1, 2))
    w = jnp.asarray(randn(6, 1, 2, 5))
    for k in (0, 3):
        loss = lambda c, f, k=k: jnp.sum(w * jnp.tanh(memory_update(c, f, k, method=method)))
        gc, gf = jax.grad(loss, argnums=(0, 1))(c0, f0)
        assert np.all(np.isfinite(gc)) and np.all(np.isfinite(gf))
        eps, dc, df = 1e-6, jnp.asarray(randn(7, 1, 2, 5)), jnp.asarray(randn(8, 1, 2))
        fd = (loss(c0 + eps * dc, f0 + eps * df) - loss(c0 - eps * dc, f0 - eps * df)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.sum(gc * dc) + jnp.sum(gf * df)), float(fd), rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------------------------ the layers

@pytest.mark.parametrize("options", [
    dict(measure="legs", method="bilinear", legs_step="log"),
    dict(measure="legs", method="zoh", legs_step="paper"),
    dict(measure="legt", method="bilinear", legs_step="log", theta=4.0)])
def test_hippo_rnn_matches_numpy(options):
    layer = build_mixer(D, {"name": "hippo_rnn", "hidden": 8, "order": 5, "memory_channels": 2, **options})
    params, x = init(layer)
    want = hippo_rnn_np(to_np(params), np.asarray(x, np.float64), hidden=8, order=5,
                        memory_channels=2, **options)
    np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x)), want, **TOL32)


def test_lstm_and_gru_match_numpy():
    for name in ("lstm", "gru"):
        layer = build_mixer(D, {"name": name, "hidden": 8})
        params, x = init(layer)
        p, xs = to_np(params), np.asarray(x, np.float64)
        h, c, ys = np.zeros((2, 8)), np.zeros((2, 8)), []
        for t in range(x.shape[1]):
            if name == "lstm":
                c, h = lstm_cell_np(p["cell"], c, h, xs[:, t])
            else:
                h = gru_cell_np(p["cell"], h, xs[:, t])
            ys.append(dense(p["out"], h))
        np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x)), np.stack(ys, 1), **TOL32)


@pytest.mark.parametrize("options", [
    {"name": "hippo_rnn", "hidden": 8, "order": 6},
    {"name": "hippo_rnn", "hidden": 8, "order": 6, "measure": "legt", "theta": 5.0, "method": "zoh"},
    {"name": "lstm", "hidden": 8}, {"name": "gru", "hidden": 8}], ids=lambda o: o["name"] + o.get("measure", ""))
def test_split_and_resume_equals_whole(options):
    layer = build_mixer(D, options)
    params, x = init(layer, T=11)
    apply = lambda x, cache: layer.apply({"params": params}, x, cache=cache)
    whole = layer.apply({"params": params}, x)
    y1, cache = apply(x[:, :4], layer.init_cache(2, 11))
    y2, cache = apply(x[:, 4:], cache)
    np.testing.assert_allclose(np.concatenate([y1, y2], axis=1), whole, **TOL32)
    if options["name"] == "hippo_rnn":
        assert int(cache["position"]) == 11
        if options.get("measure", "legs") == "legs":  # the position matters: a reset one differs
            _, stale = apply(x[:, :4], layer.init_cache(2, 11))
            stale["position"] = jnp.zeros((), jnp.int32)
            y2_stale, _ = apply(x[:, 4:], stale)
            assert np.abs(np.asarray(y2_stale) - np.asarray(y2)).max() > 1e-3


@pytest.mark.parametrize("options, want", [
    ({"name": "hippo_rnn", "hidden": 8, "order": 6, "memory_channels": 3}, (8 + 3 * 6) * 4 + 4),
    ({"name": "hippo_rnn"}, (64 + 32) * 4 + 4),
    ({"name": "lstm", "hidden": 10}, 2 * 10 * 4), ({"name": "gru", "hidden": 10}, 10 * 4)])
def test_state_size(options, want):
    layer = build_mixer(D, options)
    assert cache_bytes(layer, 100) == want == cache_bytes(layer, 7)


def test_bad_options_and_inputs():
    x = jnp.zeros((1, 3, D))
    for options, match in [({"measure": "legz"}, "unknown HiPPO measure 'legz'"),
                           ({"method": "rk4"}, "unknown discretization 'rk4'"),
                           ({"legs_step": "mid"}, "unknown LegS step"),
                           ({"measure": "legt", "theta": 0.0}, "theta")]:
        layer = build_mixer(D, {"name": "hippo_rnn", "hidden": 4, "order": 3, **options})
        with pytest.raises(ValueError, match=match):
            layer.init(jax.random.key(0), x)
    for name in ("hippo_rnn", "lstm", "gru"):
        with pytest.raises(ValueError, match=r"expects x \[B, T, 16\]"):
            build_mixer(D, {"name": name}).init(jax.random.key(0), jnp.zeros((1, 3, 8)))
