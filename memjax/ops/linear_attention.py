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
- ``"pallas"``: a kernel registered in ``kernels/`` for the platform; ``"auto"``: the form
  ``memjax.ops.dispatch.AUTO`` names (the chunk form on every platform today; measurements in
  docs/results/op_dispatch.md).

T = 0 returns an empty output and the initial state. Gradients: JAX autodiff for the reference
form and for the chunk form with a per-channel g; a
hand-written backward pass for the chunk form with g None or per head (see ``_chunk_block_bwd``).
Both chunk backward passes recompute each block of chunks from its saved start state.

Numerical safety of the chunk form: every ``exp`` it evaluates has an exponent ``<= 0`` (so nothing
overflows, whatever the decay; an underflow to 0 only happens where the exact factor is below the
smallest float), and masked entries get their exponent set to ``-inf`` *before* the ``exp`` (so no
``inf * 0`` in the forward pass and no ``0 * inf`` in the gradient). See
``memjax.ops._common.intra_chunk_decay`` (per head) and ``_intra_chunk_scores_per_channel`` (per
channel). Decays within a chunk are differences of chunk-local cumulative sums, so in float32 a
factor ``exp(b_i - b_j)`` carries an absolute exponent error of about ``|b| * 6e-8``: harmless for
the factors that matter, but a head that mixes very strong and very weak gates inside one chunk
sees relative errors of ``|b| * 6e-8`` on its weak-gate factors (the same holds for FLA's kernels).
The normalizer is not guarded: ``q_t . z_t`` must stay away from ``-NORMALIZER_EPS / scale`` (true
for positive feature maps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops import dispatch
from memjax.ops._common import acc_dtype, balanced_blocks, cast, check_chunk_size, check_qkv
from memjax.ops._common import check_shape, default_scale, empty_sequence, from_blocks, from_heads
from memjax.ops._common import intra_chunk_decay, scan_over_time, state_or_zeros, to_blocks
from memjax.ops._common import to_heads

__all__ = ["linear_attention", "linear_attention_step", "NORMALIZER_EPS"]

# Added to the normalizer ``scale * q_t . z_t`` before dividing (see the module docstring).
NORMALIZER_EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


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


def _validate(q, k, v, g, state, normalize, *, step: bool) -> None:
    """Check a sequence call (g per head ``[B, T, H]`` or per channel ``[B, T, H, K]``) or, with
    ``step``, a one-token call (no T axis; the state is required)."""
    check_qkv(q, k, v, step=step)
    lead = q.shape[:-1]  # (B, T, H) or (B, H)
    B, H, K, V = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    names = "[B, H" if step else "[B, T, H"
    _check_gate(g, lead, (*lead, K), f"{names}]", f"{names}, K]")
    shape, what = _state_shape(B, H, K, V, normalize)
    check_shape("state" if step else "initial_state", state, shape, what)


def _with_ones(v, normalize: bool):
    """v with a column of ones appended when ``normalize`` (z is the state of that column)."""
    if not normalize:
        return v
    return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)


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
    _validate(q, k, v, g, state, normalize, step=True)
    acc = acc_dtype(q, k, v, g)
    scale = default_scale(scale, q.shape[-1])
    q_, k_, v_, g_, state = cast(acc, q, k, v, g, state)
    o, new_state = _step(q_, k_, _with_ones(v_, normalize), g_, state, scale)
    if normalize:
        o = _normalize_output(o)
    return o.astype(v.dtype), new_state


# ---------------------------------------------------------------------------------------------
# Reference form: token-by-token scan
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("normalize",))
def _reference_form(q, k, v, g, initial_state, scale, normalize=False):
    """Token-by-token scan of the recurrence. Returns (o in v's dtype, final state)."""
    B, _, H, K = q.shape
    acc = acc_dtype(q, k, v, g)
    q_, k_, v_, g_ = cast(acc, q, k, v, g)
    v_ = _with_ones(v_, normalize)
    state = state_or_zeros(initial_state, (B, H, K, v_.shape[-1]), acc)
    step = lambda s, *x_t: _step(*x_t, s, scale)  # noqa: E731
    o, state = scan_over_time(step, state, (q_, k_, v_, g_))
    if normalize:
        o = _normalize_output(o)
    return o.astype(v.dtype), state


# ---------------------------------------------------------------------------------------------
# Chunk form
# ---------------------------------------------------------------------------------------------


