"""Language-model backbone: embedding, pre-norm blocks around token mixers, LM head."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers import GatedMLP, ShortConv, build_mixer, initializers
from memjax.layers.cache import cache_bytes
from memjax.layers.registry import has_own_short_conv
from memjax.models.registry import MODELS


def _norm(kind: str, name: str) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(name=name)
    if kind == "rmsnorm":
        return nn.RMSNorm(name=name)
    raise ValueError(f"unknown norm {kind!r}; known: layernorm, rmsnorm")


class Block(nn.Module):
    """`h = x + mixer(conv(norm(x)))`, then `h + mlp(norm(h))` when the MLP is on. `[B, T, D]`.

    The short convolution (width `short_conv`, 0 = none) is left out in front of mixers that
    convolve their own projections (DeltaNet, Mamba, ...: `own_short_conv`), unless
    `stack_short_convs` keeps both (the layout before this rule; an ablation).
    With `cache` (`{"conv": ..., "mixer": ...}`) x continues the cached tokens; returns `(x, cache)`.
    """

    d_model: int
    mixer: dict
    short_conv: int
    mlp_ratio: float
    norm: str
    stack_short_convs: bool = False

    def _has_conv(self) -> bool:
        return bool(self.short_conv) and (self.stack_short_convs
                                          or not has_own_short_conv(self.mixer["name"]))

    @nn.compact
    def __call__(self, x, cache=None):
        new_cache = {}
        h = _norm(self.norm, "mixer_norm")(x)
        if self._has_conv():
            conv = ShortConv(self.short_conv, name="short_conv")
            if cache is None:
                h = conv(h)
            else:
                h, new_cache["conv"] = conv(h, cache["conv"])
        mixer = build_mixer(self.d_model, self.mixer, name="mixer")
        if cache is None:
            x = x + mixer(h)
        else:
            y, new_cache["mixer"] = mixer(h, cache["mixer"])
            x = x + y
        if self.mlp_ratio:
            hidden = int(self.mlp_ratio * self.d_model)
            x = x + GatedMLP(self.d_model, hidden, name="mlp")(_norm(self.norm, "mlp_norm")(x))
        return x if cache is None else (x, new_cache)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        cache = {"mixer": build_mixer(self.d_model, self.mixer, parent=None).init_cache(batch_size, max_len)}
        if self._has_conv():
            cache["conv"] = ShortConv(self.short_conv, parent=None).init_cache(batch_size, self.d_model)
        return cache


@MODELS.register("lm")
class LanguageModel(nn.Module):
    """A stack of `num_layers` blocks over token embeddings (or projected float inputs).

    `__call__(tokens [B, T] int, positions=None)` returns logits `[B, T, vocab]`, or only at
    `positions [B, M]` (`[B, M, vocab]`): tasks supervised at few positions (MQAR queries) then
    skip the vocab-sized product everywhere else.
    Decoding: `cache = model.init_cache(B, max_len)`, then `logits, cache = model.apply(params,
    tokens, cache=cache)` for a prompt (prefill) and again for each new token; the logits equal
    those of one forward pass over the whole sequence. `pos_emb="learned"` adds absolute position
    embeddings up to `max_len`; `"none"` relies on the mixers (and short convolution) for order.

    Continuous inputs and outputs (in-context regression and the like):
      `input_dim = 0` (default): `tokens` are int ids `[B, T]` looked up in the `embed` table.
      `input_dim = n > 0`: `tokens` are floats `[B, T, n]`, mapped to `[B, T, d_model]` by a Dense
        layer `input_proj` (with bias); no embedding table unless the output is tied to one.
      `output_dim = 0` (default): vocab logits, from the embedding (`tie_embeddings`, which then
        needs the table even with float inputs) or a bias-free Dense `lm_head`.
      `output_dim = o > 0`: a Dense regression head `head` (with bias) of width o: `[B, T, o]`.
    Token models (both 0) have exactly the parameters, outputs and cache they had before these
    options existed. Prefill-then-decode works the same for float inputs (`[B, t, n]` chunks).

    Layers: every block uses `mixer` (options with a `name`), unless `layers` names a mixer per
    block: a pattern of mixer kinds (a string, kinds separated by "," or "+", or a sequence)
    repeated to `num_layers`, each kind's options in `mixers[kind]`. E.g. `layers="swa,deltanet"`
    with 4 layers is swa, deltanet, swa, deltanet (a hybrid stack).

    `init_scheme` (`config.model.init`): how every layer initialises its parameters,
    `"reference"` (normal(0.02), output projections 0.02 / sqrt(2 num_layers)) or `"flax"`;
    see `memjax.layers.initializers`.
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
    input_dim: int = 0
    output_dim: int = 0
    init_scheme: str = "reference"
    layers: str | tuple = ()
    mixers: dict | None = None
    stack_short_convs: bool = False

    @nn.compact
    def __call__(self, tokens, positions=None, cache=None):
        # Every initialiser the layers call while `init` runs follows the configured scheme.
        with initializers.init_scheme(self.init_scheme, self.num_layers):
            return self._forward(tokens, positions, cache)

    def _forward(self, tokens, positions, cache):
        self._check_io(tokens)
        embed = None
        if not self.input_dim or (not self.output_dim and self.tie_embeddings):
            embed = nn.Embed(self.vocab_size, self.d_model,
                             embedding_init=initializers.embedding(), name="embed")
        if self.input_dim:
            x = initializers.dense(self.d_model, name="input_proj", bias=True)(
                tokens.astype(jnp.float32))
        else:
            x = embed(tokens)
        if self.pos_emb == "learned":
            if tokens.shape[1] > self.max_len:
                raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len {self.max_len}"
                                 " of the learned position embedding")
            table = self.param("pos_embed", initializers.embedding(), (self.max_len, self.d_model))
            start = 0 if cache is None else cache["length"]
            x = x + jax.lax.dynamic_slice_in_dim(table, start, tokens.shape[1])
        elif self.pos_emb != "none":
            raise ValueError(f"unknown pos_emb {self.pos_emb!r}; known: none, learned")
        block_caches = []
        for i, block in enumerate(self._blocks(named=True)):
            if cache is None:
                x = block(x)
            else:
                x, block_cache = block(x, cache["blocks"][i])
                block_caches.append(block_cache)
        x = _norm(self.norm, "final_norm")(x)
        if positions is not None:
            x = jnp.take_along_axis(x, positions[..., None], axis=1)
        if self.output_dim:
            logits = initializers.dense(self.output_dim, name="head", bias=True)(x)
        elif self.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = initializers.dense(self.vocab_size, name="lm_head")(x)
        if cache is None:
            return logits
        return logits, {"length": cache["length"] + tokens.shape[1], "blocks": block_caches}

    def _check_io(self, tokens):
        for field in ("input_dim", "output_dim"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.input_dim:
            if tokens.ndim != 3 or tokens.shape[-1] != self.input_dim:
                raise ValueError(f"input_dim = {self.input_dim} expects float inputs [B, T, "
                                 f"{self.input_dim}], got shape {tokens.shape}")
        needs_vocab = not self.input_dim or not self.output_dim  # an embedding or vocab logits
        if needs_vocab and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1 for token inputs or vocab logits, got "
                             f"{self.vocab_size}")

    def layer_mixers(self) -> list[dict]:
        """The mixer options of each of the `num_layers` blocks (see the class docstring)."""
        kinds = layer_kinds(self.layers)
        if not kinds:
            if not self.mixer:
                raise ValueError("model.mixer is empty and model.layers names no mixers: give "
                                 "one of them (configs: model=<mixer> or model=<a>+<b>)")
            return [self.mixer] * self.num_layers
        if self.num_layers % len(kinds):
            raise ValueError(f"layers pattern {list(kinds)} ({len(kinds)} kinds) does not repeat "
                             f"evenly to num_layers = {self.num_layers}")
        missing = sorted(set(kinds) - set(self.mixers or {}))
        if missing:
            raise ValueError(f"layers names {missing} but model.mixers has options only for "
                             f"{sorted(self.mixers or {})}: give every kind its entry")
        return [dict(self.mixers[kind]) for kind in kinds] * (self.num_layers // len(kinds))

    def _blocks(self, named: bool = False) -> list[Block]:
        """One Block per layer: submodules `block_<i>` inside `__call__` (`named`), else unbound."""
        where = (lambda i: {"name": f"block_{i}"}) if named else (lambda i: {"parent": None})
        return [Block(self.d_model, mixer, self.short_conv, self.mlp_ratio, self.norm,
                      self.stack_short_convs, **where(i))
                for i, mixer in enumerate(self.layer_mixers())]

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """An empty decoding cache for `batch_size` sequences of up to `max_len` tokens."""
        return {"length": jnp.zeros((), jnp.int32),
                "blocks": [block.init_cache(batch_size, max_len) for block in self._blocks()]}

    def state_size(self, seq_len: int) -> int:
        """Bytes of the decoding cache of one sequence after `seq_len` tokens: every layer's
        mixer state and convolution history plus the position counters (from the shapes of
        `init_cache`, so it cannot drift from what decoding keeps)."""
        return cache_bytes(self, seq_len)


def layer_kinds(layers: str | tuple) -> tuple[str, ...]:
    """`"swa,deltanet"` / `"swa+deltanet"` / `("swa", "deltanet")` -> `("swa", "deltanet")`."""
    if isinstance(layers, str):
        layers = layers.replace("+", ",").split(",")
    return tuple(kind.strip() for kind in layers if kind.strip())
