"""Pallas kernels for the chunked (gated) delta rule, forward and backward.

Operator (``memjax.ops.delta_rule``; one head, ``S`` the ``[K, V]`` state)::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t                      # the current token is included

Chunk form (the UT transform / WY representation). For one chunk of C tokens with incoming
state S, rows i, j = 0..C-1, b = chunk-local cumulative sum of g (b_C its last entry; b = 0
without g) and the masks ``strict: i > j``, ``causal: i >= j``::

    D  = exp(b_i - b_j) on causal, else 0   (the exponent is masked to -inf before the exp)
    A  = strict(diag(beta) (K K^T) * D)
    T  = (I + A)^-1                          (unit lower triangular)
    W  = T diag(beta exp(b)) K,   U = T diag(beta) V
    V' = U - W S                             (pseudo-values)
    O  = scale [ (Q * exp(b)) S + causal((Q K^T) * D) V' ]
    S <- exp(b_C) S + (K * exp(b_C - b))^T V'

Every exponent kept is <= 0 (for g <= 0), so nothing overflows however strong the decay.

Inverse: ``_unit_lower_inverse`` is the recursive-doubling block inversion of
``memjax.ops._common.unit_lower_inverse`` written as full-size masked matmuls: with ``t`` the
inverse of the block-diagonal part of ``I + A`` in blocks of ``s``, the inverse in blocks of
``2 s`` is ``t - t E t`` (E: the lower-left ``s x s`` blocks inside each ``2 s`` block; exact
because ``(t E)^2 = 0``). That is 2 ceil(log2 C) C x C matmuls, no triangular solve (Mosaic has
none) and no dynamic row indexing (Triton cannot slice values). Unlike the Neumann product
``(I - A)(I + A^2)(I + A^4)...``, whose powers of A grow like 2^n binomial(C, n) for beta near 2
and aligned keys and cancel catastrophically in float32, every matrix formed here is a block of
the final, bounded inverse.

Backward (``jax.custom_vjp``): the reverse chunk recurrence carries dS (the cotangent of the
state leaving a chunk) on chip; per chunk, with S the state entering it::

    dV' = scale causal(Q K^T * D)^T dO + (K * exp(b_C - b)) dS
    dS  <- scale (Q * exp(b))^T dO + exp(b_C) dS - W^T dV'
    dW  = -dV' S^T,  dU = dV',  dR = T^T [dW | dU],  dA = -strict(dR [W | U]^T)

and the chain rule through D, A, the row scalings and K K^T gives dq, dk, dv, dbeta and db
(``_chunk_backward``). ``db`` comes out twice, as row sums ``[C, 1]`` and column sums
``[1, C]`` (the column view ``b_col`` and the row view ``b_row`` are separate inputs, see the
layout below); the wrapper adds them and JAX differentiates the chunk-local cumsum b -> g.

States for the backward: the forward saves the state entering every chunk (``[B, H, N, K, V]``
float32, written by the forward kernel as it passes) instead of recomputing them. The backward
walks the chunks in reverse and needs S at each; recomputing would cost a second forward pass
(the states can only be rebuilt front to back). The saved states are ``K V / (C (2K + V))`` of
the size of q, k, v in float32 (0.67x at C = 64, K = V = 128), which we accept for a backward
that is one pass. W, U and V' are recomputed in the backward from the inputs and S.

Layout: the wrappers take the operator's sequence-first arrays (q, k ``[B, T, H, K]``, v
``[B, T, H, V]``, beta, g ``[B, T, H]``), pad T to a multiple of C (zero q, k, v, beta and g
leave the state unchanged: the padded rows of A, W and U are zero, so V' = 0 there) and move
heads in front of time, ``[B, H, T, ...]``, so a ``(C, K)`` tile is the last two dims of a block
(Mosaic needs the last two block dims divisible by (8, 128) or equal to the array's; H would be
a squeezed size-1 dim there). beta and b travel as columns ``[B, H, T, 1]`` (blocks ``(C, 1)``:
per-row scalings of ``[C, K]`` tiles) and b also as rows ``[B, H, N, 1, C]`` (blocks ``(1, C)``),
so ``b_i - b_j`` is a broadcast, with no in-kernel transpose of a vector.

Grids:

- TPU (Mosaic): grid ``(B, H, N)``, chunk axis last and ``"arbitrary"`` (sequential), B and H
  ``"parallel"``; the state lives in a float32 VMEM scratch ``[K, V]``, set from the initial
  state at chunk 0, the final state written at chunk N-1. The backward grid is the same with
  index maps ``c -> N-1-c``, dS in the scratch.
- GPU (Triton): grid ``(B, H)`` (B * H programs), each program holds its head's whole sequence
  block and runs a ``lax.fori_loop`` over chunks with the state as the loop carry (registers),
  chunk tiles read and written with ``pl.ds``; the backward loops c = N-1..0 carrying dS.
  ``num_warps=4, num_stages=1``: untuned (no GPU measured), the loop is not software-pipelined.

The chunk size is used as given (T < C pads to one chunk), because it fixes the tiling.

Tiling rules (``TilingError`` up front): Mosaic: chunk a multiple of the sublane tile (8 rows of
32-bit, 16 of 16-bit), K and V multiples of 8 (the ``[K, V]`` state and the transposed products
``K^T V'`` have K rows). Triton: C, K, V powers of two >= 16 (``tl.dot``). Block sizes follow from
the shapes: ``(C, K)``, ``(C, V)``, ``(K, V)``.

Precision: float32 inputs use float32 matmuls (``Precision.HIGHEST``: Mosaic fp32 contraction,
Triton IEEE, not TF32; the inverse is sensitive). bfloat16 q, k, v stay bfloat16 in HBM; the
products Q K^T and K K^T take them as they are with float32 accumulation, everything after is
float32. float64 inputs (interpret mode only) compute in float64.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

import kernels
from kernels import common

__all__ = ["delta_rule_sharded", "delta_rule_tpu", "delta_rule_gpu"]


# ---------------------------------------------------------------------------------------------
# Chunk math on 2-D values, shared by the Mosaic and the Triton kernels
# ---------------------------------------------------------------------------------------------


def _dot(a, b, *, ta=False, tb=False):
    """``a @ b`` (``a^T`` with ta, ``b^T`` with tb), accumulated in float32 or wider; float32
    operands multiply in full float32. Mixed operands (a bfloat16 input times a float32 term)
    are both cast to the wider type (tl.dot takes one element type)."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    acc = jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
    if a.dtype != b.dtype:
        a, b = a.astype(acc), b.astype(acc)
    exact = a.dtype == jnp.float32
    precision = jax.lax.Precision.HIGHEST if exact else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=acc)