def _sub_chunk_size(C: int) -> int:
    """Largest divisor of C that is <= the tuned sub-chunk (``dispatch.TUNING``, read when the
    chunk form is traced)."""
    limit = dispatch.tuning("linear_attention")["sub_chunk"]
    return max(c for c in range(1, min(C, limit) + 1) if C % c == 0)


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


def _block_operands(xs, C: int, scale, normalize: bool, acc):
    """Per-block operands shared by the forward and backward passes.

    xs = (q, k, v, g) time-major slices ``[B, M*C, H, ...]``. Returns a dict with q (scaled)
    ``[B, H, M, C, K]``, k_raw (the slice), k_t ``[B, H, M, K, C]``, v ``[B, H, M, C, V']`` (a
    column of ones appended with ``normalize``) and, for a per-head or per-channel g, b
    (chunk-local cumsum of g), from_start = exp(b), to_end = exp(b_C - b), chunk_decay = exp(b_C)
    (all exponents <= 0).

    Small decay factors are materialised (optimization barriers) before they broadcast over K or
    V: fused into the large elementwise loops, the cumsum made those loops several times slower.
    So is k_t: fused with the slicing of the scan input, the transposing copy ran 3x slower.
    """
    barrier = jax.lax.optimization_barrier
    q, k, v, g = (None if x is None else x.astype(acc) for x in xs)
    M = q.shape[1] // C
    ops = dict(M=M, g_kind=None if g is None else ("head" if g.ndim == 3 else "channel"))
    ops["q"] = to_heads(q, M, C) * scale
    ops["k_raw"] = k
    ops["k_t"] = barrier(to_heads(k, M, C, transpose=True))
    v = to_heads(v, M, C)
    if normalize:  # z is the state of a value column of ones
        v = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), acc)], axis=-1)
    ops["v"] = v
    if g is not None:
        axis = -1 if g.ndim == 3 else -2
        b = barrier(jnp.cumsum(to_heads(g, M, C), axis=axis))
        b_last = b[..., -1:] if g.ndim == 3 else b[..., -1:, :]
        ops["b"] = b
        ops["from_start"], ops["to_end"] = barrier((jnp.exp(b), jnp.exp(b_last - b)))
        ops["chunk_decay"] = jnp.exp(b_last)
    return ops


def _intra_scores(ops, C: int, acc):
    """A = (Q K^T) ⊙ D for every chunk of the block, ``[B, H, M, C, C]`` (D: causal decay)."""
    if ops["g_kind"] == "channel":
        return _intra_chunk_scores_per_channel(
            ops["q"], to_heads(ops["k_raw"], ops["M"], C), ops["b"]
        )
    scores = jnp.einsum("bhmik,bhmkj->bhmij", ops["q"], ops["k_t"])
    if ops["g_kind"] is None:
        return scores * jnp.tril(jnp.ones((C, C), acc))  # one [C, C] mask, broadcast
    return scores * intra_chunk_decay(ops["b"])


def _chunk_updates(ops):
    """What each chunk adds to the state, decayed to the chunk end: ``[B, H, M, K, V']``."""
    k_t, v = ops["k_t"], ops["v"]
    if ops["g_kind"] == "head":
        v = v * ops["to_end"][..., None]
    elif ops["g_kind"] == "channel":
        k_t = k_t * jnp.swapaxes(ops["to_end"], -1, -2)
    return jnp.einsum("bhmkc,bhmcv->bhmkv", k_t, v)


def _state_decay(ops, m: int):
    """exp(b_C) of chunk m, shaped to multiply a ``[B, H, K, V']`` state (None: no decay)."""
    if ops["g_kind"] is None:
        return None
    if ops["g_kind"] == "head":
        return ops["chunk_decay"][:, :, m, :, None]  # [B, H, 1, 1]
    return jnp.swapaxes(ops["chunk_decay"][:, :, m], -1, -2)  # [B, H, K, 1]


def _chunk_starts(ops, state, updates):
    """The M-step recurrence S <- exp(b_C) S + update (unrolled). Returns (final, starts)."""
    starts = []
    for m in range(ops["M"]):
        starts.append(state)
        decay = _state_decay(ops, m)
        state = (state if decay is None else decay * state) + updates[:, :, m]
    return state, jnp.stack(starts, axis=2)


