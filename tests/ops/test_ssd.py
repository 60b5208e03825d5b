"""Tests for memjax.ops.ssd (Mamba-2) against a float64 NumPy loop written from the equations.

Float64 checks run inside the ``x64`` fixture. The heads' A include an exact 0 (decay 1), a strong
decay and an ordinary rate. Shapes are tiny and distinct compilations few.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import rel_rms

from memjax.ops import ssd, ssd_step

B, H, P, N = 2, 3, 2, 4
FORMS = ("reference", "chunk")
F64_TOL = dict(rtol=1e-10, atol=1e-10)
F64_GRAD_TOL = dict(rtol=1e-9, atol=1e-9)
# float32 inputs vs the float64 oracle (fed the same float32-rounded inputs), relative RMS.
F32_TOL = 2e-6


def ssd_np(x, dt, A, Bm, Cm, Dskip=None, initial_state=None):
    """S_t[h] = exp(dt_t[h] A[h]) S_{t-1}[h] + dt_t[h] outer(Bm_t, x_t[h]);
    y_t[h] = S_t[h]^T Cm_t + Dskip[h] x_t[h]. Plain loops in float64."""
    x, dt, A, Bm, Cm = (np.asarray(a, np.float64) for a in (x, dt, A, Bm, Cm))
    Bsz, T, Hn, Pn = x.shape
    S = (np.zeros((Bsz, Hn, Bm.shape[-1], Pn)) if initial_state is None
         else np.array(initial_state, np.float64))
    skip = np.zeros(Hn) if Dskip is None else np.asarray(Dskip, np.float64)
    y = np.zeros_like(x)
    for t in range(T):
        for b in range(Bsz):
            for h in range(Hn):
                S[b, h] = (np.exp(dt[b, t, h] * A[h]) * S[b, h]
                           + dt[b, t, h] * np.outer(Bm[b, t], x[b, t, h]))
                y[b, t, h] = S[b, h].T @ Cm[b, t] + skip[h] * x[b, t, h]
    return y, S


def make_inputs(seed, T):
    """float64 NumPy inputs (x, dt, A, Bm, Cm, Dskip, S0)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, H, P))
    dt = rng.uniform(0.01, 1.0, (B, T, H))
    A = np.array([0.0, -40.0, -rng.uniform(0.1, 3.0)])  # decay 1, strong, ordinary
    Bm = rng.normal(size=(B, T, N))
    Cm = rng.normal(size=(B, T, N))
    Dskip = rng.normal(size=(H,))
    S0 = rng.normal(size=(B, H, N, P))
    return x, dt, A, Bm, Cm, Dskip, S0


def jnp64(xs):
    return [None if a is None else jnp.asarray(a, jnp.float64) for a in xs]


@pytest.mark.parametrize("impl", FORMS)
def test_forms_match_numpy(x64, impl):
    x, dt, A, Bm, Cm, Dskip, S0 = make_inputs(0, 13)
    y_ref, S_ref = ssd_np(x, dt, A, Bm, Cm, Dskip, S0)
    y, S = ssd(*jnp64((x, dt, A, Bm, Cm, Dskip)), initial_state=jnp.asarray(S0), impl=impl,
               chunk_size=4)
    assert y.dtype == jnp.float64 and S.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(y), y_ref, **F64_TOL)
    np.testing.assert_allclose(np.asarray(S), S_ref, **F64_TOL)


def test_defaults_no_skip_no_initial_state(x64):
    x, dt, A, Bm, Cm, _, _ = make_inputs(1, 7)
    y_ref, S_ref = ssd_np(x, dt, A, Bm, Cm)
    y, S = ssd(*jnp64((x, dt, A, Bm, Cm)))  # impl="auto"
    np.testing.assert_allclose(np.asarray(y), y_ref, **F64_TOL)
    np.testing.assert_allclose(np.asarray(S), S_ref, **F64_TOL)


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 64])
def test_chunk_size_sweep(x64, chunk_size):
    x, dt, A, Bm, Cm, Dskip, S0 = make_inputs(2, 13)
    y_ref, S_ref = ssd_np(x, dt, A, Bm, Cm, Dskip, S0)
    y, S = ssd(*jnp64((x, dt, A, Bm, Cm, Dskip)), initial_state=jnp.asarray(S0), impl="chunk",
               chunk_size=chunk_size)
    np.testing.assert_allclose(np.asarray(y), y_ref, **F64_TOL)
    np.testing.assert_allclose(np.asarray(S), S_ref, **F64_TOL)


def _loss(impl, x, dt, A, Bm, Cm, Dskip, S0, wy, wS):
    y, S = ssd(x, dt, A, Bm, Cm, Dskip, initial_state=S0, impl=impl, chunk_size=4)
    return jnp.sum(y * wy) + jnp.sum(S * wS)


