"""Tests for memjax.ops.delta_rule: forms agree with an independent float64 NumPy oracle.

Tight checks run in float64 (x64 is switched on only inside each test, never globally, since
tests share worker processes). float32 / bfloat16 inputs are checked against the same oracle
with stated relative-RMS tolerances. Shapes are tiny and cases few: on CPU the cost is the
number of distinct compilations, not the arithmetic.

beta is drawn from (0, 1) or from (0, 2) (negative transition eigenvalues); keys are
L2-normalised as the layers do, except in the cases marked "small-keys" (unnormalised keys of
norm ~0.5).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import delta_rule_np, rel_rms

from memjax.ops import delta_rule, delta_rule_step, dispatch
from memjax.ops.delta_rule import _unit_lower_inverse


B, H, K, V = 2, 2, 4, 8

# Tolerances (float64 runs compare forms that differ only in summation order).
F64_TOL = dict(rtol=1e-10, atol=1e-10)
F64_GRAD_TOL = dict(rtol=1e-9, atol=1e-9)
# Relative RMS error vs the float64 oracle, for low-precision inputs. The oracle sees the inputs
# after their own rounding, so these measure the operator's error only. Measured here (and at
# T=1024, K=V=32, C=64): float32 <= 8e-7 for o and state with either form; bfloat16 o ~1.7e-3,
# dominated by rounding o itself to bfloat16 (2^-9 relative); the state is float32 throughout.
LOW_PRECISION_TOL = {
    "float32": dict(o=5e-6, state=5e-6),
    "bfloat16": dict(o=5e-3, state=5e-6),
}


@pytest.fixture
def small_groups(monkeypatch):
    """Make the chunk form's outer scan run over several groups even for short sequences."""
    monkeypatch.setitem(dispatch.tuning("delta_rule"), "group_tokens", 32)


def make_gate(rng, T, kind):
    """Log-space decays [B, T, H] (g <= 0) of the named strength, or None (DeltaNet)."""
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


def make_inputs(seed, T, gate="mixed", beta_max=2.0, init=True, keys="unit"):
    """float64 NumPy inputs: q, k [B,T,H,K]; v [B,T,H,V]; beta [B,T,H]; g or None; h0 or None.

    keys="unit": L2-normalised keys; "small": unnormalised keys of norm about 0.5.
    """
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K))
    if keys == "unit":
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    else:
        k *= 0.25
    v = rng.normal(size=(B, T, H, V))
    beta = rng.uniform(0.0, beta_max, (B, T, H))
    g = make_gate(rng, T, gate)
    h0 = rng.normal(size=(B, H, K, V)) if init else None
    return q, k, v, beta, g, h0


def to_jax(xs, dtype):
    return [None if x is None else jnp.asarray(x, dtype) for x in xs]


def to_f64(x):
    return None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# ---------------------------------------------------------------------------------------------
# The triangular inverse used by the UT transform
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("C", [1, 5, 64])
def test_unit_lower_inverse_f64(x64, C):
    """(I + a)^-1 by recursive doubling, for power-of-two and padded sizes."""
    rng = np.random.default_rng(C)
    a = np.tril(rng.normal(size=(3, C, C)), -1) / np.sqrt(C)
    expected = np.linalg.inv(np.eye(C) + a)
    a[0] += np.triu(rng.normal(size=(C, C)), 0)  # only the strictly-lower part may be read
    got = jax.jit(_unit_lower_inverse)(jnp.asarray(a))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


# ---------------------------------------------------------------------------------------------
# Forward, float64
# ---------------------------------------------------------------------------------------------

FORWARD_CASES = [
    # (T, chunk_size, gate, beta_max, initial_state, scale, keys)
    pytest.param(1, 16, "none", 1.0, False, None, "unit", id="T1-C16-deltanet"),
    pytest.param(7, 1, "mixed", 2.0, True, None, "unit", id="T7-C1-mixed-beta2-h0"),
    pytest.param(7, 16, "weak", 2.0, True, None, "unit", id="T7-C16>T-weak-beta2-h0"),
    # Strong decay with C=32: masked exponents reach ~1000, where exp overflows even in float64.
    pytest.param(37, 32, "strong", 2.0, False, None, "unit", id="T37-C32-strong-beta2"),
    pytest.param(37, 16, "mixed", 1.0, True, 0.3, "unit", id="T37-C16-mixed-h0-scale"),
    pytest.param(37, 20, "mixed", 2.0, True, None, "small", id="T37-C20-mixed-beta2-small-keys"),
    pytest.param(64, 16, "zero", 2.0, True, None, "unit", id="T64-C16-zero-beta2-h0"),
    pytest.param(70, 64, "mixed", 2.0, False, None, "unit", id="T70-C64-mixed-beta2"),
    pytest.param(70, 32, "none", 2.0, True, None, "unit", id="T70-C32-deltanet-beta2-h0"),
    pytest.param(300, 128, "mixed", 2.0, True, None, "unit", id="T300-C128-mixed-beta2-h0"),
]


