"""Tests for memjax.ops.diagonal_ssm (S4D and S5): every form against a float64 NumPy loop.

The oracle discretises with its own formulas and runs the recurrence token by token in
complex128. Gradients (w.r.t. u, Lambda, B, C, log_dt and the initial state) are checked against
central finite differences of that oracle, one real direction at a time (real and imaginary
parts of complex parameters separately). JAX's gradient of a real loss w.r.t. a complex z = x + iy
is ``dL/dx - i dL/dy``, so it is compared with the conjugate of the finite-difference gradient.
Complex compiles are slow on XLA CPU: shapes are tiny and the number of distinct programs small.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.ops import s4d, s4d_step, s5, s5_step

F64_TOL = dict(rtol=1e-10, atol=1e-10)
FD_TOL = dict(rtol=1e-6, atol=1e-7)
FD_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Float64 NumPy oracle
# ---------------------------------------------------------------------------------------------


def discretize_np(Lambda, dt, method):
    if method == "zoh":
        Lambda_bar = np.exp(dt * Lambda)
        return Lambda_bar, (Lambda_bar - 1.0) / Lambda
    Lambda_bar = (1.0 + dt * Lambda / 2) / (1.0 - dt * Lambda / 2)
    return Lambda_bar, dt / (1.0 - dt * Lambda / 2)


def s4d_np(u, Lambda, B, C, log_dt, D, x0, method="zoh"):
    """Per channel h and mode n: x = Lbar x + Bbar u_t;  y_t = 2 Re(sum_n C x) + D u_t."""
    Lambda_bar, gain = discretize_np(Lambda, np.exp(log_dt)[:, None], method)
    B_bar = gain * B
    x = np.array(x0, dtype=np.complex128)
    y = np.zeros(u.shape)
    for t in range(u.shape[1]):
        x = Lambda_bar * x + B_bar * u[:, t, :, None]
        y[:, t] = 2.0 * np.real(np.sum(C * x, axis=-1)) + D * u[:, t]
    return y, x


def s5_np(u, Lambda, B, C, log_dt, D, x0, method="zoh", conj_sym=True):
    """Shared state: x = Lbar x + Bbar u_t (Bbar [P, H]);  y_t = 2 Re(C x) + D u_t (C [H, P])."""
    Lambda_bar, gain = discretize_np(Lambda, np.exp(log_dt), method)
    B_bar = gain[:, None] * B
    x = np.array(x0, dtype=np.complex128)
    y = np.zeros(u.shape)
    for t in range(u.shape[1]):
        x = Lambda_bar * x + u[:, t] @ B_bar.T
        y[:, t] = (2.0 if conj_sym else 1.0) * np.real(x @ C.T) + D * u[:, t]
    return y, x


def crandn(rng, *shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def stable_eigs(rng, *shape):
    return -rng.uniform(0.1, 1.0, shape) + 1j * rng.uniform(-3.0, 3.0, shape)


def s4d_inputs(seed, Bsz=2, T=7, H=3, N=4):
    rng = np.random.default_rng(seed)
    return dict(u=rng.standard_normal((Bsz, T, H)), Lambda=stable_eigs(rng, H, N),
                B=crandn(rng, H, N), C=crandn(rng, H, N),
                log_dt=np.log(rng.uniform(0.05, 0.5, H)), D=rng.standard_normal(H),
                x0=crandn(rng, Bsz, H, N))


def s5_inputs(seed, Bsz=2, T=7, H=3, P=4):
    rng = np.random.default_rng(seed)
    return dict(u=rng.standard_normal((Bsz, T, H)), Lambda=stable_eigs(rng, P),
                B=crandn(rng, P, H), C=crandn(rng, H, P),
                log_dt=np.log(rng.uniform(0.05, 0.5, P)), D=rng.standard_normal(H),
                x0=crandn(rng, Bsz, P))


def run_op(op, p, impl, **kw):
    return op(p["u"], p["Lambda"], p["B"], p["C"], p["log_dt"], p["D"], initial_state=p["x0"],
              impl=impl, **kw)


def run_steps(step, p, **kw):
    state = jnp.asarray(p["x0"])
    ys = []
    for t in range(p["u"].shape[1]):
        y, state = step(p["u"][:, t], state, p["Lambda"], p["B"], p["C"], p["log_dt"], p["D"], **kw)
        ys.append(y)
    return jnp.stack(ys, axis=1), state


# ---------------------------------------------------------------------------------------------
# Forward: forms == step == oracle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_s4d_forms_and_step_match_numpy(x64, method):
    p = s4d_inputs(0)
    y_ref, x_ref = s4d_np(**p, method=method)
    for impl in ("conv", "scan", "reference"):
        y, x = run_op(s4d, p, impl, discretization=method)
        np.testing.assert_allclose(y, y_ref, err_msg=impl, **F64_TOL)
        np.testing.assert_allclose(x, x_ref, err_msg=impl, **F64_TOL)
    y, x = run_steps(s4d_step, p, discretization=method)
    np.testing.assert_allclose(y, y_ref, **F64_TOL)
    np.testing.assert_allclose(x, x_ref, **F64_TOL)


def test_s4d_conv_without_initial_state_and_without_skip(x64):
    p = {**s4d_inputs(1, T=6), "D": None}
    y_ref, x_ref = s4d_np(**{**p, "D": 0.0, "x0": np.zeros((2, 3, 4))})
    y, x = s4d(p["u"], p["Lambda"], p["B"], p["C"], p["log_dt"], impl="conv")
    np.testing.assert_allclose(y, y_ref, **F64_TOL)
    np.testing.assert_allclose(x, x_ref, **F64_TOL)


@pytest.mark.parametrize("method, conj_sym", [("zoh", True), ("bilinear", False)])
def test_s5_forms_and_step_match_numpy(x64, method, conj_sym):
    p = s5_inputs(2)
    y_ref, x_ref = s5_np(**p, method=method, conj_sym=conj_sym)
    for impl in ("scan", "chunk", "reference"):
        y, x = run_op(s5, p, impl, discretization=method, conj_sym=conj_sym, chunk_size=3)
        np.testing.assert_allclose(y, y_ref, err_msg=impl, **F64_TOL)
        np.testing.assert_allclose(x, x_ref, err_msg=impl, **F64_TOL)
    y, x = run_steps(s5_step, p, discretization=method, conj_sym=conj_sym)
    np.testing.assert_allclose(y, y_ref, **F64_TOL)
    np.testing.assert_allclose(x, x_ref, **F64_TOL)


# ---------------------------------------------------------------------------------------------
# Gradients against finite differences of the oracle
# ---------------------------------------------------------------------------------------------

GRAD_ARGS = ("u", "Lambda", "B", "C", "log_dt", "x0")


def fd_gradient(loss_np, p, name):
    """Central differences of loss_np w.r.t. p[name] (complex: d/dRe + i d/dIm)."""
    x = p[name]
    grad = np.zeros_like(x)
    units = (1.0, 1j) if np.iscomplexobj(x) else (1.0,)
    for idx in np.ndindex(x.shape):
        for unit in units:
            e = np.zeros_like(x)
            e[idx] = FD_EPS * unit
            d = (loss_np({**p, name: x + e}) - loss_np({**p, name: x - e})) / (2 * FD_EPS)
            grad[idx] += d * unit
    return grad


def check_gradients(op, oracle, p, impls, **kw):
    rng = np.random.default_rng(99)
    y_ref, x_ref = oracle(**p)
    w_y = rng.standard_normal(y_ref.shape)
    w_x = crandn(rng, *x_ref.shape)

    def loss_np(q):
        y, x = oracle(**q)
        return np.sum(w_y * y) + np.sum(np.real(np.conj(w_x) * x))

    want = {n: fd_gradient(loss_np, p, n) for n in GRAD_ARGS}

    for impl in impls:
        def loss(args, impl=impl):
            y, x = op(args["u"], args["Lambda"], args["B"], args["C"], args["log_dt"], p["D"],
                      initial_state=args["x0"], impl=impl, **kw)
            return jnp.sum(w_y * y) + jnp.sum(jnp.real(jnp.conj(w_x) * x))

        got = jax.grad(loss)({n: jnp.asarray(p[n]) for n in GRAD_ARGS})
        for n in GRAD_ARGS:
            g = np.asarray(got[n])
            np.testing.assert_allclose(g, np.conj(want[n]) if np.iscomplexobj(g) else want[n],
                                       err_msg=f"{impl}: d/d{n}", **FD_TOL)


def test_s4d_gradients_match_finite_differences(x64):
    p = s4d_inputs(3, Bsz=1, T=5, H=2, N=3)
    check_gradients(s4d, s4d_np, p, ("conv", "scan", "reference"))


def test_s5_gradients_match_finite_differences(x64):
    p = s5_inputs(4, Bsz=1, T=5, H=2, P=3)
    check_gradients(s5, s5_np, p, ("scan", "reference"))


# ---------------------------------------------------------------------------------------------
# Split and resume, mixing forms
# ---------------------------------------------------------------------------------------------


def test_s4d_split_and_resume_equals_whole_across_forms(x64):
    p = s4d_inputs(5, T=9)
    y_ref, x_ref = s4d_np(**p)
    params = (p["Lambda"], p["B"], p["C"], p["log_dt"], p["D"])
    for first, second in (("conv", "conv"), ("conv", "scan"), ("scan", "conv")):
        y1, s = s4d(p["u"][:, :4], *params, initial_state=p["x0"], impl=first)
        y2, s = s4d(p["u"][:, 4:], *params, initial_state=s, impl=second)
        np.testing.assert_allclose(np.concatenate([y1, y2], 1), y_ref, err_msg=first + second,
                                   **F64_TOL)
        np.testing.assert_allclose(s, x_ref, **F64_TOL)


def test_s5_split_and_resume_equals_whole(x64):
    p = s5_inputs(6, T=9)
    y_ref, x_ref = s5_np(**p)
    params = (p["Lambda"], p["B"], p["C"], p["log_dt"], p["D"])
    y1, s = s5(p["u"][:, :5], *params, initial_state=p["x0"])
    y2, s = s5(p["u"][:, 5:], *params, initial_state=s, impl="chunk", chunk_size=3)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), y_ref, **F64_TOL)
    np.testing.assert_allclose(s, x_ref, **F64_TOL)


# ---------------------------------------------------------------------------------------------
# float32 accuracy at a realistic length and initialisation
# ---------------------------------------------------------------------------------------------


def test_s4d_float32_conv_and_scan_match_float64_oracle():
    """S4D-Lin eigenvalues (-1/2 + i pi n), T = 200: the worst-conditioned part of the conv form
    is the Vandermonde phase l dt Im(Lambda), up to ~200 * 0.1 * 22 rad here."""
    rng = np.random.default_rng(7)
    H, N, T = 4, 8, 200
    Lambda = np.broadcast_to(-0.5 + 1j * np.pi * np.arange(N), (H, N))
    p = dict(u=rng.standard_normal((1, T, H)), Lambda=Lambda, B=np.ones((H, N), complex),
             C=crandn(rng, H, N) * 0.5 ** 0.5, log_dt=np.log(np.geomspace(1e-3, 1e-1, H)),
             D=np.ones(H), x0=crandn(rng, 1, H, N))
    y_ref, x_ref = s4d_np(**p)
    f32 = {k: jnp.asarray(v, jnp.complex64 if np.iscomplexobj(v) else jnp.float32)
           for k, v in p.items()}
    for impl in ("conv", "scan"):
        y, x = run_op(s4d, f32, impl)
        assert y.dtype == jnp.float32 and x.dtype == jnp.complex64
        rel = np.sqrt(np.mean((np.asarray(y) - y_ref) ** 2) / np.mean(y_ref ** 2))
        assert rel < 2e-5, (impl, rel)
        np.testing.assert_allclose(x, x_ref, rtol=1e-4, atol=1e-4 * np.abs(x_ref).max())


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    H, N, P = 3, 4, 5
    u = jnp.zeros((2, 6, H))
    L4, B4, C4 = (jnp.zeros((H, N), jnp.complex64),) * 3
    dt4 = jnp.zeros(H)
    with pytest.raises(ValueError, match="impl must be one of"):
        s4d(u, L4, B4, C4, dt4, impl="fft")
    with pytest.raises(ValueError, match="discretization must be one of"):
        s4d(u, L4, B4, C4, dt4, discretization="euler")
    with pytest.raises(ValueError, match=r"C must have shape \[H, N\]"):
        s4d(u, L4, B4, jnp.zeros((H, N + 1)), dt4)
    with pytest.raises(ValueError, match=r"log_dt must have shape \[H\]"):
        s4d(u, L4, B4, C4, jnp.zeros(H + 1))
    with pytest.raises(ValueError, match=r"u must have shape \[B, T, H\] with H = 3"):
        s4d(jnp.zeros((2, 6, H + 1)), L4, B4, C4, dt4)
    with pytest.raises(ValueError, match=r"u must have rank 3"):
        s4d(jnp.zeros((6, H)), L4, B4, C4, dt4)
    with pytest.raises(ValueError, match=r"initial_state must have shape \[B, H, N\]"):
        s4d(u, L4, B4, C4, dt4, initial_state=jnp.zeros((2, H, N + 1), jnp.complex64))
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, N\]"):
        s4d_step(u[:, 0], jnp.zeros((2, H)), L4, B4, C4, dt4)

    L5, B5, C5, dt5 = (jnp.zeros(P, jnp.complex64), jnp.zeros((P, H), jnp.complex64),
                       jnp.zeros((H, P), jnp.complex64), jnp.zeros(P))
    with pytest.raises(ValueError, match="impl must be one of"):
        s5(u, L5, B5, C5, dt5, impl="conv")
    with pytest.raises(ValueError, match=r"B must have shape \[P, H\]"):
        s5(u, L5, jnp.zeros((P + 1, H)), C5, dt5)
    with pytest.raises(ValueError, match=r"C must have shape \[H, P\]"):
        s5(u, L5, B5, C5.T, dt5)
    with pytest.raises(ValueError, match=r"log_dt must have shape \[P\]"):
        s5(u, L5, B5, C5, jnp.zeros(H))
    with pytest.raises(ValueError, match=r"Lambda must have rank 1"):
        s5(u, L4, B5, C5, dt5)
    with pytest.raises(ValueError, match=r"state must have shape \[B, P\]"):
        s5_step(u[:, 0], jnp.zeros((2, P + 1)), L5, B5, C5, dt5)
    with pytest.raises(ValueError, match="chunk_size"):
        s5(u, L5, B5, C5, dt5, impl="chunk", chunk_size=0)


def test_empty_sequence_returns_initial_state():
    H, N = 2, 3
    x0 = jnp.ones((1, H, N), jnp.complex64)
    y, x = s4d(jnp.zeros((1, 0, H)), *(jnp.zeros((H, N), jnp.complex64),) * 3, jnp.zeros(H),
               initial_state=x0)
    assert y.shape == (1, 0, H)
    np.testing.assert_array_equal(x, x0)
