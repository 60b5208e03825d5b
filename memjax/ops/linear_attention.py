"""Linear attention with an optional log-space decay (per head or per key channel).

Recurrence (one head; ``S`` is the ``[K, V]`` memory, ``g_t <= 0`` the log decay)::

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t          # the current token is included

``g`` is ``[B, T, H]`` (one decay per head, the same for every key channel: ``g=None`` is plain
linear attention, a constant gives retention, a per-token value simple GLA) or ``[B, T, H, K]``
(one decay per key channel: GLA). ``scale`` defaults to ``K ** -0.5``.

Normalizer (``normalize=True``): a second memory ``z_t = diag(exp(g_t)) z_{t-1} + k_t`` (the
same recurrence with ``v_t`` replaced by 1) and ``o_t = scale S_t^T q_t / (scale q_t . z_t +
NORMALIZER_EPS)`` with ``NORMALIZER_EPS = 1e-6``. The scale cancels up to the epsilon, so with
positive feature maps ``o_t`` is a decayed weighted average of the values. ``z`` travels as one
extra value column of the state: ``[B, H, K, V + 1]`` with ``state[..., :V] = S`` and
``state[..., V] = z``. That is exactly what running the operator on ``[v, 1]`` produces, so every
form computes ``z`` with the code that computes ``S``, and split-and-resume and step decoding
carry it with no extra argument. ``initial_state`` must then be ``[B, H, K, V + 1]`` (None means
zeros). With ``normalize=False`` the state is ``[B, H, K, V]`` as always.

Layout is sequence-first: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; the state is
``[B, H, K, V]``. Arithmetic happens in ``promote_types(input dtype, float32)``: float32 for
float32 / bfloat16 / float16 inputs (the state is returned in float32), float64 when the inputs
are float64 under ``jax_enable_x64``. The output ``o`` has v's dtype.

Forms (``impl``):

- ``"reference"``: token-by-token ``lax.scan``; the source of truth.
- ``"chunk"``: chunkwise-parallel form, see ``_chunk_form``.
- ``"auto"``: the chunk form (no kernel has won a benchmark yet).

Gradients come from JAX autodiff of these forms.

Numerical safety of the chunk form: every ``exp`` it evaluates has an exponent ``<= 0`` (so
nothing overflows, whatever the decay; an underflow to 0 only happens where the exact factor is
below the smallest float), and masked entries get their exponent set to ``-inf`` *before* the
``exp`` (so no ``inf * 0`` in the forward pass and no ``0 * inf`` in the gradient). See
``_intra_chunk_decay`` (per head) and ``_intra_chunk_scores_per_channel`` (per channel).
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp

__all__ = ["linear_attention", "linear_attention_step", "NORMALIZER_EPS"]

IMPLS = ("auto", "reference", "chunk")

# Added to the normalizer ``scale * q_t . z_t`` before dividing (see the module docstring).
NORMALIZER_EPS = 1e-6

# Chunk form tuning (measured on a 2-core AVX-512 CPU, B=1 H=8 K=V=128, chunk 64): tokens per
# step of the outer scan, so that one step's operands stay in cache; and the longest sub-chunk
# of the per-channel intra-chunk trick. Neither changes results beyond float rounding.
_BLOCK_TOKENS = 1024
_SUB_CHUNK = 16


# ---------------------------------------------------------------------------------------------
# Validation and dtype helpers (some are shared with the other operator modules)
# ---------------------------------------------------------------------------------------------


def _check_shape(name: str, x, expected: tuple, what: str) -> None:
    """Raise a ValueError naming ``name`` if ``x.shape != expected``."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(x.shape)}")


