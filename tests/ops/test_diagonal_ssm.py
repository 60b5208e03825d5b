"""What is specific to S4D and S5 beyond the operator contract (test_contract.py): the bilinear
discretisation, S5 without conjugate symmetry, and S4D's convolution without an initial state or
a skip, each form and the step against the complex128 oracle of numpy_reference.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import s4d_np, s5_np
from specs import crandn, stable_eigs

from memjax.ops import s4d, s4d_step, s5, s5_step

F64_TOL = dict(rtol=1e-10, atol=1e-10)




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


@pytest.mark.parametrize("method", ["bilinear"])  # zoh: test_contract.py
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


@pytest.mark.parametrize("method, conj_sym", [("bilinear", False)])  # zoh: test_contract.py
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