@pytest.mark.parametrize("T, chunk_size, gate, beta_max, init, scale, keys", FORWARD_CASES)
def test_forward_matches_numpy_f64(x64, T, chunk_size, gate, beta_max, init, scale, keys):
    q, k, v, beta, g, h0 = make_inputs(0, T, gate, beta_max, init, keys)
    o_ref, s_ref = delta_rule_np(q, k, v, beta, g, scale=scale, initial_state=h0)
    args = to_jax((q, k, v, beta, g), jnp.float64)
    (jh0,) = to_jax((h0,), jnp.float64)
    for impl in ("reference", "chunk"):
        o, s = delta_rule(
            *args, scale=scale, initial_state=jh0, impl=impl, chunk_size=chunk_size
        )
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64
        assert o.shape == (B, T, H, V) and s.shape == (B, H, K, V)
        np.testing.assert_allclose(o, o_ref, **F64_TOL, err_msg=f"o, impl={impl}")
        np.testing.assert_allclose(s, s_ref, **F64_TOL, err_msg=f"state, impl={impl}")


def test_auto_is_chunk_f64(x64):
    q, k, v, beta, g, h0 = to_jax(make_inputs(1, 37, "mixed"), jnp.float64)
    o_auto, s_auto = delta_rule(q, k, v, beta, g, initial_state=h0, impl="auto", chunk_size=16)
    o_chunk, s_chunk = delta_rule(q, k, v, beta, g, initial_state=h0, impl="chunk", chunk_size=16)
    np.testing.assert_array_equal(o_auto, o_chunk)
    np.testing.assert_array_equal(s_auto, s_chunk)


