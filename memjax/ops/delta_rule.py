"""The delta rule (DeltaNet) and the gated delta rule (Gated DeltaNet).

Recurrence (one head; ``S`` is the ``[K, V]`` memory, ``beta_t`` the writing strength, ``g_t <= 0``
the log decay)::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t          # the current token is included

computed in the equivalent "decay, then correct against the decayed state" order::

    S'_t = exp(g_t) S_{t-1};  u_t = beta_t (v_t - S'_t^T k_t);  S_t = S'_t + k_t u_t^T

``g=None`` is DeltaNet (no decay). ``beta`` may lie anywhere in (0, 2): beta > 1 gives the
transition a negative eigenvalue (needed for state tracking) and nothing here assumes beta < 1.
Keys are not normalised here (layers do that); with unit-norm keys and beta in [0, 2] each
transition has spectral norm <= 1. ``scale`` defaults to ``K ** -0.5``.

Layout is sequence-first: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; beta, g ``[B, T, H]``; the
state is ``[B, H, K, V]``. Arithmetic happens in ``promote_types(input dtype, float32)``: float32
for float32 / bfloat16 / float16 inputs, float64 for float64 inputs under ``jax_enable_x64``. The
output ``o`` has v's dtype; the state has the accumulation dtype.

Forms (``impl``):

- ``"reference"``: token-by-token ``lax.scan``; the source of truth.
- ``"chunk"``: chunkwise-parallel form (WY representation / UT transform). Everything inside a
  chunk is batched over all chunks; only the state passed from chunk to chunk is a ``lax.scan``
  over T / C steps. See ``_chunk_form`` for the equations.
- ``"auto"``: the chunk form (no kernel has won a benchmark yet).

Gradients come from JAX autodiff of these forms.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops.linear_attention import (
    _acc_dtype,
    _check_chunk_size,
    _check_rank,
    _check_shape,
    _default_scale,
    _intra_chunk_decay,
    _pad_time,
    _validate,
)

__all__ = ["delta_rule", "delta_rule_step"]

IMPLS = ("auto", "reference", "chunk")


# ---------------------------------------------------------------------------------------------
# Validation and dtype helpers
# ---------------------------------------------------------------------------------------------


def _validate_seq(q, k, v, beta, g, initial_state) -> None:
    """Check the shapes of a sequence call; beta is ``[B, T, H]``."""
    _validate(q, k, v, g, initial_state)
    B, T, H, _ = q.shape
    _check_shape("beta", beta, (B, T, H), "[B, T, H]")


def _validate_step(q, k, v, beta, state, g) -> None:
    """Check the shapes of a one-token call (q, k ``[B,H,K]``, v ``[B,H,V]``, beta ``[B,H]``)."""
    _check_rank("q", q, 3, "[B, H, K]")
    _check_rank("k", k, 3, "[B, H, K]")
    _check_rank("v", v, 3, "[B, H, V]")
    B, H, K = q.shape
    V = v.shape[-1]
    _check_shape("k", k, (B, H, K), "[B, H, K] (same as q)")
    _check_shape("v", v, (B, H, V), "[B, H, V] (B, H as q)")
    _check_shape("beta", beta, (B, H), "[B, H]")
    _check_shape("state", state, (B, H, K, V), "[B, H, K, V]")
    if g is not None:
        _check_shape("g", g, (B, H), "[B, H]")


def _prepare(q, k, v, beta, g, initial_state):
    """Cast everything to the accumulation dtype; initial_state=None becomes zeros.

    g stays None when absent (the forms then skip every decay factor).
    """
    B, _, H, K = q.shape
    V = v.shape[-1]
    acc = _acc_dtype(q, k, v, beta, g)
    if initial_state is None:
        state = jnp.zeros((B, H, K, V), acc)
    else:
        state = initial_state.astype(acc)
    g = None if g is None else g.astype(acc)
    return q.astype(acc), k.astype(acc), v.astype(acc), beta.astype(acc), g, state


# ---------------------------------------------------------------------------------------------
# One-token step (also the body of the reference scan)
# ---------------------------------------------------------------------------------------------


def _step(q, k, v, beta, g, state, scale):
    """One recurrence step in the accumulation dtype; all inputs already cast.

    q, k ``[B, H, K]``, v ``[B, H, V]``, beta ``[B, H]``, g ``[B, H]`` or None,
    state ``[B, H, K, V]``.
    """
    if g is not None:
        state = jnp.exp(g)[..., None, None] * state  # S' = exp(g) S
    u = beta[..., None] * (v - jnp.einsum("bhk,bhkv->bhv", k, state))  # beta (v - S'^T k)
    state = state + k[..., :, None] * u[..., None, :]
    o = scale * jnp.einsum("bhk,bhkv->bhv", q, state)
    return o, state


def delta_rule_step(q, k, v, beta, state, g=None, *, scale=None):
    """Advance the (gated) delta rule by one token (decoding with a cached state).

    Computes ``S' = exp(g) (I - beta k k^T) S + beta k v^T`` and ``o = scale * S'^T q``.

    Args:
      q, k: ``[B, H, K]``.
      v: ``[B, H, V]``.
      beta: ``[B, H]`` writing strength, in (0, 2).
      state: ``[B, H, K, V]``, the state after the previous token.
      g: optional log-space decay ``[B, H]`` (g <= 0); None means no decay (DeltaNet).
      scale: output scale, default ``K ** -0.5``.

    Returns:
      ``(o, new_state)``: o ``[B, H, V]`` in v's dtype; new_state ``[B, H, K, V]`` in float32
      (float64 for float64 inputs).
    """
    _validate_step(q, k, v, beta, state, g)
    acc = _acc_dtype(q, k, v, beta, g)
    scale = _default_scale(scale, q.shape[-1])
    o, new_state = _step(
        q.astype(acc),
        k.astype(acc),
        v.astype(acc),
        beta.astype(acc),
        None if g is None else g.astype(acc),
        state.astype(acc),
        scale,
    )
    return o.astype(v.dtype), new_state


# ---------------------------------------------------------------------------------------------
# Reference form: token-by-token scan
# ---------------------------------------------------------------------------------------------


@jax.jit
def _reference_form(q, k, v, beta, g, initial_state, scale):
    """Token-by-token scan of the recurrence. Returns (o in v's dtype, final state)."""
    out_dtype = v.dtype
    q, k, v, beta, g, state = _prepare(q, k, v, beta, g, initial_state)

    def body(s, xs):
        q_t, k_t, v_t, beta_t, g_t = xs
        o_t, s = _step(q_t, k_t, v_t, beta_t, g_t, s, scale)
        return s, o_t

    time_major = [None if x is None else jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, g)]
    state, o = jax.lax.scan(body, state, time_major)
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), state


