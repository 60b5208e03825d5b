"""Gated linear attention (GLA): linear attention with a data-dependent per-channel decay."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers.heads import head_dim, merge_heads, run_recurrent, split_heads
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops import linear_attention, linear_attention_step


@MIXERS.register("gla")
class GatedLinearAttention(nn.Module):
    """GLA (Yang et al., 2023), per head with key width `K = expand_k * d_model / H`:

    `S_t = diag(alpha_t) S_{t-1} + k_t v_t^T`, `o_t = S_t^T q_t / sqrt(K)`, with the per-channel
    decay `log alpha_t = logsigmoid(W_2 W_1 x_t + b) / gate_normalizer` (a rank-16 map; dividing
    by the normaliser keeps most channels near 1 at initialisation). Output: per-head RMSNorm
    times `silu(W_r x)` (unless `output_gate=False`), then the output projection. `[B, T,
    d_model]` in and out; decoding cache `{"state": [B, H, K, d_model / H]}`.
    """

    d_model: int
    num_heads: int = 2
    expand_k: float = 0.5
    gate_rank: int = 16
    gate_normalizer: float = 16.0
    output_gate: bool = True  # False: the normalised heads go straight to the output projection
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        heads, key_width = self.num_heads, self._key_width()
        q = split_heads(initializers.dense(key_width * heads, name="q")(x), heads)
        k = split_heads(initializers.dense(key_width * heads, name="k")(x), heads)
        v = split_heads(initializers.dense(self.d_model, name="v")(x), heads)
        gate = initializers.dense(self.gate_rank, name="gate_down")(x)
        gate = initializers.dense(key_width * heads, name="gate_up", bias=True)(gate)
        gate = gate.astype(jnp.float32)
        g = split_heads(jax.nn.log_sigmoid(gate) / self.gate_normalizer, heads)
        o, state = run_recurrent(
            linear_attention, linear_attention_step, None if cache is None else cache["state"],
            {"impl": self.impl, "chunk_size": self.chunk_size}, q=q, k=k, v=v, g=g)
        o = merge_heads(nn.RMSNorm(name="head_norm")(o))
        if self.output_gate:
            o = o * nn.silu(initializers.dense(self.d_model, name="out_gate")(x))
        y = initializers.dense_out(self.d_model, name="out")(o)
        return y if cache is None else (y, {"state": state})

    def _key_width(self) -> int:
        value_width = head_dim(self.d_model, self.num_heads)
        width = int(self.expand_k * value_width)
        if width < 1:
            raise ValueError(f"expand_k {self.expand_k} leaves no key channels per head")
        return width

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        value_width = head_dim(self.d_model, self.num_heads)
        return {"state": jnp.zeros((batch_size, self.num_heads, self._key_width(), value_width),
                                   jnp.float32)}