def _row_sum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _col_sum(x):
    return jnp.sum(x, axis=0, keepdims=True)


def _unit_lower_inverse(a, rows, cols):
    """``(I + a)^-1`` for strictly lower-triangular ``a`` ``[C, C]`` by masked recursive
    doubling (module docstring): ceil(log2 C) levels of ``t <- t - t E t``."""
    C = a.shape[0]
    t = jnp.where(rows == cols, 1.0, 0.0).astype(a.dtype)
    level = 0
    while (1 << level) < C:
        same_small = (rows >> level) == (cols >> level)
        same_big = (rows >> (level + 1)) == (cols >> (level + 1))
        lower_left = jnp.where(same_big & ~same_small, a, 0.0)
        t = t - _dot(t, _dot(lower_left, t))
        level += 1
    return t


class _Terms(NamedTuple):
    """What a chunk's forward computes from k, v, beta, b and the incoming state S."""

    rows: jax.Array  # [C, C] int32 row index
    cols: jax.Array  # [C, C] int32 column index
    decay: jax.Array  # [C, C] D
    kk: jax.Array  # [C, C] K K^T
    a: jax.Array  # [C, C] A
    t: jax.Array  # [C, C] (I + A)^-1
    e_b: jax.Array  # [C, 1] exp(b)
    e_last: jax.Array  # [1, 1] exp(b_C)
    to_end: jax.Array  # [C, 1] exp(b_C - b)
    w: jax.Array  # [C, K] W
    u: jax.Array  # [C, V] U
    v_new: jax.Array  # [C, V] V' = U - W S


