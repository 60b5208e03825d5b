"""RWKV-7 ("Goose") time mixing: the generalised delta rule with vector decay and learning rate."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers.heads import head_dim, l2_normalize, merge_heads, run_recurrent, split_heads
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops import generalized_delta_rule, generalized_delta_rule_step

# RWKV-7 keeps the per-step decay in (exp(-e^-0.5), 1): log w = -e^-0.5 * sigmoid(.).
_MAX_LOG_DECAY = 0.6065306597126334


class LowRank(nn.Module):
    """`W_2 act(W_1 x)` with a rank-`rank` bottleneck (RWKV-7's data-dependent "LoRA" maps)."""

    features: int
    rank: int
    activation: str = "tanh"

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.rank, use_bias=False, name="down")(x)
        h = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "none": lambda t: t}[self.activation](h)
        return nn.Dense(self.features, use_bias=False, kernel_init=nn.initializers.zeros, name="up")(h)


@MIXERS.register("rwkv7")
class RWKV7TimeMix(nn.Module):
    """RWKV-7 time mixing (Peng et al., 2025), per head in our key-major layout `S [K, V]`:

    `S_t = (diag(w_t) - (lr_t * kappa_t) kappa_t^T) S_{t-1} + k_t v_t^T`, `o_t = S_t^T r_t`,
    i.e. the generalised delta rule with `a = -(lr * kappa)`, `b = kappa`: read the value stored
    under the unit removal key kappa, remove it at the in-context learning rate lr (per channel),
    decay per channel by w, write the replacement key k. Inputs are token-shifted mixes of x and
    x_{t-1}; `w = exp(-e^-0.5 sigmoid(w_0 + LowRank(x_w)))`, `lr = sigmoid(a_0 + LowRank(x_a))`,
    `kappa = L2norm(k * k_k)`, `k <- k * (1 + (lr - 1) k_a)`. Output: per-head GroupNorm of
    `o + (r . (k * r_k)) v` (the "bonus" for the current token), times a low-rank sigmoid gate,
    then the output projection. Not included: the value residual across layers.
    `[B, T, d_model]` in and out; decoding cache: the state `[B, H, K, K]` and the last token.
    """

    d_model: int
    num_heads: int = 2
    low_rank: int = 16
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        heads, d = self.num_heads, self.d_model
        head_dim(d, heads)
        previous = jnp.zeros_like(x[:, :1]) if cache is None else cache["shift"][:, None].astype(x.dtype)
        shifted = jnp.concatenate([previous, x[:, :-1]], axis=1)
        mixes = self.param("token_shift", nn.initializers.uniform(1.0), (6, d))
        x_r, x_w, x_k, x_v, x_a, x_g = (x + (shifted - x) * mixes[i] for i in range(6))

        r = split_heads(initializers.dense(d, name="r")(x_r), heads)
        k = initializers.dense(d, name="k")(x_k)
        v = split_heads(initializers.dense(d, name="v")(x_v), heads)
        w0 = self.param("w0", nn.initializers.normal(0.5), (d,))
        log_w = -_MAX_LOG_DECAY * jax.nn.sigmoid(w0 + LowRank(d, self.low_rank, name="w_lora")(x_w))
        a0 = self.param("a0", nn.initializers.zeros, (d,))
        lr = jax.nn.sigmoid(a0 + LowRank(d, self.low_rank, "none", name="a_lora")(x_a))
        kappa = l2_normalize(split_heads(k * self.param("k_k", nn.initializers.ones, (d,)), heads))
        k = k * (1.0 + (lr - 1.0) * self.param("k_a", nn.initializers.ones, (d,)))
        k, lr, log_w = split_heads(k, heads), split_heads(lr, heads), split_heads(log_w, heads)

        o, state = run_recurrent(
            generalized_delta_rule, generalized_delta_rule_step,
            None if cache is None else cache["state"],
            {"impl": self.impl, "chunk_size": self.chunk_size, "scale": 1.0},
            q=r, k=k, v=v, g=log_w.astype(jnp.float32), a=-(lr * kappa), b=kappa)
        # Statistics per token and head (RWKV-7's GroupNorm sees [B*T, C]); Flax's default would
        # also reduce over T, letting later tokens change earlier outputs.
        o = nn.GroupNorm(num_groups=heads, epsilon=64e-5, reduction_axes=-1,
                         name="head_norm")(merge_heads(o))
        r_k = self.param("r_k", nn.initializers.normal(0.1), (heads, d // heads))
        bonus = jnp.sum(r * k * r_k, axis=-1, keepdims=True) * v
        gate = LowRank(d, self.low_rank, "sigmoid", name="g_lora")(x_g)
        y = initializers.dense_out(d, name="out")((o + merge_heads(bonus)) * gate)
        if cache is None:
            return y
        return y, {"state": state, "shift": x[:, -1].astype(jnp.float32)}

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        dim = head_dim(self.d_model, self.num_heads)
        return {"state": jnp.zeros((batch_size, self.num_heads, dim, dim), jnp.float32),
                "shift": jnp.zeros((batch_size, self.d_model), jnp.float32)}
