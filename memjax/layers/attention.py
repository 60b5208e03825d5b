"""Softmax attention mixers: full causal attention and sliding-window attention."""

import flax.linen as nn
import jax.numpy as jnp

from memjax.layers.registry import MIXERS
from memjax.ops.attention import softmax_attention

FLOAT32_BYTES = 4


@MIXERS.register("attention")
class Attention(nn.Module):
    """Multi-head causal softmax attention; `window > 0` restricts it to the last `window` tokens.

    Input and output `[B, T, d_model]`. Its decoding state is the key/value cache.
    """

    d_model: int
    num_heads: int = 1
    window: int = 0

    @nn.compact
    def __call__(self, x):
        batch, seq_len, _ = x.shape
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by num_heads {self.num_heads}")
        head_dim = self.d_model // self.num_heads
        qkv = nn.Dense(3 * self.d_model, use_bias=False, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(batch, seq_len, self.num_heads, 3 * head_dim), 3, axis=-1)
        o = softmax_attention(q, k, v, window=self.window or None)
        return nn.Dense(self.d_model, use_bias=False, name="out")(o.reshape(batch, seq_len, -1))

    def state_size(self, seq_len: int) -> int:
        """Bytes of the key/value cache needed to decode after `seq_len` tokens (float32)."""
        if self.window < 0:
            raise ValueError(f"window must be >= 0 (0 = full attention), got {self.window}")
        cached = min(seq_len, self.window) if self.window else seq_len
        return 2 * self.d_model * cached * FLOAT32_BYTES