def test_gradients_agree_and_match_finite_differences(x64):
    """The chunk form's gradient w.r.t. every input equals the reference form's; the reference
    gradient matches a central finite difference of the NumPy oracle along a random direction."""
    T = 9
    inputs = make_inputs(3, T)
    rng = np.random.default_rng(4)
    wy, wS = rng.normal(size=(B, T, H, P)), rng.normal(size=(B, H, N, P))
    args = jnp64(inputs)
    grads = {
        impl: jax.grad(_loss, argnums=tuple(range(1, 8)))(impl, *args, jnp.asarray(wy), jnp.asarray(wS))
        for impl in FORMS
    }
    for name, g, g_ref in zip("x dt A Bm Cm Dskip S0".split(), grads["chunk"], grads["reference"]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), **F64_GRAD_TOL, err_msg=f"d{name}")

    direction = [rng.normal(size=np.shape(a)) for a in inputs]
    eps = 1e-6

    def oracle_loss(sign):
        moved = [a + sign * eps * v for a, v in zip(inputs, direction)]
        y, S = ssd_np(*moved)
        return np.sum(y * wy) + np.sum(S * wS)

    fd = (oracle_loss(1) - oracle_loss(-1)) / (2 * eps)
    analytic = sum(np.sum(np.asarray(g) * v) for g, v in zip(grads["reference"], direction))
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)


@pytest.mark.parametrize("impl", FORMS)
def test_split_and_resume_equals_whole(x64, impl):
    x, dt, A, Bm, Cm, Dskip, S0 = jnp64(make_inputs(5, 13))
    y, S = ssd(x, dt, A, Bm, Cm, Dskip, initial_state=S0, impl=impl, chunk_size=4)
    cut = 6
    y1, S1 = ssd(x[:, :cut], dt[:, :cut], A, Bm[:, :cut], Cm[:, :cut], Dskip, initial_state=S0,
                 impl=impl, chunk_size=4)
    y2, S2 = ssd(x[:, cut:], dt[:, cut:], A, Bm[:, cut:], Cm[:, cut:], Dskip, initial_state=S1,
                 impl=impl, chunk_size=4)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), np.asarray(y), **F64_TOL)
    np.testing.assert_allclose(np.asarray(S2), np.asarray(S), **F64_TOL)


def test_step_decoding_equals_numpy(x64):
    x, dt, A, Bm, Cm, Dskip, S0 = make_inputs(6, 7)
    y_ref, S_ref = ssd_np(x, dt, A, Bm, Cm, Dskip, S0)
    step = jax.jit(ssd_step)
    S = jnp.asarray(S0)
    ys = []
    for t in range(x.shape[1]):
        y, S = step(*jnp64((x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t])), S, jnp.asarray(Dskip))
        ys.append(y)
    np.testing.assert_allclose(np.asarray(jnp.stack(ys, 1)), y_ref, **F64_TOL)
    np.testing.assert_allclose(np.asarray(S), S_ref, **F64_TOL)


def test_empty_sequence_returns_initial_state(x64):
    x, dt, A, Bm, Cm, Dskip, S0 = jnp64(make_inputs(7, 3))
    y, S = ssd(x[:, :0], dt[:, :0], A, Bm[:, :0], Cm[:, :0], Dskip, initial_state=S0)
    assert y.shape == (B, 0, H, P)
    np.testing.assert_array_equal(np.asarray(S), np.asarray(S0))


@pytest.mark.parametrize("impl", FORMS)
def test_float32_within_stated_tolerance(impl):
    inputs = [np.asarray(a, np.float32).astype(np.float64) for a in make_inputs(8, 13)]
    y_ref, S_ref = ssd_np(*inputs[:6], initial_state=inputs[6])
    f32 = [jnp.asarray(a, jnp.float32) for a in inputs]
    y, S = ssd(*f32[:6], initial_state=f32[6], impl=impl, chunk_size=4)
    assert y.dtype == jnp.float32 and S.dtype == jnp.float32
    assert rel_rms(y, y_ref) < F32_TOL
    assert rel_rms(S, S_ref) < F32_TOL


def _bad_inputs():
    x, dt, A, Bm, Cm, Dskip, S0 = (np.zeros(np.shape(a), np.float32) for a in make_inputs(0, 5))
    good = dict(x=x, dt=dt, A=A, Bm=Bm, Cm=Cm, Dskip=Dskip, initial_state=S0)
    return [
        ("x", dict(good, x=x[..., 0])),
        ("dt", dict(good, dt=dt[:, :, :2])),
        ("A", dict(good, A=A[:2])),
        ("Bm", dict(good, Bm=Bm[:, :4])),
        ("Cm", dict(good, Cm=Cm[:, :, :3])),
        ("Dskip", dict(good, Dskip=np.zeros(H + 1, np.float32))),
        ("initial_state", dict(good, initial_state=S0[..., :1])),
    ]


@pytest.mark.parametrize("name, kwargs", _bad_inputs(), ids=lambda c: c if isinstance(c, str) else "")
def test_bad_shapes_raise_value_error_naming_argument(name, kwargs):
    kwargs = dict(kwargs)
    x, dt, A, Bm, Cm = (kwargs.pop(k) for k in ("x", "dt", "A", "Bm", "Cm"))
    with pytest.raises(ValueError, match=rf"^{name} must"):
        ssd(x, dt, A, Bm, Cm, **kwargs)


def test_bad_step_shapes_and_options_raise():
    x, dt, A, Bm, Cm, Dskip, S0 = (np.zeros(np.shape(a), np.float32) for a in make_inputs(0, 5))
    with pytest.raises(ValueError, match="^state must"):
        ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], S0[:, :2])
    with pytest.raises(ValueError, match="^dt must"):
        ssd_step(x[:, 0], dt[:, 0, :1], A, Bm[:, 0], Cm[:, 0], S0)
    with pytest.raises(ValueError, match="impl"):
        ssd(x, dt, A, Bm, Cm, impl="associative")
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(x, dt, A, Bm, Cm, chunk_size=-1)
