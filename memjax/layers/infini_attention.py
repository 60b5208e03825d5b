"""Infini-attention (Munkhdalai et al. 2024, "Leave No Context Behind"): exact softmax attention
within a segment, beside a compressive linear memory of every earlier segment."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers import initializers
from memjax.layers.heads import head_dim, merge_heads
from memjax.layers.registry import MIXERS
from memjax.ops import softmax_attention

MEMORY_EPS = 1e-6  # added to the normaliser sigma(q) . z: an empty memory reads exactly 0


def elu_plus_one(z):
    """The paper's feature map ``sigma(z) = ELU(z) + 1``: positive, so the normaliser is."""
    return jax.nn.elu(z) + 1.0


def read_memory(sq, memory, norm):
    """``sigma(q) M / (sigma(q) . z + eps)``: sq ``[..., L, H, d]``, M ``[..., H, d, d]`` (key
    rows, value columns), z ``[..., H, d]`` -> ``[..., L, H, d]``."""
    numerator = jnp.einsum("...lhk,...hkv->...lhv", sq, memory)
    denominator = jnp.einsum("...lhk,...hk->...lh", sq, norm)
    return numerator / (denominator[..., None] + MEMORY_EPS)


def fold_segment(memory, norm, sk, v, delta: bool):
    """``(M_s, z_s)`` from ``(M_{s-1}, z_{s-1})`` and a segment's ``sk = sigma(k)``, v
    ``[..., L, H, d]``: ``M += sk^T v`` (linear) or ``M += sk^T (v - read(sk, M_{s-1}))``
    (delta: every token corrected against the memory before the segment); ``z += sum sk``.
    A padding token with ``sk = 0`` adds nothing."""
    if delta:
        v = v - read_memory(sk, memory, norm)
    return memory + jnp.einsum("...lhk,...lhv->...hkv", sk, v), norm + jnp.sum(sk, axis=-3)


