"""Artificial hippocampus network (AHN; "Artificial Hippocampus Networks for Efficient
Long-Context Modeling"): sliding-window attention whose evicted tokens a Gated DeltaNet absorbs."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers import initializers
from memjax.layers.attention import Attention
from memjax.layers.conv import ShortConv, conv_silu_heads
from memjax.layers.delta_net import log_decay
from memjax.layers.heads import head_dim, l2_normalize, merge_heads, run_recurrent
from memjax.layers.registry import MIXERS
from memjax.ops import delta_rule, delta_rule_step

# The recurrent memories the evicted tokens can go to ("mamba2" would need its own streams:
# B and C shared by the heads, dt in place of beta and g).
MEMORIES = ("gated_deltanet", "deltanet")


def absorb_evicted(module: nn.Module, x, cache, num_heads: int, window: int, conv_size: int,
                   gated: bool, impl: str, chunk_size: int):
    """The (Gated) DeltaNet memory of the tokens that left a window of ``window`` tokens, read
    at every position of x (``[B, T, d_model]``): q, k, v = SiLU(ShortConv(W x)) (q, k
    L2-normalised), ``beta = sigmoid(w_b x)``, gated ``g`` as Gated DeltaNet's; the k, v, beta,
    g streams are delayed by ``window`` positions (the cache's ``pending`` inputs, or zeros that
    leave the state unchanged), so the read at t holds exactly the tokens <= t - window. Call
    inside a compact module: it creates q, k, v, their convolutions, beta (and a, A_log,
    dt_bias) there. Returns ``(o [B, T, H, d], absorbed inputs {k, v, beta[, g]} [B, T, ...],
    the cache's memory entries {conv_*, state, pending})`` (the entries are empty without a
    cache)."""
    T = x.shape[1]
    streams, new_cache = conv_silu_heads(x, "qkv", num_heads, conv_size, cache)
    beta = initializers.dense(num_heads, name="beta", bias=True)(x)
    inputs = {"k": l2_normalize(streams["k"]), "v": streams["v"],
              "beta": jax.nn.sigmoid(beta.astype(jnp.float32))}
    if gated:
        inputs["g"] = log_decay(module, x, num_heads)  # Gated DeltaNet's gate and parameters
    if cache is None:  # zeros in front: window = 0 never lets a token leave
        lag = min(window or T, T)
        pending = {n: jnp.zeros((a.shape[0], lag, *a.shape[2:]), a.dtype)
                   for n, a in inputs.items()}
    else:
        pending = cache["pending"]
    # The memory's inputs in position order, from the oldest token still in the window: the
    # first T leave the window as the T new tokens arrive, the rest stay pending.
    joined = {n: jnp.concatenate([pending[n], a.astype(pending[n].dtype)], axis=1)
              for n, a in inputs.items()}
    absorbed = {n: a[:, :T] for n, a in joined.items()}
    o, state = run_recurrent(delta_rule, delta_rule_step, None if cache is None else cache["state"],
                             {"impl": impl, "chunk_size": chunk_size},
                             q=l2_normalize(streams["q"]), **absorbed)
    if cache is not None:
        new_cache |= {"state": state, "pending": {n: a[:, T:] for n, a in joined.items()}}
    return o, absorbed, new_cache


def memory_readout(o, x, d_model: int):
    """The memory branch's output ``W_out(RMSNorm(o) * silu(W_g x))`` (per-head RMSNorm
    ``head_norm``, Dense ``gate`` and ``out``; call inside a compact module)."""
    o = merge_heads(nn.RMSNorm(name="head_norm")(o.astype(x.dtype)))
    o = o * nn.silu(initializers.dense(d_model, name="gate")(x))
    return initializers.dense_out(d_model, name="out")(o)


@MIXERS.register("hippocampus")
class Hippocampus(nn.Module):
    """AHN: exact attention over the last ``window`` tokens plus a memory of the tokens before.

    ``[B, T, d_model]`` in and out. With W = ``window`` and H = ``num_heads`` heads of width d::

        y = Attention_W(x) + W_out(RMSNorm(o) * silu(W_g x))

    ``Attention_W`` is ``Attention(d_model, num_heads, window)`` (causal softmax over the
    positions (t - W, t]; submodule ``attention``). The memory is a (Gated) DeltaNet, as in
    ``delta_net.py``: q, k, v = SiLU(ShortConv(W x)) per head, q and k L2-normalised,
    ``beta = sigmoid(w_b x)``, gated (``memory="gated_deltanet"``) ``g = -exp(A_log)
    softplus(w_a x + dt_bias)``; per-head RMSNorm on its read, SiLU output gate, own output
    projection. The memory absorbs token t - W when token t arrives, so the state read at t
    holds exactly the tokens <= t - W, those that have left the window::

        S_t = exp(g_{t-W}) (I - beta_{t-W} k_{t-W} k_{t-W}^T) S_{t-1} + beta_{t-W} k_{t-W} v_{t-W}^T
        o_t = S_t^T q_t / sqrt(d)

    computed as ``delta_rule`` on the k, v, beta, g streams shifted right by W positions (zeros
    in front: beta = 0, g = 0 leave the state unchanged) with the queries unshifted. Until W
    tokens have passed (and for any sequence no longer than the window) the read is exactly 0,
    and so is the memory branch: the output is the attention's. ``window = 0`` is full attention
    (Attention's convention) with a memory that never receives a token.

    Decoding cache: the attention's (its last W keys and values); and, when ``0 < window <
    max_len`` (otherwise no token ever leaves the window), the memory state ``[B, H, d, d]``,
    the three convolution histories, and the memory inputs of the last W tokens (``pending``:
    k, v ``[B, W, H, d]``, beta and g ``[B, W, H]``, oldest first; each new token absorbs the
    oldest). Any split of the sequence into calls is exact. ``chunk_size`` and ``impl`` go to
    both operators (softmax_attention and delta_rule).
    """

    # The block's short convolution goes in front, as for attention: the window attention reads
    # x unconvolved and without it has no local order (no induction head: trained on MQAR it
    # recalled 0.99 of the pairs beyond its window but 0.1-0.4 of those inside it). The memory
    # branch keeps its own convolutions after it.
    own_short_conv = False

    d_model: int
    num_heads: int = 2
    window: int = 16
    memory: str = "gated_deltanet"
    conv_size: int = 4
    chunk_size: int = 64
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, cache=None):
        self._check_options()
        heads = self.num_heads
        attention = Attention(self.d_model, heads, self.window, impl=self.impl,
                              chunk_size=self.chunk_size, name="attention")
        if cache is None:
            y = attention(x)
        else:
            y, attention_cache = attention(x, cache["attention"])
            if "state" not in cache:  # nothing leaves the window before max_len: no memory
                return y, {"attention": attention_cache}
        o, _, memory_cache = absorb_evicted(self, x, cache, heads, self.window, self.conv_size,
                                            self._gated(), self.impl, self.chunk_size)
        y = y + memory_readout(o, x, self.d_model)
        if cache is None:
            return y
        return y, memory_cache | {"attention": attention_cache}

    def _gated(self) -> bool:
        return self.memory == "gated_deltanet"

    def _check_options(self):
        if self.memory not in MEMORIES:
            raise ValueError(f"hippocampus: unknown memory {self.memory!r}; supported: "
                             f"{', '.join(MEMORIES)}")
        if self.window < 0:
            raise ValueError(f"hippocampus: window must be >= 0 (0 = full attention), got "
                             f"{self.window}")
        head_dim(self.d_model, self.num_heads)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        self._check_options()
        heads = self.num_heads
        cache = {"attention": Attention(self.d_model, heads, self.window,
                                        parent=None).init_cache(batch_size, max_len)}
        if not 0 < self.window < max_len:
            return cache  # within max_len no token leaves the window: the memory stays empty
        dim, slots = head_dim(self.d_model, heads), self.window
        conv = ShortConv(self.conv_size, parent=None)
        pending = {"k": jnp.zeros((batch_size, slots, heads, dim), jnp.float32),
                   "v": jnp.zeros((batch_size, slots, heads, dim), jnp.float32),
                   "beta": jnp.zeros((batch_size, slots, heads), jnp.float32)}
        if self._gated():
            pending["g"] = jnp.zeros((batch_size, slots, heads), jnp.float32)
        return cache | {"state": jnp.zeros((batch_size, heads, dim, dim), jnp.float32),
                        "pending": pending,
                        **{f"conv_{n}": conv.init_cache(batch_size, self.d_model) for n in "qkv"}}