def _check_rank(name: str, x, rank: int, what: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {what}, got shape {tuple(x.shape)}")


def _validate(q, k, v, g, initial_state) -> None:
    """Check a sequence call with a per-head g ``[B, T, H]`` (shared with other families)."""
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


def _check_gate(g, per_head: tuple, per_channel: tuple, what_head: str, what_channel: str):
    """g must have the per-head or the per-channel shape; the message names both."""
    if g is None or tuple(g.shape) in (tuple(per_head), tuple(per_channel)):
        return
    raise ValueError(
        f"g must have shape {what_head} = {tuple(per_head)} (per head) or {what_channel} = "
        f"{tuple(per_channel)} (per key channel), got {tuple(g.shape)}"
    )


def _state_shape(B, H, K, V, normalize: bool):
    if normalize:
        return (B, H, K, V + 1), "[B, H, K, V + 1] (normalize=True: last column is z)"
    return (B, H, K, V), "[B, H, K, V]"


def _validate_linear_attention(q, k, v, g, initial_state, normalize) -> None:
    """Check a sequence call: g per head ``[B, T, H]`` or per channel ``[B, T, H, K]``."""
    _check_rank("q", q, 4, "[B, T, H, K]")
    _check_rank("k", k, 4, "[B, T, H, K]")
    _check_rank("v", v, 4, "[B, T, H, V]")
    B, T, H, K = q.shape
    V = v.shape[-1]
    _check_shape("k", k, (B, T, H, K), "[B, T, H, K] (same as q)")
    _check_shape("v", v, (B, T, H, V), "[B, T, H, V] (B, T, H as q)")
    _check_gate(g, (B, T, H), (B, T, H, K), "[B, T, H]", "[B, T, H, K]")
    if initial_state is not None:
        shape, what = _state_shape(B, H, K, V, normalize)
        _check_shape("initial_state", initial_state, shape, what)


def _validate_step(q, k, v, state, g, normalize=False) -> None:
    """Check the shapes of a one-token call (q, k ``[B,H,K]``, v ``[B,H,V]``, ...)."""
    _check_rank("q", q, 3, "[B, H, K]")
    _check_rank("k", k, 3, "[B, H, K]")
    _check_rank("v", v, 3, "[B, H, V]")
    B, H, K = q.shape
    V = v.shape[-1]
    _check_shape("k", k, (B, H, K), "[B, H, K] (same as q)")
    _check_shape("v", v, (B, H, V), "[B, H, V] (B, H as q)")
    shape, what = _state_shape(B, H, K, V, normalize)
    _check_shape("state", state, shape, what)
    _check_gate(g, (B, H), (B, H, K), "[B, H]", "[B, H, K]")


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


def _prepare(q, k, v, g, initial_state, normalize=False):
    """Cast to the accumulation dtype (g=None stays None); initial_state=None becomes zeros.

    With ``normalize`` a column of ones is appended to v (so the last column of the state, and of
    the output, is the normalizer; see the module docstring).
    """
    B, T, H, K = q.shape
    acc = _acc_dtype(q, k, v, g)
    v = v.astype(acc)
    if normalize:
        v = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), acc)], axis=-1)
    if initial_state is None:
        state = jnp.zeros((B, H, K, v.shape[-1]), acc)
    else:
        state = initial_state.astype(acc)
    g = None if g is None else g.astype(acc)
    return q.astype(acc), k.astype(acc), v, g, state


def _normalize_output(o_aug):
    """Split ``[..., V + 1]`` into numerator and normalizer: ``o[..., :V] / (o[..., V] + eps)``."""
    return o_aug[..., :-1] / (o_aug[..., -1:] + NORMALIZER_EPS)


# ---------------------------------------------------------------------------------------------
# One-token step (also the body of the reference scan)
# ---------------------------------------------------------------------------------------------


def _step(q, k, v, g, state, scale):
    """One recurrence step in the accumulation dtype; all inputs already cast.

    q, k ``[B, H, K]``, v ``[B, H, V]``, g None, ``[B, H]`` or ``[B, H, K]``, state
    ``[B, H, K, V]``.
    """
    if g is not None:
        decay = jnp.exp(g)[..., None] if g.ndim == 3 else jnp.exp(g)[..., None, None]
        state = decay * state
    state = state + k[..., :, None] * v[..., None, :]
    o = scale * jnp.einsum("bhk,bhkv->bhv", q, state)
    return o, state


