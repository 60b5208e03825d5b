"""Shared pieces of multi-head mixers: head splitting and the one-token decoding switch."""

import jax.numpy as jnp


def head_dim(d_model: int, num_heads: int) -> int:
    if d_model % num_heads:
        raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
    return d_model // num_heads


def split_heads(x, num_heads: int):
    """`[B, T, H * D] -> [B, T, H, D]`."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x):
    """`[B, T, H, D] -> [B, T, H * D]`."""
    return x.reshape(*x.shape[:-2], -1)


def l2_normalize(x, eps: float = 1e-6):
    """`x / ||x||` over the last axis (float32 norm), as the delta-rule layers apply to q and k."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True) + eps)
    return (x / norm).astype(x.dtype)


def run_recurrent(op, step, cache_state, options: dict, **inputs):
    """Runs a recurrent operator over `[B, T, ...]` inputs, or its one-token `step` when decoding.

    `inputs` are the operator's sequence arguments by name (q, k, v, g, beta, ...), so both
    `op(**inputs, initial_state=cache_state, **options)` and `step(**tokens, state=cache_state)`
    follow the operator contract. Decoding (a cache is given and T == 1) uses the step form,
    which skips the chunk machinery. Returns `(o, final_state)`.
    """
    if cache_state is not None and inputs["q"].shape[1] == 1:
        o, state = step(**{name: x[:, 0] for name, x in inputs.items()}, state=cache_state)
        return o[:, None], state
    return op(**inputs, initial_state=cache_state, **options)
