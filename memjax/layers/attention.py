"""Softmax attention mixers: full causal attention and sliding-window attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers.heads import head_dim
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops.attention import softmax_attention


@MIXERS.register("attention")
class Attention(nn.Module):
    """Multi-head causal softmax attention; `window > 0` restricts it to the last `window` tokens.

    Input and output `[B, T, d_model]`. Decoding state (`init_cache`): key and value buffers
    `[B, S, H, d_model / H]` (S = max_len, or the window when it is shorter) and the number of
    tokens seen. `__call__(x, cache)` treats x as the continuation of the cached tokens and
    returns `(y, cache)`. `impl`, `chunk_size`: the operator's form (memjax.ops.softmax_attention;
    "chunk" pays for long sequences with a window, docs/results/op_dispatch.md).
    `persistent_tokens > 0`: that many learned tokens (Titans' persistent memory, N(0, 0.02^2)
    at init) pass through the same key/value projection and are seen by every query, whatever
    its position and window; they are parameters, not part of the decoding cache.
    """

    d_model: int
    num_heads: int = 1
    window: int = 0
    persistent_tokens: int = 0
    impl: str = "auto"
    chunk_size: int = 64

    @nn.compact
    def __call__(self, x, cache=None):
        batch, seq_len, _ = x.shape
        width = head_dim(self.d_model, self.num_heads)
        project = initializers.dense(3 * self.d_model, name="qkv")

        def heads(tokens):  # [B, L, d_model] -> q, k, v [B, L, H, width]
            qkv = project(tokens).reshape(*tokens.shape[:2], self.num_heads, 3 * width)
            return jnp.split(qkv, 3, axis=-1)

        q, k, v = heads(x)
        persistent = None
        if self.persistent_tokens:
            tokens = self.param("persistent", nn.initializers.normal(0.02),
                                (self.persistent_tokens, self.d_model))
            _, k_p, v_p = heads(jnp.broadcast_to(tokens.astype(x.dtype),
                                                 (batch, *tokens.shape)))
            persistent = (k_p, v_p)
        out = initializers.dense_out(self.d_model, name="out")
        if cache is None:
            o = softmax_attention(q, k, v, window=self.window or None, persistent=persistent,
                                  **self._form())
            return out(o.reshape(batch, seq_len, -1))
        o, new_cache = self._attend_cached(q, k, v, cache, persistent)
        return out(o.astype(x.dtype).reshape(batch, seq_len, -1)), new_cache

    def _attend_cached(self, q, k, v, cache, persistent):
        """Attention of new tokens to the cache and themselves; returns `(o, new_cache)`."""
        start, seq_len, buffer = cache["length"], q.shape[1], cache["k"].shape[1]
        k, v = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
        window = self.window or None
        if not self._is_window_buffer(buffer):
            keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k, start, axis=1)
            values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v, start, axis=1)
            o = softmax_attention(q, keys, values, window=window, q_offset=start,
                                  persistent=persistent, **self._form())
            return o, {"k": keys, "v": values, "length": start + seq_len}
        # The buffer holds the last `buffer` tokens in position order (slot j: position
        # start - buffer + j; negative positions are unwritten and masked). The new tokens go
        # after it and the last `buffer` of the concatenation is the next buffer: a shift, not
        # a ring index, since every decoding step reads the whole buffer anyway.
        keys = jnp.concatenate([cache["k"], k], axis=1)
        values = jnp.concatenate([cache["v"], v], axis=1)
        o = softmax_attention(q, keys, values, window=window, q_offset=start,
                              k_offset=start - buffer, persistent=persistent, **self._form())
        return o, {"k": keys[:, seq_len:], "v": values[:, seq_len:], "length": start + seq_len}

    def _form(self) -> dict:
        return {"impl": self.impl, "chunk_size": self.chunk_size}

    def _is_window_buffer(self, buffer: int) -> bool:
        return 0 < self.window == buffer

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """Empty key/value buffers (float32) `[B, S, H, d_model / H]`: S = `max_len` for full
        attention, or `window` when the window is shorter (only the last `window` tokens are
        ever read, so the buffer keeps those)."""
        if self.window < 0:
            raise ValueError(f"window must be >= 0 (0 = full attention), got {self.window}")
        slots = min(self.window, max_len) if self.window else max_len
        shape = (batch_size, slots, self.num_heads, head_dim(self.d_model, self.num_heads))
        return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32),
                "length": jnp.zeros((), jnp.int32)}