def linear_attention_step(q, k, v, state, g=None, *, scale=None, normalize=False):
    """Advance the recurrence by one token (decoding with a cached state).

    Computes ``S' = diag(exp(g)) S + k v^T`` and ``o = scale * S'^T q`` (with ``normalize``, also
    ``z' = diag(exp(g)) z + k`` and ``o = scale S'^T q / (scale q . z' + NORMALIZER_EPS)``).

    Args:
      q, k: ``[B, H, K]``.
      v: ``[B, H, V]``.
      state: ``[B, H, K, V]``, the state after the previous token; ``[B, H, K, V + 1]`` with
        ``normalize=True`` (last column: the normalizer z).
      g: optional log-space decay (g <= 0), ``[B, H]`` per head or ``[B, H, K]`` per key channel;
        None means no decay.
      scale: output scale, default ``K ** -0.5``.
      normalize: divide by the normalizer (see the module docstring).

    Returns:
      ``(o, new_state)``: o ``[B, H, V]`` in v's dtype; new_state of the state's shape in
      float32 (float64 for float64 inputs).
    """
    _validate_step(q, k, v, state, g, normalize)
    acc = _acc_dtype(q, k, v, g)
    scale = _default_scale(scale, q.shape[-1])
    v_acc = v.astype(acc)
    if normalize:
        v_acc = jnp.concatenate([v_acc, jnp.ones((*v.shape[:-1], 1), acc)], axis=-1)
    o, new_state = _step(
        q.astype(acc), k.astype(acc), v_acc, None if g is None else g.astype(acc),
        state.astype(acc), scale,
    )  # fmt: skip
    if normalize:
        o = _normalize_output(o)
    return o.astype(v.dtype), new_state


# ---------------------------------------------------------------------------------------------
# Reference form: token-by-token scan
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("normalize",))
def _reference_form(q, k, v, g, initial_state, scale, normalize=False):
    """Token-by-token scan of the recurrence. Returns (o in v's dtype, final state)."""
    out_dtype = v.dtype
    q, k, v, g, state = _prepare(q, k, v, g, initial_state, normalize)

    def body(s, xs):
        q_t, k_t, v_t, g_t = xs
        o_t, s = _step(q_t, k_t, v_t, g_t, s, scale)
        return s, o_t

    time_major = [None if x is None else jnp.moveaxis(x, 1, 0) for x in (q, k, v, g)]
    state, o = jax.lax.scan(body, state, time_major)
    o = jnp.moveaxis(o, 0, 1)
    if normalize:
        o = _normalize_output(o)
    return o.astype(out_dtype), state


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


def _sub_chunk_size(C: int) -> int:
    """Largest divisor of C that is <= _SUB_CHUNK."""
    return max(c for c in range(1, min(C, _SUB_CHUNK) + 1) if C % c == 0)


@jax.checkpoint  # recomputed in the backward pass: no [.., c, c, K] residuals are stored
def _intra_chunk_scores_per_channel(q, k, b):
    """A[..., i, j] = sum_d q_id k_jd exp(b_id - b_jd) for i >= j, else 0 (per-channel decay).

    q, k, b: ``[..., C, K]``, b the chunk-local cumulative log decay (non-increasing along C).
    The decay is channel dependent, so A is not (Q ⊙ x)(K ⊙ y)^T for a single pair x, y whose
    factors are all bounded. Sub-chunk trick: split the chunk into n sub-chunks of c tokens and
    let e_J be b at the last token of sub-chunk J (e_{-1} = 0, the chunk start).

    - Off-diagonal sub-blocks (query sub-chunk I > key sub-chunk J) are a matmul of
      ``q_i exp(b_i - e_{I-1})`` with ``k_j exp(e_J - b_j) exp(e_{I-1} - e_J)``: each exponent is
      <= 0 because b is non-increasing and i >= start of I > end of J (so the factors are <= 1 and
      their product is exactly exp(b_i - b_j)). Key sub-chunks J >= I get exponent -inf (zero).
    - Diagonal c x c sub-blocks have no reference point between every query and key, so they are
      computed elementwise, exp(b_i - b_j) with exponent <= 0 for i >= j and -inf above.

    Cost per token and head: about 2 C K for the matmul (like the per-head case) plus
    (c + 2) K exponentials; c = 16 by default.
    """
    *lead, C, K = q.shape
    c = _sub_chunk_size(C)
    n = C // c
    qs, ks, bs = (x.reshape(*lead, n, c, K) for x in (q, k, b))
    end = bs[..., -1, :]  # [..., n, K]: e_J
    ref = jnp.concatenate([jnp.zeros_like(end[..., :1, :]), end[..., :-1, :]], axis=-2)  # e_{I-1}

    # Off-diagonal sub-blocks as one batched matmul over the query sub-chunks I.
    q_off = qs * jnp.exp(bs - ref[..., :, None, :])  # [..., n(I), c, K]
    k_loc = ks * jnp.exp(end[..., :, None, :] - bs)  # [..., n(J), c, K]
    below = jnp.tril(jnp.ones((n, n), dtype=bool), -1)[:, :, None]  # I > J
    cross = jnp.exp(jnp.where(below, ref[..., :, None, :] - end[..., None, :, :], -jnp.inf))
    k_off = (cross[..., :, :, None, :] * k_loc[..., None, :, :, :]).reshape(*lead, n, C, K)
    a_off = jnp.einsum("...ik,...jk->...ij", q_off, k_off)  # [..., n(I), c, C]

    # Diagonal sub-blocks, elementwise over the key channels.
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))[:, :, None]
    diff = bs[..., :, None, :] - bs[..., None, :, :]  # [..., n, c, c, K]
    w = jnp.exp(jnp.where(causal, diff, -jnp.inf))
    a_diag = jnp.sum(qs[..., :, None, :] * ks[..., None, :, :] * w, axis=-1)  # [..., n, c, c]

    on_diag = jnp.eye(n, dtype=q.dtype)[:, None, :, None]  # [n(I), 1, n(J), 1]
    a = a_off.reshape(*lead, n, c, n, c) + a_diag[..., :, :, None, :] * on_diag
    return a.reshape(*lead, C, C)


