"""Tests for memjax.ops.selective_scan against a float64 NumPy loop written from the equations.

Float64 checks run inside the ``x64`` fixture. A's columns include an exact 0 (decay 1, the
polarized "never forget" channel), a strong decay and ordinary rates. Shapes are tiny and
distinct compilations few.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import rel_rms

from memjax.ops import selective_scan, selective_scan_step

B, D, N = 2, 3, 4
FORMS = ("reference", "scan", "chunk")
F64_TOL = dict(rtol=1e-10, atol=1e-10)
F64_GRAD_TOL = dict(rtol=1e-9, atol=1e-9)
# float32 inputs vs the float64 oracle (fed the same float32-rounded inputs), relative RMS.
F32_TOL = 2e-6


def selective_scan_np(x, dt, A, Bm, Cm, Dskip=None, initial_state=None):
    """h_t[d,n] = exp(dt_t[d] A[d,n]) h_{t-1}[d,n] + dt_t[d] Bm_t[n] x_t[d];
    y_t[d] = sum_n Cm_t[n] h_t[d,n] + Dskip[d] x_t[d]. Plain loops in float64."""
    x, dt, A, Bm, Cm = (np.asarray(a, np.float64) for a in (x, dt, A, Bm, Cm))
    Bsz, T, Dn = x.shape
    Nn = A.shape[1]
    h = np.zeros((Bsz, Dn, Nn)) if initial_state is None else np.array(initial_state, np.float64)
    skip = np.zeros(Dn) if Dskip is None else np.asarray(Dskip, np.float64)
    y = np.zeros((Bsz, T, Dn))
    for t in range(T):
        for b in range(Bsz):
            for d in range(Dn):
                for n in range(Nn):
                    h[b, d, n] = (np.exp(dt[b, t, d] * A[d, n]) * h[b, d, n]
                                  + dt[b, t, d] * Bm[b, t, n] * x[b, t, d])
                y[b, t, d] = Cm[b, t] @ h[b, d] + skip[d] * x[b, t, d]
    return y, h


def make_inputs(seed, T):
    """float64 NumPy inputs (x, dt, A, Bm, Cm, Dskip, h0)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, D))
    dt = rng.uniform(0.01, 1.0, (B, T, D))
    A = -rng.uniform(0.1, 3.0, (D, N))
    A[:, 0] = 0.0  # decay exactly 1
    A[:, 1] = -40.0  # strong decay: exp(dt A) as small as e^-40
    Bm = rng.normal(size=(B, T, N))
    Cm = rng.normal(size=(B, T, N))
    Dskip = rng.normal(size=(D,))
    h0 = rng.normal(size=(B, D, N))
    return x, dt, A, Bm, Cm, Dskip, h0


def jnp64(xs):
    return [None if a is None else jnp.asarray(a, jnp.float64) for a in xs]


@pytest.mark.parametrize("impl", FORMS)
def test_forms_match_numpy(x64, impl):
    x, dt, A, Bm, Cm, Dskip, h0 = make_inputs(0, 13)
    y_ref, h_ref = selective_scan_np(x, dt, A, Bm, Cm, Dskip, h0)
    y, h = selective_scan(*jnp64((x, dt, A, Bm, Cm, Dskip)), initial_state=jnp.asarray(h0),
                          impl=impl, chunk_size=4)
    assert y.dtype == jnp.float64 and h.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), y_ref, **F64_TOL)
    np.testing.assert_allclose(np.asarray(h), h_ref, **F64_TOL)


def test_defaults_no_skip_no_initial_state(x64):
    x, dt, A, Bm, Cm, _, _ = make_inputs(1, 7)
    y_ref, h_ref = selective_scan_np(x, dt, A, Bm, Cm)
    y, h = selective_scan(*jnp64((x, dt, A, Bm, Cm)))  # impl="auto"
    np.testing.assert_allclose(np.asarray(y), y_ref, **F64_TOL)
    np.testing.assert_allclose(np.asarray(h), h_ref, **F64_TOL)


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 64])
def test_chunk_size_sweep(x64, chunk_size):
    x, dt, A, Bm, Cm, Dskip, h0 = make_inputs(2, 13)
    y_ref, h_ref = selective_scan_np(x, dt, A, Bm, Cm, Dskip, h0)
    y, h = selective_scan(*jnp64((x, dt, A, Bm, Cm, Dskip)), initial_state=jnp.asarray(h0),
                          impl="chunk", chunk_size=chunk_size)
    np.testing.assert_allclose(np.asarray(y), y_ref, **F64_TOL)
    np.testing.assert_allclose(np.asarray(h), h_ref, **F64_TOL)


def _loss(impl, x, dt, A, Bm, Cm, Dskip, h0, wy, wh):
    y, h = selective_scan(x, dt, A, Bm, Cm, Dskip, initial_state=h0, impl=impl, chunk_size=4)
    return jnp.sum(y * wy) + jnp.sum(h * wh)


def test_gradients_agree_and_match_finite_differences(x64):
    """Every form's gradient w.r.t. every input equals the reference form's; the reference
    gradient matches a central finite difference of the NumPy oracle along a random direction."""
    T = 9
    inputs = make_inputs(3, T)
    rng = np.random.default_rng(4)
    wy, wh = rng.normal(size=(B, T, D)), rng.normal(size=(B, D, N))
    args = jnp64(inputs)
    grads = {
        impl: jax.grad(_loss, argnums=tuple(range(1, 8)))(impl, *args, jnp.asarray(wy), jnp.asarray(wh))
        for impl in FORMS
    }
    for impl in ("scan", "chunk"):
        for name, g, g_ref in zip("x dt A Bm Cm Dskip h0".split(), grads[impl], grads["reference"]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), **F64_GRAD_TOL,
                                       err_msg=f"{impl} d{name}")

    direction = [rng.normal(size=np.shape(a)) for a in inputs]
    eps = 1e-6

    def oracle_loss(sign):
        moved = [a + sign * eps * v for a, v in zip(inputs, direction)]
        y, h = selective_scan_np(*moved)
        return np.sum(y * wy) + np.sum(h * wh)

    fd = (oracle_loss(1) - oracle_loss(-1)) / (2 * eps)
    analytic = sum(np.sum(np.asarray(g) * v) for g, v in zip(grads["reference"], direction))
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)


