"""Short causal depthwise convolution (token shift generalised to a few taps)."""

import flax.linen as nn
import jax.numpy as jnp

from memjax.layers import initializers
from memjax.layers.heads import split_heads


class ShortConv(nn.Module):
    """`y_t = sum_{i<kernel_size} w_i * x_{t-i} + b` per channel; input and output `[B, T, D]`.

    Causal: position t sees only itself and the `kernel_size - 1` positions before it, which
    lets a following mixer combine each token with its predecessors (needed for recall).
    Decoding state (`init_cache`): the last `kernel_size - 1` inputs `[B, kernel_size - 1, D]`;
    `__call__(x, cache)` continues after them and returns `(y, cache)`.
    """

    kernel_size: int

    @nn.compact
    def __call__(self, x, cache=None):
        channels, seq_len, width = x.shape[-1], x.shape[1], self.kernel_size - 1
        weight = self.param("weight", initializers.conv(),
                            (self.kernel_size, channels))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        history = jnp.zeros((x.shape[0], width, channels), x.dtype) if cache is None else cache
        padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
        # taps[i] is x shifted right by i; kernel_size is small so a sum of shifts beats a conv op.
        y = sum(weight[i] * padded[:, width - i : width - i + seq_len] for i in range(self.kernel_size))
        y = y + bias
        return y if cache is None else (y, padded[:, padded.shape[1] - width :].astype(history.dtype))

    def init_cache(self, batch_size: int, channels: int):
        return jnp.zeros((batch_size, self.kernel_size - 1, channels), jnp.float32)


def conv_silu_heads(x, names, num_heads: int, conv_size: int, cache=None, width=None):
    """``SiLU(ShortConv(W_n x))`` split into heads, for each stream n in ``names`` (the q, k, v of
    the delta-rule and test-time-memory mixers). Call inside a compact module: it creates the
    Dense ``n`` and the ShortConv ``conv_n`` there. ``width``: channels of each stream (default
    x's). Returns ``(streams [B, T, H, width / H] by name, new convolution caches by "conv_n")``
    (the caches are empty without ``cache``)."""
    width = x.shape[-1] if width is None else width
    streams, new_cache = {}, {}
    for name in names:
        h = initializers.dense(width, name=name)(x)
        conv = ShortConv(conv_size, name=f"conv_{name}")
        if cache is None:
            h = conv(h)
        else:
            h, new_cache[f"conv_{name}"] = conv(h, cache[f"conv_{name}"])
        streams[name] = split_heads(nn.silu(h), num_heads)
    return streams, new_cache
