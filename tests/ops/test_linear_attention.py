"""Tests for memjax.ops.linear_attention: forms agree with an independent float64 NumPy oracle.

Tight checks run in float64 (x64 is switched on only inside each test, never globally, since
tests share worker processes). float32 / bfloat16 inputs are checked against the same oracle
with stated relative-RMS tolerances. Shapes are tiny and cases few: on CPU the cost is the
number of distinct compilations, not the arithmetic.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import linear_attention_np

from memjax.ops import linear_attention, linear_attention_step

B, H, K, V = 2, 2, 4, 8

# Tolerances (float64 runs compare forms that differ only in summation order).
F64_TOL = dict(rtol=1e-10, atol=1e-10)
F64_GRAD_TOL = dict(rtol=1e-9, atol=1e-9)
# Relative RMS error vs the float64 oracle, for low-precision inputs. The oracle sees the inputs
# after their own rounding, so these measure the operator's error only. bfloat16 outputs are
# dominated by rounding o itself to bfloat16 (2^-9 relative); the state is float32 throughout.
LOW_PRECISION_TOL = {
    "float32": dict(o=1e-5, state=1e-5),
    "bfloat16": dict(o=2e-2, state=1e-5),
}


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test only."""
    with jax.enable_x64(True):
        yield


def make_gate(rng, T, kind):
    """Log-space decays [B, T, H] (g <= 0) of the named strength, or None."""
    if kind == "none":
        return None
    if kind == "zero":
        return np.zeros((B, T, H))
    if kind == "weak":
        return -0.01 * rng.uniform(0.5, 1.5, (B, T, H))
    if kind == "strong":
        return -30.0 * rng.uniform(0.9, 1.1, (B, T, H))
    if kind == "mixed":
        # Per head, typical magnitude swept geometrically from 0.01 to 30, per-token random,
        # and about a quarter of the gates exactly zero.
        per_head = np.geomspace(0.01, 30.0, H)
        g = -rng.uniform(0.0, 2.0, (B, T, H)) * per_head
        return np.where(rng.random((B, T, H)) < 0.25, 0.0, g)
    raise ValueError(kind)


