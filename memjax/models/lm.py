"""Language-model backbone: embedding, pre-norm blocks around a named token mixer, LM head."""

import flax.linen as nn
import jax.numpy as jnp

from memjax.layers import GatedMLP, ShortConv, build_mixer
from memjax.models.registry import MODELS

FLOAT32_BYTES = 4


def _norm(kind: str, name: str) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(name=name)
    if kind == "rmsnorm":
        return nn.RMSNorm(name=name)
    raise ValueError(f"unknown norm {kind!r}; known: layernorm, rmsnorm")


class Block(nn.Module):
    """`h = x + mixer(conv(norm(x)))`, then `h + mlp(norm(h))` when the MLP is on. `[B, T, D]`."""

    d_model: int
    mixer: dict
    short_conv: int
    mlp_ratio: float
    norm: str

    @nn.compact
    def __call__(self, x):
        h = _norm(self.norm, "mixer_norm")(x)
        if self.short_conv:
            h = ShortConv(self.short_conv, name="short_conv")(h)
        x = x + build_mixer(self.d_model, self.mixer, name="mixer")(h)
        if self.mlp_ratio:
            hidden = int(self.mlp_ratio * self.d_model)
            x = x + GatedMLP(self.d_model, hidden, name="mlp")(_norm(self.norm, "mlp_norm")(x))
        return x


@MODELS.register("lm")
class LanguageModel(nn.Module):
    """A stack of `num_layers` blocks over token embeddings.

    `__call__(tokens [B, T] int, positions=None)` returns logits `[B, T, vocab]`, or only at
    `positions [B, M]` (`[B, M, vocab]`): tasks supervised at few positions (MQAR queries) then
    skip the vocab-sized product everywhere else. `pos_emb="learned"` adds absolute position
    embeddings up to `max_len`; `"none"` relies on the mixers (and short convolution) for order.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    mixer: dict
    short_conv: int = 4
    mlp_ratio: float = 0.0
    norm: str = "layernorm"
    pos_emb: str = "none"
    max_len: int = 0
    tie_embeddings: bool = True

    @nn.compact
    def __call__(self, tokens, positions=None):
        embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=nn.initializers.normal(0.02),
                         name="embed")
        x = embed(tokens)
        if self.pos_emb == "learned":
            if tokens.shape[1] > self.max_len:
                raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {self.max_len}"
                                 " of the learned position embedding")
            table = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.d_model))
            x = x + table[: tokens.shape[1]]
        elif self.pos_emb != "none":
            raise ValueError(f"unknown pos_emb {self.pos_emb!r}; known: none, learned")
        for i in range(self.num_layers):
            x = Block(self.d_model, self.mixer, self.short_conv, self.mlp_ratio, self.norm,
                      name=f"block_{i}")(x)
        x = _norm(self.norm, "final_norm")(x)
        if positions is not None:
            x = jnp.take_along_axis(x, positions[..., None], axis=1)
        if self.tie_embeddings:
            return embed.attend(x)
        return nn.Dense(self.vocab_size, use_bias=False, name="lm_head")(x)

    def state_size(self, seq_len: int) -> int:
        """Bytes of recurrent state to decode after `seq_len` tokens: mixers plus conv buffers."""
        mixer = build_mixer(self.d_model, self.mixer, parent=None)  # unbound: only reads fields
        conv = (self.short_conv - 1) * self.d_model * FLOAT32_BYTES if self.short_conv else 0
        return self.num_layers * (mixer.state_size(seq_len) + conv)
