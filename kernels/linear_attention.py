"""Pallas kernels for chunked linear attention with a per-head (scalar) decay, forward and
backward, in a TPU (Mosaic) and a GPU (Triton) variant sharing one chunk algorithm.

Recurrence (one batch row and head; S is the ``[K, V]`` state, g_t <= 0 the log decay)::

    S_t = exp(g_t) S_{t-1} + k_t v_t^T        o_t = scale * S_t^T q_t   (current token included)

Shapes (as ``memjax.ops.linear_attention``): q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g None or
``[B, T, H]``; initial_state None or ``[B, H, K, V]``. Returns (o ``[B, T, H, V]`` in v's dtype,
final state ``[B, H, K, V]`` float32). Not supported (a ValueError names them): a per-channel
g ``[B, T, H, K]``, ``normalize=True``, float64 inputs (Pallas computes in float32) and a traced
``scale`` (it is baked into the kernel).

Chunk algorithm (``_chunk_forward``): for a chunk of C tokens with start state S, b the
chunk-local cumulative sum of g and b_C its last entry::

    A      = (q k^T) ⊙ D,   D_ij = exp(b_i - b_j) for i >= j, else 0
    o      = scale * [ A v + exp(b) ⊙ (q S) ]
    S_next = exp(b_C) S + (k ⊙ exp(b_C - b))^T v

Every exponent is <= 0 when g <= 0, and the causal mask is applied to the exponent (-inf) before
``exp``, so no ``inf * 0`` appears however strong the decay. Matmul operands are cast to the
inputs' dtype (bfloat16 stays bfloat16 on the MXU / tensor cores) and accumulate in float32
(``preferred_element_type``; float32 operands use ``Precision.HIGHEST``: Triton's default for
float32 is TF32). The state is always float32.

Backward (``_chunk_backward``), with G the cotangent of S_next and dO' = scale * dO::

    dP = (dO' v^T) ⊙ D,   dq_inter = exp(b) ⊙ dO' S^T,   dk_state = exp(b_C - b) ⊙ v G^T
    dq = dP k + dq_inter       dk = dP^T q + dk_state       dv = A^T dO' + (k ⊙ exp(b_C - b)) G
    G_prev = exp(b_C) G + (q ⊙ exp(b))^T dO'
    d b_i = Σ_j W_ij - Σ_j W_ji + q_i . dq_inter_i - k_i . dk_state_i  (+ <S_next, G> if i = C-1)

with W = (dO' v^T) ⊙ A off its diagonal (the diagonal terms cancel exactly; leaving them out
avoids rounding noise where strong decay makes the true gradient tiny) and
<S_next, G> = exp(b_C) <S, G> + Σ_i k_i . dk_state_i (so S_next is not needed). The kernels take
b, not g: the chunk-local cumsum is done in XLA outside the ``custom_vjp``, and autodiff turns
d b into dg (a reverse cumsum inside each chunk).

Saved states vs recompute: the forward pass of the ``custom_vjp`` also writes the start state of
every chunk (``[B, H, T/C, K, V]`` float32) and the backward pass reads them. The backward is then
one reverse sweep over the chunks; recomputing the states would cost a second sequential sweep
(the part of this algorithm that cannot be parallelised over chunks). The price is memory:
K V 4 / C bytes per token and head (1 KiB for K = V = 128, C = 64), about the size of q, k, v in
bfloat16, instead of nothing.

Layout: the wrapper pads T to a multiple of C (zero k, v and g leave the state unchanged), puts
heads first (``[B, H, T, D]``) and passes b twice, as a column ``[B, H, T, 1]`` and as rows
``[B, H, T/C, 1, C]``, because D needs b along both axes and a kernel cannot cheaply transpose a
vector. Per-token decay gradients come back in the same two layouts and are added in XLA.

TPU variant: grid ``(B, H, V/Vb, T/C)`` forward and ``(B, H, T/C)`` backward, the chunk axis last
and "arbitrary" (sequential; the others "parallel"), the state (or G) in a float32 VMEM scratch
initialised at the first chunk; the backward's index maps visit chunk ``n - 1 - c`` at step c.
Mosaic's block rule (checked at lowering): the last two dims of every block are divisible by
(8, 128) or equal to the array's dims. Blocks here are (C, K), (C, Vb), (K, Vb), (C, 1), (1, C),
so that needs C % 8 == 0 (or C = T) and Vb % 128 == 0 or Vb = V; ``_check_tiling`` also asks
K % 8 == 0 and V % 8 == 0 (K is the sublane dim of the state and of the transposed operands of
the K^T V products).

GPU variant (Triton): grid ``(B, H, V/Vb)`` forward and ``(B, H)`` backward; each program runs a
``fori_loop`` over the chunks (in reverse in the backward) with the state as the carry, reading
and writing chunk slices of whole-sequence refs (``ref[pl.ds(c * C, C), :]``). Triton needs
power-of-two shapes for every value and ``tl.dot`` needs dims >= 16: C, K and Vb must be powers
of two >= 16.

V blocks: forward programs split V into blocks of Vb (default: 128 on TPU, 64 on GPU when V is a
multiple of it, else V): outputs and states are independent per V block, and smaller blocks bound
the state's VMEM / register footprint. The backward keeps the whole V (dq and d b sum over V).

Chunk: ``chunk_size`` from the op; a sequence shorter than it runs one chunk of the smallest valid
size covering it (a multiple of 8 on TPU, a power of two >= 16 on GPU) instead of padding to C.

Limits: g None runs with b = 0 (no separate no-decay kernel); the head-major transposes are XLA
copies (Triton could read ``[B, T, H, K]`` strided, Mosaic could not tile it for H > 1). On this
repository's CPU machines the kernels are checked in interpret mode and by lowering
(``jax.export`` for "tpu" and "cuda"), which runs Pallas' own checks and emits the Mosaic / Triton
IR but not the Mosaic or Triton compilers (those run inside XLA on the device); block sizes are
not tuned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import kernels
from kernels import common

__all__ = ["linear_attention_gpu", "linear_attention_sharded", "linear_attention_tpu"]

NN, NT, TN = (1, 0), (1, 1), (0, 0)  # contracting dims (lhs, rhs): a b, a b^T, a^T b


# ---------------------------------------------------------------------------------------------
# Chunk math shared by both variants (values already loaded; every array is 2-D)
# ---------------------------------------------------------------------------------------------


def _mm(a, b, contract, dtype):
    """a @ b with the given contracting dims, operands cast to ``dtype``, float32 result."""
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                           preferred_element_type=jnp.float32)


def _iota(shape, axis):
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _causal_decay(b_col, b_row):
    """D_ij = exp(b_i - b_j) for i >= j, else 0 (``[C, C]``); masked before the exp."""
    C = b_col.shape[0]
    causal = _iota((C, C), 0) >= _iota((C, C), 1)
    return jnp.exp(jnp.where(causal, b_col - b_row, -jnp.inf))


def _last(b_row):
    """b_C, the row's last entry, as ``[1, 1]`` (a masked sum: Triton cannot slice values)."""
    C = b_row.shape[1]
    return jnp.sum(jnp.where(_iota((1, C), 1) == C - 1, b_row, 0.0), axis=1, keepdims=True)


