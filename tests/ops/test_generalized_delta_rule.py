"""Tests for memjax.ops.generalized_delta_rule (RWKV-7) against an independent float64 oracle.

What is specific to RWKV-7's rule: gate strengths, learning rates up to 2, the gated delta rule
as a special case, several blocks and non-power-of-two chunks, very strong gates. The generic
contract (forms, step, split-and-resume, T = 0/1, dtypes, bad inputs) is test_contract.py's.
float64 checks run inside the x64 fixture; cases reuse (T, chunk_size) pairs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from contract import assert_gradients_match_reference
from numpy_reference import generalized_delta_rule_np
from specs import GENERALIZED_DELTA_RULE, gate

from memjax.ops import generalized_delta_rule

B, H, K, V = 2, 2, 8, 4

# Tolerances (float64 runs compare forms that differ only in summation order and the triangular
# solve; observed errors are ~1e-14).
F64_TOL = dict(rtol=1e-9, atol=1e-9)
F64_GRAD_TOL = dict(rtol=1e-8, atol=1e-8)


def make_gate(rng, T, kind):
    """Per-channel log-space decays [B, T, H, K] (g <= 0) of the named strength, or None."""
    return gate(rng, (B, T, H, K), kind)


def make_inputs(seed, T, gate="mixed", init=True, lr_max=1.0):
    """float64 NumPy inputs in RWKV-7 form: q, k, v, g, a, b, h0.

    a = -kappa_hat, b = kappa_hat * lr with kappa_hat unit-norm per token and a per-channel
    learning rate lr in (0, lr_max); lr_max = 2 gives transitions with negative eigenvalues.
    """
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K)) * K**-0.5
    v = rng.normal(size=(B, T, H, V))
    g = make_gate(rng, T, gate)
    kappa = rng.normal(size=(B, T, H, K))
    kappa /= np.linalg.norm(kappa, axis=-1, keepdims=True)
    lr = rng.uniform(0.0, lr_max, (B, T, H, K))
    h0 = rng.normal(size=(B, H, K, V)) if init else None
    return q, k, v, g, -kappa, kappa * lr, h0


def to_jax(xs, dtype):
    return [None if x is None else jnp.asarray(x, dtype) for x in xs]


def run(xs, **kwargs):
    q, k, v, g, a, b, h0 = xs
    return generalized_delta_rule(q, k, v, g, a, b, initial_state=h0, **kwargs)


# ---------------------------------------------------------------------------------------------
# Forward, float64
# ---------------------------------------------------------------------------------------------

FORWARD_CASES = [
    # (T, chunk_size, gate, initial_state, lr_max, scale)
    pytest.param(1, 16, "weak", False, 1.0, None, id="T1-C16-weak"),
    pytest.param(7, 64, "zero", True, 2.0, None, id="T7-C64>T-zero-h0-lr2"),
    pytest.param(37, 16, "mixed", True, 1.0, 0.3, id="T37-C16-mixed-h0-scale"),
    # Strong decay: chunk-local cumulative decays reach ~-1000 (C=32) and ~-2000 (C=64), where
    # exp(c_i) * exp(-c_j) would overflow even in float64.
    pytest.param(37, 32, "strong", False, 1.0, None, id="T37-C32-strong"),
    # A chunk longer than T is shortened to T rounded up to 16: C=64 runs as C=48 here.
    pytest.param(37, 64, "mixed", True, 2.0, None, id="T37-C64as48-mixed-h0-lr2"),
    pytest.param(70, 64, "weak", True, 2.0, None, id="T70-C64-weak-h0-lr2"),
    pytest.param(64, 64, "strong", True, 2.0, None, id="T64-C64-strong-h0-lr2"),
    pytest.param(70, 32, "none", False, 1.0, None, id="T70-C32-none"),
]


@pytest.mark.parametrize("T, chunk_size, gate, init, lr_max, scale", FORWARD_CASES)
def test_forward_matches_numpy_f64(x64, T, chunk_size, gate, init, lr_max, scale):
    xs = make_inputs(0, T, gate, init, lr_max)
    o_ref, s_ref = generalized_delta_rule_np(*xs[:6], scale=scale, initial_state=xs[6])
    for impl in ("reference", "chunk", "auto"):
        o, s = run(to_jax(xs, jnp.float64), scale=scale, impl=impl, chunk_size=chunk_size)
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64
        np.testing.assert_allclose(o, o_ref, **F64_TOL, err_msg=f"o, impl={impl}")
        np.testing.assert_allclose(s, s_ref, **F64_TOL, err_msg=f"state, impl={impl}")


# ---------------------------------------------------------------------------------------------
# Gradients, float64
# ---------------------------------------------------------------------------------------------

GRAD_NAMES = ["q", "k", "v", "g", "a", "b", "initial_state"]


def _loss(impl, chunk_size, do, ds):
    """sum(o * do) + sum(S_T * dS): a random cotangent on both outputs."""

    def loss(*xs):
        o, s = run(xs, impl=impl, chunk_size=chunk_size)
        return jnp.sum(o * do) + jnp.sum(s * ds)

    return loss


@pytest.mark.parametrize(
    "gate, lr_max",
    [
        pytest.param("mixed", 2.0, id="mixed-lr2"),
        # g ~ -30 with C=32: a decay ratio built as exp(c_i) * exp(-c_j), or a mask applied
        # after exp, would overflow (exponents ~1000) and give inf / NaN gradients.
        pytest.param("strong", 1.0, id="strong"),
        pytest.param("zero", 1.0, id="zero"),
    ],
)
def test_gradients_chunk_match_reference_f64(x64, gate, lr_max):
    T, chunk_size = 37, 32
    q, k, v, g, a, b, h0 = to_jax(make_inputs(1, T, gate, init=True, lr_max=lr_max), jnp.float64)
    args = dict(q=q, k=k, v=v, g=g, a=a, b=b)
    assert_gradients_match_reference(GENERALIZED_DELTA_RULE, "chunk", args, h0, 1e-8,
                                     chunk_size=chunk_size)


# ---------------------------------------------------------------------------------------------
# Degenerate case: the gated delta rule
# ---------------------------------------------------------------------------------------------


def _gated_delta_np(q, k, v, beta, g, initial_state):
    """Gated delta rule from its equation, float64 (an oracle independent of this operator):

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T;  o_t = K^-1/2 S_t^T q_t.
    q, k [B, T, H, K]; v [B, T, H, V]; beta, g [B, T, H].
    """
    S = np.array(initial_state, dtype=np.float64)
    o = np.zeros(v.shape)
    eye = np.eye(q.shape[-1])
    for t in range(q.shape[1]):
        for n in range(q.shape[0]):
            for h in range(q.shape[2]):
                kt, bt = k[n, t, h], beta[n, t, h]
                transition = np.exp(g[n, t, h]) * (eye - bt * np.outer(kt, kt))
                S[n, h] = transition @ S[n, h] + bt * np.outer(kt, v[n, t, h])
                o[n, t, h] = q.shape[-1] ** -0.5 * (S[n, h].T @ q[n, t, h])
    return o, S


def test_gated_delta_rule_special_case_f64(x64):
    """exp(g)(I - beta k k^T) = diag(exp(g) 1) + a b^T with a = -exp(g) beta k, b = k."""
    T, chunk_size = 37, 16
    rng = np.random.default_rng(9)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.normal(size=(B, T, H, V))
    beta = rng.uniform(0.0, 2.0, (B, T, H))
    g = np.where(rng.random((B, T, H)) < 0.25, 0.0, -rng.uniform(0.0, 3.0, (B, T, H)))
    h0 = rng.normal(size=(B, H, K, V))
    o_ref, s_ref = _gated_delta_np(q, k, v, beta, g, h0)

    g_vec = np.broadcast_to(g[..., None], (B, T, H, K))
    a = -(np.exp(g) * beta)[..., None] * k
    written = beta[..., None] * k
    xs = to_jax((q, written, v, g_vec, a, k, h0), jnp.float64)
    for impl in ("reference", "chunk"):
        o, s = run(xs, impl=impl, chunk_size=chunk_size)
        np.testing.assert_allclose(o, o_ref, **F64_TOL, err_msg=f"o, impl={impl}")
        np.testing.assert_allclose(s, s_ref, **F64_TOL, err_msg=f"state, impl={impl}")


# ---------------------------------------------------------------------------------------------
# Chunk form internals: several blocks of the outer scan, non-power-of-two chunks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunk_size, block_chunks, gate",
    [
        # Five chunks of 16 in blocks of 2 (the last block padded): the hand-written backward
        # pass chains d(state) across blocks.
        pytest.param(16, 2, "mixed", id="C16-blocks2-mixed"),
        # C = 48 is not a power of two: the pair hierarchy pads each chunk to 64.
        pytest.param(48, 1, "strong", id="C48-blocks1-strong"),
    ],
)
def test_chunk_form_blocks_match_reference_f64(x64, chunk_size, block_chunks, gate):
    from memjax.ops.generalized_delta_rule import _chunk_form

    T = 70
    xs = to_jax(make_inputs(10, T, gate, init=True, lr_max=2.0), jnp.float64)
    rng = np.random.default_rng(11)
    do = jnp.asarray(rng.normal(size=(B, T, H, V)))
    ds = jnp.asarray(rng.normal(size=(B, H, K, V)))
    scale = K**-0.5

    def chunk_loss(*x):
        o, s = _chunk_form(*x, scale, chunk_size=chunk_size, static_scale=scale,
                           block_chunks=block_chunks)
        return jnp.sum(o * do) + jnp.sum(s * ds), (o, s)

    (_, (o, s)), grads = jax.jit(jax.value_and_grad(chunk_loss, argnums=tuple(range(7)),
                                                    has_aux=True))(*xs)
    o_ref, s_ref = run(xs, impl="reference")
    np.testing.assert_allclose(o, o_ref, **F64_TOL)
    np.testing.assert_allclose(s, s_ref, **F64_TOL)
    ref_grads = jax.jit(jax.grad(_loss("reference", 16, do, ds), argnums=tuple(range(7))))(*xs)
    for name, d_ref, d_chunk in zip(GRAD_NAMES, ref_grads, grads):
        assert np.isfinite(d_chunk).all(), f"non-finite d{name}"
        np.testing.assert_allclose(d_chunk, d_ref, **F64_GRAD_TOL, err_msg=f"d{name}")


def test_chunk_gradients_finite_for_very_strong_gates():
    """float32, g down to -1000: every decay factor underflows to 0 and nothing is NaN / inf."""
    T = 40
    xs = list(to_jax(make_inputs(12, T, "strong", init=True), jnp.float32))
    xs[3] = xs[3] * 30.0  # g ~ -900
    loss = _loss("chunk", 16, jnp.ones((B, T, H, V)), jnp.ones((B, H, K, V)))
    grads = jax.jit(jax.grad(loss, argnums=tuple(range(7))))(*xs)
    for name, d in zip(GRAD_NAMES, grads):
        assert np.isfinite(np.asarray(d)).all(), f"non-finite d{name}"
