"""The operator contract (docs/design.md) as generic tests over operator specifications.

An ``OpSpec`` says how to call one operator, how to make its inputs, its float64 oracle (from
numpy_reference.py), its forms, its step function and its bad inputs. ``test_contract.py``
parametrises every test below over the specs in ``specs.py``, so an operator gets all of them by
adding one spec:

- every form matches the oracle at an odd T (not a multiple of the chunk) from an initial state,
  and at T = 1 from the default (zero) state; T = 0 returns an empty output and the initial
  state (zeros when None);
- every form's gradients w.r.t. every input equal the reference form's, in float64 and in
  float32; the reference gradient matches a finite difference of the oracle;
- step decoding equals the sequence form; running in two pieces with the state carried over
  equals running whole;
- float32 and bfloat16 inputs match the oracle (fed the same rounded inputs) within the spec's
  relative-RMS tolerances, with outputs in the input dtype and float32 (complex64) states;
- each bad input raises a ValueError with its message; an unknown impl lists the valid ones, and
  impl="pallas" without a registered kernel names the operator and the platform.

Float64 tests run inside the ``x64`` fixture. Shapes are tiny and lengths shared between tests:
on CPU the cost is the number of distinct compilations.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels

# Relative RMS error vs the float64 oracle fed the same rounded inputs (the operator's own
# error). bfloat16 outputs are dominated by rounding y itself to bfloat16 (2^-9 relative); states
# are float32 whatever the input dtype.
LOW_PRECISION_TOL = {"float32": dict(y=1e-5, state=1e-5), "bfloat16": dict(y=1e-2, state=1e-5)}


@dataclasses.dataclass(frozen=True)
class Bad:
    """One bad input: ``change(call)`` returns the broken call, whose ValueError matches
    ``message``."""

    id: str
    change: Callable[[dict], dict]
    message: str
    step: bool = False  # break a call of the step function instead of the sequence call


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How the contract tests call and check one operator.

    A *call* is a dict of the operator's arguments by name (``time_args`` carry a time axis at
    position 1) plus ``initial_state`` and ``impl``; ``run(call)`` returns ``(y, final_state)``
    (final_state None for a stateless op) and ``step(call_t, state)`` returns ``(y_t, state)``
    for a call whose time args hold one token (no time axis).
    """

    id: str
    op: str  # the operator's name in memjax.ops.dispatch
    forms: tuple[str, ...]
    run: Callable[[dict], tuple]
    make_inputs: Callable[[np.random.Generator, int], tuple[dict, np.ndarray | None]]
    oracle: Callable[[dict, np.ndarray | None], tuple]  # float64 NumPy: (y, state)
    time_args: tuple[str, ...]
    T: int  # odd, not a multiple of the chunk size ``run`` uses
    step: Callable[[dict, object], tuple] | None = None
    stateful: bool = True
    y_in_input_dtype: bool = True  # False: y in the accumulation dtype (linear_scan)
    bad_inputs: tuple[Bad, ...] = ()
    f64_tol: float = 1e-10
    f64_grad_tol: float = 1e-9
    f32_grad_tol: float = 1e-4  # relative RMS, each gradient vs the reference form's
    low_precision_tol: dict = dataclasses.field(default_factory=lambda: LOW_PRECISION_TOL)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def to_jax(x, dtype):
    """A NumPy array as a JAX array of the real dtype (complex arrays: its complex partner)."""
    if x is None:
        return None
    if np.iscomplexobj(x):
        return jnp.asarray(x, jnp.promote_types(dtype, jnp.complex64))
    return jnp.asarray(x, dtype)


def to_f64(x):
    """A JAX array as float64 / complex128 NumPy (after whatever rounding it went through)."""
    if x is None:
        return None
    x = np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def inputs(spec, seed, T, dtype=jnp.float64, state_dtype=None):
    """(args as JAX arrays of ``dtype``, initial state) for one test; the state is float32 for
    low-precision inputs (states are float32 whatever the input dtype)."""
    args, h0 = spec.make_inputs(np.random.default_rng(seed), T)
    state_dtype = state_dtype or (dtype if dtype == jnp.float64 else jnp.float32)
    return {n: to_jax(a, dtype) for n, a in args.items()}, to_jax(h0, state_dtype)


def call(spec, args, h0, impl="auto", **changes):
    return spec.run({**args, "initial_state": h0, "impl": impl, **changes})


def oracle(spec, args, h0):
    return spec.oracle({n: to_f64(a) for n, a in args.items()}, to_f64(h0))


def rel_rms(x, ref) -> float:
    """||x - ref|| / ||ref|| over all entries (complex-aware), in float64."""
    x, ref = to_f64(jnp.asarray(x)), np.asarray(ref)
    return float(np.sqrt(np.mean(np.abs(x - ref) ** 2) / np.mean(np.abs(ref) ** 2)))


def assert_close(got, want, tol, what):
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol, err_msg=what)


