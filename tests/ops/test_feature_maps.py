"""Tests for memjax.ops.feature_maps: output dims, the kernel identity each map satisfies (in
float64, x64 switched on only inside a test), positivity, finite gradients, jit, and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.ops import feature_maps as fm

F64_TOL = dict(rtol=1e-12, atol=1e-12)
SHAPE = (2, 3, 2)  # leading axes [B, T, H]; the feature axis K is appended


def _qk(K, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    q = scale * rng.standard_normal((*SHAPE, K))
    k = scale * rng.standard_normal((*SHAPE, K))
    return q, k


def _dot(a, b):
    return np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64), axis=-1)


# ---------------------------------------------------------------------------------------------
# Dimensions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, K, expected",
    [
        ("identity", {}, 5, 5),
        ("elu_plus_one", {}, 5, 5),
        ("relu", {}, 5, 5),
        ("taylor", {}, 16, 273),
        ("taylor_dedup", {}, 16, 153),  # Based's f=16 numbers
        ("taylor", {}, 1, 3),
        ("taylor_dedup", {}, 1, 3),
        ("polynomial", {"degree": 1}, 4, 5),
        ("polynomial", {"degree": 3}, 3, 1 + 3 + 9 + 27),
        ("polynomial", {"degree": 2}, 1, 3),
    ],
)
def test_output_dims(name, params, K, expected):
    assert fm.feature_dim(name, K, **params) == expected
    x = jnp.ones((*SHAPE, K), jnp.float32)
    map_params = {}
    if name == "polynomial":
        map_params["coeffs"] = fm.exp_taylor_coeffs(params["degree"])
    out = fm.feature_map(name, x, **map_params)
    assert out.shape == (*SHAPE, expected)
    assert out.dtype == jnp.float32


def test_polynomial_dim_from_coeffs():
    assert fm.feature_dim("polynomial", 4, coeffs=np.ones(3)) == 1 + 4 + 16
    assert fm.polynomial_dim(4, 2, coeffs=np.ones(3)) == 21


def test_dtype_preserved_low_precision():
    x = jnp.ones((3, 4), jnp.bfloat16)
    for name in ("identity", "elu_plus_one", "relu", "taylor", "taylor_dedup"):
        assert fm.feature_map(name, x).dtype == jnp.bfloat16, name
    c = jnp.ones(3, jnp.bfloat16)
    assert fm.polynomial(x, c).dtype == jnp.bfloat16
    # integer inputs are promoted to a float dtype
    assert jnp.issubdtype(fm.relu(jnp.arange(4)).dtype, jnp.floating)


# ---------------------------------------------------------------------------------------------
# Kernel identities (float64)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["taylor", "taylor_dedup"])
@pytest.mark.parametrize("K", [1, 3, 8])
def test_taylor_identity(x64, name, K):
    q, k = _qk(K, seed=K)
    pq, pk = fm.feature_map(name, jnp.asarray(q)), fm.feature_map(name, jnp.asarray(k))
    assert pq.dtype == jnp.float64
    s = _dot(q, k) / math.sqrt(K)
    np.testing.assert_allclose(_dot(pq, pk), 1 + s + s**2 / 2, **F64_TOL)


def test_taylor_explicit_form(x64):
    """The full map is [1, x / K^(1/4), vec(x x^T) / sqrt(2K)] (Based's layout)."""
    K = 3
    x = np.random.default_rng(1).standard_normal(K)
    expected = np.concatenate([[1.0], x / K**0.25, np.outer(x, x).ravel() / math.sqrt(2 * K)])
    np.testing.assert_allclose(fm.taylor(jnp.asarray(x)), expected, **F64_TOL)
    # de-duplicated: the same first 1 + K entries, then w_ij x_i x_j over i <= j
    rows, cols = np.triu_indices(K)
    w = np.where(rows == cols, 1 / math.sqrt(2 * K), 1 / math.sqrt(K))
    expected_dedup = np.concatenate([expected[: 1 + K], w * x[rows] * x[cols]])
    np.testing.assert_allclose(fm.taylor_dedup(jnp.asarray(x)), expected_dedup, **F64_TOL)


@pytest.mark.parametrize("K, degree", [(1, 3), (3, 1), (3, 2), (4, 3)])
def test_polynomial_identity(x64, K, degree):
    q, k = _qk(K, seed=10 * K + degree)
    c = np.random.default_rng(degree).uniform(0.0, 2.0, degree + 1)
    c[0] = 0.0  # a zero coefficient is allowed
    pq = fm.feature_map("polynomial", jnp.asarray(q), coeffs=jnp.asarray(c))
    pk = fm.feature_map("polynomial", jnp.asarray(k), coeffs=jnp.asarray(c), degree=degree)
    assert pq.shape[-1] == fm.polynomial_dim(K, degree)
    d = _dot(q, k)
    expected = sum(c[i] * d**i for i in range(degree + 1))
    np.testing.assert_allclose(_dot(pq, pk), expected, **F64_TOL)


def test_polynomial_matches_taylor_kernel_and_exp(x64):
    K = 4
    q, k = _qk(K, seed=3)
    # c = [1, 1/sqrt(K), 1/(2K)] gives Based's Taylor kernel
    c = jnp.asarray([1.0, K**-0.5, 1.0 / (2 * K)])
    np.testing.assert_allclose(
        _dot(fm.polynomial(q, c), fm.polynomial(k, c)),
        _dot(fm.taylor(q), fm.taylor(k)),
        **F64_TOL,
    )
    # c_i = 1/i! truncates exp(q.k); for small q.k degree 6 is within (q.k)^7 / 7!
    q, k = _qk(2, seed=4, scale=0.3)
    c = fm.exp_taylor_coeffs(6)
    approx = _dot(fm.polynomial(q, c), fm.polynomial(k, c))
    np.testing.assert_allclose(approx, np.exp(_dot(q, k)), rtol=1e-6)


def test_coefficient_parameterisation():
    raw = fm.init_coeff_param(4)
    np.testing.assert_allclose(fm.positive_coeffs(raw), fm.exp_taylor_coeffs(4), rtol=1e-6)
    assert np.all(np.asarray(fm.positive_coeffs(jnp.full(3, -50.0))) > 0)


def test_elementwise_maps(x64):
    x = jnp.asarray(_qk(5, seed=7, scale=3.0)[0])
    np.testing.assert_array_equal(fm.identity(x), x)
    np.testing.assert_array_equal(fm.relu(x), np.maximum(np.asarray(x), 0))
    np.testing.assert_allclose(
        fm.elu_plus_one(x), np.where(x > 0, x + 1, np.exp(np.asarray(x))), **F64_TOL
    )


def test_elu_plus_one_positive():
    # the literal expm1(x) + 1 is exactly 0 here in float32 (below -17) and bfloat16 (below -6)
    x = [-80.0, -30.0, -17.5, -7.0, -1.0, -1e-6, 0.0, 1e-6, 2.0, 50.0]
    for dtype in (jnp.float32, jnp.bfloat16):
        out = fm.elu_plus_one(jnp.asarray(x, dtype))
        assert np.all(np.asarray(out, np.float32) > 0), dtype
    q, k = _qk(6, seed=8, scale=4.0)
    assert np.all(_dot(fm.elu_plus_one(q), fm.elu_plus_one(k)) > 0)


# ---------------------------------------------------------------------------------------------
# Gradients and jit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", fm.FEATURE_MAPS)
def test_gradients_finite_and_jit(name):
    K = 3
    x = jnp.asarray(_qk(K, seed=5)[0], jnp.float32).at[0, 0, 0, 0].set(0.0)  # relu/elu kink
    params = {"coeffs": fm.positive_coeffs(fm.init_coeff_param(2))} if name == "polynomial" else {}

    def loss(x, params):
        return jnp.sum(jnp.tanh(fm.feature_map(name, x, **params)))

    gx, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, params)
    assert gx.shape == x.shape and np.all(np.isfinite(np.asarray(gx)))
    for g in jax.tree.leaves(gp):
        assert np.all(np.isfinite(np.asarray(g)))

    out_jit = jax.jit(lambda x, p: fm.feature_map(name, x, **p))(x, params)
    np.testing.assert_allclose(out_jit, fm.feature_map(name, x, **params), rtol=1e-6, atol=1e-6)
    assert out_jit.shape == (*SHAPE, fm.feature_dim(name, K, **params))


