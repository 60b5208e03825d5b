"""Causal softmax attention, full or sliding-window (the exact-recall baseline)."""

import jax
import jax.numpy as jnp


def softmax_attention(q, k, v, *, window: int | None = None, scale: float | None = None):
    """Causal multi-head softmax attention.

    q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; returns o `[B, T, H, V]` in v's dtype.
    `o_t = sum_{s in W(t)} softmax_s(scale * q_t . k_s) v_s` with `W(t) = {s <= t}`, or with a
    sliding window `W(t) = {t - window < s <= t}` (the current token and `window - 1` before it).
    Logits and the softmax are computed in float32 for float32/bfloat16 inputs (float64 for float64).
    """
    if q.ndim != 4 or v.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"softmax_attention expects q, k [B, T, H, K] and v [B, T, H, V] with matching B, T, H;"
            f" got q {q.shape}, k {k.shape}, v {v.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of tokens or None, got {window}")
    seq_len, head_dim = q.shape[1], q.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)  # float32, or float64 under x64
    logits = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=compute_dtype) * scale
    t = jnp.arange(seq_len)[:, None]
    s = jnp.arange(seq_len)[None, :]
    visible = s <= t
    if window is not None:
        visible &= s > t - window
    logits = jnp.where(visible, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhts,bshv->bthv", weights, v.astype(compute_dtype))
    return o.astype(v.dtype)
