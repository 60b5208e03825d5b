"""Mixture of memories (MoM; Du et al. 2025): a router sends each token to top-k of M memories."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers import initializers
from memjax.layers.conv import ShortConv, conv_silu_heads
from memjax.layers.delta_net import log_decay
from memjax.layers.heads import head_dim, l2_normalize, merge_heads, run_recurrent, split_heads
from memjax.layers.registry import MIXERS
from memjax.ops import delta_rule, delta_rule_step, linear_attention, linear_attention_step

FAMILIES = ("gated_deltanet", "deltanet", "linear_attention", "gla")
GLA_GATE_RANK, GLA_GATE_NORMALIZER = 16, 16.0  # as the `gla` mixer's defaults


def route(logits, top_k: int, renormalize: bool = True):
    """Router weights from ``logits [B, T, M]`` (float32 or wider): softmax over memories, keep
    the top k, and (``renormalize``, MoM's rule) rescale them to sum to 1; otherwise each kept
    weight is its softmax probability (Switch Transformer's rule). Returns ``(weights [B, T, M]
    zero outside the top k, probs [B, T, M], selected [B, T, M] bool)``.

    At top-1 the renormalised weight is exactly 1 whatever the logits, so the task loss sends the
    router no gradient (only the balance loss trains it); the probability itself does."""
    probs = jax.nn.softmax(logits, axis=-1)
    top, index = jax.lax.top_k(probs, top_k)
    selected = jnp.sum(jax.nn.one_hot(index, probs.shape[-1], dtype=jnp.int32), axis=-2) > 0
    weights = jnp.where(selected, probs, 0.0)
    if renormalize:
        weights = weights / jnp.sum(top, axis=-1, keepdims=True)
    return weights, probs, selected


def apply_capacity(selected, capacity: float, top_k: int, counts, start):
    """Drops assignments beyond each memory's capacity, in time order (causal, deterministic).

    The rule: token t (0-based position ``start + t`` in its sequence) keeps memory m if m
    accepted fewer than ``capacity * top_k * (position + 1) / M`` of the tokens before it, so over
    any prefix a memory holds at most its fair share times ``capacity``, plus one; a dropped
    assignment does not count. ``selected [B, T, M]`` bool, ``counts [B, M]`` accepted so far
    (int32), ``start`` the position of the first token. Returns ``(accepted [B, T, M], counts)``.
    """
    M = selected.shape[-1]

    def step(counts, xs):
        wanted, position = xs
        budget = capacity * top_k * (position + 1).astype(jnp.float32) / M
        accept = wanted & (counts.astype(jnp.float32) < budget)
        return counts + accept.astype(counts.dtype), accept

    positions = start + jnp.arange(selected.shape[1], dtype=jnp.int32)
    counts, accepted = jax.lax.scan(step, counts, (jnp.moveaxis(selected, 1, 0), positions))
    return jnp.moveaxis(accepted, 0, 1), counts


def load_balance_loss(probs, selected, top_k: int):
    """Switch-style balance ``M * sum_m f_m P_m``: f_m the fraction of top-k assignments that go
    to memory m, P_m its mean router probability (both over batch and time); 1 when balanced."""
    M = probs.shape[-1]
    fraction = jnp.mean(selected.astype(jnp.float32), axis=(0, 1)) / top_k
    return M * jnp.sum(fraction * jnp.mean(probs, axis=(0, 1)))


@MIXERS.register("mom")
class MixtureOfMemories(nn.Module):
    """MoM: M memories of one family, each token written to the top-k by a router.

    Per token, ``w = renormalised top-k of softmax(W_r x)`` (float32; with ``renormalize=False``
    the top-k probabilities as they are, which a top-1 router needs to learn from the task, see
    ``route``). Memory m has its own key, value and gate projections (``k, v = SiLU(ShortConv(W
    x))``, one Dense of width ``M * d_model`` each, memory-major) and reads with the shared
    query; its state advances and decays only on the tokens routed to it. The mixture's read is
    ``o_t = sum_m w_tm o_tm`` (plus the unweighted read of the shared memory, which every token
    writes, with ``shared_memory``), then the shared head RMSNorm, SiLU output gate and output
    projection, as Gated DeltaNet's.

    ``memory``: ``gated_deltanet`` (``S = exp(g)(I - beta k k^T) S + beta k v^T``, per-memory
    beta and decay projections, shared A_log and dt_bias), ``deltanet`` (no decay),
    ``linear_attention`` (``S = S + k v^T``) or ``gla`` (per-channel decay from a rank-16 map per
    memory, shared down-projection). q and k are L2-normalised and the output is gated in every
    family. With M = 1, top-1 and no shared memory, ``gated_deltanet`` is exactly that mixer.

    All memories are heads of one operator call (``(M + shared) * H`` heads): a token not routed
    to a memory has ``beta = 0`` (delta families) or ``k = 0`` (linear families) and ``g = 0``
    there, which leaves that memory's state exactly unchanged. Every memory thus costs the
    work of every token; the alternative, gathering each memory's tokens (capacity-bounded), saves
    a factor ``M / (top_k * capacity)`` of the recurrence work but needs sorting, gathers and a
    scatter back, and variable-length segments per memory: at the few memories MoM uses
    (M <= 8, top-2) the dense call is simpler, exact and jit-static (the bench measures it).

    Short convolutions run over the whole stream in time order before routing, so a memory's
    keys mix the previous tokens in time, never tokens of another sequence. ``capacity`` > 0
    drops assignments beyond ``capacity * top_k * t / M`` accepted tokens at position t (see
    ``apply_capacity``); dropped assignments keep their weight's absence (no renormalisation).

    Training sows the loss ``load_balance`` (``balance_weight`` times ``load_balance_loss``) and
    metrics ``share_<m>`` (fraction of accepted assignments per memory) and, with a capacity,
    ``dropped`` (fraction of assignments dropped). ``[B, T, d_model]`` in and out; decoding cache:
    the ``[B, (M + shared) H, K, K]`` states, the convolution histories, and with a capacity the
    accepted counts ``[B, M]`` and the position.
    """

    own_short_conv = True  # the block adds no short convolution in front (not a field)

    d_model: int
    num_heads: int = 2
    num_memories: int = 4
    top_k: int = 2
    renormalize: bool = True
    shared_memory: bool = False
    capacity: float = 0.0  # 0: no capacity limit
    memory: str = "gated_deltanet"
    balance_weight: float = 0.01
    conv_size: int = 4
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        self._check()
        H, M = self.num_heads, self.num_memories
        slots = M + int(self.shared_memory)  # routed memories, then the shared one
        router_dtype = jnp.promote_types(x.dtype, jnp.float32)  # at least float32
        weights, probs, selected = route(
            nn.Dense(M, use_bias=False, dtype=router_dtype, kernel_init=initializers.projection(),
                     name="router")(x.astype(router_dtype)), self.top_k, self.renormalize)
        accepted, counts = selected, None
        if self.capacity > 0:
            counts, start = ((jnp.zeros((x.shape[0], M), jnp.int32), 0) if cache is None
                             else (cache["counts"], cache["position"]))
            accepted, counts = apply_capacity(selected, self.capacity, self.top_k, counts, start)
            weights = jnp.where(accepted, weights, 0.0)
        if self.is_mutable_collection("losses"):
            self.sow("losses", "load_balance",
                     self.balance_weight * load_balance_loss(probs, selected, self.top_k))
        if self.is_mutable_collection("metrics"):
            self._sow_router_metrics(selected, accepted)

        q_stream, q_cache = conv_silu_heads(x, "q", H, self.conv_size, cache)
        kv, kv_cache = conv_silu_heads(x, "kv", slots * H, self.conv_size, cache,
                                       width=slots * self.d_model)
        # [B, T, slots * H]: 1 where the token writes the slot's heads (the shared memory: always)
        writes = jnp.concatenate([accepted, jnp.ones(accepted.shape[:2] + (slots - M,), bool)],
                                 axis=-1)
        writes = jnp.repeat(writes.astype(jnp.float32), H, axis=-1)
        q = l2_normalize(q_stream["q"])
        inputs = {"q": jnp.tile(q, (1, 1, slots, 1)), "k": l2_normalize(kv["k"]), "v": kv["v"]}
        op, step = self._inputs_for_family(x, inputs, writes, slots)
        options = {"impl": self.impl, "chunk_size": self.chunk_size}
        o, state = run_recurrent(op, step, None if cache is None else cache["state"], options,
                                 **inputs)
        o = o.reshape(*o.shape[:2], slots, H, o.shape[-1])
        mix = jnp.concatenate([weights, jnp.ones(weights.shape[:2] + (slots - M,))], axis=-1)
        o = jnp.einsum("btshd,bts->bthd", o, mix.astype(o.dtype))
        o = merge_heads(nn.RMSNorm(name="head_norm")(o))
        o = o * nn.silu(initializers.dense(self.d_model, name="gate")(x))
        y = initializers.dense_out(self.d_model, name="out")(o)
        if cache is None:
            return y
        new_cache = {"state": state, **q_cache, **kv_cache}
        if self.capacity > 0:
            new_cache |= {"counts": counts, "position": cache["position"] + x.shape[1]}
        return y, new_cache

    def _inputs_for_family(self, x, inputs, masked, slots):
        """Adds the family's gates to ``inputs`` (times ``masked [B, T, slots * H]``, the
        writes) and returns its operator and step. Unrouted tokens: beta = 0 or k = 0, and
        g = 0."""
        H = self.num_heads
        if self.memory in ("gated_deltanet", "deltanet"):
            beta = initializers.dense(slots * H, name="beta", bias=True)(x)
            inputs["beta"] = jax.nn.sigmoid(beta.astype(jnp.float32)) * masked
            if self.memory == "gated_deltanet":
                g = log_decay(self, x, H, copies=slots)
                inputs["g"] = g.reshape(*g.shape[:2], slots * H) * masked
            return delta_rule, delta_rule_step
        inputs["k"] = inputs["k"] * masked[..., None].astype(inputs["k"].dtype)
        if self.memory == "gla":
            gate = initializers.dense(GLA_GATE_RANK, name="gate_down")(x)
            gate = initializers.dense(slots * self.d_model, name="gate_up", bias=True)(gate)
            g = jax.nn.log_sigmoid(gate.astype(jnp.float32)) / GLA_GATE_NORMALIZER
            inputs["g"] = split_heads(g, slots * H) * masked[..., None]
        return linear_attention, linear_attention_step

    def _sow_router_metrics(self, selected, accepted):
        share = jnp.mean(accepted.astype(jnp.float32), axis=(0, 1)) / self.top_k
        for m in range(self.num_memories):
            self.sow("metrics", f"share_{m}", share[m])
        if self.capacity > 0:
            dropped = jnp.sum(selected & ~accepted) / jnp.maximum(jnp.sum(selected), 1)
            self.sow("metrics", "dropped", dropped.astype(jnp.float32))

    def _check(self):
        head_dim(self.d_model, self.num_heads)
        if self.memory not in FAMILIES:
            raise ValueError(f"mom: unknown memory family {self.memory!r}; known: "
                             f"{', '.join(FAMILIES)}")
        if not 1 <= self.top_k <= self.num_memories:
            raise ValueError(f"mom: top_k must be in [1, num_memories = {self.num_memories}], "
                             f"got {self.top_k}")

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        self._check()
        slots = self.num_memories + int(self.shared_memory)
        dim = head_dim(self.d_model, self.num_heads)
        conv = ShortConv(self.conv_size, parent=None)
        cache = {"state": jnp.zeros((batch_size, slots * self.num_heads, dim, dim), jnp.float32),
                 "conv_q": conv.init_cache(batch_size, self.d_model),
                 **{f"conv_{n}": conv.init_cache(batch_size, slots * self.d_model)
                    for n in ("k", "v")}}
        if self.capacity > 0:
            cache |= {"counts": jnp.zeros((batch_size, self.num_memories), jnp.int32),
                      "position": jnp.zeros((), jnp.int32)}
        return cache