def _chunk_block(state, xs):
    """One step of the outer scan: M chunks of C tokens, for all batch rows and heads at once.

    xs = (q, k, v, g): q (already scaled), k ``[B, H, M, C, K]``; v ``[B, H, M, C, V]``; g None,
    ``[B, H, M, C]`` or ``[B, H, M, C, K]``. state ``[B, H, K, V]``: the state before the block.
    Returns (state after the block, o ``[B, H, M, C, V]``).
    """
    q, k, v, g = xs
    M, C = q.shape[2], q.shape[3]
    scores = jnp.einsum("bhmik,bhmjk->bhmij", q, k)
    if g is None:
        scores = scores * jnp.tril(jnp.ones((C, C), q.dtype))  # one [C, C] mask, broadcast
        q_in, k_out, chunk_decay = q, k, None
    elif g.ndim == 4:  # per head: b [B, H, M, C]
        b = jnp.cumsum(g, axis=-1)
        b_last = b[..., -1:]
        scores = scores * _intra_chunk_decay(b)
        q_in = q * jnp.exp(b)[..., None]  # decay from the chunk start to token i
        k_out = k * jnp.exp(b_last - b)[..., None]  # decay from token i to the chunk end, <= 1
        chunk_decay = jnp.exp(b_last)[..., None]  # [B, H, M, 1, 1]
    else:  # per key channel: b [B, H, M, C, K]
        b = jnp.cumsum(g, axis=-2)
        b_last = b[..., -1:, :]
        scores = _intra_chunk_scores_per_channel(q, k, b)
        q_in = q * jnp.exp(b)
        k_out = k * jnp.exp(b_last - b)
        chunk_decay = jnp.swapaxes(jnp.exp(b_last), -1, -2)  # [B, H, M, K, 1]
    o = jnp.einsum("bhmij,bhmjv->bhmiv", scores, v)
    # What each chunk adds to the state, decayed to the chunk end.
    update = jnp.einsum("bhmck,bhmcv->bhmkv", k_out, v)

    # The sequential part: M steps of S <- exp(b_C) S + update, recording each chunk's start.
    starts = []
    for m in range(M):
        starts.append(state)
        decayed = state if chunk_decay is None else chunk_decay[:, :, m] * state
        state = decayed + update[:, :, m]
    starts = jnp.stack(starts, axis=2)  # [B, H, M, K, V]

    # Inter-chunk output: queries read the chunk-start state, decayed to their position.
    o = o + jnp.einsum("bhmik,bhmkv->bhmiv", q_in, starts)
    return state, o


