"""Short causal depthwise convolution (token shift generalised to a few taps)."""

import flax.linen as nn
import jax.numpy as jnp


class ShortConv(nn.Module):
    """`y_t = sum_{i<kernel_size} w_i * x_{t-i} + b` per channel; input and output `[B, T, D]`.

    Causal: position t sees only itself and the `kernel_size - 1` positions before it, which
    lets a following mixer combine each token with its predecessors (needed for recall).
    """

    kernel_size: int

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        weight = self.param("weight", nn.initializers.normal(self.kernel_size**-0.5), (self.kernel_size, channels))
        bias = self.param("bias", nn.initializers.zeros, (channels,))
        padded = jnp.pad(x, ((0, 0), (self.kernel_size - 1, 0), (0, 0)))
        seq_len = x.shape[1]
        # taps[i] is x shifted right by i; kernel_size is small so a sum of shifts beats a conv op.
        y = sum(weight[i] * padded[:, self.kernel_size - 1 - i : self.kernel_size - 1 - i + seq_len]
                for i in range(self.kernel_size))
        return y + bias