def _chunk_block(state, xs, *, chunk_size: int, scale, normalize: bool, acc):
    """Forward pass of one step of the outer scan: M chunks, all batch rows and heads at once.

    xs = (q, k, v, g): time-major slices ``[B, M*C, H, ...]`` of the inputs. state
    ``[B, H, K, V']``: the state before the block (V' = V + 1 with the normalizer column).
    Returns (state after the block, o ``[B, M*C, H, V']``).

    Layout choices, each measured on CPU: batch dims (B, H, M) lead and every matmul contracts
    the last dim of its lhs and the last or second-last of its rhs (other layouts ran as generic
    dots several times slower); k is transposed to ``[K, C]`` once and read by both Q K^T and
    K^T V; the M-step state recurrence is unrolled; the per-head decay of the inter-chunk output
    multiplies the rows of ``Q S_n`` instead of Q.
    """
    C = chunk_size
    ops = _block_operands(xs, C, scale, normalize, acc)
    scores = _intra_scores(ops, C, acc)
    state, starts = _chunk_starts(ops, state, _chunk_updates(ops))
    q = ops["q"] * ops["from_start"] if ops["g_kind"] == "channel" else ops["q"]
    inter = jnp.einsum("bhmik,bhmkv->bhmiv", q, starts)
    if ops["g_kind"] == "head":
        inter = inter * ops["from_start"][..., None]
    o = jnp.einsum("bhmij,bhmjv->bhmiv", scores, ops["v"]) + inter
    return state, from_heads(o)


def _chunk_block_bwd(state, xs, d_o, d_state, *, chunk_size: int, scale, normalize: bool, acc):
    """Backward pass of ``_chunk_block`` for g None or per head (the forward is recomputed).

    d_o: cotangent of the block output ``[B, M*C, H, V']``; d_state: of the state after the block.
    Returns (cotangent of the state before the block, (dq, dk, dv, dg) time-major, d_scale).

    Per chunk, with G_{n+1} the cotangent of the state after chunk n (a reverse M-step recurrence
    G_n = exp(b_C) G_{n+1} + (Q ⊙ exp(b))^T dO):
      dV = A^T dO + (K ⊙ exp(b_C - b)) G_{n+1},   dP = (dO V^T) ⊙ D,
      dQ = dP K + exp(b) ⊙ dO S_n^T,              dK = dP^T Q + exp(b_C - b) ⊙ V G_{n+1}^T,
    and the decay gradient needs no exp derivative: d b_i = q_i . dq_i - k_i . dk_i (b the
    cumulative log decay), plus <S_{n+1}, G_{n+1}> at the chunk's last token; dg is its reverse
    cumsum inside the chunk.
    """
    barrier = jax.lax.optimization_barrier
    C = chunk_size
    ops = _block_operands(xs, C, scale, normalize, acc)
    M, q, k_t, v = ops["M"], ops["q"], ops["k_t"], ops["v"]
    head = ops["g_kind"] == "head"
    k = barrier(to_heads(ops["k_raw"], M, C))
    causal = jnp.tril(jnp.ones((C, C), acc))
    decay = intra_chunk_decay(ops["b"]) if head else causal
    scores = jnp.einsum("bhmik,bhmkj->bhmij", q, k_t) * decay
    final, starts = _chunk_starts(ops, state, _chunk_updates(ops))
    d_o = to_heads(d_o.astype(acc), M, C)

    # Reverse recurrence over the chunks of the block.
    q_read = q * ops["from_start"][..., None] if head else q  # what reads S_n
    q_read_t = barrier(jnp.swapaxes(q_read, -1, -2))  # [B, H, M, K, C]
    from_output = jnp.einsum("bhmkc,bhmcv->bhmkv", q_read_t, d_o)
    d_after = []  # G_{n+1}
    g_state = d_state
    for m in reversed(range(M)):
        d_after.append(g_state)
        decay_m = _state_decay(ops, m)
        g_state = (g_state if decay_m is None else decay_m * g_state) + from_output[:, :, m]
    d_after = jnp.stack(d_after[::-1], axis=2)  # [B, H, M, K, V']

    d_scores = jnp.einsum("bhmiv,bhmjv->bhmij", d_o, v)
    d_p = d_scores * decay
    scores_t, d_p_t = barrier((jnp.swapaxes(scores, -1, -2), jnp.swapaxes(d_p, -1, -2)))
    k_write = k * ops["to_end"][..., None] if head else k  # what writes the state
    d_v = jnp.einsum("bhmji,bhmiv->bhmjv", scores_t, d_o) + jnp.einsum(
        "bhmck,bhmkv->bhmcv", k_write, d_after
    )
    d_q_inter = jnp.einsum("bhmiv,bhmkv->bhmik", d_o, starts)
    d_k_state = jnp.einsum("bhmcv,bhmkv->bhmck", v, d_after)
    if head:
        d_q_inter = d_q_inter * ops["from_start"][..., None]
        d_k_state = d_k_state * ops["to_end"][..., None]
    d_q = jnp.einsum("bhmij,bhmjk->bhmik", d_p, k) + d_q_inter  # w.r.t. the scaled q
    d_k = jnp.einsum("bhmji,bhmik->bhmjk", d_p_t, q) + d_k_state

    # Row dots as multiply-then-reduce: written plainly, the compiler turned them into batched
    # matrix-vector products that ran several times slower than the whole elementwise pass.
    def dot_rows(a, b, axis=-1):
        return jnp.sum(barrier(a * b), axis=axis)

    d_g = None
    if head:
        # d b_i = q_i . dq_i - k_i . dk_i, with the intra-chunk part written as the row minus the
        # column sums of dA ⊙ A without its diagonal (those terms cancel exactly; summing them
        # first would leave rounding noise where strong decay makes the true gradient tiny).
        w = barrier(d_scores * scores * (1.0 - jnp.eye(C, dtype=acc)))
        d_b = jnp.sum(w, axis=-1) - jnp.sum(w, axis=-2)
        d_b = d_b + dot_rows(q, d_q_inter) - dot_rows(k, d_k_state)
        after = jnp.concatenate([starts[:, :, 1:], final[:, :, None]], axis=2)  # S_{n+1}
        d_b = d_b.at[..., -1].add(dot_rows(after, d_after, axis=(-2, -1)))
        d_g = jnp.flip(jnp.cumsum(jnp.flip(d_b, -1), axis=-1), -1)  # [B, H, M, C]
        d_g = d_g.transpose(0, 2, 3, 1).reshape(d_g.shape[0], M * C, d_g.shape[1])
    d_scale = dot_rows(to_heads(xs[0].astype(acc), M, C), d_q, axis=None)  # q = scale * q_raw
    d_v = d_v[..., :-1] if normalize else d_v
    return g_state, (from_heads(d_q * scale), from_heads(d_k), from_heads(d_v), d_g), d_scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_blocks(chunk_size, normalize, state, xs, scale):
    """``lax.scan`` of ``_chunk_block`` over blocks (xs ``[num_blocks, B, L, H, ...]``).

    Used for g None or per head, with a hand-written backward pass (``_chunk_block_bwd``):
    autodiff of the block produced generic dots and reductions that ran several times slower.
    """
    final, o = jax.lax.scan(_block_fn(chunk_size, normalize, xs, scale), state, xs)
    return o, final


