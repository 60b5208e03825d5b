"""Titans MAC (memory as context; Behrouz et al. 2025, section 4.1), in the paper's order."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers import initializers
from memjax.layers.conv import ShortConv
from memjax.layers.heads import head_dim, l2_normalize, merge_heads, split_heads
from memjax.layers.neural_memory import NeuralMemory, inner_loop_diagnostics, memory_gates
from memjax.layers.registry import MIXERS
from memjax.ops import MemorySpec, init_memory_params, initial_memory_state, neural_memory
from memjax.ops.memory_nets import apply as memory_apply


def read_memory(spec: MemorySpec, weights: dict, q):
    """``M_W(q)`` without storing: weights leaves ``[B, H, out, in]``, q ``[B, L, H, in]`` ->
    ``[B, L, H, out]``."""
    per_head = jax.vmap(lambda w, x: memory_apply(spec, w, x), in_axes=(0, 1), out_axes=1)
    return jax.vmap(per_head)(weights, q)


class _Segment(nn.Module):
    """One segment of C tokens: retrieve, attend, store, gate (the paper's order).

    ``h = M_{t-1}(q)`` (the memory before the segment, read with the segment's retrieval
    queries); causal attention of the segment over ``[P || h || S]`` (persistent tokens always
    visible; the retrieved token j and segment token j visible from position j on, so nothing
    leaks from later tokens); the attention output y is stored into the memory (keys, values,
    queries and gates projected from y); ``o = W_o (RMSNorm(y) * sigmoid(RMSNorm(M_t(y))))``,
    the read of each token after its own store. With ``diagnostics``, also returns the
    segment's ``inner_loop_diagnostics`` beside the output.
    """

    d_model: int
    attn_heads: int
    memory_heads: int
    persistent_tokens: int
    spec: MemorySpec
    max_lr: float
    diagnostics: bool = False

    @nn.compact
    def __call__(self, state, segment):
        queries, x = segment  # [B, C, Hm, K] retrieval queries, [B, C, d_model] inputs
        B, C, _ = x.shape
        h = merge_heads(read_memory(self.spec, state.weights, queries).astype(x.dtype))
        width = head_dim(self.d_model, self.attn_heads)
        project = initializers.dense(3 * self.d_model, name="qkv")

        def heads(tokens):
            qkv = project(tokens).reshape(*tokens.shape[:2], self.attn_heads, 3 * width)
            return jnp.split(qkv, 3, axis=-1)

        q, k_s, v_s = heads(x)
        _, k_h, v_h = heads(h)
        keys, values = [k_h, k_s], [v_h, v_s]
        visible = jnp.tile(jnp.tril(jnp.ones((C, C), bool)), (1, 2))  # [C, 2C]: h, then S
        if self.persistent_tokens:
            tokens = self.param("persistent", nn.initializers.normal(0.02),
                                (self.persistent_tokens, self.d_model))
            _, k_p, v_p = heads(jnp.broadcast_to(tokens.astype(x.dtype), (B, *tokens.shape)))
            keys, values = [k_p] + keys, [v_p] + values
            visible = jnp.concatenate(
                [jnp.ones((C, self.persistent_tokens), bool), visible], axis=1)
        keys, values = jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1)
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        logits = jnp.einsum("bthw,bshw->bhts", q, keys, preferred_element_type=dtype)
        weights = jax.nn.softmax(jnp.where(visible, logits * width**-0.5, -jnp.inf), axis=-1)
        attended = jnp.einsum("bhts,bshw->bthw", weights, values.astype(dtype)).astype(x.dtype)
        y = initializers.dense(self.d_model, name="attention_out")(
            attended.reshape(B, C, self.d_model))

        store = {name: split_heads(
                     nn.silu(initializers.dense(self.d_model, name=f"store_{name}")(y)),
                     self.memory_heads) for name in ("q", "k", "v")}
        inputs = {"q": l2_normalize(store["q"]), "k": l2_normalize(store["k"]), "v": store["v"],
                  **memory_gates(self, y, self.memory_heads, self.spec.momentum, self.max_lr)}
        read, after = neural_memory(**inputs, spec=self.spec, initial_state=state)
        read = merge_heads(nn.RMSNorm(name="memory_norm")(read))
        gated = nn.RMSNorm(name="attention_norm")(y) * jax.nn.sigmoid(read)
        out = initializers.dense_out(self.d_model, name="out")(gated)
        if self.diagnostics:
            return after, (out, inner_loop_diagnostics(self.spec, inputs, state.weights,
                                                       after.weights))
        return after, out


@MIXERS.register("titans_mac")
class MemoryAsContext(NeuralMemory):
    """Titans MAC: segments of ``segment`` tokens; each attends over persistent tokens, what
    the memory retrieves for it and itself, then stores its attention output (``_Segment``).

    The memory options are ``lmm``'s (``num_heads``: the memory's heads; ``attn_heads``: the
    attention's). Retrieval queries are ``l2norm(SiLU(ShortConv(W x)))`` over the whole
    sequence; the memory's store projections read y, within a segment, without a convolution.
    The PyTorch port runs the memory before attention on the residual stream and adds learned
    tokens per segment instead of retrieved ones (algorithms.md part C); this is the paper's order.

    Decoding cache: the memory state at the current segment's start, the segment's inputs so far
    (``[B, segment, ...]`` buffers: each new token recomputes its segment, exact and O(segment)),
    the count of buffered tokens, and the retrieval convolution's history. A multi-token call
    with a cache must start at a segment boundary (a fresh cache, or after whole segments);
    otherwise its output is NaN, loudly.

    Training (``metrics`` mutable) sows ``lmm``'s inner-loop diagnostics, each the mean over
    segments of the segment's value (a last partial segment counts its zero padding).
    """

    # The block's short convolution goes in front: the attention reads x unconvolved, and without
    # it has no local order (MAC failed passkey even with the needle in the query's own segment).
    own_short_conv = False
    segment: int = 16
    attn_heads: int = 2
    persistent_tokens: int = 4

    @nn.compact
    def __call__(self, x, cache=None):
        B, T, _ = x.shape
        spec, dims = self.spec(), self.memory_dims()
        if self.feature_map != "identity":
            raise ValueError("titans_mac supports feature_map='identity' only")
        conv = ShortConv(self.conv_size, name="conv_q")
        q = initializers.dense(self.d_model, name="retrieve")(x)
        q, conv_cache = (conv(q), None) if cache is None else conv(q, cache["conv_q"])
        queries = l2_normalize(split_heads(nn.silu(q), self.num_heads))
        memory = self.param("memory", lambda key: init_memory_params(key, spec, self.num_heads,
                                                                     *dims))
        acc = jnp.promote_types(x.dtype, jnp.float32)
        options = dict(d_model=self.d_model, attn_heads=self.attn_heads,
                       memory_heads=self.num_heads, persistent_tokens=self.persistent_tokens,
                       spec=spec, max_lr=self.max_lr)
        diagnose = cache is None and self.is_mutable_collection("metrics")
        segments = nn.scan(_Segment, variable_broadcast="params",
                           split_rngs={"params": False})(**options, diagnostics=diagnose,
                                                         name="segment")
        if cache is None:
            fresh = initial_memory_state(memory, B, spec, *dims, dtype=acc)
            y = self._whole_segments(segments, fresh, queries, x)[1]
            if not diagnose:
                return y
            y, diagnostics = y
            for name, per_segment in diagnostics.items():
                self.sow("metrics", name, jnp.mean(per_segment))
            return y
        state = self.cached_memory_state(memory, cache["before"], cache["started"], acc)
        if T == 1:
            y, new_cache = self._decode(segments, state, queries, x, cache)
        else:
            y, new_cache = self._prefill(segments, state, queries, x, cache)
        return y, new_cache | {"conv_q": conv_cache, "started": jnp.ones((), jnp.int32)}

    def _split(self, a, n):
        """``[B, n * C, ...]`` -> ``[n, B, C, ...]`` (the scan's leading axis)."""
        return jnp.moveaxis(a.reshape(a.shape[0], n, self.segment, *a.shape[2:]), 1, 0)

    def _whole_segments(self, segments, state, queries, x):
        """The sequence, zero-padded to whole segments (padding only follows real tokens)."""
        T, C = x.shape[1], self.segment
        n = -(-T // C)
        pad = lambda a: jnp.pad(a, [(0, 0), (0, n * C - T)] + [(0, 0)] * (a.ndim - 2))
        state, out = segments(state, (self._split(pad(queries), n), self._split(pad(x), n)))
        y, diagnostics = out if isinstance(out, tuple) else (out, None)
        y = jnp.moveaxis(y, 0, 1).reshape(x.shape[0], n * C, -1)[:, :T]
        return state, (y if diagnostics is None else (y, diagnostics))

    def _prefill(self, segments, state, queries, x, cache):
        T, C = x.shape[1], self.segment
        whole, rest = T - T % C, T % C
        y = []
        if whole:
            state, y_whole = self._whole_segments(segments, state, queries[:, :whole],
                                                  x[:, :whole])
            y.append(y_whole)
        pieces = {name: jnp.zeros_like(cache[name]) for name in ("queries", "x")}
        if rest:  # the partial last segment is buffered, and computed zero-padded
            pieces = {"queries": pieces["queries"].at[:, :rest].set(queries[:, whole:]),
                      "x": pieces["x"].at[:, :rest].set(x[:, whole:])}
            y.append(self._one_segment(segments, state, pieces)[1][:, :rest])
        y = jnp.concatenate(y, axis=1)
        y = jnp.where(cache["count"] == 0, y, jnp.nan)  # must start at a segment boundary
        return y, {"before": state, **pieces, "count": jnp.asarray(rest, jnp.int32)}

    def _one_segment(self, segments, state, pieces):
        state, y = segments(state, (pieces["queries"][None], pieces["x"][None]))
        return state, y[0]

    def _decode(self, segments, state, queries, x, cache):
        count = cache["count"]
        pieces = {"queries": jax.lax.dynamic_update_slice_in_dim(
                      cache["queries"], queries.astype(cache["queries"].dtype), count, axis=1),
                  "x": jax.lax.dynamic_update_slice_in_dim(
                      cache["x"], x.astype(cache["x"].dtype), count, axis=1)}
        after, y = self._one_segment(segments, state, pieces)
        y = jax.lax.dynamic_slice_in_dim(y, count, 1, axis=1)
        done = count + 1 == self.segment
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), after, state)
        return y, {"before": state, **pieces, "count": jnp.where(done, 0, count + 1)}

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        dim = head_dim(self.d_model, self.num_heads)
        conv = ShortConv(self.conv_size, parent=None)
        return {"before": self.empty_memory_state(batch_size),
                "queries": jnp.zeros((batch_size, self.segment, self.num_heads, dim)),
                "x": jnp.zeros((batch_size, self.segment, self.d_model)),
                "count": jnp.zeros((), jnp.int32), "started": jnp.zeros((), jnp.int32),
                "conv_q": conv.init_cache(batch_size, self.d_model)}