def make_inputs(seed, T, gate="mixed", init=True):
    """float64 NumPy inputs: q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H] or None; h0 or None."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K))
    v = rng.normal(size=(B, T, H, V))
    g = make_gate(rng, T, gate)
    h0 = rng.normal(size=(B, H, K, V)) if init else None
    return q, k, v, g, h0


def to_jax(xs, dtype):
    return [None if x is None else jnp.asarray(x, dtype) for x in xs]


def to_f64(x):
    return None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def rel_rms(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.sqrt(np.mean((x - ref) ** 2)) / np.sqrt(np.mean(ref**2))


# ---------------------------------------------------------------------------------------------
# Forward, float64
# ---------------------------------------------------------------------------------------------

FORWARD_CASES = [
    # (T, chunk_size, gate, initial_state, scale)
    pytest.param(1, 16, "none", False, None, id="T1-none"),
    pytest.param(7, 16, "weak", True, None, id="T7-weak-h0-chunk>T"),
    # Strong decay with C=32: masked exponents reach ~1000, where exp overflows even in float64.
    pytest.param(37, 32, "strong", False, None, id="T37-C32-strong"),
    pytest.param(37, 16, "mixed", True, 0.3, id="T37-C16-mixed-h0-scale"),
    pytest.param(64, 16, "zero", True, None, id="T64-C16-zero-h0"),
    pytest.param(70, 64, "mixed", False, None, id="T70-C64-mixed"),
    pytest.param(70, 32, "none", True, None, id="T70-C32-none-h0"),
]


@pytest.mark.parametrize("T, chunk_size, gate, init, scale", FORWARD_CASES)
def test_forward_matches_numpy_f64(x64, T, chunk_size, gate, init, scale):
    q, k, v, g, h0 = make_inputs(0, T, gate, init)
    o_ref, s_ref = linear_attention_np(q, k, v, g, scale=scale, initial_state=h0)
    jq, jk, jv, jg, jh0 = to_jax((q, k, v, g, h0), jnp.float64)
    for impl in ("reference", "chunk", "auto"):
        o, s = linear_attention(
            jq, jk, jv, jg, scale=scale, initial_state=jh0, impl=impl, chunk_size=chunk_size
        )
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64
        np.testing.assert_allclose(o, o_ref, **F64_TOL, err_msg=f"o, impl={impl}")
        np.testing.assert_allclose(s, s_ref, **F64_TOL, err_msg=f"state, impl={impl}")


# ---------------------------------------------------------------------------------------------
# Gradients, float64
# ---------------------------------------------------------------------------------------------


def _loss(impl, chunk_size, do, ds):
    """sum(o * do) + sum(S_T * dS): a random cotangent on both outputs."""

    def loss(q, k, v, g, h0):
        o, s = linear_attention(q, k, v, g, initial_state=h0, impl=impl, chunk_size=chunk_size)
        return jnp.sum(o * do) + jnp.sum(s * ds)

    return loss


@pytest.mark.parametrize("gate", ["none", "zero", "mixed", "strong"])
def test_gradients_chunk_match_reference_f64(x64, gate):
    # C=32 with g ~ -30: a mask applied after exp would overflow (exponents ~1000) and NaN.
    T, chunk_size = 37, 32
    q, k, v, g, h0 = make_inputs(1, T, gate, init=True)
    rng = np.random.default_rng(2)
    do = jnp.asarray(rng.normal(size=(B, T, H, V)))
    ds = jnp.asarray(rng.normal(size=(B, H, K, V)))
    args = to_jax((q, k, v, g, h0), jnp.float64)
    argnums = (0, 1, 2, 4) if g is None else (0, 1, 2, 3, 4)
    names = ["q", "k", "v", "g", "initial_state"]

    grads = {
        impl: jax.jit(jax.grad(_loss(impl, chunk_size, do, ds), argnums=argnums))(*args)
        for impl in ("reference", "chunk")
    }
    for i, d_ref, d_chunk in zip(argnums, grads["reference"], grads["chunk"]):
        assert np.isfinite(d_chunk).all(), f"non-finite d{names[i]} (chunk)"
        assert np.isfinite(d_ref).all(), f"non-finite d{names[i]} (reference)"
        np.testing.assert_allclose(d_chunk, d_ref, **F64_GRAD_TOL, err_msg=f"d{names[i]}")


def test_reference_gradient_matches_numpy_finite_difference_f64(x64):
    """Anchor autodiff of the reference form to the NumPy oracle (directional derivative)."""
    T = 9
    q, k, v, g, h0 = make_inputs(3, T, "mixed", init=True)
    rng = np.random.default_rng(4)
    do = rng.normal(size=(B, T, H, V))
    ds = rng.normal(size=(B, H, K, V))
    x = (q, k, v, g, h0)
    direction = [rng.normal(size=a.shape) for a in x]

    def loss_np(xs):
        o, s = linear_attention_np(xs[0], xs[1], xs[2], xs[3], initial_state=xs[4])
        return np.sum(o * do) + np.sum(s * ds)

    eps = 1e-6
    plus = [a + eps * d for a, d in zip(x, direction)]
    minus = [a - eps * d for a, d in zip(x, direction)]
    fd = (loss_np(plus) - loss_np(minus)) / (2 * eps)

    loss = _loss("reference", 16, jnp.asarray(do), jnp.asarray(ds))
    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*to_jax(x, jnp.float64))
    ad = sum(np.sum(np.asarray(gr) * d) for gr, d in zip(grads, direction))
    np.testing.assert_allclose(ad, fd, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# State passing: split-and-resume, and the one-token step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_split_and_resume_equals_whole_f64(x64, impl):
    T, chunk_size = 37, 16
    q, k, v, g, h0 = to_jax(make_inputs(5, T, "mixed", init=True), jnp.float64)
    o_whole, s_whole = linear_attention(
        q, k, v, g, initial_state=h0, impl=impl, chunk_size=chunk_size
    )
    # Split points: at the first token, on a chunk boundary, and mid-chunk near the end.
    for split in (1, 16, 29):
        first, second = slice(0, split), slice(split, T)
        o1, s1 = linear_attention(
            q[:, first], k[:, first], v[:, first], g[:, first],
            initial_state=h0, impl=impl, chunk_size=chunk_size,
        )  # fmt: skip
        o2, s2 = linear_attention(
            q[:, second], k[:, second], v[:, second], g[:, second],
            initial_state=s1, impl=impl, chunk_size=chunk_size,
        )  # fmt: skip
        o = jnp.concatenate([o1, o2], axis=1)
        np.testing.assert_allclose(o, o_whole, **F64_TOL, err_msg=f"o, split={split}")
        np.testing.assert_allclose(s2, s_whole, **F64_TOL, err_msg=f"state, split={split}")


@pytest.mark.parametrize("gate", ["none", "mixed"])
def test_step_loop_equals_parallel_f64(x64, gate):
    T = 7
    q, k, v, g, h0 = to_jax(make_inputs(6, T, gate, init=True), jnp.float64)
    o_par, s_par = linear_attention(q, k, v, g, initial_state=h0, impl="chunk", chunk_size=4)

    step = jax.jit(linear_attention_step)
    state, outs = h0, []
    for t in range(T):
        o_t, state = step(q[:, t], k[:, t], v[:, t], state, None if g is None else g[:, t])
        outs.append(o_t)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), o_par, **F64_TOL)
    np.testing.assert_allclose(state, s_par, **F64_TOL)


def test_step_dtypes():
    q, k, v, g, h0 = make_inputs(7, 1, "mixed", init=True)
    jq, jk, jv = to_jax((q[:, 0], k[:, 0], v[:, 0]), jnp.bfloat16)
    o, s = linear_attention_step(jq, jk, jv, jnp.asarray(h0, jnp.float32), jnp.asarray(g[:, 0]))
    assert o.dtype == jnp.bfloat16 and o.shape == (B, H, V)
    assert s.dtype == jnp.float32 and s.shape == (B, H, K, V)


# ---------------------------------------------------------------------------------------------
# Low-precision inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision_vs_numpy(dtype, impl):
    T, chunk_size = 70, 32
    q, k, v, g, h0 = to_jax(make_inputs(8, T, "mixed", init=True), jnp.dtype(dtype))
    h0 = h0.astype(jnp.float32)  # states are float32 whatever the input dtype
    o, s = linear_attention(q, k, v, g, initial_state=h0, impl=impl, chunk_size=chunk_size)
    assert o.dtype == v.dtype
    assert s.dtype == jnp.float32

    o_ref, s_ref = linear_attention_np(*map(to_f64, (q, k, v, g)), initial_state=to_f64(h0))
    tol = LOW_PRECISION_TOL[dtype]
    assert rel_rms(o, o_ref) < tol["o"], f"o rel-RMS {rel_rms(o, o_ref):.2e}"
    assert rel_rms(s, s_ref) < tol["state"], f"state rel-RMS {rel_rms(s, s_ref):.2e}"


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _bad_call(change):
    """Build a call to linear_attention with one argument broken by `change`."""
    T = 5
    z = jnp.zeros
    kwargs = dict(
        q=z((B, T, H, K)), k=z((B, T, H, K)), v=z((B, T, H, V)), g=z((B, T, H)),
        initial_state=z((B, H, K, V)), impl="auto", chunk_size=4,
    )  # fmt: skip
    kwargs.update(change)
    return lambda: linear_attention(**kwargs)


BAD_INPUTS = [
    pytest.param({"q": jnp.zeros((B, 5, H))}, r"q must have rank 4", id="q-rank"),
    pytest.param({"v": jnp.zeros((5, H, V))}, r"v must have rank 4", id="v-rank"),
    pytest.param({"k": jnp.zeros((B, 6, H, K))}, r"k must have shape .*got \(2, 6", id="k-T"),
    pytest.param({"k": jnp.zeros((B, 5, H, K + 1))}, r"k must have shape", id="k-K"),
    pytest.param({"v": jnp.zeros((B, 6, H, V))}, r"v must have shape .*got \(2, 6", id="v-T"),
    pytest.param({"g": jnp.zeros((B, 5, H, K))}, r"g must have shape \[B, T, H\]", id="g-shape"),
    pytest.param({"g": jnp.zeros((B, 4, H))}, r"g must have shape", id="g-T"),
    pytest.param(
        {"initial_state": jnp.zeros((B, H, V, K))},
        r"initial_state must have shape \[B, H, K, V\] = \(2, 2, 4, 8\), got \(2, 2, 8, 4\)",
        id="state-shape",
    ),
    pytest.param({"chunk_size": 0}, r"chunk_size must be a positive int", id="chunk-0"),
    pytest.param({"chunk_size": -16}, r"chunk_size must be a positive int", id="chunk-neg"),
    pytest.param({"chunk_size": 16.0}, r"chunk_size must be a positive int", id="chunk-float"),
    pytest.param({"impl": "pallas"}, r"impl must be one of .*'chunk'.*'pallas'", id="impl"),
]


@pytest.mark.parametrize("change, message", BAD_INPUTS)
def test_bad_inputs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        _bad_call(change)()


def test_step_bad_inputs_raise():
    q, k, v = jnp.zeros((B, H, K)), jnp.zeros((B, H, K)), jnp.zeros((B, H, V))
    state = jnp.zeros((B, H, K, V))
    with pytest.raises(ValueError, match=r"q must have rank 3"):
        linear_attention_step(q[None], k, v, state)
    with pytest.raises(ValueError, match=r"state must have shape"):
        linear_attention_step(q, k, v, state[..., :-1])
    with pytest.raises(ValueError, match=r"g must have shape \[B, H\]"):
        linear_attention_step(q, k, v, state, jnp.zeros((B, 1, H)))
