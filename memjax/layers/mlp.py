"""Gated MLP (SwiGLU) channel mixer."""

import flax.linen as nn

from memjax.layers import initializers


class GatedMLP(nn.Module):
    """`y = W_down (silu(W_gate x) * W_up x)`; input and output `[..., d_model]`."""

    d_model: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        gate = initializers.dense(self.hidden, name="gate")(x)
        up = initializers.dense(self.hidden, name="up")(x)
        return initializers.dense_out(self.d_model, name="down")(nn.silu(gate) * up)
