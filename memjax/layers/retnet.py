"""RetNet-style multi-scale retention: linear attention with a fixed decay per head."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from memjax.layers.heads import head_dim, merge_heads, run_recurrent, split_heads
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops import linear_attention, linear_attention_step


def retention_log_decays(num_heads: int) -> np.ndarray:
    """`log(gamma_h)` with `gamma_h = 1 - 2^(-5 - h)`: head h keeps a memory of ~2^(5+h) tokens."""
    return np.log1p(-(2.0 ** (-5.0 - np.arange(num_heads))))


@MIXERS.register("retnet")
class Retention(nn.Module):
    """Multi-scale retention (Sun et al., 2023), without xPos (order comes from the short conv).

    Per head h: `S_t = gamma_h S_{t-1} + k_t v_t^T`, `o_t = S_t^T q_t / sqrt(K)`; then a per-head
    RMS norm, a SiLU output gate `silu(W_g x)` (unless `output_gate=False`: without it the layer
    learns MQAR recall, with it a prior, docs/results/learning_tests.md) and the output
    projection. `[B, T, d_model]` in and out; decoding cache `{"state": [B, H, K, K]}`.
    """

    d_model: int
    num_heads: int = 4
    output_gate: bool = True  # False: the normalised heads go straight to the output projection
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        batch, seq_len, _ = x.shape
        heads = self.num_heads
        head_dim(self.d_model, heads)
        q, k, v = (split_heads(initializers.dense(self.d_model, name=n)(x), heads)
                   for n in ("q", "k", "v"))
        g = jnp.broadcast_to(jnp.asarray(retention_log_decays(heads), jnp.float32),
                             (batch, seq_len, heads))
        o, state = run_recurrent(
            linear_attention, linear_attention_step, None if cache is None else cache["state"],
            {"impl": self.impl, "chunk_size": self.chunk_size}, q=q, k=k, v=v, g=g)
        o = merge_heads(nn.RMSNorm(name="head_norm")(o))
        if self.output_gate:
            o = o * nn.silu(initializers.dense(self.d_model, name="gate")(x))
        y = initializers.dense_out(self.d_model, name="out")(o)
        return y if cache is None else (y, {"state": state})

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        dim = head_dim(self.d_model, self.num_heads)
        return {"state": jnp.zeros((batch_size, self.num_heads, dim, dim), jnp.float32)}
