"""Causal softmax attention, full or sliding-window (the exact-recall baseline)."""

import jax
import jax.numpy as jnp


def softmax_attention(q, k, v, *, window: int | None = None, scale: float | None = None,
                      q_offset=0, k_offset=0):
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
    Logits and the softmax are computed in float32 for float32/bfloat16 inputs (float64 for float64).
    """
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
    head_dim = q.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)  # float32, or float64 under x64
    logits = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=compute_dtype) * scale
    t = q_offset + jnp.arange(q.shape[1])[:, None]
    s = k_offset + jnp.arange(k.shape[1])[None, :]
    visible = (s <= t) & (s >= 0)
    if window is not None:
        visible &= s > t - window
    logits = jnp.where(visible, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhts,bshv->bthv", weights, v.astype(compute_dtype))
    return o.astype(v.dtype)
