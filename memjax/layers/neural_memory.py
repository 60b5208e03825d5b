"""Titans' neural long-term memory as a mixer (LMM; Behrouz et al. 2025, section 4.4), and
memory-as-a-gate (MAG): the memory beside sliding-window attention."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from memjax.layers import initializers
from memjax.layers.attention import Attention
from memjax.layers.conv import ShortConv, conv_silu_heads
from memjax.layers.heads import head_dim, l2_normalize, merge_heads
from memjax.layers.registry import MIXERS
from memjax.ops import (MemorySpec, init_memory_params, initial_memory_state, neural_memory,
                        neural_memory_step)
from memjax.ops.feature_maps import init_coeff_param, polynomial, polynomial_dim, positive_coeffs
from memjax.ops.memory_nets import token_loss

# Initial gate biases (sigmoid of): the learning rate theta = 0.5 (with unit keys and the l2 loss
# that is a delta-rule beta of 1), the forgetting gate alpha = 0.018 (a memory that keeps about
# 55 tokens' worth at first), the momentum eta = 0.5 (heavy-ball on the loss's curvature 2 stays
# stable for every theta <= 1 + eta, and theta <= 1 always).
GATE_BIASES = {"lr": 0.0, "decay": -4.0, "momentum": 0.0}


def memory_gates(module: nn.Module, x, heads: int, momentum: bool, max_lr: float) -> dict:
    """The memory's data-dependent gates from x ``[B, T, D]``, each ``[B, T, H]``, in at least
    float32: ``lr = max_lr sigmoid(W x + b)`` (theta), ``decay`` (alpha) and, when ``momentum``,
    ``momentum`` (eta; else None). Creates the Dense layers and biases in ``module`` (call it
    from a compact method)."""
    gates = {"momentum": None}
    for gate, bias in GATE_BIASES.items():
        if gate == "momentum" and not momentum:
            continue
        pre = initializers.dense(heads, name=gate)(x)
        pre = pre.astype(jnp.promote_types(pre.dtype, jnp.float32))  # no bfloat16 gates
        gates[gate] = jax.nn.sigmoid(
            pre + module.param(f"{gate}_bias", nn.initializers.constant(bias), (heads,)))
    gates["lr"] = max_lr * gates["lr"]
    return gates


def inner_loop_diagnostics(spec: MemorySpec, inputs: dict, start: dict, final: dict) -> dict:
    """Train metrics of a memory's inner loop over one stretch of tokens, averaged over batch
    and heads: the inner loss of the stretch's (k, v) pairs at the weights before it and after
    it (``start``, ``final``: leaves ``[B, H, out, in]``), the size of the change
    ``||W_final - W_start||_F``, and the effective learning rate (mean theta; with momentum
    theta / (1 - eta), the step a constant gradient settles to). ``inputs``: the operator's
    ``k, v [B, T, H, .]``, ``lr [B, T, H]`` and ``momentum`` (or None)."""
    per_head = jax.vmap(jax.vmap(functools.partial(token_loss, spec), (None, 0, 0)), (0, 1, 1))
    losses = jax.vmap(per_head, (0, 0, 0))  # weights, k, v -> [B, H, T]
    change = sum(jnp.sum((f - w) ** 2, axis=(-2, -1)) for f, w in
                 zip(jax.tree_util.tree_leaves(final), jax.tree_util.tree_leaves(start)))
    theta = inputs["lr"]
    if inputs["momentum"] is not None:
        theta = theta / (1.0 - inputs["momentum"])
    return {"inner_loss_initial_weights": jnp.mean(losses(start, inputs["k"], inputs["v"])),
            "inner_loss_final_weights": jnp.mean(losses(final, inputs["k"], inputs["v"])),
            "update_norm": jnp.mean(jnp.sqrt(change)), "effective_lr": jnp.mean(theta)}


@MIXERS.register("lmm")
class NeuralMemory(nn.Module):
    """Titans LMM: the neural memory alone as the token mixer (``memjax.ops.neural_memory``).

    Per head (K = d_model / num_heads): ``q, k, v = SiLU(ShortConv(W x))`` with q, k
    L2-normalised; data-dependent ``theta_t = max_lr sigmoid(w_lr x_t + b)`` (inner learning rate),
    ``alpha_t = sigmoid(w_decay x_t + b)`` (forgetting) and ``eta_t = sigmoid(w_momentum x_t +
    b)`` (momentum); the memory ``M: R^K -> R^K`` (``architecture``: a matrix by default,
    Titans' depth-2 residual MLP with ``"mlp"``) with learned initial weights per head, stored
    into with every ``(k_t, v_t)`` and read with ``q_t``. Output: per-head RMSNorm times
    ``silu(W_g x)``, then the output projection. ``[B, T, d_model]`` in and out.

    ``feature_map="polynomial"`` (ATLAS): the memory stores and reads ``phi(k)``, ``phi(q)``,
    the degree-``feature_degree`` polynomial features with learnable per-degree weights
    (``1/i!`` at init: the exponential kernel's truncation); the MLP memories then drop their
    residual (``phi(k)`` and v differ in size). The memory options are ``MemorySpec``'s
    (``memory_chunk``: the inner mini-batch, a model property; ``omega_window``: ATLAS's Omega
    window c; ``optimizer="muon"``: ATLAS's). Decoding cache: the ``MemoryState`` (base
    point, weights and momentum: three copies of the memory weights, plus the Omega window's
    last c - 1 keys and values), ``started`` and the three convolution histories.
    """

    own_short_conv = True  # the block adds no short convolution in front (not a field)

    d_model: int
    num_heads: int = 2
    conv_size: int = 4
    # A matrix memory by default: it is stable for every theta <= 1 (the l2 loss's curvature on
    # unit keys is 2). Titans' depth-2 MLP memory is `architecture="mlp"` (preset lmm_mlp): its
    # curvature grows with its weights, and at max_lr 1.0 it diverged on MQAR (NaN at step 35).
    architecture: str = "linear"
    depth: int = 2
    expansion: int = 2
    loss: str = "l2"
    optimizer: str = "gd"
    momentum: bool = True
    # Gradients at every token's own weights by default. With 16-token mini-batches (Titans'
    # parallel training) and theta up to 1 the inner loop diverged on MQAR: MAG's memory loss
    # on its own sequence went from 1.2 to 1e14 by step 250, while with 1 it fell from 66 to 4
    # (LMM, step 1500). Larger mini-batches train faster on long sequences; they need a
    # smaller max_lr (about 1 / memory_chunk for aligned keys: the gradients add up).
    memory_chunk: int = 1
    omega_window: int = 1  # MemorySpec.window (named apart from attention's window)
    retrieve: str = "after"
    max_lr: float = 1.0  # theta = max_lr * sigmoid(...)
    feature_map: str = "identity"  # or "polynomial" (ATLAS), applied to the unit q and k
    feature_degree: int = 2
    impl: str = "auto"

    def spec(self) -> MemorySpec:
        return MemorySpec(architecture=self.architecture, depth=self.depth,
                          expansion=self.expansion, loss=self.loss, optimizer=self.optimizer,
                          momentum=self.momentum, memory_chunk=self.memory_chunk,
                          window=self.omega_window, retrieve=self.retrieve,
                          residual=self.feature_map == "identity")

    def memory_dims(self) -> tuple[int, int]:
        """(input, output) size of each head's memory: (phi's dimension, head dim)."""
        dim = head_dim(self.d_model, self.num_heads)
        if self.feature_map == "identity":
            return dim, dim
        if self.feature_map == "polynomial":
            return polynomial_dim(dim, self.feature_degree), dim
        raise ValueError(f"feature_map must be 'identity' or 'polynomial', got "
                         f"{self.feature_map!r}")

    @nn.compact
    def __call__(self, x, cache=None):
        heads, spec = self.num_heads, self.spec()
        self.memory_dims()  # a clear error for d_model % num_heads or an unknown feature_map
        streams, new_cache = conv_silu_heads(x, "qkv", heads, self.conv_size, cache)
        q, k = l2_normalize(streams["q"]), l2_normalize(streams["k"])
        if self.feature_map == "polynomial":  # learnable per-degree weights, 1/i! at init
            coeffs = positive_coeffs(self.param(
                "feature_coeffs", lambda key: init_coeff_param(self.feature_degree)))
            q, k = polynomial(q, coeffs), polynomial(k, coeffs)
        inputs = {"q": q, "k": k, "v": streams["v"],
                  **memory_gates(self, x, heads, self.momentum, self.max_lr)}
        memory = self.param("memory", lambda key: init_memory_params(key, spec, heads,
                                                                     *self.memory_dims()))
        if cache is None:
            o, state = neural_memory(**inputs, spec=spec, params=memory, impl=self.impl)
            if self.is_mutable_collection("metrics"):  # training: inner-loop diagnostics
                self._sow_diagnostics(inputs, memory, state)
        else:
            o, new_cache["memory"] = self._continue(inputs, memory, cache)
            new_cache["started"] = jnp.ones((), jnp.int32)
        o = merge_heads(nn.RMSNorm(name="head_norm")(o))
        o = o * nn.silu(initializers.dense(self.d_model, name="gate")(x))
        y = initializers.dense_out(self.d_model, name="out")(o)
        return y if cache is None else (y, new_cache)

    def _sow_diagnostics(self, inputs, memory, state):
        initial = jax.tree_util.tree_map(lambda w: w[None].astype(jnp.float32), memory)
        start = jax.tree_util.tree_map(lambda w, f: jnp.broadcast_to(w, f.shape), initial,
                                       state.weights)
        for name, value in inner_loop_diagnostics(self.spec(), inputs, start,
                                                   state.weights).items():
            self.sow("metrics", name, value)

    def empty_memory_state(self, batch_size: int):
        """A cache's memory state before any token: zeros where the learned initial weights go
        (``init_cache`` cannot see parameters; ``cached_memory_state`` puts them in)."""
        spec, dims = self.spec(), self.memory_dims()
        placeholder = jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(lambda: init_memory_params(
                jax.random.key(0), spec, self.num_heads, *dims)))
        return initial_memory_state(placeholder, batch_size, spec, *dims)

    def cached_memory_state(self, memory, cached, started, dtype):
        """The cached state, or the fresh one from the learned ``memory`` weights while nothing
        has been cached (``started == 0``)."""
        batch = cached.tail_k.shape[0]
        fresh = initial_memory_state(memory, batch, self.spec(), *self.memory_dims(), dtype=dtype)
        return jax.tree_util.tree_map(lambda f, c: jnp.where(started > 0, c, f), fresh, cached)

    def _continue(self, inputs, memory, cache):
        """The memory over cached tokens: from the learned initial weights when nothing is cached
        yet (``init_cache`` cannot see the parameters), else from the cached state."""
        batch, length = inputs["q"].shape[:2]
        spec = self.spec()
        state = self.cached_memory_state(memory, cache["memory"], cache["started"],
                                         jnp.float32)
        if length == 1:
            o, state = neural_memory_step(**{n: None if a is None else a[:, 0]
                                             for n, a in inputs.items()},
                                          gamma=None, state=state, spec=spec)
            return o[:, None], state
        return neural_memory(**inputs, spec=spec, initial_state=state, impl=self.impl)

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        del max_len
        conv = ShortConv(self.conv_size, parent=None)
        return {"memory": self.empty_memory_state(batch_size),
                "started": jnp.zeros((), jnp.int32),
                **{f"conv_{n}": conv.init_cache(batch_size, self.d_model) for n in ("q", "k", "v")}}


@MIXERS.register("titans_mag")
class MemoryAsGate(NeuralMemory):
    """Titans MAG (memory as a gate, Behrouz et al. 2025, section 4.2).

    Two branches over the same input: sliding-window attention (``window`` tokens, ``attn_heads``
    heads) whose every query also sees ``persistent_tokens`` learned tokens, and the neural
    memory (the LMM mixer, every option of ``lmm``); combined as
    ``W_o (RMSNorm(y_attention) * sigmoid(RMSNorm(y_memory)))``. The paper prepends the
    persistent tokens to the memory's input too; here the memory's learned initial weights play
    that part (storing a fixed learned prefix from a learned start is itself a learned start).
    Decoding cache: the attention window's keys and values and the memory's cache.
    """

    # The block's short convolution goes in front, as for attention: the attention branch reads
    # x unconvolved (the memory branch keeps its own convolutions after it).
    own_short_conv = False
    window: int = 64
    attn_heads: int = 2
    persistent_tokens: int = 4

    @nn.compact
    def __call__(self, x, cache=None):
        attention = Attention(self.d_model, self.attn_heads, self.window, self.persistent_tokens,
                              name="attention")
        memory = NeuralMemory(**self._memory_options(), name="memory")
        if cache is None:
            y, m = attention(x), memory(x)
        else:
            (y, attention_cache), (m, memory_cache) = (attention(x, cache["attention"]),
                                                       memory(x, cache["memory"]))
        gated = (nn.RMSNorm(name="attention_norm")(y)
                 * jax.nn.sigmoid(nn.RMSNorm(name="memory_norm")(m)))
        out = initializers.dense_out(self.d_model, name="out")(gated)
        return out if cache is None else (out, {"attention": attention_cache,
                                                "memory": memory_cache})

    def _memory_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(NeuralMemory)
                if f.name not in ("parent", "name")}

    def init_cache(self, batch_size: int, max_len: int) -> dict:
        attention = Attention(self.d_model, self.attn_heads, self.window, self.persistent_tokens,
                              parent=None)
        memory = NeuralMemory(**self._memory_options(), parent=None)
        return {"attention": attention.init_cache(batch_size, max_len),
                "memory": memory.init_cache(batch_size, max_len)}
