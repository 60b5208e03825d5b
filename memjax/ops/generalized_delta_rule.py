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
- ``"chunk"``: chunkwise-parallel form (a per-channel-decay WY / UT transform; equations in
  ``_chunk_form``). ``chunk_size`` must be a multiple of 16.
- ``"pallas"``: a kernel registered in ``kernels/`` for the platform; ``"auto"``: the form
  ``memjax.ops.dispatch.AUTO`` names (the chunk form on every platform today).

T = 0 returns an empty output and the initial state.

Gradients: JAX autodiff for the reference form; a hand-written backward pass for the chunk form
(``_chunk_block_bwd``), checked against autodiff of the reference form in the tests.

Speed (docs/results/op_dispatch.md, docs/results/bench_generalized_delta_rule.json): the chunk
form wins forward + backward on CPU (about 3x at T=4096, with a fraction of the reference's
temporary memory) and is slower forward only: it does about 1.5x the reference's multiply-adds
(four K x V products per token plus the per-channel pair matrices), and the elementwise work
and copies of the pair hierarchy take about as long as the matmuls.

Memory of the chunk form: an outer ``lax.scan`` over blocks of chunks (``dispatch.TUNING``) carries
the state; everything inside a block is batched over its chunks and heads and stays in cache.
The forward pass keeps only each block's start state for the backward pass, which recomputes a
block's intermediates when it gets there. Temporary memory is therefore O(T / L * K * V) for the
saved states plus one block's working set, linear in T (no per-chunk K x K or C x C array of the
whole sequence is ever stored).

Decay factors in the chunk form (the numerically delicate part). The intra-chunk matrices need
per-channel decays between two tokens, ``prod_{j < t < i} w_t = exp(c_{i-1} - c_j)`` with c the
chunk-local cumulative log decay. Writing that as ``exp(c_{i-1}) * exp(-c_j)`` overflows under
strong decay (|c| reaches C * 30 with g ~ -30), so it is never formed that way. Every factor is
a product of ``w = exp(g) <= 1`` over a run of tokens (``_decay_factors``): nothing overflows, a
factor underflows only where its exact value is below the smallest float, and no exponential
other than ``exp(g)`` itself is evaluated. The pair matrices use a binary hierarchy (``_pairs``):
at each level the queries of a block's second half and the keys of its first half meet through
``(decay from the half's start to i) * (decay from j to the half's end)``, both <= 1, so each
level is one batched matmul; only the pairs inside a 4-token leaf are explicit dot products.
Positive g is outside the contract (not checked, the values may be traced) and may overflow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops import dispatch
from memjax.ops._common import acc_dtype, balanced_blocks, cast, check_chunk_size, check_qkv
from memjax.ops._common import check_rank, check_shape, default_scale, empty_sequence, from_blocks
from memjax.ops._common import from_heads, scan_over_time, state_or_zeros, to_blocks, to_heads
from memjax.ops._common import unit_lower_inverse

__all__ = ["generalized_delta_rule", "generalized_delta_rule_step"]

# Chunk sizes must be multiples of this (the contract of the chunk form; the pair hierarchy
# itself only needs multiples of _LEAF).
SUB_CHUNK = 16
# Tokens per leaf block of the pair hierarchy (see ``_pairs``).
_LEAF = 4


# ---------------------------------------------------------------------------------------------
# Validation and dtype helpers
# ---------------------------------------------------------------------------------------------


def _validate(q, k, v, g, a, b, state, *, step: bool) -> None:
    """Shapes of a sequence call (q, k, g, a, b ``[B, T, H, K]``, v ``[B, T, H, V]``) or, with
    ``step``, a one-token call (no T axis; the state is required)."""
    check_qkv(q, k, v, step=step)
    what = "[B, H, K]" if step else "[B, T, H, K]"
    for name, x in (("g", g), ("a", a), ("b", b)):
        if x is not None or name != "g":  # g=None means no decay
            check_rank(name, x, q.ndim, what)
            check_shape(name, x, q.shape, f"{what} (same as q)")
    B, H, K, V = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    check_shape("state" if step else "initial_state", state, (B, H, K, V), "[B, H, K, V]")


def _check_gdr_chunk_size(chunk_size) -> int:
    c = check_chunk_size(chunk_size)
    if c % SUB_CHUNK:
        raise ValueError(
            f"chunk_size must be a positive multiple of {SUB_CHUNK}, got {c}"
        )
    return c


