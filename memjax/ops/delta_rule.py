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

- ``"reference"``: token-by-token ``lax.scan``; the source of truth. Its backward pass
  rematerialises each step, keeping one state per token.
- ``"chunk"``: chunkwise-parallel form (WY representation / UT transform). The work inside a
  chunk is batched over chunks; only the state passed from chunk to chunk is a ``lax.scan``
  over T / C steps. See ``_chunk_form`` for the equations and the memory layout.
- ``"pallas"``: a kernel registered in ``kernels/`` for the platform; ``"auto"``: the form
  ``memjax.ops.dispatch.AUTO`` names (the chunk form on every platform today).

T = 0 returns an empty output and the initial state.

Gradients come from JAX autodiff of these forms, except two pieces of the chunk form with
hand-written VJPs (the triangular solve of the UT transform and the chunk-to-chunk state
recurrence), both checked against autodiff of the reference form in the tests.

Speed (docs/results/op_dispatch.md, docs/results/bench_delta_rule.json): the chunk form wins
forward + backward on CPU; forward only the two forms are about equally fast.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops import dispatch
from memjax.ops._common import acc_dtype, balanced_blocks, cast, check_chunk_size, check_qkv
from memjax.ops._common import check_shape, default_scale, empty_sequence, from_blocks
from memjax.ops._common import intra_chunk_decay, scan_over_time, state_or_zeros, to_blocks
from memjax.ops._common import unit_lower_inverse

__all__ = ["delta_rule", "delta_rule_step"]


def _validate(q, k, v, beta, g, state, *, step: bool) -> None:
    """Shapes of a sequence call (beta, g ``[B, T, H]``) or, with ``step``, a one-token call
    (no T axis; the state is required)."""
    check_qkv(q, k, v, step=step)
    lead = q.shape[:-1]  # (B, T, H) or (B, H)
    what = "[B, H]" if step else "[B, T, H]"
    check_shape("beta", beta, lead, what)
    check_shape("g", g, lead, what)
    B, H, K, V = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    check_shape("state" if step else "initial_state", state, (B, H, K, V), "[B, H, K, V]")


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
    _validate(q, k, v, beta, g, state, step=True)
    acc = acc_dtype(q, k, v, beta, g)
    scale = default_scale(scale, q.shape[-1])
    o, new_state = _step(*cast(acc, q, k, v, beta, g, state), scale)
    return o.astype(v.dtype), new_state


# ---------------------------------------------------------------------------------------------
# Reference form: token-by-token scan
# ---------------------------------------------------------------------------------------------


@jax.jit
def _reference_form(q, k, v, beta, g, initial_state, scale):
    """Token-by-token scan of the recurrence. Returns (o in v's dtype, final state).

    Each step is rematerialised in the backward pass: autodiff then keeps one [B, H, K, V]
    state per token (the carry) instead of three (about 1.5 MiB per token at H=8, K=V=128).
    """
    B, _, H, K = q.shape
    acc = acc_dtype(q, k, v, beta, g)
    state = state_or_zeros(initial_state, (B, H, K, v.shape[-1]), acc)
    step = lambda s, *x_t: _step(*x_t, s, scale)  # noqa: E731
    o, state = scan_over_time(step, state, cast(acc, q, k, v, beta, g), remat=True)
    return o.astype(v.dtype), state


# ---------------------------------------------------------------------------------------------
# Chunk form
# ---------------------------------------------------------------------------------------------


@jax.custom_vjp
def _ut_transform(a, r):
    """X = (I + a)^-1 r for strictly lower-triangular ``a`` ``[..., C, C]``, r ``[..., C, M]``.

    A hand-written VJP keeps only the inverse and the result for the backward (instead of every
    level of the recursive inverse): with T = (I + a)^-1, ``dr = T^T dX`` and
    ``da = -strictly_lower(dr X^T)``.
    """
    return unit_lower_inverse(a) @ r


def _ut_transform_fwd(a, r):
    t = unit_lower_inverse(a)
    x = t @ r
    return x, (t, x)


def _ut_transform_bwd(res, dx):
    t, x = res
    dr = jnp.swapaxes(t, -1, -2) @ dx
    C = t.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((C, C), dtype=bool), -1)
    da = jnp.where(strictly_lower, -(dr @ jnp.swapaxes(x, -1, -2)), 0.0)
    return da, dr


_ut_transform.defvjp(_ut_transform_fwd, _ut_transform_bwd)


@jax.custom_vjp
def _state_recurrence(wu, k_end, decay, s0):
    """The sequential part of the chunk form: a ``lax.scan`` over N chunks.

    Per chunk n (the leading axis of wu = [W | U] ``[N, B, H, C, K + V]``, k_end
    ``[N, B, H, C, K]`` and decay ``[N, B, H]``), from the chunk-start state S_n
    ``[B, H, K, V]``::

        V_new_n = U_n - W_n S_n
        S_{n+1} = decay_n S_n + K_end_n^T V_new_n

    Returns (chunk-start states ``[N, B, H, K, V]``, V_new ``[N, B, H, C, V]``, S_N).

    The hand-written VJP runs one reverse scan that carries only dS and emits dS_{n+1} and
    dV_new per chunk; every other gradient is then one batched product over all chunks. It
    keeps nothing beyond the inputs and outputs (autodiff of the scan keeps extra copies).
    """
    return _state_recurrence_fwd(wu, k_end, decay, s0)[0]


