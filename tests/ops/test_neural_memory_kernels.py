"""ATLAS's kernel view of the test-time memory (Behrouz et al. 2025, ATLAS section 4).

With the Hebbian (dot-product) loss ``-<M(phi(k)), v>``, a linear memory, theta = 1, no momentum
and no decay, the memory after t tokens is ``sum_i v_i phi(k_i)^T``, so its read is
``sum_i v_i phi(k_i) . phi(q_t)``. With ``phi`` the exponential kernel's features, that is
unnormalised softmax attention ``sum_i v_i exp(q_t . k_i)`` (DeepTransformer); the degree-p
polynomial map with coefficients ``1/i!`` (memjax.ops.feature_maps) truncates it at order p.
"""

import math

import jax
import jax.numpy as jnp
import pytest

from memjax.ops import MemorySpec, init_memory_params, neural_memory
from memjax.ops.feature_maps import exp_taylor_coeffs, polynomial

B, T, H, K = 1, 9, 2, 3


def _inputs(key, radius):
    """q, k of norm ``sqrt(radius)`` (so |q . k| <= radius) and unit-scale v."""
    kq, kk, kv = jax.random.split(key, 3)
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(jax.random.normal(kq, (B, T, H, K), jnp.float64)) * math.sqrt(radius)
    k = unit(jax.random.normal(kk, (B, T, H, K), jnp.float64)) * math.sqrt(radius)
    return q, k, jax.random.normal(kv, (B, T, H, K), jnp.float64)


def _hebbian_read(q, k, v, degree, impl):
    phi_q, phi_k = (polynomial(x, exp_taylor_coeffs(degree, jnp.float64)) for x in (q, k))
    spec = MemorySpec(loss="dot", momentum=False, memory_chunk=4)
    params = init_memory_params(jax.random.key(0), spec, H, phi_k.shape[-1], K, jnp.float64)
    ones, zeros = jnp.ones((B, T, H), jnp.float64), jnp.zeros((B, T, H), jnp.float64)
    o, _ = neural_memory(phi_q, phi_k, v, ones, zeros, spec=spec, params=params, impl=impl)
    return o


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_hebbian_linear_memory_on_exp_features_is_unnormalised_softmax_attention(x64, impl):
    q, k, v = _inputs(jax.random.key(1), radius=0.5)
    scores = jnp.exp(jnp.einsum("bthk,bshk->bhts", q, k))
    causal = jnp.tril(jnp.ones((T, T), bool))
    want = jnp.einsum("bhts,bshv->bthv", jnp.where(causal, scores, 0), v)
    degree = 6  # truncation error of exp at |x| <= 0.5: about 0.5^7 / 7! = 1.6e-6 per key
    got = _hebbian_read(q, k, v, degree, impl)
    err = float(jnp.max(jnp.abs(got - want)))
    assert err < T * 2e-6 * float(jnp.max(jnp.abs(v)))
    # and the truncation is what is left: degree 2 is visibly off at the same inputs
    assert float(jnp.max(jnp.abs(_hebbian_read(q, k, v, 2, impl) - want))) > 20 * err
