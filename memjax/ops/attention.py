"""Causal softmax attention, full or sliding-window (the exact-recall baseline), in two forms.

Forms (``impl``):

- ``"reference"``: all logits at once, ``[B, H, T, S]``; the source of truth.
- ``"chunk"``: a ``lax.scan`` over blocks of ``chunk_size`` queries, each block rematerialised
  in the backward pass, so that forward and backward keep one block's logits alive,
  ``[B, H, C, S]``, instead of all of them. With a sliding window each block reads only the
  ``C + window - 1`` keys its queries can see, so its cost is ``O(T (C + window))`` instead of
  ``O(T S)``: the form for long sequences with a window.
- ``"pallas"``: a kernel registered in ``kernels/`` for the platform; ``"auto"``: the form
  ``memjax.ops.dispatch.AUTO`` names (docs/results/op_dispatch.md).

Both forms compute the same logits and softmax per query, so they agree to float rounding.
"""

import functools

import jax
import jax.numpy as jnp

from memjax.ops import dispatch
from memjax.ops._common import check_chunk_size, from_blocks, to_blocks

__all__ = ["softmax_attention"]

DEFAULT_CHUNK_SIZE = 64


def _validate(q, k, v, window, q_offset, k_offset) -> None:
    if (q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[0] != q.shape[0]
            or k.shape[2:] != q.shape[2:] or v.shape[:3] != k.shape[:3]):
        raise ValueError(
            "softmax_attention expects q [B, T, H, K], k [B, S, H, K], v [B, S, H, V] with matching"
            f" B, H, K and S; got q {q.shape}, k {k.shape}, v {v.shape}")
    no_offsets = all(isinstance(o, int) and o == 0 for o in (q_offset, k_offset))
    if no_offsets and k.shape[1] != q.shape[1]:
        raise ValueError(f"k has {k.shape[1]} positions but q has {q.shape[1]}: pass q_offset "
                         "when attending to a key/value cache")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of tokens or None, got {window}")


def _validate_persistent(q, v, persistent) -> None:
    if not (isinstance(persistent, tuple) and len(persistent) == 2):
        raise ValueError("persistent must be a (keys, values) pair, got "
                         f"{type(persistent).__name__}")
    k_p, v_p = persistent
    B, _, H, K = q.shape
    if (k_p.ndim != 4 or v_p.ndim != 4 or k_p.shape[0] != B or k_p.shape[2:] != (H, K)
            or v_p.shape != (*k_p.shape[:3], v.shape[3])):
        raise ValueError(f"persistent keys and values must be [B, P, H, K] = [{B}, P, {H}, {K}] "
                         f"and [B, P, H, V]; got {k_p.shape} and {v_p.shape}")


def _attend(q, k, v, t, s, window, scale, persistent=None):
    """Softmax attention of queries at positions t ``[T]`` to keys at positions s ``[S]``:
    q ``[B, T, H, K]``, k ``[B, S, H, K]``, v ``[B, S, H, V]`` -> ``[B, T, H, V]`` (float32 or
    float64). Keys at negative positions, after the query, or outside the window are masked;
    ``persistent`` keys and values (``[B, P, H, K]``, ``[B, P, H, V]``) are seen by every query."""
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)  # float32, or float64 under x64
    logits = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=compute_dtype) * scale
    t, s = t[:, None], s[None, :]
    visible = (s <= t) & (s >= 0)
    if window is not None:
        visible &= s > t - window
    logits = jnp.where(visible, logits, -jnp.inf)
    if persistent is None:
        weights = jax.nn.softmax(logits, axis=-1)
        return jnp.einsum("bhts,bshv->bthv", weights, v.astype(compute_dtype))
    k_p, v_p = persistent
    logits_p = jnp.einsum("bthk,bphk->bhtp", q, k_p, preferred_element_type=compute_dtype)
    weights = jax.nn.softmax(jnp.concatenate([logits_p * scale, logits], axis=-1), axis=-1)
    P = k_p.shape[1]
    return (jnp.einsum("bhtp,bphv->bthv", weights[..., :P], v_p.astype(compute_dtype))
            + jnp.einsum("bhts,bshv->bthv", weights[..., P:], v.astype(compute_dtype)))