def assert_outputs(spec, result, expected, tol, what=""):
    (y, s), (y_ref, s_ref) = result, expected
    assert_close(y, y_ref, tol, f"{spec.id} y {what}")
    if spec.stateful:
        assert_close(s, s_ref, tol, f"{spec.id} state {what}")


def at(spec, args, t):
    """The call's time args at token t (or the slice t)."""
    return {n: (a[:, t] if n in spec.time_args and a is not None else a) for n, a in args.items()}


def random_like(rng, x):
    """Normal noise of x's shape, complex when x is."""
    w = rng.normal(size=x.shape)
    return w + 1j * rng.normal(size=x.shape) if np.iscomplexobj(x) else w


def _cotangents(spec, y, s, seed=1):
    rng = np.random.default_rng(seed)
    return random_like(rng, y), (random_like(rng, s) if spec.stateful else None)


_GRAD_FNS: dict = {}


def _grad_fn(spec, impl, fixed):
    """jit(grad) of sum(y wy) + Re sum(state ws) w.r.t. the differentiable inputs, one per
    (spec, impl, fixed arguments), so that tests with the same shapes share its compilation."""
    key = (spec.id, impl, tuple(sorted(fixed.items())))
    if key not in _GRAD_FNS:

        def loss(diff, wy, ws):
            y, s = call(spec, {**fixed, **diff}, diff.get("initial_state"), impl)
            out = jnp.sum(y * wy.astype(y.dtype))
            return out if ws is None else out + jnp.sum(jnp.real(s * ws.astype(s.dtype)))

        _GRAD_FNS[key] = jax.jit(jax.grad(loss))
    return _GRAD_FNS[key]


def gradients(spec, impl, args, h0, wy, ws, **options):
    """Gradients of the loss above w.r.t. every input present (and the initial state), by name."""
    diff = {n: a for n, a in args.items() if a is not None}
    absent = {n: None for n, a in args.items() if a is None}
    if h0 is not None:
        diff["initial_state"] = h0
    return _grad_fn(spec, impl, {**absent, **options})(diff, wy, ws)


def assert_gradients_match_reference(spec, form, args, h0, tol, **options):
    """Every gradient of ``form`` is finite and within ``tol`` (absolute and relative) of the
    reference form's, for random cotangents on y and the final state."""
    wy, ws = _cotangents(spec, *oracle(spec, args, h0))
    got = gradients(spec, form, args, h0, wy, ws, **options)
    want = gradients(spec, "reference", args, h0, wy, ws, **options)
    for name in want:
        assert np.isfinite(np.asarray(got[name])).all(), f"non-finite d{name} ({form})"
        assert_close(got[name], np.asarray(want[name]), tol, f"{spec.id} d{name} ({form})")


# ---------------------------------------------------------------------------------------------
# Generic tests (parametrised by test_contract.py over ``spec`` and, where named, ``form``)
# ---------------------------------------------------------------------------------------------


def test_forms_match_oracle_odd_T_with_initial_state_f64(x64, spec, form):
    args, h0 = inputs(spec, 0, spec.T)
    y, s = call(spec, args, h0, form)
    assert y.dtype == jnp.float64
    assert_outputs(spec, (y, s), oracle(spec, args, h0), spec.f64_tol, form)


def test_forms_match_oracle_one_token_zero_state_f64(x64, spec, form):
    args, _ = inputs(spec, 1, 1)
    assert_outputs(spec, call(spec, args, None, form), oracle(spec, args, None), spec.f64_tol, form)


def test_empty_sequence_returns_initial_state(spec, form):
    args, h0 = inputs(spec, 2, 0, jnp.float32)
    y_ref, _ = oracle(spec, args, h0)
    for state in (h0, None) if spec.stateful else (None,):
        y, s = call(spec, args, state, form)
        assert y.shape == y_ref.shape and y.dtype == jnp.float32
        if spec.stateful:
            expected = np.zeros(h0.shape) if state is None else np.asarray(h0)
            assert s.shape == h0.shape and s.dtype == h0.dtype
            np.testing.assert_array_equal(np.asarray(s), expected)


def test_gradients_match_reference_f64(x64, spec, form):
    args, h0 = inputs(spec, 3, spec.T)
    assert_gradients_match_reference(spec, form, args, h0, spec.f64_grad_tol)


@pytest.mark.extended  # the float64 comparison above runs in `make test`
def test_gradients_match_reference_f32(spec, form):
    args, h0 = inputs(spec, 3, spec.T, jnp.float32)
    wy, ws = _cotangents(spec, *oracle(spec, args, h0))
    got = gradients(spec, form, args, h0, wy, ws)
    want = gradients(spec, "reference", args, h0, wy, ws)
    for name in want:
        err = rel_rms(got[name], want[name])
        assert err < spec.f32_grad_tol, f"{spec.id} d{name} ({form}): rel-RMS {err:.2e}"


