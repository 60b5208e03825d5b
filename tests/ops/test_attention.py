"""Tests for memjax.ops.attention.softmax_attention against an independent float64 NumPy oracle.

The oracle (numpy_reference.softmax_attention_np) is written from the equation with loops over t:

    o_t = sum_{s in W(t)} softmax_s(scale * q_t . k_s) v_s,
    W(t) = {s : s <= t}                   (full causal attention, window=None)
    W(t) = {s : t - window < s <= t}       (sliding window: the current token and window-1 before)

Tight checks run in float64 with x64 switched on only inside each test (never globally, since
tests share worker processes). Low-precision inputs, T = 0 / 1 and the
generic bad inputs are test_contract.py's. Shapes are tiny: the cost on CPU is compilations.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy_reference import softmax_attention_np

from memjax.ops.attention import softmax_attention

B, H, K, V = 2, 2, 4, 3

F64_TOL = dict(rtol=1e-12, atol=1e-12)
# Central finite difference with step 1e-6 in float64: truncation ~eps^2, round-off ~1e-16/eps,
# so ~1e-10 relative error in the directional derivative; 1e-7 leaves a wide margin.
FD_EPS = 1e-6
FD_RTOL = 1e-7


def make_inputs(seed, T):
    rng = np.random.default_rng(seed)
    # Scale logits up a little (norm ~2) so the softmax is far from uniform.
    q = 1.5 * rng.normal(size=(B, T, H, K))
    k = 1.5 * rng.normal(size=(B, T, H, K))
    v = rng.normal(size=(B, T, H, V))
    return q, k, v


def test_oracle_window_ge_T_is_full():
    """Sanity of the oracle itself: a window at least T long is full causal attention."""
    q, k, v = make_inputs(0, 5)
    np.testing.assert_allclose(softmax_attention_np(q, k, v, window=5), softmax_attention_np(q, k, v))
    # And window=1 returns v.
    np.testing.assert_allclose(softmax_attention_np(q, k, v, window=1), v, rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "T, window, scale",
    [
        (7, None, None),
        (13, None, None),
        (7, 1, None),
        (13, 3, None),
        (7, 3, None),
        (7, 20, None),  # window larger than T
        (13, None, 0.37),  # custom scale
        (13, 5, 1.9),
    ],
)
def test_matches_numpy_float64(x64, T, window, scale):
    q, k, v = make_inputs(T + (window or 0), T)
    o = softmax_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window, scale=scale)
    assert o.dtype == jnp.float64, "float64 inputs must give a float64 output"
    np.testing.assert_allclose(np.asarray(o), softmax_attention_np(q, k, v, window, scale), **F64_TOL)


@pytest.mark.parametrize("T, window", [(7, None), (13, 3)])
def test_gradients_float64_vs_finite_difference(x64, T, window):
    """d/d(eps) <c, o(x + eps d)> from JAX autodiff vs a central difference of the oracle."""
    rng = np.random.default_rng(100 + T)
    q, k, v = make_inputs(T, T)
    cot = rng.normal(size=(B, T, H, V))
    dq, dk, dv = (rng.normal(size=x.shape) for x in (q, k, v))
    scale = 0.8

    def loss_jax(q, k, v):
        return jnp.sum(softmax_attention(q, k, v, window=window, scale=scale) * cot)

    def loss_np(q, k, v):
        return np.sum(softmax_attention_np(q, k, v, window, scale) * cot)

    gq, gk, gv = jax.grad(loss_jax, argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    analytic = np.sum(np.asarray(gq) * dq) + np.sum(np.asarray(gk) * dk) + np.sum(np.asarray(gv) * dv)
    plus = loss_np(q + FD_EPS * dq, k + FD_EPS * dk, v + FD_EPS * dv)
    minus = loss_np(q - FD_EPS * dq, k - FD_EPS * dk, v - FD_EPS * dv)
    numeric = (plus - minus) / (2 * FD_EPS)
    assert abs(analytic - numeric) <= FD_RTOL * max(1.0, abs(numeric)), (analytic, numeric)


def test_window_one_returns_v():
    q, k, v = (jnp.asarray(x, jnp.float32) for x in make_inputs(3, 7))
    o = softmax_attention(q, k, v, window=1)
    # Softmax over a single visible key is exactly 1; the masked ones are exactly 0.
    np.testing.assert_allclose(np.asarray(o), np.asarray(v), rtol=1e-6, atol=1e-7)


def test_output_dtype_follows_v():
    q, k, v = (jnp.asarray(x, jnp.float32) for x in make_inputs(4, 5))
    o = softmax_attention(q, k, v.astype(jnp.bfloat16))
    assert o.dtype == jnp.bfloat16


def _arr(*shape):
    return np.zeros(shape, np.float32)  # shape checks only; NumPy keeps collection JAX-free


@pytest.mark.parametrize(
    "q, k, v, what",
    [
        (_arr(2, 5, 2, 4)[0], _arr(5, 2, 4), _arr(5, 2, 3), r"\[B, T, H, K\]"),  # rank 3 q, k, v
        (_arr(2, 5, 2, 4), _arr(2, 5, 2, 5), _arr(2, 5, 2, 3), r"k \(2, 5, 2, 5\)"),  # k's K differs
        (_arr(2, 5, 2, 4), _arr(2, 6, 2, 4), _arr(2, 5, 2, 3), r"k \(2, 6, 2, 4\)"),  # k's T differs
        (_arr(2, 5, 2, 4), _arr(2, 5, 2, 4), _arr(2, 6, 2, 3), r"v \(2, 6, 2, 3\)"),  # v's T differs
        (_arr(2, 5, 2, 4), _arr(2, 5, 2, 4), _arr(2, 5, 3, 3), r"v \(2, 5, 3, 3\)"),  # v's H differs
        (_arr(2, 5, 2, 4), _arr(2, 5, 2, 4), _arr(2, 5, 2), r"v \(2, 5, 2\)"),  # v has rank 3
    ],
    ids=["rank3", "k_head_dim", "k_seq_len", "v_seq_len", "v_heads", "v_rank3"],
)
def test_bad_shapes_raise(q, k, v, what):
    with pytest.raises(ValueError, match=what):
        softmax_attention(q, k, v)


@pytest.mark.parametrize("window", [0, -1, -5])
def test_bad_window_raises(window):
    q = _arr(1, 4, 1, 2)
    with pytest.raises(ValueError, match=rf"window must be a positive.*got {window}"):
        softmax_attention(q, q, q, window=window)


# The chunk form reads a window's keys by position: check it against the oracle where queries
# and keys are offset (decoding against a cache) and where the window is longer than the keys.
@pytest.mark.parametrize(
    "T, S, window, q_offset, k_offset",
    [
        (5, 12, None, 7, 0),  # new tokens after a full-length cache (S = q_offset + T)
        (5, 12, 3, 7, 0),
        (6, 9, 4, 20, 17),  # a window buffer of 3 old keys then the new ones (k_offset < q_offset)
        (3, 5, 9, 2, 0),  # window longer than the keys
        (9, 9, 2, 0, 0),  # several query blocks and a short window
    ],
)
def test_chunk_form_with_offsets_matches_oracle(x64, T, S, window, q_offset, k_offset):
    rng = np.random.default_rng(T * S)
    q = 1.5 * rng.normal(size=(B, T, H, K))
    k, v = 1.5 * rng.normal(size=(B, S, H, K)), rng.normal(size=(B, S, H, V))
    # The oracle attends a sequence from position 0: place the keys at their absolute positions
    # (zeros before k_offset are never visible to the queries checked) and the queries at the end.
    pad = k_offset
    k_full = np.concatenate([np.zeros((B, pad, H, K)), k], axis=1)
    v_full = np.concatenate([np.zeros((B, pad, H, V)), v], axis=1)
    q_full = np.zeros_like(k_full)
    q_full[:, q_offset:q_offset + T] = q
    want = softmax_attention_np(q_full, k_full, v_full, window)[:, q_offset:q_offset + T]
    for impl in ("reference", "chunk"):
        o = softmax_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), window=window,
                              q_offset=q_offset, k_offset=k_offset, impl=impl, chunk_size=2)
        np.testing.assert_allclose(np.asarray(o), want, err_msg=impl, **F64_TOL)


def persistent_attention_np(q, k, v, k_p, v_p, window):
    """Oracle with persistent tokens: each query's softmax runs over the P persistent keys
    (always visible) and the causal (windowed) keys of the sequence."""
    T, out = q.shape[1], np.zeros((*q.shape[:3], v.shape[3]))
    for t in range(T):
        lo = 0 if window is None else max(0, t - window + 1)
        keys = np.concatenate([k_p, k[:, lo:t + 1]], axis=1)
        values = np.concatenate([v_p, v[:, lo:t + 1]], axis=1)
        logits = np.einsum("bhk,bshk->bhs", q[:, t], keys) / np.sqrt(q.shape[3])
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        out[:, t] = np.einsum("bhs,bshv->bhv", weights / weights.sum(-1, keepdims=True), values)
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_persistent_tokens_join_every_softmax(x64, window, impl):
    q, k, v = make_inputs(5, 11)
    k_p, v_p = make_inputs(6, 2)[1:]
    got = softmax_attention(*(jnp.asarray(a) for a in (q, k, v)), window=window, impl=impl,
                            persistent=(jnp.asarray(k_p), jnp.asarray(v_p)), chunk_size=4)
    np.testing.assert_allclose(got, persistent_attention_np(q, k, v, k_p, v_p, window), **F64_TOL)


def test_bad_persistent_raises():
    q, k, v = (jnp.asarray(a, jnp.float32) for a in make_inputs(0, 5))
    with pytest.raises(ValueError, match="persistent keys and values must be"):
        softmax_attention(q, k, v, persistent=(k[:, :2, :1], v[:, :2, :1]))
    with pytest.raises(ValueError, match="persistent must be a"):
        softmax_attention(q, k, v, persistent=k)