def _block_fn(chunk_size, normalize, xs, scale):
    acc = acc_dtype(*xs)
    return functools.partial(
        _chunk_block, chunk_size=chunk_size, scale=scale, normalize=normalize, acc=acc
    )


def _scan_blocks_fwd(chunk_size, normalize, state, xs, scale):
    block = _block_fn(chunk_size, normalize, xs, scale)

    def body(s, x):
        s_next, o = block(s, x)
        return s_next, (o, s)  # keep each block's start state for the backward pass

    final, (o, starts) = jax.lax.scan(body, state, xs)
    return (o, final), (starts, xs, scale)


def _scan_blocks_bwd(chunk_size, normalize, residuals, cotangents):
    starts, xs, scale = residuals
    d_o, d_final = cotangents
    acc = acc_dtype(*xs)
    bwd = functools.partial(
        _chunk_block_bwd, chunk_size=chunk_size, scale=scale, normalize=normalize, acc=acc
    )

    def body(carry, x):
        d_state, d_scale = carry
        start, block_xs, block_d_o = x
        d_state, d_xs, d_scale_block = bwd(start, block_xs, block_d_o, d_state)
        return (d_state, d_scale + d_scale_block), d_xs

    (d_state, d_scale), d_xs = jax.lax.scan(
        body, (d_final.astype(acc), jnp.zeros((), acc)), (starts, xs, d_o), reverse=True
    )
    d_xs = tuple(None if x is None else d.astype(x.dtype) for x, d in zip(xs, d_xs))
    return d_state.astype(starts.dtype), d_xs, jnp.asarray(d_scale).astype(jnp.result_type(scale))