def test_reference_gradient_matches_oracle_finite_difference_f64(x64, spec):
    """Anchors autodiff of the reference form to the oracle: a directional derivative."""
    T = 5
    args, h0 = inputs(spec, 4, T)
    wy, ws = _cotangents(spec, *oracle(spec, args, h0))
    grads = gradients(spec, "reference", args, h0, wy, ws)
    point = {n: to_f64(a) for n, a in {**args, "initial_state": h0}.items() if n in grads}
    rng = np.random.default_rng(5)
    direction = {n: random_like(rng, a) for n, a in point.items()}

    def oracle_loss(sign, eps=1e-6):
        moved = {n: a + sign * eps * direction[n] for n, a in point.items()}
        h = moved.pop("initial_state", None)
        y, s = spec.oracle({**{n: to_f64(a) for n, a in args.items()}, **moved}, h)
        return np.sum(y * wy) + (0.0 if ws is None else np.sum(np.real(s * ws)))

    fd = (oracle_loss(1) - oracle_loss(-1)) / 2e-6
    ad = sum(np.sum(np.real(np.asarray(grads[n]) * direction[n])) for n in point)
    np.testing.assert_allclose(ad, fd, rtol=1e-6)


def test_step_decoding_equals_sequence_f64(x64, spec):
    if spec.step is None:
        pytest.skip(f"{spec.id} has no step function")
    T = 5
    args, h0 = inputs(spec, 6, T)
    y_seq, s_seq = call(spec, args, h0)
    step = jax.jit(spec.step)
    state, ys = h0, []
    for t in range(T):
        y_t, state = step(at(spec, args, t), state)
        ys.append(y_t)
    assert_outputs(spec, (jnp.stack(ys, axis=1), state), (y_seq, s_seq), spec.f64_tol, "step")


def test_split_and_resume_equals_whole_f64(x64, spec, form):
    if not spec.stateful:
        pytest.skip(f"{spec.id} carries no state")
    args, h0 = inputs(spec, 7, spec.T)
    y, s = call(spec, args, h0, form)
    cut = spec.T // 2 + 1  # mid-chunk for every spec's chunk size
    y1, s1 = call(spec, at(spec, args, slice(0, cut)), h0, form)
    y2, s2 = call(spec, at(spec, args, slice(cut, None)), s1, form)
    assert_outputs(spec, (jnp.concatenate([y1, y2], axis=1), s2), (y, s), spec.f64_tol, "split")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision_inputs_match_oracle(spec, form, dtype):
    args, h0 = inputs(spec, 8, spec.T, jnp.dtype(dtype))
    y, s = call(spec, args, h0, form)
    y_ref, s_ref = oracle(spec, args, h0)
    assert y.dtype == (jnp.dtype(dtype) if spec.y_in_input_dtype else jnp.float32)
    tol = spec.low_precision_tol[dtype]
    assert rel_rms(y, y_ref) < tol["y"], f"y rel-RMS ({form}, {dtype})"
    if spec.stateful:
        assert s.dtype in (jnp.float32, jnp.complex64)
        err = rel_rms(s, s_ref)
        assert err < tol["state"], f"state rel-RMS {err:.2e} ({form}, {dtype})"
    if spec.step is not None and form == "reference":  # the step's dtypes, once per spec
        y_t, s_t = spec.step(at(spec, args, 0), h0)
        assert y_t.dtype == y.dtype and s_t.dtype == s.dtype


def test_bad_input_raises(spec, bad):
    args, h0 = inputs(spec, 9, 5, jnp.float32)
    good = {**args, "initial_state": h0, "impl": "auto"}
    with pytest.raises(ValueError, match=bad.message):
        if bad.step:
            state = bad.change({**at(spec, args, 0), "state": h0})
            spec.step({n: a for n, a in state.items() if n != "state"}, state["state"])
        else:
            spec.run(bad.change(good))


def test_unknown_impl_lists_the_valid_ones(spec):
    args, h0 = inputs(spec, 9, 5, jnp.float32)
    valid = "|".join(f"'{f}'" for f in spec.forms)
    with pytest.raises(ValueError, match=rf"impl must be one of .*({valid}).*'pallas'.*got 'fast'"):
        call(spec, args, h0, "fast")


def test_pallas_runs_a_registered_kernel_or_names_what_is_missing(spec):
    """impl="pallas" without a kernel for the platform: the error names the operator and the
    platform. With one (tests/kernels check each against the oracle at shapes it can tile), the
    contract's tiny shapes (K = 4, chunk 4) are refused by a TilingError naming the constraint,
    or a feature the kernel lacks by name: never a wrong answer or an obscure failure."""
    args, h0 = inputs(spec, 9, 5, jnp.float32)
    if kernels.lookup(spec.op, "cpu") is None:
        expected = rf"no kernel is registered for '{spec.op}' on platform 'cpu'"
    else:
        expected = r"must be a multiple of \d+ \(|is not supported"
    with pytest.raises(ValueError, match=expected):
        call(spec, args, h0, "pallas")