def _chunk_terms(k, v, beta, b_col, b_row, s):
    """The UT transform of one chunk and its pseudo-values V' (module docstring).

    k ``[C, K]``, v ``[C, V]`` (input dtype); beta, b_col ``[C, 1]``, b_row ``[1, C]``,
    s ``[K, V]`` (accumulation dtype)."""
    C = k.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (C, C), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (C, C), 1)
    decay = jnp.exp(jnp.where(rows >= cols, b_col - b_row, -jnp.inf))
    kk = _dot(k, k, tb=True)
    a = jnp.where(rows > cols, beta * kk * decay, 0.0)
    t = _unit_lower_inverse(a, rows, cols)
    last = jax.lax.broadcasted_iota(jnp.int32, (C, 1), 0) == C - 1
    b_last = _col_sum(jnp.where(last, b_col, 0.0))
    e_b = jnp.exp(b_col)
    w = _dot(t, beta * e_b * k)
    u = _dot(t, beta * v)
    return _Terms(rows, cols, decay, kk, a, t, e_b, jnp.exp(b_last), jnp.exp(b_last - b_col),
                  w, u, u - _dot(w, s))


def _chunk_forward(q, k, v, beta, b_col, b_row, s, scale):
    """One chunk: returns (o ``[C, V]``, the state leaving the chunk ``[K, V]``)."""
    x = _chunk_terms(k, v, beta, b_col, b_row, s)
    scores = _dot(q, k, tb=True) * x.decay  # D is 0 above the diagonal
    o = scale * (_dot(q * x.e_b, s) + _dot(scores, x.v_new))
    return o, x.e_last * s + _dot(k * x.to_end, x.v_new, ta=True)


class _ChunkGrads(NamedTuple):
    dq: jax.Array  # [C, K]
    dk: jax.Array  # [C, K]
    dv: jax.Array  # [C, V]
    dbeta: jax.Array  # [C, 1]
    db_col: jax.Array  # [C, 1]  row-sum part of db
    db_row: jax.Array  # [1, C]  column-sum part of db
    ds: jax.Array  # [K, V]  cotangent of the state entering the chunk


def _chunk_backward(q, k, v, beta, b_col, b_row, s, do, ds_next, scale):
    """One chunk's VJP. ``s``: the state entering the chunk; ``do`` ``[C, V]``: cotangent of o;
    ``ds_next`` ``[K, V]``: cotangent of the state leaving the chunk."""
    x = _chunk_terms(k, v, beta, b_col, b_row, s)
    do = do.astype(s.dtype)
    q_b = q * x.e_b
    k_end = k * x.to_end
    qk = _dot(q, k, tb=True)
    scores = qk * x.decay

    # Through o = scale [Q_b S + scores V'] and S_next = e_last S + K_end^T V'.
    dv_new = scale * _dot(scores, do, ta=True) + _dot(k_end, ds_next)
    ds = scale * _dot(q_b, do, ta=True) + x.e_last * ds_next - _dot(x.w, dv_new, ta=True)
    dq_b = scale * _dot(do, s, tb=True)
    d_scores = scale * jnp.where(x.rows >= x.cols, _dot(do, x.v_new, tb=True), 0.0)
    dqk = d_scores * x.decay
    dk_end = _dot(x.v_new, ds_next, tb=True)
    g_end = _row_sum(dk_end * k_end)  # through exp(b_C - b_i)
    db_last = _col_sum(g_end) + x.e_last * _col_sum(_row_sum(s * ds_next))

    # Through [W | U] = T [R_w | R_u], R_w = beta e^b K, R_u = beta V, T = (I + A)^-1.
    dr_w = _dot(x.t, -_dot(dv_new, s, tb=True), ta=True)
    dr_u = _dot(x.t, dv_new, ta=True)
    da = -jnp.where(x.rows > x.cols, _dot(dr_w, x.w, tb=True) + _dot(dr_u, x.u, tb=True), 0.0)
    dkk = da * beta * x.decay

    dq = dq_b * x.e_b + _dot(dqk, k)
    dk = (_dot(dqk, q, ta=True) + dk_end * x.to_end + _dot(dkk, k) + _dot(dkk, k, ta=True)
          + dr_w * beta * x.e_b)
    dv = dr_u * beta
    dbeta = _row_sum(da * x.kk * x.decay) + _row_sum(dr_w * x.e_b * k) + _row_sum(dr_u * v)
    e = d_scores * scores + da * x.a  # dD * D, D = exp(b_i - b_j)
    last = jax.lax.broadcasted_iota(jnp.int32, b_col.shape, 0) == b_col.shape[0] - 1
    db_col = (_row_sum(dq_b * q_b) + _row_sum(dr_w * beta * x.e_b * k) + _row_sum(e) - g_end
              + jnp.where(last, db_last, 0.0))
    return _ChunkGrads(dq, dk, dv, dbeta, db_col, -_col_sum(e), ds)


