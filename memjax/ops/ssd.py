"""Mamba-2's state-space duality (SSD) layer core (Dao & Gu 2024): a scalar decay per head.

Recurrence, per head h (sequence-first layout, ``dt`` already positive, one group: every head
reads the same B and C)::

    S_t[h] = exp(dt_t[h] A[h]) S_{t-1}[h] + dt_t[h] Bm_t x_t[h]^T        # S [N, P]
    y_t[h] = S_t[h]^T Cm_t + Dskip[h] x_t[h]

Shapes: x ``[B, T, H, P]`` (P the head's value width); dt ``[B, T, H]``; A ``[H]`` (real, <= 0;
not checked, values may be traced); Bm, Cm ``[B, T, N]``; Dskip ``[H]`` or None; the state is
``[B, H, N, P]``. Arithmetic happens in ``promote_types(inputs, float32)`` (the state is returned
in float32, float64 for float64 inputs under ``jax_enable_x64``); y has x's dtype.

Forms (``impl``):

- ``"reference"``: token-by-token ``lax.scan``; the source of truth.
- ``"chunk"``: this is decayed linear attention with a per-head log decay ``g = dt A``,
  ``q = Cm``, ``k = Bm`` (broadcast over heads), ``v = dt x`` and scale 1, so it dispatches to
  ``memjax.ops.linear_attention(..., impl="chunk")`` (its chunkwise form with the hand-written
  backward pass) instead of a chunk algorithm of its own.
- ``"auto"``: chunk (measured fastest on CPU, below).

Measured with ``scripts/bench.py`` (docs/results/bench_ssm_scans.json: float32, B=1, H=8,
P=32, N=16, chunk 64, one run on a 2-core CPU), chunk time relative to reference, forward /
forward+backward: 0.64 / 0.27 at T=1024, 0.66 / 0.17 at T=4096, 0.49 / 0.21 at T=16384.

Gradients are JAX autodiff (the chunk form's come from linear_attention's custom VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops.linear_attention import _check_chunk_size, linear_attention

__all__ = ["ssd", "ssd_step", "IMPLS"]

IMPLS = ("auto", "reference", "chunk")


def _check(name: str, x, expected: tuple, what: str) -> None:
    if x is not None and tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(x.shape)}")


def _validate(x, dt, A, Bm, Cm, Dskip, state, *, step: bool) -> None:
    """Shapes of a sequence call (``step=False``) or a one-token call; errors name the argument."""
    rank, what_x = (3, "[B, H, P]") if step else (4, "[B, T, H, P]")
    if x.ndim != rank:
        raise ValueError(f"x must have rank {rank} {what_x}, got shape {tuple(x.shape)}")
    if Bm.ndim != rank - 1:
        what = "[B, N]" if step else "[B, T, N]"
        raise ValueError(f"Bm must have rank {rank - 1} {what}, got shape {tuple(Bm.shape)}")
    lead, H, P = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    N = Bm.shape[-1]
    what_lead = "[B" if step else "[B, T"
    _check("dt", dt, (*lead, H), f"{what_lead}, H] (as x)")
    _check("A", A, (H,), "[H]")
    _check("Bm", Bm, (*lead, N), f"{what_lead}, N] (as x)")
    _check("Cm", Cm, (*lead, N), f"{what_lead}, N] (same as Bm)")
    _check("Dskip", Dskip, (H,), "[H]")
    _check("state" if step else "initial_state", state, (x.shape[0], H, N, P), "[B, H, N, P]")


def _acc_dtype(*arrays):
    present = [a for a in arrays if a is not None]
    return jnp.promote_types(jnp.result_type(*present), jnp.float32)


def _skip(y, x, Dskip):
    return y if Dskip is None else y + Dskip[:, None] * x


def _step(x, dt, A, Bm, Cm, Dskip, S):
    """x ``[B, H, P]``, dt ``[B, H]``, Bm, Cm ``[B, N]``, S ``[B, H, N, P]``; cast already."""
    a = jnp.exp(dt * A)[..., None, None]
    S = a * S + Bm[:, None, :, None] * (dt[..., None] * x)[:, :, None, :]
    y = jnp.einsum("bhnp,bn->bhp", S, Cm)
    return _skip(y, x, Dskip), S


def ssd_step(x, dt, A, Bm, Cm, state, Dskip=None):
    """Advance SSD by one token (decoding with a cached state).

    Args:
      x: ``[B, H, P]``; dt: ``[B, H]`` positive; A: ``[H]``; Bm, Cm: ``[B, N]``;
      state: ``[B, H, N, P]``, the state after the previous token; Dskip: ``[H]`` or None.

    Returns:
      ``(y, new_state)``: y ``[B, H, P]`` in x's dtype; new_state ``[B, H, N, P]`` in float32
      (float64 for float64 inputs).
    """
    _validate(x, dt, A, Bm, Cm, Dskip, state, step=True)
    acc = _acc_dtype(x, dt, A, Bm, Cm, Dskip)
    cast = [None if a is None else a.astype(acc) for a in (x, dt, A, Bm, Cm, Dskip, state)]
    y, S = _step(*cast)
    return y.astype(x.dtype), S


def _reference_form(x, dt, A, Bm, Cm, Dskip, S0):
    def body(S, xs):
        y, S = _step(*xs[:2], A, *xs[2:], Dskip, S)
        return S, y

    time_major = [jnp.moveaxis(a, 1, 0) for a in (x, dt, Bm, Cm)]
    final, y = jax.lax.scan(body, S0, time_major)
    return jnp.moveaxis(y, 0, 1), final


def _chunk_form(x, dt, A, Bm, Cm, Dskip, S0, chunk_size):
    Bsz, T, H, _ = x.shape
    heads = (Bsz, T, H, Bm.shape[-1])
    o, final = linear_attention(
        jnp.broadcast_to(Cm[:, :, None, :], heads),  # q
        jnp.broadcast_to(Bm[:, :, None, :], heads),  # k
        dt[..., None] * x,  # v
        dt * A,  # per-head log decay g <= 0
        scale=1.0,
        initial_state=S0,
        impl="chunk",
        chunk_size=chunk_size,
    )
    return _skip(o, x, Dskip), final


@functools.partial(jax.jit, static_argnames=("impl", "chunk_size"))
def _ssd(x, dt, A, Bm, Cm, Dskip, initial_state, *, impl, chunk_size):
    out_dtype = x.dtype
    acc = _acc_dtype(x, dt, A, Bm, Cm, Dskip)
    Bsz, T, H, P = x.shape
    if initial_state is None:
        S0 = jnp.zeros((Bsz, H, Bm.shape[-1], P), acc)
    else:
        S0 = initial_state.astype(acc)
    if T == 0:
        return jnp.zeros(x.shape, out_dtype), S0
    args = [None if a is None else a.astype(acc) for a in (x, dt, A, Bm, Cm, Dskip)]
    if impl == "reference":
        y, final = _reference_form(*args, S0)
    else:
        y, final = _chunk_form(*args, S0, min(chunk_size, T))
    return y.astype(out_dtype), final


def ssd(x, dt, A, Bm, Cm, Dskip=None, *, initial_state=None, impl="auto", chunk_size=64):
    """Mamba-2 SSD over a sequence (see the module docstring for the equations).

    Args:
      x: ``[B, T, H, P]`` per-head inputs (values).
      dt: ``[B, T, H]`` positive step sizes (after softplus).
      A: ``[H]`` real, <= 0: one scalar decay rate per head.
      Bm, Cm: ``[B, T, N]``, shared by every head (one group).
      Dskip: ``[H]`` skip connection, or None.
      initial_state: ``[B, H, N, P]`` state before the first token; None means zeros.
      impl: ``"reference"``, ``"chunk"`` or ``"auto"`` (chunk).
      chunk_size: chunk length of the chunk form (any positive int; T need not be a multiple).

    Returns:
      ``(y, final_state)``: y ``[B, T, H, P]`` in x's dtype; final_state ``[B, H, N, P]`` in
      float32 (float64 when the inputs are float64).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    chunk_size = _check_chunk_size(chunk_size)
    _validate(x, dt, A, Bm, Cm, Dskip, initial_state, step=False)
    impl = "chunk" if impl == "auto" else impl
    return _ssd(x, dt, A, Bm, Cm, Dskip, initial_state, impl=impl, chunk_size=chunk_size)
