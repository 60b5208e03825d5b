"""B'MOJO (Zancato et al. 2024, "B'MOJO: Hybrid State Space Realizations of Foundation Models
with Eidetic and Fading Memory"): sliding-window attention, a fading recurrent memory of the
tokens that left the window, and a few "eidetic" past tokens kept exactly because the memory
predicted them worst."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers import initializers
from memjax.layers.attention import Attention
from memjax.layers.heads import head_dim
from memjax.layers.hippocampus import MEMORIES, Hippocampus, absorb_evicted, memory_readout
from memjax.layers.registry import MIXERS
from memjax.ops import delta_rule


def outranked(surprise, position, valid):
    """How many candidates beat each candidate, counted over growing prefixes of the list.

    surprise ``[B, C]`` (float), position ``[B, C]`` (int), valid ``[B, C]`` (bool). Candidate i
    beats j when it is valid and ``(e_i, p_i) > (e_j, p_j)`` lexicographically: the larger
    surprise, and on a tie the more recent token (distinct positions make this a total order).
    Returns ``[B, C, C]`` int32: entry ``[c, j]`` = number of the first ``c + 1`` candidates
    that beat candidate j. O(C^2) memory and work.
    """
    e_i, e_j = surprise[:, :, None], surprise[:, None, :]
    p_i, p_j = position[:, :, None], position[:, None, :]
    beats = valid[:, :, None] & ((e_i > e_j) | ((e_i == e_j) & (p_i > p_j)))
    return jnp.cumsum(beats.astype(jnp.int32), axis=1)


def eidetic_mask(surprise, position, valid, horizon, eidetic: int):
    """Which candidates are eidetic for each query: ``([B, Tq, C] bool, rank [B, C])``.

    Candidates (``[B, C]`` as in ``outranked``) are listed so that the tokens a query may pick
    from are a prefix: query i may pick from the first ``horizon[i]`` (``[Tq]`` int). Candidate
    j is eidetic for query i iff it is valid, within the prefix, and fewer than ``eidetic``
    candidates of the prefix beat it (it is among the prefix's top ``eidetic`` by (surprise,
    position)). ``rank``: how many of all C candidates beat each one (0 = most surprising).
    """
    counts = outranked(surprise, position, valid)
    rows = jnp.take(counts, jnp.clip(horizon - 1, 0, counts.shape[1] - 1), axis=1)  # [B, Tq, C]
    in_prefix = jnp.arange(counts.shape[2])[None, :] < horizon[:, None]
    return valid[:, None, :] & in_prefix[None] & (rows < eidetic), counts[:, -1]


def parallel_eidetic_mask(surprise, window: int, eidetic: int):
    """The eidetic tokens of every query of a sequence at once: ``[B, T, T]`` bool from the
    surprise ``[B, T]`` of each token (the entries of tokens j > T - 1 - window, which never
    leave the window, are not read). Token j is eidetic for query t iff ``j <= t - window``
    and ``#{i <= t - window : (e_i, i) > (e_j, j)} < eidetic``. O(T^2) (a [T, T] comparison
    and its prefix sums); B'MOJO's exact form is sequential, this is its parallel equivalent.
    """
    B, T = surprise.shape
    position = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    horizon = jnp.clip(jnp.arange(T, dtype=jnp.int32) - window + 1, 0, T)
    mask, _ = eidetic_mask(surprise, position, jnp.ones((B, T), bool), horizon, eidetic)
    return mask


def masked_attention(q, k, v, visible):
    """Softmax attention under an explicit mask: q ``[B, T, H, d]``, k, v ``[B, S, H, d]``,
    visible ``[B, T, S]`` (every query must see a key) -> ``[B, T, H, d]`` in v's dtype.
    Logits and softmax in float32 (float64 for float64 inputs), as ``softmax_attention``."""
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=compute_dtype)
    logits = jnp.where(visible[:, None], logits * q.shape[-1] ** -0.5, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhts,bshv->bthv", weights, v.astype(compute_dtype))
    return o.astype(v.dtype)


class EideticAttention(nn.Module):
    """Attention's parameters and window (submodule ``attention``: the fused ``qkv`` and
    ``out`` Dense layers of ``Attention``), with each query also seeing its eidetic tokens.

    ``__call__(x, surprise)``: ``surprise [B, T]`` of the tokens that leave the window as the
    T tokens of x arrive (entry i: the token ``window`` positions before x's token i).
    ``__call__(x, surprise, cache, slots)``: x continues the cached tokens; ``cache`` is
    Attention's window buffer (its last ``window`` keys and values and the length), ``slots``
    the eidetic buffer: ``eidetic`` kept keys and values with their surprise and position
    (position -1 marks an empty slot). Returns ``(y, cache, slots)``.
    """

    d_model: int
    num_heads: int
    window: int
    eidetic: int

    @nn.compact
    def __call__(self, x, surprise, cache=None, slots=None):
        B, T, _ = x.shape
        W, E = self.window, self.eidetic
        width = head_dim(self.d_model, self.num_heads)
        qkv = initializers.dense(3 * self.d_model, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(B, T, self.num_heads, 3 * width), 3, axis=-1)
        out = initializers.dense_out(self.d_model, name="out")
        t = jnp.arange(T, dtype=jnp.int32)
        if cache is None:
            # Token j's surprise is entry j + W of the absorbed stream (W zeros in front); the
            # last min(W, T) tokens never leave the window and are never read.
            lag = min(W, T)
            surprise = jnp.concatenate([surprise[:, lag:], jnp.zeros_like(surprise[:, :lag])],
                                       axis=1)
            band = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - W)
            visible = band[None] | parallel_eidetic_mask(surprise, W, E)
            o = masked_attention(q, k, v, visible)
            return out(o.reshape(B, T, -1))
        # Keys: the E eidetic slots, then the window buffer (positions start - W ...) and the
        # new tokens. Candidates: the slots (the top E of every token that left the window
        # before this call), then the T tokens that leave it during the call, oldest first,
        # so query i picks from the first E + i + 1 (the top E of a union is the top E of the
        # union of the parts' top E: the slots are exact).
        start = cache["length"]
        keys = jnp.concatenate([cache["k"], k.astype(cache["k"].dtype)], axis=1)
        values = jnp.concatenate([cache["v"], v.astype(cache["v"].dtype)], axis=1)
        joined_position = start - W + jnp.arange(W + T, dtype=jnp.int32)
        candidates = {"k": jnp.concatenate([slots["k"], keys[:, :T]], axis=1),
                      "v": jnp.concatenate([slots["v"], values[:, :T]], axis=1),
                      "surprise": jnp.concatenate(
                          [slots["surprise"], surprise.astype(slots["surprise"].dtype)], axis=1),
                      "position": jnp.concatenate(
                          [slots["position"], jnp.broadcast_to(joined_position[:T], (B, T))],
                          axis=1)}
        valid = candidates["position"] >= 0
        eidetic, rank = eidetic_mask(candidates["surprise"], candidates["position"], valid,
                                     E + t + 1, E)
        query = start + t
        band = ((joined_position[None, :] >= 0) & (joined_position[None, :] <= query[:, None])
                & (joined_position[None, :] > query[:, None] - W))
        visible = jnp.concatenate([eidetic, jnp.zeros((B, T, W), bool)], axis=2)
        visible = visible | jnp.concatenate([jnp.zeros((T, E), bool), band], axis=1)[None]
        o = masked_attention(q, jnp.concatenate([slots["k"], keys], axis=1),
                             jnp.concatenate([slots["v"], values], axis=1), visible)
        # The next slots: the top E candidates, most surprising first (empty ones last).
        order = jnp.argsort(jnp.where(valid, rank, rank.shape[1] + jnp.arange(rank.shape[1])),
                            axis=1)[:, :E]
        kept = jnp.take_along_axis(valid, order, axis=1)
        new_slots = {n: jnp.take_along_axis(a, order.reshape(*order.shape, *[1] * (a.ndim - 2)),
                                            axis=1) for n, a in candidates.items()}
        new_slots["surprise"] = jnp.where(kept, new_slots["surprise"], 0.0)
        new_slots["position"] = jnp.where(kept, new_slots["position"], -1)
        new_cache = {"k": keys[:, T:], "v": values[:, T:], "length": start + T}
        return out(o.astype(x.dtype).reshape(B, T, -1)), new_cache, new_slots


@MIXERS.register("bmojo")
class BMojo(nn.Module):
    """B'MOJO: exact attention over the last ``window`` tokens and over ``eidetic`` tokens
    from before it, plus a fading memory of every token that left the window.

    ``[B, T, d_model]`` in and out. With W = ``window``, E = ``eidetic``, H = ``num_heads``
    heads of width d::

        y = W_o Attention_{W + eidetic}(x) + W_out(RMSNorm(o) * silu(W_g x))

    Fading memory: exactly the memory of ``hippocampus`` (same parameters and names): a (Gated)
    DeltaNet over q, k, v = SiLU(ShortConv(W x)) (q, k L2-normalised), ``beta = sigmoid(w_b
    x)``, gated ``g = -exp(A_log) softplus(w_a x + dt_bias)``, absorbing token j = t - W when
    token t arrives::

        S_t = exp(g_j) (I - beta_j k_j k_j^T) S_{t-1} + beta_j k_j v_j^T
        o_t = S_t^T q_t / sqrt(d)

    Surprise (innovation) of token j, when it is absorbed: the error of the memory's own
    prediction of v_j, the delta rule's correction term ``u_j / beta_j``, averaged over heads::

        e_j = mean_h || v_j - exp(g_j) S_{t-1}^T k_j ||^2        (DeltaNet: g = 0)

    i.e. against the state the update corrects (the previous state, decayed by token j's own
    gate). A selection signal only (``stop_gradient``). It costs a second delta-rule pass over
    the absorbed tokens (forward only): the read ``S_{t-1}^T k_{t-W}`` is that of ``delta_rule``
    with the queries one step ahead of the keys, scale 1.

    Eidetic tokens of query t: the E tokens j <= t - W with the largest ``e_j``, ties broken
    toward the more recent token (the order is on (e_j, j)). Query t attends, in one softmax,
    to the window (t - W, t] and its eidetic tokens, with Attention's fused q/k/v projection
    and output projection (submodule ``attention``, parameters as Attention's). Training form:
    the eidetic mask of all queries at once (``parallel_eidetic_mask``, a [T, T] comparison)
    and one masked softmax attention over all keys: O(T^2) time and memory, like
    reference-form attention, however small W and E (``impl``, ``chunk_size`` then reach only
    the memory's ``delta_rule``). B'MOJO's own form is sequential; this is its parallel
    equivalent.

    ``eidetic = 0`` is ``hippocampus`` exactly (same parameters, same computation, Attention's
    chunked forms). ``window = 0`` is full attention with a memory that never receives a token
    and so no eidetic tokens (Attention's convention, as hippocampus). With ``window >= T``
    nothing leaves the window: the output is the attention's.

    Decoding cache: hippocampus's (Attention's last W keys and values; when ``0 < window <
    max_len`` the memory state, the three convolution histories and the memory inputs of the
    last W tokens), and, when ``eidetic > 0`` and tokens can leave the window, the eidetic
    buffer ``eidetic``: E slots of attention key and value ``[B, E, H, d]``, surprise ``[B, E]``
    and position ``[B, E]`` (int32; -1: empty slot, so the valid count is the number of
    positions >= 0). A token leaving the window gets its surprise against the state before it
    is absorbed and replaces the least surprising slot if it beats it. Any split of the
    sequence into calls is exact.

    Sown (collection ``intermediates``, when eidetic tokens are on): ``surprise [B, T]``, entry
    i that of the token leaving the window as x's token i arrives (``window`` positions before
    it; 0 for positions before the sequence).
    """

    # The block's short convolution goes in front, as for attention: the window attention reads
    # x unconvolved and without it has no local order (no induction head: trained on MQAR it
    # recalled 0.99 of the pairs beyond its window but 0.1-0.4 of those inside it). The memory
    # branch keeps its own convolutions after it.
    own_short_conv = False

    d_model: int
    num_heads: int = 2
    window: int = 16
    eidetic: int = 4
    memory: str = "gated_deltanet"
    conv_size: int = 4
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        self._check_options()
        heads = self.num_heads
        # Without eidetic tokens, or when no token can leave the window: hippocampus's attention.
        plain = not (self.eidetic and self.window) or (cache is not None and "state" not in cache)
        if plain:
            attention = Attention(self.d_model, heads, self.window, impl=self.impl,
                                  chunk_size=self.chunk_size, name="attention")
            if cache is None:
                y = attention(x)
            else:
                y, attention_cache = attention(x, cache["attention"])
                if "state" not in cache:  # nothing leaves the window before max_len: no memory
                    return y, {"attention": attention_cache}
        o, absorbed, new_cache = absorb_evicted(self, x, cache, heads, self.window,
                                                self.conv_size, self._gated(), self.impl,
                                                self.chunk_size)
        if not plain:
            attention = EideticAttention(self.d_model, heads, self.window, self.eidetic,
                                         name="attention")
            surprise = self._surprise(absorbed, None if cache is None else cache["state"])
            self.sow("intermediates", "surprise", surprise)
            if cache is None:
                y = attention(x, surprise)
            else:
                y, attention_cache, slots = attention(x, surprise, cache["attention"],
                                                      cache["eidetic"])
                new_cache["eidetic"] = slots
        y = y + memory_readout(o, x, self.d_model)
        if cache is None:
            return y
        return y, new_cache | {"attention": attention_cache}

    def _surprise(self, absorbed, state):
        """``e_j = mean_h ||v_j - exp(g_j) S_prev^T k_j||^2`` of the T tokens absorbed in this
        call (``[B, T]``, float32 or float64), ``S_prev`` the state before absorbing j."""
        dtype = jnp.promote_types(absorbed["k"].dtype, jnp.float32)
        inputs = {n: jax.lax.stop_gradient(a.astype(dtype)) for n, a in absorbed.items()}
        k, v = inputs["k"], inputs["v"]
        B, T, H, d = k.shape
        first = jnp.zeros((B, 1, H, d), dtype)
        if state is not None:  # before the first absorbed token: the cached state
            first = jnp.einsum("bhkv,bhk->bhv", jax.lax.stop_gradient(state).astype(dtype),
                               k[:, 0])[:, None]
        read = first
        if T > 1:  # before token i > 0: the state after token i - 1, read with k_i
            ahead = jnp.concatenate([k[:, 1:], jnp.zeros_like(k[:, :1])], axis=1)
            after, _ = delta_rule(ahead, **inputs, scale=1.0,
                                  initial_state=None if state is None
                                  else jax.lax.stop_gradient(state),
                                  impl=self.impl, chunk_size=self.chunk_size)
            read = jnp.concatenate([first, after[:, :-1]], axis=1)
        if "g" in inputs:
            read = jnp.exp(inputs["g"])[..., None] * read
        return jax.lax.stop_gradient(jnp.mean(jnp.sum(jnp.square(v - read), axis=-1), axis=-1))

    def _gated(self) -> bool:
        return self.memory == "gated_deltanet"

    def _check_options(self):
        if self.memory not in MEMORIES:
            raise ValueError(f"bmojo: unknown memory {self.memory!r}; supported: "
                             f"{', '.join(MEMORIES)}")
        if self.window < 0:
            raise ValueError(f"bmojo: window must be >= 0 (0 = full attention), got "
                             f"{self.window}")
        if self.eidetic < 0:
            raise ValueError(f"bmojo: eidetic must be >= 0 (0 = hippocampus), got {self.eidetic}")
        head_dim(self.d_model, self.num_heads)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        self._check_options()
        cache = Hippocampus(self.d_model, self.num_heads, self.window, self.memory,
                            self.conv_size, parent=None).init_cache(batch_size, max_len)
        if not self.eidetic or "state" not in cache:
            return cache  # hippocampus's: no token can be eidetic
        slots, shape = self.eidetic, (batch_size, self.eidetic, self.num_heads,
                                      head_dim(self.d_model, self.num_heads))
        return cache | {"eidetic": {"k": jnp.zeros(shape, jnp.float32),
                                    "v": jnp.zeros(shape, jnp.float32),
                                    "surprise": jnp.zeros((batch_size, slots), jnp.float32),
                                    "position": jnp.full((batch_size, slots), -1, jnp.int32)}}