@functools.partial(jax.jit, static_argnames=("chunk_size", "normalize"))
def _chunk_form(q, k, v, g, initial_state, scale, *, chunk_size: int, normalize=False):
    """Chunkwise-parallel form. Returns (o in v's dtype, final state).

    For chunk n with start state S_n and b = chunk-local cumsum of g (b_C its last entry; with a
    per-channel g, ``exp(b)`` scales the key channels and ``exp(b_C)`` is ``diag(exp(b_C))``):

      O_n     = scale * [ (Q ⊙ exp(b)) S_n + A_n V ],   A_n[i, j] = q_i . (k_j ⊙ exp(b_i - b_j)), i >= j
      S_{n+1} = exp(b_C) S_n + Σ_i (k_i ⊙ exp(b_C - b_i)) v_i^T

    Two levels, for speed on CPU: the sequence is cut into blocks of M chunks (about
    ``_BLOCK_TOKENS`` tokens) and a ``lax.scan`` over blocks carries the state. Inside a block all
    chunk products (Q K^T, A V, the state updates, Q S) are batched matmuls over (B, H, M) whose
    operands fit in cache (one batched matmul over all chunks of a long sequence streams hundreds
    of MB and runs at a fraction of the matmul rate), and the M-step state recurrence is unrolled.
    Every exponent is <= 0: see ``_intra_chunk_decay`` and ``_intra_chunk_scores_per_channel``.
    """
    B, T, H, K = q.shape
    C = chunk_size
    out_dtype = v.dtype
    q, k, v, g, state = _prepare(q, k, v, g, initial_state, normalize)
    V = v.shape[-1]  # V + 1 with the normalizer column

    # Blocks of M chunks; M is balanced so that padding stays below one chunk per block.
    N = -(-T // C)
    M = max(1, min(_BLOCK_TOKENS // C, N))
    num_blocks = -(-N // M)
    M = -(-N // num_blocks)
    T_pad = num_blocks * M * C

    def blocked(x):  # [B, T, H, ...] -> [num_blocks, B, H, M, C, ...]
        x = _pad_time(x, T_pad).reshape(B, num_blocks, M, C, H, *x.shape[3:])
        return x.transpose(1, 0, 4, 2, 3, *range(5, x.ndim))

    xs = (blocked(q * scale), blocked(k), blocked(v), None if g is None else blocked(g))
    state, o = jax.lax.scan(_chunk_block, state, xs)
    o = o.transpose(1, 0, 3, 4, 2, 5).reshape(B, T_pad, H, V)[:, :T]
    if normalize:
        o = _normalize_output(o)
    return o.astype(out_dtype), state


# ---------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------


def linear_attention(
    q, k, v, g=None, *, scale=None, initial_state=None, normalize=False, impl="auto",
    chunk_size=64,
):  # fmt: skip
    """Decayed linear attention over a sequence.

    Implements ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`` and ``o_t = scale * S_t^T q_t``
    (output includes the current token), starting from ``S_0 = initial_state``.

    Args:
      q, k: ``[B, T, H, K]``.
      v: ``[B, T, H, V]``.
      g: optional log-space decay, ``[B, T, H]`` per head or ``[B, T, H, K]`` per key channel;
        values must be <= 0 (not checked, the values may be traced). None means no decay.
      scale: output scale, default ``K ** -0.5``.
      initial_state: ``[B, H, K, V]`` state before the first token (``[B, H, K, V + 1]`` with
        ``normalize=True``); None means zeros.
      normalize: divide each output by ``scale * q_t . z_t + NORMALIZER_EPS``, z the decayed
        running sum of k, carried as the last column of the state (see the module docstring).
      impl: ``"reference"``, ``"chunk"`` or ``"auto"`` (currently the chunk form).
      chunk_size: tokens per chunk for the chunk form (any positive int; T need not be a
        multiple; chunks longer than T are shortened to T).

    Returns:
      ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state ``[B, H, K, V]``
      (``[B, H, K, V + 1]`` with ``normalize=True``) in float32 (float64 when the inputs are
      float64).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    chunk_size = _check_chunk_size(chunk_size)
    normalize = bool(normalize)
    _validate_linear_attention(q, k, v, g, initial_state, normalize)

    scale = _default_scale(scale, q.shape[-1])
    args = (q, k, v, g, initial_state, scale)
    if impl == "reference":
        return _reference_form(*args, normalize=normalize)
    # "chunk" and "auto". A chunk longer than the sequence would only add padding work.
    chunk_size = max(1, min(chunk_size, q.shape[1]))
    return _chunk_form(*args, chunk_size=chunk_size, normalize=normalize)
