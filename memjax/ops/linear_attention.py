"""Linear attention with an optional per-head log-space decay.

Recurrence (one head; ``S`` is the ``[K, V]`` memory, ``g_t <= 0`` the log decay)::

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t          # the current token is included

``g=None`` is plain (undecayed) linear attention; a constant ``g`` gives retention, a per-token
``g`` gives simple GLA. ``scale`` defaults to ``K ** -0.5``.

Layout is sequence-first: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g ``[B, T, H]``; the state
is ``[B, H, K, V]``. Arithmetic happens in ``promote_types(input dtype, float32)``: float32 for
float32 / bfloat16 / float16 inputs (the state is returned in float32), float64 when the inputs
are float64 under ``jax_enable_x64``. The output ``o`` has v's dtype.

Forms (``impl``):

- ``"reference"``: token-by-token ``lax.scan``; the source of truth.
- ``"chunk"``: chunkwise-parallel form. Within each chunk of C tokens the outputs are a masked,
  decayed attention product (parallel over all chunks); only the state passed from one chunk to
  the next is a sequential ``lax.scan`` over T / C steps.
- ``"auto"``: the chunk form (no kernel has won a benchmark yet).

Gradients come from JAX autodiff of these forms.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp

__all__ = ["linear_attention", "linear_attention_step"]

IMPLS = ("auto", "reference", "chunk")


# ---------------------------------------------------------------------------------------------
# Validation and dtype helpers
# ---------------------------------------------------------------------------------------------


def _check_shape(name: str, x, expected: tuple, what: str) -> None:
    """Raise a ValueError naming ``name`` if ``x.shape != expected``."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(x.shape)}")


def _check_rank(name: str, x, rank: int, what: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {what}, got shape {tuple(x.shape)}")


def _validate(q, k, v, g, initial_state) -> None:
    """Check the shapes of a sequence call (q, k ``[B,T,H,K]``, v ``[B,T,H,V]``, ...)."""
    _check_rank("q", q, 4, "[B, T, H, K]")
    _check_rank("k", k, 4, "[B, T, H, K]")
    _check_rank("v", v, 4, "[B, T, H, V]")
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_shape("k", k, (B, T, H, K), "[B, T, H, K] (same as q)")
    _check_shape("v", v, (B, T, H, V), "[B, T, H, V] (B, T, H as q)")
    if g is not None:
        _check_shape("g", g, (B, T, H), "[B, T, H]")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")


def _validate_step(q, k, v, state, g) -> None:
    """Check the shapes of a one-token call (q, k ``[B,H,K]``, v ``[B,H,V]``, ...)."""
    _check_rank("q", q, 3, "[B, H, K]")
    _check_rank("k", k, 3, "[B, H, K]")
    _check_rank("v", v, 3, "[B, H, V]")
    B, H, K = q.shape
    V = v.shape[-1]
    _check_shape("k", k, (B, H, K), "[B, H, K] (same as q)")
    _check_shape("v", v, (B, H, V), "[B, H, V] (B, H as q)")
    _check_shape("state", state, (B, H, K, V), "[B, H, K, V]")
    if g is not None:
        _check_shape("g", g, (B, H), "[B, H]")


def _check_chunk_size(chunk_size) -> int:
    # bool is an int subclass; chunk_size=True is almost certainly a mistake.
    if isinstance(chunk_size, bool):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    try:
        c = operator.index(chunk_size)
    except TypeError:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}") from None
    if c <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return c


def _acc_dtype(*arrays):
    """Dtype to accumulate in: the inputs' common dtype promoted to at least float32."""
    present = [a for a in arrays if a is not None]
    return jnp.promote_types(jnp.result_type(*present), jnp.float32)


def _default_scale(scale, K: int):
    return K**-0.5 if scale is None else scale


