"""What is specific to memjax.ops.linear_scan beyond the operator contract (test_contract.py):
complex inputs, forward and backward against a hand-written adjoint, and a chunk-size sweep.

The backward oracle is the adjoint recurrence written by hand (no autodiff): with cotangents
``g_t`` on ``h_t`` and ``g_fin`` on the final state,

    lam_{T-1} = g_{T-1} + g_fin,   lam_t = g_t + a_{t+1} lam_{t+1},
    db_t = lam_t,   da_t = lam_t h_{t-1},   dh_{-1} = a_0 lam_0,

which is JAX's (unconjugated) vjp convention for this holomorphic map, so it holds for complex
inputs too. Complex compiles are slow on XLA CPU, so complex cases are few and tiny.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import linear_scan_np

from memjax.ops import linear_scan

IMPLS = ("reference", "scan", "chunk")
F64_TOL = dict(rtol=1e-11, atol=1e-11)


def scan_vjp_np(a, b, h0, ct_h, ct_final):
    """Adjoint of scan_np for cotangents (ct_h, ct_final): returns (da, db, dh0)."""
    h, _ = linear_scan_np(a, b, h0)
    T = b.shape[1]
    h_prev = np.concatenate([h0[:, None], h[:, :-1]], axis=1)
    lam = np.zeros_like(b)
    carry = ct_final
    for t in reversed(range(T)):
        carry = ct_h[:, t] + carry
        lam[:, t] = carry
        carry = a[:, t] * carry
    return lam * h_prev, lam, carry


def make_inputs(seed, shape, complex_=False):
    """Decays in (-1, 1) (signs included, so cancellations are exercised), inputs O(1)."""
    rng = np.random.default_rng(seed)
    Bsz, _, *S = shape
    a = rng.uniform(-0.99, 0.99, shape)
    b = rng.standard_normal(shape)
    h0 = rng.standard_normal((Bsz, *S))
    if complex_:
        a = a * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))
        b = b + 1j * rng.standard_normal(shape)
        h0 = h0 + 1j * rng.standard_normal((Bsz, *S))
    return a, b, h0


def _check_forward_backward(a, b, h0, impl, chunk_size):
    fn = lambda a_, b_, h_: linear_scan(a_, b_, initial_state=h_, impl=impl, chunk_size=chunk_size)
    (h, fin), vjp = jax.vjp(fn, jnp.asarray(a), jnp.asarray(b), jnp.asarray(h0))
    h_ref, fin_ref = linear_scan_np(a, b, h0)
    np.testing.assert_allclose(np.asarray(h), h_ref, **F64_TOL)
    np.testing.assert_allclose(np.asarray(fin), fin_ref, **F64_TOL)

    rng = np.random.default_rng(123)
    ct_h = rng.standard_normal(h_ref.shape).astype(h_ref.dtype)
    ct_fin = rng.standard_normal(fin_ref.shape).astype(fin_ref.dtype)
    if np.iscomplexobj(h_ref):
        ct_h = ct_h + 1j * rng.standard_normal(h_ref.shape)
        ct_fin = ct_fin + 1j * rng.standard_normal(fin_ref.shape)
    got = vjp((jnp.asarray(ct_h), jnp.asarray(ct_fin)))
    want = scan_vjp_np(a, b, h0, ct_h, ct_fin)
    for name, g, w in zip(("da", "db", "dh0"), got, want):
        np.testing.assert_allclose(np.asarray(g), w, err_msg=name, **F64_TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_complex_forms_match_numpy_forward_and_backward(x64, impl):
    a, b, h0 = make_inputs(1, (1, 5, 2), complex_=True)
    _check_forward_backward(a, b, h0, impl, chunk_size=2)


def test_gradient_through_real_loss_of_complex_scan(x64):
    """jax.grad of a real loss of a complex scan matches central finite differences of numpy."""
    a, b, h0 = make_inputs(2, (1, 4, 1), complex_=True)
    w = np.random.default_rng(5).standard_normal((1, 4, 1))

    def loss_np(a_):
        h, _ = linear_scan_np(a_, b, h0)
        return np.sum(w * np.real(h) + 0.5 * np.abs(h) ** 2)

    def loss(a_):
        h, _ = linear_scan(a_, jnp.asarray(b), initial_state=jnp.asarray(h0), impl="chunk",
                           chunk_size=3)
        return jnp.sum(w * jnp.real(h) + 0.5 * jnp.abs(h) ** 2)

    g = np.asarray(jax.grad(loss)(jnp.asarray(a)))
    eps = 1e-6
    fd = np.zeros_like(a)
    for idx in np.ndindex(a.shape):
        for unit in (1.0, 1j):
            e = np.zeros_like(a)
            e[idx] = eps * unit
            d = (loss_np(a + e) - loss_np(a - e)) / (2 * eps)
            fd[idx] += d * unit
    # JAX's gradient of a real function of z = x + iy is dL/dx - i dL/dy (the conjugate).
    np.testing.assert_allclose(g, np.conj(fd), rtol=1e-7, atol=1e-8)


def test_default_initial_state_is_zero_and_chunk_size_sweep(x64):
    a, b, _ = make_inputs(4, (1, 6, 2))
    h_ref, fin_ref = linear_scan_np(a, b, np.zeros((1, 2)))
    for c in (1, 4, 6, 100):
        h, fin = linear_scan(a, b, impl="chunk", chunk_size=c)
        np.testing.assert_allclose(h, h_ref, err_msg=f"chunk_size={c}", **F64_TOL)
        np.testing.assert_allclose(fin, fin_ref, err_msg=f"chunk_size={c}", **F64_TOL)
    h, _ = linear_scan(a, b)  # impl="auto"
    np.testing.assert_allclose(h, h_ref, **F64_TOL)


