"""Tests for memjax.ops.delta_rule: forms agree with an independent float64 NumPy oracle.

What is specific to the delta rule: the triangular inverse of the UT transform, gate strengths,
beta ranges and key norms, several rematerialised groups, the zero gate equal to DeltaNet. The
generic contract (forms, step, split-and-resume, T = 0/1, dtypes, bad inputs) is
test_contract.py's. float64 checks run inside the x64 fixture.

beta is drawn from (0, 1) or from (0, 2) (negative transition eigenvalues); keys are
L2-normalised as the layers do, except in the cases marked "small-keys" (unnormalised keys of
norm ~0.5).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import assert_gradients_match_reference
from numpy_reference import delta_rule_np
from specs import DELTA_RULE, gate

from memjax.ops import delta_rule, dispatch
from memjax.ops._common import unit_lower_inverse

B, H, K, V = 2, 2, 4, 8

# Tolerances (float64 runs compare forms that differ only in summation order).
F64_TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture
def small_groups(monkeypatch):
    """Make the chunk form's outer scan run over several groups even for short sequences."""
    monkeypatch.setitem(dispatch.tuning("delta_rule"), "group_tokens", 32)


def make_gate(rng, T, kind):
    """Log-space decays [B, T, H] (g <= 0) of the named strength, or None (DeltaNet)."""
    return gate(rng, (B, T, H), kind)


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
    got = jax.jit(unit_lower_inverse)(jnp.asarray(a))
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


def _check_gradients(seed, T, chunk_size, gate, beta_max=2.0, keys="unit"):
    q, k, v, beta, g, h0 = to_jax(make_inputs(seed, T, gate, beta_max, True, keys), jnp.float64)
    args = dict(q=q, k=k, v=v, beta=beta, g=g)
    assert_gradients_match_reference(DELTA_RULE, "chunk", args, h0, 1e-9, chunk_size=chunk_size)


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
