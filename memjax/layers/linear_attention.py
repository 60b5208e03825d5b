"""The linear-attention mixer: a matrix-valued memory written with k v^T and read with q."""

import flax.linen as nn
import jax.numpy as jnp

from memjax.layers.heads import head_dim, run_recurrent
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops import linear_attention, linear_attention_step


@MIXERS.register("linear_attention")
class LinearAttention(nn.Module):
    """Multi-head linear attention (`memjax.ops.linear_attention`, no decay).

    Per head: `S_t = S_{t-1} + k_t v_t^T`, `o_t = S_t^T q_t / sqrt(K)`; the head outputs are
    RMS-normalised (the unnormalised memory grows with t) and projected back to d_model.
    Input and output `[B, T, d_model]`. Decoding state (`init_cache`): `{"state": [B, H, K, V]}`;
    `__call__(x, cache)` continues from it and returns `(y, cache)`.
    """

    d_model: int
    num_heads: int = 2
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        batch, seq_len, _ = x.shape
        width = head_dim(self.d_model, self.num_heads)
        qkv = initializers.dense(3 * self.d_model, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(batch, seq_len, self.num_heads, 3 * width), 3, axis=-1)
        o, state = run_recurrent(
            linear_attention, linear_attention_step, None if cache is None else cache["state"],
            {"impl": self.impl, "chunk_size": self.chunk_size}, q=q, k=k, v=v)
        o = nn.RMSNorm(name="head_norm")(o).reshape(batch, seq_len, self.d_model)
        y = initializers.dense_out(self.d_model, name="out")(o)
        return y if cache is None else (y, {"state": state})

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len  # the recurrent state does not grow with the sequence
        width = head_dim(self.d_model, self.num_heads)
        return {"state": jnp.zeros((batch_size, self.num_heads, width, width), jnp.float32)}