def _prepare(q, k, v, g, a, b, state):
    """Cast to the accumulation dtype (g=None becomes zeros: exp(0) = 1, no decay); the state
    must be given."""
    acc = acc_dtype(q, k, v, g, a, b)
    g = jnp.zeros(q.shape, acc) if g is None else g
    return cast(acc, q, k, v, g, a, b, state)


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
    _validate(q, k, v, g, a, b, state, step=True)
    scale = default_scale(scale, q.shape[-1])
    *xs, state = _prepare(q, k, v, g, a, b, state)
    o, new_state = _step(*xs, state, scale)
    return o.astype(v.dtype), new_state


# ---------------------------------------------------------------------------------------------
# Reference form: token-by-token scan
# ---------------------------------------------------------------------------------------------


@jax.jit
def _reference_form(q, k, v, g, a, b, initial_state, scale):
    """Token-by-token scan of the recurrence. Returns (o in v's dtype, final state)."""
    B, _, H, K = q.shape
    state = state_or_zeros(initial_state, (B, H, K, v.shape[-1]), acc_dtype(q, k, v, g, a, b))
    *xs, state = _prepare(q, k, v, g, a, b, state)
    o, state = scan_over_time(lambda s, *x_t: _step(*x_t, s, scale), state, xs)
    return o.astype(v.dtype), state


# ---------------------------------------------------------------------------------------------
# Chunk form
# ---------------------------------------------------------------------------------------------


def _pad_chunk(x, value=0.0):
    """Pad axis -2 (the tokens of a chunk) to a power of two (the pair hierarchy halves it)."""
    C = x.shape[-2]
    P = 1 << (C - 1).bit_length()
    if P == C:
        return x
    widths = [(0, 0)] * x.ndim
    widths[-2] = (0, P - C)
    return jnp.pad(x, widths, constant_values=value)