def _prepare(q, k, v, g, initial_state):
    """Cast to the accumulation dtype; g=None becomes zeros, initial_state=None zeros."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = _acc_dtype(q, k, v, g)
    g = jnp.zeros((B, T, H), acc) if g is None else g.astype(acc)  # exp(0) = 1: no decay
    if initial_state is None:
        state = jnp.zeros((B, H, K, V), acc)
    else:
        state = initial_state.astype(acc)
    return q.astype(acc), k.astype(acc), v.astype(acc), g, state


# ---------------------------------------------------------------------------------------------
# One-token step (also the body of the reference scan)
# ---------------------------------------------------------------------------------------------


def _step(q, k, v, g, state, scale):
    """One recurrence step in the accumulation dtype; all inputs already cast.

    q, k ``[B, H, K]``, v ``[B, H, V]``, g ``[B, H]``, state ``[B, H, K, V]``.
    """
    state = jnp.exp(g)[..., None, None] * state + k[..., :, None] * v[..., None, :]
    o = scale * jnp.einsum("bhk,bhkv->bhv", q, state)
    return o, state


def linear_attention_step(q, k, v, state, g=None, *, scale=None):
    """Advance the recurrence by one token (decoding with a cached state).

    Computes ``S' = exp(g) S + k v^T`` and ``o = scale * S'^T q``.

    Args:
      q, k: ``[B, H, K]``.
      v: ``[B, H, V]``.
      state: ``[B, H, K, V]``, the state after the previous token.
      g: optional log-space decay ``[B, H]`` (g <= 0); None means no decay.
      scale: output scale, default ``K ** -0.5``.

    Returns:
      ``(o, new_state)``: o ``[B, H, V]`` in v's dtype; new_state ``[B, H, K, V]`` in float32
      (float64 for float64 inputs).
    """
    _validate_step(q, k, v, state, g)
    acc = _acc_dtype(q, k, v, g)
    scale = _default_scale(scale, q.shape[-1])
    if g is None:
        g = jnp.zeros(q.shape[:2], acc)  # exp(0) = 1 exactly: no decay.
    o, new_state = _step(
        q.astype(acc), k.astype(acc), v.astype(acc), g.astype(acc), state.astype(acc), scale
    )
    return o.astype(v.dtype), new_state


# ---------------------------------------------------------------------------------------------
# Reference form: token-by-token scan
# ---------------------------------------------------------------------------------------------


@jax.jit
def _reference_form(q, k, v, g, initial_state, scale):
    """Token-by-token scan of the recurrence. Returns (o in v's dtype, final state)."""
    out_dtype = v.dtype
    q, k, v, g, state = _prepare(q, k, v, g, initial_state)

    def body(s, xs):
        q_t, k_t, v_t, g_t = xs
        o_t, s = _step(q_t, k_t, v_t, g_t, s, scale)
        return s, o_t

    time_major = [jnp.moveaxis(x, 1, 0) for x in (q, k, v, g)]
    state, o = jax.lax.scan(body, state, time_major)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), state


# ---------------------------------------------------------------------------------------------
# Chunk form
# ---------------------------------------------------------------------------------------------