@MIXERS.register("infini_attention")
class InfiniAttention(nn.Module):
    """Infini-attention: ``[B, T, d_model]`` in and out.

    Per head (H = ``num_heads``, width d = d_model / H), with q, k, v one fused projection of x
    and segment s the tokens ``[sN, (s+1)N)``, N = ``segment`` (the last may be partial)::

        A_dot_t = sum_{j in s, j <= t} softmax_j(q_t . k_j / sqrt(d)) v_j     # within the segment
        A_mem_t = sigma(q_t) M_{s-1} / (sigma(q_t) . z_{s-1} + 1e-6)           # sigma = ELU + 1
        M_s = M_{s-1} + sum_{j in s} sigma(k_j)^T v_j                            # linear, or
        M_s = M_{s-1} + sum_{j in s} sigma(k_j)^T (v_j - sigma(k_j) M_{s-1} / (sigma(k_j) . z_{s-1}
              + 1e-6))                                                          # delta=True
        z_s = z_{s-1} + sum_{j in s} sigma(k_j);   M_0 = 0, z_0 = 0
        A_t = sigmoid(beta) A_mem_t + (1 - sigmoid(beta)) A_dot_t   # beta [H], learned, init 0

    then the heads are merged and projected (``out``). The first segment reads exactly 0 from
    the memory. ``impl`` is the local attention's form (``memjax.ops.softmax_attention``).

    Parallel form: the segments are a reshape ``[B * n, N, ...]`` for block-local causal
    attention; the memory each segment reads is an exclusive prefix over segments: a cumulative
    sum for the linear update (it is additive), a ``lax.scan`` over segments for the delta one.

    Decoding cache: ``memory`` M ``[B, H, d, d]`` and ``norm`` z ``[B, H, d]`` before the
    current segment, the segment's keys and values so far (``[B, segment, H, d]``) and their
    ``count``; when the segment fills it is folded into M and z. A multi-token call with a cache
    at a segment boundary (a fresh cache, or after whole segments) runs the parallel form from
    the cached memory; mid-segment it runs the one-token step over its tokens (exact, sequential).
    """

    d_model: int
    num_heads: int = 2
    segment: int = 16
    delta: bool = False
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        self._check_options()
        B, T, _ = x.shape
        H, width = self.num_heads, head_dim(self.d_model, self.num_heads)
        qkv = initializers.dense(3 * self.d_model, name="qkv")(x).reshape(B, T, H, 3 * width)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # per head [q | k | v], as in Attention
        beta = self.param("beta", nn.initializers.zeros, (H,))
        acc = jnp.promote_types(x.dtype, jnp.float32)
        if cache is None:
            memory = jnp.zeros((B, H, width, width), acc)
            a_dot, a_mem, _ = self._parallel(q, k, v, memory, memory[..., 0])
            new_cache = None
        elif T == 1:
            a_dot, a_mem, new_cache = self._step(q, k, v, cache)
        else:
            a_dot, a_mem, new_cache = jax.lax.cond(cache["count"] == 0, self._prefill,
                                                   self._sequential, q, k, v, cache)
        gate = jax.nn.sigmoid(beta.astype(acc))[:, None]  # [H, 1]
        o = merge_heads(gate * a_mem + (1.0 - gate) * a_dot).astype(x.dtype)
        y = initializers.dense_out(self.d_model, name="out")(o)
        return y if cache is None else (y, new_cache)

    def _check_options(self):
        if self.segment < 1:
            raise ValueError(f"infini_attention: segment must be >= 1 token, got {self.segment}")
        head_dim(self.d_model, self.num_heads)

    def _parallel(self, q, k, v, memory, norm):
        """All segments at once from ``(M, z) = (memory, norm)``. Returns ``A_dot, A_mem``
        ``[B, T, H, d]`` (float32, or float64) and ``(M, z)`` after the whole segments of x."""
        B, T, H, width = q.shape
        acc = memory.dtype
        size = min(self.segment, T)  # one short segment is not padded to `segment`
        n = -(-T // size)
        pad = lambda a: jnp.pad(a, ((0, 0), (0, n * size - T), (0, 0), (0, 0)))
        blocks = lambda a: pad(a).reshape(B, n, size, H, width)
        flat = lambda a: pad(a).reshape(B * n, size, H, width)
        # Block-local causal attention; padding follows the real tokens, so no real query sees it.
        a_dot = softmax_attention(flat(q), flat(k), flat(v), impl=self.impl)
        a_dot = a_dot.reshape(B, n * size, H, width)[:, :T].astype(acc)
        real = (jnp.arange(n * size) < T).reshape(1, n, size, 1, 1)
        sk = jnp.where(real, elu_plus_one(blocks(k).astype(acc)), 0.0)  # padding writes nothing
        values = blocks(v).astype(acc)
        if self.delta:  # each update reads the memory before it: a scan over segments
            def body(carry, segment):
                return fold_segment(*carry, *segment, True), carry

            last, before = jax.lax.scan(body, (memory, norm),
                                        (jnp.moveaxis(sk, 1, 0), jnp.moveaxis(values, 1, 0)))
            before = tuple(jnp.moveaxis(a, 0, 1) for a in before)
        else:  # additive: inclusive prefix sums of the per-segment updates, shifted by one
            added_m, added_z = fold_segment(0.0, 0.0, sk, values, False)  # [B, n, H, ...]
            after = (memory[:, None] + jnp.cumsum(added_m, axis=1),
                     norm[:, None] + jnp.cumsum(added_z, axis=1))
            before = tuple(jnp.concatenate([s0[:, None], a[:, :-1]], axis=1)
                           for s0, a in zip((memory, norm), after))
            last = tuple(a[:, -1] for a in after)
        a_mem = read_memory(elu_plus_one(blocks(q).astype(acc)), *before)
        a_mem = a_mem.reshape(B, n * size, H, width)[:, :T]
        # The state a cache keeps is the one after the last *whole* segment.
        whole = last if T % self.segment == 0 else tuple(a[:, -1] for a in before)
        return a_dot, a_mem, whole

    def _prefill(self, q, k, v, cache):
        """A multi-token call at a segment boundary: the parallel form from the cached memory;
        the trailing partial segment goes to the buffers."""
        T = q.shape[1]
        acc = jnp.promote_types(q.dtype, jnp.float32)
        a_dot, a_mem, (memory, norm) = self._parallel(
            q, k, v, cache["memory"].astype(acc), cache["norm"].astype(acc))
        rest = T % self.segment
        buffer = lambda a, old: jnp.zeros_like(old).at[:, :rest].set(
            a[:, T - rest:].astype(old.dtype))
        return a_dot, a_mem, {"memory": memory.astype(cache["memory"].dtype),
                              "norm": norm.astype(cache["norm"].dtype),
                              "k": buffer(k, cache["k"]), "v": buffer(v, cache["v"]),
                              "count": jnp.asarray(rest, jnp.int32)}

    def _step(self, q, k, v, cache):
        """One token (``[B, 1, H, d]``) after ``count`` tokens of its segment."""
        count = cache["count"]
        acc = jnp.promote_types(q.dtype, jnp.float32)
        keys, values = (jax.lax.dynamic_update_slice_in_dim(cache[n], a.astype(cache[n].dtype),
                                                            count, axis=1)
                        for n, a in (("k", k), ("v", v)))
        # Slot j holds segment position j; slots after the query's position `count` (stale
        # tokens of the previous segment) are masked as future keys.
        a_dot = softmax_attention(q, keys, values, q_offset=count, impl=self.impl).astype(acc)
        memory, norm = cache["memory"].astype(acc), cache["norm"].astype(acc)
        a_mem = read_memory(elu_plus_one(q.astype(acc)), memory, norm)
        full = count + 1 == self.segment
        folded = fold_segment(memory, norm, elu_plus_one(keys.astype(acc)), values.astype(acc),
                              self.delta)
        memory, norm = (jnp.where(full, new, old).astype(old.dtype)
                        for new, old in zip(folded, (cache["memory"], cache["norm"])))
        return a_dot, a_mem, {"memory": memory, "norm": norm, "k": keys, "v": values,
                              "count": jnp.where(full, 0, count + 1).astype(jnp.int32)}

    def _sequential(self, q, k, v, cache):
        """A multi-token call that starts mid-segment: the one-token step over its tokens."""
        def body(carry, token):
            a_dot, a_mem, carry = self._step(*(a[:, None] for a in token), carry)
            return carry, (a_dot[:, 0], a_mem[:, 0])

        cache, (a_dot, a_mem) = jax.lax.scan(body, cache, tuple(jnp.moveaxis(a, 1, 0)
                                                                for a in (q, k, v)))
        return jnp.moveaxis(a_dot, 0, 1), jnp.moveaxis(a_mem, 0, 1), cache

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        self._check_options()
        H, width = self.num_heads, head_dim(self.d_model, self.num_heads)
        buffer = jnp.zeros((batch_size, self.segment, H, width), jnp.float32)
        return {"memory": jnp.zeros((batch_size, H, width, width), jnp.float32),
                "norm": jnp.zeros((batch_size, H, width), jnp.float32),
                "k": buffer, "v": buffer, "count": jnp.zeros((), jnp.int32)}