def _state_recurrence_fwd(wu, k_end, decay, s0):
    K = k_end.shape[-1]

    def body(s, xs):
        wu_n, k_n, decay_n = xs
        w_n, u_n = wu_n[..., :K], wu_n[..., K:]
        v_new = u_n - jnp.einsum("bhck,bhkv->bhcv", w_n, s)
        s_next = decay_n[..., None, None] * s + jnp.einsum("bhck,bhcv->bhkv", k_n, v_new)
        return s_next, (s, v_new)  # emit the chunk-start state and the pseudo-values

    s_final, (chunk_start, v_new) = jax.lax.scan(body, s0, (wu, k_end, decay))
    return (chunk_start, v_new, s_final), (wu, k_end, decay, chunk_start, v_new)


def _state_recurrence_bwd(res, cotangents):
    wu, k_end, decay, chunk_start, v_new = res
    K = k_end.shape[-1]
    d_chunk_start, d_v_new, d_s_final = cotangents

    def body(ds_next, xs):  # ds_next: cotangent of S_{n+1}
        wu_n, k_n, decay_n, d_start_n, d_v_new_n = xs
        w_n = wu_n[..., :K]
        dv = d_v_new_n + jnp.einsum("bhck,bhkv->bhcv", k_n, ds_next)
        ds = decay_n[..., None, None] * ds_next - jnp.einsum("bhck,bhcv->bhkv", w_n, dv)
        return ds + d_start_n, (ds_next, dv)

    ds0, (ds_next, dv) = jax.lax.scan(
        body, d_s_final, (wu, k_end, decay, d_chunk_start, d_v_new), reverse=True
    )
    dwu = jnp.concatenate([-jnp.einsum("nbhcv,nbhkv->nbhck", dv, chunk_start), dv], axis=-1)
    dk_end = jnp.einsum("nbhcv,nbhkv->nbhck", v_new, ds_next)
    d_decay = jnp.einsum("nbhkv,nbhkv->nbh", chunk_start, ds_next)
    return dwu, dk_end, d_decay, ds0


_state_recurrence.defvjp(_state_recurrence_fwd, _state_recurrence_bwd)