def _reference_form(q, k, v, window, scale, q_offset, k_offset, persistent):
    t = q_offset + jnp.arange(q.shape[1])
    s = k_offset + jnp.arange(k.shape[1])
    return _attend(q, k, v, t, s, window, scale, persistent)


def _chunk_form(q, k, v, window, scale, q_offset, k_offset, chunk_size, persistent):
    T, S = q.shape[1], k.shape[1]
    C = min(chunk_size, T)
    n = -(-T // C)
    # Keys a block of C queries can see: all of them, or, with a window, the C + window - 1
    # positions from (first query - window + 1) to the last query.
    span = S if window is None else min(S, C + window - 1)

    @jax.checkpoint
    def block(i, q_i):
        rows = jnp.minimum(i * C + jnp.arange(C), T - 1)  # padded rows repeat the last query
        t = q_offset + rows
        start = 0 if window is None else jnp.clip(q_offset + i * C - (window - 1) - k_offset,
                                                  0, S - span)
        k_i = jax.lax.dynamic_slice_in_dim(k, start, span, axis=1)
        v_i = jax.lax.dynamic_slice_in_dim(v, start, span, axis=1)
        return _attend(q_i, k_i, v_i, t, k_offset + start + jnp.arange(span), window, scale,
                       persistent)

    _, o = jax.lax.scan(lambda _, xs: (None, block(*xs)), None, (jnp.arange(n), to_blocks(q, n, C)))
    return from_blocks(o, T)


@functools.partial(jax.jit, static_argnames=("form", "window", "chunk_size"))
def _softmax_attention(q, k, v, scale, q_offset, k_offset, persistent, form, window, chunk_size):
    if form == "chunk":
        return _chunk_form(q, k, v, window, scale, q_offset, k_offset, chunk_size, persistent)
    return _reference_form(q, k, v, window, scale, q_offset, k_offset, persistent)


def softmax_attention(q, k, v, *, window: int | None = None, scale: float | None = None,
                      q_offset=0, k_offset=0, persistent=None, impl: str = "auto",
                      chunk_size: int = DEFAULT_CHUNK_SIZE):
    """Causal multi-head softmax attention, optionally against a longer key/value cache.

    q: `[B, T, H, K]`; k: `[B, S, H, K]`; v: `[B, S, H, V]` (S = T without a cache); returns o
    `[B, T, H, V]` in v's dtype. Query t sits at absolute position `p_t = q_offset + t`, key s
    at position `k_offset + s` (ints or traced int32 scalars; a window-sized cache that keeps
    only the last keys sets k_offset < q_offset). Keys at negative positions (slots of a cache
    not yet written) are masked:
    `o_t = sum_{s in W(t)} softmax_s(scale * q_t . k_s) v_s` with `W(t) = {s: 0 <= p_s <= p_t}`,
    and with a sliding window also `p_s > p_t - window` (the current token and `window - 1`
    before).
    Cache slots beyond the current position are masked, so an unfilled cache needs no care.
    `persistent`: optional `(k_p [B, P, H, K], v_p [B, P, H, V])`, keys and values every query
    sees whatever its position and window (Titans' persistent memory, attention sinks); they
    join each query's softmax.
    Logits and the softmax are computed in float32 for float32/bfloat16 inputs (float64 for float64).
    `impl`: "reference", "chunk" (blocks of `chunk_size` queries; see the module docstring),
    "pallas" or "auto". Every query must see at least one key (true of causal self-attention and
    of a cache that holds the query's own position); a query that sees none gets NaN.
    """
    form = dispatch.resolve("softmax_attention", impl)
    chunk_size = check_chunk_size(chunk_size)
    _validate(q, k, v, window, q_offset, k_offset)
    if persistent is not None:
        _validate_persistent(q, v, persistent)
    scale = q.shape[3]**-0.5 if scale is None else scale
    if q.shape[1] == 0:
        return jnp.zeros((*q.shape[:3], v.shape[3]), v.dtype)
    if form == "pallas":
        extra = {} if persistent is None else {"persistent": persistent}
        return dispatch.kernel("softmax_attention")(
            q, k, v, window=window, scale=scale, q_offset=q_offset, k_offset=k_offset,
            chunk_size=chunk_size, **extra)
    o = _softmax_attention(q, k, v, scale, q_offset, k_offset, persistent, form, window,
                           chunk_size)
    return o.astype(v.dtype)
