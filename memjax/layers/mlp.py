"""Gated MLP (SwiGLU) channel mixer."""

import flax.linen as nn


class GatedMLP(nn.Module):
    """`y = W_down (silu(W_gate x) * W_up x)`; input and output `[..., d_model]`."""

    d_model: int
    hidden: int

    @nn.compact
    def __call__(self, x):
        gate = nn.Dense(self.hidden, use_bias=False, name="gate")(x)
        up = nn.Dense(self.hidden, use_bias=False, name="up")(x)
        return nn.Dense(self.d_model, use_bias=False, name="down")(nn.silu(gate) * up)
