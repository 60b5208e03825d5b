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
- ``"pallas"``: a kernel registered in ``kernels/`` for the platform; ``"auto"``: the form
  ``memjax.ops.dispatch.AUTO`` names (chunk on every platform today).

The chunk form is faster than the reference forward and forward + backward on CPU
(docs/results/op_dispatch.md, docs/results/bench_ssm_scans.json). T = 0 returns an empty output
and the initial state.

Gradients are JAX autodiff (the chunk form's come from linear_attention's custom VJP).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops import dispatch
from memjax.ops._common import acc_dtype, cast, check_chunk_size, check_rank, check_shape
from memjax.ops._common import empty_sequence, selective_token_scan, state_or_zeros, step_in_acc
from memjax.ops.linear_attention import linear_attention

__all__ = ["ssd", "ssd_step"]


def _validate(x, dt, A, Bm, Cm, Dskip, state, *, step: bool) -> None:
    """Shapes of a sequence call (``step=False``) or a one-token call; errors name the argument."""
    rank, what_x = (3, "[B, H, P]") if step else (4, "[B, T, H, P]")
    check_rank("x", x, rank, what_x)
    check_rank("Bm", Bm, rank - 1, "[B, N]" if step else "[B, T, N]")
    lead, H, P = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    N = Bm.shape[-1]
    what_lead = "[B" if step else "[B, T"
    check_shape("dt", dt, (*lead, H), f"{what_lead}, H] (as x)")
    check_shape("A", A, (H,), "[H]")
    check_shape("Bm", Bm, (*lead, N), f"{what_lead}, N] (as x)")
    check_shape("Cm", Cm, (*lead, N), f"{what_lead}, N] (same as Bm)")
    check_shape("Dskip", Dskip, (H,), "[H]")
    check_shape("state" if step else "initial_state", state, (x.shape[0], H, N, P), "[B, H, N, P]")


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
    return step_in_acc(_step, (x, dt, A, Bm, Cm, Dskip), state, x.dtype)


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


@functools.partial(jax.jit, static_argnames=("form", "chunk_size"))
def _ssd(x, dt, A, Bm, Cm, Dskip, initial_state, *, form, chunk_size):
    """The chosen form on inputs cast to the accumulation dtype; T >= 1."""
    acc = acc_dtype(x, dt, A, Bm, Cm, Dskip)
    Bsz, T, H, P = x.shape
    S0 = state_or_zeros(initial_state, (Bsz, H, Bm.shape[-1], P), acc)
    args = cast(acc, x, dt, A, Bm, Cm, Dskip)
    if form == "reference":
        y, final = selective_token_scan(_step, *args, S0)
    else:
        y, final = _chunk_form(*args, S0, min(chunk_size, T))
    return y.astype(x.dtype), final


def ssd(x, dt, A, Bm, Cm, Dskip=None, *, initial_state=None, impl="auto", chunk_size=64):
    """Mamba-2 SSD over a sequence (see the module docstring for the equations).

    Args:
      x: ``[B, T, H, P]`` per-head inputs (values).
      dt: ``[B, T, H]`` positive step sizes (after softplus).
      A: ``[H]`` real, <= 0: one scalar decay rate per head.
      Bm, Cm: ``[B, T, N]``, shared by every head (one group).
      Dskip: ``[H]`` skip connection, or None.
      initial_state: ``[B, H, N, P]`` state before the first token; None means zeros.
      impl: ``"reference"``, ``"chunk"``, ``"pallas"`` or ``"auto"`` (``memjax.ops.dispatch``).
      chunk_size: chunk length of the chunk form (any positive int; T need not be a multiple).

    Returns ``(y, final_state)``: y ``[B, T, H, P]`` in x's dtype and final_state ``[B, H, N, P]``
    in float32 (float64 for float64 inputs); for T = 0 an empty y and the initial state.
    """
    form = dispatch.resolve("ssd", impl)
    chunk_size = check_chunk_size(chunk_size)
    _validate(x, dt, A, Bm, Cm, Dskip, initial_state, step=False)
    Bsz, T, H, P = x.shape
    if T == 0:
        acc = acc_dtype(x, dt, A, Bm, Cm, Dskip)
        return empty_sequence(x.shape, x.dtype, initial_state, (Bsz, H, Bm.shape[-1], P), acc)
    if form == "pallas":
        return dispatch.kernel("ssd")(x, dt, A, Bm, Cm, Dskip, initial_state=initial_state,
                                      chunk_size=chunk_size)
    return _ssd(x, dt, A, Bm, Cm, Dskip, initial_state, form=form, chunk_size=chunk_size)
