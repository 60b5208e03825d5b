"""Tests for the Mamba and Mamba-2 mixers: polarized channels, mimetic init, carried state.

The scan operators are checked in tests/ops; here the layer wiring is checked against a float64
NumPy loop run on the layer's own intermediates (recorded with ``sow``), with the polarized
transitions written in the oracle as A = 0 (decay 1) and A = -inf (decay 0). Tiny shapes, float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.config import mixer_config
from memjax.layers import MIXERS
from memjax.layers.cache import cache_bytes
from memjax.layers.mamba import Mamba
from memjax.layers.mamba2 import Mamba2

D = 16
T = 11
F32_TOL = dict(rtol=2e-5, atol=2e-5)


def mamba(**kw):
    return Mamba(d_model=D, **kw)


def mamba2(**kw):
    return Mamba2(d_model=D, head_dim=8, **kw)  # E = 32 in 4 heads: room for 2 polarized heads


def make_x(seed=0, length=T):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(2, length, D)), jnp.float32)


def run(layer, x, **kw):
    """(output, params, intermediates) of a freshly initialised layer."""
    params = layer.init(jax.random.key(1), x)
    y, state = layer.apply(params, x, mutable=["intermediates"], **kw)
    inter = {k: v[0] for k, v in state["intermediates"].items()}
    return y, params["params"], inter


def selective_scan_np(u, dt, A, Bm, Cm, Dskip):
    """h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] Bm_t[n] u_t[d], y_t = Cm_t . h_t[d] + D u."""
    u, dt, A, Bm, Cm, Dskip = (np.asarray(a, np.float64) for a in (u, dt, A, Bm, Cm, Dskip))
    h = np.zeros((u.shape[0], *A.shape))
    y = np.zeros_like(u)
    for t in range(u.shape[1]):
        a = np.exp(dt[:, t, :, None] * A)  # A = -inf gives exactly 0 (dt > 0)
        h = a * h + (dt[:, t] * u[:, t])[..., None] * Bm[:, t, None, :]
        y[:, t] = np.einsum("bdn,bn->bd", h, Cm[:, t]) + Dskip * u[:, t]
    return y


def ssd_np(x, dt, A, Bm, Cm, Dskip):
    """S_t[h] = exp(dt_t[h] A[h]) S_{t-1}[h] + dt_t[h] outer(Bm_t, x_t[h]); y = S^T Cm + D x."""
    x, dt, A, Bm, Cm, Dskip = (np.asarray(a, np.float64) for a in (x, dt, A, Bm, Cm, Dskip))
    S = np.zeros((x.shape[0], x.shape[2], Bm.shape[-1], x.shape[3]))
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        a = np.exp(dt[:, t] * A)[..., None, None]
        S = a * S + dt[:, t, :, None, None] * Bm[:, t, None, :, None] * x[:, t, :, None, :]
        y[:, t] = np.einsum("bhnp,bn->bhp", S, Cm[:, t]) + Dskip[:, None] * x[:, t]
    return y


# ---------------------------------------------------------------------------------------------
# Polarized channels / heads
# ---------------------------------------------------------------------------------------------


def test_polarized_mamba_channels_have_decay_exactly_one_and_zero():
    _, params, inter = run(mamba(polarized=True), make_x())
    decay = np.asarray(inter["decay"])  # [B, T, E, N]
    assert decay.shape == (2, T, 2 * D, 16)
    assert np.all(decay[..., 0] == 1.0) and np.all(decay[..., 1] == 0.0)
    learned = decay[..., 2:]
    assert np.all((learned > 0.0) & (learned < 1.0))
    assert params["A_log"].shape == (2 * D, 14)  # the two fixed channels are not parameters


def test_polarized_mamba2_heads_have_decay_exactly_one_and_zero():
    _, params, inter = run(mamba2(polarized=True), make_x())
    decay = np.asarray(inter["decay"])  # [B, T, H]
    assert decay.shape == (2, T, 4)
    assert np.all(decay[..., 0] == 1.0) and np.all(decay[..., 1] == 0.0)
    assert np.all((decay[..., 2:] > 0.0) & (decay[..., 2:] < 1.0))
    assert params["A_log"].shape == (2,)


@pytest.mark.parametrize("polarized", [False, True])
def test_mamba_scan_output_matches_numpy_with_fixed_transitions(polarized):
    """The layer's SSM output equals a float64 loop in which the polarized channels are A = 0
    and A = -inf: so the layer really never forgets in channel 0 and keeps only the current
    token in channel 1."""
    _, params, inter = run(mamba(polarized=polarized), make_x(1))
    io = inter["ssm_io"]
    A = -np.exp(np.asarray(params["A_log"], np.float64))
    if polarized:
        A = np.concatenate([np.zeros((A.shape[0], 1)), np.full((A.shape[0], 1), -np.inf), A], -1)
    y_np = selective_scan_np(io["u"], io["dt"], A, io["Bm"], io["Cm"], params["D"])
    np.testing.assert_allclose(np.asarray(io["y"]), y_np, **F32_TOL)


@pytest.mark.parametrize("polarized", [False, True])
def test_mamba2_ssd_output_matches_numpy_with_fixed_transitions(polarized):
    _, params, inter = run(mamba2(polarized=polarized), make_x(2))
    io = inter["ssm_io"]
    A = -np.exp(np.asarray(params["A_log"], np.float64))
    if polarized:
        A = np.concatenate([[0.0, -np.inf], A])
    y_np = ssd_np(io["x"], io["dt"], A, io["Bm"], io["Cm"], params["D"])
    np.testing.assert_allclose(np.asarray(io["y"]), y_np, **F32_TOL)


# ---------------------------------------------------------------------------------------------
# Mimetic initialisation
# ---------------------------------------------------------------------------------------------


def test_mimetic_mamba_ties_b_and_c_and_starts_with_decays_near_one():
    R, N = 1, 16  # dt_rank = ceil(16 / 16)
    _, params, inter = run(mamba(initialization="mimetic"), make_x(3))
    w = np.asarray(params["x_proj"]["kernel"])
    np.testing.assert_array_equal(w[:, R : R + N], w[:, R + N :])  # W_B == W_C
    np.testing.assert_array_equal(np.asarray(inter["ssm_io"]["Bm"]), np.asarray(inter["ssm_io"]["Cm"]))
    np.testing.assert_allclose(-np.exp(np.asarray(params["A_log"][0])), -0.01 * np.arange(1, N + 1), rtol=1e-6)
    assert np.min(inter["decay"]) > 0.97  # measured 0.982 on this input

    _, params, inter = run(mamba(), make_x(3))  # the default init does neither
    w = np.asarray(params["x_proj"]["kernel"])
    assert np.max(np.abs(w[:, R : R + N] - w[:, R + N :])) > np.std(w)
    assert np.min(inter["decay"]) < 0.5


def test_mimetic_mamba2_ties_b_and_c_and_starts_with_decays_near_one():
    E, N = 2 * D, 16
    _, params, inter = run(mamba2(initialization="mimetic"), make_x(4))
    w = np.asarray(params["in_proj"]["kernel"])
    np.testing.assert_array_equal(w[:, 2 * E : 2 * E + N], w[:, 2 * E + N : 2 * E + 2 * N])
    taps = np.asarray(params["conv"]["weight"])  # conv over [x, B, C]
    np.testing.assert_array_equal(taps[:, E : E + N], taps[:, E + N :])
    np.testing.assert_array_equal(np.asarray(inter["ssm_io"]["Bm"]), np.asarray(inter["ssm_io"]["Cm"]))
    assert np.all(-np.exp(np.asarray(params["A_log"])) >= -0.16)
    assert np.min(inter["decay"]) > 0.9  # measured 0.94 on this input

    _, params, inter = run(mamba2(), make_x(4))
    taps = np.asarray(params["conv"]["weight"])
    assert np.max(np.abs(taps[:, E : E + N] - taps[:, E + N :])) > 0.1
    assert np.min(inter["decay"]) < 0.5


# ---------------------------------------------------------------------------------------------
# Carried state, forms, state size
# ---------------------------------------------------------------------------------------------

LAYERS = {
    "mamba": mamba,
    "mamba_polarized": lambda **kw: mamba(polarized=True, **kw),
    "mamba2": mamba2,
    "mamba2_polarized": lambda **kw: mamba2(polarized=True, **kw),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_split_and_resume_equals_whole(name):
    """Pieces of 5, 1 (the one-token step path) and 5 tokens with the cache carried."""
    layer = LAYERS[name](chunk_size=4)
    x = make_x(5)
    params = layer.init(jax.random.key(1), x)
    whole = layer.apply(params, x)
    cache = layer.init_cache(2, T)
    pieces = []
    for start, stop in ((0, 5), (5, 6), (6, T)):
        y, cache = layer.apply(params, x[:, start:stop], cache)
        pieces.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(pieces, 1)), np.asarray(whole), **F32_TOL)


@pytest.mark.parametrize("name, impls", [("mamba", ("scan", "chunk")), ("mamba2", ("chunk",))])
def test_forms_agree_at_layer_level(name, impls):
    """Outputs and parameter gradients of each parallel form equal the reference form's.

    (The polarized variants call the same operators with a fixed A = 0 column / head, which the
    operator tests cover in every form; they are left out here to keep the file fast.)"""
    x = make_x(6)
    params = LAYERS[name]().init(jax.random.key(1), x)

    def outputs_and_grads(impl):
        layer = LAYERS[name](impl=impl, chunk_size=4)

        def loss(p):
            y = layer.apply(p, x)
            return jnp.sum(y**2), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return y, grads

    y_ref, g_ref = outputs_and_grads("reference")
    for impl in impls:
        y, g = outputs_and_grads(impl)
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **F32_TOL)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                             atol=1e-4), g, g_ref)


@pytest.mark.parametrize("name, expected", [
    # Mamba: E = 32, N = 16, conv 4: (E N' + 3 E) * 4 bytes, N' = N or N - 1 when polarized.
    ("mamba", (32 * 16 + 3 * 32) * 4),
    ("mamba_polarized", (32 * 15 + 3 * 32) * 4),
    # Mamba-2: H = 4, N = 16, P = 8, conv over E + 2N = 64 channels: (H' N P + 3 * 64) * 4.
    ("mamba2", (4 * 16 * 8 + 3 * 64) * 4),
    ("mamba2_polarized", (3 * 16 * 8 + 3 * 64) * 4),
])
def test_state_size_formula_matches_cache(name, expected):
    layer = LAYERS[name]()
    assert cache_bytes(layer, 1000) == expected


# ---------------------------------------------------------------------------------------------
# Options, registry, presets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer, message", [
    (mamba(polarized=True, state_dim=2), "state_dim >= 3"),
    (Mamba2(d_model=D, polarized=True), "at least 3 heads"),  # E = 32, head_dim 16: 2 heads
    (mamba(initialization="xavier"), "initialization must be one of"),
    (mamba2(initialization="xavier"), "initialization must be one of"),
    (Mamba2(d_model=D, head_dim=12), "not divisible by head_dim"),
])
def test_bad_options_raise(layer, message):
    with pytest.raises(ValueError, match=message):
        layer.init(jax.random.key(0), make_x(length=3))


def test_registered_and_presets():
    assert MIXERS.get("mamba") is Mamba and MIXERS.get("mamba2") is Mamba2
    assert mixer_config("mamba_polarized").polarized is True
    assert mixer_config("mamba_mimetic").initialization == "mimetic"
    cfg = mixer_config("mamba2_polarized")
    assert cfg.name == "mamba2" and cfg.polarized is True and cfg.head_dim == 8