@pytest.mark.parametrize("impl", FORMS)
def test_split_and_resume_equals_whole(x64, impl):
    x, dt, A, Bm, Cm, Dskip, h0 = jnp64(make_inputs(5, 13))
    y, h = selective_scan(x, dt, A, Bm, Cm, Dskip, initial_state=h0, impl=impl, chunk_size=4)
    cut = 6
    y1, h1 = selective_scan(x[:, :cut], dt[:, :cut], A, Bm[:, :cut], Cm[:, :cut], Dskip,
                            initial_state=h0, impl=impl, chunk_size=4)
    y2, h2 = selective_scan(x[:, cut:], dt[:, cut:], A, Bm[:, cut:], Cm[:, cut:], Dskip,
                            initial_state=h1, impl=impl, chunk_size=4)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), np.asarray(y), **F64_TOL)
    np.testing.assert_allclose(np.asarray(h2), np.asarray(h), **F64_TOL)


def test_step_decoding_equals_numpy(x64):
    x, dt, A, Bm, Cm, Dskip, h0 = make_inputs(6, 7)
    y_ref, h_ref = selective_scan_np(x, dt, A, Bm, Cm, Dskip, h0)
    step = jax.jit(selective_scan_step)
    h = jnp.asarray(h0)
    ys = []
    for t in range(x.shape[1]):
        y, h = step(*jnp64((x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t])), h, jnp.asarray(Dskip))
        ys.append(y)
    np.testing.assert_allclose(np.asarray(jnp.stack(ys, 1)), y_ref, **F64_TOL)
    np.testing.assert_allclose(np.asarray(h), h_ref, **F64_TOL)


def test_empty_sequence_returns_initial_state(x64):
    x, dt, A, Bm, Cm, Dskip, h0 = jnp64(make_inputs(7, 3))
    y, h = selective_scan(x[:, :0], dt[:, :0], A, Bm[:, :0], Cm[:, :0], Dskip, initial_state=h0)
    assert y.shape == (B, 0, D)
    np.testing.assert_array_equal(np.asarray(h), np.asarray(h0))


@pytest.mark.parametrize("impl", FORMS)
def test_float32_within_stated_tolerance(impl):
    inputs = [np.asarray(a, np.float32).astype(np.float64) for a in make_inputs(8, 13)]
    y_ref, h_ref = selective_scan_np(*inputs[:6], initial_state=inputs[6])
    f32 = [jnp.asarray(a, jnp.float32) for a in inputs]
    y, h = selective_scan(*f32[:6], initial_state=f32[6], impl=impl, chunk_size=4)
    assert y.dtype == jnp.float32 and h.dtype == jnp.float32
    assert rel_rms(y, y_ref) < F32_TOL
    assert rel_rms(h, h_ref) < F32_TOL


def test_bfloat16_input_gives_bfloat16_output_float32_state():
    x, dt, A, Bm, Cm, Dskip, h0 = (jnp.asarray(a, jnp.bfloat16) for a in make_inputs(9, 5))
    y, h = selective_scan(x, dt, A, Bm, Cm, Dskip)
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32


def _bad_inputs():
    x, dt, A, Bm, Cm, Dskip, h0 = (np.zeros(np.shape(a), np.float32) for a in make_inputs(0, 5))
    good = dict(x=x, dt=dt, A=A, Bm=Bm, Cm=Cm, Dskip=Dskip, initial_state=h0)
    return [
        ("x", dict(good, x=x[0])),
        ("dt", dict(good, dt=dt[:, :4])),
        ("A", dict(good, A=A[:2])),
        ("Bm", dict(good, Bm=Bm[:, :, :3])),
        ("Cm", dict(good, Cm=Cm[:, :4])),
        ("Dskip", dict(good, Dskip=np.zeros(D + 1, np.float32))),
        ("initial_state", dict(good, initial_state=h0[:1])),
    ]


@pytest.mark.parametrize("name, kwargs", _bad_inputs(), ids=lambda c: c if isinstance(c, str) else "")
def test_bad_shapes_raise_value_error_naming_argument(name, kwargs):
    kwargs = dict(kwargs)
    x, dt, A, Bm, Cm = (kwargs.pop(k) for k in ("x", "dt", "A", "Bm", "Cm"))
    with pytest.raises(ValueError, match=rf"^{name} must"):
        selective_scan(x, dt, A, Bm, Cm, **kwargs)


def test_bad_step_shapes_and_options_raise():
    x, dt, A, Bm, Cm, Dskip, h0 = (np.zeros(np.shape(a), np.float32) for a in make_inputs(0, 5))
    with pytest.raises(ValueError, match="^state must"):
        selective_scan_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], h0[:, :2])
    with pytest.raises(ValueError, match="^Cm must"):
        selective_scan_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0, :2], h0)
    with pytest.raises(ValueError, match="impl"):
        selective_scan(x, dt, A, Bm, Cm, impl="fft")
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(x, dt, A, Bm, Cm, impl="chunk", chunk_size=0)