def test_polynomial_coeff_gradient_through_softplus():
    """d/d raw of the kernel value sum_i c_i (q.k)^i with c = softplus(raw) is finite and exact."""
    with jax.enable_x64(True):
        q, k = _qk(3, seed=6)
        q, k = q[0, 0, 0], k[0, 0, 0]
        raw = fm.init_coeff_param(3)

        def kernel(raw):
            c = fm.positive_coeffs(raw)
            return jnp.dot(fm.polynomial(q, c), fm.polynomial(k, c))

        g = jax.grad(kernel)(raw)
        d = float(np.dot(q, k))
        expected = jax.nn.sigmoid(raw) * d ** np.arange(4)
        np.testing.assert_allclose(g, expected, **F64_TOL)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown feature map 'softmax'.*taylor_dedup"):
        fm.feature_map("softmax", jnp.ones(3))
    with pytest.raises(ValueError, match="known: elu_plus_one, identity, polynomial"):
        fm.feature_dim("nope", 3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fm.feature_dim("taylor", 0), "K must be a positive int"),
        (lambda: fm.feature_dim("relu", 2.0), "K must be a positive int"),
        (lambda: fm.feature_dim("identity", True), "K must be a positive int"),
        (lambda: fm.feature_dim("polynomial", 3), "needs degree= or coeffs="),
        (lambda: fm.feature_dim("polynomial", 3, degree=0), "degree must be a positive int"),
        (lambda: fm.feature_dim("polynomial", 3, degree=1.5), "degree must be a positive int"),
        (lambda: fm.feature_dim("polynomial", 3, degree=2, coeffs=np.ones(4)), "does not match"),
        (lambda: fm.feature_dim("taylor", 3, degree=2), "no parameters; got unexpected degree"),
        (lambda: fm.feature_dim("polynomial", 3, degre=2), "takes coeffs, degree; got unexpected"),
        (lambda: fm.feature_map("polynomial", jnp.ones(3)), "needs coeffs="),
        (lambda: fm.feature_map("relu", jnp.ones(3), scale=2.0), "takes no parameters"),
        (lambda: fm.polynomial(jnp.ones(3), jnp.ones(1)), r"shape \[degree \+ 1\]"),
        (lambda: fm.polynomial(jnp.ones(3), jnp.ones((2, 3))), r"shape \[degree \+ 1\]"),
        (lambda: fm.polynomial(jnp.ones(3), jnp.ones(3), degree=3), "does not match"),
        (lambda: fm.polynomial(jnp.ones(3), jnp.asarray([1.0, -0.1])), "non-negative"),
        (lambda: fm.polynomial(jnp.ones(3), jnp.asarray([1.0, jnp.nan])), "non-negative"),
        (lambda: fm.exp_taylor_coeffs(0), "degree must be a positive int"),
        (lambda: fm.taylor(jnp.float32(1.0)), "scalar"),
    ],
)
def test_bad_params_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
