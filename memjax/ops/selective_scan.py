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
- ``"scan"``: materialises ``a = exp(dt A)`` and ``b = dt x Bm`` as ``[B, T, D, N]`` and
  runs ``memjax.ops.scan.linear_scan(impl="scan")`` (an associative scan), then contracts
  with Cm.
- ``"chunk"``: the recurrence is decayed linear attention with D heads, key width N and value
  width 1: per-channel log decay ``g = dt A`` ``[B, T, D, N]``, ``q = Cm``, ``k = Bm`` (broadcast
  over the D heads), ``v = dt x`` and scale 1. It dispatches to
  ``memjax.ops.linear_attention(..., impl="chunk")`` instead of a chunk algorithm of its own.
- ``"pallas"``: a kernel registered in ``kernels/`` for the platform; ``"auto"``: the form
  ``memjax.ops.dispatch.AUTO`` names: the reference form on CPU (measured fastest there), the
  scan form on accelerators (not measured: no accelerator was available; it is the parallel
  form Mamba itself uses).

Speed: docs/results/op_dispatch.md (from docs/results/bench_ssm_scans.json and
bench_ssm_scans_batch16.json). The sequential scan wins on CPU: each step touches only the
``[B, D, N]`` state, which stays in cache, while the scan form streams ``O(log T)`` passes over
``[B, T, D, N]`` arrays. The chunk form is not sensible for this recurrence: with value width 1 its
matmuls do ``C`` times the recurrence's arithmetic (``C N`` per token and channel instead of
``N``), and the per-channel decay takes linear_attention's elementwise intra-chunk path; it is kept
as a third, independently derived form (and it saves one state per block for the backward pass
instead of every prefix). Gradients are JAX autodiff of each form (for chunk, linear_attention's
own).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops import dispatch
from memjax.ops._common import acc_dtype, cast, check_chunk_size, check_rank, check_shape
from memjax.ops._common import empty_sequence, selective_token_scan, state_or_zeros, step_in_acc
from memjax.ops.linear_attention import linear_attention
from memjax.ops.scan import linear_scan

__all__ = ["selective_scan", "selective_scan_step"]


def _validate(x, dt, A, Bm, Cm, Dskip, state, *, step: bool) -> None:
    """Shapes of a sequence call (``step=False``) or a one-token call; errors name the argument."""
    rank, what_x = (2, "[B, D]") if step else (3, "[B, T, D]")
    check_rank("x", x, rank, what_x)
    check_rank("A", A, 2, "[D, N]")
    lead, D = tuple(x.shape[:-1]), x.shape[-1]
    N = A.shape[1]
    what_bc = "[B, N]" if step else "[B, T, N]"
    check_shape("dt", dt, x.shape, f"{what_x} (same as x)")
    check_shape("A", A, (D, N), "[D, N] (D as x)")
    check_shape("Bm", Bm, (*lead, N), f"{what_bc} (N as A)")
    check_shape("Cm", Cm, (*lead, N), f"{what_bc} (N as A)")
    check_shape("Dskip", Dskip, (D,), "[D]")
    check_shape("state" if step else "initial_state", state, (x.shape[0], D, N), "[B, D, N]")


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
    return step_in_acc(_step, (x, dt, A, Bm, Cm, Dskip), state, x.dtype)


# ---------------------------------------------------------------------------------------------
# Sequence forms; inputs already cast to the accumulation dtype, h0 never None
# ---------------------------------------------------------------------------------------------


def _scan_form(x, dt, A, Bm, Cm, Dskip, h0):
    a = jnp.exp(dt[..., None] * A)  # [B, T, D, N]
    b = (dt * x)[..., None] * Bm[:, :, None, :]
    h, final = linear_scan(a, b, initial_state=h0, impl="scan")
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


@functools.partial(jax.jit, static_argnames=("form", "chunk_size"))
def _selective_scan(x, dt, A, Bm, Cm, Dskip, initial_state, *, form, chunk_size):
    """The chosen form on inputs cast to the accumulation dtype; T >= 1."""
    acc = acc_dtype(x, dt, A, Bm, Cm, Dskip)
    h0 = state_or_zeros(initial_state, (x.shape[0], x.shape[2], A.shape[1]), acc)
    args = cast(acc, x, dt, A, Bm, Cm, Dskip)
    if form == "reference":
        y, final = selective_token_scan(_step, *args, h0)
    elif form == "scan":
        y, final = _scan_form(*args, h0)
    else:
        y, final = _chunk_form(*args, h0, min(chunk_size, x.shape[1]))
    return y.astype(x.dtype), final


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
      impl: ``"reference"``, ``"scan"``, ``"chunk"``, ``"pallas"`` or ``"auto"``
        (``memjax.ops.dispatch``: reference on CPU, scan elsewhere).
      chunk_size: chunk length of the chunk form (any positive int; T need not be a multiple).

    Returns:
      ``(y, final_state)``: y ``[B, T, D]`` in x's dtype; final_state ``[B, D, N]`` in float32
      (float64 when the inputs are float64).
    """
    form = dispatch.resolve("selective_scan", impl)
    chunk_size = check_chunk_size(chunk_size)
    _validate(x, dt, A, Bm, Cm, Dskip, initial_state, step=False)
    if x.shape[1] == 0:
        acc = acc_dtype(x, dt, A, Bm, Cm, Dskip)
        state_shape = (x.shape[0], x.shape[2], A.shape[1])
        return empty_sequence(x.shape, x.dtype, initial_state, state_shape, acc)
    if form == "pallas":
        return dispatch.kernel("selective_scan")(x, dt, A, Bm, Cm, Dskip,
                                                 initial_state=initial_state, chunk_size=chunk_size)
    return _selective_scan(x, dt, A, Bm, Cm, Dskip, initial_state, form=form, chunk_size=chunk_size)
