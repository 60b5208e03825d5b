"""The generalised delta rule of RWKV-7: per-channel decay plus a rank-one state correction.

Recurrence (one head; ``S`` is the ``[K, V]`` memory, key-major)::

    S_t = (diag(w_t) + a_t b_t^T) S_{t-1} + k_t v_t^T,     w_t = exp(g_t)
    o_t = scale * S_t^T q_t          # the current token is included

``g_t <= 0`` is a per-channel log decay (a vector over K); ``a_t`` and ``b_t`` are arbitrary
vectors over K. In RWKV-7 ``a = -kappa_hat`` (the removal direction), ``b = kappa_hat * lr`` (lr the
in-context learning rate, per channel, in (0, 1), or up to 2 for negative eigenvalues) and ``k`` is
the written key; the operator takes a, b, k as given and assumes nothing about them. ``scale``
defaults to ``K ** -0.5``. With ``g`` broadcast from one value per head, ``a = -exp(g) beta k``,
``b = k`` and written key ``beta k``, this is exactly the gated delta rule
``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``.

Layout is sequence-first: q, k, g, a, b ``[B, T, H, K]``; v ``[B, T, H, V]``; the state is
``[B, H, K, V]``. Arithmetic happens in ``promote_types(input dtype, float32)``: float32 for
float32 / bfloat16 / float16 inputs, float64 for float64 inputs under ``jax_enable_x64``. The
output ``o`` has v's dtype; the state has the accumulation dtype.

Forms (``impl``):

- ``"reference"``: token-by-token ``lax.scan``; the source of truth.
- ``"chunk"``: chunkwise-parallel form (a per-channel-decay UT transform; equations in
  ``_chunk_form``). Everything inside a chunk is batched over all chunks; only the state passed
  from chunk to chunk is a ``lax.scan`` over T / C steps. ``chunk_size`` must be a multiple of 16.
- ``"auto"``: the chunk form (no kernel has won a benchmark yet).

Gradients come from JAX autodiff of these forms.

Decay ratios in the chunk form (the numerically delicate part). The intra-chunk matrices need
``exp(c_i - c_j)`` per channel, c the chunk-local cumulative log decay. Writing that as
``exp(c_i) * exp(-c_j)`` overflows under strong decay (|c| reaches C * 30 with g ~ -30), so it is
never formed that way. We use the sub-chunk trick (GLA): the chunk is cut into sub-chunks of 16;
for a query sub-chunk I and the keys of all earlier sub-chunks, a reference point r_I (the
cumulative decay just before I) splits the ratio into ``exp(c_i - r_I) * exp(r_I - c_j)``, both
factors <= 1, so that block is a plain matmul; the 16 x 16 diagonal sub-blocks are computed
elementwise as ``exp(where(j < i, c_i - c_j, -inf))`` (masked in the exponent, so neither the
value nor its gradient sees an overflow). We chose this over an explicit ``[C, C, K]`` tensor of
ratios because it bounds the per-chunk decay tensors at ``16 * C * K`` (diagonal blocks) plus
``(C / 16) * C * K`` (keys rescaled once per query sub-chunk): 20 C K against 64 C K at C = 64
(about 3x less; 5x at C = 128), and it keeps the off-diagonal work in matmuls. On a CPU the
elementwise diagonal blocks still dominate the chunk form's cost. Every exponent that is
evaluated is <= 0 whenever g <= 0; positive g is outside the contract (not checked, the values may
be traced) and may overflow.
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
    _pad_time,
)

__all__ = ["generalized_delta_rule", "generalized_delta_rule_step"]

IMPLS = ("auto", "reference", "chunk")

# Sub-chunk length of the decay-ratio trick; chunk sizes must be multiples of it.
SUB_CHUNK = 16


# ---------------------------------------------------------------------------------------------
# Validation and dtype helpers
# ---------------------------------------------------------------------------------------------


def _validate(q, k, v, g, a, b, initial_state) -> None:
    """Check the shapes of a sequence call (q, k, g, a, b ``[B,T,H,K]``, v ``[B,T,H,V]``)."""
    _check_rank("q", q, 4, "[B, T, H, K]")
    _check_rank("v", v, 4, "[B, T, H, V]")
    B, T, H, K = q.shape
    V = v.shape[-1]
    for name, x in (("k", k), ("g", g), ("a", a), ("b", b)):
        if x is None and name == "g":
            continue
        _check_rank(name, x, 4, "[B, T, H, K]")
        _check_shape(name, x, (B, T, H, K), "[B, T, H, K] (same as q)")
    _check_shape("v", v, (B, T, H, V), "[B, T, H, V] (B, T, H as q)")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (B, H, K, V), "[B, H, K, V]")


def _validate_step(q, k, v, g, a, b, state) -> None:
    """Check the shapes of a one-token call (q, k, g, a, b ``[B,H,K]``, v ``[B,H,V]``)."""
    _check_rank("q", q, 3, "[B, H, K]")
    _check_rank("v", v, 3, "[B, H, V]")
    B, H, K = q.shape
    V = v.shape[-1]
    for name, x in (("k", k), ("g", g), ("a", a), ("b", b)):
        if x is None and name == "g":
            continue
        _check_rank(name, x, 3, "[B, H, K]")
        _check_shape(name, x, (B, H, K), "[B, H, K] (same as q)")
    _check_shape("v", v, (B, H, V), "[B, H, V] (B, H as q)")
    _check_shape("state", state, (B, H, K, V), "[B, H, K, V]")


def _check_gdr_chunk_size(chunk_size) -> int:
    c = _check_chunk_size(chunk_size)
    if c % SUB_CHUNK:
        raise ValueError(
            f"chunk_size must be a positive multiple of {SUB_CHUNK} (the sub-chunk the "
            f"per-channel decay is tiled by), got {c}"
        )
    return c


def _prepare(q, k, v, g, a, b, initial_state):
    """Cast to the accumulation dtype; g=None becomes zeros, initial_state=None zeros."""
    B, H, K, V = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    acc = _acc_dtype(q, k, v, g, a, b)
    g = jnp.zeros(q.shape, acc) if g is None else g.astype(acc)  # exp(0) = 1: no decay
    state = jnp.zeros((B, H, K, V), acc) if initial_state is None else initial_state.astype(acc)
    return (*(x.astype(acc) for x in (q, k, v)), g, a.astype(acc), b.astype(acc), state)


# ---------------------------------------------------------------------------------------------
# One-token step (also the body of the reference scan)
# ---------------------------------------------------------------------------------------------


def _step(q, k, v, g, a, b, state, scale):
    """One recurrence step in the accumulation dtype; all inputs already cast.

    q, k, g, a, b ``[B, H, K]``, v ``[B, H, V]``, state ``[B, H, K, V]``. Computes
    ``S' = diag(exp(g)) S + a (b^T S) + k v^T`` without forming the K x K transition.
    """
    u = jnp.einsum("bhk,bhkv->bhv", b, state)  # b^T S: what the correction removes/replaces
    state = (
        jnp.exp(g)[..., None] * state
        + a[..., :, None] * u[..., None, :]
        + k[..., :, None] * v[..., None, :]
    )
    o = scale * jnp.einsum("bhk,bhkv->bhv", q, state)
    return o, state


def generalized_delta_rule_step(q, k, v, g, a, b, state, *, scale=None):
    """Advance the recurrence by one token (decoding with a cached state).

    Computes ``S' = (diag(exp(g)) + a b^T) S + k v^T`` and ``o = scale * S'^T q``.

    Args:
      q, k: ``[B, H, K]``.
      v: ``[B, H, V]``.
      g: per-channel log-space decay ``[B, H, K]`` (g <= 0), or None for no decay.
      a, b: ``[B, H, K]``, the rank-one correction ``a b^T`` of the transition.
      state: ``[B, H, K, V]``, the state after the previous token.
      scale: output scale, default ``K ** -0.5``.

    Returns:
      ``(o, new_state)``: o ``[B, H, V]`` in v's dtype; new_state ``[B, H, K, V]`` in float32
      (float64 for float64 inputs).
    """
    _validate_step(q, k, v, g, a, b, state)
    scale = _default_scale(scale, q.shape[-1])
    # _prepare reads B, H, K from q.shape[0], [-2], [-1]: valid for [B, H, K] too.
    *xs, state = _prepare(q, k, v, g, a, b, state)
    o, new_state = _step(*xs, state, scale)
    return o.astype(v.dtype), new_state


# ---------------------------------------------------------------------------------------------
# Reference form: token-by-token scan
# ---------------------------------------------------------------------------------------------


@jax.jit
def _reference_form(q, k, v, g, a, b, initial_state, scale):
    """Token-by-token scan of the recurrence. Returns (o in v's dtype, final state)."""
    out_dtype = v.dtype
    *xs, state = _prepare(q, k, v, g, a, b, initial_state)

    def body(s, x):
        o_t, s = _step(*x, s, scale)
        return s, o_t

    state, o = jax.lax.scan(body, state, [jnp.moveaxis(x, 1, 0) for x in xs])
    return jnp.moveaxis(o, 0, 1).astype(out_dtype), state


# ---------------------------------------------------------------------------------------------
# Chunk form
# ---------------------------------------------------------------------------------------------


def _decayed_pairs(left, right, e, c):
    """Strictly lower-triangular per-channel-decayed inner products, for every chunk at once.

    ``P[x, y, ..., i, j] = sum_d left[x, ..., i, d] * right[y, ..., j, d] * exp(e[i, d] - c[j, d])``
    for j < i, and 0 for j >= i.

    left ``[X, ..., C, K]``, right ``[Y, ..., C, K]``; e, c ``[..., C, K]`` with e_i = c_{i-1}
    (the exclusive cumulative log decay) and c the inclusive one, both non-increasing in i when
    g <= 0. Returns ``[X, Y, ..., C, C]``.

    Sub-chunk trick (see the module docstring): with s = SUB_CHUNK and n = C / s sub-chunks,
    - keys in earlier sub-chunks: reference r_I = e at the first row of query sub-chunk I; the
      query factor exp(e_i - r_I) and the key factor exp(r_I - c_j) are both <= 1 (e_i <= r_I for
      i in I; c_j >= c_{start(I) - 1} = r_I for j < start(I)); then one matmul per sub-chunk;
    - keys in the same sub-chunk: elementwise exp(e_i - c_j), masked to j < i in the exponent.
    """
    C, K = c.shape[-2:]
    s = SUB_CHUNK
    n = C // s

    def sub(x):  # [..., C, K] -> [..., n, s, K]
        return x.reshape(*x.shape[:-2], n, s, K)

    left_s, right_s, e_s, c_s = sub(left), sub(right), sub(e), sub(c)

    # Diagonal s x s sub-blocks, elementwise. Masking the exponent (not the result) keeps the
    # value and its gradient finite: for j >= i the difference is >= 0 and may overflow.
    strict = jnp.tril(jnp.ones((s, s), dtype=bool), k=-1)[:, :, None]
    diff = e_s[..., :, None, :] - c_s[..., None, :, :]  # [..., n, s, s, K]
    ratio = jnp.exp(jnp.where(strict, diff, -jnp.inf))
    diag = jnp.einsum("x...nid,y...njd,...nijd->xy...nij", left_s, right_s, ratio)
    # Place the blocks on the block diagonal of the [C, C] matrix.
    pairs = jnp.einsum("...nij,nm->...nimj", diag, jnp.eye(n, dtype=diag.dtype))
    pairs = pairs.reshape(*pairs.shape[:-4], C, C)
    if n == 1:
        return pairs

    # Off-diagonal: query sub-chunk I against all keys before it.
    ref = e_s[..., :, 0, :]  # [..., n, K] = c_{start(I) - 1}
    left_off = left_s * jnp.exp(e_s - ref[..., :, None, :])  # [X, ..., n, s, K], factors <= 1
    before = (jnp.arange(C)[None, :] < s * jnp.arange(n)[:, None])[:, :, None]  # [n, C, 1]
    key_exp = jnp.where(before, ref[..., :, None, :] - c[..., None, :, :], -jnp.inf)
    right_off = right[..., None, :, :] * jnp.exp(key_exp)  # [Y, ..., n, C, K], factors <= 1
    off = jnp.einsum("x...nid,y...njd->xy...nij", left_off, right_off)  # [X, Y, ..., n, s, C]
    return pairs + off.reshape(*off.shape[:-3], C, C)


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _chunk_form(q, k, v, g, a, b, initial_state, scale, *, chunk_size: int):
    """Chunkwise-parallel form. Returns (o in v's dtype, final state).

    One chunk, positions i = 1..C, start state S_0; c_i = sum_{j<=i} g_j (per channel, chunk
    local), e_i = c_{i-1} (e_1 = 0), Γ_i = exp(c_i). Unrolling the recurrence,

      S_i = diag(Γ_i) S_0 + sum_{j<=i} diag(Γ_i / Γ_j) (a_j u_j^T + k_j v_j^T),  u_j = S_{j-1}^T b_j

    The pseudo-values u (rows of U, [C, V]) satisfy the strictly lower-triangular system

      u_i = S_0^T (b_i ⊙ exp(e_i)) + sum_{j<i} A_ba[i,j] u_j + A_bk[i,j] v_j,

    with A_xy[i,j] = sum_d x_id y_jd exp(e_id - c_jd) for j < i (``_decayed_pairs``). So
    (I - A_ba) U = (b ⊙ exp(e)) S_0 + A_bk V, i.e. U = W S_0 + U_0 with the UT transform

      [W | U_0] = (I - A_ba)^{-1} [b ⊙ exp(e) | A_bk V]          (one triangular solve)

    computed for all chunks in parallel. With exp(c_i - c_j) = w_i exp(e_i - c_j) for j < i,

      O       = scale [ (Q ⊙ Γ) S_0 + (A_{(q⊙w)a} + diag(q·a)) U + (A_{(q⊙w)k} + diag(q·k)) V ]
      S_C     = P S_0 + H,   P = diag(Γ_C) + Ā^T W,   H = Ā^T U_0 + K̄^T V,

    Ā = A ⊙ exp(c_C - c), K̄ = K ⊙ exp(c_C - c). Only S_0 -> S_C (a [K,K] x [K,V] product) is a
    sequential scan over chunks. Padded tokens (g = a = b = k = 0) leave the state unchanged, so
    the final state is exact for any T.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    out_dtype = v.dtype
    q, k, v, g, a, b, state = _prepare(q, k, v, g, a, b, initial_state)
    N = -(-T // C)  # ceil(T / C)

    def chunked(x):  # [B, T, H, D] -> [B, N, H, C, D]
        x = _pad_time(x, N * C)
        return jnp.swapaxes(x.reshape(B, N, C, H, x.shape[-1]), 2, 3)

    qc, kc, vc, gc, ac, bc = (chunked(x) for x in (q, k, v, g, a, b))

    c = jnp.cumsum(gc, axis=-2)  # inclusive chunk-local cumulative log decay, [B, N, H, C, K]
    e = jnp.concatenate([jnp.zeros_like(c[..., :1, :]), c[..., :-1, :]], axis=-2)  # exclusive
    c_last = c[..., -1:, :]  # [B, N, H, 1, K]: log decay across the whole chunk

    pairs = _decayed_pairs(jnp.stack([bc, qc * jnp.exp(gc)]), jnp.stack([ac, kc]), e, c)
    (a_ba, a_bk), (a_qa, a_qk) = pairs
    eye = jnp.eye(C, dtype=c.dtype)
    a_qa = a_qa + eye * jnp.sum(qc * ac, axis=-1)[..., None, :]  # j = i terms (decay ratio 1)
    a_qk = a_qk + eye * jnp.sum(qc * kc, axis=-1)[..., None, :]

    # UT transform: [W | U_0] = (I - A_ba)^{-1} [b ⊙ exp(e) | A_bk V].
    rhs = jnp.concatenate([bc * jnp.exp(e), a_bk @ vc], axis=-1)
    sol = jax.lax.linalg.triangular_solve(
        eye - a_ba, rhs, left_side=True, lower=True, unit_diagonal=True
    )
    w_mat, u0 = sol[..., :K], sol[..., K:]  # [B, N, H, C, K], [B, N, H, C, V]

    # Chunk transition S_C = P S_0 + H; the factors exp(c_C - c_j) are <= 1.
    to_end = jnp.exp(c_last - c)
    a_end, k_end = ac * to_end, kc * to_end
    decay_diag = jnp.exp(c_last)[..., 0, :, None] * jnp.eye(K, dtype=c.dtype)  # diag(Γ_C)
    trans = decay_diag + jnp.swapaxes(a_end, -1, -2) @ w_mat  # [B, N, H, K, K]
    update = jnp.swapaxes(a_end, -1, -2) @ u0 + jnp.swapaxes(k_end, -1, -2) @ vc  # [B,N,H,K,V]

    def body(s, xs):
        p, h = xs
        return p @ s + h, s  # emit the chunk-start state

    state, chunk_start = jax.lax.scan(
        body, state, (jnp.moveaxis(trans, 1, 0), jnp.moveaxis(update, 1, 0))
    )
    chunk_start = jnp.moveaxis(chunk_start, 0, 1)  # [B, N, H, K, V]

    u = w_mat @ chunk_start + u0  # pseudo-values u_i = S_{i-1}^T b_i, [B, N, H, C, V]
    o = (qc * jnp.exp(c)) @ chunk_start + a_qa @ u + a_qk @ vc  # [B, N, H, C, V]
    o = scale * jnp.swapaxes(o, 2, 3).reshape(B, N * C, H, V)[:, :T]
    return o.astype(out_dtype), state


# ---------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------


def generalized_delta_rule(
    q, k, v, g, a, b, *, scale=None, initial_state=None, impl="auto", chunk_size=64
):
    """The RWKV-7 generalised delta rule over a sequence.

    Implements ``S_t = (diag(exp(g_t)) + a_t b_t^T) S_{t-1} + k_t v_t^T`` and
    ``o_t = scale * S_t^T q_t`` (output includes the current token), from
    ``S_0 = initial_state``.

    Args:
      q, k: ``[B, T, H, K]`` (k is the written key).
      v: ``[B, T, H, V]``.
      g: per-channel log-space decay ``[B, T, H, K]``; values must be <= 0 (not checked, the
        values may be traced). None means no decay.
      a, b: ``[B, T, H, K]``, the rank-one part ``a_t b_t^T`` of the transition (RWKV-7:
        ``a = -kappa_hat``, ``b = kappa_hat * lr``).
      scale: output scale, default ``K ** -0.5``.
      initial_state: ``[B, H, K, V]`` state before the first token; None means zeros.
      impl: ``"reference"``, ``"chunk"`` or ``"auto"`` (currently the chunk form).
      chunk_size: tokens per chunk for the chunk form, a positive multiple of 16 (T need not be
        a multiple; a chunk longer than T is shortened to T rounded up to 16).

    Returns:
      ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state ``[B, H, K, V]`` in
      float32 (float64 when the inputs are float64).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    chunk_size = _check_gdr_chunk_size(chunk_size)
    _validate(q, k, v, g, a, b, initial_state)

    scale = _default_scale(scale, q.shape[-1])
    args = (q, k, v, g, a, b, initial_state, scale)
    if impl == "reference":
        return _reference_form(*args)
    # "chunk" and "auto". A chunk longer than the sequence would only add padding work.
    T = q.shape[1]
    short = max(SUB_CHUNK, -(-T // SUB_CHUNK) * SUB_CHUNK)
    return _chunk_form(*args, chunk_size=min(chunk_size, short))