@pytest.mark.parametrize("gate", ["none", "mixed"])
def test_forward_several_groups_matches_numpy_f64(x64, small_groups, gate):
    """The chunk form's outer scan over groups of chunks, with a fully padded last chunk."""
    T, chunk_size = 70, 16  # 5 chunks -> 3 groups of 2 chunks, the 6th chunk all padding
    q, k, v, beta, g, h0 = make_inputs(2, T, gate, init=True)
    o_ref, s_ref = delta_rule_np(q, k, v, beta, g, initial_state=h0)
    args = to_jax((q, k, v, beta, g), jnp.float64)
    o, s = delta_rule(
        *args, initial_state=jnp.asarray(h0), impl="chunk", chunk_size=chunk_size
    )
    np.testing.assert_allclose(o, o_ref, **F64_TOL)
    np.testing.assert_allclose(s, s_ref, **F64_TOL)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_zero_gate_equals_deltanet_f64(x64, impl):
    T = 37
    q, k, v, beta, g, h0 = to_jax(make_inputs(3, T, "zero"), jnp.float64)
    o_gated, s_gated = delta_rule(q, k, v, beta, g, initial_state=h0, impl=impl, chunk_size=16)
    o_plain, s_plain = delta_rule(q, k, v, beta, None, initial_state=h0, impl=impl, chunk_size=16)
    np.testing.assert_allclose(o_gated, o_plain, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(s_gated, s_plain, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# Gradients, float64
# ---------------------------------------------------------------------------------------------


def _loss(impl, chunk_size, do, ds):
    """sum(o * do) + sum(S_T * dS): a random cotangent on both outputs."""

    def loss(q, k, v, beta, g, h0):
        o, s = delta_rule(q, k, v, beta, g, initial_state=h0, impl=impl, chunk_size=chunk_size)
        return jnp.sum(o * do) + jnp.sum(s * ds)

    return loss


NAMES = ["q", "k", "v", "beta", "g", "initial_state"]


def _check_gradients(seed, T, chunk_size, gate, beta_max=2.0, keys="unit"):
    q, k, v, beta, g, h0 = make_inputs(seed, T, gate, beta_max, init=True, keys=keys)
    rng = np.random.default_rng(seed + 100)
    do = jnp.asarray(rng.normal(size=(B, T, H, V)))
    ds = jnp.asarray(rng.normal(size=(B, H, K, V)))
    args = to_jax((q, k, v, beta, g, h0), jnp.float64)
    argnums = (0, 1, 2, 3, 5) if g is None else (0, 1, 2, 3, 4, 5)

    grads = {
        impl: jax.jit(jax.grad(_loss(impl, chunk_size, do, ds), argnums=argnums))(*args)
        for impl in ("reference", "chunk")
    }
    for i, d_ref, d_chunk in zip(argnums, grads["reference"], grads["chunk"]):
        assert np.isfinite(d_chunk).all(), f"non-finite d{NAMES[i]} (chunk)"
        assert np.isfinite(d_ref).all(), f"non-finite d{NAMES[i]} (reference)"
        np.testing.assert_allclose(d_chunk, d_ref, **F64_GRAD_TOL, err_msg=f"d{NAMES[i]}")


GRADIENT_CASES = [
    # (T, chunk_size, gate, beta_max, keys)
    pytest.param(37, 16, "none", 2.0, "unit", id="T37-C16-deltanet-beta2"),
    pytest.param(37, 16, "zero", 1.0, "unit", id="T37-C16-zero"),
    pytest.param(37, 16, "mixed", 2.0, "small", id="T37-C16-mixed-beta2-small-keys"),
    # C=32 with g ~ -30: a mask applied after exp would overflow (exponents ~1000) and NaN.
    pytest.param(37, 32, "strong", 2.0, "unit", id="T37-C32-strong-beta2"),
    pytest.param(37, 64, "weak", 2.0, "unit", id="T37-C64>T-weak-beta2"),
]


@pytest.mark.parametrize("T, chunk_size, gate, beta_max, keys", GRADIENT_CASES)
def test_gradients_chunk_match_reference_f64(x64, T, chunk_size, gate, beta_max, keys):
    _check_gradients(4, T, chunk_size, gate, beta_max, keys)


def test_gradients_several_groups_f64(x64, small_groups):
    _check_gradients(5, 70, 16, "mixed")  # 3 groups of 2 chunks, last chunk all padding


def test_reference_gradient_matches_numpy_finite_difference_f64(x64):
    """Anchor autodiff of the reference form to the NumPy oracle (directional derivative)."""
    T = 9
    x = make_inputs(6, T, "mixed", init=True)
    rng = np.random.default_rng(7)
    do = rng.normal(size=(B, T, H, V))
    ds = rng.normal(size=(B, H, K, V))
    direction = [rng.normal(size=a.shape) for a in x]

    def loss_np(xs):
        o, s = delta_rule_np(*xs[:5], initial_state=xs[5])
        return np.sum(o * do) + np.sum(s * ds)

    eps = 1e-6
    plus = [a + eps * d for a, d in zip(x, direction)]
    minus = [a - eps * d for a, d in zip(x, direction)]
    fd = (loss_np(plus) - loss_np(minus)) / (2 * eps)

    loss = _loss("reference", 16, jnp.asarray(do), jnp.asarray(ds))
    grads = jax.grad(loss, argnums=tuple(range(6)))(*to_jax(x, jnp.float64))
    ad = sum(np.sum(np.asarray(gr) * d) for gr, d in zip(grads, direction))
    np.testing.assert_allclose(ad, fd, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# State passing: split-and-resume, and the one-token step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_split_and_resume_equals_whole_f64(x64, impl):
    T, chunk_size = 37, 16
    q, k, v, beta, g, h0 = to_jax(make_inputs(8, T, "mixed", init=True), jnp.float64)
    o_whole, s_whole = delta_rule(
        q, k, v, beta, g, initial_state=h0, impl=impl, chunk_size=chunk_size
    )
    # Split points: after the first token (a one-token first call), and mid-chunk near the end.
    for split in (1, 29):
        first, second = slice(0, split), slice(split, T)
        o1, s1 = delta_rule(
            q[:, first], k[:, first], v[:, first], beta[:, first], g[:, first],
            initial_state=h0, impl=impl, chunk_size=chunk_size,
        )  # fmt: skip
        o2, s2 = delta_rule(
            q[:, second], k[:, second], v[:, second], beta[:, second], g[:, second],
            initial_state=s1, impl=impl, chunk_size=chunk_size,
        )  # fmt: skip
        o = jnp.concatenate([o1, o2], axis=1)
        np.testing.assert_allclose(o, o_whole, **F64_TOL, err_msg=f"o, split={split}")
        np.testing.assert_allclose(s2, s_whole, **F64_TOL, err_msg=f"state, split={split}")


@pytest.mark.parametrize("gate", ["none", "mixed"])
def test_step_loop_equals_parallel_f64(x64, gate):
    T = 7
    q, k, v, beta, g, h0 = to_jax(make_inputs(9, T, gate, init=True), jnp.float64)
    o_par, s_par = delta_rule(q, k, v, beta, g, initial_state=h0, impl="chunk", chunk_size=4)

    step = jax.jit(delta_rule_step)
    state, outs = h0, []
    for t in range(T):
        g_t = None if g is None else g[:, t]
        o_t, state = step(q[:, t], k[:, t], v[:, t], beta[:, t], state, g_t)
        outs.append(o_t)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), o_par, **F64_TOL)
    np.testing.assert_allclose(state, s_par, **F64_TOL)


def test_step_dtypes():
    q, k, v, beta, g, h0 = make_inputs(10, 1, "mixed", init=True)
    jq, jk, jv = to_jax((q[:, 0], k[:, 0], v[:, 0]), jnp.bfloat16)
    o, s = delta_rule_step(
        jq, jk, jv, jnp.asarray(beta[:, 0], jnp.bfloat16), jnp.asarray(h0, jnp.float32),
        jnp.asarray(g[:, 0], jnp.bfloat16),
    )  # fmt: skip
    assert o.dtype == jnp.bfloat16 and o.shape == (B, H, V)
    assert s.dtype == jnp.float32 and s.shape == (B, H, K, V)


# ---------------------------------------------------------------------------------------------
# Low-precision inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["chunk", "reference"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision_vs_numpy(dtype, impl):
    T, chunk_size = 70, 32
    q, k, v, beta, g, h0 = to_jax(make_inputs(11, T, "mixed", init=True), jnp.dtype(dtype))
    h0 = h0.astype(jnp.float32)  # states are float32 whatever the input dtype
    o, s = delta_rule(q, k, v, beta, g, initial_state=h0, impl=impl, chunk_size=chunk_size)
    assert o.dtype == v.dtype
    assert s.dtype == jnp.float32

    o_ref, s_ref = delta_rule_np(*map(to_f64, (q, k, v, beta, g)), initial_state=to_f64(h0))
    tol = LOW_PRECISION_TOL[dtype]
    assert rel_rms(o, o_ref) < tol["o"], f"o rel-RMS {rel_rms(o, o_ref):.2e}"
    assert rel_rms(s, s_ref) < tol["state"], f"state rel-RMS {rel_rms(s, s_ref):.2e}"


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _bad_call(change):
    """Build a call to delta_rule with one argument broken by `change`."""
    T = 5
    z = jnp.zeros
    kwargs = dict(
        q=z((B, T, H, K)), k=z((B, T, H, K)), v=z((B, T, H, V)), beta=z((B, T, H)),
        g=z((B, T, H)), initial_state=z((B, H, K, V)), impl="auto", chunk_size=4,
    )  # fmt: skip
    kwargs.update(change)
    return lambda: delta_rule(**kwargs)


BAD_INPUTS = [
    pytest.param({"q": jnp.zeros((B, 5, H))}, r"q must have rank 4", id="q-rank"),
    pytest.param({"v": jnp.zeros((5, H, V))}, r"v must have rank 4", id="v-rank"),
    pytest.param({"k": jnp.zeros((B, 6, H, K))}, r"k must have shape .*got \(2, 6", id="k-T"),
    pytest.param({"k": jnp.zeros((B, 5, H, K + 1))}, r"k must have shape", id="k-K"),
    pytest.param({"v": jnp.zeros((B, 6, H, V))}, r"v must have shape .*got \(2, 6", id="v-T"),
    pytest.param(
        {"beta": jnp.zeros((B, 5, H, 1))},
        r"beta must have shape \[B, T, H\] = \(2, 5, 2\), got \(2, 5, 2, 1\)",
        id="beta-shape",
    ),
    pytest.param({"beta": jnp.zeros((B, 4, H))}, r"beta must have shape", id="beta-T"),
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
    pytest.param({"impl": "pallas"}, r"no kernel is registered for 'delta_rule' on platform", id="impl"),
]


@pytest.mark.parametrize("change, message", BAD_INPUTS)
def test_bad_inputs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        _bad_call(change)()


def test_step_bad_inputs_raise():
    q, k, v = jnp.zeros((B, H, K)), jnp.zeros((B, H, K)), jnp.zeros((B, H, V))
    beta, state = jnp.zeros((B, H)), jnp.zeros((B, H, K, V))
    with pytest.raises(ValueError, match=r"q must have rank 3"):
        delta_rule_step(q[None], k, v, beta, state)
    with pytest.raises(ValueError, match=r"beta must have shape \[B, H\]"):
        delta_rule_step(q, k, v, beta[:, :1], state)
    with pytest.raises(ValueError, match=r"state must have shape"):
        delta_rule_step(q, k, v, beta, state[..., :-1])
    with pytest.raises(ValueError, match=r"g must have shape \[B, H\]"):
        delta_rule_step(q, k, v, beta, state, jnp.zeros((B, 1, H)))