def _split(x, n: int):
    """``[..., C, K]`` -> ``[..., C / n, n, K]``."""
    return x.reshape(*x.shape[:-2], x.shape[-2] // n, n, x.shape[-1])


def _decay_factors(w):
    """Every decay factor of the chunk form, as products of ``w = exp(g)`` ``[..., C, K]``.

    Returns a dict: ``w``, ``pre4`` / ``suf4`` (the product of w over the tokens of a token's
    4-block before / after it), for each level h = 4, 8, ..., P / 2 of the pair hierarchy
    (P = C rounded up to a power of two) ``levels[h] = (pre, suf)`` per 4-block (the product
    over the earlier / later 4-blocks of the same h-block), and ``exp_e`` (prod_{t < i} w_t =
    exp(e_i)), ``to_end`` (prod_{t > i} w_t = exp(c_C - c_i)) and ``chunk_decay`` (prod_t w_t =
    exp(c_C), ``[..., K]``). Only factors <= 1 are multiplied: nothing overflows, and a factor
    underflows only where its exact value is below the smallest float. (Products are also more
    accurate than exponentials of differences of cumulative sums.)
    """
    C, K = w.shape[-2:]
    w = _pad_chunk(w, 1.0)  # padded tokens decay by exactly 1
    P = w.shape[-2]
    w4 = _split(w, _LEAF)
    w0, w1, w2, w3 = (w4[..., i, :] for i in range(_LEAF))
    one = jnp.ones_like(w0)
    w01, w23 = w0 * w1, w2 * w3
    pre4 = jnp.stack([one, w0, w01, w01 * w2], axis=-2).reshape(w.shape)
    suf4 = jnp.stack([w1 * w23, w23, w3, one], axis=-2).reshape(w.shape)
    # Doubling over 4-blocks: block[b] is the product over the current block of 4-blocks.
    lead = w.shape[:-2]
    n = P // _LEAF
    block = w01 * w23  # [..., n, K]
    pre, suf = jnp.ones_like(block), jnp.ones_like(block)
    levels = {}
    s = 1
    while s < n:
        levels[_LEAF * s] = (pre, suf)
        pre_s, suf_s = (x.reshape(*lead, n // (2 * s), 2, s, K) for x in (pre, suf))
        blk = block.reshape(*lead, n // (2 * s), 2, 1, K)
        first, second = blk[..., 0:1, :, :], blk[..., 1:2, :, :]
        pre = jnp.concatenate([pre_s[..., :1, :, :], pre_s[..., 1:, :, :] * first], axis=-3)
        suf = jnp.concatenate([suf_s[..., :1, :, :] * second, suf_s[..., 1:, :, :]], axis=-3)
        pre, suf = pre.reshape(*lead, n, K), suf.reshape(*lead, n, K)
        block = (first * second).reshape(*lead, n // (2 * s), K)
        s *= 2
    exp_e = (_split(pre4, _LEAF) * pre[..., None, :]).reshape(w.shape)[..., :C, :]
    to_end = (_split(suf4, _LEAF) * suf[..., None, :]).reshape(w.shape)[..., :C, :]
    return dict(w=w, pre4=pre4, suf4=suf4, levels=levels, exp_e=exp_e, to_end=to_end,
                chunk_decay=block.reshape(*lead, K))


def _level_factors(f, h: int):
    """Per token, the decay from the start of its h-block to it (pre) and from it to the end of
    its h-block (suf), ``[..., P, K]``."""
    pre_blk, suf_blk = f["levels"][h]
    pre = (_split(f["pre4"], _LEAF) * pre_blk[..., None, :]).reshape(f["pre4"].shape)
    suf = (_split(f["suf4"], _LEAF) * suf_blk[..., None, :]).reshape(f["suf4"].shape)
    return pre, suf


def _level_operands(lhs, rhs, f, h: int):
    """Queries (second halves of the 2h-blocks, scaled by the decay from their h-block start)
    and keys (first halves, scaled by the decay to their h-block end) of level h."""
    pre, suf = _level_factors(f, h)
    P, K = lhs.shape[-2:]
    queries = (lhs * pre[..., None, :, :]).reshape(*lhs.shape[:-2], P // (2 * h), 2, h, K)
    keys = (rhs * suf[..., None, :, :]).reshape(*rhs.shape[:-2], P // (2 * h), 2, h, K)
    return queries[..., 1, :, :], keys[..., 0, :, :]  # [..., X, n, h, K], [..., Y, n, h, K]


# The six strictly lower pairs (i, j) of a 4-block and the decay between them: prod_{j<t<i} w_t.
_LEAF_PAIRS = ((1, 0), (2, 1), (3, 2), (2, 0), (3, 1), (3, 0))


def _leaf_operands(lhs, rhs, f):
    """Per 4-block, the six pairs as rows: left ``[..., X, n, 6, K]`` (with the decay between
    i and j folded in) and right ``[..., Y, n, 6, K]``."""
    L, R, w4 = _split(lhs, _LEAF), _split(rhs, _LEAF), _split(f["w"], _LEAF)
    w1, w2 = w4[..., None, :, 1, :], w4[..., None, :, 2, :]
    L1, L2, L3 = L[..., 1, :], L[..., 2, :], L[..., 3, :]
    left = jnp.stack([L1, L2, L3, L2 * w1, L3 * w2, L3 * (w1 * w2)], axis=-2)
    right = jnp.stack([R[..., j, :] for _, j in _LEAF_PAIRS], axis=-2)
    return left, right


def _pairs(lhs, rhs, diag, f):
    """Decayed pair matrix ``A[..., x, y, i, j] = sum_d lhs[x, i, d] rhs[y, j, d] prod_{j<t<i}
    w_td`` for j < i, ``diag[..., x, y, i]`` for j = i, 0 above: ``[..., X, Y, C, C]``.

    lhs ``[..., X, C, K]``, rhs ``[..., Y, C, K]``. The chunk is cut into a binary hierarchy
    (padded to a power-of-two length P): at level h = P / 2, ..., 4 the second half of every
    2h-block (the queries) meets its first half (the keys), and the decay between a query i and
    a key j factors as (decay from the start of i's h-block to i) * (decay from j to the end of
    j's h-block), both <= 1 (``_level_operands``): one batched matmul per level. Pairs inside a
    4-block are six explicit dot products (``_leaf_operands``).
    """
    C = lhs.shape[-2]
    lhs, rhs = _pad_chunk(lhs), _pad_chunk(rhs)
    X, P = lhs.shape[-3:-1]
    Y = rhs.shape[-3]
    lead = lhs.shape[:-3]
    left, right = _leaf_operands(lhs, rhs, f)
    prod = jax.lax.optimization_barrier(left[..., :, None, :, :, :] * right[..., None, :, :, :, :])
    leaf = jnp.sum(prod, axis=-1)  # [..., X, Y, n, 6]; an explicit product beats a tiny matmul
    d = _pad_chunk(diag[..., None])[..., 0].reshape(*diag.shape[:-1], P // _LEAF, _LEAF)
    zero = jnp.zeros_like(leaf[..., 0])
    entry = {(i, i): d[..., i] for i in range(_LEAF)}
    entry.update({ij: leaf[..., p] for p, ij in enumerate(_LEAF_PAIRS)})
    rows = [jnp.stack([entry.get((i, j), zero) for j in range(_LEAF)], axis=-1)
            for i in range(_LEAF)]
    blocks = jnp.stack(rows, axis=-2)  # [..., X, Y, P / 4, 4, 4]
    h = _LEAF
    while h < P:
        queries, keys = _level_operands(lhs, rhs, f, h)
        off = jnp.einsum("...xnid,...ynjd->...xynij", queries, keys)  # [..., X, Y, n, h, h]
        b = blocks.reshape(*lead, X, Y, P // (2 * h), 2, h, h)
        top = jnp.concatenate([b[..., 0, :, :], jnp.zeros_like(off)], axis=-1)
        bottom = jnp.concatenate([off, b[..., 1, :, :]], axis=-1)
        blocks = jnp.concatenate([top, bottom], axis=-2)
        h *= 2
    return blocks[..., 0, :C, :C]


def _pairs_bwd(d_a, lhs, rhs, f):
    """Cotangents (d lhs, d rhs, d diag) of ``_pairs`` for a lower-triangular ``d_a``."""
    C = lhs.shape[-2]
    lhs, rhs = _pad_chunk(lhs), _pad_chunk(rhs)
    X, P = lhs.shape[-3:-1]
    Y = rhs.shape[-3]
    lead = lhs.shape[:-3]
    pad = P - C
    blocks = jnp.pad(d_a, [(0, 0)] * (d_a.ndim - 2) + [(0, pad), (0, pad)])[..., None, :, :]
    d_lhs_parts, d_rhs_parts = [], []
    h = P // 2
    while h >= _LEAF:
        b = blocks.reshape(*lead, X, Y, P // (2 * h), 2, h, 2, h)
        d_off = b[..., 1, :, 0, :]
        queries, keys = _level_operands(lhs, rhs, f, h)
        d_q = jnp.einsum("...xynij,...ynjd->...xnid", d_off, keys)
        d_k = jnp.einsum("...xynij,...xnid->...ynjd", d_off, queries)
        d_lhs_parts.append((h, d_q))
        d_rhs_parts.append((h, d_k))
        blocks = jnp.stack([b[..., 0, :, 0, :], b[..., 1, :, 1, :]], axis=-3)
        blocks = blocks.reshape(*lead, X, Y, P // h, h, h)
        h //= 2
    # blocks: [..., X, Y, P / 4, 4, 4] (the 4-blocks on the diagonal)
    d_leaf = jnp.stack([blocks[..., i, j] for i, j in _LEAF_PAIRS], axis=-1)  # [.., X, Y, n, 6]
    d_diag = jnp.stack([blocks[..., i, i] for i in range(_LEAF)], axis=-1)
    d_diag = d_diag.reshape(*d_diag.shape[:-2], P)[..., :C]
    left, right = _leaf_operands(lhs, rhs, f)
    barrier = jax.lax.optimization_barrier
    d_left = jnp.sum(barrier(d_leaf[..., None] * right[..., None, :, :, :, :]), axis=-4)
    d_right = jnp.sum(barrier(d_leaf[..., None] * left[..., :, None, :, :, :]), axis=-5)
    w4 = _split(f["w"], _LEAF)
    w1, w2 = w4[..., None, :, 1, :], w4[..., None, :, 2, :]
    dl = [d_left[..., p, :] for p in range(6)]
    dr = [d_right[..., p, :] for p in range(6)]
    d_lhs = jnp.stack([jnp.zeros_like(dl[0]), dl[0], dl[1] + dl[3] * w1,
                       dl[2] + dl[4] * w2 + dl[5] * (w1 * w2)], axis=-2).reshape(lhs.shape)
    d_rhs = jnp.stack([dr[0] + dr[3] + dr[5], dr[1] + dr[4], dr[2], jnp.zeros_like(dr[0])],
                      axis=-2).reshape(rhs.shape)
    for (h, d_q), (_, d_k) in zip(d_lhs_parts, d_rhs_parts):
        pre, suf = _level_factors(f, h)
        zq, zk = jnp.zeros_like(d_q), jnp.zeros_like(d_k)
        d_lhs = d_lhs + jnp.stack([zq, d_q], axis=-3).reshape(lhs.shape) * pre[..., None, :, :]
        d_rhs = d_rhs + jnp.stack([d_k, zk], axis=-3).reshape(rhs.shape) * suf[..., None, :, :]
    return d_lhs[..., :C, :], d_rhs[..., :C, :], d_diag


def _block_operands(xs, C: int, acc):
    """Per-chunk operands of one block (shared by the forward and the backward pass).

    xs = (q, k, v, g, a, b) time-major slices ``[B, M*C, H, D]``; everything returned is laid
    out ``[B, H, M, C, D]``. lhs / rhs stack the left (b, q ⊙ w) and right (a, k) operands of the
    pair matrices on an axis before C.
    """
    q, k, v, g, a, b = (x.astype(acc) for x in xs)
    M = q.shape[1] // C
    q, k, v, g, a, b = (to_heads(x, M, C) for x in (q, k, v, g, a, b))
    f = _decay_factors(jnp.exp(g))
    w = f["w"][..., :C, :]
    ops = dict(M=M, C=C, q=q, k=k, v=v, a=a, b=b, w=w, f=f)
    ops["qw"] = q * w
    ops["gamma"] = f["exp_e"] * w  # exp(c_i)
    ops["lhs"] = jnp.stack([b, ops["qw"]], axis=-3)
    ops["rhs"] = jnp.stack([a, k], axis=-3)
    return ops


def _mt(x, y):
    """x^T @ y over the last two axes, as one dot (an explicit transpose of x made XLA copy it)."""
    return jnp.einsum("...ji,...jk->...ik", x, y)


def _mmt(x, y):
    """x @ y^T over the last two axes, as one dot."""
    return jnp.einsum("...ik,...jk->...ij", x, y)


def _row_dots(x, y):
    """sum(x * y, axis=-1), materialising the product first: written plainly the compiler made
    it a matrix-vector product that ran several times slower."""
    return jnp.sum(jax.lax.optimization_barrier(x * y), axis=-1)


def _block_core(ops, state, scale):
    """The forward pass of one block from its start state (equations in ``_chunk_form``);
    returns a dict with the output, the final state and what the backward pass reuses."""
    q, k, v, a, b = ops["q"], ops["k"], ops["v"], ops["a"], ops["b"]
    M = ops["M"]
    rhs = ops["rhs"]
    # The j = i entries: q_i . a_i and q_i . k_i on the q rows, none on the b rows.
    diag = jnp.stack([jnp.zeros_like(rhs[..., 0]), _row_dots(q[..., None, :, :], rhs)], axis=-3)
    pairs = _pairs(ops["lhs"], rhs, diag, ops["f"])  # [B, H, M, 2, 2, C, C]
    a_ba, a_bk = pairs[..., 0, 0, :, :], pairs[..., 0, 1, :, :]
    a_qa, a_qk = pairs[..., 1, 0, :, :], pairs[..., 1, 1, :, :]
    t_inv = unit_lower_inverse(-a_ba)  # (I - A_ba)^-1
    b_e = b * ops["f"]["exp_e"]
    z = a_bk @ v
    a_end, k_end = a * ops["f"]["to_end"], k * ops["f"]["to_end"]
    h_kv = jnp.einsum("bhmck,bhmcv->bhmkv", k_end, v)
    starts, us = [], []
    for m in range(M):  # the only part that depends on the state
        starts.append(state)
        y = jnp.einsum("bhck,bhkv->bhcv", b_e[:, :, m], state)
        u = t_inv[:, :, m] @ (y + z[:, :, m])  # pseudo-values u_i = S_{i-1}^T b_i
        us.append(u)
        state = (
            ops["f"]["chunk_decay"][:, :, m, :, None] * state
            + jnp.einsum("bhck,bhcv->bhkv", a_end[:, :, m], u)
            + h_kv[:, :, m]
        )
    starts = jnp.stack(starts, axis=2)
    u = jnp.stack(us, axis=2)
    qg = q * ops["gamma"]
    o = scale * (jnp.einsum("bhmck,bhmkv->bhmcv", qg, starts) + a_qa @ u + a_qk @ v)
    return dict(state=state, o=o, starts=starts, u=u, a_bk=a_bk, a_qa=a_qa, a_qk=a_qk,
                t_inv=t_inv, b_e=b_e, a_end=a_end, k_end=k_end, qg=qg)


def _chunk_block(state, xs, *, chunk_size: int, scale: float, acc):
    ops = _block_operands(xs, chunk_size, acc)
    r = _block_core(ops, state, scale)
    return r["state"], from_heads(r["o"])


def _chunk_block_bwd(state, xs, d_o, d_state, *, chunk_size: int, scale: float, acc):
    """Backward pass of ``_chunk_block``: recomputes the block from its start state, then

      dU     = A_qa^T P + Ā G,   dX = T^T dU              (P = scale dO, G = dS_C; U = T X)
      dS_0   = exp(c_C) ⊙ G + (q ⊙ exp(c))^T P + (b ⊙ exp(e))^T dX   (reverse recurrence)
      dV     = A_qk^T P + K̄ G + A_bk^T dX
      d(b ⊙ exp(e)) = dX S_0^T,  d(q ⊙ exp(c)) = P S_0^T,  dĀ = U G^T,  dK̄ = V G^T
      dA_qa, dA_qk = P U^T, P V^T (lower),  dA_ba, dA_bk = dX U^T, dX V^T (strictly lower),

    the pair matrices' cotangents go through ``_pairs_bwd``, and the decay gradient needs no
    derivative of any product: every decay factor is exp(e_i - .) on a left operand x_i or
    exp(. - c_j) on a right operand y_j (e, c the exclusive / inclusive chunk-local cumulative
    log decays), so d e_i = sum x_i ⊙ dx_i and d c_j = -sum y_j ⊙ dy_j, and
    dg_t = sum_{i >= t} (dc_i + de_i) - de_t + (q ⊙ w)_t ⊙ d(q ⊙ w)_t.
    Returns (cotangent of the start state, cotangents of xs in the input layout).
    """
    ops = _block_operands(xs, chunk_size, acc)
    r = _block_core(ops, state, scale)
    q, k, v, a, b, w = ops["q"], ops["k"], ops["v"], ops["a"], ops["b"], ops["w"]
    f = ops["f"]
    C, M = ops["C"], ops["M"]
    p = scale * to_heads(d_o.astype(acc), M, C)
    du_local = _mt(r["a_qa"], p)
    f_out = jnp.einsum("bhmck,bhmcv->bhmkv", r["qg"], p)
    g_state = d_state.astype(acc)
    afters, d_x_chunks = [], []
    for m in reversed(range(M)):
        afters.append(g_state)  # cotangent of the state after chunk m
        du = du_local[:, :, m] + jnp.einsum("bhck,bhkv->bhcv", r["a_end"][:, :, m], g_state)
        d_x = _mt(r["t_inv"][:, :, m], du)  # cotangent of y + z (u = T (y + z))
        d_x_chunks.append(d_x)
        g_state = (
            f["chunk_decay"][:, :, m, :, None] * g_state
            + f_out[:, :, m]
            + jnp.einsum("bhck,bhcv->bhkv", r["b_e"][:, :, m], d_x)
        )
    after = jnp.stack(afters[::-1], axis=2)
    d_x = jnp.stack(d_x_chunks[::-1], axis=2)
    starts, u = r["starts"], r["u"]
    d_b_e = jnp.einsum("bhmcv,bhmkv->bhmck", d_x, starts)
    d_qg = jnp.einsum("bhmcv,bhmkv->bhmck", p, starts)
    d_a_end = jnp.einsum("bhmcv,bhmkv->bhmck", u, after)
    d_k_end = jnp.einsum("bhmcv,bhmkv->bhmck", v, after)
    d_v = (_mt(r["a_qk"], p) + jnp.einsum("bhmck,bhmkv->bhmcv", r["k_end"], after)
           + _mt(r["a_bk"], d_x))
    d_decay = _row_dots(starts, after)  # [B, H, M, K]
    incl = jnp.tril(jnp.ones((C, C), dtype=bool))
    strict = jnp.tril(jnp.ones((C, C), dtype=bool), -1)
    d_a_qa = jnp.where(incl, _mmt(p, u), 0.0)
    d_a_qk = jnp.where(incl, _mmt(p, v), 0.0)
    d_a_ba = jnp.where(strict, _mmt(d_x, u), 0.0)
    d_a_bk = jnp.where(strict, _mmt(d_x, v), 0.0)
    d_pairs = jnp.stack([jnp.stack([d_a_ba, d_a_bk], axis=-3),
                         jnp.stack([d_a_qa, d_a_qk], axis=-3)], axis=-4)
    d_lhs, d_rhs, d_diag = jax.lax.optimization_barrier(
        _pairs_bwd(d_pairs, ops["lhs"], ops["rhs"], f))
    d_diag = d_diag[..., 1, :, :, None]  # [B, H, M, Y, C, 1]: only the q rows have a diagonal
    d_qw = d_lhs[..., 1, :, :]
    d_q = (w * d_qw + ops["gamma"] * d_qg
           + d_diag[..., 0, :, :] * a + d_diag[..., 1, :, :] * k)
    d_b = d_lhs[..., 0, :, :] + f["exp_e"] * d_b_e
    d_a = d_rhs[..., 0, :, :] + f["to_end"] * d_a_end + d_diag[..., 0, :, :] * q
    d_k = d_rhs[..., 1, :, :] + f["to_end"] * d_k_end + d_diag[..., 1, :, :] * q
    # Decay: gradients w.r.t. the exclusive (e) and inclusive (c) cumulative log decays.
    qw = ops["qw"]
    d_e = b * d_lhs[..., 0, :, :] + qw * d_qw + r["b_e"] * d_b_e
    end_terms = r["a_end"] * d_a_end + r["k_end"] * d_k_end
    d_c = -(a * d_rhs[..., 0, :, :] + k * d_rhs[..., 1, :, :]) + r["qg"] * d_qg - end_terms
    d_c_last = jnp.sum(end_terms, axis=-2) + f["chunk_decay"] * d_decay
    d_c = d_c.at[..., -1, :].add(d_c_last)
    tot = d_c + d_e
    # Sum over t >= i, as a batched matmul (a shared [C, C] operand made XLA transpose tot).
    upper = jnp.broadcast_to(jnp.triu(jnp.ones((C, C), acc)), tot.shape[:-2] + (C, C))
    rev = upper @ tot
    d_g = rev - d_e + qw * d_qw
    d_xs = tuple(from_heads(x) for x in (d_q, d_k, d_v, d_g, d_a, d_b))
    return g_state, d_xs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan_blocks(chunk_size, scale, state, xs):
    """``lax.scan`` of ``_chunk_block`` over blocks (xs ``[num_blocks, B, L, H, D]``)."""
    block = functools.partial(_chunk_block, chunk_size=chunk_size, scale=scale, acc=state.dtype)
    final, o = jax.lax.scan(block, state, xs)
    return o, final


def _scan_blocks_fwd(chunk_size, scale, state, xs):
    block = functools.partial(_chunk_block, chunk_size=chunk_size, scale=scale, acc=state.dtype)

    def body(s, x):
        s_next, o = block(s, x)
        return s_next, (o, s)

    final, (o, starts) = jax.lax.scan(body, state, xs)
    return (o, final), (starts, xs)


def _scan_blocks_bwd(chunk_size, scale, residuals, cotangents):
    starts, xs = residuals
    d_o, d_final = cotangents
    acc = starts.dtype
    bwd = functools.partial(_chunk_block_bwd, chunk_size=chunk_size, scale=scale, acc=acc)

    def body(d_state, x):
        start, block_xs, block_d_o = x
        d_state, d_xs = bwd(start, block_xs, block_d_o, d_state)
        d_xs = tuple(d.astype(x.dtype) for d, x in zip(d_xs, block_xs))
        return d_state, d_xs

    d_state, d_xs = jax.lax.scan(body, d_final.astype(acc), (starts, xs, d_o), reverse=True)
    return d_state, d_xs


_scan_blocks.defvjp(_scan_blocks_fwd, _scan_blocks_bwd)


@functools.partial(jax.jit, static_argnames=("chunk_size", "static_scale", "block_chunks"))
def _chunk_form(q, k, v, g, a, b, initial_state, scale, *, chunk_size: int, static_scale,
                block_chunks: int):
    """Chunkwise-parallel form. Returns (o in v's dtype, final state).

    One chunk, positions i = 1..C, start state S_0; per channel w_i = exp(g_i), c_i = sum_{t<=i}
    g_t (chunk local), e_i = c_{i-1}. Unrolling the recurrence,

      S_i = diag(exp(c_i)) S_0 + sum_{j<=i} diag(exp(c_i - c_j)) (a_j u_j^T + k_j v_j^T),

    with pseudo-values u_j = S_{j-1}^T b_j. With the strictly lower pair matrices
    A_xy[i, j] = sum_d x_id y_jd exp(e_id - c_jd) (j < i; ``_pairs``), the u satisfy
    (I - A_ba) U = (b ⊙ exp(e)) S_0 + A_bk V, so with T = (I - A_ba)^-1 (one small triangular
    inverse per chunk):

      U       = T [ (b ⊙ exp(e)) S_0 + A_bk V ]                           (needs S_0)
      S_C     = diag(exp(c_C)) S_0 + Ā^T U + K̄^T V                         (needs S_0)
      O       = scale [ (q ⊙ exp(c)) S_0 + A_qa U + A_qk V ]

    where Ā = a ⊙ exp(c_C - c), K̄ = k ⊙ exp(c_C - c), and A_qa, A_qk have q ⊙ w on the left
    plus the diagonal q_i . a_i, q_i . k_i (exp(c_i - c_j) = w_i exp(e_i - c_j)). Every decay
    factor is a product of w's (``_decay_factors``). Padded tokens (g = a = b = k = 0) leave
    the state unchanged, so the final state is exact for any T.

    Layout: an outer scan over blocks of at most ``block_chunks`` chunks (``dispatch.TUNING``)
    with a custom VJP (``_scan_blocks``): the forward pass saves each block's start state, the
    backward pass (``_chunk_block_bwd``) recomputes the block from it. ``static_scale`` (a
    Python float) is applied inside the blocks; a traced scale is applied to the output
    afterwards.
    """
    B, T, H, K = q.shape
    C = chunk_size
    acc = acc_dtype(q, k, v, g, a, b)
    if g is None:
        g = jnp.zeros(q.shape, acc)
    state = state_or_zeros(initial_state, (B, H, K, v.shape[-1]), acc)
    num_blocks, M = balanced_blocks(T, C, block_chunks)
    xs = tuple(to_blocks(x, num_blocks, M * C) for x in (q, k, v, g, a, b))
    inner = 1.0 if static_scale is None else static_scale
    o, state = _scan_blocks(C, inner, state, xs)
    o = from_blocks(o, T)
    if static_scale is None:
        o = scale * o
    return o.astype(v.dtype), state


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
      impl: ``"reference"``, ``"chunk"``, ``"pallas"`` or ``"auto"`` (``memjax.ops.dispatch``).
      chunk_size: tokens per chunk for the chunk form, a positive multiple of 16 (T need not be
        a multiple; a chunk longer than T is shortened to T rounded up to 16).

    Returns:
      ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state ``[B, H, K, V]`` in
      float32 (float64 when the inputs are float64).
    """
    form = dispatch.resolve("generalized_delta_rule", impl)
    chunk_size = _check_gdr_chunk_size(chunk_size)
    _validate(q, k, v, g, a, b, initial_state, step=False)
    B, T, H, K = q.shape
    scale = default_scale(scale, K)
    if T == 0:
        acc = acc_dtype(q, k, v, g, a, b)
        return empty_sequence(v.shape, v.dtype, initial_state, (B, H, K, v.shape[-1]), acc)
    if form == "pallas":
        return dispatch.kernel("generalized_delta_rule")(
            q, k, v, g, a, b, scale=scale, initial_state=initial_state, chunk_size=chunk_size
        )
    args = (q, k, v, g, a, b, initial_state, scale)
    if form == "reference":
        return _reference_form(*args)
    # A chunk longer than the sequence would only add padding work.
    C = min(chunk_size, max(SUB_CHUNK, -(-T // SUB_CHUNK) * SUB_CHUNK))
    tune = dispatch.tuning("generalized_delta_rule")
    block_chunks = min(max(1, tune["block_tokens"] // C), tune["max_block_chunks"])
    static = float(scale) if isinstance(scale, (int, float)) else None
    return _chunk_form(*args, chunk_size=C, static_scale=static, block_chunks=block_chunks)
