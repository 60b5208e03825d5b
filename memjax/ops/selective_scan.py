"""Mamba's selective scan (Gu & Dao 2023): a diagonal SSM whose step, B and C depend on the input.

Recurrence, per channel d and state index n (sequence-first layout, ``dt`` already positive)::

    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] Bm_t[n] x_t[d]
    y_t[d]    = sum_n Cm_t[n] h_t[d, n] + Dskip[d] x_t[d]

Shapes: x, dt ``[B, T, D]``; A ``[D, N]`` (real, <= 0; not checked, values may be traced);
Bm, Cm ``[B, T, N]`` (shared by every channel); Dskip ``[D]`` or None (no skip); the state is
``[B, D, N]``. Arithmetic happens in ``promote_types(inputs, float32)``: float32 for float32 /
bfloat16 inputs (the state is returned in float32), float64 for float64 inputs under
``jax_enable_x64``. y has x's dtype.

Forms (``impl``):

- ``"reference"``: token-by-token ``lax.scan``; the source of truth.
- ``"associative"``: materialises ``a = exp(dt A)`` and ``b = dt x Bm`` as ``[B, T, D, N]`` and
  runs ``memjax.ops.scan.linear_scan(impl="associative")``, then contracts with Cm.
- ``"chunk"``: the recurrence is decayed linear attention with D heads, key width N and value
  width 1: per-channel log decay ``g = dt A`` ``[B, T, D, N]``, ``q = Cm``, ``k = Bm`` (broadcast
  over the D heads), ``v = dt x`` and scale 1. It dispatches to
  ``memjax.ops.linear_attention(..., impl="chunk")`` instead of a chunk algorithm of its own.
- ``"auto"``: the reference form on CPU (measured fastest there, below, and in ``memjax.ops.scan``); the associative form on
  other backends (not measured here: no accelerator was available; it is the parallel form
  Mamba itself uses).

Measured with ``scripts/bench.py`` (docs/results/bench_ssm_scans.json: float32, B=1, D=256,
N=16, chunk 64, one run on a 2-core CPU; ratios of medians), forward / forward+backward time
relative to the reference form: associative 6.2x / 1.8x at T=1024, 5.5x / 2.0x at T=4096 and
6.0x / 1.9x at T=16384; chunk 25x / 18x, 21x / 18x, 24x / 16x. With a batch
(B=16, T=256, D=128; docs/results/bench_ssm_scans_batch16.json): associative 8.0x / 2.8x,
chunk 48x / 25x.

The sequential scan wins on CPU: each step touches only the ``[B, D, N]`` state, which stays in
cache, while the associative form streams ``O(log T)`` passes over ``[B, T, D, N]`` arrays. The
chunk form is not sensible for this recurrence: with value width 1 its matmuls do ``C`` times the
scan's arithmetic (``C N`` per token and channel instead of ``N``), and the per-channel decay
takes linear_attention's elementwise intra-chunk path; it is kept as a third, independently
derived form (and it saves one state per block for the backward pass instead of every prefix).
Gradients are JAX autodiff of each form (for chunk, linear_attention's own).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops.linear_attention import _check_chunk_size, linear_attention
from memjax.ops.scan import linear_scan, prefer_sequential

__all__ = ["selective_scan", "selective_scan_step", "IMPLS"]

IMPLS = ("auto", "reference", "associative", "chunk")


def _shape_error(name: str, x, what: str, expected) -> ValueError:
    return ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(x.shape)}")


def _check(name: str, x, expected: tuple, what: str) -> None:
    if x is not None and tuple(x.shape) != tuple(expected):
        raise _shape_error(name, x, what, expected)


def _validate(x, dt, A, Bm, Cm, Dskip, state, *, step: bool) -> None:
    """Shapes of a sequence call (``step=False``) or a one-token call; errors name the argument."""
    rank, what_x = (2, "[B, D]") if step else (3, "[B, T, D]")
    if x.ndim != rank:
        raise ValueError(f"x must have rank {rank} {what_x}, got shape {tuple(x.shape)}")
    if A.ndim != 2:
        raise ValueError(f"A must have rank 2 [D, N], got shape {tuple(A.shape)}")
    lead, D = tuple(x.shape[:-1]), x.shape[-1]
    N = A.shape[1]
    what_bc = "[B, N]" if step else "[B, T, N]"
    _check("dt", dt, x.shape, f"{what_x} (same as x)")
    _check("A", A, (D, N), "[D, N] (D as x)")
    _check("Bm", Bm, (*lead, N), f"{what_bc} (N as A)")
    _check("Cm", Cm, (*lead, N), f"{what_bc} (N as A)")
    _check("Dskip", Dskip, (D,), "[D]")
    _check("state" if step else "initial_state", state, (x.shape[0], D, N), "[B, D, N]")


def _acc_dtype(*arrays):
    present = [a for a in arrays if a is not None]
    return jnp.promote_types(jnp.result_type(*present), jnp.float32)


def _skip(y, x, Dskip):
    return y if Dskip is None else y + Dskip * x


# ---------------------------------------------------------------------------------------------
# One-token step (also the body of the reference scan)
# ---------------------------------------------------------------------------------------------


def _step(x, dt, A, Bm, Cm, Dskip, h):
    """x, dt ``[B, D]``, Bm, Cm ``[B, N]``, h ``[B, D, N]``, all in the accumulation dtype."""
    a = jnp.exp(dt[..., None] * A)
    h = a * h + (dt * x)[..., None] * Bm[:, None, :]
    y = jnp.einsum("bdn,bn->bd", h, Cm)
    return _skip(y, x, Dskip), h


def selective_scan_step(x, dt, A, Bm, Cm, state, Dskip=None):
    """Advance the selective scan by one token (decoding with a cached state).

    Args:
      x, dt: ``[B, D]`` (dt positive).
      A: ``[D, N]``.
      Bm, Cm: ``[B, N]``.
      state: ``[B, D, N]``, the state after the previous token.
      Dskip: ``[D]`` or None.

    Returns:
      ``(y, new_state)``: y ``[B, D]`` in x's dtype; new_state ``[B, D, N]`` in float32
      (float64 for float64 inputs).
    """
    _validate(x, dt, A, Bm, Cm, Dskip, state, step=True)
    acc = _acc_dtype(x, dt, A, Bm, Cm, Dskip)
    cast = [None if a is None else a.astype(acc) for a in (x, dt, A, Bm, Cm, Dskip, state)]
    y, h = _step(*cast)
    return y.astype(x.dtype), h


# ---------------------------------------------------------------------------------------------
# Sequence forms; inputs already cast to the accumulation dtype, h0 never None
# ---------------------------------------------------------------------------------------------


def _reference_form(x, dt, A, Bm, Cm, Dskip, h0):
    def body(h, xs):
        y, h = _step(*xs[:2], A, *xs[2:], Dskip, h)
        return h, y

    time_major = [jnp.moveaxis(a, 1, 0) for a in (x, dt, Bm, Cm)]
    final, y = jax.lax.scan(body, h0, time_major)
    return jnp.moveaxis(y, 0, 1), final


def _associative_form(x, dt, A, Bm, Cm, Dskip, h0):
    a = jnp.exp(dt[..., None] * A)  # [B, T, D, N]
    b = (dt * x)[..., None] * Bm[:, :, None, :]
    h, final = linear_scan(a, b, initial_state=h0, impl="associative")
    y = jnp.einsum("btdn,btn->btd", h, Cm)
    return _skip(y, x, Dskip), final


def _chunk_form(x, dt, A, Bm, Cm, Dskip, h0, chunk_size):
    Bsz, T, D = x.shape
    N = A.shape[1]
    heads = (Bsz, T, D, N)
    o, final = linear_attention(
        jnp.broadcast_to(Cm[:, :, None, :], heads),  # q
        jnp.broadcast_to(Bm[:, :, None, :], heads),  # k
        (dt * x)[..., None],  # v, value width 1
        dt[..., None] * A,  # per-channel log decay g = dt A <= 0
        scale=1.0,
        initial_state=h0[..., None],
        impl="chunk",
        chunk_size=chunk_size,
    )
    return _skip(o[..., 0], x, Dskip), final[..., 0]


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _selective_scan(x, dt, A, Bm, Cm, Dskip, initial_state, *, impl, chunk_size):
    out_dtype = x.dtype
    acc = _acc_dtype(x, dt, A, Bm, Cm, Dskip)
    Bsz, T, D = x.shape
    if initial_state is None:
        h0 = jnp.zeros((Bsz, D, A.shape[1]), acc)
    else:
        h0 = initial_state.astype(acc)
    if T == 0:
        return jnp.zeros(x.shape, out_dtype), h0
    args = [None if a is None else a.astype(acc) for a in (x, dt, A, Bm, Cm, Dskip)]
    if impl == "reference":
        y, final = _reference_form(*args, h0)
    elif impl == "chunk":
        y, final = _chunk_form(*args, h0, min(chunk_size, T))
    else:
        y, final = _associative_form(*args, h0)
    return y.astype(out_dtype), final


def selective_scan(
    x, dt, A, Bm, Cm, Dskip=None, *, initial_state=None, impl="auto", chunk_size=64
):
    """Mamba's selective scan over a sequence (see the module docstring for the equations).

    Args:
      x: ``[B, T, D]`` input.
      dt: ``[B, T, D]`` positive step sizes (after softplus).
      A: ``[D, N]`` real, <= 0.
      Bm, Cm: ``[B, T, N]`` input and output projections (shared by all channels).
      Dskip: ``[D]`` skip connection, or None.
      initial_state: ``[B, D, N]`` state before the first token; None means zeros.
      impl: ``"reference"``, ``"associative"``, ``"chunk"`` or ``"auto"`` (reference on
        CPU, associative elsewhere).
      chunk_size: chunk length of the chunk form (any positive int; T need not be a multiple).

    Returns:
      ``(y, final_state)``: y ``[B, T, D]`` in x's dtype; final_state ``[B, D, N]`` in float32
      (float64 when the inputs are float64).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    chunk_size = _check_chunk_size(chunk_size)
    _validate(x, dt, A, Bm, Cm, Dskip, initial_state, step=False)
    if impl == "auto":
        impl = "reference" if prefer_sequential() else "associative"
    return _selective_scan(
        x, dt, A, Bm, Cm, Dskip, initial_state, impl=impl, chunk_size=chunk_size
    )
