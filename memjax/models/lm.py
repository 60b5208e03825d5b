"""Language-model backbone: embedding, pre-norm blocks around token mixers, LM head."""

import functools

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


# `model.remat`: how a block's activations are kept for the backward pass. "none" keeps what
# autodiff keeps; "full" recomputes the whole block in the backward pass (only its input is
# saved); the others save what the `jax.checkpoint_policies` policy of that name saves.
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Collections layers sow into (memjax.train.step reads `losses` and `metrics`).
SOWN_COLLECTIONS = ("losses", "metrics", "intermediates")
# Name of the scanned stack of blocks (`scan_layers`): params["blocks"]["block_<j>"].
SCANNED = "blocks"


def block_class(remat: str, prevent_cse: bool = True):
    """`Block`, or `nn.remat(Block)` with the policy `remat` names (REMAT_POLICIES)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat {remat!r}; known: {', '.join(REMAT_POLICIES)}")
    if remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


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

    `scan_layers` (default False): apply the blocks with `nn.scan` over num_layers / p
    repetitions of one period of p blocks (`scan_period()`: 1 when every block is alike, else
    the pattern's period), so compile time stops growing with depth. Same function, other
    layouts:
      parameters: `params["blocks"]["block_<j>"]` (j < p) with every leaf stacked on a leading
        axis of num_layers / p (layer i = repetition i // p, position i % p) instead of
        `params["block_<i>"]`. Checkpoints of one layout do not load into the other (the train
        checkpoint compares `model.scan_layers`; applying parameters of the other layout raises
        a ValueError); `stack_params` / `unstack_params` convert. The scanned init draws other
        random values than the loop's.
      decoding cache: `cache["blocks"]` holds p caches, each stacked over the repetitions
        (`stack_layers` / `unstack_layers` convert from / to the loop's one cache per block).
      sown collections (`losses`, `metrics`, `intermediates`): given back per layer, at
        `blocks/block_<i>/...` instead of `block_<i>/...` (the values the loop sows, not stacked
        ones), so the train step adds each layer's auxiliary loss as the loop does (a sum over
        layers, not a mean) and reports per-layer metrics under `aux/blocks/block_<i>/...`.
    `remat` (default "none"): recompute block activations in the backward pass, every block
    wrapped in `nn.remat`: "full" (save only the block's input), or a policy of
    `jax.checkpoint_policies`: "dots_saveable", "nothing_saveable",
    "dots_with_no_batch_dims_saveable" (REMAT_POLICIES). Same values and gradients; less memory,
    more compute. Works with and without `scan_layers`.
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
    scan_layers: bool = False
    remat: str = "none"

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
        self._check_params_layout()
        block_caches = []
        if self.scan_layers:
            x, block_caches = self._scan_blocks(x, None if cache is None else cache["blocks"])
        else:
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
        """One Block per layer: submodules `block_<i>` inside `__call__` (`named`, wrapped in
        `nn.remat` as `remat` says), else unbound."""
        where = (lambda i: {"name": f"block_{i}"}) if named else (lambda i: {"parent": None})
        cls = block_class(self.remat) if named else Block
        return [cls(self.d_model, mixer, self.short_conv, self.mlp_ratio, self.norm,
                    self.stack_short_convs, **where(i))
                for i, mixer in enumerate(self.layer_mixers())]

    def scan_period(self) -> int:
        """The shortest period p of the blocks' mixers (block i is block i mod p; p divides
        num_layers): `scan_layers` scans num_layers / p repetitions of p blocks."""
        mixers = self.layer_mixers()
        return next(p for p in range(1, len(mixers) + 1)
                    if len(mixers) % p == 0 and mixers == mixers[:p] * (len(mixers) // p))

    def _scan_blocks(self, x, caches):
        """The blocks as `nn.scan` over num_layers / p repetitions of one period (`_Period`).

        Parameters and sown collections gain a leading repetition axis inside the scan; the
        sown ones are given back per layer (`block_<i>` under `blocks/`, see the class doc), so
        a train step reduces them exactly as the loop's. `caches`: one cache per position of
        the period, stacked over the repetitions (`init_cache`), or None.
        """
        period = self.scan_period()
        axes = {"params": 0, **dict.fromkeys(SOWN_COLLECTIONS, 0)}
        scanned = nn.scan(_Period, variable_axes=axes,
                          split_rngs={"params": True, "dropout": True}, in_axes=0, out_axes=0,
                          length=self.num_layers // period)
        per_layer = nn.map_variables(
            scanned, SOWN_COLLECTIONS, mutable=True,
            trans_in_fn=functools.partial(_map_collections, fn=functools.partial(
                _restack_sown, period=period)),
            trans_out_fn=functools.partial(_map_collections, fn=functools.partial(
                _unstack_sown, period=period)))
        return per_layer(self.d_model, tuple(self.layer_mixers()[:period]), self.short_conv,
                         self.mlp_ratio, self.norm, self.stack_short_convs, self.remat,
                         name=SCANNED)(x, caches)

    def _check_params_layout(self):
        """A clear error for parameters of the other layout (`scan_layers` on vs off)."""
        if self.is_initializing() or not self.has_variable("params", "final_norm"):
            return
        params = self.variables["params"]
        if self.scan_layers and "block_0" in params:
            raise ValueError("these parameters have one entry per layer (block_<i>) but the model "
                             "has scan_layers = True (stacked under 'blocks'): convert them with "
                             "memjax.models.lm.stack_params or set scan_layers = False")
        if not self.scan_layers and SCANNED in params:
            raise ValueError("these parameters are stacked over layers (scan_layers = True) but "
                             "the model has scan_layers = False: convert them with "
                             "memjax.models.lm.unstack_params or set scan_layers = True")

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        """An empty decoding cache for `batch_size` sequences of up to `max_len` tokens.

        `"blocks"`: one cache per block; with `scan_layers`, one per position of the period
        (`scan_period()`), each stacked over the repetitions on a leading axis (see
        `stack_layers` / `unstack_layers` to convert between the two)."""
        blocks = [block.init_cache(batch_size, max_len) for block in self._blocks()]
        if self.scan_layers:
            blocks = stack_layers(blocks, self.scan_period())
        return {"length": jnp.zeros((), jnp.int32), "blocks": blocks}

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


class _Period(nn.Module):
    """One period of the layer pattern, blocks `block_<j>` (j < len(mixers)): the body that
    `LanguageModel(scan_layers=True)` scans. `(x, caches or None) -> (x, new caches or None)`."""

    d_model: int
    mixers: tuple
    short_conv: int
    mlp_ratio: float
    norm: str
    stack_short_convs: bool
    remat: str

    @nn.compact
    def __call__(self, x, caches):
        cls = block_class(self.remat, prevent_cse=False)  # scan already keeps remat apart
        new_caches = []
        for j, mixer in enumerate(self.mixers):
            block = cls(self.d_model, mixer, self.short_conv, self.mlp_ratio, self.norm,
                        self.stack_short_convs, name=f"block_{j}")
            if caches is None:
                x = block(x)
            else:
                x, block_cache = block(x, caches[j])
                new_caches.append(block_cache)
        return x, (None if caches is None else new_caches)


def stack_layers(per_layer: list, period: int) -> list:
    """Per-layer pytrees (layer i = repetition i // period, position i % period) -> `period`
    pytrees, each stacked over the repetitions on a new leading axis."""
    if len(per_layer) % period:
        raise ValueError(f"{len(per_layer)} layers do not repeat a period of {period}")
    return [jax.tree.map(lambda *leaves: jnp.stack([jnp.asarray(v) for v in leaves]),
                         *per_layer[j::period]) for j in range(period)]


def unstack_layers(stacked: list) -> list:
    """The inverse of `stack_layers`: `period` stacked pytrees -> one pytree per layer."""
    repeats = len(jax.tree.leaves(stacked[0])[0]) if jax.tree.leaves(stacked[0]) else 1
    return [jax.tree.map(lambda leaf: leaf[r], stacked[j])
            for r in range(repeats) for j in range(len(stacked))]


def _block_index(key) -> int | None:
    key = str(key)
    return int(key[len("block_"):]) if key.startswith("block_") and key[6:].isdigit() else None


def stack_params(params: dict, period: int = 1) -> dict:
    """Parameters of `LanguageModel(scan_layers=False)` (`block_<i>`, i < num_layers) -> those
    of `scan_layers=True`: `params["blocks"]["block_<j>"]` (j < period, the model's
    `scan_period()`) with leaves stacked over the num_layers / period repetitions."""
    params = dict(params)
    count = sum(_block_index(k) is not None for k in params)
    blocks = [params.pop(f"block_{i}") for i in range(count)]
    return params | {SCANNED: {f"block_{j}": tree
                               for j, tree in enumerate(stack_layers(blocks, period))}}


def unstack_params(params: dict) -> dict:
    """The inverse of `stack_params`: stacked `blocks/block_<j>` -> `block_<i>` per layer."""
    params = dict(params)
    stacked = params.pop(SCANNED)
    trees = [stacked[f"block_{j}"] for j in range(len(stacked))]
    return params | {f"block_{i}": tree for i, tree in enumerate(unstack_layers(trees))}


def _map_collections(variables, fn):
    """Applies `fn` to every collection of a `{collection: tree}` mapping (nn.map_variables)."""
    return {col: fn(tree) for col, tree in variables.items()}


def _unstack_sown(tree, period: int) -> dict:
    """Sown values of the scanned period (`block_<j>`, leaves `[repeats, ...]`) -> per layer
    `block_<r * period + j>` with the repetition axis indexed away."""
    out = {}
    for key, sub in dict(tree).items():
        j = _block_index(key)
        if j is None:  # not a block (nothing else sows inside the scan); keep as is
            out[key] = sub
            continue
        leaves = jax.tree.leaves(sub)
        repeats = leaves[0].shape[0] if leaves else 0
        for r in range(repeats):
            out[f"block_{r * period + j}"] = jax.tree.map(lambda leaf: leaf[r], sub)
    return out


def _restack_sown(tree, period: int) -> dict:
    """The inverse of `_unstack_sown` (values sown earlier in the same apply, if any)."""
    out, per_layer = {}, {}
    for key, sub in dict(tree).items():
        i = _block_index(key)
        if i is None:
            out[key] = sub
        else:
            per_layer[i] = sub
    for j in range(period):
        layers = [per_layer[i] for i in sorted(per_layer) if i % period == j]
        if layers:
            out[f"block_{j}"] = jax.tree.map(lambda *leaves: jnp.stack(leaves), *layers)
    return out
