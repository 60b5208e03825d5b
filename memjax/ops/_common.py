"""Plumbing shared by the operator modules: validation, dtypes, time padding and blocking.

Conventions (docs/design.md): sequences are ``[B, T, ...]`` (time on axis 1), states carry no
time axis. Arithmetic happens in ``acc_dtype(inputs)``: the inputs' common dtype promoted to at
least float32 (complex64 for the complex diagonal SSMs).
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# Validation (every message names the argument, the expected layout and what it got)
# ---------------------------------------------------------------------------------------------


def check_shape(name: str, x, expected: tuple, what: str) -> None:
    """Raise a ValueError naming ``name`` if ``x.shape != expected`` (None passes)."""
    if x is not None and tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(x.shape)}")


def check_rank(name: str, x, rank: int, what: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {what}, got shape {tuple(x.shape)}")


def check_qkv(q, k, v, *, step: bool = False) -> None:
    """q, k ``[B, T, H, K]`` and v ``[B, T, H, V]`` (``step``: without the T axis)."""
    lead, rank = ("[B, H", 3) if step else ("[B, T, H", 4)
    check_rank("q", q, rank, f"{lead}, K]")
    check_rank("k", k, rank, f"{lead}, K]")
    check_rank("v", v, rank, f"{lead}, V]")
    same = "B, H" if step else "B, T, H"
    check_shape("k", k, q.shape, f"{lead}, K] (same as q)")
    check_shape("v", v, (*q.shape[:-1], v.shape[-1]), f"{lead}, V] ({same} as q)")


def check_chunk_size(chunk_size) -> int:
    """chunk_size as a positive int; a clear error for anything else (bool included)."""
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


# ---------------------------------------------------------------------------------------------
# Dtypes and defaults
# ---------------------------------------------------------------------------------------------


def acc_dtype(*arrays, least=jnp.float32):
    """Dtype to accumulate in: the common dtype of the arrays given (None skipped), promoted to
    at least ``least``."""
    present = [a for a in arrays if a is not None]
    return jnp.promote_types(jnp.result_type(*present), least)


def cast(dtype, *arrays):
    """Each array cast to ``dtype`` (None stays None), as a tuple."""
    return tuple(None if a is None else a.astype(dtype) for a in arrays)


def state_or_zeros(initial_state, shape: tuple, dtype):
    """``initial_state`` cast to ``dtype``, or zeros of ``shape`` when it is None."""
    return jnp.zeros(shape, dtype) if initial_state is None else initial_state.astype(dtype)


def default_scale(scale, K: int):
    return K**-0.5 if scale is None else scale


def empty_sequence(out_shape: tuple, out_dtype, initial_state, state_shape: tuple, acc):
    """The result of an operator on T = 0 tokens: empty outputs, and the initial state (zeros
    when None) in the accumulation dtype. Operators return it before any form runs (chunked
    forms would divide by a zero chunk count)."""
    return jnp.zeros(out_shape, out_dtype), state_or_zeros(initial_state, state_shape, acc)


# ---------------------------------------------------------------------------------------------
# Time axis: token scans, padding, blocks of chunks
# ---------------------------------------------------------------------------------------------


def scan_over_time(step, state, xs, *, remat: bool = False):
    """``y_t, state = step(state, *x_t)`` along axis 1 of each array in ``xs`` (None entries pass
    through as None). Returns ``(y [B, T, ...], final state)``.

    ``remat`` rematerialises each step in the backward pass, so autodiff keeps only the carried
    state per token.
    """

    def body(s, x_t):
        y_t, s = step(s, *x_t)
        return s, y_t

    if remat:  # CSE is no risk inside a scan
        body = jax.checkpoint(body, prevent_cse=False)
    time_major = [None if x is None else jnp.moveaxis(x, 1, 0) for x in xs]
    final, y = jax.lax.scan(body, state, time_major)
    return jnp.moveaxis(y, 0, 1), final


def selective_token_scan(step, x, dt, A, Bm, Cm, Dskip, h0):
    """The reference form of the selective SSMs (selective_scan, ssd), which share one argument
    layout: ``y_t, h = step(x_t, dt_t, A, Bm_t, Cm_t, Dskip, h)`` along time."""
    body = lambda h, x_t, dt_t, B_t, C_t: step(x_t, dt_t, A, B_t, C_t, Dskip, h)  # noqa: E731
    return scan_over_time(body, h0, (x, dt, Bm, Cm))


def step_in_acc(step, args, state, out_dtype):
    """``step(*args, state)`` with args and state cast to the args' accumulation dtype; the output
    cast to ``out_dtype``, the new state left in the accumulation dtype."""
    y, state = step(*cast(acc_dtype(*args), *args, state))
    return y.astype(out_dtype), state


def pad_time(x, T_pad: int, value=0):
    """Pad axis 1 (time) of ``x`` with ``value`` up to ``T_pad``.

    The operators pad with elements that are exact no-ops at the end of a sequence (zero keys
    and log decays for the attention-like forms, the identity a = 1, b = 0 for linear_scan), so
    the final state is unchanged; the padded outputs are sliced off.
    """
    pad = T_pad - x.shape[1]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def balanced_blocks(T: int, chunk_size: int, max_chunks: int) -> tuple[int, int]:
    """``(num_blocks, chunks_per_block)`` covering the ``ceil(T / chunk_size)`` chunks of a
    sequence in blocks of at most ``max(1, max_chunks)`` chunks, balanced so that the padding
    stays below one chunk per block. T >= 1."""
    n_chunks = -(-T // chunk_size)
    per_block = max(1, min(n_chunks, max_chunks))
    num_blocks = -(-n_chunks // per_block)
    return num_blocks, -(-n_chunks // num_blocks)


def to_blocks(x, num_blocks: int, block_len: int, pad_value=0):
    """``[B, T, ...]`` -> ``[num_blocks, B, block_len, ...]``, time padded with ``pad_value``
    (the blocks become the leading axis, scanned over; free for B = 1). None stays None."""
    if x is None:
        return None
    x = pad_time(x, num_blocks * block_len, pad_value)
    return jnp.moveaxis(x.reshape(x.shape[0], num_blocks, block_len, *x.shape[2:]), 1, 0)


def from_blocks(y, T: int):
    """``[num_blocks, B, L, ...]`` -> ``[B, T, ...]`` (inverse of ``to_blocks``, padding cut)."""
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :T]


def to_heads(x, M: int, C: int, *, transpose: bool = False):
    """``[B, M*C, H, ...]`` -> ``[B, H, M, C, ...]`` (M chunks of C tokens; heads lead);
    ``[B, H, M, X, C]`` with ``transpose``."""
    B, _, H = x.shape[:3]
    x = x.reshape(B, M, C, H, *x.shape[3:])
    if x.ndim == 4:
        return x.transpose(0, 3, 1, 2)
    return x.transpose(0, 3, 1, 4, 2) if transpose else x.transpose(0, 3, 1, 2, 4)


def from_heads(x):
    """``[B, H, M, C, X]`` -> ``[B, M*C, H, X]`` (inverse of ``to_heads``)."""
    B, H, M, C, X = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(B, M * C, H, X)


# ---------------------------------------------------------------------------------------------
# Chunk-form building blocks shared by several operators
# ---------------------------------------------------------------------------------------------


def intra_chunk_decay(b):
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


def small_matmul(x, y):
    """x @ y over the last two axes as a broadcast multiply-sum (for tiny blocks, where a
    batched dot would spend its time on per-matrix overhead)."""
    return jnp.sum(x[..., :, :, None] * y[..., None, :, :], axis=-2)


def unit_lower_inverse(a, small_block: int = 8):
    """(I + a)^-1 for strictly lower-triangular ``a`` ``[..., C, C]``, by recursive doubling.

    The inverse of a unit lower-triangular 2 x 2 block matrix is
    ``[[L11, 0], [L21, L22]]^-1 = [[T11, 0], [-T22 L21 T11, T22]]`` with ``Tii = Lii^-1``.
    Starting from 1 x 1 diagonal blocks (all ones) each level merges neighbouring pairs of
    diagonal blocks, batched over all pairs, so the whole inverse is log2(C) levels of batched
    matmuls (about C^3 / 3 multiply-adds) with a plain matmul backward; no LAPACK call (whose
    batched CPU triangular solve was 3x slower forward and 10x slower forward + backward here).
    This is the standard recursive triangular inversion: every block it forms is a block of the
    final inverse. (For the delta rule that inverse stays bounded: T_ij, i > j, is -beta_i k_i^T
    (product of the transitions in between) k_j beta_j-like, and with unit keys and beta in
    [0, 2] every transition is a contraction.) C is zero-padded to a power of two (the padded
    part of the inverse is the identity and is sliced off).
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
        mm = small_matmul if s <= small_block else jnp.matmul
        t21 = -mm(mm(t22, lower_left[s]), t11)
        top = jnp.concatenate([t11, jnp.zeros_like(t11)], axis=-1)
        bottom = jnp.concatenate([t21, t22], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        s *= 2
    return inv[..., 0, :C, :C]