def _chunk_group(state, xs, *, group_size: int, scale):
    """The chunk form for one group of G consecutive chunks, from its start state.

    xs = (q, k, v, beta, g) for the group's G * C tokens in the input layout ``[B, G*C, H, ...]``
    (g may be None); returns (state after the group, o ``[B, G*C, H, V]``). Inside, arrays are
    laid out ``[G, B, H, C, ...]`` so (G, B, H) are the batch dimensions of every product. See
    ``_chunk_form`` for the equations.
    """

    def chunked(x):  # [B, G*C, H, ...] -> [G, B, H, C, ...]
        B, GC, H = x.shape[:3]
        x = x.reshape(B, group_size, GC // group_size, H, *x.shape[3:])
        return jnp.moveaxis(x, (0, 3), (1, 2))

    qc, kc, vc, betac, gc = (None if x is None else chunked(x) for x in xs)
    C = qc.shape[-2]
    strictly_lower = jnp.tril(jnp.ones((C, C), dtype=bool), -1)
    kk = jnp.einsum("nbhik,nbhjk->nbhij", kc, kc)
    qk = jnp.einsum("nbhik,nbhjk->nbhij", qc, kc)
    if gc is None:
        a = jnp.where(strictly_lower, betac[..., :, None] * kk, 0.0)
        w_rhs = betac[..., None] * kc
        k_to_end = kc
        q_from_start = qc
        chunk_decay = jnp.ones(betac.shape[:-1], betac.dtype)  # exact no-op factor
        scores = jnp.where(jnp.tril(jnp.ones((C, C), dtype=bool)), qk, 0.0)
    else:
        b = jnp.cumsum(gc, axis=-1)  # chunk-local cumulative log decay, [G, B, H, C]
        b_last = b[..., -1]  # [G, B, H]
        decay = intra_chunk_decay(b)  # exp(b_i - b_j) for i >= j, else 0; exponents <= 0
        a = jnp.where(strictly_lower, betac[..., :, None] * kk * decay, 0.0)
        w_rhs = (betac * jnp.exp(b))[..., None] * kc
        # b_C - b_i <= 0: never overflows (unlike exp(b_C) * exp(-b_i)).
        k_to_end = kc * jnp.exp(b_last[..., None] - b)[..., None]
        q_from_start = qc * jnp.exp(b)[..., None]
        chunk_decay = jnp.exp(b_last)
        scores = qk * decay

    # UT transform: [W | U] = (I + A)^-1 [beta e^b K | beta V], batched over the chunks.
    rhs = jnp.concatenate([w_rhs, betac[..., None] * vc], axis=-1)
    wu = _ut_transform(a, rhs)

    # Inter-chunk recurrence: the only sequential part.
    chunk_start, v_new, state = _state_recurrence(wu, k_to_end, chunk_decay, state)

    o = jnp.einsum("nbhck,nbhkv->nbhcv", q_from_start, chunk_start)
    o = o + jnp.einsum("nbhij,nbhjv->nbhiv", scores, v_new)
    o = scale * jnp.moveaxis(o, (1, 2), (0, 3))  # [B, G, C, H, V]
    return state, o.reshape(o.shape[0], -1, *o.shape[3:])


@functools.partial(jax.jit, static_argnames=("chunk_size", "group_size"))
def _chunk_form(q, k, v, beta, g, initial_state, scale, *, chunk_size: int, group_size: int):
    """Chunkwise-parallel form (WY representation / UT transform). Returns (o, final state).

    For chunk n with start state S, positions i, j = 1..C in the chunk and b = chunk-local
    cumsum of g (b_C its last entry; b = 0 for DeltaNet), unrolling the recurrence gives

      S_i = exp(b_i) S + sum_{j <= i} exp(b_i - b_j) k_j u_j^T

    with pseudo-values u_i = beta_i (v_i - exp(b_i) S^T k_i - sum_{j<i} exp(b_i - b_j)
    (k_i . k_j) u_j). In matrix form (I + A) U_new = diag(beta) V - diag(beta exp(b)) K S with

      A_ij = beta_i (k_i . k_j) exp(b_i - b_j)  for i > j, else 0   (unit lower triangular I + A)

    so with W = (I + A)^-1 diag(beta exp(b)) K and U = (I + A)^-1 diag(beta) V (both from one
    small triangular inverse per chunk, batched over chunks):

      V_new   = U - W S                                             (sequential part)
      S_next  = exp(b_C) S + (K ⊙ exp(b_C - b))^T V_new             (sequential part)
      O       = scale * [ (Q ⊙ exp(b)) S + ((Q K^T) ⊙ D) V_new ],  D_ij = exp(b_i - b_j), i >= j

    Every exponent is masked before the exp and is <= 0, so nothing overflows however strong
    the decay. Only V_new and S_next are sequential; everything else is batched over chunks.

    Memory: the chunks are processed in groups of ``group_size`` by an outer ``lax.scan``
    whose body is rematerialised (``jax.checkpoint``): the backward pass keeps one state per
    group and recomputes a group's intermediates when it gets there. The working set is then
    that of one group: memory beyond the inputs, outputs and gradients is
    O(T / (G C) K V + G C (K + V + C)) instead of every chunk's intermediates at once. On a CPU
    this is also faster despite the recomputation: XLA allocates (and page-faults) its whole
    scratch buffer on every call, and that buffer shrinks about 6x (T = 4096, H = 8,
    K = V = 128: 66 MiB instead of 384 MiB).
    """
    B, T, H, K = q.shape
    C = chunk_size
    acc = acc_dtype(q, k, v, beta, g)
    state = state_or_zeros(initial_state, (B, H, K, v.shape[-1]), acc)
    n_groups, G = balanced_blocks(T, C, group_size)

    # Zero padding at the end is an exact no-op on the final state: beta = k = 0 makes the
    # padded rows of A, W and U zero, so V_new = 0 there and k = 0 adds nothing; g = 0 leaves
    # b_C equal to the last real token's b. Padded outputs are sliced off.
    xs = tuple(to_blocks(x, n_groups, G * C) for x in cast(acc, q, k, v, beta, g))
    body = jax.checkpoint(
        functools.partial(_chunk_group, group_size=G, scale=scale), prevent_cse=False
    )
    state, o = jax.lax.scan(body, state, xs)  # o: [groups, B, G*C, H, V]
    return from_blocks(o, T).astype(v.dtype), state


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
      impl: ``"reference"``, ``"chunk"``, ``"pallas"`` or ``"auto"`` (``memjax.ops.dispatch``).
      chunk_size: tokens per chunk for the chunk form (any positive int; T need not be a
        multiple; chunks longer than T are shortened to T).

    Returns:
      ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state ``[B, H, K, V]`` in
      float32 (float64 when the inputs are float64).
    """
    form = dispatch.resolve("delta_rule", impl)
    chunk_size = check_chunk_size(chunk_size)
    _validate(q, k, v, beta, g, initial_state, step=False)
    B, T, H, K = q.shape
    scale = default_scale(scale, K)
    if T == 0:
        acc = acc_dtype(q, k, v, beta, g)
        return empty_sequence(v.shape, v.dtype, initial_state, (B, H, K, v.shape[-1]), acc)
    if form == "pallas":
        return dispatch.kernel("delta_rule")(
            q, k, v, beta, g, scale=scale, initial_state=initial_state, chunk_size=chunk_size
        )
    args = (q, k, v, beta, g, initial_state, scale)
    if form == "reference":
        return _reference_form(*args)
    # A chunk longer than the sequence would only add padding work.
    chunk_size = min(chunk_size, T)
    group_size = max(1, dispatch.tuning("delta_rule")["group_tokens"] // chunk_size)
    return _chunk_form(*args, chunk_size=chunk_size, group_size=group_size)