# ---------------------------------------------------------------------------------------------
# pallas_call with optional poisoned outputs
# ---------------------------------------------------------------------------------------------


def _pallas_call(kernel, args, in_specs, out_shapes, out_specs, **params):
    """``common.pallas_call`` (poisoning included) in this module's argument order."""
    return common.pallas_call(kernel, tuple(out_shapes), in_specs=tuple(in_specs), args=args,
                              out_specs=tuple(out_specs), **params)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static configuration of one kernel call."""

    variant: str  # "tpu" (Mosaic) or "gpu" (Triton)
    interpret: bool
    chunk: int
    scale: float


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic): grid (B, H, N), state in VMEM scratch
# ---------------------------------------------------------------------------------------------

_TPU_SEMANTICS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _tpu_specs(C, K, V, reverse_n=None):
    """Block specs by role for grid (B, H, N); with ``reverse_n`` the chunk axis runs N-1..0."""
    chunk = (lambda c: reverse_n - 1 - c) if reverse_n else (lambda c: c)
    tile = lambda width: pl.BlockSpec((None, None, C, width),  # noqa: E731
                                      lambda b, h, c: (b, h, chunk(c), 0))
    return dict(
        qk=tile(K), v=tile(V), col=tile(1),
        row=pl.BlockSpec((None, None, None, 1, C), lambda b, h, c: (b, h, chunk(c), 0, 0)),
        state=pl.BlockSpec((None, None, K, V), lambda b, h, c: (b, h, 0, 0)),
        states=pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, chunk(c), 0, 0)),
    )


def _tpu_forward_kernel(q_ref, k_ref, v_ref, beta_ref, bc_ref, br_ref, s0_ref, o_ref, sf_ref,
                        *rest, scale):
    """One chunk (program (b, h, c)); ``rest`` = ([states_ref,] state scratch)."""
    *states_ref, s_ref = rest
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        s_ref[...] = s0_ref[...]

    s = s_ref[...]
    if states_ref:
        states_ref[0][...] = s
    o, s_next = _chunk_forward(q_ref[...], k_ref[...], v_ref[...], beta_ref[...], bc_ref[...],
                               br_ref[...], s, scale)
    o_ref[...] = o.astype(o_ref.dtype)
    s_ref[...] = s_next

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        sf_ref[...] = s_next


def _forward_outputs(q, v, s0, n_chunks, specs, save_states):
    """The forward kernels' outputs and their block specs: o ``[B, H, Tp, V]``, the final state
    ``[B, H, K, V]`` and, with ``save_states``, each chunk's start state ``[B, H, N, K, V]``."""
    B, H, Tp, K = q.shape
    V, acc = v.shape[-1], s0.dtype
    shapes = [jax.ShapeDtypeStruct((B, H, Tp, V), v.dtype), jax.ShapeDtypeStruct((B, H, K, V), acc)]
    out_specs = [specs["v"], specs["state"]]
    if save_states:
        shapes.append(jax.ShapeDtypeStruct((B, H, n_chunks, K, V), acc))
        out_specs.append(specs["states"])
    return shapes, out_specs


