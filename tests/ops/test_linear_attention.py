"""Tests for memjax.ops.linear_attention: forms agree with an independent float64 NumPy oracle.

Tight checks run in float64 (x64 is switched on only inside each test, never globally, since
tests share worker processes). float32 / bfloat16 inputs are checked against the same oracle
with stated relative-RMS tolerances. Shapes are tiny and cases few: on CPU the cost is the
number of distinct compilations, not the arithmetic.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import linear_attention_np, rel_rms

from memjax.ops import linear_attention, linear_attention_step
from memjax.ops.linear_attention import NORMALIZER_EPS

B, H, K, V = 2, 2, 4, 8

# Tolerances (float64 runs compare forms that differ only in summation order).
F64_TOL = dict(rtol=1e-10, atol=1e-10)
F64_GRAD_TOL = dict(rtol=1e-9, atol=1e-9)
# Relative RMS error vs the float64 oracle, for low-precision inputs. The oracle sees the inputs
# after their own rounding, so these measure the operator's error only. bfloat16 outputs are
# dominated by rounding o itself to bfloat16 (2^-9 relative); the state is float32 throughout.
LOW_PRECISION_TOL = {
    "float32": dict(o=1e-5, state=1e-5),
    "bfloat16": dict(o=2e-2, state=1e-5),
}


def make_gate(rng, T, kind):
    """Log-space decays (g <= 0) of the named strength, or None.

    Per head ``[B, T, H]`` for the plain kinds; per key channel ``[B, T, H, K]`` for the ``chan-``
    kinds (the same strengths, drawn independently per channel).
    """
    if kind == "none":
        return None
    if kind.startswith("chan-"):
        base = kind[len("chan-"):]
        return np.stack([make_gate(rng, T, base) for _ in range(K)], axis=-1)
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


def make_inputs(seed, T, gate="mixed", init=True, normalize=False):
    """float64 NumPy inputs: q, k [B,T,H,K]; v [B,T,H,V]; g or None; h0 or None.

    With ``normalize`` q and k are positive (as after a positive feature map, so that the
    normalizer q . z stays away from zero) and h0 is ``[B, H, K, V + 1]`` with a positive z column.
    """
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, H, K))
    k = rng.normal(size=(B, T, H, K))
    v = rng.normal(size=(B, T, H, V))
    g = make_gate(rng, T, gate)
    h0 = rng.normal(size=(B, H, K, V)) if init else None
    if normalize:
        q, k = np.abs(q) + 0.1, np.abs(k) + 0.1
        if init:
            h0 = np.concatenate([h0, rng.uniform(0.5, 2.0, (B, H, K, 1))], axis=-1)
    return q, k, v, g, h0


def to_jax(xs, dtype):
    return [None if x is None else jnp.asarray(x, dtype) for x in xs]


def to_f64(x):
    return None if x is None else np.asarray(jnp.asarray(x, jnp.float32), np.float64)


# ---------------------------------------------------------------------------------------------
# Forward, float64
# ---------------------------------------------------------------------------------------------

FORWARD_CASES = [
    # (T, chunk_size, gate, initial_state, scale, normalize)
    pytest.param(1, 16, "none", False, None, False, id="T1-none"),
    pytest.param(7, 16, "weak", True, None, False, id="T7-weak-h0-chunk>T"),
    # Strong decay with C=32: masked exponents reach ~1000, where exp overflows even in float64.
    pytest.param(37, 32, "strong", False, None, False, id="T37-C32-strong"),
    pytest.param(37, 16, "mixed", True, 0.3, False, id="T37-C16-mixed-h0-scale"),
    pytest.param(64, 16, "zero", True, None, False, id="T64-C16-zero-h0"),
    pytest.param(70, 64, "mixed", False, None, False, id="T70-C64-mixed"),
    pytest.param(70, 32, "none", True, None, False, id="T70-C32-none-h0"),
    # C=4: several steps of the outer scan over blocks of chunks (up to 8 chunks per step).
    pytest.param(70, 4, "mixed", True, None, False, id="T70-C4-mixed-h0-blocks"),
    # Per-key-channel decay. C=64 with g ~ -30: chunk-local cumsums reach -2000.
    pytest.param(70, 64, "chan-strong", True, None, False, id="T70-C64-chan-strong-h0"),
    pytest.param(37, 16, "chan-mixed", True, 0.3, False, id="T37-C16-chan-mixed-h0-scale"),
    pytest.param(29, 24, "chan-mixed", False, None, False, id="T29-C24-chan-mixed-sub12"),
    pytest.param(37, 37, "chan-weak", True, None, False, id="T37-C37-chan-weak-sub1"),
    pytest.param(70, 4, "chan-mixed", True, None, False, id="T70-C4-chan-mixed-blocks"),
    # Normalizer (z carried as the last state column).
    pytest.param(70, 32, "none", True, None, True, id="T70-C32-none-norm-h0"),
    pytest.param(37, 16, "mixed", False, 0.3, True, id="T37-C16-mixed-norm-scale"),
    pytest.param(70, 4, "strong", True, None, True, id="T70-C4-strong-norm-h0-blocks"),
    pytest.param(37, 16, "chan-mixed", True, None, True, id="T37-C16-chan-mixed-norm-h0"),
]


@pytest.mark.parametrize("T, chunk_size, gate, init, scale, normalize", FORWARD_CASES)
def test_forward_matches_numpy_f64(x64, T, chunk_size, gate, init, scale, normalize):
    q, k, v, g, h0 = make_inputs(0, T, gate, init, normalize)
    o_ref, s_ref = linear_attention_np(
        q, k, v, g, scale=scale, initial_state=h0, normalize=normalize
    )
    jq, jk, jv, jg, jh0 = to_jax((q, k, v, g, h0), jnp.float64)
    for impl in ("reference", "chunk", "auto"):
        o, s = linear_attention(
            jq, jk, jv, jg, scale=scale, initial_state=jh0, normalize=normalize, impl=impl,
            chunk_size=chunk_size,
        )  # fmt: skip
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64
        assert s.shape == (B, H, K, V + normalize)
        np.testing.assert_allclose(o, o_ref, **F64_TOL, err_msg=f"o, impl={impl}")
        np.testing.assert_allclose(s, s_ref, **F64_TOL, err_msg=f"state, impl={impl}")


def test_normalizer_epsilon_f64(x64):
    """The epsilon is added to scale * q . z: checked where q . z is of its order (q ~ 1e-6) and
    at q = 0, where the output is 0 / eps = 0 rather than NaN."""
    assert NORMALIZER_EPS == 1e-6
    q, k, v, g, h0 = make_inputs(9, 5, "mixed", True, normalize=True)
    q[:, 1] *= 1e-6
    q[:, 2] = 0.0
    o_ref, _ = linear_attention_np(q, k, v, g, initial_state=h0, normalize=True, eps=1e-6)
    for impl in ("reference", "chunk"):
        o, _ = linear_attention(
            *to_jax((q, k, v, g), jnp.float64), initial_state=jnp.asarray(h0), normalize=True,
            impl=impl, chunk_size=4,
        )  # fmt: skip
        np.testing.assert_allclose(o, o_ref, **F64_TOL, err_msg=impl)
        np.testing.assert_array_equal(o[:, 2], 0.0)


# ---------------------------------------------------------------------------------------------
# Gradients, float64
# ---------------------------------------------------------------------------------------------


def _loss(impl, chunk_size, do, ds, normalize=False):
    """sum(o * do) + sum(S_T * dS): a random cotangent on both outputs."""

    def loss(q, k, v, g, h0, scale=None):
        o, s = linear_attention(
            q, k, v, g, scale=scale, initial_state=h0, normalize=normalize, impl=impl,
            chunk_size=chunk_size,
        )  # fmt: skip
        return jnp.sum(o * do) + jnp.sum(s * ds)

    return loss


GRADIENT_CASES = [
    # (gate, normalize, chunk_size); T = 37 throughout.
    # C=32 with g ~ -30: a mask applied after exp would overflow (exponents ~1000) and NaN.
    pytest.param("none", False, 32, id="none"),
    pytest.param("zero", False, 32, id="zero"),
    pytest.param("mixed", False, 32, id="mixed"),
    pytest.param("strong", False, 32, id="strong"),
    pytest.param("mixed", False, 4, id="mixed-C4-blocks"),
    # Per key channel: dg is [B, T, H, K].
    pytest.param("chan-mixed", False, 16, id="chan-mixed"),
    pytest.param("chan-strong", False, 32, id="chan-strong"),
    pytest.param("chan-weak", False, 4, id="chan-weak-C4-blocks"),
    # Normalizer.
    pytest.param("none", True, 16, id="none-norm"),
    pytest.param("mixed", True, 4, id="mixed-norm-C4-blocks"),
    pytest.param("chan-mixed", True, 16, id="chan-mixed-norm"),
]


@pytest.mark.parametrize("gate, normalize, chunk_size", GRADIENT_CASES)
def test_gradients_chunk_match_reference_f64(x64, gate, normalize, chunk_size):
    """Gradients of the chunk form (hand-written backward for g None / per head, autodiff for
    per channel) equal autodiff of the reference form, for q, k, v, g, initial_state, scale."""
    T = 37
    q, k, v, g, h0 = make_inputs(1, T, gate, init=True, normalize=normalize)
    rng = np.random.default_rng(2)
    do = jnp.asarray(rng.normal(size=(B, T, H, V)))
    ds = jnp.asarray(rng.normal(size=h0.shape))
    args = [*to_jax((q, k, v, g, h0), jnp.float64), jnp.asarray(0.3)]
    argnums = (0, 1, 2, 4, 5) if g is None else (0, 1, 2, 3, 4, 5)
    names = ["q", "k", "v", "g", "initial_state", "scale"]

    grads = {
        impl: jax.jit(jax.grad(_loss(impl, chunk_size, do, ds, normalize), argnums=argnums))(
            *args
        )
        for impl in ("reference", "chunk")
    }
    for i, d_ref, d_chunk in zip(argnums, grads["reference"], grads["chunk"]):
        assert d_chunk.shape == d_ref.shape == np.shape(args[i])
        assert np.isfinite(d_chunk).all(), f"non-finite d{names[i]} (chunk)"
        assert np.isfinite(d_ref).all(), f"non-finite d{names[i]} (reference)"
        np.testing.assert_allclose(d_chunk, d_ref, **F64_GRAD_TOL, err_msg=f"d{names[i]}")


@pytest.mark.parametrize("gate", ["strong", "chan-strong"])
def test_strong_decay_finite_float32(gate):
    """float32, C=64, g ~ -30 per token (chunk-local cumsums near -2000): forward values and all
    gradients stay finite and the output still matches the float64 oracle."""
    T, chunk_size = 70, 64
    q, k, v, g, h0 = to_jax(make_inputs(10, T, gate, init=True), jnp.float32)
    o, s = linear_attention(q, k, v, g, initial_state=h0, impl="chunk", chunk_size=chunk_size)
    assert np.isfinite(o).all() and np.isfinite(s).all()
    o_ref, _ = linear_attention_np(*map(to_f64, (q, k, v, g)), initial_state=to_f64(h0))
    assert rel_rms(o, o_ref) < 1e-5

    do = jnp.ones((B, T, H, V))
    grads = jax.grad(_loss("chunk", chunk_size, do, jnp.ones_like(h0)), argnums=(0, 1, 2, 3, 4))(
        q, k, v, g, h0
    )
    for name, d in zip("q k v g initial_state".split(), grads):
        assert np.isfinite(d).all(), f"non-finite d{name}"


def test_reference_gradient_matches_numpy_finite_difference_f64(x64):
    """Anchor autodiff of the reference form to the NumPy oracle (directional derivative)."""
    T = 9
    q, k, v, g, h0 = make_inputs(3, T, "mixed", init=True)
    rng = np.random.default_rng(4)
    do = rng.normal(size=(B, T, H, V))
    ds = rng.normal(size=(B, H, K, V))
    x = (q, k, v, g, h0)
    direction = [rng.normal(size=a.shape) for a in x]

    def loss_np(xs):
        o, s = linear_attention_np(xs[0], xs[1], xs[2], xs[3], initial_state=xs[4])
        return np.sum(o * do) + np.sum(s * ds)

    eps = 1e-6
    plus = [a + eps * d for a, d in zip(x, direction)]
    minus = [a - eps * d for a, d in zip(x, direction)]
    fd = (loss_np(plus) - loss_np(minus)) / (2 * eps)

    loss = _loss("reference", 16, jnp.asarray(do), jnp.asarray(ds))
    grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*to_jax(x, jnp.float64))
    ad = sum(np.sum(np.asarray(gr) * d) for gr, d in zip(grads, direction))
    np.testing.assert_allclose(ad, fd, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# State passing: split-and-resume, and the one-token step
# ---------------------------------------------------------------------------------------------


SPLIT_CASES = [
    # (impl, gate, normalize)
    pytest.param("reference", "mixed", False, id="reference-mixed"),
    pytest.param("chunk", "mixed", False, id="chunk-mixed"),
    pytest.param("reference", "chan-mixed", True, id="reference-chan-mixed-norm"),
    pytest.param("chunk", "chan-mixed", True, id="chunk-chan-mixed-norm"),
    pytest.param("chunk", "none", True, id="chunk-none-norm"),
]


@pytest.mark.parametrize("impl, gate, normalize", SPLIT_CASES)
def test_split_and_resume_equals_whole_f64(x64, impl, gate, normalize):
    """The returned state (with the normalizer: its z column too) resumes the sequence exactly."""
    T, chunk_size = 37, 16
    q, k, v, g, h0 = to_jax(make_inputs(5, T, gate, True, normalize), jnp.float64)
    run = functools.partial(linear_attention, normalize=normalize, impl=impl, chunk_size=chunk_size)
    o_whole, s_whole = run(q, k, v, g, initial_state=h0)
    # Split points: after the first token, on a chunk boundary, mid-chunk, before the last token
    # (pairs with the same two piece lengths, so that each case compiles few shapes).
    for split in (1, 16, 21, 36):
        first, second = slice(0, split), slice(split, T)
        part = lambda x, sl: None if x is None else x[:, sl]  # noqa: E731
        o1, s1 = run(q[:, first], k[:, first], v[:, first], part(g, first), initial_state=h0)
        o2, s2 = run(q[:, second], k[:, second], v[:, second], part(g, second), initial_state=s1)
        o = jnp.concatenate([o1, o2], axis=1)
        np.testing.assert_allclose(o, o_whole, **F64_TOL, err_msg=f"o, split={split}")
        np.testing.assert_allclose(s2, s_whole, **F64_TOL, err_msg=f"state, split={split}")


STEP_CASES = [
    # (gate, normalize)
    pytest.param("none", False, id="none"),
    pytest.param("mixed", False, id="mixed"),
    pytest.param("chan-mixed", False, id="chan-mixed"),
    pytest.param("none", True, id="none-norm"),
    pytest.param("chan-strong", True, id="chan-strong-norm"),
]


@pytest.mark.parametrize("gate, normalize", STEP_CASES)
def test_step_loop_equals_parallel_f64(x64, gate, normalize):
    T = 7
    q, k, v, g, h0 = to_jax(make_inputs(6, T, gate, True, normalize), jnp.float64)
    o_par, s_par = linear_attention(
        q, k, v, g, initial_state=h0, normalize=normalize, impl="chunk", chunk_size=4
    )

    step = jax.jit(functools.partial(linear_attention_step, normalize=normalize))
    state, outs = h0, []
    for t in range(T):
        o_t, state = step(q[:, t], k[:, t], v[:, t], state, None if g is None else g[:, t])
        outs.append(o_t)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), o_par, **F64_TOL)
    np.testing.assert_allclose(state, s_par, **F64_TOL)


def test_step_dtypes():
    q, k, v, g, h0 = make_inputs(7, 1, "mixed", init=True)
    jq, jk, jv = to_jax((q[:, 0], k[:, 0], v[:, 0]), jnp.bfloat16)
    o, s = linear_attention_step(jq, jk, jv, jnp.asarray(h0, jnp.float32), jnp.asarray(g[:, 0]))
    assert o.dtype == jnp.bfloat16 and o.shape == (B, H, V)
    assert s.dtype == jnp.float32 and s.shape == (B, H, K, V)
    h0_norm = jnp.zeros((B, H, K, V + 1), jnp.float32)
    o, s = linear_attention_step(jq, jk, jv, h0_norm, normalize=True)
    assert o.dtype == jnp.bfloat16 and o.shape == (B, H, V)
    assert s.dtype == jnp.float32 and s.shape == (B, H, K, V + 1)


# ---------------------------------------------------------------------------------------------
# Low-precision inputs
# ---------------------------------------------------------------------------------------------

LOW_PRECISION_CASES = [
    # (impl, dtype, gate, normalize)
    *(
        pytest.param(impl, dtype, "mixed", False, id=f"{impl}-{dtype}-mixed")
        for impl in ("chunk", "reference")
        for dtype in ("float32", "bfloat16")
    ),
    pytest.param("chunk", "float32", "chan-mixed", False, id="chunk-float32-chan-mixed"),
    pytest.param("chunk", "bfloat16", "chan-mixed", True, id="chunk-bfloat16-chan-mixed-norm"),
    pytest.param("chunk", "float32", "mixed", True, id="chunk-float32-mixed-norm"),
]


@pytest.mark.parametrize("impl, dtype, gate, normalize", LOW_PRECISION_CASES)
def test_low_precision_vs_numpy(impl, dtype, gate, normalize):
    T, chunk_size = 70, 32
    q, k, v, g, h0 = to_jax(make_inputs(8, T, gate, True, normalize), jnp.dtype(dtype))
    h0 = h0.astype(jnp.float32)  # states are float32 whatever the input dtype
    o, s = linear_attention(
        q, k, v, g, initial_state=h0, normalize=normalize, impl=impl, chunk_size=chunk_size
    )
    assert o.dtype == v.dtype
    assert s.dtype == jnp.float32

    o_ref, s_ref = linear_attention_np(
        *map(to_f64, (q, k, v, g)), initial_state=to_f64(h0), normalize=normalize
    )
    tol = LOW_PRECISION_TOL[dtype]
    assert rel_rms(o, o_ref) < tol["o"], f"o rel-RMS {rel_rms(o, o_ref):.2e}"
    assert rel_rms(s, s_ref) < tol["state"], f"state rel-RMS {rel_rms(s, s_ref):.2e}"


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _bad_call(change):
    """Build a call to linear_attention with one argument broken by `change`."""
    T = 5
    z = jnp.zeros
    kwargs = dict(
        q=z((B, T, H, K)), k=z((B, T, H, K)), v=z((B, T, H, V)), g=z((B, T, H)),
        initial_state=z((B, H, K, V)), impl="auto", chunk_size=4,
    )  # fmt: skip
    kwargs.update(change)
    return lambda: linear_attention(**kwargs)


BAD_INPUTS = [
    pytest.param({"q": jnp.zeros((B, 5, H))}, r"q must have rank 4", id="q-rank"),
    pytest.param({"v": jnp.zeros((5, H, V))}, r"v must have rank 4", id="v-rank"),
    pytest.param({"k": jnp.zeros((B, 6, H, K))}, r"k must have shape .*got \(2, 6", id="k-T"),
    pytest.param({"k": jnp.zeros((B, 5, H, K + 1))}, r"k must have shape", id="k-K"),
    pytest.param({"v": jnp.zeros((B, 6, H, V))}, r"v must have shape .*got \(2, 6", id="v-T"),
    pytest.param(
        {"g": jnp.zeros((B, 5, H, K + 1))},
        r"g must have shape \[B, T, H\] = \(2, 5, 2\) \(per head\) or \[B, T, H, K\] = "
        r"\(2, 5, 2, 4\) \(per key channel\), got \(2, 5, 2, 5\)",
        id="g-shape",
    ),
    pytest.param({"g": jnp.zeros((B, 5))}, r"g must have shape", id="g-rank"),
    pytest.param({"g": jnp.zeros((B, 4, H))}, r"g must have shape", id="g-T"),
    pytest.param(
        {"initial_state": jnp.zeros((B, H, V, K))},
        r"initial_state must have shape \[B, H, K, V\] = \(2, 2, 4, 8\), got \(2, 2, 8, 4\)",
        id="state-shape",
    ),
    pytest.param(
        {"normalize": True},
        r"initial_state must have shape \[B, H, K, V \+ 1\].*= \(2, 2, 4, 9\), got \(2, 2, 4, 8\)",
        id="state-shape-normalize",
    ),
    pytest.param(
        {"initial_state": jnp.zeros((B, H, K, V + 1))},
        r"initial_state must have shape \[B, H, K, V\] = \(2, 2, 4, 8\), got \(2, 2, 4, 9\)",
        id="state-shape-with-z-but-no-normalize",
    ),
    pytest.param({"chunk_size": 0}, r"chunk_size must be a positive int", id="chunk-0"),
    pytest.param({"chunk_size": -16}, r"chunk_size must be a positive int", id="chunk-neg"),
    pytest.param({"chunk_size": 16.0}, r"chunk_size must be a positive int", id="chunk-float"),
    pytest.param({"impl": "pallas"}, r"no kernel is registered for 'linear_attention' on platform", id="impl"),
]


@pytest.mark.parametrize("change, message", BAD_INPUTS)
def test_bad_inputs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        _bad_call(change)()


def test_step_bad_inputs_raise():
    q, k, v = jnp.zeros((B, H, K)), jnp.zeros((B, H, K)), jnp.zeros((B, H, V))
    state = jnp.zeros((B, H, K, V))
    with pytest.raises(ValueError, match=r"q must have rank 3"):
        linear_attention_step(q[None], k, v, state)
    with pytest.raises(ValueError, match=r"state must have shape"):
        linear_attention_step(q, k, v, state[..., :-1])
    with pytest.raises(ValueError, match=r"g must have shape \[B, H\].*or \[B, H, K\]"):
        linear_attention_step(q, k, v, state, jnp.zeros((B, 1, H)))
    with pytest.raises(ValueError, match=r"state must have shape \[B, H, K, V \+ 1\]"):
        linear_attention_step(q, k, v, state, normalize=True)
