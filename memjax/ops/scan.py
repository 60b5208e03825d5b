"""First-order linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (elementwise), three forms.

This is the scan shared by the diagonal SSMs (S4D, S5) and the selective SSMs (Mamba): each of
them reduces its state update to an elementwise affine recurrence along time.

Layout is sequence-first: a, b ``[B, T, *S]`` (same shape, any trailing state shape S, real or
complex); the state is ``[B, *S]``. Arithmetic happens in ``promote_types(dtype(a, b, h0),
float32)``: float32 (complex64) for float32 / bfloat16 inputs, float64 (complex128) for float64
inputs under ``jax_enable_x64``. ``h`` and the final state are returned in that dtype.

Forms (``impl``):

- ``"reference"``: ``lax.scan`` over T, one token at a time; the source of truth.
- ``"scan"``: ``jax.lax.associative_scan`` over the affine monoid
  ``(a_i, b_i) * (a_j, b_j) = (a_j a_i, a_j b_i + b_j)`` (element i before element j). The
  initial state is folded into the first element, ``b_0 <- a_0 h_0 + b_0``, so ``h_t`` is the
  second component of the prefix product. O(T log T) work in O(log T) depth; keeps O(T) prefix
  intermediates alive for the backward pass.
- ``"chunk"``: the sequence is cut into blocks of ``chunk_size`` tokens; inside a block the
  associative scan runs in parallel, and a ``lax.scan`` over blocks carries the state. Parallel
  within a block, sequential across blocks, and the associative-scan intermediates only ever
  exist for one block at a time (bounded memory for long T).
- ``"pallas"``: a kernel registered in ``kernels/`` for the platform; ``"auto"``: the form
  ``memjax.ops.dispatch.AUTO`` names (reference on CPU, scan on accelerators).

``linear_scan_step`` advances the state by one token (decoding).

On CPU the token-by-token scan is the fastest form (docs/results/op_dispatch.md,
docs/results/bench_ssm_scans.json): each step touches only the ``[B, *S]`` state, which stays
in cache, while the parallel forms stream several passes over ``[B, T, *S]`` arrays.

Any T >= 0 is accepted. Gradients are JAX autodiff of each form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.ops import dispatch
from memjax.ops._common import acc_dtype, check_chunk_size, from_blocks, scan_over_time
from memjax.ops._common import state_or_zeros, to_blocks

__all__ = ["linear_scan", "linear_scan_step"]

DEFAULT_CHUNK_SIZE = 128


def _combine(left, right):
    """Compose two affine maps: apply ``left`` then ``right`` (associative)."""
    a_i, b_i = left
    a_j, b_j = right
    return a_j * a_i, a_j * b_i + b_j


def _validate(a, b, initial_state) -> None:
    if a.ndim < 2:
        raise ValueError(f"a must have rank >= 2 ([B, T, *S]), got shape {tuple(a.shape)}")
    if tuple(b.shape) != tuple(a.shape):
        raise ValueError(
            f"b must have the same shape as a ([B, T, *S] = {tuple(a.shape)}), got {tuple(b.shape)}"
        )
    if initial_state is not None:
        expected = (a.shape[0], *a.shape[2:])
        if tuple(initial_state.shape) != expected:
            raise ValueError(
                f"initial_state must have shape [B, *S] = {expected}, got "
                f"{tuple(initial_state.shape)}"
            )


def _step(h, a_t, b_t):
    h = a_t * h + b_t
    return h, h


def linear_scan_step(a_t, b_t, state):
    """One token of ``h_t = a_t * h_{t-1} + b_t``: a_t, b_t and state ``[B, *S]``.

    Returns ``(h_t, h_t)`` (the output is the new state), both in ``promote_types(dtype(a_t, b_t,
    state), float32)``, as the sequence form returns them.
    """
    a_t, b_t, state = jnp.asarray(a_t), jnp.asarray(b_t), jnp.asarray(state)
    if a_t.ndim < 1 or b_t.shape != a_t.shape or state.shape != a_t.shape:
        raise ValueError(f"a_t, b_t and state must have one shape [B, *S]; got a_t "
                         f"{tuple(a_t.shape)}, b_t {tuple(b_t.shape)}, state {tuple(state.shape)}")
    acc = acc_dtype(a_t, b_t, state)
    return _step(state.astype(acc), a_t.astype(acc), b_t.astype(acc))


def _reference_form(a, b, h0):
    return scan_over_time(_step, h0, (a, b))


def _scan_form(a, b, h0):
    b = b.at[:, 0].add(a[:, 0] * h0)
    _, h = jax.lax.associative_scan(_combine, (a, b), axis=1)
    return h, h[:, -1]


def _chunk_form(a, b, h0, chunk_size: int):
    T = a.shape[1]
    c = min(chunk_size, T)
    n = -(-T // c)
    # [n, B, c, *S]: blocks become the scanned (leading) axis. Padding with identity elements
    # (a = 1, b = 0) leaves the state unchanged; their outputs are dropped.
    blocks = (to_blocks(a, n, c, pad_value=1), to_blocks(b, n, c))

    def body(h, xs):
        h_blk, h_last = _scan_form(xs[0], xs[1], h)
        return h_last, h_blk

    final, h = jax.lax.scan(body, h0, blocks)
    return from_blocks(h, T), final


@functools.partial(jax.jit, static_argnames=("form", "chunk_size"))
def _linear_scan(a, b, h0, form: str, chunk_size: int):
    if form == "reference":
        return _reference_form(a, b, h0)
    if form == "chunk":
        return _chunk_form(a, b, h0, chunk_size)
    return _scan_form(a, b, h0)


def linear_scan(a, b, *, initial_state=None, impl="auto", chunk_size=DEFAULT_CHUNK_SIZE):
    """h_t = a_t * h_{t-1} + b_t along axis 1 (elementwise).

    Args:
      a, b: ``[B, T, *S]``, same shape, real or complex.
      initial_state: ``[B, *S]`` (``h_{-1}``); None means zeros.
      impl: ``"reference"`` (``lax.scan`` over T), ``"scan"`` (``lax.associative_scan``
        over the affine monoid ``(a_i, b_i) * (a_j, b_j) = (a_j a_i, a_j b_i + b_j)``, the
        initial state folded into ``b_0``), ``"chunk"`` (associative scan inside blocks of
        ``chunk_size``, ``lax.scan`` carrying the state across blocks: bounded memory for long T),
        ``"pallas"`` (a registered kernel) or ``"auto"`` (``memjax.ops.dispatch``: reference on
        CPU, scan elsewhere).
      chunk_size: block length of the chunk form (ignored by the others).

    Returns:
      ``(h, final_state)``: h ``[B, T, *S]`` and final_state ``[B, *S]`` (``h_{T-1}``, or the
      initial state when T = 0), both in ``promote_types(input dtype, float32)``.
    """
    form = dispatch.resolve("linear_scan", impl)
    chunk_size = check_chunk_size(chunk_size)
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    _validate(a, b, initial_state)
    acc = acc_dtype(a, b, None if initial_state is None else jnp.asarray(initial_state))
    h0 = state_or_zeros(initial_state, (a.shape[0], *a.shape[2:]), acc)
    if a.shape[1] == 0:
        return jnp.zeros(a.shape, acc), h0
    if form == "pallas":
        return dispatch.kernel("linear_scan")(a, b, initial_state=initial_state,
                                              chunk_size=chunk_size)
    return _linear_scan(a.astype(acc), b.astype(acc), h0, form, chunk_size)