def _tpu_forward(cfg, q, k, v, beta_col, b_col, b_row, s0, save_states):
    B, H, Tp, K = q.shape
    V, C, N, acc = v.shape[-1], cfg.chunk, Tp // cfg.chunk, s0.dtype
    sp = _tpu_specs(C, K, V)
    out_shapes, out_specs = _forward_outputs(q, v, s0, N, sp, save_states)
    return _pallas_call(
        functools.partial(_tpu_forward_kernel, scale=cfg.scale),
        (q, k, v, beta_col, b_col, b_row, s0),
        [sp["qk"], sp["qk"], sp["v"], sp["col"], sp["col"], sp["row"], sp["state"]],
        out_shapes, out_specs, grid=(B, H, N), scratch_shapes=[pltpu.VMEM((K, V), acc)],
        compiler_params=_TPU_SEMANTICS, interpret=cfg.interpret)


def _tpu_backward_kernel(q_ref, k_ref, v_ref, beta_ref, bc_ref, br_ref, s_ref, do_ref, dsf_ref,
                         dq_ref, dk_ref, dv_ref, dbeta_ref, dbc_ref, dbr_ref, ds0_ref, ds_ref,
                         *, scale):
    """One chunk, chunks visited last to first; ``ds_ref``: dS scratch."""
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        ds_ref[...] = dsf_ref[...]

    grads = _chunk_backward(q_ref[...], k_ref[...], v_ref[...], beta_ref[...], bc_ref[...],
                            br_ref[...], s_ref[...], do_ref[...], ds_ref[...], scale)
    for ref, value in zip((dq_ref, dk_ref, dv_ref, dbeta_ref, dbc_ref, dbr_ref), grads[:-1]):
        ref[...] = value.astype(ref.dtype)
    ds_ref[...] = grads.ds

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = grads.ds


def _tpu_backward(cfg, q, k, v, beta_col, b_col, b_row, states, do, dsf):
    B, H, Tp, K = q.shape
    V, C, N, acc = v.shape[-1], cfg.chunk, Tp // cfg.chunk, states.dtype
    sp = _tpu_specs(C, K, V, reverse_n=N)
    out_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    out_shapes += [jax.ShapeDtypeStruct(x.shape, acc) for x in (beta_col, b_col, b_row, dsf)]
    return _pallas_call(
        functools.partial(_tpu_backward_kernel, scale=cfg.scale),
        (q, k, v, beta_col, b_col, b_row, states, do, dsf),
        [sp[r] for r in ("qk", "qk", "v", "col", "col", "row", "states", "v", "state")],
        out_shapes, [sp[r] for r in ("qk", "qk", "v", "col", "col", "row", "state")],
        grid=(B, H, N), scratch_shapes=[pltpu.VMEM((K, V), acc)],
        compiler_params=_TPU_SEMANTICS, interpret=cfg.interpret)


# ---------------------------------------------------------------------------------------------
# GPU (Triton): grid (B, H), fori_loop over chunks, state as the loop carry
# ---------------------------------------------------------------------------------------------

_TRITON_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=1)


def _triton_specs(Tp, C, K, V):
    """Block specs by role for grid (B, H): one head's whole sequence per program."""
    N = Tp // C
    seq = lambda width: pl.BlockSpec((None, None, Tp, width),  # noqa: E731
                                     lambda b, h: (b, h, 0, 0))
    return dict(
        qk=seq(K), v=seq(V), col=seq(1),
        row=pl.BlockSpec((None, None, N, 1, C), lambda b, h: (b, h, 0, 0, 0)),
        state=pl.BlockSpec((None, None, K, V), lambda b, h: (b, h, 0, 0)),
        states=pl.BlockSpec((None, None, N, K, V), lambda b, h: (b, h, 0, 0, 0)),
    )


def _triton_chunk_inputs(c, C, q_ref, k_ref, v_ref, beta_ref, bc_ref, br_ref):
    rows = pl.ds(c * C, C)
    return (q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], beta_ref[rows, :], bc_ref[rows, :],
            br_ref[c])