# ---------------------------------------------------------------------------------------------
# Chunk form
# ---------------------------------------------------------------------------------------------


def _small_matmul(x, y):
    """x @ y over the last two axes as a broadcast multiply-sum (for tiny blocks, where a
    batched dot would spend its time on per-matrix overhead)."""
    return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)


def _unit_lower_inverse(a, small_block: int = 8):
    """(I + a)^-1 for strictly lower-triangular ``a`` ``[..., C, C]``, by recursive doubling.

    The inverse of a unit lower-triangular 2 x 2 block matrix is
    ``[[L11, 0], [L21, L22]]^-1 = [[T11, 0], [-T22 L21 T11, T22]]`` with ``Tii = Lii^-1``.
    Starting from 1 x 1 diagonal blocks (all ones) each level merges neighbouring pairs of
    diagonal blocks, batched over all pairs, so the whole inverse is log2(C) levels of batched
    matmuls (about C^3 / 3 multiply-adds) with a plain matmul backward; no LAPACK call (whose
    batched CPU triangular solve is several times slower here, forward and backward). This is
    the standard recursive triangular inversion: every block it forms is a block of the final
    inverse, so nothing grows beyond the inverse's own entries. C is zero-padded to a power of
    two (the padded part of the inverse is the identity and is sliced off).
    """
    C = a.shape[-1]
    P = 1 << (C - 1).bit_length()  # next power of two >= C
    batch = a.shape[:-2]
    if P != C:
        a = jnp.pad(a, [(0, 0)] * len(batch) + [(0, P - C), (0, P - C)])

    # Lower-left blocks to merge at each level, read top-down from the diagonal blocks of a.
    lower_left = {}
    diag_blocks = a[..., None, :, :]  # [..., P / size, size, size]
    size = P
    while size > 1:
        h = size // 2
        lower_left[h] = diag_blocks[..., h:, :h]
        halves = (diag_blocks[..., :h, :h], diag_blocks[..., h:, h:])
        diag_blocks = jnp.stack(halves, axis=-3).reshape(*batch, -1, h, h)
        size = h

    # Bottom-up: inv holds the inverted diagonal blocks of the current size s.
    inv = jnp.ones((*batch, P, 1, 1), a.dtype)
    s = 1
    while s < P:
        pairs = inv.reshape(*batch, -1, 2, s, s)
        t11, t22 = pairs[..., 0, :, :], pairs[..., 1, :, :]
        mm = _small_matmul if s <= small_block else jnp.matmul
        t21 = -mm(mm(t22, lower_left[s]), t11)
        top = jnp.concatenate([t11, jnp.zeros_like(t11)], axis=-1)
        bottom = jnp.concatenate([t21, t22], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        s *= 2
    return inv[..., 0, :C, :C]


@jax.custom_vjp
def _ut_transform(a, r1, r2):
    """(X1, X2) = (I + a)^-1 (r1, r2) for strictly lower-triangular ``a`` ``[..., C, C]``.

    A hand-written VJP keeps only the inverse and the two results for the backward (instead
    of every level of the recursive inverse): with T = (I + a)^-1,
    ``dr = T^T dX`` and ``da = -strictly_lower(sum dr X^T)``.
    """
    t = _unit_lower_inverse(a)
    return t @ r1, t @ r2


def _ut_transform_fwd(a, r1, r2):
    t = _unit_lower_inverse(a)
    x1, x2 = t @ r1, t @ r2
    return (x1, x2), (t, x1, x2)


def _ut_transform_bwd(res, cotangents):
    t, x1, x2 = res
    dx1, dx2 = cotangents
    t_transposed = jnp.swapaxes(t, -1, -2)
    dr1, dr2 = t_transposed @ dx1, t_transposed @ dx2
    da = -(dr1 @ jnp.swapaxes(x1, -1, -2) + dr2 @ jnp.swapaxes(x2, -1, -2))
    C = t.shape[-1]
    da = jnp.where(jnp.tril(jnp.ones((C, C), dtype=bool), -1), da, 0.0)
    return da, dr1, dr2


_ut_transform.defvjp(_ut_transform_fwd, _ut_transform_bwd)


@jax.custom_vjp
def _state_recurrence(w, u, k_end, decay, s0):
    """The sequential part of the chunk form: a ``lax.scan`` over the N chunks.

    Per chunk n (leading axis of w, u ``[N, B, H, C, K|V]``, k_end ``[N, B, H, C, K]``, decay
    ``[N, B, H]``), from the chunk-start state S_n ``[B, H, K, V]``::

        V_new_n = U_n - W_n S_n
        S_{n+1} = decay_n S_n + K_end_n^T V_new_n

    Returns (chunk-start states ``[N, B, H, K, V]``, V_new ``[N, B, H, C, V]``, S_N).

    The hand-written VJP runs one reverse scan that only carries dS and emits dS_{n+1} and
    dV_new per chunk; every other gradient is then one batched product over all chunks. It
    stores nothing beyond the outputs and inputs (autodiff of the scan keeps extra copies).
    """
    return _state_recurrence_fwd(w, u, k_end, decay, s0)[0]


def _state_recurrence_fwd(w, u, k_end, decay, s0):
    def body(s, xs):
        w_n, u_n, k_n, decay_n = xs
        v_new = u_n - jnp.einsum("bhck,bhkv->bhcv", w_n, s)
        s_next = decay_n[..., None, None] * s + jnp.einsum("bhck,bhcv->bhkv", k_n, v_new)
        return s_next, (s, v_new)  # emit the chunk-start state and the pseudo-values

    s_final, (chunk_start, v_new) = jax.lax.scan(body, s0, (w, u, k_end, decay))
    return (chunk_start, v_new, s_final), (w, k_end, decay, chunk_start, v_new)


def _state_recurrence_bwd(res, cotangents):
    w, k_end, decay, chunk_start, v_new = res
    d_chunk_start, d_v_new, d_s_final = cotangents

    def body(ds_next, xs):  # ds_next: cotangent of S_{n+1}
        w_n, k_n, decay_n, d_start_n, d_v_new_n = xs
        dv = d_v_new_n + jnp.einsum("bhck,bhkv->bhcv", k_n, ds_next)
        ds = decay_n[..., None, None] * ds_next - jnp.einsum("bhck,bhcv->bhkv", w_n, dv)
        return ds + d_start_n, (ds_next, dv)

    ds0, (ds_next, dv) = jax.lax.scan(
        body, d_s_final, (w, k_end, decay, d_chunk_start, d_v_new), reverse=True
    )
    dw = -jnp.einsum("nbhcv,nbhkv->nbhck", dv, chunk_start)
    dk_end = jnp.einsum("nbhcv,nbhkv->nbhck", v_new, ds_next)
    d_decay = jnp.einsum("nbhkv,nbhkv->nbh", chunk_start, ds_next)
    return dw, dv, dk_end, d_decay, ds0


_state_recurrence.defvjp(_state_recurrence_fwd, _state_recurrence_bwd)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _chunk_form(q, k, v, beta, g, initial_state, scale, *, chunk_size: int):
    """Chunkwise-parallel form (WY representation / UT transform). Returns (o, final state).

    For chunk n with start state S, positions i, j = 1..C in the chunk and b = chunk-local
    cumsum of g (b_C its last entry; b = 0 for DeltaNet), unrolling the recurrence gives

      S_i = exp(b_i) S + sum_{j <= i} exp(b_i - b_j) k_j u_j^T

    with pseudo-values u_i = beta_i (v_i - exp(b_i) S^T k_i - sum_{j<i} exp(b_i - b_j)
    (k_i . k_j) u_j). In matrix form (I + A) U_new = diag(beta) V - diag(beta exp(b)) K S with

      A_ij = beta_i (k_i . k_j) exp(b_i - b_j)  for i > j, else 0   (unit lower triangular I + A)

    so with W = (I + A)^-1 diag(beta exp(b)) K and U = (I + A)^-1 diag(beta) V (both found by
    one small triangular inverse per chunk, batched over all chunks):

      V_new   = U - W S                                             (sequential part)
      S_next  = exp(b_C) S + (K ⊙ exp(b_C - b))^T V_new             (sequential part)
      O       = scale * [ (Q ⊙ exp(b)) S + ((Q K^T) ⊙ D) V_new ],   D_ij = exp(b_i - b_j), i >= j

    Every exponent is masked before the exp and is <= 0, so nothing overflows however strong
    the decay. Only V_new and S_next are computed inside the ``lax.scan`` over chunks; the scan
    emits the chunk-start states and V_new, and the output is one batched product afterwards.
    Arrays are laid out ``[N, B, H, C, ...]`` (chunk-major, so the scan slices the leading axis,
    and (B, H) lead every C x C / C x K product as batch dimensions).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    out_dtype = v.dtype
    q, k, v, beta, g, state = _prepare(q, k, v, beta, g, initial_state)
    N = -(-T // C)  # ceil(T / C)

    # Zero padding at the end is an exact no-op on the final state: beta = k = 0 makes the
    # padded rows of A, W and U zero, so V_new = 0 there and k = 0 adds nothing; g = 0 leaves
    # b_C equal to the last real token's b. Padded outputs are sliced off.
    def chunked(x):  # [B, T, H, ...] -> [N, B, H, C, ...]
        x = _pad_time(x, N * C)
        x = x.reshape(B, N, C, H, *x.shape[3:])
        return jnp.moveaxis(x, (1, 3), (0, 2)).reshape(N, B, H, C, *x.shape[4:])

    qc, kc, vc = chunked(q), chunked(k), chunked(v)  # [N, B, H, C, K or V]
    betac = chunked(beta)  # [N, B, H, C]

    kk = jnp.einsum("nbhik,nbhjk->nbhij", kc, kc)
    qk = jnp.einsum("nbhik,nbhjk->nbhij", qc, kc)
    strictly_lower = jnp.tril(jnp.ones((C, C), dtype=bool), -1)
    if g is None:
        causal = jnp.tril(jnp.ones((C, C), dtype=bool))
        a = jnp.where(strictly_lower, betac[..., :, None] * kk, 0.0)
        w_rhs = betac[..., None] * kc
        k_to_end = kc
        q_from_start = qc
        chunk_decay = None
        scores = jnp.where(causal, qk, 0.0)
    else:
        b = jnp.cumsum(chunked(g), axis=-1)  # [N, B, H, C]
        b_last = b[..., -1]  # [N, B, H]
        decay = _intra_chunk_decay(b)  # exp(b_i - b_j) for i >= j, else 0; exponents <= 0
        a = jnp.where(strictly_lower, betac[..., :, None] * kk * decay, 0.0)
        w_rhs = (betac * jnp.exp(b))[..., None] * kc
        # b_C - b_i <= 0: never overflows (unlike exp(b_C) * exp(-b_i)).
        k_to_end = kc * jnp.exp(b_last[..., None] - b)[..., None]
        q_from_start = qc * jnp.exp(b)[..., None]
        chunk_decay = jnp.exp(b_last)
        scores = qk * decay

    # UT transform: [W | U] = (I + A)^-1 [beta e^b K | beta V], batched over all chunks.
    w, u = _ut_transform(a, w_rhs, betac[..., None] * vc)

    # Inter-chunk recurrence: the only sequential part, T / C steps.
    if chunk_decay is None:
        chunk_decay = jnp.ones(betac.shape[:-1], betac.dtype)  # exact no-op factor
    chunk_start, v_new, state = _state_recurrence(w, u, k_to_end, chunk_decay, state)

    o = jnp.einsum("nbhck,nbhkv->nbhcv", q_from_start, chunk_start)
    o = o + jnp.einsum("nbhij,nbhjv->nbhiv", scores, v_new)
    o = scale * o  # [N, B, H, C, V]
    o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(B, N * C, H, V)[:, :T]
    return o.astype(out_dtype), state


# ---------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------


def delta_rule(
    q, k, v, beta, g=None, *, scale=None, initial_state=None, impl="auto", chunk_size=64
):
    """The (gated) delta rule over a sequence.

    Implements ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` and
    ``o_t = scale * S_t^T q_t`` (output includes the current token), from
    ``S_0 = initial_state``.

    Args:
      q, k: ``[B, T, H, K]``. Keys are used as given (normalise them before calling).
      v: ``[B, T, H, V]``.
      beta: ``[B, T, H]`` writing strength; values in (0, 2) are supported (beta > 1 gives
        negative transition eigenvalues). Not checked, the values may be traced.
      g: optional log-space decay per head ``[B, T, H]``; values must be <= 0 (not checked).
        None means no decay (DeltaNet).
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
    _validate_seq(q, k, v, beta, g, initial_state)

    scale = _default_scale(scale, q.shape[-1])
    args = (q, k, v, beta, g, initial_state, scale)
    if impl == "reference":
        return _reference_form(*args)
    # "chunk" and "auto". A chunk longer than the sequence would only add padding work.
    return _chunk_form(*args, chunk_size=max(1, min(chunk_size, q.shape[1])))