def _total(x):
    """Sum of a 2-D array as ``[1, 1]``."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _chunk_forward(q, k, v, b_col, b_row, S, scale):
    """One chunk: q, k ``[C, K]``, v ``[C, Vb]``, b ``[C, 1]`` and ``[1, C]``, S ``[K, Vb]``
    float32. Returns (o ``[C, Vb]`` float32, S_next)."""
    dt = q.dtype
    b_last = _last(b_row)
    scores = _mm(q, k, NT, dt) * _causal_decay(b_col, b_row)
    inter = _mm(q, S, NN, dt) * jnp.exp(b_col)
    o = scale * (_mm(scores, v, NN, dt) + inter)
    k_write = k.astype(jnp.float32) * jnp.exp(b_last - b_col)
    return o, jnp.exp(b_last) * S + _mm(k_write, v, TN, dt)


def _chunk_backward(q, k, v, b_col, b_row, S, d_o, G, scale):
    """Gradients of one chunk (see the module docstring). S: the chunk's start state, G: the
    cotangent of its end state, both ``[K, V]`` float32. Returns ((dq, dk, dv, db_col, db_row),
    G_prev), all float32; db_col ``[C, 1]`` and db_row ``[1, C]`` add up to d b."""
    dt = q.dtype
    C = q.shape[0]
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    q32, k32, d_o = f32(q), f32(k), f32(d_o) * scale
    b_last = _last(b_row)
    from_start, to_end = jnp.exp(b_col), jnp.exp(b_last - b_col)
    decay = _causal_decay(b_col, b_row)
    scores = _mm(q, k, NT, dt) * decay
    d_scores = _mm(d_o, v, NT, dt)
    d_p = d_scores * decay
    dq_inter = _mm(d_o, S, NT, dt) * from_start
    dk_state = _mm(v, G, NT, dt) * to_end
    dq = _mm(d_p, k, NN, dt) + dq_inter
    dk = _mm(d_p, q, TN, dt) + dk_state
    dv = _mm(scores, d_o, TN, dt) + _mm(k32 * to_end, G, NN, dt)

    w = jnp.where(_iota((C, C), 0) != _iota((C, C), 1), d_scores * scores, 0.0)
    k_dk = jnp.sum(k32 * dk_state, axis=1, keepdims=True)
    end_term = jnp.exp(b_last) * _total(S * G) + _total(k_dk)  # <S_next, G>
    db_col = (jnp.sum(w, axis=1, keepdims=True) + jnp.sum(q32 * dq_inter, axis=1, keepdims=True)
              - k_dk + jnp.where(_iota((C, 1), 0) == C - 1, end_term, 0.0))
    db_row = -jnp.sum(w, axis=0, keepdims=True)
    G_prev = jnp.exp(b_last) * G + _mm(q32 * from_start, d_o, TN, dt)
    return (dq, dk, dv, db_col, db_row), G_prev


# ---------------------------------------------------------------------------------------------
# pallas_call with poisoned outputs
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Configuration and tiling checks
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    variant: str  # "tpu" or "gpu"
    chunk: int
    block_v: int
    scale: float
    interpret: bool


def _name(variant: str) -> str:
    return f"linear_attention ({variant})"


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_tiling(variant: str, C: int, K: int, V: int, block_v: int) -> None:
    """Raise a TilingError naming the rule a shape breaks (see the module docstring)."""
    name = _name(variant)
    common.require_divisible(name, "V", V, block_v, "V is split into blocks of block_v")
    if variant == "tpu":
        sublane = "the sublane width of a float32 TPU tile"
        common.require_divisible(name, "chunk_size", C, 8, sublane)
        common.require_divisible(name, "K", K, 8, sublane)
        common.require_divisible(name, "V", V, 8, sublane)
        if block_v != V:
            common.require_divisible(name, "block_v", block_v, 128,
                                     "a lane-dim block must be a multiple of 128 or all of V")
        return
    for dim, value in (("chunk_size", C), ("K", K), ("block_v", block_v)):
        if not (_is_pow2(value) and value >= 16):
            raise common.TilingError(
                f"{name}: {dim} = {value} must be a power of two >= 16 (Triton block shapes are "
                "powers of two and tl.dot needs dims >= 16)")


def _default_block_v(variant: str, V: int) -> int:
    block = 128 if variant == "tpu" else 64
    return block if V % block == 0 else V


def _effective_chunk(variant: str, C: int, T: int) -> int:
    """A chunk longer than the sequence shrinks to the smallest valid size covering it."""
    if T >= C:
        return C
    if variant == "tpu":
        return -(-T // 8) * 8
    return max(16, 1 << (T - 1).bit_length())


def _check_features(variant, q, g, normalize, scale) -> float:
    """Errors for what the kernels do not implement; returns the scale as a Python float."""
    name = _name(variant)
    if g is not None and g.ndim == 4:
        raise ValueError(f"{name}: a per-channel decay g [B, T, H, K] is not supported (only "
                         "g None or per head [B, T, H]); use impl='chunk'")
    if normalize:
        raise ValueError(f"{name}: normalize=True is not supported; use impl='chunk'")
    if jnp.dtype(q.dtype) == jnp.float64:
        raise ValueError(f"{name}: float64 inputs are not supported (the kernel computes in "
                         "float32); use impl='chunk' or 'reference'")
    try:
        return float(scale)
    except (TypeError, jax.errors.ConcretizationTypeError) as err:
        raise ValueError(f"{name}: scale must be a static number (it is compiled into the "
                         f"kernel), got {scale!r}") from err


# ---------------------------------------------------------------------------------------------
# TPU (Mosaic) kernels
# ---------------------------------------------------------------------------------------------


def _tpu_params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward_kernel_tpu(q_ref, k_ref, v_ref, bc_ref, br_ref, h0_ref, o_ref, hT_ref, *rest,
                        scale):
    """Grid (B, H, V blocks, chunks); ``rest`` = ([starts_ref], state scratch)."""
    *starts_ref, state = rest
    c = pl.program_id(3)

    @pl.when(c == 0)
    def _():
        state[...] = h0_ref[...]

    if starts_ref:
        starts_ref[0][...] = state[...]
    o, S_next = _chunk_forward(q_ref[...], k_ref[...], v_ref[...], bc_ref[...], br_ref[...],
                               state[...], scale)
    o_ref[...] = o.astype(o_ref.dtype)
    state[...] = S_next

    @pl.when(c == pl.num_programs(3) - 1)
    def _():
        hT_ref[...] = S_next


def _forward_tpu(cfg: _Config, q, k, v, b_col, b_row, h0, with_starts: bool):
    B, H, T, K = q.shape
    V, C, Vb = v.shape[-1], cfg.chunk, cfg.block_v
    N = T // C
    rows = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, j, c: (b, h, c, 0))  # noqa
    v_rows = pl.BlockSpec((None, None, C, Vb), lambda b, h, j, c: (b, h, c, j))
    state = pl.BlockSpec((None, None, K, Vb), lambda b, h, j, c: (b, h, 0, j))
    in_specs = [rows(K), rows(K), v_rows, rows(1),
                pl.BlockSpec((None, None, None, 1, C), lambda b, h, j, c: (b, h, c, 0, 0)), state]
    out_shape = [jax.ShapeDtypeStruct((B, H, T, V), v.dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
    out_specs = [v_rows, state]
    if with_starts:
        out_shape.append(jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32))
        out_specs.append(
            pl.BlockSpec((None, None, None, K, Vb), lambda b, h, j, c: (b, h, c, 0, j)))
    return common.pallas_call(
        functools.partial(_forward_kernel_tpu, scale=cfg.scale), out_shape,
        grid=(B, H, V // Vb, N), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((K, Vb), jnp.float32)],
        compiler_params=_tpu_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=cfg.interpret, name="linear_attention_fwd_tpu",
        args=(q, k, v, b_col, b_row, h0),
    )  # fmt: skip


def _backward_kernel_tpu(q_ref, k_ref, v_ref, bc_ref, br_ref, s_ref, do_ref, dhT_ref,
                         dq_ref, dk_ref, dv_ref, dbc_ref, dbr_ref, dh0_ref, d_state, *, scale):
    """Grid (B, H, chunks), chunk n - 1 - c at step c; ``d_state`` holds G (float32)."""
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        d_state[...] = dhT_ref[...]

    grads, G_prev = _chunk_backward(q_ref[...], k_ref[...], v_ref[...], bc_ref[...],
                                    br_ref[...], s_ref[...], do_ref[...], d_state[...], scale)
    for ref, x in zip((dq_ref, dk_ref, dv_ref, dbc_ref, dbr_ref), grads):
        ref[...] = x.astype(ref.dtype)
    d_state[...] = G_prev

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        dh0_ref[...] = G_prev


def _backward_tpu(cfg: _Config, q, k, v, b_col, b_row, starts, d_o, d_final):
    B, H, T, K = q.shape
    V, C = v.shape[-1], cfg.chunk
    N = T // C
    rev = lambda c: N - 1 - c  # noqa: E731
    rows = lambda d: pl.BlockSpec((None, None, C, d), lambda b, h, c: (b, h, rev(c), 0))  # noqa
    b_rows = pl.BlockSpec((None, None, None, 1, C), lambda b, h, c: (b, h, rev(c), 0, 0))
    state = pl.BlockSpec((None, None, K, V), lambda b, h, c: (b, h, 0, 0))
    in_specs = [rows(K), rows(K), rows(V), rows(1), b_rows,
                pl.BlockSpec((None, None, None, K, V), lambda b, h, c: (b, h, rev(c), 0, 0)),
                rows(V), state]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)] + [
        jax.ShapeDtypeStruct(b_col.shape, jnp.float32),
        jax.ShapeDtypeStruct(b_row.shape, jnp.float32),
        jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
    return common.pallas_call(
        functools.partial(_backward_kernel_tpu, scale=cfg.scale), out_shape,
        grid=(B, H, N), in_specs=in_specs,
        out_specs=[rows(K), rows(K), rows(V), rows(1), b_rows, state],
        scratch_shapes=[pltpu.VMEM((K, V), jnp.float32)],
        compiler_params=_tpu_params("parallel", "parallel", "arbitrary"),
        interpret=cfg.interpret, name="linear_attention_bwd_tpu",
        args=(q, k, v, b_col, b_row, starts, d_o, d_final),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# GPU (Triton) kernels
# ---------------------------------------------------------------------------------------------


def _forward_kernel_gpu(q_ref, k_ref, v_ref, bc_ref, br_ref, h0_ref, o_ref, hT_ref, *starts_ref,
                        chunk, scale):
    """One program per (b, h, V block): a loop over the chunks with the state as the carry."""

    def body(c, S):
        rows = pl.ds(c * chunk, chunk)
        if starts_ref:
            starts_ref[0][c] = S
        o, S_next = _chunk_forward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                   bc_ref[rows, :], br_ref[c], S, scale)
        o_ref[rows, :] = o.astype(o_ref.dtype)
        return S_next

    n_chunks = q_ref.shape[0] // chunk
    hT_ref[...] = lax.fori_loop(0, n_chunks, body, h0_ref[...])


def _forward_gpu(cfg: _Config, q, k, v, b_col, b_row, h0, with_starts: bool):
    B, H, T, K = q.shape
    V, C, Vb = v.shape[-1], cfg.chunk, cfg.block_v
    N = T // C
    whole = lambda *s: pl.BlockSpec((None, None, *s), lambda b, h, j: (b, h, *[0] * len(s)))  # noqa
    v_whole = pl.BlockSpec((None, None, T, Vb), lambda b, h, j: (b, h, 0, j))
    state = pl.BlockSpec((None, None, K, Vb), lambda b, h, j: (b, h, 0, j))
    out_shape = [jax.ShapeDtypeStruct((B, H, T, V), v.dtype),
                 jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
    out_specs = [v_whole, state]
    if with_starts:
        out_shape.append(jax.ShapeDtypeStruct((B, H, N, K, V), jnp.float32))
        out_specs.append(pl.BlockSpec((None, None, N, K, Vb), lambda b, h, j: (b, h, 0, 0, j)))
    return common.pallas_call(
        functools.partial(_forward_kernel_gpu, chunk=C, scale=cfg.scale), out_shape,
        grid=(B, H, V // Vb),
        in_specs=[whole(T, K), whole(T, K), v_whole, whole(T, 1), whole(N, 1, C), state],
        out_specs=out_specs, interpret=cfg.interpret, name="linear_attention_fwd_gpu",
        args=(q, k, v, b_col, b_row, h0),
    )  # fmt: skip


def _backward_kernel_gpu(q_ref, k_ref, v_ref, bc_ref, br_ref, s_ref, do_ref, dhT_ref,
                         dq_ref, dk_ref, dv_ref, dbc_ref, dbr_ref, dh0_ref, *, chunk, scale):
    """One program per (b, h): a reverse loop over the chunks with G as the carry."""
    n_chunks = q_ref.shape[0] // chunk

    def body(i, G):
        c = n_chunks - 1 - i
        rows = pl.ds(c * chunk, chunk)
        grads, G_prev = _chunk_backward(q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                        bc_ref[rows, :], br_ref[c], s_ref[c], do_ref[rows, :],
                                        G, scale)
        dq, dk, dv, db_col, db_row = grads
        dq_ref[rows, :] = dq.astype(dq_ref.dtype)
        dk_ref[rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        dbc_ref[rows, :] = db_col
        dbr_ref[c] = db_row
        return G_prev

    dh0_ref[...] = lax.fori_loop(0, n_chunks, body, dhT_ref[...])


def _backward_gpu(cfg: _Config, q, k, v, b_col, b_row, starts, d_o, d_final):
    B, H, T, K = q.shape
    V, C = v.shape[-1], cfg.chunk
    N = T // C
    whole = lambda *s: pl.BlockSpec((None, None, *s), lambda b, h: (b, h) + (0,) * len(s))  # noqa
    specs = [whole(T, K), whole(T, K), whole(T, V), whole(T, 1), whole(N, 1, C)]
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)] + [
        jax.ShapeDtypeStruct(b_col.shape, jnp.float32),
        jax.ShapeDtypeStruct(b_row.shape, jnp.float32),
        jax.ShapeDtypeStruct((B, H, K, V), jnp.float32)]
    return common.pallas_call(
        functools.partial(_backward_kernel_gpu, chunk=C, scale=cfg.scale), out_shape,
        grid=(B, H), in_specs=[*specs, whole(N, K, V), whole(T, V), whole(K, V)],
        out_specs=[*specs, whole(K, V)], interpret=cfg.interpret,
        name="linear_attention_bwd_gpu",
        args=(q, k, v, b_col, b_row, starts, d_o, d_final),
    )  # fmt: skip


_FORWARD = {"tpu": _forward_tpu, "gpu": _forward_gpu}
_BACKWARD = {"tpu": _backward_tpu, "gpu": _backward_gpu}


# ---------------------------------------------------------------------------------------------
# custom_vjp over the head-major, padded layout
# ---------------------------------------------------------------------------------------------


def _b_layouts(b, C):
    """b ``[B, H, T]`` as a column ``[B, H, T, 1]`` and as rows ``[B, H, T/C, 1, C]``."""
    B, H, T = b.shape
    return b[..., None], b.reshape(B, H, T // C, 1, C)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: _Config, q, k, v, b, h0):
    """Head-major q, k ``[B, H, T, K]``, v ``[B, H, T, V]``, b ``[B, H, T]`` (chunk-local cumsum
    of g, float32), h0 ``[B, H, K, V]`` float32; T a multiple of the chunk."""
    o, final = _FORWARD[cfg.variant](cfg, q, k, v, *_b_layouts(b, cfg.chunk), h0, False)
    return o, final


def _core_fwd(cfg, q, k, v, b, h0):
    o, final, starts = _FORWARD[cfg.variant](cfg, q, k, v, *_b_layouts(b, cfg.chunk), h0, True)
    return (o, final), (q, k, v, b, starts)


def _core_bwd(cfg, residuals, cotangents):
    q, k, v, b, starts = residuals
    d_o, d_final = cotangents
    dq, dk, dv, db_col, db_row, dh0 = _BACKWARD[cfg.variant](
        cfg, q, k, v, *_b_layouts(b, cfg.chunk), starts, d_o.astype(v.dtype),
        d_final.astype(jnp.float32))
    return dq, dk, dv, db_col[..., 0] + db_row.reshape(b.shape), dh0


_core.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _run(q, k, v, g, h0, *, cfg: _Config):
    """[B, T, H, ...] in and out: pad, go head-major, cumsum g per chunk, run ``_core``."""
    B, T, H, K = q.shape
    V, C = v.shape[-1], cfg.chunk
    heads = lambda x: jnp.swapaxes(common.pad_time(x, C), 1, 2)  # noqa: E731
    q_, k_, v_ = heads(q), heads(k), heads(v)
    Tp = q_.shape[2]
    if g is None:
        b = jnp.zeros((B, H, Tp), jnp.float32)
    else:
        g_ = common.pad_time(g.astype(jnp.float32), C).reshape(B, Tp // C, C, H)
        b = jnp.cumsum(g_, axis=2).reshape(B, Tp, H).transpose(0, 2, 1)
    h0 = jnp.zeros((B, H, K, V), jnp.float32) if h0 is None else h0.astype(jnp.float32)
    o, final = _core(cfg, q_, k_, v_, b, h0)
    return jnp.swapaxes(o, 1, 2)[:, :T], final


def _linear_attention(variant, q, k, v, g, scale, initial_state, normalize, chunk_size, block_v,
                      interpret):
    scale = _check_features(variant, q, g, normalize, q.shape[-1] ** -0.5 if scale is None
                            else scale)
    V = v.shape[-1]
    block_v = _default_block_v(variant, V) if block_v is None else block_v
    _check_tiling(variant, chunk_size, q.shape[-1], V, block_v)
    chunk = _effective_chunk(variant, chunk_size, q.shape[1])
    cfg = _Config(variant, chunk, block_v, scale, interpret)
    return _run(q, k, v, g, initial_state, cfg=cfg)


def linear_attention_tpu(q, k, v, g=None, *, scale=None, initial_state=None, normalize=False,
                         chunk_size=64, block_v=None, interpret=False):
    """The TPU (Mosaic) kernel; see the module docstring. ``interpret=True`` runs it in Pallas
    interpret mode (any backend). ``block_v``: V block of the forward grid (default 128 when V is
    a multiple of it, else V). Returns (o ``[B, T, H, V]`` in v's dtype, final state float32)."""
    return _linear_attention("tpu", q, k, v, g, scale, initial_state, normalize, chunk_size,
                             block_v, interpret)


def linear_attention_gpu(q, k, v, g=None, *, scale=None, initial_state=None, normalize=False,
                         chunk_size=64, block_v=None, interpret=False):
    """The GPU (Pallas Triton) kernel; see the module docstring. ``interpret=True`` runs it in
    Pallas interpret mode (any backend). ``block_v``: V block of the forward grid (default 64
    when V is a multiple of it, else V)."""
    return _linear_attention("gpu", q, k, v, g, scale, initial_state, normalize, chunk_size,
                             block_v, interpret)


_VARIANTS = {"tpu": linear_attention_tpu, "gpu": linear_attention_gpu}


def linear_attention_sharded(mesh, *, batch_axis=None, head_axis=None, variant="tpu",
                             interpret=False):
    """A kernel with the op's signature that runs ``variant`` under ``jax.shard_map`` on
    ``mesh``, each shard on its own batch rows (split over mesh axis ``batch_axis``) and heads
    (``head_axis``); no collective is needed since batch rows and heads are independent."""
    kernel = functools.partial(_VARIANTS[variant], interpret=interpret)

    def run(q, k, v, g=None, *, scale=None, initial_state=None, normalize=False, chunk_size=64):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        named = {"q": q, "k": k, "v": v, "g": g, "initial_state": initial_state}
        layouts = {"q": ("B", None, "H", None), "k": ("B", None, "H", None),
                   "v": ("B", None, "H", None), "g": ("B", None, "H"),
                   "initial_state": ("B", "H", None, None)}
        names = [n for n, x in named.items() if x is not None]

        def local(*arrays):
            return kernel(**dict(zip(names, arrays)), scale=scale, normalize=normalize,
                          chunk_size=chunk_size)

        sharded = common.shard_batch_and_heads(
            local, mesh, [layouts[n] for n in names],
            [("B", None, "H", None), ("B", "H", None, None)],
            batch_axis=batch_axis, head_axis=head_axis)
        return sharded(*(named[n] for n in names))

    return run


kernels.register("linear_attention", platform="tpu")(
    functools.partial(linear_attention_tpu, interpret=False))
kernels.register("linear_attention", platform="gpu")(
    functools.partial(linear_attention_gpu, interpret=False))
kernels.register("linear_attention", platform="cpu")(
    functools.partial(linear_attention_tpu, interpret=common.interpret("cpu")))