def _triton_forward_kernel(q_ref, k_ref, v_ref, beta_ref, bc_ref, br_ref, s0_ref, o_ref, sf_ref,
                           *states_ref, scale, chunk, n_chunks):
    """One (b, h): loop over the chunks; ``states_ref``: optional chunk-start states."""

    def body(c, s):
        if states_ref:
            states_ref[0][c] = s
        x = _triton_chunk_inputs(c, chunk, q_ref, k_ref, v_ref, beta_ref, bc_ref, br_ref)
        o, s_next = _chunk_forward(*x, s, scale)
        o_ref[pl.ds(c * chunk, chunk), :] = o.astype(o_ref.dtype)
        return s_next

    sf_ref[...] = jax.lax.fori_loop(0, n_chunks, body, s0_ref[...])


def _triton_forward(cfg, q, k, v, beta_col, b_col, b_row, s0, save_states):
    B, H, Tp, K = q.shape
    V, C, N = v.shape[-1], cfg.chunk, Tp // cfg.chunk
    sp = _triton_specs(Tp, C, K, V)
    out_shapes, out_specs = _forward_outputs(q, v, s0, N, sp, save_states)
    kernel = functools.partial(_triton_forward_kernel, scale=cfg.scale, chunk=C, n_chunks=N)
    return _pallas_call(
        kernel, (q, k, v, beta_col, b_col, b_row, s0),
        [sp["qk"], sp["qk"], sp["v"], sp["col"], sp["col"], sp["row"], sp["state"]],
        out_shapes, out_specs, grid=(B, H), compiler_params=_TRITON_PARAMS,
        interpret=cfg.interpret)


def _triton_backward_kernel(q_ref, k_ref, v_ref, beta_ref, bc_ref, br_ref, states_ref, do_ref,
                            dsf_ref, dq_ref, dk_ref, dv_ref, dbeta_ref, dbc_ref, dbr_ref, ds0_ref,
                            *, scale, chunk, n_chunks):
    """One (b, h): loop over the chunks last to first, dS as the loop carry."""

    def body(i, ds_next):
        c = n_chunks - 1 - i
        rows = pl.ds(c * chunk, chunk)
        x = _triton_chunk_inputs(c, chunk, q_ref, k_ref, v_ref, beta_ref, bc_ref, br_ref)
        grads = _chunk_backward(*x, states_ref[c], do_ref[rows, :], ds_next, scale)
        for ref, value in zip((dq_ref, dk_ref, dv_ref, dbeta_ref, dbc_ref), grads[:5]):
            ref[rows, :] = value.astype(ref.dtype)
        dbr_ref[c] = grads.db_row
        return grads.ds

    ds0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dsf_ref[...])


def _triton_backward(cfg, q, k, v, beta_col, b_col, b_row, states, do, dsf):
    B, H, Tp, K = q.shape
    V, C, N, acc = v.shape[-1], cfg.chunk, Tp // cfg.chunk, states.dtype
    sp = _triton_specs(Tp, C, K, V)
    out_shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    out_shapes += [jax.ShapeDtypeStruct(x.shape, acc) for x in (beta_col, b_col, b_row, dsf)]
    kernel = functools.partial(_triton_backward_kernel, scale=cfg.scale, chunk=C, n_chunks=N)
    return _pallas_call(
        kernel, (q, k, v, beta_col, b_col, b_row, states, do, dsf),
        [sp[r] for r in ("qk", "qk", "v", "col", "col", "row", "states", "v", "state")],
        out_shapes, [sp[r] for r in ("qk", "qk", "v", "col", "col", "row", "state")],
        grid=(B, H), compiler_params=_TRITON_PARAMS, interpret=cfg.interpret)


# ---------------------------------------------------------------------------------------------
# custom_vjp over the kernel layout
# ---------------------------------------------------------------------------------------------

_FORWARD = {"tpu": _tpu_forward, "gpu": _triton_forward}
_BACKWARD = {"tpu": _tpu_backward, "gpu": _triton_backward}


