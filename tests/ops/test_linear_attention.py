"""Tests for memjax.ops.linear_attention: forms agree with an independent float64 NumPy oracle.

What is specific to linear attention: gate strengths from none to g ~ -30 per head and per key
channel, chunk sizes that split blocks and sub-chunks, the normalizer and its epsilon, strong
decay in float32. The generic contract (forms, step, split-and-resume, T = 0/1, dtypes, bad
inputs) is test_contract.py's. float64 checks run inside the x64 fixture.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import linear_attention_np, rel_rms
from specs import gate

from memjax.ops import linear_attention
from memjax.ops.linear_attention import NORMALIZER_EPS

B, H, K, V = 2, 2, 4, 8

# Tolerances (float64 runs compare forms that differ only in summation order).
F64_TOL = dict(rtol=1e-10, atol=1e-10)
F64_GRAD_TOL = dict(rtol=1e-9, atol=1e-9)


def make_gate(rng, T, kind):
    """Log decays per head ``[B, T, H]``, or per key channel ``[B, T, H, K]`` for "chan-" kinds."""
    if kind.startswith("chan-"):
        return gate(rng, (B, T, H, K), kind[len("chan-"):])
    return gate(rng, (B, T, H), kind)


def make_inputs(seed, T, gate="mixed", init=True, normalize=False):
    """float64 NumPy inputs: q, k [B,T,H,K]; v [B,T,H,V]; g or None; h0 or None.

    With ``normalize`` q and k are positive (as after a positive feature map, so that the
    normalizer q . z stays away from zero) and h0 is ``[B, H, K, V + 1]`` with a positive z column.
    """
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K))
    v = rng.normal(size=(B, T, H, V))
    g = make_gate(rng, T, gate)
    h0 = rng.normal(size=(B, H, K, V)) if init else None
    if normalize:
        q, k = np.abs(q) + 0.1, np.abs(k) + 0.1
        if init:
            h0 = np.concatenate([h0, rng.uniform(0.5, 2.0, (B, H, K, 1))], axis=-1)
    return q, k, v, g, h0


def to_jax(xs, dtype):
    return [None if x is None else jnp.asarray(x, dtype) for x in xs]


def to_f64(x):
    return None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# ---------------------------------------------------------------------------------------------
# Forward, float64
# ---------------------------------------------------------------------------------------------

FORWARD_CASES = [
    # (T, chunk_size, gate, initial_state, scale, normalize)
    pytest.param(1, 16, "none", False, None, False, id="T1-none"),
    pytest.param(7, 16, "weak", True, None, False, id="T7-weak-h0-chunk>T"),
    # Strong decay with C=32: masked exponents reach ~1000, where exp overflows even in float64.
    pytest.param(37, 32, "strong", False, None, False, id="T37-C32-strong"),
    pytest.param(37, 16, "mixed", True, 0.3, False, id="T37-C16-mixed-h0-scale"),
    pytest.param(64, 16, "zero", True, None, False, id="T64-C16-zero-h0"),
    pytest.param(70, 64, "mixed", False, None, False, id="T70-C64-mixed"),
    pytest.param(70, 32, "none", True, None, False, id="T70-C32-none-h0"),
    # C=4: several steps of the outer scan over blocks of chunks (up to 8 chunks per step).
    pytest.param(70, 4, "mixed", True, None, False, id="T70-C4-mixed-h0-blocks"),
    # Per-key-channel decay. C=64 with g ~ -30: chunk-local cumsums reach -2000.
    pytest.param(70, 64, "chan-strong", True, None, False, id="T70-C64-chan-strong-h0"),
    pytest.param(37, 16, "chan-mixed", True, 0.3, False, id="T37-C16-chan-mixed-h0-scale"),
    pytest.param(29, 24, "chan-mixed", False, None, False, id="T29-C24-chan-mixed-sub12"),
    pytest.param(37, 37, "chan-weak", True, None, False, id="T37-C37-chan-weak-sub1"),
    pytest.param(70, 4, "chan-mixed", True, None, False, id="T70-C4-chan-mixed-blocks"),
    # Normalizer (z carried as the last state column).
    pytest.param(70, 32, "none", True, None, True, id="T70-C32-none-norm-h0"),
    pytest.param(37, 16, "mixed", False, 0.3, True, id="T37-C16-mixed-norm-scale"),
    pytest.param(70, 4, "strong", True, None, True, id="T70-C4-strong-norm-h0-blocks"),
    pytest.param(37, 16, "chan-mixed", True, None, True, id="T37-C16-chan-mixed-norm-h0"),
]


@pytest.mark.parametrize("T, chunk_size, gate, init, scale, normalize", FORWARD_CASES)
def test_forward_matches_numpy_f64(x64, T, chunk_size, gate, init, scale, normalize):
    q, k, v, g, h0 = make_inputs(0, T, gate, init, normalize)
    o_ref, s_ref = linear_attention_np(
        q, k, v, g, scale=scale, initial_state=h0, normalize=normalize
    )
    jq, jk, jv, jg, jh0 = to_jax((q, k, v, g, h0), jnp.float64)
    for impl in ("reference", "chunk", "auto"):
        o, s = linear_attention(
            jq, jk, jv, jg, scale=scale, initial_state=jh0, normalize=normalize, impl=impl,
            chunk_size=chunk_size,
        )  # fmt: skip
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64
        assert s.shape == (B, H, K, V + normalize)
        np.testing.assert_allclose(o, o_ref, **F64_TOL, err_msg=f"o, impl={impl}")
        np.testing.assert_allclose(s, s_ref, **F64_TOL, err_msg=f"state, impl={impl}")


def test_normalizer_epsilon_f64(x64):
    """The epsilon is added to scale * q . z: checked where q . z is of its order (q ~ 1e-6) and
    at q = 0, where the output is 0 / eps = 0 rather than NaN."""
    assert NORMALIZER_EPS == 1e-6
    q, k, v, g, h0 = make_inputs(9, 5, "mixed", True, normalize=True)
    q[:, 1] *= 1e-6
    q[:, 2] = 0.0
    o_ref, _ = linear_attention_np(q, k, v, g, initial_state=h0, normalize=True, eps=1e-6)
    for impl in ("reference", "chunk"):
        o, _ = linear_attention(
            *to_jax((q, k, v, g), jnp.float64), initial_state=jnp.asarray(h0), normalize=True,
            impl=impl, chunk_size=4,
        )  # fmt: skip
        np.testing.assert_allclose(o, o_ref, **F64_TOL, err_msg=impl)
        np.testing.assert_array_equal(o[:, 2], 0.0)


# ---------------------------------------------------------------------------------------------
# Gradients, float64
# ---------------------------------------------------------------------------------------------


def _loss(impl, chunk_size, do, ds, normalize=False):
    """sum(o * do) + sum(S_T * dS): a random cotangent on both outputs."""

    def loss(q, k, v, g, h0, scale=None):
        o, s = linear_attention(
            q, k, v, g, scale=scale, initial_state=h0, normalize=normalize, impl=impl,
            chunk_size=chunk_size,
        )  # fmt: skip
        return jnp.sum(o * do) + jnp.sum(s * ds)

    return loss


GRADIENT_CASES = [
    # (gate, normalize, chunk_size); T = 37 throughout.
    # C=32 with g ~ -30: a mask applied after exp would overflow (exponents ~1000) and NaN.
    pytest.param("none", False, 32, id="none"),
    pytest.param("zero", False, 32, id="zero"),
    pytest.param("mixed", False, 32, id="mixed"),
    pytest.param("strong", False, 32, id="strong"),
    pytest.param("mixed", False, 4, id="mixed-C4-blocks"),
    # Per key channel: dg is [B, T, H, K].
    pytest.param("chan-mixed", False, 16, id="chan-mixed"),
    pytest.param("chan-strong", False, 32, id="chan-strong"),
    pytest.param("chan-weak", False, 4, id="chan-weak-C4-blocks"),
    # Normalizer.
    pytest.param("none", True, 16, id="none-norm"),
    pytest.param("mixed", True, 4, id="mixed-norm-C4-blocks"),
    pytest.param("chan-mixed", True, 16, id="chan-mixed-norm"),
]


@pytest.mark.parametrize("gate, normalize, chunk_size", GRADIENT_CASES)
def test_gradients_chunk_match_reference_f64(x64, gate, normalize, chunk_size):
    """Gradients of the chunk form (hand-written backward for g None / per head, autodiff for
    per channel) equal autodiff of the reference form, for q, k, v, g, initial_state, scale."""
    T = 37
    q, k, v, g, h0 = make_inputs(1, T, gate, init=True, normalize=normalize)
    rng = np.random.default_rng(2)
    do = jnp.asarray(rng.normal(size=(B, T, H, V)))
    ds = jnp.asarray(rng.normal(size=h0.shape))
    args = [*to_jax((q, k, v, g, h0), jnp.float64), jnp.asarray(0.3)]
    argnums = (0, 1, 2, 4, 5) if g is None else (0, 1, 2, 3, 4, 5)
    names = ["q", "k", "v", "g", "initial_state", "scale"]

    grads = {
        impl: jax.jit(jax.grad(_loss(impl, chunk_size, do, ds, normalize), argnums=argnums))(
            *args
        )
        for impl in ("reference", "chunk")
    }
    for i, d_ref, d_chunk in zip(argnums, grads["reference"], grads["chunk"]):
        assert d_chunk.shape == d_ref.shape == np.shape(args[i])
        assert np.isfinite(d_chunk).all(), f"non-finite d{names[i]} (chunk)"
        assert np.isfinite(d_ref).all(), f"non-finite d{names[i]} (reference)"
        np.testing.assert_allclose(d_chunk, d_ref, **F64_GRAD_TOL, err_msg=f"d{names[i]}")


@pytest.mark.parametrize("gate", ["strong", "chan-strong"])
def test_strong_decay_finite_float32(gate):
    """float32, C=64, g ~ -30 per token (chunk-local cumsums near -2000): forward values and all
    gradients stay finite and the output still matches the float64 oracle."""
    T, chunk_size = 70, 64
    q, k, v, g, h0 = to_jax(make_inputs(10, T, gate, init=True), jnp.float32)
    o, s = linear_attention(q, k, v, g, initial_state=h0, impl="chunk", chunk_size=chunk_size)
    assert np.isfinite(o).all() and np.isfinite(s).all()
    o_ref, _ = linear_attention_np(*map(to_f64, (q, k, v, g)), initial_state=to_f64(h0))
    assert rel_rms(o, o_ref) < 1e-5

    do = jnp.ones((B, T, H, V))
    grads = jax.grad(_loss("chunk", chunk_size, do, jnp.ones_like(h0)), argnums=(0, 1, 2, 3, 4))(
        q, k, v, g, h0
    )
    for name, d in zip("q k v g initial_state".split(), grads):
        assert np.isfinite(d).all(), f"non-finite d{name}"