def _pad_time(x, T_pad: int):
    """Zero-pad axis 1 (time) up to T_pad.

    Zeros are exact no-ops at the end of the sequence: g = 0 multiplies the state by exp(0) = 1
    and k = 0 adds k v^T = 0, so the final state is bit-for-bit the unpadded one; the padded
    outputs are sliced off.
    """
    pad = T_pad - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def _intra_chunk_decay(b):
    """D[..., i, j] = exp(b_i - b_j) for i >= j, else 0. b: ``[..., C]`` chunk-local cumsum.

    The mask is applied to the exponent (-inf) rather than to the result: for j > i the
    difference b_i - b_j is >= 0 and, with strong decay, exp of it overflows. Masking the result
    would give inf * 0 = NaN (multiplying by the mask) or a NaN gradient (where() after exp,
    since the cotangent of the unused inf branch is 0 * inf). Every exponent kept is <= 0.
    """
    C = b.shape[-1]
    causal = jnp.tril(jnp.ones((C, C), dtype=bool))
    diff = b[..., :, None] - b[..., None, :]
    return jnp.exp(jnp.where(causal, diff, -jnp.inf))


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _chunk_form(q, k, v, g, initial_state, scale, *, chunk_size: int):
    """Chunkwise-parallel form. Returns (o in v's dtype, final state).

    For chunk n with start state S_n and b = chunk-local cumsum of g (b_C its last entry):
      O_n     = scale * [ (Q ⊙ exp(b)) S_n + ((Q K^T) ⊙ D) V ]
      S_{n+1} = exp(b_C) S_n + Σ_i exp(b_C - b_i) k_i v_i^T
    All intra-chunk products are batched over chunks; only S_n -> S_{n+1} is sequential.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    out_dtype = v.dtype
    q, k, v, g, state = _prepare(q, k, v, g, initial_state)
    N = -(-T // C)  # ceil(T / C)

    def chunked(x):  # [B, T, H, ...] -> [B, N, C, H, ...]
        x = _pad_time(x, N * C)
        return x.reshape(B, N, C, *x.shape[2:])

    qc, kc, vc, gc = (chunked(x) for x in (q, k, v, g))

    # Chunk-local cumulative log-decay, laid out [B, N, H, C] so C is last for the C x C maps.
    b = jnp.cumsum(jnp.swapaxes(gc, 2, 3), axis=-1)
    b_last = b[..., -1]  # [B, N, H]: log-decay across the whole chunk.

    # Intra-chunk: causal, decayed attention inside each chunk (all chunks at once).
    scores = jnp.einsum("bnihk,bnjhk->bnhij", qc, kc) * _intra_chunk_decay(b)
    o_intra = jnp.einsum("bnhij,bnjhv->bnihv", scores, vc)

    # What each chunk adds to the state, decayed to the chunk end: Σ_i exp(b_C - b_i) k_i v_i^T.
    # b_C - b_i <= 0, so the factor never overflows (unlike exp(b_C) * exp(-b_i)).
    k_to_end = kc * jnp.exp(b_last[..., None] - b).transpose(0, 1, 3, 2)[..., None]
    chunk_update = jnp.einsum("bnihk,bnihv->bnhkv", k_to_end, vc)

    # Inter-chunk: the only sequential part, T / C steps of S_{n+1} = exp(b_C) S_n + update.
    def body(s, xs):
        decay, update = xs
        return jnp.exp(decay)[..., None, None] * s + update, s  # emit the chunk-start state

    state, chunk_start = jax.lax.scan(
        body, state, (jnp.moveaxis(b_last, 1, 0), jnp.moveaxis(chunk_update, 1, 0))
    )
    chunk_start = jnp.moveaxis(chunk_start, 0, 1)  # [B, N, H, K, V]

    # Inter-chunk output: queries read the chunk-start state, decayed to their position.
    q_decayed = qc * jnp.exp(b).transpose(0, 1, 3, 2)[..., None]
    o_inter = jnp.einsum("bnihk,bnhkv->bnihv", q_decayed, chunk_start)

    o = (scale * (o_inter + o_intra)).reshape(B, N * C, H, V)[:, :T]
    return o.astype(out_dtype), state


# ---------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------


def linear_attention(
    q, k, v, g=None, *, scale=None, initial_state=None, impl="auto", chunk_size=64
):
    """Decayed linear attention over a sequence.

    Implements ``S_t = exp(g_t) S_{t-1} + k_t v_t^T`` and ``o_t = scale * S_t^T q_t`` (output
    includes the current token), starting from ``S_0 = initial_state``.

    Args:
      q, k: ``[B, T, H, K]``.
      v: ``[B, T, H, V]``.
      g: optional log-space decay per head ``[B, T, H]``; values must be <= 0 (not checked,
        the values may be traced). None means no decay.
      scale: output scale, default ``K ** -0.5``.
      initial_state: ``[B, H, K, V]`` state before the first token; None means zeros.
      impl: ``"reference"``, ``"chunk"`` or ``"auto"`` (currently the chunk form).
      chunk_size: tokens per chunk for the chunk form (any positive int; T need not be a
        multiple; chunks longer than T are shortened to T).

    Returns:
      ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state ``[B, H, K, V]`` in
      float32 (float64 when the inputs are float64).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    chunk_size = _check_chunk_size(chunk_size)
    _validate(q, k, v, g, initial_state)

    scale = _default_scale(scale, q.shape[-1])
    args = (q, k, v, g, initial_state, scale)
    if impl == "reference":
        return _reference_form(*args)
    # "chunk" and "auto". A chunk longer than the sequence would only add padding work.
    return _chunk_form(*args, chunk_size=max(1, min(chunk_size, q.shape[1])))