def _views(beta, b, C):
    """beta ``[B, H, Tp]`` and b as the kernels read them: beta and b as columns
    ``[B, H, Tp, 1]``, b as rows ``[B, H, N, 1, C]``."""
    B, H, Tp = b.shape
    return beta[..., None], b[..., None], b.reshape(B, H, Tp // C, 1, C)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel_call(cfg, q, k, v, beta, b, s0):
    """Kernel layout: q, k ``[B, H, Tp, K]``, v ``[B, H, Tp, V]``, beta and b (chunk-local
    cumulative log decay) ``[B, H, Tp]``, s0 ``[B, H, K, V]``. Returns (o ``[B, H, Tp, V]``,
    final state)."""
    o, s = _FORWARD[cfg.variant](cfg, q, k, v, *_views(beta, b, cfg.chunk), s0, False)
    return o, s


def _kernel_call_fwd(cfg, q, k, v, beta, b, s0):
    o, s, states = _FORWARD[cfg.variant](cfg, q, k, v, *_views(beta, b, cfg.chunk), s0, True)
    return (o, s), (q, k, v, beta, b, states)


def _kernel_call_bwd(cfg, residuals, cotangents):
    q, k, v, beta, b, states = residuals
    do, dsf = cotangents
    dq, dk, dv, dbeta, db_col, db_row, ds0 = _BACKWARD[cfg.variant](
        cfg, q, k, v, *_views(beta, b, cfg.chunk), states, do, dsf.astype(states.dtype))
    return dq, dk, dv, dbeta.reshape(b.shape), (db_col.reshape(b.shape)
                                                + db_row.reshape(b.shape)), ds0


_kernel_call.defvjp(_kernel_call_fwd, _kernel_call_bwd)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------


def _power_of_two_at_least_16(kernel, name, value):
    if value < 16 or value & (value - 1):
        raise common.TilingError(f"{kernel}: {name} = {value} must be a power of two >= 16 "
                                 "(tl.dot needs every matmul dimension a power of two >= 16)")


def _check_tiling(variant, C, K, V, dtype):
    if variant == "tpu":
        name = "delta_rule (tpu)"
        sublanes = 8 * 4 // max(1, min(4, jnp.dtype(dtype).itemsize))
        common.require_divisible(name, "chunk_size", C, sublanes,
                                 f"the rows of a (C, K) block fill whole sublane tiles: "
                                 f"{sublanes} rows of {jnp.dtype(dtype).name}")
        for dim, value in (("K", K), ("V", V)):
            common.require_divisible(name, dim, value, 8, "the [K, V] state and the "
                                     "transposed products K^T V' have K rows, tiled by 8")
    else:
        for dim, value in (("chunk_size", C), ("K", K), ("V", V)):
            _power_of_two_at_least_16("delta_rule (gpu)", dim, value)


def _delta_rule(q, k, v, beta, g, *, scale, initial_state, chunk_size, variant, interpret):
    """Layout, padding and the chunk-local cumsum around ``_kernel_call`` (differentiated by
    JAX); returns the operator's (o ``[B, T, H, V]`` in v's dtype, final state)."""
    B, T, H, K = q.shape
    V, C = v.shape[-1], chunk_size
    io = jnp.result_type(q, k, v)
    acc = functools.reduce(jnp.promote_types,
                           [x.dtype for x in (q, k, v, beta, g) if x is not None], jnp.float32)
    _check_tiling(variant, C, K, V, io)
    scale = float(K ** -0.5 if scale is None else scale)

    def heads_first(x, dtype):  # [B, T, H, ...] -> [B, H, Tp, ...], zero-padded
        return jnp.swapaxes(common.pad_time(x.astype(dtype), C), 1, 2)

    beta_ = heads_first(beta, acc)
    Tp = beta_.shape[-1]
    if g is None:
        b = jnp.zeros((B, H, Tp), acc)
    else:
        b = jnp.cumsum(heads_first(g, acc).reshape(B, H, Tp // C, C), axis=-1).reshape(B, H, Tp)
    s0 = jnp.zeros((B, H, K, V), acc) if initial_state is None else initial_state.astype(acc)
    cfg = _Config(variant, bool(interpret), C, scale)
    o, state = _kernel_call(cfg, heads_first(q, io), heads_first(k, io), heads_first(v, io),
                            beta_, b, s0)
    return jnp.swapaxes(o, 1, 2)[:, :T].astype(v.dtype), state


def delta_rule_tpu(q, k, v, beta, g=None, *, scale=None, initial_state=None, chunk_size=64,
                   interpret=False):
    """The (gated) delta rule by the Mosaic (TPU) kernels; differentiable (custom VJP).

    Args:
      q, k: ``[B, T, H, K]`` (keys used as given); v: ``[B, T, H, V]``.
      beta: ``[B, T, H]`` in (0, 2); g: optional log decay ``[B, T, H]`` (<= 0), None: none.
      scale: output scale (default ``K ** -0.5``).
      initial_state: ``[B, H, K, V]`` or None (zeros).
      chunk_size: C, a multiple of 8 (16 for 16-bit inputs); T is padded to a multiple of C.
      interpret: run in Pallas interpret mode (CPU).

    Returns:
      ``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] float32)`` (float64 for float64
      inputs, interpret mode only).

    Raises:
      TilingError: C, K or V break a Mosaic tiling rule (module docstring).
    """
    return _delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                       chunk_size=chunk_size, variant="tpu", interpret=interpret)


def delta_rule_gpu(q, k, v, beta, g=None, *, scale=None, initial_state=None, chunk_size=64,
                   interpret=False):
    """The (gated) delta rule by the Triton (GPU) kernels; differentiable (custom VJP).

    Arguments and results as ``delta_rule_tpu``; C, K and V must be powers of two >= 16.
    """
    return _delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                       chunk_size=chunk_size, variant="gpu", interpret=interpret)


_VARIANTS = {"tpu": delta_rule_tpu, "gpu": delta_rule_gpu}


def delta_rule_sharded(mesh, *, batch_axis=None, head_axis=None, variant="tpu",
                       interpret=False):
    """``delta_rule_tpu`` / ``delta_rule_gpu`` (``variant``) under ``jax.shard_map``: B is
    split over the mesh axis ``batch_axis`` and H over ``head_axis`` (None: not split); each
    shard runs the kernel on its own slice (no collective: heads and batch are independent).

    Returns ``f(q, k, v, beta, g=None, *, scale=None, initial_state=None, chunk_size=64)``.
    """
    run = _VARIANTS[variant]
    seq, per_token, state = ("B", None, "H", None), ("B", None, "H"), ("B", "H", None, None)

    def sharded(q, k, v, beta, g=None, *, scale=None, initial_state=None, chunk_size=64):
        def local(q, k, v, beta, g, s0):
            return run(q, k, v, beta, g, scale=scale, initial_state=s0, chunk_size=chunk_size,
                       interpret=interpret)

        in_specs = (seq, seq, seq, per_token, None if g is None else per_token,
                    None if initial_state is None else state)
        fn = common.shard_batch_and_heads(local, mesh, in_specs, (seq, state),
                                          batch_axis=batch_axis, head_axis=head_axis)
        return fn(q, k, v, beta, g, initial_state)

    return sharded


@kernels.register("delta_rule", platform="tpu")
def _registered_tpu(q, k, v, beta, g=None, *, scale, initial_state, chunk_size):
    return delta_rule_tpu(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                          chunk_size=chunk_size, interpret=common.interpret("tpu"))


@kernels.register("delta_rule", platform="gpu")
def _registered_gpu(q, k, v, beta, g=None, *, scale, initial_state, chunk_size):
    return delta_rule_gpu(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                          chunk_size=chunk_size, interpret=common.interpret("gpu"))


@kernels.register("delta_rule", platform="cpu")
def _registered_cpu(q, k, v, beta, g=None, *, scale, initial_state, chunk_size):
    return delta_rule_tpu(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                          chunk_size=chunk_size, interpret=common.interpret("cpu"))
