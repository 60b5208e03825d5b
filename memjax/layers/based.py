"""Based: Taylor-feature linear attention, optionally beside sliding-window softmax attention."""

import functools

import flax.linen as nn
import jax.numpy as jnp

from memjax.layers.attention import Attention
from memjax.layers.heads import head_dim, merge_heads, run_recurrent, split_heads
from memjax.layers import initializers
from memjax.layers.registry import MIXERS
from memjax.ops import linear_attention, linear_attention_step
from memjax.ops.feature_maps import feature_dim, feature_map

FEATURE_MAP = "taylor_dedup"


@MIXERS.register("based")
class Based(nn.Module):
    """Based (Arora et al., 2024) as one mixer: the sum of two branches.

    Linear branch, per head: q, k projected to `feature_dim` channels and lifted with the
    second-order Taylor map phi (`phi(q).phi(k) = 1 + s + s^2/2`, `s = q.k / sqrt(feature_dim)`,
    an approximation of `exp(s)`), then normalised linear attention
    `o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / sum_{s<=t} phi(q_t).phi(k_s)`: global but lossy
    recall. Window branch (`window > 0`): exact softmax attention over the last `window` tokens
    (`memjax.layers.attention.Attention`); `window = 0` leaves it out. `[B, T, d_model]` in and
    out; decoding cache: the linear state `[B, H, F, d_model / H + 1]` (last column: the
    normaliser) and, with a window, its key/value cache.

    As config presets (`memjax.config.MIXER_PRESETS`): `based` (this default: no window, the
    Based of Zoology's MQAR figures, where a short convolution precedes it) and `based_lm`
    (window 64: both branches in one mixer, every layer alike). The language models of Arora et
    al. 2024 put the two branches in separate layers among BaseConv layers: the pattern
    `based_published` (`memjax.config.LAYER_PATTERNS`). With a window at least as long as the
    sequence the window branch is full softmax attention, so at T <= 64 `based_lm` can solve
    MQAR by attention alone.
    """

    d_model: int
    num_heads: int = 2
    feature_dim: int = 16
    window: int = 0
    window_heads: int = 2
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        heads = self.num_heads
        head_dim(self.d_model, heads)
        q, k = (feature_map(FEATURE_MAP, split_heads(
            initializers.dense(heads * self.feature_dim, name=n)(x), heads)) for n in ("q", "k"))
        v = split_heads(initializers.dense(self.d_model, name="v")(x), heads)
        o, state = run_recurrent(
            linear_attention, functools.partial(linear_attention_step, normalize=True),
            None if cache is None else cache["linear"],
            {"impl": self.impl, "chunk_size": self.chunk_size, "normalize": True}, q=q, k=k, v=v)
        y = initializers.dense_out(self.d_model, name="out")(merge_heads(o))
        if not self.window:
            return y if cache is None else (y, {"linear": state})
        window = Attention(self.d_model, self.window_heads, self.window, name="window")
        if cache is None:
            return y + window(x)
        y_window, window_cache = window(x, cache["window"])
        return y + y_window, {"linear": state, "window": window_cache}

    def _features(self) -> int:
        return feature_dim(FEATURE_MAP, self.feature_dim)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        value_width = head_dim(self.d_model, self.num_heads)
        linear = jnp.zeros((batch_size, self.num_heads, self._features(), value_width + 1), jnp.float32)
        if not self.window:
            return {"linear": linear}
        window = Attention(self.d_model, self.window_heads, self.window, parent=None)
        return {"linear": linear, "window": window.init_cache(batch_size, max_len)}
