"""DeltaNet and Gated DeltaNet mixers (`memjax.ops.delta_rule`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers.conv import ShortConv, conv_silu_heads
from memjax.layers.heads import head_dim, l2_normalize, merge_heads, run_recurrent
from memjax.layers.initializers import dt_bias_init
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops import delta_rule, delta_rule_step


def log_decay(module: nn.Module, x, num_heads: int, copies: int | None = None):
    """Gated DeltaNet's decay ``g = -exp(A_log) softplus(W_a x + dt_bias)`` (g <= 0, float32),
    ``[B, T, H]``; with ``copies`` (several memories of H heads each, as in a mixture of
    memories) ``[B, T, copies, H]``: each copy has its own columns of W_a, and A_log and
    dt_bias (``[H]``) are shared by the copies.
    Call inside a compact module: it creates ``A_log``, ``dt_bias`` and the Dense ``a`` there."""
    a_log = module.param("A_log", lambda key: jnp.log(
        jax.random.uniform(key, (num_heads,), minval=1.0, maxval=16.0)))
    dt_bias = module.param("dt_bias", dt_bias_init(1e-3, 0.1), (num_heads,))
    pre = initializers.dense(num_heads * (copies or 1), name="a")(x).astype(jnp.float32)
    if copies is not None:
        pre = pre.reshape(*pre.shape[:-1], copies, num_heads)
    return -jnp.exp(a_log) * jax.nn.softplus(pre + dt_bias)


@MIXERS.register("deltanet")
class DeltaNet(nn.Module):
    """DeltaNet (Yang et al., 2024) and, with `gated=True`, Gated DeltaNet (Yang et al., 2025).

    Per head: q, k, v = SiLU(ShortConv(W x)) with q, k L2-normalised; `beta_t = sigmoid(w_b x_t)`
    (times 2 with `allow_neg_eigval`, so the transition `I - beta k k^T` can have eigenvalue
    down to -1, which state tracking such as parity needs); gated: `g_t = -exp(A) softplus(w_a x_t
    + dt_bias)` (a Mamba-2 style decay). Memory: `S_t = exp(g_t)(I - beta_t k_t k_t^T) S_{t-1}
    + beta_t k_t v_t^T`, `o_t = S_t^T q_t / sqrt(K)`. Output: per-head RMSNorm times
    `silu(W_g x)` (gated) or plain RMSNorm (DeltaNet), then the output projection.
    `[B, T, d_model]` in and out; decoding cache: the state `[B, H, K, K]` and the three
    convolution histories. K = `head_size`, or d_model / H when it is 0 (`head_size` apart from
    d_model sizes the state independently: H heads of K hold H K^2 numbers).
    """

    own_short_conv = True  # the block adds no short convolution in front (not a field)

    d_model: int
    num_heads: int = 2
    conv_size: int = 4
    gated: bool = False
    allow_neg_eigval: bool = False
    head_size: int = 0  # 0: d_model / num_heads
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        heads, width = self.num_heads, self.num_heads * self._head_dim()
        streams, new_cache = conv_silu_heads(x, "qkv", heads, self.conv_size, cache, width=width)
        q, k = l2_normalize(streams["q"]), l2_normalize(streams["k"])
        beta = initializers.dense(heads, name="beta", bias=True)(x)
        beta = jax.nn.sigmoid(beta.astype(jnp.float32))
        if self.allow_neg_eigval:
            beta = 2.0 * beta
        inputs = {"q": q, "k": k, "v": streams["v"], "beta": beta}
        if self.gated:
            inputs["g"] = log_decay(self, x, heads)
        o, state = run_recurrent(delta_rule, delta_rule_step, None if cache is None else cache["state"],
                                 {"impl": self.impl, "chunk_size": self.chunk_size}, **inputs)
        o = nn.RMSNorm(name="head_norm")(o)
        o = merge_heads(o)
        if self.gated:
            o = o * nn.silu(initializers.dense(width, name="gate")(x))
        y = initializers.dense_out(self.d_model, name="out")(o)
        if cache is None:
            return y
        return y, new_cache | {"state": state}

    def _head_dim(self) -> int:
        if self.head_size < 0:
            raise ValueError(f"head_size must be >= 0 (0: d_model / num_heads), got "
                             f"{self.head_size}")
        return self.head_size or head_dim(self.d_model, self.num_heads)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        dim = self._head_dim()
        conv = ShortConv(self.conv_size, parent=None)
        return {"state": jnp.zeros((batch_size, self.num_heads, dim, dim), jnp.float32),
                **{f"conv_{n}": conv.init_cache(batch_size, self.num_heads * dim)
                   for n in ("q", "k", "v")}}


@MIXERS.register("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet: DeltaNet with the decay gate and the SiLU output gate (`gated=True`)."""

    gated: bool = True
