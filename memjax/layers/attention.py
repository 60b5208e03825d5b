"""Softmax attention mixers: full causal attention and sliding-window attention."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers.heads import FLOAT32_BYTES, head_dim
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops.attention import softmax_attention


@MIXERS.register("attention")
class Attention(nn.Module):
    """Multi-head causal softmax attention; `window > 0` restricts it to the last `window` tokens.

    Input and output `[B, T, d_model]`. Decoding state (`init_cache`): key and value buffers
    `[B, max_len, H, d_model / H]` and the number of tokens seen. `__call__(x, cache)` treats x
    as the continuation of the cached tokens and returns `(y, cache)`.
    """

    d_model: int
    num_heads: int = 1
    window: int = 0

    @nn.compact
    def __call__(self, x, cache=None):
        batch, seq_len, _ = x.shape
        width = head_dim(self.d_model, self.num_heads)
        qkv = initializers.dense(3 * self.d_model, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(batch, seq_len, self.num_heads, 3 * width), 3, axis=-1)
        out = initializers.dense_out(self.d_model, name="out")
        if cache is None:
            o = softmax_attention(q, k, v, window=self.window or None)
            return out(o.reshape(batch, seq_len, -1))
        start = cache["length"]
        keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), start, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), start, axis=1)
        o = softmax_attention(q, keys, values, window=self.window or None, q_offset=start)
        new_cache = {"k": keys, "v": values, "length": start + seq_len}
        return out(o.astype(x.dtype).reshape(batch, seq_len, -1)), new_cache

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """Empty key/value buffers for up to `max_len` tokens (float32)."""
        shape = (batch_size, max_len, self.num_heads, head_dim(self.d_model, self.num_heads))
        return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32),
                "length": jnp.zeros((), jnp.int32)}

    def state_size(self, seq_len: int) -> int:
        """Bytes of the key/value cache needed to decode after `seq_len` tokens (float32)."""
        if self.window < 0:
            raise ValueError(f"window must be >= 0 (0 = full attention), got {self.window}")
        cached = min(seq_len, self.window) if self.window else seq_len
        return 2 * self.d_model * cached * FLOAT32_BYTES