_scan_blocks.defvjp(_scan_blocks_fwd, _scan_blocks_bwd)


@functools.partial(jax.jit, static_argnames=("chunk_size", "normalize", "block_chunks"))
def _chunk_form(q, k, v, g, initial_state, scale, *, chunk_size: int, normalize, block_chunks):
    """Chunkwise-parallel form. Returns (o in v's dtype, final state).

    For chunk n with start state S_n and b = chunk-local cumsum of g (b_C its last entry; with a
    per-channel g, ``exp(b)`` scales the key channels and ``exp(b_C)`` is ``diag(exp(b_C))``):

      O_n     = scale * [ (Q ⊙ exp(b)) S_n + A_n V ]
      A_n     = q_i . (k_j ⊙ exp(b_i - b_j)) for i >= j, else 0
      S_{n+1} = exp(b_C) S_n + Σ_i (k_i ⊙ exp(b_C - b_i)) v_i^T

    Two levels, for speed on CPU: a ``lax.scan`` over blocks of at most ``block_chunks`` chunks
    (``dispatch.TUNING``) carries the state, and inside a block every chunk
    product is a batched matmul over (B, H, M) whose operands stay in cache (see
    ``_chunk_block``); one batched matmul over all the chunks of a long sequence streams hundreds
    of MB through memory and ran at a third of the rate. Every exponent is <= 0: see
    ``intra_chunk_decay`` and ``_intra_chunk_scores_per_channel``.

    Gradients: for g None or per head a hand-written backward pass (``_chunk_block_bwd``) that
    recomputes each block from its saved start state, so the saved residuals are one state per
    block; for a per-channel g, autodiff of the block under ``jax.checkpoint`` (same memory).
    """
    B, T, H, K = q.shape
    C = chunk_size
    acc = acc_dtype(q, k, v, g)
    state = state_or_zeros(initial_state, (B, H, K, v.shape[-1] + int(normalize)), acc)
    num_blocks, M = balanced_blocks(T, C, block_chunks)
    xs = tuple(to_blocks(x, num_blocks, M * C) for x in (q, k, v, g))
    scale = jnp.asarray(scale, acc)
    if g is None or g.ndim == 3:
        o, state = _scan_blocks(C, normalize, state, xs, scale)
    else:
        block = _block_fn(C, normalize, xs, scale)
        state, o = jax.lax.scan(jax.checkpoint(block), state, xs)
    o = from_blocks(o, T)
    if normalize:
        o = _normalize_output(o)
    return o.astype(v.dtype), state


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
      impl: ``"reference"``, ``"chunk"``, ``"pallas"`` or ``"auto"`` (``memjax.ops.dispatch``).
      chunk_size: tokens per chunk for the chunk form (any positive int; T need not be a
        multiple; chunks longer than T are shortened to T).

    Returns:
      ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype (empty for T = 0, when the state is
      the initial one); final_state ``[B, H, K, V]`` (``[B, H, K, V + 1]`` with ``normalize=True``) in float32 (float64 when the inputs are
      float64).
    """
    form = dispatch.resolve("linear_attention", impl)
    chunk_size = check_chunk_size(chunk_size)
    normalize = bool(normalize)
    _validate(q, k, v, g, initial_state, normalize, step=False)
    B, T, H, K = q.shape
    scale = default_scale(scale, K)
    if T == 0:
        state_shape = (B, H, K, v.shape[-1] + int(normalize))
        return empty_sequence(v.shape, v.dtype, initial_state, state_shape, acc_dtype(q, k, v, g))
    if form == "pallas":
        return dispatch.kernel("linear_attention")(
            q, k, v, g, scale=scale, initial_state=initial_state, normalize=normalize,
            chunk_size=chunk_size,
        )  # fmt: skip
    args = (q, k, v, g, initial_state, scale)
    if form == "reference":
        return _reference_form(*args, normalize=normalize)
    # A chunk longer than the sequence would only add padding work.
    chunk_size = min(chunk_size, T)
    tune = dispatch.tuning("linear_attention")
    block_chunks = min(tune["block_tokens"] // chunk_size, tune["max_block_chunks"])
    return _chunk_form(*args, chunk_size=chunk_size, normalize=normalize, block_chunks=block_chunks)
